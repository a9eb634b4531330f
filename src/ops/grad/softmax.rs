//! Backward of `Softmax` and `LogSoftmax` (opsets 1-21), from the saved output:
//! softmax `dx = y * (g - sum(g * y))`, log-softmax `dx = g - exp(y) * sum(g)`, the sums
//! running over the normalised axis (before opset 13: everything from `axis` on).

use rayon::prelude::*;

use super::{f32_tensor, f32s, GradCtx};
use crate::error::Result;
use crate::ir::Tensor;
use crate::ops::normalize_axis;

pub fn grad(ctx: &GradCtx) -> Result<Vec<Option<Tensor>>> {
    if !ctx.wants(0) {
        return Ok(vec![None]);
    }
    let y = ctx.output(0)?;
    let g = ctx.grad_or_zeros(0)?;
    let shape = y.shape();
    let rank = shape.len();
    let coerce = ctx.opset < 13;
    let default_axis = if coerce { 1 } else { -1 };
    let axis = normalize_axis(ctx.node.attr_int_or("axis", default_axis)?, rank)
        .map_err(|e| e.at_node(ctx.node))?;
    let (n, inner) = if coerce {
        (shape[axis..].iter().product::<usize>(), 1)
    } else {
        (shape[axis], shape[axis + 1..].iter().product::<usize>())
    };
    let block = n * inner;
    let log = ctx.node.op_type == "LogSoftmax";
    let (yv, gv) = (f32s(y), f32s(&g));
    let mut dx = vec![0.0f32; yv.len()];
    if block > 0 {
        dx.par_chunks_mut(block)
            .zip(yv.par_chunks(block).zip(gv.par_chunks(block)))
            .for_each(|(d, (ys, gs))| {
                for j in 0..inner {
                    let at = |i: usize| i * inner + j;
                    if log {
                        let s: f32 = (0..n).map(|i| gs[at(i)]).sum();
                        for i in 0..n {
                            d[at(i)] = gs[at(i)] - ys[at(i)].exp() * s;
                        }
                    } else {
                        let s: f32 = (0..n).map(|i| gs[at(i)] * ys[at(i)]).sum();
                        for i in 0..n {
                            d[at(i)] = ys[at(i)] * (gs[at(i)] - s);
                        }
                    }
                }
            });
    }
    Ok(vec![Some(f32_tensor(shape, dx)?)])
}

#[cfg(test)]
mod tests {
    use super::super::check::{check_node, Rng};
    use crate::ir::{Attr, Node};

    #[test]
    fn softmaxes_match_finite_differences() {
        let mut rng = Rng::new(51);
        for op in ["Softmax", "LogSoftmax"] {
            for (opset, axis) in [(13, -1), (13, 1), (11, 1), (11, 2)] {
                let node = Node::new("s", op, vec!["x".into()], vec!["y".into()])
                    .with_attr("axis", Attr::Int(axis));
                let x = rng.tensor(&[2, 3, 4]);
                check_node(&node, opset, &[Some(x)], &[true], 1e-2, 2e-3);
            }
        }
    }
}
