#!/usr/bin/env python3
"""lithe quantize vs onnxruntime.quantization.quantize_static on MNIST models.

usage: ort_quantize_compare.py [--lithe target/release/lithe] [--model M.onnx ...]
                               [--out DIR] [--schemes] [--repeat 3] [--json FILE]
Default models: assets/models/mnist_cnn.onnx and assets/models/lenet5.onnx (both take
MNIST normalised with mean 0.1307, std 0.3081).

Both quantizers get the same 1000 calibration images (the first 1000 of MNIST train, normalised
as lithe does) and write QDQ models with per-channel weights; every model is then run in ONNX
Runtime on the 10k test set. Reports accuracy at 8 bits and with 4-bit weights, the wall and
CPU time of each quantizer (best of --repeat alternating runs; lithe's includes process
start-up, model loading and writing; CPU time is user + system of all threads, which a busy
machine distorts less than wall time), and the peak RSS of lithe's calibration with 100, 1000
and 10000 samples (observers are streaming; run at the default thread count and with --threads 1: with N
threads, N batches are in flight, so a set of a single batch uses one thread). For scale, the
time ONNX Runtime itself needs for one f32 forward pass over the calibration images is printed
too: MinMax calibration cannot be much faster than that pass. With --schemes, also every lithe
scheme (linear, fixed, log, kmeans) at 8, 6 and 4 weight bits: accuracy in ORT and bytes.
"""
import argparse
import gzip
import json
import logging
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)

REPO = Path(__file__).resolve().parent.parent
MEAN, STD = 0.1307, 0.3081


def idx(path):
    with gzip.open(path) as f:
        data = f.read()
    if data[2] == 8 and data[3] == 3:
        n, r, c = np.frombuffer(data[4:16], ">u4")
        return np.frombuffer(data[16:], np.uint8).reshape(n, 1, r, c)
    return np.frombuffer(data[8:], np.uint8)


def images(split):
    d = REPO / "assets" / "mnist"
    name = "train" if split == "train" else "t10k"
    x = idx(d / f"{name}-images-idx3-ubyte.gz").astype(np.float32) / 255.0
    y = idx(d / f"{name}-labels-idx1-ubyte.gz")
    return (x - MEAN) / STD, y


class Reader(CalibrationDataReader):
    def __init__(self, x, name, batch=100):
        self.x, self.name, self.batch, self.i = x, name, batch, 0

    def get_next(self):
        if self.i >= len(self.x):
            return None
        b = self.x[self.i : self.i + self.batch]
        self.i += self.batch
        return {self.name: b}


def accuracy(model, x, y):
    so = ort.SessionOptions()
    s = ort.InferenceSession(str(model), so, providers=["CPUExecutionProvider"])
    out = s.run(None, {s.get_inputs()[0].name: x})[0]
    return float((out.argmax(1) == y).mean())


def lithe(args, model, out, extra, calib=None):
    """Runs `lithe quantize`; returns (wall seconds, its JSON report)."""
    report = Path(str(out) + ".report.json")
    cmd = [args.lithe, "quantize", str(model), "-o", str(out), "-q", "--no-activation-sqnr"]
    cmd += ["--report", str(report)]
    cmd += ["--calib", str(calib)] if calib else ["--calib", "mnist", "--calib-split", "train"]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    p = subprocess.run(cmd + extra, capture_output=True, text=True)
    wall = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if p.returncode != 0:
        sys.exit(f"lithe failed: {' '.join(cmd + extra)}\n{p.stderr}")
    rep = json.loads(report.read_text())
    rep["cpu_seconds"] = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, rep


def forward_seconds(model, x, name, batch=100):
    """ORT's f32 inference over x in calibration-sized batches (best of 3)."""
    s = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        for i in range(0, len(x), batch):
            s.run(None, {name: x[i : i + batch]})
        best = min(best, time.perf_counter() - t)
    return best


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lithe", default=str(REPO / "target" / "release" / "lithe"))
    ap.add_argument("--model", nargs="+", default=[
        str(REPO / "assets" / "models" / "mnist_cnn.onnx"),
        str(REPO / "assets" / "models" / "lenet5.onnx"),
    ])
    ap.add_argument("--out", default="/tmp/lithe-quantize-compare")
    ap.add_argument("--schemes", action="store_true")
    ap.add_argument("--repeat", type=int, default=3, help="time each quantizer this many times")
    ap.add_argument("--json")
    args = ap.parse_args()
    logging.getLogger().setLevel(logging.ERROR)
    everything = {}
    for model in args.model:
        print(f"\n## {Path(model).name}")
        everything[Path(model).stem] = compare(args, model, Path(args.out) / Path(model).stem)
    if args.json:
        Path(args.json).write_text(json.dumps(everything, indent=2))


def compare(args, model, out):
    args.model = model
    out.mkdir(parents=True, exist_ok=True)
    xc, yc = images("train")
    xc, yc = np.ascontiguousarray(xc[:1000]), yc[:1000].astype(np.int64)
    # The same 1000 preprocessed images for both quantizers, in memory for ORT and as an .npz
    # for lithe (so neither pays for reading the 60k training set).
    calib = out / "calib1000.npz"
    np.savez(calib, x=xc, y=yc)
    xt, yt = images("test")
    name = ort.InferenceSession(args.model, providers=["CPUExecutionProvider"]).get_inputs()[0].name
    results = {"f32": accuracy(args.model, xt, yt), "rows": [], "rss": [], "schemes": []}
    print(f"f32 in ORT: {results['f32'] * 100:.2f} %")

    print(f"\n{'quantizer':<10} {'calibration':<12} {'weights':<8} {'top-1 (ORT)':>11} {'wall s':>8}"
          f" {'CPU s':>8}")
    ort_methods = {
        "minmax": CalibrationMethod.MinMax,
        "kl": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
    }
    lithe_methods = {"minmax": "minmax", "kl": "kl", "percentile": "percentile=99.999"}
    for wbits in (8, 4):
        for m in ort_methods:
            f = out / f"ort_{m}_w{wbits}.onnx"
            g = out / f"lithe_{m}_w{wbits}.onnx"
            # Best of --repeat runs each, alternating, so both see the same machine load.
            ort_wall = lithe_wall = ort_cpu = lithe_cpu = float("inf")
            for _ in range(args.repeat):
                c = time.process_time()
                t = time.perf_counter()
                quantize_static(
                    args.model,
                    str(f),
                    Reader(xc, name),
                    quant_format=QuantFormat.QDQ,
                    per_channel=True,
                    activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8 if wbits == 8 else QuantType.QInt4,
                    calibrate_method=ort_methods[m],
                )
                ort_wall = min(ort_wall, time.perf_counter() - t)
                ort_cpu = min(ort_cpu, time.process_time() - c)
                wall, rep = lithe(
                    args, args.model, g,
                    ["--activations", lithe_methods[m], "--weight-bits", str(wbits)],
                    calib=calib,
                )
                lithe_wall = min(lithe_wall, wall)
                lithe_cpu = min(lithe_cpu, rep["cpu_seconds"])
            ort_acc = accuracy(f, xt, yt)
            lithe_acc = accuracy(g, xt, yt)
            for who, acc, wall, cpu in (("ORT", ort_acc, ort_wall, ort_cpu),
                                        ("lithe", lithe_acc, lithe_wall, lithe_cpu)):
                print(f"{who:<10} {m:<12} {'s' + str(wbits):<8} {acc * 100:>10.2f}% {wall:>8.3f}"
                      f" {cpu:>8.3f}")
            results["rows"].append(
                dict(method=m, weight_bits=wbits, ort_top1=ort_acc, ort_seconds=ort_wall,
                     lithe_top1=lithe_acc, lithe_seconds=lithe_wall,
                     time_ratio=lithe_wall / ort_wall, ort_cpu_seconds=ort_cpu,
                     lithe_cpu_seconds=lithe_cpu, cpu_ratio=lithe_cpu / ort_cpu))
    for r in results["rows"]:
        print(f"lithe / ORT, {r['method']:<10} s{r['weight_bits']}: wall {r['time_ratio']:.3f},"
              f" CPU {r['cpu_ratio']:.3f}")
    fwd = forward_seconds(args.model, xc, name)
    results["ort_f32_forward_seconds"] = fwd
    print(f"ORT f32 forward pass over the 1000 calibration images: {fwd:.3f} s "
          f"({fwd / min(r['ort_seconds'] for r in results['rows'] if r['method'] == 'minmax'):.2f}"
          " of ORT's MinMax quantize_static)")

    print("\npeak RSS of lithe quantize (KL calibration on MNIST train):")
    for threads in (0, 1):
        for n in (100, 1000, 10000):
            wall, rep = lithe(args, args.model, out / f"lithe_rss_{n}.onnx",
                              ["--calib-limit", str(n), "--threads", str(threads)])
            rss = rep["peak_rss_bytes"] / 2**20
            label = "all cores" if threads == 0 else "1 thread"
            print(f"  {label:<9} {n:>6} samples: {rss:7.1f} MiB, {wall:.2f} s")
            results["rss"].append(dict(threads=threads, samples=n, peak_rss_mib=rss, seconds=wall))

    if args.schemes:
        print(f"\n{'scheme':<8} {'bits':>4} {'top-1 (ORT)':>11} {'file bytes':>11} {'weights packed':>15}")
        for scheme in ("linear", "fixed", "log", "kmeans"):
            for bits in (8, 6, 4):
                f = out / f"lithe_{scheme}_{bits}.onnx"
                _, rep = lithe(args, args.model, f, ["--scheme", scheme, "--weight-bits", str(bits)],
                               calib=calib)
                acc = accuracy(f, xt, yt)
                size = f.stat().st_size
                packed = rep["weight_bytes_packed"]
                print(f"{scheme:<8} {bits:>4} {acc * 100:>10.2f}% {size:>11} {packed:>15}")
                results["schemes"].append(dict(scheme=scheme, weight_bits=bits, top1=acc,
                                               file_bytes=size, weight_bytes_packed=packed))
    return results


if __name__ == "__main__":
    main()
