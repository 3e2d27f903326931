//! Llama's block with a family's own changes, each against a float64 transcription of
//! transformers' model and llama.cpp, from its HF directory and the converter's GGUF: SmolLM3's
//! layers without RoPE and Granite's multipliers.

mod common;
use common::*;
use dms_integration::model::WeightForm;

/// A random SmolLM3 (`fixtures/gguf/smollm3_tiny`, `smollm3.gguf`; written by `generate.py`:
/// its fourth layer without RoPE, which moves the reference by more than 0.05) gives the float64
/// reference's logits and llama.cpp's, from its HF directory and its GGUF (q/k rows permuted),
/// fed whole or in chunks of 7; the dense training forward (the retrofit's) gives them too.
#[test]
fn smollm3_layers_without_rope_match_the_reference_and_llama_cpp() {
    for model in [fixture("gguf/smollm3_tiny"), fixture("gguf/smollm3.gguf")] {
        follow("gguf/smollm3_llama_cpp.safetensors", &model, 0, 1e-4);
        follow("gguf/smollm3_reference.safetensors", &model, 7, 1e-4);
        let (eng, _) = follow("gguf/smollm3_reference.safetensors", &model, 0, 1e-4);
        assert_eq!(eng.model.config().nope_layers, [false, false, false, true]);
        // A plain Llama folder (what peers are handed) would drop the layers without RoPE.
        let out = std::env::temp_dir().join(format!("dms-smollm3-export-{}", std::process::id()));
        let e = dms_integration::assets::export::export_gguf_as_hf(&fixture("gguf/smollm3.gguf"), &out).unwrap_err();
        assert!(format!("{e:#}").contains("without RoPE"), "{e:#}");
        let g = golden(&fixture("gguf/smollm3_reference.safetensors"));
        let dense = eng.model.dense_forward(&ids(&g["prompt_ids"]), None).unwrap().logits.to_vec2::<f32>().unwrap();
        for (t, (got, want)) in dense.iter().zip(g["prompt_logits"].to_vec2::<f32>().unwrap()).enumerate() {
            assert!(max_abs(got, &want) < 1e-4, "{model:?}: dense forward, position {t}: {}", max_abs(got, &want));
        }
    }
}

/// SmolLM3's `no_rope_layers` is read as transformers reads it (1 rotates, 0 does not; absent,
/// every `no_rope_layer_interval`-th layer goes without); malformed lists, the keys on another
/// family and a sliding window on SmolLM3 are refused by name.
#[test]
fn smollm3_no_rope_layers_are_read_and_checked() {
    let text = std::fs::read_to_string(fixture("gguf/smollm3_tiny/config.json")).unwrap();
    let read = |edit: &dyn Fn(&mut serde_json::Value)| {
        let mut c: serde_json::Value = serde_json::from_str(&text).unwrap();
        edit(&mut c);
        dms_integration::model::ModelConfig::from_hf_json(&c.to_string())
    };
    let c = read(&|c| {
        c.as_object_mut().unwrap().remove("no_rope_layers");
        c["no_rope_layer_interval"] = serde_json::json!(2);
    })
    .unwrap();
    assert_eq!(c.nope_layers, [false, true, false, true]);
    // transformers' SmolLM3Config defaults where config.json is silent.
    let c = read(&|c| {
        let o = c.as_object_mut().unwrap();
        o.remove("rope_theta");
        o.remove("tie_word_embeddings");
    })
    .unwrap();
    assert_eq!((c.rope_theta, c.tie_word_embeddings), (2e6, true));
    for (edit, words) in [
        (
            &(|c: &mut serde_json::Value| c["no_rope_layers"] = serde_json::json!([1, 1, 0]))
                as &dyn Fn(&mut serde_json::Value),
            "3 entries for 4 layers",
        ),
        (&|c: &mut serde_json::Value| c["no_rope_layers"] = serde_json::json!([1, 2, 1, 0]), "0 or 1, not 2"),
        (&|c: &mut serde_json::Value| c["use_sliding_window"] = serde_json::json!(true), "use_sliding_window"),
        (
            &|c: &mut serde_json::Value| {
                c["sliding_window"] = serde_json::json!(8);
                c["layer_types"] =
                    serde_json::json!(["full_attention", "sliding_attention", "full_attention", "full_attention"]);
            },
            "sliding_attention",
        ),
        (&|c: &mut serde_json::Value| c["mlp_bias"] = serde_json::json!(true), "mlp_bias"),
        (&|c: &mut serde_json::Value| c["model_type"] = serde_json::json!("llama"), "SmolLM3"),
    ] {
        let edit_arch = |c: &mut serde_json::Value| {
            edit(c);
            if c["model_type"] == "llama" {
                c["architectures"] = serde_json::json!(["LlamaForCausalLM"]);
            }
        };
        let e = format!("{:#}", read(&edit_arch).unwrap_err());
        assert!(e.contains(words), "{e}");
    }
}

/// A random Granite (`fixtures/gguf/granite_tiny`, `granite.gguf`; written by `generate.py`:
/// embeddings x 12, residual branches x 0.22, an attention scale of 0.1 and logits / 4, each of
/// which moves the reference by more than 0.05) gives the float64 reference's logits and
/// llama.cpp's, from its HF directory and its GGUF (the multipliers as llama.cpp's keys), fed
/// whole or in chunks of 7.
#[test]
fn granite_multipliers_match_the_reference_and_llama_cpp() {
    for model in [fixture("gguf/granite_tiny"), fixture("gguf/granite.gguf")] {
        follow("gguf/granite_llama_cpp.safetensors", &model, 0, 1e-4);
        follow("gguf/granite_reference.safetensors", &model, 7, 1e-4);
        let (eng, _) = follow("gguf/granite_reference.safetensors", &model, 0, 1e-4);
        let g = eng.model.config().granite.unwrap();
        assert_eq!(
            (g.embedding as f32, g.residual as f32, g.attention as f32, g.logits as f32),
            (12.0, 0.22, 0.1, 4.0)
        );
    }
}

/// Granite's multipliers are read as transformers reads them (1 where absent) and checked; the
/// keys on another family and an MLP with biases are refused by name; a GGUF's `attention.scale` of 0 is the head width's and `rope.scaling.finetuned = false`
/// switches RoPE off on every layer, as in llama.cpp.
#[test]
fn granite_settings_are_read_and_checked() {
    use candle_core::quantized::gguf_file::Value;
    let text = std::fs::read_to_string(fixture("gguf/granite_tiny/config.json")).unwrap();
    let read = |edit: &dyn Fn(&mut serde_json::Value)| {
        let mut c: serde_json::Value = serde_json::from_str(&text).unwrap();
        edit(&mut c);
        dms_integration::model::ModelConfig::from_hf_json(&c.to_string())
    };
    let g = read(&|c| {
        c.as_object_mut().unwrap().remove("logits_scaling");
    })
    .unwrap()
    .granite
    .unwrap();
    assert_eq!((g.embedding, g.logits), (12.0, 1.0));
    let refused = |edit: &dyn Fn(&mut serde_json::Value), words: &str| {
        let e = format!("{:#}", read(edit).unwrap_err());
        assert!(e.contains(words), "{e}");
    };
    refused(&|c| c["residual_multiplier"] = serde_json::json!(0.0), "residual_multiplier must be positive");
    refused(&|c| c["mlp_bias"] = serde_json::json!(true), "mlp_bias");
    refused(
        &|c| {
            c["model_type"] = serde_json::json!("llama");
            c["architectures"] = serde_json::json!(["LlamaForCausalLM"]);
        },
        "Granite",
    );

    let load = |edit: &dyn Fn(&mut OwnedMeta)| {
        let (mut meta, tensors) = fixture_gguf_parts("granite.gguf");
        edit(&mut meta);
        let path = std::env::temp_dir().join(format!("dms-granite-meta-{}.gguf", std::process::id()));
        std::fs::write(&path, gguf_file_bytes(&meta, &tensors)).unwrap();
        let loaded = dms_integration::engine::load_model(&path, &candle_core::Device::Cpu, WeightForm::Dense);
        let _ = std::fs::remove_file(&path);
        loaded.map(|m| m.model.config().clone())
    };
    let set = |key: &'static str, value: Value| {
        move |meta: &mut OwnedMeta| {
            meta.retain(|(k, _)| k != key);
            meta.push((key.to_string(), value.clone()));
        }
    };
    let c = load(&set("granite.attention.scale", Value::F32(0.0))).unwrap();
    assert_eq!(c.granite.unwrap().attention, 0.25);
    let c = load(&set("granite.rope.scaling.finetuned", Value::Bool(false))).unwrap();
    assert_eq!(c.nope_layers, [true; 4]);
    let e = format!("{:#}", load(&set("granite.block_count", Value::U32(u32::MAX))).unwrap_err());
    assert!(e.contains("block_count") && e.contains("4294967295"), "{e}");
    let e = format!("{:#}", load(&set("granite.logit_scale", Value::F32(-4.0))).unwrap_err());
    assert!(e.contains("granite.logit_scale") && e.contains("positive"), "{e}");
    // MLP biases, which llama.cpp would read and the MLP here has not, are refused.
    let (meta, mut tensors) = fixture_gguf_parts("granite.gguf");
    let zeros = candle_core::Tensor::zeros(64, candle_core::DType::F32, &candle_core::Device::Cpu).unwrap();
    tensors.push((
        "blk.0.ffn_down.bias".into(),
        candle_core::quantized::QTensor::quantize(&zeros, candle_core::quantized::GgmlDType::F32).unwrap(),
    ));
    let path = std::env::temp_dir().join(format!("dms-granite-bias-{}.gguf", std::process::id()));
    std::fs::write(&path, gguf_file_bytes(&meta, &tensors)).unwrap();
    let e = format!(
        "{:#}",
        dms_integration::engine::load_model(&path, &candle_core::Device::Cpu, WeightForm::Dense).err().unwrap()
    );
    let _ = std::fs::remove_file(&path);
    assert!(e.contains("blk.0.ffn_down.bias") && e.contains("MLP biases"), "{e}");
}

/// An `o_proj` bias is read wherever the checkpoint has one (transformers' Llama with
/// `attention_bias`): a zero bias on the last layer changes nothing, a bias of ones changes the
/// logits at every position.
#[test]
fn an_o_proj_bias_in_the_checkpoint_is_applied() {
    let src = fixture("llama3_tiny");
    let mut tensors = candle_core::safetensors::load(src.join("model.safetensors"), &candle_core::Device::Cpu).unwrap();
    let config = std::fs::read_to_string(src.join("config.json")).unwrap();
    let hidden = tensors["model.layers.0.self_attn.o_proj.weight"].dim(0).unwrap();
    let layers: usize =
        (0..).take_while(|i| tensors.contains_key(&format!("model.layers.{i}.input_layernorm.weight"))).count();
    let prompt = seeded_tokens(5, 12);
    let run = |tensors: &std::collections::HashMap<String, candle_core::Tensor>, name: &str| {
        let dir = std::env::temp_dir().join(format!("dms-o-bias-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("config.json"), &config).unwrap();
        candle_core::safetensors::save(tensors, dir.join("model.safetensors")).unwrap();
        let mut eng = engine(&dir, "name = \"full\"", 4);
        let mut seq = eng.new_sequence();
        let logits = eng.step(&mut seq, &prompt, true).unwrap().to_vec2::<f32>().unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        logits
    };
    let plain = run(&tensors, "plain");
    let bias = format!("model.layers.{}.self_attn.o_proj.bias", layers - 1);
    tensors.insert(
        bias.clone(),
        candle_core::Tensor::zeros(hidden, candle_core::DType::F32, &candle_core::Device::Cpu).unwrap(),
    );
    let zero = run(&tensors, "zero");
    for (a, b) in plain.iter().zip(&zero) {
        assert!(max_abs(a, b) < 1e-6, "a zero bias moved the logits by {}", max_abs(a, b));
    }
    tensors
        .insert(bias, candle_core::Tensor::ones(hidden, candle_core::DType::F32, &candle_core::Device::Cpu).unwrap());
    let ones = run(&tensors, "ones");
    assert!(plain.iter().zip(&ones).all(|(a, b)| max_abs(a, b) > 1e-3), "a bias of ones was not applied");
}

/// llama.cpp's converter permutes q/k biases as it permutes q/k rows (`LlamaModel`, and so
/// `smollm3` and `granite` files): the tiny Llama 3 with random q/k/v biases gives the same logits
/// from its HF directory and from its GGUF with the biases laid out as the converter lays them.
#[test]
fn permuted_gguf_files_carry_their_q_k_biases_permuted_too() {
    use candle_core::{Device, Tensor};
    let (heads, kv_heads, layers) = (4, 2, 2);
    let src = fixture("llama3_tiny");
    let mut hf = candle_core::safetensors::load(src.join("model.safetensors"), &Device::Cpu).unwrap();
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    assert_eq!(
        (config["num_attention_heads"].as_u64(), config["num_key_value_heads"].as_u64()),
        (Some(heads), Some(kv_heads))
    );
    config["attention_bias"] = serde_json::json!(true);
    let (mut meta, mut gguf) = fixture_gguf_parts("llama3_tiny.gguf");
    // The converter's permutation: per head, the two halves interleaved.
    let permute = |b: &Tensor, n: usize| {
        let len = b.dims1().unwrap();
        b.reshape((n, 2, len / n / 2)).unwrap().transpose(1, 2).unwrap().contiguous().unwrap().reshape(len).unwrap()
    };
    for layer in 0..layers {
        for (proj, gguf_name, n) in
            [("q_proj", "attn_q", Some(heads)), ("k_proj", "attn_k", Some(kv_heads)), ("v_proj", "attn_v", None)]
        {
            let rows = hf[&format!("model.layers.{layer}.self_attn.{proj}.weight")].dim(0).unwrap();
            let bias = Tensor::new(vecf(40 + layer as u64 * 3 + rows as u64, rows), &Device::Cpu).unwrap();
            let laid = n.map_or(bias.clone(), |n| permute(&bias, n as usize));
            gguf.push((
                format!("blk.{layer}.{gguf_name}.bias"),
                candle_core::quantized::QTensor::quantize(&laid, candle_core::quantized::GgmlDType::F32).unwrap(),
            ));
            hf.insert(format!("model.layers.{layer}.self_attn.{proj}.bias"), bias);
        }
    }
    meta.sort_by(|a, b| a.0.cmp(&b.0));
    let dir = std::env::temp_dir().join(format!("dms-qk-bias-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    candle_core::safetensors::save(&hf, dir.join("model.safetensors")).unwrap();
    let gguf_path = std::env::temp_dir().join(format!("dms-qk-bias-{}.gguf", std::process::id()));
    std::fs::write(&gguf_path, gguf_file_bytes(&meta, &gguf)).unwrap();
    let prompt = seeded_tokens(7, 14);
    let logits = |model: &std::path::Path| {
        let mut eng = engine(model, "name = \"full\"", 4);
        let mut seq = eng.new_sequence();
        eng.step(&mut seq, &prompt, true).unwrap().to_vec2::<f32>().unwrap()
    };
    let (from_hf, from_gguf) = (logits(&dir), logits(&gguf_path));
    let plain = logits(&fixture("llama3_tiny"));
    for (t, ((a, b), p)) in from_hf.iter().zip(&from_gguf).zip(&plain).enumerate() {
        assert!(max_abs(a, b) < 1e-4, "position {t}: {}", max_abs(a, b));
        assert!(max_abs(a, p) > 1e-3, "position {t}: the biases change nothing");
    }
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_file(&gguf_path);
}
