//! The engine thread: drives an engine (the host store, or the device cache on a GPU) and its
//! scheduler, takes jobs from the HTTP side over a channel, runs one scheduler step at a time, and
//! streams each request's text back over its own channel. A request whose channel closes (the
//! client went away) is cancelled at once and its blocks return to the pool.

use std::collections::HashMap;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use dms_policy::PolicyFactory;
use tokenizers::Tokenizer;
use tokio::sync::mpsc::UnboundedSender;

use super::error::ApiError;
use super::metrics::Metrics;
use super::openai::KvReport;
use super::text::TextStream;
use crate::engine::batch_engine::BatchEngine;
use crate::engine::constraint::TokenConstraint;
use crate::engine::scheduler::{FinishReason, Finished, Request, Scheduler};
use crate::engine::{GenParams, LogitAdjustments, TokenLogprobs};

/// One request for the engine thread.
pub struct Job {
    /// Prompt token ids.
    pub prompt: Vec<u32>,
    /// Sampling and stopping.
    pub params: GenParams,
    /// Index into the served policies.
    pub policy: usize,
    /// Stop strings.
    pub stops: Vec<String>,
    /// When the request arrived (for time to first token and the timeout).
    pub arrived: Instant,
    /// Report each token's log-probability with this many most likely alternatives.
    pub logprobs: Option<usize>,
    /// Text to send before the completion (`echo`: the prompt); with `logprobs`, the prompt's
    /// tokens come with theirs.
    pub echo: Option<String>,
    /// Logit biases and penalties applied before each token is chosen.
    pub adjustments: Option<LogitAdjustments>,
    /// Decode special tokens as text (end-of-sequence tokens excepted), for a tool-call parser
    /// whose markers are special tokens.
    pub keep_special_tokens: bool,
    /// The grammar its tokens must follow (`response_format`, a forced tool call).
    pub constraint: Option<Box<dyn TokenConstraint>>,
    /// Where its events go.
    pub events: UnboundedSender<Event>,
}

/// A generated token's log-probability and its most likely alternatives, as text.
#[derive(Debug, Clone)]
pub struct TokenLogprob {
    /// The token's text.
    pub token: String,
    /// Its log-probability (`None` for a prompt's first token, which nothing predicts).
    pub logprob: Option<f32>,
    /// The most likely tokens, best first.
    pub top: Vec<(String, f32)>,
}

/// A token's own text; a piece of a multi-byte character decodes as U+FFFD, as in vLLM.
fn token_text(tokenizer: &Tokenizer, id: u32) -> String {
    tokenizer.decode(&[id], false).unwrap_or_default()
}

impl TokenLogprob {
    fn of(tokenizer: &Tokenizer, token: u32, lp: &TokenLogprobs) -> Self {
        let top = lp.top.iter().map(|&(id, l)| (token_text(tokenizer, id), l)).collect();
        Self { token: token_text(tokenizer, token), logprob: Some(lp.logprob), top }
    }

    /// A prompt's entries: its first token with no log-probability, then each scored one.
    fn prompt(tokenizer: &Tokenizer, prompt: &[u32], scored: &[TokenLogprobs]) -> Vec<Self> {
        let first = prompt.first().map(|&t| Self { token: token_text(tokenizer, t), logprob: None, top: Vec::new() });
        first.into_iter().chain(prompt.iter().skip(1).zip(scored).map(|(&t, lp)| Self::of(tokenizer, t, lp))).collect()
    }
}

/// What the engine thread sends back for a request.
#[derive(Debug)]
pub enum Event {
    /// Text that became final, with the log-probabilities (when asked for) of the tokens counted
    /// since the last text.
    Text(String, Vec<TokenLogprob>),
    /// The request finished.
    Done(Outcome),
    /// The request failed.
    Failed(ApiError),
}

/// How a request ended.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// OpenAI's `finish_reason`: `stop` or `length`.
    pub finish_reason: &'static str,
    /// Prompt tokens.
    pub prompt_tokens: usize,
    /// Prompt tokens taken from the prefix cache.
    pub cached_tokens: usize,
    /// Tokens generated.
    pub completion_tokens: usize,
    /// What the cache kept.
    pub kv: KvReport,
    /// Each generated token's log-probability, when asked for.
    pub logprobs: Option<Vec<TokenLogprob>>,
}

/// Messages to the engine thread.
pub enum Command {
    /// Serve one request's jobs (one per choice).
    Submit(Vec<Job>),
    /// Stop taking jobs; finish the running ones within the grace period, then cancel the rest.
    Shutdown,
}

/// A policy the server may run.
pub struct ServedPolicy {
    /// The name requests use.
    pub name: String,
    /// What `/v1/cache_policies` says.
    pub description: String,
    /// The policy.
    pub factory: Arc<dyn PolicyFactory>,
}

/// What the engine thread needs besides the engine.
pub struct WorkerSetup {
    /// The policies, by index.
    pub policies: Vec<ServedPolicy>,
    /// For detokenizing.
    pub tokenizer: Tokenizer,
    /// Shared metrics.
    pub metrics: Arc<Metrics>,
    /// Sequences decoding at once at most.
    pub max_batch: usize,
    /// Longest a request may take.
    pub timeout: Duration,
    /// How long in-flight requests may run on after a shutdown command.
    pub grace: Duration,
    /// Prompt tokens per prefill chunk.
    pub prefill_chunk: usize,
    /// KV rows of one sequence (layers x KV heads), for the evicted-token counts.
    pub rows: usize,
    /// Bytes the KV pool holds, for the capacity gauge.
    pub pool_bytes: u64,
    /// Keep sequence states for later prompts that start with the same tokens (`[server]
    /// prefix_cache`).
    pub prefix_cache: bool,
    /// Prompt tokens fed per step at most (`[server] prefill_budget`; 0: whole prompts).
    pub prefill_budget: usize,
}

struct Active<'t> {
    job: Job,
    text: TextStream<'t>,
    last_token: Option<Instant>,
    completion_tokens: usize,
    /// Log-probabilities of the tokens counted so far, when asked for.
    logprobs: Vec<TokenLogprob>,
    /// How many of them went out with text.
    logprobs_sent: usize,
    /// A stop string ended its text: cancel it after this step.
    stop_hit: bool,
}

impl Active<'_> {
    /// Sends text that became final with the log-probabilities not sent yet.
    fn send_text(&mut self, text: String) {
        let logprobs = self.logprobs[self.logprobs_sent..].to_vec();
        self.logprobs_sent = self.logprobs.len();
        let _ = self.job.events.send(Event::Text(text, logprobs));
    }
}

/// Runs `engine` until the command channel closes or a shutdown completes.
pub fn run<E: BatchEngine>(engine: &mut E, setup: WorkerSetup, commands: Receiver<Command>) {
    let WorkerSetup {
        policies,
        tokenizer,
        metrics,
        max_batch,
        timeout,
        grace,
        prefill_chunk,
        rows,
        pool_bytes,
        prefix_cache,
        prefill_budget,
    } = setup;
    let base = GenParams { max_tokens: 1, prefill_chunk, ..Default::default() };
    let eos: Vec<u32> = engine.eos_token_ids().to_vec();
    let Ok(mut sched) = Scheduler::new(base, max_batch, false) else { return };
    if prefix_cache && !sched.enable_prefix_cache(engine) {
        tracing::warn!("prefix caching is off: this engine cannot continue a prompt pass from a cached state");
    }
    if prefill_budget > 0 && !sched.set_prefill_budget(engine, prefill_budget) {
        tracing::info!("no prefill budget: this engine cannot continue a prompt pass, so prompts are fed whole");
    }
    metrics.bytes_capacity.set(gauge(pool_bytes));
    let mut active: HashMap<usize, Active<'_>> = HashMap::new();
    let mut next_id = 0usize;
    let mut shutdown_at: Option<Instant> = None;
    let (mut preemptions_seen, mut forked_seen) = (0usize, 0usize);
    loop {
        // Take new commands: wait for one when idle, else only what is already there.
        let mut first = if sched.is_idle() {
            if shutdown_at.is_some() {
                return;
            }
            match commands.recv_timeout(Duration::from_millis(200)) {
                Ok(c) => Some(c),
                Err(RecvTimeoutError::Timeout) => continue,
                Err(RecvTimeoutError::Disconnected) => return,
            }
        } else {
            commands.try_recv().ok()
        };
        while let Some(cmd) = first.take().or_else(|| commands.try_recv().ok()) {
            match cmd {
                Command::Shutdown => shutdown_at = Some(Instant::now()),
                // One request's jobs (a sequence per choice) come together, so that they are
                // admitted in the same step and the copies of one prompt fork.
                Command::Submit(jobs) => {
                    for mut job in jobs {
                        if shutdown_at.is_some() {
                            let _ = job.events.send(Event::Failed(shutting_down()));
                            continue;
                        }
                        if job.echo.is_some() && job.logprobs.is_some() && !engine.scores_prompts() {
                            let msg =
                                "`echo` with `logprobs` scores the prompt, which this engine (the GPU's) does not; \
                                       serve on the CPU for it";
                            let _ = job.events.send(Event::Failed(ApiError::bad_request(msg, Some("echo"))));
                            continue;
                        }
                        let id = next_id;
                        next_id += 1;
                        let req = Request {
                            id,
                            prompt: job.prompt.clone(),
                            forced: None,
                            policy: policies[job.policy].factory.clone(),
                            params: Some(job.params.clone()),
                        };
                        match sched.submit(engine, req) {
                            Ok(()) => {
                                if let Some(a) = &job.adjustments {
                                    sched.adjust_logits(id, a.clone());
                                }
                                if let Some(c) = job.constraint.take() {
                                    sched.constrain(id, c);
                                }
                                if let Some(top) = job.logprobs {
                                    sched.want_logprobs(id, top);
                                    if job.echo.is_some() {
                                        sched.want_prompt_logprobs(id, top);
                                    }
                                }
                                let mut text =
                                    TextStream::new(&tokenizer, job.stops.clone()).stopping_from(job.params.min_tokens);
                                if job.keep_special_tokens {
                                    text = text.keeping_special_tokens();
                                }
                                let a = Active {
                                    job,
                                    text,
                                    last_token: None,
                                    completion_tokens: 0,
                                    logprobs: Vec::new(),
                                    logprobs_sent: 0,
                                    stop_hit: false,
                                };
                                // Without log-probabilities the echoed prompt goes out at once; with
                                // them, after the prompt pass that scores it.
                                if let (Some(echo), None) = (&a.job.echo, a.job.logprobs) {
                                    let _ = a.job.events.send(Event::Text(echo.clone(), Vec::new()));
                                }
                                active.insert(id, a);
                            }
                            Err(e) => {
                                let _ = job.events.send(Event::Failed(ApiError::bad_request(format!("{e:#}"), None)));
                            }
                        }
                    }
                }
            }
        }
        // Cancel what nobody waits for any more, what ran out of time, and, once the grace
        // period after a shutdown is over, everything.
        let now = Instant::now();
        let past_grace = shutdown_at.is_some_and(|t| now >= t + grace);
        let ids: Vec<usize> = active.keys().copied().collect();
        for id in ids {
            let a = &active[&id];
            let failure = if a.job.events.is_closed() {
                Some(None)
            } else if now >= a.job.arrived + timeout {
                Some(Some(ApiError::new(
                    StatusCode::GATEWAY_TIMEOUT,
                    "timeout",
                    format!("the request took longer than {} s and was cancelled", timeout.as_secs()),
                )))
            } else if past_grace {
                Some(Some(shutting_down()))
            } else {
                None
            };
            if let Some(err) = failure {
                let a = active.remove(&id).expect("listed");
                let f = sched.cancel(engine, id).unwrap_or_else(|e| {
                    tracing::error!("cancelling request {id}: {e:#}");
                    None
                });
                count_end(&metrics, &policies[a.job.policy].name, &a, f.as_ref(), rows);
                if let Some(err) = err {
                    let _ = a.job.events.send(Event::Failed(err));
                }
            }
        }
        if sched.is_idle() {
            update_gauges(&metrics, engine, &sched, &active, &policies);
            continue;
        }
        // One step.
        let finished = match sched.step(engine) {
            Ok(f) => f,
            Err(e) => {
                tracing::error!("engine step failed: {e:#}; failing every request in flight");
                sched.release_all(engine);
                for (_, a) in active.drain() {
                    let msg = format!("the engine failed: {e:#}");
                    let _ = a.job.events.send(Event::Failed(ApiError::new(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "engine_error",
                        msg,
                    )));
                }
                update_gauges(&metrics, engine, &sched, &active, &policies);
                continue;
            }
        };
        for (id, e) in sched.take_failed() {
            tracing::error!("{e:#}");
            if let Some(a) = active.remove(&id) {
                count_end(&metrics, &policies[a.job.policy].name, &a, None, rows);
                let msg = format!("the engine could not serve this request: {e:#}");
                let _ = a.job.events.send(Event::Failed(ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "engine_error",
                    msg,
                )));
            }
        }
        for (id, scored) in sched.scored_prompts() {
            let Some(a) = active.get_mut(id) else { continue };
            a.logprobs = TokenLogprob::prompt(&tokenizer, &a.job.prompt, scored);
            let echo = a.job.echo.clone().unwrap_or_default();
            a.send_text(echo);
        }
        let now = Instant::now();
        for c in sched.chosen() {
            let Some(a) = active.get_mut(&c.id) else { continue };
            let policy = &policies[a.job.policy].name;
            match a.last_token {
                None => metrics.time_to_first_token.with_label_values(&[policy]).observe(secs(now - a.job.arrived)),
                Some(t) => metrics.inter_token_latency.with_label_values(&[policy]).observe(secs(now - t)),
            }
            a.last_token = Some(now);
            if a.stop_hit {
                continue;
            }
            a.completion_tokens += 1;
            if let Some(lp) = &c.logprobs {
                a.logprobs.push(TokenLogprob::of(&tokenizer, c.token, lp));
            }
            // The end-of-sequence token is never text, even where special tokens are.
            if a.job.keep_special_tokens && eos.contains(&c.token) {
                continue;
            }
            let d = a.text.push(c.token);
            if !d.text.is_empty() {
                a.send_text(d.text);
            }
            a.stop_hit = d.stopped;
        }
        for f in finished {
            if let Some(mut a) = active.remove(&f.id) {
                if !a.stop_hit {
                    let d = a.text.finish();
                    if !d.text.is_empty() {
                        a.send_text(d.text);
                    }
                }
                let reason = if a.stop_hit { FinishReason::Stop } else { f.finish_reason };
                finish(&metrics, &policies[a.job.policy].name, a, &f, reason, rows);
            }
        }
        let stopped: Vec<usize> = active.iter().filter(|(_, a)| a.stop_hit).map(|(&id, _)| id).collect();
        for id in stopped {
            let a = active.remove(&id).expect("listed");
            match sched.cancel(engine, id) {
                Ok(Some(f)) => finish(&metrics, &policies[a.job.policy].name, a, &f, FinishReason::Stop, rows),
                Ok(None) | Err(_) => {
                    let _ = a.job.events.send(Event::Failed(ApiError::new(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "engine_error",
                        "the sequence vanished from the scheduler",
                    )));
                }
            }
        }
        let p = sched.stats.preemptions;
        metrics.preemptions.inc_by((p - preemptions_seen) as u64);
        preemptions_seen = p;
        let f = sched.stats.forked;
        metrics.forked.inc_by((f - forked_seen) as u64);
        forked_seen = f;
        update_gauges(&metrics, engine, &sched, &active, &policies);
    }
}

fn shutting_down() -> ApiError {
    ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "shutting_down", "the server is shutting down")
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

fn gauge(bytes: u64) -> i64 {
    i64::try_from(bytes).unwrap_or(i64::MAX)
}

fn compression(tokens_seen: u64, slots: u64) -> f64 {
    if slots == 0 {
        1.0
    } else {
        tokens_seen as f64 / slots as f64
    }
}

/// Counts a request that ended (finished, stopped or cancelled) in the per-policy counters.
fn count_end(metrics: &Metrics, policy: &str, a: &Active<'_>, f: Option<&Finished>, rows: usize) {
    metrics.requests.with_label_values(&[policy]).inc();
    metrics.generated_tokens.with_label_values(&[policy]).inc_by(a.completion_tokens as f64);
    let Some(f) = f else { return };
    metrics.prompt_tokens.with_label_values(&[policy]).inc_by(a.job.prompt.len() as f64);
    metrics.prompt_tokens_cached.with_label_values(&[policy]).inc_by(f.cached_tokens as f64);
    let evicted = f.usage.tokens_seen.saturating_sub(f.usage.slots) as f64 / rows as f64;
    metrics.evicted_tokens.with_label_values(&[policy]).inc_by(evicted);
}

/// Reports a finished request to its client, the metrics and the log.
fn finish(metrics: &Metrics, policy: &str, a: Active<'_>, f: &Finished, reason: FinishReason, rows: usize) {
    count_end(metrics, policy, &a, Some(f), rows);
    let cr = f.compression_ratio;
    metrics.compression_ratio.with_label_values(&[policy]).set(cr);
    let kv = KvReport { policy: policy.to_string(), compression_ratio: cr, bytes_live_peak: f.peak_live };
    let finish_reason = if reason == FinishReason::Length { "length" } else { "stop" };
    let total = a.job.arrived.elapsed();
    tracing::info!(
        id = f.id,
        policy,
        prompt_tokens = a.job.prompt.len(),
        completion_tokens = a.completion_tokens,
        compression_ratio = format!("{cr:.2}"),
        preemptions = f.preemptions,
        seconds = format!("{:.3}", total.as_secs_f64()),
        finish_reason,
        "request finished"
    );
    let out = Outcome {
        finish_reason,
        prompt_tokens: a.job.prompt.len(),
        cached_tokens: f.cached_tokens,
        completion_tokens: a.completion_tokens,
        kv,
        logprobs: a.job.logprobs.map(|_| a.logprobs),
    };
    let _ = a.job.events.send(Event::Done(out));
}

/// Sets the pool, queue and per-policy compression gauges.
fn update_gauges<E: BatchEngine>(
    metrics: &Metrics,
    engine: &E,
    sched: &Scheduler<E>,
    active: &HashMap<usize, Active<'_>>,
    policies: &[ServedPolicy],
) {
    match engine.pool_usage() {
        Ok(u) => {
            metrics.bytes_live.set(gauge(u.bytes_live));
            metrics.bytes_allocated.set(gauge(u.bytes_allocated));
        }
        Err(e) => tracing::warn!("reading the KV pool's usage: {e:#}"),
    }
    metrics.requests_running.set(sched.running_count() as i64);
    metrics.prefix_cache_states.set(sched.prefix_cache_len() as i64);
    match sched.prefix_cache_usage(engine) {
        Ok(u) => {
            metrics.prefix_cache_bytes_live.set(gauge(u.bytes_live));
            metrics.prefix_cache_bytes_allocated.set(gauge(u.bytes_allocated));
        }
        Err(e) => tracing::warn!("reading the prefix cache's usage: {e:#}"),
    }
    metrics.requests_waiting.set(sched.waiting_count() as i64);
    let mut per_policy = vec![(0u64, 0u64); policies.len()];
    for (id, usage) in sched.running_usage(engine).unwrap_or_default() {
        if let Some(a) = active.get(&id) {
            per_policy[a.job.policy].0 += usage.tokens_seen;
            per_policy[a.job.policy].1 += usage.slots;
        }
    }
    for (p, (seen, slots)) in policies.iter().zip(per_policy) {
        if seen > 0 {
            metrics.compression_ratio.with_label_values(&[&p.name]).set(compression(seen, slots));
        }
    }
}
