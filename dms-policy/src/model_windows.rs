//! A model's own attention windows (Mistral's `sliding_window`, Gemma 3's local layers) around
//! any policy.
//!
//! In a layer the model trained with a window, query q sees key k iff `q - k < window`: that is
//! the model's definition, not a choice. Under a policy that keeps every key (the full cache),
//! those rows run exactly that window, their memory returned as keys leave it. Under any other
//! policy they run the policy with every key also hidden once it leaves the window: a key is
//! visible iff both allow it, and the row holds only the keys both keep (the policy plans over
//! slots of its own, and a key's slot in the store is given back once it leaves the window).
//! Layers without a window run the policy alone.

use crate::policies::sliding_window::window_state;
use crate::{CacheShape, CompactPlan, EvictPlan, PolicyError, Pos, RowRef, SequencePolicy, Slot, MAX_WINDOW};

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
    /// key), else `inner` with keys leaving the window hidden and their slots given back; other
    /// rows run `inner`.
    pub fn wrap(
        &self,
        inner: Box<dyn SequencePolicy>,
        shape: CacheShape,
        inner_keeps_all: bool,
    ) -> Box<dyn SequencePolicy> {
        let windowed = match inner_keeps_all {
            true => WindowedRows::Window(window_state(self.window, 0, shape)),
            false => WindowedRows::Policy(vec![WindowedRow::default(); shape.n_rows()]),
        };
        Box::new(Windowed { layers: self.layers.clone(), window: self.window, shape, windowed, inner })
    }
}

/// How a sequence's windowed rows run.
enum WindowedRows {
    /// The model's window alone (the policy keeps every key).
    Window(Box<dyn SequencePolicy>),
    /// The policy, each row's plans translated to the keys the window still shows.
    Policy(Vec<WindowedRow>),
}

/// A windowed row under a policy that evicts. The policy plans over its own slots, as if the
/// row held every key it keeps; the store holds only those keys that some later query may still
/// see through the window. Every key is written visible until it leaves the window at the
/// latest, the policy's hides are capped at that, and a key's slot in the store is given back at
/// the first compaction after it leaves the window, whatever the policy keeps.
#[derive(Clone, Default)]
struct WindowedRow {
    /// Per policy slot: the store slot holding its key, while the store holds it.
    stored: Vec<Option<Slot>>,
    /// Per store slot: the policy slot it holds and that key's position.
    held: Vec<(Slot, Pos)>,
    /// Tokens the row has seen.
    seen: Pos,
}

impl WindowedRow {
    /// The policy's `plan` for positions `first..`, rewritten into store slots and capped at
    /// the window of `window` tokens. A policy slot the store no longer holds takes a new
    /// store slot (appended in order); one it holds is overwritten in place, as the policy
    /// overwrites it.
    fn evict(&mut self, first: Pos, window: Pos, plan: &mut EvictPlan) {
        self.seen = first + plan.writes.len() as Pos;
        plan.hide.retain_mut(|(slot, until)| match self.stored.get(*slot as usize).copied().flatten() {
            Some(s) => {
                *until = (*until).min(self.held[s as usize].1.saturating_add(window - 1));
                *slot = s;
                true
            }
            None => false,
        });
        for (i, w) in plan.writes.iter_mut().enumerate() {
            let pos = first + i as Pos;
            let v = w.slot as usize;
            if v >= self.stored.len() {
                self.stored.resize(v + 1, None);
            }
            let s = match self.stored[v] {
                Some(s) => s,
                None => {
                    self.held.push((0, 0));
                    (self.held.len() - 1) as Slot
                }
            };
            self.stored[v] = Some(s);
            self.held[s as usize] = (w.slot, pos);
            w.slot = s;
            w.last_visible = w.last_visible.min(pos.saturating_add(window - 1));
        }
    }

    /// This step's attention weights (per store slot) as the policy's slots see them: a key the
    /// store no longer holds, or that the window hides from the next query on, is worth nothing
    /// (minus infinity), so an attention-scored policy (H2O's accumulated mass) drops those first
    /// instead of keeping keys no query can see again.
    fn weights(&self, weights: &[f32], window: Pos) -> Result<Vec<f32>, PolicyError> {
        if weights.len() != self.held.len() {
            let message = format!("{} attention weights for {} stored keys", weights.len(), self.held.len());
            return Err(PolicyError::Protocol { policy: "model window".into(), message });
        }
        let worth = |s: Slot| {
            let (_, pos) = self.held[s as usize];
            let shown = pos.saturating_add(window) > self.seen;
            weights.get(s as usize).copied().filter(|_| shown).unwrap_or(f32::NEG_INFINITY)
        };
        Ok(self.stored.iter().map(|s| s.map_or(f32::NEG_INFINITY, worth)).collect())
    }

    /// Follows the policy's compaction `plan` over its slots, then rewrites it into the store's:
    /// the keys the policy released and those the window hides from every later query are
    /// dropped, and the store's last slots move into their places.
    fn compact(&mut self, window: Pos, plan: &mut CompactPlan) {
        let mut dead = vec![false; self.held.len()];
        let release = |stored: &mut Vec<Option<Slot>>, dead: &mut Vec<bool>, v: usize| {
            if let Some(s) = stored.get_mut(v).and_then(Option::take) {
                dead[s as usize] = true;
            }
        };
        for &v in &plan.drop {
            release(&mut self.stored, &mut dead, v as usize);
        }
        for &(from, to) in &plan.moves {
            release(&mut self.stored, &mut dead, to as usize);
            let moved = self.stored.get_mut(from as usize).and_then(Option::take);
            match (moved, self.stored.get_mut(to as usize)) {
                (Some(s), Some(slot)) => {
                    *slot = Some(s);
                    self.held[s as usize].0 = to;
                }
                // A move past the policy's slots (not a plan the built-in policies make): the
                // key is released rather than lost track of.
                (Some(s), None) => dead[s as usize] = true,
                (None, _) => {}
            }
        }
        for v in plan.len as usize..self.stored.len() {
            release(&mut self.stored, &mut dead, v);
        }
        self.stored.truncate(plan.len as usize);
        for (s, &(v, pos)) in self.held.iter().enumerate() {
            if !dead[s] && pos.saturating_add(window) <= self.seen {
                dead[s] = true;
                if let Some(slot) = self.stored.get_mut(v as usize) {
                    *slot = None;
                }
            }
        }
        plan.clear();
        let live = dead.iter().filter(|&&d| !d).count();
        plan.drop.extend((0..dead.len()).filter(|&s| dead[s]).map(|s| s as Slot));
        let holes = (0..live).filter(|&s| dead[s]);
        let tail = (live..dead.len()).filter(|&s| !dead[s]);
        for (to, from) in holes.zip(tail) {
            plan.moves.push((from as Slot, to as Slot));
            self.held[to] = self.held[from];
            if let Some(slot) = self.stored.get_mut(self.held[to].0 as usize) {
                *slot = Some(to as Slot);
            }
        }
        self.held.truncate(live);
        plan.len = live as u32;
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

    /// The translation of a windowed row whose policy evicts.
    fn translated(&mut self, row: RowRef) -> Option<&mut WindowedRow> {
        let i = self.shape.index(row);
        match (self.windowed(row), &mut self.windowed) {
            (true, WindowedRows::Policy(rows)) => rows.get_mut(i),
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
        if let Some(t) = self.translated(row) {
            t.evict(first_pos, window, plan);
        }
        Ok(())
    }

    fn compact(&mut self, row: RowRef, plan: &mut CompactPlan) -> Result<(), PolicyError> {
        self.policy(row).compact(row, plan)?;
        let window = self.window;
        if let Some(t) = self.translated(row) {
            t.compact(window, plan);
        }
        Ok(())
    }

    fn observe_attention(&mut self, row: RowRef, weights: &[f32]) -> Result<(), PolicyError> {
        let window = self.window;
        match self.translated(row).map(|t| t.weights(weights, window)) {
            Some(w) => self.inner.observe_attention(row, &w?),
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
            WindowedRows::Policy(rows) => WindowedRows::Policy(rows.clone()),
        };
        let (layers, window, shape) = (self.layers.clone(), self.window, self.shape);
        Some(Box::new(Windowed { layers, window, shape, windowed, inner: self.inner.fork()? }))
    }
}
