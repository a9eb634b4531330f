//! Ops that return their input: `Identity` (1-28) and inference-mode `Dropout` (1-28), whose
//! optional mask output is all true (opset >= 10: bool; before: ones of the input's type).
//! Opset < 7 Dropout's `is_test` is ignored: old exporters leave it 0 in inference graphs.

use crate::error::{Error, Result};
use crate::ir::{DType, Tensor, TensorData, TypeInfo};
use crate::ops::typed::{pooled_copy, tensor, with_any_type, Elem};
use crate::ops::{node_error, required, CompileCtx, InferCtx, Kernel, RunCtx};

struct IdentityKernel;

impl Kernel for IdentityKernel {
    fn run(&self, inputs: &[Option<&Tensor>], ctx: &mut RunCtx) -> Result<Vec<Tensor>> {
        Ok(vec![pooled_copy(required(inputs, 0)?, None, ctx)?])
    }
}

struct DropoutKernel {
    outputs: usize,
    bool_mask: bool,
}

impl Kernel for DropoutKernel {
    fn run(&self, inputs: &[Option<&Tensor>], ctx: &mut RunCtx) -> Result<Vec<Tensor>> {
        let x = required(inputs, 0)?;
        if let Some(t) = inputs.get(2).copied().flatten() {
            let training = t.to_i64_vec()?.first().is_some_and(|&v| v != 0);
            let ratio = inputs
                .get(1)
                .copied()
                .flatten()
                .and_then(|r| r.to_f32_vec().first().copied())
                .unwrap_or(0.5);
            // Training-mode dropout with a zero ratio is still the identity.
            if training && ratio != 0.0 {
                return Err(Error::Data(
                    "training-mode Dropout is not supported; lithe runs inference".into(),
                ));
            }
        }
        let mut out = vec![pooled_copy(x, None, ctx)?];
        if self.outputs > 1 {
            let shape = x.shape().to_vec();
            out.push(if self.bool_mask {
                Tensor::new(shape, TensorData::Bool(vec![true; x.numel()]))?
            } else {
                with_any_type!(x.dtype(), |T| tensor::<T>(
                    shape,
                    vec![T::from_i64(1); x.numel()]
                ))?
            });
        }
        Ok(out)
    }
}

pub fn infer_identity(ctx: &InferCtx) -> Result<Vec<TypeInfo>> {
    Ok(vec![ctx.input_type(0)?.clone()])
}

pub fn compile_identity(_ctx: &CompileCtx) -> Result<Box<dyn Kernel>> {
    Ok(Box::new(IdentityKernel))
}

pub fn infer_dropout(ctx: &InferCtx) -> Result<Vec<TypeInfo>> {
    let x = ctx.input_type(0)?.clone();
    let mut out = vec![x.clone()];
    if ctx.node.outputs.len() > 1 {
        out.push(TypeInfo {
            dtype: if ctx.opset >= 10 {
                DType::Bool
            } else {
                x.dtype
            },
            shape: x.shape,
        });
    }
    Ok(out)
}

pub fn compile_dropout(ctx: &CompileCtx) -> Result<Box<dyn Kernel>> {
    if let Some(t) = ctx.constant(2) {
        if t.to_i64_vec()?.first().is_some_and(|&v| v != 0) {
            let ratio = ctx
                .constant(1)
                .and_then(|r| r.to_f32_vec().first().copied())
                .unwrap_or(0.5);
            if ratio != 0.0 {
                return Err(node_error(
                    ctx.node,
                    "training-mode Dropout is not supported; lithe runs inference",
                ));
            }
        }
    }
    Ok(Box::new(DropoutKernel {
        outputs: ctx.node.outputs.len(),
        bool_mask: ctx.opset >= 10,
    }))
}

#[cfg(test)]
mod tests {
    use crate::ir::{Tensor, TensorData};
    use crate::ops::testutil::*;

    #[test]
    fn identity_and_dropout_pass_through() {
        let x = iota(&[2, 2]);
        let out = run("Identity", 14, &[], vec![x.clone()], 1).unwrap();
        assert_eq!(Some(out[0].clone()), x);
        let out = run("Dropout", 13, &[], vec![x.clone(), f32t(&[], &[0.3])], 2).unwrap();
        assert_eq!(Some(out[0].clone()), x);
        assert_eq!(out[1].data(), &TensorData::Bool(vec![true; 4]));
    }

    #[test]
    fn training_mode_is_rejected_unless_ratio_is_zero() {
        let train = Some(Tensor::new(vec![], TensorData::Bool(vec![true])).unwrap());
        let x = iota(&[3]);
        assert!(run("Dropout", 13, &[], vec![x.clone(), None, train.clone()], 1).is_err());
        let out = run(
            "Dropout",
            13,
            &[],
            vec![x.clone(), f32t(&[], &[0.0]), train],
            1,
        )
        .unwrap();
        assert_eq!(Some(out[0].clone()), x);
    }
}
