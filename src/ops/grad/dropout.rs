//! `Dropout` (opsets 7-21) while training, and its backward. Each element is kept with
//! probability `1 - ratio` and scaled by `1 / (1 - ratio)`; the mask is a counter-based hash
//! of the step seed and the element index, so it is the same on any number of threads.
//! At inference Dropout stays the identity (the ordinary kernel).

use rayon::prelude::*;

use super::{f32_tensor, f32s, GradCtx, TrainForward, TrainForwardCtx};
use crate::error::Result;
use crate::ir::{DType, Tensor, TensorData};
use crate::ops::node_error;

const CHUNK: usize = 1 << 14;

/// SplitMix64 finaliser: a well-mixed 64-bit hash of `x`.
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// The scaled keep-mask of `len` elements: `1 / (1 - ratio)` where kept, 0 where dropped.
pub fn dropout_mask(seed: u64, len: usize, ratio: f32) -> Vec<f32> {
    let keep = 1.0 - ratio as f64;
    let threshold = (keep * (1u64 << 53) as f64) as u64;
    let scale = (1.0 / keep) as f32;
    let base = mix(seed);
    let mut mask = vec![0.0f32; len];
    mask.par_chunks_mut(CHUNK).enumerate().for_each(|(c, m)| {
        for (i, v) in m.iter_mut().enumerate() {
            let h = mix(base ^ (c * CHUNK + i) as u64) >> 11;
            *v = if h < threshold { scale } else { 0.0 };
        }
    });
    mask
}

fn ratio(ctx: &TrainForwardCtx) -> Result<f32> {
    let r = if ctx.opset >= 12 {
        match ctx.inputs.get(1).copied().flatten() {
            Some(t) => t
                .to_f32_vec()
                .first()
                .copied()
                .ok_or_else(|| node_error(ctx.node, "ratio input is empty"))?,
            None => 0.5,
        }
    } else {
        ctx.node.attr_float_or("ratio", 0.5)?
    };
    if !(0.0..1.0).contains(&r) {
        return Err(node_error(
            ctx.node,
            format!("dropout ratio {r} must be in [0, 1)"),
        ));
    }
    Ok(r)
}

pub fn train_forward(ctx: &TrainForwardCtx) -> Result<TrainForward> {
    let x = ctx
        .inputs
        .first()
        .copied()
        .flatten()
        .filter(|t| t.dtype() == DType::F32)
        .ok_or_else(|| node_error(ctx.node, "input 0 must be an f32 tensor"))?;
    let r = ratio(ctx)?;
    let mask = dropout_mask(ctx.seed, x.numel(), r);
    let y: Vec<f32> = f32s(x).iter().zip(&mask).map(|(&v, &m)| v * m).collect();
    let mut outputs = vec![f32_tensor(x.shape(), y)?];
    if ctx.node.outputs.len() > 1 {
        let keep: Vec<bool> = mask.iter().map(|&m| m != 0.0).collect();
        outputs.push(Tensor::new(x.shape().to_vec(), TensorData::Bool(keep))?);
    }
    Ok(TrainForward {
        outputs,
        saved: vec![f32_tensor(x.shape(), mask)?],
        updates: vec![],
    })
}

pub fn grad(ctx: &GradCtx) -> Result<Vec<Option<Tensor>>> {
    let mut out = vec![None; ctx.inputs.len().max(1)];
    if !ctx.wants(0) {
        return Ok(out);
    }
    let g = ctx.grad_or_zeros(0)?;
    let d = match ctx.saved.first() {
        // Inference-mode forward: the identity.
        None => g.into_owned(),
        Some(mask) => {
            let v = f32s(&g)
                .iter()
                .zip(f32s(mask))
                .map(|(&a, &m)| a * m)
                .collect();
            f32_tensor(g.shape(), v)?
        }
    };
    out[0] = Some(d);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::super::check::{check_node, Rng};
    use super::*;
    use crate::ir::{Attr, Node};

    #[test]
    fn mask_rate_and_scale() {
        let m = dropout_mask(3, 100_000, 0.25);
        let kept = m.iter().filter(|&&v| v != 0.0).count() as f64 / 1e5;
        assert!((kept - 0.75).abs() < 0.01, "{kept}");
        assert!(m.iter().all(|&v| v == 0.0 || (v - 1.0 / 0.75).abs() < 1e-6));
        assert_eq!(m, dropout_mask(3, 100_000, 0.25));
        assert_ne!(m, dropout_mask(4, 100_000, 0.25));
    }

    #[test]
    fn dropout_matches_finite_differences() {
        let mut rng = Rng::new(71);
        let x = rng.tensor(&[4, 9]);
        let node = Node::new(
            "d",
            "Dropout",
            vec!["x".into(), "r".into()],
            vec!["y".into()],
        );
        check_node(
            &node,
            13,
            &[Some(x.clone()), Some(Tensor::scalar_f32(0.3))],
            &[true],
            1e-2,
            2e-3,
        );
        let old = Node::new(
            "d",
            "Dropout",
            vec!["x".into()],
            vec!["y".into(), "mask".into()],
        )
        .with_attr("ratio", Attr::Float(0.5));
        check_node(&old, 10, &[Some(x)], &[true], 1e-2, 1e-3);
    }
}
