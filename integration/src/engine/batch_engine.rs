//! What the scheduler drives: an engine that executes prompts, batched decode steps, preemption
//! and release on its own KV storage. The scheduler plans (admit, preempt, resume, decode this
//! batch) from the engine's answers about free blocks and never touches storage itself, so one
//! decode loop serves the host paged store ([`super::Engine`]) and the device cache
//! (`gpu::batch::DeviceEngine`, feature `cuda`).

use anyhow::Result;
use serde::Deserialize;

use crate::engine::scheduler::Request;
use crate::engine::TokenLogprobs;
use crate::kv::store::MemoryUsage;

/// How a preempted sequence gives its blocks back and later resumes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Preemption {
    /// Its rows are copied out of the pool, slot for slot, and copied back when it resumes.
    #[default]
    Swap,
    /// Its rows are dropped; it resumes by prefilling its prompt and the tokens it had generated
    /// (the DMS prompt rules give the kept set decoding them gave).
    Recompute,
}

/// What a finished sequence held and reached.
#[derive(Debug, Clone)]
pub struct SeqReport {
    /// Memory it held when it finished.
    pub usage: MemoryUsage,
    /// Its compression ratio (spec rule 6).
    pub compression_ratio: f64,
    /// For shadow policies: the compression ratio the shadowed policy would have reached.
    pub shadow_compression_ratio: Option<f64>,
    /// Kept fraction (slots over tokens seen) of each layer.
    pub layer_kept_fraction: Vec<f64>,
    /// Most bytes of blocks it held at once.
    pub peak_allocated: u64,
    /// Most bytes live it held at once.
    pub peak_live: u64,
}

/// What preempting a sequence left: its rows to copy back, or nothing (it is recomputed), with
/// the most memory it had held (kept for its report).
pub enum Parked<P> {
    /// Its rows, swapped out of the pool.
    Rows(P),
    /// Dropped: it resumes by prefilling its prompt and generated tokens again.
    Dropped {
        /// Most bytes of blocks it had held.
        peak_allocated: u64,
        /// Most bytes live it had held.
        peak_live: u64,
    },
}

/// A sequence after its prompt pass.
pub struct Started<S> {
    /// The sequence.
    pub seq: S,
    /// Its next-token logits.
    pub logits: Vec<f32>,
    /// When asked for: each prompt token after the first, with its log-probability under the
    /// logits before it (the cache policy acting as it does in the pass) and the most likely
    /// alternatives.
    pub prompt_logprobs: Vec<TokenLogprobs>,
}

/// Bytes the whole pool holds now.
#[derive(Debug, Clone, Copy, Default)]
pub struct PoolUsage {
    /// Bytes in occupied slots.
    pub bytes_live: u64,
    /// Bytes of allocated blocks.
    pub bytes_allocated: u64,
}

/// An engine the [`Scheduler`](super::scheduler::Scheduler) can plan for.
pub trait BatchEngine {
    /// A running sequence's handle on its storage.
    type Seq;
    /// A preempted sequence's saved rows (for engines that swap).
    type Parked;

    /// Checks that the engine can serve `req`, which may reach `longest` tokens.
    fn check_request(&self, req: &Request, longest: usize) -> Result<()>;
    /// The context length this engine serves (the model's, or on the device the window of a
    /// model windowed on every layer): no sequence may grow past it.
    fn context_length(&self) -> usize;
    /// The model's end-of-sequence tokens.
    fn eos_token_ids(&self) -> &[u32];
    /// Blocks a sequence of `context` tokens needs to start beside `running` others.
    fn admission_need(&self, context: usize, running: usize) -> usize;
    /// Blocks free now.
    fn free_blocks(&self) -> Result<usize>;
    /// Blocks in the pool.
    fn capacity_blocks(&self) -> usize;
    /// Starts a sequence for `req` and prefills `ids` into it (in chunks of `chunk` tokens where
    /// the engine chunks; 0 = one pass); returns it, its next-token logits and, with
    /// `score_prompt = Some(top)`, each prompt token after the first scored in the same pass. On
    /// an error the engine has given back whatever it took.
    fn start(
        &mut self,
        req: &Request,
        ids: &[u32],
        chunk: usize,
        score_prompt: Option<usize>,
    ) -> Result<Started<Self::Seq>>;
    /// Whether [`BatchEngine::start`] can score a prompt (`score_prompt`).
    fn scores_prompts(&self) -> bool {
        true
    }
    /// Blocks a copy of `seq` needs beside `running` others (see [`BatchEngine::fork`]).
    fn fork_need(&self, seq: &Self::Seq, running: usize) -> Result<usize>;
    /// Starts a sequence as a copy of `seq` (a copy-on-admission fork: requests with the same
    /// prompt and policy share one prompt pass); `None` when this sequence cannot be copied.
    fn fork(&mut self, seq: &Self::Seq) -> Result<Option<Self::Seq>>;
    /// One batched decode step: feeds `tokens[i]` to `seqs[i]`, which are every running
    /// sequence; returns each one's next-token logits.
    fn decode(&mut self, seqs: Vec<&mut Self::Seq>, tokens: &[u32]) -> Result<Vec<Vec<f32>>>;
    /// Blocks the next decode step of `seqs` may take.
    fn next_step_need(&self, seqs: &[&Self::Seq]) -> Result<usize>;
    /// What a sequence holds and has reached, without ending it.
    fn report(&self, seq: &Self::Seq) -> Result<SeqReport>;
    /// Reports a finished sequence and frees its blocks.
    fn finish(&mut self, seq: Self::Seq) -> Result<SeqReport> {
        let report = self.report(&seq);
        self.release(seq);
        report
    }
    /// Whether [`BatchEngine::extend`] can continue a sequence's prompt pass (prefix caching
    /// needs it).
    fn extends(&self) -> bool {
        false
    }
    /// Prefills `ids` after the tokens `seq` has seen (a prompt continued from a cached state),
    /// in chunks of `chunk` tokens (0: one pass); returns the next-token logits. On an error the
    /// caller releases the sequence.
    fn extend(&mut self, seq: &mut Self::Seq, ids: &[u32], chunk: usize) -> Result<Vec<f32>> {
        let _ = (seq, ids, chunk);
        anyhow::bail!("this engine cannot continue a prompt pass")
    }
    /// Frees a sequence's blocks without a report (after an error, or a prefix-cache state given
    /// back).
    fn release(&mut self, seq: Self::Seq);
    /// Starts the memory peaks `seq` reports from what it holds now (a copy of a cached state,
    /// whose source's peaks belong to another request).
    fn reset_peaks(&mut self, seq: &mut Self::Seq) {
        let _ = seq;
    }
    /// Preempts a sequence: its blocks go back to the pool, its rows swapped out or dropped.
    fn park(&mut self, seq: Self::Seq) -> Result<Parked<Self::Parked>>;
    /// Blocks resuming a dropped sequence of `context` tokens (one prompt pass, and its own next
    /// step) needs beside `running` others.
    fn recompute_need(&self, context: usize, running: usize) -> usize;
    /// Blocks resuming `parked` needs beside `running` others.
    fn resume_need(&self, parked: &Self::Parked, running: usize) -> usize;
    /// Brings a parked sequence back, or gives it back when its blocks are not free.
    fn unpark(&mut self, parked: Self::Parked) -> std::result::Result<Self::Seq, Self::Parked>;
    /// Memory of the sequence now.
    fn usage(&self, seq: &Self::Seq) -> Result<MemoryUsage>;
    /// Memory of the whole pool now.
    fn pool_usage(&self) -> Result<PoolUsage>;
}
