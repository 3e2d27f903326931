//! `dms-gpu`: correctness checks and the decode benchmark on a CUDA GPU (build with
//! `--features cuda`; run on the GPU machine with `shared/scripts/gpu-run.sh`).
//!
//! `dms-gpu check` compares the device cache and kernels with the CPU implementation and runs
//! the NVIDIA-reference DMS fixture through the GPU decode path. `dms-gpu bench` runs the grid
//! (model shape x context x arm x batch), prints a table last and writes JSON.

use std::time::Instant;

use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor};
use clap::{Parser, Subcommand};
use dms_integration::engine::load_model;
use dms_integration::gpu::{AttnKernel, AttnTuning, Decisions, GpuCache, GpuCacheShape, RowInit, StepDecisions};
use dms_integration::kv::attention::decode_row;
use dms_integration::kv::sequence::SequenceCache;
use dms_integration::kv::store::KvStore;
use dms_integration::model::prefill::prompt_flags;
use dms_integration::model::{Arch, Llama, ModelConfig};
use dms_policy::device::kept_after_prompt;
use dms_policy::policies::random_flag_unit;
use dms_policy::FlagSource;
use dms_policy::{CacheShape, Registry};
use serde_json::json;

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

/// The memory limit the timing commands fill.
#[derive(clap::Args, Clone, Copy)]
struct Limit {
    /// KV memory budget in GiB.
    #[arg(long, default_value_t = 64.0)]
    budget_gib: f64,
    /// Largest batch actually timed.
    #[arg(long, default_value_t = 512)]
    max_batch: usize,
    /// Timed decode steps per configuration.
    #[arg(long, default_value_t = 8)]
    steps: usize,
}

impl Limit {
    /// The budget in bytes.
    fn budget_bytes(&self) -> f64 {
        self.budget_gib * (1u64 << 30) as f64
    }
}

/// Decode-attention launch settings.
#[derive(clap::Args, Clone)]
struct LaunchArgs {
    /// First-pass decode kernel: tiled or warps.
    #[arg(long, default_value = "tiled")]
    kernel: String,
    /// Blocks the decode grid aims for (rows x splits; 0 = tail-aware: whole waves of the resident blocks).
    #[arg(long, default_value_t = 0)]
    target_blocks: usize,
}

impl LaunchArgs {
    fn tuning(&self) -> Result<AttnTuning> {
        Ok(AttnTuning { kernel: parse_kernel(&self.kernel)?, target_blocks: self.target_blocks })
    }
}

/// Prints a markdown table (a blank line, the header, the rule, one line per row).
fn print_table(header: &[&str], rows: &[Vec<String>]) {
    println!("\n| {} |", header.join(" | "));
    println!("|{}", "---|".repeat(header.len()));
    for r in rows {
        println!("| {} |", r.join(" | "));
    }
}

/// Field `k` of a JSON row as f64 (0 when absent).
fn num(r: &serde_json::Value, k: &str) -> f64 {
    r[k].as_f64().unwrap_or(0.0)
}

/// Field `k` of a JSON row as text.
fn text(r: &serde_json::Value, k: &str) -> String {
    match &r[k] {
        serde_json::Value::String(s) => s.clone(),
        v => v.to_string(),
    }
}

fn rng_vec(seed: u64, n: usize) -> Vec<f32> {
    let mut x = seed.wrapping_mul(0x9E3779B97F4A7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        })
        .collect()
}

fn round_bf16(v: &[f32]) -> Vec<f32> {
    v.iter().map(|&x| half::bf16::from_f32(x).to_f32()).collect()
}

/// Shape of one kernel check.
struct KernelCheck {
    layers: usize,
    kv: usize,
    g: usize,
    d: usize,
    bs: usize,
    w: usize,
    steps: usize,
    /// Prompt length per sequence (0 = decode from empty).
    prompts: Vec<usize>,
    /// `Some(rank)`: latent rows (MLA; `kv` = 1, `g` query heads, values = the first `rank`
    /// floats of each `d`-wide key row).
    latent: Option<usize>,
}

/// Device cache + kernels against the CPU store, policy and attention, random decisions. Each
/// sequence `b` first gets a prompt of `prompts[b]` tokens through the prefill kernels (checked
/// against [`kept_after_prompt`] and the stored K/V), then the decode steps; rows longer than
/// 128 keys (64 for latent rows) run the attention in several splits.
fn check_kernels(dev: &Device, dtype: DType, c: &KernelCheck, tuning: AttnTuning) -> Result<(f32, usize)> {
    let KernelCheck { layers, kv, g, d, bs, w, steps, prompts, latent } = c;
    let (layers, kv, g, d, bs, w, steps, latent) = (*layers, *kv, *g, *d, *bs, *w, *steps, *latent);
    // Host values per slot (0 for latent rows) and attention output width per head.
    let (v_dim, dv) = match latent {
        Some(r) => (0, r),
        None => (d, d),
    };
    let batch = prompts.len();
    let (seed, rate) = (3u64, 0.5f64);
    let longest = prompts.iter().max().copied().unwrap_or(0) + steps;
    let shape = GpuCacheShape {
        layers,
        batch,
        kv_heads: kv,
        head_dim: d,
        block_size: bs,
        window: w,
        max_blocks_per_row: longest.div_ceil(bs) + 1,
        num_blocks: layers * batch * kv * (longest.div_ceil(bs) + 1),
        latent_rank: latent,
    };
    let mut gpu = GpuCache::new(dev, dtype, shape)?;
    gpu.set_tuning(tuning);
    let factory = Registry::with_builtins().build(&toml::from_str(&format!(
        "name='dms'\nwindow={w}\ndecision='random'\nevict_rate={rate}\nseed={seed}"
    ))?)?;
    let mut store = KvStore::with_value_dim(d, v_dim, bs, layers * batch * kv * (longest.div_ceil(bs) + 1));
    let mut seqs: Vec<SequenceCache> = (0..batch)
        .map(|_| SequenceCache::new(factory.as_ref(), CacheShape { n_layers: layers, rows_per_layer: kv }, &mut store))
        .collect();
    let bf = dtype == DType::BF16;
    let round = |v: Vec<f32>| if bf { round_bf16(&v) } else { v };
    for layer in 0..layers {
        for (b, &t) in prompts.iter().enumerate().filter(|(_, &t)| t > 0) {
            let kn = round(rng_vec((1000 + layer * 10 + b) as u64 * 3 + 1, t * kv * d));
            let vn = round(rng_vec((1000 + layer * 10 + b) as u64 * 3 + 2, t * kv * v_dim));
            let kt = Tensor::from_vec(kn.clone(), (t, kv, d), dev)?.to_dtype(dtype)?;
            // Latent rows carry their values in the key row (the cache does not read `v`).
            let vt = if latent.is_some() {
                kt.clone()
            } else {
                Tensor::from_vec(vn.clone(), (t, kv, d), dev)?.to_dtype(dtype)?
            };
            let flags = prompt_flags(&FlagSource::Random { seed, rate }, layer, t, kv, None, dev)?;
            gpu.insert_prompt(layer, b, &kt, &vt, &flags)?;
            seqs[b].append(layer, &mut store, &kn, &vn, None)?;
            seqs[b].compact(layer, &mut store)?;
            let host = flags.flatten_all()?.to_vec1::<f32>()?;
            let want: Vec<Vec<dms_policy::Pos>> =
                (0..kv).map(|h| kept_after_prompt(t, w, |p| host[p * kv + h] != 0.0)).collect();
            let all = gpu.kept_positions()?;
            for (h, want) in want.iter().enumerate() {
                let r = layer * batch * kv + b * kv + h;
                if &all[r] != want {
                    bail!(
                        "prefill kept positions differ at layer {layer} seq {b} head {h}: gpu {:?} want {want:?}",
                        all[r]
                    );
                }
                let (ks, vs) = gpu.row_kv(r)?;
                for (i, &p) in want.iter().enumerate() {
                    let at = (p as usize * kv + h) * d;
                    let v_want = if latent.is_some() { &kn[at..at + dv] } else { &vn[at..at + d] };
                    if ks[i * d..(i + 1) * d] != kn[at..at + d] || vs[i * dv..(i + 1) * dv] != *v_want {
                        bail!("prefill stored the wrong K/V for position {p} at layer {layer} seq {b} head {h}");
                    }
                }
            }
        }
    }
    for (b, &t) in prompts.iter().enumerate() {
        seqs[b].advance(t);
    }
    let mut worst = 0f32;
    for step in 0..steps {
        for layer in 0..layers {
            let kn = rng_vec((step * 10 + layer) as u64 * 3 + 1, batch * kv * d);
            let vn = rng_vec((step * 10 + layer) as u64 * 3 + 2, batch * kv * v_dim);
            let qn = rng_vec((step * 10 + layer) as u64 * 3 + 3, batch * kv * g * d);
            let (kc, vc, qc) = if bf {
                (round_bf16(&kn), round_bf16(&vn), round_bf16(&qn))
            } else {
                (kn.clone(), vn.clone(), qn.clone())
            };
            let kt = Tensor::from_vec(kn, (batch, kv, d), dev)?.to_dtype(dtype)?;
            let vt = if latent.is_some() {
                kt.clone()
            } else {
                Tensor::from_vec(vn, (batch, kv, d), dev)?.to_dtype(dtype)?
            };
            let qt = Tensor::from_vec(qn, (batch, kv * g, d), dev)?.to_dtype(dtype)?;
            gpu.update(layer, &kt, &vt, &Decisions::Random { seed, rate })?;
            let hint = prompts.iter().max().copied().unwrap_or(0) + step + 1;
            let out = gpu.attend(layer, &qt, 0.125, hint)?.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
            for (b, seq) in seqs.iter_mut().enumerate() {
                let span = b * kv * d..(b + 1) * kv * d;
                let v_span = b * kv * v_dim..(b + 1) * kv * v_dim;
                seq.append(layer, &mut store, &kc[span], &vc[v_span], None)?;
                for (h, &row) in seq.layer_rows(layer).iter().enumerate() {
                    let qs = &qc[(b * kv + h) * g * d..(b * kv + h + 1) * g * d];
                    let mut o = vec![0f32; g * dv];
                    decode_row(&store, row, qs, (prompts[b] + step) as u32, 0.125, &mut o)?;
                    let got = &out[(b * kv + h) * g * dv..(b * kv + h + 1) * g * dv];
                    for (x, y) in o.iter().zip(got) {
                        worst = worst.max((x - y).abs());
                    }
                }
                seq.compact(layer, &mut store)?;
            }
        }
        for seq in seqs.iter_mut() {
            seq.advance(1);
        }
    }
    gpu.check()?;
    let kept = gpu.kept_positions()?;
    let mut compared = 0;
    for layer in 0..layers {
        for (b, seq) in seqs.iter().enumerate() {
            for (h, cpu) in seq.kept_positions(layer, &store).iter().enumerate() {
                let r = layer * batch * kv + b * kv + h;
                if &kept[r] != cpu {
                    bail!("kept positions differ at layer {layer} seq {b} head {h}: gpu {:?} cpu {:?}", kept[r], cpu);
                }
                compared += 1;
            }
        }
    }
    Ok((worst, compared))
}

/// The NVIDIA-reference DMS fixture on the GPU (f32): the prompt token by token through the
/// decode path, or in one pass through the masked prefill (`prefill`), then 24 decode steps.
/// Integer tensor `name` of a golden fixture.
fn golden_ints(g: &safetensors::SafeTensors, name: &str) -> Result<Vec<i64>> {
    let v = g.tensor(name)?;
    let d = v.data();
    Ok(match v.dtype() {
        safetensors::Dtype::I8 => d.iter().map(|&b| b as i8 as i64).collect(),
        safetensors::Dtype::I32 => {
            d.chunks_exact(4).map(|c| i32::from_le_bytes(c.try_into().unwrap()) as i64).collect()
        }
        safetensors::Dtype::I64 => d.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap())).collect(),
        other => bail!("{name}: unexpected dtype {other:?}"),
    })
}

/// f32 tensor `name` of a golden fixture as rows of `cols`.
fn golden_rows(g: &safetensors::SafeTensors, name: &str, cols: usize) -> Result<Vec<Vec<f32>>> {
    let d = g.tensor(name)?.data().to_vec();
    let v: Vec<f32> = d.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
    Ok(v.chunks(cols).map(|c| c.to_vec()).collect())
}

fn max_abs(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

/// The tiny DeepSeek-V3 (MLA) fixture on the GPU in f32, latent rows in the device cache:
/// full cache against transformers' logits (the prompt in one masked pass, then its 24 greedy
/// steps), and DMS on latent rows (random decisions at 0.7, W 8) against the host engine token by
/// token (logits and kept sets after the prompt and after every step). Returns the two errors
/// and the states compared.
fn check_mla(dev: &Device, root: &str) -> Result<(f32, f32, usize)> {
    let dir = std::path::Path::new(root).join("deepseek_mla_tiny");
    let model = load_model(&dir, dev, false)?.model;
    let bytes = std::fs::read(dir.join("golden.safetensors"))?;
    let g = safetensors::SafeTensors::deserialize(&bytes)?;
    let cfg = model.config().clone();
    let Some(mla) = cfg.mla.clone() else { bail!("deepseek_mla_tiny did not load as a latent-attention model") };
    let vocab = cfg.vocab_size;
    let prompt: Vec<u32> = golden_ints(&g, "prompt_ids")?.into_iter().map(|x| x as u32).collect();
    let greedy: Vec<u32> = golden_ints(&g, "greedy_ids")?.into_iter().map(|x| x as u32).collect();
    let want_prompt = golden_rows(&g, "prompt_logits", vocab)?;
    let want_steps = golden_rows(&g, "greedy_step_logits", vocab)?;
    let cache_for = |window: usize| {
        let shape = GpuCacheShape {
            layers: cfg.num_layers,
            batch: 1,
            kv_heads: 1,
            head_dim: cfg.head_dim,
            block_size: 4,
            window,
            max_blocks_per_row: 32,
            num_blocks: 256,
            latent_rank: Some(mla.kv_lora_rank),
        };
        GpuCache::new(dev, DType::F32, shape)
    };
    let decode = |cache: &mut GpuCache, tok: u32, pos: usize, d: &StepDecisions| -> Result<Vec<f32>> {
        Ok(model.forward_gpu_decode(&[tok], &[pos as u32], cache, d, pos + 1)?.squeeze(0)?.to_vec1::<f32>()?)
    };
    let mut cache = cache_for(0)?;
    let all = model.forward_gpu_prefill(&prompt, 0, &mut cache, &FlagSource::None, true)?.to_vec2::<f32>()?;
    let mut full_err = all.iter().zip(&want_prompt).map(|(a, b)| max_abs(a, b)).fold(0.0, f32::max);
    let mut logits = all.last().cloned().unwrap_or_default();
    for (i, &want) in greedy.iter().enumerate() {
        full_err = full_err.max(max_abs(&logits, &want_steps[i]));
        let got = dms_integration::engine::argmax(&logits);
        if got != want {
            bail!("MLA fixture on GPU: greedy step {i} picks {got}, transformers {want}");
        }
        if i + 1 < greedy.len() {
            logits = decode(&mut cache, got, prompt.len() + i, &StepDecisions::None)?;
        }
    }
    cache.check()?;
    let table: toml::Table =
        toml::from_str("name = 'dms'\nwindow = 8\ndecision = 'random'\nevict_rate = 0.7\nseed = 3")?;
    let policy = Registry::with_builtins().build(&table)?;
    let mut host =
        dms_integration::engine::Engine::new(load_model(&dir, &Device::Cpu, false)?.model, policy, 4, 1 << 12)?;
    let mut seq = host.new_sequence();
    let flags = FlagSource::Random { seed: 3, rate: 0.7 };
    let mut cache = cache_for(8)?;
    let got = model.forward_gpu_prefill(&prompt, 0, &mut cache, &flags, true)?.to_vec2::<f32>()?;
    let want = host.step(&mut seq, &prompt, true)?.to_vec2::<f32>()?;
    let mut dms_err = got.iter().zip(&want).map(|(a, b)| max_abs(a, b)).fold(0.0, f32::max);
    let same_kept = |cache: &GpuCache, host_kept: Vec<Vec<Vec<u32>>>, when: &str| -> Result<()> {
        let gpu = cache.kept_positions()?;
        for (l, rows) in host_kept.iter().enumerate() {
            if rows.len() != 1 || gpu[l] != rows[0] {
                bail!("MLA fixture with DMS: layer {l} keeps different positions on the GPU {when}");
            }
        }
        Ok(())
    };
    let host_kept = |seq: &dms_integration::kv::sequence::SequenceCache, store: &KvStore| -> Vec<Vec<Vec<u32>>> {
        (0..cfg.num_layers).map(|l| seq.kept_positions(l, store)).collect()
    };
    same_kept(&cache, host_kept(&seq, &host.store), "after the prompt")?;
    let mut states = 1;
    for (i, &tok) in greedy.iter().enumerate() {
        let pos = prompt.len() + i;
        let g = decode(&mut cache, tok, pos, &flags)?;
        let h = host.step(&mut seq, &[tok], false)?.squeeze(0)?.to_vec1::<f32>()?;
        dms_err = dms_err.max(max_abs(&g, &h));
        same_kept(&cache, host_kept(&seq, &host.store), &format!("after step {i}"))?;
        states += 1;
    }
    cache.check()?;
    Ok((full_err, dms_err, states))
}

fn check_fixture(dev: &Device, root: &str, variant: &str, prefill: bool, tuning: AttnTuning) -> Result<(f32, usize)> {
    let dir = std::path::Path::new(root).join("qwen3_dms_tiny").join(variant);
    let model = load_model(&dir.join("model"), dev, false)?.model;
    let bytes = std::fs::read(dir.join("golden.safetensors"))?;
    let g = safetensors::SafeTensors::deserialize(&bytes)?;
    let ints = |name: &str| golden_ints(&g, name);
    let floats = |name: &str, cols: usize| golden_rows(&g, name, cols);
    let prompt: Vec<u32> = ints("prompt_ids")?.into_iter().map(|x| x as u32).collect();
    let generated: Vec<u32> = ints("generated_ids")?.into_iter().map(|x| x as u32).collect();
    let vocab = model.config().vocab_size;
    let prefill_logits = floats("prefill_logits", vocab)?;
    let decode = floats("decode_step_logits", vocab)?;
    let presence = ints("cache_presence")?;
    let cfg = model.config().clone();
    let w = cfg.dms.dms_window_size.unwrap_or(8) as usize;
    let shape = GpuCacheShape {
        layers: cfg.num_layers,
        batch: 1,
        kv_heads: cfg.num_kv_heads,
        head_dim: cfg.head_dim,
        block_size: 4,
        window: w,
        max_blocks_per_row: 64,
        num_blocks: 1024,
        latent_rank: None,
    };
    let mut cache = GpuCache::new(dev, DType::F32, shape)?;
    cache.set_tuning(tuning);
    let dec = StepDecisions::Learned {
        scale: cfg.dms.dms_alpha_scale.unwrap_or(100.0),
        offset: cfg.dms.dms_initial_alpha_offset.unwrap_or(5.0),
    };
    let mut tokens = prompt.clone();
    tokens.extend_from_slice(&generated[..24]);
    let mut worst = 0f32;
    let mut states = 0;
    let mut compare = |got: &[f32], want: &[f32]| {
        for (x, y) in got.iter().zip(want) {
            worst = worst.max((x - y).abs());
        }
    };
    let first = if prefill {
        let all = model.forward_gpu_prefill(&prompt, 0, &mut cache, &dec, true)?;
        for (t, row) in all.to_vec2::<f32>()?.iter().enumerate() {
            compare(row, &prefill_logits[t]);
        }
        prompt.len() - 1
    } else {
        0
    };
    for (t, &tok) in tokens.iter().enumerate() {
        if prefill && t < first {
            continue;
        }
        if !(prefill && t == first) {
            let logits =
                model.forward_gpu_decode(&[tok], &[t as u32], &mut cache, &dec, t + 1)?.squeeze(0)?.to_vec1::<f32>()?;
            compare(&logits, if t < 48 { &prefill_logits[t] } else { &decode[t - 48] });
        }
        if t >= 47 {
            let state = t - 47;
            let kept = cache.kept_positions()?;
            for l in 0..cfg.num_layers {
                for h in 0..cfg.num_kv_heads {
                    let at = ((state * cfg.num_layers + l) * cfg.num_kv_heads + h) * 72;
                    let want: Vec<u32> = (0..72u32).filter(|&i| presence[at + i as usize] == 1).collect();
                    if kept[l * cfg.num_kv_heads + h] != want {
                        bail!("{variant}: kept positions differ after state {state}, layer {l} head {h}");
                    }
                }
            }
            states += 1;
        }
    }
    cache.check()?;
    Ok((worst, states))
}

/// A model shape by name; `dsv2-lite-attn` is DeepSeek-V2-Lite's latent attention (27 layers,
/// 16 heads, kv_lora 512 + rope 64) with its dense MLP in every layer.
fn model_shape(name: &str) -> Result<ModelConfig> {
    let base = |arch, vocab, hidden, inter, layers, heads, kv, hd, theta: f64, qk| ModelConfig {
        arch,
        vocab_size: vocab,
        hidden_size: hidden,
        intermediate_size: inter,
        num_layers: layers,
        num_heads: heads,
        num_kv_heads: kv,
        head_dim: hd,
        rope_theta: theta,
        rope_scaling: None,
        rms_norm_eps: 1e-5,
        tie_word_embeddings: false,
        attention_bias: false,
        qk_norm: qk,
        max_position_embeddings: 131072,
        bos_token_id: None,
        eos_token_ids: vec![],
        dms: Default::default(),
        mla: None,
    };
    Ok(match name {
        "llama3.1-8b" => base(Arch::Llama, 128256, 4096, 14336, 32, 32, 8, 128, 500000.0, false),
        "qwen3-8b" => base(Arch::Qwen3, 151936, 4096, 12288, 36, 32, 8, 128, 1000000.0, true),
        "smollm2-135m" => base(Arch::Llama, 49152, 576, 1536, 30, 9, 3, 64, 100000.0, false),
        "dsv2-lite-attn" => {
            ModelConfig::from_hf_json(include_str!("../../../configs/models/deepseek-v2-lite/config.json"))?
                .with_dense_mlp()
        }
        other => bail!("unknown model shape {other} (llama3.1-8b, qwen3-8b, smollm2-135m, dsv2-lite-attn)"),
    })
}

/// Device copy bandwidth (read + write bytes per second) over a 4 GiB buffer.
fn copy_bandwidth(dev: &Device) -> Result<f64> {
    let n = 1usize << 30;
    let a = Tensor::ones(n, DType::F32, dev)?;
    let _ = a.copy()?;
    let cd = match dev {
        Device::Cuda(c) => c.clone(),
        _ => bail!("cuda"),
    };
    cd.cuda_stream().synchronize().map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let t = Instant::now();
    let reps = 10;
    for _ in 0..reps {
        let _b = a.copy()?;
    }
    cd.cuda_stream().synchronize().map_err(|e| anyhow::anyhow!("{e:?}"))?;
    Ok((2 * n * 4 * reps) as f64 / t.elapsed().as_secs_f64())
}

/// Flag rate that leaves `ctx / cr` tokens per row after a prompt of `ctx` tokens with window
/// `w` (the last `w + 1` are always kept), and the tokens kept.
fn rate_for_cr(cr: f64, ctx: usize, w: usize) -> (f64, usize) {
    if cr <= 1.0 || ctx <= w + 1 {
        return (0.0, ctx);
    }
    let p = ((1.0 - 1.0 / cr) / (1.0 - (w + 1) as f64 / ctx as f64)).clamp(0.0, 1.0);
    (p, ((1.0 - p) * (ctx - w - 1) as f64).round() as usize + w + 1)
}

/// A batch-1 bf16 device cache (blocks of 64) with room for `tokens` tokens per row.
fn batch1_cache(dev: &Device, cfg: &ModelConfig, tokens: usize, window: usize) -> Result<GpuCache> {
    let bs = 64usize;
    let max_blocks = tokens.div_ceil(bs);
    let shape = GpuCacheShape {
        layers: cfg.num_layers,
        batch: 1,
        kv_heads: cfg.num_kv_heads,
        head_dim: cfg.head_dim,
        block_size: bs,
        window,
        max_blocks_per_row: max_blocks,
        num_blocks: cfg.num_layers * cfg.num_kv_heads * max_blocks,
        latent_rank: cfg.mla.as_ref().map(|m| m.kv_lora_rank),
    };
    GpuCache::new(dev, DType::BF16, shape)
}

/// A throwaway 256-token prompt and two decode steps (module loading, cuBLAS setup and the memory
/// pool's growth happen here, outside the timed runs).
fn warm_up(dev: &Device, model: &Llama) -> Result<()> {
    let mut cache = batch1_cache(dev, model.config(), 512, 512)?;
    let prompt: Vec<u32> = (0..256u32).map(|i| i % 100 + 5).collect();
    model.forward_gpu_prefill(&prompt, 0, &mut cache, &FlagSource::Random { seed: 1, rate: 0.5 }, false)?;
    for i in 0..2u32 {
        model.forward_gpu_decode(&[7], &[256 + i], &mut cache, &StepDecisions::Random { seed: 1, rate: 0.5 }, 258)?;
    }
    cache.synchronize()
}

/// Ours vs mistral.rs on the same random bf16 weights at batch 1 (full cache on both sides).
#[cfg(feature = "mistralrs")]
fn bench_peer(dev: &Device, out: &str, models: &str, contexts: &str, gen: usize, models_dir: &str) -> Result<()> {
    use dms_integration::harness::peer_mistralrs::MistralRsPeer;
    let sync = |d: &Device| d.synchronize().map_err(|e| anyhow::anyhow!("{e}"));
    let mut rows = Vec::new();
    for mname in models.split(',') {
        let cfg = model_shape(mname)?;
        let dir = std::path::Path::new(models_dir).join(mname);
        let t0 = Instant::now();
        dms_integration::assets::export::write_random_hf(&cfg, &dir, dev, DType::BF16)?;
        eprintln!("{mname}: random checkpoint in {} ({:.1} s)", dir.display(), t0.elapsed().as_secs_f64());
        let ours = load_model(&dir, dev, false)?.model.to_dtype(DType::BF16)?;
        let peer = MistralRsPeer::load_hf_on(&dir, 1, dev, mistralrs_core::ModelDType::BF16)?;
        warm_up(dev, &ours)?;
        peer.generate(&[vec![5u32; 64]], 4)?;
        for ctx in contexts.split(',').map(|c| c.trim().parse::<usize>()) {
            let ctx = ctx?;
            let prompt: Vec<u32> = (0..ctx).map(|i| (i * 7919 % (cfg.vocab_size - 10)) as u32 + 5).collect();
            let mut cache = batch1_cache(dev, &cfg, ctx + gen + 4, 512)?;
            sync(dev)?;
            let t1 = Instant::now();
            let logits = ours.forward_gpu_prefill(&prompt, 0, &mut cache, &FlagSource::None, false)?;
            let mut tok = dms_integration::engine::argmax(&logits.squeeze(0)?.to_vec1::<f32>()?);
            let prefill_s = t1.elapsed().as_secs_f64();
            let mut ours_tokens = vec![tok];
            let t2 = Instant::now();
            for i in 0..gen.saturating_sub(1) {
                let pos = (ctx + i) as u32;
                let l = ours.forward_gpu_decode(&[tok], &[pos], &mut cache, &StepDecisions::None, ctx + i + 1)?;
                tok = dms_integration::engine::argmax(&l.squeeze(0)?.to_vec1::<f32>()?);
                ours_tokens.push(tok);
            }
            let decode_s = t2.elapsed().as_secs_f64();
            cache.check()?;
            let ours_decode = gen.saturating_sub(1) as f64 / decode_s.max(1e-9);
            let p = peer.generate(std::slice::from_ref(&prompt), gen)?;
            let agree = ours_tokens.iter().zip(&p.tokens[0]).take_while(|(a, b)| a == b).count();
            let r = json!({"model": mname, "context": ctx, "gen": gen,
                "ours_prefill_tok_s": ctx as f64 / prefill_s, "mistralrs_prefill_tok_s": p.prefill_tok_s,
                "ours_decode_tok_s": ours_decode, "mistralrs_decode_tok_s": p.decode_tok_s,
                "decode_ours_over_mistralrs": ours_decode / p.decode_tok_s.max(1e-9),
                "prefill_ours_over_mistralrs": ctx as f64 / prefill_s / p.prefill_tok_s.max(1e-9),
                "greedy_prefix_agreement": agree});
            eprintln!("{r}");
            rows.push(r);
            // Written after every row: a run cut short by its time cap keeps what it measured.
            std::fs::write(out, serde_json::to_string_pretty(&json!({"rows": rows}))?)?;
        }
    }
    let table: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                text(r, "model"),
                text(r, "context"),
                format!("{:.0}", num(r, "ours_prefill_tok_s")),
                format!("{:.0}", num(r, "mistralrs_prefill_tok_s")),
                format!("{:.1}", num(r, "ours_decode_tok_s")),
                format!("{:.1}", num(r, "mistralrs_decode_tok_s")),
                format!("{:.2}", num(r, "decode_ours_over_mistralrs")),
                format!("{}/{}", text(r, "greedy_prefix_agreement"), text(r, "gen")),
            ]
        })
        .collect();
    print_table(
        &[
            "model",
            "prompt",
            "ours prefill tok/s",
            "mistral.rs prefill tok/s",
            "ours decode tok/s",
            "mistral.rs decode tok/s",
            "decode ours/mistral.rs",
            "greedy prefix equal",
        ],
        &table,
    );
    Ok(())
}

/// Real prompts at batch 1: masked prefill time, then decode from the cache it left.
fn bench_prefill(
    dev: &Device,
    out: &str,
    mname: &str,
    contexts: &str,
    steps: usize,
    weights: Option<&std::path::Path>,
) -> Result<()> {
    let model = match weights {
        Some(path) => load_model(path, dev, false)?.model.to_dtype(DType::BF16)?,
        None => Llama::random(model_shape(mname)?, dev, DType::BF16)?,
    };
    let cfg = model.config().clone();
    warm_up(dev, &model)?;
    let (w, bs) = (512usize, 64usize);
    let cd = match dev {
        Device::Cuda(c) => c.clone(),
        _ => bail!("cuda"),
    };
    let sync = || cd.cuda_stream().synchronize().map_err(|e| anyhow::anyhow!("{e:?}"));
    let mut rows = Vec::new();
    for ctx in contexts.split(',').map(|c| c.trim().parse::<usize>()) {
        let ctx = ctx?;
        let prompt: Vec<u32> = (0..ctx).map(|i| (i * 7919 % (cfg.vocab_size - 10)) as u32 + 5).collect();
        let mut full = (0f64, 0f64);
        for arm in [Arm { name: "full", cr: 1.0 }, Arm { name: "dms_cr8", cr: 8.0 }] {
            let (rate, _) = rate_for_cr(arm.cr, ctx, w);
            let mut cache = batch1_cache(dev, &cfg, ctx + steps + 4, w)?;
            let flags = if rate > 0.0 { FlagSource::Random { seed: 7, rate } } else { FlagSource::None };
            let dec = flags;
            sync()?;
            let t0 = Instant::now();
            let logits = model.forward_gpu_prefill(&prompt, 0, &mut cache, &flags, false)?;
            sync()?;
            let prefill_s = t0.elapsed().as_secs_f64();
            let mut tok = dms_integration::engine::argmax(&logits.squeeze(0)?.to_vec1::<f32>()?);
            cache.check()?;
            let kept = cache.row_lengths()?;
            let cr_after_prompt = ctx as f64 * kept.len() as f64 / kept.iter().map(|&x| x as f64).sum::<f64>();
            let kv_gib = cache.bytes_live()? as f64 / (1u64 << 30) as f64;
            sync()?;
            let t1 = Instant::now();
            for i in 0..steps {
                let l = model.forward_gpu_decode(&[tok], &[(ctx + i) as u32], &mut cache, &dec, ctx + i + 1)?;
                tok = dms_integration::engine::argmax(&l.squeeze(0)?.to_vec1::<f32>()?);
            }
            sync()?;
            let step_ms = t1.elapsed().as_secs_f64() * 1e3 / steps.max(1) as f64;
            cache.check()?;
            let tps = ctx as f64 / prefill_s;
            if arm.cr <= 1.0 {
                full = (tps, step_ms);
            }
            let r = json!({"model": mname, "weights": if weights.is_some() { "real" } else { "random" },
                "context": ctx, "arm": arm.name, "flag_rate": rate, "prefill_s": prefill_s,
                "prefill_tok_s": tps, "prefill_vs_full": tps / full.0, "decode_step_ms": step_ms,
                "decode_speedup_vs_full": full.1 / step_ms, "kv_gib_after_prompt": kv_gib,
                "cr_after_prompt": cr_after_prompt});
            eprintln!("{r}");
            rows.push(r);
        }
    }
    std::fs::write(out, serde_json::to_string_pretty(&json!({"window": w, "block_size": bs, "rows": rows}))?)?;
    let table: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            let mut v = vec![text(r, "model"), text(r, "context"), text(r, "arm")];
            for (k, p) in [
                ("prefill_s", 2),
                ("prefill_tok_s", 0),
                ("prefill_vs_full", 2),
                ("decode_step_ms", 2),
                ("decode_speedup_vs_full", 2),
                ("kv_gib_after_prompt", 2),
                ("cr_after_prompt", 2),
            ] {
                v.push(format!("{:.p$}", num(r, k)));
            }
            v
        })
        .collect();
    print_table(
        &[
            "model",
            "prompt",
            "arm",
            "prefill s",
            "prefill tok/s",
            "vs full",
            "decode step ms",
            "decode vs full",
            "KV GiB",
            "CR",
        ],
        &table,
    );
    Ok(())
}

struct Arm {
    name: &'static str,
    cr: f64,
}

/// A bf16 device cache in the state DMS leaves after a prompt of `ctx` tokens at the arm's
/// compression (W = `w`, blocks of `bs`), with room for `steps` more tokens per row; the decode
/// decisions that keep that rate; and the tokens kept per row.
#[allow(clippy::too_many_arguments)]
fn synthetic_cache(
    dev: &Device,
    cfg: &ModelConfig,
    ctx: usize,
    arm: &Arm,
    batch: usize,
    w: usize,
    bs: usize,
    steps: usize,
) -> Result<(GpuCache, StepDecisions, usize)> {
    let (layers, kv) = (cfg.num_layers, cfg.num_kv_heads);
    let rows = batch * kv;
    let (rate, kept) = rate_for_cr(arm.cr, ctx, w);
    let wc = w + 1;
    let cap_tokens = kept + steps + 4;
    let max_blocks = cap_tokens.div_ceil(bs);
    let n_rows = layers * rows;
    let mut init = RowInit {
        len: vec![kept as i32; n_rows],
        pos: vec![ctx as i32; n_rows],
        ring_slot: vec![0; n_rows * wc],
        ring_flag: vec![0; n_rows * wc],
    };
    if rate > 0.0 {
        for r in 0..n_rows {
            let (layer, head) = (r / rows, r % kv);
            for j in 0..wc {
                let p = ctx - wc + j;
                let i = r * wc + p % wc;
                init.ring_slot[i] = (kept - wc + j) as i32;
                init.ring_flag[i] = (p + 1 < ctx && random_flag_unit(7, layer, head, p as u32) < rate) as u8;
            }
        }
    }
    let shape = GpuCacheShape {
        layers,
        batch,
        kv_heads: kv,
        head_dim: cfg.head_dim,
        block_size: bs,
        window: w,
        max_blocks_per_row: max_blocks,
        num_blocks: n_rows * max_blocks,
        latent_rank: cfg.mla.as_ref().map(|m| m.kv_lora_rank),
    };
    let cache = GpuCache::with_rows(dev, DType::BF16, shape, init)?;
    let dec = if rate > 0.0 { StepDecisions::Random { seed: 7, rate } } else { StepDecisions::None };
    Ok((cache, dec, kept))
}

/// Decode step time (s), live KV bytes and measured compression of one configuration.
#[allow(clippy::too_many_arguments)]
fn bench_one(
    dev: &Device,
    model: &Llama,
    ctx: usize,
    arm: &Arm,
    batch: usize,
    w: usize,
    bs: usize,
    steps: usize,
    tuning: AttnTuning,
) -> Result<(f64, u64, f64)> {
    let (mut cache, dec, kept) = synthetic_cache(dev, model.config(), ctx, arm, batch, w, bs, steps)?;
    cache.set_tuning(tuning);
    let tokens: Vec<u32> = (0..batch).map(|i| (i * 31 % 1000) as u32 + 10).collect();
    let cd = match dev {
        Device::Cuda(c) => c.clone(),
        _ => bail!("cuda"),
    };
    let mut pos = ctx as u32;
    let mut run = |n: usize, pos: &mut u32| -> Result<f64> {
        cd.cuda_stream().synchronize().map_err(|e| anyhow::anyhow!("{e:?}"))?;
        let t = Instant::now();
        for _ in 0..n {
            let positions = vec![*pos; batch];
            model.forward_gpu_decode(&tokens, &positions, &mut cache, &dec, kept)?;
            *pos += 1;
        }
        cd.cuda_stream().synchronize().map_err(|e| anyhow::anyhow!("{e:?}"))?;
        Ok(t.elapsed().as_secs_f64() / n as f64)
    };
    run(2, &mut pos)?;
    let step = run(steps, &mut pos)?;
    cache.check()?;
    let live = cache.bytes_live()?;
    let lens = cache.row_lengths()?;
    let mean_len = lens.iter().map(|&x| x as f64).sum::<f64>() / lens.len() as f64;
    let measured_cr = pos as f64 / mean_len;
    Ok((step, live, measured_cr))
}

/// Largest batch whose bf16 cache (at `ctx / cr` tokens per row, block rounded) fits `budget` bytes.
fn fit_batch(cfg: &ModelConfig, ctx: usize, cr: f64, steps: usize, bs: usize, budget: f64) -> usize {
    let kept = if cr <= 1.0 { ctx } else { (ctx as f64 / cr).round() as usize };
    // A key and a value per slot; latent rows (MLA) hold one row.
    let pools = if cfg.mla.is_some() { 1 } else { 2 };
    let per_seq =
        (cfg.num_layers * cfg.num_kv_heads * (kept + steps + 6).div_ceil(bs) * bs * pools * cfg.head_dim * 2) as f64;
    (budget / per_seq).floor() as usize
}

fn parse_kernel(name: &str) -> Result<AttnKernel> {
    match name {
        "tiled" => Ok(AttnKernel::Tiled),
        "warps" => Ok(AttnKernel::Warps),
        other => bail!("unknown decode kernel {other:?} (tiled or warps)"),
    }
}

/// Decode kernel and grid size at the memory limit, side by side in one run.
fn tune(dev: &Device, out: &str, models: &str, ctx: usize, limit: Limit, blocks: &str) -> Result<()> {
    let bw = copy_bandwidth(dev)?;
    let (w, bs) = (512usize, 64usize);
    let Limit { max_batch, steps, .. } = limit;
    let budget = limit.budget_bytes();
    let blocks: Vec<usize> = blocks.split(',').map(|b| b.trim().parse()).collect::<Result<_, _>>()?;
    let mut rows = Vec::new();
    for mname in models.split(',') {
        let cfg = model_shape(mname)?;
        let model = Llama::random(cfg.clone(), dev, DType::BF16)?;
        let wbytes = model.weight_bytes() / 2;
        for arm in [Arm { name: "full", cr: 1.0 }, Arm { name: "dms_cr8", cr: 8.0 }] {
            let batch = fit_batch(&cfg, ctx, arm.cr, steps, bs, budget).min(max_batch);
            if batch == 0 {
                continue;
            }
            let mut base = 0f64;
            for kernel in [AttnKernel::Tiled, AttnKernel::Warps] {
                for &target_blocks in &blocks {
                    let tuning = AttnTuning { kernel, target_blocks };
                    let (step, live, _) = bench_one(dev, &model, ctx, &arm, batch, w, bs, steps, tuning)?;
                    if base == 0.0 {
                        base = step;
                    }
                    let floor = (wbytes + live) as f64 / bw;
                    let r = json!({"model": mname, "context": ctx, "arm": arm.name, "batch": batch,
                        "kernel": format!("{kernel:?}"), "target_blocks": target_blocks, "step_ms": step * 1e3,
                        "floor_ms": floor * 1e3, "step_over_floor": step / floor, "speedup_vs_first": base / step});
                    eprintln!("{r}");
                    rows.push(r);
                }
            }
        }
    }
    std::fs::write(out, serde_json::to_string_pretty(&json!({"copy_bandwidth_gb_s": bw / 1e9, "rows": rows}))?)?;
    let table: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            let mut v: Vec<String> =
                ["model", "context", "arm", "batch", "kernel", "target_blocks"].iter().map(|k| text(r, k)).collect();
            for k in ["step_ms", "step_over_floor", "speedup_vs_first"] {
                v.push(format!("{:.2}", num(r, k)));
            }
            v
        })
        .collect();
    print_table(&["model", "ctx", "arm", "batch", "kernel", "target blocks", "step ms", "x floor", "speedup"], &table);
    Ok(())
}

fn bench(dev: &Device, out: &str, limit: Limit, contexts: &str, models: &str, tuning: AttnTuning) -> Result<()> {
    let Limit { budget_gib, max_batch, steps } = limit;
    let bw = copy_bandwidth(dev)?;
    println!("measured device copy bandwidth: {:.0} GB/s", bw / 1e9);
    let (w, bs) = (512usize, 64usize);
    let arms = [Arm { name: "full", cr: 1.0 }, Arm { name: "dms_cr4", cr: 4.0 }, Arm { name: "dms_cr8", cr: 8.0 }];
    let budget = limit.budget_bytes();
    let mut rows = Vec::new();
    for mname in models.split(',') {
        let cfg = model_shape(mname)?;
        let model = Llama::random(cfg.clone(), dev, DType::BF16)?;
        let wbytes = model.weight_bytes() / 2;
        for ctx in contexts.split(',').map(|c| c.parse::<usize>()) {
            let ctx = ctx?;
            let mut full_tps = [0f64; 2];
            let mut full_fit = 0usize;
            for arm in &arms {
                let fit = fit_batch(&cfg, ctx, arm.cr, steps, bs, budget);
                if arm.cr <= 1.0 {
                    full_fit = fit;
                }
                for (bi, batch) in [1usize, fit.min(max_batch)].into_iter().enumerate() {
                    if batch == 0 {
                        continue;
                    }
                    let (step, live, cr) = bench_one(dev, &model, ctx, arm, batch, w, bs, steps, tuning)?;
                    let tps = batch as f64 / step;
                    if arm.cr <= 1.0 {
                        full_tps[bi] = tps;
                    }
                    let floor = (wbytes + live) as f64 / bw;
                    let r = json!({"model": mname, "context": ctx, "arm": arm.name, "batch": batch, "fits_in_budget": fit,
                        "step_ms": step * 1e3, "decode_tok_s": tps, "kv_gib": live as f64 / (1u64 << 30) as f64,
                        "measured_cr": cr, "floor_ms": floor * 1e3, "step_over_floor": step / floor,
                        "tok_s_vs_full_same_batch_kind": if full_tps[bi] > 0.0 { tps / full_tps[bi] } else { f64::NAN },
                        "fit_vs_full": fit as f64 / full_fit.max(1) as f64});
                    eprintln!("{r}");
                    rows.push(r);
                }
            }
        }
        drop(model);
    }
    std::fs::write(
        out,
        serde_json::to_string_pretty(&json!({"copy_bandwidth_gb_s": bw / 1e9, "budget_gib": budget_gib,
        "window": w, "block_size": bs, "kernel": format!("{:?}", tuning.kernel),
        "target_blocks": tuning.target_blocks, "rows": rows}))?,
    )?;
    let table: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            let mut v: Vec<String> =
                ["model", "context", "arm", "batch", "fits_in_budget"].iter().map(|k| text(r, k)).collect();
            for (k, p) in [
                ("step_ms", 2),
                ("floor_ms", 2),
                ("step_over_floor", 2),
                ("decode_tok_s", 0),
                ("tok_s_vs_full_same_batch_kind", 2),
                ("kv_gib", 2),
                ("measured_cr", 2),
            ] {
                v.push(format!("{:.p$}", num(r, k)));
            }
            v
        })
        .collect();
    print_table(
        &["model", "ctx", "arm", "batch", "fits", "step ms", "floor ms", "x floor", "tok/s", "vs full", "KV GiB", "CR"],
        &table,
    );
    Ok(())
}

/// Splits a decode step at the memory limit into the attention kernels and the rest.
fn profile(dev: &Device, out: &str, models: &str, ctx: usize, limit: Limit, tuning: AttnTuning) -> Result<()> {
    let bw = copy_bandwidth(dev)?;
    let (w, bs) = (512usize, 64usize);
    let Limit { budget_gib, max_batch, steps } = limit;
    let budget = limit.budget_bytes();
    let steps = steps.max(1);
    let sync = || dev.synchronize().map_err(|e| anyhow::anyhow!("{e}"));
    let mut rows = Vec::new();
    for mname in models.split(',') {
        let cfg = model_shape(mname)?;
        let model = Llama::random(cfg.clone(), dev, DType::BF16)?;
        let wbytes = model.weight_bytes() / 2;
        for arm in [Arm { name: "full", cr: 1.0 }, Arm { name: "dms_cr8", cr: 8.0 }] {
            let batch = fit_batch(&cfg, ctx, arm.cr, steps + 2, bs, budget).min(max_batch);
            if batch == 0 {
                continue;
            }
            let (step, live, _) = bench_one(dev, &model, ctx, &arm, batch, w, bs, steps, tuning)?;
            let (mut cache, _, kept) = synthetic_cache(dev, &cfg, ctx, &arm, batch, w, bs, 0)?;
            cache.set_tuning(tuning);
            let q = Tensor::randn(0f32, 1.0, (batch, cfg.num_heads, cfg.head_dim), dev)?.to_dtype(DType::BF16)?;
            let scale = 1.0 / (cfg.head_dim as f32).sqrt();
            let attend_all = |cache: &mut GpuCache| -> Result<()> {
                for li in 0..cfg.num_layers {
                    cache.attend(li, &q, scale, kept)?;
                }
                Ok(())
            };
            attend_all(&mut cache)?;
            sync()?;
            let t = Instant::now();
            for _ in 0..steps {
                attend_all(&mut cache)?;
            }
            sync()?;
            let attn = t.elapsed().as_secs_f64() / steps as f64;
            let kv_bytes = cache.bytes_live()? as f64;
            let rest = (step - attn).max(0.0);
            let floor = (wbytes + live) as f64 / bw;
            let r = json!({"model": mname, "context": ctx, "arm": arm.name, "batch": batch,
                "step_ms": step * 1e3, "floor_ms": floor * 1e3, "step_over_floor": step / floor,
                "attention_ms": attn * 1e3, "attention_share": attn / step,
                "attention_gb_s": kv_bytes / attn / 1e9, "attention_vs_copy_bw": kv_bytes / attn / bw,
                "rest_ms": rest * 1e3, "weights_floor_ms": wbytes as f64 / bw * 1e3,
                "rest_over_weights_floor": rest / (wbytes as f64 / bw)});
            eprintln!("{r}");
            rows.push(r);
        }
    }
    std::fs::write(
        out,
        serde_json::to_string_pretty(&json!({"copy_bandwidth_gb_s": bw / 1e9, "budget_gib": budget_gib,
        "kernel": format!("{:?}", tuning.kernel), "target_blocks": tuning.target_blocks, "rows": rows}))?,
    )?;
    let table: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            let mut v: Vec<String> = ["model", "context", "arm", "batch"].iter().map(|k| text(r, k)).collect();
            for (k, p) in [
                ("step_ms", 2),
                ("step_over_floor", 2),
                ("attention_ms", 2),
                ("attention_share", 2),
                ("attention_vs_copy_bw", 2),
                ("rest_ms", 2),
                ("rest_over_weights_floor", 2),
            ] {
                v.push(format!("{:.p$}", num(r, k)));
            }
            v
        })
        .collect();
    println!("measured device copy bandwidth: {:.0} GB/s", bw / 1e9);
    print_table(
        &[
            "model",
            "ctx",
            "arm",
            "batch",
            "step ms",
            "x floor",
            "attn ms",
            "attn share",
            "attn BW / copy BW",
            "rest ms",
            "rest / weights floor",
        ],
        &table,
    );
    Ok(())
}

/// Per-head K/V: both decode kernels against the CPU store, policy and attention, and NVIDIA's DMS
/// fixture through both prompt paths.
fn check_per_head(dev: &Device, fixtures: &str) -> Result<()> {
    let small = |prompts: Vec<usize>| KernelCheck {
        layers: 2,
        kv: 2,
        g: 3,
        d: 64,
        bs: 4,
        w: 5,
        steps: 60,
        prompts,
        latent: None,
    };
    // Production-like: bf16, head_dim 128, GQA 4, blocks of 64, rows split up to 12 ways.
    let large = || KernelCheck {
        layers: 1,
        kv: 2,
        g: 4,
        d: 128,
        bs: 64,
        w: 32,
        steps: 12,
        prompts: vec![700, 1500],
        latent: None,
    };
    for kernel in [AttnKernel::Tiled, AttnKernel::Warps] {
        let tuning = AttnTuning { kernel, ..AttnTuning::default() };
        let cases = [
            (DType::F32, small(vec![0, 0, 0]), "f32, decode only", 1e-4),
            (DType::BF16, small(vec![0, 0, 0]), "bf16, decode only", 2e-2),
            (DType::F32, small(vec![3, 17, 40]), "f32, prompts of 3/17/40 tokens prefilled", 1e-4),
            (DType::BF16, small(vec![3, 17, 40]), "bf16, prompts of 3/17/40 tokens prefilled", 2e-2),
            (DType::BF16, large(), "bf16 d128 g4, prompts of 700/1500 tokens, split rows", 2e-2),
        ];
        for (dtype, case, what, tol) in &cases {
            let (e, n) = check_kernels(dev, *dtype, case, tuning)?;
            println!(
                "{kernel:?} kernels ({what}): max abs error vs CPU {e:.2e} over {} steps, kept sets equal on {n} rows",
                case.steps
            );
            if e > *tol {
                bail!("{kernel:?} kernels ({what}): error {e} above {tol}");
            }
        }
        for v in ["variant_query_neuron", "variant_separate_alpha"] {
            for prefill in [false, true] {
                let (e, s) = check_fixture(dev, fixtures, v, prefill, tuning)?;
                let how = if prefill { "masked one-pass prefill" } else { "prompt token by token" };
                println!("NVIDIA DMS fixture {v} on GPU ({kernel:?}, {how}): logits max abs error {e:.2e} over 72 positions, kept sets equal in {s} states");
                if e > 1e-3 {
                    bail!("{v} ({kernel:?}, {how}): GPU logits error {e} above 1e-3");
                }
            }
        }
    }
    Ok(())
}

/// Latent rows (MLA): the latent kernels against the CPU store and attention, and the tiny
/// DeepSeek-V3 fixture against transformers and the host engine.
fn check_latent(dev: &Device, fixtures: &str) -> Result<()> {
    // Latent rows (MLA): 8 heads in one group, 6 heads in three groups of 2, and DeepSeek's
    // widths (512 + 64, 16 heads in two groups of 8), rows split up to 24 ways.
    let latent = |g: usize, d: usize, r: usize, bs: usize, steps: usize, prompts: Vec<usize>| KernelCheck {
        layers: 2,
        kv: 1,
        g,
        d,
        bs,
        w: 8,
        steps,
        prompts,
        latent: Some(r),
    };
    let cases = [
        (DType::F32, latent(8, 40, 32, 4, 20, vec![300, 17, 0]), "f32 latent 32 + 8, 8 heads", 1e-4),
        (DType::F32, latent(6, 40, 32, 4, 20, vec![100, 5]), "f32 latent 32 + 8, 6 heads", 1e-4),
        (DType::BF16, latent(16, 576, 512, 64, 6, vec![700, 1500]), "bf16 latent 512 + 64, 16 heads", 2e-2),
    ];
    for (dtype, case, what, tol) in &cases {
        let (e, n) = check_kernels(dev, *dtype, case, AttnTuning::default())?;
        println!(
            "MLA kernels ({what}, prompts {:?}): max abs error vs CPU {e:.2e} over {} steps, kept sets equal on {n} rows",
            case.prompts, case.steps
        );
        if e > *tol {
            bail!("MLA kernels ({what}): error {e} above {tol}");
        }
    }
    let (full, dms, states) = check_mla(dev, fixtures)?;
    println!(
        "DeepSeek-V3 MLA fixture on GPU (latent rows): full cache vs transformers max abs error {full:.2e} \
         (prompt + 24 greedy steps, same tokens); DMS on latent rows vs the host engine {dms:.2e}, kept sets \
         equal in {states} states"
    );
    if full > 1e-3 || dms > 1e-3 {
        bail!("MLA fixture on GPU: logits error {full} / {dms} above 1e-3");
    }
    Ok(())
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let dev = Device::new_cuda(0)?;
    match cli.cmd {
        Cmd::Check { fixtures, part } => {
            if part != CheckPart::Mla {
                check_per_head(&dev, &fixtures)?;
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
