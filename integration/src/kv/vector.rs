//! The f32 vector loops of host attention: a dot product and a weighted sum of rows. Written with
//! AVX2/FMA intrinsics (chosen at run time, with portable loops otherwise) because LLVM's
//! vectorisation of these loops keeps one dependent chain of adds per dot product (no FMA
//! contraction in Rust) and reloads the output on every row, and no maintained crate offers
//! these two kernels over plain slices.

/// `a · b` over the shorter length.
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    #[cfg(target_arch = "x86_64")]
    if crate::cpu::has_avx2_fma() {
        // SAFETY: the CPU has AVX2 and FMA (checked above); both slices hold at least `n` floats.
        return unsafe { dot_avx2(&a[..n], &b[..n]) };
    }
    dot_portable(&a[..n], &b[..n])
}

/// `out += Σ_j p[j] rows[j]`, where row `j` is the `out.len()` floats at `j * stride` of `rows`;
/// rows with `p[j] == 0` are skipped (never read).
#[inline]
pub fn accumulate(out: &mut [f32], p: &[f32], rows: &[f32], stride: usize) {
    let dv = out.len();
    assert!(p.is_empty() || (p.len() - 1) * stride + dv <= rows.len(), "rows too short for the weights");
    #[cfg(target_arch = "x86_64")]
    if crate::cpu::has_avx2_fma() {
        // SAFETY: the CPU has AVX2 and FMA (checked above); every row read lies within `rows`
        // (asserted above).
        return unsafe { accumulate_avx2(out, p, rows, stride) };
    }
    accumulate_portable(out, p, rows, stride)
}

fn dot_portable(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca.remainder().iter().zip(cb.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

fn accumulate_portable(out: &mut [f32], p: &[f32], rows: &[f32], stride: usize) {
    let dv = out.len();
    for (j, &pj) in p.iter().enumerate() {
        if pj != 0.0 {
            for (o, v) in out.iter_mut().zip(&rows[j * stride..j * stride + dv]) {
                *o += pj * v;
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let n = a.len();
    let (pa, pb) = (a.as_ptr(), b.as_ptr());
    // Two accumulators: consecutive multiply-adds do not wait on each other.
    let (mut s0, mut s1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
    let mut i = 0;
    while i + 16 <= n {
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i)), _mm256_loadu_ps(pb.add(i)), s0);
        s1 = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i + 8)), _mm256_loadu_ps(pb.add(i + 8)), s1);
        i += 16;
    }
    if i + 8 <= n {
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i)), _mm256_loadu_ps(pb.add(i)), s0);
        i += 8;
    }
    let s = _mm256_add_ps(s0, s1);
    let s = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let mut total = _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)));
    while i < n {
        total += a[i] * b[i];
        i += 1;
    }
    total
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn accumulate_avx2(out: &mut [f32], p: &[f32], rows: &[f32], stride: usize) {
    use std::arch::x86_64::*;
    let dv = out.len();
    let (po, pr) = (out.as_mut_ptr(), rows.as_ptr());
    // Columns in runs of 32 held in four registers across all rows, then of 8, then one by one.
    let mut c = 0;
    while c + 32 <= dv {
        let mut acc = [
            _mm256_loadu_ps(po.add(c)),
            _mm256_loadu_ps(po.add(c + 8)),
            _mm256_loadu_ps(po.add(c + 16)),
            _mm256_loadu_ps(po.add(c + 24)),
        ];
        for (j, &pj) in p.iter().enumerate() {
            if pj == 0.0 {
                continue;
            }
            let w = _mm256_set1_ps(pj);
            let r = pr.add(j * stride + c);
            for (k, a) in acc.iter_mut().enumerate() {
                *a = _mm256_fmadd_ps(w, _mm256_loadu_ps(r.add(8 * k)), *a);
            }
        }
        for (k, a) in acc.iter().enumerate() {
            _mm256_storeu_ps(po.add(c + 8 * k), *a);
        }
        c += 32;
    }
    while c + 8 <= dv {
        let mut acc = _mm256_loadu_ps(po.add(c));
        for (j, &pj) in p.iter().enumerate() {
            if pj != 0.0 {
                acc = _mm256_fmadd_ps(_mm256_set1_ps(pj), _mm256_loadu_ps(pr.add(j * stride + c)), acc);
            }
        }
        _mm256_storeu_ps(po.add(c), acc);
        c += 8;
    }
    for (j, &pj) in p.iter().enumerate() {
        if pj != 0.0 {
            for e in c..dv {
                out[e] += pj * rows[j * stride + e];
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seeded(seed: f32, n: usize) -> Vec<f32> {
        (0..n).map(|i| (i as f32 * 0.731 + seed).sin()).collect()
    }

    #[test]
    fn dot_equals_the_f64_sum_at_every_length() {
        for n in [0, 1, 7, 8, 9, 15, 16, 17, 33, 64, 100, 576] {
            let (a, b) = (seeded(0.1, n), seeded(0.7, n));
            let want: f64 = a.iter().zip(&b).map(|(x, y)| *x as f64 * *y as f64).sum();
            for got in [dot(&a, &b), dot_portable(&a, &b)] {
                assert!((got as f64 - want).abs() < 1e-5 * (1.0 + n as f64), "n {n}: {got} vs {want}");
            }
        }
    }

    #[test]
    fn accumulate_adds_the_weighted_rows_at_every_width() {
        for (dv, stride) in [(1, 1), (8, 8), (12, 20), (32, 32), (64, 64), (72, 80), (512, 576)] {
            let rows_n = 19;
            let rows = seeded(0.3, (rows_n - 1) * stride + dv);
            let mut p = seeded(0.9, rows_n);
            p[4] = 0.0;
            let start = seeded(0.5, dv);
            let (mut fast, mut portable) = (start.clone(), start.clone());
            accumulate(&mut fast, &p, &rows, stride);
            accumulate_portable(&mut portable, &p, &rows, stride);
            for e in 0..dv {
                let want =
                    start[e] as f64 + (0..rows_n).map(|j| p[j] as f64 * rows[j * stride + e] as f64).sum::<f64>();
                for got in [fast[e], portable[e]] {
                    assert!((got as f64 - want).abs() < 1e-5, "dv {dv} col {e}: {got} vs {want}");
                }
            }
        }
    }
}
