//! Compute kernels. Each fast path (AVX2/FMA, chosen at run time) has a plain scalar reference
//! beside it, and tests compare the two.
//!
//! - [`gemm`]: `C = act(alpha * A * B + beta * C + bias)` over strided f32 matrices, with
//!   operands packed once ([`gemm::PackedA`], [`gemm::PackedB`]) or gathered ([`gemm::GatherRef`]).
//! - [`conv`]: NCHW 2-D (and 1-D) convolution with groups, strides, dilations, pads and a
//!   fused bias + activation ([`conv::Conv2d`]).
//! - [`pool`]: max / average / global pooling.
//! - [`activation`]: the activations the epilogues apply.
//!
//! Kernels split work over [`par::threads`] (rayon's current thread count unless the caller
//! runs sequentially) when a problem is big enough, and make no rayon call at all with one
//! thread. Scratch memory comes from per-thread pools
//! ([`scratch`]), so a steady-state call allocates nothing.

pub mod activation;
pub mod conv;
pub mod conv_grad;
pub mod gemm;
pub mod par;
pub mod pool;
pub mod pool_codes;
pub mod qgemm;
pub mod scratch;
pub mod simd;

#[cfg(test)]
pub(crate) mod testutil;
