//! Tiny random-weight Qwen3 and Llama 3 (llama3 rope scaling) against Hugging Face transformers
//! golden outputs (fixtures produced in float32 on CPU), each loaded from its HF directory and
//! from a GGUF file laid out as llama.cpp's converter lays it out (`fixtures/gguf/`: q/k rows
//! permuted for Llama, Llama 3's scaling as `rope_freqs.weight`; llama.cpp itself reproduces the
//! golden logits from these files within 1e-6).
//!
//! Tolerance 1e-4 on logits: both sides compute in f32 over 2 layers with logits of std ~0.4;
//! transformers' own cached-vs-uncached difference is ~1e-6, so 1e-4 leaves room for a different
//! summation order while catching any wrong weight, norm or rotary frequency (those give >1e-2).

mod common;
use common::*;

const TOL: f32 = 1e-4;

fn check_model(name: &str) {
    check(name, &fixture(name));
}

/// `model` (a directory or a file) against the golden outputs of fixture `name`.
fn check(name: &str, model: &std::path::Path) {
    let g = golden(&fixture(name).join("golden.safetensors"));
    let prompt = ids(&g["prompt_ids"]);
    let want_prompt = g["prompt_logits"].to_vec2::<f32>().unwrap();
    let greedy = ids(&g["greedy_ids"]);
    let want_steps = g["greedy_step_logits"].to_vec2::<f32>().unwrap();

    let mut eng = engine(model, "name = \"full\"", 4);
    let inv: Vec<f32> = eng.model.config().rope_inv_freq().iter().map(|&x| x as f32).collect();
    let want_inv = g["rope_inv_freq"].to_vec1::<f32>().unwrap();
    assert!(max_abs(&inv, &want_inv) < 1e-6 * want_inv[0].abs().max(1.0), "{name}: inv_freq {inv:?} vs {want_inv:?}");

    let mut seq = eng.new_sequence();
    let all = eng.step(&mut seq, &prompt, true).unwrap().to_vec2::<f32>().unwrap();
    for (t, (got, want)) in all.iter().zip(&want_prompt).enumerate() {
        let err = max_abs(got, want);
        assert!(err < TOL, "{name}: prompt position {t}: max abs error {err}");
    }
    let mut logits = all.last().unwrap().clone();
    for (i, &want_id) in greedy.iter().enumerate() {
        let err = max_abs(&logits, &want_steps[i]);
        assert!(err < TOL, "{name}: greedy step {i}: max abs error {err}");
        let got_id = dms_integration::engine::argmax(&logits);
        assert_eq!(got_id, want_id, "{name}: greedy step {i}");
        logits = eng.step(&mut seq, &[got_id], false).unwrap().squeeze(0).unwrap().to_vec1().unwrap();
    }
}

#[test]
fn qwen3_tiny_matches_transformers() {
    check_model("qwen3_tiny");
}

#[test]
fn llama3_tiny_with_rope_scaling_matches_transformers() {
    check_model("llama3_tiny");
}

#[test]
fn qwen3_tiny_gguf_matches_transformers() {
    check("qwen3_tiny", &fixture("gguf/qwen3_tiny.gguf"));
}

#[test]
fn llama3_tiny_gguf_with_rope_freqs_matches_transformers() {
    check("llama3_tiny", &fixture("gguf/llama3_tiny.gguf"));
}

/// `model` against llama.cpp's outputs for it in `runs` (a `fixtures/gguf/*_llama_cpp.safetensors`):
/// the logits at every prompt position and through 8 greedy steps. Returns the engine.
fn check_llama_cpp(runs: &str, model: &std::path::Path) -> dms_integration::engine::Engine {
    check_engine_llama_cpp(runs, engine(model, "name = \"full\"", 4), model)
}

/// [`check_llama_cpp`] on an engine already built (from `model`).
fn check_engine_llama_cpp(
    runs: &str,
    mut eng: dms_integration::engine::Engine,
    model: &std::path::Path,
) -> dms_integration::engine::Engine {
    let g = golden(&fixture(runs));
    let mut seq = eng.new_sequence();
    let all = eng.step(&mut seq, &ids(&g["prompt_ids"]), true).unwrap().to_vec2::<f32>().unwrap();
    for (t, (got, want)) in all.iter().zip(&g["prompt_logits"].to_vec2::<f32>().unwrap()).enumerate() {
        assert!(max_abs(got, want) < TOL, "{model:?}: prompt position {t}: {}", max_abs(got, want));
    }
    let mut logits = all.last().unwrap().clone();
    let steps = g["greedy_step_logits"].to_vec2::<f32>().unwrap();
    for (i, &want_id) in ids(&g["greedy_ids"]).iter().enumerate() {
        assert!(max_abs(&logits, &steps[i]) < TOL, "{model:?}: greedy step {i}: {}", max_abs(&logits, &steps[i]));
        assert_eq!(dms_integration::engine::argmax(&logits), want_id, "{model:?}: greedy step {i}");
        logits = eng.step(&mut seq, &[want_id], false).unwrap().squeeze(0).unwrap().to_vec1().unwrap();
    }
    eng
}

/// Linear RoPE scaling from GGUF metadata (`rope.scaling.type = linear`, factor 2, on the tiny
/// Llama 3's weights): llama.cpp's logits (`fixtures/gguf/linear_llama_cpp.safetensors`).
#[test]
fn llama3_tiny_gguf_with_linear_rope_scaling_matches_llama_cpp() {
    let eng = check_llama_cpp("gguf/linear_llama_cpp.safetensors", &fixture("gguf/llama3_linear.gguf"));
    let scaling = eng.model.config().rope_scaling.clone();
    assert_eq!(scaling, Some(dms_integration::model::config::RopeScaling::Linear(2.0)));
}

/// YaRN, Qwen's long-context setting (factor 4 over an original context of 256, on the tiny
/// Qwen3's weights), from GGUF metadata and from config.json's `rope_scaling`: both give
/// llama.cpp's logits for the GGUF file (`fixtures/gguf/yarn_llama_cpp.safetensors`), and both
/// serve 256 x 4 = 1024 positions where the model declares 512.
#[test]
fn qwen3_tiny_with_yarn_matches_llama_cpp_from_gguf_and_config_json() {
    let runs = "gguf/yarn_llama_cpp.safetensors";
    let from_gguf = check_llama_cpp(runs, &fixture("gguf/qwen3_yarn.gguf"));
    let dir = std::env::temp_dir().join(format!("dms-yarn-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for f in ["model.safetensors", "generation_config.json"] {
        std::fs::copy(fixture("qwen3_tiny").join(f), dir.join(f)).unwrap();
    }
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("qwen3_tiny/config.json")).unwrap()).unwrap();
    config["rope_scaling"] =
        serde_json::json!({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256});
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let from_hf = check_llama_cpp(runs, &dir);
    let _ = std::fs::remove_dir_all(&dir);
    for eng in [&from_gguf, &from_hf] {
        let cfg = eng.model.config();
        assert!(matches!(cfg.rope_scaling, Some(dms_integration::model::config::RopeScaling::Yarn(_))));
        assert_eq!(cfg.max_position_embeddings, 1024);
    }
    assert_eq!(from_gguf.model.config().rope_inv_freq(), from_hf.model.config().rope_inv_freq());
}

/// A random Qwen3-MoE (8 experts, 2 per token, renormalised softmax routing in every layer)
/// from its HF directory and from the converter's `qwen3moe` GGUF (router as `ffn_gate_inp`,
/// experts stacked): both give llama.cpp's logits for the file
/// (`fixtures/gguf/qwen3_moe_llama_cpp.safetensors`), with the same routing settings.
#[test]
fn qwen3_moe_matches_llama_cpp_from_gguf_and_hf_directory() {
    let runs = "gguf/qwen3_moe_llama_cpp.safetensors";
    let from_gguf = check_llama_cpp(runs, &fixture("gguf/qwen3_moe.gguf"));
    let from_hf = check_llama_cpp(runs, &fixture("gguf/qwen3_moe_tiny"));
    let moe = from_hf.model.config().moe.clone().expect("experts");
    assert_eq!((moe.n_routed_experts, moe.num_experts_per_tok, moe.norm_topk_prob), (8, 2, true));
    assert_eq!((moe.scoring_func.as_str(), moe.topk_method.as_str(), moe.n_shared_experts), ("softmax", "greedy", 0));
    assert_eq!(from_gguf.model.config().moe, Some(moe));
}

/// A random Qwen2-MoE (q/k/v biases, 8 experts, 2 per token, not renormalised, a shared expert
/// scaled by a sigmoid gate) from its HF directory and from the converter's `qwen2moe` GGUF
/// (the gate as the vector `ffn_gate_inp_shexp`): both give llama.cpp's logits for the file
/// (`fixtures/gguf/qwen2_moe_llama_cpp.safetensors`), with the same routing settings.
#[test]
fn qwen2_moe_matches_llama_cpp_from_gguf_and_hf_directory() {
    let runs = "gguf/qwen2_moe_llama_cpp.safetensors";
    let from_gguf = check_llama_cpp(runs, &fixture("gguf/qwen2_moe.gguf"));
    let from_hf = check_llama_cpp(runs, &fixture("gguf/qwen2_moe_tiny"));
    let cfg = from_hf.model.config();
    let moe = cfg.moe.clone().expect("experts");
    assert_eq!((moe.n_routed_experts, moe.num_experts_per_tok, moe.gated_shared_width), (8, 2, Some(48)));
    assert!(!moe.norm_topk_prob && cfg.attention_bias);
    assert_eq!(from_gguf.model.config().moe, Some(moe));
}

/// A random Mixtral (4 experts, 2 per token, renormalised softmax routing in every layer, no
/// window) from its HF directory (`block_sparse_moe.gate`, `experts.E.w1/w3/w2`) and from the
/// converter's `llama` GGUF with experts (q/k rows permuted): both give llama.cpp's logits for
/// the file (`fixtures/gguf/mixtral_llama_cpp.safetensors`), with the same routing settings.
#[test]
fn mixtral_matches_llama_cpp_from_gguf_and_hf_directory() {
    let runs = "gguf/mixtral_llama_cpp.safetensors";
    let from_gguf = check_llama_cpp(runs, &fixture("gguf/mixtral.gguf"));
    let from_hf = check_llama_cpp(runs, &fixture("gguf/mixtral_tiny"));
    let cfg = from_hf.model.config();
    let moe = cfg.moe.clone().expect("experts");
    assert_eq!((moe.n_routed_experts, moe.num_experts_per_tok, moe.moe_intermediate_size), (4, 2, 32));
    assert!(moe.norm_topk_prob && (0..2).all(|i| moe.is_moe_layer(i)));
    assert_eq!((cfg.max_position_embeddings, cfg.rope_theta), (512, 1e6), "no window: sliding_window is null");
    assert_eq!(from_gguf.model.config().moe, Some(moe));
}

/// A random Phi-3 from its HF directory (q/k/v fused in `qkv_proj`, gate and up in
/// `gate_up_proj`) and from the converter's `phi3` GGUF (`attn_qkv`; `ffn_up` holding gate then
/// up): both give llama.cpp's logits for the file (`fixtures/gguf/phi3_llama_cpp.safetensors`).
/// A config whose key/value heads do not match the fused rows, RoPE over an odd part of a head
/// and LongRoPE factors of the wrong length are refused by name; Phi-3-mini-4k's window covers every
/// layer (and caps the device engine's context); generation_config.json's end-of-sequence tokens are read.
#[test]
fn phi3_matches_llama_cpp_from_gguf_and_hf_directory() {
    let runs = "gguf/phi3_llama_cpp.safetensors";
    let from_gguf = check_llama_cpp(runs, &fixture("gguf/phi3.gguf"));
    let from_hf = check_llama_cpp(runs, &fixture("gguf/phi3_tiny"));
    for eng in [&from_gguf, &from_hf] {
        let cfg = eng.model.config();
        assert_eq!((cfg.arch, cfg.max_position_embeddings), (dms_integration::model::config::Arch::Phi3, 512));
    }
    let dir = std::env::temp_dir().join(format!("dms-phi3-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(fixture("gguf/phi3_tiny/model.safetensors"), dir.join("model.safetensors")).unwrap();
    let load = |key: &str, value: serde_json::Value| {
        let mut config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(fixture("gguf/phi3_tiny/config.json")).unwrap()).unwrap();
        config[key] = value;
        std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
        dms_integration::engine::load_model(&dir, &candle_core::Device::Cpu, dms_integration::model::WeightForm::Dense)
    };
    let refused = |key: &str, value: serde_json::Value, words: &[&str]| {
        let e = format!("{:#}", load(key, value).err().unwrap_or_else(|| panic!("{key} accepted")));
        assert!(words.iter().all(|w| e.contains(w)), "{key}: {e}");
    };
    refused(
        "num_key_value_heads",
        serde_json::json!(1),
        &["model.layers.0.self_attn.qkv_proj.weight", "does not match"],
    );
    refused("partial_rotary_factor", serde_json::json!(0.7), &["partial_rotary_factor", "rotates 11 channels"]);
    let longrope = serde_json::json!({"type": "longrope", "short_factor": [1.0], "long_factor": [1.0]});
    refused("rope_scaling", longrope, &["head_dim / 2 = 8"]);
    let short = [1.0; 8];
    let long_too_short = serde_json::json!({"type": "longrope", "short_factor": short, "long_factor": [1.0]});
    refused("rope_scaling", long_too_short, &["long_factor", "head_dim / 2 = 8", "got 1"]);
    let long_not_numbers = serde_json::json!({"type": "longrope", "short_factor": short, "long_factor": "x"});
    refused("rope_scaling", long_not_numbers, &["long_factor"]);
    let windowed = load("sliding_window", serde_json::json!(100)).unwrap();
    let cfg = windowed.model.config();
    assert_eq!((cfg.max_position_embeddings, cfg.device_context()), (512, Some(100)));
    // generation_config.json's end-of-sequence tokens join config.json's (Phi-3's `<|end|>`).
    std::fs::write(dir.join("generation_config.json"), r#"{"eos_token_id": [2, 7]}"#).unwrap();
    assert_eq!(load("sliding_window", serde_json::json!(null)).unwrap().model.config().eos_token_ids, [2, 7]);
    std::fs::write(dir.join("generation_config.json"), r#"{"eos_token_id": "end"}"#).unwrap();
    let e = format!("{:#}", load("sliding_window", serde_json::json!(null)).err().unwrap());
    assert!(e.contains("generation_config.json") && e.contains("eos_token_id"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// LongRoPE (Phi-3.5, Phi-3 128K) below its original context, from config.json's `rope_scaling`
/// (`short_factor`, the attention factor from 1024 positions over an original 256) and from the
/// converter's `phi3` GGUF (`rope_factors_short`, `rope.scaling.attn_factor`): both give
/// llama.cpp's logits for the file at a 128-token context, where it picks the short factors
/// (`fixtures/gguf/phi3_longrope_llama_cpp.safetensors`), and serve the original 256 positions.
#[test]
fn phi3_longrope_matches_llama_cpp_below_its_original_context() {
    let runs = "gguf/phi3_longrope_llama_cpp.safetensors";
    for path in ["gguf/phi3_longrope.gguf", "gguf/phi3_longrope_tiny"] {
        let eng = check_llama_cpp(runs, &fixture(path));
        let cfg = eng.model.config();
        assert_eq!(cfg.max_position_embeddings, 256, "{path}");
        assert!(matches!(cfg.rope_scaling, Some(dms_integration::model::config::RopeScaling::LongRope(_))), "{path}");
        assert!((cfg.rope_attention_factor() - 1.25f64.sqrt()).abs() < 1e-6, "{path}: {}", cfg.rope_attention_factor());
    }
}

/// LongRoPE past its original context: `[model] context = 512` (over an original 256; 1024
/// declared) rotates every position by `long_factor`, as llama.cpp does in a 512-token context
/// (`fixtures/gguf/phi3_longrope_long_llama_cpp.safetensors`, 0.098 from the short-factor run's
/// logits), from the GGUF's `rope_factors_long` and from config.json's `long_factor`, and the
/// engine serves 512 positions. A context past the declared one, or past the original one without
/// long factors, is refused naming the limit; one within the original keeps the short factors.
#[test]
fn phi3_longrope_past_its_original_context_takes_the_long_factors_as_llama_cpp_does() {
    use dms_integration::config::EngineConfig;
    use dms_integration::model::WeightForm;
    let runs = "gguf/phi3_longrope_long_llama_cpp.safetensors";
    for path in ["gguf/phi3_longrope.gguf", "gguf/phi3_longrope_tiny"] {
        let text = format!(
            "[model]\nsource = {:?}\ncontext = 512\n[cache]\nblock_size = 4\nmax_tokens = 1024\n[cache.policy]\nname = \"full\"\n",
            fixture(path).display().to_string()
        );
        let built = dms_integration::engine::from_config::build_engine(&EngineConfig::parse(&text).unwrap()).unwrap();
        let eng = check_engine_llama_cpp(runs, built.engine, &fixture(path));
        let cfg = eng.model.config();
        assert_eq!((cfg.max_position_embeddings, cfg.context_limit()), (512, 1024), "{path}");
        let mut model =
            dms_integration::engine::load_model(&fixture(path), &candle_core::Device::Cpu, WeightForm::Dense)
                .unwrap()
                .model;
        let e = format!("{:#}", model.set_context(1025).unwrap_err());
        assert!(e.contains("1 to 1024 tokens"), "{path}: {e}");
        // Within the original context: the short factors, as before.
        model.set_context(200).unwrap();
        check_engine_llama_cpp(
            "gguf/phi3_longrope_llama_cpp.safetensors",
            engine_of(model, "name = \"full\"", 4),
            &fixture(path),
        );
    }
    // Without long factors, the original context is the limit.
    let dir = std::env::temp_dir().join(format!("dms-phi3-short-only-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(fixture("gguf/phi3_longrope_tiny/model.safetensors"), dir.join("model.safetensors")).unwrap();
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("gguf/phi3_longrope_tiny/config.json")).unwrap())
            .unwrap();
    config["rope_scaling"].as_object_mut().unwrap().remove("long_factor");
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let mut model =
        dms_integration::engine::load_model(&dir, &candle_core::Device::Cpu, WeightForm::Dense).unwrap().model;
    let e = format!("{:#}", model.set_context(512).unwrap_err());
    assert!(e.contains("1 to 256 tokens") && e.contains("no long factors"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Phi-4-mini's choices on a random Phi-3 (`fixtures/gguf/phi4_mini_tiny`, `phi4_mini.gguf`): RoPE
/// over 12 of each head's 16 channels (`partial_rotary_factor` 0.75; a GGUF's
/// `rope.dimension_count`), LongRoPE over those channels' 6 frequencies, tied embeddings. Both
/// give llama.cpp's logits, prompt and greedy steps, through the engine and through the
/// retrofit's differentiable forward; RoPE over the whole head would not (the rotated width
/// matters).
#[test]
fn phi4_mini_rotates_part_of_each_head_as_llama_cpp_does() {
    let runs = "gguf/phi4_mini_llama_cpp.safetensors";
    for path in ["gguf/phi4_mini.gguf", "gguf/phi4_mini_tiny"] {
        let eng = check_llama_cpp(runs, &fixture(path));
        let cfg = eng.model.config();
        assert_eq!((cfg.partial_rotary_dim, cfg.head_dim, cfg.tie_word_embeddings), (Some(12), 16, true), "{path}");
        assert_eq!(cfg.max_position_embeddings, 256, "{path}: LongRoPE serves the original context");
        // The retrofit's differentiable forward rotates the same channels.
        let g = golden(&fixture(runs));
        let dense = eng.model.dense_forward(&ids(&g["prompt_ids"]), None).unwrap().logits.to_vec2::<f32>().unwrap();
        for (t, (got, want)) in dense.iter().zip(&g["prompt_logits"].to_vec2::<f32>().unwrap()).enumerate() {
            assert!(max_abs(got, want) < TOL, "{path}: dense forward, position {t}: {}", max_abs(got, want));
        }
    }
    let dir = std::env::temp_dir().join(format!("dms-phi4-whole-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(fixture("gguf/phi4_mini_tiny/model.safetensors"), dir.join("model.safetensors")).unwrap();
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("gguf/phi4_mini_tiny/config.json")).unwrap()).unwrap();
    config["partial_rotary_factor"] = serde_json::json!(1.0);
    config["rope_scaling"] = serde_json::Value::Null;
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let g = golden(&fixture(runs));
    let mut eng = engine(&dir, "name = \"full\"", 4);
    let mut seq = eng.new_sequence();
    let all = eng.step(&mut seq, &ids(&g["prompt_ids"]), true).unwrap().to_vec2::<f32>().unwrap();
    let want = g["prompt_logits"].to_vec2::<f32>().unwrap();
    assert!(max_abs(all.last().unwrap(), want.last().unwrap()) > 1e-3, "whole-head RoPE gives the same logits");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The same Qwen3-MoE with its experts packed as transformers 5 saves them
/// (`mlp.experts.gate_up_proj` `[experts, 2 x width, hidden]`, gate rows first, and
/// `mlp.experts.down_proj` `[experts, hidden, width]`): llama.cpp's logits again, densely and
/// with `weights = "quantized"` agreeing with the per-expert checkpoint; a packed tensor of
/// another shape is refused naming it.
#[test]
fn qwen3_moe_with_packed_experts_matches_llama_cpp() {
    use candle_core::{Device, Tensor};
    use dms_integration::model::WeightForm;
    let src = fixture("gguf/qwen3_moe_tiny");
    let mut w = candle_core::safetensors::load(src.join("model.safetensors"), &Device::Cpu).unwrap();
    for layer in 0..2 {
        let p = format!("model.layers.{layer}.mlp.experts");
        let (mut gate_up, mut down) = (vec![], vec![]);
        for e in 0..8 {
            let mut take = |k: &str| w.remove(&format!("{p}.{e}.{k}_proj.weight")).unwrap();
            gate_up.push(Tensor::cat(&[take("gate"), take("up")], 0).unwrap());
            down.push(take("down"));
        }
        w.insert(format!("{p}.gate_up_proj"), Tensor::stack(&gate_up, 0).unwrap());
        w.insert(format!("{p}.down_proj"), Tensor::stack(&down, 0).unwrap());
    }
    let dir = std::env::temp_dir().join(format!("dms-packed-experts-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(src.join("config.json"), dir.join("config.json")).unwrap();
    candle_core::safetensors::save(&w, dir.join("model.safetensors")).unwrap();
    check_llama_cpp("gguf/qwen3_moe_llama_cpp.safetensors", &dir);
    let logits = |model: &std::path::Path| {
        let m = dms_integration::engine::load_model(model, &Device::Cpu, WeightForm::Quantized).unwrap();
        let table: toml::Table = toml::from_str("name = \"full\"").unwrap();
        let policy = dms_policy::Registry::with_builtins().build(&table).unwrap();
        let mut eng = dms_integration::engine::Engine::new(m.model, policy, 4, 1 << 16).unwrap();
        let mut seq = eng.new_sequence();
        eng.step(&mut seq, &[1, 7, 42, 300], true).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap()
    };
    assert_eq!(logits(&dir), logits(&src), "quantized from packed and from per-expert tensors");
    let down = w.remove("model.layers.1.mlp.experts.down_proj").unwrap();
    w.insert("model.layers.1.mlp.experts.down_proj".into(), down.transpose(1, 2).unwrap().contiguous().unwrap());
    candle_core::safetensors::save(&w, dir.join("model.safetensors")).unwrap();
    let e = dms_integration::engine::load_model(&dir, &Device::Cpu, WeightForm::Dense).err().expect("refused");
    assert!(format!("{e:#}").contains("`model.layers.1.mlp.experts.down_proj` has shape [8, 32, 64]"), "{e:#}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Generation stops at the tokens llama.cpp stops at (`llama_vocab_is_eog`, in
/// `fixtures/gguf/expected.json`): end of sequence, end of turn, and the turn-ending tokens it
/// knows by name (`<|eot_id|>` beside `<|end_of_text|>`, `<|im_end|>` and `<|endoftext|>`).
#[test]
fn gguf_stop_tokens_are_llama_cpps() {
    let expected: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("gguf/expected.json")).unwrap()).unwrap();
    let files = ["llama3_tiny.gguf", "qwen3_tiny.gguf", "deepseek_mla_tiny.gguf", "deepseek_v3_moe.gguf", "phi3.gguf"];
    for file in files.into_iter().chain(["phi4_mini.gguf"]) {
        let m = dms_integration::engine::load_model(
            &fixture(&format!("gguf/{file}")),
            &candle_core::Device::Cpu,
            dms_integration::model::WeightForm::Dense,
        )
        .unwrap();
        let mut got = m.model.config().eos_token_ids.clone();
        got.sort_unstable();
        let want: Vec<u32> =
            expected[file]["eog"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect();
        assert_eq!(got, want, "{file}");
    }
}

/// The tokenizers built from the GGUF fixtures' metadata (byte-level BPE with pre-tokenizers
/// `llama-bpe`, `qwen2`, `smollm`, `deepseek-llm`, `deepseek-v3`, `gpt-4o`; SentencePiece BPE) give llama.cpp's token ids
/// (`fixtures/gguf/expected.json`, from llama-cpp-python), with and without the special tokens
/// the file asks to add, and decode to llama.cpp's text piece by piece.
#[test]
fn gguf_tokenizers_match_llama_cpp() {
    let expected: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("gguf/expected.json")).unwrap()).unwrap();
    let as_ids = |v: &serde_json::Value| -> Vec<u32> {
        v.as_array().unwrap().iter().map(|x| u32::try_from(x.as_u64().unwrap()).unwrap()).collect()
    };
    let files = ["llama3_tiny.gguf", "qwen3_tiny.gguf", "smollm_vocab.gguf", "spm_vocab.gguf"];
    for file in files.into_iter().chain(["deepseek_mla_tiny.gguf", "deepseek_v3_moe.gguf", "phi4_mini.gguf"]) {
        let content =
            dms_integration::model::gguf_header::read_gguf_header(&fixture(&format!("gguf/{file}"))).unwrap().content;
        let tok = dms_integration::model::gguf_tokenizer::from_gguf(&content).unwrap();
        let e = &expected[file];
        let texts = e["texts"].as_array().unwrap();
        for (i, text) in texts.iter().enumerate() {
            let text = text.as_str().unwrap();
            let plain = tok.encode(text, false).unwrap().get_ids().to_vec();
            assert_eq!(plain, as_ids(&e["ids"][i]), "{file}: {text:?}");
            let special = tok.encode(text, true).unwrap().get_ids().to_vec();
            assert_eq!(special, as_ids(&e["ids_add_special"][i]), "{file}, special tokens added: {text:?}");
            assert_eq!(tok.decode(&plain, true).unwrap(), e["decoded"][i], "{file}: decoding {text:?}");
        }
    }
}
