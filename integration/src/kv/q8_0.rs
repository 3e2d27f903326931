//! ggml's Q8_0 blocks for the KV store, kept as scales and values apart (`scales[b]` for
//! `quants[32 b..32 b + 32]`), so that attention dequantizes a block with a few vector
//! instructions. Written by hand because candle's `BlockQ8_0` keeps its fields private and
//! dequantizes element by element (attention ran at 0.86x of f16's speed through it), and no
//! maintained crate dequantizes Q8_0 from plain slices.

use half::f16;

/// Values per block.
pub const BLOCK: usize = 32;

/// Quantizes `src` (whole blocks) into `quants` and `scales` as ggml's `quantize_row_q8_0_ref`
/// does: per block `d = max |x| / 127`, values `round(x / d)` (half away from zero), `d` stored
/// as f16. As there, an infinite value (or a block whose scale overflows f16) reads back as NaN;
/// a NaN value reads back as 0 (ggml's C conversion leaves it undefined).
pub fn quantize(src: &[f32], quants: &mut [i8], scales: &mut [f16]) {
    debug_assert!(src.len().is_multiple_of(BLOCK) && quants.len() == src.len() && scales.len() * BLOCK == src.len());
    for ((x, q), s) in src.chunks_exact(BLOCK).zip(quants.chunks_exact_mut(BLOCK)).zip(scales.iter_mut()) {
        let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        *s = f16::from_f32(d);
        for (q, &v) in q.iter_mut().zip(x) {
            *q = (v * id).round() as i8;
        }
    }
}

/// `out[i] = quants[i] * scales[i / 32]` over whole blocks.
pub fn dequantize(quants: &[i8], scales: &[f16], out: &mut [f32]) {
    assert!(
        quants.len() == out.len() && scales.len() * BLOCK == out.len(),
        "{} values and {} scales for {} outputs",
        quants.len(),
        scales.len(),
        out.len()
    );
    #[cfg(target_arch = "x86_64")]
    if crate::cpu::has_avx2_fma() {
        // SAFETY: the CPU has AVX2 (checked above); the lengths agree (asserted above).
        return unsafe { dequantize_avx2(quants, scales, out) };
    }
    for ((q, s), o) in quants.chunks_exact(BLOCK).zip(scales).zip(out.chunks_exact_mut(BLOCK)) {
        let d = s.to_f32();
        for (o, &q) in o.iter_mut().zip(q) {
            *o = q as f32 * d;
        }
    }
}

/// # Safety
/// The CPU must have AVX2, and `quants` and `out` must hold 32 values per scale.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dequantize_avx2(quants: &[i8], scales: &[f16], out: &mut [f32]) {
    use std::arch::x86_64::*;
    let (pq, po) = (quants.as_ptr(), out.as_mut_ptr());
    for (b, s) in scales.iter().enumerate() {
        let d = _mm256_set1_ps(s.to_f32());
        for k in 0..BLOCK / 8 {
            let at = b * BLOCK + 8 * k;
            let eight = _mm_loadl_epi64(pq.add(at) as *const __m128i);
            let f = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(eight));
            _mm256_storeu_ps(po.add(at), _mm256_mul_ps(f, d));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Against the definitions, on blocks with a zero block, ties at .5 and the extremes.
    #[test]
    fn blocks_round_trip_as_ggml_defines_them() {
        let mut src: Vec<f32> = (0..4 * BLOCK).map(|i| ((i as f32 * 0.37).sin() * 3.0).powi(3)).collect();
        src[BLOCK..2 * BLOCK].fill(0.0);
        // amax 127 gives d = 1: values x.5 round away from zero.
        for (i, x) in src[2 * BLOCK..3 * BLOCK].iter_mut().enumerate() {
            *x = if i == 0 { 127.0 } else { i as f32 - 15.5 };
        }
        let (mut quants, mut scales) = (vec![0i8; src.len()], vec![f16::ZERO; 4]);
        quantize(&src, &mut quants, &mut scales);
        let mut out = vec![0f32; src.len()];
        dequantize(&quants, &scales, &mut out);
        for (b, x) in src.chunks(BLOCK).enumerate() {
            let amax = x.iter().map(|v| v.abs()).fold(0f32, f32::max);
            let d = amax / 127.0;
            assert_eq!(scales[b], f16::from_f32(d), "block {b}");
            for (j, &v) in x.iter().enumerate() {
                let q = if d == 0.0 { 0.0 } else { (v * (1.0 / d)).round() };
                assert_eq!(quants[b * BLOCK + j] as f32, q, "block {b}, value {j}: {v}");
                assert_eq!(out[b * BLOCK + j], q * f16::from_f32(d).to_f32(), "block {b}, value {j}");
            }
        }
        assert_eq!(&quants[2 * BLOCK..2 * BLOCK + 4], &[127, -15, -14, -13], "ties away from zero");
        assert!(quants[BLOCK..2 * BLOCK].iter().all(|&q| q == 0));
    }
}
