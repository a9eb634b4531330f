//! Operators, one module per family. Each op is an [`OpDef`]: its ONNX name and the opsets it
//! covers, a shape/type inference rule and a compile step that turns a node into a [`Kernel`]
//! (attributes parsed and constants prepared once, before any run). Later issues add backward
//! and quantized forward beside the f32 forward of each family.

use crate::error::{Error, Result};
use crate::ir::{DType, Node, Tensor, TypeInfo};

pub mod activation;
pub mod broadcast;
pub mod elementwise;
pub mod erf;
pub mod expf;
pub mod grad;
pub mod nn;
pub mod quantized;
pub mod reduce;
pub mod shape_ops;
#[cfg(test)]
pub mod testutil;
pub mod typed;

pub use activation::Activation;

/// What inference sees of a node: its input types and the inputs whose values are constant.
pub struct InferCtx<'a> {
    pub node: &'a Node,
    pub opset: i64,
    /// One entry per node input; `None` for an omitted optional input or an unknown type.
    pub input_types: Vec<Option<TypeInfo>>,
    /// One entry per node input; `Some` when the value is known before running
    /// (an initializer or a folded constant), as Reshape's shape usually is.
    pub constants: Vec<Option<&'a Tensor>>,
}

impl InferCtx<'_> {
    pub fn input_type(&self, i: usize) -> Result<&TypeInfo> {
        self.input_types
            .get(i)
            .and_then(Option::as_ref)
            .ok_or_else(|| node_error(self.node, format!("type of input {i} is unknown")))
    }

    pub fn constant(&self, i: usize) -> Option<&Tensor> {
        self.constants.get(i).copied().flatten()
    }
}

/// What compilation sees of a node: as [`InferCtx`], plus an activation the planner asks the
/// kernel to apply to its output (bias and activation fusion for Conv/Gemm/MatMul).
pub struct CompileCtx<'a> {
    pub node: &'a Node,
    pub opset: i64,
    pub input_types: Vec<Option<TypeInfo>>,
    pub constants: Vec<Option<&'a Tensor>>,
    /// Only set when [`OpDef::fuses_activation`] is true.
    pub fused_activation: Option<Activation>,
}

impl CompileCtx<'_> {
    pub fn constant(&self, i: usize) -> Option<&Tensor> {
        self.constants.get(i).copied().flatten()
    }

    pub fn input_type(&self, i: usize) -> Option<&TypeInfo> {
        self.input_types.get(i).and_then(Option::as_ref)
    }
}

/// Scratch state for a run: a pool of released f32 buffers so steady-state inference does
/// not allocate. Kernels take output buffers from it; the executor returns dead values to it.
#[derive(Default)]
pub struct RunCtx {
    free_f32: Vec<Vec<f32>>,
    /// Released u8 buffers (quantized activations), for kernels that write every element.
    free_u8: Vec<Vec<u8>>,
}

impl RunCtx {
    /// Most buffers kept for reuse.
    const POOL_LEN: usize = 32;

    /// The released buffer that best fits `len` floats, if one fits well: a much larger one
    /// is left for a later large request (else that request would allocate and fault in
    /// fresh pages while a small value sits in the big buffer).
    fn take(&mut self, len: usize) -> Option<Vec<f32>> {
        best_fit(&mut self.free_f32, len)
    }

    /// A zero-filled buffer of `len` floats, reusing a released buffer when one fits.
    pub fn alloc_f32(&mut self, len: usize) -> Vec<f32> {
        match self.take(len) {
            Some(mut buf) => {
                buf.clear();
                buf.resize(len, 0.0);
                buf
            }
            None => vec![0.0; len],
        }
    }

    /// A buffer of `len` floats for a kernel that writes every element: its contents are
    /// unspecified (stale values of a released buffer, or zeros). Unlike [`RunCtx::alloc_f32`]
    /// it skips the zero fill, a full extra pass over memory for large outputs.
    pub fn alloc_f32_overwrite(&mut self, len: usize) -> Vec<f32> {
        match self.take(len) {
            Some(mut buf) => {
                // Only a grown tail is written here; the kept prefix holds stale values.
                buf.truncate(len);
                buf.resize(len, 0.0);
                buf
            }
            None => vec![0.0; len],
        }
    }

    /// A buffer of `len` bytes for a kernel that writes every element, reusing a released
    /// one when it fits (contents unspecified, as [`RunCtx::alloc_f32_overwrite`]).
    pub fn alloc_u8_overwrite(&mut self, len: usize) -> Vec<u8> {
        match best_fit(&mut self.free_u8, len) {
            Some(mut buf) => {
                buf.truncate(len);
                buf.resize(len, 0);
                buf
            }
            None => vec![0; len],
        }
    }

    /// Returns a dead tensor's storage to the pool (unless another clone still shares it).
    pub fn release(&mut self, t: Tensor) {
        match t.into_unshared_data() {
            Some(crate::ir::TensorData::F32(v)) => keep(&mut self.free_f32, v, Self::POOL_LEN),
            Some(crate::ir::TensorData::U8(v)) => keep(&mut self.free_u8, v, Self::POOL_LEN),
            _ => {}
        }
    }
}

/// The pooled buffer that best fits `len` elements, if one fits well (see [`RunCtx::take`]).
fn best_fit<T>(pool: &mut Vec<Vec<T>>, len: usize) -> Option<Vec<T>> {
    let most = len.saturating_mul(2).saturating_add(1 << 14);
    let pos = pool
        .iter()
        .enumerate()
        .filter(|(_, b)| b.capacity() >= len && b.capacity() <= most)
        .min_by_key(|(_, b)| b.capacity())
        .map(|(i, _)| i)?;
    Some(pool.swap_remove(pos))
}

/// Pools `v`. The pool is bounded so a long graph of odd sizes cannot hoard memory; when full,
/// the larger buffers stay, as re-allocating those costs page faults on every run.
fn keep<T>(pool: &mut Vec<Vec<T>>, v: Vec<T>, limit: usize) {
    if v.capacity() == 0 {
        return;
    }
    if pool.len() < limit {
        pool.push(v);
    } else if let Some(smallest) = pool.iter_mut().min_by_key(|b| b.capacity()) {
        if smallest.capacity() < v.capacity() {
            *smallest = v;
        }
    }
}

/// A node ready to run: attributes parsed, constant inputs prepared (e.g. packed weights).
pub trait Kernel: Send + Sync {
    /// `inputs` has one entry per node input (`None` when omitted); returns one tensor per output.
    /// Kernels may use rayon; the executor runs them inside its thread pool.
    fn run(&self, inputs: &[Option<&Tensor>], ctx: &mut RunCtx) -> Result<Vec<Tensor>>;

    /// The input whose storage this kernel can hand back as its first output (Reshape's
    /// data, say). When the executor no longer needs that value after this step it calls
    /// [`Kernel::run_owned`] instead of [`Kernel::run`], so the step copies nothing.
    fn reuses_input(&self) -> Option<usize> {
        None
    }

    /// As [`Kernel::run`], with input [`Kernel::reuses_input`] passed by value as `owned`
    /// (its entry in `inputs` is `None`). The default borrows it and releases it afterwards.
    fn run_owned(
        &self,
        owned: Tensor,
        inputs: &[Option<&Tensor>],
        ctx: &mut RunCtx,
    ) -> Result<Vec<Tensor>> {
        let mut args = inputs.to_vec();
        if let Some(slot) = self.reuses_input().and_then(|i| args.get_mut(i)) {
            *slot = Some(&owned);
        }
        let out = self.run(&args, ctx);
        ctx.release(owned);
        out
    }
}

pub type InferFn = fn(&InferCtx) -> Result<Vec<TypeInfo>>;
pub type CompileFn = fn(&CompileCtx) -> Result<Box<dyn Kernel>>;

/// Definition of one ONNX operator as lithe implements it.
pub struct OpDef {
    pub op_type: &'static str,
    /// "" for the default ONNX domain.
    pub domain: &'static str,
    /// Inclusive range of default-domain opsets whose semantics this implementation follows.
    pub opsets: (i64, i64),
    pub infer: InferFn,
    pub compile: CompileFn,
    /// True when `compile` honours [`CompileCtx::fused_activation`].
    pub fuses_activation: bool,
}

fn all_ops() -> impl Iterator<Item = &'static OpDef> {
    activation::OPS
        .iter()
        .chain(elementwise::OPS)
        .chain(nn::OPS)
        .chain(quantized::OPS)
        .chain(reduce::OPS)
        .chain(shape_ops::OPS)
}

/// The op definition for a node under a model opset, or a clear error naming the op,
/// its opset and the node.
pub fn lookup(node: &Node, opset: i64) -> Result<&'static OpDef> {
    let domain = if node.domain == "ai.onnx" {
        ""
    } else {
        node.domain.as_str()
    };
    all_ops()
        .find(|d| {
            d.op_type == node.op_type
                && d.domain == domain
                && d.opsets.0 <= opset
                && opset <= d.opsets.1
        })
        .ok_or_else(|| Error::UnsupportedOp {
            op_type: node.op_type.clone(),
            domain: if domain.is_empty() {
                "ai.onnx".into()
            } else {
                domain.into()
            },
            opset,
            node: node.display_name(),
        })
}

/// Every supported (op type, domain, opset range), for `lithe inspect --ops` and docs.
pub fn supported_ops() -> Vec<(&'static str, &'static str, (i64, i64))> {
    all_ops().map(|d| (d.op_type, d.domain, d.opsets)).collect()
}

/// An error about `node`, carrying its name and op type.
pub fn node_error(node: &Node, msg: impl Into<String>) -> Error {
    Error::Node {
        node: node.display_name(),
        op_type: node.op_type.clone(),
        msg: msg.into(),
    }
}

/// An error when shape inference knows the data input (entry 0) is not f32: for the ops that
/// only have an f32 kernel.
pub fn require_f32_input(ctx: &CompileCtx) -> Result<()> {
    match ctx.input_type(0) {
        Some(t) if t.dtype != DType::F32 => Err(node_error(
            ctx.node,
            format!("only f32 input is supported, got {}", t.dtype),
        )),
        _ => Ok(()),
    }
}

/// The `i`th input of a kernel, or an error when a required input is missing.
pub fn required<'a>(inputs: &[Option<&'a Tensor>], i: usize) -> Result<&'a Tensor> {
    inputs
        .get(i)
        .copied()
        .flatten()
        .ok_or_else(|| Error::Graph(format!("required input {i} is missing")))
}

/// Normalises a possibly negative axis against `rank`.
pub fn normalize_axis(axis: i64, rank: usize) -> Result<usize> {
    let r = rank as i64;
    let a = if axis < 0 { axis + r } else { axis };
    if a < 0 || a >= r.max(1) {
        return Err(Error::Shape(format!(
            "axis {axis} is out of range for rank {rank}"
        )));
    }
    Ok(a as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_op_is_a_clear_error() {
        let node = Node::new("n1", "FancyOp", vec!["x".into()], vec!["y".into()]);
        let err = lookup(&node, 13).err().unwrap().to_string();
        assert!(
            err.contains("FancyOp") && err.contains("13") && err.contains("n1"),
            "{err}"
        );
    }

    #[test]
    fn axis_normalisation() {
        assert_eq!(normalize_axis(-1, 4).unwrap(), 3);
        assert!(normalize_axis(4, 4).is_err());
        assert!(normalize_axis(-5, 4).is_err());
    }
}
