//! The attention-weight signal and the attention-scored baselines (`tova`, `h2o`) on the engine:
//! the weights the store hands a policy equal a dense softmax, a budget at least the sequence
//! length changes nothing, and a small budget holds every row to it while generation runs.

mod common;

use candle_core::{Device, Tensor};
use common::*;
use dms_integration::engine::GenParams;
use dms_integration::kv::attention::{chunk_rows_weighted, decode_row_weighted, Scoring};
use dms_integration::kv::store::KvStore;
use dms_policy::{EvictPlan, Pos, Write, VISIBLE_FOREVER};

fn rand_vec(seed: u64, n: usize) -> Vec<f32> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        })
        .collect()
}

/// A row of `n` keys at positions `0..n`; key `hidden` is visible only to queries up to `n - 2`.
fn store_with_row(
    d: usize,
    n: usize,
    hidden: usize,
) -> (KvStore, dms_integration::kv::store::RowId, Vec<f32>, Vec<f32>) {
    let mut store = KvStore::with_value_dim(d, d, 4, 64);
    let id = store.add_row(0);
    let k = rand_vec(1, n * d);
    let v = rand_vec(2, n * d);
    let writes = (0..n)
        .map(|i| Write { slot: i as u32, last_visible: if i == hidden { n as Pos - 2 } else { VISIBLE_FOREVER } })
        .collect();
    store.apply_evict(id, &EvictPlan { hide: Vec::new(), writes }, 0, &k, &v).unwrap();
    (store, id, k, v)
}

/// Softmax weights of one query over the keys it sees.
fn dense_weights(q: &[f32], k: &[f32], d: usize, visible: &[bool], scale: f32) -> Vec<f32> {
    let s: Vec<f32> = (0..visible.len())
        .map(|j| if visible[j] { scale * (0..d).map(|e| q[e] * k[j * d + e]).sum::<f32>() } else { f32::NEG_INFINITY })
        .collect();
    let m = s.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let z: f32 = s.iter().map(|x| (x - m).exp()).sum();
    s.iter().map(|x| (x - m).exp() / z).collect()
}

#[test]
fn decode_weights_are_the_dense_softmax_averaged_over_the_group() {
    let (d, n, g) = (8, 11, 3);
    let (store, id, k, _) = store_with_row(d, n, 4);
    let q = rand_vec(3, g * d);
    let q_pos = n as Pos - 1;
    let mut out = vec![0f32; g * d];
    let mut w = vec![0f32; n];
    decode_row_weighted(&store, id, &q, q_pos, Scoring::scaled(0.3), &mut out, Some(&mut w)).unwrap();
    let visible: Vec<bool> = (0..n).map(|j| j != 4).collect();
    let mut want = vec![0f32; n];
    for h in 0..g {
        for (acc, x) in want.iter_mut().zip(dense_weights(&q[h * d..(h + 1) * d], &k, d, &visible, 0.3)) {
            *acc += x / g as f32;
        }
    }
    assert!(max_abs(&w, &want) < 1e-5, "{w:?} vs {want:?}");
    assert_eq!(w[4], 0.0, "a hidden key has no weight");
}

#[test]
fn chunk_weights_sum_the_chunk_queries_dense_softmax() {
    let (d, n, heads) = (8, 9, 2);
    let (store, id, k, _) = store_with_row(d, n, 2);
    let t = 3;
    let qv = rand_vec(5, t * heads * d);
    let q = Tensor::from_vec(qv.clone(), (t, heads, d), &Device::Cpu).unwrap();
    let q_pos: Vec<Pos> = (n as Pos - 3..n as Pos).collect();
    let (_, w) = chunk_rows_weighted(&store, &[id], &q, &q_pos, Scoring::scaled(0.25), None).unwrap();
    let mut want = vec![0f32; n];
    for (i, &qp) in q_pos.iter().enumerate() {
        let visible: Vec<bool> = (0..n).map(|j| j as Pos <= qp && !(j == 2 && qp > n as Pos - 2)).collect();
        for h in 0..heads {
            let qs = &qv[(i * heads + h) * d..(i * heads + h + 1) * d];
            for (acc, x) in want.iter_mut().zip(dense_weights(qs, &k, d, &visible, 0.25)) {
                *acc += x / heads as f32;
            }
        }
    }
    assert_eq!(w.len(), 1);
    assert!(max_abs(&w[0], &want) < 1e-5, "{:?} vs {want:?}", w[0]);
}

fn greedy(n: usize) -> GenParams {
    GenParams::greedy(n, 0)
}

#[test]
fn a_budget_above_the_sequence_changes_nothing_and_a_small_one_holds_every_row() {
    let prompt: Vec<u32> = (0..24).map(|i| (i * 7 + 3) % 100).collect();
    let mut full = engine(&fixture("qwen3_tiny"), "name = 'full'", 4);
    let want = full.generate(&prompt, &greedy(16), None).unwrap();
    for policy in ["name = 'tova'\nbudget = 64", "name = 'h2o'\nbudget = 64\nrecent = 8"] {
        let mut e = engine(&fixture("qwen3_tiny"), policy, 4);
        let got = e.generate(&prompt, &greedy(16), None).unwrap();
        assert_eq!(got.tokens, want.tokens, "{policy}");
        assert!((got.compression_ratio - 1.0).abs() < 1e-9);
    }
    for (policy, budget) in [("name = 'tova'\nbudget = 10", 10), ("name = 'h2o'\nbudget = 12\nrecent = 4", 12)] {
        let mut e = engine(&fixture("qwen3_tiny"), policy, 4);
        let mut seq = e.new_sequence();
        let logits = e.prefill(&mut seq, &prompt, 8).unwrap();
        let mut tok = dms_integration::engine::argmax(&logits);
        for _ in 0..12 {
            let rows = (0..seq.shape().n_layers).flat_map(|l| seq.layer_rows(l).to_vec()).collect::<Vec<_>>();
            for r in rows {
                assert!(e.store.row(r).unwrap().len() <= budget, "{policy}: a row over its budget");
            }
            let l = e.decode(vec![&mut seq], &[tok]).unwrap();
            tok = dms_integration::engine::argmax(&l[0]);
        }
        let seen = (prompt.len() + 12) as f64;
        let cr = seq.compression_ratio(&e.store);
        assert!((cr - seen / budget as f64).abs() < 1e-9, "{policy}: CR {cr}, expected {}", seen / budget as f64);
        seq.release(&mut e.store);
        assert_eq!(e.store.usage().bytes_allocated, 0, "{policy}: memory returned");
    }
}
