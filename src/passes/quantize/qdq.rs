//! The QDQ form: weights stored quantized and decoded by DequantizeLinear (per axis) or a
//! codebook Gather; every quantized activation passes through QuantizeLinear ->
//! DequantizeLinear, which every reader of the tensor then sees. Biases stay f32.

use std::collections::{BTreeMap, HashSet};

use super::edit::{
    act_param_inits, add_init, dequantize_node, lookup_nodes, quantize_nodes, zero_point_tensor,
    ActParams,
};
use super::plan::Plan;
use super::weights::{Encoded, EncodedWeight};
use crate::error::Result;
use crate::ir::{Attr, DType, Graph, Model, Node, Tensor};

/// Replaces the f32 initializer `weight` by its encoding and the nodes that decode it under
/// the original name.
pub fn decode_weight(g: &mut Graph, weight: &str, enc: &EncodedWeight) -> Result<Vec<Node>> {
    g.initializers.remove(weight);
    Ok(match &enc.enc {
        Encoded::Linear {
            codes,
            scales,
            zero_points,
            axis,
        } => {
            let q = add_init(g, &format!("{weight}_quantized"), codes.clone());
            let per_tensor = axis.is_none();
            let s = if per_tensor {
                Tensor::scalar_f32(scales[0])
            } else {
                Tensor::from_f32(vec![scales.len()], scales.clone())?
            };
            let s = add_init(g, &format!("{weight}_scale"), s);
            let z = add_init(
                g,
                &format!("{weight}_zero_point"),
                zero_point_tensor(DType::I8, zero_points, per_tensor)?,
            );
            let mut dq = dequantize_node(g, &q, weight, &s, &z);
            if let Some(a) = axis {
                dq = dq.with_attr("axis", Attr::Int(*a as i64));
            }
            vec![dq]
        }
        Encoded::Codebook { codes, table } => {
            let c = add_init(g, &format!("{weight}_codes"), codes.clone());
            let t = add_init(
                g,
                &format!("{weight}_codebook"),
                Tensor::from_f32(vec![table.len()], table.clone())?,
            );
            lookup_nodes(g, &c, &t, weight)
        }
    })
}

pub fn build(
    model: &Model,
    plan: &Plan,
    acts: &BTreeMap<String, ActParams>,
    weights: &BTreeMap<String, EncodedWeight>,
) -> Result<Model> {
    let mut out = model.clone();
    let g = &mut out.graph;
    let mut new_nodes = Vec::new();
    for t in &plan.targets {
        if let Some(enc) = weights.get(&t.name) {
            if g.initializers.contains_key(&t.weight) {
                new_nodes.extend(decode_weight(g, &t.weight, enc)?);
            }
        }
    }
    let graph_outputs: HashSet<String> = g.outputs.iter().map(|v| v.name.clone()).collect();
    for tensor in &plan.tensors {
        let Some(p) = acts.get(tensor) else { continue };
        if graph_outputs.contains(tensor) {
            continue;
        }
        let (s, z) = act_param_inits(g, tensor, p)?;
        let q = g.fresh_name(&format!("{tensor}_quantized"));
        let dq = g.fresh_name(&format!("{tensor}_dequantized"));
        for n in g.nodes.iter_mut() {
            for i in n.inputs.iter_mut() {
                if i == tensor {
                    *i = dq.clone();
                }
            }
        }
        let qn = quantize_nodes(g, tensor, &q, p, &s, &z);
        new_nodes.extend(qn);
        let d = dequantize_node(g, &q, &dq, &s, &z);
        new_nodes.push(d);
    }
    g.nodes.extend(new_nodes);
    g.topo_sort()?;
    g.prune_unused_initializers();
    Ok(out)
}
