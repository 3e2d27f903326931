//! `dms serve`: an OpenAI-compatible HTTP server over the engine's scheduler.
//!
//! The engine and its scheduler run on their own thread ([`worker`]), with the KV cache on the
//! device or in the host store ([`placement`]); an axum front end on tokio
//! ([`routes`]) checks each request, hands it over a channel and streams its text back. A request
//! chooses its cache policy with `"cache_policy": NAME` among those `[server]` names
//! ([`settings`]); every answer reports what its cache kept, and `/metrics` ([`metrics`]) what
//! each policy saves.

pub mod choice;
pub mod error;
pub mod harmony;
pub mod metrics;
pub mod openai;
pub mod placement;
pub mod reasoning;
pub mod routes;
pub mod settings;
pub mod structured;
pub mod text;
pub mod tokenize;
pub mod tool_calls;
pub mod worker;

use std::sync::atomic::{AtomicU64, AtomicUsize};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};

use crate::config::EngineConfig;
use crate::engine::constraint::Grammars;
use crate::engine::from_config::{build_engine, registry, resolve_policy_table, BuiltEngine};
use crate::engine::Engine;
use placement::Placement;
use routes::App;
use tool_calls::ToolFormat;
use worker::{Command, ServedPolicy, WorkerSetup};

/// Builds the engine under the default policy and every other served policy against its model.
pub fn build_served(cfg: &EngineConfig) -> Result<(BuiltEngine, Vec<ServedPolicy>)> {
    let served = cfg.server.served_policies(&cfg.cache.policy);
    let mut engine_cfg = cfg.clone();
    engine_cfg.cache.policy = served[0].policy.clone();
    let mut built = build_engine(&engine_cfg).with_context(|| format!("cache policy `{}`", served[0].name))?;
    let mut out = Vec::new();
    for (i, p) in served.iter().enumerate() {
        let factory = if i == 0 {
            built.engine.policy.clone()
        } else {
            let ctx = || format!("cache policy `{}`", p.name);
            registry().check_name(&p.policy).with_context(ctx)?;
            let table =
                resolve_policy_table(&p.policy, &mut built.engine.model, cfg.base_dir.as_deref()).with_context(ctx)?;
            let f = registry().build(&table).with_context(ctx)?;
            built.engine.check_policy(f.as_ref()).with_context(ctx)?;
            f
        };
        let description = p.description.clone().unwrap_or_else(|| factory.describe());
        out.push(ServedPolicy { name: p.name.clone(), description, factory });
    }
    Ok((built, out))
}

/// Serves `cfg` until SIGTERM or ctrl-c, then finishes (or, after the grace period, cancels) what
/// is in flight and returns.
pub fn serve(cfg: &EngineConfig) -> Result<()> {
    let s = cfg.server.clone();
    let (built, policies) = build_served(cfg)?;
    let BuiltEngine { engine, tokenizer, chat_template, .. } = built;
    let tokenizer = tokenizer.context("this model has no tokenizer; the server needs one")?;
    let chat_template = match &s.chat_template {
        None => chat_template,
        Some(path) => {
            let path = cfg.base_dir.as_deref().map_or_else(|| path.clone(), |d| d.join(path));
            let source = std::fs::read_to_string(&path)
                .with_context(|| format!("[server] chat_template: cannot read {}", path.display()))?;
            chat_template.with_source(source, path.display().to_string())?
        }
    };
    let reasoning_format = reasoning::ReasoningFormat::named(&s.reasoning_parser)?;
    let harmony = reasoning_format == Some(reasoning::ReasoningFormat::Harmony);
    let tool_format = match s.tool_parser.as_str() {
        // gpt-oss's calls live in headers that only the harmony splitter reads.
        "auto" => ToolFormat::detect(chat_template.source()).filter(|f| *f != ToolFormat::Harmony || harmony),
        name => ToolFormat::named(name)?,
    };
    let names: Vec<String> = policies.iter().map(|p| p.name.clone()).collect();
    let metrics = Arc::new(metrics::Metrics::new(&names).context("registering metrics")?);
    let mc = engine.model.config();
    let rows = (mc.num_layers * mc.num_kv_heads).max(1);
    let vocab_size = mc.vocab_size;
    let placement = Placement::choose(&engine, &policies, s.max_batch)?;
    let (max_sequence_tokens, pool_bytes, kv_place) =
        (placement.max_sequence_tokens, placement.pool_bytes, placement.describe());
    let (commands, inbox) = std::sync::mpsc::channel();
    let app = Arc::new(App {
        model_id: s.model_name.clone().unwrap_or_else(|| cfg.model.source.clone()),
        policies: policies.iter().map(|p| (p.name.clone(), p.description.clone())).collect(),
        tokenizer: tokenizer.clone(),
        chat_template,
        tool_format,
        tool_markers_special: tool_format.is_some_and(|f| f.markers_are_special(&tokenizer)),
        reasoning: reasoning_format,
        reasoning_markers_special: reasoning_format.is_some_and(|f| tool_calls::special_among(&tokenizer, f.markers())),
        grammars: Grammars::new(&tokenizer, vocab_size, &mc.eos_token_ids).map_err(|e| format!("{e:#}")),
        vocab_size,
        commands: commands.clone(),
        metrics: metrics.clone(),
        api_key: s.effective_api_key(),
        max_sequence_tokens,
        context_length: placement.context_length(mc),
        default_max_tokens: cfg.generation.max_tokens,
        max_tokens_cap: s.max_tokens_cap,
        max_outstanding: s.max_batch + s.max_waiting,
        outstanding: AtomicUsize::new(0),
        next_id: AtomicU64::new(0),
    });
    let setup = WorkerSetup {
        policies,
        tokenizer,
        metrics,
        max_batch: s.max_batch,
        timeout: Duration::from_secs(s.request_timeout_secs),
        grace: Duration::from_secs(s.shutdown_grace_secs),
        prefill_chunk: cfg.cache.prefill_chunk,
        rows,
        pool_bytes,
        prefix_cache: s.prefix_cache,
        prefill_budget: s.prefill_budget,
    };
    let (ready, started) = std::sync::mpsc::channel();
    let worker = std::thread::Builder::new()
        .name("dms-engine".into())
        .spawn(move || run_engine(engine, placement, setup, inbox, ready))
        .context("starting the engine thread")?;
    if let Err(e) = started.recv().unwrap_or_else(|_| Err(anyhow::anyhow!("the engine thread stopped while starting")))
    {
        let _ = worker.join();
        return Err(e);
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting tokio")?;
    let served = runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind((s.host.as_str(), s.port))
            .await
            .with_context(|| format!("cannot listen on {}:{}", s.host, s.port))?;
        let addr = listener.local_addr()?;
        println!(
            "dms serve: model `{}` on http://{addr} | policies: {} (default {}) | KV cache in the {kv_place} pool, {} \
             tokens per sequence at most | tool calls: {}{}",
            app.model_id,
            app.policies.iter().map(|p| p.0.as_str()).collect::<Vec<_>>().join(", "),
            app.policies[0].0,
            max_sequence_tokens.min(app.context_length),
            app.tool_format.map_or("none", ToolFormat::name),
            if app.api_key.is_some() { " | API key required" } else { "" },
        );
        use std::io::Write;
        std::io::stdout().flush()?;
        let router = routes::router(app.clone(), s.max_body_bytes);
        axum::serve(listener, router)
            .with_graceful_shutdown(async move {
                shutdown_signal().await;
                eprintln!("dms serve: shutting down (in-flight requests get {} s)", s.shutdown_grace_secs);
                let _ = commands.send(Command::Shutdown);
            })
            .await
            .context("serving HTTP")
    });
    drop(app);
    worker.join().map_err(|_| anyhow::anyhow!("the engine thread panicked"))?;
    served
}

/// The engine thread: builds the engine `placement` names (says so on `ready`, or why it could
/// not), then runs the worker on it.
fn run_engine(
    mut engine: Engine,
    placement: Placement,
    setup: WorkerSetup,
    inbox: std::sync::mpsc::Receiver<Command>,
    ready: std::sync::mpsc::Sender<Result<()>>,
) {
    #[cfg(feature = "cuda")]
    if let Some(shape) = placement.device {
        match crate::gpu::batch::DeviceEngine::new(&engine.model, shape) {
            Ok(mut device) => {
                let _ = ready.send(Ok(()));
                worker::run(&mut device, setup, inbox);
            }
            Err(e) => {
                let _ = ready.send(Err(e.context("allocating the device KV cache")));
            }
        }
        return;
    }
    #[cfg(not(feature = "cuda"))]
    let _ = placement;
    let _ = ready.send(Ok(()));
    worker::run(&mut engine, setup, inbox);
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}
