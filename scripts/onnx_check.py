#!/usr/bin/env python3
"""Validates ONNX files with onnx.checker (full check, with shape inference).

usage: onnx_check.py MODEL.onnx [MODEL.onnx ...]
"""
import sys

import onnx


def main():
    for path in sys.argv[1:]:
        onnx.checker.check_model(path, full_check=True)
        print(f"{path}: onnx.checker full check passed")


if __name__ == "__main__":
    main()
