//! Quantization-aware training: the model the quantize pass would write is simulated in the
//! training engine (fake-quantized weights and activations, straight-through gradients),
//! fine-tuned on labelled data, then written by the same pass with the trained weights and
//! the trained activation ranges.
//!
//! Steps: simplify (BatchNorm folded, as the pass does, so the trained weights are the
//! quantized ones); choose the quantized nodes and tensors with the pass's plan; calibrate the
//! activation ranges as post-training quantization does; install the fake quantizers of
//! [`crate::train::fake_quant`] on every quantized weight and every calibrated activation
//! (including the graph input); train; export `forward(w)` of each weight, which the pass
//! re-encodes onto the same grid (same rules, grid values map onto themselves; k-means weights
//! have exactly `2^b` distinct values, which optimal k-means reproduces), with the learned
//! activation ranges given to [`super::quantize_with_ranges`].

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;

use super::calibrate::{self, CalibProgress};
use super::config::{ActivationCalib, QuantizeConfig, WeightScheme};
use super::plan;
use super::report::QuantizeReport;
use crate::data::dataset::BatchSource;
use crate::error::{Error, Result};
use crate::ir::Model;
use crate::quant::calibrate::Range;
use crate::train::{
    ActRangeMode, ActivationFakeQuant, EpochStats, EvalStats, Event, FakeQuant, KmeansFakeQuant,
    TrainConfig, TrainSet, Trainer, WeightFakeQuant, WeightRangeMode,
};

/// Metadata key of the QAT summary (JSON) in the written model.
pub const QAT_METADATA_KEY: &str = "lithe.qat";

/// Training settings of [`quantize_aware_training`].
#[derive(Clone, Debug)]
pub struct QatConfig {
    pub train: TrainConfig,
    /// Whether activation ranges stay at their calibrated values or are learned.
    pub act_ranges: ActRangeMode,
    /// How each forward pass chooses the weight grids (linear and fixed point).
    pub weight_ranges: WeightRangeMode,
}

impl Default for QatConfig {
    /// One epoch of SGD (momentum 0.9) at a fine-tuning learning rate of 0.001, fixed
    /// activation ranges, min/max weight grids.
    fn default() -> QatConfig {
        QatConfig {
            train: TrainConfig {
                epochs: 1,
                lr: 0.001,
                ..TrainConfig::default()
            },
            act_ranges: ActRangeMode::Fixed,
            weight_ranges: WeightRangeMode::MinMax,
        }
    }
}

/// Progress of [`quantize_aware_training`].
pub enum QatEvent<'a> {
    /// Calibrating the initial activation ranges.
    Calibrate(CalibProgress),
    /// A training step or epoch.
    Train(Event<'a>),
    /// Writing and measuring the quantized model.
    Export(CalibProgress),
}

/// What quantization-aware training did.
#[derive(Clone, Debug, Serialize)]
pub struct QatReport {
    pub act_ranges: String,
    pub weight_ranges: String,
    pub train_samples: usize,
    pub calibration_samples: usize,
    pub epochs: Vec<EpochStats>,
    pub train_seconds: f64,
    /// Test-set loss and accuracy of the fake-quantized model before training (the
    /// post-training quantized model, up to the input's quantization) and after.
    pub fake_quant_before: Option<EvalStats>,
    pub fake_quant_after: Option<EvalStats>,
    /// Activation ranges `(min, max)` as calibrated and as written.
    pub ranges_calibrated: BTreeMap<String, (f32, f32)>,
    pub ranges_final: BTreeMap<String, (f32, f32)>,
}

/// Fine-tunes `model` under simulated quantization with `config`'s scheme and bit widths and
/// writes it as [`super::quantize`] would. `calib` supplies the calibration data (required
/// unless activations stay f32); `test`, when given, is evaluated before and after training.
pub fn quantize_aware_training(
    model: &Model,
    calib: Option<&dyn BatchSource>,
    train: Arc<TrainSet>,
    test: Option<&TrainSet>,
    config: &QuantizeConfig,
    qat: &QatConfig,
    progress: &mut dyn FnMut(QatEvent),
) -> Result<(Model, QuantizeReport, QatReport)> {
    config.validate()?;
    let (simple, _) = crate::passes::simplify(model)?;
    let plan = plan::make_plan(&simple.graph, &config.exclude)?;
    if plan.targets.is_empty() {
        return Err(Error::Graph(
            "quantization-aware training found no Conv, Gemm or MatMul with a constant weight to quantize"
                .into(),
        ));
    }

    let quantize_acts = config.activations != ActivationCalib::None;
    let calib_started = std::time::Instant::now();
    let (calibrated, samples) = if quantize_acts {
        let names = plan.calibrated();
        let obs = calibrate::Observing::new(&simple, &names, config.threads)?;
        calibrate::calibrate_with_config(&obs, calib, &names, config, &mut |p| {
            progress(QatEvent::Calibrate(p))
        })?
    } else {
        (BTreeMap::new(), 0)
    };

    let calib_seconds = calib_started.elapsed().as_secs_f64();

    // The training engine hooks node outputs only: the graph inputs that get quantized pass
    // through an Identity whose output carries their fake quantizer (simplification removes
    // it again when the model is written).
    let original_weights: BTreeMap<String, crate::ir::Tensor> = plan
        .targets
        .iter()
        .filter_map(|t| {
            let w = simple.graph.initializers.get(&t.weight)?;
            Some((t.weight.clone(), w.clone()))
        })
        .collect();
    let mut simple = simple;
    let graph_inputs: HashSet<String> =
        simple.graph.inputs.iter().map(|v| v.name.clone()).collect();
    let mut hooked: BTreeMap<String, String> = BTreeMap::new();
    for name in calibrated.keys().filter(|n| graph_inputs.contains(*n)) {
        let q = format!("{name}__qat_input");
        for node in &mut simple.graph.nodes {
            for i in node.inputs.iter_mut().filter(|i| *i == name) {
                *i = q.clone();
            }
        }
        simple.graph.nodes.insert(
            0,
            crate::ir::Node::new(
                format!("{name}__qat_input_quant"),
                "Identity",
                vec![name.clone()],
                vec![q.clone()],
            ),
        );
        hooked.insert(name.clone(), q);
    }

    let mut trainer = Trainer::new(simple, qat.train.clone())?;
    if let Some(p) = train.preprocess() {
        trainer.set_preprocess(&p.to_string());
    }
    let mut weight_fq: Vec<(String, Arc<dyn FakeQuant>)> = Vec::new();
    let mut seen = HashSet::new();
    for t in &plan.targets {
        if !seen.insert(t.weight.clone()) {
            continue;
        }
        let fq: Arc<dyn FakeQuant> = if config.scheme == WeightScheme::Kmeans {
            let w = trainer
                .params
                .get(&t.weight)
                .ok_or_else(|| Error::Tensor {
                    name: t.weight.clone(),
                    msg: "weight is not a training parameter".into(),
                })?
                .value
                .clone();
            let (fq, snapped) = KmeansFakeQuant::new(&w, config.weight_bits, &t.weight)?;
            trainer.params.set_value(&t.weight, snapped)?;
            Arc::new(fq)
        } else {
            Arc::new(
                WeightFakeQuant::new(
                    config.scheme,
                    config.weight_bits,
                    config.per_channel,
                    t.weight_axis,
                    &t.weight,
                )?
                .with_range(qat.weight_ranges),
            )
        };
        trainer.params.set_fake_quant(&t.weight, Some(fq.clone()))?;
        weight_fq.push((t.weight.clone(), fq));
    }
    let mut act_fq: Vec<(String, Arc<ActivationFakeQuant>)> = Vec::new();
    for (name, r) in &calibrated {
        let fq = Arc::new(ActivationFakeQuant::new(
            *r,
            config.scheme,
            config.activation_bits,
            qat.act_ranges,
            name,
        )?);
        let value = hooked.get(name).unwrap_or(name);
        trainer
            .graph_mut()
            .set_activation_fake_quant(value, Some(fq.clone()))?;
        act_fq.push((name.clone(), fq));
    }

    let before = test.map(|t| trainer.evaluate(t)).transpose()?;
    let started = Instant::now();
    act_fq.iter().for_each(|(_, f)| f.set_observing(true));
    let fitted = trainer.fit(train.clone(), None, &mut |e| progress(QatEvent::Train(e)));
    act_fq.iter().for_each(|(_, f)| f.set_observing(false));
    fitted?;
    let train_seconds = started.elapsed().as_secs_f64();
    let after = test.map(|t| trainer.evaluate(t)).transpose()?;

    let mut tuned = trainer.export();
    for (name, fq) in &weight_fq {
        let p = trainer.params.get(name).ok_or_else(|| Error::Tensor {
            name: name.clone(),
            msg: "weight is not a training parameter".into(),
        })?;
        tuned
            .graph
            .initializers
            .insert(name.clone(), fq.forward(&p.value)?);
    }
    let mut ranges = calibrated.clone();
    for (name, fq) in &act_fq {
        ranges.insert(name.clone(), fq.range());
    }
    let mut export_progress = |p| progress(QatEvent::Export(p));
    let (mut out, mut report) = if quantize_acts {
        super::quantize_with_ranges(&tuned, calib, config, &ranges, &mut export_progress)?
    } else {
        super::quantize(&tuned, None, config, &mut export_progress)?
    };
    report.calibration_samples = samples;
    report.calibration_seconds = calib_seconds;
    // The export sees weights already on their grid, so its own SQNR would be infinite; the
    // useful figure is the distance of the shipped weights from the original f32 ones
    // (quantization and fine-tuning together).
    for layer in &mut report.layers {
        let Some(target) = plan.targets.iter().find(|t| t.name == layer.node) else {
            continue;
        };
        if let (Some(orig), Some(shipped)) = (
            original_weights.get(&target.weight),
            tuned.graph.initializers.get(&target.weight),
        ) {
            layer.weight_sqnr_db =
                crate::quant::linear::sqnr_db(orig.as_f32()?, shipped.as_f32()?)?;
        }
    }
    let pairs = |m: &BTreeMap<String, Range>| -> BTreeMap<String, (f32, f32)> {
        m.iter().map(|(k, r)| (k.clone(), (r.min, r.max))).collect()
    };
    let qat_report = QatReport {
        act_ranges: qat.act_ranges.to_string(),
        weight_ranges: qat.weight_ranges.to_string(),
        train_samples: train.len(),
        calibration_samples: samples,
        epochs: trainer.history.clone(),
        train_seconds,
        fake_quant_before: before,
        fake_quant_after: after,
        ranges_calibrated: pairs(&calibrated),
        ranges_final: pairs(&ranges),
    };
    let summary = serde_json::json!({
        "epochs": qat.train.epochs,
        "lr": qat.train.lr,
        "batch": qat.train.batch,
        "optimizer": qat.train.optimizer.to_string(),
        "act_ranges": qat_report.act_ranges,
        "weight_ranges": qat_report.weight_ranges,
        "train_samples": qat_report.train_samples,
        "test_accuracy": qat_report.fake_quant_after.as_ref().map(|s| s.accuracy),
    });
    out.set_metadata(QAT_METADATA_KEY, summary.to_string());
    Ok((out, report, qat_report))
}
