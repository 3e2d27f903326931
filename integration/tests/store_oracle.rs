//! The paged store after any sequence of policy plans holds exactly what a naive list model holds.
//!
//! A test policy releases random recent tokens at random times (on top of `full`/`sliding_window`
//! through the registry) so that hides, slot reuse, in-step releases and compaction moves all occur.

use dms_integration::kv::store::KvStore;
use dms_policy::{CacheShape, CompactPlan, EvictPlan, PolicyError, Pos, Registry, RowLedger, RowRef, SequencePolicy};
use proptest::prelude::*;

/// Releases, at each new token t, the token `t - lag` when `pattern` says so.
struct RandomRelease {
    ledger: RowLedger,
    lag: Pos,
    pattern: Vec<bool>,
}

impl SequencePolicy for RandomRelease {
    fn decide(&mut self, _: RowRef, _: Pos, _: usize, _: Option<&[f32]>) -> Result<(), PolicyError> {
        Ok(())
    }
    fn evict(&mut self, _: RowRef, first: Pos, n: usize, plan: &mut EvictPlan) -> Result<(), PolicyError> {
        self.ledger.begin_step(first, plan).unwrap();
        for t in first..first + n as Pos {
            if t >= self.lag && self.pattern[(t - self.lag) as usize % self.pattern.len()] {
                self.ledger.release(t - self.lag, t, plan).unwrap();
            }
            self.ledger.place(t, plan);
        }
        Ok(())
    }
    fn compact(&mut self, _: RowRef, plan: &mut CompactPlan) -> Result<(), PolicyError> {
        self.ledger.compact(plan);
        Ok(())
    }
}

const D: usize = 4;

fn key_of(p: Pos) -> [f32; D] {
    [p as f32, -(p as f32), p as f32 * 0.5, 1.0]
}

/// Drives the store with `policy` and checks it against the naive model after every step.
fn drive(
    policy: &mut dyn SequencePolicy,
    visible: impl Fn(Pos, Pos) -> bool,
    chunks: &[usize],
    block_size: usize,
) -> Result<(), TestCaseError> {
    let mut store = KvStore::new(D, block_size, 10_000);
    let id = store.add_row(0);
    let row = RowRef { layer: 0, head: 0 };
    let (mut ep, mut cp) = (EvictPlan::default(), CompactPlan::default());
    let mut seen: Pos = 0;
    for &n in chunks {
        let k: Vec<f32> = (seen..seen + n as Pos).flat_map(key_of).collect();
        let v: Vec<f32> = k.iter().map(|x| x * 2.0).collect();
        policy.decide(row, seen, n, None).unwrap();
        policy.evict(row, seen, n, &mut ep).unwrap();
        store.apply_evict(id, &ep, seen, &k, &v).map_err(|e| TestCaseError::fail(e.to_string()))?;
        // Every query of the chunk sees exactly the keys the naive rule allows.
        let r = store.row(id).unwrap();
        for q in seen..seen + n as Pos {
            let mut got: Vec<Pos> = r
                .positions()
                .iter()
                .zip(r.last_visible())
                .filter(|(&p, &l)| p <= q && q <= l)
                .map(|(&p, _)| p)
                .collect();
            got.sort_unstable();
            let want: Vec<Pos> = (0..=q).filter(|&k| visible(k, q)).collect();
            prop_assert_eq!(got, want, "visible set of query {}", q);
        }
        seen += n as Pos;
        policy.compact(row, &mut cp).unwrap();
        store.apply_compact(id, &cp).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let r = store.row(id).unwrap();
        let last = seen - 1;
        let want: Vec<Pos> = (0..seen).filter(|&k| visible(k, last)).collect();
        prop_assert_eq!(r.kept_positions(), want.clone(), "kept after step ending at {}", last);
        let (mut kb, mut vb) = (Vec::new(), Vec::new());
        store.gather(id, &mut kb, &mut vb).unwrap();
        for (s, &p) in r.positions().iter().enumerate() {
            prop_assert_eq!(&kb[s * D..(s + 1) * D], &key_of(p)[..], "key data of slot {}", s);
            prop_assert_eq!(vb[s * D], 2.0 * p as f32);
        }
        prop_assert_eq!(r.blocks().len(), r.len().div_ceil(block_size), "blocks held");
        let u = store.usage();
        prop_assert_eq!(u.slots as usize, want.len());
        prop_assert_eq!(store.free_block_count() + r.blocks().len(), store.capacity_blocks());
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn random_releases(lag in 1u32..10, pattern in prop::collection::vec(any::<bool>(), 1..8),
                       chunks in prop::collection::vec(1usize..12, 1..15), bs in 1usize..7) {
        let mut p = RandomRelease { ledger: RowLedger::new(lag as usize), lag, pattern: pattern.clone() };
        let pat = pattern.clone();
        let visible = move |k: Pos, q: Pos| !(pat[k as usize % pat.len()] && q >= k + lag);
        drive(&mut p, visible, &chunks, bs)?;
    }

    #[test]
    fn sliding_window_through_registry(window in 1u32..10, sinks in 0u32..3,
                                       chunks in prop::collection::vec(1usize..12, 1..15), bs in 1usize..7) {
        let table: toml::Table = toml::from_str(&format!("name='sliding_window'\nwindow={window}\nsinks={sinks}")).unwrap();
        let f = Registry::with_builtins().build(&table).unwrap();
        let mut p = f.new_sequence(CacheShape { n_layers: 1, rows_per_layer: 1 });
        drive(p.as_mut(), move |k, q| k < sinks || q - k < window, &chunks, bs)?;
    }
}

#[test]
fn exhausted_pool_is_a_clear_error_and_changes_nothing() {
    let mut store = KvStore::new(D, 2, 2);
    let id = store.add_row(0);
    let f = Registry::with_builtins().build(&toml::from_str("name='full'").unwrap()).unwrap();
    let mut p = f.new_sequence(CacheShape { n_layers: 1, rows_per_layer: 1 });
    let row = RowRef { layer: 0, head: 0 };
    let mut ep = EvictPlan::default();
    p.evict(row, 0, 5, &mut ep).unwrap();
    let k = vec![0.0; 5 * D];
    let err = store.apply_evict(id, &ep, 0, &k, &k).unwrap_err().to_string();
    assert!(err.contains("KV cache is full"), "{err}");
    assert_eq!(store.row(id).unwrap().len(), 0);
    assert_eq!(store.free_block_count(), 2);
}
