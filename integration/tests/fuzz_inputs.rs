//! Fuzz suite: mutated inputs of every kind a user hands the engine (engine, A/B, bench, eval and
//! retrofit configs, `config.json`, safetensors weights, adapters, GGUF files, CLI values) give
//! an error or a success, never a panic or an abort.
//!
//! Fixed seeds: the same cases run every time. A longer run with fresh seeds:
//! `DMS_FUZZ_SCALE=20 DMS_FUZZ_SEED=$RANDOM cargo test --release -p dms-integration --test fuzz_inputs`.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use common::{fixture, fixture_gguf_parts, gguf_file_bytes, GgufTensors, OwnedMeta};
use dms_integration::config::EngineConfig;
use dms_integration::engine::from_config::build_engine;
use dms_integration::engine::load_model;
use dms_integration::model::gguf_header::read_gguf_header;
use dms_integration::model::WeightForm;
use dms_integration::model::{ModelConfig, Weights};
use proptest::prelude::*;
use proptest::test_runner::{Config, RngSeed};

/// Cases per target, times `DMS_FUZZ_SCALE`; seed from `DMS_FUZZ_SEED` (fixed by default).
fn cfg(cases: u32) -> Config {
    let scale: u32 = std::env::var("DMS_FUZZ_SCALE").ok().and_then(|s| s.parse().ok()).unwrap_or(1);
    let seed: u64 = std::env::var("DMS_FUZZ_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(0x5EED_D175);
    Config {
        cases: cases * scale,
        rng_seed: RngSeed::Fixed(seed),
        failure_persistence: None,
        max_shrink_iters: 64,
        ..Config::default()
    }
}

fn scratch(tag: &str) -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let d = std::env::temp_dir().join(format!(
        "dms-fuzz-{}-{tag}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// One edit of a byte string.
#[derive(Debug, Clone)]
enum ByteEdit {
    Flip(prop::sample::Index, u8),
    Set(prop::sample::Index, u8),
    /// Overwrite 8 bytes with a boundary value (a count or length field gone wrong).
    Word(prop::sample::Index, u64),
    Truncate(prop::sample::Index),
}

fn interesting_u64() -> impl Strategy<Value = u64> {
    prop_oneof![
        Just(0u64),
        Just(1),
        Just(u64::MAX),
        Just(u64::MAX / 2 + 1),
        Just(1 << 32),
        Just(u32::MAX as u64),
        Just(1 << 40),
        any::<u64>(),
        0u64..4096,
    ]
}

fn byte_edit() -> impl Strategy<Value = ByteEdit> {
    prop_oneof![
        4 => (any::<prop::sample::Index>(), 0u8..8).prop_map(|(i, b)| ByteEdit::Flip(i, 1 << b)),
        2 => (any::<prop::sample::Index>(), any::<u8>()).prop_map(|(i, b)| ByteEdit::Set(i, b)),
        3 => (any::<prop::sample::Index>(), interesting_u64()).prop_map(|(i, w)| ByteEdit::Word(i, w)),
        1 => any::<prop::sample::Index>().prop_map(ByteEdit::Truncate),
    ]
}

/// Applies edits to `bytes[..region]` (the header); truncation cuts the whole file.
fn apply(bytes: &mut Vec<u8>, region: usize, edits: &[ByteEdit]) {
    for e in edits {
        let n = region.min(bytes.len());
        if n == 0 {
            return;
        }
        match e {
            ByteEdit::Flip(i, m) => bytes[i.index(n)] ^= m,
            ByteEdit::Set(i, b) => bytes[i.index(n)] = *b,
            ByteEdit::Word(i, w) => {
                let at = i.index(n);
                let end = (at + 8).min(bytes.len());
                bytes[at..end].copy_from_slice(&w.to_le_bytes()[..end - at]);
            }
            ByteEdit::Truncate(i) => bytes.truncate(i.index(bytes.len())),
        }
    }
}

/// One edit of a text file, line by line.
#[derive(Debug, Clone)]
enum TextEdit {
    DeleteLine(prop::sample::Index),
    DuplicateLine(prop::sample::Index),
    /// Replaces what follows the first `=` or `:` of a line.
    Value(prop::sample::Index, String),
    Char(prop::sample::Index, char),
}

fn odd_value() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("0".to_string()),
        Just("-1".into()),
        Just("18446744073709551616".into()),
        Just("9223372036854775807".into()),
        Just("1e309".into()),
        Just("nan".into()),
        Just("-inf".into()),
        Just("\"\"".into()),
        Just("\"x\"".into()),
        Just("[]".into()),
        Just("{}".into()),
        Just("true".into()),
        Just("null".into()),
        Just("1.5".into()),
        Just("4294967296".into()),
        Just("131072".into()),
        Just("1048576".into()),
        (0u64..100_000).prop_map(|x| x.to_string()),
        "[a-z_]{1,8}".prop_map(|s| format!("\"{s}\"")),
    ]
}

fn text_edit() -> impl Strategy<Value = TextEdit> {
    prop_oneof![
        1 => any::<prop::sample::Index>().prop_map(TextEdit::DeleteLine),
        1 => any::<prop::sample::Index>().prop_map(TextEdit::DuplicateLine),
        5 => (any::<prop::sample::Index>(), odd_value()).prop_map(|(i, v)| TextEdit::Value(i, v)),
        1 => (any::<prop::sample::Index>(), any::<char>()).prop_map(|(i, c)| TextEdit::Char(i, c)),
    ]
}

fn apply_text(text: &str, edits: &[TextEdit]) -> String {
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    for e in edits {
        if lines.is_empty() {
            break;
        }
        let n = lines.len();
        match e {
            TextEdit::DeleteLine(i) => {
                lines.remove(i.index(n));
            }
            TextEdit::DuplicateLine(i) => {
                let l = lines[i.index(n)].clone();
                lines.insert(i.index(n), l);
            }
            TextEdit::Value(i, v) => {
                let l = &mut lines[i.index(n)];
                if let Some(at) = l.find(['=', ':']) {
                    let tail = if l.trim_end().ends_with(',') { "," } else { "" };
                    *l = format!("{} {v}{tail}", &l[..=at]);
                }
            }
            TextEdit::Char(i, c) => {
                let l = &mut lines[i.index(n)];
                let chars: Vec<char> = l.chars().collect();
                if !chars.is_empty() {
                    let k = i.index(chars.len());
                    *l = chars[..k].iter().chain(std::iter::once(c)).chain(&chars[k + 1..]).collect();
                }
            }
        }
    }
    lines.join("\n")
}

fn repo_config(name: &str) -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs").join(name)).unwrap()
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

proptest! {
    #![proptest_config(cfg(400))]

    #[test]
    fn engine_config_text_never_panics(
        base in prop::sample::select(vec!["smollm2-full.toml", "smollm2-window.toml", "smollm2-dms.toml", "mla-tiny-dms.toml", "dms-fixture-tiny.toml"]),
        edits in prop::collection::vec(text_edit(), 1..5),
    ) {
        let text = apply_text(&repo_config(base), &edits);
        let _ = EngineConfig::parse(&text);
    }
}

proptest! {
    #![proptest_config(cfg(300))]

    #[test]
    fn ab_bench_eval_retrofit_files_never_panic(
        which in 0usize..4,
        edits in prop::collection::vec(text_edit(), 1..5),
    ) {
        let base = ["ab.toml", "bench.toml", "eval-smollm2.toml", "retrofit-smollm2.toml"][which];
        let dir = scratch("cfg");
        let p = write(&dir, "f.toml", apply_text(&repo_config(base), &edits).as_bytes());
        let _ = match which {
            0 => dms_integration::harness::ab::AbConfig::load(&p).map(|_| ()),
            1 => dms_integration::harness::bench_grid::BenchConfig::load(&p).map(|_| ()),
            2 => dms_integration::harness::eval::EvalConfig::load(&p).map(|_| ()),
            _ => dms_integration::retrofit::RetrofitConfig::load(&p).map(|_| ()),
        };
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// `config.json` texts of every fixture family.
fn model_configs() -> Vec<String> {
    [
        "qwen3_tiny",
        "llama3_tiny",
        "deepseek_mla_tiny",
        "qwen3_dms_tiny/variant_separate_alpha/model",
        "fp8/qwen3_moe_block",
        "fp8/llama3_channel",
        "gguf/gemma3_tiny",
        "gguf/gemma2_tiny",
        "gguf/smollm3_tiny",
        "gguf/granite_tiny",
        "gguf/phi4_mini_tiny",
        "gguf/gpt_oss_tiny",
    ]
    .iter()
    .map(|f| std::fs::read_to_string(fixture(f).join("config.json")).unwrap())
    .chain(std::iter::once(
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/models/mla-small/config.json"))
            .unwrap(),
    ))
    .collect()
}

proptest! {
    #![proptest_config(cfg(400))]

    /// A bare `config.json` means random weights of its shape: shapes too large for the machine
    /// must be refused, not allocated.
    #[test]
    fn model_config_json_never_panics(
        base in prop::sample::select(model_configs()),
        edits in prop::collection::vec(text_edit(), 1..4),
    ) {
        let text = apply_text(&base, &edits);
        if let Ok(c) = ModelConfig::from_hf_json(&text) {
            // Loading builds random weights: bounded here to keep the suite fast; the memory
            // guard itself is what larger shapes exercise.
            if c.approx_weight_count() < 2_000_000 || c.approx_weight_count() > 1 << 36 {
                let dir = scratch("json");
                let p = write(&dir, "config.json", text.as_bytes());
                let _ = load_model(&p, &Device::Cpu, WeightForm::Dense);
                let _ = std::fs::remove_dir_all(&dir);
            }
        }
    }
}

#[test]
fn random_weights_beyond_memory_are_refused() {
    let big = std::fs::read_to_string(fixture("qwen3_tiny").join("config.json"))
        .unwrap()
        .replace("\"hidden_size\": 64", "\"hidden_size\": 131072")
        .replace("\"vocab_size\": 512", "\"vocab_size\": 8388608");
    let dir = scratch("big");
    let p = write(&dir, "config.json", big.as_bytes());
    let e = format!("{:#}", load_model(&p, &Device::Cpu, WeightForm::Dense).err().expect("refused"));
    assert!(e.contains("GiB") && e.contains("memory"), "{e}");
}

/// Byte length of a safetensors header (8-byte length + JSON).
fn safetensors_header_len(bytes: &[u8]) -> usize {
    8 + u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize
}

proptest! {
    #![proptest_config(cfg(200))]

    #[test]
    fn safetensors_weights_never_panic(
        family in prop::sample::select(vec![
            "qwen3_tiny",
            "llama3_tiny",
            "deepseek_mla_tiny",
            "fp8/qwen3_moe_block",
            "fp8/deepseek_block",
            "fp8/llama3_channel",
            "gguf/gemma3_tiny",
            "gguf/gemma2_tiny",
            "gguf/phi4_mini_tiny",
            "gguf/gpt_oss_tiny",
            "gguf/gpt_oss_dense_tiny",
        ]),
        edits in prop::collection::vec(byte_edit(), 1..4),
        in_header in any::<bool>(),
    ) {
        let src = fixture(family);
        let mut bytes = std::fs::read(src.join("model.safetensors")).unwrap();
        let region = if in_header { safetensors_header_len(&bytes) } else { bytes.len() };
        apply(&mut bytes, region, &edits);
        let dir = scratch("st");
        std::fs::copy(src.join("config.json"), dir.join("config.json")).unwrap();
        write(&dir, "model.safetensors", &bytes);
        let _ = load_model(&dir, &Device::Cpu, WeightForm::Dense);
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// A DMS adapter for `qwen3_tiny` (2 layers, 2 KV heads, hidden 64) in NVIDIA's format.
fn write_adapter(dir: &Path) {
    let mut t = std::collections::HashMap::new();
    for l in 0..2 {
        let p = format!("model.layers.{l}.self_attn.dms_proj_alpha");
        t.insert(format!("{p}.weight"), Tensor::randn(0f32, 0.1, (2, 64), &Device::Cpu).unwrap());
        t.insert(format!("{p}_norm.weight"), Tensor::ones(64, candle_core::DType::F32, &Device::Cpu).unwrap());
    }
    candle_core::safetensors::save(&t, dir.join("adapter.safetensors")).unwrap();
    let cfg = r#"{"dms_window_size": 4, "dms_alpha_scale": 100.0, "dms_initial_alpha_offset": 5.0, "dms_separate_alpha": true, "dms_alpha_per": "head", "dms_disable_eviction": false}"#;
    std::fs::write(dir.join("config.json"), cfg).unwrap();
}

proptest! {
    #![proptest_config(cfg(120))]

    #[test]
    fn adapters_never_panic(
        config_edits in prop::collection::vec(text_edit(), 0..3),
        byte_edits in prop::collection::vec(byte_edit(), 0..3),
        in_header in any::<bool>(),
    ) {
        let dir = scratch("adapter");
        let adapter = dir.join("adapter");
        std::fs::create_dir_all(&adapter).unwrap();
        write_adapter(&adapter);
        let text = std::fs::read_to_string(adapter.join("config.json")).unwrap().replace(", ", ",\n");
        write(&adapter, "config.json", apply_text(&text, &config_edits).as_bytes());
        let mut bytes = std::fs::read(adapter.join("adapter.safetensors")).unwrap();
        let region = if in_header { safetensors_header_len(&bytes) } else { bytes.len() };
        apply(&mut bytes, region, &byte_edits);
        write(&adapter, "adapter.safetensors", &bytes);
        let mut cfg = EngineConfig::parse(&format!(
            "[model]\nsource = {:?}\n[cache]\nblock_size = 4\nmax_tokens = 256\n[cache.policy]\nname = \"dms\"\nadapter = {:?}\n",
            fixture("qwen3_tiny").display().to_string(),
            adapter.display().to_string()
        ))
        .unwrap();
        cfg.generation.max_tokens = 2;
        if let Ok(mut engine) = build_engine(&cfg).map(|b| b.engine) {
            let _ = engine.generate(&[1, 5, 9, 13, 17, 21], &dms_integration::engine::from_config::gen_params(&cfg), None);
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// Two greedy tokens after a 3-token prompt, full cache: whatever a loaded file holds, this
/// gives a result or an error, never a panic.
fn generate_two(model: dms_integration::model::Llama) {
    let policy =
        dms_integration::engine::from_config::registry().build(&toml::from_str("name = 'full'").unwrap()).unwrap();
    let mut e = dms_integration::engine::Engine::new(model, policy, 4, 64).unwrap();
    let params = dms_integration::engine::GenParams::greedy(2, 0);
    let _ = e.generate(&[1, 2, 3], &params, None);
}

/// A tiny Llama-architecture GGUF with a byte-level BPE tokenizer in its metadata: f32 and Q8_0
/// tensors, tied embeddings.
fn tiny_gguf() -> Vec<u8> {
    tiny_gguf_aligned(32)
}

/// [`tiny_gguf`] whose `general.alignment` says `alignment` (the data stays 32-byte aligned).
fn tiny_gguf_aligned(alignment: u32) -> Vec<u8> {
    let (meta, tensors) = tiny_gguf_parts(alignment);
    gguf_bytes(&meta, &tensors)
}

/// A GGUF file's metadata and tensors.
type GgufParts = (Vec<(&'static str, Value)>, Vec<(String, QTensor)>);

/// The metadata and tensors of [`tiny_gguf_aligned`].
fn tiny_gguf_parts(alignment: u32) -> GgufParts {
    let dev = Device::Cpu;
    let (vocab, h, inter, hd, kv) = (8usize, 32usize, 64usize, 16usize, 1usize);
    let tokens: Vec<Value> =
        ["a", "b", "c", "ab", "bc", "abc", "<s>", "</s>"].iter().map(|s| Value::String(s.to_string())).collect();
    let types: Vec<Value> = [1, 1, 1, 1, 1, 1, 3, 3].iter().map(|&t| Value::I32(t)).collect();
    let merges: Vec<Value> = ["a b", "b c", "ab c"].iter().map(|s| Value::String(s.to_string())).collect();
    let meta: Vec<(&str, Value)> = vec![
        ("general.architecture", Value::String("llama".into())),
        ("general.alignment", Value::U32(alignment)),
        ("llama.embedding_length", Value::U32(h as u32)),
        ("llama.feed_forward_length", Value::U32(inter as u32)),
        ("llama.block_count", Value::U32(1)),
        ("llama.attention.head_count", Value::U32((h / hd) as u32)),
        ("llama.attention.head_count_kv", Value::U32(kv as u32)),
        ("llama.context_length", Value::U32(128)),
        ("llama.rope.freq_base", Value::F32(10000.0)),
        ("llama.attention.layer_norm_rms_epsilon", Value::F32(1e-5)),
        ("tokenizer.ggml.model", Value::String("gpt2".into())),
        ("tokenizer.ggml.pre", Value::String("smollm".into())),
        ("tokenizer.ggml.tokens", Value::Array(tokens)),
        ("tokenizer.ggml.token_type", Value::Array(types)),
        ("tokenizer.ggml.merges", Value::Array(merges)),
        ("tokenizer.ggml.bos_token_id", Value::U32(6)),
        ("tokenizer.ggml.eos_token_id", Value::U32(7)),
    ];
    let q = |shape: (usize, usize), dt: GgmlDType| {
        QTensor::quantize(&Tensor::randn(0f32, 0.1, shape, &dev).unwrap(), dt).unwrap()
    };
    let ones =
        |n: usize| QTensor::quantize(&Tensor::ones(n, candle_core::DType::F32, &dev).unwrap(), GgmlDType::F32).unwrap();
    let tensors: Vec<(String, QTensor)> = vec![
        ("token_embd.weight".into(), q((vocab, h), GgmlDType::F32)),
        ("output_norm.weight".into(), ones(h)),
        ("blk.0.attn_norm.weight".into(), ones(h)),
        ("blk.0.ffn_norm.weight".into(), ones(h)),
        ("blk.0.attn_q.weight".into(), q((h, h), GgmlDType::Q8_0)),
        ("blk.0.attn_k.weight".into(), q((kv * hd, h), GgmlDType::F32)),
        ("blk.0.attn_v.weight".into(), q((kv * hd, h), GgmlDType::F32)),
        ("blk.0.attn_output.weight".into(), q((h, h), GgmlDType::Q8_0)),
        ("blk.0.ffn_gate.weight".into(), q((inter, h), GgmlDType::Q8_0)),
        ("blk.0.ffn_up.weight".into(), q((inter, h), GgmlDType::Q8_0)),
        ("blk.0.ffn_down.weight".into(), q((h, inter), GgmlDType::Q8_0)),
    ];
    (meta, tensors)
}

/// A GGUF file's bytes.
fn gguf_bytes(meta: &[(&str, Value)], tensors: &[(String, QTensor)]) -> Vec<u8> {
    let mut cur = std::io::Cursor::new(Vec::new());
    let meta_refs: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (*k, v)).collect();
    let tensor_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    gguf_file::write(&mut cur, &meta_refs, &tensor_refs).unwrap();
    cur.into_inner()
}

/// Bytes up to the start of the tensor data.
fn gguf_header_len(path: &Path) -> usize {
    read_gguf_header(path).unwrap().content.tensor_data_offset as usize
}

#[test]
fn tiny_gguf_loads_and_generates() {
    let dir = scratch("gguf-ok");
    let p = write(&dir, "tiny.gguf", &tiny_gguf());
    let m = load_model(&p, &Device::Cpu, WeightForm::Dense).unwrap();
    assert_eq!(m.model.config().vocab_size, 8);
    let tok = m.tokenizer.unwrap();
    assert_eq!(tok.encode("abc", false).unwrap().get_ids(), &[5]);
}

#[test]
fn gguf_metadata_is_honoured_or_refused_never_ignored() {
    let dir = scratch("gguf-meta");
    let load = |meta: &[(&str, Value)], tensors: &[(String, QTensor)], name: &str| {
        load_model(&write(&dir, name, &gguf_bytes(meta, tensors)), &Device::Cpu, WeightForm::Dense)
    };
    let (meta, tensors) = tiny_gguf_parts(32);
    // The end-of-turn token stops generation beside the end-of-sequence one; the chat template
    // gets the file's BOS token.
    let mut with = meta.clone();
    with.push(("tokenizer.ggml.eot_token_id", Value::U32(5)));
    with.push(("tokenizer.chat_template", Value::String("{{ bos_token }}{{ messages[0]['content'] }}".into())));
    let m = load(&with, &tensors, "eot.gguf").unwrap();
    assert_eq!(m.model.config().eos_token_ids, vec![7, 5]);
    let msg = dms_integration::model::chat_template::ChatMessage::text("user", "hi");
    assert_eq!(m.chat_template.unwrap().render(&[msg]).unwrap(), "<s>hi");
    // A pre-tokenizer other than those built, or none named, is refused.
    for (pre, named) in [(Some("falcon"), "falcon"), (None, "missing")] {
        let mut m2: Vec<(&str, Value)> = meta.iter().filter(|(k, _)| *k != "tokenizer.ggml.pre").cloned().collect();
        if let Some(p) = pre {
            m2.push(("tokenizer.ggml.pre", Value::String(p.into())));
        }
        let e = format!("{:#}", load(&m2, &tensors, "pre.gguf").err().expect("refused"));
        assert!(e.contains("pre-tokenizer") && e.contains(named), "{e}");
    }
    // RoPE frequency factors must be one positive value per frequency (head_dim 16: 8).
    for (n, fill, ok) in [(8, 2.0, true), (7, 2.0, false), (8, 0.0, false), (8, f32::NAN, false)] {
        let mut t2: Vec<(String, QTensor)> = tiny_gguf_parts(32).1;
        let factors = Tensor::full(fill, n, &Device::Cpu).unwrap();
        t2.push(("rope_freqs.weight".into(), QTensor::quantize(&factors, GgmlDType::F32).unwrap()));
        match load(&meta, &t2, "freqs.gguf") {
            Ok(m) => {
                assert!(ok, "{n} factors of {fill} are refused");
                let plain = dms_integration::model::ModelConfig { rope_scaling: None, ..m.model.config().clone() };
                let want: Vec<f64> = plain.rope_inv_freq().iter().map(|f| f / 2.0).collect();
                assert_eq!(m.model.config().rope_inv_freq(), want);
            }
            Err(e) => assert!(!ok && format!("{e:#}").contains("rope_freqs.weight"), "{n} x {fill}: {e:#}"),
        }
    }
    // RoPE over part of a head is refused in a `llama` file (its q/k rows are permuted for the
    // whole head).
    let mut m4 = meta.clone();
    m4.push(("llama.rope.dimension_count", Value::U32(8)));
    let e = format!("{:#}", load(&m4, &tensors, "partial.gguf").err().expect("refused"));
    assert!(e.contains("rope.dimension_count"), "{e}");
    // Experts (Mixtral's GGUF files are `llama` with experts) are read, never left unread: here
    // without the count used per token, then without the router, the file is refused naming them.
    let mut m5 = meta.clone();
    m5.push(("llama.expert_count", Value::U32(8)));
    let e = format!("{:#}", load(&m5, &tensors, "experts.gguf").err().expect("refused"));
    assert!(e.contains("expert_used_count"), "{e}");
    m5.push(("llama.expert_used_count", Value::U32(2)));
    let e = format!("{:#}", load(&m5, &tensors, "experts.gguf").err().expect("refused"));
    assert!(e.contains("ffn_gate_inp"), "{e}");
    // Linear RoPE scaling divides every frequency by its factor; without a factor, beside
    // `rope_freqs.weight`, or another scaling the loader does not apply, the file is refused.
    let mut m3 = meta.clone();
    m3.push(("llama.rope.scaling.type", Value::String("linear".into())));
    let e = format!("{:#}", load(&m3, &tensors, "linear.gguf").err().expect("refused"));
    assert!(e.contains("llama.rope.scaling.factor"), "{e}");
    m3.push(("llama.rope.scaling.factor", Value::F32(4.0)));
    let m = load(&m3, &tensors, "linear.gguf").unwrap();
    let plain = dms_integration::model::ModelConfig { rope_scaling: None, ..m.model.config().clone() };
    let want: Vec<f64> = plain.rope_inv_freq().iter().map(|f| f / 4.0).collect();
    assert_eq!(m.model.config().rope_inv_freq(), want);
    let mut with_freqs = tiny_gguf_parts(32).1;
    let factors = Tensor::full(2f32, 8, &Device::Cpu).unwrap();
    with_freqs.push(("rope_freqs.weight".into(), QTensor::quantize(&factors, GgmlDType::F32).unwrap()));
    let e = format!("{:#}", load(&m3, &with_freqs, "both.gguf").err().expect("refused"));
    assert!(e.contains("rope_freqs.weight") && e.contains("rope.scaling.type"), "{e}");
    let mut m6 = meta.clone();
    m6.push(("llama.rope.scaling.type", Value::String("longrope".into())));
    let e = format!("{:#}", load(&m6, &tensors, "longrope.gguf").err().expect("refused"));
    assert!(e.contains("llama.rope.scaling.type") && e.contains("longrope"), "{e}");
    // YaRN: the same frequencies and context as config.json's `rope_scaling` with the same values;
    // without a factor, with llama.cpp's partial blend, with keys llama.cpp does not read for
    // these files (an attention factor, DeepSeek's log multiplier, other betas) or with a
    // LongRoPE table factor, refused by key.
    let mut m7 = meta.clone();
    m7.push(("llama.rope.scaling.type", Value::String("yarn".into())));
    let e = format!("{:#}", load(&m7, &tensors, "yarn.gguf").err().expect("refused"));
    assert!(e.contains("llama.rope.scaling.factor"), "{e}");
    m7.push(("llama.rope.scaling.factor", Value::F32(4.0)));
    m7.push(("llama.rope.scaling.original_context_length", Value::U32(64)));
    let m = load(&m7, &tensors, "yarn.gguf").unwrap();
    let hf = dms_integration::model::ModelConfig::from_hf_json(
        r#"{"architectures": ["LlamaForCausalLM"], "vocab_size": 8, "hidden_size": 32, "intermediate_size": 64,
            "num_hidden_layers": 1, "num_attention_heads": 2, "max_position_embeddings": 128,
            "rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}}"#,
    )
    .unwrap();
    let got = m.model.config();
    assert_eq!((got.rope_inv_freq(), got.rope_attention_factor()), (hf.rope_inv_freq(), hf.rope_attention_factor()));
    assert_eq!((got.max_position_embeddings, hf.max_position_embeddings), (256, 256));
    for (k, v) in [
        ("llama.rope.scaling.yarn_ext_factor", Value::F32(0.5)),
        ("llama.rope.scaling.yarn_log_multiplier", Value::F32(0.1)),
        ("llama.rope.scaling.yarn_attn_factor", Value::F32(1.2)),
        ("llama.rope.scaling.attn_factor", Value::F32(2.0)),
    ] {
        let mut m8 = m7.clone();
        m8.push((k, v));
        let e = format!("{:#}", load(&m8, &tensors, "yarn-extra.gguf").err().expect("refused"));
        assert!(e.contains(k), "{k}: {e}");
    }
    let mut m9 = m7.clone();
    m9.push(("llama.rope.scaling.yarn_beta_fast", Value::F32(16.0)));
    let e = format!("{:#}", load(&m9, &tensors, "yarn-beta.gguf").err().expect("refused"));
    assert!(e.contains("betas (16, 1)"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// An edit of a GGUF file's metadata and tensors.
type GgufEdit<'a> = &'a dyn Fn(&mut OwnedMeta, &mut GgufTensors);

/// `t` as an F32 GGUF tensor (copied first: candle quantizes a view's whole storage).
fn f32_tensor(t: &Tensor) -> QTensor {
    let fresh = Tensor::from_vec(t.flatten_all().unwrap().to_vec1::<f32>().unwrap(), t.dims(), &Device::Cpu).unwrap();
    QTensor::quantize(&fresh, GgmlDType::F32).unwrap()
}

/// DeepSeek GGUF files: metadata the loader cannot honour (YaRN without DeepSeek's mscale, other
/// YaRN factors, another scaling, another gating function, per-layer expert widths) and tensors
/// that do not match it (stacked experts of the wrong count, a half of a split `kv_b` missing or
/// of another size) are refused naming the key or the tensor.
#[test]
fn deepseek_gguf_metadata_is_honoured_or_refused_never_ignored() {
    let dir = scratch("gguf-deepseek");
    let load = |file: &str, edit: GgufEdit| {
        let (mut meta, mut tensors) = fixture_gguf_parts(file);
        edit(&mut meta, &mut tensors);
        let p = write(&dir, "edited.gguf", &gguf_file_bytes(&meta, &tensors));
        load_model(&p, &Device::Cpu, WeightForm::Dense).map(|m| m.model.config().clone())
    };
    let set = |key: &str, v: Value| {
        let key = key.to_string();
        move |m: &mut Vec<(String, Value)>, _: &mut Vec<(String, QTensor)>| {
            m.retain(|(k, _)| *k != key);
            m.push((key.clone(), v.clone()));
        }
    };
    let drop_key = |key: &'static str| {
        move |m: &mut Vec<(String, Value)>, _: &mut Vec<(String, QTensor)>| m.retain(|(k, _)| k != key)
    };
    let refused = |file: &str, edit: GgufEdit, named: &str| {
        let e =
            format!("{:#}", load(file, edit).err().unwrap_or_else(|| panic!("{file}: edit naming {named} is refused")));
        assert!(e.contains(named), "{file}: {e}");
    };
    // Unedited, the files load with what their metadata says.
    let v2 = load("deepseek_v2_moe.gguf", &|_, _| {}).unwrap();
    let y = v2.mla.as_ref().unwrap().yarn.unwrap();
    assert!((y.mscale_all_dim - 0.707).abs() < 1e-6 && y.mscale == y.mscale_all_dim, "{y:?}");
    let v2 = "deepseek_v2_moe.gguf";
    refused(v2, &drop_key("deepseek2.rope.scaling.yarn_log_multiplier"), "yarn_log_multiplier");
    refused(v2, &set("deepseek2.rope.scaling.yarn_attn_factor", Value::F32(0.5)), "yarn_attn_factor");
    refused(v2, &set("deepseek2.rope.scaling.type", Value::String("linear".into())), "linear");
    refused(v2, &set("deepseek2.expert_gating_func", Value::U32(3)), "expert_gating_func");
    refused(v2, &set("deepseek2.expert_used_count", Value::U32(5)), "MoE routing");
    let widths = Value::Array(vec![Value::U32(32); 3]);
    refused(v2, &set("deepseek2.expert_feed_forward_length", widths), "expert_feed_forward_length");
    refused(v2, &set("deepseek2.expert_count", Value::U32(5)), "ffn_gate_inp");
    // Expert 3 of a stack that holds 3.
    let three = |_: &mut Vec<(String, Value)>, t: &mut Vec<(String, QTensor)>| {
        for (name, q) in t.iter_mut().filter(|(n, _)| n == "blk.1.ffn_up_exps.weight") {
            *q = f32_tensor(&q.dequantize(&Device::Cpu).unwrap().narrow(0, 0, 3).unwrap());
            assert!(name.ends_with("exps.weight"));
        }
    };
    refused(v2, &three, "blk.1.ffn_up_exps.weight");
    let v3 = "deepseek_v3_moe.gguf";
    let no_v_b =
        |_: &mut Vec<(String, Value)>, t: &mut Vec<(String, QTensor)>| t.retain(|(n, _)| n != "blk.0.attn_v_b.weight");
    refused(v3, &no_v_b, "blk.0.attn_v_b.weight");
    let short_v_b = |_: &mut Vec<(String, Value)>, t: &mut Vec<(String, QTensor)>| {
        for (_, q) in t.iter_mut().filter(|(n, _)| n == "blk.0.attn_v_b.weight") {
            *q = f32_tensor(&q.dequantize(&Device::Cpu).unwrap().narrow(1, 0, 8).unwrap());
        }
    };
    refused(v3, &short_v_b, "blk.0.attn_v_b.weight");
    refused(v3, &drop_key("deepseek2.attention.value_length_mla"), "value_length_mla");
    // A shape beyond the machine's memory (here 4096 layers of width 131072, over 600 GiB in f32)
    // is refused before any tensor is read, not left to the out-of-memory killer.
    let huge = |m: &mut OwnedMeta, t: &mut GgufTensors| {
        set("deepseek2.block_count", Value::U32(4096))(m, t);
        set("deepseek2.embedding_length", Value::U32(1 << 17))(m, t);
    };
    refused(v3, &huge, "more than this machine's");
    // qwen3moe: keys llama.cpp ignores for the architecture, and that would change the model if
    // honoured, are refused; so is a stack of the wrong expert count.
    let q = "qwen3_moe.gguf";
    let m = load(q, &|_, _| {}).unwrap().moe.unwrap();
    assert_eq!((m.n_routed_experts, m.num_experts_per_tok, m.norm_topk_prob), (8, 2, true));
    for (k, v) in [
        ("qwen3moe.expert_shared_count", Value::U32(1)),
        ("qwen3moe.leading_dense_block_count", Value::U32(1)),
        ("qwen3moe.expert_gating_func", Value::U32(2)),
        ("qwen3moe.expert_group_count", Value::U32(2)),
        ("qwen3moe.expert_weights_scale", Value::F32(2.5)),
        ("qwen3moe.expert_used_count", Value::U32(1)),
    ] {
        refused(q, &set(k, v), k);
    }
    refused(q, &drop_key("qwen3moe.expert_feed_forward_length"), "expert_feed_forward_length");
    refused(q, &set("qwen3moe.expert_count", Value::U32(9)), "ffn_gate_inp");
    refused("qwen3_tiny.gguf", &set("qwen3.expert_count", Value::U32(8)), "qwen3moe");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_tensor_typed_q8_1_is_refused_naming_it() {
    let mut bytes = tiny_gguf();
    let name = b"blk.0.attn_q.weight";
    let at = bytes.windows(name.len()).position(|w| w == name).unwrap();
    // After the name: the dimension count (u32) and two dimensions (u64 each), then the type.
    let ty = at + name.len() + 4 + 16;
    assert_eq!(u32::from_le_bytes(bytes[ty..ty + 4].try_into().unwrap()), 8, "Q8_0 before the edit");
    bytes[ty] = 9;
    let dir = scratch("gguf-q8-1");
    let p = write(&dir, "q81.gguf", &bytes);
    let e = format!("{:#}", load_model(&p, &Device::Cpu, WeightForm::Dense).err().expect("a Q8_1 tensor is refused"));
    assert!(e.contains("blk.0.attn_q.weight") && e.contains("is 9"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}

proptest! {
    #![proptest_config(cfg(800))]

    #[test]
    fn tiny_gguf_never_panics(
        edits in prop::collection::vec(byte_edit(), 1..4),
        in_header in prop::bool::weighted(0.9),
    ) {
        let mut bytes = tiny_gguf();
        let dir = scratch("gguf");
        let clean = write(&dir, "clean.gguf", &bytes);
        let region = if in_header { gguf_header_len(&clean) } else { bytes.len() };
        apply(&mut bytes, region, &edits);
        let p = write(&dir, "m.gguf", &bytes);
        if let Ok(m) = load_model(&p, &Device::Cpu, WeightForm::Dense) {
            generate_two(m.model);
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}

proptest! {
    #![proptest_config(cfg(200))]

    /// Mutated headers of the GGUF fixtures with experts or RoPE scaling (DeepSeek-V3-shaped:
    /// latent attention, stacked experts, split `kv_b`; Qwen2-MoE; Qwen3-MoE; Mixtral; Qwen3 with
    /// YaRN; GPT-OSS with f32 or MXFP4 experts) load or are refused; nothing panics.
    #[test]
    fn moe_and_scaled_gguf_never_panics(
        file in prop::sample::select(vec![
            "deepseek_v3_moe", "qwen2_moe", "qwen3_moe", "mixtral", "qwen3_yarn", "gemma3", "gemma2", "smollm3", "granite", "phi4_mini",
            "gpt_oss", "gpt_oss_mxfp4",
        ]),
        edits in prop::collection::vec(byte_edit(), 1..4),
    ) {
        let clean = fixture(&format!("gguf/{file}.gguf"));
        let mut bytes = std::fs::read(&clean).unwrap();
        apply(&mut bytes, gguf_header_len(&clean), &edits);
        let dir = scratch("gguf-deepseek-fuzz");
        let p = write(&dir, "m.gguf", &bytes);
        if let Ok(m) = load_model(&p, &Device::Cpu, WeightForm::Dense) {
            generate_two(m.model);
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// The real SmolLM2 GGUF's header, mutated, in front of a sparse file of the original length (so
/// that tensor extents are checked against the real size without copying 98 MB per case).
#[test]
fn real_gguf_header_never_panics() {
    let real = dms_integration::assets::fetch(&dms_integration::assets::SMOLLM2_135M).unwrap();
    let full_len = std::fs::metadata(&real).unwrap().len();
    let header_len = gguf_header_len(&real);
    let mut header = vec![0u8; header_len];
    std::io::Read::read_exact(&mut std::fs::File::open(&real).unwrap(), &mut header).unwrap();
    let mut runner = proptest::test_runner::TestRunner::new(cfg(40));
    // Most of the header is token strings: aim half of the edits at the first 64 KiB, where the
    // counts, the first keys and the array headers are.
    let strategy = (prop::collection::vec(byte_edit(), 1..4), any::<bool>());
    let (errors, ok) = (std::cell::Cell::new(0), std::cell::Cell::new(0));
    runner
        .run(&strategy, |(edits, early)| {
            let mut h = header.clone();
            apply(&mut h, if early { 64 << 10 } else { header_len }, &edits);
            let dir = scratch("real-gguf");
            let p = dir.join("m.gguf");
            let mut f = std::fs::File::create(&p).unwrap();
            f.write_all(&h).unwrap();
            f.set_len(full_len).unwrap();
            drop(f);
            match Weights::open_gguf(&p) {
                Ok((Weights::Gguf { header, .. }, _)) => {
                    ok.set(ok.get() + 1);
                    let _ = dms_integration::model::gguf_tokenizer::from_gguf(&header.content);
                }
                Ok(_) => unreachable!("a GGUF path opens as GGUF"),
                Err(_) => errors.set(errors.get() + 1),
            }
            let _ = std::fs::remove_dir_all(&dir);
            Ok(())
        })
        .unwrap();
    eprintln!("real GGUF header: {} loaded, {} errors", ok.get(), errors.get());
}

/// Exit status of `dms` with these arguments: 0 or 1, never a signal or a panic's 101.
fn dms(args: &[String]) -> (Option<i32>, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_dms")).args(args).output().unwrap();
    (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn corrupt_gguf_headers_exit_with_status_1_naming_the_field() {
    let dir = scratch("gguf-cli");
    let bytes = tiny_gguf();
    // Offsets in a v2 header: 8 tensor count, 16 metadata count, 24 first key's length.
    for (at, word, names) in [
        (8usize, u64::MAX, "tensor count"),
        (16, 1 << 40, "metadata count"),
        (24, u64::MAX / 3, "length of metadata key #0"),
    ] {
        let mut b = bytes.clone();
        b[at..at + 8].copy_from_slice(&word.to_le_bytes());
        let p = write(&dir, "bad.gguf", &b);
        let cfg = write(
            &dir,
            "engine.toml",
            format!("[model]\nsource = {:?}\n[cache]\nmax_tokens = 64\n", p.display().to_string()).as_bytes(),
        );
        let (code, err) =
            dms(&["run".into(), "--config".into(), cfg.display().to_string(), "--prompt-ids".into(), "1,2".into()]);
        assert_eq!(code, Some(1), "{err}");
        assert!(err.contains(names) && err.contains(&format!("at byte {at}")), "{err}");
    }
}

#[test]
fn bad_alignment_is_an_error_not_a_division_by_zero() {
    let dir = scratch("align");
    for a in [0, 3, 48, 1 << 20] {
        let p = write(&dir, "a.gguf", &tiny_gguf_aligned(a));
        let e = format!("{:#}", load_model(&p, &Device::Cpu, WeightForm::Dense).err().expect("an error"));
        assert!(e.contains("general.alignment") && e.contains(&a.to_string()), "{e}");
    }
}

fn cli_value() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("0".to_string()),
        Just("-1".into()),
        Just("1".into()),
        Just("3".into()),
        Just("nan".into()),
        Just("inf".into()),
        Just("18446744073709551615".into()),
        Just("4294967296".into()),
        Just("".into()),
        Just("x".into()),
        Just("1e9".into()),
        Just("0.5".into()),
        (0u64..2048).prop_map(|x| x.to_string()),
    ]
}

fn cli_arg() -> impl Strategy<Value = Vec<String>> {
    let valued = prop::sample::select(vec![
        "--block-size",
        "--memory-mb",
        "--cache-tokens",
        "--prefill-chunk",
        "--temperature",
        "--top-p",
        "--seed",
        "--dtype",
        "--device",
        "--policy",
    ]);
    prop_oneof![
        4 => (valued, cli_value()).prop_map(|(f, v)| vec![f.to_string(), v]),
        2 => (prop::sample::select(vec!["window", "sinks", "decision", "evict_rate", "alpha_scale", "adapter", "bogus", ""]), cli_value())
            .prop_map(|(k, v)| vec!["--policy-opt".to_string(), if k.is_empty() { v } else { format!("{k}={v}") }]),
        1 => prop::sample::select(vec!["full", "sliding_window", "dms", "shadow", "nope"]).prop_map(|p| vec!["--policy".to_string(), p.to_string()]),
        1 => prop::collection::vec(prop_oneof![Just("1".to_string()), Just("511".into()), Just("512".into()), Just("x".into()), Just("-3".into()), Just("99999999999".into())], 1..4)
            .prop_map(|ids| vec!["--prompt-ids".to_string(), ids.join(",")]),
        1 => prop::sample::select(vec!["0", "1", "4", "x", "-2"]).prop_map(|v| vec!["--max-tokens".to_string(), v.to_string()]),
        1 => Just(vec!["--chat".to_string()]),
        1 => Just(vec!["--ignore-eos".to_string()]),
    ]
}

#[test]
fn cli_values_never_panic() {
    let dir = scratch("cli");
    let cfg_path = write(
        &dir,
        "engine.toml",
        format!(
            "[model]\nsource = {:?}\n[cache]\nblock_size = 4\nmax_tokens = 256\n[cache.policy]\nname = \"full\"\n[generation]\nmax_tokens = 3\n",
            fixture("qwen3_tiny").display().to_string()
        )
        .as_bytes(),
    );
    let mut runner = proptest::test_runner::TestRunner::new(cfg(150));
    let (ok, err) = (std::cell::Cell::new(0), std::cell::Cell::new(0));
    runner
        .run(&prop::collection::vec(cli_arg(), 0..5), |args| {
            let mut a = vec!["run".to_string(), "--config".into(), cfg_path.display().to_string()];
            if !args.iter().any(|x| x[0] == "--prompt-ids") {
                a.extend(["--prompt-ids".to_string(), "1,2,3".to_string()]);
            }
            a.extend(args.into_iter().flatten());
            let (code, stderr) = dms(&a);
            // clap's usage errors exit with 2; ours with 1.
            prop_assert!(matches!(code, Some(0..=2)), "dms {:?} exited with {:?}: {}", a, code, stderr);
            let counter = if code == Some(0) { &ok } else { &err };
            counter.set(counter.get() + 1);
            Ok(())
        })
        .unwrap();
    eprintln!("CLI: {} runs succeeded, {} were refused with an error", ok.get(), err.get());
}
