//! GEMM throughput: `cargo run --release --example gemm_bench`.
//!
//! Times lithe's sgemm (on-the-fly packing and prepacked B) against `matrixmultiply` on
//! 512^3 and a few inference-shaped problems with 1 and 2 threads, and reports the fraction
//! of this CPU's AVX2/FMA peak (2 x 256-bit FMA per cycle = 32 f32 FLOP/cycle per core) at the
//! `cpu MHz` of /proc/cpuinfo. Virtual machines often report the base clock there while the
//! core turbo-boosts, so the clock is also measured (a chain of dependent integer adds, one
//! cycle each) and the fraction given against that too.

use std::time::Instant;

use lithe::kernels::gemm::{gemm, Epilogue, Lhs, MatMut, MatRef, PackedB, Rhs};

fn cpu_mhz() -> Option<f64> {
    let info = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    info.lines()
        .find(|l| l.starts_with("cpu MHz"))
        .and_then(|l| l.split(':').nth(1))
        .and_then(|v| v.trim().parse().ok())
}

/// Cycles per nanosecond of a dependent add chain (one add per cycle on any x86-64 core).
#[cfg(target_arch = "x86_64")]
fn measured_ghz() -> f64 {
    let iters: u64 = 50_000_000;
    let mut best = f64::INFINITY;
    for _ in 0..5 {
        let t = Instant::now();
        let mut x: u64 = 0;
        let mut n = iters;
        // SAFETY: register-only arithmetic; no memory is touched.
        unsafe {
            std::arch::asm!(
                "2:",
                "add {x}, 1", "add {x}, 1", "add {x}, 1", "add {x}, 1", "add {x}, 1",
                "add {x}, 1", "add {x}, 1", "add {x}, 1", "add {x}, 1", "add {x}, 1",
                "dec {n}",
                "jnz 2b",
                x = inout(reg) x,
                n = inout(reg) n,
                options(nomem, nostack),
            );
        }
        std::hint::black_box((x, n));
        best = best.min(t.elapsed().as_secs_f64());
    }
    (iters * 10) as f64 / best / 1e9
}

#[cfg(not(target_arch = "x86_64"))]
fn measured_ghz() -> f64 {
    f64::NAN
}

/// Best-of time in seconds of `f`, after a warm-up, over enough repetitions to fill ~0.5 s.
fn time(mut f: impl FnMut()) -> f64 {
    f();
    let t0 = Instant::now();
    f();
    let once = t0.elapsed().as_secs_f64().max(1e-6);
    let reps = ((0.5 / once) as usize).clamp(3, 200);
    let mut best = f64::INFINITY;
    for _ in 0..reps {
        let t = Instant::now();
        f();
        best = best.min(t.elapsed().as_secs_f64());
    }
    best
}

fn data(n: usize, seed: u32) -> Vec<f32> {
    (0..n)
        .map(|i| {
            ((i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed) >> 8) as f32
                / (1 << 24) as f32
                - 0.5
        })
        .collect()
}

fn main() -> lithe::Result<()> {
    let mhz = cpu_mhz();
    let ghz = mhz.unwrap_or(2500.0) / 1000.0;
    match mhz {
        Some(m) => println!("clock: {m:.0} MHz (first 'cpu MHz' line of /proc/cpuinfo)"),
        None => println!("clock: /proc/cpuinfo has no 'cpu MHz'; assuming 2500 MHz"),
    }
    let real_ghz = measured_ghz();
    println!(
        "measured clock: {real_ghz:.2} GHz (dependent add chain); AVX2/FMA: {}",
        lithe::kernels::simd::has_avx2_fma()
    );
    println!(
        "peak per core: {:.1} GFLOP/s at {ghz:.2} GHz, {:.1} GFLOP/s at {real_ghz:.2} GHz",
        32.0 * ghz,
        32.0 * real_ghz
    );

    let shapes: &[(usize, usize, usize)] = &[
        (512, 512, 512),
        (64, 196, 288),
        (1, 128, 3136),
        (128, 3136, 64),
    ];
    for &(m, n, k) in shapes {
        let a = data(m * k, 1);
        let b = data(k * n, 2);
        let mut c = vec![0.0f32; m * n];
        let flop = 2.0 * (m * n * k) as f64;
        let am = MatRef::row_major(&a, m, k)?;
        let bm = MatRef::row_major(&b, k, n)?;
        let packed = PackedB::new(bm);
        println!("\n{m}x{n}x{k} (MxNxK):");
        for threads in [1, 2] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .map_err(|e| lithe::Error::Data(e.to_string()))?;
            let report = |name: &str, secs: f64| {
                let gflops = flop / secs / 1e9;
                println!(
                    "  {threads} thread(s) {name:<18} {:>8.3} ms {gflops:>6.1} GFLOP/s  {:>5.1}% of peak (cpuinfo clock) {:>5.1}% (measured clock)",
                    secs * 1e3,
                    100.0 * gflops / (32.0 * ghz * threads as f64),
                    100.0 * gflops / (32.0 * real_ghz * threads as f64)
                );
            };
            let t = pool.install(|| {
                time(|| {
                    let cm = MatMut::row_major(&mut c, m, n).expect("sized above");
                    gemm(
                        1.0,
                        Lhs::Mat(am),
                        Rhs::Mat(bm),
                        0.0,
                        cm,
                        Epilogue::default(),
                    )
                    .expect("shapes agree");
                })
            });
            report("lithe", t);
            let t = pool.install(|| {
                time(|| {
                    let cm = MatMut::row_major(&mut c, m, n).expect("sized above");
                    gemm(
                        1.0,
                        Lhs::Mat(am),
                        Rhs::Packed(&packed),
                        0.0,
                        cm,
                        Epilogue::default(),
                    )
                    .expect("shapes agree");
                })
            });
            report("lithe prepacked B", t);
            if threads == 1 {
                let t = time(|| unsafe {
                    // SAFETY: a, b, c hold m*k, k*n, m*n floats with the given row-major strides.
                    matrixmultiply::sgemm(
                        m,
                        k,
                        n,
                        1.0,
                        a.as_ptr(),
                        k as isize,
                        1,
                        b.as_ptr(),
                        n as isize,
                        1,
                        0.0,
                        c.as_mut_ptr(),
                        n as isize,
                        1,
                    )
                });
                report("matrixmultiply", t);
            }
        }
    }
    Ok(())
}
