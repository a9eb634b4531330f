//! `Cast` (6-28) and `CastLike` (15-28) between every IR dtype, with C cast semantics:
//! float to integer truncates toward zero (saturating; NaN becomes 0), integer narrowing
//! wraps, anything to bool is `!= 0`, f16 converts through f32 with round-to-nearest-even.

use crate::error::Result;
use crate::ir::{DType, Tensor, TypeInfo};
use crate::ops::typed::{cast_elem, pooled_copy, tensor, view, with_any_type, Elem};
use crate::ops::{node_error, required, CompileCtx, InferCtx, Kernel, RunCtx};

/// `t` converted to `to`.
pub fn cast(t: &Tensor, to: DType, ctx: &mut RunCtx) -> Result<Tensor> {
    if t.dtype() == to {
        return pooled_copy(t, None, ctx);
    }
    with_any_type!(t.dtype(), |S| {
        let src = view::<S>(t)?;
        with_any_type!(to, |D| {
            let mut out = D::filled(ctx, src.len());
            for (o, &x) in out.iter_mut().zip(src) {
                *o = cast_elem::<S, D>(x);
            }
            tensor::<D>(t.shape().to_vec(), out)
        })
    })
}

/// The dtype named by Cast's `to` attribute.
fn target(node: &crate::ir::Node) -> Result<DType> {
    let code = node
        .attr_int("to")?
        .ok_or_else(|| node_error(node, "missing attribute 'to'"))?;
    i32::try_from(code)
        .ok()
        .and_then(DType::from_onnx_code)
        .ok_or_else(|| {
            node_error(
                node,
                format!(
                    "cannot cast to {} (type code {code})",
                    DType::onnx_code_name(code as i32)
                ),
            )
        })
}

struct CastKernel(Option<DType>);

impl Kernel for CastKernel {
    fn run(&self, inputs: &[Option<&Tensor>], ctx: &mut RunCtx) -> Result<Vec<Tensor>> {
        let x = required(inputs, 0)?;
        let to = match self.0 {
            Some(dt) => dt,
            None => required(inputs, 1)?.dtype(),
        };
        Ok(vec![cast(x, to, ctx)?])
    }
}

pub fn infer(ctx: &InferCtx) -> Result<Vec<TypeInfo>> {
    let x = ctx.input_type(0)?;
    let dtype = if ctx.node.op_type == "CastLike" {
        ctx.input_type(1)?.dtype
    } else {
        target(ctx.node)?
    };
    Ok(vec![TypeInfo {
        dtype,
        shape: x.shape.clone(),
    }])
}

pub fn compile(ctx: &CompileCtx) -> Result<Box<dyn Kernel>> {
    if ctx.node.op_type == "CastLike" {
        return Ok(Box::new(CastKernel(ctx.input_type(1).map(|t| t.dtype))));
    }
    Ok(Box::new(CastKernel(Some(target(ctx.node)?))))
}

#[cfg(test)]
mod tests {
    use super::cast;
    use crate::ir::dtype::f32_to_f16;
    use crate::ir::{Attr, DType, Tensor, TensorData};
    use crate::ops::testutil::*;
    use crate::ops::RunCtx;

    fn cast_to(x: Option<Tensor>, to: DType) -> Tensor {
        run(
            "Cast",
            13,
            &[("to", Attr::Int(to.onnx_code() as i64))],
            vec![x],
            1,
        )
        .unwrap()
        .remove(0)
    }

    #[test]
    fn float_to_int_truncates() {
        let x = f32t(&[5], &[-2.7, -0.5, 0.5, 2.7, 1e10]);
        assert_eq!(
            cast_to(x.clone(), DType::I64).as_i64().unwrap(),
            &[-2, 0, 0, 2, 10_000_000_000]
        );
        assert_eq!(
            cast_to(x.clone(), DType::I32).data(),
            &TensorData::I32(vec![-2, 0, 0, 2, i32::MAX])
        );
        assert_eq!(
            cast_to(x, DType::Bool).data(),
            &TensorData::Bool(vec![true; 5])
        );
    }

    #[test]
    fn bool_int_and_half_round_trips() {
        let b = Some(Tensor::new(vec![2], TensorData::Bool(vec![true, false])).unwrap());
        assert_eq!(cast_to(b, DType::F32).as_f32().unwrap(), &[1.0, 0.0]);
        let h = cast_to(f32t(&[2], &[1.5, -65504.0]), DType::F16);
        assert_eq!(
            h.data(),
            &TensorData::F16(vec![f32_to_f16(1.5), f32_to_f16(-65504.0)])
        );
        assert_eq!(
            cast(&h, DType::F32, &mut RunCtx::default())
                .unwrap()
                .as_f32()
                .unwrap(),
            &[1.5, -65504.0]
        );
        assert_eq!(
            cast(&h, DType::I8, &mut RunCtx::default()).unwrap().data(),
            &TensorData::I8(vec![1, -128])
        );
        let big = i64t(&[2], &[300, -1]);
        assert_eq!(
            cast_to(big, DType::U8).data(),
            &TensorData::U8(vec![44, 255])
        );
    }

    #[test]
    fn unsupported_targets_are_named() {
        let err = run("Cast", 13, &[("to", Attr::Int(8))], vec![iota(&[1])], 1).unwrap_err();
        assert!(err.to_string().contains("STRING"), "{err}");
    }

    #[test]
    fn cast_like_takes_the_second_inputs_type() {
        let out = run(
            "CastLike",
            15,
            &[],
            vec![f32t(&[2], &[1.9, -1.9]), i64t(&[], &[0])],
            1,
        )
        .unwrap();
        assert_eq!(out[0].as_i64().unwrap(), &[1, -1]);
    }
}
