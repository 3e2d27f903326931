//! Per-row slot bookkeeping shared by the built-in policies.
//!
//! The ledger mirrors what the engine's store holds for one row (which absolute position sits in
//! which physical slot, and until which query it stays visible) so that a policy can plan slot
//! reuse and compaction without seeing any tensor.

use std::collections::VecDeque;

use crate::plan::{CompactPlan, EvictPlan, Pos, Slot, Write, VISIBLE_FOREVER};

/// Slot bookkeeping of one cache row.
#[derive(Debug, Clone)]
pub struct RowLedger {
    slot_pos: Vec<Pos>,
    slot_until: Vec<Pos>,
    reusable: Vec<Slot>,
    dead: Vec<Slot>,
    recent: VecDeque<Slot>,
    recent_first: Pos,
    recent_cap: usize,
    seen: Pos,
    chunk_first: Pos,
}

impl RowLedger {
    /// A ledger that can release any of the last `recent_cap` positions by position.
    pub fn new(recent_cap: usize) -> Self {
        Self {
            slot_pos: Vec::new(),
            slot_until: Vec::new(),
            reusable: Vec::new(),
            dead: Vec::new(),
            recent: VecDeque::new(),
            recent_first: 0,
            recent_cap,
            seen: 0,
            chunk_first: 0,
        }
    }

    /// Tokens seen so far (the next token's position).
    pub fn seen(&self) -> Pos {
        self.seen
    }

    /// Physical slots in use.
    pub fn len(&self) -> usize {
        self.slot_pos.len()
    }

    /// True when the row holds nothing.
    pub fn is_empty(&self) -> bool {
        self.slot_pos.is_empty()
    }

    /// Starts a step of `n_new` tokens at `first_pos`; returns an error message when the engine
    /// skips or repeats positions.
    pub fn begin_step(&mut self, first_pos: Pos, plan: &mut EvictPlan) -> Result<(), String> {
        if first_pos != self.seen {
            return Err(format!("step starts at position {first_pos} but the row has seen {} tokens", self.seen));
        }
        plan.clear();
        self.chunk_first = first_pos;
        Ok(())
    }

    /// Hides the key at `pos` from query `at` onwards. Its slot becomes reusable by this step's
    /// tokens when no query of the step can see it, otherwise it is left for compaction.
    pub fn release(&mut self, pos: Pos, at: Pos, plan: &mut EvictPlan) -> Result<(), String> {
        let slot =
            self.recent_slot(pos).ok_or_else(|| format!("position {pos} is not among the row's recent tokens"))?;
        if self.slot_until[slot as usize] != VISIBLE_FOREVER {
            return Err(format!("position {pos} released twice"));
        }
        let last_visible = at.checked_sub(1).ok_or_else(|| "cannot hide a key from query 0".to_string())?;
        self.slot_until[slot as usize] = last_visible;
        match pos.checked_sub(self.chunk_first) {
            Some(i) => plan.writes[i as usize].last_visible = last_visible,
            None => plan.hide.push((slot, last_visible)),
        }
        if at <= self.chunk_first {
            self.reusable.push(slot);
        } else {
            self.dead.push(slot);
        }
        Ok(())
    }

    /// Places the token at position `pos` (the next one) in a reusable slot or at the end.
    pub fn place(&mut self, pos: Pos, plan: &mut EvictPlan) {
        debug_assert_eq!(pos, self.seen);
        let slot = match self.reusable.pop() {
            Some(slot) => {
                self.slot_pos[slot as usize] = pos;
                self.slot_until[slot as usize] = VISIBLE_FOREVER;
                slot
            }
            None => {
                self.slot_pos.push(pos);
                self.slot_until.push(VISIBLE_FOREVER);
                (self.slot_pos.len() - 1) as Slot
            }
        };
        plan.writes.push(Write { slot, last_visible: VISIBLE_FOREVER });
        self.recent.push_back(slot);
        if self.recent.len() > self.recent_cap {
            self.recent.pop_front();
            self.recent_first += 1;
        }
        self.seen = pos + 1;
    }

    /// Plans moves that fill every dead slot from the tail and truncates the row.
    pub fn compact(&mut self, plan: &mut CompactPlan) {
        plan.clear();
        let mut holes: Vec<Slot> = self.dead.drain(..).chain(self.reusable.drain(..)).collect();
        holes.sort_unstable();
        let is_dead = |until: Pos, seen: Pos| until != VISIBLE_FOREVER && until + 1 < seen;
        let mut len = self.slot_pos.len();
        for hole in holes {
            while len > 0 && is_dead(self.slot_until[len - 1], self.seen) {
                len -= 1;
            }
            if hole as usize >= len {
                break;
            }
            let from = len - 1;
            self.slot_pos[hole as usize] = self.slot_pos[from];
            self.slot_until[hole as usize] = self.slot_until[from];
            let moved = self.slot_pos[from];
            if let Some(idx) = self.recent_index(moved) {
                self.recent[idx] = hole;
            }
            plan.moves.push((from as Slot, hole));
            len -= 1;
        }
        while len > 0 && is_dead(self.slot_until[len - 1], self.seen) {
            len -= 1;
        }
        self.slot_pos.truncate(len);
        self.slot_until.truncate(len);
        plan.len = len as u32;
    }

    /// Absolute positions of the keys visible to the next query, sorted.
    pub fn kept_positions(&self) -> Vec<Pos> {
        let mut v: Vec<Pos> = self
            .slot_pos
            .iter()
            .zip(&self.slot_until)
            .filter(|(_, &u)| u == VISIBLE_FOREVER || u >= self.seen)
            .map(|(&p, _)| p)
            .collect();
        v.sort_unstable();
        v
    }

    fn recent_index(&self, pos: Pos) -> Option<usize> {
        let idx = pos.checked_sub(self.recent_first)? as usize;
        (idx < self.recent.len()).then_some(idx)
    }

    fn recent_slot(&self, pos: Pos) -> Option<Slot> {
        self.recent_index(pos).map(|i| self.recent[i])
    }
}
