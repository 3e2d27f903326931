//! Where the server keeps its KV cache. On a CUDA model: the device cache, when every served
//! policy has a device program (else, with a note naming the policy, the host store, whose
//! attention runs on the CPU). On the CPU: the host store. Either way the pool has the memory
//! budget of `[cache]`.

use anyhow::{bail, Result};

use super::worker::ServedPolicy;
use crate::engine::Engine;

/// The KV cache the server runs on, and how long a sequence it holds.
pub struct Placement {
    /// Longest sequence (prompt + completion) a request may reach: one block per row short of
    /// the whole pool, so a preempted sequence of this length can always come back.
    pub max_sequence_tokens: usize,
    /// Bytes the KV pool holds.
    pub pool_bytes: u64,
    /// The device batch, when the cache lives on the GPU.
    #[cfg(feature = "cuda")]
    pub device: Option<crate::gpu::batch::DeviceBatchShape>,
}

impl Placement {
    /// Where `engine` serves `policies` with at most `max_batch` sequences at once.
    pub fn choose(engine: &Engine, policies: &[ServedPolicy], max_batch: usize) -> Result<Self> {
        let mc = engine.model.config();
        let rows = (mc.num_layers * mc.num_kv_heads).max(1);
        #[cfg(feature = "cuda")]
        if engine.model.device().is_cuda() {
            if let Some(p) = on_device(engine, policies, max_batch, rows)? {
                return Ok(p);
            }
        }
        #[cfg(not(feature = "cuda"))]
        let _ = (policies, max_batch);
        let store = &engine.store;
        let blocks = store.capacity_blocks();
        let pool_bytes = (blocks as u64).saturating_mul(store.block_size() as u64).saturating_mul(store.slot_bytes());
        // The host store grows block by block as sequences need it; a server that accepted
        // requests for a pool the machine cannot hold would be killed, and lose every one of them.
        if let Some(total) = crate::engine::physical_memory_bytes().filter(|&t| u128::from(pool_bytes) > t) {
            bail!(
                "the KV pool of [cache] would hold {:.1} GiB, more than this machine's {:.1} GiB of memory: lower \
                 [cache] memory_mb or max_tokens",
                pool_bytes as f64 / (1u64 << 30) as f64,
                total as f64 / (1u64 << 30) as f64
            );
        }
        Ok(Self {
            max_sequence_tokens: longest(blocks, rows, store.block_size())?,
            pool_bytes,
            #[cfg(feature = "cuda")]
            device: None,
        })
    }

    /// The context a sequence may reach: the model's, or on the device, which has no per-layer
    /// windows, the window when every layer has it (see [`crate::model::ModelConfig::device_context`]).
    pub fn context_length(&self, model: &crate::model::ModelConfig) -> usize {
        #[cfg(feature = "cuda")]
        if self.device.is_some() {
            return model.device_context().unwrap_or(model.max_position_embeddings);
        }
        model.max_position_embeddings
    }

    /// Where the cache lives, for the start-up line.
    pub fn describe(&self) -> &'static str {
        #[cfg(feature = "cuda")]
        if self.device.is_some() {
            return "device";
        }
        "host"
    }
}

/// The device placement, or `None` (with a note) when a served policy has no device program.
#[cfg(feature = "cuda")]
fn on_device(engine: &Engine, policies: &[ServedPolicy], max_batch: usize, rows: usize) -> Result<Option<Placement>> {
    use crate::gpu::batch::DeviceBatchShape;
    use crate::gpu::policy::DevicePolicy;

    let cfg = engine.model.config();
    if cfg.gemma.is_some() || cfg.arch.has_attention_sinks() || cfg.device_context().is_none() {
        let why = "the device engine has no per-layer windows, soft-capping or attention sinks (Gemma's local \
                   layers, GPT-OSS, windows on some layers)";
        if engine.model.dtype() != candle_core::DType::F32 {
            bail!("this model runs in the host store ({why}), which needs [model] dtype = \"f32\" on a CUDA device");
        }
        eprintln!(
            "dms serve: note: {why}: every sequence's KV cache stays in the host store, with attention on the CPU"
        );
        return Ok(None);
    }
    let mut max_window = 0;
    for p in policies {
        match DevicePolicy::of(p.factory.as_ref()) {
            Ok(program) => max_window = max_window.max(program.window),
            Err(why) => {
                if engine.model.dtype() != candle_core::DType::F32 {
                    bail!(
                        "cache policy `{}` runs in the host store ({why:#}), which needs [model] dtype = \"f32\" \
                         on a CUDA device",
                        p.name
                    );
                }
                eprintln!(
                    "dms serve: note: cache policy `{}` has no device program ({why:#}); every sequence's KV cache \
                     stays in the host store, with attention on the CPU",
                    p.name
                );
                return Ok(None);
            }
        }
    }
    let shape = DeviceBatchShape::with_host_budget(engine, max_batch.max(1), 0, max_window);
    let max_sequence_tokens = longest(shape.capacity_blocks, rows, shape.block_size)?;
    let slot = engine.model.config().row_bytes(engine.model.dtype().size_in_bytes());
    Ok(Some(Placement {
        max_sequence_tokens,
        pool_bytes: shape.capacity_blocks as u64 * shape.block_size as u64 * slot,
        device: Some(DeviceBatchShape { max_tokens_per_sequence: max_sequence_tokens, ..shape }),
    }))
}

/// Tokens of the longest sequence a pool of `blocks` blocks serves (see
/// [`Placement::max_sequence_tokens`]); an error when it cannot hold one sequence.
fn longest(blocks: usize, rows: usize, block_size: usize) -> Result<usize> {
    let tokens = (blocks / rows).saturating_sub(1).saturating_mul(block_size);
    if tokens == 0 {
        bail!(
            "the KV pool holds {blocks} blocks, too few for one sequence of {rows} rows: raise [cache] memory_mb or \
             max_tokens"
        );
    }
    Ok(tokens)
}
