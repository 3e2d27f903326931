//! MXFP4 (OCP microscaling FP4): blocks of 32 four-bit E2M1 values sharing one power-of-two
//! scale byte (E8M0, bias 127), as GPT-OSS ships its experts. Dequantized here because neither
//! candle 0.10 nor the `safetensors` crate knows the format; the arithmetic is a table lookup and
//! an exponent, nothing a library would add.

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
    }
}
