//! Turns a graph into a flat list of compiled steps over numbered value slots, deciding once
//! which kernels absorb a following activation and when each intermediate value dies.

use std::collections::HashMap;

use super::{pointwise, qdq_products, qfuse};
use crate::error::{Error, Result};
use crate::ir::{Model, Node, Tensor, TypeInfo};
use crate::ops::{self, activation::activation_of, CompileCtx, Kernel};

pub type Slot = usize;

pub struct Step {
    pub node_name: String,
    pub op_type: String,
    /// Op types folded into this step (e.g. `Conv+Relu`), for profiles.
    pub label: String,
    pub kernel: Box<dyn Kernel>,
    pub inputs: Vec<Option<Slot>>,
    pub outputs: Vec<Slot>,
    /// Slots whose last reader is this step: released right after it runs.
    pub release_after: Vec<Slot>,
    /// The input (by position) whose value dies here and whose storage the kernel takes
    /// over ([`Kernel::reuses_input`]): the step runs with it moved in, copying nothing.
    pub owned_input: Option<usize>,
}

pub struct Plan {
    pub steps: Vec<Step>,
    pub slot_count: usize,
    /// Value name of each slot.
    pub slot_names: Vec<String>,
    /// Constant values (initializers), indexed by slot.
    pub constants: HashMap<Slot, Tensor>,
    pub inputs: Vec<(String, Slot, TypeInfo)>,
    pub outputs: Vec<(String, Slot)>,
}

#[derive(Clone, Debug)]
pub struct PlanOptions {
    /// Fold a lone following activation into Conv/Gemm/MatMul epilogues, and a pooling node
    /// that alone reads a Conv's (activated) output into the Conv's step; run chains of
    /// pointwise arithmetic (a bias add and GELU, say) as one step (see [`super::pointwise`]).
    /// Either way the intermediate values are never materialised (nor shown to observers).
    pub fuse_activations: bool,
    /// Run a `DequantizeLinear -> f32 ops -> QuantizeLinear` chain on 8-bit codes in one step
    /// (a code table, after max pooling of the codes when the chain starts with MaxPool), with
    /// the same results bit for bit; see [`super::qfuse`]. The intermediate f32 values are
    /// never materialised (nor shown to observers).
    pub fuse_quantized: bool,
    /// Run `DequantizeLinear -> Conv | Gemm | MatMul -> [Relu | Clip] -> QuantizeLinear`
    /// with constant quantized weights on the integer engine, as a QOperator file would run
    /// (see [`super::qdq_products`]): integer arithmetic, so an output code may differ by one
    /// from the f32 chain's where a value sits on a rounding edge.
    pub fuse_qdq_products: bool,
}

impl Default for PlanOptions {
    fn default() -> Self {
        PlanOptions {
            fuse_activations: true,
            fuse_quantized: true,
            fuse_qdq_products: true,
        }
    }
}

impl PlanOptions {
    /// Every node its own step: each value computed and observable.
    pub fn unfused() -> PlanOptions {
        PlanOptions {
            fuse_activations: false,
            fuse_quantized: false,
            fuse_qdq_products: false,
        }
    }
}

struct Slots {
    ids: HashMap<String, Slot>,
}

impl Slots {
    fn get_or_add(&mut self, name: &str) -> Slot {
        let next = self.ids.len();
        *self.ids.entry(name.to_string()).or_insert(next)
    }
}

pub fn build(model: &Model, options: &PlanOptions) -> Result<Plan> {
    let graph = &model.graph;
    let opset = model.opset();
    let mut slots = Slots {
        ids: HashMap::new(),
    };
    let mut constants = HashMap::new();
    for (name, t) in &graph.initializers {
        constants.insert(slots.get_or_add(name), t.clone());
    }
    let inputs: Vec<(String, Slot, TypeInfo)> = graph
        .inputs
        .iter()
        .map(|v| (v.name.clone(), slots.get_or_add(&v.name), v.ty.clone()))
        .collect();

    let mut readers: HashMap<&str, usize> = HashMap::new();
    for node in &graph.nodes {
        for inp in node.inputs.iter().filter(|s| !s.is_empty()) {
            *readers.entry(inp.as_str()).or_default() += 1;
        }
    }
    let graph_outputs: std::collections::HashSet<&str> =
        graph.outputs.iter().map(|v| v.name.as_str()).collect();
    let producer_of: HashMap<&str, usize> = graph
        .nodes
        .iter()
        .enumerate()
        .flat_map(|(i, n)| n.outputs.iter().map(move |o| (o.as_str(), i)))
        .collect();

    let uses = qfuse::Uses {
        readers: &readers,
        graph_outputs: &graph_outputs,
        producers: &producer_of,
    };
    let mut absorbed = vec![false; graph.nodes.len()];
    // Quantized products are found first: their weights' DequantizeLinear nodes come before
    // them in the graph and must not be planned when the fused step alone read them.
    let mut products = match options.fuse_qdq_products {
        true => qdq_products::find(model, &uses),
        false => HashMap::new(),
    };
    for f in products.values() {
        for &j in &f.nodes {
            absorbed[j] = true;
        }
    }
    let mut steps = Vec::with_capacity(graph.nodes.len());
    // Pointwise chains, by the index of their last node (where their step runs).
    let mut pending_chains: HashMap<usize, Step> = HashMap::new();
    for (i, node) in graph.nodes.iter().enumerate() {
        if let Some(f) = products.remove(&i) {
            steps.push(Step {
                node_name: graph.nodes[f.product].display_name(),
                op_type: graph.nodes[f.product].op_type.clone(),
                label: f.label,
                kernel: f.kernel,
                inputs: vec![Some(slots.get_or_add(&f.input))],
                outputs: vec![slots.get_or_add(&f.output)],
                release_after: Vec::new(),
                owned_input: None,
            });
            continue;
        }
        if absorbed[i] {
            if let Some(step) = pending_chains.remove(&i) {
                steps.push(step);
            }
            continue;
        }
        if options.fuse_quantized && node.op_type == "DequantizeLinear" {
            let chain = qfuse::fuse_chain(model, i, &uses)
                .filter(|f| f.nodes.iter().all(|&j| !absorbed[j]));
            if let Some(f) = chain {
                let last = &graph.nodes[*f.nodes.last().unwrap_or(&i)];
                for &j in &f.nodes {
                    absorbed[j] = true;
                }
                steps.push(Step {
                    node_name: node.display_name(),
                    op_type: node.op_type.clone(),
                    label: f.label,
                    kernel: f.kernel,
                    inputs: vec![Some(slots.get_or_add(&node.inputs[0]))],
                    outputs: vec![slots.get_or_add(&last.outputs[0])],
                    release_after: Vec::new(),
                    owned_input: None,
                });
                continue;
            }
        }
        if options.fuse_activations {
            if let Some(c) = pointwise::find(model, i, &uses, &absorbed) {
                for &j in &c.nodes {
                    absorbed[j] = true;
                }
                // The step runs where the chain's last node would: values it reads from
                // outside may be computed by nodes between its first and last.
                let last = *c.nodes.last().unwrap_or(&i);
                pending_chains.insert(
                    last,
                    Step {
                        node_name: node.display_name(),
                        op_type: node.op_type.clone(),
                        label: c.label,
                        kernel: c.kernel,
                        inputs: c.inputs.iter().map(|n| Some(slots.get_or_add(n))).collect(),
                        outputs: vec![slots.get_or_add(&c.output)],
                        release_after: Vec::new(),
                        owned_input: None,
                    },
                );
                continue;
            }
        }
        let def = ops::lookup(node, opset)?;
        let input_types: Vec<Option<TypeInfo>> = node
            .inputs
            .iter()
            .map(|n| if n.is_empty() { None } else { graph.type_of(n) })
            .collect();
        let consts: Vec<Option<&Tensor>> = node
            .inputs
            .iter()
            .map(|n| graph.initializers.get(n))
            .collect();

        let mut fused: Option<(usize, ops::Activation)> = None;
        if options.fuse_activations && def.fuses_activation && node.outputs.len() == 1 {
            fused = fusable_activation(model, node, &readers, &graph_outputs, &producer_of)?;
        }
        let ctx = CompileCtx {
            node,
            opset,
            input_types,
            constants: consts,
            fused_activation: fused.map(|(_, a)| a),
        };
        // A pooling node reading the (activated) output can join the step too.
        let pool_compiler = match node.op_type.as_str() {
            "Conv" => Some(ops::nn::compile_conv_pool as PoolCompiler),
            "QLinearConv" => Some(ops::quantized::compile_qlinear_pool as PoolCompiler),
            _ => None,
        };
        let pooled = match pool_compiler.filter(|_| options.fuse_activations) {
            Some(compile_pool) => {
                let tail = fused.map_or(node, |(j, _)| &graph.nodes[j]);
                match sole_pool_reader(model, tail, &readers, &graph_outputs) {
                    Some(p) => compile_pool(&ctx, &graph.nodes[p])
                        .map_err(|e| e.at_node(node))?
                        .map(|k| (p, k)),
                    None => None,
                }
            }
            None => None,
        };
        let (kernel, pool) = match pooled {
            Some((p, k)) => (k, Some(p)),
            None => ((def.compile)(&ctx).map_err(|e| e.at_node(node))?, None),
        };
        let mut label = node.op_type.clone();
        let mut outputs: Vec<Slot> = match fused {
            Some((j, _)) => {
                absorbed[j] = true;
                let act = &graph.nodes[j];
                label = format!("{}+{}", node.op_type, act.op_type);
                vec![slots.get_or_add(&act.outputs[0])]
            }
            None => node.outputs.iter().map(|o| slots.get_or_add(o)).collect(),
        };
        if let Some(p) = pool {
            absorbed[p] = true;
            let pool = &graph.nodes[p];
            label = format!("{label}+{}", pool.op_type);
            outputs = vec![slots.get_or_add(&pool.outputs[0])];
        }
        let step_inputs = node
            .inputs
            .iter()
            .map(|n| {
                if n.is_empty() {
                    None
                } else {
                    Some(slots.get_or_add(n))
                }
            })
            .collect();
        steps.push(Step {
            node_name: node.display_name(),
            op_type: node.op_type.clone(),
            label,
            kernel,
            inputs: step_inputs,
            outputs,
            release_after: Vec::new(),
            owned_input: None,
        });
    }

    let outputs: Vec<(String, Slot)> = graph
        .outputs
        .iter()
        .map(|v| {
            slots
                .ids
                .get(&v.name)
                .map(|&s| (v.name.clone(), s))
                .ok_or_else(|| Error::Graph(format!("graph output '{}' is never produced", v.name)))
        })
        .collect::<Result<_>>()?;

    // A slot dies after its last reader, unless it is a constant or a graph output.
    let mut last_reader: HashMap<Slot, usize> = HashMap::new();
    for (si, step) in steps.iter().enumerate() {
        for s in step.inputs.iter().flatten() {
            last_reader.insert(*s, si);
        }
    }
    let keep: std::collections::HashSet<Slot> = outputs.iter().map(|(_, s)| *s).collect();
    for (slot, si) in last_reader {
        if !constants.contains_key(&slot) && !keep.contains(&slot) {
            steps[si].release_after.push(slot);
        }
    }
    let graph_inputs: std::collections::HashSet<Slot> = inputs.iter().map(|i| i.1).collect();
    for step in &mut steps {
        step.owned_input = step.kernel.reuses_input().filter(|&i| {
            let Some(Some(slot)) = step.inputs.get(i) else {
                return false;
            };
            // Only values the run computed and owns: feeds are borrowed, constants shared.
            step.release_after.contains(slot)
                && !graph_inputs.contains(slot)
                && step.inputs.iter().filter(|s| **s == Some(*slot)).count() == 1
        });
    }
    let mut slot_names = vec![String::new(); slots.ids.len()];
    for (name, &slot) in &slots.ids {
        slot_names[slot] = name.clone();
    }
    Ok(Plan {
        steps,
        slot_count: slots.ids.len(),
        slot_names,
        constants,
        inputs,
        outputs,
    })
}

/// Compiles a convolution with the pooling node that reads it, or `None` when they do not fuse.
type PoolCompiler = fn(&ops::CompileCtx, &Node) -> Result<Option<Box<dyn ops::Kernel>>>;

/// The MaxPool / AveragePool node that is the only reader of `node`'s only output (which is
/// not a graph output), reading it as its data input and producing just one output.
fn sole_pool_reader(
    model: &Model,
    node: &Node,
    readers: &HashMap<&str, usize>,
    graph_outputs: &std::collections::HashSet<&str>,
) -> Option<usize> {
    let [out] = node.outputs.as_slice() else {
        return None;
    };
    if graph_outputs.contains(out.as_str()) || readers.get(out.as_str()) != Some(&1) {
        return None;
    }
    let (p, pool) = model
        .graph
        .nodes
        .iter()
        .enumerate()
        .find(|(_, n)| n.inputs.iter().any(|i| i == out))?;
    let single_output = pool.outputs.iter().filter(|o| !o.is_empty()).count() == 1;
    (matches!(pool.op_type.as_str(), "MaxPool" | "AveragePool")
        && pool.inputs.first() == Some(out)
        && pool.outputs.first().is_some_and(|o| !o.is_empty())
        && single_output)
        .then_some(p)
}

/// The activation node that can be folded into `node`: the sole reader of its only output,
/// that output not being a graph output, with constant parameters.
fn fusable_activation(
    model: &Model,
    node: &Node,
    readers: &HashMap<&str, usize>,
    graph_outputs: &std::collections::HashSet<&str>,
    producer_of: &HashMap<&str, usize>,
) -> Result<Option<(usize, ops::Activation)>> {
    let graph = &model.graph;
    let out = node.outputs[0].as_str();
    if graph_outputs.contains(out) || readers.get(out) != Some(&1) {
        return Ok(None);
    }
    let Some((j, next)) = graph
        .nodes
        .iter()
        .enumerate()
        .find(|(_, n)| n.inputs.iter().any(|i| i == out))
    else {
        return Ok(None);
    };
    if next.inputs.first().map(String::as_str) != Some(out) || next.outputs.len() != 1 {
        return Ok(None);
    }
    // Fusing moves the activation up to its producer; that is only sound when every other
    // input of the activation (Clip bounds) exists before the producer runs.
    let producer_index = producer_of.get(out).copied().unwrap_or(0);
    for extra in next.inputs.iter().skip(1).filter(|s| !s.is_empty()) {
        if producer_of
            .get(extra.as_str())
            .is_some_and(|&p| p >= producer_index)
        {
            return Ok(None);
        }
    }
    let ctx = CompileCtx {
        node: next,
        opset: model.opset(),
        input_types: vec![],
        constants: next
            .inputs
            .iter()
            .map(|n| graph.initializers.get(n))
            .collect(),
        fused_activation: None,
    };
    Ok(activation_of(&ctx)?.map(|a| (j, a)))
}
