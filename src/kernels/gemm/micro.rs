//! Register-blocked micro-kernels: one `MR x NR` tile of C from a packed `MR x kc` panel of A
//! and a packed `kc x NR` panel of B, with the epilogue (scaling, accumulation into C, bias,
//! activation) applied while the tile is still in registers.

use crate::kernels::activation::Activation;

/// Rows of a tile (and of a packed A panel).
pub const MR: usize = 6;
/// Columns of a tile (and of a packed B panel): two 8-lane AVX vectors.
pub const NR: usize = 16;

/// The destination of one tile: `rows <= MR`, `cols <= NR`, row stride `ld`.
pub struct CTile {
    pub ptr: *mut f32,
    pub ld: usize,
    pub rows: usize,
    pub cols: usize,
}

/// How a finished tile is combined with C.
#[derive(Clone, Copy)]
pub struct TileEpi {
    pub alpha: f32,
    pub beta: f32,
    /// First K block: `C = alpha*AB + beta*C` (C is not read when beta is 0, so NaNs in an
    /// uninitialised C do not leak). Later blocks: `C += alpha*AB`.
    pub first: bool,
    /// Last K block: add the biases and apply the activation.
    pub last: bool,
    /// Bias of the tile's first row (one per row) or null.
    pub row_bias: *const f32,
    /// Bias of the tile's first column (one per column) or null.
    pub col_bias: *const f32,
    pub act: Option<Activation>,
}

/// Computes one tile: `kc` steps over panels `a` (stride MR) and `b` (stride NR).
pub type TileFn = unsafe fn(kc: usize, a: *const f32, b: *const f32, c: &CTile, ep: &TileEpi);

/// The tile kernel for a `rows x cols` tile.
pub fn select(rows: usize, cols: usize, avx: bool) -> TileFn {
    #[cfg(target_arch = "x86_64")]
    if avx {
        // U independent accumulator sets keep at least eight FMAs in flight (4-cycle
        // latency, two per cycle) when the tile itself has fewer than eight vectors.
        return match (rows, cols > 8) {
            (1, false) => avx2::tile::<1, 1, 8>,
            (2, false) => avx2::tile::<2, 1, 4>,
            (3, false) => avx2::tile::<3, 1, 3>,
            (4, false) => avx2::tile::<4, 1, 2>,
            (5, false) => avx2::tile::<5, 1, 2>,
            (_, false) => avx2::tile::<6, 1, 2>,
            (1, true) => avx2::tile::<1, 2, 4>,
            (2, true) => avx2::tile::<2, 2, 2>,
            (3, true) => avx2::tile::<3, 2, 2>,
            (4, true) => avx2::tile::<4, 2, 1>,
            (5, true) => avx2::tile::<5, 2, 1>,
            (_, true) => avx2::tile::<6, 2, 1>,
        };
    }
    let _ = (rows, cols, avx);
    tile_generic
}

/// Stores a tile held in memory (row `r` at `acc[r * NR..]`) with the epilogue.
///
/// # Safety
/// `c` must describe writable memory; the bias pointers must cover `c.rows` / `c.cols` values.
pub unsafe fn store_scalar(acc: &[f32; MR * NR], c: &CTile, ep: &TileEpi) {
    for r in 0..c.rows {
        let row = c.ptr.add(r * c.ld);
        for j in 0..c.cols {
            let d = row.add(j);
            let mut v = ep.alpha * acc[r * NR + j];
            if ep.first {
                if ep.beta != 0.0 {
                    v += ep.beta * *d;
                }
            } else {
                v += *d;
            }
            if ep.last {
                if !ep.row_bias.is_null() {
                    v += *ep.row_bias.add(r);
                }
                if !ep.col_bias.is_null() {
                    v += *ep.col_bias.add(j);
                }
                if let Some(act) = ep.act {
                    v = act.apply_scalar(v);
                }
            }
            *d = v;
        }
    }
}

/// Portable tile kernel (full MR x NR compute; LLVM vectorises the inner loop for the baseline).
///
/// # Safety
/// `a` must hold `kc * MR` floats, `b` `kc * NR` floats; `c` as in [`store_scalar`].
unsafe fn tile_generic(kc: usize, a: *const f32, b: *const f32, c: &CTile, ep: &TileEpi) {
    let a = std::slice::from_raw_parts(a, kc * MR);
    let b = std::slice::from_raw_parts(b, kc * NR);
    let mut acc = [0f32; MR * NR];
    for (ap, bp) in a.chunks_exact(MR).zip(b.chunks_exact(NR)) {
        for (r, &av) in ap.iter().enumerate() {
            let row = &mut acc[r * NR..(r + 1) * NR];
            for (x, &bv) in row.iter_mut().zip(bp) {
                *x += av * bv;
            }
        }
    }
    store_scalar(&acc, c, ep);
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{store_scalar, CTile, TileEpi, MR, NR};
    use crate::kernels::simd::{avx, has_vector_form};
    use std::arch::x86_64::*;

    /// `R x 8V` tile with AVX2/FMA, K unrolled `U` times into separate accumulators; `R`, `V`
    /// and `U` are constants so the accumulators live in registers (at most 12 of 16).
    ///
    /// # Safety
    /// AVX2 and FMA must be available; pointers as in `tile_generic`; `c.rows == R` and
    /// `c.cols <= 8 * V`.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn tile<const R: usize, const V: usize, const U: usize>(
        kc: usize,
        a: *const f32,
        b: *const f32,
        c: &CTile,
        ep: &TileEpi,
    ) {
        let mut acc = [[[_mm256_setzero_ps(); V]; R]; U];
        let mut ap = a;
        let mut bp = b;
        for _ in 0..kc / U {
            for set in acc.iter_mut() {
                step(set, ap, bp);
                ap = ap.add(MR);
                bp = bp.add(NR);
            }
        }
        for _ in 0..kc % U {
            step(&mut acc[0], ap, bp);
            ap = ap.add(MR);
            bp = bp.add(NR);
        }
        let (head, rest) = acc.split_at_mut(1);
        for set in rest.iter() {
            for (dst, src) in head[0].iter_mut().zip(set) {
                for (d, &s) in dst.iter_mut().zip(src) {
                    *d = _mm256_add_ps(*d, s);
                }
            }
        }
        let acc = &head[0];
        if c.cols == 8 * V {
            store::<R, V>(acc, c, ep);
        } else {
            let mut tmp = [0f32; MR * NR];
            for (r, row) in acc.iter().enumerate() {
                for (v, &x) in row.iter().enumerate() {
                    _mm256_storeu_ps(tmp.as_mut_ptr().add(r * NR + 8 * v), x);
                }
            }
            store_scalar(&tmp, c, ep);
        }
    }

    /// One K step: `acc += a[0..R] (outer) b[0..8V]`.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn step<const R: usize, const V: usize>(
        acc: &mut [[__m256; V]; R],
        ap: *const f32,
        bp: *const f32,
    ) {
        let mut bv = [_mm256_setzero_ps(); V];
        for (v, x) in bv.iter_mut().enumerate() {
            *x = _mm256_loadu_ps(bp.add(8 * v));
        }
        for (r, row) in acc.iter_mut().enumerate() {
            let av = _mm256_broadcast_ss(&*ap.add(r));
            for (x, &bvv) in row.iter_mut().zip(bv.iter()) {
                *x = _mm256_fmadd_ps(av, bvv, *x);
            }
        }
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn store<const R: usize, const V: usize>(
        acc: &[[__m256; V]; R],
        c: &CTile,
        ep: &TileEpi,
    ) {
        let alpha = _mm256_set1_ps(ep.alpha);
        let beta = _mm256_set1_ps(ep.beta);
        let act = if ep.last { ep.act } else { None };
        let vec_act = act.filter(|&a| has_vector_form(a));
        for (r, row) in acc.iter().enumerate() {
            let dst = c.ptr.add(r * c.ld);
            let row_bias =
                (ep.last && !ep.row_bias.is_null()).then(|| _mm256_set1_ps(*ep.row_bias.add(r)));
            for (v, &x) in row.iter().enumerate() {
                let d = dst.add(8 * v);
                let mut y = x;
                if ep.alpha != 1.0 {
                    y = _mm256_mul_ps(y, alpha);
                }
                if ep.first {
                    if ep.beta != 0.0 {
                        y = _mm256_add_ps(y, _mm256_mul_ps(beta, _mm256_loadu_ps(d)));
                    }
                } else {
                    y = _mm256_add_ps(y, _mm256_loadu_ps(d));
                }
                if let Some(b) = row_bias {
                    y = _mm256_add_ps(y, b);
                }
                if ep.last && !ep.col_bias.is_null() {
                    y = _mm256_add_ps(y, _mm256_loadu_ps(ep.col_bias.add(8 * v)));
                }
                if let Some(a) = vec_act {
                    y = avx::act(y, a);
                }
                _mm256_storeu_ps(d, y);
            }
        }
        if let Some(a) = act.filter(|&a| !has_vector_form(a)) {
            for r in 0..R {
                a.apply(std::slice::from_raw_parts_mut(c.ptr.add(r * c.ld), 8 * V));
            }
        }
    }
}
