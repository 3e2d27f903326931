//! `dms` against the spec's rule-8 list oracle: random decisions, windows and chunkings.

use dms_policy::{CacheShape, CompactPlan, EvictPlan, Pos, Registry, RowRef, SignalNeed};
use proptest::prelude::*;

/// Rule 8: per row a list of (position, flag); the decision of a new token flags the previous
/// entry; the entry with exactly W+1 newer tokens is deleted when flagged.
fn oracle(decisions: &[bool], w: usize) -> Vec<Vec<Pos>> {
    let mut list: Vec<(Pos, bool)> = Vec::new();
    let mut after = Vec::new();
    for (t, &d) in decisions.iter().enumerate() {
        if let Some(last) = list.last_mut() {
            last.1 = d;
        }
        list.push((t as Pos, false));
        if list.len() > w + 1 && list[list.len() - w - 2].1 {
            list.remove(list.len() - w - 2);
        }
        after.push(list.iter().map(|e| e.0).collect());
    }
    after
}

/// Physical slots after each chunk, replaying the plans on a naive slot array.
fn run(table: &str, decisions: &[bool], chunks: &[usize]) -> Vec<(usize, Vec<Pos>)> {
    let f = Registry::with_builtins().build(&toml::from_str(table).unwrap()).unwrap();
    assert_eq!(f.signal_need(), SignalNeed::DecisionScores);
    let mut seq = f.new_sequence(CacheShape { n_layers: 1, rows_per_layer: 1 });
    let row = RowRef { layer: 0, head: 0 };
    let (mut ep, mut cp) = (EvictPlan::default(), CompactPlan::default());
    let mut slots: Vec<(Pos, Pos)> = Vec::new();
    let mut seen = 0usize;
    let mut out = Vec::new();
    let mut i = 0;
    while seen < decisions.len() {
        let n = chunks[i % chunks.len()].min(decisions.len() - seen);
        i += 1;
        let raw: Vec<f32> = decisions[seen..seen + n].iter().map(|&d| if d { 1.0 } else { 0.0 }).collect();
        seq.decide(row, seen as Pos, n, Some(&raw)).unwrap();
        seq.evict(row, seen as Pos, n, &mut ep).unwrap();
        for &(s, l) in &ep.hide {
            slots[s as usize].1 = l;
        }
        for (j, w) in ep.writes.iter().enumerate() {
            let p = (seen + j) as Pos;
            if (w.slot as usize) < slots.len() {
                assert!(slots[w.slot as usize].1 < seen as Pos);
                slots[w.slot as usize] = (p, w.last_visible);
            } else {
                assert_eq!(w.slot as usize, slots.len());
                slots.push((p, w.last_visible));
            }
        }
        seen += n;
        seq.compact(row, &mut cp).unwrap();
        for &(from, to) in &cp.moves {
            slots[to as usize] = slots[from as usize];
        }
        slots.truncate(cp.len as usize);
        let mut kept: Vec<Pos> = slots.iter().map(|s| s.0).collect();
        kept.sort_unstable();
        out.push((seen, kept));
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]
    #[test]
    fn dms_matches_rule_8(w in 0usize..10, decisions in prop::collection::vec(any::<bool>(), 1..60),
                          chunks in prop::collection::vec(1usize..9, 1..5)) {
        let want = oracle(&decisions, w);
        let got = run(&format!("name = 'dms'\nwindow = {w}"), &decisions, &chunks);
        for (seen, kept) in got {
            prop_assert_eq!(&kept, &want[seen - 1], "after {} tokens", seen);
        }
    }

    /// With `sinks = s` the first s tokens are never flagged: rule 8 on the decisions with every
    /// decision that would flag a sink (made at tokens 1..=s) cleared.
    #[test]
    fn dms_with_sinks_keeps_them_and_follows_rule_8_otherwise(w in 0usize..8, s in 0usize..6,
            decisions in prop::collection::vec(any::<bool>(), 1..60), chunks in prop::collection::vec(1usize..9, 1..5)) {
        let cleared: Vec<bool> = decisions.iter().enumerate().map(|(t, &d)| d && t > s).collect();
        let want = oracle(&cleared, w);
        let got = run(&format!("name = 'dms'\nwindow = {w}\nsinks = {s}"), &decisions, &chunks);
        for (seen, kept) in got {
            prop_assert_eq!(&kept, &want[seen - 1], "after {} tokens", seen);
            prop_assert!((0..s.min(seen) as Pos).all(|p| kept.contains(&p)), "a sink left: {:?}", kept);
        }
    }

    #[test]
    fn decode_never_grows_a_row_whose_leaving_token_is_flagged(w in 1usize..6, n in 10usize..40) {
        let decisions = vec![true; n];
        let got = run(&format!("name = 'dms'\nwindow = {w}"), &decisions, &[1]);
        for (seen, kept) in got {
            prop_assert_eq!(kept.len(), seen.min(w + 1));
        }
    }
}

#[test]
fn threshold_is_strictly_positive_logit() {
    // raw * 100 - 5 > 0 <=> raw > 0.05: exactly 0.05 keeps, slightly above evicts.
    let f = Registry::with_builtins().build(&toml::from_str("name = 'dms'\nwindow = 0").unwrap()).unwrap();
    let mut seq = f.new_sequence(CacheShape { n_layers: 1, rows_per_layer: 1 });
    let row = RowRef { layer: 0, head: 0 };
    let mut ep = EvictPlan::default();
    seq.decide(row, 0, 3, Some(&[0.0, 0.05, 0.0501])).unwrap();
    seq.evict(row, 0, 3, &mut ep).unwrap();
    // token 1's decision (0.05) keeps token 0; token 2's (0.0501) flags token 1, which with W = 0
    // is hidden from query 2 on.
    assert_eq!(ep.writes[0].last_visible, dms_policy::VISIBLE_FOREVER);
    assert_eq!(ep.writes[1].last_visible, 1);
}

#[test]
fn disable_eviction_and_random_need_no_scores() {
    let reg = Registry::with_builtins();
    let f = reg.build(&toml::from_str("name = 'dms'\nwindow = 4\ndisable_eviction = true").unwrap()).unwrap();
    assert_eq!(f.signal_need(), SignalNeed::None);
    let f = reg
        .build(&toml::from_str("name = 'dms'\nwindow = 4\ndecision = 'random'\nevict_rate = 0.75").unwrap())
        .unwrap();
    assert_eq!(f.signal_need(), SignalNeed::None);
    assert!(f.describe().contains("synthetic"));
    // Random decisions flag about evict_rate of the tokens: kept fraction of a long row ~ 1 - rate.
    let mut seq = f.new_sequence(CacheShape { n_layers: 1, rows_per_layer: 2 });
    let (mut ep, mut cp) = (EvictPlan::default(), CompactPlan::default());
    let mut len = 0usize;
    for head in 0..2 {
        let row = RowRef { layer: 0, head };
        seq.decide(row, 0, 4000, None).unwrap();
        seq.evict(row, 0, 4000, &mut ep).unwrap();
        seq.compact(row, &mut cp).unwrap();
        len += cp.len as usize;
    }
    let kept = len as f64 / 8000.0;
    assert!((kept - 0.25).abs() < 0.03, "kept fraction {kept}");
}

#[test]
fn dms_parameter_errors() {
    let reg = Registry::with_builtins();
    for (t, needle) in [
        ("name = 'dms'", "window"),
        ("name = 'dms'\nwindow = 4\ndecision = 'random'", "evict_rate"),
        ("name = 'dms'\nwindow = 4\ndecision = 'random'\nevict_rate = 1.5", "evict_rate"),
        ("name = 'dms'\nwindow = 4\ndecision = 'magic'", "magic"),
        ("name = 'dms'\nwindow = -1", "window"),
        ("name = 'dms'\nwindow = 4\nwindw = 3", "windw"),
    ] {
        let e = reg.build(&toml::from_str(t).unwrap()).unwrap_err().to_string();
        assert!(e.contains(needle), "{t}: {e}");
    }
}
