//! Retrofit: the dense teacher equals the model, soft-mask gradients match finite differences,
//! a few steps on a tiny model reduce the loss and move the eviction fraction toward the target,
//! and the saved adapter reproduces its eviction rate in the engine.

mod common;
use std::sync::Arc;

use candle_core::{Device, Tensor, Var};
use common::*;
use dms_integration::engine::from_config::resolve_policy_table;
use dms_integration::engine::{load_model, Engine};
use dms_integration::model::WeightForm;
use dms_integration::retrofit::{RetrofitSection, Trainer};
use dms_policy::Registry;

fn section(steps: usize, target_cr: f64, lr: f64) -> RetrofitSection {
    toml::from_str::<toml::Table>(&format!(
        "window = 4\ntarget_cr = {target_cr}\nsteps = {steps}\nramp_steps = 1\nseq_len = 32\nlr = {lr}\noutput = 'unused'"
    ))
    .unwrap()
    .try_into()
    .unwrap()
}

fn tokens(n: usize, seed: usize) -> Vec<u32> {
    (0..n).map(|i| ((i * 7919 + seed * 104729) % 509) as u32 + 2).collect()
}

fn trainer(steps: usize, target_cr: f64, lr: f64) -> Trainer {
    let model = load_model(&fixture("qwen3_tiny"), &Device::Cpu, WeightForm::Dense).unwrap().model;
    Trainer::new(model, section(steps, target_cr, lr), tokens(4000, 1)).unwrap()
}

/// A trainer whose relaxation is smooth at the scale of a finite-difference step in f32.
fn smooth_trainer() -> Trainer {
    let model = load_model(&fixture("qwen3_tiny"), &Device::Cpu, WeightForm::Dense).unwrap().model;
    let mut s = section(1, 1.0, 0.01);
    s.alpha_scale = 1.0;
    s.alpha_offset = 0.0;
    s.tau = 1.0;
    Trainer::new(model, s, tokens(4000, 1)).unwrap()
}

#[test]
fn dense_teacher_equals_the_transformers_fixture() {
    let t = trainer(1, 2.0, 0.01);
    let g = golden(&fixture("qwen3_tiny/golden.safetensors"));
    let prompt = ids(&g["prompt_ids"]);
    let want = g["prompt_logits"].to_vec2::<f32>().unwrap();
    let got = t.model.dense_forward(&prompt, None).unwrap().logits.to_vec2::<f32>().unwrap();
    for p in 0..prompt.len() {
        assert!(max_abs(&got[p], &want[p]) < 1e-4, "position {p}");
    }
}

#[test]
fn soft_mask_gradient_matches_finite_differences() {
    let t = smooth_trainer();
    // A non-zero adapter so that the masks are neither all-on nor all-off.
    for (i, p) in t.adapter.projs.iter().enumerate() {
        let r = Tensor::randn(0f32, 0.5, p.as_tensor().dims(), &Device::Cpu).unwrap();
        p.set(&(r + 0.001 * i as f64).unwrap()).unwrap();
    }
    let ids = tokens(24, 3);
    let noise: Vec<Tensor> = (0..2)
        .map(|l| Tensor::randn(0f32, 1.0, (24, 2), &Device::Cpu).unwrap() * (0.5 + l as f64))
        .map(|t| t.unwrap())
        .collect();
    // target 0: the hinge is zero, the loss is the KL through the soft mask only.
    let (loss, _, _) = t.loss(&ids, &noise, 0.0).unwrap();
    let grads = loss.backward().unwrap();
    let p: &Var = &t.adapter.projs[0];
    let g = grads.get(p.as_tensor()).unwrap().to_vec2::<f32>().unwrap();
    let base = p.as_tensor().to_vec2::<f32>().unwrap();
    let mut checked = 0;
    for (r, c) in [(0usize, 3usize), (1, 17), (0, 40), (1, 63)] {
        let h = 1e-2f32;
        let at = |delta: f32| {
            let mut w = base.clone();
            w[r][c] += delta;
            p.set(&Tensor::new(w, &Device::Cpu).unwrap()).unwrap();
            let (l, _, _) = t.loss(&ids, &noise, 0.0).unwrap();
            l.to_scalar::<f32>().unwrap() as f64
        };
        let fd = (at(h) - at(-h)) / (2.0 * h as f64);
        p.set(&Tensor::new(base.clone(), &Device::Cpu).unwrap()).unwrap();
        let an = g[r][c] as f64;
        assert!(
            (fd - an).abs() <= 0.05 * an.abs().max(fd.abs()) + 1e-5,
            "w[{r}][{c}]: analytic {an} vs finite difference {fd}"
        );
        checked += (an.abs() > 1e-6) as usize;
    }
    assert!(checked >= 2, "the gradients checked must not all be zero");
}

#[test]
fn training_reduces_loss_moves_eviction_to_target_and_the_adapter_reproduces_it() {
    let mut t = trainer(40, 4.0, 0.05);
    let stats: Vec<_> = (0..40).map(|_| t.train_step().unwrap()).collect();
    let first = stats[..3].iter().map(|s| s.loss).sum::<f64>() / 3.0;
    let last = stats[37..].iter().map(|s| s.loss).sum::<f64>() / 3.0;
    assert!(last < first, "loss {first} -> {last}");
    let e0 = stats[0].evicted;
    let e1 = stats[37..].iter().map(|s| s.evicted).sum::<f64>() / 3.0;
    assert!(e1 > e0 + 0.3 && e1 > 0.5, "evicted fraction {e0} -> {e1} (target 0.75)");
    // Save, reload into the engine on a plain model, run held-out tokens and count the flags.
    let dir = std::env::temp_dir().join(format!("dms-retrofit-{}", std::process::id()));
    t.save_adapter(&dir).unwrap();
    let mut loaded = load_model(&fixture("qwen3_tiny"), &Device::Cpu, WeightForm::Dense).unwrap();
    let table: toml::Table =
        toml::from_str(&format!("name = 'dms'\nadapter = {:?}", dir.display().to_string())).unwrap();
    let table = resolve_policy_table(&table, &mut loaded.model, None).unwrap();
    let log: Log = Arc::default();
    let policy = Arc::new(Recording { inner: Registry::with_builtins().build(&table).unwrap(), log: log.clone() });
    let mut eng = Engine::new(loaded.model, policy, 4, 1 << 12).unwrap();
    let mut seq = eng.new_sequence();
    eng.step(&mut seq, &tokens(200, 99), false).unwrap();
    let log = log.lock().unwrap();
    let flagged = log.iter().filter(|e| e.3 * 100.0 - 5.0 > 0.0).count() as f64 / log.len() as f64;
    assert!((flagged - e1).abs() < 0.2, "inference flag rate {flagged} vs training {e1}");
}
