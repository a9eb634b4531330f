//! Integer fusions on the int8 QOperator models `lithe quantize --format qop` writes: the
//! MNIST CNN (a MaxPool on the codes after each QLinearConv, run inside it) and PP-LCNet
//! (`DequantizeLinear -> HardSwish -> QuantizeLinear` after each QLinearConv). With the fusion on and off the
//! outputs are bit-identical, and the fused steps are really in the plan.
//! Needs ../shared (or LITHE_SHARED) for the calibration data; skips with a note otherwise.

mod common;

use common::{lithe, shared, stderr, tmp_dir};
use std::path::{Path, PathBuf};

use lithe::data::image::read_image;
use lithe::data::Preprocess;
use lithe::ir::{Model, Tensor, TensorData};
use lithe::runtime::plan::build;
use lithe::runtime::{PlanOptions, Session, SessionOptions};

fn quantize(args: &[&str]) {
    let o = lithe(args);
    assert!(o.status.success(), "lithe {args:?}: {}", stderr(&o));
}

/// The model as `lithe bench` runs it (simplified), and its plan's step labels.
fn load(path: &Path) -> (Model, Vec<String>) {
    let model = lithe::onnx::load_model(path).expect("quantized model");
    let (simple, _) = lithe::passes::simplify(&model).expect("simplify");
    let labels = build(&simple, &PlanOptions::default())
        .expect("plan")
        .steps
        .into_iter()
        .map(|s| s.label)
        .collect();
    (simple, labels)
}

/// Outputs with the fusion off (one thread) and on (one and two threads, in a session that ran
/// before) are identical.
fn fused_equals_unfused(model: &Model, input: &str, x: &Tensor) {
    let run = |threads: usize, fuse_quantized: bool| {
        let options = SessionOptions {
            threads,
            plan: PlanOptions {
                fuse_quantized,
                fuse_qdq_products: false,
                ..PlanOptions::default()
            },
        };
        let session = Session::new(model, &options).expect("session");
        if fuse_quantized {
            // A run on other data first: kernels that reuse pooled output buffers with stale
            // contents must still write every element.
            let other = match x.data() {
                TensorData::F32(v) => Tensor::from_f32(
                    x.shape().to_vec(),
                    v.iter().rev().map(|&a| 0.5 - a).collect(),
                )
                .expect("tensor"),
                _ => x.clone(),
            };
            session.run(&[(input, other)]).expect("warm-up run");
        }
        session.run(&[(input, x.clone())]).expect("run")
    };
    let want = run(1, false);
    for threads in [1, 2] {
        let got = run(threads, true);
        assert_eq!(got.len(), want.len());
        for ((name, g), (_, w)) in got.iter().zip(&want) {
            assert_eq!(g, w, "output {name}, {threads} threads");
        }
    }
}

fn count(labels: &[String], label: &str) -> usize {
    labels.iter().filter(|l| *l == label).count()
}

#[test]
fn mnist_qop_fused_max_pool_is_bit_identical() {
    if shared().is_none() {
        eprintln!("skipped: ../shared not found (MNIST calibration data)");
        return;
    }
    let out = tmp_dir("mnist").join("mnist_qop.onnx");
    let out_s = out.to_str().expect("utf-8 path");
    quantize(&[
        "quantize",
        "assets/models/mnist_cnn.onnx",
        "-o",
        out_s,
        "--format",
        "qop",
        "--calib",
        "mnist",
        "-q",
        "--no-activation-sqnr",
    ]);
    let (model, labels) = load(&out);
    // The QOperator file pools the codes (MaxPool on u8), and the runtime runs each pool
    // inside the convolution before it.
    assert_eq!(count(&labels, "QLinearConv+MaxPool"), 2, "{labels:?}");
    let n = 16;
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let pixels = (0..n * 784)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 40) as f32 / (1u64 << 24) as f32
        })
        .collect();
    let x = Tensor::from_f32(vec![n, 1, 28, 28], pixels).expect("x");
    let input = model.graph.inputs[0].name.clone();
    fused_equals_unfused(&model, &input, &x);
    let _ = std::fs::remove_file(&out);
}

#[test]
fn pplcnet_qop_fused_hardswish_is_bit_identical() {
    let Some(shared) = shared() else {
        eprintln!("skipped: ../shared not found (PP-LCNet and photos)");
        return;
    };
    // An image folder needs a label in each file name: copy the photos as NAME_0.EXT.
    let dir = tmp_dir("pplcnet");
    let photos = dir.join("photos");
    std::fs::create_dir_all(&photos).expect("photos dir");
    let mut paths: Vec<PathBuf> = std::fs::read_dir(shared.join("images/photos"))
        .expect("photos")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    paths.sort();
    for p in &paths {
        let (Some(stem), Some(ext)) = (p.file_stem(), p.extension()) else {
            continue;
        };
        let link = photos.join(format!(
            "{}_0.{}",
            stem.to_string_lossy(),
            ext.to_string_lossy()
        ));
        std::fs::copy(p, &link).expect("copy photo");
    }
    let out = dir.join("pplcnet_qop.onnx");
    let f32_model = shared.join("models/pplcnet_orientation.onnx");
    quantize(&[
        "quantize",
        f32_model.to_str().expect("utf-8 path"),
        "-o",
        out.to_str().expect("utf-8 path"),
        "--format",
        "qop",
        "--calib",
        photos.to_str().expect("utf-8 path"),
        "--preprocess",
        "imagenet",
        "-q",
        "--no-activation-sqnr",
    ]);
    let (model, labels) = load(&out);
    let hardswish = count(&labels, "DequantizeLinear+HardSwish+QuantizeLinear");
    assert!(
        hardswish >= 20,
        "{hardswish} fused HardSwish steps: {labels:?}"
    );
    let pre = Preprocess::preset("imagenet").expect("preset");
    let images: Vec<_> = paths
        .iter()
        .take(4)
        .map(|p| read_image(p).expect("decode").to_rgb())
        .collect();
    let x = pre.apply_batch(&images).expect("preprocess");
    let input = model.graph.inputs[0].name.clone();
    fused_equals_unfused(&model, &input, &x);
    let _ = std::fs::remove_dir_all(&dir);
}
