//! ONNX `QLinearMatMul` (opsets 10-21) and `MatMulInteger` (10-21) for a 2-D B (weights),
//! per-tensor or per-column B parameters, A of any rank (leading dims are rows). B is packed
//! once when constant.

use super::engine::{matmul_rows, shift_i8_to_u8, IntConv, OutputStage};
use super::params::{dtype_range, present, read_qparams, weights_as_i8};
use super::prepared;
use crate::error::Result;
use std::sync::Arc;

use crate::ir::{DType, Dim, Node, Tensor, TensorData, TypeInfo};
use crate::kernels::conv::Conv2dGeom;
use crate::kernels::qgemm::{float_scales, PackedB, WxElem};
use crate::ops::{node_error, required, CompileCtx, InferCtx, Kernel, OpDef, RunCtx};
use crate::quant::QStore;

pub const QLINEAR_MATMUL: OpDef = OpDef {
    op_type: "QLinearMatMul",
    domain: "",
    opsets: (10, 21),
    infer: infer_qlinear,
    compile: compile_qlinear,
    fuses_activation: false,
};

pub const MATMUL_INTEGER: OpDef = OpDef {
    op_type: "MatMulInteger",
    domain: "",
    opsets: (10, 21),
    infer: infer_integer,
    compile: compile_integer,
    fuses_activation: false,
};

fn out_type(ctx: &InferCtx, b_index: usize, dtype: DType) -> Result<Vec<TypeInfo>> {
    let a = ctx.input_type(0)?;
    let b = ctx.input_type(b_index)?;
    let (Some(as_), Some(bs)) = (&a.shape, &b.shape) else {
        return Ok(vec![TypeInfo::unknown_shape(dtype)]);
    };
    if bs.len() != 2 || as_.is_empty() {
        return Ok(vec![TypeInfo::unknown_shape(dtype)]);
    }
    let mut out: Vec<Dim> = as_[..as_.len() - 1].to_vec();
    out.push(bs[1].clone());
    Ok(vec![TypeInfo::new(dtype, out)])
}

fn infer_qlinear(ctx: &InferCtx) -> Result<Vec<TypeInfo>> {
    let dt = ctx
        .input_types
        .get(7)
        .cloned()
        .flatten()
        .map(|t| t.dtype)
        .unwrap_or(DType::U8);
    out_type(ctx, 3, dt)
}

fn infer_integer(ctx: &InferCtx) -> Result<Vec<TypeInfo>> {
    out_type(ctx, 1, DType::I32)
}

struct Prepared {
    b: Arc<Product>,
    a_zp: u8,
    a_signed: bool,
    stage: OutputStage,
    out_dtype: DType,
}

/// How the product runs.
enum Product {
    /// As a 1x1 convolution over `m` one-pixel images with `k` channels, which is exactly A's
    /// row-major layout (and C's): the NCHW integer engines then batch all rows into one GEMM.
    Conv {
        conv: Box<IntConv>,
        k: usize,
        n: usize,
    },
    /// The row-major GEMM (CPUs without AVX2).
    Rows(PackedB),
}

impl Product {
    fn k(&self) -> usize {
        match self {
            Product::Conv { k, .. } => *k,
            Product::Rows(b) => b.k(),
        }
    }

    fn n(&self) -> usize {
        match self {
            Product::Conv { n, .. } => *n,
            Product::Rows(b) => b.n(),
        }
    }
}

/// Prefers the NCHW engine when this CPU has a fast path for it; B is packed for one engine
/// only.
fn prepare_product(node: &Node, b: &Tensor, zps: &[i32], stage: &OutputStage) -> Result<Product> {
    let &[k, n] = b.shape() else {
        return Err(node_error(
            node,
            format!("B of shape {:?}: only a 2-D B is supported", b.shape()),
        ));
    };
    if zps.len() != 1 && zps.len() != n {
        return Err(node_error(
            node,
            format!("{} B zero points for {n} columns", zps.len()),
        ));
    }
    let (values, zps) = weights_as_i8(node, b, zps, "B")?;
    let err = |e: crate::error::Error| node_error(node, e.to_string());
    if k == 0 || n == 0 {
        // The packing's own check names the empty B.
        return PackedB::from_kn(&values, k, n, &zps)
            .map(Product::Rows)
            .map_err(err);
    }
    let mut w_nk = vec![0i8; k * n];
    for (kk, row) in values.chunks_exact(n).enumerate() {
        for (j, &v) in row.iter().enumerate() {
            w_nk[j * k + kk] = v;
        }
    }
    let geom = Conv2dGeom {
        c_in: k,
        c_out: n,
        groups: 1,
        kernel: [1, 1],
        stride: [1, 1],
        dilation: [1, 1],
        pads: [0; 4],
    };
    let conv = IntConv::new(geom, &w_nk, &zps, stage.clone()).map_err(err)?;
    if conv.has_fast_path() {
        return Ok(Product::Conv {
            conv: Box::new(conv),
            k,
            n,
        });
    }
    PackedB::from_kn(&values, k, n, &zps)
        .map(Product::Rows)
        .map_err(err)
}

fn a_zero_point(node: &Node, zp: i32, dtype: DType) -> Result<(u8, bool)> {
    match dtype {
        DType::U8 => Ok((zp as u8, false)),
        DType::I8 => Ok(((zp + 128) as u8, true)),
        other => Err(node_error(node, format!("A must be u8 or i8, got {other}"))),
    }
}

#[allow(clippy::too_many_arguments)]
fn prepare_qlinear(
    node: &Node,
    a_scale: &Tensor,
    a_zp: Option<&Tensor>,
    b: &Tensor,
    b_scale: &Tensor,
    b_zp: Option<&Tensor>,
    y_scale: &Tensor,
    y_zp: Option<&Tensor>,
) -> Result<Prepared> {
    let ap = read_qparams(node, a_scale, a_zp, DType::U8, "a")?;
    let bp = read_qparams(node, b_scale, b_zp, b.dtype(), "b")?;
    let yp = read_qparams(node, y_scale, y_zp, DType::U8, "y")?;
    if !ap.is_per_tensor() || !yp.is_per_tensor() {
        return Err(node_error(
            node,
            "A and the output must be quantized per tensor",
        ));
    }
    let n = b.shape().get(1).copied().unwrap_or(0);
    if !bp.is_per_tensor() && bp.scales.len() != n {
        return Err(node_error(
            node,
            format!("{} B scales for {n} columns", bp.scales.len()),
        ));
    }
    let (a_zp, a_signed) = a_zero_point(node, ap.zero_points[0], ap.dtype)?;
    let (qmin, qmax) = match yp.dtype {
        DType::U8 | DType::I8 => dtype_range(yp.dtype).unwrap_or((0, 255)),
        other => {
            return Err(node_error(
                node,
                format!("output must be u8 or i8, got {other}"),
            ))
        }
    };
    let stage = OutputStage::Requant {
        scales: float_scales(ap.scales[0], &bp.scales, yp.scales[0]),
        zero_point: yp.zero_points[0],
        qmin,
        qmax,
        bias: None,
    };
    Ok(Prepared {
        b: Arc::new(prepare_product(node, b, &bp.zero_points, &stage)?),
        a_zp,
        a_signed,
        stage,
        out_dtype: yp.dtype,
    })
}

/// A's zero point as `MatMulInteger` gives it: absent (0) or one value.
fn integer_a_zero_point(node: &Node, a_zp: Option<&Tensor>) -> Result<i32> {
    match a_zp {
        None => Ok(0),
        Some(z) if z.numel() == 1 => Ok(z.to_i64_vec()?[0] as i32),
        Some(_) => Err(node_error(
            node,
            "only a per-tensor A zero point is supported",
        )),
    }
}

/// B and its zero points packed for `MatMulInteger`.
fn integer_product(node: &Node, b: &Tensor, b_zp: Option<&Tensor>) -> Result<Product> {
    let zb: Vec<i32> = match b_zp {
        None => vec![0],
        Some(z) => z.to_i64_vec()?.into_iter().map(|v| v as i32).collect(),
    };
    prepare_product(node, b, &zb, &OutputStage::Int32)
}

/// `MatMulInteger`. A's zero point is often computed (by the `DynamicQuantizeLinear` before
/// it), so B is packed once whenever B and its zero points are constants, and A's zero point
/// is read on every run.
struct MatMulInteger {
    node: Node,
    b: Option<Arc<Product>>,
}

fn compile_integer(ctx: &CompileCtx) -> Result<Box<dyn Kernel>> {
    let node = ctx.node;
    let b_zp_constant = node.input(3).is_none() || ctx.constant(3).is_some();
    let b = match (ctx.constant(1), b_zp_constant) {
        (Some(b), true) => Some(Arc::new(integer_product(node, b, ctx.constant(3))?)),
        _ => None,
    };
    Ok(Box::new(MatMulInteger {
        node: node.clone(),
        b,
    }))
}

impl Kernel for MatMulInteger {
    fn run(&self, inputs: &[Option<&Tensor>], _ctx: &mut RunCtx) -> Result<Vec<Tensor>> {
        let a = required(inputs, 0)?;
        let b = match &self.b {
            Some(b) => b.clone(),
            None => Arc::new(integer_product(
                &self.node,
                required(inputs, 1)?,
                present(inputs, 3),
            )?),
        };
        let za = integer_a_zero_point(&self.node, present(inputs, 2))?;
        let (a_zp, a_signed) = a_zero_point(&self.node, za, a.dtype())?;
        let p = Prepared {
            b,
            a_zp,
            a_signed,
            stage: OutputStage::Int32,
            out_dtype: DType::I32,
        };
        Ok(vec![p.run(&self.node, a)?])
    }
}

impl Prepared {
    /// `out = A B` (requantized or i32) for `m` rows of A.
    fn product<T: QStore + WxElem>(&self, a: &[u8], m: usize, out: &mut [T]) -> Result<()> {
        match self.b.as_ref() {
            Product::Conv { conv, .. } => conv.run(a, self.a_zp, [m, 1, 1], [0; 4], out),
            Product::Rows(b) => matmul_rows(a, m, self.a_zp, b, &self.stage, out),
        }
    }

    fn run(&self, node: &Node, a: &Tensor) -> Result<Tensor> {
        let shape = a.shape();
        let k = self.b.k();
        if shape.last() != Some(&k) {
            return Err(node_error(
                node,
                format!("A of shape {shape:?} does not have {k} columns"),
            ));
        }
        let m = a.numel() / k.max(1);
        let shifted;
        let au8: &[u8] = match (a.data(), self.a_signed) {
            (TensorData::U8(v), false) => v,
            (TensorData::I8(v), true) => {
                shifted = shift_i8_to_u8(v);
                &shifted
            }
            (other, _) => {
                return Err(node_error(
                    node,
                    format!(
                        "A is {} but its zero point is {}",
                        other.dtype(),
                        if self.a_signed { "i8" } else { "u8" }
                    ),
                ))
            }
        };
        let mut out_shape = shape[..shape.len() - 1].to_vec();
        out_shape.push(self.b.n());
        let len = m * self.b.n();
        let err = |e: crate::error::Error| node_error(node, e.to_string());
        let data = match self.out_dtype {
            DType::U8 => {
                let mut o = vec![0u8; len];
                self.product(au8, m, &mut o).map_err(err)?;
                TensorData::U8(o)
            }
            DType::I8 => {
                let mut o = vec![0i8; len];
                self.product(au8, m, &mut o).map_err(err)?;
                TensorData::I8(o)
            }
            _ => {
                let mut o = vec![0i32; len];
                self.product(au8, m, &mut o).map_err(err)?;
                TensorData::I32(o)
            }
        };
        Tensor::new(out_shape, data)
    }
}

fn compile_qlinear(ctx: &CompileCtx) -> Result<Box<dyn Kernel>> {
    prepared::compile(ctx, false, |node, _, inputs| {
        prepare_qlinear(
            node,
            required(inputs, 1)?,
            present(inputs, 2),
            required(inputs, 3)?,
            required(inputs, 4)?,
            present(inputs, 5),
            required(inputs, 6)?,
            present(inputs, 7),
        )
    })
}

impl prepared::Apply for Prepared {
    fn apply(&self, node: &Node, a: &Tensor, _: &mut RunCtx) -> Result<Tensor> {
        self.run(node, a)
    }
}

#[cfg(test)]
mod tests {
    use crate::ir::{Tensor, TensorData};
    use crate::ops::testutil::run;
    use crate::quant::linear::round_half_even;

    #[test]
    fn qlinear_matmul_matches_definition() {
        let (m, k, n) = (6, 37, 19);
        let a: Vec<u8> = (0..m * k).map(|i| ((i * 37 + 11) % 256) as u8).collect();
        let b: Vec<i8> = (0..k * n)
            .map(|i| ((i * 53 + 7) % 255) as i32 - 127)
            .map(|v| v as i8)
            .collect();
        let bs: Vec<f32> = (0..n).map(|j| 0.01 + j as f32 * 1e-3).collect();
        let (a_s, za, y_s, zy) = (0.03f32, 120u8, 0.5f32, 100u8);
        let mut want = Vec::new();
        for i in 0..m {
            for j in 0..n {
                let acc: i32 = (0..k)
                    .map(|t| (i32::from(a[i * k + t]) - i32::from(za)) * i32::from(b[t * n + j]))
                    .sum();
                let v = acc as f32 * (a_s * bs[j] / y_s);
                let q = round_half_even(v.clamp(-100.0, 155.0)) as i32 + 100;
                want.push(q as u8);
            }
        }
        let t = |s: Vec<usize>, d: TensorData| Some(Tensor::new(s, d).unwrap());
        let out = run(
            "QLinearMatMul",
            13,
            &[],
            vec![
                t(vec![2, 3, k], TensorData::U8(a.clone())),
                Some(Tensor::scalar_f32(a_s)),
                t(vec![], TensorData::U8(vec![za])),
                t(vec![k, n], TensorData::I8(b.clone())),
                t(vec![n], TensorData::F32(bs)),
                t(vec![n], TensorData::I8(vec![0; n])),
                Some(Tensor::scalar_f32(y_s)),
                t(vec![], TensorData::U8(vec![zy])),
            ],
            1,
        )
        .unwrap();
        assert_eq!(out[0].shape(), &[2, 3, n]);
        assert_eq!(out[0].data(), &TensorData::U8(want));
        let ints = run(
            "MatMulInteger",
            13,
            &[],
            vec![
                t(vec![m, k], TensorData::U8(a)),
                t(vec![k, n], TensorData::I8(b)),
                t(vec![], TensorData::U8(vec![za])),
                None,
            ],
            1,
        )
        .unwrap();
        assert_eq!(ints[0].shape(), &[m, n]);
    }

    /// Any number of rows (one: a matrix-vector product; a few; many), u8 B with per-column
    /// zero points and an i8 A, exact against the definition.
    #[test]
    fn matmul_integer_is_exact_for_any_row_count() {
        let (k, n) = (45, 21);
        let mut state = 12345u32;
        let mut next = || {
            state = state.wrapping_mul(1_103_515_245).wrapping_add(12_345);
            (state >> 16) as u8
        };
        let b: Vec<u8> = (0..k * n).map(|_| next()).collect();
        let zb: Vec<u8> = (0..n).map(|_| next()).collect();
        let za = -7i8;
        for m in [1usize, 2, 3, 7, 65, 130] {
            let a: Vec<i8> = (0..m * k).map(|_| next() as i8).collect();
            let want: Vec<i32> = (0..m * n)
                .map(|idx| {
                    let (i, j) = (idx / n, idx % n);
                    (0..k)
                        .map(|t| {
                            (i32::from(a[i * k + t]) - i32::from(za))
                                * (i32::from(b[t * n + j]) - i32::from(zb[j]))
                        })
                        .sum()
                })
                .collect();
            let t = |s: Vec<usize>, d: TensorData| Some(Tensor::new(s, d).unwrap());
            let out = run(
                "MatMulInteger",
                13,
                &[],
                vec![
                    t(vec![m, k], TensorData::I8(a)),
                    t(vec![k, n], TensorData::U8(b.clone())),
                    t(vec![], TensorData::I8(vec![za])),
                    t(vec![n], TensorData::U8(zb.clone())),
                ],
                1,
            )
            .unwrap();
            assert_eq!(out[0].data(), &TensorData::I32(want), "m = {m}");
        }
    }

    /// `DynamicQuantizeLinear -> MatMulInteger`: A's zero point arrives with A on every run
    /// while B is a constant, packed once.
    #[test]
    fn a_zero_point_computed_at_run_time() {
        use crate::ir::Node;
        use crate::ops::{CompileCtx, RunCtx};
        let (m, k, n) = (5, 9, 4);
        let a: Vec<u8> = (0..m * k).map(|i| (i * 37 % 256) as u8).collect();
        let b: Vec<i8> = (0..k * n).map(|i| (i * 11 % 255) as i8).collect();
        let names = ["a", "b", "az"].map(String::from).to_vec();
        let node = Node::new("mm", "MatMulInteger", names, vec!["y".into()]);
        let bt = Tensor::new(vec![k, n], TensorData::I8(b.clone())).unwrap();
        let ctx = CompileCtx {
            node: &node,
            opset: 13,
            input_types: vec![None; 3],
            constants: vec![None, Some(&bt), None],
            fused_activation: None,
        };
        let kernel = super::compile_integer(&ctx).unwrap();
        for za in [0u8, 3, 200] {
            let want: Vec<i32> = (0..m * n)
                .map(|idx| {
                    let (i, j) = (idx / n, idx % n);
                    (0..k)
                        .map(|t| {
                            (i32::from(a[i * k + t]) - i32::from(za)) * i32::from(b[t * n + j])
                        })
                        .sum()
                })
                .collect();
            let at = Tensor::new(vec![m, k], TensorData::U8(a.clone())).unwrap();
            let zt = Tensor::new(vec![], TensorData::U8(vec![za])).unwrap();
            let out = kernel
                .run(&[Some(&at), None, Some(&zt)], &mut RunCtx::default())
                .unwrap();
            assert_eq!(out[0].data(), &TensorData::I32(want), "zero point {za}");
        }
    }
}
