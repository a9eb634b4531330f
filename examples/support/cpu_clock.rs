//! CPU time for the benchmark examples: unlike wall time it does not grow when other processes
//! take the cores, which makes single-thread runs comparable on a busy machine. Linux x86-64
//! only (a raw `clock_gettime` syscall, no libc dependency); zero elsewhere.
#![allow(dead_code)]

use std::time::Duration;

const CLOCK_PROCESS_CPUTIME_ID: i64 = 2;
const CLOCK_THREAD_CPUTIME_ID: i64 = 3;

/// CPU time of the whole process (all threads).
pub fn process_cpu() -> Duration {
    clock(CLOCK_PROCESS_CPUTIME_ID)
}

/// CPU time of the calling thread.
pub fn thread_cpu() -> Duration {
    clock(CLOCK_THREAD_CPUTIME_ID)
}

#[cfg(all(target_os = "linux", target_arch = "x86_64"))]
fn clock(id: i64) -> Duration {
    let mut ts = [0i64; 2];
    let ret: i64;
    // SAFETY: clock_gettime(id, &ts) writes two i64s into `ts`.
    unsafe {
        std::arch::asm!(
            "syscall",
            inlateout("rax") 228i64 => ret,
            in("rdi") id,
            in("rsi") ts.as_mut_ptr(),
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack)
        );
    }
    if ret != 0 {
        return Duration::ZERO;
    }
    Duration::new(ts[0] as u64, ts[1] as u32)
}

#[cfg(not(all(target_os = "linux", target_arch = "x86_64")))]
fn clock(_: i64) -> Duration {
    Duration::ZERO
}
