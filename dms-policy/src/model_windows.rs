//! A model's own attention windows (Mistral's `sliding_window`, Gemma 3's local layers) around
//! any policy.
//!
//! In a layer the model trained with a window, query q sees key k iff `q - k < window`: that is
//! the model's definition, not a choice. Under a policy that keeps every key (the full cache),
//! those rows run exactly that window, their memory returned as keys leave it. Under any other
//! policy they run the policy with every key also hidden once it leaves the window: a key is
//! visible iff both allow it, and memory is what the policy keeps. Layers without a window run
//! the policy alone.

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

    /// Wraps `inner` (a sequence's state under the configured policy) for the layers of `shape`:
    /// windowed rows run the model's window alone when `inner_keeps_all` (the policy keeps every
    /// key), else `inner` with keys leaving the window hidden; other rows run `inner`.
    pub fn wrap(
        &self,
        inner: Box<dyn SequencePolicy>,
        shape: CacheShape,
        inner_keeps_all: bool,
    ) -> Box<dyn SequencePolicy> {
        let windowed = match inner_keeps_all {
            true => WindowedRows::Window(window_state(self.window, 0, shape)),
            false => WindowedRows::Hidden(vec![HiddenRow::default(); shape.n_rows()]),
        };
        Box::new(Windowed { layers: self.layers.clone(), window: self.window, shape, windowed, inner })
    }
}

/// How a sequence's windowed rows run.
enum WindowedRows {
    /// The model's window alone (the policy keeps every key).
    Window(Box<dyn SequencePolicy>),
    /// The policy, each row's plans capped at the window.
    Hidden(Vec<HiddenRow>),
}

/// A windowed row under a policy that evicts: the position each slot holds, as the policy's
/// plans left it. Every key is written visible until it leaves the window at the latest, and
/// the policy's later hides are capped at that, so no key is ever seen past the window.
#[derive(Clone, Default)]
struct HiddenRow {
    /// Per slot, the position it holds.
    positions: Vec<Pos>,
    /// Tokens the row has seen.
    seen: Pos,
}

impl HiddenRow {
    /// Caps `plan` (the policy's plan for positions `first..`) at the window of `window` tokens.
    fn cap(&mut self, first: Pos, window: Pos, plan: &mut EvictPlan) {
        self.seen = first + plan.writes.len() as Pos;
        for (slot, until) in plan.hide.iter_mut() {
            if let Some(&pos) = self.positions.get(*slot as usize) {
                *until = (*until).min(pos.saturating_add(window - 1));
            }
        }
        for (i, w) in plan.writes.iter_mut().enumerate() {
            let pos = first + i as Pos;
            w.last_visible = w.last_visible.min(pos.saturating_add(window - 1));
            let s = w.slot as usize;
            if s >= self.positions.len() {
                self.positions.resize(s + 1, 0);
            }
            self.positions[s] = pos;
        }
    }

    /// This step's attention weights with every key the window hides from the next query on
    /// marked as worth nothing (minus infinity): an attention-scored policy (H2O's accumulated
    /// mass) then drops those first instead of keeping keys no query can see again.
    fn weights(&self, weights: &[f32], window: Pos) -> Vec<f32> {
        let mut w = weights.to_vec();
        for (x, &pos) in w.iter_mut().zip(&self.positions) {
            if pos.saturating_add(window) <= self.seen {
                *x = f32::NEG_INFINITY;
            }
        }
        w
    }

    /// Follows the policy's compaction.
    fn compact(&mut self, plan: &CompactPlan) {
        for &(from, to) in &plan.moves {
            if let Some(&pos) = self.positions.get(from as usize) {
                if let Some(slot) = self.positions.get_mut(to as usize) {
                    *slot = pos;
                }
            }
        }
        self.positions.truncate(plan.len as usize);
    }
}

/// A sequence's state: the windowed rows' and the configured policy's.
struct Windowed {
    layers: Vec<bool>,
    window: u32,
    shape: CacheShape,
    windowed: WindowedRows,
    inner: Box<dyn SequencePolicy>,
}

impl Windowed {
    fn windowed(&self, row: RowRef) -> bool {
        self.layers.get(row.layer).copied().unwrap_or(false)
    }

    /// The policy that plans `row`: the window alone, or the configured one.
    fn policy(&mut self, row: RowRef) -> &mut dyn SequencePolicy {
        match (self.windowed(row), &mut self.windowed) {
            (true, WindowedRows::Window(w)) => w.as_mut(),
            _ => self.inner.as_mut(),
        }
    }

    /// The mirror of a windowed row whose policy evicts.
    fn hidden(&mut self, row: RowRef) -> Option<&mut HiddenRow> {
        let i = self.shape.index(row);
        match (self.windowed(row), &mut self.windowed) {
            (true, WindowedRows::Hidden(rows)) => rows.get_mut(i),
            _ => None,
        }
    }
}

impl SequencePolicy for Windowed {
    fn decide(&mut self, row: RowRef, first_pos: Pos, n_new: usize, scores: Option<&[f32]>) -> Result<(), PolicyError> {
        self.policy(row).decide(row, first_pos, n_new, scores)
    }

    fn evict(&mut self, row: RowRef, first_pos: Pos, n_new: usize, plan: &mut EvictPlan) -> Result<(), PolicyError> {
        self.policy(row).evict(row, first_pos, n_new, plan)?;
        let window = self.window;
        if let Some(h) = self.hidden(row) {
            h.cap(first_pos, window, plan);
        }
        Ok(())
    }

    fn compact(&mut self, row: RowRef, plan: &mut CompactPlan) -> Result<(), PolicyError> {
        self.policy(row).compact(row, plan)?;
        if let Some(h) = self.hidden(row) {
            h.compact(plan);
        }
        Ok(())
    }

    fn observe_attention(&mut self, row: RowRef, weights: &[f32]) -> Result<(), PolicyError> {
        let window = self.window;
        match self.hidden(row).map(|h| h.weights(weights, window)) {
            Some(w) => self.inner.observe_attention(row, &w),
            None => self.policy(row).observe_attention(row, weights),
        }
    }

    fn shadow_kept(&self, row: RowRef) -> Option<usize> {
        match (self.windowed(row), &self.windowed) {
            (true, WindowedRows::Window(_)) => None,
            _ => self.inner.shadow_kept(row),
        }
    }

    fn pending_evictions(&self, row: RowRef) -> usize {
        match (self.windowed(row), &self.windowed) {
            (true, WindowedRows::Window(_)) => 0,
            _ => self.inner.pending_evictions(row),
        }
    }

    fn fork(&self) -> Option<Box<dyn SequencePolicy>> {
        let windowed = match &self.windowed {
            WindowedRows::Window(w) => WindowedRows::Window(w.fork()?),
            WindowedRows::Hidden(rows) => WindowedRows::Hidden(rows.clone()),
        };
        let (layers, window, shape) = (self.layers.clone(), self.window, self.shape);
        Some(Box::new(Windowed { layers, window, shape, windowed, inner: self.inner.fork()? }))
    }
}
