//! Feed-forward blocks: the SwiGLU MLP and the mixture of experts (DeepSeek, Qwen3-MoE).

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use candle_nn::Linear;

use super::config::MoeConfig;
use super::linear::Proj;

/// SwiGLU MLP: `down(silu(gate(x)) * up(x))`.
#[derive(Clone)]
pub struct Mlp {
    /// Gate projection.
    pub gate: Proj,
    /// Up projection.
    pub up: Proj,
    /// Down projection.
    pub down: Proj,
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
        })
    }

    /// Random weights N(0, 0.02).
    pub fn random(hidden: usize, inter: usize, device: &Device, dtype: DType) -> Result<Self> {
        let w = |o: usize, i: usize| -> Result<Proj> {
            Ok(Proj::Dense(Linear::new(Tensor::randn(0f32, 0.02, (o, i), device)?.to_dtype(dtype)?, None)))
        };
        Ok(Self { gate: w(inter, hidden)?, up: w(inter, hidden)?, down: w(hidden, inter)? })
    }

    /// The same weights in `dtype`.
    pub fn to_dtype(&self, dtype: DType) -> Result<Self> {
        Ok(Self { gate: self.gate.to_dtype(dtype)?, up: self.up.to_dtype(dtype)?, down: self.down.to_dtype(dtype)? })
    }

    /// Applies the MLP to `[n, hidden]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let [gate, up]: [Tensor; 2] =
            Proj::forward_many(&[&self.gate, &self.up], x)?.try_into().expect("two projections");
        self.down.forward(&(candle_nn::ops::silu(&gate)? * up)?)
    }

    /// [`Self::forward`] with `Tensor::silu` (which has a gradient).
    pub fn forward_differentiable(&self, x: &Tensor) -> Result<Tensor> {
        self.down.forward_frozen(&(self.gate.forward_frozen(x)?.silu()? * self.up.forward_frozen(x)?)?)
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

/// Mixture of experts (DeepSeek V2/V3, Qwen3-MoE): a router over `n_routed_experts` MLPs plus
/// shared experts.
pub struct Moe {
    router: Tensor,
    correction_bias: Option<Vec<f32>>,
    experts: Vec<Mlp>,
    shared: Option<Mlp>,
    cfg: MoeConfig,
    /// All experts share one weight set (random models for speed work).
    shared_weights: bool,
}

impl Moe {
    /// Loads `{prefix}` (`model.layers.N.mlp`): `gate.weight` and optional
    /// `gate.e_score_correction_bias` (V3) with `get(name, shape)`, the experts' projections
    /// (`experts.E.*`, `shared_experts.*`) with `proj(name, out, in)`, dense or quantized.
    pub fn load(
        prefix: &str,
        hidden: usize,
        cfg: &MoeConfig,
        get: &dyn Fn(&str, &[usize]) -> Result<Tensor>,
        proj: &dyn Fn(&str, usize, usize) -> Result<Proj>,
        has: &dyn Fn(&str) -> bool,
    ) -> Result<Self> {
        let router = get(&format!("{prefix}.gate.weight"), &[cfg.n_routed_experts, hidden])?;
        let bias_name = format!("{prefix}.gate.e_score_correction_bias");
        let correction_bias = if has(&bias_name) {
            Some(get(&bias_name, &[cfg.n_routed_experts])?.to_dtype(DType::F32)?.to_vec1::<f32>()?)
        } else if cfg.topk_method == "noaux_tc" {
            anyhow::bail!("tensor `{bias_name}` is missing (topk_method noaux_tc needs it)");
        } else {
            None
        };
        let experts = (0..cfg.n_routed_experts)
            .map(|e| Mlp::load(&format!("{prefix}.experts.{e}"), hidden, cfg.moe_intermediate_size, proj))
            .collect::<Result<Vec<_>>>()?;
        let shared = if cfg.n_shared_experts > 0 {
            Some(Mlp::load(
                &format!("{prefix}.shared_experts"),
                hidden,
                cfg.moe_intermediate_size * cfg.n_shared_experts,
                proj,
            )?)
        } else {
            None
        };
        Ok(Self { router, correction_bias, experts, shared, cfg: cfg.clone(), shared_weights: false })
    }

    /// Random router and one random expert weight set shared by every routed expert (routing and
    /// compute are those of the real shape; memory stays small).
    pub fn random(hidden: usize, cfg: &MoeConfig, device: &Device, dtype: DType) -> Result<Self> {
        let one = Mlp::random(hidden, cfg.moe_intermediate_size, device, dtype)?;
        let shared = if cfg.n_shared_experts > 0 {
            Some(Mlp::random(hidden, cfg.moe_intermediate_size * cfg.n_shared_experts, device, dtype)?)
        } else {
            None
        };
        Ok(Self {
            router: Tensor::randn(0f32, 0.02, (cfg.n_routed_experts, hidden), device)?.to_dtype(dtype)?,
            correction_bias: (cfg.topk_method == "noaux_tc").then(|| vec![0.0; cfg.n_routed_experts]),
            experts: vec![one; cfg.n_routed_experts],
            shared,
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
            correction_bias: self.correction_bias.clone(),
            experts,
            shared: self.shared.as_ref().map(|s| s.to_dtype(dtype)).transpose()?,
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
        self.router.elem_count() + routed + self.shared.as_ref().map_or(0, Mlp::weight_count)
    }

    /// Bytes the weights take in memory (experts shared by a random model counted once).
    pub fn byte_count(&self) -> usize {
        let routed = if self.shared_weights {
            self.experts[0].byte_count()
        } else {
            self.experts.iter().map(Mlp::byte_count).sum()
        };
        self.router.elem_count() * self.router.dtype().size_in_bytes()
            + routed
            + self.shared.as_ref().map_or(0, Mlp::byte_count)
    }

    /// Applies the block to `[n, hidden]` (the routing weights enter gradients as constants).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let n = x.dim(0)?;
        let logits = x.matmul(&self.router.t()?)?.to_dtype(DType::F32)?.to_vec2::<f32>()?;
        let mut per_expert: Vec<(Vec<u32>, Vec<f32>)> = vec![(Vec::new(), Vec::new()); self.experts.len()];
        for (t, l) in logits.iter().enumerate() {
            for (e, w) in route(l, &self.cfg, self.correction_bias.as_deref()) {
                per_expert[e].0.push(t as u32);
                per_expert[e].1.push(w);
            }
        }
        let mut out = x.zeros_like()?;
        for (e, (tokens, weights)) in per_expert.into_iter().enumerate() {
            if tokens.is_empty() {
                continue;
            }
            let idx = Tensor::new(tokens.as_slice(), x.device())?;
            let y = self.experts[e].forward(&x.index_select(&idx, 0)?)?;
            let w = Tensor::from_vec(weights, (idx.dim(0)?, 1), x.device())?.to_dtype(y.dtype())?;
            out = out.index_add(&idx, &y.broadcast_mul(&w)?, 0)?;
        }
        if let Some(s) = &self.shared {
            out = (out + s.forward(x)?)?;
        }
        debug_assert_eq!(out.dim(0).ok(), Some(n));
        Ok(out)
    }
}

/// The experts a token goes to and their weights, from its router logits (DeepSeek V2 and
/// Qwen3-MoE: softmax scores, greedy or group-limited top-k; V3: sigmoid scores, top-k over
/// scores plus the correction bias within the best groups, weights from the unbiased scores).
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
    let normalise = cfg.num_experts_per_tok > 1 && cfg.norm_topk_prob;
    if normalise {
        let z: f32 = w.iter().map(|x| x.1).sum::<f32>() + if cfg.scoring_func == "sigmoid" { 1e-20 } else { 0.0 };
        for x in &mut w {
            x.1 /= z;
        }
    }
    // V3 always scales; V2 scales only when it does not renormalise.
    if cfg.scoring_func == "sigmoid" || !normalise {
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
        }
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
