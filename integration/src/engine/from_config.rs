//! From an engine config to a running engine: the model, the policy and the pool, sized by one rule.

use std::path::Path;

use anyhow::{Context, Result};
use dms_policy::Registry;
use tokenizers::Tokenizer;

use crate::assets::resolve_model;
use crate::config::{open_device, open_graph_device, EngineConfig};
use crate::engine::{load_model, Engine, GenParams};
use crate::model::chat_template::ChatTemplate;
use crate::model::{Llama, Weights};

/// The policy registry the engine uses: every built-in policy.
pub fn registry() -> Registry {
    Registry::with_builtins()
}

/// An engine built from a config, with what the model ships beside its weights.
pub struct BuiltEngine {
    /// The engine, its pool sized as `[cache]` says.
    pub engine: Engine,
    /// The model's tokenizer, when it has one.
    pub tokenizer: Option<Tokenizer>,
    /// The model's chat template (plain ChatML when it ships none).
    pub chat_template: ChatTemplate,
    /// `[cache.policy]` completed from the model ([`resolve_policy_table`]).
    pub table: toml::Table,
}

/// Loads the model, builds the policy and sizes the pool as the config says.
pub fn build_engine(cfg: &EngineConfig) -> Result<BuiltEngine> {
    registry().check_name(&cfg.cache.policy).context("[cache.policy]")?;
    let device = match cfg.cache.cuda_graphs {
        true => open_graph_device(&cfg.model.device)?,
        false => open_device(&cfg.model.device)?,
    };
    let path = resolve_model(&cfg.model.source, cfg.base_dir.as_deref())?;
    let mut loaded =
        load_model(&path, &device, cfg.weight_form()?).with_context(|| format!("loading model {}", path.display()))?;
    cfg.model.apply_context(&mut loaded.model)?;
    let table = resolve_policy_table(&cfg.cache.policy, &mut loaded.model, cfg.base_dir.as_deref())?;
    if cfg.model.dtype == "bf16" {
        loaded.model = loaded.model.to_dtype(candle_core::DType::BF16)?;
    }
    let policy = registry().build(&table).context("[cache.policy]")?;
    let mc = loaded.model.config();
    let kv = cfg.kv_dtype()?;
    let slot_bytes = kv.slot_bytes(mc.head_dim, mc.value_dim());
    let blocks = cfg.capacity_blocks(mc.num_layers, mc.num_kv_heads, slot_bytes);
    let mut engine = Engine::new(loaded.model, policy, cfg.cache.block_size, blocks)?.with_kv_dtype(kv)?;
    engine.preemption = cfg.cache.preemption;
    engine.cuda_graphs = cfg.cache.cuda_graphs;
    let chat_template = loaded.chat_template.unwrap_or_else(ChatTemplate::chatml);
    Ok(BuiltEngine { engine, tokenizer: loaded.tokenizer, chat_template, table })
}

/// Completes a `dms` policy table (also one shadowed by `shadow`'s `inner`) from the model: loads
/// a configured adapter into the model, then fills `window`, `alpha_scale`, `alpha_offset` and
/// `disable_eviction` from the checkpoint's (or adapter's) `dms_*` fields where the config does
/// not set them, and reports which values it used.
pub fn resolve_policy_table(table: &toml::Table, model: &mut Llama, base: Option<&Path>) -> Result<toml::Table> {
    let mut table = table.clone();
    match table.get("name").and_then(|v| v.as_str()) {
        Some("dms") => {}
        Some("shadow") => {
            if let Some(toml::Value::Table(inner)) = table.get("inner") {
                let inner = resolve_policy_table(inner, model, base).context("shadow `inner`")?;
                table.insert("inner".into(), toml::Value::Table(inner));
            }
            return Ok(table);
        }
        _ => return Ok(table),
    }
    let adapter = match table.get("adapter").and_then(|v| v.as_str()) {
        Some(a) => {
            let dir = resolve_model(a, base).context("[cache.policy] adapter")?;
            load_adapter(&dir, a, model)?
        }
        None => Default::default(),
    };
    let f = model.config().dms.clone();
    let defaults: [(&str, Option<toml::Value>, bool); 4] = [
        ("window", f.dms_window_size.map(|x| toml::Value::Integer(x as i64)), adapter.dms_window_size.is_some()),
        ("alpha_scale", f.dms_alpha_scale.map(|x| toml::Value::Float(x as f64)), adapter.dms_alpha_scale.is_some()),
        (
            "alpha_offset",
            f.dms_initial_alpha_offset.map(|x| toml::Value::Float(x as f64)),
            adapter.dms_initial_alpha_offset.is_some(),
        ),
        ("disable_eviction", f.dms_disable_eviction.map(toml::Value::Boolean), adapter.dms_disable_eviction.is_some()),
    ];
    let mut used = Vec::new();
    for (key, value, from_adapter) in defaults {
        match (table.get(key), value) {
            (Some(v), _) => used.push(format!("{key} = {v} (engine config)")),
            (None, Some(v)) => {
                let source = if from_adapter { "adapter" } else { "model checkpoint" };
                used.push(format!("{key} = {v} ({source})"));
                table.insert(key.into(), v);
            }
            (None, None) => {}
        }
    }
    eprintln!("dms policy values: {}", used.join(", "));
    Ok(table)
}

/// Loads an adapter in NVIDIA's DMS format: a directory with `config.json` (its `dms_*` fields)
/// and safetensors holding `model.layers.N.self_attn.dms_proj_alpha{,_norm}.weight` (and, when
/// `config.json` sets `lora_rank` and `lora_alpha`, a LoRA on `q/k/v/o_proj`), attached
/// under `key` (the `adapter` value policies name it by) beside any others. The model's `dms_*`
/// fields take the adapter's where it sets them; returns the adapter's own fields.
pub fn load_adapter(dir: &Path, key: &str, model: &mut Llama) -> Result<crate::model::config::DmsCheckpointFields> {
    let cfg_text = std::fs::read_to_string(dir.join("config.json"))
        .with_context(|| format!("adapter directory {} has no readable config.json", dir.display()))?;
    let fields: crate::model::config::DmsCheckpointFields =
        serde_json::from_str(&cfg_text).with_context(|| format!("{}/config.json", dir.display()))?;
    if fields.dms_separate_alpha == Some(false) {
        anyhow::bail!(
            "adapter {}: dms_separate_alpha is false, but an adapter file must hold dms_proj_alpha tensors",
            dir.display()
        );
    }
    let w = Weights::open_safetensors_dir(dir).with_context(|| format!("adapter {}", dir.display()))?;
    let per_layer = fields.dms_alpha_per.as_deref().or(model.config().dms.dms_alpha_per.as_deref()) == Some("layer");
    model.attach_adapter(key, &w, false, per_layer).with_context(|| format!("adapter {}", dir.display()))?;
    let lora: crate::model::lora::LoraFields =
        serde_json::from_str(&cfg_text).with_context(|| format!("{}/config.json", dir.display()))?;
    if let Some((rank, alpha)) = lora.rank_alpha().with_context(|| format!("adapter {}", dir.display()))? {
        let (cfg, device, dtype) = (model.config().clone(), model.device().clone(), model.dtype());
        let lora = crate::model::lora::AttentionLora::load(&w, &cfg, rank, alpha, &device, dtype)
            .with_context(|| format!("adapter {}: its LoRA", dir.display()))?;
        model.attach_lora(key, lora).with_context(|| format!("adapter {}", dir.display()))?;
    }
    let d = model.dms_fields_mut();
    let merged = crate::model::config::DmsCheckpointFields {
        dms_window_size: fields.dms_window_size.or(d.dms_window_size),
        dms_alpha_scale: fields.dms_alpha_scale.or(d.dms_alpha_scale),
        dms_initial_alpha_offset: fields.dms_initial_alpha_offset.or(d.dms_initial_alpha_offset),
        dms_separate_alpha: Some(true),
        dms_alpha_per: fields.dms_alpha_per.clone().or(d.dms_alpha_per.clone()),
        dms_disable_eviction: fields.dms_disable_eviction.or(d.dms_disable_eviction),
    };
    *d = merged;
    Ok(fields)
}

/// Generation settings from the config.
pub fn gen_params(cfg: &EngineConfig) -> GenParams {
    let g = &cfg.generation;
    GenParams {
        max_tokens: g.max_tokens,
        temperature: g.temperature,
        top_p: g.top_p,
        seed: g.seed,
        stop_at_eos: g.stop_at_eos,
        prefill_chunk: cfg.cache.prefill_chunk,
        top_k: g.top_k,
        min_p: g.min_p,
        ..Default::default()
    }
}
