//! The summary lines `dms run` prints.

use crate::engine::Generation;

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
        "[summary] policy {policy} | tokens: prompt {}, generated {} | prefill {:.1} tok/s | decode {:.1} tok/s | KV live {} allocated {} (full cache {}) | compression ratio {:.2}x | kept per layer {:.0}%-{:.0}%",
        g.prompt_tokens,
        g.tokens.len(),
        prefill,
        decode,
        fmt_bytes(g.usage.bytes_live),
        fmt_bytes(g.usage.bytes_allocated),
        fmt_bytes(g.usage.bytes_full),
        g.compression_ratio,
        100.0 * g.layer_kept_fraction.iter().copied().fold(f64::INFINITY, f64::min).min(1.0),
        100.0 * g.layer_kept_fraction.iter().copied().fold(0.0, f64::max),
    )
}

/// For latent-attention models, the two memory factors: latent rows vs the per-head K/V of the
/// same attention shape, times the DMS compression ratio. None for per-head K/V models.
pub fn memory_factors_line(cfg: &crate::model::ModelConfig, g: &Generation) -> Option<String> {
    let m = cfg.mla.as_ref()?;
    // Bytes per token and layer of the store that ran (f32 on the host, bf16 or f32 on a GPU).
    let latent = g.usage.bytes_full / g.usage.tokens_seen.max(1);
    let mha = cfg.mha_equivalent_floats_per_token_layer() as u64 * latent / cfg.head_dim as u64;
    // One latent row per layer: tokens seen summed over rows = token-layers.
    let per_head_full = g.usage.tokens_seen * mha;
    Some(format!(
        "[memory] latent rows: {latent} B per token and layer (c_kv {} + k_pe {} floats) vs {mha} B of per-head K/V \
         ({} heads x (nope {} + rope {} + v {})): {:.2}x; DMS compression {:.2}x; total {:.2}x \
         ({} live vs {} for a per-head full cache)",
        m.kv_lora_rank,
        m.qk_rope_head_dim,
        cfg.num_heads,
        m.qk_nope_head_dim,
        m.qk_rope_head_dim,
        m.v_head_dim,
        cfg.latent_factor(),
        g.compression_ratio,
        cfg.latent_factor() * g.compression_ratio,
        fmt_bytes(g.usage.bytes_live),
        fmt_bytes(per_head_full),
    ))
}
