//! Cost of the policy hooks (decide + evict + compact) for one decode step: 30 layers x 1, 3
//! (SmolLM2, batch 1), 32 and 256 rows per layer, after a 1024-token prompt.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use dms_policy::{CacheShape, CompactPlan, EvictPlan, Registry, RowRef};

const LAYERS: usize = 30;
const PROMPT: usize = 1024;

/// A deterministic score that flags about 3 tokens in 4 (DMS at roughly 4x compression).
fn score(layer: usize, head: usize, pos: usize) -> f32 {
    if (layer * 31 + head * 17 + pos * 13).is_multiple_of(4) {
        -1.0
    } else {
        1.0
    }
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("policy_decode_step_30_layers");
    let tables = [
        "name = 'full'",
        "name = 'sliding_window'\nwindow = 256\nsinks = 4",
        "name = 'dms'\nwindow = 256\nalpha_scale = 1.0\nalpha_offset = 0.0",
    ];
    for table in tables {
        let table: toml::Table = toml::from_str(table).unwrap();
        let factory = Registry::with_builtins().build(&table).unwrap();
        for rows in [1usize, 3, 32, 256] {
            let shape = CacheShape { n_layers: LAYERS, rows_per_layer: rows };
            let mut seq = factory.new_sequence(shape);
            let (mut ep, mut cp) = (EvictPlan::default(), CompactPlan::default());
            for layer in 0..LAYERS {
                for head in 0..rows {
                    let r = RowRef { layer, head };
                    let scores: Vec<f32> = (0..PROMPT).map(|i| score(layer, head, i)).collect();
                    seq.decide(r, 0, PROMPT, Some(&scores)).unwrap();
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
                            seq.decide(r, pos, 1, Some(&[score(layer, head, pos as usize)])).unwrap();
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
