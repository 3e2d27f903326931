//! MXFP4 (OCP microscaling FP4): blocks of 32 four-bit E2M1 values sharing one power-of-two
//! scale byte (E8M0, bias 127), as GPT-OSS ships its experts. candle 0.10 holds FP4 and E8M0
//! only as raw storage (no dequantization, no quantized matmul, no GGUF type 39), and no crate
//! fills that in: the dequantization is here (a table lookup and an exponent), and a matmul
//! kernel over ggml's blocks ([`matmul`]) so that a model keeps its experts in 4.25 bits per
//! weight instead of Q8_0's 8.5.

use super::block_kernel::{self, BlockFormat, Q8Block, Simd, QK, ROW_GROUP};

/// Values per block.
pub const BLOCK: usize = 32;

/// The sixteen E2M1 values, by their four bits (sign in the high bit).
const E2M1: [f32; 16] = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0];

/// The scale an E8M0 byte stands for: `2^(e - 127)`.
fn scale(e: u8) -> f32 {
    2f32.powi(i32::from(e) - 127)
}

/// One row of transformers' layout (`*_blocks` `[..., G, 16]` with `*_scales` `[..., G]`): each
/// byte holds two consecutive values, the even one in its low four bits. Appends `32 * G`
/// values to `out`.
pub fn dequantize_hf_row(blocks: &[u8], scales: &[u8], out: &mut Vec<f32>) {
    for (block, &e) in blocks.chunks_exact(BLOCK / 2).zip(scales) {
        let d = scale(e);
        for &b in block {
            out.push(E2M1[usize::from(b & 0x0f)] * d);
            out.push(E2M1[usize::from(b >> 4)] * d);
        }
    }
}

/// Bytes of one ggml `block_mxfp4`: the scale byte, then 16 bytes of values.
pub const GGML_BLOCK_BYTES: usize = 1 + BLOCK / 2;

/// One row of transformers' layout ([`dequantize_hf_row`]'s) appended to `out` as ggml's blocks
/// ([`dequantize_ggml`]'s): the same values, the codes moved between the layouts' nibbles.
pub fn hf_row_to_ggml(blocks: &[u8], scales: &[u8], out: &mut Vec<u8>) {
    for (block, &e) in blocks.chunks_exact(BLOCK / 2).zip(scales) {
        let code = |i: usize| if i.is_multiple_of(2) { block[i / 2] & 0x0f } else { block[i / 2] >> 4 };
        out.push(e);
        out.extend((0..BLOCK / 2).map(|j| code(j) | (code(j + BLOCK / 2) << 4)));
    }
}

/// ggml's `GGML_TYPE_MXFP4` blocks (llama.cpp's layout: byte `j` holds value `j` in its low four
/// bits and value `j + 16` in its high four). Appends `32` values per block to `out`.
pub fn dequantize_ggml(bytes: &[u8], out: &mut Vec<f32>) {
    for block in bytes.chunks_exact(GGML_BLOCK_BYTES) {
        let d = scale(block[0]);
        let qs = &block[1..];
        out.extend(qs.iter().map(|&b| E2M1[usize::from(b & 0x0f)] * d));
        out.extend(qs.iter().map(|&b| E2M1[usize::from(b >> 4)] * d));
    }
}

/// ggml's values of the sixteen codes doubled to integers (`kvalues_mxfp4`): with the scale
/// [`half_scale`], a block's values are these times `2^(e - 128)`.
const KVALUES: [i8; 16] = [0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12];

/// `2^(e - 128)`, bit for bit as ggml's `GGML_E8M0_TO_FP32_HALF` (subnormal below `e = 2`).
const fn half_scale(e: u8) -> f32 {
    let e = e as u32;
    f32::from_bits(if e < 2 { 0x0020_0000 << e } else { (e - 1) << 23 })
}

/// [`half_scale`] of every scale byte, so the kernel's scale is one load.
const HALF_SCALES: [f32; 256] = {
    let mut t = [0f32; 256];
    let mut e = 0;
    while e < 256 {
        t[e] = half_scale(e as u8);
        e += 1;
    }
    t
};

/// [`KVALUES`] plus 12, so that they are unsigned (the AVX2 product needs one unsigned operand):
/// the kernel takes `12 Σ a` off each block's sum.
const KVALUES_PLUS_12: [u8; 16] = {
    let mut t = [0u8; 16];
    let mut i = 0;
    while i < 16 {
        t[i] = (KVALUES[i] + 12) as u8;
        i += 1;
    }
    t
};

/// How far ahead in each row the kernel asks for weights.
const PREFETCH_BYTES: usize = 544;

/// `y = x W^T` for the `[n, k]` matrix `w` in ggml's MXFP4 blocks (row after row) and `x` of `m`
/// rows of `k` values, into `y` (`m * n`, row-major), the activations rounded to 8 bits per
/// block of 32 (as llama.cpp's MXFP4 product rounds them); an error when the sizes do not agree.
pub fn matmul(w: &[u8], (n, k): (usize, usize), x: &[f32], y: &mut [f32]) -> anyhow::Result<()> {
    matmul_many(&[(w, n)], k, x, &mut [y])
}

/// [`matmul`] of one input with several matrices in one parallel pass (an expert's gate and up).
pub fn matmul_many(ws: &[(&[u8], usize)], k: usize, x: &[f32], ys: &mut [&mut [f32]]) -> anyhow::Result<()> {
    block_kernel::matmul_many::<Mxfp4>(ws, k, x, ys)
}

/// The MXFP4 format for [`block_kernel::matmul_many`].
pub(crate) struct Mxfp4;

impl BlockFormat for Mxfp4 {
    const NAME: &'static str = "MXFP4";
    const BLOCK_BYTES: usize = GGML_BLOCK_BYTES;

    fn dot(w: &[u8], a: &[Q8Block], simd: Simd) -> f32 {
        #[cfg(target_arch = "x86_64")]
        if simd.avx2() {
            // SAFETY: `simd` says AVX2 only when the CPU has AVX2, FMA and F16C; one row is
            // `a.len()` blocks.
            return unsafe { dot_group_avx2::<1>(w, GGML_BLOCK_BYTES * a.len(), a)[0] };
        }
        let _ = simd;
        dot_scalar(w, a)
    }

    fn dot_group(w: &[u8], row_bytes: usize, a: &[Q8Block], simd: Simd) -> [f32; ROW_GROUP] {
        #[cfg(target_arch = "x86_64")]
        if simd.avx2() {
            // SAFETY: as above; `w` holds `ROW_GROUP` rows of `row_bytes`.
            return unsafe { dot_group_avx2::<ROW_GROUP>(w, row_bytes, a) };
        }
        let _ = simd;
        std::array::from_fn(|r| dot_scalar(&w[r * row_bytes..(r + 1) * row_bytes], a))
    }

    /// Each activation row's block pairs, as the tiled kernel reads them (several rows, AVX2).
    type Prepared = Option<Vec<Vec<PairActs>>>;

    fn prepare(acts: &[Vec<Q8Block>], simd: Simd) -> Self::Prepared {
        (simd.avx2() && acts.len() > 1)
            .then(|| acts.iter().map(|a| a.chunks_exact(2).map(PairActs::new).collect()).collect())
    }

    fn dot_rows(
        w: &[u8],
        row_bytes: usize,
        acts: &[Vec<Q8Block>],
        prepared: &Self::Prepared,
        out: &mut [f32],
        simd: Simd,
    ) {
        let Some(pairs) = prepared else {
            return block_kernel::dot_each::<Self>(w, row_bytes, acts, out, simd);
        };
        #[cfg(target_arch = "x86_64")]
        {
            let m = acts.len();
            let rows = out.len() / m;
            let last = acts[0].len() / 2 * 2;
            // A tile of activation rows (a few KiB of pairs) stays in L1 while the group's weight
            // rows pass over it; taking the weight rows outside would stream every activation
            // row from L2 once per weight row.
            let mut i = 0;
            while i < m {
                let n = ACT_TILE.min(m - i);
                for r in 0..rows {
                    let row = &w[r * row_bytes..(r + 1) * row_bytes];
                    // SAFETY: `prepare` lays pairs out only when `simd` says AVX2 (with FMA and
                    // F16C); every activation row has `k / 64` pairs, which `row` holds.
                    let sums: [f32; ACT_TILE] = if n == ACT_TILE {
                        unsafe { dot_tile_avx2(row, std::array::from_fn(|j| pairs[i + j].as_slice())) }
                    } else {
                        std::array::from_fn(|j| {
                            let one = |p: &[PairActs]| unsafe { dot_tile_avx2(row, [p]) }[0];
                            pairs.get(i + j).filter(|_| j < n).map_or(0.0, |p| one(p))
                        })
                    };
                    for (j, v) in sums.into_iter().take(n).enumerate() {
                        // An odd last block, for every activation row.
                        let tail = match last < acts[i + j].len() {
                            true => dot_scalar(&row[last * GGML_BLOCK_BYTES..], &acts[i + j][last..]),
                            false => 0.0,
                        };
                        out[r * m + i + j] = v + tail;
                    }
                }
                i += n;
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = pairs;
            block_kernel::dot_each::<Self>(w, row_bytes, acts, out, simd)
        }
    }
}

/// Activation rows the tiled kernel multiplies with each unpacked weight row.
#[cfg(target_arch = "x86_64")]
const ACT_TILE: usize = 4;

/// Two consecutive activation blocks as [`dot_tile_avx2`] reads them, laid out once per product
/// so that each weight row's pair of blocks, unpacked once, multiplies several activation rows
/// (prompt rows through one expert): values 0..16 of both blocks (what the weights' low nibbles
/// hold), values 16..32, the offset sums `12 (a_2j + a_2j+1)` of both halves as the i16 lanes
/// of the products, and the scales spread over each block's four i32 lanes.
#[derive(Clone, Copy)]
#[repr(C, align(32))]
pub(crate) struct PairActs {
    lo: [i8; 32],
    hi: [i8; 32],
    offset: [i16; 16],
    d: [f32; 8],
}

impl PairActs {
    fn new(pair: &[Q8Block]) -> Self {
        let (a0, a1) = (&pair[0], &pair[1]);
        let lo: [i8; 32] = std::array::from_fn(|j| if j < 16 { a0.q[j] } else { a1.q[j - 16] });
        let hi: [i8; 32] = std::array::from_fn(|j| if j < 16 { a0.q[j + 16] } else { a1.q[j] });
        let offset = std::array::from_fn(|j| {
            12 * (i16::from(lo[2 * j]) + i16::from(lo[2 * j + 1]) + i16::from(hi[2 * j]) + i16::from(hi[2 * j + 1]))
        });
        let d = std::array::from_fn(|j| if j < 4 { a0.d } else { a1.d });
        Self { lo, hi, offset, d }
    }
}

/// The reference loop (and the path of CPUs without AVX2).
fn dot_scalar(w: &[u8], a: &[Q8Block]) -> f32 {
    let mut total = 0f32;
    for (blk, act) in w.chunks_exact(GGML_BLOCK_BYTES).zip(a) {
        let mut isum = 0i32;
        for (j, &byte) in blk[1..].iter().enumerate() {
            isum += i32::from(KVALUES[usize::from(byte & 0x0f)]) * i32::from(act.q[j])
                + i32::from(KVALUES[usize::from(byte >> 4)]) * i32::from(act.q[j + QK / 2]);
        }
        total += half_scale(blk[0]) * act.d * isum as f32;
    }
    total
}

/// Dot products of `R` rows (1 or [`ROW_GROUP`]) with one activation row, two blocks at a time
/// in one 256-bit register per row (each 128-bit lane one block's sixteen bytes of codes): the
/// codes become unsigned bytes (value + 12) by a table shuffle and multiply the activations'
/// bytes in pairs, summed into i16 (`|sum| <= 18288`: no overflow) with the offset's `12 Σ a`
/// taken off, then into i32, then scaled. The activation side (both blocks' low and high
/// halves, their offset sums and scales) is built once per pair for all `R` rows. An odd last
/// block takes the scalar loop.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_group_avx2<const R: usize>(w: &[u8], row_bytes: usize, a: &[Q8Block]) -> [f32; R] {
    use std::arch::x86_64::*;
    assert!(w.len() >= R * row_bytes && row_bytes >= a.len() * GGML_BLOCK_BYTES);
    let lut = _mm256_broadcastsi128_si256(_mm_loadu_si128(KVALUES_PLUS_12.as_ptr() as *const __m128i));
    let mask = _mm256_set1_epi8(0x0F);
    let twelve = _mm256_set1_epi8(12);
    let ones = _mm256_set1_epi16(1);
    let mut acc = [_mm256_setzero_ps(); 4];
    let pairs = a.len() / 2;
    for pair in 0..pairs {
        let (a_lo, a_hi, da) = block_kernel::avx2::pair(&a[2 * pair], &a[2 * pair + 1]);
        let offset = _mm256_add_epi16(_mm256_maddubs_epi16(twelve, a_lo), _mm256_maddubs_epi16(twelve, a_hi));
        for (r, acc) in acc.iter_mut().enumerate().take(R) {
            let p = w.as_ptr().add(r * row_bytes + 2 * pair * GGML_BLOCK_BYTES);
            _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(PREFETCH_BYTES) as *const i8);
            let nib = _mm256_loadu2_m128i(p.add(GGML_BLOCK_BYTES + 1) as *const __m128i, p.add(1) as *const __m128i);
            let lo = _mm256_shuffle_epi8(lut, _mm256_and_si256(nib, mask));
            let hi = _mm256_shuffle_epi8(lut, _mm256_and_si256(_mm256_srli_epi16(nib, 4), mask));
            let products = _mm256_add_epi16(_mm256_maddubs_epi16(lo, a_lo), _mm256_maddubs_epi16(hi, a_hi));
            let sum = _mm256_madd_epi16(_mm256_sub_epi16(products, offset), ones);
            let dw = _mm256_set_m128(
                _mm_set1_ps(HALF_SCALES[usize::from(*p.add(GGML_BLOCK_BYTES))]),
                _mm_set1_ps(HALF_SCALES[usize::from(*p)]),
            );
            *acc = _mm256_fmadd_ps(_mm256_mul_ps(dw, da), _mm256_cvtepi32_ps(sum), *acc);
        }
    }
    let sums = block_kernel::avx2::sum4(acc);
    let last = 2 * pairs;
    std::array::from_fn(|r| {
        let tail = &w[r * row_bytes + last * GGML_BLOCK_BYTES..(r + 1) * row_bytes];
        sums[r] + if last < a.len() { dot_scalar(tail, &a[last..]) } else { 0.0 }
    })
}

/// Dot products of one weight row with `A` activation rows (their pairs laid out by
/// [`PairActs::new`]), as [`dot_group_avx2`] computes them with the roles turned: each pair of
/// weight blocks is unpacked once (codes to unsigned bytes, scales) and multiplies the `A` rows'
/// pairs. Only whole pairs: an odd last block is the caller's.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_tile_avx2<const A: usize>(row: &[u8], acts: [&[PairActs]; A]) -> [f32; A] {
    use std::arch::x86_64::*;
    let pairs = acts[0].len();
    assert!(row.len() >= 2 * pairs * GGML_BLOCK_BYTES && acts.iter().all(|a| a.len() == pairs));
    let lut = _mm256_broadcastsi128_si256(_mm_loadu_si128(KVALUES_PLUS_12.as_ptr() as *const __m128i));
    let mask = _mm256_set1_epi8(0x0F);
    let ones = _mm256_set1_epi16(1);
    let mut acc = [_mm256_setzero_ps(); A];
    for pair in 0..pairs {
        let p = row.as_ptr().add(2 * pair * GGML_BLOCK_BYTES);
        _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(PREFETCH_BYTES) as *const i8);
        let nib = _mm256_loadu2_m128i(p.add(GGML_BLOCK_BYTES + 1) as *const __m128i, p.add(1) as *const __m128i);
        let lo = _mm256_shuffle_epi8(lut, _mm256_and_si256(nib, mask));
        let hi = _mm256_shuffle_epi8(lut, _mm256_and_si256(_mm256_srli_epi16(nib, 4), mask));
        let dw = _mm256_set_m128(
            _mm_set1_ps(HALF_SCALES[usize::from(*p.add(GGML_BLOCK_BYTES))]),
            _mm_set1_ps(HALF_SCALES[usize::from(*p)]),
        );
        for (acc, a) in acc.iter_mut().zip(&acts) {
            // `PairActs` is 32-byte aligned, each field at a multiple of 32.
            let a = &a[pair];
            let a_lo = _mm256_load_si256(a.lo.as_ptr() as *const __m256i);
            let a_hi = _mm256_load_si256(a.hi.as_ptr() as *const __m256i);
            let products = _mm256_add_epi16(_mm256_maddubs_epi16(lo, a_lo), _mm256_maddubs_epi16(hi, a_hi));
            let offset = _mm256_load_si256(a.offset.as_ptr() as *const __m256i);
            let sum = _mm256_madd_epi16(_mm256_sub_epi16(products, offset), ones);
            let da = _mm256_load_ps(a.d.as_ptr());
            *acc = _mm256_fmadd_ps(_mm256_mul_ps(dw, da), _mm256_cvtepi32_ps(sum), *acc);
        }
    }
    std::array::from_fn(|i| block_kernel::avx2::sum(acc[i]))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The E2M1 value of four bits from its definition: sign, two exponent bits (bias 1), one
    /// mantissa bit; exponent 0 is subnormal (`m / 2`).
    fn e2m1(bits: u8) -> f32 {
        let sign = if bits & 8 != 0 { -1.0 } else { 1.0 };
        let (e, m) = (i32::from((bits >> 1) & 3), f32::from(bits & 1));
        sign * if e == 0 { m / 2.0 } else { (1.0 + m / 2.0) * 2f32.powi(e - 1) }
    }

    #[test]
    fn both_layouts_decode_every_code_at_every_scale_position() {
        for bits in 0..16u8 {
            assert_eq!(E2M1[bits as usize], e2m1(bits), "code {bits}");
        }
        // Two blocks: values 0..32 of the first, the second at another scale.
        let codes: Vec<u8> = (0..64).map(|i| ((i * 7 + 3) % 16) as u8).collect();
        let exps = [127u8 - 3, 127 + 5];
        let want: Vec<f32> =
            codes.iter().enumerate().map(|(i, &c)| e2m1(c) * 2f32.powi(i32::from(exps[i / 32]) - 127)).collect();
        let hf: Vec<u8> = codes.chunks_exact(2).map(|p| p[0] | (p[1] << 4)).collect();
        let mut got = Vec::new();
        dequantize_hf_row(&hf, &exps, &mut got);
        assert_eq!(got, want);
        let mut ggml = Vec::new();
        for (b, &e) in codes.chunks_exact(32).zip(&exps) {
            ggml.push(e);
            ggml.extend((0..16).map(|j| b[j] | (b[j + 16] << 4)));
        }
        let mut got = Vec::new();
        dequantize_ggml(&ggml, &mut got);
        assert_eq!(got, want);
        let mut repacked = Vec::new();
        hf_row_to_ggml(&hf, &exps, &mut repacked);
        assert_eq!(repacked, ggml);
        for e in [0u8, 1, 2, 126, 127, 200, 255] {
            assert_eq!(2.0 * half_scale(e), scale(e), "scale byte {e}");
        }
    }

    /// ggml MXFP4 bytes of seeded codes and scales, and their values.
    fn matrix(rows: usize, cols: usize) -> (Vec<u8>, Vec<f32>) {
        let bytes: Vec<u8> = (0..rows * cols / BLOCK)
            .flat_map(|b| {
                let e = 120 + (b * 7 % 9) as u8;
                std::iter::once(e).chain((0..16).map(move |j| ((b * 31 + j * 17) % 256) as u8))
            })
            .collect();
        let mut values = Vec::new();
        dequantize_ggml(&bytes, &mut values);
        (bytes, values)
    }

    #[test]
    fn both_kernels_match_the_dequantized_product_within_the_activation_rounding() {
        // 70 rows: groups of four and a remainder of two; one input row (one activation row per
        // pass) or six (a tile of four and two more); an even and an odd number of blocks per row.
        for cols in [32, 256, 288] {
            for m in [1, 6] {
                check_kernels(70, cols, m);
            }
        }
    }

    /// Codes of the largest magnitude (±6, doubled ±12) against activations that round to ±127
    /// fill the kernels' 16-bit sums closest to their limit: still the exact product (the
    /// activations are exact at 8 bits here).
    #[test]
    fn the_largest_codes_and_activations_do_not_overflow() {
        let (rows, cols) = (5, 128);
        // Per row: every code 7 (+6), every code 15 (-6), or alternating by byte.
        let bytes: Vec<u8> = (0..rows * cols / BLOCK)
            .flat_map(|b| {
                let code = [0x77u8, 0xFF, 0x7F, 0xF7, 0x77][b / (cols / BLOCK)];
                std::iter::once(127u8).chain(std::iter::repeat_n(code, 16))
            })
            .collect();
        let mut w = Vec::new();
        dequantize_ggml(&bytes, &mut w);
        for m in [1, 5] {
            let x: Vec<f32> = (0..m * cols).map(|i| if (i / 3) % 2 == 0 { 1.0 } else { -1.0 }).collect();
            let mut y = vec![0f32; m * rows];
            matmul(&bytes, (rows, cols), &x, &mut y).unwrap();
            for r in 0..m {
                for o in 0..rows {
                    let exact: f32 = (0..cols).map(|i| x[r * cols + i] * w[o * cols + i]).sum();
                    assert_eq!(y[r * rows + o], exact, "{m} rows: [{r}, {o}]");
                }
            }
        }
    }

    /// `matmul` against the exact product of the dequantized weights, and AVX2 against scalar.
    fn check_kernels(rows: usize, cols: usize, m: usize) {
        let (bytes, w) = matrix(rows, cols);
        let x: Vec<f32> = (0..m * cols).map(|i| (i as f32 * 0.377).cos() * (1.0 + (i % 7) as f32)).collect();
        let mut y = vec![0f32; m * rows];
        matmul(&bytes, (rows, cols), &x, &mut y).unwrap();
        let acts: Vec<Vec<Q8Block>> = x.chunks_exact(cols).map(block_kernel::quantize_row).collect();
        let row_bytes = cols / QK * GGML_BLOCK_BYTES;
        for r in 0..m {
            for o in 0..rows {
                let (xr, wr) = (&x[r * cols..(r + 1) * cols], &w[o * cols..(o + 1) * cols]);
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
        let mut short = vec![0f32; 3];
        assert!(matmul(&bytes, (rows, cols), &x, &mut short).is_err(), "an output of the wrong size");
        assert!(matmul(&bytes[1..], (rows, cols), &x, &mut y).is_err(), "weights of the wrong size");
    }
}
