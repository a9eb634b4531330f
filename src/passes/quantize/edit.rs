//! Small graph-editing helpers shared by the QDQ and QOperator builders.

use std::collections::HashSet;

use crate::error::Result;
use crate::ir::{Attr, DType, Graph, Node, Tensor, TensorData};
use crate::quant::QParams;

/// Quantization of one activation tensor: linear parameters and the storage type (u8 or i8).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ActParams {
    pub params: QParams,
    pub dtype: DType,
}

impl ActParams {
    /// Whether the grid is narrower than the storage type, so QuantizeLinear's saturation
    /// alone would not clamp to it.
    pub fn needs_clip(&self) -> bool {
        let (lo, hi) = match self.dtype {
            DType::I8 => (-128, 127),
            _ => (0, 255),
        };
        self.params.qmin > lo || self.params.qmax < hi
    }
}

/// Adds an initializer under a fresh name derived from `base`.
pub fn add_init(g: &mut Graph, base: &str, t: Tensor) -> String {
    let name = g.fresh_name(base);
    g.initializers.insert(name.clone(), t);
    name
}

/// A zero-point tensor of `dtype` holding `values` (a scalar when `scalar`).
pub fn zero_point_tensor(dtype: DType, values: &[i32], scalar: bool) -> Result<Tensor> {
    let shape = if scalar { vec![] } else { vec![values.len()] };
    let data = match dtype {
        DType::I8 => TensorData::I8(values.iter().map(|&v| v as i8).collect()),
        _ => TensorData::U8(values.iter().map(|&v| v as u8).collect()),
    };
    Tensor::new(shape, data)
}

/// Scale and zero-point initializers of an activation's parameters.
pub fn act_param_inits(g: &mut Graph, base: &str, p: &ActParams) -> Result<(String, String)> {
    let s = add_init(
        g,
        &format!("{base}_scale"),
        Tensor::scalar_f32(p.params.scale),
    );
    let z = add_init(
        g,
        &format!("{base}_zero_point"),
        zero_point_tensor(p.dtype, &[p.params.zero_point], true)?,
    );
    Ok((s, z))
}

/// A new node with a fresh name derived from `base`.
pub fn node(g: &Graph, base: &str, op: &str, inputs: Vec<String>, outputs: Vec<String>) -> Node {
    Node::new(g.fresh_name(base), op, inputs, outputs)
}

/// Nodes quantizing `x` (f32) to `out` with `p`: a Clip to the grid's real range when the grid
/// is narrower than the storage type, then QuantizeLinear.
pub fn quantize_nodes(
    g: &mut Graph,
    x: &str,
    out: &str,
    p: &ActParams,
    scale: &str,
    zp: &str,
) -> Vec<Node> {
    let mut nodes = Vec::new();
    let mut src = x.to_string();
    if p.needs_clip() {
        let (lo, hi) = p.params.real_range();
        let lo = add_init(g, &format!("{x}_clip_min"), Tensor::scalar_f32(lo));
        let hi = add_init(g, &format!("{x}_clip_max"), Tensor::scalar_f32(hi));
        let clipped = g.fresh_name(&format!("{x}_clipped"));
        nodes.push(node(
            g,
            &format!("{x}_Clip"),
            "Clip",
            vec![src, lo, hi],
            vec![clipped.clone()],
        ));
        src = clipped;
    }
    let q = node(
        g,
        &format!("{x}_QuantizeLinear"),
        "QuantizeLinear",
        vec![src, scale.to_string(), zp.to_string()],
        vec![out.to_string()],
    );
    nodes.push(q);
    nodes
}

pub fn dequantize_node(g: &Graph, q: &str, out: &str, scale: &str, zp: &str) -> Node {
    node(
        g,
        &format!("{out}_DequantizeLinear"),
        "DequantizeLinear",
        vec![q.to_string(), scale.to_string(), zp.to_string()],
        vec![out.to_string()],
    )
}

/// A `Cast` to int32 then a `Gather` from `table`: how codebook codes become values.
pub fn lookup_nodes(g: &mut Graph, codes: &str, table: &str, out: &str) -> Vec<Node> {
    let idx = g.fresh_name(&format!("{codes}_index"));
    let cast = node(
        g,
        &format!("{codes}_Cast"),
        "Cast",
        vec![codes.into()],
        vec![idx.clone()],
    )
    .with_attr("to", Attr::Int(i64::from(DType::I32.onnx_code())));
    let gather = node(
        g,
        &format!("{out}_Gather"),
        "Gather",
        vec![table.into(), idx],
        vec![out.into()],
    )
    .with_attr("axis", Attr::Int(0));
    vec![cast, gather]
}

/// Removes nodes none of whose outputs is read or is a graph output, repeatedly.
pub fn remove_dead_nodes(g: &mut Graph) {
    loop {
        let outputs: HashSet<&str> = g.outputs.iter().map(|v| v.name.as_str()).collect();
        let read: HashSet<&str> = g
            .nodes
            .iter()
            .flat_map(|n| n.inputs.iter().map(String::as_str))
            .collect();
        let dead: Vec<usize> = g
            .nodes
            .iter()
            .enumerate()
            .filter(|(_, n)| {
                n.outputs.iter().all(|o| {
                    o.is_empty() || (!read.contains(o.as_str()) && !outputs.contains(o.as_str()))
                })
            })
            .map(|(i, _)| i)
            .collect();
        if dead.is_empty() {
            break;
        }
        let dead: HashSet<usize> = dead.into_iter().collect();
        let mut i = 0;
        g.nodes.retain(|_| {
            i += 1;
            !dead.contains(&(i - 1))
        });
    }
    g.prune_unused_initializers();
}
