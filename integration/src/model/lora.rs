//! Low-rank deltas on the attention projections that a retrofitted DMS adapter may carry beside
//! its decision weights: DMS trains the whole model to live with its evictions (the paper
//! fine-tunes every weight); a LoRA on `q/k/v/o_proj` is the part of that a small adapter file can
//! hold. `y = x W^T + scale * (x A^T) B^T` with `A [rank, in]`, `B [out, rank]` and
//! `scale = alpha / rank`, under PEFT's tensor names (`...q_proj.lora_A.weight`).

use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor};

use super::config::ModelConfig;
use super::weights::Weights;

/// The projections a LoRA adapts, in the order [`AttentionLora`] stores them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoraTarget {
    /// Queries.
    Q = 0,
    /// Keys.
    K = 1,
    /// Values.
    V = 2,
    /// Attention output.
    O = 3,
}

impl LoraTarget {
    /// All four, in storage order.
    pub const ALL: [LoraTarget; 4] = [LoraTarget::Q, LoraTarget::K, LoraTarget::V, LoraTarget::O];

    /// The projection's tensor name (`q_proj`, ...).
    pub fn proj_name(self) -> &'static str {
        ["q_proj", "k_proj", "v_proj", "o_proj"][self as usize]
    }

    /// `(out, in)` of the projection for a per-head model.
    pub fn dims(self, cfg: &ModelConfig) -> (usize, usize) {
        let (h, q, kv) = (cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim);
        match self {
            LoraTarget::Q => (q, h),
            LoraTarget::K | LoraTarget::V => (kv, h),
            LoraTarget::O => (h, q),
        }
    }
}

/// The LoRA fields of an adapter's `config.json` (absent: the adapter has no LoRA).
#[derive(Debug, Clone, Copy, Default, serde::Deserialize)]
pub struct LoraFields {
    /// Rank of the factors.
    pub lora_rank: Option<usize>,
    /// The delta's scale is alpha / rank.
    pub lora_alpha: Option<f64>,
}

impl LoraFields {
    /// `(rank, alpha)` when the adapter has a LoRA; an error when only one of the two is set.
    pub fn rank_alpha(&self) -> Result<Option<(usize, f64)>> {
        match (self.lora_rank, self.lora_alpha) {
            (Some(r), Some(a)) => Ok(Some((r, a))),
            (None, None) => Ok(None),
            _ => bail!("config.json sets only one of lora_rank and lora_alpha; a LoRA needs both"),
        }
    }
}

/// Tensor name of layer `layer`'s `target` factor `part` (`"A"` or `"B"`).
pub fn tensor_name(layer: usize, target: LoraTarget, part: &str) -> String {
    format!("model.layers.{layer}.self_attn.{}.lora_{part}.weight", target.proj_name())
}

/// Per layer the `(A, B)` factors of the four projections, and the scale.
#[derive(Clone)]
pub struct AttentionLora {
    layers: Vec<[(Tensor, Tensor); 4]>,
    scale: f64,
}

impl AttentionLora {
    /// From per-layer factors (`[q, k, v, o]`, each `(A [rank, in], B [out, rank])`).
    pub fn new(layers: Vec<[(Tensor, Tensor); 4]>, scale: f64) -> Self {
        Self { layers, scale }
    }

    /// Reads rank-`rank` factors for every layer of `cfg` from `w`, as `dtype` on `device`; an
    /// error names a missing tensor or one whose shape does not match the model.
    pub fn load(
        w: &Weights,
        cfg: &ModelConfig,
        rank: usize,
        alpha: f64,
        device: &Device,
        dtype: DType,
    ) -> Result<Self> {
        if cfg.mla.is_some() {
            bail!("a LoRA on q/k/v/o_proj needs per-head attention; this model has latent attention");
        }
        if rank == 0 || !(alpha.is_finite() && alpha > 0.0) {
            bail!("lora_rank must be positive and lora_alpha positive and finite (got {rank}, {alpha})");
        }
        let mut layers = Vec::with_capacity(cfg.num_layers);
        for i in 0..cfg.num_layers {
            let pair = |t: LoraTarget| -> Result<(Tensor, Tensor)> {
                let (out, inp) = t.dims(cfg);
                let a = w.get(&tensor_name(i, t, "A"), &[rank, inp], device)?.to_dtype(dtype)?;
                let b = w.get(&tensor_name(i, t, "B"), &[out, rank], device)?.to_dtype(dtype)?;
                Ok((a, b))
            };
            layers.push([pair(LoraTarget::Q)?, pair(LoraTarget::K)?, pair(LoraTarget::V)?, pair(LoraTarget::O)?]);
        }
        Ok(Self { layers, scale: alpha / rank as f64 })
    }

    /// `scale * (x A^T) B^T` for layer `layer`'s `target`, `x` being `[n, in]`.
    pub fn delta(&self, layer: usize, target: LoraTarget, x: &Tensor) -> Result<Tensor> {
        let (a, b) = &self.layers[layer][target as usize];
        Ok((x.matmul(&a.t()?)?.matmul(&b.t()?)? * self.scale)?)
    }

    /// The same factors as `dtype`.
    pub fn to_dtype(&self, dtype: DType) -> Result<Self> {
        let layers = self
            .layers
            .iter()
            .map(|l| {
                let c = |(a, b): &(Tensor, Tensor)| -> Result<(Tensor, Tensor)> {
                    Ok((a.to_dtype(dtype)?, b.to_dtype(dtype)?))
                };
                Ok([c(&l[0])?, c(&l[1])?, c(&l[2])?, c(&l[3])?])
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { layers, scale: self.scale })
    }

    /// Layers it holds.
    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }
}
