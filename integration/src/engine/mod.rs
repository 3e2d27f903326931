//! The engine: a model, a block pool and a policy, executing the steps the scheduler plans.
//!
//! [`scheduler`] plans (admission, preemption, which sequences decode) from the
//! [`block_manager`]'s view of the pool, and the engine executes ([`Engine::prefill`],
//! [`Engine::decode`]: the model's batched forward over the store), through the
//! [`batch_engine::BatchEngine`] seam that the device cache implements too ([`host_batch`] is the
//! host's side); the scheduler never runs the model itself, and [`prefix_cache`] keeps the
//! states it may start prompts from. [`generation`] serves one
//! prompt through the scheduler; [`from_config`] builds an engine from a config file with one
//! pool-sizing rule; [`load`] reads models, [`sampling`] picks tokens, [`trace`] writes traces and
//! [`report`] the summary lines.

pub mod batch;
pub mod batch_engine;
pub mod block_manager;
pub mod constraint;
pub mod from_config;
pub mod gbnf;
pub mod generation;
pub mod host_batch;
mod load;
pub mod prefix_cache;
pub mod report;
mod sampling;
pub mod scheduler;
pub mod trace;

pub use load::{load_model, physical_memory_bytes, LoadedModel};
pub use sampling::{argmax, sample, token_logprobs, LogitAdjustments, TokenLogprobs};

use std::sync::Arc;

use anyhow::{bail, Context, Result};
use candle_core::Tensor;
use dms_policy::{CacheShape, PolicyFactory, SignalNeed};

use crate::kv::host_step::{self, SeqInput};
use crate::kv::sequence::SequenceCache;
use crate::kv::store::{KvDtype, KvStore, MemoryUsage};
use crate::model::{DecisionSource, Llama};
use batch_engine::Preemption;

/// Most prompt tokens per pass when a prompt is scored ([`Engine::prefill_scored`]): every
/// position's logits are kept for the pass (256 x a 152K vocabulary: 156 MB).
pub const SCORED_CHUNK: usize = 256;
use block_manager::BlockManager;

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
    /// Sample among the `top_k` most likely tokens only (0 = all).
    pub top_k: usize,
    /// Sample among the tokens at least `min_p` times as likely as the most likely one (0 = all).
    pub min_p: f64,
    /// End-of-sequence and `stop_token_ids` tokens are not chosen before this many tokens.
    pub min_tokens: usize,
    /// Tokens that end generation besides the model's end-of-sequence tokens.
    pub stop_token_ids: Vec<u32>,
}

impl Default for GenParams {
    /// Greedy, no tokens, stopping at end-of-sequence, every filter off.
    fn default() -> Self {
        Self {
            max_tokens: 0,
            temperature: 0.0,
            top_p: 1.0,
            seed: 0,
            stop_at_eos: true,
            prefill_chunk: 0,
            top_k: 0,
            min_p: 0.0,
            min_tokens: 0,
            stop_token_ids: Vec::new(),
        }
    }
}

impl GenParams {
    /// Greedy decoding of `max_tokens` tokens, past end-of-sequence (the harnesses' setting:
    /// every arm generates the same number of tokens).
    pub fn greedy(max_tokens: usize, prefill_chunk: usize) -> Self {
        Self { max_tokens, stop_at_eos: false, prefill_chunk, ..Default::default() }
    }
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
    /// How a preempted sequence gives its blocks back (`[cache] preemption`).
    pub preemption: Preemption,
    /// Device-cache decode steps replay CUDA graphs (`[cache] cuda_graphs`).
    pub cuda_graphs: bool,
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
        Ok(Self { model, store, policy, keep_logits: false, preemption: Preemption::Swap, cuda_graphs: false })
    }

    /// The same engine storing keys and values as `dtype` (its pool emptied, same block count);
    /// an error when `dtype` cannot hold this model's rows.
    pub fn with_kv_dtype(mut self, dtype: KvDtype) -> Result<Self> {
        let (c, s) = (self.model.config(), &self.store);
        self.store = KvStore::with_dtype(c.head_dim, c.value_dim(), s.block_size(), s.capacity_blocks(), dtype)?;
        Ok(self)
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
        SequenceCache::new(policy, shape, c.windows.as_ref(), &mut self.store)
    }

    /// Checks that the model can feed a policy the signal it needs.
    pub fn check_policy(&self, policy: &dyn PolicyFactory) -> Result<()> {
        check_signal(&self.model, policy)
    }

    /// Runs `tokens` of one sequence through the model; returns the last position's logits
    /// (`[1, vocab]`), or every position's when `all_logits`.
    pub fn step(&mut self, seq: &mut SequenceCache, tokens: &[u32], all_logits: bool) -> Result<Tensor> {
        let mut inputs = [SeqInput { tokens, cache: seq }];
        let mut out = host_step::forward(&self.model, &mut inputs, &mut self.store, all_logits)?;
        Ok(out.pop().expect("one sequence in, one out"))
    }

    /// The block arithmetic for this engine's sequences and pool.
    pub fn block_manager(&self) -> BlockManager {
        let c = self.model.config();
        BlockManager::new(c.num_layers * c.num_kv_heads, &self.store)
    }

    /// Prefills `prompt` into `seq` in chunks of `chunk` tokens (0: one pass); returns the last
    /// position's next-token logits.
    pub fn prefill(&mut self, seq: &mut SequenceCache, prompt: &[u32], chunk: usize) -> Result<Vec<f32>> {
        if prompt.is_empty() {
            bail!("the prompt is empty");
        }
        let chunk = if chunk == 0 { prompt.len() } else { chunk };
        let mut last = None;
        for part in prompt.chunks(chunk) {
            last = Some(self.step(seq, part, false)?);
        }
        Ok(last.expect("prompt is not empty").squeeze(0)?.to_vec1::<f32>()?)
    }

    /// [`Self::prefill`] that also scores the prompt: each token after the first gets its
    /// log-probability under the logits before it, with the `top` most likely tokens. Chunks are
    /// at most [`SCORED_CHUNK`] tokens, so that their logits (`[chunk, vocab]`) stay small.
    pub fn prefill_scored(
        &mut self,
        seq: &mut SequenceCache,
        prompt: &[u32],
        chunk: usize,
        top: usize,
    ) -> Result<(Vec<f32>, Vec<TokenLogprobs>)> {
        if prompt.is_empty() {
            bail!("the prompt is empty");
        }
        let chunk = if chunk == 0 { SCORED_CHUNK } else { chunk.min(SCORED_CHUNK) };
        let mut scored = Vec::with_capacity(prompt.len() - 1);
        let mut last = Vec::new();
        for (c, part) in prompt.chunks(chunk).enumerate() {
            let rows = self.step(seq, part, true)?.to_vec2::<f32>()?;
            for (i, row) in rows.iter().enumerate() {
                if let Some(&next) = prompt.get(c * chunk + i + 1) {
                    scored.push(token_logprobs(row, next, top));
                }
            }
            last = rows.into_iter().last().unwrap_or_default();
        }
        Ok((last, scored))
    }

    /// One batched decode step: feeds `tokens[i]` to `seqs[i]`; returns each sequence's
    /// next-token logits.
    pub fn decode(&mut self, seqs: Vec<&mut SequenceCache>, tokens: &[u32]) -> Result<Vec<Vec<f32>>> {
        if seqs.len() != tokens.len() {
            bail!("{} sequences but {} tokens in a decode step", seqs.len(), tokens.len());
        }
        let mut inputs: Vec<SeqInput> = seqs
            .into_iter()
            .zip(tokens)
            .map(|(cache, t)| SeqInput { tokens: std::slice::from_ref(t), cache })
            .collect();
        let logits = host_step::forward(&self.model, &mut inputs, &mut self.store, false)?;
        logits.into_iter().map(|l| Ok(l.squeeze(0)?.to_vec1::<f32>()?)).collect()
    }
}

/// Checks that `model` can feed `policy` the signal it needs (learned decisions need a DMS
/// decision source, and the adapter the policy names).
pub(crate) fn check_signal(model: &Llama, policy: &dyn PolicyFactory) -> Result<()> {
    if policy.signal_need() != SignalNeed::DecisionScores {
        return Ok(());
    }
    if matches!(model.decision_source(), DecisionSource::Adapter) {
        model.adapter_index(policy.adapter()).with_context(|| format!("cache policy `{}`", policy.name()))?;
    }
    if matches!(model.decision_source(), DecisionSource::None) {
        bail!(
            "cache policy `{}` needs learned DMS decisions but the model has none (no dms_* fields or \
             dms_proj_alpha tensors): use a DMS checkpoint, set `adapter = \"DIR\"` in [cache.policy], \
             or choose `decision = \"key_norm\"` or `decision = \"random\"`",
            policy.name()
        );
    }
    Ok(())
}
