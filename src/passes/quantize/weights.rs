//! Weight encodings of the four schemes, with their reconstruction error and storage size.

use super::config::WeightScheme;
use crate::error::Result;
use crate::ir::{Tensor, TensorData};
use crate::quant::fixed_point::FixedFormat;
use crate::quant::kmeans;
use crate::quant::log2::Log2Format;
use crate::quant::{sqnr_db, PerChannel, QParams, QScheme, Quantization};

/// How a weight is stored in the quantized model.
#[derive(Clone, Debug)]
pub enum Encoded {
    /// i8 codes (any width up to 8 bits, in an int8 container) with linear parameters:
    /// per tensor (`axis: None`) or along `axis`.
    Linear {
        codes: Tensor,
        scales: Vec<f32>,
        zero_points: Vec<i32>,
        axis: Option<usize>,
    },
    /// u8 codes indexing a codebook of f32 values.
    Codebook { codes: Tensor, table: Vec<f32> },
}

#[derive(Clone, Debug)]
pub struct EncodedWeight {
    pub enc: Encoded,
    pub sqnr_db: f64,
    /// Human-readable parameters: scale or range of scales, fractional bits, exponents, k.
    pub detail: String,
    pub bytes_before: usize,
    /// Bytes as stored in the ONNX file (codes in 8-bit containers, parameters, codebook).
    pub bytes_after: usize,
    /// Bytes if codes were bit-packed at their true width.
    pub bytes_packed: usize,
}

/// Values of each index of `axis`, in order.
fn channels(data: &[f32], shape: &[usize], axis: usize) -> Vec<Vec<f32>> {
    let outer: usize = shape[..axis].iter().product();
    let c = shape[axis];
    let inner: usize = shape[axis + 1..].iter().product();
    let mut out = vec![Vec::with_capacity(outer * inner); c];
    for o in 0..outer {
        for (ch, dst) in out.iter_mut().enumerate() {
            let s = (o * c + ch) * inner;
            dst.extend_from_slice(&data[s..s + inner]);
        }
    }
    out
}

fn fmt_range(v: impl Iterator<Item = f64>) -> (f64, f64) {
    v.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), x| {
        (a.min(x), b.max(x))
    })
}

fn linear_result(
    w: &Tensor,
    q: Quantization,
    name: &str,
    bits: u32,
    detail: String,
) -> Result<EncodedWeight> {
    let codes = q.quantize_tensor(w, name)?;
    let codes = match codes.data() {
        TensorData::I8(_) => codes,
        _ => {
            // Narrow grids fit i8 whatever quantize_tensor picked (u8 for non-negative ones).
            let v: Vec<i8> = codes.to_i64_vec()?.into_iter().map(|c| c as i8).collect();
            Tensor::new(w.shape().to_vec(), TensorData::I8(v))?
        }
    };
    let x = w.as_f32()?;
    let (scales, zero_points, axis) = match &q {
        Quantization::PerTensor(p) => (vec![p.scale], vec![p.zero_point], None),
        Quantization::PerChannel(pc) => (
            pc.params.iter().map(|p| p.scale).collect(),
            pc.params.iter().map(|p| p.zero_point).collect(),
            Some(pc.axis),
        ),
    };
    let params = scales.len() * 5;
    Ok(EncodedWeight {
        sqnr_db: codes_sqnr_db(&q, &codes, x, name)?,
        detail,
        bytes_before: w.size_in_bytes(),
        bytes_after: w.numel() + params,
        bytes_packed: (w.numel() * bits as usize).div_ceil(8) + params,
        enc: Encoded::Linear {
            codes,
            scales,
            zero_points,
            axis,
        },
    })
}

/// [`sqnr_db`] of `x` against its i8 `codes` dequantized, a slab of rows at a time: the same
/// sums in the same order, without a weight-sized f32 copy (fresh pages cost more than the
/// arithmetic).
fn codes_sqnr_db(q: &Quantization, codes: &Tensor, x: &[f32], name: &str) -> Result<f64> {
    let TensorData::I8(c) = codes.data() else {
        return sqnr_db(x, q.dequantize_tensor(codes, name)?.as_f32()?);
    };
    let shape = codes.shape();
    let (rows, row_len) = match shape.split_first() {
        Some((&n, rest)) if n > 0 => (n, rest.iter().product::<usize>()),
        _ => return sqnr_db(x, q.dequantize_tensor(codes, name)?.as_f32()?),
    };
    if x.len() != c.len() || c.len() != rows * row_len {
        return sqnr_db(x, q.dequantize_tensor(codes, name)?.as_f32()?);
    }
    let slab = (SQNR_SLAB / row_len.max(1)).clamp(1, rows);
    let mut buf = vec![0f32; slab * row_len];
    let (mut sig, mut noise) = (0f64, 0f64);
    for r0 in (0..rows).step_by(slab) {
        let r1 = (r0 + slab).min(rows);
        let mut sub_shape = shape.to_vec();
        sub_shape[0] = r1 - r0;
        let (lo, hi) = (r0 * row_len, r1 * row_len);
        let out = &mut buf[..hi - lo];
        match q {
            Quantization::PerChannel(pc) if pc.axis == 0 => {
                let sub = Quantization::PerChannel(PerChannel {
                    axis: 0,
                    params: pc.params.get(r0..r1).map(<[_]>::to_vec).unwrap_or_default(),
                });
                sub.dequantize(&c[lo..hi], &sub_shape, out, name)?
            }
            _ => q.dequantize(&c[lo..hi], &sub_shape, out, name)?,
        }
        for (&a, &b) in x[lo..hi].iter().zip(out.iter()) {
            let (a, b) = (f64::from(a), f64::from(b));
            sig += a * a;
            noise += (a - b) * (a - b);
        }
    }
    Ok(if noise == 0.0 {
        f64::INFINITY
    } else {
        10.0 * (sig / noise).log10()
    })
}

/// Elements dequantized at once by [`codes_sqnr_db`] (whole rows, at least one).
const SQNR_SLAB: usize = 16 << 10;

fn codebook_result(
    w: &Tensor,
    codes: Vec<u8>,
    table: Vec<f32>,
    bits: u32,
    detail: String,
) -> Result<EncodedWeight> {
    let x = w.as_f32()?;
    let fake: Vec<f32> = codes.iter().map(|&c| table[usize::from(c)]).collect();
    let params = table.len() * 4;
    Ok(EncodedWeight {
        sqnr_db: sqnr_db(x, &fake)?,
        detail,
        bytes_before: w.size_in_bytes(),
        bytes_after: w.numel() + params,
        bytes_packed: (w.numel() * bits as usize).div_ceil(8) + params,
        enc: Encoded::Codebook {
            codes: Tensor::new(w.shape().to_vec(), TensorData::U8(codes))?,
            table,
        },
    })
}

/// Encodes weight `w` (f32) named `name` whose output channels lie along `axis`.
pub fn encode(
    w: &Tensor,
    name: &str,
    scheme: WeightScheme,
    bits: u32,
    per_channel: bool,
    axis: usize,
) -> Result<EncodedWeight> {
    let x = w.as_f32().map_err(|e| crate::error::Error::Tensor {
        name: name.to_string(),
        msg: e.to_string(),
    })?;
    crate::quant::linear::finite_min_max(x, name)?;
    match scheme {
        WeightScheme::Linear => {
            let s = QScheme::new(bits, true, true)?;
            if per_channel {
                let pc = s.params_per_channel(x, w.shape(), axis, name)?;
                let (lo, hi) = fmt_range(pc.params.iter().map(|p| f64::from(p.scale)));
                let detail = format!(
                    "s8[{}..{}] per-channel({}) scale {lo:.3e}..{hi:.3e}, zp 0",
                    s.qmin(),
                    s.qmax(),
                    pc.params.len()
                );
                linear_result(w, Quantization::PerChannel(pc), name, bits, detail)
            } else {
                let p = s.params_for(x, name)?;
                let detail = format!("s8[{}..{}] scale {:.3e}, zp 0", s.qmin(), s.qmax(), p.scale);
                linear_result(w, Quantization::PerTensor(p), name, bits, detail)
            }
        }
        WeightScheme::Fixed => {
            let formats: Vec<FixedFormat> = if per_channel {
                channels(x, w.shape(), axis)
                    .iter()
                    .map(|c| {
                        if c.is_empty() {
                            FixedFormat::new(bits, bits as i32 - 1)
                        } else {
                            FixedFormat::for_data(bits, c, name)
                        }
                    })
                    .collect::<Result<_>>()?
            } else {
                vec![FixedFormat::for_data(bits, x, name)?]
            };
            let (flo, fhi) = fmt_range(formats.iter().map(|f| f64::from(f.frac())));
            let detail = format!("fixed {bits}-bit, f {flo}..{fhi} (scale 2^-f, zp 0)");
            let params: Vec<QParams> = formats.iter().map(FixedFormat::to_qparams).collect();
            let q = if per_channel {
                Quantization::PerChannel(PerChannel { axis, params })
            } else {
                Quantization::PerTensor(params[0])
            };
            linear_result(w, q, name, bits, detail)
        }
        WeightScheme::Log => {
            let f = Log2Format::for_data(bits, x, name)?;
            let codes = f.encode_slice(x);
            let table: Vec<f32> = (0..1u32 << bits).map(|c| f.decode(c as u8)).collect();
            let detail = format!("log2 {bits}-bit, ±2^e, e {}..{}", f.e_min(), f.e_max());
            codebook_result(w, codes, table, bits, detail)
        }
        WeightScheme::Kmeans => {
            let cb = kmeans::optimal(x, 1usize << bits, name)?;
            let codes = cb.indices_u8()?;
            let detail = format!("k-means, {} centroids", cb.centroids.len());
            codebook_result(w, codes, cb.centroids, bits, detail)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_scheme_encodes_and_reports() {
        let data: Vec<f32> = (0..64)
            .map(|i| ((i * 37 % 64) as f32 - 31.5) / 40.0)
            .collect();
        let w = Tensor::from_f32(vec![4, 16], data).unwrap();
        for scheme in [
            WeightScheme::Linear,
            WeightScheme::Fixed,
            WeightScheme::Log,
            WeightScheme::Kmeans,
        ] {
            let e8 = encode(&w, "w", scheme, 8, true, 0).unwrap();
            let e4 = encode(&w, "w", scheme, 4, true, 0).unwrap();
            // Extra bits of a power-of-two code only extend the exponent range downwards; when
            // 4 bits already reach below the smallest weight, 8 bits add nothing, so log
            // quantization may tie. Every other scheme gains precision.
            if scheme == WeightScheme::Log {
                assert!(
                    e8.sqnr_db >= e4.sqnr_db,
                    "{scheme}: {} vs {}",
                    e8.sqnr_db,
                    e4.sqnr_db
                );
            } else {
                assert!(
                    e8.sqnr_db > e4.sqnr_db,
                    "{scheme}: {} vs {}",
                    e8.sqnr_db,
                    e4.sqnr_db
                );
            }
            assert!(e4.bytes_packed < e8.bytes_packed);
            assert_eq!(e8.bytes_before, 256);
        }
        // All-zero and constant weights get a usable scale.
        let z = Tensor::from_f32(vec![2, 3], vec![0.0; 6]).unwrap();
        let e = encode(&z, "zeros", WeightScheme::Linear, 8, true, 0).unwrap();
        match e.enc {
            Encoded::Linear { scales, .. } => assert!(scales.iter().all(|&s| s > 0.0)),
            _ => panic!("linear"),
        }
        // NaN is an error naming the tensor.
        let bad = Tensor::from_f32(vec![2], vec![1.0, f32::NAN]).unwrap();
        let err = encode(&bad, "conv1.weight", WeightScheme::Linear, 8, true, 0)
            .unwrap_err()
            .to_string();
        assert!(err.contains("conv1.weight"), "{err}");
    }
}
