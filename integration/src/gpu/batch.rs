//! The device cache as a [`BatchEngine`]: the one scheduler's sequences join a running device
//! batch when the free device blocks hold their prompt (plus one block per row of every running
//! sequence and of the new one, the [`BlockManager`]'s rule: the device's row lengths are not
//! read back each step), decode together one token each per step with the DMS bookkeeping in the
//! kernels, and leave when they finish, their blocks going back to the device free list. A
//! preempted sequence is dropped and recomputed: it re-enters with its prompt and the tokens it
//! had generated as one masked prompt pass (rule 4: the same kept set as decoding them), so
//! greedy output resumes unchanged. Each sequence runs its own request's device program and reads
//! its own adapter, so requests with different policies (full, DMS with its window, sinks,
//! decisions and adapter, LoRA or not) decode together.

use std::convert::Infallible;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor};

use super::{GpuCache, GpuCacheShape};
use crate::engine::batch_engine::{BatchEngine, Parked, PoolUsage, SeqReport, Started};
use crate::engine::block_manager::BlockManager;
use crate::engine::scheduler::Request;
use crate::engine::Engine;
use crate::gpu::graph::CapturedStep;
use crate::gpu::policy::DevicePolicy;
use crate::gpu::slot_map::SlotMap;
use crate::gpu::split_plan::captured_plan;
use crate::kv::store::MemoryUsage;
use crate::model::Llama;

/// Where the device engine keeps its cache.
#[derive(Debug, Clone, Copy)]
pub struct DeviceBatchShape {
    /// Slots per block.
    pub block_size: usize,
    /// Blocks in the device pool (the memory budget).
    pub capacity_blocks: usize,
    /// Sequences decoding at once, at most (the cache's sequence slots).
    pub max_batch: usize,
    /// Longest sequence (prompt + generated tokens) a request may reach.
    pub max_tokens_per_sequence: usize,
    /// Longest DMS window a request's program may have (the cache's rings hold W + 1 tokens).
    pub max_window: usize,
    /// Replay decode steps from CUDA graphs ([`crate::gpu::graph`]): a batch's first step runs
    /// kernel by kernel, its second is captured, later ones replay the capture.
    pub cuda_graphs: bool,
}

impl DeviceBatchShape {
    /// A device batch with the memory budget of `engine`'s host pool, in the model's dtype (a
    /// bf16 model's device pool holds twice the f32 host pool's blocks); decode steps replay
    /// CUDA graphs as `engine.cuda_graphs` says.
    pub fn with_host_budget(
        engine: &Engine,
        max_batch: usize,
        max_tokens_per_sequence: usize,
        max_window: usize,
    ) -> Self {
        let store = &engine.store;
        let budget = store.capacity_blocks() as u64 * store.block_size() as u64 * store.slot_bytes();
        let device_slot = engine.model.config().row_bytes(engine.model.dtype().size_in_bytes());
        Self {
            block_size: store.block_size(),
            capacity_blocks: (budget / (store.block_size() as u64 * device_slot)) as usize,
            max_batch,
            max_tokens_per_sequence,
            max_window,
            cuda_graphs: engine.cuda_graphs,
        }
    }
}

/// What a captured decode step fixes of its batch: the rows its attention plans for, and per
/// slot the adapter its sequence reads and whether its decisions need the model's scores, and
/// its keys' norms.
#[derive(Debug, Clone, PartialEq)]
struct BatchKey {
    plan: usize,
    slots: Vec<(Option<String>, bool, bool)>,
}

/// Captures this many batch compositions at most (the oldest goes first).
const MAX_CAPTURES: usize = 8;

/// The CUDA graphs of a device engine: the batches that ran one eager step with the captures'
/// split plan (the next step of such a batch is captured), the captures, and the batches whose
/// capture failed (they run kernel by kernel from then on).
#[derive(Default)]
struct Graphs {
    primed: Vec<BatchKey>,
    captured: Vec<(BatchKey, CapturedStep)>,
    failed: Vec<BatchKey>,
    /// Steps replayed from a capture, and captures that failed, so far.
    replays: usize,
    failures: usize,
}

impl Graphs {
    /// Keeps `item` among the last [`MAX_CAPTURES`] of `list`.
    fn remember<T>(list: &mut Vec<T>, item: T) {
        if list.len() == MAX_CAPTURES {
            list.remove(0);
        }
        list.push(item);
    }
}

/// A running sequence in the device cache: a key the engine maps to its slot (slots move when
/// others leave), and the tokens it has in the cache.
pub struct DeviceSeq {
    key: u64,
    seen: usize,
}

/// The model on its CUDA device with a device-resident paged cache; each sequence runs its own
/// request's device program.
pub struct DeviceEngine<'m> {
    model: &'m Llama,
    cache: GpuCache,
    blocks: BlockManager,
    shape: DeviceBatchShape,
    /// The sequence in each slot (mirrors the cache's slot moves).
    slots: SlotMap,
    slot_bytes: u64,
    /// With `cuda_graphs`: the captured decode steps.
    graphs: Graphs,
}

impl<'m> DeviceEngine<'m> {
    /// An empty device cache of `shape` on `model`'s device.
    pub fn new(model: &'m Llama, shape: DeviceBatchShape) -> Result<Self> {
        let cfg = model.config();
        if cfg.gemma.is_some() {
            bail!(
                "Gemma runs on the CPU engine only: the device engine has no local layers (their window and RoPE base) or \
                 soft-capping"
            );
        }
        if cfg.arch.has_attention_sinks() {
            bail!("GPT-OSS runs on the CPU engine only: the device engine has no attention sinks");
        }
        if cfg.windows.is_some() && cfg.device_context().is_none() {
            bail!(
                "the device engine runs a model's attention window only where every layer has it (the context then \
                 stops at the window); this model's windows cover some layers: use the CPU engine"
            );
        }
        let max_blocks_per_row = shape.max_tokens_per_sequence.div_ceil(shape.block_size) + 1;
        let cache = GpuCache::empty(
            model.device(),
            model.dtype(),
            GpuCacheShape {
                layers: cfg.num_layers,
                batch: shape.max_batch,
                kv_heads: cfg.num_kv_heads,
                head_dim: cfg.head_dim,
                block_size: shape.block_size,
                window: shape.max_window,
                max_blocks_per_row,
                num_blocks: shape.capacity_blocks,
                latent_rank: cfg.mla.as_ref().map(|m| m.kv_lora_rank),
            },
        )?;
        let slot_bytes = cache.shape.slot_bytes(model.dtype());
        Ok(Self {
            model,
            cache,
            blocks: BlockManager::for_block_size(cfg.num_layers * cfg.num_kv_heads, shape.block_size),
            shape,
            slots: SlotMap::default(),
            slot_bytes,
            graphs: Graphs::default(),
        })
    }

    /// One decode step of every sequence, in slot order, from a CUDA graph of this batch when
    /// there is one (see [`DeviceBatchShape::cuda_graphs`]). Every step here plans attention for
    /// a bucket of row lengths ([`captured_plan`]), so eager steps size what captures record.
    fn graph_step(&mut self, tokens: &[u32], positions: &[u32], longest: usize) -> Result<Tensor> {
        let plan = captured_plan(longest, self.shape.max_tokens_per_sequence);
        let adapters = self.slots.adapters();
        let slots = adapters
            .iter()
            .enumerate()
            .map(|(slot, a)| {
                let flags = self.cache.program(slot).flags;
                (a.map(str::to_string), flags.needs_scores(), flags.needs_key_norms())
            })
            .collect();
        let key = BatchKey { plan, slots };
        let cache = &self.cache;
        self.graphs.captured.retain(|(_, c)| c.fits(cache));
        if let Some((_, step)) = self.graphs.captured.iter_mut().find(|(k, _)| *k == key) {
            self.graphs.replays += 1;
            return step.step(self.model, &mut self.cache, tokens, positions, longest);
        }
        if self.graphs.failed.contains(&key) || !self.graphs.primed.contains(&key) {
            if !self.graphs.failed.contains(&key) {
                Graphs::remember(&mut self.graphs.primed, key);
            }
            return super::decode_step(self.model, tokens, positions, &adapters, &mut self.cache, plan);
        }
        match CapturedStep::capture(self.model, &mut self.cache, &adapters, plan) {
            Ok(mut step) => {
                self.graphs.replays += 1;
                let logits = step.step(self.model, &mut self.cache, tokens, positions, longest)?;
                if let Ok(pool) = super::graph::graph_pool_bytes(self.model.device()) {
                    tracing::info!(
                        "captured a decode step of {} sequences ({} kernels); CUDA-graph memory pool {:.1} MiB",
                        key.slots.len(),
                        step.nodes().kernels,
                        pool as f64 / (1u64 << 20) as f64
                    );
                }
                Graphs::remember(&mut self.graphs.captured, (key, step));
                Ok(logits)
            }
            Err(e) => {
                // A capture records without running, so the cache is as it was: this step (and
                // later ones of this batch) run kernel by kernel.
                tracing::warn!("a decode step of {} sequences could not be captured: {e:#}", key.slots.len());
                self.graphs.failures += 1;
                self.graphs.primed.retain(|k| *k != key);
                Graphs::remember(&mut self.graphs.failed, key);
                super::decode_step(self.model, tokens, positions, &adapters, &mut self.cache, plan)
            }
        }
    }

    /// Decode steps replayed from CUDA graphs so far, and captures that failed (their batches
    /// ran kernel by kernel).
    pub fn graph_stats(&self) -> (usize, usize) {
        (self.graphs.replays, self.graphs.failures)
    }

    fn slot_of(&self, seq: &DeviceSeq) -> Result<usize> {
        self.slots.slot_of(seq.key)
    }

    /// Frees `seq`'s slot; the last slot's sequence moves into it, as `swap_remove` moves the
    /// last element.
    fn remove(&mut self, seq: &DeviceSeq) -> Result<()> {
        let slot = self.slot_of(seq)?;
        self.cache.remove_sequence(slot)?;
        self.slots.remove(slot);
        Ok(())
    }
}

impl BatchEngine for DeviceEngine<'_> {
    type Seq = DeviceSeq;
    /// The device never swaps: preempted sequences are recomputed.
    type Parked = Infallible;

    fn check_request(&self, req: &Request, longest: usize) -> Result<()> {
        crate::engine::check_signal(self.model, req.policy.as_ref()).with_context(|| format!("request {}", req.id))?;
        let program = DevicePolicy::of(req.policy.as_ref()).with_context(|| format!("request {}", req.id))?;
        if program.window > self.shape.max_window {
            bail!(
                "request {} asks for policy `{}` with window {}, more than this device batch's rings hold ({})",
                req.id,
                req.policy.name(),
                program.window,
                self.shape.max_window
            );
        }
        if longest > self.shape.max_tokens_per_sequence {
            bail!(
                "request {} may reach {longest} tokens, more than the device batch's {} per sequence",
                req.id,
                self.shape.max_tokens_per_sequence
            );
        }
        Ok(())
    }

    fn context_length(&self) -> usize {
        let cfg = self.model.config();
        cfg.device_context().unwrap_or(cfg.max_position_embeddings)
    }

    fn eos_token_ids(&self) -> &[u32] {
        &self.model.config().eos_token_ids
    }

    fn admission_need(&self, context: usize, running: usize) -> usize {
        // The new sequence's own next step too: the device's row lengths are not read back.
        self.blocks.admission_need(context, running + 1)
    }

    fn free_blocks(&self) -> Result<usize> {
        self.cache.free_blocks()
    }

    fn capacity_blocks(&self) -> usize {
        self.shape.capacity_blocks
    }

    fn start(
        &mut self,
        req: &Request,
        ids: &[u32],
        _chunk: usize,
        score_prompt: Option<usize>,
    ) -> Result<Started<DeviceSeq>> {
        if score_prompt.is_some() {
            bail!(
                "request {}: prompt log-probabilities (`echo` with `logprobs`) are computed on the CPU engine only",
                req.id
            );
        }
        let program = DevicePolicy::of(req.policy.as_ref()).with_context(|| format!("request {}", req.id))?;
        let slot = self.cache.add_sequence(program)?;
        let adapter = req.policy.adapter();
        let started = super::prefill_into(self.model, ids, slot, adapter, &mut self.cache, false)
            .and_then(|l| Ok(l.squeeze(0)?.to_dtype(DType::F32)?.to_vec1::<f32>()?))
            .and_then(|logits| Ok((self.slots.push(slot, adapter)?, logits)));
        match started {
            Ok((key, logits)) => {
                Ok(Started { seq: DeviceSeq { key, seen: ids.len() }, logits, prompt_logprobs: Vec::new() })
            }
            Err(e) => {
                // Whatever failed, the slot and its blocks go back: the other sequences run on.
                self.cache.remove_sequence(slot)?;
                Err(e.context(format!("prefilling request {}", req.id)))
            }
        }
    }

    fn scores_prompts(&self) -> bool {
        false
    }

    fn fork_need(&self, seq: &DeviceSeq, running: usize) -> Result<usize> {
        let held = slot_usage(&self.cache, self.slot_of(seq)?, seq.seen, self.slot_bytes)?.0.bytes_allocated
            / (self.shape.block_size as u64 * self.slot_bytes);
        // The copy's own next step too: the device's row lengths are not read back each step.
        Ok(held as usize + self.blocks.step_headroom(running + 1))
    }

    fn fork(&mut self, seq: &DeviceSeq) -> Result<Option<DeviceSeq>> {
        let from = self.slot_of(seq)?;
        let adapter = self.slots.adapter(from).map(str::to_string);
        let slot = self.cache.fork_sequence(from)?;
        let fork = DeviceSeq { key: self.slots.push(slot, adapter.as_deref())?, seen: seq.seen };
        // A row that found too few blocks fails the fork; its slot is given back.
        if let Err(e) = self.cache.check() {
            self.release(fork);
            return Err(e);
        }
        Ok(Some(fork))
    }

    fn decode(&mut self, mut seqs: Vec<&mut DeviceSeq>, tokens: &[u32]) -> Result<Vec<Vec<f32>>> {
        if tokens.len() != seqs.len() {
            bail!("{} sequences but {} tokens in a decode step", seqs.len(), tokens.len());
        }
        // The kernels run slots in order; the scheduler lists sequences in its own.
        let order = self.slots.caller_index_by_slot(&seqs.iter().map(|s| s.key).collect::<Vec<_>>())?;
        let slot_tokens: Vec<u32> = order.iter().map(|&i| tokens[i]).collect();
        let positions: Vec<u32> = order.iter().map(|&i| seqs[i].seen as u32).collect();
        let longest = seqs.iter().map(|s| s.seen + 1).max().unwrap_or(1);
        let logits = if self.shape.cuda_graphs {
            self.graph_step(&slot_tokens, &positions, longest)?
        } else {
            let adapters = self.slots.adapters();
            super::decode_step(self.model, &slot_tokens, &positions, &adapters, &mut self.cache, longest)?
        }
        .to_vec2::<f32>()?;
        // A kernel that ran out of blocks fails the step here, before anything is released.
        self.cache.check()?;
        let mut out = vec![Vec::new(); seqs.len()];
        for (&i, l) in order.iter().zip(logits) {
            out[i] = l;
            seqs[i].seen += 1;
        }
        Ok(out)
    }

    fn next_step_need(&self, seqs: &[&DeviceSeq]) -> Result<usize> {
        Ok(self.blocks.step_headroom(seqs.len()))
    }

    fn finish(&mut self, seq: DeviceSeq) -> Result<SeqReport> {
        let report = self.report(&seq);
        self.remove(&seq)?;
        report
    }

    fn report(&self, seq: &DeviceSeq) -> Result<SeqReport> {
        let (usage, compression_ratio, layer_kept_fraction) =
            slot_usage(&self.cache, self.slot_of(seq)?, seq.seen, self.slot_bytes)?;
        // Device rows never give blocks back before the sequence ends (evictions reuse slots), so
        // its final blocks are also its peak.
        Ok(SeqReport {
            peak_allocated: usage.bytes_allocated,
            peak_live: usage.bytes_live,
            usage,
            compression_ratio,
            shadow_compression_ratio: None,
            layer_kept_fraction,
        })
    }

    fn release(&mut self, seq: DeviceSeq) {
        if let Err(e) = self.remove(&seq) {
            tracing::warn!("releasing a device sequence: {e:#}");
        }
    }

    fn park(&mut self, seq: DeviceSeq) -> Result<Parked<Infallible>> {
        let held = slot_usage(&self.cache, self.slot_of(&seq)?, seq.seen, self.slot_bytes)?.0;
        self.remove(&seq)?;
        Ok(Parked::Dropped { peak_allocated: held.bytes_allocated, peak_live: held.bytes_live })
    }

    fn recompute_need(&self, context: usize, running: usize) -> usize {
        self.admission_need(context, running)
    }

    fn resume_need(&self, parked: &Infallible, _running: usize) -> usize {
        match *parked {}
    }

    fn unpark(&mut self, parked: Infallible) -> std::result::Result<DeviceSeq, Infallible> {
        match parked {}
    }

    fn usage(&self, seq: &DeviceSeq) -> Result<MemoryUsage> {
        Ok(slot_usage(&self.cache, self.slot_of(seq)?, seq.seen, self.slot_bytes)?.0)
    }

    fn pool_usage(&self) -> Result<PoolUsage> {
        let held = (self.shape.capacity_blocks - self.cache.free_blocks()?) as u64
            * self.shape.block_size as u64
            * self.slot_bytes;
        let live: u64 = self.cache.row_lengths()?.iter().map(|&n| n.max(0) as u64).sum::<u64>() * self.slot_bytes;
        Ok(PoolUsage { bytes_live: live, bytes_allocated: held })
    }
}

/// Memory, compression ratio and per-layer kept fractions of the sequence in `slot`, which has
/// seen `seen` tokens.
fn slot_usage(cache: &GpuCache, slot: usize, seen: usize, slot_bytes: u64) -> Result<(MemoryUsage, f64, Vec<f64>)> {
    let s = cache.shape;
    let lens = cache.row_lengths()?;
    let per_layer = s.rows();
    let mine: Vec<Vec<u64>> = lens
        .chunks(per_layer)
        .map(|layer| layer[slot * s.kv_heads..(slot + 1) * s.kv_heads].iter().map(|&n| n.max(0) as u64).collect())
        .collect();
    let slots: u64 = mine.iter().flatten().sum();
    let blocks: u64 = mine.iter().flatten().map(|n| n.div_ceil(s.block_size as u64)).sum();
    let tokens_seen = (seen * s.layers * s.kv_heads) as u64;
    let kept = mine.iter().map(|l| l.iter().sum::<u64>() as f64 / (seen * s.kv_heads).max(1) as f64).collect();
    let usage = MemoryUsage {
        bytes_live: slots * slot_bytes,
        bytes_allocated: blocks * s.block_size as u64 * slot_bytes,
        slots,
        tokens_seen,
        bytes_full: tokens_seen * slot_bytes,
    };
    Ok((usage, tokens_seen as f64 / slots.max(1) as f64, kept))
}
