//! Cost of the policy hooks (decide + evict + compact) for one decode step over many rows.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use dms_policy::{CacheShape, CompactPlan, EvictPlan, Registry, RowRef};

const LAYERS: usize = 30;
const PROMPT: usize = 1024;

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("policy_decode_step_30_layers");
    for table in ["name = 'full'", "name = 'sliding_window'\nwindow = 256\nsinks = 4"] {
        let table: toml::Table = toml::from_str(table).unwrap();
        let factory = Registry::with_builtins().build(&table).unwrap();
        for rows in [1usize, 32, 256] {
            let shape = CacheShape { n_layers: LAYERS, rows_per_layer: rows };
            let mut seq = factory.new_sequence(shape);
            let (mut ep, mut cp) = (EvictPlan::default(), CompactPlan::default());
            for layer in 0..LAYERS {
                for head in 0..rows {
                    let r = RowRef { layer, head };
                    seq.evict(r, 0, PROMPT, &mut ep).unwrap();
                    seq.compact(r, &mut cp).unwrap();
                }
            }
            let mut pos = PROMPT as u32;
            group.bench_function(BenchmarkId::new(factory.name().to_string(), rows), |b| {
                b.iter(|| {
                    for layer in 0..LAYERS {
                        for head in 0..rows {
                            let r = RowRef { layer, head };
                            seq.decide(r, pos, 1, None).unwrap();
                            seq.evict(r, pos, 1, &mut ep).unwrap();
                            seq.compact(r, &mut cp).unwrap();
                        }
                    }
                    pos += 1;
                })
            });
        }
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
