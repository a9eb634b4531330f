//! ONNX pooling, 1-D and 2-D: `MaxPool` (opsets 1-21; the optional `Indices` output is not
//! supported), `AveragePool` (1-21, with `count_include_pad`, `ceil_mode` and, from opset 19,
//! `dilations`), and `GlobalAveragePool` / `GlobalMaxPool` (1-21, any rank).

use super::{alloc_output, data, f32_input, nchw, require_f32, Window};
use crate::error::Result;
use crate::ir::{DType, Dim, Node, Tensor, TypeInfo};
use crate::kernels::pool::{global_pool, pool2d, Pool2dGeom, PoolKind};
use crate::ops::quantized::lut::{CodeTable, MaxPoolLutKernel};
use crate::ops::{node_error, CompileCtx, InferCtx, Kernel, OpDef, RunCtx};

const fn def(
    op_type: &'static str,
    infer: crate::ops::InferFn,
    compile: crate::ops::CompileFn,
) -> OpDef {
    OpDef {
        op_type,
        domain: "",
        opsets: (1, 21),
        infer,
        compile,
        fuses_activation: false,
    }
}

pub const MAX_POOL: OpDef = def("MaxPool", infer_pool, compile_pool);
pub const AVERAGE_POOL: OpDef = def("AveragePool", infer_pool, compile_pool);
pub const GLOBAL_AVERAGE_POOL: OpDef = def("GlobalAveragePool", infer_global, compile_global);
pub const GLOBAL_MAX_POOL: OpDef = def("GlobalMaxPool", infer_global, compile_global);

/// Parsed attributes of a windowed pool.
pub(super) struct PoolAttrs {
    pub window: Window,
    pub kind: PoolKind,
    pub ceil_mode: bool,
}

pub(super) fn pool_attrs(node: &Node) -> Result<PoolAttrs> {
    let kernel = match node.attr_ints("kernel_shape")? {
        Some(k) if !k.is_empty() && k.iter().all(|&x| x > 0) => {
            k.iter().map(|&x| x as usize).collect()
        }
        Some(k) => {
            return Err(node_error(
                node,
                format!("kernel_shape {k:?} must be non-empty and positive"),
            ))
        }
        None => return Err(node_error(node, "attribute 'kernel_shape' is required")),
    };
    if node.op_type == "MaxPool" && node.outputs.get(1).is_some_and(|o| !o.is_empty()) {
        return Err(node_error(
            node,
            "the optional Indices output of MaxPool is not supported",
        ));
    }
    let kind = if node.op_type == "MaxPool" {
        PoolKind::Max
    } else {
        PoolKind::Avg {
            count_include_pad: node.attr_int_or("count_include_pad", 0)? != 0,
        }
    };
    Ok(PoolAttrs {
        window: Window::parse(node, kernel)?,
        kind,
        ceil_mode: node.attr_int_or("ceil_mode", 0)? != 0,
    })
}

fn infer_pool(ctx: &InferCtx) -> Result<Vec<TypeInfo>> {
    let node = ctx.node;
    let at = pool_attrs(node)?;
    let x = ctx.input_type(0)?;
    let Some(xs) = &x.shape else {
        return Ok(vec![TypeInfo::unknown_shape(x.dtype)]);
    };
    if xs.len() != at.window.rank() + 2 {
        return Err(node_error(
            node,
            format!(
                "input rank {} does not match the {}-D kernel_shape",
                xs.len(),
                at.window.rank()
            ),
        ));
    }
    let mut out = xs[..2].to_vec();
    out.extend(at.window.out_dims(node, &xs[2..], at.ceil_mode)?);
    Ok(vec![TypeInfo::new(x.dtype, out)])
}

/// A pooling node's windows resolved for one input shape, exactly as the f32 kernel runs
/// them; integer max pooling on quantized codes uses the same resolution so that its windows
/// (and the windows that cover only padding) match the f32 path's.
#[derive(Clone, Debug)]
pub struct PoolShape {
    /// `n * c`.
    pub planes: usize,
    pub hw: [usize; 2],
    pub geom: Pool2dGeom,
    /// `[n, c, oh, ow]`, or `[n, c, ow]` for a 1-D pool.
    pub out_shape: Vec<usize>,
}

/// The parsed attributes of a 1-D or 2-D `MaxPool` / `AveragePool` node (kernel, strides,
/// pads, `auto_pad`, dilations, `ceil_mode`).
pub struct PoolWindow {
    node: Node,
    at: PoolAttrs,
}

impl PoolWindow {
    pub fn parse(node: &Node) -> Result<PoolWindow> {
        let at = pool_attrs(node)?;
        if at.window.rank() > 2 {
            return Err(node_error(node, "only 1-D and 2-D pooling is supported"));
        }
        Ok(PoolWindow {
            node: node.clone(),
            at,
        })
    }

    pub fn kind(&self) -> PoolKind {
        self.at.kind
    }

    /// The geometry for an input of shape `shape`, with errors naming the node.
    pub fn resolve(&self, shape: &[usize]) -> Result<PoolShape> {
        let node = &self.node;
        if shape.len() != self.at.window.rank() + 2 {
            return Err(node_error(
                node,
                format!(
                    "input of shape {shape:?} does not match the {}-D kernel_shape",
                    self.at.window.rank()
                ),
            ));
        }
        let [n, c, h, w] = nchw(node, shape)?;
        let (kernel, stride, dilation, pads) = self.at.window.as_2d([h, w]);
        let geom = Pool2dGeom {
            kernel,
            stride,
            dilation,
            pads,
            ceil_mode: self.at.ceil_mode,
        };
        let (oh, ow) = geom.out_hw(h, w).map_err(|e| e.at_node(node))?;
        let out_shape = if shape.len() == 3 {
            vec![n, c, ow]
        } else {
            vec![n, c, oh, ow]
        };
        Ok(PoolShape {
            planes: n * c,
            hw: [h, w],
            geom,
            out_shape,
        })
    }
}

struct PoolKernel(PoolWindow);

fn compile_pool(ctx: &CompileCtx) -> Result<Box<dyn Kernel>> {
    let node = ctx.node;
    // MaxPool takes 8-bit codes from opset 12 (a quantized model pools them between two
    // integer convolutions), as ONNX Runtime does.
    if let Some(dt @ (DType::U8 | DType::I8)) = ctx.input_type(0).map(|t| t.dtype) {
        if node.op_type == "MaxPool" {
            return Ok(Box::new(max_pool_of_codes(node, dt)?));
        }
    }
    require_f32(node, ctx.input_type(0), 0)?;
    let f32_pool = PoolKernel(PoolWindow::parse(node)?);
    // Input type unknown until run time (a QLinearConv's output in a file without value
    // types, say): a MaxPool may still be handed codes.
    if node.op_type == "MaxPool" && ctx.input_type(0).is_none() {
        return Ok(Box::new(AnyMaxPool {
            f32_pool,
            u8_pool: max_pool_of_codes(node, DType::U8)?,
            i8_pool: max_pool_of_codes(node, DType::I8)?,
        }));
    }
    Ok(Box::new(f32_pool))
}

/// MaxPool on 8-bit codes of type `dt`: the integer pool with the identity table, a window
/// over only padding giving the type's lowest code.
fn max_pool_of_codes(node: &Node, dt: DType) -> Result<MaxPoolLutKernel> {
    let identity = CodeTable::from_outputs(dt, &CodeTable::all_codes(dt)?)?;
    let lowest = if dt == DType::I8 { 0x80 } else { 0 };
    MaxPoolLutKernel::new(node, node, identity, lowest)
}

/// MaxPool compiled before its input's type is known: picks the pool by the input's type.
struct AnyMaxPool {
    f32_pool: PoolKernel,
    u8_pool: MaxPoolLutKernel,
    i8_pool: MaxPoolLutKernel,
}

impl Kernel for AnyMaxPool {
    fn run(&self, inputs: &[Option<&Tensor>], ctx: &mut RunCtx) -> Result<Vec<Tensor>> {
        match inputs.first().copied().flatten().map(Tensor::dtype) {
            Some(DType::U8) => self.u8_pool.run(inputs, ctx),
            Some(DType::I8) => self.i8_pool.run(inputs, ctx),
            _ => self.f32_pool.run(inputs, ctx),
        }
    }
}

impl Kernel for PoolKernel {
    fn run(&self, inputs: &[Option<&Tensor>], ctx: &mut RunCtx) -> Result<Vec<Tensor>> {
        let node = &self.0.node;
        let x = f32_input(node, inputs, 0)?;
        let s = self.0.resolve(x.shape())?;
        let [h, w] = s.hw;
        let mut out = alloc_output(node, ctx, &s.out_shape)?;
        pool2d(&s.geom, self.0.at.kind, data(x), [s.planes, h, w], &mut out)
            .map_err(|e| e.at_node(node))?;
        Ok(vec![Tensor::from_f32(s.out_shape, out)?])
    }
}

fn infer_global(ctx: &InferCtx) -> Result<Vec<TypeInfo>> {
    let x = ctx.input_type(0)?;
    let Some(xs) = &x.shape else {
        return Ok(vec![TypeInfo::unknown_shape(x.dtype)]);
    };
    if xs.len() < 2 {
        return Err(node_error(
            ctx.node,
            format!("input rank {} is below 2", xs.len()),
        ));
    }
    let mut out = xs[..2].to_vec();
    out.extend(std::iter::repeat_n(Dim::Known(1), xs.len() - 2));
    Ok(vec![TypeInfo::new(x.dtype, out)])
}

struct GlobalKernel {
    node: Node,
    kind: PoolKind,
}

fn compile_global(ctx: &CompileCtx) -> Result<Box<dyn Kernel>> {
    require_f32(ctx.node, ctx.input_type(0), 0)?;
    let kind = if ctx.node.op_type == "GlobalMaxPool" {
        PoolKind::Max
    } else {
        PoolKind::Avg {
            count_include_pad: false,
        }
    };
    Ok(Box::new(GlobalKernel {
        node: ctx.node.clone(),
        kind,
    }))
}

impl Kernel for GlobalKernel {
    fn run(&self, inputs: &[Option<&Tensor>], ctx: &mut RunCtx) -> Result<Vec<Tensor>> {
        let node = &self.node;
        let x = f32_input(node, inputs, 0)?;
        let s = x.shape();
        if s.len() < 2 {
            return Err(node_error(
                node,
                format!("input of shape {s:?} has rank below 2"),
            ));
        }
        let planes = s[0] * s[1];
        let mut out = alloc_output(node, ctx, &[planes])?;
        global_pool(
            self.kind,
            data(x),
            planes,
            s[2..].iter().product(),
            &mut out,
        )
        .map_err(|e| e.at_node(node))?;
        let mut shape = s[..2].to_vec();
        shape.resize(s.len(), 1);
        Ok(vec![Tensor::from_f32(shape, out)?])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::{Attr, DType, TensorData};
    use crate::ops::nn::test_support::{infer, node, run};

    fn t(shape: &[usize], v: Vec<f32>) -> Tensor {
        Tensor::from_f32(shape.to_vec(), v).unwrap()
    }

    /// MaxPool on 8-bit codes (opset 12+, as quantized models write it between integer
    /// convolutions) equals the f32 pool of the codes, padding included.
    #[test]
    fn max_pool_of_codes_matches_f32() {
        let attrs = [
            ("kernel_shape", Attr::Ints(vec![3, 3])),
            ("strides", Attr::Ints(vec![2, 2])),
            ("pads", Attr::Ints(vec![1, 1, 1, 1])),
        ];
        let mut n = node("MaxPool", 1);
        for (k, v) in attrs.iter().cloned() {
            n = n.with_attr(k, v);
        }
        let shape = [2, 3, 7, 6];
        let count: usize = shape.iter().product();
        let codes: Vec<u8> = (0..count).map(|i| (i * 37 % 256) as u8).collect();
        for signed in [false, true] {
            let (x, as_f32): (Tensor, Vec<f32>) = if signed {
                let v: Vec<i8> = codes.iter().map(|&c| c as i8).collect();
                let f = v.iter().map(|&c| f32::from(c)).collect();
                (Tensor::new(shape.to_vec(), TensorData::I8(v)).unwrap(), f)
            } else {
                let f = codes.iter().map(|&c| f32::from(c)).collect();
                (
                    Tensor::new(shape.to_vec(), TensorData::U8(codes.clone())).unwrap(),
                    f,
                )
            };
            let got = run(&n, 12, &[Some(&x)], &[false], None).unwrap();
            let want = run(&n, 12, &[Some(&t(&shape, as_f32))], &[false], None).unwrap();
            assert_eq!(got[0].dtype(), x.dtype());
            assert_eq!(got[0].shape(), want[0].shape());
            let got: Vec<f32> = got[0]
                .to_i64_vec()
                .unwrap()
                .iter()
                .map(|&v| v as f32)
                .collect();
            assert_eq!(&got, want[0].as_f32().unwrap(), "signed {signed}");
        }
    }

    #[test]
    fn max_pool_of_an_untyped_input_takes_codes_and_floats() {
        // lithe's own `--lookup-tables` QOperator files pool a QLinearConv's output, whose
        // type the file does not declare: compiled untyped, the pool must still take codes.
        let n = node("MaxPool", 1).with_attr("kernel_shape", Attr::Ints(vec![2, 2]));
        let kernel = (crate::ops::lookup(&n, 13).unwrap().compile)(&CompileCtx {
            node: &n,
            opset: 13,
            input_types: vec![None],
            constants: vec![None],
            fused_activation: None,
        })
        .unwrap();
        let codes: Vec<u8> = (0..2 * 16).map(|i| (i * 37 % 256) as u8).collect();
        let mut ctx = RunCtx::default();
        for x in [
            Tensor::new(vec![1, 2, 4, 4], TensorData::U8(codes.clone())).unwrap(),
            Tensor::new(
                vec![1, 2, 4, 4],
                TensorData::I8(codes.iter().map(|&c| c as i8).collect()),
            )
            .unwrap(),
            t(&[1, 2, 4, 4], codes.iter().map(|&c| f32::from(c)).collect()),
        ] {
            let got = kernel.run(&[Some(&x)], &mut ctx).unwrap();
            let want = run(&n, 13, &[Some(&x)], &[false], None).unwrap();
            assert_eq!(got[0].dtype(), x.dtype());
            assert_eq!(got[0].to_f32_vec(), want[0].to_f32_vec());
        }
    }

    #[test]
    fn empty_spatial_axes_are_errors_as_in_onnx_runtime() {
        // SAME padding made one output of an empty axis, which the kernels then split into
        // zero-sized chunks (a panic the fuzzer found); ONNX Runtime refuses such inputs.
        let x = Tensor::from_f32(vec![1, 2, 0, 3], vec![]).unwrap();
        let w = Tensor::from_f32(vec![2, 1, 3, 3], vec![0.5; 18]).unwrap();
        for (op, inputs) in [("MaxPool", 1), ("AveragePool", 1), ("Conv", 2)] {
            let mut n = node(op, inputs)
                .with_attr("kernel_shape", Attr::Ints(vec![3, 3]))
                .with_attr("auto_pad", Attr::String("SAME_UPPER".into()));
            if op == "Conv" {
                n = n.with_attr("group", Attr::Int(2));
            }
            let args = [Some(&x), Some(&w)];
            let e = run(&n, 13, &args[..inputs], &[false, true][..inputs], None).err();
            let msg = e.map(|e| e.to_string()).unwrap_or_default();
            assert!(msg.contains("empty spatial axis"), "{op}: {msg}");
        }
    }

    #[test]
    fn max_pool_of_codes_with_hostile_pads_is_an_error_not_an_allocation() {
        let x = Tensor::new(vec![1, 2, 4, 4], TensorData::U8(vec![7; 32])).unwrap();
        for pad in [1i64 << 16, 1 << 30, i64::MAX] {
            let n = node("MaxPool", 1)
                .with_attr("kernel_shape", Attr::Ints(vec![2, 2]))
                .with_attr("pads", Attr::Ints(vec![pad; 4]));
            let e = run(&n, 12, &[Some(&x)], &[false], None).err();
            let msg = e.map(|e| e.to_string()).unwrap_or_default();
            assert!(msg.contains("too large"), "pads {pad}: {msg}");
        }
    }

    fn ramp(shape: &[usize]) -> Tensor {
        let n = shape.iter().product::<usize>();
        t(shape, (1..=n).map(|v| v as f32).collect())
    }

    #[test]
    fn max_and_average_hand_checked() {
        let x = ramp(&[1, 1, 4, 4]);
        let n = node("MaxPool", 1)
            .with_attr("kernel_shape", Attr::Ints(vec![2, 2]))
            .with_attr("strides", Attr::Ints(vec![2, 2]));
        let out = run(&n, 12, &[Some(&x)], &[false], None).unwrap();
        assert_eq!(out[0].shape(), &[1, 1, 2, 2]);
        assert_eq!(out[0].as_f32().unwrap(), &[6., 8., 14., 16.]);
        let n = node("AveragePool", 1)
            .with_attr("kernel_shape", Attr::Ints(vec![3, 3]))
            .with_attr("pads", Attr::Ints(vec![1, 1, 1, 1]))
            .with_attr("strides", Attr::Ints(vec![2, 2]));
        let out = run(&n, 11, &[Some(&x)], &[false], None).unwrap();
        // Top-left window sees 1, 2, 5, 6 (excluding pads: / 4).
        assert_eq!(out[0].as_f32().unwrap(), &[3.5, 5., 9.5, 11.]);
        let n = n.with_attr("count_include_pad", Attr::Int(1));
        let out = run(&n, 11, &[Some(&x)], &[false], None).unwrap();
        assert_eq!(out[0].as_f32().unwrap()[0], 14.0 / 9.0);
    }

    #[test]
    fn one_d_auto_pad_and_ceil_mode() {
        let x = ramp(&[1, 2, 5]);
        let n = node("MaxPool", 1)
            .with_attr("kernel_shape", Attr::Ints(vec![2]))
            .with_attr("strides", Attr::Ints(vec![2]))
            .with_attr("ceil_mode", Attr::Int(1));
        let out = run(&n, 12, &[Some(&x)], &[false], None).unwrap();
        assert_eq!(out[0].shape(), &[1, 2, 3]);
        assert_eq!(out[0].as_f32().unwrap(), &[2., 4., 5., 7., 9., 10.]);
        let n = node("MaxPool", 1)
            .with_attr("kernel_shape", Attr::Ints(vec![3]))
            .with_attr("auto_pad", Attr::String("SAME_UPPER".into()));
        let out = run(&n, 12, &[Some(&x)], &[false], None).unwrap();
        assert_eq!(
            out[0].as_f32().unwrap(),
            &[2., 3., 4., 5., 5., 7., 8., 9., 10., 10.]
        );
    }

    #[test]
    fn global_pools() {
        let x = ramp(&[2, 3, 2, 2]);
        let out = run(
            &node("GlobalAveragePool", 1),
            1,
            &[Some(&x)],
            &[false],
            None,
        )
        .unwrap();
        assert_eq!(out[0].shape(), &[2, 3, 1, 1]);
        assert_eq!(
            out[0].as_f32().unwrap(),
            &[2.5, 6.5, 10.5, 14.5, 18.5, 22.5]
        );
        let out = run(&node("GlobalMaxPool", 1), 1, &[Some(&x)], &[false], None).unwrap();
        assert_eq!(out[0].as_f32().unwrap(), &[4., 8., 12., 16., 20., 24.]);
        let ty = infer(
            &node("GlobalAveragePool", 1),
            13,
            vec![Some(TypeInfo::new(
                DType::F32,
                vec![
                    Dim::Sym("N".into()),
                    Dim::Known(8),
                    Dim::Unknown,
                    Dim::Known(7),
                ],
            ))],
            &[],
        )
        .unwrap();
        assert_eq!(
            ty[0].shape.as_deref().unwrap(),
            &[
                Dim::Sym("N".into()),
                Dim::Known(8),
                Dim::Known(1),
                Dim::Known(1)
            ]
        );
    }

    #[test]
    fn hostile_attributes_are_errors_not_panics() {
        let x = ramp(&[1, 1, 4, 4]);
        for (key, value) in [
            ("kernel_shape", Attr::Ints(vec![i64::MAX, 1])),
            ("pads", Attr::Ints(vec![1 << 40, 1 << 40, 1 << 40, 1 << 40])),
            ("strides", Attr::Ints(vec![-1, 1])),
            ("dilations", Attr::Ints(vec![1 << 62, 1])),
        ] {
            for op in ["MaxPool", "AveragePool"] {
                let n = node(op, 1)
                    .with_attr("kernel_shape", Attr::Ints(vec![2, 2]))
                    .with_attr(key, value.clone());
                assert!(
                    run(&n, 19, &[Some(&x)], &[false], None).is_err(),
                    "{op} {key}"
                );
            }
        }
    }

    #[test]
    fn indices_output_and_missing_kernel_are_errors() {
        let mut n = node("MaxPool", 1).with_attr("kernel_shape", Attr::Ints(vec![2, 2]));
        n.outputs.push("indices".into());
        let x = ramp(&[1, 1, 4, 4]);
        let err = run(&n, 12, &[Some(&x)], &[false], None)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("Indices") && err.contains("n0"), "{err}");
        assert!(run(&node("AveragePool", 1), 12, &[Some(&x)], &[false], None).is_err());
        let ty = infer(
            &node("MaxPool", 1)
                .with_attr("kernel_shape", Attr::Ints(vec![2, 2]))
                .with_attr("strides", Attr::Ints(vec![2, 2])),
            12,
            vec![Some(TypeInfo::new(
                DType::F32,
                vec![
                    Dim::Sym("N".into()),
                    Dim::Known(32),
                    Dim::Known(28),
                    Dim::Sym("W".into()),
                ],
            ))],
            &[],
        )
        .unwrap();
        assert_eq!(
            ty[0].shape.as_deref().unwrap(),
            &[
                Dim::Sym("N".into()),
                Dim::Known(32),
                Dim::Known(14),
                Dim::Unknown
            ]
        );
    }
}
