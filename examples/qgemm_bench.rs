//! Throughput of the quantization numerics, single thread:
//!
//! * int8 GEMM (u8 x i8 -> i32, and -> u8 requantized) at 512^3, AVX2 and portable kernels;
//! * streaming calibration over 10,000 MNIST-sized activation tensors;
//! * 8-bit k-means weight sharing of 400K weights.
//!
//! Run with `cargo run --release --example qgemm_bench`.

use std::time::Instant;

use lithe::kernels::qgemm::{self, Backend, PackedB, Requant};
use lithe::quant::calibrate::{HistKind, Histogram, MeanStd, MinMax, Observer};
use lithe::quant::{kmeans, QScheme};

/// xorshift64*, enough for benchmark data.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn unit(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32
    }

    fn normal(&mut self) -> f32 {
        let (a, b) = (self.unit().max(1e-7), self.unit());
        (-2.0 * a.ln()).sqrt() * (std::f32::consts::TAU * b).cos()
    }
}

/// Best and median seconds of `reps` runs of `f`.
fn time(reps: usize, mut f: impl FnMut()) -> (f64, f64) {
    f();
    let mut t: Vec<f64> = (0..reps)
        .map(|_| {
            let s = Instant::now();
            f();
            s.elapsed().as_secs_f64()
        })
        .collect();
    t.sort_by(f64::total_cmp);
    (t[0], t[reps / 2])
}

fn gemm(rng: &mut Rng) -> lithe::Result<()> {
    let (m, k, n) = (512, 512, 512);
    let a: Vec<u8> = (0..m * k).map(|_| rng.next() as u8).collect();
    let b: Vec<i8> = (0..k * n).map(|_| rng.next() as i8).collect();
    let s = Instant::now();
    let packed = PackedB::from_kn(&b, k, n, &[0])?;
    println!("pack B {k}x{n}: {:.2} ms", s.elapsed().as_secs_f64() * 1e3);
    let ops = 2.0 * (m * k * n) as f64;
    let mut c = vec![0i32; m * n];
    let mut backends = vec![Backend::Scalar];
    if Backend::avx2_available() {
        backends.insert(0, Backend::Avx2);
    }
    for backend in backends {
        let (best, med) = time(20, || {
            qgemm::qgemm_i32_with(backend, &a, m, 128, &packed, &mut c).expect("qgemm");
        });
        println!(
            "qgemm u8xi8->i32 {m}x{k}x{n} {backend:?}: {:.1} GOP/s best, {:.1} median ({:.2} ms)",
            ops / best * 1e-9,
            ops / med * 1e-9,
            best * 1e3
        );
    }
    let rq = Requant::Float {
        scales: vec![0.0007],
        zero_point: 128,
        qmin: 0,
        qmax: 255,
    };
    let bias = vec![100i32; n];
    let mut y = vec![0u8; m * n];
    let (best, _) = time(20, || {
        qgemm::qgemm(&a, m, 128, &packed, Some(&bias), &rq, &mut y).expect("qgemm");
    });
    println!(
        "qgemm u8xi8->u8 (bias, float requant) Auto: {:.1} GOP/s best",
        ops / best * 1e-9
    );
    // Output-channel-major (NCHW convolution) GEMM: the MNIST CNN's second convolution
    // (64 x 800 weights, 196 pixels) and a 512^3 product.
    for (m, k, n) in [
        (64, 800, 196),
        (512, 512, 512),
        (256, 256, 196),
        (32, 16, 12544),
        (16, 27, 12544),
    ] {
        let w: Vec<i8> = (0..m * k).map(|_| rng.next() as i8).collect();
        let x: Vec<u8> = (0..k * n).map(|_| rng.next() as u8).collect();
        let pw = qgemm::PackedW::new(&w, m, k, &[0])?.with_avx2_layout();
        let offsets = qgemm::row_offsets(&pw, 128, None);
        let scales = vec![0.0007f32; m];
        let stage = qgemm::WxStage::Requant {
            scales: &scales,
            zero_point: 128,
            lo: -128.0,
            hi: 127.0,
        };
        let mut y = vec![0u8; m * n];
        let ops = 2.0 * (m * k * n) as f64;
        let mut backends = vec![Backend::Scalar];
        if Backend::avx2_available() {
            backends.insert(0, Backend::Avx2);
        }
        if qgemm::vnni_available() {
            backends.insert(0, Backend::Vnni);
        }
        for backend in backends {
            let (best, _) = time(20, || {
                qgemm::qgemm_wx(backend, &pw, &x, n, &offsets, stage, 0, &mut y).expect("qgemm_wx");
            });
            let name = format!("{backend:?}");
            println!(
                "qgemm_wx (weights x activations, requant) {m}x{k}x{n} {name}: {:.1} GOP/s best",
                ops / best * 1e-9
            );
        }
    }
    Ok(())
}

fn calibration(rng: &mut Rng) -> lithe::Result<()> {
    // Post-ReLU-like activations: half zeros, the rest half-normal.
    for size in [784usize, 8 * 28 * 28] {
        let tensors: Vec<Vec<f32>> = (0..16)
            .map(|_| (0..size).map(|_| rng.normal().max(0.0) * 2.0).collect())
            .collect();
        let count = 10_000;
        let run = |obs: &mut dyn Observer| -> lithe::Result<f64> {
            let s = Instant::now();
            for i in 0..count {
                obs.observe(&tensors[i % tensors.len()])?;
            }
            Ok(s.elapsed().as_secs_f64())
        };
        let values = (count * size) as f64;
        let report = |name: &str, t: f64| {
            println!(
                "  {name:<22} {:7.1} ms  ({:.2} ns/value)",
                t * 1e3,
                t / values * 1e9
            )
        };
        println!("calibration over {count} tensors of {size} values:");
        report("MinMax", run(&mut MinMax::new("act"))?);
        report("MeanStd", run(&mut MeanStd::new("act"))?);
        let mut abs = Histogram::new("act", HistKind::Abs, 2048)?;
        report("Histogram |x| 2048", run(&mut abs)?);
        let mut signed = Histogram::new("act", HistKind::Signed, 2048)?;
        report("Histogram x 2048", run(&mut signed)?);
        let s = Instant::now();
        let kl = abs.entropy_range(128)?;
        let t_kl = s.elapsed().as_secs_f64();
        let s = Instant::now();
        let mse = abs.mse_range(&QScheme::U8_AFFINE)?;
        let t_mse = s.elapsed().as_secs_f64();
        let s = Instant::now();
        let pct = abs.percentile_range(99.99)?;
        let t_pct = s.elapsed().as_secs_f64();
        println!(
            "  thresholds: KL {:.3} ({:.1} ms), MSE {:.3} ({:.1} ms), 99.99% {:.3} ({:.3} ms), max {:.3}",
            kl.max,
            t_kl * 1e3,
            mse.max,
            t_mse * 1e3,
            pct.max,
            t_pct * 1e3,
            abs.max_range()?.max
        );
    }
    Ok(())
}

fn weight_sharing(rng: &mut Rng) -> lithe::Result<()> {
    let w: Vec<f32> = (0..400_000).map(|_| rng.normal() * 0.05).collect();
    let s = Instant::now();
    let l = kmeans::lloyd(&w, 256, kmeans::DEFAULT_MAX_ITER, "w")?;
    let t_l = s.elapsed().as_secs_f64();
    let s = Instant::now();
    let d = kmeans::optimal(&w, 256, "w")?;
    let t_d = s.elapsed().as_secs_f64();
    let lin = QScheme::S8_AFFINE.params_for(&w, "w")?;
    let lin_sse: f64 = w
        .iter()
        .map(|&x| f64::from(x - lin.fake_quantize(x)).powi(2))
        .sum();
    println!(
        "k-means 400K weights, k=256: Lloyd {:.0} ms (SSE {:.4e}), DP {:.0} ms (SSE {:.4e}); uniform 8-bit SSE {:.4e}",
        t_l * 1e3,
        l.sse(&w)?,
        t_d * 1e3,
        d.sse(&w)?,
        lin_sse
    );
    Ok(())
}

fn main() -> lithe::Result<()> {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    gemm(&mut rng)?;
    calibration(&mut rng)?;
    weight_sharing(&mut rng)?;
    Ok(())
}
