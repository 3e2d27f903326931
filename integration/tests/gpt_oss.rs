//! OpenAI's GPT-OSS: attention sinks, windowed even layers, biased projections and router, and
//! experts with a clamped SwiGLU stored in MXFP4, against a float64 transcription of
//! transformers' `GptOssForCausalLM` from every format it ships in (OpenAI's MXFP4 safetensors,
//! a dense copy, the converter's GGUF with f32 or MXFP4 experts), and against llama.cpp.

mod common;
use common::*;

use dms_integration::engine::{argmax, load_model};
use dms_integration::model::{Arch, ModelConfig, WeightForm};

/// The random GPT-OSS of `generate.py gpt_oss` (sinks, window, clamp and YaRN's fractional ramp
/// each move the reference by more than 0.05) gives the reference's logits within 1e-4 from its
/// MXFP4 directory, its dense copy and both GGUF files, fed whole or in chunks of 7 (prompt
/// tiles, then decode steps); its windowed rows keep their last 8 tokens.
#[test]
fn gpt_oss_matches_the_reference_from_every_format() {
    for model in ["gpt_oss_tiny", "gpt_oss_dense_tiny", "gpt_oss.gguf", "gpt_oss_mxfp4.gguf"] {
        let model = fixture(&format!("gguf/{model}"));
        follow("gguf/gpt_oss_reference.safetensors", &model, 7, 1e-4);
        let (eng, seq) = follow("gguf/gpt_oss_reference.safetensors", &model, 0, 1e-4);
        for layer in 0..4 {
            let want: Vec<u32> = if layer % 2 == 0 { (40..48).collect() } else { (0..48).collect() };
            for row in seq.kept_positions(layer, &eng.store) {
                assert_eq!(row, want, "{model:?}: layer {layer}");
            }
        }
        let cfg = eng.model.config();
        assert_eq!(cfg.arch, Arch::GptOss);
        assert!(cfg.moe.as_ref().and_then(|m| m.oai).is_some());
    }
}

/// llama.cpp rounds YaRN's ramp to whole frequencies where GPT-OSS's config says not to
/// (`truncate: false`); run with that ramp, the converter's GGUF gives llama.cpp's logits and
/// greedy tokens (which `generate.py` checks lie within 1e-3 of the float64 reference computed
/// the same way; the ramp moves the reference by 0.26).
#[test]
fn gpt_oss_gguf_with_llama_cpps_ramp_gives_llama_cpps_logits() {
    let loaded = load_model(&fixture("gguf/gpt_oss.gguf"), &candle_core::Device::Cpu, WeightForm::Dense).unwrap();
    let mut cfg = loaded.model.config().clone();
    let Some(dms_integration::model::config::RopeScaling::Yarn(y)) = &mut cfg.rope_scaling else {
        panic!("the file's YaRN is read")
    };
    assert!(!y.truncate, "GPT-OSS's own ramp");
    y.truncate = true;
    let (weights, _) = dms_integration::model::Weights::open_gguf(&fixture("gguf/gpt_oss.gguf")).unwrap();
    let model =
        dms_integration::model::Llama::load(cfg, &weights, &candle_core::Device::Cpu, WeightForm::Dense).unwrap();
    let mut eng = engine_of(model, "name = \"full\"", 4);
    let g = golden(&fixture("gguf/gpt_oss_llama_cpp.safetensors"));
    let mut seq = eng.new_sequence();
    let got = eng.step(&mut seq, &ids(&g["prompt_ids"]), true).unwrap().to_vec2::<f32>().unwrap();
    for (t, (a, b)) in got.iter().zip(g["prompt_logits"].to_vec2::<f32>().unwrap()).enumerate() {
        assert!(max_abs(a, &b) < 2e-4, "position {t}: {}", max_abs(a, &b));
    }
    let mut last = got.last().unwrap().clone();
    for want in ids(&g["greedy_ids"]) {
        assert_eq!(argmax(&last), want);
        last = eng.step(&mut seq, &[want], false).unwrap().squeeze(0).unwrap().to_vec1().unwrap();
    }
}

/// With `weights = "quantized"` the MXFP4 experts stay in their blocks (17 bytes per 32 weights,
/// run by our kernel, whose products are checked against the exact ones in its unit tests) and
/// every f32 layer is repacked into Q8_0: OpenAI's MXFP4 directory (its blocks repacked into
/// ggml's layout) and the GGUF with MXFP4 experts give the same logits, prompt and decode steps,
/// and the model holds the
/// experts' bytes of MXFP4, not Q8_0's (34 bytes per 32 weights) as a Q8_0 requantization does.
/// (This random model is too sensitive for a bound against the float64 reference: llama.cpp's
/// own MXFP4 path, which rounds activations to 8 bits too, lies 1.7 from it.)
#[test]
fn gpt_oss_mxfp4_experts_run_in_their_blocks() {
    let run = |model: &str, form: WeightForm| -> (Vec<Vec<f32>>, u64) {
        let loaded = load_model(&fixture(&format!("gguf/{model}")), &candle_core::Device::Cpu, form).unwrap();
        assert!(loaded.model.is_quantized());
        let bytes = loaded.model.weight_bytes();
        let mut eng = engine_of(loaded.model, "name = \"full\"", 4);
        let g = golden(&fixture("gguf/gpt_oss_reference.safetensors"));
        let mut seq = eng.new_sequence();
        let mut logits = eng.step(&mut seq, &ids(&g["prompt_ids"]), true).unwrap().to_vec2::<f32>().unwrap();
        // Decode steps: one row per expert, where the kernel runs (long prompts dequantize).
        for t in ids(&g["greedy_ids"]) {
            logits.push(eng.step(&mut seq, &[t], false).unwrap().squeeze(0).unwrap().to_vec1().unwrap());
        }
        (logits, bytes)
    };
    let (gguf, gguf_bytes) = run("gpt_oss_mxfp4.gguf", WeightForm::Quantized);
    let (hf, hf_bytes) = run("gpt_oss_tiny", WeightForm::Quantized);
    for (t, (a, b)) in gguf.iter().zip(&hf).enumerate() {
        assert!(max_abs(a, b) < 1e-5, "position {t}: {}", max_abs(a, b));
    }
    let (_, q8_bytes) = run("gpt_oss_tiny", WeightForm::parse("q8_0").unwrap());
    // 4 layers x 4 experts x (gate, up: 32 x 64; down: 64 x 32).
    let expert_weights = 4 * 4 * (2 * 32 * 64 + 64 * 32);
    assert_eq!(gguf_bytes, hf_bytes);
    assert_eq!(q8_bytes - gguf_bytes, expert_weights * (34 - 17) / 32);
}

/// A GGUF whose experts' gate and up are fused (llama.cpp's `--fuse-gate-up-exps`:
/// `ffn_gate_up_exps`, each expert's gate rows then its up rows, in MXFP4, and its biases
/// likewise) gives the logits of the file that keeps them apart, dense and quantized.
#[test]
fn gpt_oss_fused_gate_up_experts_load() {
    let g = golden(&fixture("gguf/gpt_oss_reference.safetensors"));
    let run = |model: &str, form: WeightForm| -> Vec<Vec<f32>> {
        let loaded = load_model(&fixture(&format!("gguf/{model}")), &candle_core::Device::Cpu, form).unwrap();
        let mut eng = engine_of(loaded.model, "name = \"full\"", 4);
        let mut seq = eng.new_sequence();
        eng.step(&mut seq, &ids(&g["prompt_ids"]), true).unwrap().to_vec2::<f32>().unwrap()
    };
    for form in [WeightForm::Dense, WeightForm::Quantized] {
        for (t, (a, b)) in run("gpt_oss_fused.gguf", form).iter().zip(run("gpt_oss_mxfp4.gguf", form)).enumerate() {
            assert!(max_abs(a, &b) < 1e-5, "{form:?}, position {t}: {}", max_abs(a, &b));
        }
    }
}

/// openai/gpt-oss-20b's published config.json is read as transformers reads it.
#[test]
fn the_published_gpt_oss_20b_config_is_read() {
    let c = ModelConfig::from_hf_json(GPT_OSS_20B).unwrap();
    assert_eq!((c.arch, c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim), (Arch::GptOss, 24, 64, 8, 64));
    assert!(c.attention_bias && !c.tie_word_embeddings && c.fp8.is_none());
    let w = c.windows.as_ref().unwrap();
    assert_eq!(w.window(), 128);
    assert_eq!(w.layers(), (0..24).map(|i| i % 2 == 0).collect::<Vec<_>>());
    let m = c.moe.as_ref().unwrap();
    assert_eq!((m.n_routed_experts, m.num_experts_per_tok, m.moe_intermediate_size), (32, 4, 2880));
    assert_eq!(m.oai.unwrap().limit, 7.0);
    let Some(dms_integration::model::config::RopeScaling::Yarn(y)) = &c.rope_scaling else { panic!("YaRN") };
    assert_eq!((y.factor, y.original_max_position_embeddings, y.truncate), (32.0, 4096.0, false));
    assert_eq!(c.max_position_embeddings, 131072);
    for (from, to, words) in [
        (r#""swiglu_limit": 7.0"#, r#""swiglu_limit": -1.0"#, "swiglu_limit"),
        (r#""num_experts_per_tok": 4"#, r#""num_experts_per_tok": 1"#, "num_experts_per_tok 1"),
        (r#""model_type": "gpt_oss""#, r#""model_type": "llama""#, "mxfp4"),
        // Per-layer flags are allocated from the count: an edited one is refused first.
        (r#""num_hidden_layers": 24"#, r#""num_hidden_layers": 9223372036854775807"#, "num_hidden_layers"),
    ] {
        let text = GPT_OSS_20B.replace(from, to).replace(r#""experts_per_token": 4"#, r#""experts_per_token": 1"#);
        let text = if words == "mxfp4" { text.replace("GptOssForCausalLM", "LlamaForCausalLM") } else { text };
        let e = format!("{:#}", ModelConfig::from_hf_json(&text).unwrap_err());
        assert!(e.contains(words), "{words}: {e}");
    }
}

/// GPT-OSS retrofit: the dense training forward (sinks in every softmax, windowed even layers,
/// biased projections and router, clamped experts) gives the float64 reference's logits from the
/// MXFP4 directory (dequantized), its dense copy and the f32-expert GGUF, and training raises the
/// evicted fraction toward the target.
#[test]
fn gpt_oss_retrofits_from_the_reference_teacher() {
    use dms_integration::retrofit::{RetrofitSection, Trainer};
    let g = golden(&fixture("gguf/gpt_oss_reference.safetensors"));
    let prompt = ids(&g["prompt_ids"]);
    let want = g["prompt_logits"].to_vec2::<f32>().unwrap();
    for model in ["gguf/gpt_oss_tiny", "gguf/gpt_oss_dense_tiny", "gguf/gpt_oss.gguf"] {
        let loaded = load_model(&fixture(model), &candle_core::Device::Cpu, WeightForm::Dense).unwrap().model;
        let got = loaded.dense_forward(&prompt, None).unwrap().logits.to_vec2::<f32>().unwrap();
        for p in 0..prompt.len() {
            assert!(max_abs(&got[p], &want[p]) < 1e-4, "{model}: position {p}: {}", max_abs(&got[p], &want[p]));
        }
        let section: RetrofitSection = toml::from_str::<toml::Table>(
            "window = 4\ntarget_cr = 4.0\nsteps = 20\nramp_steps = 1\nseq_len = 32\nlr = 0.05\noutput = 'unused'",
        )
        .unwrap()
        .try_into()
        .unwrap();
        let tokens: Vec<u32> = (0..4000).map(|i| ((i * 7919 + 104729) % 509) as u32 + 2).collect();
        let mut t = Trainer::new(loaded, section, tokens).unwrap();
        let stats: Vec<_> = (0..20).map(|_| t.train_step().unwrap()).collect();
        assert!(
            stats.iter().all(|s| s.loss.is_finite()),
            "{model}: {:?}",
            stats.iter().map(|s| (s.loss, s.kl, s.evicted)).collect::<Vec<_>>()
        );
        let (e0, e1) = (stats[0].evicted, stats[17..].iter().map(|s| s.evicted).sum::<f64>() / 3.0);
        assert!(e1 > e0 + 0.2, "{model}: evicted fraction {e0} -> {e1} (target 0.75)");
    }
}

/// openai/gpt-oss-20b's config.json as published.
const GPT_OSS_20B: &str = r#"{
  "architectures": ["GptOssForCausalLM"], "attention_bias": true, "attention_dropout": 0.0,
  "eos_token_id": 200002, "experts_per_token": 4, "head_dim": 64, "hidden_act": "silu",
  "hidden_size": 2880, "initial_context_length": 4096, "initializer_range": 0.02,
  "intermediate_size": 2880,
  "layer_types": ["sliding_attention", "full_attention", "sliding_attention", "full_attention",
    "sliding_attention", "full_attention", "sliding_attention", "full_attention", "sliding_attention",
    "full_attention", "sliding_attention", "full_attention", "sliding_attention", "full_attention",
    "sliding_attention", "full_attention", "sliding_attention", "full_attention", "sliding_attention",
    "full_attention", "sliding_attention", "full_attention", "sliding_attention", "full_attention"],
  "max_position_embeddings": 131072, "model_type": "gpt_oss", "num_attention_heads": 64,
  "num_experts_per_tok": 4, "num_hidden_layers": 24, "num_key_value_heads": 8, "num_local_experts": 32,
  "output_router_logits": false, "pad_token_id": 199999,
  "quantization_config": {"modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
    "model.embed_tokens", "lm_head"], "quant_method": "mxfp4"},
  "rms_norm_eps": 1e-05,
  "rope_scaling": {"beta_fast": 32.0, "beta_slow": 1.0, "factor": 32.0, "original_max_position_embeddings": 4096,
    "rope_type": "yarn", "truncate": false},
  "rope_theta": 150000, "router_aux_loss_coef": 0.9, "sliding_window": 128, "swiglu_limit": 7.0,
  "tie_word_embeddings": false, "transformers_version": "4.55.0.dev0", "use_cache": true, "vocab_size": 201088
}"#;
