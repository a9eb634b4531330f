//! `lithe demo`: the main job on the embedded default. Today: inspect the embedded MNIST CNN,
//! evaluate it on the embedded MNIST test set, measure its latency, quantize it to int8, and
//! train lenet5 for an epoch beside the committed 20-epoch lenet5.
//! Each later capability (prune, factorize, ...) adds its step here.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use lithe::data::dataset::Split;

use super::bench::{measure, synthetic_feeds};
use super::common::{load_model, progress, session_for};

#[derive(clap::Args)]
pub struct Args {
    /// Evaluate on at most this many test images (default: all 10,000).
    #[arg(long)]
    limit: Option<usize>,
    /// Worker threads (0 = one per core).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Seconds to spend on each latency measurement.
    #[arg(long, default_value_t = 1.0)]
    seconds: f64,
    /// Epochs of the training step (0 skips it). The 20 epochs that made the committed
    /// assets/models/lenet5.onnx take minutes, so the demo trains one and loads that file.
    #[arg(long, default_value_t = 1)]
    train_epochs: usize,
}

/// The embedded MNIST CNN: beside the sources when run from the repository, else under the
/// current directory.
pub fn embedded_model() -> Result<PathBuf> {
    embedded_asset("mnist_cnn.onnx")
}

fn embedded_asset(file: &str) -> Result<PathBuf> {
    let candidates = [
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("assets/models")
            .join(file),
        PathBuf::from("assets/models").join(file),
    ];
    candidates
        .iter()
        .find(|p| p.is_file())
        .map(|p| {
            // Shown relative to the repository when run from it.
            let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
            p.strip_prefix(&root).map_or_else(
                |_| p.clone(),
                |r| {
                    if std::env::current_dir().is_ok_and(|d| d == root) {
                        r.to_path_buf()
                    } else {
                        p.clone()
                    }
                },
            )
        })
        .with_context(|| {
            format!(
                "the embedded model assets/models/{file} is missing; run from the lithe repository"
            )
        })
}

pub fn run(args: Args) -> Result<()> {
    let path = embedded_model()?;
    let model = load_model(&path)?;
    println!("== 1. inspect: {}", path.display());
    let stats = lithe::analysis::analyze(&model, &[])?;
    print!("{}", super::inspect::render(&stats));
    println!(
        "total: {} parameters, {} MACs per image\n",
        stats.total_params, stats.total_macs
    );

    println!("== 2. evaluate on the embedded MNIST test set");
    let pre = super::eval::choose_preprocess(None, &model)?;
    let source = lithe::data::dataset::open_dataset("mnist", Split::Test, pre.as_ref())?;
    let session = session_for(&model, args.threads)?;
    let total = args.limit.map_or(source.len(), |l| l.min(source.len()));
    let bar = progress(total as u64, "eval");
    let acc = lithe::eval::evaluate(&session, source.as_ref(), 100, args.limit, |n| {
        bar.inc(n as u64)
    })?;
    bar.finish_and_clear();
    println!(
        "top-1 {:.2} % on {} images\n",
        acc.top1 * 100.0,
        acc.samples
    );

    println!("== 3. latency ({} threads)", session.threads());
    let mut f32_p50 = Vec::new();
    for batch in [1, 64] {
        let r = latency(&session, batch, args.seconds)?;
        println!(
            "batch {batch:>3}: p50 {:.3} ms, p90 {:.3} ms, {:.0} images/s",
            r.p50_ms, r.p90_ms, r.items_per_second
        );
        f32_p50.push(r.p50_ms);
    }

    println!(
        "\n== 4. quantize to int8 (s8 per-channel weights, u8 KL-calibrated activations, QDQ)"
    );
    let calib = lithe::data::dataset::open_dataset("mnist", Split::Train, pre.as_ref())?;
    let config = lithe::passes::quantize::QuantizeConfig {
        threads: args.threads,
        calib_limit: Some(1000),
        ..Default::default()
    };
    let (int8, report) =
        lithe::passes::quantize::quantize(&model, Some(calib.as_ref()), &config, &mut |_| {})?;
    let int8_session = session_for(&int8, args.threads)?;
    let bar = progress(total as u64, "eval int8");
    let acc8 = lithe::eval::evaluate(&int8_session, source.as_ref(), 100, args.limit, |n| {
        bar.inc(n as u64)
    })?;
    bar.finish_and_clear();
    println!(
        "weights {} -> {} bytes ({:.2}x smaller), calibration {:.2} s on {} images",
        report.weight_bytes_before,
        report.weight_bytes_after,
        report.weight_bytes_before as f64 / report.weight_bytes_after.max(1) as f64,
        report.calibration_seconds,
        report.calibration_samples
    );
    println!(
        "top-1 {:.2} % (f32) -> {:.2} % (int8) on {} images",
        acc.top1 * 100.0,
        acc8.top1 * 100.0,
        acc8.samples
    );
    // The QDQ model's quantized convolutions and products run on the integer engine (the
    // plan fuses DequantizeLinear -> Conv -> QuantizeLinear, as ONNX Runtime does).
    println!("integer engine (the QDQ model above, u8 x s8 -> i32):");
    for (batch, f32_ms) in [1, 64].into_iter().zip(f32_p50) {
        let r = latency(&int8_session, batch, args.seconds)?;
        println!(
            "batch {batch:>3}: p50 {:.3} ms ({:.2}x the f32 latency), {:.0} images/s",
            r.p50_ms,
            r.p50_ms / f32_ms,
            r.items_per_second
        );
    }
    if args.train_epochs > 0 {
        train_step(&args)?;
    }
    Ok(())
}

/// Latency of `session` on synthetic inputs of `batch` samples.
fn latency(
    session: &lithe::runtime::Session,
    batch: usize,
    seconds: f64,
) -> Result<super::bench::BenchResult> {
    let feeds = synthetic_feeds(session, batch, &[])?;
    let refs: Vec<(&str, lithe::ir::Tensor)> =
        feeds.iter().map(|(n, t)| (n.as_str(), t.clone())).collect();
    measure(session, &refs, batch, seconds)
}

/// Trains the Deep Compression lenet5 from scratch on the 60,000 embedded training images,
/// then evaluates the committed, fully trained lenet5 on the same test images.
fn train_step(args: &Args) -> Result<()> {
    use lithe::train::{Event, ScheduleKind, TrainConfig, TrainSet, Trainer};
    let reference = embedded_asset("lenet5.onnx")?;
    let reference_model = load_model(&reference)?;
    let pre = super::eval::choose_preprocess(None, &reference_model)?;
    println!(
        "\n== 5. train lenet5 from scratch ({} epoch{}, SGD momentum 0.9, cosine schedule)",
        args.train_epochs,
        if args.train_epochs == 1 { "" } else { "s" }
    );
    let train = TrainSet::open("mnist", Split::Train, pre.as_ref())?;
    let mut test = TrainSet::open("mnist", Split::Test, pre.as_ref())?;
    if let Some(n) = args.limit {
        test.truncate(n);
    }
    let model = lithe::zoo::build("lenet5", &lithe::zoo::ZooConfig::mnist(1))?;
    let config = TrainConfig {
        epochs: args.train_epochs,
        lr: 0.02,
        schedule: ScheduleKind::Cosine { min_factor: 0.0 },
        weight_decay: 5e-4,
        seed: 1,
        threads: args.threads,
        ..TrainConfig::default()
    };
    let batches = train.len().div_ceil(config.batch) * args.train_epochs;
    let mut trainer = Trainer::new(model, config)?;
    let bar = progress(batches as u64, "train");
    trainer.fit(Arc::new(train), Some(&test), &mut |event| {
        if let Event::Step { .. } = event {
            bar.inc(1);
        }
    })?;
    bar.finish_and_clear();
    for e in &trainer.history {
        let acc = e.test.as_ref().map_or(0.0, |t| t.accuracy);
        println!(
            "epoch {}: train loss {:.4}, test top-1 {:.2} %, {:.1} s, {:.0} images/s",
            e.epoch,
            e.train_loss,
            acc * 100.0,
            e.seconds,
            e.images_per_second
        );
    }
    let session = session_for(&reference_model, args.threads)?;
    let source = lithe::data::dataset::open_dataset("mnist", Split::Test, pre.as_ref())?;
    let acc = lithe::eval::evaluate(&session, source.as_ref(), 100, args.limit, |_| {})?;
    println!(
        "committed {} (20 epochs, same recipe): top-1 {:.2} % on {} images",
        reference.display(),
        acc.top1 * 100.0,
        acc.samples
    );
    Ok(())
}
