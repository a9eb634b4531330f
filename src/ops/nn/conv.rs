//! ONNX `Conv` (opsets 1-21), 1-D and 2-D: `group`, `strides`, `pads`, `dilations`,
//! `kernel_shape`, `auto_pad`, optional bias, and a fused activation. Constant weights are
//! packed once at compile time. The planner can also fuse a following `MaxPool` /
//! `AveragePool` ([`compile_conv_pool`]).

use std::borrow::Cow;

use super::pool::{pool_attrs, PoolAttrs};
use super::{alloc_output, data, f32_input, nchw, optional_input, require_f32, Window};
use crate::error::Result;
use crate::ir::{Dim, Node, Tensor, TypeInfo};
use crate::kernels::activation::Activation;
use crate::kernels::conv::{Conv2d, Conv2dGeom, PoolStage};
use crate::kernels::pool::Pool2dGeom;
use crate::ops::{node_error, CompileCtx, InferCtx, Kernel, OpDef, RunCtx};

pub const CONV: OpDef = OpDef {
    op_type: "Conv",
    domain: "",
    opsets: (1, 21),
    infer,
    compile,
    fuses_activation: true,
};

/// The kernel extent: the attribute when given, else the weight's trailing dims.
fn kernel_shape(node: &Node, weight: Option<&[Dim]>) -> Result<Option<Vec<usize>>> {
    if let Some(k) = node.attr_ints("kernel_shape")? {
        if k.iter().any(|&x| x <= 0) {
            return Err(node_error(
                node,
                format!("kernel_shape {k:?} must be positive"),
            ));
        }
        return Ok(Some(k.iter().map(|&x| x as usize).collect()));
    }
    Ok(weight.and_then(|w| w.get(2..)?.iter().map(Dim::known).collect()))
}

fn infer(ctx: &InferCtx) -> Result<Vec<TypeInfo>> {
    let node = ctx.node;
    let x = ctx.input_type(0)?;
    let w = ctx.input_type(1)?;
    let Some(xs) = &x.shape else {
        return Ok(vec![TypeInfo::unknown_shape(x.dtype)]);
    };
    if xs.len() < 3 {
        return Err(node_error(
            node,
            format!("input rank {} is below 3", xs.len()),
        ));
    }
    let c_out = w
        .shape
        .as_ref()
        .and_then(|s| s.first().cloned())
        .unwrap_or(Dim::Unknown);
    let mut out = vec![xs[0].clone(), c_out];
    match kernel_shape(node, w.shape.as_deref())? {
        Some(k) if k.len() == xs.len() - 2 => {
            let win = Window::parse(node, k)?;
            out.extend(win.out_dims(node, &xs[2..], false)?);
        }
        Some(k) => {
            return Err(node_error(
                node,
                format!("kernel_shape {k:?} does not match input rank {}", xs.len()),
            ))
        }
        None => out.extend(std::iter::repeat_n(Dim::Unknown, xs.len() - 2)),
    }
    Ok(vec![TypeInfo::new(x.dtype, out)])
}

struct ConvKernel {
    node: Node,
    group: usize,
    /// Parsed at compile time when the kernel extent is known then.
    window: Option<Window>,
    act: Option<Activation>,
    /// Weights prepared at compile time, when they (and the bias) are constant.
    prepared: Option<Conv2d>,
}

fn compile(ctx: &CompileCtx) -> Result<Box<dyn Kernel>> {
    Ok(Box::new(compile_conv(ctx)?))
}

fn compile_conv(ctx: &CompileCtx) -> Result<ConvKernel> {
    let node = ctx.node;
    for i in 0..3 {
        require_f32(node, ctx.input_type(i), i)?;
    }
    let group = node.attr_int_or("group", 1)?;
    if group < 1 {
        return Err(node_error(node, format!("group {group} must be positive")));
    }
    let mut kernel = ConvKernel {
        node: node.clone(),
        group: group as usize,
        window: None,
        act: ctx.fused_activation,
        prepared: None,
    };
    let weight_shape = ctx.input_type(1).and_then(|t| t.shape.as_deref());
    if let Some(k) = kernel_shape(node, weight_shape)? {
        kernel.window = Some(Window::parse(node, k)?);
    }
    let bias_const = match node.input(2) {
        None => Some(None),
        Some(_) => ctx.constant(2).map(Some),
    };
    // Weights and bias known now: build the geometry from them and the input channel count.
    if let (Some(w), Some(b)) = (ctx.constant(1), bias_const) {
        let c_in = ctx
            .input_type(0)
            .and_then(|t| t.shape.as_ref())
            .and_then(|s| s.get(1))
            .and_then(Dim::known)
            .unwrap_or(
                w.shape()
                    .get(1)
                    .copied()
                    .unwrap_or(0)
                    .saturating_mul(kernel.group),
            );
        kernel.prepared = Some(kernel.prepare(c_in, w, b, true)?);
    }
    Ok(kernel)
}

impl ConvKernel {
    /// Validates the weight against the attributes and packs it. `constant`: prepared once
    /// for every run (else for this run only, see [`Conv2d::new_per_call`]).
    fn prepare(
        &self,
        c_in: usize,
        w: &Tensor,
        bias: Option<&Tensor>,
        constant: bool,
    ) -> Result<Conv2d> {
        let node = &self.node;
        let ws = w.shape();
        if ws.len() != 3 && ws.len() != 4 {
            return Err(node_error(
                node,
                format!("weight of shape {ws:?}: only 1-D and 2-D convolutions are supported"),
            ));
        }
        let spatial = ws[2..].to_vec();
        let win = Window::parse(
            node,
            kernel_shape(node, None)?.unwrap_or_else(|| spatial.clone()),
        )?;
        if win.kernel != spatial {
            return Err(node_error(
                node,
                format!(
                    "kernel_shape {:?} disagrees with weight shape {ws:?}",
                    win.kernel
                ),
            ));
        }
        let expected = ws[1].saturating_mul(self.group);
        if expected != c_in {
            return Err(node_error(
                node,
                format!(
                    "input has {c_in} channels but the weight {ws:?} with group {} expects {expected}",
                    self.group
                ),
            ));
        }
        let (kernel, stride, dilation, pads) = win.as_2d([1, 1]);
        let geom = Conv2dGeom {
            c_in,
            c_out: ws[0],
            groups: self.group,
            kernel,
            stride,
            dilation,
            pads,
        };
        let bias = bias.map(Tensor::to_f32_vec);
        if let Some(b) = &bias {
            if b.len() != ws[0] {
                return Err(node_error(
                    node,
                    format!("bias has {} values for {} output channels", b.len(), ws[0]),
                ));
            }
        }
        let (wf, act) = (w.to_f32_vec(), self.act);
        if constant {
            Conv2d::new(geom, &wf, bias.as_deref(), act)
        } else {
            Conv2d::new_per_call(geom, &wf, bias.as_deref(), act)
        }
        .map_err(|e| e.at_node(node))
    }
}

/// What one run of a convolution needs: the prepared kernel (built now when the weights are
/// not constant), the input size and the pads for it.
struct Call<'a> {
    conv: Cow<'a, Conv2d>,
    nhw: [usize; 3],
    pads: [usize; 4],
    /// 1 for a 1-D convolution (`[n, c, l]`), else 2.
    rank: usize,
}

impl ConvKernel {
    fn call<'a>(&'a self, inputs: &[Option<&'a Tensor>]) -> Result<Call<'a>> {
        let node = &self.node;
        let x = f32_input(node, inputs, 0)?;
        let [n, c, h, w] = nchw(node, x.shape())?;
        let conv = match &self.prepared {
            Some(p) => Cow::Borrowed(p),
            None => {
                let wt = f32_input(node, inputs, 1)?;
                let b = match optional_input(inputs, 2) {
                    Some(_) => Some(f32_input(node, inputs, 2)?),
                    None => None,
                };
                Cow::Owned(self.prepare(c, wt, b, false)?)
            }
        };
        let g = conv.geom();
        if c != g.c_in {
            return Err(node_error(
                node,
                format!(
                    "input has {c} channels but the weight expects {} (group {})",
                    g.c_in, g.groups
                ),
            ));
        }
        let rank = if x.rank() == 3 { 1 } else { 2 };
        let parsed;
        let win = match &self.window {
            Some(win) => win,
            None => {
                let kernel = if rank == 1 {
                    vec![g.kernel[1]]
                } else {
                    g.kernel.to_vec()
                };
                parsed = Window::parse(node, kernel)?;
                &parsed
            }
        };
        if win.rank() != rank {
            return Err(node_error(
                node,
                format!(
                    "input of rank {} does not match the {}-D kernel",
                    x.rank(),
                    win.rank()
                ),
            ));
        }
        let (_, _, _, pads) = win.as_2d([h, w]);
        Ok(Call {
            conv,
            nhw: [n, h, w],
            pads,
            rank,
        })
    }
}

impl Kernel for ConvKernel {
    fn run(&self, inputs: &[Option<&Tensor>], ctx: &mut RunCtx) -> Result<Vec<Tensor>> {
        let node = &self.node;
        let call = self.call(inputs)?;
        let g = call.conv.geom();
        let [n, h, w] = call.nhw;
        let (oh, ow) = g
            .out_hw_with(h, w, call.pads)
            .map_err(|e| e.at_node(node))?;
        let mut out = alloc_output(node, ctx, &[n, g.c_out, oh, ow])?;
        let x = f32_input(node, inputs, 0)?;
        call.conv
            .run_with_pads(data(x), call.nhw, call.pads, &mut out)
            .map_err(|e| e.at_node(node))?;
        let shape = if call.rank == 1 {
            vec![n, g.c_out, ow]
        } else {
            vec![n, g.c_out, oh, ow]
        };
        Ok(vec![Tensor::from_f32(shape, out)?])
    }
}

/// A 2-D convolution (with its fused activation) followed by the MaxPool or AveragePool that
/// is the sole reader of its output: one step, and the full-resolution convolution output
/// never leaves cache ([`Conv2d::run_pooled`]).
struct ConvPoolKernel {
    conv: ConvKernel,
    pool_node: Node,
    pool: PoolAttrs,
}

/// Compiles `ctx.node` (a Conv, with `ctx.fused_activation`) fused with the pooling node
/// `pool` that reads its output. `None` when the pair is not a supported fusion (not 2-D,
/// or weights that are not constant); the nodes then run as separate steps.
pub fn compile_conv_pool(ctx: &CompileCtx, pool: &Node) -> Result<Option<Box<dyn Kernel>>> {
    if ctx.node.op_type != "Conv" || !matches!(pool.op_type.as_str(), "MaxPool" | "AveragePool") {
        return Ok(None);
    }
    let at = pool_attrs(pool)?;
    let conv = compile_conv(ctx)?;
    let two_d = conv.window.as_ref().is_some_and(|w| w.rank() == 2);
    if conv.prepared.is_none() || !two_d || at.window.rank() != 2 {
        return Ok(None);
    }
    Ok(Some(Box::new(ConvPoolKernel {
        conv,
        pool_node: pool.clone(),
        pool: at,
    })))
}

impl Kernel for ConvPoolKernel {
    fn run(&self, inputs: &[Option<&Tensor>], ctx: &mut RunCtx) -> Result<Vec<Tensor>> {
        let node = &self.conv.node;
        let call = self.conv.call(inputs)?;
        let g = call.conv.geom();
        let [n, h, w] = call.nhw;
        if call.rank != 2 {
            return Err(node_error(node, "fused pooling needs a 2-D convolution"));
        }
        let (oh, ow) = g
            .out_hw_with(h, w, call.pads)
            .map_err(|e| e.at_node(node))?;
        let (kernel, stride, dilation, pads) = self.pool.window.as_2d([oh, ow]);
        let stage = PoolStage {
            geom: Pool2dGeom {
                kernel,
                stride,
                dilation,
                pads,
                ceil_mode: self.pool.ceil_mode,
            },
            kind: self.pool.kind,
        };
        let pool_node = &self.pool_node;
        let (ph, pw) = stage
            .geom
            .out_hw(oh, ow)
            .map_err(|e| e.at_node(pool_node))?;
        let mut out = alloc_output(pool_node, ctx, &[n, g.c_out, ph, pw])?;
        let x = f32_input(node, inputs, 0)?;
        call.conv
            .run_pooled(data(x), call.nhw, call.pads, &stage, &mut out)
            .map_err(|e| e.at_node(node))?;
        Ok(vec![Tensor::from_f32(vec![n, g.c_out, ph, pw], out)?])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::{Attr, DType};
    use crate::kernels::conv::conv2d_reference;
    use crate::kernels::testutil::{assert_close, Rng};
    use crate::ops::nn::test_support::{infer, node, run};

    fn t(shape: &[usize], v: Vec<f32>) -> Tensor {
        Tensor::from_f32(shape.to_vec(), v).unwrap()
    }

    #[test]
    fn hand_checked_3x3_with_padding_and_relu() {
        // 1x1x3x3 ramp, all-ones 3x3 kernel, pad 1: each output sums its 3x3 neighbourhood.
        let x = t(&[1, 1, 3, 3], (1..=9).map(|v| v as f32).collect());
        let w = t(&[1, 1, 3, 3], vec![1.0; 9]);
        let b = t(&[1], vec![-20.0]);
        let n = node("Conv", 3).with_attr("pads", Attr::Ints(vec![1, 1, 1, 1]));
        let out = run(
            &n,
            18,
            &[Some(&x), Some(&w), Some(&b)],
            &[false, true, true],
            None,
        )
        .unwrap();
        assert_eq!(out[0].shape(), &[1, 1, 3, 3]);
        assert_eq!(
            out[0].as_f32().unwrap(),
            &[-8., 1., -4., 7., 25., 13., 4., 19., 8.]
        );
        let out = run(
            &n,
            18,
            &[Some(&x), Some(&w), Some(&b)],
            &[false, true, true],
            Some(Activation::Relu),
        )
        .unwrap();
        assert_eq!(
            out[0].as_f32().unwrap(),
            &[0., 1., 0., 7., 25., 13., 4., 19., 8.]
        );
    }

    #[test]
    fn constant_and_dynamic_weights_match_reference() {
        let mut rng = Rng::new(3);
        // Grouped, strided, dilated, asymmetric pads; and depthwise.
        for (c_in, c_out, group, k, s, d, p) in [
            (4, 6, 2, [3, 2], [2, 1], [1, 2], [1, 0, 2, 1]),
            (3, 3, 3, [5, 5], [2, 2], [1, 1], [2, 2, 2, 2]),
        ] {
            let (n, h, w) = (2, 9, 10);
            let x = t(&[n, c_in, h, w], rng.vec(n * c_in * h * w));
            let wt = t(
                &[c_out, c_in / group, k[0], k[1]],
                rng.vec(c_out * c_in / group * k[0] * k[1]),
            );
            let b = t(&[c_out], rng.vec(c_out));
            let node = node("Conv", 3)
                .with_attr("group", Attr::Int(group as i64))
                .with_attr("strides", Attr::Ints(s.iter().map(|&v| v as i64).collect()))
                .with_attr(
                    "dilations",
                    Attr::Ints(d.iter().map(|&v| v as i64).collect()),
                )
                .with_attr(
                    "pads",
                    Attr::Ints(vec![p[0] as i64, p[1] as i64, p[2] as i64, p[3] as i64]),
                );
            let geom = Conv2dGeom {
                c_in,
                c_out,
                groups: group,
                kernel: k,
                stride: s,
                dilation: d,
                pads: p,
            };
            let (oh, ow) = geom.out_hw(h, w).unwrap();
            let mut want = vec![0.0; n * c_out * oh * ow];
            conv2d_reference(
                &geom,
                data(&x),
                [n, h, w],
                data(&wt),
                Some(data(&b)),
                Some(Activation::HardSwish),
                &mut want,
            )
            .unwrap();
            for constant in [[false, true, true], [false, false, false]] {
                let out = run(
                    &node,
                    13,
                    &[Some(&x), Some(&wt), Some(&b)],
                    &constant,
                    Some(Activation::HardSwish),
                )
                .unwrap();
                assert_eq!(out[0].shape(), &[n, c_out, oh, ow]);
                assert_close(out[0].as_f32().unwrap(), &want, 1e-4, "conv op");
            }
        }
    }

    #[test]
    fn auto_pad_same_and_1d() {
        let mut rng = Rng::new(5);
        // SAME_UPPER with stride 2 on 7 wide: output 4, total pad 1 at the end.
        let x = t(&[1, 2, 7], rng.vec(14));
        let w = t(&[3, 2, 2], rng.vec(12));
        let n = node("Conv", 2)
            .with_attr("auto_pad", Attr::String("SAME_UPPER".into()))
            .with_attr("strides", Attr::Ints(vec![2]));
        let out = run(&n, 11, &[Some(&x), Some(&w)], &[false, true], None).unwrap();
        assert_eq!(out[0].shape(), &[1, 3, 4]);
        let geom = Conv2dGeom {
            c_in: 2,
            c_out: 3,
            groups: 1,
            kernel: [1, 2],
            stride: [1, 2],
            dilation: [1, 1],
            pads: [0, 0, 0, 1],
        };
        let mut want = vec![0.0; 12];
        conv2d_reference(&geom, data(&x), [1, 1, 7], data(&w), None, None, &mut want).unwrap();
        assert_close(out[0].as_f32().unwrap(), &want, 1e-5, "same_upper 1d");
        // SAME_LOWER puts the odd pad at the start.
        let n = n.with_attr("auto_pad", Attr::String("SAME_LOWER".into()));
        let out = run(&n, 11, &[Some(&x), Some(&w)], &[false, true], None).unwrap();
        let geom = Conv2dGeom {
            pads: [0, 1, 0, 0],
            ..geom
        };
        conv2d_reference(&geom, data(&x), [1, 1, 7], data(&w), None, None, &mut want).unwrap();
        assert_close(out[0].as_f32().unwrap(), &want, 1e-5, "same_lower 1d");
    }

    #[test]
    fn infer_keeps_symbolic_batch() {
        let n = node("Conv", 3)
            .with_attr("pads", Attr::Ints(vec![1, 1, 1, 1]))
            .with_attr("strides", Attr::Ints(vec![2, 2]));
        let x = TypeInfo::new(
            DType::F32,
            vec![
                Dim::Sym("N".into()),
                Dim::Known(3),
                Dim::Known(224),
                Dim::Unknown,
            ],
        );
        let w = TypeInfo::known(DType::F32, &[16, 3, 3, 3]);
        let out = infer(&n, 18, vec![Some(x), Some(w), None], &[]).unwrap();
        assert_eq!(
            out[0].shape.as_deref().unwrap(),
            &[
                Dim::Sym("N".into()),
                Dim::Known(16),
                Dim::Known(112),
                Dim::Unknown
            ]
        );
    }

    #[test]
    fn hostile_attributes_are_errors_not_panics() {
        let x = t(&[1, 1, 4, 4], vec![0.0; 16]);
        let w = t(&[1, 1, 2, 2], vec![1.0; 4]);
        let cases = [
            ("pads", Attr::Ints(vec![i64::MAX, 0, 0, 0])),
            ("pads", Attr::Ints(vec![1 << 40, 1 << 40, 1 << 40, 1 << 40])),
            ("strides", Attr::Ints(vec![0, 1])),
            ("dilations", Attr::Ints(vec![i64::MAX, 1])),
            ("group", Attr::Int(i64::MAX)),
            ("group", Attr::Int(0)),
            ("auto_pad", Attr::String("SIDEWAYS".into())),
        ];
        for (key, value) in cases {
            let n = node("Conv", 2).with_attr(key, value.clone());
            for constant in [[false, true], [false, false]] {
                let r = run(&n, 18, &[Some(&x), Some(&w)], &constant, None);
                assert!(r.is_err(), "{key} = {value:?} should fail");
            }
        }
    }

    #[test]
    fn channel_mismatch_names_the_node() {
        let x = t(&[1, 3, 4, 4], vec![0.0; 48]);
        let w = t(&[2, 2, 3, 3], vec![0.0; 36]);
        for constant in [[false, true], [false, false]] {
            let err = run(&node("Conv", 2), 18, &[Some(&x), Some(&w)], &constant, None)
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(err.contains("n0") && err.contains("channels"), "{err}");
        }
        let x = t(&[1, 2, 2, 2, 2], vec![0.0; 16]);
        let w = t(&[1, 2, 1, 1, 1], vec![0.0; 2]);
        assert!(run(
            &node("Conv", 2),
            18,
            &[Some(&x), Some(&w)],
            &[false, false],
            None
        )
        .is_err());
    }
}
