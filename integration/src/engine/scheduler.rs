//! Continuous batching over the shared block pool.
//!
//! Sequences decode together in one forward pass, each with its own rows (and its own policy:
//! per-request A/B). A request is admitted when the pool can hold its prompt without eviction
//! plus one block per row of every running sequence; before each decode step the scheduler
//! makes sure every row that may need a new block gets one, preempting the most recently admitted
//! sequence (its rows are swapped out of the pool, slot for slot, and swapped back in later, so it
//! resumes with identical output).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Result};
use dms_policy::PolicyFactory;
use rand::{rngs::StdRng, SeedableRng};

use crate::engine::{sample, Engine, GenParams};
use crate::kv::sequence::SequenceCache;
use crate::kv::store::{KvStore, MemoryUsage, SwappedRow};

/// One generation request.
#[derive(Clone)]
pub struct Request {
    /// Caller's id.
    pub id: usize,
    /// Prompt token ids.
    pub prompt: Vec<u32>,
    /// Tokens fed after the prompt instead of sampled ones (teacher forcing), if any; generation
    /// then lasts `forced.len()` steps.
    pub forced: Option<Vec<u32>>,
    /// Policy of this request.
    pub policy: Arc<dyn PolicyFactory>,
    /// This request's own sampling and stopping settings (a server's per-request fields), or
    /// `None` for the scheduler's. Its sampler is then seeded with exactly `params.seed`, so a
    /// seeded request samples the same tokens whatever else runs; `prefill_chunk` is always the
    /// scheduler's.
    pub params: Option<GenParams>,
}

/// Why a request stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// It produced an end-of-sequence token.
    Stop,
    /// It reached its token limit (or the end of its forced tokens).
    Length,
    /// The caller cancelled it ([`Scheduler::cancel`]).
    Cancelled,
}

/// A finished request.
pub struct Finished {
    /// Caller's id.
    pub id: usize,
    /// Generated (or forced) tokens.
    pub tokens: Vec<u32>,
    /// The logits each token was chosen from (`[vocab]` each), when asked for.
    pub step_logits: Vec<Vec<f32>>,
    /// Compression ratio of the sequence when it finished.
    pub compression_ratio: f64,
    /// For shadow policies: the compression ratio the shadowed policy would have reached.
    pub shadow_compression_ratio: Option<f64>,
    /// Times the sequence was preempted.
    pub preemptions: usize,
    /// Memory the sequence held when it finished.
    pub usage: MemoryUsage,
    /// Most bytes of blocks the sequence held at once.
    pub peak_allocated: u64,
    /// Kept fraction (slots over tokens seen) of each layer when it finished.
    pub layer_kept_fraction: Vec<f64>,
    /// Most bytes live (occupied slots) the sequence held at once.
    pub peak_live: u64,
    /// Why it stopped.
    pub finish_reason: FinishReason,
}

/// Aggregate figures of a batch run.
#[derive(Debug, Clone, Default)]
pub struct BatchStats {
    /// Most sequences decoding at once.
    pub max_running: usize,
    /// Decode steps (forward passes).
    pub decode_steps: usize,
    /// Tokens produced by decode steps, summed over sequences.
    pub decode_tokens: usize,
    /// Seconds in decode steps.
    pub decode_secs: f64,
    /// Prompt tokens prefilled.
    pub prefill_tokens: usize,
    /// Seconds in prefill.
    pub prefill_secs: f64,
    /// Preemptions.
    pub preemptions: usize,
    /// Peak bytes of blocks held.
    pub peak_allocated: u64,
    /// Peak bytes live.
    pub peak_live: u64,
    /// (tokens generated so far, bytes live, bytes allocated) after every step.
    pub memory_trace: Vec<(usize, u64, u64)>,
}

impl BatchStats {
    /// Sequences per decode step on average (the concurrency the pool sustained).
    pub fn mean_running(&self) -> f64 {
        self.decode_tokens as f64 / self.decode_steps.max(1) as f64
    }

    /// Aggregate decode throughput (tokens per second over all sequences).
    pub fn decode_tok_s(&self) -> f64 {
        self.decode_tokens as f64 / self.decode_secs.max(1e-9)
    }
}

struct Running {
    req: Request,
    cache: SequenceCache,
    tokens: Vec<u32>,
    logits: Vec<f32>,
    step_logits: Vec<Vec<f32>>,
    preemptions: usize,
    /// The last chosen token has not been fed yet.
    pending: bool,
    /// This request's sampler (seeded with `params.seed + id`).
    rng: StdRng,
    /// Most bytes of blocks held so far.
    peak_allocated: u64,
    /// Most bytes live so far.
    peak_live: u64,
}

impl Running {
    /// Updates the peak figures from the store.
    fn note_usage(&mut self, store: &KvStore) {
        let u = self.cache.usage(store);
        self.peak_allocated = self.peak_allocated.max(u.bytes_allocated);
        self.peak_live = self.peak_live.max(u.bytes_live);
    }

    /// Releases the sequence's blocks and reports it.
    fn finish(self, store: &mut KvStore, finish_reason: FinishReason) -> Finished {
        let compression_ratio = self.cache.compression_ratio(store);
        let shadow_compression_ratio = self.cache.shadow_compression_ratio(store);
        let usage = self.cache.usage(store);
        let layer_kept_fraction =
            (0..self.cache.shape().n_layers).map(|l| 1.0 / self.cache.layer_compression_ratio(l, store)).collect();
        self.cache.release(store);
        Finished {
            id: self.req.id,
            tokens: self.tokens,
            step_logits: self.step_logits,
            compression_ratio,
            shadow_compression_ratio,
            preemptions: self.preemptions,
            usage,
            peak_allocated: self.peak_allocated,
            layer_kept_fraction,
            peak_live: self.peak_live,
            finish_reason,
        }
    }
}

struct Swapped {
    run: Running,
    rows: Vec<SwappedRow>,
}

fn max_new(req: &Request, params: &GenParams) -> usize {
    req.forced.as_ref().map_or(req.params.as_ref().unwrap_or(params).max_tokens, |f| f.len())
}

/// Serves `requests` with at most `max_batch` sequences at once. `keep_logits` keeps every
/// step's logits in the results. Sampling follows `params` (one RNG per request, seeded with
/// `params.seed + id`). `progress` is told how many requests have finished after each one.
pub fn run_batch(
    engine: &mut Engine,
    requests: Vec<Request>,
    params: &GenParams,
    max_batch: usize,
    keep_logits: bool,
    mut progress: impl FnMut(usize),
) -> Result<(Vec<Finished>, BatchStats)> {
    let mut sched = Scheduler::new(params.clone(), max_batch, keep_logits)?;
    for r in requests {
        sched.submit(engine, r)?;
    }
    let mut done = Vec::new();
    while !sched.is_idle() {
        for f in sched.step(engine)? {
            done.push(f);
            progress(done.len());
        }
    }
    done.sort_by_key(|f| f.id);
    Ok((done, sched.stats))
}

/// A sequence's state shown to a [`Scheduler::step_observed`] observer.
pub struct Observed<'a> {
    /// The request's id.
    pub id: usize,
    /// 0 after the prompt, s after the s-th chosen token was fed.
    pub step: usize,
    /// The sequence's rows and policy.
    pub cache: &'a SequenceCache,
    /// The store holding them.
    pub store: &'a KvStore,
    /// Its next-token logits.
    pub logits: &'a [f32],
}

/// A callback shown each [`Observed`] state.
pub type Observer<'o> = dyn FnMut(Observed<'_>) -> Result<()> + 'o;

/// Continuous batching, one iteration at a time: requests can be submitted between steps (a
/// server) or all at once ([`run_batch`]).
///
/// Each [`Scheduler::step`] resumes swapped-out sequences and admits waiting requests while the
/// pool has room (prompt without eviction plus one block per row of every running sequence),
/// chooses each running sequence's next token and retires the finished ones, preempts the most
/// recently admitted sequences until every row that may need a block has one, and runs one
/// batched decode step.
pub struct Scheduler {
    params: GenParams,
    max_batch: usize,
    keep_logits: bool,
    waiting: VecDeque<Request>,
    running: Vec<Running>,
    swapped: VecDeque<Swapped>,
    generated_total: usize,
    chosen: Vec<(usize, u32)>,
    /// Figures of everything run so far.
    pub stats: BatchStats,
}

impl Scheduler {
    /// An idle scheduler running at most `max_batch` sequences at once.
    pub fn new(params: GenParams, max_batch: usize, keep_logits: bool) -> Result<Self> {
        if max_batch == 0 {
            bail!("max_batch must be at least 1");
        }
        Ok(Self {
            params,
            max_batch,
            keep_logits,
            waiting: VecDeque::new(),
            running: Vec::new(),
            swapped: VecDeque::new(),
            generated_total: 0,
            chosen: Vec::new(),
            stats: BatchStats::default(),
        })
    }

    /// Queues a request after checking that the engine's model can serve its policy.
    pub fn submit(&mut self, engine: &Engine, req: Request) -> Result<()> {
        engine.check_policy(req.policy.as_ref())?;
        if req.prompt.is_empty() {
            bail!("request {} has an empty prompt", req.id);
        }
        self.waiting.push_back(req);
        Ok(())
    }

    /// True when nothing is waiting, running or swapped out.
    pub fn is_idle(&self) -> bool {
        self.waiting.is_empty() && self.running.is_empty() && self.swapped.is_empty()
    }

    /// Requests waiting for admission, preempted ones included.
    pub fn waiting_count(&self) -> usize {
        self.waiting.len() + self.swapped.len()
    }

    /// Requests decoding now.
    pub fn running_count(&self) -> usize {
        self.running.len()
    }

    /// Ids and memory of the sequences decoding now.
    pub fn running_usage(&self, store: &KvStore) -> Vec<(usize, MemoryUsage)> {
        self.running.iter().map(|r| (r.req.id, r.cache.usage(store))).collect()
    }

    /// The tokens chosen in the last [`Scheduler::step`], as (request id, token), in the order
    /// chosen (for streaming).
    pub fn chosen(&self) -> &[(usize, u32)] {
        &self.chosen
    }

    /// Removes request `id` wherever it is. A running sequence's blocks return to the pool at
    /// once and it is reported with [`FinishReason::Cancelled`]; a waiting or preempted one is
    /// dropped (`None`), as is an unknown id.
    pub fn cancel(&mut self, engine: &mut Engine, id: usize) -> Option<Finished> {
        if let Some(i) = self.running.iter().position(|r| r.req.id == id) {
            return Some(self.running.remove(i).finish(&mut engine.store, FinishReason::Cancelled));
        }
        self.waiting.retain(|r| r.id != id);
        self.swapped.retain(|s| s.run.req.id != id);
        None
    }

    /// One iteration (see [`Scheduler`]); returns the requests that finished in it.
    pub fn step(&mut self, engine: &mut Engine) -> Result<Vec<Finished>> {
        self.step_observed(engine, &mut |_| Ok(()))
    }

    /// [`Scheduler::step`], showing `observe` every sequence's state after its prefill and after
    /// each of its decode steps (for traces).
    pub fn step_observed(&mut self, engine: &mut Engine, observe: &mut Observer<'_>) -> Result<Vec<Finished>> {
        self.chosen.clear();
        self.resume(engine);
        self.admit(engine, observe)?;
        if self.running.is_empty() {
            if self.is_idle() {
                return Ok(Vec::new());
            }
            bail!("no sequence can run: the pool is too small for the waiting requests");
        }
        let finished = self.choose_and_retire(engine);
        if !self.running.is_empty() {
            self.make_room(engine)?;
            self.decode(engine, observe)?;
        }
        Ok(finished)
    }

    /// Drops every request, returning the blocks of running sequences to the pool (after an error,
    /// or to cancel everything).
    pub fn release_all(&mut self, engine: &mut Engine) {
        for r in self.running.drain(..) {
            r.cache.release(&mut engine.store);
        }
        self.swapped.clear();
        self.waiting.clear();
    }

    /// Swaps preempted sequences back in, oldest preemption first, while they fit.
    fn resume(&mut self, engine: &mut Engine) {
        let blocks = engine.block_manager();
        while let Some(s) = self.swapped.front() {
            if self.running.len() >= self.max_batch || !blocks.can_resume(&engine.store, &s.rows, self.running.len()) {
                break;
            }
            let mut s = self.swapped.pop_front().expect("front exists");
            if let Err(rows_back) = s.run.cache.swap_in(&mut engine.store, s.rows) {
                s.rows = rows_back;
                self.swapped.push_front(s);
                break;
            }
            self.running.push(s.run);
        }
    }

    /// Admits waiting requests in order (none while a preempted sequence waits) and prefills them.
    fn admit(&mut self, engine: &mut Engine, observe: &mut Observer<'_>) -> Result<()> {
        let blocks = engine.block_manager();
        while self.swapped.is_empty() && self.running.len() < self.max_batch {
            let Some(req) = self.waiting.front() else { break };
            if !blocks.can_admit(&engine.store, req.prompt.len(), self.running.len()) {
                if self.running.is_empty() {
                    bail!(
                        "request {} cannot be served: its prompt of {} tokens needs {} blocks but the pool has {} free of {} (raise [cache] memory_mb or max_tokens)",
                        req.id, req.prompt.len(), blocks.admission_need(req.prompt.len(), 0), engine.store.free_block_count(), engine.store.capacity_blocks()
                    );
                }
                break;
            }
            let req = self.waiting.pop_front().expect("front exists");
            let mut cache = engine.new_sequence_with(req.policy.as_ref());
            let t0 = Instant::now();
            let logits = match engine.prefill(&mut cache, &req.prompt, self.params.prefill_chunk) {
                Ok(l) => l,
                Err(e) => {
                    cache.release(&mut engine.store);
                    return Err(e);
                }
            };
            self.stats.prefill_secs += t0.elapsed().as_secs_f64();
            self.stats.prefill_tokens += req.prompt.len();
            let seed = match &req.params {
                Some(p) => p.seed,
                None => self.params.seed.wrapping_add(req.id as u64),
            };
            let rng = StdRng::seed_from_u64(seed);
            let usage = cache.usage(&engine.store);
            self.running.push(Running {
                req,
                cache,
                tokens: Vec::new(),
                logits,
                step_logits: Vec::new(),
                preemptions: 0,
                pending: false,
                rng,
                peak_allocated: usage.bytes_allocated,
                peak_live: usage.bytes_live,
            });
            let r = self.running.last().expect("just pushed");
            observe(Observed { id: r.req.id, step: 0, cache: &r.cache, store: &engine.store, logits: &r.logits })?;
        }
        Ok(())
    }

    /// Chooses each running sequence's next token from its last logits; retires finished ones.
    fn choose_and_retire(&mut self, engine: &mut Engine) -> Vec<Finished> {
        let mut finished = Vec::new();
        let eos = &engine.model.config().eos_token_ids;
        let mut i = 0;
        while i < self.running.len() {
            let r = &mut self.running[i];
            if r.pending {
                i += 1;
                continue;
            }
            let params = r.req.params.as_ref().unwrap_or(&self.params);
            let step = r.tokens.len();
            let next = match &r.req.forced {
                Some(f) => f[step],
                None => sample(&r.logits, params, &mut r.rng),
            };
            let stop_at_eos = params.stop_at_eos;
            if self.keep_logits {
                r.step_logits.push(std::mem::take(&mut r.logits));
            }
            r.tokens.push(next);
            r.pending = true;
            self.generated_total += 1;
            self.chosen.push((r.req.id, next));
            let reason = if r.req.forced.is_none() && stop_at_eos && eos.contains(&next) {
                Some(FinishReason::Stop)
            } else if r.tokens.len() >= max_new(&r.req, &self.params) {
                Some(FinishReason::Length)
            } else {
                None
            };
            match reason {
                Some(reason) => finished.push(self.running.remove(i).finish(&mut engine.store, reason)),
                None => i += 1,
            }
        }
        finished
    }

    /// Preempts the most recently admitted sequences until the next step's blocks are free.
    fn make_room(&mut self, engine: &mut Engine) -> Result<()> {
        loop {
            let need = engine.block_manager().next_step_need(&engine.store, self.running.iter().map(|r| &r.cache));
            if need <= engine.store.free_block_count() {
                return Ok(());
            }
            if self.running.len() == 1 {
                bail!("the pool is too small for a single sequence to continue (need {need} blocks; raise [cache] memory_mb or max_tokens)");
            }
            let mut victim = self.running.pop().expect("at least two running");
            let rows = victim.cache.swap_out(&mut engine.store)?;
            victim.preemptions += 1;
            self.stats.preemptions += 1;
            self.swapped.push_front(Swapped { run: victim, rows });
        }
    }

    /// One batched decode step of every running sequence's chosen token.
    fn decode(&mut self, engine: &mut Engine, observe: &mut Observer<'_>) -> Result<()> {
        self.stats.max_running = self.stats.max_running.max(self.running.len());
        let t0 = Instant::now();
        let tokens: Vec<u32> = self.running.iter().map(|r| *r.tokens.last().expect("one token chosen")).collect();
        let logits = engine.decode(self.running.iter_mut().map(|r| &mut r.cache).collect(), &tokens)?;
        for (r, l) in self.running.iter_mut().zip(logits) {
            r.logits = l;
            r.pending = false;
            r.note_usage(&engine.store);
            let step = r.tokens.len();
            observe(Observed { id: r.req.id, step, cache: &r.cache, store: &engine.store, logits: &r.logits })?;
        }
        let stats = &mut self.stats;
        stats.decode_secs += t0.elapsed().as_secs_f64();
        stats.decode_steps += 1;
        stats.decode_tokens += self.running.len();
        let u = engine.store.usage();
        stats.peak_allocated = stats.peak_allocated.max(u.bytes_allocated);
        stats.peak_live = stats.peak_live.max(u.bytes_live);
        stats.memory_trace.push((self.generated_total, u.bytes_live, u.bytes_allocated));
        Ok(())
    }
}
