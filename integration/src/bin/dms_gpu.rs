//! `dms-gpu`: correctness checks and the decode benchmark on a CUDA GPU (build with
//! `--features cuda`; run on the GPU machine with `shared/scripts/gpu-run.sh`).
//!
//! `dms-gpu check` compares the device cache and kernels with the CPU implementation and runs
//! the NVIDIA-reference DMS fixture through the GPU decode path. `dms-gpu bench` runs the grid
//! (model shape x context x arm x batch), prints a table last and writes JSON.

use anyhow::{bail, Result};
use candle_core::Device;
use clap::{Parser, Subcommand};
use dms_integration::gpu::AttnTuning;
#[cfg(feature = "mistralrs")]
use dms_integration::harness::gpu_bench::bench_peer;
use dms_integration::harness::gpu_bench::{
    bench, bench_graphs, bench_prefill, parse_kernel, parse_latent_kernel, profile, tune, Limit,
};
use dms_integration::harness::gpu_check::{check_device_batch, check_latent, check_per_head};

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Device cache and kernels vs the CPU implementation, and the DMS fixture on the GPU.
    Check {
        /// Fixture root.
        #[arg(long, default_value = "integration/tests/fixtures")]
        fixtures: String,
        /// Which checks: per-head K/V, latent rows (MLA), or both.
        #[arg(long, value_enum, default_value = "all")]
        part: CheckPart,
    },
    /// Decode benchmark grid.
    Bench {
        /// JSON output file.
        #[arg(long, default_value = "gpu-bench.json")]
        out: String,
        #[command(flatten)]
        limit: Limit,
        /// Comma-separated contexts.
        #[arg(long, default_value = "4096,16384,32768")]
        contexts: String,
        /// Comma-separated model shapes (llama3.1-8b, qwen3-8b, smollm2-135m, dsv2-lite-attn).
        #[arg(long, default_value = "llama3.1-8b,qwen3-8b,smollm2-135m")]
        models: String,
        #[command(flatten)]
        launch: LaunchArgs,
    },
    /// Decode kernels and grid sizes side by side at the memory limit.
    Tune {
        /// JSON output file.
        #[arg(long, default_value = "gpu-tune.json")]
        out: String,
        /// Comma-separated model shapes.
        #[arg(long, default_value = "llama3.1-8b")]
        models: String,
        /// Context.
        #[arg(long, default_value_t = 32768)]
        context: usize,
        #[command(flatten)]
        limit: Limit,
        /// Comma-separated grid targets (blocks; 0 = tail-aware: whole waves of the resident blocks).
        #[arg(long, default_value = "1056,2112,4224,8448,0")]
        blocks: String,
    },
    /// Where a decode step's time goes at the memory limit: the whole step, the attention kernels
    /// alone (their achieved read bandwidth over the live K/V), and the rest (projections, MLP,
    /// norms, RoPE, cache writes, launches) against the weights' floor.
    Profile {
        /// JSON output file.
        #[arg(long, default_value = "gpu-profile.json")]
        out: String,
        /// Comma-separated model shapes.
        #[arg(long, default_value = "llama3.1-8b")]
        models: String,
        /// Context.
        #[arg(long, default_value_t = 32768)]
        context: usize,
        #[command(flatten)]
        limit: Limit,
        #[command(flatten)]
        launch: LaunchArgs,
    },
    /// Ours vs mistral.rs (its CUDA build, normal cache) on the same random bf16 weights at
    /// batch 1: prefill and decode speed from a real prompt, full cache on both sides. Needs the
    /// `mistralrs-cuda` feature.
    Peer {
        /// JSON output file.
        #[arg(long, default_value = "gpu-peer.json")]
        out: String,
        /// Comma-separated Llama-architecture shapes (smollm2-135m, llama3.1-8b).
        #[arg(long, default_value = "smollm2-135m,llama3.1-8b")]
        models: String,
        /// Comma-separated prompt lengths.
        #[arg(long, default_value = "4096,16384")]
        contexts: String,
        /// Tokens generated per prompt (greedy).
        #[arg(long, default_value_t = 32)]
        gen: usize,
        /// Folder for the random HF checkpoints both engines load.
        #[arg(long, default_value = "/tmp/dms-peer-models")]
        models_dir: String,
    },
    /// Decode steps replayed from a CUDA graph vs launched kernel by kernel, on identical
    /// synthetic caches: step times, both against the floor, and the logits difference.
    Graphs {
        /// JSON output file.
        #[arg(long, default_value = "gpu-graphs.json")]
        out: String,
        /// Comma-separated model shapes.
        #[arg(long, default_value = "smollm2-135m,llama3.1-8b")]
        models: String,
        /// Tokens in each cache before the timed steps.
        #[arg(long, default_value_t = 4096)]
        context: usize,
        /// Comma-separated batch sizes.
        #[arg(long, default_value = "1,8")]
        batches: String,
        /// Timed decode steps of each kind.
        #[arg(long, default_value_t = 64)]
        steps: usize,
    },
    /// Real prompts end to end at batch 1: the masked one-pass prefill into the device cache,
    /// then decode steps from the cache it left (full vs DMS CR 8 at random decisions).
    Prefill {
        /// JSON output file.
        #[arg(long, default_value = "gpu-prefill.json")]
        out: String,
        /// Model shape (llama3.1-8b, qwen3-8b, smollm2-135m, dsv2-lite-attn).
        #[arg(long, default_value = "llama3.1-8b")]
        model: String,
        /// Comma-separated prompt lengths.
        #[arg(long, default_value = "4096,16384,32768")]
        contexts: String,
        /// Timed decode steps after each prompt.
        #[arg(long, default_value_t = 8)]
        steps: usize,
        /// Real weights (a GGUF file or HF directory) instead of random ones of `--model`'s shape;
        /// `--model` then only names the rows.
        #[arg(long)]
        weights: Option<std::path::PathBuf>,
    },
}

/// A part of `dms-gpu check` (each gates the timing steps that use its code).
#[derive(clap::ValueEnum, Clone, Copy, PartialEq, Eq)]
enum CheckPart {
    /// Both parts.
    All,
    /// Per-head K/V kernels and NVIDIA's DMS fixture.
    PerHead,
    /// Latent-row (MLA) kernels and the tiny DeepSeek-V3 fixture.
    Mla,
}

/// Decode-attention launch settings.
#[derive(clap::Args, Clone)]
struct LaunchArgs {
    /// First-pass decode kernel: tiled, warps or async.
    #[arg(long, default_value = "tiled")]
    kernel: String,
    /// First-pass kernel over latent (MLA) rows: groups (CUDA cores, up to 8 heads a block) or
    /// mma (tensor cores, 16 heads a block, bf16 rows).
    #[arg(long, default_value = "groups")]
    latent_kernel: String,
    /// Blocks the decode grid aims for (rows x splits; 0 = tail-aware: whole waves of the resident blocks).
    #[arg(long, default_value_t = 0)]
    target_blocks: usize,
}

impl LaunchArgs {
    fn tuning(&self) -> Result<AttnTuning> {
        Ok(AttnTuning {
            kernel: parse_kernel(&self.kernel)?,
            latent: parse_latent_kernel(&self.latent_kernel)?,
            target_blocks: self.target_blocks,
        })
    }
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let dev = Device::new_cuda(0)?;
    match cli.cmd {
        Cmd::Check { fixtures, part } => {
            if part != CheckPart::Mla {
                check_per_head(&dev, &fixtures)?;
                check_device_batch(&dev, &fixtures)?;
                println!("GPU CHECKS PASSED (per-head)");
            }
            if part != CheckPart::PerHead {
                check_latent(&dev, &fixtures)?;
                println!("GPU CHECKS PASSED (mla)");
            }
        }
        #[cfg(feature = "mistralrs")]
        Cmd::Peer { out, models, contexts, gen, models_dir } => {
            bench_peer(&dev, &out, &models, &contexts, gen, &models_dir)?
        }
        #[cfg(not(feature = "mistralrs"))]
        Cmd::Peer { .. } => bail!("this dms-gpu was built without mistral.rs: build with --features mistralrs-cuda"),
        Cmd::Prefill { out, model, contexts, steps, weights } => {
            bench_prefill(&dev, &out, &model, &contexts, steps, weights.as_deref())?
        }
        Cmd::Graphs { out, models, context, batches, steps } => {
            drop(dev);
            let dev = dms_integration::gpu::graph::graph_device(0)?;
            bench_graphs(&dev, &out, &models, context, &batches, steps)?
        }
        Cmd::Tune { out, models, context, limit, blocks } => tune(&dev, &out, &models, context, limit, &blocks)?,
        Cmd::Profile { out, models, context, limit, launch } => {
            profile(&dev, &out, &models, context, limit, launch.tuning()?)?
        }
        Cmd::Bench { out, limit, contexts, models, launch } => {
            bench(&dev, &out, limit, &contexts, &models, launch.tuning()?)?
        }
    }
    Ok(())
}
