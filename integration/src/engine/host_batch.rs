//! The host engine as a [`BatchEngine`]: sequences are rows in the paged [`KvStore`], each under
//! its own policy (per-request A/B), and a preempted sequence is swapped out slot for slot or
//! dropped for recomputation, as [`Engine::preemption`] says (swapped anyway when its policy
//! scores attention, whose prompt pass keeps another set, or when its uncompressed context would
//! not fit the pool).

use anyhow::{bail, Result};

use dms_policy::SignalNeed;

use super::batch_engine::{BatchEngine, Parked, PoolUsage, Preemption, SeqReport, Started};
use super::scheduler::Request;
use super::Engine;
use crate::kv::sequence::SequenceCache;
use crate::kv::store::{MemoryUsage, SwappedRow};

/// A running sequence on the host store, with the most memory it has held.
pub struct HostSequence {
    /// Its rows and policy.
    pub cache: SequenceCache,
    peak_allocated: u64,
    peak_live: u64,
}

impl HostSequence {
    fn note_usage(&mut self, u: &MemoryUsage) {
        self.peak_allocated = self.peak_allocated.max(u.bytes_allocated);
        self.peak_live = self.peak_live.max(u.bytes_live);
    }
}

/// A swapped-out sequence: its policy state and its rows' slots in host memory.
pub struct HostParked {
    seq: HostSequence,
    rows: Vec<SwappedRow>,
}

impl BatchEngine for Engine {
    type Seq = HostSequence;
    type Parked = HostParked;

    fn check_request(&self, req: &Request, _longest: usize) -> Result<()> {
        self.check_policy(req.policy.as_ref())
    }

    fn context_length(&self) -> usize {
        self.model.config().max_position_embeddings
    }

    fn eos_token_ids(&self) -> &[u32] {
        &self.model.config().eos_token_ids
    }

    fn admission_need(&self, context: usize, running: usize) -> usize {
        self.block_manager().admission_need(context, running)
    }

    fn free_blocks(&self) -> Result<usize> {
        Ok(self.store.free_block_count())
    }

    fn capacity_blocks(&self) -> usize {
        self.store.capacity_blocks()
    }

    fn start(
        &mut self,
        req: &Request,
        ids: &[u32],
        chunk: usize,
        score_prompt: Option<usize>,
    ) -> Result<Started<HostSequence>> {
        if ids.is_empty() {
            bail!("request {}: the prompt is empty", req.id);
        }
        let mut cache = self.new_sequence_with(req.policy.as_ref());
        let pass = match score_prompt {
            None => self.prefill(&mut cache, ids, chunk).map(|l| (l, Vec::new())),
            Some(top) => self.prefill_scored(&mut cache, ids, chunk, top),
        };
        match pass {
            Ok((logits, prompt_logprobs)) => {
                let mut seq = HostSequence { cache, peak_allocated: 0, peak_live: 0 };
                seq.note_usage(&seq.cache.usage(&self.store));
                Ok(Started { seq, logits, prompt_logprobs })
            }
            Err(e) => {
                cache.release(&mut self.store);
                Err(e)
            }
        }
    }

    fn fork_need(&self, seq: &HostSequence, running: usize) -> Result<usize> {
        Ok(seq.cache.blocks_held(&self.store) + self.block_manager().step_headroom(running))
    }

    fn fork(&mut self, seq: &HostSequence) -> Result<Option<HostSequence>> {
        Ok(seq.cache.fork(&mut self.store)?.map(|cache| {
            let (peak_allocated, peak_live) = (seq.peak_allocated, seq.peak_live);
            HostSequence { cache, peak_allocated, peak_live }
        }))
    }

    fn decode(&mut self, mut seqs: Vec<&mut HostSequence>, tokens: &[u32]) -> Result<Vec<Vec<f32>>> {
        let logits = Engine::decode(self, seqs.iter_mut().map(|s| &mut s.cache).collect(), tokens)?;
        for s in seqs {
            let u = s.cache.usage(&self.store);
            s.note_usage(&u);
        }
        Ok(logits)
    }

    fn next_step_need(&self, seqs: &[&HostSequence]) -> Result<usize> {
        Ok(self.block_manager().next_step_need(&self.store, seqs.iter().map(|s| &s.cache)))
    }

    fn report(&self, seq: &HostSequence) -> Result<SeqReport> {
        let store = &self.store;
        let c = &seq.cache;
        Ok(SeqReport {
            usage: c.usage(store),
            compression_ratio: c.compression_ratio(store),
            shadow_compression_ratio: c.shadow_compression_ratio(store),
            layer_kept_fraction: (0..c.shape().n_layers).map(|l| 1.0 / c.layer_compression_ratio(l, store)).collect(),
            peak_allocated: seq.peak_allocated,
            peak_live: seq.peak_live,
        })
    }

    fn extends(&self) -> bool {
        true
    }

    fn extend(&mut self, seq: &mut HostSequence, ids: &[u32], chunk: usize) -> Result<Vec<f32>> {
        let logits = self.prefill(&mut seq.cache, ids, chunk)?;
        seq.note_usage(&seq.cache.usage(&self.store));
        Ok(logits)
    }

    fn release(&mut self, seq: HostSequence) {
        seq.cache.release(&mut self.store);
    }

    fn reset_peaks(&mut self, seq: &mut HostSequence) {
        (seq.peak_allocated, seq.peak_live) = (0, 0);
        seq.note_usage(&seq.cache.usage(&self.store));
    }

    fn park(&mut self, mut seq: HostSequence) -> Result<Parked<HostParked>> {
        // Recomputation gives the same rows only where one prompt pass keeps what decoding kept
        // (not for attention-scored policies), and needs room for the uncompressed context.
        let seen = seq.cache.seen() as usize;
        let recompute = self.preemption == Preemption::Recompute
            && seq.cache.signal_need() != SignalNeed::AttentionWeights
            && self.block_manager().admission_need(seen, 1) <= self.store.capacity_blocks();
        if recompute {
            let (peak_allocated, peak_live) = (seq.peak_allocated, seq.peak_live);
            seq.cache.release(&mut self.store);
            return Ok(Parked::Dropped { peak_allocated, peak_live });
        }
        let rows = seq.cache.swap_out(&mut self.store)?;
        Ok(Parked::Rows(HostParked { seq, rows }))
    }

    fn recompute_need(&self, context: usize, running: usize) -> usize {
        self.block_manager().admission_need(context, running + 1)
    }

    fn resume_need(&self, parked: &HostParked, running: usize) -> usize {
        self.block_manager().resume_need(&parked.rows, running)
    }

    fn unpark(&mut self, mut parked: HostParked) -> std::result::Result<HostSequence, HostParked> {
        match parked.seq.cache.swap_in(&mut self.store, parked.rows) {
            Ok(()) => Ok(parked.seq),
            Err(rows) => {
                parked.rows = rows;
                Err(parked)
            }
        }
    }

    fn usage(&self, seq: &HostSequence) -> Result<MemoryUsage> {
        Ok(seq.cache.usage(&self.store))
    }

    fn pool_usage(&self) -> Result<PoolUsage> {
        let u = self.store.usage();
        Ok(PoolUsage { bytes_live: u.bytes_live, bytes_allocated: u.bytes_allocated })
    }
}
