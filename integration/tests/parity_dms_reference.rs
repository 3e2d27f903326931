//! DMS against NVIDIA's reference implementation (fixture `qwen3_dms_tiny`, produced by
//! Model-Optimizer `experimental/dms` on CPU): decisions, kept positions after prefill and after
//! every decode step, and logits, for both decision variants; `dms_disable_eviction` (rule 1.6);
//! chunked prefill equal to one pass (rule 4.3).
//!
//! Tolerances: logits 1e-4 (f32 on both sides; their dense re-check matched to 1e-6). Decision
//! logits 1e-3 (raw signal x 100). Decisions and kept sets must match exactly.

mod common;
use std::sync::Arc;

use candle_core::Device;
use common::*;
use dms_integration::engine::from_config::resolve_policy_table;
use dms_integration::engine::{load_model, Engine};
use dms_integration::model::WeightForm;
use dms_policy::{Pos, Registry};

pub fn dms_engine(variant: &str, extra: &str) -> (Engine, Log) {
    let dir = fixture(&format!("qwen3_dms_tiny/{variant}/model"));
    let mut loaded = load_model(&dir, &Device::Cpu, WeightForm::Dense).unwrap();
    let table: toml::Table = toml::from_str(&format!("name = 'dms'\n{extra}")).unwrap();
    let table = resolve_policy_table(&table, &mut loaded.model, None).unwrap();
    let inner = Registry::with_builtins().build(&table).unwrap();
    let log: Log = Arc::default();
    let policy = Arc::new(Recording { inner, log: log.clone() });
    (Engine::new(loaded.model, policy, 4, 1 << 12).unwrap(), log)
}

fn check_variant(variant: &str) {
    let g = golden(&fixture(&format!("qwen3_dms_tiny/{variant}/golden.safetensors")));
    let prompt = ids(&g["prompt_ids"]);
    let generated = ids(&g["generated_ids"]);
    let prefill_want = g["prefill_logits"].to_vec2::<f32>().unwrap();
    let decode_want = g["decode_step_logits"].to_vec2::<f32>().unwrap();
    let (mut eng, log) = dms_engine(variant, "");
    let mut seq = eng.new_sequence();
    let all = eng.step(&mut seq, &prompt, true).unwrap().to_vec2::<f32>().unwrap();
    for t in 0..48 {
        let e = max_abs(&all[t], &prefill_want[t]);
        assert!(e < 1e-4, "{variant}: prefill position {t}: {e}");
    }
    let kept = |seq: &dms_integration::kv::sequence::SequenceCache, eng: &Engine| -> Vec<Vec<Vec<Pos>>> {
        (0..2).map(|l| seq.kept_positions(l, &eng.store)).collect()
    };
    assert_eq!(kept(&seq, &eng), presence(&g, 0), "{variant}: cache after prefill");
    for s in 1..=24 {
        let l = eng.step(&mut seq, &[generated[s - 1]], false).unwrap().squeeze(0).unwrap().to_vec1::<f32>().unwrap();
        let e = max_abs(&l, &decode_want[s - 1]);
        assert!(e < 1e-4, "{variant}: decode step {s}: {e}");
        assert_eq!(dms_integration::engine::argmax(&l), generated[s], "{variant}: greedy token {s}");
        assert_eq!(kept(&seq, &eng), presence(&g, s), "{variant}: cache after decode step {s}");
    }
    let want_logits: Vec<Vec<Vec<f32>>> = g["decision_logits"].to_vec3().unwrap();
    let want_dec: Vec<Vec<Vec<i64>>> = g["decisions"].to_dtype(candle_core::DType::I64).unwrap().to_vec3().unwrap();
    let log = log.lock().unwrap();
    assert_eq!(log.len(), 2 * 2 * 72, "one score per (layer, head, token)");
    for &(l, h, p, raw) in log.iter() {
        let logit = raw * 100.0 - 5.0;
        let want = want_logits[l][h][p as usize];
        assert!((logit - want).abs() < 1e-3, "{variant}: decision logit L{l} H{h} t{p}: {logit} vs {want}");
        assert_eq!((logit > 0.0) as i64, want_dec[l][h][p as usize], "{variant}: decision L{l} H{h} t{p}");
    }
    // The reference's reported compression ratio after the last step.
    let text = std::fs::read_to_string(fixture(&format!("qwen3_dms_tiny/{variant}/golden.json"))).unwrap();
    // Python's json writes Infinity for one diagnostic field; it is not used here.
    let j: serde_json::Value = serde_json::from_str(&text.replace("Infinity", "null")).unwrap();
    let want_cr = j["reported_cr_per_decode_step"].as_array().unwrap().last().unwrap().as_f64().unwrap();
    let cr = seq.compression_ratio(&eng.store);
    assert!((cr - want_cr).abs() < 1e-4, "{variant}: CR {cr} vs reference {want_cr}");
}

#[test]
fn query_neuron_variant_matches_nvidia_reference() {
    check_variant("variant_query_neuron");
}

#[test]
fn adapter_variant_matches_nvidia_reference() {
    check_variant("variant_separate_alpha");
}

fn check_disable_eviction(variant: &str) {
    let g = golden(&fixture(&format!("qwen3_dms_tiny/{variant}/golden.safetensors")));
    let prompt = ids(&g["prompt_ids"]);
    let generated = ids(&g["generated_ids"]);
    let want = g["no_eviction_logits"].to_vec2::<f32>().unwrap();
    let vanilla = g["vanilla_qwen3_logits"].to_vec2::<f32>().unwrap();
    let (mut eng, log) = dms_engine(variant, "disable_eviction = true");
    let mut seq = eng.new_sequence();
    let mut got = eng.step(&mut seq, &prompt, true).unwrap().to_vec2::<f32>().unwrap();
    for &token in &generated[..24] {
        got.push(eng.step(&mut seq, &[token], false).unwrap().squeeze(0).unwrap().to_vec1().unwrap());
    }
    let mut vanilla_diff = 0f32;
    for t in 0..72 {
        let e = max_abs(&got[t], &want[t]);
        assert!(e < 1e-4, "{variant}: no-eviction logits at {t}: {e}");
        vanilla_diff = vanilla_diff.max(max_abs(&got[t], &vanilla[t]));
    }
    if variant == "variant_query_neuron" {
        // Rule 1.6: the decision channel stays zeroed, so this is not the vanilla model.
        assert!(vanilla_diff > 0.1, "query-neuron no-eviction must differ from vanilla ({vanilla_diff})");
    } else {
        assert!(vanilla_diff < 1e-4, "adapter no-eviction must equal vanilla ({vanilla_diff})");
    }
    assert!(log.lock().unwrap().is_empty(), "no scores are computed when eviction is disabled");
    for l in 0..2 {
        for row in seq.kept_positions(l, &eng.store) {
            assert_eq!(row.len(), 72, "nothing is evicted");
        }
    }
}

#[test]
fn disable_eviction_follows_rule_1_6_query_neuron() {
    check_disable_eviction("variant_query_neuron");
}

#[test]
fn disable_eviction_follows_rule_1_6_adapter() {
    check_disable_eviction("variant_separate_alpha");
}

#[test]
fn chunked_prefill_equals_one_pass() {
    for variant in ["variant_query_neuron", "variant_separate_alpha"] {
        let g = golden(&fixture(&format!("qwen3_dms_tiny/{variant}/golden.safetensors")));
        let prompt = ids(&g["prompt_ids"]);
        let want = g["prefill_logits"].to_vec2::<f32>().unwrap();
        for chunk in [1usize, 5, 7, 16] {
            let (mut eng, _) = dms_engine(variant, "");
            let mut seq = eng.new_sequence();
            let mut got = Vec::new();
            for part in prompt.chunks(chunk) {
                got.extend(eng.step(&mut seq, part, true).unwrap().to_vec2::<f32>().unwrap());
            }
            for t in 0..48 {
                let e = max_abs(&got[t], &want[t]);
                assert!(e < 1e-4, "{variant} chunk {chunk}: position {t}: {e}");
            }
            let kept: Vec<Vec<Vec<Pos>>> = (0..2).map(|l| seq.kept_positions(l, &eng.store)).collect();
            assert_eq!(kept, presence(&g, 0), "{variant} chunk {chunk}: cache after prefill");
        }
    }
}

#[test]
fn window_override_changes_what_is_kept() {
    let (mut eng, _) = dms_engine("variant_separate_alpha", "window = 2");
    let g = golden(&fixture("qwen3_dms_tiny/variant_separate_alpha/golden.safetensors"));
    let prompt = ids(&g["prompt_ids"]);
    let mut seq = eng.new_sequence();
    eng.step(&mut seq, &prompt, false).unwrap();
    let d: Vec<Vec<Vec<i64>>> = g["decisions"].to_dtype(candle_core::DType::I64).unwrap().to_vec3().unwrap();
    // Layer 0's adapter reads the embeddings, so its decisions are the reference's whatever the
    // window; later layers see different attention outputs.
    for (h, kept) in seq.kept_positions(0, &eng.store).iter().enumerate() {
        let want: Vec<Pos> =
            (0..48u32).filter(|&k| !(k + 1 < 48 && d[0][h][k as usize + 1] == 1 && k + 2 < 47)).collect();
        assert_eq!(kept, &want, "layer 0 head {h}");
    }
}

#[test]
fn adapter_directory_on_a_plain_model_reproduces_the_reference() {
    // Build an NVIDIA-format adapter directory from the separate-alpha checkpoint and attach it to
    // the plain qwen3_tiny model (same base weights): the outputs must match the reference.
    let src = fixture("qwen3_dms_tiny/variant_separate_alpha/model");
    let dir = std::env::temp_dir().join(format!("dms-adapter-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let all = candle_core::safetensors::load(src.join("model.safetensors"), &Device::Cpu).unwrap();
    let adapter: std::collections::HashMap<String, candle_core::Tensor> =
        all.into_iter().filter(|(k, _)| k.contains("dms_proj_alpha")).collect();
    assert_eq!(adapter.len(), 4);
    candle_core::safetensors::save(&adapter, dir.join("adapter.safetensors")).unwrap();
    std::fs::write(
        dir.join("config.json"),
        r#"{"dms_window_size": 8, "dms_alpha_scale": 100.0,
        "dms_initial_alpha_offset": 5.0, "dms_separate_alpha": true, "dms_alpha_per": "head"}"#,
    )
    .unwrap();

    let mut loaded = load_model(&fixture("qwen3_tiny"), &Device::Cpu, WeightForm::Dense).unwrap();
    let table: toml::Table =
        toml::from_str(&format!("name = 'dms'\nadapter = {:?}", dir.display().to_string())).unwrap();
    let table = resolve_policy_table(&table, &mut loaded.model, None).unwrap();
    assert_eq!(table["window"].as_integer(), Some(8), "window comes from the adapter's config");
    let policy = Registry::with_builtins().build(&table).unwrap();
    let mut eng = Engine::new(loaded.model, policy, 4, 1 << 12).unwrap();
    let g = golden(&fixture("qwen3_dms_tiny/variant_separate_alpha/golden.safetensors"));
    let prompt = ids(&g["prompt_ids"]);
    let want = g["prefill_logits"].to_vec2::<f32>().unwrap();
    let mut seq = eng.new_sequence();
    let got = eng.step(&mut seq, &prompt, true).unwrap().to_vec2::<f32>().unwrap();
    for t in 0..48 {
        assert!(max_abs(&got[t], &want[t]) < 1e-4, "position {t}");
    }
    let kept: Vec<Vec<Vec<Pos>>> = (0..2).map(|l| seq.kept_positions(l, &eng.store)).collect();
    assert_eq!(kept, presence(&g, 0));
}

#[test]
fn dms_on_a_model_without_decisions_is_a_clear_error() {
    let loaded = load_model(&fixture("qwen3_tiny"), &Device::Cpu, WeightForm::Dense).unwrap();
    let policy = Registry::with_builtins().build(&toml::from_str("name = 'dms'\nwindow = 4").unwrap()).unwrap();
    let err = Engine::new(loaded.model, policy, 4, 64).err().expect("must fail").to_string();
    assert!(err.contains("no dms_* fields") && err.contains("key_norm"), "{err}");
}
