//! Spec rule 8 under proptest: the paged store driven by `dms` gives the same attention outputs
//! (up to float reordering) and the same kept positions as the naive list oracle, for random
//! decisions, windows, block sizes, chunk sizes and prompt lengths.

mod common;
use common::vecf;

use candle_core::{Device, Tensor};
use dms_integration::kv::attention::{chunk_rows, decode_row, Scoring};
use dms_integration::kv::store::KvStore;
use dms_policy::{CacheShape, CompactPlan, EvictPlan, Pos, Registry, RowRef};
use proptest::prelude::*;

const D: usize = 8;
const G: usize = 2;

/// Attention of one query (G heads) over a list of (key, value).
fn naive(q: &[f32], list: &[(Vec<f32>, Vec<f32>)], scale: f32) -> Vec<f32> {
    let mut out = vec![0f32; G * D];
    for h in 0..G {
        let qh = &q[h * D..(h + 1) * D];
        let s: Vec<f64> = list
            .iter()
            .map(|(k, _)| qh.iter().zip(k).map(|(a, b)| (a * b) as f64).sum::<f64>() * scale as f64)
            .collect();
        let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let e: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
        let z: f64 = e.iter().sum();
        for (j, (_, v)) in list.iter().enumerate() {
            for i in 0..D {
                out[h * D + i] += (e[j] / z) as f32 * v[i];
            }
        }
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(150))]
    #[test]
    fn paged_dms_equals_list_oracle(w in 0u32..8, decisions in prop::collection::vec(any::<bool>(), 1..50),
                                    chunks in prop::collection::vec(1usize..10, 1..4), bs in 1usize..6, seed in 0u64..1000) {
        let n = decisions.len();
        let keys = vecf(seed, n * D);
        let vals = vecf(seed + 1, n * D);
        let qs = vecf(seed + 2, n * G * D);
        let scale = 0.7f32;
        // Oracle: rule 8 token by token.
        let mut list: Vec<(Pos, bool, Vec<f32>, Vec<f32>)> = Vec::new();
        let mut want_out = Vec::new();
        let mut want_kept = Vec::new();
        for t in 0..n {
            if let Some(l) = list.last_mut() { l.1 = decisions[t]; }
            list.push((t as Pos, false, keys[t * D..(t + 1) * D].to_vec(), vals[t * D..(t + 1) * D].to_vec()));
            if list.len() > w as usize + 1 && list[list.len() - w as usize - 2].1 {
                list.remove(list.len() - w as usize - 2);
            }
            let kv: Vec<(Vec<f32>, Vec<f32>)> = list.iter().map(|e| (e.2.clone(), e.3.clone())).collect();
            want_out.push(naive(&qs[t * G * D..(t + 1) * G * D], &kv, scale));
            want_kept.push(list.iter().map(|e| e.0).collect::<Vec<_>>());
        }
        // Paged store driven by the policy.
        let f = Registry::with_builtins().build(&toml::from_str(&format!("name = 'dms'\nwindow = {w}")).unwrap()).unwrap();
        let mut pol = f.new_sequence(CacheShape { n_layers: 1, rows_per_layer: 1 });
        let mut store = KvStore::new(D, bs, 1000);
        let id = store.add_row(0);
        let row = RowRef { layer: 0, head: 0 };
        let (mut ep, mut cp) = (EvictPlan::default(), CompactPlan::default());
        let mut seen = 0usize;
        let mut i = 0;
        while seen < n {
            let c = chunks[i % chunks.len()].min(n - seen);
            i += 1;
            let raw: Vec<f32> = decisions[seen..seen + c].iter().map(|&d| if d { 1.0 } else { -1.0 }).collect();
            pol.decide(row, seen as Pos, c, Some(&raw)).unwrap();
            pol.evict(row, seen as Pos, c, &mut ep).unwrap();
            store.apply_evict(id, &ep, seen as Pos, &keys[seen * D..(seen + c) * D], &vals[seen * D..(seen + c) * D]).unwrap();
            let q = &qs[seen * G * D..(seen + c) * G * D];
            let outs: Vec<Vec<f32>> = if c == 1 {
                let mut o = vec![0f32; G * D];
                decode_row(&store, id, q, seen as Pos, Scoring::scaled(scale as f64), &mut o).unwrap();
                vec![o]
            } else {
                let qt = Tensor::from_slice(q, (c, G, D), &Device::Cpu).unwrap();
                let pos: Vec<Pos> = (seen..seen + c).map(|x| x as Pos).collect();
                chunk_rows(&store, &[id], &qt, &pos, Scoring::scaled(scale as f64)).unwrap().to_vec2::<f32>().unwrap()
            };
            for (j, o) in outs.iter().enumerate() {
                let want = &want_out[seen + j];
                let err = o.iter().zip(want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
                prop_assert!(err < 1e-5, "query {}: error {}", seen + j, err);
            }
            seen += c;
            pol.compact(row, &mut cp).unwrap();
            store.apply_compact(id, &cp).unwrap();
            prop_assert_eq!(store.row(id).unwrap().kept_positions(), want_kept[seen - 1].clone(), "kept after {} tokens", seen);
        }
    }
}
