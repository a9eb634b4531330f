//! Ops that produce shapes or fresh tensors rather than moving data: `Shape` (1-28;
//! `start`/`end` from 15), `Size` (1-28), `ConstantOfShape` (9-28), `Range` (11-28) and
//! `Constant` (1-28).

use super::common::{const_ints, known_len, to_dims};
use crate::error::{Error, Result};
use crate::ir::{checked_numel, DType, Dim, Node, Tensor, TypeInfo};
use crate::ops::typed::{narrow_f16, tensor, view, with_any_type, Elem};
use crate::ops::{node_error, required, CompileCtx, InferCtx, Kernel, RunCtx};

/// Shape's `start..end` window over a rank, clamped as the spec says.
fn shape_window(rank: usize, start: i64, end: Option<i64>) -> (usize, usize) {
    let r = rank as i64;
    let norm = |v: i64| (if v < 0 { v + r } else { v }).clamp(0, r) as usize;
    let s = norm(start);
    let e = end.map_or(rank, norm);
    (s, e.max(s))
}

fn shape_attrs(node: &Node, opset: i64) -> Result<(i64, Option<i64>)> {
    if opset < 15 {
        return Ok((0, None));
    }
    Ok((node.attr_int_or("start", 0)?, node.attr_int("end")?))
}

struct ShapeKernel {
    start: i64,
    end: Option<i64>,
}

impl Kernel for ShapeKernel {
    fn run(&self, inputs: &[Option<&Tensor>], _ctx: &mut RunCtx) -> Result<Vec<Tensor>> {
        let x = required(inputs, 0)?;
        let (s, e) = shape_window(x.rank(), self.start, self.end);
        let dims: Vec<i64> = x.shape()[s..e].iter().map(|&d| d as i64).collect();
        Ok(vec![Tensor::from_i64(vec![dims.len()], dims)?])
    }
}

pub fn infer_shape(ctx: &InferCtx) -> Result<Vec<TypeInfo>> {
    let x = ctx.input_type(0)?;
    let (start, end) = shape_attrs(ctx.node, ctx.opset)?;
    let len = match x.rank() {
        Some(r) => {
            let (s, e) = shape_window(r, start, end);
            Dim::Known(e - s)
        }
        None => Dim::Unknown,
    };
    Ok(vec![TypeInfo::new(DType::I64, vec![len])])
}

pub fn compile_shape(ctx: &CompileCtx) -> Result<Box<dyn Kernel>> {
    let (start, end) = shape_attrs(ctx.node, ctx.opset)?;
    Ok(Box::new(ShapeKernel { start, end }))
}

struct SizeKernel;

impl Kernel for SizeKernel {
    fn run(&self, inputs: &[Option<&Tensor>], _ctx: &mut RunCtx) -> Result<Vec<Tensor>> {
        Ok(vec![
            Tensor::scalar_i64(required(inputs, 0)?.numel() as i64),
        ])
    }
}

pub fn infer_size(ctx: &InferCtx) -> Result<Vec<TypeInfo>> {
    ctx.input_type(0)?;
    Ok(vec![TypeInfo::known(DType::I64, &[])])
}

pub fn compile_size(_ctx: &CompileCtx) -> Result<Box<dyn Kernel>> {
    Ok(Box::new(SizeKernel))
}

/// ConstantOfShape's fill value: a one-element tensor, default f32 zero.
fn fill_value(node: &Node) -> Result<Tensor> {
    match node.attr_tensor("value")? {
        None => Ok(Tensor::scalar_f32(0.0)),
        Some(t) if t.numel() == 1 => Ok(t.clone()),
        Some(t) => Err(node_error(
            node,
            format!("'value' must hold one element, found {}", t.numel()),
        )),
    }
}

/// A tensor of `shape` filled with the single element of `value`.
pub fn filled(value: &Tensor, shape: Vec<usize>, ctx: &mut RunCtx) -> Result<Tensor> {
    let n = checked_numel(&shape, value.dtype().size_of())?;
    with_any_type!(value.dtype(), |T| {
        let v = view::<T>(value)?[0];
        let mut out = T::filled(ctx, n);
        out.fill(v);
        tensor(shape, out)
    })
}

struct ConstantOfShapeKernel {
    value: Tensor,
}

impl Kernel for ConstantOfShapeKernel {
    fn run(&self, inputs: &[Option<&Tensor>], ctx: &mut RunCtx) -> Result<Vec<Tensor>> {
        let shape = to_dims(&required(inputs, 0)?.to_i64_vec()?, "ConstantOfShape shape")?;
        Ok(vec![filled(&self.value, shape, ctx)?])
    }
}

pub fn infer_constant_of_shape(ctx: &InferCtx) -> Result<Vec<TypeInfo>> {
    let dtype = fill_value(ctx.node)?.dtype();
    let shape = match const_ints(ctx, 0)? {
        Some(v) => Some(
            to_dims(&v, "shape")
                .map_err(|e| node_error(ctx.node, e.to_string()))?
                .into_iter()
                .map(Dim::Known)
                .collect(),
        ),
        None => known_len(ctx, 0).map(|n| vec![Dim::Unknown; n]),
    };
    Ok(vec![TypeInfo { dtype, shape }])
}

pub fn compile_constant_of_shape(ctx: &CompileCtx) -> Result<Box<dyn Kernel>> {
    Ok(Box::new(ConstantOfShapeKernel {
        value: fill_value(ctx.node)?,
    }))
}

/// Number of elements of `range(start, limit, delta)`.
fn range_len<T: Elem>(start: T, limit: T, delta: T) -> Result<usize> {
    let n: f64 = if T::IS_FLOAT {
        let (s, l, d) = (start.to_f64(), limit.to_f64(), delta.to_f64());
        if d == 0.0 || !d.is_finite() || !s.is_finite() || !l.is_finite() {
            return Err(Error::Shape(format!(
                "Range({s}, {l}, {d}) has no finite length"
            )));
        }
        ((l - s) / d).ceil()
    } else {
        let (s, l, d) = (
            start.to_i64() as i128,
            limit.to_i64() as i128,
            delta.to_i64() as i128,
        );
        if d == 0 {
            return Err(Error::Shape("Range delta must not be 0".into()));
        }
        let diff = l - s;
        // Ceiling division for either sign of delta.
        let q = diff / d;
        let ceil = if diff % d != 0 && ((diff > 0) == (d > 0)) {
            q + 1
        } else {
            q
        };
        ceil as f64
    };
    let n = n.max(0.0);
    if n > (crate::ir::tensor::MAX_TENSOR_BYTES / T::DTYPE.size_of()) as f64 {
        return Err(Error::TooLarge(format!("Range of {n} elements")));
    }
    Ok(n as usize)
}

fn range_typed<T: Elem>(start: &Tensor, limit: &Tensor, delta: &Tensor) -> Result<Tensor> {
    let scalar = |t: &Tensor, what: &str| -> Result<T> {
        let v = view::<T>(t).map_err(|_| {
            Error::DType(format!(
                "Range {what} is {}, expected {} like start",
                t.dtype(),
                T::DTYPE
            ))
        })?;
        match v {
            [x] => Ok(*x),
            _ => Err(Error::Shape(format!(
                "Range {what} must be a scalar, got shape {:?}",
                t.shape()
            ))),
        }
    };
    let (s, l, d) = (
        scalar(start, "start")?,
        scalar(limit, "limit")?,
        scalar(delta, "delta")?,
    );
    let n = range_len(s, l, d)?;
    let out: Vec<T> = if T::IS_FLOAT {
        let (s, d) = (s.to_f64(), d.to_f64());
        (0..n).map(|i| T::from_f64(s + i as f64 * d)).collect()
    } else {
        let (s, d) = (s.to_i64(), d.to_i64());
        (0..n)
            .map(|i| T::from_i64(s.wrapping_add((i as i64).wrapping_mul(d))))
            .collect()
    };
    tensor(vec![n], out)
}

fn range(start: &Tensor, limit: &Tensor, delta: &Tensor) -> Result<Tensor> {
    match start.dtype() {
        // stash_type 1 (the default, and the only behaviour before opset 27): compute in f32.
        DType::F16 => narrow_f16(range(&start.to_f32(), &limit.to_f32(), &delta.to_f32())?),
        DType::Bool => Err(Error::DType(format!(
            "Range does not support {}",
            start.dtype()
        ))),
        dt => with_any_type!(dt, |T| range_typed::<T>(start, limit, delta)),
    }
}

struct RangeKernel;

impl Kernel for RangeKernel {
    fn run(&self, inputs: &[Option<&Tensor>], _ctx: &mut RunCtx) -> Result<Vec<Tensor>> {
        Ok(vec![range(
            required(inputs, 0)?,
            required(inputs, 1)?,
            required(inputs, 2)?,
        )?])
    }
}

pub fn infer_range(ctx: &InferCtx) -> Result<Vec<TypeInfo>> {
    let dtype = ctx.input_type(0)?.dtype;
    let len = match (ctx.constant(0), ctx.constant(1), ctx.constant(2)) {
        (Some(s), Some(l), Some(d)) => Dim::Known(
            range(s, l, d)
                .map_err(|e| node_error(ctx.node, e.to_string()))?
                .numel(),
        ),
        _ => Dim::Unknown,
    };
    Ok(vec![TypeInfo::new(dtype, vec![len])])
}

pub fn compile_range(_ctx: &CompileCtx) -> Result<Box<dyn Kernel>> {
    Ok(Box::new(RangeKernel))
}

/// The tensor a Constant node holds.
fn constant_value(node: &Node) -> Result<Tensor> {
    if let Some(t) = node.attr_tensor("value")? {
        return Ok(t.clone());
    }
    if let Some(v) = node.attr_float("value_float")? {
        return Ok(Tensor::scalar_f32(v));
    }
    if let Some(v) = node.attr_floats("value_floats")? {
        return Tensor::from_f32(vec![v.len()], v.to_vec());
    }
    if let Some(v) = node.attr_int("value_int")? {
        return Ok(Tensor::scalar_i64(v));
    }
    if let Some(v) = node.attr_ints("value_ints")? {
        return Tensor::from_i64(vec![v.len()], v.to_vec());
    }
    let kind = ["sparse_value", "value_string", "value_strings"]
        .into_iter()
        .find(|k| node.attrs.contains_key(*k));
    Err(node_error(
        node,
        match kind {
            Some(k) => format!("Constant with '{k}' is not supported"),
            None => "Constant has no value attribute".into(),
        },
    ))
}

struct ConstantKernel(Tensor);

impl Kernel for ConstantKernel {
    fn run(&self, _inputs: &[Option<&Tensor>], _ctx: &mut RunCtx) -> Result<Vec<Tensor>> {
        Ok(vec![self.0.clone()])
    }
}

pub fn infer_constant(ctx: &InferCtx) -> Result<Vec<TypeInfo>> {
    let t = constant_value(ctx.node)?;
    Ok(vec![TypeInfo::known(t.dtype(), t.shape())])
}

pub fn compile_constant(ctx: &CompileCtx) -> Result<Box<dyn Kernel>> {
    Ok(Box::new(ConstantKernel(constant_value(ctx.node)?)))
}

#[cfg(test)]
mod tests {
    use crate::ir::{Attr, DType, Dim, Tensor, TensorData, TypeInfo};
    use crate::ops::testutil::*;

    #[test]
    fn shape_with_start_end() {
        let x = iota(&[2, 3, 4]);
        let out = run("Shape", 14, &[], vec![x.clone()], 1).unwrap();
        assert_eq!(out[0].as_i64().unwrap(), &[2, 3, 4]);
        let out = run("Shape", 15, &[("start", Attr::Int(-2))], vec![x.clone()], 1).unwrap();
        assert_eq!(out[0].as_i64().unwrap(), &[3, 4]);
        let out = run(
            "Shape",
            15,
            &[("start", Attr::Int(1)), ("end", Attr::Int(-1))],
            vec![x.clone()],
            1,
        )
        .unwrap();
        assert_eq!(out[0].as_i64().unwrap(), &[3]);
        let out = run("Shape", 15, &[("start", Attr::Int(10))], vec![x.clone()], 1).unwrap();
        assert_eq!(out[0].shape(), &[0]);
        let out = run("Size", 13, &[], vec![x], 1).unwrap();
        assert_eq!(out[0].as_i64().unwrap(), &[24]);
        let ty = TypeInfo::new(DType::F32, vec![sym("b"), Dim::Known(3)]);
        let out = infer("Shape", 15, &[], vec![Some(ty)], vec![], 1).unwrap();
        assert_eq!(out[0], TypeInfo::known(DType::I64, &[2]));
    }

    #[test]
    fn constant_of_shape() {
        let (s, v) = run_f32("ConstantOfShape", 9, &[], vec![i64t(&[2], &[2, 2])]);
        assert_eq!((s, v), (vec![2, 2], vec![0.; 4]));
        let value = Tensor::from_i64(vec![1], vec![7]).unwrap();
        let out = run(
            "ConstantOfShape",
            9,
            &[("value", Attr::Tensor(value))],
            vec![i64t(&[0], &[])],
            1,
        )
        .unwrap();
        assert_eq!(out[0].shape(), &[] as &[usize]);
        assert_eq!(out[0].as_i64().unwrap(), &[7]);
        assert!(run("ConstantOfShape", 9, &[], vec![i64t(&[1], &[-1])], 1).is_err());
        let out = infer(
            "ConstantOfShape",
            9,
            &[],
            vec![Some(TypeInfo::known(DType::I64, &[3]))],
            vec![],
            1,
        )
        .unwrap();
        assert_eq!(out[0].shape, Some(vec![Dim::Unknown; 3]));
    }

    #[test]
    fn range_lengths_and_types() {
        let r = |s: i64, l: i64, d: i64| {
            run(
                "Range",
                11,
                &[],
                vec![i64t(&[], &[s]), i64t(&[], &[l]), i64t(&[], &[d])],
                1,
            )
            .unwrap()
            .remove(0)
            .as_i64()
            .unwrap()
            .to_vec()
        };
        assert_eq!(r(3, 9, 3), vec![3, 6]);
        assert_eq!(r(10, 4, -2), vec![10, 8, 6]);
        assert_eq!(r(0, 5, 2), vec![0, 2, 4]);
        assert_eq!(r(5, 0, 1), Vec::<i64>::new());
        let (_, v) = run_f32(
            "Range",
            11,
            &[],
            vec![f32t(&[], &[1.0]), f32t(&[], &[2.0]), f32t(&[], &[0.25])],
        );
        assert_eq!(v, vec![1.0, 1.25, 1.5, 1.75]);
        assert!(run(
            "Range",
            11,
            &[],
            vec![i64t(&[], &[0]), i64t(&[], &[5]), i64t(&[], &[0])],
            1
        )
        .is_err());
        let i32s = |v: i32| Some(Tensor::new(vec![], TensorData::I32(vec![v])).unwrap());
        let out = run("Range", 11, &[], vec![i32s(0), i32s(3), i32s(1)], 1).unwrap();
        assert_eq!(out[0].data(), &TensorData::I32(vec![0, 1, 2]));
        use crate::ir::dtype::f32_to_f16;
        let h = |v: f32| Some(Tensor::new(vec![], TensorData::F16(vec![f32_to_f16(v)])).unwrap());
        let out = run("Range", 11, &[], vec![h(1.0), h(2.0), h(0.5)], 1).unwrap();
        assert_eq!(
            out[0].data(),
            &TensorData::F16(vec![f32_to_f16(1.0), f32_to_f16(1.5)])
        );
    }

    #[test]
    fn constant_attributes() {
        let out = run(
            "Constant",
            13,
            &[("value_ints", Attr::Ints(vec![1, 2]))],
            vec![],
            1,
        )
        .unwrap();
        assert_eq!(out[0].as_i64().unwrap(), &[1, 2]);
        let out = run(
            "Constant",
            13,
            &[("value_float", Attr::Float(0.5))],
            vec![],
            1,
        )
        .unwrap();
        assert_eq!(out[0].as_f32().unwrap(), &[0.5]);
        let t = Tensor::from_f32(vec![2, 1], vec![1., 2.]).unwrap();
        let out = run(
            "Constant",
            13,
            &[("value", Attr::Tensor(t.clone()))],
            vec![],
            1,
        )
        .unwrap();
        assert_eq!(out[0], t);
        let err = run(
            "Constant",
            13,
            &[("value_string", Attr::String("x".into()))],
            vec![],
            1,
        )
        .unwrap_err();
        assert!(err.to_string().contains("value_string"), "{err}");
    }
}
