//! Feed-forward blocks: the SwiGLU MLP and the mixture of experts (DeepSeek, Qwen2/Qwen3-MoE,
//! Mixtral, GPT-OSS).

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use candle_nn::Linear;

use super::config::{MoeConfig, OaiExperts};
use super::linear::{frozen_matmul, Proj};

/// The gate's activation in a gated MLP.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Activation {
    /// SiLU (SwiGLU: Llama, Mistral, Qwen, Phi-3, DeepSeek).
    Silu,
    /// GELU in its tanh approximation (GeGLU: Gemma's `gelu_pytorch_tanh`).
    GeluTanh,
    /// GPT-OSS's clamped SwiGLU, which also shifts the up projection by one (see
    /// [`OaiExperts`]).
    Oai(OaiExperts),
}

/// Gated MLP: `down(act(gate(x)) * up(x))`, SwiGLU unless [`Mlp::with_activation`] says else.
#[derive(Clone)]
pub struct Mlp {
    /// Gate projection.
    pub gate: Proj,
    /// Up projection.
    pub up: Proj,
    /// Down projection.
    pub down: Proj,
    /// The gate's activation.
    pub act: Activation,
}

impl Mlp {
    /// Loads `{prefix}.{gate,up,down}_proj` with `proj(layer name, out, in)`.
    pub fn load(
        prefix: &str,
        hidden: usize,
        inter: usize,
        proj: &dyn Fn(&str, usize, usize) -> Result<Proj>,
    ) -> Result<Self> {
        Ok(Self {
            gate: proj(&format!("{prefix}.gate_proj"), inter, hidden)?,
            up: proj(&format!("{prefix}.up_proj"), inter, hidden)?,
            down: proj(&format!("{prefix}.down_proj"), hidden, inter)?,
            act: Activation::Silu,
        })
    }

    /// The same MLP with `act` on its gate.
    pub fn with_activation(self, act: Activation) -> Self {
        Self { act, ..self }
    }

    /// Random weights N(0, 0.02).
    pub fn random(hidden: usize, inter: usize, device: &Device, dtype: DType) -> Result<Self> {
        let w = |o: usize, i: usize| -> Result<Proj> {
            Ok(Proj::Dense(Linear::new(Tensor::randn(0f32, 0.02, (o, i), device)?.to_dtype(dtype)?, None)))
        };
        Ok(Self { gate: w(inter, hidden)?, up: w(inter, hidden)?, down: w(hidden, inter)?, act: Activation::Silu })
    }

    /// The same weights in `dtype`.
    pub fn to_dtype(&self, dtype: DType) -> Result<Self> {
        Ok(Self {
            gate: self.gate.to_dtype(dtype)?,
            up: self.up.to_dtype(dtype)?,
            down: self.down.to_dtype(dtype)?,
            act: self.act,
        })
    }

    /// Applies the MLP to `[n, hidden]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let [gate, up]: [Tensor; 2] =
            Proj::forward_many(&[&self.gate, &self.up], x)?.try_into().expect("two projections");
        let gated = match self.act {
            Activation::Silu => (candle_nn::ops::silu(&gate)? * up)?,
            Activation::GeluTanh => (gate.gelu()? * up)?,
            Activation::Oai(o) => oai_glu(&gate, &up, o)?,
        };
        self.down.forward(&gated)
    }

    /// [`Self::forward`] with `Tensor::silu` (which has a gradient).
    pub fn forward_differentiable(&self, x: &Tensor) -> Result<Tensor> {
        let (gate, up) = (self.gate.forward_frozen(x)?, self.up.forward_frozen(x)?);
        let gated = match self.act {
            Activation::Silu => (gate.silu()? * up)?,
            Activation::GeluTanh => (gate.gelu()? * up)?,
            Activation::Oai(o) => oai_glu(&gate, &up, o)?,
        };
        self.down.forward_frozen(&gated)
    }

    /// Number of weights.
    pub fn weight_count(&self) -> usize {
        self.gate.weight_count() + self.up.weight_count() + self.down.weight_count()
    }

    /// Bytes the weights take in memory.
    pub fn byte_count(&self) -> usize {
        self.gate.byte_count() + self.up.byte_count() + self.down.byte_count()
    }
}

/// GPT-OSS's `(clamp(up, -limit, limit) + 1) * g * sigmoid(alpha * g)`, `g = min(gate, limit)`.
/// candle-nn's sigmoid has a gradient, and unlike `1 / (1 + exp(-x))` composed of ops, whose
/// backward multiplies 0 by an overflowed `exp` (NaN) once `x` is far below zero, it stays finite.
fn oai_glu(gate: &Tensor, up: &Tensor, o: OaiExperts) -> Result<Tensor> {
    let g = gate.minimum(o.limit)?;
    let up = (up.clamp(-o.limit, o.limit)? + 1.0)?;
    let s = (&g * o.alpha)?;
    let sigmoid = candle_nn::ops::sigmoid(&s)?;
    Ok(((g * sigmoid)? * up)?)
}

/// Mixture of experts (DeepSeek V2/V3, Qwen2/Qwen3-MoE, Mixtral, GPT-OSS): a router over
/// `n_routed_experts` MLPs plus shared experts.
pub struct Moe {
    router: Tensor,
    /// GPT-OSS's router bias, added to the logits.
    router_bias: Option<Tensor>,
    correction_bias: Option<Vec<f32>>,
    experts: Vec<Mlp>,
    shared: Option<Mlp>,
    /// Qwen2-MoE's `shared_expert_gate` (`[1, hidden]`): the shared expert's output is scaled by
    /// `sigmoid(gate . x)`.
    shared_gate: Option<Tensor>,
    cfg: MoeConfig,
    /// All experts share one weight set (random models for speed work).
    shared_weights: bool,
}

impl Moe {
    /// Loads `{prefix}` (`model.layers.N.mlp`): `gate.weight` and optional
    /// `gate.e_score_correction_bias` (V3) with `get(name, shape)`, the experts' projections
    /// (`experts.E.*`, `shared_experts.*`, or Qwen2-MoE's `shared_expert.*` with
    /// `shared_expert_gate.weight`) with `proj(name, out, in, biased)`, dense or quantized.
    /// GPT-OSS's experts and router (`gate.bias`) are biased.
    pub fn load(
        prefix: &str,
        hidden: usize,
        cfg: &MoeConfig,
        get: &dyn Fn(&str, &[usize]) -> Result<Tensor>,
        proj: &dyn Fn(&str, usize, usize, bool) -> Result<Proj>,
        has: &dyn Fn(&str) -> bool,
    ) -> Result<Self> {
        let router = get(&format!("{prefix}.gate.weight"), &[cfg.n_routed_experts, hidden])?;
        let router_bias = match cfg.oai {
            Some(_) => Some(get(&format!("{prefix}.gate.bias"), &[cfg.n_routed_experts])?),
            None => None,
        };
        let biased = cfg.oai.is_some();
        let expert_proj = |name: &str, out: usize, inp: usize| proj(name, out, inp, biased);
        let plain_proj = |name: &str, out: usize, inp: usize| proj(name, out, inp, false);
        let bias_name = format!("{prefix}.gate.e_score_correction_bias");
        let correction_bias = if has(&bias_name) {
            Some(get(&bias_name, &[cfg.n_routed_experts])?.to_dtype(DType::F32)?.to_vec1::<f32>()?)
        } else if cfg.topk_method == "noaux_tc" {
            anyhow::bail!("tensor `{bias_name}` is missing (topk_method noaux_tc needs it)");
        } else {
            None
        };
        let act = cfg.oai.map_or(Activation::Silu, Activation::Oai);
        let experts = (0..cfg.n_routed_experts)
            .map(|e| {
                let mlp = Mlp::load(&format!("{prefix}.experts.{e}"), hidden, cfg.moe_intermediate_size, &expert_proj)?;
                Ok(mlp.with_activation(act))
            })
            .collect::<Result<Vec<_>>>()?;
        let (shared, shared_gate) = match cfg.gated_shared_width {
            Some(w) => (
                Some(Mlp::load(&format!("{prefix}.shared_expert"), hidden, w, &plain_proj)?),
                Some(get(&format!("{prefix}.shared_expert_gate.weight"), &[1, hidden])?),
            ),
            None if cfg.n_shared_experts > 0 => {
                let width = cfg.moe_intermediate_size * cfg.n_shared_experts;
                (Some(Mlp::load(&format!("{prefix}.shared_experts"), hidden, width, &plain_proj)?), None)
            }
            None => (None, None),
        };
        Ok(Self {
            router,
            router_bias,
            correction_bias,
            experts,
            shared,
            shared_gate,
            cfg: cfg.clone(),
            shared_weights: false,
        })
    }

    /// Random router and one random expert weight set shared by every routed expert (routing and
    /// compute are those of the real shape; memory stays small).
    pub fn random(hidden: usize, cfg: &MoeConfig, device: &Device, dtype: DType) -> Result<Self> {
        let act = cfg.oai.map_or(Activation::Silu, Activation::Oai);
        let one = Mlp::random(hidden, cfg.moe_intermediate_size, device, dtype)?.with_activation(act);
        let shared_width = cfg.gated_shared_width.unwrap_or(cfg.moe_intermediate_size * cfg.n_shared_experts);
        let shared = if shared_width > 0 { Some(Mlp::random(hidden, shared_width, device, dtype)?) } else { None };
        let shared_gate = match cfg.gated_shared_width {
            Some(_) => Some(Tensor::randn(0f32, 0.02, (1, hidden), device)?.to_dtype(dtype)?),
            None => None,
        };
        Ok(Self {
            router: Tensor::randn(0f32, 0.02, (cfg.n_routed_experts, hidden), device)?.to_dtype(dtype)?,
            router_bias: None,
            correction_bias: (cfg.topk_method == "noaux_tc").then(|| vec![0.0; cfg.n_routed_experts]),
            experts: vec![one; cfg.n_routed_experts],
            shared,
            shared_gate,
            cfg: cfg.clone(),
            shared_weights: true,
        })
    }

    /// The same weights in `dtype`.
    pub fn to_dtype(&self, dtype: DType) -> Result<Self> {
        let experts = if self.shared_weights {
            vec![self.experts[0].to_dtype(dtype)?; self.experts.len()]
        } else {
            self.experts.iter().map(|e| e.to_dtype(dtype)).collect::<Result<Vec<_>>>()?
        };
        Ok(Self {
            router: self.router.to_dtype(dtype)?,
            router_bias: self.router_bias.as_ref().map(|b| b.to_dtype(dtype)).transpose()?,
            correction_bias: self.correction_bias.clone(),
            experts,
            shared: self.shared.as_ref().map(|s| s.to_dtype(dtype)).transpose()?,
            shared_gate: self.shared_gate.as_ref().map(|g| g.to_dtype(dtype)).transpose()?,
            cfg: self.cfg.clone(),
            shared_weights: self.shared_weights,
        })
    }

    /// Number of distinct weights.
    pub fn weight_count(&self) -> usize {
        let routed = if self.shared_weights {
            self.experts[0].weight_count()
        } else {
            self.experts.iter().map(Mlp::weight_count).sum()
        };
        self.router.elem_count()
            + self.router_bias.as_ref().map_or(0, Tensor::elem_count)
            + routed
            + self.shared.as_ref().map_or(0, Mlp::weight_count)
            + self.shared_gate.as_ref().map_or(0, Tensor::elem_count)
    }

    /// Bytes the weights take in memory (experts shared by a random model counted once).
    pub fn byte_count(&self) -> usize {
        let routed = if self.shared_weights {
            self.experts[0].byte_count()
        } else {
            self.experts.iter().map(Mlp::byte_count).sum()
        };
        let bytes = |t: &Tensor| t.elem_count() * t.dtype().size_in_bytes();
        bytes(&self.router)
            + self.router_bias.as_ref().map_or(0, bytes)
            + routed
            + self.shared.as_ref().map_or(0, Mlp::byte_count)
            + self.shared_gate.as_ref().map_or(0, bytes)
    }

    /// Applies the block to `[n, hidden]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.apply(x, false)
    }

    /// [`Self::forward`] with the routing weights computed by tensor ops from the router logits,
    /// so that gradients flow through them as well as through the experts (the choice of experts
    /// is discrete and stays as [`route`] makes it).
    pub fn forward_differentiable(&self, x: &Tensor) -> Result<Tensor> {
        self.apply(x, true)
    }

    /// The block; `differentiable`: routing weights by tensor ops and every matmul with the
    /// weights frozen (no weight gradients computed or kept).
    fn apply(&self, x: &Tensor, differentiable: bool) -> Result<Tensor> {
        let n = x.dim(0)?;
        let matmul = |w: &Tensor| if differentiable { frozen_matmul(x, w) } else { Ok(x.matmul(&w.t()?)?) };
        let mlp = |m: &Mlp, x: &Tensor| if differentiable { m.forward_differentiable(x) } else { m.forward(x) };
        let logits_t = match &self.router_bias {
            Some(b) => matmul(&self.router)?.broadcast_add(&b.to_dtype(x.dtype())?)?,
            None => matmul(&self.router)?,
        }
        .to_dtype(DType::F32)?;
        let logits = logits_t.to_vec2::<f32>()?;
        let mut per_expert: Vec<(Vec<u32>, Vec<f32>)> = vec![(Vec::new(), Vec::new()); self.experts.len()];
        for (t, l) in logits.iter().enumerate() {
            for (e, w) in route(l, &self.cfg, self.correction_bias.as_deref()) {
                per_expert[e].0.push(t as u32);
                per_expert[e].1.push(w);
            }
        }
        let weights_t = if differentiable { Some(self.routing_weights(&logits_t, &per_expert)?) } else { None };
        let mut out = x.zeros_like()?;
        for (e, (tokens, weights)) in per_expert.into_iter().enumerate() {
            if tokens.is_empty() {
                continue;
            }
            let idx = Tensor::new(tokens.as_slice(), x.device())?;
            let y = mlp(&self.experts[e], &x.index_select(&idx, 0)?)?;
            let w = match &weights_t {
                Some(all) => all.index_select(&idx, 0)?.narrow(1, e, 1)?,
                None => Tensor::from_vec(weights, (idx.dim(0)?, 1), x.device())?,
            };
            out = out.index_add(&idx, &y.broadcast_mul(&w.to_dtype(y.dtype())?)?, 0)?;
        }
        if let Some(s) = &self.shared {
            let y = mlp(s, x)?;
            out = match &self.shared_gate {
                // candle-nn's sigmoid: finite gradients (see `oai_glu`).
                Some(g) => (out + y.broadcast_mul(&candle_nn::ops::sigmoid(&matmul(g)?)?)?)?,
                None => (out + y)?,
            };
        }
        debug_assert_eq!(out.dim(0).ok(), Some(n));
        Ok(out)
    }

    /// `[n, experts]` routing weights as [`route`] gives them (zero for experts not chosen),
    /// computed from `logits` (`[n, experts]`, f32) by differentiable tensor ops; `chosen` lists
    /// each expert's tokens.
    fn routing_weights(&self, logits: &Tensor, chosen: &[(Vec<u32>, Vec<f32>)]) -> Result<Tensor> {
        let (n, ne) = logits.dims2()?;
        let mut mask = vec![0f32; n * ne];
        for (e, (tokens, _)) in chosen.iter().enumerate() {
            for &t in tokens {
                mask[t as usize * ne + e] = 1.0;
            }
        }
        let mask = Tensor::from_vec(mask, (n, ne), logits.device())?;
        let sigmoid = self.cfg.scoring_func == "sigmoid";
        let scores = if sigmoid {
            candle_nn::ops::sigmoid(logits)?
        } else {
            candle_nn::ops::softmax(logits, candle_core::D::Minus1)?
        };
        let mut w = (scores * mask)?;
        if normalises(&self.cfg) {
            let z = (w.sum_keepdim(1)? + if sigmoid { 1e-20 } else { 0.0 })?;
            w = w.broadcast_div(&z)?;
        }
        if scales(&self.cfg) {
            w = (w * self.cfg.routed_scaling_factor)?;
        }
        Ok(w)
    }
}

/// Whether the chosen experts' weights are renormalised to sum to 1.
fn normalises(cfg: &MoeConfig) -> bool {
    cfg.num_experts_per_tok > 1 && cfg.norm_topk_prob
}

/// Whether the weights are multiplied by `routed_scaling_factor`: V3 always, V2 only when it
/// does not renormalise.
fn scales(cfg: &MoeConfig) -> bool {
    cfg.scoring_func == "sigmoid" || !normalises(cfg)
}

/// The experts a token goes to and their weights, from its router logits (DeepSeek V2, Qwen and
/// Mixtral: softmax scores, greedy or group-limited top-k; V3: sigmoid scores, top-k over scores
/// plus the correction bias within the best groups, weights from the unbiased scores).
pub fn route(logits: &[f32], cfg: &MoeConfig, bias: Option<&[f32]>) -> Vec<(usize, f32)> {
    let ne = logits.len();
    let scores: Vec<f32> = if cfg.scoring_func == "sigmoid" {
        logits.iter().map(|&l| 1.0 / (1.0 + (-l).exp())).collect()
    } else {
        let m = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let e: Vec<f32> = logits.iter().map(|&l| (l - m).exp()).collect();
        let z: f32 = e.iter().sum();
        e.iter().map(|x| x / z).collect()
    };
    let choice: Vec<f32> = match (cfg.topk_method.as_str(), bias) {
        ("noaux_tc", Some(b)) => scores.iter().zip(b).map(|(s, b)| s + b).collect(),
        _ => scores.clone(),
    };
    let mut allowed = vec![true; ne];
    if cfg.topk_method != "greedy" && cfg.n_group > 1 {
        let gs = ne / cfg.n_group;
        let group_score = |g: usize| -> f32 {
            let mut v: Vec<f32> = choice[g * gs..(g + 1) * gs].to_vec();
            v.sort_by(|a, b| b.total_cmp(a));
            if cfg.topk_method == "noaux_tc" {
                v.iter().take(2).sum()
            } else {
                v[0]
            }
        };
        let mut groups: Vec<(usize, f32)> = (0..cfg.n_group).map(|g| (g, group_score(g))).collect();
        groups.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        let keep: Vec<usize> = groups.iter().take(cfg.topk_group).map(|g| g.0).collect();
        for (e, a) in allowed.iter_mut().enumerate() {
            *a = keep.contains(&(e / gs));
        }
    }
    let mut order: Vec<usize> = (0..ne).filter(|&e| allowed[e]).collect();
    order.sort_by(|&a, &b| choice[b].total_cmp(&choice[a]).then(a.cmp(&b)));
    order.truncate(cfg.num_experts_per_tok);
    let mut w: Vec<(usize, f32)> = order.iter().map(|&e| (e, scores[e])).collect();
    if normalises(cfg) {
        let z: f32 = w.iter().map(|x| x.1).sum::<f32>() + if cfg.scoring_func == "sigmoid" { 1e-20 } else { 0.0 };
        for x in &mut w {
            x.1 /= z;
        }
    }
    if scales(cfg) {
        for x in &mut w {
            x.1 *= cfg.routed_scaling_factor as f32;
        }
    }
    w
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(scoring: &str, method: &str, groups: usize, topk_group: usize, norm: bool) -> MoeConfig {
        MoeConfig {
            n_routed_experts: 8,
            n_shared_experts: 0,
            gated_shared_width: None,
            num_experts_per_tok: 2,
            moe_intermediate_size: 4,
            first_k_dense_replace: 0,
            moe_layer_freq: 1,
            mlp_only_layers: vec![],
            norm_topk_prob: norm,
            routed_scaling_factor: 2.5,
            scoring_func: scoring.into(),
            topk_method: method.into(),
            n_group: groups,
            topk_group,
            oai: None,
        }
    }

    /// A `(rows, cols)` matrix of values uniform in `[-scale, scale]`, the same for the same seed
    /// (a splitmix64 stream: the test must not depend on the run).
    fn seeded(seed: u64, rows: usize, cols: usize, scale: f32) -> Result<Tensor> {
        let mut s = seed;
        let v: Vec<f32> = (0..rows * cols)
            .map(|_| {
                s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
                let mut z = s;
                z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
                z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
                z ^= z >> 31;
                scale * (2.0 * (z >> 40) as f32 / (1u64 << 24) as f32 - 1.0)
            })
            .collect();
        Ok(Tensor::from_vec(v, (rows, cols), &Device::Cpu)?)
    }

    /// A block with weights large enough that every path matters.
    fn strong_block(c: MoeConfig) -> Result<Moe> {
        let seed = std::cell::Cell::new(1u64);
        let w = |o: usize, i: usize| -> Result<Proj> {
            seed.set(seed.get() + 1);
            Ok(Proj::Dense(Linear::new(seeded(seed.get(), o, i, 0.8)?, None)))
        };
        let act = c.oai.map_or(Activation::Silu, Activation::Oai);
        let mlp = |i: usize| -> Result<Mlp> { Ok(Mlp { gate: w(i, 8)?, up: w(i, 8)?, down: w(8, i)?, act }) };
        let bias = (c.topk_method == "noaux_tc").then(|| vec![0.1, -0.2, 0.0, 0.3, 0.0, 0.1, -0.1, 0.2]);
        Ok(Moe {
            router: seeded(100, 8, 8, 1.7)?,
            router_bias: match c.oai {
                Some(_) => Some(seeded(400, 1, 8, 1.0)?.squeeze(0)?),
                None => None,
            },
            correction_bias: bias,
            experts: (0..8).map(|_| mlp(4)).collect::<Result<_>>()?,
            shared: Some(mlp(4)?),
            shared_gate: c.gated_shared_width.map(|_| seeded(300, 1, 8, 1.0)).transpose()?,
            cfg: c,
            shared_weights: false,
        })
    }

    /// The differentiable block gives the fast block's values, and its gradient with respect to
    /// its input is the central finite difference of the block (routing weights included), for
    /// V2-style (softmax, scaled) and V3-style (sigmoid, renormalised and scaled) routing, and
    /// GPT-OSS's (biased router, clamped activation: a limit of 0.5 clamps most of these gates).
    #[test]
    fn differentiable_block_has_the_finite_difference_gradient() -> Result<()> {
        let dev = Device::Cpu;
        let qwen2 = MoeConfig { gated_shared_width: Some(4), ..cfg("softmax", "greedy", 1, 1, false) };
        let oai =
            MoeConfig { oai: Some(OaiExperts { limit: 0.5, alpha: 1.702 }), ..cfg("softmax", "greedy", 1, 1, true) };
        for c in [cfg("softmax", "greedy", 1, 1, false), cfg("sigmoid", "noaux_tc", 4, 2, true), qwen2, oai] {
            let moe = strong_block(MoeConfig { n_shared_experts: 1, ..c })?;
            let x = candle_core::Var::from_tensor(&seeded(200, 3, 8, 1.7)?)?;
            let y = moe.forward_differentiable(x.as_tensor())?;
            let fast = moe.forward(x.as_tensor())?;
            assert!((&y - fast)?.abs()?.max_all()?.to_scalar::<f32>()? < 1e-5);
            let grads = y.sum_all()?.backward()?;
            let g = grads.get(x.as_tensor()).expect("a gradient for the input").to_vec2::<f32>()?;
            let base = x.as_tensor().to_vec2::<f32>()?;
            let eps = 1e-3f32;
            for t in 0..3 {
                for i in 0..8 {
                    let at = |d: f32| -> Result<f32> {
                        let mut v = base.clone();
                        v[t][i] += d;
                        Ok(moe.forward(&Tensor::new(v, &dev)?)?.sum_all()?.to_scalar::<f32>()?)
                    };
                    let fd = (at(eps)? - at(-eps)?) / (2.0 * eps);
                    assert!((fd - g[t][i]).abs() < 2e-2 + 2e-2 * fd.abs(), "x[{t}][{i}]: {} vs {fd}", g[t][i]);
                }
            }
        }
        Ok(())
    }

    #[test]
    fn greedy_softmax_picks_the_two_largest_and_scales() {
        let l = [0.1, 2.0, -1.0, 0.5, 1.5, 0.0, -0.3, 0.2];
        let r = route(&l, &cfg("softmax", "greedy", 1, 1, false), None);
        let z: f32 = l.iter().map(|x| x.exp()).sum();
        assert_eq!(r.iter().map(|x| x.0).collect::<Vec<_>>(), vec![1, 4]);
        assert!((r[0].1 - 2.5 * 2f32.exp() / z).abs() < 1e-6);
        let n = route(&l, &cfg("softmax", "greedy", 1, 1, true), None);
        assert!((n[0].1 + n[1].1 - 1.0).abs() < 1e-6, "renormalised V2 weights sum to 1 and are not scaled");
    }

    #[test]
    fn v3_group_limited_routing_uses_the_bias_for_choice_only() {
        // Groups of 2: {0,1} {2,3} {4,5} {6,7}; the bias makes expert 6 win over expert 1.
        let l = [3.0, 2.9, -2.0, -2.0, -2.0, -2.0, 0.0, 0.0];
        let mut bias = [0f32; 8];
        bias[6] = 5.0;
        let r = route(&l, &cfg("sigmoid", "noaux_tc", 4, 2, true), Some(&bias));
        let ids: Vec<usize> = r.iter().map(|x| x.0).collect();
        assert_eq!(ids, vec![6, 0]);
        let s = |x: f32| 1.0 / (1.0 + (-x).exp());
        let z = s(0.0) + s(3.0);
        assert!((r[0].1 - 2.5 * s(0.0) / z).abs() < 1e-6, "weights come from unbiased scores");
        // With one group allowed, only the best group (by its top-2 sum) may be chosen.
        let r1 = route(&l, &cfg("sigmoid", "noaux_tc", 4, 1, true), Some(&bias));
        assert_eq!(r1.iter().map(|x| x.0).collect::<Vec<_>>(), vec![6, 7]);
    }
}
