//! Measurement harnesses over the engine: the A/B comparison ([`ab`], its peer arms in [`ab_peer`],
//! greedy agreement where the baseline is confident in [`agreement`]), quality vs compression
//! ([`eval`], with bootstrap intervals from [`stats`]), the batch x context grid ([`bench_grid`], its
//! mistral.rs arms in `bench_peer`), the
//! peers: llama.cpp ([`peer`]) and mistral.rs (`peer_mistralrs`, feature `mistralrs`), and with `cuda` the GPU checks (`gpu_check`) and
//! kernel benchmarks (`gpu_bench`) behind the `dms-gpu` CLI.

pub mod ab;
pub mod ab_peer;
pub mod agreement;
pub mod bench_grid;
mod bench_peer;
pub mod eval;
#[cfg(feature = "cuda")]
pub mod gpu_bench;
#[cfg(feature = "cuda")]
pub mod gpu_check;
pub mod peer;
#[cfg(feature = "mistralrs")]
pub mod peer_mistralrs;
pub mod stats;
