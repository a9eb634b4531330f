//! Backward of broadcasting arithmetic (`Add`, `Sub`, `Mul`, `Div`, `Sum`, `Mean`) and of a
//! few pointwise functions (`Neg`, `Exp`, `Log`, `Sqrt`, `Abs`). An operand that was
//! broadcast receives the sum of the output gradient over the broadcast dims.

use super::{f32_tensor, f32s, GradCtx};
use crate::error::{Error, Result};
use crate::ir::Tensor;
use crate::ops::elementwise::{arith, Arith};
use crate::ops::RunCtx;

/// Sums `g` down to `shape`, the shape of an operand that numpy-style broadcasting stretched
/// to `g`'s shape (leading dims added, size-1 dims repeated).
pub fn reduce_to_shape(g: &Tensor, shape: &[usize]) -> Result<Tensor> {
    if g.shape() == shape {
        return Ok(g.clone());
    }
    let gs = g.shape();
    let r = gs.len();
    let bad = || {
        Error::Shape(format!(
            "a gradient of shape {gs:?} cannot be reduced to an operand of shape {shape:?}"
        ))
    };
    if shape.len() > r {
        return Err(bad());
    }
    let mut target = vec![1usize; r - shape.len()];
    target.extend_from_slice(shape);
    if target.iter().zip(gs).any(|(&t, &d)| t != d && t != 1) {
        return Err(bad());
    }
    let src = g.as_f32()?;
    let out_len: usize = target.iter().product();
    let mut out = vec![0.0f32; out_len];
    if r == 0 || src.is_empty() {
        return f32_tensor(shape, out);
    }
    let mut tstride = vec![0usize; r];
    let mut acc = 1;
    for d in (0..r).rev() {
        tstride[d] = if target[d] == 1 { 0 } else { acc };
        acc *= target[d];
    }
    let inner = gs[r - 1];
    let inner_kept = tstride[r - 1] != 0;
    let outer = &gs[..r - 1];
    let mut idx = vec![0usize; r - 1];
    let mut off = 0usize;
    for row in src.chunks_exact(inner.max(1)) {
        if inner_kept {
            for (o, &v) in out[off..off + inner].iter_mut().zip(row) {
                *o += v;
            }
        } else {
            out[off] += crate::kernels::conv_grad::sum_f32(row);
        }
        // Odometer over the outer dims, keeping the output offset in step.
        for d in (0..outer.len()).rev() {
            idx[d] += 1;
            off += tstride[d];
            if idx[d] < outer[d] {
                break;
            }
            off -= tstride[d] * idx[d];
            idx[d] = 0;
        }
    }
    f32_tensor(shape, out)
}

fn scale(t: &Tensor, s: f32) -> Result<Tensor> {
    let v = t.as_f32()?.iter().map(|&x| x * s).collect();
    f32_tensor(t.shape(), v)
}

/// `Add`, `Sub`, `Mul`, `Div` (opsets 7-21, multidirectional broadcasting).
pub fn binary(ctx: &GradCtx) -> Result<Vec<Option<Tensor>>> {
    let g = ctx.grad_or_zeros(0)?;
    let a = ctx.input(0)?;
    let b = ctx.input(1)?;
    let mut rc = RunCtx::default();
    let e = |err: Error| err.at_node(ctx.node);
    let mut out = vec![None, None];
    let op = ctx.node.op_type.as_str();
    if ctx.wants(0) {
        let full = match op {
            "Add" | "Sub" => g.clone().into_owned(),
            "Mul" => arith(Arith::Mul, &g, b, &mut rc).map_err(e)?,
            _ => arith(Arith::Div, &g, b, &mut rc).map_err(e)?,
        };
        out[0] = Some(reduce_to_shape(&full, a.shape()).map_err(e)?);
    }
    if ctx.wants(1) {
        let full = match op {
            "Add" => g.clone().into_owned(),
            "Sub" => scale(&g, -1.0)?,
            "Mul" => arith(Arith::Mul, &g, a, &mut rc).map_err(e)?,
            _ => {
                // d(a/b)/db = -a/b^2 = -y/b.
                let y = ctx.output(0)?;
                let q = arith(Arith::Div, y, b, &mut rc).map_err(e)?;
                scale(&arith(Arith::Mul, &g, &q, &mut rc).map_err(e)?, -1.0)?
            }
        };
        out[1] = Some(reduce_to_shape(&full, b.shape()).map_err(e)?);
    }
    Ok(out)
}

/// Variadic `Sum` and `Mean` (opsets 8-21).
pub fn variadic(ctx: &GradCtx) -> Result<Vec<Option<Tensor>>> {
    let g = ctx.grad_or_zeros(0)?;
    let n = ctx.inputs.len();
    let g = if ctx.node.op_type == "Mean" {
        scale(&g, 1.0 / n as f32)?
    } else {
        g.into_owned()
    };
    (0..n)
        .map(|i| {
            if !ctx.wants(i) {
                return Ok(None);
            }
            let x = ctx.input(i)?;
            reduce_to_shape(&g, x.shape())
                .map(Some)
                .map_err(|e| e.at_node(ctx.node))
        })
        .collect()
}

/// `Neg`, `Exp`, `Log`, `Sqrt`, `Abs`.
pub fn unary(ctx: &GradCtx) -> Result<Vec<Option<Tensor>>> {
    if !ctx.wants(0) {
        return Ok(vec![None]);
    }
    let g = ctx.grad_or_zeros(0)?;
    let x = f32s(ctx.input(0)?);
    let y = f32s(ctx.output(0)?);
    let gv = f32s(&g);
    let d: Vec<f32> = match ctx.node.op_type.as_str() {
        "Neg" => gv.iter().map(|&g| -g).collect(),
        "Exp" => gv.iter().zip(y).map(|(&g, &y)| g * y).collect(),
        "Log" => gv.iter().zip(x).map(|(&g, &x)| g / x).collect(),
        "Sqrt" => gv.iter().zip(y).map(|(&g, &y)| g * 0.5 / y).collect(),
        _ => gv.iter().zip(x).map(|(&g, &x)| g * x.signum()).collect(),
    };
    Ok(vec![Some(f32_tensor(g.shape(), d)?)])
}

#[cfg(test)]
mod tests {
    use super::super::check::{check_node, Rng};
    use super::*;
    use crate::ir::Node;

    fn node(op: &str, n: usize) -> Node {
        Node::new(
            "t",
            op,
            (0..n).map(|i| format!("x{i}")).collect(),
            vec!["y".into()],
        )
    }

    #[test]
    fn reduce_over_broadcast_dims() {
        let g = Tensor::from_f32(vec![2, 3], vec![1., 2., 3., 4., 5., 6.]).unwrap();
        let r = reduce_to_shape(&g, &[3]).unwrap();
        assert_eq!(r.as_f32().unwrap(), &[5., 7., 9.]);
        let r = reduce_to_shape(&g, &[2, 1]).unwrap();
        assert_eq!(r.as_f32().unwrap(), &[6., 15.]);
        let r = reduce_to_shape(&g, &[]).unwrap();
        assert_eq!(r.as_f32().unwrap(), &[21.]);
        let g = Tensor::from_f32(vec![2, 2, 2], (0..8).map(|v| v as f32).collect()).unwrap();
        let r = reduce_to_shape(&g, &[2, 1, 2]).unwrap();
        assert_eq!(r.as_f32().unwrap(), &[2., 4., 10., 12.]);
        let r = reduce_to_shape(&g, &[1, 2, 1]).unwrap();
        assert_eq!(r.as_f32().unwrap(), &[10., 18.]);
        assert!(reduce_to_shape(&g, &[3]).is_err());
    }

    #[test]
    fn binary_ops_with_broadcasting() {
        let mut rng = Rng::new(1);
        for op in ["Add", "Sub", "Mul", "Div"] {
            for (sa, sb) in [
                (vec![2, 3, 4], vec![2, 3, 4]),
                (vec![2, 3, 4], vec![4]),
                (vec![3, 1], vec![2, 1, 4]),
                (vec![1], vec![2, 3]),
            ] {
                let a = rng.tensor(&sa);
                // Keep divisors away from zero.
                let b = rng.away_from_zero(&sb, 0.5);
                check_node(
                    &node(op, 2),
                    13,
                    &[Some(a), Some(b)],
                    &[true, true],
                    1e-2,
                    2e-3,
                );
            }
        }
    }

    #[test]
    fn variadic_and_unary() {
        let mut rng = Rng::new(2);
        for op in ["Sum", "Mean"] {
            let inputs = vec![
                Some(rng.tensor(&[2, 3])),
                Some(rng.tensor(&[3])),
                Some(rng.tensor(&[2, 1])),
            ];
            check_node(&node(op, 3), 13, &inputs, &[true, true, true], 1e-2, 2e-3);
        }
        for op in ["Neg", "Exp", "Abs"] {
            let x = rng.away_from_zero(&[2, 5], 0.1);
            check_node(&node(op, 1), 13, &[Some(x)], &[true], 1e-2, 2e-3);
        }
        for op in ["Log", "Sqrt"] {
            let x = rng.tensor(&[7]);
            let pos = Tensor::from_f32(
                vec![7],
                x.as_f32().unwrap().iter().map(|v| v.abs() + 0.5).collect(),
            )
            .unwrap();
            check_node(&node(op, 1), 13, &[Some(pos)], &[true], 1e-3, 2e-3);
        }
    }
}
