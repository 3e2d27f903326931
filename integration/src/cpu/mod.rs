//! What this CPU can run, checked once at run time, so that one binary picks its SIMD kernels on
//! whatever x86-64 machine it lands on, and the small matrix products the fused kernels share
//! ([`matmul`]).

pub mod matmul;

/// True when the CPU has AVX2, FMA and F16C (every x86-64 CPU since about 2013).
pub fn has_avx2_fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static FAST: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *FAST.get_or_init(|| {
            is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}
