//! Removes nodes that pass their input through unchanged at inference: `Identity` and
//! `Dropout` (whose mask output nobody reads).

use std::collections::HashMap;

use super::PassReport;
use crate::error::Result;
use crate::ir::Model;

pub fn remove_identities(model: &Model) -> Result<(Model, PassReport)> {
    let mut out = model.clone();
    let before = out.graph.nodes.len();
    let uses = out.graph.use_counts();
    let graph_outputs: Vec<String> = out.graph.outputs.iter().map(|v| v.name.clone()).collect();
    let mut rename: HashMap<String, String> = HashMap::new();
    let mut kept = Vec::with_capacity(out.graph.nodes.len());
    for node in std::mem::take(&mut out.graph.nodes) {
        let passthrough = node.domain.is_empty()
            && match node.op_type.as_str() {
                "Identity" => true,
                "Dropout" => node
                    .outputs
                    .iter()
                    .skip(1)
                    .all(|m| m.is_empty() || !uses.contains_key(m)),
                _ => false,
            };
        let (Some(src), Some(dst)) = (node.input(0), node.outputs.first()) else {
            kept.push(node);
            continue;
        };
        // A graph output must keep its name, so such nodes stay.
        if !passthrough || graph_outputs.contains(dst) {
            kept.push(node);
            continue;
        }
        let src = rename.get(src).cloned().unwrap_or_else(|| src.to_string());
        rename.insert(dst.clone(), src);
    }
    for node in &mut kept {
        for inp in &mut node.inputs {
            if let Some(r) = rename.get(inp) {
                *inp = r.clone();
            }
        }
    }
    out.graph.nodes = kept;
    let removed = before - out.graph.nodes.len();
    Ok((
        out,
        PassReport::new("remove-identities", before, before - removed)
            .note(format!("{removed} pass-through nodes removed")),
    ))
}
