//! Per-layer accounting of a model: shapes, parameters, multiply-accumulates and weight
//! statistics. MACs follow the usual conventions: a convolution costs
//! `H_out * W_out * (C_in / groups) * k_h * k_w * C_out` per image (depthwise: groups = C_in,
//! pointwise: k = 1), a fully connected layer `in * out`, a matmul `M * K * N` per batch item.

use std::collections::{HashMap, HashSet};

use serde::Serialize;

use crate::error::Result;
use crate::ir::{Dim, Model, Node, Tensor, TypeInfo};
use crate::passes::fold_shapes;

#[derive(Clone, Debug, Serialize)]
pub struct WeightStats {
    pub min: f32,
    pub max: f32,
    pub mean: f32,
    pub std: f32,
    /// Fraction of exact zeros.
    pub sparsity: f32,
}

impl WeightStats {
    pub fn of(values: &[f32]) -> WeightStats {
        let n = values.len().max(1) as f64;
        let (mut min, mut max, mut sum, mut zeros) =
            (f32::INFINITY, f32::NEG_INFINITY, 0f64, 0usize);
        for &v in values {
            min = min.min(v);
            max = max.max(v);
            sum += v as f64;
            zeros += (v == 0.0) as usize;
        }
        let mean = sum / n;
        let var = values
            .iter()
            .map(|&v| (v as f64 - mean).powi(2))
            .sum::<f64>()
            / n;
        WeightStats {
            min,
            max,
            mean: mean as f32,
            std: var.sqrt() as f32,
            sparsity: zeros as f32 / n as f32,
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct LayerStats {
    pub name: String,
    pub op_type: String,
    /// Kind of layer for reporting: "conv", "depthwise conv", "pointwise conv", "group conv", "fc", "matmul" or the op.
    pub kind: String,
    pub inputs: Vec<String>,
    pub outputs: Vec<String>,
    pub params: usize,
    pub macs: u64,
    pub weights: Option<WeightStats>,
}

#[derive(Clone, Debug, Serialize)]
pub struct ModelStats {
    pub layers: Vec<LayerStats>,
    pub total_params: usize,
    pub total_macs: u64,
    /// Bytes of all initializers as stored.
    pub weight_bytes: usize,
    /// Values assumed for symbolic input dimensions, e.g. `N=1`.
    pub assumed_dims: Vec<String>,
}

/// Analyses `model` with symbolic input dimensions set from `dims` (name -> size), others 1.
pub fn analyze(model: &Model, dims: &[(String, usize)]) -> Result<ModelStats> {
    let mut assumed = Vec::new();
    let mut fixed_inputs = Vec::new();
    for input in &model.graph.inputs {
        let Some(shape) = &input.ty.shape else {
            continue;
        };
        let concrete: Vec<usize> = shape
            .iter()
            .map(|d| match d {
                Dim::Known(n) => *n,
                Dim::Sym(s) => {
                    let v = dims.iter().find(|(k, _)| k == s).map_or(1, |(_, v)| *v);
                    let note = format!("{s}={v}");
                    if !assumed.contains(&note) {
                        assumed.push(note);
                    }
                    v
                }
                Dim::Unknown => 1,
            })
            .collect();
        fixed_inputs.push((input.name.clone(), concrete));
    }
    // Shapes come from a copy with fixed inputs and folded shape arithmetic; the layers listed
    // are the original model's, so the table matches the file.
    let (resolved, _) = fold_shapes(model, &fixed_inputs)?;
    let type_of = |name: &str| -> Option<TypeInfo> {
        resolved
            .graph
            .type_of(name)
            .or_else(|| model.graph.type_of(name))
    };

    let init = &model.graph.initializers;
    let mut counted: HashSet<&str> = HashSet::new();
    let mut layers = Vec::with_capacity(model.graph.nodes.len());
    for node in &model.graph.nodes {
        let shapes = |names: &[String]| -> Vec<String> {
            names
                .iter()
                .filter(|n| !n.is_empty())
                .map(|n| type_of(n).map_or_else(|| "?".to_string(), |t| t.to_string()))
                .collect()
        };
        let mut params = 0;
        for name in node.inputs.iter().filter(|n| !n.is_empty()) {
            if let Some(t) = init.get(name) {
                if t.dtype().is_float() && counted.insert(name.as_str()) {
                    params += t.numel();
                }
            }
        }
        let weights = weight_tensor(node, init).map(|t| WeightStats::of(&t.to_f32_vec()));
        let (kind, macs) = cost(node, &type_of, init);
        layers.push(LayerStats {
            name: node.display_name(),
            op_type: node.op_type.clone(),
            kind,
            inputs: shapes(&node.inputs),
            outputs: shapes(&node.outputs),
            params,
            macs,
            weights,
        });
    }
    Ok(ModelStats {
        total_params: layers.iter().map(|l| l.params).sum(),
        total_macs: layers.iter().map(|l| l.macs).sum(),
        weight_bytes: init.values().map(Tensor::size_in_bytes).sum(),
        layers,
        assumed_dims: assumed,
    })
}

/// The tensor whose statistics describe a layer: the weight of Conv/Gemm/MatMul, or the first
/// floating-point initializer of any other node.
fn weight_tensor<'a>(
    node: &Node,
    init: &'a std::collections::BTreeMap<String, Tensor>,
) -> Option<&'a Tensor> {
    let float_init = |i: usize| {
        node.input(i)
            .and_then(|n| init.get(n))
            .filter(|t| t.dtype().is_float())
    };
    match node.op_type.as_str() {
        "Conv" | "Gemm" | "ConvTranspose" => float_init(1),
        "MatMul" => float_init(1).or_else(|| float_init(0)),
        _ => (0..node.inputs.len())
            .find_map(float_init)
            .filter(|t| t.numel() > 1),
    }
}

fn dims_of(t: &Option<TypeInfo>) -> Option<Vec<usize>> {
    t.as_ref().and_then(TypeInfo::concrete_shape)
}

fn cost(
    node: &Node,
    type_of: &dyn Fn(&str) -> Option<TypeInfo>,
    init: &std::collections::BTreeMap<String, Tensor>,
) -> (String, u64) {
    let shape =
        |i: usize| -> Option<Vec<usize>> { node.input(i).and_then(|n| dims_of(&type_of(n))) };
    let out_shape = || node.outputs.first().and_then(|n| dims_of(&type_of(n)));
    match node.op_type.as_str() {
        "Conv" => {
            let (Some(w), Some(y)) = (shape(1), out_shape()) else {
                return ("conv".into(), 0);
            };
            let groups = node.attr_int_or("group", 1).unwrap_or(1).max(1) as usize;
            let cin = shape(0).and_then(|x| x.get(1).copied()).unwrap_or(0);
            let kernel: usize = w.iter().skip(2).product();
            let per_output: usize = w.get(1).copied().unwrap_or(0) * kernel;
            let macs = y.iter().product::<usize>() as u64 * per_output as u64;
            let kind = if groups > 1 && groups == cin && w[0] % groups == 0 {
                "depthwise conv"
            } else if groups > 1 {
                "group conv"
            } else if kernel == 1 {
                "pointwise conv"
            } else {
                "conv"
            };
            (kind.into(), macs)
        }
        "Gemm" => {
            let (Some(a), Some(y)) = (shape(0), out_shape()) else {
                return ("fc".into(), 0);
            };
            let trans_a = node.attr_int_or("transA", 0).unwrap_or(0) != 0;
            let k = if trans_a { a.first() } else { a.get(1) }
                .copied()
                .unwrap_or(0);
            ("fc".into(), y.iter().product::<usize>() as u64 * k as u64)
        }
        "MatMul" => {
            let (Some(a), Some(y)) = (shape(0), out_shape()) else {
                return ("matmul".into(), 0);
            };
            let k = a.last().copied().unwrap_or(0);
            let weight_is_constant = node.input(1).is_some_and(|n| init.contains_key(n));
            let kind = if weight_is_constant { "fc" } else { "matmul" };
            (kind.into(), y.iter().product::<usize>() as u64 * k as u64)
        }
        _ => (node.op_type.clone(), 0),
    }
}

/// Per-op-type totals, useful for summaries.
pub fn macs_by_kind(stats: &ModelStats) -> Vec<(String, u64)> {
    let mut by: HashMap<&str, u64> = HashMap::new();
    for l in &stats.layers {
        *by.entry(l.kind.as_str()).or_default() += l.macs;
    }
    let mut v: Vec<(String, u64)> = by
        .into_iter()
        .filter(|(_, m)| *m > 0)
        .map(|(k, m)| (k.to_string(), m))
        .collect();
    v.sort_by_key(|e| std::cmp::Reverse(e.1));
    v
}
