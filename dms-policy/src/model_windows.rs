//! A model's own attention windows (Mistral's `sliding_window`, Gemma 3's local layers) around
//! any policy.
//!
//! In a layer the model trained with a window, query q sees key k iff `q - k < window`: that is
//! the model's definition, not a choice, so those rows run exactly that window (their memory
//! returned as keys leave it) and the configured policy governs the layers that attend to the
//! whole context.

use crate::policies::sliding_window::window_state;
use crate::{CacheShape, CompactPlan, EvictPlan, PolicyError, Pos, RowRef, SequencePolicy, MAX_WINDOW};

/// Which layers attend to only their last `window` tokens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelWindows {
    window: u32,
    layers: Vec<bool>,
}

impl ModelWindows {
    /// A window of `window` tokens (each query sees itself and the `window - 1` before it) on
    /// the layers flagged in `layers`; an error for a window of 0 or above [`MAX_WINDOW`].
    pub fn new(window: u32, layers: Vec<bool>) -> Result<Self, PolicyError> {
        if window == 0 || window > MAX_WINDOW {
            return Err(PolicyError::InvalidParams {
                policy: "model window".into(),
                message: format!("the window must be between 1 and {MAX_WINDOW} tokens, not {window}"),
            });
        }
        Ok(Self { window, layers })
    }

    /// Tokens each query of a windowed layer sees, itself included.
    pub fn window(&self) -> u32 {
        self.window
    }

    /// Per layer: whether it is windowed.
    pub fn layers(&self) -> &[bool] {
        &self.layers
    }

    /// Whether `layer` is windowed (layers past the flags are not).
    pub fn covers(&self, layer: usize) -> bool {
        self.layers.get(layer).copied().unwrap_or(false)
    }

    /// Wraps `inner` (a sequence's state under the configured policy) so that the windowed
    /// layers of `shape` run the model's window and every other row runs `inner`.
    pub fn wrap(&self, inner: Box<dyn SequencePolicy>, shape: CacheShape) -> Box<dyn SequencePolicy> {
        let window = window_state(self.window, 0, shape);
        Box::new(Windowed { layers: self.layers.clone(), window, inner })
    }
}

/// A sequence's state: the window's rows and the configured policy's.
struct Windowed {
    layers: Vec<bool>,
    window: Box<dyn SequencePolicy>,
    inner: Box<dyn SequencePolicy>,
}

impl Windowed {
    fn policy(&mut self, row: RowRef) -> &mut dyn SequencePolicy {
        match self.layers.get(row.layer).copied().unwrap_or(false) {
            true => self.window.as_mut(),
            false => self.inner.as_mut(),
        }
    }

    fn windowed(&self, row: RowRef) -> bool {
        self.layers.get(row.layer).copied().unwrap_or(false)
    }
}

impl SequencePolicy for Windowed {
    fn decide(&mut self, row: RowRef, first_pos: Pos, n_new: usize, scores: Option<&[f32]>) -> Result<(), PolicyError> {
        self.policy(row).decide(row, first_pos, n_new, scores)
    }

    fn evict(&mut self, row: RowRef, first_pos: Pos, n_new: usize, plan: &mut EvictPlan) -> Result<(), PolicyError> {
        self.policy(row).evict(row, first_pos, n_new, plan)
    }

    fn compact(&mut self, row: RowRef, plan: &mut CompactPlan) -> Result<(), PolicyError> {
        self.policy(row).compact(row, plan)
    }

    fn observe_attention(&mut self, row: RowRef, weights: &[f32]) -> Result<(), PolicyError> {
        self.policy(row).observe_attention(row, weights)
    }

    fn shadow_kept(&self, row: RowRef) -> Option<usize> {
        match self.windowed(row) {
            true => None,
            false => self.inner.shadow_kept(row),
        }
    }

    fn pending_evictions(&self, row: RowRef) -> usize {
        match self.windowed(row) {
            true => 0,
            false => self.inner.pending_evictions(row),
        }
    }

    fn fork(&self) -> Option<Box<dyn SequencePolicy>> {
        Some(Box::new(Windowed { layers: self.layers.clone(), window: self.window.fork()?, inner: self.inner.fork()? }))
    }
}
