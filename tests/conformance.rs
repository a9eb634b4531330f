//! ONNX's own operator conformance tests (`onnx/backend/test/data/node`): each case is a
//! one-node model with inputs and expected outputs as TensorProto files. The cases listed in
//! `tests/conformance_manifest.txt` must all pass; `conformance_survey` (ignored by default)
//! runs every case and prints which pass, to grow the manifest.

use std::path::{Path, PathBuf};

use lithe::ir::{Tensor, TensorData};
use lithe::runtime::{Session, SessionOptions};

fn node_tests_dir() -> Option<PathBuf> {
    let candidates = [
        std::env::var("LITHE_ONNX_NODE_TESTS")
            .ok()
            .map(PathBuf::from),
        Some(PathBuf::from("/usr/share/libonnx-testdata/data/node")),
    ];
    candidates.into_iter().flatten().find(|p| p.is_dir())
}

fn manifest() -> Vec<String> {
    let text = include_str!("conformance_manifest.txt");
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(String::from)
        .collect()
}

fn read_pbs(dir: &Path, prefix: &str) -> Result<Vec<(String, Tensor)>, String> {
    let mut out = Vec::new();
    for i in 0.. {
        let p = dir.join(format!("{prefix}_{i}.pb"));
        if !p.exists() {
            break;
        }
        out.push(lithe::onnx::load_tensor_pb(&p).map_err(|e| e.to_string())?);
    }
    Ok(out)
}

fn close(actual: &Tensor, expected: &Tensor) -> Result<(), String> {
    if actual.shape() != expected.shape() {
        return Err(format!(
            "shape {:?}, expected {:?}",
            actual.shape(),
            expected.shape()
        ));
    }
    if actual.dtype() != expected.dtype() {
        return Err(format!(
            "type {}, expected {}",
            actual.dtype(),
            expected.dtype()
        ));
    }
    match (actual.data(), expected.data()) {
        (TensorData::F32(_), _) | (TensorData::F16(_), _) | (TensorData::F64(_), _) => {
            let (a, e) = (actual.to_f32_vec(), expected.to_f32_vec());
            for (i, (x, y)) in a.iter().zip(&e).enumerate() {
                let both_nan = x.is_nan() && y.is_nan();
                let same_inf = x.is_infinite() && x == y;
                if !(both_nan || same_inf || (x - y).abs() <= 1e-5 + 1e-3 * y.abs()) {
                    return Err(format!("element {i}: {x}, expected {y}"));
                }
            }
            Ok(())
        }
        (a, e) if a == e => Ok(()),
        _ => Err("integer or boolean values differ".into()),
    }
}

fn run_case(dir: &Path) -> Result<(), String> {
    let model = lithe::onnx::load_model(&dir.join("model.onnx")).map_err(|e| e.to_string())?;
    let session = Session::new(
        &model,
        &SessionOptions {
            threads: 1,
            ..SessionOptions::default()
        },
    )
    .map_err(|e| e.to_string())?;
    let data = dir.join("test_data_set_0");
    let inputs = read_pbs(&data, "input")?;
    let expected = read_pbs(&data, "output")?;
    // Test inputs may be unnamed in the .pb; they follow the graph's input order.
    let names: Vec<String> = session
        .input_names()
        .iter()
        .map(|s| s.to_string())
        .collect();
    let feeds: Vec<(&str, Tensor)> = names
        .iter()
        .map(String::as_str)
        .zip(inputs.into_iter().map(|(_, t)| t))
        .collect();
    let outputs = session.run(&feeds).map_err(|e| e.to_string())?;
    if outputs.len() != expected.len() {
        return Err(format!(
            "{} outputs, expected {}",
            outputs.len(),
            expected.len()
        ));
    }
    for ((name, actual), (_, want)) in outputs.iter().zip(&expected) {
        close(actual, want).map_err(|e| format!("output '{name}': {e}"))?;
    }
    Ok(())
}

fn run_guarded(dir: &Path) -> Result<(), String> {
    std::panic::catch_unwind(|| run_case(dir)).unwrap_or_else(|_| Err("panicked".into()))
}

#[test]
fn onnx_node_conformance() {
    let Some(root) = node_tests_dir() else {
        eprintln!("skipped: ONNX node tests not found (set LITHE_ONNX_NODE_TESTS; .ci/run does)");
        return;
    };
    let cases = manifest();
    assert!(
        cases.len() >= 150,
        "the manifest lists only {} cases",
        cases.len()
    );
    let mut failures = Vec::new();
    for case in &cases {
        let dir = root.join(case);
        if !dir.is_dir() {
            failures.push(format!("{case}: missing from {}", root.display()));
            continue;
        }
        if let Err(e) = run_guarded(&dir) {
            failures.push(format!("{case}: {e}"));
        }
    }
    println!("ONNX node tests listed in the manifest: {}", cases.len());
    println!(
        "conformance: {} passed, {} failed",
        cases.len() - failures.len(),
        failures.len()
    );
    assert!(
        failures.is_empty(),
        "failing cases:\n{}",
        failures.join("\n")
    );
}

/// Runs every case in the test data and prints `PASS name` / `FAIL name: why`.
#[test]
#[ignore]
fn conformance_survey() {
    let Some(root) = node_tests_dir() else {
        eprintln!("skipped: ONNX node tests not found");
        return;
    };
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(&root)
        .expect("node test folder is readable")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join("model.onnx").exists())
        .collect();
    dirs.sort();
    let (mut pass, mut fail) = (0, 0);
    for dir in dirs {
        let name = dir
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_default();
        match run_guarded(&dir) {
            Ok(()) => {
                pass += 1;
                println!("PASS {name}");
            }
            Err(e) => {
                fail += 1;
                println!("FAIL {name}: {}", e.replace('\n', " "));
            }
        }
    }
    println!("survey: {pass} passed, {fail} failed");
}
