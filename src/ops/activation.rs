//! Pointwise activations: ONNX `Relu` (6-28), `LeakyRelu` (6-28), `Clip` (11-28, min/max as
//! inputs), `Sigmoid` (6-28), `HardSigmoid` (6-28), `HardSwish` (14-28), `Tanh` (6-28); later
//! versions only added element types the IR does not store.
//! The math lives in [`crate::kernels::activation`] so fused epilogues compute the same bits.

pub use crate::kernels::activation::Activation;

use super::{node_error, required, CompileCtx, InferCtx, Kernel, OpDef, RunCtx};
use crate::error::Result;
use crate::ir::{Tensor, TypeInfo};

/// Output has the input's type and shape.
pub fn infer_same_as_first(ctx: &InferCtx) -> Result<Vec<TypeInfo>> {
    Ok(vec![ctx.input_type(0)?.clone()])
}

/// Parses an activation node into the [`Activation`] it computes, with constant Clip bounds.
/// Returns `None` for nodes that are not activations or whose parameters are not constant,
/// so the planner can decide whether to fuse them.
pub fn activation_of(ctx: &CompileCtx) -> Result<Option<Activation>> {
    let node = ctx.node;
    Ok(Some(match node.op_type.as_str() {
        "Relu" => Activation::Relu,
        "LeakyRelu" => Activation::LeakyRelu {
            alpha: node.attr_float_or("alpha", 0.01)?,
        },
        "Sigmoid" => Activation::Sigmoid,
        "Tanh" => Activation::Tanh,
        "HardSwish" => Activation::HardSwish,
        "HardSigmoid" => Activation::HardSigmoid {
            alpha: node.attr_float_or("alpha", 0.2)?,
            beta: node.attr_float_or("beta", 0.5)?,
        },
        "Clip" => {
            let bound = |i: usize, default: f32| -> Result<Option<f32>> {
                if node.input(i).is_none() {
                    return Ok(Some(default));
                }
                match ctx.constant(i) {
                    Some(t) if t.numel() == 1 => Ok(Some(t.to_f32_vec()[0])),
                    Some(_) => Err(node_error(node, "Clip bounds must be scalars")),
                    None => Ok(None),
                }
            };
            match (bound(1, f32::NEG_INFINITY)?, bound(2, f32::INFINITY)?) {
                (Some(min), Some(max)) => Activation::Clip { min, max },
                _ => return Ok(None),
            }
        }
        _ => return Ok(None),
    }))
}

struct ActivationKernel(Activation);

impl Kernel for ActivationKernel {
    fn run(&self, inputs: &[Option<&Tensor>], ctx: &mut RunCtx) -> Result<Vec<Tensor>> {
        let x = required(inputs, 0)?;
        let src = x.as_f32()?;
        let mut out = ctx.alloc_f32(src.len());
        out.copy_from_slice(src);
        self.0.apply(&mut out);
        Ok(vec![Tensor::from_f32(x.shape().to_vec(), out)?])
    }
}

/// Clip whose bounds are only known at run time.
struct DynamicClip;

impl Kernel for DynamicClip {
    fn run(&self, inputs: &[Option<&Tensor>], ctx: &mut RunCtx) -> Result<Vec<Tensor>> {
        let scalar = |i: usize, d: f32| -> f32 {
            inputs
                .get(i)
                .copied()
                .flatten()
                .and_then(|t| t.to_f32_vec().first().copied())
                .unwrap_or(d)
        };
        ActivationKernel(Activation::Clip {
            min: scalar(1, f32::NEG_INFINITY),
            max: scalar(2, f32::INFINITY),
        })
        .run(inputs, ctx)
    }
}

fn compile(ctx: &CompileCtx) -> Result<Box<dyn Kernel>> {
    crate::ops::require_f32_input(ctx)?;
    match activation_of(ctx)? {
        Some(act) => Ok(Box::new(ActivationKernel(act))),
        None => Ok(Box::new(DynamicClip)),
    }
}

const fn def(op_type: &'static str, opsets: (i64, i64)) -> OpDef {
    OpDef {
        op_type,
        domain: "",
        opsets,
        infer: infer_same_as_first,
        compile,
        fuses_activation: false,
    }
}

pub const OPS: &[OpDef] = &[
    def("Relu", (6, 28)),
    def("LeakyRelu", (6, 28)),
    def("Clip", (11, 28)),
    def("Sigmoid", (6, 28)),
    def("HardSigmoid", (6, 28)),
    def("HardSwish", (14, 28)),
    def("Tanh", (6, 28)),
];
