//! A model's own windows around a policy, against naive visibility rules for random layer
//! flags, policies and chunkings.

use dms_policy::{CacheShape, CompactPlan, EvictPlan, ModelWindows, Pos, Registry, RowRef};

use proptest::prelude::*;

/// Per step and row: the sorted positions stored after the step's compaction, and for each of
/// the step's queries the positions it sees.
type Replay = Vec<Vec<(Vec<Pos>, Vec<Vec<Pos>>)>>;

/// Replays the plans of every row on naive slot arrays (`keeps_all`: the policy keeps every key).
fn replay(windows: &ModelWindows, table: &str, keeps_all: bool, shape: CacheShape, chunks: &[usize]) -> Replay {
    let factory = Registry::with_builtins().build(&toml::from_str(table).unwrap()).unwrap();
    visibility(windows.wrap(factory.new_sequence(shape), shape, keeps_all), shape, chunks, false, None)
}

proptest! {
    /// Under the full cache a windowed row holds exactly its window; under a sliding window of
    /// the policy's own (with sinks) it sees what both allow and holds what both keep for the
    /// next query; other rows follow the policy alone.
    #[test]
    fn windowed_layers_see_the_models_window_and_the_policy_together(
        window in 1u32..10, flags in prop::collection::vec(any::<bool>(), 1..5),
        policy_window in 0u32..8, sinks in 0u32..3, keeps_all in any::<bool>(),
        chunks in prop::collection::vec(1usize..9, 1..10),
    ) {
        let shape = CacheShape { n_layers: flags.len(), rows_per_layer: 2 };
        let windows = ModelWindows::new(window, flags.clone()).unwrap();
        // 0: the full cache (told that it keeps every key, or not); otherwise a sliding window of
        // its own, with sinks.
        let (table, keeps_all) = match policy_window {
            0 => ("name = \"full\"".to_string(), keeps_all),
            w => (format!("name = \"sliding_window\"\nwindow = {w}\nsinks = {sinks}"), false),
        };
        let steps = replay(&windows, &table, keeps_all, shape, &chunks);
        let mut seen = 0u32;
        for (step, n) in chunks.iter().enumerate() {
            let first = seen;
            seen += *n as u32;
            let policy = |q: Pos, k: Pos| policy_window == 0 || k < sinks || q - k < policy_window;
            for (layer, &windowed) in flags.iter().enumerate() {
                let sees = |q: Pos, k: Pos| policy(q, k) && (!windowed || q - k < window);
                let visible: Vec<Vec<Pos>> = (first..seen).map(|q| (0..=q).filter(|&k| sees(q, k)).collect()).collect();
                let last = seen - 1;
                let kept: Vec<Pos> = match (windowed, keeps_all) {
                    (true, true) => (0..seen).filter(|&k| sees(last, k)).collect(),
                    (true, false) => (0..seen).filter(|&k| policy(last, k) && seen - k < window).collect(),
                    (false, _) => (0..seen).filter(|&k| policy(last, k)).collect(),
                };
                for head in 0..2 {
                    let (got_kept, got_visible) = &steps[step][shape.index(RowRef { layer, head })];
                    prop_assert_eq!(got_visible, &visible, "visible: step {} layer {} head {}", step, layer, head);
                    prop_assert_eq!(got_kept, &kept, "kept: step {} layer {} head {}", step, layer, head);
                }
            }
        }
    }
}

#[test]
fn forks_carry_both_states_and_windows_are_checked() {
    let shape = CacheShape { n_layers: 2, rows_per_layer: 1 };
    let full = Registry::with_builtins().build(&toml::from_str("name = 'full'").unwrap()).unwrap();
    let windows = ModelWindows::new(3, vec![true, false]).unwrap();
    let mut seq = windows.wrap(full.new_sequence(shape), shape, true);
    let mut ep = EvictPlan::default();
    for layer in 0..2 {
        seq.evict(RowRef { layer, head: 0 }, 0, 5, &mut ep).unwrap();
    }
    let mut copy = seq.fork().expect("both policies fork");
    // The copy goes on where the original stands: the windowed row releases position 2 at 5.
    copy.evict(RowRef { layer: 0, head: 0 }, 5, 1, &mut ep).unwrap();
    assert_eq!(ep.writes.len(), 1);
    assert!(ep.writes[0].slot < 5, "the window's released slot is reused: {:?}", ep.writes);
    copy.evict(RowRef { layer: 1, head: 0 }, 5, 1, &mut ep).unwrap();
    assert_eq!(ep.writes[0].slot, 5, "the full cache appends: {:?}", ep.writes);

    for bad in [0, dms_policy::MAX_WINDOW + 1] {
        let err = ModelWindows::new(bad, vec![true]).unwrap_err().to_string();
        assert!(err.contains(&format!("not {bad}")), "{err}");
    }
}

/// Per step and row, the positions each query sees and those stored after compaction, for
/// `seq` (a policy state, wrapped or not) fed `chunks`; with `scored`, attention weights hashed
/// from each slot's position and the step (the same in every run). With `fork_at`, the state is
/// replaced by its fork after that step.
fn visibility(
    mut seq: Box<dyn dms_policy::SequencePolicy>,
    shape: CacheShape,
    chunks: &[usize],
    scored: bool,
    fork_at: Option<usize>,
) -> Replay {
    let mut slots: Vec<Vec<(Pos, Pos)>> = vec![Vec::new(); shape.n_rows()];
    let (mut ep, mut cp, mut seen, mut out) = (EvictPlan::default(), CompactPlan::default(), 0, Vec::new());
    for (step_i, &n) in chunks.iter().enumerate() {
        let mut step = Vec::new();
        for layer in 0..shape.n_layers {
            for head in 0..shape.rows_per_layer {
                let row = RowRef { layer, head };
                let slots = &mut slots[shape.index(row)];
                seq.decide(row, seen, n, None).unwrap();
                seq.evict(row, seen, n, &mut ep).unwrap();
                for &(s, until) in &ep.hide {
                    slots[s as usize].1 = until;
                }
                for (i, w) in ep.writes.iter().enumerate() {
                    let (p, s) = (seen + i as Pos, w.slot as usize);
                    if s < slots.len() {
                        assert!(slots[s].1 < seen, "overwrote a slot a query of this step still sees");
                        slots[s] = (p, w.last_visible);
                    } else {
                        assert_eq!(s, slots.len(), "appends must be in order");
                        slots.push((p, w.last_visible));
                    }
                }
                let visible: Vec<Vec<Pos>> = (seen..seen + n as Pos)
                    .map(|q| {
                        let mut v: Vec<Pos> = slots.iter().filter(|s| s.0 <= q && s.1 >= q).map(|s| s.0).collect();
                        v.sort_unstable();
                        v
                    })
                    .collect();
                if scored {
                    let weights: Vec<f32> = slots
                        .iter()
                        .map(|s| ((s.0 as u64 * 2654435761 + step_i as u64 * 97) % 1000) as f32 / 1000.0 + 0.0005)
                        .collect();
                    seq.observe_attention(row, &weights).unwrap();
                }
                seq.compact(row, &mut cp).unwrap();
                for &s in &cp.drop {
                    slots[s as usize].1 = 0;
                }
                for &(from, to) in &cp.moves {
                    slots[to as usize] = slots[from as usize];
                }
                slots.truncate(cp.len as usize);
                let mut kept: Vec<Pos> = slots.iter().map(|s| s.0).collect();
                kept.sort_unstable();
                step.push((kept, visible));
            }
        }
        seen += n as Pos;
        out.push(step);
        if fork_at == Some(step_i) {
            seq = seq.fork().expect("the state forks");
        }
    }
    out
}

proptest! {
    /// Learned-style DMS (random decisions, delayed eviction, sinks) and shadow runs on a
    /// windowed layer: every query sees exactly what the same policy alone lets it see, within
    /// the window, and the row stores what the policy alone stores that the window still shows
    /// to the next query (shadow and the full cache: only the window); a fork taken midway goes
    /// on identically. TOVA and H2O (whose scores the window changes): no query sees a key
    /// outside the window, rows stay within budget, and no key the window hides is stored.
    #[test]
    fn any_policy_on_a_windowed_layer_sees_only_its_window(
        window in 1u32..8, policy in 0usize..6, delay in 0u32..4,
        chunks in prop::collection::vec(1usize..7, 1..10), fork_at in 0usize..10,
    ) {
        let table = match policy {
            0 => format!("name = 'dms'\ndecision = 'random'\nevict_rate = 0.6\nseed = 3\nwindow = {delay}"),
            1 => format!("name = 'dms'\ndecision = 'random'\nevict_rate = 0.9\nseed = 5\nwindow = {delay}\nsinks = 2"),
            2 => "name = 'shadow'\ninner = { name = 'sliding_window', window = 3 }".to_string(),
            3 => "name = 'full'".to_string(),
            4 => format!("name = 'tova'\nbudget = {}", delay + 2),
            _ => format!("name = 'h2o'\nbudget = {}\nrecent = 1", delay + 3),
        };
        let factory = Registry::with_builtins().build(&toml::from_str(&table).unwrap()).unwrap();
        let shape = CacheShape { n_layers: 2, rows_per_layer: 1 };
        let windows = ModelWindows::new(window, vec![true, false]).unwrap();
        let scored = policy >= 4;
        let wrapped = windows.wrap(factory.new_sequence(shape), shape, factory.keeps_every_key());
        let got = visibility(wrapped, shape, &chunks, scored, Some(fork_at));
        let alone = visibility(factory.new_sequence(shape), shape, &chunks, scored, None);
        let mut first = 0u32;
        for (step, n) in chunks.iter().enumerate() {
            let (kept, visible) = &got[step][0];
            for (i, seen_by_q) in visible.iter().enumerate() {
                let q = first + i as Pos;
                let want: Vec<Pos> = alone[step][0].1[i].iter().copied().filter(|&k| q - k < window).collect();
                match scored {
                    false => prop_assert_eq!(seen_by_q, &want, "step {} query {}", step, q),
                    true => prop_assert!(seen_by_q.iter().all(|&k| q - k < window), "step {} query {}: {:?}", step, q, seen_by_q),
                }
            }
            let last = first + *n as Pos - 1;
            match (scored, factory.keeps_every_key()) {
                (true, _) => {
                    // Keys the window hides weigh nothing, so they go first: the row stores as many
                    // keys as the budget allows among those the window still shows.
                    let budget = (delay + 2 + u32::from(policy == 5)) as usize;
                    let shown = (0..=last).filter(|&k| last + 1 - k < window).count();
                    prop_assert!(kept.iter().all(|&k| last + 1 - k < window), "step {}: stored {:?}", step, kept);
                    prop_assert_eq!(kept.len(), budget.min(shown), "step {}: stored {:?}", step, kept);
                }
                (false, true) => prop_assert_eq!(kept, &(0..=last).filter(|&k| last - k < window).collect::<Vec<_>>()),
                (false, false) => {
                    let shown: Vec<Pos> = alone[step][0].0.iter().copied().filter(|&k| last + 1 - k < window).collect();
                    prop_assert_eq!(kept, &shown, "stored, step {}", step);
                }
            }
            // The layer without a window is the policy alone.
            prop_assert_eq!(&got[step][1], &alone[step][1], "unwindowed layer, step {}", step);
            first += *n as Pos;
        }
    }
}

/// Attention weights for a windowed row must come one per stored key: another count is an error
/// naming both, not weights read against the wrong keys.
#[test]
fn weights_of_the_wrong_length_are_refused() {
    let shape = CacheShape { n_layers: 1, rows_per_layer: 1 };
    let tova = Registry::with_builtins().build(&toml::from_str("name = 'tova'\nbudget = 4").unwrap()).unwrap();
    let mut seq = ModelWindows::new(3, vec![true]).unwrap().wrap(tova.new_sequence(shape), shape, false);
    let (row, mut ep) = (RowRef { layer: 0, head: 0 }, EvictPlan::default());
    seq.decide(row, 0, 2, None).unwrap();
    seq.evict(row, 0, 2, &mut ep).unwrap();
    let err = seq.observe_attention(row, &[0.5; 3]).unwrap_err().to_string();
    assert!(err.contains("3 attention weights for 2 stored keys"), "{err}");
    seq.observe_attention(row, &[0.5; 2]).unwrap();
}
