//! Decode attention over rows of the paged store, 1K-32K live slots.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use dms_integration::attention::decode_row;
use dms_integration::kv_store::KvStore;
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
            b.iter(|| decode_row(&store, id, &q, live as u32, 0.125, &mut out))
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
