//! Integer convolutions that read and write NCHW directly, with no layout passes:
//!
//! * [`WxConv`]: weights as the left operand of [`qgemm_wx`] (AVX-512 VNNI), the input planes
//!   as the right one: as they are for a 1x1 stride-1 unpadded convolution, else through a u8
//!   im2col padded with the input zero point (padded taps then add nothing).
//! * [`DepthwiseF32`]: depthwise convolution through the f32 depthwise kernel on `x - zx` and
//!   `w - zw`. Every product is an integer of magnitude at most 255 * 255 and every partial
//!   sum at most `taps * 255 * 255`, below 2^24 for up to 258 taps, so f32 represents each of
//!   them exactly and the sums are the integers in any order (FMA included). The accumulators
//!   are then requantized exactly as the integer path does.

use rayon::prelude::*;

use super::engine::OutputStage;
use crate::error::{Error, Result};
use crate::kernels::conv::{Conv2d, Conv2dGeom};
use crate::kernels::pool_codes::max_2x2_planes;
use crate::kernels::qgemm::{
    self, Backend, Columns, ElemKind, PackedW, WxElem, WxStage, WX_MR, WX_NR,
};
use crate::kernels::{par, scratch};
use crate::quant::linear::{code_bounds, round_to_code};

/// Taps up to which f32 sums of u8 x i8 products (zero points subtracted) are exact.
pub const MAX_EXACT_F32_TAPS: usize = (1 << 24) / (255 * 255);
const _: () = assert!(MAX_EXACT_F32_TAPS * 255 * 255 <= 1 << 24);

/// Per output channel: the scale, and the stage's zero point and code bounds.
pub(super) struct RowRequant {
    pub scales: Vec<f32>,
    pub zero_point: i32,
    pub lo: f32,
    pub hi: f32,
}

pub(super) fn row_requant(stage: &OutputStage, c_out: usize) -> Option<RowRequant> {
    match stage {
        OutputStage::Requant {
            scales,
            zero_point,
            qmin,
            qmax,
            ..
        } => {
            let (lo, hi) = code_bounds(*qmin, *qmax, *zero_point);
            Some(RowRequant {
                scales: (0..c_out)
                    .map(|c| scales[if scales.len() == 1 { 0 } else { c }])
                    .collect(),
                zero_point: *zero_point,
                lo,
                hi,
            })
        }
        OutputStage::Int32 => None,
    }
}

pub(super) fn stage_bias(stage: &OutputStage) -> Option<&[i32]> {
    match stage {
        OutputStage::Requant { bias, .. } => bias.as_deref(),
        OutputStage::Int32 => None,
    }
}

/// A grouped (not depthwise) convolution on the VNNI GEMM.
pub struct WxConv {
    /// One `[C_out / groups, K]` weight matrix per group.
    packed: Vec<PackedW>,
    requant: Option<RowRequant>,
    backend: Backend,
}

impl WxConv {
    /// `w` is `[C_out, C_in / groups, kh, kw]` with zero points `w_zp` (one or `C_out`),
    /// already validated by the caller.
    pub fn new(
        geom: &Conv2dGeom,
        w: &[i8],
        w_zp: &[i32],
        stage: &OutputStage,
        backend: Backend,
    ) -> Result<WxConv> {
        let cout_g = geom.c_out / geom.groups;
        let k = geom.c_in / geom.groups * geom.kernel[0] * geom.kernel[1];
        let packed = (0..geom.groups)
            .map(|g| {
                let zps = if w_zp.len() == 1 {
                    w_zp
                } else {
                    &w_zp[g * cout_g..(g + 1) * cout_g]
                };
                PackedW::new(&w[g * cout_g * k..(g + 1) * cout_g * k], cout_g, k, zps)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(WxConv {
            packed,
            requant: row_requant(stage, geom.c_out),
            backend,
        })
    }

    /// Group `grp`'s GEMM (`offsets` from [`qgemm::row_offsets`] per group), split into
    /// `tasks` blocks of rows.
    fn job<'a>(&'a self, grp: usize, offsets: &'a [Vec<i32>], tasks: usize) -> Gemm<'a> {
        let cout_g = self.packed[grp].m();
        Gemm {
            backend: self.backend,
            packed: &self.packed[grp],
            offsets: &offsets[grp],
            stage: self.stage_for(grp, cout_g),
            tasks,
        }
    }

    fn stage_for(&self, grp: usize, cout_g: usize) -> WxStage<'_> {
        match &self.requant {
            Some(r) => WxStage::Requant {
                scales: &r.scales[grp * cout_g..(grp + 1) * cout_g],
                zero_point: r.zero_point,
                lo: r.lo,
                hi: r.hi,
            },
            None => WxStage::Int32,
        }
    }

    /// With `pooled`, `out` receives the 2x2 / stride-2 max pool (floor mode) of the output
    /// codes instead: each image is pooled from a per-thread buffer while still in cache.
    #[allow(clippy::too_many_arguments)]
    pub fn run<T: WxElem>(
        &self,
        g: &Conv2dGeom,
        stage: &OutputStage,
        x: &[u8],
        x_zp: u8,
        [n, h, w]: [usize; 3],
        [oh, ow]: [usize; 2],
        pooled: bool,
        out: &mut [T],
    ) -> Result<()> {
        let (cin_g, cout_g, ohw) = (g.c_in / g.groups, g.c_out / g.groups, oh * ow);
        let bias = stage_bias(stage);
        let offsets: Vec<Vec<i32>> = self
            .packed
            .iter()
            .enumerate()
            .map(|(grp, p)| {
                qgemm::row_offsets(p, x_zp, bias.map(|b| &b[grp * cout_g..(grp + 1) * cout_g]))
            })
            .collect();
        let threads = par::threads();
        let per_image = g.c_out * ohw;
        if n > 1 && ohw < SMALL_IMAGE {
            if !pooled {
                return self.run_batched(g, x, x_zp, [n, h, w], [oh, ow], &offsets, out, threads);
            }
            let mut full = vec![T::default(); n * per_image];
            self.run_batched(
                g,
                x,
                x_zp,
                [n, h, w],
                [oh, ow],
                &offsets,
                &mut full,
                threads,
            )?;
            return pool_codes(&full, [n * g.c_out, oh, ow], out);
        }
        // Whole images per thread when there are enough; else each image's rows are split.
        let split_rows = if n >= threads { 1 } else { threads };
        let image = |img: usize, out_img: &mut [T]| -> Result<()> {
            for (grp, packed) in self.packed.iter().enumerate() {
                let input = &x[(img * g.c_in + grp * cin_g) * h * w..];
                let planes = &input[..cin_g * h * w];
                let dst = &mut out_img[grp * cout_g * ohw..(grp + 1) * cout_g * ohw];
                let job = self.job(grp, &offsets, split_rows);
                match Lowering::of(g, [oh, ow]) {
                    Lowering::Direct => job.run(planes, h * w, dst)?,
                    Lowering::Shifted => {
                        job.run_shifted(g, input, planes.len(), [h, w], [oh, ow], x_zp, dst)?
                    }
                    Lowering::Im2col => {
                        let k = packed.k();
                        scratch::with_u8(k * ohw, |cols| {
                            im2col_u8(g, planes, [h, w], [oh, ow], x_zp, cols, ohw);
                            job.run(cols, ohw, dst)
                        })?
                    }
                }
            }
            Ok(())
        };
        let per_out = if pooled {
            g.c_out * (oh / 2) * (ow / 2)
        } else {
            per_image
        };
        if per_out == 0 {
            return Ok(());
        }
        let buffer = || vec![T::default(); if pooled { per_image } else { 0 }];
        let each = |buf: &mut Vec<T>, (img, o): (usize, &mut [T])| {
            if pooled {
                image(img, buf)?;
                pool_codes(buf, [g.c_out, oh, ow], o)
            } else {
                image(img, o)
            }
        };
        if threads > 1 && n > 1 {
            out.par_chunks_mut(per_out)
                .enumerate()
                .try_for_each_init(buffer, each)
        } else {
            let mut buf = buffer();
            out.chunks_mut(per_out)
                .enumerate()
                .try_for_each(|c| each(&mut buf, c))
        }
    }

    /// Small outputs (a fully connected layer as a 1x1 convolution has one pixel): the pixels
    /// of all images side by side as the columns of one GEMM per group, instead of a GEMM per
    /// image with a mostly empty column panel.
    #[allow(clippy::too_many_arguments)]
    fn run_batched<T: WxElem>(
        &self,
        g: &Conv2dGeom,
        x: &[u8],
        x_zp: u8,
        [n, h, w]: [usize; 3],
        [oh, ow]: [usize; 2],
        offsets: &[Vec<i32>],
        out: &mut [T],
        threads: usize,
    ) -> Result<()> {
        let (cin_g, cout_g, ohw) = (g.c_in / g.groups, g.c_out / g.groups, oh * ow);
        let cols_n = n * ohw;
        let fully_connected = ohw == 1 && matches!(Lowering::of(g, [oh, ow]), Lowering::Direct);
        // Small products stay on one thread: splitting costs more than it saves.
        let threads = if g.c_out * cin_g * cols_n >= PAR_MIN_MACS {
            threads
        } else {
            1
        };
        if fully_connected && threads > 1 && n >= threads * WX_NR {
            return self.run_vectors(g, x, offsets, n, out, threads);
        }
        for (grp, packed) in self.packed.iter().enumerate() {
            let k = packed.k();
            let mut y = vec![T::default(); cout_g * cols_n];
            let job = self.job(grp, offsets, threads);
            if fully_connected {
                scratch::with_usize(k, |starts| {
                    vector_rows(g, grp, 0, starts);
                    job.run_rows(x, starts, cols_n, vector_columns(g), &mut y)
                })?;
            } else {
                scratch::with_u8(k * cols_n, |cols| -> Result<()> {
                    let planes =
                        |img: usize| &x[(img * g.c_in + grp * cin_g) * h * w..][..cin_g * h * w];
                    match Lowering::of(g, [oh, ow]) {
                        Lowering::Direct => {
                            for img in 0..n {
                                for (kk, src) in planes(img).chunks_exact(ohw).enumerate() {
                                    cols[kk * cols_n + img * ohw..][..ohw].copy_from_slice(src);
                                }
                            }
                        }
                        _ => {
                            for img in 0..n {
                                im2col_u8(
                                    g,
                                    planes(img),
                                    [h, w],
                                    [oh, ow],
                                    x_zp,
                                    &mut cols[img * ohw..],
                                    cols_n,
                                );
                            }
                        }
                    }
                    job.run(cols, cols_n, &mut y)
                })?;
            }
            if ohw == 1 {
                scatter_channels(&y, cout_g, cols_n, &mut out[grp * cout_g..], g.c_out);
                continue;
            }
            for (img, o) in out.chunks_exact_mut(g.c_out * ohw).enumerate() {
                let o = &mut o[grp * cout_g * ohw..(grp + 1) * cout_g * ohw];
                for (c, dst) in o.chunks_exact_mut(ohw).enumerate() {
                    dst.copy_from_slice(&y[c * cols_n + img * ohw..][..ohw]);
                }
            }
        }
        Ok(())
    }

    /// A fully connected layer (1x1 pixels) with enough images: the images split across
    /// threads, each running the GEMM on its own columns, so no thread packs another's.
    #[allow(clippy::too_many_arguments)]
    fn run_vectors<T: WxElem>(
        &self,
        g: &Conv2dGeom,
        x: &[u8],
        offsets: &[Vec<i32>],
        n: usize,
        out: &mut [T],
        threads: usize,
    ) -> Result<()> {
        let cout_g = g.c_out / g.groups;
        let per_task = n.div_ceil(threads).div_ceil(WX_NR) * WX_NR;
        out.par_chunks_mut(per_task * g.c_out)
            .enumerate()
            .try_for_each(|(t, o)| -> Result<()> {
                let count = o.len() / g.c_out;
                for (grp, packed) in self.packed.iter().enumerate() {
                    let job = self.job(grp, offsets, 1);
                    let mut y = vec![T::default(); cout_g * count];
                    scratch::with_usize(packed.k(), |starts| {
                        vector_rows(g, grp, t * per_task, starts);
                        job.run_rows(x, starts, count, vector_columns(g), &mut y)
                    })?;
                    scatter_channels(&y, cout_g, count, &mut o[grp * cout_g..], g.c_out);
                }
                Ok(())
            })
    }
}

/// `out[img * stride + c] = y[c * count + img]` for `c < channels`, `img < count`: a fully
/// connected GEMM's channel-major result back to one row of channels per image. In square
/// blocks, so both sides stay in cache (a copy per value was a tenth of a transformer's run).
fn scatter_channels<T: Copy>(y: &[T], channels: usize, count: usize, out: &mut [T], stride: usize) {
    const BLOCK: usize = 32;
    for c0 in (0..channels).step_by(BLOCK) {
        let c1 = (c0 + BLOCK).min(channels);
        for i0 in (0..count).step_by(BLOCK) {
            let i1 = (i0 + BLOCK).min(count);
            for i in i0..i1 {
                let row = &mut out[i * stride + c0..i * stride + c1];
                for (c, d) in (c0..c1).zip(row) {
                    *d = y[c * count + i];
                }
            }
        }
    }
}

/// Multiply-accumulates below which a batched GEMM stays on one thread.
const PAR_MIN_MACS: usize = 1 << 20;

/// Row `kk` of a fully connected layer's GEMM operand, for the batch from image `first`:
/// channel `kk` of group `grp`, read in place from `[n, C]` (a column per image).
fn vector_rows(g: &Conv2dGeom, grp: usize, first: usize, starts: &mut [usize]) {
    let cin_g = g.c_in / g.groups;
    for (kk, s) in starts.iter_mut().enumerate() {
        *s = first * g.c_in + grp * cin_g + kk;
    }
}

/// The columns of a fully connected layer's operand: one image's channels per column.
fn vector_columns(g: &Conv2dGeom) -> Columns {
    Columns {
        keep: 1,
        stride: g.c_in,
    }
}

/// 2x2 / stride-2 max pooling (floor mode) of 8-bit output codes `src` (`[planes, h, w]`).
pub(super) fn pool_codes<T: WxElem>(src: &[T], dims: [usize; 3], dst: &mut [T]) -> Result<()> {
    let pooled = match (T::code_bytes(src), T::code_bytes_mut(dst)) {
        (Some((s, order)), Some(d)) => max_2x2_planes(s, dims, order, d),
        _ => false,
    };
    if pooled {
        Ok(())
    } else {
        Err(Error::Shape(format!(
            "pooled integer conv: {} codes of {dims:?} into {} (8-bit outputs only)",
            src.len(),
            dst.len()
        )))
    }
}

/// Below this many output pixels, [`WxConv::run_batched`] puts all images in one GEMM.
const SMALL_IMAGE: usize = 64;

/// How a convolution's input becomes the GEMM's right operand.
enum Lowering {
    /// 1x1, stride 1, no padding: the input planes are the operand.
    Direct,
    /// Shifted windows of zero-point-padded phase planes, no im2col copy
    /// ([`Gemm::run_shifted`]).
    Shifted,
    Im2col,
}

impl Lowering {
    fn of(g: &Conv2dGeom, [oh, ow]: [usize; 2]) -> Lowering {
        let [hq, wq] = shifted_extent(g, [oh, ow]);
        if g.kernel == [1, 1] && g.stride == [1, 1] && g.pads == [0; 4] {
            Lowering::Direct
        } else if 2 * wq <= 3 * ow
            && hq * wq * g.stride[0] * g.stride[1] <= oh * ow * g.kernel[0] * g.kernel[1]
        {
            // At most 1.5x the work of the GEMM on an im2col, and phase planes no larger.
            Lowering::Shifted
        } else {
            Lowering::Im2col
        }
    }
}

/// One group's GEMM with its output stage.
struct Gemm<'a> {
    backend: Backend,
    packed: &'a PackedW,
    offsets: &'a [i32],
    stage: WxStage<'a>,
    /// Parallel blocks of rows (output channels) to split into.
    tasks: usize,
}

impl Gemm<'_> {
    /// The GEMM on `x` as a row-major `[K, n]` matrix.
    fn run<T: WxElem>(&self, x: &[u8], n: usize, dst: &mut [T]) -> Result<()> {
        scratch::with_usize(self.packed.k(), |starts| {
            for (i, s) in starts.iter_mut().enumerate() {
                *s = i * n;
            }
            self.run_rows(x, starts, n, Columns::dense(), dst)
        })
    }

    fn run_rows<T: WxElem>(
        &self,
        x: &[u8],
        starts: &[usize],
        n: usize,
        columns: Columns,
        dst: &mut [T],
    ) -> Result<()> {
        let m = self.packed.m();
        let rows_per = m.div_ceil(self.tasks.max(1)).div_ceil(WX_MR) * WX_MR;
        let gemm = |row0: usize, block: &mut [T]| {
            qgemm::qgemm_wx_rows(
                self.backend,
                self.packed,
                x,
                starts,
                n,
                columns,
                self.offsets,
                self.stage,
                row0,
                block,
            )
        };
        if self.tasks <= 1 || rows_per >= m {
            return gemm(0, dst);
        }
        dst.par_chunks_mut(rows_per * n)
            .enumerate()
            .try_for_each(|(t, block)| gemm(t * rows_per, block))
    }

    /// A convolution computed as a stride-1 one over phase planes, with no im2col copy. The
    /// zero-point-padded input is split into `sh x sw` phases (`[a][b]` holds padded pixels
    /// `(sh r + a, sw c + b)`), each `hq x wq`; tap `(ky, kx)` reads phase
    /// `(ky dh % sh, kx dw % sw)` from offset `(ky dh / sh, kx dw / sw)` with unit stride, so
    /// its row of the GEMM operand is that phase read from there, `oh` rows of `wq`. The
    /// `wq - ow` extra columns per output row are computed and dropped.
    #[allow(clippy::too_many_arguments)]
    fn run_shifted<T: WxElem>(
        &self,
        g: &Conv2dGeom,
        input: &[u8],
        planes_len: usize,
        [h, w]: [usize; 2],
        [oh, ow]: [usize; 2],
        zx: u8,
        dst: &mut [T],
    ) -> Result<()> {
        let [kh, kw] = g.kernel;
        let [dh, dw] = g.dilation;
        let [sh, sw] = g.stride;
        let [hq, wq] = shifted_extent(g, [oh, ow]);
        let phase_len = hq * wq;
        let planes = &input[..planes_len];
        let c = planes_len / (h * w).max(1);
        // The last tap's row reads `(kw - 1) dw / sw` bytes past its phase, and the packing
        // gathers columns with 32-byte loads.
        let slack = (kw - 1) * dw / sw + 32;
        let mut gemm = |phases: &[u8]| {
            scratch::with_usize(c * kh * kw, |starts| {
                let mut taps = starts.iter_mut();
                for ci in 0..c {
                    for ky in 0..kh {
                        for kx in 0..kw {
                            let phase = (ky * dh % sh) * sw + kx * dw % sw;
                            if let Some(s) = taps.next() {
                                *s = (ci * sh * sw + phase) * phase_len
                                    + (ky * dh / sh) * wq
                                    + kx * dw / sw;
                            }
                        }
                    }
                }
                // Each output row reads the first `ow` of `wq` phase columns.
                let columns = Columns {
                    keep: ow,
                    stride: wq,
                };
                self.run_rows(phases, starts, oh * ow, columns, dst)
            })
        };
        // Unpadded with stride 1, the one phase is the input plane itself: read in place when
        // the bytes after the planes (the next image's) cover the slack.
        if [sh, sw] == [1, 1] && g.pads == [0; 4] && [hq, wq] == [h, w] {
            if let Some(in_place) = input.get(..planes_len + slack) {
                return gemm(in_place);
            }
        }
        scratch::with_u8(c * sh * sw * phase_len + slack, |phases| {
            let mut used = vec![false; sh * sw];
            for ky in 0..kh {
                for kx in 0..kw {
                    used[(ky * dh % sh) * sw + kx * dw % sw] = true;
                }
            }
            for (src, ph) in planes
                .chunks_exact(h * w)
                .zip(phases.chunks_exact_mut(sh * sw * phase_len))
            {
                for (i, p) in ph.chunks_exact_mut(phase_len).enumerate() {
                    if used[i] {
                        let at = [i / sw, i % sw];
                        phase_plane(
                            src,
                            [h, w],
                            [g.pads[0], g.pads[1]],
                            [sh, sw],
                            at,
                            zx,
                            [hq, wq],
                            p,
                        );
                    }
                }
            }
            phases[c * sh * sw * phase_len..].fill(zx);
            gemm(phases)
        })
    }
}

/// Rows and columns of each phase plane in [`Gemm::run_shifted`].
fn shifted_extent(g: &Conv2dGeom, [oh, ow]: [usize; 2]) -> [usize; 2] {
    [
        oh + (g.kernel[0] - 1) * g.dilation[0] / g.stride[0],
        ow + (g.kernel[1] - 1) * g.dilation[1] / g.stride[1],
    ]
}

/// Phase `[a, b]` of `src` (`[h, w]`) padded by `top`, `left` with `zx`: `dst[r][c]` is padded
/// pixel `(sh r + a, sw c + b)`, `hq x wq` of them.
#[allow(clippy::too_many_arguments)]
pub(super) fn phase_plane(
    src: &[u8],
    [h, w]: [usize; 2],
    [top, left]: [usize; 2],
    [sh, sw]: [usize; 2],
    [a, b]: [usize; 2],
    zx: u8,
    [hq, wq]: [usize; 2],
    dst: &mut [u8],
) {
    // Columns whose source lies inside the image: `0 <= sw c + b - left < w`.
    let lo = left.saturating_sub(b).div_ceil(sw).min(wq);
    let hi = (w + left).saturating_sub(b).div_ceil(sw).clamp(lo, wq);
    if sw == 1 {
        // The padding at once, then one copy per row: short rows (a 14-pixel plane) would
        // otherwise spend more on three small calls each than on the bytes.
        dst[..hq * wq].fill(zx);
        for (r, row) in dst.chunks_exact_mut(wq).take(hq).enumerate() {
            let y = (sh * r + a).wrapping_sub(top);
            if y < h && hi > lo {
                let first = lo + b - left;
                row[lo..hi].copy_from_slice(&src[y * w + first..y * w + first + hi - lo]);
            }
        }
        return;
    }
    for (r, row) in dst.chunks_exact_mut(wq).take(hq).enumerate() {
        let y = (sh * r + a).wrapping_sub(top);
        if y >= h {
            row.fill(zx);
            continue;
        }
        let line = &src[y * w..(y + 1) * w];
        row[..lo].fill(zx);
        row[hi..].fill(zx);
        if hi == lo {
            // The image lies wholly in the padding of this phase's columns.
            continue;
        }
        let first = sw * lo + b - left;
        if sw == 1 {
            row[lo..hi].copy_from_slice(&line[first..first + hi - lo]);
        } else {
            for (d, &v) in row[lo..hi].iter_mut().zip(line[first..].iter().step_by(sw)) {
                *d = v;
            }
        }
    }
}

/// `[C * kh * kw, oh * ow]` u8 im2col of `planes` (`[C, h, w]`), rows in weight order
/// `(c, ky, kx)` starting `row_stride` apart, taps outside the image set to the zero point `zx`.
fn im2col_u8(
    g: &Conv2dGeom,
    planes: &[u8],
    [h, w]: [usize; 2],
    [oh, ow]: [usize; 2],
    zx: u8,
    cols: &mut [u8],
    row_stride: usize,
) {
    let [kh, kw] = g.kernel;
    let [sh, sw] = g.stride;
    let [dh, dw] = g.dilation;
    let (pt, pl) = (g.pads[0] as isize, g.pads[1] as isize);
    let mut r = 0;
    for plane in planes.chunks_exact(h * w) {
        for ky in 0..kh {
            for kx in 0..kw {
                let Some(row) = cols.get_mut(r * row_stride..r * row_stride + oh * ow) else {
                    return;
                };
                r += 1;
                let off = (kx * dw) as isize - pl;
                // Output columns whose input column lies inside the image.
                let lo = if off >= 0 {
                    0
                } else {
                    ((-off) as usize).div_ceil(sw).min(ow)
                };
                let hi = if (w as isize) <= off {
                    0
                } else {
                    ((w as isize - off) as usize).div_ceil(sw).min(ow)
                }
                .max(lo);
                for (oy, dst) in row.chunks_exact_mut(ow).enumerate() {
                    let iy = (oy * sh + ky * dh) as isize - pt;
                    if iy < 0 || iy >= h as isize {
                        dst.fill(zx);
                        continue;
                    }
                    let src = &plane[iy as usize * w..(iy as usize + 1) * w];
                    dst[..lo].fill(zx);
                    dst[hi..].fill(zx);
                    // A tap that sees only padding has lo == hi, and lo + off may be < 0.
                    if sw == 1 && hi > lo {
                        let s = (lo as isize + off) as usize;
                        dst[lo..hi].copy_from_slice(&src[s..s + hi - lo]);
                    } else {
                        for (ox, d) in dst.iter_mut().enumerate().take(hi).skip(lo) {
                            *d = src[(ox as isize * sw as isize + off) as usize];
                        }
                    }
                }
            }
        }
    }
}

/// Calls `kernel(ch, padded, dst)` for every plane `i` of `x` (`n * c` planes of `[h, w]`,
/// channel `ch = i % c`) with its slice `dst` of `plane_len` outputs, planes in parallel when
/// threads allow. `padded` is the plane in a `[hp, wp]` scratch buffer framed by the zero point
/// (`top` rows and `left` columns before it; the stride-1 case of [`phase_plane`]).
#[allow(clippy::too_many_arguments)]
pub(super) fn for_each_padded_plane<T: Send>(
    x: &[u8],
    c: usize,
    [h, w]: [usize; 2],
    [top, left]: [usize; 2],
    x_zp: u8,
    [hp, wp]: [usize; 2],
    out: &mut [T],
    plane_len: usize,
    kernel: impl Fn(usize, &[u8], &mut [T]) + Sync,
) {
    let plane = |(i, dst): (usize, &mut [T])| {
        let src = &x[i * h * w..(i + 1) * h * w];
        scratch::with_u8(hp * wp, |padded| {
            phase_plane(
                src,
                [h, w],
                [top, left],
                [1, 1],
                [0, 0],
                x_zp,
                [hp, wp],
                padded,
            );
            kernel(i % c, padded, dst);
        });
    };
    if par::threads() > 1 {
        out.par_chunks_mut(plane_len).enumerate().for_each(plane);
    } else {
        out.chunks_mut(plane_len).enumerate().for_each(plane);
    }
}

/// Checks a depthwise engine's buffers (`x` of `[n, c, h, w]`, `out` of `[n, c, oh, ow]`) and
/// that its output type matches its stage; false when there is nothing to compute.
pub(super) fn check_depthwise_io<T: WxElem>(
    c: usize,
    x: &[u8],
    [n, h, w]: [usize; 3],
    [oh, ow]: [usize; 2],
    out: &[T],
    requantizes: bool,
) -> Result<bool> {
    if x.len() != n * c * h * w || out.len() != n * c * oh * ow {
        return Err(Error::Shape(format!(
            "depthwise conv: input of {} or output of {} values for {n} x {c} channels",
            x.len(),
            out.len()
        )));
    }
    if requantizes == (T::KIND == ElemKind::I32) {
        return Err(Error::Shape(
            "depthwise conv: output type does not match the output stage".into(),
        ));
    }
    Ok(oh > 0 && ow > 0)
}

/// Depthwise convolution through the f32 kernel (exact; see the module docs).
pub struct DepthwiseF32 {
    conv: Conv2d,
    requant: Option<RowRequant>,
    bias: Vec<i32>,
}

impl DepthwiseF32 {
    /// `None` when the kernel has too many taps for exact f32 sums.
    pub fn new(
        geom: &Conv2dGeom,
        w: &[i8],
        w_zp: &[i32],
        stage: &OutputStage,
    ) -> Result<Option<DepthwiseF32>> {
        let taps = geom.kernel[0] * geom.kernel[1];
        if taps > MAX_EXACT_F32_TAPS {
            return Ok(None);
        }
        let wf: Vec<f32> = w
            .chunks_exact(taps)
            .enumerate()
            .flat_map(|(c, ws)| {
                let z = w_zp[if w_zp.len() == 1 { 0 } else { c }];
                ws.iter().map(move |&v| (i32::from(v) - z) as f32)
            })
            .collect();
        let conv = Conv2d::new(geom.clone(), &wf, None, None)?;
        Ok(Some(DepthwiseF32 {
            conv,
            requant: row_requant(stage, geom.c_out),
            bias: stage_bias(stage).map_or_else(|| vec![0; geom.c_out], <[i32]>::to_vec),
        }))
    }

    pub fn run<T: WxElem>(
        &self,
        x: &[u8],
        x_zp: u8,
        [n, h, w]: [usize; 3],
        pads: [usize; 4],
        [oh, ow]: [usize; 2],
        out: &mut [T],
    ) -> Result<()> {
        let c = self.bias.len();
        if !check_depthwise_io(c, x, [n, h, w], [oh, ow], out, self.requant.is_some())? {
            return Ok(());
        }
        let zx = f32::from(x_zp);
        scratch::with_f32(x.len(), |xf| {
            for (d, &v) in xf.iter_mut().zip(x) {
                *d = f32::from(v) - zx;
            }
            scratch::with_f32(out.len(), |acc| {
                self.conv.run_with_pads(xf, [n, h, w], pads, acc)?;
                let plane = oh * ow;
                let finish = |(i, (dst, src)): (usize, (&mut [T], &[f32]))| {
                    let ch = i % c;
                    match &self.requant {
                        Some(r) => requant_exact_f32(
                            src,
                            self.bias[ch],
                            r.scales[ch],
                            r.zero_point,
                            (r.lo, r.hi),
                            dst,
                        ),
                        None => {
                            for (d, &a) in dst.iter_mut().zip(src) {
                                *d = T::from_i32((a as i32).wrapping_add(self.bias[ch]));
                            }
                        }
                    }
                };
                if par::threads() > 1 {
                    out.par_chunks_mut(plane)
                        .zip(acc.par_chunks(plane))
                        .enumerate()
                        .for_each(finish);
                } else {
                    out.chunks_mut(plane)
                        .zip(acc.chunks(plane))
                        .enumerate()
                        .for_each(finish);
                }
                Ok(())
            })
        })
    }
}

/// `round_to_code(f32(acc + bias) * scale) + zp` for accumulators held exactly as f32.
fn requant_exact_f32<T: WxElem>(
    acc: &[f32],
    bias: i32,
    scale: f32,
    zp: i32,
    (lo, hi): (f32, f32),
    out: &mut [T],
) {
    #[cfg(target_arch = "x86_64")]
    {
        if qgemm::vnni_available() {
            // SAFETY: the AVX-512 features the function needs were detected just above.
            unsafe { requant_exact_f32_avx512(acc, bias, scale, zp, (lo, hi), out) };
            return;
        }
    }
    #[cfg(target_arch = "x86_64")]
    {
        if crate::kernels::simd::has_avx2_fma() {
            // SAFETY: AVX2 was detected just above.
            unsafe { requant_exact_f32_avx2(acc, bias, scale, zp, (lo, hi), out) };
            return;
        }
    }
    for (d, &a) in out.iter_mut().zip(acc) {
        let v = (a as i32).wrapping_add(bias) as f32 * scale;
        *d = T::from_i32(round_to_code(v, lo, hi).wrapping_add(zp));
    }
}

/// [`requant_exact_f32`] eight values at a time with AVX2 (same steps as the AVX-512 form).
///
/// # Safety
/// AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn requant_exact_f32_avx2<T: WxElem>(
    acc: &[f32],
    bias: i32,
    scale: f32,
    zp: i32,
    (lo, hi): (f32, f32),
    out: &mut [T],
) {
    use std::arch::x86_64::*;
    let (b, s) = (_mm256_set1_epi32(bias), _mm256_set1_ps(scale));
    let (l, u, z) = (
        _mm256_set1_ps(lo),
        _mm256_set1_ps(hi),
        _mm256_set1_epi32(zp),
    );
    let mut codes = [0i32; 8];
    for (src, dst) in acc.chunks(8).zip(out.chunks_mut(8)) {
        let mut a = [0f32; 8];
        a[..src.len()].copy_from_slice(src);
        // SAFETY: loads and stores the 8-element local arrays.
        unsafe {
            let v = _mm256_add_epi32(_mm256_cvttps_epi32(_mm256_loadu_ps(a.as_ptr())), b);
            let f = _mm256_mul_ps(_mm256_cvtepi32_ps(v), s);
            let f = _mm256_min_ps(_mm256_max_ps(f, l), u);
            let q = _mm256_add_epi32(_mm256_cvtps_epi32(f), z);
            _mm256_storeu_si256(codes.as_mut_ptr() as *mut __m256i, q);
        }
        for (d, &c) in dst.iter_mut().zip(&codes) {
            *d = T::from_i32(c);
        }
    }
}

/// # Safety
/// The CPU must have AVX-512 F, VL and BW.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vl,avx512bw")]
unsafe fn requant_exact_f32_avx512<T: WxElem>(
    acc: &[f32],
    bias: i32,
    scale: f32,
    zp: i32,
    (lo, hi): (f32, f32),
    out: &mut [T],
) {
    use std::arch::x86_64::*;
    let len = acc.len().min(out.len());
    let (b, s) = (_mm256_set1_epi32(bias), _mm256_set1_ps(scale));
    let (l, u, z) = (
        _mm256_set1_ps(lo),
        _mm256_set1_ps(hi),
        _mm256_set1_epi32(zp),
    );
    let mut i = 0;
    while i < len {
        let lanes = (len - i).min(8);
        let mask = ((1u32 << lanes) - 1) as __mmask8;
        // SAFETY: the masked load and store touch only the `lanes` elements from `i`, all
        // inside `acc` and `out`.
        unsafe {
            let a = _mm256_maskz_loadu_ps(mask, acc.as_ptr().add(i));
            let v = _mm256_add_epi32(_mm256_cvttps_epi32(a), b);
            let f = _mm256_mul_ps(_mm256_cvtepi32_ps(v), s);
            let f = _mm256_min_ps(_mm256_max_ps(f, l), u);
            let q = _mm256_add_epi32(_mm256_cvtps_epi32(f), z);
            _mm256_mask_cvtepi32_storeu_epi8(out.as_mut_ptr().add(i) as *mut i8, mask, q);
        }
        i += lanes;
    }
}

#[cfg(test)]
mod tests {
    use super::super::engine::IntConv;
    use super::*;
    use crate::kernels::pool_codes::{max_2x2_planes_reference, CodeOrder};
    use crate::kernels::testutil::conv_geom as geom;
    use crate::quant::test_rng::Rng;

    /// The fast engines against the HWC im2col and direct depthwise ones, which the ORT
    /// cross-checks pin down, on one and two threads.
    #[test]
    fn fast_paths_match_the_reference_engines() {
        let mut rng = Rng::new(3);
        let cases = [
            geom(16, 24, 1, [1, 1], [1, 1], [1, 1], [0; 4]),
            geom(3, 16, 1, [3, 3], [2, 2], [1, 1], [1, 1, 1, 1]),
            geom(8, 12, 2, [3, 3], [1, 1], [2, 2], [2, 1, 0, 2]),
            geom(5, 9, 1, [5, 5], [1, 1], [1, 1], [0; 4]),
            geom(7, 7, 1, [1, 1], [2, 1], [1, 1], [0, 0, 1, 1]),
            geom(12, 12, 12, [3, 3], [1, 1], [1, 1], [1, 1, 1, 1]),
            geom(10, 10, 10, [5, 5], [2, 2], [1, 1], [2, 2, 2, 2]),
            geom(4, 4, 4, [3, 3], [1, 2], [2, 1], [0, 1, 2, 0]),
            geom(6, 6, 6, [3, 3], [2, 2], [1, 1], [1, 1, 1, 1]),
            geom(16, 16, 16, [3, 3], [1, 1], [1, 1], [1, 1, 1, 1]),
            geom(5, 5, 5, [3, 3], [2, 2], [1, 1], [0, 0, 1, 1]),
            geom(3, 3, 3, [7, 7], [1, 1], [2, 2], [3, 6, 6, 3]),
            geom(9, 9, 9, [3, 3], [2, 2], [1, 1], [1, 1, 1, 1]),
            geom(4, 4, 4, [1, 5], [1, 2], [1, 1], [0, 2, 0, 2]),
            geom(40, 10, 1, [1, 1], [1, 1], [1, 1], [0; 4]),
            geom(6, 20, 1, [3, 3], [1, 1], [1, 1], [1, 1, 1, 1]),
            geom(4, 8, 1, [3, 3], [2, 2], [2, 2], [1, 2, 0, 1]),
            geom(2, 8, 1, [5, 5], [3, 2], [1, 1], [2, 2, 2, 2]),
            geom(3, 16, 1, [3, 3], [2, 2], [1, 1], [0, 0, 1, 1]),
            geom(3, 3, 3, [3, 11], [1, 1], [1, 1], [1, 5, 1, 5]),
            geom(3, 3, 3, [3, 9], [1, 1], [1, 1], [1, 4, 1, 4]),
            // Index 21 (no weight zero point): a row of 11 taps is three groups of four, more
            // than the VNNI depthwise engine keeps in registers, so it must decline.
            geom(3, 3, 3, [3, 11], [1, 1], [1, 1], [1, 5, 1, 5]),
            geom(8, 8, 8, [5, 5], [1, 1], [1, 1], [2, 2, 2, 2]),
        ];
        // Each geometry on a large input (one GEMM per image) and on a small one, several
        // images at once (one GEMM over all images' pixels).
        let sizes = |case: usize| {
            [
                (1 + case % 3, 9 + case, 11 + 5 * (case % 4)),
                (2 + case % 3, 1 + 7 * (case % 2), 5 - case % 3),
            ]
        };
        for (case, g, (n, h, wd)) in cases
            .iter()
            .enumerate()
            .flat_map(|(c, g)| sizes(c).map(|s| (c, g, s)))
        {
            if g.out_hw(h, wd).is_err() {
                continue;
            }
            let k = g.c_in / g.groups * g.kernel[0] * g.kernel[1];
            let w: Vec<i8> = (0..g.c_out * k)
                .map(|_| rng.range_i32(-128, 127) as i8)
                .collect();
            let w_zp: Vec<i32> = match case % 3 {
                0 => vec![0],
                1 => vec![3],
                _ => (0..g.c_out).map(|_| rng.range_i32(-20, 20)).collect(),
            };
            let x: Vec<u8> = (0..n * g.c_in * h * wd)
                .map(|_| rng.range_i32(0, 255) as u8)
                .collect();
            let x_zp = [0u8, 131, 255][case % 3];
            let (oh, ow) = g.out_hw(h, wd).unwrap();
            let len = n * g.c_out * oh * ow;
            let scales: Vec<f32> = (0..g.c_out).map(|c| 2e-4 + c as f32 * 1e-5).collect();
            let bias = Some((0..g.c_out).map(|_| rng.range_i32(-3000, 3000)).collect());
            let requant = OutputStage::Requant {
                scales,
                zero_point: 77,
                qmin: 0,
                qmax: 255,
                bias,
            };
            for threads in [1, 2] {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .unwrap();
                pool.install(|| {
                    for stage in [requant.clone(), OutputStage::Int32] {
                        let fast =
                            IntConv::with_fast_paths(g.clone(), &w, &w_zp, stage.clone(), true)
                                .unwrap();
                        let slow =
                            IntConv::with_fast_paths(g.clone(), &w, &w_zp, stage.clone(), false)
                                .unwrap();
                        if matches!(stage, OutputStage::Int32) {
                            let (mut a, mut b) = (vec![0i32; len], vec![0i32; len]);
                            fast.run(&x, x_zp, [n, h, wd], g.pads, &mut a).unwrap();
                            slow.run(&x, x_zp, [n, h, wd], g.pads, &mut b).unwrap();
                            assert_eq!(a, b, "case {case} i32, {n}x{h}x{wd}, {threads} threads");
                        } else {
                            let (mut a, mut b) = (vec![0u8; len], vec![0u8; len]);
                            fast.run(&x, x_zp, [n, h, wd], g.pads, &mut a).unwrap();
                            slow.run(&x, x_zp, [n, h, wd], g.pads, &mut b).unwrap();
                            assert_eq!(a, b, "case {case} u8, {n}x{h}x{wd}, {threads} threads");
                            // Fused 2x2 max pool: the pooled output of the unfused run.
                            let planes = [n * g.c_out, oh, ow];
                            let mut want = vec![0u8; n * g.c_out * (oh / 2) * (ow / 2)];
                            max_2x2_planes_reference(&b, planes, CodeOrder::Unsigned, &mut want);
                            let mut got = vec![0u8; want.len()];
                            let ran = fast.run_pooled(&x, x_zp, [n, h, wd], g.pads, &mut got);
                            if ran.unwrap() {
                                assert_eq!(got, want, "case {case} pooled, {n}x{h}x{wd}");
                            }
                        }
                    }
                });
            }
        }
    }
    #[test]
    fn taps_that_see_only_padding_match_the_reference() {
        // A 5x5 window on a 1-pixel-wide map: the outer taps read nothing but padding (the
        // stride-1 column copy started before the row there: a panic the fuzzer found).
        let mut rng = Rng::new(5);
        for (g, [h, wd]) in [
            (geom(3, 4, 1, [5, 5], [1, 1], [1, 1], [2, 2, 2, 2]), [1, 1]),
            (geom(3, 4, 1, [5, 5], [1, 1], [1, 1], [2, 2, 2, 2]), [4, 1]),
            (geom(2, 2, 2, [3, 7], [1, 1], [1, 1], [1, 3, 1, 3]), [2, 1]),
        ] {
            let k = g.c_in / g.groups * g.kernel[0] * g.kernel[1];
            let w: Vec<i8> = (0..g.c_out * k)
                .map(|_| rng.range_i32(-128, 127) as i8)
                .collect();
            let x: Vec<u8> = (0..g.c_in * h * wd)
                .map(|_| rng.range_i32(0, 255) as u8)
                .collect();
            let (oh, ow) = g.out_hw(h, wd).unwrap();
            let run = |fast: bool| {
                let conv = IntConv::with_fast_paths(g.clone(), &w, &[0], OutputStage::Int32, fast);
                let mut out = vec![0i32; g.c_out * oh * ow];
                conv.unwrap()
                    .run(&x, 9, [1, h, wd], g.pads, &mut out)
                    .unwrap();
                out
            };
            assert_eq!(run(true), run(false), "{:?} on {h}x{wd}", g.kernel);
        }
    }

    /// A fully connected layer (1x1 pixels) over a batch large enough to split its images
    /// across threads, against the HWC reference engine.
    #[test]
    fn batched_vectors_split_across_threads_match() {
        let mut rng = Rng::new(9);
        let g = geom(300, 40, 1, [1, 1], [1, 1], [1, 1], [0; 4]);
        // 1.2M multiply-adds: above the threshold for threads.
        let n = 100;
        let w: Vec<i8> = (0..40 * 300)
            .map(|_| rng.range_i32(-128, 127) as i8)
            .collect();
        let x: Vec<u8> = (0..n * 300).map(|_| rng.range_i32(0, 255) as u8).collect();
        let stage = OutputStage::Requant {
            scales: (0..40).map(|c| 3e-4 + c as f32 * 1e-5).collect(),
            zero_point: 9,
            qmin: 0,
            qmax: 255,
            bias: Some((0..40).map(|_| rng.range_i32(-3000, 3000)).collect()),
        };
        let fast = IntConv::with_fast_paths(g.clone(), &w, &[0], stage.clone(), true).unwrap();
        let slow = IntConv::with_fast_paths(g.clone(), &w, &[0], stage, false).unwrap();
        let mut want = vec![0u8; n * 40];
        slow.run(&x, 17, [n, 1, 1], g.pads, &mut want).unwrap();
        for threads in [1, 2, 3] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            let mut got = vec![0u8; n * 40];
            pool.install(|| fast.run(&x, 17, [n, 1, 1], g.pads, &mut got))
                .unwrap();
            assert_eq!(got, want, "{threads} threads");
        }
    }

    /// Every vector form of the exact-f32 requantization against the scalar rule.
    #[test]
    fn exact_f32_requantization_forms_agree() {
        let mut rng = Rng::new(17);
        let acc: Vec<f32> = (0..77)
            .map(|_| rng.range_i32(-16_000_000, 16_000_000) as f32)
            .collect();
        let (lo, hi) = code_bounds(0, 255, 100);
        let want: Vec<u8> = acc
            .iter()
            .map(|&a| (round_to_code((a as i32 + 5) as f32 * 1.3e-5, lo, hi) + 100) as u8)
            .collect();
        let mut got = vec![0u8; acc.len()];
        requant_exact_f32(&acc, 5, 1.3e-5, 100, (lo, hi), &mut got);
        assert_eq!(got, want);
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("avx2") {
            let mut got = vec![0u8; acc.len()];
            // SAFETY: AVX2 was detected just above.
            unsafe { requant_exact_f32_avx2(&acc, 5, 1.3e-5, 100, (lo, hi), &mut got) };
            assert_eq!(got, want);
        }
    }
}
