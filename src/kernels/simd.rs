//! Run-time CPU feature selection and the 8-lane AVX forms of the epilogue activations.
//!
//! The vector forms use the same operation order as [`Activation::apply_scalar`] (separate
//! multiply and add, never a fused multiply-add) so fused and unfused graphs agree bit for bit.
//! Sigmoid and Tanh have no vector form here; callers apply them with the scalar code on the
//! stored, cache-hot output.

use super::activation::Activation;

/// False when the environment variable `LITHE_MAX_ISA` is `avx2`: the
/// AVX-512 kernels (VNNI integer products, VBMI byte permutes, 16-lane quantization) then stay
/// unused, to measure or reproduce what a CPU without them runs. Read once.
pub fn avx512_allowed() -> bool {
    static ALLOWED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ALLOWED.get_or_init(|| std::env::var("LITHE_MAX_ISA").as_deref() != Ok("avx2"))
}

/// True when AVX-512 F, VL and BW are available and allowed ([`avx512_allowed`]).
pub fn has_avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        avx512_allowed()
            && std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512vl")
            && std::arch::is_x86_feature_detected!("avx512bw")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// True when AVX2 and FMA are available on this CPU (checked at run time; the crate is not
/// compiled with `target-cpu=native`).
#[inline]
pub fn has_avx2_fma() -> bool {
    #[cfg(test)]
    if PORTABLE_ONLY.with(|p| p.get()) {
        return false;
    }
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// True when the f32 kernels may use 512-bit vectors: AVX2/FMA paths enabled
/// ([`has_avx2_fma`]) and AVX-512 available and allowed ([`has_avx512`]).
#[inline]
pub fn has_avx512_f32() -> bool {
    #[cfg(test)]
    if AVX2_ONLY.with(|p| p.get()) {
        return false;
    }
    static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    has_avx2_fma() && *HAS.get_or_init(has_avx512)
}

#[cfg(test)]
thread_local! {
    /// Lets tests exercise the portable kernels on machines with AVX2. Kernels sample
    /// [`has_avx2_fma`] on the calling thread, so the setting reaches their rayon workers.
    static PORTABLE_ONLY: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    /// As `PORTABLE_ONLY`, for the AVX2 paths of kernels that also have AVX-512 ones.
    static AVX2_ONLY: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f` with the 512-bit f32 paths disabled on this thread (tests only).
#[cfg(test)]
pub fn avx2_only<R>(f: impl FnOnce() -> R) -> R {
    AVX2_ONLY.with(|p| p.set(true));
    let r = f();
    AVX2_ONLY.with(|p| p.set(false));
    r
}

/// Runs `f` with the AVX2 paths disabled on this thread (tests only).
#[cfg(test)]
pub fn portable_only<R>(f: impl FnOnce() -> R) -> R {
    PORTABLE_ONLY.with(|p| p.set(true));
    let r = f();
    PORTABLE_ONLY.with(|p| p.set(false));
    r
}

/// True when [`avx::act`] computes `act` (false means: apply it with scalar code afterwards).
#[inline]
pub fn has_vector_form(act: Activation) -> bool {
    !matches!(act, Activation::Sigmoid | Activation::Tanh)
}

#[cfg(target_arch = "x86_64")]
pub mod avx {
    use super::Activation;
    use std::arch::x86_64::*;

    /// `act` applied to eight lanes; identity for activations without a vector form.
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn act(v: __m256, act: Activation) -> __m256 {
        match act {
            Activation::Relu => _mm256_max_ps(v, _mm256_setzero_ps()),
            Activation::Clip { min, max } => {
                _mm256_min_ps(_mm256_max_ps(v, _mm256_set1_ps(min)), _mm256_set1_ps(max))
            }
            Activation::HardSigmoid { alpha, beta } => {
                let y = _mm256_add_ps(
                    _mm256_mul_ps(v, _mm256_set1_ps(alpha)),
                    _mm256_set1_ps(beta),
                );
                clamp01(y)
            }
            Activation::HardSwish => {
                let y = _mm256_add_ps(
                    _mm256_mul_ps(v, _mm256_set1_ps(1.0 / 6.0)),
                    _mm256_set1_ps(0.5),
                );
                _mm256_mul_ps(v, clamp01(y))
            }
            Activation::LeakyRelu { alpha } => {
                let neg = _mm256_cmp_ps::<_CMP_LT_OQ>(v, _mm256_setzero_ps());
                _mm256_blendv_ps(v, _mm256_mul_ps(v, _mm256_set1_ps(alpha)), neg)
            }
            Activation::Sigmoid | Activation::Tanh => v,
        }
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn clamp01(y: __m256) -> __m256 {
        _mm256_min_ps(_mm256_max_ps(y, _mm256_setzero_ps()), _mm256_set1_ps(1.0))
    }

    /// The 8x8 block whose row `i` holds lane `i` of every row of `r` (a transpose).
    ///
    /// # Safety
    /// The CPU must support AVX.
    #[inline]
    #[target_feature(enable = "avx")]
    pub unsafe fn transpose8x8(r: [__m256; 8]) -> [__m256; 8] {
        let t0 = _mm256_unpacklo_ps(r[0], r[1]);
        let t1 = _mm256_unpackhi_ps(r[0], r[1]);
        let t2 = _mm256_unpacklo_ps(r[2], r[3]);
        let t3 = _mm256_unpackhi_ps(r[2], r[3]);
        let t4 = _mm256_unpacklo_ps(r[4], r[5]);
        let t5 = _mm256_unpackhi_ps(r[4], r[5]);
        let t6 = _mm256_unpacklo_ps(r[6], r[7]);
        let t7 = _mm256_unpackhi_ps(r[6], r[7]);
        let u0 = _mm256_shuffle_ps::<0x44>(t0, t2);
        let u1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
        let u2 = _mm256_shuffle_ps::<0x44>(t1, t3);
        let u3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
        let u4 = _mm256_shuffle_ps::<0x44>(t4, t6);
        let u5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
        let u6 = _mm256_shuffle_ps::<0x44>(t5, t7);
        let u7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
        [
            _mm256_permute2f128_ps::<0x20>(u0, u4),
            _mm256_permute2f128_ps::<0x20>(u1, u5),
            _mm256_permute2f128_ps::<0x20>(u2, u6),
            _mm256_permute2f128_ps::<0x20>(u3, u7),
            _mm256_permute2f128_ps::<0x31>(u0, u4),
            _mm256_permute2f128_ps::<0x31>(u1, u5),
            _mm256_permute2f128_ps::<0x31>(u2, u6),
            _mm256_permute2f128_ps::<0x31>(u3, u7),
        ]
    }
}

/// The 16-lane forms of [`avx::act`].
#[cfg(target_arch = "x86_64")]
pub mod avx512 {
    use super::Activation;
    use std::arch::x86_64::*;

    /// `act` applied to sixteen lanes; identity for activations without a vector form.
    ///
    /// # Safety
    /// The CPU must support AVX-512 F.
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub unsafe fn act(v: __m512, act: Activation) -> __m512 {
        match act {
            Activation::Relu => _mm512_max_ps(v, _mm512_setzero_ps()),
            Activation::Clip { min, max } => {
                _mm512_min_ps(_mm512_max_ps(v, _mm512_set1_ps(min)), _mm512_set1_ps(max))
            }
            Activation::HardSigmoid { alpha, beta } => {
                let y = _mm512_add_ps(
                    _mm512_mul_ps(v, _mm512_set1_ps(alpha)),
                    _mm512_set1_ps(beta),
                );
                clamp01(y)
            }
            Activation::HardSwish => {
                let y = _mm512_add_ps(
                    _mm512_mul_ps(v, _mm512_set1_ps(1.0 / 6.0)),
                    _mm512_set1_ps(0.5),
                );
                _mm512_mul_ps(v, clamp01(y))
            }
            Activation::LeakyRelu { alpha } => {
                let neg = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(v, _mm512_setzero_ps());
                _mm512_mask_mul_ps(v, neg, v, _mm512_set1_ps(alpha))
            }
            Activation::Sigmoid | Activation::Tanh => v,
        }
    }

    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn clamp01(y: __m512) -> __m512 {
        _mm512_min_ps(_mm512_max_ps(y, _mm512_setzero_ps()), _mm512_set1_ps(1.0))
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::*;

    #[test]
    fn vector_activations_match_scalar_bits() {
        if !has_avx2_fma() {
            return;
        }
        let acts = [
            Activation::Relu,
            Activation::Clip { min: 0.0, max: 6.0 },
            Activation::HardSigmoid {
                alpha: 0.2,
                beta: 0.5,
            },
            Activation::HardSwish,
            Activation::LeakyRelu { alpha: 0.1 },
        ];
        let xs: Vec<f32> = (0..64).map(|i| (i as f32 - 32.0) * 0.37).collect();
        for act in acts {
            for chunk in xs.chunks(8) {
                let mut out = [0f32; 8];
                // SAFETY: features checked above; `chunk` and `out` hold eight floats.
                unsafe {
                    use std::arch::x86_64::*;
                    let v = avx::act(_mm256_loadu_ps(chunk.as_ptr()), act);
                    _mm256_storeu_ps(out.as_mut_ptr(), v);
                }
                for (o, &x) in out.iter().zip(chunk) {
                    assert_eq!(o.to_bits(), act.apply_scalar(x).to_bits(), "{act:?} at {x}");
                }
            }
            if !has_avx512() {
                continue;
            }
            for chunk in xs.chunks(16) {
                let mut out = [0f32; 16];
                // SAFETY: AVX-512 F checked above; `chunk` and `out` hold sixteen floats.
                unsafe {
                    use std::arch::x86_64::*;
                    let v = avx512::act(_mm512_loadu_ps(chunk.as_ptr()), act);
                    _mm512_storeu_ps(out.as_mut_ptr(), v);
                }
                for (o, &x) in out.iter().zip(chunk) {
                    assert_eq!(o.to_bits(), act.apply_scalar(x).to_bits(), "{act:?} at {x}");
                }
            }
        }
    }
}
