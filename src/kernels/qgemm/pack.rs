//! Packing of the weight matrix B (once, ahead of time) and of blocks of A (per call) into the
//! layouts the micro-kernels read: 16-bit values in (k, k+1) pairs so that one `vpmaddwd`
//! computes `a[k] b[k] + a[k+1] b[k+1]` for 8 columns.

use super::{MR, NR};
use crate::error::{Error, Result};

/// Weights B (`K x N`, i8) packed for [`super::qgemm`], with the column sums and zero points
/// the zero-point corrections need. Pack once per weight tensor and reuse.
///
/// Layout: `ceil(N / 16)` panels of 16 columns; a panel holds, for each pair of rows
/// `(2p, 2p + 1)`, 32 i16 values `b[2p][c], b[2p+1][c]` for its columns `c`. Odd `K` and the
/// last panel's missing columns are padded with zeros.
#[derive(Clone, Debug)]
pub struct PackedB {
    pub(super) k: usize,
    pub(super) n: usize,
    pub(super) data: Vec<i16>,
    /// `sum_k b[k][n]` of the raw values.
    pub(super) col_sums: Vec<i32>,
    /// One zero point per column.
    pub(super) zero_points: Vec<i32>,
}

impl PackedB {
    /// Packs row-major `b` of shape `[k, n]` (ONNX MatMul's B). `zero_points` has one entry
    /// (per tensor) or `n` (per output column), each in `[-128, 127]`.
    pub fn from_kn(b: &[i8], k: usize, n: usize, zero_points: &[i32]) -> Result<PackedB> {
        PackedB::pack(b, k, n, zero_points, |kk, nn| b[kk * n + nn])
    }

    /// Packs row-major `b` of shape `[n, k]`: one row per output channel, as Gemm with
    /// `transB = 1` and Conv weights `[C_out, C_in * kh * kw]` store it.
    pub fn from_nk(b: &[i8], k: usize, n: usize, zero_points: &[i32]) -> Result<PackedB> {
        PackedB::pack(b, k, n, zero_points, |kk, nn| b[nn * k + kk])
    }

    pub fn k(&self) -> usize {
        self.k
    }

    pub fn n(&self) -> usize {
        self.n
    }

    pub fn zero_points(&self) -> &[i32] {
        &self.zero_points
    }

    fn pack(
        b: &[i8],
        k: usize,
        n: usize,
        zero_points: &[i32],
        get: impl Fn(usize, usize) -> i8,
    ) -> Result<PackedB> {
        let len = k
            .checked_mul(n)
            .ok_or_else(|| Error::TooLarge(format!("B of {k} x {n}")))?;
        if b.len() != len {
            return Err(Error::Shape(format!(
                "qgemm: B has {} elements, expected {k} x {n}",
                b.len()
            )));
        }
        if k == 0 || n == 0 {
            return Err(Error::Shape(format!("qgemm: empty B of {k} x {n}")));
        }
        let zero_points = match zero_points.len() {
            1 => vec![zero_points[0]; n],
            l if l == n => zero_points.to_vec(),
            l => {
                return Err(Error::Shape(format!(
                    "qgemm: {l} weight zero points for {n} columns"
                )))
            }
        };
        if let Some(z) = zero_points.iter().find(|z| !(-128..=127).contains(*z)) {
            return Err(Error::Data(format!(
                "qgemm: weight zero point {z} is outside the i8 range"
            )));
        }
        let pairs = k.div_ceil(2);
        let panels = n.div_ceil(NR);
        let mut data = vec![0i16; panels * pairs * 2 * NR];
        let mut col_sums = vec![0i32; n];
        for (p, panel) in data.chunks_exact_mut(pairs * 2 * NR).enumerate() {
            for c in 0..NR.min(n - p * NR) {
                let col = p * NR + c;
                for kk in 0..k {
                    let v = get(kk, col);
                    panel[(kk / 2) * 2 * NR + 2 * c + kk % 2] = i16::from(v);
                    col_sums[col] += i32::from(v);
                }
            }
        }
        Ok(PackedB {
            k,
            n,
            data,
            col_sums,
            zero_points,
        })
    }

    /// Packed pairs `[p0, p1)` of panel `panel`.
    pub(super) fn panel(&self, panel: usize, p0: usize, p1: usize) -> &[i16] {
        let base = panel * self.k.div_ceil(2) * 2 * NR;
        &self.data[base + p0 * 2 * NR..base + p1 * 2 * NR]
    }
}

/// Packs rows `[r0, r0 + rows)` and k-pairs `[p0, p1)` of row-major u8 `a` (`k` columns) into
/// `out`: groups of `MR` rows, each pair of a row stored as one i32 holding two i16
/// (`a[k]` low, `a[k+1]` high) so a broadcast feeds `vpmaddwd`. Missing rows and the odd
/// column are zero.
pub(super) fn pack_a(
    a: &[u8],
    k: usize,
    r0: usize,
    rows: usize,
    p0: usize,
    p1: usize,
    out: &mut Vec<i32>,
) {
    let groups = rows.div_ceil(MR);
    let np = p1 - p0;
    out.clear();
    out.resize(groups * np * MR, 0);
    for g in 0..groups {
        let dst = &mut out[g * np * MR..(g + 1) * np * MR];
        for r in 0..MR.min(rows - g * MR) {
            let row = &a[(r0 + g * MR + r) * k..(r0 + g * MR + r + 1) * k];
            for p in p0..p1 {
                let lo = i32::from(row[2 * p]);
                let hi = row.get(2 * p + 1).map_or(0, |&v| i32::from(v));
                dst[(p - p0) * MR + r] = lo | (hi << 16);
            }
        }
    }
}
