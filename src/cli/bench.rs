//! `lithe bench MODEL [--batch N] [--threads N]`: latency percentiles and throughput.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Result;
use lithe::ir::Tensor;
use lithe::runtime::Session;

use super::common::{concrete_shape, load_model, parse_dims, session_for, synthetic_input, Table};
use super::run::read_feeds;

#[derive(clap::Args)]
pub struct Args {
    /// ONNX model file.
    model: PathBuf,
    /// Batch size for the first (batch) dimension of synthetic inputs.
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Worker threads (0 = one per core).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Size for a symbolic input dimension, e.g. `--dim seq=128`.
    #[arg(long = "dim", value_name = "NAME=SIZE")]
    dims: Vec<String>,
    /// Real inputs instead of synthetic ones (`name=file.npy` or `file.npz`).
    #[arg(long = "input", short = 'i')]
    inputs: Vec<String>,
    /// Measure for about this many seconds (after warm-up).
    #[arg(long, default_value_t = 3.0)]
    seconds: f64,
    /// Also time each step and show where the time goes.
    #[arg(long)]
    profile: bool,
    #[arg(long)]
    json: bool,
}

#[derive(serde::Serialize)]
pub struct BenchResult {
    pub batch: usize,
    pub threads: usize,
    pub runs: usize,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub mean_ms: f64,
    pub items_per_second: f64,
}

/// Runs `session` repeatedly for about `seconds` and summarises latencies.
pub fn measure(
    session: &Session,
    feeds: &[(&str, Tensor)],
    batch: usize,
    seconds: f64,
) -> Result<BenchResult> {
    let warm_until = Instant::now() + Duration::from_secs_f64((seconds * 0.1).min(0.5));
    session.run(feeds)?;
    while Instant::now() < warm_until {
        session.run(feeds)?;
    }
    let mut times = Vec::new();
    let stop = Instant::now() + Duration::from_secs_f64(seconds);
    while Instant::now() < stop || times.len() < 5 {
        let t = Instant::now();
        session.run(feeds)?;
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let mean = times.iter().sum::<f64>() / times.len() as f64;
    let mut sorted = times.clone();
    sorted.sort_by(f64::total_cmp);
    let pct = |p: f64| sorted[((sorted.len() - 1) as f64 * p).round() as usize];
    Ok(BenchResult {
        batch,
        threads: session.threads(),
        runs: times.len(),
        p50_ms: pct(0.5),
        p90_ms: pct(0.9),
        mean_ms: mean,
        items_per_second: batch as f64 * 1e3 / mean,
    })
}

/// Synthetic feeds for every graph input, with `batch` as the leading dimension.
pub fn synthetic_feeds(
    session: &Session,
    batch: usize,
    dims: &[(String, usize)],
) -> Result<Vec<(String, Tensor)>> {
    session
        .input_types()
        .enumerate()
        .map(|(i, (name, ty))| {
            let shape = concrete_shape(name, ty, batch, dims)?;
            Ok((
                name.to_string(),
                synthetic_input(name, ty.dtype, shape, i as u64 + 1)?,
            ))
        })
        .collect()
}

pub fn run(args: Args) -> Result<()> {
    let model = load_model(&args.model)?;
    let session = session_for(&model, args.threads)?;
    let feeds = if args.inputs.is_empty() {
        synthetic_feeds(&session, args.batch, &parse_dims(&args.dims)?)?
    } else {
        read_feeds(&args.inputs)?
    };
    let refs: Vec<(&str, Tensor)> = feeds.iter().map(|(n, t)| (n.as_str(), t.clone())).collect();
    let result = measure(&session, &refs, args.batch, args.seconds)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&result)?);
    } else {
        println!(
            "{}: batch {}, {} threads, {} runs: p50 {:.3} ms, p90 {:.3} ms, mean {:.3} ms, {:.1} items/s",
            args.model.display(),
            result.batch,
            result.threads,
            result.runs,
            result.p50_ms,
            result.p90_ms,
            result.mean_ms,
            result.items_per_second
        );
    }
    if args.profile {
        print_profile(&session, &refs)?;
    }
    Ok(())
}

fn print_profile(session: &Session, feeds: &[(&str, Tensor)]) -> Result<()> {
    let rounds = 20;
    let mut totals: Vec<(String, String, f64)> = Vec::new();
    for _ in 0..rounds {
        let (_, timings) = session.run_profiled(feeds)?;
        if totals.is_empty() {
            totals = timings
                .iter()
                .map(|t| (t.node_name.clone(), t.label.clone(), 0.0))
                .collect();
        }
        for (acc, t) in totals.iter_mut().zip(&timings) {
            acc.2 += t.elapsed.as_secs_f64() * 1e3 / rounds as f64;
        }
    }
    let sum: f64 = totals.iter().map(|t| t.2).sum();
    let mut by_op: Vec<(String, f64)> = Vec::new();
    for (_, label, ms) in &totals {
        match by_op.iter_mut().find(|(l, _)| l == label) {
            Some(e) => e.1 += ms,
            None => by_op.push((label.clone(), *ms)),
        }
    }
    by_op.sort_by(|a, b| b.1.total_cmp(&a.1));
    let mut t = Table::new(&["op", "ms", "share"], &[false, true, true]);
    for (label, ms) in by_op {
        t.row(vec![
            label,
            format!("{ms:.3}"),
            format!("{:.1}%", 100.0 * ms / sum.max(1e-12)),
        ]);
    }
    print!("{}", t.render());
    Ok(())
}
