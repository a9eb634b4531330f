//! Folds inference-mode BatchNormalization into the Conv or Gemm that feeds it:
//! with s = gamma / sqrt(var + eps), W' = W * s per output channel and b' = (b - mean) * s + beta.

use super::PassReport;
use crate::error::Result;
use crate::ir::{Attr, Model, Node, Tensor};

struct BnParams {
    scale: Vec<f32>,
    shift: Vec<f32>,
}

fn bn_params(model: &Model, bn: &Node) -> Result<Option<BnParams>> {
    let init = &model.graph.initializers;
    let get = |i: usize| {
        bn.input(i)
            .and_then(|n| init.get(n))
            .map(Tensor::to_f32_vec)
    };
    let (Some(gamma), Some(beta), Some(mean), Some(var)) = (get(1), get(2), get(3), get(4)) else {
        return Ok(None);
    };
    let n = gamma.len();
    if [beta.len(), mean.len(), var.len()].iter().any(|&l| l != n) {
        return Ok(None);
    }
    if bn.attr_int_or("training_mode", 0)? != 0 || bn.outputs.iter().skip(1).any(|o| !o.is_empty())
    {
        return Ok(None);
    }
    let eps = bn.attr_float_or("epsilon", 1e-5)?;
    let scale: Vec<f32> = gamma
        .iter()
        .zip(&var)
        .map(|(g, v)| g / (v + eps).sqrt())
        .collect();
    let shift = (0..n).map(|c| beta[c] - mean[c] * scale[c]).collect();
    Ok(Some(BnParams { scale, shift }))
}

pub fn fold_batchnorm(model: &Model) -> Result<(Model, PassReport)> {
    let mut out = model.clone();
    let before = out.graph.nodes.len();
    let uses = out.graph.use_counts();
    let mut folded = 0;
    let mut i = 0;
    while i < out.graph.nodes.len() {
        let bn = &out.graph.nodes[i];
        if bn.op_type != "BatchNormalization" || !bn.domain.is_empty() {
            i += 1;
            continue;
        }
        let Some(src) = bn.input(0).map(str::to_string) else {
            i += 1;
            continue;
        };
        let Some(p) = out.graph.producer(&src) else {
            i += 1;
            continue;
        };
        let single_use =
            uses.get(&src) == Some(&1) && !out.graph.outputs.iter().any(|o| o.name == src);
        let op = out.graph.nodes[p].op_type.clone();
        if !single_use || !matches!(op.as_str(), "Conv" | "Gemm") {
            i += 1;
            continue;
        }
        let Some(params) = bn_params(&out, bn)? else {
            i += 1;
            continue;
        };
        let bn_out = bn.outputs[0].clone();
        let done = if op == "Conv" {
            fold_into_conv(&mut out, p, &params)?
        } else {
            fold_into_gemm(&mut out, p, &params)?
        };
        if done {
            out.graph.nodes[p].outputs[0] = bn_out;
            out.graph.nodes.remove(i);
            out.graph.value_info.remove(&src);
            folded += 1;
        } else {
            i += 1;
        }
    }
    out.graph.prune_unused_initializers();
    let report = PassReport::new("fold-batchnorm", before, out.graph.nodes.len()).note(format!(
        "{folded} BatchNormalization nodes folded into Conv/Gemm"
    ));
    Ok((out, report))
}

/// Stores a rewritten weight under a fresh name, so weights shared with other nodes stay intact.
fn put(model: &mut Model, base: &str, t: Tensor) -> String {
    let name = model.graph.fresh_name(base);
    model.graph.initializers.insert(name.clone(), t);
    name
}

fn fold_into_conv(model: &mut Model, p: usize, bn: &BnParams) -> Result<bool> {
    let conv = &model.graph.nodes[p];
    let Some(w) = conv.input(1).and_then(|n| model.graph.initializers.get(n)) else {
        return Ok(false);
    };
    let cout = w.shape().first().copied().unwrap_or(0);
    if cout != bn.scale.len() || w.dtype() != crate::ir::DType::F32 {
        return Ok(false);
    }
    let per = w.numel() / cout.max(1);
    let mut wv = w.to_f32_vec();
    for (c, chunk) in wv.chunks_mut(per).enumerate() {
        chunk.iter_mut().for_each(|x| *x *= bn.scale[c]);
    }
    let old_bias = match conv.input(2) {
        Some(b) => match model.graph.initializers.get(b) {
            Some(t) if t.numel() == cout => t.to_f32_vec(),
            _ => return Ok(false),
        },
        None => vec![0.0; cout],
    };
    let bias: Vec<f32> = (0..cout)
        .map(|c| old_bias[c] * bn.scale[c] + bn.shift[c])
        .collect();
    let w_shape = w.shape().to_vec();
    let base = conv.display_name();
    let w_name = put(
        model,
        &format!("{base}.weight_bn"),
        Tensor::from_f32(w_shape, wv)?,
    );
    let b_name = put(
        model,
        &format!("{base}.bias_bn"),
        Tensor::from_f32(vec![cout], bias)?,
    );
    let conv = &mut model.graph.nodes[p];
    conv.inputs.resize(3, String::new());
    conv.inputs[1] = w_name;
    conv.inputs[2] = b_name;
    Ok(true)
}

fn fold_into_gemm(model: &mut Model, p: usize, bn: &BnParams) -> Result<bool> {
    let gemm = &model.graph.nodes[p];
    let Some(b) = gemm.input(1).and_then(|n| model.graph.initializers.get(n)) else {
        return Ok(false);
    };
    if b.rank() != 2 || b.dtype() != crate::ir::DType::F32 {
        return Ok(false);
    }
    let trans_b = gemm.attr_int_or("transB", 0)? != 0;
    let alpha = gemm.attr_float_or("alpha", 1.0)?;
    let beta = gemm.attr_float_or("beta", 1.0)?;
    let (k, n) = if trans_b {
        (b.shape()[1], b.shape()[0])
    } else {
        (b.shape()[0], b.shape()[1])
    };
    if n != bn.scale.len() {
        return Ok(false);
    }
    let old_c = match gemm.input(2) {
        Some(c) => match model.graph.initializers.get(c) {
            Some(t) if t.numel() == n && t.shape().iter().rev().skip(1).all(|&d| d == 1) => {
                t.to_f32_vec()
            }
            Some(t) if t.numel() == 1 => vec![t.to_f32_vec()[0]; n],
            _ => return Ok(false),
        },
        None => vec![0.0; n],
    };
    // Fold alpha into the weights too, so the rewritten Gemm is a plain A*B' + C'.
    let mut bv = b.to_f32_vec();
    for r in 0..k {
        for c in 0..n {
            let idx = if trans_b { c * k + r } else { r * n + c };
            bv[idx] *= alpha * bn.scale[c];
        }
    }
    let c_new: Vec<f32> = (0..n)
        .map(|c| beta * old_c[c] * bn.scale[c] + bn.shift[c])
        .collect();
    let b_shape = b.shape().to_vec();
    let base = gemm.display_name();
    let b_name = put(
        model,
        &format!("{base}.weight_bn"),
        Tensor::from_f32(b_shape, bv)?,
    );
    let c_name = put(
        model,
        &format!("{base}.bias_bn"),
        Tensor::from_f32(vec![n], c_new)?,
    );
    let gemm = &mut model.graph.nodes[p];
    gemm.inputs.resize(3, String::new());
    gemm.inputs[1] = b_name;
    gemm.inputs[2] = c_name;
    gemm.attrs.insert("alpha".into(), Attr::Float(1.0));
    gemm.attrs.insert("beta".into(), Attr::Float(1.0));
    Ok(true)
}
