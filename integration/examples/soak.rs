//! Soak test (not in CI): many decode steps with evicting policies across many sequences in a
//! bounded pool, the scheduler admitting, preempting and retiring them. Records peak RSS and pool
//! usage over time and checks that memory stays flat and every block is back in the pool at the
//! end. Writes JSON and prints one line per wave.
//!
//! `cargo run --release -p dms-integration --example soak -- --decode-steps 100000`

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::Device;
use clap::Parser;
use dms_integration::engine::scheduler::{run_batch, Request};
use dms_integration::engine::{load_model, Engine, GenParams};

#[derive(Parser)]
struct Args {
    /// Decode steps (batched forward passes) per policy.
    #[arg(long, default_value_t = 100_000)]
    decode_steps: usize,
    /// Model: an HF-style directory, a GGUF file or a bare config.json.
    #[arg(long, default_value = "integration/tests/fixtures/qwen3_tiny")]
    model: PathBuf,
    /// Pool size in blocks of 16 tokens (small enough that the scheduler must preempt).
    #[arg(long, default_value_t = 128)]
    pool_blocks: usize,
    /// Sequences decoding at once at most.
    #[arg(long, default_value_t = 16)]
    max_batch: usize,
    /// Requests per wave (one `run_batch` call).
    #[arg(long, default_value_t = 64)]
    wave: usize,
    /// Output JSON.
    #[arg(long, default_value = "soak-results.json")]
    json: PathBuf,
}

/// Peak and current resident set size of this process in KiB (`/proc/self/status`).
fn rss_kib() -> (u64, u64) {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |k: &str| {
        s.lines().find_map(|l| l.strip_prefix(k)?.trim().strip_suffix("kB")?.trim().parse().ok()).unwrap_or(0)
    };
    (field("VmHWM:"), field("VmRSS:"))
}

fn main() -> Result<()> {
    let a = Args::parse();
    let registry = dms_integration::engine::from_config::registry();
    let policies = [
        ("dms", "name = 'dms'\nwindow = 16\ndecision = 'random'\nevict_rate = 0.75"),
        ("sliding_window", "name = 'sliding_window'\nwindow = 32\nsinks = 4"),
    ];
    let mut report = Vec::new();
    for (name, table) in policies {
        let loaded = load_model(&a.model, &Device::Cpu, dms_integration::model::WeightForm::Dense)
            .with_context(|| format!("model {}", a.model.display()))?;
        let vocab = loaded.model.config().vocab_size as u64;
        let policy = registry.build(&toml::from_str(table)?)?;
        let mut engine = Engine::new(loaded.model, policy.clone(), 16, a.pool_blocks)?;
        let capacity = engine.store.capacity_blocks();
        let t0 = Instant::now();
        let (mut steps, mut decoded, mut wave, mut preemptions) = (0usize, 0usize, 0usize, 0usize);
        let mut waves = Vec::new();
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = |m: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % m
        };
        while steps < a.decode_steps {
            let reqs: Vec<Request> = (0..a.wave)
                .map(|i| {
                    let prompt_len = 8 + next(120) as usize;
                    let gen = 16 + next(240) as usize;
                    Request {
                        id: i,
                        prompt: (0..prompt_len).map(|_| next(vocab) as u32).collect(),
                        forced: Some((0..gen).map(|_| next(vocab) as u32).collect()),
                        policy: policy.clone(),
                        params: None,
                    }
                })
                .collect();
            let params = GenParams { seed: wave as u64, ..GenParams::greedy(0, 0) };
            let (done, stats) = run_batch(&mut engine, reqs, &params, a.max_batch, false, |_| {})?;
            if done.len() != a.wave {
                bail!("wave {wave}: {} of {} requests finished", done.len(), a.wave);
            }
            let usage = engine.store.usage();
            if usage.bytes_allocated != 0 || engine.store.free_block_count() != capacity {
                bail!(
                    "wave {wave}: {} bytes still allocated, {} of {capacity} blocks free after every request retired",
                    usage.bytes_allocated,
                    engine.store.free_block_count()
                );
            }
            steps += stats.decode_steps;
            decoded += stats.decode_tokens;
            preemptions += stats.preemptions;
            let (hwm, rss) = rss_kib();
            let peak_pool = stats.memory_trace.iter().map(|m| m.2).max().unwrap_or(0);
            println!(
                "{name} wave {wave}: steps {steps}, decoded {decoded}, mean running {:.1}, preemptions {}, pool peak {:.1}% of {capacity} blocks, RSS {:.1} MiB (peak {:.1})",
                stats.mean_running(),
                stats.preemptions,
                100.0 * peak_pool as f64 / (capacity as u64 * 16 * engine.store.slot_bytes()) as f64,
                rss as f64 / 1024.0,
                hwm as f64 / 1024.0
            );
            waves.push(serde_json::json!({
                "wave": wave, "decode_steps": steps, "decoded": decoded, "mean_running": stats.mean_running(),
                "preemptions": stats.preemptions, "pool_peak_bytes": peak_pool, "rss_kib": rss, "peak_rss_kib": hwm,
            }));
            wave += 1;
        }
        let rss: Vec<u64> = waves.iter().map(|w| w["rss_kib"].as_u64().unwrap_or(0)).collect();
        // Flat: after the first quarter of the waves (allocator warm-up), RSS grows by less than 10%.
        let settled = rss[rss.len() / 4];
        let last = *rss.last().unwrap_or(&0);
        let growth = last as f64 / settled.max(1) as f64;
        println!(
            "{name}: {steps} decode steps ({decoded} tokens) in {wave} waves, {preemptions} preemptions, {:.0} s; RSS {:.1} MiB after warm-up, {:.1} MiB at the end ({growth:.3}x); every block back in the pool",
            t0.elapsed().as_secs_f64(),
            settled as f64 / 1024.0,
            last as f64 / 1024.0
        );
        if growth > 1.10 {
            bail!("{name}: RSS grew {growth:.3}x after warm-up");
        }
        report.push(serde_json::json!({
            "policy": name, "decode_steps": steps, "decode_tokens": decoded, "waves": wave, "preemptions": preemptions,
            "pool_blocks": capacity, "rss_growth_after_warmup": growth, "per_wave": waves,
        }));
    }
    std::fs::write(&a.json, serde_json::to_string_pretty(&report)?)?;
    println!("wrote {}", a.json.display());
    Ok(())
}
