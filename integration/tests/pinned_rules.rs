//! Behaviour the rest of the suite leaves unpinned (issue 16): `dms_alpha_per = "layer"` (spec
//! rule 1.5) and its validation; which `dms_*` values a run uses (checkpoint, adapter config.json,
//! engine config `[cache.policy]`); preemption with evicting policies; and error paths that must
//! name the problem. Each check has an independent oracle: hand-derived decisions, the spec's
//! rule-8 list, or the same request run alone.

mod common;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use candle_core::{Device, Tensor};
use common::*;
use dms_integration::engine::from_config::{load_adapter, resolve_policy_table};
use dms_integration::engine::scheduler::{run_batch, Finished, Request};
use dms_integration::engine::{argmax, load_model, Engine};
use dms_integration::model::WeightForm;
use dms_policy::{Pos, Registry};
use serde_json::{json, Value};

// ---------------------------------------------------------------------------------------------
// Helpers

fn tmp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("dms-pinned-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn err_of<T>(r: anyhow::Result<T>) -> String {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => format!("{e:#}"),
    }
}

/// A copy of a model fixture (config.json + model.safetensors) with its config.json edited.
fn model_copy(src: &Path, name: &str, edit: impl FnOnce(&mut serde_json::Map<String, Value>)) -> PathBuf {
    let d = tmp_dir(name);
    std::fs::copy(src.join("model.safetensors"), d.join("model.safetensors")).unwrap();
    let mut cfg: Value = serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    edit(cfg.as_object_mut().unwrap());
    std::fs::write(d.join("config.json"), serde_json::to_string_pretty(&cfg).unwrap()).unwrap();
    d
}

/// An NVIDIA-format adapter folder: config.json + adapter.safetensors.
fn adapter_dir(name: &str, tensors: &HashMap<String, Tensor>, config: &Value) -> PathBuf {
    let d = tmp_dir(name);
    candle_core::safetensors::save(tensors, d.join("adapter.safetensors")).unwrap();
    std::fs::write(d.join("config.json"), config.to_string()).unwrap();
    d
}

/// The `dms_proj_alpha{,_norm}` tensors of the separate-alpha fixture, times `sign`.
fn fixture_adapter_tensors(sign: f64) -> HashMap<String, Tensor> {
    let src = fixture("qwen3_dms_tiny/variant_separate_alpha/model/model.safetensors");
    candle_core::safetensors::load(src, &Device::Cpu)
        .unwrap()
        .into_iter()
        .filter(|(k, _)| k.contains("dms_proj_alpha"))
        .map(|(k, t)| {
            let t = if k.ends_with("dms_proj_alpha.weight") { t.affine(sign, 0.0).unwrap() } else { t };
            (k, t)
        })
        .collect()
}

/// Rule 8: kept positions after `n` tokens when token k is flagged iff `flag(k)` (the decision
/// made at token k + 1).
fn rule8(n: usize, w: usize, flag: impl Fn(usize) -> bool) -> Vec<Pos> {
    let mut list: Vec<usize> = Vec::new();
    for t in 0..n {
        list.push(t);
        let len = list.len();
        if len > w + 1 && flag(list[len - w - 2]) {
            list.remove(len - w - 2);
        }
    }
    list.into_iter().map(|p| p as Pos).collect()
}

/// Kept positions per layer and KV head.
type Kept = Vec<Vec<Vec<Pos>>>;

/// One DMS generation: the completed policy table, the tokens fed, what every row kept after the
/// prompt and after each decode step, and every raw decision score the policy received, by
/// (layer, head, position).
struct DmsRun {
    table: toml::Table,
    fed: Vec<u32>,
    prompt_len: usize,
    history: Vec<Kept>,
    kept: Kept,
    scores: HashMap<(usize, usize, Pos), f32>,
}

/// Loads `model_dir`, completes `policy` from it (adapters included), prefills `prompt` and
/// decodes `decode` greedy tokens one at a time.
fn dms_run(model_dir: &Path, policy: &str, prompt: &[u32], decode: usize) -> DmsRun {
    let mut loaded = load_model(model_dir, &Device::Cpu, WeightForm::Dense).unwrap();
    let table = resolve_policy_table(&toml::from_str(policy).unwrap(), &mut loaded.model, None).unwrap();
    let inner = Registry::with_builtins().build(&table).unwrap();
    let log: Log = Arc::default();
    let mut eng = Engine::new(loaded.model, Arc::new(Recording { inner, log: log.clone() }), 4, 1 << 12).unwrap();
    let mut seq = eng.new_sequence();
    let mut logits: Vec<f32> = eng.step(&mut seq, prompt, false).unwrap().squeeze(0).unwrap().to_vec1().unwrap();
    let layers = eng.model.config().num_layers;
    let snapshot = |seq: &dms_integration::kv::sequence::SequenceCache, eng: &Engine| -> Kept {
        (0..layers).map(|l| seq.kept_positions(l, &eng.store)).collect()
    };
    let mut history = vec![snapshot(&seq, &eng)];
    let mut fed = prompt.to_vec();
    for _ in 0..decode {
        let t = argmax(&logits);
        fed.push(t);
        logits = eng.step(&mut seq, &[t], false).unwrap().squeeze(0).unwrap().to_vec1().unwrap();
        history.push(snapshot(&seq, &eng));
    }
    let kept = history.last().unwrap().clone();
    let mut scores = HashMap::new();
    for &(l, h, p, raw) in log.lock().unwrap().iter() {
        assert!(scores.insert((l, h, p), raw).is_none(), "one score per (layer, head, position)");
    }
    DmsRun { table, fed, prompt_len: prompt.len(), history, kept, scores }
}

impl DmsRun {
    /// What rule 8 keeps in every row, after the prompt and after each decode step, when token k
    /// is flagged iff `raw[k+1] * scale - offset > 0` with the scores this run's model produced.
    fn expected(&self, scale: f32, offset: f32, w: usize) -> Vec<Kept> {
        (self.prompt_len..=self.fed.len())
            .map(|n| {
                (0..self.kept.len())
                    .map(|l| {
                        (0..self.kept[l].len())
                            .map(|h| rule8(n, w, |k| self.score(l, h, k + 1) * scale - offset > 0.0))
                            .collect()
                    })
                    .collect()
            })
            .collect()
    }

    /// The raw decision score the policy received for token `t` of row (`layer`, `head`).
    fn score(&self, layer: usize, head: usize, t: usize) -> f32 {
        *self.scores.get(&(layer, head, t as Pos)).unwrap_or_else(|| {
            panic!("no decision score for layer {layer} head {head} token {t}: was eviction disabled?")
        })
    }

    /// A float key of the completed policy table.
    fn table_f32(&self, key: &str) -> Option<f32> {
        self.table.get(key).and_then(|v| v.as_float()).map(|x| x as f32)
    }

    /// An integer key of the completed policy table.
    fn table_int(&self, key: &str) -> Option<i64> {
        self.table.get(key).and_then(|v| v.as_integer())
    }

    /// A boolean key of the completed policy table.
    fn table_bool(&self, key: &str) -> Option<bool> {
        self.table.get(key).and_then(|v| v.as_bool())
    }
}

const SEPARATE_ALPHA: &str = "qwen3_dms_tiny/variant_separate_alpha";

fn dms_prompt() -> Vec<u32> {
    ids(&golden(&fixture(&format!("{SEPARATE_ALPHA}/golden.safetensors")))["prompt_ids"])
}

// ---------------------------------------------------------------------------------------------
// Rule 1.5: dms_alpha_per = "layer"

const J: usize = 5;

/// An adapter whose head 0 reads +x[J] and head 1 reads -x[J] of the RMS-normalised residual
/// (norm weights 1), with offset 0: in layer 0 (whose input is the token embedding) head 0 flags
/// token k iff embed[token k+1][J] > 0 and head 1 iff it is < 0, since RMS normalisation keeps signs.
fn sign_adapter(tag: &str, alpha_per: &str) -> PathBuf {
    let mut t = HashMap::new();
    for l in 0..2 {
        let mut w = vec![0f32; 2 * 64];
        w[J] = 1.0;
        w[64 + J] = -1.0;
        let a = format!("model.layers.{l}.self_attn.dms_proj_alpha");
        t.insert(format!("{a}.weight"), Tensor::from_vec(w, (2, 64), &Device::Cpu).unwrap());
        t.insert(format!("{a}_norm.weight"), Tensor::ones(64, candle_core::DType::F32, &Device::Cpu).unwrap());
    }
    let cfg = json!({"dms_window_size": 2, "dms_alpha_scale": 100.0, "dms_initial_alpha_offset": 0.0,
                     "dms_separate_alpha": true, "dms_alpha_per": alpha_per});
    adapter_dir(&format!("sign-adapter-{tag}-{alpha_per}"), &t, &cfg)
}

/// Rule 1.5: with "layer" every head of every layer follows head 0's decision (scores and kept
/// sets equal head 0's, and layer 0's equal the hand-derived head-0 decisions); with "head" the
/// same adapter's heads decide apart (head 1's score is exactly minus head 0's).
#[test]
fn alpha_per_layer_makes_every_head_follow_head_0() {
    let embed: Vec<Vec<f32>> = candle_core::safetensors::load(fixture("qwen3_tiny/model.safetensors"), &Device::Cpu)
        .unwrap()["model.embed_tokens.weight"]
        .to_vec2()
        .unwrap();
    let prompt: Vec<u32> = (0..24u32).map(|i| (i * 37 + 11) % 512).collect();
    for alpha_per in ["head", "layer"] {
        let adapter = sign_adapter("rule-1-5", alpha_per);
        let policy = format!("name = 'dms'\nadapter = {:?}", adapter.display().to_string());
        let run = dms_run(&fixture("qwen3_tiny"), &policy, &prompt, 8);
        assert_eq!(run.table_int("window"), Some(2));
        let x = |k: usize| {
            let v = embed[run.fed[k + 1] as usize][J];
            assert!(v != 0.0);
            v
        };
        for (i, kept) in run.history.iter().enumerate() {
            let n = prompt.len() + i;
            let head0 = rule8(n, 2, |k| x(k) > 0.0);
            let head1 = rule8(n, 2, |k| x(k) < 0.0);
            assert_ne!(head0, head1, "the prompt must tell the two heads apart");
            match alpha_per {
                "layer" => {
                    assert_eq!(kept[0], vec![head0.clone(), head0], "{n} tokens: layer 0 follows head 0");
                    assert_eq!(kept[1][1], kept[1][0], "{n} tokens: layer 1, head 1 keeps what head 0 keeps");
                }
                _ => assert_eq!(kept[0], vec![head0, head1], "{n} tokens: layer 0, each head its own decisions"),
            }
        }
        for l in 0..2 {
            for p in 0..run.fed.len() as Pos {
                let (s0, s1) = (run.scores[&(l, 0, p)], run.scores[&(l, 1, p)]);
                match alpha_per {
                    "layer" => assert_eq!(s1, s0, "layer {l} position {p}: head 1 gets head 0's score"),
                    _ => assert_eq!(s1, -s0, "layer {l} position {p}: per-head scores"),
                }
            }
        }
    }
}

/// Rule 1.5 from a checkpoint's own config.json: NVIDIA's fixture with "layer" keeps in layer 0,
/// for both heads, exactly what the reference's head-0 decisions imply (layer 0 reads only the
/// embeddings, so head 0's decisions are the reference's whatever the granularity).
#[test]
fn alpha_per_layer_from_the_checkpoint_follows_the_reference_head_0() {
    let g = golden(&fixture(&format!("{SEPARATE_ALPHA}/golden.safetensors")));
    let dec: Vec<Vec<Vec<i64>>> = g["decisions"].to_dtype(candle_core::DType::I64).unwrap().to_vec3().unwrap();
    let dir = model_copy(&fixture(&format!("{SEPARATE_ALPHA}/model")), "ckpt-layer", |c| {
        c.insert("dms_alpha_per".into(), json!("layer"));
    });
    let run = dms_run(&dir, "name = 'dms'", &dms_prompt(), 0);
    let head0 = rule8(48, 8, |k| dec[0][0][k + 1] == 1);
    assert_eq!(run.kept[0], vec![head0.clone(), head0], "layer 0, both heads");
    assert_eq!(run.kept[1][1], run.kept[1][0], "layer 1");
    assert_ne!(run.kept[0][1], presence(&g, 0)[0][1], "per-head, head 1 would keep another set");
}

/// Rule 1.5 for a query-neuron checkpoint: with "layer" every KV head's score is head 0's, in
/// every layer; in layer 0 (which reads only the embeddings) that is the per-head run's head-0
/// score, the reference's.
#[test]
fn query_neuron_alpha_per_layer_gives_every_head_head_0s_score() {
    const QUERY_NEURON: &str = "qwen3_dms_tiny/variant_query_neuron";
    let model = fixture(&format!("{QUERY_NEURON}/model"));
    let prompt = ids(&golden(&fixture(&format!("{QUERY_NEURON}/golden.safetensors")))["prompt_ids"]);
    let per_head = dms_run(&model, "name = 'dms'", &prompt, 0);
    let dir = model_copy(&model, "query-neuron-layer", |c| {
        c.insert("dms_alpha_per".into(), json!("layer"));
    });
    let layer = dms_run(&dir, "name = 'dms'", &prompt, 0);
    assert!(!layer.scores.is_empty());
    for (&(l, h, p), &s) in &layer.scores {
        assert_eq!(s, layer.scores[&(l, 0, p)], "layer {l} head {h} position {p}: head 0's score");
        if l == 0 {
            assert_eq!(s, per_head.scores[&(0, 0, p)], "layer 0 position {p}: the per-head run's head 0");
        }
    }
    let heads_differ = per_head.scores.iter().any(|(&(l, h, p), &s)| h > 0 && s != per_head.scores[&(l, 0, p)]);
    assert!(heads_differ, "per head, the heads' scores differ");
}

/// Rule 1.5's field takes "head" or "layer" only: anything else, in a checkpoint's config.json
/// or an adapter's, is an error naming the field (not a silent "head").
#[test]
fn alpha_per_other_than_head_or_layer_is_an_error_naming_the_field() {
    for bad in [json!("Layer"), json!("per_layer"), json!(1)] {
        let dir = model_copy(&fixture(&format!("{SEPARATE_ALPHA}/model")), "bad-alpha-per", |c| {
            c.insert("dms_alpha_per".into(), bad.clone());
        });
        let e = err_of(load_model(&dir, &Device::Cpu, WeightForm::Dense));
        assert!(e.contains("dms_alpha_per") && e.contains(&bad.to_string()), "{bad}: {e}");

        let adapter = adapter_dir(
            "bad-alpha-per-adapter",
            &fixture_adapter_tensors(1.0),
            &json!({"dms_window_size": 4, "dms_separate_alpha": true, "dms_alpha_per": bad.clone()}),
        );
        let mut loaded = load_model(&fixture("qwen3_tiny"), &Device::Cpu, WeightForm::Dense).unwrap();
        let e = err_of(load_adapter(&adapter, "bad-alpha-per", &mut loaded.model));
        assert!(e.contains("dms_alpha_per") && e.contains(&bad.to_string()), "adapter {bad}: {e}");
    }
    for good in [json!("head"), json!("layer"), Value::Null] {
        let dir = model_copy(&fixture(&format!("{SEPARATE_ALPHA}/model")), "good-alpha-per", |c| {
            c.insert("dms_alpha_per".into(), good.clone());
        });
        assert!(load_model(&dir, &Device::Cpu, WeightForm::Dense).is_ok(), "{good}");
    }
}

// ---------------------------------------------------------------------------------------------
// Which dms_* values a run uses: engine config > adapter config.json > checkpoint config.json

/// The separate-alpha fixture with non-default checkpoint values: W 3, scale 40, offset 8.
fn custom_checkpoint(name: &str, disable: bool) -> PathBuf {
    model_copy(&fixture(&format!("{SEPARATE_ALPHA}/model")), name, |c| {
        c.insert("dms_window_size".into(), json!(3));
        c.insert("dms_alpha_scale".into(), json!(40.0));
        c.insert("dms_initial_alpha_offset".into(), json!(8.0));
        c.insert("dms_disable_eviction".into(), json!(disable));
    })
}

/// The checkpoint's dms_* fields fill the keys a dms table omits, and the run's evictions follow
/// them (rule 8 on the run's own scores with W 3, flag iff raw * 40 - 8 > 0), not the defaults.
#[test]
fn checkpoint_dms_values_are_used_when_the_table_omits_them() {
    let dir = custom_checkpoint("ckpt-values", false);
    let run = dms_run(&dir, "name = 'dms'", &dms_prompt(), 12);
    assert_eq!(run.history, run.expected(40.0, 8.0, 3), "evictions follow W 3, scale 40, offset 8");
    assert_ne!(run.history, run.expected(100.0, 5.0, 3), "the scale and offset change what is kept");
    assert_ne!(run.history, run.expected(40.0, 8.0, 8), "the window changes what is kept");
    assert_eq!(run.table_int("window"), Some(3));
    assert_eq!((run.table_f32("alpha_scale"), run.table_f32("alpha_offset")), (Some(40.0), Some(8.0)));
    assert_eq!(run.table_bool("disable_eviction"), Some(false));

    // dms_disable_eviction = true in the checkpoint: no scores are computed, nothing leaves.
    let dir = custom_checkpoint("ckpt-disabled", true);
    let run = dms_run(&dir, "name = 'dms'", &dms_prompt(), 12);
    assert!(run.scores.is_empty(), "no decision scores with eviction disabled");
    for row in run.kept.iter().flatten() {
        assert_eq!(row, &(0..60).collect::<Vec<Pos>>());
    }
}

/// A `shadow` policy's inner `dms` table is completed from the checkpoint exactly like a bare one
/// (it once was left as written: "no dms_window_size", checkpoint scale and offset ignored).
#[test]
fn shadowed_dms_tables_take_the_checkpoint_values_too() {
    let dir = custom_checkpoint("ckpt-shadow", false);
    let mut model = load_model(&dir, &Device::Cpu, WeightForm::Dense).unwrap().model;
    let table: toml::Table = toml::from_str("name = 'shadow'\ninner = { name = 'dms', alpha_offset = 1.5 }").unwrap();
    let resolved = resolve_policy_table(&table, &mut model, None).unwrap();
    let inner = resolved["inner"].as_table().unwrap();
    assert_eq!(inner["window"].as_integer(), Some(3));
    assert_eq!(inner["alpha_scale"].as_float(), Some(40.0));
    assert_eq!(inner["alpha_offset"].as_float(), Some(1.5), "the table's own key wins");
    assert_eq!(inner["disable_eviction"].as_bool(), Some(false));
    let policy = Registry::with_builtins().build(&resolved).unwrap();
    assert_eq!(policy.name(), "shadow");
}

/// Keys the engine config's [cache.policy] sets win over the checkpoint's, key by key.
#[test]
fn engine_config_keys_override_the_checkpoint_key_by_key() {
    let dir = custom_checkpoint("ckpt-override", true);
    let run =
        dms_run(&dir, "name = 'dms'\nwindow = 5\nalpha_offset = 1.5\ndisable_eviction = false", &dms_prompt(), 12);
    assert_eq!(
        run.history,
        run.expected(40.0, 1.5, 5),
        "W 5 and offset 1.5 from the table, scale 40 from the checkpoint"
    );
    assert_ne!(run.history, run.expected(40.0, 8.0, 5));
    assert_ne!(run.history, run.expected(40.0, 1.5, 3));
    assert_eq!(run.table_int("window"), Some(5));
    assert_eq!((run.table_f32("alpha_scale"), run.table_f32("alpha_offset")), (Some(40.0), Some(1.5)));
}

/// An attached adapter's config.json replaces the checkpoint's dms_* fields it sets (the others
/// stay the checkpoint's), its tensors replace the checkpoint's decisions, and the engine config
/// still wins over both.
#[test]
fn adapter_config_overrides_the_checkpoint_and_the_engine_config_overrides_both() {
    let ckpt = custom_checkpoint("ckpt-adapter", false);
    // Negated projection: its scores are exactly minus the checkpoint's own adapter's.
    let adapter = adapter_dir(
        "partial-adapter",
        &fixture_adapter_tensors(-1.0),
        &json!({"dms_window_size": 4, "dms_alpha_scale": 60.0, "dms_disable_eviction": false}),
    );
    let a = format!("adapter = {:?}", adapter.display().to_string());
    let own = dms_run(&ckpt, "name = 'dms'", &dms_prompt(), 0);
    let run = dms_run(&ckpt, &format!("name = 'dms'\n{a}"), &dms_prompt(), 12);
    for h in 0..2 {
        for p in 0..48 {
            assert_eq!(run.scores[&(0, h, p)], -own.scores[&(0, h, p)], "layer 0 reads the adapter's tensors");
        }
    }
    assert_eq!(
        run.history,
        run.expected(60.0, 8.0, 4),
        "W 4 and scale 60 from the adapter, offset 8 from the checkpoint"
    );
    assert_ne!(run.history, run.expected(40.0, 8.0, 4));
    assert_ne!(run.history, run.expected(60.0, 8.0, 3));
    assert_eq!(run.table_int("window"), Some(4));
    assert_eq!((run.table_f32("alpha_scale"), run.table_f32("alpha_offset")), (Some(60.0), Some(8.0)));

    let run = dms_run(&ckpt, &format!("name = 'dms'\n{a}\nalpha_scale = 25.0\nwindow = 2"), &dms_prompt(), 12);
    assert_eq!(run.history, run.expected(25.0, 8.0, 2), "the table's W 2 and scale 25 win over the adapter's");
    assert_eq!((run.table_f32("alpha_scale"), run.table_int("window")), (Some(25.0), Some(2)));

    // The adapter's dms_disable_eviction = true wins over the checkpoint's false ...
    let off = adapter_dir("disabling-adapter", &fixture_adapter_tensors(1.0), &json!({"dms_disable_eviction": true}));
    let b = format!("adapter = {:?}", off.display().to_string());
    let run = dms_run(&ckpt, &format!("name = 'dms'\n{b}"), &dms_prompt(), 4);
    assert!(run.scores.is_empty() && run.kept.iter().flatten().all(|r| r.len() == 52), "nothing evicted");
    // ... and the engine config's false wins over the adapter's true.
    let run = dms_run(&ckpt, &format!("name = 'dms'\n{b}\ndisable_eviction = false"), &dms_prompt(), 4);
    assert_eq!(run.history, run.expected(40.0, 8.0, 3), "the checkpoint's W, scale and offset");
    assert!(run.kept.iter().flatten().any(|r| r.len() < 52));
}

// ---------------------------------------------------------------------------------------------
// Preemption with evicting policies

/// A preempted sequence of an evicting policy resumes with the output it has alone in a pool that
/// never preempts. A `full` request admitted first grows until the pool runs short, so the
/// evicting requests (admitted after it) are the ones swapped out, mid-decode, after their slots
/// were reused in place and compacted out of position order.
fn preempted_sequences_resume_with_identical_output(table: &str) {
    let mut big = batch_engine(1 << 14);
    let full = resolved_policy(&mut big, "name = 'full'");
    let evicting = resolved_policy(&mut big, table);
    let reqs: Vec<Request> = (0..4)
        .map(|i| Request {
            id: i,
            prompt: (0..10 + 3 * i).map(|j| ((j * 7 + i * 131) % 500) as u32 + 3).collect(),
            forced: None,
            policy: if i == 0 { full.clone() } else { evicting.clone() },
            params: None,
        })
        .collect();
    let alone: Vec<Finished> = reqs
        .iter()
        .map(|r| run_batch(&mut big, vec![r.clone()], &greedy_params(40), 1, true, |_| {}).unwrap().0.pop().unwrap())
        .collect();
    // 80 blocks of 4 tokens: the full request alone ends at 13 blocks x 4 rows.
    let mut small = batch_engine(80);
    let (got, stats) = run_batch(&mut small, reqs, &greedy_params(40), 8, true, |_| {}).unwrap();
    assert!(stats.max_running >= 3, "sequences decode together ({})", stats.max_running);
    assert!(got[1..].iter().any(|f| f.preemptions > 0), "an evicting request was preempted");
    for (g, w) in got.iter().zip(&alone) {
        assert_eq!(w.preemptions, 0, "alone, nothing is preempted");
        assert_eq!(g.tokens, w.tokens, "request {} tokens", g.id);
        for (a, b) in g.step_logits.iter().zip(&w.step_logits) {
            assert!(max_abs(a, b) < 1e-4, "request {} logits", g.id);
        }
        assert!((g.compression_ratio - w.compression_ratio).abs() < 1e-12, "request {} CR", g.id);
        if g.id > 0 {
            assert!(g.compression_ratio > 1.3, "request {} evicts ({})", g.id, g.compression_ratio);
        }
    }
    assert_eq!(small.store.free_block_count(), small.store.capacity_blocks(), "blocks returned");
}

/// Preemption resumes exactly: `dms` with synthetic random decisions.
#[test]
fn preempted_dms_random_sequences_resume_with_identical_output() {
    preempted_sequences_resume_with_identical_output(
        "name = 'dms'\ndecision = 'random'\nevict_rate = 0.5\nwindow = 3\nseed = 4",
    );
}

/// Preemption resumes exactly: `dms` with the checkpoint's learned adapter decisions.
#[test]
fn preempted_dms_learned_sequences_resume_with_identical_output() {
    preempted_sequences_resume_with_identical_output("name = 'dms'\nwindow = 3");
}

/// Preemption resumes exactly: `sliding_window` with sinks.
#[test]
fn preempted_sliding_window_sequences_resume_with_identical_output() {
    preempted_sequences_resume_with_identical_output("name = 'sliding_window'\nwindow = 6\nsinks = 2");
}

// ---------------------------------------------------------------------------------------------
// Several adapters in one model: each sequence reads the decisions its policy names

/// The separate-alpha fixture's adapter with its projections negated (W 3, offset 0): it flags
/// what the checkpoint's own weights keep, and the other way round.
fn negated_adapter(tag: &str) -> PathBuf {
    let cfg = json!({"dms_window_size": 3, "dms_alpha_scale": 100.0, "dms_initial_alpha_offset": 0.0,
                     "dms_separate_alpha": true});
    adapter_dir(&format!("negated-{tag}"), &fixture_adapter_tensors(-1.0), &cfg)
}

/// Policies reading three sets of decision weights (the checkpoint's own, a negated copy, the
/// sign adapter) and a full cache decode in one batch of one model holding all three, and each
/// request gets exactly what it gets alone in a model holding only its own adapter: the same
/// tokens, logits within 1e-4 and the same compression ratio. The adapters must matter: alone,
/// the learned arms' compression ratios differ.
#[test]
fn sequences_under_different_adapters_decode_together_as_they_do_alone() {
    let tables = [
        "name = 'dms'\nwindow = 3\nalpha_offset = 0.0".to_string(),
        format!("name = 'dms'\nadapter = {:?}", negated_adapter("batched").display().to_string()),
        format!("name = 'dms'\nadapter = {:?}", sign_adapter("batched", "head").display().to_string()),
        "name = 'full'".to_string(),
    ];
    let prompts: Vec<Vec<u32>> =
        (0..2).map(|i| (0..20 + 5 * i).map(|j| ((j * 37 + 11 + 101 * i) % 500) as u32 + 3).collect()).collect();
    let request = |id: usize, policy: Arc<dyn dms_policy::PolicyFactory>| Request {
        id,
        prompt: prompts[id / tables.len()].clone(),
        forced: None,
        policy,
        params: None,
    };
    let n = prompts.len() * tables.len();
    let alone: Vec<Finished> = (0..n)
        .map(|id| {
            let mut e = batch_engine(1 << 14);
            let policy = resolved_policy(&mut e, &tables[id % tables.len()]);
            run_batch(&mut e, vec![request(id, policy)], &greedy_params(24), 1, true, |_| {}).unwrap().0.pop().unwrap()
        })
        .collect();
    let crs: Vec<f64> = alone[..3].iter().map(|f| f.compression_ratio).collect();
    assert!(crs[0] != crs[1] && crs[1] != crs[2] && crs[0] != crs[2], "the adapters decide apart: {crs:?}");

    let mut shared = batch_engine(1 << 14);
    let policies: Vec<_> = tables.iter().map(|t| resolved_policy(&mut shared, t)).collect();
    assert_eq!(shared.model.adapter_names().len(), 2, "two adapters attached beside the checkpoint's own");
    let reqs = (0..n).map(|id| request(id, policies[id % tables.len()].clone())).collect();
    let (got, stats) = run_batch(&mut shared, reqs, &greedy_params(24), n, true, |_| {}).unwrap();
    assert_eq!(stats.max_running, n, "every request decodes in one batch");
    for (g, w) in got.iter().zip(&alone) {
        assert_eq!(g.tokens, w.tokens, "request {} tokens", g.id);
        for (a, b) in g.step_logits.iter().zip(&w.step_logits) {
            assert!(max_abs(a, b) < 1e-4, "request {} logits", g.id);
        }
        assert_eq!(g.compression_ratio, w.compression_ratio, "request {} CR", g.id);
    }
}

/// A policy that names an adapter the model has not loaded, or that names none while the model
/// holds several and no weights of its own, is refused before it runs, naming the problem.
#[test]
fn a_policy_whose_adapter_is_not_loaded_or_ambiguous_is_refused() {
    let mut e = batch_engine(1 << 10);
    let _ = resolved_policy(
        &mut e,
        &format!("name = 'dms'\nadapter = {:?}", negated_adapter("unknown").display().to_string()),
    );
    let unknown = Registry::with_builtins()
        .build(&toml::from_str("name = 'dms'\nwindow = 3\nadapter = 'never-loaded'").unwrap())
        .unwrap();
    let err = err_of(e.check_policy(unknown.as_ref()));
    assert!(err.contains("`never-loaded`") && err.contains("not loaded"), "{err}");

    let loaded = load_model(&fixture("qwen3_tiny"), &Device::Cpu, WeightForm::Dense).unwrap();
    let full = Registry::with_builtins().build(&toml::from_str("name = 'full'").unwrap()).unwrap();
    let mut plain = Engine::new(loaded.model, full, 4, 1 << 10).unwrap();
    for dir in [negated_adapter("ambiguous"), sign_adapter("ambiguous", "layer")] {
        let _ = resolved_policy(&mut plain, &format!("name = 'dms'\nadapter = {:?}", dir.display().to_string()));
    }
    let anonymous = resolved_policy(&mut plain, "name = 'dms'\nwindow = 3");
    let err = err_of(plain.check_policy(anonymous.as_ref()));
    assert!(err.contains("names no adapter") && err.contains("2 attached adapters"), "{err}");
}

// ---------------------------------------------------------------------------------------------
// Error paths name the problem

fn cli_config(name: &str) -> PathBuf {
    let d = tmp_dir(&format!("cli-{name}"));
    let path = d.join("engine.toml");
    let text = format!(
        "[model]\nsource = {:?}\n[cache]\nblock_size = 4\nmax_tokens = 256\n[cache.policy]\nname = \"full\"\n[generation]\nstop_at_eos = false\n",
        fixture("qwen3_tiny").display().to_string()
    );
    std::fs::write(&path, text).unwrap();
    path
}

fn dms_cli(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_dms")).args(args).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!stderr.contains("panicked"), "{stderr}");
    (out.status.success(), stderr)
}

/// `--policy-opt` without `=` is an error quoting the option.
#[test]
fn cli_policy_opt_without_equals_is_named() {
    let cfg = cli_config("opt");
    let (ok, err) =
        dms_cli(&["run", "--config", cfg.to_str().unwrap(), "--prompt-ids", "1,2", "--policy-opt", "window"]);
    assert!(!ok);
    assert!(err.contains("--policy-opt `window` is not KEY=VALUE"), "{err}");
}

/// `--prompt-ids` with a non-number, or beyond u32, is rejected naming the flag and the value; an
/// id beyond the vocabulary is an error naming the id and the vocabulary size.
#[test]
fn cli_bad_prompt_ids_are_named() {
    let cfg = cli_config("ids");
    let c = cfg.to_str().unwrap();
    for (ids, needle) in [("1,x,3", "'x'"), ("1,4294967296", "4294967296")] {
        let (ok, err) = dms_cli(&["run", "--config", c, "--prompt-ids", ids, "--max-tokens", "2"]);
        assert!(!ok);
        assert!(err.contains("--prompt-ids") && err.contains(needle), "{ids}: {err}");
    }
    for bad in ["512", "4294967295"] {
        let (ok, err) = dms_cli(&["run", "--config", c, "--prompt-ids", &format!("1,{bad},3"), "--max-tokens", "2"]);
        assert!(!ok);
        assert!(err.contains(&format!("token id {bad} is outside")) && err.contains("vocabulary"), "{bad}: {err}");
        assert!(err.contains("512"), "names the vocabulary size: {err}");
    }
    let (ok, err) = dms_cli(&["run", "--config", c, "--prompt-ids", "1,511,3", "--max-tokens", "2"]);
    assert!(ok, "the last id of the vocabulary is valid: {err}");
}

/// The error of attaching adapter folder `dir` to the plain qwen3_tiny model.
fn attach_error(dir: &Path) -> String {
    let mut loaded = load_model(&fixture("qwen3_tiny"), &Device::Cpu, WeightForm::Dense).unwrap();
    let table: toml::Table =
        toml::from_str(&format!("name = 'dms'\nadapter = {:?}", dir.display().to_string())).unwrap();
    err_of(resolve_policy_table(&table, &mut loaded.model, None))
}

fn good_adapter_config() -> Value {
    json!({"dms_window_size": 4, "dms_separate_alpha": true, "dms_alpha_per": "head"})
}

/// An adapter folder without config.json is an error naming the folder and the file.
#[test]
fn adapter_folder_without_config_json_is_named() {
    let d = adapter_dir("no-config", &fixture_adapter_tensors(1.0), &good_adapter_config());
    std::fs::remove_file(d.join("config.json")).unwrap();
    let e = attach_error(&d);
    assert!(e.contains(&d.display().to_string()) && e.contains("no readable config.json"), "{e}");
}

/// An adapter folder without safetensors is an error naming the folder and what is missing.
#[test]
fn adapter_folder_without_tensors_is_named() {
    let d = adapter_dir("no-tensors", &fixture_adapter_tensors(1.0), &good_adapter_config());
    std::fs::remove_file(d.join("adapter.safetensors")).unwrap();
    let e = attach_error(&d);
    assert!(e.contains(&d.display().to_string()) && e.contains("no .safetensors"), "{e}");
}

/// A projection of the wrong shape (3 outputs for a model with 2 KV heads) is an error naming
/// the folder, the tensor, its shape and the expected one.
#[test]
fn adapter_projection_of_the_wrong_shape_is_named() {
    let mut t = fixture_adapter_tensors(1.0);
    let name = "model.layers.1.self_attn.dms_proj_alpha.weight";
    t.insert(name.into(), Tensor::zeros((3, 64), candle_core::DType::F32, &Device::Cpu).unwrap());
    let d = adapter_dir("wrong-shape", &t, &good_adapter_config());
    let e = attach_error(&d);
    assert!(e.contains(&d.display().to_string()) && e.contains(name) && e.contains("[3, 64]"), "{e}");
    assert!(e.contains("[2, 64]"), "names the expected shape: {e}");
}

/// An adapter whose config.json says dms_separate_alpha = false (the query-neuron variant) is
/// refused: an adapter is the separate-alpha variant by definition.
#[test]
fn adapter_with_separate_alpha_false_is_refused() {
    let cfg = json!({"dms_window_size": 4, "dms_separate_alpha": false});
    let d = adapter_dir("query-neuron", &fixture_adapter_tensors(1.0), &cfg);
    let e = attach_error(&d);
    assert!(e.contains(&d.display().to_string()) && e.contains("dms_separate_alpha is false"), "{e}");
}

/// Query-neuron decisions (dms_separate_alpha = false) are undefined for latent attention: a
/// DeepSeek MLA checkpoint asking for them is refused when it loads.
#[test]
fn query_neuron_decisions_on_a_latent_attention_model_are_refused() {
    let dir = model_copy(&fixture("deepseek_mla_tiny"), "mla-query-neuron", |c| {
        c.insert("dms_separate_alpha".into(), json!(false));
        c.insert("dms_window_size".into(), json!(4));
    });
    let e = err_of(load_model(&dir, &Device::Cpu, WeightForm::Dense));
    assert!(e.contains("query-neuron") && e.contains("latent attention"), "{e}");
}
