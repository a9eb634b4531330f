//! Direct depthwise convolution (one filter per channel), any kernel size, stride, dilation
//! and padding, with bias and activation fused.
//!
//! Each input plane is first copied into a zero-padded scratch plane split into `stride_x`
//! phases (phase `r` holds padded columns `r, r + sx, r + 2sx, ...`). Then every tap of every
//! output row reads a contiguous run of that plane, so the inner loop is a plain
//! `acc[ox] += w * src[ox + off]` over contiguous memory for any stride — vectorised with
//! AVX2/FMA (four 8-lane accumulators per block) or left to the compiler otherwise.

use super::Conv2dGeom;
use crate::kernels::activation::Activation;
use crate::kernels::scratch;

/// Layout of the padded, phase-split plane for one input size.
pub(super) struct Plane {
    /// Padded width split into `sx` phases of `wq` columns each.
    wq: usize,
    /// Floats per padded row (`sx * wq`).
    row: usize,
    /// Padded rows.
    hp: usize,
    oh: usize,
    ow: usize,
}

impl Plane {
    pub(super) fn new(g: &Conv2dGeom, h: usize, w: usize, pads: [usize; 4]) -> Plane {
        let (oh, ow) = g.out_hw_with(h, w, pads).unwrap_or((0, 0));
        let sx = g.stride[1];
        let wp = w + pads[1] + pads[3];
        let wq = wp.div_ceil(sx);
        Plane {
            wq,
            row: sx * wq,
            hp: h + pads[0] + pads[2],
            oh,
            ow,
        }
    }

    fn len(&self) -> usize {
        self.row * self.hp
    }
}

/// Offsets of the taps within the phase-split plane, relative to an output row's first row.
pub(super) fn tap_offsets(g: &Conv2dGeom, p: &Plane, taps: &mut [usize]) {
    let [kh, kw] = g.kernel;
    let sx = g.stride[1];
    for ky in 0..kh {
        for kx in 0..kw {
            let off = kx * g.dilation[1];
            taps[ky * kw + kx] = ky * g.dilation[0] * p.row + (off % sx) * p.wq + off / sx;
        }
    }
}

/// Convolves one channel plane `x` (`h x w`) into `out` (`oh x ow`).
#[allow(clippy::too_many_arguments)]
pub(super) fn plane(
    g: &Conv2dGeom,
    p: &Plane,
    x: &[f32],
    (h, w): (usize, usize),
    pads: [usize; 4],
    weights: &[f32],
    taps: &[usize],
    bias: f32,
    act: Option<Activation>,
    out: &mut [f32],
    avx: bool,
) {
    scratch::with_f32(p.len(), |buf| {
        fill_plane(buf, p, x, (h, w), pads, g.stride[1]);
        let step = g.stride[0] * p.row;
        // The unsafe row kernel relies on every tap of every row staying inside the plane.
        let max_tap = taps.iter().copied().max().unwrap_or(0);
        assert!(p.oh == 0 || (p.oh - 1) * step + max_tap + p.ow <= buf.len());
        for (oy, dst) in out.chunks_exact_mut(p.ow).take(p.oh).enumerate() {
            let src = &buf[oy * step..];
            #[cfg(target_arch = "x86_64")]
            if avx {
                // SAFETY: AVX2/FMA checked by the caller; every tap offset plus `ow` stays in
                // the padded plane (see `tap_offsets` and `Plane::new`).
                unsafe { avx2::row(src, taps, weights, bias, act, dst) };
                continue;
            }
            let _ = avx;
            row_portable(src, taps, weights, bias, act, dst);
        }
    });
}

/// Zero-padded copy of `x`, columns distributed over the `sx` phases.
fn fill_plane(
    buf: &mut [f32],
    p: &Plane,
    x: &[f32],
    (h, w): (usize, usize),
    pads: [usize; 4],
    sx: usize,
) {
    buf.fill(0.0);
    for (y, src) in x.chunks_exact(w).take(h).enumerate() {
        let row = &mut buf[(y + pads[0]) * p.row..][..p.row];
        if sx == 1 {
            row[pads[1]..pads[1] + w].copy_from_slice(src);
        } else {
            for (i, &v) in src.iter().enumerate() {
                let xx = i + pads[1];
                row[(xx % sx) * p.wq + xx / sx] = v;
            }
        }
    }
}

fn row_portable(
    src: &[f32],
    taps: &[usize],
    weights: &[f32],
    bias: f32,
    act: Option<Activation>,
    dst: &mut [f32],
) {
    dst.fill(bias);
    let ow = dst.len();
    for (&off, &wt) in taps.iter().zip(weights) {
        for (d, &s) in dst.iter_mut().zip(&src[off..off + ow]) {
            *d += wt * s;
        }
    }
    if let Some(a) = act {
        a.apply(dst);
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use crate::kernels::activation::Activation;
    use crate::kernels::simd::{avx, has_vector_form};
    use std::arch::x86_64::*;

    /// # Safety
    /// AVX2 and FMA must be available; `src[off + i]` must exist for every tap offset and
    /// `i < dst.len()`.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn row(
        src: &[f32],
        taps: &[usize],
        weights: &[f32],
        bias: f32,
        act: Option<Activation>,
        dst: &mut [f32],
    ) {
        let ow = dst.len();
        let s = src.as_ptr();
        let d = dst.as_mut_ptr();
        let vb = _mm256_set1_ps(bias);
        let vact = act.filter(|&a| has_vector_form(a));
        let fin = |v: __m256| match vact {
            Some(a) => avx::act(v, a),
            None => v,
        };
        let mut ox = 0;
        while ox + 32 <= ow {
            let (mut a0, mut a1, mut a2, mut a3) = (vb, vb, vb, vb);
            for (&off, &wt) in taps.iter().zip(weights) {
                let w = _mm256_set1_ps(wt);
                let p = s.add(off + ox);
                a0 = _mm256_fmadd_ps(w, _mm256_loadu_ps(p), a0);
                a1 = _mm256_fmadd_ps(w, _mm256_loadu_ps(p.add(8)), a1);
                a2 = _mm256_fmadd_ps(w, _mm256_loadu_ps(p.add(16)), a2);
                a3 = _mm256_fmadd_ps(w, _mm256_loadu_ps(p.add(24)), a3);
            }
            _mm256_storeu_ps(d.add(ox), fin(a0));
            _mm256_storeu_ps(d.add(ox + 8), fin(a1));
            _mm256_storeu_ps(d.add(ox + 16), fin(a2));
            _mm256_storeu_ps(d.add(ox + 24), fin(a3));
            ox += 32;
        }
        while ox + 8 <= ow {
            let mut a0 = vb;
            for (&off, &wt) in taps.iter().zip(weights) {
                a0 = _mm256_fmadd_ps(_mm256_set1_ps(wt), _mm256_loadu_ps(s.add(off + ox)), a0);
            }
            _mm256_storeu_ps(d.add(ox), fin(a0));
            ox += 8;
        }
        if ox < ow {
            let rest = (ow - ox) as i32;
            let mask = _mm256_cmpgt_epi32(
                _mm256_set1_epi32(rest),
                _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
            );
            let mut a0 = vb;
            for (&off, &wt) in taps.iter().zip(weights) {
                let v = _mm256_maskload_ps(s.add(off + ox), mask);
                a0 = _mm256_fmadd_ps(_mm256_set1_ps(wt), v, a0);
            }
            _mm256_maskstore_ps(d.add(ox), mask, fin(a0));
        }
        if let Some(a) = act.filter(|&a| !has_vector_form(a)) {
            a.apply(dst);
        }
    }
}
