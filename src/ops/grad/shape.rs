//! Backward of data movement: the reshaping ops (`Identity`, `Flatten`, `Reshape`, `Squeeze`,
//! `Unsqueeze`) pass the gradient back under the input's shape; `Concat` cuts it, `Split`
//! joins the pieces (zeros for unused outputs), `Slice` scatters it into zeros and
//! `Transpose` applies the inverse permutation.

use super::{f32_tensor, f32s, GradCtx};
use crate::error::Result;
use crate::ir::Tensor;
use crate::ops::shape_ops::{concat as concat_tensors, slice_params, transpose as permute};
use crate::ops::{normalize_axis, RunCtx};

/// Gradient of input 0 only, with `None` for the other (shape-like) inputs.
fn first_only(ctx: &GradCtx, g: Option<Tensor>) -> Vec<Option<Tensor>> {
    let mut out = vec![None; ctx.inputs.len().max(1)];
    out[0] = g;
    out
}

pub fn reshape_like(ctx: &GradCtx) -> Result<Vec<Option<Tensor>>> {
    if !ctx.wants(0) {
        return Ok(first_only(ctx, None));
    }
    let x = ctx.input(0)?;
    let g = ctx.grad_or_zeros(0)?.into_owned();
    let g = g
        .reshaped(x.shape().to_vec())
        .map_err(|e| e.at_node(ctx.node))?;
    Ok(first_only(ctx, Some(g)))
}

/// `[outer, axis_len, inner]` view of `shape` around `axis`.
fn around(shape: &[usize], axis: usize) -> (usize, usize, usize) {
    (
        shape[..axis].iter().product(),
        shape[axis],
        shape[axis + 1..].iter().product(),
    )
}

pub fn concat(ctx: &GradCtx) -> Result<Vec<Option<Tensor>>> {
    let g = ctx.grad_or_zeros(0)?;
    let rank = g.rank();
    let axis = normalize_axis(
        ctx.node
            .attr_int("axis")?
            .ok_or_else(|| ctx.error("Concat needs an 'axis' attribute"))?,
        rank,
    )
    .map_err(|e| e.at_node(ctx.node))?;
    let (outer, total, inner) = around(g.shape(), axis);
    let gv = f32s(&g);
    let mut offset = 0;
    let mut out = Vec::with_capacity(ctx.inputs.len());
    for i in 0..ctx.inputs.len() {
        let x = ctx.input(i)?;
        let len = x.shape().get(axis).copied().unwrap_or(0);
        if ctx.wants(i) {
            let mut d = Vec::with_capacity(x.numel());
            for o in 0..outer {
                let start = (o * total + offset) * inner;
                d.extend_from_slice(&gv[start..start + len * inner]);
            }
            out.push(Some(f32_tensor(x.shape(), d)?));
        } else {
            out.push(None);
        }
        offset += len;
    }
    Ok(out)
}

pub fn split(ctx: &GradCtx) -> Result<Vec<Option<Tensor>>> {
    if !ctx.wants(0) {
        return Ok(first_only(ctx, None));
    }
    let x = ctx.input(0)?;
    let axis = normalize_axis(ctx.node.attr_int_or("axis", 0)?, x.rank())
        .map_err(|e| e.at_node(ctx.node))?;
    let parts: Vec<std::borrow::Cow<Tensor>> = (0..ctx.node.outputs.len())
        .map(|i| ctx.grad_or_zeros(i))
        .collect::<Result<_>>()?;
    let refs: Vec<&Tensor> = parts.iter().map(|c| c.as_ref()).collect();
    let g = concat_tensors(&refs, axis as i64, &mut RunCtx::default())
        .map_err(|e| e.at_node(ctx.node))?;
    Ok(first_only(ctx, Some(g)))
}

/// An optional integer input of Slice (opset >= 10).
fn ints(ctx: &GradCtx, i: usize) -> Result<Option<Vec<i64>>> {
    ctx.inputs
        .get(i)
        .copied()
        .flatten()
        .map(Tensor::to_i64_vec)
        .transpose()
}

pub fn slice(ctx: &GradCtx) -> Result<Vec<Option<Tensor>>> {
    if !ctx.wants(0) {
        return Ok(first_only(ctx, None));
    }
    let x = ctx.input(0)?;
    let node = ctx.node;
    let (starts, ends, axes, steps) = if ctx.opset < 10 {
        let get = |k: &str| node.attr_ints(k).map(|v| v.map(<[i64]>::to_vec));
        (
            get("starts")?.ok_or_else(|| ctx.error("Slice needs 'starts'"))?,
            get("ends")?.ok_or_else(|| ctx.error("Slice needs 'ends'"))?,
            get("axes")?,
            None,
        )
    } else {
        (
            ints(ctx, 1)?.ok_or_else(|| ctx.error("Slice needs starts"))?,
            ints(ctx, 2)?.ok_or_else(|| ctx.error("Slice needs ends"))?,
            ints(ctx, 3)?,
            ints(ctx, 4)?,
        )
    };
    let params = slice_params(x.shape(), &starts, &ends, axes.as_deref(), steps.as_deref())
        .map_err(|e| e.at_node(node))?;
    let g = ctx.grad_or_zeros(0)?;
    let gv = f32s(&g);
    let shape = x.shape();
    let rank = shape.len();
    let mut strides = vec![1isize; rank];
    for d in (0..rank.saturating_sub(1)).rev() {
        strides[d] = strides[d + 1] * shape[d + 1] as isize;
    }
    // Where each sliced element came from: start offset plus a signed stride per axis.
    let base: isize = params
        .iter()
        .zip(&strides)
        .map(|(p, &s)| p.start as isize * s)
        .sum();
    let step: Vec<isize> = params
        .iter()
        .zip(&strides)
        .map(|(p, &s)| p.step as isize * s)
        .collect();
    let lens: Vec<usize> = params.iter().map(|p| p.len).collect();
    let mut dx = vec![0.0f32; x.numel()];
    if !gv.is_empty() {
        let mut idx = vec![0usize; rank];
        let mut off = base;
        for &v in gv {
            dx[off as usize] += v;
            for d in (0..rank).rev() {
                idx[d] += 1;
                off += step[d];
                if idx[d] < lens[d] {
                    break;
                }
                off -= step[d] * idx[d] as isize;
                idx[d] = 0;
            }
        }
    }
    Ok(first_only(ctx, Some(f32_tensor(shape, dx)?)))
}

pub fn transpose(ctx: &GradCtx) -> Result<Vec<Option<Tensor>>> {
    if !ctx.wants(0) {
        return Ok(first_only(ctx, None));
    }
    let x = ctx.input(0)?;
    let rank = x.rank();
    let perm: Vec<usize> = match ctx.node.attr_ints("perm")? {
        Some(p) => p
            .iter()
            .map(|&v| normalize_axis(v, rank))
            .collect::<Result<_>>()
            .map_err(|e| e.at_node(ctx.node))?,
        None => (0..rank).rev().collect(),
    };
    let mut inverse = vec![0usize; rank];
    for (k, &p) in perm.iter().enumerate() {
        inverse[p] = k;
    }
    let g = ctx.grad_or_zeros(0)?;
    let dx = permute(&g, &inverse, &mut RunCtx::default()).map_err(|e| e.at_node(ctx.node))?;
    Ok(first_only(ctx, Some(dx)))
}

#[cfg(test)]
mod tests {
    use super::super::check::{check_node, Rng};
    use crate::ir::{Attr, Node, Tensor};

    fn node(op: &str, inputs: &[&str], outputs: &[&str]) -> Node {
        Node::new(
            "s",
            op,
            inputs.iter().map(|s| s.to_string()).collect(),
            outputs.iter().map(|s| s.to_string()).collect(),
        )
    }

    #[test]
    fn reshapes() {
        let mut rng = Rng::new(8);
        let x = rng.tensor(&[2, 3, 4]);
        check_node(
            &node("Flatten", &["x"], &["y"]).with_attr("axis", Attr::Int(2)),
            13,
            &[Some(x.clone())],
            &[true],
            1e-2,
            2e-3,
        );
        let shape = Tensor::from_i64(vec![2], vec![4, -1]).unwrap();
        check_node(
            &node("Reshape", &["x", "s"], &["y"]),
            14,
            &[Some(x.clone()), Some(shape)],
            &[true],
            1e-2,
            2e-3,
        );
        check_node(
            &node("Identity", &["x"], &["y"]),
            13,
            &[Some(x)],
            &[true],
            1e-2,
            1e-3,
        );
    }

    #[test]
    fn concat_split_slice_transpose() {
        let mut rng = Rng::new(9);
        let (a, b) = (rng.tensor(&[2, 3, 2]), rng.tensor(&[2, 1, 2]));
        check_node(
            &node("Concat", &["a", "b"], &["y"]).with_attr("axis", Attr::Int(-2)),
            13,
            &[Some(a), Some(b)],
            &[true, true],
            1e-2,
            2e-3,
        );
        let x = rng.tensor(&[2, 5, 3]);
        let sizes = Tensor::from_i64(vec![2], vec![2, 3]).unwrap();
        check_node(
            &node("Split", &["x", "s"], &["y0", "y1"]).with_attr("axis", Attr::Int(1)),
            13,
            &[Some(x.clone()), Some(sizes)],
            &[true],
            1e-2,
            2e-3,
        );
        let i = |v: &[i64]| Some(Tensor::from_i64(vec![v.len()], v.to_vec()).unwrap());
        check_node(
            &node("Slice", &["x", "st", "en", "ax", "sp"], &["y"]),
            13,
            &[
                Some(x.clone()),
                i(&[4, 0]),
                i(&[0, 3]),
                i(&[1, 2]),
                i(&[-2, 2]),
            ],
            &[true],
            1e-2,
            2e-3,
        );
        check_node(
            &node("Transpose", &["x"], &["y"]).with_attr("perm", Attr::Ints(vec![1, 2, 0])),
            13,
            &[Some(x)],
            &[true],
            1e-2,
            2e-3,
        );
    }
}
