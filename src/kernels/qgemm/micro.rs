//! Micro-kernels: `MR x NR` i32 tile += packed A (MR rows of i16 pairs) x packed B panel.
//! The AVX2 kernel and the portable one compute the same integer sums, so results are
//! bit-identical.

use super::{MR, NR};

/// Portable micro-kernel. `a`: `pairs * MR` packed pairs; `b`: `pairs * 2 * NR` i16;
/// `c`: tile rows at stride `ldc`, accumulated into.
pub(super) fn kernel_scalar(pairs: usize, a: &[i32], b: &[i16], c: &mut [i32], ldc: usize) {
    let mut acc = [[0i32; NR]; MR];
    for p in 0..pairs {
        let bp = &b[p * 2 * NR..(p + 1) * 2 * NR];
        for (r, row) in acc.iter_mut().enumerate() {
            let pair = a[p * MR + r];
            let lo = i32::from(pair as i16);
            let hi = pair >> 16;
            for (j, v) in row.iter_mut().enumerate() {
                *v = v.wrapping_add(lo * i32::from(bp[2 * j]) + hi * i32::from(bp[2 * j + 1]));
            }
        }
    }
    for (r, row) in acc.iter().enumerate() {
        for (o, v) in c[r * ldc..r * ldc + NR].iter_mut().zip(row) {
            *o = o.wrapping_add(*v);
        }
    }
}

/// AVX2 micro-kernel: per pair, 6 broadcasts of A, 2 loads of B, 12 `vpmaddwd` (u8 and i8
/// widened to i16, so the pair sums cannot saturate) and 12 `vpaddd` into 12 accumulators.
///
/// # Safety
/// The CPU must support AVX2; `a` must hold `pairs * MR` values, `b` `pairs * 2 * NR`, and
/// `c` `(MR - 1) * ldc + NR` (checked by the caller, asserted in debug builds).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
pub(super) unsafe fn kernel_avx2(pairs: usize, a: &[i32], b: &[i16], c: &mut [i32], ldc: usize) {
    use std::arch::x86_64::*;
    debug_assert!(a.len() >= pairs * MR && b.len() >= pairs * 2 * NR);
    debug_assert!(c.len() >= (MR - 1) * ldc + NR);
    let (ap, bp, cp) = (a.as_ptr(), b.as_ptr(), c.as_mut_ptr());
    let mut acc = [[_mm256_setzero_si256(); 2]; MR];
    for p in 0..pairs {
        // SAFETY: p < pairs, so every read stays inside `a` and `b` as the contract requires.
        unsafe {
            let b0 = _mm256_loadu_si256(bp.add(p * 2 * NR) as *const __m256i);
            let b1 = _mm256_loadu_si256(bp.add(p * 2 * NR + 16) as *const __m256i);
            for (r, row) in acc.iter_mut().enumerate() {
                let av = _mm256_set1_epi32(*ap.add(p * MR + r));
                row[0] = _mm256_add_epi32(row[0], _mm256_madd_epi16(av, b0));
                row[1] = _mm256_add_epi32(row[1], _mm256_madd_epi16(av, b1));
            }
        }
    }
    for (r, row) in acc.iter().enumerate() {
        // SAFETY: row r of the tile is c[r * ldc .. r * ldc + 16], inside `c` by the contract.
        unsafe {
            let dst = cp.add(r * ldc) as *mut __m256i;
            let lo = _mm256_loadu_si256(dst);
            _mm256_storeu_si256(dst, _mm256_add_epi32(lo, row[0]));
            let dst = cp.add(r * ldc + 8) as *mut __m256i;
            let hi = _mm256_loadu_si256(dst);
            _mm256_storeu_si256(dst, _mm256_add_epi32(hi, row[1]));
        }
    }
}
