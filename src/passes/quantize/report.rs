//! What the quantize pass did, per layer and in total, for people (a table) and tools (JSON).

use std::fmt::Write as _;

use serde::Serialize;

use super::config::QuantizeConfig;
use crate::eval::Accuracy;

#[derive(Clone, Debug, Serialize)]
pub struct LayerReport {
    pub node: String,
    pub op: String,
    pub scheme: String,
    /// Weight parameters: scale (or range of per-channel scales) and zero point, fractional
    /// bits, exponent range or codebook size.
    pub weight_params: String,
    pub weight_sqnr_db: f64,
    /// Input and output activation parameters (`scale`, `zero point`, grid).
    pub input_params: Option<String>,
    pub output_params: Option<String>,
    /// SQNR of quantizing the input/output activation, measured on the calibration data.
    pub input_sqnr_db: Option<f64>,
    pub output_sqnr_db: Option<f64>,
    pub bytes_before: usize,
    pub bytes_after: usize,
    pub bytes_packed: usize,
}

#[derive(Clone, Debug, Serialize)]
pub struct SkippedNode {
    pub node: String,
    pub op: String,
    pub reason: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct QuantizeReport {
    pub config: QuantizeConfig,
    pub calibration_samples: usize,
    pub calibration_seconds: f64,
    pub total_seconds: f64,
    pub layers: Vec<LayerReport>,
    pub skipped: Vec<SkippedNode>,
    pub weight_bytes_before: usize,
    pub weight_bytes_after: usize,
    pub weight_bytes_packed: usize,
    /// Whole-file sizes, filled in by callers that write the model.
    pub model_bytes_before: Option<usize>,
    pub model_bytes_after: Option<usize>,
    pub accuracy_before: Option<Accuracy>,
    pub accuracy_after: Option<Accuracy>,
    /// Fraction of samples whose top-1 class is unchanged.
    pub top1_agreement: Option<f64>,
    /// Peak resident memory of the quantizing process, when the caller measures it.
    pub peak_rss_bytes: Option<u64>,
    /// Per-layer sensitivity ranking, when asked for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sensitivity: Option<Vec<super::sensitivity::LayerSensitivity>>,
}

fn db(v: Option<f64>) -> String {
    match v {
        Some(x) if x.is_infinite() => "inf".into(),
        Some(x) => format!("{x:.1}"),
        None => "-".into(),
    }
}

fn kib(b: usize) -> String {
    if b >= 1 << 20 {
        format!("{:.2} MiB", b as f64 / (1u64 << 20) as f64)
    } else {
        format!("{:.1} KiB", b as f64 / 1024.0)
    }
}

impl QuantizeReport {
    /// A plain-text table, one row per quantized layer, then totals.
    pub fn table(&self) -> String {
        let mut s = String::new();
        let c = &self.config;
        let _ = writeln!(
            s,
            "scheme {} | weights {}-bit {} | activations {}-bit {} | format {:?} | {} calibration samples ({:.2} s)",
            c.scheme,
            c.weight_bits,
            if c.per_channel { "per-channel" } else { "per-tensor" },
            c.activation_bits,
            c.activations,
            c.format,
            self.calibration_samples,
            self.calibration_seconds
        );
        let name_w = self
            .layers
            .iter()
            .map(|l| l.node.len())
            .max()
            .unwrap_or(4)
            .clamp(4, 40);
        // Fused labels ("Conv+Relu") are wider than plain op names.
        let op_w = self
            .layers
            .iter()
            .map(|l| l.op.len())
            .max()
            .unwrap_or(2)
            .max(2);
        let _ = writeln!(
            s,
            "{:<name_w$}  {:<op_w$}  {:>8}  {:>7}  {:>7}  {:>10}  {:>10}  params",
            "node", "op", "w SQNR", "in SQNR", "out SQNR", "before", "after"
        );
        for l in &self.layers {
            let name = fit_name(&l.node, name_w);
            let _ = writeln!(
                s,
                "{name:<name_w$}  {:<op_w$}  {:>8}  {:>7}  {:>7}  {:>10}  {:>10}  {}",
                l.op,
                db(Some(l.weight_sqnr_db)),
                db(l.input_sqnr_db),
                db(l.output_sqnr_db),
                kib(l.bytes_before),
                kib(l.bytes_after),
                l.weight_params
            );
        }
        let _ = writeln!(
            s,
            "weights: {} -> {} ({:.2}x smaller; {} if bit-packed)",
            kib(self.weight_bytes_before),
            kib(self.weight_bytes_after),
            self.weight_bytes_before as f64 / self.weight_bytes_after.max(1) as f64,
            kib(self.weight_bytes_packed)
        );
        if let (Some(a), Some(b)) = (self.model_bytes_before, self.model_bytes_after) {
            let _ = writeln!(s, "model file: {} -> {}", kib(a), kib(b));
        }
        for sk in &self.skipped {
            let _ = writeln!(s, "left in f32: {} ({}): {}", sk.node, sk.op, sk.reason);
        }
        if let (Some(a), Some(b)) = (&self.accuracy_before, &self.accuracy_after) {
            let _ = writeln!(
                s,
                "top-1 accuracy on {} samples: {:.2} % -> {:.2} % ({:+.2} points){}",
                a.samples,
                a.top1 * 100.0,
                b.top1 * 100.0,
                (b.top1 - a.top1) * 100.0,
                self.top1_agreement
                    .map(|g| format!(", top-1 agreement {:.2} %", g * 100.0))
                    .unwrap_or_default()
            );
        }
        s
    }
}

/// `name` in at most `width` characters: a longer one keeps its end, where node paths
/// (`/m/encoder/layer.0/attention/self/query/MatMul`) differ, after a `…`.
pub fn fit_name(name: &str, width: usize) -> String {
    let n = name.chars().count();
    if n <= width {
        return name.to_string();
    }
    let tail: String = name.chars().skip(n + 1 - width.max(1)).collect();
    format!("…{tail}")
}

#[cfg(test)]
mod tests {
    use super::fit_name;

    #[test]
    fn long_names_keep_their_distinctive_end() {
        assert_eq!(fit_name("Conv.0", 10), "Conv.0");
        let long = "/m/encoder/layer.0/attention/self/query/MatMul";
        let short = fit_name(long, 20);
        assert_eq!(short.chars().count(), 20);
        assert_eq!(short, "…n/self/query/MatMul");
    }
}
