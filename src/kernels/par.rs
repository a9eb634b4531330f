//! How many threads a kernel may split its work over.
//!
//! Normally that is rayon's current thread count (the pool the caller runs in). A
//! one-thread session runs its steps directly on the calling thread instead of handing each
//! run to a pool worker (the hand-off and wake-ups cost more than a small model's whole
//! run); that thread belongs to no pool, so rayon would report, and parallel iterators would
//! use, the global pool. [`sequential`] marks such a section: inside it [`threads`] is 1 and
//! every kernel must stay on the calling thread.

use std::cell::Cell;

thread_local! {
    /// 0: no limit; otherwise the most threads kernels on this thread may use.
    static LIMIT: Cell<usize> = const { Cell::new(0) };
}

/// Threads available to a kernel called on this thread: check it before any rayon call.
pub fn threads() -> usize {
    match LIMIT.with(Cell::get) {
        0 => rayon::current_num_threads(),
        limit => limit.min(rayon::current_num_threads()),
    }
}

/// Runs `f` with [`threads`] limited to 1 on this thread (restored afterwards, even on panic).
pub fn sequential<R>(f: impl FnOnce() -> R) -> R {
    struct Restore(usize);
    impl Drop for Restore {
        fn drop(&mut self) {
            LIMIT.with(|l| l.set(self.0));
        }
    }
    let _restore = Restore(LIMIT.with(|l| l.replace(1)));
    f()
}

/// Runs `unit` on each pair of matching chunks of `x` (`in_len` long) and `out` (`out_len`
/// long): as parallel tasks, each confined to its own thread ([`sequential`]), when
/// `parallel`, else in order on this thread. Stops at the first error.
pub fn for_each_unit<E: Send>(
    x: &[f32],
    in_len: usize,
    out: &mut [f32],
    out_len: usize,
    parallel: bool,
    unit: impl Fn((&[f32], &mut [f32])) -> Result<(), E> + Sync,
) -> Result<(), E> {
    use rayon::prelude::*;
    if parallel {
        x.par_chunks(in_len)
            .zip(out.par_chunks_mut(out_len))
            .try_for_each(|p| sequential(|| unit(p)))
    } else {
        x.chunks(in_len)
            .zip(out.chunks_mut(out_len))
            .try_for_each(unit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sequential_limits_and_restores() {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap();
        pool.install(|| {
            assert_eq!(threads(), 2);
            sequential(|| {
                assert_eq!(threads(), 1);
                sequential(|| assert_eq!(threads(), 1));
                assert_eq!(threads(), 1);
            });
            assert_eq!(threads(), 2);
        });
    }
}
