//! Engine-agnostic KV-cache policies.
//!
//! A policy answers three questions for every cache row (one sequence's keys for one KV head
//! in one layer) and never touches K/V tensors itself:
//! 1. [`SequencePolicy::decide`]: which of this step's tokens are marked for eviction;
//! 2. [`SequencePolicy::evict`]: where the new tokens go and which stored keys stop being visible;
//! 3. [`SequencePolicy::compact`]: which slots move and how many stay, so whole blocks return to the pool.
//!
//! The engine executes the returned plans on its storage. Policies are built by name from a TOML
//! table through a [`Registry`]; third parties can register their own.

pub mod delayed;
pub mod device;
pub mod error;
pub mod ledger;
pub mod model_windows;
pub mod plan;
pub mod policies;
pub mod registry;

pub use delayed::DelayedWindow;
pub use device::{DeviceProgram, FlagSource};
pub use error::PolicyError;
pub use ledger::RowLedger;
pub use model_windows::ModelWindows;
pub use plan::{CompactPlan, EvictPlan, Pos, Slot, Write, MAX_WINDOW, VISIBLE_FOREVER};
pub use registry::{PolicyBuilder, Registry};

/// The shape of the cache a sequence needs: one row per (layer, KV head).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheShape {
    /// Number of decoder layers.
    pub n_layers: usize,
    /// Rows per layer (KV heads for MHA/GQA, 1 for an MLA latent cache).
    pub rows_per_layer: usize,
}

impl CacheShape {
    /// Total number of rows of one sequence.
    pub fn n_rows(&self) -> usize {
        self.n_layers * self.rows_per_layer
    }
    /// Flat index of a row.
    pub fn index(&self, row: RowRef) -> usize {
        row.layer * self.rows_per_layer + row.head
    }
}

/// One cache row of a sequence: a (layer, KV head) pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RowRef {
    /// Decoder layer.
    pub layer: usize,
    /// KV head within the layer (0 for a latent row).
    pub head: usize,
}

/// What a policy needs the model to compute for each new token of each row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignalNeed {
    /// Nothing: the policy decides from positions alone.
    None,
    /// One raw eviction score per (token, row) from the model's DMS signal (decision neuron or
    /// adapter output).
    DecisionScores,
    /// The L2 norm of each (token, row) key.
    KeyNorms,
    /// After each step's attention, the attention weight of every stored slot of each row
    /// ([`SequencePolicy::observe_attention`]).
    AttentionWeights,
}

/// A policy's per-sequence state. One instance serves every row of one sequence.
pub trait SequencePolicy: Send {
    /// Records this step's signals for the `n_new` tokens of `row` starting at absolute position
    /// `first_pos`. `scores` holds one raw score per new token when the policy asked for them.
    fn decide(&mut self, row: RowRef, first_pos: Pos, n_new: usize, scores: Option<&[f32]>) -> Result<(), PolicyError>;

    /// Plans where this step's new tokens are written and which stored keys stop being visible
    /// during or because of this step. Clears and fills `plan`.
    fn evict(&mut self, row: RowRef, first_pos: Pos, n_new: usize, plan: &mut EvictPlan) -> Result<(), PolicyError>;

    /// After the step's attention: slot moves and the new physical length of `row`, so that keys no
    /// future query can see no longer occupy memory. Clears and fills `plan`.
    fn compact(&mut self, row: RowRef, plan: &mut CompactPlan) -> Result<(), PolicyError>;

    /// After `row`'s attention in this step, before [`SequencePolicy::compact`]: the weight of each
    /// physical slot (the softmax weights of the step's queries, averaged over the query heads of
    /// the row's KV group and summed over the step's queries). Only called for policies that ask
    /// for [`SignalNeed::AttentionWeights`].
    fn observe_attention(&mut self, _row: RowRef, _weights: &[f32]) -> Result<(), PolicyError> {
        Ok(())
    }

    /// For a shadow policy: the slots the shadowed policy would keep in `row` (telemetry).
    fn shadow_kept(&self, _row: RowRef) -> Option<usize> {
        None
    }

    /// Number of tokens currently flagged for eviction but still inside their window (telemetry).
    fn pending_evictions(&self, _row: RowRef) -> usize {
        0
    }

    /// An independent copy of this state, for a sequence forked from this one (same tokens
    /// so far, its own future); `None` when the policy cannot be copied (the engine then
    /// prefills the fork's prompt itself).
    fn fork(&self) -> Option<Box<dyn SequencePolicy>> {
        None
    }
}

/// A configured policy: builds per-sequence state and describes itself.
pub trait PolicyFactory: Send + Sync + std::fmt::Debug {
    /// Registry name of the policy.
    fn name(&self) -> &str;
    /// What the model must compute for this policy.
    fn signal_need(&self) -> SignalNeed {
        SignalNeed::None
    }
    /// An adapter file (NVIDIA DMS format) the engine must load to produce decision scores.
    fn adapter(&self) -> Option<&str> {
        None
    }
    /// Creates the state for one new sequence.
    fn new_sequence(&self, shape: CacheShape) -> Box<dyn SequencePolicy>;
    /// One line describing the effective parameters, for logs and summaries.
    fn describe(&self) -> String;
    /// What a device cache must execute for this policy, or why it cannot (the default: a
    /// policy that describes no device program runs on the host store only).
    fn device_program(&self) -> Result<DeviceProgram, PolicyError> {
        Err(PolicyError::NoDeviceForm { policy: self.name().into(), why: "it describes no device program".into() })
    }
    /// Whether the policy keeps every key (the full cache, a shadow run of another policy): a
    /// model's window then holds only its own keys ([`ModelWindows::wrap`]). By default, when
    /// its device program is [`DeviceProgram::KeepAll`].
    fn keeps_every_key(&self) -> bool {
        matches!(self.device_program(), Ok(DeviceProgram::KeepAll))
    }
}
