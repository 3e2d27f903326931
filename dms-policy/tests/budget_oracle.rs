//! `tova` and `h2o` against naive list oracles under random attention weights: the kept sets are
//! exact, every row stays within its budget, and the plans only ever drop or overwrite the keys
//! the oracle evicts (so memory returns through compaction).

use std::collections::HashMap;

use dms_policy::{CacheShape, CompactPlan, EvictPlan, Pos, Registry, RowRef};
use proptest::prelude::*;

/// The oracle: a list of (position, score); drop the lowest-scored keys outside the protected
/// newest ones (ties: the older first) until the row fits its budget.
fn oracle_step(
    list: &mut Vec<(Pos, f32)>,
    weights: &HashMap<Pos, f32>,
    accumulate: bool,
    budget: usize,
    recent: usize,
) {
    for e in list.iter_mut() {
        let w = weights[&e.0];
        e.1 = if accumulate { e.1 + w } else { w };
    }
    if list.len() <= budget {
        return;
    }
    list.sort_by_key(|e| e.0);
    let candidates = list.len().saturating_sub(recent);
    let n_drop = (list.len() - budget).min(candidates);
    let mut order: Vec<usize> = (0..candidates).collect();
    order.sort_by(|&a, &b| list[a].1.total_cmp(&list[b].1).then(list[a].0.cmp(&list[b].0)));
    let victims: std::collections::HashSet<Pos> = order[..n_drop].iter().map(|&i| list[i].0).collect();
    list.retain(|e| !victims.contains(&e.0));
}

fn run(policy: &str, budget: usize, recent: usize, steps: &[(usize, Vec<u16>)]) {
    let table: toml::Table = toml::from_str(&match policy {
        "tova" => format!("name = 'tova'\nbudget = {budget}"),
        _ => format!("name = 'h2o'\nbudget = {budget}\nrecent = {recent}"),
    })
    .unwrap();
    let factory = Registry::with_builtins().build(&table).unwrap();
    let mut seq = factory.new_sequence(CacheShape { n_layers: 1, rows_per_layer: 1 });
    let row = RowRef { layer: 0, head: 0 };
    let recent = if policy == "tova" { 1 } else { recent };
    let (mut ep, mut cp) = (EvictPlan::default(), CompactPlan::default());
    let mut store: Vec<Pos> = Vec::new();
    let mut oracle: Vec<(Pos, f32)> = Vec::new();
    let mut seen: Pos = 0;
    for (n_new, raw) in steps {
        let n_new = *n_new;
        seq.decide(row, seen, n_new, None).unwrap();
        seq.evict(row, seen, n_new, &mut ep).unwrap();
        assert!(ep.hide.is_empty());
        for (i, w) in ep.writes.iter().enumerate() {
            assert_eq!(w.slot as usize, store.len(), "new tokens append");
            store.push(seen + i as Pos);
            oracle.push((seen + i as Pos, 0.0));
        }
        seen += n_new as Pos;
        // Attention weights keyed by position, so both sides score the same keys alike.
        let weights: HashMap<Pos, f32> =
            store.iter().enumerate().map(|(i, &p)| (p, raw[i % raw.len()] as f32 / 97.0)).collect();
        let slot_weights: Vec<f32> = store.iter().map(|p| weights[p]).collect();
        seq.observe_attention(row, &slot_weights).unwrap();
        seq.compact(row, &mut cp).unwrap();
        oracle_step(&mut oracle, &weights, policy == "h2o", budget, recent);
        let victims: Vec<Pos> = cp.drop.iter().map(|&s| store[s as usize]).collect();
        let mut dead: Vec<bool> = vec![false; store.len()];
        for &s in &cp.drop {
            dead[s as usize] = true;
        }
        for &(from, to) in &cp.moves {
            assert!(dead[to as usize], "a move overwrites a kept key");
            assert!(!dead[from as usize]);
            store[to as usize] = store[from as usize];
            dead[to as usize] = false;
            dead[from as usize] = true;
        }
        assert!(dead[cp.len as usize..].iter().all(|&d| d), "truncation drops a kept key");
        store.truncate(cp.len as usize);
        let mut got = store.clone();
        got.sort_unstable();
        let want: Vec<Pos> =
            oracle.iter().map(|e| e.0).collect::<std::collections::BTreeSet<_>>().into_iter().collect();
        assert_eq!(got, want, "{policy} kept set after {seen} tokens (dropped {victims:?})");
        assert!(store.len() <= budget.max(recent), "{policy}: {} slots over budget {budget}", store.len());
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]
    #[test]
    fn tova_keeps_exactly_what_the_oracle_keeps(
        budget in 1usize..12,
        steps in prop::collection::vec((1usize..5, prop::collection::vec(0u16..97, 1..40)), 1..40),
    ) {
        run("tova", budget, 1, &steps);
    }

    #[test]
    fn h2o_keeps_exactly_what_the_oracle_keeps(
        budget in 2usize..12,
        recent_frac in 0.0f64..1.0,
        steps in prop::collection::vec((1usize..5, prop::collection::vec(0u16..97, 1..40)), 1..40),
    ) {
        let recent = ((budget as f64 * recent_frac) as usize).max(1);
        run("h2o", budget, recent, &steps);
    }
}

#[test]
fn bad_budgets_and_shadowing_are_refused_with_the_key_named() {
    let r = Registry::with_builtins();
    for (text, key) in [
        ("name = 'tova'\nbudget = 0", "budget"),
        ("name = 'tova'\nbudget = 2.5", "budget"),
        ("name = 'tova'\nbudget = 8\nrecent = 2", "recent"),
        ("name = 'h2o'\nbudget = 4\nrecent = 9", "recent"),
        ("name = 'shadow'\ninner = { name = 'tova', budget = 8 }", "attention weights"),
    ] {
        let t: toml::Table = toml::from_str(text).unwrap();
        let e = r.build(&t).unwrap_err().to_string();
        assert!(e.contains(key), "{text}: {e}");
    }
}
