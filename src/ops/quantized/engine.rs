//! Integer convolution and matrix product engines shared by the QLinear and Integer ops:
//! u8 activations (i8 ones are shifted by 128, exactly), i8 weights (u8 ones likewise) packed
//! once, i32 accumulation through [`crate::kernels::qgemm`], then either requantization with
//! ONNX Runtime's float rule or raw i32 output.
//!
//! Convolution is im2col on u8 (padding with the input zero point, so padded taps add
//! nothing) followed by one GEMM per group and block of output pixels; depthwise convolution
//! (`groups == C_in == C_out`) has a direct kernel instead, as its GEMM would have one column.

use rayon::prelude::*;

use super::conv_nchw::{DepthwiseF32, WxConv};
use super::depthwise_avx2::DepthwiseAvx2;
use super::depthwise_vnni::DepthwiseVnni;
use crate::error::{Error, Result};
use crate::kernels::conv::Conv2dGeom;
use crate::kernels::qgemm::{self, PackedB, Requant, WxElem};
use crate::quant::linear::{code_bounds, round_to_code};
use crate::quant::QStore;

/// Output pixels (rows of the GEMM) per im2col + GEMM task.
const ROWS_PER_TASK: usize = 384;

/// What an engine does with its i32 accumulators.
#[derive(Clone, Debug)]
pub enum OutputStage {
    /// `requant(acc + bias)`, per output channel parameters (ONNX Runtime's float path).
    Requant {
        /// One (per tensor) or `C_out` scales `x_scale * w_scale / y_scale`.
        scales: Vec<f32>,
        zero_point: i32,
        qmin: i32,
        qmax: i32,
        bias: Option<Vec<i32>>,
    },
    /// Raw accumulators (`ConvInteger`, `MatMulInteger`).
    Int32,
}

impl OutputStage {
    fn requant_for(&self, c0: usize, n: usize) -> Option<(Requant, Option<Vec<i32>>)> {
        match self {
            OutputStage::Requant {
                scales,
                zero_point,
                qmin,
                qmax,
                bias,
            } => {
                let s = if scales.len() == 1 {
                    scales.clone()
                } else {
                    scales[c0..c0 + n].to_vec()
                };
                Some((
                    Requant::Float {
                        scales: s,
                        zero_point: *zero_point,
                        qmin: *qmin,
                        qmax: *qmax,
                    },
                    bias.as_ref().map(|b| b[c0..c0 + n].to_vec()),
                ))
            }
            OutputStage::Int32 => None,
        }
    }
}

/// Converts i8 codes to u8 by adding 128 (with the zero point shifted the same way), which
/// leaves every `q - zp` unchanged.
pub fn shift_i8_to_u8(x: &[i8]) -> Vec<u8> {
    x.iter().map(|&v| (v as u8) ^ 0x80).collect()
}

/// Converts u8 weights to i8 by subtracting 128, exact for the same reason.
pub fn shift_u8_to_i8(w: &[u8]) -> Vec<i8> {
    w.iter().map(|&v| (v ^ 0x80) as i8).collect()
}

/// The NCHW-direct engines, when this CPU and convolution have one.
enum Fast {
    Gemm(WxConv),
    Depthwise(DepthwiseVnni),
    /// With the exact-f32 engine for narrow outputs (see [`DepthwiseAvx2::MIN_WIDTH`]).
    DepthwiseAvx2(DepthwiseAvx2, Option<Box<DepthwiseF32>>),
    DepthwiseF32(DepthwiseF32),
}

/// A convolution with weights prepared once.
pub struct IntConv {
    pub geom: Conv2dGeom,
    fast: Option<Fast>,
    /// One packed `[K, C_out / groups]` matrix per group (not used for depthwise).
    packed: Vec<PackedB>,
    /// Depthwise: `w - zw` per channel and tap, `[C, kh * kw]`.
    depthwise: Option<Vec<i32>>,
    pub stage: OutputStage,
}

impl IntConv {
    /// `w` is `[C_out, C_in / groups, kh, kw]` row-major i8 with zero points `w_zp` (one or
    /// `C_out`).
    pub fn new(geom: Conv2dGeom, w: &[i8], w_zp: &[i32], stage: OutputStage) -> Result<IntConv> {
        IntConv::with_fast_paths(geom, w, w_zp, stage, true)
    }

    /// As [`IntConv::new`]; `fast` false keeps to the HWC im2col engine and the direct
    /// depthwise kernel (the reference the fast paths are tested against, and the route on
    /// CPUs without AVX-512 VNNI).
    pub fn with_fast_paths(
        geom: Conv2dGeom,
        w: &[i8],
        w_zp: &[i32],
        stage: OutputStage,
        fast: bool,
    ) -> Result<IntConv> {
        geom.validate()?;
        let cout_g = geom.c_out / geom.groups;
        let k = geom.c_in / geom.groups * geom.kernel[0] * geom.kernel[1];
        if w.len() != geom.c_out * k {
            return Err(Error::Shape(format!(
                "conv weight has {} values, expected {} x {k}",
                w.len(),
                geom.c_out
            )));
        }
        if w_zp.len() != 1 && w_zp.len() != geom.c_out {
            return Err(Error::Shape(format!(
                "{} weight zero points for {} output channels",
                w_zp.len(),
                geom.c_out
            )));
        }
        let zp_of = |c: usize| w_zp[if w_zp.len() == 1 { 0 } else { c }];
        let is_dw = geom.groups == geom.c_in && geom.c_out == geom.c_in;
        let fast = match (fast, is_dw) {
            (false, _) => None,
            (true, true) => match DepthwiseVnni::new(&geom, w, w_zp, &stage) {
                Some(d) => Some(Fast::Depthwise(d)),
                None => match DepthwiseAvx2::new(&geom, w, w_zp, &stage) {
                    Some(d) => Some(Fast::DepthwiseAvx2(
                        d,
                        DepthwiseF32::new(&geom, w, w_zp, &stage)?.map(Box::new),
                    )),
                    None => DepthwiseF32::new(&geom, w, w_zp, &stage)?.map(Fast::DepthwiseF32),
                },
            },
            (true, false) if qgemm::vnni_available() || crate::kernels::simd::has_avx2_fma() => {
                Some(Fast::Gemm(WxConv::new(
                    &geom,
                    w,
                    w_zp,
                    &stage,
                    qgemm::Backend::Auto,
                )?))
            }
            (true, false) => None,
        };
        // Depthwise convolution runs directly: its GEMM would have a single column.
        let (packed, depthwise) = if fast.is_some() {
            (Vec::new(), None)
        } else if is_dw {
            let d = (0..geom.c_out)
                .flat_map(|c| {
                    let z = zp_of(c);
                    w[c * k..(c + 1) * k].iter().map(move |&v| i32::from(v) - z)
                })
                .collect();
            (Vec::new(), Some(d))
        } else {
            // Columns in (ky, kx, c) order to match the im2col rows built from an HWC copy of
            // the input, where each tap's channels are contiguous.
            let (kh, kw) = (geom.kernel[0], geom.kernel[1]);
            let cin_g = geom.c_in / geom.groups;
            let mut w_hwc = vec![0i8; w.len()];
            for co in 0..geom.c_out {
                for c in 0..cin_g {
                    for t in 0..kh * kw {
                        w_hwc[co * k + t * cin_g + c] = w[co * k + c * kh * kw + t];
                    }
                }
            }
            let w = &w_hwc;
            let packed = (0..geom.groups)
                .map(|g| {
                    let zps: Vec<i32> = if w_zp.len() == 1 {
                        vec![w_zp[0]]
                    } else {
                        w_zp[g * cout_g..(g + 1) * cout_g].to_vec()
                    };
                    PackedB::from_nk(&w[g * cout_g * k..(g + 1) * cout_g * k], k, cout_g, &zps)
                })
                .collect::<Result<Vec<_>>>()?;
            (packed, None)
        };
        if let OutputStage::Requant { scales, bias, .. } = &stage {
            if scales.len() != 1 && scales.len() != geom.c_out {
                return Err(Error::Shape(format!(
                    "{} requantization scales for {} output channels",
                    scales.len(),
                    geom.c_out
                )));
            }
            if let Some(b) = bias {
                if b.len() != geom.c_out {
                    return Err(Error::Shape(format!(
                        "bias has {} values for {} output channels",
                        b.len(),
                        geom.c_out
                    )));
                }
            }
        }
        Ok(IntConv {
            geom,
            fast,
            packed,
            depthwise,
            stage,
        })
    }

    /// Whether an NCHW-direct engine (VNNI or AVX2 GEMM, VNNI, AVX2 or exact-f32 depthwise) runs
    /// this convolution rather than the HWC im2col one.
    pub fn has_fast_path(&self) -> bool {
        self.fast.is_some()
    }

    /// As [`IntConv::run`] followed by a 2x2 / stride-2 max pool (floor mode) of the codes,
    /// `out` being `[n, C_out, oh / 2, ow / 2]`, when the GEMM engine runs this convolution
    /// (each image is pooled while in cache); `Ok(false)`, with nothing written, otherwise.
    pub fn run_pooled<T: QStore + WxElem>(
        &self,
        x: &[u8],
        x_zp: u8,
        [n, h, w]: [usize; 3],
        pads: [usize; 4],
        out: &mut [T],
    ) -> Result<bool> {
        let Some(Fast::Gemm(c)) = &self.fast else {
            return Ok(false);
        };
        let (geom, [oh, ow]) = self.checked_geom(x.len(), [n, h, w], pads, out.len(), true)?;
        c.run(&geom, &self.stage, x, x_zp, [n, h, w], [oh, ow], true, out)?;
        Ok(true)
    }

    /// The geometry with `pads` and the output extent, after checking the buffer sizes (the
    /// output pooled 2x2 when `pooled`).
    fn checked_geom(
        &self,
        x_len: usize,
        [n, h, w]: [usize; 3],
        pads: [usize; 4],
        out_len: usize,
        pooled: bool,
    ) -> Result<(Conv2dGeom, [usize; 2])> {
        let mut geom = self.geom.clone();
        geom.pads = pads;
        let (oh, ow) = geom.out_hw(h, w)?;
        let out_pixels = if pooled { (oh / 2) * (ow / 2) } else { oh * ow };
        if x_len != n * geom.c_in * h * w || out_len != n * geom.c_out * out_pixels {
            return Err(Error::Shape(format!(
                "integer conv: input of {x_len} values or output of {out_len} values does not fit {n} x {} x {h} x {w}",
                geom.c_in
            )));
        }
        Ok((geom, [oh, ow]))
    }

    /// Runs on `x` (`[n, C_in, h, w]` u8, zero point `x_zp`) into `out` (`[n, C_out, oh, ow]`)
    /// with padding `pads` (`[top, left, bottom, right]`, resolved per input size).
    pub fn run<T: QStore + WxElem>(
        &self,
        x: &[u8],
        x_zp: u8,
        [n, h, w]: [usize; 3],
        pads: [usize; 4],
        out: &mut [T],
    ) -> Result<()> {
        let (geom, [oh, ow]) = self.checked_geom(x.len(), [n, h, w], pads, out.len(), false)?;
        let g = &geom;
        match &self.fast {
            Some(Fast::Gemm(c)) => {
                return c.run(g, &self.stage, x, x_zp, [n, h, w], [oh, ow], false, out)
            }
            Some(Fast::Depthwise(d)) => return d.run(x, x_zp, [n, h, w], pads, [oh, ow], out),
            Some(Fast::DepthwiseAvx2(d, f)) => {
                return match f {
                    Some(f) if ow < DepthwiseAvx2::MIN_WIDTH => {
                        f.run(x, x_zp, [n, h, w], pads, [oh, ow], out)
                    }
                    _ => d.run(x, x_zp, [n, h, w], pads, [oh, ow], out),
                }
            }
            Some(Fast::DepthwiseF32(d)) => return d.run(x, x_zp, [n, h, w], pads, [oh, ow], out),
            None => {}
        }
        if self.depthwise.is_some() {
            return self.run_direct(g, x, x_zp, [h, w], [oh, ow], out);
        }
        let ohw = oh * ow;
        let cout_g = g.c_out / g.groups;
        let cin_g = g.c_in / g.groups;
        let stages: Vec<Option<(Requant, Option<Vec<i32>>)>> = (0..g.groups)
            .map(|grp| self.stage.requant_for(grp * cout_g, cout_g))
            .collect();
        // Padded HWC copies of every image and group, made once.
        let copies: Vec<(Vec<u8>, usize)> = (0..n * g.groups)
            .into_par_iter()
            .map(|i| {
                let (img, grp) = (i / g.groups, i % g.groups);
                let plane = &x[(img * g.c_in + grp * cin_g) * h * w..][..cin_g * h * w];
                pad_hwc(plane, cin_g, [h, w], g.pads, x_zp)
            })
            .collect();
        // Rows are output pixels of all images in turn, so small feature maps (a Gemm as a
        // 1x1 convolution) still make tall GEMMs.
        let total = n * ohw;
        let mut tasks = Vec::new();
        for grp in 0..g.groups {
            for r0 in (0..total).step_by(ROWS_PER_TASK) {
                tasks.push((grp, r0, (r0 + ROWS_PER_TASK).min(total)));
            }
        }
        let k = cin_g * g.kernel[0] * g.kernel[1];
        let results: Vec<Result<Vec<T>>> = tasks
            .par_iter()
            .map(|&(grp, r0, r1)| -> Result<Vec<T>> {
                let rows = r1 - r0;
                let mut a = vec![0u8; rows * k];
                for (r, row) in a.chunks_exact_mut(k).enumerate() {
                    let p = r0 + r;
                    let (xp, wp) = &copies[(p / ohw) * g.groups + grp];
                    im2col_row(xp, *wp, cin_g, ow, g, p % ohw, row);
                }
                let mut c = vec![T::default(); rows * cout_g];
                let packed = &self.packed[grp];
                match &stages[grp] {
                    Some((rq, bias)) => {
                        qgemm::qgemm(&a, rows, x_zp, packed, bias.as_deref(), rq, &mut c)?
                    }
                    None => {
                        let mut acc = vec![0i32; rows * cout_g];
                        qgemm::qgemm_i32(&a, rows, x_zp, packed, &mut acc)?;
                        for (o, v) in c.iter_mut().zip(acc) {
                            *o = T::from_code(v);
                        }
                    }
                }
                Ok(c)
            })
            .collect();
        let blocks = results.into_iter().collect::<Result<Vec<Vec<T>>>>()?;
        let per_group = total.div_ceil(ROWS_PER_TASK);
        // Transpose the `[rows, C_out/groups]` blocks into NCHW, image by image.
        out.par_chunks_mut(g.c_out * ohw)
            .enumerate()
            .for_each(|(img, img_out)| {
                for grp in 0..g.groups {
                    let mut pix = 0;
                    while pix < ohw {
                        let global = img * ohw + pix;
                        let b = &blocks[grp * per_group + global / ROWS_PER_TASK];
                        let off = global % ROWS_PER_TASK;
                        let len = (ROWS_PER_TASK - off).min(ohw - pix);
                        for j in 0..cout_g {
                            let dst = &mut img_out[(grp * cout_g + j) * ohw + pix..][..len];
                            for (r, d) in dst.iter_mut().enumerate() {
                                *d = b[(off + r) * cout_g + j];
                            }
                        }
                        pix += len;
                    }
                }
            });
        Ok(())
    }

    fn run_direct<T: QStore + Default + Send + Sync>(
        &self,
        g: &Conv2dGeom,
        x: &[u8],
        x_zp: u8,
        [h, w]: [usize; 2],
        [oh, ow]: [usize; 2],
        out: &mut [T],
    ) -> Result<()> {
        let wts = self.depthwise.as_deref().unwrap_or(&[]);
        let taps = g.kernel[0] * g.kernel[1];
        let c = g.c_out;
        let (cin_g, cout_g) = (g.c_in / g.groups, g.c_out / g.groups);
        let k = cin_g * taps;
        out.par_chunks_mut(oh * ow)
            .enumerate()
            .for_each(|(plane_idx, dst)| {
                let (img, ch) = (plane_idx / c, plane_idx % c);
                let first_in = img * g.c_in + (ch / cout_g) * cin_g;
                // The input planes of this channel minus the zero point, converted once: each
                // input row feeds up to `kh` output rows.
                let mut xs = vec![0i32; cin_g * h * w];
                let src = &x[first_in * h * w..(first_in + cin_g) * h * w];
                for (d, &v) in xs.iter_mut().zip(src) {
                    *d = i32::from(v) - i32::from(x_zp);
                }
                let rq = match &self.stage {
                    OutputStage::Requant {
                        scales,
                        zero_point,
                        qmin,
                        qmax,
                        bias,
                    } => Some((
                        scales[if scales.len() == 1 { 0 } else { ch }],
                        *zero_point,
                        code_bounds(*qmin, *qmax, *zero_point),
                        bias.as_ref().map_or(0, |b| b[ch]),
                    )),
                    OutputStage::Int32 => None,
                };
                let weights = |ci: usize| &wts[ch * k + ci * taps..ch * k + (ci + 1) * taps];
                // Without dilation, each tap is one multiply-add over a whole plane rather than
                // `oh` short row segments: the zero-padded input is split into `sh x sw` phase
                // planes (`[r][c]` = padded `[sh r + a][sw c + b]`), in which tap `(ky, kx)`
                // reads phase `(ky % sh, kx % sw)` at offset `(ky / sh, kx / sw)` with unit
                // stride. Rows are `wq` wide, the columns past `ow` computed and dropped;
                // integer sums are exact in any order.
                let whole = (g.dilation == [1, 1] && oh > 0 && ow > 0).then(|| {
                    let [sh, sw] = g.stride;
                    let [kh, kw] = g.kernel;
                    let (pt, pl) = (g.pads[0], g.pads[1]);
                    let (hq, wq) = (oh + (kh - 1) / sh, ow + (kw - 1) / sw);
                    let mut phases = vec![0i32; sh * sw * hq * wq];
                    let mut acc = vec![0i32; oh * wq];
                    let len = (oh - 1) * wq + ow;
                    for ci in 0..cin_g {
                        let plane = &xs[ci * h * w..(ci + 1) * h * w];
                        for (i, ph) in phases.chunks_exact_mut(hq * wq).enumerate() {
                            let (a, b) = (i / sw, i % sw);
                            for (r, row) in ph.chunks_exact_mut(wq).enumerate() {
                                let y = (sh * r + a).wrapping_sub(pt);
                                if y >= h {
                                    row.fill(0);
                                    continue;
                                }
                                for (c, d) in row.iter_mut().enumerate() {
                                    let xx = (sw * c + b).wrapping_sub(pl);
                                    *d = if xx < w { plane[y * w + xx] } else { 0 };
                                }
                            }
                        }
                        let wk = weights(ci);
                        for ky in 0..kh {
                            for kx in 0..kw {
                                let ph = &phases[((ky % sh) * sw + kx % sw) * hq * wq..];
                                let off = (ky / sh) * wq + kx / sw;
                                accumulate_dispatch(
                                    &mut acc[..len],
                                    &ph[off..off + len],
                                    wk[ky * kw + kx],
                                );
                            }
                        }
                    }
                    (acc, wq)
                });
                let mut row_acc = vec![0i32; if whole.is_some() { 0 } else { ow }];
                for oy in 0..oh {
                    let acc: &[i32] = match &whole {
                        Some((acc, wp)) => &acc[oy * wp..oy * wp + ow],
                        None => {
                            row_acc.fill(0);
                            for ci in 0..cin_g {
                                let plane = &xs[ci * h * w..(ci + 1) * h * w];
                                direct_row_dispatch(
                                    g,
                                    plane,
                                    [h, w],
                                    ow,
                                    oy,
                                    weights(ci),
                                    &mut row_acc,
                                );
                            }
                            &row_acc
                        }
                    };
                    let drow = &mut dst[oy * ow..(oy + 1) * ow];
                    match rq {
                        Some((scale, zp, (lo, hi), bias)) => {
                            for (d, &a) in drow.iter_mut().zip(acc) {
                                let v = a.wrapping_add(bias) as f32 * scale;
                                *d = T::from_code(round_to_code(v, lo, hi).wrapping_add(zp));
                            }
                        }
                        None => {
                            for (d, &a) in drow.iter_mut().zip(acc) {
                                *d = T::from_code(a);
                            }
                        }
                    }
                }
            });
        Ok(())
    }
}

/// [`direct_row`] compiled for AVX2 (eight i32 lanes) when the CPU has it.
#[inline]
fn direct_row_dispatch(
    g: &Conv2dGeom,
    src: &[i32],
    hw: [usize; 2],
    ow: usize,
    oy: usize,
    wk: &[i32],
    acc: &mut [i32],
) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2") {
            // SAFETY: AVX2 was detected just above.
            unsafe { direct_row_avx2(g, src, hw, ow, oy, wk, acc) };
            return;
        }
    }
    direct_row(g, src, hw, ow, oy, wk, acc);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn direct_row_avx2(
    g: &Conv2dGeom,
    src: &[i32],
    hw: [usize; 2],
    ow: usize,
    oy: usize,
    wk: &[i32],
    acc: &mut [i32],
) {
    direct_row(g, src, hw, ow, oy, wk, acc);
}

/// Adds one input plane's contribution (`x - zero point` as i32) to output row `oy`: every
/// tap whose input row lies inside the image, over the output columns whose input column does
/// (padding adds nothing).
#[inline(always)]
fn direct_row(
    g: &Conv2dGeom,
    src: &[i32],
    [h, w]: [usize; 2],
    ow: usize,
    oy: usize,
    wk: &[i32],
    acc: &mut [i32],
) {
    for ky in 0..g.kernel[0] {
        let iy = (oy * g.stride[0] + ky * g.dilation[0]) as isize - g.pads[0] as isize;
        if iy < 0 || iy >= h as isize {
            continue;
        }
        let xrow = &src[iy as usize * w..(iy as usize + 1) * w];
        for kx in 0..g.kernel[1] {
            let wv = wk[ky * g.kernel[1] + kx];
            let off = (kx * g.dilation[1]) as isize - g.pads[1] as isize;
            let sw = g.stride[1] as isize;
            // Output columns whose input column lies inside the image.
            let lo = if off >= 0 { 0 } else { ((-off) + sw - 1) / sw };
            let hi_num = w as isize - off;
            let hi = if hi_num <= 0 {
                0
            } else {
                ((hi_num + sw - 1) / sw).min(ow as isize)
            };
            if lo >= hi {
                continue;
            }
            let (lo, hi) = (lo as usize, hi as usize);
            if sw == 1 {
                let base = (lo as isize + off) as usize;
                accumulate(&mut acc[lo..hi], &xrow[base..base + hi - lo], wv);
            } else {
                for (ox, a) in acc.iter_mut().enumerate().take(hi).skip(lo) {
                    let ix = (ox as isize * sw + off) as usize;
                    *a += xrow[ix] * wv;
                }
            }
        }
    }
}

/// [`accumulate`] compiled for AVX2 when the CPU has it.
#[inline]
fn accumulate_dispatch(acc: &mut [i32], x: &[i32], w: i32) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2") {
            // SAFETY: AVX2 was detected just above.
            unsafe { accumulate_avx2(acc, x, w) };
            return;
        }
    }
    accumulate(acc, x, w);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn accumulate_avx2(acc: &mut [i32], x: &[i32], w: i32) {
    accumulate(acc, x, w);
}

#[inline(always)]
fn accumulate(acc: &mut [i32], x: &[i32], w: i32) {
    for (a, &v) in acc.iter_mut().zip(x) {
        *a = a.wrapping_add(v.wrapping_mul(w));
    }
}

/// The planes `[C, h, w]` as a zero-point-padded `[h + top + bottom, w + left + right, C]`
/// copy, and its padded width.
fn pad_hwc(
    plane: &[u8],
    cin: usize,
    [h, w]: [usize; 2],
    pads: [usize; 4],
    zp: u8,
) -> (Vec<u8>, usize) {
    let [pt, pl, pb, pr] = pads;
    let (hp, wp) = (h + pt + pb, w + pl + pr);
    let mut xp = vec![zp; hp * wp * cin];
    for c in 0..cin {
        let src = &plane[c * h * w..(c + 1) * h * w];
        for y in 0..h {
            let dst = &mut xp[((y + pt) * wp + pl) * cin..];
            for (x, &v) in src[y * w..(y + 1) * w].iter().enumerate() {
                dst[x * cin + c] = v;
            }
        }
    }
    (xp, wp)
}

/// Row `p` (an output pixel) of the im2col matrix from a padded HWC copy: its `kh * kw` taps
/// in order, each tap's `C` channels contiguous (weights are packed to match).
fn im2col_row(
    xp: &[u8],
    wp: usize,
    cin: usize,
    ow: usize,
    g: &Conv2dGeom,
    p: usize,
    row: &mut [u8],
) {
    let [kh, kw] = g.kernel;
    let (oy, ox) = (p / ow, p % ow);
    if g.dilation[1] == 1 {
        // The kw taps of one kernel row are adjacent in the HWC copy: one copy per row.
        let span = kw * cin;
        for ky in 0..kh {
            let y = oy * g.stride[0] + ky * g.dilation[0];
            let src = (y * wp + ox * g.stride[1]) * cin;
            copy_bytes(&mut row[ky * span..(ky + 1) * span], &xp[src..src + span]);
        }
        return;
    }
    for ky in 0..kh {
        let y = oy * g.stride[0] + ky * g.dilation[0];
        for kx in 0..kw {
            let x = ox * g.stride[1] + kx * g.dilation[1];
            let src = (y * wp + x) * cin;
            let dst = (ky * kw + kx) * cin;
            copy_bytes(&mut row[dst..dst + cin], &xp[src..src + cin]);
        }
    }
}

/// `dst.copy_from_slice(src)` without a `memcpy` call for the few-byte copies of thin inputs.
#[inline]
fn copy_bytes(dst: &mut [u8], src: &[u8]) {
    if dst.len() <= 16 {
        for (d, &s) in dst.iter_mut().zip(src) {
            *d = s;
        }
    } else {
        dst.copy_from_slice(src);
    }
}

/// `C = A B` for `A` `[m, K]` u8 with zero point `a_zp` and a packed `B`, rows split over
/// threads, into `out` `[m, N]`.
pub fn matmul_rows<T: QStore + Default + Send + Sync>(
    a: &[u8],
    m: usize,
    a_zp: u8,
    b: &PackedB,
    stage: &OutputStage,
    out: &mut [T],
) -> Result<()> {
    let (k, n) = (b.k(), b.n());
    if a.len() != m * k || out.len() != m * n {
        return Err(Error::Shape(format!(
            "integer matmul: A of {} values or output of {} values does not fit {m} x {k} x {n}",
            a.len(),
            out.len()
        )));
    }
    let stage = stage.requant_for(0, n);
    let rows_per = ROWS_PER_TASK.max(1);
    out.par_chunks_mut(rows_per * n.max(1))
        .zip(a.par_chunks(rows_per * k.max(1)))
        .try_for_each(|(o, a)| -> Result<()> {
            let rows = o.len() / n.max(1);
            match &stage {
                Some((rq, bias)) => qgemm::qgemm(a, rows, a_zp, b, bias.as_deref(), rq, o),
                None => {
                    let mut acc = vec![0i32; rows * n];
                    qgemm::qgemm_i32(a, rows, a_zp, b, &mut acc)?;
                    for (d, v) in o.iter_mut().zip(acc) {
                        *d = T::from_code(v);
                    }
                    Ok(())
                }
            }
        })
}
