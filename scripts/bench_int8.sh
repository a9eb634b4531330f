#!/usr/bin/env bash
# Integer-path latency in one run: for the MNIST CNN and PP-LCNet at batch 1 and 64, the f32
# model in lithe, its int8 QOperator form (QLinearConv/QLinearMatMul) in lithe's integer
# runtime and the very same QOperator file in ONNX Runtime, then the QDQ form (lithe's default
# output) in lithe and in ONNX Runtime. Every configuration is measured ROUNDS times,
# interleaving the five, and the medians of the p50s are reported, so the ratios compare
# numbers taken under the same machine load (2 shared cores).
# usage: scripts/bench_int8.sh [SECONDS] [ROUNDS] [THREADS]
#   needs LITHE_PYTHON (onnxruntime) and the shared folder (LITHE_SHARED or ../shared).
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-2}"
rounds="${2:-3}"
threads="${3:-1}"
py="${LITHE_PYTHON:-python3}"
shared="${LITHE_SHARED:-../shared}"
out="${LITHE_BENCH_DIR:-/tmp/lithe-bench-int8}"
mkdir -p "$out"
cargo build --release -q
lithe=target/release/lithe

# QOperator files: MNIST CNN calibrated on 1000 MNIST training images, PP-LCNet on the shared
# photos (an image folder needs a label in each file name, so link them as NAME_0.EXT).
mnist_f32=assets/models/mnist_cnn.onnx
mnist_q="$out/mnist_cnn_int8_qop.onnx"
"$lithe" quantize "$mnist_f32" -o "$mnist_q" --format qop --calib mnist -q --no-activation-sqnr >/dev/null
mnist_qdq="$out/mnist_cnn_int8_qdq.onnx"
"$lithe" quantize "$mnist_f32" -o "$mnist_qdq" --calib mnist -q --no-activation-sqnr >/dev/null
photos="$out/photos"
mkdir -p "$photos"
for f in "$shared"/images/photos/*; do
  b=$(basename "$f")
  ln -sf "$(realpath "$f")" "$photos/${b%.*}_0.${b##*.}"
done
lcnet_f32="$shared/models/pplcnet_orientation.onnx"
lcnet_q="$out/pplcnet_int8_qop.onnx"
"$lithe" quantize "$lcnet_f32" -o "$lcnet_q" --format qop --calib "$photos" --preprocess imagenet \
  -q --no-activation-sqnr >/dev/null
lcnet_qdq="$out/pplcnet_int8_qdq.onnx"
"$lithe" quantize "$lcnet_f32" -o "$lcnet_qdq" --calib "$photos" --preprocess imagenet \
  -q --no-activation-sqnr >/dev/null

p50() { "$py" -c 'import json,sys; print(json.load(sys.stdin)["p50_ms"])'; }
median() { "$py" -c 'import statistics,sys; print(statistics.median(float(v) for v in sys.argv[1:]))' "$@"; }

printf '| model | batch | threads | lithe f32 ms | lithe int8 ms | ORT int8 ms | int8 / f32 | lithe int8 / ORT int8 | lithe QDQ ms | ORT QDQ ms | QDQ / f32 | lithe QDQ / ORT QDQ |\n'
printf '|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n'
for set in "mnist_cnn:$mnist_f32:$mnist_q:$mnist_qdq" "pplcnet_orientation:$lcnet_f32:$lcnet_q:$lcnet_qdq"; do
  IFS=: read -r name f32 q qdq <<<"$set"
  for batch in 1 64; do
    f=() i=() o=() d=() e=()
    for _ in $(seq "$rounds"); do
      f+=("$("$lithe" bench "$f32" --batch "$batch" --threads "$threads" --seconds "$secs" --json | p50)")
      i+=("$("$lithe" bench "$q" --batch "$batch" --threads "$threads" --seconds "$secs" --json | p50)")
      o+=("$("$py" scripts/ort_bench.py "$q" --batch "$batch" --threads "$threads" --seconds "$secs" | p50)")
      d+=("$("$lithe" bench "$qdq" --batch "$batch" --threads "$threads" --seconds "$secs" --json | p50)")
      e+=("$("$py" scripts/ort_bench.py "$qdq" --batch "$batch" --threads "$threads" --seconds "$secs" | p50)")
    done
    mf=$(median "${f[@]}") mi=$(median "${i[@]}") mo=$(median "${o[@]}") md=$(median "${d[@]}") me=$(median "${e[@]}")
    "$py" -c "import sys; n,b,t,f,i,o,d,e=sys.argv[1:]; f,i,o,d,e=map(float,(f,i,o,d,e)); print(f'| {n} | {b} | {t} | {f:.3f} | {i:.3f} | {o:.3f} | {i/f:.2f} | {i/o:.2f} | {d:.3f} | {e:.3f} | {d/f:.2f} | {d/e:.2f} |')" \
      "$name" "$batch" "$threads" "$mf" "$mi" "$mo" "$md" "$me"
  done
done
