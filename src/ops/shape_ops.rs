//! Data-movement and shape ops: reshaping, transposing, joining and cutting, indexing,
//! padding, and the ops that compute shapes or build tensors from them. This module is the
//! registry; each family lives in a submodule.

mod common;
mod concat_split;
mod expand_tile;
mod gather;
mod generate;
mod pad;
mod reshape;
mod slice;
mod strided;
mod transpose;

pub use concat_split::concat;
pub use expand_tile::{expand, tile};
pub use gather::{gather, gather_elements};
pub use reshape::reshape_dims;
pub use slice::{slice, slice_params, AxisSlice};
pub use transpose::transpose;

use super::{CompileFn, InferFn, OpDef};

/// Newest opset checked against the ONNX schemas: later versions only add dtypes lithe
/// does not store (bfloat16, float8, int4, ...) or clarify edge cases we already follow.
const LATEST: i64 = 28;

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

pub const OPS: &[OpDef] = &[
    def(
        "Reshape",
        5,
        reshape::infer_reshape,
        reshape::compile_reshape,
    ),
    def(
        "Flatten",
        1,
        reshape::infer_flatten,
        reshape::compile_flatten,
    ),
    def(
        "Squeeze",
        1,
        reshape::infer_squeeze,
        reshape::compile_squeeze,
    ),
    def(
        "Unsqueeze",
        1,
        reshape::infer_squeeze,
        reshape::compile_squeeze,
    ),
    def("Transpose", 1, transpose::infer, transpose::compile),
    def(
        "Concat",
        4,
        concat_split::infer_concat,
        concat_split::compile_concat,
    ),
    def(
        "Split",
        2,
        concat_split::infer_split,
        concat_split::compile_split,
    ),
    def("Slice", 1, slice::infer, slice::compile),
    def("Gather", 1, gather::infer, gather::compile),
    def(
        "GatherElements",
        11,
        gather::infer_elements,
        gather::compile_elements,
    ),
    def("Shape", 1, generate::infer_shape, generate::compile_shape),
    def("Size", 1, generate::infer_size, generate::compile_size),
    def(
        "ConstantOfShape",
        9,
        generate::infer_constant_of_shape,
        generate::compile_constant_of_shape,
    ),
    def("Range", 11, generate::infer_range, generate::compile_range),
    def(
        "Constant",
        1,
        generate::infer_constant,
        generate::compile_constant,
    ),
    def(
        "Expand",
        8,
        expand_tile::infer_expand,
        expand_tile::compile_expand,
    ),
    def(
        "Tile",
        6,
        expand_tile::infer_tile,
        expand_tile::compile_tile,
    ),
    def("Pad", 2, pad::infer, pad::compile),
];
