//! `dms`: run a model through a policy-driven KV cache.
// The flag docs are the CLI's help text and name config sections as `[model]`, `[cache]`: plain
// text there, not intra-doc links.
#![allow(rustdoc::broken_intra_doc_links)]

use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use dms_integration::config::EngineConfig;
use dms_integration::engine::from_config::{build_engine, gen_params};
use dms_integration::engine::report::{memory_factors_line, summary_line};
use dms_integration::engine::trace::TraceWriter;
use dms_integration::model::chat_template::ChatMessage;

#[derive(Parser)]
#[command(name = "dms", version, about = "Dynamic Memory Sparsification and other KV-cache policies on a paged cache")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate from one prompt and print the text and a summary line.
    Run(Box<RunArgs>),
    /// Run one workload under every arm of an A/B file; print a table, write JSON and a plot.
    Ab(AbArgs),
    /// Run a batch x context x arm grid end to end and write JSON (ratios to the full cache).
    Bench {
        /// Bench file (TOML).
        #[arg(long)]
        config: PathBuf,
    },
    /// Quality vs compression: policies calibrated to equal measured CR on held-out text, and a
    /// needle-in-a-haystack test; writes a markdown table, JSON and a plot.
    Eval {
        /// Eval file (TOML).
        #[arg(long)]
        config: PathBuf,
        /// Override [model] device (`cpu`, `cuda:N`): on a GPU the requests whose policy has a
        /// device program run in one batch on the device cache, the others on the host store.
        #[arg(long)]
        device: Option<String>,
    },
    /// Learn DMS decisions for a model by distillation; writes an NVIDIA-format adapter.
    Retrofit {
        /// Retrofit file (TOML).
        #[arg(long)]
        config: PathBuf,
    },
    /// Serve the model over an OpenAI-compatible HTTP API (chat and completions, streaming),
    /// with per-request cache policies and Prometheus metrics at /metrics.
    Serve(ServeArgs),
    /// Download and verify the default model (SmolLM2-135M-Instruct) into the cache directory.
    Fetch,
    /// List the registered cache policies.
    Policies,
}

/// Options of `run`; each config-file option has a flag that overrides it.
#[derive(Args)]
struct RunArgs {
    /// Engine config file (TOML).
    #[arg(long)]
    config: PathBuf,
    /// Prompt text.
    #[arg(long, conflicts_with = "prompt_ids")]
    prompt: Option<String>,
    /// Raw prompt token ids, comma-separated, used exactly as given (no BOS added).
    #[arg(long, value_delimiter = ',')]
    prompt_ids: Option<Vec<u32>>,
    /// Tokens to generate at most (overrides [generation] max_tokens).
    #[arg(long)]
    max_tokens: Option<usize>,
    /// Write a JSON Lines trace of kept positions and top logits per step.
    #[arg(long)]
    trace: Option<PathBuf>,
    /// Wrap the prompt in the chat template.
    #[arg(long)]
    chat: bool,
    /// Override [model] source.
    #[arg(long)]
    model: Option<String>,
    /// Override [model] device.
    #[arg(long)]
    device: Option<String>,
    /// Override [model] dtype.
    #[arg(long)]
    dtype: Option<String>,
    /// Override [model] weights (dense, quantized, q8_0, q4_0, q4_k, ...).
    #[arg(long)]
    weights: Option<String>,
    /// Override [cache] kv_dtype (f32, f16).
    #[arg(long)]
    kv_dtype: Option<String>,
    /// Override [cache] block_size.
    #[arg(long)]
    block_size: Option<usize>,
    /// Override [cache] memory_mb.
    #[arg(long)]
    memory_mb: Option<u64>,
    /// Override [cache] max_tokens (pool size in full-cache tokens).
    #[arg(long)]
    cache_tokens: Option<u64>,
    /// Override [cache] prefill_chunk.
    #[arg(long)]
    prefill_chunk: Option<usize>,
    /// Override [cache.policy] name (the policy's other keys are dropped unless given with --policy-opt).
    #[arg(long)]
    policy: Option<String>,
    /// Set a [cache.policy] key, e.g. --policy-opt window=64 (value parsed as TOML).
    #[arg(long = "policy-opt", value_name = "KEY=VALUE")]
    policy_opts: Vec<String>,
    /// Override [generation] temperature.
    #[arg(long)]
    temperature: Option<f64>,
    /// Override [generation] top_p.
    #[arg(long)]
    top_p: Option<f64>,
    /// Override [generation] seed.
    #[arg(long)]
    seed: Option<u64>,
    /// Keep generating past the end-of-sequence token.
    #[arg(long)]
    ignore_eos: bool,
}

/// Options of `serve`; flags override the config's [server] table.
#[derive(Args)]
struct ServeArgs {
    /// Engine config file (TOML) with a [server] table.
    #[arg(long)]
    config: PathBuf,
    /// Override [server] host.
    #[arg(long)]
    host: Option<String>,
    /// Override [server] port (0: any free port).
    #[arg(long)]
    port: Option<u16>,
    /// Override [server] prefix_cache: keep no sequence states for later prompts.
    #[arg(long)]
    no_prefix_cache: bool,
    /// Override [server] prefill_budget: prompt tokens fed per engine step at most (0: whole
    /// prompts).
    #[arg(long)]
    prefill_budget: Option<usize>,
}

fn serve(a: ServeArgs) -> Result<()> {
    let mut cfg = EngineConfig::load(&a.config)?;
    if let Some(h) = a.host {
        cfg.server.host = h;
    }
    if let Some(p) = a.port {
        cfg.server.port = p;
    }
    if a.no_prefix_cache {
        cfg.server.prefix_cache = false;
    }
    if let Some(b) = a.prefill_budget {
        cfg.server.prefill_budget = b;
    }
    cfg.validate()?;
    dms_integration::serve::serve(&cfg)
}

/// Options of `ab`.
#[derive(Args)]
struct AbArgs {
    /// A/B file (TOML).
    #[arg(long)]
    config: PathBuf,
    /// Override [output] json.
    #[arg(long)]
    json: Option<String>,
    /// Override [output] plot.
    #[arg(long)]
    plot: Option<String>,
}

fn ab(a: AbArgs) -> Result<()> {
    use dms_integration::harness::ab;
    let mut cfg = ab::AbConfig::load(&a.config)?;
    if let Some(j) = a.json {
        cfg.output.json = j;
    }
    if let Some(p) = a.plot {
        cfg.output.plot = p;
    }
    let (results, peers) = ab::run_ab(&cfg)?;
    let json = ab::to_json(&cfg, &results, &peers);
    std::fs::write(&cfg.output.json, serde_json::to_string_pretty(&json)?)
        .with_context(|| format!("cannot write {}", cfg.output.json))?;
    ab::plot(&results, std::path::Path::new(&cfg.output.plot))?;
    println!("\n{}", ab::table(&results));
    print!("{}", dms_integration::harness::ab_peer::peer_lines(&peers));
    println!(
        "model {} | {} prompts x {} tokens + {} continuation tokens (teacher-forced), {} at a time",
        cfg.model.source,
        cfg.workload.prompts,
        cfg.workload.prompt_tokens,
        cfg.workload.continuation_tokens,
        cfg.workload.concurrency
    );
    for r in &results {
        println!("  {}: {}", r.name, r.policy);
    }
    println!("wrote {} and {}", cfg.output.json, cfg.output.plot);
    Ok(())
}

fn eval(config: &std::path::Path, device: Option<String>) -> Result<()> {
    use dms_integration::harness::eval;
    let mut cfg = eval::EvalConfig::load(config)?;
    if let Some(d) = device {
        cfg.model.device = d;
    }
    let report = eval::run_eval(&cfg)?;
    let table = eval::table(&cfg, &report);
    std::fs::write(&cfg.output.table, &table).with_context(|| format!("cannot write {}", cfg.output.table))?;
    std::fs::write(&cfg.output.json, serde_json::to_string_pretty(&eval::to_json(&cfg, &report))?)
        .with_context(|| format!("cannot write {}", cfg.output.json))?;
    eval::plot(&report, std::path::Path::new(&cfg.output.plot))?;
    println!("\n{table}");
    println!("wrote {}, {} and {}", cfg.output.table, cfg.output.json, cfg.output.plot);
    Ok(())
}

fn apply_overrides(cfg: &mut EngineConfig, a: &RunArgs) -> Result<()> {
    if let Some(v) = &a.model {
        cfg.model.source = v.clone();
    }
    if let Some(v) = &a.device {
        cfg.model.device = v.clone();
    }
    if let Some(v) = &a.dtype {
        cfg.model.dtype = v.clone();
    }
    if let Some(v) = &a.weights {
        cfg.model.weights = v.clone();
    }
    if let Some(v) = &a.kv_dtype {
        cfg.cache.kv_dtype = v.clone();
    }
    if let Some(v) = a.block_size {
        cfg.cache.block_size = v;
    }
    if let Some(v) = a.memory_mb {
        cfg.cache.memory_mb = Some(v);
        cfg.cache.max_tokens = None;
    }
    if let Some(v) = a.cache_tokens {
        cfg.cache.max_tokens = Some(v);
        cfg.cache.memory_mb = None;
    }
    if let Some(v) = a.prefill_chunk {
        cfg.cache.prefill_chunk = v;
    }
    if let Some(name) = &a.policy {
        cfg.cache.policy = toml::Table::new();
        cfg.cache.policy.insert("name".into(), toml::Value::String(name.clone()));
    }
    for kv in &a.policy_opts {
        let (k, v) = kv.split_once('=').with_context(|| format!("--policy-opt `{kv}` is not KEY=VALUE"))?;
        let parsed: toml::Table = toml::from_str(&format!("v = {v}"))
            .or_else(|_| toml::from_str(&format!("v = {:?}", v)))
            .with_context(|| format!("--policy-opt `{kv}`: bad value"))?;
        cfg.cache.policy.insert(k.trim().to_string(), parsed["v"].clone());
    }
    if let Some(v) = a.max_tokens {
        cfg.generation.max_tokens = v;
    }
    if let Some(v) = a.temperature {
        cfg.generation.temperature = v;
    }
    if let Some(v) = a.top_p {
        cfg.generation.top_p = v;
    }
    if let Some(v) = a.seed {
        cfg.generation.seed = v;
    }
    if a.ignore_eos {
        cfg.generation.stop_at_eos = false;
    }
    if a.chat {
        cfg.generation.chat = true;
    }
    cfg.validate()
}

fn run(a: RunArgs) -> Result<()> {
    let mut cfg = EngineConfig::load(&a.config)?;
    apply_overrides(&mut cfg, &a)?;
    let built = build_engine(&cfg)?;
    let (mut engine, tokenizer) = (built.engine, built.tokenizer);
    let prompt_ids: Vec<u32> = match (&a.prompt_ids, &a.prompt) {
        (Some(ids), _) => ids.clone(),
        (None, Some(text)) => {
            let tok = tokenizer.as_ref().context("this model has no tokenizer: use --prompt-ids")?;
            // A rendered chat prompt holds its own special tokens; a plain one gets those the
            // tokenizer adds (Llama 3's BOS), as the server's completions do.
            let (text, add_special) = if cfg.generation.chat {
                (built.chat_template.render(&[ChatMessage::text("user", text)])?, false)
            } else {
                (text.clone(), true)
            };
            tok.encode(text, add_special).map_err(|e| anyhow::anyhow!("tokenizing the prompt: {e}"))?.get_ids().to_vec()
        }
        (None, None) => bail!("give --prompt or --prompt-ids"),
    };
    let mut trace = match &a.trace {
        Some(p) => Some(TraceWriter::new(Box::new(std::io::BufWriter::new(
            std::fs::File::create(p).with_context(|| format!("cannot create trace file {}", p.display()))?,
        )))),
        None => None,
    };
    let mut on_device = None;
    if engine.model.device().is_cuda() {
        match dms_integration::gpu::policy::DevicePolicy::of(engine.policy.as_ref()) {
            Ok(p) if a.trace.is_none() => on_device = Some(p),
            Ok(_) => eprintln!("note: --trace reads the host store; this run keeps the KV cache on the host"),
            Err(why) => eprintln!("note: {why:#}; this run keeps the KV cache on the host (attention on the CPU)"),
        }
    }
    if on_device.is_none() && engine.model.dtype() != candle_core::DType::F32 {
        bail!("[model] dtype `{}` runs on the device cache only; use dtype = \"f32\" for this policy", cfg.model.dtype);
    }
    let g = match on_device {
        Some(_) => run_on_device(&cfg, &engine, &prompt_ids)?,
        None => engine.generate(&prompt_ids, &gen_params(&cfg), trace.as_mut())?,
    };
    if let Some(t) = trace.as_mut() {
        t.flush()?;
    }
    let mut out = std::io::stdout().lock();
    match &tokenizer {
        Some(tok) => {
            let text = tok.decode(&g.tokens, true).map_err(|e| anyhow::anyhow!("decoding: {e}"))?;
            writeln!(out, "{text}")?;
        }
        None => writeln!(out, "{}", g.tokens.iter().map(|t| t.to_string()).collect::<Vec<_>>().join(","))?,
    }
    writeln!(out, "{}", summary_line(&g, &engine.policy.describe()))?;
    if on_device.is_some() {
        writeln!(
            out,
            "[device] KV cache, DMS bookkeeping and attention on {} ({:?})",
            cfg.model.device,
            engine.model.dtype()
        )?;
    }
    if let Some(line) = memory_factors_line(engine.model.config(), &g) {
        writeln!(out, "{line}")?;
    }
    Ok(())
}

/// Generation with the KV cache on the GPU (`device = "cuda:N"`, policy `full` or `dms`).
#[cfg(feature = "cuda")]
fn run_on_device(
    cfg: &EngineConfig,
    engine: &dms_integration::engine::Engine,
    prompt: &[u32],
) -> Result<dms_integration::engine::Generation> {
    let mc = engine.model.config();
    // Latent rows (MLA) hold one row per token and layer, per-head rows a key and a value.
    let pools = if mc.mla.is_some() { 1 } else { 2 };
    let slot = (pools * mc.head_dim * engine.model.dtype().size_in_bytes()) as u64;
    let blocks = cfg.capacity_blocks(mc.num_layers, mc.num_kv_heads, slot);
    dms_integration::gpu::generate::generate_on_device(
        &engine.model,
        prompt,
        &gen_params(cfg),
        engine.policy.clone(),
        cfg.cache.block_size,
        blocks,
        engine.cuda_graphs,
    )
}

#[cfg(not(feature = "cuda"))]
fn run_on_device(
    _: &EngineConfig,
    _: &dms_integration::engine::Engine,
    _: &[u32],
) -> Result<dms_integration::engine::Generation> {
    bail!("a CUDA device needs a build with --features cuda")
}

fn main() {
    // RUST_LOG overrides; by default the engine's own info lines (a line per served request).
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,dms_integration=info"));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(a) => run(*a),
        Command::Ab(a) => ab(a),
        Command::Serve(a) => serve(a),
        Command::Eval { config, device } => eval(&config, device),
        Command::Retrofit { config } => dms_integration::retrofit::RetrofitConfig::load(&config)
            .and_then(|c| dms_integration::retrofit::run(&c))
            .map(|out| println!("adapter written to {}", out.display())),
        Command::Bench { config } => dms_integration::harness::bench_grid::BenchConfig::load(&config)
            .and_then(|c| dms_integration::harness::bench_grid::run_grid(&c).map(|(_, t)| (c, t)))
            .map(|(c, t)| println!("\n{t}wrote {}", c.grid.output)),
        Command::Fetch => {
            dms_integration::assets::fetch(&dms_integration::assets::SMOLLM2_135M).map(|p| println!("{}", p.display()))
        }
        Command::Policies => {
            for n in dms_integration::engine::from_config::registry().names() {
                println!("{n}");
            }
            Ok(())
        }
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
