//! The A/B harness end to end on SmolLM2 with a small local corpus.

mod common;
use common::fixture;
use dms_integration::ab::{plot, run_ab, table, to_json, AbConfig};

fn write(name: &str, text: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("dms-ab-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let corpus: String = ["p3", "p4", "p5"]
        .iter()
        .map(|p| std::fs::read_to_string(fixture(&format!("smollm2/prompts/{p}.txt"))).unwrap())
        .collect::<Vec<_>>()
        .join("\n\n");
    std::fs::write(dir.join("corpus.txt"), corpus).unwrap();
    let path = dir.join("ab.toml");
    std::fs::write(&path, text).unwrap();
    path
}

const AB: &str = r#"
[model]
source = "smollm2-135m"
[cache]
block_size = 8
memory_mb = 256
[workload]
corpus = "corpus.txt"
prompts = 2
prompt_tokens = 48
continuation_tokens = 8
concurrency = 2
[capacity]
memory_mb = 3
requests = 3
prompt_tokens = 24
gen_tokens = 6
[[arm]]
name = "window"
policy = { name = "sliding_window", window = 16, sinks = 2 }
[[arm]]
name = "full"
policy = { name = "full" }
[[arm]]
name = "shadow-window"
policy = { name = "shadow", inner = { name = "sliding_window", window = 16, sinks = 2 } }
"#;

#[test]
fn ab_runs_every_arm_against_the_full_baseline() {
    let path = write("ok", AB);
    let cfg = AbConfig::load(&path).unwrap();
    let (r, peers) = run_ab(&cfg).unwrap();
    assert!(peers.is_empty());
    assert_eq!(r.iter().map(|a| a.name.as_str()).collect::<Vec<_>>(), ["window", "full", "shadow-window"]);
    let (window, full, shadow) = (&r[0], &r[1], &r[2]);
    assert_eq!((full.top1_agreement, full.mean_kl, full.compression_ratio), (1.0, 0.0, 1.0));
    assert!(window.compression_ratio > 2.0 && window.mean_kl > 0.0);
    assert!(full.stats.peak_live > window.stats.peak_live);
    assert_eq!(shadow.top1_agreement, 1.0, "shadow applies full");
    assert!(shadow.mean_kl < 1e-9);
    assert!((shadow.compression_ratio - window.compression_ratio).abs() < 1e-9, "shadow reports the window's CR");
    assert!((shadow.perplexity - full.perplexity).abs() < 1e-6);
    let cap_full = full.capacity.as_ref().unwrap();
    let cap_window = window.capacity.as_ref().unwrap();
    assert!(cap_window.mean_running() >= cap_full.mean_running());
    let t = table(&r);
    assert!(t.contains("| window |") && t.contains("top-1 agree"));
    let j = to_json(&cfg, &r, &peers);
    assert_eq!(j["arms"].as_array().unwrap().len(), 3);
    let svg = path.with_file_name("kv.svg");
    plot(&r, &svg).unwrap();
    let s = std::fs::read_to_string(&svg).unwrap();
    assert!(s.contains("<svg") && s.contains("window"));
}

#[test]
fn bad_ab_files_are_reported() {
    let e =
        AbConfig::load(&write("nofull", &AB.replace("name = \"full\" }", "name = \"sliding_window\", window = 4 }")))
            .unwrap_err();
    assert!(format!("{e:#}").contains("full"), "{e:#}");
    let e = AbConfig::load(&write("dup", &AB.replace("name = \"shadow-window\"", "name = \"window\""))).unwrap_err();
    assert!(format!("{e:#}").contains("two arms"), "{e:#}");
    let e = AbConfig::load(&write("unknown", &AB.replace("name = \"shadow\",", "name = \"shadw\","))).unwrap_err();
    assert!(format!("{e:#}").contains("shadw"), "{e:#}");
    let e = AbConfig::load(&write(
        "engine",
        &AB.replace("name = \"window\"\npolicy", "name = \"window\"\nengine = \"vllm\"\npolicy"),
    ))
    .unwrap_err();
    assert!(format!("{e:#}").contains("vllm"), "{e:#}");
    let e = AbConfig::load(&write("zero", &AB.replace("prompts = 2", "prompts = 0"))).unwrap_err();
    assert!(format!("{e:#}").contains("prompts"), "{e:#}");
}

const PEER: &str = "\n[[arm]]\nname = \"mistral.rs\"\nengine = \"mistralrs\"\n";

#[cfg(feature = "mistralrs")]
#[test]
fn mistralrs_peer_runs_the_same_prompts_and_agrees_with_our_full_arm() {
    let small = AB.replace("[capacity]\nmemory_mb = 3\nrequests = 3\nprompt_tokens = 24\ngen_tokens = 6\n", "");
    let cfg = AbConfig::load(&write("peer", &format!("{small}{PEER}"))).unwrap();
    let (arms, peers) = run_ab(&cfg).unwrap();
    assert_eq!(arms.len(), 3);
    assert_eq!(peers.len(), 1);
    let p = &peers[0];
    // Same f32 weights and the same greedy rule: both engines should agree token for token
    // except at numerical near-ties (different summation orders), so most tokens must match.
    assert!(p.mean_agreeing_prefix >= 6.0, "agreeing prefix {} of {}", p.mean_agreeing_prefix, p.tokens_per_prompt);
    assert!(p.peer_decode_tok_s > 0.0 && p.ours_decode_tok_s > 0.0);
}

#[cfg(not(feature = "mistralrs"))]
#[test]
fn mistralrs_arm_without_the_feature_is_skipped_if_optional_and_an_error_otherwise() {
    let small = AB.replace("[capacity]\nmemory_mb = 3\nrequests = 3\nprompt_tokens = 24\ngen_tokens = 6\n", "");
    let cfg = AbConfig::load(&write("peer-off", &format!("{small}{PEER}optional = true\n"))).unwrap();
    let (_, peers) = run_ab(&cfg).unwrap();
    assert!(peers.is_empty());
    let cfg = AbConfig::load(&write("peer-req", &format!("{small}{PEER}"))).unwrap();
    let e = run_ab(&cfg).unwrap_err();
    assert!(format!("{e:#}").contains("mistralrs"), "{e:#}");
}
