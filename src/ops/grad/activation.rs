//! Backward of the pointwise activations: `Relu`, `LeakyRelu`, `Clip` (ReLU6 included),
//! `Sigmoid`, `HardSigmoid`, `HardSwish`, `Tanh`. At a kink the gradient is the one-sided
//! value PyTorch uses (ReLU passes nothing at 0; Clip passes only strictly inside its range).

use rayon::prelude::*;

use super::{f32_tensor, f32s, GradCtx};
use crate::error::Result;
use crate::ir::Tensor;

/// Elements per parallel chunk.
const CHUNK: usize = 1 << 14;

/// `dx[i] = f(g[i], x[i], y[i])` over all elements, in parallel chunks.
fn map3(g: &[f32], x: &[f32], y: &[f32], f: impl Fn(f32, f32, f32) -> f32 + Sync) -> Vec<f32> {
    let mut out = vec![0.0f32; g.len()];
    out.par_chunks_mut(CHUNK)
        .zip(g.par_chunks(CHUNK))
        .zip(x.par_chunks(CHUNK))
        .zip(y.par_chunks(CHUNK))
        .for_each(|(((o, g), x), y)| {
            for (((o, &g), &x), &y) in o.iter_mut().zip(g).zip(x).zip(y) {
                *o = f(g, x, y);
            }
        });
    out
}

/// The scalar Clip bound given as input `i`, or `default` when omitted.
fn bound(ctx: &GradCtx, i: usize, default: f32) -> Result<f32> {
    match ctx.inputs.get(i).copied().flatten() {
        None => Ok(default),
        Some(t) => t
            .to_f32_vec()
            .first()
            .copied()
            .ok_or_else(|| ctx.error(format!("Clip bound {i} is empty"))),
    }
}

pub fn grad(ctx: &GradCtx) -> Result<Vec<Option<Tensor>>> {
    let n_in = ctx.inputs.len();
    let mut out: Vec<Option<Tensor>> = vec![None; n_in];
    if !ctx.wants(0) {
        return Ok(out);
    }
    let g = ctx.grad_or_zeros(0)?;
    let x = f32s(ctx.input(0)?);
    let y = f32s(ctx.output(0)?);
    let node = ctx.node;
    let gv = f32s(&g);
    let d = match node.op_type.as_str() {
        "Relu" => map3(gv, x, y, |g, _, y| if y > 0.0 { g } else { 0.0 }),
        "LeakyRelu" => {
            let alpha = node.attr_float_or("alpha", 0.01)?;
            map3(gv, x, y, move |g, x, _| if x > 0.0 { g } else { alpha * g })
        }
        "Clip" => {
            let (lo, hi) = (
                bound(ctx, 1, f32::NEG_INFINITY)?,
                bound(ctx, 2, f32::INFINITY)?,
            );
            map3(
                gv,
                x,
                y,
                move |g, x, _| if x > lo && x < hi { g } else { 0.0 },
            )
        }
        "Sigmoid" => map3(gv, x, y, |g, _, y| g * y * (1.0 - y)),
        "Tanh" => map3(gv, x, y, |g, _, y| g * (1.0 - y * y)),
        "HardSigmoid" => {
            let alpha = node.attr_float_or("alpha", 0.2)?;
            let beta = node.attr_float_or("beta", 0.5)?;
            map3(gv, x, y, move |g, x, _| {
                let t = alpha * x + beta;
                if t > 0.0 && t < 1.0 {
                    g * alpha
                } else {
                    0.0
                }
            })
        }
        _ => map3(gv, x, y, |g, x, _| {
            // HardSwish: x * clamp(x/6 + 1/2, 0, 1).
            if x <= -3.0 {
                0.0
            } else if x >= 3.0 {
                g
            } else {
                g * (x / 3.0 + 0.5)
            }
        }),
    };
    out[0] = Some(f32_tensor(g.shape(), d)?);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::super::check::{check_node, Rng};
    use crate::ir::{Attr, Node, Tensor};

    #[test]
    fn activations_match_finite_differences() {
        let mut rng = Rng::new(5);
        for op in [
            "Relu",
            "LeakyRelu",
            "Sigmoid",
            "Tanh",
            "HardSigmoid",
            "HardSwish",
        ] {
            // Values in ±[0.05, 4.05): both sides of every kink, none within eps of one.
            let x = rng.away_from_zero(&[3, 17], 0.05);
            let x = Tensor::from_f32(
                vec![3, 17],
                x.as_f32()
                    .unwrap()
                    .iter()
                    .map(|v| {
                        let s = v * 4.0;
                        // HardSwish kinks at ±3, HardSigmoid at ±2.5.
                        if (s.abs() - 3.0).abs() < 0.05 || (s.abs() - 2.5).abs() < 0.05 {
                            s + 0.2
                        } else {
                            s
                        }
                    })
                    .collect(),
            )
            .unwrap();
            let mut node = Node::new("a", op, vec!["x".into()], vec!["y".into()]);
            if op == "LeakyRelu" {
                node = node.with_attr("alpha", Attr::Float(0.1));
            }
            check_node(&node, 14, &[Some(x)], &[true], 1e-2, 2e-3);
        }
    }

    #[test]
    fn clip_as_relu6_and_one_sided() {
        let x = Tensor::from_f32(vec![8], vec![-2.0, -0.5, 0.3, 2.0, 5.5, 6.4, 9.0, 3.3]).unwrap();
        let lo = Tensor::scalar_f32(0.0);
        let hi = Tensor::scalar_f32(6.0);
        let node = Node::new(
            "c",
            "Clip",
            vec!["x".into(), "lo".into(), "hi".into()],
            vec!["y".into()],
        );
        check_node(
            &node,
            13,
            &[Some(x.clone()), Some(lo), Some(hi)],
            &[true],
            1e-2,
            2e-3,
        );
        let node = Node::new(
            "c",
            "Clip",
            vec!["x".into(), "".into(), "hi".into()],
            vec!["y".into()],
        );
        check_node(
            &node,
            13,
            &[Some(x), None, Some(Tensor::scalar_f32(6.0))],
            &[true],
            1e-2,
            2e-3,
        );
    }
}
