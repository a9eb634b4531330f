//! lithe against ONNX Runtime on the shared real models and real inputs: MNIST test images,
//! photos, tokenized sentences. ORT's outputs are computed in the same test run by
//! `scripts/ort_run.py` with the Python in `LITHE_PYTHON` (`.ci/run` sets it up).
//! Also checks that exported models run bit-identically in lithe and load in ORT.

mod common;

use common::{python, repo, run_ort, shared, tmp_dir};
use std::path::{Path, PathBuf};
use std::process::Command;

use lithe::data::dataset::{open_dataset, Split};
use lithe::data::{image::read_image, Preprocess};
use lithe::ir::{Model, Tensor};
use lithe::runtime::{Session, SessionOptions};

fn lithe_outputs(model: &Model, feeds: &[(String, Tensor)]) -> Vec<(String, Tensor)> {
    let (simple, _) = lithe::passes::simplify(model).expect("simplify");
    let session = Session::new(&simple, &SessionOptions::default()).expect("session");
    let refs: Vec<(&str, Tensor)> = feeds.iter().map(|(n, t)| (n.as_str(), t.clone())).collect();
    session.run(&refs).expect("run")
}

/// Max abs difference relative to the reference output's scale (its max |value|).
fn relative_error(ours: &Tensor, theirs: &Tensor) -> f32 {
    assert_eq!(ours.shape(), theirs.shape());
    let (a, b) = (ours.to_f32_vec(), theirs.to_f32_vec());
    let scale = b.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
    a.iter()
        .zip(&b)
        .fold(0f32, |m, (x, y)| m.max((x - y).abs()))
        / scale
}

fn compare(name: &str, model_path: &Path, feeds: Vec<(String, Tensor)>) {
    let Some(py) = python() else {
        eprintln!("skipped {name}: LITHE_PYTHON is not set (.ci/run sets it)");
        return;
    };
    let model = lithe::onnx::load_model(model_path).expect("load");
    let ours = lithe_outputs(&model, &feeds);
    let theirs = run_ort(&py, model_path, &feeds, name);
    for ((n, a), (_, b)) in ours.iter().zip(&theirs) {
        let err = relative_error(a, b);
        println!(
            "{name}: output '{n}' {:?}: max |lithe - ORT| / max|ORT| = {err:.2e}",
            a.shape()
        );
        assert!(
            err <= 1e-4,
            "{name}: output '{n}' differs from ONNX Runtime by {err:e} (relative)"
        );
    }
}

#[test]
fn mnist_cnn_matches_onnx_runtime() {
    let Some(shared) = shared() else {
        eprintln!("skipped: ../shared not found");
        return;
    };
    let source = open_dataset("mnist", Split::Test, None).expect("embedded MNIST");
    let (images, _) = source.batch(0, 64).expect("batch");
    compare(
        "mnist_cnn",
        &shared.join("models/mnist_cnn.onnx"),
        vec![("input".into(), images)],
    );
}

#[test]
fn pplcnet_matches_onnx_runtime_on_photos() {
    let Some(shared) = shared() else {
        eprintln!("skipped: ../shared not found");
        return;
    };
    let pre = Preprocess::preset("imagenet").expect("preset");
    let mut dir: Vec<PathBuf> = std::fs::read_dir(shared.join("images/photos"))
        .expect("photos")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    dir.sort();
    let images: Vec<_> = dir.iter().map(|p| read_image(p).expect("decode")).collect();
    let batch = pre.apply_batch(&images).expect("preprocess");
    compare(
        "pplcnet",
        &shared.join("models/pplcnet_orientation.onnx"),
        vec![("x".into(), batch)],
    );
}

#[test]
fn minilm_matches_onnx_runtime_on_sentences() {
    let (Some(shared), Some(py)) = (shared(), python()) else {
        eprintln!("skipped: needs ../shared and LITHE_PYTHON");
        return;
    };
    let dir = tmp_dir("minilm-tokens");
    let tokens = dir.join("tokens.npz");
    common::minilm_tokens(&py, &shared, &tokens, &[]);
    let feeds = lithe::data::npz::read_npz(&tokens).expect("tokens");
    let model_path = shared.join("models/minilm_l6_v2.onnx");
    compare("minilm", &model_path, feeds.clone());

    // The sentence embedding (mask-weighted mean, L2-normalised) gives the documented similarity.
    let model = lithe::onnx::load_model(&model_path).expect("load");
    let out = lithe_outputs(&model, &feeds);
    let hidden = out[0].1.to_f32_vec();
    let mask = feeds
        .iter()
        .find(|(n, _)| n == "attention_mask")
        .expect("mask")
        .1
        .to_i64_vec()
        .expect("ints");
    let (seq, dim) = (out[0].1.shape()[1], out[0].1.shape()[2]);
    let embed = |s: usize| -> Vec<f32> {
        let mut e = vec![0f32; dim];
        let mut count = 0f32;
        for t in 0..seq {
            if mask[s * seq + t] == 1 {
                count += 1.0;
                for (d, v) in e.iter_mut().enumerate() {
                    *v += hidden[(s * seq + t) * dim + d];
                }
            }
        }
        let norm = e.iter().map(|v| (v / count).powi(2)).sum::<f32>().sqrt();
        e.iter().map(|v| v / count / norm).collect()
    };
    let cos: f32 = embed(0).iter().zip(embed(1)).map(|(a, b)| a * b).sum();
    println!("minilm: cos(sentence 0, sentence 1) = {cos:.4}");
    assert!((cos - 0.7553).abs() < 1e-3, "cosine similarity {cos}");
}

/// import -> export -> import -> run is bit-identical, and ORT runs the exported file with the
/// same outputs as the original.
#[test]
fn exported_models_round_trip_and_run_in_onnx_runtime() {
    let Some(shared) = shared() else {
        eprintln!("skipped: ../shared not found");
        return;
    };
    let source = open_dataset("mnist", Split::Test, None).expect("embedded MNIST");
    let (mnist, _) = source.batch(0, 8).expect("batch");
    let pre = Preprocess::preset("imagenet").expect("preset");
    let photo = pre
        .apply_batch(&[read_image(shared.join("images/photos/chelsea.png")).expect("decode")])
        .expect("preprocess");
    let cases = [
        ("mnist_cnn.onnx", vec![("input".to_string(), mnist)]),
        ("pplcnet_orientation.onnx", vec![("x".to_string(), photo)]),
    ];
    for (file, feeds) in cases {
        let original = shared.join("models").join(file);
        let model = lithe::onnx::load_model(&original).expect("load");
        let dir = tmp_dir("roundtrip");
        let exported = dir.join(file);
        lithe::onnx::save_model(&model, &exported, &Default::default()).expect("save");
        let reloaded = lithe::onnx::load_model(&exported).expect("reload");
        let a = lithe_outputs(&model, &feeds);
        let b = lithe_outputs(&reloaded, &feeds);
        assert_eq!(a, b, "{file}: outputs changed after a round trip");
        if let Some(py) = python() {
            let checked = Command::new(&py)
                .arg(repo().join("scripts/onnx_check.py"))
                .arg(&exported)
                .status()
                .expect("python runs");
            assert!(
                checked.success(),
                "{file}: onnx.checker rejects the exported model"
            );
            let theirs_original = run_ort(&py, &original, &feeds, "rt-orig");
            let theirs_exported = run_ort(&py, &exported, &feeds, "rt-exp");
            assert_eq!(
                theirs_original, theirs_exported,
                "{file}: ORT disagrees with itself after export"
            );
            println!("{file}: round trip bit-identical in lithe; ORT gives identical outputs on the export");
        }
    }
}
