//! Post-training quantization of a model: weights encoded by one of four schemes (linear,
//! dynamic fixed point, power-of-two, k-means), activations calibrated on data, written as
//! a QDQ model (QuantizeLinear/DequantizeLinear pairs, what ONNX Runtime runs and fuses) or a
//! QOperator model (QLinearConv/QLinearMatMul between u8 tensors, integer-only execution).
//!
//! Steps: simplify (BatchNorm folded into Conv), choose the quantized nodes (Conv, Gemm and
//! MatMul with constant weights, minus `exclude`), calibrate the activation tensors around them
//! in one streaming pass, encode the weights, rebuild the graph, and measure: weight SQNR,
//! activation SQNR (a second pass over the calibration data) and storage.
//!
//! Schemes ONNX has no operator for are still plain ONNX: dynamic fixed point is QDQ with
//! power-of-two scales and zero point 0; power-of-two and k-means weights are u8 codes that a
//! `Cast` + `Gather` over their codebook decodes (constant-folded by runtimes).

mod calibrate;
mod config;
mod dynamic_form;
mod edit;
mod embedding;
mod plan;
mod qat;
mod qdq;
mod qop;
mod report;
mod sensitivity;
mod weights;

use std::collections::BTreeMap;
use std::time::Instant;

pub use calibrate::CalibProgress;
pub use config::{ActivationCalib, QuantFormat, QuantizeConfig, WeightScheme};
pub use edit::ActParams;
pub use plan::{all_targets, Target};
pub use qat::{quantize_aware_training, QatConfig, QatEvent, QatReport};
pub use report::{LayerReport, QuantizeReport, SkippedNode};
pub use sensitivity::{sensitivity, sensitivity_table, LayerSensitivity};
pub use weights::{encode as encode_weight, Encoded, EncodedWeight};

use crate::data::dataset::BatchSource;
use crate::error::{Error, Result};
use crate::ir::{DType, Model};
use crate::quant::calibrate::Range;
use crate::quant::fixed_point::FixedFormat;
use crate::quant::{QParams, QScheme};

/// Metadata key under which the quantization settings are recorded in the output model.
pub const METADATA_KEY: &str = "lithe.quantize";

/// Activation parameters for a calibrated range: u8 affine for the linear family; for
/// dynamic fixed point a power-of-two scale with zero point 0 (u8 for one-sided ranges, else
/// i8).
pub fn activation_params(
    range: Range,
    scheme: WeightScheme,
    bits: u32,
    name: &str,
) -> Result<ActParams> {
    if scheme != WeightScheme::Fixed {
        let s = QScheme::new(bits, false, false)?;
        return Ok(ActParams {
            params: s.params_from_range(range.min, range.max, name)?,
            dtype: DType::U8,
        });
    }
    if range.min < 0.0 {
        let f = FixedFormat::for_range(bits, range.min, range.max, name)?;
        return Ok(ActParams {
            params: f.to_qparams(),
            dtype: DType::I8,
        });
    }
    // Unsigned fixed point: the most fractional bits with max * 2^f <= 2^b - 1 after rounding.
    let qmax = (1i32 << bits) - 1;
    let max = f64::from(range.max);
    let mut f: i32 = if max > 0.0 {
        (f64::from(qmax) / max).log2().floor() as i32
    } else {
        bits as i32
    };
    f = f.clamp(-126, 126);
    while f < 126 && (max * 2f64.powi(f + 1)).round_ties_even() <= f64::from(qmax) {
        f += 1;
    }
    while f > -126 && (max * 2f64.powi(f)).round_ties_even() > f64::from(qmax) {
        f -= 1;
    }
    Ok(ActParams {
        params: QParams::new(2f64.powi(-f) as f32, 0, 0, qmax, name)?,
        dtype: DType::U8,
    })
}

fn describe(p: &ActParams) -> String {
    format!(
        "{}[{}..{}] scale {:.4e} zp {}",
        p.dtype, p.params.qmin, p.params.qmax, p.params.scale, p.params.zero_point
    )
}

/// Quantizes `model`. `calib` supplies calibration samples (required unless activations stay
/// f32); `progress` is told how far calibration and measurement are.
pub fn quantize(
    model: &Model,
    calib: Option<&dyn BatchSource>,
    config: &QuantizeConfig,
    progress: &mut dyn FnMut(CalibProgress),
) -> Result<(Model, QuantizeReport)> {
    quantize_impl(model, calib, config, None, progress)
}

/// As [`quantize`], with the activation ranges given (by tensor name of the simplified graph,
/// e.g. learned in quantization-aware training) instead of calibrated. `calib`, when given,
/// only serves the activation SQNR measurement.
pub fn quantize_with_ranges(
    model: &Model,
    calib: Option<&dyn BatchSource>,
    config: &QuantizeConfig,
    ranges: &BTreeMap<String, Range>,
    progress: &mut dyn FnMut(CalibProgress),
) -> Result<(Model, QuantizeReport)> {
    quantize_impl(model, calib, config, Some(ranges), progress)
}

fn quantize_impl(
    model: &Model,
    calib: Option<&dyn BatchSource>,
    config: &QuantizeConfig,
    fixed_ranges: Option<&BTreeMap<String, Range>>,
    progress: &mut dyn FnMut(CalibProgress),
) -> Result<(Model, QuantizeReport)> {
    let started = Instant::now();
    config.validate()?;
    let (simple, _) = crate::passes::simplify(model)?;
    let graph = &simple.graph;
    let every = plan::all_targets(graph)?;
    plan::check_excludes(&config.exclude, graph, &model.graph, &every)?;
    let plan = plan::make_plan(graph, &config.exclude)?;
    let opset = simple.opset();
    if opset < 10 {
        return Err(Error::Data(format!(
            "quantized models need opset 10 or later; this model uses opset {opset}"
        )));
    }
    let per_axis =
        config.per_channel && matches!(config.scheme, WeightScheme::Linear | WeightScheme::Fixed);
    if per_axis && opset < 13 {
        return Err(Error::Data(format!(
            "per-channel weights need opset 13 (DequantizeLinear's axis); this model uses opset {opset}: use --per-tensor"
        )));
    }

    // Weights first: cheap, and a NaN there is reported before calibrating.
    let mut weights: BTreeMap<String, EncodedWeight> = BTreeMap::new();
    for t in &plan.targets {
        let w = &graph.initializers[&t.weight];
        let e = weights::encode(
            w,
            &t.weight,
            config.scheme,
            config.weight_bits,
            config.per_channel,
            t.weight_axis,
        )?;
        weights.insert(t.name.clone(), e);
    }

    let tables: Vec<(embedding::Table, EncodedWeight)> = embedding::find(graph, &config.exclude)?
        .into_iter()
        .map(|t| {
            let e = embedding::encode(graph, &t, config.scheme, config.weight_bits)?;
            Ok((t, e))
        })
        .collect::<Result<_>>()?;

    // Activations.
    let dynamic = config.activations == ActivationCalib::Dynamic;
    let quantize_acts =
        config.activations != ActivationCalib::None && !dynamic && !plan.targets.is_empty();
    let mut acts: BTreeMap<String, ActParams> = BTreeMap::new();
    let mut act_sqnr: BTreeMap<String, f64> = BTreeMap::new();
    let mut samples = 0;
    let calib_started = Instant::now();
    let mut calib_seconds = 0.0;
    let plan = if quantize_acts {
        let calibrated = plan.calibrated();
        let (ranges, n) = match fixed_ranges {
            Some(given) => {
                let mut ranges = BTreeMap::new();
                for name in calibrated {
                    let r = given.get(&name).copied().ok_or_else(|| Error::Tensor {
                        name: name.clone(),
                        msg: "no activation range was given for this tensor".into(),
                    })?;
                    ranges.insert(name, r);
                }
                (ranges, 0)
            }
            None => {
                let obs = calibrate::Observing::new(&simple, &calibrated, config.threads)?;
                calibrate::calibrate_with_config(&obs, calib, &calibrated, config, progress)?
            }
        };
        samples = n;
        calib_seconds = calib_started.elapsed().as_secs_f64();
        for (name, r) in &ranges {
            acts.insert(
                name.clone(),
                activation_params(*r, config.scheme, config.activation_bits, name)?,
            );
        }
        for (t, origin) in &plan.shared {
            if let Some(p) = acts.get(origin).copied() {
                acts.insert(t.clone(), p);
            }
        }
        if let (true, Some(source)) = (config.measure_activation_sqnr, calib) {
            let params: BTreeMap<String, QParams> =
                acts.iter().map(|(k, v)| (k.clone(), v.params)).collect();
            let names: Vec<String> = params.keys().cloned().collect();
            let obs = calibrate::Observing::new(&simple, &names, config.threads)?;
            act_sqnr = calibrate::activation_sqnr(
                &obs,
                source,
                &params,
                config.calib_limit,
                config.batch_size,
                progress,
            )?;
        }
        plan
    } else {
        plan::Plan {
            tensors: Vec::new(),
            shared: BTreeMap::new(),
            ..plan
        }
    };

    let mut out = match config.format {
        _ if dynamic => dynamic_form::build(&simple, &plan, &weights)?,
        QuantFormat::Qdq => qdq::build(&simple, &plan, &acts, &weights)?,
        QuantFormat::QOperator => {
            qop::build(&simple, &plan, &acts, &weights, config.lookup_tables)?
        }
    };
    embedding::apply(&mut out.graph, &tables)?;
    out.set_metadata(
        METADATA_KEY,
        serde_json::to_string(config).map_err(|e| Error::Data(e.to_string()))?,
    );

    let mut layers = Vec::new();
    for t in &plan.targets {
        let w = &weights[&t.name];
        layers.push(LayerReport {
            node: t.name.clone(),
            op: if t.relu.is_some() {
                format!("{}+Relu", t.op)
            } else {
                t.op.clone()
            },
            scheme: format!("{}{}", config.scheme, config.weight_bits),
            weight_params: w.detail.clone(),
            weight_sqnr_db: w.sqnr_db,
            input_params: acts.get(&t.input).map(describe),
            output_params: acts.get(&t.act_out).map(describe),
            input_sqnr_db: act_sqnr.get(&t.input).copied(),
            output_sqnr_db: act_sqnr.get(&t.act_out).copied(),
            bytes_before: w.bytes_before,
            bytes_after: w.bytes_after,
            bytes_packed: w.bytes_packed,
        });
    }
    for (t, w) in &tables {
        layers.push(LayerReport {
            node: t.name.clone(),
            op: "Gather".into(),
            scheme: format!("{}{}", config.scheme, config.weight_bits),
            weight_params: w.detail.clone(),
            weight_sqnr_db: w.sqnr_db,
            input_params: None,
            output_params: None,
            input_sqnr_db: None,
            output_sqnr_db: None,
            bytes_before: w.bytes_before,
            bytes_after: w.bytes_after,
            bytes_packed: w.bytes_packed,
        });
    }
    let quantized: std::collections::HashSet<&str> =
        plan.targets.iter().map(|t| t.name.as_str()).collect();
    let skipped = graph
        .nodes
        .iter()
        .enumerate()
        .filter(|(_, n)| matches!(n.op_type.as_str(), "Conv" | "Gemm" | "MatMul"))
        .filter(|(_, n)| !quantized.contains(n.display_name().as_str()))
        .map(|(i, n)| SkippedNode {
            node: n.display_name(),
            op: n.op_type.clone(),
            reason: if config.exclude.contains(&n.display_name()) {
                "excluded".into()
            } else {
                plan::skip_reason(graph, i)
                    .unwrap_or_else(|| "its neighbours are left in f32".into())
            },
        })
        .collect();
    let report = QuantizeReport {
        config: config.clone(),
        calibration_samples: samples,
        calibration_seconds: calib_seconds,
        total_seconds: started.elapsed().as_secs_f64(),
        weight_bytes_before: layers.iter().map(|l| l.bytes_before).sum(),
        weight_bytes_after: layers.iter().map(|l| l.bytes_after).sum(),
        weight_bytes_packed: layers.iter().map(|l| l.bytes_packed).sum(),
        layers,
        skipped,
        model_bytes_before: None,
        model_bytes_after: None,
        accuracy_before: None,
        accuracy_after: None,
        top1_agreement: None,
        peak_rss_bytes: None,
        sensitivity: None,
    };
    Ok((out, report))
}
