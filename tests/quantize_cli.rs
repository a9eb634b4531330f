//! `lithe quantize` on bad input, through the real binary: each case is either a one-line
//! error naming what is wrong (tensor, sample, option) with a non-zero exit, or documented safe
//! behaviour (all-zero and constant calibration data give positive scales).

mod common;

use common::{lithe, stderr};
use std::path::{Path, PathBuf};
use std::process::Output;

use lithe::ir::{Model, Tensor};

const MODEL: &str = "assets/models/mnist_cnn.onnx";

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("lithe-quantize-cli-{}", std::process::id()));
    std::fs::create_dir_all(&d).expect("temp dir");
    d.join(name)
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap_or_default()
}

/// An .npz calibration set of `n` MNIST-shaped float samples filled by `fill`.
fn calib_npz(name: &str, n: usize, fill: impl Fn(usize) -> f32) -> PathBuf {
    let path = tmp(name);
    let x = Tensor::from_f32(vec![n, 1, 28, 28], (0..n * 784).map(fill).collect()).expect("x");
    let y = Tensor::from_i64(vec![n], vec![0; n]).expect("y");
    lithe::data::npz::write_npz(&path, &[("x".to_string(), x), ("y".to_string(), y)])
        .expect("write npz");
    path
}

fn quantize(calib: &Path, out: &str, extra: &[&str]) -> (Output, PathBuf) {
    let out = tmp(out);
    let mut args = vec![
        "quantize",
        MODEL,
        "-o",
        s(&out),
        "-q",
        "--no-activation-sqnr",
        "--calib",
        s(calib),
    ];
    args.extend_from_slice(extra);
    (lithe(&args), out)
}

fn assert_one_line_failure(o: &Output, expect: &[&str]) {
    assert!(!o.status.success(), "should fail");
    let err = stderr(o);
    assert_eq!(err.trim_end().lines().count(), 1, "not one line: {err}");
    for e in expect {
        assert!(err.contains(e), "'{e}' not in: {err}");
    }
    assert!(!err.contains("panicked"), "{err}");
}

/// Every activation and weight scale in a QDQ model is positive and finite.
fn scales_are_positive(path: &Path) {
    let m = lithe::onnx::load_model(path).expect("quantized model");
    let mut seen = 0;
    for node in m
        .graph
        .nodes
        .iter()
        .filter(|n| n.op_type == "QuantizeLinear" || n.op_type == "DequantizeLinear")
    {
        let Some(scale) = m.graph.initializers.get(&node.inputs[1]) else {
            continue;
        };
        for v in scale.to_f32_vec() {
            assert!(v.is_finite() && v > 0.0, "{}: scale {v}", node.inputs[1]);
        }
        seen += 1;
    }
    assert!(seen >= 8, "only {seen} Quantize/DequantizeLinear nodes");
}

#[test]
fn all_zero_and_constant_calibration_data_give_positive_scales() {
    for (name, value) in [
        ("zeros.npz", 0.0f32),
        ("constant.npz", 0.75),
        ("neg.npz", -2.0),
    ] {
        let calib = calib_npz(name, 8, |_| value);
        for method in ["kl", "minmax", "percentile=99.9", "mse"] {
            let (o, out) = quantize(
                &calib,
                &format!("{name}.{method}.onnx"),
                &["--activations", method],
            );
            assert!(o.status.success(), "{name} {method}: {}", stderr(&o));
            scales_are_positive(&out);
        }
    }
}

fn with_first_conv_weight(f: impl Fn(&mut [f32])) -> (Model, String) {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(MODEL);
    let mut m = lithe::onnx::load_model(&path).expect("model");
    let name = m
        .graph
        .nodes
        .iter()
        .find(|n| n.op_type == "Conv")
        .expect("a Conv")
        .inputs[1]
        .clone();
    let w = m.graph.initializers.get_mut(&name).expect("weight");
    f(w.as_f32_mut().expect("f32 weight"));
    (m, name)
}

/// Saves `m` and quantizes that file with `calib`: the output and the quantized file's path.
fn quantize_edited(m: &Model, tag: &str, calib: &Path) -> (Output, PathBuf) {
    let model = tmp(&format!("weights_{tag}.onnx"));
    lithe::onnx::save_model(m, &model, &Default::default()).expect("save");
    let out = tmp(&format!("weights_{tag}_q.onnx"));
    let o = lithe(&[
        "quantize",
        s(&model),
        "-o",
        s(&out),
        "-q",
        "--calib",
        s(calib),
    ]);
    (o, out)
}

#[test]
fn all_zero_and_constant_weights_give_positive_scales() {
    let calib = calib_npz("calib.npz", 4, |i| (i % 5) as f32 * 0.2);
    for (tag, value) in [("zero", 0.0f32), ("const", 0.25)] {
        let (m, _) = with_first_conv_weight(|w| w.fill(value));
        let (o, out) = quantize_edited(&m, tag, &calib);
        assert!(o.status.success(), "{tag}: {}", stderr(&o));
        scales_are_positive(&out);
    }
}

#[test]
fn non_finite_weights_name_the_tensor() {
    let calib = calib_npz("ok.npz", 4, |i| (i % 7) as f32 * 0.3);
    for (tag, bad) in [("nan", f32::NAN), ("inf", f32::INFINITY)] {
        let (m, name) = with_first_conv_weight(|w| w[5] = bad);
        let (o, out) = quantize_edited(&m, tag, &calib);
        assert_one_line_failure(&o, &[&name]);
        let err = stderr(&o);
        assert!(
            err.contains("NaN") || err.contains("non-finite") || err.contains("inf"),
            "{err}"
        );
        assert!(!out.exists(), "{tag}: an output was written");
    }
}

#[test]
fn non_finite_calibration_data_name_the_input_and_sample() {
    for (tag, bad) in [("nan", f32::NAN), ("inf", f32::NEG_INFINITY)] {
        // Sample 5 of 8 lies in the second batch of 4: the reported index is global.
        let calib = calib_npz(&format!("calib_{tag}.npz"), 8, |i| {
            if i == 5 * 784 + 100 {
                bad
            } else {
                0.1
            }
        });
        let (o, out) = quantize(&calib, &format!("calib_{tag}.onnx"), &["--batch", "4"]);
        assert_one_line_failure(&o, &["input", "sample 5"]);
        assert!(!out.exists());
    }
}

#[test]
fn empty_calibration_set_is_an_error() {
    let calib = calib_npz("empty.npz", 0, |_| 0.0);
    let (o, _) = quantize(&calib, "empty.onnx", &[]);
    assert_one_line_failure(&o, &["empty"]);
    // --calib-limit 0 empties a non-empty set the same way.
    let calib = calib_npz("four.npz", 4, |_| 0.5);
    let (o, _) = quantize(&calib, "limit0.onnx", &["--calib-limit", "0"]);
    assert_one_line_failure(&o, &["empty"]);
}

#[test]
fn bit_widths_out_of_range_are_errors() {
    let calib = calib_npz("bits.npz", 4, |_| 0.5);
    for extra in [
        &["--bits", "1"][..],
        &["--bits", "9"],
        &["--weight-bits", "0"],
        &["--weight-bits", "16"],
        &["--activation-bits", "1"],
        &["--activation-bits", "32"],
    ] {
        let (o, _) = quantize(&calib, "bits.onnx", extra);
        assert_one_line_failure(&o, &["bit width"]);
    }
}

#[test]
fn unknown_exclude_names_list_the_valid_ones() {
    let calib = calib_npz("exclude.npz", 4, |_| 0.5);
    let (o, _) = quantize(&calib, "exclude.onnx", &["--exclude", "no_such_node"]);
    assert_one_line_failure(&o, &["no_such_node", "node_conv2d"]);
    // A known name works and leaves that node in f32.
    let (o, out) = quantize(&calib, "exclude_ok.onnx", &["--exclude", "node_linear"]);
    assert!(o.status.success(), "{}", stderr(&o));
    scales_are_positive(&out);
}

#[test]
fn low_bit_activations_default_to_mse_and_warn_about_kl() {
    let out = tmp("a4.onnx");
    let base = ["quantize", MODEL, "-o", s(&out), "--no-activation-sqnr"];
    let run = |extra: &[&str]| {
        let mut args = base.to_vec();
        args.extend_from_slice(&["--calib", "mnist", "--calib-limit", "200"]);
        args.extend_from_slice(extra);
        lithe(&args)
    };
    let o = run(&["--activation-bits", "4"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains("activations 4-bit mse"), "{text}");
    let o = run(&["--activation-bits", "4", "--activations", "kl"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("warning: kl calibration with 4-bit"),
        "{}",
        stderr(&o)
    );
    let o = run(&[]);
    assert!(String::from_utf8_lossy(&o.stdout).contains("activations 8-bit kl"));
}
