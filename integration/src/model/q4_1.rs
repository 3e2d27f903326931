//! Our kernel for weights in GGUF's Q4_1 format (the default model's): candle 0.10.2 has no SIMD
//! path for Q4_1 (`BlockQ4_1::vec_dot` is its scalar loop) and no crate offers one over this
//! block layout, hence this file. A block's dot product with 8-bit activations
//! ([`super::block_kernel`]) is `d_w d_a Σ q_w q_a + m_w s_a`, with AVX2 integer multiply-adds
//! when the CPU has them (checked at run time, so one binary runs anywhere) and a scalar loop
//! otherwise.

use half::f16;

#[cfg(test)]
use super::block_kernel::quantize_row;
use super::block_kernel::{self, BlockFormat, Q8Block, Simd, QK, ROW_GROUP};

/// Bytes per Q4_1 block: `d` (f16), `m` (f16), 16 bytes of nibbles (value `j` in the low nibble
/// of byte `j`, value `j + 16` in its high nibble).
const BLOCK_BYTES: usize = 20;
/// How far ahead in each row the kernel asks for weights.
const PREFETCH_BYTES: usize = 640;

/// `y = x W^T` for the `[n, k]` Q4_1 matrix `w` (GGUF bytes, row after row) and `x` of `m` rows
/// of `k` values, into `y` (`m * n`, row-major); an error when the sizes do not agree.
pub fn matmul(w: &[u8], (n, k): (usize, usize), x: &[f32], y: &mut [f32]) -> anyhow::Result<()> {
    matmul_many(&[(w, n)], k, x, &mut [y])
}

/// [`matmul`] of one input `x` with several matrices (`(bytes, rows)` each, all `k` wide) in
/// one parallel pass, into `ys[i]` (`m * rows_i`): the activations are rounded once and the
/// threads are handed work once (the attention's q/k/v and the MLP's gate/up).
pub fn matmul_many(ws: &[(&[u8], usize)], k: usize, x: &[f32], ys: &mut [&mut [f32]]) -> anyhow::Result<()> {
    block_kernel::matmul_many::<Q41>(ws, k, x, ys)
}

/// The Q4_1 format for [`block_kernel::matmul_many`].
pub(crate) struct Q41;

impl BlockFormat for Q41 {
    const NAME: &'static str = "Q4_1";
    const BLOCK_BYTES: usize = BLOCK_BYTES;

    fn dot(w: &[u8], a: &[Q8Block], simd: Simd) -> f32 {
        dot(w, a, simd)
    }

    fn dot_group(w: &[u8], row_bytes: usize, a: &[Q8Block], simd: Simd) -> [f32; ROW_GROUP] {
        dot_group(w, row_bytes, a, simd)
    }

    type Prepared = ();

    fn prepare(_: &[Vec<Q8Block>], _: Simd) {}
}

/// Dot product of one weight row (Q4_1 bytes) with one activation row.
#[inline]
fn dot(w: &[u8], a: &[Q8Block], simd: Simd) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if simd.avx2() {
        // SAFETY: `simd` says AVX2 only when the CPU has AVX2, FMA and F16C ([`Simd`]).
        return unsafe { dot_avx2(w, a) };
    }
    let _ = simd;
    dot_scalar(w, a)
}

/// Dot products of `ROW_GROUP` consecutive weight rows (`w`, `row_bytes` each) with one
/// activation row.
#[inline]
fn dot_group(w: &[u8], row_bytes: usize, a: &[Q8Block], simd: Simd) -> [f32; ROW_GROUP] {
    #[cfg(target_arch = "x86_64")]
    if simd.avx2() {
        // SAFETY: `simd` says AVX2 only when the CPU has AVX2, FMA and F16C ([`Simd`]);
        // `w` holds `ROW_GROUP` rows of `a.len()` blocks each.
        return unsafe { dot_group_avx2(w, row_bytes, a) };
    }
    let _ = simd;
    std::array::from_fn(|r| dot_scalar(&w[r * row_bytes..(r + 1) * row_bytes], a))
}

/// The reference loop (and the path of CPUs without AVX2).
fn dot_scalar(w: &[u8], a: &[Q8Block]) -> f32 {
    let mut total = 0f32;
    for (blk, act) in w.chunks_exact(BLOCK_BYTES).zip(a) {
        let d = f16::from_le_bytes([blk[0], blk[1]]).to_f32();
        let m = f16::from_le_bytes([blk[2], blk[3]]).to_f32();
        let mut isum = 0i32;
        for j in 0..QK / 2 {
            let byte = blk[4 + j];
            isum += (byte & 0x0F) as i32 * act.q[j] as i32 + (byte >> 4) as i32 * act.q[j + QK / 2] as i32;
        }
        total += d * act.d * isum as f32 + m * act.s;
    }
    total
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_avx2(w: &[u8], a: &[Q8Block]) -> f32 {
    use std::arch::x86_64::*;
    let mask = _mm_set1_epi8(0x0F);
    let ones = _mm256_set1_epi16(1);
    // One block: the i32 sums of `q_w q_a` as f32, scaled by `d_w d_a`, added to `acc`; `m_w s_a`
    // added to `mins`.
    let block = |blk: &[u8], act: &Q8Block, acc: __m256, mins: &mut f32| -> __m256 {
        let p = blk.as_ptr();
        let dm = _mm_cvtph_ps(_mm_cvtsi32_si128(std::ptr::read_unaligned(p as *const i32)));
        let (d, m) = (_mm_cvtss_f32(dm), _mm_cvtss_f32(_mm_shuffle_ps(dm, dm, 1)));
        let nib = _mm_loadu_si128(p.add(4) as *const __m128i);
        let lo = _mm_and_si128(nib, mask);
        let hi = _mm_and_si128(_mm_srli_epi16(nib, 4), mask);
        let wq = _mm256_set_m128i(hi, lo);
        let aq = _mm256_loadu_si256(act.q.as_ptr() as *const __m256i);
        // u8 x i8 pairs summed into i16 (at most 2 * 15 * 128: no overflow), then into i32.
        let sum = _mm256_madd_epi16(_mm256_maddubs_epi16(wq, aq), ones);
        *mins += m * act.s;
        _mm256_fmadd_ps(_mm256_set1_ps(d * act.d), _mm256_cvtepi32_ps(sum), acc)
    };
    // Two accumulators so that consecutive blocks' multiply-adds do not wait on each other.
    let (mut acc0, mut acc1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
    let (mut mins0, mut mins1) = (0f32, 0f32);
    let mut pairs = w.chunks_exact(2 * BLOCK_BYTES).zip(a.chunks_exact(2));
    for (blk, act) in pairs.by_ref() {
        acc0 = block(&blk[..BLOCK_BYTES], &act[0], acc0, &mut mins0);
        acc1 = block(&blk[BLOCK_BYTES..], &act[1], acc1, &mut mins1);
    }
    if a.len() % 2 == 1 {
        let last = a.len() - 1;
        acc0 = block(&w[last * BLOCK_BYTES..], &a[last], acc0, &mut mins0);
    }
    block_kernel::avx2::sum(_mm256_add_ps(acc0, acc1)) + mins0 + mins1
}

/// Dot products of `ROW_GROUP` consecutive weight rows with one activation row, two blocks at a
/// time in one 256-bit register per row (each 128-bit lane one block's sixteen bytes of
/// nibbles). Both blocks' `d` and `m` convert in one instruction; the `m_w s_a` terms gather in
/// a vector of their own. The activation side of a pair (low and high halves, scales, sums) is
/// built once for all the rows; an odd last block takes the one-row kernel.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_group_avx2(w: &[u8], row_bytes: usize, a: &[Q8Block]) -> [f32; ROW_GROUP] {
    use std::arch::x86_64::*;
    assert!(w.len() >= ROW_GROUP * row_bytes && row_bytes >= a.len() * BLOCK_BYTES);
    let mask = _mm256_set1_epi8(0x0F);
    let ones = _mm256_set1_epi16(1);
    // Lanes 0-3 take the first block's `d`, lanes 4-7 the second's (of `[d0, m0, d1, m1]`).
    let spread_d = _mm256_setr_epi32(0, 0, 0, 0, 2, 2, 2, 2);
    let mut acc = [_mm256_setzero_ps(); ROW_GROUP];
    let mut mins = [_mm_setzero_ps(); ROW_GROUP];
    let pairs = a.len() / 2;
    for pair in 0..pairs {
        let (a0, a1) = (&a[2 * pair], &a[2 * pair + 1]);
        let (a_lo, a_hi, da) = block_kernel::avx2::pair(a0, a1);
        let sa = _mm_setr_ps(0.0, a0.s, 0.0, a1.s);
        for r in 0..ROW_GROUP {
            let p = w.as_ptr().add(r * row_bytes + 2 * pair * BLOCK_BYTES);
            _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(PREFETCH_BYTES) as *const i8);
            let halves = _mm_setr_epi32(
                std::ptr::read_unaligned(p as *const i32),
                std::ptr::read_unaligned(p.add(BLOCK_BYTES) as *const i32),
                0,
                0,
            );
            let dm = _mm_cvtph_ps(halves);
            let dw = _mm256_permutevar8x32_ps(_mm256_castps128_ps256(dm), spread_d);
            let nib = _mm256_loadu2_m128i(p.add(BLOCK_BYTES + 4) as *const __m128i, p.add(4) as *const __m128i);
            let lo = _mm256_and_si256(nib, mask);
            let hi = _mm256_and_si256(_mm256_srli_epi16(nib, 4), mask);
            // u8 x i8 pairs summed into i16 (at most 4 * 15 * 127 over both halves: no
            // overflow), then into i32.
            let products = _mm256_add_epi16(_mm256_maddubs_epi16(lo, a_lo), _mm256_maddubs_epi16(hi, a_hi));
            let sum = _mm256_madd_epi16(products, ones);
            acc[r] = _mm256_fmadd_ps(_mm256_mul_ps(dw, da), _mm256_cvtepi32_ps(sum), acc[r]);
            mins[r] = _mm_fmadd_ps(dm, sa, mins[r]);
        }
    }
    let mut out = block_kernel::avx2::sum4(acc);
    let last = 2 * pairs;
    for (r, (o, m)) in out.iter_mut().zip(mins).enumerate() {
        let mut lanes = [0f32; 4];
        _mm_storeu_ps(lanes.as_mut_ptr(), m);
        *o += lanes.iter().sum::<f32>();
        if last < a.len() {
            *o += dot_avx2(&w[r * row_bytes + last * BLOCK_BYTES..], &a[last..]);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Q4_1 bytes of seeded values (candle's quantizer) and their dequantized values.
    fn matrix(rows: usize, cols: usize) -> (Vec<u8>, Vec<f32>) {
        let vals: Vec<f32> = (0..rows * cols).map(|i| ((i as f32 * 0.7131).sin() * 1.7).powi(3)).collect();
        let t = candle_core::Tensor::from_vec(vals, (rows, cols), &candle_core::Device::Cpu).unwrap();
        let q = candle_core::quantized::QTensor::quantize(&t, candle_core::quantized::GgmlDType::Q4_1).unwrap();
        let deq: Vec<f32> = q.dequantize(&candle_core::Device::Cpu).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        (q.data().unwrap().to_vec(), deq)
    }

    #[test]
    fn both_kernels_match_the_dequantized_product_within_the_activation_rounding() {
        // 70 rows: groups of four and a remainder of two; three input rows; an even and an odd
        // number of blocks per row.
        for cols in [256, 288] {
            check_kernels(70, cols, 3);
        }
    }

    /// `matmul` against the exact product of the dequantized weights, and AVX2 against scalar.
    fn check_kernels(rows: usize, cols: usize, m: usize) {
        let (bytes, w) = matrix(rows, cols);
        let x: Vec<f32> = (0..m * cols).map(|i| (i as f32 * 0.377).cos()).collect();
        let mut y = vec![0f32; m * rows];
        matmul(&bytes, (rows, cols), &x, &mut y).unwrap();
        let acts: Vec<Vec<Q8Block>> = x.chunks_exact(cols).map(quantize_row).collect();
        let row_bytes = cols / QK * BLOCK_BYTES;
        for r in 0..m {
            for o in 0..rows {
                let xr = &x[r * cols..(r + 1) * cols];
                let wr = &w[o * cols..(o + 1) * cols];
                let exact: f64 = xr.iter().zip(wr).map(|(a, b)| *a as f64 * *b as f64).sum();
                // Rounding an activation to 8 bits moves it by at most its block's max / 254.
                let tol: f64 = (0..cols)
                    .map(|i| {
                        let b = i / QK * QK;
                        let amax = xr[b..b + QK].iter().fold(0f32, |a, v| a.max(v.abs()));
                        wr[i].abs() as f64 * amax as f64 / 254.0
                    })
                    .sum::<f64>()
                    + 1e-4;
                let got = y[r * rows + o];
                assert!((got as f64 - exact).abs() <= tol, "[{r},{o}]: {got} vs {exact}");
                let scalar = dot_scalar(&bytes[o * row_bytes..(o + 1) * row_bytes], &acts[r]);
                assert!((scalar - got).abs() <= 1e-4 * (1.0 + scalar.abs()), "kernels disagree at [{r},{o}]");
            }
        }
    }

    #[test]
    fn several_matrices_in_one_pass_equal_one_at_a_time() {
        let cols = 128;
        let parts: Vec<(Vec<u8>, usize)> = [44, 9, 17].iter().map(|&r| (matrix(r, cols).0, r)).collect();
        let x: Vec<f32> = (0..2 * cols).map(|i| (i as f32 * 0.29).sin()).collect();
        let ws: Vec<(&[u8], usize)> = parts.iter().map(|(b, r)| (b.as_slice(), *r)).collect();
        let mut together: Vec<Vec<f32>> = parts.iter().map(|(_, r)| vec![0f32; 2 * r]).collect();
        let mut outs: Vec<&mut [f32]> = together.iter_mut().map(|y| y.as_mut_slice()).collect();
        matmul_many(&ws, cols, &x, &mut outs).unwrap();
        for ((b, r), got) in parts.iter().zip(&together) {
            let mut alone = vec![0f32; 2 * r];
            matmul(b, (*r, cols), &x, &mut alone).unwrap();
            for (a, g) in alone.iter().zip(got) {
                assert!((a - g).abs() <= 1e-5 * (1.0 + a.abs()), "{a} vs {g}");
            }
        }
        let mut short = vec![0f32; 3];
        assert!(matmul_many(&ws[..1], cols, &x, &mut [&mut short]).is_err(), "an output of the wrong size");
    }

    #[test]
    fn sizes_that_do_not_agree_are_an_error() {
        let mut y = vec![0f32; 2];
        assert!(matmul(&[0; 39], (2, 32), &[0.0; 32], &mut y).is_err());
        assert!(matmul(&[0; 40], (2, 32), &[0.0; 31], &mut y).is_err());
    }
}
