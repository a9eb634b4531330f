//! Reductions: the `Reduce*` family, `ArgMax`/`ArgMin`, and `LayerNormalization` (which is
//! a per-row reduction plus an affine map). This module is the registry; the families live in
//! submodules.

mod argminmax;
mod layernorm;
mod reduction;

pub use reduction::{reduce, Reduce};

use super::{CompileFn, InferFn, OpDef};
use crate::error::{Error, Result};
use crate::ir::Tensor;

/// Newest opset checked against the ONNX schemas: later versions only add dtypes lithe
/// does not store (bfloat16, float8, int4, ...) or clarify edge cases we already follow.
const LATEST: i64 = 28;

/// Normalises `axis` in `[-rank, rank)`; rank-0 tensors have no axes.
fn axis_index(axis: i64, rank: usize) -> Result<usize> {
    let r = rank as i64;
    let a = if axis < 0 { axis + r } else { axis };
    if a < 0 || a >= r {
        return Err(Error::Shape(format!(
            "axis {axis} is out of range for rank {rank}"
        )));
    }
    Ok(a as usize)
}

/// The axes input of a reduction, if given.
fn input_axes(inputs: &[Option<&Tensor>], i: usize) -> Result<Option<Vec<i64>>> {
    inputs
        .get(i)
        .copied()
        .flatten()
        .map(Tensor::to_i64_vec)
        .transpose()
}

const fn def(op_type: &'static str, since: i64, infer: InferFn, compile: CompileFn) -> OpDef {
    OpDef {
        op_type,
        domain: "",
        opsets: (since, LATEST),
        infer,
        compile,
        fuses_activation: false,
    }
}

const fn reduction(op_type: &'static str) -> OpDef {
    def(op_type, 1, reduction::infer, reduction::compile)
}

pub const OPS: &[OpDef] = &[
    reduction("ReduceSum"),
    reduction("ReduceMean"),
    reduction("ReduceMax"),
    reduction("ReduceMin"),
    reduction("ReduceProd"),
    reduction("ReduceL1"),
    reduction("ReduceL2"),
    reduction("ReduceSumSquare"),
    reduction("ReduceLogSum"),
    reduction("ReduceLogSumExp"),
    def("ArgMax", 1, argminmax::infer, argminmax::compile),
    def("ArgMin", 1, argminmax::infer, argminmax::compile),
    def(
        "LayerNormalization",
        17,
        layernorm::infer,
        layernorm::compile,
    ),
];
