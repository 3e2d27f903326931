//! CUDA graphs for decode steps: one step of the cache's running batch captured once and replayed,
//! so a small model's step costs one graph launch instead of a few hundred kernel launches.
//!
//! Capture records, it does not run; a replay re-runs the recorded kernels on the same addresses.
//! So everything a step reads from the host lives in fixed device buffers written before each
//! replay (the embedded tokens and RoPE rows, [`StepInputs`]); the cache's per-row metadata
//! (lengths, block tables, rings, programs) is already on the device and advanced by its kernels;
//! every intermediate is allocated and freed inside the graph by the stream-ordered allocator; the
//! logits land in a fixed output buffer. What a capture fixes: the batch, each sequence's adapter
//! and the attention split plan (rows up to `max_len` keys). A step that changes any of them needs
//! a new capture; [`CapturedStep::step`] refuses a longer row.

use anyhow::{bail, Context, Result};
use candle_core::cuda_backend::cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
use candle_core::cuda_backend::cudarc::driver::CudaGraph;
use candle_core::{DType, Device, Tensor};
use dms_policy::Pos;

use super::device_step::DeviceStep;
use super::GpuCache;
use crate::model::{Llama, StepInputs};

/// One captured decode step of a [`GpuCache`]'s running batch.
pub struct CapturedStep {
    graph: CudaGraph,
    inputs: StepInputs,
    logits: Tensor,
    max_len: usize,
    workspace_generation: u64,
}

impl CapturedStep {
    /// Captures one decode step of every sequence in `cache` (one adapter per sequence, in slot
    /// order), with attention split for rows up to `max_len` keys. Run one eager step with the
    /// same `max_len` first: it sizes the split buffers and loads the kernels, which a capture
    /// cannot do. Turns off cudarc's cross-stream event tracking on the model's device (a capture
    /// cannot wait on events recorded before it; the device path runs on one stream).
    pub fn capture(model: &Llama, cache: &mut GpuCache, adapters: &[Option<&str>], max_len: usize) -> Result<Self> {
        let Device::Cuda(dev) = model.device() else { bail!("a CUDA graph needs a model on a CUDA device") };
        let batch = adapters.len();
        if batch == 0 {
            bail!("a captured step needs at least one sequence");
        }
        let stream = dev.cuda_stream();
        // SAFETY: the device path issues all its work on this one stream, so no cross-stream
        // ordering is lost; tracking is off before any capture.
        unsafe { dev.disable_event_tracking() };
        // Placeholder inputs of the step's shape: a capture records their addresses, not values.
        let inputs = model.step_inputs(&vec![0; batch], &vec![0; batch])?;
        let logits = Tensor::zeros((batch, model.config().vocab_size), DType::F32, model.device())?;
        // The output copy's kernel loads now: loading a module inside a capture is not allowed.
        logits.slice_set(&logits.zeros_like()?, 0, 0)?;
        stream.synchronize().map_err(|e| anyhow::anyhow!("synchronizing before a capture: {e:?}"))?;
        let generation = cache.workspace_generation();
        stream
            .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .map_err(|e| anyhow::anyhow!("starting a CUDA graph capture: {e:?}"))?;
        let recorded = (|| -> Result<()> {
            let mut step = DeviceStep::new(cache, adapters, max_len);
            let x = model.forward_prepared(&inputs, &mut step)?;
            logits.slice_set(&model.logits(&x)?.to_dtype(DType::F32)?, 0, 0)?;
            Ok(())
        })();
        // The capture ends whatever happened inside it, so the stream is usable again.
        let graph = stream.end_capture(CUgraphInstantiate_flags::CUDA_GRAPH_INSTANTIATE_FLAG_AUTO_FREE_ON_LAUNCH);
        if cache.workspace_generation() != generation {
            cache.reset_workspace()?;
            bail!("the captured step grew the attention workspace: run one eager step with max_len {max_len} first");
        }
        recorded.context("recording a decode step into a CUDA graph")?;
        let graph = graph
            .map_err(|e| anyhow::anyhow!("ending the CUDA graph capture: {e:?}"))?
            .context("the CUDA graph capture recorded nothing")?;
        Ok(Self { graph, inputs, logits, max_len, workspace_generation: generation })
    }

    /// Whether this capture still fits `cache` (its attention workspace was not reallocated
    /// since); a stale capture must be dropped, never replayed.
    pub fn fits(&self, cache: &GpuCache) -> bool {
        self.workspace_generation == cache.workspace_generation()
    }

    /// One decode step: each sequence feeds `tokens[i]` at `positions[i]` (slot order);
    /// `longest` is the longest row after the step, at most the captured `max_len`. Returns the
    /// logits `[batch, vocab]` (f32) in the step's output buffer, which the next step overwrites.
    pub fn step(&mut self, model: &Llama, tokens: &[u32], positions: &[Pos], longest: usize) -> Result<Tensor> {
        if longest > self.max_len {
            bail!("a row of {longest} keys is longer than the captured step's {} (capture again)", self.max_len);
        }
        let fresh = model.step_inputs(tokens, positions)?;
        if fresh.x.dims() != self.inputs.x.dims() {
            bail!("{} sequences in a step captured for {}", tokens.len(), self.inputs.x.dim(0)?);
        }
        self.inputs.x.slice_set(&fresh.x, 0, 0)?;
        self.inputs.cos.slice_set(&fresh.cos, 0, 0)?;
        self.inputs.sin.slice_set(&fresh.sin, 0, 0)?;
        self.graph.launch().map_err(|e| anyhow::anyhow!("replaying the CUDA graph: {e:?}"))?;
        Ok(self.logits.clone())
    }
}
