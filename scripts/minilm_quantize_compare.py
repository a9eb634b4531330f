#!/usr/bin/env python3
"""MiniLM (all-MiniLM-L6-v2) int8: lithe quantize vs onnxruntime.quantization, side by side.

usage: minilm_quantize_compare.py [--lithe target/release/lithe] [--shared ../shared] [--out DIR]
                                  [--repeat N]

A transformer has three integer inputs (token ids, attention mask, segment ids), so lithe
calibrates on an .npz holding one array per model input. Both static quantizers calibrate on
the same 24 sentences and write QDQ models with per-channel int8 weights and u8 activations;
ORT's dynamic quantizer (`quantize_dynamic`, the usual route for transformers, no calibration)
is shown too. Every model runs in ONNX Runtime on 24 other sentences; the sentence embedding is
the mask-weighted mean of the last hidden state, L2-normalised, as sentence-transformers does.
Reported: the mean and smallest cosine between each sentence's f32 and int8 embeddings, how
well the int8 model keeps the f32 model's pairwise sentence similarities (Pearson r over the
276 pairs, and the largest change of a pair's cosine), file size, and wall time of the
quantizer (best of --repeat; lithe's includes process start-up, loading and writing). lithe
also runs with the six feed-forward output projections left in f32, the layers its
`--sensitivity` ranks worst.
"""
import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_dynamic,
    quantize_static,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from minilm_inputs import encode, read_vocab  # noqa: E402

REPO = Path(__file__).resolve().parent.parent

CALIBRATION = [
    "A man is playing a guitar on the street.",
    "The children are running in the park after school.",
    "She bought fresh vegetables at the market this morning.",
    "The stock market fell sharply on Monday.",
    "Our train was delayed by forty minutes because of the snow.",
    "He fixed the bicycle with an old wrench.",
    "The museum opens at nine and closes at five.",
    "Rain is expected for most of the weekend.",
    "The recipe needs two eggs, flour and a pinch of salt.",
    "Scientists discovered a new species of frog in the forest.",
    "Please send me the report before the meeting.",
    "The cat is sleeping on the warm windowsill.",
    "Compilers translate source code into machine instructions.",
    "The football team won the championship last year.",
    "I forgot my umbrella at the office again.",
    "The hotel room had a beautiful view of the sea.",
    "Electric cars are becoming cheaper every year.",
    "The orchestra played a symphony by Beethoven.",
    "My grandmother grows tomatoes in her garden.",
    "The airport was crowded during the holidays.",
    "Interest rates were raised by the central bank.",
    "A dog is chasing a ball across the beach.",
    "The library lends books, films and music.",
    "Volcanoes can change the climate for several years.",
]

EVALUATION = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The new movie is awesome!",
    "Quantization makes neural networks smaller and faster on CPUs.",
    "A woman is playing the violin.",
    "A man is riding a horse.",
    "Two dogs are playing in the snow.",
    "The weather will be sunny tomorrow.",
    "The company reported record profits this quarter.",
    "He is reading a book in the library.",
    "The baby is laughing at the puppy.",
    "Prices of houses keep rising in the city.",
    "Neural networks learn from examples.",
    "The chef is cooking pasta in the kitchen.",
    "A plane is taking off from the runway.",
    "The river flooded the village last spring.",
    "She is writing a letter to her friend.",
    "The match was cancelled because of heavy rain.",
    "Smaller models run faster on phones.",
    "The teacher explained the lesson twice.",
    "A girl is painting a picture of a tree.",
    "The government announced new taxes.",
    "The computer crashed while I was saving the file.",
    "Birds are singing in the morning.",
]


class Reader(CalibrationDataReader):
    def __init__(self, feeds, batch=8):
        self.feeds, self.batch, self.i = feeds, batch, 0

    def get_next(self):
        n = len(self.feeds["input_ids"])
        if self.i >= n:
            return None
        out = {k: v[self.i : self.i + self.batch] for k, v in self.feeds.items()}
        self.i += self.batch
        return out


def embed(model, feeds):
    s = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    hidden = s.run(None, feeds)[0]
    mask = feeds["attention_mask"][..., None].astype(np.float32)
    e = (hidden * mask).sum(1) / mask.sum(1)
    return e / np.linalg.norm(e, axis=1, keepdims=True)


def compare(ref, out):
    own = (ref * out).sum(1)
    iu = np.triu_indices(len(ref), 1)
    pr, po = (ref @ ref.T)[iu], (out @ out.T)[iu]
    return {
        "mean_cos": float(own.mean()),
        "min_cos": float(own.min()),
        "pair_r": float(np.corrcoef(pr, po)[0, 1]),
        "pair_max_change": float(np.abs(pr - po).max()),
    }


def timed(repeat, fn):
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lithe", default=str(REPO / "target" / "release" / "lithe"))
    ap.add_argument("--shared", default=str(REPO.parent / "shared"))
    ap.add_argument("--out", default=None)
    ap.add_argument("--repeat", type=int, default=1)
    args = ap.parse_args()
    shared = Path(args.shared)
    model = shared / "models" / "minilm_l6_v2.onnx"
    vocab_path = shared / "models" / "minilm_l6_v2_tokenizer" / "vocab.txt"
    vocab = read_vocab(vocab_path)
    out = Path(args.out or tempfile.mkdtemp(prefix="lithe-minilm-"))
    out.mkdir(parents=True, exist_ok=True)
    calib, test = encode(CALIBRATION, vocab), encode(EVALUATION, vocab)
    np.savez(out / "calib.npz", **calib)
    ref = embed(model, test)

    rows = []

    def lithe(method, exclude=()):
        label = method + (f", {len(exclude)} FFN outputs f32" if exclude else "")
        dst = out / f"lithe_{method.split('=')[0]}{'_ex' if exclude else ''}.onnx"
        cmd = [args.lithe, "quantize", str(model), "-o", str(dst), "-q", "--no-activation-sqnr",
               "--activations", method]
        if method != "dynamic":
            cmd += ["--calib", str(out / "calib.npz"), "--batch", "8"]
        for node in exclude:
            cmd += ["--exclude", node]

        def go():
            p = subprocess.run(cmd, capture_output=True, text=True)
            if p.returncode != 0:
                sys.exit(f"lithe failed: {' '.join(cmd)}\n{p.stderr}")
        secs = timed(args.repeat, go)
        rows.append(("lithe", label, secs, dst, compare(ref, embed(dst, test))))

    def ort_static(method):
        dst = out / f"ort_{method}.onnx"
        try:
            secs = timed(args.repeat, lambda: quantize_static(
                str(model), str(dst), Reader(calib), quant_format=QuantFormat.QDQ, per_channel=True,
                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                calibrate_method=getattr(CalibrationMethod, method)))
        except Exception as e:  # ORT's histogram calibrators reject some tensors' ranges
            rows.append(("ORT static", method, None, None, f"failed: {type(e).__name__}: {e}"))
            return
        rows.append(("ORT static", method, secs, dst, compare(ref, embed(dst, test))))

    for m in ("MinMax", "Entropy", "Percentile"):
        ort_static(m)
    dst = out / "ort_dynamic.onnx"
    secs = timed(args.repeat, lambda: quantize_dynamic(str(model), str(dst), per_channel=True,
                                                       weight_type=QuantType.QInt8))
    rows.append(("ORT dynamic", "(per batch)", secs, dst, compare(ref, embed(dst, test))))
    for m in ("minmax", "kl", "percentile=99.999", "mse"):
        lithe(m)
    # The layers `lithe quantize --sensitivity` ranks worst: each feed-forward block's output
    # projection, whose input (the GELU output) has outliers.
    ffn_out = [f"/m/encoder/layer.{i}/output/dense/MatMul" for i in range(6)]
    for m in ("minmax", "mse"):
        lithe(m, ffn_out)
    lithe("dynamic")

    n = len(EVALUATION)
    print(f"f32 model {model.stat().st_size / 2**20:.1f} MiB; {n} evaluation sentences, "
          f"{n * (n - 1) // 2} pairs")
    print("\n| quantizer | activations | mean cos | min cos | pair r | max pair change | MiB | seconds |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for tool, method, secs, dst, r in rows:
        if isinstance(r, str):
            print(f"| {tool} | {method} | {r} | | | | | |")
            continue
        print(f"| {tool} | {method} | {r['mean_cos']:.4f} | {r['min_cos']:.4f} | {r['pair_r']:.4f} | "
              f"{r['pair_max_change']:.4f} | {dst.stat().st_size / 2**20:.1f} | {secs:.2f} |")


if __name__ == "__main__":
    main()
