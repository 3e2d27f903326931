//! The `bench` command: a grid of batch x context x arm run end to end through the scheduler
//! (on `cuda:N` on the device cache, with its bookkeeping and attention on the GPU), every figure
//! also given as a ratio to the full-cache arm of the same run. With `kv_budget_gib` each cell
//! fills a KV budget by admission instead of running a fixed batch; from `shared_prompt_from`
//! tokens on, a cell's requests share one prompt, prefilled once and forked. A `mistralrs` arm
//! runs mistral.rs on the same weights and requests beside them (`bench_peer`).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use dms_policy::PolicyFactory;
use serde::Deserialize;
use serde_json::json;

use super::bench_peer;
use crate::assets::resolve_model;
use crate::config::{open_device, ModelSection};
use crate::engine::batch::run_requests;
use crate::engine::from_config::{registry, resolve_policy_table};
use crate::engine::report::fmt_bytes;
use crate::engine::scheduler::Request;
use crate::engine::{load_model, Engine, GenParams};
use crate::model::shapes::named_shape;
use crate::model::{Llama, WeightForm};

/// A bench file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BenchConfig {
    /// The model.
    pub model: ModelSection,
    /// The grid.
    pub grid: Grid,
    /// Arms (`[[arm]]`: name + policy, or name + `engine = "mistralrs"`); one must be `full`.
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
    /// Sequences decoding together (without `kv_budget_gib`).
    #[serde(default)]
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
    /// Model sources run in turn (each as `[model] source`; `shape:NAME` is a random-weight
    /// model of a real model's shape, see [`named_shape`]); empty: `[model] source` alone.
    #[serde(default)]
    pub models: Vec<String>,
    /// A KV budget in GiB: each cell submits `requests` requests to a pool of this size and
    /// decodes as many as admission fits (the memory limit); `batches` is then unused.
    #[serde(default)]
    pub kv_budget_gib: Option<f64>,
    /// Requests each cell submits under `kv_budget_gib`.
    #[serde(default = "d_requests")]
    pub requests: usize,
    /// Contexts from this length on give every request of a cell the same prompt, so one prompt
    /// pass is forked into all of them (long prompts whose passes would not fit the time).
    #[serde(default)]
    pub shared_prompt_from: Option<usize>,
}

fn d_requests() -> usize {
    256
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
    /// `dms` (this engine, the default) or `mistralrs`: mistral.rs on the same weights, with its
    /// own cache and batching, sent the same requests.
    #[serde(default = "d_engine")]
    pub engine: String,
    /// Policy table; this engine's arms only.
    #[serde(default)]
    pub policy: Option<toml::Table>,
    /// A `mistralrs` arm runs its PagedAttention, with a KV pool the size of this engine's
    /// (`kv_budget_gib`, or what the largest batch needs); otherwise its normal cache.
    #[serde(default)]
    pub paged_attention: bool,
}

fn d_engine() -> String {
    "dms".into()
}

impl BenchArm {
    /// Whether the arm runs a peer engine rather than this one.
    pub fn is_peer(&self) -> bool {
        self.engine != "dms"
    }

    /// Whether the arm is this engine's full cache.
    fn is_full(&self) -> bool {
        self.policy.as_ref().and_then(|p| p.get("name")).and_then(|v| v.as_str()) == Some("full")
    }
}

/// What a bench file naming a mistral.rs arm needs in a build without it.
pub(super) const NO_MISTRALRS: &str =
    "a `mistralrs` arm needs mistral.rs: build with --features dms-integration/mistralrs (mistralrs-cuda on a GPU)";

impl BenchConfig {
    /// Reads and validates a bench file.
    pub fn load(path: &Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("cannot read bench file {}", path.display()))?;
        let mut c: BenchConfig =
            toml::from_str(&text).map_err(|e| anyhow::anyhow!("invalid bench file {}: {e}", path.display()))?;
        c.base_dir = path.parent().map(Path::to_path_buf);
        let batches_needed = c.grid.kv_budget_gib.is_none();
        if (batches_needed && c.grid.batches.is_empty())
            || c.grid.contexts.is_empty()
            || c.grid.batches.contains(&0)
            || c.grid.contexts.contains(&0)
        {
            bail!("[grid] batches (without kv_budget_gib) and contexts must be non-empty lists of positive numbers");
        }
        if c.grid.decode_tokens == 0 || c.grid.block_size == 0 {
            bail!("[grid] decode_tokens and block_size must be positive");
        }
        c.model.compute_dtype()?;
        if let Some(b) = c.grid.kv_budget_gib {
            if !(b.is_finite() && b > 0.0) || c.grid.requests == 0 {
                bail!(
                    "[grid] kv_budget_gib must be a positive number of GiB and requests positive (got {b}, {})",
                    c.grid.requests
                );
            }
        }
        if !c.arms.iter().any(BenchArm::is_full) {
            bail!("one [[arm]] must use policy `full`: the other figures are ratios to it");
        }
        let on_cuda = crate::config::device_ordinal(&c.model.device)?.is_some();
        for a in &c.arms {
            match (a.engine.as_str(), &a.policy) {
                ("dms", Some(p)) if !a.paged_attention => {
                    registry().check_name(p).with_context(|| format!("[[arm]] `{}`", a.name))?
                }
                ("dms", Some(_)) => bail!("[[arm]] `{}`: paged_attention is a `mistralrs` arm's setting", a.name),
                ("dms", None) => bail!("[[arm]] `{}`: this engine's arms need a `policy`", a.name),
                ("mistralrs", None) if a.paged_attention && !(cfg!(feature = "mistralrs-cuda") && on_cuda) => bail!(
                    "[[arm]] `{}`: mistral.rs's PagedAttention runs on CUDA only: it needs `[model] device = \"cuda:N\"` \
                     and a build with --features dms-integration/mistralrs-cuda",
                    a.name
                ),
                ("mistralrs", None) if cfg!(feature = "mistralrs") => {}
                ("mistralrs", None) => bail!("[[arm]] `{}`: {NO_MISTRALRS}", a.name),
                ("mistralrs", Some(_)) => {
                    bail!("[[arm]] `{}`: mistral.rs runs its own full cache and takes no `policy`", a.name)
                }
                (other, _) => bail!("[[arm]] `{}`: unknown engine `{other}` (valid: dms, mistralrs)", a.name),
            }
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

/// Runs the grid for every model; returns the JSON rows (also written to the output file) and a
/// table.
pub fn run_grid(cfg: &BenchConfig) -> Result<(serde_json::Value, String)> {
    let device = open_device(&cfg.model.device)?;
    let sources = if cfg.grid.models.is_empty() { vec![cfg.model.source.clone()] } else { cfg.grid.models.clone() };
    let mut rows = Vec::new();
    let mut table = String::from("| model | context | batch | arm | CR | seqs (max / mean / fit) | KV live | prefill tok/s | decode tok/s | decode vs full | KV vs full | KV vs per-head K/V full | end-to-end tok/s | end-to-end vs full |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n");
    for source in &sources {
        // With a mistral.rs arm both engines load one folder, so they run the same weights.
        let shared = match cfg.arms.iter().any(BenchArm::is_peer) {
            true => Some(bench_peer::checkpoint(cfg, source, &device)?),
            false => None,
        };
        let model = load_bench_model(cfg, source, shared.as_deref(), &device)?;
        model_grid(cfg, source, model, shared.as_deref(), &mut rows, &mut table)?;
    }
    let out = json!({"models": sources, "decode_tokens": cfg.grid.decode_tokens, "kv_budget_gib": cfg.grid.kv_budget_gib, "rows": rows});
    std::fs::write(&cfg.grid.output, serde_json::to_string_pretty(&out)?)
        .with_context(|| format!("cannot write {}", cfg.grid.output))?;
    Ok((out, table))
}

/// The model of `source`: the folder `shared` when given, else `shape:NAME` gives random
/// weights of that shape and anything else loads as `[model] source` does; in `[model] dtype`.
fn load_bench_model(
    cfg: &BenchConfig,
    source: &str,
    shared: Option<&Path>,
    device: &candle_core::Device,
) -> Result<Llama> {
    let dtype = cfg.model.compute_dtype()?;
    let mut model = match (shared, source.strip_prefix("shape:")) {
        (Some(dir), _) => load_model(dir, device, WeightForm::Dense)?.model.to_dtype(dtype)?,
        (None, Some(name)) => Llama::random(named_shape(name)?, device, dtype)?,
        (None, None) => {
            let path = resolve_model(source, cfg.base_dir.as_deref())?;
            load_model(&path, device, WeightForm::Dense)?.model.to_dtype(dtype)?
        }
    };
    cfg.model.apply_context(&mut model)?;
    Ok(model)
}

/// The grid of one model, appended to `rows` and `table`; mistral.rs arms load `shared`.
fn model_grid(
    cfg: &BenchConfig,
    source: &str,
    model: Llama,
    shared: Option<&Path>,
    rows: &mut Vec<serde_json::Value>,
    table: &mut String,
) -> Result<()> {
    let g = &cfg.grid;
    let mc = model.config().clone();
    let row_count = mc.num_layers * mc.num_kv_heads;
    // The longest context and its decode tokens, plus two blocks of headroom per row.
    let max_tokens = g.contexts.iter().max().copied().unwrap_or(0) + g.decode_tokens + 2 * g.block_size;
    let pool = match g.kv_budget_gib {
        Some(gib) => crate::config::PoolSize::MiB(gib * 1024.0),
        None => crate::config::PoolSize::Tokens {
            tokens: max_tokens as u64,
            sequences: g.batches.iter().max().copied().unwrap_or(1),
        },
    };
    let blocks = pool.blocks(g.block_size, row_count, mc.row_bytes_per_token());
    let full = registry().build(&toml::from_str("name = 'full'").expect("valid"))?;
    let mut engine = Engine::new(model, full, g.block_size, blocks)?;
    let mut policies: Vec<(String, Arc<dyn PolicyFactory>)> = Vec::new();
    for a in cfg.arms.iter().filter(|a| !a.is_peer()) {
        let t =
            resolve_policy_table(a.policy.as_ref().expect("validated"), &mut engine.model, cfg.base_dir.as_deref())?;
        let p = registry().build(&t).with_context(|| format!("arm `{}`", a.name))?;
        engine.check_policy(p.as_ref())?;
        policies.push((a.name.clone(), p));
    }
    // Each arm runs one short request first, untimed: kernel loading and first allocations
    // would otherwise land in the first cell's figures.
    for (_, p) in &policies {
        let warm = Request {
            id: 0,
            prompt: ids(1, 32, mc.vocab_size),
            forced: Some(ids(2, 3, mc.vocab_size)),
            policy: p.clone(),
            params: None,
        };
        run_requests(&mut engine, vec![warm], &GenParams::greedy(3, 0), 1, false, |_| {})?;
    }
    let full_idx = cfg.arms.iter().filter(|a| !a.is_peer()).position(BenchArm::is_full).expect("validated");
    // Per-head K/V bytes of the same attention shape over this cache's bytes (latent rows: > 1).
    let latent = mc.latent_factor();
    let batches = match g.kv_budget_gib {
        Some(_) => vec![g.requests],
        None => g.batches.clone(),
    };
    let pool_bytes = blocks as f64 * g.block_size as f64 * engine.store.slot_bytes() as f64;
    // Each cell's prompts and full-cache rate, for the mistral.rs arms after this engine's.
    let mut peer_cells = Vec::new();
    for &ctx in &g.contexts {
        let shared_prompt = g.shared_prompt_from.is_some_and(|from| ctx >= from);
        for &batch in &batches {
            // The cell's prompts, given to every arm; seeded by batch too, so that no cell reuses
            // another's prompt (a peer's prefix cache would).
            let prompts: Vec<Vec<u32>> = (0..batch)
                .map(|i| ids(ctx * 31 + batch * 7919 + if shared_prompt { 0 } else { i }, ctx, mc.vocab_size))
                .collect();
            let mut figs = Vec::new();
            for (name, p) in &policies {
                let reqs: Vec<Request> = prompts
                    .iter()
                    .enumerate()
                    .map(|(i, prompt)| Request {
                        id: i,
                        prompt: prompt.clone(),
                        forced: Some(ids(ctx * 37 + i + 1000, g.decode_tokens + 1, mc.vocab_size)),
                        policy: p.clone(),
                        params: None,
                    })
                    .collect();
                let params = GenParams::greedy(g.decode_tokens + 1, 0);
                eprintln!("bench: {source}, context {ctx}, batch {batch}, arm {name}");
                let t0 = Instant::now();
                let (done, stats) = run_requests(&mut engine, reqs, &params, batch, false, |_| {})?;
                let wall = t0.elapsed().as_secs_f64();
                let generated = done.iter().map(|f| f.tokens.len()).sum::<usize>();
                let n = done.len().max(1) as f64;
                let cr = done.iter().map(|f| f.compression_ratio).sum::<f64>() / n;
                // What the pool fits of this arm's sequences at their peak.
                let per_seq = done.iter().map(|f| f.peak_allocated as f64).sum::<f64>() / n;
                figs.push(Cell {
                    name: name.clone(),
                    cr,
                    live: stats.peak_live,
                    prefill_tok_s: stats.prefill_tokens as f64 / stats.prefill_secs.max(1e-9),
                    decode_tok_s: stats.decode_tok_s(),
                    max_running: stats.max_running,
                    mean_running: stats.mean_running(),
                    forked: stats.forked,
                    fits: pool_bytes / per_seq.max(1.0),
                    generated,
                    end_to_end_tok_s: generated as f64 / wall.max(1e-9),
                });
            }
            let full = &figs[full_idx];
            let (full_live, full_tps, full_e2e) = (full.live, full.decode_tok_s, full.end_to_end_tok_s);
            for c in figs {
                let decode_vs_full = c.decode_tok_s / full_tps.max(1e-9);
                let kv_vs_full = c.live as f64 / full_live.max(1) as f64;
                let e2e_vs_full = c.end_to_end_tok_s / full_e2e.max(1e-9);
                rows.push(json!({"model": source, "context": ctx, "batch": batch, "arm": c.name, "engine": "dms",
                    "compression_ratio": c.cr, "kv_bytes_live_peak": c.live, "prefill_tok_s": c.prefill_tok_s,
                    "decode_tok_s": c.decode_tok_s, "decode_vs_full": decode_vs_full, "kv_live_vs_full": kv_vs_full,
                    "kv_live_vs_per_head_full": kv_vs_full / latent, "max_running": c.max_running,
                    "mean_running": c.mean_running, "forked": c.forked, "sequences_fit": c.fits,
                    "sustained_vs_fit": c.mean_running / c.fits.max(1e-9),
                    "generated_tokens": c.generated, "end_to_end_tok_s": c.end_to_end_tok_s,
                    "end_to_end_vs_full": e2e_vs_full}));
                table.push_str(&format!(
                    "| {source} | {ctx} | {batch} | {} | {:.2} | {} / {:.1} / {:.1} | {} | {:.1} | {:.1} | {decode_vs_full:.2} | {kv_vs_full:.3} | {:.4} | {:.1} | {e2e_vs_full:.2} |\n",
                    c.name,
                    c.cr,
                    c.max_running,
                    c.mean_running,
                    c.fits,
                    fmt_bytes(c.live),
                    c.prefill_tok_s,
                    c.decode_tok_s,
                    kv_vs_full / latent,
                    c.end_to_end_tok_s
                ));
            }
            peer_cells.push((ctx, batch, prompts, full_e2e));
        }
    }
    let Some(dir) = shared else { return Ok(()) };
    // mistral.rs starts once this engine's pool and weights are freed, so that each has the
    // device to itself.
    let device = engine.model.device().clone();
    drop(engine);
    let max_seqs = batches.iter().max().copied().unwrap_or(1);
    let kv_mib = (pool_bytes / f64::from(1 << 20)).ceil() as usize;
    let prompts: Vec<&[Vec<u32>]> = peer_cells.iter().map(|c| c.2.as_slice()).collect();
    let results = bench_peer::run_arms(cfg, dir, &device, max_seqs, kv_mib, &prompts, g.decode_tokens + 1)?;
    for (&(ctx, batch, _, full_e2e), cell) in peer_cells.iter().zip(results) {
        // mistral.rs reports no per-phase or cache figures for a batch: end to end only.
        for p in cell {
            let e2e_vs_full = p.tok_s / full_e2e.max(1e-9);
            rows.push(json!({"model": source, "context": ctx, "batch": batch, "arm": p.name,
                "engine": "mistralrs", "paged_attention": p.paged, "generated_tokens": p.generated,
                "end_to_end_tok_s": p.tok_s, "end_to_end_vs_full": e2e_vs_full}));
            table.push_str(&format!(
                "| {source} | {ctx} | {batch} | {} | 1 | - | - | - | - | - | - | - | {:.1} | {e2e_vs_full:.2} |\n",
                p.name, p.tok_s
            ));
        }
    }
    Ok(())
}

/// One arm's figures in one cell.
struct Cell {
    name: String,
    cr: f64,
    live: u64,
    prefill_tok_s: f64,
    decode_tok_s: f64,
    max_running: usize,
    mean_running: f64,
    forked: usize,
    /// Sequences of this arm's peak size the pool holds.
    fits: f64,
    /// Tokens generated (or forced), all requests.
    generated: usize,
    /// Generated tokens per wall second of the whole cell, prompt passes included.
    end_to_end_tok_s: f64,
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
