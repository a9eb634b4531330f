//! Direct depthwise convolution (one filter per channel), any kernel size, stride, dilation
//! and padding, with bias and activation fused.
//!
//! Each input plane is copied into a zero-padded, stride-phase-split scratch plane
//! ([`Phased`]), so every tap of an output row reads a contiguous run for any stride. The
//! AVX2/FMA kernel computes blocks of `R` output rows x `8 * NV` columns with `R * NV`
//! independent accumulators (8 for any row width, so narrow late layers are not bound by FMA
//! latency); the portable kernel is a plain loop the compiler vectorises.

use super::layout::Phased;
use super::Conv2dGeom;
use crate::kernels::activation::Activation;
use crate::kernels::scratch;

/// Floats of slack after the plane: full 8-lane loads may run past the last row's end.
const SLACK: usize = 8;

/// The per-call setup shared by all planes of one input size.
pub(super) struct Setup {
    pub layout: Phased,
    pub oh: usize,
    pub ow: usize,
    pub pads: [usize; 4],
    pub h: usize,
    pub w: usize,
    /// Floats between the sources of consecutive output rows.
    pub row_step: usize,
}

impl Setup {
    pub(super) fn new(
        g: &Conv2dGeom,
        (h, w): (usize, usize),
        pads: [usize; 4],
        (oh, ow): (usize, usize),
    ) -> Setup {
        let layout = Phased::new(h, w, pads, g.stride[1]);
        Setup {
            row_step: g.stride[0] * layout.row,
            layout,
            oh,
            ow,
            pads,
            h,
            w,
        }
    }
}

/// Offsets of the taps within the phase-split plane, relative to an output row's source.
pub(super) fn tap_offsets(g: &Conv2dGeom, l: &Phased, taps: &mut [usize]) {
    let [kh, kw] = g.kernel;
    for ky in 0..kh {
        for kx in 0..kw {
            taps[ky * kw + kx] = l.at(ky * g.dilation[0], kx * g.dilation[1]);
        }
    }
}

/// Per-channel parameters: `[C, kh * kw]` filters, optional `[C]` bias, activation.
pub(super) struct Filters<'a> {
    pub weights: &'a [f32],
    pub bias: Option<&'a [f32]>,
    pub act: Option<Activation>,
    pub channels: usize,
}

/// Convolves consecutive planes `x` (`h x w` each, the first being plane `first` of the
/// batch) into `out` (`oh x ow` each), reusing one scratch plane.
pub(super) fn planes(
    s: &Setup,
    x: &[f32],
    first: usize,
    f: &Filters,
    taps: &[usize],
    out: &mut [f32],
    avx: bool,
) {
    let per_out = s.oh * s.ow;
    let n_taps = taps.len();
    scratch::with_f32(s.layout.plane + SLACK, |buf| {
        buf[s.layout.plane..].fill(0.0);
        // The kernels read `buf[row_start(oy) + tap + ox]` for ox < ow (plus up to 7 lanes of
        // slack): check once that this stays in the buffer.
        let max_tap = taps.iter().copied().max().unwrap_or(0);
        assert!(s.oh == 0 || (s.oh - 1) * s.row_step + max_tap + s.ow + SLACK <= buf.len());
        let planes = x.chunks_exact(s.h * s.w).zip(out.chunks_exact_mut(per_out));
        for (i, (src, dst)) in planes.enumerate() {
            let ch = (first + i) % f.channels;
            let weights = &f.weights[ch * n_taps..(ch + 1) * n_taps];
            let bias = f.bias.map_or(0.0, |b| b[ch]);
            s.layout.fill(buf, src, (s.h, s.w), s.pads);
            #[cfg(target_arch = "x86_64")]
            if avx {
                // SAFETY: AVX2/FMA checked by the caller; bounds asserted above.
                unsafe { avx2::plane(s, buf, taps, weights, bias, f.act, dst) };
                continue;
            }
            let _ = avx;
            for (oy, d) in dst.chunks_exact_mut(s.ow).enumerate() {
                row_portable(&buf[oy * s.row_step..], taps, weights, bias, d);
            }
            if let Some(a) = f.act {
                a.apply(dst);
            }
        }
    });
}

fn row_portable(src: &[f32], taps: &[usize], weights: &[f32], bias: f32, dst: &mut [f32]) {
    dst.fill(bias);
    let ow = dst.len();
    for (&off, &wt) in taps.iter().zip(weights) {
        for (d, &s) in dst.iter_mut().zip(&src[off..off + ow]) {
            *d += wt * s;
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::Setup;
    use crate::kernels::activation::Activation;
    use crate::kernels::simd::{avx, has_vector_form};
    use std::arch::x86_64::*;

    /// # Safety
    /// AVX2 and FMA must be available; `buf` must cover every read (asserted by the caller).
    ///
    /// Every store is a full 8-lane vector: when `ow` is not a multiple of 8 and at least 8,
    /// the row's last vector starts at `ow - 8`, overlapping (and recomputing) part of the
    /// previous one. Narrower rows spill into the following rows, which are written
    /// afterwards; rows whose 8 lanes would pass the plane's end store through a mask.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn plane(
        s: &Setup,
        buf: &[f32],
        taps: &[usize],
        weights: &[f32],
        bias: f32,
        act: Option<Activation>,
        out: &mut [f32],
    ) {
        assert!(out.len() >= s.oh * s.ow);
        let vectors = s.ow.div_ceil(8);
        let start = |v: usize| {
            if s.ow >= 8 {
                (8 * v).min(s.ow - 8)
            } else {
                0
            }
        };
        let mut v0 = 0;
        while v0 < vectors {
            let nv = (vectors - v0).min(4);
            let mut starts = [0usize; 4];
            for (k, st) in starts.iter_mut().enumerate().take(nv) {
                *st = start(v0 + k);
            }
            let blk = Block {
                src: buf.as_ptr(),
                dst: out.as_mut_ptr(),
                starts,
            };
            match nv {
                4 => rows::<2, 4>(s, &blk, taps, weights, bias, act),
                3 => rows::<2, 3>(s, &blk, taps, weights, bias, act),
                2 => rows::<4, 2>(s, &blk, taps, weights, bias, act),
                _ => rows::<8, 1>(s, &blk, taps, weights, bias, act),
            }
            v0 += nv;
        }
        if let Some(a) = act.filter(|&a| !has_vector_form(a)) {
            a.apply(&mut out[..s.oh * s.ow]);
        }
    }

    /// A column block: plane source and destination, and the first column of each vector.
    struct Block {
        src: *const f32,
        dst: *mut f32,
        starts: [usize; 4],
    }

    /// All output rows of one column block, `R` rows at a time.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn rows<const R: usize, const NV: usize>(
        s: &Setup,
        b: &Block,
        taps: &[usize],
        weights: &[f32],
        bias: f32,
        act: Option<Activation>,
    ) {
        let vact = act.filter(|&a| has_vector_form(a));
        let narrow = s.ow < 8;
        let mut oy = 0;
        while oy < s.oh {
            let valid = (s.oh - oy).min(R);
            // Rows past the end recompute the last row, so every load stays in the plane.
            let mut src = [b.src; R];
            for (r, p) in src.iter_mut().enumerate() {
                *p = b.src.add((oy + r.min(valid - 1)) * s.row_step);
            }
            let mut acc = [[_mm256_set1_ps(bias); NV]; R];
            for (&off, &wt) in taps.iter().zip(weights) {
                let w = _mm256_set1_ps(wt);
                for (row, &p) in acc.iter_mut().zip(src.iter()) {
                    for (a, &st) in row.iter_mut().zip(b.starts.iter()) {
                        *a = _mm256_fmadd_ps(w, _mm256_loadu_ps(p.add(off + st)), *a);
                    }
                }
            }
            for (r, row) in acc.iter().enumerate().take(valid) {
                let d = b.dst.add((oy + r) * s.ow);
                for (&a, &st) in row.iter().zip(b.starts.iter()) {
                    let y = match vact {
                        Some(f) => avx::act(a, f),
                        None => a,
                    };
                    if narrow && (oy + r) * s.ow + 8 > s.oh * s.ow {
                        let n = s.ow as i32;
                        let mask = _mm256_cmpgt_epi32(
                            _mm256_set1_epi32(n),
                            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
                        );
                        _mm256_maskstore_ps(d, mask, y);
                    } else {
                        _mm256_storeu_ps(d.add(st), y);
                    }
                }
            }
            oy += R;
        }
    }
}
