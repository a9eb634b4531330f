//! Neural-network operators: convolution, dense products, pooling and batch normalisation.
//! Each submodule is one ONNX operator family; this module holds what they share
//! (input access, `auto_pad`, output-size arithmetic on possibly symbolic dims).

mod batchnorm;
mod conv;
mod gemm;
mod matmul;
mod pool;

pub use conv::compile_conv_pool;
pub use pool::{PoolShape, PoolWindow};

use super::{node_error, OpDef, RunCtx};
use crate::error::Result;
use crate::ir::{checked_numel, DType, Dim, Node, Tensor, TypeInfo};

pub const OPS: &[OpDef] = &[
    conv::CONV,
    gemm::GEMM,
    matmul::MATMUL,
    pool::MAX_POOL,
    pool::AVERAGE_POOL,
    pool::GLOBAL_AVERAGE_POOL,
    pool::GLOBAL_MAX_POOL,
    batchnorm::BATCH_NORMALIZATION,
];

/// Input `i` of a running node as an f32 tensor, with errors naming the node.
fn f32_input<'a>(node: &Node, inputs: &[Option<&'a Tensor>], i: usize) -> Result<&'a Tensor> {
    let t = inputs
        .get(i)
        .copied()
        .flatten()
        .ok_or_else(|| node_error(node, format!("required input {i} is missing")))?;
    if t.dtype() != DType::F32 {
        return Err(node_error(
            node,
            format!("input {i} must be f32, got {}", t.dtype()),
        ));
    }
    Ok(t)
}

/// An optional input that is present at run time.
fn optional_input<'a>(inputs: &[Option<&'a Tensor>], i: usize) -> Option<&'a Tensor> {
    inputs.get(i).copied().flatten()
}

/// Rejects a known non-f32 input type at compile time, before any run.
fn require_f32(node: &Node, ty: Option<&TypeInfo>, i: usize) -> Result<()> {
    match ty {
        Some(t) if t.dtype != DType::F32 => Err(node_error(
            node,
            format!("only f32 is supported, input {i} is {}", t.dtype),
        )),
        _ => Ok(()),
    }
}

/// An output buffer for `shape`, with an error naming the node when the size overflows.
/// Its contents are unspecified: every nn kernel writes each output element.
fn alloc_output(node: &Node, ctx: &mut RunCtx, shape: &[usize]) -> Result<Vec<f32>> {
    let n = checked_numel(shape, 4).map_err(|e| e.at_node(node))?;
    Ok(ctx.alloc_f32_overwrite(n))
}

/// The f32 data of a run-time tensor (already type-checked by [`f32_input`]).
fn data(t: &Tensor) -> &[f32] {
    t.as_f32().unwrap_or(&[])
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum AutoPad {
    NotSet,
    SameUpper,
    SameLower,
    Valid,
}

/// The window attributes shared by Conv and the pools, per spatial axis.
#[derive(Clone, Debug)]
struct Window {
    kernel: Vec<usize>,
    strides: Vec<usize>,
    dilations: Vec<usize>,
    /// ONNX order: all begins, then all ends.
    pads: Vec<usize>,
    auto_pad: AutoPad,
}

/// Reads a list attribute of `rank` positive (or, for pads, non-negative) entries.
fn axis_list(node: &Node, key: &str, rank: usize, default: usize, min: i64) -> Result<Vec<usize>> {
    let want = if key == "pads" { 2 * rank } else { rank };
    match node.attr_ints(key)? {
        None => Ok(vec![default; want]),
        Some(v) if v.len() == want && v.iter().all(|&x| x >= min) => {
            Ok(v.iter().map(|&x| x as usize).collect())
        }
        Some(v) => Err(node_error(
            node,
            format!("attribute '{key}' = {v:?} should have {want} entries, each at least {min}"),
        )),
    }
}

impl Window {
    /// Parses the window of a node with `rank` spatial axes and the given kernel.
    fn parse(node: &Node, kernel: Vec<usize>) -> Result<Window> {
        let rank = kernel.len();
        if kernel.contains(&0) {
            return Err(node_error(
                node,
                format!("kernel shape {kernel:?} has a zero"),
            ));
        }
        let auto_pad = match node.attr_string("auto_pad")?.unwrap_or("NOTSET") {
            "NOTSET" => AutoPad::NotSet,
            "SAME_UPPER" => AutoPad::SameUpper,
            "SAME_LOWER" => AutoPad::SameLower,
            "VALID" => AutoPad::Valid,
            other => return Err(node_error(node, format!("unknown auto_pad '{other}'"))),
        };
        Ok(Window {
            strides: axis_list(node, "strides", rank, 1, 1)?,
            dilations: axis_list(node, "dilations", rank, 1, 1)?,
            pads: axis_list(node, "pads", rank, 0, 0)?,
            kernel,
            auto_pad,
        })
    }

    fn rank(&self) -> usize {
        self.kernel.len()
    }

    /// Extent of the dilated window along `axis` (saturating: attributes come from files).
    fn span(&self, axis: usize) -> usize {
        self.dilations[axis]
            .saturating_mul(self.kernel[axis] - 1)
            .saturating_add(1)
    }

    /// `(begin, end)` padding of `axis` for an input extent `size`.
    fn pads_for(&self, axis: usize, size: usize) -> (usize, usize) {
        match self.auto_pad {
            AutoPad::NotSet => (self.pads[axis], self.pads[axis + self.rank()]),
            AutoPad::Valid => (0, 0),
            AutoPad::SameUpper | AutoPad::SameLower => {
                let s = self.strides[axis];
                let span = self.span(axis);
                let out = size.div_ceil(s);
                let total =
                    ((out.max(1) - 1).saturating_mul(s).saturating_add(span)).saturating_sub(size);
                let small = total / 2;
                if self.auto_pad == AutoPad::SameUpper {
                    (small, total - small)
                } else {
                    (total - small, small)
                }
            }
        }
    }

    /// Output extent of `axis` (the rule of ONNX Runtime, also used by the kernels).
    fn out_len(&self, node: &Node, axis: usize, size: usize, ceil_mode: bool) -> Result<usize> {
        // As ONNX Runtime: only the batch may be empty (a window over nothing but padding
        // has no defined value, and SAME would make one output of an empty axis).
        if size == 0 {
            return Err(node_error(
                node,
                format!("empty spatial axis {axis} (only the batch dimension may be 0)"),
            ));
        }
        let (lo, hi) = self.pads_for(axis, size);
        let s = self.strides[axis];
        let span = self.span(axis);
        let padded = size.saturating_add(lo).saturating_add(hi);
        if padded < span {
            return Err(node_error(
                node,
                format!(
                    "spatial axis {axis}: padded input extent {padded} is smaller than the window extent {span}"
                ),
            ));
        }
        let steps = padded - span;
        let mut out = if ceil_mode {
            steps.div_ceil(s) + 1
        } else {
            steps / s + 1
        };
        if ceil_mode && (out - 1) * s >= size + lo {
            out -= 1;
        }
        Ok(out)
    }

    /// Output dims for possibly symbolic input dims: known where the input extent is known.
    fn out_dims(&self, node: &Node, spatial: &[Dim], ceil_mode: bool) -> Result<Vec<Dim>> {
        spatial
            .iter()
            .enumerate()
            .map(|(axis, d)| match d.known() {
                Some(size) => Ok(Dim::Known(self.out_len(node, axis, size, ceil_mode)?)),
                None => Ok(Dim::Unknown),
            })
            .collect()
    }

    /// The 2-D form of the window (1-D windows get a unit leading axis) for input
    /// extents `[h, w]`: `(kernel, strides, dilations, [top, left, bottom, right])`.
    fn as_2d(&self, [h, w]: [usize; 2]) -> ([usize; 2], [usize; 2], [usize; 2], [usize; 4]) {
        if self.rank() == 1 {
            let (l, r) = self.pads_for(0, w);
            (
                [1, self.kernel[0]],
                [1, self.strides[0]],
                [1, self.dilations[0]],
                [0, l, 0, r],
            )
        } else {
            let (t, b) = self.pads_for(0, h);
            let (l, r) = self.pads_for(1, w);
            (
                [self.kernel[0], self.kernel[1]],
                [self.strides[0], self.strides[1]],
                [self.dilations[0], self.dilations[1]],
                [t, l, b, r],
            )
        }
    }
}

/// `[n, c, h, w]` of an NCHW (or NCL, as `h = 1`) input of `rank` 3 or 4.
fn nchw(node: &Node, shape: &[usize]) -> Result<[usize; 4]> {
    match *shape {
        // As ONNX Runtime: only the batch may be empty.
        [_, _, 0] => Err(empty_spatial(node, shape)),
        [_, _, h, w] if h == 0 || w == 0 => Err(empty_spatial(node, shape)),
        [n, c, l] => Ok([n, c, 1, l]),
        [n, c, h, w] => Ok([n, c, h, w]),
        _ => Err(node_error(
            node,
            format!("input of shape {shape:?}: only 1-D and 2-D spatial inputs (rank 3 or 4) are supported"),
        )),
    }
}

/// An input with an empty spatial axis (only the batch dimension may be 0).
pub(crate) fn empty_spatial(node: &Node, shape: &[usize]) -> crate::error::Error {
    node_error(
        node,
        format!("input of shape {shape:?} has an empty spatial axis (only the batch dimension may be 0)"),
    )
}

#[cfg(test)]
pub(crate) mod test_support {
    //! Builds and runs single-node graphs for the op tests.
    use crate::error::Result;
    use crate::ir::{Node, Tensor, TypeInfo};
    use crate::kernels::activation::Activation;
    use crate::ops::{lookup, CompileCtx, InferCtx, RunCtx};

    pub fn node(op: &str, n_inputs: usize) -> Node {
        Node::new(
            "n0",
            op,
            (0..n_inputs).map(|i| format!("in{i}")).collect(),
            vec!["out".into()],
        )
    }

    /// Infers the output type from input types, marking `consts` as constant.
    pub fn infer(
        node: &Node,
        opset: i64,
        types: Vec<Option<TypeInfo>>,
        consts: &[Option<&Tensor>],
    ) -> Result<Vec<TypeInfo>> {
        let def = lookup(node, opset)?;
        let mut constants = consts.to_vec();
        constants.resize(types.len(), None);
        (def.infer)(&InferCtx {
            node,
            opset,
            input_types: types,
            constants,
        })
    }

    /// Compiles with the given inputs (constant where `constant[i]`) and runs once.
    pub fn run(
        node: &Node,
        opset: i64,
        inputs: &[Option<&Tensor>],
        constant: &[bool],
        act: Option<Activation>,
    ) -> Result<Vec<Tensor>> {
        let def = lookup(node, opset)?;
        let kernel = (def.compile)(&CompileCtx {
            node,
            opset,
            input_types: inputs
                .iter()
                .map(|t| t.map(|t| TypeInfo::known(t.dtype(), t.shape())))
                .collect(),
            constants: inputs
                .iter()
                .enumerate()
                .map(|(i, t)| {
                    if constant.get(i).copied().unwrap_or(false) {
                        *t
                    } else {
                        None
                    }
                })
                .collect(),
            fused_activation: if def.fuses_activation { act } else { None },
        })?;
        kernel.run(inputs, &mut RunCtx::default())
    }
}
