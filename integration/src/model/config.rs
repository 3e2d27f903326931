//! Architecture hyper-parameters, read from an HF `config.json` or from GGUF metadata.

use anyhow::{bail, Context, Result};
use serde::Deserialize;

/// Decoder families that share the Llama block structure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    /// Llama 2/3, SmolLM2.
    Llama,
    /// Mistral.
    Mistral,
    /// Qwen2 / Qwen2.5 (biases on q/k/v).
    Qwen2,
    /// Qwen3 (per-head RMSNorm on q and k).
    Qwen3,
}

/// Llama 3 RoPE frequency scaling.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Llama3RopeScaling {
    /// Overall scale factor.
    pub factor: f64,
    /// Low-frequency factor.
    pub low_freq_factor: f64,
    /// High-frequency factor.
    pub high_freq_factor: f64,
    /// Context length the model was first trained at.
    pub original_max_position_embeddings: f64,
}

/// DMS fields of an NVIDIA DMS checkpoint's config.json (`dms_*`).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct DmsCheckpointFields {
    /// Delay W in tokens.
    pub dms_window_size: Option<u32>,
    /// Scale applied to the raw decision signal.
    pub dms_alpha_scale: Option<f32>,
    /// Offset subtracted after scaling.
    pub dms_initial_alpha_offset: Option<f32>,
    /// True: adapter variant; false: query-neuron variant.
    pub dms_separate_alpha: Option<bool>,
    /// `"head"` or `"layer"`.
    pub dms_alpha_per: Option<String>,
    /// Never flag anything.
    pub dms_disable_eviction: Option<bool>,
}

/// Everything the runtime needs to build a Llama-family decoder.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    /// Family.
    pub arch: Arch,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Residual width.
    pub hidden_size: usize,
    /// MLP width.
    pub intermediate_size: usize,
    /// Decoder layers.
    pub num_layers: usize,
    /// Query heads.
    pub num_heads: usize,
    /// KV heads.
    pub num_kv_heads: usize,
    /// Per-head width.
    pub head_dim: usize,
    /// RoPE base.
    pub rope_theta: f64,
    /// Optional Llama 3 scaling.
    pub rope_scaling: Option<Llama3RopeScaling>,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// lm_head shares the embedding matrix.
    pub tie_word_embeddings: bool,
    /// q/k/v projections have biases.
    pub attention_bias: bool,
    /// Per-head q/k RMSNorm.
    pub qk_norm: bool,
    /// Maximum context length.
    pub max_position_embeddings: usize,
    /// Beginning-of-sequence token.
    pub bos_token_id: Option<u32>,
    /// End-of-sequence tokens.
    pub eos_token_ids: Vec<u32>,
    /// DMS fields when the checkpoint carries them.
    pub dms: DmsCheckpointFields,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(u32),
    Many(Vec<u32>),
}

#[derive(Deserialize)]
struct HfConfig {
    #[serde(default)]
    architectures: Vec<String>,
    #[serde(default)]
    model_type: Option<String>,
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    #[serde(default)]
    num_key_value_heads: Option<usize>,
    #[serde(default)]
    head_dim: Option<usize>,
    #[serde(default)]
    rope_theta: Option<f64>,
    #[serde(default)]
    rope_scaling: Option<serde_json::Value>,
    #[serde(default)]
    rms_norm_eps: Option<f64>,
    #[serde(default)]
    tie_word_embeddings: Option<bool>,
    #[serde(default)]
    attention_bias: Option<bool>,
    #[serde(default)]
    max_position_embeddings: Option<usize>,
    #[serde(default)]
    bos_token_id: Option<u32>,
    #[serde(default)]
    eos_token_id: Option<OneOrMany>,
    #[serde(flatten)]
    dms: DmsCheckpointFields,
}

impl ModelConfig {
    /// Parses an HF `config.json` text.
    pub fn from_hf_json(text: &str) -> Result<Self> {
        let c: HfConfig = serde_json::from_str(text).context("config.json is not a valid model config")?;
        let model_type = c.model_type.clone().unwrap_or_default();
        let arch_name = c.architectures.first().cloned().unwrap_or_default();
        let arch = match (model_type.as_str(), arch_name.as_str()) {
            ("qwen3", _) | (_, "Qwen3ForCausalLM" | "Qwen3ForCausalLMDMS") => Arch::Qwen3,
            ("qwen2", _) | (_, "Qwen2ForCausalLM") => Arch::Qwen2,
            ("mistral", _) | (_, "MistralForCausalLM") => Arch::Mistral,
            ("llama", _) | (_, "LlamaForCausalLM") => Arch::Llama,
            _ => bail!(
                "unsupported architecture (model_type `{model_type}`, architectures `{arch_name}`); supported: llama, mistral, qwen2, qwen3"
            ),
        };
        let rope_scaling = match &c.rope_scaling {
            None | Some(serde_json::Value::Null) => None,
            Some(v) => Some(parse_rope_scaling(v)?),
        };
        let num_kv_heads = c.num_key_value_heads.unwrap_or(c.num_attention_heads);
        let cfg = ModelConfig {
            arch,
            vocab_size: c.vocab_size,
            hidden_size: c.hidden_size,
            intermediate_size: c.intermediate_size,
            num_layers: c.num_hidden_layers,
            num_heads: c.num_attention_heads,
            num_kv_heads,
            head_dim: c.head_dim.unwrap_or(c.hidden_size / c.num_attention_heads.max(1)),
            rope_theta: c.rope_theta.unwrap_or(10_000.0),
            rope_scaling,
            rms_norm_eps: c.rms_norm_eps.unwrap_or(1e-6),
            tie_word_embeddings: c.tie_word_embeddings.unwrap_or(false),
            attention_bias: c.attention_bias.unwrap_or(arch == Arch::Qwen2),
            qk_norm: arch == Arch::Qwen3,
            max_position_embeddings: c.max_position_embeddings.unwrap_or(4096),
            bos_token_id: c.bos_token_id,
            eos_token_ids: match c.eos_token_id {
                None => vec![],
                Some(OneOrMany::One(x)) => vec![x],
                Some(OneOrMany::Many(v)) => v,
            },
            dms: c.dms,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks that the sizes are positive and consistent.
    pub fn validate(&self) -> Result<()> {
        for (name, v) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_layers),
            ("num_attention_heads", self.num_heads),
            ("num_key_value_heads", self.num_kv_heads),
            ("head_dim", self.head_dim),
        ] {
            if v == 0 {
                bail!("model config: `{name}` must be positive");
            }
        }
        if self.num_heads % self.num_kv_heads != 0 {
            bail!(
                "model config: num_attention_heads {} is not a multiple of num_key_value_heads {}",
                self.num_heads,
                self.num_kv_heads
            );
        }
        if self.head_dim % 2 != 0 {
            bail!("model config: head_dim {} must be even for RoPE", self.head_dim);
        }
        Ok(())
    }

    /// Query heads per KV head.
    pub fn gqa(&self) -> usize {
        self.num_heads / self.num_kv_heads
    }

    /// RoPE inverse frequencies (after any scaling), `head_dim / 2` values.
    pub fn rope_inv_freq(&self) -> Vec<f64> {
        let d = self.head_dim;
        (0..d / 2)
            .map(|i| {
                let f = 1.0 / self.rope_theta.powf(2.0 * i as f64 / d as f64);
                match &self.rope_scaling {
                    None => f,
                    Some(s) => llama3_scale(f, s),
                }
            })
            .collect()
    }
}

fn llama3_scale(freq: f64, s: &Llama3RopeScaling) -> f64 {
    let low_wavelen = s.original_max_position_embeddings / s.low_freq_factor;
    let high_wavelen = s.original_max_position_embeddings / s.high_freq_factor;
    let wavelen = 2.0 * std::f64::consts::PI / freq;
    if wavelen < high_wavelen {
        freq
    } else if wavelen > low_wavelen {
        freq / s.factor
    } else {
        let smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor)
            / (s.high_freq_factor - s.low_freq_factor);
        (1.0 - smooth) * freq / s.factor + smooth * freq
    }
}

fn parse_rope_scaling(v: &serde_json::Value) -> Result<Llama3RopeScaling> {
    let kind = v.get("rope_type").or_else(|| v.get("type")).and_then(|x| x.as_str()).unwrap_or("");
    if kind != "llama3" {
        bail!("model config: rope_scaling type `{kind}` is not supported (supported: llama3)");
    }
    let num = |k: &str| -> Result<f64> {
        v.get(k)
            .and_then(|x| x.as_f64())
            .with_context(|| format!("model config: rope_scaling.{k} is missing or not a number"))
    };
    Ok(Llama3RopeScaling {
        factor: num("factor")?,
        low_freq_factor: num("low_freq_factor")?,
        high_freq_factor: num("high_freq_factor")?,
        original_max_position_embeddings: num("original_max_position_embeddings")?,
    })
}
