//! 2x2 / stride-2 max pooling of 8-bit codes (u8, or i8 seen through its order-preserving
//! `x ^ 0x80` map), the pool that follows most quantized convolutions. Max pooling commutes
//! with a monotone requantization, so an integer graph pools the codes themselves.

use rayon::prelude::*;

use super::scratch;

/// Bytes of input below which pooling stays on one thread.
const PAR_MIN_BYTES: usize = 1 << 16;

/// The order of the codes: unsigned bytes, or two's-complement ones.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CodeOrder {
    Unsigned,
    Signed,
}

impl CodeOrder {
    /// XOR that maps the codes onto u8 in the same order.
    fn flip(self) -> u8 {
        match self {
            CodeOrder::Unsigned => 0,
            CodeOrder::Signed => 0x80,
        }
    }
}

/// Pools `x` (`[planes, h, w]`) into `out` (`[planes, h / 2, w / 2]`): floor mode, no padding,
/// so a trailing odd row or column is dropped. Returns false (writing nothing) when the
/// sizes do not match.
///
/// Two passes over a block of planes, so that short rows (a 26-wide plane has 13 outputs a
/// row) still fill whole vectors: the vertical maxima of each row pair, the even width of
/// every output row packed end to end, then the maxima of adjacent pairs across the packed
/// rows, which never straddle two rows and land exactly in the output's layout.
pub fn max_2x2_planes(
    x: &[u8],
    [planes, h, w]: [usize; 3],
    order: CodeOrder,
    out: &mut [u8],
) -> bool {
    let (oh, ow) = (h / 2, w / 2);
    if x.len() != planes * h * w || out.len() != planes * oh * ow {
        return false;
    }
    if out.is_empty() {
        return true;
    }
    let block = |src: &[u8], dst: &mut [u8]| {
        scratch::with_u8(2 * dst.len() + VERTICAL_SLACK, |packed| {
            vertical_pairs(src, [h, w], order, packed);
            horizontal_pairs(&packed[..2 * dst.len()], order, dst);
        })
    };
    // Planes per block: about 16 KiB of input, so the packed rows stay in L1.
    let per_block = (BLOCK_BYTES / (h * w)).clamp(1, planes);
    let threads = super::par::threads();
    if threads > 1 && planes > 1 && x.len() >= PAR_MIN_BYTES {
        out.par_chunks_mut(per_block * oh * ow)
            .zip(x.par_chunks(per_block * h * w))
            .for_each(|(d, s)| block(s, d));
    } else {
        for (d, s) in out
            .chunks_mut(per_block * oh * ow)
            .zip(x.chunks(per_block * h * w))
        {
            block(s, d);
        }
    }
    true
}

/// Input bytes pooled per block.
const BLOCK_BYTES: usize = 16 << 10;

/// Bytes a vector store may write past the packed rows.
const VERTICAL_SLACK: usize = 32;

/// `packed[(p oh + r) 2ow + c]` = the larger of rows `2r` and `2r + 1` at column `c < 2ow` of
/// plane `p`, in the flipped (unsigned) order. `packed` holds [`VERTICAL_SLACK`] bytes more.
fn vertical_pairs(src: &[u8], [h, w]: [usize; 2], order: CodeOrder, packed: &mut [u8]) {
    let flip = order.flip();
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") {
        // SAFETY: AVX2 was detected.
        done = unsafe { vertical_pairs_avx2(src, [h, w], flip, packed) };
    }
    let (oh, we) = (h / 2, w / 2 * 2);
    for row in done..src.len() / (h * w) * oh {
        let top = row / oh * h * w + 2 * (row % oh) * w;
        for c in 0..we {
            packed[row * we + c] = (src[top + c] ^ flip).max(src[top + w + c] ^ flip);
        }
    }
}

/// The packed rows from 32-byte chunks, as long as whole chunks can be read; the last
/// chunk's extra bytes land past the row, where the next row (or the slack) overwrites them.
/// Returns how many rows it wrote; the caller finishes.
///
/// # Safety
/// AVX2; `packed` holds `VERTICAL_SLACK` bytes more than the packed rows.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn vertical_pairs_avx2(
    src: &[u8],
    [h, w]: [usize; 2],
    flip: u8,
    packed: &mut [u8],
) -> usize {
    use std::arch::x86_64::*;
    let (oh, we) = (h / 2, w / 2 * 2);
    let span = we.div_ceil(32) * 32;
    let rows = src.len() / (h * w) * oh;
    debug_assert!(packed.len() >= rows * we + VERTICAL_SLACK && span - we < VERTICAL_SLACK);
    let f = _mm256_set1_epi8(flip as i8);
    let (s, d) = (src.as_ptr(), packed.as_mut_ptr());
    for row in 0..rows {
        let top = row / oh * h * w + 2 * (row % oh) * w;
        if top + w + span > src.len() {
            return row;
        }
        for c in (0..we).step_by(32) {
            // SAFETY: both rows' chunks end by `top + w + span`, checked above; the store ends
            // by `row * we + span`, inside the packed rows plus their slack.
            unsafe {
                let a = _mm256_loadu_si256(s.add(top + c) as *const __m256i);
                let b = _mm256_loadu_si256(s.add(top + w + c) as *const __m256i);
                let m = _mm256_max_epu8(_mm256_xor_si256(a, f), _mm256_xor_si256(b, f));
                _mm256_storeu_si256(d.add(row * we + c) as *mut __m256i, m);
            }
        }
    }
    rows
}

/// `out[o]` = the larger of `packed[2o]` and `packed[2o + 1]` (flipped order), unflipped.
fn horizontal_pairs(packed: &[u8], order: CodeOrder, out: &mut [u8]) {
    let flip = order.flip();
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") {
        // SAFETY: AVX2 was detected; `packed` holds `2 * out.len()` bytes.
        done = unsafe { horizontal_pairs_avx2(packed, flip, out) };
    }
    for (o, p) in out[done..]
        .iter_mut()
        .zip(packed[2 * done..].chunks_exact(2))
    {
        *o = p[0].max(p[1]) ^ flip;
    }
}

/// Sixteen outputs per step, each pair one u16 lane split into its two bytes. Returns how
/// many outputs it wrote (a multiple of 16); the caller finishes.
///
/// # Safety
/// AVX2; `packed` holds at least `2 * out.len()` bytes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn horizontal_pairs_avx2(packed: &[u8], flip: u8, out: &mut [u8]) -> usize {
    use std::arch::x86_64::*;
    debug_assert!(packed.len() >= 2 * out.len());
    let steps = out.len() / 16;
    let f = _mm_set1_epi8(flip as i8);
    let low = _mm256_set1_epi16(0x00ff);
    for s in 0..steps {
        // SAFETY: step `s` reads bytes `32 s..32 s + 32` of `packed` and writes outputs
        // `16 s..16 s + 16`, inside the lengths the caller guarantees.
        unsafe {
            let v = _mm256_loadu_si256(packed.as_ptr().add(32 * s) as *const __m256i);
            let m = _mm256_max_epu16(_mm256_and_si256(v, low), _mm256_srli_epi16(v, 8));
            let packed16 = _mm256_permute4x64_epi64(_mm256_packus_epi16(m, m), 0xd8);
            let bytes = _mm_xor_si128(_mm256_castsi256_si128(packed16), f);
            _mm_storeu_si128(out.as_mut_ptr().add(16 * s) as *mut __m128i, bytes);
        }
    }
    steps * 16
}

/// Plain reference for [`max_2x2_planes`]: every window on its own.
pub fn max_2x2_planes_reference(
    x: &[u8],
    [planes, h, w]: [usize; 3],
    order: CodeOrder,
    out: &mut [u8],
) {
    let (oh, ow) = (h / 2, w / 2);
    let f = order.flip();
    for p in 0..planes {
        for r in 0..oh {
            for c in 0..ow {
                let at = |y: usize, x_: usize| x[(p * h + y) * w + x_] ^ f;
                let m = at(2 * r, 2 * c)
                    .max(at(2 * r, 2 * c + 1))
                    .max(at(2 * r + 1, 2 * c))
                    .max(at(2 * r + 1, 2 * c + 1));
                out[(p * oh + r) * ow + c] = m ^ f;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::test_rng::Rng;

    #[test]
    fn fast_planes_match_the_reference() {
        let mut rng = Rng::new(7);
        for order in [CodeOrder::Unsigned, CodeOrder::Signed] {
            for [planes, h, w] in [
                [1, 2, 2],
                [3, 5, 7],
                [64, 26, 26],
                [7, 11, 11],
                [2, 4, 70],
                [5, 9, 33],
            ] {
                let x: Vec<u8> = (0..planes * h * w)
                    .map(|_| rng.range_i32(0, 255) as u8)
                    .collect();
                let n = planes * (h / 2) * (w / 2);
                let (mut fast, mut slow) = (vec![0u8; n], vec![0u8; n]);
                assert!(max_2x2_planes(&x, [planes, h, w], order, &mut fast));
                max_2x2_planes_reference(&x, [planes, h, w], order, &mut slow);
                assert_eq!(fast, slow, "{order:?}, {planes}x{h}x{w}");
            }
        }
    }

    #[test]
    fn signed_codes_pool_in_signed_order() {
        // -1 (0xff) loses to 1 and -128 (0x80) loses to everything.
        let x = [0xff, 0x80, 0x01, 0xfe];
        let mut out = [0u8; 1];
        assert!(max_2x2_planes(&x, [1, 2, 2], CodeOrder::Signed, &mut out));
        assert_eq!(out, [0x01]);
        assert!(max_2x2_planes(&x, [1, 2, 2], CodeOrder::Unsigned, &mut out));
        assert_eq!(out, [0xff]);
    }

    #[test]
    fn odd_planes_drop_the_last_row_and_column() {
        // Two 3x5 planes of distinct values: the pooled 1x2 planes read rows 0-1, columns 0-3.
        let x: Vec<u8> = (0..30).collect();
        let mut out = vec![0u8; 4];
        assert!(max_2x2_planes(&x, [2, 3, 5], CodeOrder::Unsigned, &mut out));
        assert_eq!(out, [6, 8, 21, 23]);
        assert!(!max_2x2_planes(
            &x,
            [2, 3, 4],
            CodeOrder::Unsigned,
            &mut out
        ));
    }
}
