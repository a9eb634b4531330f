//! Integer GEMM for int8 inference (Jacob et al. 2018, integer-arithmetic-only inference):
//! `C[m][n] = sum_k (A[m][k] - za) (B[k][n] - zb[n])` with u8 activations `A` (`M x K`,
//! row-major, zero point `za`) and i8 weights `B` (pre-packed once into a [`PackedB`], one
//! zero point per tensor or per output column), i32 accumulation, then either i32 output
//! ([`qgemm_i32`], ONNX `MatMulInteger`) or requantization to 8 bits ([`qgemm`], ONNX
//! `QLinearMatMul` / `QLinearConv`'s GEMM) through a [`Requant`].
//!
//! The raw products `sum a b` are computed by a micro-kernel; the zero points are handled
//! afterwards with row and column sums: `raw - za colsum[n] - zb[n] rowsum[m] + K za zb[n]`.
//! Arithmetic wraps like the hardware's, so results are exact whenever the true sum fits in
//! i32, which holds for any zero points when `K <= 33025` (`255 * 255 * K < 2^31`).
//!
//! Kernels: a portable one and an AVX2 one (chosen at run time, never by `target-cpu`) that
//! widen u8 and i8 to i16 and use `vpmaddwd`, whose pair sums cannot saturate (the
//! `vpmaddubsw` route saturates at i16 unless weights are 7-bit). Both compute identical
//! integers. Blocking: rows in blocks of `MC`, K in blocks of `KC` values so a 16-column B
//! panel (16 KiB) stays in L1 while all `MR`-row groups of the A block pass over it.

mod micro;
mod pack;
mod requant;
mod wx;

pub use pack::PackedB;
pub use requant::{
    fixed_multipliers, float_scales, rounding_divide_by_pot, saturating_rounding_doubling_high_mul,
    QuantizedMultiplier, Requant,
};
pub use wx::{
    qgemm_wx, qgemm_wx_rows, quad_word, row_offsets, vnni_available, Columns, ElemKind, PackedW,
    WxElem, WxStage, WX_MR, WX_NR,
};

use crate::error::{Error, Result};
use crate::quant::QStore;

/// Rows of a micro-tile.
const MR: usize = 6;
/// Columns of a micro-tile (two AVX2 registers of i32).
const NR: usize = 16;
/// K values per block, in pairs.
const KC_PAIRS: usize = 256;
/// Rows per block (a multiple of `MR`).
const MC: usize = 96;

/// Which micro-kernel to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// The fastest kernel this CPU has.
    Auto,
    Scalar,
    /// AVX2, or an error on a CPU without it.
    Avx2,
    /// AVX-512 VNNI (the output-channel-major GEMM of [`qgemm_wx`]; the row-major one has no
    /// VNNI kernel and takes AVX2), or an error on a CPU without it.
    Vnni,
}

impl Backend {
    /// Whether this CPU can run the AVX2 kernel.
    pub fn avx2_available() -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            std::is_x86_feature_detected!("avx2")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    }

    fn resolve(self) -> Result<Kernel> {
        match self {
            Backend::Scalar => Ok(Kernel::Scalar),
            Backend::Auto if Backend::avx2_available() => Ok(Kernel::Avx2),
            Backend::Auto => Ok(Kernel::Scalar),
            Backend::Avx2 | Backend::Vnni if Backend::avx2_available() => Ok(Kernel::Avx2),
            Backend::Avx2 | Backend::Vnni => Err(Error::Data("qgemm: this CPU has no AVX2".into())),
        }
    }
}

/// A kernel choice already checked against the CPU.
#[derive(Clone, Copy)]
enum Kernel {
    Scalar,
    Avx2,
}

impl Kernel {
    fn run(self, pairs: usize, a: &[i32], b: &[i16], c: &mut [i32], ldc: usize) {
        assert!(a.len() >= pairs * MR && b.len() >= pairs * 2 * NR);
        assert!(ldc >= NR && c.len() >= (MR - 1) * ldc + NR);
        match self {
            Kernel::Scalar => micro::kernel_scalar(pairs, a, b, c, ldc),
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `Kernel::Avx2` is only made by `Backend::resolve` after detecting AVX2,
            // and the lengths the kernel reads and writes were asserted just above.
            Kernel::Avx2 => unsafe { micro::kernel_avx2(pairs, a, b, c, ldc) },
            #[cfg(not(target_arch = "x86_64"))]
            Kernel::Avx2 => micro::kernel_scalar(pairs, a, b, c, ldc),
        }
    }
}

/// `C = (A - za) (B - zb)` as i32, `A` u8 `[m, K]` row-major, `C` `[m, N]` row-major.
pub fn qgemm_i32(a: &[u8], m: usize, a_zero_point: u8, b: &PackedB, c: &mut [i32]) -> Result<()> {
    qgemm_i32_with(Backend::Auto, a, m, a_zero_point, b, c)
}

pub fn qgemm_i32_with(
    backend: Backend,
    a: &[u8],
    m: usize,
    a_zero_point: u8,
    b: &PackedB,
    c: &mut [i32],
) -> Result<()> {
    check_shapes(a, m, b, c.len())?;
    let n = b.n;
    drive(
        backend.resolve()?,
        a,
        m,
        a_zero_point,
        b,
        |r0, rows, blk, ld| {
            for r in 0..rows {
                c[(r0 + r) * n..(r0 + r + 1) * n].copy_from_slice(&blk[r * ld..r * ld + n]);
            }
        },
    );
    Ok(())
}

/// Quantized GEMM with requantized output: `out = requant(C + bias)`, `bias` one i32 per
/// output column (already in the accumulator's scale `a_scale * w_scale`), `out` `[m, N]` of a
/// type holding the requantization's `[qmin, qmax]` (u8 or i8 usually).
#[allow(clippy::too_many_arguments)]
pub fn qgemm<T: QStore>(
    a: &[u8],
    m: usize,
    a_zero_point: u8,
    b: &PackedB,
    bias: Option<&[i32]>,
    requant: &Requant,
    out: &mut [T],
) -> Result<()> {
    qgemm_with(Backend::Auto, a, m, a_zero_point, b, bias, requant, out)
}

#[allow(clippy::too_many_arguments)]
pub fn qgemm_with<T: QStore>(
    backend: Backend,
    a: &[u8],
    m: usize,
    a_zero_point: u8,
    b: &PackedB,
    bias: Option<&[i32]>,
    requant: &Requant,
    out: &mut [T],
) -> Result<()> {
    check_shapes(a, m, b, out.len())?;
    let n = b.n;
    requant.validate(n, T::MIN, T::MAX)?;
    if let Some(bias) = bias {
        if bias.len() != n {
            return Err(Error::Shape(format!(
                "qgemm: bias has {} values for {n} columns",
                bias.len()
            )));
        }
    }
    drive(
        backend.resolve()?,
        a,
        m,
        a_zero_point,
        b,
        |r0, rows, blk, ld| {
            for r in 0..rows {
                let out_row = &mut out[(r0 + r) * n..(r0 + r + 1) * n];
                requant.apply_row(&blk[r * ld..r * ld + n], bias, out_row);
            }
        },
    );
    Ok(())
}

fn check_shapes(a: &[u8], m: usize, b: &PackedB, out_len: usize) -> Result<()> {
    let want_a = m.checked_mul(b.k);
    if want_a != Some(a.len()) {
        return Err(Error::Shape(format!(
            "qgemm: A has {} elements, expected {m} x {}",
            a.len(),
            b.k
        )));
    }
    if m.checked_mul(b.n) != Some(out_len) {
        return Err(Error::Shape(format!(
            "qgemm: output has {out_len} elements, expected {m} x {}",
            b.n
        )));
    }
    Ok(())
}

/// Runs the blocked GEMM and hands each finished block of rows, zero-point corrected, to
/// `sink(first_row, rows, block, row_stride)`.
fn drive(
    kernel: Kernel,
    a: &[u8],
    m: usize,
    a_zero_point: u8,
    b: &PackedB,
    mut sink: impl FnMut(usize, usize, &[i32], usize),
) {
    let (k, n) = (b.k, b.n);
    let pairs = k.div_ceil(2);
    let panels = n.div_ceil(NR);
    let ld = panels * NR;
    let za = i32::from(a_zero_point);
    // Per column: K za zb - za colsum; per row: - zb rowsum (only with weight zero points).
    let kk = k as i32;
    let col_term: Vec<i32> = b
        .col_sums
        .iter()
        .zip(&b.zero_points)
        .map(|(&s, &zb)| {
            kk.wrapping_mul(za)
                .wrapping_mul(zb)
                .wrapping_sub(za.wrapping_mul(s))
        })
        .collect();
    let weight_zp = b.zero_points.iter().any(|&z| z != 0);
    let mut block = vec![0i32; MC.min(m.div_ceil(MR) * MR) * ld];
    let mut apack = Vec::new();
    for r0 in (0..m).step_by(MC) {
        let rows = MC.min(m - r0);
        let groups = rows.div_ceil(MR);
        let blk = &mut block[..groups * MR * ld];
        blk.fill(0);
        for p0 in (0..pairs).step_by(KC_PAIRS) {
            let p1 = (p0 + KC_PAIRS).min(pairs);
            let np = p1 - p0;
            pack::pack_a(a, k, r0, rows, p0, p1, &mut apack);
            for panel in 0..panels {
                let bp = b.panel(panel, p0, p1);
                for g in 0..groups {
                    let ap = &apack[g * np * MR..(g + 1) * np * MR];
                    kernel.run(np, ap, bp, &mut blk[g * MR * ld + panel * NR..], ld);
                }
            }
        }
        for r in 0..rows {
            let row = &mut blk[r * ld..r * ld + n];
            for (x, &t) in row.iter_mut().zip(&col_term) {
                *x = x.wrapping_add(t);
            }
            if weight_zp {
                let rs: i32 = a[(r0 + r) * k..(r0 + r + 1) * k]
                    .iter()
                    .map(|&v| i32::from(v))
                    .sum();
                for (x, &zb) in row.iter_mut().zip(&b.zero_points) {
                    *x = x.wrapping_sub(zb.wrapping_mul(rs));
                }
            }
        }
        sink(r0, rows, blk, ld);
    }
}

#[cfg(test)]
mod ort_reference;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::test_rng::Rng;

    /// Straight from the definition, in i64.
    fn naive(a: &[u8], za: i32, b_kn: &[i8], zb: &[i32], m: usize, k: usize, n: usize) -> Vec<i32> {
        let mut c = vec![0i32; m * n];
        for i in 0..m {
            for j in 0..n {
                let z = zb[if zb.len() == 1 { 0 } else { j }];
                let s: i64 = (0..k)
                    .map(|t| {
                        (i64::from(a[i * k + t]) - i64::from(za))
                            * (i64::from(b_kn[t * n + j]) - i64::from(z))
                    })
                    .sum();
                c[i * n + j] = i32::try_from(s).unwrap();
            }
        }
        c
    }

    fn transpose(b: &[i8], k: usize, n: usize) -> Vec<i8> {
        let mut t = vec![0i8; k * n];
        for i in 0..k {
            for j in 0..n {
                t[j * k + i] = b[i * n + j];
            }
        }
        t
    }

    fn backends() -> Vec<Backend> {
        let mut v = vec![Backend::Scalar];
        if Backend::avx2_available() {
            v.push(Backend::Avx2);
        }
        v
    }

    #[test]
    fn matches_definition_on_random_shapes() {
        let mut rng = Rng::new(42);
        let shapes = [
            (1, 1, 1),
            (1, 2, 16),
            (6, 16, 2),
            (7, 13, 5),
            (13, 33, 17),
            (5, 1023, 31),
            (97, 600, 50),
            (2, 1500, 33),
            (200, 40, 70),
        ];
        for (case, &(m, k, n)) in shapes.iter().enumerate() {
            let a: Vec<u8> = (0..m * k).map(|_| rng.range_i32(0, 255) as u8).collect();
            let b: Vec<i8> = (0..k * n).map(|_| rng.range_i32(-128, 127) as i8).collect();
            let za = [0, 128, 255, 3][case % 4];
            let zb: Vec<i32> = match case % 3 {
                0 => vec![0],
                1 => vec![-7],
                _ => (0..n).map(|_| rng.range_i32(-128, 127)).collect(),
            };
            let want = naive(&a, za, &b, &zb, m, k, n);
            let kn = PackedB::from_kn(&b, k, n, &zb).unwrap();
            let nk = PackedB::from_nk(&transpose(&b, k, n), k, n, &zb).unwrap();
            for backend in backends() {
                for packed in [&kn, &nk] {
                    let mut c = vec![0i32; m * n];
                    qgemm_i32_with(backend, &a, m, za as u8, packed, &mut c).unwrap();
                    assert_eq!(c, want, "{backend:?} m={m} k={k} n={n} za={za}");
                }
            }
        }
    }

    #[test]
    fn extremes_do_not_overflow_at_k_4096() {
        let (m, k, n) = (7, 4096, 19);
        for (av, bv, za, zb) in [
            (255u8, -128i8, 0u8, 0),
            (255, 127, 0, -128),
            (0, -128, 255, 127),
            (255, -128, 0, 127),
        ] {
            let a = vec![av; m * k];
            let b = vec![bv; k * n];
            let want = naive(&a, i32::from(za), &b, &[zb], m, k, n);
            let packed = PackedB::from_kn(&b, k, n, &[zb]).unwrap();
            for backend in backends() {
                let mut c = vec![0i32; m * n];
                qgemm_i32_with(backend, &a, m, za, &packed, &mut c).unwrap();
                assert_eq!(c, want, "{backend:?} a={av} b={bv} za={za} zb={zb}");
            }
        }
        // 255 * 255 * 4096 = 266,342,400
        let a = vec![255u8; k];
        let packed = PackedB::from_kn(&vec![-128i8; k], k, 1, &[127]).unwrap();
        let mut c = [0i32];
        qgemm_i32(&a, 1, 0, &packed, &mut c).unwrap();
        assert_eq!(c[0], -255 * 255 * 4096);
    }

    #[test]
    fn requantized_output_matches_reference() {
        let mut rng = Rng::new(9);
        let (m, k, n) = (11, 70, 21);
        let a: Vec<u8> = (0..m * k).map(|_| rng.range_i32(0, 255) as u8).collect();
        let b: Vec<i8> = (0..k * n).map(|_| rng.range_i32(-127, 127) as i8).collect();
        let bias: Vec<i32> = (0..n).map(|_| rng.range_i32(-5000, 5000)).collect();
        let w_scales: Vec<f32> = (0..n).map(|j| 0.001 + j as f32 * 1e-4).collect();
        let (a_scale, y_scale, za, zy) = (0.02f32, 0.3f32, 131u8, 117);
        let acc = naive(&a, i32::from(za), &b, &[0], m, k, n);
        let packed = PackedB::from_kn(&b, k, n, &[0]).unwrap();
        let scales = float_scales(a_scale, &w_scales, y_scale);
        let float = Requant::Float {
            scales: scales.clone(),
            zero_point: zy,
            qmin: 0,
            qmax: 255,
        };
        let fixed = Requant::Fixed {
            multipliers: fixed_multipliers(a_scale, &w_scales, y_scale).unwrap(),
            zero_point: zy,
            qmin: 0,
            qmax: 255,
        };
        for backend in backends() {
            let mut yf = vec![0u8; m * n];
            qgemm_with(backend, &a, m, za, &packed, Some(&bias), &float, &mut yf).unwrap();
            let mut yx = vec![0u8; m * n];
            qgemm_with(backend, &a, m, za, &packed, Some(&bias), &fixed, &mut yx).unwrap();
            let mut ties = 0;
            for i in 0..m * n {
                let j = i % n;
                let x = (acc[i] + bias[j]) as f32 * scales[j];
                let want = (x.round_ties_even() as i32 + zy).clamp(0, 255);
                assert_eq!(i32::from(yf[i]), want, "float path at {i}");
                let exact =
                    f64::from(acc[i] + bias[j]) * f64::from(a_scale) * f64::from(w_scales[j])
                        / f64::from(y_scale);
                let diff = (i32::from(yx[i]) - (exact.round() as i32 + zy).clamp(0, 255)).abs();
                assert!(diff <= 1, "fixed path at {i}");
                ties += diff;
            }
            assert!(ties <= 2, "{ties} off-by-one outputs");
        }
        // Fused ReLU6 and i8 output.
        let relu6 = float.clone().fuse_clip(0.0, 6.0, y_scale).unwrap();
        let mut y = vec![0u8; m * n];
        qgemm(&a, m, za, &packed, Some(&bias), &relu6, &mut y).unwrap();
        assert!(y
            .iter()
            .all(|&v| i32::from(v) >= zy && i32::from(v) <= zy + 20));
        let signed = Requant::Float {
            scales,
            zero_point: -3,
            qmin: -128,
            qmax: 127,
        };
        let mut y8 = vec![0i8; m * n];
        qgemm(&a, m, za, &packed, None, &signed, &mut y8).unwrap();
        // Wrong output type and shapes are errors, not panics.
        let mut bad = vec![0u8; m * n];
        assert!(qgemm(&a, m, za, &packed, None, &signed, &mut bad).is_err());
        assert!(qgemm(&a, m, za, &packed, Some(&bias[..3]), &float, &mut bad).is_err());
        assert!(qgemm(&a[1..], m, za, &packed, None, &float, &mut bad).is_err());
        assert!(qgemm_i32(&a, m, za, &packed, &mut [0; 3]).is_err());
    }

    #[test]
    fn packing_rejects_bad_input() {
        assert!(PackedB::from_kn(&[0; 6], 2, 4, &[0]).is_err());
        assert!(PackedB::from_kn(&[0; 8], 2, 4, &[0, 0]).is_err());
        assert!(PackedB::from_kn(&[0; 8], 2, 4, &[300]).is_err());
        assert!(PackedB::from_kn(&[], 0, 4, &[0]).is_err());
        let p = PackedB::from_nk(&[1, 2, 3, 4, 5, 6], 3, 2, &[0]).unwrap();
        assert_eq!((p.k(), p.n()), (3, 2));
        let mut c = [0i32; 0];
        assert!(qgemm_i32(&[], 0, 0, &p, &mut c).is_ok());
    }
}
