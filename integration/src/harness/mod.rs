//! Measurement harnesses over the engine: the A/B comparison ([`ab`]), quality vs compression
//! ([`eval`]), the batch x context grid ([`bench_grid`]) and the mistral.rs peer
//! (`peer_mistralrs`, feature `mistralrs`).

pub mod ab;
pub mod bench_grid;
pub mod eval;
#[cfg(feature = "mistralrs")]
pub mod peer_mistralrs;
