#!/usr/bin/env python3
"""Runs a model in ONNX Runtime on inputs from an .npz and writes its outputs to an .npz.

usage: ort_run.py MODEL INPUTS.npz OUTPUTS.npz [--no-opt]
Used by the cross-check tests so lithe and ONNX Runtime see the very same tensors.
--no-opt turns every graph optimization off (ORT_DISABLE_ALL): a QDQ model then runs op by op
in f32 with fake-quantized values instead of ORT's fused integer kernels, i.e. with the same
arithmetic as lithe's QDQ execution.
"""
import sys

import numpy as np
import onnxruntime as ort


def main():
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    if len(args) != 3:
        sys.exit(__doc__)
    model, inputs, outputs = args
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    if "--no-opt" in sys.argv[1:]:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
    feeds = dict(np.load(inputs))
    names = [o.name for o in sess.get_outputs()]
    values = sess.run(names, feeds)
    np.savez(outputs, **dict(zip(names, values)))


if __name__ == "__main__":
    main()
