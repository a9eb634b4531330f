//! `lithe quantize` on a transformer with three integer inputs (MiniLM): calibration reads an
//! .npz holding one array per model input, and the int8 model keeps the sentence embeddings.
//! Needs ../shared (the model and its vocabulary) and LITHE_PYTHON (the tokenizer script).

mod common;

use std::path::Path;

use common::{lithe, minilm_tokens, python, shared, stderr, tmp_dir};
use lithe::ir::Tensor;
use lithe::runtime::{Session, SessionOptions};

/// Mask-weighted mean of the last hidden state per sentence, L2-normalised.
fn embeddings(model: &Path, feeds: &[(String, Tensor)]) -> Vec<Vec<f32>> {
    let model = lithe::onnx::load_model(model).expect("load");
    let (simple, _) = lithe::passes::simplify(&model).expect("simplify");
    let session = Session::new(&simple, &SessionOptions::default()).expect("session");
    let refs: Vec<(&str, Tensor)> = feeds.iter().map(|(n, t)| (n.as_str(), t.clone())).collect();
    let out = session.run(&refs).expect("run");
    let hidden = out[0].1.to_f32_vec();
    let (n, seq, dim) = (
        out[0].1.shape()[0],
        out[0].1.shape()[1],
        out[0].1.shape()[2],
    );
    let mask = feeds
        .iter()
        .find(|(k, _)| k == "attention_mask")
        .expect("mask")
        .1
        .to_i64_vec()
        .expect("ints");
    (0..n)
        .map(|s| {
            let mut e = vec![0f32; dim];
            for t in (0..seq).filter(|t| mask[s * seq + t] == 1) {
                for (d, v) in e.iter_mut().enumerate() {
                    *v += hidden[(s * seq + t) * dim + d];
                }
            }
            let norm = e.iter().map(|v| v * v).sum::<f32>().sqrt();
            e.iter().map(|v| v / norm).collect()
        })
        .collect()
}

#[test]
fn minilm_calibrates_on_named_inputs_and_keeps_its_embeddings() {
    let (Some(shared), Some(py)) = (shared(), python()) else {
        eprintln!("skipped: needs ../shared and LITHE_PYTHON");
        return;
    };
    let dir = tmp_dir("quantize-minilm");
    let calib = dir.join("calib.npz");
    minilm_tokens(&py, &shared, &calib, &[]);
    let test = dir.join("test.npz");
    minilm_tokens(
        &py,
        &shared,
        &test,
        &[
            "A woman is playing the violin.",
            "Two dogs are playing in the snow.",
            "The company reported record profits this quarter.",
            "Smaller models run faster on phones.",
        ],
    );
    let model = shared.join("models/minilm_l6_v2.onnx");
    let out = dir.join("minilm_int8.onnx");
    // The feed-forward down-projections (their input, the GELU output, has outliers) are the
    // layers `--sensitivity` ranks worst; BENCHMARKS has the numbers with and without them.
    let mut args: Vec<String> = [
        "quantize",
        model.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "-q",
        "--no-activation-sqnr",
        "--calib",
        calib.to_str().unwrap(),
        "--activations",
        "minmax",
    ]
    .map(String::from)
    .to_vec();
    for layer in 0..6 {
        args.push("--exclude".into());
        args.push(format!("/m/encoder/layer.{layer}/output/dense/MatMul"));
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let o = lithe(&args);
    assert!(o.status.success(), "{}", stderr(&o));

    // The embedding tables are stored as int8 rows too: the file shrinks to under 0.4x even
    // with the six projections in f32.
    let size = |p: &Path| std::fs::metadata(p).expect("size").len() as f64;
    let ratio = size(&out) / size(&model);
    assert!(ratio < 0.4, "int8 file is {ratio:.2}x the f32 file");

    let feeds = lithe::data::npz::read_npz(&test).expect("tokens");
    let want = embeddings(&model, &feeds);
    let got = embeddings(&out, &feeds);
    for (s, (a, b)) in want.iter().zip(&got).enumerate() {
        let cos: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
        println!("sentence {s}: cos(f32, int8) = {cos:.4}");
        assert!(cos > 0.97, "sentence {s}: cosine {cos}");
    }

    // An archive that lacks one of the inputs: a one-line error naming it.
    let partial = dir.join("ids_only.npz");
    let ids = feeds
        .iter()
        .find(|(k, _)| k == "input_ids")
        .expect("ids")
        .clone();
    lithe::data::npz::write_npz(&partial, &[ids]).expect("write");
    let o = lithe(&[
        "quantize",
        model.to_str().unwrap(),
        "-o",
        dir.join("never.onnx").to_str().unwrap(),
        "-q",
        "--calib",
        partial.to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    let err = stderr(&o);
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(
        err.contains("no array for the model input 'attention_mask'"),
        "{err}"
    );
}

/// `--activations dynamic` needs no calibration data and keeps the embeddings as ONNX
/// Runtime's `quantize_dynamic` does, with every projection quantized.
#[test]
fn minilm_dynamic_activations_need_no_calibration() {
    let (Some(shared), Some(py)) = (shared(), python()) else {
        eprintln!("skipped: needs ../shared and LITHE_PYTHON");
        return;
    };
    let dir = tmp_dir("quantize-minilm-dynamic");
    let test = dir.join("test.npz");
    minilm_tokens(&py, &shared, &test, &[]);
    let model = shared.join("models/minilm_l6_v2.onnx");
    let out = dir.join("minilm_dynamic.onnx");
    let o = lithe(&[
        "quantize",
        model.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "-q",
        "--activations",
        "dynamic",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let size = |p: &Path| std::fs::metadata(p).expect("size").len() as f64;
    assert!(size(&out) / size(&model) < 0.3);
    let feeds = lithe::data::npz::read_npz(&test).expect("tokens");
    let (want, got) = (embeddings(&model, &feeds), embeddings(&out, &feeds));
    for (s, (a, b)) in want.iter().zip(&got).enumerate() {
        let cos: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
        println!("dynamic, sentence {s}: cos(f32, int8) = {cos:.4}");
        assert!(cos > 0.985, "sentence {s}: cosine {cos}");
    }
}
