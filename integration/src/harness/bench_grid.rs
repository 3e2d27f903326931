//! The `bench` command: a grid of batch x context x arm run end to end through the batching
//! engine (on `cuda:N` the device batch, with the KV cache and its bookkeeping on the GPU), every
//! figure also given as a ratio to the full-cache arm of the same run.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use dms_policy::PolicyFactory;
use serde::Deserialize;
use serde_json::json;

use crate::assets::resolve_model;
use crate::config::{open_device, ModelSection};
use crate::engine::batch::run_requests;
use crate::engine::from_config::{registry, resolve_policy_table};
use crate::engine::report::fmt_bytes;
use crate::engine::scheduler::Request;
use crate::engine::{load_model, Engine, GenParams};
use crate::model::WeightForm;

/// A bench file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BenchConfig {
    /// The model.
    pub model: ModelSection,
    /// The grid.
    pub grid: Grid,
    /// Arms (`[[arm]]`: name + policy); one must be `full`.
    #[serde(rename = "arm")]
    pub arms: Vec<BenchArm>,
    /// Directory of the file.
    #[serde(skip)]
    pub base_dir: Option<PathBuf>,
}

/// `[grid]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Grid {
    /// Sequences decoding together.
    pub batches: Vec<usize>,
    /// Prompt lengths.
    pub contexts: Vec<usize>,
    /// Decode steps timed per configuration.
    pub decode_tokens: usize,
    /// Tokens per block.
    #[serde(default = "d_block")]
    pub block_size: usize,
    /// JSON output.
    #[serde(default = "d_out")]
    pub output: String,
}

fn d_block() -> usize {
    16
}
fn d_out() -> String {
    "bench-results.json".into()
}

/// One arm of the grid.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BenchArm {
    /// Label.
    pub name: String,
    /// Policy table.
    pub policy: toml::Table,
}

impl BenchConfig {
    /// Reads and validates a bench file.
    pub fn load(path: &Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("cannot read bench file {}", path.display()))?;
        let mut c: BenchConfig =
            toml::from_str(&text).map_err(|e| anyhow::anyhow!("invalid bench file {}: {e}", path.display()))?;
        c.base_dir = path.parent().map(Path::to_path_buf);
        if c.grid.batches.is_empty()
            || c.grid.contexts.is_empty()
            || c.grid.batches.contains(&0)
            || c.grid.contexts.contains(&0)
        {
            bail!("[grid] batches and contexts must be non-empty lists of positive numbers");
        }
        if c.grid.decode_tokens == 0 || c.grid.block_size == 0 {
            bail!("[grid] decode_tokens and block_size must be positive");
        }
        if !c.arms.iter().any(|a| a.policy.get("name").and_then(|v| v.as_str()) == Some("full")) {
            bail!("one [[arm]] must use policy `full`: the other figures are ratios to it");
        }
        for a in &c.arms {
            registry().check_name(&a.policy).with_context(|| format!("[[arm]] `{}`", a.name))?;
        }
        Ok(c)
    }
}

/// `n` pseudo-random token ids below `vocab`, skipping the first 100 ids (special tokens in real
/// vocabularies) when the vocabulary is large enough.
fn ids(seed: usize, n: usize, vocab: usize) -> Vec<u32> {
    let first = if vocab > 200 { 100 } else { 0 };
    let span = (vocab - first).max(1) as u64;
    let mut x = (seed as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % span) as u32 + first as u32
        })
        .collect()
}

/// Runs the grid; returns the JSON rows (also written to the output file) and a table.
pub fn run_grid(cfg: &BenchConfig) -> Result<(serde_json::Value, String)> {
    let device = open_device(&cfg.model.device)?;
    let path = resolve_model(&cfg.model.source, cfg.base_dir.as_deref())?;
    let loaded = load_model(&path, &device, WeightForm::Dense)?;
    let g = &cfg.grid;
    let mc = loaded.model.config().clone();
    // The longest context and its decode tokens, plus two blocks of headroom per row.
    let max_tokens = g.contexts.iter().max().copied().unwrap_or(0) + g.decode_tokens + 2 * g.block_size;
    let blocks = crate::config::PoolSize::Tokens {
        tokens: max_tokens as u64,
        sequences: g.batches.iter().max().copied().unwrap_or(1),
    }
    .blocks(g.block_size, mc.num_layers * mc.num_kv_heads, mc.row_bytes_per_token());
    let full = registry().build(&toml::from_str("name = 'full'").expect("valid"))?;
    let mut engine = Engine::new(loaded.model, full, g.block_size, blocks)?;
    let mut policies: Vec<(String, Arc<dyn PolicyFactory>)> = Vec::new();
    for a in &cfg.arms {
        let t = resolve_policy_table(&a.policy, &mut engine.model, cfg.base_dir.as_deref())?;
        let p = registry().build(&t).with_context(|| format!("arm `{}`", a.name))?;
        engine.check_policy(p.as_ref())?;
        policies.push((a.name.clone(), p));
    }
    let full_idx =
        cfg.arms.iter().position(|a| a.policy.get("name").and_then(|v| v.as_str()) == Some("full")).expect("validated");
    let mut rows = Vec::new();
    // Per-head K/V bytes of the same attention shape over this cache's bytes (latent rows: > 1).
    let latent = mc.latent_factor();
    let mut table = String::from("| context | batch | arm | CR | KV live | prefill tok/s | decode tok/s | decode vs full | KV vs full | KV vs per-head K/V full |\n|---|---|---|---|---|---|---|---|---|---|\n");
    for &ctx in &g.contexts {
        for &batch in &g.batches {
            let mut figs = Vec::new();
            for (name, p) in &policies {
                let reqs: Vec<Request> = (0..batch)
                    .map(|i| Request {
                        id: i,
                        prompt: ids(ctx * 31 + i, ctx, mc.vocab_size),
                        forced: Some(ids(ctx * 37 + i + 1000, g.decode_tokens + 1, mc.vocab_size)),
                        policy: p.clone(),
                        params: None,
                    })
                    .collect();
                let params = GenParams::greedy(g.decode_tokens + 1, 0);
                eprintln!("bench: context {ctx}, batch {batch}, arm {name}");
                let (done, stats) = run_requests(&mut engine, reqs, &params, batch, false, |_| {})?;
                let cr = done.iter().map(|f| f.compression_ratio).sum::<f64>() / done.len().max(1) as f64;
                figs.push((
                    name.clone(),
                    cr,
                    stats.peak_live,
                    stats.prefill_tokens as f64 / stats.prefill_secs.max(1e-9),
                    stats.decode_tok_s(),
                ));
            }
            let (_, _, full_live, _, full_tps) = figs[full_idx].clone();
            for (name, cr, live, pre, dec) in figs {
                let r = json!({"context": ctx, "batch": batch, "arm": name, "compression_ratio": cr, "kv_bytes_live_peak": live,
                    "prefill_tok_s": pre, "decode_tok_s": dec, "decode_vs_full": dec / full_tps.max(1e-9),
                    "kv_live_vs_full": live as f64 / full_live.max(1) as f64,
                    "kv_live_vs_per_head_full": live as f64 / (full_live.max(1) as f64 * latent)});
                table.push_str(&format!(
                    "| {ctx} | {batch} | {name} | {cr:.2} | {} | {pre:.1} | {dec:.1} | {:.2} | {:.3} | {:.4} |\n",
                    fmt_bytes(live),
                    dec / full_tps.max(1e-9),
                    live as f64 / full_live.max(1) as f64,
                    live as f64 / (full_live.max(1) as f64 * latent)
                ));
                rows.push(r);
            }
        }
    }
    let out = json!({"model": cfg.model.source, "decode_tokens": g.decode_tokens, "rows": rows});
    std::fs::write(&g.output, serde_json::to_string_pretty(&out)?)
        .with_context(|| format!("cannot write {}", g.output))?;
    Ok((out, table))
}

#[cfg(test)]
mod tests {
    use super::ids;

    #[test]
    fn ids_stay_inside_any_vocabulary() {
        for vocab in [1, 2, 50, 100, 101, 200, 201, 49152] {
            let v = ids(7, 2000, vocab);
            assert!(v.iter().all(|&t| (t as usize) < vocab), "vocab {vocab}: an id out of range");
            if vocab > 200 {
                assert!(v.iter().all(|&t| t >= 100), "vocab {vocab}: a special-token id");
            }
        }
    }
}
