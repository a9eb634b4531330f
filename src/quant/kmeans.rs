//! Weight sharing by 1-D k-means (Deep Compression, Han et al. 2016): a tensor's values are
//! replaced by the nearest of `k` shared centroids (`k = 2^b` for `b`-bit indices), stored as a
//! codebook plus one small index per weight.
//!
//! * [`lloyd`]: Lloyd's algorithm from centroids spread linearly over `[min, max]` (the
//!   initialisation Deep Compression found best, as it keeps the rare large weights).
//! * [`optimal`]: the exact minimum-SSE clustering by dynamic programming (Wang & Song's
//!   Ckmeans.1d.dp) with the divide-and-conquer speed-up that the monotone split points allow,
//!   `O(k n log n)` for `n` distinct values. Above `max_points` distinct values the DP runs on
//!   a weighted histogram of `max_points` equal-width bins (each bin one point at the mean of its
//!   values, weighted by their count): the result is optimal among clusterings that keep each
//!   bin whole, then refined by Lloyd steps on the full data.
//!
//! Both are deterministic. Centroids come out sorted; clusters are contiguous value ranges
//! and every weight gets the nearest centroid (ties to the lower one).

use crate::error::{Error, Result};
use crate::quant::linear::{check_finite, tensor_error};

/// Default largest number of distinct values the exact DP runs on before binning.
pub const DEFAULT_MAX_POINTS: usize = 4096;
/// Default cap on Lloyd iterations (each is `O(k log n)` here, so this is generous).
pub const DEFAULT_MAX_ITER: usize = 1000;

/// Shared centroids and the index of each weight's centroid.
#[derive(Clone, Debug, PartialEq)]
pub struct Codebook {
    /// Sorted ascending. At most `k`; fewer when the data has fewer distinct values.
    pub centroids: Vec<f32>,
    pub indices: Vec<u16>,
}

impl Codebook {
    /// The quantized weights, `centroids[indices[i]]`.
    pub fn reconstruct(&self) -> Vec<f32> {
        self.indices
            .iter()
            .map(|&i| self.centroids[usize::from(i)])
            .collect()
    }

    /// Sum of squared differences between `data` and the reconstruction, in f64.
    pub fn sse(&self, data: &[f32]) -> Result<f64> {
        check_len(data.len(), self.indices.len())?;
        Ok(data
            .iter()
            .zip(&self.indices)
            .map(|(&x, &i)| {
                let d = f64::from(x) - f64::from(self.centroids[usize::from(i)]);
                d * d
            })
            .sum())
    }

    /// Indices as bytes, for codebooks of at most 256 centroids.
    pub fn indices_u8(&self) -> Result<Vec<u8>> {
        if self.centroids.len() > 256 {
            return Err(Error::Data(format!(
                "{} centroids do not fit 8-bit indices",
                self.centroids.len()
            )));
        }
        Ok(self.indices.iter().map(|&i| i as u8).collect())
    }

    /// Number of weights per centroid.
    pub fn counts(&self) -> Vec<u64> {
        let mut c = vec![0u64; self.centroids.len()];
        for &i in &self.indices {
            c[usize::from(i)] += 1;
        }
        c
    }

    /// Per-centroid sums of per-weight gradients: the gradient of the loss with respect to
    /// each shared centroid, used to fine-tune the codebook (Deep Compression section 3.3).
    /// Accumulated in f64.
    pub fn cluster_grad_sums(&self, grads: &[f32]) -> Result<Vec<f32>> {
        check_len(grads.len(), self.indices.len())?;
        let mut sums = vec![0f64; self.centroids.len()];
        for (&g, &i) in grads.iter().zip(&self.indices) {
            sums[usize::from(i)] += f64::from(g);
        }
        Ok(sums.into_iter().map(|s| s as f32).collect())
    }

    /// Assigns every value of `data` to its nearest centroid of `centroids` (sorted ascending),
    /// ties to the lower one: the codebook of fixed centroids, e.g. after fine-tuning.
    pub fn assign(centroids: &[f32], data: &[f32], name: &str) -> Result<Codebook> {
        check_finite(data, name)?;
        check_k(centroids.len(), name)?;
        if centroids
            .windows(2)
            .any(|w| w[0].partial_cmp(&w[1]).is_none_or(|o| o.is_gt()))
        {
            return Err(tensor_error(name, "centroids must be sorted and finite"));
        }
        let c: Vec<f64> = centroids.iter().map(|&v| f64::from(v)).collect();
        let bounds = midpoints(&c);
        let indices = data
            .iter()
            .map(|&x| bounds.partition_point(|&b| b < f64::from(x)) as u16)
            .collect();
        Ok(Codebook {
            centroids: centroids.to_vec(),
            indices,
        })
    }
}

/// Lloyd's algorithm with `k` centroids linearly initialised over `[min, max]`, iterated until
/// no centroid moves or `max_iter` rounds. A cluster that empties keeps its centroid.
pub fn lloyd(data: &[f32], k: usize, max_iter: usize, name: &str) -> Result<Codebook> {
    let (x, w) = Points::distinct(data, name)?;
    let pts = Points::with_prefix(x, w);
    check_k(k, name)?;
    let (lo, hi) = (pts.x[0], pts.x[pts.x.len() - 1]);
    let init: Vec<f64> = if k == 1 {
        vec![lo]
    } else {
        (0..k)
            .map(|j| lo + (hi - lo) * j as f64 / (k - 1) as f64)
            .collect()
    };
    let centroids = pts.lloyd(init, max_iter);
    finish(&centroids, data, name)
}

/// Minimum-SSE clustering into `k` centroids (exact up to [`DEFAULT_MAX_POINTS`] distinct
/// values, see the module documentation).
pub fn optimal(data: &[f32], k: usize, name: &str) -> Result<Codebook> {
    optimal_with(data, k, DEFAULT_MAX_POINTS, name)
}

/// As [`optimal`], with the distinct-value limit above which the DP runs on a histogram.
pub fn optimal_with(data: &[f32], k: usize, max_points: usize, name: &str) -> Result<Codebook> {
    check_k(k, name)?;
    if max_points < 2 {
        return Err(tensor_error(name, "the k-means DP needs at least 2 points"));
    }
    let (x, w) = Points::distinct(data, name)?;
    let reduced = if x.len() > max_points {
        let (bx, bw) = bin(&x, &w, max_points);
        Some(Points::with_prefix(bx, bw))
    } else {
        None
    };
    let full = Points::with_prefix(x, w);
    let reduced = reduced.as_ref().unwrap_or(&full);
    let centroids = reduced.dp(k);
    // Lloyd steps on the full data only lower the SSE; on exact input they change nothing.
    let centroids = full.lloyd(centroids, DEFAULT_MAX_ITER);
    finish(&centroids, data, name)
}

/// Distinct sorted values with multiplicities, and prefix sums for O(1) cluster means and costs.
#[derive(Clone, Debug)]
struct Points {
    x: Vec<f64>,
    /// Prefix sums of `w`, `w (x - shift)` and `w (x - shift)^2`; the shift (the mean) keeps the
    /// `sum x^2 - (sum x)^2 / n` form from cancelling catastrophically.
    pw: Vec<f64>,
    px: Vec<f64>,
    pxx: Vec<f64>,
    shift: f64,
}

impl Points {
    /// Sorted distinct values of `data` with their multiplicities.
    fn distinct(data: &[f32], name: &str) -> Result<(Vec<f64>, Vec<f64>)> {
        if data.is_empty() {
            return Err(tensor_error(name, "cannot cluster an empty tensor"));
        }
        check_finite(data, name)?;
        let mut sorted = data.to_vec();
        sorted.sort_unstable_by(f32::total_cmp);
        let (mut x, mut w) = (Vec::new(), Vec::new());
        for &v in &sorted {
            let v = f64::from(v);
            if x.last() == Some(&v) {
                if let Some(c) = w.last_mut() {
                    *c += 1.0;
                }
            } else {
                x.push(v);
                w.push(1.0);
            }
        }
        Ok((x, w))
    }

    fn with_prefix(x: Vec<f64>, w: Vec<f64>) -> Points {
        let total: f64 = w.iter().sum();
        let shift = x.iter().zip(&w).map(|(a, b)| a * b).sum::<f64>() / total;
        let n = x.len();
        let (mut pw, mut px, mut pxx) = (vec![0.0; n + 1], vec![0.0; n + 1], vec![0.0; n + 1]);
        for i in 0..n {
            let d = x[i] - shift;
            pw[i + 1] = pw[i] + w[i];
            px[i + 1] = px[i] + w[i] * d;
            pxx[i + 1] = pxx[i] + w[i] * d * d;
        }
        Points {
            x,
            pw,
            px,
            pxx,
            shift,
        }
    }

    /// Weighted SSE of points `l..r` around their mean.
    #[inline]
    fn cost(&self, l: usize, r: usize) -> f64 {
        let w = self.pw[r] - self.pw[l];
        if w <= 0.0 {
            return 0.0;
        }
        let s = self.px[r] - self.px[l];
        (self.pxx[r] - self.pxx[l] - s * s / w).max(0.0)
    }

    /// Weighted mean of points `l..r` (non-empty), in O(1).
    fn mean(&self, l: usize, r: usize) -> f64 {
        self.shift + (self.px[r] - self.px[l]) / (self.pw[r] - self.pw[l])
    }

    /// Lloyd iterations from sorted centroids `c`: each cluster is the run of points nearest
    /// to its centroid, found by binary search on the midpoints.
    fn lloyd(&self, mut c: Vec<f64>, max_iter: usize) -> Vec<f64> {
        for _ in 0..max_iter {
            let bounds = midpoints(&c);
            let mut start = 0;
            let mut moved = false;
            for j in 0..c.len() {
                let end = if j + 1 == c.len() {
                    self.x.len()
                } else {
                    self.x.partition_point(|&v| v <= bounds[j])
                };
                if end > start {
                    let m = self.mean(start, end);
                    moved |= m != c[j];
                    c[j] = m;
                }
                start = end.max(start);
            }
            if !moved {
                break;
            }
        }
        c
    }

    /// Exact minimum-SSE split of the points into `min(k, n)` contiguous clusters; returns
    /// their means.
    fn dp(&self, k: usize) -> Vec<f64> {
        let n = self.x.len();
        let k = k.min(n);
        // prev[i] = best cost of points 0..=i in j-1 clusters; split[j][i] = first point of
        // the last cluster in the best solution for points 0..=i in j+1 clusters.
        let mut prev: Vec<f64> = (0..n).map(|i| self.cost(0, i + 1)).collect();
        let mut cur = vec![0f64; n];
        let mut split = vec![0u32; k * n];
        for j in 1..k {
            let row = &mut split[j * n..(j + 1) * n];
            // Points j..n can end a j+1-cluster solution; the last cluster starts at >= j.
            self.fill_row(&prev, &mut cur, row, j, j, n - 1, j, n - 1);
            std::mem::swap(&mut prev, &mut cur);
        }
        let mut bounds = vec![n; k + 1];
        let mut end = n;
        for j in (0..k).rev() {
            let start = if j == 0 {
                0
            } else {
                split[j * n + end - 1] as usize
            };
            bounds[j] = start;
            end = start;
        }
        (0..k)
            .map(|j| self.mean(bounds[j], bounds[j + 1]))
            .collect()
    }

    /// Divide and conquer over `i in [ilo, ihi]`: the best start of the last cluster is
    /// monotone in `i`, so the middle row's argmin bounds both halves' searches.
    #[allow(clippy::too_many_arguments)]
    fn fill_row(
        &self,
        prev: &[f64],
        cur: &mut [f64],
        row: &mut [u32],
        j: usize,
        ilo: usize,
        ihi: usize,
        optlo: usize,
        opthi: usize,
    ) {
        if ilo > ihi {
            return;
        }
        let mid = (ilo + ihi) / 2;
        let mut best = (f64::INFINITY, optlo);
        for l in optlo.max(j)..=opthi.min(mid) {
            let v = prev[l - 1] + self.cost(l, mid + 1);
            if v < best.0 {
                best = (v, l);
            }
        }
        cur[mid] = best.0;
        row[mid] = best.1 as u32;
        if mid > ilo {
            self.fill_row(prev, cur, row, j, ilo, mid - 1, optlo, best.1);
        }
        self.fill_row(prev, cur, row, j, mid + 1, ihi, best.1, opthi);
    }
}

/// Equal-width histogram of weighted sorted points, each non-empty bin one point at its mean.
fn bin(x: &[f64], w: &[f64], nbins: usize) -> (Vec<f64>, Vec<f64>) {
    let (lo, hi) = (x[0], x[x.len() - 1]);
    let width = (hi - lo) / nbins as f64;
    let (mut bx, mut bw) = (Vec::with_capacity(nbins), Vec::with_capacity(nbins));
    let mut cur = usize::MAX;
    let (mut sw, mut swx) = (0.0, 0.0);
    for (&v, &c) in x.iter().zip(w) {
        let b = (((v - lo) / width) as usize).min(nbins - 1);
        if b != cur && sw > 0.0 {
            bx.push(swx / sw);
            bw.push(sw);
            sw = 0.0;
            swx = 0.0;
        }
        cur = b;
        sw += c;
        swx += c * v;
    }
    bx.push(swx / sw);
    bw.push(sw);
    (bx, bw)
}

fn midpoints(c: &[f64]) -> Vec<f64> {
    c.windows(2).map(|p| 0.5 * (p[0] + p[1])).collect()
}

/// Sorts and dedups exactly equal centroids (possible after empty clusters or constant data),
/// then assigns every weight.
fn finish(centroids: &[f64], data: &[f32], name: &str) -> Result<Codebook> {
    let mut c: Vec<f32> = centroids.iter().map(|&v| v as f32).collect();
    c.sort_unstable_by(f32::total_cmp);
    c.dedup();
    Codebook::assign(&c, data, name)
}

fn check_k(k: usize, name: &str) -> Result<()> {
    if !(1..=65536).contains(&k) {
        return Err(tensor_error(
            name,
            format!("k-means needs 1 to 65536 centroids, got {k}"),
        ));
    }
    Ok(())
}

fn check_len(a: usize, b: usize) -> Result<()> {
    if a != b {
        return Err(Error::Shape(format!(
            "{a} values given for a codebook of {b} weights"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::test_rng::Rng;

    /// Minimum SSE over all splits of sorted `x` into `k` contiguous non-empty groups.
    fn brute_force(x: &[f32], k: usize) -> f64 {
        let mut s: Vec<f64> = x.iter().map(|&v| f64::from(v)).collect();
        s.sort_by(f64::total_cmp);
        fn sse(v: &[f64]) -> f64 {
            let m = v.iter().sum::<f64>() / v.len() as f64;
            v.iter().map(|a| (a - m) * (a - m)).sum()
        }
        fn go(v: &[f64], k: usize) -> f64 {
            if k == 1 {
                return sse(v);
            }
            (1..=v.len() - (k - 1))
                .map(|i| sse(&v[..i]) + go(&v[i..], k - 1))
                .fold(f64::INFINITY, f64::min)
        }
        go(&s, k.min(s.len()))
    }

    #[test]
    fn dp_equals_brute_force_on_small_inputs() {
        let mut rng = Rng::new(1);
        for n in [1, 2, 5, 9, 12] {
            for k in [1, 2, 3, 4] {
                let x: Vec<f32> = (0..n).map(|_| rng.gaussian()).collect();
                let cb = optimal(&x, k, "w").unwrap();
                let got = cb.sse(&x).unwrap();
                let want = brute_force(&x, k);
                assert!(
                    (got - want).abs() <= 1e-5 * (1.0 + want),
                    "n={n} k={k}: {got} vs {want}"
                );
            }
        }
        // With repeated values the distinct-value weighting must count them.
        let x = [0.0, 0.0, 0.0, 1.0, 1.0, 5.0, 6.0, 6.0];
        let cb = optimal(&x, 3, "w").unwrap();
        assert!((cb.sse(&x).unwrap() - brute_force(&x, 3)).abs() < 1e-9);
        assert_eq!(cb.centroids, [0.0, 1.0, 5.6666665]);
    }

    #[test]
    fn dp_is_never_worse_than_lloyd() {
        let mut rng = Rng::new(2);
        for trial in 0..6 {
            let n = 500 + 300 * trial;
            // A mixture so Lloyd's linear start has local optima to fall into.
            let x: Vec<f32> = (0..n)
                .map(|i| rng.gaussian() * 0.1 + if i % 7 == 0 { 3.0 } else { 0.0 })
                .collect();
            for bits in [1, 2, 3, 4] {
                let k = 1 << bits;
                let l = lloyd(&x, k, DEFAULT_MAX_ITER, "w")
                    .unwrap()
                    .sse(&x)
                    .unwrap();
                let d = optimal(&x, k, "w").unwrap().sse(&x).unwrap();
                assert!(
                    d <= l * (1.0 + 1e-9),
                    "trial {trial} k={k}: dp {d} lloyd {l}"
                );
            }
        }
    }

    #[test]
    fn lloyd_linear_init_two_clusters() {
        // Init at 0 and 10; clusters {0,1,2} and {9,10} -> 1 and 9.5.
        let x = [0.0, 1.0, 2.0, 9.0, 10.0];
        let cb = lloyd(&x, 2, 100, "w").unwrap();
        assert_eq!(cb.centroids, [1.0, 9.5]);
        assert_eq!(cb.indices, [0, 0, 0, 1, 1]);
        assert_eq!(cb.reconstruct(), [1.0, 1.0, 1.0, 9.5, 9.5]);
        assert_eq!(cb.counts(), [3, 2]);
        assert_eq!(cb.indices_u8().unwrap(), [0, 0, 0, 1, 1]);
        assert_eq!(
            cb.cluster_grad_sums(&[0.1, 0.2, 0.3, -1.0, 0.5]).unwrap(),
            [0.6, -0.5]
        );
        assert!(cb.cluster_grad_sums(&[0.0]).is_err());
    }

    #[test]
    fn degenerate_inputs() {
        let cb = optimal(&[2.5; 10], 16, "w").unwrap();
        assert_eq!(cb.centroids, [2.5]);
        assert_eq!(cb.sse(&[2.5; 10]).unwrap(), 0.0);
        let cb = lloyd(&[2.5; 10], 16, 10, "w").unwrap();
        assert_eq!(cb.centroids, [2.5]);
        assert!(optimal(&[], 4, "w").is_err());
        let e = lloyd(&[1.0, f32::NAN], 4, 10, "fc2.weight")
            .unwrap_err()
            .to_string();
        assert!(e.contains("fc2.weight"), "{e}");
        assert!(optimal(&[1.0], 0, "w").is_err());
        assert!(Codebook::assign(&[1.0, 0.0], &[0.5], "w").is_err());
        let cb = Codebook::assign(&[0.0, 1.0], &[0.5, 0.2, 0.9], "w").unwrap();
        assert_eq!(cb.indices, [0, 0, 1]); // the tie at 0.5 goes down
    }

    #[test]
    fn binned_dp_on_many_distinct_values() {
        let mut rng = Rng::new(3);
        let x = rng.gaussians(60_000);
        let d = optimal_with(&x, 16, 1024, "w").unwrap();
        let l = lloyd(&x, 16, DEFAULT_MAX_ITER, "w").unwrap();
        let (sd, sl) = (d.sse(&x).unwrap(), l.sse(&x).unwrap());
        assert!(sd <= sl * 1.001, "binned dp {sd} vs lloyd {sl}");
        // 4-bit Lloyd-Max quantizer of N(0,1): MSE 0.009497 (Max 1960).
        let mse = sd / x.len() as f64;
        assert!((mse - 0.0095).abs() < 0.0006, "{mse}");
        assert_eq!(d.centroids.len(), 16);
    }
}
