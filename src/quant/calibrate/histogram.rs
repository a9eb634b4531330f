//! Streaming histogram of `|x|` or `x` whose range grows by exact re-binning.
//!
//! The first batch with a non-degenerate range fixes a grid of `nbins` equal bins over its
//! `[0, max |x|]` (or `[min, max]`). When later data falls outside, the bin width is multiplied
//! by the smallest integer `m` that makes the data fit and the grid is extended on whole old
//! bins, so every old bin falls into exactly one new bin: re-binning is a sum of counts, exact
//! and deterministic (the result does not depend on anything but the order of batches). The
//! price is resolution: after growth fewer than `nbins` bins may hold data (at worst about half).
//! When that matters, fix the range first with [`Histogram::with_range`] from a [`super::MinMax`]
//! pass.

use super::{Observer, Range};
use crate::error::Result;
use crate::quant::linear::{check_finite, min_max, tensor_error};

/// Bin count used by TensorRT's and ONNX Runtime's entropy calibration.
pub const DEFAULT_BINS: usize = 2048;
/// Largest bin count: bin indices are computed in f32, exact below 2^24.
pub const MAX_BINS: usize = 1 << 20;

/// Counts are kept in this many interleaved copies so consecutive equal bin indices (a run of
/// zeros after ReLU) do not serialise on one memory location; they are summed when read.
const LANES: usize = 4;
/// Values are binned in chunks: indices of a chunk are computed in one vectorisable pass.
const CHUNK: usize = 512;

/// What the histogram counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HistKind {
    /// `|x|` over `[0, max |x|]`: for symmetric thresholds (KL, MSE, percentile).
    Abs,
    /// `x` over `[min, max]`: for affine ranges (percentile cuts both tails, MSE).
    Signed,
}

#[derive(Clone, Copy, Debug, PartialEq)]
struct Grid {
    lo: f64,
    width: f64,
}

/// A fixed-size histogram fed batch by batch. See the module documentation for how it grows.
#[derive(Clone, Debug)]
pub struct Histogram {
    name: String,
    kind: HistKind,
    nbins: usize,
    grid: Option<Grid>,
    /// `LANES` consecutive blocks of `nbins` counts.
    counts: Vec<u64>,
    /// Exact extremes of `x` (not `|x|`) and the number of values seen.
    min: f32,
    max: f32,
    count: u64,
    /// How many of the values were exactly zero (all of them also counted in bin 0 of an
    /// `|x|` histogram).
    zeros: u64,
}

/// A read-only, lane-summed copy of a histogram's state, used by the threshold rules.
#[derive(Clone, Debug)]
pub(super) struct HistView {
    pub kind: HistKind,
    pub lo: f64,
    pub width: f64,
    pub bins: Vec<u64>,
    pub total: u64,
    /// Exact zeros among `total`.
    pub zeros: u64,
    pub min: f32,
    pub max: f32,
}

impl Histogram {
    /// An empty histogram of `nbins` bins (2 to [`MAX_BINS`]; [`DEFAULT_BINS`] is the usual
    /// choice).
    pub fn new(name: &str, kind: HistKind, nbins: usize) -> Result<Histogram> {
        if !(2..=MAX_BINS).contains(&nbins) {
            return Err(tensor_error(
                name,
                format!("a histogram needs 2 to {MAX_BINS} bins, got {nbins}"),
            ));
        }
        Ok(Histogram {
            name: name.to_string(),
            kind,
            nbins,
            grid: None,
            counts: vec![0; LANES * nbins],
            min: f32::INFINITY,
            max: f32::NEG_INFINITY,
            count: 0,
            zeros: 0,
        })
    }

    /// A histogram whose grid is fixed in advance to `[lo, hi]` (for [`HistKind::Abs`], `lo`
    /// must be 0). It still grows if data falls outside.
    pub fn with_range(
        name: &str,
        kind: HistKind,
        nbins: usize,
        lo: f32,
        hi: f32,
    ) -> Result<Histogram> {
        let mut h = Histogram::new(name, kind, nbins)?;
        if !(lo.is_finite() && hi.is_finite() && hi > lo) || (kind == HistKind::Abs && lo != 0.0) {
            return Err(tensor_error(
                name,
                format!("invalid histogram range [{lo}, {hi}]"),
            ));
        }
        h.grid = Some(Grid::spanning(f64::from(lo), f64::from(hi), nbins));
        Ok(h)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn kind(&self) -> HistKind {
        self.kind
    }

    pub fn nbins(&self) -> usize {
        self.nbins
    }

    /// Exact extremes of the observed `x` (signed, whatever the kind).
    pub fn observed_range(&self) -> Result<Range> {
        if self.count == 0 {
            return Err(tensor_error(&self.name, "no values observed"));
        }
        Ok(Range {
            min: self.min,
            max: self.max,
        })
    }

    /// Left edge and width of the bins, once the data has had a non-zero range.
    pub fn grid(&self) -> Option<(f64, f64)> {
        self.grid.map(|g| (g.lo, g.width))
    }

    /// Counts per bin (all zero before the grid exists).
    pub fn bins(&self) -> Vec<u64> {
        let mut out = self.counts[..self.nbins].to_vec();
        for lane in self.counts.chunks_exact(self.nbins).skip(1) {
            for (o, &c) in out.iter_mut().zip(lane) {
                *o += c;
            }
        }
        out
    }

    /// Adds another histogram of the same kind and bin count (from another thread, say). The
    /// grid grows to cover both; counts of `other` are added at their bin centres, so the merge
    /// is exact when the grids are aligned and approximate (by under a bin) otherwise.
    pub fn merge(&mut self, other: &Histogram) -> Result<()> {
        if other.kind != self.kind || other.nbins != self.nbins {
            return Err(tensor_error(
                &self.name,
                "cannot merge histograms of different kinds or sizes",
            ));
        }
        if other.count == 0 {
            return Ok(());
        }
        let Some(og) = other.grid else {
            // Every value of `other` equals its min (or |x| is 0): replay them as one value.
            let v = if self.kind == HistKind::Abs {
                0.0
            } else {
                other.min
            };
            let before = (self.count, self.zeros);
            self.observe(&[v])?;
            self.count = before.0;
            self.zeros = before.1 + other.zeros;
            self.add_at(v, other.count - 1);
            self.count += other.count;
            self.min = self.min.min(other.min);
            self.max = self.max.max(other.max);
            return Ok(());
        };
        let (lo, hi) = (og.lo as f32, og.top(self.nbins) as f32);
        let before = (self.count, self.min, self.max, self.zeros);
        // Establish or grow the grid over the other's span without counting anything.
        self.observe(&[lo, hi])?;
        self.unadd(lo);
        self.unadd(hi);
        self.count = before.0 + other.count;
        self.zeros = before.3 + other.zeros;
        self.min = before.1.min(other.min);
        self.max = before.2.max(other.max);
        for (i, c) in other.bins().into_iter().enumerate() {
            if c > 0 {
                self.add_at((og.lo + (i as f64 + 0.5) * og.width) as f32, c);
            }
        }
        Ok(())
    }

    pub(super) fn view(&self) -> Result<HistView> {
        if self.count == 0 {
            return Err(tensor_error(&self.name, "no values observed"));
        }
        let g = self.grid.unwrap_or(Grid {
            lo: 0.0,
            width: 0.0,
        });
        Ok(HistView {
            kind: self.kind,
            lo: g.lo,
            width: g.width,
            bins: if self.grid.is_some() {
                self.bins()
            } else {
                Vec::new()
            },
            total: self.count,
            zeros: self.zeros,
            min: self.min,
            max: self.max,
        })
    }

    /// Range of the values to bin: `[0, max |x|]` or `[min, max]` of this batch.
    fn value_span(&self, lo: f32, hi: f32) -> (f64, f64) {
        match self.kind {
            HistKind::Abs => (0.0, f64::from(lo.abs().max(hi.abs()))),
            HistKind::Signed => (f64::from(lo), f64::from(hi)),
        }
    }

    /// Grows the grid so it covers `[lo, hi]`, merging bins by an integer factor. Bookkeeping is
    /// in f64 so absurd growth factors saturate instead of overflowing.
    fn grow_to(&mut self, lo: f64, hi: f64) {
        let Some(g) = self.grid else { return };
        let n = self.nbins as f64;
        let top = g.top(self.nbins);
        if lo >= g.lo && hi <= top {
            return;
        }
        // Old-bin units needed below and above the current grid.
        let below = ((g.lo - lo) / g.width).ceil().max(0.0);
        let above = ((hi - top) / g.width).ceil().max(0.0);
        let needed = below + n + above;
        let mut m = (needed / n).ceil().max(2.0);
        let new = loop {
            let slack = n * m - needed;
            // Spread spare room evenly so a signed histogram can grow either way later.
            let shift = match self.kind {
                HistKind::Abs => 0.0,
                HistKind::Signed => below + (slack / 2.0).floor(),
            };
            let new = Grid {
                lo: g.lo - shift * g.width,
                width: g.width * m,
            };
            if new.lo <= lo && new.top(self.nbins) >= hi {
                break (new, shift, m);
            }
            m = (m * 1.0001).ceil().max(m + 1.0);
        };
        let (grid, shift, m) = new;
        let mut counts = vec![0u64; LANES * self.nbins];
        let last = self.nbins - 1;
        for (old, fresh) in self
            .counts
            .chunks_exact(self.nbins)
            .zip(counts.chunks_exact_mut(self.nbins))
        {
            for (k, &c) in old.iter().enumerate() {
                if c > 0 {
                    let j = ((k as f64 + shift) / m).floor() as usize;
                    fresh[j.min(last)] += c;
                }
            }
        }
        self.counts = counts;
        self.grid = Some(grid);
    }

    /// Bin of `v` (already `|x|` for an abs histogram), computed exactly as the binning loop does.
    fn bin_of(&self, g: Grid, v: f32) -> usize {
        let (lo, inv, last) = g.index_consts(self.nbins);
        bin_index(v, lo, inv, last) as usize
    }

    fn add_at(&mut self, v: f32, c: u64) {
        if let Some(g) = self.grid {
            let v = if self.kind == HistKind::Abs {
                v.abs()
            } else {
                v
            };
            let b = self.bin_of(g, v);
            self.counts[b] += c;
        }
    }

    fn unadd(&mut self, v: f32) {
        if let Some(g) = self.grid {
            let v = if self.kind == HistKind::Abs {
                v.abs()
            } else {
                v
            };
            let b = self.bin_of(g, v);
            // The value went to some lane: take it back from one that has a count there.
            for lane in 0..LANES {
                let i = lane * self.nbins + b;
                if self.counts[i] > 0 {
                    self.counts[i] -= 1;
                    return;
                }
            }
        }
    }

    /// Bins `x` onto the current grid: indices in a vectorisable pass, then counting.
    fn accumulate(&mut self, x: &[f32]) {
        let Some(g) = self.grid else { return };
        let n = self.nbins;
        let (lo, inv, last) = g.index_consts(n);
        let abs = self.kind == HistKind::Abs;
        let mut idx = [0u32; CHUNK];
        let (c0, rest) = self.counts.split_at_mut(n);
        let (c1, rest) = rest.split_at_mut(n);
        let (c2, c3) = rest.split_at_mut(n);
        for chunk in x.chunks(CHUNK) {
            let idx = &mut idx[..chunk.len()];
            if abs {
                for (i, &v) in idx.iter_mut().zip(chunk) {
                    *i = bin_index(v.abs(), lo, inv, last);
                }
            } else {
                for (i, &v) in idx.iter_mut().zip(chunk) {
                    *i = bin_index(v, lo, inv, last);
                }
            }
            let quads = idx.chunks_exact(4);
            let tail = quads.remainder();
            // After ReLU most values are zeros in runs, all in bin 0 of an |x| histogram:
            // incrementing one memory location per value serialises on it, so quads that
            // fall entirely into bin 0 are only counted.
            let mut bin0_quads = 0u64;
            for q in quads {
                if q[0] | q[1] | q[2] | q[3] == 0 {
                    bin0_quads += 1;
                    continue;
                }
                c0[q[0] as usize] += 1;
                c1[q[1] as usize] += 1;
                c2[q[2] as usize] += 1;
                c3[q[3] as usize] += 1;
            }
            c0[0] += 4 * bin0_quads;
            for &i in tail {
                c0[i as usize] += 1;
            }
        }
    }
}

impl Grid {
    fn spanning(lo: f64, hi: f64, nbins: usize) -> Grid {
        // A floor on the width keeps 1/width finite in f32 for absurdly narrow ranges.
        let width = ((hi - lo) / nbins as f64).max(f64::from(f32::MIN_POSITIVE));
        Grid { lo, width }
    }

    fn top(&self, nbins: usize) -> f64 {
        self.lo + self.width * nbins as f64
    }

    /// f32 constants of the binning loop: left edge, 1 / width, last bin index.
    fn index_consts(&self, nbins: usize) -> (f32, f32, f32) {
        (
            self.lo as f32,
            (1.0 / self.width) as f32,
            (nbins - 1) as f32,
        )
    }
}

/// `floor((v - lo) / width)` clamped to the grid, in f32 so the binning loop vectorises:
/// plain compares map to `maxps`/`minps` and the unchecked conversion to `cvttps2dq` (a
/// saturating `as` cast is scalarised, tripling the cost of a histogram update).
#[inline]
fn bin_index(v: f32, lo: f32, inv: f32, last: f32) -> u32 {
    let t = (v - lo) * inv;
    // NaN fails the first compare and becomes 0; +inf is caught by the second.
    let t = if t > 0.0 { t } else { 0.0 };
    let t = if t < last { t } else { last };
    // SAFETY: `t` is finite and in `[0, last]`, with `last < 2^31`, so it is representable.
    unsafe { t.to_int_unchecked::<i32>() as u32 }
}

impl Observer for Histogram {
    fn observe(&mut self, x: &[f32]) -> Result<()> {
        if x.is_empty() {
            return Ok(());
        }
        let (blo, bhi) = min_max(x);
        if !blo.is_finite() || !bhi.is_finite() {
            check_finite(x, &self.name)?;
        }
        let pending = self.count;
        let pending_value = self.min;
        self.min = self.min.min(blo);
        self.max = self.max.max(bhi);
        self.count += x.len() as u64;
        self.zeros += x.iter().filter(|&&v| v == 0.0).count() as u64;
        match self.grid {
            Some(_) => {
                let (lo, hi) = self.value_span(blo, bhi);
                self.grow_to(lo, hi);
            }
            None => {
                let (lo, hi) = self.value_span(self.min, self.max);
                if hi <= lo {
                    // Still degenerate (all |x| are 0, or all x equal): the grid waits for a
                    // spread; until then min == max describes every value seen.
                    return Ok(());
                }
                self.grid = Some(Grid::spanning(lo, hi, self.nbins));
                if pending > 0 {
                    let v = if self.kind == HistKind::Abs {
                        0.0
                    } else {
                        pending_value
                    };
                    self.add_at(v, pending);
                }
            }
        }
        self.accumulate(x);
        Ok(())
    }

    fn count(&self) -> u64 {
        self.count
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn abs_histogram_bins_and_total() {
        let mut h = Histogram::new("x", HistKind::Abs, 4).unwrap();
        h.observe(&[-4.0, 0.5, 1.5, -2.5, 3.9, 0.0]).unwrap();
        assert_eq!(h.grid(), Some((0.0, 1.0)));
        assert_eq!(h.bins(), vec![2, 1, 1, 2]);
        assert_eq!(h.count(), 6);
        assert_eq!(
            h.observed_range().unwrap(),
            Range {
                min: -4.0,
                max: 3.9
            }
        );
    }

    #[test]
    fn growth_rebins_exactly() {
        let mut h = Histogram::new("x", HistKind::Abs, 4).unwrap();
        h.observe(&[0.5, 1.5, 2.5, 4.0]).unwrap();
        // 9 needs 3 times the width: new bins of width 3 over [0, 12).
        h.observe(&[9.0]).unwrap();
        assert_eq!(h.grid(), Some((0.0, 3.0)));
        assert_eq!(h.bins(), vec![3, 1, 0, 1]);
        // Same data at once, on a grid fixed to [0, 12): same counts.
        let mut g = Histogram::with_range("x", HistKind::Abs, 4, 0.0, 12.0).unwrap();
        g.observe(&[0.5, 1.5, 2.5, 4.0, 9.0]).unwrap();
        assert_eq!(g.bins(), h.bins());
    }

    #[test]
    fn signed_growth_both_ways() {
        let mut h = Histogram::new("x", HistKind::Signed, 4).unwrap();
        h.observe(&[0.0, 4.0]).unwrap(); // width 1 over [0, 4)
        assert_eq!(h.bins(), vec![1, 0, 0, 1]);
        h.observe(&[-3.0]).unwrap(); // needs 3 below: 7 units -> m = 2, slack 1 split as 0
        let (lo, w) = h.grid().unwrap();
        assert_eq!(w, 2.0);
        assert!(lo <= -3.0 && lo + 4.0 * w >= 4.0);
        assert_eq!(h.bins().iter().sum::<u64>(), 3);
        let mut big = Histogram::new("x", HistKind::Signed, 2048).unwrap();
        for k in 0..50 {
            let s = 1.3f32.powi(k);
            big.observe(&[-s, 0.25 * s, s * 0.9]).unwrap();
        }
        let (lo, w) = big.grid().unwrap();
        let r = big.observed_range().unwrap();
        assert!(lo <= f64::from(r.min) && lo + 2048.0 * w >= f64::from(r.max));
        assert_eq!(big.bins().iter().sum::<u64>(), 150);
    }

    #[test]
    fn degenerate_data_waits_for_a_spread() {
        let mut h = Histogram::new("x", HistKind::Abs, 8).unwrap();
        h.observe(&[0.0; 100]).unwrap();
        assert_eq!(h.grid(), None);
        h.observe(&[8.0]).unwrap();
        assert_eq!(h.bins()[0], 100);
        assert_eq!(h.bins()[7], 1);
        let mut s = Histogram::new("x", HistKind::Signed, 8).unwrap();
        s.observe(&[2.0; 3]).unwrap();
        s.observe(&[2.0; 3]).unwrap();
        s.observe(&[-6.0]).unwrap();
        assert_eq!(s.bins()[7], 6);
        assert_eq!(s.bins()[0], 1);
    }

    #[test]
    fn errors_name_the_tensor_and_leave_state_alone() {
        let mut h = Histogram::new("relu3", HistKind::Abs, 16).unwrap();
        h.observe(&[1.0, 2.0]).unwrap();
        let before = h.bins();
        let msg = h
            .observe(&[1.0, f32::NEG_INFINITY])
            .unwrap_err()
            .to_string();
        assert!(msg.contains("relu3"), "{msg}");
        assert_eq!(h.bins(), before);
        assert_eq!(h.count(), 2);
        assert!(Histogram::new("x", HistKind::Abs, 1).is_err());
        assert!(Histogram::with_range("x", HistKind::Abs, 8, -1.0, 1.0).is_err());
    }

    #[test]
    fn merge_of_aligned_histograms_is_exact() {
        let data: Vec<f32> = (0..1000)
            .map(|i| ((i * 37 % 101) as f32) * 0.1 - 3.0)
            .collect();
        let mut whole = Histogram::with_range("x", HistKind::Signed, 64, -3.2, 9.6).unwrap();
        whole.observe(&data).unwrap();
        let mut a = Histogram::with_range("x", HistKind::Signed, 64, -3.2, 9.6).unwrap();
        let mut b = a.clone();
        a.observe(&data[..400]).unwrap();
        b.observe(&data[400..]).unwrap();
        a.merge(&b).unwrap();
        assert_eq!(a.bins(), whole.bins());
        assert_eq!(a.count(), 1000);
        assert_eq!(a.observed_range().unwrap(), whole.observed_range().unwrap());
        // A histogram that never got a spread (all zeros) merges as repeated zeros.
        let mut zeros = Histogram::new("x", HistKind::Signed, 64).unwrap();
        zeros.observe(&[0.0; 5]).unwrap();
        let bin0 = a.bins()[a.bin_of(a.grid.unwrap(), 0.0)];
        a.merge(&zeros).unwrap();
        assert_eq!(a.count(), 1005);
        assert_eq!(a.bins()[a.bin_of(a.grid.unwrap(), 0.0)], bin0 + 5);
        assert!(a
            .merge(&Histogram::new("x", HistKind::Abs, 64).unwrap())
            .is_err());
    }
}
