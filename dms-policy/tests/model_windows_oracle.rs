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
    let mut seq = windows.wrap(factory.new_sequence(shape), shape, keeps_all);
    let mut slots: Vec<Vec<(Pos, Pos)>> = vec![Vec::new(); shape.n_rows()];
    let (mut ep, mut cp, mut seen, mut out) = (EvictPlan::default(), CompactPlan::default(), 0, Vec::new());
    for &n in chunks {
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
    }
    out
}

proptest! {
    /// Under the full cache a windowed row holds exactly its window; under a sliding window of
    /// the policy's own (with sinks) it sees what both allow and holds what the policy keeps;
    /// other rows follow the policy alone.
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
                    _ => (0..seen).filter(|&k| policy(last, k)).collect(),
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
