//! GEMM throughput: `cargo run --release --example gemm_bench`.
//!
//! Times lithe's sgemm (on-the-fly packing and prepacked B) against `matrixmultiply` on
//! 512^3 with 1 and 2 threads, and reports the fraction of this CPU's AVX2/FMA peak
//! (2 x 256-bit FMA per cycle = 32 f32 FLOP/cycle per core at the `cpu MHz` of /proc/cpuinfo).

use std::time::Instant;

use lithe::kernels::gemm::{gemm, Epilogue, Lhs, MatMut, MatRef, PackedB, Rhs};

fn cpu_mhz() -> Option<f64> {
    let info = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    info.lines()
        .find(|l| l.starts_with("cpu MHz"))
        .and_then(|l| l.split(':').nth(1))
        .and_then(|v| v.trim().parse().ok())
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
    println!(
        "AVX2/FMA: {}; peak per core {:.1} GFLOP/s (32 FLOP/cycle)",
        lithe::kernels::simd::has_avx2_fma(),
        32.0 * ghz
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
                    "  {threads} thread(s) {name:<22} {:>9.3} ms {gflops:>7.1} GFLOP/s  {:>5.1}% of peak",
                    secs * 1e3,
                    100.0 * gflops / (32.0 * ghz * threads as f64)
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
