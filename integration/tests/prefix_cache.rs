//! Prefix caching in the scheduler: a prompt continued from a cached state (a chat's next turn,
//! a shared header, a repeated prompt) produces what its whole prompt pass produces, takes the
//! tokens the cache holds, and the kept states give their blocks back before anything running
//! is preempted.

mod common;

use common::*;
use dms_integration::engine::scheduler::{run_batch, Finished, Request, Scheduler};
use dms_integration::engine::{Engine, GenParams};

const POLICIES: [&str; 5] = [
    "name = 'full'",
    "name = 'sliding_window'\nwindow = 6\nsinks = 2",
    "name = 'dms'",
    "name = 'dms'\ndecision = 'key_norm'\nwindow = 4",
    "name = 'tova'\nbudget = 12",
];

fn params(chunk: usize) -> GenParams {
    GenParams { prefill_chunk: chunk, ..greedy_params(6) }
}

/// Runs `req` on `sched` until it finishes.
fn serve_one(sched: &mut Scheduler<Engine>, eng: &mut Engine, req: Request) -> Finished {
    sched.submit(eng, req).unwrap();
    let mut done = Vec::new();
    while !sched.is_idle() {
        done.extend(sched.step(eng).unwrap());
    }
    assert_eq!(done.len(), 1);
    done.pop().unwrap()
}

/// A conversation's turns and other prompts sharing its header, one after another: each equals
/// its whole prompt pass alone (tokens, and every step's logits within rounding), and takes from
/// the cache the tokens a hand count says it can: the previous turn (prompt and the tokens it
/// fed), the header once a second prompt has shown it is shared, a prompt seen before.
#[test]
fn prompts_continued_from_cached_states_equal_whole_passes_under_each_policy() {
    for table in POLICIES {
        for chunk in [0, 5] {
            let mut eng = batch_engine(1 << 14);
            let policy = resolved_policy(&mut eng, table);
            let mut sched = Scheduler::new(params(chunk), 8, true).unwrap();
            assert!(sched.enable_prefix_cache(&eng));
            let header = seeded_tokens(1, 40);
            let ask =
                |seed: usize, len: usize| header.iter().copied().chain(seeded_tokens(seed, len)).collect::<Vec<u32>>();
            let request = |id: usize, prompt: Vec<u32>| Request {
                id,
                prompt,
                forced: None,
                policy: policy.clone(),
                params: None,
            };
            let mut served = Vec::new();
            let mut serve = |sched: &mut Scheduler<Engine>, eng: &mut Engine, req: Request| {
                let want = run_batch(eng, vec![req.clone()], &params(chunk), 1, true, |_| {}).unwrap().0.pop().unwrap();
                let got = serve_one(sched, eng, req.clone());
                assert_eq!(got.tokens, want.tokens, "{table} chunk {chunk}: request {}", req.id);
                for (s, (a, b)) in got.step_logits.iter().zip(&want.step_logits).enumerate() {
                    let e = max_abs(a, b);
                    assert!(e < 1e-4, "{table} chunk {chunk}: request {} step {s}: {e}", req.id);
                }
                served.push((req.prompt.len(), got.cached_tokens));
                got
            };
            let a = serve(&mut sched, &mut eng, request(0, ask(2, 7)));
            // The next turn: the first turn's prompt and answer, then more.
            let turn: Vec<u32> = a.tokens.iter().copied().chain(seeded_tokens(3, 5)).collect();
            serve(&mut sched, &mut eng, request(1, ask(2, 7).into_iter().chain(turn).collect()));
            serve(&mut sched, &mut eng, request(2, ask(4, 6)));
            serve(&mut sched, &mut eng, request(3, ask(5, 9)));
            serve(&mut sched, &mut eng, request(4, ask(5, 9)));
            serve(&mut sched, &mut eng, request(5, ask(5, 9)));
            let cached: Vec<usize> = served.iter().map(|s| s.1).collect();
            if table.contains("tova") {
                assert_eq!(cached, [0; 6], "attention-scored policies take no part");
                assert_eq!(sched.prefix_cache_len(), 0);
            } else {
                // 1: the first turn's 47 prompt tokens and the 5 of its 6 tokens it fed. 2: the
                // header is shared with the earlier prompts, copied out. 3, 4: the header. 5: the
                // same prompt as 4, copied whole by 4.
                assert_eq!(cached, [0, 47 + 5, 0, 40, 40, 49], "{table} chunk {chunk}");
            }
            let prompts: usize = served.iter().map(|s| s.0).sum();
            assert_eq!(sched.stats.prefill_tokens + sched.stats.prefix_tokens, prompts);
            assert_eq!(sched.stats.prefix_tokens, cached.iter().sum::<usize>());
            sched.release_all(&mut eng);
            assert_eq!(eng.store.free_block_count(), eng.store.capacity_blocks(), "every block returned");
        }
    }
}

/// Kept states hold blocks, but never at the running sequences' expense: with a pool of two
/// sequences' worth full of cached states, a batch of new prompts is admitted, preempted and
/// resumed exactly as in an empty pool, with the same output.
#[test]
fn cached_states_give_their_blocks_back_before_anything_is_preempted() {
    let batch = |eng: &mut Engine| -> Vec<Request> {
        let full = resolved_policy(eng, POLICIES[0]);
        (0..4)
            .map(|i| Request {
                id: 10 + i,
                prompt: seeded_tokens(20 + i, 12),
                forced: None,
                policy: full.clone(),
                params: None,
            })
            .collect()
    };
    let run = |cache: bool| {
        // 41 tokens per sequence: 11 blocks x 4 rows; 100 blocks hold two.
        let mut eng = batch_engine(100);
        let full = resolved_policy(&mut eng, POLICIES[0]);
        let mut sched = Scheduler::new(greedy_params(30), 8, true).unwrap();
        if cache {
            sched.enable_prefix_cache(&eng);
            for i in 0..3 {
                let r =
                    Request { id: i, prompt: seeded_tokens(i, 8), forced: None, policy: full.clone(), params: None };
                serve_one(&mut sched, &mut eng, r);
            }
            // Each state holds 37 tokens in 10 blocks x 4 rows; the third took the first's blocks.
            assert_eq!(sched.prefix_cache_len(), 2);
            assert_eq!(eng.store.free_block_count(), 100 - 80);
        }
        let before = sched.stats.preemptions;
        for r in batch(&mut eng) {
            sched.submit(&eng, r).unwrap();
        }
        let mut done = Vec::new();
        while !sched.is_idle() {
            done.extend(sched.step(&mut eng).unwrap());
        }
        done.sort_by_key(|f| f.id);
        (done, sched.stats.preemptions - before)
    };
    let (want, want_preempted) = run(false);
    let (got, got_preempted) = run(true);
    assert!(want_preempted > 0, "the pool forces preemption");
    assert_eq!(got_preempted, want_preempted);
    for (g, w) in got.iter().zip(&want) {
        assert_eq!(g.tokens, w.tokens, "request {}", g.id);
        assert_eq!(g.preemptions, w.preemptions, "request {}", g.id);
    }
}

/// A pool that holds one long prompt: kept states never make a prompt fail or wait. A copy of a
/// shared start is skipped when the rest of the prompt would not fit beside it, and a prompt that
/// does not fit beside the state it starts from gets a whole pass instead (every answer equal to
/// a whole pass in an empty pool of the same size).
#[test]
fn kept_states_never_make_a_prompt_that_fits_the_pool_fail() {
    // 4 rows x 30 blocks of 4 tokens: one 100-token prompt (100 blocks) with room to decode.
    let mut eng = batch_engine(120);
    let full = resolved_policy(&mut eng, POLICIES[0]);
    let params = greedy_params(4);
    let mut sched = Scheduler::new(params.clone(), 8, true).unwrap();
    sched.enable_prefix_cache(&eng);
    let header = seeded_tokens(1, 40);
    let ask = |seed: usize, len: usize| header.iter().copied().chain(seeded_tokens(seed, len)).collect::<Vec<u32>>();
    let mut cached = Vec::new();
    for (id, prompt) in [(0, ask(2, 60)), (1, ask(3, 60)), (2, ask(4, 10)), (3, ask(5, 60))] {
        let req = Request { id, prompt, forced: None, policy: full.clone(), params: None };
        let mut alone = batch_engine(120);
        let want = run_batch(&mut alone, vec![req.clone()], &params, 1, true, |_| {}).unwrap().0.pop().unwrap();
        let got = serve_one(&mut sched, &mut eng, req);
        assert_eq!(got.tokens, want.tokens, "request {id}");
        cached.push(got.cached_tokens);
        if id == 2 {
            // The header (40 blocks) was copied out beside this short prompt, and its own state
            // (53 tokens: 56 blocks) is kept too.
            assert_eq!((sched.prefix_cache_len(), eng.store.free_block_count()), (2, 120 - 40 - 56));
        }
    }
    // 1: no room for a copy of the header beside the rest of its prompt. 3: the header state and
    // the prompt do not fit together, so the state goes and the prompt gets a whole pass.
    assert_eq!(cached, [0, 0, 0, 0]);
}
