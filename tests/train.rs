//! Training end to end: a short MNIST run reaches a useful accuracy, runs are reproducible
//! and resumable to the bit, and bad input is a clear error. The runs that reach the
//! published accuracy targets are `#[ignore]`d (minutes in release mode); run them with
//! `cargo test --release --test train -- --ignored`.

use std::path::PathBuf;
use std::sync::Arc;

use lithe::data::Split;
use lithe::ir::{Graph, Model, Node, Tensor, TypeInfo, ValueInfo};
use lithe::train::{
    Augment, OptimizerKind, ScheduleKind, TrainConfig, TrainSet, Trainer, EPOCH_METADATA_KEY,
};
use lithe::zoo::{self, ZooConfig};

fn tmp(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("lithe-train-{}-{tag}", std::process::id()));
    std::fs::create_dir_all(&d).expect("temp dir");
    d
}

fn mnist(split: Split, limit: usize) -> Option<TrainSet> {
    match TrainSet::open("mnist", split, None) {
        Ok(mut s) => {
            s.truncate(limit);
            Some(s)
        }
        Err(e) => {
            eprintln!("MNIST not available, skipping: {e}");
            None
        }
    }
}

#[test]
fn one_epoch_of_lenet_300_100_on_10k_images() {
    let (Some(train), Some(test)) = (mnist(Split::Train, 10_000), mnist(Split::Test, 2_000)) else {
        return;
    };
    let model = zoo::build("lenet-300-100", &ZooConfig::mnist(1)).unwrap();
    let config = TrainConfig {
        epochs: 1,
        batch: 64,
        lr: 0.05,
        seed: 1,
        ..TrainConfig::default()
    };
    let mut t = Trainer::new(model, config).unwrap();
    let mut steps = 0;
    t.fit(Arc::new(train), Some(&test), &mut |e| {
        if let lithe::train::Event::Step { .. } = e {
            steps += 1
        }
    })
    .unwrap();
    assert_eq!(steps, 157);
    let acc = t.history[0].test.as_ref().unwrap().accuracy;
    assert!(acc > 0.9, "test accuracy {acc}");
    // The exported model gives the same accuracy in the inference runtime.
    let exported = t.export();
    assert_eq!(exported.metadata_value(EPOCH_METADATA_KEY), Some("1"));
    let session = lithe::runtime::Session::new(&exported, &Default::default()).unwrap();
    let source = lithe::data::open_dataset("mnist", Split::Test, None).unwrap();
    let eval = lithe::eval::evaluate(&session, source.as_ref(), 500, Some(2000), |_| {}).unwrap();
    assert!((eval.top1 - acc).abs() < 1e-9, "{} vs {acc}", eval.top1);
}

/// resnet-small (BatchNorm) on a few MNIST images with augmentation, warm-up and a cosine
/// schedule, trained up to `epochs` (optionally resuming, optionally checkpointing).
fn small_run(
    train: &Arc<TrainSet>,
    epochs: usize,
    threads: usize,
    ckpt: Option<PathBuf>,
    resume: Option<&PathBuf>,
) -> Trainer {
    let model = match resume {
        Some(p) => lithe::onnx::load_model(p).unwrap(),
        None => zoo::build("resnet-small", &ZooConfig::mnist(3)).unwrap(),
    };
    let config = TrainConfig {
        epochs,
        batch: 32,
        lr: 0.05,
        optimizer: OptimizerKind::Sgd {
            momentum: 0.9,
            nesterov: true,
        },
        weight_decay: 1e-4,
        schedule: ScheduleKind::Cosine { min_factor: 0.0 },
        warmup_epochs: 0.5,
        seed: 9,
        threads,
        augment: Augment {
            shift: 2,
            flip: false,
        },
        checkpoint: ckpt,
        ..TrainConfig::default()
    };
    let mut t = Trainer::new(model, config).unwrap();
    if let Some(p) = resume {
        assert!(t.load_state(p).unwrap());
    }
    t.fit(train.clone(), None, &mut |_| {}).unwrap();
    t
}

#[test]
fn same_seed_same_bits_and_resume_continues_exactly() {
    let Some(train) = mnist(Split::Train, 96) else {
        return;
    };
    let train = Arc::new(train);
    let dir = tmp("resume");
    let a = small_run(&train, 2, 2, None, None).export();
    let b = small_run(&train, 2, 2, None, None).export();
    assert_eq!(
        a.graph.initializers, b.graph.initializers,
        "same seed, same threads"
    );
    // BatchNorm running statistics moved and are part of the model.
    let var = &a.graph.initializers["bn1.var"];
    assert!(var.as_f32().unwrap().iter().any(|&v| v != 1.0));

    let ckpt = dir.join("ckpt.onnx");
    small_run(&train, 1, 2, Some(ckpt.clone()), None);
    assert!(lithe::train::state_path(&ckpt).is_file());
    let resumed = small_run(&train, 2, 2, None, Some(&ckpt)).export();
    assert_eq!(a.graph.initializers, resumed.graph.initializers, "resume");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_input_is_a_clear_error() {
    let Some(train) = mnist(Split::Train, 64) else {
        return;
    };
    let train = Arc::new(train);
    let config = TrainConfig {
        batch: 32,
        ..TrainConfig::default()
    };
    // Images of the wrong size for the model.
    let model = zoo::build("lenet5", &ZooConfig::cifar(0)).unwrap();
    let mut t = Trainer::new(model, config.clone()).unwrap();
    let err = t
        .fit(train.clone(), None, &mut |_| {})
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("[1, 28, 28]") && err.contains("input"),
        "{err}"
    );

    // Labels outside the class range.
    let x = Tensor::from_f32(vec![4, 1, 28, 28], vec![0.0; 4 * 784]).unwrap();
    let bad = Arc::new(TrainSet::from_tensor("bad-labels", x, vec![0, 3, 12, 1], None).unwrap());
    let model = zoo::build("lenet-300-100", &ZooConfig::mnist(0)).unwrap();
    let mut t = Trainer::new(model, config.clone()).unwrap();
    let err = t.fit(bad, None, &mut |_| {}).unwrap_err().to_string();
    assert!(
        err.contains("label 12") && err.contains("sample 2") && err.contains("10 classes"),
        "{err}"
    );

    // A loss that becomes NaN names the step and the learning rate.
    let model = zoo::build("lenet-300-100", &ZooConfig::mnist(0)).unwrap();
    let mut t = Trainer::new(
        model,
        TrainConfig {
            lr: 1e30,
            epochs: 20,
            ..config.clone()
        },
    )
    .unwrap();
    let err = t
        .fit(train.clone(), None, &mut |_| {})
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("loss became")
            && err.contains("at step")
            && err.contains("learning rate 1000000"),
        "{err}"
    );

    // An op without a backward rule on the path to a parameter.
    let mut g = Graph {
        inputs: vec![ValueInfo::new(
            "x",
            TypeInfo::known(lithe::ir::DType::F32, &[1, 4]),
        )],
        outputs: vec![ValueInfo::new(
            "y",
            TypeInfo::unknown_shape(lithe::ir::DType::F32),
        )],
        ..Graph::default()
    };
    g.initializers.insert(
        "w".into(),
        Tensor::from_f32(vec![4, 3], vec![0.1; 12]).unwrap(),
    );
    g.nodes = vec![
        Node::new(
            "dense",
            "MatMul",
            vec!["x".into(), "w".into()],
            vec!["h".into()],
        ),
        Node::new("gelu_erf", "Erf", vec!["h".into()], vec!["y".into()]),
    ];
    let err = Trainer::new(Model::new(g, 13), config)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("gelu_erf") && err.contains("Erf"), "{err}");
}

/// Trains `arch` with `config` on the full MNIST training set and returns the test error.
fn mnist_error(arch: &str, config: TrainConfig) -> Option<f64> {
    let train = Arc::new(mnist(Split::Train, usize::MAX)?);
    let test = mnist(Split::Test, usize::MAX)?;
    let model = zoo::build(arch, &ZooConfig::mnist(config.seed)).unwrap();
    let mut t = Trainer::new(model, config).unwrap();
    let started = std::time::Instant::now();
    t.fit(train, Some(&test), &mut |e| {
        if let lithe::train::Event::Epoch(s) = e {
            eprintln!(
                "{arch} epoch {}: test accuracy {:.2} %",
                s.epoch,
                s.test.as_ref().map_or(0.0, |t| t.accuracy * 100.0)
            );
        }
    })
    .unwrap();
    let err = 1.0 - t.history.last()?.test.as_ref()?.accuracy;
    eprintln!(
        "{arch}: test error {:.2} % in {:.0} s",
        err * 100.0,
        started.elapsed().as_secs_f64()
    );
    Some(err)
}

#[test]
#[ignore]
fn lenet_300_100_reaches_1_8_percent() {
    let config = TrainConfig {
        epochs: 30,
        lr: 0.05,
        weight_decay: 1e-4,
        schedule: ScheduleKind::Cosine { min_factor: 0.0 },
        seed: 1,
        // One thread, as in the CLI runs recorded in BENCHMARKS.md.
        threads: 1,
        ..TrainConfig::default()
    };
    if let Some(e) = mnist_error("lenet-300-100", config) {
        assert!(e <= 0.018, "error {e}");
    }
}

#[test]
#[ignore]
fn lenet5_reaches_0_9_percent() {
    let config = TrainConfig {
        epochs: 15,
        lr: 0.02,
        weight_decay: 5e-4,
        schedule: ScheduleKind::Cosine { min_factor: 0.0 },
        seed: 1,
        // One thread, as in the CLI runs recorded in BENCHMARKS.md.
        threads: 1,
        ..TrainConfig::default()
    };
    if let Some(e) = mnist_error("lenet5", config) {
        assert!(e <= 0.009, "error {e}");
    }
}

#[test]
#[ignore]
fn mlp_1200_with_dropout_and_jitter_reaches_1_3_percent() {
    // With dropout on the input and hidden layers, lr 0.05 learnt too slowly to get there in
    // 30 epochs; lr 0.02 for 35 epochs does (1.24 %, see BENCHMARKS.md).
    let config = TrainConfig {
        epochs: 35,
        batch: 100,
        lr: 0.02,
        schedule: ScheduleKind::Cosine { min_factor: 0.0 },
        augment: Augment {
            shift: 2,
            flip: false,
        },
        seed: 1,
        // One thread, as in the CLI runs recorded in BENCHMARKS.md.
        threads: 1,
        ..TrainConfig::default()
    };
    if let Some(e) = mnist_error("mlp-1200", config) {
        assert!(e <= 0.013, "error {e}");
    }
}

#[test]
fn fine_tunes_an_imported_onnx_model() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("assets/models/mnist_cnn.onnx");
    let (Some(train), Some(test)) = (mnist(Split::Train, 640), mnist(Split::Test, 1000)) else {
        return;
    };
    let model = lithe::onnx::load_model(&path).unwrap();
    let config = TrainConfig {
        epochs: 1,
        batch: 64,
        lr: 0.001,
        seed: 2,
        ..TrainConfig::default()
    };
    let mut t = Trainer::new(model, config).unwrap();
    let before = t.evaluate(&test).unwrap().accuracy;
    t.fit(Arc::new(train), Some(&test), &mut |_| {}).unwrap();
    let after = t.history[0].test.as_ref().unwrap().accuracy;
    assert!(before > 0.98 && after > 0.98, "{before} -> {after}");
}

#[test]
fn distils_a_student_from_a_teacher() {
    let (Some(train), Some(test)) = (mnist(Split::Train, 4000), mnist(Split::Test, 1000)) else {
        return;
    };
    let train = Arc::new(train);
    let config = TrainConfig {
        epochs: 2,
        batch: 64,
        lr: 0.05,
        seed: 4,
        ..TrainConfig::default()
    };
    let mut teacher = Trainer::new(
        zoo::build("lenet-300-100", &ZooConfig::mnist(4)).unwrap(),
        config.clone(),
    )
    .unwrap();
    teacher.fit(train.clone(), None, &mut |_| {}).unwrap();
    let teacher = teacher.export();
    let mut student = Trainer::new(
        zoo::build("lenet-300-100", &ZooConfig::mnist(5)).unwrap(),
        config,
    )
    .unwrap();
    student
        .set_teacher(
            &teacher,
            lithe::train::Distillation {
                temperature: 4.0,
                alpha: 0.9,
                beta: 0.1,
            },
        )
        .unwrap();
    student.fit(train, Some(&test), &mut |_| {}).unwrap();
    let acc = student
        .history
        .last()
        .unwrap()
        .test
        .as_ref()
        .unwrap()
        .accuracy;
    assert!(acc > 0.9, "student accuracy {acc}");
}

/// The real `lithe train` binary: bad data is a clear error on stderr (no panic), with a
/// non-zero exit.
#[test]
fn cli_bad_input_is_a_clear_error() {
    let dir = tmp("cli-bad");
    let run = |args: &[&str]| {
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_lithe"))
            .args(args)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .output()
            .expect("lithe runs");
        assert!(!o.status.success(), "{args:?} should fail");
        let err = String::from_utf8_lossy(&o.stderr).to_string();
        assert!(!err.contains("panicked"), "{err}");
        err
    };
    let npz = |name: &str, shape: [usize; 4], labels: Vec<i64>| {
        let n: usize = shape.iter().product();
        // Deterministic values in [-1, 1).
        let x: Vec<f32> = (0..n)
            .map(|i| ((i * 7919 % 1000) as f32 / 500.0) - 1.0)
            .collect();
        let path = dir.join(name);
        lithe::data::npz::write_npz(
            &path,
            &[
                ("x".into(), Tensor::from_f32(shape.to_vec(), x).unwrap()),
                (
                    "y".into(),
                    Tensor::from_i64(vec![labels.len()], labels).unwrap(),
                ),
            ],
        )
        .unwrap();
        path.to_string_lossy().to_string()
    };
    let out = dir.join("out.onnx").to_string_lossy().to_string();
    let model = "assets/models/mnist_cnn.onnx";

    // Labels outside the 10 classes of the model being fine-tuned.
    let data = npz("labels.npz", [4, 1, 28, 28], vec![0, 3, 12, 1]);
    let err = run(&["train", model, "--data", &data, "--batch", "4", "-o", &out]);
    assert!(
        err.contains("label 12") && err.contains("10 classes"),
        "{err}"
    );

    // Images of the wrong size for the model.
    let data = npz("size.npz", [4, 1, 32, 32], vec![0, 1, 2, 3]);
    let err = run(&["train", model, "--data", &data, "--batch", "4", "-o", &out]);
    assert!(
        err.contains("[1, 32, 32]") || err.contains("[1, 28, 28]"),
        "{err}"
    );

    // A learning rate that makes the loss blow up: the error names the step and the rate.
    let labels = (0..64).map(|i| i % 10).collect();
    let data = npz("nan.npz", [64, 1, 28, 28], labels);
    let err = run(&[
        "train",
        "--arch",
        "lenet-300-100",
        "--data",
        &data,
        "--batch",
        "32",
        "--epochs",
        "20",
        "--lr",
        "1e30",
        "--eval-limit",
        "0",
        "-o",
        &out,
    ]);
    assert!(
        err.contains("loss became") && err.contains("at step") && err.contains("learning rate"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// `lithe train` reports its peak memory; lenet5 at batch 256 stays far under 1 GiB (the
/// full-epoch figure is in BENCHMARKS.md).
#[test]
fn cli_lenet5_at_batch_256_stays_under_1_gib() {
    if mnist(Split::Train, 1).is_none() {
        return;
    }
    let dir = tmp("cli-mem");
    let out = dir.join("lenet5.onnx");
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_lithe"))
        .args([
            "train", "--arch", "lenet5", "--data", "mnist", "--batch", "256",
        ])
        .args([
            "--epochs",
            "1",
            "--limit",
            "1024",
            "--eval-limit",
            "1000",
            "-o",
        ])
        .arg(&out)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("lithe runs");
    let text = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(
        o.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let Some(mib) = text
        .split("peak memory ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|v| v.parse::<f64>().ok())
    else {
        eprintln!("no peak memory reported (no /proc?), skipping: {text}");
        return;
    };
    eprintln!("lenet5, batch 256: peak memory {mib} MiB");
    assert!(mib < 1024.0, "{mib} MiB");
    let _ = std::fs::remove_dir_all(&dir);
}
