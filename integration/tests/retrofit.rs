//! Retrofit: the dense teacher equals the model, soft-mask gradients match finite differences,
//! a few steps on a tiny model reduce the loss and move the eviction fraction toward the target,
//! and the saved adapter reproduces its eviction rate in the engine; row weights give the
//! weighted mean KL, a warm start reproduces the adapter it starts from, and retrieval samples
//! carry the same key in the fact and the answer.

mod common;
use std::sync::Arc;

use candle_core::{Device, Tensor, Var};
use common::*;
use dms_integration::engine::from_config::resolve_policy_table;
use dms_integration::engine::{load_model, Engine};
use dms_integration::model::WeightForm;
use dms_integration::retrofit::retrieval::{RetrievalSection, RetrievalTask};
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

/// Gemma 2, Gemma 3 and Granite retrofit: the dense teacher gives the float64 reference's logits
/// from the HF directory and the GGUF (Gemma 2: scores soft-capped at 0.5 and logits at 1.5,
/// even layers windowed; Gemma 3: local layers windowed to 8 of the 40 tokens, their own RoPE
/// base; both: sandwich norms, scaled embeddings; Granite: its four multipliers), and training
/// raises the evicted fraction toward the target.
#[test]
fn gemma_and_granite_retrofit_from_the_reference_teacher() {
    let cases = [
        ("gguf/gemma2_tiny", "gemma2"),
        ("gguf/gemma2.gguf", "gemma2"),
        ("gguf/gemma3_tiny", "gemma3"),
        ("gguf/gemma3.gguf", "gemma3"),
        ("gguf/granite_tiny", "granite"),
        ("gguf/granite.gguf", "granite"),
    ];
    for (model, name) in cases {
        let loaded = load_model(&fixture(model), &Device::Cpu, WeightForm::Dense).unwrap().model;
        let g = golden(&fixture(&format!("gguf/{name}_reference.safetensors")));
        let prompt = ids(&g["prompt_ids"]);
        let want = g["prompt_logits"].to_vec2::<f32>().unwrap();
        let got = loaded.dense_forward(&prompt, None).unwrap().logits.to_vec2::<f32>().unwrap();
        for p in 0..prompt.len() {
            assert!(max_abs(&got[p], &want[p]) < 1e-4, "{model}: position {p}: {}", max_abs(&got[p], &want[p]));
        }
        let mut t = Trainer::new(loaded, section(20, 4.0, 0.05), tokens(4000, 1)).unwrap();
        let stats: Vec<_> = (0..20).map(|_| t.train_step().unwrap()).collect();
        assert!(stats.iter().all(|s| s.loss.is_finite()), "{model}");
        let (e0, e1) = (stats[0].evicted, stats[17..].iter().map(|s| s.evicted).sum::<f64>() / 3.0);
        assert!(e1 > e0 + 0.2, "{model}: evicted fraction {e0} -> {e1} (target 0.75)");
    }
}

#[test]
fn soft_mask_gradient_matches_finite_differences() {
    let t = smooth_trainer();
    // A non-zero adapter so that the masks are neither all-on nor all-off. Seeded draws (std 0.5 for the adapter, 0.5 and 1.5 for the noise): the same on every run.
    let seed = 7;
    let uniform = |seed: u64, dims: &[usize], std: f64| {
        let n = dims.iter().product();
        (Tensor::from_vec(vecf(seed, n), dims, &Device::Cpu).unwrap() * (std * 12f64.sqrt())).unwrap()
    };
    for (i, p) in t.adapter.projs.iter().enumerate() {
        p.set(&uniform(seed * 10 + i as u64, p.as_tensor().dims(), 0.5)).unwrap();
    }
    let ids = tokens(24, 3);
    let noise: Vec<Tensor> = (0..2).map(|l| uniform(seed * 10 + 5 + l, &[24, 2], 0.5 + l as f64)).collect();
    // target 0: the hinge is zero, the loss is the KL through the soft mask only.
    let loss = t.loss(&ids, &noise, None, 0.0).unwrap().loss;
    let grads = loss.backward().unwrap();
    let h = 1e-2f32;
    // f32 noise in the loss limits the finite difference to about 1e-5 absolute (at most 2e-5
    // over 400 seeded draws), so only gradients well above that are checked tightly.
    let floor = 3e-5;
    let p: &Var = &t.adapter.projs[0];
    let g = grads.get(p.as_tensor()).unwrap().to_vec2::<f32>().unwrap();
    let base = p.as_tensor().to_vec2::<f32>().unwrap();
    let mut checked = 0;
    for (r, c) in [(0usize, 3usize), (1, 17), (0, 40), (1, 63)] {
        let at = |delta: f32| {
            let mut w = base.clone();
            w[r][c] += delta;
            p.set(&Tensor::new(w, &Device::Cpu).unwrap()).unwrap();
            let l = t.loss(&ids, &noise, None, 0.0).unwrap().loss;
            l.to_scalar::<f32>().unwrap() as f64
        };
        let fd = (at(h) - at(-h)) / (2.0 * h as f64);
        p.set(&Tensor::new(base.clone(), &Device::Cpu).unwrap()).unwrap();
        let an = g[r][c] as f64;
        assert!(
            (fd - an).abs() <= 0.05 * an.abs().max(fd.abs()) + floor,
            "w[{r}][{c}]: analytic {an} vs finite difference {fd} (resolution {floor})"
        );
        checked += (an.abs() > 10.0 * floor) as usize;
    }
    assert!(checked >= 2, "the gradients checked must stand clear of the finite-difference resolution");
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

/// A fixed non-zero adapter (`shift` apart from another), so that decisions and KL rows differ
/// from row to row.
fn perturb(t: &Trainer, shift: f32) {
    for (i, p) in t.adapter.projs.iter().enumerate() {
        let dims = p.as_tensor().dims().to_vec();
        let n = dims.iter().product::<usize>();
        let v: Vec<f32> = (0..n).map(|j| ((j * 37 + i * 11) % 17) as f32 / 17.0 - 0.5 + shift).collect();
        p.set(&Tensor::from_vec(v, dims, &Device::Cpu).unwrap()).unwrap();
    }
}

#[test]
fn row_weights_give_the_weighted_mean_of_the_kl_rows() {
    let t = smooth_trainer();
    perturb(&t, 0.0);
    let ids = tokens(24, 5);
    let noise: Vec<Tensor> =
        (0..2).map(|_| Tensor::zeros((24, 2), candle_core::DType::F32, &Device::Cpu).unwrap()).collect();
    let plain = t.loss(&ids, &noise, None, 0.0).unwrap();
    let rows = plain.kl_rows.to_vec1::<f32>().unwrap();
    let mean = rows.iter().map(|&x| x as f64).sum::<f64>() / rows.len() as f64;
    assert!((plain.kl.to_scalar::<f32>().unwrap() as f64 - mean).abs() < 1e-6);
    let w: Vec<f32> = (0..24).map(|r| if (18..22).contains(&r) { 16.0 } else { 1.0 }).collect();
    let weighted = t.loss(&ids, &noise, Some(&w), 0.0).unwrap();
    let want = rows.iter().zip(&w).map(|(&k, &w)| (k * w) as f64).sum::<f64>() / w.iter().sum::<f32>() as f64;
    let got = weighted.kl.to_scalar::<f32>().unwrap() as f64;
    assert!((got - want).abs() < 1e-6 * want.max(1.0), "weighted KL {got} vs naive {want}");
    assert!((got - mean).abs() > 1e-4, "the weights must change the loss here ({got} vs {mean})");
    assert!(t.loss(&ids, &noise, Some(&w[..23]), 0.0).is_err());
}

#[test]
fn a_warm_start_reproduces_the_adapter_it_starts_from_and_refuses_a_mismatched_one() {
    let t = trainer(1, 2.0, 0.01);
    perturb(&t, 0.3);
    for (i, n) in t.adapter.norms.iter().enumerate() {
        let v: Vec<f32> = (0..64).map(|j| 1.0 + ((j + i) % 5) as f32 * 0.1).collect();
        n.set(&Tensor::from_vec(v, 64, &Device::Cpu).unwrap()).unwrap();
    }
    let dir = std::env::temp_dir().join(format!("dms-retrofit-init-{}", std::process::id()));
    t.save_adapter(&dir).unwrap();
    let mut fresh = trainer(1, 2.0, 0.01);
    fresh.init_from_adapter(&dir).unwrap();
    for (a, b) in
        t.adapter.projs.iter().chain(&t.adapter.norms).zip(fresh.adapter.projs.iter().chain(&fresh.adapter.norms))
    {
        let d = (a.as_tensor() - b.as_tensor()).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert_eq!(d, 0.0);
    }
    // An adapter of another model (a projection with the wrong width) is refused by name.
    let mut bad = std::collections::HashMap::new();
    for i in 0..2 {
        let a = format!("model.layers.{i}.self_attn.dms_proj_alpha");
        bad.insert(format!("{a}_norm.weight"), Tensor::ones(64, candle_core::DType::F32, &Device::Cpu).unwrap());
        bad.insert(format!("{a}.weight"), Tensor::zeros((2, 63), candle_core::DType::F32, &Device::Cpu).unwrap());
    }
    let bad_dir = dir.with_extension("bad");
    std::fs::create_dir_all(&bad_dir).unwrap();
    candle_core::safetensors::save(&bad, bad_dir.join("adapter.safetensors")).unwrap();
    std::fs::copy(dir.join("config.json"), bad_dir.join("config.json")).unwrap();
    let err = format!("{:#}", fresh.init_from_adapter(&bad_dir).unwrap_err());
    assert!(err.contains("dms_proj_alpha.weight") && err.contains("[2, 63]"), "{err}");
    let mut other = trainer(1, 2.0, 0.01);
    other.cfg.alpha_scale = 50.0;
    let err = format!("{:#}", other.init_from_adapter(&dir).unwrap_err());
    assert!(err.contains("dms_alpha_scale 100"), "{err}");
    let err = format!("{:#}", fresh.init_from_adapter(&dir.with_extension("missing")).unwrap_err());
    assert!(err.contains("no readable config.json"), "{err}");
    std::fs::remove_dir_all(&dir).ok();
    std::fs::remove_dir_all(&bad_dir).ok();
}

/// A word-level tokenizer that spells digits one by one, enough for the retrieval wording.
fn digit_tokenizer() -> tokenizers::Tokenizer {
    use tokenizers::models::wordlevel::WordLevel;
    use tokenizers::pre_tokenizers::{digits::Digits, sequence::Sequence, whitespace::Whitespace};
    let words =
        ["[UNK]", "0", "1", "2", "3", "4", "5", "6", "7", "8", "9", ".", "(", ")", ":", "?", "secret", "number"];
    let vocab = words.iter().enumerate().map(|(i, w)| (w.to_string(), 1000 + i as u32)).collect();
    let model = WordLevel::builder().vocab(vocab).unk_token("[UNK]".into()).build().unwrap();
    let mut tok = tokenizers::Tokenizer::new(model);
    tok.with_pre_tokenizer(Some(Sequence::new(vec![Whitespace {}.into(), Digits::new(true).into()])));
    tok
}

#[test]
fn retrieval_samples_carry_one_key_in_fact_and_answer_at_the_drawn_rate() {
    use rand::SeedableRng;
    let task =
        RetrievalTask::new(RetrievalSection { fraction: 0.25, answer_weight: 8.0 }, digit_tokenizer(), 128).unwrap();
    let short = RetrievalTask::new(RetrievalSection { fraction: 0.25, answer_weight: 8.0 }, digit_tokenizer(), 30);
    assert!(short.err().unwrap().to_string().contains("seq_len of at least"));
    let hay = tokens(256, 7);
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    let mut drawn = 0;
    for _ in 0..400 {
        let Some(s) = task.draw(&hay, 128, &mut rng).unwrap() else { continue };
        drawn += 1;
        assert_eq!(s.ids.len(), 128);
        assert_eq!(s.weights.len(), 128);
        // The answer: the last tokens, five digits then a full stop; their rows weigh 8.
        let answer: Vec<u32> = s.ids[s.answer_rows.start + 1..].to_vec();
        assert_eq!(answer.len(), 6);
        assert!(answer[..5].iter().all(|&d| (1001..=1010).contains(&d)) && answer[5] == 1011);
        assert!(s.answer_rows.clone().all(|r| s.weights[r] == 8.0));
        assert_eq!(s.weights.iter().filter(|&&w| w != 1.0).count(), 6);
        // The same five digits occur once before the question, after some text.
        let at = s.ids.windows(5).position(|w| w == &answer[..5]).unwrap();
        assert!(at > 0 && at + 5 < s.answer_rows.start - 10, "fact at {at}");
    }
    // 400 draws at 0.25: 100 expected, standard deviation 8.7.
    assert!((65..=135).contains(&drawn), "{drawn} retrieval samples of 400");
}
