//! ONNX `DynamicQuantizeLinear` (opset 11+): u8 codes of an f32 tensor on the affine grid its
//! own range (widened to include 0) spans, with that grid's scale and zero point as outputs.
//! What ONNX Runtime's `quantize_dynamic` puts before each `MatMulInteger` / `ConvInteger`.
//! An all-zero input has no range: its scale is 0 and its codes and zero point are 0, which
//! dequantize to the zeros it held.

use crate::error::Result;
use crate::ir::{DType, Tensor, TensorData, TypeInfo};
use crate::ops::{node_error, required, CompileCtx, InferCtx, Kernel, OpDef, RunCtx};
use crate::quant::linear::{min_max, round_half_even};
use crate::quant::QParams;

pub const DYNAMIC_QUANTIZE_LINEAR: OpDef = OpDef {
    op_type: "DynamicQuantizeLinear",
    domain: "",
    opsets: (11, 23),
    infer,
    compile,
    fuses_activation: false,
};

fn infer(ctx: &InferCtx) -> Result<Vec<TypeInfo>> {
    let x = ctx.input_type(0)?;
    Ok(vec![
        TypeInfo {
            dtype: DType::U8,
            shape: x.shape.clone(),
        },
        TypeInfo::new(DType::F32, vec![]),
        TypeInfo::new(DType::U8, vec![]),
    ])
}

fn compile(ctx: &CompileCtx) -> Result<Box<dyn Kernel>> {
    crate::ops::require_f32_input(ctx)?;
    Ok(Box::new(DynamicQuantize {
        node: ctx.node.clone(),
    }))
}

struct DynamicQuantize {
    node: crate::ir::Node,
}

/// The grid of `x`: `(scale, zero point)`, as the operator's definition computes them in f32.
fn grid(x: &[f32]) -> Option<(f32, u8)> {
    let (lo, hi) = if x.is_empty() { (0.0, 0.0) } else { min_max(x) };
    if !lo.is_finite() || !hi.is_finite() {
        return None;
    }
    let (lo, hi) = (lo.min(0.0), hi.max(0.0));
    let scale = (hi - lo) / 255.0;
    if scale == 0.0 {
        return Some((0.0, 0));
    }
    let zp = round_half_even((0.0 - lo / scale).clamp(0.0, 255.0));
    Some((scale, zp as u8))
}

impl Kernel for DynamicQuantize {
    fn run(&self, inputs: &[Option<&Tensor>], _ctx: &mut RunCtx) -> Result<Vec<Tensor>> {
        let x = required(inputs, 0)?;
        let xs = x
            .as_f32()
            .map_err(|e| node_error(&self.node, e.to_string()))?;
        let (scale, zp) = grid(xs).ok_or_else(|| {
            node_error(
                &self.node,
                "the input holds NaN or infinity: it has no quantization range",
            )
        })?;
        let mut codes = vec![0u8; xs.len()];
        if scale != 0.0 {
            let name = self.node.display_name();
            QParams::new(scale, i32::from(zp), 0, 255, &name)
                .and_then(|p| p.quantize_slice(xs, &mut codes))
                .map_err(|e| node_error(&self.node, e.to_string()))?;
        }
        Ok(vec![
            Tensor::new(x.shape().to_vec(), TensorData::U8(codes))?,
            Tensor::scalar_f32(scale),
            Tensor::new(vec![], TensorData::U8(vec![zp]))?,
        ])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grid_follows_the_definition() {
        // ONNX's example: range [-1, 2.5] widened to include 0, scale 3.5 / 255.
        let (s, z) = grid(&[0.0, 2.0, -3.0, -2.5, 1.34, 0.5]).unwrap();
        assert_eq!(s, 5.0 / 255.0);
        assert_eq!(z, 153);
        // One-sided data: the grid starts at 0.
        assert_eq!(grid(&[1.0, 2.0]).unwrap().1, 0);
        assert_eq!(grid(&[-1.0, -2.0]).unwrap().1, 255);
        assert_eq!(grid(&[0.0; 4]), Some((0.0, 0)));
        assert_eq!(grid(&[]), Some((0.0, 0)));
        assert_eq!(grid(&[1.0, f32::NAN]), None);
    }
}
