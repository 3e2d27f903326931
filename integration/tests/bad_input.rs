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
