//! Which nodes get quantized and which activation tensors need quantization parameters.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use crate::error::{Error, Result};
use crate::ir::{DType, Graph, Node};

/// A Conv, Gemm or MatMul whose weight is a constant f32 initializer.
#[derive(Clone, Debug)]
pub struct Target {
    pub node: usize,
    pub name: String,
    pub op: String,
    pub weight: String,
    /// Axis of the stored weight that indexes output channels.
    pub weight_axis: usize,
    pub bias: Option<String>,
    pub input: String,
    pub output: String,
    /// A ReLU that is the only reader of `output`, folded into the output range.
    pub relu: Option<usize>,
    /// The tensor quantized after the node: the ReLU's output, else `output`.
    pub act_out: String,
}

#[derive(Clone, Debug, Default)]
pub struct Plan {
    pub targets: Vec<Target>,
    /// Every activation tensor that gets a quantized form, in graph order.
    pub tensors: Vec<String>,
    /// Tensors reached from a quantized tensor through data-movement ops only (MaxPool,
    /// Reshape, ...): they reuse its parameters, which keeps requantization exact.
    pub shared: BTreeMap<String, String>,
}

impl Plan {
    /// The tensors whose ranges calibration must observe.
    pub fn calibrated(&self) -> Vec<String> {
        self.tensors
            .iter()
            .filter(|t| !self.shared.contains_key(*t))
            .cloned()
            .collect()
    }
}

/// Ops whose output values are a subset or rearrangement of the input's: quantization
/// parameters pass through them unchanged.
pub fn is_pass_through(node: &Node) -> bool {
    node.domain.is_empty()
        && matches!(
            node.op_type.as_str(),
            "MaxPool" | "Reshape" | "Flatten" | "Squeeze" | "Unsqueeze" | "Transpose" | "Identity"
        )
        && node.outputs.len() == 1
}

fn f32_init(graph: &Graph, name: Option<&str>) -> Option<String> {
    let n = name?;
    let t = graph.initializers.get(n)?;
    (t.dtype() == DType::F32).then(|| n.to_string())
}

/// Why node `i` of `graph` is not quantized, when it is not (exclusion aside).
pub fn skip_reason(graph: &Graph, i: usize) -> Option<String> {
    match as_target(graph, i, &graph.nodes[i]) {
        Ok(Ok(_)) => None,
        Ok(Err(reason)) => Some(reason),
        Err(e) => Some(e.to_string()),
    }
}

/// The target description of `node`, or `None` with the reason it is left in f32.
fn as_target(graph: &Graph, i: usize, node: &Node) -> Result<std::result::Result<Target, String>> {
    if !node.domain.is_empty() {
        return Ok(Err("not a default-domain op".into()));
    }
    let Some(weight) = f32_init(graph, node.input(1)) else {
        let computed = node
            .input(1)
            .is_some_and(|w| !graph.initializers.contains_key(w));
        return Ok(Err(if computed {
            "its second operand is computed, not a constant weight".into()
        } else {
            "weight is not a constant f32 tensor".into()
        }));
    };
    let w = &graph.initializers[&weight];
    let bias = node.input(2).map(str::to_string);
    let (axis, ok) = match node.op_type.as_str() {
        "Conv" => (0, matches!(w.rank(), 3 | 4)),
        "MatMul" => (1, w.rank() == 2),
        "Gemm" => {
            let trans_a = node.attr_int_or("transA", 0)?;
            let trans_b = node.attr_int_or("transB", 0)?;
            let alpha = node.attr_float_or("alpha", 1.0)?;
            let beta = node.attr_float_or("beta", 1.0)?;
            if trans_a != 0 || alpha != 1.0 || (bias.is_some() && beta != 1.0) {
                return Ok(Err("Gemm with transA, alpha or beta is left in f32".into()));
            }
            (if trans_b != 0 { 0 } else { 1 }, w.rank() == 2)
        }
        _ => return Ok(Err("not a Conv, Gemm or MatMul".into())),
    };
    if !ok {
        return Ok(Err(format!(
            "weight of shape {:?} is not supported",
            w.shape()
        )));
    }
    if let Some(b) = &bias {
        let channels = w.shape()[axis];
        match graph.initializers.get(b) {
            Some(t) if t.dtype() == DType::F32 && t.numel() == channels => {}
            _ => return Ok(Err("bias is not a constant f32 vector".into())),
        }
    }
    let (Some(input), Some(output)) = (node.input(0), node.outputs.first()) else {
        return Ok(Err("missing input or output".into()));
    };
    Ok(Ok(Target {
        node: i,
        name: node.display_name(),
        op: node.op_type.clone(),
        weight,
        weight_axis: axis,
        bias,
        input: input.to_string(),
        output: output.clone(),
        relu: None,
        act_out: output.clone(),
    }))
}

/// Names a user may pass to `--exclude`: quantizable nodes of the simplified graph, plus
/// every node name of the original model (nodes may be folded away by simplification).
pub fn check_excludes(
    exclude: &[String],
    simplified: &Graph,
    original: &Graph,
    targets: &[Target],
) -> Result<()> {
    let known: HashSet<String> = simplified
        .nodes
        .iter()
        .chain(&original.nodes)
        .map(Node::display_name)
        .collect();
    let unknown: Vec<&String> = exclude.iter().filter(|e| !known.contains(*e)).collect();
    if unknown.is_empty() {
        return Ok(());
    }
    let valid: Vec<&str> = targets.iter().map(|t| t.name.as_str()).collect();
    Err(Error::Data(format!(
        "--exclude: unknown node name{} {}; quantizable nodes are: {}",
        if unknown.len() == 1 { "" } else { "s" },
        unknown
            .iter()
            .map(|s| format!("'{s}'"))
            .collect::<Vec<_>>()
            .join(", "),
        valid.join(", ")
    )))
}

/// Finds the quantizable nodes (all of them, excluded or not) of `graph`.
pub fn all_targets(graph: &Graph) -> Result<Vec<Target>> {
    let mut out = Vec::new();
    for (i, node) in graph.nodes.iter().enumerate() {
        if let Ok(t) = as_target(graph, i, node)? {
            out.push(t);
        }
    }
    Ok(out)
}

/// The plan for `graph`, leaving nodes named in `exclude` alone.
pub fn make_plan(graph: &Graph, exclude: &[String]) -> Result<Plan> {
    let excluded: HashSet<&str> = exclude.iter().map(String::as_str).collect();
    let uses = graph.use_counts();
    let graph_outputs: HashSet<&str> = graph.outputs.iter().map(|v| v.name.as_str()).collect();
    let consumers = |v: &str| -> Vec<usize> {
        graph
            .nodes
            .iter()
            .enumerate()
            .filter(|(_, n)| n.inputs.iter().any(|i| i == v))
            .map(|(i, _)| i)
            .collect()
    };
    let mut targets = Vec::new();
    for mut t in all_targets(graph)? {
        if excluded.contains(t.name.as_str()) {
            continue;
        }
        if !graph_outputs.contains(t.output.as_str()) && uses.get(&t.output) == Some(&1) {
            if let [c] = consumers(&t.output)[..] {
                let n = &graph.nodes[c];
                if n.op_type == "Relu" && n.domain.is_empty() && n.outputs.len() == 1 {
                    t.relu = Some(c);
                    t.act_out = n.outputs[0].clone();
                }
            }
        }
        targets.push(t);
    }
    let produced: HashSet<&str> = targets.iter().map(|t| t.act_out.as_str()).collect();
    let producer: HashMap<&str, &Node> = graph
        .nodes
        .iter()
        .flat_map(|n| n.outputs.iter().map(move |o| (o.as_str(), n)))
        .collect();
    let mut shared = BTreeMap::new();
    for t in &targets {
        let mut cur = t.input.as_str();
        while let Some(p) = producer.get(cur) {
            if !is_pass_through(p) {
                break;
            }
            match p.input(0) {
                Some(src) => cur = src,
                None => break,
            }
            if produced.contains(cur) {
                shared.insert(t.input.clone(), cur.to_string());
                break;
            }
        }
    }
    // Graph order: positions of producers (graph inputs first).
    let order: HashMap<&str, usize> = graph
        .nodes
        .iter()
        .enumerate()
        .flat_map(|(i, n)| n.outputs.iter().map(move |o| (o.as_str(), i + 1)))
        .collect();
    let mut set: BTreeSet<(usize, String)> = BTreeSet::new();
    for t in &targets {
        for v in [&t.input, &t.act_out] {
            set.insert((order.get(v.as_str()).copied().unwrap_or(0), v.clone()));
        }
    }
    Ok(Plan {
        targets,
        tensors: set.into_iter().map(|(_, v)| v).collect(),
        shared,
    })
}
