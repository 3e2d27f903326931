//! `retrofit`: learns DMS decisions for a model by distillation (dms-reference.md section 5).
//!
//! Trains only an adapter (per layer RMSNorm + Linear(hidden -> n_kv_heads), projection
//! zero-initialised) with the base model frozen: logistic noise, temperature `tau`,
//! straight-through hard decisions, the soft mask log(1 - sigmoid(logit_{k+1})) for keys outside
//! the window, loss = KL(student || teacher) + max(target_fraction - fraction_evicted, 0) with
//! the compression target rising linearly with the step, AdamW with gradient clipping.
//! Deterministic for a seed; checkpoints hold the parameters and the optimiser moments, so a
//! resumed run continues exactly. The output is NVIDIA's adapter format (config.json with
//! `dms_*` fields + `dms_proj_alpha{,_norm}` tensors), loadable with `adapter = "DIR"`.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor, Var};
use indicatif::{ProgressBar, ProgressStyle};
use rand::{rngs::StdRng, Rng, SeedableRng};
use serde::Deserialize;
use serde_json::json;

use crate::config::{open_device, ModelSection};
use crate::engine::load_model;
use crate::model::llama::distill_kl::kl_rows;
use crate::model::llama::train::{AdapterParams, LoraVars, StudentOpts};
use crate::model::lora::{self, LoraTarget};
use crate::model::{Llama, ModelConfig, WeightForm};

pub mod retrieval;
use retrieval::{RetrievalSection, RetrievalTask, WeightedIds};

/// A retrofit file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetrofitConfig {
    /// The model to retrofit.
    pub model: ModelSection,
    /// Training settings.
    pub retrofit: RetrofitSection,
    /// Directory of the file.
    #[serde(skip)]
    pub base_dir: Option<PathBuf>,
}

/// `[retrofit]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetrofitSection {
    /// DMS delay W (training and inference).
    pub window: usize,
    /// Compression ratio the schedule ends at.
    pub target_cr: f64,
    /// Optimiser steps.
    pub steps: usize,
    /// Steps over which the target rises linearly from CR 1 to `target_cr`.
    pub ramp_steps: usize,
    /// Tokens per training sequence.
    pub seq_len: usize,
    /// Learning rate.
    pub lr: f64,
    /// `brown-fiction-train` (the corpus's training split) or a UTF-8 text file.
    #[serde(default = "d_corpus")]
    pub corpus: String,
    /// Relaxation temperature.
    #[serde(default = "d_tau")]
    pub tau: f64,
    /// Decision scale.
    #[serde(default = "d_scale")]
    pub alpha_scale: f64,
    /// Decision offset.
    #[serde(default = "d_offset")]
    pub alpha_offset: f64,
    /// Seed (data order and noise).
    #[serde(default = "d_seed")]
    pub seed: u64,
    /// Steps between checkpoints.
    #[serde(default = "d_ckpt")]
    pub checkpoint_every: usize,
    /// Output directory (relative paths are relative to the retrofit file).
    pub output: String,
    /// Gradient-norm clip.
    #[serde(default = "d_clip")]
    pub grad_clip: f64,
    /// AdamW betas.
    #[serde(default = "d_betas")]
    pub betas: (f64, f64),
    /// AdamW weight decay.
    #[serde(default)]
    pub weight_decay: f64,
    /// An adapter directory to start from (its parameters; fresh optimiser moments) instead of
    /// zero projections; relative paths are relative to the retrofit file. A checkpoint in
    /// `output` takes precedence, so a warm-started run resumes like any other.
    #[serde(default)]
    pub init: Option<String>,
    /// Retrieval samples mixed into the training text (`retrieval::RetrievalSection`).
    #[serde(default)]
    pub retrieval: Option<RetrievalSection>,
    /// A LoRA on the attention projections trained with the decisions (`[retrofit.lora]`).
    #[serde(default)]
    pub lora: Option<LoraSection>,
}

/// `[retrofit.lora]`: the student also trains a LoRA on `q/k/v/o_proj` (B starts at zero, so
/// step 0 is the frozen model), which the adapter file carries and the engine applies to the
/// sequences whose policy reads this adapter.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoraSection {
    /// Rank of the factors.
    pub rank: usize,
    /// The delta's scale is alpha / rank.
    #[serde(default = "d_lora_alpha")]
    pub alpha: f64,
    /// Learning rate of the factors (the decision weights keep `lr`).
    pub lr: f64,
}

fn d_lora_alpha() -> f64 {
    16.0
}

fn d_corpus() -> String {
    "brown-fiction-train".into()
}
fn d_tau() -> f64 {
    0.1
}
fn d_scale() -> f64 {
    100.0
}
fn d_offset() -> f64 {
    5.0
}
fn d_seed() -> u64 {
    42
}
fn d_ckpt() -> usize {
    25
}
fn d_clip() -> f64 {
    1.0
}
fn d_betas() -> (f64, f64) {
    (0.9, 0.95)
}

impl RetrofitConfig {
    /// Reads and validates a retrofit file.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
        let mut c: RetrofitConfig =
            toml::from_str(&text).map_err(|e| anyhow::anyhow!("invalid retrofit file {}: {e}", path.display()))?;
        c.base_dir = path.parent().map(Path::to_path_buf);
        c.retrofit.validate()?;
        Ok(c)
    }
}

impl RetrofitSection {
    /// Range checks.
    pub fn validate(&self) -> Result<()> {
        if self.steps == 0 || self.seq_len < 2 || self.ramp_steps == 0 {
            bail!("[retrofit] steps, ramp_steps must be positive and seq_len at least 2");
        }
        if self.target_cr.is_nan() || self.target_cr < 1.0 {
            bail!("[retrofit] target_cr must be at least 1");
        }
        if !(self.lr.is_finite() && self.lr > 0.0 && self.tau.is_finite() && self.tau > 0.0) {
            bail!("[retrofit] lr and tau must be positive and finite");
        }
        if self.checkpoint_every == 0 {
            bail!("[retrofit] checkpoint_every must be at least 1 (steps between checkpoints)");
        }
        if !self.target_cr.is_finite() {
            bail!("[retrofit] target_cr must be finite");
        }
        for (name, v) in [("alpha_scale", self.alpha_scale), ("alpha_offset", self.alpha_offset)] {
            if !v.is_finite() {
                bail!("[retrofit] {name} must be finite, not {v}");
            }
        }
        if self.grad_clip.is_nan() || self.grad_clip <= 0.0 {
            bail!("[retrofit] grad_clip must be positive (inf: no clipping), not {}", self.grad_clip);
        }
        let (b1, b2) = self.betas;
        if !((0.0..1.0).contains(&b1) && (0.0..1.0).contains(&b2)) {
            bail!("[retrofit] betas must each lie in [0, 1), not ({b1}, {b2})");
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            bail!("[retrofit] weight_decay must be finite and not negative, not {}", self.weight_decay);
        }
        if let Some(r) = &self.retrieval {
            r.validate()?;
        }
        if let Some(l) = &self.lora {
            if l.rank == 0 || !(l.alpha.is_finite() && l.alpha > 0.0) || !l.lr.is_finite() || l.lr <= 0.0 {
                bail!("[retrofit.lora] rank, alpha and lr must be positive (and alpha and lr finite)");
            }
        }
        Ok(())
    }

    /// Target evicted fraction at a step: 1 - 1/CR(step), CR rising linearly from 1.
    pub fn target_fraction(&self, step: usize) -> f64 {
        let cr = 1.0 + (self.target_cr - 1.0) * (step as f64 / self.ramp_steps as f64).min(1.0);
        1.0 - 1.0 / cr
    }
}

/// AdamW with its moments, saved in checkpoints so that a resumed run continues exactly.
pub struct AdamW {
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    t: usize,
}

impl AdamW {
    /// Zero moments for these parameters.
    pub fn new(params: &[&Var]) -> Result<Self> {
        let z = |p: &&Var| p.as_tensor().zeros_like();
        Ok(Self {
            m: params.iter().map(z).collect::<candle_core::Result<_>>()?,
            v: params.iter().map(z).collect::<candle_core::Result<_>>()?,
            t: 0,
        })
    }

    /// One update with gradients already clipped, each parameter at its own learning rate.
    pub fn step(&mut self, params: &[&Var], grads: &[Tensor], lrs: &[f64], s: &RetrofitSection) -> Result<()> {
        self.t += 1;
        let (b1, b2) = s.betas;
        let (c1, c2) = (1.0 - b1.powi(self.t as i32), 1.0 - b2.powi(self.t as i32));
        for (i, ((p, g), &lr)) in params.iter().zip(grads).zip(lrs).enumerate() {
            self.m[i] = ((&self.m[i] * b1)? + (g * (1.0 - b1))?)?;
            self.v[i] = ((&self.v[i] * b2)? + (g.sqr()? * (1.0 - b2))?)?;
            let upd = ((&self.m[i] / c1)? / ((&self.v[i] / c2)?.sqrt()? + 1e-8)?)?;
            let decayed = (p.as_tensor() * (1.0 - lr * s.weight_decay))?;
            p.set(&(decayed - (upd * lr)?)?)?;
        }
        Ok(())
    }
}

/// Training state.
pub struct Trainer {
    /// The frozen model.
    pub model: Llama,
    /// The adapter being trained.
    pub adapter: AdapterParams,
    /// Optimiser.
    pub opt: AdamW,
    /// Steps done.
    pub step: usize,
    /// Settings.
    pub cfg: RetrofitSection,
    tokens: Vec<u32>,
    retrieval: Option<RetrievalTask>,
}

/// Metrics of one step.
#[derive(Debug, Clone, Copy)]
pub struct StepStats {
    /// Step index (1-based after the update).
    pub step: usize,
    /// Total loss.
    pub loss: f64,
    /// KL(student || teacher) per token.
    pub kl: f64,
    /// Achieved evicted fraction (hard decisions).
    pub evicted: f64,
    /// Target evicted fraction.
    pub target: f64,
    /// Mean KL of the rows that predict a retrieval answer (`None` on a plain-text step).
    pub answer_kl: Option<f64>,
}

/// One training sequence and its noise.
struct Sample {
    ids: Vec<u32>,
    noise: Vec<Tensor>,
    retrieval: Option<WeightedIds>,
}

/// Loss terms of one sequence.
pub struct LossTerms {
    /// KL (weighted where the sequence carries row weights) plus the compression hinge.
    pub loss: Tensor,
    /// KL(student || teacher) per row, `[T]`.
    pub kl_rows: Tensor,
    /// The (weighted) mean KL in the loss.
    pub kl: Tensor,
    /// Evicted fraction (hard decisions).
    pub evicted: Tensor,
}

impl Trainer {
    /// A fresh trainer: zero projections, unit norms.
    pub fn new(model: Llama, cfg: RetrofitSection, tokens: Vec<u32>) -> Result<Self> {
        if tokens.len() <= cfg.seq_len {
            bail!("the training text has {} tokens, not more than seq_len {}", tokens.len(), cfg.seq_len);
        }
        let c = model.config().clone();
        let dev = model.device().clone();
        let mut norms = Vec::new();
        let mut projs = Vec::new();
        for _ in 0..c.num_layers {
            norms.push(Var::from_tensor(&Tensor::ones(c.hidden_size, DType::F32, &dev)?)?);
            projs.push(Var::from_tensor(&Tensor::zeros((c.num_kv_heads, c.hidden_size), DType::F32, &dev)?)?);
        }
        let lora = match &cfg.lora {
            Some(l) => Some(fresh_lora(&c, l, cfg.seed, &dev)?),
            None => None,
        };
        let adapter = AdapterParams { norms, projs, lora };
        let opt = AdamW::new(&params(&adapter))?;
        Ok(Self { model, adapter, opt, step: 0, cfg, tokens, retrieval: None })
    }

    /// Mixes retrieval samples into training (`[retrofit.retrieval]`, spelled by `tok`).
    pub fn with_retrieval(mut self, settings: RetrievalSection, tok: tokenizers::Tokenizer) -> Result<Self> {
        self.retrieval = Some(RetrievalTask::new(settings, tok, self.cfg.seq_len)?);
        Ok(self)
    }

    /// Sets the adapter's parameters from an adapter directory in NVIDIA's format (the optimiser
    /// starts fresh); the tensors' names and shapes must match this model, and the adapter's
    /// decision scale and offset (`config.json`) this run's, since they give the parameters
    /// their meaning.
    pub fn init_from_adapter(&mut self, dir: &Path) -> Result<()> {
        let cfg_text = std::fs::read_to_string(dir.join("config.json")).with_context(|| {
            format!("[retrofit] init: adapter directory {} has no readable config.json", dir.display())
        })?;
        let fields: crate::model::config::DmsCheckpointFields = serde_json::from_str(&cfg_text)
            .with_context(|| format!("[retrofit] init: {}/config.json", dir.display()))?;
        for (name, theirs, ours) in [
            ("dms_alpha_scale", fields.dms_alpha_scale.map(f64::from), self.cfg.alpha_scale),
            ("dms_initial_alpha_offset", fields.dms_initial_alpha_offset.map(f64::from), self.cfg.alpha_offset),
        ] {
            if let Some(v) = theirs.filter(|&v| (v - ours).abs() > 1e-6 * ours.abs().max(1.0)) {
                bail!("[retrofit] init: adapter {} has {name} {v}, this run {ours}", dir.display());
            }
        }
        let w = crate::model::weights::Weights::open_safetensors_dir(dir)
            .with_context(|| format!("[retrofit] init: adapter {}", dir.display()))?;
        let (h, kv) = (self.model.config().hidden_size, self.model.config().num_kv_heads);
        let dev = self.model.device().clone();
        for (i, (n, p)) in self.adapter.norms.iter().zip(&self.adapter.projs).enumerate() {
            let a = format!("model.layers.{i}.self_attn.dms_proj_alpha");
            let ctx = || format!("[retrofit] init: adapter {}", dir.display());
            n.set(&w.get(&format!("{a}_norm.weight"), &[h], &dev).with_context(ctx)?.to_dtype(DType::F32)?)?;
            p.set(&w.get(&format!("{a}.weight"), &[kv, h], &dev).with_context(ctx)?.to_dtype(DType::F32)?)?;
        }
        let theirs: lora::LoraFields = serde_json::from_str(&cfg_text)
            .with_context(|| format!("[retrofit] init: {}/config.json", dir.display()))?;
        let theirs = theirs.rank_alpha().with_context(|| format!("[retrofit] init: adapter {}", dir.display()))?;
        let ours = self.cfg.lora.as_ref().map(|l| (l.rank, l.alpha));
        match (theirs, &self.adapter.lora) {
            (None, _) => {}
            (Some((rank, alpha)), None) => bail!(
                "[retrofit] init: adapter {} carries a LoRA (rank {rank}, alpha {alpha}) that this run would drop: add [retrofit.lora] with that rank and alpha",
                dir.display()
            ),
            (Some(t), Some(vars)) => {
                if ours.is_some_and(|o| o.0 != t.0 || (o.1 - t.1).abs() > 1e-9) {
                    bail!(
                        "[retrofit] init: adapter {} has a LoRA of rank {} and alpha {}, this run rank {} and alpha {}",
                        dir.display(),
                        t.0,
                        t.1,
                        ours.map_or(0, |o| o.0),
                        ours.map_or(0.0, |o| o.1)
                    );
                }
                let c = self.model.config().clone();
                for (i, layer) in vars.layers.iter().enumerate() {
                    for (target, (a, b)) in LoraTarget::ALL.iter().zip(layer) {
                        let (out, inp) = target.dims(&c);
                        let ctx = || format!("[retrofit] init: adapter {}", dir.display());
                        let get = |part: &str, shape: &[usize]| {
                            w.get(&lora::tensor_name(i, *target, part), shape, &dev).with_context(ctx)
                        };
                        a.set(&get("A", &[t.0, inp])?.to_dtype(DType::F32)?)?;
                        b.set(&get("B", &[out, t.0])?.to_dtype(DType::F32)?)?;
                    }
                }
            }
        }
        Ok(())
    }

    fn sample(&self, step: usize) -> Result<Sample> {
        let mut rng = StdRng::seed_from_u64(self.cfg.seed ^ (step as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let at = rng.random_range(0..self.tokens.len() - self.cfg.seq_len);
        let ids = self.tokens[at..at + self.cfg.seq_len].to_vec();
        let c = self.model.config();
        let noise = (0..c.num_layers)
            .map(|_| {
                let v: Vec<f32> = (0..self.cfg.seq_len * c.num_kv_heads)
                    .map(|_| {
                        let u: f64 = rng.random_range(1e-6..1.0 - 1e-6);
                        (u.ln() - (1.0 - u).ln()) as f32
                    })
                    .collect();
                Ok(Tensor::from_vec(v, (self.cfg.seq_len, c.num_kv_heads), self.model.device())?)
            })
            .collect::<Result<Vec<_>>>()?;
        // Drawn after the noise, so that a run without retrieval samples sees the same data.
        let retrieval = match &self.retrieval {
            Some(task) => task.draw(&ids, self.cfg.seq_len, &mut rng)?,
            None => None,
        };
        match retrieval {
            Some(r) => Ok(Sample { ids: r.ids.clone(), noise, retrieval: Some(r) }),
            None => Ok(Sample { ids, noise, retrieval: None }),
        }
    }

    /// Loss terms for one sequence with given noise (no update); `weights` (one per row) turn the
    /// KL's mean into a weighted mean.
    pub fn loss(&self, ids: &[u32], noise: &[Tensor], weights: Option<&[f32]>, target: f64) -> Result<LossTerms> {
        let teacher = self.model.dense_forward(ids, None)?.logits.detach();
        let opts = StudentOpts {
            window: self.cfg.window,
            alpha_scale: self.cfg.alpha_scale,
            alpha_offset: self.cfg.alpha_offset,
            tau: self.cfg.tau,
            noise,
        };
        let out = self.model.dense_forward(ids, Some((&self.adapter, &opts)))?;
        let rows = kl_rows(&out.logits, &teacher)?;
        let kl = match weights {
            None => rows.mean_all()?,
            Some(w) => {
                if w.len() != ids.len() {
                    bail!("{} row weights for a {}-token sequence", w.len(), ids.len());
                }
                let total: f32 = w.iter().sum();
                let w = Tensor::from_slice(w, w.len(), rows.device())?;
                ((&rows * &w)?.sum_all()? / total as f64)?
            }
        };
        let stacked = Tensor::stack(&out.decisions, 0)?;
        let evicted = stacked.mean_all()?;
        let hinge = (evicted.neg()? + target)?.relu()?;
        Ok(LossTerms { loss: (&kl + &hinge)?, kl_rows: rows, kl, evicted })
    }

    /// One optimiser step.
    pub fn train_step(&mut self) -> Result<StepStats> {
        let sample = self.sample(self.step)?;
        let target = self.cfg.target_fraction(self.step);
        let weights = sample.retrieval.as_ref().map(|r| r.weights.as_slice());
        let LossTerms { loss, kl_rows, kl, evicted } = self.loss(&sample.ids, &sample.noise, weights, target)?;
        let answer_kl = match &sample.retrieval {
            Some(r) => {
                Some(kl_rows.narrow(0, r.answer_rows.start, r.answer_rows.len())?.mean_all()?.to_scalar::<f32>()? as f64)
            }
            None => None,
        };
        let grads = loss.backward()?;
        let ps = params(&self.adapter);
        let lrs = learning_rates(&self.adapter, &self.cfg);
        let mut gs = Vec::with_capacity(ps.len());
        let mut sq = 0f64;
        for p in &ps {
            let g = grads.get(p.as_tensor()).cloned().unwrap_or(p.as_tensor().zeros_like()?);
            sq += g.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
            gs.push(g);
        }
        let norm = sq.sqrt();
        if norm > self.cfg.grad_clip {
            let f = self.cfg.grad_clip / norm;
            gs = gs.into_iter().map(|g| (g * f).map_err(anyhow::Error::from)).collect::<Result<_>>()?;
        }
        self.opt.step(&ps, &gs, &lrs, &self.cfg)?;
        self.step += 1;
        Ok(StepStats {
            step: self.step,
            loss: loss.to_scalar::<f32>()? as f64,
            kl: kl.to_scalar::<f32>()? as f64,
            evicted: evicted.to_scalar::<f32>()? as f64,
            target,
            answer_kl,
        })
    }

    /// Writes a checkpoint (parameters, moments, step) into `dir/checkpoint`.
    pub fn save_checkpoint(&self, dir: &Path) -> Result<()> {
        let ck = dir.join("checkpoint");
        std::fs::create_dir_all(&ck)?;
        let mut t: HashMap<String, Tensor> = HashMap::new();
        for (i, p) in params(&self.adapter).iter().enumerate() {
            t.insert(format!("param.{i}"), p.as_tensor().clone());
            t.insert(format!("m.{i}"), self.opt.m[i].clone());
            t.insert(format!("v.{i}"), self.opt.v[i].clone());
        }
        candle_core::safetensors::save(&t, ck.join("state.safetensors"))?;
        std::fs::write(ck.join("state.json"), json!({"step": self.step, "adam_t": self.opt.t}).to_string())?;
        Ok(())
    }

    /// Restores a checkpoint written by [`Trainer::save_checkpoint`], if there is one.
    pub fn load_checkpoint(&mut self, dir: &Path) -> Result<bool> {
        let ck = dir.join("checkpoint");
        if !ck.join("state.json").exists() {
            return Ok(false);
        }
        let st: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(ck.join("state.json"))?)?;
        let t = candle_core::safetensors::load(ck.join("state.safetensors"), self.model.device())?;
        for (i, p) in params(&self.adapter).iter().enumerate() {
            let get = |k: String| t.get(&k).cloned().with_context(|| format!("checkpoint lacks {k}"));
            p.set(&get(format!("param.{i}"))?)?;
            self.opt.m[i] = get(format!("m.{i}"))?;
            self.opt.v[i] = get(format!("v.{i}"))?;
        }
        self.step = st["step"].as_u64().context("checkpoint step")? as usize;
        self.opt.t = st["adam_t"].as_u64().context("checkpoint adam_t")? as usize;
        Ok(true)
    }

    /// Writes the adapter in NVIDIA's format: config.json (`dms_*`) + adapter.safetensors.
    pub fn save_adapter(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir)?;
        let mut t: HashMap<String, Tensor> = HashMap::new();
        for (i, (n, p)) in self.adapter.norms.iter().zip(&self.adapter.projs).enumerate() {
            t.insert(format!("model.layers.{i}.self_attn.dms_proj_alpha_norm.weight"), n.as_tensor().clone());
            t.insert(format!("model.layers.{i}.self_attn.dms_proj_alpha.weight"), p.as_tensor().clone());
        }
        if let Some(l) = &self.adapter.lora {
            for (i, layer) in l.layers.iter().enumerate() {
                for (target, (a, b)) in LoraTarget::ALL.iter().zip(layer) {
                    t.insert(lora::tensor_name(i, *target, "A"), a.as_tensor().clone());
                    t.insert(lora::tensor_name(i, *target, "B"), b.as_tensor().clone());
                }
            }
        }
        candle_core::safetensors::save(&t, dir.join("adapter.safetensors"))?;
        let c = &self.cfg;
        let mut cfg = json!({
            "dms_window_size": c.window, "dms_alpha_scale": c.alpha_scale, "dms_initial_alpha_offset": c.alpha_offset,
            "dms_separate_alpha": true, "dms_alpha_per": "head", "dms_disable_eviction": false, "dms_tau": c.tau,
            "dms_cr": c.target_cr, "retrofit_steps_done": self.step, "retrofit_init": c.init,
            "retrofit_retrieval": c.retrieval.as_ref().map(|r| json!({"fraction": r.fraction, "answer_weight": r.answer_weight})),
        });
        if let Some(l) = &c.lora {
            cfg["lora_rank"] = json!(l.rank);
            cfg["lora_alpha"] = json!(l.alpha);
            cfg["retrofit_lora_lr"] = json!(l.lr);
        }
        std::fs::write(dir.join("config.json"), serde_json::to_string_pretty(&cfg)?)?;
        Ok(())
    }
}

/// Every trained variable: norms, projections, then the LoRA's factors (checkpoints index them
/// in this order).
fn params(a: &AdapterParams) -> Vec<&Var> {
    a.norms.iter().chain(a.projs.iter()).chain(a.lora.iter().flat_map(LoraVars::vars)).collect()
}

/// The learning rate of each of [`params`]: `lr` for the decision weights, the LoRA's own for
/// its factors.
fn learning_rates(a: &AdapterParams, cfg: &RetrofitSection) -> Vec<f64> {
    let decisions = a.norms.len() + a.projs.len();
    let lora = a.lora.as_ref().map_or(0, |l| l.vars().count());
    let lora_lr = cfg.lora.as_ref().map_or(cfg.lr, |l| l.lr);
    std::iter::repeat_n(cfg.lr, decisions).chain(std::iter::repeat_n(lora_lr, lora)).collect()
}

/// A fresh LoRA for every layer of `c`: A uniform in +-1/sqrt(in) (drawn from `seed`), B zero,
/// so that the student starts as the frozen model.
fn fresh_lora(c: &ModelConfig, s: &LoraSection, seed: u64, dev: &candle_core::Device) -> Result<LoraVars> {
    if c.mla.is_some() {
        bail!("[retrofit.lora] needs per-head attention (q/k/v/o_proj); this model has latent attention");
    }
    let full_rank = LoraTarget::ALL.iter().map(|t| t.dims(c).0.min(t.dims(c).1)).min().unwrap_or(0);
    if s.rank > full_rank {
        bail!(
            "[retrofit.lora] rank {} exceeds {full_rank}, the smallest side of the model's attention projections",
            s.rank
        );
    }
    let mut rng = StdRng::seed_from_u64(seed ^ 0x4C6F_5241);
    let mut layers = Vec::with_capacity(c.num_layers);
    for _ in 0..c.num_layers {
        let mut pair = |t: LoraTarget| -> Result<(Var, Var)> {
            let (out, inp) = t.dims(c);
            let bound = 1.0 / (inp as f64).sqrt();
            let a: Vec<f32> = (0..s.rank * inp).map(|_| rng.random_range(-bound..bound) as f32).collect();
            let a = Var::from_tensor(&Tensor::from_vec(a, (s.rank, inp), dev)?)?;
            let b = Var::from_tensor(&Tensor::zeros((out, s.rank), DType::F32, dev)?)?;
            Ok((a, b))
        };
        layers.push([pair(LoraTarget::Q)?, pair(LoraTarget::K)?, pair(LoraTarget::V)?, pair(LoraTarget::O)?]);
    }
    Ok(LoraVars { layers, scale: s.alpha / s.rank as f64 })
}

/// Training tokens of the configured corpus.
pub fn training_tokens(cfg: &RetrofitConfig, tok: &tokenizers::Tokenizer) -> Result<Vec<u32>> {
    let text = if cfg.retrofit.corpus == "brown-fiction-train" {
        crate::assets::corpus::fiction_text(crate::assets::corpus::Split::Train)?
    } else {
        crate::assets::corpus::load_text(&cfg.retrofit.corpus, cfg.base_dir.as_deref())?
    };
    Ok(tok.encode(text.as_str(), false).map_err(|e| anyhow::anyhow!("tokenizing: {e}"))?.get_ids().to_vec())
}

/// Runs (or resumes) a retrofit with a progress bar; writes checkpoints, the training log and
/// the adapter into `[retrofit] output`.
pub fn run(cfg: &RetrofitConfig) -> Result<PathBuf> {
    let device = open_device(&cfg.model.device)?;
    let path = crate::assets::resolve_model(&cfg.model.source, cfg.base_dir.as_deref())?;
    let mut loaded = load_model(&path, &device, WeightForm::Dense)?;
    cfg.model.apply_context(&mut loaded.model)?;
    let tok = loaded.tokenizer.clone().context("retrofit needs a model with a tokenizer")?;
    let tokens = training_tokens(cfg, &tok)?;
    let out = match &cfg.base_dir {
        Some(base) if Path::new(&cfg.retrofit.output).is_relative() => base.join(&cfg.retrofit.output),
        _ => PathBuf::from(&cfg.retrofit.output),
    };
    let mut trainer = Trainer::new(loaded.model, cfg.retrofit.clone(), tokens)?;
    if let Some(r) = &cfg.retrofit.retrieval {
        trainer = trainer.with_retrieval(r.clone(), tok)?;
    }
    let resumed = trainer.load_checkpoint(&out)?;
    if resumed {
        eprintln!("resuming from step {}", trainer.step);
    } else if let Some(init) = &cfg.retrofit.init {
        let dir = match &cfg.base_dir {
            Some(base) if Path::new(init).is_relative() => base.join(init),
            _ => PathBuf::from(init),
        };
        trainer.init_from_adapter(&dir)?;
        eprintln!("starting from the adapter in {}", dir.display());
    }
    std::fs::create_dir_all(&out)?;
    let mut log = std::fs::OpenOptions::new().create(true).append(true).open(out.join("training-log.jsonl"))?;
    let pb = ProgressBar::new(cfg.retrofit.steps as u64);
    pb.set_style(
        ProgressStyle::with_template("retrofit [{bar:30}] {pos}/{len} {msg} {elapsed}<{eta}")
            .expect("template")
            .progress_chars("=> "),
    );
    pb.set_position(trainer.step as u64);
    while trainer.step < cfg.retrofit.steps {
        let s = trainer.train_step()?;
        let mut line = json!({"step": s.step, "loss": s.loss, "kl": s.kl, "evicted": s.evicted, "target": s.target});
        if let Some(a) = s.answer_kl {
            line["answer_kl"] = json!(a);
        }
        writeln!(log, "{line}")?;
        pb.set_position(s.step as u64);
        pb.set_message(format!("loss {:.4} KL {:.4} evicted {:.3} target {:.3}", s.loss, s.kl, s.evicted, s.target));
        if s.step % cfg.retrofit.checkpoint_every == 0 || s.step == cfg.retrofit.steps {
            trainer.save_checkpoint(&out)?;
            trainer.save_adapter(&out)?;
        }
    }
    pb.finish();
    trainer.save_adapter(&out)?;
    Ok(out)
}
