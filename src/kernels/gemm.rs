//! Single-precision GEMM: `C = act(alpha * A * B + beta * C + bias)`.
//!
//! A BLIS-style blocked algorithm: B is packed in `KC x NC` blocks, A in `MC x KC` blocks, and
//! a register-blocked `6 x 16` AVX2/FMA micro-kernel (chosen at run time; a portable kernel
//! otherwise) computes each tile and applies the epilogue (bias, activation) before the tile
//! leaves registers. Constant operands (weights) can be packed once ([`PackedA`],
//! [`PackedB`]); convolutions feed B as an implicit im2col matrix ([`GatherRef`]) packed
//! straight from the image. Large problems are split over rayon's current thread count;
//! with one thread no rayon call is made at all.

mod micro;
mod pack;

use rayon::prelude::*;

use self::micro::{CTile, TileEpi, MR, NR};
use super::activation::Activation;
use super::scratch;
use super::simd::has_avx2_fma;
use crate::error::{Error, Result};

/// Depth of a packed block: a `KC x NR` panel of B (16 KiB) stays in L1.
const KC: usize = 256;
/// The depth of the K blocks of a `k`-deep product: at most [`KC`], and all (but the last,
/// by less than one per block) the same, so no block is a short remainder whose pass over
/// C costs as much as a full one (288 splits as 144 + 144, not 256 + 32).
fn k_block(k: usize) -> usize {
    k.div_ceil(k.div_ceil(KC).max(1)).max(1)
}

/// Rows of A packed per block (a multiple of MR): the `MC x KC` block stays in L2.
const MC: usize = 96;
/// Columns of B packed per block (a multiple of NR).
const NC: usize = 2048;
/// Below this many multiply-adds a problem runs on one thread: splitting would cost more
/// than it saves.
const PAR_MIN_MACS: usize = 1 << 17;

/// A read-only matrix view: element `(i, j)` is `data[i * rs + j * cs]`.
/// Transposition is free ([`MatRef::t`]). Construction checks every element is in bounds.
#[derive(Clone, Copy, Debug)]
pub struct MatRef<'a> {
    data: &'a [f32],
    rows: usize,
    cols: usize,
    rs: usize,
    cs: usize,
}

impl<'a> MatRef<'a> {
    /// A view with explicit row and column strides.
    pub fn new(data: &'a [f32], rows: usize, cols: usize, rs: usize, cs: usize) -> Result<Self> {
        if rows > 0 && cols > 0 {
            let last = (rows - 1)
                .checked_mul(rs)
                .and_then(|x| (cols - 1).checked_mul(cs).and_then(|y| x.checked_add(y)));
            if last.is_none_or(|l| l >= data.len()) {
                return Err(Error::Shape(format!(
                    "a {rows}x{cols} matrix with strides ({rs}, {cs}) does not fit in {} elements",
                    data.len()
                )));
            }
        }
        Ok(MatRef {
            data,
            rows,
            cols,
            rs,
            cs,
        })
    }

    /// A dense row-major `rows x cols` view.
    pub fn row_major(data: &'a [f32], rows: usize, cols: usize) -> Result<Self> {
        Self::new(data, rows, cols, cols, 1)
    }

    /// A row-major view whose rows are `ld` elements apart.
    pub fn with_ld(data: &'a [f32], rows: usize, cols: usize, ld: usize) -> Result<Self> {
        Self::new(data, rows, cols, ld, 1)
    }

    /// The transposed view.
    pub fn t(self) -> Self {
        MatRef {
            data: self.data,
            rows: self.cols,
            cols: self.rows,
            rs: self.cs,
            cs: self.rs,
        }
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Element `(i, j)` for the reference code; callers keep `i < rows`, `j < cols`.
    fn at(&self, i: usize, j: usize) -> f32 {
        self.data[i * self.rs + j * self.cs]
    }
}

/// The output matrix: row-major with leading dimension `ld >= cols`.
#[derive(Debug)]
pub struct MatMut<'a> {
    data: &'a mut [f32],
    rows: usize,
    cols: usize,
    ld: usize,
}

impl<'a> MatMut<'a> {
    pub fn new(data: &'a mut [f32], rows: usize, cols: usize, ld: usize) -> Result<Self> {
        let fits = rows == 0
            || cols == 0
            || (ld >= cols
                && (rows - 1)
                    .checked_mul(ld)
                    .and_then(|x| x.checked_add(cols))
                    .is_some_and(|end| end <= data.len()));
        if !fits {
            return Err(Error::Shape(format!(
                "a {rows}x{cols} output with leading dimension {ld} does not fit in {} elements",
                data.len()
            )));
        }
        Ok(MatMut {
            data,
            rows,
            cols,
            ld,
        })
    }

    pub fn row_major(data: &'a mut [f32], rows: usize, cols: usize) -> Result<Self> {
        Self::new(data, rows, cols, cols)
    }
}

/// Floats that must follow the last element a [`GatherRef`] addresses: packing copies whole
/// 16-float runs and ignores the excess.
pub const GATHER_SLACK: usize = NR;

/// An implicit matrix `B[p, j] = base[row_off[p] + col_off[j]]` of `row_off.len()` rows and
/// `col_off.len()` columns: convolution's im2col matrix, read straight from the image.
/// `base` must extend [`GATHER_SLACK`] floats past the largest offset.
#[derive(Clone, Copy, Debug)]
pub struct GatherRef<'a> {
    base: &'a [f32],
    row_off: &'a [usize],
    col_off: &'a [usize],
}

impl<'a> GatherRef<'a> {
    pub fn new(base: &'a [f32], row_off: &'a [usize], col_off: &'a [usize]) -> Result<Self> {
        if let (Some(&r), Some(&c)) = (row_off.iter().max(), col_off.iter().max()) {
            let end = r.checked_add(c).and_then(|x| x.checked_add(GATHER_SLACK));
            if end.is_none_or(|x| x > base.len()) {
                return Err(Error::Shape(format!(
                    "gathered matrix reaches offset {r}+{c} (+{GATHER_SLACK} slack) of a {}-element buffer",
                    base.len()
                )));
            }
        }
        Ok(GatherRef {
            base,
            row_off,
            col_off,
        })
    }

    pub fn rows(&self) -> usize {
        self.row_off.len()
    }

    pub fn cols(&self) -> usize {
        self.col_off.len()
    }

    fn at(&self, i: usize, j: usize) -> f32 {
        self.base[self.row_off[i] + self.col_off[j]]
    }
}

/// Aligned storage of packed panels.
#[derive(Clone, Debug)]
struct Panels {
    buf: Vec<f32>,
    off: usize,
}

impl Panels {
    fn zeroed(len: usize) -> Panels {
        let buf = vec![0.0f32; len + 16];
        let off = buf.as_ptr().align_offset(64).min(16);
        Panels { buf, off }
    }

    fn as_mut_slice(&mut self, from: usize, len: usize) -> &mut [f32] {
        &mut self.buf[self.off + from..self.off + from + len]
    }

    fn ptr_at(&self, at: usize) -> *const f32 {
        self.buf[self.off + at..].as_ptr()
    }
}

/// A left operand packed once (e.g. convolution weights), ready for any number of products.
#[derive(Clone, Debug)]
pub struct PackedA {
    rows: usize,
    cols: usize,
    /// Rows rounded up to MR.
    rows_pad: usize,
    panels: Panels,
}

impl PackedA {
    pub fn new(a: MatRef) -> PackedA {
        let rows_pad = a.rows.div_ceil(MR) * MR;
        let mut panels = Panels::zeroed(rows_pad * a.cols);
        let step = k_block(a.cols);
        for pc in (0..a.cols).step_by(step) {
            let kc = step.min(a.cols - pc);
            let dst = panels.as_mut_slice(pc * rows_pad, rows_pad * kc);
            pack::pack_a(dst, &a, 0, a.rows, pc, kc);
        }
        PackedA {
            rows: a.rows,
            cols: a.cols,
            rows_pad,
            panels,
        }
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    /// The panels of rows `ic..` for the K block starting at `pc` (`ic` a multiple of MR).
    fn block(&self, pc: usize, kc: usize, ic: usize) -> *const f32 {
        self.panels.ptr_at(pc * self.rows_pad + ic * kc)
    }
}

/// A right operand packed once (e.g. the weights of a Gemm or MatMul).
#[derive(Clone, Debug)]
pub struct PackedB {
    rows: usize,
    cols: usize,
    cols_pad: usize,
    panels: Panels,
}

impl PackedB {
    pub fn new(b: MatRef) -> PackedB {
        let cols_pad = b.cols.div_ceil(NR) * NR;
        let mut panels = Panels::zeroed(cols_pad * b.rows);
        let step = k_block(b.rows);
        for pc in (0..b.rows).step_by(step) {
            let kc = step.min(b.rows - pc);
            let dst = panels.as_mut_slice(pc * cols_pad, cols_pad * kc);
            pack::pack_b(dst, &b, pc, kc, 0, b.cols);
        }
        PackedB {
            rows: b.rows,
            cols: b.cols,
            cols_pad,
            panels,
        }
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    fn block(&self, pc: usize, kc: usize, jc: usize) -> *const f32 {
        self.panels.ptr_at(pc * self.cols_pad + jc * kc)
    }
}

/// The left operand of a product.
#[derive(Clone, Copy, Debug)]
pub enum Lhs<'a> {
    Mat(MatRef<'a>),
    Packed(&'a PackedA),
}

impl Lhs<'_> {
    fn dims(&self) -> (usize, usize) {
        match self {
            Lhs::Mat(m) => (m.rows, m.cols),
            Lhs::Packed(p) => (p.rows, p.cols),
        }
    }
}

impl<'a> From<MatRef<'a>> for Lhs<'a> {
    fn from(m: MatRef<'a>) -> Self {
        Lhs::Mat(m)
    }
}

impl<'a> From<&'a PackedA> for Lhs<'a> {
    fn from(p: &'a PackedA) -> Self {
        Lhs::Packed(p)
    }
}

/// The right operand of a product.
#[derive(Clone, Copy, Debug)]
pub enum Rhs<'a> {
    Mat(MatRef<'a>),
    Packed(&'a PackedB),
    Gather(GatherRef<'a>),
}

impl Rhs<'_> {
    fn dims(&self) -> (usize, usize) {
        match self {
            Rhs::Mat(m) => (m.rows, m.cols),
            Rhs::Packed(p) => (p.rows, p.cols),
            Rhs::Gather(g) => (g.rows(), g.cols()),
        }
    }
}

impl<'a> From<MatRef<'a>> for Rhs<'a> {
    fn from(m: MatRef<'a>) -> Self {
        Rhs::Mat(m)
    }
}

impl<'a> From<&'a PackedB> for Rhs<'a> {
    fn from(p: &'a PackedB) -> Self {
        Rhs::Packed(p)
    }
}

impl<'a> From<GatherRef<'a>> for Rhs<'a> {
    fn from(g: GatherRef<'a>) -> Self {
        Rhs::Gather(g)
    }
}

/// A bias added to the product: one value per output row or one per output column.
#[derive(Clone, Copy, Debug, Default)]
pub enum Bias<'a> {
    #[default]
    None,
    PerRow(&'a [f32]),
    PerCol(&'a [f32]),
}

/// What happens to the output after the product: bias, then activation.
#[derive(Clone, Copy, Debug, Default)]
pub struct Epilogue<'a> {
    pub bias: Bias<'a>,
    pub act: Option<Activation>,
}

/// `C = act(alpha * A * B + beta * C + bias)` using rayon's current thread count.
/// When `beta == 0`, C is write-only (its old contents may be anything, even NaN).
pub fn gemm(alpha: f32, a: Lhs, b: Rhs, beta: f32, c: MatMut, epi: Epilogue) -> Result<()> {
    gemm_threads(rayon::current_num_threads(), alpha, a, b, beta, c, epi)
}

/// As [`gemm`] with at most `threads` threads (1: never touches rayon).
pub fn gemm_threads(
    threads: usize,
    alpha: f32,
    a: Lhs,
    b: Rhs,
    beta: f32,
    c: MatMut,
    epi: Epilogue,
) -> Result<()> {
    let (m, k) = a.dims();
    let (kb, n) = b.dims();
    if kb != k || c.rows != m || c.cols != n {
        return Err(Error::Shape(format!(
            "gemm: A is {m}x{k}, B is {kb}x{n}, C is {}x{}",
            c.rows, c.cols
        )));
    }
    match epi.bias {
        Bias::PerRow(v) if v.len() != m => {
            return Err(Error::Shape(format!(
                "gemm: row bias has {} values for {m} rows",
                v.len()
            )))
        }
        Bias::PerCol(v) if v.len() != n => {
            return Err(Error::Shape(format!(
                "gemm: column bias has {} values for {n} columns",
                v.len()
            )))
        }
        _ => {}
    }
    if m == 0 || n == 0 {
        return Ok(());
    }
    if k == 0 {
        scale_only(beta, c, epi);
        return Ok(());
    }
    let job = Job {
        m,
        n,
        k,
        alpha,
        beta,
        a,
        b,
        c: SyncPtr(c.data.as_mut_ptr()),
        ldc: c.ld,
        epi,
        avx: has_avx2_fma(),
    };
    let (split_n, parts) = plan(&job, threads);
    if parts <= 1 {
        // SAFETY: `c` was validated to hold an m x n matrix with stride ldc, and the operands
        // were validated at construction; this thread has exclusive access to `c`.
        unsafe { job.run_block(0, m, 0, n) };
        return Ok(());
    }
    let (units, unit) = if split_n {
        (n.div_ceil(NR), NR)
    } else {
        (m.div_ceil(MR), MR)
    };
    (0..parts).into_par_iter().for_each(|t| {
        let lo = (t * units / parts * unit).min(if split_n { n } else { m });
        let hi = ((t + 1) * units / parts * unit).min(if split_n { n } else { m });
        if lo >= hi {
            return;
        }
        // SAFETY: the parts cover disjoint row (or column) ranges of C, so no two threads
        // write the same element; everything else is read-only.
        unsafe {
            if split_n {
                job.run_block(0, m, lo, hi)
            } else {
                job.run_block(lo, hi, 0, n)
            }
        }
    });
    Ok(())
}

/// The plain triple-loop definition, kept as the reference the fast paths are tested against.
pub fn gemm_reference(
    alpha: f32,
    a: MatRef,
    b: MatRef,
    beta: f32,
    c: MatMut,
    epi: Epilogue,
) -> Result<()> {
    reference_impl(alpha, |i, p| a.at(i, p), (a.rows, a.cols), b, beta, c, epi)
}

/// [`gemm_reference`] with an implicit right operand.
pub fn gemm_reference_gather(
    alpha: f32,
    a: MatRef,
    b: GatherRef,
    beta: f32,
    c: MatMut,
    epi: Epilogue,
) -> Result<()> {
    let dense: Vec<f32> = (0..b.rows())
        .flat_map(|p| (0..b.cols()).map(move |j| b.at(p, j)))
        .collect();
    let bm = MatRef::row_major(&dense, b.rows(), b.cols())?;
    gemm_reference(alpha, a, bm, beta, c, epi)
}

fn reference_impl(
    alpha: f32,
    a_at: impl Fn(usize, usize) -> f32,
    (m, k): (usize, usize),
    b: MatRef,
    beta: f32,
    c: MatMut,
    epi: Epilogue,
) -> Result<()> {
    let bias_ok = match epi.bias {
        Bias::None => true,
        Bias::PerRow(r) => r.len() == m,
        Bias::PerCol(cb) => cb.len() == b.cols,
    };
    if b.rows != k || c.rows != m || c.cols != b.cols || !bias_ok {
        return Err(Error::Shape("gemm_reference: shapes disagree".into()));
    }
    for i in 0..m {
        for j in 0..b.cols {
            let mut acc = 0.0f32;
            for p in 0..k {
                acc += a_at(i, p) * b.at(p, j);
            }
            let d = &mut c.data[i * c.ld + j];
            let mut v = alpha * acc;
            if beta != 0.0 {
                v += beta * *d;
            }
            v += match epi.bias {
                Bias::None => 0.0,
                Bias::PerRow(r) => r[i],
                Bias::PerCol(cb) => cb[j],
            };
            *d = epi.act.map_or(v, |f| f.apply_scalar(v));
        }
    }
    Ok(())
}

/// K == 0: the product is zero, only `beta * C + bias` and the activation remain.
fn scale_only(beta: f32, c: MatMut, epi: Epilogue) {
    for i in 0..c.rows {
        for j in 0..c.cols {
            let d = &mut c.data[i * c.ld + j];
            let mut v = if beta != 0.0 { beta * *d } else { 0.0 };
            v += match epi.bias {
                Bias::None => 0.0,
                Bias::PerRow(r) => r[i],
                Bias::PerCol(cb) => cb[j],
            };
            *d = epi.act.map_or(v, |f| f.apply_scalar(v));
        }
    }
}

#[derive(Clone, Copy)]
struct SyncPtr(*mut f32);
// SAFETY: the pointer is only dereferenced by `Job::run_block` on disjoint parts of C.
unsafe impl Send for SyncPtr {}
unsafe impl Sync for SyncPtr {}

struct Job<'a> {
    m: usize,
    n: usize,
    k: usize,
    alpha: f32,
    beta: f32,
    a: Lhs<'a>,
    b: Rhs<'a>,
    c: SyncPtr,
    ldc: usize,
    epi: Epilogue<'a>,
    avx: bool,
}

/// Whether to split over columns (else rows) and into how many parts. The part that is not
/// split has its operand packed by every thread, so prefer the split that repacks nothing
/// or the smaller operand, weighted against load imbalance.
fn plan(job: &Job, threads: usize) -> (bool, usize) {
    let macs = job.m.saturating_mul(job.n).saturating_mul(job.k);
    if threads <= 1 || macs < PAR_MIN_MACS {
        return (false, 1);
    }
    let mu = job.m.div_ceil(MR);
    let nu = job.n.div_ceil(NR);
    let repack_a = matches!(job.a, Lhs::Mat(_));
    let repack_b = !matches!(job.b, Rhs::Packed(_));
    let cost = |units: usize, unit: usize, other: usize, repack: usize| {
        let t = threads.min(units);
        (units.div_ceil(t) * unit * other * job.k) + repack * job.k * 4 * (t - 1)
    };
    let cost_n = cost(nu, NR, job.m, if repack_a { job.m } else { 0 });
    let cost_m = cost(mu, MR, job.n, if repack_b { job.n } else { 0 });
    if cost_n <= cost_m {
        (true, threads.min(nu))
    } else {
        (false, threads.min(mu))
    }
}

impl Job<'_> {
    /// Computes `C[m0..m1, n0..n1]` on the calling thread. `m0` is a multiple of MR and `n0`
    /// of NR, so blocks of packed operands line up with their panels.
    ///
    /// # Safety
    /// No other thread may access this part of C meanwhile.
    unsafe fn run_block(&self, m0: usize, m1: usize, n0: usize, n1: usize) {
        let k = self.k;
        let a_len = match self.a {
            Lhs::Mat(_) => MC.min(m1 - m0).div_ceil(MR) * MR * k_block(k),
            Lhs::Packed(_) => 0,
        };
        let b_len = match self.b {
            Rhs::Packed(_) => 0,
            // Gathered packing may write one run past the last panel.
            _ => NC.min(n1 - n0).div_ceil(NR) * NR * k_block(k) + NR,
        };
        scratch::with_f32(a_len, |abuf| {
            scratch::with_f32(b_len, |bbuf| {
                let mut jc = n0;
                while jc < n1 {
                    let nc = NC.min(n1 - jc);
                    let mut pc = 0;
                    while pc < k {
                        let kc = k_block(k).min(k - pc);
                        let bp = match self.b {
                            Rhs::Packed(p) => p.block(pc, kc, jc),
                            Rhs::Mat(mat) => {
                                pack::pack_b(bbuf, &mat, pc, kc, jc, nc);
                                bbuf.as_ptr()
                            }
                            Rhs::Gather(g) => {
                                pack::pack_b_gather(bbuf, &g, pc, kc, jc, nc, self.avx);
                                bbuf.as_ptr()
                            }
                        };
                        let mut ic = m0;
                        while ic < m1 {
                            let mc = MC.min(m1 - ic);
                            let ap = match self.a {
                                Lhs::Packed(p) => p.block(pc, kc, ic),
                                Lhs::Mat(mat) => {
                                    pack::pack_a(abuf, &mat, ic, mc, pc, kc);
                                    abuf.as_ptr()
                                }
                            };
                            self.macro_kernel(ap, bp, (ic, mc), (jc, nc), (pc, kc));
                            ic += mc;
                        }
                        pc += kc;
                    }
                    jc += nc;
                }
            })
        });
    }

    /// All tiles of one packed A block times one packed B block.
    unsafe fn macro_kernel(
        &self,
        ap: *const f32,
        bp: *const f32,
        (ic, mc): (usize, usize),
        (jc, nc): (usize, usize),
        (pc, kc): (usize, usize),
    ) {
        let mut ep = TileEpi {
            alpha: self.alpha,
            beta: self.beta,
            first: pc == 0,
            last: pc + kc == self.k,
            row_bias: std::ptr::null(),
            col_bias: std::ptr::null(),
            act: self.epi.act,
        };
        for jr in (0..nc).step_by(NR) {
            let cols = NR.min(nc - jr);
            let b_panel = bp.add(jr * kc);
            if let Bias::PerCol(v) = self.epi.bias {
                ep.col_bias = v.as_ptr().add(jc + jr);
            }
            for ir in (0..mc).step_by(MR) {
                let rows = MR.min(mc - ir);
                if let Bias::PerRow(v) = self.epi.bias {
                    ep.row_bias = v.as_ptr().add(ic + ir);
                }
                let tile = CTile {
                    ptr: self.c.0.add((ic + ir) * self.ldc + jc + jr),
                    ld: self.ldc,
                    rows,
                    cols,
                };
                let f = micro::select(rows, cols, self.avx);
                f(kc, ap.add(ir * kc), b_panel, &tile, &ep);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::simd::portable_only;
    use crate::kernels::testutil::{assert_close, Rng};

    struct Case {
        m: usize,
        n: usize,
        k: usize,
        trans_a: bool,
        trans_b: bool,
        pad: usize,
        alpha: f32,
        beta: f32,
        bias: u8,
        act: Option<Activation>,
    }

    fn check(case: &Case, threads: usize, rng: &mut Rng) {
        let Case { m, n, k, pad, .. } = *case;
        // Stored with extra leading-dimension padding to exercise strides.
        let (ar, ac) = if case.trans_a { (k, m) } else { (m, k) };
        let a_data = rng.vec(ar * (ac + pad));
        let mut a = MatRef::with_ld(&a_data, ar, ac, ac + pad).unwrap();
        if case.trans_a {
            a = a.t();
        }
        let (br, bc) = if case.trans_b { (n, k) } else { (k, n) };
        let b_data = rng.vec(br * (bc + pad));
        let mut b = MatRef::with_ld(&b_data, br, bc, bc + pad).unwrap();
        if case.trans_b {
            b = b.t();
        }
        let ldc = n + pad;
        let c0 = rng.vec(m * ldc);
        let row_bias = rng.vec(m);
        let col_bias = rng.vec(n);
        let epi = Epilogue {
            bias: match case.bias {
                1 => Bias::PerRow(&row_bias),
                2 => Bias::PerCol(&col_bias),
                _ => Bias::None,
            },
            act: case.act,
        };
        let mut want = c0.clone();
        gemm_reference(
            case.alpha,
            a,
            b,
            case.beta,
            MatMut::new(&mut want, m, n, ldc).unwrap(),
            epi,
        )
        .unwrap();
        let packed_a = PackedA::new(a);
        let packed_b = PackedB::new(b);
        let lhs = [Lhs::Mat(a), Lhs::Packed(&packed_a)];
        let rhs = [Rhs::Mat(b), Rhs::Packed(&packed_b)];
        for l in lhs {
            for r in rhs {
                let mut got = c0.clone();
                gemm_threads(
                    threads,
                    case.alpha,
                    l,
                    r,
                    case.beta,
                    MatMut::new(&mut got, m, n, ldc).unwrap(),
                    epi,
                )
                .unwrap();
                assert_close(&got, &want, 1e-4, &format!("m{m} n{n} k{k} t{threads}"));
            }
        }
    }

    #[test]
    fn matches_reference_on_many_shapes() {
        let mut rng = Rng::new(7);
        let acts = [
            None,
            Some(Activation::Relu),
            Some(Activation::HardSwish),
            Some(Activation::Sigmoid),
        ];
        let shapes = [
            (1, 1, 1),
            (1, 10, 128),
            (6, 16, 8),
            (7, 17, 9),
            (13, 33, 300),
            (97, 5, 40),
            (20, 100, 3),
            (100, 37, 257),
        ];
        let mut i = 0;
        for &(m, n, k) in &shapes {
            for threads in [1, 3] {
                i += 1;
                let case = Case {
                    m,
                    n,
                    k,
                    trans_a: i % 2 == 0,
                    trans_b: i % 3 == 0,
                    pad: i % 3,
                    alpha: if i % 4 == 0 { 0.5 } else { 1.0 },
                    beta: [0.0, 1.0, -0.75][i % 3],
                    bias: (i % 3) as u8,
                    act: acts[i % acts.len()],
                };
                check(&case, threads, &mut rng);
            }
        }
    }

    #[test]
    fn portable_kernel_matches_reference() {
        let mut rng = Rng::new(5);
        portable_only(|| {
            for (m, n, k) in [(7, 19, 5), (13, 40, 300)] {
                let case = Case {
                    m,
                    n,
                    k,
                    trans_a: false,
                    trans_b: true,
                    pad: 0,
                    alpha: 2.0,
                    beta: 1.0,
                    bias: 2,
                    act: Some(Activation::HardSwish),
                };
                check(&case, 2, &mut rng);
            }
        });
    }

    #[test]
    fn every_tile_shape_matches_reference() {
        // Every rows x cols remainder of the tiles, with and without a partial K block.
        let mut rng = Rng::new(8);
        for m in 1..=2 * MR + 1 {
            for n in [1, 5, NR, NR + 3, 2 * NR, 2 * NR + 1] {
                let case = Case {
                    m,
                    n,
                    k: if m % 2 == 0 { 3 } else { KC + 2 },
                    trans_a: false,
                    trans_b: false,
                    pad: 1,
                    alpha: if m % 3 == 0 { 0.5 } else { 1.0 },
                    beta: if n % 2 == 0 { 1.0 } else { 0.0 },
                    bias: (m % 3) as u8,
                    act: [
                        None,
                        Some(Activation::LeakyRelu { alpha: 0.1 }),
                        Some(Activation::Sigmoid),
                    ][m % 3],
                };
                check(&case, 1, &mut rng);
            }
        }
    }

    #[test]
    fn wide_and_tall_blocks_cross_block_edges() {
        let mut rng = Rng::new(3);
        for (m, n, k) in [(7, NC + 21, 5), (MC * 2 + 5, 9, 3), (2, 3, KC * 2 + 1)] {
            let case = Case {
                m,
                n,
                k,
                trans_a: false,
                trans_b: false,
                pad: 1,
                alpha: 1.0,
                beta: 0.0,
                bias: 1,
                act: Some(Activation::Relu),
            };
            check(&case, 2, &mut rng);
        }
    }

    #[test]
    fn beta_zero_ignores_nan_in_c_and_k_zero_keeps_bias() {
        let a = [1.0f32, 2.0];
        let b = [3.0f32, 4.0];
        let mut c = [f32::NAN];
        gemm(
            1.0,
            MatRef::row_major(&a, 1, 2).unwrap().into(),
            MatRef::row_major(&b, 2, 1).unwrap().into(),
            0.0,
            MatMut::row_major(&mut c, 1, 1).unwrap(),
            Epilogue::default(),
        )
        .unwrap();
        assert_eq!(c[0], 11.0);
        let mut c = [2.0f32, 2.0];
        let bias = [1.0f32, -5.0];
        gemm(
            1.0,
            MatRef::row_major(&[], 1, 0).unwrap().into(),
            MatRef::row_major(&[], 0, 2).unwrap().into(),
            0.5,
            MatMut::row_major(&mut c, 1, 2).unwrap(),
            Epilogue {
                bias: Bias::PerCol(&bias),
                act: Some(Activation::Relu),
            },
        )
        .unwrap();
        assert_eq!(c, [2.0, 0.0]);
    }

    #[test]
    fn gather_operand_matches_dense() {
        let mut rng = Rng::new(11);
        let base = rng.vec(400 + GATHER_SLACK);
        let row_off: Vec<usize> = (0..19).map(|p| p * 13 + (p % 3)).collect();
        // Mix contiguous runs and jumps.
        let col_off: Vec<usize> = (0..40)
            .map(|j| if j < 20 { j } else { 2 * j + 3 })
            .collect();
        let g = GatherRef::new(&base, &row_off, &col_off).unwrap();
        let w = rng.vec(5 * 19);
        let a = MatRef::row_major(&w, 5, 19).unwrap();
        let mut want = vec![0.0; 5 * 40];
        gemm_reference_gather(
            1.0,
            a,
            g,
            0.0,
            MatMut::row_major(&mut want, 5, 40).unwrap(),
            Epilogue::default(),
        )
        .unwrap();
        let pa = PackedA::new(a);
        for threads in [1, 2] {
            let mut got = vec![0.0; 5 * 40];
            gemm_threads(
                threads,
                1.0,
                Lhs::Packed(&pa),
                g.into(),
                0.0,
                MatMut::row_major(&mut got, 5, 40).unwrap(),
                Epilogue::default(),
            )
            .unwrap();
            assert_close(&got, &want, 1e-5, "gather");
        }
        assert!(GatherRef::new(&base, &[395], &[10]).is_err());
        let mut got = vec![0.0; 5 * 40];
        portable_only(|| {
            gemm_threads(
                1,
                1.0,
                Lhs::Packed(&pa),
                g.into(),
                0.0,
                MatMut::row_major(&mut got, 5, 40).unwrap(),
                Epilogue::default(),
            )
        })
        .unwrap();
        assert_close(&got, &want, 1e-5, "gather portable");
    }

    #[test]
    fn bad_shapes_are_errors() {
        let d = [0.0f32; 6];
        assert!(MatRef::new(&d, 2, 3, 3, 1).is_ok());
        assert!(MatRef::new(&d, 2, 4, 3, 1).is_err());
        assert!(MatRef::new(&d, 3, 2, usize::MAX, 1).is_err());
        let mut c = [0.0f32; 4];
        let a = MatRef::row_major(&d, 2, 3).unwrap();
        let b = MatRef::row_major(&d, 2, 3).unwrap();
        let err = gemm(
            1.0,
            a.into(),
            b.into(),
            0.0,
            MatMut::row_major(&mut c, 2, 2).unwrap(),
            Epilogue::default(),
        );
        assert!(err.is_err());
    }
}
