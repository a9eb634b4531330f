//! 2-D max and average pooling (kernel, strides, pads, dilations, `ceil_mode`,
//! `count_include_pad`) and global pooling, NCHW f32.
//!
//! Semantics follow ONNX Runtime (and PyTorch): with `ceil_mode` a last window that would start
//! in the right/bottom padding is dropped; average pooling with `count_include_pad` divides by
//! the window positions inside the padded extent (not those past it, which `ceil_mode` can
//! add); a max window with no input element yields `f32::MIN` and NaN inputs never win.
//!
//! The fast path works one output row at a time: the kernel rows are first reduced
//! vertically into a padded, stride-phase-split row buffer, then each output reads contiguous
//! runs of that buffer, so both steps are contiguous loops the compiler vectorises (with AVX2
//! when available).

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
        let span = d * (k - 1) + 1;
        let padded = size + lo + hi;
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
    let one = |(i, dst): (usize, &mut [f32])| {
        let src = &x[i * h * w..(i + 1) * h * w];
        scratch::with_f32(layout.len() + ow, |buf| {
            #[cfg(target_arch = "x86_64")]
            if avx {
                // SAFETY: AVX2 support was checked at run time.
                unsafe { plane_avx2(g, kind, &layout, src, (h, w), buf, dst) };
                return;
            }
            let _ = avx;
            plane(g, kind, &layout, src, (h, w), buf, dst);
        });
    };
    if rayon::current_num_threads() > 1 && x.len() >= PAR_MIN_ELEMS && planes > 1 {
        let min_len = (PAR_MIN_ELEMS / 4 / (h * w).max(1)).max(1);
        out.par_chunks_mut(oh * ow)
            .with_min_len(min_len)
            .enumerate()
            .for_each(one);
    } else {
        out.chunks_mut(oh * ow).enumerate().for_each(one);
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

/// The row buffer: padded width (including columns `ceil_mode` windows reach past the
/// padding) split into `sw` phases of `wq` columns.
struct RowLayout {
    wq: usize,
    sw: usize,
    left: usize,
    ow: usize,
}

impl RowLayout {
    fn new(g: &Pool2dGeom, w: usize, ow: usize) -> RowLayout {
        let sw = g.stride[1];
        let reach = (ow - 1) * sw + g.dilation[1] * (g.kernel[1] - 1) + 1;
        let width = reach.max(w + g.pads[1]);
        RowLayout {
            wq: width.div_ceil(sw),
            sw,
            left: g.pads[1],
            ow,
        }
    }

    fn len(&self) -> usize {
        self.wq * self.sw
    }

    fn at(&self, padded_x: usize) -> usize {
        (padded_x % self.sw) * self.wq + padded_x / self.sw
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn plane_avx2(
    g: &Pool2dGeom,
    kind: PoolKind,
    layout: &RowLayout,
    src: &[f32],
    hw: (usize, usize),
    buf: &mut [f32],
    dst: &mut [f32],
) {
    plane(g, kind, layout, src, hw, buf, dst);
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
fn plane(
    g: &Pool2dGeom,
    kind: PoolKind,
    layout: &RowLayout,
    src: &[f32],
    (h, w): (usize, usize),
    buf: &mut [f32],
    dst: &mut [f32],
) {
    let is_max = kind == PoolKind::Max;
    let pad_value = if is_max { f32::NEG_INFINITY } else { 0.0 };
    let ow = layout.ow;
    let (kh, kw) = (g.kernel[0], g.kernel[1]);
    let (buf, x_counts) = buf.split_at_mut(layout.len());
    if let PoolKind::Avg { count_include_pad } = kind {
        for (ox, c) in x_counts.iter_mut().enumerate() {
            let (inside, padded) = g.counts(1, ox, w);
            *c = if count_include_pad { padded } else { inside } as f32;
        }
    }
    buf.fill(pad_value);
    for (oy, out_row) in dst.chunks_exact_mut(ow).enumerate() {
        // Vertical pass: reduce the window's input rows into the interior of the row buffer.
        let y0 = (oy * g.stride[0]) as isize - g.pads[0] as isize;
        let mut rows = (0..kh)
            .map(|ky| y0 + (ky * g.dilation[0]) as isize)
            .filter(|&y| y >= 0 && y < h as isize)
            .map(|y| &src[y as usize * w..(y as usize + 1) * w]);
        let interior_start = layout.left;
        match rows.next() {
            None => {
                for x in 0..w {
                    buf[layout.at(interior_start + x)] = pad_value;
                }
            }
            Some(first) => {
                if layout.sw == 1 {
                    let inner = &mut buf[interior_start..interior_start + w];
                    inner.copy_from_slice(first);
                    for row in rows {
                        if is_max {
                            inner
                                .iter_mut()
                                .zip(row)
                                .for_each(|(a, &b)| *a = max(*a, b));
                        } else {
                            inner.iter_mut().zip(row).for_each(|(a, &b)| *a += b);
                        }
                    }
                } else {
                    for (x, &v) in first.iter().enumerate() {
                        buf[layout.at(interior_start + x)] = v;
                    }
                    for row in rows {
                        for (x, &v) in row.iter().enumerate() {
                            let a = &mut buf[layout.at(interior_start + x)];
                            *a = if is_max { max(*a, v) } else { *a + v };
                        }
                    }
                }
            }
        }
        // Horizontal pass: each tap is a contiguous run of one phase.
        let off0 = g.dilation[1];
        let tap = |kx: usize| {
            let o = kx * off0;
            &buf[(o % layout.sw) * layout.wq + o / layout.sw..][..ow]
        };
        out_row.copy_from_slice(tap(0));
        for kx in 1..kw {
            let t = tap(kx);
            if is_max {
                out_row
                    .iter_mut()
                    .zip(t)
                    .for_each(|(a, &b)| *a = max(*a, b));
            } else {
                out_row.iter_mut().zip(t).for_each(|(a, &b)| *a += b);
            }
        }
        match kind {
            PoolKind::Max => out_row.iter_mut().for_each(|v| *v = max(*v, f32::MIN)),
            PoolKind::Avg { count_include_pad } => {
                let (in_y, pad_y) = g.counts(0, oy, h);
                let cy = if count_include_pad { pad_y } else { in_y } as f32;
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
    if rayon::current_num_threads() > 1 && x.len() >= PAR_MIN_ELEMS * 4 {
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
