//! The one-pass masked prefill (the GPU runtime's prompt path, `prefill.rs`), run on the CPU
//! against independent oracles: NVIDIA's DMS reference fixture (prefill logits and the kept set
//! after the prompt, both decision variants), and the paged CPU engine with the `dms` policy
//! (random decisions, with and without sinks: logits at every position and kept sets, for
//! per-head and latent rows; learned decisions from a named adapter with a LoRA).

mod common;

use candle_core::{Device, Tensor};
use common::*;
use dms_integration::engine::{load_model, Engine};
use dms_integration::gpu::policy::DevicePolicy;
use dms_integration::model::lora::{AttentionLora, LoraTarget};
use dms_integration::model::prefill::masked_prefill;
use dms_integration::model::{Llama, WeightForm, Weights};
use dms_policy::device::kept_after_prompt;
use dms_policy::{FlagSource, Pos, Registry};

/// Runs the masked prefill of `program` with decisions from `adapter`; returns all logits and
/// per layer the kept positions per row.
fn masked_with(
    model: &Llama,
    prompt: &[u32],
    program: DevicePolicy,
    adapter: Option<&str>,
) -> (Vec<Vec<f32>>, Vec<Vec<Vec<Pos>>>) {
    let mut kept = Vec::new();
    let logits = masked_prefill(model, prompt, &program, adapter, true, |_, k, _, f| {
        let rows = k.dim(1)?;
        let host = f.flatten_all()?.to_vec1::<f32>()?;
        kept.push(
            (0..rows).map(|h| kept_after_prompt(prompt.len(), program.window, |p| host[p * rows + h] != 0.0)).collect(),
        );
        Ok(())
    })
    .unwrap();
    (logits.to_vec2::<f32>().unwrap(), kept)
}

/// [`masked_with`] on the model in `dir`, decisions from its own weights.
fn masked(dir: &std::path::Path, prompt: &[u32], program: DevicePolicy) -> (Vec<Vec<f32>>, Vec<Vec<Vec<Pos>>>) {
    let model = load_model(dir, &Device::Cpu, WeightForm::Dense).unwrap().model;
    masked_with(&model, prompt, program, None)
}

#[test]
fn nvidia_fixture_prefill_logits_and_kept_sets() {
    for variant in ["variant_query_neuron", "variant_separate_alpha"] {
        let g = golden(&fixture(&format!("qwen3_dms_tiny/{variant}/golden.safetensors")));
        let prompt = ids(&g["prompt_ids"]);
        let want = g["prefill_logits"].to_vec2::<f32>().unwrap();
        let dir = fixture(&format!("qwen3_dms_tiny/{variant}/model"));
        let cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
        let window = cfg["dms_window_size"].as_u64().unwrap() as usize;
        let flags = FlagSource::Learned { scale: 100.0, offset: 5.0 };
        let (logits, kept) = masked(&dir, &prompt, DevicePolicy { window, flags, sinks: 0 });
        assert_eq!(logits.len(), prompt.len());
        for (t, (got, want)) in logits.iter().zip(&want).enumerate() {
            let e = max_abs(got, want);
            assert!(e < 1e-4, "{variant}: position {t}: {e}");
        }
        let want_kept = presence(&g, 0);
        assert_eq!(kept, want_kept, "{variant}: kept positions after the prompt");
        assert!(
            want_kept.iter().flatten().any(|row| row.len() < prompt.len()),
            "{variant}: the fixture evicts inside the prompt, so the mask is exercised"
        );
    }
}

/// The paged CPU engine with the `dms` policy's random decisions (and `sinks` attention sinks)
/// is the oracle; the masked prefill runs the policy's own device program.
fn against_engine(dir: &std::path::Path, prompt: &[u32], window: usize, rate: f64, sinks: u32) {
    let seed = 11;
    let toml = format!(
        "name = 'dms'\nwindow = {window}\ndecision = 'random'\nevict_rate = {rate}\nseed = {seed}\nsinks = {sinks}"
    );
    let program = against_engine_policy(dir, prompt, &toml);
    assert_eq!(program, DevicePolicy { window, flags: FlagSource::Random { seed, rate }, sinks });
}

/// The paged CPU engine under the policy of `toml` is the oracle of the masked prefill running
/// that policy's device program (returned).
fn against_engine_policy(dir: &std::path::Path, prompt: &[u32], toml: &str) -> DevicePolicy {
    let mut eng = engine(dir, toml, 4);
    let mut seq = eng.new_sequence();
    let want = eng.step(&mut seq, prompt, true).unwrap().to_vec2::<f32>().unwrap();
    let layers = eng.model.config().num_layers;
    let want_kept: Vec<Vec<Vec<Pos>>> = (0..layers).map(|l| seq.kept_positions(l, &eng.store)).collect();
    let program = DevicePolicy::of(eng.policy.as_ref()).unwrap();
    let (logits, kept) = masked(dir, prompt, program);
    for (t, (got, want)) in logits.iter().zip(&want).enumerate() {
        let e = max_abs(got, want);
        assert!(e < 1e-4, "{}: position {t}: {e}", dir.display());
    }
    assert_eq!(kept, want_kept, "{}: kept positions", dir.display());
    let evicted = kept.iter().flatten().filter(|r| r.len() < prompt.len()).count();
    assert!(evicted > 0, "{}: some row evicts", dir.display());
    program
}

/// Key-norm decisions (the learned rule on each key's norm after RoPE), with and without sinks,
/// per-head and latent rows: the masked prefill reads the model's key norms as the raw signal.
#[test]
fn key_norm_decisions_equal_the_paged_engine() {
    // Offsets near each fixture's median key norm, so that about half the keys are flagged.
    for (fixture_name, offset) in [("llama3_tiny", 1.57), ("deepseek_mla_tiny", 5.76)] {
        let dir = fixture(fixture_name);
        for sinks in [0, 3] {
            let toml = format!(
                "name = 'dms'\nwindow = 4\ndecision = 'key_norm'\nalpha_scale = 1.0\nalpha_offset = {offset}\nsinks = {sinks}"
            );
            let program = against_engine_policy(&dir, &prompt(40, 200), &toml);
            assert_eq!(program.flags, FlagSource::KeyNorm { scale: 1.0, offset });
        }
    }
}

/// `sliding_window` (with and without sinks) through its device program, the delayed window of
/// `window - 1` with every token flagged, per-head and latent rows.
#[test]
fn sliding_windows_equal_the_paged_engine() {
    for fixture_name in ["llama3_tiny", "deepseek_mla_tiny"] {
        let dir = fixture(fixture_name);
        for (n, window, sinks) in [(40, 8, 0), (40, 8, 4), (33, 1, 2)] {
            let toml = format!("name = 'sliding_window'\nwindow = {window}\nsinks = {sinks}");
            let program = against_engine_policy(&dir, &prompt(n, 200), &toml);
            assert_eq!(program, DevicePolicy { window: window - 1, flags: FlagSource::All, sinks });
        }
    }
}

fn prompt(n: usize, vocab: u32) -> Vec<u32> {
    (0..n as u32).map(|i| (i * 37 + 11) % vocab).collect()
}

#[test]
fn random_flags_equal_the_paged_engine_per_head_rows() {
    let dir = fixture("llama3_tiny");
    for (n, window, rate, sinks) in
        [(40, 4, 0.6, 0), (33, 0, 0.5, 0), (25, 8, 1.0, 0), (40, 4, 0.9, 6), (40, 2, 1.0, 30)]
    {
        against_engine(&dir, &prompt(n, 200), window, rate, sinks);
    }
}

#[test]
fn random_flags_equal_the_paged_engine_latent_rows() {
    let dir = fixture("deepseek_mla_tiny");
    for (n, window, rate, sinks) in [(40, 4, 0.6, 0), (30, 2, 0.9, 5)] {
        against_engine(&dir, &prompt(n, 200), window, rate, sinks);
    }
}

/// Learned decisions with sinks from a named adapter that carries a LoRA: the masked prefill
/// reading adapter `b` equals the paged engine whose policy names `b`, and differs from the same
/// pass reading the model's own decision weights (so the adapter is what it read).
#[test]
fn a_named_adapter_with_a_lora_equals_the_paged_engine() {
    let dir = fixture("qwen3_dms_tiny/variant_separate_alpha/model");
    let mut loaded = load_model(&dir, &Device::Cpu, WeightForm::Dense).unwrap();
    let w = Weights::open_safetensors_dir(&dir).unwrap();
    loaded.model.attach_adapter("b", &w, false, false).unwrap();
    let cfg = loaded.model.config().clone();
    let layers = (0..cfg.num_layers)
        .map(|_| {
            LoraTarget::ALL.map(|t| {
                let (out, inp) = t.dims(&cfg);
                let a = Tensor::randn(0f32, 0.3, (4, inp), &Device::Cpu).unwrap();
                (a, Tensor::randn(0f32, 0.3, (out, 4), &Device::Cpu).unwrap())
            })
        })
        .collect();
    loaded.model.attach_lora("b", AttentionLora::new(layers, 1.0)).unwrap();
    let table: toml::Table = toml::from_str("name = 'dms'\nwindow = 8\nadapter = 'b'\nsinks = 4").unwrap();
    let policy = Registry::with_builtins().build(&table).unwrap();
    let mut eng = Engine::new(loaded.model, policy, 4, 1 << 16).unwrap();
    let p = prompt(40, 100);
    let mut seq = eng.new_sequence();
    let want = eng.step(&mut seq, &p, true).unwrap().to_vec2::<f32>().unwrap();
    let want_kept: Vec<Vec<Vec<Pos>>> = (0..cfg.num_layers).map(|l| seq.kept_positions(l, &eng.store)).collect();
    let program = DevicePolicy::of(eng.policy.as_ref()).unwrap();
    assert_eq!(program.sinks, 4);
    let (logits, kept) = masked_with(&eng.model, &p, program, Some("b"));
    for (t, (got, want)) in logits.iter().zip(&want).enumerate() {
        let e = max_abs(got, want);
        assert!(e < 1e-4, "position {t}: {e}");
    }
    assert_eq!(kept, want_kept, "kept positions");
    assert!(kept.iter().flatten().any(|r| r.len() < p.len()), "some row evicts");
    assert!(kept.iter().flatten().all(|r| r.starts_with(&[0, 1, 2, 3])), "the sinks stay");
    let (own, _) = masked_with(&eng.model, &p, program, None);
    assert!(max_abs(&own[p.len() - 1], &want[p.len() - 1]) > 1e-3, "the LoRA changes the logits");
}

#[test]
fn no_flags_equal_the_full_cache() {
    let dir = fixture("qwen3_tiny");
    let p = prompt(30, 200);
    let mut eng = engine(&dir, "name = 'full'", 4);
    let mut seq = eng.new_sequence();
    let want = eng.step(&mut seq, &p, true).unwrap().to_vec2::<f32>().unwrap();
    let (logits, kept) = masked(&dir, &p, DevicePolicy { window: 3, flags: FlagSource::None, sinks: 0 });
    for (got, want) in logits.iter().zip(&want) {
        assert!(max_abs(got, want) < 1e-4);
    }
    assert!(kept.iter().flatten().all(|r| r.len() == p.len()));
}

#[test]
fn bad_prompts_are_errors() {
    let model = load_model(&fixture("llama3_tiny"), &Device::Cpu, WeightForm::Dense).unwrap().model;
    let none = |_: usize, _: &Tensor, _: &Tensor, _: &Tensor| Ok(());
    let keep = DevicePolicy { window: 4, flags: FlagSource::None, sinks: 0 };
    let e = masked_prefill(&model, &[], &keep, None, false, none).unwrap_err();
    assert!(e.to_string().contains("empty"), "{e}");
    let e = masked_prefill(&model, &[1, 100_000], &keep, None, false, none).unwrap_err();
    assert!(e.to_string().contains("100000"), "{e}");
    let learned = DevicePolicy { flags: FlagSource::Learned { scale: 100.0, offset: 5.0 }, ..keep };
    let e = masked_prefill(&model, &[1, 2], &learned, None, false, none).unwrap_err();
    assert!(e.to_string().contains("decision source"), "{e}");
}
