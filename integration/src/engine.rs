//! Loading a model and generating text through the policy-driven cache.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use dms_policy::{CacheShape, PolicyFactory, SignalNeed};
use rand::{rngs::StdRng, Rng};
use tokenizers::Tokenizer;

use crate::cache::SequenceCache;
use crate::chat_template::ChatTemplate;
use crate::kv_store::{KvStore, MemoryUsage};
use crate::model::{DecisionSource, Llama, ModelConfig, SeqInput, Weights};

/// A model with its tokenizer (when it has one).
pub struct LoadedModel {
    /// The runtime.
    pub model: Llama,
    /// Tokenizer from `tokenizer.json` or GGUF metadata.
    pub tokenizer: Option<Tokenizer>,
    /// Chat template from the GGUF metadata or `tokenizer_config.json`, when the model ships one.
    pub chat_template: Option<ChatTemplate>,
}

/// Loads an HF-style directory (config.json, *.safetensors, optional tokenizer.json), a GGUF file,
/// or, given a bare `config.json` file, a model of that shape with random weights (for speed and
/// memory work only; a `tokenizer.json` beside it is used if present).
pub fn load_model(path: &Path, device: &Device, round_f16: bool) -> Result<LoadedModel> {
    if path.is_file() && path.extension().is_some_and(|x| x == "json") {
        let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
        let cfg = ModelConfig::from_hf_json(&text).with_context(|| format!("in {}", path.display()))?;
        check_fits_in_memory(cfg.approx_weight_count() * 4)
            .with_context(|| format!("random weights for {}", path.display()))?;
        eprintln!("model {}: RANDOM weights of this shape (speed and memory work only)", path.display());
        let model = Llama::random(cfg, device, candle_core::DType::F32)?;
        let tok_path = path.with_file_name("tokenizer.json");
        let tokenizer = if tok_path.exists() {
            Some(Tokenizer::from_file(&tok_path).map_err(|e| anyhow::anyhow!("{}: {e}", tok_path.display()))?)
        } else {
            None
        };
        let chat_template = ChatTemplate::from_hf_dir(path.parent().unwrap_or(Path::new(".")))?;
        return Ok(LoadedModel { model, tokenizer, chat_template });
    }
    if path.is_dir() {
        let cfg_path = path.join("config.json");
        let text = std::fs::read_to_string(&cfg_path)
            .with_context(|| format!("model directory {} has no readable config.json", path.display()))?;
        let cfg = ModelConfig::from_hf_json(&text).with_context(|| format!("in {}", cfg_path.display()))?;
        let mut shards: Vec<PathBuf> = std::fs::read_dir(path)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
            .collect();
        shards.sort();
        if shards.is_empty() {
            bail!("model directory {} has no .safetensors files", path.display());
        }
        let weights = Weights::open_safetensors(&shards)?;
        let model = Llama::load(cfg, &weights, device, round_f16)?;
        let tok_path = path.join("tokenizer.json");
        let tokenizer = if tok_path.exists() {
            Some(Tokenizer::from_file(&tok_path).map_err(|e| anyhow::anyhow!("{}: {e}", tok_path.display()))?)
        } else {
            None
        };
        let chat_template = ChatTemplate::from_hf_dir(path)?;
        Ok(LoadedModel { model, tokenizer, chat_template })
    } else if path.is_file() {
        let (weights, cfg) = Weights::open_gguf(path)?;
        let (tokenizer, chat_template) = match &weights {
            Weights::Gguf { content, .. } => {
                (Some(crate::gguf_tokenizer::from_gguf(content)?), ChatTemplate::from_gguf(content)?)
            }
            Weights::Safetensors { .. } => (None, None),
        };
        let model = Llama::load(cfg, &weights, device, round_f16)?;
        Ok(LoadedModel { model, tokenizer, chat_template })
    } else {
        bail!("model path {} does not exist (expected a GGUF file or an HF-style directory)", path.display())
    }
}

/// Refuses an allocation of `bytes` that exceeds the machine's physical memory (read from
/// `/proc/meminfo`; no limit where it cannot be read): the allocator would abort the process.
fn check_fits_in_memory(bytes: u128) -> Result<()> {
    let total_kib = std::fs::read_to_string("/proc/meminfo").ok().and_then(|m| {
        m.lines().find_map(|l| l.strip_prefix("MemTotal:")?.trim().strip_suffix("kB")?.trim().parse::<u128>().ok())
    });
    if let Some(kib) = total_kib.filter(|&k| bytes > k * 1024) {
        bail!(
            "a model of this shape needs about {:.1} GiB, more than this machine's {:.1} GiB of memory",
            bytes as f64 / (1u64 << 30) as f64,
            kib as f64 / (1u64 << 20) as f64
        );
    }
    Ok(())
}

/// Sampling and stopping settings.
#[derive(Debug, Clone)]
pub struct GenParams {
    /// Tokens to generate at most.
    pub max_tokens: usize,
    /// 0 = greedy.
    pub temperature: f64,
    /// Nucleus sampling mass.
    pub top_p: f64,
    /// RNG seed.
    pub seed: u64,
    /// Stop at an end-of-sequence token.
    pub stop_at_eos: bool,
    /// Prompt tokens per prefill chunk (0 = the whole prompt at once).
    pub prefill_chunk: usize,
}

/// What one generation produced and measured.
#[derive(Debug, Clone)]
pub struct Generation {
    /// Prompt length.
    pub prompt_tokens: usize,
    /// Generated token ids.
    pub tokens: Vec<u32>,
    /// Seconds spent in prefill.
    pub prefill_secs: f64,
    /// Seconds spent in decode steps.
    pub decode_secs: f64,
    /// Decode steps run (tokens fed back).
    pub decode_steps: usize,
    /// Memory at the end.
    pub usage: MemoryUsage,
    /// Peak allocated bytes.
    pub peak_allocated: u64,
    /// Compression ratio at the end (spec rule 6).
    pub compression_ratio: f64,
    /// Kept fraction (kept slots / tokens seen) per layer at the end.
    pub layer_kept_fraction: Vec<f64>,
    /// Logits that produced each generated token (`[vocab]` each), when requested.
    pub step_logits: Vec<Vec<f32>>,
}

/// A model, a block pool and a policy.
pub struct Engine {
    /// The runtime.
    pub model: Llama,
    /// The paged store.
    pub store: KvStore,
    /// The configured policy.
    pub policy: Arc<dyn PolicyFactory>,
    /// Keep every step's logits in [`Generation::step_logits`].
    pub keep_logits: bool,
}

impl Engine {
    /// An engine whose pool holds `capacity_blocks` blocks of `block_size` tokens.
    pub fn new(
        model: Llama,
        policy: Arc<dyn PolicyFactory>,
        block_size: usize,
        capacity_blocks: usize,
    ) -> Result<Self> {
        check_signal(&model, policy.as_ref())?;
        let store =
            KvStore::with_value_dim(model.config().head_dim, model.config().value_dim(), block_size, capacity_blocks);
        Ok(Self { model, store, policy, keep_logits: false })
    }

    /// Bytes of K+V for one token in every row of every layer.
    pub fn bytes_per_token(&self) -> u64 {
        let c = self.model.config();
        (c.num_layers * c.num_kv_heads) as u64 * self.store.slot_bytes()
    }

    /// Creates the cache rows of a new sequence under the engine's policy.
    pub fn new_sequence(&mut self) -> SequenceCache {
        let policy = self.policy.clone();
        self.new_sequence_with(policy.as_ref())
    }

    /// Creates the cache rows of a new sequence under its own policy (per-request A/B).
    pub fn new_sequence_with(&mut self, policy: &dyn PolicyFactory) -> SequenceCache {
        let c = self.model.config();
        let shape = CacheShape { n_layers: c.num_layers, rows_per_layer: c.num_kv_heads };
        SequenceCache::new(policy, shape, &mut self.store)
    }

    /// Checks that the model can feed a policy the signal it needs.
    pub fn check_policy(&self, policy: &dyn PolicyFactory) -> Result<()> {
        check_signal(&self.model, policy)
    }

    /// Runs `tokens` of one sequence through the model; returns the last position's logits
    /// (`[1, vocab]`), or every position's when `all_logits`.
    pub fn step(&mut self, seq: &mut SequenceCache, tokens: &[u32], all_logits: bool) -> Result<Tensor> {
        let mut inputs = [SeqInput { tokens, cache: seq }];
        let mut out = self.model.forward(&mut inputs, &mut self.store, all_logits)?;
        Ok(out.pop().expect("one sequence in, one out"))
    }
}

fn check_signal(model: &Llama, policy: &dyn PolicyFactory) -> Result<()> {
    if policy.signal_need() == SignalNeed::DecisionScores && matches!(model.decision_source(), DecisionSource::None) {
        bail!(
            "cache policy `{}` needs learned DMS decisions but the model has none (no dms_* fields or \
             dms_proj_alpha tensors): use a DMS checkpoint, set `adapter = \"DIR\"` in [cache.policy], \
             or choose `decision = \"key_norm\"` or `decision = \"random\"`",
            policy.name()
        );
    }
    Ok(())
}

/// Greedy when `temperature == 0`, else temperature + top-p sampling.
pub fn sample(logits: &[f32], p: &GenParams, rng: &mut StdRng) -> u32 {
    if p.temperature <= 0.0 {
        return argmax(logits);
    }
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let mut probs: Vec<(u32, f64)> =
        logits.iter().enumerate().map(|(i, &l)| (i as u32, ((l as f64 - max) / p.temperature).exp())).collect();
    let total: f64 = probs.iter().map(|x| x.1).sum();
    probs.sort_by(|a, b| b.1.total_cmp(&a.1));
    let mut kept = Vec::new();
    let mut mass = 0.0;
    for (i, w) in probs {
        kept.push((i, w / total));
        mass += w / total;
        if mass >= p.top_p {
            break;
        }
    }
    let mut r = rng.random::<f64>() * mass;
    for &(i, w) in &kept {
        if r < w {
            return i;
        }
        r -= w;
    }
    kept.last().map(|x| x.0).unwrap_or(0)
}

/// Index of the largest logit (first on ties).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}
