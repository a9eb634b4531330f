//! Numpy-style multidirectional broadcasting: shape rules (concrete and symbolic) and an
//! iteration plan that walks an output while tracking each input's offset.
//!
//! The plan drops size-1 dimensions and merges adjacent ones that every operand walks
//! contiguously, so the common cases collapse to a few long inner runs: same shapes become
//! one run, `[B,S,H] + [H]` becomes rows with a repeated operand, `[N,C,H,W] + [1,C,1,1]`
//! becomes runs against a scalar. Inner runs are handed out with each operand's stride
//! (0 or 1), and callers specialise their loops on those strides so the compiler can
//! vectorise them.

use std::iter::repeat as rep;

use rayon::prelude::*;

use super::{node_error, InferCtx};
use crate::error::{Error, Result};
use crate::ir::Dim;

/// Memory-bound loops (a few flops per element) only pay for threads on outputs this long;
/// below it the wake-up and the shared memory bandwidth eat the gain.
pub const PAR_MIN_MEMORY: usize = 1 << 20;
/// Compute-bound loops (exp, erf, ...) split much earlier.
pub const PAR_MIN_COMPUTE: usize = 1 << 14;
/// Elements per parallel chunk.
const PAR_CHUNK: usize = 1 << 14;

/// The broadcast of two concrete shapes, or an error naming both.
pub fn broadcast_shape(a: &[usize], b: &[usize]) -> Result<Vec<usize>> {
    let r = a.len().max(b.len());
    let mut out = Vec::with_capacity(r);
    for i in 0..r {
        let x = dim_from_right(a, r, i);
        let y = dim_from_right(b, r, i);
        out.push(match (x, y) {
            (x, y) if x == y => x,
            (1, y) => y,
            (x, 1) => x,
            _ => {
                return Err(Error::Shape(format!(
                    "shapes {a:?} and {b:?} cannot be broadcast together"
                )))
            }
        });
    }
    Ok(out)
}

/// The broadcast of several concrete shapes.
pub fn broadcast_shapes(shapes: &[&[usize]]) -> Result<Vec<usize>> {
    let mut out: Vec<usize> = Vec::new();
    for s in shapes {
        out = broadcast_shape(&out, s)?;
    }
    Ok(out)
}

fn dim_from_right(s: &[usize], r: usize, i: usize) -> usize {
    let off = r - s.len();
    if i < off {
        1
    } else {
        s[i - off]
    }
}

/// Broadcast of two symbolic dims. A named dim against a known `n > 1` must be `n` (or 1,
/// giving `n`), so the result is known; two different names give an unknown dim.
fn broadcast_dim(x: &Dim, y: &Dim) -> std::result::Result<Dim, ()> {
    Ok(match (x, y) {
        (Dim::Known(1), d) | (d, Dim::Known(1)) => d.clone(),
        (Dim::Known(a), Dim::Known(b)) => {
            if a == b {
                Dim::Known(*a)
            } else {
                return Err(());
            }
        }
        (Dim::Known(a), _) | (_, Dim::Known(a)) => Dim::Known(*a),
        (Dim::Sym(s), Dim::Sym(t)) if s == t => Dim::Sym(s.clone()),
        _ => Dim::Unknown,
    })
}

/// Broadcast of two symbolic shapes; `Err` carries a message naming both.
pub fn broadcast_dims(a: &[Dim], b: &[Dim]) -> std::result::Result<Vec<Dim>, String> {
    let r = a.len().max(b.len());
    let one = Dim::Known(1);
    (0..r)
        .map(|i| {
            let x = if i + a.len() < r {
                &one
            } else {
                &a[i + a.len() - r]
            };
            let y = if i + b.len() < r {
                &one
            } else {
                &b[i + b.len() - r]
            };
            broadcast_dim(x, y).map_err(|()| {
                format!(
                    "shapes [{}] and [{}] cannot be broadcast together",
                    join(a),
                    join(b)
                )
            })
        })
        .collect()
}

fn join(dims: &[Dim]) -> String {
    dims.iter()
        .map(Dim::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// Broadcast shape of the node inputs `which` (skipping omitted ones); `None` when some
/// rank is unknown.
pub fn infer_broadcast(ctx: &InferCtx, which: &[usize]) -> Result<Option<Vec<Dim>>> {
    let mut out: Vec<Dim> = Vec::new();
    for &i in which {
        let t = ctx.input_type(i)?;
        let Some(shape) = &t.shape else {
            return Ok(None);
        };
        out = broadcast_dims(&out, shape).map_err(|m| node_error(ctx.node, m))?;
    }
    Ok(Some(out))
}

/// A walk over a broadcast output of `K` operands. See the module docs.
pub struct Plan<const K: usize> {
    /// Merged outer dims, outermost first, and each operand's stride along them.
    dims: Vec<usize>,
    strides: Vec<[usize; K]>,
    /// Length of the innermost merged dim and each operand's stride along it (0 or 1).
    inner: usize,
    inner_strides: [usize; K],
    len: usize,
}

impl<const K: usize> Plan<K> {
    /// `inputs` must broadcast to `out` (callers check with [`broadcast_shape`]).
    pub fn new(out: &[usize], inputs: [&[usize]; K]) -> Plan<K> {
        let r = out.len();
        let mut st = vec![[0usize; K]; r];
        for (k, s) in inputs.iter().enumerate() {
            let off = r - s.len();
            let mut acc = 1;
            for i in (0..s.len()).rev() {
                st[off + i][k] = if s[i] == 1 { 0 } else { acc };
                acc *= s[i];
            }
        }
        let mut merged: Vec<(usize, [usize; K])> = Vec::new();
        for i in 0..r {
            if out[i] == 1 {
                continue;
            }
            if let Some(last) = merged.last_mut() {
                if (0..K).all(|k| last.1[k] == st[i][k] * out[i]) {
                    last.0 *= out[i];
                    last.1 = st[i];
                    continue;
                }
            }
            merged.push((out[i], st[i]));
        }
        let (inner, inner_strides) = merged.pop().unwrap_or((1, [0; K]));
        Plan {
            dims: merged.iter().map(|m| m.0).collect(),
            strides: merged.iter().map(|m| m.1).collect(),
            inner,
            inner_strides,
            len: out.iter().product(),
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn inner_strides(&self) -> [usize; K] {
        self.inner_strides
    }

    /// Calls `seg(pos, n, offsets)` for consecutive runs covering output positions
    /// `lo..hi`, each inside one inner row; `offsets[k]` is operand `k`'s element offset at
    /// `pos`, and operand `k` advances by `inner_strides()[k]` per element of the run.
    pub fn for_each_run(
        &self,
        lo: usize,
        hi: usize,
        mut seg: impl FnMut(usize, usize, [usize; K]),
    ) {
        if lo >= hi || self.inner == 0 {
            return;
        }
        let nd = self.dims.len();
        let mut idx = vec![0usize; nd];
        let mut rem = lo / self.inner;
        for d in (0..nd).rev() {
            idx[d] = rem % self.dims[d];
            rem /= self.dims[d];
        }
        let mut base = [0usize; K];
        for (&i, st) in idx.iter().zip(&self.strides) {
            for (b, &s) in base.iter_mut().zip(st) {
                *b += i * s;
            }
        }
        let mut j = lo % self.inner;
        let mut pos = lo;
        while pos < hi {
            let n = (self.inner - j).min(hi - pos);
            let mut offs = base;
            for (o, &s) in offs.iter_mut().zip(&self.inner_strides) {
                *o += j * s;
            }
            seg(pos, n, offs);
            pos += n;
            j = 0;
            for d in (0..nd).rev() {
                idx[d] += 1;
                let st = &self.strides[d];
                for (b, &s) in base.iter_mut().zip(st) {
                    *b += s;
                }
                if idx[d] < self.dims[d] {
                    break;
                }
                for (b, &s) in base.iter_mut().zip(st) {
                    *b -= s * self.dims[d];
                }
                idx[d] = 0;
            }
        }
    }

    /// Fills `out` (the whole output) run by run, in parallel chunks when it is large.
    /// `fill(dst, offsets)` writes one run.
    pub fn fill<O: Send>(&self, out: &mut [O], fill: impl Fn(&mut [O], [usize; K]) + Sync) {
        debug_assert_eq!(out.len(), self.len);
        if out.len() < PAR_MIN_MEMORY || crate::kernels::par::threads() == 1 {
            self.for_each_run(0, out.len(), |pos, n, offs| {
                fill(&mut out[pos..pos + n], offs)
            });
        } else {
            out.par_chunks_mut(PAR_CHUNK)
                .enumerate()
                .for_each(|(c, chunk)| {
                    let lo = c * PAR_CHUNK;
                    self.for_each_run(lo, lo + chunk.len(), |pos, n, offs| {
                        fill(&mut chunk[pos - lo..pos - lo + n], offs)
                    });
                });
        }
    }
}

/// `out[i] = f(a[..], b[..])` over the broadcast of `a` and `b`; `out` has the broadcast
/// shape `out_shape`.
#[allow(clippy::too_many_arguments)]
pub fn binary_into<A, B, O, F>(
    a: &[A],
    a_shape: &[usize],
    b: &[B],
    b_shape: &[usize],
    out_shape: &[usize],
    out: &mut [O],
    f: F,
) where
    A: Copy + Sync,
    B: Copy + Sync,
    O: Copy + Send,
    F: Fn(A, B) -> O + Sync,
{
    let plan = Plan::new(out_shape, [a_shape, b_shape]);
    let [sa, sb] = plan.inner_strides();
    // One loop per stride pattern so each compiles to a straight, vectorisable loop.
    plan.fill(out, |dst, [oa, ob]| {
        let n = dst.len();
        match (sa, sb) {
            (1, 1) => {
                for ((o, &x), &y) in dst.iter_mut().zip(&a[oa..oa + n]).zip(&b[ob..ob + n]) {
                    *o = f(x, y);
                }
            }
            (0, 1) => {
                let x = a[oa];
                for (o, &y) in dst.iter_mut().zip(&b[ob..ob + n]) {
                    *o = f(x, y);
                }
            }
            (1, 0) => {
                let y = b[ob];
                for (o, &x) in dst.iter_mut().zip(&a[oa..oa + n]) {
                    *o = f(x, y);
                }
            }
            _ => {
                let v = f(a[oa], b[ob]);
                dst.iter_mut().for_each(|o| *o = v);
            }
        }
    });
}

/// `out[i] = f(a[..], b[..], c[..])` over the broadcast of three operands (Where).
pub fn ternary_into<A, B, C, O, F>(
    (a, a_shape): (&[A], &[usize]),
    (b, b_shape): (&[B], &[usize]),
    (c, c_shape): (&[C], &[usize]),
    out_shape: &[usize],
    out: &mut [O],
    f: F,
) where
    A: Copy + Sync,
    B: Copy + Sync,
    C: Copy + Sync,
    O: Copy + Send,
    F: Fn(A, B, C) -> O + Sync,
{
    let plan = Plan::new(out_shape, [a_shape, b_shape, c_shape]);
    let [sa, sb, sc] = plan.inner_strides();
    // An operand with stride 0 is one value for the whole run; spelling out each pattern
    // keeps the loops free of index arithmetic.
    macro_rules! run {
        ($dst:ident, $x:expr, $y:expr, $z:expr) => {
            for ((o, x), (y, z)) in $dst.iter_mut().zip($x).zip($y.zip($z)) {
                *o = f(x, y, z);
            }
        };
    }
    plan.fill(out, |dst, [oa, ob, oc]| {
        let n = dst.len();
        let (ia, ib, ic) = (
            a[oa..oa + n * sa].iter().copied(),
            b[ob..ob + n * sb].iter().copied(),
            c[oc..oc + n * sc].iter().copied(),
        );
        match (sa, sb, sc) {
            (1, 1, 1) => run!(dst, ia, ib, ic),
            (0, 1, 1) => run!(dst, rep(a[oa]), ib, ic),
            (1, 0, 1) => run!(dst, ia, rep(b[ob]), ic),
            (1, 1, 0) => run!(dst, ia, ib, rep(c[oc])),
            (1, 0, 0) => run!(dst, ia, rep(b[ob]), rep(c[oc])),
            (0, 1, 0) => run!(dst, rep(a[oa]), ib, rep(c[oc])),
            (0, 0, 1) => run!(dst, rep(a[oa]), rep(b[ob]), ic),
            _ => dst.fill(f(a[oa], b[ob], c[oc])),
        }
    });
}

/// `out[i] = f(src[i])`, in parallel chunks when `out` has at least `par_min` elements.
pub fn map_into<A: Copy + Sync, O: Send>(
    src: &[A],
    out: &mut [O],
    par_min: usize,
    f: impl Fn(A) -> O + Sync,
) {
    map_chunks(src, out, par_min, |s, o| {
        for (o, &x) in o.iter_mut().zip(s) {
            *o = f(x);
        }
    });
}

/// Calls `f(src_chunk, out_chunk)` over matching chunks of two equal-length slices, in
/// parallel when they have at least `par_min` elements.
pub fn map_chunks<A: Sync, O: Send>(
    src: &[A],
    out: &mut [O],
    par_min: usize,
    f: impl Fn(&[A], &mut [O]) + Sync,
) {
    if out.len() < par_min || crate::kernels::par::threads() == 1 {
        f(src, out);
    } else {
        out.par_chunks_mut(PAR_CHUNK)
            .zip(src.par_chunks(PAR_CHUNK))
            .for_each(|(o, s)| f(s, o));
    }
}

/// Copies `src` (shape `src_shape`) broadcast to `out_shape` into `out`.
pub fn broadcast_into<T: Copy + Send + Sync>(
    src: &[T],
    src_shape: &[usize],
    out_shape: &[usize],
    out: &mut [T],
) {
    let plan = Plan::new(out_shape, [src_shape]);
    let [s] = plan.inner_strides();
    plan.fill(out, |dst, [o]| {
        if s == 1 {
            dst.copy_from_slice(&src[o..o + dst.len()]);
        } else {
            dst.fill(src[o]);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reference: index arithmetic per element, no merging.
    fn naive(a: &[i32], ash: &[usize], b: &[i32], bsh: &[usize]) -> (Vec<usize>, Vec<i32>) {
        let out = broadcast_shape(ash, bsh).unwrap();
        let r = out.len();
        let n: usize = out.iter().product();
        let offset = |shape: &[usize], idx: &[usize]| {
            let off = r - shape.len();
            let mut o = 0;
            for (i, &d) in shape.iter().enumerate() {
                o = o * d + if d == 1 { 0 } else { idx[off + i] };
            }
            o
        };
        let mut res = Vec::with_capacity(n);
        for flat in 0..n {
            let mut idx = vec![0; r];
            let mut rem = flat;
            for d in (0..r).rev() {
                idx[d] = rem % out[d];
                rem /= out[d];
            }
            res.push(a[offset(ash, &idx)] * 1000 + b[offset(bsh, &idx)]);
        }
        (out, res)
    }

    fn check(ash: &[usize], bsh: &[usize]) {
        let na: usize = ash.iter().product();
        let nb: usize = bsh.iter().product();
        let a: Vec<i32> = (0..na as i32).collect();
        let b: Vec<i32> = (0..nb as i32).map(|x| x + 1).collect();
        let (shape, want) = naive(&a, ash, &b, bsh);
        let mut got = vec![0; want.len()];
        binary_into(&a, ash, &b, bsh, &shape, &mut got, |x, y| x * 1000 + y);
        assert_eq!(got, want, "{ash:?} x {bsh:?}");
    }

    #[test]
    fn binary_matches_naive_indexing() {
        check(&[2, 3], &[2, 3]);
        check(&[2, 3], &[]);
        check(&[], &[4]);
        check(&[2, 3, 4], &[4]);
        check(&[2, 3, 4], &[3, 1]);
        check(&[2, 1, 4], &[1, 3, 1]);
        check(&[1, 3, 1, 1], &[2, 3, 5, 5]);
        check(&[5, 1], &[1, 7]);
        check(&[1, 1], &[1]);
        check(&[2, 0, 3], &[3]);
        check(&[3, 1, 2, 1], &[1, 4, 1, 5]);
    }

    #[test]
    fn large_outputs_split_into_chunks() {
        // Rows of 1000 do not align with the parallel chunk size.
        check(&[1100, 1000], &[1000]);
        check(&[400, 1, 1000], &[1, 3, 1]);
    }

    #[test]
    fn shape_errors_name_both_shapes() {
        let e = broadcast_shape(&[2, 3], &[4]).unwrap_err().to_string();
        assert!(e.contains("[2, 3]") && e.contains("[4]"), "{e}");
    }

    #[test]
    fn symbolic_broadcasting() {
        let s = |n: &str| Dim::Sym(n.into());
        let k = Dim::Known;
        assert_eq!(
            broadcast_dims(&[s("b"), k(1), k(4)], &[k(3), k(1)]).unwrap(),
            vec![s("b"), k(3), k(4)]
        );
        assert_eq!(broadcast_dims(&[s("b")], &[s("b")]).unwrap(), vec![s("b")]);
        assert_eq!(
            broadcast_dims(&[s("b")], &[s("c")]).unwrap(),
            vec![Dim::Unknown]
        );
        assert_eq!(broadcast_dims(&[s("b")], &[k(5)]).unwrap(), vec![k(5)]);
        assert_eq!(
            broadcast_dims(&[Dim::Unknown], &[k(1)]).unwrap(),
            vec![Dim::Unknown]
        );
        assert!(broadcast_dims(&[k(2)], &[k(3)]).is_err());
    }

    #[test]
    fn ternary_and_broadcast_copy() {
        let c = [true, false];
        let x = [1, 2, 3, 4, 5, 6];
        let y = [-1];
        let mut out = vec![0; 6];
        ternary_into(
            (&c[..], &[2][..]),
            (&x[..], &[3, 2][..]),
            (&y[..], &[][..]),
            &[3, 2],
            &mut out,
            |c, x, y| if c { x } else { y },
        );
        assert_eq!(out, vec![1, -1, 3, -1, 5, -1]);
        let mut out = vec![0; 6];
        broadcast_into(&[7, 8, 9], &[3, 1], &[3, 2], &mut out);
        assert_eq!(out, vec![7, 7, 8, 8, 9, 9]);
    }
}
