//! The mistral.rs arms of `dms bench`: mistral.rs on the same weights as this engine's arms,
//! with its own KV cache (PagedAttention with the cell's KV budget, or its normal cache) and its
//! own batching, sent each cell's requests at once and timed end to end (cargo feature
//! `mistralrs`; PagedAttention needs `mistralrs-cuda` and a CUDA device).

use std::path::{Path, PathBuf};

use anyhow::Result;
use candle_core::Device;

use super::bench_grid::BenchConfig;

/// The HF folder both engines load for `source`: a `shape:NAME` source is written once with
/// random weights in `[model] dtype` (under the cache directory), an HF folder is itself, and a
/// GGUF file is exported to one.
pub(super) fn checkpoint(cfg: &BenchConfig, source: &str, device: &Device) -> Result<PathBuf> {
    match source.strip_prefix("shape:") {
        Some(name) => {
            let shape = crate::model::shapes::named_shape(name)?;
            let dtype = cfg.model.compute_dtype()?;
            let dir = crate::assets::cache_dir().join("bench-peer").join(format!("{name}-{dtype:?}"));
            crate::assets::export::write_random_hf(&shape, &dir, device, dtype)?;
            Ok(dir)
        }
        None => {
            let path = crate::assets::resolve_model(source, cfg.base_dir.as_deref())?;
            if path.is_dir() {
                Ok(path)
            } else {
                crate::assets::export::cached_hf_export(&path)
            }
        }
    }
}

/// Generated tokens and wall time of one peer arm in one cell.
pub(super) struct PeerCell {
    /// The arm's name.
    pub name: String,
    /// Whether it ran PagedAttention.
    pub paged: bool,
    /// Tokens generated, all requests.
    pub generated: usize,
    /// Generated tokens per wall second, prompt passes included.
    pub tok_s: f64,
}

#[cfg(feature = "mistralrs")]
mod engine {
    use super::*;
    use crate::harness::peer_mistralrs::{MistralRsPeer, PeerCache, PeerSetup};

    /// Runs every mistral.rs arm of `cfg` on the folder `dir`, one arm at a time: each is
    /// started (at most `max_seqs` sequences per step, a PagedAttention pool of `kv_mib` MiB),
    /// warmed up with one short request, given each cell's prompts at once (`max_tokens` each),
    /// and dropped before the next starts. Its prefix cache is on where the grid shares prompts,
    /// so it may reuse a shared prompt's KV where it can (mistral.rs 0.8.1 registers a prefix
    /// once a sequence has it cached, so requests admitted together may each prefill it).
    /// Returns, per cell, each arm's figures.
    pub(in crate::harness) fn run_arms(
        cfg: &BenchConfig,
        dir: &Path,
        device: &Device,
        max_seqs: usize,
        kv_mib: usize,
        cells: &[&[Vec<u32>]],
        max_tokens: usize,
    ) -> Result<Vec<Vec<PeerCell>>> {
        let dtype = match cfg.model.compute_dtype()? {
            candle_core::DType::BF16 => mistralrs_core::ModelDType::BF16,
            candle_core::DType::F16 => mistralrs_core::ModelDType::F16,
            _ => mistralrs_core::ModelDType::F32,
        };
        let mut out: Vec<Vec<PeerCell>> = cells.iter().map(|_| Vec::new()).collect();
        for (i, a) in cfg.arms.iter().filter(|a| a.is_peer()).enumerate() {
            if i > 0 {
                // Dropping mistral.rs only signals its engine thread, which frees the pool and
                // weights as it exits: give it that time before the next arm allocates.
                std::thread::sleep(std::time::Duration::from_secs(5));
            }
            let cache = if a.paged_attention { PeerCache::Paged { kv_mib } } else { PeerCache::Normal };
            let setup = PeerSetup { max_seqs, cache, prefix_cache: cfg.grid.shared_prompt_from.is_some() };
            let peer = MistralRsPeer::load_hf_with(dir, setup, device, dtype)
                .map_err(|e| e.context(format!("[[arm]] `{}`", a.name)))?;
            peer.run_batch(&[vec![5u32; 16]], 2)?;
            for (prompts, cell) in cells.iter().zip(&mut out) {
                eprintln!("bench: mistral.rs arm {}, {} requests", a.name, prompts.len());
                let b = peer.run_batch(prompts, max_tokens)?;
                cell.push(PeerCell {
                    name: a.name.clone(),
                    paged: a.paged_attention,
                    generated: b.generated,
                    tok_s: b.tok_s(),
                });
            }
        }
        Ok(out)
    }
}

#[cfg(not(feature = "mistralrs"))]
mod engine {
    use super::*;

    /// The error that names the build feature (in a build without mistral.rs, whose bench files
    /// [`BenchConfig::load`] already rejects when they name a mistral.rs arm).
    pub(in crate::harness) fn run_arms(
        _: &BenchConfig,
        _: &Path,
        _: &Device,
        _: usize,
        _: usize,
        _: &[&[Vec<u32>]],
        _: usize,
    ) -> Result<Vec<Vec<PeerCell>>> {
        anyhow::bail!("{}", super::super::bench_grid::NO_MISTRALRS)
    }
}

pub(super) use engine::run_arms;
