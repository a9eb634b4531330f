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
use super::plan;
use super::quantize_with_ranges;
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

/// Ranks the layers `config` would quantize by how much each alone degrades the output, on
/// the first `samples` samples of `calib` (most sensitive first). `config.exclude` is honoured.
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
    let names: Vec<String> = full.targets.iter().map(|t| t.name.clone()).collect();
    let mut rows = Vec::new();
    for (k, t) in full.targets.iter().enumerate() {
        let others: Vec<String> = names.iter().filter(|n| **n != t.name).cloned().collect();
        let mut exclude = config.exclude.clone();
        exclude.extend(others);
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
        let (layer_sqnr_db, layer_agreement) = if quantize_acts {
            let (ql, _) = quantize_with_ranges(&simple, None, &alone, &ranges, &mut |_| {})?;
            run(&ql)?
        } else {
            (weights_sqnr_db, weights_agreement)
        };
        rows.push(LayerSensitivity {
            node: t.name.clone(),
            op: t.op.clone(),
            weights_sqnr_db,
            layer_sqnr_db,
            weights_agreement,
            layer_agreement,
        });
        progress(CalibProgress {
            phase: "sensitivity",
            done: k + 1,
            total: full.targets.len(),
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
