//! The candidate search of the KL (entropy) threshold rule (see
//! [`super::Histogram::entropy_range`] for the rule itself).
//!
//! Written out directly, every candidate `i` builds `P` and `Q` over `i` bins and takes one
//! logarithm per bin: O(n^2) logarithms for `n` bins, ~15 ms per tensor at 2048 bins. Because
//! the histogram holds integer counts, the divergence splits into sums that are prefix sums
//! over bins or fixed for all candidates sharing a group width, plus a power series in the
//! smoothing constants (which are tiny when the histogram is dense). Each candidate then costs
//! O(1): the last group and the last bin are the only parts computed directly. Candidates where
//! the series would converge slowly (sparse histograms, where smoothing takes a large share
//! from few bins) are computed directly, as before.
//!
//! The two routes agree to ~1e-12 in the divergence (test below); the direct one stays the
//! reference, matching the textbook construction to the bit.

use rayon::prelude::*;

/// Smoothing constant: zero bins get this much mass, taken evenly from the non-zero bins
/// (MXNet's and ONNX Runtime's `_smooth_distribution`).
const KL_EPS: f64 = 1e-4;
/// TensorRT's first candidate threshold bin (of 2048): KL never clips below 1/16 of the maximum.
pub(super) const MIN_KL_CANDIDATE_BINS: usize = 128;
/// Threshold candidates per parallel task.
const KL_CANDIDATES_PER_TASK: usize = 64;
/// Terms kept of the series in `u = t / x` (smoothing share `t` over a count or group mean `x`).
const SERIES_TERMS: usize = 10;
/// Largest `u` the series is used for: the remainder, below `u^11 / (11 (1 - u))`, is then
/// ~1e-12 in KL units (absolute), under the differences between neighbouring candidates seen
/// on real histograms; exact ties closer than that could resolve differently from the direct
/// construction.
const SERIES_MAX_RATIO: f64 = 0.1;

/// The candidate bin count `i` in `first..=n` minimising `KL(P || Q)` over the histogram `h`
/// (integer counts, exact zeros removed), ties to the smaller `i`; `n` when no candidate is
/// valid.
pub(super) fn best_candidate(h: &[f64], levels: usize, first: usize) -> usize {
    let n = h.len();
    let prefix = Prefix::new(h);
    // Group tables for every group width the candidates use.
    let widths: Vec<GroupTable> = (first / levels..=n / levels)
        .map(|m| GroupTable::new(&prefix, m, levels))
        .collect();
    let candidates: Vec<usize> = (first..=n).collect();
    // Blocks of candidates run in parallel, each keeping its first minimum; blocks combine in
    // order, so ties still go to the smaller `i`.
    let (_, best) = candidates
        .par_chunks(KL_CANDIDATES_PER_TASK)
        .map(|block| {
            let mut scratch: Option<(Vec<f64>, Vec<f64>)> = None;
            let mut best = (f64::INFINITY, n);
            for &i in block {
                let table = &widths[i / levels - first / levels];
                let kl = match fast_candidate(&prefix, table, i, levels) {
                    Fast::Value(kl) => Some(kl),
                    Fast::Invalid => None,
                    Fast::SlowSeries => {
                        let (p, q) = scratch.get_or_insert_with(|| (vec![0.0; n], vec![0.0; n]));
                        kl_candidate(h, &prefix.outliers, i, levels, p, q)
                    }
                };
                if let Some(kl) = kl {
                    if kl < best.0 {
                        best = (kl, i);
                    }
                }
            }
            best
        })
        .reduce(|| (f64::INFINITY, n), |a, b| if b.0 < a.0 { b } else { a });
    best
}

/// Sums over bins `[0, k)` at index `k`, of the non-zero counts `x` only.
struct Prefix {
    /// `outliers[k]`: all counts from bin `k` on.
    outliers: Vec<f64>,
    count: Vec<f64>,
    nonzero: Vec<usize>,
    x_ln_x: Vec<f64>,
    ln_x: Vec<f64>,
    /// `inv_pow[k][j - 1]`: sum of `x^-j`.
    inv_pow: Vec<[f64; SERIES_TERMS]>,
    /// Smallest non-zero count (infinite when there is none).
    min: Vec<f64>,
}

impl Prefix {
    fn new(h: &[f64]) -> Prefix {
        let n = h.len();
        let mut outliers = vec![0f64; n + 1];
        for k in (0..n).rev() {
            outliers[k] = outliers[k + 1] + h[k];
        }
        let mut p = Prefix {
            outliers,
            count: Vec::with_capacity(n + 1),
            nonzero: Vec::with_capacity(n + 1),
            x_ln_x: Vec::with_capacity(n + 1),
            ln_x: Vec::with_capacity(n + 1),
            inv_pow: Vec::with_capacity(n + 1),
            min: Vec::with_capacity(n + 1),
        };
        let (mut count, mut nonzero, mut x_ln_x, mut ln_x) = (0.0, 0, 0.0, 0.0);
        let mut inv_pow = [0f64; SERIES_TERMS];
        let mut min = f64::INFINITY;
        for k in 0..=n {
            p.count.push(count);
            p.nonzero.push(nonzero);
            p.x_ln_x.push(x_ln_x);
            p.ln_x.push(ln_x);
            p.inv_pow.push(inv_pow);
            p.min.push(min);
            let Some(&x) = h.get(k) else { break };
            count += x;
            if x != 0.0 {
                nonzero += 1;
                let l = x.ln();
                x_ln_x += x * l;
                ln_x += l;
                let mut r = 1.0;
                for s in &mut inv_pow {
                    r /= x;
                    *s += r;
                }
                min = min.min(x);
            }
        }
        p
    }

    /// Count and number of non-zero bins of `[a, b)`.
    fn range(&self, a: usize, b: usize) -> (f64, usize) {
        (
            self.count[b] - self.count[a],
            self.nonzero[b] - self.nonzero[a],
        )
    }
}

/// The groups of width `m` before the last one (`levels - 1` of them), which every candidate
/// with `i / levels == m` shares. Sums run over groups with data (`c > 0` non-zero bins, total
/// `T`, mean `s = T / c`).
struct GroupTable {
    /// Sum of `T ln s`.
    t_ln_s: f64,
    /// Sum of `c ln s`.
    c_ln_s: f64,
    /// Sum of `T s^-j` for `j = 1..`.
    t_inv: [f64; SERIES_TERMS],
    /// Sum of `c s^-j`.
    c_inv: [f64; SERIES_TERMS],
    /// Sum of `c`.
    nonzero: usize,
    /// Smallest `s`.
    min_share: f64,
}

impl GroupTable {
    fn new(prefix: &Prefix, m: usize, levels: usize) -> GroupTable {
        let mut g = GroupTable {
            t_ln_s: 0.0,
            c_ln_s: 0.0,
            t_inv: [0.0; SERIES_TERMS],
            c_inv: [0.0; SERIES_TERMS],
            nonzero: 0,
            min_share: f64::INFINITY,
        };
        for j in 0..levels - 1 {
            let (total, c) = prefix.range(j * m, (j + 1) * m);
            if c == 0 {
                continue;
            }
            let c_f = c as f64;
            let s = total / c_f;
            let l = s.ln();
            g.t_ln_s += total * l;
            g.c_ln_s += c_f * l;
            let mut r = 1.0;
            for k in 0..SERIES_TERMS {
                r /= s;
                g.t_inv[k] += total * r;
                g.c_inv[k] += c_f * r;
            }
            g.nonzero += c;
            g.min_share = g.min_share.min(s);
        }
        g
    }
}

enum Fast {
    Value(f64),
    /// Smoothing would make a bin non-positive: not a candidate.
    Invalid,
    /// The series would converge too slowly: compute this candidate directly.
    SlowSeries,
}

/// `KL(P || Q)` of candidate `i` from the prefix sums and group table.
///
/// With `p'`, `q'` the smoothed distributions (zero bins `eps` in both, non-zero bins less the
/// shares `tp` and `tq`), `sp = sum p'` and `sq = sum q'`:
/// `KL * sp = sum p' ln p' - sum p' ln q' + sp ln(sq / sp)`. The zero bins' `eps ln eps` terms
/// cancel; `sp` is the whole histogram and `sq` the counts below bin `i` (smoothing moves
/// mass without changing totals). Over non-zero counts `x >= 1`,
/// `(x - t) ln(x - t) = x ln x - t ln x - t + sum_j t^(j+1) / (j (j+1) x^j)`, and over a group
/// of mean `s`, `ln(s - tq) = ln s - sum_j (tq / s)^j / j`: both are sums of prefix or table
/// entries.
fn fast_candidate(prefix: &Prefix, groups: &GroupTable, i: usize, levels: usize) -> Fast {
    let n = prefix.count.len() - 1;
    let m = i / levels;
    let last_bin = prefix.count[i] - prefix.count[i - 1] + prefix.outliers[i];
    let last_nonzero = usize::from(last_bin != 0.0);
    let p_nonzero = prefix.nonzero[i - 1] + last_nonzero;
    if p_nonzero == 0 {
        return Fast::Invalid;
    }
    // The last group [(levels - 1) m, i): its Q total leaves the outliers out, its P total
    // does not.
    let start = (levels - 1) * m;
    let (last_total, before_last_bin) = prefix.range(start, i - 1);
    let last_total = last_total + (prefix.count[i] - prefix.count[i - 1]);
    let last_c = before_last_bin + last_nonzero;
    let last_share = if last_c > 0 {
        last_total / last_c as f64
    } else {
        0.0
    };
    let q_nonzero = groups.nonzero + if last_share != 0.0 { last_c } else { 0 };
    if q_nonzero == 0 {
        return Fast::Invalid;
    }
    let tp = KL_EPS * (i - p_nonzero) as f64 / p_nonzero as f64;
    let tq = KL_EPS * (i - q_nonzero) as f64 / q_nonzero as f64;
    let min_p = if last_nonzero == 1 {
        prefix.min[i - 1].min(last_bin)
    } else {
        prefix.min[i - 1]
    };
    if min_p <= tp || groups.min_share <= tq || (last_share != 0.0 && last_share <= tq) {
        return Fast::Invalid;
    }
    if tp > SERIES_MAX_RATIO * prefix.min[i - 1] || tq > SERIES_MAX_RATIO * groups.min_share {
        return Fast::SlowSeries;
    }
    // sum p' ln p' over non-zero bins before the last one, then the last one.
    let k = i - 1;
    let mut p_ln_p = prefix.x_ln_x[k] - tp * prefix.ln_x[k] - tp * prefix.nonzero[k] as f64;
    let mut tp_pow = tp;
    for (j, inv) in prefix.inv_pow[k].iter().enumerate() {
        tp_pow *= tp;
        let j = (j + 1) as f64;
        p_ln_p += tp_pow / (j * (j + 1.0)) * inv;
    }
    if last_nonzero == 1 {
        let x = last_bin - tp;
        p_ln_p += x * x.ln();
    }
    // sum p' ln q' over non-zero bins: shared groups, then the last group.
    let mut p_ln_q = groups.t_ln_s - tp * groups.c_ln_s;
    let mut tq_pow = 1.0;
    for j in 0..SERIES_TERMS {
        tq_pow *= tq;
        p_ln_q -= tq_pow / (j + 1) as f64 * (groups.t_inv[j] - tp * groups.c_inv[j]);
    }
    if last_c > 0 {
        let p_mass = last_total + prefix.outliers[i] - tp * last_c as f64;
        let q = if last_share != 0.0 {
            last_share - tq
        } else {
            KL_EPS
        };
        p_ln_q += p_mass * q.ln();
    }
    let sp = prefix.count[n];
    let sq = prefix.count[i];
    Fast::Value((p_ln_p - p_ln_q) / sp + (sq / sp).ln())
}

/// `KL(P || Q)` of candidate `i` built directly, or `None` when smoothing fails; `p` and `q`
/// are scratch of at least `i` values.
///
/// The arithmetic is that of building `P` and `Q`, smoothing each with [`smooth`] and taking
/// [`kl_divergence`], value for value and in the same order, so the result is the same to the
/// bit; it only takes fewer passes (zero counts come from the grouping pass, smoothing and
/// both normalising sums share one pass).
fn kl_candidate(
    h: &[f64],
    outliers: &[f64],
    i: usize,
    levels: usize,
    p: &mut [f64],
    q: &mut [f64],
) -> Option<f64> {
    let p = &mut p[..i];
    let q = &mut q[..i];
    p.copy_from_slice(&h[..i]);
    p[i - 1] += outliers[i];
    let m = i / levels;
    let (mut p_nonzero, mut q_nonzero) = (0usize, 0usize);
    for j in 0..levels {
        let start = j * m;
        let end = if j == levels - 1 { i } else { start + m };
        let total: f64 = h[start..end].iter().sum();
        let nonzero = p[start..end].iter().filter(|&&x| x != 0.0).count();
        if nonzero == 0 {
            q[start..end].fill(0.0);
            continue;
        }
        let share = total / nonzero as f64;
        for (qk, &pk) in q[start..end].iter_mut().zip(&p[start..end]) {
            *qk = if pk != 0.0 { share } else { 0.0 };
        }
        p_nonzero += nonzero;
        if share != 0.0 {
            q_nonzero += nonzero;
        }
    }
    if p_nonzero == 0 || q_nonzero == 0 {
        return None;
    }
    let take_p = KL_EPS * (i - p_nonzero) as f64 / p_nonzero as f64;
    let take_q = KL_EPS * (i - q_nonzero) as f64 / q_nonzero as f64;
    let (mut sp, mut sq) = (0f64, 0f64);
    let mut ok = true;
    for (pk, qk) in p.iter_mut().zip(q.iter_mut()) {
        *pk = if *pk == 0.0 {
            KL_EPS
        } else {
            let x = *pk - take_p;
            ok &= x > 0.0;
            x
        };
        *qk = if *qk == 0.0 {
            KL_EPS
        } else {
            let x = *qk - take_q;
            ok &= x > 0.0;
            x
        };
        sp += *pk;
        sq += *qk;
    }
    ok.then(|| kl_terms(p, q, sp, sq))
}

#[cfg(test)]
/// Moves `KL_EPS` of mass onto each zero bin, evenly from the others. False when all are zero
/// or a bin would become non-positive.
fn smooth(d: &mut [f64]) -> bool {
    let zeros = d.iter().filter(|&&x| x == 0.0).count();
    let nonzeros = d.len() - zeros;
    if nonzeros == 0 {
        return false;
    }
    let take = KL_EPS * zeros as f64 / nonzeros as f64;
    let mut ok = true;
    for x in d.iter_mut() {
        if *x == 0.0 {
            *x = KL_EPS;
        } else {
            *x -= take;
            ok &= *x > 0.0;
        }
    }
    ok
}

/// `KL(P || Q)` of two positive, unnormalised distributions.
#[cfg(test)]
fn kl_divergence(p: &[f64], q: &[f64]) -> f64 {
    let sp: f64 = p.iter().sum();
    let sq: f64 = q.iter().sum();
    kl_terms(p, q, sp, sq)
}

/// `KL(P || Q)` given the totals `sp` and `sq` of `p` and `q`.
fn kl_terms(p: &[f64], q: &[f64], sp: f64, sq: f64) -> f64 {
    let mut kl = 0.0;
    // Runs of equal (p, q) pairs are common (smoothed empty bins are KL_EPS in both, a group
    // of Q shares one value): their term is computed once per run, with the same arithmetic.
    let mut last = (f64::NAN, f64::NAN, 0.0);
    for (&a, &b) in p.iter().zip(q) {
        if a != last.0 || b != last.1 {
            let pa = a / sp;
            last = (a, b, pa * (pa / (b / sq)).ln());
        }
        kl += last.2;
    }
    kl
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The KL rule's candidate as first written: P and Q built, smoothed and compared in
    /// separate passes.
    fn kl_candidate_reference(h: &[f64], outliers: &[f64], i: usize, levels: usize) -> Option<f64> {
        let mut p = h[..i].to_vec();
        p[i - 1] += outliers[i];
        let mut q = vec![0f64; i];
        let m = i / levels;
        for j in 0..levels {
            let start = j * m;
            let end = if j == levels - 1 { i } else { start + m };
            let total: f64 = h[start..end].iter().sum();
            let nonzero = p[start..end].iter().filter(|&&x| x != 0.0).count();
            for k in start..end {
                q[k] = if p[k] != 0.0 {
                    total / nonzero as f64
                } else {
                    0.0
                };
            }
        }
        if !smooth(&mut p) || !smooth(&mut q) {
            return None;
        }
        Some(kl_divergence(&p, &q))
    }

    /// Integer counts of `n` bins: dense bell-shaped data, sparse data, long empty runs, a
    /// whole empty group, a heavy first bin, and a tail of ones.
    fn histograms() -> Vec<(Vec<f64>, usize)> {
        let mut rng = crate::quant::test_rng::Rng::new(7);
        let mut out = Vec::new();
        for (n, levels, density) in [
            (2048, 128, 0.9),
            (2048, 128, 0.1),
            (300, 8, 0.5),
            (512, 16, 0.02),
            (2048, 8, 0.6),
        ] {
            let mut h: Vec<f64> = (0..n)
                .map(|k| {
                    let u = f64::from(rng.gaussians(1)[0]).abs();
                    if u < density * 2.0 {
                        ((u * 1000.0) as u64 % 5000) as f64 * (1.0 + (k % 3) as f64)
                    } else {
                        0.0
                    }
                })
                .collect();
            h[n / 2..n / 2 + n / 8].fill(0.0);
            h[0] = 12345.0;
            out.push((h, levels));
        }
        // A smooth half-Gaussian of a million values, with a sparse tail of single counts.
        let g: Vec<f64> = (0..2048)
            .map(|k| {
                let x = k as f64 / 400.0;
                (1e6 / 400.0 * 0.8 * (-x * x / 2.0).exp()).round()
            })
            .collect();
        out.push((g, 128));
        out
    }

    fn outliers(h: &[f64]) -> Vec<f64> {
        let mut o = vec![0f64; h.len() + 1];
        for k in (0..h.len()).rev() {
            o[k] = o[k + 1] + h[k];
        }
        o
    }

    #[test]
    fn direct_candidates_match_the_reference_to_the_bit() {
        for (h, levels) in histograms() {
            let n = h.len();
            let o = outliers(&h);
            let (mut p, mut q) = (vec![0f64; n], vec![0f64; n]);
            for i in levels..=n {
                let want = kl_candidate_reference(&h, &o, i, levels);
                let got = kl_candidate(&h, &o, i, levels, &mut p, &mut q);
                assert_eq!(want.map(f64::to_bits), got.map(f64::to_bits), "n {n} i {i}");
            }
        }
    }

    #[test]
    fn series_candidates_match_the_reference() {
        let mut series = 0;
        for (h, levels) in histograms() {
            let n = h.len();
            let o = outliers(&h);
            let prefix = Prefix::new(&h);
            for i in levels.max(2)..=n {
                let table = GroupTable::new(&prefix, i / levels, levels);
                let want = kl_candidate_reference(&h, &o, i, levels);
                match fast_candidate(&prefix, &table, i, levels) {
                    Fast::Value(kl) => {
                        series += 1;
                        let want = want.unwrap_or_else(|| panic!("n {n} i {i}: {kl} vs None"));
                        assert!(
                            (kl - want).abs() <= 1e-12 * want.abs().max(1.0),
                            "n {n} i {i}: {kl} vs {want}"
                        );
                    }
                    Fast::Invalid => assert_eq!(want, None, "n {n} i {i}"),
                    Fast::SlowSeries => {}
                }
            }
        }
        // Most candidates of these histograms take the series route.
        assert!(series > 5000, "{series}");
    }

    #[test]
    fn search_picks_the_reference_minimum() {
        for (h, levels) in histograms() {
            let n = h.len();
            let o = outliers(&h);
            let first = levels.max(MIN_KL_CANDIDATE_BINS).min(n);
            let mut want = (f64::INFINITY, n);
            for i in first..=n {
                if let Some(kl) = kl_candidate_reference(&h, &o, i, levels) {
                    if kl < want.0 {
                        want = (kl, i);
                    }
                }
            }
            assert_eq!(best_candidate(&h, levels, first), want.1, "n {n}");
        }
    }
}
