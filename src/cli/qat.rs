//! `lithe quantize MODEL --qat --data mnist [--epochs N --lr X ...] -o OUT.onnx`:
//! quantization-aware training before writing the quantized model.

use std::sync::Arc;

use anyhow::{bail, Context, Result};
use lithe::data::dataset::{BatchSource, Split};
use lithe::data::preprocess::Preprocess;
use lithe::ir::Model;
use lithe::passes::quantize::{
    quantize_aware_training, QatConfig, QatEvent, QatReport, QuantizeConfig, QuantizeReport,
};
use lithe::train::{ActRangeMode, Event, OptimizerKind, TrainConfig, TrainSet, WeightRangeMode};

use super::common::progress;

#[derive(clap::Args)]
pub struct QatArgs {
    /// Quantization-aware training: fine-tune under simulated quantization before writing.
    #[arg(long)]
    pub qat: bool,
    /// QAT training data: `mnist`, `fashion-mnist`, a folder of labelled images or an .npz
    /// (default: the calibration data).
    #[arg(long, requires = "qat")]
    pub data: Option<String>,
    /// QAT epochs.
    #[arg(long, requires = "qat", default_value_t = 1)]
    pub epochs: usize,
    /// QAT learning rate.
    #[arg(long, requires = "qat", default_value_t = 0.001)]
    pub lr: f32,
    /// QAT optimizer: sgd, nesterov, adam or adamw.
    #[arg(long, requires = "qat", default_value = "sgd")]
    pub optimizer: String,
    /// Momentum of QAT's SGD and Nesterov.
    #[arg(long, requires = "qat", default_value_t = 0.9)]
    pub momentum: f32,
    /// QAT mini-batch size.
    #[arg(long, requires = "qat", default_value_t = 64)]
    pub train_batch: usize,
    /// Train on the first N training samples only.
    #[arg(long, requires = "qat")]
    pub train_limit: Option<usize>,
    /// Seed of the QAT sample order (same seed and thread count give the same bits).
    #[arg(long, requires = "qat", default_value_t = 0)]
    pub seed: u64,
    /// Activation ranges during QAT: fixed (as calibrated) or ema[=MOMENTUM] (learned as a
    /// moving average of the batch min/max, default momentum 0.99).
    #[arg(long, requires = "qat", default_value = "fixed")]
    pub act_ranges: String,
    /// Weight grids during QAT (linear and fixed point): minmax, or mse (the clipping
    /// threshold of least squared error, for 2 and 3 bits).
    #[arg(long, requires = "qat", default_value = "minmax")]
    pub weight_ranges: String,
}

fn optimizer(a: &QatArgs) -> Result<OptimizerKind> {
    Ok(match a.optimizer.to_ascii_lowercase().as_str() {
        "sgd" => OptimizerKind::sgd(a.momentum),
        "nesterov" => OptimizerKind::Sgd {
            momentum: a.momentum,
            nesterov: true,
        },
        "adam" => OptimizerKind::adam(),
        "adamw" => OptimizerKind::adamw(),
        other => bail!("unknown optimizer '{other}' (expected sgd, nesterov, adam or adamw)"),
    })
}

/// Where the test set for the fake-quantized accuracy comes from.
pub struct EvalSpec<'a> {
    pub data: &'a str,
    pub split: &'a str,
    pub limit: Option<usize>,
}

#[allow(clippy::too_many_arguments)]
pub fn run(
    a: &QatArgs,
    model: &Model,
    config: &QuantizeConfig,
    calib: Option<&dyn BatchSource>,
    calib_spec: &str,
    pre: Option<&Preprocess>,
    eval: Option<EvalSpec>,
    threads: usize,
    quiet: bool,
) -> Result<(Model, QuantizeReport, QatReport)> {
    let act_ranges: ActRangeMode = a.act_ranges.parse()?;
    let spec = a.data.as_deref().unwrap_or(calib_spec);
    let mut train = TrainSet::open(spec, Split::Train, pre)
        .with_context(|| format!("cannot load the QAT training data '{spec}'"))?;
    if let Some(n) = a.train_limit {
        train.truncate(n);
    }
    let test = eval
        .map(|e| -> Result<TrainSet> {
            let mut t = TrainSet::open(e.data, e.split.parse::<Split>()?, pre)
                .with_context(|| format!("cannot load the evaluation data '{}'", e.data))?;
            if let Some(n) = e.limit {
                t.truncate(n);
            }
            Ok(t)
        })
        .transpose()?;
    let qat = QatConfig {
        train: TrainConfig {
            epochs: a.epochs,
            batch: a.train_batch,
            lr: a.lr,
            optimizer: optimizer(a)?,
            seed: a.seed,
            threads,
            ..TrainConfig::default()
        },
        act_ranges,
        weight_ranges: a.weight_ranges.parse::<WeightRangeMode>()?,
    };
    let batches = train.len().div_ceil(a.train_batch.max(1)) * a.epochs;
    let n_train = train.len();
    let bar = if quiet {
        indicatif::ProgressBar::hidden()
    } else {
        progress(0, "calibrate")
    };
    let mut phase = "";
    let (mut loss_avg, mut acc_avg, mut steps) = (0.0f64, 0.0f64, 0u64);
    let result = quantize_aware_training(
        model,
        calib,
        Arc::new(train),
        test.as_ref(),
        config,
        &qat,
        &mut |event| match event {
            QatEvent::Calibrate(p) | QatEvent::Export(p) => {
                if p.phase != phase {
                    phase = p.phase;
                    bar.set_message(p.phase);
                    bar.reset();
                    bar.set_length(p.total as u64);
                }
                bar.set_position(p.done as u64);
            }
            QatEvent::Train(Event::Step {
                epoch,
                stats,
                images_per_second,
                ..
            }) => {
                if phase != "qat" {
                    phase = "qat";
                    bar.reset();
                    bar.set_length(batches as u64);
                }
                let acc = stats.correct as f64 / stats.samples.max(1) as f64;
                // Moving averages keep the display steady.
                (loss_avg, acc_avg) = if steps == 0 {
                    (stats.loss, acc)
                } else {
                    (
                        0.95 * loss_avg + 0.05 * stats.loss,
                        0.95 * acc_avg + 0.05 * acc,
                    )
                };
                steps += 1;
                bar.set_message(format!(
                    "qat epoch {epoch}/{} loss {loss_avg:.4} acc {:.2}% {images_per_second:.0} img/s",
                    a.epochs,
                    acc_avg * 100.0
                ));
                bar.inc(1);
            }
            QatEvent::Train(Event::Epoch(e)) => {
                bar.suspend(|| {
                    println!(
                        "qat epoch {}: train loss {:.4} acc {:.2}% on {n_train} samples, {:.1} s, {:.0} images/s",
                        e.epoch,
                        e.train_loss,
                        e.train_accuracy * 100.0,
                        e.seconds,
                        e.images_per_second
                    )
                });
            }
        },
    );
    bar.finish_and_clear();
    Ok(result?)
}
