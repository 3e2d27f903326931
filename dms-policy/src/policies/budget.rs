//! `tova` and `h2o`: attention-scored eviction to a per-row token budget, the baselines of the DMS
//! paper.
//!
//! Both ask the engine for this step's attention weights per stored slot
//! ([`SignalNeed::AttentionWeights`]: the softmax weights of the step's queries, averaged over the
//! query heads of the row's KV group and summed over the step's queries, so a prompt chunk is
//! scored by its own queries). After the step's attention, a row above its budget drops its
//! lowest-scored keys through compaction, so their memory returns at once:
//! - **TOVA** (Oren et al., 2024) scores each key by the current step's weights; the newest token
//!   is always kept.
//! - **H2O** (Zhang et al., 2023) scores each key by its attention mass accumulated since it was
//!   stored, and always keeps the `recent` newest tokens.

use serde::Deserialize;

use super::full::{bad_row, protocol};
use super::Rows;
use crate::{
    CacheShape, CompactPlan, EvictPlan, PolicyError, PolicyFactory, Pos, RowRef, SequencePolicy, SignalNeed, Slot,
    Write, VISIBLE_FOREVER,
};

/// Parameters of `tova` and `h2o`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BudgetParams {
    /// Registry name.
    #[serde(default)]
    pub name: Option<String>,
    /// Keys kept per row: a token count (>= 1), or below 1 a fraction of the tokens seen.
    pub budget: f64,
    /// H2O only: newest tokens always kept besides the heavy hitters.
    #[serde(default)]
    pub recent: Option<u32>,
}

/// How keys are scored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scoring {
    /// This step's attention weights (TOVA).
    Current,
    /// Attention mass accumulated since the key was stored (H2O).
    Accumulated,
}

/// TOVA or H2O with its budget.
#[derive(Debug, Clone)]
pub struct BudgetPolicy {
    name: &'static str,
    scoring: Scoring,
    budget: f64,
    recent: u32,
}

impl BudgetPolicy {
    /// `tova` with these parameters.
    pub fn tova(p: BudgetParams) -> Result<Self, PolicyError> {
        if p.recent.is_some() {
            return Err(invalid("tova", "`recent` is an h2o parameter (tova always keeps only the newest token)"));
        }
        Self::new("tova", Scoring::Current, p.budget, 1)
    }

    /// `h2o` with these parameters (`recent` defaults to half the budget's tokens, at least 1).
    pub fn h2o(p: BudgetParams) -> Result<Self, PolicyError> {
        let default_recent = if p.budget >= 1.0 { (p.budget / 2.0).max(1.0) as u32 } else { 1 };
        Self::new("h2o", Scoring::Accumulated, p.budget, p.recent.unwrap_or(default_recent).max(1))
    }

    fn new(name: &'static str, scoring: Scoring, budget: f64, recent: u32) -> Result<Self, PolicyError> {
        if !(budget.is_finite() && budget > 0.0) || (budget > 1.0 && budget.fract() != 0.0) {
            return Err(invalid(name, "`budget` must be a whole number of tokens >= 1, or a fraction in (0, 1)"));
        }
        if budget >= 1.0 && recent as f64 > budget {
            return Err(invalid(name, "`recent` must not exceed `budget`"));
        }
        Ok(Self { name, scoring, budget, recent })
    }

    /// Keys a row keeps after `seen` tokens.
    fn budget_at(&self, seen: Pos) -> usize {
        if self.budget >= 1.0 {
            self.budget as usize
        } else {
            ((self.budget * seen as f64).ceil() as usize).max(1)
        }
    }
}

fn invalid(policy: &str, message: &str) -> PolicyError {
    PolicyError::InvalidParams { policy: policy.into(), message: message.into() }
}

impl PolicyFactory for BudgetPolicy {
    fn name(&self) -> &str {
        self.name
    }
    fn signal_need(&self) -> SignalNeed {
        SignalNeed::AttentionWeights
    }
    fn new_sequence(&self, shape: CacheShape) -> Box<dyn SequencePolicy> {
        Box::new(BudgetState { cfg: self.clone(), rows: Rows::new(shape, BudgetRow::default) })
    }
    fn describe(&self) -> String {
        let budget = if self.budget >= 1.0 {
            format!("{} tokens", self.budget)
        } else {
            format!("{:.0}% of tokens seen", 100.0 * self.budget)
        };
        match self.scoring {
            Scoring::Current => format!("tova (budget {budget}, scored by the current step's attention)"),
            Scoring::Accumulated => format!("h2o (budget {budget}, recent {}, accumulated attention)", self.recent),
        }
    }
}

/// One row: which position each slot holds and its score.
#[derive(Debug, Clone, Default)]
struct BudgetRow {
    pos: Vec<Pos>,
    score: Vec<f32>,
    seen: Pos,
    /// Weights of this step arrived (required before compaction).
    observed: bool,
}

#[derive(Clone)]
struct BudgetState {
    cfg: BudgetPolicy,
    rows: Rows<BudgetRow>,
}

impl SequencePolicy for BudgetState {
    fn fork(&self) -> Option<Box<dyn SequencePolicy>> {
        Some(Box::new(self.clone()))
    }

    fn decide(&mut self, _: RowRef, _: Pos, _: usize, _: Option<&[f32]>) -> Result<(), PolicyError> {
        Ok(())
    }

    fn evict(&mut self, row: RowRef, first_pos: Pos, n_new: usize, plan: &mut EvictPlan) -> Result<(), PolicyError> {
        let name = self.cfg.name;
        let r = self.rows.get_mut(row).ok_or_else(|| bad_row(name, row))?;
        if first_pos != r.seen {
            return Err(protocol(name, format!("step starts at {first_pos} but the row has seen {} tokens", r.seen)));
        }
        plan.clear();
        for i in 0..n_new {
            plan.writes.push(Write { slot: r.pos.len() as Slot, last_visible: VISIBLE_FOREVER });
            r.pos.push(first_pos + i as Pos);
            r.score.push(0.0);
        }
        r.seen = first_pos + n_new as Pos;
        r.observed = false;
        Ok(())
    }

    fn observe_attention(&mut self, row: RowRef, weights: &[f32]) -> Result<(), PolicyError> {
        let name = self.cfg.name;
        let r = self.rows.get_mut(row).ok_or_else(|| bad_row(name, row))?;
        if weights.len() != r.pos.len() {
            return Err(protocol(name, format!("{} attention weights for {} slots", weights.len(), r.pos.len())));
        }
        match self.cfg.scoring {
            Scoring::Current => r.score.copy_from_slice(weights),
            Scoring::Accumulated => r.score.iter_mut().zip(weights).for_each(|(s, w)| *s += w),
        }
        r.observed = true;
        Ok(())
    }

    fn compact(&mut self, row: RowRef, plan: &mut CompactPlan) -> Result<(), PolicyError> {
        let name = self.cfg.name;
        let budget = self.cfg.budget_at(self.rows.get(row).map_or(0, |r| r.seen));
        let recent = self.cfg.recent as usize;
        let r = self.rows.get_mut(row).ok_or_else(|| bad_row(name, row))?;
        plan.clear();
        let len = r.pos.len();
        plan.len = len as u32;
        if len <= budget {
            return Ok(());
        }
        if !r.observed {
            return Err(protocol(name, "compaction before this step's attention weights".into()));
        }
        // The newest `recent` positions are protected (compaction reorders slots, so by position).
        let protect_from = r.seen.saturating_sub(recent as Pos);
        let mut order: Vec<usize> = (0..len).filter(|&s| r.pos[s] < protect_from).collect();
        let n_drop = (len - budget).min(order.len());
        // Lowest score first; ties go to the older token.
        order.sort_by(|&a, &b| r.score[a].total_cmp(&r.score[b]).then(r.pos[a].cmp(&r.pos[b])));
        let mut victims: Vec<usize> = order[..n_drop].to_vec();
        victims.sort_unstable();
        plan.drop.extend(victims.iter().map(|&s| s as Slot));
        // Fill each hole (lowest first) from the highest kept slot.
        let mut is_victim = vec![false; len];
        for &v in &victims {
            is_victim[v] = true;
        }
        let mut end = len;
        for &hole in &victims {
            while end > 0 && is_victim[end - 1] {
                end -= 1;
            }
            if hole >= end {
                break;
            }
            let from = end - 1;
            plan.moves.push((from as Slot, hole as Slot));
            r.pos[hole] = r.pos[from];
            r.score[hole] = r.score[from];
            is_victim[hole] = false;
            is_victim[from] = true;
            end -= 1;
        }
        let new_len = len - n_drop;
        r.pos.truncate(new_len);
        r.score.truncate(new_len);
        plan.len = new_len as u32;
        Ok(())
    }
}
