//! Helpers shared by the integration tests: where the repository, the shared models and the
//! reference Python live, scratch folders, and running a model in ONNX Runtime through
//! `scripts/ort_run.py` on the very tensors lithe sees. Each test crate uses a subset.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

use lithe::ir::Tensor;

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The shared folder of real models and data: `LITHE_SHARED`, else `../shared`.
pub fn shared() -> Option<PathBuf> {
    std::env::var("LITHE_SHARED")
        .ok()
        .map(PathBuf::from)
        .into_iter()
        .chain([repo().join("../shared")])
        .find(|p| p.join("models").is_dir())
}

/// The Python with onnxruntime (`LITHE_PYTHON`, set up by `.ci/run`); `None` skips the
/// comparisons that need it.
pub fn python() -> Option<String> {
    let py = std::env::var("LITHE_PYTHON").ok();
    if py.is_none() {
        eprintln!("skipped: LITHE_PYTHON is not set, no ONNX Runtime comparison");
    }
    py
}

/// Tokenizes `sentences` for MiniLM (the script's own four when empty) into an .npz of its
/// three inputs, with `scripts/minilm_inputs.py`.
pub fn minilm_tokens(py: &str, shared: &Path, out: &Path, sentences: &[&str]) {
    let ok = Command::new(py)
        .arg(repo().join("scripts/minilm_inputs.py"))
        .arg(shared.join("models/minilm_l6_v2_tokenizer/vocab.txt"))
        .arg(out)
        .args(sentences)
        .status()
        .expect("python runs")
        .success();
    assert!(ok, "tokenizer script failed");
}

/// A scratch folder unique to this test process, test crate and `tag`.
pub fn tmp_dir(tag: &str) -> PathBuf {
    let krate = std::env::current_exe()
        .ok()
        .and_then(|p| p.file_stem().map(|s| s.to_string_lossy().into_owned()))
        .unwrap_or_default();
    let d = std::env::temp_dir().join(format!("lithe-{krate}-{}-{tag}", std::process::id()));
    std::fs::create_dir_all(&d).expect("temp dir");
    d
}

/// ONNX Runtime's outputs for `feeds` on the model file at `model`. `no_opt` turns ORT's
/// graph optimizations off, so a QDQ model runs op by op in f32 (lithe's arithmetic) instead
/// of being fused into integer kernels.
pub fn run_ort_with(
    py: &str,
    model: &Path,
    feeds: &[(String, Tensor)],
    tag: &str,
    no_opt: bool,
) -> Vec<(String, Tensor)> {
    // A folder of its own, removed afterwards: the caller's files may sit under tmp_dir(tag).
    let dir = tmp_dir(&format!("ort-{tag}"));
    let inp = dir.join("in.npz");
    let out = dir.join("out.npz");
    lithe::data::npz::write_npz(&inp, feeds).expect("write inputs");
    let mut cmd = Command::new(py);
    cmd.arg(repo().join("scripts/ort_run.py"))
        .arg(model)
        .arg(&inp)
        .arg(&out);
    if no_opt {
        cmd.arg("--no-opt");
    }
    let status = cmd.status().expect("python runs");
    assert!(
        status.success(),
        "ONNX Runtime failed on {}",
        model.display()
    );
    let outputs = lithe::data::npz::read_npz(&out).expect("ORT outputs");
    let _ = std::fs::remove_dir_all(&dir);
    outputs
}

pub fn run_ort(
    py: &str,
    model: &Path,
    feeds: &[(String, Tensor)],
    tag: &str,
) -> Vec<(String, Tensor)> {
    run_ort_with(py, model, feeds, tag, false)
}

/// The index of the largest value of each row of a `[rows, classes]` tensor (the first one on
/// ties, as ORT's ArgMax).
pub fn argmax_rows(t: &Tensor) -> Vec<usize> {
    let v = t.to_f32_vec();
    let c = t.shape()[1];
    v.chunks(c)
        .map(|r| {
            r.iter()
                .enumerate()
                .fold(
                    (0, f32::NEG_INFINITY),
                    |b, (i, &x)| if x > b.1 { (i, x) } else { b },
                )
                .0
        })
        .collect()
}

/// The real `lithe` binary run with `args` from the repository root.
pub fn lithe(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_lithe"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("lithe runs")
}

pub fn stdout(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).to_string()
}

pub fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}
