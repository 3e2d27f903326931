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
/// is built in.
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
    let loaded = BenchConfig::load(&p).map(|_| ()).map_err(|e| e.to_string());
    let cuda = cfg!(feature = "cuda");
    assert!(loaded.is_ok() == cuda, "{loaded:?}");
    if let Err(e) = loaded {
        assert!(e.contains("--features cuda"), "{e}");
    }
}
