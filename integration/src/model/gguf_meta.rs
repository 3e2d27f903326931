//! The model config of a GGUF file, read from its metadata as llama.cpp's converter writes it:
//! the Llama family (`llama`, with experts for Mixtral; `qwen2`, `qwen2moe`, `qwen3`, `qwen3moe`)
//! and DeepSeek V2/V3 (`deepseek2`, latent attention with dense or MoE MLPs), Phi-3, Gemma 2/3,
//! SmolLM3, Granite and GPT-OSS (`gpt-oss`).

use anyhow::{bail, Context, Result};
use candle_core::quantized::gguf_file::{Content, Value};

use super::config::{
    model_windows, served_context, Arch, DmsCheckpointFields, GemmaConfig, GraniteScales, LongRopeScaling, MlaConfig,
    ModelConfig, MoeConfig, OaiExperts, RopeScaling, YarnScaling, MAX_LAYERS,
};

fn meta<'a>(c: &'a Content, key: &str) -> Result<&'a Value> {
    c.metadata.get(key).with_context(|| format!("GGUF metadata key `{key}` is missing"))
}

/// A string of the GGUF metadata.
pub(crate) fn meta_str(c: &Content, key: &str) -> Result<String> {
    Ok(meta(c, key)?.to_string().map_err(|e| anyhow::anyhow!("GGUF `{key}`: {e}"))?.clone())
}

/// An unsigned integer of the GGUF metadata, whatever its integer type.
pub(crate) fn meta_usize(c: &Content, key: &str) -> Result<usize> {
    let v = meta(c, key)?;
    let x = match v {
        Value::U8(x) => Some(u64::from(*x)),
        Value::U16(x) => Some(u64::from(*x)),
        Value::U32(x) => Some(u64::from(*x)),
        Value::U64(x) => Some(*x),
        Value::I8(x) => u64::try_from(*x).ok(),
        Value::I16(x) => u64::try_from(*x).ok(),
        Value::I32(x) => u64::try_from(*x).ok(),
        Value::I64(x) => u64::try_from(*x).ok(),
        _ => None,
    };
    x.and_then(|x| usize::try_from(x).ok())
        .with_context(|| format!("GGUF `{key}` is {v:?}, not a non-negative integer"))
}

/// An optional integer key: absent is `None`, present but not a non-negative integer an error.
fn meta_opt_usize(c: &Content, key: &str) -> Result<Option<usize>> {
    c.metadata.get(key).map(|_| meta_usize(c, key)).transpose()
}

/// An optional number of the GGUF metadata, floating-point or integer.
fn meta_f64(c: &Content, key: &str) -> Result<Option<f64>> {
    match c.metadata.get(key) {
        None => Ok(None),
        Some(Value::F32(x)) => Ok(Some(f64::from(*x))),
        Some(Value::F64(x)) => Ok(Some(*x)),
        Some(_) => Ok(Some(meta_usize(c, key).with_context(|| format!("GGUF `{key}` is not a number"))? as f64)),
    }
}

fn meta_bool(c: &Content, key: &str) -> Result<Option<bool>> {
    c.metadata.get(key).map(|v| v.to_bool().map_err(|e| anyhow::anyhow!("GGUF `{key}`: {e}"))).transpose()
}

/// Tokens llama.cpp stops at by their text, whatever the metadata names: the turn-ending ones
/// (Phi-3's `<|end|>` beside its `<|endoftext|>`, Qwen's `<|im_end|>`, Llama 3's `<|eot_id|>`)
/// and the fill-in-the-middle pad, repository and file-separator tokens (SmolLM2's
/// `<reponame>`). llama.cpp takes the first of each fill-in-the-middle kind it finds; a
/// vocabulary holding two names of one kind stops at both here.
const END_OF_GENERATION_TEXTS: [&str; 22] = [
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|eom_id|>",
    "<EOT>",
    "_<EOT>",
    "<|end_of_text|>",
    "<end_of_utterance>",
    "<\u{ff5c}end\u{2581}of\u{2581}sentence\u{ff5c}>",
    "<|fim_pad|>",
    "<fim-pad>",
    "<fim_pad>",
    "<PAD>",
    "[PAD]",
    "<|fim_repo|>",
    "<|repo_name|>",
    "<fim-repo>",
    "<REPO>",
    "<reponame>",
    "<|file_sep|>",
];

/// The tokens that end generation, as llama.cpp's `llama_vocab_is_eog` gives them: the
/// end-of-sequence, end-of-turn and fill-in-the-middle tokens the metadata names
/// (`tokenizer.ggml.eos_token_id`, `eot_token_id`, `fim_pad_token_id`, `fim_rep_token_id`,
/// `fim_sep_token_id`) and the vocabulary's [`END_OF_GENERATION_TEXTS`].
fn stop_tokens(c: &Content) -> Vec<u32> {
    let mut ids = Vec::new();
    let keys = ["eos_token_id", "eot_token_id", "fim_pad_token_id", "fim_rep_token_id", "fim_sep_token_id"];
    for key in keys.map(|k| format!("tokenizer.ggml.{k}")) {
        if let Some(id) = meta_usize(c, &key).ok().and_then(|x| u32::try_from(x).ok()) {
            if !ids.contains(&id) {
                ids.push(id);
            }
        }
    }
    let tokens = c.metadata.get("tokenizer.ggml.tokens").and_then(|v| v.to_vec().ok());
    for (i, t) in tokens.into_iter().flatten().enumerate() {
        let named = t.to_string().is_ok_and(|s| END_OF_GENERATION_TEXTS.contains(&s.as_str()));
        if let (true, Ok(id)) = (named, u32::try_from(i)) {
            if !ids.contains(&id) {
                ids.push(id);
            }
        }
    }
    ids
}

/// The short-context LongRoPE table of a `phi3` file (Phi-3 128K, Phi-3.5).
pub(crate) const LONGROPE_SHORT: &str = "rope_factors_short.weight";
/// Its long-context table.
pub(crate) const LONGROPE_LONG: &str = "rope_factors_long.weight";

/// The LongRoPE of a `phi3` file whose `rope_factors_short` and `rope_factors_long` tables hold
/// `short_factor` and `long_factor` (read by the caller with the tensors): the attention factor
/// (`rope.scaling.attn_factor`), the original context (`rope.scaling.original_context_length`)
/// and the declared one (`context_length`), as llama.cpp's converter writes them.
pub(crate) fn longrope(c: &Content, short_factor: Vec<f64>, long_factor: Option<Vec<f64>>) -> Result<LongRopeScaling> {
    let a = meta_str(c, "general.architecture")?;
    let context = meta_opt_usize(c, &format!("{a}.context_length"))?.unwrap_or(4096);
    let original = meta_opt_usize(c, &format!("{a}.rope.scaling.original_context_length"))?.unwrap_or(context);
    let attention_factor = meta_f64(c, &format!("{a}.rope.scaling.attn_factor"))?.unwrap_or(1.0);
    Ok(LongRopeScaling {
        short_factor,
        long_factor,
        attention_factor,
        original_max_position_embeddings: original,
        max_position_embeddings: context,
    })
}

/// Model config from GGUF metadata.
pub(crate) fn model_config(c: &Content) -> Result<ModelConfig> {
    let a = meta_str(c, "general.architecture")?;
    let arch = match a.as_str() {
        "llama" | "smollm3" | "granite" => Arch::Llama,
        "qwen2" | "qwen2moe" => Arch::Qwen2,
        "qwen3" | "qwen3moe" => Arch::Qwen3,
        "deepseek2" => Arch::DeepSeek,
        "phi3" => Arch::Phi3,
        "gemma2" => Arch::Gemma2,
        "gemma3" => Arch::Gemma3,
        "gpt-oss" => Arch::GptOss,
        other => {
            bail!(
                "GGUF architecture `{other}` is not supported (supported: llama, smollm3, granite, phi3, qwen2, qwen2moe, qwen3, qwen3moe, deepseek2, gemma2, gemma3, gpt-oss)"
            )
        }
    };
    let hidden = meta_usize(c, &format!("{a}.embedding_length"))?;
    let heads = meta_usize(c, &format!("{a}.attention.head_count"))?;
    let mla = if arch == Arch::DeepSeek { Some(latent_attention(c, &a)?) } else { None };
    let (kv, head_dim, partial_rotary_dim) = match &mla {
        Some(m) => (1, m.kv_lora_rank + m.qk_rope_head_dim, None),
        None => {
            let kv = meta_opt_usize(c, &format!("{a}.attention.head_count_kv"))?.unwrap_or(heads);
            let head_dim = meta_opt_usize(c, &format!("{a}.attention.key_length"))?.unwrap_or(hidden / heads.max(1));
            // RoPE over the first `rot` channels of each head (Phi-4-mini's 96 of 128).
            let rot = meta_opt_usize(c, &format!("{a}.rope.dimension_count"))?;
            if let Some(r) = rot.filter(|&r| r == 0 || r % 2 == 1 || r > head_dim) {
                bail!(
                    "GGUF `{a}.rope.dimension_count` = {r}: RoPE needs an even count of at most the head's {head_dim}"
                );
            }
            // A `llama` file's q/k rows are permuted for llama.cpp's interleaved rotation over the
            // whole head; undoing that over part of a head is not defined here.
            if let Some(r) = rot.filter(|&r| r < head_dim && matches!(a.as_str(), "llama" | "smollm3" | "granite")) {
                bail!("GGUF `{a}.rope.dimension_count` = {r}: RoPE over part of a head ({head_dim}) is not supported in `llama` files");
            }
            if let Some(n) = meta_opt_usize(c, &format!("{a}.expert_count"))?.filter(|&n| n > 0 && !has_experts(&a)) {
                bail!("GGUF `{a}.expert_count` = {n}: experts are read for llama, qwen2moe, qwen3moe, gpt-oss and deepseek2 files only");
            }
            (kv, head_dim, rot.filter(|&r| r < head_dim))
        }
    };
    let vocab = match c.metadata.get("tokenizer.ggml.tokens") {
        Some(v) => v.to_vec().map_err(|e| anyhow::anyhow!("GGUF tokens: {e}"))?.len(),
        None => c
            .tensor_infos
            .get("token_embd.weight")
            .and_then(|i| i.shape.dims().first().copied())
            .context("cannot tell the vocabulary size")?,
    };
    let context = meta_opt_usize(c, &format!("{a}.context_length"))?.unwrap_or(4096);
    // LongRoPE rescales every frequency by these tables, so plain RoPE would be silently wrong at
    // any length: only a `phi3` file's tables are read (with the tensors, see `longrope`), the
    // short one required.
    let longrope = arch == Arch::Phi3 && c.tensor_infos.contains_key(LONGROPE_SHORT);
    let tables = [LONGROPE_LONG, LONGROPE_SHORT];
    if let Some(t) = tables.iter().find(|t| c.tensor_infos.contains_key(**t)).filter(|_| !longrope) {
        bail!("GGUF tensor `{t}`: LongRoPE scaling is supported in `phi3` files with `{LONGROPE_SHORT}` only");
    }
    // llama.cpp multiplies the rotary tables by this (Phi-3's LongRoPE); the others never set it.
    let attn_key = format!("{a}.rope.scaling.attn_factor");
    if let Some(x) = meta_f64(c, &attn_key)?.filter(|&x| x != 1.0 && !longrope) {
        bail!("GGUF `{attn_key}` = {x} is not supported (only 1, or with a `phi3` file's LongRoPE)");
    }
    // llama.cpp stores Llama 3's RoPE scaling as per-frequency factors (`rope_freqs.weight`, read
    // with the tensors), linear scaling and YaRN under `rope.scaling.*`.
    let rope_scaling = match (&mla, scaling_type(c, &a).as_deref()) {
        (Some(_), _) | (None, None) => None,
        (None, Some("linear")) => {
            let key = format!("{a}.rope.scaling.factor");
            Some(RopeScaling::Linear(meta_f64(c, &key)?.with_context(|| format!("GGUF `{key}` is missing"))?))
        }
        // GPT-OSS's own YaRN keeps the ramp's ends fractional (its config's `truncate: false`,
        // which the converter drops); llama.cpp rounds them as for every other file.
        (None, Some("yarn")) => {
            Some(RopeScaling::Yarn(YarnScaling { truncate: arch != Arch::GptOss, ..plain_yarn(c, &a, context)? }))
        }
        (None, Some(kind)) => bail!(
            "GGUF `{a}.rope.scaling.type` = `{kind}` is not supported (supported: linear, yarn); use the model's HF \
             directory, whose config.json rope_scaling is"
        ),
    };
    if longrope && rope_scaling.is_some() {
        bail!("GGUF file has both LongRoPE tables and `{a}.rope.scaling.type`: which scaling applies is unclear");
    }
    let served = served_context(context, rope_scaling.as_ref());
    // llama.cpp reads MLP biases where a file has them; the MLP here has none.
    if let Some(t) = ["ffn_gate", "ffn_up", "ffn_down"]
        .map(|f| format!("blk.0.{f}.bias"))
        .into_iter()
        .find(|t| c.tensor_infos.contains_key(t))
    {
        bail!("GGUF tensor `{t}`: MLP biases are not supported");
    }
    let layers = meta_usize(c, &format!("{a}.block_count"))?;
    // Per-layer flags are allocated from this count: bound it before anything is (no model has
    // a thousandth of this many layers).
    if layers > MAX_LAYERS {
        bail!("GGUF `{a}.block_count` = {layers} is above the {MAX_LAYERS} layers supported");
    }
    let (window, windowed) = windowed_layers(c, &a, arch, layers)?;
    let gemma = match arch {
        Arch::Gemma2 | Arch::Gemma3 => Some(GemmaConfig {
            // llama.cpp's choice (the converter writes no `query_pre_attn_scalar`): the head
            // width, but the hidden size per head for the 27B models (46 layers in Gemma 2, 62
            // in Gemma 3).
            query_pre_attn_scalar: if layers == if arch == Arch::Gemma2 { 46 } else { 62 } {
                (hidden / heads.max(1)) as f64
            } else {
                head_dim as f64
            },
            local_rope_theta: local_rope_theta(c, &a, arch)?,
            local_layers: windowed.clone(),
            // llama.cpp caps a `gemma2` file's attention scores (50 unless it says otherwise),
            // never a `gemma3` file's; the logits at 30 for `gemma2` and 0 (none) for `gemma3`.
            attn_softcap: match arch {
                Arch::Gemma2 => softcap(c, &a, "attn_logit_softcapping", 50.0)?,
                _ => None,
            },
            final_softcap: softcap(c, &a, "final_logit_softcapping", if arch == Arch::Gemma2 { 30.0 } else { 0.0 })?,
        }),
        _ => None,
    };
    if let Some(g) = gemma.as_ref().filter(|g| g.query_pre_attn_scalar <= 0.0) {
        bail!("GGUF `{a}`: an attention scale of 1 / sqrt({}) (embedding length / heads)", g.query_pre_attn_scalar);
    }
    let windows = model_windows(window, windowed, served, &format!("GGUF `{a}.attention.sliding_window`"))?;
    let cfg = ModelConfig {
        arch,
        vocab_size: vocab,
        hidden_size: hidden,
        intermediate_size: meta_usize(c, &format!("{a}.feed_forward_length"))?,
        num_layers: layers,
        num_heads: heads,
        num_kv_heads: kv,
        head_dim,
        rope_theta: meta_f64(c, &format!("{a}.rope.freq_base"))?.unwrap_or(10_000.0),
        partial_rotary_dim,
        nope_layers: nope_layers(c, &a, layers)?,
        rope_scaling,
        rms_norm_eps: meta_f64(c, &format!("{a}.attention.layer_norm_rms_epsilon"))?.unwrap_or(1e-5),
        tie_word_embeddings: !c.tensor_infos.contains_key("output.weight"),
        attention_bias: c.tensor_infos.contains_key("blk.0.attn_q.bias"),
        qk_norm: matches!(arch, Arch::Qwen3 | Arch::Gemma3),
        max_position_embeddings: served,
        windows,
        gemma,
        granite: granite_scales(c, &a, head_dim)?,
        bos_token_id: meta_usize(c, "tokenizer.ggml.bos_token_id").ok().and_then(|x| u32::try_from(x).ok()),
        eos_token_ids: stop_tokens(c),
        dms: DmsCheckpointFields::default(),
        mla,
        moe: match arch {
            Arch::DeepSeek => experts(c, &a)?,
            Arch::GptOss => Some(gpt_oss_experts(c, &a)?),
            _ if has_experts(&a) => softmax_experts(c, &a)?,
            _ => None,
        },
        fp8: None,
    };
    cfg.validate()?;
    Ok(cfg)
}

/// Layers without RoPE: llama.cpp's `smollm3` every fourth (a step no key sets), a `granite`
/// file's every layer when `rope.scaling.finetuned` is false (its switch for RoPE).
fn nope_layers(c: &Content, a: &str, layers: usize) -> Result<Vec<bool>> {
    Ok(match a {
        "smollm3" => (0..layers).map(|i| (i + 1) % 4 == 0).collect(),
        "granite" if meta_bool(c, &format!("{a}.rope.scaling.finetuned"))? == Some(false) => vec![true; layers],
        _ => vec![],
    })
}

/// A `granite` file's multipliers as llama.cpp reads them: `logit_scale`, `residual_scale`,
/// `embedding_scale` (absent or 0: none) and `attention.scale` (absent or 0: `head_dim^-1/2`).
fn granite_scales(c: &Content, a: &str, head_dim: usize) -> Result<Option<GraniteScales>> {
    if a != "granite" {
        return Ok(None);
    }
    let read = |key: &str, none: f64| -> Result<f64> {
        let k = format!("{a}.{key}");
        let x = meta_f64(c, &k)?.unwrap_or(0.0);
        if !(x.is_finite() && x >= 0.0) {
            bail!("GGUF `{k}` = {x}: a Granite multiplier must be positive");
        }
        Ok(if x > 0.0 { x } else { none })
    };
    Ok(Some(GraniteScales {
        embedding: read("embedding_scale", 1.0)?,
        residual: read("residual_scale", 1.0)?,
        attention: read("attention.scale", 1.0 / (head_dim as f64).sqrt())?,
        logits: read("logit_scale", 1.0)?,
    }))
}

/// A Gemma file's soft-capping `{a}.{key}` (llama.cpp's `default` when absent; 0 is none).
fn softcap(c: &Content, a: &str, key: &str, default: f64) -> Result<Option<f64>> {
    let x = meta_f64(c, &format!("{a}.{key}"))?.unwrap_or(default);
    if !(x.is_finite() && x >= 0.0) {
        bail!("GGUF `{a}.{key}` = {x}: a soft-capping must be positive");
    }
    Ok((x > 0.0).then_some(x))
}

/// The local layers' RoPE base: a `gemma3` file's `rope.freq_base_swa` (10000 when absent, as in
/// llama.cpp). A `gemma2` file's local layers rotate as its global ones: a different
/// `rope.freq_base_swa` there is refused.
fn local_rope_theta(c: &Content, a: &str, arch: Arch) -> Result<Option<f64>> {
    let key = format!("{a}.rope.freq_base_swa");
    let local = meta_f64(c, &key)?;
    if let Some(x) = local.filter(|x| !(x.is_finite() && *x > 0.0)) {
        bail!("GGUF `{key}` = {x}: a RoPE base must be positive");
    }
    if arch == Arch::Gemma3 {
        return Ok(Some(local.unwrap_or(10_000.0)));
    }
    let global = meta_f64(c, &format!("{a}.rope.freq_base"))?.unwrap_or(10_000.0);
    match local.filter(|&x| x != global) {
        Some(x) => bail!("GGUF `{key}` = {x}: a `{a}` file's local layers with their own RoPE base are not supported"),
        None => Ok(None),
    }
}

/// Which layers a Gemma file's window covers: `attention.sliding_window_pattern` as one flag per
/// layer, or as a period `n` (layer `i` local iff `i % n < n - 1`; 0: every layer), else
/// `default` as the period (llama.cpp's reading).
fn swa_pattern(c: &Content, a: &str, layers: usize, default: usize) -> Result<Vec<bool>> {
    let key = format!("{a}.attention.sliding_window_pattern");
    let n = match c.metadata.get(&key) {
        None => default,
        Some(Value::Array(flags)) => {
            let flags = flags
                .iter()
                .map(|f| f.to_bool().map_err(|e| anyhow::anyhow!("GGUF `{key}`: {e}")))
                .collect::<Result<Vec<bool>>>()?;
            if flags.len() != layers {
                bail!("GGUF `{key}` has {} flags for {layers} layers", flags.len());
            }
            return Ok(flags);
        }
        Some(_) => meta_usize(c, &key)?,
    };
    Ok((0..layers).map(|i| n == 0 || i % n < n - 1).collect())
}

/// The attention window and the layers it covers: Phi-3's `attention.sliding_window` on every
/// layer (as its config.json's), Gemma 3's on every layer but each sixth (llama.cpp's default
/// pattern for `gemma3`, whose local layers these are; a `gemma3` file without it is refused),
/// Gemma 2's on every other layer from the first (llama.cpp's default pattern and window, 4096),
/// GPT-OSS's on every other layer from the first (required, as llama.cpp requires it); a file's
/// own `attention.sliding_window_pattern` wins.
fn windowed_layers(c: &Content, a: &str, arch: Arch, layers: usize) -> Result<(Option<usize>, Vec<bool>)> {
    let key = format!("{a}.attention.sliding_window");
    let mut window = meta_opt_usize(c, &key)?.filter(|&w| w > 0);
    if arch == Arch::Gemma2 {
        if c.metadata.contains_key(&key) && window.is_none() {
            bail!("GGUF `{key}` is 0: a `gemma2` file's local layers need a window");
        }
        window = window.or(Some(4096));
    }
    if matches!(arch, Arch::Gemma3 | Arch::GptOss) && window.is_none() {
        bail!("GGUF `{key}` is missing or 0: a `{a}` file needs its local layers' window (llama.cpp requires it too)");
    }
    let flags = match (arch, window) {
        (Arch::Phi3, Some(_)) => vec![true; layers],
        (Arch::Gemma3, Some(_)) => swa_pattern(c, a, layers, 6)?,
        (Arch::Gemma2 | Arch::GptOss, Some(_)) => swa_pattern(c, a, layers, 2)?,
        _ => vec![false; layers],
    };
    Ok((window, flags))
}

/// `{a}.rope.scaling.type` when it names a scaling (not absent, not `none`).
fn scaling_type(c: &Content, a: &str) -> Option<String> {
    c.metadata
        .get(&format!("{a}.rope.scaling.type"))
        .and_then(|v| v.to_string().ok())
        .filter(|k| k.as_str() != "none")
        .cloned()
}

/// Latent attention, experts and YaRN of a `deepseek2` file. Files converted since llama.cpp
/// split `kv_b` (`attention.key_length_mla` present: keys and values are the latent row, one KV
/// head) carry the per-head sizes under `*_mla`; older files under `key_length`/`value_length`.
fn latent_attention(c: &Content, a: &str) -> Result<MlaConfig> {
    let key = |k: &str| format!("{a}.{k}");
    let rope = meta_usize(c, &key("rope.dimension_count"))?;
    let rank = meta_usize(c, &key("attention.kv_lora_rank"))?;
    let (qk, v) = match meta_opt_usize(c, &key("attention.key_length_mla"))? {
        Some(k) => (k, meta_usize(c, &key("attention.value_length_mla"))?),
        None => (meta_usize(c, &key("attention.key_length"))?, meta_usize(c, &key("attention.value_length"))?),
    };
    if rope == 0 || rope % 2 != 0 || qk <= rope || v == 0 || rank == 0 {
        bail!(
            "GGUF latent attention sizes are inconsistent: key {qk} (of which RoPE {rope}, even and smaller), value \
             {v}, kv_lora_rank {rank}"
        );
    }
    Ok(MlaConfig {
        q_lora_rank: meta_opt_usize(c, &key("attention.q_lora_rank"))?.filter(|&r| r > 0),
        kv_lora_rank: rank,
        qk_nope_head_dim: qk - rope,
        qk_rope_head_dim: rope,
        v_head_dim: v,
        // The converter keeps DeepSeek's interleaved RoPE pairs (llama.cpp's NORM rotation).
        rope_interleave: true,
        yarn: yarn(c, a)?,
    })
}

/// The ramp of YaRN from `rope.scaling.*`, as llama.cpp reads it: `factor`, the original context
/// (`original_context_length`, else `context`) and the betas (32 and 1 by default), the mscale
/// pair left at (1, 0). A `yarn_ext_factor` other than 1 (llama.cpp's partial blend, which
/// transformers does not have) is refused.
fn yarn_ramp(c: &Content, a: &str, context: usize) -> Result<YarnScaling> {
    let key = |k: &str| format!("{a}.rope.scaling.{k}");
    if let Some(x) = meta_f64(c, &key("yarn_ext_factor"))?.filter(|&x| x != 1.0) {
        bail!("GGUF `{}` = {x} is not supported (only 1)", key("yarn_ext_factor"));
    }
    Ok(YarnScaling {
        factor: meta_f64(c, &key("factor"))?.with_context(|| format!("GGUF `{}` is missing", key("factor")))?,
        original_max_position_embeddings: meta_opt_usize(c, &key("original_context_length"))?.unwrap_or(context) as f64,
        beta_fast: meta_f64(c, &key("yarn_beta_fast"))?.unwrap_or(32.0),
        beta_slow: meta_f64(c, &key("yarn_beta_slow"))?.unwrap_or(1.0),
        mscale: 1.0,
        mscale_all_dim: 0.0,
        attention_factor: None,
        truncate: true,
    })
}

/// YaRN of a Llama-family file (`llama`, `qwen2*`, `qwen3*`) as llama.cpp applies it: betas 32
/// and 1, the rotary tables scaled by `0.1 ln(factor) + 1`. llama.cpp reads no other YaRN key
/// for these architectures, so a file that sets one (`yarn_attn_factor`, which the converter
/// copies from config.json's `attention_factor`; other betas; DeepSeek's `yarn_log_multiplier`)
/// is refused rather than run differently from llama.cpp: its HF directory carries the meaning.
fn plain_yarn(c: &Content, a: &str, context: usize) -> Result<YarnScaling> {
    let key = |k: &str| format!("{a}.rope.scaling.{k}");
    for k in ["yarn_log_multiplier", "yarn_attn_factor"] {
        if meta_f64(c, &key(k))?.is_some() {
            bail!("GGUF `{}` is not read for {a} files by llama.cpp; use the model's HF directory", key(k));
        }
    }
    let y = yarn_ramp(c, a, context)?;
    if (y.beta_fast, y.beta_slow) != (32.0, 1.0) {
        bail!(
            "GGUF YaRN betas ({}, {}) of a {a} file: llama.cpp applies 32 and 1 to these files; use the model's HF \
             directory",
            y.beta_fast,
            y.beta_slow
        );
    }
    y.check()?;
    Ok(y)
}

/// YaRN of a `deepseek2` file. The converter writes DeepSeek's `mscale_all_dim` as
/// `yarn_log_multiplier` (times 0.1) and drops `mscale`, which llama.cpp takes to be equal to it
/// (as in every DeepSeek config: 0.707 for V2, 1 for V3).
fn yarn(c: &Content, a: &str) -> Result<Option<YarnScaling>> {
    let key = |k: &str| format!("{a}.rope.scaling.{k}");
    match scaling_type(c, a).as_deref() {
        None => return Ok(None),
        Some("yarn") => {}
        Some(other) => bail!("GGUF `{}` = `{other}` is not supported for deepseek2 (supported: yarn)", key("type")),
    }
    if let Some(x) = meta_f64(c, &key("yarn_attn_factor"))?.filter(|&x| x != 1.0) {
        bail!("GGUF `{}` = {x} is not supported (only 1)", key("yarn_attn_factor"));
    }
    let log_mul = meta_f64(c, &key("yarn_log_multiplier"))?.with_context(|| {
        format!("GGUF YaRN scaling without `{}` (DeepSeek's mscale_all_dim)", key("yarn_log_multiplier"))
    })?;
    let context = meta_opt_usize(c, &format!("{a}.context_length"))?.unwrap_or(4096);
    let mscale = log_mul / 0.1;
    let y = YarnScaling { mscale, mscale_all_dim: mscale, ..yarn_ramp(c, a, context)? };
    y.check()?;
    Ok(Some(y))
}

/// The experts of a `deepseek2` file, when `expert_count` > 0. llama.cpp's gating function is
/// softmax (V2) or sigmoid (V3, with `exp_probs_b`, DeepSeek's `noaux_tc`); expert groups under
/// softmax are DeepSeek-V2's `group_limited_greedy`.
fn experts(c: &Content, a: &str) -> Result<Option<MoeConfig>> {
    let key = |k: &str| format!("{a}.{k}");
    let n = meta_opt_usize(c, &key("expert_count"))?.unwrap_or(0);
    if n == 0 {
        return Ok(None);
    }
    let width_key = key("expert_feed_forward_length");
    if matches!(c.metadata.get(&width_key), Some(Value::Array(_))) {
        bail!("GGUF `{width_key}` is per layer: experts of different widths are not supported");
    }
    let scoring = match meta_opt_usize(c, &key("expert_gating_func"))? {
        None | Some(1) => "softmax",
        Some(2) => "sigmoid",
        Some(other) => {
            bail!("GGUF `{}` = {other} is not supported (1: softmax, 2: sigmoid)", key("expert_gating_func"))
        }
    };
    let n_group = meta_opt_usize(c, &key("expert_group_count"))?.unwrap_or(1).max(1);
    let topk_method = match (scoring, n_group) {
        ("sigmoid", _) => "noaux_tc",
        (_, 1) => "greedy",
        _ => "group_limited_greedy",
    };
    let m = MoeConfig {
        n_routed_experts: n,
        n_shared_experts: meta_opt_usize(c, &key("expert_shared_count"))?.unwrap_or(0),
        gated_shared_width: None,
        num_experts_per_tok: meta_usize(c, &key("expert_used_count"))?,
        moe_intermediate_size: meta_usize(c, &width_key)?,
        first_k_dense_replace: meta_opt_usize(c, &key("leading_dense_block_count"))?.unwrap_or(0),
        moe_layer_freq: 1,
        mlp_only_layers: vec![],
        norm_topk_prob: meta_bool(c, &key("expert_weights_norm"))?.unwrap_or(false),
        routed_scaling_factor: meta_f64(c, &key("expert_weights_scale"))?.unwrap_or(1.0),
        scoring_func: scoring.into(),
        topk_method: topk_method.into(),
        n_group,
        topk_group: meta_opt_usize(c, &key("expert_group_used_count"))?.unwrap_or(1).max(1),
        oai: None,
    };
    m.check()?;
    Ok(Some(m))
}

/// Whether llama.cpp reads experts for this (non-DeepSeek) architecture: `qwen2moe`,
/// `qwen3moe`, and `llama` (Mixtral's files keep that architecture and add `expert_count`).
fn has_experts(a: &str) -> bool {
    matches!(a, "llama" | "qwen2moe" | "qwen3moe" | "gpt-oss")
}

/// The experts of a `gpt-oss` file as llama.cpp runs them: a softmax over the
/// `expert_used_count` best of `expert_count` biased router logits, every layer MoE, experts
/// `expert_feed_forward_length` wide with the clamped SwiGLU at llama.cpp's fixed limit of 7
/// (the published models' `swiglu_limit`; the converter writes no key for it).
fn gpt_oss_experts(c: &Content, a: &str) -> Result<MoeConfig> {
    let key = |k: &str| format!("{a}.{k}");
    let used_key = key("expert_used_count");
    let m = MoeConfig::softmax_top_k(
        meta_usize(c, &key("expert_count"))?,
        meta_usize(c, &used_key)?,
        meta_usize(c, &key("expert_feed_forward_length"))?,
        true,
    )
    .with_context(|| format!("GGUF `{used_key}`, `{a}.expert_count`"))?;
    Ok(MoeConfig { oai: Some(OaiExperts::with_limit(7.0)?), ..m })
}

/// The experts of a `qwen2moe` or `qwen3moe` file, or of a `llama` file that has them
/// (Mixtral), routed as llama.cpp routes them: softmax over `expert_count`, the
/// `expert_used_count` best, renormalised (never for `qwen2moe`), every layer MoE. An expert is
/// `expert_feed_forward_length` wide (`qwen*moe`) or `feed_forward_length` (`llama`, where
/// llama.cpp reads no other width); `qwen2moe` adds a gated shared expert of
/// `expert_shared_feed_forward_length` (else `feed_forward_length`). Keys that llama.cpp ignores
/// for these architectures, and that would change the model if honoured (shared experts
/// elsewhere, leading dense layers, another gating function, groups, a weight scale, another
/// expert width), are refused.
fn softmax_experts(c: &Content, a: &str) -> Result<Option<MoeConfig>> {
    let key = |k: &str| format!("{a}.{k}");
    let n = meta_opt_usize(c, &key("expert_count"))?.unwrap_or(0);
    if n == 0 && a == "llama" {
        return Ok(None);
    }
    let dense_width = meta_usize(c, &key("feed_forward_length"))? as f64;
    let qwen2 = a == "qwen2moe";
    let mut neutral = vec![("expert_shared_count", 0.0), ("leading_dense_block_count", 0.0)];
    if !qwen2 {
        neutral.push(("expert_shared_feed_forward_length", 0.0));
    }
    neutral.extend([("expert_gating_func", 1.0), ("expert_group_count", 1.0), ("expert_weights_scale", 1.0)]);
    if a == "llama" {
        neutral.push(("expert_feed_forward_length", dense_width));
    }
    for (k, neutral) in neutral {
        if let Some(x) = meta_f64(c, &key(k))?.filter(|&x| x != neutral) {
            bail!("GGUF `{}` = {x} is not supported for {a} (only {neutral})", key(k));
        }
    }
    let width_key = key(if a == "llama" { "feed_forward_length" } else { "expert_feed_forward_length" });
    if matches!(c.metadata.get(&width_key), Some(Value::Array(_))) {
        bail!("GGUF `{width_key}` is per layer: experts of different widths are not supported");
    }
    let shared_width = match qwen2 {
        true => Some(meta_opt_usize(c, &key("expert_shared_feed_forward_length"))?.unwrap_or(dense_width as usize)),
        false => None,
    };
    let used_key = key("expert_used_count");
    let m = MoeConfig::softmax_top_k(
        meta_usize(c, &key("expert_count"))?,
        meta_usize(c, &used_key)?,
        meta_usize(c, &width_key)?,
        !qwen2,
    )
    .with_context(|| format!("GGUF `{used_key}`, `{a}.expert_count`"))?;
    Ok(Some(MoeConfig { gated_shared_width: shared_width, ..m }))
}
