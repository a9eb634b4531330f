#!/usr/bin/env python3
"""How much of PP-LCNet's int8 disagreement any 8-bit quantizer must cause: a noise floor.

usage: pplcnet_noise_floor.py [--lithe target/release/lithe] [--shared ../shared] [--out DIR]

Same 160 samples and preprocessing as pplcnet_agreement.py. Every model runs in ONNX Runtime and
is compared with the f32 model: top-1 agreement and mean absolute softmax difference.

1. Weights only, no quantizer involved: every Conv/Gemm weight of the BatchNorm-folded f32 model
   gets uniform random noise of +-f/2 of its output channel's int8 step (max |w| / 127), for
   f = 1 (as large as 8-bit rounding), 0.3 and 0.1 (what ~9.7- and ~11.3-bit weights would give),
   three seeds each. Activations stay f32.
2. lithe's int8 file (`--activations mse`, per-channel weights): as written; with every activation
   QuantizeLinear/DequantizeLinear pair bypassed (weights only); with only the stem's two
   activation tensors (Conv.0's output and its HardSwish) quantized; with every pair but those two.

The first part shows how close to a tie the model's decisions sit: a perturbation a fraction of
one 8-bit step in size already flips samples, so a >= 99 % agreement (at most one flip in 160)
asks for less error than 8-bit weights alone carry.
"""
import argparse
import copy
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper
from onnxruntime.quantization.shape_inference import quant_pre_process

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pplcnet_agreement import REPO, samples  # noqa: E402

STEM_TENSORS = ("p2o.pd_op.batch_norm_.0.0", "p2o.pd_op.hardswish.0.0")


def run(model, x):
    s = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return np.concatenate([s.run(None, {"x": x[i : i + 32]})[0] for i in range(0, len(x), 32)])


def score(ref, out):
    return int((out.argmax(1) == ref.argmax(1)).sum()), float(np.abs(out - ref).mean())


def channel_steps(w, axis):
    rows = np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)
    step = np.abs(rows).max(1) / 127
    shape = [1] * w.ndim
    shape[axis] = -1
    return step.reshape(shape)


def noisy(model, fraction, rng):
    out = copy.deepcopy(model)
    weights = {}
    for n in out.graph.node:
        if n.op_type in ("Conv", "Gemm"):
            trans_b = any(a.name == "transB" and a.i == 1 for a in n.attribute)
            weights[n.input[1]] = 0 if n.op_type == "Conv" or trans_b else 1
    for init in out.graph.initializer:
        if init.name in weights:
            w = numpy_helper.to_array(init)
            step = channel_steps(w, weights[init.name])
            w = w + fraction * rng.uniform(-0.5, 0.5, w.shape) * step
            init.CopyFrom(numpy_helper.from_array(w.astype(np.float32), init.name))
    return out


def bypassed(model, keep):
    """The model with every activation Q/DQ pair whose input is not in `keep` removed."""
    out = copy.deepcopy(model)
    consts = {i.name for i in out.graph.initializer}
    drop, rename = set(), {}
    quants = {n.output[0]: n for n in out.graph.node
              if n.op_type == "QuantizeLinear" and n.input[0] not in consts and n.input[0] not in keep}
    for n in out.graph.node:
        if n.op_type == "DequantizeLinear" and n.input[0] in quants:
            rename[n.output[0]] = quants[n.input[0]].input[0]
            drop.update({n.output[0], n.input[0]})
    nodes = [n for n in out.graph.node if n.output[0] not in drop]
    # A graph output keeps its name: an Identity stands in for its bypassed pair.
    for name in {o.name for o in out.graph.output} & rename.keys():
        nodes.append(onnx.helper.make_node("Identity", [rename.pop(name)], [name]))
    for n in nodes:
        for i, t in enumerate(n.input):
            n.input[i] = rename.get(t, t)
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lithe", default=str(REPO / "target" / "release" / "lithe"))
    ap.add_argument("--shared", default=str(REPO.parent / "shared"))
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    shared = Path(args.shared)
    src = shared / "models" / "pplcnet_orientation.onnx"
    out = Path(args.out or tempfile.mkdtemp(prefix="lithe-noise-floor-"))
    out.mkdir(parents=True, exist_ok=True)
    x, _ = samples(shared)
    n = len(x)
    np.savez(out / "calib.npz", x=x, y=(np.arange(n) % 4).astype(np.int64))

    pre = out / "pplcnet_pre.onnx"
    quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
    folded = onnx.load(str(pre))
    ref = run(folded, x)
    lead = np.diff(np.sort(ref, 1)[:, -2:], axis=1)[:, 0]
    print(f"{n} samples; f32 top-1 leads by < 0.01 on {int((lead < 0.01).sum())}, "
          f"< 0.02 on {int((lead < 0.02).sum())}, < 0.05 on {int((lead < 0.05).sum())}\n")

    rows = []
    for fraction in (1.0, 0.3, 0.1):
        for seed in range(3):
            rng = np.random.default_rng(seed)
            rows.append((f"random weight noise, {fraction:g} of an int8 step, seed {seed}",
                         score(ref, run(noisy(folded, fraction, rng), x))))

    q = out / "lithe_mse.onnx"
    cmd = [args.lithe, "quantize", str(src), "-o", str(q), "-q", "--no-activation-sqnr",
           "--calib", str(out / "calib.npz"), "--activations", "mse", "--batch", "16"]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"lithe failed: {' '.join(cmd)}\n{p.stderr}")
    int8 = onnx.load(str(q))
    everything = {t for nd in int8.graph.node if nd.op_type == "QuantizeLinear" for t in nd.input[:1]}
    rows += [
        ("lithe int8 (mse), as written", score(ref, run(int8, x))),
        ("  weights only (activation pairs bypassed)", score(ref, run(bypassed(int8, set()), x))),
        ("  weights + the stem's 2 activation tensors", score(ref, run(bypassed(int8, set(STEM_TENSORS)), x))),
        ("  weights + every activation but the stem's", score(ref, run(bypassed(int8, everything - set(STEM_TENSORS)), x))),
    ]
    print(f"| perturbation | agreement /{n} | mean abs softmax diff |")
    print("|---|---:|---:|")
    for name, (agree, diff) in rows:
        print(f"| {name} | {agree} ({100 * agree / n:.1f} %) | {diff:.4f} |")


if __name__ == "__main__":
    main()
