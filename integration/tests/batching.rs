//! Continuous batching: batched decode equals each sequence alone (no sequence reads another's
//! rows), per-request policies in one batch, shadow mode, admission by free blocks, and
//! preemption that resumes with identical output.

mod common;
use std::sync::Arc;

use common::*;
use dms_integration::engine::batch_engine::Preemption;
use dms_integration::engine::scheduler::{run_batch, Finished, Request, Scheduler};
use dms_integration::engine::Engine;
use dms_policy::PolicyFactory;

const POLICIES: [&str; 4] = [
    "name = 'full'",
    "name = 'sliding_window'\nwindow = 6\nsinks = 2",
    "name = 'dms'",
    "name = 'shadow'\ninner = { name = 'sliding_window', window = 6, sinks = 2 }",
];

fn requests(eng: &mut Engine) -> Vec<Request> {
    (0..5)
        .map(|i| Request {
            id: i,
            prompt: seeded_tokens(i, 9 + 5 * i),
            forced: None,
            policy: resolved_policy(eng, POLICIES[i % 4]),
            params: None,
        })
        .collect()
}

fn alone(eng: &mut Engine, r: &Request, n: usize) -> Finished {
    let (mut f, _) = run_batch(eng, vec![r.clone()], &greedy_params(n), 1, true, |_| {}).unwrap();
    f.pop().unwrap()
}

#[test]
fn batched_decode_equals_each_sequence_alone_with_per_request_policies() {
    let mut eng = batch_engine(1 << 14);
    let reqs = requests(&mut eng);
    let refs: Vec<Finished> = reqs.iter().map(|r| alone(&mut eng, r, 20)).collect();
    let (got, stats) = run_batch(&mut eng, reqs, &greedy_params(20), 8, true, |_| {}).unwrap();
    assert_eq!(stats.max_running, 5, "all five decode together");
    for (g, r) in got.iter().zip(&refs) {
        assert_eq!(g.tokens, r.tokens, "request {}", g.id);
        for (a, b) in g.step_logits.iter().zip(&r.step_logits) {
            assert!(max_abs(a, b) < 1e-4, "request {} logits", g.id);
        }
        assert!((g.compression_ratio - r.compression_ratio).abs() < 1e-12);
    }
    assert!(got[1].compression_ratio > 1.5, "the sliding-window request evicts");
    assert!((got[0].compression_ratio - 1.0).abs() < 1e-12, "the full request keeps everything");
    assert_eq!(eng.store.free_block_count(), eng.store.capacity_blocks(), "every block returned");
}

/// Requests submitted while others decode join the running batch between steps (what a server
/// does) and still produce what each produces alone.
#[test]
fn requests_joining_a_running_batch_equal_each_sequence_alone() {
    let mut eng = batch_engine(1 << 14);
    let reqs = requests(&mut eng);
    let refs: Vec<Finished> = reqs.iter().map(|r| alone(&mut eng, r, 20)).collect();
    let mut sched = Scheduler::new(greedy_params(20), 8, true).unwrap();
    let mut got = Vec::new();
    for (i, r) in reqs.into_iter().enumerate() {
        sched.submit(&eng, r).unwrap();
        // Each later request arrives a few steps after the previous one.
        for _ in 0..3 * i {
            got.extend(sched.step(&mut eng).unwrap());
        }
    }
    while !sched.is_idle() {
        got.extend(sched.step(&mut eng).unwrap());
    }
    got.sort_by_key(|f| f.id);
    assert_eq!(got.len(), refs.len());
    assert!(sched.stats.max_running >= 4, "the joiners overlap (max running {})", sched.stats.max_running);
    for (g, r) in got.iter().zip(&refs) {
        assert_eq!(g.tokens, r.tokens, "request {}", g.id);
        for (a, b) in g.step_logits.iter().zip(&r.step_logits) {
            assert!(max_abs(a, b) < 1e-4, "request {} logits", g.id);
        }
    }
    assert_eq!(eng.store.free_block_count(), eng.store.capacity_blocks(), "every block returned");
}

#[test]
fn shadow_mode_outputs_full_and_reports_the_shadowed_compression() {
    let mut eng = batch_engine(1 << 14);
    let p = seeded_tokens(3, 20);
    let full = resolved_policy(&mut eng, POLICIES[0]);
    let window = resolved_policy(&mut eng, POLICIES[1]);
    let shadow = resolved_policy(&mut eng, POLICIES[3]);
    let forced: Vec<u32> = (0..15).map(|i| (i * 11 % 500) as u32 + 3).collect();
    let mk = |policy: &Arc<dyn PolicyFactory>| Request {
        id: 0,
        prompt: p.clone(),
        forced: Some(forced.clone()),
        policy: policy.clone(),
        params: None,
    };
    let f = alone(&mut eng, &mk(&full), 15);
    let w = alone(&mut eng, &mk(&window), 15);
    let s = alone(&mut eng, &mk(&shadow), 15);
    for (a, b) in s.step_logits.iter().zip(&f.step_logits) {
        assert_eq!(a, b, "shadow applies nothing");
    }
    assert_eq!(s.compression_ratio, 1.0);
    let scr = s.shadow_compression_ratio.expect("shadow reports");
    assert!((scr - w.compression_ratio).abs() < 1e-12, "shadow CR {scr} vs window {}", w.compression_ratio);
    assert!(f.shadow_compression_ratio.is_none());
}

#[test]
fn preempted_sequences_resume_with_identical_output() {
    let mut big = batch_engine(1 << 14);
    let full = resolved_policy(&mut big, POLICIES[0]);
    let reqs: Vec<Request> = (0..4)
        .map(|i| Request { id: i, prompt: seeded_tokens(i, 12), forced: None, policy: full.clone(), params: None })
        .collect();
    let (want, _) = run_batch(&mut big, reqs.clone(), &greedy_params(30), 8, true, |_| {}).unwrap();
    // Each sequence ends with 41 tokens: 11 blocks x 4 rows = 44 blocks; 100 blocks hold two.
    let mut small = batch_engine(100);
    let (got, stats) = run_batch(&mut small, reqs, &greedy_params(30), 8, true, |_| {}).unwrap();
    assert!(stats.preemptions > 0, "the pool forces preemption");
    assert!(stats.max_running >= 2);
    for (g, w) in got.iter().zip(&want) {
        assert_eq!(g.tokens, w.tokens, "request {}", g.id);
        for (a, b) in g.step_logits.iter().zip(&w.step_logits) {
            assert!(max_abs(a, b) < 1e-4);
        }
    }
    assert!(got.iter().any(|f| f.preemptions > 0));
    assert_eq!(small.store.free_block_count(), small.store.capacity_blocks());
}

/// Both preemption modes, over every kind of policy in one batch: a pool too small for all
/// requests forces preemptions, and each sequence still produces what it produces alone (swapped
/// rows come back slot for slot; a recomputed sequence's prompt pass keeps what decoding kept).
#[test]
fn preemption_by_swap_or_recomputation_resumes_every_policy_unchanged() {
    let mut big = batch_engine(1 << 14);
    // Attention-scored policies keep another set after one prompt pass, so they are swapped
    // even under recomputation.
    let kinds = [
        POLICIES[0],
        POLICIES[1],
        POLICIES[2],
        POLICIES[3],
        "name = 'tova'\nbudget = 8",
        "name = 'h2o'\nbudget = 8\nrecent = 3",
    ];
    let reqs: Vec<Request> = (0..8)
        .map(|i| Request {
            id: i,
            prompt: seeded_tokens(i, 10 + 3 * i),
            forced: None,
            policy: resolved_policy(&mut big, kinds[(i + 4) % kinds.len()]),
            params: None,
        })
        .collect();
    let refs: Vec<Finished> = reqs.iter().map(|r| alone(&mut big, r, 30)).collect();
    for mode in [Preemption::Swap, Preemption::Recompute] {
        let mut small = batch_engine(170);
        small.preemption = mode;
        let (got, stats) = run_batch(&mut small, reqs.clone(), &greedy_params(30), 8, true, |_| {}).unwrap();
        assert!(stats.preemptions >= 2, "{mode:?}: the pool forces preemption ({} seen)", stats.preemptions);
        assert!(stats.max_running >= 2, "{mode:?}");
        for (g, w) in got.iter().zip(&refs) {
            assert_eq!(g.tokens, w.tokens, "{mode:?}: request {}", g.id);
            assert_eq!(g.step_logits.len(), w.step_logits.len());
            for (a, b) in g.step_logits.iter().zip(&w.step_logits) {
                assert!(max_abs(a, b) < 1e-4, "{mode:?}: request {} logits", g.id);
            }
            assert!((g.compression_ratio - w.compression_ratio).abs() < 1e-12, "{mode:?}: request {} CR", g.id);
        }
        if mode == Preemption::Recompute {
            assert!(stats.prefill_tokens > reqs.iter().map(|r| r.prompt.len()).sum::<usize>(), "recomputed tokens");
        }
        assert_eq!(small.store.free_block_count(), small.store.capacity_blocks(), "{mode:?}: every block returned");
    }
}

/// Requests with the same prompt and policy admitted together share one prompt pass (the
/// others start as copies of the first), and each still produces what it produces alone, sampled
/// or teacher-forced; a request with the same prompt but another policy gets its own pass.
#[test]
fn requests_sharing_a_prompt_fork_one_prompt_pass_and_equal_each_alone() {
    let mut eng = batch_engine(1 << 14);
    let shared = seeded_tokens(4, 23);
    let mut reqs = Vec::new();
    for (i, table) in [POLICIES[2], POLICIES[2], POLICIES[1], POLICIES[2], POLICIES[1], POLICIES[0]].iter().enumerate()
    {
        let forced = (i % 2 == 1).then(|| (0..20).map(|t| ((t * 13 + i * 7) % 500) as u32 + 3).collect());
        reqs.push(Request {
            id: i,
            prompt: shared.clone(),
            forced,
            policy: resolved_policy(&mut eng, table),
            params: None,
        });
    }
    // One policy object per table, as a server or harness shares them.
    let dms = reqs[0].policy.clone();
    let window = reqs[2].policy.clone();
    for r in &mut reqs {
        if r.policy.name() == "dms" {
            r.policy = dms.clone();
        } else if r.policy.name() == "sliding_window" {
            r.policy = window.clone();
        }
    }
    let refs: Vec<Finished> = reqs.iter().map(|r| alone(&mut eng, r, 20)).collect();
    let (got, stats) = run_batch(&mut eng, reqs, &greedy_params(20), 8, true, |_| {}).unwrap();
    assert_eq!(stats.forked, 3, "two more dms requests and one more window request are forks");
    assert_eq!(stats.prefill_tokens, 3 * shared.len(), "one prompt pass per policy");
    for (g, r) in got.iter().zip(&refs) {
        assert_eq!(g.tokens, r.tokens, "request {}", g.id);
        for (a, b) in g.step_logits.iter().zip(&r.step_logits) {
            assert!(max_abs(a, b) < 1e-4, "request {} logits", g.id);
        }
        assert!((g.compression_ratio - r.compression_ratio).abs() < 1e-12, "request {} CR", g.id);
    }
    assert_eq!(eng.store.free_block_count(), eng.store.capacity_blocks(), "every block returned");
}

/// A fork is admitted by the blocks its source holds, not its whole prompt's: in a pool with room
/// for one 40-token prompt, a window policy's copies (2 blocks per row) run together.
#[test]
fn forks_are_admitted_by_the_blocks_their_source_holds() {
    let probe = batch_engine(1);
    let c = probe.model.config();
    let rows = c.num_layers * c.num_kv_heads;
    let mut eng = batch_engine(12 * rows);
    let window = resolved_policy(&mut eng, POLICIES[1]);
    let shared = seeded_tokens(6, 40);
    let reqs: Vec<Request> = (0..4)
        .map(|i| Request { id: i, prompt: shared.clone(), forced: None, policy: window.clone(), params: None })
        .collect();
    let mut big = batch_engine(1 << 14);
    let refs: Vec<Finished> = reqs.iter().map(|r| alone(&mut big, r, 12)).collect();
    let (got, stats) = run_batch(&mut eng, reqs, &greedy_params(12), 8, true, |_| {}).unwrap();
    assert_eq!((stats.forked, stats.max_running), (3, 4), "a second prompt pass would need 10 + 1 blocks per row");
    for (g, r) in got.iter().zip(&refs) {
        assert_eq!(g.tokens, r.tokens, "request {}", g.id);
    }
    assert_eq!(eng.store.free_block_count(), eng.store.capacity_blocks());
}

#[test]
fn dms_sustains_more_concurrent_sequences_in_the_same_pool() {
    let run = |table: &str| {
        let mut eng = batch_engine(160);
        let p = resolved_policy(&mut eng, table);
        let reqs: Vec<Request> = (0..8)
            .map(|i| Request { id: i, prompt: seeded_tokens(i, 8), forced: None, policy: p.clone(), params: None })
            .collect();
        let (_, stats) = run_batch(&mut eng, reqs, &greedy_params(60), 8, false, |_| {}).unwrap();
        stats
    };
    let full = run(POLICIES[0]);
    let window = run(POLICIES[1]);
    assert!(
        window.mean_running() > 1.5 * full.mean_running(),
        "window {} vs full {}",
        window.mean_running(),
        full.mean_running()
    );
    assert!(full.preemptions > window.preemptions);
}

#[test]
fn a_request_too_large_for_the_pool_is_a_clear_error() {
    let mut eng = batch_engine(8);
    let full = resolved_policy(&mut eng, POLICIES[0]);
    let r = Request { id: 7, prompt: seeded_tokens(0, 40), forced: None, policy: full, params: None };
    let err = run_batch(&mut eng, vec![r], &greedy_params(4), 4, false, |_| {}).err().unwrap().to_string();
    assert!(err.contains("request 7") && err.contains("blocks"), "{err}");
}

/// Full attention whose rows refuse to grow past `limit` tokens: a policy error raised in the
/// prompt pass of a long prompt, or (`decode_only`) in decode steps only, never in a prompt pass
/// (recomputations included).
#[derive(Debug)]
struct RefusesPast {
    inner: Arc<dyn PolicyFactory>,
    limit: dms_policy::Pos,
    decode_only: bool,
}

struct RefusesPastSeq {
    inner: Box<dyn dms_policy::SequencePolicy>,
    limit: dms_policy::Pos,
    decode_only: bool,
}

impl PolicyFactory for RefusesPast {
    fn name(&self) -> &str {
        "refuses_past"
    }
    fn new_sequence(&self, shape: dms_policy::CacheShape) -> Box<dyn dms_policy::SequencePolicy> {
        Box::new(RefusesPastSeq {
            inner: self.inner.new_sequence(shape),
            limit: self.limit,
            decode_only: self.decode_only,
        })
    }
    fn describe(&self) -> String {
        format!("full, refusing rows past {} tokens", self.limit)
    }
}

impl dms_policy::SequencePolicy for RefusesPastSeq {
    fn decide(
        &mut self,
        row: dms_policy::RowRef,
        first: dms_policy::Pos,
        n: usize,
        s: Option<&[f32]>,
    ) -> Result<(), dms_policy::PolicyError> {
        self.inner.decide(row, first, n, s)
    }
    fn evict(
        &mut self,
        row: dms_policy::RowRef,
        first: dms_policy::Pos,
        n: usize,
        plan: &mut dms_policy::EvictPlan,
    ) -> Result<(), dms_policy::PolicyError> {
        if first + n as dms_policy::Pos > self.limit && (n == 1 || !self.decode_only) {
            return Err(dms_policy::PolicyError::Protocol {
                policy: "refuses_past".into(),
                message: format!("row past {} tokens", self.limit),
            });
        }
        self.inner.evict(row, first, n, plan)
    }
    fn compact(
        &mut self,
        row: dms_policy::RowRef,
        plan: &mut dms_policy::CompactPlan,
    ) -> Result<(), dms_policy::PolicyError> {
        self.inner.compact(row, plan)
    }
}

/// A 30-token request whose policy refuses rows past 20 tokens.
fn refused_request(eng: &mut Engine, id: usize) -> Request {
    let inner = resolved_policy(eng, POLICIES[0]);
    Request {
        id,
        prompt: seeded_tokens(9, 30),
        forced: None,
        policy: Arc::new(RefusesPast { inner, limit: 20, decode_only: false }),
        params: None,
    }
}

/// One request whose prompt pass fails is dropped with its error and its blocks returned; the
/// requests beside it finish exactly as they do alone (what keeps a server's other requests).
#[test]
fn a_request_whose_prompt_pass_fails_is_dropped_and_the_others_run_on() {
    let mut eng = batch_engine(1 << 14);
    let reqs = requests(&mut eng);
    let refs: Vec<Finished> = reqs.iter().map(|r| alone(&mut eng, r, 12)).collect();
    let bad = refused_request(&mut eng, 99);
    let mut sched = Scheduler::new(greedy_params(12), 8, true).unwrap();
    let mut all = reqs;
    all.insert(2, bad);
    for r in all {
        sched.submit(&eng, r).unwrap();
    }
    let (mut got, mut failed) = (Vec::new(), Vec::new());
    while !sched.is_idle() {
        got.extend(sched.step(&mut eng).unwrap());
        failed.extend(sched.take_failed());
    }
    assert_eq!(failed.len(), 1);
    let (id, e) = &failed[0];
    assert_eq!(*id, 99);
    let e = format!("{e:#}");
    assert!(e.contains("request 99") && e.contains("row past 20 tokens"), "{e}");
    got.sort_by_key(|f| f.id);
    assert_eq!(got.iter().map(|f| f.id).collect::<Vec<_>>(), refs.iter().map(|f| f.id).collect::<Vec<_>>());
    for (g, r) in got.iter().zip(&refs) {
        assert_eq!(g.tokens, r.tokens, "request {}", g.id);
    }
    assert_eq!(eng.store.free_block_count(), eng.store.capacity_blocks(), "every block returned");
    // A batch run needs every result: there the failure is the run's, with the request named.
    let bad = refused_request(&mut eng, 5);
    let e = run_batch(&mut eng, vec![bad], &greedy_params(4), 4, false, |_| {}).err().unwrap();
    assert!(format!("{e:#}").contains("request 5"), "{e:#}");
    assert_eq!(eng.store.free_block_count(), eng.store.capacity_blocks(), "every block returned");
}

/// A prompt scored in its own pass (`Scheduler::want_prompt_logprobs`, the server's `echo` with
/// `logprobs`) gets, for each token after the first, the log-probability and top tokens of the
/// logits one whole-prompt pass gives before it, under each request's policy; the pass runs in
/// chunks of at most `SCORED_CHUNK` tokens (the prompt here spans two). With nothing to generate
/// the request finishes after its prompt pass and returns its blocks.
#[test]
fn scored_prompts_equal_one_pass_logits_under_each_policy() {
    use dms_integration::engine::{token_logprobs, SCORED_CHUNK};
    let mut eng = batch_engine(1 << 14);
    let ids = seeded_tokens(3, SCORED_CHUNK + 44);
    for (i, table) in POLICIES.iter().enumerate() {
        let policy = resolved_policy(&mut eng, table);
        let mut seq = eng.new_sequence_with(policy.as_ref());
        let all = eng.step(&mut seq, &ids, true).unwrap().to_vec2::<f32>().unwrap();
        seq.release(&mut eng.store);
        let mut sched = Scheduler::new(greedy_params(0), 4, false).unwrap();
        sched.submit(&eng, Request { id: i, prompt: ids.clone(), forced: None, policy, params: None }).unwrap();
        sched.want_prompt_logprobs(i, 3);
        let finished = sched.step(&mut eng).unwrap();
        let scored = sched.scored_prompts();
        assert_eq!(scored.len(), 1, "{table}");
        assert_eq!(scored[0].1.len(), ids.len() - 1, "{table}");
        for (t, got) in scored[0].1.iter().enumerate() {
            let want = token_logprobs(&all[t], ids[t + 1], 3);
            assert!((got.logprob - want.logprob).abs() < 1e-4, "{table} token {}: {got:?} vs {want:?}", t + 1);
            let (g, w): (Vec<u32>, Vec<u32>) =
                (got.top.iter().map(|x| x.0).collect(), want.top.iter().map(|x| x.0).collect());
            assert_eq!(g, w, "{table} token {}", t + 1);
        }
        assert_eq!(finished.len(), 1, "{table}: nothing to generate, done after the prompt pass");
        assert!(finished[0].tokens.is_empty(), "{table}");
        assert!(sched.is_idle());
        assert_eq!(eng.store.free_block_count(), eng.store.capacity_blocks(), "{table}: every block returned");
    }
}

/// A decode step that fails in a batch (here: one request's policy refuses a token) fails that
/// request alone: every sequence of the batch drops the step's rows and is recomputed, the
/// suspects one at a time until the failure follows one of them; the others produce what each
/// produces alone, and every block returns to the pool.
#[test]
fn a_failed_decode_step_fails_only_the_request_that_causes_it() {
    let mut eng = batch_engine(1 << 14);
    let good: Vec<Request> = requests(&mut eng).into_iter().take(4).collect();
    let refs: Vec<Finished> = good.iter().map(|r| alone(&mut eng, r, 20)).collect();
    let full = resolved_policy(&mut eng, POLICIES[0]);
    let bad_prompt = seeded_tokens(9, 12);
    let failing =
        Arc::new(RefusesPast { inner: full, limit: bad_prompt.len() as dms_policy::Pos + 5, decode_only: true });
    let bad = Request { id: 9, prompt: bad_prompt, forced: None, policy: failing, params: None };
    let mut sched = Scheduler::new(greedy_params(20), 8, true).unwrap();
    for r in good.iter().cloned().chain([bad]) {
        sched.submit(&eng, r).unwrap();
    }
    let (mut finished, mut failed) = (Vec::new(), Vec::new());
    for _ in 0..1000 {
        if sched.is_idle() {
            break;
        }
        finished.extend(sched.step(&mut eng).expect("the other requests run on"));
        failed.extend(sched.take_failed());
    }
    assert!(sched.is_idle(), "the scheduler settles");
    assert_eq!(failed.len(), 1, "{failed:?}");
    assert_eq!(failed[0].0, 9);
    assert!(format!("{:#}", failed[0].1).contains("row past 17 tokens"), "{:#}", failed[0].1);
    finished.sort_by_key(|f| f.id);
    assert_eq!(finished.len(), refs.len());
    for (g, r) in finished.iter().zip(&refs) {
        assert_eq!(g.tokens, r.tokens, "request {}", g.id);
        for (a, b) in g.step_logits.iter().zip(&r.step_logits) {
            assert!(max_abs(a, b) < 1e-4, "request {} logits", g.id);
        }
    }
    assert_eq!(eng.store.free_block_count(), eng.store.capacity_blocks(), "every block returned");
}

/// A constraint that allows only tokens of one parity, alternating, records every token it is
/// advanced with, completes after `len` tokens, and (when `fail_at` is set) errs at that step.
struct Alternating {
    seen: Arc<std::sync::Mutex<Vec<u32>>>,
    len: usize,
    fail_at: Option<usize>,
}

impl dms_integration::engine::constraint::TokenConstraint for Alternating {
    fn mask(&mut self, logits: &mut [f32]) -> anyhow::Result<()> {
        let step = self.seen.lock().unwrap().len();
        anyhow::ensure!(self.fail_at != Some(step), "refused at step {step}");
        for (t, l) in logits.iter_mut().enumerate() {
            if t % 2 != step % 2 {
                *l = f32::NEG_INFINITY;
            }
        }
        Ok(())
    }

    fn advance(&mut self, token: u32) -> anyhow::Result<()> {
        self.seen.lock().unwrap().push(token);
        Ok(())
    }

    fn finished(&self) -> bool {
        self.seen.lock().unwrap().len() >= self.len
    }
}

/// Constrained requests under preemption (swapped and recomputed): each constraint is advanced
/// exactly once per token, in order (a resumed sequence does not advance it again), every token
/// obeys its mask, the request ends when its constraint completes, and a constraint that errs
/// fails its request alone while the others finish and every block returns to the pool.
#[test]
fn constrained_requests_advance_once_per_token_through_preemption() {
    for mode in [Preemption::Swap, Preemption::Recompute] {
        let mut eng = batch_engine(70);
        eng.preemption = mode;
        let mut sched = Scheduler::new(greedy_params(40), 8, false).unwrap();
        let mut seen = Vec::new();
        for i in 0..6 {
            let req = Request {
                id: i,
                prompt: seeded_tokens(i, 12 + 3 * i),
                forced: None,
                policy: resolved_policy(&mut eng, "name = 'full'"),
                params: None,
            };
            sched.submit(&eng, req).unwrap();
            let log = Arc::new(std::sync::Mutex::new(Vec::new()));
            let fail_at = (i == 3).then_some(5);
            sched.constrain(i, Box::new(Alternating { seen: log.clone(), len: 20 + i, fail_at }));
            seen.push(log);
        }
        let (mut done, mut failed) = (Vec::new(), Vec::new());
        while !sched.is_idle() {
            done.extend(sched.step(&mut eng).unwrap());
            failed.extend(sched.take_failed());
        }
        assert!(sched.stats.preemptions > 0, "{mode:?}: the pool forces preemption");
        assert_eq!(failed.len(), 1, "{mode:?}");
        assert_eq!(failed[0].0, 3);
        assert!(format!("{:#}", failed[0].1).contains("refused at step 5"), "{:#}", failed[0].1);
        assert_eq!(done.len(), 5, "{mode:?}");
        for f in &done {
            let log = seen[f.id].lock().unwrap();
            assert_eq!(*log, f.tokens, "{mode:?}: request {} advanced once per token, in order", f.id);
            assert_eq!(f.tokens.len(), 20 + f.id, "{mode:?}: ended when its constraint completed");
            assert!(f.tokens.iter().enumerate().all(|(s, t)| *t as usize % 2 == s % 2), "{mode:?}: masked");
        }
        assert_eq!(eng.store.free_block_count(), eng.store.capacity_blocks(), "{mode:?}: every block returned");
    }
}
