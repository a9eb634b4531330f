#!/usr/bin/env python3
"""Latency of a model in ONNX Runtime, measured the same way `lithe bench` measures it.

usage: ort_bench.py MODEL --batch N --threads N [--seconds S] [--dim name=size]
Prints one JSON object: p50_ms, p90_ms, mean_ms, runs, items_per_second.
"""
import argparse
import json
import time

import numpy as np
import onnxruntime as ort


def synthetic(inp, batch, dims, rng):
    shape = []
    for i, d in enumerate(inp.shape):
        if isinstance(d, int):
            shape.append(d)
        elif d in dims:
            shape.append(dims[d])
        elif i == 0:
            shape.append(batch)
        else:
            low = str(d).lower()
            shape.append(128 if ("seq" in low or "len" in low or "token" in low) else 1)
    name = inp.name.lower()
    if inp.type == "tensor(float)":
        return rng.standard_normal(shape).astype(np.float32)
    if "mask" in name:
        return np.ones(shape, dtype=np.int64)
    if "type" in name or "segment" in name:
        return np.zeros(shape, dtype=np.int64)
    return rng.integers(1000, 2000, size=shape, dtype=np.int64)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--dim", action="append", default=[])
    a = ap.parse_args()
    dims = {k: int(v) for k, v in (d.split("=") for d in a.dim)}
    so = ort.SessionOptions()
    so.intra_op_num_threads = a.threads
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(a.model, so, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(1)
    feeds = {i.name: synthetic(i, a.batch, dims, rng) for i in sess.get_inputs()}
    sess.run(None, feeds)
    warm = time.perf_counter() + min(a.seconds * 0.1, 0.5)
    while time.perf_counter() < warm:
        sess.run(None, feeds)
    times = []
    stop = time.perf_counter() + a.seconds
    while time.perf_counter() < stop or len(times) < 5:
        t = time.perf_counter()
        sess.run(None, feeds)
        times.append((time.perf_counter() - t) * 1e3)
    s = sorted(times)
    pct = lambda p: s[round((len(s) - 1) * p)]
    mean = sum(times) / len(times)
    print(json.dumps({"batch": a.batch, "threads": a.threads, "runs": len(times),
                      "p50_ms": pct(0.5), "p90_ms": pct(0.9), "mean_ms": mean,
                      "items_per_second": a.batch * 1e3 / mean}))


if __name__ == "__main__":
    main()
