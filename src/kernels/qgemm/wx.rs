//! Output-channel-major integer GEMM for convolutions stored NCHW:
//! `Y[m][j] = out(sum_k (W[m][k] - zw[m]) (X[k][j] - zx) + bias[m])` with the i8 weights `W`
//! (`M x K`) packed once as the left operand ([`PackedW`]) and the u8 activations `X`
//! (`K x N`: the input planes themselves for a 1x1 convolution, else their im2col) packed per
//! call. Rows are output channels and columns pixels, so results land in NCHW with no
//! transpose, and each row's requantization parameters are scalars.
//!
//! The fast micro-kernel is AVX-512 VNNI `vpdpbusd`, a tile row's 16 columns in one 512-bit
//! register: u8 x s8 with four products summed straight into i32, so unlike `vpmaddubsw`
//! nothing saturates at i16, and the result is exact whenever the true sum fits in i32. The
//! requantization (or i32 store) is done on the registers before they leave the kernel. The
//! portable kernel computes the same integers and the same rounding, so both are
//! bit-identical.
//!
//! The zero points are folded in afterwards: `raw - zx rowsum(W)[m] + K zx zw[m] + bias[m]` is
//! one constant per row ([`row_offsets`]); `- zw[m] colsum(X)[j]` is only needed with weight
//! zero points, which symmetric weights (the usual int8 choice) do not have.

use super::Backend;
use crate::error::{Error, Result};
use crate::kernels::pool_codes::CodeOrder;
use crate::kernels::scratch;
use crate::quant::linear::round_to_code;

/// Rows (output channels) of a micro-tile.
pub const WX_MR: usize = 8;
/// Columns (pixels) of a micro-tile: one 512-bit register of i32 (two 256-bit ones on AVX2).
pub const WX_NR: usize = 16;
/// Columns packed at a time: `K x 256` bytes of `X` stay in L2 while every row panel of `W`
/// passes over them.
const NC: usize = 256;

/// i8 weights `[M, K]` packed in panels of [`WX_MR`] rows; within a panel, for each group of
/// four `k`, the `MR` rows' four bytes as one i32 (the broadcast operand of `vpdpbusd`).
/// Missing rows and the `k` past `K` are zero.
#[derive(Clone, Debug)]
pub struct PackedW {
    m: usize,
    k: usize,
    quads: usize,
    data: Vec<i32>,
    /// For the AVX2 kernel, which has no u8 x i8 four-way product: per group of four `k` and
    /// row, the weights `(k0, k2)` and `(k1, k3)` as two i16 pairs (two i32 words); empty
    /// when that kernel is not going to run.
    pairs: Vec<i32>,
    row_sums: Vec<i32>,
    zero_points: Vec<i32>,
}

/// Whether [`PackedW`] needs the AVX2 kernel's layout: on AVX2 CPUs without VNNI, and in tests.
fn wants_pairs() -> bool {
    cfg!(test) || (avx2_available() && !vnni_available())
}

fn avx2_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx2")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

impl PackedW {
    /// Packs row-major `w` (`[m, k]`, one row per output channel) with one zero point per
    /// tensor or per row, each in `[-128, 127]`.
    pub fn new(w: &[i8], m: usize, k: usize, zero_points: &[i32]) -> Result<PackedW> {
        if m == 0 || k == 0 || m.checked_mul(k) != Some(w.len()) {
            return Err(Error::Shape(format!(
                "qgemm: weight has {} values, expected {m} x {k}",
                w.len()
            )));
        }
        let zero_points = match zero_points.len() {
            1 => vec![zero_points[0]; m],
            l if l == m => zero_points.to_vec(),
            l => {
                return Err(Error::Shape(format!(
                    "qgemm: {l} weight zero points for {m} rows"
                )))
            }
        };
        if let Some(z) = zero_points.iter().find(|z| !(-128..=127).contains(*z)) {
            return Err(Error::Data(format!(
                "qgemm: weight zero point {z} is outside the i8 range"
            )));
        }
        let quads = k.div_ceil(4);
        let panels = m.div_ceil(WX_MR);
        let mut data = vec![0i32; panels * quads * WX_MR];
        for (r, row) in w.chunks_exact(k).enumerate() {
            let panel = &mut data[(r / WX_MR) * quads * WX_MR..][..quads * WX_MR];
            for (q, four) in row.chunks(4).enumerate() {
                panel[q * WX_MR + r % WX_MR] = quad_word(four);
            }
        }
        let row_sums = w
            .chunks_exact(k)
            .map(|row| row.iter().map(|&v| i32::from(v)).sum())
            .collect();
        let packed = PackedW {
            m,
            k,
            quads,
            data,
            pairs: Vec::new(),
            row_sums,
            zero_points,
        };
        Ok(if wants_pairs() {
            packed.with_avx2_layout()
        } else {
            packed
        })
    }

    /// Adds the AVX2 kernel's layout (made by [`PackedW::new`] only when that kernel is the
    /// one this CPU will run).
    pub fn with_avx2_layout(mut self) -> PackedW {
        let pair = |a: i8, b: i8| i32::from(a as i16 as u16) | (i32::from(b) << 16);
        self.pairs = self
            .data
            .iter()
            .flat_map(|&word| {
                let b = word.to_le_bytes().map(|v| v as i8);
                [pair(b[0], b[2]), pair(b[1], b[3])]
            })
            .collect();
        self
    }

    pub fn m(&self) -> usize {
        self.m
    }

    pub fn k(&self) -> usize {
        self.k
    }

    fn has_zero_points(&self) -> bool {
        self.zero_points.iter().any(|&z| z != 0)
    }

    fn panel(&self, p: usize) -> &[i32] {
        &self.data[p * self.quads * WX_MR..(p + 1) * self.quads * WX_MR]
    }

    fn pair_panel(&self, p: usize) -> &[i32] {
        &self.pairs[p * self.quads * WX_MR * 2..(p + 1) * self.quads * WX_MR * 2]
    }
}

/// Up to four i8 weights (the rest zero) as the i32 whose bytes `vpdpbusd` multiplies, in
/// order, with four u8 activations.
pub fn quad_word(four: &[i8]) -> i32 {
    let mut bytes = [0u8; 4];
    for (b, &v) in bytes.iter_mut().zip(four) {
        *b = v as u8;
    }
    i32::from_le_bytes(bytes)
}

/// The per-row constant `bias[m] + K zx zw[m] - zx rowsum(W)[m]` (wrapping, like the hardware).
pub fn row_offsets(w: &PackedW, zx: u8, bias: Option<&[i32]>) -> Vec<i32> {
    let (za, kk) = (i32::from(zx), w.k as i32);
    (0..w.m)
        .map(|r| {
            let b = bias.map_or(0, |b| b[r]);
            b.wrapping_add(kk.wrapping_mul(za).wrapping_mul(w.zero_points[r]))
                .wrapping_sub(za.wrapping_mul(w.row_sums[r]))
        })
        .collect()
}

/// What happens to a row's accumulator after [`row_offsets`].
#[derive(Clone, Copy, Debug)]
pub enum WxStage<'a> {
    /// Stored as i32 (`ConvInteger`).
    Int32,
    /// `round_half_even(clamp(f32(acc) * scales[m], lo, hi)) + zero_point`, ONNX Runtime's
    /// float requantization; `lo`, `hi` from `code_bounds(qmin, qmax, zero_point)`.
    Requant {
        scales: &'a [f32],
        zero_point: i32,
        lo: f32,
        hi: f32,
    },
}

/// Where column `j` of `X` lies within each of its rows: the first `keep` of every `stride`
/// bytes, `(j / keep) * stride + j % keep`. A stride-1 convolution read from wider padded
/// planes keeps the `ow` valid pixels of each `wq`-wide row, so the GEMM computes and stores
/// only real outputs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Columns {
    pub keep: usize,
    pub stride: usize,
}

impl Columns {
    /// Consecutive columns.
    pub fn dense() -> Columns {
        Columns {
            keep: usize::MAX,
            stride: usize::MAX,
        }
    }

    pub fn at(&self, j: usize) -> usize {
        if self.keep == usize::MAX {
            j
        } else {
            j / self.keep * self.stride + j % self.keep
        }
    }

    /// The places of columns `j0..j0 + width` (the last repeated to fill [`WX_NR`]), stepping
    /// through the rows without a division per column.
    fn run(&self, j0: usize, width: usize) -> [usize; WX_NR] {
        if self.keep == usize::MAX {
            return std::array::from_fn(|j| j0 + j.min(width - 1));
        }
        let (mut row, mut col) = (j0 / self.keep, j0 % self.keep);
        let mut at = [0; WX_NR];
        for (j, a) in at.iter_mut().enumerate() {
            *a = row * self.stride + col;
            if j + 1 < width {
                col += 1;
                if col == self.keep {
                    (row, col) = (row + 1, 0);
                }
            }
        }
        at
    }

    fn valid(&self) -> bool {
        self.keep == usize::MAX || (self.keep > 0 && self.keep <= self.stride)
    }
}

/// An element type the kernel can store.
pub trait WxElem: Copy + Default + Send + Sync {
    const KIND: ElemKind;
    fn from_i32(v: i32) -> Self;
    /// 8-bit codes as their bytes, with the order that compares them; `None` for i32.
    fn code_bytes(v: &[Self]) -> Option<(&[u8], CodeOrder)>;
    fn code_bytes_mut(v: &mut [Self]) -> Option<&mut [u8]>;
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum ElemKind {
    U8,
    I8,
    I32,
}

impl WxElem for u8 {
    const KIND: ElemKind = ElemKind::U8;
    fn from_i32(v: i32) -> u8 {
        v as u8
    }
    fn code_bytes(v: &[u8]) -> Option<(&[u8], CodeOrder)> {
        Some((v, CodeOrder::Unsigned))
    }
    fn code_bytes_mut(v: &mut [u8]) -> Option<&mut [u8]> {
        Some(v)
    }
}

impl WxElem for i8 {
    const KIND: ElemKind = ElemKind::I8;
    fn from_i32(v: i32) -> i8 {
        v as i8
    }
    fn code_bytes(v: &[i8]) -> Option<(&[u8], CodeOrder)> {
        // SAFETY: i8 and u8 have the same size and alignment, and every bit pattern is valid.
        let bytes = unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u8, v.len()) };
        Some((bytes, CodeOrder::Signed))
    }
    fn code_bytes_mut(v: &mut [i8]) -> Option<&mut [u8]> {
        // SAFETY: as in `code_bytes`; every byte written is a valid i8.
        Some(unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr() as *mut u8, v.len()) })
    }
}

impl WxElem for i32 {
    const KIND: ElemKind = ElemKind::I32;
    fn from_i32(v: i32) -> i32 {
        v
    }
    fn code_bytes(_: &[i32]) -> Option<(&[u8], CodeOrder)> {
        None
    }
    fn code_bytes_mut(_: &mut [i32]) -> Option<&mut [u8]> {
        None
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Micro {
    Scalar,
    Avx2,
    Vnni,
}

/// Whether this CPU has the VNNI kernel (AVX-512 VNNI with 256-bit forms and byte stores).
pub fn vnni_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        crate::kernels::simd::has_avx512() && std::is_x86_feature_detected!("avx512vnni")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

fn micro_for(backend: Backend, w: &PackedW) -> Result<Micro> {
    let avx2 = avx2_available() && !w.pairs.is_empty();
    match backend {
        Backend::Scalar => Ok(Micro::Scalar),
        Backend::Auto if vnni_available() => Ok(Micro::Vnni),
        Backend::Auto if avx2 => Ok(Micro::Avx2),
        Backend::Auto => Ok(Micro::Scalar),
        Backend::Vnni if vnni_available() => Ok(Micro::Vnni),
        Backend::Vnni => Err(Error::Data("qgemm: this CPU has no AVX-512 VNNI".into())),
        Backend::Avx2 if avx2 => Ok(Micro::Avx2),
        Backend::Avx2 => Err(Error::Data(
            "qgemm: this CPU has no AVX2, or the weights were not packed for it".into(),
        )),
    }
}

/// Rows `[row0, row0 + out.len() / n)` of `Y`, `out` row-major with `n` columns. `x` is `X`
/// row-major `[K, n]` and `offsets` comes from [`row_offsets`] (all `M` rows); `row0` must be a
/// multiple of [`WX_MR`].
#[allow(clippy::too_many_arguments)]
pub fn qgemm_wx<T: WxElem>(
    backend: Backend,
    w: &PackedW,
    x: &[u8],
    n: usize,
    offsets: &[i32],
    stage: WxStage,
    row0: usize,
    out: &mut [T],
) -> Result<()> {
    if x.len() != w.k * n {
        return Err(Error::Shape(format!(
            "qgemm: X of {} values for {} x {n}",
            x.len(),
            w.k
        )));
    }
    scratch::with_usize(w.k, |starts| {
        for (i, s) in starts.iter_mut().enumerate() {
            *s = i * n;
        }
        qgemm_wx_rows(
            backend,
            w,
            x,
            starts,
            n,
            Columns::dense(),
            offsets,
            stage,
            row0,
            out,
        )
    })
}

/// As [`qgemm_wx`] with column `j` of row `k` of `X` being `x[starts[k] + columns.at(j)]`:
/// rows may overlap or sit anywhere in `x`, so a stride-1 convolution can read shifted
/// windows of its padded input planes in place of an im2col copy.
#[allow(clippy::too_many_arguments)]
pub fn qgemm_wx_rows<T: WxElem>(
    backend: Backend,
    w: &PackedW,
    x: &[u8],
    starts: &[usize],
    n: usize,
    columns: Columns,
    offsets: &[i32],
    stage: WxStage,
    row0: usize,
    out: &mut [T],
) -> Result<()> {
    let micro = micro_for(backend, w)?;
    if n == 0 || out.is_empty() {
        return Ok(());
    }
    let rows = out.len() / n;
    let span = columns.at(n - 1).checked_add(1);
    let in_bounds = columns.valid()
        && starts.iter().all(|&s| {
            span.and_then(|e| s.checked_add(e))
                .is_some_and(|e| e <= x.len())
        });
    if starts.len() != w.k
        || !in_bounds
        || !out.len().is_multiple_of(n)
        || !row0.is_multiple_of(WX_MR)
        || row0 + rows > w.m
    {
        return Err(Error::Shape(format!(
            "qgemm: {} rows of X for K = {}, a row past the {} values of X, or rows {row0}+{rows} of {}",
            starts.len(),
            w.k,
            x.len(),
            w.m
        )));
    }
    let stage_ok = match (stage, T::KIND) {
        (WxStage::Int32, ElemKind::I32) => true,
        (WxStage::Requant { scales, .. }, ElemKind::U8 | ElemKind::I8) => scales.len() == w.m,
        _ => false,
    };
    if !stage_ok || offsets.len() != w.m {
        return Err(Error::Shape(
            "qgemm: output stage does not match the output type or the rows".into(),
        ));
    }
    let quads = w.quads;
    let with_colsums = w.has_zero_points();
    if n < NARROW {
        narrow(micro, w, x, starts, n, columns, offsets, stage, row0, out);
        return Ok(());
    }
    let nc = NC.min(n.div_ceil(WX_NR) * WX_NR);
    scratch::with_u8(quads * 4 * nc, |packed| {
        let mut colsums = [0i32; NC];
        for c0 in (0..n).step_by(NC) {
            let cols = NC.min(n - c0);
            pack_x(x, starts, columns, c0, cols, packed);
            if with_colsums {
                for (j, s) in colsums[..cols].iter_mut().enumerate() {
                    let at = columns.at(c0 + j);
                    *s = starts.iter().map(|&r| i32::from(x[r + at])).sum();
                }
            }
            for r in (0..rows).step_by(WX_MR) {
                let tile_rows = WX_MR.min(rows - r);
                let m0 = row0 + r;
                let a = w.panel(m0 / WX_MR);
                for jp in (0..cols).step_by(WX_NR) {
                    let tile = Tile {
                        quads,
                        rows: tile_rows,
                        cols: WX_NR.min(cols - jp),
                        m0,
                        offsets,
                        zero_points: &w.zero_points,
                        colsums: with_colsums.then_some(&colsums[jp..jp + WX_NR]),
                        stage,
                    };
                    let b = &packed[jp * quads * 4..(jp + WX_NR) * quads * 4];
                    let dst = &mut out[r * n + c0 + jp..];
                    match micro {
                        Micro::Scalar => tile.run_scalar(a, b, dst, n),
                        #[cfg(target_arch = "x86_64")]
                        // SAFETY: `Micro::Avx2` is only chosen after detecting AVX2 with the
                        // pair layout packed; the panel holds `quads * MR * 2` words, the rest
                        // as for the VNNI kernel below.
                        Micro::Avx2 => unsafe {
                            tile.run_avx2(w.pair_panel(m0 / WX_MR), b, dst, n)
                        },
                        #[cfg(not(target_arch = "x86_64"))]
                        Micro::Avx2 => tile.run_scalar(a, b, dst, n),
                        #[cfg(target_arch = "x86_64")]
                        // SAFETY: `Micro::Vnni` is only chosen after `vnni_available`; `a` holds
                        // `quads * MR` words and `b` `quads * NR * 4` bytes; the tile writes
                        // `rows` rows of `cols` values at stride `n` starting at `dst`, all
                        // inside `out` (`r + rows <= out rows`, `c0 + jp + cols <= n`).
                        Micro::Vnni => unsafe { tile.run_vnni(a, b, dst, n) },
                        #[cfg(not(target_arch = "x86_64"))]
                        Micro::Vnni => tile.run_scalar(a, b, dst, n),
                    }
                }
            }
        }
    });
    Ok(())
}

/// Below this many columns a tile would be mostly empty: [`narrow`] takes one column at a time.
const NARROW: usize = 4;

/// Matrix-vector products, one column of `X` at a time: the packed weights' `MR` rows of one
/// group of four `k` are exactly one 256-bit `vpdpbusd` operand, against the column's four
/// bytes broadcast, so the rows land in the lanes.
#[allow(clippy::too_many_arguments)]
fn narrow<T: WxElem>(
    micro: Micro,
    w: &PackedW,
    x: &[u8],
    starts: &[usize],
    n: usize,
    columns: Columns,
    offsets: &[i32],
    stage: WxStage,
    row0: usize,
    out: &mut [T],
) {
    let rows = out.len() / n;
    scratch::with_u8(w.quads * 4, |col| {
        for j in 0..n {
            col.fill(0);
            let at = columns.at(j);
            for (d, &s) in col.iter_mut().zip(starts) {
                *d = x[s + at];
            }
            let colsum: i32 = col.iter().map(|&v| i32::from(v)).sum();
            let col_words: &[u8] = col;
            // Up to GEMV_PANELS row panels share each load of the column.
            for r in (0..rows).step_by(GEMV_PANELS * WX_MR) {
                let m0 = row0 + r;
                let panels = (rows - r).div_ceil(WX_MR).min(GEMV_PANELS);
                let first = m0 / WX_MR;
                let mut acc = [[0i32; WX_MR]; GEMV_PANELS];
                match micro {
                    #[cfg(target_arch = "x86_64")]
                    // SAFETY: `Micro::Vnni` is only chosen after `vnni_available`; the panels
                    // `first..first + panels` exist (row `m0 + 8 (panels - 1) < M`), each
                    // `quads * MR` words, and `col_words` holds `quads * 4` bytes.
                    Micro::Vnni => unsafe {
                        let a =
                            &w.data[first * w.quads * WX_MR..(first + panels) * w.quads * WX_MR];
                        gemv_vnni(w.quads, a, panels, col_words, &mut acc)
                    },
                    #[cfg(target_arch = "x86_64")]
                    // SAFETY: `Micro::Avx2` is only chosen after detecting AVX2 with the pair
                    // layout packed; the panels `first..first + panels` exist, each
                    // `quads * MR * 2` words, and `col_words` holds `quads * 4` bytes.
                    Micro::Avx2 => unsafe {
                        let span = w.quads * WX_MR * 2;
                        let a = &w.pairs[first * span..(first + panels) * span];
                        gemv_avx2(w.quads, a, panels, col_words, &mut acc)
                    },
                    _ => {
                        for (p, acc) in acc.iter_mut().enumerate().take(panels) {
                            let a = w.panel(first + p);
                            for (q, four) in col_words.chunks_exact(4).enumerate() {
                                for (r, v) in acc.iter_mut().enumerate() {
                                    let wb = a[q * WX_MR + r].to_le_bytes();
                                    let s: i32 = (0..4)
                                        .map(|t| i32::from(four[t]) * i32::from(wb[t] as i8))
                                        .sum();
                                    *v = v.wrapping_add(s);
                                }
                            }
                        }
                    }
                }
                let colsums = [colsum; WX_NR];
                for (p, acc) in acc.iter().enumerate().take(panels) {
                    let r = r + p * WX_MR;
                    let tile = Tile {
                        quads: w.quads,
                        rows: WX_MR.min(rows - r),
                        cols: 1,
                        m0: row0 + r,
                        offsets,
                        zero_points: &w.zero_points,
                        colsums: w.has_zero_points().then_some(&colsums[..]),
                        stage,
                    };
                    for (i, &raw) in acc.iter().enumerate().take(tile.rows) {
                        out[(r + i) * n + j] = T::from_i32(tile.finish(i, 0, raw));
                    }
                }
            }
        }
    });
}

/// As [`gemv_vnni`] on the AVX2 pair layout: each quad's column bytes as the i16 pairs
/// `(c0, c2)` and `(c1, c3)` in alternate lanes, one `vpmaddwd` against four rows' weight pairs
/// (each row's two lanes summed at the end).
///
/// # Safety
/// AVX2; `pairs` holds `panels * quads * MR * 2` words, `panels <= GEMV_PANELS`, and `col`
/// holds `quads * 4` bytes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn gemv_avx2(
    quads: usize,
    pairs: &[i32],
    panels: usize,
    col: &[u8],
    acc: &mut [[i32; WX_MR]; GEMV_PANELS],
) {
    use std::arch::x86_64::*;
    debug_assert!(panels <= GEMV_PANELS && pairs.len() >= panels * quads * WX_MR * 2);
    debug_assert!(col.len() >= quads * 4);
    let mut s = [[_mm256_setzero_si256(); 2]; GEMV_PANELS];
    let pp = pairs.as_ptr();
    for (q, c) in col.chunks_exact(4).take(quads).enumerate() {
        let even = i32::from(c[0]) | (i32::from(c[2]) << 16);
        let odd = i32::from(c[1]) | (i32::from(c[3]) << 16);
        let xv = _mm256_setr_epi32(even, odd, even, odd, even, odd, even, odd);
        for (p, sp) in s.iter_mut().enumerate().take(panels) {
            // SAFETY: quad `q` of panel `p` is words `(p quads + q) MR 2..+16`, inside `pairs`
            // by the contract.
            unsafe {
                let at = pp.add((p * quads + q) * WX_MR * 2) as *const __m256i;
                sp[0] = _mm256_add_epi32(sp[0], _mm256_madd_epi16(_mm256_loadu_si256(at), xv));
                sp[1] =
                    _mm256_add_epi32(sp[1], _mm256_madd_epi16(_mm256_loadu_si256(at.add(1)), xv));
            }
        }
    }
    for (sp, out) in s.iter().zip(acc.iter_mut()).take(panels) {
        let mut lanes = [0i32; 16];
        // SAFETY: stores 16 i32 into the local array.
        unsafe {
            _mm256_storeu_si256(lanes.as_mut_ptr() as *mut __m256i, sp[0]);
            _mm256_storeu_si256(lanes.as_mut_ptr().add(8) as *mut __m256i, sp[1]);
        }
        for (r, o) in out.iter_mut().enumerate() {
            *o = lanes[2 * r].wrapping_add(lanes[2 * r + 1]);
        }
    }
}

/// Row panels a matrix-vector product runs side by side.
const GEMV_PANELS: usize = 4;

/// `acc[p]` = panel `p` (of `panels`, consecutive in `a`) times the column.
///
/// # Safety
/// AVX-512 F, VL and VNNI; `a` holds `panels * quads * MR` words, `panels <= GEMV_PANELS`, and
/// `col` holds `quads * 4` bytes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vl,avx512vnni")]
unsafe fn gemv_vnni(
    quads: usize,
    a: &[i32],
    panels: usize,
    col: &[u8],
    acc: &mut [[i32; WX_MR]; GEMV_PANELS],
) {
    use std::arch::x86_64::*;
    debug_assert!(panels <= GEMV_PANELS && a.len() >= panels * quads * WX_MR);
    debug_assert!(col.len() >= quads * 4);
    // SAFETY: reads stay inside `a` and `col` by the contract; the stores write 8 i32 each.
    unsafe {
        // Two accumulators per panel (even and odd quads) hide the instruction's latency.
        let mut s = [[_mm256_setzero_si256(); 2]; GEMV_PANELS];
        let cp = col.as_ptr() as *const i32;
        let ap = a.as_ptr() as *const __m256i;
        let mut q = 0;
        while q + 1 < quads {
            let x0 = _mm256_set1_epi32(cp.add(q).read_unaligned());
            let x1 = _mm256_set1_epi32(cp.add(q + 1).read_unaligned());
            for (p, sp) in s.iter_mut().enumerate().take(panels) {
                let pa = ap.add(p * quads);
                sp[0] = _mm256_dpbusd_epi32(sp[0], x0, _mm256_loadu_si256(pa.add(q)));
                sp[1] = _mm256_dpbusd_epi32(sp[1], x1, _mm256_loadu_si256(pa.add(q + 1)));
            }
            q += 2;
        }
        if q < quads {
            let x0 = _mm256_set1_epi32(cp.add(q).read_unaligned());
            for (p, sp) in s.iter_mut().enumerate().take(panels) {
                let pa = ap.add(p * quads);
                sp[0] = _mm256_dpbusd_epi32(sp[0], x0, _mm256_loadu_si256(pa.add(q)));
            }
        }
        for (sp, out) in s.iter().zip(acc.iter_mut()).take(panels) {
            _mm256_storeu_si256(
                out.as_mut_ptr() as *mut __m256i,
                _mm256_add_epi32(sp[0], sp[1]),
            );
        }
    }
}

/// Packs columns `[c0, c0 + cols)` of `X` (row `k` at `x[starts[k]..]`, columns placed by
/// `columns`) into panels of [`WX_NR`] columns: for each group of four rows, each column's
/// four bytes together.
fn pack_x(x: &[u8], starts: &[usize], columns: Columns, c0: usize, cols: usize, out: &mut [u8]) {
    let k = starts.len();
    let quads = k.div_ceil(4);
    let panel_len = quads * 4 * WX_NR;
    let last_start = starts.iter().copied().max().unwrap_or(0);
    let gather_ok = ssse3_available();
    let vbmi = vbmi_available();
    // Columns a whole row apart with each group of four rows consecutive (a batch of
    // vectors, `X` transposed): a column's four bytes are one word, for this many quads.
    let word_quads = if columns.keep == 1 {
        (0..k / 4)
            .take_while(|&q| (1..4).all(|i| starts[4 * q + i] == starts[4 * q] + i))
            .count()
    } else {
        0
    };
    for (p, panel) in out
        .chunks_exact_mut(panel_len)
        .take(cols.div_ceil(WX_NR))
        .enumerate()
    {
        let j0 = c0 + p * WX_NR;
        let width = WX_NR.min(c0 + cols - j0);
        if width < WX_NR {
            panel.fill(0);
        } else if !k.is_multiple_of(4) {
            // Only the last quad has rows past K.
            panel[(quads - 1) * 4 * WX_NR..].fill(0);
        }
        let at = columns.run(j0, width);
        let base = at[0];
        let span = at[WX_NR - 1] - base + 1;
        // Whole quads of full panels go through the SIMD transposes: straight from 16
        // consecutive bytes, or gathered from a window of at most 32 by two byte shuffles
        // (whose loads must stay inside `x`).
        let gather = gather_ok
            && span > WX_NR
            && span <= 2 * WX_NR
            && last_start + base + 2 * WX_NR <= x.len();
        let full_quads = if width == WX_NR && (span == WX_NR || gather) {
            k / 4
        } else {
            0
        };
        #[cfg(target_arch = "x86_64")]
        if span == WX_NR {
            for q in 0..full_quads {
                let rows: [&[u8]; 4] = std::array::from_fn(|i| {
                    let s = starts[4 * q + i] + base;
                    &x[s..s + WX_NR]
                });
                transpose_quad_sse2(rows, &mut panel[q * 4 * WX_NR..(q + 1) * 4 * WX_NR]);
            }
        } else if full_quads > 0 && vbmi {
            // SAFETY: AVX-512 VBMI was detected (`vbmi`); every row start plus `base` has 32
            // bytes of `x` after it (as for `gather`), and the panel holds `full_quads * 64`.
            unsafe { gather_quads_vbmi(x, &starts[..4 * full_quads], base, &at, panel) };
        } else if full_quads > 0 {
            let index: [u8; WX_NR] = std::array::from_fn(|j| (at[j] - base) as u8);
            // SAFETY: SSSE3 was detected (`gather`); every row start plus `base` has 32 bytes
            // of `x` after it (`last_start + base + 32 <= x.len()`), and the panel holds
            // `full_quads * 64` bytes.
            unsafe { gather_quads_ssse3(x, &starts[..4 * full_quads], base, &index, panel) };
        }
        #[cfg(not(target_arch = "x86_64"))]
        let full_quads = 0;
        let words = if full_quads == 0 { word_quads } else { 0 };
        #[cfg(target_arch = "x86_64")]
        let gathered = if words > 0
            && avx2_available()
            && last_start + at[WX_NR - 1] + 4 <= x.len()
            && i32::try_from(at[WX_NR - 1]).is_ok()
        {
            // SAFETY: AVX2 was detected; every word read, `x[start + at[j]..][..4]`, lies
            // inside `x` (checked above with the largest start and column), the offsets fit
            // i32, and the panel holds `words * 64` bytes.
            unsafe { gather_words_avx2(x, &starts[..4 * words], &at, panel) };
            words
        } else {
            0
        };
        #[cfg(not(target_arch = "x86_64"))]
        let gathered = 0;
        for q in gathered..words {
            let start = starts[4 * q];
            for (j, &a) in at.iter().enumerate().take(width) {
                let slot = q * 4 * WX_NR + 4 * j;
                panel[slot..slot + 4].copy_from_slice(&x[start + a..start + a + 4]);
            }
        }
        let full_quads = full_quads.max(words);
        for (kk, &start) in starts.iter().enumerate().skip(4 * full_quads) {
            let slot = (kk / 4) * 4 * WX_NR + kk % 4;
            for (j, &a) in at.iter().enumerate().take(width) {
                panel[slot + 4 * j] = x[start + a];
            }
        }
    }
}

/// Quad `q` of the panel: for each of the 16 columns, the word `x[starts[4 q] + at[j]..][..4]`.
///
/// # Safety
/// AVX2; every such word lies inside `x`, each `at[j]` fits i32, and `out` holds
/// `16 * starts.len()` bytes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn gather_words_avx2(x: &[u8], starts: &[usize], at: &[usize; WX_NR], out: &mut [u8]) {
    use std::arch::x86_64::*;
    debug_assert!(out.len() >= 16 * starts.len());
    let lo: [i32; 8] = std::array::from_fn(|j| at[j] as i32);
    let hi: [i32; 8] = std::array::from_fn(|j| at[8 + j] as i32);
    // SAFETY: the gathers read the words the contract places inside `x`; the stores write
    // 64 bytes per quad inside `out`.
    unsafe {
        let (lo, hi) = (
            _mm256_loadu_si256(lo.as_ptr() as *const __m256i),
            _mm256_loadu_si256(hi.as_ptr() as *const __m256i),
        );
        for (q, four) in starts.chunks_exact(4).enumerate() {
            let base = x.as_ptr().add(four[0]) as *const i32;
            let o = out.as_mut_ptr().add(64 * q) as *mut __m256i;
            _mm256_storeu_si256(o, _mm256_i32gather_epi32::<1>(base, lo));
            _mm256_storeu_si256(o.add(1), _mm256_i32gather_epi32::<1>(base, hi));
        }
    }
}

fn vbmi_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        crate::kernels::simd::has_avx512() && std::is_x86_feature_detected!("avx512vbmi")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// As [`gather_quads_ssse3`] with one two-table byte permute per quad: the four rows' 32-byte
/// windows make 128 bytes, and `vpermt2b` picks each column's four bytes out of them, gathered
/// and transposed at once.
///
/// # Safety
/// AVX-512 F, BW and VBMI; `x` holds 32 bytes from every `start + base`, `at[j] - base < 32`,
/// and `out` holds `16 * starts.len()` bytes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vbmi")]
unsafe fn gather_quads_vbmi(
    x: &[u8],
    starts: &[usize],
    base: usize,
    at: &[usize; WX_NR],
    out: &mut [u8],
) {
    use std::arch::x86_64::*;
    debug_assert!(out.len() >= 16 * starts.len());
    debug_assert!(starts.iter().all(|&s| s + base + 32 <= x.len()));
    // Byte `4 j + i` of a quad is row `i` (window `32 i` of the 128) at column `j`.
    let index: [u8; 64] = std::array::from_fn(|b| (32 * (b % 4) + at[b / 4] - base) as u8);
    // SAFETY: the loads read 32 bytes from each `start + base` and 64 of `index`, the stores
    // write `16 * starts.len()` bytes of `out`, as the contract says.
    unsafe {
        let idx = _mm512_loadu_si512(index.as_ptr() as *const __m512i);
        let xp = x.as_ptr().add(base);
        let row = |s: usize| _mm256_loadu_si256(xp.add(s) as *const __m256i);
        for (q, four) in starts.chunks_exact(4).enumerate() {
            let lo = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(row(four[0])), row(four[1]));
            let hi = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(row(four[2])), row(four[3]));
            let quad = _mm512_permutex2var_epi8(lo, idx, hi);
            _mm512_storeu_si512(out.as_mut_ptr().add(64 * q) as *mut __m512i, quad);
        }
    }
}

fn ssse3_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("ssse3")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// As [`transpose_quad_sse2`] for each group of four `starts`, with each row's 16 bytes
/// picked from the 32 at `x[start + base..]` by `index` (two `pshufb`, one per half, merged).
///
/// # Safety
/// SSSE3; `x` holds 32 bytes from every `start + base`, `index` values are below 32 and `out`
/// holds `16 * starts.len()` bytes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "ssse3")]
unsafe fn gather_quads_ssse3(
    x: &[u8],
    starts: &[usize],
    base: usize,
    index: &[u8; WX_NR],
    out: &mut [u8],
) {
    use std::arch::x86_64::*;
    debug_assert!(out.len() >= 16 * starts.len());
    debug_assert!(starts.iter().all(|&s| s + base + 32 <= x.len()));
    // SAFETY: the loads read 32 bytes from each `start + base` and 16 of `index`, the stores
    // write `16 * starts.len()` bytes of `out`, as the contract says.
    unsafe {
        let idx = _mm_loadu_si128(index.as_ptr() as *const __m128i);
        // Indices 16..31 belong to the high half: the low half's shuffle zeroes them (bit 7
        // set), the high half's takes them less 16 and zeroes the others.
        let high = _mm_cmpgt_epi8(idx, _mm_set1_epi8(15));
        let lo_idx = _mm_or_si128(idx, high);
        let hi_idx = _mm_or_si128(
            _mm_sub_epi8(idx, _mm_set1_epi8(16)),
            _mm_andnot_si128(high, _mm_set1_epi8(-128)),
        );
        let xp = x.as_ptr().add(base);
        let row = |s: usize| {
            let p = xp.add(s) as *const __m128i;
            _mm_or_si128(
                _mm_shuffle_epi8(_mm_loadu_si128(p), lo_idx),
                _mm_shuffle_epi8(_mm_loadu_si128(p.add(1)), hi_idx),
            )
        };
        for (q, four) in starts.chunks_exact(4).enumerate() {
            let rows = [row(four[0]), row(four[1]), row(four[2]), row(four[3])];
            interleave_quad_sse2(rows, out.as_mut_ptr().add(64 * q));
        }
    }
}

/// Four rows of 16 bytes into 16 columns of four bytes (SSE2, part of every x86-64 CPU).
#[cfg(target_arch = "x86_64")]
#[inline]
fn transpose_quad_sse2(rows: [&[u8]; 4], out: &mut [u8]) {
    use std::arch::x86_64::*;
    assert!(rows.iter().all(|r| r.len() >= 16) && out.len() >= 64);
    // SAFETY: SSE2 is always present on x86-64; the loads read 16 bytes of each row and the
    // stores write 64 bytes of `out`, as asserted above.
    unsafe {
        let rows = rows.map(|r| _mm_loadu_si128(r.as_ptr() as *const __m128i));
        interleave_quad_sse2(rows, out.as_mut_ptr());
    }
}

/// Four registers of 16 bytes (rows) stored as 16 columns of four bytes.
///
/// # Safety
/// `out` is valid for 64 bytes of writes.
#[cfg(target_arch = "x86_64")]
#[inline]
unsafe fn interleave_quad_sse2([a0, a1, a2, a3]: [std::arch::x86_64::__m128i; 4], out: *mut u8) {
    use std::arch::x86_64::*;
    let (t0, t1) = (_mm_unpacklo_epi8(a0, a1), _mm_unpackhi_epi8(a0, a1));
    let (t2, t3) = (_mm_unpacklo_epi8(a2, a3), _mm_unpackhi_epi8(a2, a3));
    let o = out as *mut __m128i;
    // SAFETY: the caller guarantees 64 writable bytes at `out`.
    unsafe {
        _mm_storeu_si128(o, _mm_unpacklo_epi16(t0, t2));
        _mm_storeu_si128(o.add(1), _mm_unpackhi_epi16(t0, t2));
        _mm_storeu_si128(o.add(2), _mm_unpacklo_epi16(t1, t3));
        _mm_storeu_si128(o.add(3), _mm_unpackhi_epi16(t1, t3));
    }
}

/// One micro-tile: `rows x cols` outputs starting at row `m0`.
struct Tile<'a> {
    quads: usize,
    rows: usize,
    cols: usize,
    m0: usize,
    offsets: &'a [i32],
    zero_points: &'a [i32],
    colsums: Option<&'a [i32]>,
    stage: WxStage<'a>,
}

impl Tile<'_> {
    fn finish(&self, r: usize, j: usize, raw: i32) -> i32 {
        let m = self.m0 + r;
        let mut v = raw.wrapping_add(self.offsets[m]);
        if let Some(cs) = self.colsums {
            v = v.wrapping_sub(self.zero_points[m].wrapping_mul(cs[j]));
        }
        match self.stage {
            WxStage::Int32 => v,
            WxStage::Requant {
                scales,
                zero_point,
                lo,
                hi,
            } => round_to_code(v as f32 * scales[m], lo, hi).wrapping_add(zero_point),
        }
    }

    fn run_scalar<T: WxElem>(&self, a: &[i32], b: &[u8], dst: &mut [T], ld: usize) {
        let mut acc = [[0i32; WX_NR]; WX_MR];
        for q in 0..self.quads {
            let bq = &b[q * 4 * WX_NR..(q + 1) * 4 * WX_NR];
            for (r, row) in acc.iter_mut().enumerate() {
                let wb = a[q * WX_MR + r].to_le_bytes();
                for (j, v) in row.iter_mut().enumerate() {
                    let xs = &bq[4 * j..4 * j + 4];
                    let s: i32 = (0..4)
                        .map(|t| i32::from(xs[t]) * i32::from(wb[t] as i8))
                        .sum();
                    *v = v.wrapping_add(s);
                }
            }
        }
        for (r, row) in acc.iter().enumerate().take(self.rows) {
            for (j, &raw) in row.iter().enumerate().take(self.cols) {
                dst[r * ld + j] = T::from_i32(self.finish(r, j, raw));
            }
        }
    }

    /// AVX2 kernel: a `vpdpbusd` per row and half emulated with two `vpmaddwd`, the even and
    /// odd bytes of the packed activations (zero-extended to i16) against the row's weight
    /// pairs; u8 x i8 products summed in pairs cannot overflow i32. Rows in two passes of
    /// four, so the accumulators, operands and weights fit AVX2's sixteen registers.
    ///
    /// # Safety
    /// The CPU must have AVX2; `pairs` must hold `quads * MR * 2` words, `b` `quads * NR * 4`
    /// bytes, and `dst` must be valid for `rows` rows of `cols` values at stride `ld`.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn run_avx2<T: WxElem>(&self, pairs: &[i32], b: &[u8], dst: &mut [T], ld: usize) {
        use std::arch::x86_64::*;
        debug_assert!(pairs.len() >= self.quads * WX_MR * 2 && b.len() >= self.quads * 4 * WX_NR);
        let (pp, bp) = (pairs.as_ptr(), b.as_ptr());
        let low_bytes = _mm256_set1_epi16(0x00ff);
        for r0 in (0..self.rows).step_by(4) {
            let mut acc = [[_mm256_setzero_si256(); 2]; 4];
            for q in 0..self.quads {
                // SAFETY: q < quads and r0 + r < MR, so the reads stay inside `pairs` and `b`.
                unsafe {
                    let b0 = _mm256_loadu_si256(bp.add(q * 64) as *const __m256i);
                    let b1 = _mm256_loadu_si256(bp.add(q * 64 + 32) as *const __m256i);
                    let (e0, o0) = (_mm256_and_si256(b0, low_bytes), _mm256_srli_epi16(b0, 8));
                    let (e1, o1) = (_mm256_and_si256(b1, low_bytes), _mm256_srli_epi16(b1, 8));
                    for (r, row) in acc.iter_mut().enumerate() {
                        let at = (q * WX_MR + r0 + r) * 2;
                        let we = _mm256_set1_epi32(*pp.add(at));
                        let wo = _mm256_set1_epi32(*pp.add(at + 1));
                        let s0 =
                            _mm256_add_epi32(_mm256_madd_epi16(e0, we), _mm256_madd_epi16(o0, wo));
                        let s1 =
                            _mm256_add_epi32(_mm256_madd_epi16(e1, we), _mm256_madd_epi16(o1, wo));
                        row[0] = _mm256_add_epi32(row[0], s0);
                        row[1] = _mm256_add_epi32(row[1], s1);
                    }
                }
            }
            for (r, row) in acc.iter().enumerate().take(self.rows - r0) {
                // SAFETY: AVX2 is enabled here; row `r0 + r < rows` of `dst` holds `cols`
                // values from `(r0 + r) * ld` by the contract.
                unsafe { self.store_row_avx2(r0 + r, *row, &mut dst[(r0 + r) * ld..]) };
            }
        }
    }

    /// Finishes one row of a tile in registers, as [`Tile::finish`], and stores its `cols`
    /// values.
    ///
    /// # Safety
    /// AVX2; `dst` holds at least `cols` values.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn store_row_avx2<T: WxElem>(
        &self,
        r: usize,
        acc: [std::arch::x86_64::__m256i; 2],
        dst: &mut [T],
    ) {
        use std::arch::x86_64::*;
        let m = self.m0 + r;
        let off = _mm256_set1_epi32(self.offsets[m]);
        let mut v = [_mm256_add_epi32(acc[0], off), _mm256_add_epi32(acc[1], off)];
        if let Some(cs) = self.colsums {
            let zw = _mm256_set1_epi32(self.zero_points[m]);
            for (h, x) in v.iter_mut().enumerate() {
                // SAFETY: `colsums` holds WX_NR values.
                let c = unsafe { _mm256_loadu_si256(cs.as_ptr().add(8 * h) as *const __m256i) };
                *x = _mm256_sub_epi32(*x, _mm256_mullo_epi32(zw, c));
            }
        }
        let cols = self.cols.min(dst.len());
        match (self.stage, T::KIND) {
            (
                WxStage::Requant {
                    scales,
                    zero_point,
                    lo,
                    hi,
                },
                kind,
            ) => {
                let (s, l, u) = (
                    _mm256_set1_ps(scales[m]),
                    _mm256_set1_ps(lo),
                    _mm256_set1_ps(hi),
                );
                let z = _mm256_set1_epi32(zero_point);
                let q = v.map(|x| {
                    let f =
                        _mm256_min_ps(_mm256_max_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(x), s), l), u);
                    _mm256_add_epi32(_mm256_cvtps_epi32(f), z)
                });
                // Codes are already within the byte type's range, so the saturating packs
                // only narrow; the permutes undo their lane interleaving.
                let w16 = _mm256_permute4x64_epi64(_mm256_packs_epi32(q[0], q[1]), 0xd8);
                let b8 = if kind == ElemKind::I8 {
                    _mm256_packs_epi16(w16, w16)
                } else {
                    _mm256_packus_epi16(w16, w16)
                };
                let mut bytes = [0u8; 16];
                // SAFETY: stores 16 bytes into the local array.
                unsafe {
                    _mm_storeu_si128(
                        bytes.as_mut_ptr() as *mut __m128i,
                        _mm256_castsi256_si128(_mm256_permute4x64_epi64(b8, 0xd8)),
                    )
                };
                for (d, &b) in dst[..cols].iter_mut().zip(&bytes) {
                    *d = T::from_i32(if kind == ElemKind::I8 {
                        i32::from(b as i8)
                    } else {
                        i32::from(b)
                    });
                }
            }
            (WxStage::Int32, _) => {
                let mut vals = [0i32; WX_NR];
                // SAFETY: stores 16 i32 into the local array.
                unsafe {
                    _mm256_storeu_si256(vals.as_mut_ptr() as *mut __m256i, v[0]);
                    _mm256_storeu_si256(vals.as_mut_ptr().add(8) as *mut __m256i, v[1]);
                }
                for (d, &x) in dst[..cols].iter_mut().zip(&vals) {
                    *d = T::from_i32(x);
                }
            }
        }
    }

    /// # Safety
    /// The CPU must have AVX-512 F, VL, BW and VNNI; `a` must hold `quads * MR` words, `b`
    /// `quads * NR * 4` bytes, and `dst` must be valid for `rows` rows of `cols` values at
    /// stride `ld`.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512vl,avx512bw,avx512vnni")]
    unsafe fn run_vnni<T: WxElem>(&self, a: &[i32], b: &[u8], dst: &mut [T], ld: usize) {
        use std::arch::x86_64::*;
        debug_assert!(a.len() >= self.quads * WX_MR && b.len() >= self.quads * 4 * WX_NR);
        debug_assert!(self.rows == 0 || dst.len() >= (self.rows - 1) * ld + self.cols);
        // A quad of the panel's 16 columns is one 512-bit register, so a row's 16 sums are
        // one accumulator and its output stage one pass (half the instructions of two
        // 256-bit halves, for the same multiply throughput).
        let (ap, bp) = (a.as_ptr(), b.as_ptr());
        let mut acc = [_mm512_setzero_si512(); WX_MR];
        for q in 0..self.quads {
            // SAFETY: q < quads, so the reads stay inside `a` and `b` (the contract above).
            unsafe {
                let bq = _mm512_loadu_si512(bp.add(q * 64) as *const __m512i);
                for (r, row) in acc.iter_mut().enumerate() {
                    let wv = _mm512_set1_epi32(*ap.add(q * WX_MR + r));
                    *row = _mm512_dpbusd_epi32(*row, bq, wv);
                }
            }
        }
        let mask = ((1u32 << self.cols.min(WX_NR)) - 1) as __mmask16;
        let colsums = self.colsums.map(|cs| {
            // SAFETY: `colsums` holds WX_NR values (the caller passes a full panel).
            unsafe { _mm512_loadu_si512(cs.as_ptr() as *const __m512i) }
        });
        let dp = dst.as_mut_ptr();
        for (r, &v) in acc.iter().enumerate().take(self.rows) {
            let m = self.m0 + r;
            let mut v = _mm512_add_epi32(v, _mm512_set1_epi32(self.offsets[m]));
            if let Some(cs) = colsums {
                let zw = _mm512_set1_epi32(self.zero_points[m]);
                v = _mm512_sub_epi32(v, _mm512_mullo_epi32(zw, cs));
            }
            // SAFETY: the masked stores write only columns `< cols` of row `r`, inside `dst`
            // by the contract.
            unsafe {
                let p = dp.add(r * ld);
                match self.stage {
                    WxStage::Int32 => _mm512_mask_storeu_epi32(p as *mut i32, mask, v),
                    WxStage::Requant {
                        scales,
                        zero_point,
                        lo,
                        hi,
                    } => {
                        let f = _mm512_mul_ps(_mm512_cvtepi32_ps(v), _mm512_set1_ps(scales[m]));
                        let f =
                            _mm512_min_ps(_mm512_max_ps(f, _mm512_set1_ps(lo)), _mm512_set1_ps(hi));
                        // Round half to even: the default MXCSR mode, as `round_to_code`.
                        let q =
                            _mm512_add_epi32(_mm512_cvtps_epi32(f), _mm512_set1_epi32(zero_point));
                        _mm512_mask_cvtepi32_storeu_epi8(p as *mut i8, mask, q);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::linear::code_bounds;
    use crate::quant::test_rng::Rng;

    fn backends() -> Vec<Backend> {
        let mut v = vec![Backend::Scalar];
        if avx2_available() {
            v.push(Backend::Avx2);
        }
        if vnni_available() {
            v.push(Backend::Vnni);
        }
        v
    }

    fn naive(w: &[i8], zw: &[i32], x: &[u8], zx: u8, m: usize, k: usize, n: usize) -> Vec<i64> {
        let mut y = vec![0i64; m * n];
        for r in 0..m {
            let z = i64::from(zw[if zw.len() == 1 { 0 } else { r }]);
            for j in 0..n {
                y[r * n + j] = (0..k)
                    .map(|t| {
                        (i64::from(w[r * k + t]) - z) * (i64::from(x[t * n + j]) - i64::from(zx))
                    })
                    .sum();
            }
        }
        y
    }

    #[test]
    fn int32_matches_definition() {
        let mut rng = Rng::new(5);
        for (case, &(m, k, n)) in [
            (1, 1, 1),
            (8, 4, 16),
            (9, 5, 17),
            (20, 27, 300),
            (33, 260, 70),
            (3, 1000, 5),
            (17, 50, 2),
            (9, 33, 3),
            (24, 3137, 1),
        ]
        .iter()
        .enumerate()
        {
            let w: Vec<i8> = (0..m * k).map(|_| rng.range_i32(-128, 127) as i8).collect();
            let x: Vec<u8> = (0..k * n).map(|_| rng.range_i32(0, 255) as u8).collect();
            let zw: Vec<i32> = match case % 3 {
                0 => vec![0],
                1 => vec![-5],
                _ => (0..m).map(|_| rng.range_i32(-128, 127)).collect(),
            };
            let zx = [0u8, 128, 255, 7][case % 4];
            let bias: Vec<i32> = (0..m).map(|_| rng.range_i32(-9999, 9999)).collect();
            let pw = PackedW::new(&w, m, k, &zw).unwrap();
            let offs = row_offsets(&pw, zx, Some(&bias));
            let want: Vec<i32> = naive(&w, &zw, &x, zx, m, k, n)
                .iter()
                .enumerate()
                .map(|(i, &v)| (v + i64::from(bias[i / n])) as i32)
                .collect();
            for be in backends() {
                let mut y = vec![0i32; m * n];
                qgemm_wx(be, &pw, &x, n, &offs, WxStage::Int32, 0, &mut y).unwrap();
                assert_eq!(y, want, "{be:?} m={m} k={k} n={n}");
                // A block of rows on its own.
                if m > 8 {
                    let mut part = vec![0i32; (m - 8) * n];
                    qgemm_wx(be, &pw, &x, n, &offs, WxStage::Int32, 8, &mut part).unwrap();
                    assert_eq!(part, want[8 * n..]);
                }
            }
        }
    }

    #[test]
    fn requantized_outputs_agree_across_kernels_and_with_the_rule() {
        let mut rng = Rng::new(11);
        let (m, k, n) = (19, 75, 133);
        let w: Vec<i8> = (0..m * k).map(|_| rng.range_i32(-127, 127) as i8).collect();
        let x: Vec<u8> = (0..k * n).map(|_| rng.range_i32(0, 255) as u8).collect();
        let scales: Vec<f32> = (0..m).map(|r| 1e-4 + r as f32 * 3e-5).collect();
        let pw = PackedW::new(&w, m, k, &[0]).unwrap();
        let offs = row_offsets(&pw, 121, None);
        let acc = naive(&w, &[0], &x, 121, m, k, n);
        for (zp, qmin, qmax) in [(100, 0, 255), (-3, -128, 127), (0, 0, 6)] {
            let (lo, hi) = code_bounds(qmin, qmax, zp);
            let stage = WxStage::Requant {
                scales: &scales,
                zero_point: zp,
                lo,
                hi,
            };
            let want: Vec<i32> = acc
                .iter()
                .enumerate()
                .map(|(i, &v)| round_to_code(v as i32 as f32 * scales[i / n], lo, hi) + zp)
                .collect();
            for be in backends() {
                if qmin < 0 {
                    let mut y = vec![0i8; m * n];
                    qgemm_wx(be, &pw, &x, n, &offs, stage, 0, &mut y).unwrap();
                    assert!(
                        y.iter().zip(&want).all(|(&a, &b)| i32::from(a) == b),
                        "{be:?}"
                    );
                } else {
                    let mut y = vec![0u8; m * n];
                    qgemm_wx(be, &pw, &x, n, &offs, stage, 0, &mut y).unwrap();
                    assert!(
                        y.iter().zip(&want).all(|(&a, &b)| i32::from(a) == b),
                        "{be:?}"
                    );
                }
            }
        }
        // Mismatched stage and type, bad shapes: errors.
        let mut y = vec![0u8; m * n];
        assert!(qgemm_wx(
            Backend::Scalar,
            &pw,
            &x,
            n,
            &offs,
            WxStage::Int32,
            0,
            &mut y
        )
        .is_err());
        assert!(qgemm_wx(
            Backend::Scalar,
            &pw,
            &x[1..],
            n,
            &offs,
            WxStage::Int32,
            0,
            &mut [0i32; 5]
        )
        .is_err());
        assert!(PackedW::new(&w, m, k + 1, &[0]).is_err());
        assert!(PackedW::new(&w, m, k, &[0, 1]).is_err());
    }

    /// Rows anywhere in `x` with columns placed by a [`Columns`] map give the GEMM of the
    /// gathered matrix: kept runs of a wider row (shifted convolution windows) and columns a
    /// whole row apart (a batch of vectors).
    #[test]
    fn placed_columns_match_the_gathered_matrix() {
        let mut rng = Rng::new(17);
        for (m, k, n, columns) in [
            (
                16,
                36,
                121,
                Columns {
                    keep: 11,
                    stride: 13,
                },
            ),
            (8, 9, 40, Columns { keep: 5, stride: 9 }),
            (
                24,
                64,
                37,
                Columns {
                    keep: 37,
                    stride: 40,
                },
            ),
            (
                9,
                3136,
                64,
                Columns {
                    keep: 1,
                    stride: 3136,
                },
            ),
            (
                8,
                10,
                20,
                Columns {
                    keep: 1,
                    stride: 10,
                },
            ),
            (
                8,
                12,
                3,
                Columns {
                    keep: 1,
                    stride: 12,
                },
            ),
        ] {
            let rows_apart = columns.keep == 1;
            let starts: Vec<usize> = if rows_apart {
                (0..k).collect()
            } else {
                (0..k).map(|r| 7 * r + r % 3).collect()
            };
            let len = starts[k - 1] + columns.at(n - 1) + 1 + if rows_apart { 0 } else { 40 };
            let x: Vec<u8> = (0..len).map(|_| rng.range_i32(0, 255) as u8).collect();
            let dense: Vec<u8> = (0..k * n)
                .map(|i| x[starts[i / n] + columns.at(i % n)])
                .collect();
            let w: Vec<i8> = (0..m * k).map(|_| rng.range_i32(-128, 127) as i8).collect();
            for zw in [vec![0], (0..m).map(|r| r as i32 - 4).collect()] {
                let pw = PackedW::new(&w, m, k, &zw).unwrap();
                let offs = row_offsets(&pw, 9, None);
                for be in backends() {
                    let mut want = vec![0i32; m * n];
                    qgemm_wx(be, &pw, &dense, n, &offs, WxStage::Int32, 0, &mut want).unwrap();
                    let mut got = vec![0i32; m * n];
                    let stage = WxStage::Int32;
                    qgemm_wx_rows(be, &pw, &x, &starts, n, columns, &offs, stage, 0, &mut got)
                        .unwrap();
                    assert_eq!(got, want, "{be:?} {m}x{k}x{n} {columns:?}");
                }
            }
        }
    }

    #[test]
    fn extreme_values_at_large_k_are_exact() {
        let (m, k, n) = (3, 4099, 18);
        for (wv, xv, zw, zx) in [
            (-128i8, 255u8, 127, 0u8),
            (127, 0, -128, 255),
            (-128, 0, 0, 255),
        ] {
            let w = vec![wv; m * k];
            let x = vec![xv; k * n];
            let pw = PackedW::new(&w, m, k, &[zw]).unwrap();
            let offs = row_offsets(&pw, zx, None);
            let want: Vec<i32> = naive(&w, &[zw], &x, zx, m, k, n)
                .iter()
                .map(|&v| v as i32)
                .collect();
            for be in backends() {
                let mut y = vec![0i32; m * n];
                qgemm_wx(be, &pw, &x, n, &offs, WxStage::Int32, 0, &mut y).unwrap();
                assert_eq!(y, want, "{be:?} w={wv} x={xv}");
            }
        }
    }
}
