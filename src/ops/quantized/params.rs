//! Reading the scale and zero-point inputs of quantized ops into checked parameters.

use crate::error::Result;
use crate::ir::{DType, Node, Tensor, TensorData};
use crate::ops::node_error;
use crate::quant::{PerChannel, QParams, Quantization};

/// Scale(s) and zero point(s) of one quantized tensor, as an ONNX node gives them: one entry
/// per tensor, or one per index of the quantization axis.
#[derive(Clone, Debug, PartialEq)]
pub struct QTensorParams {
    pub scales: Vec<f32>,
    pub zero_points: Vec<i32>,
    /// Element type of the quantized tensor (that of the zero point).
    pub dtype: DType,
}

/// A weight tensor's values as i8 with its zero points. u8 weights and their zero points are
/// shifted by 128, which leaves every `w - zp` unchanged. `name` is how errors call it.
pub(super) fn weights_as_i8(
    node: &Node,
    w: &Tensor,
    zero_points: &[i32],
    name: &str,
) -> Result<(Vec<i8>, Vec<i32>)> {
    match w.data() {
        TensorData::I8(v) => Ok((v.clone(), zero_points.to_vec())),
        TensorData::U8(v) => Ok((
            super::engine::shift_u8_to_i8(v),
            zero_points.iter().map(|z| z - 128).collect(),
        )),
        other => Err(node_error(
            node,
            format!("{name} must be u8 or i8, got {}", other.dtype()),
        )),
    }
}

/// Full code range of an integer storage type.
pub fn dtype_range(dtype: DType) -> Option<(i32, i32)> {
    match dtype {
        DType::U8 => Some((0, 255)),
        DType::I8 => Some((-128, 127)),
        DType::I16 => Some((-32768, 32767)),
        DType::I32 => Some((i32::MIN, i32::MAX)),
        _ => None,
    }
}

impl QTensorParams {
    pub fn is_per_tensor(&self) -> bool {
        self.scales.len() == 1
    }

    /// Linear parameters over the storage type's full range, per tensor or along `axis`.
    pub fn to_quantization(&self, axis: usize) -> Quantization {
        let (qmin, qmax) = dtype_range(self.dtype).unwrap_or((i32::MIN, i32::MAX));
        let p = |i: usize| QParams {
            scale: self.scales[i],
            zero_point: self.zero_points[i],
            qmin,
            qmax,
        };
        if self.is_per_tensor() {
            Quantization::PerTensor(p(0))
        } else {
            Quantization::PerChannel(PerChannel {
                axis,
                params: (0..self.scales.len()).map(p).collect(),
            })
        }
    }
}

/// Reads `scale` (f32, a scalar or 1-D) and the optional `zero_point` (same element count,
/// integer; zeros of `default_dtype` when absent). `what` names the tensor in errors.
pub fn read_qparams(
    node: &Node,
    scale: &Tensor,
    zero_point: Option<&Tensor>,
    default_dtype: DType,
    what: &str,
) -> Result<QTensorParams> {
    if scale.rank() > 1 {
        return Err(node_error(
            node,
            format!(
                "{what} scale must be a scalar or 1-D, got shape {:?}",
                scale.shape()
            ),
        ));
    }
    let scales = match scale.data() {
        TensorData::F32(v) => v.clone(),
        other => {
            return Err(node_error(
                node,
                format!("{what} scale must be f32, got {}", other.dtype()),
            ))
        }
    };
    if scales.is_empty() {
        return Err(node_error(node, format!("{what} scale is empty")));
    }
    if let Some(s) = scales.iter().find(|s| !(s.is_finite() && **s > 0.0)) {
        return Err(node_error(
            node,
            format!("{what} scale {s} is not a finite positive number"),
        ));
    }
    let (zero_points, dtype) = match zero_point {
        None => (vec![0; scales.len()], default_dtype),
        Some(z) => {
            if z.numel() != scales.len() {
                return Err(node_error(
                    node,
                    format!(
                        "{what} zero point has {} values for {} scales",
                        z.numel(),
                        scales.len()
                    ),
                ));
            }
            if dtype_range(z.dtype()).is_none() {
                return Err(node_error(
                    node,
                    format!("{what} zero point of type {} is not supported", z.dtype()),
                ));
            }
            let zp: Vec<i32> = z.to_i64_vec()?.into_iter().map(|v| v as i32).collect();
            (zp, z.dtype())
        }
    };
    Ok(QTensorParams {
        scales,
        zero_points,
        dtype,
    })
}

/// The input at `i` when the node has it and it is present at run time.
pub fn present<'a>(inputs: &[Option<&'a Tensor>], i: usize) -> Option<&'a Tensor> {
    inputs.get(i).copied().flatten()
}

/// Checks that per-axis parameters fit `shape` along `axis`.
pub fn check_axis(
    node: &Node,
    p: &QTensorParams,
    shape: &[usize],
    axis: usize,
    what: &str,
) -> Result<()> {
    if p.is_per_tensor() {
        return Ok(());
    }
    match shape.get(axis) {
        Some(&n) if n == p.scales.len() => Ok(()),
        _ => Err(node_error(
            node,
            format!(
                "{what} has {} scales but axis {axis} of shape {shape:?} does not have that many entries",
                p.scales.len()
            ),
        )),
    }
}
