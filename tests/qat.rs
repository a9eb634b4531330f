//! Quantization-aware training end to end on the MNIST CNN (assets/models/mnist_cnn.onnx):
//! QAT on 3000 training images for one epoch recovers accuracy that post-training
//! quantization loses (measured on 1000 test images), and the written QDQ model gives the same
//! predictions in ONNX Runtime (through `scripts/ort_run.py` with the Python in
//! `LITHE_PYTHON`; skipped with a note if unset).

mod common;

use common::{argmax_rows, python, repo};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

use lithe::data::dataset::{open_dataset, BatchSource, Split};
use lithe::ir::{Model, Tensor, TensorData};
use lithe::passes::quantize::{
    quantize, quantize_aware_training, ActivationCalib, QatConfig, QuantizeConfig, WeightScheme,
};
use lithe::runtime::{Session, SessionOptions};
use lithe::train::{
    ActRangeMode, KmeansFakeQuant, OptimizerKind, TrainConfig, TrainSet, Trainer, WeightRangeMode,
};

fn mnist_model() -> Model {
    lithe::onnx::load_model(&repo().join("assets/models/mnist_cnn.onnx")).expect("model")
}

fn predict(model: &Model, x: &Tensor) -> Vec<usize> {
    let (simple, _) = lithe::passes::simplify(model).expect("simplify");
    let s = Session::new(&simple, &SessionOptions::default()).expect("session");
    let out = s.run(&[("input", x.clone())]).expect("run");
    argmax_rows(&out[0].1)
}

fn accuracy(pred: &[usize], labels: &[i64]) -> f64 {
    let hits = pred
        .iter()
        .zip(labels)
        .filter(|(&p, &l)| p as i64 == l)
        .count();
    hits as f64 / labels.len() as f64
}

fn run_ort(py: &str, model: &Path, x: &Tensor, tag: &str) -> Vec<usize> {
    let outs = common::run_ort(py, model, &[("input".to_string(), x.clone())], tag);
    argmax_rows(&outs[0].1)
}

struct Data {
    calib: Box<dyn BatchSource>,
    train: Arc<TrainSet>,
    x: Tensor,
    labels: Vec<i64>,
}

fn data() -> Option<Data> {
    let calib = match open_dataset("mnist", Split::Train, None) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("skipped: MNIST is not available ({e})");
            return None;
        }
    };
    let mut train = TrainSet::open("mnist", Split::Train, None).expect("MNIST train");
    train.truncate(3000);
    let test = open_dataset("mnist", Split::Test, None).expect("MNIST test");
    let (x, labels) = test.batch(0, 1000).expect("batch");
    Some(Data {
        calib,
        train: Arc::new(train),
        x,
        labels,
    })
}

/// PTQ and QAT accuracy of `config`, and the QAT model.
fn ptq_vs_qat(
    d: &Data,
    config: &QuantizeConfig,
    act_ranges: ActRangeMode,
    weight_ranges: WeightRangeMode,
    optimizer: OptimizerKind,
) -> (f64, f64, Model, Model) {
    let (ptq, _) = quantize(&mnist_model(), Some(d.calib.as_ref()), config, &mut |_| {})
        .expect("post-training quantization");
    let ptq_acc = accuracy(&predict(&ptq, &d.x), &d.labels);
    let started = Instant::now();
    let qat = QatConfig {
        train: TrainConfig {
            epochs: 1,
            lr: 0.001,
            batch: 64,
            optimizer,
            ..TrainConfig::default()
        },
        act_ranges,
        weight_ranges,
    };
    let (model, report, qat_report) = quantize_aware_training(
        &mnist_model(),
        Some(d.calib.as_ref()),
        d.train.clone(),
        None,
        config,
        &qat,
        &mut |_| {},
    )
    .expect("quantization-aware training");
    assert_eq!(report.layers.len(), 4);
    assert_eq!(qat_report.epochs.len(), 1);
    assert_eq!(qat_report.train_samples, 3000);
    let qat_acc = accuracy(&predict(&model, &d.x), &d.labels);
    println!(
        "{}{} weights ({weight_ranges}), {}-bit activations ({act_ranges}): PTQ {:.2} % -> QAT {:.2} % on 1000 test images ({:.1} s, 1 epoch on 3000 images)",
        config.scheme,
        config.weight_bits,
        config.activation_bits,
        ptq_acc * 100.0,
        qat_acc * 100.0,
        started.elapsed().as_secs_f64()
    );
    (ptq_acc, qat_acc, ptq, model)
}

/// `min_agree` of 1000 predictions must match; accuracies within `tol`.
fn check_ort(model: &Model, d: &Data, tag: &str, min_agree: usize, tol: f64) {
    let Some(py) = python() else { return };
    let path = std::env::temp_dir().join(format!("lithe-qat-{}-{tag}.onnx", std::process::id()));
    lithe::onnx::save_model(model, &path, &Default::default()).expect("save");
    let theirs = run_ort(&py, &path, &d.x, tag);
    let ours = predict(model, &d.x);
    let agree = ours.iter().zip(&theirs).filter(|(a, b)| a == b).count();
    println!("{tag}: lithe and ONNX Runtime agree on {agree}/1000 predictions");
    assert!(
        agree >= min_agree,
        "{tag}: lithe and ORT agree on {agree}/1000"
    );
    assert!((accuracy(&theirs, &d.labels) - accuracy(&ours, &d.labels)).abs() <= tol);
}

#[test]
fn qat_recovers_three_bit_linear_quantization() {
    let Some(d) = data() else { return };
    // 3-bit weights (per tensor) and activations: post-training quantization collapses (the
    // activation ranges calibrated for 8 levels are far too tight); training with learned
    // ranges recovers nearly all of the f32 accuracy.
    let config = QuantizeConfig {
        scheme: WeightScheme::Linear,
        weight_bits: 3,
        activation_bits: 3,
        per_channel: false,
        measure_activation_sqnr: false,
        ..QuantizeConfig::default()
    };
    let (ptq, qat, _, model) = ptq_vs_qat(
        &d,
        &config,
        ActRangeMode::Ema { momentum: 0.9 },
        WeightRangeMode::MinMax,
        OptimizerKind::sgd(0.9),
    );
    assert!(qat > ptq + 0.05, "QAT {qat} vs PTQ {ptq}");
    assert!(qat > 0.95, "QAT {qat}");
    assert!(model.metadata_value("lithe.qat").is_some());
    // 3-bit logits tie often, and ties break on rounding differences between runtimes.
    check_ort(&model, &d, "linear3", 980, 0.01);
}

#[test]
fn qat_with_least_squares_weight_ranges_recovers_ternary_weights() {
    let Some(d) = data() else { return };
    // 2-bit symmetric weights are ternary {-s, 0, s}; with s from the largest weight nearly
    // every weight rounds to 0 and the post-training model guesses. Clipping at the
    // least-squares threshold while training recovers it.
    let config = QuantizeConfig {
        scheme: WeightScheme::Linear,
        weight_bits: 2,
        activation_bits: 8,
        per_channel: false,
        measure_activation_sqnr: false,
        ..QuantizeConfig::default()
    };
    let (ptq, qat, _, model) = ptq_vs_qat(
        &d,
        &config,
        ActRangeMode::Fixed,
        WeightRangeMode::Mse,
        OptimizerKind::sgd(0.9),
    );
    assert!(qat > ptq + 0.5 && qat > 0.9, "QAT {qat} vs PTQ {ptq}");
    check_ort(&model, &d, "ternary", 995, 0.005);
}

#[test]
fn qat_tunes_a_two_bit_kmeans_codebook() {
    let Some(d) = data() else { return };
    let config = QuantizeConfig {
        scheme: WeightScheme::Kmeans,
        weight_bits: 2,
        activation_bits: 8,
        activations: ActivationCalib::Entropy,
        measure_activation_sqnr: false,
        ..QuantizeConfig::default()
    };
    // Summed per-cluster gradients are large for big clusters; Adam normalises them.
    let (ptq, qat, ptq_model, model) = ptq_vs_qat(
        &d,
        &config,
        ActRangeMode::Fixed,
        WeightRangeMode::MinMax,
        OptimizerKind::adam(),
    );
    // The CNN already fits its training images, so there is little to gain on 1000 test
    // images; fine-tuning the centroids must not lose accuracy.
    assert!(qat >= ptq - 0.005, "QAT {qat} vs PTQ {ptq}");
    let books = |m: &Model| -> Vec<Vec<f32>> {
        m.graph
            .initializers
            .values()
            .filter(|t| t.rank() == 1 && t.numel() == 4)
            .filter_map(|t| t.as_f32().ok().map(<[f32]>::to_vec))
            .collect()
    };
    assert_eq!(books(&model).len(), books(&ptq_model).len());
    assert_ne!(
        books(&model),
        books(&ptq_model),
        "the centroids were trained"
    );
    // Every layer still shares 4 values: u8 indices below 4 into its codebook.
    let codes: Vec<u8> = model
        .graph
        .initializers
        .values()
        .filter_map(|t| match t.data() {
            TensorData::U8(v) if t.rank() >= 2 => v.iter().copied().max(),
            _ => None,
        })
        .collect();
    assert_eq!(codes.len(), 4, "one index tensor per layer");
    assert!(codes.iter().all(|&m| m < 4), "largest indices {codes:?}");
    check_ort(&model, &d, "kmeans2", 995, 0.005);
}

#[test]
fn kmeans_weights_stay_on_their_trained_centroids() {
    let Some(d) = data() else { return };
    let (simple, _) = lithe::passes::simplify(&mnist_model()).expect("simplify");
    let mut trainer = Trainer::new(
        simple,
        TrainConfig {
            optimizer: OptimizerKind::sgd(0.9),
            ..TrainConfig::default()
        },
    )
    .expect("trainer");
    let weights: Vec<String> = trainer
        .params
        .iter()
        .filter(|p| p.value.rank() >= 2)
        .map(|p| p.name.clone())
        .collect();
    assert_eq!(weights.len(), 4);
    let mut start = Vec::new();
    for w in &weights {
        let value = trainer.params.get(w).expect("param").value.clone();
        let (fq, snapped) = KmeansFakeQuant::new(&value, 2, w).expect("k-means");
        trainer.params.set_value(w, snapped.clone()).expect("set");
        trainer
            .params
            .set_fake_quant(w, Some(Arc::new(fq)))
            .expect("hook");
        start.push(snapped);
    }
    let distinct = |t: &Tensor| -> Vec<u32> {
        let mut v: Vec<u32> = t
            .as_f32()
            .expect("f32")
            .iter()
            .map(|x| x.to_bits())
            .collect();
        v.sort_unstable();
        v.dedup();
        v
    };
    // Momentum makes later steps depend on earlier ones: the weights must still agree
    // within each cluster after several.
    for step in 0..3 {
        let (x, labels) = d.calib.batch(step * 32, 32).expect("batch");
        trainer.train_step(x, &labels, 1e-4).expect("step");
    }
    for (w, s) in weights.iter().zip(&start) {
        let now = &trainer.params.get(w).expect("param").value;
        assert_eq!(
            distinct(now).len(),
            4,
            "{w}: {} values",
            distinct(now).len()
        );
        assert_ne!(distinct(now), distinct(s), "{w}: the centroids moved");
    }
}

#[test]
fn cli_quantize_qat_reports_f32_ptq_and_qat_accuracy() {
    if data().is_none() {
        return;
    }
    let dir = std::env::temp_dir().join(format!("lithe-qat-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let (out, report) = (dir.join("q.onnx"), dir.join("r.json"));
    let run = Command::new(env!("CARGO_BIN_EXE_lithe"))
        .arg("quantize")
        .arg(repo().join("assets/models/mnist_cnn.onnx"))
        .args([
            "--qat",
            "--data",
            "mnist",
            "--train-limit",
            "640",
            "--epochs",
            "1",
        ])
        .args(["--scheme", "log", "--bits", "4", "--act-ranges", "ema"])
        .args([
            "--eval",
            "mnist",
            "--eval-limit",
            "300",
            "--no-activation-sqnr",
            "-q",
        ])
        .arg("-o")
        .arg(&out)
        .arg("--report")
        .arg(&report)
        .output()
        .expect("lithe runs");
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(stdout.contains("qat epoch 1"), "{stdout}");
    assert!(stdout.contains("post-training"), "{stdout}");
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&report).expect("report")).expect("json");
    assert_eq!(json["qat"]["train_samples"], 640);
    assert_eq!(json["qat"]["act_ranges"], "ema=0.99");
    assert!(json["ptq_accuracy"]["top1"].as_f64().is_some());
    assert!(json["quantize"]["accuracy_after"]["top1"]
        .as_f64()
        .is_some());
    let model = lithe::onnx::load_model(&out).expect("written model");
    assert!(model.metadata_value("lithe.qat").is_some());
    let bad = Command::new(env!("CARGO_BIN_EXE_lithe"))
        .arg("quantize")
        .arg(repo().join("assets/models/mnist_cnn.onnx"))
        .args(["--qat", "--act-ranges", "learned", "-o"])
        .arg(dir.join("bad.onnx"))
        .output()
        .expect("lithe runs");
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(err.contains("activation range mode"), "{err}");
}
