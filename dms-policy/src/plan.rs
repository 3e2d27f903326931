//! Plans a policy hands to the engine's cache store.

/// Absolute token position (counts every token the sequence has seen).
pub type Pos = u32;
/// Physical slot index inside one cache row.
pub type Slot = u32;
/// `visible_until` value of a key that no planned eviction hides.
pub const VISIBLE_FOREVER: Pos = Pos::MAX;
/// Largest window (DMS delay or sliding window) a policy accepts: 16M tokens, beyond any
/// model's context, and far from the overflow of `window + 1` positions.
pub const MAX_WINDOW: Pos = 1 << 24;

/// Where the new tokens of a step go and which stored keys stop being visible.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EvictPlan {
    /// `(slot, last_visible)` for keys stored before this step: the key stays visible to queries up
    /// to and including `last_visible` and is hidden from every later query. Applied first.
    pub hide: Vec<(Slot, Pos)>,
    /// One entry per new token, in token order. Applied after `hide`.
    pub writes: Vec<Write>,
}

impl EvictPlan {
    /// Empties the plan, keeping its buffers.
    pub fn clear(&mut self) {
        self.writes.clear();
        self.hide.clear();
    }
}

/// Placement of one new token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Write {
    /// Physical slot. Below the row's physical length it overwrites a key no query of this step
    /// can see; otherwise slots append in order.
    pub slot: Slot,
    /// Last query position that sees this token ([`VISIBLE_FOREVER`] unless hidden in this step).
    pub last_visible: Pos,
}

/// How a row is compacted after a step.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CompactPlan {
    /// Slots whose keys no future query may see, from now on (evicted after this step's
    /// attention, as attention-scored policies do). Applied first.
    pub drop: Vec<Slot>,
    /// `(from, to)`: copy the key, value and metadata of slot `from` into the dead slot `to`.
    /// Applied in order.
    pub moves: Vec<(Slot, Slot)>,
    /// Physical length of the row after the moves; slots at or beyond it are released.
    pub len: u32,
}

impl CompactPlan {
    /// Empties the plan, keeping its buffers.
    pub fn clear(&mut self) {
        self.drop.clear();
        self.moves.clear();
        self.len = 0;
    }
}
