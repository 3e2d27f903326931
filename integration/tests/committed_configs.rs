//! Every config file committed under `configs/` loads as the command it is written for (engine,
//! A/B, bench, eval, retrofit), every policy table in it names a registered policy, and every
//! adapter or warm start it names is a committed adapter directory. A config a README points a
//! user at must not fail on its first line.

use std::path::{Path, PathBuf};

use dms_integration::config::EngineConfig;
use dms_integration::harness::ab::AbConfig;
use dms_integration::harness::bench_grid::BenchConfig;
use dms_integration::harness::eval::EvalConfig;
use dms_integration::retrofit::RetrofitConfig;
use dms_policy::Registry;

fn configs_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs")
}

/// Which command reads a config file, by its top-level sections.
fn load(path: &Path, doc: &toml::Table) -> anyhow::Result<()> {
    if doc.contains_key("family") {
        EvalConfig::load(path).map(drop)
    } else if doc.contains_key("retrofit") {
        RetrofitConfig::load(path).map(drop)
    } else if doc.contains_key("grid") {
        BenchConfig::load(path).map(drop)
    } else if doc.contains_key("workload") {
        AbConfig::load(path).map(drop)
    } else {
        EngineConfig::load(path).map(drop)
    }
}

/// Policy tables (the values of `policy` and `inner` keys) and adapter directories (`adapter`
/// and `init` values) anywhere in `v`.
fn walk(v: &toml::Value, policies: &mut Vec<toml::Table>, adapters: &mut Vec<String>) {
    match v {
        toml::Value::Table(t) => {
            for (k, x) in t {
                match (k.as_str(), x) {
                    ("policy" | "inner", toml::Value::Table(p)) => policies.push(p.clone()),
                    ("adapter" | "init", toml::Value::String(s)) => adapters.push(s.clone()),
                    _ => {}
                }
                walk(x, policies, adapters);
            }
        }
        toml::Value::Array(a) => a.iter().for_each(|x| walk(x, policies, adapters)),
        _ => {}
    }
}

#[test]
fn every_committed_config_loads_and_names_what_exists() {
    let dir = configs_dir();
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    files.sort();
    assert!(files.len() >= 20, "the configs folder holds the project's configs ({} found)", files.len());
    let registry = Registry::with_builtins();
    let mut checked_adapters = 0;
    for path in &files {
        let name = path.file_name().unwrap().to_string_lossy();
        let doc: toml::Table = toml::from_str(&std::fs::read_to_string(path).unwrap()).unwrap_or_else(|e| {
            panic!("{name}: not TOML: {e}");
        });
        let cuda = doc
            .get("model")
            .and_then(|m| m.get("device"))
            .and_then(|d| d.as_str())
            .is_some_and(|d| d.starts_with("cuda"));
        match load(path, &doc) {
            Ok(()) => {}
            // A GPU config in a build without CUDA says what it needs.
            Err(e) if cuda && !cfg!(feature = "cuda") => {
                assert!(format!("{e:#}").contains("--features cuda"), "{name}: {e:#}")
            }
            Err(e) => panic!("{name}: {e:#}"),
        }
        let (mut policies, mut adapters) = (Vec::new(), Vec::new());
        walk(&toml::Value::Table(doc), &mut policies, &mut adapters);
        for p in &policies {
            registry.check_name(p).unwrap_or_else(|e| panic!("{name}: policy {p}: {e}"));
        }
        for a in &adapters {
            let d = dir.join(a);
            assert!(d.join("config.json").is_file(), "{name}: adapter `{a}` has no config.json at {}", d.display());
            let tensors = std::fs::read_dir(&d)
                .unwrap()
                .any(|e| e.unwrap().path().extension().is_some_and(|x| x == "safetensors"));
            assert!(tensors, "{name}: adapter `{a}` holds no .safetensors file");
            checked_adapters += 1;
        }
    }
    assert!(checked_adapters >= 10, "adapters named by the configs were checked ({checked_adapters})");
}
