//! Shape and type inference over a whole graph: every op's rule applied in topological order,
//! results recorded in `Graph::value_info`.

use std::collections::HashMap;

use crate::error::Result;
use crate::ir::{Model, TypeInfo};
use crate::ops::{self, InferCtx};

/// Fills `value_info` with the inferred type of every node output. Types already declared in
/// the file are replaced when inference knows more (a declared `?` becomes a number).
pub fn infer_shapes(model: &mut Model) -> Result<()> {
    let opset = model.opset();
    let graph = &mut model.graph;
    let mut known: HashMap<String, TypeInfo> = HashMap::new();
    for v in &graph.inputs {
        known.insert(v.name.clone(), v.ty.clone());
    }
    for (name, t) in &graph.initializers {
        known.insert(name.clone(), TypeInfo::known(t.dtype(), t.shape()));
    }
    let mut inferred = Vec::new();
    for node in &graph.nodes {
        let def = ops::lookup(node, opset)?;
        let input_types = node
            .inputs
            .iter()
            .map(|n| {
                if n.is_empty() {
                    None
                } else {
                    known
                        .get(n)
                        .cloned()
                        .or_else(|| graph.value_info.get(n).cloned())
                }
            })
            .collect();
        let constants = graph.constant_inputs(node);
        let ctx = InferCtx {
            node,
            opset,
            input_types,
            constants,
        };
        let types = (def.infer)(&ctx).map_err(|e| e.at_node(node))?;
        for (name, ty) in node.outputs.iter().zip(types) {
            if name.is_empty() {
                continue;
            }
            let merged = match graph.value_info.get(name) {
                Some(declared) => more_specific(declared, &ty),
                None => ty,
            };
            known.insert(name.clone(), merged.clone());
            inferred.push((name.clone(), merged));
        }
    }
    for (name, ty) in inferred {
        graph.value_info.insert(name, ty);
    }
    for out in &mut graph.outputs {
        if let Some(ty) = known.get(&out.name) {
            out.ty = more_specific(&out.ty, ty);
        }
    }
    Ok(())
}

/// Per dimension, prefers a known size, then a symbol, then unknown.
fn more_specific(a: &TypeInfo, b: &TypeInfo) -> TypeInfo {
    use crate::ir::Dim;
    let shape = match (&a.shape, &b.shape) {
        (Some(x), Some(y)) if x.len() == y.len() => Some(
            x.iter()
                .zip(y)
                .map(|(p, q)| match (p, q) {
                    (Dim::Known(_), _) => p.clone(),
                    (_, Dim::Known(_)) => q.clone(),
                    (Dim::Sym(_), _) => p.clone(),
                    _ => q.clone(),
                })
                .collect(),
        ),
        (Some(x), _) => Some(x.clone()),
        (None, y) => y.clone(),
    };
    TypeInfo {
        dtype: b.dtype,
        shape,
    }
}
