//! `eval`: the quality-vs-compression report (learned DMS against heuristics at equal CR).
//!
//! Every policy family has one knob (a window size, a decision offset, a budget) that sets how
//! much it evicts. For each target compression ratio the knob is calibrated until the *measured*
//! CR of the teacher-forced run is within `tolerance` of the target (bracketing, then regula falsi
//! on log CR alternating with bisection), first on a subset of the prompts when
//! `[calibration] prompts` asks for it, then on all of them; the cell reports that run's quality
//! against the full cache on held-out text (non-overlapping windows): top-1 agreement, mean
//! KL(full || policy), perplexity, each with a 95% bootstrap interval over prompts. The full
//! cache's pass is shared by every family. The needle test (`needle.rs`) buries pass keys in corpus
//! text and counts exact retrievals; its knob is recalibrated on the needle prompts themselves, so
//! needle cells are also at the measured target CR. With `[quality] prompts = 0` an eval is the
//! needle test alone: no teacher-forced pass, each knob calibrated on the needle runs directly, and
//! the corpus only supplies the haystacks.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use dms_policy::PolicyFactory;
use serde::Deserialize;

use crate::assets::resolve_model;
use crate::config::{open_device, ModelSection};
use crate::engine::batch::run_requests;
use crate::engine::from_config::{registry, resolve_policy_table};
use crate::engine::scheduler::{Finished, Request};
use crate::engine::{argmax, load_model, Engine, GenParams};
use crate::harness::ab::{bar, kl, log_softmax, windows};
use crate::harness::stats::{bootstrap_ci, PromptSums};
use crate::model::WeightForm;

mod calibrate;
mod needle;
mod report;

use calibrate::{as_start, calibrate, knob_value};
use needle::{needle_prefill_cr, needle_prompts, needle_run, NeedlePrompt};
pub use report::{paired_vs_first, plot, table, to_json, PairedDiff};

/// An eval file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvalConfig {
    /// The model.
    pub model: ModelSection,
    /// Pool.
    #[serde(default)]
    pub cache: crate::harness::ab::AbCache,
    /// Teacher-forced quality workload (`prompts = 0`: none, the corpus is the needle's filler).
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
    /// Prompts a calibration run measures: the first `prompts` quality prompts (and needle
    /// trials). The knob found is then measured on every quality prompt and recalibrated there
    /// from that start if it misses the tolerance, so cells are matched on all prompts. Default:
    /// every prompt.
    #[serde(default)]
    pub prompts: Option<usize>,
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
    /// Trials per context length (default: one per depth); trial `i` sits at depth
    /// `depths[i % depths.len()]`, with its own pass key and its own stretch of corpus text.
    #[serde(default)]
    pub trials: Option<usize>,
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
        self.cache.validate()?;
        let q = &self.quality;
        if q.prompt_tokens == 0 || q.continuation_tokens == 0 || q.concurrency == 0 {
            bail!("[quality] prompt_tokens, continuation_tokens and concurrency must be at least 1");
        }
        if q.prompts == 0 && self.needle.is_none() {
            bail!("[quality] prompts = 0 leaves nothing to measure without a [needle] section");
        }
        let c = &self.calibration;
        if c.targets.is_empty() || c.targets.iter().any(|t| t.is_nan() || *t < 1.0) {
            bail!("[calibration] targets must be a non-empty list of ratios >= 1");
        }
        if !(c.tolerance > 0.0 && c.tolerance < 1.0) || c.max_runs < 2 {
            bail!("[calibration] tolerance must be in (0, 1) and max_runs at least 2");
        }
        if c.prompts == Some(0) {
            bail!("[calibration] prompts must be at least 1");
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
            if n.context_tokens.is_empty() || n.depths.is_empty() || n.answer_tokens == 0 || n.trials == Some(0) {
                bail!("[needle] context_tokens, depths, trials and answer_tokens must be non-empty / positive");
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
    /// Knob value chosen (the needle's in a needle-only eval).
    pub knob: f64,
    /// Whether the measured CR is within tolerance of the target.
    pub matched: bool,
    /// Quality at that knob (None in a needle-only eval).
    pub quality: Option<Quality>,
    /// Each quality prompt's sums at that knob (for paired comparisons between families).
    pub per_prompt: Vec<PromptSums>,
    /// Needle results, when configured.
    pub needle: Option<NeedleResult>,
}

/// The whole report.
#[derive(Debug, Clone)]
pub struct EvalReport {
    /// Perplexity of the full cache (None in a needle-only eval).
    pub full_perplexity: Option<f64>,
    /// The full cache's sums per quality prompt (for perplexity increases paired with it).
    pub full_per_prompt: Vec<PromptSums>,
    /// Needle results of the full cache.
    pub full_needle: Option<NeedleResult>,
    /// Cells in family order, then target order.
    pub cells: Vec<Cell>,
    /// Runs spent per family on calibration.
    pub runs: BTreeMap<String, usize>,
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
    let (mut done, _) = run_requests(engine, reqs, &params, q.concurrency, true, |_| {})?;
    done.sort_by_key(|f| f.id);
    Ok(done)
}

pub(super) fn mean_cr(done: &[Finished]) -> f64 {
    done.iter().map(|f| f.compression_ratio).sum::<f64>() / done.len().max(1) as f64
}

/// Quality of a run against the full cache's log-probabilities, and each prompt's sums.
fn score(
    done: &[Finished],
    baseline: &[Vec<Vec<f32>>],
    wins: &[Vec<u32>],
    prompt_tokens: usize,
) -> (Quality, Vec<PromptSums>) {
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
    let q = Quality {
        cr: mean_cr(done),
        top1_agreement,
        mean_kl,
        perplexity,
        top1_agreement_ci,
        mean_kl_ci,
        perplexity_ci,
    };
    (q, per_prompt)
}

/// Runs the whole evaluation.
pub fn run_eval(cfg: &EvalConfig) -> Result<EvalReport> {
    let device = open_device(&cfg.model.device)?;
    let base = cfg.base_dir.as_deref();
    let path = resolve_model(&cfg.model.source, base)?;
    let mut loaded =
        load_model(&path, &device, WeightForm::Dense).with_context(|| format!("loading {}", path.display()))?;
    cfg.model.apply_context(&mut loaded.model)?;
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
    let wins = match q.prompts {
        0 => Vec::new(),
        n => windows(&ids, n, q.prompt_tokens + q.continuation_tokens)?,
    };
    let probe = cfg.calibration.prompts.unwrap_or(usize::MAX);
    let subset = probe.min(wins.len());
    let needle_prompts = match &cfg.needle {
        Some(n) => Some(needle_prompts(n, &tok, &ids)?),
        None => None,
    };

    let pb = bar(1, "full");
    let (baseline, full_perplexity, full_per_prompt) = if wins.is_empty() {
        (Vec::new(), None, Vec::new())
    } else {
        let base_done = teacher_forced(&mut engine, full.clone(), &wins, q, chunk)?;
        let baseline: Vec<Vec<Vec<f32>>> =
            base_done.iter().map(|f| f.step_logits.iter().map(|l| log_softmax(l)).collect()).collect();
        let (full_quality, full_per_prompt) = score(&base_done, &baseline, &wins, q.prompt_tokens);
        (baseline, Some(full_quality.perplexity), full_per_prompt)
    };
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
        let mut seen: BTreeMap<i64, (Quality, Vec<PromptSums>)> = BTreeMap::new();
        let mut seen_subset: BTreeMap<i64, (Quality, Vec<PromptSums>)> = BTreeMap::new();
        let mut needle_seen: BTreeMap<i64, f64> = BTreeMap::new();
        let key = |x: f64| (x * 1e6).round() as i64;
        let mut spent = 0usize;
        let (mut prev_subset, mut prev_full, mut prev_needle) = (None, None, None);
        for target in targets {
            pb.set_message(format!("CR {target}: quality"));
            // Calibrate on the first prompts, then match on all of them from there.
            let mut measure = |x: f64, n: usize, seen: &mut BTreeMap<i64, (Quality, Vec<PromptSums>)>| -> Result<f64> {
                if let Some((qv, _)) = seen.get(&key(x)) {
                    return Ok(qv.cr);
                }
                let policy = build(x)?;
                engine.check_policy(policy.as_ref())?;
                let done = teacher_forced(&mut engine, policy, &wins[..n], q, chunk)?;
                let (qv, per_prompt) = score(&done, &baseline, &wins, q.prompt_tokens);
                spent += 1;
                seen.insert(key(x), (qv, per_prompt));
                Ok(qv.cr)
            };
            let quality_cell = if wins.is_empty() {
                None
            } else {
                // Each calibration starts from the one before it: the previous target's on the
                // same prompts, or this target's on the subset.
                let start = if subset < wins.len() {
                    let c = calibrate(f, target, &cfg.calibration, prev_subset.map(as_start), |x| {
                        measure(x, subset, &mut seen_subset)
                    })?;
                    prev_subset = Some(c);
                    Some(as_start(c))
                } else {
                    prev_full.map(as_start)
                };
                let c = calibrate(f, target, &cfg.calibration, start, |x| measure(x, wins.len(), &mut seen))?;
                prev_full = Some(c);
                let (quality, per_prompt) = seen[&key(c.knob)].clone();
                Some((c, quality, per_prompt))
            };
            let needle = match (&cfg.needle, &needle_prompts) {
                (Some(n), Some(p)) => {
                    pb.set_message(format!("CR {target}: needle"));
                    // Calibrate on the first trials' prompt passes (from the quality knob),
                    // then on every trial with the needle runs themselves, so the run at a
                    // matched knob is the cell's result and costs nothing extra.
                    let mut start = quality_cell.as_ref().map(|c| as_start(c.0)).or(prev_needle.map(as_start));
                    if probe < p.len() {
                        let probe: Vec<&NeedlePrompt> = p.iter().take(probe).collect();
                        let c = calibrate(f, target, &cfg.calibration, start, |x| {
                            if let Some(cr) = needle_seen.get(&key(x)) {
                                return Ok(*cr);
                            }
                            let cr = needle_prefill_cr(&mut engine, build(x)?, &probe, chunk)?;
                            spent += 1;
                            needle_seen.insert(key(x), cr);
                            Ok(cr)
                        })?;
                        start = Some(as_start(c));
                    }
                    let mut needle_runs: BTreeMap<i64, NeedleResult> = BTreeMap::new();
                    let c = calibrate(f, target, &cfg.calibration, start, |x| {
                        if let Some(r) = needle_runs.get(&key(x)) {
                            return Ok(r.cr);
                        }
                        let r = needle_run(&mut engine, &build(x)?, p, n, &tok, chunk)?;
                        spent += 1;
                        let cr = r.cr;
                        needle_runs.insert(key(x), r);
                        Ok(cr)
                    })?;
                    prev_needle = Some(c);
                    let mut r = needle_runs.remove(&key(c.knob)).expect("calibration measured its answer");
                    r.knob = Some(c.knob);
                    r.matched = c.matched;
                    Some(r)
                }
                _ => None,
            };
            let cell = match (quality_cell, needle) {
                (Some((c, quality, per_prompt)), needle) => Cell {
                    family: f.name.clone(),
                    target,
                    knob: c.knob,
                    matched: c.matched,
                    quality: Some(quality),
                    per_prompt,
                    needle,
                },
                (None, Some(n)) => Cell {
                    family: f.name.clone(),
                    target,
                    knob: n.knob.expect("a family's needle result has its knob"),
                    matched: n.matched,
                    quality: None,
                    per_prompt: Vec::new(),
                    needle: Some(n),
                },
                (None, None) => bail!("nothing measured: validate requires [quality] prompts or [needle]"),
            };
            cells.push(cell);
            pb.inc(1);
        }
        pb.finish();
        runs.insert(f.name.clone(), spent);
    }
    Ok(EvalReport { full_perplexity, full_per_prompt, full_needle, cells, runs })
}
