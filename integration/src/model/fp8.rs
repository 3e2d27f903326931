//! FP8 (E4M3) checkpoints: the `quantization_config` forms that store linear weights as FP8 with
//! a scale beside each, and their dequantization.
//!
//! Two forms are read, the ones FP8 checkpoints on the hub ship in:
//! - `quant_method = "fp8"`: transformers' fine-grained FP8 (Qwen3-*-FP8, DeepSeek-V3/R1), with
//!   `weight_block_size` `[rows, cols]` and one `weight_scale_inv` per block; without a block
//!   size (AutoFP8), one `weight_scale` per tensor.
//! - `quant_method = "compressed-tensors"`, `format = "float-quantized"` (llm-compressor's
//!   FP8-dynamic and FP8 checkpoints): `weight_scale` per tensor, per output channel or per
//!   block, as each config group's `weights.strategy` says.
//!
//! Either way the stored value times its scale is the weight (DeepSeek's `weight_scale_inv` is a
//! multiplier despite its name). Weights are dequantized at load, so the model runs as the
//! weight-only FP8 path of vLLM (W8A16, as on GPUs without FP8 units) runs it: activations are not
//! rounded to FP8, and a static `input_scale` is not used.

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use serde_json::Value;

/// How an FP8 checkpoint scales its weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fp8Scheme {
    /// One scale per `[rows, cols]` block of each weight; `None`: one per tensor or per output
    /// channel, as each scale tensor's shape says.
    pub block: Option<[usize; 2]>,
}

/// The scheme a config.json's `quantization_config` describes: `None` when it has none (or null);
/// an error naming the part for any other quantization (GPTQ, AWQ, integer compressed-tensors,
/// FP8 E5M2 ...).
pub fn scheme_of(quantization_config: Option<&Value>) -> Result<Option<Fp8Scheme>> {
    let q = match quantization_config {
        None | Some(Value::Null) => return Ok(None),
        Some(q) => q,
    };
    let method = q.get("quant_method").and_then(Value::as_str).unwrap_or("");
    let scheme = match method {
        "fp8" => {
            match q.get("fmt").and_then(Value::as_str) {
                None | Some("e4m3") => {}
                Some(other) => bail!("quantization_config: FP8 format `{other}` is not supported (only e4m3)"),
            }
            Fp8Scheme { block: block_size(q.get("weight_block_size"), "weight_block_size")? }
        }
        "compressed-tensors" => compressed_tensors(q)?,
        other => bail!(
            "quantization_config: quant_method `{other}` is not supported (FP8 checkpoints are: `fp8`, or \
             `compressed-tensors` in format `float-quantized`); use a bf16/f16/f32 copy of the weights or a GGUF file"
        ),
    };
    Ok(Some(scheme))
}

/// The scheme of a `compressed-tensors` config: every group's weights 8-bit floats, one strategy.
fn compressed_tensors(q: &Value) -> Result<Fp8Scheme> {
    let format = q.get("format").and_then(Value::as_str).unwrap_or("");
    if format != "float-quantized" {
        bail!(
            "quantization_config: compressed-tensors format `{format}` is not supported (only `float-quantized`, \
             FP8 weights)"
        );
    }
    let groups = q.get("config_groups").and_then(Value::as_object).filter(|g| !g.is_empty());
    let groups = groups.context("quantization_config: compressed-tensors without `config_groups`")?;
    let mut block = None;
    for (name, group) in groups {
        let w =
            group.get("weights").with_context(|| format!("quantization_config: group `{name}` has no `weights`"))?;
        let (bits, kind) = (w.get("num_bits").and_then(Value::as_u64), w.get("type").and_then(Value::as_str));
        if bits != Some(8) || kind != Some("float") {
            bail!("quantization_config: group `{name}` quantizes weights to {bits:?}-bit {kind:?}; only 8-bit float is supported");
        }
        let b = match w.get("strategy").and_then(Value::as_str) {
            Some("tensor" | "channel") => None,
            Some("block") => block_size(w.get("block_structure"), "block_structure")
                .and_then(|b| {
                    b.with_context(|| format!("quantization_config: group `{name}` has no `block_structure`"))
                })
                .map(Some)?,
            other => {
                bail!("quantization_config: group `{name}` has weight strategy {other:?} (tensor, channel or block)")
            }
        };
        if block.is_some_and(|x| x != b) {
            bail!("quantization_config: config groups disagree on the weight block size");
        }
        block = Some(b);
    }
    Ok(Fp8Scheme { block: block.flatten() })
}

/// A `[rows, cols]` block size from `key`'s value: absent or null is none.
fn block_size(v: Option<&Value>, key: &str) -> Result<Option<[usize; 2]>> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(v) => {
            let dims: Option<Vec<usize>> =
                v.as_array().and_then(|a| a.iter().map(|x| x.as_u64().and_then(|x| usize::try_from(x).ok())).collect());
            match dims.as_deref() {
                Some(&[r, c]) if r > 0 && c > 0 => Ok(Some([r, c])),
                _ => bail!("quantization_config: `{key}` must be two positive sizes, got {v}"),
            }
        }
    }
}

/// The f32 weight `name` from its FP8 values `w` (`[out, in]`, on the CPU) and its scale tensor,
/// under `scheme`. Errors name the tensor: a scale whose shape fits no form, and non-finite
/// weights (FP8 NaN bytes or a bad scale) rather than a model that silently yields NaN.
pub fn dequantize(name: &str, w: &Tensor, scale: &Tensor, scheme: Fp8Scheme) -> Result<Tensor> {
    let &[out, inp] = w.dims() else {
        bail!("FP8 tensor `{name}` has shape {:?}; only matrices are supported", w.dims());
    };
    let w = w.to_dtype(DType::F32)?;
    let s = scale.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
    let bad_shape = || {
        let form = match scheme.block {
            Some([r, c]) => format!("[{}, {}] for {r}x{c} blocks", out.div_ceil(r), inp.div_ceil(c)),
            None => format!("one per tensor or [{out}] / [{out}, 1] per output channel"),
        };
        anyhow::anyhow!("the scale of FP8 tensor `{name}` ({out}x{inp}) has shape {:?}; expected {form}", s.dims())
    };
    let full = match scheme.block {
        Some([r, c]) => {
            let (so, si) = (out.div_ceil(r), inp.div_ceil(c));
            if s.dims() != [so, si] {
                return Err(bad_shape());
            }
            s.reshape((so, 1, si, 1))?
                .broadcast_as((so, r, si, c))?
                .reshape((so * r, si * c))?
                .narrow(0, 0, out)?
                .narrow(1, 0, inp)?
        }
        None if s.elem_count() == 1 => s.reshape((1, 1))?.broadcast_as((out, inp))?,
        None if s.elem_count() == out && s.dims().iter().filter(|&&d| d != 1).count() <= 1 => {
            s.reshape((out, 1))?.broadcast_as((out, inp))?
        }
        None => return Err(bad_shape()),
    };
    let t = (w * full)?;
    // A NaN or an infinity anywhere makes the sum non-finite (candle's max skips NaN).
    if !t.sum_all()?.to_scalar::<f32>()?.is_finite() {
        bail!("FP8 tensor `{name}` dequantizes to non-finite weights (NaN bytes, or a non-finite scale)");
    }
    Ok(t)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// E4M3 by its definition (OCP FP8: bias 7, no infinities, S.1111.111 is NaN), the oracle for
    /// candle's conversion.
    fn e4m3(b: u8) -> f32 {
        let sign = if b & 0x80 != 0 { -1.0 } else { 1.0 };
        let (e, m) = (i32::from((b >> 3) & 0xF), f32::from(b & 7));
        if e == 0xF && m == 7.0 {
            return f32::NAN;
        }
        sign * if e == 0 { m / 8.0 * 2f32.powi(-6) } else { (1.0 + m / 8.0) * 2f32.powi(e - 7) }
    }

    /// A tensor of raw E4M3 bytes, as a safetensors file stores them.
    fn fp8(bytes: &[u8], shape: (usize, usize)) -> Tensor {
        Tensor::from_raw_buffer(bytes, DType::F8E4M3, &[shape.0, shape.1], &Device::Cpu).unwrap()
    }

    #[test]
    fn every_finite_e4m3_byte_converts_exactly() {
        let bytes: Vec<u8> = (0..=255u8).filter(|b| b & 0x7F != 0x7F).collect();
        let t = fp8(&bytes, (1, bytes.len()));
        let got = t.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let want: Vec<f32> = bytes.iter().map(|&b| e4m3(b)).collect();
        assert_eq!(got, want);
        assert_eq!(want.iter().fold(0f32, |a, &b| a.max(b)), 448.0);
    }

    #[test]
    fn block_scales_cover_partial_blocks() {
        // 5x7 weights in 2x3 blocks: scales [3, 3], the last row and column of blocks partial.
        let bytes: Vec<u8> = (0..35u8).map(|i| i * 3 + 1).collect();
        let w = fp8(&bytes, (5, 7));
        let scales: Vec<f32> = (0..9).map(|i| 0.5 + i as f32).collect();
        let s = Tensor::from_vec(scales.clone(), (3, 3), &Device::Cpu).unwrap();
        let got = dequantize("w", &w, &s, Fp8Scheme { block: Some([2, 3]) }).unwrap().to_vec2::<f32>().unwrap();
        for i in 0..5 {
            for j in 0..7 {
                assert_eq!(got[i][j], e4m3(bytes[i * 7 + j]) * scales[(i / 2) * 3 + j / 3], "({i}, {j})");
            }
        }
        let wrong = Tensor::zeros((2, 3), DType::F32, &Device::Cpu).unwrap();
        let e = dequantize("w", &w, &wrong, Fp8Scheme { block: Some([2, 3]) }).unwrap_err();
        assert!(format!("{e}").contains("expected [3, 3] for 2x3 blocks"), "{e}");
    }

    #[test]
    fn tensor_and_channel_scales_and_nan_bytes() {
        let bytes = [1u8, 2, 3, 4, 5, 6];
        let w = fp8(&bytes, (2, 3));
        let none = Fp8Scheme { block: None };
        let s = Tensor::new(&[2f32], &Device::Cpu).unwrap();
        let got = dequantize("w", &w, &s, none).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(got, bytes.iter().map(|&b| 2.0 * e4m3(b)).collect::<Vec<_>>());
        let s = Tensor::new(&[[3f32], [5.0]], &Device::Cpu).unwrap().to_dtype(DType::BF16).unwrap();
        let got = dequantize("w", &w, &s, none).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(got[1][2], 5.0 * e4m3(6));
        assert_eq!(got[0][0], 3.0 * e4m3(1));
        let s = Tensor::new(&[1f32, 2.0, 3.0], &Device::Cpu).unwrap();
        assert!(dequantize("w", &w, &s, none).is_err());
        let nan = fp8(&[1, 2, 0x7F, 4, 5, 6], (2, 3));
        let e = dequantize("w", &nan, &Tensor::new(&[1f32], &Device::Cpu).unwrap(), none).unwrap_err();
        assert!(format!("{e}").contains("non-finite"), "{e}");
    }

    #[test]
    fn configs_of_the_shipped_forms_and_refusals() {
        let q = json!({"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]});
        assert_eq!(scheme_of(Some(&q)).unwrap(), Some(Fp8Scheme { block: Some([128, 128]) }));
        let q = json!({"quant_method": "fp8", "activation_scheme": "static"});
        assert_eq!(scheme_of(Some(&q)).unwrap(), Some(Fp8Scheme { block: None }));
        let q = json!({"quant_method": "compressed-tensors", "format": "float-quantized", "config_groups": {"group_0":
            {"targets": ["Linear"], "weights": {"num_bits": 8, "type": "float", "strategy": "channel"}}}});
        assert_eq!(scheme_of(Some(&q)).unwrap(), Some(Fp8Scheme { block: None }));
        assert_eq!(scheme_of(Some(&Value::Null)).unwrap(), None);
        for (q, says) in [
            (json!({"quant_method": "gptq", "bits": 4}), "quant_method `gptq`"),
            (json!({"quant_method": "fp8", "fmt": "e5m2"}), "FP8 format `e5m2`"),
            (json!({"quant_method": "fp8", "weight_block_size": [128]}), "`weight_block_size` must be two"),
            (json!({"quant_method": "compressed-tensors", "format": "pack-quantized"}), "format `pack-quantized`"),
            (
                json!({"quant_method": "compressed-tensors", "format": "float-quantized", "config_groups":
                    {"g": {"weights": {"num_bits": 4, "type": "float", "strategy": "tensor"}}}}),
                "only 8-bit float",
            ),
        ] {
            let e = scheme_of(Some(&q)).unwrap_err();
            assert!(format!("{e}").contains(says), "{q}: {e}");
        }
    }
}
