//! Generation with the KV cache on the device (`dms run` with `device = "cuda:N"`): the prompt
//! in one masked pass, then decode steps whose DMS bookkeeping runs in the cache's kernels.

use std::time::Instant;

use anyhow::{bail, Result};
use rand::rngs::StdRng;
use rand::SeedableRng;

use super::{GpuCache, GpuCacheShape, StepDecisions};
use crate::engine::{sample, GenParams, Generation};
use crate::gpu::policy::DevicePolicy;
use crate::kv::store::MemoryUsage;
use crate::model::Llama;

/// What the cache holds at the end of a device generation.
fn usage(cache: &GpuCache, tokens_seen: usize) -> Result<(MemoryUsage, f64, Vec<f64>)> {
    let s = cache.shape;
    let lens = cache.row_lengths()?;
    let slot = s.slot_bytes(cache.dtype());
    let slots: u64 = lens.iter().map(|&n| n as u64).sum();
    let blocks: u64 = lens.iter().map(|&n| (n as u64).div_ceil(s.block_size as u64)).sum();
    let seen = (tokens_seen * lens.len()) as u64;
    let per_layer = s.rows();
    let kept: Vec<f64> = lens
        .chunks(per_layer)
        .map(|l| l.iter().map(|&n| n as f64).sum::<f64>() / (tokens_seen * per_layer).max(1) as f64)
        .collect();
    let u = MemoryUsage {
        bytes_live: slots * slot,
        bytes_allocated: blocks * s.block_size as u64 * slot,
        slots,
        tokens_seen: seen,
        bytes_full: seen * slot,
    };
    Ok((u, seen as f64 / slots.max(1) as f64, kept))
}

/// Generates from one prompt with the cache on the model's CUDA device: `block_size` slots per
/// block, at most `capacity_blocks` blocks (the engine config's memory budget).
pub fn generate_on_device(
    model: &Llama,
    prompt: &[u32],
    params: &GenParams,
    policy: &DevicePolicy,
    block_size: usize,
    capacity_blocks: usize,
) -> Result<Generation> {
    if prompt.is_empty() {
        bail!("the prompt is empty");
    }
    let cfg = model.config();
    let total = prompt.len() + params.max_tokens;
    let max_blocks_per_row = total.div_ceil(block_size) + 1;
    let shape = GpuCacheShape {
        layers: cfg.num_layers,
        batch: 1,
        kv_heads: cfg.num_kv_heads,
        head_dim: cfg.head_dim,
        block_size,
        window: policy.window,
        max_blocks_per_row,
        num_blocks: capacity_blocks.min(cfg.num_layers * cfg.num_kv_heads * max_blocks_per_row),
        latent_rank: cfg.mla.as_ref().map(|m| m.kv_lora_rank),
    };
    let mut cache = GpuCache::new(model.device(), model.dtype(), shape)?;
    let step: StepDecisions = policy.flags;
    let eos = cfg.eos_token_ids.clone();
    let mut rng = StdRng::seed_from_u64(params.seed);
    let t0 = Instant::now();
    let mut logits =
        crate::gpu::prefill_into(model, prompt, 0, &mut cache, &policy.flags, false)?.squeeze(0)?.to_vec1::<f32>()?;
    let prefill_secs = t0.elapsed().as_secs_f64();
    let (after_prompt, _, _) = usage(&cache, prompt.len())?;
    // Rows grow by at most one slot per step: the attention's split count follows the longest
    // kept row, not the tokens seen (DMS rows are CR times shorter).
    let longest_after_prompt = cache.row_lengths()?.into_iter().max().unwrap_or(0).max(0) as usize;
    let mut tokens = Vec::new();
    let t1 = Instant::now();
    let mut steps = 0;
    while tokens.len() < params.max_tokens {
        let next = sample(&logits, params, &mut rng);
        tokens.push(next);
        if (params.stop_at_eos && eos.contains(&next)) || tokens.len() == params.max_tokens {
            break;
        }
        let pos = prompt.len() + steps;
        logits = crate::gpu::decode_step(
            model,
            &[next],
            &[pos as u32],
            &mut cache,
            &step,
            longest_after_prompt + steps + 1,
        )?
        .squeeze(0)?
        .to_vec1::<f32>()?;
        steps += 1;
    }
    let decode_secs = t1.elapsed().as_secs_f64();
    cache.check()?;
    let (u, cr, kept) = usage(&cache, prompt.len() + steps)?;
    Ok(Generation {
        prompt_tokens: prompt.len(),
        tokens,
        prefill_secs,
        decode_secs,
        decode_steps: steps,
        peak_allocated: u.bytes_allocated.max(after_prompt.bytes_allocated),
        usage: u,
        compression_ratio: cr,
        layer_kept_fraction: kept,
        step_logits: Vec::new(),
    })
}
