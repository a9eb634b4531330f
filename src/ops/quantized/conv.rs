//! ONNX `QLinearConv` (opsets 10-21) and `ConvInteger` (10-21), 1-D and 2-D, with groups
//! (depthwise included), strides, dilations, pads and `auto_pad`. Weights, scales, zero
//! points and bias are prepared once when constant (the usual case), else on every run.

use super::conv_nchw::pool_codes;
use super::engine::{shift_i8_to_u8, IntConv, OutputStage};
use super::params::{dtype_range, present, read_qparams, weights_as_i8, QTensorParams};
use super::prepared;
use super::window::ConvAttrs;
use crate::error::Result;
use crate::ir::{DType, Dim, Node, Tensor, TensorData, TypeInfo};
use crate::kernels::conv::Conv2dGeom;
use crate::kernels::qgemm::{float_scales, WxElem};
use crate::ops::{node_error, required, CompileCtx, InferCtx, Kernel, OpDef, RunCtx};
use crate::quant::QStore;

pub const QLINEAR_CONV: OpDef = OpDef {
    op_type: "QLinearConv",
    domain: "",
    opsets: (10, 21),
    infer: infer_qlinear,
    compile: compile_qlinear,
    fuses_activation: false,
};

pub const CONV_INTEGER: OpDef = OpDef {
    op_type: "ConvInteger",
    domain: "",
    opsets: (10, 21),
    infer: infer_integer,
    compile: compile_integer,
    fuses_activation: false,
};

fn out_type(ctx: &InferCtx, w_index: usize, dtype: DType) -> Result<Vec<TypeInfo>> {
    let x = ctx.input_type(0)?;
    let w = ctx.input_type(w_index)?;
    let (Some(xs), Some(ws)) = (&x.shape, &w.shape) else {
        return Ok(vec![TypeInfo::unknown_shape(dtype)]);
    };
    let c_out = ws.first().cloned().unwrap_or(Dim::Unknown);
    let mut out = vec![xs.first().cloned().unwrap_or(Dim::Unknown), c_out];
    let wk: Option<Vec<usize>> = ws.iter().map(Dim::known).collect();
    match wk {
        Some(wk) if xs.len() == wk.len() && xs.len() >= 3 => {
            let attrs = ConvAttrs::parse(ctx.node, &wk)?;
            out.extend(attrs.out_dims(&xs[2..]));
        }
        _ => out.extend(std::iter::repeat_n(
            Dim::Unknown,
            xs.len().saturating_sub(2),
        )),
    }
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

/// Everything but the input, ready to run.
struct Prepared {
    conv: IntConv,
    attrs: ConvAttrs,
    /// The input's zero point after any i8 -> u8 shift.
    x_zp: u8,
    x_signed: bool,
    out_dtype: DType,
    /// A 2x2 / stride-2 MaxPool (floor mode, no padding) of the output joins the step.
    pooled: bool,
}

/// The input zero point as u8 (shifted for i8 inputs).
fn input_zp(node: &Node, p: &QTensorParams) -> Result<(u8, bool)> {
    if !p.is_per_tensor() {
        return Err(node_error(node, "the input must be quantized per tensor"));
    }
    let z = p.zero_points[0];
    match p.dtype {
        DType::U8 => Ok((z as u8, false)),
        DType::I8 => Ok(((z + 128) as u8, true)),
        other => Err(node_error(
            node,
            format!("input must be u8 or i8, got {other}"),
        )),
    }
}

fn geom_for(
    node: &Node,
    w: &Tensor,
    attrs: &ConvAttrs,
) -> Result<crate::kernels::conv::Conv2dGeom> {
    let ws = w.shape();
    let c_in = ws[1]
        .checked_mul(attrs.group)
        .ok_or_else(|| node_error(node, "channel count overflows"))?;
    if !ws[0].is_multiple_of(attrs.group) {
        return Err(node_error(
            node,
            format!(
                "{} output channels do not divide into {} groups",
                ws[0], attrs.group
            ),
        ));
    }
    // Pads and output size depend on the input extent only through auto_pad, resolved per run.
    Ok(attrs.geom(c_in, ws[0], [1, 1]))
}

#[allow(clippy::too_many_arguments)]
fn prepare_qlinear(
    node: &Node,
    x_scale: &Tensor,
    x_zp: Option<&Tensor>,
    w: &Tensor,
    w_scale: &Tensor,
    w_zp: Option<&Tensor>,
    y_scale: &Tensor,
    y_zp: Option<&Tensor>,
    bias: Option<&Tensor>,
) -> Result<Prepared> {
    let xp = read_qparams(node, x_scale, x_zp, DType::U8, "x")?;
    let wp = read_qparams(node, w_scale, w_zp, w.dtype(), "w")?;
    let yp = read_qparams(node, y_scale, y_zp, DType::U8, "y")?;
    if !yp.is_per_tensor() {
        return Err(node_error(node, "the output must be quantized per tensor"));
    }
    let attrs = ConvAttrs::parse(node, w.shape())?;
    let c_out = w.shape()[0];
    if !wp.is_per_tensor() && wp.scales.len() != c_out {
        return Err(node_error(
            node,
            format!(
                "{} weight scales for {c_out} output channels",
                wp.scales.len()
            ),
        ));
    }
    let (wq, wzp) = weights_as_i8(node, w, &wp.zero_points, "weight")?;
    let (zx, x_signed) = input_zp(node, &xp)?;
    let (qmin, qmax) = match yp.dtype {
        DType::U8 | DType::I8 => dtype_range(yp.dtype).unwrap_or((0, 255)),
        other => {
            return Err(node_error(
                node,
                format!("output must be u8 or i8, got {other}"),
            ))
        }
    };
    let bias = match bias {
        None => None,
        Some(b) => match b.data() {
            TensorData::I32(v) if v.len() == c_out => Some(v.clone()),
            _ => {
                return Err(node_error(
                    node,
                    format!(
                        "bias must be {c_out} i32 values, got {} {}",
                        b.numel(),
                        b.dtype()
                    ),
                ))
            }
        },
    };
    let stage = OutputStage::Requant {
        scales: float_scales(xp.scales[0], &wp.scales, yp.scales[0]),
        zero_point: yp.zero_points[0],
        qmin,
        qmax,
        bias,
    };
    let geom = geom_for(node, w, &attrs)?;
    let conv = IntConv::new(geom, &wq, &wzp, stage).map_err(|e| node_error(node, e.to_string()))?;
    Ok(Prepared {
        conv,
        attrs,
        x_zp: zx,
        x_signed,
        out_dtype: yp.dtype,
        pooled: false,
    })
}

fn prepare_integer(
    node: &Node,
    x_dtype: DType,
    w: &Tensor,
    x_zp: Option<&Tensor>,
    w_zp: Option<&Tensor>,
) -> Result<Prepared> {
    let one = Tensor::scalar_f32(1.0);
    let xp = read_qparams(node, &one, x_zp, x_dtype, "x")?;
    let wscale = Tensor::from_f32(
        vec![w_zp.map_or(1, Tensor::numel).max(1)],
        vec![1.0; w_zp.map_or(1, Tensor::numel).max(1)],
    )?;
    let wp = read_qparams(node, &wscale, w_zp, w.dtype(), "w")?;
    let attrs = ConvAttrs::parse(node, w.shape())?;
    let (wq, wzp) = weights_as_i8(node, w, &wp.zero_points, "weight")?;
    let (zx, x_signed) = input_zp(node, &xp)?;
    let geom = geom_for(node, w, &attrs)?;
    let conv = IntConv::new(geom, &wq, &wzp, OutputStage::Int32)
        .map_err(|e| node_error(node, e.to_string()))?;
    Ok(Prepared {
        conv,
        attrs,
        x_zp: zx,
        x_signed,
        out_dtype: DType::I32,
        pooled: false,
    })
}

impl Prepared {
    fn run(&self, node: &Node, x: &Tensor, ctx: &mut RunCtx) -> Result<Tensor> {
        let xs = x.shape();
        let (n, c, h, w) = match *xs {
            [_, _, 0] | [_, _, 0, _] | [_, _, _, 0] => {
                return Err(crate::ops::nn::empty_spatial(node, xs))
            }
            [n, c, l] => (n, c, 1, l),
            [n, c, h, w] => (n, c, h, w),
            _ => {
                return Err(node_error(
                    node,
                    format!("input of shape {xs:?}: only 1-D and 2-D convolutions are supported"),
                ))
            }
        };
        let mut geom = self.conv.geom.clone();
        if c != geom.c_in {
            return Err(node_error(
                node,
                format!("input has {c} channels, the weight expects {}", geom.c_in),
            ));
        }
        let resolved = self.attrs.geom(geom.c_in, geom.c_out, [h, w]);
        geom.pads = resolved.pads;
        let (oh, ow) = geom
            .out_hw(h, w)
            .map_err(|e| node_error(node, e.to_string()))?;
        let shifted;
        let xu8: &[u8] = match (x.data(), self.x_signed) {
            (TensorData::U8(v), false) => v,
            (TensorData::I8(v), true) => {
                shifted = shift_i8_to_u8(v);
                &shifted
            }
            (other, _) => {
                return Err(node_error(
                    node,
                    format!(
                        "input is {} but its zero point is {}",
                        other.dtype(),
                        if self.x_signed { "i8" } else { "u8" }
                    ),
                ))
            }
        };
        let out_shape: Vec<usize> = if xs.len() == 3 {
            vec![n, geom.c_out, ow]
        } else {
            vec![n, geom.c_out, oh, ow]
        };
        // Pads and strides come from the file: a huge output is an error, not an abort. The
        // phase planes of the fast engines are no larger than the padded input.
        let len = crate::ir::checked_numel(&[n, geom.c_out, oh, ow], 4)
            .map_err(|e| node_error(node, e.to_string()))?;
        crate::ir::checked_numel(
            &[
                c,
                h.saturating_add(geom.pads[0])
                    .saturating_add(geom.pads[2])
                    .saturating_add(geom.stride[0]),
                w.saturating_add(geom.pads[1])
                    .saturating_add(geom.pads[3])
                    .saturating_add(geom.stride[1]),
            ],
            4,
        )
        .map_err(|e| node_error(node, e.to_string()))?;
        if self.pooled {
            return self.run_pooled(node, xs, xu8, &geom, [oh, ow], ctx);
        }
        let cv = &self.conv;
        let dims = [n, h, w];
        let data = (|| -> Result<TensorData> {
            Ok(match self.out_dtype {
                DType::U8 => {
                    // Every element is written (the engines' contract), so a pooled buffer
                    // with stale contents saves zero-filling and faulting in fresh pages.
                    let mut o = ctx.alloc_u8_overwrite(len);
                    cv.run(xu8, self.x_zp, dims, geom.pads, &mut o)?;
                    TensorData::U8(o)
                }
                DType::I8 => {
                    let mut o = vec![0i8; len];
                    cv.run(xu8, self.x_zp, dims, geom.pads, &mut o)?;
                    TensorData::I8(o)
                }
                _ => {
                    let mut o = vec![0i32; len];
                    cv.run(xu8, self.x_zp, dims, geom.pads, &mut o)?;
                    TensorData::I32(o)
                }
            })
        })()
        .map_err(|e| node_error(node, e.to_string()))?;
        Tensor::new(out_shape, data)
    }
}

impl Prepared {
    /// The convolution and its 2x2 max pool, after [`Prepared::run`]'s checks.
    fn run_pooled(
        &self,
        node: &Node,
        xs: &[usize],
        xu8: &[u8],
        geom: &Conv2dGeom,
        [oh, ow]: [usize; 2],
        ctx: &mut RunCtx,
    ) -> Result<Tensor> {
        let &[n, _, h, w] = xs else {
            return Err(node_error(
                node,
                "a fused 2x2 max pool needs a 2-D convolution",
            ));
        };
        // As the MaxPool alone would say: a 2x2 window needs two rows and columns.
        if let Some(short) = [oh, ow].into_iter().find(|&e| e < 2) {
            return Err(node_error(
                node,
                format!("pool: padded input extent {short} is smaller than the window extent 2"),
            ));
        }
        let len = n * geom.c_out * (oh / 2) * (ow / 2);
        let (dims, err) = ([n, h, w], |e: crate::error::Error| {
            node_error(node, e.to_string())
        });
        let data = match self.out_dtype {
            DType::U8 => {
                // Every element is written, as in `run`.
                let mut o = ctx.alloc_u8_overwrite(len);
                self.conv_pooled(xu8, dims, geom, [oh, ow], &mut o)
                    .map_err(err)?;
                TensorData::U8(o)
            }
            DType::I8 => {
                let mut o = vec![0i8; len];
                self.conv_pooled(xu8, dims, geom, [oh, ow], &mut o)
                    .map_err(err)?;
                TensorData::I8(o)
            }
            other => {
                return Err(node_error(
                    node,
                    format!("a fused max pool needs 8-bit outputs, not {other}"),
                ))
            }
        };
        Tensor::new(vec![n, geom.c_out, oh / 2, ow / 2], data)
    }

    /// Pooled per image on the GEMM engine; on any other, the whole output convolved and
    /// then pooled.
    fn conv_pooled<T: QStore + WxElem>(
        &self,
        x: &[u8],
        dims: [usize; 3],
        geom: &Conv2dGeom,
        [oh, ow]: [usize; 2],
        out: &mut [T],
    ) -> Result<()> {
        if self.conv.run_pooled(x, self.x_zp, dims, geom.pads, out)? {
            return Ok(());
        }
        let planes = dims[0] * geom.c_out;
        let mut y = vec![T::default(); planes * oh * ow];
        self.conv.run(x, self.x_zp, dims, geom.pads, &mut y)?;
        pool_codes(&y, [planes, oh, ow], out)
    }
}

/// `QLinearConv` whose output only a `MaxPool` reads, when that pool is a plain 2x2 window
/// with stride 2 (no padding or dilation, floor mode, no indices): the two run as one step,
/// each image pooled while its output is in cache. Max pooling commutes with the monotone
/// requantization, so the result is the two nodes' exactly. `None` for any other pool.
pub fn compile_qlinear_pool(ctx: &CompileCtx, pool: &Node) -> Result<Option<Box<dyn Kernel>>> {
    if ctx.node.op_type != "QLinearConv" || pool.op_type != "MaxPool" {
        return Ok(None);
    }
    let ints = |key: &str| pool.attr_ints(key).ok().flatten();
    let all = |key: &str, v: i64| ints(key).is_none_or(|a| a.iter().all(|&x| x == v));
    let plain = ints("kernel_shape") == Some(&[2, 2][..])
        && ints("strides") == Some(&[2, 2][..])
        && all("pads", 0)
        && all("dilations", 1)
        && pool.attr_int_or("ceil_mode", 0).ok() == Some(0)
        && matches!(
            pool.attr_string("auto_pad").ok().flatten(),
            None | Some("NOTSET") | Some("VALID")
        )
        && pool.outputs.iter().skip(1).all(|o| o.is_empty());
    if !plain {
        return Ok(None);
    }
    prepared::compile(ctx, false, |node, dtype, inputs| {
        let mut p = prepare_qlinear_from(node, dtype, inputs)?;
        p.pooled = true;
        Ok(p)
    })
    .map(Some)
}

fn prepare_qlinear_from(node: &Node, _: DType, inputs: &[Option<&Tensor>]) -> Result<Prepared> {
    prepare_qlinear(
        node,
        required(inputs, 1)?,
        present(inputs, 2),
        required(inputs, 3)?,
        required(inputs, 4)?,
        present(inputs, 5),
        required(inputs, 6)?,
        present(inputs, 7),
        present(inputs, 8),
    )
}

fn compile_qlinear(ctx: &CompileCtx) -> Result<Box<dyn Kernel>> {
    prepared::compile(ctx, false, prepare_qlinear_from)
}

fn compile_integer(ctx: &CompileCtx) -> Result<Box<dyn Kernel>> {
    prepared::compile(ctx, true, |node, dtype, inputs| {
        prepare_integer(
            node,
            dtype,
            required(inputs, 1)?,
            present(inputs, 2),
            present(inputs, 3),
        )
    })
}

impl prepared::Apply for Prepared {
    fn apply(&self, node: &Node, x: &Tensor, ctx: &mut RunCtx) -> Result<Tensor> {
        self.run(node, x, ctx)
    }
}

#[cfg(test)]
mod tests {
    use super::compile_qlinear_pool;
    use crate::ir::{Attr, Node, Tensor, TensorData};
    use crate::ops::testutil::run;
    use crate::ops::{CompileCtx, RunCtx};
    use crate::quant::linear::round_half_even;

    use crate::quant::test_rng::Rng;

    #[derive(Debug)]
    struct Case {
        n: usize,
        c_in: usize,
        c_out: usize,
        h: usize,
        w: usize,
        k: [usize; 2],
        stride: [usize; 2],
        dil: [usize; 2],
        pads: [usize; 4],
        group: usize,
    }

    /// Straight from the ONNX definition, in i64 and the reference float requantization.
    #[allow(clippy::too_many_arguments)]
    fn reference(
        c: &Case,
        x: &[i32],
        zx: i32,
        wt: &[i32],
        zw: &[i32],
        bias: &[i32],
        scales: &[f32],
        zy: i32,
        (qmin, qmax): (i32, i32),
    ) -> (Vec<i32>, [usize; 2]) {
        let oh = (c.h + c.pads[0] + c.pads[2] - c.dil[0] * (c.k[0] - 1) - 1) / c.stride[0] + 1;
        let ow = (c.w + c.pads[1] + c.pads[3] - c.dil[1] * (c.k[1] - 1) - 1) / c.stride[1] + 1;
        let (cin_g, cout_g) = (c.c_in / c.group, c.c_out / c.group);
        let mut out = vec![0; c.n * c.c_out * oh * ow];
        for img in 0..c.n {
            for co in 0..c.c_out {
                let g = co / cout_g;
                let z = zw[if zw.len() == 1 { 0 } else { co }];
                for oy in 0..oh {
                    for ox in 0..ow {
                        let mut acc: i64 = 0;
                        for ci in 0..cin_g {
                            for ky in 0..c.k[0] {
                                for kx in 0..c.k[1] {
                                    let iy = (oy * c.stride[0] + ky * c.dil[0]) as isize
                                        - c.pads[0] as isize;
                                    let ix = (ox * c.stride[1] + kx * c.dil[1]) as isize
                                        - c.pads[1] as isize;
                                    if iy < 0 || ix < 0 || iy >= c.h as isize || ix >= c.w as isize
                                    {
                                        continue;
                                    }
                                    let xv = x[((img * c.c_in + g * cin_g + ci) * c.h
                                        + iy as usize)
                                        * c.w
                                        + ix as usize];
                                    let wv = wt[((co * cin_g + ci) * c.k[0] + ky) * c.k[1] + kx];
                                    acc += i64::from(xv - zx) * i64::from(wv - z);
                                }
                            }
                        }
                        let s = scales[if scales.len() == 1 { 0 } else { co }];
                        let v = (acc as i32 + bias[co]) as f32 * s;
                        let q = round_half_even(v.clamp((qmin - zy) as f32, (qmax - zy) as f32))
                            as i32
                            + zy;
                        out[((img * c.c_out + co) * oh + oy) * ow + ox] = q;
                    }
                }
            }
        }
        (out, [oh, ow])
    }

    /// The convolution fused with a 2x2 / stride-2 MaxPool against the reference output
    /// pooled: on the GEMM engine (pooled per image) and on any other (pooled afterwards).
    fn check_pooled(
        c: &Case,
        attrs: &[(&str, Attr)],
        inputs: &[Option<Tensor>],
        want: &[i32],
        [oh, ow]: [usize; 2],
    ) {
        let names: Vec<String> = (0..inputs.len()).map(|i| format!("in{i}")).collect();
        let mut node = Node::new("conv", "QLinearConv", names, vec!["y".into()]);
        for (k, v) in attrs {
            node = node.with_attr(k, v.clone());
        }
        let ints = |v: &[i64]| Attr::Ints(v.to_vec());
        let pool = Node::new("pool", "MaxPool", vec!["y".into()], vec!["z".into()])
            .with_attr("kernel_shape", ints(&[2, 2]))
            .with_attr("strides", ints(&[2, 2]));
        let ctx = CompileCtx {
            node: &node,
            opset: 13,
            input_types: vec![None; inputs.len()],
            constants: (0..inputs.len())
                .map(|i| if i == 0 { None } else { inputs[i].as_ref() })
                .collect(),
            fused_activation: None,
        };
        let kernel = compile_qlinear_pool(&ctx, &pool)
            .unwrap()
            .expect("a plain 2x2 pool fuses");
        let feeds: Vec<Option<&Tensor>> = inputs.iter().map(|t| t.as_ref()).collect();
        let ran = kernel.run(&feeds, &mut RunCtx::default());
        if oh < 2 || ow < 2 {
            // As the MaxPool alone: no 2x2 window fits.
            let e = ran.err().map(|e| e.to_string()).unwrap_or_default();
            assert!(e.contains("smaller than the window extent 2"), "{c:?}: {e}");
            return;
        }
        let got = ran.unwrap();
        let (ph, pw) = (oh / 2, ow / 2);
        let mut pooled = vec![0i64; c.n * c.c_out * ph * pw];
        for (p, o) in pooled.iter_mut().enumerate() {
            let (plane, y, x) = (p / (ph * pw), p / pw % ph, p % pw);
            let at = |dy: usize, dx: usize| want[(plane * oh + 2 * y + dy) * ow + 2 * x + dx];
            *o = i64::from(at(0, 0).max(at(0, 1)).max(at(1, 0)).max(at(1, 1)));
        }
        assert_eq!(got[0].shape(), &[c.n, c.c_out, ph, pw]);
        assert_eq!(got[0].to_i64_vec().unwrap(), pooled, "pooled {c:?}");
        // A pool that is not the plain 2x2 window is left to its own node.
        let other = pool.clone().with_attr("pads", ints(&[0, 0, 1, 1]));
        assert!(compile_qlinear_pool(&ctx, &other).unwrap().is_none());
    }

    fn check(c: Case, seed: u64, signed_x: bool, u8_w: bool, per_channel: bool) {
        let mut r = Rng::new(seed);
        let (xlo, xhi) = if signed_x { (-128, 127) } else { (0, 255) };
        let (wlo, whi) = if u8_w { (0, 255) } else { (-127, 127) };
        let kk = c.c_in / c.group * c.k[0] * c.k[1];
        let x: Vec<i32> = (0..c.n * c.c_in * c.h * c.w)
            .map(|_| r.range_i32(xlo, xhi))
            .collect();
        let wt: Vec<i32> = (0..c.c_out * kk).map(|_| r.range_i32(wlo, whi)).collect();
        let zx = r.range_i32(xlo, xhi);
        let nz = if per_channel { c.c_out } else { 1 };
        let zw: Vec<i32> = (0..nz)
            .map(|_| if u8_w { r.range_i32(100, 150) } else { 0 })
            .collect();
        let ws: Vec<f32> = (0..nz).map(|i| 0.002 + i as f32 * 3e-4).collect();
        let bias: Vec<i32> = (0..c.c_out).map(|_| r.range_i32(-20000, 20000)).collect();
        let (xs, ys, zy) = (0.05f32, 0.7f32, r.range_i32(0, 255));
        let scales: Vec<f32> = ws.iter().map(|&w| xs * w / ys).collect();
        let (want, [oh, ow]) = reference(&c, &x, zx, &wt, &zw, &bias, &scales, zy, (0, 255));
        let xt = if signed_x {
            TensorData::I8(x.iter().map(|&v| v as i8).collect())
        } else {
            TensorData::U8(x.iter().map(|&v| v as u8).collect())
        };
        let zxt = if signed_x {
            TensorData::I8(vec![zx as i8])
        } else {
            TensorData::U8(vec![zx as u8])
        };
        let wtd = if u8_w {
            TensorData::U8(wt.iter().map(|&v| v as u8).collect())
        } else {
            TensorData::I8(wt.iter().map(|&v| v as i8).collect())
        };
        let zwt = if u8_w {
            TensorData::U8(zw.iter().map(|&v| v as u8).collect())
        } else {
            TensorData::I8(zw.iter().map(|&v| v as i8).collect())
        };
        let one_d = c.h == 1 && c.k[0] == 1 && c.pads[0] == 0 && c.pads[2] == 0;
        let (xshape, wshape, attrs) = if one_d {
            (
                vec![c.n, c.c_in, c.w],
                vec![c.c_out, c.c_in / c.group, c.k[1]],
                vec![
                    ("strides", Attr::Ints(vec![c.stride[1] as i64])),
                    ("dilations", Attr::Ints(vec![c.dil[1] as i64])),
                    ("pads", Attr::Ints(vec![c.pads[1] as i64, c.pads[3] as i64])),
                    ("group", Attr::Int(c.group as i64)),
                ],
            )
        } else {
            (
                vec![c.n, c.c_in, c.h, c.w],
                vec![c.c_out, c.c_in / c.group, c.k[0], c.k[1]],
                vec![
                    (
                        "strides",
                        Attr::Ints(c.stride.iter().map(|&v| v as i64).collect()),
                    ),
                    (
                        "dilations",
                        Attr::Ints(c.dil.iter().map(|&v| v as i64).collect()),
                    ),
                    (
                        "pads",
                        Attr::Ints(c.pads.iter().map(|&v| v as i64).collect()),
                    ),
                    ("group", Attr::Int(c.group as i64)),
                ],
            )
        };
        let t = |shape: Vec<usize>, d: TensorData| Some(Tensor::new(shape, d).unwrap());
        let zshape = if per_channel { vec![nz] } else { vec![] };
        let inputs = vec![
            t(xshape, xt),
            Some(Tensor::scalar_f32(xs)),
            t(vec![], zxt),
            t(wshape, wtd),
            t(zshape.clone(), TensorData::F32(ws.clone())),
            t(zshape, zwt),
            Some(Tensor::scalar_f32(ys)),
            t(vec![], TensorData::U8(vec![zy as u8])),
            t(vec![c.c_out], TensorData::I32(bias.clone())),
        ];
        if !one_d {
            check_pooled(&c, &attrs, &inputs, &want, [oh, ow]);
        }
        let out = run("QLinearConv", 13, &attrs, inputs, 1).unwrap();
        let got: Vec<i32> = out[0]
            .to_i64_vec()
            .unwrap()
            .iter()
            .map(|&v| v as i32)
            .collect();
        assert_eq!(got.len(), want.len());
        assert_eq!(got, want, "seed {seed}");
        let dims = out[0].shape();
        assert_eq!(dims[dims.len() - 1], ow);
        if !one_d {
            assert_eq!(dims[2], oh);
        }
    }

    fn case(c_in: usize, c_out: usize, hw: usize, k: usize, s: usize, p: usize, g: usize) -> Case {
        Case {
            n: 2,
            c_in,
            c_out,
            h: hw,
            w: hw + 1,
            k: [k, k],
            stride: [s, s],
            dil: [1, 1],
            pads: [p, p, p, p],
            group: g,
        }
    }

    #[test]
    fn qlinear_conv_matches_definition() {
        check(case(3, 8, 9, 3, 1, 1, 1), 1, false, false, true);
        check(case(4, 6, 8, 3, 2, 1, 2), 2, false, false, false);
        check(case(5, 5, 10, 3, 2, 1, 5), 3, false, false, true); // depthwise, stride 2
        check(case(6, 6, 7, 3, 1, 1, 6), 4, true, false, true); // depthwise, i8 input
        check(case(6, 12, 7, 1, 1, 0, 1), 5, false, true, true); // 1x1, u8 weights
        check(case(4, 8, 20, 3, 1, 0, 1), 6, true, true, false);
        let mut dil = case(3, 4, 11, 3, 1, 2, 1);
        dil.dil = [2, 2];
        dil.pads = [2, 1, 0, 2];
        check(dil, 7, false, false, true);
        let mut dwdil = case(4, 4, 9, 3, 1, 2, 4);
        dwdil.dil = [2, 1];
        check(dwdil, 8, false, false, false);
        // 1-D
        let one_d = Case {
            n: 1,
            c_in: 3,
            c_out: 5,
            h: 1,
            w: 30,
            k: [1, 5],
            stride: [1, 2],
            dil: [1, 1],
            pads: [0, 2, 0, 1],
            group: 1,
        };
        check(one_d, 9, false, false, true);
        // Many output pixels: several tasks per image.
        check(case(2, 3, 40, 3, 1, 1, 1), 10, false, false, true);
        // One output row: the fused 2x2 pool has no window, an error as for the pool alone.
        check(case(3, 4, 3, 3, 1, 0, 1), 11, false, false, true);
    }

    #[test]
    fn conv_integer_and_bad_inputs() {
        let x = Tensor::new(vec![1, 1, 2, 2], TensorData::U8(vec![1, 2, 3, 4])).unwrap();
        let w = Tensor::new(vec![1, 1, 1, 1], TensorData::U8(vec![3])).unwrap();
        let zx = Tensor::new(vec![], TensorData::U8(vec![1])).unwrap();
        let out = run(
            "ConvInteger",
            10,
            &[],
            vec![Some(x.clone()), Some(w), Some(zx), None],
            1,
        )
        .unwrap();
        assert_eq!(out[0].data(), &TensorData::I32(vec![0, 3, 6, 9]));
        // Pads from a malformed file that would need an enormous output: an error, not an abort.
        let w = Tensor::new(vec![1, 1, 1, 1], TensorData::U8(vec![3])).unwrap();
        let huge = 1i64 << 40;
        let err = run(
            "ConvInteger",
            10,
            &[("pads", Attr::Ints(vec![huge, huge, huge, huge]))],
            vec![Some(x.clone()), Some(w), None, None],
            1,
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("test_node") && err.contains("too large"),
            "{err}"
        );
        // A float input is a clear error naming the node.
        let xf = Tensor::from_f32(vec![1, 1, 2, 2], vec![0.0; 4]).unwrap();
        let w8 = Tensor::new(vec![1, 1, 1, 1], TensorData::I8(vec![3])).unwrap();
        let s = Tensor::scalar_f32(1.0);
        let err = run(
            "QLinearConv",
            13,
            &[],
            vec![
                Some(xf),
                Some(s.clone()),
                None,
                Some(w8),
                Some(s.clone()),
                None,
                Some(s),
                None,
                None,
            ],
            1,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("test_node"), "{err}");
    }
}
