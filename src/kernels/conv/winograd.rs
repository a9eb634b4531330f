//! Winograd minimal-filtering convolution (Lavin & Gray 2016) for stride-1, undilated,
//! ungrouped 3x3 and 5x5 convolutions: `F(4x4, 3x3)` on 6x6 tiles and `F(4x4, 5x5)` on 8x8
//! tiles, both with the well-conditioned interpolation points 0, ±1, ±2 (±1/2 for the 8x8
//! tiles) and infinity.
//!
//! The direct and im2col routes are at the FMA bound already; Winograd does fewer
//! multiplications: per output tile of `m x m` and each channel pair, `alpha^2` products
//! instead of `m^2 r^2` (36 instead of 144 for 3x3, 64 instead of 400 for 5x5). The work is:
//!
//! 1. the filters are transformed once, `U = G g G^T`, and kept as `alpha^2` packed
//!    `C_in x C_out` GEMM operands;
//! 2. the input is copied to zero-padded, channel-last planes (`[y][x][C_in]`), so a tile's
//!    taps for eight channels are one vector, and every tile, partial ones included, reads
//!    inside the buffer;
//! 3. per block of tiles, `V = B^T d B` for every tile and channel, laid out as `alpha^2`
//!    row-major `tiles x C_in` matrices;
//! 4. `alpha^2` products `M = V U` (lithe's packed SGEMM);
//! 5. `Y = A^T M A`, bias and activation, per tile and eight output channels, and the valid
//!    part of the tile is stored to NCHW.
//!
//! Transforms run on eight-channel vectors (AVX2/FMA, or a portable form of the same code),
//! written as the usual shared sums and differences; the matrices are kept to transform the
//! filters and to test those.

use rayon::prelude::*;

use super::{Conv2d, Conv2dGeom, PoolStage};
use crate::error::{Error, Result};
use crate::ir::checked_numel;
use crate::kernels::activation::Activation;
use crate::kernels::gemm::{self, Epilogue, Lhs, MatMut, MatRef, PackedB, Rhs};
use crate::kernels::pool::pool2d;
use crate::kernels::scratch;
use crate::kernels::simd::has_avx2_fma;

/// Channels per transform vector.
const L: usize = 8;
/// Bytes of one block's transformed tiles (`V` and `M`): the products should find them in
/// L2 (1 MiB per core on the machines this was tuned on).
const BLOCK_BYTES: usize = 512 << 10;
/// Most tiles per block: beyond this the products are large enough already.
const MAX_BLOCK_TILES: usize = 192;

/// Fewest input and output channels for which the transforms pay for themselves: they cost
/// `O(C_in + C_out)` per tile, the products save `O(C_in * C_out)`.
const MIN_C_IN: usize = 8;
const MIN_C_OUT: usize = 16;

/// A tile size: `m x m` outputs from `alpha x alpha` inputs with an `r x r` filter.
trait Tile<const A: usize, const M: usize, const R: usize> {
    /// `B^T` (`alpha x alpha`): the input transform. The run-time code uses [`Tile::bt`];
    /// the table is its definition, checked by the tests.
    #[allow(dead_code)]
    const BT: [[f32; A]; A];
    /// `A^T` (`m x alpha`): the output transform, likewise kept for the tests.
    #[allow(dead_code)]
    const AT: [[f32; A]; M];
    /// `G` (`alpha x r`): the filter transform, applied once in f64.
    const G: [[f64; R]; A];
    /// `B^T d` for one column of vectors, written out as shared sums and differences
    /// (the compiler does not drop zero or unit coefficients of a table by itself).
    unsafe fn bt<V: Lanes>(d: &[V; A]) -> [V; A];
    /// `A^T m` for one column of vectors.
    unsafe fn at<V: Lanes>(m: &[V; A]) -> [V; M];
}

/// `F(4x4, 3x3)` (6x6 tiles), points 0, 1, -1, 2, -2, infinity.
struct F43;
impl Tile<6, 4, 3> for F43 {
    const BT: [[f32; 6]; 6] = [
        [4.0, 0.0, -5.0, 0.0, 1.0, 0.0],
        [0.0, -4.0, -4.0, 1.0, 1.0, 0.0],
        [0.0, 4.0, -4.0, -1.0, 1.0, 0.0],
        [0.0, -2.0, -1.0, 2.0, 1.0, 0.0],
        [0.0, 2.0, -1.0, -2.0, 1.0, 0.0],
        [0.0, 4.0, 0.0, -5.0, 0.0, 1.0],
    ];
    const AT: [[f32; 6]; 4] = [
        [1.0, 1.0, 1.0, 1.0, 1.0, 0.0],
        [0.0, 1.0, -1.0, 2.0, -2.0, 0.0],
        [0.0, 1.0, 1.0, 4.0, 4.0, 0.0],
        [0.0, 1.0, -1.0, 8.0, -8.0, 1.0],
    ];
    const G: [[f64; 3]; 6] = [
        [0.25, 0.0, 0.0],
        [-1.0 / 6.0, -1.0 / 6.0, -1.0 / 6.0],
        [-1.0 / 6.0, 1.0 / 6.0, -1.0 / 6.0],
        [1.0 / 24.0, 1.0 / 12.0, 1.0 / 6.0],
        [1.0 / 24.0, -1.0 / 12.0, 1.0 / 6.0],
        [0.0, 0.0, 1.0],
    ];
    #[inline(always)]
    unsafe fn bt<V: Lanes>(d: &[V; 6]) -> [V; 6] {
        let t0 = d[4].fma(-4.0, d[2]);
        let t1 = d[3].fma(-4.0, d[1]);
        let t2 = d[4].sub(d[2]);
        let t3 = d[3].sub(d[1]);
        [
            d[4].fma(-5.0, d[2]).fma(4.0, d[0]),
            t0.add(t1),
            t0.sub(t1),
            t2.fma(2.0, t3),
            t2.fma(-2.0, t3),
            d[5].fma(-5.0, d[3]).fma(4.0, d[1]),
        ]
    }
    #[inline(always)]
    unsafe fn at<V: Lanes>(m: &[V; 6]) -> [V; 4] {
        let (a, b) = (m[1].add(m[2]), m[1].sub(m[2]));
        let (c, d) = (m[3].add(m[4]), m[3].sub(m[4]));
        [
            m[0].add(a).add(c),
            b.fma(2.0, d),
            a.fma(4.0, c),
            b.add(m[5]).fma(8.0, d),
        ]
    }
}

/// `F(4x4, 5x5)` (8x8 tiles), points 0, 1, -1, 2, -2, 1/2, -1/2, infinity.
struct F45;
impl Tile<8, 4, 5> for F45 {
    const BT: [[f32; 8]; 8] = [
        [-1.0, 0.0, 5.25, 0.0, -5.25, 0.0, 1.0, 0.0],
        [0.0, 1.0, 1.0, -4.25, -4.25, 1.0, 1.0, 0.0],
        [0.0, -1.0, 1.0, 4.25, -4.25, -1.0, 1.0, 0.0],
        [0.0, 0.5, 0.25, -2.5, -1.25, 2.0, 1.0, 0.0],
        [0.0, -0.5, 0.25, 2.5, -1.25, -2.0, 1.0, 0.0],
        [0.0, 2.0, 4.0, -2.5, -5.0, 0.5, 1.0, 0.0],
        [0.0, -2.0, 4.0, 2.5, -5.0, -0.5, 1.0, 0.0],
        [0.0, -1.0, 0.0, 5.25, 0.0, -5.25, 0.0, 1.0],
    ];
    const AT: [[f32; 8]; 4] = [
        [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0],
        [0.0, 1.0, -1.0, 2.0, -2.0, 0.5, -0.5, 0.0],
        [0.0, 1.0, 1.0, 4.0, 4.0, 0.25, 0.25, 0.0],
        [0.0, 1.0, -1.0, 8.0, -8.0, 0.125, -0.125, 1.0],
    ];
    const G: [[f64; 5]; 8] = [
        [-1.0, 0.0, 0.0, 0.0, 0.0],
        [-2.0 / 9.0, -2.0 / 9.0, -2.0 / 9.0, -2.0 / 9.0, -2.0 / 9.0],
        [-2.0 / 9.0, 2.0 / 9.0, -2.0 / 9.0, 2.0 / 9.0, -2.0 / 9.0],
        [1.0 / 90.0, 1.0 / 45.0, 2.0 / 45.0, 4.0 / 45.0, 8.0 / 45.0],
        [1.0 / 90.0, -1.0 / 45.0, 2.0 / 45.0, -4.0 / 45.0, 8.0 / 45.0],
        [32.0 / 45.0, 16.0 / 45.0, 8.0 / 45.0, 4.0 / 45.0, 2.0 / 45.0],
        [
            32.0 / 45.0,
            -16.0 / 45.0,
            8.0 / 45.0,
            -4.0 / 45.0,
            2.0 / 45.0,
        ],
        [0.0, 0.0, 0.0, 0.0, 1.0],
    ];
    #[inline(always)]
    unsafe fn bt<V: Lanes>(d: &[V; 8]) -> [V; 8] {
        let e1 = d[6].fma(-4.25, d[4]).add(d[2]);
        let o1 = d[5].fma(-4.25, d[3]).add(d[1]);
        let e3 = d[6].fma(-1.25, d[4]).fma(0.25, d[2]);
        let o3 = d[5].scale(2.0).fma(-2.5, d[3]).fma(0.5, d[1]);
        let e5 = d[6].fma(-5.0, d[4]).fma(4.0, d[2]);
        let o5 = d[5].scale(0.5).fma(-2.5, d[3]).fma(2.0, d[1]);
        [
            d[6].sub(d[0]).fma(5.25, d[2].sub(d[4])),
            e1.add(o1),
            e1.sub(o1),
            e3.add(o3),
            e3.sub(o3),
            e5.add(o5),
            e5.sub(o5),
            d[7].sub(d[1]).fma(5.25, d[3].sub(d[5])),
        ]
    }
    #[inline(always)]
    unsafe fn at<V: Lanes>(m: &[V; 8]) -> [V; 4] {
        let (a, b) = (m[1].add(m[2]), m[1].sub(m[2]));
        let (c, d) = (m[3].add(m[4]), m[3].sub(m[4]));
        let (e, f) = (m[5].add(m[6]), m[5].sub(m[6]));
        [
            m[0].add(a).add(c).add(e),
            b.fma(2.0, d).fma(0.5, f),
            a.fma(4.0, c).fma(0.25, e),
            b.add(m[7]).fma(8.0, d).fma(0.125, f),
        ]
    }
}

/// Which tile size a plan uses.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
    F43,
    F45,
}

impl Kind {
    /// `(alpha, m, r)`.
    fn dims(self) -> (usize, usize, usize) {
        match self {
            Kind::F43 => (6, 4, 3),
            Kind::F45 => (8, 4, 5),
        }
    }
}

/// Transformed filters of one convolution.
#[derive(Clone, Debug)]
pub(super) struct Plan {
    kind: Kind,
    /// Per tile position `(xi, nu)`: `U^T`, `C_in x C_out`, packed.
    u: Vec<PackedB>,
    /// Bias padded with zeros to a whole number of vectors.
    bias: Vec<f32>,
    act: Option<Activation>,
}

/// True when the environment variable `LITHE_WINOGRAD` is `off`: every convolution then
/// takes the direct or lowered route, to compare results or speed in one build. Read once.
pub(super) fn disabled() -> bool {
    static OFF: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    #[cfg(test)]
    if NO_WINOGRAD.with(|p| p.get()) {
        return true;
    }
    *OFF.get_or_init(|| std::env::var("LITHE_WINOGRAD").as_deref() == Ok("off"))
}

#[cfg(test)]
thread_local! {
    static NO_WINOGRAD: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f` with Winograd disabled on this thread (tests only; kernels decide on the
/// calling thread).
#[cfg(test)]
pub fn without<R>(f: impl FnOnce() -> R) -> R {
    NO_WINOGRAD.with(|p| p.set(true));
    let r = f();
    NO_WINOGRAD.with(|p| p.set(false));
    r
}

/// Whether a convolution of this geometry can run as Winograd at all (the input size is
/// checked per call by [`Plan::worth`]).
pub(super) fn eligible(g: &Conv2dGeom) -> bool {
    g.groups == 1
        && g.stride == [1, 1]
        && g.dilation == [1, 1]
        && (g.kernel == [3, 3] || g.kernel == [5, 5])
        && g.c_in >= MIN_C_IN
        && g.c_out >= MIN_C_OUT
}

impl Plan {
    /// Transforms `weight` (`[C_out, C_in, r, r]`); callers check [`eligible`].
    pub(super) fn new(
        g: &Conv2dGeom,
        weight: &[f32],
        bias: Option<&[f32]>,
        act: Option<Activation>,
    ) -> Result<Plan> {
        let kind = if g.kernel == [3, 3] {
            Kind::F43
        } else {
            Kind::F45
        };
        let u = match kind {
            Kind::F43 => transform_filters::<F43, 6, 4, 3>(g, weight)?,
            Kind::F45 => transform_filters::<F45, 8, 4, 5>(g, weight)?,
        };
        let mut b = vec![0.0; g.c_out.next_multiple_of(L)];
        if let Some(bias) = bias {
            b[..g.c_out].copy_from_slice(bias);
        }
        Ok(Plan {
            kind,
            u,
            bias: b,
            act,
        })
    }

    /// Whether Winograd beats the lowered route for `n` images of `h x w` with `pads`:
    /// enough tiles to amortise the per-block products, and not so much padding of partial
    /// tiles that the saving is lost.
    pub(super) fn worth(&self, (oh, ow): (usize, usize)) -> bool {
        let (_, m, r) = self.kind.dims();
        let tiles = oh.div_ceil(m) * ow.div_ceil(m);
        // Multiplications per output relative to the direct route, including the outputs
        // computed and dropped in partial tiles.
        let useful = (oh * ow) as f64 / (tiles * m * m) as f64;
        let saving = (m * m * r * r) as f64 / (self.alpha2() as f64) * useful;
        oh >= 2 && ow >= 2 && saving >= 2.0
    }

    fn alpha2(&self) -> usize {
        let (a, _, _) = self.kind.dims();
        a * a
    }
}

/// `U = G g G^T` per channel pair, computed in f64, stored as one packed `C_in x C_out`
/// matrix per tile position.
fn transform_filters<T: Tile<A, M, R>, const A: usize, const M: usize, const R: usize>(
    g: &Conv2dGeom,
    weight: &[f32],
) -> Result<Vec<PackedB>> {
    let (ci_n, co_n) = (g.c_in, g.c_out);
    if weight.len() != co_n * ci_n * R * R {
        return Err(Error::Shape(format!(
            "winograd: weight has {} values for {co_n} x {ci_n} x {R} x {R}",
            weight.len()
        )));
    }
    let mut u = vec![0.0f32; A * A * ci_n * co_n];
    for co in 0..co_n {
        for ci in 0..ci_n {
            let f = &weight[(co * ci_n + ci) * R * R..][..R * R];
            // t = G f (alpha x r), then U = t G^T (alpha x alpha).
            let mut t = [[0.0f64; R]; A];
            for (i, row) in t.iter_mut().enumerate() {
                for (j, v) in row.iter_mut().enumerate() {
                    *v = (0..R).map(|k| T::G[i][k] * f[k * R + j] as f64).sum();
                }
            }
            for (i, row) in t.iter().enumerate() {
                for j in 0..A {
                    let v: f64 = (0..R).map(|k| row[k] * T::G[j][k]).sum();
                    u[((i * A + j) * ci_n + ci) * co_n + co] = v as f32;
                }
            }
        }
    }
    u.chunks_exact(ci_n * co_n)
        .map(|c| MatRef::row_major(c, ci_n, co_n).map(PackedB::new))
        .collect()
}

/// Eight lanes of f32: the AVX register or a portable array, so the transforms are written
/// once. Methods are unsafe because the AVX form needs the CPU features; callers of the AVX
/// form run inside a function compiled for them.
trait Lanes: Copy {
    unsafe fn load(p: *const f32) -> Self;
    unsafe fn store(self, p: *mut f32);
    unsafe fn zero() -> Self;
    unsafe fn add(self, o: Self) -> Self;
    unsafe fn sub(self, o: Self) -> Self;
    unsafe fn scale(self, c: f32) -> Self;
    /// `self + c * x`.
    unsafe fn fma(self, c: f32, x: Self) -> Self;
    unsafe fn act(self, a: Activation) -> Self;
    /// Stores a full 4x4 output tile of eight channels, `y[i * 4 + j][channel]`, to
    /// `dst + channel * plane + i * row + j` if this form has a fast way to; false otherwise
    /// (the caller then stores one float at a time).
    #[inline(always)]
    unsafe fn store_tile4(_y: &[[f32; L]; 16], _dst: *mut f32, _plane: usize, _row: usize) -> bool {
        false
    }
}

#[derive(Clone, Copy)]
struct Portable([f32; L]);

impl Lanes for Portable {
    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self {
        Portable(std::ptr::read_unaligned(p as *const [f32; L]))
    }
    #[inline(always)]
    unsafe fn store(self, p: *mut f32) {
        std::ptr::write_unaligned(p as *mut [f32; L], self.0)
    }
    #[inline(always)]
    unsafe fn zero() -> Self {
        Portable([0.0; L])
    }
    #[inline(always)]
    unsafe fn add(self, o: Self) -> Self {
        Portable(std::array::from_fn(|i| self.0[i] + o.0[i]))
    }
    #[inline(always)]
    unsafe fn sub(self, o: Self) -> Self {
        Portable(std::array::from_fn(|i| self.0[i] - o.0[i]))
    }
    #[inline(always)]
    unsafe fn scale(self, c: f32) -> Self {
        Portable(self.0.map(|v| v * c))
    }
    #[inline(always)]
    unsafe fn fma(self, c: f32, x: Self) -> Self {
        Portable(std::array::from_fn(|i| self.0[i] + c * x.0[i]))
    }
    #[inline(always)]
    unsafe fn act(self, a: Activation) -> Self {
        Portable(self.0.map(|v| a.apply_scalar(v)))
    }
}

#[cfg(target_arch = "x86_64")]
mod avx {
    use super::{Activation, Lanes};
    use crate::kernels::simd::{avx, has_vector_form};
    use std::arch::x86_64::*;

    #[derive(Clone, Copy)]
    pub(super) struct Avx(__m256);

    impl Lanes for Avx {
        #[inline(always)]
        unsafe fn load(p: *const f32) -> Self {
            Avx(_mm256_loadu_ps(p))
        }
        #[inline(always)]
        unsafe fn store(self, p: *mut f32) {
            _mm256_storeu_ps(p, self.0)
        }
        #[inline(always)]
        unsafe fn zero() -> Self {
            Avx(_mm256_setzero_ps())
        }
        #[inline(always)]
        unsafe fn add(self, o: Self) -> Self {
            Avx(_mm256_add_ps(self.0, o.0))
        }
        #[inline(always)]
        unsafe fn sub(self, o: Self) -> Self {
            Avx(_mm256_sub_ps(self.0, o.0))
        }
        #[inline(always)]
        unsafe fn scale(self, c: f32) -> Self {
            Avx(_mm256_mul_ps(self.0, _mm256_set1_ps(c)))
        }
        #[inline(always)]
        unsafe fn fma(self, c: f32, x: Self) -> Self {
            Avx(_mm256_fmadd_ps(_mm256_set1_ps(c), x.0, self.0))
        }
        /// Two 8x8 transposes turn the position-major tile into four 4-float rows per
        /// channel, instead of 128 single-float stores.
        #[inline(always)]
        unsafe fn store_tile4(y: &[[f32; 8]; 16], dst: *mut f32, plane: usize, row: usize) -> bool {
            for half in 0..2 {
                let r: [__m256; 8] =
                    std::array::from_fn(|i| _mm256_loadu_ps(y[half * 8 + i].as_ptr()));
                // Channel c: its positions half*8 .. half*8 + 8, i.e. two output rows.
                let ch = crate::kernels::simd::avx::transpose8x8(r);
                for (c, v) in ch.iter().enumerate() {
                    let d = dst.add(c * plane + 2 * half * row);
                    _mm_storeu_ps(d, _mm256_castps256_ps128(*v));
                    _mm_storeu_ps(d.add(row), _mm256_extractf128_ps::<1>(*v));
                }
            }
            true
        }
        #[inline(always)]
        unsafe fn act(self, a: Activation) -> Self {
            if has_vector_form(a) {
                Avx(avx::act(self.0, a))
            } else {
                let mut v = [0.0f32; 8];
                _mm256_storeu_ps(v.as_mut_ptr(), self.0);
                Avx(_mm256_loadu_ps(v.map(|x| a.apply_scalar(x)).as_ptr()))
            }
        }
    }
}

/// The shapes one call shares between blocks.
struct Geometry {
    c_in: usize,
    c_out: usize,
    /// Channels rounded up to whole vectors: the row strides of the scratch matrices.
    cp_in: usize,
    cp_out: usize,
    /// Padded channel-last input planes: `hp x wp`.
    hp: usize,
    wp: usize,
    oh: usize,
    ow: usize,
    tiles_x: usize,
    /// Tiles per image.
    tiles: usize,
}

/// Where outputs go: NCHW planes of `oh x ow` for the images of one unit. Blocks of a
/// single image run in parallel and store to disjoint tiles of it, hence a pointer.
#[derive(Clone, Copy)]
struct OutPtr {
    ptr: *mut f32,
    len: usize,
}
// SAFETY: blocks write disjoint output tiles (see `OutPtr`), nothing reads them meanwhile.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

/// Convolves `x` (`[n, C_in, h, w]`) into `out` (`[n, C_out, oh, ow]`, or pooled).
#[allow(clippy::too_many_arguments)]
pub(super) fn run(
    conv: &Conv2d,
    plan: &Plan,
    x: &[f32],
    [n, h, w]: [usize; 3],
    pads: [usize; 4],
    (oh, ow): (usize, usize),
    pool: Option<&PoolStage>,
    out: &mut [f32],
    threads: usize,
) -> Result<()> {
    let g = &conv.geom;
    let (alpha, m, r) = plan.kind.dims();
    let (tiles_y, tiles_x) = (oh.div_ceil(m), ow.div_ceil(m));
    let geo = Geometry {
        c_in: g.c_in,
        c_out: g.c_out,
        cp_in: g.c_in.next_multiple_of(L),
        cp_out: g.c_out.next_multiple_of(L),
        hp: tiles_y * m + r - 1,
        wp: tiles_x * m + r - 1,
        oh,
        ow,
        tiles_x,
        tiles: tiles_y * tiles_x,
    };
    // Every input pixel lands inside the padded plane: hp >= oh + r - 1 = h + pads.
    if geo.hp < h + pads[0] || geo.wp < w + pads[1] {
        return Err(Error::Shape("winograd: padded plane too small".into()));
    }
    let img_in = checked_numel(&[geo.hp, geo.wp, geo.cp_in], 4)?;
    let per_tile = alpha * alpha * (geo.cp_in + geo.cp_out) * 4;
    // A multiple of the GEMM's row tile (6): partial row panels are packed and stored
    // one float at a time.
    let block = (BLOCK_BYTES / per_tile).clamp(L, MAX_BLOCK_TILES) / 6 * 6;
    // Units of whole images: enough tiles for a full block, and enough units for the threads.
    let mut per_unit = block.div_ceil(geo.tiles).max(1);
    if threads > 1 {
        per_unit = per_unit.min(n.div_ceil(threads)).max(1);
    }
    let units = n.div_ceil(per_unit);
    // The unit's scratch (padded input and unpooled output) must be allocatable.
    checked_numel(&[per_unit, img_in + g.c_out * oh * ow], 4)?;
    let pooled_hw = match pool {
        Some(p) => Some(p.geom.out_hw(oh, ow)?),
        None => None,
    };
    let in_len = per_unit * g.c_in * h * w;
    let out_len = per_unit * g.c_out * pooled_hw.map_or(oh * ow, |(ph, pw)| ph * pw);
    let par_units = threads > 1 && units > 1;
    let unit = |(xs, o): (&[f32], &mut [f32])| -> Result<()> {
        let images = xs.len() / (g.c_in * h * w);
        // Parallel blocks inside the unit only when the units themselves are not parallel.
        let block_threads = if par_units { 1 } else { threads };
        // One scratch buffer for the padded input and the unpooled output: the per-thread
        // pool keeps four buffers, and the block and the GEMM below take three more.
        let conv_len = pooled_hw.map_or(0, |_| images * g.c_out * oh * ow);
        scratch::with_f32(images * img_in + conv_len, |buf| {
            let (xin, t) = buf.split_at_mut(images * img_in);
            to_padded_channels_last(xs, [images, h, w], pads, &geo, xin);
            let xin = &*xin;
            let (Some(p), Some((ph, pw))) = (pool, pooled_hw) else {
                return blocks(plan, &geo, xin, images, block, o, block_threads);
            };
            let planes = o.len() / (ph * pw);
            blocks(plan, &geo, xin, images, block, t, block_threads)?;
            pool2d(&p.geom, p.kind, t, [planes, oh, ow], o)
        })
    };
    crate::kernels::par::for_each_unit(x, in_len, out, out_len, par_units, unit)
}

/// Copies NCHW images into zero-padded channel-last planes (`[y][x][cp_in]`).
fn to_padded_channels_last(
    x: &[f32],
    [n, h, w]: [usize; 3],
    pads: [usize; 4],
    geo: &Geometry,
    dst: &mut [f32],
) {
    let (cp, c_in) = (geo.cp_in, geo.c_in);
    let img = geo.hp * geo.wp * cp;
    let row = geo.wp * cp;
    for b in 0..n {
        let d = &mut dst[b * img..(b + 1) * img];
        // Zeros where no pixel lands: the pads, the margin of partial tiles and the channel
        // padding (never multiplied, but kept finite).
        if cp != c_in {
            d.fill(0.0);
        } else {
            let (top, left) = (pads[0] * row, pads[1] * cp);
            d[..top].fill(0.0);
            d[(pads[0] + h) * row..].fill(0.0);
            for r in d[top..(pads[0] + h) * row].chunks_exact_mut(row) {
                r[..left].fill(0.0);
                r[left + w * cp..].fill(0.0);
            }
        }
        let src = &x[b * c_in * h * w..(b + 1) * c_in * h * w];
        let mut c0 = 0;
        #[cfg(target_arch = "x86_64")]
        if has_avx2_fma() && w >= L {
            // SAFETY: AVX2 checked; the function stays inside `src` and `d` (see there).
            c0 = unsafe { channels_last_avx(src, [c_in, h, w], pads, geo, d) };
        }
        for c in c0..c_in {
            let plane = &src[c * h * w..][..h * w];
            for (y, row) in plane.chunks_exact(w).enumerate() {
                let at = ((y + pads[0]) * geo.wp + pads[1]) * cp + c;
                for (i, &v) in row.iter().enumerate() {
                    d[at + i * cp] = v;
                }
            }
        }
    }
}

/// Copies whole groups of eight channels of one image (`src`, `[c, h, w]`) into the
/// channel-last plane `d` by 8x8 register transposes; returns the channels copied.
///
/// # Safety
/// AVX2 must be available and `w >= 8`; `src` holds `c * h * w` floats and `d` one padded
/// plane of `geo` (`h + pads[0] <= hp`, `w + pads[1] <= wp`).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn channels_last_avx(
    src: &[f32],
    [c, h, w]: [usize; 3],
    pads: [usize; 4],
    geo: &Geometry,
    d: &mut [f32],
) -> usize {
    use std::arch::x86_64::*;
    let cp = geo.cp_in;
    if src.len() < c * h * w
        || d.len() < geo.hp * geo.wp * cp
        || h + pads[0] > geo.hp
        || w + pads[1] > geo.wp
        || w < L
    {
        return 0;
    }
    let (s, dp) = (src.as_ptr(), d.as_mut_ptr());
    let groups = c / L;
    for g in 0..groups {
        for y in 0..h {
            let drow = dp.add(((y + pads[0]) * geo.wp + pads[1]) * cp + g * L);
            let srow = s.add((g * L * h + y) * w);
            // Eight pixels at a time; the last block overlaps the one before it.
            let mut x = 0;
            loop {
                let x0 = x.min(w - L);
                let r: [__m256; 8] =
                    std::array::from_fn(|i| _mm256_loadu_ps(srow.add(i * h * w + x0)));
                let px = crate::kernels::simd::avx::transpose8x8(r);
                for (i, v) in px.iter().enumerate() {
                    _mm256_storeu_ps(drow.add((x0 + i) * cp), *v);
                }
                if x0 + L >= w {
                    break;
                }
                x += L;
            }
        }
    }
    groups * L
}

/// All tiles of `images` images, block by block (blocks in parallel when `threads > 1`).
fn blocks(
    plan: &Plan,
    geo: &Geometry,
    xin: &[f32],
    images: usize,
    block: usize,
    out: &mut [f32],
    threads: usize,
) -> Result<()> {
    let total = images * geo.tiles;
    if out.len() < images * geo.c_out * geo.oh * geo.ow {
        return Err(Error::Shape("winograd: output buffer too small".into()));
    }
    let dst = OutPtr {
        ptr: out.as_mut_ptr(),
        len: out.len(),
    };
    // With threads to spare (one image, several threads), smaller blocks so each gets some.
    let block = if threads > 1 {
        block.min(total.div_ceil(threads)).max(1)
    } else {
        block
    };
    let n_blocks = total.div_ceil(block);
    let one = |bi: usize| {
        let t0 = bi * block;
        let count = block.min(total - t0);
        run_block(plan, geo, xin, t0, count, dst)
    };
    if threads > 1 && n_blocks > 1 {
        (0..n_blocks)
            .into_par_iter()
            .try_for_each(|bi| crate::kernels::par::sequential(|| one(bi)))
    } else {
        (0..n_blocks).try_for_each(one)
    }
}

/// Tiles `t0..t0 + count` (numbered across the unit's images): transform, products, inverse
/// transform and store.
fn run_block(
    plan: &Plan,
    geo: &Geometry,
    xin: &[f32],
    t0: usize,
    count: usize,
    out: OutPtr,
) -> Result<()> {
    let a2 = plan.alpha2();
    let v_len = a2 * count * geo.cp_in;
    let m_len = a2 * count * geo.cp_out;
    let avx = has_avx2_fma();
    scratch::with_f32(v_len + m_len, |buf| {
        let (v, mm) = buf.split_at_mut(v_len);
        input_transform(plan.kind, geo, xin, t0, count, v, avx);
        for (xi, u) in plan.u.iter().enumerate() {
            let a = MatRef::with_ld(&v[xi * count * geo.cp_in..], count, geo.c_in, geo.cp_in)?;
            let c = MatMut::new(
                &mut mm[xi * count * geo.cp_out..],
                count,
                geo.c_out,
                geo.cp_out,
            )?;
            gemm::gemm_threads(
                1,
                1.0,
                Lhs::Mat(a),
                Rhs::Packed(u),
                0.0,
                c,
                Epilogue::default(),
            )?;
        }
        output_transform(plan, geo, mm, t0, count, out, avx);
        Ok(())
    })
}

fn input_transform(
    kind: Kind,
    geo: &Geometry,
    xin: &[f32],
    t0: usize,
    count: usize,
    v: &mut [f32],
    avx: bool,
) {
    let (alpha, m, _) = kind.dims();
    // Bounds of everything the tiles read and write, checked once for the unchecked loops.
    let last = t0 + count - 1;
    let (b, ty, tx) = (
        last / geo.tiles,
        last % geo.tiles / geo.tiles_x,
        last % geo.tiles_x,
    );
    let last_read =
        ((b * geo.hp + ty * m + alpha - 1) * geo.wp + tx * m + alpha - 1) * geo.cp_in + geo.cp_in;
    if last_read > xin.len() || v.len() < alpha * alpha * count * geo.cp_in {
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if avx {
        // SAFETY: AVX2 and FMA are present; bounds checked above.
        unsafe {
            match kind {
                Kind::F43 => input_avx::<F43, 6, 4, 3>(geo, xin, t0, count, v),
                Kind::F45 => input_avx::<F45, 8, 4, 5>(geo, xin, t0, count, v),
            }
        }
        return;
    }
    let _ = avx;
    // SAFETY: bounds checked above.
    unsafe {
        match kind {
            Kind::F43 => input_tiles::<Portable, F43, 6, 4, 3>(geo, xin, t0, count, v),
            Kind::F45 => input_tiles::<Portable, F45, 8, 4, 5>(geo, xin, t0, count, v),
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn input_avx<T: Tile<A, M, R>, const A: usize, const M: usize, const R: usize>(
    geo: &Geometry,
    xin: &[f32],
    t0: usize,
    count: usize,
    v: &mut [f32],
) {
    input_tiles::<avx::Avx, T, A, M, R>(geo, xin, t0, count, v)
}

/// `V = B^T d B` for every tile and channel vector; `V` is `alpha^2` matrices of
/// `count x cp_in`.
///
/// # Safety
/// The tiles' reads must lie inside `xin` and `v` must hold `alpha^2 * count * cp_in`.
// Column passes write transposed (`tmp[i][j]`): indices read clearer than iterators.
#[allow(clippy::needless_range_loop)]
#[inline(always)]
unsafe fn input_tiles<
    V: Lanes,
    T: Tile<A, M, R>,
    const A: usize,
    const M: usize,
    const R: usize,
>(
    geo: &Geometry,
    xin: &[f32],
    t0: usize,
    count: usize,
    v: &mut [f32],
) {
    let cp = geo.cp_in;
    let (rs, img) = (geo.wp * cp, geo.hp * geo.wp * cp);
    let comp = count * cp;
    let src = xin.as_ptr();
    let dst = v.as_mut_ptr();
    for t in 0..count {
        let tt = t0 + t;
        let (b, ty, tx) = (
            tt / geo.tiles,
            tt % geo.tiles / geo.tiles_x,
            tt % geo.tiles_x,
        );
        let base = src.add(b * img + ty * M * rs + tx * M * cp);
        let out = dst.add(t * cp);
        for c in (0..cp).step_by(L) {
            // Columns first: t[i][j] = sum_k BT[i][k] d[k][j].
            let mut tmp = [[V::zero(); A]; A];
            for j in 0..A {
                let col: [V; A] = std::array::from_fn(|k| V::load(base.add(k * rs + j * cp + c)));
                for (i, v) in T::bt(&col).into_iter().enumerate() {
                    tmp[i][j] = v;
                }
            }
            for (i, row) in tmp.iter().enumerate() {
                for (nu, v) in T::bt(row).into_iter().enumerate() {
                    v.store(out.add((i * A + nu) * comp + c));
                }
            }
        }
    }
}

fn output_transform(
    plan: &Plan,
    geo: &Geometry,
    mm: &[f32],
    t0: usize,
    count: usize,
    out: OutPtr,
    avx: bool,
) {
    let images = (t0 + count).div_ceil(geo.tiles);
    if mm.len() < plan.alpha2() * count * geo.cp_out
        || out.len < images * geo.c_out * geo.oh * geo.ow
        || plan.bias.len() < geo.cp_out
    {
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if avx {
        // SAFETY: AVX2 and FMA are present; bounds checked above.
        unsafe {
            match plan.kind {
                Kind::F43 => output_avx::<F43, 6, 4, 3>(plan, geo, mm, t0, count, out),
                Kind::F45 => output_avx::<F45, 8, 4, 5>(plan, geo, mm, t0, count, out),
            }
        }
        return;
    }
    let _ = avx;
    // SAFETY: bounds checked above.
    unsafe {
        match plan.kind {
            Kind::F43 => output_tiles::<Portable, F43, 6, 4, 3>(plan, geo, mm, t0, count, out),
            Kind::F45 => output_tiles::<Portable, F45, 8, 4, 5>(plan, geo, mm, t0, count, out),
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn output_avx<T: Tile<A, M, R>, const A: usize, const M: usize, const R: usize>(
    plan: &Plan,
    geo: &Geometry,
    mm: &[f32],
    t0: usize,
    count: usize,
    out: OutPtr,
) {
    output_tiles::<avx::Avx, T, A, M, R>(plan, geo, mm, t0, count, out)
}

/// `Y = A^T M A + bias`, the activation, and the tile's valid outputs stored to NCHW.
///
/// # Safety
/// `mm` must hold `alpha^2 * count * cp_out`, `out` the images of tiles `t0..t0 + count`,
/// and no other thread may touch those tiles' outputs.
// Column passes write transposed (`tmp[i][j]`): indices read clearer than iterators.
#[allow(clippy::needless_range_loop)]
#[inline(always)]
unsafe fn output_tiles<
    V: Lanes,
    T: Tile<A, M, R>,
    const A: usize,
    const M: usize,
    const R: usize,
>(
    plan: &Plan,
    geo: &Geometry,
    mm: &[f32],
    t0: usize,
    count: usize,
    out: OutPtr,
) {
    let cp = geo.cp_out;
    let comp = count * cp;
    let ohw = geo.oh * geo.ow;
    let act = plan.act;
    let src = mm.as_ptr();
    let mut y = [[0.0f32; L]; 16];
    debug_assert!(M * M <= y.len());
    for t in 0..count {
        let tt = t0 + t;
        let (b, ty, tx) = (
            tt / geo.tiles,
            tt % geo.tiles / geo.tiles_x,
            tt % geo.tiles_x,
        );
        let (oy0, ox0) = (ty * M, tx * M);
        let rows = M.min(geo.oh - oy0);
        let cols = M.min(geo.ow - ox0);
        let at = src.add(t * cp);
        for c in (0..cp).step_by(L) {
            // Columns first: s[i][nu] = sum_xi AT[i][xi] M[xi][nu].
            let mut s = [[V::zero(); A]; M];
            for nu in 0..A {
                let col: [V; A] =
                    std::array::from_fn(|xi| V::load(at.add((xi * A + nu) * comp + c)));
                for (i, v) in T::at(&col).into_iter().enumerate() {
                    s[i][nu] = v;
                }
            }
            let bias = V::load(plan.bias.as_ptr().add(c));
            for (i, row) in s.iter().enumerate() {
                for (j, v) in T::at(row).into_iter().enumerate() {
                    let mut v = v.add(bias);
                    if let Some(a) = act {
                        v = v.act(a);
                    }
                    v.store(y[i * M + j].as_mut_ptr());
                }
            }
            let lanes = L.min(geo.c_out - c);
            let first = out.ptr.add((b * geo.c_out + c) * ohw + oy0 * geo.ow + ox0);
            if M == 4
                && rows == 4
                && cols == 4
                && lanes == L
                && V::store_tile4(&y, first, ohw, geo.ow)
            {
                continue;
            }
            for l in 0..lanes {
                let plane = out.ptr.add((b * geo.c_out + c + l) * ohw);
                for i in 0..rows {
                    let row = plane.add((oy0 + i) * geo.ow + ox0);
                    for j in 0..cols {
                        *row.add(j) = y[i * M + j][l];
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::conv::conv2d_reference;
    use crate::kernels::simd::portable_only;
    use crate::kernels::testutil::{conv_geom, Rng};

    /// Largest absolute error, and the largest relative to the output's scale
    /// (`max |want|`, at least 1): Winograd's rounding error grows with the transformed
    /// magnitudes of a whole tile, not with each output's own size.
    fn errors(got: &[f32], want: &[f32]) -> (f32, f32) {
        let scale = want.iter().fold(1.0f32, |m, v| m.max(v.abs()));
        let abs = got
            .iter()
            .zip(want)
            .fold(0.0f32, |m, (g, w)| m.max((g - w).abs()));
        assert!(got.iter().all(|v| v.is_finite()), "non-finite output");
        (abs, abs / scale)
    }

    /// Runs the Winograd route directly (whatever `worth` says) and compares it with the
    /// reference; returns the absolute and relative errors.
    fn check(
        g: &Conv2dGeom,
        [n, h, w]: [usize; 3],
        act: Option<Activation>,
        threads: usize,
        portable: bool,
        rng: &mut Rng,
    ) -> (f32, f32) {
        let (oh, ow) = g.out_hw(h, w).unwrap();
        let x = rng.vec(n * g.c_in * h * w);
        let wt = rng.vec(g.c_out * g.c_in * g.kernel[0] * g.kernel[1]);
        let bias = rng.vec(g.c_out);
        let mut want = vec![0.0; n * g.c_out * oh * ow];
        conv2d_reference(g, &x, [n, h, w], &wt, Some(&bias), act, &mut want).unwrap();
        let conv = Conv2d::new(g.clone(), &wt, Some(&bias), act).unwrap();
        let plan = conv.winograd.as_ref().expect("eligible geometry");
        let mut got = vec![f32::NAN; want.len()];
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        let go = |out: &mut [f32]| {
            let hw = (oh, ow);
            pool.install(|| run(&conv, plan, &x, [n, h, w], g.pads, hw, None, out, threads))
        };
        if portable {
            portable_only(|| go(&mut got)).unwrap();
        } else {
            go(&mut got).unwrap();
        }
        let (abs, rel) = errors(&got, &want);
        let tol = if g.kernel == [3, 3] { 2e-5 } else { 1e-4 };
        let what = format!("{g:?} {n}x{h}x{w} act {act:?} threads {threads} portable {portable}");
        assert!(rel <= tol, "{what}: max abs error {abs}, relative {rel}");
        (abs, rel)
    }

    #[test]
    fn matches_reference() {
        let mut rng = Rng::new(21);
        let acts = [
            None,
            Some(Activation::Relu),
            Some(Activation::HardSwish),
            Some(Activation::Sigmoid),
        ];
        let cases = [
            // MNIST CNN's second layer, odd sizes, no padding, asymmetric padding.
            (
                conv_geom(32, 64, 1, [3, 3], [1; 2], [1; 2], [1; 4]),
                [2, 14, 14],
            ),
            (
                conv_geom(9, 17, 1, [3, 3], [1; 2], [1; 2], [1; 4]),
                [1, 13, 11],
            ),
            (
                conv_geom(8, 16, 1, [3, 3], [1; 2], [1; 2], [0; 4]),
                [3, 9, 7],
            ),
            (
                conv_geom(12, 20, 1, [3, 3], [1; 2], [1; 2], [2, 0, 1, 3]),
                [2, 6, 10],
            ),
            (
                conv_geom(16, 16, 1, [3, 3], [1; 2], [1; 2], [1; 4]),
                [1, 3, 3],
            ),
            // LeNet-5's second layer, padded and odd 5x5 cases.
            (
                conv_geom(20, 50, 1, [5, 5], [1; 2], [1; 2], [0; 4]),
                [3, 12, 12],
            ),
            (
                conv_geom(10, 24, 1, [5, 5], [1; 2], [1; 2], [2; 4]),
                [1, 11, 13],
            ),
            (
                conv_geom(8, 16, 1, [5, 5], [1; 2], [1; 2], [1, 2, 0, 1]),
                [2, 9, 6],
            ),
        ];
        let mut worst = [(0.0f32, 0.0f32); 2];
        for (i, (g, shape)) in cases.iter().enumerate() {
            let act = acts[i % acts.len()];
            for (threads, portable) in [(1, false), (2, false), (1, true)] {
                let (abs, rel) = check(g, *shape, act, threads, portable, &mut rng);
                let k = usize::from(g.kernel == [5, 5]);
                worst[k] = (worst[k].0.max(abs), worst[k].1.max(rel));
            }
        }
        println!(
            "worst errors (abs, relative to max |output|): 3x3 {:?}, 5x5 {:?}",
            worst[0], worst[1]
        );
    }

    /// The written-out butterflies compute exactly the matrices' products.
    fn butterflies<T: Tile<A, M, R>, const A: usize, const M: usize, const R: usize>() {
        let mut rng = Rng::new(3);
        let d: [Portable; A] =
            std::array::from_fn(|_| Portable(std::array::from_fn(|_| rng.f32())));
        // SAFETY: the portable lanes need no CPU features.
        let (bt, at) = unsafe { (T::bt(&d), T::at(&d)) };
        for l in 0..L {
            for (i, row) in T::BT.iter().enumerate() {
                let want: f32 = (0..A).map(|k| row[k] * d[k].0[l]).sum();
                assert!((bt[i].0[l] - want).abs() <= 1e-5, "BT row {i}");
            }
            for (i, row) in T::AT.iter().enumerate() {
                let want: f32 = (0..A).map(|k| row[k] * d[k].0[l]).sum();
                assert!((at[i].0[l] - want).abs() <= 1e-5, "AT row {i}");
            }
        }
    }

    #[test]
    fn butterflies_match_matrices() {
        butterflies::<F43, 6, 4, 3>();
        butterflies::<F45, 8, 4, 5>();
    }

    #[test]
    fn dispatch_by_shape() {
        let g = conv_geom(32, 64, 1, [3, 3], [1; 2], [1; 2], [1; 4]);
        let plan = Plan::new(&g, &vec![0.0; 64 * 32 * 9], None, None).unwrap();
        assert!(plan.worth((14, 14)) && plan.worth((28, 28)));
        // 5x5 outputs in 8x8 of tiles: most of the work would be dropped.
        assert!(!plan.worth((5, 5)) && !plan.worth((1, 9)));
        assert!(!eligible(&conv_geom(
            1,
            32,
            1,
            [3, 3],
            [1; 2],
            [1; 2],
            [1; 4]
        )));
        assert!(!eligible(&conv_geom(
            32,
            64,
            1,
            [3, 3],
            [2; 2],
            [1; 2],
            [1; 4]
        )));
        assert!(!eligible(&conv_geom(
            32,
            64,
            2,
            [3, 3],
            [1; 2],
            [1; 2],
            [1; 4]
        )));
        assert!(!eligible(&conv_geom(
            32,
            64,
            1,
            [3, 3],
            [1; 2],
            [2; 2],
            [1; 4]
        )));
        assert!(eligible(&conv_geom(
            20,
            50,
            1,
            [5, 5],
            [1; 2],
            [1; 2],
            [0; 4]
        )));
    }
}

#[cfg(test)]
mod model_tests {
    use crate::ir::Tensor;
    use crate::kernels::testutil::Rng;
    use crate::runtime::{Session, SessionOptions};

    /// Logits of a repository model with and without Winograd, on the same random images.
    fn logits_diff(name: &str, batch: usize) -> (f32, f32) {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("assets/models")
            .join(name);
        let model = crate::onnx::load_model(&path).unwrap();
        let (simple, _) = crate::passes::simplify(&model).unwrap();
        // One thread: steps run on this thread, where the switch applies.
        let opts = SessionOptions {
            threads: 1,
            ..SessionOptions::default()
        };
        let session = Session::new(&simple, &opts).unwrap();
        let (input, _) = session.input_types().next().unwrap();
        let input = input.to_string();
        let mut rng = Rng::new(5);
        let data = (0..batch * 784).map(|_| rng.f32() * 0.5 + 0.5).collect();
        let x = Tensor::from_f32(vec![batch, 1, 28, 28], data).unwrap();
        let feeds = [(input.as_str(), x)];
        let with = session.run(&feeds).unwrap();
        let without = super::without(|| session.run(&feeds)).unwrap();
        let (a, b) = (with[0].1.to_f32_vec(), without[0].1.to_f32_vec());
        let scale = b.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let diff = a
            .iter()
            .zip(&b)
            .fold(0.0f32, |m, (x, y)| m.max((x - y).abs()));
        (diff, scale)
    }

    #[test]
    fn mnist_and_lenet_logits_match_lowered_route() {
        for name in ["mnist_cnn.onnx", "lenet5.onnx"] {
            let (diff, scale) = logits_diff(name, 8);
            println!("{name}: logits max abs diff {diff:e} (max |logit| {scale})");
            assert!(diff <= 1e-4 * scale.max(1.0), "{name}: {diff} of {scale}");
        }
    }
}
