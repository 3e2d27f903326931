//! The prefill budget (vLLM's chunked prefill): a prompt longer than the budget is fed a part per
//! step while the running sequences decode a token every step; each request's output equals its
//! whole prompt pass alone; a prompt pass under way waits for blocks rather than take a running
//! sequence's.

mod common;

use common::*;
use dms_integration::engine::scheduler::{run_batch, Finished, Request, Scheduler};
use dms_integration::engine::Engine;

const POLICIES: [&str; 4] = [
    "name = 'full'",
    "name = 'sliding_window'\nwindow = 6\nsinks = 2",
    "name = 'dms'",
    "name = 'dms'\ndecision = 'key_norm'\nwindow = 4",
];

/// Each of `reqs` run alone with a whole prompt pass: the oracle.
fn alone(eng: &mut Engine, reqs: &[Request], n: usize) -> Vec<Finished> {
    reqs.iter()
        .map(|r| run_batch(eng, vec![r.clone()], &greedy_params(n), 1, true, |_| {}).unwrap().0.pop().unwrap())
        .collect()
}

fn same(got: &Finished, want: &Finished, what: &str) {
    assert_eq!(got.tokens, want.tokens, "{what}: request {}", got.id);
    for (s, (a, b)) in got.step_logits.iter().zip(&want.step_logits).enumerate() {
        let e = max_abs(a, b);
        assert!(e < 1e-4, "{what}: request {} step {s}: {e}", got.id);
    }
}

/// A short request decodes; a 40-token prompt arrives with a budget of 7 tokens per step. No step
/// feeds more than 7 prompt tokens, the first request chooses a token in every step while the
/// long prompt is fed (6 steps: 7 x 5 + 5), and both answers equal their whole passes alone.
#[test]
fn a_long_prompt_is_fed_a_part_per_step_while_others_decode() {
    for table in POLICIES {
        let mut eng = batch_engine(1 << 14);
        let policy = resolved_policy(&mut eng, table);
        let req =
            |id: usize, prompt: Vec<u32>| Request { id, prompt, forced: None, policy: policy.clone(), params: None };
        let (a, b) = (req(0, seeded_tokens(1, 5)), req(1, seeded_tokens(2, 40)));
        let want = alone(&mut eng, &[a.clone(), b.clone()], 20);
        let mut sched = Scheduler::new(greedy_params(20), 8, true).unwrap();
        assert!(sched.set_prefill_budget(&eng, 7));
        sched.submit(&eng, a).unwrap();
        let mut done = Vec::new();
        done.extend(sched.step(&mut eng).unwrap());
        done.extend(sched.step(&mut eng).unwrap());
        sched.submit(&eng, b).unwrap();
        let mut fed = sched.stats.prefill_tokens;
        let mut prefilling_steps = 0;
        while !sched.is_idle() {
            done.extend(sched.step(&mut eng).unwrap());
            let step_fed = sched.stats.prefill_tokens - fed;
            fed = sched.stats.prefill_tokens;
            assert!(step_fed <= 7, "{table}: {step_fed} prompt tokens in one step");
            let chosen: Vec<usize> = sched.chosen().iter().map(|c| c.id).collect();
            if step_fed > 0 {
                prefilling_steps += 1;
                assert!(chosen.contains(&0), "{table}: request 0 decodes while the prompt is fed");
            }
        }
        assert_eq!(prefilling_steps, 6, "{table}");
        assert!(sched.take_failed().is_empty() && done.len() == 2, "{table}");
        assert_eq!(fed, 45, "{table}: every prompt token fed once");
        done.sort_by_key(|f| f.id);
        for (g, w) in done.iter().zip(&want) {
            same(g, w, table);
        }
        assert_eq!(eng.store.free_block_count(), eng.store.capacity_blocks(), "{table}: every block returned");
    }
}

/// Prompts that must be whole passes are: an attention-scored policy's (TOVA's kept set depends on
/// where a pass is cut), and with no budget every prompt.
#[test]
fn attention_scored_policies_and_no_budget_get_whole_passes() {
    for (table, budget) in [("name = 'tova'\nbudget = 12", 7), ("name = 'full'", 0)] {
        let mut eng = batch_engine(1 << 14);
        let policy = resolved_policy(&mut eng, table);
        let r = Request { id: 0, prompt: seeded_tokens(3, 30), forced: None, policy, params: None };
        let want = alone(&mut eng, std::slice::from_ref(&r), 5);
        let mut sched = Scheduler::new(greedy_params(5), 8, true).unwrap();
        assert_eq!(sched.set_prefill_budget(&eng, budget), budget > 0);
        sched.submit(&eng, r).unwrap();
        let mut done = sched.step(&mut eng).unwrap();
        assert_eq!(sched.stats.prefill_tokens, 30, "{table}: the whole prompt in the first step");
        while !sched.is_idle() {
            done.extend(sched.step(&mut eng).unwrap());
        }
        same(&done[0], &want[0], table);
    }
}

/// In a pool too small for a long generation and a long prompt's whole pass at once, the prompt
/// pass under way waits for blocks (steps that feed none of it) instead of taking the running
/// sequence's: nothing is preempted, and every answer equals its pass alone.
#[test]
fn a_prompt_pass_under_way_waits_for_blocks_rather_than_preempting() {
    // 4 rows of 4-token blocks. A: 8 + 40 tokens (48 blocks at the end); B: 36 + 2 (40 blocks).
    let mut eng = batch_engine(80);
    let policy = resolved_policy(&mut eng, "name = 'full'");
    let a = Request { id: 0, prompt: seeded_tokens(4, 8), forced: None, policy: policy.clone(), params: None };
    let b = Request {
        id: 1,
        prompt: seeded_tokens(5, 36),
        forced: None,
        policy,
        params: Some(dms_integration::engine::GenParams { max_tokens: 2, ..greedy_params(2) }),
    };
    let want = alone(&mut eng, &[a.clone(), b.clone()], 40);
    let mut sched = Scheduler::new(greedy_params(40), 8, true).unwrap();
    assert!(sched.set_prefill_budget(&eng, 4));
    sched.submit(&eng, a).unwrap();
    let mut done = Vec::new();
    for _ in 0..28 {
        done.extend(sched.step(&mut eng).unwrap());
    }
    sched.submit(&eng, b).unwrap();
    let (mut fed, mut paused) = (sched.stats.prefill_tokens, 0);
    while !sched.is_idle() {
        let b_waits = sched.waiting_count() > 0;
        done.extend(sched.step(&mut eng).unwrap());
        if b_waits && sched.stats.prefill_tokens == fed && sched.waiting_count() > 0 {
            paused += 1;
        }
        fed = sched.stats.prefill_tokens;
    }
    assert!(paused > 0, "the pass waited for blocks");
    assert!(sched.take_failed().is_empty() && done.len() == 2);
    assert_eq!(sched.stats.preemptions, 0);
    assert_eq!(fed, 44, "every prompt token fed once");
    done.sort_by_key(|f| f.id);
    for (g, w) in done.iter().zip(&want) {
        same(g, w, "pool of 80 blocks");
    }
    assert_eq!(eng.store.free_block_count(), eng.store.capacity_blocks());
}

/// A pass fed in parts that end inside a block asks only for the blocks it still lacks: with a
/// constant-memory policy running beside it (a window of 8), the 36-token prompt, admitted, is fed
/// in 6 steps of 6 tokens in any pool that admits it, never waiting for the running request to end.
#[test]
fn a_pass_under_way_counts_the_blocks_it_holds() {
    let mut admitted_somewhere = false;
    for capacity in 40..=64 {
        let mut eng = batch_engine(capacity);
        let policy = resolved_policy(&mut eng, "name = 'sliding_window'\nwindow = 8");
        let a = Request { id: 0, prompt: seeded_tokens(6, 4), forced: None, policy: policy.clone(), params: None };
        let b = Request { id: 1, prompt: seeded_tokens(7, 36), forced: None, policy, params: None };
        let mut sched = Scheduler::new(greedy_params(60), 8, false).unwrap();
        assert!(sched.set_prefill_budget(&eng, 6));
        sched.submit(&eng, a).unwrap();
        sched.step(&mut eng).unwrap();
        sched.submit(&eng, b).unwrap();
        let (mut first_fed, mut first_token, mut a_done) = (None, None, None);
        for step in 0..200 {
            let before = sched.stats.prefill_tokens;
            let finished = sched.step(&mut eng).unwrap();
            if first_fed.is_none() && sched.stats.prefill_tokens > before {
                first_fed = Some(step);
            }
            if first_token.is_none() && sched.chosen().iter().any(|c| c.id == 1) {
                first_token = Some(step);
            }
            if finished.iter().any(|f| f.id == 0) {
                a_done = Some(step);
            }
            if sched.is_idle() {
                break;
            }
        }
        let (Some(fed), Some(token), Some(a_done)) = (first_fed, first_token, a_done) else {
            panic!("pool of {capacity}: both requests ran");
        };
        if fed < a_done {
            admitted_somewhere = true;
            assert_eq!(token - fed, 5, "pool of {capacity}: the pass took {} steps", token - fed + 1);
        }
        assert!(sched.take_failed().is_empty());
    }
    assert!(admitted_somewhere, "some pool admits the prompt while the other request runs");
}

/// The copies of one prompt for `n` choices start as copies of its first sequence once its pass
/// is done, whether the pass was fed in parts or whole (TOVA's, which spends the step's budget).
#[test]
fn copies_of_a_long_prompt_fork_after_its_pass() {
    for table in ["name = 'full'", "name = 'tova'\nbudget = 12"] {
        let mut eng = batch_engine(1 << 14);
        let policy = resolved_policy(&mut eng, table);
        let prompt = seeded_tokens(8, 40);
        let mut sched = Scheduler::new(greedy_params(4), 8, false).unwrap();
        assert!(sched.set_prefill_budget(&eng, 7));
        for id in 0..3 {
            let r = Request { id, prompt: prompt.clone(), forced: None, policy: policy.clone(), params: None };
            sched.submit(&eng, r).unwrap();
        }
        let mut done = Vec::new();
        while !sched.is_idle() {
            done.extend(sched.step(&mut eng).unwrap());
        }
        assert_eq!(sched.stats.forked, 2, "{table}");
        assert_eq!(sched.stats.prefill_tokens, 40, "{table}: one pass for three sequences");
        assert_eq!(done.len(), 3);
        assert!(done.iter().all(|f| f.tokens == done[0].tokens), "{table}: greedy copies agree");
    }
}

/// Cancelling a request whose pass is under way gives its blocks back at once.
#[test]
fn cancelling_a_pass_under_way_returns_its_blocks() {
    let mut eng = batch_engine(1 << 12);
    let policy = resolved_policy(&mut eng, "name = 'full'");
    let mut sched = Scheduler::new(greedy_params(4), 8, false).unwrap();
    assert!(sched.set_prefill_budget(&eng, 7));
    let r = Request { id: 3, prompt: seeded_tokens(9, 40), forced: None, policy, params: None };
    sched.submit(&eng, r).unwrap();
    assert!(sched.step(&mut eng).unwrap().is_empty());
    assert_eq!(sched.stats.prefill_tokens, 7);
    assert!(eng.store.free_block_count() < eng.store.capacity_blocks(), "the pass holds blocks");
    assert!(sched.cancel(&mut eng, 3).unwrap().is_none());
    assert!(sched.is_idle());
    assert_eq!(eng.store.free_block_count(), eng.store.capacity_blocks());
}
