//! Architecture hyper-parameters, read from an HF `config.json` or from GGUF metadata.

use anyhow::{bail, Context, Result};
use dms_policy::ModelWindows;
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
    /// Phi-3 and Phi-4 (`phi3`): Llama's layers with q/k/v and gate/up each stored fused.
    Phi3,
    /// DeepSeek V2 / V3: multi-head latent attention (see [`MlaConfig`]), dense or MoE MLPs.
    DeepSeek,
    /// Gemma 2 (see [`GemmaConfig`]): Gemma 3's block without q/k norms, local layers on every
    /// other layer, and soft-capped attention scores and logits.
    Gemma2,
    /// Gemma 3 (see [`GemmaConfig`]): scaled embeddings, norms around attention and MLP, a
    /// GELU MLP, and local layers with their own window and RoPE base.
    Gemma3,
    /// OpenAI's GPT-OSS: Llama's block with biased attention projections, a learned sink logit
    /// per query head (`self_attn.sinks`), windowed even layers, and mixture-of-experts MLPs of
    /// [`OaiExperts`].
    GptOss,
}

impl Arch {
    /// Gemma 2 or Gemma 3: the families with a [`GemmaConfig`].
    pub fn is_gemma(self) -> bool {
        matches!(self, Arch::Gemma2 | Arch::Gemma3)
    }

    /// Whether each layer's attention has a learned sink logit per query head (GPT-OSS).
    pub fn has_attention_sinks(self) -> bool {
        self == Arch::GptOss
    }
}

/// GPT-OSS's experts (transformers' `GptOssExperts`, llama.cpp's `swiglu_oai`): every projection
/// biased, the router too (a softmax over its `k` best biased logits), and the gate and up halves
/// combined as `(clamp(up, -limit, limit) + 1) * g * sigmoid(alpha * g)` with
/// `g = min(gate, limit)`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OaiExperts {
    /// `swiglu_limit` (7 in the published models).
    pub limit: f64,
    /// The sigmoid's slope (1.702, fixed in every implementation).
    pub alpha: f64,
}

impl OaiExperts {
    /// The published models' activation with its `limit`.
    pub fn with_limit(limit: f64) -> Result<Self> {
        if !(limit.is_finite() && limit > 0.0) {
            bail!("model config: swiglu_limit must be positive and finite; got {limit}");
        }
        Ok(Self { limit, alpha: 1.702 })
    }
}

/// What Gemma 2 and Gemma 3 add to the Llama block (transformers' `Gemma2Config`,
/// `Gemma3TextConfig`).
///
/// The embeddings are scaled by `sqrt(hidden_size)`; each layer normalises the attention's and
/// the MLP's outputs too (`post_attention_layernorm`, `post_feedforward_layernorm`); the MLP is
/// `down(gelu_tanh(gate(x)) * up(x))`; every RMSNorm multiplies by `1 + weight` (added at load to
/// HF weights; GGUF files store it added). Gemma 3 also RMS-normalises q and k per head.
#[derive(Debug, Clone, PartialEq)]
pub struct GemmaConfig {
    /// Attention scores are scaled by `query_pre_attn_scalar^-1/2`.
    pub query_pre_attn_scalar: f64,
    /// RoPE base of the local layers, which take no RoPE scaling (Gemma 3); None where they
    /// rotate as the global ones (Gemma 2).
    pub local_rope_theta: Option<f64>,
    /// Per layer: local (windowed when the model has a window).
    pub local_layers: Vec<bool>,
    /// Attention scores become `cap * tanh(score / cap)` (Gemma 2's `attn_logit_softcapping`).
    pub attn_softcap: Option<f64>,
    /// Logits become `cap * tanh(logit / cap)` (Gemma 2's `final_logit_softcapping`).
    pub final_softcap: Option<f64>,
}

/// IBM Granite's multipliers on the Llama block (transformers' `GraniteConfig`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GraniteScales {
    /// Embeddings are multiplied by this (`embedding_multiplier`).
    pub embedding: f64,
    /// The attention's and the MLP's outputs are multiplied by this before each residual add
    /// (`residual_multiplier`).
    pub residual: f64,
    /// Softmax scale of attention scores, in place of `head_dim^-1/2` (`attention_multiplier`).
    pub attention: f64,
    /// Logits are divided by this (`logits_scaling`).
    pub logits: f64,
}

/// Multi-head latent attention sizes (DeepSeek V2/V3).
///
/// The cache holds one latent row per token and layer: `c_kv` (after `kv_a_layernorm`,
/// `kv_lora_rank` floats) followed by the rotated shared rope key (`qk_rope_head_dim` floats).
/// For these models [`ModelConfig::num_kv_heads`] is 1 (rows per layer) and
/// [`ModelConfig::head_dim`] is the latent row width.
#[derive(Debug, Clone, PartialEq)]
pub struct MlaConfig {
    /// Rank of the query compression (None: a plain `q_proj`).
    pub q_lora_rank: Option<usize>,
    /// Rank of the KV compression (the cached latent width).
    pub kv_lora_rank: usize,
    /// Per-head query/key width without RoPE.
    pub qk_nope_head_dim: usize,
    /// Width of the RoPE part (shared key, per-head query).
    pub qk_rope_head_dim: usize,
    /// Per-head value width.
    pub v_head_dim: usize,
    /// RoPE on interleaved pairs (x0,x1),(x2,x3)... (DeepSeek's layout) instead of halves.
    pub rope_interleave: bool,
    /// YaRN scaling, when configured.
    pub yarn: Option<YarnScaling>,
}

/// YaRN RoPE scaling (transformers' `rope_type = "yarn"`): frequencies blended between their
/// original and interpolated values along a ramp, and the rotary tables scaled.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct YarnScaling {
    /// Context extension factor.
    pub factor: f64,
    /// Context length of pre-training.
    pub original_max_position_embeddings: f64,
    /// Fast boundary of the frequency ramp.
    pub beta_fast: f64,
    /// Slow boundary of the frequency ramp.
    pub beta_slow: f64,
    /// mscale of the rotary tables.
    pub mscale: f64,
    /// mscale applied to the softmax scale (squared).
    pub mscale_all_dim: f64,
    /// Factor on the rotary tables given outright (`attention_factor`), in place of the mscale ratio.
    pub attention_factor: Option<f64>,
    /// Round the ramp's ends to whole frequencies (transformers' `truncate`, default true).
    pub truncate: bool,
}

/// Mixture-of-experts settings (DeepSeek V2/V3, Qwen2/Qwen3-MoE, Mixtral).
#[derive(Debug, Clone, PartialEq)]
pub struct MoeConfig {
    /// Routed experts.
    pub n_routed_experts: usize,
    /// Shared experts (one MLP of `n_shared * moe_intermediate_size`).
    pub n_shared_experts: usize,
    /// Qwen2-MoE's shared expert instead: its width, its output scaled by
    /// `sigmoid(shared_expert_gate . x)`.
    pub gated_shared_width: Option<usize>,
    /// Experts per token.
    pub num_experts_per_tok: usize,
    /// Width of one expert.
    pub moe_intermediate_size: usize,
    /// Layers before this index are dense.
    pub first_k_dense_replace: usize,
    /// Every `moe_layer_freq`-th layer (from `first_k_dense_replace`) is MoE.
    pub moe_layer_freq: usize,
    /// Layers kept dense besides those (Qwen's `mlp_only_layers`).
    pub mlp_only_layers: Vec<usize>,
    /// Renormalise the chosen experts' weights.
    pub norm_topk_prob: bool,
    /// Factor on the routed experts' output.
    pub routed_scaling_factor: f64,
    /// `softmax` (V2) or `sigmoid` (V3, with `e_score_correction_bias`).
    pub scoring_func: String,
    /// `greedy`, `group_limited_greedy` (V2) or `noaux_tc` (V3).
    pub topk_method: String,
    /// Expert groups.
    pub n_group: usize,
    /// Groups a token may route to.
    pub topk_group: usize,
    /// GPT-OSS's biased experts and clamped activation; None for the others' SwiGLU experts.
    pub oai: Option<OaiExperts>,
}

impl MoeConfig {
    /// Whether decoder layer `i` uses the MoE block.
    pub fn is_moe_layer(&self, i: usize) -> bool {
        i >= self.first_k_dense_replace
            && i.is_multiple_of(self.moe_layer_freq.max(1))
            && !self.mlp_only_layers.contains(&i)
    }

    /// Weights of Qwen2-MoE's gated shared expert in a `hidden`-wide model (0 without one).
    pub fn shared_weight_count(&self, hidden: u128) -> u128 {
        self.gated_shared_width.map_or(0, |w| 3 * hidden * w as u128 + hidden)
    }

    /// Softmax routing over `experts` to the `per_token` best, renormalised when `renormalise`,
    /// in every layer, without shared experts (Qwen's and Mixtral's routing); checked.
    pub fn softmax_top_k(experts: usize, per_token: usize, width: usize, renormalise: bool) -> Result<Self> {
        let m = MoeConfig {
            n_routed_experts: experts,
            n_shared_experts: 0,
            gated_shared_width: None,
            num_experts_per_tok: per_token,
            moe_intermediate_size: width,
            first_k_dense_replace: 0,
            moe_layer_freq: 1,
            mlp_only_layers: vec![],
            norm_topk_prob: renormalise,
            routed_scaling_factor: 1.0,
            scoring_func: "softmax".into(),
            topk_method: "greedy".into(),
            n_group: 1,
            topk_group: 1,
            oai: None,
        };
        // DeepSeek-V2's routing (which this runs) leaves a single expert's weight as it is, where
        // these models renormalise it to 1.
        if per_token == 1 && renormalise {
            bail!("model config: num_experts_per_tok 1 with renormalised weights is not supported");
        }
        m.check()?;
        Ok(m)
    }

    /// Checks that the routing can be run: enough experts reachable per token, whole groups, and
    /// a scoring function and top-k method this runtime implements.
    pub fn check(&self) -> Result<()> {
        let n = self.n_routed_experts;
        let reachable =
            if self.topk_method == "greedy" { n } else { self.topk_group.saturating_mul(n / self.n_group.max(1)) };
        if self.num_experts_per_tok == 0
            || self.num_experts_per_tok > reachable
            || self.n_group == 0
            || !n.is_multiple_of(self.n_group)
            || self.topk_group > self.n_group
        {
            bail!(
                "model config: inconsistent MoE routing (experts {n}, per token {}, groups {}, topk_group {})",
                self.num_experts_per_tok,
                self.n_group,
                self.topk_group
            );
        }
        if !matches!(self.scoring_func.as_str(), "softmax" | "sigmoid") {
            bail!("model config: scoring_func `{}` is not supported (softmax, sigmoid)", self.scoring_func);
        }
        if !matches!(self.topk_method.as_str(), "greedy" | "group_limited_greedy" | "noaux_tc") {
            bail!(
                "model config: topk_method `{}` is not supported (greedy, group_limited_greedy, noaux_tc)",
                self.topk_method
            );
        }
        if !self.routed_scaling_factor.is_finite() {
            bail!("model config: routed_scaling_factor {} must be finite", self.routed_scaling_factor);
        }
        Ok(())
    }
}

impl YarnScaling {
    /// Checks that the ramp and the factors are usable.
    pub fn check(&self) -> Result<()> {
        let finite = [self.mscale, self.mscale_all_dim].iter().all(|x| x.is_finite())
            && self.attention_factor.is_none_or(|a| a.is_finite() && a > 0.0);
        if !(self.factor > 0.0
            && self.factor.is_finite()
            && self.original_max_position_embeddings > 0.0
            && self.original_max_position_embeddings.is_finite()
            && self.beta_slow > 0.0
            && self.beta_fast > self.beta_slow
            && finite)
        {
            bail!(
                "model config: rope_scaling (yarn) needs a finite factor > 0 and original_max_position_embeddings > 0, \
                 beta_fast > beta_slow > 0, finite mscales and a positive attention_factor"
            );
        }
        // Far beyond any published model (as `max_position_embeddings`' own limit).
        if self.original_max_position_embeddings * self.factor > (1u64 << 26) as f64 {
            bail!(
                "model config: rope_scaling (yarn) extends the context to original_max_position_embeddings {} x factor {}, \
                 above the limit of {}: corrupt config?",
                self.original_max_position_embeddings,
                self.factor,
                1u64 << 26
            );
        }
        Ok(())
    }

    /// Inverse frequencies of a `dim`-wide rotation with base `theta` after YaRN: kept below the
    /// ramp (fast rotations), divided by `factor` above it, blended linearly along it.
    pub fn inv_freq(&self, theta: f64, dim: usize) -> Vec<f64> {
        let d = dim as f64;
        let corr = |rot: f64| {
            d * (self.original_max_position_embeddings / (rot * 2.0 * std::f64::consts::PI)).ln() / (2.0 * theta.ln())
        };
        let (low, high) = match self.truncate {
            true => (corr(self.beta_fast).floor(), corr(self.beta_slow).ceil()),
            false => (corr(self.beta_fast), corr(self.beta_slow)),
        };
        let (low, high) = (low.max(0.0), high.min(d - 1.0));
        let high = if low == high { high + 0.001 } else { high };
        (0..dim / 2)
            .map(|i| {
                let f = 1.0 / theta.powf(2.0 * i as f64 / d);
                let ramp = ((i as f64 - low) / (high - low)).clamp(0.0, 1.0);
                f / self.factor * ramp + f * (1.0 - ramp)
            })
            .collect()
    }

    /// Factor on the rotary cos/sin tables: `attention_factor` when given, else
    /// `get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim)`.
    pub fn attention_factor(&self) -> f64 {
        self.attention_factor.unwrap_or_else(|| {
            Self::get_mscale(self.factor, self.mscale) / Self::get_mscale(self.factor, self.mscale_all_dim)
        })
    }

    /// The context YaRN extends the model to: `original_max_position_embeddings x factor`.
    pub fn extended_context(&self) -> usize {
        (self.original_max_position_embeddings * self.factor).floor() as usize
    }

    /// DeepSeek's `yarn_get_mscale`.
    pub fn get_mscale(scale: f64, mscale: f64) -> f64 {
        if scale <= 1.0 {
            1.0
        } else {
            0.1 * mscale * scale.ln() + 1.0
        }
    }
}

/// RoPE frequency scaling of a Llama-family model.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// Llama 3's, from config.json's `rope_scaling`.
    Llama3(Llama3RopeScaling),
    /// One divisor per frequency, as llama.cpp stores Llama 3's scaling in a GGUF
    /// (`rope_freqs.weight`).
    FreqFactors(Vec<f64>),
    /// Positions divided by this factor (transformers' and llama.cpp's `linear`).
    Linear(f64),
    /// YaRN (Qwen's long-context setting): see [`YarnScaling`].
    Yarn(YarnScaling),
    /// LongRoPE (Phi-3 128K, Phi-3.5): see [`LongRopeScaling`].
    LongRope(LongRopeScaling),
}

/// LongRoPE: every frequency divided by its factor, the rotary tables multiplied by the attention
/// factor. Up to `original_max_position_embeddings` (the served context by default) the factors
/// are `short_factor`, as transformers applies them. transformers switches to `long_factor` only
/// for the tokens past the original context, while the keys already cached keep their
/// short-factor rotation; here, as in llama.cpp, the served context decides for every position:
/// a context set beyond the original one (`[model] context`, up to `max_position_embeddings`)
/// rotates every token by `long_factor`.
#[derive(Debug, Clone, PartialEq)]
pub struct LongRopeScaling {
    /// One divisor per frequency (`rope_dim / 2`), up to the original context.
    pub short_factor: Vec<f64>,
    /// One divisor per frequency for contexts past the original one, where the checkpoint has
    /// them.
    pub long_factor: Option<Vec<f64>>,
    /// Factor on the rotary cos/sin tables: `attention_factor` when given, else
    /// `sqrt(1 + ln(max_position_embeddings / original) / ln(original))`, 1 below a ratio of 1.
    pub attention_factor: f64,
    /// The context the model was first trained at, and the most the short factors serve.
    pub original_max_position_embeddings: usize,
    /// The context the model declares, which the long factors serve.
    pub max_position_embeddings: usize,
}

impl LongRopeScaling {
    /// transformers' default attention factor for a model declaring `declared` positions over
    /// an original `original`.
    pub fn default_attention_factor(declared: usize, original: usize) -> f64 {
        let factor = declared as f64 / original as f64;
        if factor <= 1.0 {
            1.0
        } else {
            (1.0 + factor.ln() / (original as f64).ln()).sqrt()
        }
    }
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
    /// `"head"` or `"layer"` (anything else is rejected when the config is read).
    #[serde(default, deserialize_with = "alpha_per")]
    pub dms_alpha_per: Option<String>,
    /// Never flag anything.
    pub dms_disable_eviction: Option<bool>,
}

/// Reads `dms_alpha_per`: absent, null, `"head"` or `"layer"` (spec rule 1.5). Any other value is
/// an error naming the field, so that a misspelt granularity is never read as `"head"`.
/// A key that is present, as `Some` of its value (which may itself be null).
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Option<Option<usize>>, D::Error> {
    Option::<usize>::deserialize(d).map(Some)
}

/// transformers' `MistralConfig.sliding_window` when config.json does not give one.
const MISTRAL_DEFAULT_WINDOW: usize = 4096;

fn alpha_per<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Option<String>, D::Error> {
    match Option::<serde_json::Value>::deserialize(d)? {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::String(s)) if s == "head" || s == "layer" => Ok(Some(s)),
        Some(other) => {
            Err(serde::de::Error::custom(format!("`dms_alpha_per` must be \"head\" or \"layer\", not {other}")))
        }
    }
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
    /// RoPE rotates only the first this many channels of each head (Phi-4-mini's 96 of 128,
    /// from `partial_rotary_factor`); None: the whole head.
    pub partial_rotary_dim: Option<usize>,
    /// Per layer: attends without RoPE (SmolLM3's NoPE layers, every fourth); empty when every
    /// layer rotates.
    pub nope_layers: Vec<bool>,
    /// Optional RoPE frequency scaling.
    pub rope_scaling: Option<RopeScaling>,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// lm_head shares the embedding matrix.
    pub tie_word_embeddings: bool,
    /// q/k/v projections have biases.
    pub attention_bias: bool,
    /// Per-head q/k RMSNorm.
    pub qk_norm: bool,
    /// Context length served: `max_position_embeddings`, as RoPE scaling extends or limits it.
    pub max_position_embeddings: usize,
    /// The model's own attention windows (Mistral's and Phi-3's `sliding_window`, Qwen2's
    /// windowed layers, Gemma 3's local layers); None when every layer sees the whole context.
    pub windows: Option<ModelWindows>,
    /// Gemma 3's additions; None for the other families.
    pub gemma: Option<GemmaConfig>,
    /// Granite's multipliers; None for the other families.
    pub granite: Option<GraniteScales>,
    /// Beginning-of-sequence token.
    pub bos_token_id: Option<u32>,
    /// End-of-sequence tokens.
    pub eos_token_ids: Vec<u32>,
    /// DMS fields when the checkpoint carries them.
    pub dms: DmsCheckpointFields,
    /// Latent attention sizes (DeepSeek); None for per-head K/V models.
    pub mla: Option<MlaConfig>,
    /// Mixture-of-experts layers (DeepSeek, Qwen2/Qwen3-MoE, Mixtral); None for dense models.
    pub moe: Option<MoeConfig>,
    /// How an FP8 checkpoint scales its weights (config.json's `quantization_config`); None for
    /// unquantized weights and GGUF files.
    pub fp8: Option<super::fp8::Fp8Scheme>,
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
    /// Absent (`None`), null (`Some(None)`) or a width: transformers' Mistral defaults an absent
    /// key to 4096 and reads null as no window.
    #[serde(default, deserialize_with = "present")]
    sliding_window: Option<Option<usize>>,
    #[serde(default)]
    use_sliding_window: Option<bool>,
    /// The fraction of each head RoPE rotates (Phi-4-mini: 0.75).
    #[serde(default)]
    partial_rotary_factor: Option<f64>,
    /// The context a LongRoPE model was first trained at (Phi-3's, beside `rope_scaling`).
    #[serde(default)]
    original_max_position_embeddings: Option<usize>,
    #[serde(default)]
    max_window_layers: Option<usize>,
    /// SmolLM3: per layer, 1 where it uses RoPE and 0 where it does not.
    #[serde(default)]
    no_rope_layers: Option<Vec<i64>>,
    /// SmolLM3: every this-many-th layer has no RoPE when `no_rope_layers` is absent.
    #[serde(default)]
    no_rope_layer_interval: Option<usize>,
    /// transformers' per-layer `"sliding_attention"` / `"full_attention"` (Gemma 3, Qwen2).
    #[serde(default)]
    layer_types: Option<Vec<String>>,
    /// Gemma 3: every `sliding_window_pattern`-th layer attends to the whole context.
    #[serde(default)]
    sliding_window_pattern: Option<usize>,
    #[serde(default)]
    query_pre_attn_scalar: Option<f64>,
    #[serde(default)]
    rope_local_base_freq: Option<f64>,
    #[serde(default)]
    attn_logit_softcapping: Option<f64>,
    #[serde(default)]
    final_logit_softcapping: Option<f64>,
    #[serde(default)]
    hidden_activation: Option<String>,
    #[serde(default)]
    embedding_multiplier: Option<f64>,
    #[serde(default)]
    residual_multiplier: Option<f64>,
    #[serde(default)]
    attention_multiplier: Option<f64>,
    #[serde(default)]
    logits_scaling: Option<f64>,
    #[serde(default)]
    mlp_bias: Option<bool>,
    /// GPT-OSS: the clamp of its experts' activation.
    #[serde(default)]
    swiglu_limit: Option<f64>,
    /// GPT-OSS's other name for `num_experts_per_tok`.
    #[serde(default)]
    experts_per_token: Option<usize>,
    #[serde(default)]
    bos_token_id: Option<u32>,
    #[serde(default)]
    eos_token_id: Option<OneOrMany>,
    #[serde(default)]
    quantization_config: Option<serde_json::Value>,
    #[serde(default)]
    q_lora_rank: Option<usize>,
    #[serde(default)]
    kv_lora_rank: Option<usize>,
    #[serde(default)]
    qk_nope_head_dim: Option<usize>,
    #[serde(default)]
    qk_rope_head_dim: Option<usize>,
    #[serde(default)]
    v_head_dim: Option<usize>,
    #[serde(default)]
    rope_interleave: Option<bool>,
    #[serde(default)]
    n_routed_experts: Option<usize>,
    #[serde(default)]
    num_experts: Option<usize>,
    #[serde(default)]
    num_local_experts: Option<usize>,
    #[serde(default)]
    shared_expert_intermediate_size: Option<usize>,
    #[serde(default)]
    decoder_sparse_step: Option<usize>,
    #[serde(default)]
    mlp_only_layers: Option<Vec<usize>>,
    #[serde(default)]
    n_shared_experts: Option<usize>,
    #[serde(default)]
    num_experts_per_tok: Option<usize>,
    #[serde(default)]
    moe_intermediate_size: Option<usize>,
    #[serde(default)]
    first_k_dense_replace: Option<usize>,
    #[serde(default)]
    moe_layer_freq: Option<usize>,
    #[serde(default)]
    norm_topk_prob: Option<bool>,
    #[serde(default)]
    routed_scaling_factor: Option<f64>,
    #[serde(default)]
    scoring_func: Option<String>,
    #[serde(default)]
    topk_method: Option<String>,
    #[serde(default)]
    n_group: Option<usize>,
    #[serde(default)]
    topk_group: Option<usize>,
    #[serde(flatten)]
    dms: DmsCheckpointFields,
}

/// Most layers a model may declare: per-layer flags are allocated from the count, so it is
/// bounded before anything is (no model has a thousandth of this many layers).
pub(crate) const MAX_LAYERS: usize = 1 << 16;

impl ModelConfig {
    /// Parses an HF `config.json` text.
    pub fn from_hf_json(text: &str) -> Result<Self> {
        let mut v: serde_json::Value = serde_json::from_str(text).context("config.json is not a valid model config")?;
        lift_text_config(&mut v);
        lift_rope_parameters(&mut v);
        fill_gemma_defaults(&mut v);
        let c: HfConfig = serde_json::from_value(v).context("config.json is not a valid model config")?;
        if c.num_hidden_layers > MAX_LAYERS {
            bail!("model config: num_hidden_layers {} is above the {MAX_LAYERS} layers supported", c.num_hidden_layers);
        }
        let model_type = c.model_type.clone().unwrap_or_default();
        let arch_name = c.architectures.first().cloned().unwrap_or_default();
        let arch = match (model_type.as_str(), arch_name.as_str()) {
            ("qwen3" | "qwen3_moe", _) | (_, "Qwen3ForCausalLM" | "Qwen3ForCausalLMDMS" | "Qwen3MoeForCausalLM") => {
                Arch::Qwen3
            }
            ("qwen2" | "qwen2_moe", _) | (_, "Qwen2ForCausalLM" | "Qwen2MoeForCausalLM") => Arch::Qwen2,
            ("mistral" | "mixtral", _) | (_, "MistralForCausalLM" | "MixtralForCausalLM") => Arch::Mistral,
            ("llama" | "smollm3" | "granite", _)
            | (_, "LlamaForCausalLM" | "SmolLM3ForCausalLM" | "GraniteForCausalLM") => Arch::Llama,
            ("phi3", _) | (_, "Phi3ForCausalLM") => Arch::Phi3,
            ("deepseek_v2" | "deepseek_v3", _) | (_, "DeepseekV2ForCausalLM" | "DeepseekV3ForCausalLM") => {
                Arch::DeepSeek
            }
            ("gemma2", _) | (_, "Gemma2ForCausalLM") => Arch::Gemma2,
            ("gemma3_text", _) | (_, "Gemma3ForCausalLM") => Arch::Gemma3,
            ("gpt_oss", _) | (_, "GptOssForCausalLM") => Arch::GptOss,
            _ => bail!(
                "unsupported architecture (model_type `{model_type}`, architectures `{arch_name}`); supported: llama, mistral, mixtral, phi3, qwen2, qwen2_moe, qwen3, qwen3_moe, deepseek_v2, deepseek_v3, gemma2, gemma3, gpt_oss"
            ),
        };
        if c.mlp_bias == Some(true) {
            bail!("model config: mlp_bias (biases on the MLP's projections) is not supported");
        }
        let fp8 = match c.quantization_config.as_ref() {
            // GPT-OSS's experts in MXFP4 (`*_blocks`, `*_scales`), read by their names.
            Some(q) if arch == Arch::GptOss && q.get("quant_method").and_then(|m| m.as_str()) == Some("mxfp4") => None,
            q => super::fp8::scheme_of(q)?,
        };
        let is_v3 = model_type == "deepseek_v3" || arch_name == "DeepseekV3ForCausalLM";
        let is_mixtral = model_type == "mixtral" || arch_name == "MixtralForCausalLM";
        let is_smollm3 = model_type == "smollm3" || arch_name == "SmolLM3ForCausalLM";
        let mla = if arch == Arch::DeepSeek { Some(parse_mla(&c)?) } else { None };
        let moe = match arch {
            Arch::DeepSeek => parse_deepseek_moe(&c, is_v3)?,
            _ if model_type == "qwen3_moe" || arch_name == "Qwen3MoeForCausalLM" => Some(parse_qwen_moe(&c, false)?),
            _ if model_type == "qwen2_moe" || arch_name == "Qwen2MoeForCausalLM" => Some(parse_qwen_moe(&c, true)?),
            _ if is_mixtral => Some(parse_mixtral_moe(&c)?),
            Arch::GptOss => Some(parse_gpt_oss_moe(&c)?),
            _ => None,
        };
        let rope_scaling = match (&c.rope_scaling, arch) {
            (None | Some(serde_json::Value::Null), _) | (_, Arch::DeepSeek) => None,
            (Some(v), _) => Some(parse_rope_scaling(
                v,
                c.max_position_embeddings.unwrap_or(4096),
                c.original_max_position_embeddings,
            )?),
        };
        // transformers' Mixtral has no window unless config.json gives one (Mistral's default is 4096).
        let default_window = if is_mixtral { None } else { Some(MISTRAL_DEFAULT_WINDOW) };
        let declared = c.max_position_embeddings.unwrap_or(match arch {
            Arch::Gemma2 => 8192,
            Arch::Gemma3 | Arch::GptOss => 131_072,
            _ => 4096,
        });
        let context = served_context(declared, rope_scaling.as_ref());
        let (window, windowed) = windowed_layers(&c, arch, default_window)?;
        let gemma = if arch.is_gemma() { Some(parse_gemma(&c, arch, windowed.clone())?) } else { None };
        // A window is kept against the longest context `[model] context` may set.
        let longest = match &rope_scaling {
            Some(RopeScaling::LongRope(l)) if l.long_factor.is_some() => declared.max(context),
            _ => context,
        };
        let windows = model_windows(window, windowed, longest, "model config: sliding_window")?;
        let (num_kv_heads, head_dim) = match &mla {
            Some(m) => (1, m.kv_lora_rank + m.qk_rope_head_dim),
            None => (
                c.num_key_value_heads.unwrap_or(c.num_attention_heads),
                c.head_dim.unwrap_or(match arch {
                    _ if arch.is_gemma() => 256,
                    Arch::GptOss => 64,
                    _ => c.hidden_size / c.num_attention_heads.max(1),
                }),
            ),
        };
        let cfg = ModelConfig {
            arch,
            vocab_size: c.vocab_size,
            hidden_size: c.hidden_size,
            intermediate_size: c.intermediate_size,
            num_layers: c.num_hidden_layers,
            num_heads: c.num_attention_heads,
            num_kv_heads,
            head_dim,
            rope_theta: c.rope_theta.unwrap_or(match () {
                _ if is_mixtral || arch == Arch::Gemma3 => 1e6,
                // transformers' SmolLM3Config default.
                _ if is_smollm3 => 2e6,
                _ if arch == Arch::GptOss => 150_000.0,
                _ => 10_000.0,
            }),
            partial_rotary_dim: partial_rotary_dim(c.partial_rotary_factor, head_dim, mla.is_some())?,
            nope_layers: nope_layers(&c, is_smollm3)?,
            granite: granite_scales(&c, model_type == "granite" || arch_name == "GraniteForCausalLM")?,
            rope_scaling,
            // transformers' defaults: Phi3Config's 1e-5, the others' 1e-6.
            rms_norm_eps: c.rms_norm_eps.unwrap_or(if matches!(arch, Arch::Phi3 | Arch::GptOss) { 1e-5 } else { 1e-6 }),
            tie_word_embeddings: c.tie_word_embeddings.unwrap_or(arch.is_gemma() || is_smollm3),
            attention_bias: c.attention_bias.unwrap_or(matches!(arch, Arch::Qwen2 | Arch::GptOss)),
            qk_norm: matches!(arch, Arch::Qwen3 | Arch::Gemma3),
            max_position_embeddings: context,
            windows,
            gemma,
            bos_token_id: c.bos_token_id,
            eos_token_ids: match c.eos_token_id {
                None => vec![],
                Some(OneOrMany::One(x)) => vec![x],
                Some(OneOrMany::Many(v)) => v,
            },
            dms: c.dms.clone(),
            mla,
            moe,
            fp8,
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
        if !self.num_heads.is_multiple_of(self.num_kv_heads) {
            bail!(
                "model config: num_attention_heads {} is not a multiple of num_key_value_heads {}",
                self.num_heads,
                self.num_kv_heads
            );
        }
        if let Some(w) = self.windows.as_ref().filter(|w| w.layers().len() != self.num_layers) {
            bail!("model config: {} attention-window flags for {} layers", w.layers().len(), self.num_layers);
        }
        if !self.head_dim.is_multiple_of(2) {
            bail!("model config: head_dim {} must be even for RoPE", self.head_dim);
        }
        if !self.nope_layers.is_empty() && self.nope_layers.len() != self.num_layers {
            bail!("model config: {} no-RoPE flags for {} layers", self.nope_layers.len(), self.num_layers);
        }
        if self.mla.is_some() && self.nope_layers.contains(&true) {
            bail!("model config: layers without RoPE are not supported for latent attention");
        }
        if let Some(r) = self.partial_rotary_dim.filter(|&r| r == 0 || r % 2 == 1 || r > self.head_dim) {
            bail!("model config: RoPE over {r} channels of a {}-wide head: it must be even, positive and at most the head", self.head_dim);
        }
        if let Some(RopeScaling::Linear(factor)) = &self.rope_scaling {
            if !(factor.is_finite() && *factor > 0.0) {
                bail!("model config: linear RoPE scaling needs a positive, finite factor; got {factor}");
            }
        }
        if let Some(RopeScaling::Yarn(y)) = &self.rope_scaling {
            y.check()?;
        }
        if let Some(RopeScaling::LongRope(l)) = &self.rope_scaling {
            let a = l.attention_factor;
            if !(a.is_finite() && a > 0.0 && l.original_max_position_embeddings > 0) {
                bail!(
                    "model config: rope_scaling (longrope) needs a positive original context and attention factor; \
                     got {} and {a}",
                    l.original_max_position_embeddings
                );
            }
        }
        let divisors: Vec<(&str, &Vec<f64>)> = match &self.rope_scaling {
            Some(RopeScaling::FreqFactors(div)) => vec![("RoPE frequency factors", div)],
            Some(RopeScaling::LongRope(l)) => std::iter::once(("LongRoPE short_factor", &l.short_factor))
                .chain(l.long_factor.iter().map(|f| ("LongRoPE long_factor", f)))
                .collect(),
            _ => vec![],
        };
        for (what, div) in divisors {
            if div.len() != self.rope_dim() / 2 || !div.iter().all(|d| d.is_finite() && *d > 0.0) {
                bail!(
                    "{what}: need {} / 2 = {} positive, finite values; got {} ({div:?})",
                    if self.partial_rotary_dim.is_some() { "the rotated channels" } else { "head_dim" },
                    self.rope_dim() / 2,
                    div.len()
                );
            }
        }
        // Far above any published model: a value beyond these is a corrupt file, and taking it at
        // its word would mean allocating without bound.
        for (name, v, max) in [
            ("vocab_size", self.vocab_size, 1 << 23),
            ("hidden_size", self.hidden_size, 1 << 17),
            ("intermediate_size", self.intermediate_size, 1 << 20),
            ("num_hidden_layers", self.num_layers, 1 << 12),
            ("num_attention_heads", self.num_heads, 1 << 12),
            ("head_dim", self.head_dim, 1 << 14),
            ("max_position_embeddings", self.max_position_embeddings, 1 << 26),
        ] {
            if v > max {
                bail!("model config: `{name}` is {v}, above the limit of {max}: corrupt config?");
            }
        }
        let mla = self.mla.as_ref();
        let moe = self.moe.as_ref();
        if mla.is_some() || moe.is_some() {
            for (name, v, max) in [
                ("q_lora_rank", mla.and_then(|m| m.q_lora_rank).unwrap_or(0), 1 << 16),
                ("kv_lora_rank", mla.map_or(0, |m| m.kv_lora_rank), 1 << 14),
                ("qk_nope_head_dim", mla.map_or(0, |m| m.qk_nope_head_dim), 1 << 14),
                ("qk_rope_head_dim", mla.map_or(0, |m| m.qk_rope_head_dim), 1 << 14),
                ("v_head_dim", mla.map_or(0, |m| m.v_head_dim), 1 << 14),
                ("n_routed_experts", moe.map_or(0, |e| e.n_routed_experts), 1 << 16),
                ("n_shared_experts", moe.map_or(0, |e| e.n_shared_experts), 1 << 8),
                ("shared_expert_intermediate_size", moe.and_then(|e| e.gated_shared_width).unwrap_or(0), 1 << 20),
                ("moe_intermediate_size", moe.map_or(0, |e| e.moe_intermediate_size), 1 << 20),
            ] {
                if v > max {
                    bail!("model config: `{name}` is {v}, above the limit of {max}: corrupt config?");
                }
            }
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 0.0) {
            bail!("model config: rope_theta {} must be a finite positive number", self.rope_theta);
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps >= 0.0) {
            bail!("model config: rms_norm_eps {} must be a finite number >= 0", self.rms_norm_eps);
        }
        Ok(())
    }

    /// Approximate number of weights of a model of this shape (embeddings, attention and MLP
    /// projections; MoE experts counted once, as the random-weight runtime shares them).
    pub fn approx_weight_count(&self) -> u128 {
        let (v, h, i, l) = (
            self.vocab_size as u128,
            self.hidden_size as u128,
            self.intermediate_size as u128,
            self.num_layers as u128,
        );
        let q = (self.num_heads * self.head_dim) as u128;
        let kv = (self.num_kv_heads * self.head_dim) as u128;
        let moe = self.moe.as_ref().map_or(0, |m| {
            3 * h * (m.moe_intermediate_size * (1 + m.n_shared_experts)) as u128
                + h * m.n_routed_experts as u128
                + m.shared_weight_count(h)
        });
        2 * v * h + l * (2 * h * q + 2 * h * kv + 3 * h * i + moe)
    }

    /// Approximate number of weights a model of this shape holds once loaded from its files,
    /// every routed expert its own (what a load needs in memory).
    pub fn loaded_weight_count(&self) -> u128 {
        let (v, h, i) = (self.vocab_size as u128, self.hidden_size as u128, self.intermediate_size as u128);
        let attention = (2 * self.num_heads * self.head_dim + 2 * self.num_kv_heads * self.head_dim) as u128 * h;
        let mlp = |layer: usize| match &self.moe {
            Some(m) if m.is_moe_layer(layer) => {
                let experts = (m.n_routed_experts + m.n_shared_experts) as u128;
                3 * h * m.moe_intermediate_size as u128 * experts
                    + h * m.n_routed_experts as u128
                    + m.shared_weight_count(h)
            }
            _ => 3 * h * i,
        };
        2 * v * h + (0..self.num_layers).map(|l| attention + mlp(l)).sum::<u128>()
    }

    /// Floats per cached value: `head_dim` for per-head K/V, 0 for latent rows (the values are
    /// the first `kv_lora_rank` floats of the key).
    pub fn value_dim(&self) -> usize {
        if self.mla.is_some() {
            0
        } else {
            self.head_dim
        }
    }

    /// Bytes one token occupies in one cache row (f32).
    pub fn row_bytes_per_token(&self) -> u64 {
        self.row_bytes(4)
    }

    /// Bytes one token occupies in one cache row of `elem_bytes`-byte values.
    pub fn row_bytes(&self, elem_bytes: usize) -> u64 {
        ((self.head_dim + self.value_dim()) * elem_bytes) as u64
    }

    /// Floats per token per layer that a per-head K/V cache of the same attention shape would
    /// hold (for MLA: `heads x (nope + rope + v)`, what decompressed caches store).
    pub fn mha_equivalent_floats_per_token_layer(&self) -> usize {
        match &self.mla {
            Some(m) => self.num_heads * (m.qk_nope_head_dim + m.qk_rope_head_dim + m.v_head_dim),
            None => self.num_kv_heads * 2 * self.head_dim,
        }
    }

    /// Per-head K/V bytes of the same attention shape over the bytes this cache holds, per token
    /// before eviction: 1 for per-head K/V models, the latent saving for MLA.
    pub fn latent_factor(&self) -> f64 {
        self.mha_equivalent_floats_per_token_layer() as f64
            / (self.num_kv_heads * (self.head_dim + self.value_dim())) as f64
    }

    /// The same model with a dense MLP (of `intermediate_size`) in every layer: for mixture-of-
    /// experts models, their attention exactly without the MoE blocks (benchmarks that time the
    /// cache, not the router). Dense models are returned unchanged.
    pub fn with_dense_mlp(mut self) -> Self {
        self.moe = None;
        self
    }

    /// The longest context [`Self::set_context`] takes: the declared one under LongRoPE with long
    /// factors, else the served one.
    pub fn context_limit(&self) -> usize {
        match &self.rope_scaling {
            Some(RopeScaling::LongRope(l)) if l.long_factor.is_some() => {
                l.max_position_embeddings.max(self.max_position_embeddings)
            }
            _ => self.max_position_embeddings,
        }
    }

    /// Serves at most `tokens` positions (`[model] context`), up to [`Self::context_limit`]: fewer
    /// than the model serves, or under LongRoPE more, every position then rotated by the long
    /// factors (see [`LongRopeScaling`]).
    pub fn set_context(&mut self, tokens: usize) -> Result<()> {
        let limit = self.context_limit();
        if tokens == 0 || tokens > limit {
            let why = match &self.rope_scaling {
                Some(RopeScaling::LongRope(l)) if l.long_factor.is_none() => {
                    " (its LongRoPE has no long factors, so it serves its original context)"
                }
                _ => "",
            };
            bail!("[model] context = {tokens}: this model serves 1 to {limit} tokens{why}");
        }
        self.max_position_embeddings = tokens;
        // A window as long as the context hides nothing (as at load).
        self.windows = self.windows.take().filter(|w| (w.window() as usize) < tokens);
        Ok(())
    }

    /// The context an engine without per-layer windows serves exactly: the whole context when
    /// the model has no window, the window when every layer has it (full attention over at
    /// most that many tokens is windowed attention); `None` when only some layers have one.
    pub fn device_context(&self) -> Option<usize> {
        match &self.windows {
            None => Some(self.max_position_embeddings),
            Some(w) if w.layers().iter().all(|&l| l) => Some(self.max_position_embeddings.min(w.window() as usize)),
            Some(_) => None,
        }
    }

    /// Query heads per KV head.
    pub fn gqa(&self) -> usize {
        self.num_heads / self.num_kv_heads
    }

    /// Channels of each head RoPE rotates (the first ones): the whole head unless
    /// [`Self::partial_rotary_dim`] says fewer.
    pub fn rope_dim(&self) -> usize {
        self.partial_rotary_dim.unwrap_or(self.head_dim)
    }

    /// RoPE inverse frequencies (after any scaling), `rope_dim / 2` values.
    pub fn rope_inv_freq(&self) -> Vec<f64> {
        let d = self.rope_dim();
        let base = (0..d / 2).map(|i| 1.0 / self.rope_theta.powf(2.0 * i as f64 / d as f64));
        match &self.rope_scaling {
            None => base.collect(),
            Some(RopeScaling::Llama3(s)) => base.map(|f| llama3_scale(f, s)).collect(),
            Some(RopeScaling::FreqFactors(div)) => base.zip(div).map(|(f, k)| f / k).collect(),
            Some(RopeScaling::LongRope(l)) => {
                let factors = match &l.long_factor {
                    Some(long) if self.max_position_embeddings > l.original_max_position_embeddings => long,
                    _ => &l.short_factor,
                };
                base.zip(factors).map(|(f, k)| f / k).collect()
            }
            Some(RopeScaling::Linear(factor)) => base.map(|f| f / factor).collect(),
            Some(RopeScaling::Yarn(y)) => y.inv_freq(self.rope_theta, d),
        }
    }

    /// Factor on the rotary cos/sin tables: YaRN's attention factor (of the rope part, for latent
    /// attention), else 1.
    pub fn rope_attention_factor(&self) -> f64 {
        match (&self.mla, &self.rope_scaling) {
            (Some(m), _) => m.rope_mscale(),
            (None, Some(RopeScaling::Yarn(y))) => y.attention_factor(),
            (None, Some(RopeScaling::LongRope(l))) => l.attention_factor,
            _ => 1.0,
        }
    }
}

fn parse_mla(c: &HfConfig) -> Result<MlaConfig> {
    let need = |name: &str, v: Option<usize>| -> Result<usize> {
        match v {
            Some(x) if x > 0 => Ok(x),
            _ => bail!("model config: DeepSeek models need a positive `{name}`"),
        }
    };
    let yarn = match &c.rope_scaling {
        None | Some(serde_json::Value::Null) => None,
        Some(v) => {
            let kind = v.get("rope_type").or_else(|| v.get("type")).and_then(|x| x.as_str()).unwrap_or("");
            if kind != "yarn" {
                bail!("model config: rope_scaling type `{kind}` is not supported for DeepSeek (supported: yarn)");
            }
            Some(parse_yarn(v, c.max_position_embeddings.unwrap_or(4096), true)?)
        }
    };
    if c.attention_bias == Some(true) {
        bail!("model config: attention_bias = true is not supported for latent attention");
    }
    let rope = need("qk_rope_head_dim", c.qk_rope_head_dim)?;
    if rope % 2 != 0 {
        bail!("model config: qk_rope_head_dim {rope} must be even");
    }
    Ok(MlaConfig {
        q_lora_rank: c.q_lora_rank.filter(|&r| r > 0),
        kv_lora_rank: need("kv_lora_rank", c.kv_lora_rank)?,
        qk_nope_head_dim: need("qk_nope_head_dim", c.qk_nope_head_dim)?,
        qk_rope_head_dim: rope,
        v_head_dim: need("v_head_dim", c.v_head_dim)?,
        rope_interleave: c.rope_interleave.unwrap_or(true),
        yarn,
    })
}

/// A positive `name`, or an error naming it.
fn positive(name: &str, v: Option<usize>) -> Result<usize> {
    match v {
        Some(x) if x > 0 => Ok(x),
        _ => bail!("model config: mixture-of-experts models need a positive `{name}`"),
    }
}

/// DeepSeek's experts (`n_routed_experts` > 0), with V2's or V3's defaults.
fn parse_deepseek_moe(c: &HfConfig, is_v3: bool) -> Result<Option<MoeConfig>> {
    Ok(match c.n_routed_experts {
        None | Some(0) => None,
        Some(n) => {
            let m = MoeConfig {
                n_routed_experts: n,
                n_shared_experts: c.n_shared_experts.unwrap_or(0),
                gated_shared_width: None,
                num_experts_per_tok: positive("num_experts_per_tok", c.num_experts_per_tok)?,
                moe_intermediate_size: positive("moe_intermediate_size", c.moe_intermediate_size)?,
                first_k_dense_replace: c.first_k_dense_replace.unwrap_or(0),
                moe_layer_freq: c.moe_layer_freq.unwrap_or(1).max(1),
                mlp_only_layers: vec![],
                norm_topk_prob: c.norm_topk_prob.unwrap_or(is_v3),
                routed_scaling_factor: c.routed_scaling_factor.unwrap_or(1.0),
                scoring_func: c
                    .scoring_func
                    .clone()
                    .unwrap_or_else(|| (if is_v3 { "sigmoid" } else { "softmax" }).into()),
                topk_method: c
                    .topk_method
                    .clone()
                    .unwrap_or_else(|| (if is_v3 { "noaux_tc" } else { "greedy" }).into()),
                n_group: c.n_group.unwrap_or(1).max(1),
                topk_group: c.topk_group.unwrap_or(1).max(1),
                oai: None,
            };
            m.check()?;
            Some(m)
        }
    })
}

/// GPT-OSS's experts, as transformers' `GptOssMLP` routes: the router's biased logits, a softmax
/// over the `num_experts_per_tok` (or `experts_per_token`) best of `num_local_experts`, in every
/// layer; an expert is `intermediate_size` wide, with [`OaiExperts`]' activation.
fn parse_gpt_oss_moe(c: &HfConfig) -> Result<MoeConfig> {
    let n = positive("num_local_experts", c.num_local_experts)?;
    let k = positive("num_experts_per_tok", c.num_experts_per_tok.or(c.experts_per_token))?;
    let m = MoeConfig::softmax_top_k(n, k, c.intermediate_size, true)?;
    Ok(MoeConfig { oai: Some(OaiExperts::with_limit(c.swiglu_limit.unwrap_or(7.0))?), ..m })
}

/// Mixtral's experts, as transformers' `MixtralSparseMoeBlock` routes: softmax over
/// `num_local_experts`, the `num_experts_per_tok` best, always renormalised, in every layer; an
/// expert is `intermediate_size` wide.
fn parse_mixtral_moe(c: &HfConfig) -> Result<MoeConfig> {
    let n = positive("num_local_experts", c.num_local_experts)?;
    MoeConfig::softmax_top_k(n, positive("num_experts_per_tok", c.num_experts_per_tok)?, c.intermediate_size, true)
}

/// Qwen3-MoE's (or, `qwen2`, Qwen2-MoE's) experts, as transformers' `Qwen3MoeSparseMoeBlock`
/// routes: softmax over `num_experts`, the `num_experts_per_tok` best, renormalised when
/// `norm_topk_prob` (default false, as in transformers; the published Qwen3-MoE models set it);
/// every layer MoE but `mlp_only_layers`; Qwen2-MoE adds a gated shared expert of
/// `shared_expert_intermediate_size`. A `decoder_sparse_step` other than 1 (no published model)
/// is refused.
fn parse_qwen_moe(c: &HfConfig, qwen2: bool) -> Result<MoeConfig> {
    if let Some(step) = c.decoder_sparse_step.filter(|&s| s != 1) {
        bail!("model config: decoder_sparse_step {step} is not supported (only 1: every layer but mlp_only_layers)");
    }
    let m = MoeConfig::softmax_top_k(
        positive("num_experts", c.num_experts)?,
        positive("num_experts_per_tok", c.num_experts_per_tok)?,
        positive("moe_intermediate_size", c.moe_intermediate_size)?,
        c.norm_topk_prob.unwrap_or(false),
    )?;
    let gated_shared_width = match qwen2 {
        true => Some(positive("shared_expert_intermediate_size", c.shared_expert_intermediate_size)?),
        false => None,
    };
    Ok(MoeConfig { gated_shared_width, mlp_only_layers: c.mlp_only_layers.clone().unwrap_or_default(), ..m })
}

impl MlaConfig {
    /// RoPE inverse frequencies of the rope part (after YaRN, if configured).
    pub fn rope_inv_freq(&self, theta: f64) -> Vec<f64> {
        let d = self.qk_rope_head_dim;
        match &self.yarn {
            Some(y) => y.inv_freq(theta, d),
            None => (0..d / 2).map(|i| 1.0 / theta.powf(2.0 * i as f64 / d as f64)).collect(),
        }
    }

    /// Factor on the rotary cos/sin tables (YaRN mscale ratio; 1 without scaling).
    pub fn rope_mscale(&self) -> f64 {
        self.yarn.as_ref().map_or(1.0, YarnScaling::attention_factor)
    }

    /// Softmax scale: `1/sqrt(nope + rope)`, times mscale(all_dim)^2 under YaRN.
    pub fn softmax_scale(&self) -> f64 {
        let base = 1.0 / ((self.qk_nope_head_dim + self.qk_rope_head_dim) as f64).sqrt();
        match &self.yarn {
            Some(y) if y.mscale_all_dim != 0.0 => {
                let m = YarnScaling::get_mscale(y.factor, y.mscale_all_dim);
                base * m * m
            }
            _ => base,
        }
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

/// The context a model declares, extended to `original_max_position_embeddings x factor` under
/// YaRN (as vLLM serves it: Qwen3 declares 40960 and reaches 131072 with YaRN x4 over 32768),
/// cut to the original context under LongRoPE (see [`LongRopeScaling`]; `[model] context` may
/// raise it).
pub(crate) fn served_context(declared: usize, scaling: Option<&RopeScaling>) -> usize {
    match scaling {
        Some(RopeScaling::Yarn(y)) => declared.max(y.extended_context()),
        Some(RopeScaling::LongRope(l)) => declared.min(l.original_max_position_embeddings),
        _ => declared,
    }
}

/// The model's own attention window, where one is switched on, and the layers it covers:
/// Mistral's `sliding_window` (4096 when absent, as in transformers) and Phi-3's on every layer;
/// Qwen2's and Qwen3's with `use_sliding_window` on the layers from `max_window_layers` on
/// (transformers' default 28); Gemma 3's on every layer but each `sliding_window_pattern`-th
/// (4096 and 6 by default; its local layers, whatever the window); Gemma 2's on every other layer
/// from the first (4096 by default). transformers' `layer_types`, when given, says which layers
/// are windowed.
fn windowed_layers(c: &HfConfig, arch: Arch, default_window: Option<usize>) -> Result<(Option<usize>, Vec<bool>)> {
    let n = c.num_hidden_layers;
    let (window, mut layers) = match arch {
        Arch::Mistral => (c.sliding_window.unwrap_or(default_window), vec![true; n]),
        Arch::Phi3 => (c.sliding_window.flatten(), vec![true; n]),
        Arch::Qwen2 | Arch::Qwen3 if c.use_sliding_window == Some(true) => {
            let from = c.max_window_layers.unwrap_or(28);
            (c.sliding_window.flatten(), (0..n).map(|i| i >= from).collect())
        }
        Arch::Gemma2 => (c.sliding_window.unwrap_or(Some(4096)), (0..n).map(|i| i % 2 == 0).collect()),
        Arch::GptOss => (c.sliding_window.unwrap_or(Some(128)), (0..n).map(|i| i % 2 == 0).collect()),
        Arch::Gemma3 => {
            let every = c.sliding_window_pattern.unwrap_or(6).max(1);
            (c.sliding_window.unwrap_or(Some(4096)), (0..n).map(|i| (i + 1) % every != 0).collect())
        }
        _ => (None, vec![]),
    };
    if let Some(types) = &c.layer_types {
        if types.len() != n {
            bail!("model config: `layer_types` has {} entries for {n} layers", types.len());
        }
        layers = types
            .iter()
            .map(|t| match t.as_str() {
                "sliding_attention" => Ok(true),
                "full_attention" => Ok(false),
                other => {
                    bail!("model config: layer type `{other}` is not supported (sliding_attention, full_attention)")
                }
            })
            .collect::<Result<_>>()?;
    }
    Ok((window, layers))
}

/// The windows a model runs: none when no layer has one, or when the window is at least the
/// context served (Phi-3.5-mini's and Phi-4-mini's 262144, beside 4096 tokens served: no key
/// ever leaves it). `what` names the setting in errors.
pub(crate) fn model_windows(
    window: Option<usize>,
    layers: Vec<bool>,
    context: usize,
    what: &str,
) -> Result<Option<ModelWindows>> {
    let Some(window) = window.filter(|&w| w > 0 && w < context) else { return Ok(None) };
    if !layers.iter().any(|&l| l) {
        return Ok(None);
    }
    let max = dms_policy::MAX_WINDOW;
    let window = u32::try_from(window)
        .ok()
        .filter(|&w| w <= max)
        .with_context(|| format!("{what} {window} is larger than the {max} tokens supported"))?;
    Ok(Some(ModelWindows::new(window, layers).map_err(|e| anyhow::anyhow!("{what}: {e}"))?))
}

/// Gemma 2's or Gemma 3's fields, its local layers being `local_layers`; activations other than
/// GELU (tanh) are refused by name.
fn parse_gemma(c: &HfConfig, arch: Arch, local_layers: Vec<bool>) -> Result<GemmaConfig> {
    if let Some(act) = c.hidden_activation.as_deref().filter(|&a| a != "gelu_pytorch_tanh") {
        bail!("model config: hidden_activation `{act}` is not supported for Gemma (gelu_pytorch_tanh)");
    }
    let cap = |value: Option<f64>, key: &str| -> Result<Option<f64>> {
        match value {
            Some(x) if !(x.is_finite() && x > 0.0) => bail!("model config: {key} must be positive, not {x}"),
            x => Ok(x),
        }
    };
    let scalar = c.query_pre_attn_scalar.unwrap_or(256.0);
    if !(scalar.is_finite() && scalar > 0.0) {
        bail!("model config: query_pre_attn_scalar must be positive, not {scalar}");
    }
    let local_rope_theta = match arch {
        Arch::Gemma3 => Some(c.rope_local_base_freq.unwrap_or(10_000.0)),
        _ => None,
    };
    if let Some(theta) = local_rope_theta.filter(|t| !(t.is_finite() && *t > 0.0)) {
        bail!("model config: rope_local_base_freq must be positive, not {theta}");
    }
    Ok(GemmaConfig {
        query_pre_attn_scalar: scalar,
        local_rope_theta,
        local_layers,
        attn_softcap: cap(c.attn_logit_softcapping, "attn_logit_softcapping")?,
        final_softcap: cap(c.final_logit_softcapping, "final_logit_softcapping")?,
    })
}

/// Granite's multipliers (transformers' defaults of 1 where absent), each positive and finite; the
/// multipliers on another family are refused.
fn granite_scales(c: &HfConfig, granite: bool) -> Result<Option<GraniteScales>> {
    let keys = [
        ("embedding_multiplier", c.embedding_multiplier),
        ("residual_multiplier", c.residual_multiplier),
        ("attention_multiplier", c.attention_multiplier),
        ("logits_scaling", c.logits_scaling),
    ];
    if !granite {
        if let Some((key, _)) = keys.iter().find(|(_, v)| v.is_some()) {
            bail!("model config: `{key}` is read for Granite (model_type `granite`) only");
        }
        return Ok(None);
    }
    let mut v = [1.0; 4];
    for (x, (key, given)) in v.iter_mut().zip(keys) {
        *x = given.unwrap_or(1.0);
        if !(x.is_finite() && *x > 0.0) {
            bail!("model config: {key} must be positive, not {x}");
        }
    }
    Ok(Some(GraniteScales { embedding: v[0], residual: v[1], attention: v[2], logits: v[3] }))
}

/// SmolLM3's layers without RoPE: `no_rope_layers` (1 uses RoPE, 0 does not), else every
/// `no_rope_layer_interval`-th layer (4 by default, as transformers' `SmolLM3Config`); none for
/// the other families, which must not set them. A sliding window on SmolLM3 is refused.
fn nope_layers(c: &HfConfig, smollm3: bool) -> Result<Vec<bool>> {
    let n = c.num_hidden_layers;
    if !smollm3 {
        if c.no_rope_layers.is_some() || c.no_rope_layer_interval.is_some() {
            bail!("model config: `no_rope_layers` is read for SmolLM3 (model_type `smollm3`) only");
        }
        return Ok(vec![]);
    }
    let sliding =
        c.layer_types.iter().flatten().any(|t| t == "sliding_attention") && c.sliding_window.flatten().is_some();
    if c.use_sliding_window == Some(true) || sliding {
        bail!(
            "model config: a sliding window on SmolLM3 (use_sliding_window, sliding_attention layers) is not supported"
        );
    }
    match &c.no_rope_layers {
        Some(flags) if flags.len() != n => {
            bail!("model config: `no_rope_layers` has {} entries for {n} layers", flags.len())
        }
        Some(flags) => flags
            .iter()
            .map(|&f| match f {
                0 => Ok(true),
                1 => Ok(false),
                other => bail!("model config: `no_rope_layers` entries are 0 or 1, not {other}"),
            })
            .collect(),
        None => {
            let every = c.no_rope_layer_interval.unwrap_or(4);
            if every == 0 {
                bail!("model config: `no_rope_layer_interval` must be positive");
            }
            Ok((0..n).map(|i| (i + 1) % every == 0).collect())
        }
    }
}

/// The channels RoPE rotates for `partial_rotary_factor` (transformers' `int(head_dim * factor)`);
/// None for the whole head. Latent attention has its own rope width and takes no factor.
fn partial_rotary_dim(factor: Option<f64>, head_dim: usize, latent: bool) -> Result<Option<usize>> {
    let Some(f) = factor.filter(|&f| f != 1.0) else { return Ok(None) };
    if latent {
        bail!("model config: partial_rotary_factor {f} is not supported for latent attention");
    }
    if !(f > 0.0 && f < 1.0) {
        bail!("model config: partial_rotary_factor must lie in (0, 1], not {f}");
    }
    let dim = (head_dim as f64 * f) as usize;
    if dim == 0 || dim % 2 == 1 {
        bail!("model config: partial_rotary_factor {f} of a {head_dim}-wide head rotates {dim} channels: not a positive even count");
    }
    Ok(Some(dim))
}

/// A multimodal Gemma 3 (`model_type = "gemma3"`) keeps its decoder's settings in
/// `text_config`: they are read as a text model's (`gemma3_text`), whose weights the loader
/// finds under the language model's prefix.
fn lift_text_config(v: &mut serde_json::Value) {
    let Some(obj) = v.as_object_mut() else { return };
    if obj.get("model_type").and_then(|m| m.as_str()) != Some("gemma3") {
        return;
    }
    let Some(serde_json::Value::Object(text)) = obj.get("text_config").cloned() else { return };
    for (k, x) in text {
        obj.insert(k, x);
    }
    obj.insert("model_type".into(), "gemma3_text".into());
    obj.insert("architectures".into(), serde_json::json!(["Gemma3ForCausalLM"]));
}

/// transformers' `Gemma3TextConfig` and `Gemma2Config` defaults, for the keys a Gemma
/// config.json leaves out (the multimodal Gemma 3 checkpoints' `text_config` gives few: no
/// vocabulary size or head counts). A key given as null stays null: Gemma 2's soft-capping is on
/// unless config.json switches it off so.
fn fill_gemma_defaults(v: &mut serde_json::Value) {
    let Some(obj) = v.as_object_mut() else { return };
    let model_type = obj.get("model_type").and_then(|m| m.as_str());
    let arch = obj.get("architectures").and_then(|a| a.get(0)).and_then(|a| a.as_str());
    let defaults = if model_type == Some("gemma3_text") || arch == Some("Gemma3ForCausalLM") {
        serde_json::json!({
            "vocab_size": 262_208, "hidden_size": 2304, "intermediate_size": 9216, "num_hidden_layers": 26,
            "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256, "max_position_embeddings": 131_072,
            "rms_norm_eps": 1e-6, "rope_theta": 1_000_000.0, "query_pre_attn_scalar": 256, "sliding_window": 4096,
            "rope_local_base_freq": 10_000.0, "tie_word_embeddings": true,
        })
    } else if model_type == Some("gemma2") || arch == Some("Gemma2ForCausalLM") {
        serde_json::json!({
            "vocab_size": 256_000, "hidden_size": 2304, "intermediate_size": 9216, "num_hidden_layers": 26,
            "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256, "max_position_embeddings": 8192,
            "rms_norm_eps": 1e-6, "rope_theta": 10_000.0, "query_pre_attn_scalar": 256, "sliding_window": 4096,
            "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0, "tie_word_embeddings": true,
        })
    } else {
        return;
    };
    for (k, x) in defaults.as_object().into_iter().flatten() {
        obj.entry(k.clone()).or_insert_with(|| x.clone());
    }
}

/// transformers 5 saves `rope_theta`, `partial_rotary_factor` and the RoPE scaling (its
/// `rope_type`, "default" meaning none) in `rope_parameters`; they are read as the top-level
/// `rope_theta`, `partial_rotary_factor` and `rope_scaling` transformers 4 wrote, where those are
/// not given.
fn lift_rope_parameters(v: &mut serde_json::Value) {
    let Some(obj) = v.as_object_mut() else { return };
    let Some(serde_json::Value::Object(mut p)) = obj.get("rope_parameters").cloned() else { return };
    // Per layer type (Gemma 3): the global layers' parameters, and the local layers' base.
    if let Some(serde_json::Value::Object(full)) = p.get("full_attention").cloned() {
        if let Some(theta) = p.get("sliding_attention").and_then(|s| s.get("rope_theta")) {
            obj.entry("rope_local_base_freq").or_insert_with(|| theta.clone());
        }
        p = full;
    }
    for key in ["rope_theta", "partial_rotary_factor"] {
        if let Some(x) = p.get(key) {
            obj.entry(key).or_insert_with(|| x.clone());
        }
    }
    let kind = p.get("rope_type").or_else(|| p.get("type")).and_then(|x| x.as_str()).unwrap_or("default");
    if kind != "default" && obj.get("rope_scaling").is_none_or(serde_json::Value::is_null) {
        obj.insert("rope_scaling".into(), serde_json::Value::Object(p));
    }
}

/// LongRoPE from config.json's `rope_scaling` (`short_factor`, `attention_factor`) and the
/// config's `original_max_position_embeddings` (else the scaling's own, else `declared`), read as
/// transformers' `_compute_longrope_parameters` reads them.
fn parse_longrope(v: &serde_json::Value, declared: usize, original: Option<usize>) -> Result<LongRopeScaling> {
    let short_factor = v
        .get("short_factor")
        .and_then(|x| x.as_array())
        .and_then(|a| a.iter().map(|x| x.as_f64()).collect::<Option<Vec<f64>>>())
        .context("model config: rope_scaling (longrope) needs `short_factor`, a list of numbers")?;
    let own = v.get("original_max_position_embeddings").and_then(|x| x.as_u64()).and_then(|x| usize::try_from(x).ok());
    let long_factor = match v.get("long_factor") {
        None | Some(serde_json::Value::Null) => None,
        Some(x) => Some(
            x.as_array()
                .and_then(|a| a.iter().map(|x| x.as_f64()).collect::<Option<Vec<f64>>>())
                .context("model config: rope_scaling (longrope) `long_factor` must be a list of numbers")?,
        ),
    };
    let original = original.or(own).unwrap_or(declared);
    let attention_factor = match v.get("attention_factor") {
        None | Some(serde_json::Value::Null) => LongRopeScaling::default_attention_factor(declared, original),
        Some(x) => x.as_f64().context("model config: rope_scaling.attention_factor is not a number")?,
    };
    Ok(LongRopeScaling {
        short_factor,
        long_factor,
        attention_factor,
        original_max_position_embeddings: original,
        max_position_embeddings: declared,
    })
}

/// YaRN from config.json's `rope_scaling`, read as transformers' `_compute_yarn_parameters`
/// reads it: `factor` (else `max_position_embeddings / original_max_position_embeddings`),
/// `original_max_position_embeddings` (else `max_position_embeddings`, here `declared`), betas
/// 32 and 1 when absent or 0, `attention_factor`, `truncate`. DeepSeek's mscale pair is kept as
/// given (`deepseek`, its softmax scale reads `mscale_all_dim`); other models use the pair only
/// when both are non-zero, else the attention factor is `0.1 ln(factor) + 1`.
fn parse_yarn(v: &serde_json::Value, declared: usize, deepseek: bool) -> Result<YarnScaling> {
    let opt = |k: &str| -> Result<Option<f64>> {
        match v.get(k) {
            None | Some(serde_json::Value::Null) => Ok(None),
            Some(x) => x.as_f64().map(Some).with_context(|| format!("model config: rope_scaling.{k} is not a number")),
        }
    };
    let original = opt("original_max_position_embeddings")?.unwrap_or(declared as f64);
    let factor = match opt("factor")? {
        Some(f) => f,
        None if original > 0.0 => declared as f64 / original,
        None => bail!("model config: rope_scaling (yarn) needs `factor`"),
    };
    let (mscale, mscale_all_dim) = match (opt("mscale")?, opt("mscale_all_dim")?) {
        (m, a) if deepseek => (m.unwrap_or(1.0), a.unwrap_or(0.0)),
        (Some(m), Some(a)) if m != 0.0 && a != 0.0 => (m, a),
        _ => (1.0, 0.0),
    };
    let truncate = match v.get("truncate") {
        None | Some(serde_json::Value::Null) => true,
        Some(t) => t.as_bool().context("model config: rope_scaling.truncate is not a boolean")?,
    };
    let y = YarnScaling {
        factor,
        original_max_position_embeddings: original,
        beta_fast: opt("beta_fast")?.filter(|&b| b != 0.0).unwrap_or(32.0),
        beta_slow: opt("beta_slow")?.filter(|&b| b != 0.0).unwrap_or(1.0),
        mscale,
        mscale_all_dim,
        attention_factor: opt("attention_factor")?,
        truncate,
    };
    y.check()?;
    Ok(y)
}

fn parse_rope_scaling(v: &serde_json::Value, declared: usize, original: Option<usize>) -> Result<RopeScaling> {
    let kind = v.get("rope_type").or_else(|| v.get("type")).and_then(|x| x.as_str()).unwrap_or("");
    let num = |k: &str| -> Result<f64> {
        v.get(k)
            .and_then(|x| x.as_f64())
            .with_context(|| format!("model config: rope_scaling.{k} is missing or not a number"))
    };
    match kind {
        "llama3" => {}
        "linear" => return Ok(RopeScaling::Linear(num("factor")?)),
        "yarn" => return Ok(RopeScaling::Yarn(parse_yarn(v, declared, false)?)),
        "longrope" | "su" => return parse_longrope(v, declared, original).map(RopeScaling::LongRope),
        _ => bail!(
            "model config: rope_scaling type `{kind}` is not supported (supported: llama3, linear, yarn, longrope)"
        ),
    }
    let s = Llama3RopeScaling {
        factor: num("factor")?,
        low_freq_factor: num("low_freq_factor")?,
        high_freq_factor: num("high_freq_factor")?,
        original_max_position_embeddings: num("original_max_position_embeddings")?,
    };
    let positive = |x: f64| x.is_finite() && x > 0.0;
    if !(positive(s.factor)
        && positive(s.low_freq_factor)
        && positive(s.original_max_position_embeddings)
        && s.high_freq_factor.is_finite()
        && s.high_freq_factor > s.low_freq_factor)
    {
        bail!(
            "model config: rope_scaling (llama3) needs factor, low_freq_factor and original_max_position_embeddings \
             positive and finite, and high_freq_factor > low_freq_factor (got factor {}, low_freq_factor {}, \
             high_freq_factor {}, original_max_position_embeddings {})",
            s.factor,
            s.low_freq_factor,
            s.high_freq_factor,
            s.original_max_position_embeddings
        );
    }
    Ok(RopeScaling::Llama3(s))
}

#[cfg(test)]
mod mla_tests {
    use super::*;

    #[test]
    fn deepseek_v2_lite_yarn_follows_the_published_formulas() {
        let text = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../configs/models/deepseek-v2-lite/config.json"
        ))
        .unwrap();
        let c = ModelConfig::from_hf_json(&text).unwrap();
        let m = c.mla.as_ref().unwrap();
        assert_eq!((c.num_kv_heads, c.head_dim, c.value_dim()), (1, 576, 0));
        let dense = c.clone().with_dense_mlp();
        assert!(c.moe.is_some() && dense.moe.is_none() && dense.mla == c.mla, "the MoE blocks go, nothing else");
        assert_eq!((dense.head_dim, dense.num_heads, dense.intermediate_size), (576, 16, 10944));
        assert_eq!(dense.mla.as_ref().unwrap().kv_lora_rank, 512);
        assert!((c.latent_factor() - 5120.0 / 576.0).abs() < 1e-12);
        // Correction dims: 64 ln(4096 / (2 pi beta)) / (2 ln 10000) = 10.47 (beta 32) and 22.5 (beta 1),
        // so frequencies 0..=10 are kept, 23.. are divided by 40, and 11..22 blend linearly.
        let inv = m.rope_inv_freq(10000.0);
        let f = |i: usize| 10000f64.powf(-(2.0 * i as f64) / 64.0);
        assert_eq!(inv.len(), 32);
        for i in [0usize, 5, 10] {
            assert!((inv[i] - f(i)).abs() < 1e-15 * f(i).max(1.0), "i {i}");
        }
        for i in [23usize, 31] {
            assert!((inv[i] - f(i) / 40.0).abs() < 1e-15, "i {i}");
        }
        let r = (16.0 - 10.0) / 13.0;
        assert!((inv[16] - (f(16) * (1.0 - r) + f(16) / 40.0 * r)).abs() < 1e-15);
        // mscale 0.707 = mscale_all_dim: the rotary tables are unscaled and the softmax scale is
        // (128 + 64)^-1/2 x (0.1 x 0.707 x ln 40 + 1)^2.
        assert!((m.rope_mscale() - 1.0).abs() < 1e-12);
        let ms = 0.1 * 0.707 * 40f64.ln() + 1.0;
        assert!((m.softmax_scale() - ms * ms / 192f64.sqrt()).abs() < 1e-12);
        let moe = c.moe.as_ref().unwrap();
        assert!(!moe.is_moe_layer(0) && moe.is_moe_layer(1) && moe.is_moe_layer(26));
        assert_eq!(
            (moe.scoring_func.as_str(), moe.topk_method.as_str(), moe.norm_topk_prob),
            ("softmax", "greedy", false)
        );
    }
}

#[cfg(test)]
mod rope_scaling_tests {
    use super::*;

    fn llama_config(rope_scaling: &str) -> Result<ModelConfig> {
        ModelConfig::from_hf_json(&format!(
            r#"{{"architectures": ["LlamaForCausalLM"], "vocab_size": 32, "hidden_size": 64, "intermediate_size": 128,
                "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2, "rope_scaling": {rope_scaling}}}"#
        ))
    }

    /// config.json's `linear` scaling divides every frequency by its factor; other kinds are
    /// refused naming the supported ones.
    #[test]
    fn linear_rope_scaling_divides_every_frequency() {
        let plain = llama_config("null").unwrap();
        let linear = llama_config(r#"{"type": "linear", "factor": 2.0}"#).unwrap();
        assert_eq!(linear.rope_scaling, Some(RopeScaling::Linear(2.0)));
        let want: Vec<f64> = plain.rope_inv_freq().iter().map(|f| f / 2.0).collect();
        assert_eq!(linear.rope_inv_freq(), want);
        let e = format!("{:#}", llama_config(r#"{"type": "dynamic", "factor": 2.0}"#).unwrap_err());
        assert!(e.contains("dynamic") && e.contains("linear"), "{e}");
        let e = format!("{:#}", llama_config(r#"{"rope_type": "linear", "factor": 0}"#).unwrap_err());
        assert!(e.contains("factor"), "{e}");
    }

    /// Qwen3-30B-A3B's published config with `edits` applied (key, JSON value).
    fn qwen3_30b_a3b(edits: &[(&str, serde_json::Value)]) -> Result<ModelConfig> {
        let mut c = serde_json::json!({"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe",
            "vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 6144, "num_hidden_layers": 48,
            "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128, "max_position_embeddings": 40960,
            "rope_theta": 1000000.0, "rms_norm_eps": 1e-06, "tie_word_embeddings": false, "decoder_sparse_step": 1,
            "moe_intermediate_size": 768, "norm_topk_prob": true, "num_experts_per_tok": 8, "num_experts": 128,
            "mlp_only_layers": [], "rope_scaling": null});
        for (k, v) in edits {
            c[*k] = v.clone();
        }
        ModelConfig::from_hf_json(&c.to_string())
    }

    /// Every layer is MoE unless listed in `mlp_only_layers`; the routing is renormalised
    /// softmax over the 8 best of 128; a sparse step other than 1, a single renormalised expert
    /// or a missing expert count are refused by name.
    #[test]
    fn qwen3_moe_config_reads_its_experts() {
        use serde_json::json;
        let c = qwen3_30b_a3b(&[]).unwrap();
        assert_eq!((c.arch, c.qk_norm, c.mla.is_none()), (Arch::Qwen3, true, true));
        let m = c.moe.clone().unwrap();
        assert_eq!((m.n_routed_experts, m.num_experts_per_tok, m.moe_intermediate_size), (128, 8, 768));
        assert_eq!((m.n_shared_experts, m.norm_topk_prob, m.routed_scaling_factor), (0, true, 1.0));
        assert!((0..48).all(|i| m.is_moe_layer(i)));
        let m = qwen3_30b_a3b(&[("mlp_only_layers", json!([0, 47]))]).unwrap().moe.unwrap();
        assert!(!m.is_moe_layer(0) && m.is_moe_layer(1) && m.is_moe_layer(46) && !m.is_moe_layer(47));
        let m = qwen3_30b_a3b(&[("norm_topk_prob", json!(null))]).unwrap().moe.unwrap();
        assert!(!m.norm_topk_prob, "transformers' default");
        // Qwen2-MoE: the same routing, q/k/v biases and a gated shared expert of its own width.
        let qwen2 = [("architectures", json!(["Qwen2MoeForCausalLM"])), ("model_type", json!("qwen2_moe"))];
        let e = format!("{:#}", qwen3_30b_a3b(&qwen2).unwrap_err());
        assert!(e.contains("shared_expert_intermediate_size"), "{e}");
        let c = qwen3_30b_a3b(&[qwen2[0].clone(), qwen2[1].clone(), ("shared_expert_intermediate_size", json!(5632))]);
        let c = c.unwrap();
        assert_eq!((c.arch, c.attention_bias, c.moe.unwrap().gated_shared_width), (Arch::Qwen2, true, Some(5632)));
        for (k, v, named) in [
            ("decoder_sparse_step", json!(2), "decoder_sparse_step"),
            ("num_experts_per_tok", json!(1), "num_experts_per_tok 1"),
            ("num_experts", json!(0), "num_experts"),
            ("num_experts_per_tok", json!(129), "MoE routing"),
        ] {
            let e = format!("{:#}", qwen3_30b_a3b(&[(k, v)]).unwrap_err());
            assert!(e.contains(named), "{k}: {e}");
        }
    }

    /// Mixtral-8x7B's config: experts as wide as `intermediate_size`, renormalised top 2 of 8 in
    /// every layer, RoPE base 1e6 when absent, and no window unless one is given (transformers'
    /// defaults, unlike Mistral's 4096).
    #[test]
    fn mixtral_config_reads_its_experts_and_no_default_window() {
        let text = |extra: &str| {
            format!(
                r#"{{"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "vocab_size": 32000,
                    "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                    "num_attention_heads": 32, "num_key_value_heads": 8, "max_position_embeddings": 32768,
                    "num_local_experts": 8 {extra}}}"#
            )
        };
        let c = ModelConfig::from_hf_json(&text(r#", "num_experts_per_tok": 2"#)).unwrap();
        let m = c.moe.clone().unwrap();
        assert_eq!(
            (c.arch, m.n_routed_experts, m.num_experts_per_tok, m.moe_intermediate_size),
            (Arch::Mistral, 8, 2, 14336)
        );
        assert!(m.norm_topk_prob && (0..32).all(|i| m.is_moe_layer(i)));
        assert_eq!((c.max_position_embeddings, c.rope_theta), (32768, 1e6));
        assert_eq!(c.windows, None);
        let windowed =
            ModelConfig::from_hf_json(&text(r#", "num_experts_per_tok": 2, "sliding_window": 4096"#)).unwrap();
        assert_eq!(windowed.max_position_embeddings, 32768);
        assert_eq!(windowed.windows, Some(ModelWindows::new(4096, vec![true; 32]).unwrap()));
        let e = format!("{:#}", ModelConfig::from_hf_json(&text(r#", "num_experts_per_tok": 1"#)).unwrap_err());
        assert!(e.contains("num_experts_per_tok 1"), "{e}");
        let e = format!("{:#}", ModelConfig::from_hf_json(&text("")).unwrap_err());
        assert!(e.contains("num_experts_per_tok"), "{e}");
    }

    /// google/gemma-3-4b-it's config.json as published: a multimodal config whose `text_config`
    /// leaves the vocabulary and head counts to `Gemma3TextConfig`'s defaults; and the same
    /// model as transformers 5 writes it, RoPE parameters per layer type.
    #[test]
    fn gemma3_configs_read_as_transformers_reads_them() {
        let published = r#"{"architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3",
            "boi_token_index": 255999, "eos_token_id": [1, 106], "mm_tokens_per_image": 256,
            "text_config": {"hidden_size": 2560, "intermediate_size": 10240, "model_type": "gemma3_text",
                "num_hidden_layers": 34, "rope_scaling": {"factor": 8.0, "rope_type": "linear"}, "sliding_window": 1024},
            "vision_config": {"hidden_size": 1152, "model_type": "siglip_vision_model"}}"#;
        let c = ModelConfig::from_hf_json(published).unwrap();
        assert_eq!((c.arch, c.vocab_size, c.hidden_size, c.num_layers), (Arch::Gemma3, 262_208, 2560, 34));
        assert_eq!((c.num_heads, c.num_kv_heads, c.head_dim, c.max_position_embeddings), (8, 4, 256, 131_072));
        assert_eq!(
            (c.rope_theta, c.rope_scaling.clone(), c.tie_word_embeddings),
            (1e6, Some(RopeScaling::Linear(8.0)), true)
        );
        assert_eq!(c.eos_token_ids, [1, 106]);
        let local: Vec<bool> = (0..34).map(|i| (i + 1) % 6 != 0).collect();
        let g = c.gemma.clone().unwrap();
        assert_eq!((g.query_pre_attn_scalar, g.local_rope_theta, &g.local_layers), (256.0, Some(10_000.0), &local));
        assert_eq!((g.attn_softcap, g.final_softcap), (None, None));
        assert_eq!(c.windows, Some(ModelWindows::new(1024, local.clone()).unwrap()));
        let v5 = r#"{"architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", "hidden_size": 2560,
            "intermediate_size": 10240, "num_hidden_layers": 34, "sliding_window": 1024,
            "rope_parameters": {"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0},
                "sliding_attention": {"rope_type": "default", "rope_theta": 20000.0}}}"#;
        let c5 = ModelConfig::from_hf_json(v5).unwrap();
        assert_eq!((c5.rope_theta, c5.rope_scaling.clone()), (1e6, Some(RopeScaling::Linear(8.0))));
        assert_eq!(c5.gemma.unwrap().local_rope_theta, Some(20_000.0));
        // Without a window the local layers keep their own RoPE base.
        let no_window = published.replace(r#""sliding_window": 1024"#, r#""sliding_window": null"#);
        let c = ModelConfig::from_hf_json(&no_window).unwrap();
        assert_eq!((c.windows, c.gemma.unwrap().local_layers), (None, local));
    }

    /// google/gemma-2-9b's config.json as published (soft-capping on, a window of 4096 on every
    /// other layer from the first, no q/k norms, no local RoPE base), and a fine-tune's with the
    /// attention's capping switched off by null; capping left out is `Gemma2Config`'s default.
    #[test]
    fn gemma2_configs_read_as_transformers_reads_them() {
        let published = r#"{"architectures": ["Gemma2ForCausalLM"], "attention_bias": false,
            "attention_dropout": 0.0, "attn_logit_softcapping": 50.0, "bos_token_id": 2, "cache_implementation": "hybrid",
            "eos_token_id": 1, "final_logit_softcapping": 30.0, "head_dim": 256, "hidden_act": "gelu_pytorch_tanh",
            "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 3584, "initializer_range": 0.02,
            "intermediate_size": 14336, "max_position_embeddings": 8192, "model_type": "gemma2",
            "num_attention_heads": 16, "num_hidden_layers": 42, "num_key_value_heads": 8, "pad_token_id": 0,
            "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-06, "rope_theta": 10000.0, "sliding_window": 4096,
            "sliding_window_size": 4096, "torch_dtype": "float32", "transformers_version": "4.42.0.dev0",
            "use_cache": true, "vocab_size": 256000}"#;
        let c = ModelConfig::from_hf_json(published).unwrap();
        assert_eq!(
            (c.arch, c.vocab_size, c.hidden_size, c.num_layers, c.head_dim),
            (Arch::Gemma2, 256_000, 3584, 42, 256)
        );
        assert_eq!(
            (c.qk_norm, c.tie_word_embeddings, c.rope_theta, c.max_position_embeddings),
            (false, true, 1e4, 8192)
        );
        let local: Vec<bool> = (0..42).map(|i| i % 2 == 0).collect();
        let g = c.gemma.clone().unwrap();
        assert_eq!((g.query_pre_attn_scalar, g.local_rope_theta, &g.local_layers), (256.0, None, &local));
        assert_eq!((g.attn_softcap, g.final_softcap), (Some(50.0), Some(30.0)));
        assert_eq!(c.windows, Some(ModelWindows::new(4096, local).unwrap()));
        let uncapped = published.replace(r#""attn_logit_softcapping": 50.0"#, r#""attn_logit_softcapping": null"#);
        let g = ModelConfig::from_hf_json(&uncapped).unwrap().gemma.unwrap();
        assert_eq!((g.attn_softcap, g.final_softcap), (None, Some(30.0)));
        let defaults = published
            .replace(r#""attn_logit_softcapping": 50.0, "#, "")
            .replace(r#""final_logit_softcapping": 30.0, "#, "");
        let g = ModelConfig::from_hf_json(&defaults).unwrap().gemma.unwrap();
        assert_eq!((g.attn_softcap, g.final_softcap), (Some(50.0), Some(30.0)));
        let e = format!("{:#}", ModelConfig::from_hf_json(&published.replace("50.0", "-1.0")).unwrap_err());
        assert!(e.contains("attn_logit_softcapping must be positive"), "{e}");
    }

    /// A window at least as long as the context served hides nothing (Phi-3.5-mini's 262144
    /// beside 131072 positions): the model has no window, and the device engine serves it whole.
    #[test]
    fn a_window_no_shorter_than_the_context_is_no_window() {
        let phi = |window: usize| {
            ModelConfig::from_hf_json(&format!(
                r#"{{"architectures": ["Phi3ForCausalLM"], "vocab_size": 32, "hidden_size": 64, "intermediate_size": 128,
                "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": 4096, "sliding_window": {window}}}"#
            ))
            .unwrap()
        };
        assert_eq!((phi(262_144).windows, phi(262_144).device_context()), (None, Some(4096)));
        assert_eq!((phi(4096).windows, phi(4096).device_context()), (None, Some(4096)));
        assert_eq!(phi(2047).windows, Some(ModelWindows::new(2047, vec![true, true]).unwrap()));
        assert_eq!(phi(2047).device_context(), Some(2047));
    }

    /// transformers 5 saves `rope_theta`, the scaling and `partial_rotary_factor` in
    /// `rope_parameters`: they mean what the top-level keys transformers 4 wrote mean.
    #[test]
    fn transformers_5_rope_parameters_are_read_as_transformers_4_keys() {
        let with = |params: &str| {
            ModelConfig::from_hf_json(
                &(r#"{"architectures": ["Qwen3ForCausalLM"], "vocab_size": 32, "hidden_size": 4096,
                "intermediate_size": 128, "num_hidden_layers": 1, "num_attention_heads": 32, "num_key_value_heads": 8,
                "head_dim": 128, "max_position_embeddings": 40960, "rope_parameters": "#
                    .to_string()
                    + params
                    + "}"),
            )
        };
        let plain = with(r#"{"rope_type": "default", "rope_theta": 1000000.0}"#).unwrap();
        assert_eq!((plain.rope_theta, plain.rope_scaling.is_none()), (1e6, true));
        let yarn = r#"{"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768"#;
        let got = with(&format!(r#"{yarn}, "rope_theta": 1000000.0}}"#)).unwrap();
        let want = qwen3_8b(&format!("{yarn}}}")).unwrap();
        assert_eq!(
            (got.rope_inv_freq(), got.rope_attention_factor()),
            (want.rope_inv_freq(), want.rope_attention_factor())
        );
        assert_eq!(got.max_position_embeddings, 131072);
        let partial =
            with(r#"{"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.75}"#).unwrap();
        assert_eq!((partial.partial_rotary_dim, partial.rope_inv_freq().len()), (Some(96), 48));
        // transformers' frequencies over the rotated channels: base^(-2i / 96).
        assert_eq!(partial.rope_inv_freq()[1], 1.0 / 10000f64.powf(2.0 / 96.0));
        for bad in ["0.0", "1.5", "0.0078125"] {
            let e = with(&format!(r#"{{"rope_theta": 10000.0, "partial_rotary_factor": {bad}}}"#)).unwrap_err();
            assert!(format!("{e:#}").contains("partial_rotary_factor"), "{bad}: {e:#}");
        }
    }

    fn qwen3_8b(rope_scaling: &str) -> Result<ModelConfig> {
        ModelConfig::from_hf_json(&format!(
            r#"{{"architectures": ["Qwen3ForCausalLM"], "vocab_size": 32, "hidden_size": 4096, "intermediate_size": 128,
                "num_hidden_layers": 1, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
                "rope_theta": 1000000.0, "max_position_embeddings": 40960, "rope_scaling": {rope_scaling}}}"#
        ))
    }

    /// Qwen3-8B with the YaRN setting its model card gives (factor 4 over 32768). Correction dims:
    /// 128 ln(32768 / (2 pi beta)) / (2 ln 1e6) = 23.6 (beta 32) and 39.65 (beta 1), so
    /// frequencies 0..=23 are kept, 40.. divided by 4 and 24..=39 blend linearly; the tables are
    /// scaled by 0.1 ln 4 + 1, and 131072 positions are served.
    #[test]
    fn qwen3_yarn_follows_the_published_formulas() {
        let c = qwen3_8b(r#"{"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}"#).unwrap();
        let f = |i: usize| 1e6f64.powf(-(2.0 * i as f64) / 128.0);
        let inv = c.rope_inv_freq();
        assert_eq!(inv.len(), 64);
        for i in [0usize, 12, 23] {
            assert!((inv[i] - f(i)).abs() < 1e-15, "i {i}");
        }
        for i in [40usize, 63] {
            assert!((inv[i] - f(i) / 4.0).abs() < 1e-18, "i {i}");
        }
        let r = (30.0 - 23.0) / 17.0;
        assert!((inv[30] - (f(30) * (1.0 - r) + f(30) / 4.0 * r)).abs() < 1e-15);
        assert!((c.rope_attention_factor() - (0.1 * 4f64.ln() + 1.0)).abs() < 1e-12);
        assert_eq!(c.max_position_embeddings, 131072);
        // `truncate: false` keeps the correction dims as they are (23.6, 39.65): the ramp starts
        // later and ends sooner, so 24 is interpolated less and 39 more.
        let t = qwen3_8b(
            r#"{"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768,
            "truncate": false}"#,
        )
        .unwrap();
        let ti = t.rope_inv_freq();
        assert!(ti[23] == inv[23] && ti[24] > inv[24] && ti[39] < inv[39] && ti[40] == inv[40]);
        // An explicit attention factor wins; the mscale pair counts only when both are non-zero.
        let a = qwen3_8b(r#"{"rope_type": "yarn", "factor": 4.0, "attention_factor": 1.5}"#).unwrap();
        assert_eq!(a.rope_attention_factor(), 1.5);
        let pair = qwen3_8b(r#"{"rope_type": "yarn", "factor": 4.0, "mscale": 2.0, "mscale_all_dim": 1.0}"#).unwrap();
        let ms = |m: f64| 0.1 * m * 4f64.ln() + 1.0;
        assert!((pair.rope_attention_factor() - ms(2.0) / ms(1.0)).abs() < 1e-12);
        let one = qwen3_8b(r#"{"rope_type": "yarn", "factor": 4.0, "mscale": 2.0}"#).unwrap();
        assert!((one.rope_attention_factor() - ms(1.0)).abs() < 1e-12);
        // Without `original_max_position_embeddings` the declared context is the original one;
        // without `factor`, the factor is the declared context over the original.
        let no_orig = qwen3_8b(r#"{"rope_type": "yarn", "factor": 2.0}"#).unwrap();
        assert_eq!(no_orig.max_position_embeddings, 81920);
        let no_factor = qwen3_8b(r#"{"rope_type": "yarn", "original_max_position_embeddings": 10240}"#).unwrap();
        let Some(RopeScaling::Yarn(y)) = no_factor.rope_scaling else { panic!("yarn") };
        assert_eq!(y.factor, 4.0);
        for bad in [
            r#"{"rope_type": "yarn", "factor": 0}"#,
            r#"{"rope_type": "yarn", "factor": 4.0, "beta_fast": 1, "beta_slow": 32}"#,
            r#"{"rope_type": "yarn", "factor": 4.0, "attention_factor": -1}"#,
            r#"{"rope_type": "yarn", "factor": "4"}"#,
            r#"{"rope_type": "yarn", "factor": 4.0, "truncate": "no"}"#,
            r#"{"rope_type": "yarn", "factor": 1e30, "original_max_position_embeddings": 32768}"#,
        ] {
            let e = format!("{:#}", qwen3_8b(bad).unwrap_err());
            assert!(e.contains("rope_scaling"), "{bad}: {e}");
        }
    }
}
