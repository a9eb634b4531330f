//! 2-D max and average pooling (kernel, strides, pads, dilations, `ceil_mode`,
//! `count_include_pad`) and global pooling, NCHW f32.
//!
//! Semantics follow ONNX Runtime (and PyTorch): with `ceil_mode` a last window that would start
//! in the right/bottom padding is dropped; average pooling with `count_include_pad` divides by
//! the window positions inside the padded extent (not those past it, which `ceil_mode` can
//! add); a max window with no input element yields `f32::MIN` and NaN inputs never win.
//!
//! The fast path works one output row at a time: the kernel rows are first reduced
//! vertically into a padded row buffer (contiguous loops the compiler vectorises, with AVX2
//! when available), then each tap of the window is combined along the row.

use rayon::prelude::*;

use super::scratch;
use super::simd::has_avx2_fma;
use crate::error::{Error, Result};

/// Planes of work below which pooling stays on one thread.
const PAR_MIN_ELEMS: usize = 1 << 15;

#[derive(Clone, Debug, PartialEq)]
pub struct Pool2dGeom {
    /// `[kh, kw]`.
    pub kernel: [usize; 2],
    pub stride: [usize; 2],
    pub dilation: [usize; 2],
    /// `[top, left, bottom, right]`.
    pub pads: [usize; 4],
    pub ceil_mode: bool,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum PoolKind {
    Max,
    Avg { count_include_pad: bool },
}

impl Pool2dGeom {
    pub fn validate(&self) -> Result<()> {
        if self.kernel.contains(&0) || self.stride.contains(&0) || self.dilation.contains(&0) {
            return Err(Error::Shape(format!(
                "pool: kernel {:?}, strides {:?} and dilations {:?} must be positive",
                self.kernel, self.stride, self.dilation
            )));
        }
        Ok(())
    }

    /// Output `(height, width)` of an `h x w` input.
    pub fn out_hw(&self, h: usize, w: usize) -> Result<(usize, usize)> {
        Ok((self.out_len(0, h)?, self.out_len(1, w)?))
    }

    fn out_len(&self, axis: usize, size: usize) -> Result<usize> {
        let (lo, hi) = (self.pads[axis], self.pads[axis + 2]);
        let (k, s, d) = (self.kernel[axis], self.stride[axis], self.dilation[axis]);
        let span = d.saturating_mul(k - 1).saturating_add(1);
        let padded = size.saturating_add(lo).saturating_add(hi);
        if padded < span {
            return Err(Error::Shape(format!(
                "pool: padded input extent {padded} is smaller than the window extent {span}"
            )));
        }
        let steps = padded - span;
        let mut out = if self.ceil_mode {
            steps.div_ceil(s) + 1
        } else {
            steps / s + 1
        };
        if self.ceil_mode && (out - 1) * s >= size + lo {
            out -= 1;
        }
        Ok(out)
    }

    /// Window positions of output `o` along `axis` that fall inside the input, and those
    /// inside the padded extent (the `count_include_pad` divisor).
    fn counts(&self, axis: usize, o: usize, size: usize) -> (usize, usize) {
        let lo = self.pads[axis] as isize;
        let hi = (size + self.pads[axis + 2]) as isize;
        let start = (o * self.stride[axis]) as isize - lo;
        let (mut inside, mut padded) = (0, 0);
        for k in 0..self.kernel[axis] {
            let i = start + (k * self.dilation[axis]) as isize;
            if i >= 0 && i < size as isize {
                inside += 1;
            }
            if i >= -lo && i < hi {
                padded += 1;
            }
        }
        (inside, padded)
    }
}

/// Pools `x` (`[planes, h, w]`, planes = N * C) into `out` (`[planes, oh, ow]`).
pub fn pool2d(
    g: &Pool2dGeom,
    kind: PoolKind,
    x: &[f32],
    [planes, h, w]: [usize; 3],
    out: &mut [f32],
) -> Result<()> {
    g.validate()?;
    let (oh, ow) = g.out_hw(h, w)?;
    check_sizes(x.len(), planes * h * w, out.len(), planes * oh * ow)?;
    if out.is_empty() {
        return Ok(());
    }
    let layout = RowLayout::new(g, w, ow);
    let avx = has_avx2_fma();
    let plane_in = h * w;
    let plane_out = oh * ow;
    // A group of planes shares one scratch buffer.
    let group = |(gi, dst): (usize, &mut [f32]), per_group: usize| {
        let first = gi * per_group;
        let src = &x[first * plane_in..(first + dst.len() / plane_out) * plane_in];
        #[cfg(target_arch = "x86_64")]
        if avx && kind == PoolKind::Max && is_2x2_stride_2(g, h, w) {
            // SAFETY: AVX2 support was checked at run time; shapes checked above.
            unsafe { max_2x2_avx2(src, w, dst) };
            return;
        }
        scratch::with_f32(layout.len(), |buf| {
            #[cfg(target_arch = "x86_64")]
            if avx {
                // SAFETY: AVX2 support was checked at run time.
                unsafe { planes_avx2(g, kind, &layout, src, (h, w), buf, dst) };
                return;
            }
            let _ = avx;
            planes_any(g, kind, &layout, src, (h, w), buf, dst);
        });
    };
    let threads = crate::kernels::par::threads();
    if threads > 1 && x.len() >= PAR_MIN_ELEMS && planes > 1 {
        let per_group = planes
            .div_ceil(threads * 4)
            .max(PAR_MIN_ELEMS / 4 / plane_in.max(1))
            .max(1);
        out.par_chunks_mut(per_group * plane_out)
            .enumerate()
            .for_each(|c| group(c, per_group));
    } else {
        group((0, out), planes);
    }
    Ok(())
}

fn check_sizes(x: usize, x_want: usize, out: usize, out_want: usize) -> Result<()> {
    if x != x_want || out != out_want {
        return Err(Error::Shape(format!(
            "pool: input has {x} values (expected {x_want}), output {out} (expected {out_want})"
        )));
    }
    Ok(())
}

/// The scratch row buffers: a linear padded row (`width` floats, wide enough for the columns
/// `ceil_mode` windows reach past the padding), then one divisor per output column.
struct RowLayout {
    width: usize,
    sw: usize,
    left: usize,
    ow: usize,
}

impl RowLayout {
    fn new(g: &Pool2dGeom, w: usize, ow: usize) -> RowLayout {
        let sw = g.stride[1];
        let reach = (ow - 1) * sw + g.dilation[1] * (g.kernel[1] - 1) + 1;
        RowLayout {
            width: reach.max(w + g.pads[1]),
            sw,
            left: g.pads[1],
            ow,
        }
    }

    fn len(&self) -> usize {
        self.width + self.ow
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn planes_avx2(
    g: &Pool2dGeom,
    kind: PoolKind,
    layout: &RowLayout,
    src: &[f32],
    hw: (usize, usize),
    buf: &mut [f32],
    dst: &mut [f32],
) {
    planes_any(g, kind, layout, src, hw, buf, dst);
}

#[inline(always)]
fn planes_any(
    g: &Pool2dGeom,
    kind: PoolKind,
    layout: &RowLayout,
    src: &[f32],
    (h, w): (usize, usize),
    buf: &mut [f32],
    dst: &mut [f32],
) {
    let (linear, x_counts) = buf.split_at_mut(layout.width);
    if let PoolKind::Avg { count_include_pad } = kind {
        for (ox, c) in x_counts.iter_mut().enumerate() {
            let (inside, padded) = g.counts(1, ox, w);
            *c = if count_include_pad { padded } else { inside } as f32;
        }
    }
    let planes = src
        .chunks_exact(h * w)
        .zip(dst.chunks_exact_mut(layout.ow * out_rows(dst, layout, src, h * w)));
    for (s, d) in planes {
        match kind {
            PoolKind::Max => plane::<true>(g, None, layout, s, (h, w), linear, x_counts, d),
            PoolKind::Avg { count_include_pad } => plane::<false>(
                g,
                Some(count_include_pad),
                layout,
                s,
                (h, w),
                linear,
                x_counts,
                d,
            ),
        }
    }
}

/// The common non-overlapping 2x2 / stride 2 window without padding on even extents.
fn is_2x2_stride_2(g: &Pool2dGeom, h: usize, w: usize) -> bool {
    g.kernel == [2, 2]
        && g.stride == [2, 2]
        && g.dilation == [1, 1]
        && g.pads == [0; 4]
        && h.is_multiple_of(2)
        && w.is_multiple_of(2)
}

/// 2x2 / stride 2 max pooling over whole planes: `src` holds `rows` input rows of `w`
/// (two per output row, across plane boundaries) and `dst` the `rows / 2` output rows.
/// Eight outputs come from four loads, two maxes and a deinterleave; a row's last block may
/// write past the row into the next ones, which are then overwritten in order, so only the
/// last eight outputs of `dst` and reads past `src` need the scalar tail.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn max_2x2_avx2(src: &[f32], w: usize, dst: &mut [f32]) {
    use std::arch::x86_64::*;
    let ow = w / 2;
    let out_rows = dst.len() / ow;
    let s = src.as_ptr();
    let d = dst.as_mut_ptr();
    for r in 0..out_rows {
        let top = 2 * r * w;
        let mut ox = 0;
        while ox < ow {
            // Spilling into the next rows is fine (they are written after), past `dst` not.
            let full_write = r * ow + ox + 8 <= dst.len();
            let full_read = top + w + 2 * ox + 16 <= src.len();
            if !(full_write && full_read) {
                break;
            }
            let a = s.add(top + 2 * ox);
            let b = a.add(w);
            // vmaxps returns its second operand when either is NaN: seeding with f32::MIN
            // and passing each input first makes NaN inputs lose, as in the scalar path.
            let lowest = _mm256_set1_ps(f32::MIN);
            let v0 = _mm256_max_ps(
                _mm256_loadu_ps(a),
                _mm256_max_ps(_mm256_loadu_ps(b), lowest),
            );
            let v1 = _mm256_max_ps(
                _mm256_loadu_ps(a.add(8)),
                _mm256_max_ps(_mm256_loadu_ps(b.add(8)), lowest),
            );
            let even = _mm256_shuffle_ps::<0x88>(v0, v1);
            let odd = _mm256_shuffle_ps::<0xDD>(v0, v1);
            let m = _mm256_castpd_ps(_mm256_permute4x64_pd::<0xD8>(_mm256_castps_pd(
                _mm256_max_ps(even, odd),
            )));
            _mm256_storeu_ps(d.add(r * ow + ox), m);
            ox += 8;
        }
        for x in ox..ow {
            let i = top + 2 * x;
            let v = src[i].max(src[i + 1]).max(src[i + w].max(src[i + w + 1]));
            dst[r * ow + x] = v.max(f32::MIN);
        }
    }
}

/// Output rows per plane, from the buffer sizes.
fn out_rows(dst: &[f32], layout: &RowLayout, src: &[f32], plane_in: usize) -> usize {
    let planes = (src.len() / plane_in.max(1)).max(1);
    dst.len() / planes / layout.ow.max(1)
}

#[inline(always)]
fn max(a: f32, b: f32) -> f32 {
    // Not f32::max: this form vectorises and, like ONNX Runtime, ignores NaN in `b`.
    if b > a {
        b
    } else {
        a
    }
}

#[inline(always)]
fn combine<const MAX: bool>(acc: &mut [f32], src: &[f32]) {
    if MAX {
        // f32::max, not `max`: LLVM turns the select form into masked stores here, which are
        // slow on AMD. Both ignore a NaN operand (the other one wins).
        acc.iter_mut().zip(src).for_each(|(a, &b)| *a = a.max(b));
    } else {
        acc.iter_mut().zip(src).for_each(|(a, &b)| *a += b);
    }
}

/// Valid window taps `lo..hi` along an axis for a window starting at `start` (may be
/// negative) with dilation `d` over an input of `size`.
#[inline(always)]
fn tap_range(start: isize, k: usize, d: usize, size: usize) -> (usize, usize) {
    let d = d as isize;
    let lo = if start < 0 { (-start + d - 1) / d } else { 0 };
    let hi = (size as isize - start + d - 1)
        .div_euclid(d)
        .clamp(0, k as isize);
    (lo as usize, (hi as usize).max(lo as usize))
}

/// One plane: `MAX` selects max pooling, else average with `include_pad` divisors.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn plane<const MAX: bool>(
    g: &Pool2dGeom,
    include_pad: Option<bool>,
    layout: &RowLayout,
    src: &[f32],
    (h, w): (usize, usize),
    linear: &mut [f32],
    x_counts: &[f32],
    dst: &mut [f32],
) {
    let pad_value = if MAX { f32::NEG_INFINITY } else { 0.0 };
    let ow = layout.ow;
    let sw = layout.sw;
    linear.fill(pad_value);
    for (oy, out_row) in dst.chunks_exact_mut(ow).enumerate() {
        // Vertical pass: reduce the window's input rows into the interior of the linear row.
        let y0 = (oy * g.stride[0]) as isize - g.pads[0] as isize;
        let (lo, hi) = tap_range(y0, g.kernel[0], g.dilation[0], h);
        let inner = &mut linear[layout.left..layout.left + w];
        if lo == hi {
            inner.fill(pad_value);
        } else {
            let row = |ky: usize| {
                let y = (y0 + (ky * g.dilation[0]) as isize) as usize;
                &src[y * w..(y + 1) * w]
            };
            inner.copy_from_slice(row(lo));
            for ky in lo + 1..hi {
                combine::<MAX>(inner, row(ky));
            }
        }
        // Horizontal pass: tap kx reads every sw-th column from kx * dw.
        if sw == 1 {
            out_row.copy_from_slice(&linear[..ow]);
            for kx in 1..g.kernel[1] {
                let o = kx * g.dilation[1];
                combine::<MAX>(out_row, &linear[o..o + ow]);
            }
        } else {
            for kx in 0..g.kernel[1] {
                // Exactly ow elements: (ow - 1) * sw + o < width by construction.
                let taps = linear[kx * g.dilation[1]..].iter().step_by(sw);
                if kx == 0 {
                    out_row.iter_mut().zip(taps).for_each(|(a, &b)| *a = b);
                } else if MAX {
                    out_row
                        .iter_mut()
                        .zip(taps)
                        .for_each(|(a, &b)| *a = a.max(b));
                } else {
                    out_row.iter_mut().zip(taps).for_each(|(a, &b)| *a += b);
                }
            }
        }
        match include_pad {
            None => out_row.iter_mut().for_each(|v| *v = v.max(f32::MIN)),
            Some(include) => {
                let (in_y, pad_y) = g.counts(0, oy, h);
                let cy = if include { pad_y } else { in_y } as f32;
                for (v, &cx) in out_row.iter_mut().zip(x_counts.iter()) {
                    let n = cy * cx;
                    *v = if n == 0.0 { 0.0 } else { *v / n };
                }
            }
        }
    }
}

/// The plain definition, kept as the reference the fast path is tested against.
pub fn pool2d_reference(
    g: &Pool2dGeom,
    kind: PoolKind,
    x: &[f32],
    [planes, h, w]: [usize; 3],
    out: &mut [f32],
) -> Result<()> {
    g.validate()?;
    let (oh, ow) = g.out_hw(h, w)?;
    check_sizes(x.len(), planes * h * w, out.len(), planes * oh * ow)?;
    for p in 0..planes {
        for oy in 0..oh {
            for ox in 0..ow {
                let mut acc = if kind == PoolKind::Max { f32::MIN } else { 0.0 };
                for ky in 0..g.kernel[0] {
                    let iy = (oy * g.stride[0] + ky * g.dilation[0]) as isize - g.pads[0] as isize;
                    for kx in 0..g.kernel[1] {
                        let ix =
                            (ox * g.stride[1] + kx * g.dilation[1]) as isize - g.pads[1] as isize;
                        if iy < 0 || ix < 0 || iy >= h as isize || ix >= w as isize {
                            continue;
                        }
                        let v = x[(p * h + iy as usize) * w + ix as usize];
                        acc = if kind == PoolKind::Max {
                            max(acc, v)
                        } else {
                            acc + v
                        };
                    }
                }
                if let PoolKind::Avg { count_include_pad } = kind {
                    let (iy, py) = g.counts(0, oy, h);
                    let (ix, px) = g.counts(1, ox, w);
                    let n = if count_include_pad { py * px } else { iy * ix };
                    acc = if n == 0 { 0.0 } else { acc / n as f32 };
                }
                out[(p * oh + oy) * ow + ox] = acc;
            }
        }
    }
    Ok(())
}

/// Global pooling: one value per plane of `hw` elements.
pub fn global_pool(
    kind: PoolKind,
    x: &[f32],
    planes: usize,
    hw: usize,
    out: &mut [f32],
) -> Result<()> {
    check_sizes(x.len(), planes * hw, out.len(), planes)?;
    if hw == 0 {
        out.fill(if kind == PoolKind::Max { f32::MIN } else { 0.0 });
        return Ok(());
    }
    let one = |(o, p): (&mut f32, &[f32])| {
        *o = match kind {
            PoolKind::Max => p.iter().fold(f32::MIN, |a, &b| max(a, b)),
            PoolKind::Avg { .. } => sum(p) / hw as f32,
        };
    };
    if crate::kernels::par::threads() > 1 && x.len() >= PAR_MIN_ELEMS * 4 {
        out.par_iter_mut().zip(x.par_chunks(hw)).for_each(one);
    } else {
        out.iter_mut().zip(x.chunks(hw)).for_each(one);
    }
    Ok(())
}

/// Sum with eight independent partial sums, so the loop vectorises.
fn sum(v: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let chunks = v.chunks_exact(8);
    let rest: f32 = chunks.remainder().iter().sum();
    for c in chunks {
        for (a, &x) in acc.iter_mut().zip(c) {
            *a += x;
        }
    }
    acc.iter().sum::<f32>() + rest
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::simd::portable_only;
    use crate::kernels::testutil::{assert_close, Rng};

    fn geom(k: [usize; 2], s: [usize; 2], d: [usize; 2], p: [usize; 4], ceil: bool) -> Pool2dGeom {
        Pool2dGeom {
            kernel: k,
            stride: s,
            dilation: d,
            pads: p,
            ceil_mode: ceil,
        }
    }

    fn run(g: &Pool2dGeom, kind: PoolKind, x: &[f32], shape: [usize; 3]) -> Vec<f32> {
        let (oh, ow) = g.out_hw(shape[1], shape[2]).unwrap();
        let mut out = vec![0.0; shape[0] * oh * ow];
        pool2d(g, kind, x, shape, &mut out).unwrap();
        out
    }

    const AVG_IN: PoolKind = PoolKind::Avg {
        count_include_pad: true,
    };
    const AVG_EX: PoolKind = PoolKind::Avg {
        count_include_pad: false,
    };

    #[test]
    fn narrow_2x2_pools_write_nothing_past_their_output() {
        // One or two outputs per row: a vector store at a row start spans the next rows, and
        // near the end would run past the output (the fuzzer found a heap overflow here).
        for (planes, h, w) in [
            (1, 28, 2),
            (2, 28, 2),
            (8, 28, 2),
            (3, 6, 4),
            (1, 2, 14),
            (5, 4, 6),
        ] {
            let x: Vec<f32> = (0..planes * h * w).map(|i| (i * 37 % 101) as f32).collect();
            let g = geom([2, 2], [2, 2], [1, 1], [0; 4], false);
            let n = planes * (h / 2) * (w / 2);
            let mut buf = vec![-7.0f32; n + 16];
            pool2d(&g, PoolKind::Max, &x, [planes, h, w], &mut buf[..n]).unwrap();
            assert!(
                buf[n..].iter().all(|&v| v == -7.0),
                "{planes}x{h}x{w}: wrote past the end"
            );
            for (o, &got) in buf[..n].iter().enumerate() {
                let (p, r, c) = (o / ((h / 2) * (w / 2)), o / (w / 2) % (h / 2), o % (w / 2));
                let at = |dy: usize, dx: usize| x[p * h * w + (2 * r + dy) * w + 2 * c + dx];
                let want = at(0, 0).max(at(0, 1)).max(at(1, 0)).max(at(1, 1));
                assert_eq!(got, want, "{planes}x{h}x{w} output {o}");
            }
        }
    }

    /// Expected values from ONNX Runtime 1.32 on a 5x5 ramp 1..=25.
    #[test]
    fn matches_onnxruntime_on_edge_cases() {
        let x: Vec<f32> = (1..=25).map(|v| v as f32).collect();
        let s = [1, 5, 5];
        let g = geom([2, 2], [2, 2], [1, 1], [0; 4], true);
        assert_eq!(
            run(&g, PoolKind::Max, &x, s),
            [7., 9., 10., 17., 19., 20., 22., 24., 25.]
        );
        assert_eq!(
            run(&g, AVG_IN, &x, s),
            [4., 6., 7.5, 14., 16., 17.5, 21.5, 23.5, 25.]
        );
        // ceil_mode drops the window that would start in the padding: 3x3, not 4x4.
        let g = geom([2, 2], [2, 2], [1, 1], [1, 1, 1, 1], true);
        assert_eq!(
            run(&g, PoolKind::Max, &x, s),
            [1., 3., 5., 11., 13., 15., 21., 23., 25.]
        );
        assert_eq!(
            run(&g, AVG_IN, &x, s),
            [0.25, 1.25, 2.25, 4.25, 10., 12., 9.25, 20., 22.]
        );
        let g = geom([3, 3], [2, 2], [1, 1], [0, 0, 1, 1], true);
        assert_eq!(
            run(&g, AVG_IN, &x, s),
            [7., 9., 5., 17., 19., 10., 11., 12., 6.25]
        );
        let g = geom([2, 2], [1, 1], [2, 2], [1, 1, 1, 1], false);
        let got = run(&g, AVG_EX, &x, s);
        assert_eq!(&got[..6], [7., 7., 8., 9., 9., 7.]);
        let got = run(&g, AVG_IN, &x, s);
        assert_eq!(&got[..5], [1.75, 3.5, 4., 4.5, 2.25]);
        let got = run(&g, PoolKind::Max, &x, s);
        assert_eq!(&got[..5], [7., 8., 9., 10., 9.]);
    }

    #[test]
    fn fast_path_matches_reference() {
        let mut rng = Rng::new(4);
        for i in 0..60 {
            let k = [rng.range(1, 4), rng.range(1, 4)];
            let d = [rng.range(1, 2), rng.range(1, 2)];
            let p = [0, 1, 2, 3].map(|j| rng.range(0, k[j % 2] - 1));
            let g = geom(k, [rng.range(1, 3), rng.range(1, 3)], d, p, i % 2 == 0);
            let ext = |a: usize| (k[a] - 1) * d[a] + 1;
            let shape = [
                rng.range(1, 3),
                rng.range(ext(0), 13),
                rng.range(ext(1), 40),
            ];
            let x = rng.vec(shape.iter().product());
            for kind in [PoolKind::Max, AVG_IN, AVG_EX] {
                let (oh, ow) = g.out_hw(shape[1], shape[2]).unwrap();
                let mut want = vec![0.0; shape[0] * oh * ow];
                pool2d_reference(&g, kind, &x, shape, &mut want).unwrap();
                assert_close(
                    &run(&g, kind, &x, shape),
                    &want,
                    1e-5,
                    &format!("{g:?} {kind:?} {shape:?}"),
                );
                let portable = portable_only(|| run(&g, kind, &x, shape));
                assert_close(&portable, &want, 1e-5, "portable");
            }
        }
    }

    #[test]
    fn parallel_planes_and_global_pools() {
        let mut rng = Rng::new(8);
        let shape = [64, 28, 28];
        let x = rng.vec(shape.iter().product());
        let g = geom([3, 3], [2, 2], [1, 1], [1, 1, 1, 1], false);
        let (oh, ow) = g.out_hw(28, 28).unwrap();
        let mut want = vec![0.0; 64 * oh * ow];
        pool2d_reference(&g, PoolKind::Max, &x, shape, &mut want).unwrap();
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap();
        let got = pool.install(|| run(&g, PoolKind::Max, &x, shape));
        assert_eq!(got, want);

        let g2 = geom([2, 2], [2, 2], [1, 1], [0; 4], false);
        for shape in [[64, 28, 28], [3, 6, 10], [5, 2, 18]] {
            let mut x = rng.vec(shape.iter().product());
            // NaN inputs never win, and an all-NaN window gives f32::MIN (as ONNX Runtime).
            x[0] = f32::NAN;
            x[shape[2] + 1] = f32::NAN;
            x[2 * shape[2] + 3] = f32::NAN;
            let mut want = vec![0.0; x.len() / 4];
            pool2d_reference(&g2, PoolKind::Max, &x, shape, &mut want).unwrap();
            for threads in [1, 2] {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .unwrap();
                assert_eq!(pool.install(|| run(&g2, PoolKind::Max, &x, shape)), want);
            }
        }

        let mut avg = vec![0.0; 64];
        global_pool(AVG_IN, &x, 64, 784, &mut avg).unwrap();
        let want0: f32 = x[..784].iter().sum::<f32>() / 784.0;
        assert!((avg[0] - want0).abs() < 1e-5);
        let mut mx = vec![0.0; 64];
        global_pool(PoolKind::Max, &x, 64, 784, &mut mx).unwrap();
        assert_eq!(mx[1], x[784..1568].iter().fold(f32::MIN, |a, &b| a.max(b)));
    }

    #[test]
    fn bad_sizes_are_errors() {
        let g = geom([3, 3], [1, 1], [1, 1], [0; 4], false);
        assert!(g.out_hw(2, 5).is_err());
        assert!(pool2d(&g, PoolKind::Max, &[0.0; 9], [1, 3, 3], &mut [0.0; 2]).is_err());
        assert!(global_pool(PoolKind::Max, &[0.0; 9], 2, 4, &mut [0.0; 2]).is_err());
    }
}
