//! The device cache as a [`KvBackend`]: decode steps of a batch of sequences and masked prompts
//! into the cache, with the DMS bookkeeping in kernels (no host round trip per layer). Each
//! sequence follows its own slot's program ([`GpuCache::set_program`]) and reads its own adapter.

use anyhow::{bail, Result};
use candle_core::{DType, Tensor};
use dms_policy::Pos;

use super::GpuCache;
use crate::gpu::policy::{raw_signal, DevicePolicy};
use crate::kv::backend::{DecisionSpan, KvBackend, LayerStep, Signals};
use crate::model::prefill::masked_prefill;
use crate::model::Llama;

/// One decode step of every sequence of a [`GpuCache`], one token each.
pub struct DeviceStep<'c> {
    cache: &'c mut GpuCache,
    adapters: &'c [Option<&'c str>],
    batch: usize,
    max_len_hint: usize,
}

impl<'c> DeviceStep<'c> {
    /// A step of one token for each of `cache`'s sequences, which read `adapters` (one per
    /// sequence, in slot order); `max_len_hint` bounds the longest row after the step.
    pub(crate) fn new(cache: &'c mut GpuCache, adapters: &'c [Option<&'c str>], max_len_hint: usize) -> Self {
        Self { cache, adapters, batch: adapters.len(), max_len_hint }
    }

    /// Each sequence's raw decision signal `[batch, kv_heads]`, as its program reads it
    /// ([`raw_signal`]).
    fn signal(&self, step: &LayerStep<'_>) -> Result<Option<Tensor>> {
        let programs: Vec<DevicePolicy> = (0..self.batch).map(|slot| self.cache.program(slot)).collect();
        raw_signal(&programs, step.decision, step.key_norms)
    }
}

impl KvBackend for DeviceStep<'_> {
    fn signals(&self) -> Signals {
        Signals { decision: self.cache.needs_scores(), key_norms: self.cache.needs_key_norms() }
    }

    fn decision_spans(&self) -> Vec<DecisionSpan<'_>> {
        (0..self.batch)
            .map(|slot| DecisionSpan {
                tokens: 1,
                needed: self.cache.program(slot).flags.needs_scores(),
                adapter: self.adapters[slot],
            })
            .collect()
    }

    fn attend(&mut self, li: usize, step: LayerStep<'_>) -> Result<Tensor> {
        if let Some(cap) = step.softcap {
            bail!("the device cache has no attention soft-capping (the model's is {cap})");
        }
        if step.sink_logits.is_some() {
            bail!("the device cache has no attention sinks (the model has them)");
        }
        let signal = self.signal(&step)?;
        self.cache.update(li, &step.k.contiguous()?, step.v, signal.as_ref())?;
        // Per-head rows give `[b, heads, head_dim]`, latent rows `[b, heads, rank]`.
        let attn = self.cache.attend(li, &step.q.contiguous()?, step.scale as f32, self.max_len_hint)?;
        let (_, heads, width) = attn.dims3()?;
        Ok(attn.reshape((self.batch, heads * width))?)
    }

    fn finish(&mut self) -> Result<()> {
        Ok(())
    }
}

/// One decode step of `tokens.len()` sequences on the GPU cache, in slot order: each sequence
/// feeds one token at its position, decides by its slot's program and reads its adapter
/// (`adapters`, one per sequence; `None`: the model's own decision weights); `max_len_hint`
/// bounds the longest row after the step (see [`GpuCache::attend`]). Returns logits
/// `[batch, vocab]` (f32).
pub fn decode_step(
    model: &Llama,
    tokens: &[u32],
    positions: &[Pos],
    adapters: &[Option<&str>],
    cache: &mut GpuCache,
    max_len_hint: usize,
) -> Result<Tensor> {
    if adapters.len() != tokens.len() {
        bail!("{} tokens but {} adapters in a device decode step", tokens.len(), adapters.len());
    }
    let mut step = DeviceStep::new(cache, adapters, max_len_hint);
    let x = model.forward_hidden(tokens, positions, &mut step)?;
    Ok(model.logits(&x)?.to_dtype(DType::F32)?)
}

/// A prompt into sequence `seq` of the GPU cache in one pass with DMS's visibility mask
/// ([`masked_prefill`]), flagged, windowed and sunk as the slot's program says, with decisions
/// from `adapter`; the sequence's rows must be empty. The cache keeps every unflagged token and
/// the last `W + 1` tokens (rule 4.2); one check of the cache's error flag at the end (a failed
/// prompt is an error).
pub fn prefill_into(
    model: &Llama,
    tokens: &[u32],
    seq: usize,
    adapter: Option<&str>,
    cache: &mut GpuCache,
    all_logits: bool,
) -> Result<Tensor> {
    let program = cache.program(seq);
    let dtype = cache.dtype();
    let logits = masked_prefill(model, tokens, &program, adapter, all_logits, |li, k, v, f| {
        cache.insert_prompt(li, seq, &k.to_dtype(dtype)?.contiguous()?, &v.to_dtype(dtype)?.contiguous()?, f)
    })?;
    cache.check()?;
    Ok(logits)
}
