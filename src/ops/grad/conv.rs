//! Backward of ONNX `Conv` (opsets 1-21), 1-D and 2-D, any `group` (depthwise included),
//! strides, dilations, pads and `auto_pad`, on [`crate::kernels::conv_grad`].

use super::window::{nchw, resolve};
use super::{f32_tensor, f32s, GradCtx};
use crate::error::Result;
use crate::ir::Tensor;
use crate::kernels::conv::Conv2dGeom;
use crate::kernels::conv_grad::{conv2d_backward_data, conv2d_backward_weight, sum_f32};

pub fn grad(ctx: &GradCtx) -> Result<Vec<Option<Tensor>>> {
    let node = ctx.node;
    let e = |err: crate::Error| err.at_node(node);
    let x = ctx.input(0)?;
    let wt = ctx.input(1)?;
    let [n, c, h, w] = nchw(node, x.shape())?;
    let ws = wt.shape();
    if ws.len() != x.rank() {
        return Err(ctx.error(format!(
            "weight of shape {ws:?} does not match input of shape {:?}",
            x.shape()
        )));
    }
    let group = node.attr_int_or("group", 1)?;
    if group < 1 {
        return Err(ctx.error(format!("group {group} must be positive")));
    }
    let kernel: Vec<usize> = match node.attr_ints("kernel_shape")? {
        Some(k) => k.iter().map(|&v| v.max(0) as usize).collect(),
        None => ws[2..].to_vec(),
    };
    if kernel != ws[2..] {
        return Err(ctx.error(format!(
            "kernel_shape {kernel:?} disagrees with weight shape {ws:?}"
        )));
    }
    let spatial = &x.shape()[2..];
    let win = resolve(node, &kernel, spatial)?;
    let geom = Conv2dGeom {
        c_in: c,
        c_out: ws[0],
        groups: group as usize,
        kernel: win.kernel,
        stride: win.stride,
        dilation: win.dilation,
        pads: win.pads,
    };
    geom.validate().map_err(e)?;
    if ws[1] * geom.groups != c {
        return Err(ctx.error(format!(
            "input has {c} channels but weight {ws:?} with group {group} expects {}",
            ws[1] * geom.groups
        )));
    }
    let g = ctx.grad_or_zeros(0)?;
    let mut out = vec![None; ctx.inputs.len().max(2)];
    let has_bias = ctx.inputs.get(2).copied().flatten().is_some();
    let want_db = has_bias && ctx.wants(2);
    let mut db = vec![0.0f32; if want_db { ws[0] } else { 0 }];
    if ctx.wants(1) {
        let mut dw = vec![0.0f32; wt.numel()];
        let db_arg = want_db.then_some(&mut db[..]);
        conv2d_backward_weight(&geom, f32s(x), [n, h, w], f32s(&g), &mut dw, db_arg).map_err(e)?;
        out[1] = Some(f32_tensor(ws, dw)?);
    } else if want_db {
        let p = g.numel() / (n * ws[0]).max(1);
        for (i, plane) in f32s(&g).chunks_exact(p.max(1)).enumerate() {
            db[i % ws[0]] += sum_f32(plane);
        }
    }
    if want_db {
        out[2] = Some(f32_tensor(&[ws[0]], db)?);
    }
    if ctx.wants(0) {
        let mut dx = vec![0.0f32; x.numel()];
        conv2d_backward_data(&geom, f32s(wt), f32s(&g), [n, h, w], &mut dx).map_err(e)?;
        out[0] = Some(f32_tensor(x.shape(), dx)?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::super::check::{check_node, Rng};
    use crate::ir::{Attr, Node};

    fn conv(attrs: &[(&str, Attr)], bias: bool) -> Node {
        let mut inputs = vec!["x".to_string(), "w".to_string()];
        if bias {
            inputs.push("b".into());
        }
        let mut n = Node::new("conv", "Conv", inputs, vec!["y".into()]);
        for (k, v) in attrs {
            n = n.with_attr(k, v.clone());
        }
        n
    }

    /// Input shape, weight shape, attributes.
    type Case = (Vec<usize>, Vec<usize>, Vec<(&'static str, Attr)>);

    #[test]
    fn conv_matches_finite_differences() {
        let mut rng = Rng::new(31);
        let ints = |v: &[i64]| Attr::Ints(v.to_vec());
        let cases: Vec<Case> = vec![
            (
                vec![2, 3, 5, 6],
                vec![4, 3, 3, 3],
                vec![("pads", ints(&[1, 1, 1, 1]))],
            ),
            (
                vec![1, 4, 7, 6],
                vec![6, 2, 3, 2],
                vec![
                    ("group", Attr::Int(2)),
                    ("strides", ints(&[2, 1])),
                    ("dilations", ints(&[1, 2])),
                    ("pads", ints(&[1, 0, 2, 1])),
                ],
            ),
            (
                vec![2, 3, 6, 6],
                vec![3, 1, 3, 3],
                vec![
                    ("group", Attr::Int(3)),
                    ("strides", ints(&[2, 2])),
                    ("pads", ints(&[1, 1, 1, 1])),
                ],
            ),
            (
                vec![1, 2, 5, 5],
                vec![4, 1, 3, 3],
                vec![
                    ("group", Attr::Int(2)),
                    ("auto_pad", Attr::String("SAME_UPPER".into())),
                ],
            ),
            (
                vec![2, 3, 9],
                vec![2, 3, 3],
                vec![("strides", ints(&[2])), ("pads", ints(&[1, 2]))],
            ),
        ];
        for (xs, wsh, attrs) in cases {
            let x = rng.tensor(&xs);
            let w = rng.tensor(&wsh);
            let b = rng.tensor(&[wsh[0]]);
            check_node(
                &conv(&attrs, true),
                13,
                &[Some(x.clone()), Some(w.clone()), Some(b)],
                &[true, true, true],
                1e-2,
                2e-3,
            );
            check_node(
                &conv(&attrs, false),
                13,
                &[Some(x), Some(w)],
                &[false, true],
                1e-2,
                2e-3,
            );
        }
    }
}
