//! Backward of the dense products, on the packed sgemm (transposes are free views):
//! - `Gemm` (opsets 7-21): `Y = alpha * op(A) op(B) + beta * C`, so
//!   `d op(A) = alpha dY op(B)^T`, `d op(B) = alpha op(A)^T dY`, `dC = beta * sum(dY)` over
//!   the dims C was broadcast along;
//! - `MatMul` (opsets 1-21): numpy semantics with 1-D operands promoted and batch dims
//!   broadcast; each operand's gradient is summed over the batch dims it was broadcast along.

use super::elementwise::reduce_to_shape;
use super::{f32_tensor, f32s, GradCtx};
use crate::error::Result;
use crate::ir::Tensor;
use crate::kernels::gemm::{gemm, Epilogue, Lhs, MatMut, MatRef, Rhs};
use crate::ops::broadcast::broadcast_shape;

/// `C = alpha * A B` into a fresh `rows x cols` buffer.
fn product(alpha: f32, a: MatRef, b: MatRef) -> Result<Vec<f32>> {
    let (m, n) = (a.rows(), b.cols());
    let mut c = vec![0.0f32; m * n];
    gemm(
        alpha,
        Lhs::Mat(a),
        Rhs::Mat(b),
        0.0,
        MatMut::row_major(&mut c, m, n)?,
        Epilogue::default(),
    )?;
    Ok(c)
}

pub fn gemm_grad(ctx: &GradCtx) -> Result<Vec<Option<Tensor>>> {
    let node = ctx.node;
    let e = |err: crate::Error| err.at_node(node);
    let a = ctx.input(0)?;
    let b = ctx.input(1)?;
    let alpha = node.attr_float_or("alpha", 1.0)?;
    let beta = node.attr_float_or("beta", 1.0)?;
    let ta = node.attr_int_or("transA", 0)? != 0;
    let tb = node.attr_int_or("transB", 0)? != 0;
    let (&[ar, ac], &[br, bc]) = (a.shape(), b.shape()) else {
        return Err(ctx.error(format!(
            "Gemm operands must be 2-D, got {:?} and {:?}",
            a.shape(),
            b.shape()
        )));
    };
    let g = ctx.grad_or_zeros(0)?;
    let m = if ta { ac } else { ar };
    let n = if tb { br } else { bc };
    let gm = MatRef::row_major(f32s(&g), m, n).map_err(e)?;
    // op(X) as a view of the stored matrix.
    let am = MatRef::row_major(f32s(a), ar, ac).map_err(e)?;
    let bm = MatRef::row_major(f32s(b), br, bc).map_err(e)?;
    let op_a = if ta { am.t() } else { am };
    let op_b = if tb { bm.t() } else { bm };
    let mut out = vec![None; ctx.inputs.len().max(2)];
    if ctx.wants(0) {
        // Stored A is op(A) or its transpose; compute that layout directly.
        let d = if ta {
            product(alpha, op_b, gm.t()).map_err(e)?
        } else {
            product(alpha, gm, op_b.t()).map_err(e)?
        };
        out[0] = Some(f32_tensor(a.shape(), d)?);
    }
    if ctx.wants(1) {
        let d = if tb {
            product(alpha, gm.t(), op_a).map_err(e)?
        } else {
            product(alpha, op_a.t(), gm).map_err(e)?
        };
        out[1] = Some(f32_tensor(b.shape(), d)?);
    }
    if ctx.wants(2) {
        if let Some(c) = ctx.inputs.get(2).copied().flatten() {
            let mut d = reduce_to_shape(&g, c.shape()).map_err(e)?;
            if beta != 1.0 {
                d.as_f32_mut()?.iter_mut().for_each(|v| *v *= beta);
            }
            out[2] = Some(d);
        }
    }
    Ok(out)
}

/// Index into a broadcast operand of batch shape `own` for output batch index `idx` of
/// batch shape `full` (both right-aligned).
fn batch_offset(idx: usize, full: &[usize], own: &[usize]) -> usize {
    let mut rem = idx;
    let mut off = 0;
    let mut stride = 1;
    let lead = full.len() - own.len();
    for d in (0..full.len()).rev() {
        let i = rem % full[d];
        rem /= full[d];
        if d >= lead {
            let size = own[d - lead];
            if size != 1 {
                off += i * stride;
            }
            stride *= size;
        }
    }
    off
}

pub fn matmul(ctx: &GradCtx) -> Result<Vec<Option<Tensor>>> {
    let node = ctx.node;
    let e = |err: crate::Error| err.at_node(node);
    let a = ctx.input(0)?;
    let b = ctx.input(1)?;
    if a.rank() == 0 || b.rank() == 0 {
        return Err(ctx.error("MatMul operands must have rank at least 1"));
    }
    // Promote 1-D operands as numpy does.
    let sa: Vec<usize> = if a.rank() == 1 {
        vec![1, a.shape()[0]]
    } else {
        a.shape().to_vec()
    };
    let sb: Vec<usize> = if b.rank() == 1 {
        vec![b.shape()[0], 1]
    } else {
        b.shape().to_vec()
    };
    let (m, k) = (sa[sa.len() - 2], sa[sa.len() - 1]);
    let n = sb[sb.len() - 1];
    let (ba, bb) = (&sa[..sa.len() - 2], &sb[..sb.len() - 2]);
    let batch = broadcast_shape(ba, bb).map_err(e)?;
    let count: usize = batch.iter().product();
    let g = ctx.grad_or_zeros(0)?;
    let gv = f32s(&g);
    if gv.len() != count * m * n {
        return Err(ctx.error(format!(
            "output gradient {:?} does not match the product of {:?} and {:?}",
            g.shape(),
            a.shape(),
            b.shape()
        )));
    }
    let (av, bv) = (f32s(a), f32s(b));
    let mut out = vec![None, None];
    if ctx.wants(0) {
        let mut full = vec![0.0f32; count * m * k];
        for t in 0..count {
            let boff = batch_offset(t, &batch, bb) * k * n;
            let gm = MatRef::row_major(&gv[t * m * n..(t + 1) * m * n], m, n).map_err(e)?;
            let bm = MatRef::row_major(&bv[boff..boff + k * n], k, n).map_err(e)?;
            gemm(
                1.0,
                Lhs::Mat(gm),
                Rhs::Mat(bm.t()),
                0.0,
                MatMut::row_major(&mut full[t * m * k..(t + 1) * m * k], m, k).map_err(e)?,
                Epilogue::default(),
            )
            .map_err(e)?;
        }
        let mut full_shape = batch.clone();
        full_shape.extend([m, k]);
        let mut own = ba.to_vec();
        own.extend([m, k]);
        let d = reduce_to_shape(&f32_tensor(&full_shape, full)?, &own).map_err(e)?;
        out[0] = Some(d.reshaped(a.shape().to_vec()).map_err(e)?);
    }
    if ctx.wants(1) {
        let mut full = vec![0.0f32; count * k * n];
        for t in 0..count {
            let aoff = batch_offset(t, &batch, ba) * m * k;
            let gm = MatRef::row_major(&gv[t * m * n..(t + 1) * m * n], m, n).map_err(e)?;
            let am = MatRef::row_major(&av[aoff..aoff + m * k], m, k).map_err(e)?;
            gemm(
                1.0,
                Lhs::Mat(am.t()),
                Rhs::Mat(gm),
                0.0,
                MatMut::row_major(&mut full[t * k * n..(t + 1) * k * n], k, n).map_err(e)?,
                Epilogue::default(),
            )
            .map_err(e)?;
        }
        let mut full_shape = batch.clone();
        full_shape.extend([k, n]);
        let mut own = bb.to_vec();
        own.extend([k, n]);
        let d = reduce_to_shape(&f32_tensor(&full_shape, full)?, &own).map_err(e)?;
        out[1] = Some(d.reshaped(b.shape().to_vec()).map_err(e)?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::super::check::{check_node, Rng};
    use crate::ir::{Attr, Node};

    #[test]
    fn gemm_all_transposes_and_bias_shapes() {
        let mut rng = Rng::new(11);
        let (m, k, n) = (3, 4, 5);
        for ta in [0, 1] {
            for tb in [0, 1] {
                for c_shape in [vec![n], vec![m, n], vec![m, 1], vec![]] {
                    let sa = if ta == 1 { [k, m] } else { [m, k] };
                    let sb = if tb == 1 { [n, k] } else { [k, n] };
                    let a = rng.tensor(&sa);
                    let b = rng.tensor(&sb);
                    let c = rng.tensor(&c_shape);
                    let node = Node::new(
                        "g",
                        "Gemm",
                        vec!["a".into(), "b".into(), "c".into()],
                        vec!["y".into()],
                    )
                    .with_attr("transA", Attr::Int(ta))
                    .with_attr("transB", Attr::Int(tb))
                    .with_attr("alpha", Attr::Float(0.7))
                    .with_attr("beta", Attr::Float(1.3));
                    check_node(
                        &node,
                        13,
                        &[Some(a), Some(b), Some(c)],
                        &[true, true, true],
                        1e-2,
                        2e-3,
                    );
                }
            }
        }
    }

    #[test]
    fn matmul_batched_broadcast_and_vectors() {
        let mut rng = Rng::new(12);
        for (sa, sb) in [
            (vec![3, 4], vec![4, 2]),
            (vec![2, 3, 4], vec![4, 2]),
            (vec![3, 4], vec![2, 1, 4, 5]),
            (vec![2, 1, 3, 4], vec![3, 4, 2]),
            (vec![4], vec![4, 3]),
            (vec![2, 3, 4], vec![4]),
        ] {
            let node = Node::new(
                "m",
                "MatMul",
                vec!["a".into(), "b".into()],
                vec!["y".into()],
            );
            check_node(
                &node,
                13,
                &[Some(rng.tensor(&sa)), Some(rng.tensor(&sb))],
                &[true, true],
                1e-2,
                2e-3,
            );
        }
    }
}
