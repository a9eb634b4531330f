//! Embedding tables: a Gather along axis 0 of a constant f32 matrix (a transformer's word and
//! position embeddings) keeps the table as codes and decodes only the rows it gathers, so the
//! file holds one byte per value and no run decodes the whole table. Linear schemes get a
//! scale per row, gathered with the row: `Gather(codes) -> Cast -> Mul(Gather(row scales))`
//! (a DequantizeLinear after the Gather could only take one scale for the whole table, and
//! one outlier row then costs every other row its resolution). Codebook schemes gather codes
//! and look them up: `Gather(codes) -> Cast -> Gather(codebook)`.

use super::edit::{add_init, dequantize_node, lookup_nodes, node, zero_point_tensor};
use super::weights::{self, Encoded, EncodedWeight};
use crate::error::Result;
use crate::ir::{Attr, DType, Graph, Tensor};

/// Smaller tables (a BERT's two segment embeddings) are not worth the extra node.
const MIN_VALUES: usize = 4096;

/// A Gather whose table gets stored as codes.
#[derive(Clone, Debug)]
pub struct Table {
    pub name: String,
    pub table: String,
}

/// The Gathers of `graph` whose table is a constant f32 matrix of at least [`MIN_VALUES`]
/// values that nothing else reads, minus the nodes named in `exclude`.
pub fn find(graph: &Graph, exclude: &[String]) -> Result<Vec<Table>> {
    let mut out = Vec::new();
    for node in &graph.nodes {
        if node.op_type != "Gather" || !node.domain.is_empty() {
            continue;
        }
        let name = node.display_name();
        let Some(table) = node.input(0) else { continue };
        let Some(t) = graph.initializers.get(table) else {
            continue;
        };
        let readers = graph
            .nodes
            .iter()
            .filter(|n| n.inputs.iter().any(|i| i == table))
            .count();
        let shared = readers > 1 || graph.outputs.iter().any(|o| o.name == table);
        if t.dtype() != DType::F32
            || t.rank() != 2
            || t.numel() < MIN_VALUES
            || node.attr_int_or("axis", 0)? != 0
            || shared
            || exclude.contains(&name)
        {
            continue;
        }
        out.push(Table {
            name,
            table: table.to_string(),
        });
    }
    Ok(out)
}

/// Encodes one table with `scheme` at `bits`: per row where the scheme has parameters per
/// channel and zero points of 0 (what [`apply`]'s `Mul` decodes), else per tensor.
pub fn encode(
    graph: &Graph,
    t: &Table,
    scheme: super::WeightScheme,
    bits: u32,
) -> Result<EncodedWeight> {
    let w = &graph.initializers[&t.table];
    let rows = weights::encode(w, &t.table, scheme, bits, true, 0)?;
    match &rows.enc {
        Encoded::Linear { zero_points, .. } if zero_points.iter().any(|&z| z != 0) => {
            weights::encode(w, &t.table, scheme, bits, false, 0)
        }
        _ => Ok(rows),
    }
}

/// Replaces each table by its codes and decodes the gathered rows under the Gather's
/// original output name.
pub fn apply(graph: &mut Graph, tables: &[(Table, EncodedWeight)]) -> Result<()> {
    for (t, enc) in tables {
        let Some(i) = graph
            .nodes
            .iter()
            .position(|n| n.display_name() == t.name && n.input(0) == Some(t.table.as_str()))
        else {
            continue;
        };
        let Some(out) = graph.nodes[i].outputs.first().cloned() else {
            continue;
        };
        graph.initializers.remove(&t.table);
        let gathered = graph.fresh_name(&format!("{out}_codes"));
        let decode = match &enc.enc {
            Encoded::Linear {
                codes,
                scales,
                zero_points,
                axis: Some(_),
            } if zero_points.iter().all(|&z| z == 0) => {
                let q = add_init(graph, &format!("{}_quantized", t.table), codes.clone());
                // [rows, 1]: the gathered scales broadcast over each row's values.
                let s = add_init(
                    graph,
                    &format!("{}_row_scale", t.table),
                    Tensor::from_f32(vec![scales.len(), 1], scales.clone())?,
                );
                graph.nodes[i].inputs[0] = q;
                let ids = graph.nodes[i].inputs[1].clone();
                let real = graph.fresh_name(&format!("{out}_values"));
                let cast = node(
                    graph,
                    &format!("{out}_Cast"),
                    "Cast",
                    vec![gathered.clone()],
                    vec![real.clone()],
                )
                .with_attr("to", Attr::Int(i64::from(DType::F32.onnx_code())));
                let row_scales = graph.fresh_name(&format!("{out}_row_scales"));
                let gather_scales = node(
                    graph,
                    &format!("{out}_Gather_scales"),
                    "Gather",
                    vec![s, ids],
                    vec![row_scales.clone()],
                )
                .with_attr("axis", Attr::Int(0));
                let mul = node(
                    graph,
                    &format!("{out}_Mul"),
                    "Mul",
                    vec![real, row_scales],
                    vec![out.clone()],
                );
                vec![cast, gather_scales, mul]
            }
            Encoded::Linear {
                codes,
                scales,
                zero_points,
                ..
            } => {
                let q = add_init(graph, &format!("{}_quantized", t.table), codes.clone());
                let s = add_init(
                    graph,
                    &format!("{}_scale", t.table),
                    Tensor::scalar_f32(scales[0]),
                );
                let z = add_init(
                    graph,
                    &format!("{}_zero_point", t.table),
                    zero_point_tensor(DType::I8, &zero_points[..1], true)?,
                );
                graph.nodes[i].inputs[0] = q;
                vec![dequantize_node(graph, &gathered, &out, &s, &z)]
            }
            Encoded::Codebook { codes, table } => {
                let c = add_init(graph, &format!("{}_codes", t.table), codes.clone());
                let book = add_init(
                    graph,
                    &format!("{}_codebook", t.table),
                    Tensor::from_f32(vec![table.len()], table.clone())?,
                );
                graph.nodes[i].inputs[0] = c;
                lookup_nodes(graph, &gathered, &book, &out)
            }
        };
        graph.nodes[i].outputs[0] = gathered;
        graph.nodes.extend(decode);
    }
    graph.topo_sort()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::{Dim, Model, Node, TensorData, TypeInfo, ValueInfo};
    use crate::passes::quantize::WeightScheme;
    use crate::runtime::{Session, SessionOptions};

    /// `y = Gather(table, ids)` with a [rows, 64] table whose row `r` spans +-(r + 1).
    fn lookup(rows: usize) -> Model {
        let cols = 64;
        let v = (0..rows * cols)
            .map(|i| ((i % cols) as f32 / cols as f32 - 0.5) * 2.0 * (1 + i / cols) as f32)
            .collect();
        let mut graph = Graph {
            inputs: vec![ValueInfo::new(
                "ids",
                TypeInfo::new(DType::I64, vec![Dim::Known(1), Dim::Known(3)]),
            )],
            outputs: vec![ValueInfo::new("y", TypeInfo::unknown_shape(DType::F32))],
            nodes: vec![Node::new(
                "embed",
                "Gather",
                vec!["table".into(), "ids".into()],
                vec!["y".into()],
            )],
            ..Graph::default()
        };
        graph.initializers.insert(
            "table".into(),
            Tensor::from_f32(vec![rows, cols], v).unwrap(),
        );
        Model::new(graph, 13)
    }

    fn run(m: &Model, ids: &[i64]) -> Vec<f32> {
        let s = Session::new(m, &SessionOptions::default()).unwrap();
        let x = Tensor::new(vec![1, ids.len()], TensorData::I64(ids.to_vec())).unwrap();
        s.run(&[("ids", x)]).unwrap()[0].1.to_f32_vec()
    }

    #[test]
    fn gathered_rows_decode_with_their_own_scale() {
        let m = lookup(100);
        let ids = [0, 57, 99];
        let want = run(&m, &ids);
        for scheme in [WeightScheme::Linear, WeightScheme::Kmeans] {
            let tables: Vec<(Table, EncodedWeight)> = find(&m.graph, &[])
                .unwrap()
                .into_iter()
                .map(|t| {
                    let e = encode(&m.graph, &t, scheme, 8).unwrap();
                    (t, e)
                })
                .collect();
            assert_eq!(tables.len(), 1);
            let mut q = m.clone();
            apply(&mut q.graph, &tables).unwrap();
            assert!(!q.graph.initializers.contains_key("table"));
            let got = run(&q, &ids);
            assert_eq!(got.len(), want.len());
            // Linear: half a step of each row's own grid (row 0 spans +-1, so a shared
            // per-tensor scale from row 99's +-100 would miss by up to 0.4 there).
            for (k, (g, w)) in got.iter().zip(&want).enumerate() {
                let row = ids[k / 64] as f32 + 1.0;
                let tol = match scheme {
                    WeightScheme::Linear => row / 127.0 * 0.5 + 1e-6,
                    _ => 0.5,
                };
                assert!((g - w).abs() <= tol, "{scheme:?} value {k}: {g} vs {w}");
            }
        }
    }

    #[test]
    fn small_shared_or_excluded_tables_stay_f32() {
        assert!(find(&lookup(10).graph, &[]).unwrap().is_empty());
        assert!(find(&lookup(100).graph, &["embed".into()])
            .unwrap()
            .is_empty());
        let mut shared = lookup(100);
        shared
            .graph
            .outputs
            .push(ValueInfo::new("table", TypeInfo::unknown_shape(DType::F32)));
        assert!(find(&shared.graph, &[]).unwrap().is_empty());
    }
}
