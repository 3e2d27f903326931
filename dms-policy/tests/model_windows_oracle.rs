//! A model's own windows around a policy, against naive visibility rules for random layer
//! flags, policies and chunkings.

use dms_policy::{CacheShape, CompactPlan, EvictPlan, ModelWindows, Pos, Registry, RowRef};

use proptest::prelude::*;

/// Replays the plans of every row on naive slot arrays; per step and row, the sorted positions
/// stored after the step's compaction.
fn replay(windows: &ModelWindows, table: &str, shape: CacheShape, chunks: &[usize]) -> Vec<Vec<Vec<Pos>>> {
    let factory = Registry::with_builtins().build(&toml::from_str(table).unwrap()).unwrap();
    let mut seq = windows.wrap(factory.new_sequence(shape), shape);
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
                seq.compact(row, &mut cp).unwrap();
                for &(from, to) in &cp.moves {
                    slots[to as usize] = slots[from as usize];
                }
                slots.truncate(cp.len as usize);
                let mut kept: Vec<Pos> = slots.iter().map(|s| s.0).collect();
                kept.sort_unstable();
                step.push(kept);
            }
        }
        seen += n as Pos;
        out.push(step);
    }
    out
}

proptest! {
    #[test]
    fn windowed_layers_keep_the_models_window_and_the_rest_follow_the_policy(
        window in 1u32..10, flags in prop::collection::vec(any::<bool>(), 1..5),
        policy_window in 0u32..8, sinks in 0u32..3,
        chunks in prop::collection::vec(1usize..9, 1..10),
    ) {
        let shape = CacheShape { n_layers: flags.len(), rows_per_layer: 2 };
        let windows = ModelWindows::new(window, flags.clone()).unwrap();
        // 0: the full cache; otherwise a sliding window of its own, with sinks.
        let table = match policy_window {
            0 => "name = \"full\"".to_string(),
            w => format!("name = \"sliding_window\"\nwindow = {w}\nsinks = {sinks}"),
        };
        let kept = replay(&windows, &table, shape, &chunks);
        let mut seen = 0u32;
        for (step, n) in chunks.iter().enumerate() {
            seen += *n as u32;
            let last = seen - 1;
            for (layer, &windowed) in flags.iter().enumerate() {
                let expected: Vec<Pos> = (0..seen)
                    .filter(|&k| match (windowed, policy_window) {
                        (true, _) => last - k < window,
                        (false, 0) => true,
                        (false, w) => k < sinks || last - k < w,
                    })
                    .collect();
                for head in 0..2 {
                    let row = shape.index(RowRef { layer, head });
                    prop_assert_eq!(&kept[step][row], &expected, "step {} layer {} head {}", step, layer, head);
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
    let mut seq = windows.wrap(full.new_sequence(shape), shape);
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
