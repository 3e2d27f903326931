//! `eval`: the quality-vs-compression report (learned DMS against heuristics at equal CR).
//!
//! Every policy family has one knob (a window size, a decision offset) that sets how much it
//! evicts. For each target compression ratio the knob is calibrated until the *measured* CR of
//! the teacher-forced run is within `tolerance` of the target (bracketing, then regula falsi on
//! log CR alternating with bisection); the cell reports that run's quality against the full cache on
//! held-out text: top-1 agreement, mean KL(full || policy), perplexity. The needle test buries
//! a pass key in corpus text at 2-4K tokens, asks for it at the end through the ChatML template,
//! and counts exact retrievals; the knob is recalibrated on the needle prompt itself, so needle
//! cells are also at the measured target CR.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use dms_policy::PolicyFactory;
use serde::Deserialize;
use serde_json::json;
use tokenizers::Tokenizer;

use crate::assets::resolve_model;
use crate::config::{open_device, ModelSection};
use crate::engine::from_config::{registry, resolve_policy_table};
use crate::engine::scheduler::{run_batch, Finished, Request};
use crate::engine::{argmax, load_model, Engine, GenParams};
use crate::harness::ab::{bar, kl, log_softmax, windows};
use crate::harness::stats::{bootstrap_ci, PromptSums};
use crate::model::WeightForm;

/// An eval file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvalConfig {
    /// The model.
    pub model: ModelSection,
    /// Pool.
    #[serde(default)]
    pub cache: crate::harness::ab::AbCache,
    /// Teacher-forced quality workload.
    pub quality: crate::harness::ab::Workload,
    /// Calibration targets and tolerance.
    pub calibration: Calibration,
    /// Policy families (`[[family]]`).
    #[serde(rename = "family")]
    pub families: Vec<Family>,
    /// Needle-in-a-haystack test.
    #[serde(default)]
    pub needle: Option<Needle>,
    /// Output files (relative paths are relative to the eval file).
    #[serde(default)]
    pub output: EvalOutput,
    /// Directory of the file.
    #[serde(skip)]
    pub base_dir: Option<PathBuf>,
}

/// `[calibration]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Calibration {
    /// Target compression ratios.
    pub targets: Vec<f64>,
    /// Accepted relative error of the measured CR.
    #[serde(default = "d_tol")]
    pub tolerance: f64,
    /// Runs per (family, target) at most, the two bracket ends included.
    #[serde(default = "d_iters")]
    pub max_runs: usize,
}

/// One `[[family]]`: a policy and the knob that sets its compression.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Family {
    /// Label.
    pub name: String,
    /// Policy table (the knob's key is overwritten).
    pub policy: toml::Table,
    /// Key of the policy table calibrated to reach each target.
    pub knob: String,
    /// Search range of the knob.
    pub range: [f64; 2],
    /// The knob is an integer (a window size).
    #[serde(default)]
    pub integer: bool,
    /// Targets of this family (default: all of `[calibration] targets`).
    #[serde(default)]
    pub targets: Option<Vec<f64>>,
}

/// `[needle]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Needle {
    /// Prompt lengths in tokens.
    pub context_tokens: Vec<usize>,
    /// Where the needle sits, as fractions of the haystack.
    pub depths: Vec<f64>,
    /// Greedy tokens generated for the answer.
    #[serde(default = "d_answer")]
    pub answer_tokens: usize,
    /// System message of the chat template.
    #[serde(default = "d_system")]
    pub system: String,
}

/// `[output]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvalOutput {
    /// JSON results.
    #[serde(default = "d_json")]
    pub json: String,
    /// Markdown table.
    #[serde(default = "d_table")]
    pub table: String,
    /// SVG plot of quality vs CR.
    #[serde(default = "d_plot")]
    pub plot: String,
}

fn d_tol() -> f64 {
    0.05
}
fn d_iters() -> usize {
    7
}
fn d_answer() -> usize {
    16
}
fn d_system() -> String {
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face".into()
}
fn d_json() -> String {
    "eval-results.json".into()
}
fn d_table() -> String {
    "eval-report.md".into()
}
fn d_plot() -> String {
    "eval-quality-vs-cr.svg".into()
}

impl Default for EvalOutput {
    fn default() -> Self {
        Self { json: d_json(), table: d_table(), plot: d_plot() }
    }
}

impl EvalConfig {
    /// Reads and validates an eval file.
    pub fn load(path: &Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("cannot read eval file {}", path.display()))?;
        let mut c: EvalConfig =
            toml::from_str(&text).map_err(|e| anyhow::anyhow!("invalid eval file {}: {e}", path.display()))?;
        c.base_dir = path.parent().map(Path::to_path_buf);
        c.validate()?;
        if let Some(b) = &c.base_dir {
            for p in [&mut c.output.json, &mut c.output.table, &mut c.output.plot] {
                if Path::new(p.as_str()).is_relative() {
                    *p = b.join(p.as_str()).to_string_lossy().into_owned();
                }
            }
        }
        Ok(c)
    }

    /// Range checks.
    pub fn validate(&self) -> Result<()> {
        let q = &self.quality;
        if q.prompts == 0 || q.prompt_tokens == 0 || q.continuation_tokens == 0 || q.concurrency == 0 {
            bail!("[quality] prompts, prompt_tokens, continuation_tokens and concurrency must be at least 1");
        }
        let c = &self.calibration;
        if c.targets.is_empty() || c.targets.iter().any(|t| t.is_nan() || *t < 1.0) {
            bail!("[calibration] targets must be a non-empty list of ratios >= 1");
        }
        if !(c.tolerance > 0.0 && c.tolerance < 1.0) || c.max_runs < 2 {
            bail!("[calibration] tolerance must be in (0, 1) and max_runs at least 2");
        }
        if self.families.is_empty() {
            bail!("the eval file has no [[family]]");
        }
        let mut seen = std::collections::HashSet::new();
        for f in &self.families {
            if !seen.insert(&f.name) {
                bail!("two families are named `{}`", f.name);
            }
            registry().check_name(&f.policy).with_context(|| format!("[[family]] `{}`", f.name))?;
            if f.knob == "name" || f.knob.is_empty() {
                bail!("[[family]] `{}`: `knob` must name a key of the policy table", f.name);
            }
            if !(f.range[0].is_finite() && f.range[1].is_finite() && f.range[0] < f.range[1]) {
                bail!("[[family]] `{}`: `range` must be two finite numbers, low < high", f.name);
            }
            if let Some(t) = &f.targets {
                if t.iter().any(|x| !c.targets.iter().any(|y| (x - y).abs() < 1e-9)) {
                    bail!("[[family]] `{}`: its targets must be among [calibration] targets", f.name);
                }
            }
        }
        if let Some(n) = &self.needle {
            if n.context_tokens.is_empty() || n.depths.is_empty() || n.answer_tokens == 0 {
                bail!("[needle] context_tokens, depths and answer_tokens must be non-empty / positive");
            }
            if n.depths.iter().any(|d| !(0.0..=1.0).contains(d)) {
                bail!("[needle] depths must lie in [0, 1]");
            }
            if n.context_tokens.iter().any(|&t| t < 64) {
                bail!("[needle] context_tokens must be at least 64");
            }
        }
        Ok(())
    }
}

/// Quality of one teacher-forced run against the full cache.
#[derive(Debug, Clone, Copy, Default)]
pub struct Quality {
    /// Measured compression ratio (mean over sequences at the end).
    pub cr: f64,
    /// Fraction of positions whose argmax equals the full cache's.
    pub top1_agreement: f64,
    /// Mean KL(full || policy), nats.
    pub mean_kl: f64,
    /// Perplexity of the true continuation.
    pub perplexity: f64,
    /// 95% bootstrap interval of `top1_agreement` over prompts.
    pub top1_agreement_ci: [f64; 2],
    /// 95% bootstrap interval of `mean_kl` over prompts.
    pub mean_kl_ci: [f64; 2],
    /// 95% bootstrap interval of `perplexity` over prompts.
    pub perplexity_ci: [f64; 2],
}

/// Needle results of one policy setting.
#[derive(Debug, Clone, Default)]
pub struct NeedleResult {
    /// Knob value used (None for the full cache).
    pub knob: Option<f64>,
    /// Mean measured compression ratio over the needle prompts.
    pub cr: f64,
    /// Pass keys retrieved exactly.
    pub hits: usize,
    /// Needle prompts.
    pub trials: usize,
    /// Answers, one per trial.
    pub answers: Vec<String>,
    /// Whether the needle CR is within tolerance of the target (always true for the full cache).
    pub matched: bool,
}

/// One (family, target) cell.
#[derive(Debug, Clone)]
pub struct Cell {
    /// Family label.
    pub family: String,
    /// Target CR.
    pub target: f64,
    /// Knob value chosen.
    pub knob: f64,
    /// Whether the measured CR is within tolerance of the target.
    pub matched: bool,
    /// Quality at that knob.
    pub quality: Quality,
    /// Needle results, when configured.
    pub needle: Option<NeedleResult>,
}

/// The whole report.
#[derive(Debug, Clone)]
pub struct EvalReport {
    /// Perplexity of the full cache.
    pub full_perplexity: f64,
    /// Needle results of the full cache.
    pub full_needle: Option<NeedleResult>,
    /// Cells in family order, then target order.
    pub cells: Vec<Cell>,
    /// Runs spent per family on calibration.
    pub runs: BTreeMap<String, usize>,
}

/// One needle prompt.
struct NeedlePrompt {
    ids: Vec<u32>,
    key: String,
}

fn knob_value(f: &Family, x: f64) -> toml::Value {
    if f.integer {
        toml::Value::Integer(x.round() as i64)
    } else {
        toml::Value::Float(x)
    }
}

/// Finds the knob whose measured CR is closest to `target`, evaluating with `measure` (which
/// caches), by bracketing and regula falsi on ln CR alternating with bisection. Returns (knob,
/// matched).
fn calibrate(
    f: &Family,
    target: f64,
    cal: &Calibration,
    start: Option<f64>,
    mut measure: impl FnMut(f64) -> Result<f64>,
) -> Result<(f64, bool)> {
    let snap = |x: f64| if f.integer { x.round() } else { x };
    let err = |cr: f64| cr.ln() - target.ln();
    let (mut lo, mut hi) = (snap(f.range[0]), snap(f.range[1]));
    let mut best = (f64::INFINITY, lo);
    let note = |x: f64, e: f64, best: &mut (f64, f64)| {
        if e.abs() < best.0 {
            *best = (e.abs(), x);
        }
    };
    let mut runs = 0usize;
    if let Some(s) = start {
        let s = snap(s.clamp(lo, hi));
        let e = err(measure(s)?);
        runs += 1;
        note(s, e, &mut best);
        if e.abs() <= (1.0 + cal.tolerance).ln() {
            return Ok((s, true));
        }
    }
    let (mut elo, mut ehi) = (err(measure(lo)?), err(measure(hi)?));
    runs += 2;
    note(lo, elo, &mut best);
    note(hi, ehi, &mut best);
    if elo.signum() == ehi.signum() {
        return Ok((best.1, best.0 <= (1.0 + cal.tolerance).ln()));
    }
    if let Some(s) = start.map(|s| snap(s.clamp(lo, hi))) {
        if s > lo && s < hi {
            let e = err(measure(s)?);
            if e.signum() == elo.signum() {
                (lo, elo) = (s, e);
            } else {
                (hi, ehi) = (s, e);
            }
        }
    }
    // Regula falsi (on ln x for integer knobs, whose CR laws are close to power laws) alternating
    // with bisection, so that the bracket at least halves every two runs.
    let mut falsi = true;
    while runs < cal.max_runs.max(3) && best.0 > (1.0 + cal.tolerance).ln() {
        let t = if falsi { elo / (elo - ehi) } else { 0.5 };
        falsi = !falsi;
        let mut x = if f.integer && lo > 0.0 {
            snap((lo.ln() + t * (hi.ln() - lo.ln())).exp())
        } else {
            snap(lo + t * (hi - lo))
        };
        if x <= lo || x >= hi {
            x = snap((lo + hi) / 2.0);
        }
        if x <= lo || x >= hi {
            break;
        }
        let e = err(measure(x)?);
        runs += 1;
        note(x, e, &mut best);
        tracing::debug!(knob = x, log_cr_error = e, "calibration run");
        if e.signum() == elo.signum() {
            (lo, elo) = (x, e);
        } else {
            (hi, ehi) = (x, e);
        }
    }
    Ok((best.1, best.0 <= (1.0 + cal.tolerance).ln()))
}

fn teacher_forced(
    engine: &mut Engine,
    policy: Arc<dyn PolicyFactory>,
    wins: &[Vec<u32>],
    q: &crate::harness::ab::Workload,
    prefill_chunk: usize,
) -> Result<Vec<Finished>> {
    let reqs: Vec<Request> = wins
        .iter()
        .enumerate()
        .map(|(i, w)| Request {
            id: i,
            prompt: w[..q.prompt_tokens].to_vec(),
            forced: Some(w[q.prompt_tokens..].to_vec()),
            policy: policy.clone(),
            params: None,
        })
        .collect();
    let params = GenParams::greedy(q.continuation_tokens, prefill_chunk);
    let (mut done, _) = run_batch(engine, reqs, &params, q.concurrency, true, |_| {})?;
    done.sort_by_key(|f| f.id);
    Ok(done)
}

fn mean_cr(done: &[Finished]) -> f64 {
    done.iter().map(|f| f.compression_ratio).sum::<f64>() / done.len().max(1) as f64
}

fn score(done: &[Finished], baseline: &[Vec<Vec<f32>>], wins: &[Vec<u32>], prompt_tokens: usize) -> Quality {
    let mut total = PromptSums::default();
    let mut per_prompt = Vec::with_capacity(done.len());
    for f in done {
        let forced = &wins[f.id][prompt_tokens..];
        let mut p = PromptSums::default();
        for (s, l) in f.step_logits.iter().enumerate() {
            let lp = log_softmax(l);
            let bl = &baseline[f.id][s];
            p.nll -= lp[forced[s] as usize] as f64;
            p.agree += (argmax(bl) == argmax(&lp)) as u8 as f64;
            p.kl += kl(bl, &lp);
            p.n += 1.0;
        }
        total.add(&p);
        per_prompt.push(p);
    }
    let [top1_agreement, mean_kl, perplexity] = total.pooled();
    let [top1_agreement_ci, mean_kl_ci, perplexity_ci] = bootstrap_ci(&per_prompt, 0);
    Quality { cr: mean_cr(done), top1_agreement, mean_kl, perplexity, top1_agreement_ci, mean_kl_ci, perplexity_ci }
}

/// A pass key for trial `i`: five digits, deterministic.
fn pass_key(i: usize) -> String {
    format!("{}", 10000 + (i as u64 * 7919 + 2713) % 90000)
}

fn needle_prompts(n: &Needle, tok: &Tokenizer, hay: &[u32]) -> Result<Vec<NeedlePrompt>> {
    let enc = |s: &str| -> Result<Vec<u32>> {
        Ok(tok.encode(s, false).map_err(|e| anyhow::anyhow!("tokenizing: {e}"))?.get_ids().to_vec())
    };
    for special in ["<|im_start|>", "<|im_end|>"] {
        if tok.token_to_id(special).is_none() {
            bail!("[needle] uses the ChatML template, but the model's tokenizer has no `{special}` token");
        }
    }
    let head = enc(&format!("<|im_start|>system\n{}<|im_end|>\n<|im_start|>user\n", n.system))?;
    let question =
        enc("\n\nWhat is the pass key mentioned in the text above? Answer with the number only.<|im_end|>\n\
         <|im_start|>assistant\n")?;
    let mut out = Vec::new();
    let mut i = 0usize;
    for &len in &n.context_tokens {
        for &depth in &n.depths {
            let key = pass_key(i);
            let needle = enc(&format!(" The pass key is {key}. Remember it. {key} is the pass key. "))?;
            let overhead = head.len() + question.len() + needle.len();
            if len <= overhead + 16 {
                bail!("[needle] context_tokens {len} leaves no room for the haystack ({overhead} tokens of template)");
            }
            let hay_len = len - overhead;
            if hay.len() < hay_len {
                bail!("the corpus has {} tokens, fewer than a {hay_len}-token haystack", hay.len());
            }
            let span = hay.len() - hay_len;
            let at = (span / (n.context_tokens.len() * n.depths.len() + 1)) * (i + 1);
            let slice = &hay[at..at + hay_len];
            let cut = (hay_len as f64 * depth).round() as usize;
            let mut ids = head.clone();
            ids.extend_from_slice(&slice[..cut]);
            ids.extend_from_slice(&needle);
            ids.extend_from_slice(&slice[cut..]);
            ids.extend_from_slice(&question);
            out.push(NeedlePrompt { ids, key });
            i += 1;
        }
    }
    Ok(out)
}

fn needle_run(
    engine: &mut Engine,
    policy: &Arc<dyn PolicyFactory>,
    prompts: &[NeedlePrompt],
    n: &Needle,
    tok: &Tokenizer,
    prefill_chunk: usize,
) -> Result<NeedleResult> {
    let reqs: Vec<Request> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| Request { id: i, prompt: p.ids.clone(), forced: None, policy: policy.clone(), params: None })
        .collect();
    let params = GenParams {
        max_tokens: n.answer_tokens,
        temperature: 0.0,
        top_p: 1.0,
        seed: 0,
        stop_at_eos: true,
        prefill_chunk,
    };
    let (mut done, _) = run_batch(engine, reqs, &params, 1, false, |_| {})?;
    done.sort_by_key(|f| f.id);
    let mut r = NeedleResult { trials: prompts.len(), cr: mean_cr(&done), matched: true, ..Default::default() };
    for (f, p) in done.iter().zip(prompts) {
        let text = tok.decode(&f.tokens, true).map_err(|e| anyhow::anyhow!("decoding: {e}"))?;
        r.hits += text.split(|c: char| !c.is_ascii_digit()).any(|run| run == p.key) as usize;
        r.answers.push(text.trim().to_string());
    }
    Ok(r)
}

/// Mean CR after prefilling `prompts` (the needle calibration's measurement).
fn needle_prefill_cr(
    engine: &mut Engine,
    policy: Arc<dyn PolicyFactory>,
    prompts: &[&NeedlePrompt],
    prefill_chunk: usize,
) -> Result<f64> {
    let reqs: Vec<Request> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| Request { id: i, prompt: p.ids.clone(), forced: None, policy: policy.clone(), params: None })
        .collect();
    let params = GenParams { max_tokens: 1, temperature: 0.0, top_p: 1.0, seed: 0, stop_at_eos: false, prefill_chunk };
    let (done, _) = run_batch(engine, reqs, &params, 1, false, |_| {})?;
    Ok(mean_cr(&done))
}

/// Runs the whole evaluation.
pub fn run_eval(cfg: &EvalConfig) -> Result<EvalReport> {
    let device = open_device(&cfg.model.device)?;
    let base = cfg.base_dir.as_deref();
    let path = resolve_model(&cfg.model.source, base)?;
    let loaded =
        load_model(&path, &device, WeightForm::Dense).with_context(|| format!("loading {}", path.display()))?;
    let tok = loaded.tokenizer.clone().context("the eval workload is text: the model needs a tokenizer")?;
    let mc = loaded.model.config();
    let blocks = crate::config::PoolSize::MiB(cfg.cache.memory_mb as f64).blocks(
        cfg.cache.block_size,
        mc.num_layers * mc.num_kv_heads,
        mc.row_bytes_per_token(),
    );
    let full = registry().build(&toml::from_str("name = 'full'").expect("valid"))?;
    let mut engine = Engine::new(loaded.model, full.clone(), cfg.cache.block_size, blocks)?;
    let chunk = cfg.cache.prefill_chunk;
    let q = &cfg.quality;
    let text = crate::assets::corpus::load_text(&q.corpus, base)?;
    let ids = tok.encode(text.as_str(), false).map_err(|e| anyhow::anyhow!("tokenizing the corpus: {e}"))?;
    let ids = ids.get_ids().to_vec();
    let wins = windows(&ids, q.prompts, q.prompt_tokens + q.continuation_tokens)?;
    let needle_prompts = match &cfg.needle {
        Some(n) => Some(needle_prompts(n, &tok, &ids)?),
        None => None,
    };

    let pb = bar(1, "full");
    let base_done = teacher_forced(&mut engine, full.clone(), &wins, q, chunk)?;
    let baseline: Vec<Vec<Vec<f32>>> =
        base_done.iter().map(|f| f.step_logits.iter().map(|l| log_softmax(l)).collect()).collect();
    let full_perplexity = score(&base_done, &baseline, &wins, q.prompt_tokens).perplexity;
    let full_needle = match (&cfg.needle, &needle_prompts) {
        (Some(n), Some(p)) => Some(needle_run(&mut engine, &full, p, n, &tok, chunk)?),
        _ => None,
    };
    pb.finish();

    let mut cells = Vec::new();
    let mut runs = BTreeMap::new();
    for f in &cfg.families {
        let table = resolve_policy_table(&f.policy, &mut engine.model, base)
            .with_context(|| format!("[[family]] `{}`", f.name))?;
        let build = |x: f64| -> Result<Arc<dyn PolicyFactory>> {
            let mut t = table.clone();
            t.insert(f.knob.clone(), knob_value(f, x));
            let p = registry().build(&t).with_context(|| format!("[[family]] `{}` with {} = {x}", f.name, f.knob))?;
            Ok(p)
        };
        let targets = f.targets.clone().unwrap_or_else(|| cfg.calibration.targets.clone());
        let pb = bar(targets.len() as u64, &f.name);
        let mut seen: BTreeMap<i64, Quality> = BTreeMap::new();
        let mut needle_seen: BTreeMap<i64, f64> = BTreeMap::new();
        let key = |x: f64| (x * 1e6).round() as i64;
        let mut spent = 0usize;
        for target in targets {
            pb.set_message(format!("CR {target}: quality"));
            let (knob, matched) = calibrate(f, target, &cfg.calibration, None, |x| {
                if let Some(qv) = seen.get(&key(x)) {
                    return Ok(qv.cr);
                }
                let policy = build(x)?;
                engine.check_policy(policy.as_ref())?;
                let done = teacher_forced(&mut engine, policy, &wins, q, chunk)?;
                let qv = score(&done, &baseline, &wins, q.prompt_tokens);
                spent += 1;
                seen.insert(key(x), qv);
                Ok(qv.cr)
            })?;
            let quality = seen[&key(knob)];
            let needle = match (&cfg.needle, &needle_prompts) {
                (Some(n), Some(p)) => {
                    pb.set_message(format!("CR {target}: needle"));
                    let (nk, needle_matched) = calibrate(f, target, &cfg.calibration, Some(knob), |x| {
                        if let Some(cr) = needle_seen.get(&key(x)) {
                            return Ok(*cr);
                        }
                        // All needle prompts: the cell reports their mean CR.
                        let probe: Vec<&NeedlePrompt> = p.iter().collect();
                        let cr = needle_prefill_cr(&mut engine, build(x)?, &probe, chunk)?;
                        spent += 1;
                        needle_seen.insert(key(x), cr);
                        Ok(cr)
                    })?;
                    let mut r = needle_run(&mut engine, &build(nk)?, p, n, &tok, chunk)?;
                    r.knob = Some(nk);
                    r.matched = needle_matched;
                    Some(r)
                }
                _ => None,
            };
            cells.push(Cell { family: f.name.clone(), target, knob, matched, quality, needle });
            pb.inc(1);
        }
        pb.finish();
        runs.insert(f.name.clone(), spent);
    }
    Ok(EvalReport { full_perplexity, full_needle, cells, runs })
}

/// The markdown report.
pub fn table(cfg: &EvalConfig, r: &EvalReport) -> String {
    let q = &cfg.quality;
    let mut s = format!(
        "Model `{}`; quality: {} held-out prompts of {} tokens + {} teacher-forced tokens ({}); full-cache perplexity {:.2}.\n",
        cfg.model.source, q.prompts, q.prompt_tokens, q.continuation_tokens, q.corpus, r.full_perplexity
    );
    if let (Some(n), Some(fnd)) = (&cfg.needle, &r.full_needle) {
        s.push_str(&format!(
            "Needle: pass key at depths {:?} in {:?}-token prompts (ChatML); full cache retrieves {}/{}.\n",
            n.depths, n.context_tokens, fnd.hits, fnd.trials
        ));
    }
    s.push_str(
        "\n| policy | target CR | knob | measured CR | top-1 agree [95% CI] | mean KL [95% CI] | PPL [95% CI] |",
    );
    let needle = r.full_needle.is_some();
    if needle {
        s.push_str(" needle CR | needle hits |");
    }
    s.push('\n');
    s.push_str(&"|---".repeat(if needle { 9 } else { 7 }));
    s.push_str("|\n");
    for c in &r.cells {
        let knob = cfg.families.iter().find(|f| f.name == c.family).map(|f| f.knob.as_str()).unwrap_or("");
        s.push_str(&format!(
            "| {} | {} | {knob} = {} | {:.2}{} | {:.3} [{:.3}, {:.3}] | {:.4} [{:.4}, {:.4}] | {:.2} [{:.2}, {:.2}] |",
            c.family,
            c.target,
            fmt_knob(c.knob),
            c.quality.cr,
            if c.matched { "" } else { " (off target)" },
            c.quality.top1_agreement,
            c.quality.top1_agreement_ci[0],
            c.quality.top1_agreement_ci[1],
            c.quality.mean_kl,
            c.quality.mean_kl_ci[0],
            c.quality.mean_kl_ci[1],
            c.quality.perplexity,
            c.quality.perplexity_ci[0],
            c.quality.perplexity_ci[1]
        ));
        if let Some(n) = &c.needle {
            s.push_str(&format!(
                " {:.2}{} | {}/{} |",
                n.cr,
                if n.matched { "" } else { " (off target)" },
                n.hits,
                n.trials
            ));
        }
        s.push('\n');
    }
    s
}

fn fmt_knob(x: f64) -> String {
    if x.fract() == 0.0 {
        format!("{x:.0}")
    } else {
        format!("{x:.3}")
    }
}

/// JSON of the report.
pub fn to_json(cfg: &EvalConfig, r: &EvalReport) -> serde_json::Value {
    let needle = |n: &NeedleResult| json!({"knob": n.knob, "cr": n.cr, "matched": n.matched, "hits": n.hits, "trials": n.trials, "answers": n.answers});
    json!({
        "model": cfg.model.source,
        "quality_workload": {"corpus": cfg.quality.corpus, "prompts": cfg.quality.prompts,
            "prompt_tokens": cfg.quality.prompt_tokens, "continuation_tokens": cfg.quality.continuation_tokens},
        "needle_workload": cfg.needle.as_ref().map(|n| json!({"context_tokens": n.context_tokens, "depths": n.depths})),
        "full": {"perplexity": r.full_perplexity, "needle": r.full_needle.as_ref().map(needle)},
        "calibration_runs": r.runs,
        "cells": r.cells.iter().map(|c| json!({
            "family": c.family, "target_cr": c.target, "knob": c.knob, "matched": c.matched,
            "cr": c.quality.cr, "top1_agreement": c.quality.top1_agreement, "mean_kl": c.quality.mean_kl,
            "perplexity": c.quality.perplexity, "top1_agreement_ci": c.quality.top1_agreement_ci,
            "mean_kl_ci": c.quality.mean_kl_ci, "perplexity_ci": c.quality.perplexity_ci,
            "needle": c.needle.as_ref().map(needle),
        })).collect::<Vec<_>>(),
    })
}

/// Draws mean KL and top-1 agreement against measured CR, one line per family, as SVG.
pub fn plot(r: &EvalReport, path: &Path) -> Result<()> {
    use plotters::prelude::*;
    let e = |e: &dyn std::fmt::Display| anyhow::anyhow!("plot: {e}");
    let root = SVGBackend::new(path, (1100, 460)).into_drawing_area();
    root.fill(&WHITE).map_err(|x| e(&x))?;
    let panels = root.split_evenly((1, 2));
    let families: Vec<&str> = {
        let mut v: Vec<&str> = Vec::new();
        for c in &r.cells {
            if !v.contains(&c.family.as_str()) {
                v.push(&c.family);
            }
        }
        v
    };
    let max_cr = r.cells.iter().map(|c| c.quality.cr).fold(1.0, f64::max) * 1.1;
    let max_kl = r.cells.iter().map(|c| c.quality.mean_kl).fold(1e-3, f64::max) * 1.1;
    // (title, y label, y max, the plotted figure)
    type PanelSpec = (&'static str, &'static str, f64, fn(&Quality) -> f64);
    let specs: [PanelSpec; 2] = [
        ("mean KL(full || policy) vs measured CR", "mean KL (nats)", max_kl, |q| q.mean_kl),
        ("top-1 agreement with the full cache vs measured CR", "top-1 agreement", 1.02, |q| q.top1_agreement),
    ];
    for (panel, (title, ylab, ymax, get)) in panels.iter().zip(specs) {
        let mut chart = ChartBuilder::on(panel)
            .caption(title, ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(55)
            .build_cartesian_2d(1f64..max_cr, 0f64..ymax)
            .map_err(|x| e(&x))?;
        chart.configure_mesh().x_desc("measured compression ratio").y_desc(ylab).draw().map_err(|x| e(&x))?;
        for (i, fam) in families.iter().enumerate() {
            let color = Palette99::pick(i).to_rgba();
            let mut pts: Vec<(f64, f64)> =
                r.cells.iter().filter(|c| c.family == *fam).map(|c| (c.quality.cr, get(&c.quality))).collect();
            pts.sort_by(|a, b| a.0.total_cmp(&b.0));
            chart
                .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))
                .map_err(|x| e(&x))?
                .label(fam.to_string())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
            chart.draw_series(pts.into_iter().map(|p| Circle::new(p, 4, color.filled()))).map_err(|x| e(&x))?;
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(|x| e(&x))?;
    }
    root.present().map_err(|x| e(&x))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn family(integer: bool, range: [f64; 2]) -> Family {
        Family { name: "f".into(), policy: toml::Table::new(), knob: "k".into(), range, integer, targets: None }
    }

    fn cal() -> Calibration {
        Calibration { targets: vec![2.0], tolerance: 0.02, max_runs: 12 }
    }

    #[test]
    fn calibration_finds_a_window_for_an_inverse_law() {
        // A sliding window of w keeps w + 4 of 448 tokens: CR = 448 / (w + 4).
        let f = family(true, [8.0, 440.0]);
        for target in [2.0, 4.0, 8.0] {
            let (w, ok) = calibrate(&f, target, &cal(), None, |w| Ok(448.0 / (w + 4.0))).unwrap();
            assert!(ok, "target {target}");
            assert!((448.0 / (w + 4.0) / target - 1.0).abs() <= 0.02, "target {target}: w {w}");
            assert_eq!(w.fract(), 0.0);
        }
    }

    #[test]
    fn calibration_handles_decreasing_maps_and_reports_unreachable_targets() {
        // CR falls with an offset (a logistic threshold), saturating at 1 and 10.
        let f = family(false, [-40.0, 60.0]);
        let cr = |x: f64| 1.0 + 9.0 / (1.0 + (x / 8.0).exp());
        let (x, ok) = calibrate(&f, 4.0, &cal(), Some(0.0), |x| Ok(cr(x))).unwrap();
        assert!(ok && (cr(x) / 4.0 - 1.0).abs() <= 0.02, "x {x}");
        let (_, ok) = calibrate(&f, 20.0, &cal(), None, |x| Ok(cr(x))).unwrap();
        assert!(!ok, "CR 20 is above the family's reach and must be reported as such");
    }

    #[test]
    fn pass_keys_are_five_digits_and_distinct() {
        let keys: Vec<String> = (0..12).map(pass_key).collect();
        assert!(keys.iter().all(|k| k.len() == 5));
        let set: std::collections::HashSet<_> = keys.iter().collect();
        assert_eq!(set.len(), keys.len());
    }
}
