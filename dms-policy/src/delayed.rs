//! Delayed eviction as a reusable primitive (DMS spec rules 2-3).
//!
//! A token flagged for eviction stays visible for `window` more queries and then leaves the
//! cache; its slot is reused by the token arriving at that moment. Any scorer that produces one
//! flag per token can be wrapped with it: DMS's learned decisions, a key-norm threshold, ...

use std::collections::VecDeque;

use crate::ledger::RowLedger;
use crate::plan::{CompactPlan, EvictPlan, Pos};

/// One row's delayed-eviction state: the flags of the last `window + 1` tokens and the ledger.
#[derive(Debug, Clone)]
pub struct DelayedWindow {
    window: Pos,
    ledger: RowLedger,
    flags: VecDeque<bool>,
    flags_first: Pos,
    decided_through: Option<Pos>,
}

impl DelayedWindow {
    /// A row whose flagged keys stay visible to `window` more queries (W in the spec).
    pub fn new(window: Pos) -> Self {
        Self {
            window,
            ledger: RowLedger::new(window as usize + 1),
            flags: VecDeque::new(),
            flags_first: 0,
            decided_through: None,
        }
    }

    /// Tokens seen so far.
    pub fn seen(&self) -> Pos {
        self.ledger.seen()
    }

    /// Sets the flag of token `pos` (decided by token `pos + 1`: the shift by one is the caller's
    /// convention, see [`DelayedWindow::decide_shifted`]).
    pub fn set_flag(&mut self, pos: Pos, flag: bool) {
        if pos < self.flags_first {
            return;
        }
        while self.flags_first + (self.flags.len() as Pos) <= pos {
            self.flags.push_back(false);
        }
        self.flags[(pos - self.flags_first) as usize] = flag;
        self.decided_through = Some(self.decided_through.map_or(pos, |d| d.max(pos)));
    }

    /// Records decisions of tokens `first_pos..first_pos + decisions.len()`: the decision made at
    /// token t flags token t - 1 (spec rule 2); the decision at token 0 is unused.
    pub fn decide_shifted(&mut self, first_pos: Pos, decisions: impl IntoIterator<Item = bool>) {
        for (i, d) in decisions.into_iter().enumerate() {
            let t = first_pos + i as Pos;
            if t > 0 {
                self.set_flag(t - 1, d);
            }
        }
    }

    /// Plans `n_new` tokens from `first_pos`: the flagged token leaving the window releases its
    /// slot before the new token's attention (reused in place during decode).
    pub fn evict(&mut self, first_pos: Pos, n_new: usize, plan: &mut EvictPlan) -> Result<(), String> {
        self.ledger.begin_step(first_pos, plan)?;
        for t in first_pos..first_pos + n_new as Pos {
            if let Some(k) = t.checked_sub(self.window + 1) {
                if self.flag(k)? {
                    self.ledger.release(k, t, plan)?;
                }
            }
            self.ledger.place(t, plan);
        }
        let keep_from = self.ledger.seen().saturating_sub(self.window + 1);
        while self.flags_first < keep_from && !self.flags.is_empty() {
            self.flags.pop_front();
            self.flags_first += 1;
        }
        if self.flags.is_empty() {
            self.flags_first = self.flags_first.max(keep_from);
        }
        Ok(())
    }

    /// Compaction plan (non-empty only after multi-token steps that expired keys).
    pub fn compact(&mut self, plan: &mut CompactPlan) {
        self.ledger.compact(plan);
    }

    /// Tokens flagged and still inside their window.
    pub fn pending(&self) -> usize {
        let seen = self.ledger.seen();
        self.flags
            .iter()
            .enumerate()
            .filter(|&(i, &f)| f && self.flags_first + (i as Pos) + self.window + 1 > seen.saturating_sub(1))
            .count()
    }

    /// Sorted positions the row keeps.
    pub fn kept_positions(&self) -> Vec<Pos> {
        self.ledger.kept_positions()
    }

    fn flag(&self, k: Pos) -> Result<bool, String> {
        if self.decided_through.is_none_or(|d| d < k) {
            return Err(format!("token {k} leaves the window before its decision was made"));
        }
        Ok(k >= self.flags_first && self.flags.get((k - self.flags_first) as usize).copied().unwrap_or(false))
    }
}
