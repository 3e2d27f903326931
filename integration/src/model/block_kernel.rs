//! Matrix products over weights kept in a GGUF block format, with our own SIMD kernels where
//! candle 0.10.2 has none (Q4_1: scalar there; MXFP4: unknown to it). Activations are rounded to
//! 8 bits per block of 32 (Q8_1: a scale and the block's sum), each format supplies the dot
//! product of its weight rows with such blocks ([`BlockFormat`]), and every weight row is read
//! once per call whatever the number of input rows (candle re-reads the matrix per row).

use rayon::prelude::*;

/// Values per block.
pub(crate) const QK: usize = 32;
/// Weight rows the kernels read together (one pass over the activations serves them all, and
/// their sums are reduced together).
pub(crate) const ROW_GROUP: usize = 4;
/// Parallel tasks per thread: enough to even out uneven threads, few enough that rayon hand-offs
/// stay cheap (a decode step runs hundreds of these matmuls).
const TASKS_PER_THREAD: usize = 3;

/// One block of activations rounded to 8 bits: `x ≈ d q`, and `s = d Σ q`.
#[derive(Clone, Copy)]
pub(crate) struct Q8Block {
    /// Scale.
    pub(crate) d: f32,
    /// `d Σ q`.
    pub(crate) s: f32,
    /// The rounded values.
    pub(crate) q: [i8; QK],
}

/// Which kernels this CPU runs. Only [`Simd::detect`] makes one, so a value that says AVX2 proves
/// the CPU has it (AVX2, FMA and F16C): the safe functions that take one may run those
/// instructions.
#[derive(Clone, Copy)]
pub(crate) struct Simd {
    avx2: bool,
}

impl Simd {
    /// What this CPU has (checked once per process).
    pub(crate) fn detect() -> Self {
        Self { avx2: crate::cpu::has_avx2_fma() }
    }

    /// Whether AVX2, FMA and F16C may run.
    pub(crate) fn avx2(self) -> bool {
        self.avx2
    }
}

/// A weight block format the kernels read: rows of `BLOCK_BYTES`-byte blocks of 32 values.
pub(crate) trait BlockFormat: Sized {
    /// Its name in errors.
    const NAME: &'static str;
    /// Bytes per block of 32 weights.
    const BLOCK_BYTES: usize;
    /// Dot product of one weight row with one activation row.
    fn dot(w: &[u8], a: &[Q8Block], simd: Simd) -> f32;
    /// Dot products of `ROW_GROUP` consecutive weight rows (`w`, `row_bytes` each) with one
    /// activation row.
    fn dot_group(w: &[u8], row_bytes: usize, a: &[Q8Block], simd: Simd) -> [f32; ROW_GROUP];
    /// The activation rows laid out for [`Self::dot_rows`], built once per product.
    type Prepared: Sync;
    /// Lays out `acts` for [`Self::dot_rows`].
    fn prepare(acts: &[Vec<Q8Block>], simd: Simd) -> Self::Prepared;
    /// Dot products of the `out.len() / acts.len()` consecutive weight rows of `w` (at most
    /// `ROW_GROUP`, `row_bytes` each) with every activation row, into `out[r * m + i]`; by
    /// default [`dot_each`].
    fn dot_rows(
        w: &[u8],
        row_bytes: usize,
        acts: &[Vec<Q8Block>],
        prepared: &Self::Prepared,
        out: &mut [f32],
        simd: Simd,
    ) {
        let _ = prepared;
        dot_each::<Self>(w, row_bytes, acts, out, simd)
    }
}

/// [`BlockFormat::dot_rows`] one activation row at a time: a whole group of weight rows per
/// [`BlockFormat::dot_group`], fewer one by one.
pub(crate) fn dot_each<F: BlockFormat>(w: &[u8], row_bytes: usize, acts: &[Vec<Q8Block>], out: &mut [f32], simd: Simd) {
    let m = acts.len();
    let rows = out.len() / m;
    for (a_i, a) in acts.iter().enumerate() {
        if rows == ROW_GROUP {
            for (r, v) in F::dot_group(w, row_bytes, a, simd).into_iter().enumerate() {
                out[r * m + a_i] = v;
            }
        } else {
            for r in 0..rows {
                out[r * m + a_i] = F::dot(&w[r * row_bytes..(r + 1) * row_bytes], a, simd);
            }
        }
    }
}

/// `y_i = x W_i^T` for matrices `ws` (`(bytes, rows)` each, all `k` wide, in format `F`) and `x`
/// of `m` rows of `k` values, in one parallel pass, into `ys[i]` (`m * rows_i`, row-major): the
/// activations are rounded once and the threads are handed work once. An error when the sizes
/// do not agree.
pub(crate) fn matmul_many<F: BlockFormat>(
    ws: &[(&[u8], usize)],
    k: usize,
    x: &[f32],
    ys: &mut [&mut [f32]],
) -> anyhow::Result<()> {
    let m = x.len() / k.max(1);
    if m == 0 && ws.len() == ys.len() && ys.iter().all(|y| y.is_empty()) {
        return Ok(());
    }
    if !k.is_multiple_of(QK) || x.len() != m * k || ws.len() != ys.len() {
        anyhow::bail!(
            "{} matmul: {} inputs of width {k}, {} matrices, {} outputs",
            F::NAME,
            x.len(),
            ws.len(),
            ys.len()
        );
    }
    let row_bytes = k / QK * F::BLOCK_BYTES;
    for ((w, n), y) in ws.iter().zip(ys.iter()) {
        if w.len() != n * row_bytes || y.len() != m * n {
            anyhow::bail!(
                "{} matmul: {} weight bytes for [{n}, {k}], {} inputs, {} outputs",
                F::NAME,
                w.len(),
                x.len(),
                y.len()
            );
        }
    }
    let acts: Vec<Vec<Q8Block>> = x.chunks_exact(k).map(quantize_row).collect();
    let simd = Simd::detect();
    let prepared = F::prepare(&acts, simd);
    let total: usize = ws.iter().map(|(_, n)| n).sum();
    let per_task =
        total.div_ceil(rayon::current_num_threads() * TASKS_PER_THREAD).next_multiple_of(ROW_GROUP).max(ROW_GROUP);
    // Tasks own runs of one matrix's rows; results land in a row-per-weight scratch so that each
    // task writes one contiguous slice, then are transposed into the outputs.
    let mut by_weight: Vec<Vec<f32>> = ws.iter().map(|(_, n)| vec![0f32; n * m]).collect();
    let tasks: Vec<(&[u8], usize, &mut [f32])> = ws
        .iter()
        .zip(by_weight.iter_mut())
        .flat_map(|(&(w, _), out)| out.chunks_mut(per_task * m).enumerate().map(move |(t, o)| (w, t * per_task, o)))
        .collect();
    tasks.into_par_iter().for_each(|(w, first, out)| {
        for (g, o) in out.chunks_mut(ROW_GROUP * m).enumerate() {
            let r0 = first + g * ROW_GROUP;
            let rows = o.len() / m;
            F::dot_rows(&w[r0 * row_bytes..(r0 + rows) * row_bytes], row_bytes, &acts, &prepared, o, simd);
        }
    });
    for ((bw, (_, n)), y) in by_weight.iter().zip(ws).zip(ys.iter_mut()) {
        for (i, c) in bw.chunks_exact(m).enumerate() {
            for (r, v) in c.iter().enumerate() {
                y[r * n + i] = *v;
            }
        }
    }
    Ok(())
}

/// Rounds a row to Q8_1 blocks.
pub(crate) fn quantize_row(x: &[f32]) -> Vec<Q8Block> {
    x.chunks_exact(QK)
        .map(|b| {
            let amax = b.iter().fold(0f32, |m, v| m.max(v.abs()));
            let d = amax / 127.0;
            let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
            let mut q = [0i8; QK];
            let mut sum = 0i32;
            for (q, v) in q.iter_mut().zip(b) {
                *q = (v * inv).round() as i8;
                sum += *q as i32;
            }
            Q8Block { d, s: d * sum as f32, q }
        })
        .collect()
}

/// Horizontal sums and activation loads the AVX2 kernels share.
#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2 {
    use std::arch::x86_64::*;

    use super::Q8Block;

    /// Two consecutive activation blocks as the two-blocks-per-register kernels read them:
    /// values 0..16 of both (what a block's low nibbles multiply), values 16..32 (the high
    /// nibbles'), and the scales spread over each block's four i32 lanes.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(crate) unsafe fn pair(a0: &Q8Block, a1: &Q8Block) -> (__m256i, __m256i, __m256) {
        let (p0, p1) = (a0.q.as_ptr(), a1.q.as_ptr());
        let lo = _mm256_loadu2_m128i(p1 as *const __m128i, p0 as *const __m128i);
        let hi = _mm256_loadu2_m128i(p1.add(16) as *const __m128i, p0.add(16) as *const __m128i);
        (lo, hi, _mm256_set_m128(_mm_set1_ps(a1.d), _mm_set1_ps(a0.d)))
    }

    /// The sum of the eight lanes of `v`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(crate) unsafe fn sum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
    }

    /// The lane sums of four vectors at once: pairwise adds leave vector r's total in lane r.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(crate) unsafe fn sum4(acc: [__m256; 4]) -> [f32; 4] {
        let h01 = _mm256_hadd_ps(acc[0], acc[1]);
        let h23 = _mm256_hadd_ps(acc[2], acc[3]);
        let h = _mm256_hadd_ps(h01, h23);
        let s = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
        let mut out = [0f32; 4];
        _mm_storeu_ps(out.as_mut_ptr(), s);
        out
    }
}
