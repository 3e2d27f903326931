//! FP8 checkpoints (`fixtures/fp8/`, written by `generate.py` there): transformers' fine-grained
//! block scales (a Qwen3-MoE and a DeepSeek MLA model) and llm-compressor's per-channel scales (a
//! Llama 3), against the dequantized weights the generator computed from the E4M3 definition.

mod common;
use common::*;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use dms_integration::model::{ModelConfig, WeightForm, Weights};

const FIXTURES: [&str; 3] = ["fp8/qwen3_moe_block", "fp8/deepseek_block", "fp8/llama3_channel"];

/// The weights of `dir` opened as the loader opens them (the config's FP8 scheme attached).
fn open(dir: &Path) -> Weights {
    let cfg = ModelConfig::from_hf_json(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    Weights::open_safetensors_dir(dir).unwrap().with_fp8(cfg.fp8)
}

/// The dequantized weights of fixture `name`, as the generator computed them.
fn reference(name: &str) -> PathBuf {
    fixture(&format!("{name}_reference.safetensors"))
}

/// A scratch directory for variants of a fixture.
fn scratch(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("dms-fp8-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// `src`'s config.json with `edit` applied, written to `dir`.
fn write_config(src: &Path, dir: &Path, edit: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>)) {
    let mut c: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    edit(c.as_object_mut().unwrap());
    std::fs::write(dir.join("config.json"), c.to_string()).unwrap();
}

/// Prompt logits and 6 greedy steps' logits of the model in `dir`, as one vector.
fn logits(dir: &Path, form: WeightForm) -> Vec<f32> {
    let m = dms_integration::engine::load_model(dir, &Device::Cpu, form).unwrap();
    let table: toml::Table = toml::from_str("name = \"full\"").unwrap();
    let policy = dms_policy::Registry::with_builtins().build(&table).unwrap();
    let mut eng = dms_integration::engine::Engine::new(m.model, policy, 4, 1 << 16).unwrap();
    let mut seq = eng.new_sequence();
    let prompt = seeded_tokens(3, 24).iter().map(|t| t % 512).collect::<Vec<_>>();
    let mut all = eng.step(&mut seq, &prompt, true).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let mut last = all[all.len() - 512..].to_vec();
    for _ in 0..6 {
        let next = dms_integration::engine::argmax(&last);
        last = eng.step(&mut seq, &[next], false).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        all.extend_from_slice(&last);
    }
    all
}

#[test]
fn fp8_weights_dequantize_to_the_reference_exactly() {
    for name in FIXTURES {
        let dir = fixture(name);
        let reference = candle_core::safetensors::load(reference(name), &Device::Cpu).unwrap();
        assert!(reference.len() >= 14, "{name}");
        let w = open(&dir);
        for (t, want) in &reference {
            let got = w.get(t, want.dims(), &Device::Cpu).unwrap();
            let (got, want) = (
                got.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                want.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            );
            assert_eq!(got, want, "{name}: `{t}`");
        }
    }
}

#[test]
fn fp8_models_run_as_their_dequantized_weights() {
    for name in FIXTURES {
        let dir = fixture(name);
        // The same model with the reference weights in place of the FP8 ones and their scales, and
        // no quantization_config.
        let plain = scratch(&name.replace('/', "-"));
        write_config(&dir, &plain, |c| {
            c.remove("quantization_config");
        });
        let mut tensors = candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu).unwrap();
        tensors.retain(|n, t| {
            t.dtype() != DType::F8E4M3 && !n.ends_with("weight_scale") && !n.ends_with("weight_scale_inv")
        });
        tensors.extend(candle_core::safetensors::load(reference(name), &Device::Cpu).unwrap());
        candle_core::safetensors::save(&tensors, plain.join("model.safetensors")).unwrap();

        let (fp8, want) = (logits(&dir, WeightForm::Dense), logits(&plain, WeightForm::Dense));
        assert!(max_abs(&fp8, &want) < 1e-5, "{name}: {}", max_abs(&fp8, &want));
        // Requantized into Q8_0 blocks for the CPU's quantized kernels: close, not equal.
        let q8 = logits(&dir, WeightForm::Quantized);
        let err = max_abs(&q8[..512 * 24], &want[..512 * 24]);
        assert!(err > 0.0 && err < 0.05, "{name}: Q8_0 from FP8 {err}");
        let _ = std::fs::remove_dir_all(&plain);
    }
}

#[test]
fn broken_fp8_checkpoints_are_refused_naming_the_problem() {
    let src = fixture("fp8/qwen3_moe_block");
    let err = |dir: &Path| {
        format!(
            "{:#}",
            dms_integration::engine::load_model(dir, &Device::Cpu, WeightForm::Dense).err().expect("refused")
        )
    };
    let dir = scratch("broken");
    let tensors = candle_core::safetensors::load(src.join("model.safetensors"), &Device::Cpu).unwrap();
    let save = |t: &std::collections::HashMap<String, Tensor>| {
        candle_core::safetensors::save(t, dir.join("model.safetensors")).unwrap()
    };

    // FP8 tensors without a quantization_config saying how they are scaled.
    write_config(&src, &dir, |c| {
        c.remove("quantization_config");
    });
    save(&tensors);
    let e = err(&dir);
    assert!(e.contains("is stored as FP8, but config.json has no `quantization_config`"), "{e}");

    // A scale missing, and a scale of the wrong shape.
    write_config(&src, &dir, |_| {});
    let q = "model.layers.1.self_attn.o_proj.weight_scale_inv";
    let mut t = tensors.clone();
    t.remove(q);
    save(&t);
    let e = err(&dir);
    assert!(e.contains("FP8 tensor `model.layers.1.self_attn.o_proj.weight` has no scale"), "{e}");
    t.insert(q.into(), Tensor::ones((2, 2), DType::F32, &Device::Cpu).unwrap());
    save(&t);
    let e = err(&dir);
    assert!(e.contains("has shape [2, 2]; expected [3, 2] for 24x40 blocks"), "{e}");

    // A NaN byte (0x7F) in a weight.
    let mut t = tensors.clone();
    let w = "model.layers.0.mlp.experts.3.up_proj.weight";
    let mut bytes = t[w].to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    bytes[5] = f32::NAN;
    let shape = t[w].dims().to_vec();
    t.insert(w.into(), Tensor::from_vec(bytes, shape, &Device::Cpu).unwrap().to_dtype(DType::F8E4M3).unwrap());
    save(&t);
    let e = err(&dir);
    assert!(e.contains(&format!("FP8 tensor `{w}` dequantizes to non-finite weights")), "{e}");

    // Another quantization method.
    write_config(&src, &dir, |c| {
        c.insert("quantization_config".into(), serde_json::json!({"quant_method": "awq", "bits": 4}));
    });
    save(&tensors);
    let e = err(&dir);
    assert!(e.contains("quant_method `awq` is not supported"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}
