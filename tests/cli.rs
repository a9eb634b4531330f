//! The real `lithe` binary on real models: each subcommand's output, and one-line errors with
//! a non-zero exit for bad files.

mod common;

use common::{lithe, stderr, stdout};
use std::path::PathBuf;
use std::process::Output;

const MODEL: &str = "assets/models/mnist_cnn.onnx";

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("lithe-cli-{}", std::process::id()));
    std::fs::create_dir_all(&d).expect("temp dir");
    d.join(name)
}

#[test]
fn inspect_lists_layers_params_and_macs() {
    let o = lithe(&["inspect", MODEL]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = stdout(&o);
    assert!(text.contains("conv") && text.contains("fc"), "{text}");
    assert!(text.contains("421.6K parameters"), "{text}");

    let o = lithe(&["inspect", MODEL, "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    // 32*9+32 + 64*32*9+64 + 3136*128+128 + 128*10+10 float weights. The model card's 421,644
    // also counts the two int64 values of the Reshape target shape, which are not parameters.
    assert_eq!(v["stats"]["total_params"], 421_642);
    assert!(v["stats"]["total_macs"].as_u64().unwrap_or(0) > 1_000_000);
}

#[test]
fn eval_reports_accuracy_on_embedded_mnist() {
    let o = lithe(&["eval", MODEL, "--data", "mnist", "--limit", "500", "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    assert_eq!(v["accuracy"]["samples"], 500);
    assert!(v["accuracy"]["top1"].as_f64().unwrap_or(0.0) > 0.97, "{v}");
}

#[test]
fn run_reads_npy_and_writes_npz() {
    let source =
        lithe::data::dataset::open_dataset("mnist", lithe::data::dataset::Split::Test, None)
            .expect("mnist");
    let (images, _) = source.batch(0, 3).expect("batch");
    let input = tmp("three.npy");
    lithe::data::npy::write_npy(&input, &images).expect("write");
    let output = tmp("out.npz");
    let spec = format!("input={}", input.display());
    let o = lithe(&[
        "run",
        MODEL,
        "--input",
        &spec,
        "--output",
        output.to_str().unwrap_or_default(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let outs = lithe::data::npz::read_npz(&output).expect("outputs");
    assert_eq!(outs[0].1.shape(), &[3, 10]);
}

#[test]
fn bench_reports_latency() {
    let o = lithe(&[
        "bench",
        MODEL,
        "--batch",
        "4",
        "--threads",
        "1",
        "--seconds",
        "0.2",
        "--json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    assert!(v["p50_ms"].as_f64().unwrap_or(0.0) > 0.0);
    assert_eq!(v["batch"], 4);
}

/// The README's first command, shortened: every step runs on the embedded MNIST and prints
/// its result, and the quantized model keeps its accuracy.
#[test]
fn demo_runs_every_step() {
    let o = lithe(&[
        "demo",
        "--limit",
        "300",
        "--seconds",
        "0.05",
        "--train-epochs",
        "0",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = stdout(&o);
    for step in [
        "== 1. inspect",
        "== 2. evaluate",
        "== 3. latency",
        "== 4. quantize",
    ] {
        assert!(text.contains(step), "{step} missing:\n{text}");
    }
    assert!(
        text.contains("top-1") && text.contains("integer engine"),
        "{text}"
    );
    assert!(text.contains("x the f32 latency"), "{text}");
}

fn assert_one_line_failure(o: &Output, expect: &str) {
    assert!(!o.status.success(), "should fail");
    let err = stderr(o);
    assert_eq!(err.trim_end().lines().count(), 1, "not one line: {err}");
    assert!(err.contains(expect), "'{expect}' not in: {err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn bad_files_give_one_line_errors() {
    let bytes =
        std::fs::read(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(MODEL)).expect("model");
    let truncated = tmp("truncated.onnx");
    std::fs::write(&truncated, &bytes[..bytes.len() / 3]).expect("write");
    assert_one_line_failure(
        &lithe(&["inspect", truncated.to_str().unwrap_or_default()]),
        "truncated.onnx",
    );

    let random = tmp("random.onnx");
    let mut state = 0x1234_5678_9abc_def0u64;
    let noise: Vec<u8> = (0..4096)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect();
    std::fs::write(&random, noise).expect("write");
    assert_one_line_failure(
        &lithe(&["run", random.to_str().unwrap_or_default()]),
        "random.onnx",
    );

    assert_one_line_failure(
        &lithe(&["inspect", "no/such/model.onnx"]),
        "no/such/model.onnx",
    );
    assert_one_line_failure(
        &lithe(&["eval", MODEL, "--data", "no-such-set"]),
        "no-such-set",
    );
}

/// A tiny model asking for one tensor larger than the process may allocate (here under
/// `ulimit -v`): a one-line error naming the node, not an abort in the allocator.
#[cfg(target_os = "linux")]
#[test]
fn a_tensor_larger_than_memory_is_an_error_not_an_abort() {
    use lithe::ir::{Attr, DType, Graph, Model, Node, Tensor, TensorData, TypeInfo, ValueInfo};
    let mut g = Graph {
        outputs: vec![ValueInfo::new("y", TypeInfo::unknown_shape(DType::F32))],
        nodes: vec![Node::new(
            "fill",
            "ConstantOfShape",
            vec!["shape".into()],
            vec!["y".into()],
        )
        .with_attr(
            "value",
            Attr::Tensor(Tensor::from_f32(vec![1], vec![0.5]).expect("value")),
        )],
        ..Graph::default()
    };
    // 2^31 floats: 8 GiB, under the 16 GiB per-tensor cap but over the 2 GB allowed below.
    let shape = Tensor::new(vec![1], TensorData::I64(vec![1 << 31])).expect("shape");
    g.initializers.insert("shape".into(), shape);
    let path = tmp("eight_gib.onnx");
    lithe::onnx::save_model(&Model::new(g, 13), &path, &Default::default()).expect("save");
    let o = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "ulimit -v 2000000 && exec '{}' run '{}'",
            env!("CARGO_BIN_EXE_lithe"),
            path.display()
        ))
        .output()
        .expect("sh");
    assert_one_line_failure(&o, "memory available");
    assert!(stderr(&o).contains("fill"), "{}", stderr(&o));
}
