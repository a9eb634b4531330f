//! Zero-padded, stride-phase-split copies of image planes.
//!
//! Phase `r` of a padded row holds padded columns `r, r + sx, r + 2sx, ...`, so the input
//! column `ox * sx + off` read by output `ox` lives at phase `off % sx`, index
//! `ox + off / sx`: consecutive outputs read consecutive memory for any stride. With
//! `sx == 1` this is just the padded row.
//!
//! Rows are filled with 8-float vector moves for strides 1 and 2 (AVX2): small planes have
//! many short rows, where per-row `memcpy`/`memset` calls would cost more than the copy.

/// Layout of one padded plane: `hp` rows of `row = sx * wq` floats.
#[derive(Clone, Copy, Debug)]
pub struct Phased {
    pub sx: usize,
    /// Columns per phase.
    pub wq: usize,
    /// Floats per padded row.
    pub row: usize,
    /// Floats per plane.
    pub plane: usize,
    /// Padded width: the columns kernels read for valid outputs. Vector kernels may also
    /// read a few columns past it into lanes they discard, so those are left unwritten.
    wp: usize,
    avx: bool,
}

impl Phased {
    /// Layout for `h x w` planes with `[top, left, bottom, right]` pads and column stride `sx`.
    pub fn new(h: usize, w: usize, pads: [usize; 4], sx: usize) -> Phased {
        let wp = w + pads[1] + pads[3];
        let mut wq = wp.div_ceil(sx);
        let avx = sx <= 2 && crate::kernels::simd::has_avx2_fma();
        if avx {
            // Whole vectors per phase plus room for the vector stores that run past the data
            // (at most 15 floats past the padded width).
            wq = wq.div_ceil(8) * 8 + 16;
        }
        let hp = h + pads[0] + pads[2];
        Phased {
            sx,
            wq,
            row: sx * wq,
            plane: sx * wq * hp,
            wp,
            avx,
        }
    }

    /// Offset of padded position `(y, x)` within a plane.
    pub fn at(&self, y: usize, x: usize) -> usize {
        y * self.row + (x % self.sx) * self.wq + x / self.sx
    }

    /// Writes the padded, phase-split copy of the `h x w` plane `src` into `dst` (one plane).
    pub fn fill(&self, dst: &mut [f32], src: &[f32], (h, w): (usize, usize), pads: [usize; 4]) {
        #[cfg(target_arch = "x86_64")]
        if self.avx {
            // SAFETY: AVX2 was detected in `new`, which also sized `wq` for the vector stores.
            unsafe { avx2::fill(self, dst, src, (h, w), pads) };
            return;
        }
        let top = pads[0] * self.row;
        dst[..top].fill(0.0);
        dst[top + h * self.row..self.plane].fill(0.0);
        let left = pads[1];
        let rows = src
            .chunks_exact(w)
            .zip(dst[top..].chunks_exact_mut(self.row))
            .take(h);
        // Generic stride: walk each row with a running (phase, index) instead of dividing.
        let start = (left % self.sx, left / self.sx);
        for (s, d) in rows {
            d.fill(0.0);
            let (mut r, mut i) = start;
            for &v in s {
                d[r * self.wq + i] = v;
                r += 1;
                if r == self.sx {
                    r = 0;
                    i += 1;
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::Phased;
    use std::arch::x86_64::*;

    /// [`Phased::fill`] for strides 1 and 2; one target-feature function so the row copies
    /// inline (planes of small layers have many short rows).
    #[target_feature(enable = "avx2")]
    pub unsafe fn fill(
        l: &Phased,
        dst: &mut [f32],
        src: &[f32],
        (h, w): (usize, usize),
        pads: [usize; 4],
    ) {
        let top = pads[0] * l.row;
        let bottom = top + h * l.row;
        zero(&mut dst[..top]);
        zero(&mut dst[bottom..l.plane]);
        let rows = src
            .chunks_exact(w)
            .zip(dst[top..bottom].chunks_exact_mut(l.row));
        for (s, d) in rows {
            if l.sx == 1 {
                row1(d, s, pads[1], l.wp);
            } else {
                row2(d, s, pads[1], l.wq);
            }
        }
    }

    /// Zeroes `d` (any length) with vector stores.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn zero(d: &mut [f32]) {
        if d.len() >= 8 {
            zero_tail(d, 0);
        } else {
            d.fill(0.0);
        }
    }

    /// Lanes `0..n` set (n may be negative or above 8).
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn first_lanes(n: isize) -> __m256i {
        let n = n.clamp(0, 8) as i32;
        _mm256_cmpgt_epi32(
            _mm256_set1_epi32(n),
            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
        )
    }

    /// Eight floats from `s[x..]`, zero past `s.len()`; never reads outside `s`.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn load8(s: &[f32], x: usize) -> __m256 {
        if x + 8 <= s.len() {
            _mm256_loadu_ps(s.as_ptr().add(x))
        } else {
            let mask = first_lanes(s.len() as isize - x as isize);
            _mm256_maskload_ps(s.as_ptr().wrapping_add(x), mask)
        }
    }

    /// A zero vector the optimiser cannot see through: otherwise it turns short loops of
    /// zero stores into `memset` calls, which cost more than the stores on short rows.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn opaque_zero() -> __m256 {
        std::hint::black_box(_mm256_setzero_ps())
    }

    /// Zeroes `d[from..]` with 8-float stores (the last one aligned to the end).
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn zero_tail(d: &mut [f32], from: usize) {
        let z = opaque_zero();
        let end = d.len();
        let mut i = from;
        while i + 8 <= end {
            _mm256_storeu_ps(d.as_mut_ptr().add(i), z);
            i += 8;
        }
        if i < end {
            _mm256_storeu_ps(d.as_mut_ptr().add(end - 8), z);
        }
    }

    /// Stride 1: zeros, `src` at `left`, zeros up to the padded width `wp`.
    /// Needs `d.len() >= max(left + ceil8(w), wp) + 8`.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn row1(d: &mut [f32], src: &[f32], left: usize, wp: usize) {
        let w = src.len();
        assert!(d.len() >= (left + w.div_ceil(8) * 8).max(wp) + 8);
        let z = opaque_zero();
        let mut i = 0;
        while i < left {
            _mm256_storeu_ps(d.as_mut_ptr().add(i), z);
            i += 8;
        }
        // The last block's masked-off lanes store zeros: the start of the right padding.
        let mut x = 0;
        while x < w {
            _mm256_storeu_ps(d.as_mut_ptr().add(left + x), load8(src, x));
            x += 8;
        }
        let mut i = left + x;
        while i < wp {
            _mm256_storeu_ps(d.as_mut_ptr().add(i), z);
            i += 8;
        }
    }

    /// Stride 2: input columns go to padded column `left + x`, i.e. phase `(left + x) % 2` at
    /// index `(left + x) / 2`. Sixteen columns per step are split with shuffles; even input
    /// columns all land in one phase, odd ones in the other.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn row2(d: &mut [f32], src: &[f32], left: usize, wq: usize) {
        let w = src.len();
        let k = left / 2;
        let (even_at, odd_at) = if left.is_multiple_of(2) {
            (k, wq + k)
        } else {
            (wq + k, k + 1)
        };
        let steps = w.div_ceil(16) * 8;
        // Stores stay in their phase (so phase 0 never spills into phase 1) and in `d`.
        assert!(d.len() >= 2 * wq && wq.is_multiple_of(8));
        assert!(even_at % wq + steps <= wq && odd_at % wq + steps <= wq);
        zero_tail(&mut d[..2 * wq], 0);
        let fix = |v: __m256| _mm256_castpd_ps(_mm256_permute4x64_pd::<0xD8>(_mm256_castps_pd(v)));
        let p = d.as_mut_ptr();
        let mut x = 0;
        while x < w {
            let a = load8(src, x);
            let b = load8(src, x + 8);
            _mm256_storeu_ps(p.add(even_at + x / 2), fix(_mm256_shuffle_ps::<0x88>(a, b)));
            _mm256_storeu_ps(p.add(odd_at + x / 2), fix(_mm256_shuffle_ps::<0xDD>(a, b)));
            x += 16;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::simd::portable_only;

    #[test]
    fn fill_matches_positions() {
        for portable in [false, true] {
            for sx in 1..4 {
                for (h, w, pads) in [
                    (3, 7, [1, 2, 2, 1]),
                    (2, 21, [0, 1, 1, 3]),
                    (1, 16, [2, 0, 0, 9]),
                ] {
                    let l = if portable {
                        portable_only(|| Phased::new(h, w, pads, sx))
                    } else {
                        Phased::new(h, w, pads, sx)
                    };
                    let src: Vec<f32> = (1..=(h * w)).map(|v| v as f32).collect();
                    let mut dst = vec![f32::NAN; l.plane];
                    l.fill(&mut dst, &src, (h, w), pads);
                    let hp = h + pads[0] + pads[2];
                    let wp = w + pads[1] + pads[3];
                    for y in 0..hp {
                        for x in 0..wp {
                            let inside =
                                y >= pads[0] && y < pads[0] + h && x >= pads[1] && x < pads[1] + w;
                            let want = if inside {
                                src[(y - pads[0]) * w + x - pads[1]]
                            } else {
                                0.0
                            };
                            assert_eq!(dst[l.at(y, x)], want, "sx {sx} w {w} at ({y}, {x})");
                        }
                    }
                }
            }
        }
    }
}
