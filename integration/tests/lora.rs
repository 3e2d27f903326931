//! A LoRA carried by a DMS adapter: the engine runs a sequence whose policy reads the adapter as
//! the model with merged weights (W + alpha/rank * B A, the oracle) and every other sequence of
//! the same batch as the model as loaded; the training student runs the same LoRA; a step trains
//! it; a warm start restores it; bad LoRA files and latent attention are refused by name.

mod common;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use common::*;
use dms_integration::engine::load_model;
use dms_integration::engine::scheduler::{run_batch, Finished, Request};
use dms_integration::model::llama::train::StudentOpts;
use dms_integration::model::lora::{tensor_name, LoraTarget};
use dms_integration::model::WeightForm;
use dms_integration::retrofit::{RetrofitSection, Trainer};

const RANK: usize = 4;
const ALPHA: f64 = 8.0;

fn section(lora: bool) -> RetrofitSection {
    let lora = if lora { format!("\n[lora]\nrank = {RANK}\nalpha = {ALPHA}\nlr = 0.01") } else { String::new() };
    toml::from_str::<toml::Table>(&format!(
        "window = 4\ntarget_cr = 2.0\nsteps = 1\nramp_steps = 1\nseq_len = 32\nlr = 0.01\noutput = 'unused'{lora}"
    ))
    .unwrap()
    .try_into()
    .unwrap()
}

fn tokens(n: usize, seed: usize) -> Vec<u32> {
    (0..n).map(|i| ((i * 7919 + seed * 104729) % 509) as u32 + 2).collect()
}

fn trainer(lora: bool) -> Trainer {
    let model = load_model(&fixture("qwen3_tiny"), &Device::Cpu, WeightForm::Dense).unwrap().model;
    Trainer::new(model, section(lora), tokens(4000, 1)).unwrap()
}

fn temp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("dms-lora-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A trainer whose LoRA factors are fixed non-zero values (B too), saved as an adapter in `dir`.
fn lora_adapter(dir: &Path) -> Trainer {
    let t = trainer(true);
    for (i, v) in t.adapter.lora.as_ref().unwrap().vars().enumerate() {
        let dims = v.as_tensor().dims().to_vec();
        let n: usize = dims.iter().product();
        let x: Vec<f32> = (0..n).map(|j| (((j * 31 + i * 7) % 23) as f32 / 23.0 - 0.5) * 0.4).collect();
        v.set(&Tensor::from_vec(x, dims, &Device::Cpu).unwrap()).unwrap();
    }
    t.save_adapter(dir).unwrap();
    t
}

/// The fixture model with each adapted projection's weight replaced by W + alpha/rank * B A,
/// written to `dir`.
fn merged_model(adapter: &Path, dir: &Path) {
    let base = fixture("qwen3_tiny");
    for f in std::fs::read_dir(&base).unwrap() {
        let f = f.unwrap().path();
        if f.extension().is_some_and(|e| e == "json") {
            std::fs::copy(&f, dir.join(f.file_name().unwrap())).unwrap();
        }
    }
    let mut w = candle_core::safetensors::load(base.join("model.safetensors"), &Device::Cpu).unwrap();
    let lora = candle_core::safetensors::load(adapter.join("adapter.safetensors"), &Device::Cpu).unwrap();
    for layer in 0..2 {
        for target in LoraTarget::ALL {
            let name = format!("model.layers.{layer}.self_attn.{}.weight", target.proj_name());
            let a = &lora[&tensor_name(layer, target, "A")];
            let b = &lora[&tensor_name(layer, target, "B")];
            let old = w[&name].to_dtype(DType::F32).unwrap();
            let merged = (old + (b.matmul(a).unwrap() * (ALPHA / RANK as f64)).unwrap()).unwrap();
            w.insert(name, merged);
        }
    }
    candle_core::safetensors::save(&w, dir.join("model.safetensors")).unwrap();
}

fn request(id: usize, policy: std::sync::Arc<dyn dms_policy::PolicyFactory>) -> Request {
    let prompt: Vec<u32> = (0..23).map(|i| ((i * 13 + id * 101) % 500) as u32 + 3).collect();
    let forced: Vec<u32> = (0..6).map(|i| ((i * 17 + id * 29) % 500) as u32 + 3).collect();
    Request { id, prompt, forced: Some(forced), policy, params: None }
}

fn alone(eng: &mut dms_integration::engine::Engine, r: &Request) -> Finished {
    let (mut f, _) = run_batch(eng, vec![r.clone()], &greedy_params(6), 1, true, |_| {}).unwrap();
    f.pop().unwrap()
}

fn max_diff(a: &Finished, b: &Finished) -> f32 {
    a.step_logits.iter().zip(&b.step_logits).map(|(x, y)| max_abs(x, y)).fold(0.0, f32::max)
}

#[test]
fn a_lora_adapter_runs_as_its_merged_weights_for_its_own_sequences_only() {
    let (adapter, merged) = (temp("adapter"), temp("merged"));
    lora_adapter(&adapter);
    merged_model(&adapter, &merged);
    // A delay longer than any sequence here: DMS evicts nothing, so only the LoRA acts.
    let dms = format!("name = 'dms'\nadapter = {:?}\nwindow = 1000", adapter.display().to_string());

    let mut eng = common::engine(&fixture("qwen3_tiny"), "name = 'full'", 4);
    let with_lora = resolved_policy(&mut eng, &dms);
    let full = resolved_policy(&mut eng, "name = 'full'");
    let reqs = vec![request(0, with_lora.clone()), request(1, full.clone()), request(2, with_lora)];
    let (got, stats) = run_batch(&mut eng, reqs.clone(), &greedy_params(6), 8, true, |_| {}).unwrap();
    assert_eq!(stats.max_running, 3, "all three decode together");

    let mut merged_eng = common::engine(&merged, "name = 'full'", 4);
    let mut base_eng = common::engine(&fixture("qwen3_tiny"), "name = 'full'", 4);
    for (g, r) in got.iter().zip(&reqs) {
        let as_full = Request { policy: full.clone(), ..r.clone() };
        let merged_ref = alone(&mut merged_eng, &as_full);
        let base_ref = alone(&mut base_eng, &as_full);
        assert!(max_diff(&merged_ref, &base_ref) > 1e-2, "the LoRA must change the model here");
        let want = if r.id == 1 { &base_ref } else { &merged_ref };
        assert!(max_diff(g, want) < 1e-4, "request {}: {} from its reference", r.id, max_diff(g, want));
    }
    std::fs::remove_dir_all(&adapter).ok();
    std::fs::remove_dir_all(&merged).ok();
}

#[test]
fn the_training_student_runs_the_same_lora() {
    let (adapter, merged) = (temp("student"), temp("student-merged"));
    let t = lora_adapter(&adapter);
    merged_model(&adapter, &merged);
    let ids = tokens(40, 3);
    let zero: Vec<Tensor> = (0..2).map(|_| Tensor::zeros((40, 2), DType::F32, &Device::Cpu).unwrap()).collect();
    // No eviction (the delay covers the sequence): the student is the LoRA-adapted model.
    let opts = StudentOpts { window: 1000, alpha_scale: 100.0, alpha_offset: 5.0, tau: 1e-6, noise: &zero };
    let got = t.model.dense_forward(&ids, Some((&t.adapter, &opts))).unwrap().logits.to_vec2::<f32>().unwrap();
    let oracle = load_model(&merged, &Device::Cpu, WeightForm::Dense).unwrap().model;
    let want = oracle.dense_forward(&ids, None).unwrap().logits.to_vec2::<f32>().unwrap();
    let base = t.model.dense_forward(&ids, None).unwrap().logits.to_vec2::<f32>().unwrap();
    for p in 0..ids.len() {
        assert!(max_abs(&got[p], &want[p]) < 1e-4, "position {p}");
    }
    assert!((0..ids.len()).any(|p| max_abs(&base[p], &want[p]) > 1e-2), "the LoRA must change the model here");
    std::fs::remove_dir_all(&adapter).ok();
    std::fs::remove_dir_all(&merged).ok();
}

#[test]
fn a_step_trains_the_lora_from_the_frozen_model_and_a_warm_start_restores_it() {
    let mut t = trainer(true);
    let zero_b = |t: &Trainer| {
        t.adapter.lora.as_ref().unwrap().layers.iter().all(|l| {
            l.iter().all(|(_, b)| b.as_tensor().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap() == 0.0)
        })
    };
    assert!(zero_b(&t), "B starts at zero");
    t.train_step().unwrap();
    assert!(!zero_b(&t), "a step moves B");
    let dir = temp("warm");
    t.save_adapter(&dir).unwrap();
    let mut fresh = trainer(true);
    fresh.init_from_adapter(&dir).unwrap();
    let (a, b) = (t.adapter.lora.as_ref().unwrap(), fresh.adapter.lora.as_ref().unwrap());
    for (x, y) in a.vars().zip(b.vars()) {
        let d = (x.as_tensor() - y.as_tensor()).unwrap().abs().unwrap().max_all().unwrap();
        assert_eq!(d.to_scalar::<f32>().unwrap(), 0.0);
    }
    let err = format!("{:#}", trainer(false).init_from_adapter(&dir).unwrap_err());
    assert!(err.contains("carries a LoRA (rank 4"), "{err}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn bad_lora_files_and_latent_attention_are_refused_by_name() {
    let dir = temp("bad");
    lora_adapter(&dir);
    let attach = |dir: &Path| {
        let mut eng = common::engine(&fixture("qwen3_tiny"), "name = 'full'", 4);
        let table = format!("name = 'dms'\nadapter = {:?}", dir.display().to_string());
        dms_integration::engine::from_config::resolve_policy_table(
            &toml::from_str(&table).unwrap(),
            &mut eng.model,
            None,
        )
        .map(|_| ())
    };
    attach(&dir).unwrap();
    // A factor of the wrong shape.
    let mut t: HashMap<String, Tensor> =
        candle_core::safetensors::load(dir.join("adapter.safetensors"), &Device::Cpu).unwrap();
    let name = tensor_name(1, LoraTarget::V, "B");
    t.insert(name.clone(), Tensor::zeros((32, 3), DType::F32, &Device::Cpu).unwrap());
    candle_core::safetensors::save(&t, dir.join("adapter.safetensors")).unwrap();
    let err = format!("{:#}", attach(&dir).unwrap_err());
    assert!(err.contains(&name) && err.contains("[32, 3]") && err.contains("LoRA"), "{err}");
    // A rank without an alpha.
    let cfg = std::fs::read_to_string(dir.join("config.json")).unwrap().replace("\"lora_alpha\"", "\"lora_alpha_\"");
    std::fs::write(dir.join("config.json"), cfg).unwrap();
    let err = format!("{:#}", attach(&dir).unwrap_err());
    assert!(err.contains("lora_rank") && err.contains("lora_alpha"), "{err}");
    // A rank above the projections' smallest side.
    let mut s = section(true);
    s.lora.as_mut().unwrap().rank = 33;
    let model = load_model(&fixture("qwen3_tiny"), &Device::Cpu, WeightForm::Dense).unwrap().model;
    let err = format!("{:#}", Trainer::new(model, s, tokens(4000, 1)).err().unwrap());
    assert!(err.contains("rank 33 exceeds 32"), "{err}");
    // Latent attention has no q/k/v/o projections to adapt.
    let mla = load_model(&fixture("deepseek_mla_tiny"), &Device::Cpu, WeightForm::Dense).unwrap().model;
    let err = format!("{:#}", Trainer::new(mla, section(true), tokens(4000, 1)).err().unwrap());
    assert!(err.contains("latent attention"), "{err}");
    std::fs::remove_dir_all(&dir).ok();
}
