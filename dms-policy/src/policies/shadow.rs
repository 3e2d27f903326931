//! `shadow`: runs another policy's decide/evict/compact on a simulated cache and logs what it
//! would keep, while the real cache keeps everything (outputs equal `full`).

use serde::Deserialize;

use super::full::{bad_row, protocol};
use super::Rows;
use crate::{
    CacheShape, CompactPlan, EvictPlan, PolicyError, PolicyFactory, Pos, RowLedger, RowRef, SequencePolicy, SignalNeed,
};
use std::sync::Arc;

/// Parameters of `shadow`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShadowParams {
    /// Registry name (`"shadow"`).
    #[serde(default)]
    pub name: Option<String>,
    /// The policy whose decisions are computed and logged but not applied.
    pub inner: toml::Table,
}

/// Applies `full`, shadows `inner`.
#[derive(Debug, Clone)]
pub struct ShadowPolicy {
    inner: Arc<dyn PolicyFactory>,
}

impl ShadowPolicy {
    /// Shadows an already built policy.
    pub fn new(inner: Arc<dyn PolicyFactory>) -> Self {
        Self { inner }
    }
}

impl PolicyFactory for ShadowPolicy {
    fn name(&self) -> &str {
        "shadow"
    }
    fn signal_need(&self) -> SignalNeed {
        self.inner.signal_need()
    }
    fn adapter(&self) -> Option<&str> {
        self.inner.adapter()
    }
    fn new_sequence(&self, shape: CacheShape) -> Box<dyn SequencePolicy> {
        Box::new(ShadowState {
            inner: self.inner.new_sequence(shape),
            real: Rows::new(shape, || RowLedger::new(0)),
            shadow_len: Rows::new(shape, || 0usize),
            scratch_evict: EvictPlan::default(),
            scratch_compact: CompactPlan::default(),
        })
    }
    fn keeps_every_key(&self) -> bool {
        true
    }
    fn device_program(&self) -> Result<crate::DeviceProgram, PolicyError> {
        Err(PolicyError::NoDeviceForm {
            policy: "shadow".into(),
            why: "shadow mode keeps the shadowed policy's ledger on the host".into(),
        })
    }
    fn describe(&self) -> String {
        format!("shadow of {} (applies full)", self.inner.describe())
    }
}

struct ShadowState {
    inner: Box<dyn SequencePolicy>,
    real: Rows<RowLedger>,
    shadow_len: Rows<usize>,
    scratch_evict: EvictPlan,
    scratch_compact: CompactPlan,
}

impl SequencePolicy for ShadowState {
    fn fork(&self) -> Option<Box<dyn SequencePolicy>> {
        Some(Box::new(ShadowState {
            inner: self.inner.fork()?,
            real: self.real.clone(),
            shadow_len: self.shadow_len.clone(),
            scratch_evict: EvictPlan::default(),
            scratch_compact: CompactPlan::default(),
        }))
    }

    fn decide(&mut self, row: RowRef, first_pos: Pos, n_new: usize, scores: Option<&[f32]>) -> Result<(), PolicyError> {
        self.inner.decide(row, first_pos, n_new, scores)
    }

    fn evict(&mut self, row: RowRef, first_pos: Pos, n_new: usize, plan: &mut EvictPlan) -> Result<(), PolicyError> {
        self.inner.evict(row, first_pos, n_new, &mut self.scratch_evict)?;
        let len = self.shadow_len.get_mut(row).ok_or_else(|| bad_row("shadow", row))?;
        for w in &self.scratch_evict.writes {
            if w.slot as usize == *len {
                *len += 1;
            }
        }
        let ledger = self.real.get_mut(row).ok_or_else(|| bad_row("shadow", row))?;
        ledger.begin_step(first_pos, plan).map_err(|m| protocol("shadow", m))?;
        for i in 0..n_new as Pos {
            ledger.place(first_pos + i, plan);
        }
        Ok(())
    }

    fn compact(&mut self, row: RowRef, plan: &mut CompactPlan) -> Result<(), PolicyError> {
        self.inner.compact(row, &mut self.scratch_compact)?;
        *self.shadow_len.get_mut(row).ok_or_else(|| bad_row("shadow", row))? = self.scratch_compact.len as usize;
        self.real.get_mut(row).ok_or_else(|| bad_row("shadow", row))?.compact(plan);
        Ok(())
    }

    fn shadow_kept(&self, row: RowRef) -> Option<usize> {
        self.shadow_len.get(row).copied()
    }
}
