//! Convolution lowered to GEMM: per group, the packed weights (`C_out/g x K`) times the
//! image itself (1x1, stride 1, no padding) or its im2col matrix (`K x oh*ow`). The im2col
//! matrix is never materialised: it is an implicit [`GatherRef`] over a zero-padded,
//! phase-split copy of the image ([`Phased`]), packed panel by panel inside the GEMM.
//!
//! Small outputs are computed for several images per product: GEMM tiles are 16 columns
//! wide, so a 7x7 output (49 columns) wastes a quarter of every tile row, while four images
//! side by side (196 columns) waste 6% and sixteen none. Such products write to scratch and
//! the result is scattered back to NCHW. Single-pixel outputs (squeeze-excite blocks,
//! classifier heads) go further: one product `out^T = W x^T` covers the whole batch.

use super::layout::Phased;
use super::{small_k, Conv2d, PoolStage, PAR_MIN_MACS};
use crate::error::Result;
use crate::kernels::gemm::{
    self, Bias, Epilogue, GatherRef, Lhs, MatMut, MatRef, Rhs, GATHER_SLACK,
};
use crate::kernels::pool::pool2d;
use crate::kernels::scratch;

/// Inputs of direct (1x1) convolutions above this size are not expected in cache. A direct
/// product reads the image as K rows at once, K interleaved streams from DRAM, more than
/// hardware prefetchers follow; so each image is first read through in order
/// ([`warm_lines`]).
const WARM_MIN_BYTES: usize = 4 << 20;
/// Columns of a GEMM tile.
const TILE_COLS: usize = 16;
/// Most columns of a batched product (the GEMM packs at most 2048 columns of B at a time).
const BATCH_MAX_COLS: usize = 2048;
/// Most bytes of a batched product's output: it is scattered from scratch, so it should
/// stay in L2.
const BATCH_MAX_BYTES: usize = 512 << 10;

/// Shapes and offsets shared by every product of one call.
struct Lowering<'a> {
    conv: &'a Conv2d,
    h: usize,
    w: usize,
    pads: [usize; 4],
    ohw: usize,
    /// 1x1, stride 1, no padding: the image is the right operand.
    direct: bool,
    layout: Phased,
    /// Floats per channel plane in the source the products read.
    plane: usize,
    /// Images per product (1: straight into the output, no scatter).
    batch: usize,
    /// Rows of the implicit right operand (`K` offsets).
    row_off: &'a [usize],
    /// Columns for `batch` images side by side.
    col_off: &'a [usize],
    /// Few taps per output: the direct kernel instead of products.
    small: Option<small_k::Plan<'a>>,
    gemm_threads: usize,
}

#[allow(clippy::too_many_arguments)]
pub(super) fn run(
    conv: &Conv2d,
    x: &[f32],
    [n, h, w]: [usize; 3],
    pads: [usize; 4],
    (oh, ow): (usize, usize),
    pool: Option<&PoolStage>,
    out: &mut [f32],
    threads: usize,
) -> Result<()> {
    let g = &conv.geom;
    let ohw = oh * ow;
    let k = g.k();
    let cout_g = g.c_out / g.groups;
    let direct = g.kernel == [1, 1] && g.stride == [1, 1] && pads == [0; 4];
    if direct && ohw == 1 && n > 1 && pool.is_none() {
        return pixels(conv, x, n, out, threads);
    }
    let batch = images_per_product(ohw, n, cout_g);
    let layout = Phased::new(h, w, pads, g.stride[1]);
    let plane = if direct { h * w } else { layout.plane };
    let img_in = g.c_in * plane;

    // Work units of `batch` images; in parallel when each is too small to split well, or
    // when there are enough to share out evenly (no synchronisation per image).
    let units = n.div_ceil(batch);
    let unit_macs = g.c_out * ohw * k * batch;
    let per_unit =
        threads > 1 && units > 1 && (unit_macs < PAR_MIN_MACS * 8 || units >= 2 * threads);

    scratch::with_usize(k + batch * ohw, |offs| {
        let (row_off, col_off) = offs.split_at_mut(k);
        if direct {
            for (c, r) in row_off.iter_mut().enumerate() {
                *r = c * plane;
            }
            for (j, c) in col_off.iter_mut().enumerate() {
                *c = (j / ohw) * img_in + j % ohw;
            }
        } else {
            im2col_offsets(conv, (oh, ow), &layout, row_off, &mut col_off[..ohw]);
            for j in ohw..batch * ohw {
                col_off[j] = (j / ohw) * img_in + col_off[j % ohw];
            }
        }
        let low = Lowering {
            conv,
            h,
            w,
            pads,
            ohw,
            direct,
            layout,
            plane,
            batch,
            row_off,
            col_off,
            // Not when the products would be what spreads the work over threads.
            small: (small_k::fits(g, conv.act, (h, w), pads)
                && (per_unit || threads <= 1)
                && conv.raw_weights.len() == g.c_out * k)
                .then(|| {
                    let bias = conv.bias.as_deref();
                    let weights = &conv.raw_weights;
                    small_k::Plan::new(g, weights, bias, conv.act, (h, w), pads, (oh, ow))
                }),
            gemm_threads: if per_unit { 1 } else { threads },
        };
        let warm = direct && batch == 1 && x.len().saturating_mul(4) > WARM_MIN_BYTES;
        let in_len = batch * g.c_in * h * w;
        let pooled_hw = match pool {
            Some(p) => Some(p.geom.out_hw(oh, ow)?),
            None => None,
        };
        let out_len = batch * g.c_out * pooled_hw.map_or(ohw, |(ph, pw)| ph * pw);
        let unit = |(xs, o): (&[f32], &mut [f32])| {
            if warm {
                warm_lines(xs);
            }
            let (Some(p), Some((ph, pw))) = (pool, pooled_hw) else {
                return low.unit(xs, o);
            };
            // The unit's convolution output stays in a cache-sized scratch buffer instead
            // of making a round trip through memory at full resolution.
            let planes = o.len() / (ph * pw);
            scratch::with_f32(planes * ohw, |t| {
                low.unit(xs, t)?;
                pool2d(&p.geom, p.kind, t, [planes, oh, ow], o)
            })
        };
        crate::kernels::par::for_each_unit(x, in_len, out, out_len, per_unit, unit)
    })
}

impl Lowering<'_> {
    /// Convolves the images in `x` (at most `batch`) into `out`.
    fn unit(&self, x: &[f32], out: &mut [f32]) -> Result<()> {
        let g = &self.conv.geom;
        let images = out.len() / (g.c_out * self.ohw);
        if let Some(small) = &self.small {
            let img_out = g.c_out * self.ohw;
            for (xi, oi) in x
                .chunks_exact(g.c_in * self.h * self.w)
                .zip(out.chunks_exact_mut(img_out))
            {
                small.image(xi, oi);
            }
            return Ok(());
        }
        if self.direct && self.batch == 1 {
            return self.products(x, out, images);
        }
        // The gathered source: padded copies, or for direct products plain copies (the
        // batched columns read past each image, into the next one or the slack).
        let len = images * g.c_in * self.plane;
        scratch::with_f32(len + GATHER_SLACK, |src| {
            if self.direct {
                src[..len].copy_from_slice(x);
            } else {
                for (s, d) in x
                    .chunks_exact(self.h * self.w)
                    .zip(src.chunks_exact_mut(self.plane))
                {
                    self.layout.fill(d, s, (self.h, self.w), self.pads);
                }
            }
            src[len..].fill(0.0);
            self.products(src, out, images)
        })
    }

    /// One product per group over `images` images of `src` (laid out as the offsets expect),
    /// into `out` (NCHW).
    fn products(&self, src: &[f32], out: &mut [f32], images: usize) -> Result<()> {
        let g = &self.conv.geom;
        let (cin_g, cout_g, ohw) = (g.c_in / g.groups, g.c_out / g.groups, self.ohw);
        let cols = images * ohw;
        let product = |gi: usize, rhs: Rhs, c: MatMut| {
            let bias = match &self.conv.bias {
                Some(b) => Bias::PerRow(&b[gi * cout_g..(gi + 1) * cout_g]),
                None => Bias::None,
            };
            let epi = Epilogue {
                bias,
                act: self.conv.act,
            };
            let a = Lhs::Packed(&self.conv.packed[gi]);
            gemm::gemm_threads(self.gemm_threads, 1.0, a, rhs, 0.0, c, epi)
        };
        for gi in 0..g.groups {
            let first = gi * cin_g * self.plane;
            if self.direct && self.batch == 1 {
                let b = MatRef::row_major(&src[first..first + cin_g * self.plane], cin_g, ohw)?;
                let dst = &mut out[gi * cout_g * ohw..(gi + 1) * cout_g * ohw];
                product(gi, Rhs::Mat(b), MatMut::row_major(dst, cout_g, ohw)?)?;
                continue;
            }
            // Keep the slack after the group's planes that gathered packing needs.
            let b = GatherRef::new(&src[first..], self.row_off, &self.col_off[..cols])?;
            if images == 1 && self.batch == 1 {
                let dst = &mut out[gi * cout_g * ohw..(gi + 1) * cout_g * ohw];
                product(gi, Rhs::Gather(b), MatMut::row_major(dst, cout_g, ohw)?)?;
                continue;
            }
            scratch::with_f32(cout_g * cols, |t| -> Result<()> {
                product(gi, Rhs::Gather(b), MatMut::row_major(t, cout_g, cols)?)?;
                // Row o of the product holds channel o of every image, side by side.
                for (o, row) in t.chunks_exact(cols).enumerate() {
                    for (b, part) in row.chunks_exact(ohw).enumerate() {
                        let at = (b * g.c_out + gi * cout_g + o) * ohw;
                        out[at..at + ohw].copy_from_slice(part);
                    }
                }
                Ok(())
            })?;
        }
        Ok(())
    }
}

/// How many images one product should cover: more than one only when that removes a
/// noticeable share of partial tiles and the product stays cache-sized.
fn images_per_product(ohw: usize, n: usize, cout_g: usize) -> usize {
    let waste = |b: usize| (b * ohw).next_multiple_of(TILE_COLS) as f64 / (b * ohw) as f64;
    let fits =
        |b: usize| b <= n && b * ohw <= BATCH_MAX_COLS && b * ohw * cout_g * 4 <= BATCH_MAX_BYTES;
    let mut best = 1;
    for b in [2, 4, 8, 16] {
        if fits(b) && waste(b) < waste(best) - 0.005 {
            best = b;
        }
    }
    // Batching costs a copy in and a scatter out, and a wider product packs more of B: it
    // measured no faster for 14x14 outputs (6% waste), only for wasteful ones such as 7x7.
    if waste(1) - waste(best) < 0.1 {
        1
    } else {
        best
    }
}

/// A 1x1 convolution of `n` single-pixel images: per group one product over the whole
/// batch, `out^T = W x^T`, instead of `n` matrix-vector products that each stream all the
/// weights.
fn pixels(conv: &Conv2d, x: &[f32], n: usize, out: &mut [f32], threads: usize) -> Result<()> {
    let g = &conv.geom;
    let cin_g = g.c_in / g.groups;
    let cout_g = g.c_out / g.groups;
    scratch::with_f32(cout_g * n, |t| -> Result<()> {
        for gi in 0..g.groups {
            // Column b of x^T is image b's channels of this group.
            let xt = MatRef::new(&x[gi * cin_g..], cin_g, n, 1, g.c_in)?;
            let bias = match &conv.bias {
                Some(b) => Bias::PerRow(&b[gi * cout_g..(gi + 1) * cout_g]),
                None => Bias::None,
            };
            gemm::gemm_threads(
                threads,
                1.0,
                Lhs::Packed(&conv.packed[gi]),
                Rhs::Mat(xt),
                0.0,
                MatMut::row_major(t, cout_g, n)?,
                Epilogue {
                    bias,
                    act: conv.act,
                },
            )?;
            for (b, dst) in out.chunks_exact_mut(g.c_out).enumerate() {
                for (o, d) in dst[gi * cout_g..(gi + 1) * cout_g].iter_mut().enumerate() {
                    *d = t[o * n + b];
                }
            }
        }
        Ok(())
    })
}

/// Reads `data` in order, one load per 64-byte line with four independent sums so the
/// loads overlap: the hardware prefetcher then streams it into cache at full speed.
fn warm_lines(data: &[f32]) {
    let mut acc = [0.0f32; 4];
    for (i, line) in data.chunks(16).enumerate() {
        acc[i % 4] += line[0];
    }
    std::hint::black_box(acc);
}

/// Offsets of the implicit im2col matrix over a padded, phase-split image (`layout` per
/// channel): row `(c, ky, kx)` is where tap `(ky, kx)` of channel `c` reads for output
/// `(0, 0)`; column `(oy, ox)` adds `oy * sh` rows and `ox` (phases make columns contiguous).
fn im2col_offsets(
    conv: &Conv2d,
    (oh, ow): (usize, usize),
    l: &Phased,
    row_off: &mut [usize],
    col_off: &mut [usize],
) {
    let g = &conv.geom;
    let [kh, kw] = g.kernel;
    for (p, r) in row_off.iter_mut().enumerate() {
        let (c, ky, kx) = (p / (kh * kw), p / kw % kh, p % kw);
        *r = c * l.plane + l.at(ky * g.dilation[0], kx * g.dilation[1]);
    }
    for (j, col) in col_off.iter_mut().enumerate().take(oh * ow) {
        *col = (j / ow) * g.stride[0] * l.row + j % ow;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_only_when_tiles_are_wasted() {
        // Whole tiles already: one image per product.
        assert_eq!(images_per_product(784, 64, 32), 1);
        assert_eq!(images_per_product(3136, 64, 64), 1);
        // 7x7 wastes 23% of its tiles: four images waste 6% (more would leave L2); 14x14
        // wastes too little to pay for the copies.
        assert_eq!(images_per_product(49, 64, 512), 4);
        assert_eq!(images_per_product(49, 64, 32), 16);
        assert_eq!(images_per_product(196, 64, 64), 1);
        // Not enough images, or nothing to gain.
        assert_eq!(images_per_product(196, 1, 64), 1);
        assert_eq!(images_per_product(49, 3, 64), 2);
    }
}
