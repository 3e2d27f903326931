//! Dense, differentiable forward passes for retrofitting DMS decisions: the teacher (the frozen
//! model, full causal attention) and the student (the same model whose attention is softly
//! masked by a trainable adapter's noisy decisions, dms-reference.md section 5).

use anyhow::Result;
use candle_core::{DType, Tensor, Var};

use super::train_attention::{masked_attention, Mask};
use super::{Attention, Layer, Llama};
use crate::model::linear::frozen_matmul;
use crate::model::lora::{AttentionLora, LoraTarget};
use crate::model::mla::MlaInputs;

/// Trainable DMS adapter: per layer an RMSNorm weight `[hidden]` and a projection
/// `[n_kv_heads, hidden]` (NVIDIA's `dms_proj_alpha_norm` / `dms_proj_alpha`), and optionally
/// a LoRA on the attention projections that the student runs with.
pub struct AdapterParams {
    /// RMSNorm weights, one per layer.
    pub norms: Vec<Var>,
    /// Projection weights, one per layer.
    pub projs: Vec<Var>,
    /// The LoRA, if this adapter trains one.
    pub lora: Option<LoraVars>,
}

/// Trainable LoRA factors: per layer `(A, B)` of q, k, v, o (see [`AttentionLora`]).
pub struct LoraVars {
    /// Per layer, the four projections' factors.
    pub layers: Vec<[(Var, Var); 4]>,
    /// alpha / rank.
    pub scale: f64,
}

impl LoraVars {
    /// The factors as an [`AttentionLora`] whose tensors are these variables (so gradients reach
    /// them).
    pub fn view(&self) -> AttentionLora {
        let layers = self
            .layers
            .iter()
            .map(|l| l.clone().map(|(a, b)| (a.as_tensor().clone(), b.as_tensor().clone())))
            .collect();
        AttentionLora::new(layers, self.scale)
    }

    /// Every factor, layer by layer, A before B, in projection order.
    pub fn vars(&self) -> impl Iterator<Item = &Var> {
        self.layers.iter().flat_map(|l| l.iter().flat_map(|(a, b)| [a, b]))
    }
}

/// Student-pass settings.
pub struct StudentOpts<'a> {
    /// Delay W: keys within W of the query are never masked.
    pub window: usize,
    /// Decision logit = raw * alpha_scale - alpha_offset.
    pub alpha_scale: f64,
    /// See `alpha_scale`.
    pub alpha_offset: f64,
    /// Temperature of the relaxed decision.
    pub tau: f64,
    /// Logistic noise per layer, `[T, n_kv_heads]`.
    pub noise: &'a [Tensor],
}

/// Output of a dense pass.
pub struct DenseOut {
    /// Logits `[T, vocab]`.
    pub logits: Tensor,
    /// Straight-through hard decisions per layer, `[T, n_kv_heads]` (student only).
    pub decisions: Vec<Tensor>,
}

fn rms(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    Ok(candle_nn::ops::rms_norm_slow(x, w, eps as f32)?)
}

/// Differentiable rotate-half RoPE on `[T, heads, hd]` with tables `[T, rope_dim/2]` (the first
/// `rope_dim` channels rotate, the others pass through).
fn rope_diff(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let (d, half) = (x.dim(2)?, cos.dim(1)?);
    if 2 * half < d {
        let rotated = rope_diff(&x.narrow(2, 0, 2 * half)?, cos, sin)?;
        return Ok(Tensor::cat(&[&rotated, &x.narrow(2, 2 * half, d - 2 * half)?], 2)?);
    }
    let (c, s) = (cos.unsqueeze(1)?, sin.unsqueeze(1)?);
    let x1 = x.narrow(2, 0, half)?;
    let x2 = x.narrow(2, half, half)?;
    let a = (x1.broadcast_mul(&c)? - x2.broadcast_mul(&s)?)?;
    let b = (x2.broadcast_mul(&c)? + x1.broadcast_mul(&s)?)?;
    Ok(Tensor::cat(&[&a, &b], 2)?)
}

/// log(1 + exp(z)), stable and differentiable.
fn softplus(z: &Tensor) -> Result<Tensor> {
    Ok((z.relu()? + ((z.abs()?.neg()?.exp()? + 1.0)?.log()?))?)
}

impl Llama {
    /// Logits of every position of `ids` with dense attention (each layer's own window kept).
    /// With `student`, each layer's adapter produces noisy relaxed decisions; a key k outside the
    /// window of query q (q - k > W) gets `log(1 - sigmoid(logit_{k+1}))` added to its score.
    pub fn dense_forward(&self, ids: &[u32], student: Option<(&AdapterParams, &StudentOpts)>) -> Result<DenseOut> {
        let cfg = &self.cfg;
        let t = ids.len();
        let (nh, nkv, hd) = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
        let g = nh / nkv;
        let eps = cfg.rms_norm_eps;
        let dev = &self.device;
        let positions: Vec<u32> = (0..t as u32).collect();
        let (cos, sin) = self.rope_tables(&positions)?;
        // Gemma 3's local layers rotate at their own base.
        let local = match &self.local_inv_freq {
            Some(f) => Some(self.rope_table(f, 1.0, &positions)?),
            None => None,
        };
        // A layer without RoPE (SmolLM3's) rotates by nothing: cosines 1, sines 0.
        let (ones, zeros) = (cos.ones_like()?, sin.zeros_like()?);
        let w = student.map_or(usize::MAX, |(_, o)| o.window);
        let mut x = self.embed.dense()?.index_select(&Tensor::new(ids, dev)?, 0)?;
        if let Some(m) = self.embedding_scale() {
            x = (x * m)?;
        }
        let scale = self.softmax_scale();
        let mut decisions = Vec::new();
        let lora = student.and_then(|(ad, _)| ad.lora.as_ref()).map(LoraVars::view);
        if lora.is_some() && self.cfg.mla.is_some() {
            anyhow::bail!("a LoRA on q/k/v/o_proj needs per-head attention; this model has latent attention");
        }
        for (li, layer) in self.layers.iter().enumerate() {
            let penalty = match student {
                Some((ad, o)) => {
                    let a = rms(&x, ad.norms[li].as_tensor(), eps)?;
                    let raw = a.matmul(&ad.projs[li].as_tensor().t()?)?;
                    let gate = ((raw * o.alpha_scale)? - o.alpha_offset)?;
                    let noisy = ((gate + &o.noise[li])? / o.tau)?;
                    let probs = candle_nn::ops::sigmoid(&noisy)?;
                    let hard = probs.gt(0.5)?.to_dtype(DType::F32)?;
                    decisions.push(((hard - probs.detach())? + &probs)?);
                    let next =
                        Tensor::cat(&[&noisy.narrow(0, 1, t - 1)?, &Tensor::zeros((1, nkv), DType::F32, dev)?], 0)?;
                    Some(softplus(&next.t()?)?.neg()?)
                }
                None => None,
            };
            let lora = lora.as_ref().map(|l| (l, li));
            let is_local = cfg.gemma.as_ref().is_some_and(|g| g.local_layers.get(li).copied().unwrap_or(false));
            let (cos, sin) = match (&local, is_local) {
                _ if cfg.nope_layers.get(li).copied().unwrap_or(false) => (&ones, &zeros),
                (Some((c, s)), true) => (c, s),
                _ => (&cos, &sin),
            };
            let model_window = match &cfg.windows {
                Some(mw) if mw.layers().get(li).copied().unwrap_or(false) => mw.window() as usize,
                _ => usize::MAX,
            };
            let sink_logits = match &layer.attn {
                Attention::Mha(m) => m.sinks.as_deref(),
                Attention::Mla(_) => None,
            };
            let softcap = cfg.gemma.as_ref().and_then(|g| g.attn_softcap);
            let mask = Mask { window: w, model_window, sink_logits, softcap };
            x = self.dense_layer(layer, &x, cos, sin, mask, penalty.as_ref(), lora, scale, (nh, nkv, hd, g))?;
        }
        let xs = rms(&x, &self.norm, eps)?;
        let mut logits = frozen_matmul(&xs, self.lm_head.dense_weight()?)?;
        if let Some(g) = cfg.granite {
            logits = (logits / g.logits)?;
        }
        if let Some(cap) = cfg.gemma.as_ref().and_then(|g| g.final_softcap) {
            logits = ((logits / cap)?.tanh()? * cap)?;
        }
        Ok(DenseOut { logits, decisions })
    }

    #[allow(clippy::too_many_arguments)]
    fn dense_layer(
        &self,
        layer: &Layer,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: Mask,
        penalty: Option<&Tensor>,
        lora: Option<(&AttentionLora, usize)>,
        scale: f64,
        (nh, nkv, hd, g): (usize, usize, usize, usize),
    ) -> Result<Tensor> {
        let project = |proj: &crate::model::linear::Proj, target: LoraTarget, x: &Tensor| -> Result<Tensor> {
            let y = proj.forward_frozen(x)?;
            match lora {
                Some((l, li)) => Ok((y + l.delta(li, target, x)?)?),
                None => Ok(y),
            }
        };
        let eps = self.cfg.rms_norm_eps;
        let t = x.dim(0)?;
        let h = rms(x, &layer.input_norm, eps)?;
        let (q, k, v) = match &layer.attn {
            Attention::Mla(m) => {
                // Latent rows are keys; values are their first `rank` floats.
                let MlaInputs { q, latent } = m.inputs_with(&h, cos, sin, true)?;
                let v = latent.narrow(2, 0, m.rank())?;
                (q, latent, v)
            }
            Attention::Mha(m) => {
                let mut q = project(&m.q_proj, LoraTarget::Q, &h)?.reshape((t, nh, hd))?;
                let mut k = project(&m.k_proj, LoraTarget::K, &h)?.reshape((t, nkv, hd))?;
                let v = project(&m.v_proj, LoraTarget::V, &h)?.reshape((t, nkv, hd))?;
                if let (Some(qn), Some(kn)) = (&m.q_norm, &m.k_norm) {
                    q = rms(&q, qn, eps)?;
                    k = rms(&k, kn, eps)?;
                }
                if let Some(qn) = &self.query_neuron {
                    q = q.broadcast_mul(&qn.mask)?;
                }
                let mut q = rope_diff(&q, cos, sin)?;
                if let Some(qn) = &self.query_neuron {
                    q = q.broadcast_mul(&qn.mask)?;
                }
                (q, rope_diff(&k, cos, sin)?, v)
            }
        };
        let (dq, dv) = (q.dim(2)?, v.dim(2)?);
        let q = q.transpose(0, 1)?.contiguous()?.reshape((nkv, g, t, dq))?;
        let k = k.transpose(0, 1)?.contiguous()?;
        let v = v.transpose(0, 1)?.contiguous()?;
        let none = Tensor::zeros((nkv, t), DType::F32, x.device())?;
        let out = masked_attention(&q, &k, &v, penalty.unwrap_or(&none), mask, scale)?
            .reshape((nh, t, dv))?
            .transpose(0, 1)?
            .contiguous()?
            .reshape((t, nh * dv))?;
        let o = match &layer.attn {
            Attention::Mha(m) => project(&m.o_proj, LoraTarget::O, &out)?,
            Attention::Mla(m) => m.output(&out)?,
        };
        // Gemma normalizes each branch's output; Granite scales it.
        let branch = |y: Tensor, norm: Option<&Tensor>| -> Result<Tensor> {
            match (norm, self.cfg.granite) {
                (Some(n), _) => rms(&y, n, eps),
                (None, Some(g)) => Ok((y * g.residual)?),
                (None, None) => Ok(y),
            }
        };
        let (attn_norm, ffn_norm) = match &layer.sandwich {
            Some((a, f)) => (Some(a), Some(f)),
            None => (None, None),
        };
        let x = (x + branch(o, attn_norm)?)?;
        let h = rms(&x, &layer.post_norm, eps)?;
        Ok((&x + branch(layer.ffn.forward_differentiable(&h)?, ffn_norm)?)?)
    }
}
