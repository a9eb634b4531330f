//! Direct convolution for layers with few taps per output (`K = C_in * kh * kw` up to
//! [`MAX_K`], stride and dilation 1, one group): first layers such as LeNet-5's 1 -> 20 5x5 or
//! the MNIST CNN's 1 -> 32 3x3. Lowered to GEMM they are a product with a tiny inner
//! dimension, where packing the im2col matrix and the per-tile epilogue cost as much as the
//! multiply-adds; here each output vector costs exactly its `K` FMAs and one store.
//!
//! The image is copied into tightly zero-padded planes (`hp x wp`, row stride `wp`), and the
//! outputs are computed in that "wide" index space: output `(oy, ox)` is at `oy * wp + ox`,
//! and tap `(c, ky, kx)` reads `c * plane + ky * wp + kx` further on, so sixteen consecutive
//! wide outputs read sixteen consecutive inputs for every tap whatever the row width. The
//! `kw - 1` columns per row past the output width are computed and dropped: each vector is
//! compressed to its valid lanes, which are consecutive in the NCHW output.
//!
//! AVX-512 only (masks and lane compression make the wide layout cheap); other CPUs use the
//! GEMM lowering.

use super::Conv2dGeom;
use crate::kernels::activation::Activation;
use crate::kernels::scratch;
use crate::kernels::simd::{has_avx512_f32, has_vector_form};

/// Most taps per output handled here: beyond this the GEMM's packed operands pay for
/// themselves.
pub const MAX_K: usize = 32;
/// Lanes of a vector.
const L: usize = 16;

/// Most bytes of a padded image: every block of output channels reads all of it, so it
/// should stay in L2.
const MAX_PADDED_BYTES: usize = 128 << 10;

/// Whether [`Plan`] handles this convolution of `h x w` images with `pads`.
pub fn fits(
    g: &Conv2dGeom,
    act: Option<Activation>,
    (h, w): (usize, usize),
    pads: [usize; 4],
) -> bool {
    let padded = h
        .saturating_add(pads[0])
        .saturating_add(pads[2])
        .saturating_mul(w.saturating_add(pads[1]).saturating_add(pads[3]))
        .saturating_mul(g.c_in)
        .saturating_mul(4);
    g.groups == 1
        && g.k() <= MAX_K
        && padded <= MAX_PADDED_BYTES
        && g.stride == [1, 1]
        && g.dilation == [1, 1]
        && act.is_none_or(has_vector_form)
        && has_avx512_f32()
}

/// The per-call geometry, shared by every image.
pub struct Plan<'a> {
    c_in: usize,
    c_out: usize,
    h: usize,
    w: usize,
    pads: [usize; 4],
    hp: usize,
    wp: usize,
    oh: usize,
    ow: usize,
    /// `[C_out, K]` filters.
    weights: &'a [f32],
    bias: Option<&'a [f32]>,
    act: Option<Activation>,
    /// Per tap: where it reads, relative to the output's wide index.
    taps: Vec<usize>,
    /// Per output vector: its valid lanes and the NCHW index of the first.
    stores: Vec<(u16, usize)>,
}

impl<'a> Plan<'a> {
    /// Callers check [`fits`]; `weights` is `[C_out, K]`, `(oh, ow)` the output size.
    pub fn new(
        g: &Conv2dGeom,
        weights: &'a [f32],
        bias: Option<&'a [f32]>,
        act: Option<Activation>,
        (h, w): (usize, usize),
        pads: [usize; 4],
        (oh, ow): (usize, usize),
    ) -> Plan<'a> {
        let hp = h + pads[0] + pads[2];
        let wp = w + pads[1] + pads[3];
        let [kh, kw] = g.kernel;
        let plane = hp * wp;
        let mut taps = Vec::with_capacity(g.k());
        for c in 0..g.c_in {
            for ky in 0..kh {
                for kx in 0..kw {
                    taps.push(c * plane + ky * wp + kx);
                }
            }
        }
        // Wide outputs up to the last valid one.
        let wide = (oh - 1) * wp + ow;
        let stores = (0..wide.div_ceil(L))
            .map(|v| {
                let j0 = v * L;
                let mut mask = 0u16;
                for l in 0..L {
                    let j = j0 + l;
                    if j < wide && j % wp < ow {
                        mask |= 1 << l;
                    }
                }
                (mask, j0 / wp * ow + (j0 % wp).min(ow))
            })
            .collect();
        Plan {
            c_in: g.c_in,
            c_out: g.c_out,
            h,
            w,
            pads,
            hp,
            wp,
            oh,
            ow,
            weights,
            bias,
            act,
            taps,
            stores,
        }
    }

    /// Floats of the padded copy of one image: full vector loads of the last outputs run
    /// up to a vector past the last plane.
    fn padded_len(&self) -> usize {
        self.c_in * self.hp * self.wp + L + self.wp
    }

    /// Convolves one image `x` (`[C_in, h, w]`) into `out` (`[C_out, oh, ow]`).
    pub fn image(&self, x: &[f32], out: &mut [f32]) {
        assert!(
            x.len() == self.c_in * self.h * self.w && out.len() == self.c_out * self.oh * self.ow
        );
        scratch::with_f32(self.padded_len(), |p| {
            self.pad(x, p);
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `fits` checked AVX-512 (callers only build plans that fit); `p` holds
            // the padded image with slack for the last vectors (see `padded_len`), and
            // `stores` only addresses outputs inside a plane of `out`.
            unsafe {
                avx512::image(self, p, out)
            };
        })
    }

    /// Writes the zero-padded copy of `x` into `p`.
    fn pad(&self, x: &[f32], p: &mut [f32]) {
        let (hp, wp) = (self.hp, self.wp);
        let [top, left, _, _] = self.pads;
        let plane = hp * wp;
        for (src, dst) in x
            .chunks_exact(self.h * self.w)
            .zip(p.chunks_exact_mut(plane))
        {
            dst[..top * wp].fill(0.0);
            for (s, d) in src
                .chunks_exact(self.w)
                .zip(dst[top * wp..].chunks_exact_mut(wp))
            {
                d[..left].fill(0.0);
                d[left..left + self.w].copy_from_slice(s);
                d[left + self.w..].fill(0.0);
            }
            dst[(top + self.h) * wp..].fill(0.0);
        }
        p[self.c_in * plane..].fill(0.0);
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{Plan, L};
    use crate::kernels::simd::avx512;
    use std::arch::x86_64::*;

    /// All output channels of one image, `CB` channels by `P` vectors at a time.
    ///
    /// # Safety
    /// AVX-512 F must be available; `p` is the padded image of `plan` (with its slack) and
    /// `out` one image's output.
    #[target_feature(enable = "avx512f,avx512vl,popcnt")]
    pub unsafe fn image(plan: &Plan, p: &[f32], out: &mut [f32]) {
        let mut co = 0;
        while co < plan.c_out {
            let cb = match plan.c_out - co {
                r if r >= 8 => 8,
                r if r >= 4 => 4,
                r if r >= 2 => 2,
                _ => 1,
            };
            match cb {
                8 => channels::<8>(plan, p, out, co),
                4 => channels::<4>(plan, p, out, co),
                2 => channels::<2>(plan, p, out, co),
                _ => channels::<1>(plan, p, out, co),
            }
            co += cb;
        }
    }

    /// Output channels `co..co + CB` over the whole plane.
    #[inline]
    #[target_feature(enable = "avx512f,avx512vl,popcnt")]
    unsafe fn channels<const CB: usize>(plan: &Plan, p: &[f32], out: &mut [f32], co: usize) {
        // Three vectors when CB is 8 (24 accumulators); more vectors for fewer channels keep
        // enough independent FMAs in flight.
        let nv = plan.stores.len();
        let mut v = 0;
        while v < nv {
            match (nv - v, CB) {
                (r, 8) if r >= 3 => block::<CB, 3>(plan, p, out, co, v),
                (r, _) if r >= 4 && CB < 8 => block::<CB, 4>(plan, p, out, co, v),
                (r, _) if r >= 2 => block::<CB, 2>(plan, p, out, co, v),
                _ => block::<CB, 1>(plan, p, out, co, v),
            }
            v += match (nv - v, CB) {
                (r, 8) if r >= 3 => 3,
                (r, _) if r >= 4 && CB < 8 => 4,
                (r, _) if r >= 2 => 2,
                _ => 1,
            };
        }
    }

    /// Channels `co..co + CB` of output vectors `v..v + P`.
    #[inline]
    #[target_feature(enable = "avx512f,avx512vl,popcnt")]
    unsafe fn block<const CB: usize, const P: usize>(
        plan: &Plan,
        p: &[f32],
        out: &mut [f32],
        co: usize,
        v: usize,
    ) {
        let k = plan.taps.len();
        let mut acc = [[_mm512_setzero_ps(); P]; CB];
        let src = p.as_ptr().add(v * L);
        let w = plan.weights.as_ptr().add(co * k);
        for (t, &off) in plan.taps.iter().enumerate() {
            let mut xv = [_mm512_setzero_ps(); P];
            for (i, x) in xv.iter_mut().enumerate() {
                *x = _mm512_loadu_ps(src.add(off + i * L));
            }
            for (c, row) in acc.iter_mut().enumerate() {
                let wv = _mm512_set1_ps(*w.add(c * k + t));
                for (a, &x) in row.iter_mut().zip(xv.iter()) {
                    *a = _mm512_fmadd_ps(wv, x, *a);
                }
            }
        }
        let plane = plan.oh * plan.ow;
        for (c, row) in acc.iter().enumerate() {
            let bias = plan.bias.map_or(0.0, |b| b[co + c]);
            let bv = _mm512_set1_ps(bias);
            let dst = out.as_mut_ptr().add((co + c) * plane);
            for (i, &a) in row.iter().enumerate() {
                let mut y = _mm512_add_ps(a, bv);
                if let Some(f) = plan.act {
                    y = avx512::act(y, f);
                }
                let (mask, at) = plan.stores[v + i];
                let packed = _mm512_maskz_compress_ps(mask, y);
                let n = mask.count_ones();
                let keep = ((1u32 << n) - 1) as __mmask16;
                _mm512_mask_storeu_ps(dst.add(at), keep, packed);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::conv::{conv2d_reference, Conv2d};
    use crate::kernels::testutil::conv_geom as geom;
    use crate::kernels::testutil::{assert_close, Rng};

    #[test]
    fn matches_reference() {
        if !has_avx512_f32() {
            eprintln!("no AVX-512: the small-K kernel is not used on this CPU");
            return;
        }
        let mut rng = Rng::new(21);
        let cases = [
            // LeNet-5 and MNIST CNN first layers.
            (geom(1, 20, 1, [5, 5], [1, 1], [1, 1], [0; 4]), [2, 28, 28]),
            (geom(1, 32, 1, [3, 3], [1, 1], [1, 1], [1; 4]), [2, 28, 28]),
            // Channel remainders, asymmetric pads, narrow and 1-D images, K at the limit.
            (
                geom(3, 7, 1, [3, 3], [1, 1], [1, 1], [0, 2, 1, 0]),
                [1, 9, 5],
            ),
            (
                geom(2, 13, 1, [1, 4], [1, 1], [1, 1], [0, 1, 0, 2]),
                [3, 1, 30],
            ),
            (geom(2, 3, 1, [4, 4], [1, 1], [1, 1], [2; 4]), [1, 6, 19]),
            (geom(1, 1, 1, [1, 1], [1, 1], [1, 1], [0; 4]), [1, 1, 1]),
        ];
        for (i, (g, [n, h, w])) in cases.into_iter().enumerate() {
            assert!(g.k() <= MAX_K);
            let act = [None, Some(Activation::Relu), Some(Activation::HardSwish)][i % 3];
            let (oh, ow) = g.out_hw(h, w).unwrap();
            let x = rng.vec(n * g.c_in * h * w);
            let wt = rng.vec(g.c_out * g.k());
            let bias = rng.vec(g.c_out);
            let mut want = vec![0.0; n * g.c_out * oh * ow];
            conv2d_reference(&g, &x, [n, h, w], &wt, Some(&bias), act, &mut want).unwrap();
            assert!(fits(&g, act, (h, w), g.pads));
            let plan = Plan::new(&g, &wt, Some(&bias), act, (h, w), g.pads, (oh, ow));
            let mut got = vec![f32::NAN; want.len()];
            for (xi, oi) in x
                .chunks(g.c_in * h * w)
                .zip(got.chunks_mut(g.c_out * oh * ow))
            {
                plan.image(xi, oi);
            }
            assert_close(&got, &want, 1e-4, &format!("{g:?} {n}x{h}x{w}"));
            // And through Conv2d, which picks this kernel.
            let conv = Conv2d::new(g.clone(), &wt, Some(&bias), act).unwrap();
            got.fill(f32::NAN);
            conv.run(&x, [n, h, w], &mut got).unwrap();
            assert_close(&got, &want, 1e-4, &format!("Conv2d {g:?} {n}x{h}x{w}"));
        }
    }
}
