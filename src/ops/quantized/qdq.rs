//! ONNX `QuantizeLinear` and `DequantizeLinear` (opsets 10-21): per-tensor and per-axis
//! (`axis`, 13+) linear quantization to u8, i8 or i16 with saturation and round-half-to-even,
//! and its inverse from u8, i8, i16 or i32. Blocked quantization (`block_size`, 21) is rejected.

use rayon::prelude::*;

use super::params::{check_axis, dtype_range, present, read_qparams, QTensorParams};
use crate::error::Result;
use crate::ir::{DType, Node, Tensor, TensorData, TypeInfo};
use crate::ops::{
    node_error, normalize_axis, required, CompileCtx, InferCtx, Kernel, OpDef, RunCtx,
};
use crate::quant::{QParams, QStore, Quantization};

/// Elements per parallel task: below this, threads cost more than they save.
const PAR_CHUNK: usize = 1 << 16;

pub const QUANTIZE_LINEAR: OpDef = OpDef {
    op_type: "QuantizeLinear",
    domain: "",
    opsets: (10, 21),
    infer: infer_quantize,
    compile: compile_quantize,
    fuses_activation: false,
};

pub const DEQUANTIZE_LINEAR: OpDef = OpDef {
    op_type: "DequantizeLinear",
    domain: "",
    opsets: (10, 21),
    infer: infer_dequantize,
    compile: compile_dequantize,
    fuses_activation: false,
};

pub(crate) fn check_block_size(node: &Node) -> Result<()> {
    match node.attr_int("block_size")? {
        None | Some(0) => Ok(()),
        Some(b) => Err(node_error(
            node,
            format!("blocked quantization (block_size {b}) is not supported"),
        )),
    }
}

/// Output element type of QuantizeLinear: the zero point's, else `output_dtype` (21), else u8.
pub(crate) fn quantize_output_dtype(node: &Node, zp_type: Option<DType>) -> Result<DType> {
    let dt = match zp_type {
        Some(t) => t,
        None => match node.attr_int("output_dtype")? {
            None | Some(0) => DType::U8,
            Some(code) => DType::from_onnx_code(code as i32).ok_or_else(|| {
                node_error(
                    node,
                    format!(
                        "output_dtype {} is not supported",
                        DType::onnx_code_name(code as i32)
                    ),
                )
            })?,
        },
    };
    if !matches!(dt, DType::U8 | DType::I8 | DType::I16) {
        return Err(node_error(
            node,
            format!("quantizing to {dt} is not supported (u8, i8 or i16)"),
        ));
    }
    Ok(dt)
}

fn infer_quantize(ctx: &InferCtx) -> Result<Vec<TypeInfo>> {
    check_block_size(ctx.node)?;
    let x = ctx.input_type(0)?;
    let zp = ctx
        .node
        .input(2)
        .and_then(|_| ctx.input_types.get(2).cloned().flatten());
    let dt = quantize_output_dtype(ctx.node, zp.map(|t| t.dtype))?;
    Ok(vec![TypeInfo {
        dtype: dt,
        shape: x.shape.clone(),
    }])
}

fn infer_dequantize(ctx: &InferCtx) -> Result<Vec<TypeInfo>> {
    check_block_size(ctx.node)?;
    let x = ctx.input_type(0)?;
    Ok(vec![TypeInfo {
        dtype: DType::F32,
        shape: x.shape.clone(),
    }])
}

/// Parameters known at compile time, or read from the inputs at run time.
struct ParamSource {
    node: Node,
    axis: i64,
    prepared: Option<QTensorParams>,
}

impl ParamSource {
    fn new(ctx: &CompileCtx, default_dtype: Option<DType>) -> Result<ParamSource> {
        let node = ctx.node;
        check_block_size(node)?;
        let axis = if ctx.opset >= 13 {
            node.attr_int_or("axis", 1)?
        } else {
            1
        };
        let zp_const = match node.input(2) {
            None => Some(None),
            Some(_) => ctx.constant(2).map(Some),
        };
        let prepared = match (ctx.constant(1), zp_const, default_dtype) {
            (Some(s), Some(z), Some(dt)) => Some(read_qparams(node, s, z, dt, "y")?),
            _ => None,
        };
        Ok(ParamSource {
            node: node.clone(),
            axis,
            prepared,
        })
    }

    /// The quantization axis; only per-axis parameters need a valid one.
    fn axis_for(&self, p: &QTensorParams, rank: usize) -> Result<usize> {
        if p.is_per_tensor() {
            Ok(0)
        } else {
            normalize_axis(self.axis, rank).map_err(|e| node_error(&self.node, e.to_string()))
        }
    }

    fn get(&self, inputs: &[Option<&Tensor>], default_dtype: DType) -> Result<QTensorParams> {
        match &self.prepared {
            Some(p) => Ok(p.clone()),
            None => read_qparams(
                &self.node,
                required(inputs, 1)?,
                present(inputs, 2),
                default_dtype,
                "y",
            ),
        }
    }
}

struct QuantizeKernel {
    src: ParamSource,
    out_dtype: DType,
}

fn compile_quantize(ctx: &CompileCtx) -> Result<Box<dyn Kernel>> {
    let zp_type = ctx
        .node
        .input(2)
        .and_then(|_| ctx.input_type(2))
        .map(|t| t.dtype)
        .or_else(|| ctx.constant(2).map(Tensor::dtype));
    let out_dtype = quantize_output_dtype(ctx.node, zp_type)?;
    crate::ops::require_f32_input(ctx)?;
    Ok(Box::new(QuantizeKernel {
        src: ParamSource::new(ctx, Some(out_dtype))?,
        out_dtype,
    }))
}

impl Kernel for QuantizeKernel {
    fn run(&self, inputs: &[Option<&Tensor>], _ctx: &mut RunCtx) -> Result<Vec<Tensor>> {
        let node = &self.src.node;
        let x = required(inputs, 0)?;
        let xs = x.as_f32().map_err(|e| node_error(node, e.to_string()))?;
        let p = self.src.get(inputs, self.out_dtype)?;
        let axis = self.src.axis_for(&p, x.rank())?;
        check_axis(node, &p, x.shape(), axis, "y_scale")?;
        let q = p.to_quantization(axis);
        let shape = x.shape().to_vec();
        let data = match p.dtype {
            DType::U8 => TensorData::U8(quantize_as::<u8>(&q, xs, &shape, node)?),
            DType::I8 => TensorData::I8(quantize_as::<i8>(&q, xs, &shape, node)?),
            DType::I16 => TensorData::I16(quantize_as::<i16>(&q, xs, &shape, node)?),
            other => {
                return Err(node_error(
                    node,
                    format!("quantizing to {other} is not supported"),
                ))
            }
        };
        Ok(vec![Tensor::new(shape, data)?])
    }
}

fn quantize_as<T: QStore + Default + Send + Sync>(
    q: &Quantization,
    x: &[f32],
    shape: &[usize],
    node: &Node,
) -> Result<Vec<T>> {
    let mut out = vec![T::default(); x.len()];
    match q {
        Quantization::PerTensor(p) => {
            let res: Result<()> = out
                .par_chunks_mut(PAR_CHUNK)
                .zip(x.par_chunks(PAR_CHUNK))
                .try_for_each(|(o, x)| p.quantize_slice(x, o));
            res.map_err(|e| node_error(node, e.to_string()))?;
        }
        Quantization::PerChannel(_) => q
            .quantize(x, shape, &mut out, &node.display_name())
            .map_err(|e| node_error(node, e.to_string()))?,
    }
    Ok(out)
}

struct DequantizeKernel {
    src: ParamSource,
}

fn compile_dequantize(ctx: &CompileCtx) -> Result<Box<dyn Kernel>> {
    let x_type = ctx
        .input_type(0)
        .map(|t| t.dtype)
        .or_else(|| ctx.constant(0).map(Tensor::dtype));
    if let Some(dt) = x_type {
        if dtype_range(dt).is_none() {
            return Err(node_error(
                ctx.node,
                format!("cannot dequantize a {dt} tensor (u8, i8, i16 or i32)"),
            ));
        }
    }
    Ok(Box::new(DequantizeKernel {
        src: ParamSource::new(ctx, x_type)?,
    }))
}

impl Kernel for DequantizeKernel {
    fn run(&self, inputs: &[Option<&Tensor>], ctx: &mut RunCtx) -> Result<Vec<Tensor>> {
        let node = &self.src.node;
        let x = required(inputs, 0)?;
        let p = self.src.get(inputs, x.dtype())?;
        if p.dtype != x.dtype() {
            return Err(node_error(
                node,
                format!(
                    "zero point type {} differs from the input type {}",
                    p.dtype,
                    x.dtype()
                ),
            ));
        }
        let axis = self.src.axis_for(&p, x.rank())?;
        check_axis(node, &p, x.shape(), axis, "x_scale")?;
        let q = p.to_quantization(axis);
        let mut out = ctx.alloc_f32(x.numel());
        match x.data() {
            TensorData::U8(v) => dequantize_as(&q, v, x.shape(), &mut out, node)?,
            TensorData::I8(v) => dequantize_as(&q, v, x.shape(), &mut out, node)?,
            TensorData::I16(v) => dequantize_as(&q, v, x.shape(), &mut out, node)?,
            TensorData::I32(v) => dequantize_as(&q, v, x.shape(), &mut out, node)?,
            other => {
                return Err(node_error(
                    node,
                    format!("cannot dequantize a {} tensor", other.dtype()),
                ))
            }
        }
        Ok(vec![Tensor::from_f32(x.shape().to_vec(), out)?])
    }
}

fn dequantize_as<T: QStore + Send + Sync>(
    q: &Quantization,
    x: &[T],
    shape: &[usize],
    out: &mut [f32],
    node: &Node,
) -> Result<()> {
    match q {
        Quantization::PerTensor(p) => {
            let p: QParams = *p;
            out.par_chunks_mut(PAR_CHUNK)
                .zip(x.par_chunks(PAR_CHUNK))
                .for_each(|(o, x)| {
                    for (o, &c) in o.iter_mut().zip(x) {
                        *o = p.dequantize(c.code());
                    }
                });
            Ok(())
        }
        Quantization::PerChannel(_) => q
            .dequantize(x, shape, out, &node.display_name())
            .map_err(|e| node_error(node, e.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use crate::ir::{Attr, Tensor, TensorData};
    use crate::ops::testutil::run;

    fn u8s(shape: Vec<usize>, v: Vec<u8>) -> Tensor {
        Tensor::new(shape, TensorData::U8(v)).unwrap()
    }

    #[test]
    fn quantize_rounds_half_to_even_and_saturates() {
        let x = Tensor::from_f32(vec![7], vec![0.0, 1.0, 3.0, 5.0, -1.0, 1000.0, 2.9]).unwrap();
        let scale = Tensor::scalar_f32(2.0);
        let zp = u8s(vec![], vec![128]);
        let y = run(
            "QuantizeLinear",
            13,
            &[],
            vec![Some(x.clone()), Some(scale.clone()), Some(zp)],
            1,
        )
        .unwrap();
        // 0.5 -> 0, 1.5 -> 2, 2.5 -> 2, -0.5 -> -0, 500 -> saturates, 1.45 -> 1.
        assert_eq!(
            y[0].data(),
            &TensorData::U8(vec![128, 128, 130, 130, 128, 255, 129])
        );
        let zp8 = Tensor::new(vec![], TensorData::I8(vec![-3])).unwrap();
        let y = run(
            "QuantizeLinear",
            13,
            &[],
            vec![Some(x.clone()), Some(scale.clone()), Some(zp8)],
            1,
        )
        .unwrap();
        assert_eq!(
            y[0].data(),
            &TensorData::I8(vec![-3, -3, -1, -1, -3, 127, -2])
        );
        // No zero point: u8 with zero point 0, negatives saturate to 0.
        let y = run(
            "QuantizeLinear",
            10,
            &[],
            vec![Some(x), Some(scale), None],
            1,
        )
        .unwrap();
        assert_eq!(y[0].data(), &TensorData::U8(vec![0, 0, 2, 2, 0, 255, 1]));
    }

    #[test]
    fn per_axis_round_trip() {
        let x = Tensor::from_f32(vec![2, 3], vec![1.0, 2.0, 3.0, -1.0, -2.0, -3.0]).unwrap();
        let scales = Tensor::from_f32(vec![3], vec![1.0, 0.5, 0.25]).unwrap();
        let zps = Tensor::new(vec![3], TensorData::I8(vec![0, 1, -1])).unwrap();
        let q = run(
            "QuantizeLinear",
            13,
            &[("axis", Attr::Int(1))],
            vec![Some(x.clone()), Some(scales.clone()), Some(zps.clone())],
            1,
        )
        .unwrap();
        assert_eq!(q[0].data(), &TensorData::I8(vec![1, 5, 11, -1, -3, -13]));
        let d = run(
            "DequantizeLinear",
            13,
            &[("axis", Attr::Int(-1))],
            vec![Some(q[0].clone()), Some(scales), Some(zps)],
            1,
        )
        .unwrap();
        assert_eq!(d[0], x);
    }

    #[test]
    fn dequantize_i32_bias_and_bad_params() {
        let b = Tensor::new(vec![2], TensorData::I32(vec![-1000, 7])).unwrap();
        let d = run(
            "DequantizeLinear",
            13,
            &[],
            vec![Some(b.clone()), Some(Tensor::scalar_f32(0.5)), None],
            1,
        )
        .unwrap();
        assert_eq!(d[0].as_f32().unwrap(), &[-500.0, 3.5]);
        let err = run(
            "DequantizeLinear",
            13,
            &[],
            vec![Some(b.clone()), Some(Tensor::scalar_f32(0.0)), None],
            1,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("scale"), "{err}");
        let err = run(
            "QuantizeLinear",
            21,
            &[("block_size", Attr::Int(4))],
            vec![
                Some(Tensor::scalar_f32(1.0)),
                Some(Tensor::scalar_f32(1.0)),
                None,
            ],
            1,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("block"), "{err}");
    }
}
