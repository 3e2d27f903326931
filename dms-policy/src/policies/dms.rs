//! `dms`: Dynamic Memory Sparsification (NVIDIA, arXiv 2506.05345), inference semantics of
//! `shared/design/dms-spec.md` rules 1-6.
//!
//! One decision per (token, row): `logit = raw * alpha_scale - alpha_offset`, flagged iff
//! `logit > 0` (rule 1); the decision made at token t flags token t-1 (rule 2); a flagged token
//! stays visible for `window` more queries and its slot is then reused (rule 3).

use serde::Deserialize;

use super::full::{bad_row, protocol};
use super::Rows;
use crate::{
    CacheShape, CompactPlan, DelayedWindow, DeviceProgram, EvictPlan, FlagSource, PolicyError, PolicyFactory, Pos,
    RowRef, SequencePolicy, SignalNeed,
};

/// Where the raw decision signal comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum DecisionKind {
    /// The model's own DMS signal (query neuron or `dms_proj_alpha` adapter, from the checkpoint
    /// or from the `adapter` file).
    #[default]
    Model,
    /// Training-free: raw = L2 norm of the token's key; flagged iff `norm * alpha_scale - alpha_offset > 0`.
    KeyNorm,
    /// Synthetic: each token is flagged with probability `evict_rate` (seeded hash); for
    /// benchmarks at a set compression, never for quality claims.
    Random,
}

/// Parameters of `dms`. Keys not given fall back to the checkpoint's `dms_*` fields, then to the
/// reference defaults (`alpha_scale` 100, `alpha_offset` 5).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DmsParams {
    /// Registry name (`"dms"`).
    #[serde(default)]
    pub name: Option<String>,
    /// Delay W: a flagged key stays visible to W more queries (checkpoint `dms_window_size`).
    #[serde(default)]
    pub window: Option<u32>,
    /// Scale of the raw signal (checkpoint `dms_alpha_scale`).
    #[serde(default)]
    pub alpha_scale: Option<f32>,
    /// Offset subtracted after scaling (checkpoint `dms_initial_alpha_offset`).
    #[serde(default)]
    pub alpha_offset: Option<f32>,
    /// Never flag anything (checkpoint `dms_disable_eviction`).
    #[serde(default)]
    pub disable_eviction: Option<bool>,
    /// Decision source.
    #[serde(default)]
    pub decision: DecisionKind,
    /// Adapter file in NVIDIA's format (for `decision = "model"` on a model without one).
    #[serde(default)]
    pub adapter: Option<String>,
    /// Flag probability for `decision = "random"`.
    #[serde(default)]
    pub evict_rate: Option<f64>,
    /// Seed for `decision = "random"`.
    #[serde(default)]
    pub seed: u64,
    /// The first `sinks` tokens of a sequence are never flagged (attention sinks, as in
    /// StreamingLLM; an extension: NVIDIA's DMS has none). Host store only.
    #[serde(default)]
    pub sinks: u32,
}

/// A configured DMS policy.
#[derive(Debug, Clone)]
pub struct DmsPolicy {
    window: u32,
    alpha_scale: f32,
    alpha_offset: f32,
    disable_eviction: bool,
    decision: DecisionKind,
    adapter: Option<String>,
    evict_rate: f64,
    seed: u64,
    sinks: u32,
}

fn invalid(message: impl Into<String>) -> PolicyError {
    PolicyError::InvalidParams { policy: "dms".into(), message: message.into() }
}

impl DmsPolicy {
    /// Validates the parameters (after checkpoint defaults were merged in).
    pub fn new(p: DmsParams) -> Result<Self, PolicyError> {
        let window =
            p.window.ok_or_else(|| invalid("`window` is not set and the model's config has no dms_window_size"))?;
        if window > crate::MAX_WINDOW {
            return Err(invalid(format!("`window` must be at most {}, not {window}", crate::MAX_WINDOW)));
        }
        let alpha_scale = p.alpha_scale.unwrap_or(100.0);
        let alpha_offset = p.alpha_offset.unwrap_or(5.0);
        if !alpha_scale.is_finite() || !alpha_offset.is_finite() {
            return Err(invalid("`alpha_scale` and `alpha_offset` must be finite"));
        }
        let evict_rate = match (p.decision, p.evict_rate) {
            (DecisionKind::Random, Some(r)) if (0.0..=1.0).contains(&r) => r,
            (DecisionKind::Random, Some(r)) => return Err(invalid(format!("`evict_rate` {r} is outside [0, 1]"))),
            (DecisionKind::Random, None) => return Err(invalid("`decision = \"random\"` needs `evict_rate`")),
            (_, Some(_)) => return Err(invalid("`evict_rate` only applies to `decision = \"random\"`")),
            (_, None) => 0.0,
        };
        if p.adapter.is_some() && p.decision != DecisionKind::Model {
            return Err(invalid("`adapter` only applies to `decision = \"model\"`"));
        }
        Ok(Self {
            window,
            alpha_scale,
            alpha_offset,
            disable_eviction: p.disable_eviction.unwrap_or(false),
            decision: p.decision,
            adapter: p.adapter,
            evict_rate,
            seed: p.seed,
            sinks: p.sinks,
        })
    }

    /// The flag rule of this policy's decisions (spec rules 1-2). Eviction disabled flags nothing.
    pub fn flag_source(&self) -> FlagSource {
        let (scale, offset) = (self.alpha_scale, self.alpha_offset);
        match (self.disable_eviction, self.decision) {
            (true, _) => FlagSource::None,
            (false, DecisionKind::Model) => FlagSource::Learned { scale, offset },
            (false, DecisionKind::Random) => FlagSource::Random { seed: self.seed, rate: self.evict_rate },
            (false, DecisionKind::KeyNorm) => FlagSource::KeyNorm { scale, offset },
        }
    }
}

impl PolicyFactory for DmsPolicy {
    fn name(&self) -> &str {
        "dms"
    }
    fn signal_need(&self) -> SignalNeed {
        match (self.disable_eviction, self.decision) {
            (true, _) | (_, DecisionKind::Random) => SignalNeed::None,
            (false, DecisionKind::Model) => SignalNeed::DecisionScores,
            (false, DecisionKind::KeyNorm) => SignalNeed::KeyNorms,
        }
    }
    fn adapter(&self) -> Option<&str> {
        self.adapter.as_deref()
    }
    fn new_sequence(&self, shape: CacheShape) -> Box<dyn SequencePolicy> {
        let w = self.window;
        Box::new(DmsState { cfg: self.clone(), rows: Rows::new(shape, || DelayedWindow::new(w)) })
    }
    fn device_program(&self) -> Result<DeviceProgram, PolicyError> {
        Ok(DeviceProgram::DelayedWindow { window: self.window as usize, flags: self.flag_source(), sinks: self.sinks })
    }
    fn describe(&self) -> String {
        let source = match self.decision {
            DecisionKind::Model => match &self.adapter {
                Some(a) => format!("learned adapter {a}"),
                None => "learned (model checkpoint)".into(),
            },
            DecisionKind::KeyNorm => "key norm (training-free)".into(),
            DecisionKind::Random => format!("random at rate {} (synthetic)", self.evict_rate),
        };
        format!(
            "dms (window {}, decisions {source}, alpha_scale {}, alpha_offset {}{}{})",
            self.window,
            self.alpha_scale,
            self.alpha_offset,
            if self.sinks > 0 { format!(", {} sinks", self.sinks) } else { String::new() },
            if self.disable_eviction { ", eviction disabled" } else { "" }
        )
    }
}

#[derive(Clone)]
struct DmsState {
    cfg: DmsPolicy,
    rows: Rows<DelayedWindow>,
}

/// Deterministic uniform number in [0, 1) from (seed, layer, head, position): the `random`
/// decision source flags token `pos` of a row iff this is below the eviction rate. Shared with
/// the GPU kernels and synthetic benchmark caches so that every path flags the same tokens.
pub fn random_flag_unit(seed: u64, layer: usize, head: usize, pos: Pos) -> f64 {
    let mut x = seed ^ 0x9E37_79B9_7F4A_7C15;
    for v in [layer as u64, head as u64, pos as u64] {
        x = (x ^ v).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        x ^= x >> 31;
        x = x.wrapping_mul(0x94D0_49BB_1331_11EB);
        x ^= x >> 29;
    }
    (x >> 11) as f64 / (1u64 << 53) as f64
}

impl SequencePolicy for DmsState {
    fn fork(&self) -> Option<Box<dyn SequencePolicy>> {
        Some(Box::new(self.clone()))
    }

    fn decide(&mut self, row: RowRef, first_pos: Pos, n_new: usize, scores: Option<&[f32]>) -> Result<(), PolicyError> {
        let cfg = &self.cfg;
        let r = self.rows.get_mut(row).ok_or_else(|| bad_row("dms", row))?;
        // Key-norm decisions follow the learned rule with the key norm as the raw signal.
        let source = cfg.flag_source();
        if source.reads_signal() {
            let s = scores.ok_or_else(|| protocol("dms", "decision scores were not provided".into()))?;
            if s.len() != n_new {
                return Err(protocol("dms", format!("{} scores for {n_new} tokens", s.len())));
            }
            // Token t's decision flags token t - 1, which a sink (t - 1 < sinks) ignores.
            let flags = s
                .iter()
                .zip(first_pos..)
                .map(|(&raw, t)| t > cfg.sinks && source.flags_token(row.layer, row.head, 0, raw));
            r.decide_shifted(first_pos, flags);
        } else {
            // Token t's decision flags token t - 1; token 0's flags nothing.
            let flags = (first_pos..first_pos + n_new as Pos)
                .map(|t| t > cfg.sinks && source.flags_token(row.layer, row.head, t - 1, 0.0));
            r.decide_shifted(first_pos, flags);
        }
        Ok(())
    }

    fn evict(&mut self, row: RowRef, first_pos: Pos, n_new: usize, plan: &mut EvictPlan) -> Result<(), PolicyError> {
        let r = self.rows.get_mut(row).ok_or_else(|| bad_row("dms", row))?;
        r.evict(first_pos, n_new, plan).map_err(|m| protocol("dms", m))
    }

    fn compact(&mut self, row: RowRef, plan: &mut CompactPlan) -> Result<(), PolicyError> {
        let r = self.rows.get_mut(row).ok_or_else(|| bad_row("dms", row))?;
        r.compact(plan);
        Ok(())
    }

    fn pending_evictions(&self, row: RowRef) -> usize {
        self.rows.get(row).map_or(0, DelayedWindow::pending)
    }
}
