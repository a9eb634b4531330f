//! Compute kernels. Each fast path (AVX2/FMA, chosen at run time) has a plain scalar reference
//! beside it, and tests compare the two.

pub mod activation;
pub mod qgemm;
