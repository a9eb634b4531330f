//! The QOperator form, for integer-only execution: Conv -> `QLinearConv`, MatMul ->
//! `QLinearMatMul`, Gemm -> `Reshape` + 1x1 `QLinearConv` + `Reshape` (standard ONNX with an
//! i32 bias in scale `s_x s_w` and per-channel weights, which ONNX Runtime runs; QLinearMatMul
//! has no bias). A ReLU after a quantized node is folded into its output range (`[0, max]`,
//! zero point at the grid's bottom, so the clamp is the ReLU).
//!
//! Between quantized nodes tensors stay u8. Ops with no integer form run in f32 between
//! DequantizeLinear and QuantizeLinear; optionally, when that op is a pointwise activation
//! between two quantized tensors (HardSwish, Sigmoid, ...), the three nodes become a 256-entry
//! lookup table (`Cast` + `Gather`): exact whatever the runtime's activation code, though a
//! generic Gather is slower than the elementwise ops in lithe and ONNX Runtime today.

use std::collections::{BTreeMap, HashMap, HashSet};

use super::edit::{
    act_param_inits, add_init, dequantize_node, node, quantize_nodes, remove_dead_nodes,
    zero_point_tensor, ActParams,
};
use super::plan::{is_pass_through, Plan};
use super::weights::{Encoded, EncodedWeight};
use crate::error::{Error, Result};
use crate::ir::{Attr, DType, Graph, Model, Node, Tensor, TensorData};
use crate::kernels::activation::Activation;

/// i32 bias in the accumulator's scale, as ONNX Runtime's quantizer computes it (f32
/// arithmetic, round half to even).
fn quantize_bias(b: &[f32], x_scale: f32, w_scales: &[f32]) -> Vec<i32> {
    b.iter()
        .enumerate()
        .map(|(c, &v)| {
            let s = x_scale * w_scales[if w_scales.len() == 1 { 0 } else { c }];
            let q = (v / s).round_ties_even();
            q.clamp(i32::MIN as f32, i32::MAX as f32) as i32
        })
        .collect()
}

fn transpose_i8(codes: &Tensor) -> Result<Tensor> {
    let &[k, n] = codes.shape() else {
        return Err(Error::Shape("expected a 2-D weight".into()));
    };
    let TensorData::I8(v) = codes.data() else {
        return Err(Error::DType("expected i8 codes".into()));
    };
    let mut t = vec![0i8; k * n];
    for i in 0..k {
        for j in 0..n {
            t[j * k + i] = v[i * n + j];
        }
    }
    Tensor::new(vec![n, k], TensorData::I8(t))
}

const CONV_ATTRS: [&str; 6] = [
    "auto_pad",
    "dilations",
    "group",
    "kernel_shape",
    "pads",
    "strides",
];

pub fn build(
    model: &Model,
    plan: &Plan,
    acts: &BTreeMap<String, ActParams>,
    weights: &BTreeMap<String, EncodedWeight>,
    lookup_tables: bool,
) -> Result<Model> {
    let mut out = model.clone();
    let g = &mut out.graph;
    let mut qname: HashMap<String, String> = HashMap::new();
    for t in &plan.tensors {
        qname.insert(t.clone(), g.fresh_name(&format!("{t}_quantized")));
    }
    let mut remove: HashSet<usize> = HashSet::new();
    let mut new_nodes: Vec<Node> = Vec::new();
    let mut produced_quantized: HashSet<String> = HashSet::new();
    let mut param_names: HashMap<String, (String, String)> = HashMap::new();
    let mut params_of = |g: &mut Graph, t: &str| -> Result<(ActParams, String, String)> {
        let p = *acts
            .get(t)
            .ok_or_else(|| Error::Graph(format!("no quantization parameters for '{t}'")))?;
        if let Some((s, z)) = param_names.get(t) {
            return Ok((p, s.clone(), z.clone()));
        }
        let (s, z) = act_param_inits(g, t, &p)?;
        param_names.insert(t.to_string(), (s.clone(), z.clone()));
        Ok((p, s, z))
    };
    for t in &plan.targets {
        let Some(enc) = weights.get(&t.name) else {
            continue;
        };
        let Encoded::Linear {
            codes,
            scales,
            zero_points,
            axis,
        } = &enc.enc
        else {
            return Err(Error::Data(format!(
                "node '{}': codebook weights have no QOperator form",
                t.name
            )));
        };
        let (xp, xs, xz) = params_of(g, &t.input)?;
        let (_, ys, yz) = params_of(g, &t.act_out)?;
        let x_q = qname[&t.input].clone();
        let y_q = qname[&t.act_out].clone();
        let orig = g.nodes[t.node].clone();
        let per_tensor = axis.is_none();
        let w_scale = |g: &mut Graph| -> Result<String> {
            let s = if per_tensor {
                Tensor::scalar_f32(scales[0])
            } else {
                Tensor::from_f32(vec![scales.len()], scales.clone())?
            };
            Ok(add_init(g, &format!("{}_scale", t.weight), s))
        };
        let w_zp = |g: &mut Graph| -> Result<String> {
            Ok(add_init(
                g,
                &format!("{}_zero_point", t.weight),
                zero_point_tensor(DType::I8, zero_points, per_tensor)?,
            ))
        };
        let bias = |g: &mut Graph| -> Result<Option<String>> {
            let Some(b) = &t.bias else { return Ok(None) };
            let bv = g
                .initializers
                .get(b)
                .map(Tensor::to_f32_vec)
                .ok_or_else(|| Error::Graph(format!("bias '{b}' is not constant")))?;
            let q = quantize_bias(&bv, xp.params.scale, scales);
            Ok(Some(add_init(
                g,
                &format!("{b}_quantized"),
                Tensor::new(vec![q.len()], TensorData::I32(q))?,
            )))
        };
        match t.op.as_str() {
            "Conv" | "Gemm" => {
                let (codes4, x_in, y_out) = if t.op == "Conv" {
                    (codes.clone(), x_q.clone(), y_q.clone())
                } else {
                    let nk = if t.weight_axis == 0 {
                        codes.clone()
                    } else {
                        transpose_i8(codes)?
                    };
                    let (n, k) = (nk.shape()[0], nk.shape()[1]);
                    let to4 = add_init(
                        g,
                        &format!("{}_shape4", t.name),
                        Tensor::from_i64(vec![4], vec![0, -1, 1, 1])?,
                    );
                    let to2 = add_init(
                        g,
                        &format!("{}_shape2", t.name),
                        Tensor::from_i64(vec![2], vec![0, -1])?,
                    );
                    let x4 = g.fresh_name(&format!("{}_input_4d", t.name));
                    let y4 = g.fresh_name(&format!("{}_output_4d", t.name));
                    new_nodes.push(node(
                        g,
                        &format!("{}_reshape_in", t.name),
                        "Reshape",
                        vec![x_q.clone(), to4],
                        vec![x4.clone()],
                    ));
                    new_nodes.push(node(
                        g,
                        &format!("{}_reshape_out", t.name),
                        "Reshape",
                        vec![y4.clone(), to2],
                        vec![y_q.clone()],
                    ));
                    (nk.reshaped(vec![n, k, 1, 1])?, x4, y4)
                };
                let wq = add_init(g, &format!("{}_quantized", t.weight), codes4);
                let ws = w_scale(g)?;
                let wz = w_zp(g)?;
                let b = bias(g)?;
                let mut inputs = vec![x_in, xs, xz, wq, ws, wz, ys, yz];
                if let Some(b) = b {
                    inputs.push(b);
                }
                let mut n = Node::new(t.name.clone(), "QLinearConv", inputs, vec![y_out]);
                if t.op == "Conv" {
                    for k in CONV_ATTRS {
                        if let Some(a) = orig.attrs.get(k) {
                            n.attrs.insert(k.to_string(), a.clone());
                        }
                    }
                }
                new_nodes.push(n);
            }
            "MatMul" => {
                let wq = add_init(g, &format!("{}_quantized", t.weight), codes.clone());
                let ws = w_scale(g)?;
                let wz = w_zp(g)?;
                let n = Node::new(
                    t.name.clone(),
                    "QLinearMatMul",
                    vec![x_q, xs, xz, wq, ws, wz, ys, yz],
                    vec![y_q],
                );
                new_nodes.push(n);
            }
            other => {
                return Err(Error::Graph(format!(
                    "cannot express {other} in QOperator form"
                )))
            }
        }
        remove.insert(t.node);
        if let Some(r) = t.relu {
            remove.insert(r);
        }
        produced_quantized.insert(t.act_out.clone());
    }
    // Data-movement ops between two quantized tensors on the same grid (max pooling,
    // reshapes) run on the codes themselves, with no DequantizeLinear / QuantizeLinear
    // around them: the values are the same, and an integer runtime (lithe, ONNX Runtime)
    // can fuse the pool into the convolution before it. For a chain of two such ops
    // (MaxPool then Flatten, say) ending at the quantized tensor, the tensor between them
    // gets codes of its own.
    let opset = model.opset();
    let codes_ok = |n: &Node| {
        is_pass_through(n)
            && match n.op_type.as_str() {
                "MaxPool" => opset >= 12,
                "Flatten" => opset >= 9,
                _ => true,
            }
    };
    let graph_outputs: HashSet<String> = g.outputs.iter().map(|v| v.name.clone()).collect();
    let sole_reader = |g: &Graph, t: &str| {
        let mut readers = g
            .nodes
            .iter()
            .enumerate()
            .filter(|(_, n)| n.inputs.iter().any(|i| i == t));
        match (readers.next(), readers.next()) {
            (Some((j, n)), None) if n.input(0) == Some(t) && !graph_outputs.contains(t) => Some(j),
            _ => None,
        }
    };
    let on_grid = |a: &str, b: &str| {
        qname.contains_key(a)
            && qname.contains_key(b)
            && plan.shared.contains_key(b)
            && acts.get(a).is_some()
            && acts.get(a) == acts.get(b)
    };
    let mut on_codes: Vec<(usize, String, String)> = Vec::new();
    for (i, n) in g.nodes.iter().enumerate() {
        if remove.contains(&i) || !codes_ok(n) {
            continue;
        }
        let (Some(a), Some(b)) = (n.input(0), n.outputs.first()) else {
            continue;
        };
        if on_grid(a, b) {
            on_codes.push((i, qname[a].clone(), qname[b].clone()));
            continue;
        }
        if qname.contains_key(b) || !qname.contains_key(a) {
            continue;
        }
        let Some(j) = sole_reader(g, b).filter(|&j| codes_ok(&g.nodes[j])) else {
            continue;
        };
        let Some(c) = g.nodes[j].outputs.first().filter(|c| on_grid(a, c)) else {
            continue;
        };
        let mid = g.fresh_name(&format!("{b}_quantized"));
        on_codes.push((i, qname[a].clone(), mid.clone()));
        on_codes.push((j, mid, qname[c].clone()));
    }
    for (i, input, output) in on_codes {
        let mut n = g.nodes[i].clone();
        if let Some(b) = n.outputs.first() {
            if qname.get(b) == Some(&output) {
                produced_quantized.insert(b.clone());
            }
        }
        n.inputs[0] = input;
        n.outputs[0] = output;
        new_nodes.push(n);
        remove.insert(i);
    }
    let mut i = 0;
    g.nodes.retain(|_| {
        i += 1;
        !remove.contains(&(i - 1))
    });
    // Quantized tensors: f32 readers see the dequantized value, as in the QDQ form.
    for tensor in &plan.tensors {
        let (p, s, z) = params_of(g, tensor)?;
        let q = qname[tensor].clone();
        if produced_quantized.contains(tensor) {
            let d = dequantize_node(g, &q, tensor, &s, &z);
            new_nodes.push(d);
        } else {
            let dq = if graph_outputs.contains(tensor) {
                tensor.clone()
            } else {
                let dq = g.fresh_name(&format!("{tensor}_dequantized"));
                for n in g.nodes.iter_mut().chain(new_nodes.iter_mut()) {
                    if n.op_type == "QLinearConv" || n.op_type == "QLinearMatMul" {
                        continue;
                    }
                    for i in n.inputs.iter_mut() {
                        if i == tensor {
                            *i = dq.clone();
                        }
                    }
                }
                dq
            };
            let qn = quantize_nodes(g, tensor, &q, &p, &s, &z);
            new_nodes.extend(qn);
            if dq != *tensor {
                let d = dequantize_node(g, &q, &dq, &s, &z);
                new_nodes.push(d);
            }
        }
    }
    g.nodes.extend(new_nodes);
    remove_dead_nodes(g);
    if lookup_tables {
        fuse_lookup_tables(g)?;
        remove_dead_nodes(g);
    }
    g.topo_sort()?;
    Ok(out)
}

/// A pointwise activation node's function, with constant parameters.
fn activation(g: &Graph, n: &Node) -> Result<Option<Activation>> {
    if !n.domain.is_empty() || n.outputs.len() != 1 {
        return Ok(None);
    }
    Ok(Some(match n.op_type.as_str() {
        "Relu" => Activation::Relu,
        "HardSwish" => Activation::HardSwish,
        "Sigmoid" => Activation::Sigmoid,
        "Tanh" => Activation::Tanh,
        "HardSigmoid" => Activation::HardSigmoid {
            alpha: n.attr_float_or("alpha", 0.2)?,
            beta: n.attr_float_or("beta", 0.5)?,
        },
        "LeakyRelu" => Activation::LeakyRelu {
            alpha: n.attr_float_or("alpha", 0.01)?,
        },
        "Clip" => {
            let bound = |i: usize, d: f32| -> Option<f32> {
                match n.input(i) {
                    None => Some(d),
                    Some(b) => g
                        .initializers
                        .get(b)
                        .filter(|t| t.numel() == 1)
                        .map(|t| t.to_f32_vec()[0]),
                }
            };
            match (bound(1, f32::NEG_INFINITY), bound(2, f32::INFINITY)) {
                (Some(min), Some(max)) => Activation::Clip { min, max },
                _ => return Ok(None),
            }
        }
        _ => return Ok(None),
    }))
}

/// Per-tensor constant parameters of a Quantize/DequantizeLinear node.
fn qdq_params(g: &Graph, n: &Node) -> Option<(f32, i32, DType)> {
    let s = g.initializers.get(n.input(1)?)?;
    let z = g.initializers.get(n.input(2)?)?;
    if s.numel() != 1 || z.numel() != 1 {
        return None;
    }
    let zv = z.to_i64_vec().ok()?[0] as i32;
    Some((s.to_f32_vec()[0], zv, z.dtype()))
}

/// DequantizeLinear -> activation -> QuantizeLinear, each the only reader of the previous,
/// becomes `Cast` + `Gather` over a 256-entry table of the composed function.
fn fuse_lookup_tables(g: &mut Graph) -> Result<()> {
    let graph_outputs: HashSet<String> = g.outputs.iter().map(|v| v.name.clone()).collect();
    let mut replaced: Vec<(usize, usize, usize, Vec<Node>)> = Vec::new();
    let uses = g.use_counts();
    let producer: HashMap<&str, usize> = g
        .nodes
        .iter()
        .enumerate()
        .flat_map(|(i, n)| n.outputs.iter().map(move |o| (o.as_str(), i)))
        .collect();
    let reader = |v: &str| g.nodes.iter().position(|n| n.inputs.iter().any(|i| i == v));
    let mut plans = Vec::new();
    for (ui, u) in g.nodes.iter().enumerate() {
        let Some(act) = activation(g, u)? else {
            continue;
        };
        let Some(a) = u.input(0) else { continue };
        let t = &u.outputs[0];
        if graph_outputs.contains(a) || graph_outputs.contains(t) {
            continue;
        }
        if uses.get(a) != Some(&1) || uses.get(t) != Some(&1) {
            continue;
        }
        let Some(&di) = producer.get(a) else { continue };
        let d = &g.nodes[di];
        let Some(qi) = reader(t) else { continue };
        let q = &g.nodes[qi];
        if d.op_type != "DequantizeLinear" || q.op_type != "QuantizeLinear" {
            continue;
        }
        let (Some((sa, za, ta)), Some((sq, zq, tq))) = (qdq_params(g, d), qdq_params(g, q)) else {
            continue;
        };
        plans.push((di, ui, qi, act, (sa, za, ta), (sq, zq, tq)));
    }
    for (di, ui, qi, act, (sa, za, ta), (sq, zq, tq)) in plans {
        let (qmin, qmax) = if tq == DType::I8 {
            (-128, 127)
        } else {
            (0, 255)
        };
        let out = crate::quant::QParams::new(sq, zq, qmin, qmax, &g.nodes[qi].outputs[0])?;
        let code = |j: usize| -> i32 {
            if ta == DType::I8 {
                i32::from(j as u8 as i8)
            } else {
                j as i32
            }
        };
        let table: Vec<i32> = (0..256)
            .map(|j| out.quantize(act.apply_scalar((code(j) - za) as f32 * sa)))
            .collect();
        let table = zero_point_tensor(tq, &table, false)?;
        let tname = add_init(g, &format!("{}_lut", g.nodes[ui].display_name()), table);
        let codes = g.nodes[di].inputs[0].clone();
        let dst = g.nodes[qi].outputs[0].clone();
        let idx = g.fresh_name(&format!("{codes}_index"));
        let cast = node(
            g,
            &format!("{}_Cast", g.nodes[ui].display_name()),
            "Cast",
            vec![codes],
            vec![idx.clone()],
        )
        .with_attr("to", Attr::Int(i64::from(DType::I32.onnx_code())));
        let gather = node(
            g,
            &format!("{}_lookup", g.nodes[ui].display_name()),
            "Gather",
            vec![tname, idx],
            vec![dst],
        )
        .with_attr("axis", Attr::Int(0));
        replaced.push((di, ui, qi, vec![cast, gather]));
    }
    let drop: HashSet<usize> = replaced
        .iter()
        .flat_map(|(a, b, c, _)| [*a, *b, *c])
        .collect();
    let mut i = 0;
    g.nodes.retain(|_| {
        i += 1;
        !drop.contains(&(i - 1))
    });
    for (_, _, _, nodes) in replaced {
        g.nodes.extend(nodes);
    }
    Ok(())
}
