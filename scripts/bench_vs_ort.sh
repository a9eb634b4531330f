#!/usr/bin/env bash
# Latency of lithe and ONNX Runtime side by side, in one run: batch 1 and 64, 1 and 2 threads,
# on the MNIST CNN and PP-LCNet. Prints a Markdown table with the lithe/ORT ratio.
# usage: scripts/bench_vs_ort.sh [SECONDS]   (needs LITHE_PYTHON with onnxruntime, ../shared)
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-3}"
py="${LITHE_PYTHON:-python3}"
shared="${LITHE_SHARED:-../shared}"
cargo build --release -q
lithe=target/release/lithe
printf '| model | batch | threads | lithe p50 ms | ORT p50 ms | lithe / ORT |\n|---|---:|---:|---:|---:|---:|\n'
for model in "$shared/models/mnist_cnn.onnx" "$shared/models/pplcnet_orientation.onnx"; do
  for batch in 1 64; do
    for threads in 1 2; do
      ours=$("$lithe" bench "$model" --batch "$batch" --threads "$threads" --seconds "$secs" --json | "$py" -c 'import json,sys; print(json.load(sys.stdin)["p50_ms"])')
      theirs=$("$py" scripts/ort_bench.py "$model" --batch "$batch" --threads "$threads" --seconds "$secs" | "$py" -c 'import json,sys; print(json.load(sys.stdin)["p50_ms"])')
      ratio=$("$py" -c "print(f'{$ours/$theirs:.2f}')")
      printf '| %s | %d | %d | %.3f | %.3f | %s |\n' "$(basename "$model" .onnx)" "$batch" "$threads" "$ours" "$theirs" "$ratio"
    done
  done
done
