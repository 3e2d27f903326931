//! Continuous batching on the device cache: requests join a running device batch when the free
//! device blocks hold their prompt (plus one block per row of every running sequence, the
//! [`BlockManager`]'s rule), decode together one token each per step with the DMS bookkeeping in
//! the kernels, and leave when they finish, their blocks going back to the device free list.
//! When the free blocks cannot cover the next step, the most recently admitted sequence is
//! preempted by recomputation: its slot is released, and it later re-enters with its prompt and
//! the tokens it had generated as one masked prompt pass (rule 4: the same kept set as decoding
//! them), so greedy output resumes unchanged. Every sequence of one device batch runs the same
//! device program (one policy per batch).

use std::collections::VecDeque;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::DType;
use rand::rngs::StdRng;
use rand::SeedableRng;

use super::{GpuCache, GpuCacheShape};
use crate::engine::block_manager::BlockManager;
use crate::engine::sample;
use crate::engine::scheduler::{BatchStats, FinishReason, Finished, Request};
use crate::engine::GenParams;
use crate::gpu::policy::DevicePolicy;
use crate::kv::store::MemoryUsage;
use crate::model::Llama;

/// Where the device batch keeps its cache.
#[derive(Debug, Clone, Copy)]
pub struct DeviceBatchShape {
    /// Slots per block.
    pub block_size: usize,
    /// Blocks in the device pool (the memory budget).
    pub capacity_blocks: usize,
    /// Sequences decoding at once, at most.
    pub max_batch: usize,
    /// Longest sequence (prompt + generated tokens) a request may reach.
    pub max_tokens_per_sequence: usize,
    /// Keep the logits every token was chosen from in the results (for checks).
    pub keep_logits: bool,
}

/// A request and what it has generated so far (non-empty after a preemption).
struct Waiting {
    req: Request,
    tokens: Vec<u32>,
    step_logits: Vec<Vec<f32>>,
    rng: StdRng,
    preemptions: usize,
}

/// A sequence in a device slot (its index in `running` is its slot).
struct Running {
    w: Waiting,
    /// Admission order (preemption takes the newest).
    admitted: usize,
    logits: Vec<f32>,
    /// Tokens in the cache (prompt + fed tokens).
    seen: usize,
}

/// Serves `requests` on the model's CUDA device with `policy`'s device program for all of them
/// (a request whose own policy has another program is refused, naming it). Sampling, teacher
/// forcing and stopping follow the host scheduler's rules (one RNG per request, seeded with
/// `params.seed + id`, or the request's own `params.seed`).
pub fn run_device_batch(
    model: &Llama,
    requests: Vec<Request>,
    params: &GenParams,
    policy: &DevicePolicy,
    shape: DeviceBatchShape,
) -> Result<(Vec<Finished>, BatchStats)> {
    for r in &requests {
        let own = DevicePolicy::of(r.policy.as_ref()).with_context(|| format!("request {}", r.id))?;
        if own != *policy {
            bail!(
                "request {} asks for policy `{}` ({own:?}), but this device batch runs {policy:?}: one device program \
                 per batch",
                r.id,
                r.policy.name()
            );
        }
        if r.prompt.is_empty() {
            bail!("request {}: the prompt is empty", r.id);
        }
        let longest = r.prompt.len() + max_new(r, params);
        if longest > shape.max_tokens_per_sequence {
            bail!(
                "request {} may reach {longest} tokens, more than the device batch's {} per sequence",
                r.id,
                shape.max_tokens_per_sequence
            );
        }
    }
    let cfg = model.config();
    let max_blocks_per_row = shape.max_tokens_per_sequence.div_ceil(shape.block_size) + 1;
    let mut cache = GpuCache::empty(
        model.device(),
        model.dtype(),
        GpuCacheShape {
            layers: cfg.num_layers,
            batch: shape.max_batch,
            kv_heads: cfg.num_kv_heads,
            head_dim: cfg.head_dim,
            block_size: shape.block_size,
            window: policy.window,
            max_blocks_per_row,
            num_blocks: shape.capacity_blocks,
            latent_rank: cfg.mla.as_ref().map(|m| m.kv_lora_rank),
        },
    )?;
    let blocks = BlockManager::for_block_size(cfg.num_layers * cfg.num_kv_heads, shape.block_size);
    let slot_bytes = cache.shape.slot_bytes(model.dtype());
    let eos = cfg.eos_token_ids.clone();
    let mut waiting: VecDeque<Waiting> = requests
        .into_iter()
        .map(|req| {
            let seed = match &req.params {
                Some(p) => p.seed,
                None => params.seed.wrapping_add(req.id as u64),
            };
            Waiting {
                req,
                tokens: Vec::new(),
                step_logits: Vec::new(),
                rng: StdRng::seed_from_u64(seed),
                preemptions: 0,
            }
        })
        .collect();
    let mut running: Vec<Running> = Vec::new();
    let mut admitted = 0usize;
    let mut generated = 0usize;
    let mut done = Vec::new();
    let mut stats = BatchStats::default();
    while !waiting.is_empty() || !running.is_empty() {
        // Admit (or resume) while a slot and the blocks are free.
        while running.len() < shape.max_batch {
            let Some(next) = waiting.front() else { break };
            // The prompt, and a block per row for its own next step and every running one's
            // (the device's row lengths are not read back each step).
            let context = next.req.prompt.len() + next.tokens.len();
            if blocks.admission_need(context, running.len() + 1) > cache.free_blocks()? {
                if running.is_empty() {
                    bail!(
                        "request {} needs {} blocks for its {context} tokens and their next step, more than the device \
                         pool's {}",
                        next.req.id,
                        blocks.admission_need(context, 1),
                        shape.capacity_blocks
                    );
                }
                break;
            }
            let w = waiting.pop_front().expect("front exists");
            let ids: Vec<u32> = w.req.prompt.iter().chain(&w.tokens).copied().collect();
            let t0 = Instant::now();
            let slot = cache.add_sequence()?;
            let logits = match super::prefill_into(model, &ids, slot, &mut cache, &policy.flags, false) {
                Ok(l) => l.squeeze(0)?.to_dtype(DType::F32)?.to_vec1::<f32>()?,
                Err(e) => {
                    cache.remove_sequence(slot)?;
                    return Err(e.context(format!("prefilling request {}", w.req.id)));
                }
            };
            stats.prefill_secs += t0.elapsed().as_secs_f64();
            // Recomputed tokens of a resumed sequence count: they are prefill work done.
            stats.prefill_tokens += ids.len();
            running.push(Running { w, admitted, logits, seen: ids.len() });
            admitted += 1;
        }
        // Choose each sequence's next token; retire the finished ones (the last slot moves into
        // a freed one, as `swap_remove` moves the last element).
        let mut slot = running.len();
        while slot > 0 {
            slot -= 1;
            let r = &mut running[slot];
            let p = r.w.req.params.as_ref().unwrap_or(params);
            let next = match &r.w.req.forced {
                Some(f) => f[r.w.tokens.len()],
                None => sample(&r.logits, p, &mut r.w.rng),
            };
            r.w.tokens.push(next);
            generated += 1;
            if shape.keep_logits {
                r.w.step_logits.push(r.logits.clone());
            }
            let reason = if r.w.req.forced.is_none() && p.stop_at_eos && eos.contains(&next) {
                Some(FinishReason::Stop)
            } else if r.w.tokens.len() >= max_new(&r.w.req, params) {
                Some(FinishReason::Length)
            } else {
                None
            };
            if let Some(reason) = reason {
                let (usage, cr, kept) = slot_usage(&cache, slot, r.seen, slot_bytes)?;
                cache.remove_sequence(slot)?;
                let r = running.swap_remove(slot);
                done.push(finished(r, usage, cr, kept, reason));
            }
        }
        // Make room for the step: preempt the newest sequences by recomputation.
        while running.len() > 1 && cache.free_blocks()? < blocks.step_headroom(running.len()) {
            let newest = (0..running.len()).max_by_key(|&i| running[i].admitted).expect("non-empty");
            cache.remove_sequence(newest)?;
            let mut r = running.swap_remove(newest);
            r.w.preemptions += 1;
            stats.preemptions += 1;
            waiting.push_front(r.w);
        }
        if running.is_empty() {
            continue;
        }
        if cache.free_blocks()? < blocks.step_headroom(running.len()) {
            let r = &running[0];
            bail!(
                "the device pool ({} blocks) cannot hold request {} past {} tokens",
                shape.capacity_blocks,
                r.w.req.id,
                r.seen
            );
        }
        stats.max_running = stats.max_running.max(running.len());
        let tokens: Vec<u32> = running.iter().map(|r| *r.w.tokens.last().expect("a chosen token")).collect();
        let positions: Vec<u32> = running.iter().map(|r| r.seen as u32).collect();
        let longest = running.iter().map(|r| r.seen + 1).max().unwrap_or(1);
        let t1 = Instant::now();
        let logits = super::decode_step(model, &tokens, &positions, &mut cache, &policy.flags, longest)?;
        let logits = logits.to_vec2::<f32>()?;
        stats.decode_secs += t1.elapsed().as_secs_f64();
        stats.decode_steps += 1;
        stats.decode_tokens += running.len();
        for (r, l) in running.iter_mut().zip(logits) {
            r.logits = l;
            r.seen += 1;
        }
        let held = (shape.capacity_blocks - cache.free_blocks()?) as u64 * shape.block_size as u64 * slot_bytes;
        stats.peak_allocated = stats.peak_allocated.max(held);
        let live: u64 = cache.row_lengths()?.iter().map(|&n| n.max(0) as u64).sum::<u64>() * slot_bytes;
        stats.peak_live = stats.peak_live.max(live);
        stats.memory_trace.push((generated, live, held));
        // A kernel that ran out of blocks fails the run here, before anything is released.
        cache.check()?;
    }
    cache.check()?;
    done.sort_by_key(|f| f.id);
    Ok((done, stats))
}

/// Tokens a request produces: its forced tokens, or its `max_tokens`.
fn max_new(r: &Request, params: &GenParams) -> usize {
    r.forced.as_ref().map_or(r.params.as_ref().unwrap_or(params).max_tokens, |f| f.len())
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

/// The report of a finished sequence. Device rows never give blocks back before the sequence
/// ends (evictions reuse slots), so its final blocks are also its peak.
fn finished(r: Running, usage: MemoryUsage, cr: f64, kept: Vec<f64>, reason: FinishReason) -> Finished {
    Finished {
        id: r.w.req.id,
        tokens: r.w.tokens,
        step_logits: r.w.step_logits,
        compression_ratio: cr,
        shadow_compression_ratio: None,
        preemptions: r.w.preemptions,
        peak_allocated: usage.bytes_allocated,
        peak_live: usage.bytes_live,
        usage,
        layer_kept_fraction: kept,
        finish_reason: reason,
    }
}
