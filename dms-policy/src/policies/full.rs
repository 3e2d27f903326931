//! `full`: keeps every token (the reference every other policy is compared with).

use serde::Deserialize;

use super::Rows;
use crate::{CacheShape, CompactPlan, EvictPlan, PolicyError, PolicyFactory, Pos, RowLedger, RowRef, SequencePolicy};

/// Parameters of `full` (it has none besides `name`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FullParams {
    /// Registry name (`"full"`).
    #[serde(default)]
    pub name: Option<String>,
}

/// The policy that never evicts.
#[derive(Debug, Clone, Default)]
pub struct FullPolicy;

impl PolicyFactory for FullPolicy {
    fn name(&self) -> &str {
        "full"
    }
    fn new_sequence(&self, shape: CacheShape) -> Box<dyn SequencePolicy> {
        Box::new(FullState { rows: Rows::new(shape, || RowLedger::new(0)) })
    }
    fn device_program(&self) -> Result<crate::DeviceProgram, PolicyError> {
        Ok(crate::DeviceProgram::KeepAll)
    }
    fn describe(&self) -> String {
        "full (no eviction)".into()
    }
}

#[derive(Clone)]
struct FullState {
    rows: Rows<RowLedger>,
}

pub(crate) fn bad_row(policy: &str, row: RowRef) -> PolicyError {
    PolicyError::Protocol { policy: policy.into(), message: format!("no such row {row:?}") }
}

pub(crate) fn protocol(policy: &str, message: String) -> PolicyError {
    PolicyError::Protocol { policy: policy.into(), message }
}

impl SequencePolicy for FullState {
    fn fork(&self) -> Option<Box<dyn SequencePolicy>> {
        Some(Box::new(self.clone()))
    }

    fn decide(&mut self, _: RowRef, _: Pos, _: usize, _: Option<&[f32]>) -> Result<(), PolicyError> {
        Ok(())
    }

    fn evict(&mut self, row: RowRef, first_pos: Pos, n_new: usize, plan: &mut EvictPlan) -> Result<(), PolicyError> {
        let ledger = self.rows.get_mut(row).ok_or_else(|| bad_row("full", row))?;
        ledger.begin_step(first_pos, plan).map_err(|m| protocol("full", m))?;
        for i in 0..n_new as Pos {
            ledger.place(first_pos + i, plan);
        }
        Ok(())
    }

    fn compact(&mut self, row: RowRef, plan: &mut CompactPlan) -> Result<(), PolicyError> {
        let ledger = self.rows.get_mut(row).ok_or_else(|| bad_row("full", row))?;
        ledger.compact(plan);
        Ok(())
    }
}
