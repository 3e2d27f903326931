//! After a long DMS generation the memory reported live is what the kept positions imply, and
//! the allocation is that plus block rounding; both checked against the rule-8 oracle replayed
//! on the decisions the policy received.

mod common;
use std::sync::Arc;

use candle_core::Device;
use common::*;
use dms_integration::engine::from_config::resolve_policy_table;
use dms_integration::engine::{load_model, Engine, GenParams};
use dms_integration::model::WeightForm;
use dms_policy::Registry;

#[test]
fn long_generation_memory_matches_kept_positions() {
    let dir = fixture("qwen3_dms_tiny/variant_separate_alpha/model");
    let mut loaded = load_model(&dir, &Device::Cpu, WeightForm::Dense).unwrap();
    let table = resolve_policy_table(&toml::from_str("name = 'dms'").unwrap(), &mut loaded.model, None).unwrap();
    let log: Log = Arc::default();
    let policy = Arc::new(Recording { inner: Registry::with_builtins().build(&table).unwrap(), log: log.clone() });
    let bs = 4;
    let mut eng = Engine::new(loaded.model, policy, bs, 1 << 14).unwrap();
    let params = GenParams { temperature: 0.8, top_p: 0.95, seed: 7, ..GenParams::greedy(300, 0) };
    let prompt: Vec<u32> = (0..48).map(|i| (i * 37 % 500) as u32 + 3).collect();
    let g = eng.generate(&prompt, &params, None).unwrap();
    assert_eq!(g.tokens.len(), 300);
    let n = 48 + 299; // the last sampled token is never fed
    let w = 8usize;
    let mut decisions = vec![vec![vec![false; n]; 2]; 2];
    for &(l, h, p, raw) in log.lock().unwrap().iter() {
        decisions[l][h][p as usize] = raw * 100.0 - 5.0 > 0.0;
    }
    let (mut live, mut alloc, mut frac) = (0u64, 0u64, 0f64);
    let slot = 2 * 16 * 4;
    for row in decisions.iter().flatten() {
        // Rule 8 list oracle.
        let mut list: Vec<bool> = Vec::new();
        for &d in row {
            if let Some(x) = list.last_mut() {
                *x = d;
            }
            list.push(false);
            if list.len() > w + 1 && list[list.len() - w - 2] {
                list.remove(list.len() - w - 2);
            }
        }
        live += list.len() as u64 * slot;
        alloc += (list.len().div_ceil(bs) * bs) as u64 * slot;
        frac += list.len() as f64 / n as f64;
    }
    assert_eq!(g.usage.bytes_live, live);
    assert_eq!(g.usage.bytes_allocated, alloc);
    assert_eq!(g.usage.bytes_full, 4 * n as u64 * slot);
    assert!((g.compression_ratio - 4.0 / frac).abs() < 1e-9);
    assert!(g.compression_ratio > 1.5, "the tiny DMS model evicts ~40% of tokens (CR {})", g.compression_ratio);
    // Every block went back to the pool when the sequence ended.
    assert_eq!(eng.store.free_block_count(), eng.store.capacity_blocks());
}
