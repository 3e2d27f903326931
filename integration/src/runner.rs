//! From an engine config to a running engine, and the `run` summary line.

use anyhow::{Context, Result};
use dms_policy::Registry;
use tokenizers::Tokenizer;

use crate::assets::resolve_model;
use crate::config::{open_device, EngineConfig};
use crate::engine::{load_model, Engine, GenParams, Generation};

/// The policy registry the engine uses: every built-in policy.
pub fn registry() -> Registry {
    Registry::with_builtins()
}

/// Loads the model, builds the policy and sizes the pool as the config says.
pub fn build_engine(cfg: &EngineConfig) -> Result<(Engine, Option<Tokenizer>)> {
    let policy = registry().build(&cfg.cache.policy).context("[cache.policy]")?;
    let device = open_device(&cfg.model.device)?;
    let path = resolve_model(&cfg.model.source, cfg.base_dir.as_deref())?;
    let loaded = load_model(&path, &device, false).with_context(|| format!("loading model {}", path.display()))?;
    let mc = loaded.model.config();
    let blocks = cfg.capacity_blocks(mc.num_layers, mc.num_kv_heads, mc.head_dim);
    let engine = Engine::new(loaded.model, policy, cfg.cache.block_size, blocks)?;
    Ok((engine, loaded.tokenizer))
}

/// Generation settings from the config.
pub fn gen_params(cfg: &EngineConfig) -> GenParams {
    let g = &cfg.generation;
    GenParams {
        max_tokens: g.max_tokens,
        temperature: g.temperature,
        top_p: g.top_p,
        seed: g.seed,
        stop_at_eos: g.stop_at_eos,
        prefill_chunk: cfg.cache.prefill_chunk,
    }
}

/// Wraps a user message in the ChatML template SmolLM2-Instruct and Qwen use.
pub fn chatml(prompt: &str) -> String {
    format!("<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n")
}

/// Human-readable bytes.
pub fn fmt_bytes(b: u64) -> String {
    let b = b as f64;
    if b >= 1024.0 * 1024.0 * 1024.0 {
        format!("{:.2} GiB", b / (1024.0 * 1024.0 * 1024.0))
    } else if b >= 1024.0 * 1024.0 {
        format!("{:.2} MiB", b / (1024.0 * 1024.0))
    } else {
        format!("{:.1} KiB", b / 1024.0)
    }
}

/// The one summary line `run` prints.
pub fn summary_line(g: &Generation, policy: &str) -> String {
    let prefill = g.prompt_tokens as f64 / g.prefill_secs.max(1e-9);
    let decode = if g.decode_steps > 0 { g.decode_steps as f64 / g.decode_secs.max(1e-9) } else { 0.0 };
    format!(
        "[summary] policy {policy} | tokens: prompt {}, generated {} | prefill {:.1} tok/s | decode {:.1} tok/s | KV live {} allocated {} (full cache {}) | compression ratio {:.2}x",
        g.prompt_tokens,
        g.tokens.len(),
        prefill,
        decode,
        fmt_bytes(g.usage.bytes_live),
        fmt_bytes(g.usage.bytes_allocated),
        fmt_bytes(g.usage.bytes_full),
        g.compression_ratio
    )
}
