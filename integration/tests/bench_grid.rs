//! `dms bench` at the memory limit: each cell fills a KV budget by admission, long prompts are
//! prefilled once and forked, and the figures say how many sequences each arm sustained against
//! what the budget fits.

mod common;

use common::fixture;
use dms_integration::harness::bench_grid::{run_grid, BenchConfig};

#[test]
fn a_kv_budget_is_filled_by_admission_with_forked_prompts() {
    let dir = std::env::temp_dir().join(format!("dms-bench-grid-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let model = fixture("qwen3_dms_tiny/variant_separate_alpha/model");
    let out = dir.join("grid.json");
    let cfg = format!(
        r#"
[model]
source = "unused: [grid] models"

[grid]
models = [{model:?}]
contexts = [24, 200]
decode_tokens = 6
block_size = 4
kv_budget_gib = 0.0003
requests = 64
shared_prompt_from = 100
output = {out:?}

[[arm]]
name = "full"
policy = {{ name = "full" }}

[[arm]]
name = "dms-0.9"
policy = {{ name = "dms", window = 4, decision = "random", evict_rate = 0.9 }}
"#
    );
    let path = dir.join("bench.toml");
    std::fs::write(&path, cfg).unwrap();
    let (json, table) = run_grid(&BenchConfig::load(&path).unwrap()).unwrap();
    let rows = json["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 2 * 2, "{table}");
    for r in rows {
        let (arm, ctx) = (r["arm"].as_str().unwrap(), r["context"].as_u64().unwrap());
        let (mean, fits) = (r["mean_running"].as_f64().unwrap(), r["sequences_fit"].as_f64().unwrap());
        let max = r["max_running"].as_u64().unwrap();
        let forked = r["forked"].as_u64().unwrap();
        assert_eq!(r["batch"], 64, "{table}");
        // Sequences grow while they decode, so more can run at once early on than fit at their peak.
        assert!(max >= 2 && mean <= 1.05 * fits, "{arm} at {ctx}: {mean} running on average, {fits} fit\n{table}");
        if ctx >= 100 {
            assert!(forked + 1 >= max, "{arm} at {ctx}: {forked} forks for {max} running\n{table}");
            assert!(mean >= 0.8 * fits, "{arm} at {ctx}: forks fill the budget ({mean} of {fits})\n{table}");
        } else {
            assert_eq!(forked, 0, "{arm} at {ctx}: distinct prompts are not forked\n{table}");
        }
    }
    for model in json["models"].as_array().unwrap() {
        let at = |arm: &str| {
            rows.iter()
                .find(|r| r["model"] == *model && r["arm"] == arm && r["context"] == 200)
                .map(|r| r["max_running"].as_u64().unwrap())
                .unwrap()
        };
        assert!(at("dms-0.9") >= 2 * at("full"), "{model}: DMS sustains more sequences\n{table}");
    }
    // A random-weight shape that does not exist is named before anything runs.
    let text = std::fs::read_to_string(&path)
        .unwrap()
        .replace(&format!("models = [{model:?}]"), "models = [\"shape:llama-9000\"]");
    std::fs::write(&path, text).unwrap();
    let e = run_grid(&BenchConfig::load(&path).unwrap()).unwrap_err().to_string();
    assert!(e.contains("llama-9000") && e.contains("llama3.1-8b"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The GPU benchmark configs (the README's and the device script's) parse, and load where CUDA
/// is built in; the peer configs run mistral.rs's PagedAttention beside our full cache.
#[test]
fn the_gpu_benchmark_configs_load() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let quick = root.join("benches/gpu/bench-gpu-quick.toml");
    let c: BenchConfig = toml::from_str(&std::fs::read_to_string(&quick).unwrap()).unwrap();
    assert_eq!((c.model.source.as_str(), c.grid.kv_budget_gib), ("shape:llama3.1-8b", Some(64.0)));
    let p = root.join("configs/bench-gpu.toml");
    let c: BenchConfig = toml::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    assert_eq!(c.grid.models, ["shape:llama3.1-8b", "shape:qwen3-8b"]);
    assert_eq!(c.grid.kv_budget_gib, Some(64.0));
    let cuda = cfg!(feature = "cuda");
    for (p, peer) in [
        (p, false),
        (root.join("benches/gpu/bench-gpu-peer.toml"), true),
        (root.join("benches/gpu/bench-gpu-peer-limit.toml"), true),
    ] {
        let c: BenchConfig = toml::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
        let paged = c.arms.iter().any(|a| a.is_peer() && a.paged_attention);
        assert_eq!(paged, peer, "{}", p.display());
        let loaded = BenchConfig::load(&p).map(|_| ()).map_err(|e| e.to_string());
        let builds = cuda && (!peer || cfg!(feature = "mistralrs-cuda"));
        assert!(loaded.is_ok() == builds, "{}: {loaded:?}", p.display());
        if let Err(e) = loaded {
            assert!(e.contains("--features cuda") || e.contains("--features dms-integration/mistralrs"), "{e}");
        }
    }
}

/// A bench file's arms: this engine's need a policy, mistral.rs's take none, PagedAttention is
/// a mistral.rs setting, and an unknown engine is named.
#[test]
fn bench_arms_are_validated() {
    let dir = std::env::temp_dir().join(format!("dms-bench-arms-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("bench.toml");
    let load = |arm: &str| {
        let text = format!(
            "[model]\nsource = \"x\"\n[grid]\nbatches = [1]\ncontexts = [8]\ndecode_tokens = 2\n\
             [[arm]]\nname = \"full\"\npolicy = {{ name = \"full\" }}\n[[arm]]\nname = \"b\"\n{arm}\n"
        );
        std::fs::write(&path, text).unwrap();
        BenchConfig::load(&path).map(drop).map_err(|e| format!("{e:#}"))
    };
    let e = load("engine = \"mistralrs\"\npolicy = { name = \"full\" }").unwrap_err();
    assert!(e.contains("`b`") && e.contains("no `policy`"), "{e}");
    let e = load("paged_attention = true\npolicy = { name = \"full\" }").unwrap_err();
    assert!(e.contains("`b`") && e.contains("paged_attention"), "{e}");
    let e = load("engine = \"vllm\"").unwrap_err();
    assert!(e.contains("vllm") && e.contains("mistralrs"), "{e}");
    let e = load("engine = \"dms\"").unwrap_err();
    assert!(e.contains("`b`") && e.contains("policy"), "{e}");
    let peer = load("engine = \"mistralrs\"");
    assert_eq!(peer.is_ok(), cfg!(feature = "mistralrs"), "{peer:?}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A mistral.rs arm runs beside this engine's arms on the same folder and the same requests:
/// every cell has its row, with every requested token generated, and its end-to-end rate as a
/// ratio to the full cache's; PagedAttention on the CPU is refused by name when the file is read.
#[cfg(feature = "mistralrs")]
#[test]
fn a_mistralrs_arm_runs_the_same_requests() {
    use candle_core::{DType, Device};
    use dms_integration::assets::export::write_random_hf;
    use dms_integration::model::ModelConfig;

    let dir = std::env::temp_dir().join(format!("dms-bench-peer-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let shape = r#"{"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
        "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 16, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "vocab_size": 256,
        "max_position_embeddings": 512, "tie_word_embeddings": false}"#;
    let model = dir.join("model");
    write_random_hf(&ModelConfig::from_hf_json(shape).unwrap(), &model, &Device::Cpu, DType::F32).unwrap();
    let out = dir.join("grid.json");
    let path = dir.join("bench.toml");
    let text = format!(
        r#"
[model]
source = {model:?}

[grid]
batches = [1, 3]
contexts = [40]
decode_tokens = 5
block_size = 4
output = {out:?}

[[arm]]
name = "full"
policy = {{ name = "full" }}

[[arm]]
name = "mistral.rs"
engine = "mistralrs"
"#
    );
    std::fs::write(&path, &text).unwrap();
    let (json, table) = run_grid(&BenchConfig::load(&path).unwrap()).unwrap();
    let rows = json["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 2 * 2, "{table}");
    for batch in [1u64, 3] {
        let row = |engine: &str| rows.iter().find(|r| r["batch"] == batch && r["engine"] == engine).unwrap();
        for engine in ["dms", "mistralrs"] {
            let r = row(engine);
            assert_eq!(r["generated_tokens"].as_u64(), Some(batch * 6), "{engine} at batch {batch}\n{table}");
            assert!(r["end_to_end_tok_s"].as_f64().unwrap() > 0.0, "{table}");
        }
        let (ours, theirs) = (row("dms"), row("mistralrs"));
        assert_eq!(ours["end_to_end_vs_full"].as_f64(), Some(1.0), "{table}");
        let ratio = theirs["end_to_end_tok_s"].as_f64().unwrap() / ours["end_to_end_tok_s"].as_f64().unwrap();
        assert!((theirs["end_to_end_vs_full"].as_f64().unwrap() / ratio - 1.0).abs() < 1e-9, "{table}");
    }
    // Refused when the file is read, before any arm runs.
    std::fs::write(&path, format!("{text}paged_attention = true\n")).unwrap();
    let e = format!("{:#}", BenchConfig::load(&path).map(drop).unwrap_err());
    assert!(e.contains("mistral.rs") && e.contains("CUDA") && e.contains("mistralrs-cuda"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}
