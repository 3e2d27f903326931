//! The paged store after any sequence of policy plans holds exactly what a naive list model holds.
//!
//! A test policy releases random recent tokens at random times (on top of `full`/`sliding_window`
//! through the registry) so that hides, slot reuse, in-step releases and compaction moves all occur.
//! Every element type is driven: the data of each slot must be its key and value as the type
//! rounds them (f16, or ggml's Q8_0 blocks by their definition), moved unchanged by compaction.

use dms_integration::kv::store::{KvDtype, KvStore};
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

/// Values per key and per value: two Q8_0 blocks.
const D: usize = 64;

/// The key of position `p`: distinct per position, of varied sign and size.
fn key_of(p: Pos) -> Vec<f32> {
    (0..D).map(|i| (p as f32 + 1.0) * ((i as f32 * 0.7 + p as f32).sin() + if i == 3 { 2.0 } else { 0.0 })).collect()
}

/// `x` as a store of `dtype` gives it back. Q8_0 by ggml's `quantize_row_q8_0_ref`: per run of
/// 32, d = max |x| / 127, q = round(x / d), stored q and d in f16, read as f16(d) * q.
fn stored(dtype: KvDtype, x: &[f32]) -> Vec<f32> {
    match dtype {
        KvDtype::F32 => x.to_vec(),
        KvDtype::F16 => x.iter().map(|&v| half::f16::from_f32(v).to_f32()).collect(),
        KvDtype::Q8_0 => x
            .chunks(32)
            .flat_map(|b| {
                let d = b.iter().fold(0f32, |m, v| m.max(v.abs())) / 127.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                let dh = half::f16::from_f32(d).to_f32();
                b.iter().map(move |v| dh * (v * id).round())
            })
            .collect(),
    }
}

/// Drives the store with `policy` and checks it against the naive model after every step.
fn drive(
    policy: &mut dyn SequencePolicy,
    visible: impl Fn(Pos, Pos) -> bool,
    chunks: &[usize],
    block_size: usize,
    dtype: KvDtype,
) -> Result<(), TestCaseError> {
    let mut store = KvStore::with_dtype(D, D, block_size, 10_000, dtype).unwrap();
    let mut id = store.add_row(0);
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
            let v: Vec<f32> = key_of(p).iter().map(|x| x * 2.0).collect();
            prop_assert_eq!(&kb[s * D..(s + 1) * D], &stored(dtype, &key_of(p))[..], "key data of slot {}", s);
            prop_assert_eq!(&vb[s * D..(s + 1) * D], &stored(dtype, &v)[..], "value data of slot {}", s);
        }
        prop_assert_eq!(r.blocks().len(), r.len().div_ceil(block_size), "blocks held");
        let u = store.usage();
        prop_assert_eq!(u.bytes_live, u.slots * dtype.slot_bytes(D, D));
        prop_assert_eq!(u.slots as usize, want.len());
        prop_assert_eq!(store.free_block_count() + r.blocks().len(), store.capacity_blocks());
        // Swapping the row out and back (preemption) and forking it change no stored value:
        // a Q8_0 block requantized from its own dequantized values is the same block.
        let swapped = store.swap_out(id).map_err(|e| TestCaseError::fail(e.to_string()))?;
        id = store.swap_in(swapped).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let fork = store.fork_row(id).map_err(|e| TestCaseError::fail(e.to_string()))?;
        for row in [id, fork] {
            let (mut k2, mut v2) = (Vec::new(), Vec::new());
            store.gather(row, &mut k2, &mut v2).unwrap();
            prop_assert_eq!((&k2, &v2), (&kb, &vb), "after a swap round trip and a fork");
        }
        store.remove_row(fork);
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn random_releases(lag in 1u32..10, pattern in prop::collection::vec(any::<bool>(), 1..8),
                       chunks in prop::collection::vec(1usize..12, 1..15), bs in 1usize..7,
                       dtype in prop::sample::select(vec![KvDtype::F32, KvDtype::F16, KvDtype::Q8_0])) {
        let mut p = RandomRelease { ledger: RowLedger::new(lag as usize), lag, pattern: pattern.clone() };
        let pat = pattern.clone();
        let visible = move |k: Pos, q: Pos| !(pat[k as usize % pat.len()] && q >= k + lag);
        drive(&mut p, visible, &chunks, bs, dtype)?;
    }

    #[test]
    fn sliding_window_through_registry(window in 1u32..10, sinks in 0u32..3,
                                       chunks in prop::collection::vec(1usize..12, 1..15), bs in 1usize..7,
                                       dtype in prop::sample::select(vec![KvDtype::F32, KvDtype::F16, KvDtype::Q8_0])) {
        let table: toml::Table = toml::from_str(&format!("name='sliding_window'\nwindow={window}\nsinks={sinks}")).unwrap();
        let f = Registry::with_builtins().build(&table).unwrap();
        let mut p = f.new_sequence(CacheShape { n_layers: 1, rows_per_layer: 1 });
        drive(p.as_mut(), move |k, q| k < sinks || q - k < window, &chunks, bs, dtype)?;
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
