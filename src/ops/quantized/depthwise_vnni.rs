//! Depthwise integer convolution on AVX-512 VBMI and VNNI. For eight output pixels at a time,
//! one `vpermb` gathers up to four taps of a kernel row per pixel from a 32-byte load of the
//! input row (padded with the input zero point), and one `vpdpbusd` multiplies them by the
//! channel's weights and adds into eight i32 sums: exact u8 x s8 products summed in i32, so
//! the results equal the other integer engines'. Used for weights without zero points (the
//! usual symmetric int8) and windows that fit one 32-byte load.

use super::conv_nchw::{
    check_depthwise_io, for_each_padded_plane, row_requant, stage_bias, RowRequant,
};
use super::engine::OutputStage;
use crate::error::Result;
use crate::kernels::conv::Conv2dGeom;
use crate::kernels::qgemm::{quad_word, ElemKind, WxElem};

/// Output pixels per vector.
const LANES: usize = 8;
/// Bytes one load brings in.
const SPAN: usize = 32;
/// Weight words (kernel rows x groups of four taps) kept in registers.
const MAX_WORDS: usize = 24;
/// Groups of four taps per kernel row (index vectors kept in registers).
const MAX_QUADS: usize = 2;

pub struct DepthwiseVnni {
    geom: Conv2dGeom,
    /// Groups of four taps per kernel row.
    quads: usize,
    /// Per group `t`: for lane `j`, byte `i`, the offset of tap `4t + i` of pixel `j`.
    index: Vec<[u8; SPAN]>,
    /// Per group: the bytes that hold a tap (the rest are zeroed).
    masks: Vec<u32>,
    /// `[C][kh][quads]` four i8 weights per word.
    weights: Vec<i32>,
    weight_sums: Vec<i32>,
    bias: Vec<i32>,
    requant: Option<RowRequant>,
}

/// Whether this CPU has the instructions [`DepthwiseVnni`] needs.
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        crate::kernels::qgemm::vnni_available() && std::is_x86_feature_detected!("avx512vbmi")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

impl DepthwiseVnni {
    /// `None` when the CPU, the weight zero points or the window size rule it out.
    pub fn new(
        geom: &Conv2dGeom,
        w: &[i8],
        w_zp: &[i32],
        stage: &OutputStage,
    ) -> Option<DepthwiseVnni> {
        let [kh, kw] = geom.kernel;
        let (sw, dw) = (geom.stride[1], geom.dilation[1]);
        let span = (LANES - 1) * sw + (kw - 1) * dw + 1;
        if !available()
            || w_zp.iter().any(|&z| z != 0)
            || span > SPAN
            || kw.div_ceil(4) > MAX_QUADS
            || kh * kw.div_ceil(4) > MAX_WORDS
        {
            return None;
        }
        let quads = kw.div_ceil(4);
        let mut index = vec![[0u8; SPAN]; quads];
        let mut masks = vec![0u32; quads];
        for t in 0..quads {
            for j in 0..LANES {
                for i in 0..4 {
                    let tap = 4 * t + i;
                    if tap < kw {
                        index[t][4 * j + i] = (j * sw + tap * dw) as u8;
                        masks[t] |= 1 << (4 * j + i);
                    }
                }
            }
        }
        let taps = kh * kw;
        let mut weights = Vec::with_capacity(geom.c_out * kh * quads);
        for ch in w.chunks_exact(taps) {
            for row in ch.chunks_exact(kw) {
                for four in row.chunks(4) {
                    weights.push(quad_word(four));
                }
            }
        }
        let weight_sums = w
            .chunks_exact(taps)
            .map(|c| c.iter().map(|&v| i32::from(v)).sum())
            .collect();
        let bias = stage_bias(stage).map_or_else(|| vec![0; geom.c_out], <[i32]>::to_vec);
        let requant = row_requant(stage, geom.c_out);
        Some(DepthwiseVnni {
            geom: geom.clone(),
            quads,
            index,
            masks,
            weights,
            weight_sums,
            bias,
            requant,
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
        let [sh, sw] = self.geom.stride;
        let [dh, _] = self.geom.dilation;
        let blocks = ow.div_ceil(LANES);
        // Rows and bytes per row of the padded copy: every load of every block stays inside.
        let hp = (oh - 1) * sh + (self.geom.kernel[0] - 1) * dh + 1;
        let wp = (pads[1] + w).max((blocks - 1) * LANES * sw + SPAN);
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
                let offset =
                    self.bias[ch].wrapping_sub(i32::from(x_zp).wrapping_mul(self.weight_sums[ch]));
                #[cfg(target_arch = "x86_64")]
                // SAFETY: `available()` held when this engine was built (checked in `new`);
                // `padded` has `hp` rows of `wp` bytes, enough for every load (see above), and
                // `dst` holds `oh * ow` values.
                unsafe {
                    self.plane_avx512(ch, padded, wp, [oh, ow], offset, dst)
                };
                #[cfg(not(target_arch = "x86_64"))]
                let _ = (offset, dst, padded);
            },
        );
        Ok(())
    }

    /// # Safety
    /// AVX-512 F, VL, BW, VBMI and VNNI; `padded` of at least `((oh - 1) sh + (kh - 1) dh + 1)`
    /// rows of `wp` bytes with `wp >= (ceil(ow / 8) - 1) * 8 * sw + 32`; `dst` of `oh * ow`.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512vl,avx512bw,avx512vbmi,avx512vnni")]
    unsafe fn plane_avx512<T: WxElem>(
        &self,
        ch: usize,
        padded: &[u8],
        wp: usize,
        [oh, ow]: [usize; 2],
        offset: i32,
        dst: &mut [T],
    ) {
        use std::arch::x86_64::*;
        let [kh, _] = self.geom.kernel;
        let [sh, sw] = self.geom.stride;
        let dh = self.geom.dilation[0];
        let q = self.quads;
        debug_assert!(q <= MAX_QUADS && kh * q <= MAX_WORDS);
        // SAFETY (whole body): loads read `SPAN` bytes from row `oy sh + ky dh` at column
        // `ox0 sw`, inside `padded` by the contract; stores are masked to `ow` columns of row
        // `oy` of `dst`.
        unsafe {
            let mut idx = [_mm256_setzero_si256(); MAX_QUADS];
            for (d, i) in idx.iter_mut().zip(&self.index) {
                *d = _mm256_loadu_si256(i.as_ptr() as *const __m256i);
            }
            let mut wts = [_mm256_setzero_si256(); MAX_WORDS];
            for (d, &v) in wts
                .iter_mut()
                .zip(&self.weights[ch * kh * q..(ch + 1) * kh * q])
            {
                *d = _mm256_set1_epi32(v);
            }
            let off = _mm256_set1_epi32(offset);
            let rq = self.requant.as_ref().map(|r| {
                (
                    _mm256_set1_ps(r.scales[ch]),
                    _mm256_set1_ps(r.lo),
                    _mm256_set1_ps(r.hi),
                    _mm256_set1_epi32(r.zero_point),
                )
            });
            let p = padded.as_ptr();
            let d = dst.as_mut_ptr();
            for oy in 0..oh {
                for ox0 in (0..ow).step_by(LANES) {
                    let mut acc = _mm256_setzero_si256();
                    for ky in 0..kh {
                        let row = p.add((oy * sh + ky * dh) * wp + ox0 * sw);
                        let v = _mm256_loadu_si256(row as *const __m256i);
                        for t in 0..q {
                            let taps = _mm256_maskz_permutexvar_epi8(self.masks[t], idx[t], v);
                            acc = _mm256_dpbusd_epi32(acc, taps, wts[ky * q + t]);
                        }
                    }
                    let v = _mm256_add_epi32(acc, off);
                    let lanes = (ow - ox0).min(LANES);
                    let mask = ((1u32 << lanes) - 1) as __mmask8;
                    let out = d.add(oy * ow + ox0);
                    match (rq, T::KIND) {
                        (Some((s, lo, hi, zp)), ElemKind::U8 | ElemKind::I8) => {
                            let f = _mm256_mul_ps(_mm256_cvtepi32_ps(v), s);
                            let f = _mm256_min_ps(_mm256_max_ps(f, lo), hi);
                            let q8 = _mm256_add_epi32(_mm256_cvtps_epi32(f), zp);
                            _mm256_mask_cvtepi32_storeu_epi8(out as *mut i8, mask, q8);
                        }
                        _ => _mm256_mask_storeu_epi32(out as *mut i32, mask, v),
                    }
                }
            }
        }
    }
}
