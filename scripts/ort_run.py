#!/usr/bin/env python3
"""Runs a model in ONNX Runtime on inputs from an .npz and writes its outputs to an .npz.

usage: ort_run.py MODEL INPUTS.npz OUTPUTS.npz
Used by the cross-check tests so lithe and ONNX Runtime see the very same tensors.
"""
import sys

import numpy as np
import onnxruntime as ort


def main():
    model, inputs, outputs = sys.argv[1:4]
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
    feeds = dict(np.load(inputs))
    names = [o.name for o in sess.get_outputs()]
    values = sess.run(names, feeds)
    np.savez(outputs, **dict(zip(names, values)))


if __name__ == "__main__":
    main()
