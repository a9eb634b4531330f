//! Constant folding: a node whose inputs are all constants is run once and replaced by its
//! outputs as initializers. With input shapes fixed, `Shape` nodes become constants first, so
//! the shape arithmetic that models build around Reshape folds away too.

use std::collections::HashSet;

use super::{infer_shapes::infer_shapes, PassReport};
use crate::error::{Error, Result};
use crate::ir::{DType, Dim, Model, Node, Tensor};
use crate::ops::{self, CompileCtx, RunCtx};

/// A folded result may grow the model by at most this much beyond its inputs' size, so that
/// `ConstantOfShape`/`Expand`/`Tile` do not turn a tiny graph into a huge file.
const MAX_GROWTH_BYTES: usize = 1 << 20;

pub fn fold_constants(model: &Model) -> Result<(Model, PassReport)> {
    let mut out = model.clone();
    let before = out.graph.nodes.len();
    let opset = out.opset();
    let graph_outputs: HashSet<String> = out.graph.outputs.iter().map(|v| v.name.clone()).collect();
    // Weights and biases of products whose data comes quantized through a DequantizeLinear
    // (the QDQ pattern the runtime runs on integer kernels, see runtime::qdq_products).
    let dequantized: HashSet<&str> = out
        .graph
        .nodes
        .iter()
        .filter(|n| n.op_type == "DequantizeLinear")
        .filter(|n| {
            n.input(0)
                .is_some_and(|x| !out.graph.initializers.contains_key(x))
        })
        .flat_map(|n| n.outputs.iter().map(String::as_str))
        .collect();
    let product_params: HashSet<String> = out
        .graph
        .nodes
        .iter()
        .filter(|n| matches!(n.op_type.as_str(), "Conv" | "Gemm" | "MatMul"))
        .filter(|n| n.input(0).is_some_and(|x| dequantized.contains(x)))
        .flat_map(|n| {
            [n.input(1), n.input(2)]
                .into_iter()
                .flatten()
                .map(str::to_string)
        })
        .collect();
    let mut kept = Vec::with_capacity(out.graph.nodes.len());
    let mut folded = 0usize;
    let nodes = std::mem::take(&mut out.graph.nodes);
    for node in nodes {
        let all_constant = node
            .inputs
            .iter()
            .all(|n| n.is_empty() || out.graph.initializers.contains_key(n));
        // Graph outputs stay as computed values so the graph keeps its output list intact.
        let feeds_output = node.outputs.iter().any(|o| graph_outputs.contains(o));
        // A quantized product's weight and bias stay codes: the runtime runs the product on
        // them (see runtime::qdq_products).
        let quantized_weight = node.op_type == "DequantizeLinear"
            && node.outputs.iter().any(|o| product_params.contains(o))
            && node
                .input(0)
                .and_then(|c| out.graph.initializers.get(c))
                .is_some_and(|c| matches!(c.dtype(), DType::U8 | DType::I8 | DType::I32));
        if !all_constant || feeds_output || quantized_weight || node.outputs.is_empty() {
            kept.push(node);
            continue;
        }
        match evaluate(&node, opset, &out.graph)? {
            Some(values) => {
                for (name, t) in node.outputs.iter().zip(values) {
                    if !name.is_empty() {
                        out.graph.initializers.insert(name.clone(), t);
                        out.graph.value_info.remove(name);
                    }
                }
                folded += 1;
            }
            None => kept.push(node),
        }
    }
    out.graph.nodes = kept;
    out.graph.prune_unused_initializers();
    let report = PassReport::new("fold-constants", before, out.graph.nodes.len())
        .note(format!("{folded} nodes evaluated at compile time"));
    Ok((out, report))
}

/// Runs one node on constant inputs; `None` when the result would bloat the model.
fn evaluate(node: &Node, opset: i64, graph: &crate::ir::Graph) -> Result<Option<Vec<Tensor>>> {
    let def = ops::lookup(node, opset)?;
    let inputs = graph.constant_inputs(node);
    let ctx = CompileCtx {
        node,
        opset,
        input_types: inputs
            .iter()
            .map(|t| t.map(|t| crate::ir::TypeInfo::known(t.dtype(), t.shape())))
            .collect(),
        constants: inputs.clone(),
        fused_activation: None,
    };
    let kernel = (def.compile)(&ctx).map_err(|e| e.at_node(node))?;
    let values = kernel
        .run(&inputs, &mut RunCtx::default())
        .map_err(|e| e.at_node(node))?;
    let in_bytes: usize = inputs.iter().flatten().map(|t| t.size_in_bytes()).sum();
    let out_bytes: usize = values.iter().map(Tensor::size_in_bytes).sum();
    if out_bytes > in_bytes + MAX_GROWTH_BYTES {
        return Ok(None);
    }
    Ok(Some(values))
}

/// Fixes the shapes of graph inputs (e.g. batch = 1), turns `Shape` nodes over fully known
/// shapes into constants, then folds constants. The result only accepts inputs of those shapes.
pub fn fold_shapes(
    model: &Model,
    input_shapes: &[(String, Vec<usize>)],
) -> Result<(Model, PassReport)> {
    let mut fixed = model.clone();
    for (name, shape) in input_shapes {
        let input = fixed
            .graph
            .inputs
            .iter_mut()
            .find(|v| &v.name == name)
            .ok_or_else(|| Error::Input {
                name: name.clone(),
                msg: "the model has no such input".into(),
            })?;
        if let Some(dims) = &input.ty.shape {
            if dims.len() != shape.len() {
                return Err(Error::Input {
                    name: name.clone(),
                    msg: format!(
                        "rank {} does not match the declared {}",
                        shape.len(),
                        input.ty
                    ),
                });
            }
        }
        input.ty.shape = Some(shape.iter().map(|&d| Dim::Known(d)).collect());
    }
    let before = fixed.graph.nodes.len();
    let mut shapes_folded = 0;
    // Folding can expose more Shape nodes over now-known values, so iterate to a fixed point.
    loop {
        fixed.graph.value_info.clear();
        infer_shapes(&mut fixed)?;
        let mut changed = false;
        let opset = fixed.opset();
        let mut kept = Vec::with_capacity(fixed.graph.nodes.len());
        for node in std::mem::take(&mut fixed.graph.nodes) {
            if node.op_type == "Shape" && node.domain.is_empty() {
                let concrete = node
                    .input(0)
                    .and_then(|n| fixed.graph.type_of(n))
                    .and_then(|t| t.concrete_shape());
                if let Some(dims) = concrete {
                    let value = shape_value(&node, opset, &dims)?;
                    fixed
                        .graph
                        .initializers
                        .insert(node.outputs[0].clone(), value);
                    shapes_folded += 1;
                    changed = true;
                    continue;
                }
            }
            kept.push(node);
        }
        fixed.graph.nodes = kept;
        let (folded, _) = fold_constants(&fixed)?;
        if folded.graph.nodes.len() != fixed.graph.nodes.len() {
            changed = true;
        }
        fixed = folded;
        if !changed {
            break;
        }
    }
    fixed.graph.prune_unused_initializers();
    let report = PassReport::new("fold-shapes", before, fixed.graph.nodes.len())
        .note(format!("{shapes_folded} Shape nodes became constants"));
    Ok((fixed, report))
}

/// The value of `Shape(x)` for a known shape, honouring opset-15 `start`/`end`.
fn shape_value(node: &Node, opset: i64, dims: &[usize]) -> Result<Tensor> {
    let rank = dims.len() as i64;
    let clamp = |v: i64| -> usize { (if v < 0 { v + rank } else { v }).clamp(0, rank) as usize };
    let (start, end) = if opset >= 15 {
        (
            clamp(node.attr_int_or("start", 0)?),
            clamp(node.attr_int_or("end", rank)?),
        )
    } else {
        (0, dims.len())
    };
    let vals: Vec<i64> = dims[start..end.max(start)]
        .iter()
        .map(|&d| d as i64)
        .collect();
    Tensor::from_i64(vec![vals.len()], vals)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::{Graph, TensorData, TypeInfo, ValueInfo};

    /// `DequantizeLinear(codes) -> reader` next to a graph input `x`.
    fn model(reader: Node) -> Model {
        let mut graph = Graph {
            inputs: vec![ValueInfo::new("x", TypeInfo::known(DType::F32, &[1, 2]))],
            outputs: vec![ValueInfo::new("y", TypeInfo::unknown_shape(DType::F32))],
            nodes: vec![
                Node::new(
                    "dq",
                    "DequantizeLinear",
                    vec!["codes".into(), "scale".into()],
                    vec!["w".into()],
                ),
                reader,
            ],
            ..Graph::default()
        };
        let codes = Tensor::new(vec![2, 2], TensorData::I8(vec![1, -2, 3, -4])).unwrap();
        graph.initializers.insert("codes".into(), codes);
        graph
            .initializers
            .insert("scale".into(), Tensor::scalar_f32(0.5));
        Model::new(graph, 18)
    }

    #[test]
    fn folds_constant_nodes_but_keeps_quantized_product_weights() {
        // Quantized data (codes through a DequantizeLinear): the weight stays codes.
        let mut quantized = model(Node::new(
            "mm",
            "MatMul",
            vec!["xf".into(), "w".into()],
            vec!["y".into()],
        ));
        quantized.graph.nodes.insert(
            0,
            Node::new(
                "dq_x",
                "DequantizeLinear",
                vec!["x".into(), "scale".into()],
                vec!["xf".into()],
            ),
        );
        let (kept, _) = fold_constants(&quantized).unwrap();
        assert_eq!(kept.graph.nodes.len(), 3);
        assert!(kept.graph.initializers.contains_key("codes"));

        // f32 data (weight-only quantization) and other readers: the weight is folded.
        for reader in [
            Node::new(
                "mm",
                "MatMul",
                vec!["x".into(), "w".into()],
                vec!["y".into()],
            ),
            Node::new("add", "Add", vec!["x".into(), "w".into()], vec!["y".into()]),
        ] {
            let (folded, report) = fold_constants(&model(reader)).unwrap();
            assert_eq!(folded.graph.nodes.len(), 1, "{report:?}");
            assert_eq!(
                folded.graph.initializers["w"].as_f32().unwrap(),
                &[0.5, -1.0, 1.5, -2.0]
            );
        }
    }
}
