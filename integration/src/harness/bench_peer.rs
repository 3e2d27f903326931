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

    /// The started peers of one model, one per mistral.rs arm.
    pub(in crate::harness) struct PeerArms {
        peers: Vec<(String, bool, MistralRsPeer)>,
    }

    impl PeerArms {
        /// Starts every mistral.rs arm of `cfg` on the folder `dir`: at most `max_seqs` sequences
        /// per step, PagedAttention pools of `kv_mib` MiB, its prefix cache on where the grid
        /// shares prompts (as this engine forks them); each is warmed up with one short request.
        pub fn start(cfg: &BenchConfig, dir: &Path, device: &Device, max_seqs: usize, kv_mib: usize) -> Result<Self> {
            let dtype = match cfg.model.compute_dtype()? {
                candle_core::DType::BF16 => mistralrs_core::ModelDType::BF16,
                candle_core::DType::F16 => mistralrs_core::ModelDType::F16,
                _ => mistralrs_core::ModelDType::F32,
            };
            let mut peers = Vec::new();
            for a in cfg.arms.iter().filter(|a| a.is_peer()) {
                let cache = if a.paged_attention { PeerCache::Paged { kv_mib } } else { PeerCache::Normal };
                let setup = PeerSetup { max_seqs, cache, prefix_cache: cfg.grid.shared_prompt_from.is_some() };
                let peer = MistralRsPeer::load_hf_with(dir, setup, device, dtype)
                    .map_err(|e| e.context(format!("[[arm]] `{}`", a.name)))?;
                peer.run_batch(&[vec![5u32; 16]], 2)?;
                peers.push((a.name.clone(), a.paged_attention, peer));
            }
            Ok(Self { peers })
        }

        /// Every arm given `prompts` at once, `max_tokens` each.
        pub fn run(&self, prompts: &[Vec<u32>], max_tokens: usize) -> Result<Vec<PeerCell>> {
            self.peers
                .iter()
                .map(|(name, paged, peer)| {
                    eprintln!("bench: mistral.rs arm {name}, {} requests", prompts.len());
                    let b = peer.run_batch(prompts, max_tokens)?;
                    Ok(PeerCell { name: name.clone(), paged: *paged, generated: b.generated, tok_s: b.tok_s() })
                })
                .collect()
        }
    }
}

#[cfg(not(feature = "mistralrs"))]
mod engine {
    use super::*;

    /// No peers start in a build without mistral.rs (whose bench files [`BenchConfig::load`]
    /// already rejects when they name a mistral.rs arm): a type with no values.
    pub(in crate::harness) enum PeerArms {}

    impl PeerArms {
        /// The error that names the build feature.
        pub fn start(_: &BenchConfig, _: &Path, _: &Device, _: usize, _: usize) -> Result<Self> {
            anyhow::bail!("{}", super::super::bench_grid::NO_MISTRALRS)
        }

        /// Never called: no value exists.
        pub fn run(&self, _: &[Vec<u32>], _: usize) -> Result<Vec<PeerCell>> {
            match *self {}
        }
    }
}

pub(super) use engine::PeerArms;
