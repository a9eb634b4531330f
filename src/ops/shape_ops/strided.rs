//! Copying a strided view of a buffer into a dense tensor: the engine behind Transpose (a
//! permutation of strides) and Slice (an offset and scaled, possibly negative, strides).
//!
//! Dims are merged wherever the view is contiguous across them, so a Transpose that moves
//! whole rows becomes a series of `copy_from_slice`, and one that moves single elements is
//! done in square tiles so both the reads and the writes stay within a few cache lines.

use rayon::prelude::*;

/// Tile edge for element-wise transposes.
const TILE: usize = 16;
/// Copies of at least this many elements run in parallel ...
const PAR_MIN: usize = crate::ops::broadcast::PAR_MIN_MEMORY;
/// ... in blocks of about this many elements.
const PAR_BLOCK: usize = 1 << 15;

/// One dim of a view: its length, the source stride, and the (dense) destination stride.
#[derive(Clone, Copy, Debug)]
struct Axis {
    len: usize,
    src: isize,
    dst: usize,
}

/// Writes `out[i] = src[base + Σ i_k * strides_k]` for every index `i` of the dense tensor
/// `out` of shape `shape`. Every addressed source element must be in bounds; callers build
/// the strides from a shape they have validated.
pub fn strided_copy<T: Copy + Send + Sync>(
    src: &[T],
    base: isize,
    shape: &[usize],
    strides: &[isize],
    out: &mut [T],
) {
    if out.is_empty() {
        return;
    }
    // Large copies split the outermost dim longer than 1 into blocks of whole slices, one
    // task each; every block keeps the inner dims, so tiling still applies inside it.
    let lead = shape.iter().position(|&d| d > 1);
    if let Some(k) = lead.filter(|_| out.len() >= PAR_MIN && crate::kernels::par::threads() > 1) {
        let slice: usize = shape[k + 1..].iter().product();
        let per_block = (PAR_BLOCK / slice.max(1)).clamp(1, shape[k]);
        let block_shape = shape[k..].to_vec();
        out.par_chunks_mut(per_block * slice)
            .enumerate()
            .for_each(|(b, chunk)| {
                let mut block_shape = block_shape.clone();
                block_shape[0] = chunk.len() / slice;
                let first = (b * per_block) as isize;
                copy_serial(
                    src,
                    base + first * strides[k],
                    &block_shape,
                    &strides[k..],
                    chunk,
                );
            });
        return;
    }
    copy_serial(src, base, shape, strides, out);
}

fn copy_serial<T: Copy>(src: &[T], base: isize, shape: &[usize], strides: &[isize], out: &mut [T]) {
    let mut axes: Vec<Axis> = Vec::with_capacity(shape.len());
    let mut dst = 1usize;
    let mut dense: Vec<Axis> = shape
        .iter()
        .zip(strides)
        .rev()
        .map(|(&len, &s)| {
            let a = Axis { len, src: s, dst };
            dst *= len;
            a
        })
        .collect();
    dense.reverse();
    for a in dense.into_iter().filter(|a| a.len != 1) {
        if let Some(last) = axes.last_mut() {
            if last.src == a.src * a.len as isize {
                *last = Axis {
                    len: last.len * a.len,
                    src: a.src,
                    dst: a.dst,
                };
                continue;
            }
        }
        axes.push(a);
    }
    let at = |i: isize| i as usize;
    let Some(&inner) = axes.last() else {
        out[0] = src[at(base)];
        return;
    };
    let outer = &axes[..axes.len() - 1];
    if inner.src == 1 {
        let n = inner.len;
        for_each_offset(outer, base, |s, d| {
            out[d..d + n].copy_from_slice(&src[at(s)..at(s) + n]);
        });
        return;
    }
    let unit = outer.iter().position(|a| a.src == 1);
    match unit {
        Some(j) if outer[j].len >= TILE / 2 && inner.len >= TILE / 2 => {
            let col = outer[j];
            let rest: Vec<Axis> = outer
                .iter()
                .enumerate()
                .filter(|&(k, _)| k != j)
                .map(|(_, a)| *a)
                .collect();
            for_each_offset(&rest, base, |s, d| {
                // Element (a, b) of the tile reads s + a + b*inner.src and writes
                // d + a*col.dst + b.
                for a0 in (0..col.len).step_by(TILE) {
                    for b0 in (0..inner.len).step_by(TILE) {
                        for a in a0..(a0 + TILE).min(col.len) {
                            let row = d + a * col.dst;
                            let mut si = s + a as isize + b0 as isize * inner.src;
                            for o in &mut out[row + b0..row + (b0 + TILE).min(inner.len)] {
                                *o = src[at(si)];
                                si += inner.src;
                            }
                        }
                    }
                }
            });
        }
        _ => {
            let n = inner.len;
            for_each_offset(outer, base, |s, d| {
                let mut si = s;
                for o in &mut out[d..d + n] {
                    *o = src[at(si)];
                    si += inner.src;
                }
            });
        }
    }
}

/// Calls `f(src_offset, dst_offset)` for every index of `axes` in row-major order.
fn for_each_offset(axes: &[Axis], base: isize, mut f: impl FnMut(isize, usize)) {
    let nd = axes.len();
    if axes.iter().any(|a| a.len == 0) {
        return;
    }
    let mut idx = vec![0usize; nd];
    let (mut s, mut d) = (base, 0usize);
    loop {
        f(s, d);
        let mut k = nd;
        loop {
            if k == 0 {
                return;
            }
            k -= 1;
            idx[k] += 1;
            s += axes[k].src;
            d += axes[k].dst;
            if idx[k] < axes[k].len {
                break;
            }
            s -= axes[k].src * axes[k].len as isize;
            d -= axes[k].dst * axes[k].len;
            idx[k] = 0;
        }
    }
}

/// Row-major strides of a dense tensor of `shape`.
pub fn dense_strides(shape: &[usize]) -> Vec<isize> {
    let mut st = vec![0isize; shape.len()];
    let mut acc = 1isize;
    for (s, &d) in st.iter_mut().zip(shape).rev() {
        *s = acc;
        acc *= d as isize;
    }
    st
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(src: &[i32], base: isize, shape: &[usize], strides: &[isize]) -> Vec<i32> {
        let n: usize = shape.iter().product();
        (0..n)
            .map(|flat| {
                let mut rem = flat;
                let mut off = base;
                for k in (0..shape.len()).rev() {
                    off += (rem % shape[k]) as isize * strides[k];
                    rem /= shape[k];
                }
                src[off as usize]
            })
            .collect()
    }

    fn check(src_len: usize, base: isize, shape: &[usize], strides: &[isize]) {
        let src: Vec<i32> = (0..src_len as i32).collect();
        let want = naive(&src, base, shape, strides);
        let mut got = vec![0; want.len()];
        strided_copy(&src, base, shape, strides, &mut got);
        assert_eq!(got, want, "{shape:?} {strides:?}");
    }

    #[test]
    fn large_copies_split_into_blocks() {
        check(1100 * 1000, 0, &[1000, 1100], &[1, 1000]);
        check(
            2 * 700 * 801,
            2 * 700 * 801 - 1,
            &[1, 2, 700, 801],
            &[0, -560700, -1, -700],
        );
    }

    #[test]
    fn matches_naive_indexing() {
        // Transposes of a [5, 40, 33] tensor (strides 1320, 33, 1).
        check(6600, 0, &[5, 33, 40], &[1320, 1, 33]);
        check(6600, 0, &[33, 40, 5], &[1, 33, 1320]);
        check(6600, 0, &[40, 5, 33], &[33, 1320, 1]);
        check(6600, 0, &[3, 2], &[1, 3]);
        // Reversed and stepped slices.
        check(20, 19, &[20], &[-1]);
        check(20, 18, &[2, 3], &[-10, -3]);
        check(24, 1, &[2, 2, 3], &[12, 5, 1]);
        check(1, 0, &[], &[]);
        check(4, 0, &[0, 4], &[4, 1]);
        // Broadcast-like zero strides.
        check(3, 0, &[4, 3], &[0, 1]);
    }
}
