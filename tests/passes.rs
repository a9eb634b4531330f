//! Simplification passes on the real models: they shrink the graph and keep its outputs.

use std::path::PathBuf;

use lithe::data::dataset::{open_dataset, Split};
use lithe::ir::{Model, Tensor};
use lithe::passes;
use lithe::runtime::{PlanOptions, Session, SessionOptions};

fn shared() -> Option<PathBuf> {
    std::env::var("LITHE_SHARED")
        .ok()
        .map(PathBuf::from)
        .into_iter()
        .chain([PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared")])
        .find(|p| p.join("models").is_dir())
}

/// Runs without fusion so the comparison isolates the pass under test.
fn run(model: &Model, feeds: &[(&str, Tensor)]) -> Vec<f32> {
    let options = SessionOptions {
        threads: 1,
        plan: PlanOptions::unfused(),
    };
    let session = Session::new(model, &options).expect("session");
    session.run(feeds).expect("run")[0].1.to_f32_vec()
}

/// Deterministic values in [-2, 2), image-like in scale.
fn synthetic(shape: Vec<usize>) -> Tensor {
    let n: usize = shape.iter().product();
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let data = (0..n)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 40) as f32 / (1u64 << 22) as f32 - 2.0
        })
        .collect();
    Tensor::from_f32(shape, data).expect("tensor")
}

fn max_rel_diff(a: &[f32], b: &[f32]) -> f32 {
    let scale = b.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale
}

fn count(model: &Model, op: &str) -> usize {
    model.graph.nodes.iter().filter(|n| n.op_type == op).count()
}

#[test]
fn batchnorm_folds_into_pplcnet_convs() {
    let Some(shared) = shared() else {
        eprintln!("skipped: ../shared not found");
        return;
    };
    let model =
        lithe::onnx::load_model(&shared.join("models/pplcnet_orientation.onnx")).expect("load");
    assert_eq!(count(&model, "BatchNormalization"), 27);
    let (simple, reports) = passes::simplify(&model).expect("simplify");
    assert_eq!(count(&simple, "BatchNormalization"), 0, "{reports:?}");
    assert_eq!(count(&simple, "Identity"), 0, "{reports:?}");
    let x = synthetic(vec![2, 3, 224, 224]);
    let before = run(&model, &[("x", x.clone())]);
    let after = run(&simple, &[("x", x)]);
    let diff = max_rel_diff(&after, &before);
    assert!(diff < 1e-5, "outputs moved by {diff}");
}

#[test]
fn shape_folding_removes_minilm_shape_arithmetic() {
    let Some(shared) = shared() else {
        eprintln!("skipped: ../shared not found");
        return;
    };
    let model = lithe::onnx::load_model(&shared.join("models/minilm_l6_v2.onnx")).expect("load");
    let (seq, batch) = (12usize, 2usize);
    let fixed = vec![
        ("input_ids".to_string(), vec![batch, seq]),
        ("attention_mask".to_string(), vec![batch, seq]),
        ("token_type_ids".to_string(), vec![batch, seq]),
    ];
    let (folded, report) = passes::fold_shapes(&model, &fixed).expect("fold");
    assert_eq!(count(&folded, "Shape"), 0, "{report:?}");
    assert!(
        folded.graph.nodes.len() < model.graph.nodes.len() * 3 / 4,
        "{report:?}"
    );
    let ids: Vec<i64> = (0..batch * seq)
        .map(|i| 1000 + (i as i64 * 37) % 5000)
        .collect();
    let feeds = [
        (
            "input_ids",
            Tensor::from_i64(vec![batch, seq], ids).expect("ids"),
        ),
        (
            "attention_mask",
            Tensor::from_i64(vec![batch, seq], vec![1; batch * seq]).expect("mask"),
        ),
        (
            "token_type_ids",
            Tensor::from_i64(vec![batch, seq], vec![0; batch * seq]).expect("types"),
        ),
    ];
    let before = run(&model, &feeds);
    let after = run(&folded, &feeds);
    assert_eq!(before, after, "shape folding must not change any value");
}

#[test]
fn simplify_keeps_mnist_accuracy_bits() {
    let model = lithe::onnx::load_model(
        &PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("assets/models/mnist_cnn.onnx"),
    )
    .expect("load");
    let (simple, _) = passes::simplify(&model).expect("simplify");
    let source = open_dataset("mnist", Split::Test, None).expect("mnist");
    let (images, _) = source.batch(0, 16).expect("batch");
    assert_eq!(
        run(&model, &[("input", images.clone())]),
        run(&simple, &[("input", images)])
    );
}
