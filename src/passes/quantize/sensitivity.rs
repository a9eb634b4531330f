//! Per-layer sensitivity: how much quantizing each layer on its own moves the model's output.
//! One layer at a time is quantized (its weights alone, then its weights and the activations
//! around it) while the rest stays f32, and the outputs on calibration samples are compared
//! with the f32 model's. The layers at the top of the ranking are the ones worth keeping in
//! f32 (`--exclude`) when the fully quantized model loses too much.
//!
//! Activation ranges are calibrated once for every tensor the full plan quantizes, so each
//! single-layer model uses the same ranges as the full model would.

use std::collections::BTreeMap;

use serde::Serialize;

use super::calibrate::{self, CalibProgress, Observing};
use super::config::{ActivationCalib, QuantFormat, QuantizeConfig};
use super::quantize_with_ranges;
use super::{embedding, plan};
use crate::data::dataset::BatchSource;
use crate::error::{Error, Result};
use crate::ir::{Model, Tensor};
use crate::quant::calibrate::Range;
use crate::runtime::{Session, SessionOptions};

/// The effect of quantizing one layer alone.
#[derive(Clone, Debug, Serialize)]
pub struct LayerSensitivity {
    pub node: String,
    pub op: String,
    /// Output SQNR (dB) of the model with only this layer's weights quantized.
    pub weights_sqnr_db: f64,
    /// Output SQNR (dB) with this layer's weights and its input/output activations quantized.
    pub layer_sqnr_db: f64,
    /// Fraction of samples whose top-1 class is unchanged (models with one [N, classes]
    /// output), weights only and whole layer.
    pub weights_agreement: Option<f64>,
    pub layer_agreement: Option<f64>,
}

/// Signal-to-noise ratio of `got` against `want`, in dB.
fn sqnr_db(want: &[f32], got: &[f32]) -> f64 {
    let (mut s, mut n) = (0f64, 0f64);
    for (&w, &g) in want.iter().zip(got) {
        s += f64::from(w) * f64::from(w);
        let d = f64::from(w) - f64::from(g);
        n += d * d;
    }
    if n == 0.0 {
        f64::INFINITY
    } else {
        10.0 * (s / n).log10()
    }
}

fn top1(scores: &[f32], classes: usize) -> Vec<usize> {
    scores
        .chunks(classes)
        .map(|r| (0..classes).fold(0, |b, i| if r[i] > r[b] { i } else { b }))
        .collect()
}

/// Samples per run: bounds the activation memory of large models.
const CHUNK: usize = 32;

/// The feeds of the first `n` samples of `source` (see [`calibrate::fed_inputs`]), in chunks
/// of [`CHUNK`]: read once, and run through every single-layer model.
type Chunks = Vec<Vec<(String, Tensor)>>;

fn read_chunks(source: &dyn BatchSource, inputs: &[String], n: usize) -> Result<Chunks> {
    (0..n)
        .step_by(CHUNK)
        .map(|start| calibrate::read_feeds(source, inputs, start, CHUNK.min(n - start)))
        .collect()
}

/// Runs `model` on `chunks`; returns each output's values in graph order, and whether the
/// first output is a [N, classes] matrix.
fn outputs(model: &Model, chunks: &Chunks) -> Result<(Vec<Vec<f32>>, bool)> {
    let (simple, _) = crate::passes::simplify(model)?;
    let session = Session::new(&simple, &SessionOptions::default())?;
    let mut out: Vec<Vec<f32>> = Vec::new();
    let mut classes = true;
    for chunk in chunks {
        let feeds: Vec<(&str, Tensor)> =
            chunk.iter().map(|(k, x)| (k.as_str(), x.clone())).collect();
        let got = session.run(&feeds)?;
        classes &= got.first().is_some_and(|(_, t)| t.rank() == 2);
        out.resize_with(got.len(), Vec::new);
        for (o, (_, t)) in out.iter_mut().zip(got) {
            o.extend(t.to_f32_vec());
        }
    }
    Ok((out, classes))
}

/// SQNR over all outputs and the top-1 agreement of the first output when it holds one row of
/// class scores per sample.
fn compare(want: &[Vec<f32>], got: &[Vec<f32>], samples: usize) -> (f64, Option<f64>) {
    let w: Vec<f32> = want.iter().flatten().copied().collect();
    let g: Vec<f32> = got.iter().flatten().copied().collect();
    let agreement = match (want.first(), got.first()) {
        (Some(a), Some(b)) if samples > 0 && a.len() == b.len() && a.len() % samples == 0 => {
            let classes = a.len() / samples;
            (classes >= 2).then(|| {
                let (ta, tb) = (top1(a, classes), top1(b, classes));
                ta.iter().zip(&tb).filter(|(x, y)| x == y).count() as f64 / samples as f64
            })
        }
        _ => None,
    };
    (sqnr_db(&w, &g), agreement)
}

/// Ranks the layers `config` would quantize (embedding tables included) by how much each
/// alone degrades the output, on the first `samples` samples of `calib` (most sensitive
/// first). `config.exclude` is honoured.
pub fn sensitivity(
    model: &Model,
    calib: &dyn BatchSource,
    config: &QuantizeConfig,
    samples: usize,
    progress: &mut dyn FnMut(CalibProgress),
) -> Result<Vec<LayerSensitivity>> {
    config.validate()?;
    let (simple, _) = crate::passes::simplify(model)?;
    let full = plan::make_plan(&simple.graph, &config.exclude)?;
    let quantize_acts = config.activations != ActivationCalib::None;
    let ranges: BTreeMap<String, Range> = if quantize_acts && !full.targets.is_empty() {
        // Every tensor, shared ones included: a layer quantized alone has no upstream layer
        // to share its input's parameters with.
        let obs = Observing::new(&simple, &full.tensors, config.threads)?;
        calibrate::calibrate_with_config(&obs, Some(calib), &full.tensors, config, progress)?.0
    } else {
        BTreeMap::new()
    };
    let n = samples.min(calib.len());
    if n == 0 {
        return Err(Error::Data(format!(
            "sensitivity analysis needs samples; {} is empty",
            calib.name()
        )));
    }
    let wanted: Vec<&str> = simple
        .graph
        .inputs
        .iter()
        .map(|v| v.name.as_str())
        .collect();
    let chunks = read_chunks(calib, &calibrate::fed_inputs(&wanted, calib)?, n)?;
    let (reference, classes) = outputs(&simple, &chunks)?;
    // Top-1 agreement only means something for class scores, one row per sample.
    let rows_of_scores = if classes { n } else { 0 };
    let run = |m: &Model| -> Result<(f64, Option<f64>)> {
        Ok(compare(&reference, &outputs(m, &chunks)?.0, rows_of_scores))
    };
    // Embedding tables are layers too: each is ranked on its own, and every other
    // single-layer model keeps them f32 so its row carries only its own layer's error.
    let tables = embedding::find(&simple.graph, &config.exclude)?;
    let layers: Vec<(String, String)> = full
        .targets
        .iter()
        .map(|t| (t.name.clone(), t.op.clone()))
        .chain(
            tables
                .iter()
                .map(|t| (t.name.clone(), "Gather".to_string())),
        )
        .collect();
    let mut rows = Vec::new();
    for (k, (name, op)) in layers.iter().enumerate() {
        let mut exclude = config.exclude.clone();
        exclude.extend(
            layers
                .iter()
                .filter(|(n, _)| n != name)
                .map(|(n, _)| n.clone()),
        );
        let alone = QuantizeConfig {
            exclude,
            measure_activation_sqnr: false,
            ..config.clone()
        };
        let weights_only = QuantizeConfig {
            activations: ActivationCalib::None,
            format: QuantFormat::Qdq,
            ..alone.clone()
        };
        let empty = BTreeMap::new();
        let (qw, _) = quantize_with_ranges(&simple, None, &weights_only, &empty, &mut |_| {})?;
        let (weights_sqnr_db, weights_agreement) = run(&qw)?;
        // A table has no activations of its own: quantizing it is the whole layer.
        let is_table = k >= full.targets.len();
        let (layer_sqnr_db, layer_agreement) = if quantize_acts && !is_table {
            let (ql, _) = quantize_with_ranges(&simple, None, &alone, &ranges, &mut |_| {})?;
            run(&ql)?
        } else {
            (weights_sqnr_db, weights_agreement)
        };
        rows.push(LayerSensitivity {
            node: name.clone(),
            op: op.clone(),
            weights_sqnr_db,
            layer_sqnr_db,
            weights_agreement,
            layer_agreement,
        });
        progress(CalibProgress {
            phase: "sensitivity",
            done: k + 1,
            total: layers.len(),
        });
    }
    rows.sort_by(|a, b| a.layer_sqnr_db.total_cmp(&b.layer_sqnr_db));
    Ok(rows)
}

fn percent(v: Option<f64>) -> String {
    v.map_or_else(|| "-".into(), |a| format!("{:.2} %", a * 100.0))
}

/// A plain-text ranking, most sensitive layer first, with the `--exclude` flags that keep the
/// worst three in f32.
pub fn sensitivity_table(rows: &[LayerSensitivity], samples: usize) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "sensitivity: each layer quantized alone, output compared with f32 on {samples} samples (most sensitive first)"
    );
    let w = rows
        .iter()
        .map(|r| r.node.len())
        .max()
        .unwrap_or(4)
        .clamp(4, 40);
    let _ = writeln!(
        s,
        "{:<w$}  {:<7}  {:>15}  {:>10}  {:>15}  {:>10}",
        "node", "op", "weights SQNR dB", "agreement", "layer SQNR dB", "agreement"
    );
    for r in rows {
        let name = super::report::fit_name(&r.node, w);
        let _ = writeln!(
            s,
            "{name:<w$}  {:<7}  {:>15.1}  {:>10}  {:>15.1}  {:>10}",
            r.op,
            r.weights_sqnr_db,
            percent(r.weights_agreement),
            r.layer_sqnr_db,
            percent(r.layer_agreement)
        );
    }
    if rows.len() > 1 {
        let flags: Vec<String> = rows
            .iter()
            .take(3.min(rows.len() - 1))
            .map(|r| format!("--exclude {}", r.node))
            .collect();
        let _ = writeln!(s, "to keep the most sensitive in f32: {}", flags.join(" "));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::dataset::TensorSource;
    use crate::ir::{Attr, DType, Graph, Node, TypeInfo, ValueInfo};

    /// `y = Gather(table, Cast(ids)) x w`: a [128, 64] embedding table of arbitrary values
    /// and a [64, 8] weight every column of which sits exactly on its own int8 grid (values
    /// k/128 with |k| <= 127 and one |k| = 127 per column), so quantizing `w` alone is exact.
    fn embed_then_project() -> Model {
        let table = (0..128 * 64)
            .map(|i| ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * (1 + i / 64) as f32)
            .collect();
        let w = (0..64 * 8)
            .map(|i| match i / 8 {
                0 => 127.0 / 128.0,
                r => ((r * 31 + i % 8 * 17) % 255) as f32 / 128.0 - 127.0 / 128.0,
            })
            .collect();
        let mut cast = Node::new("to_ids", "Cast", vec!["x".into()], vec!["ids".into()]);
        cast.attrs
            .insert("to".into(), Attr::Int(DType::I64.onnx_code() as i64));
        let mut graph = Graph {
            inputs: vec![ValueInfo::new("x", TypeInfo::unknown_shape(DType::F32))],
            outputs: vec![ValueInfo::new("y", TypeInfo::unknown_shape(DType::F32))],
            nodes: vec![
                cast,
                Node::new(
                    "embed",
                    "Gather",
                    vec!["table".into(), "ids".into()],
                    vec!["e".into()],
                ),
                Node::new(
                    "project",
                    "MatMul",
                    vec!["e".into(), "w".into()],
                    vec!["y".into()],
                ),
            ],
            ..Graph::default()
        };
        graph.initializers.insert(
            "table".into(),
            Tensor::from_f32(vec![128, 64], table).unwrap(),
        );
        graph
            .initializers
            .insert("w".into(), Tensor::from_f32(vec![64, 8], w).unwrap());
        Model::new(graph, 13)
    }

    #[test]
    fn embedding_tables_get_their_own_row_and_stay_f32_in_the_others() {
        let ids = (0..40).map(|i| (i * 37 % 128) as f32).collect();
        let x = Tensor::from_f32(vec![10, 4], ids).unwrap();
        let source = TensorSource::new("ids", x, None).unwrap();
        let config = QuantizeConfig {
            activations: ActivationCalib::None,
            threads: 1,
            ..QuantizeConfig::default()
        };
        let rows = sensitivity(&embed_then_project(), &source, &config, 10, &mut |_| {}).unwrap();
        let row = |name: &str| rows.iter().find(|r| r.node == name).expect(name);
        assert_eq!(rows.len(), 2);
        assert_eq!(row("embed").op, "Gather");
        let table_db = row("embed").weights_sqnr_db;
        assert!(table_db.is_finite() && table_db < 60.0, "{table_db}");
        // The projection's row measures its own (exact) weights, not the table's error.
        let project_db = row("project").weights_sqnr_db;
        assert!(project_db > table_db + 40.0, "{project_db} vs {table_db}");
        assert_eq!(rows[0].node, "embed", "most sensitive first");
    }

    #[test]
    fn compare_scores_sqnr_and_agreement_per_sample() {
        let want = vec![vec![0.9, 0.1, 0.2, 0.8]];
        assert_eq!(compare(&want, &want, 2), (f64::INFINITY, Some(1.0)));
        // The second sample's top-1 moves: half agree; noise 0.7^2 + 0.7^2 against 1.5.
        let got = vec![vec![0.9, 0.1, 0.9, 0.1]];
        let (db, agree) = compare(&want, &got, 2);
        assert_eq!(agree, Some(0.5));
        assert!((db - 10.0 * (1.5f64 / 0.98).log10()).abs() < 1e-6, "{db}");
        // One score per sample is not a classification: no agreement.
        assert_eq!(compare(&[vec![1.0, 2.0]], &[vec![1.0, 2.0]], 2).1, None);
    }
}
