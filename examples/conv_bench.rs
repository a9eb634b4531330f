//! Convolution layer timings: `cargo run --release --example conv_bench -- [FILTER] [THREADS]`.
//!
//! Times [`Conv2d::run`] on the layer shapes of the models lithe is compared against ONNX
//! Runtime on (MNIST CNN, PP-LCNet) at batch 1 and 64, and reports the median and best thread
//! CPU time (with one thread) or wall time, and the multiply-add rate. CPU time is what other
//! processes on a busy machine do not inflate. FILTER keeps the cases whose name contains it.

#[path = "support/cpu_clock.rs"]
mod cpu_clock;

use cpu_clock::thread_cpu;
use std::time::Instant;

use lithe::kernels::activation::Activation;
use lithe::kernels::conv::{Conv2d, Conv2dGeom};
use lithe::kernels::par;

struct Case {
    name: &'static str,
    c_in: usize,
    c_out: usize,
    groups: usize,
    k: usize,
    stride: usize,
    pad: usize,
    hw: usize,
    act: Activation,
}

const fn case(
    name: &'static str,
    (c_in, c_out, groups): (usize, usize, usize),
    (k, stride, pad): (usize, usize, usize),
    hw: usize,
    act: Activation,
) -> Case {
    Case {
        name,
        c_in,
        c_out,
        groups,
        k,
        stride,
        pad,
        hw,
        act,
    }
}

const HS: Activation = Activation::HardSwish;
const RELU: Activation = Activation::Relu;

const CASES: &[Case] = &[
    case("mnist.conv1 3x3 1->32 @28", (1, 32, 1), (3, 1, 1), 28, RELU),
    case(
        "mnist.conv2 3x3 32->64 @14",
        (32, 64, 1),
        (3, 1, 1),
        14,
        RELU,
    ),
    case("lcnet.0 3x3s2 3->16 @224", (3, 16, 1), (3, 2, 1), 224, HS),
    case("lcnet.1 dw3x3 16 @112", (16, 16, 16), (3, 1, 1), 112, HS),
    case("lcnet.2 pw 16->32 @112", (16, 32, 1), (1, 1, 0), 112, HS),
    case("lcnet.3 dw3x3s2 32 @112", (32, 32, 32), (3, 2, 1), 112, HS),
    case("lcnet.4 pw 32->64 @56", (32, 64, 1), (1, 1, 0), 56, HS),
    case("lcnet.5 dw3x3 64 @56", (64, 64, 64), (3, 1, 1), 56, HS),
    case("lcnet.6 pw 64->64 @56", (64, 64, 1), (1, 1, 0), 56, HS),
    case("lcnet.10 pw 128->128 @28", (128, 128, 1), (1, 1, 0), 28, HS),
    case("lcnet.13 dw5x5 256 @14", (256, 256, 256), (5, 1, 2), 14, HS),
    case("lcnet.14 pw 256->256 @14", (256, 256, 1), (1, 1, 0), 14, HS),
    case("lcnet.27 dw5x5 512 @7", (512, 512, 512), (5, 1, 2), 7, HS),
    case("lcnet.30 pw 512->512 @7", (512, 512, 1), (1, 1, 0), 7, HS),
    case("lcnet.31 pw 512->1280 @1", (512, 1280, 1), (1, 1, 0), 1, HS),
];

fn main() -> lithe::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let filter = args.first().map(String::as_str).unwrap_or("");
    let threads: usize = args.get(1).and_then(|t| t.parse().ok()).unwrap_or(1);
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .map_err(|e| lithe::Error::Graph(e.to_string()))?;
    println!(
        "{:<30} {:>5} {:>10} {:>10} {:>8}",
        "layer", "batch", "p50 ms", "min ms", "GMAC/s"
    );
    for c in CASES.iter().filter(|c| c.name.contains(filter)) {
        let geom = Conv2dGeom {
            c_in: c.c_in,
            c_out: c.c_out,
            groups: c.groups,
            kernel: [c.k, c.k],
            stride: [c.stride, c.stride],
            dilation: [1, 1],
            pads: [c.pad; 4],
        };
        let w: Vec<f32> = (0..c.c_out * c.c_in / c.groups * c.k * c.k)
            .map(|i| ((i * 37) % 101) as f32 / 101.0 - 0.5)
            .collect();
        let b: Vec<f32> = (0..c.c_out).map(|i| i as f32 / 100.0).collect();
        let conv = Conv2d::new(geom.clone(), &w, Some(&b), Some(c.act))?;
        let (oh, ow) = geom.out_hw(c.hw, c.hw)?;
        for batch in [1usize, 64] {
            let x: Vec<f32> = (0..batch * c.c_in * c.hw * c.hw)
                .map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0)
                .collect();
            let mut out = vec![0.0f32; batch * c.c_out * oh * ow];
            let macs = batch * c.c_out * oh * ow * c.c_in / c.groups * c.k * c.k;
            // Enough repetitions for about 0.3 s, at least 5.
            let reps = (3e8 / macs.max(1) as f64).clamp(5.0, 5000.0) as usize;
            let mut times = Vec::with_capacity(reps);
            pool.install(|| -> lithe::Result<()> {
                for _ in 0..reps + 1 {
                    let (c0, w0) = (thread_cpu(), Instant::now());
                    if threads == 1 {
                        par::sequential(|| conv.run(&x, [batch, c.hw, c.hw], &mut out))?;
                        times.push(thread_cpu().saturating_sub(c0));
                    } else {
                        conv.run(&x, [batch, c.hw, c.hw], &mut out)?;
                        times.push(w0.elapsed());
                    }
                }
                Ok(())
            })?;
            times.remove(0);
            times.sort();
            let p50 = times[times.len() / 2].as_secs_f64() * 1e3;
            let min = times[0].as_secs_f64() * 1e3;
            println!(
                "{:<30} {batch:>5} {p50:>10.4} {min:>10.4} {:>8.1}",
                c.name,
                macs as f64 / min / 1e6
            );
        }
    }
    Ok(())
}
