//! Packing of operand blocks into the panel layouts the micro-kernels stream through:
//! A as `MR`-row panels (element `(r, p)` at `p * MR + r`), B as `NR`-column panels
//! (element `(p, j)` at `p * NR + j`). Partial panels are zero padded.

use super::micro::{MR, NR};
use super::{GatherRef, MatRef};

/// Packs rows `i0..i0 + mc`, columns `p0..p0 + kc` of `a` into `dst`
/// (`ceil(mc / MR) * MR * kc` floats).
pub fn pack_a(dst: &mut [f32], a: &MatRef, i0: usize, mc: usize, p0: usize, kc: usize) {
    let panels = mc.div_ceil(MR);
    #[cfg(target_arch = "x86_64")]
    let avx = a.cs == 1 && kc >= 8 && super::has_avx2_fma();
    for (panel, chunk) in dst.chunks_exact_mut(MR * kc).take(panels).enumerate() {
        let r0 = i0 + panel * MR;
        let rows = MR.min(i0 + mc - r0);
        #[cfg(target_arch = "x86_64")]
        if avx && rows == MR {
            let src: [&[f32]; MR] = std::array::from_fn(|r| {
                let start = (r0 + r) * a.rs + p0;
                &a.data[start..start + kc]
            });
            // SAFETY: AVX2 checked above; every row holds `kc` floats and `chunk` MR * kc.
            unsafe { pack_a_panel_avx2(chunk, &src, kc) };
            continue;
        }
        if rows < MR {
            chunk.fill(0.0);
        }
        for r in 0..rows {
            let start = (r0 + r) * a.rs + p0 * a.cs;
            if a.cs == 1 {
                let src = &a.data[start..start + kc];
                for (p, &x) in src.iter().enumerate() {
                    chunk[p * MR + r] = x;
                }
            } else {
                for p in 0..kc {
                    chunk[p * MR + r] = a.data[start + p * a.cs];
                }
            }
        }
    }
}

/// One full `MR`-row panel of row-major A: eight columns at a time are transposed in
/// registers (an 8x8 transpose with two zero rows) instead of being scattered one float at a
/// time, which made packing cost half as much as the products for Winograd's short-K
/// products.
///
/// # Safety
/// AVX2 must be available; `src` rows hold `kc` floats and `chunk` `MR * kc`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn pack_a_panel_avx2(chunk: &mut [f32], src: &[&[f32]; MR], kc: usize) {
    use std::arch::x86_64::*;
    debug_assert!(MR == 6 && chunk.len() >= MR * kc && src.iter().all(|r| r.len() >= kc));
    let d = chunk.as_mut_ptr();
    let z = _mm256_setzero_ps();
    let mut p = 0;
    while p + 8 <= kc {
        let r: [__m256; MR] = std::array::from_fn(|i| _mm256_loadu_ps(src[i].as_ptr().add(p)));
        // Rows 6 and 7 are zero. Column q: rows 0..6 then two zeros. Stored MR apart in
        // order, so each store's two extra floats are overwritten by the next; the last
        // block's eighth column is stored without them.
        let cols =
            crate::kernels::simd::avx::transpose8x8([r[0], r[1], r[2], r[3], r[4], r[5], z, z]);
        for (q, c) in cols.iter().enumerate().take(7) {
            _mm256_storeu_ps(d.add((p + q) * MR), *c);
        }
        if p + 8 < kc {
            _mm256_storeu_ps(d.add((p + 7) * MR), cols[7]);
        } else {
            let mut last = [0.0f32; 8];
            _mm256_storeu_ps(last.as_mut_ptr(), cols[7]);
            std::ptr::copy_nonoverlapping(last.as_ptr(), d.add((p + 7) * MR), MR);
        }
        p += 8;
    }
    for p in p..kc {
        for (r, row) in src.iter().enumerate() {
            *d.add(p * MR + r) = row[p];
        }
    }
}

/// Packs rows `p0..p0 + kc`, columns `j0..j0 + nc` of `b` into `dst`
/// (`ceil(nc / NR) * NR * kc` floats).
pub fn pack_b(dst: &mut [f32], b: &MatRef, p0: usize, kc: usize, j0: usize, nc: usize) {
    let panels = nc.div_ceil(NR);
    for (panel, chunk) in dst.chunks_exact_mut(NR * kc).take(panels).enumerate() {
        let c0 = j0 + panel * NR;
        let cols = NR.min(j0 + nc - c0);
        if b.cs == 1 {
            for p in 0..kc {
                let start = (p0 + p) * b.rs + c0;
                let d = &mut chunk[p * NR..(p + 1) * NR];
                d[..cols].copy_from_slice(&b.data[start..start + cols]);
                d[cols..].fill(0.0);
            }
        } else {
            if cols < NR {
                chunk.fill(0.0);
            }
            // Walk each source column along p: contiguous when B is a transposed row-major matrix.
            for j in 0..cols {
                let start = p0 * b.rs + (c0 + j) * b.cs;
                for p in 0..kc {
                    chunk[p * NR + j] = b.data[start + p * b.rs];
                }
            }
        }
    }
}

/// As [`pack_b`] for an implicit matrix `B[p, j] = base[row_off[p] + col_off[j]]`.
/// With `avx`, `dst` needs `NR` floats of slack and `g.base` [`super::GATHER_SLACK`].
pub fn pack_b_gather(
    dst: &mut [f32],
    g: &GatherRef,
    p0: usize,
    kc: usize,
    j0: usize,
    nc: usize,
    avx: bool,
) {
    #[cfg(target_arch = "x86_64")]
    if avx {
        let panels = nc.div_ceil(NR);
        assert!(dst.len() >= panels * NR * kc + NR);
        // SAFETY: AVX2 checked by the caller; `dst` slack asserted above, `g.base` slack
        // validated by `GatherRef::new`.
        unsafe { gather_avx2(dst, g, p0, kc, j0, nc) };
        return;
    }
    let _ = avx;
    let panels = nc.div_ceil(NR);
    for (panel, chunk) in dst.chunks_exact_mut(NR * kc).take(panels).enumerate() {
        let c0 = j0 + panel * NR;
        let cols = NR.min(j0 + nc - c0);
        let co = &g.col_off[c0..c0 + cols];
        let contiguous = co.windows(2).all(|w| w[1] == w[0] + 1);
        let rows = &g.row_off[p0..p0 + kc];
        for (d, &ro) in chunk.chunks_exact_mut(NR).zip(rows) {
            if contiguous {
                let start = ro + co[0];
                d[..cols].copy_from_slice(&g.base[start..start + cols]);
            } else {
                for (x, &o) in d.iter_mut().zip(co) {
                    *x = g.base[ro + o];
                }
            }
            d[cols..].fill(0.0);
        }
    }
}

/// Packs gathered panels as runs of consecutive columns (an image row segment each): every
/// run is copied as two full 8-float vectors, later runs overwriting the excess of earlier
/// ones, so a panel row costs a few vector moves whatever the run lengths. Columns past the
/// matrix edge hold arbitrary finite data; the micro-kernels never store them.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn gather_avx2(dst: &mut [f32], g: &GatherRef, p0: usize, kc: usize, j0: usize, nc: usize) {
    use std::arch::x86_64::*;
    let base = g.base.as_ptr();
    let rows = &g.row_off[p0..p0 + kc];
    for panel in 0..nc.div_ceil(NR) {
        let c0 = j0 + panel * NR;
        let cols = NR.min(j0 + nc - c0);
        let co = &g.col_off[c0..c0 + cols];
        let mut runs = [(0usize, 0usize); NR];
        let mut n_runs = 0;
        for (j, &o) in co.iter().enumerate() {
            if j == 0 || o != co[j - 1] + 1 {
                runs[n_runs] = (j, o);
                n_runs += 1;
            }
        }
        let runs = &runs[..n_runs];
        let mut d = dst.as_mut_ptr().add(panel * NR * kc);
        for &ro in rows {
            let s = base.add(ro);
            for &(j, o) in runs {
                let v0 = _mm256_loadu_ps(s.add(o));
                let v1 = _mm256_loadu_ps(s.add(o + 8));
                _mm256_storeu_ps(d.add(j), v0);
                _mm256_storeu_ps(d.add(j + 8), v1);
            }
            d = d.add(NR);
        }
    }
}
