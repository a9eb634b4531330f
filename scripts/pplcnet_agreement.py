#!/usr/bin/env python3
"""PP-LCNet int8 vs f32 top-1 agreement: lithe quantize vs onnxruntime.quantization, side by side.

usage: pplcnet_agreement.py [--lithe target/release/lithe] [--shared ../shared] [--out DIR] [--json FILE]

Samples (real images only): the shared photos turned by 0/90/180/270 degrees (36), and square
windows of the two shared page images (page.png, text.png) on a fixed grid (sides h and 3h/4 of
the shorter side h, positions at most half a side apart, edges included), each turned the same
four ways (124). Preprocessing as the model expects: shorter side to 256 (bilinear), centre
crop 224, /255, ImageNet mean/std.

Both quantizers calibrate on all 160 samples and write QDQ models with per-channel int8 weights
and u8 activations; ORT's model is pre-processed by its own `quant_pre_process` (BatchNorm
folding), as its documentation recommends. Every model runs in ONNX Runtime and is compared with
the f32 model there: top-1 agreement (photos, pages, all), the mean and largest absolute
difference of the softmax outputs, and agreement on samples whose f32 top-1 leads by at least
0.05 ("clear"). The model's outputs are often near a tie on these images (a text window turned
by 180 degrees is close to one turned by 0), so the script also prints how many f32 decisions
lead by less than 0.01.
"""
import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import Image
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process

REPO = Path(__file__).resolve().parent.parent
MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)
STEM = ["Conv.0", "Conv.1", "Conv.2", "Conv.3"]


def preprocess(img):
    w, h = img.size
    s = 256 / min(w, h)
    img = img.resize((max(1, round(w * s)), max(1, round(h * s))), Image.BILINEAR)
    w, h = img.size
    left, top = (w - 224) // 2, (h - 224) // 2
    img = img.crop((left, top, left + 224, top + 224))
    a = np.asarray(img, np.float32) / 255.0
    return ((a - MEAN) / STD).transpose(2, 0, 1)


def positions(length, side):
    span = length - side
    n = -(-span // max(side // 2, 1)) + 1
    return [0] if n == 1 else [i * span // (n - 1) for i in range(n)]


def page_windows(img):
    w, h = img.size
    short = min(w, h)
    out = []
    for side in (short, short * 3 // 4):
        for y in positions(h, side):
            for x in positions(w, side):
                out.append(img.crop((x, y, x + side, y + side)))
    return out


def turned(img):
    """The image turned clockwise by 0, 90, 180 and 270 degrees."""
    return [img if q == 0 else img.rotate(-90 * q, expand=True) for q in range(4)]


def samples(shared):
    photos = sorted((shared / "images" / "photos").iterdir())
    x = [preprocess(t) for p in photos for t in turned(Image.open(p).convert("RGB"))]
    n_photos = len(x)
    for name in ("page.png", "text.png"):
        img = Image.open(shared / "images" / "photos" / name).convert("RGB")
        x += [preprocess(t) for win in page_windows(img) for t in turned(win)]
    return np.stack(x).astype(np.float32), n_photos


class Reader(CalibrationDataReader):
    def __init__(self, x, batch=16):
        self.x, self.batch, self.i = x, batch, 0

    def get_next(self):
        if self.i >= len(self.x):
            return None
        b = self.x[self.i : self.i + self.batch]
        self.i += self.batch
        return {"x": b}


def run(model, x):
    s = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    return np.concatenate([s.run(None, {"x": x[i : i + 32]})[0] for i in range(0, len(x), 32)])


def compare(ref, out, n_photos):
    pr, po = ref.argmax(1), out.argmax(1)
    top2 = np.sort(ref, 1)[:, -2:]
    margin = top2[:, 1] - top2[:, 0]
    clear = margin >= 0.05
    diff = np.abs(ref - out)
    return {
        "photos": int((pr[:n_photos] == po[:n_photos]).sum()),
        "pages": int((pr[n_photos:] == po[n_photos:]).sum()),
        "all": int((pr == po).sum()),
        "clear": int((pr[clear] == po[clear]).sum()),
        "mean_abs": float(diff.mean()),
        "max_abs": float(diff.max()),
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lithe", default=str(REPO / "target" / "release" / "lithe"))
    ap.add_argument("--shared", default=str(REPO.parent / "shared"))
    ap.add_argument("--out", default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    shared = Path(args.shared)
    model = shared / "models" / "pplcnet_orientation.onnx"
    out = Path(args.out or tempfile.mkdtemp(prefix="lithe-pplcnet-"))
    out.mkdir(parents=True, exist_ok=True)

    x, n_photos = samples(shared)
    n = len(x)
    # Labels: the turn of each sample (0/90/180/270 degrees).
    np.savez(out / "calib.npz", x=x, y=(np.arange(n) % 4).astype(np.int64))
    ref = run(model, x)
    top2 = np.sort(ref, 1)[:, -2:]
    margin = top2[:, 1] - top2[:, 0]
    right = int((ref.argmax(1) == np.arange(n) % 4).sum())
    print(f"{n} samples ({n_photos} photos, {n - n_photos} page windows); f32 gets the turn right on "
          f"{right}/{n}; {int((margin >= 0.05).sum())} clear decisions (lead >= 0.05), "
          f"{int((margin < 0.01).sum())} near ties (lead < 0.01)")

    pre = out / "pplcnet_pre.onnx"
    quant_pre_process(str(model), str(pre), skip_symbolic_shape=True)
    rows = []
    for method in ("MinMax", "Entropy", "Percentile"):
        for stem in (False, True):
            dst = out / f"ort_{method}_{'stem' if stem else 'all'}.onnx"
            t = time.perf_counter()
            quantize_static(
                str(pre), str(dst), Reader(x),
                quant_format=QuantFormat.QDQ, per_channel=True,
                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                calibrate_method=getattr(CalibrationMethod, method),
                nodes_to_exclude=STEM if stem else [],
            )
            rows.append(("ORT", method, stem, time.perf_counter() - t, compare(ref, run(dst, x), n_photos)))
    for method in ("minmax", "kl", "percentile=99.999", "mse"):
        for stem in (False, True):
            dst = out / f"lithe_{method.split('=')[0]}_{'stem' if stem else 'all'}.onnx"
            cmd = [args.lithe, "quantize", str(model), "-o", str(dst), "-q", "--no-activation-sqnr",
                   "--calib", str(out / "calib.npz"), "--activations", method, "--batch", "16"]
            for s in STEM if stem else []:
                cmd += ["--exclude", s]
            t = time.perf_counter()
            p = subprocess.run(cmd, capture_output=True, text=True)
            if p.returncode != 0:
                sys.exit(f"lithe failed: {' '.join(cmd)}\n{p.stderr}")
            rows.append(("lithe", method, stem, time.perf_counter() - t, compare(ref, run(dst, x), n_photos)))

    clear = int((margin >= 0.05).sum())
    print(f"\n| tool | activations | stem f32 | photos /{n_photos} | pages /{n - n_photos} | all /{n} "
          f"| clear /{clear} | mean abs diff | max abs diff | seconds |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for tool, method, stem, secs, r in rows:
        print(f"| {tool} | {method} | {'yes' if stem else 'no'} | {r['photos']} | {r['pages']} | "
              f"{r['all']} ({100 * r['all'] / n:.1f} %) | {r['clear']} | {r['mean_abs']:.4f} | "
              f"{r['max_abs']:.3f} | {secs:.2f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(
            [dict(tool=a, method=b, stem_f32=c, seconds=d, **r) for a, b, c, d, r in rows], indent=1))


if __name__ == "__main__":
    main()
