//! Bad input gives a clear error naming the problem, never a panic.

mod common;
use std::path::PathBuf;

use candle_core::Device;
use common::fixture;
use dms_integration::config::EngineConfig;
use dms_integration::engine::from_config::build_engine;
use dms_integration::engine::load_model;
use dms_integration::model::WeightForm;

fn err_of<T>(r: anyhow::Result<T>) -> String {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => format!("{e:#}"),
    }
}

fn tmp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("dms-bad-input-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

const GOOD: &str = "[model]\nsource = \"x\"\n[cache.policy]\nname = \"full\"\n";

#[test]
fn config_errors_name_the_key() {
    assert!(EngineConfig::parse(GOOD).is_ok());
    let e = err_of(EngineConfig::parse("[model]\nsource = \"x\"\nsorce = 1\n"));
    assert!(e.contains("sorce"), "{e}");
    let e = err_of(EngineConfig::parse("[model]\nsource = \"x\"\n[cache]\nblock_size = 0\n"));
    assert!(e.contains("block_size"), "{e}");
    let e = err_of(EngineConfig::parse("[model]\nsource = \"x\"\n[cache]\nblock_size = -4\n"));
    assert!(e.contains("block_size"), "{e}");
    let e = err_of(EngineConfig::parse("[model]\nsource = \"x\"\n[cache]\nmemory_mb = 10\nmax_tokens = 5\n"));
    assert!(e.contains("mutually exclusive"), "{e}");
    let e = err_of(EngineConfig::parse("[model]\nsource = \"x\"\n[generation]\ntop_p = 0\n"));
    assert!(e.contains("top_p"), "{e}");
    let e = err_of(EngineConfig::parse("[model]\nsource = \"x\"\ndevice = \"tpu\"\n"));
    assert!(e.contains("tpu"), "{e}");
    let e = err_of(EngineConfig::parse("[mdoel]\nsource = \"x\"\n"));
    assert!(e.contains("mdoel"), "{e}");
    let e = err_of(EngineConfig::parse("[model]\nsource = \"x\"\ndtype = \"bf16\"\n"));
    assert!(e.contains("bf16 needs a CUDA device"), "{e}");
    let e = err_of(EngineConfig::parse("[model]\nsource = \"x\"\ndtype = \"fp8\"\n"));
    assert!(e.contains("fp8"), "{e}");
    // A deadline of now + u64::MAX seconds would overflow on the first request.
    let e =
        err_of(EngineConfig::parse("[model]\nsource = \"x\"\n[server]\nrequest_timeout_secs = 9223372036854775807\n"));
    assert!(e.contains("request_timeout_secs"), "{e}");
    let e =
        err_of(EngineConfig::parse("[model]\nsource = \"x\"\n[server]\nshutdown_grace_secs = 9223372036854775807\n"));
    assert!(e.contains("shutdown_grace_secs"), "{e}");
    assert!(EngineConfig::parse("[model]\nsource = \"x\"\n[server]\nrequest_timeout_secs = 86400\n").is_ok());
}

/// `[model] context` caps what one sequence may hold (a request past it is refused naming it);
/// 0, or more than the model serves, is refused naming the limit.
#[test]
fn model_context_caps_a_sequence_within_what_the_model_serves() {
    let text = |ctx: &str| {
        GOOD.replace(
            "source = \"x\"",
            &format!("source = {:?}\ncontext = {ctx}", fixture("qwen3_tiny").display().to_string()),
        )
    };
    let mut built = build_engine(&EngineConfig::parse(&text("16")).unwrap()).unwrap();
    assert_eq!(built.engine.model.config().max_position_embeddings, 16);
    let params = dms_integration::engine::GenParams::greedy(4, 0);
    assert_eq!(built.engine.generate(&[5; 12], &params, None).unwrap().tokens.len(), 4);
    let e = err_of(built.engine.generate(&[5; 13], &params, None));
    assert!(e.contains("context length (16 tokens)"), "{e}");
    for bad in ["0", "100000"] {
        let e = err_of(build_engine(&EngineConfig::parse(&text(bad)).unwrap()));
        assert!(e.contains("[model] context") && e.contains("1 to 512 tokens"), "{bad}: {e}");
    }
    let e = err_of(EngineConfig::parse(&text("-1")));
    assert!(e.contains("context"), "{e}");
}

#[test]
fn unknown_policy_lists_valid_names() {
    let mut cfg = EngineConfig::parse(&GOOD.replace("\"full\"", "\"fulll\"")).unwrap();
    cfg.model.source = fixture("qwen3_tiny").display().to_string();
    let e = err_of(build_engine(&cfg));
    assert!(e.contains("fulll") && e.contains("sliding_window") && e.contains("full"), "{e}");
}

#[test]
fn missing_model_is_named() {
    let cfg = EngineConfig::parse(&GOOD.replace("\"x\"", "\"/nonexistent/model.gguf\"")).unwrap();
    let e = err_of(build_engine(&cfg));
    assert!(e.contains("/nonexistent/model.gguf"), "{e}");
}

#[test]
fn truncated_and_corrupt_safetensors_are_reported() {
    let src = fixture("qwen3_tiny");
    let d = tmp_dir("st");
    std::fs::copy(src.join("config.json"), d.join("config.json")).unwrap();
    let bytes = std::fs::read(src.join("model.safetensors")).unwrap();
    std::fs::write(d.join("model.safetensors"), &bytes[..bytes.len() / 2]).unwrap();
    let e = err_of(load_model(&d, &Device::Cpu, WeightForm::Dense));
    assert!(e.contains("model.safetensors") && e.contains("truncated"), "{e}");
    std::fs::write(d.join("model.safetensors"), b"not a safetensors file at all").unwrap();
    let e = err_of(load_model(&d, &Device::Cpu, WeightForm::Dense));
    assert!(e.contains("not a valid safetensors"), "{e}");
}

#[test]
fn config_json_that_does_not_match_the_weights_is_reported() {
    let src = fixture("qwen3_tiny");
    let d = tmp_dir("mismatch");
    std::fs::copy(src.join("model.safetensors"), d.join("model.safetensors")).unwrap();
    let cfg = std::fs::read_to_string(src.join("config.json")).unwrap();
    std::fs::write(d.join("config.json"), cfg.replace("\"intermediate_size\": 128", "\"intermediate_size\": 256"))
        .unwrap();
    let e = err_of(load_model(&d, &Device::Cpu, WeightForm::Dense));
    assert!(e.contains("does not match") && e.contains("mlp"), "{e}");
    std::fs::write(
        d.join("config.json"),
        cfg.replace("\"model_type\": \"qwen3\"", "\"model_type\": \"gpt5\"").replace("Qwen3ForCausalLM", "Gpt5"),
    )
    .unwrap();
    let e = err_of(load_model(&d, &Device::Cpu, WeightForm::Dense));
    assert!(e.contains("unsupported architecture"), "{e}");
}

#[test]
fn truncated_and_corrupt_gguf_are_reported() {
    let gguf = dms_integration::assets::fetch(&dms_integration::assets::SMOLLM2_135M).unwrap();
    let d = tmp_dir("gguf");
    let bytes = std::fs::read(&gguf).unwrap();
    let cut = d.join("cut.gguf");
    std::fs::write(&cut, &bytes[..bytes.len() - 1000]).unwrap();
    let e = err_of(load_model(&cut, &Device::Cpu, WeightForm::Dense));
    assert!(e.contains("truncated") && e.contains("cut.gguf"), "{e}");
    let header_only = d.join("header.gguf");
    std::fs::write(&header_only, &bytes[..5000]).unwrap();
    let e = err_of(load_model(&header_only, &Device::Cpu, WeightForm::Dense));
    assert!(e.contains("header.gguf"), "{e}");
    let junk = d.join("junk.gguf");
    std::fs::write(&junk, b"GGUF\x03\x00\x00\x00garbage").unwrap();
    let e = err_of(load_model(&junk, &Device::Cpu, WeightForm::Dense));
    assert!(e.contains("junk.gguf") && e.contains("not a valid GGUF"), "{e}");
}

#[test]
fn out_of_vocabulary_prompt_ids_are_rejected() {
    let mut eng = common::engine(&fixture("qwen3_tiny"), "name = \"full\"", 4);
    let mut seq = eng.new_sequence();
    let e = err_of(eng.step(&mut seq, &[1, 9999], false));
    assert!(e.contains("9999") && e.contains("vocabulary"), "{e}");
}

#[test]
fn a_request_past_the_context_length_is_refused_up_front() {
    use dms_integration::engine::GenParams;
    // qwen3_tiny's max_position_embeddings is 512.
    let mut eng = common::engine(&fixture("qwen3_tiny"), "name = \"full\"", 4);
    let prompt: Vec<u32> = (0..500).map(|i| (i * 7 % 500) as u32).collect();
    let e = err_of(eng.generate(&prompt, &GenParams::greedy(13, 0), None));
    assert!(e.contains("context length") && e.contains("512") && e.contains("13 new tokens"), "{e}");
    let e = err_of(eng.generate(&prompt, &GenParams::greedy(usize::MAX, 0), None));
    assert!(e.contains("context length"), "{e}");
    let ok = eng.generate(&prompt, &GenParams::greedy(12, 0), None).expect("exactly the context length is served");
    assert_eq!(ok.tokens.len(), 12);
}

#[test]
fn retrofit_settings_that_would_panic_or_train_nan_are_named() {
    use dms_integration::retrofit::RetrofitSection;
    let base = "window = 4\ntarget_cr = 2.0\nsteps = 3\nramp_steps = 1\nseq_len = 32\nlr = 0.01\noutput = 'x'\n";
    let section = |extra: &str| -> RetrofitSection {
        toml::from_str::<toml::Table>(&format!("{base}{extra}")).unwrap().try_into().unwrap()
    };
    assert!(section("").validate().is_ok());
    for (extra, named) in [
        ("checkpoint_every = 0", "checkpoint_every"),
        ("alpha_offset = nan", "alpha_offset"),
        ("alpha_scale = inf", "alpha_scale"),
        ("tau = inf", "tau"),
        ("grad_clip = 0.0", "grad_clip"),
        ("betas = [0.9, 1.0]", "betas"),
        ("weight_decay = nan", "weight_decay"),
    ] {
        let e = err_of(section(extra).validate());
        assert!(e.contains(named), "{extra}: {e}");
    }
    let e = err_of(section("").validate().and(section("").validate()).and_then(|_| {
        let mut s = section("");
        s.lr = f64::INFINITY;
        s.validate()
    }));
    assert!(e.contains("lr"), "{e}");
}

#[test]
fn an_eval_file_with_a_zero_block_size_is_refused_before_anything_runs() {
    let good =
        std::fs::read_to_string(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/eval-smollm2.toml"))
            .unwrap();
    let d = tmp_dir("eval");
    let p = d.join("eval.toml");
    for (from, to) in [("block_size = 16", "block_size = 0"), ("block_size = 16", "block_size = 1000000")] {
        assert!(good.contains(from));
        std::fs::write(&p, good.replacen(from, to, 1)).unwrap();
        let e = err_of(dms_integration::harness::eval::EvalConfig::load(&p));
        assert!(e.contains("block_size"), "{e}");
    }
}

fn patched_config(fixture_name: &str, patch: serde_json::Value) -> anyhow::Result<dms_integration::model::ModelConfig> {
    let text = std::fs::read_to_string(fixture(fixture_name).join("config.json")).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
    for (k, x) in patch.as_object().unwrap() {
        v[k] = x.clone();
    }
    dms_integration::model::ModelConfig::from_hf_json(&v.to_string())
}

#[test]
fn llama3_rope_scaling_that_gives_nan_frequencies_is_refused() {
    assert!(patched_config("llama3_tiny", serde_json::json!({})).is_ok());
    for bad in [
        serde_json::json!({"factor": 0.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64, "rope_type": "llama3"}),
        serde_json::json!({"factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64, "rope_type": "llama3"}),
        serde_json::json!({"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 0, "rope_type": "llama3"}),
    ] {
        let e = err_of(patched_config("llama3_tiny", serde_json::json!({ "rope_scaling": bad })));
        assert!(e.contains("rope_scaling") && e.contains("high_freq_factor > low_freq_factor"), "{e}");
    }
}

/// A model's switched-on window is applied on its layers (the context stays the declared one);
/// an engine without per-layer windows serves the window as its context only where every layer
/// has it.
#[test]
fn a_switched_on_model_window_covers_its_layers() {
    let windows = |base: &str, patch| {
        let c = patched_config(base, patch).unwrap();
        let w = c.windows.as_ref().map(|w| (w.window(), w.layers().to_vec()));
        (c.max_position_embeddings, w, c.device_context())
    };
    assert_eq!(windows("qwen3_tiny", serde_json::json!({})), (512, None, Some(512)));
    // Qwen ships a window that is off unless `use_sliding_window` says otherwise.
    let off = serde_json::json!({"sliding_window": 64, "use_sliding_window": false});
    assert_eq!(windows("qwen3_tiny", off), (512, None, Some(512)));
    // The window covers the layers from `max_window_layers` on, unless `layer_types` (which
    // transformers 4.5x writes, and then reads instead) says which.
    let qwen = |window: serde_json::Value, from: usize| {
        serde_json::json!({"sliding_window": window, "use_sliding_window": true, "max_window_layers": from,
            "layer_types": null})
    };
    assert_eq!(windows("qwen3_tiny", qwen(64.into(), 1)), (512, Some((64, vec![false, true])), None));
    assert_eq!(windows("qwen3_tiny", qwen(64.into(), 0)), (512, Some((64, vec![true, true])), Some(64)));
    assert_eq!(windows("qwen3_tiny", qwen(64.into(), 2)), (512, None, Some(512)));
    assert_eq!(windows("qwen3_tiny", qwen(serde_json::Value::Null, 0)), (512, None, Some(512)));
    let mut typed = qwen(64.into(), 2);
    typed["layer_types"] = serde_json::json!(["sliding_attention", "full_attention"]);
    assert_eq!(windows("qwen3_tiny", typed), (512, Some((64, vec![true, false])), None));
    // The fixture's own `layer_types` (both full) win over `max_window_layers`.
    let saved = serde_json::json!({"sliding_window": 64, "use_sliding_window": true, "max_window_layers": 0});
    assert_eq!(windows("qwen3_tiny", saved), (512, None, Some(512)));
    // Mistral's is on whenever it is a number, on every layer.
    let mistral =
        serde_json::json!({"model_type": "mistral", "architectures": ["MistralForCausalLM"], "sliding_window": 100});
    assert_eq!(windows("llama3_tiny", mistral), (512, Some((100, vec![true, true])), Some(100)));
    let mistral =
        serde_json::json!({"model_type": "mistral", "architectures": ["MistralForCausalLM"], "sliding_window": null});
    assert_eq!(windows("llama3_tiny", mistral), (512, None, Some(512)));
    // An absent key is transformers' MistralConfig default, 4096; null is no window.
    let long = |window: Option<serde_json::Value>| {
        let mut patch = serde_json::json!({"model_type": "mistral", "architectures": ["MistralForCausalLM"],
            "max_position_embeddings": 32768});
        if let Some(w) = window {
            patch["sliding_window"] = w;
        }
        let c = patched_config("llama3_tiny", patch).unwrap();
        (c.max_position_embeddings, c.windows.map(|w| w.window()))
    };
    assert_eq!(long(None), (32768, Some(4096)));
    assert_eq!(long(Some(serde_json::Value::Null)), (32768, None));
    // A window no shorter than the context hides nothing; one beyond what a policy can hold is
    // refused.
    let huge = serde_json::json!({"model_type": "mistral", "architectures": ["MistralForCausalLM"],
        "sliding_window": 4294967296u64});
    assert_eq!(windows("llama3_tiny", huge), (512, None, Some(512)));
    let beyond = serde_json::json!({"model_type": "mistral", "architectures": ["MistralForCausalLM"],
        "sliding_window": 33554432, "max_position_embeddings": 67108864});
    let e = err_of(patched_config("llama3_tiny", beyond));
    assert!(e.contains("sliding_window") && e.contains("33554432"), "{e}");
}

#[test]
fn an_adapter_beside_a_query_neuron_checkpoint_is_refused() {
    let neuron = fixture("qwen3_dms_tiny/variant_query_neuron/model");
    let mut loaded = load_model(&neuron, &Device::Cpu, WeightForm::Dense).unwrap();
    let separate = fixture("qwen3_dms_tiny/variant_separate_alpha/model");
    let adapter_weights = dms_integration::model::Weights::open_safetensors_dir(&separate).unwrap();
    let e = err_of(loaded.model.attach_adapter("b", &adapter_weights, false, false));
    assert!(e.contains("query neuron") && e.contains("`b`"), "{e}");
    let mut own_weights = load_model(&separate, &Device::Cpu, WeightForm::Dense).unwrap();
    assert!(own_weights.model.attach_adapter("b", &adapter_weights, false, false).is_ok());
}

/// A sharded checkpoint loads the shards its `model.safetensors.index.json` lists, and only
/// those: the same logits as the single file, a stray `.safetensors` beside them (Mistral's
/// `consolidated.safetensors`) not read, and a listed shard that is missing or an index that
/// is malformed named.
#[test]
fn sharded_checkpoints_load_the_shards_their_index_lists() {
    use candle_core::Tensor;
    let src = fixture("qwen3_tiny");
    let dir = tmp_dir("sharded");
    std::fs::copy(src.join("config.json"), dir.join("config.json")).unwrap();
    let all = candle_core::safetensors::load(src.join("model.safetensors"), &Device::Cpu).unwrap();
    let (mut first, mut second) = (std::collections::HashMap::new(), std::collections::HashMap::new());
    let mut map = serde_json::Map::new();
    for (i, (name, t)) in all.iter().enumerate() {
        let file = if i % 2 == 0 { "model-00001-of-00002.safetensors" } else { "model-00002-of-00002.safetensors" };
        if i % 2 == 0 { &mut first } else { &mut second }.insert(name.clone(), t.clone());
        map.insert(name.clone(), file.into());
    }
    candle_core::safetensors::save(&first, dir.join("model-00001-of-00002.safetensors")).unwrap();
    candle_core::safetensors::save(&second, dir.join("model-00002-of-00002.safetensors")).unwrap();
    let index = serde_json::json!({"metadata": {"total_size": 0}, "weight_map": map});
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
    // A stray file whose tensors would clash: an embedding of zeros.
    let stray: std::collections::HashMap<String, Tensor> = [(
        "model.embed_tokens.weight".to_string(),
        Tensor::zeros(all["model.embed_tokens.weight"].dims(), candle_core::DType::F32, &Device::Cpu).unwrap(),
    )]
    .into();
    candle_core::safetensors::save(&stray, dir.join("consolidated.safetensors")).unwrap();
    let logits = |d: &std::path::Path| {
        let m = load_model(d, &Device::Cpu, WeightForm::Dense).unwrap();
        let table: toml::Table = toml::from_str("name = \"full\"").unwrap();
        let policy = dms_policy::Registry::with_builtins().build(&table).unwrap();
        let mut eng = dms_integration::engine::Engine::new(m.model, policy, 4, 1 << 12).unwrap();
        let mut seq = eng.new_sequence();
        eng.step(&mut seq, &[5, 9, 300, 41], true).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap()
    };
    assert_eq!(logits(&dir), logits(&src), "the shards the index lists, and not the stray file");
    std::fs::remove_file(dir.join("model-00002-of-00002.safetensors")).unwrap();
    let e = err_of(load_model(&dir, &Device::Cpu, WeightForm::Dense));
    assert!(e.contains("lists shard model-00002-of-00002.safetensors, which is not in"), "{e}");
    std::fs::write(dir.join("model.safetensors.index.json"), "{\"weight_map\": {\"a\": \"../x.safetensors\"}}")
        .unwrap();
    let e = err_of(load_model(&dir, &Device::Cpu, WeightForm::Dense));
    assert!(e.contains("tensor `a` maps to \"../x.safetensors\", not a file name"), "{e}");
    std::fs::write(dir.join("model.safetensors.index.json"), "{\"weight_map\": 3").unwrap();
    let e = err_of(load_model(&dir, &Device::Cpu, WeightForm::Dense));
    assert!(e.contains("model.safetensors.index.json is not valid JSON"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}
