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

use crate::cache::SequenceCache;
use crate::engine::{sample, Engine, GenParams};
use crate::kv_store::SwappedRow;
use crate::model::SeqInput;

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
}

struct Swapped {
    run: Running,
    rows: Vec<SwappedRow>,
}

fn max_new(req: &Request, params: &GenParams) -> usize {
    req.forced.as_ref().map_or(params.max_tokens, |f| f.len())
}

/// Serves `requests` with at most `max_batch` sequences at once. `keep_logits` keeps every
/// step's logits in the results. Sampling follows `params` (one RNG per request, seeded with
/// `params.seed + id`).
pub fn run_batch(
    engine: &mut Engine,
    requests: Vec<Request>,
    params: &GenParams,
    max_batch: usize,
    keep_logits: bool,
    mut progress: impl FnMut(usize),
) -> Result<(Vec<Finished>, BatchStats)> {
    if max_batch == 0 {
        bail!("max_batch must be at least 1");
    }
    for r in &requests {
        engine.check_policy(r.policy.as_ref())?;
        if r.prompt.is_empty() {
            bail!("request {} has an empty prompt", r.id);
        }
    }
    let c = engine.model.config();
    let rows = c.num_layers * c.num_kv_heads;
    let bs = engine.store.block_size();
    let eos = c.eos_token_ids.clone();
    let mut waiting: VecDeque<Request> = requests.into();
    let mut running: Vec<Running> = Vec::new();
    let mut swapped: VecDeque<Swapped> = VecDeque::new();
    let mut done = Vec::new();
    let mut stats = BatchStats::default();
    let mut rngs: std::collections::HashMap<usize, StdRng> = std::collections::HashMap::new();
    let mut generated_total = 0usize;
    loop {
        let reserve = |running: &[Running]| running.len() * rows;
        while let Some(s) = swapped.front() {
            let need: usize = s.rows.iter().map(|r| r.blocks_needed(bs)).sum::<usize>() + reserve(&running) + rows;
            if running.len() >= max_batch || need > engine.store.free_block_count() {
                break;
            }
            let mut s = swapped.pop_front().expect("front exists");
            if let Err(rows_back) = s.run.cache.swap_in(&mut engine.store, s.rows) {
                s.rows = rows_back;
                swapped.push_front(s);
                break;
            }
            running.push(s.run);
        }
        while swapped.is_empty() && running.len() < max_batch {
            let Some(req) = waiting.front() else { break };
            let need = req.prompt.len().div_ceil(bs) * rows + reserve(&running);
            if need > engine.store.free_block_count() {
                if running.is_empty() {
                    bail!(
                        "request {} cannot be served: its prompt of {} tokens needs {} blocks but the pool has {} free of {}",
                        req.id, req.prompt.len(), need, engine.store.free_block_count(), engine.store.capacity_blocks()
                    );
                }
                break;
            }
            let req = waiting.pop_front().expect("front exists");
            let mut cache = engine.new_sequence_with(req.policy.as_ref());
            let t0 = Instant::now();
            let chunk = if params.prefill_chunk == 0 { req.prompt.len() } else { params.prefill_chunk };
            let mut last = None;
            for part in req.prompt.chunks(chunk) {
                let mut input = [SeqInput { tokens: part, cache: &mut cache }];
                last = engine.model.forward(&mut input, &mut engine.store, false)?.pop();
            }
            stats.prefill_secs += t0.elapsed().as_secs_f64();
            stats.prefill_tokens += req.prompt.len();
            let logits = last.expect("prompt is not empty").squeeze(0)?.to_vec1::<f32>()?;
            rngs.insert(req.id, StdRng::seed_from_u64(params.seed.wrapping_add(req.id as u64)));
            running.push(Running {
                req,
                cache,
                tokens: Vec::new(),
                logits,
                step_logits: Vec::new(),
                preemptions: 0,
                pending: false,
            });
        }
        if running.is_empty() {
            if waiting.is_empty() && swapped.is_empty() {
                break;
            }
            bail!("no sequence can run: the pool is too small for the waiting requests");
        }
        // Choose each running sequence's next token from its last logits; retire finished ones.
        let mut i = 0;
        while i < running.len() {
            let r = &mut running[i];
            if r.pending {
                i += 1;
                continue;
            }
            let step = r.tokens.len();
            let next = match &r.req.forced {
                Some(f) => f[step],
                None => sample(&r.logits, params, rngs.get_mut(&r.req.id).expect("rng per request")),
            };
            if keep_logits {
                r.step_logits.push(std::mem::take(&mut r.logits));
            }
            r.tokens.push(next);
            r.pending = true;
            generated_total += 1;
            let stop = r.tokens.len() >= max_new(&r.req, params)
                || (r.req.forced.is_none() && params.stop_at_eos && eos.contains(&next));
            if stop {
                let r = running.remove(i);
                let cr = r.cache.compression_ratio(&engine.store);
                let shadow_cr = r.cache.shadow_compression_ratio(&engine.store);
                r.cache.release(&mut engine.store);
                done.push(Finished {
                    id: r.req.id,
                    tokens: r.tokens,
                    step_logits: r.step_logits,
                    compression_ratio: cr,
                    shadow_compression_ratio: shadow_cr,
                    preemptions: r.preemptions,
                });
                progress(done.len());
            } else {
                i += 1;
            }
        }
        if running.is_empty() {
            continue;
        }
        // Make room for the step: preempt the most recently admitted sequences if needed.
        loop {
            let need: usize = running.iter().map(|r| r.cache.blocks_for_next_token(&engine.store)).sum();
            if need <= engine.store.free_block_count() {
                break;
            }
            if running.len() == 1 {
                bail!("the pool is too small for a single sequence to continue (need {need} blocks)");
            }
            let mut victim = running.pop().expect("at least two running");
            let rows = victim.cache.swap_out(&mut engine.store)?;
            victim.preemptions += 1;
            stats.preemptions += 1;
            swapped.push_front(Swapped { run: victim, rows });
        }
        stats.max_running = stats.max_running.max(running.len());
        let t0 = Instant::now();
        let toks: Vec<[u32; 1]> = running.iter().map(|r| [*r.tokens.last().expect("one token chosen")]).collect();
        let logits = {
            let mut inputs: Vec<SeqInput> =
                running.iter_mut().zip(&toks).map(|(r, t)| SeqInput { tokens: t, cache: &mut r.cache }).collect();
            engine.model.forward(&mut inputs, &mut engine.store, false)?
        };
        for (r, l) in running.iter_mut().zip(logits) {
            r.logits = l.squeeze(0)?.to_vec1::<f32>()?;
            r.pending = false;
        }
        stats.decode_secs += t0.elapsed().as_secs_f64();
        stats.decode_steps += 1;
        stats.decode_tokens += running.len();
        let u = engine.store.usage();
        stats.peak_allocated = stats.peak_allocated.max(u.bytes_allocated);
        stats.peak_live = stats.peak_live.max(u.bytes_live);
        stats.memory_trace.push((generated_total, u.bytes_live, u.bytes_allocated));
    }
    done.sort_by_key(|f| f.id);
    Ok((done, stats))
}
