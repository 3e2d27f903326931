//! Decoder (Llama 2/3, Mistral, Qwen2, Qwen3, SmolLM2 with per-head K/V; DeepSeek V2/V3 with
//! latent attention and MoE). One forward over a batch of sequences; the attention of each layer
//! goes through a [`KvBackend`], so the model names no storage type.

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Module, Tensor};
use candle_nn::Linear;
use dms_policy::Pos;

pub mod distill_kl;
pub mod train;
pub mod train_attention;

use super::config::ModelConfig;
use super::fused::check_qkv_rows;
use super::linear::{Embedding, Proj};
use super::lora::{AttentionLora, LoraTarget};
use super::mla::{MlaAttention, MlaInputs};
use super::moe::{Activation, Mlp, Moe};
use super::weights::{WeightForm, Weights};
use crate::kv::backend::{DecisionSpan, KvBackend, LayerStep, Signals};

/// Where DMS decision scores come from (spec rule 1).
#[derive(Debug, Clone)]
pub enum DecisionSource {
    /// The model has no decision signal.
    None,
    /// Channel `head_dim - 1` of the first query head of each KV group, read before RoPE and
    /// zeroed before and after RoPE.
    QueryNeuron,
    /// Per layer an RMSNorm + Linear(hidden -> n_kv_heads) on the residual stream: the
    /// checkpoint's own and any number of attached adapters, each policy reading its own.
    Adapter,
}

/// One set of decision weights (spec rule 1.2): per layer an RMSNorm weight and a
/// Linear(hidden -> n_kv_heads).
#[derive(Clone)]
struct DecisionAdapter {
    /// The name policies give it (their `adapter` value); `None` for the checkpoint's own.
    key: Option<String>,
    /// Per layer, the norm weight and the projection.
    layers: Vec<(Tensor, Linear)>,
    /// With `dms_alpha_per = "layer"` (rule 1.5): `[kv_heads, kv_heads]`, every column picking
    /// head 0's score (a one-hot matmul, so exact, and capture-clean where a broadcast is not).
    head0: Option<Tensor>,
    /// A LoRA on the attention projections, applied to the sequences whose policy reads this
    /// adapter's decisions.
    lora: Option<AttentionLora>,
}

/// Consecutive tokens of a forward whose decisions one adapter computes: (first token, tokens,
/// index into the model's adapters).
type AdapterRun = (usize, usize, usize);

/// Consecutive tokens of a forward that one adapter's LoRA adapts (`None`: the model as loaded):
/// (first token, tokens, index into the model's adapters).
type LoraRun = (usize, usize, Option<usize>);

/// One layer's attention inputs.
struct AttnInputs {
    q: Tensor,
    k: Tensor,
    v: Tensor,
    decision: Option<Tensor>,
    key_norms: Option<Tensor>,
}

/// Per-head K/V attention weights.
struct MhaWeights {
    q_proj: Proj,
    k_proj: Proj,
    v_proj: Proj,
    o_proj: Proj,
    q_norm: Option<Tensor>,
    k_norm: Option<Tensor>,
    /// GPT-OSS's sink logit per query head.
    sinks: Option<Vec<f32>>,
}

/// A layer's attention.
enum Attention {
    /// Per-head K/V (Llama family).
    Mha(MhaWeights),
    /// Latent attention (DeepSeek).
    Mla(Box<MlaAttention>),
}

/// A layer's feed-forward block.
enum FeedForward {
    /// SwiGLU MLP.
    Dense(Mlp),
    /// Mixture of experts.
    Moe(Box<Moe>),
}

impl FeedForward {
    fn forward(&self, h: &Tensor) -> Result<Tensor> {
        match self {
            FeedForward::Dense(m) => m.forward(h),
            FeedForward::Moe(m) => m.forward(h),
        }
    }

    /// With elementary ops only (SwiGLU via `x * sigmoid(x)`), for gradients.
    fn forward_differentiable(&self, h: &Tensor) -> Result<Tensor> {
        match self {
            FeedForward::Dense(m) => m.forward_differentiable(h),
            FeedForward::Moe(m) => m.forward_differentiable(h),
        }
    }
}

struct Layer {
    input_norm: Tensor,
    /// The norm before the feed-forward block.
    post_norm: Tensor,
    /// Gemma's norms of the attention's and the feed-forward block's outputs.
    sandwich: Option<(Tensor, Tensor)>,
    attn: Attention,
    ffn: FeedForward,
}

impl Layer {
    fn mha(&self) -> &MhaWeights {
        match &self.attn {
            Attention::Mha(m) => m,
            Attention::Mla(_) => unreachable!("per-head path on a latent-attention layer"),
        }
    }
}

/// A step's inputs to the layers on the model's device ([`Llama::step_inputs`]).
pub struct StepInputs {
    /// Embedded tokens `[n, hidden]` in the model's dtype.
    pub x: Tensor,
    /// RoPE cosines `[n, rope_dim / 2]`.
    pub cos: Tensor,
    /// RoPE sines `[n, rope_dim / 2]`.
    pub sin: Tensor,
    /// A query-neuron checkpoint's neuron mask, one row per token `[n, heads, head_dim]`.
    pub neuron_mask: Option<Tensor>,
    /// Gemma 3's local layers' RoPE cosines and sines (their own base, no scaling).
    pub local_rope: Option<(Tensor, Tensor)>,
}

/// A loaded decoder model.
pub struct Llama {
    cfg: ModelConfig,
    device: Device,
    dtype: DType,
    embed: Embedding,
    layers: Vec<Layer>,
    norm: Tensor,
    lm_head: Proj,
    inv_freq: Vec<f32>,
    /// Gemma 3's local layers' RoPE frequencies.
    local_inv_freq: Option<Vec<f32>>,
    decision: DecisionSource,
    adapters: Vec<DecisionAdapter>,
    query_neuron: Option<QueryNeuron>,
    random_weights: bool,
}

/// A query-neuron DMS checkpoint's decision neurons (spec rules 1.1 and 1.3), as tensors the
/// forward applies without host data (so a CUDA graph can capture it).
#[derive(Clone)]
struct QueryNeuron {
    /// 0 at each KV group's first head's last neuron, else 1: `[1, heads, head_dim]`, f32.
    mask: Tensor,
    /// Picks each KV head's decision neuron out of the flattened queries (or head 0's for every
    /// KV head with `dms_alpha_per = "layer"`): one-hot `[heads * head_dim, kv_heads]`, in the
    /// model's dtype (a selection, so exact).
    selector: Tensor,
}

impl QueryNeuron {
    fn new(cfg: &ModelConfig, device: &Device, dtype: DType) -> Result<Self> {
        let (nh, nkv, hd) = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
        let mut mask = vec![1f32; nh * hd];
        let mut selector = vec![0f32; nh * hd * nkv];
        let per_layer = cfg.dms.dms_alpha_per.as_deref() == Some("layer");
        for kvh in 0..nkv {
            let neuron = kvh * cfg.gqa() * hd + hd - 1;
            mask[neuron] = 0.0;
            let read = if per_layer { hd - 1 } else { neuron };
            selector[read * nkv + kvh] = 1.0;
        }
        Ok(Self {
            mask: Tensor::from_vec(mask, (1, nh, hd), device)?,
            selector: Tensor::from_vec(selector, (nh * hd, nkv), device)?.to_dtype(dtype)?,
        })
    }
}

/// The one-hot selector of `dms_alpha_per = "layer"` (`None` per head): `[kv, kv]` with row 0
/// all ones, so that `scores · selector` gives every head head 0's score.
fn head0_selector(per_layer: bool, kv: usize, device: &Device, dtype: DType) -> Result<Option<Tensor>> {
    if !per_layer {
        return Ok(None);
    }
    let select: Vec<f32> = (0..kv * kv).map(|i| if i < kv { 1.0 } else { 0.0 }).collect();
    Ok(Some(Tensor::from_vec(select, (kv, kv), device)?.to_dtype(dtype)?))
}

/// Euclidean norms over the last dimension of `x` (`[n, rows, d]`), f32 `[n, rows]`. The sum of
/// squares is a matmul with a column of ones, not a reduction: candle's CUDA reductions upload
/// their layout from the host, which a captured decode step cannot replay.
fn row_norms(x: &Tensor) -> Result<Tensor> {
    let (n, rows, d) = x.dims3()?;
    let squares = x.to_dtype(DType::F32)?.sqr()?.reshape((n * rows, d))?;
    let ones = Tensor::ones((d, 1), DType::F32, x.device())?;
    Ok(squares.matmul(&ones)?.reshape((n, rows))?.sqrt()?)
}

impl Llama {
    /// Builds the model from its weights, its linear layers in `form` (quantized forms run on the
    /// CPU in f32; for latent attention, every projection but the absorbed `kv_b_proj`).
    pub fn load(cfg: ModelConfig, w: &Weights, device: &Device, form: WeightForm) -> Result<Self> {
        let (h, hd) = (cfg.hidden_size, cfg.head_dim);
        if form.is_quantized() && !device.is_cpu() {
            bail!("quantized weights run on the CPU; use weights = \"dense\" on {device:?}");
        }
        let round_f16 = form == WeightForm::DenseRoundedF16;
        let get = |name: &str, shape: &[usize]| -> Result<Tensor> {
            let t = w.get(name, shape, device)?;
            Ok(if round_f16 { t.to_dtype(DType::F16)?.to_dtype(DType::F32)? } else { t })
        };
        let linear = |name: &str, out: usize, inp: usize, bias: bool| -> Result<Proj> {
            w.proj(name, out, inp, bias, form, device).with_context(|| format!("loading `{name}`"))
        };
        // Gemma's RMSNorm multiplies by `1 + weight`: HF checkpoints store the weight, GGUF files
        // the sum (llama.cpp's converter adds the 1).
        let norm_shift = if cfg.gemma.is_some() && !w.is_gguf() { 1.0 } else { 0.0 };
        let norm = |name: &str, n: usize| -> Result<Tensor> { Ok((get(name, &[n])? + norm_shift)?) };
        let mlp_proj = |name: &str, out: usize, inp: usize| linear(name, out, inp, false);
        let act = if cfg.gemma.is_some() { Activation::GeluTanh } else { Activation::Silu };
        let embed_name = "model.embed_tokens.weight";
        let embed_blocks = if form.is_quantized() { w.get_blocks(embed_name, &[cfg.vocab_size, h])? } else { None };
        let embed = match embed_blocks {
            Some(q) => Embedding::Quantized(std::sync::Arc::new(q)),
            None => Embedding::Dense(get(embed_name, &[cfg.vocab_size, h])?),
        };
        let decision = match cfg.dms.dms_separate_alpha {
            None => DecisionSource::None,
            Some(false) => DecisionSource::QueryNeuron,
            Some(true) => DecisionSource::Adapter,
        };
        if cfg.mla.is_some() && matches!(decision, DecisionSource::QueryNeuron) {
            bail!("DMS query-neuron decisions are not defined for latent attention; use an adapter (dms_separate_alpha = true)");
        }
        let mut adapters = Vec::new();
        if matches!(decision, DecisionSource::Adapter) {
            let layers = (0..cfg.num_layers)
                .map(|i| {
                    let a = format!("model.layers.{i}.self_attn.dms_proj_alpha");
                    let proj = Linear::new(get(&format!("{a}.weight"), &[cfg.num_kv_heads, h])?, None);
                    Ok((get(&format!("{a}_norm.weight"), &[h])?, proj))
                })
                .collect::<Result<Vec<_>>>()?;
            let per_layer = cfg.dms.dms_alpha_per.as_deref() == Some("layer");
            let head0 = head0_selector(per_layer, cfg.num_kv_heads, device, DType::F32)?;
            adapters.push(DecisionAdapter { key: None, layers, head0, lora: None });
        }
        let mut layers = Vec::with_capacity(cfg.num_layers);
        for i in 0..cfg.num_layers {
            let p = format!("model.layers.{i}");
            let bias = cfg.attention_bias;
            // A fused `qkv_proj`'s rows alone do not tell where its keys start: they must be the
            // config's.
            if let Some((fused, rows)) = w.fused_qkv_rows(i) {
                check_qkv_rows(&fused, rows, cfg.num_heads * hd, cfg.num_kv_heads * hd)?;
            }
            let attn = match &cfg.mla {
                Some(_) => {
                    Attention::Mla(Box::new(MlaAttention::load(&cfg, &format!("{p}.self_attn"), &get, &mlp_proj)?))
                }
                None => Attention::Mha(MhaWeights {
                    q_proj: linear(&format!("{p}.self_attn.q_proj"), cfg.num_heads * hd, h, bias)?,
                    k_proj: linear(&format!("{p}.self_attn.k_proj"), cfg.num_kv_heads * hd, h, bias)?,
                    v_proj: linear(&format!("{p}.self_attn.v_proj"), cfg.num_kv_heads * hd, h, bias)?,
                    // Where the checkpoint has one (transformers' Llama, Qwen3, Granite with
                    // `attention_bias`; Qwen2 has none).
                    o_proj: linear(
                        &format!("{p}.self_attn.o_proj"),
                        h,
                        cfg.num_heads * hd,
                        w.contains(&format!("{p}.self_attn.o_proj.bias")),
                    )?,
                    q_norm: if cfg.qk_norm { Some(norm(&format!("{p}.self_attn.q_norm.weight"), hd)?) } else { None },
                    k_norm: if cfg.qk_norm { Some(norm(&format!("{p}.self_attn.k_norm.weight"), hd)?) } else { None },
                    sinks: match cfg.arch.has_attention_sinks() {
                        true => Some(get(&format!("{p}.self_attn.sinks"), &[cfg.num_heads])?.to_vec1::<f32>()?),
                        false => None,
                    },
                }),
            };
            let moe = cfg.moe.as_ref().filter(|m| m.is_moe_layer(i));
            let ffn = match moe {
                Some(m) => {
                    FeedForward::Moe(Box::new(Moe::load(&format!("{p}.mlp"), h, m, &get, &linear, &|n| w.contains(n))?))
                }
                None => FeedForward::Dense(
                    Mlp::load(&format!("{p}.mlp"), h, cfg.intermediate_size, &mlp_proj)?.with_activation(act),
                ),
            };
            let input_norm = norm(&format!("{p}.input_layernorm.weight"), h)?;
            let post_attention = norm(&format!("{p}.post_attention_layernorm.weight"), h)?;
            let layer = match cfg.gemma {
                Some(_) => Layer {
                    input_norm,
                    post_norm: norm(&format!("{p}.pre_feedforward_layernorm.weight"), h)?,
                    sandwich: Some((post_attention, norm(&format!("{p}.post_feedforward_layernorm.weight"), h)?)),
                    attn,
                    ffn,
                },
                None => Layer { input_norm, post_norm: post_attention, sandwich: None, attn, ffn },
            };
            layers.push(layer);
        }
        let norm = norm("model.norm.weight", h)?;
        let lm_head = if cfg.tie_word_embeddings || !w.contains("lm_head.weight") {
            if !cfg.tie_word_embeddings {
                bail!("lm_head.weight is missing and the config does not tie word embeddings");
            }
            match &embed {
                Embedding::Dense(t) if !form.is_quantized() => Proj::Dense(Linear::new(t.clone(), None)),
                _ => linear("model.embed_tokens", cfg.vocab_size, h, false)?,
            }
        } else {
            linear("lm_head", cfg.vocab_size, h, false)?
        };
        let query_neuron = match decision {
            DecisionSource::QueryNeuron => Some(QueryNeuron::new(&cfg, device, DType::F32)?),
            _ => None,
        };
        let (inv_freq, local_inv_freq) = (rope_freqs(&cfg), local_rope_freqs(&cfg));
        Ok(Self {
            cfg,
            device: device.clone(),
            dtype: DType::F32,
            embed,
            layers,
            norm,
            lm_head,
            inv_freq,
            local_inv_freq,
            decision,
            adapters,
            query_neuron,
            random_weights: false,
        })
    }

    /// Attaches a DMS adapter (per layer `dms_proj_alpha` + `dms_proj_alpha_norm`, NVIDIA's
    /// tensor names) under `key`, the name policies give it (replacing one of the same name), so
    /// that the model produces decision scores; `per_layer` is its `dms_alpha_per = "layer"`.
    /// Other adapters stay: each sequence of a batch reads the one its policy names.
    pub fn attach_adapter(&mut self, key: &str, w: &Weights, round_f16: bool, per_layer: bool) -> Result<()> {
        if self.query_neuron.is_some() {
            bail!(
                "this checkpoint makes its DMS decisions with a query neuron (dms_separate_alpha = false), whose \
                 channel is zeroed in every query of every sequence; an adapter beside it would change the model \
                 for all of them, so adapter `{key}` cannot be attached"
            );
        }
        let h = self.cfg.hidden_size;
        let mut layers = Vec::with_capacity(self.layers.len());
        for i in 0..self.layers.len() {
            let a = format!("model.layers.{i}.self_attn.dms_proj_alpha");
            let mut norm = w.get(&format!("{a}_norm.weight"), &[h], &self.device)?;
            let mut proj = w.get(&format!("{a}.weight"), &[self.cfg.num_kv_heads, h], &self.device)?;
            if round_f16 {
                norm = norm.to_dtype(DType::F16)?.to_dtype(DType::F32)?;
                proj = proj.to_dtype(DType::F16)?.to_dtype(DType::F32)?;
            }
            layers.push((norm.to_dtype(self.dtype)?, Linear::new(proj.to_dtype(self.dtype)?, None)));
        }
        let head0 = head0_selector(per_layer, self.cfg.num_kv_heads, &self.device, self.dtype)?;
        let adapter = DecisionAdapter { key: Some(key.to_string()), layers, head0, lora: None };
        match self.adapters.iter().position(|a| a.key.as_deref() == Some(key)) {
            Some(i) => self.adapters[i] = adapter,
            None => self.adapters.push(adapter),
        };
        self.decision = DecisionSource::Adapter;
        Ok(())
    }

    /// Gives the adapter attached under `key` a LoRA on the attention projections (replacing any),
    /// which the forward applies to the sequences whose policy reads that adapter's decisions.
    pub fn attach_lora(&mut self, key: &str, lora: AttentionLora) -> Result<()> {
        if matches!(self.layers.first().map(|l| &l.attn), Some(Attention::Mla(_))) {
            bail!("a LoRA on q/k/v/o_proj needs per-head attention; this model has latent attention");
        }
        if lora.num_layers() != self.layers.len() {
            bail!("the LoRA has {} layers, the model {}", lora.num_layers(), self.layers.len());
        }
        let i = self.adapter_index(Some(key))?;
        self.adapters[i].lora = Some(lora);
        Ok(())
    }

    /// The names of the attached adapters (the checkpoint's own is not listed).
    pub fn adapter_names(&self) -> Vec<&str> {
        self.adapters.iter().filter_map(|a| a.key.as_deref()).collect()
    }

    /// Index of the adapter a policy naming `key` reads (`None`: the checkpoint's own, or the only
    /// one attached); an error naming the adapter when the model does not hold it.
    pub fn adapter_index(&self, key: Option<&str>) -> Result<usize> {
        let found = match key {
            Some(k) => self.adapters.iter().position(|a| a.key.as_deref() == Some(k)),
            None => self.adapters.iter().position(|a| a.key.is_none()).or((self.adapters.len() == 1).then_some(0)),
        };
        found.with_context(|| match key {
            Some(k) => format!(
                "the cache policy reads adapter `{k}`, which the model has not loaded (loaded: {:?})",
                self.adapter_names()
            ),
            None => format!(
                "the cache policy names no adapter, and the model has no decision weights of its own but {} \
                 attached adapters ({:?}): name one with `adapter = \"DIR\"`",
                self.adapters.len(),
                self.adapter_names()
            ),
        })
    }

    /// Mutable DMS fields (the adapter's `dms_*` values replace the checkpoint's).
    pub fn dms_fields_mut(&mut self) -> &mut super::config::DmsCheckpointFields {
        &mut self.cfg.dms
    }

    /// A model of the given shape with seeded random weights (N(0, 0.02), norms 1) in `dtype`,
    /// for speed and memory work where weight values do not matter.
    pub fn random(cfg: ModelConfig, device: &Device, dtype: DType) -> Result<Self> {
        cfg.validate()?;
        let (h, hd) = (cfg.hidden_size, cfg.head_dim);
        let w = |rows: usize, cols: usize| -> Result<Tensor> {
            Ok(Tensor::randn(0f32, 0.02, (rows, cols), device)?.to_dtype(dtype)?)
        };
        let ones = |n: usize| -> Result<Tensor> { Ok(Tensor::ones(n, dtype, device)?) };
        let lin = |out: usize, inp: usize| -> Result<Proj> { Ok(Proj::Dense(Linear::new(w(out, inp)?, None))) };
        let act = if cfg.gemma.is_some() { Activation::GeluTanh } else { Activation::Silu };
        let mut layers = Vec::with_capacity(cfg.num_layers);
        for i in 0..cfg.num_layers {
            let attn = match &cfg.mla {
                Some(_) => Attention::Mla(Box::new(MlaAttention::random(&cfg, device, dtype)?)),
                None => Attention::Mha(MhaWeights {
                    q_proj: lin(cfg.num_heads * hd, h)?,
                    k_proj: lin(cfg.num_kv_heads * hd, h)?,
                    v_proj: lin(cfg.num_kv_heads * hd, h)?,
                    o_proj: lin(h, cfg.num_heads * hd)?,
                    q_norm: if cfg.qk_norm { Some(ones(hd)?) } else { None },
                    k_norm: if cfg.qk_norm { Some(ones(hd)?) } else { None },
                    sinks: cfg.arch.has_attention_sinks().then(|| vec![0.0; cfg.num_heads]),
                }),
            };
            let moe = cfg.moe.as_ref().filter(|m| m.is_moe_layer(i));
            let ffn = match moe {
                Some(m) => FeedForward::Moe(Box::new(Moe::random(h, m, device, dtype)?)),
                None => FeedForward::Dense(Mlp::random(h, cfg.intermediate_size, device, dtype)?.with_activation(act)),
            };
            let sandwich = match cfg.gemma {
                Some(_) => Some((ones(h)?, ones(h)?)),
                None => None,
            };
            layers.push(Layer { input_norm: ones(h)?, post_norm: ones(h)?, sandwich, attn, ffn });
        }
        let embed = w(cfg.vocab_size, h)?;
        let lm_head =
            Proj::Dense(Linear::new(if cfg.tie_word_embeddings { embed.clone() } else { w(cfg.vocab_size, h)? }, None));
        let (inv_freq, local_inv_freq) = (rope_freqs(&cfg), local_rope_freqs(&cfg));
        Ok(Self {
            norm: ones(h)?,
            cfg,
            device: device.clone(),
            dtype,
            embed: Embedding::Dense(embed),
            layers,
            lm_head,
            inv_freq,
            local_inv_freq,
            decision: DecisionSource::None,
            adapters: Vec::new(),
            query_neuron: None,
            random_weights: true,
        })
    }

    /// True for a model built by [`Llama::random`]: its outputs say nothing about quality.
    pub fn has_random_weights(&self) -> bool {
        self.random_weights
    }

    /// The same model with every weight converted to `dtype`.
    pub fn to_dtype(&self, dtype: DType) -> Result<Self> {
        if self.is_quantized() {
            bail!("a model with quantized weights computes in f32; load it with weights = \"dense\" for {dtype:?}");
        }
        let c = |t: &Tensor| -> Result<Tensor> { Ok(t.to_dtype(dtype)?) };
        let cl = |l: &Linear| -> Result<Linear> { Ok(Linear::new(c(l.weight())?, l.bias().map(c).transpose()?)) };
        let layers = self
            .layers
            .iter()
            .map(|l| {
                Ok(Layer {
                    input_norm: c(&l.input_norm)?,
                    post_norm: c(&l.post_norm)?,
                    sandwich: match &l.sandwich {
                        Some((a, f)) => Some((c(a)?, c(f)?)),
                        None => None,
                    },
                    attn: match &l.attn {
                        Attention::Mha(m) => Attention::Mha(MhaWeights {
                            q_proj: m.q_proj.to_dtype(dtype)?,
                            k_proj: m.k_proj.to_dtype(dtype)?,
                            v_proj: m.v_proj.to_dtype(dtype)?,
                            o_proj: m.o_proj.to_dtype(dtype)?,
                            q_norm: m.q_norm.as_ref().map(c).transpose()?,
                            k_norm: m.k_norm.as_ref().map(c).transpose()?,
                            sinks: m.sinks.clone(),
                        }),
                        Attention::Mla(m) => Attention::Mla(Box::new(m.to_dtype(dtype)?)),
                    },
                    ffn: match &l.ffn {
                        FeedForward::Dense(m) => FeedForward::Dense(m.to_dtype(dtype)?),
                        FeedForward::Moe(m) => FeedForward::Moe(Box::new(m.to_dtype(dtype)?)),
                    },
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let adapters = self
            .adapters
            .iter()
            .map(|a| {
                let layers = a.layers.iter().map(|(n, p)| Ok((c(n)?, cl(p)?))).collect::<Result<Vec<_>>>()?;
                let lora = a.lora.as_ref().map(|l| l.to_dtype(dtype)).transpose()?;
                Ok(DecisionAdapter { key: a.key.clone(), layers, head0: a.head0.as_ref().map(c).transpose()?, lora })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            cfg: self.cfg.clone(),
            device: self.device.clone(),
            dtype,
            embed: Embedding::Dense(c(self.embed.dense()?)?),
            layers,
            norm: c(&self.norm)?,
            lm_head: self.lm_head.to_dtype(dtype)?,
            inv_freq: self.inv_freq.clone(),
            local_inv_freq: self.local_inv_freq.clone(),
            decision: self.decision.clone(),
            adapters,
            query_neuron: self
                .query_neuron
                .as_ref()
                .map(|qn| Ok::<_, anyhow::Error>(QueryNeuron { mask: qn.mask.clone(), selector: c(&qn.selector)? }))
                .transpose()?,
            random_weights: self.random_weights,
        })
    }

    /// The model's configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// Serves at most `tokens` positions (`[model] context`; see [`ModelConfig::set_context`]),
    /// with the RoPE frequencies that context takes.
    pub fn set_context(&mut self, tokens: usize) -> Result<()> {
        self.cfg.set_context(tokens)?;
        self.inv_freq = rope_freqs(&self.cfg);
        Ok(())
    }

    /// Where the model's DMS decision scores come from.
    pub fn decision_source(&self) -> &DecisionSource {
        &self.decision
    }

    /// Element type of activations (and of dense weights).
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// True when the linear layers hold GGUF block formats ([`WeightForm::Quantized`] and
    /// requantized forms).
    pub fn is_quantized(&self) -> bool {
        self.lm_head.quant_dtype().is_some()
    }

    /// Device the weights live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Bytes the weights take in memory (a tied LM head counted once unless it is a separate
    /// quantized copy of the embedding).
    pub fn weight_bytes(&self) -> u64 {
        let elem = self.dtype.size_in_bytes();
        let mut n = self.embed.byte_count() + self.norm.elem_count() * elem;
        if !self.cfg.tie_word_embeddings || self.is_quantized() {
            n += self.lm_head.byte_count();
        }
        for l in &self.layers {
            let sandwich = l.sandwich.iter().flat_map(|(a, f)| [a, f]);
            for t in [&l.input_norm, &l.post_norm].into_iter().chain(sandwich) {
                n += t.elem_count() * elem;
            }
            match &l.attn {
                Attention::Mha(m) => {
                    for lin in [&m.q_proj, &m.k_proj, &m.v_proj, &m.o_proj] {
                        n += lin.byte_count();
                    }
                }
                Attention::Mla(m) => n += m.byte_count(),
            }
            n += match &l.ffn {
                FeedForward::Dense(m) => m.byte_count(),
                FeedForward::Moe(m) => m.byte_count(),
            };
        }
        n as u64
    }

    /// The one forward pass: `tokens` (of one or more sequences, at `positions`) through every
    /// layer, each layer's attention done by `backend` (which stores this step's K/V and signals
    /// and reads its cache, wherever it lives). Returns the final hidden states `[n, hidden]`
    /// (before the norm; [`Self::logits`] makes logits of the rows a caller wants).
    pub fn forward_hidden(&self, tokens: &[u32], positions: &[Pos], backend: &mut dyn KvBackend) -> Result<Tensor> {
        let inputs = self.step_inputs(tokens, positions)?;
        self.forward_prepared(&inputs, backend)
    }

    /// What a step feeds the layers, on the model's device: the embedded `tokens` and the RoPE
    /// rows of `positions` (checked against the vocabulary and each other).
    pub fn step_inputs(&self, tokens: &[u32], positions: &[Pos]) -> Result<StepInputs> {
        if tokens.is_empty() {
            bail!("a forward pass needs at least one token");
        }
        if positions.len() != tokens.len() {
            bail!("{} tokens but {} positions", tokens.len(), positions.len());
        }
        let (cos, sin) = self.rope_tables(positions)?;
        let neuron_mask = match &self.query_neuron {
            Some(qn) => {
                let (nh, hd) = (self.cfg.num_heads, self.cfg.head_dim);
                Some(qn.mask.to_dtype(self.dtype)?.broadcast_as((tokens.len(), nh, hd))?.contiguous()?)
            }
            None => None,
        };
        let local_rope = match &self.local_inv_freq {
            Some(f) => Some(self.rope_table(f, 1.0, positions)?),
            None => None,
        };
        Ok(StepInputs { x: self.embed_tokens(tokens)?, cos, sin, neuron_mask, local_rope })
    }

    /// [`Self::forward_hidden`] from prepared inputs: device work only, no host data, so a CUDA
    /// graph can capture it over inputs kept in fixed buffers.
    pub fn forward_prepared(&self, inputs: &StepInputs, backend: &mut dyn KvBackend) -> Result<Tensor> {
        let n = inputs.x.dim(0)?;
        let need = backend.signals();
        if need.decision && matches!(self.decision, DecisionSource::None) {
            bail!("a cache policy needs learned DMS decisions but the model has no decision source");
        }
        let (runs, lora_runs) = {
            let spans = backend.decision_spans();
            let runs = match (&self.decision, need.decision) {
                (DecisionSource::Adapter, true) => self.adapter_runs(&spans, n)?,
                _ => Vec::new(),
            };
            (runs, self.lora_runs(&spans, n)?)
        };
        let StepInputs { x, cos, sin, neuron_mask, local_rope } = inputs;
        let mut x = x.clone();
        let scale = self.softmax_scale();
        let softcap = self.cfg.gemma.as_ref().and_then(|g| g.attn_softcap);
        for li in 0..self.layers.len() {
            let (cos, sin) = match (local_rope, &self.cfg.gemma) {
                (Some((c, s)), Some(g)) if g.local_layers.get(li).copied().unwrap_or(false) => (c, s),
                _ => (cos, sin),
            };
            let AttnInputs { q, k, v, decision, key_norms } =
                self.attn_inputs(li, &x, (cos, sin, neuron_mask.as_ref()), (&runs, &lora_runs), need)?;
            let (decision, key_norms) = (decision.as_ref(), key_norms.as_ref());
            let sink_logits = match &self.layers[li].attn {
                Attention::Mha(m) => m.sinks.as_deref(),
                Attention::Mla(_) => None,
            };
            let step = LayerStep { q: &q, k: &k, v: &v, decision, key_norms, scale, softcap, sink_logits };
            let attn = backend.attend(li, step)?;
            x = self.finish_layer(li, &x, &attn, &lora_runs)?;
        }
        backend.finish()?;
        Ok(x)
    }

    /// Width of the values attention returns per query head: the head dim, or for latent rows
    /// the latent rank (values are the row's first `rank` floats).
    pub fn latent_rank(&self) -> Option<usize> {
        match self.layers.first().map(|l| &l.attn) {
            Some(Attention::Mla(m)) => Some(m.rank()),
            _ => None,
        }
    }

    /// Which adapter computes which tokens' decisions, from the backend's spans (a span that
    /// needs no decisions joins its neighbour's run).
    fn adapter_runs(&self, spans: &[DecisionSpan<'_>], n: usize) -> Result<Vec<AdapterRun>> {
        let total: usize = spans.iter().map(|s| s.tokens).sum();
        if total != n {
            bail!("the cache's sequences hold {total} new tokens but the step feeds {n}");
        }
        let mut runs: Vec<AdapterRun> = Vec::new();
        let mut start = 0;
        for s in spans {
            let index = match (s.needed, runs.last()) {
                (true, _) => self.adapter_index(s.adapter)?,
                (false, Some(&(_, _, a))) => a,
                (false, None) => 0,
            };
            match runs.last_mut() {
                Some(run) if run.2 == index => run.1 += s.tokens,
                _ => runs.push((start, s.tokens, index)),
            }
            start += s.tokens;
        }
        Ok(runs)
    }

    /// Which tokens which adapter's LoRA adapts: a sequence whose policy reads an adapter with a
    /// LoRA gets it; every other sequence runs the model as loaded. Empty when no token is
    /// adapted.
    fn lora_runs(&self, spans: &[DecisionSpan<'_>], n: usize) -> Result<Vec<LoraRun>> {
        if !self.adapters.iter().any(|a| a.lora.is_some()) {
            return Ok(Vec::new());
        }
        let mut runs: Vec<LoraRun> = Vec::new();
        let mut start = 0;
        for s in spans {
            let index = match s.needed {
                true => Some(self.adapter_index(s.adapter)?).filter(|&i| self.adapters[i].lora.is_some()),
                false => None,
            };
            match runs.last_mut() {
                Some(run) if run.2 == index => run.1 += s.tokens,
                _ => runs.push((start, s.tokens, index)),
            }
            start += s.tokens;
        }
        if start != n {
            bail!("the cache's sequences hold {start} new tokens but the step feeds {n}");
        }
        if runs.iter().all(|r| r.2.is_none()) {
            runs.clear();
        }
        Ok(runs)
    }

    /// `y = x W^T` of layer `li`'s `target` plus, on each run's rows, that run's LoRA delta.
    fn with_lora(&self, li: usize, target: LoraTarget, x: &Tensor, y: Tensor, runs: &[LoraRun]) -> Result<Tensor> {
        let delta = |a: usize, x: &Tensor| -> Result<Tensor> {
            let lora = self.adapters[a].lora.as_ref().expect("lora runs name adapters with a LoRA");
            lora.delta(li, target, x)
        };
        match runs {
            [] => Ok(y),
            [(_, _, Some(a))] => Ok((y + delta(*a, x)?)?),
            _ => {
                let parts = runs
                    .iter()
                    .map(|&(start, len, a)| {
                        let rows = y.narrow(0, start, len)?;
                        match a {
                            Some(a) => Ok((rows + delta(a, &x.narrow(0, start, len)?)?)?),
                            None => Ok(rows),
                        }
                    })
                    .collect::<Result<Vec<_>>>()?;
                Ok(Tensor::cat(&parts, 0)?)
            }
        }
    }

    /// Raw adapter decision scores `[n, kv_heads]` of layer `li` for the rows of `x` (the
    /// residual stream), each run of tokens through its own adapter.
    fn adapter_scores(&self, li: usize, x: &Tensor, runs: &[AdapterRun]) -> Result<Tensor> {
        let eps = self.cfg.rms_norm_eps as f32;
        let one = |a: &DecisionAdapter, x: &Tensor| -> Result<Tensor> {
            let (norm_w, proj) = &a.layers[li];
            let s = proj.forward(&candle_nn::ops::rms_norm(x, norm_w, eps)?)?;
            Ok(match &a.head0 {
                Some(select) => s.matmul(select)?,
                None => s,
            })
        };
        match runs {
            [(_, _, a)] => one(&self.adapters[*a], x),
            _ => {
                let parts = runs
                    .iter()
                    .map(|&(start, len, a)| one(&self.adapters[a], &x.narrow(0, start, len)?))
                    .collect::<Result<Vec<_>>>()?;
                Ok(Tensor::cat(&parts, 0)?)
            }
        }
    }

    /// Queries `[n, heads, hd]` and keys (after RoPE), values, and the per-(token, KV head) signal
    /// the policy asked for (f32 `[n, kv_heads]`), for layer `li`; adapter decisions come from
    /// `runs` (empty when no policy reads them) and LoRA deltas from `lora_runs`. Applies the
    /// query-neuron zeroing of DMS checkpoints (spec rule 1.3) whatever the policy.
    fn attn_inputs(
        &self,
        li: usize,
        x: &Tensor,
        (cos, sin, neuron_mask): (&Tensor, &Tensor, Option<&Tensor>),
        (runs, lora_runs): (&[AdapterRun], &[LoraRun]),
        need: Signals,
    ) -> Result<AttnInputs> {
        let layer = &self.layers[li];
        let cfg = &self.cfg;
        let (nh, nkv, hd) = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
        let n = x.dim(0)?;
        let h = candle_nn::ops::rms_norm(x, &layer.input_norm, cfg.rms_norm_eps as f32)?;
        if let Attention::Mla(mla) = &layer.attn {
            let MlaInputs { q, latent } = mla.inputs(&h, cos, sin)?;
            let decision = match runs.is_empty() {
                false => Some(self.adapter_scores(li, x, runs)?.to_dtype(DType::F32)?.contiguous()?),
                true => None,
            };
            let key_norms = if need.key_norms { Some(row_norms(&latent)?) } else { None };
            // No values of their own (the first `rank` floats of the row); kept on the host so
            // that no device allocation of zero bytes is ever asked for.
            let v = Tensor::zeros((n, 1, 0), latent.dtype(), &Device::Cpu)?;
            return Ok(AttnInputs { q, k: latent, v, decision, key_norms });
        }
        let m = layer.mha();
        let [q, k, v]: [Tensor; 3] =
            Proj::forward_many(&[&m.q_proj, &m.k_proj, &m.v_proj], &h)?.try_into().expect("three projections");
        let q = self.with_lora(li, LoraTarget::Q, &h, q, lora_runs)?;
        let k = self.with_lora(li, LoraTarget::K, &h, k, lora_runs)?;
        let v = self.with_lora(li, LoraTarget::V, &h, v, lora_runs)?;
        let mut q = q.reshape((n, nh, hd))?;
        let mut k = k.reshape((n, nkv, hd))?;
        let v = v.reshape((n, nkv, hd))?;
        if let (Some(qn), Some(kn)) = (&m.q_norm, &m.k_norm) {
            q = candle_nn::ops::rms_norm(&q.contiguous()?, qn, cfg.rms_norm_eps as f32)?;
            k = candle_nn::ops::rms_norm(&k.contiguous()?, kn, cfg.rms_norm_eps as f32)?;
        }
        let scores = match (&self.decision, &self.query_neuron, need.decision) {
            (DecisionSource::QueryNeuron, Some(qn), true) => {
                Some(q.contiguous()?.reshape((n, nh * hd))?.matmul(&qn.selector.to_dtype(q.dtype())?)?)
            }
            (DecisionSource::Adapter, _, true) => Some(self.adapter_scores(li, x, runs)?),
            _ => None,
        };
        if let Some(mask) = neuron_mask {
            q = (q.contiguous()? * mask)?;
        }
        let rotates = !cfg.nope_layers.get(li).copied().unwrap_or(false);
        let mut q = if rotates { rope(&q, cos, sin)? } else { q.contiguous()? };
        if let Some(mask) = neuron_mask {
            q = (q * mask)?;
        }
        let k = if rotates { rope(&k, cos, sin)? } else { k.contiguous()? };
        let key_norms = if need.key_norms { Some(row_norms(&k)?) } else { None };
        let decision = match scores {
            Some(s) => Some(s.to_dtype(DType::F32)?.contiguous()?),
            None => None,
        };
        Ok(AttnInputs { q, k, v: v.contiguous()?, decision, key_norms })
    }

    /// Embeddings of `tokens`; an error naming the first id outside the vocabulary.
    fn embed_tokens(&self, tokens: &[u32]) -> Result<Tensor> {
        if let Some(&t) = tokens.iter().find(|&&t| t as usize >= self.cfg.vocab_size) {
            bail!("token id {t} is outside the model's vocabulary of {} tokens", self.cfg.vocab_size);
        }
        let x = self.embed.lookup(tokens, &self.device)?;
        match self.embedding_scale() {
            Some(m) => Ok((x * m)?),
            None => Ok(x),
        }
    }

    /// What embeddings are multiplied by: Gemma's `sqrt(hidden)`, Granite's multiplier.
    fn embedding_scale(&self) -> Option<f64> {
        match (&self.cfg.gemma, &self.cfg.granite) {
            (Some(_), _) => Some((self.cfg.hidden_size as f64).sqrt()),
            (None, Some(g)) => Some(g.embedding),
            (None, None) => None,
        }
    }

    /// Output projection (with `lora_runs`' deltas), residual, and the feed-forward block.
    fn finish_layer(&self, li: usize, x: &Tensor, attn: &Tensor, lora_runs: &[LoraRun]) -> Result<Tensor> {
        let layer = &self.layers[li];
        let o = match &layer.attn {
            Attention::Mha(m) => self.with_lora(li, LoraTarget::O, attn, m.o_proj.forward(attn)?, lora_runs)?,
            Attention::Mla(m) => m.output(attn)?,
        };
        let eps = self.cfg.rms_norm_eps as f32;
        let Some((attn_norm, ffn_norm)) = &layer.sandwich else {
            // Granite scales each branch before its residual add.
            let scaled = |t: Tensor| -> Result<Tensor> {
                Ok(match self.cfg.granite {
                    Some(g) => (t * g.residual)?,
                    None => t,
                })
            };
            let x = (x + scaled(o)?)?;
            let h = candle_nn::ops::rms_norm(&x, &layer.post_norm, eps)?;
            return Ok((&x + scaled(layer.ffn.forward(&h)?)?)?);
        };
        let x = (x + candle_nn::ops::rms_norm(&o.contiguous()?, attn_norm, eps)?)?;
        let h = candle_nn::ops::rms_norm(&x, &layer.post_norm, eps)?;
        Ok((&x + candle_nn::ops::rms_norm(&layer.ffn.forward(&h)?.contiguous()?, ffn_norm, eps)?)?)
    }

    /// Softmax scale of attention scores.
    fn softmax_scale(&self) -> f64 {
        match (&self.cfg.mla, &self.cfg.gemma, &self.cfg.granite) {
            (Some(m), _, _) => m.softmax_scale(),
            (None, Some(g), _) => 1.0 / g.query_pre_attn_scalar.sqrt(),
            (None, None, Some(g)) => g.attention,
            (None, None, None) => 1.0 / (self.cfg.head_dim as f64).sqrt(),
        }
    }

    /// Final norm and lm_head for `[n, hidden]` rows (soft-capped when the model caps them).
    pub fn logits(&self, xs: &Tensor) -> Result<Tensor> {
        let xs = candle_nn::ops::rms_norm(&xs.contiguous()?, &self.norm, self.cfg.rms_norm_eps as f32)?;
        let logits = self.lm_head.forward(&xs)?;
        let logits = match self.cfg.granite {
            Some(g) => (logits / g.logits)?,
            None => logits,
        };
        match self.cfg.gemma.as_ref().and_then(|g| g.final_softcap) {
            Some(cap) => Ok(((logits / cap)?.tanh()? * cap)?),
            None => Ok(logits),
        }
    }

    fn rope_tables(&self, positions: &[Pos]) -> Result<(Tensor, Tensor)> {
        self.rope_table(&self.inv_freq, self.cfg.rope_attention_factor(), positions)
    }

    /// Cosines and sines of `positions` at frequencies `inv_freq`, times `m`.
    fn rope_table(&self, inv_freq: &[f32], m: f64, positions: &[Pos]) -> Result<(Tensor, Tensor)> {
        let half = inv_freq.len();
        let mut cos = Vec::with_capacity(positions.len() * half);
        let mut sin = Vec::with_capacity(positions.len() * half);
        for &p in positions {
            for &f in inv_freq {
                let a = (p as f32 * f) as f64;
                cos.push((a.cos() * m) as f32);
                sin.push((a.sin() * m) as f32);
            }
        }
        let n = positions.len();
        let dt = self.dtype;
        Ok((
            Tensor::from_vec(cos, (n, half), &self.device)?.to_dtype(dt)?,
            Tensor::from_vec(sin, (n, half), &self.device)?.to_dtype(dt)?,
        ))
    }
}

/// Gemma 3's local layers' RoPE inverse frequencies: their own base, no scaling.
fn local_rope_freqs(cfg: &ModelConfig) -> Option<Vec<f32>> {
    let theta = cfg.gemma.as_ref()?.local_rope_theta?;
    let d = cfg.rope_dim();
    Some((0..d / 2).map(|i| (1.0 / theta.powf(2.0 * i as f64 / d as f64)) as f32).collect())
}

/// RoPE inverse frequencies: of the rope part for latent attention, else of the whole head.
fn rope_freqs(cfg: &ModelConfig) -> Vec<f32> {
    match &cfg.mla {
        Some(m) => m.rope_inv_freq(cfg.rope_theta),
        None => cfg.rope_inv_freq(),
    }
    .iter()
    .map(|&f| f as f32)
    .collect()
}

/// Rotate-half RoPE on `[n, heads, head_dim]` with per-token tables `[n, rope_dim/2]`: the first
/// `rope_dim` channels of each head rotate, the others pass through.
fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    // `[n, heads, d]` is candle's `[batch 1, time n, heads, d]` layout: one kernel, no transposes.
    let rotate = |x: &Tensor| -> Result<Tensor> {
        Ok(candle_nn::rotary_emb::rope_thd(&x.contiguous()?.unsqueeze(0)?, cos, sin)?.squeeze(0)?)
    };
    let (d, rot) = (x.dim(2)?, 2 * cos.dim(1)?);
    if rot == d {
        return rotate(x);
    }
    Ok(Tensor::cat(&[&rotate(&x.narrow(2, 0, rot)?)?, &x.narrow(2, rot, d - rot)?], 2)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Against the per-row definition, over per-head (`[n, kv, d]`) and latent (`[n, 1, d]`) keys.
    #[test]
    fn row_norms_are_each_rows_euclidean_norm() -> Result<()> {
        for (n, rows, d) in [(5usize, 3usize, 16usize), (2, 1, 576)] {
            let x = Tensor::randn(0f32, 2.0, (n, rows, d), &Device::Cpu)?;
            let got = row_norms(&x)?.to_vec2::<f32>()?;
            let xs = x.to_vec3::<f32>()?;
            for (t, row) in xs.iter().enumerate() {
                for (r, v) in row.iter().enumerate() {
                    let want = v.iter().map(|a| (*a as f64) * (*a as f64)).sum::<f64>().sqrt() as f32;
                    assert!((got[t][r] - want).abs() <= 1e-5 * want, "({t}, {r}): {} vs {want}", got[t][r]);
                }
            }
        }
        Ok(())
    }

    /// Rule 1.5 by the selector: every head gets head 0's score, bit for bit, in f32 and f16.
    #[test]
    fn the_head0_selector_copies_head_0s_score() -> Result<()> {
        for dtype in [DType::F32, DType::F16] {
            let s = Tensor::randn(0f32, 5.0, (7, 4), &Device::Cpu)?.to_dtype(dtype)?;
            let select = head0_selector(true, 4, &Device::Cpu, dtype)?.expect("per layer");
            let got = s.matmul(&select)?.to_dtype(DType::F32)?.to_vec2::<f32>()?;
            let want = s.to_dtype(DType::F32)?.to_vec2::<f32>()?;
            for (g, w) in got.iter().zip(&want) {
                assert!(g.iter().all(|v| v.to_bits() == w[0].to_bits()), "{g:?} vs head 0 {}", w[0]);
            }
            assert!(head0_selector(false, 4, &Device::Cpu, dtype)?.is_none());
        }
        Ok(())
    }
}
