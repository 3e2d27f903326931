//! The one-pass masked prefill (the GPU runtime's prompt path, `prefill.rs`), run on the CPU
//! against independent oracles: NVIDIA's DMS reference fixture (prefill logits and the kept set
//! after the prompt, both decision variants), and the paged CPU engine with the `dms` policy
//! (random decisions: logits at every position and kept sets, for per-head and latent rows).

mod common;

use candle_core::{Device, Tensor};
use common::*;
use dms_integration::engine::load_model;
use dms_integration::model::prefill::masked_prefill;
use dms_integration::model::WeightForm;
use dms_policy::device::kept_after_prompt;
use dms_policy::FlagSource;
use dms_policy::Pos;

/// Runs the masked prefill; returns all logits and per layer the kept positions per row.
fn masked(
    dir: &std::path::Path,
    prompt: &[u32],
    flags: FlagSource,
    window: usize,
) -> (Vec<Vec<f32>>, Vec<Vec<Vec<Pos>>>) {
    let model = load_model(dir, &Device::Cpu, WeightForm::Dense).unwrap().model;
    let mut kept = Vec::new();
    let logits = masked_prefill(&model, prompt, &flags, window, true, |_, k, _, f| {
        let rows = k.dim(1)?;
        let host = f.flatten_all()?.to_vec1::<f32>()?;
        kept.push((0..rows).map(|h| kept_after_prompt(prompt.len(), window, |p| host[p * rows + h] != 0.0)).collect());
        Ok(())
    })
    .unwrap();
    (logits.to_vec2::<f32>().unwrap(), kept)
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
        let (logits, kept) = masked(&dir, &prompt, FlagSource::Learned { scale: 100.0, offset: 5.0 }, window);
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

/// The paged CPU engine with the `dms` policy's random decisions is the oracle.
fn against_engine(dir: &std::path::Path, prompt: &[u32], window: usize, rate: f64) {
    let seed = 11;
    let toml = format!("name = 'dms'\nwindow = {window}\ndecision = 'random'\nevict_rate = {rate}\nseed = {seed}");
    let mut eng = engine(dir, &toml, 4);
    let mut seq = eng.new_sequence();
    let want = eng.step(&mut seq, prompt, true).unwrap().to_vec2::<f32>().unwrap();
    let layers = eng.model.config().num_layers;
    let want_kept: Vec<Vec<Vec<Pos>>> = (0..layers).map(|l| seq.kept_positions(l, &eng.store)).collect();
    let (logits, kept) = masked(dir, prompt, FlagSource::Random { seed, rate }, window);
    for (t, (got, want)) in logits.iter().zip(&want).enumerate() {
        let e = max_abs(got, want);
        assert!(e < 1e-4, "{}: position {t}: {e}", dir.display());
    }
    assert_eq!(kept, want_kept, "{}: kept positions", dir.display());
    let evicted = kept.iter().flatten().filter(|r| r.len() < prompt.len()).count();
    assert!(evicted > 0, "{}: some row evicts", dir.display());
}

fn prompt(n: usize, vocab: u32) -> Vec<u32> {
    (0..n as u32).map(|i| (i * 37 + 11) % vocab).collect()
}

#[test]
fn random_flags_equal_the_paged_engine_per_head_rows() {
    let dir = fixture("llama3_tiny");
    for (n, window, rate) in [(40, 4, 0.6), (33, 0, 0.5), (25, 8, 1.0)] {
        against_engine(&dir, &prompt(n, 200), window, rate);
    }
}

#[test]
fn random_flags_equal_the_paged_engine_latent_rows() {
    let dir = fixture("deepseek_mla_tiny");
    for (n, window, rate) in [(40, 4, 0.6), (30, 2, 0.9)] {
        against_engine(&dir, &prompt(n, 200), window, rate);
    }
}

#[test]
fn no_flags_equal_the_full_cache() {
    let dir = fixture("qwen3_tiny");
    let p = prompt(30, 200);
    let mut eng = engine(&dir, "name = 'full'", 4);
    let mut seq = eng.new_sequence();
    let want = eng.step(&mut seq, &p, true).unwrap().to_vec2::<f32>().unwrap();
    let (logits, kept) = masked(&dir, &p, FlagSource::None, 3);
    for (got, want) in logits.iter().zip(&want) {
        assert!(max_abs(got, want) < 1e-4);
    }
    assert!(kept.iter().flatten().all(|r| r.len() == p.len()));
}

#[test]
fn bad_prompts_are_errors() {
    let model = load_model(&fixture("llama3_tiny"), &Device::Cpu, WeightForm::Dense).unwrap().model;
    let none = |_: usize, _: &Tensor, _: &Tensor, _: &Tensor| Ok(());
    let e = masked_prefill(&model, &[], &FlagSource::None, 4, false, none).unwrap_err();
    assert!(e.to_string().contains("empty"), "{e}");
    let e = masked_prefill(&model, &[1, 100_000], &FlagSource::None, 4, false, none).unwrap_err();
    assert!(e.to_string().contains("100000"), "{e}");
    let e = masked_prefill(&model, &[1, 2], &FlagSource::Learned { scale: 100.0, offset: 5.0 }, 4, false, none)
        .unwrap_err();
    assert!(e.to_string().contains("decision source"), "{e}");
}
