//! Latent attention (DeepSeek MLA) through the latent cache: parity with Hugging Face
//! transformers on the tiny DeepSeek-V3 fixture, the spec's rule-8 oracle for latent rows, DMS on
//! latent rows against a dense masked reference, retrofit on an MLA model, and memory accounting.

mod common;
use candle_core::{Device, Tensor};
use common::*;
use dms_integration::engine::from_config::resolve_policy_table;
use dms_integration::engine::{argmax, load_model, Engine};
use dms_integration::kv::attention::{chunk_latent_rows, decode_row, Scoring};
use dms_integration::kv::store::KvStore;
use dms_integration::model::llama::train::StudentOpts;
use dms_integration::model::WeightForm;
use dms_integration::retrofit::{RetrofitSection, Trainer};
use dms_policy::{CacheShape, CompactPlan, EvictPlan, Pos, Registry, RowRef};
use proptest::prelude::*;

const TOL: f32 = 1e-4;

fn mla_dir() -> std::path::PathBuf {
    fixture("deepseek_mla_tiny")
}

/// Runs `prompt` through the model at `model` (prompt logits at every position against
/// `want_prompt`), then `greedy` one token at a time through the latent cache (the logits before
/// each against `want_steps`, each token the argmax); returns the engine.
fn check_logits(
    model: &std::path::Path,
    prompt: &[u32],
    want_prompt: &[Vec<f32>],
    greedy: &[u32],
    want_steps: &[Vec<f32>],
) -> Engine {
    let label = model.display();
    let mut eng = engine(model, "name = \"full\"", 4);
    let mut seq = eng.new_sequence();
    let all = eng.step(&mut seq, prompt, true).unwrap().to_vec2::<f32>().unwrap();
    for (t, (got, want)) in all.iter().zip(want_prompt).enumerate() {
        let err = max_abs(got, want);
        assert!(err < TOL, "{label}: prompt position {t}: max abs error {err}");
    }
    let mut logits = all.last().unwrap().clone();
    for (i, &want_id) in greedy.iter().enumerate() {
        let err = max_abs(&logits, &want_steps[i]);
        assert!(err < TOL, "{label}: greedy step {i}: max abs error {err}");
        let got = argmax(&logits);
        assert_eq!(got, want_id, "{label}: greedy step {i}");
        logits = eng.step(&mut seq, &[got], false).unwrap().squeeze(0).unwrap().to_vec1().unwrap();
    }
    eng
}

#[test]
fn deepseek_mla_tiny_matches_transformers_through_the_latent_cache() {
    let g = golden(&mla_dir().join("golden.safetensors"));
    let prompt = ids(&g["prompt_ids"]);
    let greedy = ids(&g["greedy_ids"]);
    let want = |k: &str| g[k].to_vec2::<f32>().unwrap();
    let eng = check_logits(&mla_dir(), &prompt, &want("prompt_logits"), &greedy, &want("greedy_step_logits"));
    let mc = eng.model.config().clone();
    let m = mc.mla.clone().expect("parsed as MLA");
    let inv: Vec<f32> = m.rope_inv_freq(mc.rope_theta).iter().map(|&x| x as f32).collect();
    assert!(max_abs(&inv, &g["rope_inv_freq"].to_vec1::<f32>().unwrap()) < 1e-7);
    assert_eq!((mc.num_kv_heads, mc.head_dim, mc.value_dim()), (1, 32 + 8, 0), "one latent row of c_kv + k_pe");
    // The cache holds exactly one 40-float row per token and layer: 160 bytes, against the
    // 4 heads x (16 + 8 + 16) = 160 floats (640 bytes) a per-head K/V cache would hold.
    let tokens = (prompt.len() + greedy.len()) as u64;
    let u = eng.store.usage();
    assert_eq!(u.bytes_live, tokens * 2 * 40 * 4);
    assert_eq!(mc.mha_equivalent_floats_per_token_layer(), 160);
}

/// The same model from a GGUF file as llama.cpp's converter writes `deepseek2` today (kv_b split
/// into `attn_k_b` and `attn_v_b`): transformers' logits and greedy tokens, and the same config.
#[test]
fn deepseek_mla_tiny_gguf_matches_transformers() {
    let g = golden(&mla_dir().join("golden.safetensors"));
    let want = |k: &str| g[k].to_vec2::<f32>().unwrap();
    let eng = check_logits(
        &fixture("gguf/deepseek_mla_tiny.gguf"),
        &ids(&g["prompt_ids"]),
        &want("prompt_logits"),
        &ids(&g["greedy_ids"]),
        &want("greedy_step_logits"),
    );
    // The same attention (the HF config's MoE fields describe no layer: every layer is dense).
    let from_hf = engine(&mla_dir(), "name = \"full\"", 4).model.config().mla.clone();
    assert_eq!(eng.model.config().mla, from_hf);
}

/// The DeepSeek-V3-shaped file with each layer's gate and up experts fused into
/// `ffn_gate_up_exps` (`[experts, 2 x width, hidden]`, llama.cpp's `--fuse-gate-up-exps`): the
/// same llama.cpp logits as the unfused file; a fused stack of another width is refused naming it.
#[test]
fn deepseek_gguf_with_fused_gate_up_experts_matches_llama_cpp() {
    use candle_core::quantized::{GgmlDType, QTensor};
    let g = golden(&fixture("gguf/deepseek_llama_cpp.safetensors"));
    let want = |k: &str| g[&format!("deepseek_v3_moe.{k}")].to_vec2::<f32>().unwrap();
    let take = |t: &mut GgufTensors, name: &str| {
        let i = t.iter().position(|(n, _)| n == name).unwrap_or_else(|| panic!("{name}"));
        t.remove(i).1.dequantize(&Device::Cpu).unwrap()
    };
    // The file with layer 1's gate and up stacks replaced by `fused` of them.
    let with_fused = |fused: &dyn Fn(Tensor) -> Tensor| {
        let (meta, mut t) = fixture_gguf_parts("deepseek_v3_moe.gguf");
        let gate = take(&mut t, "blk.1.ffn_gate_exps.weight");
        let up = take(&mut t, "blk.1.ffn_up_exps.weight");
        let both = fused(Tensor::cat(&[gate, up], 1).unwrap());
        t.push(("blk.1.ffn_gate_up_exps.weight".into(), QTensor::quantize(&both, GgmlDType::F32).unwrap()));
        gguf_file_bytes(&meta, &t)
    };
    let dir = std::env::temp_dir().join(format!("dms-fused-experts-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("fused.gguf");
    std::fs::write(&path, with_fused(&|t| t)).unwrap();
    let prompt = ids(&g["prompt_ids"]);
    let greedy = ids(&g["deepseek_v3_moe.greedy_ids"]);
    check_logits(&path, &prompt, &want("prompt_logits"), &greedy, &want("greedy_step_logits"));
    std::fs::write(&path, with_fused(&|t| t.narrow(1, 0, 48).unwrap().contiguous().unwrap())).unwrap();
    let e = load_model(&path, &Device::Cpu, WeightForm::Dense).err().expect("refused");
    assert!(format!("{e:#}").contains("`blk.1.ffn_gate_up_exps.weight` has shape"), "{e:#}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Random DeepSeek-V2-Lite-shaped (older GGUF layout with one `attn_kv_b`, no query compression,
/// softmax routing, shared experts, YaRN) and DeepSeek-V3-shaped (sigmoid routing with a
/// correction bias over expert groups) GGUF files: llama.cpp's logits at every prompt position
/// and through 8 greedy steps (`fixtures/gguf/deepseek_llama_cpp.safetensors`).
#[test]
fn deepseek_moe_gguf_files_match_llama_cpp() {
    let g = golden(&fixture("gguf/deepseek_llama_cpp.safetensors"));
    let prompt = ids(&g["prompt_ids"]);
    for name in ["deepseek_mla_tiny", "deepseek_v2_moe", "deepseek_v3_moe"] {
        let want = |k: &str| g[&format!("{name}.{k}")].to_vec2::<f32>().unwrap();
        let greedy = ids(&g[&format!("{name}.greedy_ids")]);
        let path = fixture(&format!("gguf/{name}.gguf"));
        let eng = check_logits(&path, &prompt, &want("prompt_logits"), &greedy, &want("greedy_step_logits"));
        let m = eng.model.config().mla.clone().unwrap();
        let moe = eng.model.config().moe.clone();
        match name {
            "deepseek_v2_moe" => {
                let (y, e) = (m.yarn.unwrap(), moe.unwrap());
                assert_eq!(
                    (m.q_lora_rank, y.factor, e.scoring_func.as_str(), e.topk_method.as_str()),
                    (None, 4.0, "softmax", "greedy")
                );
            }
            "deepseek_v3_moe" => {
                let e = moe.unwrap();
                assert_eq!(
                    (e.scoring_func.as_str(), e.topk_method.as_str(), e.n_group, e.topk_group),
                    ("sigmoid", "noaux_tc", 4, 2)
                );
            }
            _ => {}
        }
    }
}

#[test]
fn chunked_prefill_of_the_latent_cache_equals_one_pass() {
    let g = golden(&mla_dir().join("golden.safetensors"));
    let prompt = ids(&g["prompt_ids"]);
    let want = g["prompt_logits"].to_vec2::<f32>().unwrap();
    for chunk in [1usize, 7, 16] {
        let mut eng = engine(&mla_dir(), "name = \"full\"", 4);
        let mut seq = eng.new_sequence();
        let mut last = Vec::new();
        for c in prompt.chunks(chunk) {
            last = eng.step(&mut seq, c, true).unwrap().to_vec2::<f32>().unwrap();
        }
        let err = max_abs(last.last().unwrap(), want.last().unwrap());
        assert!(err < TOL, "chunk {chunk}: last-position error {err}");
    }
}

const R: usize = 6;
const P: usize = 2;
const NH: usize = 3;

/// Attention of NH absorbed queries over a list of latent rows (values = first R floats).
fn naive_latent(q: &[f32], list: &[Vec<f32>], scale: f32) -> Vec<f32> {
    let d = R + P;
    let mut out = vec![0f32; NH * R];
    for h in 0..NH {
        let qh = &q[h * d..(h + 1) * d];
        let s: Vec<f64> =
            list.iter().map(|k| qh.iter().zip(k).map(|(a, b)| (a * b) as f64).sum::<f64>() * scale as f64).collect();
        let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let e: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
        let z: f64 = e.iter().sum();
        for (j, k) in list.iter().enumerate() {
            for i in 0..R {
                out[h * R + i] += (e[j] / z) as f32 * k[i];
            }
        }
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(100))]
    /// Spec rule 8 for latent rows: the paged latent store driven by `dms` keeps the oracle's
    /// positions and gives its attention outputs, decode and chunked.
    #[test]
    fn latent_rows_equal_the_list_oracle(w in 0u32..8, decisions in prop::collection::vec(any::<bool>(), 1..40),
                                         chunks in prop::collection::vec(1usize..9, 1..4), bs in 1usize..6, seed in 0u64..1000) {
        let d = R + P;
        let n = decisions.len();
        let rows = vecf(seed, n * d);
        let qs = vecf(seed + 2, n * NH * d);
        let scale = 0.6f32;
        let mut list: Vec<(Pos, bool, Vec<f32>)> = Vec::new();
        let (mut want_out, mut want_kept) = (Vec::new(), Vec::new());
        for t in 0..n {
            if let Some(l) = list.last_mut() { l.1 = decisions[t]; }
            list.push((t as Pos, false, rows[t * d..(t + 1) * d].to_vec()));
            if list.len() > w as usize + 1 && list[list.len() - w as usize - 2].1 {
                list.remove(list.len() - w as usize - 2);
            }
            let ks: Vec<Vec<f32>> = list.iter().map(|e| e.2.clone()).collect();
            want_out.push(naive_latent(&qs[t * NH * d..(t + 1) * NH * d], &ks, scale));
            want_kept.push(list.iter().map(|e| e.0).collect::<Vec<_>>());
        }
        let f = Registry::with_builtins().build(&toml::from_str(&format!("name = 'dms'\nwindow = {w}")).unwrap()).unwrap();
        let mut pol = f.new_sequence(CacheShape { n_layers: 1, rows_per_layer: 1 });
        let mut store = KvStore::with_value_dim(d, 0, bs, 1000);
        let id = store.add_row(0);
        let row = RowRef { layer: 0, head: 0 };
        let (mut ep, mut cp) = (EvictPlan::default(), CompactPlan::default());
        let (mut seen, mut i) = (0usize, 0usize);
        while seen < n {
            let c = chunks[i % chunks.len()].min(n - seen);
            i += 1;
            let raw: Vec<f32> = decisions[seen..seen + c].iter().map(|&x| if x { 1.0 } else { -1.0 }).collect();
            pol.decide(row, seen as Pos, c, Some(&raw)).unwrap();
            pol.evict(row, seen as Pos, c, &mut ep).unwrap();
            store.apply_evict(id, &ep, seen as Pos, &rows[seen * d..(seen + c) * d], &[]).unwrap();
            let q = &qs[seen * NH * d..(seen + c) * NH * d];
            let outs: Vec<Vec<f32>> = if c == 1 {
                let mut o = vec![0f32; NH * R];
                decode_row(&store, id, q, seen as Pos, Scoring::scaled(scale as f64), &mut o).unwrap();
                vec![o]
            } else {
                let qt = Tensor::from_slice(q, (c, NH, d), &Device::Cpu).unwrap();
                let pos: Vec<Pos> = (seen..seen + c).map(|x| x as Pos).collect();
                chunk_latent_rows(&store, &[id], &qt, &pos, Scoring::scaled(scale as f64), R).unwrap().to_vec2::<f32>().unwrap()
            };
            for (j, o) in outs.iter().enumerate() {
                let err = max_abs(o, &want_out[seen + j]);
                prop_assert!(err < 1e-5, "query {}: error {}", seen + j, err);
            }
            seen += c;
            pol.compact(row, &mut cp).unwrap();
            store.apply_compact(id, &cp).unwrap();
            prop_assert_eq!(store.row(id).unwrap().kept_positions(), want_kept[seen - 1].clone(), "kept after {} tokens", seen);
            prop_assert_eq!(store.usage().bytes_live, (store.row(id).unwrap().len() * d * 4) as u64);
        }
    }
}

fn tokens(n: usize, seed: usize) -> Vec<u32> {
    (0..n).map(|i| ((i * 7919 + seed * 104729) % 509) as u32 + 2).collect()
}

fn section(steps: usize) -> RetrofitSection {
    toml::from_str::<toml::Table>(&format!(
        "window = 4\ntarget_cr = 4.0\nsteps = {steps}\nramp_steps = 1\nseq_len = 32\nlr = 0.05\noutput = 'unused'"
    ))
    .unwrap()
    .try_into()
    .unwrap()
}

/// Retrofit on the MLA model (one decision per token and layer), then DMS on its latent rows:
/// the engine's logits equal a dense forward in which every flagged key outside the window is
/// masked, and memory is reclaimed.
#[test]
fn retrofit_on_mla_then_dms_on_latent_rows_matches_the_dense_masked_reference() {
    let model = load_model(&mla_dir(), &Device::Cpu, WeightForm::Dense).unwrap().model;
    let mut t = Trainer::new(model, section(30), tokens(3000, 1)).unwrap();
    let stats: Vec<_> = (0..30).map(|_| t.train_step().unwrap()).collect();
    // Step 0 runs at target 0; from step 1 the target is 0.75, where the zero-initialised
    // adapter (nothing evicted) would pay a hinge of ~0.75.
    let tail = &stats[20..];
    let loss = tail.iter().map(|s| s.loss).sum::<f64>() / tail.len() as f64;
    let evicted = tail.iter().map(|s| s.evicted).sum::<f64>() / tail.len() as f64;
    assert!(
        stats[0].evicted < 0.1 && evicted > 0.4,
        "evicted fraction {} -> {evicted} (target 0.75)",
        stats[0].evicted
    );
    assert!(loss < 0.5, "mean loss of the last steps {loss} vs ~0.75 untrained");

    let dir = std::env::temp_dir().join(format!("dms-mla-retrofit-{}", std::process::id()));
    t.save_adapter(&dir).unwrap();
    let ids = tokens(48, 7);
    // Reference: the dense pass with hard decisions (no noise, a vanishing temperature).
    let zero: Vec<Tensor> =
        (0..2).map(|_| Tensor::zeros((48, 1), candle_core::DType::F32, &Device::Cpu).unwrap()).collect();
    let opts = StudentOpts { window: 4, alpha_scale: 100.0, alpha_offset: 5.0, tau: 1e-6, noise: &zero };
    let want = t.model.dense_forward(&ids, Some((&t.adapter, &opts))).unwrap().logits.to_vec2::<f32>().unwrap();

    let mut loaded = load_model(&mla_dir(), &Device::Cpu, WeightForm::Dense).unwrap();
    let table: toml::Table =
        toml::from_str(&format!("name = 'dms'\nadapter = {:?}", dir.display().to_string())).unwrap();
    let table = resolve_policy_table(&table, &mut loaded.model, None).unwrap();
    assert_eq!(table.get("window").and_then(|v| v.as_integer()), Some(4), "window from the adapter");
    let policy = Registry::with_builtins().build(&table).unwrap();
    for chunk in [48usize, 5, 1] {
        let mut model = load_model(&mla_dir(), &Device::Cpu, WeightForm::Dense).unwrap().model;
        resolve_policy_table(&table, &mut model, None).unwrap();
        let mut eng = Engine::new(model, policy.clone(), 4, 1 << 12).unwrap();
        let mut seq = eng.new_sequence();
        let mut got = Vec::new();
        for c in ids.chunks(chunk) {
            got.extend(eng.step(&mut seq, c, true).unwrap().to_vec2::<f32>().unwrap());
        }
        for (p, (g, w)) in got.iter().zip(&want).enumerate() {
            let err = max_abs(g, w);
            assert!(err < 1e-4, "chunk {chunk}, position {p}: error {err}");
        }
        let cr = seq.compression_ratio(&eng.store);
        assert!(cr > 1.3, "DMS must evict latent rows (CR {cr})");
        let u = eng.store.usage();
        let kept: u64 =
            (0..2).map(|l| seq.kept_positions(l, &eng.store).iter().map(|r| r.len() as u64).sum::<u64>()).sum();
        assert_eq!(u.bytes_live, kept * 40 * 4, "bytes live = kept latent rows x 160 B");
        assert!(u.bytes_live < u.bytes_full, "memory reclaimed");
    }
}

#[test]
fn mla_configs_with_bad_fields_are_rejected_with_the_field_named() {
    let text = std::fs::read_to_string(mla_dir().join("config.json")).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v.as_object_mut().unwrap().remove("kv_lora_rank");
    let e = dms_integration::model::ModelConfig::from_hf_json(&v.to_string()).unwrap_err().to_string();
    assert!(e.contains("kv_lora_rank"), "{e}");
    let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v["rope_scaling"] = serde_json::json!({"type": "dynamic", "factor": 2.0});
    let e = dms_integration::model::ModelConfig::from_hf_json(&v.to_string()).unwrap_err().to_string();
    assert!(e.contains("rope_scaling") && e.contains("yarn"), "{e}");
    let bad = |patch: serde_json::Value| {
        let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
        for (k, x) in patch.as_object().unwrap() {
            v[k] = x.clone();
        }
        dms_integration::model::ModelConfig::from_hf_json(&v.to_string()).unwrap_err().to_string()
    };
    let e = bad(
        serde_json::json!({"rope_scaling": {"type": "yarn", "factor": 0.0, "original_max_position_embeddings": 64}}),
    );
    assert!(e.contains("factor > 0"), "{e}");
    // FP8 checkpoints load (tests/fp8.rs); other quantizations are refused by name.
    let e = bad(serde_json::json!({"quantization_config": {"quant_method": "gptq", "bits": 4}}));
    assert!(e.contains("quantization_config: quant_method `gptq` is not supported"), "{e}");
    let e =
        bad(serde_json::json!({"first_k_dense_replace": 0, "n_group": 2, "topk_group": 1, "num_experts_per_tok": 3}));
    assert!(e.contains("MoE routing"), "{e}");
}
