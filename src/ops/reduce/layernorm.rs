//! `LayerNormalization` (17-28): normalises over the dims from `axis` on, then applies
//! `Scale` and the optional bias `B`. Statistics are computed per row in two passes (mean,
//! then mean squared deviation) for accuracy. The optional `Mean` and `InvStdDev` outputs are
//! produced with shape `X.shape[..axis] ++ [1; rank - axis]`; they are f32 for f16 and f32
//! inputs (`stash_type` 1) and f64 for f64 inputs.

use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::ir::dtype::f32_to_f16;
use crate::ir::{DType, Dim, Tensor, TensorData, TypeInfo};
use crate::ops::elementwise::{arith, Arith};
use crate::ops::typed::{fold_lanes, sum_lanes, tensor, view, with_float_type, Float};
use crate::ops::{node_error, required, CompileCtx, InferCtx, Kernel, RunCtx};

/// Inputs of at least this many elements are normalised in parallel.
const PAR_MIN: usize = 1 << 15;

struct LayerNormKernel {
    axis: i64,
    epsilon: f32,
    outputs: usize,
}

/// Normalises one row; returns (mean, 1/std). `affine` holds scale and bias of row length.
fn norm_row<T: Float>(
    src: &[T],
    dst: &mut [T],
    eps: T,
    affine: (Option<&[T]>, Option<&[T]>),
) -> (T, T) {
    let n = T::from_usize(src.len());
    let mean = sum_lanes(src).div(n);
    let var = fold_lanes(
        src,
        T::ZERO,
        |a, v| {
            let d = v.sub(mean);
            a.add(d.mul(d))
        },
        T::add,
    )
    .div(n);
    let inv = T::ONE.div(var.add(eps).sqrt());
    for (d, &s) in dst.iter_mut().zip(src) {
        *d = s.sub(mean).mul(inv);
    }
    if let (Some(scale), Some(bias)) = affine {
        for ((d, &g), &b) in dst.iter_mut().zip(scale).zip(bias) {
            *d = d.mul(g).add(b);
        }
    } else if let (Some(scale), None) = affine {
        for (d, &g) in dst.iter_mut().zip(scale) {
            *d = d.mul(g);
        }
    }
    (mean, inv)
}

impl LayerNormKernel {
    fn eval<T: Float>(
        &self,
        x: &Tensor,
        scale: &Tensor,
        bias: Option<&Tensor>,
        ctx: &mut RunCtx,
    ) -> Result<Vec<Tensor>> {
        let shape = x.shape();
        let a = super::axis_index(self.axis, shape.len())?;
        let d: usize = shape[a..].iter().product();
        let rows: usize = shape[..a].iter().product();
        let src = view::<T>(x)?;
        // Scale and bias the size of one row are applied inline; anything else broadcasts
        // afterwards.
        let inline = scale.numel() == d && bias.is_none_or(|b| b.numel() == d);
        let affine = if inline {
            (Some(view::<T>(scale)?), bias.map(view::<T>).transpose()?)
        } else {
            (None, None)
        };
        let eps = T::from_f64(self.epsilon as f64);
        let mut y = T::filled(ctx, src.len());
        let mut stats = vec![(T::ZERO, T::ZERO); rows];
        if d > 0 {
            if src.len() >= PAR_MIN && crate::kernels::par::threads() > 1 {
                y.par_chunks_mut(d)
                    .zip(src.par_chunks(d))
                    .zip(stats.par_iter_mut())
                    .for_each(|((dst, s), st)| *st = norm_row(s, dst, eps, affine));
            } else {
                for ((dst, s), st) in y.chunks_mut(d).zip(src.chunks(d)).zip(stats.iter_mut()) {
                    *st = norm_row(s, dst, eps, affine);
                }
            }
        }
        let mut out = tensor(shape.to_vec(), y)?;
        if !inline {
            let scaled = arith(Arith::Mul, &out, scale, ctx)?;
            ctx.release(std::mem::replace(&mut out, scaled));
            if let Some(b) = bias {
                let shifted = arith(Arith::Add, &out, b, ctx)?;
                ctx.release(std::mem::replace(&mut out, shifted));
            }
            if out.shape() != shape {
                return Err(Error::Shape(format!(
                    "Scale {:?} / B {:?} do not broadcast to X {shape:?}",
                    scale.shape(),
                    bias.map(Tensor::shape)
                )));
            }
        }
        let mut outs = vec![out];
        if self.outputs > 1 {
            let mut stat_shape = shape[..a].to_vec();
            stat_shape.resize(shape.len(), 1);
            outs.push(tensor(
                stat_shape.clone(),
                stats.iter().map(|s| s.0).collect(),
            )?);
            if self.outputs > 2 {
                outs.push(tensor(stat_shape, stats.iter().map(|s| s.1).collect())?);
            }
        }
        Ok(outs)
    }
}

impl Kernel for LayerNormKernel {
    fn run(&self, inputs: &[Option<&Tensor>], ctx: &mut RunCtx) -> Result<Vec<Tensor>> {
        let x = required(inputs, 0)?;
        let scale = required(inputs, 1)?;
        let bias = inputs.get(2).copied().flatten();
        for t in std::iter::once(scale).chain(bias) {
            if t.dtype() != x.dtype() {
                return Err(Error::DType(format!(
                    "Scale and B must have X's type {}, got {}",
                    x.dtype(),
                    t.dtype()
                )));
            }
        }
        if x.dtype() == DType::F16 {
            // Compute in f32; only Y goes back to half, statistics stay f32.
            let (xw, sw) = (x.to_f32(), scale.to_f32());
            let bw = bias.map(Tensor::to_f32);
            let mut outs = self.eval::<f32>(&xw, &sw, bw.as_ref(), ctx)?;
            let y = outs.remove(0);
            let (shape, data) = y.into_parts();
            let half = match data {
                TensorData::F32(v) => v.into_iter().map(f32_to_f16).collect(),
                _ => Vec::new(),
            };
            outs.insert(0, Tensor::new(shape, TensorData::F16(half))?);
            return Ok(outs);
        }
        with_float_type!(
            x.dtype(),
            |T| self.eval::<T>(x, scale, bias, ctx),
            else Err(Error::DType(format!("LayerNormalization needs float input, got {}", x.dtype())))
        )
    }
}

pub fn infer(ctx: &InferCtx) -> Result<Vec<TypeInfo>> {
    let node = ctx.node;
    let x = ctx.input_type(0)?;
    if !x.dtype.is_float() {
        return Err(node_error(
            node,
            format!("needs float input, got {}", x.dtype),
        ));
    }
    let axis = node.attr_int_or("axis", -1)?;
    let stat_dtype = if x.dtype == DType::F64 {
        DType::F64
    } else {
        DType::F32
    };
    let stat_shape = match &x.shape {
        Some(dims) => {
            let a =
                super::axis_index(axis, dims.len()).map_err(|e| node_error(node, e.to_string()))?;
            let mut s = dims[..a].to_vec();
            s.resize(dims.len(), Dim::Known(1));
            Some(s)
        }
        None => None,
    };
    let mut out = vec![x.clone()];
    for _ in 1..node.outputs.len().min(3) {
        out.push(TypeInfo {
            dtype: stat_dtype,
            shape: stat_shape.clone(),
        });
    }
    Ok(out)
}

pub fn compile(ctx: &CompileCtx) -> Result<Box<dyn Kernel>> {
    let node = ctx.node;
    let stash = node.attr_int_or("stash_type", 1)?;
    if stash != 1 {
        return Err(node_error(
            node,
            format!("stash_type {stash} is not supported (only 1, float)"),
        ));
    }
    Ok(Box::new(LayerNormKernel {
        axis: node.attr_int_or("axis", -1)?,
        epsilon: node.attr_float_or("epsilon", 1e-5)?,
        outputs: node.outputs.len(),
    }))
}

#[cfg(test)]
mod tests {
    use crate::ir::Attr;
    use crate::ops::testutil::*;

    fn reference(x: &[f32], g: &[f32], b: &[f32], eps: f32) -> Vec<f32> {
        let n = x.len() as f32;
        let m = x.iter().sum::<f32>() / n;
        let v = x.iter().map(|a| (a - m) * (a - m)).sum::<f32>() / n;
        x.iter()
            .zip(g)
            .zip(b)
            .map(|((a, g), b)| (a - m) / (v + eps).sqrt() * g + b)
            .collect()
    }

    #[test]
    fn last_axis_with_scale_and_bias() {
        let x = [1., 2., 4., 8., -1., 0., 1., 2.];
        let g = [1., 2., 0.5, -1.];
        let b = [0., 1., 0., -1.];
        let out = run(
            "LayerNormalization",
            17,
            &[],
            vec![f32t(&[2, 4], &x), f32t(&[4], &g), f32t(&[4], &b)],
            3,
        )
        .unwrap();
        let y = out[0].as_f32().unwrap();
        assert_close(&y[..4], &reference(&x[..4], &g, &b, 1e-5), 1e-6);
        assert_close(&y[4..], &reference(&x[4..], &g, &b, 1e-5), 1e-6);
        assert_eq!(out[1].shape(), &[2, 1]);
        assert_eq!(out[1].as_f32().unwrap(), &[3.75, 0.5]);
        assert_close(
            out[2].as_f32().unwrap(),
            &[1. / (7.1875f32 + 1e-5).sqrt(), 1. / (1.25f32 + 1e-5).sqrt()],
            1e-6,
        );
    }

    #[test]
    fn multi_axis_normalisation_and_broadcast_scale() {
        let x: Vec<f32> = (0..12).map(|v| (v * v) as f32 * 0.1).collect();
        let (_, y) = run_f32(
            "LayerNormalization",
            17,
            &[("axis", Attr::Int(1)), ("epsilon", Attr::Float(1e-3))],
            vec![f32t(&[2, 2, 3], &x), f32t(&[1, 3], &[1., 2., 3.])],
        );
        let g = [1., 2., 3., 1., 2., 3.];
        assert_close(&y[..6], &reference(&x[..6], &g, &[0.; 6], 1e-3), 1e-5);
        assert_close(&y[6..], &reference(&x[6..], &g, &[0.; 6], 1e-3), 1e-5);
    }

    #[test]
    fn large_inputs_run_in_parallel() {
        let x: Vec<f32> = (0..64 * 1024).map(|v| ((v * 37) % 101) as f32).collect();
        let g = vec![1.0; 1024];
        let (_, y) = run_f32(
            "LayerNormalization",
            17,
            &[],
            vec![f32t(&[64, 1024], &x), f32t(&[1024], &g)],
        );
        assert_close(
            &y[1024..2048],
            &reference(&x[1024..2048], &g, &[0.; 1024], 1e-5),
            1e-5,
        );
    }
}
