//! Continuous batching: the one decode loop, over any [`BatchEngine`] (the host store or the
//! device cache).
//!
//! Sequences decode together in one forward pass, each with its own rows (and, on the host, its
//! own policy: per-request A/B). A request is admitted when the pool can hold its prompt without
//! eviction plus headroom for the running sequences; before each decode step the scheduler makes
//! sure the step's blocks are free, preempting the most recently admitted sequence (swapped out
//! slot for slot and back, or dropped and recomputed, as the engine does it), so it resumes with
//! identical output. With prefix caching on ([`crate::engine::prefix_cache`]) a prompt starts
//! from the longest kept state it begins with, and kept states give their blocks back before
//! anything is preempted. With a prefill budget ([`Scheduler::set_prefill_budget`]) a long prompt
//! is fed a part per step while the running sequences go on decoding, as vLLM's chunked prefill
//! does. A failed prompt pass or decode step fails the request that causes it and no other (see
//! `Scheduler::isolate`).

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Result};
use dms_policy::PolicyFactory;
use rand::{rngs::StdRng, SeedableRng};

use crate::engine::batch_engine::{BatchEngine, Parked, PoolUsage, SeqReport, Started};
use crate::engine::constraint::TokenConstraint;
use crate::engine::prefix_cache::{policy_takes_part, PrefixCache, PrefixPlan};
use crate::engine::{sample, token_logprobs, GenParams, LogitAdjustments, TokenLogprobs};
use crate::kv::store::MemoryUsage;

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

/// A token chosen in the last iteration.
#[derive(Debug, Clone)]
pub struct Chosen {
    /// The request's id.
    pub id: usize,
    /// The token.
    pub token: u32,
    /// Its log-probabilities, when the request asked for them ([`Scheduler::want_logprobs`]).
    pub logprobs: Option<TokenLogprobs>,
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
    /// Prompt tokens taken from a cached state instead of prefilled ([`Scheduler::enable_prefix_cache`]).
    pub cached_tokens: usize,
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
    /// Prompt tokens prefilled, as they are fed (not those taken from cached states; a prompt
    /// pass started again counts again).
    pub prefill_tokens: usize,
    /// Seconds in prefill.
    pub prefill_secs: f64,
    /// Preemptions.
    pub preemptions: usize,
    /// Sequences that started as a copy of another with the same prompt and policy (no
    /// prompt pass of their own).
    pub forked: usize,
    /// Prompts that started from a cached state ([`Scheduler::enable_prefix_cache`]).
    pub prefix_hits: usize,
    /// Prompt tokens taken from cached states instead of prefilled.
    pub prefix_tokens: usize,
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

    /// Adds the figures of a batch run after this one (its memory trace continues this one's).
    pub fn absorb(&mut self, later: &BatchStats) {
        self.max_running = self.max_running.max(later.max_running);
        self.decode_steps += later.decode_steps;
        self.decode_tokens += later.decode_tokens;
        self.decode_secs += later.decode_secs;
        self.prefill_tokens += later.prefill_tokens;
        self.prefill_secs += later.prefill_secs;
        self.preemptions += later.preemptions;
        self.forked += later.forked;
        self.prefix_hits += later.prefix_hits;
        self.prefix_tokens += later.prefix_tokens;
        self.peak_allocated = self.peak_allocated.max(later.peak_allocated);
        self.peak_live = self.peak_live.max(later.peak_live);
        let offset = self.memory_trace.last().map_or(0, |t| t.0);
        self.memory_trace.extend(later.memory_trace.iter().map(|&(n, live, held)| (n + offset, live, held)));
    }
}

/// A request's generation so far, wherever its sequence is.
struct Progress {
    req: Request,
    tokens: Vec<u32>,
    logits: Vec<f32>,
    step_logits: Vec<Vec<f32>>,
    preemptions: usize,
    /// The last chosen token has not been fed yet.
    pending: bool,
    /// This request's sampler (seeded with `params.seed + id`, or its own `params.seed`).
    rng: StdRng,
    /// Most bytes of blocks and live bytes held before a recomputation.
    peak_allocated: u64,
    peak_live: u64,
    /// It was in a batch whose decode step failed with no one to blame: it resumes on trial,
    /// beside no other sequence on trial, until one of its decode steps succeeds.
    on_trial: bool,
    /// Prompt tokens taken from a cached state.
    cached_tokens: usize,
}

impl Progress {
    /// The report of the finished request.
    fn finished(self, report: SeqReport, finish_reason: FinishReason) -> Finished {
        Finished {
            id: self.req.id,
            tokens: self.tokens,
            step_logits: self.step_logits,
            compression_ratio: report.compression_ratio,
            shadow_compression_ratio: report.shadow_compression_ratio,
            preemptions: self.preemptions,
            usage: report.usage,
            peak_allocated: report.peak_allocated.max(self.peak_allocated),
            layer_kept_fraction: report.layer_kept_fraction,
            peak_live: report.peak_live.max(self.peak_live),
            cached_tokens: self.cached_tokens,
            finish_reason,
        }
    }

    /// The tokens its sequence has seen (the last chosen one is not fed yet while `pending`) and
    /// the logits that follow them.
    fn fed_state(&self) -> (Vec<u32>, Option<Vec<f32>>) {
        let fed = self.tokens.len() - usize::from(self.pending);
        let tokens = self.req.prompt.iter().chain(&self.tokens[..fed]).copied().collect();
        // Kept logits move into `step_logits` as each token is chosen.
        let logits = if self.logits.is_empty() { self.step_logits.last().cloned() } else { Some(self.logits.clone()) };
        (tokens, logits)
    }
}

struct Running<S> {
    p: Progress,
    seq: S,
}

/// A prompt pass under way.
struct Pass<S> {
    /// The sequence and its next-token logits, once some of the prompt is in it.
    cur: Option<(S, Vec<f32>)>,
    /// Prompt tokens the sequence has seen.
    at: usize,
    /// Prompt tokens taken from a cached state.
    cached: usize,
    /// Where a copy of the state goes to the prefix cache.
    snapshot_at: Option<usize>,
    /// The prompt's log-probabilities asked for (such a pass is never split), and what they were.
    score: Option<usize>,
    scored: Vec<TokenLogprobs>,
}

/// A request whose prompt pass the prefill budget split over steps.
struct Prefilling<S> {
    req: Request,
    pass: Pass<S>,
}

/// A preempted request: its rows (when the engine swaps) or nothing (it resumes by
/// recomputing its prompt and generated tokens).
struct Preempted<P> {
    p: Progress,
    parked: Option<P>,
}

impl<P> Preempted<P> {
    /// A preempted request and what preempting it left; a dropped sequence's peaks stay with it.
    fn new(mut p: Progress, parked: Parked<P>) -> Self {
        match parked {
            Parked::Rows(rows) => Self { p, parked: Some(rows) },
            Parked::Dropped { peak_allocated, peak_live } => {
                p.peak_allocated = p.peak_allocated.max(peak_allocated);
                p.peak_live = p.peak_live.max(peak_live);
                Self { p, parked: None }
            }
        }
    }
}

impl Request {
    /// Tokens the request produces at most: its forced tokens, or its `max_tokens` (its own
    /// `params`, else `params`).
    pub fn max_new(&self, params: &GenParams) -> usize {
        self.forced.as_ref().map_or(self.params.as_ref().unwrap_or(params).max_tokens, |f| f.len())
    }
}

/// Serves `requests` on `engine` with at most `max_batch` sequences at once. `keep_logits` keeps
/// every step's logits in the results. Sampling follows `params` (one RNG per request, seeded
/// with `params.seed + id`). `progress` is told how many requests have finished after each one.
pub fn run_batch<E: BatchEngine>(
    engine: &mut E,
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
        let failed = sched.step(engine).and_then(|finished| {
            for f in finished {
                done.push(f);
                progress(done.len());
            }
            // A batch run needs every result: one request's failure is the run's.
            sched.take_failed().into_iter().next().map_or(Ok(()), |(_, e)| Err(e))
        });
        if let Err(e) = failed {
            sched.release_all(engine);
            return Err(e);
        }
    }
    done.sort_by_key(|f| f.id);
    Ok((done, sched.stats))
}

/// A sequence's state shown to a [`Scheduler::step_observed`] observer.
pub struct Observed<'a, E: BatchEngine> {
    /// The request's id.
    pub id: usize,
    /// 0 after the prompt, s after the s-th chosen token was fed.
    pub step: usize,
    /// The sequence's storage handle.
    pub seq: &'a E::Seq,
    /// The engine holding it.
    pub engine: &'a E,
    /// Its next-token logits.
    pub logits: &'a [f32],
}

/// A callback shown each [`Observed`] state.
pub type Observer<'o, E> = dyn FnMut(Observed<'_, E>) -> Result<()> + 'o;

/// Continuous batching, one iteration at a time: requests can be submitted between steps (a
/// server) or all at once ([`run_batch`]). It plans from the engine's answers about free blocks
/// and the engine executes, on the host store or the device cache alike.
///
/// Each [`Scheduler::step`] resumes preempted sequences and admits waiting requests while the
/// pool has room (the engine's admission need: the prompt without eviction plus headroom for the
/// running sequences), chooses each running sequence's next token and retires the finished ones,
/// preempts the most recently admitted sequences until the next step's blocks are free, and runs
/// one batched decode step. Prefix-cache states ([`Scheduler::enable_prefix_cache`]) are given
/// back, least recently used first, whenever admission, a resume or the next step needs blocks.
/// Under a prefill budget ([`Scheduler::set_prefill_budget`]) a prompt pass may span steps: the
/// one under way is fed its next part before anything is admitted.
pub struct Scheduler<E: BatchEngine> {
    params: GenParams,
    max_batch: usize,
    keep_logits: bool,
    waiting: VecDeque<Request>,
    running: Vec<Running<E::Seq>>,
    preempted: VecDeque<Preempted<E::Parked>>,
    generated_total: usize,
    chosen: Vec<Chosen>,
    /// Requests that asked for log-probabilities, with how many top tokens.
    logprobs: HashMap<usize, usize>,
    /// Requests whose logits are adjusted before their tokens are chosen.
    adjustments: HashMap<usize, LogitAdjustments>,
    /// Requests whose tokens must follow a grammar.
    constraints: HashMap<usize, Box<dyn TokenConstraint>>,
    /// Requests not yet admitted that asked for their prompt's log-probabilities.
    prompt_logprobs: HashMap<usize, usize>,
    /// Prompts scored in the last step.
    scored: Vec<(usize, Vec<TokenLogprobs>)>,
    failed: Vec<(usize, anyhow::Error)>,
    /// Kept states of token prefixes, when prefix caching is on.
    prefixes: Option<PrefixCache<E::Seq>>,
    /// Prompt tokens fed per step at most (`None`: whole prompts).
    prefill_budget: Option<usize>,
    /// The prompt pass split over steps, at most one at a time.
    prefilling: Option<Prefilling<E::Seq>>,
    /// Requests whose pass was given up and that wait to start again.
    requeued: HashSet<usize>,
    /// Figures of everything run so far.
    pub stats: BatchStats,
}

impl<E: BatchEngine> Scheduler<E> {
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
            preempted: VecDeque::new(),
            generated_total: 0,
            chosen: Vec::new(),
            logprobs: HashMap::new(),
            adjustments: HashMap::new(),
            constraints: HashMap::new(),
            prompt_logprobs: HashMap::new(),
            scored: Vec::new(),
            failed: Vec::new(),
            prefixes: None,
            prefill_budget: None,
            prefilling: None,
            requeued: HashSet::new(),
            stats: BatchStats::default(),
        })
    }

    /// Feeds at most `tokens` prompt tokens per step (vLLM's chunked prefill): a longer prompt is
    /// fed a part per step, one such prompt at a time, while the running sequences decode, so a
    /// long prompt no longer stalls them for its whole pass. Prompts to score, and those of
    /// attention-scored policies (whose kept sets depend on where a pass is cut), still get whole
    /// passes, and so does a preempted sequence resumed by recomputing its tokens. Returns false
    /// (and feeds whole prompts) on an engine that cannot continue a prompt pass, or for 0 tokens.
    pub fn set_prefill_budget(&mut self, engine: &E, tokens: usize) -> bool {
        self.prefill_budget = (engine.extends() && tokens > 0).then_some(tokens);
        self.prefill_budget.is_some()
    }

    /// Turns prefix caching on (see [`crate::engine::prefix_cache`]): ended sequences and the
    /// shared starts of prompts are kept in the pool, given back when blocks are needed, and a
    /// prompt that starts with a kept state prefills only the rest. Returns false (and stays
    /// off) on an engine that cannot continue a prompt pass.
    pub fn enable_prefix_cache(&mut self, engine: &E) -> bool {
        if engine.extends() && self.prefixes.is_none() {
            self.prefixes = Some(PrefixCache::default());
        }
        self.prefixes.is_some()
    }

    /// States kept by the prefix cache now.
    pub fn prefix_cache_len(&self) -> usize {
        self.prefixes.as_ref().map_or(0, |c| c.len())
    }

    /// Bytes the prefix cache's states hold in the pool now.
    pub fn prefix_cache_usage(&self, engine: &E) -> Result<PoolUsage> {
        let mut total = PoolUsage::default();
        for seq in self.prefixes.iter().flat_map(|c| c.states()) {
            let u = engine.usage(seq)?;
            total.bytes_live += u.bytes_live;
            total.bytes_allocated += u.bytes_allocated;
        }
        Ok(total)
    }

    /// Queues a request after checking that the engine can serve it.
    pub fn submit(&mut self, engine: &E, req: Request) -> Result<()> {
        if req.prompt.is_empty() {
            bail!("request {} has an empty prompt", req.id);
        }
        let (prompt, max_new) = (req.prompt.len(), req.max_new(&self.params));
        let longest = prompt.saturating_add(max_new);
        if longest > engine.context_length() {
            bail!(
                "request {}: the prompt ({prompt} tokens) plus at most {max_new} new tokens exceeds the model's \
                 context length ({} tokens)",
                req.id,
                engine.context_length()
            );
        }
        engine.check_request(&req, longest)?;
        self.waiting.push_back(req);
        Ok(())
    }

    /// True when nothing is waiting, prefilling, running or preempted.
    pub fn is_idle(&self) -> bool {
        self.waiting.is_empty() && self.running.is_empty() && self.preempted.is_empty() && self.prefilling.is_none()
    }

    /// Requests waiting for their first token: waiting for admission, preempted, or with their
    /// prompt pass under way.
    pub fn waiting_count(&self) -> usize {
        self.waiting.len() + self.preempted.len() + usize::from(self.prefilling.is_some())
    }

    /// Requests decoding now.
    pub fn running_count(&self) -> usize {
        self.running.len()
    }

    /// Ids and memory of the sequences decoding now.
    pub fn running_usage(&self, engine: &E) -> Result<Vec<(usize, MemoryUsage)>> {
        self.running.iter().map(|r| Ok((r.p.req.id, engine.usage(&r.seq)?))).collect()
    }

    /// The tokens chosen in the last [`Scheduler::step`], as (request id, token), in the order
    /// chosen (for streaming).
    pub fn chosen(&self) -> &[Chosen] {
        &self.chosen
    }

    /// Asks for the log-probabilities of request `id`'s tokens, with its `top` most likely
    /// alternatives, in [`Self::chosen`] from now on.
    pub fn want_logprobs(&mut self, id: usize, top: usize) {
        self.logprobs.insert(id, top);
    }

    /// Adjusts request `id`'s logits (biases and penalties) before each of its tokens is chosen;
    /// its log-probabilities stay the model's.
    pub fn adjust_logits(&mut self, id: usize, adjustments: LogitAdjustments) {
        self.adjustments.insert(id, adjustments);
    }

    /// Constrains request `id`'s tokens to `constraint` (after its logit adjustments); the
    /// request ends when the constraint is complete, and fails if the constraint errs.
    pub fn constrain(&mut self, id: usize, constraint: Box<dyn TokenConstraint>) {
        self.constraints.insert(id, constraint);
    }

    /// Drops what was asked for request `id` (it ended).
    fn forget(&mut self, id: usize) {
        self.logprobs.remove(&id);
        self.adjustments.remove(&id);
        self.constraints.remove(&id);
        self.prompt_logprobs.remove(&id);
    }

    /// Asks for the log-probabilities of request `id`'s prompt tokens (each after the first, with
    /// its `top` most likely alternatives), computed in its prompt pass and shown in
    /// [`Self::scored_prompts`] after the step that admits it. Such a request gets a prompt pass
    /// of its own (it does not start as a copy of another).
    pub fn want_prompt_logprobs(&mut self, id: usize, top: usize) {
        self.prompt_logprobs.insert(id, top);
    }

    /// The prompts scored in the last [`Scheduler::step`], as (request id, one entry per prompt
    /// token after the first).
    pub fn scored_prompts(&self) -> &[(usize, Vec<TokenLogprobs>)] {
        &self.scored
    }

    /// Removes request `id` wherever it is. A running sequence is reported with
    /// [`FinishReason::Cancelled`] and its blocks return to the pool at once (or stay as a
    /// prefix-cache state, given back whenever blocks are needed); a waiting or preempted one is
    /// dropped (`None`), as is one whose prompt pass is under way, and an unknown id.
    pub fn cancel(&mut self, engine: &mut E, id: usize) -> Result<Option<Finished>> {
        self.forget(id);
        if let Some(i) = self.running.iter().position(|r| r.p.req.id == id) {
            let r = self.running.remove(i);
            return self.retire(engine, r, FinishReason::Cancelled).map(Some);
        }
        if self.prefilling.as_ref().is_some_and(|pf| pf.req.id == id) {
            self.drop_prefilling(engine);
        }
        self.requeued.remove(&id);
        self.waiting.retain(|r| r.id != id);
        self.preempted.retain(|s| s.p.req.id != id);
        Ok(None)
    }

    /// The requests dropped since the last call because their own prompt pass failed (the engine
    /// gave back what it took), with why; the others ran on.
    pub fn take_failed(&mut self) -> Vec<(usize, anyhow::Error)> {
        std::mem::take(&mut self.failed)
    }

    /// One iteration (see [`Scheduler`]); returns the requests that finished in it.
    pub fn step(&mut self, engine: &mut E) -> Result<Vec<Finished>> {
        self.step_observed(engine, &mut |_| Ok(()))
    }

    /// [`Scheduler::step`], showing `observe` every sequence's state after its prefill and after
    /// each of its decode steps (for traces).
    pub fn step_observed(&mut self, engine: &mut E, observe: &mut Observer<'_, E>) -> Result<Vec<Finished>> {
        self.chosen.clear();
        self.scored.clear();
        self.resume(engine)?;
        let mut budget = self.prefill_budget.unwrap_or(usize::MAX);
        self.continue_prefill(engine, &mut budget, observe)?;
        self.admit(engine, &mut budget, observe)?;
        if self.running.is_empty() {
            if self.is_idle() || self.prefilling.is_some() {
                return Ok(Vec::new());
            }
            bail!("no sequence can run: the pool is too small for the waiting requests");
        }
        let finished = self.choose_and_retire(engine)?;
        if !self.running.is_empty() {
            self.make_room(engine)?;
            self.decode(engine, observe)?;
        }
        Ok(finished)
    }

    /// Drops every request, returning the blocks of running sequences to the pool (after an error,
    /// or to cancel everything).
    pub fn release_all(&mut self, engine: &mut E) {
        self.logprobs.clear();
        self.adjustments.clear();
        self.constraints.clear();
        self.prompt_logprobs.clear();
        for r in self.running.drain(..) {
            engine.release(r.seq);
        }
        for seq in self.prefixes.as_mut().map(|c| c.drain()).unwrap_or_default() {
            engine.release(seq);
        }
        if let Some((seq, _)) = self.prefilling.take().and_then(|pf| pf.pass.cur) {
            engine.release(seq);
        }
        self.preempted.clear();
        self.waiting.clear();
        self.requeued.clear();
        self.failed.clear();
    }

    /// Brings preempted sequences back, oldest preemption first, while they fit: swapped rows
    /// are copied back in; a dropped sequence prefills its prompt and generated tokens again.
    fn resume(&mut self, engine: &mut E) -> Result<()> {
        while let Some(s) = self.preempted.front() {
            // One sequence on trial at a time (see `isolate`).
            let trial_taken = s.p.on_trial && self.running.iter().any(|r| r.p.on_trial);
            if self.admitted() >= self.max_batch || trial_taken {
                break;
            }
            let need = match &s.parked {
                Some(parked) => engine.resume_need(parked, self.running.len()),
                None => engine.recompute_need(s.p.req.prompt.len() + s.p.tokens.len(), self.running.len()),
            };
            if !self.reclaim(engine, need, None)? {
                break;
            }
            let Preempted { mut p, parked } = self.preempted.pop_front().expect("front exists");
            let seq = match parked {
                Some(parked) => match engine.unpark(parked) {
                    Ok(seq) => seq,
                    Err(parked) => {
                        self.preempted.push_front(Preempted { p, parked: Some(parked) });
                        break;
                    }
                },
                None => {
                    let ids: Vec<u32> = p.req.prompt.iter().chain(&p.tokens).copied().collect();
                    let t0 = Instant::now();
                    let Started { seq, logits, .. } = match engine.start(&p.req, &ids, self.params.prefill_chunk, None)
                    {
                        Ok(started) => started,
                        Err(e) => {
                            let id = p.req.id;
                            self.forget(id);
                            self.failed.push((id, e.context(format!("request {id}: resuming it failed"))));
                            continue;
                        }
                    };
                    self.stats.prefill_secs += t0.elapsed().as_secs_f64();
                    // Recomputed tokens count: they are prefill work done.
                    self.stats.prefill_tokens += ids.len();
                    p.logits = logits;
                    p.pending = false;
                    seq
                }
            };
            self.running.push(Running { p, seq });
        }
        Ok(())
    }

    /// Sequences admitted: running, or with their prompt pass under way.
    fn admitted(&self) -> usize {
        self.running.len() + usize::from(self.prefilling.is_some())
    }

    /// Feeds the next part of the prompt pass under way, within `budget` prompt tokens, when the
    /// blocks for the rest of its prompt are free; a pass that completes starts running.
    fn continue_prefill(&mut self, engine: &mut E, budget: &mut usize, observe: &mut Observer<'_, E>) -> Result<()> {
        let Some(pf) = self.prefilling.as_ref() else { return Ok(()) };
        let rest = pf.req.prompt.len() - pf.pass.at;
        // The blocks the whole prompt needs, as at admission, less those the pass holds; with
        // nothing running nothing else will free any, so the pass goes on (and fails naming the
        // pool if they are not there).
        let held = match &pf.pass.cur {
            Some((seq, _)) => engine.fork_need(seq, 0)?,
            None => 0,
        };
        let need = engine.admission_need(pf.req.prompt.len(), self.running.len()).saturating_sub(held);
        if *budget == 0 || (!self.reclaim(engine, need, None)? && !self.running.is_empty()) {
            return Ok(());
        }
        let Some(mut pf) = self.prefilling.take() else { return Ok(()) };
        let t0 = Instant::now();
        let fed = rest.min(*budget);
        if let Err(e) = self.advance_pass(engine, &pf.req, &mut pf.pass, fed) {
            let id = pf.req.id;
            self.forget(id);
            self.failed.push((id, e.context(format!("request {id}: its prompt pass failed"))));
            return Ok(());
        }
        self.stats.prefill_secs += t0.elapsed().as_secs_f64();
        *budget -= fed;
        if pf.pass.at < pf.req.prompt.len() {
            self.prefilling = Some(pf);
            return Ok(());
        }
        let (seq, logits, cached) = self.close_pass(&pf.req, pf.pass);
        self.start_running(engine, pf.req, seq, logits, cached, observe)
    }

    /// Gives up the prompt pass under way (to free its blocks, or cancelled): its sequence's
    /// blocks return to the pool and its request waits at the front of the queue.
    fn drop_prefilling(&mut self, engine: &mut E) -> Option<Request> {
        let pf = self.prefilling.take()?;
        if let Some((seq, _)) = pf.pass.cur {
            engine.release(seq);
        }
        self.requeued.insert(pf.req.id);
        Some(pf.req)
    }

    /// Admits waiting requests in order (none while a preempted sequence waits or a prompt pass
    /// is under way) and prefills them, within `budget` prompt tokens: the prompt that does not
    /// fit in what is left is fed a part per step from then on.
    fn admit(&mut self, engine: &mut E, budget: &mut usize, observe: &mut Observer<'_, E>) -> Result<()> {
        while self.preempted.is_empty() && self.prefilling.is_none() && self.running.len() < self.max_batch {
            let Some(req) = self.waiting.front() else { break };
            let t0 = Instant::now();
            // A fork needs the blocks its source holds; a prompt pass, at most the whole
            // prompt's, whatever part of it a cached state gives. A prompt to score gets a pass
            // of its own.
            let (id, prompt_len) = (req.id, req.prompt.len());
            let score = self.prompt_logprobs.get(&id).copied();
            let forked = if score.is_some() { None } else { self.fork_of(engine)? };
            // A copy feeds no prompt; a pass needs some budget left.
            if forked.is_none() && *budget == 0 {
                break;
            }
            // A request whose pass was given up was seen by the prefix cache already: it is not
            // a second prompt sharing its own start.
            let again = self.requeued.contains(&id);
            let mut plan = match (&self.prefixes, score, &forked, self.waiting.front()) {
                (Some(c), None, None, Some(req)) if !again => c.plan(&req.policy, &req.prompt),
                (Some(c), None, None, Some(req)) => {
                    PrefixPlan { snapshot_at: None, ..c.plan(&req.policy, &req.prompt) }
                }
                _ => PrefixPlan::default(),
            };
            if forked.is_none() {
                let need = engine.admission_need(prompt_len, self.running.len());
                // The state to start from stays if the prompt fits beside it; else it goes too (the
                // prompt then gets a whole pass).
                if plan.hit.is_some() && !self.reclaim(engine, need, plan.hit.map(|h| h.id))? {
                    plan.hit = None;
                }
                if !self.reclaim(engine, need, None)? {
                    if self.running.is_empty() {
                        bail!(
                            "request {id} cannot be served: its prompt of {prompt_len} tokens needs {need} blocks but the pool has {} free of {} (raise [cache] memory_mb or max_tokens)",
                            engine.free_blocks()?, engine.capacity_blocks()
                        );
                    }
                    break;
                }
            }
            let req = self.waiting.pop_front().expect("front exists");
            self.prompt_logprobs.remove(&req.id);
            if let (Some(c), None, None, false) =
                (self.prefixes.as_mut(), score, &forked, self.requeued.remove(&req.id))
            {
                c.remember(&req.policy, &req.prompt);
            }
            let (seq, logits, cached_tokens) = match forked {
                Some((seq, logits)) => {
                    self.stats.forked += 1;
                    self.stats.prefill_secs += t0.elapsed().as_secs_f64();
                    (seq, logits, 0)
                }
                None => {
                    let whole = score.is_some() || !policy_takes_part(req.policy.as_ref());
                    let mut pass = self.open_pass(engine, plan, score);
                    let limit = if whole { usize::MAX } else { *budget };
                    let fed = (req.prompt.len() - pass.at).min(limit);
                    if let Err(e) = self.advance_pass(engine, &req, &mut pass, limit) {
                        let id = req.id;
                        self.forget(id);
                        self.failed.push((id, e.context(format!("request {id}: its prompt pass failed"))));
                        continue;
                    }
                    self.stats.prefill_secs += t0.elapsed().as_secs_f64();
                    *budget = budget.saturating_sub(fed);
                    if pass.at < req.prompt.len() {
                        self.prefilling = Some(Prefilling { req, pass });
                        break;
                    }
                    self.close_pass(&req, pass)
                }
            };
            self.start_running(engine, req, seq, logits, cached_tokens, observe)?;
        }
        Ok(())
    }

    /// Puts an admitted request whose prompt pass is done among the running sequences.
    fn start_running(
        &mut self,
        engine: &mut E,
        req: Request,
        seq: E::Seq,
        logits: Vec<f32>,
        cached_tokens: usize,
        observe: &mut Observer<'_, E>,
    ) -> Result<()> {
        {
            let seed = match &req.params {
                Some(p) => p.seed,
                None => self.params.seed.wrapping_add(req.id as u64),
            };
            let p = Progress {
                req,
                tokens: Vec::new(),
                logits,
                step_logits: Vec::new(),
                preemptions: 0,
                pending: false,
                rng: StdRng::seed_from_u64(seed),
                peak_allocated: 0,
                peak_live: 0,
                on_trial: false,
                cached_tokens,
            };
            self.running.push(Running { p, seq });
            let r = self.running.last().expect("just pushed");
            observe(Observed { id: r.p.req.id, step: 0, seq: &r.seq, engine, logits: &r.p.logits })?;
        }
        Ok(())
    }

    /// A prompt pass starting from the cached state `plan` found (its tokens are not prefilled
    /// again), copying the state out where `plan` says (for later prompts), scoring the prompt
    /// with `score`.
    fn open_pass(&mut self, engine: &mut E, plan: PrefixPlan, score: Option<usize>) -> Pass<E::Seq> {
        let mut pass = Pass { cur: None, at: 0, cached: 0, snapshot_at: plan.snapshot_at, score, scored: Vec::new() };
        if let (Some(hit), Some(cache)) = (plan.hit, self.prefixes.as_mut()) {
            if let Some((state, logits)) = cache.state(hit.id) {
                let logits = logits.to_vec();
                match engine.fork(state) {
                    Ok(Some(mut seq)) => {
                        engine.reset_peaks(&mut seq);
                        cache.touch(hit.id);
                        pass.cur = Some((seq, logits));
                        pass.at = hit.tokens;
                        pass.cached = hit.tokens;
                    }
                    // A state that cannot be copied is of no use: the prompt gets a whole pass.
                    Ok(None) | Err(_) => {
                        if let Some(seq) = cache.remove(hit.id) {
                            engine.release(seq);
                        }
                    }
                }
            }
        }
        pass
    }

    /// Feeds `req`'s prompt from where `pass` is, `limit` tokens at most (the prefix cache's copy
    /// taken on the way). On an error nothing the pass took stays held.
    fn advance_pass(&mut self, engine: &mut E, req: &Request, pass: &mut Pass<E::Seq>, limit: usize) -> Result<()> {
        let (prompt, chunk) = (&req.prompt, self.params.prefill_chunk);
        let mut left = limit;
        while pass.at < prompt.len() && left > 0 {
            let mut end = prompt.len().min(pass.at.saturating_add(left));
            if let Some(s) = pass.snapshot_at.filter(|&s| s > pass.at) {
                end = end.min(s);
            }
            let fed = match pass.cur.take() {
                None => engine.start(req, &prompt[..end], chunk, pass.score).map(|s| {
                    pass.scored = s.prompt_logprobs;
                    (s.seq, s.logits)
                }),
                Some((mut seq, _)) => match engine.extend(&mut seq, &prompt[pass.at..end], chunk) {
                    Ok(logits) => Ok((seq, logits)),
                    Err(e) => {
                        engine.release(seq);
                        Err(e)
                    }
                },
            };
            let (seq, logits) = fed?;
            left -= end - pass.at;
            self.stats.prefill_tokens += end - pass.at;
            pass.at = end;
            if pass.snapshot_at == Some(end) {
                let kept = self.keep_copy(engine, &req.policy, &prompt[..end], &seq, &logits, prompt.len() - end);
                if let Err(e) = kept {
                    engine.release(seq);
                    return Err(e);
                }
            }
            pass.cur = Some((seq, logits));
        }
        Ok(())
    }

    /// The sequence of a completed pass, its next-token logits and the prompt tokens taken from
    /// the cache (the prompt's scores go to [`Self::scored_prompts`]).
    fn close_pass(&mut self, req: &Request, pass: Pass<E::Seq>) -> (E::Seq, Vec<f32>, usize) {
        let (seq, logits) = pass.cur.expect("a completed pass has fed a non-empty prompt");
        if pass.score.is_some() {
            self.scored.push((req.id, pass.scored));
        }
        let cached = pass.cached;
        self.stats.prefix_tokens += cached;
        self.stats.prefix_hits += usize::from(cached > 0);
        (seq, logits, cached)
    }

    /// Keeps a copy of `seq` (which has seen `tokens` and predicts `logits`) in the prefix cache,
    /// when the pool has room for it, beside the `rest` of `seq`'s prompt and the running
    /// sequences' next steps, once older states are given back.
    fn keep_copy(
        &mut self,
        engine: &mut E,
        policy: &Arc<dyn PolicyFactory>,
        tokens: &[u32],
        seq: &E::Seq,
        logits: &[f32],
        rest: usize,
    ) -> Result<()> {
        let need = engine.fork_need(seq, self.running.len() + 1)? + engine.admission_need(rest, 0);
        if self.prefixes.is_none() || !self.reclaim(engine, need, None)? {
            return Ok(());
        }
        let Some(cache) = self.prefixes.as_mut() else { return Ok(()) };
        if let Ok(Some(copy)) = engine.fork(seq) {
            for old in cache.insert(policy.clone(), tokens.to_vec(), copy, logits.to_vec()) {
                engine.release(old);
            }
        }
        Ok(())
    }

    /// Gives cached states back to the pool, least recently used first (never entry `keep`),
    /// until `need` blocks are free; whether they are.
    fn reclaim(&mut self, engine: &mut E, need: usize, keep: Option<u64>) -> Result<bool> {
        while engine.free_blocks()? < need {
            let Some(seq) = self.prefixes.as_mut().and_then(|c| c.evict_lru(keep)) else { return Ok(false) };
            engine.release(seq);
        }
        Ok(true)
    }

    /// Ends a running sequence with its report; with prefix caching on, its state is kept for
    /// later prompts that start with its tokens (a chat's next turn), else its blocks are freed.
    fn retire(&mut self, engine: &mut E, r: Running<E::Seq>, reason: FinishReason) -> Result<Finished> {
        let Running { p, seq } = r;
        let report = match (self.prefixes.as_mut(), p.fed_state()) {
            (Some(cache), (tokens, Some(logits))) if policy_takes_part(p.req.policy.as_ref()) => {
                let report = match engine.report(&seq) {
                    Ok(report) => report,
                    Err(e) => {
                        engine.release(seq);
                        return Err(e);
                    }
                };
                for old in cache.insert(p.req.policy.clone(), tokens, seq, logits) {
                    engine.release(old);
                }
                report
            }
            _ => engine.finish(seq)?,
        };
        Ok(p.finished(report, reason))
    }

    /// For the first waiting request: a copy of a sequence admitted in this round with the same
    /// prompt and policy (it has chosen nothing yet), with its logits, when the pool holds the
    /// copy beside the running sequences' headroom once kept states are given back: the request
    /// then needs no prompt pass of its own.
    fn fork_of(&mut self, engine: &mut E) -> Result<Option<(E::Seq, Vec<f32>)>> {
        let Some(req) = self.waiting.front() else { return Ok(None) };
        let source = self.running.iter().position(|r| {
            r.p.tokens.is_empty() && Arc::ptr_eq(&r.p.req.policy, &req.policy) && r.p.req.prompt == req.prompt
        });
        let Some(i) = source else { return Ok(None) };
        let need = engine.fork_need(&self.running[i].seq, self.running.len())?;
        if !self.reclaim(engine, need, None)? {
            return Ok(None);
        }
        let r = &self.running[i];
        Ok(engine.fork(&r.seq)?.map(|seq| (seq, r.p.logits.clone())))
    }

    /// Chooses each running sequence's next token from its last logits; retires finished ones.
    fn choose_and_retire(&mut self, engine: &mut E) -> Result<Vec<Finished>> {
        let mut finished = Vec::new();
        let mut i = 0;
        while i < self.running.len() {
            let r = &mut self.running[i].p;
            if r.pending {
                i += 1;
                continue;
            }
            if r.tokens.is_empty() && r.req.max_new(&self.params) == 0 {
                // Nothing to generate (a prompt only scored): done after its prompt pass.
                let r = self.running.remove(i);
                self.forget(r.p.req.id);
                finished.push(self.retire(engine, r, FinishReason::Length)?);
                continue;
            }
            let params = r.req.params.as_ref().unwrap_or(&self.params);
            let step = r.tokens.len();
            let id = r.req.id;
            let mut adjusted = self.adjustments.get(&id).map(|a| a.apply(&r.logits, &r.req.prompt, &r.tokens));
            if step < params.min_tokens && r.req.forced.is_none() {
                // Nothing that would end the sequence before `min_tokens`.
                let logits = adjusted.get_or_insert_with(|| r.logits.clone());
                for &t in engine.eos_token_ids().iter().chain(&params.stop_token_ids) {
                    if let Some(l) = logits.get_mut(t as usize) {
                        *l = f32::NEG_INFINITY;
                    }
                }
            }
            let constraint = self.constraints.get_mut(&id);
            let chosen = match (&r.req.forced, constraint) {
                (Some(f), _) => Ok(f[step]),
                (None, None) => Ok(sample(adjusted.as_deref().unwrap_or(&r.logits), params, &mut r.rng)),
                (None, Some(c)) => {
                    let mut logits = adjusted.unwrap_or_else(|| r.logits.clone());
                    c.mask(&mut logits).and_then(|()| {
                        let next = sample(&logits, params, &mut r.rng);
                        c.advance(next).map(|()| next)
                    })
                }
            };
            let next = match chosen {
                Ok(next) => next,
                Err(e) => {
                    // The grammar failed: this request alone ends with the error.
                    let r = self.running.remove(i);
                    self.forget(id);
                    engine.release(r.seq);
                    self.failed.push((id, e.context(format!("request {id}: its constrained decoding failed"))));
                    continue;
                }
            };
            let complete = self.constraints.get(&id).is_some_and(|c| c.finished());
            let stops =
                (params.stop_at_eos && engine.eos_token_ids().contains(&next)) || params.stop_token_ids.contains(&next);
            let logprobs = self.logprobs.get(&r.req.id).map(|&top| token_logprobs(&r.logits, next, top));
            if self.keep_logits {
                r.step_logits.push(std::mem::take(&mut r.logits));
            }
            r.tokens.push(next);
            r.pending = true;
            self.generated_total += 1;
            self.chosen.push(Chosen { id: r.req.id, token: next, logprobs });
            let reason = if complete || (r.req.forced.is_none() && stops) {
                Some(FinishReason::Stop)
            } else if r.tokens.len() >= r.req.max_new(&self.params) {
                Some(FinishReason::Length)
            } else {
                None
            };
            match reason {
                Some(reason) => {
                    let r = self.running.remove(i);
                    self.forget(r.p.req.id);
                    finished.push(self.retire(engine, r, reason)?);
                }
                None => i += 1,
            }
        }
        Ok(finished)
    }

    /// Preempts the most recently admitted sequences until the next step's blocks are free.
    fn make_room(&mut self, engine: &mut E) -> Result<()> {
        loop {
            let need = engine.next_step_need(&self.running.iter().map(|r| &r.seq).collect::<Vec<_>>())?;
            if self.reclaim(engine, need, None)? {
                return Ok(());
            }
            // A prompt pass under way starts again later rather than a running sequence stop.
            if let Some(req) = self.drop_prefilling(engine) {
                self.waiting.push_front(req);
                continue;
            }
            if self.running.len() == 1 {
                bail!("the pool is too small for a single sequence to continue (need {need} blocks; raise [cache] memory_mb or max_tokens)");
            }
            let Running { mut p, seq } = self.running.pop().expect("at least two running");
            let parked = engine.park(seq)?;
            p.preemptions += 1;
            self.stats.preemptions += 1;
            self.preempted.push_front(Preempted::new(p, parked));
        }
    }

    /// After a failed decode step, whose sequences may each hold part of the step's rows: every
    /// one of them drops its rows. The one to blame (the only sequence, or the only one on trial)
    /// fails with the error; the others resume by recomputing their prompt and tokens. With no
    /// one to blame they all go on trial: they come back one at a time beside sequences already
    /// cleared, so that a failure that follows a sequence is pinned on it and the rest run on.
    fn isolate(&mut self, engine: &mut E, e: anyhow::Error) {
        let on_trial: Vec<usize> =
            self.running.iter().enumerate().filter(|(_, r)| r.p.on_trial).map(|(i, _)| i).collect();
        let blamed = match (self.running.len(), on_trial.as_slice()) {
            (1, _) => Some(0),
            (_, [i]) => Some(*i),
            _ => None,
        };
        let mut error = Some(e);
        let mut back = Vec::new();
        for (i, Running { mut p, seq }) in std::mem::take(&mut self.running).into_iter().enumerate() {
            engine.release(seq);
            if Some(i) == blamed {
                let id = p.req.id;
                self.forget(id);
                let e = error.take().expect("one sequence is blamed");
                self.failed.push((id, e.context(format!("request {id}: its decode step failed"))));
                continue;
            }
            p.on_trial = blamed.is_none();
            back.push(Preempted { p, parked: None });
        }
        for b in back.into_iter().rev() {
            self.preempted.push_front(b);
        }
    }

    /// One batched decode step of every running sequence's chosen token.
    fn decode(&mut self, engine: &mut E, observe: &mut Observer<'_, E>) -> Result<()> {
        self.stats.max_running = self.stats.max_running.max(self.running.len());
        let t0 = Instant::now();
        let tokens: Vec<u32> = self.running.iter().map(|r| *r.p.tokens.last().expect("one token chosen")).collect();
        let logits = match engine.decode(self.running.iter_mut().map(|r| &mut r.seq).collect(), &tokens) {
            Ok(logits) => logits,
            Err(e) => {
                self.isolate(engine, e);
                return Ok(());
            }
        };
        for (r, l) in self.running.iter_mut().zip(logits) {
            r.p.logits = l;
            r.p.pending = false;
            r.p.on_trial = false;
            let step = r.p.tokens.len();
            observe(Observed { id: r.p.req.id, step, seq: &r.seq, engine, logits: &r.p.logits })?;
        }
        let stats = &mut self.stats;
        stats.decode_secs += t0.elapsed().as_secs_f64();
        stats.decode_steps += 1;
        stats.decode_tokens += self.running.len();
        let u = engine.pool_usage()?;
        stats.peak_allocated = stats.peak_allocated.max(u.bytes_allocated);
        stats.peak_live = stats.peak_live.max(u.bytes_live);
        stats.memory_trace.push((self.generated_total, u.bytes_live, u.bytes_allocated));
        Ok(())
    }
}
