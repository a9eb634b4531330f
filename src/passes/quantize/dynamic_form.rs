//! The dynamic form (`--activations dynamic`), as ONNX Runtime's `quantize_dynamic` writes
//! it: each MatMul or Gemm quantizes its input at run time from the batch's own range and
//! multiplies integers,
//! `DynamicQuantizeLinear(x) -> MatMulInteger(x codes, W codes) -> Cast -> Mul(x scale * W
//! scales) [-> Add(bias)]`. No calibration, and no activation range that outliers can stretch
//! (a transformer's GELU output). Other targets (Conv) get their weights quantized only.

use std::collections::{BTreeMap, HashMap, HashSet};

use super::edit::{add_init, node, zero_point_tensor};
use super::plan::Plan;
use super::qdq::decode_weight;
use super::weights::{Encoded, EncodedWeight};
use crate::error::{Error, Result};
use crate::ir::{Attr, DType, Graph, Model, Tensor, TensorData};

pub fn build(
    model: &Model,
    plan: &Plan,
    weights: &BTreeMap<String, EncodedWeight>,
) -> Result<Model> {
    let mut out = model.clone();
    let g = &mut out.graph;
    let mut added = Vec::new();
    let mut replaced = HashSet::new();
    // One DynamicQuantizeLinear per input, however many products read it (a transformer's
    // query, key and value projections).
    let mut quantized_inputs = HashMap::new();
    for t in &plan.targets {
        let Some(enc) = weights.get(&t.name) else {
            continue;
        };
        let product = matches!(t.op.as_str(), "MatMul" | "Gemm");
        match &enc.enc {
            Encoded::Linear {
                codes,
                scales,
                zero_points,
                ..
            } if product && zero_points.iter().all(|&z| z == 0) => {
                // A Gemm with transB stores its weight [N, K]: output channels on axis 0.
                let n_major = t.weight_axis == 0;
                added.extend(integer_product(
                    g,
                    t,
                    (codes, scales, n_major),
                    &mut quantized_inputs,
                )?);
                replaced.insert(t.node);
            }
            _ => {
                if g.initializers.contains_key(&t.weight) {
                    added.extend(decode_weight(g, &t.weight, enc)?);
                }
            }
        }
    }
    g.nodes = std::mem::take(&mut g.nodes)
        .into_iter()
        .enumerate()
        .filter(|(i, _)| !replaced.contains(i))
        .map(|(_, n)| n)
        .collect();
    g.nodes.extend(added);
    g.topo_sort()?;
    g.prune_unused_initializers();
    Ok(out)
}

/// The nodes that replace target `t` (a MatMul, or a Gemm with `[N, K]` weights when
/// `n_major`), writing its output.
/// The `(codes, scale, zero point)` names of each input already quantized.
type QuantizedInputs = HashMap<String, [String; 3]>;

fn integer_product(
    g: &mut Graph,
    t: &super::plan::Target,
    (codes, scales, n_major): (&Tensor, &[f32], bool),
    quantized_inputs: &mut QuantizedInputs,
) -> Result<Vec<crate::ir::Node>> {
    let shape = codes.shape().to_vec();
    let &[rows, cols] = shape.as_slice() else {
        return Err(Error::Tensor {
            name: t.weight.clone(),
            msg: format!("a {shape:?} weight cannot feed MatMulInteger"),
        });
    };
    let TensorData::I8(v) = codes.data() else {
        return Err(Error::Tensor {
            name: t.weight.clone(),
            msg: "weight codes are not int8".into(),
        });
    };
    // MatMulInteger takes B as [K, N].
    let (k, n, kn) = if n_major {
        let mut kn = vec![0i8; v.len()];
        for (j, row) in v.chunks_exact(cols).enumerate() {
            for (kk, &c) in row.iter().enumerate() {
                kn[kk * rows + j] = c;
            }
        }
        (cols, rows, kn)
    } else {
        (rows, cols, v.clone())
    };
    let w = add_init(
        g,
        &format!("{}_quantized", t.weight),
        Tensor::new(vec![k, n], TensorData::I8(kn))?,
    );
    let per_column = scales.len() == n;
    let w_scale = add_init(
        g,
        &format!("{}_scale", t.weight),
        if per_column {
            Tensor::from_f32(vec![n], scales.to_vec())?
        } else {
            Tensor::scalar_f32(scales[0])
        },
    );
    let zeros = vec![0; if per_column { n } else { 1 }];
    let w_zp = add_init(
        g,
        &format!("{}_zero_point", t.weight),
        zero_point_tensor(DType::I8, &zeros, !per_column)?,
    );
    let base = &t.output;
    let mut nodes = Vec::new();
    let [xq, xs, xz] = match quantized_inputs.get(&t.input) {
        Some(names) => names.clone(),
        None => {
            let names = ["quantized", "scale", "zero_point"]
                .map(|what| g.fresh_name(&format!("{}_{what}", t.input)));
            nodes.push(node(
                g,
                &format!("{}_DynamicQuantizeLinear", t.input),
                "DynamicQuantizeLinear",
                vec![t.input.clone()],
                names.to_vec(),
            ));
            quantized_inputs.insert(t.input.clone(), names.clone());
            names
        }
    };
    let acc = g.fresh_name(&format!("{base}_i32"));
    let mm = node(
        g,
        &format!("{base}_MatMulInteger"),
        "MatMulInteger",
        vec![xq, w, xz, w_zp],
        vec![acc.clone()],
    );
    let accf = g.fresh_name(&format!("{base}_f32"));
    let cast = node(
        g,
        &format!("{base}_Cast"),
        "Cast",
        vec![acc],
        vec![accf.clone()],
    )
    .with_attr("to", Attr::Int(i64::from(DType::F32.onnx_code())));
    let scale = g.fresh_name(&format!("{base}_product_scale"));
    let combine = node(
        g,
        &format!("{base}_Mul_scales"),
        "Mul",
        vec![xs, w_scale],
        vec![scale.clone()],
    );
    let product = match &t.bias {
        Some(_) => g.fresh_name(&format!("{base}_unbiased")),
        None => t.output.clone(),
    };
    let rescale = node(
        g,
        &format!("{base}_Mul"),
        "Mul",
        vec![accf, scale],
        vec![product.clone()],
    );
    nodes.extend([mm, cast, combine, rescale]);
    if let Some(b) = &t.bias {
        nodes.push(node(
            g,
            &format!("{base}_Add_bias"),
            "Add",
            vec![product, b.clone()],
            vec![t.output.clone()],
        ));
    }
    Ok(nodes)
}

#[cfg(test)]
mod tests {
    use crate::ir::{Dim, Graph, Model, Node, Tensor, TypeInfo, ValueInfo};
    use crate::passes::quantize::{quantize, ActivationCalib, QuantizeConfig};
    use crate::runtime::{Session, SessionOptions};

    /// A Gemm with `[N, K]` weights and a bias, and a MatMul, reading one input.
    fn two_products() -> Model {
        let (k, n) = (16, 8);
        let ramp = |len: usize, f: f32| (0..len).map(move |i| ((i * 7 % 23) as f32 - 11.0) * f);
        let mut graph = Graph {
            inputs: vec![ValueInfo::new(
                "x",
                TypeInfo::new(crate::ir::DType::F32, vec![Dim::Known(3), Dim::Known(k)]),
            )],
            outputs: ["g", "m"]
                .iter()
                .map(|o| ValueInfo::new(*o, TypeInfo::unknown_shape(crate::ir::DType::F32)))
                .collect(),
            nodes: vec![
                Node::new(
                    "gemm",
                    "Gemm",
                    vec!["x".into(), "wg".into(), "b".into()],
                    vec!["g".into()],
                )
                .with_attr("transB", crate::ir::Attr::Int(1)),
                Node::new(
                    "matmul",
                    "MatMul",
                    vec!["x".into(), "wm".into()],
                    vec!["m".into()],
                ),
            ],
            ..Graph::default()
        };
        let init = |shape: Vec<usize>, f: f32| {
            let len = shape.iter().product();
            Tensor::from_f32(shape, ramp(len, f).collect()).unwrap()
        };
        graph
            .initializers
            .insert("wg".into(), init(vec![n, k], 0.01));
        graph
            .initializers
            .insert("wm".into(), init(vec![k, n], 0.02));
        graph.initializers.insert("b".into(), init(vec![n], 0.1));
        Model::new(graph, 13)
    }

    fn run(m: &Model) -> Vec<Vec<f32>> {
        let s = Session::new(m, &SessionOptions::default()).unwrap();
        let x = Tensor::from_f32(
            vec![3, 16],
            (0..48).map(|i| (i as f32 * 0.37).sin()).collect(),
        )
        .unwrap();
        s.run(&[("x", x)])
            .unwrap()
            .into_iter()
            .map(|(_, t)| t.to_f32_vec())
            .collect()
    }

    #[test]
    fn products_multiply_integers_and_match_f32() {
        let m = two_products();
        let config = QuantizeConfig {
            activations: ActivationCalib::Dynamic,
            ..QuantizeConfig::default()
        };
        let (q, _) = quantize(&m, None, &config, &mut |_| {}).unwrap();
        let ops: Vec<&str> = q.graph.nodes.iter().map(|n| n.op_type.as_str()).collect();
        // One DynamicQuantizeLinear for the shared input, an integer product per layer.
        assert_eq!(
            ops.iter()
                .filter(|o| **o == "DynamicQuantizeLinear")
                .count(),
            1
        );
        assert_eq!(ops.iter().filter(|o| **o == "MatMulInteger").count(), 2);
        assert!(
            !ops.contains(&"Gemm") && !ops.contains(&"MatMul"),
            "{ops:?}"
        );
        let (want, got) = (run(&m), run(&q));
        for (w, g) in want.iter().zip(&got) {
            let scale = w.iter().fold(0f32, |a, v| a.max(v.abs()));
            for (a, b) in w.iter().zip(g) {
                assert!((a - b).abs() <= 0.02 * scale, "{a} vs {b}");
            }
        }
        // The Gemm's bias survives.
        assert!(q.graph.nodes.iter().any(|n| n.op_type == "Add"));
    }
}
