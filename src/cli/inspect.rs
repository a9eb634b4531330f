//! `lithe inspect MODEL`: what a model is made of, layer by layer.

use std::path::PathBuf;

use anyhow::Result;
use lithe::analysis::{analyze, macs_by_kind, ModelStats};

use super::common::{human_bytes, human_count, load_model, parse_dims, Table};

#[derive(clap::Args)]
pub struct Args {
    /// ONNX model file.
    model: PathBuf,
    /// Size for a symbolic input dimension, e.g. `--dim seq=128` (others default to 1).
    #[arg(long = "dim", value_name = "NAME=SIZE")]
    dims: Vec<String>,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

pub fn run(args: Args) -> Result<()> {
    let model = load_model(&args.model)?;
    let stats = analyze(&model, &parse_dims(&args.dims)?)?;
    let file_bytes = std::fs::metadata(&args.model).map(|m| m.len()).unwrap_or(0);
    if args.json {
        let report = serde_json::json!({
            "model": args.model.display().to_string(),
            "file_bytes": file_bytes,
            "opset": model.opset(),
            "stats": stats,
        });
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    print!("{}", render(&stats));
    let producer = format!("{} {}", model.producer_name, model.producer_version);
    println!(
        "model: {}  opset {}{}",
        args.model.display(),
        model.opset(),
        if producer.trim().is_empty() {
            String::new()
        } else {
            format!("  producer {}", producer.trim())
        }
    );
    println!(
        "total: {} layers, {} parameters, {} MACs per inference{}, weights {}, file {}",
        stats.layers.len(),
        human_count(stats.total_params as u64),
        human_count(stats.total_macs),
        if stats.assumed_dims.is_empty() {
            String::new()
        } else {
            format!(" (with {})", stats.assumed_dims.join(", "))
        },
        human_bytes(stats.weight_bytes as u64),
        human_bytes(file_bytes)
    );
    let kinds = macs_by_kind(&stats);
    if !kinds.is_empty() {
        let parts: Vec<String> = kinds
            .iter()
            .map(|(k, m)| {
                format!(
                    "{k} {:.1}%",
                    100.0 * *m as f64 / stats.total_macs.max(1) as f64
                )
            })
            .collect();
        println!("MACs by kind: {}", parts.join(", "));
    }
    Ok(())
}

pub fn render(stats: &ModelStats) -> String {
    let mut t = Table::new(
        &[
            "layer", "kind", "input", "output", "params", "MACs", "w min", "w max", "w mean",
            "w std", "zeros",
        ],
        &[
            false, false, false, false, true, true, true, true, true, true, true,
        ],
    );
    for l in &stats.layers {
        let w = l.weights.as_ref();
        let f = |v: Option<f32>| v.map_or_else(String::new, |v| format!("{v:.4}"));
        t.row(vec![
            l.name.clone(),
            l.kind.clone(),
            l.inputs.first().cloned().unwrap_or_default(),
            l.outputs.join(" "),
            if l.params > 0 {
                human_count(l.params as u64)
            } else {
                String::new()
            },
            if l.macs > 0 {
                human_count(l.macs)
            } else {
                String::new()
            },
            f(w.map(|w| w.min)),
            f(w.map(|w| w.max)),
            f(w.map(|w| w.mean)),
            f(w.map(|w| w.std)),
            w.map_or_else(String::new, |w| format!("{:.1}%", 100.0 * w.sparsity)),
        ]);
    }
    t.render()
}
