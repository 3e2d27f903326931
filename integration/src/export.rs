//! Writes a model as an HF-style folder (config.json, f32 model.safetensors, tokenizer.json):
//! the same dequantised weights our engine runs, for peers that read HF folders (mistral.rs).

use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use serde_json::json;
use tokenizers::Tokenizer;

use crate::model::{Arch, ModelConfig, Weights};

/// Exports a GGUF file to `out` (skipped when `out/model.safetensors` already exists).
pub fn export_gguf_as_hf(gguf: &Path, out: &Path) -> Result<()> {
    if out.join("model.safetensors").exists() && out.join("config.json").exists() && out.join("tokenizer.json").exists()
    {
        return Ok(());
    }
    let (weights, cfg) = Weights::open_gguf(gguf)?;
    let tok: Tokenizer = match &weights {
        Weights::Gguf { content, .. } => crate::gguf_tokenizer::from_gguf(content)?,
        Weights::Safetensors { .. } => bail!("not a GGUF file"),
    };
    if cfg.arch != Arch::Llama {
        bail!("export supports Llama-architecture GGUF files only");
    }
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    let (h, hd) = (cfg.hidden_size, cfg.head_dim);
    let mut put = |name: String, shape: &[usize]| -> Result<()> {
        tensors.insert(name.clone(), weights.get(&name, shape, &Device::Cpu)?);
        Ok(())
    };
    put("model.embed_tokens.weight".into(), &[cfg.vocab_size, h])?;
    put("model.norm.weight".into(), &[h])?;
    for i in 0..cfg.num_layers {
        let p = format!("model.layers.{i}");
        put(format!("{p}.input_layernorm.weight"), &[h])?;
        put(format!("{p}.post_attention_layernorm.weight"), &[h])?;
        put(format!("{p}.self_attn.q_proj.weight"), &[cfg.num_heads * hd, h])?;
        put(format!("{p}.self_attn.k_proj.weight"), &[cfg.num_kv_heads * hd, h])?;
        put(format!("{p}.self_attn.v_proj.weight"), &[cfg.num_kv_heads * hd, h])?;
        put(format!("{p}.self_attn.o_proj.weight"), &[h, cfg.num_heads * hd])?;
        put(format!("{p}.mlp.gate_proj.weight"), &[cfg.intermediate_size, h])?;
        put(format!("{p}.mlp.up_proj.weight"), &[cfg.intermediate_size, h])?;
        put(format!("{p}.mlp.down_proj.weight"), &[h, cfg.intermediate_size])?;
    }
    if !cfg.tie_word_embeddings {
        put("lm_head.weight".into(), &[cfg.vocab_size, h])?;
    }
    let tmp = out.join("model.safetensors.partial");
    candle_core::safetensors::save(&tensors, &tmp)?;
    std::fs::write(out.join("config.json"), serde_json::to_string_pretty(&hf_config(&cfg))?)?;
    tok.save(out.join("tokenizer.json"), false).map_err(|e| anyhow::anyhow!("saving tokenizer.json: {e}"))?;
    std::fs::rename(tmp, out.join("model.safetensors"))?;
    Ok(())
}

fn hf_config(c: &ModelConfig) -> serde_json::Value {
    json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_act": "silu",
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_layers,
        "num_attention_heads": c.num_heads,
        "num_key_value_heads": c.num_kv_heads,
        "head_dim": c.head_dim,
        "rms_norm_eps": c.rms_norm_eps,
        "rope_theta": c.rope_theta,
        "max_position_embeddings": c.max_position_embeddings,
        "vocab_size": c.vocab_size,
        "tie_word_embeddings": c.tie_word_embeddings,
        "bos_token_id": c.bos_token_id,
        "eos_token_id": c.eos_token_ids.first(),
        "torch_dtype": "float32",
    })
}
