//! Subcommands of the `lithe` binary.

mod bench;
mod common;
mod demo;
mod eval;
mod inspect;
mod qat;
mod quantize;
mod run;
mod train;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "lithe",
    version,
    about = "Make trained neural networks small and fast, and prove it."
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Per-layer table: op, shapes, parameters, MACs, weight statistics; totals and size.
    Inspect(inspect::Args),
    /// Run a model on inputs from .npy/.npz files and write its outputs.
    Run(run::Args),
    /// Top-1/top-5 accuracy on a labelled data set.
    Eval(eval::Args),
    /// Latency (p50/p90) and throughput.
    Bench(bench::Args),
    /// The main job on the embedded default: the MNIST CNN on the embedded MNIST test set.
    Demo(demo::Args),
    /// Post-training quantization (int8 and lower; linear, fixed, log or k-means) with a report.
    Quantize(Box<quantize::Args>),
    /// Train a zoo model from scratch, or fine-tune an ONNX model, on a labelled data set.
    Train(Box<train::Args>),
}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Inspect(a) => inspect::run(a),
        Command::Run(a) => run::run(a),
        Command::Eval(a) => eval::run(a),
        Command::Bench(a) => bench::run(a),
        Command::Demo(a) => demo::run(a),
        Command::Quantize(a) => quantize::run(*a),
        Command::Train(a) => train::run(*a),
    }
}
