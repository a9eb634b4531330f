//! The quantize pass end to end on the MNIST CNN (assets/models/mnist_cnn.onnx, 99.05 % f32):
//! int8 accuracy in lithe and in ONNX Runtime, bit-exact integer execution against ORT on the
//! same QOperator file, every scheme running in ORT, and bad input.
//! ORT runs through `scripts/ort_run.py` with the Python in `LITHE_PYTHON` (skipped if unset).

mod common;

use common::{argmax_rows, python, repo, run_ort, run_ort_with, tmp_dir};
use lithe::data::dataset::{open_dataset, BatchSource, Split, TensorSource};
use lithe::data::Preprocess;
use lithe::eval::evaluate;
use lithe::ir::{Model, Tensor};
use lithe::passes::quantize::{
    quantize, ActivationCalib, QuantFormat, QuantizeConfig, QuantizeReport, WeightScheme,
};
use lithe::runtime::{PlanOptions, Session, SessionOptions};

fn mnist_model() -> Model {
    lithe::onnx::load_model(&repo().join("assets/models/mnist_cnn.onnx")).expect("model")
}

fn session(model: &Model) -> Session {
    session_with(model, PlanOptions::default())
}

fn session_with(model: &Model, plan: PlanOptions) -> Session {
    let (simple, _) = lithe::passes::simplify(model).expect("simplify");
    let options = SessionOptions {
        plan,
        ..SessionOptions::default()
    };
    Session::new(&simple, &options).expect("session")
}

fn quantize_mnist(config: &QuantizeConfig) -> (Model, QuantizeReport) {
    let calib = open_dataset("mnist", Split::Train, None).expect("MNIST train");
    quantize(&mnist_model(), Some(calib.as_ref()), config, &mut |_| {}).expect("quantize")
}

#[test]
fn mnist_int8_loses_at_most_a_tenth_of_a_point() {
    let test = open_dataset("mnist", Split::Test, None).expect("MNIST test");
    let f32_acc = evaluate(&session(&mnist_model()), test.as_ref(), 500, None, |_| {}).unwrap();
    for format in [QuantFormat::Qdq, QuantFormat::QOperator] {
        let config = QuantizeConfig {
            format,
            measure_activation_sqnr: false,
            ..QuantizeConfig::default()
        };
        let (q, report) = quantize_mnist(&config);
        assert_eq!(report.layers.len(), 4);
        assert_eq!(report.calibration_samples, 1000);
        let acc = evaluate(&session(&q), test.as_ref(), 500, None, |_| {}).unwrap();
        println!(
            "{format:?}: f32 {:.2} % -> int8 {:.2} %",
            f32_acc.top1 * 100.0,
            acc.top1 * 100.0
        );
        assert!(
            acc.top1 >= f32_acc.top1 - 0.001,
            "{format:?}: {} vs {}",
            acc.top1,
            f32_acc.top1
        );
    }
}

#[test]
fn qoperator_model_is_bit_exact_with_onnx_runtime() {
    let Some(py) = python() else {
        eprintln!("skipped: LITHE_PYTHON is not set (.ci/run sets it)");
        return;
    };
    let test = open_dataset("mnist", Split::Test, None).expect("MNIST test");
    let (x, labels) = test.batch(0, 1000).expect("batch");
    let dir = tmp_dir("bitexact");
    for format in [QuantFormat::QOperator, QuantFormat::Qdq] {
        let config = QuantizeConfig {
            format,
            measure_activation_sqnr: false,
            ..QuantizeConfig::default()
        };
        let (q, _) = quantize_mnist(&config);
        let path = dir.join(format!("mnist_{format:?}.onnx"));
        lithe::onnx::save_model(&q, &path, &Default::default()).expect("save");
        let feeds = vec![("input".to_string(), x.clone())];
        let theirs = run_ort(&py, &path, &feeds, &format!("{format:?}"));
        let ours_session = session(&q);
        if format == QuantFormat::QOperator {
            // The max pools run on the codes, each inside the convolution before it.
            let labels = ours_session.step_labels();
            let fused = labels
                .iter()
                .filter(|l| **l == "QLinearConv+MaxPool")
                .count();
            assert_eq!(fused, 2, "{labels:?}");
        }
        let ours = ours_session.run(&[("input", x.clone())]).expect("run");
        let (a, b) = (ours[0].1.to_f32_vec(), theirs[0].1.to_f32_vec());
        let hits = |p: Vec<usize>| {
            p.iter()
                .zip(&labels)
                .filter(|(a, b)| **a as i64 == **b)
                .count()
        };
        let (ha, hb) = (
            hits(argmax_rows(&ours[0].1)),
            hits(argmax_rows(&theirs[0].1)),
        );
        println!("{format:?}: lithe {ha}/1000, ORT {hb}/1000 correct");
        if format == QuantFormat::QOperator {
            let differ = a
                .iter()
                .zip(&b)
                .filter(|(x, y)| x.to_bits() != y.to_bits())
                .count();
            assert_eq!(differ, 0, "{differ} of {} outputs differ from ORT", a.len());
        } else {
            // QDQ: ORT and lithe both run DQ -> Conv/Gemm -> [Relu] -> Q on integer kernels;
            // the last Gemm (no QuantizeLinear after it) runs in f32 in both, where summation
            // order may differ in the last bits.
            let max_diff = a
                .iter()
                .zip(&b)
                .map(|(x, y)| (x - y).abs())
                .fold(0.0f32, f32::max);
            println!("QDQ: max |logit diff| vs ORT {max_diff:e}");
            assert!(max_diff <= 1e-4, "max logit difference {max_diff}");
            assert!(ha.abs_diff(hb) <= 1, "lithe {ha} vs ORT {hb}");
        }
        assert!(hb >= 985, "ORT accuracy {hb}/1000");
    }
}

/// Top-1 minus runner-up logit of each row.
fn margins(t: &Tensor) -> Vec<f32> {
    let c = t.shape()[1];
    t.to_f32_vec()
        .chunks(c)
        .map(|r| {
            let (mut a, mut b) = (f32::NEG_INFINITY, f32::NEG_INFINITY);
            for &x in r {
                if x > a {
                    b = a;
                    a = x;
                } else if x > b {
                    b = x;
                }
            }
            a - b
        })
        .collect()
}

/// Every weight scheme at 4 bits (8-bit activations) as QDQ, run in lithe and in ONNX Runtime,
/// each both ways.
///
/// Unoptimized ORT (`ORT_DISABLE_ALL`) runs the QDQ graph op by op in f32, as lithe does with
/// its QDQ product fusion off: the logits must match to rounding (measured: bit-identical for
/// all four schemes) and top-1 on every image. Optimized ORT fuses DQ -> Conv/Gemm -> Q into
/// integer kernels (QLinearConv, QGemm), as lithe does by default: for the schemes stored as
/// 8-bit codes with a DequantizeLinear (linear, fixed point) the logits must match to rounding
/// again (measured: bit-identical). For log and k-means (a codebook Gather, which lithe leaves
/// in f32) ORT even re-quantizes the codebook-expanded f32 weights to per-tensor int8 (its
/// weight quantization transformer: the optimized model holds i8 weights with 16 distinct
/// codes), a rounding lithe's graph does not contain, so the logits differ by a bounded amount
/// (measured on these 300 images: at most 0.64 for log, 1.16 for k-means); the bounds leave
/// headroom. Top-1 can then flip only where lithe's own
/// top-1 margin is under twice the logit difference, which is asserted image by image.
#[test]
fn every_scheme_runs_in_onnx_runtime() {
    let test = open_dataset("mnist", Split::Test, None).expect("MNIST test");
    let (x, labels) = test.batch(0, 300).expect("batch");
    let py = python();
    let dir = tmp_dir("schemes");
    for (scheme, fused_bound) in [
        (WeightScheme::Linear, 1e-4f32),
        (WeightScheme::Fixed, 1e-4),
        (WeightScheme::Log, 1.0),
        (WeightScheme::Kmeans, 2.5),
    ] {
        let config = QuantizeConfig {
            scheme,
            weight_bits: 4,
            calib_limit: Some(200),
            ..QuantizeConfig::default()
        };
        let (q, report) = quantize_mnist(&config);
        assert!(report.weight_bytes_after * 3 < report.weight_bytes_before);
        assert!(
            report.layers.iter().all(|l| l.weight_sqnr_db > 5.0),
            "{scheme}"
        );
        let ours = session(&q).run(&[("input", x.clone())]).expect("run");
        let pred = argmax_rows(&ours[0].1);
        let hits = pred
            .iter()
            .zip(&labels)
            .filter(|(a, b)| **a as i64 == **b)
            .count();
        println!("{scheme} w4/a8: lithe {hits}/300");
        assert!(hits >= 270, "{scheme}: {hits}/300");
        let Some(py) = &py else { continue };
        let path = dir.join(format!("mnist_{scheme}.onnx"));
        lithe::onnx::save_model(&q, &path, &Default::default()).expect("save");
        let feeds = vec![("input".to_string(), x.clone())];
        let unfused = session_with(&q, PlanOptions::unfused())
            .run(&[("input", x.clone())])
            .expect("run");
        for no_opt in [true, false] {
            let tag = format!("{scheme}-{}", if no_opt { "noopt" } else { "opt" });
            let mine = if no_opt { &unfused[0].1 } else { &ours[0].1 };
            let (a, margin, pred) = (mine.to_f32_vec(), margins(mine), argmax_rows(mine));
            let theirs = run_ort_with(py, &path, &feeds, &tag, no_opt);
            let b = theirs[0].1.to_f32_vec();
            let max_diff = a
                .iter()
                .zip(&b)
                .map(|(x, y)| (x - y).abs())
                .fold(0.0f32, f32::max);
            let flips: Vec<usize> = argmax_rows(&theirs[0].1)
                .iter()
                .zip(&pred)
                .enumerate()
                .filter(|(_, (a, b))| a != b)
                .map(|(i, _)| i)
                .collect();
            println!(
                "{scheme} vs ORT ({tag}): max |logit diff| {max_diff:.4}, top-1 differs on {:?} (lithe margins {:?})",
                flips,
                flips.iter().map(|&i| margin[i]).collect::<Vec<_>>()
            );
            if no_opt {
                assert!(max_diff <= 1e-4, "{tag}: max logit difference {max_diff}");
                // Equal logits can still pick different indices only on an exact tie.
                assert!(
                    flips.iter().all(|&i| margin[i] <= 2e-4),
                    "{tag}: top-1 differs on {flips:?}"
                );
            } else {
                assert!(
                    max_diff <= fused_bound,
                    "{tag}: max logit difference {max_diff} > {fused_bound}"
                );
                for &i in &flips {
                    assert!(
                        margin[i] <= 2.0 * max_diff,
                        "{tag}: image {i} flipped with margin {} > 2 x {max_diff}",
                        margin[i]
                    );
                }
            }
        }
    }
}

/// An in-memory batch source for edge cases.
fn memory(x: Vec<f32>, shape: Vec<usize>) -> TensorSource {
    TensorSource::new("memory", Tensor::from_f32(shape, x).expect("tensor"), None).expect("source")
}

fn with_weight(model: &Model, f: impl Fn(&mut [f32])) -> Model {
    let mut m = model.clone();
    let name = m
        .graph
        .nodes
        .iter()
        .find(|n| n.op_type == "Conv")
        .unwrap()
        .inputs[1]
        .clone();
    let w = m.graph.initializers.get_mut(&name).unwrap();
    f(w.as_f32_mut().unwrap());
    m
}

#[test]
fn bad_input_is_a_clear_error_or_safe() {
    let model = mnist_model();
    let zeros = memory(vec![0.0; 4 * 784], vec![4, 1, 28, 28]);
    let quiet = |m: &Model, src: &dyn BatchSource, c: &QuantizeConfig| {
        quantize(m, Some(src), c, &mut |_| {})
    };
    let config = QuantizeConfig::default();

    // All-zero calibration data: every activation is constant; scales stay positive.
    let (q, report) = quiet(&model, &zeros, &config).expect("all-zero calibration");
    for init in q
        .graph
        .initializers
        .iter()
        .filter(|(k, _)| k.ends_with("_scale"))
    {
        assert!(init.1.to_f32_vec().iter().all(|&s| s > 0.0), "{}", init.0);
    }
    assert!(report.layers.iter().all(|l| l.input_params.is_some()));

    // All-zero and constant weights.
    let zero_w = with_weight(&model, |w| w.fill(0.0));
    quiet(&zero_w, &zeros, &config).expect("all-zero weights");
    let const_w = with_weight(&model, |w| w.fill(0.25));
    let (_, r) = quiet(&const_w, &zeros, &config).expect("constant weights");
    assert!(r.layers[0].weight_sqnr_db > 40.0);

    // NaN in a weight: the error names the tensor.
    let nan_w = with_weight(&model, |w| w[3] = f32::NAN);
    let err = quiet(&nan_w, &zeros, &config).unwrap_err().to_string();
    assert!(
        err.contains("onnx::Conv") || err.contains("weight") || err.contains("conv"),
        "{err}"
    );
    assert!(err.contains("NaN") || err.contains("non-finite"), "{err}");

    // NaN / infinity in calibration data: the error names the input.
    let mut x = vec![0.5; 4 * 784];
    x[784 * 2 + 5] = f32::INFINITY;
    let bad = memory(x, vec![4, 1, 28, 28]);
    let err = quiet(&model, &bad, &config).unwrap_err().to_string();
    assert!(err.contains("input") && err.contains("sample 2"), "{err}");

    // Empty calibration set.
    let empty = memory(vec![], vec![0, 1, 28, 28]);
    let err = quiet(&model, &empty, &config).unwrap_err().to_string();
    assert!(err.contains("empty"), "{err}");

    // Bit widths out of range.
    for (wb, ab) in [(1, 8), (9, 8), (8, 0), (8, 16)] {
        let c = QuantizeConfig {
            weight_bits: wb,
            activation_bits: ab,
            ..QuantizeConfig::default()
        };
        let err = quiet(&model, &zeros, &c).unwrap_err().to_string();
        assert!(err.contains("bit width"), "{err}");
    }

    // Unknown --exclude names list the valid ones.
    let c = QuantizeConfig {
        exclude: vec!["no_such_node".into()],
        ..QuantizeConfig::default()
    };
    let err = quiet(&model, &zeros, &c).unwrap_err().to_string();
    assert!(
        err.contains("no_such_node") && err.contains("node_conv2d"),
        "{err}"
    );

    // Excluding a node leaves it in f32.
    let c = QuantizeConfig {
        exclude: vec!["node_linear".into()],
        activations: ActivationCalib::MinMax,
        ..QuantizeConfig::default()
    };
    let (_, r) = quiet(&model, &zeros, &c).expect("exclude");
    assert_eq!(r.layers.len(), 3);
    assert_eq!(r.skipped.len(), 1);

    // Options with no integer form are refused up front.
    let c = QuantizeConfig {
        scheme: WeightScheme::Kmeans,
        format: QuantFormat::QOperator,
        ..QuantizeConfig::default()
    };
    assert!(quiet(&model, &zeros, &c).is_err());
}

/// MNIST train with one sample turned to NaN: a calibration error in a later batch.
struct Poisoned {
    inner: Box<dyn BatchSource>,
    bad: usize,
}

impl BatchSource for Poisoned {
    fn name(&self) -> &str {
        "poisoned"
    }
    fn len(&self) -> usize {
        self.inner.len()
    }
    fn sample_shape(&self) -> Option<Vec<usize>> {
        self.inner.sample_shape()
    }
    fn preprocess(&self) -> Option<&Preprocess> {
        self.inner.preprocess()
    }
    fn batch(&self, start: usize, count: usize) -> lithe::Result<(Tensor, Vec<i64>)> {
        let (x, y) = self.inner.batch(start, count)?;
        if !(start..start + count).contains(&self.bad) {
            return Ok((x, y));
        }
        let mut v = x.as_f32()?.to_vec();
        v[(self.bad - start) * 784 + 5] = f32::NAN;
        Ok((Tensor::from_f32(x.shape().to_vec(), v)?, y))
    }
}

#[test]
fn calibration_is_the_same_on_any_number_of_threads() {
    // Batches run on several threads at once but reach each observer in order, so every
    // method gives the same model bit for bit (4 batches, the last one short).
    let dir = tmp_dir("threads");
    let calib = open_dataset("mnist", Split::Train, None).expect("MNIST train");
    for activations in [
        ActivationCalib::MinMax,
        ActivationCalib::Entropy,
        ActivationCalib::Percentile(99.99),
    ] {
        let mut files: Vec<Vec<u8>> = Vec::new();
        for threads in [1, 2, 3] {
            let config = QuantizeConfig {
                activations,
                threads,
                calib_limit: Some(350),
                measure_activation_sqnr: threads == 2,
                ..QuantizeConfig::default()
            };
            let (mut q, report) =
                quantize(&mnist_model(), Some(calib.as_ref()), &config, &mut |_| {})
                    .expect("quantize");
            assert_eq!(report.calibration_samples, 350);
            // The recorded settings name the thread count; everything else must match.
            q.set_metadata(lithe::passes::quantize::METADATA_KEY, String::new());
            let path = dir.join(format!("t{threads}.onnx"));
            lithe::onnx::save_model(&q, &path, &Default::default()).expect("save");
            files.push(std::fs::read(&path).expect("read"));
        }
        assert!(
            files[1] == files[0] && files[2] == files[0],
            "{activations:?}"
        );
    }
    // An error in a later batch stops every thread and is reported.
    let poisoned = Poisoned {
        inner: open_dataset("mnist", Split::Train, None).expect("MNIST train"),
        bad: 250,
    };
    let config = QuantizeConfig {
        threads: 2,
        calib_limit: Some(600),
        measure_activation_sqnr: false,
        ..QuantizeConfig::default()
    };
    let err = quantize(&mnist_model(), Some(&poisoned), &config, &mut |_| {})
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("sample 250") && err.contains("non-finite"),
        "{err}"
    );
}

/// `--sensitivity` ranks every quantized layer, most sensitive first, in the table and in the
/// JSON report; with activations left in f32 it still runs (weights only).
#[test]
fn sensitivity_ranks_every_layer() {
    let dir = tmp_dir("sensitivity");
    let out = dir.join("q.onnx");
    let report = dir.join("report.json");
    let o = common::lithe(&[
        "quantize",
        "assets/models/mnist_cnn.onnx",
        "-o",
        out.to_str().expect("path"),
        "-q",
        "--no-activation-sqnr",
        "--calib-limit",
        "200",
        "--activations",
        "mse",
        "--sensitivity",
        "64",
        "--report",
        report.to_str().expect("path"),
    ]);
    let text = common::stdout(&o);
    assert!(o.status.success(), "{}", common::stderr(&o));
    assert!(
        text.contains("on 64 samples (most sensitive first)"),
        "{text}"
    );
    assert!(
        text.contains("to keep the most sensitive in f32: --exclude"),
        "{text}"
    );
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&report).expect("report")).expect("json");
    let rows = json["sensitivity"].as_array().expect("sensitivity rows");
    let mut nodes: Vec<&str> = rows
        .iter()
        .map(|r| r["node"].as_str().expect("node"))
        .collect();
    nodes.sort_unstable();
    assert_eq!(
        nodes,
        [
            "node_conv2d",
            "node_conv2d_1",
            "node_linear",
            "node_linear_1"
        ]
    );
    let layer: Vec<f64> = rows
        .iter()
        .map(|r| r["layer_sqnr_db"].as_f64().expect("layer SQNR"))
        .collect();
    assert!(
        layer.windows(2).all(|w| w[0] <= w[1]),
        "not ranked: {layer:?}"
    );
    for r in rows {
        // 8-bit per-channel weights of one layer: the logits stay within ~1 % (40 dB).
        assert!(r["weights_sqnr_db"].as_f64().expect("w") > 40.0, "{r}");
        assert!(r["layer_sqnr_db"].as_f64().expect("l") > 30.0, "{r}");
        let a = r["layer_agreement"].as_f64().expect("agreement");
        assert!((0.98..=1.0).contains(&a), "{r}");
    }

    let o = common::lithe(&[
        "quantize",
        "assets/models/mnist_cnn.onnx",
        "-o",
        out.to_str().expect("path"),
        "-q",
        "--activations",
        "none",
        "--sensitivity",
        "32",
    ]);
    assert!(o.status.success(), "{}", common::stderr(&o));
    assert!(common::stdout(&o).contains("on 32 samples"));
}
