//! Per-node latency of a model: `cargo run --release --example node_profile -- MODEL [BATCH]
//! [THREADS] [ROUNDS]`.
//!
//! `lithe bench --profile` sums time per op type; tuning a kernel needs the individual
//! layers (which convolution is slow, not that convolutions are). Prints the median of each
//! step over the rounds, with the input shapes it saw, so a step can be compared to the same
//! layer in ONNX Runtime's profile.

#[path = "support/cpu_clock.rs"]
mod cpu_clock;

use cpu_clock::{process_cpu, thread_cpu};
use std::time::Duration;

use lithe::ir::{Dim, Tensor};
use lithe::runtime::{Session, SessionOptions};

fn main() -> lithe::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(path) = args.first() else {
        eprintln!("usage: node_profile MODEL [BATCH] [THREADS] [ROUNDS]");
        std::process::exit(2);
    };
    let arg = |i: usize, default: usize| {
        args.get(i)
            .and_then(|v| v.parse::<usize>().ok())
            .unwrap_or(default)
    };
    let (batch, threads, rounds) = (arg(1, 1), arg(2, 1), arg(3, 50).max(1));
    let model = lithe::onnx::load_model(std::path::Path::new(path))?;
    let (simple, _) = lithe::passes::simplify(&model)?;
    let session = Session::new(
        &simple,
        &SessionOptions {
            threads,
            ..SessionOptions::default()
        },
    )?;
    let mut feeds = Vec::new();
    for (name, ty) in session.input_types() {
        let shape: Vec<usize> = ty
            .shape
            .as_deref()
            .unwrap_or(&[])
            .iter()
            .enumerate()
            .map(|(i, d)| match d {
                Dim::Known(n) => *n,
                _ if i == 0 => batch,
                _ => 1,
            })
            .collect();
        let n: usize = shape.iter().product();
        let data = (0..n).map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0);
        feeds.push((name.to_string(), Tensor::from_f32(shape, data.collect())?));
    }
    let refs: Vec<(&str, Tensor)> = feeds.iter().map(|(n, t)| (n.as_str(), t.clone())).collect();
    for _ in 0..3 {
        session.run(&refs)?;
    }
    let mut per_step: Vec<(String, String, Vec<Duration>)> = Vec::new();
    let mut totals = Vec::with_capacity(rounds);
    let mut cpu = Vec::with_capacity(rounds);
    let mut wall = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let (c0, w0) = (process_cpu(), std::time::Instant::now());
        session.run(&refs)?;
        wall.push(w0.elapsed());
        cpu.push(process_cpu().saturating_sub(c0));
        let (_, timings) = session.run_profiled(&refs)?;
        if per_step.is_empty() {
            per_step = timings
                .iter()
                .map(|t| (t.node_name.clone(), t.label.clone(), Vec::new()))
                .collect();
        }
        totals.push(timings.iter().map(|t| t.elapsed).sum::<Duration>());
        for (acc, t) in per_step.iter_mut().zip(&timings) {
            acc.2.push(t.elapsed);
        }
    }
    // One thread runs the steps on this thread: the observer sees each value as soon as
    // its step ends, so thread CPU time between observations is the step's CPU time, which
    // (unlike wall time) other processes on a busy machine do not inflate.
    let mut step_cpu: Vec<(String, Vec<Duration>)> = Vec::new();
    if threads == 1 {
        for _ in 0..rounds {
            let mut seen = Vec::new();
            let mut last = thread_cpu();
            session.run_observed(&refs, &mut |name, _| {
                let now = thread_cpu();
                seen.push((name.to_string(), now.saturating_sub(last)));
                last = thread_cpu();
            })?;
            if step_cpu.is_empty() {
                step_cpu = seen.iter().map(|(n, _)| (n.clone(), Vec::new())).collect();
            }
            for (acc, (_, d)) in step_cpu.iter_mut().zip(seen) {
                acc.1.push(d);
            }
        }
    }
    let median = |v: &mut Vec<Duration>| {
        v.sort();
        v[v.len() / 2].as_secs_f64() * 1e3
    };
    println!(
        "{:<40} {:<22} {:>9} {:>9}",
        "node", "op", "p50 ms", "min ms"
    );
    for (name, label, times) in &mut per_step {
        let p50 = median(times);
        println!(
            "{name:<40} {label:<22} {p50:>9.4} {:>9.4}",
            times[0].as_secs_f64() * 1e3
        );
    }
    println!("{:<63} {:>9.4}", "total (p50 of sums)", median(&mut totals));
    if !step_cpu.is_empty() {
        println!(
            "\n{:<40} {:>9} {:>9}",
            "value (thread CPU)", "p50 ms", "min ms"
        );
        let mut sum = 0.0;
        for (name, times) in &mut step_cpu {
            let p50 = median(times);
            sum += p50;
            println!(
                "{name:<40} {p50:>9.4} {:>9.4}",
                times[0].as_secs_f64() * 1e3
            );
        }
        println!("{:<40} {sum:>9.4}", "sum of p50");
    }
    let min_wall = wall.iter().min().map_or(0.0, |d| d.as_secs_f64() * 1e3);
    println!(
        "run: wall p50 {:.4} ms, wall min {min_wall:.4} ms, process CPU p50 {:.4} ms",
        median(&mut wall),
        median(&mut cpu)
    );
    Ok(())
}
