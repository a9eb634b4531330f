//! PP-LCNet (depthwise convolutions, HardSwish, squeeze-excitation) quantized to int8 in
//! QOperator form: top-1 agreement with f32 on the shared photos and their 90/180/270 degree
//! rotations, and bit-exact integer execution against ONNX Runtime on the same file.
//! Needs ../shared (or LITHE_SHARED); ORT needs LITHE_PYTHON. Skips with a note otherwise.

mod common;

use common::{argmax_rows, python, run_ort, shared};
use std::path::PathBuf;

use lithe::data::dataset::TensorSource;
use lithe::data::image::{read_image, Image};
use lithe::data::Preprocess;
use lithe::ir::{DType, Model, TypeInfo, ValueInfo};
use lithe::passes::quantize::{quantize, ActivationCalib, QuantFormat, QuantizeConfig};
use lithe::runtime::{Session, SessionOptions};

/// `img` turned clockwise by `quarter` right angles.
fn rotate(img: &Image, quarter: usize) -> Image {
    let (w, h, c) = (img.width, img.height, img.channels);
    let (nw, nh) = if quarter % 2 == 1 { (h, w) } else { (w, h) };
    let mut out = vec![0u8; img.data.len()];
    for y in 0..h {
        for x in 0..w {
            let (nx, ny) = match quarter % 4 {
                0 => (x, y),
                1 => (h - 1 - y, x),
                2 => (w - 1 - x, h - 1 - y),
                _ => (y, w - 1 - x),
            };
            let s = (y * w + x) * c;
            let d = (ny * nw + nx) * c;
            out[d..d + c].copy_from_slice(&img.data[s..s + c]);
        }
    }
    Image::new(nw, nh, c, out).expect("rotated image")
}

/// The `side` x `side` window of `img` at (`x0`, `y0`).
fn window(img: &Image, x0: usize, y0: usize, side: usize) -> Image {
    let c = img.channels;
    let mut out = Vec::with_capacity(side * side * c);
    for y in y0..y0 + side {
        let row = (y * img.width + x0) * c;
        out.extend_from_slice(&img.data[row..row + side * c]);
    }
    Image::new(side, side, c, out).expect("window")
}

/// Evenly spaced offsets of a `side` window along `len`, at most half a side apart, both ends
/// included.
fn offsets(len: usize, side: usize) -> Vec<usize> {
    let span = len - side;
    let n = span.div_ceil((side / 2).max(1)) + 1;
    if n == 1 {
        return vec![0];
    }
    (0..n).map(|i| i * span / (n - 1)).collect()
}

/// Square windows of a page on a fixed grid: sides h and 3h/4 of the shorter side h. The same
/// grid as `scripts/pplcnet_agreement.py`.
fn page_windows(img: &Image) -> Vec<Image> {
    let short = img.width.min(img.height);
    let mut out = Vec::new();
    for side in [short, short * 3 / 4] {
        for y in offsets(img.height, side) {
            for x in offsets(img.width, side) {
                out.push(window(img, x, y, side));
            }
        }
    }
    out
}

/// Top-1 class of each row of 4 orientation probabilities.
fn top1(p: &[f32]) -> Vec<usize> {
    p.chunks(4)
        .map(|r| (0..r.len()).fold(0, |b, i| if r[i] > r[b] { i } else { b }))
        .collect()
}

fn session(model: &Model) -> Session {
    let (simple, _) = lithe::passes::simplify(model).expect("simplify");
    Session::new(&simple, &SessionOptions::default()).expect("session")
}

#[test]
fn pplcnet_int8_agrees_with_f32_on_rotated_photos() {
    let Some(shared) = shared() else {
        eprintln!("skipped: ../shared not found");
        return;
    };
    let model =
        lithe::onnx::load_model(&shared.join("models/pplcnet_orientation.onnx")).expect("model");
    let pre = Preprocess::preset("imagenet").expect("preset");
    let mut paths: Vec<PathBuf> = std::fs::read_dir(shared.join("images/photos"))
        .expect("photos")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    paths.sort();
    let mut images = Vec::new();
    for p in &paths {
        let img = read_image(p).expect("decode").to_rgb();
        for q in 0..4 {
            images.push(rotate(&img, q));
        }
    }
    let x = pre.apply_batch(&images).expect("preprocess");
    let n = images.len();
    let source = TensorSource::new("photos and rotations", x.clone(), None).expect("source");
    // MSE ranges: on this model they beat KL (26/36) and min/max (30/36) in agreement. The
    // first two blocks (stem conv, depthwise + pointwise, depthwise) stay f32: with all layers
    // int8 agreement is 34/36 but one clear decision flips; excluding each layer in turn showed
    // the early, high-resolution layers (whose per-tensor activation grids cover channels of
    // very different ranges after BatchNorm folding) are the sensitive ones.
    let config = QuantizeConfig {
        format: QuantFormat::QOperator,
        activations: ActivationCalib::Mse,
        exclude: ["Conv.0", "Conv.1", "Conv.2", "Conv.3"]
            .map(String::from)
            .to_vec(),
        batch_size: 12,
        ..QuantizeConfig::default()
    };
    let (q, report) = quantize(&model, Some(&source), &config, &mut |_| {}).expect("quantize");
    print!("{}", report.table());
    let f32_out = session(&model).run(&[("x", x.clone())]).expect("f32");
    let f32_pred = argmax_rows(&f32_out[0].1);
    let ours = session(&q).run(&[("x", x.clone())]).expect("int8");
    let int8_pred = argmax_rows(&ours[0].1);
    let agree = f32_pred
        .iter()
        .zip(&int8_pred)
        .filter(|(a, b)| a == b)
        .count();
    println!("PP-LCNet int8 vs f32 top-1 agreement: {agree}/{n}");
    // These photos are mostly not documents: the f32 model is often near a tie between two
    // orientations (one sample's top two differ by 5e-5, and 8-bit weights alone flip it).
    // Samples with a clear f32 decision (top-1 ahead by 0.05) must all keep it.
    let (pf, pq) = (f32_out[0].1.to_f32_vec(), ours[0].1.to_f32_vec());
    let mut decisive = 0;
    for i in 0..n {
        let mut row = pf[i * 4..i * 4 + 4].to_vec();
        row.sort_by(|a, b| b.total_cmp(a));
        let clear = row[0] - row[1] >= 0.05;
        decisive += usize::from(clear);
        if f32_pred[i] != int8_pred[i] {
            println!(
                "sample {i}: f32 {:?} int8 {:?}",
                &pf[i * 4..i * 4 + 4],
                &pq[i * 4..i * 4 + 4]
            );
            assert!(
                !clear,
                "sample {i} had a clear f32 decision and int8 changed it"
            );
        }
    }
    println!("{decisive}/{n} samples have a clear f32 decision; int8 keeps all of them");
    // Rotations are what the model classifies: check the f32 model itself gets most right.
    let right = f32_pred
        .iter()
        .enumerate()
        .filter(|(i, &p)| p == i % 4)
        .count();
    println!("f32 predicts the rotation of {right}/{n}");

    assert!(agree * 100 >= n * 90, "agreement {agree}/{n}");

    // Held out from calibration: windows of the two shared page images, each turned four ways
    // (what a page-orientation model is for). The model is often near a tie between a text
    // window and the same window turned by 180 degrees, so agreement here measures how far
    // int8 moves the outputs more than whether decisions are clear.
    let mut pages = Vec::new();
    for name in ["page.png", "text.png"] {
        let img = read_image(shared.join("images/photos").join(name))
            .expect("page")
            .to_rgb();
        for w in page_windows(&img) {
            for q in 0..4 {
                pages.push(rotate(&w, q));
            }
        }
    }
    let xp = pre.apply_batch(&pages).expect("preprocess pages");
    let pf = session(&model).run(&[("x", xp.clone())]).expect("f32")[0]
        .1
        .to_f32_vec();
    let pq = session(&q).run(&[("x", xp)]).expect("int8")[0]
        .1
        .to_f32_vec();
    let (fp, qp) = (top1(&pf), top1(&pq));
    let page_agree = fp.iter().zip(&qp).filter(|(a, b)| a == b).count();
    let mean_diff = pf.iter().zip(&pq).map(|(a, b)| (a - b).abs()).sum::<f32>() / pf.len() as f32;
    println!(
        "page windows (held out): agreement {page_agree}/{}, mean |softmax diff| {mean_diff:.4}",
        pages.len()
    );
    // Floors at the measured quality (114/124 = 91.9 %, 0.017 in the session that added them):
    // they catch a regression, not the 99 % goal, which no 8-bit scheme tried reaches on these
    // near-ties (scripts/pplcnet_agreement.py: ONNX Runtime's own quantizer keeps at most
    // 107/124 page windows, lithe 115/124; quantizing a single layer's weights alone already
    // flips up to 5 of the 160 photos and windows).
    assert!(
        page_agree * 100 >= pages.len() * 90,
        "page agreement {page_agree}/{}",
        pages.len()
    );
    assert!(mean_diff <= 0.025, "mean |softmax diff| {mean_diff}");
    let Some(py) = python() else {
        return;
    };
    let dir = std::env::var("LITHE_TEST_KEEP")
        .map(PathBuf::from)
        .unwrap_or_else(|_| std::env::temp_dir().join(format!("lithe-qpp-{}", std::process::id())));
    std::fs::create_dir_all(&dir).expect("tmp");
    // Bit-exactness needs an all-integer model (f32 layers before a QuantizeLinear can round
    // differently between runtimes): every layer int8 here. The last integer tensor becomes an
    // output too: it must match bit for bit; the f32 tail (bias Add, Softmax) may differ by
    // an ulp between runtimes.
    let all_int8 = QuantizeConfig {
        exclude: Vec::new(),
        measure_activation_sqnr: false,
        ..config
    };
    let (mut q, _) = quantize(&model, Some(&source), &all_int8, &mut |_| {}).expect("quantize");
    let all_pred = argmax_rows(&session(&q).run(&[("x", x.clone())]).expect("int8")[0].1);
    let agree_all = f32_pred
        .iter()
        .zip(&all_pred)
        .filter(|(a, b)| a == b)
        .count();
    println!("all layers int8: agreement {agree_all}/{n}");
    let last_int = q
        .graph
        .nodes
        .iter()
        .rev()
        .find(|n| n.op_type.starts_with("QLinear"))
        .map(|n| n.outputs[0].clone())
        .expect("a QLinear node");
    q.graph.outputs.push(ValueInfo::new(
        last_int.clone(),
        TypeInfo::unknown_shape(DType::U8),
    ));
    let ours = session(&q).run(&[("x", x.clone())]).expect("int8");
    let path = dir.join("pplcnet_qop.onnx");
    lithe::onnx::save_model(&q, &path, &Default::default()).expect("save");
    let theirs = run_ort(&py, &path, &[("x".to_string(), x)], "qop");
    let (a, b) = (ours[0].1.to_f32_vec(), theirs[0].1.to_f32_vec());
    let max_diff = a
        .iter()
        .zip(&b)
        .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    println!("lithe vs ORT on the QOperator model: max |softmax diff| {max_diff:e}");
    assert!(max_diff < 1e-5);
    let ours_int = &ours[1].1;
    let theirs_int = &theirs
        .iter()
        .find(|(n, _)| *n == last_int)
        .expect("int output")
        .1;
    assert_eq!(ours_int.dtype(), DType::U8);
    let differ = ours_int
        .to_i64_vec()
        .unwrap()
        .iter()
        .zip(theirs_int.to_i64_vec().unwrap())
        .filter(|(a, b)| **a != *b)
        .count();
    println!(
        "last integer tensor '{last_int}': {differ}/{} codes differ",
        ours_int.numel()
    );
    let ort_pred = argmax_rows(&theirs[0].1);
    assert_eq!(ort_pred, all_pred);
    assert_eq!(differ, 0, "integer execution differs from ONNX Runtime");
}
