//! `sliding_window`: keeps the last `window` tokens plus the first `sinks` tokens (StreamingLLM).

use serde::Deserialize;

use super::full::{bad_row, protocol};
use super::Rows;
use crate::{CacheShape, CompactPlan, EvictPlan, PolicyError, PolicyFactory, Pos, RowLedger, RowRef, SequencePolicy};

/// Parameters of `sliding_window`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SlidingWindowParams {
    /// Registry name (`"sliding_window"`).
    #[serde(default)]
    pub name: Option<String>,
    /// Number of most recent tokens each query sees, itself included (>= 1).
    pub window: u32,
    /// Number of first tokens kept forever (attention sinks).
    #[serde(default)]
    pub sinks: u32,
}

/// Keeps the last `window` tokens plus `sinks` first tokens: query q sees key k iff
/// `k < sinks` or `q - k < window`.
#[derive(Debug, Clone)]
pub struct SlidingWindowPolicy {
    window: u32,
    sinks: u32,
}

impl SlidingWindowPolicy {
    /// Validates the parameters.
    pub fn new(params: SlidingWindowParams) -> Result<Self, PolicyError> {
        if params.window == 0 || params.window > crate::MAX_WINDOW {
            return Err(PolicyError::InvalidParams {
                policy: "sliding_window".into(),
                message: format!("`window` must be between 1 and {}, not {}", crate::MAX_WINDOW, params.window),
            });
        }
        Ok(Self { window: params.window, sinks: params.sinks })
    }
}

impl PolicyFactory for SlidingWindowPolicy {
    fn name(&self) -> &str {
        "sliding_window"
    }
    fn new_sequence(&self, shape: CacheShape) -> Box<dyn SequencePolicy> {
        window_state(self.window, self.sinks, shape)
    }
    /// DMS's delayed window with every token flagged: a flagged key stays visible to the next
    /// `window - 1` queries, so query q sees key k iff `q - k < window`, or `k < sinks`.
    fn device_program(&self) -> Result<crate::DeviceProgram, PolicyError> {
        Ok(crate::DeviceProgram::DelayedWindow {
            window: self.window as usize - 1,
            flags: crate::FlagSource::All,
            sinks: self.sinks,
        })
    }
    fn describe(&self) -> String {
        format!("sliding_window (window {}, sinks {})", self.window, self.sinks)
    }
}

/// A sequence's state under a window of `window` tokens and `sinks` sinks (both already valid).
pub(crate) fn window_state(window: u32, sinks: u32, shape: CacheShape) -> Box<dyn SequencePolicy> {
    let cap = window as usize;
    Box::new(WindowState { window, sinks, rows: Rows::new(shape, || RowLedger::new(cap)) })
}

#[derive(Clone)]
struct WindowState {
    window: Pos,
    sinks: Pos,
    rows: Rows<RowLedger>,
}

impl SequencePolicy for WindowState {
    fn fork(&self) -> Option<Box<dyn SequencePolicy>> {
        Some(Box::new(self.clone()))
    }

    fn decide(&mut self, _: RowRef, _: Pos, _: usize, _: Option<&[f32]>) -> Result<(), PolicyError> {
        Ok(())
    }

    fn evict(&mut self, row: RowRef, first_pos: Pos, n_new: usize, plan: &mut EvictPlan) -> Result<(), PolicyError> {
        let name = "sliding_window";
        let ledger = self.rows.get_mut(row).ok_or_else(|| bad_row(name, row))?;
        ledger.begin_step(first_pos, plan).map_err(|m| protocol(name, m))?;
        for t in first_pos..first_pos + n_new as Pos {
            if t >= self.window && t - self.window >= self.sinks {
                ledger.release(t - self.window, t, plan).map_err(|m| protocol(name, m))?;
            }
            ledger.place(t, plan);
        }
        Ok(())
    }

    fn compact(&mut self, row: RowRef, plan: &mut CompactPlan) -> Result<(), PolicyError> {
        let ledger = self.rows.get_mut(row).ok_or_else(|| bad_row("sliding_window", row))?;
        ledger.compact(plan);
        Ok(())
    }
}
