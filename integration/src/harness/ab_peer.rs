//! The A/B's peer arms: our full cache and the peer (llama.cpp or mistral.rs) generate greedily
//! from the same prompts, one sequence at a time on both sides, for agreement and speed; with
//! an arm's `concurrency`, also with that many requests in flight on both sides (throughput only).

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use dms_policy::PolicyFactory;
use tokenizers::Tokenizer;

use super::ab::{bar, windows, AbConfig, Arm};
use crate::assets::resolve_model;
use crate::engine::batch::run_requests;
use crate::engine::from_config::{registry, resolve_policy_table};
use crate::engine::scheduler::Request;
use crate::engine::{Engine, GenParams};
use crate::harness::agreement;
#[cfg(feature = "mistralrs")]
use crate::model::WeightForm;

/// What the peer engine produced next to ours.
#[derive(Debug, Clone)]
pub struct PeerResult {
    /// Arm label.
    pub name: String,
    /// Mean number of leading greedy tokens equal to our full-cache arm's.
    pub mean_agreeing_prefix: f64,
    /// Greedy tokens compared per prompt.
    pub tokens_per_prompt: usize,
    /// First position where each prompt's greedy tokens differ (None = never).
    pub first_divergence: Vec<Option<usize>>,
    /// Our top-1 minus top-2 logit at each divergence (small = a numerical near-tie).
    pub margin_at_divergence: Vec<Option<f32>>,
    /// Our full-cache greedy decode tok/s in the same run.
    pub ours_decode_tok_s: f64,
    /// The peer's decode tok/s.
    pub peer_decode_tok_s: f64,
    /// Our prefill tok/s in the same run.
    pub ours_prefill_tok_s: f64,
    /// The peer's prefill tok/s.
    pub peer_prefill_tok_s: f64,
    /// The run with several requests in flight, when the arm asks for one.
    pub concurrent: Option<Concurrent>,
}

/// Both engines generating the same prompts with `requests` requests in flight: generated tokens
/// per second of wall time, prompt passes included.
#[derive(Debug, Clone)]
pub struct Concurrent {
    /// Requests in flight.
    pub requests: usize,
    /// Our arm whose policy ran (`full` when the peer arm names none).
    pub ours: String,
    /// Our tokens per second.
    pub ours_tok_s: f64,
    /// The peer's tokens per second.
    pub peer_tok_s: f64,
}

/// Greedy generation by our full-cache arm and by the peer on the same prompts, one sequence
/// at a time on both sides, then the arm's concurrent run.
pub fn peer_run(
    cfg: &AbConfig,
    arm: &Arm,
    engine: &mut Engine,
    tok: &Tokenizer,
    text: &str,
    source: &str,
) -> Result<PeerResult> {
    let w = &cfg.workload;
    let ids = tok.encode(text, false).map_err(|e| anyhow::anyhow!("tokenizing the corpus: {e}"))?.get_ids().to_vec();
    let prompts: Vec<Vec<u32>> = windows(&ids, w.prompts, w.prompt_tokens + w.continuation_tokens)?
        .into_iter()
        .map(|v| v[..w.prompt_tokens].to_vec())
        .collect();
    let full = registry().build(&toml::from_str("name = 'full'").expect("valid"))?;
    let params = GenParams::greedy(w.continuation_tokens, 0);
    let requests = arm.concurrency.unwrap_or(1);
    let pb = bar(if requests > 1 { 4 } else { 2 }, &arm.name);
    pb.set_message(format!("greedy: ours, then {}", arm.engine));
    // Batch 1 on both sides: mistral.rs 0.8.1 mixes the outputs of concurrent requests, and
    // llama-cpp-python runs one sequence.
    let (ours, stats) = run_requests(engine, requests_for(&prompts, &full), &params, 1, true, |_| {})?;
    pb.inc(1);
    let path = resolve_model(source, cfg.base_dir.as_deref())?;
    let run = match arm.engine.as_str() {
        "llama.cpp" => crate::harness::peer::llama_cpp_generate(&path, &prompts, w.continuation_tokens, threads())?,
        _ => mistralrs_generate(cfg, arm, &path, &prompts, w.continuation_tokens)?,
    };
    pb.inc(1);
    let concurrent = if requests > 1 {
        let (name, policy) = match &arm.vs {
            Some(name) => {
                let vs = cfg.arms.iter().find(|a| &a.name == name).expect("validated");
                let table = resolve_policy_table(
                    vs.policy.as_ref().expect("validated"),
                    &mut engine.model,
                    cfg.base_dir.as_deref(),
                )
                .with_context(|| format!("arm `{}`", vs.name))?;
                (name.clone(), registry().build(&table)?)
            }
            None => ("full".to_string(), full.clone()),
        };
        pb.set_message(format!("{requests} in flight: ours ({name}), then {}", arm.engine));
        let t0 = Instant::now();
        let (done, _) = run_requests(engine, requests_for(&prompts, &policy), &params, requests, false, |_| {})?;
        let ours_tok_s = done.iter().map(|f| f.tokens.len()).sum::<usize>() as f64 / t0.elapsed().as_secs_f64();
        pb.inc(1);
        let peer_tok_s = mistralrs_concurrent(cfg, arm, &path, &prompts, w.continuation_tokens, requests)?;
        Some(Concurrent { requests, ours: name, ours_tok_s, peer_tok_s })
    } else {
        None
    };
    pb.finish();
    let mut first = Vec::new();
    let mut margins = Vec::new();
    let mut prefix_sum = 0usize;
    for (o, p) in ours.iter().zip(&run.tokens) {
        let k = o.tokens.iter().zip(p).take_while(|(a, b)| a == b).count();
        prefix_sum += k;
        first.push((k < o.tokens.len()).then_some(k));
        margins.push((k < o.tokens.len()).then(|| agreement::top2_margin(&o.step_logits[k])));
    }
    Ok(PeerResult {
        name: arm.name.clone(),
        mean_agreeing_prefix: prefix_sum as f64 / ours.len().max(1) as f64,
        tokens_per_prompt: w.continuation_tokens,
        first_divergence: first,
        margin_at_divergence: margins,
        ours_decode_tok_s: stats.decode_tok_s(),
        peer_decode_tok_s: run.decode_tok_s,
        ours_prefill_tok_s: stats.prefill_tokens as f64 / stats.prefill_secs.max(1e-9),
        peer_prefill_tok_s: run.prefill_tok_s,
        concurrent,
    })
}

/// One greedy request per prompt under `policy`.
fn requests_for(prompts: &[Vec<u32>], policy: &Arc<dyn PolicyFactory>) -> Vec<Request> {
    prompts
        .iter()
        .enumerate()
        .map(|(i, p)| Request { id: i, prompt: p.clone(), forced: None, policy: policy.clone(), params: None })
        .collect()
}

/// Threads the CPU peers run on: what rayon (our engine's pool) uses.
fn threads() -> usize {
    rayon::current_num_threads()
}

/// mistral.rs on the arm's weights: its own quantized path on the GGUF file for an arm with
/// quantized weights, else the f32 weights exported to an HF folder; `max_seqs` per step.
#[cfg(feature = "mistralrs")]
fn mistralrs_peer(
    cfg: &AbConfig,
    arm: &Arm,
    path: &Path,
    max_seqs: usize,
) -> Result<crate::harness::peer_mistralrs::MistralRsPeer> {
    use crate::harness::peer_mistralrs::MistralRsPeer;
    if WeightForm::parse(arm.weights(&cfg.model))?.is_quantized() {
        if !path.is_file() {
            bail!("arm `{}`: quantized mistral.rs needs a GGUF file, and {} is not one", arm.name, path.display());
        }
        MistralRsPeer::load_gguf(path, max_seqs)
    } else {
        let hf_dir = if path.is_dir() { path.to_path_buf() } else { crate::assets::export::cached_hf_export(path)? };
        MistralRsPeer::load_hf(&hf_dir, max_seqs)
    }
}

/// mistral.rs's greedy tokens on the same prompts, one request at a time.
#[cfg(feature = "mistralrs")]
fn mistralrs_generate(
    cfg: &AbConfig,
    arm: &Arm,
    path: &Path,
    prompts: &[Vec<u32>],
    n: usize,
) -> Result<crate::harness::peer::PeerRun> {
    let peer = mistralrs_peer(cfg, arm, path, 1)?;
    peer.generate(&prompts[..1], 2)?;
    peer.generate(prompts, n)
}

/// mistral.rs's tokens per second with `requests` requests in flight.
#[cfg(feature = "mistralrs")]
fn mistralrs_concurrent(
    cfg: &AbConfig,
    arm: &Arm,
    path: &Path,
    prompts: &[Vec<u32>],
    n: usize,
    requests: usize,
) -> Result<f64> {
    let peer = mistralrs_peer(cfg, arm, path, requests)?;
    peer.generate(&prompts[..1], 2)?;
    Ok(peer.run_batch(prompts, n)?.tok_s())
}

#[cfg(not(feature = "mistralrs"))]
fn mistralrs_generate(
    _: &AbConfig,
    arm: &Arm,
    _: &Path,
    _: &[Vec<u32>],
    _: usize,
) -> Result<crate::harness::peer::PeerRun> {
    bail!("arm `{}` needs the `mistralrs` feature", arm.name)
}

#[cfg(not(feature = "mistralrs"))]
fn mistralrs_concurrent(_: &AbConfig, arm: &Arm, _: &Path, _: &[Vec<u32>], _: usize, _: usize) -> Result<f64> {
    bail!("arm `{}` needs the `mistralrs` feature", arm.name)
}

/// Lines describing the peer comparison.
pub fn peer_lines(peers: &[PeerResult]) -> String {
    let mut s = String::new();
    for p in peers {
        s.push_str(&format!(
            "{}: greedy tokens equal to our full arm for {:.1} of {} tokens on average (first divergence per prompt: {:?}; \
             our top-1/top-2 logit margin there: {:?}); decode tok/s ours {:.1} vs {} {:.1} (ratio ours/peer {:.2}); \
             prefill tok/s ours {:.1} vs {:.1}\n",
            p.name, p.mean_agreeing_prefix, p.tokens_per_prompt, p.first_divergence, p.margin_at_divergence, p.ours_decode_tok_s, p.name,
            p.peer_decode_tok_s, p.ours_decode_tok_s / p.peer_decode_tok_s.max(1e-9), p.ours_prefill_tok_s, p.peer_prefill_tok_s
        ));
        if let Some(c) = &p.concurrent {
            s.push_str(&format!(
                "{}: {} requests in flight, generated tok/s (prompt passes included): ours ({}) {:.1} vs {} {:.1} (ratio ours/peer {:.2})\n",
                p.name,
                c.requests,
                c.ours,
                c.ours_tok_s,
                p.name,
                c.peer_tok_s,
                c.ours_tok_s / c.peer_tok_s.max(1e-9)
            ));
        }
    }
    s
}
