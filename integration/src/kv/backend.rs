//! The storage seam: what the model's attention layers ask of a KV cache, wherever it lives.
//!
//! For each layer of a step the model computes queries, keys (after RoPE), values and the
//! decision signals the batch's policies need, and hands them to a [`KvBackend`], which stores
//! them under its policies, executes the evictions and compaction they plan, and attends over what
//! it keeps. Implementations: the host paged store ([`super::host_step::HostStep`]), the device
//! cache (`gpu::DeviceStep`, feature `cuda`) and the masked one-pass prompt
//! ([`crate::model::prefill::MaskedPrompt`]).

use anyhow::Result;
use candle_core::Tensor;

/// Which per-(token, KV head) signals a step needs the model to compute.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Signals {
    /// The learned DMS decision score.
    pub decision: bool,
    /// The L2 norm of each key.
    pub key_norms: bool,
}

/// The tokens of one sequence of a step and whose decision scores they need.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecisionSpan<'a> {
    /// The sequence's new tokens in this step.
    pub tokens: usize,
    /// Whether its policy reads learned decision scores at all.
    pub needed: bool,
    /// The adapter its policy names (`None`: the model's own decision weights).
    pub adapter: Option<&'a str>,
}

/// One layer's inputs for this step, rows of every sequence of the batch concatenated.
pub struct LayerStep<'a> {
    /// Queries `[n, heads, d]` (after RoPE).
    pub q: &'a Tensor,
    /// Keys `[n, rows, d]` after RoPE (latent rows: the latent plus its rotated part).
    pub k: &'a Tensor,
    /// Values `[n, rows, dv]` (`[n, 1, 0]` for latent rows, whose values are the key's first
    /// `rank` floats).
    pub v: &'a Tensor,
    /// Raw decision scores f32 `[n, rows]`, when asked for.
    pub decision: Option<&'a Tensor>,
    /// Key norms f32 `[n, rows]`, when asked for.
    pub key_norms: Option<&'a Tensor>,
    /// Softmax scale of the attention scores.
    pub scale: f64,
    /// Soft-capping of the scaled scores (Gemma 2), when the model has one.
    pub softcap: Option<f64>,
    /// The layer's sink logit per query head (GPT-OSS), when the model has them.
    pub sink_logits: Option<&'a [f32]>,
}

/// A KV cache the model's layers write to and attend over, one step at a time.
pub trait KvBackend {
    /// The signals this step's policies need.
    fn signals(&self) -> Signals;
    /// Per sequence of the step, in batch order, whose decision scores its tokens need (a model
    /// may hold several adapters, and each sequence reads its policy's).
    fn decision_spans(&self) -> Vec<DecisionSpan<'_>>;
    /// Stores layer `layer`'s K/V and signals of this step for every sequence, executes what the
    /// policies plan, and returns the attention output `[n, heads * width]`.
    fn attend(&mut self, layer: usize, step: LayerStep<'_>) -> Result<Tensor>;
    /// Ends the step after the last layer (the sequences' positions advance).
    fn finish(&mut self) -> Result<()>;
}
