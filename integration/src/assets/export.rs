//! Writes a model as an HF-style folder (config.json, model.safetensors, tokenizer.json) for peers
//! that read HF folders (mistral.rs): a GGUF's dequantised weights (the same our engine runs), or
//! random weights of a given shape for side-by-side speed runs.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use serde_json::json;
use tokenizers::decoders::byte_level::ByteLevel;
use tokenizers::models::wordlevel::WordLevel;
use tokenizers::pre_tokenizers::whitespace::Whitespace;
use tokenizers::Tokenizer;

use crate::model::config::RopeScaling;
use crate::model::{Arch, ModelConfig, Weights};

/// The HF-style export of a GGUF file in the cache directory (`hf-export/<file stem>`), written
/// on first use (safe when several threads or processes ask at once).
pub fn cached_hf_export(gguf: &Path) -> Result<PathBuf> {
    let stem = gguf.file_stem().map(|s| s.to_string_lossy().to_string()).unwrap_or_default();
    let target = crate::assets::cache_dir().join("hf-export").join(stem);
    let complete = |p: &Path| ["model.safetensors", "config.json", "tokenizer.json"].iter().all(|f| p.join(f).exists());
    if !complete(&target) {
        crate::assets::build_cache_entry(&target, complete, |stage| {
            let out = stage.join("hf");
            export_gguf_as_hf(gguf, &out)?;
            Ok(out)
        })?;
    }
    Ok(target)
}

/// Exports a GGUF file to `out`.
pub fn export_gguf_as_hf(gguf: &Path, out: &Path) -> Result<()> {
    let (weights, cfg) = Weights::open_gguf(gguf)?;
    let tok: Tokenizer = match &weights {
        Weights::Gguf { header, .. } => crate::model::gguf_tokenizer::from_gguf(&header.content)?,
        Weights::Safetensors { .. } => bail!("not a GGUF file"),
    };
    if cfg.arch != Arch::Llama || cfg.moe.is_some() {
        bail!("export supports dense Llama-architecture GGUF files only (not experts: Mixtral)");
    }
    // A Llama config.json would drop what these files add (peers would run another model).
    if !cfg.nope_layers.is_empty() || cfg.granite.is_some() || cfg.attention_bias {
        bail!("export writes plain Llama folders: SmolLM3's layers without RoPE, Granite's multipliers and q/k/v biases are not carried");
    }
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    for (name, shape) in llama_tensor_shapes(&cfg) {
        tensors.insert(name.clone(), weights.get(&name, &shape, &Device::Cpu)?);
    }
    write_folder(out, &cfg, &tensors, &tok)
}

/// Names and shapes of a Llama-architecture checkpoint's tensors (HF names).
fn llama_tensor_shapes(cfg: &ModelConfig) -> Vec<(String, Vec<usize>)> {
    let (h, hd, i) = (cfg.hidden_size, cfg.head_dim, cfg.intermediate_size);
    let mut v =
        vec![("model.embed_tokens.weight".to_string(), vec![cfg.vocab_size, h]), ("model.norm.weight".into(), vec![h])];
    for l in 0..cfg.num_layers {
        let p = format!("model.layers.{l}");
        v.push((format!("{p}.input_layernorm.weight"), vec![h]));
        v.push((format!("{p}.post_attention_layernorm.weight"), vec![h]));
        v.push((format!("{p}.self_attn.q_proj.weight"), vec![cfg.num_heads * hd, h]));
        v.push((format!("{p}.self_attn.k_proj.weight"), vec![cfg.num_kv_heads * hd, h]));
        v.push((format!("{p}.self_attn.v_proj.weight"), vec![cfg.num_kv_heads * hd, h]));
        v.push((format!("{p}.self_attn.o_proj.weight"), vec![h, cfg.num_heads * hd]));
        v.push((format!("{p}.mlp.gate_proj.weight"), vec![i, h]));
        v.push((format!("{p}.mlp.up_proj.weight"), vec![i, h]));
        v.push((format!("{p}.mlp.down_proj.weight"), vec![h, i]));
    }
    if !cfg.tie_word_embeddings {
        v.push(("lm_head.weight".into(), vec![cfg.vocab_size, h]));
    }
    v
}

/// Writes a Llama-architecture model of shape `cfg` with random weights (N(0, 0.02) drawn on
/// `device`, norms 1, stored as `dtype`) as an HF-style folder, with a word-level tokenizer
/// (`t0` .. `t{vocab-1}`) so that engines that insist on a tokenizer can load it; for
/// side-by-side speed runs of two engines on the same weights. Skipped when the folder is complete.
pub fn write_random_hf(cfg: &ModelConfig, out: &Path, device: &Device, dtype: DType) -> Result<()> {
    if out.join("model.safetensors").exists() && out.join("config.json").exists() && out.join("tokenizer.json").exists()
    {
        return Ok(());
    }
    if cfg.arch != Arch::Llama || cfg.qk_norm || cfg.attention_bias || cfg.mla.is_some() || cfg.moe.is_some() {
        bail!("random HF folders are written for plain Llama-architecture shapes only");
    }
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    for (name, shape) in llama_tensor_shapes(cfg) {
        let t = if shape.len() == 1 {
            Tensor::ones(shape, dtype, &Device::Cpu)?
        } else {
            Tensor::randn(0f32, 0.02, shape, device)?.to_dtype(dtype)?.to_device(&Device::Cpu)?
        };
        tensors.insert(name, t);
    }
    let vocab: HashMap<String, u32> = (0..cfg.vocab_size as u32).map(|i| (format!("t{i}"), i)).collect();
    let model = WordLevel::builder()
        .vocab(vocab.into_iter().collect())
        .unk_token("t0".into())
        .build()
        .map_err(|e| anyhow::anyhow!("word-level tokenizer: {e}"))?;
    let mut tok = Tokenizer::new(model);
    tok.with_pre_tokenizer(Some(Whitespace {}));
    // mistral.rs (through llguidance) wants a byte-level or byte-fallback decoder.
    tok.with_decoder(Some(ByteLevel::default()));
    write_folder(out, cfg, &tensors, &tok)
}

/// config.json, model.safetensors (written last, atomically) and tokenizer.json.
fn write_folder(out: &Path, cfg: &ModelConfig, tensors: &HashMap<String, Tensor>, tok: &Tokenizer) -> Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let tmp = out.join("model.safetensors.partial");
    candle_core::safetensors::save(tensors, &tmp)?;
    let dtype = tensors.values().next().map_or(DType::F32, |t| t.dtype());
    std::fs::write(out.join("config.json"), serde_json::to_string_pretty(&hf_config(cfg, dtype)?)?)?;
    tok.save(out.join("tokenizer.json"), false).map_err(|e| anyhow::anyhow!("saving tokenizer.json: {e}"))?;
    std::fs::rename(tmp, out.join("model.safetensors"))?;
    Ok(())
}

/// config.json's `rope_scaling` for `c`'s scaling, so that another engine reading the exported
/// folder runs the same frequencies; per-frequency factors (llama.cpp's `rope_freqs.weight`) and
/// LongRoPE without its long factors have no config.json form and are refused.
fn rope_scaling_json(c: &ModelConfig) -> Result<serde_json::Value> {
    Ok(match &c.rope_scaling {
        None => serde_json::Value::Null,
        Some(RopeScaling::Llama3(s)) => json!({
            "rope_type": "llama3",
            "factor": s.factor,
            "low_freq_factor": s.low_freq_factor,
            "high_freq_factor": s.high_freq_factor,
            "original_max_position_embeddings": s.original_max_position_embeddings,
        }),
        Some(RopeScaling::Linear(f)) => json!({"rope_type": "linear", "factor": f}),
        Some(RopeScaling::Yarn(y)) => json!({
            "rope_type": "yarn",
            "factor": y.factor,
            "original_max_position_embeddings": y.original_max_position_embeddings,
            "beta_fast": y.beta_fast,
            "beta_slow": y.beta_slow,
            "attention_factor": y.attention_factor(),
            "truncate": y.truncate,
        }),
        Some(RopeScaling::FreqFactors(_)) => bail!(
            "this model's RoPE scaling is per-frequency factors (`rope_freqs.weight`), which config.json cannot \
             express: export its HF directory instead"
        ),
        Some(RopeScaling::LongRope(l)) => match &l.long_factor {
            Some(long) => json!({
                "rope_type": "longrope",
                "short_factor": l.short_factor,
                "long_factor": long,
                "original_max_position_embeddings": l.original_max_position_embeddings,
                "attention_factor": l.attention_factor,
            }),
            None => bail!(
                "this model's LongRoPE has only its short-context factors, which config.json cannot express alone: \
                 export its HF directory instead"
            ),
        },
    })
}

fn hf_config(c: &ModelConfig, dtype: DType) -> Result<serde_json::Value> {
    Ok(json!({
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
        "rope_scaling": rope_scaling_json(c)?,
        "max_position_embeddings": match &c.rope_scaling {
            // The declared context, which LongRoPE's served one derives from.
            Some(RopeScaling::LongRope(l)) => l.max_position_embeddings.max(c.max_position_embeddings),
            _ => c.max_position_embeddings,
        },
        "vocab_size": c.vocab_size,
        "tie_word_embeddings": c.tie_word_embeddings,
        "bos_token_id": c.bos_token_id,
        "eos_token_id": c.eos_token_ids.first(),
        "torch_dtype": match dtype {
            DType::BF16 => "bfloat16",
            DType::F16 => "float16",
            _ => "float32",
        },
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    const TINY: &str = r#"{"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 16,
        "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
        "head_dim": 8, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "vocab_size": 64,
        "max_position_embeddings": 128, "tie_word_embeddings": false}"#;

    #[test]
    fn a_random_folder_loads_back_with_its_shape_and_tokenizer() {
        let cfg = ModelConfig::from_hf_json(TINY).unwrap();
        let dir = std::env::temp_dir().join(format!("dms-random-hf-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        write_random_hf(&cfg, &dir, &Device::Cpu, DType::BF16).unwrap();
        let text = std::fs::read_to_string(dir.join("config.json")).unwrap();
        let back = ModelConfig::from_hf_json(&text).unwrap();
        assert_eq!(
            (back.vocab_size, back.hidden_size, back.num_layers, back.num_heads, back.num_kv_heads, back.head_dim),
            (64, 16, 2, 2, 1, 8)
        );
        let loaded = crate::engine::load_model(&dir, &Device::Cpu, crate::model::WeightForm::Dense).unwrap();
        let tok = loaded.tokenizer.expect("tokenizer.json written");
        assert_eq!(tok.get_vocab_size(true), 64);
        assert_eq!(tok.encode("t5 t63", false).unwrap().get_ids(), &[5, 63]);
        let st = candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu).unwrap();
        assert_eq!(st["model.layers.1.self_attn.k_proj.weight"].dims(), &[8, 16]);
        assert_eq!(st["model.layers.1.self_attn.k_proj.weight"].dtype(), DType::BF16);
        let std = st["lm_head.weight"].to_dtype(DType::F32).unwrap().flatten_all().unwrap();
        let var = std.sqr().unwrap().mean_all().unwrap().to_scalar::<f32>().unwrap();
        assert!((var.sqrt() - 0.02).abs() < 0.004, "weights drawn with std 0.02, got {}", var.sqrt());
        let mut qwen = cfg.clone();
        qwen.qk_norm = true;
        assert!(write_random_hf(&qwen, &dir.join("q"), &Device::Cpu, DType::BF16).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// The exported config.json reads back with the same RoPE frequencies and table factor for
    /// every scaling it can express (Llama 3, linear, YaRN with its attention factor, LongRoPE with
    /// its long factors and declared context); llama.cpp's
    /// per-frequency factors are refused by name.
    #[test]
    fn exported_rope_scaling_reads_back_to_the_same_rotation() {
        let scalings = [
            r#"null"#,
            r#"{"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16}"#,
            r#"{"rope_type": "linear", "factor": 2.0}"#,
            r#"{"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "beta_fast": 16}"#,
            r#"{"rope_type": "yarn", "factor": 4.0, "attention_factor": 1.3, "truncate": false}"#,
            r#"{"rope_type": "longrope", "short_factor": [1.0, 1.1, 1.3, 1.7], "long_factor": [1.0, 2.0, 4.0, 8.0],
                "original_max_position_embeddings": 32}"#,
        ];
        for scaling in scalings {
            let text = TINY.replace(
                "\"tie_word_embeddings\": false",
                &format!("\"tie_word_embeddings\": false, \"rope_scaling\": {scaling}"),
            );
            let cfg = ModelConfig::from_hf_json(&text).unwrap();
            let back = ModelConfig::from_hf_json(&hf_config(&cfg, DType::F32).unwrap().to_string()).unwrap();
            assert_eq!(back.rope_inv_freq(), cfg.rope_inv_freq(), "{scaling}");
            assert_eq!(back.rope_attention_factor(), cfg.rope_attention_factor(), "{scaling}");
            assert_eq!(back.max_position_embeddings, cfg.max_position_embeddings, "{scaling}");
            assert_eq!(back.context_limit(), cfg.context_limit(), "{scaling}");
        }
        let cfg = ModelConfig::from_hf_json(TINY).unwrap();
        let freqs = ModelConfig { rope_scaling: Some(RopeScaling::FreqFactors(vec![2.0; 4])), ..cfg };
        let e = format!("{:#}", hf_config(&freqs, DType::F32).unwrap_err());
        assert!(e.contains("rope_freqs.weight"), "{e}");
    }
}
