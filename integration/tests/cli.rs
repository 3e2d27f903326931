//! The `dms run` command end to end on a tiny model: raw prompt ids, text prompts, summary line,
//! trace format.

mod common;
use std::process::Command;

use common::*;

fn write_config(name: &str, policy: &str) -> std::path::PathBuf {
    write_config_for(name, policy, &fixture("qwen3_tiny"))
}

fn write_config_for(name: &str, policy: &str, model: &std::path::Path) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("dms-cli-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("engine.toml");
    let text = format!(
        "[model]\nsource = {:?}\n[cache]\nblock_size = 4\nmax_tokens = 256\n[cache.policy]\n{policy}\n[generation]\nstop_at_eos = false\n",
        model.display().to_string()
    );
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn run_with_prompt_ids_prints_tokens_summary_and_writes_trace() {
    let g = golden(&fixture("qwen3_tiny/golden.safetensors"));
    let prompt = ids(&g["prompt_ids"]);
    let greedy = ids(&g["greedy_ids"]);
    let cfg = write_config("full", "name = \"full\"");
    let trace = cfg.with_file_name("trace.jsonl");
    let ids_arg = prompt.iter().map(|x| x.to_string()).collect::<Vec<_>>().join(",");
    let out = Command::new(env!("CARGO_BIN_EXE_dms"))
        .args(["run", "--config", cfg.to_str().unwrap(), "--prompt-ids", &ids_arg, "--max-tokens", "6", "--trace"])
        .arg(&trace)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let mut lines = stdout.lines();
    let toks: Vec<u32> = lines.next().unwrap().split(',').map(|x| x.parse().unwrap()).collect();
    assert_eq!(toks, greedy[..6]);
    let summary = lines.next().unwrap();
    for part in ["prompt 40", "generated 6", "prefill", "decode", "KV live", "allocated", "compression ratio 1.00x"] {
        assert!(summary.contains(part), "summary lacks `{part}`: {summary}");
    }
    let text = std::fs::read_to_string(&trace).unwrap();
    let objs: Vec<serde_json::Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    // 6 generated tokens: 5 fed back, so steps 0..=5, each with 2 layer objects and 1 top object.
    assert_eq!(objs.len(), 6 * 3);
    for s in 0..6u64 {
        let step: Vec<&serde_json::Value> = objs.iter().filter(|o| o["step"] == s).collect();
        assert_eq!(step.len(), 3);
        for layer in 0..2u64 {
            let o = step.iter().find(|o| o["layer"] == layer).unwrap();
            let kept = o["kept"].as_array().unwrap();
            assert_eq!(kept.len(), 2, "one array per KV head");
            let want: Vec<u64> = (0..40 + s).collect();
            for row in kept {
                let got: Vec<u64> = row.as_array().unwrap().iter().map(|x| x.as_u64().unwrap()).collect();
                assert_eq!(got, want);
            }
            assert_eq!(o["cr"].as_f64().unwrap(), 1.0);
        }
        let top = step.iter().find(|o| o.get("top").is_some()).unwrap()["top"].as_array().unwrap().clone();
        assert_eq!(top.len(), 10);
        assert_eq!(top[0][0].as_u64().unwrap() as u32, greedy[s as usize], "best token of step {s}");
        let logits: Vec<f64> = top.iter().map(|p| p[1].as_f64().unwrap()).collect();
        assert!(logits.windows(2).all(|w| w[0] >= w[1]), "top is sorted best first");
    }
}

/// A text prompt gets the special tokens the model's tokenizer adds: Llama 3's GGUF adds BOS, a
/// Qwen3 GGUF none; the counts are llama.cpp's (`fixtures/gguf/expected.json`).
#[test]
fn a_text_prompt_gets_the_tokenizers_special_tokens() {
    let expected: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("gguf/expected.json")).unwrap()).unwrap();
    for (file, bos) in [("llama3_tiny.gguf", true), ("qwen3_tiny.gguf", false)] {
        let e = &expected[file];
        assert_eq!(e["texts"][0], "Hello world");
        let n = e["ids_add_special"][0].as_array().unwrap().len();
        assert_eq!(n, e["ids"][0].as_array().unwrap().len() + usize::from(bos), "{file}");
        let cfg = write_config_for(file, "name = \"full\"", &fixture(&format!("gguf/{file}")));
        let out = Command::new(env!("CARGO_BIN_EXE_dms"))
            .args(["run", "--config", cfg.to_str().unwrap(), "--prompt", "Hello world", "--max-tokens", "2"])
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
        assert!(stdout.contains(&format!("prompt {n},")), "{file}: want prompt {n}: {stdout}");
    }
}

#[test]
fn sliding_window_trace_keeps_the_window() {
    let cfg = write_config("window", "name = \"sliding_window\"\nwindow = 8\nsinks = 2");
    let trace = cfg.with_file_name("trace.jsonl");
    let out = Command::new(env!("CARGO_BIN_EXE_dms"))
        .args([
            "run",
            "--config",
            cfg.to_str().unwrap(),
            "--prompt-ids",
            "5,6,7,8,9,10,11,12,13,14,15,16",
            "--max-tokens",
            "3",
            "--trace",
        ])
        .arg(&trace)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = std::fs::read_to_string(&trace).unwrap();
    let first: serde_json::Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
    let kept: Vec<u64> = first["kept"][0].as_array().unwrap().iter().map(|x| x.as_u64().unwrap()).collect();
    assert_eq!(kept, vec![0, 1, 4, 5, 6, 7, 8, 9, 10, 11]);
    assert!((first["cr"].as_f64().unwrap() - 1.2).abs() < 1e-9);
}

/// Runs `dms run` on `cfg`, which must fail without a panic; returns its stderr.
fn run_fails(cfg: &std::path::Path) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_dms"))
        .args(["run", "--config", cfg.to_str().unwrap(), "--prompt-ids", "1,2"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!err.contains("panicked"), "{err}");
    err
}

#[test]
fn cli_reports_bad_config_without_panicking() {
    let err = run_fails(&write_config("bad", "name = \"nope\""));
    assert!(err.contains("unknown cache policy `nope`"), "{err}");
}

#[test]
fn cuda_graphs_on_the_cpu_is_a_clear_error() {
    let cfg = write_config("graphs", "name = \"full\"");
    let text = std::fs::read_to_string(&cfg).unwrap().replace("[cache]\n", "[cache]\ncuda_graphs = true\n");
    std::fs::write(&cfg, text).unwrap();
    let err = run_fails(&cfg);
    assert!(err.contains("cuda_graphs") && err.contains("cuda:N"), "{err}");
}

#[test]
fn run_names_the_adapter_as_the_source_of_its_dms_values() {
    let cfg = write_config("adapter-label", "name = \"dms\"\nadapter = \"adapter\"");
    let adapter = cfg.with_file_name("adapter");
    std::fs::create_dir_all(&adapter).unwrap();
    let mut t = std::collections::HashMap::new();
    for l in 0..2 {
        let p = format!("model.layers.{l}.self_attn.dms_proj_alpha");
        t.insert(
            format!("{p}.weight"),
            candle_core::Tensor::zeros((2, 64), candle_core::DType::F32, &candle_core::Device::Cpu).unwrap(),
        );
        t.insert(
            format!("{p}_norm.weight"),
            candle_core::Tensor::ones(64, candle_core::DType::F32, &candle_core::Device::Cpu).unwrap(),
        );
    }
    candle_core::safetensors::save(&t, adapter.join("adapter.safetensors")).unwrap();
    std::fs::write(adapter.join("config.json"), r#"{"dms_window_size": 4, "dms_separate_alpha": true}"#).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_dms"))
        .args(["run", "--config", cfg.to_str().unwrap(), "--prompt-ids", "1,2,3", "--max-tokens", "2"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("window = 4 (adapter)"), "{stderr}");
}

#[test]
fn serve_refuses_a_kv_pool_larger_than_the_machine() {
    let dir = std::env::temp_dir().join(format!("dms-cli-{}-pool", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("serve.toml");
    // 100 TB of KV blocks: the host store would grow until the kernel killed the server.
    let text = "[model]\nsource = \"smollm2-135m\"\n[cache]\nmemory_mb = 100000000\n[cache.policy]\nname = \"full\"\n[server]\nport = 0\n";
    std::fs::write(&cfg, text).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_dms"))
        .args(["serve", "--config", cfg.to_str().unwrap()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let started = std::time::Instant::now();
    while child.try_wait().unwrap().is_none() {
        if started.elapsed() > std::time::Duration::from_secs(120) {
            child.kill().unwrap();
            panic!("the server started with a pool larger than the machine");
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked") && err.contains("memory_mb") && err.contains("GiB of memory"), "{err}");
}
