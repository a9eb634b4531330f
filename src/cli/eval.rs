//! `lithe eval MODEL --data mnist|fashion-mnist|DIR|file.npz [--preprocess ...]`.

use std::path::PathBuf;

use anyhow::{Context, Result};
use lithe::data::dataset::{self, BatchSource, Split};
use lithe::data::preprocess::Preprocess;
use lithe::ir::Model;

use super::common::{load_model, progress, session_for};

#[derive(clap::Args)]
pub struct Args {
    /// ONNX model file.
    model: PathBuf,
    /// `mnist`, `fashion-mnist`, a folder of labelled images, or an .npz with x and y.
    #[arg(long, default_value = "mnist")]
    data: String,
    /// `test` or `train`, for the named data sets.
    #[arg(long, default_value = "test")]
    split: String,
    /// Preprocessing, e.g. `imagenet` or `resize=256,crop=224,mean=127,std=128`.
    /// Default: what the model's metadata records, else the data set's convention.
    #[arg(long)]
    preprocess: Option<String>,
    /// Evaluate at most this many samples.
    #[arg(long)]
    limit: Option<usize>,
    #[arg(long, default_value_t = 100)]
    batch: usize,
    /// Worker threads (0 = one per core).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    #[arg(long)]
    json: bool,
}

/// The preprocessing to apply: the flag, else the model's recorded one, else the data set's.
pub fn choose_preprocess(flag: Option<&str>, model: &Model) -> Result<Option<Preprocess>> {
    let text = flag.or_else(|| model.metadata_value(lithe::data::PREPROCESS_METADATA_KEY));
    text.map(|t| {
        t.parse::<Preprocess>()
            .with_context(|| format!("bad preprocessing '{t}'"))
    })
    .transpose()
}

pub fn open_data(
    spec: &str,
    split: &str,
    preprocess: Option<&Preprocess>,
) -> Result<Box<dyn BatchSource>> {
    let split: Split = split.parse()?;
    Ok(dataset::open_dataset(spec, split, preprocess)?)
}

/// As [`open_data`] where labels are not needed: images without a label in their names are
/// fine.
pub fn open_calibration_data(
    spec: &str,
    split: &str,
    preprocess: Option<&Preprocess>,
) -> Result<Box<dyn BatchSource>> {
    let split: Split = split.parse()?;
    Ok(dataset::open_unlabelled(spec, split, preprocess)?)
}

pub fn run(args: Args) -> Result<()> {
    let model = load_model(&args.model)?;
    let pre = choose_preprocess(args.preprocess.as_deref(), &model)?;
    let source = open_data(&args.data, &args.split, pre.as_ref())?;
    let session = session_for(&model, args.threads)?;
    let total = args.limit.map_or(source.len(), |l| l.min(source.len()));
    let bar = progress(total as u64, "eval");
    let acc = lithe::eval::evaluate(&session, source.as_ref(), args.batch, args.limit, |n| {
        bar.inc(n as u64)
    })?;
    bar.finish_and_clear();
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "model": args.model.display().to_string(),
                "data": args.data,
                "accuracy": acc,
            }))?
        );
    } else {
        println!(
            "{} on {} ({} samples): top-1 {:.2} %, top-5 {:.2} %",
            args.model.display(),
            source.name(),
            acc.samples,
            acc.top1 * 100.0,
            acc.top5 * 100.0
        );
    }
    Ok(())
}
