//! `lithe train --arch lenet5 --data mnist --epochs N -o lenet5.onnx` trains a zoo model from
//! scratch; `lithe train MODEL.onnx --data ...` fine-tunes an imported one; `--resume
//! CKPT.onnx` continues a run from its last checkpoint. The output file is rewritten
//! (atomically) after every epoch, with the optimizer state beside it in `<file>.state.npz`.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use lithe::data::dataset::Split;
use lithe::data::preprocess::Preprocess;
use lithe::ir::Model;
use lithe::train::{
    Augment, Distillation, Event, OptimizerKind, ScheduleKind, TrainConfig, TrainSet, Trainer,
};
use lithe::zoo::{self, ZooConfig};

use super::common::load_model;

#[derive(clap::Args)]
pub struct Args {
    /// ONNX model to fine-tune. Omit it and give --arch to train a zoo model from scratch.
    model: Option<PathBuf>,
    /// Zoo architecture: lenet-300-100, lenet5, mlp-1200, mlp-800, vgg-small, resnet-small,
    /// mobilenet-small.
    #[arg(long)]
    arch: Option<String>,
    /// `mnist`, `fashion-mnist`, a folder of labelled images, or an .npz with x and y.
    #[arg(long, default_value = "mnist")]
    data: String,
    /// Preprocessing (default: the model's recorded one, else the data set's convention).
    #[arg(long)]
    preprocess: Option<String>,
    /// Total epochs (a resumed run continues up to this many).
    #[arg(long, default_value_t = 10)]
    epochs: usize,
    #[arg(long, default_value_t = 64)]
    batch: usize,
    /// Learning rate (default: 0.01 for SGD, 0.001 for Adam/AdamW).
    #[arg(long)]
    lr: Option<f32>,
    /// sgd, nesterov, adam or adamw.
    #[arg(long, default_value = "sgd")]
    optimizer: String,
    /// Momentum of SGD and Nesterov.
    #[arg(long, default_value_t = 0.9)]
    momentum: f32,
    /// Weight decay (L2 for SGD/Adam, decoupled for AdamW) on weights of rank >= 2.
    #[arg(long, default_value_t = 0.0)]
    weight_decay: f32,
    /// constant, cosine, step (x0.1 every 10 epochs) or step:EVERY:GAMMA.
    #[arg(long, default_value = "constant")]
    schedule: String,
    /// Linear learning-rate warm-up, in epochs.
    #[arg(long, default_value_t = 0.0)]
    warmup: f32,
    /// Augmentation: none, shift=N (random shifts up to N pixels), flip, or e.g. shift=2,flip.
    #[arg(long, default_value = "none")]
    augment: String,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Worker threads (0 = one per core). Same seed and thread count give the same bits.
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Train on the first N training samples only.
    #[arg(long)]
    limit: Option<usize>,
    /// Evaluate on at most this many test samples after each epoch (0: skip evaluation).
    #[arg(long)]
    eval_limit: Option<usize>,
    /// Continue from a checkpoint written by an earlier run (and its .state.npz).
    #[arg(long)]
    resume: Option<PathBuf>,
    /// Distil from this teacher model (soft targets at --temperature).
    #[arg(long)]
    teacher: Option<PathBuf>,
    #[arg(long, default_value_t = 4.0)]
    temperature: f32,
    /// Weight of the soft (teacher) loss.
    #[arg(long, default_value_t = 0.9)]
    alpha: f32,
    /// Weight of the hard (label) loss.
    #[arg(long, default_value_t = 0.1)]
    beta: f32,
    /// Output ONNX file, rewritten after every epoch.
    #[arg(short, long)]
    output: PathBuf,
    /// Print the per-epoch history as JSON at the end.
    #[arg(long)]
    json: bool,
}

fn optimizer(args: &Args) -> Result<(OptimizerKind, f32)> {
    let (kind, lr) = match args.optimizer.to_ascii_lowercase().as_str() {
        "sgd" => (OptimizerKind::sgd(args.momentum), 0.01),
        "nesterov" => (
            OptimizerKind::Sgd {
                momentum: args.momentum,
                nesterov: true,
            },
            0.01,
        ),
        "adam" => (OptimizerKind::adam(), 0.001),
        "adamw" => (OptimizerKind::adamw(), 0.001),
        other => bail!("unknown optimizer '{other}' (expected sgd, nesterov, adam or adamw)"),
    };
    Ok((kind, args.lr.unwrap_or(lr)))
}

/// The model to start from: a checkpoint, an ONNX file, or a fresh zoo model shaped for the
/// training data.
fn starting_model(args: &Args, train: Option<&TrainSet>) -> Result<Model> {
    if let Some(ckpt) = &args.resume {
        return load_model(ckpt);
    }
    match (&args.model, &args.arch, train) {
        (Some(_), Some(_), _) => bail!("give either a MODEL.onnx to fine-tune or --arch, not both"),
        (Some(path), None, _) => load_model(path),
        (None, Some(arch), Some(train)) => {
            let &[c, h, w] = train.sample_shape() else {
                bail!(
                    "{} has samples of shape {:?}; zoo models take [C, H, W] images",
                    train.name(),
                    train.sample_shape()
                );
            };
            let classes = train.labels().iter().copied().max().unwrap_or(0).max(1) as usize + 1;
            let cfg = ZooConfig {
                input: [c, h, w],
                classes,
                seed: args.seed,
            };
            Ok(zoo::build(arch, &cfg)?)
        }
        (None, Some(_), None) => bail!("internal: training data must be loaded first"),
        (None, None, _) => {
            bail!("give a MODEL.onnx to fine-tune, --arch to train a zoo model, or --resume")
        }
    }
}

pub fn run(args: Args) -> Result<()> {
    let (kind, lr) = optimizer(&args)?;
    let schedule: ScheduleKind = args.schedule.parse()?;
    let augment: Augment = args.augment.parse()?;
    // Preprocessing: the flag, else what a model to fine-tune or resume records.
    let recorded = match (&args.resume, &args.model) {
        (Some(p), _) | (None, Some(p)) => load_model(p)?
            .metadata_value(lithe::data::PREPROCESS_METADATA_KEY)
            .map(str::to_string),
        _ => None,
    };
    let pre = args
        .preprocess
        .as_deref()
        .or(recorded.as_deref())
        .map(|t| {
            t.parse::<Preprocess>()
                .with_context(|| format!("bad preprocessing '{t}'"))
        })
        .transpose()?;

    let mut train = TrainSet::open(&args.data, Split::Train, pre.as_ref())
        .with_context(|| format!("cannot load the training data '{}'", args.data))?;
    if let Some(n) = args.limit {
        train.truncate(n);
    }
    let test = match args.eval_limit {
        Some(0) => None,
        limit => match TrainSet::open(&args.data, Split::Test, pre.as_ref()) {
            Ok(mut t) => {
                if let Some(n) = limit {
                    t.truncate(n);
                }
                Some(t)
            }
            Err(e) => {
                eprintln!("note: no test split to evaluate on ({e})");
                None
            }
        },
    };
    let model = starting_model(&args, Some(&train))?;
    let config = TrainConfig {
        epochs: args.epochs,
        batch: args.batch,
        lr,
        optimizer: kind,
        weight_decay: args.weight_decay,
        schedule,
        warmup_epochs: args.warmup,
        seed: args.seed,
        threads: args.threads,
        augment,
        checkpoint: Some(args.output.clone()),
        ..TrainConfig::default()
    };
    let mut trainer = Trainer::new(model, config)?;
    if let Some(ckpt) = &args.resume {
        if !trainer.load_state(ckpt)? {
            eprintln!(
                "note: {} not found; resuming with a fresh optimizer state",
                lithe::train::state_path(ckpt).display()
            );
        }
    }
    if let Some(p) = train.preprocess() {
        trainer.set_preprocess(&p.to_string());
    }
    if let Some(t) = &args.teacher {
        trainer.set_teacher(
            &load_model(t)?,
            Distillation {
                temperature: args.temperature,
                alpha: args.alpha,
                beta: args.beta,
            },
        )?;
    }
    let done = trainer.epochs_done();
    if done >= args.epochs {
        eprintln!(
            "the model has already been trained for {done} epochs (--epochs {})",
            args.epochs
        );
    }
    println!(
        "training {} trainable parameters on {} ({} samples) for epochs {}..{} with {}, lr {lr}, batch {}, {} thread(s)",
        trainer.params.trainable_count(),
        train.name(),
        train.len(),
        done + 1,
        args.epochs,
        kind,
        args.batch,
        trainer.graph().threads()
    );
    let batches = train.len().div_ceil(args.batch.max(1));
    let total = (args.epochs.saturating_sub(done) * batches) as u64;
    let bar = indicatif::ProgressBar::new(total);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} (eta {eta})")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    let (mut loss_avg, mut acc_avg) = (0.0f64, 0.0f64);
    let train = Arc::new(train);
    trainer.fit(train, test.as_ref(), &mut |event| match event {
        Event::Step {
            epoch,
            stats,
            images_per_second,
            ..
        } => {
            // Exponential moving averages keep the display steady.
            let acc = stats.correct as f64 / stats.samples.max(1) as f64;
            loss_avg = if bar.position() == 0 {
                stats.loss
            } else {
                0.95 * loss_avg + 0.05 * stats.loss
            };
            acc_avg = if bar.position() == 0 {
                acc
            } else {
                0.95 * acc_avg + 0.05 * acc
            };
            bar.set_message(format!(
                "epoch {epoch}/{} loss {loss_avg:.4} acc {:.2}% {images_per_second:.0} img/s",
                args.epochs,
                acc_avg * 100.0
            ));
            bar.inc(1);
        }
        Event::Epoch(e) => {
            let test = e.test.as_ref().map_or(String::new(), |t| {
                format!(", test loss {:.4} acc {:.2}%", t.loss, t.accuracy * 100.0)
            });
            // Through suspend, so the line also appears when the bar is hidden (no terminal).
            bar.suspend(|| {
                println!(
                    "epoch {}: train loss {:.4} acc {:.2}%{test}, {:.1} s, {:.0} images/s -> {}",
                    e.epoch,
                    e.train_loss,
                    e.train_accuracy * 100.0,
                    e.seconds,
                    e.images_per_second,
                    args.output.display()
                )
            });
        }
    })?;
    bar.finish_and_clear();
    if done >= args.epochs {
        trainer.save_checkpoint(&args.output)?;
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&trainer.history)?);
    }
    match lithe::memory::peak_rss_mib() {
        Some(mib) => println!("wrote {} (peak memory {mib:.0} MiB)", args.output.display()),
        None => println!("wrote {}", args.output.display()),
    }
    Ok(())
}
