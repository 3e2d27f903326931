//! Multi-head latent attention (DeepSeek V2/V3) over a latent cache.
//!
//! Per token and layer the cache holds one row: `c_kv` (the KV compression after
//! `kv_a_layernorm`, `kv_lora_rank` floats) followed by the shared rope key `k_pe` after RoPE.
//! Attention is absorbed: each head's query is projected into the latent space
//! (`q_nope · W_UK[h]`) and concatenated with its rotated rope part, so that a score is one dot
//! product with the cached row; the softmax-weighted sum of `c_kv` is mapped back per head with
//! `W_UV[h]`. This is exact (the same scores and outputs as the decompressed form), and nothing
//! per-head is ever cached.

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use candle_nn::Linear;

use super::config::{MlaConfig, ModelConfig};
use super::linear::Proj;

/// How queries are produced.
enum QueryProj {
    /// `q_proj` (no query compression).
    Plain(Proj),
    /// `q_a_proj` -> `q_a_layernorm` -> `q_b_proj`.
    Lora { a: Proj, norm: Tensor, b: Proj },
}

/// One layer's latent attention weights.
pub struct MlaAttention {
    q: QueryProj,
    kv_a: Proj,
    kv_norm: Tensor,
    /// `[heads, nope, rank]`: keys' absorption into the query.
    w_uk: Tensor,
    /// `[heads, rank, v]`: latent to per-head values.
    w_uv_t: Tensor,
    o_proj: Proj,
    dims: MlaConfig,
    heads: usize,
    eps: f64,
}

/// Projected inputs of one layer.
pub struct MlaInputs {
    /// Absorbed queries `[n, heads, rank + rope]`.
    pub q: Tensor,
    /// Latent rows `[n, 1, rank + rope]`.
    pub latent: Tensor,
}

impl MlaAttention {
    /// Loads layer `prefix` (`model.layers.N.self_attn`): its projections with
    /// `proj(name, out, in)` (dense or quantized), the norms and `kv_b_proj` (absorbed, dense)
    /// with `get(name, shape)`.
    pub fn load(
        cfg: &ModelConfig,
        prefix: &str,
        get: &dyn Fn(&str, &[usize]) -> Result<Tensor>,
        proj: &dyn Fn(&str, usize, usize) -> Result<Proj>,
    ) -> Result<Self> {
        let m = cfg.mla.clone().expect("MLA config");
        let (h, nh) = (cfg.hidden_size, cfg.num_heads);
        let qd = m.qk_nope_head_dim + m.qk_rope_head_dim;
        let lin = |name: &str, out: usize, inp: usize| proj(&format!("{prefix}.{name}"), out, inp);
        let q = match m.q_lora_rank {
            None => QueryProj::Plain(lin("q_proj", nh * qd, h)?),
            Some(r) => QueryProj::Lora {
                a: lin("q_a_proj", r, h)?,
                norm: get(&format!("{prefix}.q_a_layernorm.weight"), &[r])?,
                b: lin("q_b_proj", nh * qd, r)?,
            },
        };
        let kv_b =
            get(&format!("{prefix}.kv_b_proj.weight"), &[nh * (m.qk_nope_head_dim + m.v_head_dim), m.kv_lora_rank])?;
        Self::assemble(
            cfg,
            m.clone(),
            q,
            lin("kv_a_proj_with_mqa", m.kv_lora_rank + m.qk_rope_head_dim, h)?,
            get(&format!("{prefix}.kv_a_layernorm.weight"), &[m.kv_lora_rank])?,
            &kv_b,
            lin("o_proj", h, nh * m.v_head_dim)?,
        )
    }

    /// Random weights (N(0, 0.02), norms 1) of the configured shape.
    pub fn random(cfg: &ModelConfig, device: &Device, dtype: DType) -> Result<Self> {
        let m = cfg.mla.clone().expect("MLA config");
        let (h, nh) = (cfg.hidden_size, cfg.num_heads);
        let qd = m.qk_nope_head_dim + m.qk_rope_head_dim;
        let w =
            |o: usize, i: usize| -> Result<Tensor> { Ok(Tensor::randn(0f32, 0.02, (o, i), device)?.to_dtype(dtype)?) };
        let lin = |o: usize, i: usize| -> Result<Proj> { Ok(Proj::Dense(Linear::new(w(o, i)?, None))) };
        let ones = |n: usize| -> Result<Tensor> { Ok(Tensor::ones(n, dtype, device)?) };
        let q = match m.q_lora_rank {
            None => QueryProj::Plain(lin(nh * qd, h)?),
            Some(r) => QueryProj::Lora { a: lin(r, h)?, norm: ones(r)?, b: lin(nh * qd, r)? },
        };
        let kv_b = w(nh * (m.qk_nope_head_dim + m.v_head_dim), m.kv_lora_rank)?;
        let kv_a = lin(m.kv_lora_rank + m.qk_rope_head_dim, h)?;
        Self::assemble(cfg, m.clone(), q, kv_a, ones(m.kv_lora_rank)?, &kv_b, lin(h, nh * m.v_head_dim)?)
    }

    #[allow(clippy::too_many_arguments)]
    fn assemble(
        cfg: &ModelConfig,
        m: MlaConfig,
        q: QueryProj,
        kv_a: Proj,
        kv_norm: Tensor,
        kv_b: &Tensor,
        o_proj: Proj,
    ) -> Result<Self> {
        let nh = cfg.num_heads;
        let (nope, v, r) = (m.qk_nope_head_dim, m.v_head_dim, m.kv_lora_rank);
        // kv_b rows are head-major with nope before v inside each head.
        let per_head = kv_b.reshape((nh, nope + v, r))?;
        let w_uk = per_head.narrow(1, 0, nope)?.contiguous()?;
        let w_uv_t = per_head.narrow(1, nope, v)?.transpose(1, 2)?.contiguous()?;
        Ok(Self { q, kv_a, kv_norm, w_uk, w_uv_t, o_proj, dims: m, heads: nh, eps: cfg.rms_norm_eps })
    }

    /// The same weights in `dtype` (quantized projections stay as they are).
    pub fn to_dtype(&self, dtype: DType) -> Result<Self> {
        let c = |t: &Tensor| -> Result<Tensor> { Ok(t.to_dtype(dtype)?) };
        let cl = |l: &Proj| l.to_dtype(dtype);
        Ok(Self {
            q: match &self.q {
                QueryProj::Plain(l) => QueryProj::Plain(cl(l)?),
                QueryProj::Lora { a, norm, b } => QueryProj::Lora { a: cl(a)?, norm: c(norm)?, b: cl(b)? },
            },
            kv_a: cl(&self.kv_a)?,
            kv_norm: c(&self.kv_norm)?,
            w_uk: c(&self.w_uk)?,
            w_uv_t: c(&self.w_uv_t)?,
            o_proj: cl(&self.o_proj)?,
            dims: self.dims.clone(),
            heads: self.heads,
            eps: self.eps,
        })
    }

    /// Number of weights.
    pub fn weight_count(&self) -> usize {
        let q = match &self.q {
            QueryProj::Plain(l) => l.weight_count(),
            QueryProj::Lora { a, norm, b } => a.weight_count() + norm.elem_count() + b.weight_count(),
        };
        q + self.kv_a.weight_count()
            + self.kv_norm.elem_count()
            + self.w_uk.elem_count()
            + self.w_uv_t.elem_count()
            + self.o_proj.weight_count()
    }

    /// Bytes the weights take in memory.
    pub fn byte_count(&self) -> usize {
        let dense = |t: &Tensor| t.elem_count() * t.dtype().size_in_bytes();
        let q = match &self.q {
            QueryProj::Plain(l) => l.byte_count(),
            QueryProj::Lora { a, norm, b } => a.byte_count() + dense(norm) + b.byte_count(),
        };
        q + self.kv_a.byte_count()
            + dense(&self.kv_norm)
            + dense(&self.w_uk)
            + dense(&self.w_uv_t)
            + self.o_proj.byte_count()
    }

    /// Latent width (values are this many floats from the front of a row).
    pub fn rank(&self) -> usize {
        self.dims.kv_lora_rank
    }

    /// Absorbed queries and latent rows for `h` (`[n, hidden]`, after `input_layernorm`), with
    /// rotary tables `[n, rope/2]` (already multiplied by the YaRN mscale).
    pub fn inputs(&self, h: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<MlaInputs> {
        self.inputs_with(h, cos, sin, false)
    }

    /// [`Self::inputs`]; `differentiable` uses only ops with gradients (for retrofitting).
    pub fn inputs_with(&self, h: &Tensor, cos: &Tensor, sin: &Tensor, differentiable: bool) -> Result<MlaInputs> {
        let norm = |x: &Tensor, w: &Tensor| -> Result<Tensor> {
            Ok(if differentiable {
                candle_nn::ops::rms_norm_slow(x, w, self.eps as f32)?
            } else {
                candle_nn::ops::rms_norm(x, w, self.eps as f32)?
            })
        };
        let rotate = |x: &Tensor| -> Result<Tensor> {
            if differentiable {
                rope_reference(x, cos, sin, self.dims.rope_interleave)
            } else {
                self.rope(x, cos, sin)
            }
        };
        let m = &self.dims;
        let (n, nh) = (h.dim(0)?, self.heads);
        let (nope, rope, r) = (m.qk_nope_head_dim, m.qk_rope_head_dim, m.kv_lora_rank);
        let q = match &self.q {
            QueryProj::Plain(l) => l.forward(h)?,
            QueryProj::Lora { a, norm: w, b } => b.forward(&norm(&a.forward(h)?, w)?)?,
        };
        let q = q.reshape((n, nh, nope + rope))?;
        let q_nope = q.narrow(2, 0, nope)?.transpose(0, 1)?.contiguous()?;
        let q_lat = q_nope.matmul(&self.w_uk)?.transpose(0, 1)?;
        let q_pe = rotate(&q.narrow(2, nope, rope)?.contiguous()?)?;
        let kv = self.kv_a.forward(h)?;
        let c_kv = norm(&kv.narrow(1, 0, r)?.contiguous()?, &self.kv_norm)?;
        let k_pe = rotate(&kv.narrow(1, r, rope)?.contiguous()?.reshape((n, 1, rope))?)?;
        Ok(MlaInputs {
            q: Tensor::cat(&[&q_lat, &q_pe], 2)?.contiguous()?,
            latent: Tensor::cat(&[&c_kv.unsqueeze(1)?, &k_pe], 2)?.contiguous()?,
        })
    }

    /// Maps latent attention outputs `[n, heads * rank]` to the residual width.
    pub fn output(&self, o_lat: &Tensor) -> Result<Tensor> {
        let n = o_lat.dim(0)?;
        let (nh, r, v) = (self.heads, self.dims.kv_lora_rank, self.dims.v_head_dim);
        let o = o_lat.reshape((n, nh, r))?.transpose(0, 1)?.contiguous()?.matmul(&self.w_uv_t)?;
        let o = o.transpose(0, 1)?.contiguous()?.reshape((n, nh * v))?;
        self.o_proj.forward(&o)
    }

    /// RoPE on `[n, heads, rope]`: interleaved pairs (DeepSeek) or halves.
    fn rope(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        let x4 = x.transpose(0, 1)?.contiguous()?.unsqueeze(0)?;
        let y = if self.dims.rope_interleave {
            candle_nn::rotary_emb::rope_i(&x4, cos, sin)?
        } else {
            candle_nn::rotary_emb::rope(&x4, cos, sin)?
        };
        Ok(y.squeeze(0)?.transpose(0, 1)?.contiguous()?)
    }
}

/// RoPE on `[n, heads, d]` from elementary (differentiable) ops: interleaved pairs or halves.
pub fn rope_reference(x: &Tensor, cos: &Tensor, sin: &Tensor, interleave: bool) -> Result<Tensor> {
    let (n, h, d) = x.dims3()?;
    let (c, s) = (cos.reshape((n, 1, d / 2, 1))?, sin.reshape((n, 1, d / 2, 1))?);
    let (a, b) = if interleave {
        let p = x.reshape((n, h, d / 2, 2))?;
        (p.narrow(3, 0, 1)?, p.narrow(3, 1, 1)?)
    } else {
        (x.narrow(2, 0, d / 2)?.unsqueeze(3)?, x.narrow(2, d / 2, d / 2)?.unsqueeze(3)?)
    };
    let ra = (a.broadcast_mul(&c)? - b.broadcast_mul(&s)?)?;
    let rb = (b.broadcast_mul(&c)? + a.broadcast_mul(&s)?)?;
    let y = if interleave {
        Tensor::cat(&[&ra, &rb], 3)?.reshape((n, h, d))?
    } else {
        Tensor::cat(&[&ra.squeeze(3)?, &rb.squeeze(3)?], 2)?
    };
    Ok(y)
}
