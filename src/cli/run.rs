//! `lithe run MODEL --input name=x.npy ... --output out.npz`.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use lithe::ir::Tensor;

use super::common::{load_model, session_for};

#[derive(clap::Args)]
pub struct Args {
    /// ONNX model file.
    model: PathBuf,
    /// `name=file.npy` for one input, or `file.npz` holding inputs by name. Repeatable.
    #[arg(long = "input", short = 'i', value_name = "NAME=FILE.npy|FILE.npz")]
    inputs: Vec<String>,
    /// Write all outputs to this .npz (or a single output to a .npy).
    #[arg(long, short = 'o')]
    output: Option<PathBuf>,
    /// Worker threads (0 = one per core).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Print the summary as JSON.
    #[arg(long)]
    json: bool,
}

pub fn read_feeds(specs: &[String]) -> Result<Vec<(String, Tensor)>> {
    let mut feeds = Vec::new();
    for spec in specs {
        match spec.split_once('=') {
            Some((name, file)) => {
                let t = lithe::data::npy::read_npy(Path::new(file))
                    .with_context(|| format!("input '{name}'"))?;
                feeds.push((name.to_string(), t));
            }
            None if spec.ends_with(".npz") => {
                feeds.extend(lithe::data::npz::read_npz(Path::new(spec))?);
            }
            None => bail!("--input '{spec}' should be NAME=FILE.npy or FILE.npz"),
        }
    }
    Ok(feeds)
}

pub fn run(args: Args) -> Result<()> {
    let model = load_model(&args.model)?;
    let feeds = read_feeds(&args.inputs)?;
    let session = session_for(&model, args.threads)?;
    let refs: Vec<(&str, Tensor)> = feeds.iter().map(|(n, t)| (n.as_str(), t.clone())).collect();
    let started = std::time::Instant::now();
    let outputs = session.run(&refs)?;
    let elapsed = started.elapsed();
    if let Some(path) = &args.output {
        if path.extension().is_some_and(|e| e == "npy") {
            if outputs.len() != 1 {
                bail!(
                    "the model has {} outputs; write them to an .npz",
                    outputs.len()
                );
            }
            lithe::data::npy::write_npy(path, &outputs[0].1)?;
        } else {
            lithe::data::npz::write_npz(path, &outputs)?;
        }
    }
    if args.json {
        let outs: Vec<_> = outputs
            .iter()
            .map(|(n, t)| serde_json::json!({"name": n, "shape": t.shape(), "dtype": t.dtype().to_string()}))
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(
                &serde_json::json!({"outputs": outs, "milliseconds": elapsed.as_secs_f64() * 1e3})
            )?
        );
        return Ok(());
    }
    for (name, t) in &outputs {
        let values = t.to_f32_vec();
        let head: Vec<String> = values.iter().take(8).map(|v| format!("{v:.5}")).collect();
        println!(
            "{name}: {} {:?} [{}{}]",
            t.dtype(),
            t.shape(),
            head.join(", "),
            if values.len() > 8 { ", ..." } else { "" }
        );
    }
    println!("ran in {:.3} ms", elapsed.as_secs_f64() * 1e3);
    if let Some(p) = &args.output {
        println!("wrote {}", p.display());
    }
    Ok(())
}
