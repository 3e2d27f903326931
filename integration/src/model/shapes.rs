//! Real models' shapes by name, for random-weight speed and memory work (`shape:NAME` model
//! sources, `dms-gpu`'s `--model`): where weight values do not matter, only the shape.

use anyhow::{bail, Result};

use super::{Arch, ModelConfig};

/// Names [`named_shape`] knows.
pub const SHAPE_NAMES: &str = "llama3.1-8b, qwen3-8b, smollm2-135m, dsv2-lite-attn, gemma3-1b";

/// Gemma 3 1B's config.json (google/gemma-3-1b-it): 26 layers, every sixth global, the others
/// local with a window of 512.
const GEMMA3_1B: &str = r#"{"architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text",
    "hidden_size": 1152, "intermediate_size": 6912, "num_hidden_layers": 26, "num_attention_heads": 4,
    "num_key_value_heads": 1, "head_dim": 256, "max_position_embeddings": 32768, "query_pre_attn_scalar": 256,
    "rope_local_base_freq": 10000, "rope_theta": 1000000, "rope_scaling": null, "sliding_window": 512,
    "sliding_window_pattern": 6, "vocab_size": 262144, "rms_norm_eps": 1e-6}"#;

/// A model shape by name; `dsv2-lite-attn` is DeepSeek-V2-Lite's latent attention (27 layers,
/// 16 heads, kv_lora 512 + rope 64) with its dense MLP in every layer; `gemma3-1b` is Gemma 3
/// 1B, local layers and all.
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
        nope_layers: vec![],
        rope_scaling: None,
        rms_norm_eps: 1e-5,
        tie_word_embeddings: false,
        attention_bias: false,
        qk_norm: qk,
        max_position_embeddings: 131072,
        windows: None,
        gemma: None,
        granite: None,
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
        "gemma3-1b" => ModelConfig::from_hf_json(GEMMA3_1B)?,
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
        let g = named_shape("gemma3-1b").unwrap();
        let w = g.windows.clone().unwrap();
        assert_eq!((w.window(), w.layers().iter().filter(|&&l| l).count(), g.num_layers), (512, 22, 26));
        let q = named_shape("qwen3-8b").unwrap();
        assert_eq!((q.num_layers, q.num_kv_heads, q.head_dim), (36, 8, 128));
        let e = named_shape("llama-9000").unwrap_err().to_string();
        assert!(e.contains("llama-9000") && e.contains("qwen3-8b"), "{e}");
    }
}
