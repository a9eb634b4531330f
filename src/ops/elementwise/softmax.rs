//! `Softmax` and `LogSoftmax` (1-28) on f32/f64 (f16 computes in f32). Before opset 13 the
//! input is coerced to 2-D at `axis` (default 1) and each row of the flattened trailing dims
//! is normalised; from 13 the op normalises along the single `axis` (default -1). Both
//! subtract the maximum first so large logits do not overflow.

use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::ir::{Tensor, TypeInfo};
use crate::ops::typed::{
    fold_lanes, max_nan, run_widening_f16, sum_lanes, tensor, view, with_float_type, Elem, Float,
};
use crate::ops::{node_error, normalize_axis, required, CompileCtx, InferCtx, Kernel, RunCtx};

/// Blocks of at least this many elements run in parallel.
const PAR_MIN: usize = 1 << 15;

struct SoftmaxKernel {
    axis: i64,
    /// Opset < 13: everything from `axis` on is one row.
    coerce_2d: bool,
    log: bool,
}

/// Softmax over the middle dim of `x` viewed as `[outer, n, inner]`.
fn softmax<T: Float>(x: &[T], out: &mut [T], n: usize, inner: usize, log: bool) {
    let block = n * inner;
    if block == 0 {
        return;
    }
    let one = |src: &[T], dst: &mut [T]| {
        if inner == 1 {
            row(src, dst, log)
        } else {
            columns(src, dst, n, inner, log)
        }
    };
    if x.len() >= PAR_MIN && x.len() / block > 1 && crate::kernels::par::threads() > 1 {
        out.par_chunks_mut(block)
            .zip(x.par_chunks(block))
            .for_each(|(d, s)| one(s, d));
    } else {
        out.chunks_mut(block)
            .zip(x.chunks(block))
            .for_each(|(d, s)| one(s, d));
    }
}

fn row<T: Float>(src: &[T], dst: &mut [T], log: bool) {
    let max = fold_lanes(src, T::LOWEST, max_nan, max_nan);
    for (d, &s) in dst.iter_mut().zip(src) {
        *d = s.sub(max);
    }
    T::exp_in_place(dst);
    let sum = sum_lanes(dst);
    if log {
        let lse = sum.ln();
        for (d, &s) in dst.iter_mut().zip(src) {
            *d = s.sub(max).sub(lse);
        }
    } else {
        let inv = T::ONE.div(sum);
        dst.iter_mut().for_each(|d| *d = d.mul(inv));
    }
}

/// Softmax down the columns of an `[n, inner]` block, walking it row by row so every pass
/// is contiguous.
fn columns<T: Float>(src: &[T], dst: &mut [T], n: usize, inner: usize, log: bool) {
    let mut max = src[..inner].to_vec();
    for r in 1..n {
        for (m, &v) in max.iter_mut().zip(&src[r * inner..(r + 1) * inner]) {
            *m = max_nan(*m, v);
        }
    }
    let mut sum = vec![T::ZERO; inner];
    for r in 0..n {
        let range = r * inner..(r + 1) * inner;
        let d = &mut dst[range.clone()];
        for ((d, &s), &m) in d.iter_mut().zip(&src[range]).zip(&max) {
            *d = s.sub(m);
        }
        T::exp_in_place(d);
        for (acc, &e) in sum.iter_mut().zip(d.iter()) {
            *acc = acc.add(e);
        }
    }
    for r in 0..n {
        let range = r * inner..(r + 1) * inner;
        if log {
            for (((d, &s), &m), &acc) in dst[range.clone()]
                .iter_mut()
                .zip(&src[range])
                .zip(&max)
                .zip(&sum)
            {
                *d = s.sub(m).sub(acc.ln());
            }
        } else {
            for (d, &acc) in dst[range].iter_mut().zip(&sum) {
                *d = d.div(acc);
            }
        }
    }
}

impl SoftmaxKernel {
    fn eval(&self, x: &Tensor, ctx: &mut RunCtx) -> Result<Tensor> {
        let shape = x.shape();
        let axis = normalize_axis(self.axis, shape.len())?;
        let (n, inner) = if self.coerce_2d {
            (shape[axis.min(shape.len())..].iter().product(), 1)
        } else {
            (
                shape.get(axis).copied().unwrap_or(1),
                shape[(axis + 1).min(shape.len())..].iter().product(),
            )
        };
        with_float_type!(
            x.dtype(),
            |T| {
                let mut out = T::filled(ctx, x.numel());
                softmax::<T>(view::<T>(x)?, &mut out, n, inner, self.log);
                tensor(shape.to_vec(), out)
            },
            else Err(Error::DType(format!("Softmax needs float input, got {}", x.dtype())))
        )
    }
}

impl Kernel for SoftmaxKernel {
    fn run(&self, inputs: &[Option<&Tensor>], ctx: &mut RunCtx) -> Result<Vec<Tensor>> {
        run_widening_f16(inputs, |inputs| {
            Ok(vec![self.eval(required(inputs, 0)?, ctx)?])
        })
    }
}

pub fn infer(ctx: &InferCtx) -> Result<Vec<TypeInfo>> {
    let t = ctx.input_type(0)?;
    if !t.dtype.is_float() {
        return Err(node_error(
            ctx.node,
            format!("needs float input, got {}", t.dtype),
        ));
    }
    if let Some(r) = t.rank() {
        let axis = ctx
            .node
            .attr_int_or("axis", if ctx.opset < 13 { 1 } else { -1 })?;
        normalize_axis(axis, r).map_err(|e| node_error(ctx.node, e.to_string()))?;
    }
    Ok(vec![t.clone()])
}

pub fn compile(ctx: &CompileCtx) -> Result<Box<dyn Kernel>> {
    let coerce_2d = ctx.opset < 13;
    Ok(Box::new(SoftmaxKernel {
        axis: ctx
            .node
            .attr_int_or("axis", if coerce_2d { 1 } else { -1 })?,
        coerce_2d,
        log: ctx.node.op_type == "LogSoftmax",
    }))
}

#[cfg(test)]
mod tests {
    use crate::ir::Attr;
    use crate::ops::testutil::*;

    fn reference(x: &[f32]) -> Vec<f32> {
        let m = x.iter().cloned().fold(f32::MIN, f32::max);
        let s: f32 = x.iter().map(|v| (v - m).exp()).sum();
        x.iter().map(|v| (v - m).exp() / s).collect()
    }

    #[test]
    fn last_axis_rows_are_stable() {
        let (s, v) = run_f32(
            "Softmax",
            13,
            &[],
            vec![f32t(&[2, 3], &[1., 2., 3., 1000., 1000., 1000.])],
        );
        assert_eq!(s, vec![2, 3]);
        assert_close(&v[..3], &reference(&[1., 2., 3.]), 1e-6);
        assert_close(&v[3..], &[1. / 3.; 3], 1e-6);
    }

    #[test]
    fn opset13_middle_axis_vs_legacy_coercion() {
        let x = iota(&[2, 3, 2]);
        let (_, v) = run_f32("Softmax", 13, &[("axis", Attr::Int(1))], vec![x.clone()]);
        // Column (0, :, 0) is [0, 2, 4].
        let col = reference(&[0., 2., 4.]);
        assert_close(&[v[0], v[2], v[4]], &col, 1e-6);
        let (_, v) = run_f32("Softmax", 11, &[("axis", Attr::Int(1))], vec![x.clone()]);
        assert_close(&v[..6], &reference(&[0., 1., 2., 3., 4., 5.]), 1e-6);
        // Legacy default axis is 1; new default is -1.
        let (_, legacy) = run_f32("Softmax", 12, &[], vec![x.clone()]);
        assert_eq!(legacy, v);
        let (_, new) = run_f32("Softmax", 13, &[], vec![x]);
        assert_close(&new[..2], &reference(&[0., 1.]), 1e-6);
    }

    #[test]
    fn log_softmax() {
        let (_, v) = run_f32(
            "LogSoftmax",
            13,
            &[("axis", Attr::Int(-1))],
            vec![f32t(&[1, 3], &[1., 2., 3.])],
        );
        let want: Vec<f32> = reference(&[1., 2., 3.]).iter().map(|p| p.ln()).collect();
        assert_close(&v, &want, 1e-6);
        let (_, v) = run_f32(
            "LogSoftmax",
            13,
            &[("axis", Attr::Int(0))],
            vec![f32t(&[2, 1], &[0., 0.])],
        );
        assert_close(&v, &[-std::f32::consts::LN_2; 2], 1e-6);
    }

    #[test]
    fn large_inputs_run_in_parallel_with_the_same_result() {
        let n = 64 * 1024;
        let x: Vec<f32> = (0..n).map(|i| ((i * 7919) % 1000) as f32 / 100.0).collect();
        let (_, v) = run_f32("Softmax", 13, &[], vec![f32t(&[64, 1024], &x)]);
        assert_close(&v[1024..2048], &reference(&x[1024..2048]), 1e-6);
    }

    #[test]
    fn bad_axis_is_an_error() {
        assert!(run(
            "Softmax",
            13,
            &[("axis", Attr::Int(2))],
            vec![iota(&[2, 2])],
            1
        )
        .is_err());
    }
}
