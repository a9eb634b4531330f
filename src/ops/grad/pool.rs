//! Backward of `MaxPool` (opsets 1-21), `AveragePool` (1-21), `GlobalAveragePool` and
//! `GlobalMaxPool` (1-21), 1-D and 2-D.
//!
//! Max pooling routes each output gradient to the first input of its window holding the
//! maximum (the element the forward picked; NaN never wins). Average pooling spreads it
//! evenly over the window's input elements, divided by the same count as the forward
//! (`count_include_pad` decides whether padding positions count).

use rayon::prelude::*;

use super::window::{nchw, resolve, Window2d};
use super::{f32_tensor, f32s, GradCtx};
use crate::error::Result;
use crate::ir::Tensor;
use crate::kernels::pool::Pool2dGeom;

/// The window of output `o` along one axis: first input index (may be negative), the range
/// of kernel taps landing inside `0..size`, and the number of taps inside the padded extent
/// (the `count_include_pad` divisor).
#[derive(Clone, Copy, Debug)]
struct Span {
    start: isize,
    taps: (usize, usize),
    padded: usize,
}

fn span(win: &Window2d, axis: usize, o: usize, size: usize) -> Span {
    let lo = win.pads[axis] as isize;
    let hi = (size + win.pads[axis + 2]) as isize;
    let start = (o * win.stride[axis]) as isize - lo;
    let d = win.dilation[axis] as isize;
    let (mut first, mut last, mut padded) = (usize::MAX, 0, 0);
    for k in 0..win.kernel[axis] {
        let i = start + k as isize * d;
        if i >= 0 && i < size as isize {
            first = first.min(k);
            last = k + 1;
        }
        if i >= -lo && i < hi {
            padded += 1;
        }
    }
    Span {
        start,
        taps: if first == usize::MAX {
            (0, 0)
        } else {
            (first, last)
        },
        padded,
    }
}

pub fn grad(ctx: &GradCtx) -> Result<Vec<Option<Tensor>>> {
    let node = ctx.node;
    if !ctx.wants(0) {
        return Ok(vec![None]);
    }
    let x = ctx.input(0)?;
    let [n, c, h, w] = nchw(node, x.shape())?;
    let kernel: Vec<usize> = node
        .attr_ints("kernel_shape")?
        .ok_or_else(|| ctx.error("pooling needs 'kernel_shape'"))?
        .iter()
        .map(|&v| v.max(0) as usize)
        .collect();
    let win = resolve(node, &kernel, &x.shape()[2..])?;
    let geom = Pool2dGeom {
        kernel: win.kernel,
        stride: win.stride,
        dilation: win.dilation,
        pads: win.pads,
        ceil_mode: node.attr_int_or("ceil_mode", 0)? != 0,
    };
    let (oh, ow) = geom.out_hw(h, w).map_err(|e| e.at_node(node))?;
    let g = ctx.grad_or_zeros(0)?;
    if g.numel() != n * c * oh * ow {
        return Err(ctx.error(format!(
            "output gradient {:?} does not match the pooled shape [{n}, {c}, {oh}, {ow}]",
            g.shape()
        )));
    }
    let is_max = node.op_type == "MaxPool";
    if is_max
        && win.kernel == [2, 2]
        && win.stride == [2, 2]
        && win.pads == [0; 4]
        && win.dilation == [1, 1]
        && (oh, ow) == (h / 2, w / 2)
    {
        let dx = max_pool_2x2(f32s(x), f32s(&g), (h, w), (oh, ow));
        return Ok(vec![Some(f32_tensor(x.shape(), dx)?)]);
    }
    let include_pad = node.attr_int_or("count_include_pad", 0)? != 0;
    let rows: Vec<Span> = (0..oh).map(|o| span(&win, 0, o, h)).collect();
    let cols: Vec<Span> = (0..ow).map(|o| span(&win, 1, o, w)).collect();
    let (dh, dw) = (win.dilation[0] as isize, win.dilation[1] as isize);
    let (xv, gv) = (f32s(x), f32s(&g));
    let mut dx = vec![0.0f32; x.numel()];
    dx.par_chunks_mut(h * w).enumerate().for_each(|(p, dst)| {
        let xs = &xv[p * h * w..(p + 1) * h * w];
        let gs = &gv[p * oh * ow..(p + 1) * oh * ow];
        for (r, grow) in rows.iter().zip(gs.chunks_exact(ow)) {
            for (c, &gval) in cols.iter().zip(grow) {
                // Flat index of tap (ky, kx): base + ky * ystep + kx * xstep.
                let base = r.start * w as isize + c.start;
                let (ystep, xstep) = (dh * w as isize, dw);
                let at = |ky: usize, kx: usize| {
                    (base + ky as isize * ystep + kx as isize * xstep) as usize
                };
                if is_max {
                    if r.taps.0 == r.taps.1 || c.taps.0 == c.taps.1 {
                        continue;
                    }
                    // Branch-free running argmax: the first maximum wins, as in the forward.
                    let mut best = at(r.taps.0, c.taps.0);
                    let mut best_v = xs[best];
                    for ky in r.taps.0..r.taps.1 {
                        for kx in c.taps.0..c.taps.1 {
                            let i = at(ky, kx);
                            let v = xs[i];
                            let better = v > best_v;
                            best = if better { i } else { best };
                            best_v = if better { v } else { best_v };
                        }
                    }
                    dst[best] += gval;
                } else {
                    let inside = (r.taps.1 - r.taps.0) * (c.taps.1 - c.taps.0);
                    let count = if include_pad {
                        r.padded * c.padded
                    } else {
                        inside
                    };
                    if count == 0 {
                        continue;
                    }
                    let share = gval / count as f32;
                    for ky in r.taps.0..r.taps.1 {
                        for kx in c.taps.0..c.taps.1 {
                            dst[at(ky, kx)] += share;
                        }
                    }
                }
            }
        }
    });
    Ok(vec![Some(f32_tensor(x.shape(), dx)?)])
}

/// The common 2x2, stride-2 max pool: windows do not overlap, so each input receives either
/// its window's gradient or zero, written directly without a separate zeroing pass.
fn max_pool_2x2(
    xv: &[f32],
    gv: &[f32],
    (h, w): (usize, usize),
    (oh, ow): (usize, usize),
) -> Vec<f32> {
    let avx = crate::kernels::simd::has_avx2_fma();
    let mut dx = vec![0.0f32; xv.len()];
    dx.par_chunks_mut(h * w).enumerate().for_each(|(p, dst)| {
        let xs = &xv[p * h * w..(p + 1) * h * w];
        let gs = &gv[p * oh * ow..(p + 1) * oh * ow];
        for (oy, grow) in gs.chunks_exact(ow).enumerate() {
            let (r0, r1) = (
                &xs[2 * oy * w..(2 * oy + 1) * w],
                &xs[(2 * oy + 1) * w..(2 * oy + 2) * w],
            );
            let (d0, d1) = dst[2 * oy * w..(2 * oy + 2) * w].split_at_mut(w);
            let mut done = 0;
            #[cfg(target_arch = "x86_64")]
            if avx {
                // SAFETY: AVX2 was detected; every row holds `w >= 2 * ow` values.
                done = unsafe { max_2x2_rows_avx2(r0, r1, grow, d0, d1) };
            }
            let _ = avx;
            for (ox, &gval) in grow.iter().enumerate().skip(done) {
                let c = 2 * ox;
                let v = [r0[c], r0[c + 1], r1[c], r1[c + 1]];
                // First maximum, as the forward picks it; branch-free.
                let mut best = 0;
                for k in 1..4 {
                    best = if v[k] > v[best] { k } else { best };
                }
                d0[c] = if best == 0 { gval } else { 0.0 };
                d0[c + 1] = if best == 1 { gval } else { 0.0 };
                d1[c] = if best == 2 { gval } else { 0.0 };
                d1[c + 1] = if best == 3 { gval } else { 0.0 };
            }
        }
    });
    dx
}

/// Eight windows of one row pair at a time: de-interleave the even and odd columns, pick the
/// first maximum of each window with the same strict comparisons as the scalar loop, and
/// interleave the routed gradients back. Returns how many outputs of the row it handled.
///
/// # Safety
/// The CPU must support AVX2; `r0`, `r1`, `d0` and `d1` hold at least `2 * g.len()` values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn max_2x2_rows_avx2(
    r0: &[f32],
    r1: &[f32],
    g: &[f32],
    d0: &mut [f32],
    d1: &mut [f32],
) -> usize {
    use std::arch::x86_64::*;
    // Columns 2j and 2j + 1 of 16 consecutive values, each in natural order.
    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn split(p: *const f32) -> (__m256, __m256) {
        let (a, b) = (_mm256_loadu_ps(p), _mm256_loadu_ps(p.add(8)));
        let even = _mm256_shuffle_ps::<0x88>(a, b);
        let odd = _mm256_shuffle_ps::<0xDD>(a, b);
        (
            _mm256_castpd_ps(_mm256_permute4x64_pd::<0xD8>(_mm256_castps_pd(even))),
            _mm256_castpd_ps(_mm256_permute4x64_pd::<0xD8>(_mm256_castps_pd(odd))),
        )
    }
    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn join(p: *mut f32, even: __m256, odd: __m256) {
        let lo = _mm256_unpacklo_ps(even, odd);
        let hi = _mm256_unpackhi_ps(even, odd);
        _mm256_storeu_ps(p, _mm256_permute2f128_ps::<0x20>(lo, hi));
        _mm256_storeu_ps(p.add(8), _mm256_permute2f128_ps::<0x31>(lo, hi));
    }
    let n = g.len().min(r0.len() / 2).min(r1.len() / 2);
    let n = n.min(d0.len() / 2).min(d1.len() / 2);
    let mut ox = 0;
    while ox + 8 <= n {
        let c = 2 * ox;
        let (v0, v1) = split(r0.as_ptr().add(c));
        let (v2, v3) = split(r1.as_ptr().add(c));
        // `v[k] > best` (false for NaN) moves the winner, as in the scalar loop.
        let w1 = _mm256_cmp_ps::<_CMP_GT_OQ>(v1, v0);
        let m = _mm256_blendv_ps(v0, v1, w1);
        let w2 = _mm256_cmp_ps::<_CMP_GT_OQ>(v2, m);
        let m = _mm256_blendv_ps(m, v2, w2);
        let w3 = _mm256_cmp_ps::<_CMP_GT_OQ>(v3, m);
        let k2 = _mm256_andnot_ps(w3, w2);
        let k1 = _mm256_andnot_ps(_mm256_or_ps(w2, w3), w1);
        let k0 = _mm256_or_ps(_mm256_or_ps(w1, w2), w3);
        let gv = _mm256_loadu_ps(g.as_ptr().add(ox));
        join(
            d0.as_mut_ptr().add(c),
            _mm256_andnot_ps(k0, gv),
            _mm256_and_ps(k1, gv),
        );
        join(
            d1.as_mut_ptr().add(c),
            _mm256_and_ps(k2, gv),
            _mm256_and_ps(w3, gv),
        );
        ox += 8;
    }
    ox
}

pub fn global_grad(ctx: &GradCtx) -> Result<Vec<Option<Tensor>>> {
    if !ctx.wants(0) {
        return Ok(vec![None]);
    }
    let x = ctx.input(0)?;
    if x.rank() < 2 {
        return Err(ctx.error(format!("input of shape {:?} has no channels", x.shape())));
    }
    let planes = x.shape()[0] * x.shape()[1];
    let hw: usize = x.shape()[2..].iter().product();
    let g = ctx.grad_or_zeros(0)?;
    let gv = f32s(&g);
    if gv.len() != planes {
        return Err(ctx.error(format!(
            "output gradient {:?} should have one value per plane ({planes})",
            g.shape()
        )));
    }
    let xv = f32s(x);
    let is_max = ctx.node.op_type == "GlobalMaxPool";
    let mut dx = vec![0.0f32; x.numel()];
    if hw > 0 {
        dx.par_chunks_mut(hw).enumerate().for_each(|(p, dst)| {
            if is_max {
                let src = &xv[p * hw..(p + 1) * hw];
                let mut best = 0;
                for (i, &v) in src.iter().enumerate() {
                    if v > src[best] || src[best].is_nan() && !v.is_nan() {
                        best = i;
                    }
                }
                dst[best] = gv[p];
            } else {
                dst.fill(gv[p] / hw as f32);
            }
        });
    }
    Ok(vec![Some(f32_tensor(x.shape(), dx)?)])
}

#[cfg(test)]
mod tests {
    use super::super::check::{check_node, Rng};
    use crate::ir::{Attr, Node};

    fn pool(op: &str, attrs: &[(&str, Attr)]) -> Node {
        let mut n = Node::new("p", op, vec!["x".into()], vec!["y".into()]);
        for (k, v) in attrs {
            n = n.with_attr(k, v.clone());
        }
        n
    }

    /// Input shape, attributes.
    type Case = (Vec<usize>, Vec<(&'static str, Attr)>);

    #[test]
    fn pools_match_finite_differences() {
        let mut rng = Rng::new(41);
        let ints = |v: &[i64]| Attr::Ints(v.to_vec());
        let cases: Vec<Case> = vec![
            (
                vec![2, 2, 6, 6],
                vec![("kernel_shape", ints(&[2, 2])), ("strides", ints(&[2, 2]))],
            ),
            (
                vec![1, 3, 7, 5],
                vec![
                    ("kernel_shape", ints(&[3, 2])),
                    ("strides", ints(&[2, 1])),
                    ("pads", ints(&[1, 0, 1, 1])),
                ],
            ),
            (
                vec![1, 2, 6, 7],
                vec![
                    ("kernel_shape", ints(&[3, 3])),
                    ("strides", ints(&[2, 2])),
                    ("ceil_mode", Attr::Int(1)),
                    ("pads", ints(&[1, 1, 1, 1])),
                ],
            ),
            (
                vec![2, 2, 9],
                vec![("kernel_shape", ints(&[3])), ("strides", ints(&[2]))],
            ),
        ];
        for (shape, attrs) in cases {
            // Distinct values so no max-pool window has a tie within eps.
            let x = rng.distinct(&shape, 0.05);
            check_node(
                &pool("MaxPool", &attrs),
                13,
                &[Some(x.clone())],
                &[true],
                1e-3,
                2e-3,
            );
            for include in [0, 1] {
                let mut a = attrs.clone();
                a.push(("count_include_pad", Attr::Int(include)));
                check_node(
                    &pool("AveragePool", &a),
                    13,
                    &[Some(x.clone())],
                    &[true],
                    1e-2,
                    2e-3,
                );
            }
            check_node(
                &pool("GlobalAveragePool", &[]),
                13,
                &[Some(x.clone())],
                &[true],
                1e-2,
                2e-3,
            );
            check_node(
                &pool("GlobalMaxPool", &[]),
                13,
                &[Some(x)],
                &[true],
                1e-3,
                2e-3,
            );
        }
    }

    /// The vectorised 2x2 routing agrees with a plain first-maximum loop, ties and NaN
    /// included, on rows long enough for the vector body and its scalar tail.
    #[test]
    fn max_pool_2x2_routes_to_the_first_maximum() {
        let (planes, h, w) = (3, 6, 45);
        let (oh, ow) = (h / 2, w / 2);
        let mut state = 7u32;
        let x: Vec<f32> = (0..planes * h * w)
            .map(|i| {
                state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                // Few distinct levels, so windows often tie; a sprinkling of NaN.
                if i % 97 == 5 {
                    f32::NAN
                } else {
                    (state >> 29) as f32
                }
            })
            .collect();
        let g: Vec<f32> = (0..planes * oh * ow).map(|i| 1.0 + i as f32).collect();
        let mut want = vec![0.0f32; x.len()];
        for p in 0..planes {
            for oy in 0..oh {
                for ox in 0..ow {
                    let at = |k: usize| p * h * w + (2 * oy + k / 2) * w + 2 * ox + k % 2;
                    let mut best = 0;
                    for k in 1..4 {
                        if x[at(k)] > x[at(best)] {
                            best = k;
                        }
                    }
                    want[at(best)] = g[(p * oh + oy) * ow + ox];
                }
            }
        }
        let got = super::max_pool_2x2(&x, &g, (h, w), (oh, ow));
        assert_eq!(got, want);
    }
}
