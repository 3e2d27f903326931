//! The device (GPU) path. Always built: [`policy`] (what the device executes for a policy) and
//! [`split_plan`] (how a decode-attention grid splits rows), [`slot_map`] (which sequence sits in
//! which device slot). With the `cuda` feature: the
//! device-resident paged KV cache with its DMS bookkeeping and attention in CUDA kernels
//! (`cache`, re-exported here; `kernels.cu`, checked on the CPU through `emu/`), its
//! [`KvBackend`](crate::kv::backend::KvBackend) (`DeviceStep`: decode steps and prompts into it)
//! and continuous batching on it ([`batch`]; [`generate`] serves one prompt through it), and
//! decode steps captured as CUDA graphs ([`graph`]).

pub mod policy;
pub mod slot_map;
pub mod split_plan;

#[cfg(feature = "cuda")]
pub mod batch;
#[cfg(feature = "cuda")]
mod cache;
#[cfg(feature = "cuda")]
mod device_step;
#[cfg(feature = "cuda")]
pub mod generate;
#[cfg(feature = "cuda")]
pub mod graph;

#[cfg(feature = "cuda")]
pub use cache::*;
#[cfg(feature = "cuda")]
pub use device_step::{decode_step, prefill_into, DeviceStep};
