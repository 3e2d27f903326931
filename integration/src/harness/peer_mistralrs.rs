//! mistral.rs (mistralrs-core 0.8.1) as the side-by-side peer: the same model, with its normal
//! KV cache (on the CPU, or on a GPU with the `mistralrs-cuda` feature) or its PagedAttention
//! (CUDA only), driven through its public API with no hub access.

use std::num::NonZeroUsize;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};

use super::peer::PeerRun;
use mistralrs_core::{
    DefaultSchedulerMethod, DeviceMapSetting, GGUFLoaderBuilder, GGUFSpecificConfig, Loader, MemoryGpuConfig,
    MistralRs, MistralRsBuilder, ModelDType, NormalLoaderBuilder, NormalRequest, NormalSpecificConfig,
    PagedAttentionConfig, PagedCacheType, Request, RequestMessage, Response, SamplingParams, SchedulerConfig,
    TokenSource,
};

/// How long a batch waits for each response before giving up on mistral.rs.
const RESPONSE_WAIT: std::time::Duration = std::time::Duration::from_secs(1800);

/// The KV cache mistral.rs runs with.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum PeerCache {
    /// Its normal cache: one contiguous cache per sequence, grown as it goes.
    Normal,
    /// Its PagedAttention (CUDA builds only) with a pool of this many MiB; its scheduler admits
    /// what the pool holds.
    Paged {
        /// KV pool size in MiB.
        kv_mib: usize,
    },
}

/// How a peer is started: sequences per step, cache, and whether its prefix cache may reuse
/// the KV of a prompt it has seen (off for timing distinct prompts that repeat across runs).
#[derive(Debug, Clone, Copy)]
pub struct PeerSetup {
    /// Sequences its scheduler runs per step at most.
    pub max_seqs: usize,
    /// Its KV cache.
    pub cache: PeerCache,
    /// Its prefix cache.
    pub prefix_cache: bool,
}

/// One batch of requests sent at once: what came back and the wall time it took.
#[derive(Debug, Clone, Copy)]
pub struct PeerBatch {
    /// Generated tokens, all requests.
    pub generated: usize,
    /// Wall seconds from the first request sent to the last response, prompt passes included.
    pub wall_s: f64,
}

impl PeerBatch {
    /// Generated tokens per wall second.
    pub fn tok_s(&self) -> f64 {
        self.generated as f64 / self.wall_s.max(1e-9)
    }
}

/// A loaded mistral.rs engine.
pub struct MistralRsPeer {
    rt: tokio::runtime::Runtime,
    mr: Arc<MistralRs>,
}

impl MistralRsPeer {
    /// Loads an HF-style folder (config.json, model.safetensors, tokenizer.json) in f32 on the CPU
    /// with the normal (non-paged) cache, no prefix cache, and `max_seqs` sequences per step.
    pub fn load_hf(dir: &Path, max_seqs: usize) -> Result<Self> {
        Self::load_hf_on(dir, max_seqs, &candle_core::Device::Cpu, ModelDType::F32)
    }

    /// [`Self::load_hf`] on any device and activation dtype (a CUDA device needs mistral.rs built
    /// with its `cuda` feature: our feature `mistralrs-cuda`).
    pub fn load_hf_on(dir: &Path, max_seqs: usize, device: &candle_core::Device, dtype: ModelDType) -> Result<Self> {
        let setup = PeerSetup { max_seqs, cache: PeerCache::Normal, prefix_cache: false };
        Self::load_hf_with(dir, setup, device, dtype)
    }

    /// [`Self::load_hf_on`] with any [`PeerSetup`]; PagedAttention needs a CUDA device and a
    /// CUDA build of mistral.rs (an error says so otherwise).
    pub fn load_hf_with(dir: &Path, setup: PeerSetup, device: &candle_core::Device, dtype: ModelDType) -> Result<Self> {
        std::env::set_var("HF_HUB_OFFLINE", "1");
        let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
        let loader = NormalLoaderBuilder::new(
            NormalSpecificConfig::default(),
            None,
            None,
            Some(dir.display().to_string()),
            false,
            None,
        )
        .build(None)
        .map_err(|e| anyhow::anyhow!("mistral.rs loader: {e}"))?;
        Self::start(rt, loader, dir, setup, device, dtype)
    }

    /// A GGUF file on the CPU through mistral.rs's own quantized path (its tokenizer from the
    /// file's metadata), otherwise as [`Self::load_hf`].
    pub fn load_gguf(file: &Path, max_seqs: usize) -> Result<Self> {
        std::env::set_var("HF_HUB_OFFLINE", "1");
        let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
        let (dir, name) = match (file.parent(), file.file_name()) {
            (Some(d), Some(n)) => (d, n.to_string_lossy().into_owned()),
            _ => bail!("{} is not a file path", file.display()),
        };
        let loader = GGUFLoaderBuilder::new(
            None,
            None,
            dir.display().to_string(),
            vec![name],
            GGUFSpecificConfig::default(),
            false,
            None,
        )
        .build();
        let setup = PeerSetup { max_seqs, cache: PeerCache::Normal, prefix_cache: false };
        Self::start(rt, loader, file, setup, &candle_core::Device::Cpu, ModelDType::F32)
    }

    /// Loads the pipeline and starts mistral.rs's engine on it.
    fn start(
        rt: tokio::runtime::Runtime,
        loader: Box<dyn Loader>,
        what: &Path,
        setup: PeerSetup,
        device: &candle_core::Device,
        dtype: ModelDType,
    ) -> Result<Self> {
        let paged = match setup.cache {
            PeerCache::Normal => None,
            PeerCache::Paged { kv_mib } => {
                if !mistralrs_core::paged_attn_supported() || !device.is_cuda() {
                    bail!(
                        "mistral.rs's PagedAttention runs on CUDA only: it needs a CUDA device and a build with \
                         --features dms-integration/mistralrs-cuda (device here: {device:?})"
                    );
                }
                // Its block size left to mistral.rs (32, the largest its kernels take).
                let c = PagedAttentionConfig::new(None, MemoryGpuConfig::MbAmount(kv_mib), PagedCacheType::Auto)
                    .map_err(|e| anyhow::anyhow!("mistral.rs PagedAttention config: {e}"))?;
                Some(c)
            }
        };
        let pipeline = loader
            .load_model_from_hf(None, TokenSource::None, &dtype, device, true, DeviceMapSetting::dummy(), None, paged)
            .map_err(|e| anyhow::anyhow!("mistral.rs could not load {}: {e}", what.display()))?;
        let n = NonZeroUsize::new(setup.max_seqs.max(1)).expect("positive");
        let mr = rt.block_on(async move {
            let scheduler = match setup.cache {
                PeerCache::Normal => SchedulerConfig::DefaultScheduler { method: DefaultSchedulerMethod::Fixed(n) },
                PeerCache::Paged { .. } => match pipeline.lock().await.get_metadata().cache_config.clone() {
                    Some(config) => SchedulerConfig::PagedAttentionMeta { max_num_seqs: n.get(), config },
                    None => bail!("mistral.rs did not enable PagedAttention for {}", what.display()),
                },
            };
            Ok(MistralRsBuilder::new(pipeline, scheduler, false, None)
                .with_no_prefix_cache(!setup.prefix_cache)
                .with_disable_eos_stop(true)
                .build()
                .await)
        })?;
        Ok(Self { rt, mr })
    }

    /// Every prompt sent at once, `max_tokens` each, its scheduler batching them as it does:
    /// the tokens generated (an error unless every request got all of them) and the wall time (the tokens are not returned: this version mixes
    /// concurrent outputs on the CPU, see [`Self::generate`]).
    pub fn run_batch(&self, prompts: &[Vec<u32>], max_tokens: usize) -> Result<PeerBatch> {
        let mr = self.mr.clone();
        let prompts = prompts.to_vec();
        self.rt.block_on(async move {
            let sender = mr.get_sender(None).map_err(|e| anyhow::anyhow!("mistral.rs: {e}"))?;
            let t0 = Instant::now();
            let mut receivers = Vec::new();
            for p in prompts {
                let (req, rx) = greedy_request(&mr, p, max_tokens, false);
                sender.send(req).await.context("mistral.rs engine stopped")?;
                receivers.push(rx);
            }
            let (mut generated, n) = (0usize, receivers.len());
            for mut rx in receivers {
                let response = tokio::time::timeout(RESPONSE_WAIT, rx.recv())
                    .await
                    .map_err(|_| anyhow::anyhow!("mistral.rs sent no response within {RESPONSE_WAIT:?}"))?;
                generated += completion(response)?.usage.completion_tokens;
            }
            if generated != n * max_tokens {
                bail!("mistral.rs generated {generated} tokens for {n} requests of {max_tokens}");
            }
            Ok(PeerBatch { generated, wall_s: t0.elapsed().as_secs_f64() })
        })
    }

    /// Greedy generation of `max_tokens` tokens for every prompt, one request at a time
    /// (mistralrs-core 0.8.1 mixes the outputs of requests in flight together on the CPU:
    /// measured with `examples/peer_probe.rs`).
    pub fn generate(&self, prompts: &[Vec<u32>], max_tokens: usize) -> Result<PeerRun> {
        let mr = self.mr.clone();
        let prompts = prompts.to_vec();
        self.rt.block_on(async move {
            let sender = mr.get_sender(None).map_err(|e| anyhow::anyhow!("mistral.rs: {e}"))?;
            let t0 = Instant::now();
            let (mut tokens, mut prompt_toks, mut prompt_secs, mut completion_toks) =
                (Vec::new(), 0usize, 0f64, 0usize);
            for p in prompts {
                let (req, mut rx) = greedy_request(&mr, p, max_tokens, true);
                sender.send(req).await.context("mistral.rs engine stopped")?;
                let r = completion(rx.recv().await)?;
                let lp = r.choices.first().and_then(|c| c.logprobs.as_ref()).and_then(|l| l.content.as_ref());
                let ids: Vec<u32> = lp
                    .map(|c| c.iter().filter_map(|x| x.top_logprobs.first().map(|t| t.token)).collect())
                    .unwrap_or_default();
                if ids.len() != max_tokens {
                    bail!("mistral.rs returned {} token ids, expected {max_tokens}", ids.len());
                }
                tokens.push(ids);
                prompt_toks += r.usage.prompt_tokens;
                prompt_secs += r.usage.total_prompt_time_sec as f64;
                completion_toks += r.usage.completion_tokens.saturating_sub(1);
            }
            let wall = t0.elapsed().as_secs_f64();
            Ok(PeerRun {
                tokens,
                prefill_tok_s: prompt_toks as f64 / prompt_secs.max(1e-9),
                decode_tok_s: completion_toks as f64 / (wall - prompt_secs.min(wall * 0.9)).max(1e-9),
            })
        })
    }
}

/// A greedy completion request for `prompt` (token ids) and the channel its response comes on;
/// with `logprobs`, the response carries each chosen token's id.
fn greedy_request(
    mr: &MistralRs,
    prompt: Vec<u32>,
    max_tokens: usize,
    logprobs: bool,
) -> (Request, tokio::sync::mpsc::Receiver<Response>) {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let mut sp = SamplingParams::deterministic();
    sp.max_len = Some(max_tokens);
    if logprobs {
        sp.top_n_logprobs = 1;
    }
    let mut req =
        NormalRequest::new_simple(RequestMessage::CompletionTokens(prompt), sp, tx, mr.next_request_id(), None, None);
    req.return_logprobs = logprobs;
    (Request::Normal(Box::new(req)), rx)
}

/// The finished completion in a response, or the error it reports.
fn completion(r: Option<Response>) -> Result<mistralrs_core::CompletionResponse> {
    match r {
        Some(Response::CompletionDone(r)) => Ok(r),
        Some(Response::CompletionModelError(e, _)) => bail!("mistral.rs model error: {e}"),
        Some(Response::InternalError(e)) | Some(Response::ValidationError(e)) => bail!("mistral.rs: {e}"),
        Some(_) => bail!("mistral.rs: unexpected response kind"),
        None => bail!("mistral.rs closed the response channel"),
    }
}
