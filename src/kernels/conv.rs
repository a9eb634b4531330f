//! 2-D convolution, NCHW, f32, with groups, strides, dilations, asymmetric pads and a fused
//! bias + activation epilogue. 1-D convolution is the `H = 1` case.
//!
//! Strategies, picked per call from the geometry:
//! - depthwise (`groups == C_in == C_out`): a direct, vectorised kernel;
//! - few taps per output (first layers on one or a few channels, with AVX-512): a direct
//!   kernel over a "wide" padded image ([`small_k`]);
//! - stride-1, ungrouped 3x3 and 5x5 layers with enough channels and outputs: Winograd
//!   minimal filtering ([`winograd`]), fewer multiplications than any direct route;
//! - everything else is lowered to GEMM ([`lowered`]): the packed weights times the image
//!   (1x1, stride 1, no padding) or its im2col matrix, an implicit gathered view of a
//!   zero-padded copy that is never materialised.
//!
//! Weights are packed once ([`Conv2d::new`]); a call then allocates nothing (scratch comes from
//! per-thread pools).

mod depthwise;
mod layout;
mod lowered;
mod small_k;
mod winograd;

use rayon::prelude::*;

use super::activation::Activation;
use super::gemm::{MatRef, PackedA};
use super::pool::{pool2d, Pool2dGeom, PoolKind};
use super::scratch;
use super::simd::has_avx2_fma;
use crate::error::{Error, Result};
use crate::ir::checked_numel;

/// Work (multiply-adds) below which splitting over threads costs more than it saves.
const PAR_MIN_MACS: usize = 1 << 17;

/// Shape parameters of a 2-D convolution that do not depend on the input size.
#[derive(Clone, Debug, PartialEq)]
pub struct Conv2dGeom {
    pub c_in: usize,
    pub c_out: usize,
    pub groups: usize,
    /// `[kh, kw]`.
    pub kernel: [usize; 2],
    /// `[sh, sw]`, each at least 1.
    pub stride: [usize; 2],
    /// `[dh, dw]`, each at least 1.
    pub dilation: [usize; 2],
    /// `[top, left, bottom, right]`.
    pub pads: [usize; 4],
}

impl Conv2dGeom {
    /// Checks the invariants every kernel relies on.
    pub fn validate(&self) -> Result<()> {
        let bad = |msg: String| Err(Error::Shape(format!("conv: {msg}")));
        if self.groups == 0
            || !self.c_in.is_multiple_of(self.groups)
            || !self.c_out.is_multiple_of(self.groups)
        {
            return bad(format!(
                "{} input and {} output channels do not divide into {} groups",
                self.c_in, self.c_out, self.groups
            ));
        }
        if self.kernel.contains(&0) || self.stride.contains(&0) || self.dilation.contains(&0) {
            return bad(format!(
                "kernel {:?}, strides {:?} and dilations {:?} must be positive",
                self.kernel, self.stride, self.dilation
            ));
        }
        let k = (self.c_in / self.groups)
            .checked_mul(self.kernel[0])
            .and_then(|x| x.checked_mul(self.kernel[1]))
            .and_then(|x| x.checked_mul(self.c_out));
        if k.is_none() {
            return bad(format!(
                "weight of {} x {} x {:?} is too large",
                self.c_out,
                self.c_in / self.groups,
                self.kernel
            ));
        }
        Ok(())
    }

    /// Output `(height, width)` for an `h x w` input with the stored pads.
    pub fn out_hw(&self, h: usize, w: usize) -> Result<(usize, usize)> {
        self.out_hw_with(h, w, self.pads)
    }

    /// Output `(height, width)` for an `h x w` input and explicit pads.
    pub fn out_hw_with(&self, h: usize, w: usize, pads: [usize; 4]) -> Result<(usize, usize)> {
        let dim = |size: usize, lo: usize, hi: usize, k: usize, s: usize, d: usize| {
            let span = d.saturating_mul(k - 1).saturating_add(1);
            let padded = size.saturating_add(lo).saturating_add(hi);
            if padded < span {
                Err(Error::Shape(format!(
                    "conv: padded input extent {padded} is smaller than the kernel extent {span}"
                )))
            } else {
                Ok((padded - span) / s + 1)
            }
        };
        Ok((
            dim(
                h,
                pads[0],
                pads[2],
                self.kernel[0],
                self.stride[0],
                self.dilation[0],
            )?,
            dim(
                w,
                pads[1],
                pads[3],
                self.kernel[1],
                self.stride[1],
                self.dilation[1],
            )?,
        ))
    }

    fn is_depthwise(&self) -> bool {
        self.groups == self.c_in && self.c_out == self.c_in
    }

    /// Rows of one group's weight matrix: `C_in / groups * kh * kw`.
    fn k(&self) -> usize {
        self.c_in / self.groups * self.kernel[0] * self.kernel[1]
    }
}

/// Pooling applied to a convolution's output before it is stored ([`Conv2d::run_pooled`]).
#[derive(Clone, Debug, PartialEq)]
pub struct PoolStage {
    pub geom: Pool2dGeom,
    pub kind: PoolKind,
}

/// A convolution with its weights prepared for repeated calls.
#[derive(Clone, Debug)]
pub struct Conv2d {
    geom: Conv2dGeom,
    /// The raw `[C_out, K]` filters for the direct kernels: depthwise, or few taps per output
    /// ([`small_k`]). Otherwise empty.
    raw_weights: Vec<f32>,
    /// One packed `C_out/g x K` matrix per group (empty for depthwise).
    packed: Vec<PackedA>,
    bias: Option<Vec<f32>>,
    act: Option<Activation>,
    /// Transformed filters when the geometry suits Winograd ([`winograd::eligible`]).
    winograd: Option<winograd::Plan>,
}

impl Conv2d {
    /// Prepares `weight` (`[C_out, C_in / groups, kh, kw]`, row-major) and the optional bias
    /// (`[C_out]`); `act` is applied to the output.
    pub fn new(
        geom: Conv2dGeom,
        weight: &[f32],
        bias: Option<&[f32]>,
        act: Option<Activation>,
    ) -> Result<Conv2d> {
        Self::build(geom, weight, bias, act, true)
    }

    /// As [`Conv2d::new`] for weights used for one call only (training, weights computed at
    /// run time): no Winograd filter transform, which would be paid on every call, and the
    /// forward pass keeps the direct arithmetic the gradient kernels use (finite-difference
    /// checks of a training step see Winograd's larger rounding as gradient error).
    pub fn new_per_call(
        geom: Conv2dGeom,
        weight: &[f32],
        bias: Option<&[f32]>,
        act: Option<Activation>,
    ) -> Result<Conv2d> {
        Self::build(geom, weight, bias, act, false)
    }

    fn build(
        geom: Conv2dGeom,
        weight: &[f32],
        bias: Option<&[f32]>,
        act: Option<Activation>,
        fast_filtering: bool,
    ) -> Result<Conv2d> {
        geom.validate()?;
        let k = geom.k();
        if weight.len() != geom.c_out * k {
            return Err(Error::Shape(format!(
                "conv: weight has {} values, expected {} x {} x {} x {}",
                weight.len(),
                geom.c_out,
                geom.c_in / geom.groups,
                geom.kernel[0],
                geom.kernel[1]
            )));
        }
        if let Some(b) = bias {
            if b.len() != geom.c_out {
                return Err(Error::Shape(format!(
                    "conv: bias has {} values for {} output channels",
                    b.len(),
                    geom.c_out
                )));
            }
        }
        let (raw_weights, packed) = if geom.is_depthwise() {
            (weight.to_vec(), Vec::new())
        } else {
            let raw = if k <= small_k::MAX_K {
                weight.to_vec()
            } else {
                Vec::new()
            };
            let m = geom.c_out / geom.groups;
            let packed = (0..geom.groups)
                .map(|g| {
                    MatRef::row_major(&weight[g * m * k..(g + 1) * m * k], m, k).map(PackedA::new)
                })
                .collect::<Result<Vec<_>>>()?;
            (raw, packed)
        };
        let winograd = if fast_filtering && winograd::eligible(&geom) {
            Some(winograd::Plan::new(&geom, weight, bias, act)?)
        } else {
            None
        };
        Ok(Conv2d {
            geom,
            raw_weights,
            packed,
            bias: bias.map(<[f32]>::to_vec),
            act,
            winograd,
        })
    }

    pub fn geom(&self) -> &Conv2dGeom {
        &self.geom
    }

    /// Convolves `x` (`[n, C_in, h, w]`) into `out` (`[n, C_out, oh, ow]`) with the stored pads.
    pub fn run(&self, x: &[f32], [n, h, w]: [usize; 3], out: &mut [f32]) -> Result<()> {
        self.run_with_pads(x, [n, h, w], self.geom.pads, out)
    }

    /// As [`Conv2d::run`] with pads chosen per call (ONNX `auto_pad` depends on the input size).
    pub fn run_with_pads(
        &self,
        x: &[f32],
        [n, h, w]: [usize; 3],
        pads: [usize; 4],
        out: &mut [f32],
    ) -> Result<()> {
        let g = &self.geom;
        let (oh, ow) = g.out_hw_with(h, w, pads)?;
        if x.len() != n * g.c_in * h * w || out.len() != n * g.c_out * oh * ow {
            return Err(Error::Shape(format!(
                "conv: input has {} values for [{n}, {}, {h}, {w}] and output {} for [{n}, {}, {oh}, {ow}]",
                x.len(),
                g.c_in,
                out.len(),
                g.c_out
            )));
        }
        if out.is_empty() {
            return Ok(());
        }
        self.check_padded(h, w, pads)?;
        let threads = crate::kernels::par::threads();
        if g.is_depthwise() {
            self.run_depthwise(x, [n, h, w], pads, out, threads);
        } else if let Some(plan) = self.winograd_for((oh, ow)) {
            winograd::run(self, plan, x, [n, h, w], pads, (oh, ow), None, out, threads)?;
        } else {
            lowered::run(self, x, [n, h, w], pads, (oh, ow), None, out, threads)?;
        }
        Ok(())
    }

    /// The Winograd plan when it is prepared and pays off for `(oh, ow)` outputs.
    fn winograd_for(&self, ohw: (usize, usize)) -> Option<&winograd::Plan> {
        self.winograd
            .as_ref()
            .filter(|p| !winograd::disabled() && p.worth(ohw))
    }

    /// Checks that the padded scratch image is allocatable (pads come from the model file).
    fn check_padded(&self, h: usize, w: usize, pads: [usize; 4]) -> Result<()> {
        let hp = h.checked_add(pads[0]).and_then(|x| x.checked_add(pads[2]));
        let wp = w.checked_add(pads[1]).and_then(|x| x.checked_add(pads[3]));
        match (hp, wp) {
            (Some(hp), Some(wp)) => {
                let row = wp.saturating_add(2 * self.geom.stride[1] + 32);
                checked_numel(&[self.geom.c_in.max(1), hp, row], 4)?;
                Ok(())
            }
            _ => Err(Error::TooLarge(format!("conv: pads {pads:?} overflow"))),
        }
    }

    /// As [`Conv2d::run_with_pads`], then `pool` over the result: `out` is
    /// `[n, C_out, ph, pw]`. Each image's convolution output stays in a cache-sized scratch
    /// buffer instead of making a round trip through memory (and a second pass) at full
    /// resolution.
    pub fn run_pooled(
        &self,
        x: &[f32],
        [n, h, w]: [usize; 3],
        pads: [usize; 4],
        pool: &PoolStage,
        out: &mut [f32],
    ) -> Result<()> {
        let g = &self.geom;
        let (oh, ow) = g.out_hw_with(h, w, pads)?;
        pool.geom.validate()?;
        let (ph, pw) = pool.geom.out_hw(oh, ow)?;
        let img_in = g.c_in * h * w;
        let img_out = g.c_out * ph * pw;
        if x.len() != n * img_in || out.len() != n * img_out {
            return Err(Error::Shape(format!(
                "conv+pool: input has {} values for [{n}, {}, {h}, {w}] and output {} for [{n}, {}, {ph}, {pw}]",
                x.len(),
                g.c_in,
                out.len(),
                g.c_out
            )));
        }
        if out.is_empty() {
            return Ok(());
        }
        if !g.is_depthwise() {
            // One lowering (offsets, work split) for the whole batch.
            self.check_padded(h, w, pads)?;
            let threads = crate::kernels::par::threads();
            let hw = (oh, ow);
            if let Some(plan) = self.winograd_for(hw) {
                return winograd::run(self, plan, x, [n, h, w], pads, hw, Some(pool), out, threads);
            }
            return lowered::run(self, x, [n, h, w], pads, hw, Some(pool), out, threads);
        }
        let conv_len = checked_numel(&[g.c_out, oh, ow], 4)?;
        let one = |(xi, oi): (&[f32], &mut [f32])| {
            scratch::with_f32(conv_len, |t| {
                self.run_with_pads(xi, [1, h, w], pads, t)?;
                pool2d(&pool.geom, pool.kind, t, [g.c_out, oh, ow], oi)
            })
        };
        if crate::kernels::par::threads() > 1 && n > 1 {
            // One image per task, each on one thread.
            x.par_chunks(img_in)
                .zip(out.par_chunks_mut(img_out))
                .try_for_each(|p| crate::kernels::par::sequential(|| one(p)))
        } else {
            x.chunks(img_in)
                .zip(out.chunks_mut(img_out))
                .try_for_each(one)
        }
    }

    fn run_depthwise(
        &self,
        x: &[f32],
        [_, h, w]: [usize; 3],
        pads: [usize; 4],
        out: &mut [f32],
        threads: usize,
    ) {
        let g = &self.geom;
        let Ok((oh, ow)) = g.out_hw_with(h, w, pads) else {
            return;
        };
        let setup = depthwise::Setup::new(g, (h, w), pads, (oh, ow));
        let taps_n = g.kernel[0] * g.kernel[1];
        let avx = has_avx2_fma();
        scratch::with_usize(taps_n, |taps| {
            depthwise::tap_offsets(g, &setup.layout, taps);
            let taps = &*taps;
            let filters = depthwise::Filters {
                weights: &self.raw_weights,
                bias: self.bias.as_deref(),
                act: self.act,
                channels: g.c_in,
            };
            let (plane_in, plane_out) = (h * w, oh * ow);
            let planes = out.len() / plane_out;
            let per_plane = plane_out * taps_n;
            if threads > 1 && per_plane * planes >= PAR_MIN_MACS {
                // Groups of planes per task: enough work to amortise the task and the scratch.
                let group = planes
                    .div_ceil(threads * 4)
                    .max(PAR_MIN_MACS / 8 / per_plane.max(1))
                    .max(1);
                out.par_chunks_mut(group * plane_out)
                    .enumerate()
                    .for_each(|(gi, dst)| {
                        let first = gi * group;
                        let n = dst.len() / plane_out;
                        let src = &x[first * plane_in..(first + n) * plane_in];
                        depthwise::planes(&setup, src, first, &filters, taps, dst, avx);
                    });
            } else {
                depthwise::planes(&setup, x, 0, &filters, taps, out, avx);
            }
        });
    }
}

/// The plain definition, kept as the reference the fast paths are tested against.
/// Shapes as in [`Conv2d::run`]; `weight` as in [`Conv2d::new`].
pub fn conv2d_reference(
    g: &Conv2dGeom,
    x: &[f32],
    [n, h, w]: [usize; 3],
    weight: &[f32],
    bias: Option<&[f32]>,
    act: Option<Activation>,
    out: &mut [f32],
) -> Result<()> {
    g.validate()?;
    let (oh, ow) = g.out_hw(h, w)?;
    let cin_g = g.c_in / g.groups;
    let cout_g = g.c_out / g.groups;
    let [kh, kw] = g.kernel;
    if x.len() != n * g.c_in * h * w
        || out.len() != n * g.c_out * oh * ow
        || weight.len() != g.c_out * cin_g * kh * kw
    {
        return Err(Error::Shape(
            "conv2d_reference: buffer sizes disagree".into(),
        ));
    }
    for b in 0..n {
        for co in 0..g.c_out {
            let grp = co / cout_g;
            for oy in 0..oh {
                for ox in 0..ow {
                    let mut acc = 0.0f32;
                    for ci in 0..cin_g {
                        let c = grp * cin_g + ci;
                        for ky in 0..kh {
                            let iy = (oy * g.stride[0] + ky * g.dilation[0]) as isize
                                - g.pads[0] as isize;
                            if iy < 0 || iy >= h as isize {
                                continue;
                            }
                            for kx in 0..kw {
                                let ix = (ox * g.stride[1] + kx * g.dilation[1]) as isize
                                    - g.pads[1] as isize;
                                if ix < 0 || ix >= w as isize {
                                    continue;
                                }
                                let xv = x[((b * g.c_in + c) * h + iy as usize) * w + ix as usize];
                                let wv = weight[((co * cin_g + ci) * kh + ky) * kw + kx];
                                acc += xv * wv;
                            }
                        }
                    }
                    let v = acc + bias.map_or(0.0, |bb| bb[co]);
                    out[((b * g.c_out + co) * oh + oy) * ow + ox] =
                        act.map_or(v, |a| a.apply_scalar(v));
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::simd::{avx2_only, portable_only};
    use crate::kernels::testutil::conv_geom as geom;
    use crate::kernels::testutil::{assert_close, Rng};

    fn check(
        g: &Conv2dGeom,
        [n, h, w]: [usize; 3],
        act: Option<Activation>,
        threads: usize,
        rng: &mut Rng,
    ) {
        let (oh, ow) = g.out_hw(h, w).unwrap();
        let x = rng.vec(n * g.c_in * h * w);
        let wt = rng.vec(g.c_out * g.k());
        let bias = rng.vec(g.c_out);
        let mut want = vec![0.0; n * g.c_out * oh * ow];
        conv2d_reference(g, &x, [n, h, w], &wt, Some(&bias), act, &mut want).unwrap();
        let conv = Conv2d::new(g.clone(), &wt, Some(&bias), act).unwrap();
        let mut got = vec![f32::NAN; want.len()];
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| conv.run(&x, [n, h, w], &mut got)).unwrap();
        assert_close(
            &got,
            &want,
            1e-4,
            &format!("{g:?} input {n}x{h}x{w} threads {threads}"),
        );
        got.fill(f32::NAN);
        // Without AVX-512, layers with few taps are GEMM products too.
        pool.install(|| avx2_only(|| conv.run(&x, [n, h, w], &mut got)))
            .unwrap();
        assert_close(&got, &want, 1e-4, &format!("avx2 {g:?} {n}x{h}x{w}"));
        got.fill(f32::NAN);
        pool.install(|| portable_only(|| conv.run(&x, [n, h, w], &mut got)))
            .unwrap();
        assert_close(&got, &want, 1e-4, &format!("portable {g:?} {n}x{h}x{w}"));
    }

    #[test]
    fn gemm_paths_match_reference() {
        let mut rng = Rng::new(1);
        let cases = [
            // 1x1 direct, and 1x1 with stride (gathered).
            (geom(8, 12, 1, [1, 1], [1, 1], [1, 1], [0; 4]), [2, 5, 7]),
            (geom(8, 12, 1, [1, 1], [2, 2], [1, 1], [0; 4]), [1, 9, 6]),
            // 3x3 pad 1 (MNIST-like), asymmetric pads, strides and dilations.
            (
                geom(3, 16, 1, [3, 3], [1, 1], [1, 1], [1, 1, 1, 1]),
                [1, 11, 13],
            ),
            (
                geom(4, 6, 1, [3, 2], [2, 1], [1, 2], [0, 1, 2, 3]),
                [2, 9, 8],
            ),
            (
                geom(6, 9, 3, [3, 3], [1, 2], [2, 1], [2, 1, 0, 1]),
                [1, 10, 9],
            ),
            // Grouped with channel multiplier (not depthwise).
            (
                geom(4, 8, 4, [3, 3], [2, 2], [1, 1], [1, 1, 1, 1]),
                [3, 7, 7],
            ),
            // 1-D as H = 1.
            (
                geom(5, 7, 1, [1, 4], [1, 2], [1, 1], [0, 2, 0, 1]),
                [2, 1, 17],
            ),
        ];
        for (i, (g, shape)) in cases.iter().enumerate() {
            let act = [None, Some(Activation::Relu), Some(Activation::HardSwish)][i % 3];
            for threads in [1, 2] {
                check(g, *shape, act, threads, &mut rng);
            }
        }
    }

    #[test]
    fn batched_and_pixel_products_match_reference() {
        let mut rng = Rng::new(4);
        let cases = [
            // 7x7 outputs: several images per product, a partial last unit, groups.
            (
                geom(6, 8, 2, [3, 3], [1, 1], [1, 1], [1, 1, 1, 1]),
                [5, 7, 7],
            ),
            (geom(8, 12, 1, [1, 1], [1, 1], [1, 1], [0; 4]), [7, 7, 7]),
            // Strided 3x3 down to 3x3 outputs.
            (
                geom(4, 5, 1, [3, 3], [2, 2], [1, 1], [1, 1, 1, 1]),
                [9, 6, 6],
            ),
            // Single-pixel outputs: one product over the whole batch.
            (geom(8, 12, 1, [1, 1], [1, 1], [1, 1], [0; 4]), [5, 1, 1]),
            (geom(8, 12, 4, [1, 1], [1, 1], [1, 1], [0; 4]), [3, 1, 1]),
        ];
        for (g, shape) in &cases {
            for threads in [1, 2] {
                check(g, *shape, Some(Activation::HardSwish), threads, &mut rng);
            }
        }
    }

    #[test]
    fn depthwise_matches_reference() {
        let mut rng = Rng::new(2);
        let cases = [
            (
                geom(5, 5, 5, [3, 3], [1, 1], [1, 1], [1, 1, 1, 1]),
                [2, 12, 45],
            ),
            (
                geom(3, 3, 3, [3, 3], [2, 2], [1, 1], [1, 1, 1, 1]),
                [1, 17, 70],
            ),
            (
                geom(4, 4, 4, [5, 5], [1, 1], [1, 1], [2, 2, 2, 2]),
                [1, 9, 7],
            ),
            (
                geom(4, 4, 4, [5, 5], [2, 2], [1, 1], [2, 2, 2, 2]),
                [1, 14, 14],
            ),
            (
                geom(2, 2, 2, [3, 3], [2, 3], [2, 1], [0, 1, 3, 2]),
                [2, 13, 37],
            ),
            (geom(1, 1, 1, [3, 3], [1, 1], [1, 1], [0; 4]), [1, 5, 5]),
            (
                geom(3, 3, 3, [5, 5], [1, 1], [1, 1], [2, 2, 2, 2]),
                [1, 11, 40],
            ),
            (
                geom(2, 2, 2, [5, 3], [1, 1], [1, 1], [2, 1, 2, 1]),
                [1, 13, 21],
            ),
        ];
        for (i, (g, shape)) in cases.iter().enumerate() {
            let act = [
                Some(Activation::HardSwish),
                None,
                Some(Activation::Sigmoid),
                Some(Activation::Clip { min: 0.0, max: 6.0 }),
            ][i % 4];
            for threads in [1, 3] {
                check(g, *shape, act, threads, &mut rng);
            }
        }
    }

    #[test]
    fn random_geometries_match_reference() {
        let mut rng = Rng::new(9);
        for _ in 0..30 {
            let groups = rng.range(1, 3);
            let depthwise = rng.range(0, 2) == 0;
            let (c_in, c_out) = if depthwise {
                let c = rng.range(1, 4);
                (c, c)
            } else {
                (groups * rng.range(1, 3), groups * rng.range(1, 4))
            };
            let groups = if depthwise { c_in } else { groups };
            let k = [rng.range(1, 4), rng.range(1, 4)];
            let s = [rng.range(1, 3), rng.range(1, 3)];
            let d = [rng.range(1, 2), rng.range(1, 2)];
            let p = [
                rng.range(0, 2),
                rng.range(0, 2),
                rng.range(0, 2),
                rng.range(0, 2),
            ];
            let g = geom(c_in, c_out, groups, k, s, d, p);
            let ext = |i: usize| (k[i] - 1) * d[i] + 1;
            let shape = [
                rng.range(1, 2),
                rng.range(ext(0), 12),
                rng.range(ext(1), 12),
            ];
            check(
                &g,
                shape,
                Some(Activation::LeakyRelu { alpha: 0.1 }),
                rng.range(1, 2),
                &mut rng,
            );
        }
    }

    #[test]
    fn pooled_matches_reference_then_pool() {
        use crate::kernels::pool::pool2d_reference;
        let mut rng = Rng::new(12);
        let max2 = Pool2dGeom {
            kernel: [2, 2],
            stride: [2, 2],
            dilation: [1, 1],
            pads: [0; 4],
            ceil_mode: false,
        };
        let avg3 = Pool2dGeom {
            kernel: [3, 3],
            stride: [2, 2],
            dilation: [1, 1],
            pads: [1, 1, 1, 1],
            ceil_mode: true,
        };
        let cases = [
            // LeNet-5 and the MNIST CNN, a few images.
            (
                geom(1, 20, 1, [5, 5], [1, 1], [1, 1], [0; 4]),
                [3, 28, 28],
                &max2,
                PoolKind::Max,
            ),
            (
                geom(20, 50, 1, [5, 5], [1, 1], [1, 1], [0; 4]),
                [2, 12, 12],
                &max2,
                PoolKind::Max,
            ),
            (
                geom(1, 32, 1, [3, 3], [1, 1], [1, 1], [1; 4]),
                [3, 28, 28],
                &max2,
                PoolKind::Max,
            ),
            (
                geom(32, 64, 1, [3, 3], [1, 1], [1, 1], [1; 4]),
                [2, 14, 14],
                &max2,
                PoolKind::Max,
            ),
            // Batched products (7x7 outputs), groups, a strided conv, average pooling.
            (
                geom(6, 8, 2, [3, 3], [1, 1], [1, 1], [1; 4]),
                [5, 7, 7],
                &avg3,
                PoolKind::Avg {
                    count_include_pad: false,
                },
            ),
            (
                geom(4, 5, 1, [3, 3], [2, 2], [1, 1], [1; 4]),
                [3, 13, 11],
                &max2,
                PoolKind::Max,
            ),
            (
                geom(3, 3, 3, [3, 3], [1, 1], [1, 1], [1; 4]),
                [2, 9, 9],
                &max2,
                PoolKind::Max,
            ),
        ];
        for (g, [n, h, w], pg, kind) in cases {
            let (oh, ow) = g.out_hw(h, w).unwrap();
            let (ph, pw) = pg.out_hw(oh, ow).unwrap();
            let x = rng.vec(n * g.c_in * h * w);
            let wt = rng.vec(g.c_out * g.k());
            let bias = rng.vec(g.c_out);
            let act = Some(Activation::Relu);
            let mut full = vec![0.0; n * g.c_out * oh * ow];
            conv2d_reference(&g, &x, [n, h, w], &wt, Some(&bias), act, &mut full).unwrap();
            let mut want = vec![0.0; n * g.c_out * ph * pw];
            pool2d_reference(pg, kind, &full, [n * g.c_out, oh, ow], &mut want).unwrap();
            let conv = Conv2d::new(g.clone(), &wt, Some(&bias), act).unwrap();
            let stage = PoolStage {
                geom: pg.clone(),
                kind,
            };
            for threads in [1, 2] {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .unwrap();
                let mut got = vec![f32::NAN; want.len()];
                pool.install(|| conv.run_pooled(&x, [n, h, w], g.pads, &stage, &mut got))
                    .unwrap();
                assert_close(
                    &got,
                    &want,
                    1e-4,
                    &format!("{g:?} pooled, threads {threads}"),
                );
                got.fill(f32::NAN);
                pool.install(|| {
                    avx2_only(|| conv.run_pooled(&x, [n, h, w], g.pads, &stage, &mut got))
                })
                .unwrap();
                assert_close(&got, &want, 1e-4, &format!("{g:?} pooled avx2"));
            }
        }
    }

    #[test]
    fn bad_geometry_is_an_error() {
        let g = geom(3, 4, 2, [3, 3], [1, 1], [1, 1], [0; 4]);
        assert!(Conv2d::new(g, &[0.0; 36], None, None).is_err());
        let g = geom(2, 2, 1, [5, 5], [1, 1], [1, 1], [0; 4]);
        assert!(g.out_hw(3, 3).is_err());
        let conv = Conv2d::new(g, &[0.0; 100], None, None).unwrap();
        assert!(conv.run(&[0.0; 8], [1, 2, 2], &mut [0.0; 4]).is_err());
    }
}
