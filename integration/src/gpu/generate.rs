//! Generation with the KV cache on the device (`dms run` with `device = "cuda:N"`): one request
//! through the device batch ([`super::batch`]), so the prompt goes in as one masked pass and the
//! decode steps' DMS bookkeeping runs in the cache's kernels.

use std::sync::Arc;

use anyhow::{bail, Result};
use dms_policy::PolicyFactory;

use super::batch::{DeviceBatchShape, DeviceEngine};
use crate::engine::scheduler::{run_batch, Request};
use crate::engine::{GenParams, Generation};
use crate::gpu::policy::DevicePolicy;
use crate::model::Llama;

/// Generates from one prompt with the cache on the model's CUDA device: `block_size` slots per
/// block, at most `capacity_blocks` blocks (the engine config's memory budget), decode steps
/// replayed from CUDA graphs when `cuda_graphs`.
pub fn generate_on_device(
    model: &Llama,
    prompt: &[u32],
    params: &GenParams,
    policy: Arc<dyn PolicyFactory>,
    block_size: usize,
    capacity_blocks: usize,
    cuda_graphs: bool,
) -> Result<Generation> {
    if prompt.is_empty() {
        bail!("the prompt is empty");
    }
    let program = DevicePolicy::of(policy.as_ref())?;
    let total = prompt.len() + params.max_tokens;
    let cfg = model.config();
    let rows = cfg.num_layers * cfg.num_kv_heads;
    let shape = DeviceBatchShape {
        block_size,
        capacity_blocks: capacity_blocks.min(rows * (total.div_ceil(block_size) + 1)),
        max_batch: 1,
        max_tokens_per_sequence: total,
        max_window: program.window,
        cuda_graphs,
    };
    let req = Request { id: 0, prompt: prompt.to_vec(), forced: None, policy, params: None };
    let (mut done, stats) = run_batch(&mut DeviceEngine::new(model, shape)?, vec![req], params, 1, false, |_| {})?;
    let f = done.pop().expect("one request in, one out");
    Ok(Generation {
        prompt_tokens: prompt.len(),
        tokens: f.tokens,
        prefill_secs: stats.prefill_secs,
        decode_secs: stats.decode_secs,
        decode_steps: stats.decode_steps,
        peak_allocated: f.peak_allocated,
        usage: f.usage,
        compression_ratio: f.compression_ratio,
        layer_kept_fraction: f.layer_kept_fraction,
        step_logits: Vec::new(),
    })
}
