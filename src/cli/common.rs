//! Pieces shared by subcommands: loading models, synthetic inputs, number formatting, tables.

use std::path::Path;

use anyhow::{bail, Context, Result};
use lithe::ir::{DType, Dim, Model, Tensor, TypeInfo};
use lithe::runtime::{Session, SessionOptions};

pub fn load_model(path: &Path) -> Result<Model> {
    lithe::onnx::load_model(path).with_context(|| format!("cannot load {}", path.display()))
}

/// A session over the simplified model (constants folded, BatchNorm folded, identities gone).
pub fn session_for(model: &Model, threads: usize) -> Result<Session> {
    let (simple, _) = lithe::passes::simplify(model)?;
    Ok(Session::new(
        &simple,
        &SessionOptions {
            threads,
            ..SessionOptions::default()
        },
    )?)
}

/// Parses `name=value` pairs such as `--dim batch=8`.
pub fn parse_dims(pairs: &[String]) -> Result<Vec<(String, usize)>> {
    pairs
        .iter()
        .map(|p| {
            let (k, v) = p
                .split_once('=')
                .with_context(|| format!("'{p}' should look like name=value"))?;
            let v: usize = v
                .parse()
                .with_context(|| format!("'{v}' in '{p}' is not a size"))?;
            Ok((k.to_string(), v))
        })
        .collect()
}

/// Concrete shape for an input: symbolic dims from `dims`, else the first dim is the batch.
pub fn concrete_shape(
    name: &str,
    ty: &TypeInfo,
    batch: usize,
    dims: &[(String, usize)],
) -> Result<Vec<usize>> {
    let Some(shape) = &ty.shape else {
        bail!("input '{name}' has no declared shape; give one with --input {name}=file.npy")
    };
    shape
        .iter()
        .enumerate()
        .map(|(i, d)| match d {
            Dim::Known(n) => Ok(*n),
            Dim::Sym(s) => match dims.iter().find(|(k, _)| k == s) {
                Some((_, v)) => Ok(*v),
                None if i == 0 => Ok(batch),
                None => Ok(default_dim(s)),
            },
            Dim::Unknown if i == 0 => Ok(batch),
            Dim::Unknown => bail!("input '{name}' dimension {i} is unknown; set it with --dim"),
        })
        .collect()
}

/// Sequence-like symbolic dims default to a typical length so transformers get a real workload.
fn default_dim(sym: &str) -> usize {
    let s = sym.to_ascii_lowercase();
    if s.contains("seq") || s.contains("len") || s.contains("token") {
        128
    } else {
        1
    }
}

/// Deterministic synthetic input for benchmarking: normal-ish floats, plausible token ids,
/// all-ones attention masks, zero token types.
pub fn synthetic_input(name: &str, dtype: DType, shape: Vec<usize>, seed: u64) -> Result<Tensor> {
    let n: usize = lithe::ir::checked_numel(&shape, dtype.size_of())?;
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let lower = name.to_ascii_lowercase();
    Ok(match dtype {
        DType::F32 => {
            let v = (0..n)
                .map(|_| {
                    // Sum of uniforms: cheap, bell-shaped, deterministic.
                    let s: f32 = (0..4)
                        .map(|_| (next() >> 40) as f32 / (1u64 << 24) as f32)
                        .sum();
                    s - 2.0
                })
                .collect();
            Tensor::from_f32(shape, v)?
        }
        DType::I64 | DType::I32 => {
            let v: Vec<i64> = (0..n)
                .map(|_| {
                    if lower.contains("mask") {
                        1
                    } else if lower.contains("type") || lower.contains("segment") {
                        0
                    } else {
                        1000 + (next() % 1000) as i64
                    }
                })
                .collect();
            let t = Tensor::from_i64(shape, v)?;
            if dtype == DType::I32 {
                Tensor::new(
                    t.shape().to_vec(),
                    lithe::ir::TensorData::I32(t.as_i64()?.iter().map(|&x| x as i32).collect()),
                )?
            } else {
                t
            }
        }
        other => {
            bail!("cannot make synthetic data for input '{name}' of type {other}; pass --input")
        }
    })
}

pub fn human_count(n: u64) -> String {
    match n {
        n if n >= 1_000_000_000 => format!("{:.2}G", n as f64 / 1e9),
        n if n >= 1_000_000 => format!("{:.2}M", n as f64 / 1e6),
        n if n >= 10_000 => format!("{:.1}K", n as f64 / 1e3),
        n => n.to_string(),
    }
}

pub fn human_bytes(n: u64) -> String {
    match n {
        n if n >= 1 << 30 => format!("{:.2} GiB", n as f64 / (1u64 << 30) as f64),
        n if n >= 1 << 20 => format!("{:.2} MiB", n as f64 / (1u64 << 20) as f64),
        n if n >= 1 << 10 => format!("{:.1} KiB", n as f64 / 1024.0),
        n => format!("{n} B"),
    }
}

/// A plain text table with columns sized to their contents; numeric columns right-aligned.
pub struct Table {
    header: Vec<String>,
    rows: Vec<Vec<String>>,
    right: Vec<bool>,
}

impl Table {
    pub fn new(header: &[&str], right_aligned: &[bool]) -> Table {
        Table {
            header: header.iter().map(|s| s.to_string()).collect(),
            rows: Vec::new(),
            right: right_aligned.to_vec(),
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    pub fn render(&self) -> String {
        let cols = self.header.len();
        let mut width = vec![0; cols];
        for r in std::iter::once(&self.header).chain(&self.rows) {
            for (i, c) in r.iter().enumerate().take(cols) {
                width[i] = width[i].max(c.chars().count());
            }
        }
        let line = |r: &Vec<String>| -> String {
            let mut s = String::new();
            for (i, w) in width.iter().enumerate() {
                let c = r.get(i).map(String::as_str).unwrap_or("");
                if i > 0 {
                    s.push_str("  ");
                }
                if self.right.get(i).copied().unwrap_or(false) {
                    s.push_str(&format!("{c:>w$}"));
                } else {
                    s.push_str(&format!("{c:<w$}"));
                }
            }
            s.trim_end().to_string()
        };
        let mut out = line(&self.header);
        out.push('\n');
        out.push_str(&"-".repeat(width.iter().sum::<usize>() + 2 * cols.saturating_sub(1)));
        out.push('\n');
        for r in &self.rows {
            out.push_str(&line(r));
            out.push('\n');
        }
        out
    }
}

/// A progress bar on stderr for work over `len` items; hidden when stderr is not a terminal.
pub fn progress(len: u64, what: &str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(len);
    let style = indicatif::ProgressStyle::with_template(
        "{msg:>10} [{bar:30}] {pos}/{len} ({per_sec}, eta {eta})",
    )
    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
    .progress_chars("=> ");
    bar.set_style(style);
    bar.set_message(what.to_string());
    bar
}
