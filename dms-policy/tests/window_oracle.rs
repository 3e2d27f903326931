//! Built-in policies against naive visibility rules, for random chunkings.

use dms_policy::{CacheShape, CompactPlan, EvictPlan, Pos, Registry, RowRef, VISIBLE_FOREVER};

use proptest::prelude::*;

/// Replays plans on a naive slot array and returns it (position, last_visible) per slot.
fn replay(table: &str, chunks: &[usize]) -> (Vec<(Pos, Pos)>, Vec<Vec<Pos>>) {
    let table: toml::Table = toml::from_str(table).unwrap();
    let factory = Registry::with_builtins().build(&table).unwrap();
    let mut seq = factory.new_sequence(CacheShape { n_layers: 1, rows_per_layer: 1 });
    let row = RowRef { layer: 0, head: 0 };
    let mut slots: Vec<(Pos, Pos)> = Vec::new();
    let mut seen = 0;
    let mut kept_after_step = Vec::new();
    let (mut ep, mut cp) = (EvictPlan::default(), CompactPlan::default());
    for &n in chunks {
        seq.decide(row, seen, n, None).unwrap();
        seq.evict(row, seen, n, &mut ep).unwrap();
        for &(s, until) in &ep.hide {
            slots[s as usize].1 = until;
        }
        for (i, w) in ep.writes.iter().enumerate() {
            let p = seen + i as Pos;
            let s = w.slot as usize;
            if s < slots.len() {
                assert!(slots[s].1 < seen, "overwrote a slot a query of this step still sees");
                slots[s] = (p, w.last_visible);
            } else {
                assert_eq!(s, slots.len(), "appends must be in order");
                slots.push((p, w.last_visible));
            }
        }
        seen += n as Pos;
        seq.compact(row, &mut cp).unwrap();
        for &(from, to) in &cp.moves {
            assert!(slots[to as usize].1 < seen - 1, "moved onto a live slot");
            slots[to as usize] = slots[from as usize];
        }
        slots.truncate(cp.len as usize);
        let mut kept: Vec<Pos> = slots.iter().map(|s| s.0).collect();
        kept.sort_unstable();
        kept_after_step.push(kept);
    }
    (slots, kept_after_step)
}

proptest! {
    #[test]
    fn sliding_window_keeps_exactly_the_window_and_sinks(
        window in 1u32..12, sinks in 0u32..4,
        chunks in prop::collection::vec(1usize..9, 1..12),
    ) {
        let table = format!("name = \"sliding_window\"\nwindow = {window}\nsinks = {sinks}");
        let (_, kept) = replay(&table, &chunks);
        let mut seen = 0u32;
        for (step, n) in chunks.iter().enumerate() {
            seen += *n as u32;
            let last = seen - 1;
            let expected: Vec<Pos> = (0..seen).filter(|&k| k < sinks || last - k < window).collect();
            prop_assert_eq!(&kept[step], &expected, "after step {}", step);
        }
    }

    #[test]
    fn full_keeps_everything(chunks in prop::collection::vec(1usize..20, 1..10)) {
        let (slots, _) = replay("name = \"full\"", &chunks);
        let total: usize = chunks.iter().sum();
        let expected: Vec<(Pos, Pos)> = (0..total as Pos).map(|p| (p, VISIBLE_FOREVER)).collect();
        prop_assert_eq!(slots, expected);
    }
}

#[test]
fn sliding_window_decode_reuses_the_released_slot() {
    let (slots, _) = replay("name = \"sliding_window\"\nwindow = 3", &[3, 1, 1, 1]);
    assert_eq!(slots.len(), 3, "a decode step must not grow a full window row");
}

#[test]
fn registry_errors_name_the_problem() {
    let reg = Registry::with_builtins();
    let err = reg.build(&toml::from_str("name = \"dmss\"").unwrap()).unwrap_err().to_string();
    assert!(err.contains("dmss") && err.contains("full") && err.contains("sliding_window"), "{err}");
    let err = reg.build(&toml::from_str("name = \"sliding_window\"\nwindw = 4").unwrap()).unwrap_err().to_string();
    assert!(err.contains("windw"), "{err}");
    let err = reg.build(&toml::from_str("name = \"sliding_window\"\nwindow = 0").unwrap()).unwrap_err().to_string();
    assert!(err.contains("window"), "{err}");
    let err = reg.build(&toml::from_str("window = 3").unwrap()).unwrap_err().to_string();
    assert!(err.contains("name"), "{err}");
    // A window near u32::MAX would overflow `window + 1` (DMS) and used to reserve gigabytes a row.
    for policy in ["sliding_window", "dms"] {
        let t = format!("name = \"{policy}\"\nwindow = 4294967295");
        let err = reg.build(&toml::from_str(&t).unwrap()).unwrap_err().to_string();
        assert!(err.contains("window") && err.contains("4294967295"), "{err}");
        let t = format!("name = \"{policy}\"\nwindow = {}", dms_policy::MAX_WINDOW);
        assert!(reg.build(&toml::from_str(&t).unwrap()).is_ok(), "{policy} at the largest window");
    }
}
