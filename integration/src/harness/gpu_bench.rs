//! `dms-gpu bench / tune / profile / prefill / peer / graphs`: the decode benchmarks on a CUDA GPU over
//! synthetic caches (kernel microbenchmarks at the memory limit) and real prompts at batch 1
//! (feature `cuda`). Each prints a table last and writes JSON.

use crate::engine::load_model;
use crate::gpu::policy::DevicePolicy;
use crate::gpu::{AttnKernel, AttnTuning, GpuCache, GpuCacheShape, LatentKernel, RowInit};
use crate::model::shapes::named_shape;
use crate::model::WeightForm;
use crate::model::{Llama, ModelConfig};
use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor};
use dms_policy::policies::random_flag_unit;
use dms_policy::FlagSource;
use serde_json::json;
use std::time::Instant;

/// The memory limit the timing commands fill.
#[derive(clap::Args, Clone, Copy)]
pub struct Limit {
    /// KV memory budget in GiB.
    #[arg(long, default_value_t = 64.0)]
    pub budget_gib: f64,
    /// Largest batch actually timed.
    #[arg(long, default_value_t = 512)]
    pub max_batch: usize,
    /// Timed decode steps per configuration.
    #[arg(long, default_value_t = 8)]
    pub steps: usize,
}

impl Limit {
    /// The budget in bytes.
    pub fn budget_bytes(&self) -> f64 {
        self.budget_gib * (1u64 << 30) as f64
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

/// Table cells of JSON rows: the `texts` fields as they are, then the `nums` fields with their
/// decimals ("-" where a row lacks one).
fn table_of(rows: &[serde_json::Value], texts: &[&str], nums: &[(&str, usize)]) -> Vec<Vec<String>> {
    rows.iter()
        .map(|r| {
            let mut v: Vec<String> = texts.iter().map(|k| text(r, k)).collect();
            v.extend(nums.iter().map(|&(k, p)| match r.get(k) {
                Some(_) => format!("{:.p$}", num(r, k)),
                None => "-".into(),
            }));
            v
        })
        .collect()
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
    cache.set_all_programs(DevicePolicy { window: 512, flags: FlagSource::Random { seed: 1, rate: 0.5 }, sinks: 0 })?;
    let prompt: Vec<u32> = (0..256u32).map(|i| i % 100 + 5).collect();
    crate::gpu::prefill_into(model, &prompt, 0, None, &mut cache, false)?;
    for i in 0..2u32 {
        crate::gpu::decode_step(model, &[7], &[256 + i], &[None], &mut cache, 258)?;
    }
    cache.synchronize()
}

/// Ours vs mistral.rs on the same random bf16 weights at batch 1 (full cache on both sides).
#[cfg(feature = "mistralrs")]
pub fn bench_peer(dev: &Device, out: &str, models: &str, contexts: &str, gen: usize, models_dir: &str) -> Result<()> {
    use crate::harness::peer_mistralrs::MistralRsPeer;
    let sync = |d: &Device| d.synchronize().map_err(|e| anyhow::anyhow!("{e}"));
    let mut rows = Vec::new();
    for mname in models.split(',') {
        let cfg = named_shape(mname)?;
        let dir = std::path::Path::new(models_dir).join(mname);
        let t0 = Instant::now();
        crate::assets::export::write_random_hf(&cfg, &dir, dev, DType::BF16)?;
        eprintln!("{mname}: random checkpoint in {} ({:.1} s)", dir.display(), t0.elapsed().as_secs_f64());
        let ours = load_model(&dir, dev, WeightForm::Dense)?.model.to_dtype(DType::BF16)?;
        let peer = MistralRsPeer::load_hf_on(&dir, 1, dev, mistralrs_core::ModelDType::BF16)?;
        warm_up(dev, &ours)?;
        peer.generate(&[vec![5u32; 64]], 4)?;
        for ctx in contexts.split(',').map(|c| c.trim().parse::<usize>()) {
            let ctx = ctx?;
            let prompt: Vec<u32> = (0..ctx).map(|i| (i * 7919 % (cfg.vocab_size - 10)) as u32 + 5).collect();
            let mut cache = batch1_cache(dev, &cfg, ctx + gen + 4, 512)?;
            sync(dev)?;
            let t1 = Instant::now();
            let logits = crate::gpu::prefill_into(&ours, &prompt, 0, None, &mut cache, false)?;
            let mut tok = crate::engine::argmax(&logits.squeeze(0)?.to_vec1::<f32>()?);
            let prefill_s = t1.elapsed().as_secs_f64();
            let mut ours_tokens = vec![tok];
            let t2 = Instant::now();
            for i in 0..gen.saturating_sub(1) {
                let pos = (ctx + i) as u32;
                let l = crate::gpu::decode_step(&ours, &[tok], &[pos], &[None], &mut cache, ctx + i + 1)?;
                tok = crate::engine::argmax(&l.squeeze(0)?.to_vec1::<f32>()?);
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
pub fn bench_prefill(
    dev: &Device,
    out: &str,
    mname: &str,
    contexts: &str,
    steps: usize,
    weights: Option<&std::path::Path>,
) -> Result<()> {
    let model = match weights {
        Some(path) => load_model(path, dev, WeightForm::Dense)?.model.to_dtype(DType::BF16)?,
        None => Llama::random(named_shape(mname)?, dev, DType::BF16)?,
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
            cache.set_all_programs(DevicePolicy { window: w, flags, sinks: 0 })?;
            sync()?;
            let t0 = Instant::now();
            let logits = crate::gpu::prefill_into(&model, &prompt, 0, None, &mut cache, false)?;
            sync()?;
            let prefill_s = t0.elapsed().as_secs_f64();
            let mut tok = crate::engine::argmax(&logits.squeeze(0)?.to_vec1::<f32>()?);
            cache.check()?;
            let kept = cache.row_lengths()?;
            let cr_after_prompt = ctx as f64 * kept.len() as f64 / kept.iter().map(|&x| x as f64).sum::<f64>();
            let kv_gib = cache.bytes_live()? as f64 / (1u64 << 30) as f64;
            sync()?;
            let t1 = Instant::now();
            for i in 0..steps {
                let l = crate::gpu::decode_step(&model, &[tok], &[(ctx + i) as u32], &[None], &mut cache, ctx + i + 1)?;
                tok = crate::engine::argmax(&l.squeeze(0)?.to_vec1::<f32>()?);
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
    let table = table_of(
        &rows,
        &["model", "context", "arm"],
        &[
            ("prefill_s", 2),
            ("prefill_tok_s", 0),
            ("prefill_vs_full", 2),
            ("decode_step_ms", 2),
            ("decode_speedup_vs_full", 2),
            ("kv_gib_after_prompt", 2),
            ("cr_after_prompt", 2),
        ],
    );
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
) -> Result<(GpuCache, usize)> {
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
    let mut cache = GpuCache::with_rows(dev, DType::BF16, shape, init)?;
    let flags = if rate > 0.0 { FlagSource::Random { seed: 7, rate } } else { FlagSource::None };
    cache.set_all_programs(DevicePolicy { window: w, flags, sinks: 0 })?;
    Ok((cache, kept))
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
    let (mut cache, kept) = synthetic_cache(dev, model.config(), ctx, arm, batch, w, bs, steps)?;
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
            crate::gpu::decode_step(model, &tokens, &positions, &vec![None; batch], &mut cache, kept)?;
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

/// Decode steps replayed from a CUDA graph ([`crate::gpu::graph::CapturedStep`]) against the
/// same steps launched kernel by kernel, on two identical synthetic bf16 caches per
/// configuration (random weights of each shape, `ctx` tokens, full cache and DMS CR 8 at random
/// decisions, each batch of `batches`): the step time of each, both against the floor (weights
/// and live K/V read once at the measured copy bandwidth), and the largest logits difference
/// between the two over 4 steps after the timing, and the device's CUDA-graph memory pool after
/// the capture's replays. A capture that fails is a row with its error.
/// `dev` must come from [`crate::gpu::graph::graph_device`].
pub fn bench_graphs(dev: &Device, out: &str, models: &str, ctx: usize, batches: &str, steps: usize) -> Result<()> {
    use crate::gpu::graph::{graph_pool_bytes, CapturedStep};

    let bw = copy_bandwidth(dev)?;
    println!("measured device copy bandwidth: {:.0} GB/s", bw / 1e9);
    let (w, bs, check) = (512usize, 64usize, 4usize);
    let cd = match dev {
        Device::Cuda(c) => c.clone(),
        _ => bail!("cuda"),
    };
    let sync = || cd.cuda_stream().synchronize().map_err(|e| anyhow::anyhow!("{e:?}"));
    let mut rows = Vec::new();
    for mname in models.split(',') {
        let cfg = named_shape(mname)?;
        let model = Llama::random(cfg.clone(), dev, DType::BF16)?;
        let wbytes = model.weight_bytes() / 2;
        warm_up(dev, &model)?;
        for arm in [Arm { name: "full", cr: 1.0 }, Arm { name: "dms_cr8", cr: 8.0 }] {
            for batch in batches.split(',').map(|b| b.parse::<usize>()) {
                let batch = batch?;
                let room = steps + check + 4;
                let (mut eager, kept) = synthetic_cache(dev, &cfg, ctx, &arm, batch, w, bs, room)?;
                let (mut graphed, _) = synthetic_cache(dev, &cfg, ctx, &arm, batch, w, bs, room)?;
                let tokens: Vec<u32> = (0..batch).map(|i| (i * 31 % 1000) as u32 + 10).collect();
                let adapters = vec![None; batch];
                let max_len = kept + room;
                let at = |p: u32| vec![p; batch];
                let mut pos = ctx as u32;
                for cache in [&mut eager, &mut graphed] {
                    for i in 0..2 {
                        crate::gpu::decode_step(&model, &tokens, &at(pos + i), &adapters, cache, max_len)?;
                    }
                }
                pos += 2;
                sync()?;
                let t = Instant::now();
                for i in 0..steps as u32 {
                    crate::gpu::decode_step(&model, &tokens, &at(pos + i), &adapters, &mut eager, max_len)?;
                }
                sync()?;
                let eager_s = t.elapsed().as_secs_f64() / steps as f64;
                let floor = (wbytes + eager.bytes_live()?) as f64 / bw;
                let mut r = json!({"model": mname, "context": ctx, "arm": arm.name, "batch": batch,
                    "eager_ms": eager_s * 1e3, "floor_ms": floor * 1e3, "eager_over_floor": eager_s / floor});
                match CapturedStep::capture(&model, &mut graphed, &adapters, max_len) {
                    Ok(mut graph) => {
                        sync()?;
                        let t = Instant::now();
                        for i in 0..steps as u32 {
                            graph.step(&model, &mut graphed, &tokens, &at(pos + i), max_len)?;
                        }
                        sync()?;
                        let graph_s = t.elapsed().as_secs_f64() / steps as f64;
                        let mut worst = 0f32;
                        for i in steps as u32..(steps + check) as u32 {
                            let want =
                                crate::gpu::decode_step(&model, &tokens, &at(pos + i), &adapters, &mut eager, max_len)?
                                    .to_vec2::<f32>()?;
                            let got =
                                graph.step(&model, &mut graphed, &tokens, &at(pos + i), max_len)?.to_vec2::<f32>()?;
                            for (g, e) in got.iter().flatten().zip(want.iter().flatten()) {
                                worst = worst.max((g - e).abs());
                            }
                        }
                        eager.check()?;
                        graphed.check()?;
                        r["graph_ms"] = json!(graph_s * 1e3);
                        r["graph_over_floor"] = json!(graph_s / floor);
                        r["speedup"] = json!(eager_s / graph_s);
                        r["max_abs_logit_diff"] = json!(worst);
                        r["graph_kernels"] = json!(graph.nodes().kernels);
                        if let Ok(pool) = graph_pool_bytes(dev) {
                            r["graph_pool_mib"] = json!(pool as f64 / (1u64 << 20) as f64);
                        }
                    }
                    Err(e) => r["error"] = json!(format!("{e:#}")),
                }
                eprintln!("{r}");
                rows.push(r);
            }
        }
        drop(model);
    }
    std::fs::write(
        out,
        serde_json::to_string_pretty(&json!({"copy_bandwidth_gb_s": bw / 1e9, "window": w, "block_size": bs,
            "steps": steps, "rows": rows}))?,
    )?;
    let mut table = table_of(
        &rows,
        &["model", "context", "arm", "batch"],
        &[
            ("eager_ms", 3),
            ("graph_ms", 3),
            ("speedup", 2),
            ("floor_ms", 3),
            ("eager_over_floor", 2),
            ("graph_over_floor", 2),
            ("max_abs_logit_diff", 4),
            ("graph_kernels", 0),
            ("graph_pool_mib", 1),
        ],
    );
    for (v, r) in table.iter_mut().zip(&rows) {
        v.push(if r.get("error").is_some() { text(r, "error").chars().take(80).collect() } else { String::new() });
    }
    print_table(
        &[
            "model",
            "ctx",
            "arm",
            "batch",
            "eager ms",
            "graph ms",
            "speedup",
            "floor ms",
            "eager x floor",
            "graph x floor",
            "max |dlogit|",
            "kernels",
            "capture error",
        ],
        &table,
    );
    Ok(())
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

pub fn parse_kernel(name: &str) -> Result<AttnKernel> {
    match name {
        "tiled" => Ok(AttnKernel::Tiled),
        "warps" => Ok(AttnKernel::Warps),
        "async" => Ok(AttnKernel::Async),
        other => bail!("unknown decode kernel {other:?} (tiled, warps or async)"),
    }
}

/// The latent-row kernel named on the command line: `groups` or `mma`.
pub fn parse_latent_kernel(name: &str) -> Result<LatentKernel> {
    match name {
        "groups" => Ok(LatentKernel::HeadGroups),
        "mma" => Ok(LatentKernel::TensorCores),
        other => bail!("unknown latent decode kernel {other:?} (groups or mma)"),
    }
}

/// Decode kernel and grid size at the memory limit, side by side in one run.
pub fn tune(dev: &Device, out: &str, models: &str, ctx: usize, limit: Limit, blocks: &str) -> Result<()> {
    let bw = copy_bandwidth(dev)?;
    let (w, bs) = (512usize, 64usize);
    let Limit { max_batch, steps, .. } = limit;
    let budget = limit.budget_bytes();
    let blocks: Vec<usize> = blocks.split(',').map(|b| b.trim().parse()).collect::<Result<_, _>>()?;
    let mut rows = Vec::new();
    for mname in models.split(',') {
        let cfg = named_shape(mname)?;
        let model = Llama::random(cfg.clone(), dev, DType::BF16)?;
        let wbytes = model.weight_bytes() / 2;
        for arm in [Arm { name: "full", cr: 1.0 }, Arm { name: "dms_cr8", cr: 8.0 }] {
            let batch = fit_batch(&cfg, ctx, arm.cr, steps, bs, budget).min(max_batch);
            if batch == 0 {
                continue;
            }
            let mut base = 0f64;
            for kernel in [AttnKernel::Tiled, AttnKernel::Warps, AttnKernel::Async] {
                for &target_blocks in &blocks {
                    let tuning = AttnTuning { kernel, target_blocks, ..AttnTuning::default() };
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
    let table = table_of(
        &rows,
        &["model", "context", "arm", "batch", "kernel", "target_blocks"],
        &[("step_ms", 2), ("step_over_floor", 2), ("speedup_vs_first", 2)],
    );
    print_table(&["model", "ctx", "arm", "batch", "kernel", "target blocks", "step ms", "x floor", "speedup"], &table);
    Ok(())
}

pub fn bench(dev: &Device, out: &str, limit: Limit, contexts: &str, models: &str, tuning: AttnTuning) -> Result<()> {
    let Limit { budget_gib, max_batch, steps } = limit;
    let bw = copy_bandwidth(dev)?;
    println!("measured device copy bandwidth: {:.0} GB/s", bw / 1e9);
    let (w, bs) = (512usize, 64usize);
    let arms = [Arm { name: "full", cr: 1.0 }, Arm { name: "dms_cr4", cr: 4.0 }, Arm { name: "dms_cr8", cr: 8.0 }];
    let budget = limit.budget_bytes();
    let mut rows = Vec::new();
    for mname in models.split(',') {
        let cfg = named_shape(mname)?;
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
    let table = table_of(
        &rows,
        &["model", "context", "arm", "batch", "fits_in_budget"],
        &[
            ("step_ms", 2),
            ("floor_ms", 2),
            ("step_over_floor", 2),
            ("decode_tok_s", 0),
            ("tok_s_vs_full_same_batch_kind", 2),
            ("kv_gib", 2),
            ("measured_cr", 2),
        ],
    );
    print_table(
        &["model", "ctx", "arm", "batch", "fits", "step ms", "floor ms", "x floor", "tok/s", "vs full", "KV GiB", "CR"],
        &table,
    );
    Ok(())
}

/// Splits a decode step at the memory limit into the attention kernels and the rest.
pub fn profile(dev: &Device, out: &str, models: &str, ctx: usize, limit: Limit, tuning: AttnTuning) -> Result<()> {
    let bw = copy_bandwidth(dev)?;
    let (w, bs) = (512usize, 64usize);
    let Limit { budget_gib, max_batch, steps } = limit;
    let budget = limit.budget_bytes();
    let steps = steps.max(1);
    let sync = || dev.synchronize().map_err(|e| anyhow::anyhow!("{e}"));
    let mut rows = Vec::new();
    for mname in models.split(',') {
        let cfg = named_shape(mname)?;
        let model = Llama::random(cfg.clone(), dev, DType::BF16)?;
        let wbytes = model.weight_bytes() / 2;
        for arm in [Arm { name: "full", cr: 1.0 }, Arm { name: "dms_cr8", cr: 8.0 }] {
            let batch = fit_batch(&cfg, ctx, arm.cr, steps + 2, bs, budget).min(max_batch);
            if batch == 0 {
                continue;
            }
            let (step, live, _) = bench_one(dev, &model, ctx, &arm, batch, w, bs, steps, tuning)?;
            let (mut cache, kept) = synthetic_cache(dev, &cfg, ctx, &arm, batch, w, bs, 0)?;
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
    let table = table_of(
        &rows,
        &["model", "context", "arm", "batch"],
        &[
            ("step_ms", 2),
            ("step_over_floor", 2),
            ("attention_ms", 2),
            ("attention_share", 2),
            ("attention_vs_copy_bw", 2),
            ("rest_ms", 2),
            ("rest_over_weights_floor", 2),
        ],
    );
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
