//! `lithe quantize MODEL --calib DATA -o OUT.onnx`: post-training quantization with a report.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use lithe::data::dataset::BatchSource;
use lithe::eval::Accuracy;
use lithe::passes::quantize::{
    quantize, sensitivity, sensitivity_table, ActivationCalib, CalibProgress, QuantFormat,
    QuantizeConfig, WeightScheme,
};
use lithe::runtime::{Session, SessionOptions};

use super::common::{load_model, progress};
use super::eval::{choose_preprocess, open_calibration_data, open_data};

/// Model metadata naming the data set a model was trained on (the default calibration set).
const DATASET_METADATA_KEY: &str = "lithe.dataset";

#[derive(clap::Args)]
pub struct Args {
    /// ONNX model file (f32).
    model: PathBuf,
    /// Calibration data: `mnist`, `fashion-mnist`, a folder of images or an .npz. Default:
    /// the data set named by the model's `lithe.dataset` metadata, else mnist.
    #[arg(long)]
    calib: Option<String>,
    /// Split of a named calibration set.
    #[arg(long, default_value = "train")]
    calib_split: String,
    /// Calibration samples (the first N).
    #[arg(long, default_value_t = 1000)]
    calib_limit: usize,
    /// Weight scheme: linear, fixed (dynamic fixed point), log (powers of two), kmeans.
    #[arg(long, default_value = "linear")]
    scheme: String,
    /// Bits for weights and activations (2..=8).
    #[arg(long, default_value_t = 8)]
    bits: u32,
    /// Bits for weights only (overrides --bits).
    #[arg(long)]
    weight_bits: Option<u32>,
    /// Bits for activations only (overrides --bits).
    #[arg(long)]
    activation_bits: Option<u32>,
    /// Activation ranges: kl (entropy), minmax, percentile=P, mse, sigma=K, none (f32), or
    /// dynamic (from each batch at run time: DynamicQuantizeLinear -> MatMulInteger, no calibration).
    /// Default: kl at 8 bits and above, mse below (KL's threshold search is TensorRT's
    /// 128-level method; with 3-6 bit grids it clips far too hard).
    #[arg(long)]
    activations: Option<String>,
    /// Per-output-channel weight parameters (the default).
    #[arg(long, overrides_with = "per_tensor")]
    per_channel: bool,
    /// One set of weight parameters per tensor.
    #[arg(long)]
    per_tensor: bool,
    /// Leave these nodes in f32 (repeatable).
    #[arg(long, num_args = 1..)]
    exclude: Vec<String>,
    /// qdq (QuantizeLinear/DequantizeLinear, for ONNX Runtime) or qop (QLinearConv/...,
    /// integer-only).
    #[arg(long, default_value = "qdq")]
    format: String,
    /// Evaluate top-1 before and after on this labelled data set.
    #[arg(long)]
    eval: Option<String>,
    /// Split of a named evaluation set
    #[arg(long, default_value = "test")]
    eval_split: String,
    /// Evaluate on the first N samples only (default: all)
    #[arg(long)]
    eval_limit: Option<usize>,
    /// Preprocessing (default: the model's metadata, else the data set's convention).
    #[arg(long)]
    preprocess: Option<String>,
    /// Output model.
    #[arg(short, long)]
    output: PathBuf,
    /// Also write the report as JSON here.
    #[arg(long)]
    report: Option<PathBuf>,
    /// Allow the output to replace the input file.
    #[arg(long)]
    force: bool,
    /// Calibration batch size (min/max calibration, whose ranges do not depend on batching,
    /// runs at most 16 samples at a time).
    #[arg(long, default_value_t = 100)]
    batch: usize,
    /// Worker threads (0 = one per core).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Skip the second pass that measures activation SQNR.
    #[arg(long)]
    no_activation_sqnr: bool,
    /// QOperator form: pointwise activations between quantized tensors as 256-entry lookup
    /// tables (Cast + Gather) instead of DequantizeLinear -> op -> QuantizeLinear.
    #[arg(long)]
    lookup_tables: bool,
    /// Also rank the layers by how much each, quantized alone, moves the model's output (on
    /// the first SAMPLES calibration samples): the top ones are worth --exclude.
    #[arg(long, value_name = "SAMPLES", num_args = 0..=1, default_missing_value = "256")]
    sensitivity: Option<usize>,
    /// No progress bar.
    #[arg(long, short)]
    quiet: bool,
    #[command(flatten)]
    qat: super::qat::QatArgs,
}

/// Peak resident set size of this process (Linux `VmHWM`), if the platform tells.
fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

fn same_file(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(x), Ok(y)) => x == y,
        _ => a == b,
    }
}

fn accuracy(
    model: &lithe::ir::Model,
    data: &dyn BatchSource,
    limit: Option<usize>,
    threads: usize,
) -> Result<Accuracy> {
    let (simple, _) = lithe::passes::simplify(model)?;
    let session = Session::new(
        &simple,
        &SessionOptions {
            threads,
            ..SessionOptions::default()
        },
    )?;
    Ok(lithe::eval::evaluate(&session, data, 100, limit, |_| {})?)
}

/// Calibration runs the same batch shapes over and over: glibc would otherwise hand every
/// batch's large activations back to the kernel on `free` (mmap'd blocks, heap trimming) and
/// fault them in again, zeroed, for the next batch (a tenth of a MinMax run's time). Keeping
/// them in the heap lets the next batch reuse them; peak RSS is unchanged (it is set by one
/// batch's activations per thread either way).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn keep_freed_batch_buffers() {
    extern "C" {
        fn mallopt(param: i32, value: i32) -> i32;
    }
    const M_TRIM_THRESHOLD: i32 = -1;
    const M_MMAP_THRESHOLD: i32 = -3;
    // SAFETY: mallopt only sets allocator tunables; it is called before any worker thread
    // exists. A rejected value (return 0) leaves glibc's defaults, which are merely slower.
    unsafe {
        mallopt(M_MMAP_THRESHOLD, 32 << 20);
        mallopt(M_TRIM_THRESHOLD, 256 << 20);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn keep_freed_batch_buffers() {}

pub fn run(args: Args) -> Result<()> {
    keep_freed_batch_buffers();
    if same_file(&args.model, &args.output) && !args.force {
        bail!(
            "refusing to overwrite the input model {} (pass --force to replace it)",
            args.model.display()
        );
    }
    let model = load_model(&args.model)?;
    let activation_bits = args.activation_bits.unwrap_or(args.bits);
    let activations = match &args.activations {
        Some(a) => a.parse::<ActivationCalib>()?,
        None if activation_bits < 8 => ActivationCalib::Mse,
        None => ActivationCalib::Entropy,
    };
    if activations == ActivationCalib::Entropy && activation_bits < 8 {
        eprintln!(
            "warning: kl calibration with {activation_bits}-bit activations tends to clip far too hard; mse usually does better"
        );
    }
    let config = QuantizeConfig {
        scheme: args.scheme.parse::<WeightScheme>()?,
        weight_bits: args.weight_bits.unwrap_or(args.bits),
        activation_bits,
        activations,
        per_channel: !args.per_tensor,
        exclude: args.exclude.clone(),
        format: args.format.parse::<QuantFormat>()?,
        batch_size: args.batch,
        calib_limit: Some(args.calib_limit),
        measure_activation_sqnr: !args.no_activation_sqnr,
        threads: args.threads,
        lookup_tables: args.lookup_tables,
    };
    config.validate()?;
    let pre = choose_preprocess(args.preprocess.as_deref(), &model)?;
    let calib_spec = args
        .calib
        .clone()
        .or_else(|| {
            model
                .metadata_value(DATASET_METADATA_KEY)
                .map(str::to_string)
        })
        .unwrap_or_else(|| "mnist".to_string());
    let uncalibrated = matches!(
        config.activations,
        ActivationCalib::None | ActivationCalib::Dynamic
    );
    let source = if uncalibrated && args.sensitivity.is_none() && !args.qat.qat {
        None
    } else {
        Some(
            open_calibration_data(&calib_spec, &args.calib_split, pre.as_ref())
                .with_context(|| format!("cannot open calibration data '{calib_spec}'"))?,
        )
    };
    let (mut quantized, report, qat_report) = if args.qat.qat {
        let eval = args.eval.as_deref().map(|data| super::qat::EvalSpec {
            data,
            split: &args.eval_split,
            limit: args.eval_limit,
        });
        let (m, r, q) = super::qat::run(
            &args.qat,
            &model,
            &config,
            source.as_deref(),
            &calib_spec,
            pre.as_ref(),
            eval,
            args.threads,
            args.quiet,
        )?;
        (m, r, Some(q))
    } else {
        let (m, r) = post_training(&args, &model, &config, source.as_deref())?;
        (m, r, None)
    };
    quantized.set_metadata(DATASET_METADATA_KEY, calib_spec.clone());
    finish(
        args, model, quantized, report, qat_report, config, source, pre,
    )
}

/// The post-training pass with its progress bar.
fn post_training(
    args: &Args,
    model: &lithe::ir::Model,
    config: &QuantizeConfig,
    source: Option<&dyn BatchSource>,
) -> Result<(lithe::ir::Model, lithe::passes::quantize::QuantizeReport)> {
    let total = source.as_ref().map_or(0, |s| s.len().min(args.calib_limit)) as u64;
    let bar = if args.quiet {
        indicatif::ProgressBar::hidden()
    } else {
        progress(total, "calibrate")
    };
    let mut phase = "calibrate";
    let out = quantize(model, source, config, &mut |p: CalibProgress| {
        if p.phase != phase {
            phase = p.phase;
            bar.set_message(p.phase);
            bar.reset();
        }
        bar.set_position(p.done as u64);
    })?;
    bar.finish_and_clear();
    Ok(out)
}

/// Writes the model, evaluates, prints and writes the report.
#[allow(clippy::too_many_arguments)]
fn finish(
    args: Args,
    model: lithe::ir::Model,
    quantized: lithe::ir::Model,
    mut report: lithe::passes::quantize::QuantizeReport,
    qat_report: Option<lithe::passes::quantize::QatReport>,
    config: QuantizeConfig,
    source: Option<Box<dyn BatchSource>>,
    pre: Option<lithe::data::preprocess::Preprocess>,
) -> Result<()> {
    lithe::onnx::save_model(&quantized, &args.output, &Default::default())
        .with_context(|| format!("cannot write {}", args.output.display()))?;
    report.model_bytes_before = std::fs::metadata(&args.model)
        .ok()
        .map(|m| m.len() as usize);
    report.model_bytes_after = std::fs::metadata(&args.output)
        .ok()
        .map(|m| m.len() as usize);
    let mut ptq_accuracy = None;
    if let Some(spec) = &args.eval {
        let data = open_data(spec, &args.eval_split, pre.as_ref())?;
        let before = accuracy(&model, data.as_ref(), args.eval_limit, args.threads)?;
        let after = accuracy(&quantized, data.as_ref(), args.eval_limit, args.threads)?;
        let same = before
            .predictions
            .iter()
            .zip(&after.predictions)
            .filter(|(a, b)| a == b)
            .count();
        report.top1_agreement = Some(same as f64 / before.predictions.len().max(1) as f64);
        if qat_report.is_some() {
            // The post-training result with the same settings, for comparison.
            let (ptq, _) = quantize(&model, source.as_deref(), &config, &mut |_| {})?;
            let p = accuracy(&ptq, data.as_ref(), args.eval_limit, args.threads)?;
            println!(
                "top-1 accuracy on {} samples: f32 {:.2} %, post-training {:.2} %, quantization-aware training {:.2} %",
                before.samples,
                before.top1 * 100.0,
                p.top1 * 100.0,
                after.top1 * 100.0
            );
            ptq_accuracy = Some(p);
        }
        report.accuracy_before = Some(before);
        report.accuracy_after = Some(after);
    }
    let mut ranking = String::new();
    if let Some(samples) = args.sensitivity {
        let data = source
            .as_deref()
            .context("--sensitivity needs calibration data")?;
        let samples = samples.min(args.calib_limit).min(data.len());
        let bar = if args.quiet {
            indicatif::ProgressBar::hidden()
        } else {
            progress(samples as u64, "calibrate")
        };
        let mut phase = "calibrate";
        let rows = sensitivity(&model, data, &config, samples, &mut |p: CalibProgress| {
            if p.phase != phase {
                phase = p.phase;
                bar.set_message(p.phase);
                bar.reset();
            }
            bar.set_length(p.total as u64);
            bar.set_position(p.done as u64);
        })?;
        bar.finish_and_clear();
        ranking = sensitivity_table(&rows, samples);
        report.sensitivity = Some(rows);
    }
    report.peak_rss_bytes = peak_rss_bytes();
    print!("{}", report.table());
    print!("{ranking}");
    println!("wrote {}", args.output.display());
    if let Some(path) = &args.report {
        let json = match &qat_report {
            None => serde_json::to_string_pretty(&report)?,
            Some(q) => serde_json::to_string_pretty(&serde_json::json!({
                "quantize": report,
                "qat": q,
                "ptq_accuracy": ptq_accuracy,
            }))?,
        };
        lithe::data::atomic::write_atomic(path, json.as_bytes())
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(())
}
