//! Compute kernels. Each fast path (AVX2/FMA, chosen at run time) has a plain scalar reference
//! beside it, and tests compare the two.

pub mod activation;
pub mod conv;
pub mod conv_grad;
pub mod gemm;
pub mod pool;
pub mod qgemm;
pub mod scratch;
pub mod simd;

#[cfg(test)]
pub(crate) mod testutil;
