//! The A/B harness end to end on SmolLM2 with a small local corpus.

mod common;
use common::fixture;
use dms_integration::harness::ab::{plot, run_ab, table, to_json, AbConfig};

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
    let llama = "\n[[arm]]\nname = \"llama.cpp\"\nengine = \"llama.cpp\"\nconcurrency = 4\n";
    let e = AbConfig::load(&write("conc-llama", &format!("{AB}{llama}"))).unwrap_err();
    assert!(format!("{e:#}").contains("one sequence"), "{e:#}");
    let e = AbConfig::load(&write("vs-unknown", &format!("{AB}{PEER}concurrency = 2\nvs = \"nope\"\n"))).unwrap_err();
    assert!(format!("{e:#}").contains("`vs = \"nope\"` names no arm"), "{e:#}");
    let e = AbConfig::load(&write("vs-alone", &format!("{AB}{PEER}vs = \"window\"\n"))).unwrap_err();
    assert!(format!("{e:#}").contains("needs `concurrency`"), "{e:#}");
    // `[model] context` is ours alone: refused beside a peer, taken without one.
    let with_context = AB.replacen("[model]\n", "[model]\ncontext = 64\n", 1);
    assert!(with_context.contains("context = 64"));
    let e = AbConfig::load(&write("context-peer", &format!("{with_context}{PEER}"))).unwrap_err();
    assert!(format!("{e:#}").contains("[model] context applies to our arms only"), "{e:#}");
    assert!(AbConfig::load(&write("context-alone", &with_context)).is_ok());
}

const PEER: &str = "\n[[arm]]\nname = \"mistral.rs\"\nengine = \"mistralrs\"\n";

#[cfg(feature = "mistralrs")]
#[test]
fn mistralrs_peer_runs_the_same_prompts_and_agrees_with_our_full_arm() {
    let small = AB.replace("[capacity]\nmemory_mb = 3\nrequests = 3\nprompt_tokens = 24\ngen_tokens = 6\n", "");
    let cfg = AbConfig::load(&write("peer", &format!("{small}{PEER}concurrency = 2\nvs = \"window\"\n"))).unwrap();
    let (arms, peers) = run_ab(&cfg).unwrap();
    assert_eq!(arms.len(), 3);
    assert_eq!(peers.len(), 1);
    let p = &peers[0];
    // Same f32 weights and the same greedy rule: both engines should agree token for token
    // except at numerical near-ties (different summation orders), so most tokens must match.
    assert!(p.mean_agreeing_prefix >= 6.0, "agreeing prefix {} of {}", p.mean_agreeing_prefix, p.tokens_per_prompt);
    assert!(p.peer_decode_tok_s > 0.0 && p.ours_decode_tok_s > 0.0);
    let c = p.concurrent.as_ref().expect("the arm asked for a concurrent run");
    assert_eq!((c.requests, c.ours.as_str()), (2, "window"));
    assert!(c.ours_tok_s > 0.0 && c.peer_tok_s > 0.0);
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

#[test]
fn mla_arms_use_their_own_full_baseline_and_report_latent_times_cr() {
    let mla = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/models/mla-small/config.json");
    let small = AB.replace("[capacity]\nmemory_mb = 3\nrequests = 3\nprompt_tokens = 24\ngen_tokens = 6\n", "");
    let arms = format!(
        "{small}[[arm]]\nname = \"mla-dms\"\nmodel = {m:?}\npolicy = {{ name = \"dms\", window = 4, decision = \"random\", evict_rate = 0.8 }}\n\
         [[arm]]\nname = \"mla-full\"\nmodel = {m:?}\npolicy = {{ name = \"full\" }}\n",
        m = mla.display().to_string()
    );
    let cfg = AbConfig::load(&write("mla", &arms)).unwrap();
    let (r, _) = run_ab(&cfg).unwrap();
    let by = |n: &str| r.iter().find(|a| a.name == n).unwrap();
    let (full, mla_full, mla_dms) = (by("full"), by("mla-full"), by("mla-dms"));
    // 9 heads x (64 + 32 + 64) floats of per-head K/V vs a 128 + 32 latent row.
    assert_eq!((full.latent_factor, mla_full.latent_factor), (1.0, 9.0));
    assert_eq!((mla_full.top1_agreement, mla_full.mean_kl), (1.0, 0.0), "MLA full is its own baseline");
    assert!(mla_dms.has_baseline && mla_dms.compression_ratio > 2.0 && mla_dms.mean_kl > 0.0);
    assert!(mla_dms.stats.peak_live < mla_full.stats.peak_live);
    // 48 + 7 fed tokens x 12 layers x 160 floats x 4 B per sequence, 2 sequences, at the end.
    assert_eq!(mla_full.stats.memory_trace.last().unwrap().1, 2 * 55 * 12 * 160 * 4);
    let t = table(&r);
    assert!(t.contains("9.00 x"), "{t}");
    // Random weights: perplexity and top-1 agreement are printed as n/a, KL against its own full arm.
    assert!(mla_dms.random_weights && !full.random_weights);
    let row = |n: &str| t.lines().find(|l| l.starts_with(&format!("| {n} |"))).unwrap().to_string();
    let cells = |l: String| l.split('|').map(|c| c.trim().to_string()).collect::<Vec<_>>();
    let (dms_row, full_row) = (cells(row("mla-dms")), cells(row("full")));
    assert_eq!((dms_row[9].as_str(), dms_row[10].as_str(), dms_row[12].as_str()), ("n/a", "n/a", "n/a"), "{t}");
    assert_eq!(dms_row[11], format!("{:.4}", mla_dms.mean_kl), "{t}");
    assert_eq!(full_row[12], format!("{:.2}", full.perplexity), "{t}");
    let (agree, counted) = full.confident_agreement;
    assert!(agree == counted && counted > 0, "the full arm agrees with itself wherever it is confident");
    assert_eq!(full_row[10], format!("{agree}/{counted}"), "{t}");
    let e = AbConfig::load(&write(
        "mla-vocab",
        &arms.replace(&mla.display().to_string(), &fixture("deepseek_mla_tiny").display().to_string()),
    ))
    .and_then(|c| run_ab(&c).map(|_| ()))
    .unwrap_err();
    assert!(format!("{e:#}").contains("vocabulary"), "{e:#}");
}

#[test]
fn eval_calibrates_each_family_to_the_target_cr_and_writes_the_report() {
    use dms_integration::harness::eval::{
        plot as eval_plot, run_eval, table as eval_table, to_json as eval_json, EvalConfig,
    };
    let text = r#"
[model]
source = "smollm2-135m"
[cache]
block_size = 8
memory_mb = 256
[quality]
text = "corpus.txt"
prompts = 2
prompt_tokens = 64
continuation_tokens = 8
concurrency = 2
[calibration]
targets = [2.0, 3.0]
tolerance = 0.05
max_runs = 12
prompts = 1
[[family]]
name = "window"
policy = { name = "sliding_window", sinks = 2 }
knob = "window"
range = [2, 512]
integer = true
[[family]]
name = "keynorm"
policy = { name = "dms", decision = "key_norm", window = 4, alpha_scale = 1.0 }
knob = "alpha_offset"
range = [0.0, 80.0]
[needle]
context_tokens = [160]
depths = [0.25, 0.75]
trials = 3
answer_tokens = 4
"#;
    let path = write("eval", text);
    let cfg = EvalConfig::load(&path).unwrap();
    let r = run_eval(&cfg).unwrap();
    assert_eq!(r.cells.len(), 4);
    for c in &r.cells {
        let q = c.quality.as_ref().unwrap();
        assert!(c.matched, "{} at CR {}: measured {}", c.family, c.target, q.cr);
        assert!((q.cr / c.target - 1.0).abs() <= 0.05, "{} at {}: {}", c.family, c.target, q.cr);
        assert!(q.top1_agreement <= 1.0 && q.mean_kl > 0.0 && q.perplexity.is_finite());
        // With two prompts the percentile interval spans the resamples' extremes, which bracket
        // the pooled estimate of the sample itself.
        for (x, [lo, hi]) in
            [(q.top1_agreement, q.top1_agreement_ci), (q.mean_kl, q.mean_kl_ci), (q.perplexity, q.perplexity_ci)]
        {
            assert!(lo <= x + 1e-12 && x <= hi + 1e-12, "{}: {x} outside [{lo}, {hi}]", c.family);
        }
        let n = c.needle.as_ref().unwrap();
        assert!((n.cr / c.target - 1.0).abs() <= 0.05, "needle CR {} vs {}", n.cr, c.target);
        assert_eq!((n.trials, n.answers.len()), (3, 3));
    }
    // Evicting more costs quality: the window's KL grows from CR 2 to CR 3.
    let kl = |i: usize| r.cells[i].quality.as_ref().unwrap().mean_kl;
    assert!(kl(1) > kl(0));
    // Each cell's per-prompt sums pool to its figures.
    for c in &r.cells {
        let mut total = dms_integration::harness::stats::PromptSums::default();
        c.per_prompt.iter().for_each(|p| total.add(p));
        let [top1, kl, ppl] = total.pooled();
        let q = c.quality.as_ref().unwrap();
        assert_eq!(c.per_prompt.len(), 2);
        assert!((top1 - q.top1_agreement).abs() < 1e-12 && (kl - q.mean_kl).abs() < 1e-12, "{}", c.family);
        assert!((ppl / q.perplexity - 1.0).abs() < 1e-12, "{}", c.family);
    }
    // The key-norm cells against the window's at the same target, on the same two prompts of
    // equal length: the paired differences of agreement and KL are the mean of the two prompts'
    // differences, inside the resamples' range.
    let paired = dms_integration::harness::eval::paired_vs_first(&r);
    assert_eq!(paired.len(), 2);
    for p in &paired {
        assert_eq!((p.first.family.as_str(), p.other.family.as_str()), ("window", "keynorm"));
        assert_eq!(p.first.target, p.other.target);
        let (a, b) = (p.first.quality.as_ref().unwrap(), p.other.quality.as_ref().unwrap());
        assert!((p.diff[1] - (a.mean_kl - b.mean_kl)).abs() < 1e-12);
        for m in [0, 1] {
            let [lo, hi] = p.ci[m];
            assert!(
                lo <= p.diff[m] + 1e-12 && p.diff[m] <= hi + 1e-12,
                "figure {m}: {} outside [{lo}, {hi}]",
                p.diff[m]
            );
        }
    }
    let t = eval_table(&cfg, &r);
    assert!(t.contains("Paired differences, the first family") && t.contains("| window | keynorm | 3 |"), "{t}");
    assert!(t.contains("| window | 2 |") && t.contains("| keynorm | 3 |"), "{t}");
    let json = eval_json(&cfg, &r);
    assert_eq!(json["cells"].as_array().unwrap().len(), 4);
    assert_eq!(json["cells"][0]["mean_kl_ci"].as_array().unwrap().len(), 2);
    assert_eq!(json["cells"][0]["per_prompt"].as_array().unwrap().len(), 2);
    assert_eq!(json["paired_vs_first"][1]["other"], "keynorm");
    assert_eq!(json["paired_vs_first"][1]["mean_kl_diff_ci"].as_array().unwrap().len(), 2);
    let svg = path.with_file_name("q.svg");
    eval_plot(&r, &svg).unwrap();
    assert!(std::fs::read_to_string(&svg).unwrap().contains("keynorm"));
    // The needle test alone: no teacher-forced pass, each knob calibrated on the needle runs. The
    // full cache's answers do not depend on the quality prompts, so they equal the run above's.
    let needle_only = EvalConfig::load(&write("eval-needle", &text.replace("prompts = 2", "prompts = 0"))).unwrap();
    let n = run_eval(&needle_only).unwrap();
    let (full, full_alone) = (r.full_needle.as_ref().unwrap(), n.full_needle.as_ref().unwrap());
    assert_eq!((full_alone.hits, &full_alone.answers), (full.hits, &full.answers));
    assert!(n.full_perplexity.is_none() && n.full_per_prompt.is_empty());
    assert_eq!(n.cells.len(), 4);
    for c in &n.cells {
        let nr = c.needle.as_ref().unwrap();
        assert!(c.quality.is_none() && c.per_prompt.is_empty(), "{}", c.family);
        assert!(
            c.matched && (nr.cr / c.target - 1.0).abs() <= 0.05,
            "{} needle CR {} vs {}",
            c.family,
            nr.cr,
            c.target
        );
        assert_eq!(nr.knob, Some(c.knob));
    }
    let t = eval_table(&needle_only, &n);
    assert!(t.contains("the needle test alone") && t.contains("| needle CR | needle hits |"), "{t}");
    assert!(!t.contains("top-1") && !t.contains("Paired differences"), "{t}");
    let json = eval_json(&needle_only, &n);
    assert!(json["cells"][0].get("mean_kl").is_none() && json["cells"][0]["needle"]["trials"] == 3, "{json}");
    assert!(json["full"]["perplexity"].is_null() && json["paired_vs_first"].as_array().unwrap().is_empty());
    eval_plot(&n, &svg).unwrap();
    assert!(std::fs::read_to_string(&svg).unwrap().contains("needle retrieval"));
    let nothing = text.replace("prompts = 2", "prompts = 0").replace("[needle]", "[other]");
    let nothing = nothing.split("[other]").next().unwrap();
    let e = EvalConfig::load(&write("eval-nothing", nothing)).unwrap_err();
    assert!(format!("{e:#}").contains("prompts = 0 leaves nothing to measure"), "{e:#}");
    let short = write("eval-short", &text.replace("text = \"corpus.txt\"", "text = \"short.txt\""));
    std::fs::write(short.with_file_name("short.txt"), "only a few words").unwrap();
    let e = run_eval(&EvalConfig::load(&short).unwrap()).unwrap_err();
    assert!(format!("{e:#}").contains("fewer than one window"), "{e:#}");
    let missing = text.replace("text = \"corpus.txt\"", "text = \"no-such-file.txt\"");
    let e = run_eval(&EvalConfig::load(&write("eval-missing", &missing)).unwrap()).unwrap_err();
    assert!(format!("{e:#}").contains("no-such-file.txt"), "{e:#}");
    let bad = text.replace("targets = [2.0, 3.0]", "targets = [0.5]");
    let e = EvalConfig::load(&write("eval-bad", &bad)).unwrap_err();
    assert!(format!("{e:#}").contains("targets"), "{e:#}");
}
