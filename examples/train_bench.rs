//! Training throughput: `cargo run --release --example train_bench -- [--arch lenet5]
//! [--batch 64] [--threads 0] [--epochs 1] [--limit N] [--data mnist] [--reps 20] [--peak GFLOPS]`.
//!
//! Trains a zoo model on MNIST (the full training set unless `--limit`), then reports images
//! per second, the GFLOP/s of the convolutions and dense layers (forward, weight gradient,
//! and input gradient except for the first layer), that as a fraction of this CPU's FMA peak
//! (cores x 32 f32 FLOP/cycle at the `cpu MHz` of /proc/cpuinfo, or a measured one-core
//! peak given as `--peak GFLOPS`), the split of a step into forward, backward and update,
//! test accuracy, and peak resident memory (VmHWM).

use std::sync::Arc;
use std::time::Instant;

use lithe::analysis::analyze;
use lithe::data::Split;
use lithe::train::{Mode, TrainConfig, TrainSet, Trainer};
use lithe::zoo::{self, ZooConfig};

fn cpu_mhz() -> Option<f64> {
    let info = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    info.lines()
        .find(|l| l.starts_with("cpu MHz"))
        .and_then(|l| l.split(':').nth(1))
        .and_then(|v| v.trim().parse().ok())
}

fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kb: f64 = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(kb / 1024.0)
}

/// CPU seconds this process has used (user + system, all threads), from /proc/self/stat.
/// On a machine shared with other work, images per CPU-second of a one-thread run is the
/// stable number; wall time depends on what else runs.
fn cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the parenthesised command name start at field 3 (state); utime and
    // stime are fields 14 and 15, in clock ticks (100 per second on Linux).
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}

fn arg<T: std::str::FromStr>(args: &[String], key: &str, default: T) -> T {
    args.iter()
        .position(|a| a == key)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let arch: String = arg(&args, "--arch", "lenet5".to_string());
    let data: String = arg(&args, "--data", "mnist".to_string());
    let batch: usize = arg(&args, "--batch", 64);
    let threads: usize = arg(&args, "--threads", 0);
    let epochs: usize = arg(&args, "--epochs", 1);
    let limit: usize = arg(&args, "--limit", usize::MAX);
    let lr: f32 = arg(&args, "--lr", 0.01);

    let mut train = TrainSet::open(&data, Split::Train, None)?;
    train.truncate(limit);
    let train = Arc::new(train);
    let test = TrainSet::open(&data, Split::Test, None)?;
    let sample = train.sample_shape();
    let cfg = ZooConfig {
        input: [sample[0], sample[1], sample[2]],
        classes: 10,
        seed: 1,
    };
    let model = zoo::build(&arch, &cfg)?;

    // Multiply-adds per image: forward, weight gradient, input gradient (none for layers
    // reading the graph input).
    let stats = analyze(&model, &[("N".into(), 1)])?;
    let input = model.graph.inputs[0].name.clone();
    let train_macs: u64 = stats
        .layers
        .iter()
        .filter(|l| l.macs > 0)
        .map(|l| {
            if l.inputs.first() == Some(&input) {
                2 * l.macs
            } else {
                3 * l.macs
            }
        })
        .sum();

    let config = TrainConfig {
        epochs,
        batch,
        lr,
        threads,
        seed: 1,
        ..TrainConfig::default()
    };
    let mut trainer = Trainer::new(model, config)?;
    let cores = trainer.graph().threads();

    // Step breakdown over a few batches.
    let (x, labels) = train.gather(
        &(0..batch).collect::<Vec<_>>(),
        Default::default(),
        &mut lithe::train::Rng::new(0),
    )?;
    let reps: usize = arg(&args, "--reps", 20);
    let (mut t_fwd, mut t_bwd, mut t_upd) = (0.0, 0.0, 0.0);
    let mut scratch = Trainer::new(trainer.export(), trainer.config.clone())?;
    scratch.graph_mut().set_profiling(true);
    let reps_cpu0 = cpu_seconds();
    for _ in 0..reps {
        let t0 = Instant::now();
        let tape = scratch.graph().forward(
            &scratch.params,
            vec![(input.clone(), x.clone())],
            Mode::Train,
            0,
        )?;
        let logits = tape.value(scratch.graph(), "logits").ok_or("no logits")?;
        let loss = lithe::train::cross_entropy(logits, &labels)?;
        let t1 = Instant::now();
        let grads = scratch.graph().backward(
            &scratch.params,
            &tape,
            vec![("logits".into(), loss.grad)],
            false,
        )?;
        let t2 = Instant::now();
        scratch
            .optimizer
            .step(&mut scratch.params, &grads.params, 0.01)?;
        t_fwd += (t1 - t0).as_secs_f64();
        t_bwd += (t2 - t1).as_secs_f64();
        t_upd += t2.elapsed().as_secs_f64();
    }
    let reps_cpu = cpu_seconds().zip(reps_cpu0).map(|(b, a)| b - a);
    let profile = scratch.graph().profile();
    drop(scratch);

    println!("slowest nodes (ms per step, forward / backward):");
    for n in profile.iter().take(8) {
        println!(
            "  {:<12} {:<18} {:7.2} {:7.2}",
            n.node,
            n.op_type,
            n.forward / reps as f64 * 1e3,
            n.backward / reps as f64 * 1e3
        );
    }
    let started = Instant::now();
    let cpu0 = cpu_seconds();
    trainer.fit(train.clone(), None, &mut |_| {})?;
    let cpu = cpu_seconds().zip(cpu0).map(|(b, a)| b - a);
    let secs = started.elapsed().as_secs_f64();
    let test_stats = trainer.evaluate(&test)?;
    let last = trainer.history.last().ok_or("no epoch ran")?;
    let images = (train.len() * epochs) as f64;
    let train_secs: f64 = trainer.history.iter().map(|e| e.seconds).sum();
    let ips = images / train_secs;
    let gflops = ips * train_macs as f64 * 2.0 / 1e9;
    println!(
        "{arch} on {data}: {} images x {epochs} epoch(s), batch {batch}, {cores} thread(s)",
        train.len()
    );
    println!(
        "step split (batch {batch}, mean of {reps}): forward+loss {:.2} ms, backward {:.2} ms, update {:.2} ms",
        t_fwd / reps as f64 * 1e3,
        t_bwd / reps as f64 * 1e3,
        t_upd / reps as f64 * 1e3
    );
    if let Some(c) = reps_cpu {
        println!(
            "CPU time per step (all threads): {:.2} ms",
            c / reps as f64 * 1e3
        );
    }
    println!("training: {train_secs:.2} s ({secs:.2} s in fit), {ips:.0} images/s");
    if let Some(cpu) = cpu {
        println!(
            "CPU time: {cpu:.2} s, {:.0} images per CPU-second ({:.1} GFLOP per CPU-second)",
            images / cpu,
            images / cpu * train_macs as f64 * 2.0 / 1e9
        );
    }
    println!(
        "work: {:.2} MFLOP per image (conv + dense, fwd + bwd) -> {gflops:.1} GFLOP/s",
        train_macs as f64 * 2.0 / 1e6
    );
    let measured_peak: f64 = arg(&args, "--peak", 0.0);
    if measured_peak > 0.0 {
        // Per CPU-second, the fraction does not depend on how many cores the run got.
        if let Some(cpu) = cpu {
            let per_cpu = images / cpu * train_macs as f64 * 2.0 / 1e9;
            println!(
                "measured one-core peak {measured_peak:.1} GFLOP/s: {:.1} % per CPU-second, {:.1} % of {cores} core(s) in wall time",
                per_cpu / measured_peak * 100.0,
                gflops / (measured_peak * cores as f64) * 100.0
            );
        }
    } else if let Some(mhz) = cpu_mhz() {
        let peak = cores as f64 * 32.0 * mhz / 1e3;
        println!(
            "FMA peak {peak:.0} GFLOP/s ({cores} cores x 32 FLOP/cycle x {mhz:.0} MHz): {:.1} %",
            gflops / peak * 100.0
        );
    }
    println!(
        "test accuracy after {} epoch(s): {:.2} % (error {:.2} %)",
        last.epoch,
        test_stats.accuracy * 100.0,
        100.0 - test_stats.accuracy * 100.0
    );
    if let Some(rss) = peak_rss_mib() {
        println!("peak RSS: {rss:.0} MiB");
    }
    Ok(())
}
