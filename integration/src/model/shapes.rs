//! Real models' shapes by name, for random-weight speed and memory work (`shape:NAME` model
//! sources, `dms-gpu`'s `--model`): where weight values do not matter, only the shape.

use anyhow::{bail, Result};

use super::{Arch, ModelConfig};

/// Names [`named_shape`] knows.
pub const SHAPE_NAMES: &str = "llama3.1-8b, qwen3-8b, smollm2-135m, dsv2-lite-attn";

/// A model shape by name; `dsv2-lite-attn` is DeepSeek-V2-Lite's latent attention (27 layers,
/// 16 heads, kv_lora 512 + rope 64) with its dense MLP in every layer.
pub fn named_shape(name: &str) -> Result<ModelConfig> {
    let base = |arch, vocab, hidden, inter, layers, heads, kv, hd, theta: f64, qk| ModelConfig {
        arch,
        vocab_size: vocab,
        hidden_size: hidden,
        intermediate_size: inter,
        num_layers: layers,
        num_heads: heads,
        num_kv_heads: kv,
        head_dim: hd,
        rope_theta: theta,
        partial_rotary_dim: None,
        rope_scaling: None,
        rms_norm_eps: 1e-5,
        tie_word_embeddings: false,
        attention_bias: false,
        qk_norm: qk,
        max_position_embeddings: 131072,
        windows: None,
        gemma: None,
        bos_token_id: None,
        eos_token_ids: vec![],
        dms: Default::default(),
        mla: None,
        moe: None,
        fp8: None,
    };
    Ok(match name {
        "llama3.1-8b" => base(Arch::Llama, 128256, 4096, 14336, 32, 32, 8, 128, 500000.0, false),
        "qwen3-8b" => base(Arch::Qwen3, 151936, 4096, 12288, 36, 32, 8, 128, 1000000.0, true),
        "smollm2-135m" => base(Arch::Llama, 49152, 576, 1536, 30, 9, 3, 64, 100000.0, false),
        "dsv2-lite-attn" => {
            ModelConfig::from_hf_json(include_str!("../../../configs/models/deepseek-v2-lite/config.json"))?
                .with_dense_mlp()
        }
        other => bail!("unknown model shape `{other}` ({SHAPE_NAMES})"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_named_shape_is_valid_and_an_unknown_one_is_named() {
        for name in SHAPE_NAMES.split(", ") {
            named_shape(name).unwrap().validate().unwrap();
        }
        let q = named_shape("qwen3-8b").unwrap();
        assert_eq!((q.num_layers, q.num_kv_heads, q.head_dim), (36, 8, 128));
        let e = named_shape("llama-9000").unwrap_err().to_string();
        assert!(e.contains("llama-9000") && e.contains("qwen3-8b"), "{e}");
    }
}
