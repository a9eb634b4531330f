//! Backward of the 2-D convolution ([`super::conv`]): the weight (and bias) gradient and the
//! input gradient, NCHW f32, any groups, strides, dilations and asymmetric pads.
//!
//! - Weight gradient: one GEMM per group over the whole batch,
//!   `dW_g [C_out/g x K] = dY_g [C_out/g x N*P] * im2col(X)_g^T [N*P x K]`, with `dY`
//!   regrouped channel-major and the transposed im2col matrix an implicit [`GatherRef`] over
//!   a zero-padded copy of the batch, so the depth of the product is the whole batch.
//! - Input gradient: per image, `dcol [K x P] = W_g^T dY_g` with the weights packed once,
//!   then col2im scatter-adds `dcol` into the (padded) image. Images are independent, so
//!   they run in parallel with no reduction.
//! - Depthwise-style convolutions (one input channel per group) use direct loops: their
//!   per-group GEMMs would have a single row.
//!
//! Every reduction runs in a fixed order, so results do not depend on scheduling.

use rayon::prelude::*;

use super::conv::Conv2dGeom;
use super::gemm::{self, Epilogue, GatherRef, Lhs, MatMut, MatRef, PackedA, Rhs};
use super::scratch;
use super::simd::has_avx2_fma;
use crate::error::{Error, Result};

/// Sum of `v` in a fixed order: 32 interleaved partial sums (which the compiler keeps in four
/// vector registers) combined pairwise, then the tail. A plain `iter().sum()` is one serial
/// chain of dependent adds, four cycles per element; bias gradients sum whole planes.
pub fn sum_f32(v: &[f32]) -> f32 {
    let mut acc = [0.0f32; 32];
    let chunks = v.chunks_exact(32);
    let tail: f32 = chunks.remainder().iter().sum();
    for c in chunks {
        for (a, &x) in acc.iter_mut().zip(c) {
            *a += x;
        }
    }
    let mut width = 16;
    while width > 0 {
        for i in 0..width {
            acc[i] += acc[i + width];
        }
        width /= 2;
    }
    acc[0] + tail
}

/// `(oh, ow)`, after checking the buffer sizes of a backward call.
fn check(
    g: &Conv2dGeom,
    [n, h, w]: [usize; 3],
    x_len: usize,
    dy_len: usize,
    w_len: usize,
) -> Result<(usize, usize)> {
    g.validate()?;
    let (oh, ow) = g.out_hw(h, w)?;
    let k = g.c_in / g.groups * g.kernel[0] * g.kernel[1];
    if x_len != n * g.c_in * h * w || dy_len != n * g.c_out * oh * ow || w_len != g.c_out * k {
        return Err(Error::Shape(format!(
            "conv backward: input has {x_len} values for [{n}, {}, {h}, {w}], output gradient \
             {dy_len} for [{n}, {}, {oh}, {ow}], weights {w_len} for {} x {k}",
            g.c_in, g.c_out, g.c_out
        )));
    }
    Ok((oh, ow))
}

/// Offsets of the im2col matrix over one `[C, hp, wp]` padded image: row `(c, ky, kx)`, and
/// column `(oy, ox)`.
fn im2col_offsets(
    g: &Conv2dGeom,
    (oh, ow): (usize, usize),
    (hp, wp): (usize, usize),
) -> (Vec<usize>, Vec<usize>) {
    let [kh, kw] = g.kernel;
    let k = g.c_in / g.groups * kh * kw;
    let rows = (0..k)
        .map(|p| {
            let (c, ky, kx) = (p / (kh * kw), p / kw % kh, p % kw);
            c * hp * wp + ky * g.dilation[0] * wp + kx * g.dilation[1]
        })
        .collect();
    let cols = (0..oh * ow)
        .map(|j| (j / ow) * g.stride[0] * wp + (j % ow) * g.stride[1])
        .collect();
    (rows, cols)
}

/// One input channel per group, several groups: the per-group input-gradient GEMMs would
/// have a single row, so direct loops do better.
fn is_depthwise_like(g: &Conv2dGeom) -> bool {
    g.groups > 1 && g.c_in == g.groups
}

/// Copies `[c, h, w]` planes into `[c, hp, wp]` planes with zero borders.
fn pad_planes(x: &[f32], dst: &mut [f32], (h, w): (usize, usize), pads: [usize; 4]) {
    let wp = w + pads[1] + pads[3];
    let hp = h + pads[0] + pads[2];
    for (src, d) in x.chunks_exact(h * w).zip(dst.chunks_exact_mut(hp * wp)) {
        d.fill(0.0);
        for (s, row) in src
            .chunks_exact(w)
            .zip(d[pads[0] * wp..].chunks_exact_mut(wp))
        {
            row[pads[1]..pads[1] + w].copy_from_slice(s);
        }
    }
}

/// Gradients of the weights (`[C_out, C_in/groups, kh, kw]`) and, when asked, the bias
/// (`[C_out]`) of a convolution of `x` (`[n, C_in, h, w]`) whose output gradient is `dy`.
/// Both are overwritten.
pub fn conv2d_backward_weight(
    g: &Conv2dGeom,
    x: &[f32],
    [n, h, w]: [usize; 3],
    dy: &[f32],
    dw: &mut [f32],
    db: Option<&mut [f32]>,
) -> Result<()> {
    let (oh, ow) = check(g, [n, h, w], x.len(), dy.len(), dw.len())?;
    let p = oh * ow;
    if let Some(db) = db {
        if db.len() != g.c_out {
            return Err(Error::Shape(format!(
                "conv backward: bias gradient has {} values for {} channels",
                db.len(),
                g.c_out
            )));
        }
        db.par_iter_mut().enumerate().for_each(|(co, b)| {
            *b = (0..n)
                .map(|i| {
                    let s = (i * g.c_out + co) * p;
                    sum_f32(&dy[s..s + p])
                })
                .sum();
        });
    }
    if dw.is_empty() {
        return Ok(());
    }
    if n == 0 || p == 0 {
        dw.fill(0.0);
        return Ok(());
    }
    if g.c_in == g.groups {
        depthwise_weight(g, x, [n, h, w], (oh, ow), dy, dw);
        return Ok(());
    }
    let pads = g.pads;
    let (hp, wp) = (h + pads[0] + pads[2], w + pads[1] + pads[3]);
    // The gathered GEMM reads whole SIMD vectors, so the input is copied (padded or not)
    // into a buffer with GATHER_SLACK floats past its end.
    let mut xp = vec![0.0f32; n * g.c_in * hp * wp + gemm::GATHER_SLACK];
    xp[..n * g.c_in * hp * wp]
        .par_chunks_mut(g.c_in * hp * wp)
        .zip(x.par_chunks(g.c_in * h * w))
        .for_each(|(d, s)| pad_planes(s, d, (h, w), pads));
    // dY regrouped as [C_out, N * P] so each group's rows are one dense matrix.
    let np = n * p;
    let mut dyt = vec![0.0f32; g.c_out * np];
    dyt.par_chunks_mut(np).enumerate().for_each(|(co, row)| {
        for (i, dst) in row.chunks_exact_mut(p).enumerate() {
            let s = (i * g.c_out + co) * p;
            dst.copy_from_slice(&dy[s..s + p]);
        }
    });
    let (k_off, j_off) = im2col_offsets(g, (oh, ow), (hp, wp));
    let image = g.c_in * hp * wp;
    let rows: Vec<usize> = (0..n)
        .flat_map(|i| j_off.iter().map(move |&o| i * image + o))
        .collect();
    let cin_g = g.c_in / g.groups;
    let cout_g = g.c_out / g.groups;
    let k = k_off.len();
    for gi in 0..g.groups {
        let base = &xp[gi * cin_g * hp * wp..];
        gemm::gemm(
            1.0,
            Lhs::Mat(MatRef::row_major(
                &dyt[gi * cout_g * np..(gi + 1) * cout_g * np],
                cout_g,
                np,
            )?),
            Rhs::Gather(GatherRef::new(base, &rows, &k_off)?),
            0.0,
            MatMut::row_major(&mut dw[gi * cout_g * k..(gi + 1) * cout_g * k], cout_g, k)?,
            Epilogue::default(),
        )?;
    }
    Ok(())
}

/// Output positions `o` along one axis whose tap at kernel offset `off` (dilated, minus the
/// leading pad) lands inside `0..size`: the range `lo..hi`.
fn valid_range(out: usize, stride: usize, off: usize, pad: usize, size: usize) -> (usize, usize) {
    // Input index = o * stride + off - pad.
    let lo = if pad > off {
        (pad - off).div_ceil(stride)
    } else {
        0
    };
    let hi = if size + pad > off {
        ((size + pad - off - 1) / stride + 1).min(out)
    } else {
        0
    };
    (lo, hi.max(lo))
}

/// Weight gradient when each group has a single input channel (depthwise, its channel
/// multiplier form, and a first layer on gray images): direct dot products, parallel over
/// output channels. `K` is tiny here, so a GEMM would spend its time packing.
fn depthwise_weight(
    g: &Conv2dGeom,
    x: &[f32],
    [n, h, w]: [usize; 3],
    (oh, ow): (usize, usize),
    dy: &[f32],
    dw: &mut [f32],
) {
    let [kh, kw] = g.kernel;
    let avx = has_avx2_fma();
    dw.par_chunks_mut(kh * kw)
        .enumerate()
        .for_each(|(co, taps)| {
            let job = ChannelJob {
                g,
                x,
                dims: [n, h, w],
                out: (oh, ow),
                dy,
                co,
                avx,
            };
            job.run(taps);
        });
}

/// The weight gradient of one output channel of a single-input-channel-per-group conv.
struct ChannelJob<'a> {
    g: &'a Conv2dGeom,
    x: &'a [f32],
    dims: [usize; 3],
    out: (usize, usize),
    dy: &'a [f32],
    co: usize,
    avx: bool,
}

impl ChannelJob<'_> {
    fn run(&self, taps: &mut [f32]) {
        if self.g.stride == [1, 1] {
            self.run_flat(taps)
        } else {
            self.run_rows(taps)
        }
    }

    /// Stride 1: with `dY` laid out at the padded input's row pitch (zeros past each row),
    /// tap `(ky, kx)` is one contiguous dot product per image, at a fixed offset into the
    /// padded input plane.
    fn run_flat(&self, taps: &mut [f32]) {
        let Self { g, x, dy, co, .. } = *self;
        let [n, h, w] = self.dims;
        let (oh, ow) = self.out;
        let [kh, kw] = g.kernel;
        let ci = co / (g.c_out / g.groups);
        let (hp, wp) = (h + g.pads[0] + g.pads[2], w + g.pads[1] + g.pads[3]);
        let len = (oh - 1) * wp + ow;
        let offsets: Vec<usize> = (0..kh * kw)
            .map(|t| (t / kw) * g.dilation[0] * wp + (t % kw) * g.dilation[1])
            .collect();
        let mut acc: Vec<Lanes> = (0..kh * kw).map(|_| Lanes::default()).collect();
        let padded = g.pads != [0; 4];
        scratch::with_f32(hp * wp + oh * wp, |buf| {
            let (xbuf, dbuf) = buf.split_at_mut(hp * wp);
            for i in 0..n {
                let xs = &x[(i * g.c_in + ci) * h * w..][..h * w];
                let ds = &dy[(i * g.c_out + co) * oh * ow..][..oh * ow];
                let xp: &[f32] = if padded {
                    pad_planes(xs, xbuf, (h, w), g.pads);
                    xbuf
                } else {
                    xs
                };
                let dp: &[f32] = if wp == ow {
                    ds
                } else {
                    for (src, dst) in ds.chunks_exact(ow).zip(dbuf.chunks_exact_mut(wp)) {
                        dst[..ow].copy_from_slice(src);
                        dst[ow..].fill(0.0);
                    }
                    dbuf
                };
                for (a, &off) in acc.iter_mut().zip(&offsets) {
                    a.dot(&dp[..len], &xp[off..off + len], self.avx);
                }
            }
        });
        for (t, a) in taps.iter_mut().zip(&acc) {
            *t = a.sum();
        }
    }

    /// Any stride: one short dot product per output row.
    fn run_rows(&self, taps: &mut [f32]) {
        let Self { g, x, dy, co, .. } = *self;
        let [n, h, w] = self.dims;
        let (oh, ow) = self.out;
        let kw = g.kernel[1];
        let ci = co / (g.c_out / g.groups);
        for (t, tap) in taps.iter_mut().enumerate() {
            let (ky, kx) = (t / kw, t % kw);
            let (oy0, oy1) = valid_range(oh, g.stride[0], ky * g.dilation[0], g.pads[0], h);
            let (ox0, ox1) = valid_range(ow, g.stride[1], kx * g.dilation[1], g.pads[1], w);
            let x0 = ox0 * g.stride[1] + kx * g.dilation[1];
            if x0 < g.pads[1] || ox0 >= ox1 {
                *tap = 0.0;
                continue;
            }
            let x0 = x0 - g.pads[1];
            let mut acc = Lanes::default();
            for i in 0..n {
                let xs = &x[(i * g.c_in + ci) * h * w..][..h * w];
                let ds = &dy[(i * g.c_out + co) * oh * ow..][..oh * ow];
                for oy in oy0..oy1 {
                    let iy = oy * g.stride[0] + ky * g.dilation[0] - g.pads[0];
                    let xrow = &xs[iy * w..(iy + 1) * w];
                    let drow = &ds[oy * ow + ox0..oy * ow + ox1];
                    if g.stride[1] == 1 {
                        acc.dot(drow, &xrow[x0..x0 + drow.len()], self.avx);
                    } else {
                        for (j, &d) in drow.iter().enumerate() {
                            acc.tail += d * xrow[x0 + j * g.stride[1]];
                        }
                    }
                }
            }
            *tap = acc.sum();
        }
    }
}

/// `y += alpha * x` (equal lengths), with 8-lane FMAs when available.
fn axpy(alpha: f32, x: &[f32], y: &mut [f32], avx: bool) {
    let n = x.len().min(y.len());
    #[cfg(target_arch = "x86_64")]
    if avx {
        // SAFETY: AVX2 and FMA support was checked at run time; both slices hold `n` values.
        unsafe { axpy_avx2(alpha, &x[..n], &mut y[..n]) };
        return;
    }
    let _ = avx;
    for (d, &s) in y[..n].iter_mut().zip(&x[..n]) {
        *d += alpha * s;
    }
}

/// # Safety
/// The CPU must support AVX2 and FMA; `x.len() == y.len()`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn axpy_avx2(alpha: f32, x: &[f32], y: &mut [f32]) {
    use std::arch::x86_64::*;
    let n = x.len();
    let (px, py) = (x.as_ptr(), y.as_mut_ptr());
    let a = _mm256_set1_ps(alpha);
    let mut i = 0;
    while i + 8 <= n {
        _mm256_storeu_ps(
            py.add(i),
            _mm256_fmadd_ps(a, _mm256_loadu_ps(px.add(i)), _mm256_loadu_ps(py.add(i))),
        );
        i += 8;
    }
    while i < n {
        *py.add(i) = alpha.mul_add(*px.add(i), *py.add(i));
        i += 1;
    }
}

/// Thirty-two independent partial sums (four 8-lane vectors, enough to hide the latency of
/// the adds) plus a scalar tail, always combined in the same order.
struct Lanes {
    v: [f32; LANES],
    tail: f32,
}

const LANES: usize = 32;

impl Default for Lanes {
    fn default() -> Lanes {
        Lanes {
            v: [0.0; LANES],
            tail: 0.0,
        }
    }
}

impl Lanes {
    /// Adds `a . b` (equal lengths).
    #[inline]
    fn dot(&mut self, a: &[f32], b: &[f32], avx: bool) {
        let n = a.len().min(b.len());
        let (a, b) = (&a[..n], &b[..n]);
        #[cfg(target_arch = "x86_64")]
        if avx {
            // SAFETY: AVX2 and FMA support was checked at run time; `a` and `b` have `n`
            // elements each.
            unsafe { self.dot_avx2(a, b) };
            return;
        }
        let _ = avx;
        let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
        for (x, y) in ca.remainder().iter().zip(cb.remainder()) {
            self.tail += x * y;
        }
        for (x, y) in ca.zip(cb) {
            for ((acc, &p), &q) in self.v.iter_mut().zip(x).zip(y) {
                *acc += p * q;
            }
        }
    }

    /// Four 8-lane FMA accumulators over 32-element blocks, then 8-element blocks into the
    /// first, then scalars.
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA; `a.len() == b.len()`.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn dot_avx2(&mut self, a: &[f32], b: &[f32]) {
        use std::arch::x86_64::*;
        let n = a.len();
        let (pa, pb, pv) = (a.as_ptr(), b.as_ptr(), self.v.as_mut_ptr());
        let mut acc = [
            _mm256_loadu_ps(pv),
            _mm256_loadu_ps(pv.add(8)),
            _mm256_loadu_ps(pv.add(16)),
            _mm256_loadu_ps(pv.add(24)),
        ];
        let mut i = 0;
        while i + 32 <= n {
            for (k, acc) in acc.iter_mut().enumerate() {
                let o = i + 8 * k;
                *acc =
                    _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(o)), _mm256_loadu_ps(pb.add(o)), *acc);
            }
            i += 32;
        }
        while i + 8 <= n {
            acc[0] = _mm256_fmadd_ps(
                _mm256_loadu_ps(pa.add(i)),
                _mm256_loadu_ps(pb.add(i)),
                acc[0],
            );
            i += 8;
        }
        for (k, acc) in acc.iter().enumerate() {
            _mm256_storeu_ps(pv.add(8 * k), *acc);
        }
        while i < n {
            self.tail += *pa.add(i) * *pb.add(i);
            i += 1;
        }
    }

    fn sum(&self) -> f32 {
        // Pairwise, in a fixed order.
        let mut v = self.v;
        let mut n = LANES;
        while n > 1 {
            n /= 2;
            for k in 0..n {
                v[k] += v[k + n];
            }
        }
        v[0] + self.tail
    }
}

/// Gradient of the input (`[n, C_in, h, w]`, overwritten) of a convolution with `weight`
/// whose output gradient is `dy`.
pub fn conv2d_backward_data(
    g: &Conv2dGeom,
    weight: &[f32],
    dy: &[f32],
    [n, h, w]: [usize; 3],
    dx: &mut [f32],
) -> Result<()> {
    let (oh, ow) = check(g, [n, h, w], dx.len(), dy.len(), weight.len())?;
    dx.fill(0.0);
    if dx.is_empty() || oh * ow == 0 {
        return Ok(());
    }
    if is_depthwise_like(g) {
        depthwise_data(g, weight, dy, [n, h, w], (oh, ow), dx);
        return Ok(());
    }
    let cin_g = g.c_in / g.groups;
    let cout_g = g.c_out / g.groups;
    let k = cin_g * g.kernel[0] * g.kernel[1];
    // W_g^T [K x C_out/g], packed once for every image.
    let packed: Vec<PackedA> = weight
        .chunks_exact(cout_g * k)
        .map(|wg| MatRef::row_major(wg, cout_g, k).map(|m| PackedA::new(m.t())))
        .collect::<Result<_>>()?;
    let threads = rayon::current_num_threads();
    let per_image = threads > 1 && n >= threads;
    let gemm_threads = if per_image { 1 } else { threads };
    let in_len = g.c_in * h * w;
    let out_len = g.c_out * oh * ow;
    let one = |(dx_img, dy_img): (&mut [f32], &[f32])| -> Result<()> {
        image_data(g, &packed, dy_img, (h, w), (oh, ow), dx_img, gemm_threads)
    };
    if per_image {
        dx.par_chunks_mut(in_len)
            .zip(dy.par_chunks(out_len))
            .try_for_each(one)
    } else {
        dx.chunks_mut(in_len)
            .zip(dy.chunks(out_len))
            .try_for_each(one)
    }
}

/// Input gradient of one image: per group `dcol = W_g^T dY_g`, then col2im.
fn image_data(
    g: &Conv2dGeom,
    packed: &[PackedA],
    dy: &[f32],
    (h, w): (usize, usize),
    (oh, ow): (usize, usize),
    dx: &mut [f32],
    threads: usize,
) -> Result<()> {
    let pads = g.pads;
    let (hp, wp) = (h + pads[0] + pads[2], w + pads[1] + pads[3]);
    let cin_g = g.c_in / g.groups;
    let cout_g = g.c_out / g.groups;
    let [kh, kw] = g.kernel;
    let k = cin_g * kh * kw;
    let p = oh * ow;
    let padded = pads != [0; 4];
    let run = |dxp: &mut [f32]| -> Result<()> {
        scratch::with_f32(k * p, |dcol| -> Result<()> {
            for gi in 0..g.groups {
                gemm::gemm_threads(
                    threads,
                    1.0,
                    Lhs::Packed(&packed[gi]),
                    Rhs::Mat(MatRef::row_major(
                        &dy[gi * cout_g * p..(gi + 1) * cout_g * p],
                        cout_g,
                        p,
                    )?),
                    0.0,
                    MatMut::row_major(dcol, k, p)?,
                    Epilogue::default(),
                )?;
                let plane0 = gi * cin_g;
                for (r, src) in dcol.chunks_exact(p).enumerate() {
                    let (c, ky, kx) = (r / (kh * kw), r / kw % kh, r % kw);
                    let dst = &mut dxp[(plane0 + c) * hp * wp..][..hp * wp];
                    let x0 = kx * g.dilation[1];
                    for (oy, srow) in src.chunks_exact(ow).enumerate() {
                        let y = oy * g.stride[0] + ky * g.dilation[0];
                        let drow = &mut dst[y * wp..(y + 1) * wp];
                        if g.stride[1] == 1 {
                            for (d, &s) in drow[x0..x0 + ow].iter_mut().zip(srow) {
                                *d += s;
                            }
                        } else {
                            for (ox, &s) in srow.iter().enumerate() {
                                drow[x0 + ox * g.stride[1]] += s;
                            }
                        }
                    }
                }
            }
            Ok(())
        })
    };
    if padded {
        scratch::with_f32(g.c_in * hp * wp, |dxp| -> Result<()> {
            dxp.fill(0.0);
            run(dxp)?;
            for (src, dst) in dxp.chunks_exact(hp * wp).zip(dx.chunks_exact_mut(h * w)) {
                for (y, drow) in dst.chunks_exact_mut(w).enumerate() {
                    let s = (y + pads[0]) * wp + pads[1];
                    drow.copy_from_slice(&src[s..s + w]);
                }
            }
            Ok(())
        })
    } else {
        run(dx)
    }
}

/// Input gradient when each group has one input channel: parallel over `(image, channel)`
/// planes, each gathering from its group's output channels.
fn depthwise_data(
    g: &Conv2dGeom,
    weight: &[f32],
    dy: &[f32],
    [_, h, w]: [usize; 3],
    (oh, ow): (usize, usize),
    dx: &mut [f32],
) {
    let avx = has_avx2_fma();
    dx.par_chunks_mut(h * w)
        .enumerate()
        .for_each(|(plane, dst)| {
            let job = PlaneJob {
                g,
                weight,
                dy,
                hw: (h, w),
                out: (oh, ow),
                plane,
                avx,
            };
            job.run(dst);
        });
}

/// The input gradient of one `(image, channel)` plane of a single-input-channel-per-group
/// conv.
struct PlaneJob<'a> {
    g: &'a Conv2dGeom,
    weight: &'a [f32],
    dy: &'a [f32],
    hw: (usize, usize),
    out: (usize, usize),
    plane: usize,
    avx: bool,
}

impl PlaneJob<'_> {
    fn run(&self, dst: &mut [f32]) {
        if self.g.stride == [1, 1] {
            self.run_flat(dst)
        } else {
            self.run_rows(dst)
        }
    }

    /// Stride 1: each tap adds a scaled copy of the row-pitched `dY` plane into the padded
    /// input plane at a fixed offset (the transpose of the weight gradient's dot products).
    fn run_flat(&self, dst: &mut [f32]) {
        let g = self.g;
        let (h, w) = self.hw;
        let (oh, ow) = self.out;
        let [kh, kw] = g.kernel;
        let cout_g = g.c_out / g.groups;
        let (i, ci) = (self.plane / g.c_in, self.plane % g.c_in);
        let (hp, wp) = (h + g.pads[0] + g.pads[2], w + g.pads[1] + g.pads[3]);
        let len = (oh - 1) * wp + ow;
        scratch::with_f32(hp * wp + oh * wp, |buf| {
            let (xbuf, dbuf) = buf.split_at_mut(hp * wp);
            xbuf.fill(0.0);
            for co in ci * cout_g..(ci + 1) * cout_g {
                let ds = &self.dy[(i * g.c_out + co) * oh * ow..][..oh * ow];
                let dp: &[f32] = if wp == ow {
                    ds
                } else {
                    for (src, d) in ds.chunks_exact(ow).zip(dbuf.chunks_exact_mut(wp)) {
                        d[..ow].copy_from_slice(src);
                        d[ow..].fill(0.0);
                    }
                    dbuf
                };
                let taps = &self.weight[co * kh * kw..(co + 1) * kh * kw];
                for (t, &wt) in taps.iter().enumerate() {
                    let off = (t / kw) * g.dilation[0] * wp + (t % kw) * g.dilation[1];
                    axpy(wt, &dp[..len], &mut xbuf[off..off + len], self.avx);
                }
            }
            for (y, row) in dst.chunks_exact_mut(w).enumerate() {
                let s = (y + g.pads[0]) * wp + g.pads[1];
                row.copy_from_slice(&xbuf[s..s + w]);
            }
        });
    }

    /// Any stride: one short scaled add per output row.
    fn run_rows(&self, dst: &mut [f32]) {
        let g = self.g;
        let (h, w) = self.hw;
        let (oh, ow) = self.out;
        let [kh, kw] = g.kernel;
        let cout_g = g.c_out / g.groups;
        let (i, ci) = (self.plane / g.c_in, self.plane % g.c_in);
        for co in ci * cout_g..(ci + 1) * cout_g {
            let ds = &self.dy[(i * g.c_out + co) * oh * ow..][..oh * ow];
            let taps = &self.weight[co * kh * kw..(co + 1) * kh * kw];
            for (t, &wt) in taps.iter().enumerate() {
                let (ky, kx) = (t / kw, t % kw);
                let (oy0, oy1) = valid_range(oh, g.stride[0], ky * g.dilation[0], g.pads[0], h);
                let (ox0, ox1) = valid_range(ow, g.stride[1], kx * g.dilation[1], g.pads[1], w);
                for oy in oy0..oy1 {
                    let iy = oy * g.stride[0] + ky * g.dilation[0] - g.pads[0];
                    let drow = &ds[oy * ow..(oy + 1) * ow];
                    let xrow = &mut dst[iy * w..(iy + 1) * w];
                    for (j, &d) in drow[ox0..ox1].iter().enumerate() {
                        let ix = (ox0 + j) * g.stride[1] + kx * g.dilation[1] - g.pads[1];
                        xrow[ix] += d * wt;
                    }
                }
            }
        }
    }
}

/// Calls `f(i, ci, co, ky, kx, oy, ox, iy, ix)` for every (image, tap, output) triple whose
/// input position falls inside the image: the plain definition of a convolution.
fn for_each_tap(
    g: &Conv2dGeom,
    [n, h, w]: [usize; 3],
    mut f: impl FnMut([usize; 9]),
) -> Result<()> {
    let (oh, ow) = g.out_hw(h, w)?;
    let cin_g = g.c_in / g.groups;
    let cout_g = g.c_out / g.groups;
    for i in 0..n {
        for co in 0..g.c_out {
            let gi = co / cout_g;
            for c in 0..cin_g {
                for ky in 0..g.kernel[0] {
                    for kx in 0..g.kernel[1] {
                        for oy in 0..oh {
                            for ox in 0..ow {
                                let iy = (oy * g.stride[0] + ky * g.dilation[0]) as isize
                                    - g.pads[0] as isize;
                                let ix = (ox * g.stride[1] + kx * g.dilation[1]) as isize
                                    - g.pads[1] as isize;
                                if iy < 0 || ix < 0 || iy >= h as isize || ix >= w as isize {
                                    continue;
                                }
                                f([
                                    i,
                                    gi * cin_g + c,
                                    co,
                                    c,
                                    ky,
                                    kx,
                                    oy * ow + ox,
                                    iy as usize,
                                    ix as usize,
                                ]);
                            }
                        }
                    }
                }
            }
        }
    }
    Ok(())
}

/// Plain-loop weight gradient, the reference the fast path is tested against.
pub fn conv2d_backward_weight_reference(
    g: &Conv2dGeom,
    x: &[f32],
    [n, h, w]: [usize; 3],
    dy: &[f32],
    dw: &mut [f32],
) -> Result<()> {
    let (oh, ow) = check(g, [n, h, w], x.len(), dy.len(), dw.len())?;
    let cin_g = g.c_in / g.groups;
    let [kh, kw] = g.kernel;
    let mut acc = vec![0.0f64; dw.len()];
    for_each_tap(g, [n, h, w], |[i, ci, co, c, ky, kx, j, iy, ix]| {
        acc[((co * cin_g + c) * kh + ky) * kw + kx] += dy[(i * g.c_out + co) * oh * ow + j] as f64
            * x[((i * g.c_in + ci) * h + iy) * w + ix] as f64;
    })?;
    for (d, a) in dw.iter_mut().zip(acc) {
        *d = a as f32;
    }
    Ok(())
}

/// Plain-loop input gradient, the reference the fast path is tested against.
pub fn conv2d_backward_data_reference(
    g: &Conv2dGeom,
    weight: &[f32],
    dy: &[f32],
    [n, h, w]: [usize; 3],
    dx: &mut [f32],
) -> Result<()> {
    let (oh, ow) = check(g, [n, h, w], dx.len(), dy.len(), weight.len())?;
    let cin_g = g.c_in / g.groups;
    let [kh, kw] = g.kernel;
    let mut acc = vec![0.0f64; dx.len()];
    for_each_tap(g, [n, h, w], |[i, ci, co, c, ky, kx, j, iy, ix]| {
        acc[((i * g.c_in + ci) * h + iy) * w + ix] += dy[(i * g.c_out + co) * oh * ow + j] as f64
            * weight[((co * cin_g + c) * kh + ky) * kw + kx] as f64;
    })?;
    for (d, a) in dx.iter_mut().zip(acc) {
        *d = a as f32;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testutil::conv_geom as geom;
    use crate::kernels::testutil::{assert_close, Rng};

    #[test]
    fn fast_paths_match_reference() {
        let mut rng = Rng::new(21);
        let cases = [
            geom(3, 4, 1, [3, 3], [1, 1], [1, 1], [1, 1, 1, 1]),
            geom(4, 6, 2, [3, 2], [2, 1], [1, 2], [1, 0, 2, 1]),
            geom(1, 20, 1, [5, 5], [1, 1], [1, 1], [0; 4]),
            geom(5, 5, 5, [3, 3], [2, 2], [1, 1], [1, 1, 1, 1]),
            geom(3, 6, 3, [3, 3], [1, 2], [2, 1], [2, 1, 0, 2]),
            geom(8, 4, 1, [1, 1], [1, 1], [1, 1], [0; 4]),
            geom(6, 9, 3, [1, 3], [1, 3], [1, 1], [0, 2, 0, 1]),
            geom(4, 8, 4, [3, 3], [1, 1], [2, 1], [1, 2, 2, 1]),
            geom(6, 6, 6, [3, 3], [1, 1], [1, 1], [1, 1, 1, 1]),
            geom(1, 3, 1, [3, 2], [1, 1], [1, 2], [2, 0, 1, 1]),
        ];
        for g in cases {
            for (n, h, w) in [(1, 7, 9), (3, 8, 6)] {
                let (oh, ow) = g.out_hw(h, w).unwrap();
                let k = g.c_in / g.groups * g.kernel[0] * g.kernel[1];
                let x = rng.vec(n * g.c_in * h * w);
                let wt = rng.vec(g.c_out * k);
                let dy = rng.vec(n * g.c_out * oh * ow);
                let mut dw = vec![f32::NAN; wt.len()];
                let mut db = vec![f32::NAN; g.c_out];
                conv2d_backward_weight(&g, &x, [n, h, w], &dy, &mut dw, Some(&mut db)).unwrap();
                let mut want = vec![0.0; wt.len()];
                conv2d_backward_weight_reference(&g, &x, [n, h, w], &dy, &mut want).unwrap();
                assert_close(&dw, &want, 1e-4, &format!("dw {g:?}"));
                let want_db: Vec<f32> = (0..g.c_out)
                    .map(|co| {
                        (0..n)
                            .flat_map(|i| dy[(i * g.c_out + co) * oh * ow..][..oh * ow].iter())
                            .sum()
                    })
                    .collect();
                assert_close(&db, &want_db, 1e-4, "db");
                let mut dx = vec![f32::NAN; x.len()];
                conv2d_backward_data(&g, &wt, &dy, [n, h, w], &mut dx).unwrap();
                let mut want = vec![0.0; x.len()];
                conv2d_backward_data_reference(&g, &wt, &dy, [n, h, w], &mut want).unwrap();
                assert_close(&dx, &want, 1e-4, &format!("dx {g:?}"));
            }
        }
    }

    #[test]
    fn same_bits_with_one_or_two_threads() {
        let g = geom(4, 8, 1, [3, 3], [1, 1], [1, 1], [1, 1, 1, 1]);
        let mut rng = Rng::new(5);
        let (n, h, w) = (4, 12, 12);
        let x = rng.vec(n * 4 * h * w);
        let wt = rng.vec(8 * 4 * 9);
        let dy = rng.vec(n * 8 * h * w);
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| {
                let mut dw = vec![0.0; wt.len()];
                let mut dx = vec![0.0; x.len()];
                conv2d_backward_weight(&g, &x, [n, h, w], &dy, &mut dw, None).unwrap();
                conv2d_backward_data(&g, &wt, &dy, [n, h, w], &mut dx).unwrap();
                (dw, dx)
            })
        };
        assert_eq!(run(2), run(2));
        let (a, b) = (run(1), run(2));
        assert_close(&a.0, &b.0, 1e-5, "dw");
        assert_close(&a.1, &b.1, 1e-5, "dx");
    }

    #[test]
    fn size_mismatch_is_an_error() {
        let g = geom(2, 2, 1, [3, 3], [1, 1], [1, 1], [0; 4]);
        let mut dw = vec![0.0; 36];
        assert!(
            conv2d_backward_weight(&g, &[0.0; 10], [1, 4, 4], &[0.0; 8], &mut dw, None).is_err()
        );
    }
}
