//! The A/B harness: one workload under every arm of a file, one table, JSON and a plot.
//!
//! Quality is measured teacher-forced on real text: each prompt is a window of the corpus and
//! its continuation is the text that follows; every arm is fed the same continuation, so
//! top-1 agreement and KL(baseline || arm) compare next-token distributions at identical
//! positions, and perplexity is that of the true continuation. Each model's baseline is its first
//! arm whose policy is `full` (arms of a model without one report perplexity only). An arm whose
//! model has no tokenizer (a random-weight model from a config.json) is fed the default model's
//! token ids, provided its vocabulary covers them.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use dms_policy::PolicyFactory;
use indicatif::{ProgressBar, ProgressStyle};
use serde::Deserialize;
use serde_json::json;
use tokenizers::Tokenizer;

use crate::assets::resolve_model;
use crate::config::{open_device, ModelSection, PoolSize};
use crate::engine::batch::run_requests;
use crate::engine::from_config::{registry, resolve_policy_table};
use crate::engine::report::fmt_bytes;
use crate::engine::scheduler::{BatchStats, Finished, Request};
use crate::engine::{load_model, Engine, GenParams};
use crate::harness::ab_peer::{peer_run, PeerResult};
use crate::harness::agreement;
use crate::kv::store::{KvDtype, KvStore};
use crate::model::WeightForm;

/// An A/B file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AbConfig {
    /// Default model of every arm.
    pub model: ModelSection,
    /// Pool for the quality run.
    #[serde(default)]
    pub cache: AbCache,
    /// Prompts and lengths.
    pub workload: Workload,
    /// Optional concurrency experiment under a fixed memory budget.
    #[serde(default)]
    pub capacity: Option<Capacity>,
    /// The arms (`[[arm]]`), at least one with policy `full`.
    #[serde(rename = "arm")]
    pub arms: Vec<Arm>,
    /// Output files.
    #[serde(default)]
    pub output: Output,
    /// Directory of the file (relative paths).
    #[serde(skip)]
    pub base_dir: Option<PathBuf>,
}

/// `[cache]` of an A/B file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AbCache {
    /// Tokens per block.
    #[serde(default = "d_block")]
    pub block_size: usize,
    /// Pool size in MiB.
    #[serde(default = "d_mem")]
    pub memory_mb: u64,
    /// Prompt tokens per prefill pass (0 = whole prompt).
    #[serde(default)]
    pub prefill_chunk: usize,
}

impl AbCache {
    /// Range checks (shared by the A/B and eval files).
    pub fn validate(&self) -> Result<()> {
        let max = crate::config::MAX_BLOCK_SIZE;
        if self.block_size == 0 || self.block_size > max {
            bail!("[cache] block_size must be between 1 and {max}, not {}", self.block_size);
        }
        if self.memory_mb == 0 {
            bail!("[cache] memory_mb must be positive");
        }
        Ok(())
    }
}

/// `[workload]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Workload {
    /// `brown-fiction` (held-out split, fetched with npm) or a UTF-8 text file (also accepted as
    /// `text = "FILE"`; relative to the config file).
    #[serde(default = "d_corpus", alias = "text")]
    pub corpus: String,
    /// Number of prompts.
    #[serde(default = "d_prompts")]
    pub prompts: usize,
    /// Tokens per prompt.
    #[serde(default = "d_prompt_tokens")]
    pub prompt_tokens: usize,
    /// Continuation tokens scored after each prompt.
    #[serde(default = "d_cont")]
    pub continuation_tokens: usize,
    /// Sequences decoding together.
    #[serde(default = "d_conc")]
    pub concurrency: usize,
}

/// `[capacity]`: how many sequences each arm sustains in a fixed pool.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Capacity {
    /// Pool size in MiB.
    pub memory_mb: f64,
    /// Requests submitted at once.
    pub requests: usize,
    /// Tokens per prompt.
    pub prompt_tokens: usize,
    /// Tokens generated per request (greedy).
    pub gen_tokens: usize,
}

/// One `[[arm]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Arm {
    /// Label.
    pub name: String,
    /// `dms` (this engine, the default), or a peer with its own full cache: `mistralrs`, or
    /// `llama.cpp` (the GGUF file as it is, through llama-cpp-python, installed on first use).
    #[serde(default = "d_engine")]
    pub engine: String,
    /// Policy table (`name` plus its keys); required for this engine.
    #[serde(default)]
    pub policy: Option<toml::Table>,
    /// Model source overriding `[model] source`.
    #[serde(default)]
    pub model: Option<String>,
    /// Weight form overriding `[model] weights` (`dense`, `quantized`, `q8_0`, ...). A mistral.rs
    /// arm with quantized weights loads the GGUF file itself (its own quantized path).
    #[serde(default)]
    pub weights: Option<String>,
    /// Element type of this arm's stored keys and values (`f32`, the default, or `f16`).
    #[serde(default)]
    pub kv_dtype: Option<String>,
    /// Skip the arm (with a notice) when this build cannot run it.
    #[serde(default)]
    pub optional: bool,
    /// mistral.rs arms: also generate with this many requests in flight on both sides
    /// (throughput only: mistralrs-core 0.8.1 mixes the outputs of concurrent requests).
    #[serde(default)]
    pub concurrency: Option<usize>,
    /// The arm of ours whose policy the concurrent run uses (default: the full cache).
    #[serde(default)]
    pub vs: Option<String>,
}

fn d_engine() -> String {
    "dms".into()
}

/// `[output]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Output {
    /// JSON results.
    #[serde(default = "d_json")]
    pub json: String,
    /// SVG plot of KV bytes vs tokens generated.
    #[serde(default = "d_plot")]
    pub plot: String,
}

fn d_block() -> usize {
    16
}
fn d_mem() -> u64 {
    1024
}
fn d_corpus() -> String {
    "brown-fiction".into()
}
fn d_prompts() -> usize {
    4
}
fn d_prompt_tokens() -> usize {
    384
}
fn d_cont() -> usize {
    32
}
fn d_conc() -> usize {
    4
}
fn d_json() -> String {
    "ab-results.json".into()
}
fn d_plot() -> String {
    "ab-kv.svg".into()
}

impl Default for AbCache {
    fn default() -> Self {
        Self { block_size: 16, memory_mb: 1024, prefill_chunk: 0 }
    }
}

impl Default for Output {
    fn default() -> Self {
        Self { json: d_json(), plot: d_plot() }
    }
}

impl AbConfig {
    /// Reads and validates an A/B file.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("cannot read A/B file {}", path.display()))?;
        let mut c: AbConfig =
            toml::from_str(&text).map_err(|e| anyhow::anyhow!("invalid A/B file {}: {e}", path.display()))?;
        c.base_dir = path.parent().map(Path::to_path_buf);
        c.validate()?;
        Ok(c)
    }

    /// Range checks.
    pub fn validate(&self) -> Result<()> {
        let w = &self.workload;
        for (k, v) in [
            ("prompts", w.prompts),
            ("prompt_tokens", w.prompt_tokens),
            ("continuation_tokens", w.continuation_tokens),
            ("concurrency", w.concurrency),
        ] {
            if v == 0 {
                bail!("[workload] {k} must be at least 1");
            }
        }
        self.cache.validate()?;
        if let Some(c) = &self.capacity {
            if c.memory_mb.is_nan()
                || c.memory_mb <= 0.0
                || c.requests == 0
                || c.prompt_tokens == 0
                || c.gen_tokens == 0
            {
                bail!("[capacity] memory_mb, requests, prompt_tokens and gen_tokens must be positive");
            }
        }
        if self.arms.is_empty() {
            bail!("the A/B file has no [[arm]]");
        }
        if !self.arms.iter().any(|a| a.is_full()) {
            bail!("one [[arm]] must use policy `full`: it is the baseline of agreement and KL");
        }
        WeightForm::parse(&self.model.weights).context("[model]")?;
        let mut seen = std::collections::HashSet::new();
        for a in &self.arms {
            if !seen.insert(&a.name) {
                bail!("two arms are named `{}`", a.name);
            }
            // A LongRoPE model past its original context rotates by other factors than a peer
            // sized for the run would: the comparison would measure that.
            if self.model.context.is_some() && a.engine != "dms" {
                bail!(
                    "[[arm]] `{}`: [model] context applies to our arms only; peer arms run the model as their engine \
                     sizes it, so leave `context` out of an A/B with peers",
                    a.name
                );
            }
            if let Some(w) = &a.weights {
                WeightForm::parse(w).with_context(|| format!("[[arm]] `{}`", a.name))?;
            }
            if let Some(k) = &a.kv_dtype {
                KvDtype::parse(k).map_err(anyhow::Error::msg).with_context(|| format!("[[arm]] `{}`", a.name))?;
            }
            if let Some(c) = a.concurrency {
                if a.engine != "mistralrs" || c == 0 {
                    bail!("[[arm]] `{}`: `concurrency` (at least 1) is for mistral.rs arms (llama-cpp-python runs one sequence)", a.name);
                }
            }
            if let Some(vs) = &a.vs {
                if a.concurrency.is_none_or(|c| c < 2) {
                    bail!("[[arm]] `{}`: `vs` names the policy of the concurrent run, which needs `concurrency` of 2 or more", a.name);
                }
                if !self.arms.iter().any(|o| &o.name == vs && o.engine == "dms") {
                    bail!("[[arm]] `{}`: `vs = \"{vs}\"` names no arm of this engine", a.name);
                }
            }
            match (a.engine.as_str(), &a.policy) {
                ("dms", Some(p)) => registry().check_name(p).with_context(|| format!("[[arm]] `{}`", a.name))?,
                ("dms", None) => bail!("[[arm]] `{}` needs a `policy` table", a.name),
                ("mistralrs" | "llama.cpp", Some(_)) => {
                    bail!("[[arm]] `{}`: {} runs its own full cache and takes no `policy`", a.name, a.engine)
                }
                ("mistralrs" | "llama.cpp", None) => {}
                (other, _) => {
                    bail!("[[arm]] `{}`: unknown engine `{other}` (valid: dms, mistralrs, llama.cpp)", a.name)
                }
            }
        }
        Ok(())
    }
}

impl Arm {
    /// The arm's weight form: its own `weights`, else `[model] weights`.
    pub(crate) fn weights<'a>(&'a self, model: &'a ModelSection) -> &'a str {
        self.weights.as_deref().unwrap_or(&model.weights)
    }

    fn is_full(&self) -> bool {
        self.engine == "dms"
            && self.policy.as_ref().and_then(|p| p.get("name")).and_then(|v| v.as_str()) == Some("full")
    }
}

/// An engine for the arms of one model: a `[cache] memory_mb` pool (each arm brings its policy).
fn arm_engine(model: crate::model::Llama, cache: &AbCache, kv: KvDtype) -> Result<Engine> {
    let mc = model.config();
    let blocks = PoolSize::MiB(cache.memory_mb as f64).blocks(
        cache.block_size,
        mc.num_layers * mc.num_kv_heads,
        kv.slot_bytes(mc.head_dim, mc.value_dim()),
    );
    let full = registry().build(&toml::from_str("name = 'full'")?)?;
    Engine::new(model, full, cache.block_size, blocks)?.with_kv_dtype(kv)
}

/// Everything measured for one arm.
#[derive(Debug, Clone)]
pub struct ArmResult {
    /// Label.
    pub name: String,
    /// Model source of the arm.
    pub model: String,
    /// Weight form of the arm (`[model] weights` or its own).
    pub weights: String,
    /// Policy description.
    pub policy: String,
    /// Mean compression ratio over sequences (the shadowed one for `shadow`).
    pub compression_ratio: f64,
    /// Quality-run statistics.
    pub stats: BatchStats,
    /// Fraction of positions whose argmax equals the baseline's.
    pub top1_agreement: f64,
    /// `(agreeing, counted)` positions among the first [`agreement::CONFIDENT_TOKENS`] of each
    /// prompt where the baseline's top-1 leads by more than [`agreement::CONFIDENT_MARGIN`].
    pub confident_agreement: (usize, usize),
    /// Mean KL(baseline || arm) in nats.
    pub mean_kl: f64,
    /// Perplexity of the true continuation.
    pub perplexity: f64,
    /// Capacity run, when configured.
    pub capacity: Option<BatchStats>,
    /// Bytes a per-head K/V cache of the model's attention shape would hold per token, over the
    /// bytes this cache holds per token before eviction (1 for per-head K/V, > 1 for latent rows).
    pub latent_factor: f64,
    /// Whether a full-cache baseline of the same model exists (agreement and KL are defined).
    pub has_baseline: bool,
    /// The arm's model has random weights: perplexity and top-1 agreement mean nothing (KL
    /// against its own full arm still measures what eviction changes).
    pub random_weights: bool,
}

pub(crate) fn log_softmax(l: &[f32]) -> Vec<f32> {
    let m = l.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let z: f64 = l.iter().map(|&x| ((x - m) as f64).exp()).sum();
    let lz = m as f64 + z.ln();
    l.iter().map(|&x| (x as f64 - lz) as f32).collect()
}

pub(crate) fn kl(p_log: &[f32], q_log: &[f32]) -> f64 {
    p_log.iter().zip(q_log).map(|(&p, &q)| (p as f64).exp() * (p as f64 - q as f64)).sum::<f64>().max(0.0)
}

/// Token windows of the corpus: `n` windows of `len` tokens at evenly spaced offsets, first at
/// the start and last at the end, never overlapping (so prompts are independent samples of the
/// text); a text shorter than `n * len` tokens is an error.
pub fn windows(tokens: &[u32], n: usize, len: usize) -> Result<Vec<Vec<u32>>> {
    if tokens.len() < len {
        bail!("the corpus has {} tokens, fewer than one window of {len}", tokens.len());
    }
    if tokens.len() < n.saturating_mul(len) {
        bail!(
            "the corpus has {} tokens, fewer than {n} non-overlapping windows of {len} ({} tokens)",
            tokens.len(),
            n * len
        );
    }
    let span = tokens.len() - len;
    Ok((0..n)
        .map(|i| {
            let at = if n == 1 { 0 } else { span * i / (n - 1) };
            tokens[at..at + len].to_vec()
        })
        .collect())
}

pub(crate) fn bar(len: u64, label: &str) -> ProgressBar {
    let pb = ProgressBar::new(len);
    pb.set_style(
        ProgressStyle::with_template("{prefix:>14} [{bar:30}] {pos}/{len} {msg} {elapsed}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    pb.set_prefix(label.to_string());
    pb
}

/// Runs every arm and returns our arms' results in arm order, and the peers'.
pub fn run_ab(cfg: &AbConfig) -> Result<(Vec<ArmResult>, Vec<PeerResult>)> {
    let device = open_device(&cfg.model.device)?;
    let base = cfg.base_dir.as_deref();
    let text = crate::assets::corpus::load_text(&cfg.workload.corpus, base)?;
    // One engine per (model source, weight form, KV element type).
    let mut engines: HashMap<(String, String, String), (Engine, Option<Tokenizer>)> = HashMap::new();
    let mut results = Vec::new();
    let mut baselines: HashMap<String, Vec<Vec<Vec<f32>>>> = HashMap::new();
    let source_of = |a: &Arm| a.model.clone().unwrap_or_else(|| cfg.model.source.clone());
    // Full arms first (each model's first full arm is its baseline), then the others in file order.
    let order: Vec<usize> = (0..cfg.arms.len())
        .filter(|&i| cfg.arms[i].is_full())
        .chain((0..cfg.arms.len()).filter(|&i| !cfg.arms[i].is_full() && cfg.arms[i].engine == "dms"))
        .collect();
    let default_tok = {
        let path = resolve_model(&cfg.model.source, base)?;
        let form = WeightForm::parse(&cfg.model.weights)?;
        let mut loaded = load_model(&path, &device, form).with_context(|| format!("loading {}", path.display()))?;
        cfg.model.apply_context(&mut loaded.model)?;
        let tok = loaded.tokenizer.clone();
        let key = (cfg.model.source.clone(), cfg.model.weights.clone(), "f32".to_string());
        engines.insert(key, (arm_engine(loaded.model, &cfg.cache, KvDtype::F32)?, tok.clone()));
        tok
    };
    let mut by_index: Vec<Option<ArmResult>> = vec![None; cfg.arms.len()];
    for &ai in &order {
        let arm = &cfg.arms[ai];
        let source = source_of(arm);
        let kv = arm.kv_dtype.clone().unwrap_or_else(|| "f32".into());
        let key = (source.clone(), arm.weights(&cfg.model).to_string(), kv);
        if !engines.contains_key(&key) {
            let path = resolve_model(&source, base)?;
            let form = WeightForm::parse(&key.1)?;
            let mut loaded = load_model(&path, &device, form).with_context(|| format!("loading {}", path.display()))?;
            cfg.model.apply_context(&mut loaded.model).with_context(|| format!("arm `{}`", arm.name))?;
            let kv = KvDtype::parse(&key.2).map_err(anyhow::Error::msg)?;
            engines.insert(key.clone(), (arm_engine(loaded.model, &cfg.cache, kv)?, loaded.tokenizer));
        }
        let (engine, tok) = engines.get_mut(&key).expect("inserted");
        let tok = match (tok.as_ref(), default_tok.as_ref()) {
            (Some(t), _) => t,
            (None, Some(t)) if t.get_vocab_size(true) <= engine.model.config().vocab_size => t,
            _ => bail!(
                "arm `{}`: model {source} has no tokenizer and its vocabulary cannot take the default model's token ids",
                arm.name
            ),
        };
        let table = resolve_policy_table(arm.policy.as_ref().expect("validated"), &mut engine.model, base)
            .with_context(|| format!("arm `{}`", arm.name))?;
        let policy: Arc<dyn PolicyFactory> = registry().build(&table).with_context(|| format!("arm `{}`", arm.name))?;
        engine.check_policy(policy.as_ref()).with_context(|| format!("arm `{}`", arm.name))?;
        let ids = tok
            .encode(text.as_str(), false)
            .map_err(|e| anyhow::anyhow!("tokenizing the corpus: {e}"))?
            .get_ids()
            .to_vec();
        let w = &cfg.workload;
        let wins = windows(&ids, w.prompts, w.prompt_tokens + w.continuation_tokens)?;
        let reqs: Vec<Request> = wins
            .iter()
            .enumerate()
            .map(|(i, win)| Request {
                id: i,
                prompt: win[..w.prompt_tokens].to_vec(),
                forced: Some(win[w.prompt_tokens..].to_vec()),
                policy: policy.clone(),
                params: None,
            })
            .collect();
        let params = GenParams::greedy(w.continuation_tokens, cfg.cache.prefill_chunk);
        let pb = bar(reqs.len() as u64, &arm.name);
        pb.set_message("quality");
        let (mut done, stats) =
            run_requests(engine, reqs, &params, w.concurrency, true, |n| pb.set_position(n as u64))?;
        pb.finish();
        // Baselines are indexed by prompt: order by request id, not by completion.
        done.sort_by_key(|f| f.id);
        let logs: Vec<Vec<Vec<f32>>> =
            done.iter().map(|f| f.step_logits.iter().map(|l| log_softmax(l)).collect()).collect();
        let (mut agree, mut kl_sum, mut nll, mut n) = (0usize, 0.0f64, 0.0f64, 0usize);
        let baseline = baselines.get(&source);
        for (fi, f) in done.iter().enumerate() {
            let forced = &wins[f.id][w.prompt_tokens..];
            for (s, lp) in logs[fi].iter().enumerate() {
                nll -= lp[forced[s] as usize] as f64;
                n += 1;
                if let Some(b) = baseline {
                    let bl = &b[fi][s];
                    agree += (crate::engine::argmax(bl) == crate::engine::argmax(lp)) as usize;
                    kl_sum += kl(bl, lp);
                }
            }
        }
        let confident = match baseline {
            Some(b) => {
                agreement::confident_agreement(b, &logs, agreement::CONFIDENT_TOKENS, agreement::CONFIDENT_MARGIN)
            }
            None => {
                agreement::confident_agreement(&logs, &logs, agreement::CONFIDENT_TOKENS, agreement::CONFIDENT_MARGIN)
            }
        };
        let has_baseline = baseline.is_some() || arm.is_full();
        if baseline.is_none() && arm.is_full() {
            agree = n;
            baselines.insert(source.clone(), logs);
        }
        let cr = mean_cr(&done);
        let capacity = match &cfg.capacity {
            Some(c) => Some(capacity_run(engine, c, &ids, &policy, cfg.cache.block_size, &arm.name)?),
            None => None,
        };
        by_index[ai] = Some(ArmResult {
            name: arm.name.clone(),
            model: source.clone(),
            weights: key.1.clone(),
            policy: policy.describe(),
            compression_ratio: cr,
            stats,
            top1_agreement: agree as f64 / n.max(1) as f64,
            confident_agreement: confident,
            mean_kl: kl_sum / n.max(1) as f64,
            perplexity: (nll / n.max(1) as f64).exp(),
            capacity,
            latent_factor: engine.model.config().latent_factor(),
            has_baseline,
            random_weights: engine.model.has_random_weights(),
        });
    }
    for r in by_index.into_iter().flatten() {
        results.push(r);
    }
    let mut peers = Vec::new();
    for arm in cfg.arms.iter().filter(|a| a.engine != "dms") {
        if arm.engine == "mistralrs" && !cfg!(feature = "mistralrs") {
            if arm.optional {
                eprintln!("skipping arm `{}`: this build has no mistral.rs (cargo feature `mistralrs`)", arm.name);
                continue;
            }
            bail!(
                "arm `{}` needs mistral.rs: build with `--features dms-integration/mistralrs` or mark the arm optional",
                arm.name
            );
        }
        let source = arm.model.clone().unwrap_or_else(|| cfg.model.source.clone());
        let weights = arm.weights(&cfg.model).to_string();
        let (engine, tok) = engines.get_mut(&(source.clone(), weights.clone(), "f32".into())).with_context(|| {
            format!("arm `{}`: no arm of this engine runs model {source} with weights = \"{weights}\"", arm.name)
        })?;
        let tok = tok.clone().context("the peer comparison needs a tokenizer")?;
        peers.push(peer_run(cfg, arm, engine, &tok, &text, &source)?);
    }
    Ok((results, peers))
}

fn mean_cr(done: &[Finished]) -> f64 {
    let v: Vec<f64> = done.iter().map(|f| f.shadow_compression_ratio.unwrap_or(f.compression_ratio)).collect();
    v.iter().sum::<f64>() / v.len().max(1) as f64
}

fn capacity_run(
    engine: &mut Engine,
    c: &Capacity,
    ids: &[u32],
    policy: &Arc<dyn PolicyFactory>,
    block_size: usize,
    label: &str,
) -> Result<BatchStats> {
    let (mc, kv) = (engine.model.config(), engine.store.dtype());
    let slot_bytes = kv.slot_bytes(mc.head_dim, mc.value_dim());
    let blocks = PoolSize::MiB(c.memory_mb).blocks(block_size, mc.num_layers * mc.num_kv_heads, slot_bytes);
    let pool = KvStore::with_dtype(mc.head_dim, mc.value_dim(), block_size, blocks, kv)?;
    let saved = std::mem::replace(&mut engine.store, pool);
    let wins = windows(ids, c.requests, c.prompt_tokens)?;
    let reqs: Vec<Request> = wins
        .into_iter()
        .enumerate()
        .map(|(i, p)| Request { id: i, prompt: p, forced: None, policy: policy.clone(), params: None })
        .collect();
    let params = GenParams::greedy(c.gen_tokens, 0);
    let pb = bar(reqs.len() as u64, label);
    pb.set_message("capacity");
    let r = run_requests(engine, reqs, &params, c.requests, false, |n| pb.set_position(n as u64));
    pb.finish();
    engine.store = saved;
    Ok(r?.1)
}

/// The table the `ab` command prints.
pub fn table(results: &[ArmResult]) -> String {
    let mut s = String::new();
    s.push_str("| arm | CR | KV saving vs per-head full (latent x CR) | KV live peak | KV alloc peak | KV live/alloc final | prefill tok/s | decode tok/s | top-1 agree | top-1 agree, confident | mean KL | PPL |");
    let cap = results.iter().any(|r| r.capacity.is_some());
    if cap {
        s.push_str(" seqs sustained (mean/max) | agg decode tok/s | preemptions |");
    }
    s.push('\n');
    s.push_str(&"|---".repeat(if cap { 15 } else { 12 }));
    s.push_str("|\n");
    for r in results {
        let last = r.stats.memory_trace.last().copied().unwrap_or_default();
        let (agree, confident, kl) = match (r.has_baseline, r.random_weights) {
            (true, false) => (
                format!("{:.3}", r.top1_agreement),
                format!("{}/{}", r.confident_agreement.0, r.confident_agreement.1),
                format!("{:.4}", r.mean_kl),
            ),
            (true, true) => ("n/a".into(), "n/a".into(), format!("{:.4}", r.mean_kl)),
            (false, _) => ("-".into(), "-".into(), "-".into()),
        };
        let ppl = if r.random_weights { "n/a".to_string() } else { format!("{:.2}", r.perplexity) };
        s.push_str(&format!(
            "| {} | {:.2} | {:.2}x ({:.2} x {:.2}) | {} | {} | {} / {} | {:.1} | {:.1} | {agree} | {confident} | {kl} | {ppl} |",
            r.name,
            r.compression_ratio,
            r.latent_factor * r.compression_ratio,
            r.latent_factor,
            r.compression_ratio,
            fmt_bytes(r.stats.peak_live),
            fmt_bytes(r.stats.peak_allocated),
            fmt_bytes(last.1),
            fmt_bytes(last.2),
            r.stats.prefill_tokens as f64 / r.stats.prefill_secs.max(1e-9),
            r.stats.decode_tok_s()
        ));
        if let Some(c) = &r.capacity {
            s.push_str(&format!(
                " {:.1} / {} | {:.1} | {} |",
                c.mean_running(),
                c.max_running,
                c.decode_tok_s(),
                c.preemptions
            ));
        }
        s.push('\n');
    }
    s
}

/// JSON of the results.
pub fn to_json(cfg: &AbConfig, results: &[ArmResult], peers: &[PeerResult]) -> serde_json::Value {
    // Each arm's speed relative to the full arm of its own model.
    let base_tps = |model: &str| {
        results
            .iter()
            .find(|r| r.model == model && r.has_baseline && r.top1_agreement == 1.0 && r.mean_kl == 0.0)
            .map(|r| r.stats.decode_tok_s())
    };
    json!({
        "model": cfg.model.source,
        "workload": {"corpus": cfg.workload.corpus, "prompts": cfg.workload.prompts, "prompt_tokens": cfg.workload.prompt_tokens,
                     "continuation_tokens": cfg.workload.continuation_tokens, "concurrency": cfg.workload.concurrency},
        "arms": results.iter().map(|r| json!({
            "name": r.name, "policy": r.policy, "compression_ratio": r.compression_ratio,
            "latent_factor": r.latent_factor, "kv_saving_vs_per_head_full": r.latent_factor * r.compression_ratio,
            "has_full_baseline": r.has_baseline,
            "kv_bytes_live_peak": r.stats.peak_live, "kv_bytes_allocated_peak": r.stats.peak_allocated,
            "kv_bytes_live_final": r.stats.memory_trace.last().map_or(0, |x| x.1),
            "kv_bytes_allocated_final": r.stats.memory_trace.last().map_or(0, |x| x.2),
            "prefill_tok_s": r.stats.prefill_tokens as f64 / r.stats.prefill_secs.max(1e-9),
            "decode_tok_s": r.stats.decode_tok_s(),
            "model": r.model, "weights": r.weights,
            "decode_tok_s_vs_baseline": base_tps(&r.model).map(|b| r.stats.decode_tok_s() / b),
            "random_weights": r.random_weights,
            "top1_agreement": (r.has_baseline && !r.random_weights).then_some(r.top1_agreement),
            "top1_agreement_confident": (r.has_baseline && !r.random_weights).then(|| json!({
                "agreeing": r.confident_agreement.0, "positions": r.confident_agreement.1,
                "first_tokens": agreement::CONFIDENT_TOKENS, "margin": agreement::CONFIDENT_MARGIN})),
            "mean_kl": r.has_baseline.then_some(r.mean_kl),
            "perplexity": (!r.random_weights).then_some(r.perplexity),
            "memory_trace": r.stats.memory_trace,
            "capacity": r.capacity.as_ref().map(|c| json!({"mean_running": c.mean_running(), "max_running": c.max_running,
                "decode_tok_s": c.decode_tok_s(), "preemptions": c.preemptions})),
        })).collect::<Vec<_>>(),
        "peers": peers.iter().map(|p| json!({
            "name": p.name, "mean_agreeing_prefix": p.mean_agreeing_prefix, "tokens_per_prompt": p.tokens_per_prompt,
            "first_divergence": p.first_divergence, "margin_at_divergence": p.margin_at_divergence, "ours_decode_tok_s": p.ours_decode_tok_s,
            "peer_decode_tok_s": p.peer_decode_tok_s, "decode_ratio_ours_over_peer": p.ours_decode_tok_s / p.peer_decode_tok_s.max(1e-9),
            "ours_prefill_tok_s": p.ours_prefill_tok_s, "peer_prefill_tok_s": p.peer_prefill_tok_s,
            "concurrent": p.concurrent.as_ref().map(|c| json!({"requests": c.requests, "ours_arm": c.ours,
                "ours_tok_s": c.ours_tok_s, "peer_tok_s": c.peer_tok_s, "ratio_ours_over_peer": c.ours_tok_s / c.peer_tok_s.max(1e-9)})),
        })).collect::<Vec<_>>(),
    })
}

/// Draws KV bytes live vs tokens generated, one line per arm, as SVG.
pub fn plot(results: &[ArmResult], path: &Path) -> Result<()> {
    use plotters::prelude::*;
    let root = SVGBackend::new(path, (900, 520)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow::anyhow!("{e}"))?;
    let max_x = results.iter().flat_map(|r| r.stats.memory_trace.iter().map(|p| p.0)).max().unwrap_or(1).max(1) as f64;
    let max_y = results.iter().flat_map(|r| r.stats.memory_trace.iter().map(|p| p.1)).max().unwrap_or(1).max(1) as f64
        / 1048576.0;
    let mut chart = ChartBuilder::on(&root)
        .caption("KV cache bytes live vs tokens generated", ("sans-serif", 22))
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..max_x * 1.02, 0f64..max_y * 1.1)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    chart
        .configure_mesh()
        .x_desc("tokens generated (all sequences)")
        .y_desc("KV live (MiB)")
        .draw()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    for (i, r) in results.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        let pts: Vec<(f64, f64)> =
            r.stats.memory_trace.iter().map(|&(x, y, _)| (x as f64, y as f64 / 1048576.0)).collect();
        chart
            .draw_series(LineSeries::new(pts, color.stroke_width(2)))
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .label(format!("{} (CR {:.2})", r.name, r.compression_ratio))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    root.present().map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(())
}

#[cfg(test)]
mod window_tests {
    use super::windows;

    #[test]
    fn windows_span_the_text_without_overlap_or_refuse() {
        let text: Vec<u32> = (0..100).collect();
        let w = windows(&text, 4, 25).unwrap();
        assert_eq!(w.iter().map(|w| w[0]).collect::<Vec<_>>(), [0, 25, 50, 75]);
        let w = windows(&text, 3, 10).unwrap();
        assert_eq!(w.iter().map(|w| w[0]).collect::<Vec<_>>(), [0, 45, 90]);
        let e = windows(&text, 5, 25).unwrap_err().to_string();
        assert!(e.contains("fewer than 5 non-overlapping windows of 25"), "{e}");
        assert!(windows(&text, 1, 101).unwrap_err().to_string().contains("fewer than one window"));
    }
}
