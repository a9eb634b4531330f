//! `BatchNormalization` (opsets 9-21) while training, and its backward.
//!
//! The training forward normalises each channel with the batch mean and (biased) variance,
//! keeps both for the backward, and moves the running averages the inference graph uses:
//! `running = momentum * running + (1 - momentum) * batch`, with the unbiased batch variance
//! as PyTorch does. The backward is the usual
//! `dx = scale * invstd / M * (M g - sum(g) - xhat * sum(g xhat))` over the `M` values of a
//! channel. When the forward ran in inference mode (a frozen BatchNorm), the normalisation is
//! a fixed affine map and so is its gradient.

use rayon::prelude::*;

use super::{f32_tensor, f32s, GradCtx, TrainForward, TrainForwardCtx};
use crate::error::Result;
use crate::ir::{DType, Node, Tensor};
use crate::ops::node_error;

/// `(n, c, spatial)` of an `[N, C, ...]` input.
fn dims(node: &Node, x: &Tensor) -> Result<(usize, usize, usize)> {
    let s = x.shape();
    if s.len() < 2 {
        return Err(node_error(
            node,
            format!("input of shape {s:?} has no channel axis"),
        ));
    }
    Ok((s[0], s[1], s[2..].iter().product()))
}

fn param<'a>(node: &Node, inputs: &[Option<&'a Tensor>], i: usize, c: usize) -> Result<&'a [f32]> {
    let t = inputs
        .get(i)
        .copied()
        .flatten()
        .ok_or_else(|| node_error(node, format!("input {i} is missing")))?;
    match t.as_f32() {
        Ok(v) if v.len() == c => Ok(v),
        _ => Err(node_error(
            node,
            format!(
                "input {i} must be {c} f32 values, got {} {:?}",
                t.dtype(),
                t.shape()
            ),
        )),
    }
}

/// Per channel `(sum, sum of squares about the mean)`, in f64.
fn channel_moments(x: &[f32], (n, c, s): (usize, usize, usize)) -> Vec<(f64, f64)> {
    (0..c)
        .into_par_iter()
        .map(|ch| {
            let planes = (0..n).map(|i| &x[(i * c + ch) * s..(i * c + ch + 1) * s]);
            let sum: f64 = planes
                .clone()
                .map(|p| p.iter().map(|&v| v as f64).sum::<f64>())
                .sum();
            let mean = sum / (n * s).max(1) as f64;
            let sq: f64 = planes
                .map(|p| p.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>())
                .sum();
            (mean, sq)
        })
        .collect()
}

pub fn train_forward(ctx: &TrainForwardCtx) -> Result<TrainForward> {
    let node = ctx.node;
    let x = ctx
        .inputs
        .first()
        .copied()
        .flatten()
        .filter(|t| t.dtype() == DType::F32)
        .ok_or_else(|| node_error(node, "input 0 must be an f32 tensor"))?;
    let (n, c, s) = dims(node, x)?;
    let scale = param(node, ctx.inputs, 1, c)?;
    let bias = param(node, ctx.inputs, 2, c)?;
    let run_mean = param(node, ctx.inputs, 3, c)?;
    let run_var = param(node, ctx.inputs, 4, c)?;
    let eps = node.attr_float_or("epsilon", 1e-5)? as f64;
    let momentum = node.attr_float_or("momentum", 0.9)?;
    let m = n * s;
    if m == 0 {
        return Err(node_error(
            node,
            "cannot take batch statistics of an empty batch",
        ));
    }
    let xv = f32s(x);
    let moments = channel_moments(xv, (n, c, s));
    let mean: Vec<f32> = moments.iter().map(|&(mu, _)| mu as f32).collect();
    let invstd: Vec<f32> = moments
        .iter()
        .map(|&(_, sq)| (1.0 / (sq / m as f64 + eps).sqrt()) as f32)
        .collect();
    let mut y = vec![0.0f32; xv.len()];
    y.par_chunks_mut(s.max(1))
        .zip(xv.par_chunks(s.max(1)))
        .enumerate()
        .for_each(|(p, (dst, src))| {
            let ch = p % c;
            let a = scale[ch] * invstd[ch];
            let b = bias[ch] - mean[ch] * a;
            for (d, &v) in dst.iter_mut().zip(src) {
                *d = v * a + b;
            }
        });
    let unbias = if m > 1 {
        m as f64 / (m - 1) as f64
    } else {
        1.0
    };
    let new_mean: Vec<f32> = run_mean
        .iter()
        .zip(&mean)
        .map(|(&r, &b)| momentum * r + (1.0 - momentum) * b)
        .collect();
    let new_var: Vec<f32> = run_var
        .iter()
        .zip(&moments)
        .map(|(&r, &(_, sq))| momentum * r + (1.0 - momentum) * (sq / m as f64 * unbias) as f32)
        .collect();
    let mut outputs = vec![f32_tensor(x.shape(), y)?];
    let new_mean = f32_tensor(&[c], new_mean)?;
    let new_var = f32_tensor(&[c], new_var)?;
    // Training-mode graphs may ask for the updated running statistics as outputs.
    if node.outputs.len() > 1 {
        outputs.push(new_mean.clone());
    }
    if node.outputs.len() > 2 {
        outputs.push(new_var.clone());
    }
    Ok(TrainForward {
        outputs,
        saved: vec![f32_tensor(&[c], mean)?, f32_tensor(&[c], invstd)?],
        updates: vec![(3, new_mean), (4, new_var)],
    })
}

pub fn grad(ctx: &GradCtx) -> Result<Vec<Option<Tensor>>> {
    let node = ctx.node;
    let x = ctx.input(0)?;
    let (n, c, s) = dims(node, x)?;
    let scale = param(node, ctx.inputs, 1, c)?;
    let training = ctx.saved.len() == 2;
    let (mean, invstd): (Vec<f32>, Vec<f32>) = if training {
        (f32s(&ctx.saved[0]).to_vec(), f32s(&ctx.saved[1]).to_vec())
    } else {
        let eps = node.attr_float_or("epsilon", 1e-5)?;
        let var = param(node, ctx.inputs, 4, c)?;
        (
            param(node, ctx.inputs, 3, c)?.to_vec(),
            var.iter().map(|&v| 1.0 / (v + eps).sqrt()).collect(),
        )
    };
    let g = ctx.grad_or_zeros(0)?;
    let (xv, gv) = (f32s(x), f32s(&g));
    // Per channel: sum(g) and sum(g * xhat).
    let sums: Vec<(f64, f64)> = (0..c)
        .into_par_iter()
        .map(|ch| {
            let (mut sg, mut sgx) = (0.0f64, 0.0f64);
            for i in 0..n {
                let r = (i * c + ch) * s..(i * c + ch + 1) * s;
                for (&gg, &xx) in gv[r.clone()].iter().zip(&xv[r]) {
                    sg += gg as f64;
                    sgx += gg as f64 * ((xx - mean[ch]) * invstd[ch]) as f64;
                }
            }
            (sg, sgx)
        })
        .collect();
    let mut out = vec![None; ctx.inputs.len().max(3)];
    if ctx.wants(0) {
        let m = (n * s) as f32;
        let mut dx = vec![0.0f32; xv.len()];
        dx.par_chunks_mut(s.max(1))
            .enumerate()
            .for_each(|(p, dst)| {
                let ch = p % c;
                let r = p * s..(p + 1) * s;
                let k = scale[ch] * invstd[ch];
                if training {
                    let (sg, sgx) = (sums[ch].0 as f32 / m, sums[ch].1 as f32 / m);
                    for ((d, &gg), &xx) in dst.iter_mut().zip(&gv[r.clone()]).zip(&xv[r]) {
                        let xhat = (xx - mean[ch]) * invstd[ch];
                        *d = k * (gg - sg - xhat * sgx);
                    }
                } else {
                    for (d, &gg) in dst.iter_mut().zip(&gv[r]) {
                        *d = k * gg;
                    }
                }
            });
        out[0] = Some(f32_tensor(x.shape(), dx)?);
    }
    if ctx.wants(1) {
        out[1] = Some(f32_tensor(&[c], sums.iter().map(|s| s.1 as f32).collect())?);
    }
    if ctx.wants(2) {
        out[2] = Some(f32_tensor(&[c], sums.iter().map(|s| s.0 as f32).collect())?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::super::check::{check_node, Rng};
    use super::*;
    use crate::ops::grad::TrainForwardCtx;

    fn bn() -> Node {
        Node::new(
            "bn",
            "BatchNormalization",
            ["x", "s", "b", "m", "v"]
                .iter()
                .map(|s| s.to_string())
                .collect(),
            vec!["y".into()],
        )
    }

    #[test]
    fn training_mode_matches_finite_differences() {
        let mut rng = Rng::new(61);
        for shape in [vec![4, 3, 2, 3], vec![5, 2]] {
            let c = shape[1];
            let x = rng.tensor(&shape);
            let s = rng.away_from_zero(&[c], 0.5);
            let b = rng.tensor(&[c]);
            let m = rng.tensor(&[c]);
            let v = Tensor::from_f32(vec![c], vec![1.5; c]).unwrap();
            check_node(
                &bn(),
                15,
                &[Some(x), Some(s), Some(b), Some(m), Some(v)],
                &[true, true, true],
                1e-2,
                2e-3,
            );
        }
    }

    #[test]
    fn running_statistics_move_towards_the_batch() {
        let x = Tensor::from_f32(vec![4, 1], vec![1.0, 2.0, 3.0, 6.0]).unwrap();
        let one = Tensor::from_f32(vec![1], vec![1.0]).unwrap();
        let zero = Tensor::from_f32(vec![1], vec![0.0]).unwrap();
        let node = bn().with_attr("momentum", crate::ir::Attr::Float(0.5));
        let out = train_forward(&TrainForwardCtx {
            node: &node,
            opset: 15,
            inputs: &[Some(&x), Some(&one), Some(&zero), Some(&zero), Some(&one)],
            seed: 0,
        })
        .unwrap();
        let y = out.outputs[0].as_f32().unwrap();
        assert!(y.iter().sum::<f32>().abs() < 1e-5);
        // Batch mean 3, biased var 3.5, unbiased 14/3.
        assert_eq!(out.updates[0].1.as_f32().unwrap(), &[1.5]);
        assert!((out.updates[1].1.as_f32().unwrap()[0] - (0.5 + 0.5 * 14.0 / 3.0)).abs() < 1e-5);
    }
}
