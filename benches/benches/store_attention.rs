//! Decode attention over rows of the paged store (1K-32K live slots) and the store operations
//! of a decode step.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use dms_integration::kv::attention::{decode_row, Scoring};
use dms_integration::kv::store::KvStore;
use dms_policy::{CacheShape, CompactPlan, EvictPlan, Registry, RowRef};

const D: usize = 64;
const GQA: usize = 3;

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("decode_attention_row");
    let factory = Registry::with_builtins().build(&toml::from_str("name = 'full'").unwrap()).unwrap();
    for live in [1024usize, 4096, 16384, 32768] {
        let mut store = KvStore::new(D, 16, live.div_ceil(16) + 1);
        let id = store.add_row(0);
        let mut seq = factory.new_sequence(CacheShape { n_layers: 1, rows_per_layer: 1 });
        let (mut ep, mut cp) = (EvictPlan::default(), CompactPlan::default());
        let r = RowRef { layer: 0, head: 0 };
        seq.evict(r, 0, live, &mut ep).unwrap();
        let k: Vec<f32> = (0..live * D).map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5).collect();
        store.apply_evict(id, &ep, 0, &k, &k).unwrap();
        seq.compact(r, &mut cp).unwrap();
        store.apply_compact(id, &cp).unwrap();
        let q: Vec<f32> = (0..GQA * D).map(|i| (i as f32 * 0.01).sin()).collect();
        let mut out = vec![0f32; GQA * D];
        group.throughput(Throughput::Bytes((live * D * 2 * 4) as u64));
        group.bench_function(BenchmarkId::from_parameter(live), |b| {
            b.iter(|| decode_row(&store, id, &q, live as u32, Scoring::scaled(0.125), &mut out))
        });
    }
    group.finish();
}

/// Store operations per decode step: a DMS-style row at 4K tokens where every step releases the
/// token leaving the window and writes the new one in its slot (evict plan + write + compact).
fn store_ops(c: &mut Criterion) {
    let mut group = c.benchmark_group("store_ops_per_decode_step");
    // Bounded rows only (criterion runs an unknown number of steps): a window, and DMS with every
    // token flagged (each step reuses the slot of the token leaving its delay window).
    let arms = [
        ("window_256", "name = 'sliding_window'\nwindow = 256"),
        ("dms_all_flagged_w256", "name = 'dms'\nwindow = 256\ndecision = 'random'\nevict_rate = 1.0"),
    ];
    for (name, table) in arms {
        let factory = Registry::with_builtins().build(&toml::from_str(table).unwrap()).unwrap();
        let rows = 90;
        let mut store = KvStore::new(D, 16, rows * (8192 / 16 + 2));
        let mut seq = factory.new_sequence(CacheShape { n_layers: 1, rows_per_layer: rows });
        let ids: Vec<_> = (0..rows).map(|_| store.add_row(0)).collect();
        let (mut ep, mut cp) = (EvictPlan::default(), CompactPlan::default());
        let prompt = 4096usize;
        let kv: Vec<f32> = (0..prompt * D).map(|i| (i % 97) as f32 * 0.01).collect();
        for (h, &id) in ids.iter().enumerate() {
            let r = RowRef { layer: 0, head: h };
            seq.decide(r, 0, prompt, None).unwrap();
            seq.evict(r, 0, prompt, &mut ep).unwrap();
            store.apply_evict(id, &ep, 0, &kv, &kv).unwrap();
            seq.compact(r, &mut cp).unwrap();
            store.apply_compact(id, &cp).unwrap();
        }
        let one = vec![0.5f32; D];
        let mut pos = prompt as u32;
        group.bench_function(BenchmarkId::new(name, "90_rows_ctx4096"), |b| {
            b.iter(|| {
                for (h, &id) in ids.iter().enumerate() {
                    let r = RowRef { layer: 0, head: h };
                    seq.decide(r, pos, 1, None).unwrap();
                    seq.evict(r, pos, 1, &mut ep).unwrap();
                    store.apply_evict(id, &ep, pos, &one, &one).unwrap();
                    seq.compact(r, &mut cp).unwrap();
                    store.apply_compact(id, &cp).unwrap();
                }
                pos += 1;
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench, store_ops);
criterion_main!(benches);
