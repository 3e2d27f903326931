//! Models with their own attention windows: Gemma 3 (five local layers of window 8 with their
//! own RoPE base, then a global one) and Gemma 2 (local layers every other one, soft-capped
//! scores and logits) against float64 references of transformers' models and against llama.cpp,
//! from their HF directories, a multimodal checkpoint's names and the converter's GGUF; and
//! Mistral's window on every layer against the `sliding_window` policy on the same weights.

mod common;
use common::*;

use dms_integration::engine::{argmax, load_model};
use dms_integration::model::WeightForm;

/// A random Gemma 3 (`fixtures/gguf/gemma3_tiny`, `gemma3.gguf`; written by `generate.py`)
/// gives the float64 reference's logits (1e-4) and llama.cpp's (within the 1.1e-3 that
/// llama.cpp's table of f16 GELU values lies from the reference), fed whole or in chunks of 7;
/// its local layers keep exactly their last 8 tokens, the global one every token.
#[test]
fn gemma3_matches_the_reference_and_llama_cpp_from_its_hf_directory_and_gguf() {
    for model in [fixture("gguf/gemma3_tiny"), fixture("gguf/gemma3.gguf")] {
        follow("gguf/gemma3_llama_cpp.safetensors", &model, 0, 3e-3);
        follow("gguf/gemma3_reference.safetensors", &model, 7, 1e-4);
        let (eng, seq) = follow("gguf/gemma3_reference.safetensors", &model, 0, 1e-4);
        // 40 prompt tokens and 8 fed in decode steps.
        for layer in 0..6 {
            let want: Vec<u32> = if layer < 5 { (40..48).collect() } else { (0..48).collect() };
            for row in seq.kept_positions(layer, &eng.store) {
                assert_eq!(row, want, "{model:?}: layer {layer}");
            }
        }
        let cfg = eng.model.config();
        assert_eq!(cfg.device_context(), None, "some layers are windowed, some are not");
        assert_eq!(cfg.max_position_embeddings, 512);
        // `[model] context` no longer than the window: the window hides nothing and is dropped,
        // as at load; one token longer keeps it.
        let mut cfg = cfg.clone();
        cfg.set_context(9).unwrap();
        assert_eq!(cfg.device_context(), None);
        cfg.set_context(8).unwrap();
        assert_eq!((cfg.windows.as_ref(), cfg.device_context()), (None, Some(8)));
    }
}

/// A random Gemma 2 (`fixtures/gguf/gemma2_tiny`, `gemma2.gguf`; written by `generate.py`: the
/// even layers local with window 8, scores capped at 0.5 and logits at 1.5, caps that move the
/// reference by more than 0.05 each) gives the float64 reference's logits and llama.cpp's, fed
/// whole or in chunks of 7 (prompt tiles, then decode steps); its local rows keep their last 8
/// tokens.
#[test]
fn gemma2_matches_the_reference_and_llama_cpp_from_its_hf_directory_and_gguf() {
    for model in [fixture("gguf/gemma2_tiny"), fixture("gguf/gemma2.gguf")] {
        follow("gguf/gemma2_llama_cpp.safetensors", &model, 0, 3e-3);
        follow("gguf/gemma2_reference.safetensors", &model, 7, 1e-4);
        let (eng, seq) = follow("gguf/gemma2_reference.safetensors", &model, 0, 1e-4);
        for layer in 0..4 {
            let want: Vec<u32> = if layer % 2 == 0 { (40..48).collect() } else { (0..48).collect() };
            for row in seq.kept_positions(layer, &eng.store) {
                assert_eq!(row, want, "{model:?}: layer {layer}");
            }
        }
        let g = eng.model.config().gemma.clone().unwrap();
        assert_eq!((g.attn_softcap, g.final_softcap, g.local_rope_theta), (Some(0.5), Some(1.5), None));
    }
}

/// A multimodal Gemma 3 (`Gemma3ForConditionalGeneration`: the decoder's settings in
/// `text_config`, its tensors under `language_model.model.` or `model.language_model.`) loads
/// as its text model.
#[test]
fn a_multimodal_gemma3_checkpoint_loads_its_language_model() {
    let tensors =
        candle_core::safetensors::load(fixture("gguf/gemma3_tiny/model.safetensors"), &candle_core::Device::Cpu)
            .unwrap();
    let text: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("gguf/gemma3_tiny/config.json")).unwrap()).unwrap();
    for prefix in ["language_model.model.", "model.language_model."] {
        let dir = std::env::temp_dir().join(format!("dms-gemma3-mm-{}-{}", std::process::id(), prefix.len()));
        std::fs::create_dir_all(&dir).unwrap();
        let renamed: std::collections::HashMap<String, candle_core::Tensor> = tensors
            .iter()
            .map(|(k, v)| (format!("{prefix}{}", k.strip_prefix("model.").unwrap()), v.clone()))
            .chain([(
                "vision_tower.patch.weight".to_string(),
                candle_core::Tensor::zeros(4, candle_core::DType::F32, &candle_core::Device::Cpu).unwrap(),
            )])
            .collect();
        candle_core::safetensors::save(&renamed, dir.join("model.safetensors")).unwrap();
        let config = serde_json::json!({
            "architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3",
            "text_config": text, "vision_config": {"hidden_size": 8}, "mm_tokens_per_image": 256,
        });
        std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
        follow("gguf/gemma3_reference.safetensors", &dir, 0, 1e-4);
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// What the runtime does not do is refused by name: other activations, a `layer_types` list of
/// the wrong length, a soft-capping that is not positive.
#[test]
fn gemma_settings_the_runtime_does_not_run_are_refused() {
    let dir = std::env::temp_dir().join(format!("dms-gemma3-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(fixture("gguf/gemma3_tiny/model.safetensors"), dir.join("model.safetensors")).unwrap();
    let text = std::fs::read_to_string(fixture("gguf/gemma3_tiny/config.json")).unwrap();
    let load = |key: &str, value: serde_json::Value| {
        let mut config: serde_json::Value = serde_json::from_str(&text).unwrap();
        config[key] = value;
        std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
        load_model(&dir, &candle_core::Device::Cpu, WeightForm::Dense)
    };
    let refused = |key: &str, value: serde_json::Value, words: &[&str]| {
        let e = format!("{:#}", load(key, value).err().unwrap_or_else(|| panic!("{key} accepted")));
        assert!(words.iter().all(|w| e.contains(w)), "{key}: {e}");
    };
    refused("attn_logit_softcapping", serde_json::json!(0.0), &["attn_logit_softcapping must be positive"]);
    refused("final_logit_softcapping", serde_json::json!(-30.0), &["final_logit_softcapping must be positive"]);
    refused("hidden_activation", serde_json::json!("silu"), &["hidden_activation", "silu"]);
    refused("layer_types", serde_json::json!(["full_attention"]), &["layer_types", "1 entries for 6 layers"]);
    refused("layer_types", serde_json::json!(vec!["chunked_attention"; 6]), &["chunked_attention"]);
    // `layer_types` says which layers are windowed: all of them here, so the model is no longer
    // the fixture's (its sixth layer is global).
    let all_local = load("layer_types", serde_json::json!(vec!["sliding_attention"; 6])).unwrap();
    assert_eq!(all_local.model.config().windows.as_ref().unwrap().layers(), [true; 6]);
    assert_eq!(all_local.model.config().device_context(), Some(8));
    let _ = std::fs::remove_dir_all(&dir);
}

/// A Gemma GGUF's own metadata is read as llama.cpp reads it: `attention.sliding_window_pattern`
/// as a period or one flag per layer, a `gemma3` file's `rope.freq_base_swa` and
/// `final_logit_softcapping`, a `gemma2` file's caps defaulting to 50 and 30 when absent; a
/// `gemma2` file whose local layers have their own RoPE base, a pattern of the wrong length and
/// a negative cap are refused by name.
#[test]
fn gemma_gguf_metadata_is_read_as_llama_cpp_reads_it() {
    use candle_core::quantized::gguf_file::Value;
    let load = |file: &str, edit: &dyn Fn(&mut OwnedMeta)| {
        let (mut meta, tensors) = fixture_gguf_parts(file);
        edit(&mut meta);
        let path = std::env::temp_dir().join(format!("dms-gemma-meta-{}-{file}", std::process::id()));
        std::fs::write(&path, gguf_file_bytes(&meta, &tensors)).unwrap();
        let loaded = load_model(&path, &candle_core::Device::Cpu, WeightForm::Dense);
        let _ = std::fs::remove_file(&path);
        loaded.map(|m| m.model.config().clone())
    };
    let set = |key: &str, value: Value| {
        let key = key.to_string();
        move |meta: &mut OwnedMeta| {
            meta.retain(|(k, _)| *k != key);
            meta.push((key.clone(), value.clone()));
        }
    };
    let local = |c: &dms_integration::model::ModelConfig| c.gemma.as_ref().unwrap().local_layers.clone();
    let c = load("gemma2.gguf", &set("gemma2.attention.sliding_window_pattern", Value::U32(4))).unwrap();
    assert_eq!(local(&c), [true, true, true, false]);
    assert_eq!(c.windows.unwrap().layers(), [true, true, true, false]);
    let flags = Value::Array([false, true, false, true].map(Value::Bool).to_vec());
    assert_eq!(
        local(&load("gemma2.gguf", &set("gemma2.attention.sliding_window_pattern", flags)).unwrap()),
        [false, true, false, true]
    );
    let refused = |file: &str, edit: &dyn Fn(&mut OwnedMeta), words: &[&str]| {
        let e = format!("{:#}", load(file, edit).err().unwrap_or_else(|| panic!("{words:?}: accepted")));
        assert!(words.iter().all(|w| e.contains(w)), "{e}");
    };
    let three = Value::Array(vec![Value::Bool(true); 3]);
    refused("gemma2.gguf", &set("gemma2.attention.sliding_window_pattern", three), &["3 flags for 4 layers"]);
    refused("gemma2.gguf", &set("gemma2.rope.freq_base_swa", Value::F32(20_000.0)), &["freq_base_swa", "20000"]);
    assert!(load("gemma2.gguf", &set("gemma2.rope.freq_base_swa", Value::F32(10_000.0))).is_ok());
    refused("gemma2.gguf", &set("gemma2.attn_logit_softcapping", Value::F32(-1.0)), &["attn_logit_softcapping", "-1"]);
    refused("gemma2.gguf", &set("gemma2.attention.sliding_window", Value::U32(0)), &["sliding_window` is 0"]);
    let no_caps = |meta: &mut OwnedMeta| meta.retain(|(k, _)| !k.ends_with("softcapping"));
    let g = load("gemma2.gguf", &no_caps).unwrap().gemma.unwrap();
    assert_eq!((g.attn_softcap, g.final_softcap), (Some(50.0), Some(30.0)));
    let g = load("gemma3.gguf", &set("gemma3.rope.freq_base_swa", Value::F32(20_000.0))).unwrap().gemma.unwrap();
    assert_eq!((g.local_rope_theta, g.attn_softcap, g.final_softcap), (Some(20_000.0), None, None));
    let g = load("gemma3.gguf", &set("gemma3.final_logit_softcapping", Value::F32(2.0))).unwrap().gemma.unwrap();
    assert_eq!(g.final_softcap, Some(2.0));
}

/// Mistral's `sliding_window` on every layer (no longer a cap on the context): the tiny Llama 3's
/// weights as a Mistral with a window of 6 give under the full cache exactly what the same
/// weights without a window give under the `sliding_window` policy of 6 (an independently
/// tested policy), prompt whole or in chunks, through decode steps; the windowed rows hold 6
/// tokens. Under a policy that evicts, a key is visible while both the policy and the window
/// allow it.
#[test]
fn mistrals_window_is_the_sliding_window_policy_on_every_layer() {
    let dir = std::env::temp_dir().join(format!("dms-mistral-window-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(fixture("llama3_tiny/model.safetensors"), dir.join("model.safetensors")).unwrap();
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("llama3_tiny/config.json")).unwrap()).unwrap();
    config["architectures"] = serde_json::json!(["MistralForCausalLM"]);
    config["model_type"] = serde_json::json!("mistral");
    let run = |window: serde_json::Value, policy: &str, chunk: usize| {
        let mut c = config.clone();
        c["sliding_window"] = window;
        std::fs::write(dir.join("config.json"), c.to_string()).unwrap();
        let mut eng = engine(&dir, policy, 4);
        let mut seq = eng.new_sequence();
        let prompt = seeded_tokens(3, 23);
        let mut logits = vec![eng.prefill(&mut seq, &prompt, chunk).unwrap()];
        for _ in 0..5 {
            let next = argmax(logits.last().unwrap());
            logits.push(eng.step(&mut seq, &[next], false).unwrap().squeeze(0).unwrap().to_vec1().unwrap());
        }
        let kept = seq.kept_positions(1, &eng.store);
        (logits, kept, eng.model.config().max_position_embeddings)
    };
    let (want, want_kept, _) = run(serde_json::Value::Null, "name = \"sliding_window\"\nwindow = 6", 0);
    assert_eq!(want_kept[0], (22..28).collect::<Vec<u32>>());
    for chunk in [0, 5] {
        let (got, kept, context) = run(serde_json::json!(6), "name = \"full\"", chunk);
        assert_eq!(kept, want_kept, "chunk {chunk}");
        assert_eq!(context, 512, "the window no longer caps the context");
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!(max_abs(g, w) < 1e-5, "chunk {chunk}, step {i}: {}", max_abs(g, w));
        }
    }
    // A policy that evicts runs on the windowed rows too, each key visible while both allow it:
    // a policy window of 4 inside the model's 6 is that window alone, one of 10 is the model's,
    // and its rows hold only what the next query may still see (positions 23..28 of 28), not
    // the 10 the policy keeps.
    for (policy, alone) in [(4, 4), (10, 6)] {
        let (want, _, _) = run(serde_json::Value::Null, &format!("name = \"sliding_window\"\nwindow = {alone}"), 0);
        for chunk in [0, 5] {
            let (got, kept, _) =
                run(serde_json::json!(6), &format!("name = \"sliding_window\"\nwindow = {policy}"), chunk);
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert!(max_abs(g, w) < 1e-5, "policy {policy}, chunk {chunk}, step {i}: {}", max_abs(g, w));
            }
            if policy == 10 {
                assert!(kept.iter().all(|row| *row == (23..28).collect::<Vec<u32>>()), "chunk {chunk}: {kept:?}");
            }
        }
    }
    // Without the window the model attends further back: the comparison can fail.
    let (unwindowed, _, _) = run(serde_json::Value::Null, "name = \"full\"", 0);
    assert!(max_abs(&unwindowed[3], &want[3]) > 1e-3, "the window changes nothing on this prompt");
    let _ = std::fs::remove_dir_all(&dir);
}
