//! The engine config file: model, device, cache and policy in one TOML file.
//!
//! Every table rejects unknown keys and every value is range-checked; errors name the key.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::Deserialize;

use crate::engine::batch_engine::Preemption;

/// The whole engine config file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EngineConfig {
    /// `[model]`.
    pub model: ModelSection,
    /// `[cache]`.
    #[serde(default)]
    pub cache: CacheSection,
    /// `[generation]`.
    #[serde(default)]
    pub generation: GenerationSection,
    /// `[server]` (used by `dms serve` only).
    #[serde(default)]
    pub server: crate::serve::settings::ServerSection,
    /// Directory of the file, for relative model paths.
    #[serde(skip)]
    pub base_dir: Option<PathBuf>,
}

/// `[model]`: which weights, in which precision, on which device.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    /// A packaged model alias (`smollm2-135m`), a GGUF file or an HF-style directory.
    pub source: String,
    /// Compute precision: `f32` (CPU).
    #[serde(default = "default_dtype")]
    pub dtype: String,
    /// `cpu`, or `cuda:N` with the `cuda` feature.
    #[serde(default = "default_device")]
    pub device: String,
    /// How linear layers hold their weights: `dense` (dequantized to f32), `quantized` (GGUF
    /// block formats, repacked to Q8_0 where candle has no vectorised kernel), or a format every
    /// layer is requantized into (`q8_0`, `q4_0`, `q4_k`, ...). See [`crate::model::WeightForm`].
    #[serde(default = "default_weights")]
    pub weights: String,
    /// The most tokens a sequence may hold (prompt and answer), as vLLM's `max_model_len`: at
    /// most what the model serves, except under LongRoPE, where up to the declared context is
    /// allowed and a context past the original one rotates every position by the long factors
    /// (as llama.cpp's `n_ctx` does). Unset: what the model serves.
    #[serde(default)]
    pub context: Option<usize>,
}

impl ModelSection {
    /// Applies [`Self::context`] to `model`, where it is set; says when a LongRoPE model could
    /// serve more than it does.
    pub fn apply_context(&self, model: &mut crate::model::Llama) -> Result<()> {
        if let Some(tokens) = self.context {
            return model.set_context(tokens).context("[model] context");
        }
        let (served, limit) = (model.config().max_position_embeddings, model.config().context_limit());
        if limit > served {
            eprintln!(
                "model: serving {served} tokens (LongRoPE's original context); [model] context = {limit} serves its \
                 declared context, every position then rotated by the long factors"
            );
        }
        Ok(())
    }

    /// The element type the model computes in: `f32`, or `bf16` on a CUDA device.
    pub fn compute_dtype(&self) -> Result<candle_core::DType> {
        let on_gpu = device_ordinal(&self.device)?.is_some();
        match self.dtype.as_str() {
            "f32" => Ok(candle_core::DType::F32),
            "bf16" if on_gpu => Ok(candle_core::DType::BF16),
            "bf16" | "f16" => bail!(
                "[model] dtype `{}` is not supported here: the CPU runtime computes in f32 (bf16 needs a CUDA device)",
                self.dtype
            ),
            other => bail!("[model] dtype `{other}` is unknown (valid: f32, or bf16 on a CUDA device)"),
        }
    }
}

/// `[cache]`: block pool and policy.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheSection {
    /// Tokens per block.
    #[serde(default = "default_block_size")]
    pub block_size: usize,
    /// Pool size in MiB (exclusive with `max_tokens`).
    #[serde(default)]
    pub memory_mb: Option<u64>,
    /// Pool size as the tokens one full-cache sequence could hold (exclusive with `memory_mb`).
    #[serde(default)]
    pub max_tokens: Option<u64>,
    /// Prompt tokens per prefill chunk (0 = the whole prompt in one pass).
    #[serde(default)]
    pub prefill_chunk: usize,
    /// Element type of the host store's keys and values: `f32` (exact) or `f16` (half the
    /// bytes). CPU only; a GPU cache stores the model's dtype.
    #[serde(default = "default_kv_dtype")]
    pub kv_dtype: String,
    /// How a preempted sequence gives its blocks back: `swap` (its rows are copied to host
    /// memory and back) or `recompute` (dropped, then its prompt and generated tokens are
    /// prefilled again; what the device cache does).
    #[serde(default)]
    pub preemption: Preemption,
    /// Replay the device cache's decode steps from CUDA graphs (a CUDA device only): each batch
    /// composition's first step runs kernel by kernel, its second is captured, later ones replay.
    #[serde(default)]
    pub cuda_graphs: bool,
    /// `[cache.policy]`: `name` plus the policy's own keys.
    #[serde(default = "default_policy")]
    pub policy: toml::Table,
}

/// `[generation]`: sampling and stopping.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GenerationSection {
    /// Tokens to generate at most.
    #[serde(default = "default_max_tokens")]
    pub max_tokens: usize,
    /// 0 = greedy.
    #[serde(default)]
    pub temperature: f64,
    /// Nucleus mass in (0, 1].
    #[serde(default = "default_top_p")]
    pub top_p: f64,
    /// Sample among the `top_k` most likely tokens only (0 = all).
    #[serde(default)]
    pub top_k: usize,
    /// Sample among the tokens at least `min_p` times as likely as the most likely one, in [0, 1]
    /// (0 = all).
    #[serde(default)]
    pub min_p: f64,
    /// RNG seed.
    #[serde(default)]
    pub seed: u64,
    /// Stop at the model's end-of-sequence token.
    #[serde(default = "default_true")]
    pub stop_at_eos: bool,
    /// Wrap prompts in the model's chat template (plain ChatML when it ships none).
    #[serde(default)]
    pub chat: bool,
}

fn default_dtype() -> String {
    "f32".into()
}
fn default_device() -> String {
    "cpu".into()
}
fn default_kv_dtype() -> String {
    "f32".into()
}
fn default_weights() -> String {
    "dense".into()
}
fn default_block_size() -> usize {
    16
}
fn default_max_tokens() -> usize {
    64
}
fn default_top_p() -> f64 {
    1.0
}
fn default_true() -> bool {
    true
}
fn default_policy() -> toml::Table {
    let mut t = toml::Table::new();
    t.insert("name".into(), toml::Value::String("full".into()));
    t
}

impl Default for CacheSection {
    fn default() -> Self {
        Self {
            block_size: 16,
            memory_mb: None,
            max_tokens: None,
            prefill_chunk: 0,
            kv_dtype: default_kv_dtype(),
            preemption: Preemption::default(),
            cuda_graphs: false,
            policy: default_policy(),
        }
    }
}

impl Default for GenerationSection {
    fn default() -> Self {
        Self {
            max_tokens: 64,
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            min_p: 0.0,
            seed: 0,
            stop_at_eos: true,
            chat: false,
        }
    }
}

/// Largest `[cache] block_size` accepted (a block is allocated whole).
pub const MAX_BLOCK_SIZE: usize = 1 << 16;

/// Default pool size when neither `memory_mb` nor `max_tokens` is given.
pub const DEFAULT_MEMORY_MB: u64 = 1024;

impl EngineConfig {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("cannot read config file {}", path.display()))?;
        let mut cfg = Self::parse(&text).with_context(|| format!("invalid config file {}", path.display()))?;
        cfg.base_dir = path.parent().map(Path::to_path_buf);
        Ok(cfg)
    }

    /// Parses and validates config text.
    pub fn parse(text: &str) -> Result<Self> {
        let cfg: EngineConfig = toml::from_str(text).map_err(|e| anyhow::anyhow!("{e}"))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Range-checks every value.
    pub fn validate(&self) -> Result<()> {
        let c = &self.cache;
        if c.block_size == 0 || c.block_size > MAX_BLOCK_SIZE {
            bail!("[cache] block_size must be between 1 and {MAX_BLOCK_SIZE}");
        }
        if c.memory_mb.is_some() && c.max_tokens.is_some() {
            bail!("[cache] memory_mb and max_tokens are mutually exclusive: set one");
        }
        if c.memory_mb == Some(0) {
            bail!("[cache] memory_mb must be positive");
        }
        if c.max_tokens == Some(0) {
            bail!("[cache] max_tokens must be positive");
        }
        let g = &self.generation;
        if g.max_tokens == 0 {
            bail!("[generation] max_tokens must be at least 1");
        }
        if !(g.temperature >= 0.0 && g.temperature.is_finite()) {
            bail!("[generation] temperature must be a finite number >= 0");
        }
        if !(g.top_p > 0.0 && g.top_p <= 1.0) {
            bail!("[generation] top_p must be in (0, 1]");
        }
        if !(0.0..=1.0).contains(&g.min_p) {
            bail!("[generation] min_p must be in [0, 1]");
        }
        self.model.compute_dtype()?;
        let on_gpu = device_ordinal(&self.model.device)?.is_some();
        if self.model.source.trim().is_empty() {
            bail!("[model] source is empty");
        }
        let kv = self.kv_dtype()?;
        if on_gpu && kv != crate::kv::store::KvDtype::F32 {
            bail!(
                "[cache] kv_dtype = \"{}\" is for the CPU store; a GPU cache stores the model's dtype",
                self.cache.kv_dtype
            );
        }
        if self.weight_form()?.is_quantized() && (on_gpu || self.model.dtype != "f32") {
            bail!(
                "[model] weights = \"{}\" runs on the CPU in f32; use weights = \"dense\" with device `{}` and dtype `{}`",
                self.model.weights,
                self.model.device,
                self.model.dtype
            );
        }
        self.server.validate()
    }

    /// `[cache] kv_dtype` parsed.
    pub fn kv_dtype(&self) -> Result<crate::kv::store::KvDtype> {
        crate::kv::store::KvDtype::parse(&self.cache.kv_dtype).map_err(anyhow::Error::msg)
    }

    /// `[model] weights` parsed.
    pub fn weight_form(&self) -> Result<crate::model::WeightForm> {
        crate::model::WeightForm::parse(&self.model.weights)
    }

    /// The pool size `[cache]` asks for.
    pub fn pool_size(&self) -> PoolSize {
        match (self.cache.memory_mb, self.cache.max_tokens) {
            (_, Some(tokens)) => PoolSize::Tokens { tokens, sequences: 1 },
            (mb, None) => PoolSize::MiB(mb.unwrap_or(DEFAULT_MEMORY_MB) as f64),
        }
    }

    /// Pool capacity in blocks for a model with these per-token sizes (`slot_bytes`: bytes of one
    /// token in one row, keys plus values).
    pub fn capacity_blocks(&self, n_layers: usize, n_kv_heads: usize, slot_bytes: u64) -> usize {
        self.pool_size().blocks(self.cache.block_size, n_layers * n_kv_heads, slot_bytes)
    }
}

/// The size of a KV block pool. [`PoolSize::blocks`] is the one rule every engine, harness and
/// device cache uses to turn it into blocks.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum PoolSize {
    /// A memory budget in MiB.
    MiB(f64),
    /// Room for `sequences` sequences of `tokens` tokens each with a full cache.
    Tokens {
        /// Tokens per sequence.
        tokens: u64,
        /// Sequences.
        sequences: usize,
    },
}

impl PoolSize {
    /// Blocks of `block_size` slots, for sequences of `rows_per_sequence` rows whose slots hold
    /// `slot_bytes` bytes each. Saturating: a pool larger than addressable memory is simply
    /// unbounded (the store grows block by block as rows need it).
    pub fn blocks(&self, block_size: usize, rows_per_sequence: usize, slot_bytes: u64) -> usize {
        match *self {
            PoolSize::Tokens { tokens, sequences } => usize::try_from(tokens)
                .unwrap_or(usize::MAX)
                .div_ceil(block_size)
                .saturating_mul(rows_per_sequence)
                .saturating_mul(sequences),
            PoolSize::MiB(mb) => {
                let block_bytes = (block_size as u64).saturating_mul(slot_bytes).max(1);
                (mb.max(0.0) * (1024.0 * 1024.0) / block_bytes as f64) as usize
            }
        }
    }
}

/// Checks a device string: `None` for `cpu`, the ordinal for `cuda:N`.
pub fn device_ordinal(s: &str) -> Result<Option<usize>> {
    if s == "cpu" {
        return Ok(None);
    }
    if let Some(n) = s.strip_prefix("cuda:").or(if s == "cuda" { Some("0") } else { None }) {
        let n: usize = n.parse().with_context(|| format!("[model] device `{s}`: bad ordinal"))?;
        if !cfg!(feature = "cuda") {
            bail!("[model] device `{s}` needs a build with `--features cuda`");
        }
        return Ok(Some(n));
    }
    bail!("[model] device `{s}` is unknown (valid: cpu, cuda:N)")
}

/// Opens the device a config names.
pub fn open_device(s: &str) -> Result<candle_core::Device> {
    match device_ordinal(s)? {
        None => Ok(candle_core::Device::Cpu),
        Some(n) => candle_core::Device::new_cuda(n).with_context(|| format!("cannot open device `{s}`")),
    }
}

/// Opens the CUDA device a config names for decode steps replayed from CUDA graphs
/// (`gpu::graph::graph_device`); any other device is an error naming `[cache] cuda_graphs`.
pub fn open_graph_device(s: &str) -> Result<candle_core::Device> {
    match device_ordinal(s)? {
        None => bail!(
            "[cache] cuda_graphs = true replays the device cache's decode steps, which needs [model] device = \
             \"cuda:N\" (this config runs on `{s}`)"
        ),
        #[cfg(feature = "cuda")]
        Some(n) => crate::gpu::graph::graph_device(n).with_context(|| format!("cannot open device `{s}`")),
        #[cfg(not(feature = "cuda"))]
        Some(_) => bail!("[cache] cuda_graphs = true needs a build with --features cuda"),
    }
}
