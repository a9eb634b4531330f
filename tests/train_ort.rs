//! Models trained by lithe give the same predictions in ONNX Runtime: the committed MNIST
//! models on the whole test set, and briefly trained zoo models with BatchNorm and Dropout
//! (whose running statistics and ratios must export as inference-mode ONNX). ORT runs through
//! `scripts/ort_run.py` with the Python in `LITHE_PYTHON`; without it the tests skip.

mod common;

use common::{python, repo, tmp_dir};
use std::path::Path;
use std::sync::Arc;

use lithe::data::Split;
use lithe::ir::Tensor;
use lithe::runtime::{Session, SessionOptions};
use lithe::train::{TrainConfig, TrainSet, Trainer};
use lithe::zoo::{self, ZooConfig};

/// ORT's logits for `x` on the model file at `path`.
fn ort_logits(py: &str, path: &Path, x: &Tensor, tag: &str) -> Tensor {
    let mut outs = common::run_ort(py, path, &[("input".to_string(), x.clone())], tag);
    outs.remove(0).1
}

fn lithe_logits(path: &Path, x: &Tensor) -> Tensor {
    let model = lithe::onnx::load_model(path).expect("load");
    let s = Session::new(&model, &SessionOptions::default()).expect("session");
    s.run(&[("input", x.clone())]).expect("run").remove(0).1
}

fn argmax_rows(t: &Tensor) -> Vec<usize> {
    let c = t.shape()[1];
    t.as_f32()
        .unwrap()
        .chunks(c)
        .map(|r| {
            (0..c)
                .max_by(|&a, &b| r[a].total_cmp(&r[b]).then(b.cmp(&a)))
                .unwrap_or(0)
        })
        .collect()
}

/// Same predictions (argmax) and logits equal to a small relative error.
fn assert_agree(path: &Path, x: &Tensor, py: &str, tag: &str) {
    let ours = lithe_logits(path, x);
    let theirs = ort_logits(py, path, x, tag);
    assert_eq!(ours.shape(), theirs.shape());
    let (a, b) = (ours.as_f32().unwrap(), theirs.as_f32().unwrap());
    let scale = b.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
    let err = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale;
    assert!(err < 1e-4, "{}: relative logit error {err}", path.display());
    let (pa, pb) = (argmax_rows(&ours), argmax_rows(&theirs));
    let differ = pa.iter().zip(&pb).filter(|(x, y)| x != y).count();
    assert_eq!(differ, 0, "{}: {differ} predictions differ", path.display());
}

#[test]
fn committed_mnist_models_agree_with_onnx_runtime() {
    let Some(py) = python() else { return };
    let Ok(test) = TrainSet::open("mnist", Split::Test, None) else {
        eprintln!("MNIST not available; skipping");
        return;
    };
    let all: Vec<usize> = (0..test.len()).collect();
    let (x, _) = test
        .gather(&all, Default::default(), &mut lithe::train::Rng::new(0))
        .unwrap();
    for name in ["lenet5.onnx", "lenet-300-100.onnx"] {
        let path = repo().join("assets/models").join(name);
        if path.is_file() {
            assert_agree(&path, &x, &py, name);
        } else {
            eprintln!("{} missing; skipping", path.display());
        }
    }
}

#[test]
fn trained_zoo_models_with_batchnorm_and_dropout_agree_with_onnx_runtime() {
    let Some(py) = python() else { return };
    let Ok(mut train) = TrainSet::open("mnist", Split::Train, None) else {
        eprintln!("MNIST not available; skipping");
        return;
    };
    train.truncate(128);
    let train = Arc::new(train);
    let dir = tmp_dir("zoo");
    for arch in ["resnet-small", "mobilenet-small", "vgg-small", "mlp-1200"] {
        let model = zoo::build(arch, &ZooConfig::mnist(5)).unwrap();
        let config = TrainConfig {
            epochs: 1,
            batch: 32,
            lr: 0.05,
            seed: 5,
            ..TrainConfig::default()
        };
        let mut t = Trainer::new(model, config).unwrap();
        t.fit(train.clone(), None, &mut |_| {}).unwrap();
        let path = dir.join(format!("{arch}.onnx"));
        lithe::onnx::save_model(&t.export(), &path, &Default::default()).unwrap();
        let (x, _) = train
            .gather(
                &(0..64).collect::<Vec<_>>(),
                Default::default(),
                &mut lithe::train::Rng::new(1),
            )
            .unwrap();
        assert_agree(&path, &x, &py, arch);
    }
    let _ = std::fs::remove_dir_all(&dir);
}
