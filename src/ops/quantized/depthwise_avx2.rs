//! Depthwise integer convolution on AVX2. Each input plane is padded with the input zero point
//! and rewritten once as planes of i16 pairs `(x[s j + a], x[s j + a + dw])` for output column
//! `j`, one per phase `a % s` of the pairs' left taps `a` (one plane for stride 1, and for
//! stride 2 without dilation, where pairing is plain widening). One `vpmaddwd` of eight such
//! pairs by the two taps' weights then gives eight exact i32 partial sums (|x| <= 255,
//! |w - zw| <= 255), with no shuffles in the inner loop. A pair plane serves every output row
//! that reads its input row. Zero points work as in the other integer engines: padding holds
//! `zx` and `-zx * sum(w - zw)` joins the bias, so the results equal theirs bit for bit.

use super::conv_nchw::{
    check_depthwise_io, for_each_padded_plane, row_requant, stage_bias, RowRequant,
};
use super::engine::OutputStage;
use crate::error::Result;
use crate::kernels::conv::Conv2dGeom;
use crate::kernels::qgemm::{ElemKind, WxElem};
use crate::kernels::scratch;

/// Output pixels per step (two vectors of eight i32 sums).
const BLOCK: usize = 16;

pub struct DepthwiseAvx2 {
    geom: Conv2dGeom,
    /// Pairs of taps per kernel row (`ceil(kw / 2)`; an odd row's last pair has a zero weight).
    pairs: usize,
    /// `[C][kh][pairs]`: the pair's two i16 weights `w - zw`, low tap in the low half.
    weights: Vec<i32>,
    /// The phases `2 t dw % sw` of the pairs' left taps, one pair plane each.
    phases: Vec<usize>,
    /// Per pair `t` of a kernel row: its pair plane and column offset `2 t dw / sw`.
    pair_src: Vec<(usize, usize)>,
    /// Per channel, `sum(w - zw)`.
    weight_sums: Vec<i32>,
    bias: Vec<i32>,
    requant: Option<RowRequant>,
}

/// Whether this CPU has the instructions [`DepthwiseAvx2`] needs.
pub fn available() -> bool {
    crate::kernels::simd::has_avx2_fma()
}

impl DepthwiseAvx2 {
    /// Output widths below which the exact-f32 engine is faster: the per-plane padding and
    /// pair planes cost about as much as the products on small planes (measured on PP-LCNet's
    /// 14 x 14 and 7 x 7 depthwise layers, batch 64, one thread).
    pub const MIN_WIDTH: usize = 16;

    /// `None` when the CPU lacks AVX2 or a weight minus its zero point does not fit an i16.
    pub fn new(
        geom: &Conv2dGeom,
        w: &[i8],
        w_zp: &[i32],
        stage: &OutputStage,
    ) -> Option<DepthwiseAvx2> {
        let [kh, kw] = geom.kernel;
        let taps = kh * kw;
        if !available() || taps == 0 || w.len() != geom.c_out * taps {
            return None;
        }
        let pairs = kw.div_ceil(2);
        let mut weights = Vec::with_capacity(geom.c_out * kh * pairs);
        let mut weight_sums = Vec::with_capacity(geom.c_out);
        for (c, ch) in w.chunks_exact(taps).enumerate() {
            let z = i64::from(w_zp[if w_zp.len() == 1 { 0 } else { c }]);
            let mut sum = 0i32;
            for row in ch.chunks_exact(kw) {
                let mut halves = row.iter().map(|&v| i64::from(v) - z);
                for _ in 0..pairs {
                    let lo = halves.next().unwrap_or(0);
                    let hi = halves.next().unwrap_or(0);
                    let (lo, hi) = (i16::try_from(lo).ok()?, i16::try_from(hi).ok()?);
                    sum = sum.wrapping_add(i32::from(lo)).wrapping_add(i32::from(hi));
                    weights.push(i32::from(lo as u16) | (i32::from(hi as u16) << 16));
                }
            }
            weight_sums.push(sum);
        }
        let (sw, dw) = (geom.stride[1], geom.dilation[1]);
        let mut phases = Vec::new();
        let mut pair_src = Vec::with_capacity(pairs);
        for t in 0..pairs {
            let a = 2 * t * dw;
            let k = match phases.iter().position(|&p| p == a % sw) {
                Some(k) => k,
                None => {
                    phases.push(a % sw);
                    phases.len() - 1
                }
            };
            pair_src.push((k, a / sw));
        }
        Some(DepthwiseAvx2 {
            geom: geom.clone(),
            pairs,
            phases,
            pair_src,
            weights,
            weight_sums,
            bias: stage_bias(stage).map_or_else(|| vec![0; geom.c_out], <[i32]>::to_vec),
            requant: row_requant(stage, geom.c_out),
        })
    }

    /// `out` is `[n, C, oh, ow]`; every element is written.
    pub fn run<T: WxElem>(
        &self,
        x: &[u8],
        x_zp: u8,
        [n, h, w]: [usize; 3],
        pads: [usize; 4],
        [oh, ow]: [usize; 2],
        out: &mut [T],
    ) -> Result<()> {
        let c = self.geom.c_out;
        if !check_depthwise_io(c, x, [n, h, w], [oh, ow], out, self.requant.is_some())? {
            return Ok(());
        }
        let [kh, _] = self.geom.kernel;
        let [sh, sw] = self.geom.stride;
        let dh = self.geom.dilation[0];
        let owq = ow.div_ceil(BLOCK) * BLOCK;
        let hp = (oh - 1) * sh + (kh - 1) * dh + 1;
        let max_off = self.pair_src.iter().map(|&(_, o)| o).max().unwrap_or(0);
        // Pairs per pair-plane row: whole blocks covering every block's loads.
        let qcols = (owq + max_off).div_ceil(BLOCK) * BLOCK;
        // Bytes per padded row: every pair and every vector load of `pair_planes` inside.
        let wp = sw * qcols + sw + self.geom.dilation[1] + BLOCK;
        let planes = self.phases.len();
        // Per tap pair `(ky, t)`: its first byte in the pair planes for output pixel (0, 0).
        let offs: Vec<usize> = (0..kh)
            .flat_map(|ky| {
                self.pair_src
                    .iter()
                    .map(move |&(k, o)| ((k * hp + ky * dh) * qcols + o) * 4)
            })
            .collect();
        for_each_padded_plane(
            x,
            c,
            [h, w],
            [pads[0], pads[1]],
            x_zp,
            [hp, wp],
            out,
            oh * ow,
            |ch, padded, dst| {
                scratch::with_u8(planes * hp * qcols * 4, |paired| {
                    let offset = self.bias[ch]
                        .wrapping_sub(i32::from(x_zp).wrapping_mul(self.weight_sums[ch]));
                    #[cfg(target_arch = "x86_64")]
                    // SAFETY: `available()` held when this engine was built (checked in `new`);
                    // the buffers have the sizes `pair_planes` and `plane_avx2` need (see
                    // their contracts and the extents above), and `dst` holds `oh * ow`.
                    unsafe {
                        self.pair_planes(padded, [hp, wp], qcols, paired);
                        self.plane_avx2(ch, paired, qcols, &offs, [oh, ow], offset, dst);
                    }
                    #[cfg(not(target_arch = "x86_64"))]
                    let _ = (offset, dst, paired, padded);
                });
            },
        );
        Ok(())
    }

    /// Pair plane `k` (`[hp][qcols]` of two i16 each) from the padded plane (`[hp][wp]` u8):
    /// `[r][c]` = `([r][sw c + p], [r][sw c + p + dw])` with `p = phases[k]`.
    ///
    /// # Safety
    /// AVX2; `wp >= sw qcols + sw + dw + 16`; `qcols` a multiple of 16; `paired` of
    /// `phases * hp * qcols * 4` bytes.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn pair_planes(
        &self,
        padded: &[u8],
        [hp, wp]: [usize; 2],
        qcols: usize,
        paired: &mut [u8],
    ) {
        use std::arch::x86_64::*;
        let (sw, dw) = (self.geom.stride[1], self.geom.dilation[1]);
        let src = padded.as_ptr();
        let dst = paired.as_mut_ptr();
        // SAFETY (whole body): reads end before byte `sw qcols + sw + dw + 16 <= wp` of a
        // padded row (the vector forms: 16 bytes from `c0 + dw` with `c0 <= qcols - 16`, or
        // from `2 c0 + p` with `c0 <= qcols - 8`); writes stay in pair-plane row `r` of
        // `qcols` pairs.
        unsafe {
            for (k, &p) in self.phases.iter().enumerate() {
                for r in 0..hp {
                    let row = src.add(r * wp + p);
                    let out = dst.add((k * hp + r) * qcols * 4);
                    if sw == 1 {
                        for c0 in (0..qcols).step_by(BLOCK) {
                            let l = _mm_loadu_si128(row.add(c0) as *const __m128i);
                            let h = _mm_loadu_si128(row.add(c0 + dw) as *const __m128i);
                            let o = out.add(c0 * 4) as *mut __m256i;
                            _mm256_storeu_si256(o, _mm256_cvtepu8_epi16(_mm_unpacklo_epi8(l, h)));
                            _mm256_storeu_si256(
                                o.add(1),
                                _mm256_cvtepu8_epi16(_mm_unpackhi_epi8(l, h)),
                            );
                        }
                    } else if sw == 2 && dw == 1 {
                        // The two taps of a pair are adjacent bytes: widening is pairing.
                        for c0 in (0..qcols).step_by(8) {
                            let v = _mm_loadu_si128(row.add(2 * c0) as *const __m128i);
                            _mm256_storeu_si256(
                                out.add(c0 * 4) as *mut __m256i,
                                _mm256_cvtepu8_epi16(v),
                            );
                        }
                    } else {
                        let o = out as *mut u16;
                        for c in 0..qcols {
                            *o.add(2 * c) = u16::from(*row.add(sw * c));
                            *o.add(2 * c + 1) = u16::from(*row.add(sw * c + dw));
                        }
                    }
                }
            }
        }
    }

    /// # Safety
    /// AVX2; `paired` holds the pair planes of `hp` rows by `qcols` pairs, at least
    /// `ceil(ow / 16) 16` plus every `pair_src` offset, with `hp >= (oh - 1) sh + (kh - 1) dh
    /// + 1`; `offs` as [`DepthwiseAvx2::run`] makes it; `dst` of `oh * ow`.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn plane_avx2<T: WxElem>(
        &self,
        ch: usize,
        paired: &[u8],
        qcols: usize,
        offs: &[usize],
        [oh, ow]: [usize; 2],
        offset: i32,
        dst: &mut [T],
    ) {
        use std::arch::x86_64::*;
        let [kh, _] = self.geom.kernel;
        let sh = self.geom.stride[0];
        let pw = self.pairs;
        let words = &self.weights[ch * kh * pw..(ch + 1) * kh * pw];
        let p = paired.as_ptr();
        let d = dst.as_mut_ptr();
        // SAFETY (whole body): the loads read 16 pairs (64 bytes) at column `j0 + o` (`j0` a
        // multiple of 16 below `ow`) of row `oy sh + ky dh < hp` of pair plane `k`; stores write columns `j0..min(j0 + 16, ow)` of
        // row `oy` of `dst`.
        unsafe {
            let off = _mm256_set1_epi32(offset);
            let rq = self.requant.as_ref().map(|r| {
                (
                    _mm256_set1_ps(r.scales[ch]),
                    _mm256_set1_ps(r.lo),
                    _mm256_set1_ps(r.hi),
                    _mm256_set1_epi32(r.zero_point),
                )
            });
            for oy in 0..oh {
                for j0 in (0..ow).step_by(BLOCK) {
                    let (mut a0, mut a1) = (off, off);
                    let base = p.add((oy * sh * qcols + j0) * 4);
                    // A last block of at most eight pixels needs only the first vector.
                    if ow - j0 > BLOCK / 2 {
                        for ky in 0..kh {
                            for t in 0..pw {
                                let i = ky * pw + t;
                                let wt = _mm256_set1_epi32(*words.get_unchecked(i));
                                let q = base.add(*offs.get_unchecked(i)) as *const __m256i;
                                a0 = _mm256_add_epi32(
                                    a0,
                                    _mm256_madd_epi16(_mm256_loadu_si256(q), wt),
                                );
                                a1 = _mm256_add_epi32(
                                    a1,
                                    _mm256_madd_epi16(_mm256_loadu_si256(q.add(1)), wt),
                                );
                            }
                        }
                    } else {
                        for ky in 0..kh {
                            for t in 0..pw {
                                let i = ky * pw + t;
                                let wt = _mm256_set1_epi32(*words.get_unchecked(i));
                                let q = base.add(*offs.get_unchecked(i)) as *const __m256i;
                                a0 = _mm256_add_epi32(
                                    a0,
                                    _mm256_madd_epi16(_mm256_loadu_si256(q), wt),
                                );
                            }
                        }
                    }
                    let lanes = (ow - j0).min(BLOCK);
                    let out = d.add(oy * ow + j0);
                    match (rq, T::KIND) {
                        (Some((s, lo, hi, zp)), ElemKind::U8 | ElemKind::I8) => {
                            // Codes lie in the output type's range, so the saturating packs
                            // keep them; the permute undoes `packs`' lane interleave.
                            let w16 = _mm256_permute4x64_epi64(
                                _mm256_packs_epi32(
                                    code(a0, s, lo, hi, zp),
                                    code(a1, s, lo, hi, zp),
                                ),
                                0b11_01_10_00,
                            );
                            let (l, h) = (
                                _mm256_castsi256_si128(w16),
                                _mm256_extracti128_si256(w16, 1),
                            );
                            let bytes = if T::KIND == ElemKind::U8 {
                                _mm_packus_epi16(l, h)
                            } else {
                                _mm_packs_epi16(l, h)
                            };
                            if lanes == BLOCK {
                                _mm_storeu_si128(out as *mut __m128i, bytes);
                            } else {
                                let mut tmp = [0u8; BLOCK];
                                _mm_storeu_si128(tmp.as_mut_ptr() as *mut __m128i, bytes);
                                std::ptr::copy_nonoverlapping(tmp.as_ptr(), out as *mut u8, lanes);
                            }
                        }
                        _ => {
                            if lanes == BLOCK {
                                _mm256_storeu_si256(out as *mut __m256i, a0);
                                _mm256_storeu_si256((out as *mut __m256i).add(1), a1);
                            } else {
                                let mut tmp = [0i32; BLOCK];
                                _mm256_storeu_si256(tmp.as_mut_ptr() as *mut __m256i, a0);
                                _mm256_storeu_si256((tmp.as_mut_ptr() as *mut __m256i).add(1), a1);
                                std::ptr::copy_nonoverlapping(tmp.as_ptr(), out as *mut i32, lanes);
                            }
                        }
                    }
                }
            }
        }
    }
}

/// The requantization of the other engines: scale, clamp to the code bounds, round half to
/// even (the default rounding mode), add the zero point.
///
/// # Safety
/// AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn code(
    v: std::arch::x86_64::__m256i,
    s: std::arch::x86_64::__m256,
    lo: std::arch::x86_64::__m256,
    hi: std::arch::x86_64::__m256,
    zp: std::arch::x86_64::__m256i,
) -> std::arch::x86_64::__m256i {
    use std::arch::x86_64::*;
    let f = _mm256_mul_ps(_mm256_cvtepi32_ps(v), s);
    let f = _mm256_min_ps(_mm256_max_ps(f, lo), hi);
    _mm256_add_epi32(_mm256_cvtps_epi32(f), zp)
}

#[cfg(test)]
mod tests {
    use super::super::engine::IntConv;
    use super::*;
    use crate::kernels::testutil::conv_geom as geom;
    use crate::quant::test_rng::Rng;

    /// This engine against the direct depthwise reference, whatever engine `IntConv` would
    /// pick on this CPU, for every output type, zero-point form and thread count.
    #[test]
    fn matches_the_reference_engine() {
        if !available() {
            eprintln!("skipped: no AVX2");
            return;
        }
        let mut rng = Rng::new(29);
        let cases = [
            geom(12, 12, 12, [3, 3], [1, 1], [1, 1], [1, 1, 1, 1]),
            geom(10, 10, 10, [5, 5], [2, 2], [1, 1], [2, 2, 2, 2]),
            geom(4, 4, 4, [3, 3], [1, 2], [2, 1], [0, 1, 2, 0]),
            geom(6, 6, 6, [3, 3], [2, 2], [1, 1], [1, 1, 1, 1]),
            geom(5, 5, 5, [3, 3], [2, 2], [1, 1], [0, 0, 1, 1]),
            geom(3, 3, 3, [7, 7], [1, 1], [2, 2], [3, 6, 6, 3]),
            geom(4, 4, 4, [1, 5], [1, 2], [1, 1], [0, 2, 0, 2]),
            geom(3, 3, 3, [3, 11], [1, 1], [1, 1], [1, 5, 1, 5]),
            geom(8, 8, 8, [5, 5], [1, 1], [1, 1], [2, 2, 2, 2]),
            geom(2, 2, 2, [1, 1], [1, 1], [1, 1], [0; 4]),
            geom(2, 2, 2, [2, 4], [3, 3], [1, 3], [1, 0, 0, 2]),
            geom(3, 3, 3, [3, 3], [1, 3], [1, 2], [1, 1, 1, 1]),
        ];
        for (case, g) in cases.iter().enumerate() {
            for (n, h, wd) in [(2, 7 + case, 5 + 3 * case), (1, 19, 37), (1, 3, 2)] {
                let Ok((oh, ow)) = g.out_hw(h, wd) else {
                    continue;
                };
                let taps = g.kernel[0] * g.kernel[1];
                let w: Vec<i8> = (0..g.c_out * taps)
                    .map(|_| rng.range_i32(-128, 127) as i8)
                    .collect();
                let w_zp: Vec<i32> = match case % 3 {
                    0 => vec![0],
                    1 => vec![-128],
                    _ => (0..g.c_out).map(|_| rng.range_i32(-128, 127)).collect(),
                };
                let x: Vec<u8> = (0..n * g.c_in * h * wd)
                    .map(|_| rng.range_i32(0, 255) as u8)
                    .collect();
                let x_zp = [0u8, 131, 255][case % 3];
                let len = n * g.c_out * oh * ow;
                let requant = |zero_point, qmin, qmax| OutputStage::Requant {
                    scales: (0..g.c_out).map(|c| 2e-4 + c as f32 * 1e-5).collect(),
                    zero_point,
                    qmin,
                    qmax,
                    bias: Some((0..g.c_out).map(|c| (c as i32 - 3) * 997).collect()),
                };
                let what = format!("case {case}, {n}x{h}x{wd}");
                for threads in [1, 2] {
                    let pool = rayon::ThreadPoolBuilder::new()
                        .num_threads(threads)
                        .build()
                        .unwrap();
                    pool.install(|| {
                        let stage = requant(77, 0, 255);
                        let fast = DepthwiseAvx2::new(g, &w, &w_zp, &stage).unwrap();
                        let slow =
                            IntConv::with_fast_paths(g.clone(), &w, &w_zp, stage, false).unwrap();
                        let (mut a, mut b) = (vec![0u8; len], vec![1u8; len]);
                        fast.run(&x, x_zp, [n, h, wd], g.pads, [oh, ow], &mut a)
                            .unwrap();
                        slow.run(&x, x_zp, [n, h, wd], g.pads, &mut b).unwrap();
                        assert_eq!(a, b, "{what} u8");

                        let stage = requant(-5, -128, 127);
                        let fast = DepthwiseAvx2::new(g, &w, &w_zp, &stage).unwrap();
                        let slow =
                            IntConv::with_fast_paths(g.clone(), &w, &w_zp, stage, false).unwrap();
                        let (mut a, mut b) = (vec![0i8; len], vec![1i8; len]);
                        fast.run(&x, x_zp, [n, h, wd], g.pads, [oh, ow], &mut a)
                            .unwrap();
                        slow.run(&x, x_zp, [n, h, wd], g.pads, &mut b).unwrap();
                        assert_eq!(a, b, "{what} i8");

                        let stage = OutputStage::Int32;
                        let fast = DepthwiseAvx2::new(g, &w, &w_zp, &stage).unwrap();
                        let slow =
                            IntConv::with_fast_paths(g.clone(), &w, &w_zp, stage, false).unwrap();
                        let (mut a, mut b) = (vec![0i32; len], vec![1i32; len]);
                        fast.run(&x, x_zp, [n, h, wd], g.pads, [oh, ow], &mut a)
                            .unwrap();
                        slow.run(&x, x_zp, [n, h, wd], g.pads, &mut b).unwrap();
                        assert_eq!(a, b, "{what} i32");
                    });
                }
            }
        }
    }

    #[test]
    fn declines_weights_beyond_i16() {
        let g = geom(1, 1, 1, [1, 2], [1, 1], [1, 1], [0; 4]);
        assert!(DepthwiseAvx2::new(&g, &[-128, 5], &[40_000], &OutputStage::Int32).is_none());
    }
}
