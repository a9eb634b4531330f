//! Per-thread scratch buffers reused across calls, so hot kernels (GEMM packing, padded conv
//! inputs) do not allocate on every run.
//!
//! Buffers are taken out of the thread-local pool for the duration of a call and put back
//! afterwards, instead of being borrowed in place: a rayon worker waiting inside a parallel
//! section may run another task on the same thread, and that task must find a fresh buffer
//! rather than a `RefCell` that is already borrowed.

use std::cell::RefCell;

/// Kept per thread after use; more nesting than this just allocates.
const POOL_DEPTH: usize = 4;

thread_local! {
    static F32_POOL: RefCell<Vec<Vec<f32>>> = const { RefCell::new(Vec::new()) };
    static USIZE_POOL: RefCell<Vec<Vec<usize>>> = const { RefCell::new(Vec::new()) };
    static U8_POOL: RefCell<Vec<Vec<u8>>> = const { RefCell::new(Vec::new()) };
}

/// Floats per 64-byte cache line: the alignment handed out by [`with_f32`].
const ALIGN_F32: usize = 16;

/// Runs `f` on a 64-byte aligned scratch slice of exactly `len` floats. The contents are
/// whatever an earlier user left there: callers must write before they read.
pub fn with_f32<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    let mut buf = F32_POOL.with(|p| p.borrow_mut().pop()).unwrap_or_default();
    if buf.len() < len + ALIGN_F32 {
        buf.resize(len + ALIGN_F32, 0.0);
    }
    let off = buf.as_ptr().align_offset(64).min(ALIGN_F32);
    let result = f(&mut buf[off..off + len]);
    F32_POOL.with(|p| {
        let mut p = p.borrow_mut();
        if p.len() < POOL_DEPTH {
            p.push(buf);
        }
    });
    result
}

/// Runs `f` on a scratch slice of exactly `len` indices (stale contents, as [`with_f32`]).
pub fn with_usize<R>(len: usize, f: impl FnOnce(&mut [usize]) -> R) -> R {
    let mut buf = USIZE_POOL
        .with(|p| p.borrow_mut().pop())
        .unwrap_or_default();
    if buf.len() < len {
        buf.resize(len, 0);
    }
    let result = f(&mut buf[..len]);
    USIZE_POOL.with(|p| {
        let mut p = p.borrow_mut();
        if p.len() < POOL_DEPTH {
            p.push(buf);
        }
    });
    result
}

/// Runs `f` on a scratch slice of exactly `len` bytes (stale contents, as [`with_f32`]).
pub fn with_u8<R>(len: usize, f: impl FnOnce(&mut [u8]) -> R) -> R {
    let mut buf = U8_POOL.with(|p| p.borrow_mut().pop()).unwrap_or_default();
    if buf.len() < len {
        buf.resize(len, 0);
    }
    let result = f(&mut buf[..len]);
    U8_POOL.with(|p| {
        let mut p = p.borrow_mut();
        if p.len() < POOL_DEPTH {
            p.push(buf);
        }
    });
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_aligned_and_nest() {
        with_f32(100, |a| {
            assert_eq!(a.len(), 100);
            assert_eq!(a.as_ptr() as usize % 64, 0);
            a.fill(1.0);
            with_f32(10, |b| {
                b.fill(2.0);
                assert_eq!(b.as_ptr() as usize % 64, 0);
            });
            assert!(a.iter().all(|&x| x == 1.0));
        });
        with_usize(5, |u| assert_eq!(u.len(), 5));
    }
}
