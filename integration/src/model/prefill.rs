//! One-pass prompt prefill with DMS's visibility mask (spec rule 4.1) in tensor ops, on any
//! device: the prompt path of the GPU runtime, written so that the same code runs (and is
//! checked against the reference fixtures) on the CPU.
//!
//! Per KV head, prompt token `t` is flagged by token `t + 1`'s decision (rule 2), unless it is one
//! of the program's sinks; a flagged key `k` is hidden from queries `q > k + W`. After the prompt,
//! a row keeps every unflagged token plus the last `W + 1` tokens, which enter the
//! delayed-eviction ring with their flags (rule 4.2).

use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor};
use dms_policy::FlagSource;

use crate::gpu::policy::DevicePolicy;
use crate::kv::backend::{DecisionSpan, KvBackend, LayerStep, Signals};
use crate::model::Llama;

/// Flags `[T, kv_heads]` (f32, 1 = flagged) of a prompt at positions `0..T` for one layer: the
/// rule of [`DevicePolicy::flags_token`] in tensor ops. `scores` (`[T, kv_heads]`, the raw
/// decision signal of each token: decision scores, or key norms) is required for
/// [`FlagSource::Learned`] and [`FlagSource::KeyNorm`]. The last token's flag is 0: its fate is
/// decided by the next token.
pub fn prompt_flags(
    program: &DevicePolicy,
    layer: usize,
    t: usize,
    kv_heads: usize,
    scores: Option<&Tensor>,
    device: &Device,
) -> Result<Tensor> {
    let open = |rows: usize| Tensor::zeros((rows, kv_heads), DType::F32, device);
    // Token p's flag comes from token p + 1, so the last row stays 0 (and a one-token prompt
    // has no flag at all).
    let flags = match (&program.flags, t) {
        (FlagSource::None, _) | (_, 1) => open(t)?,
        (FlagSource::All, _) => Tensor::cat(&[&Tensor::ones((t - 1, kv_heads), DType::F32, device)?, &open(1)?], 0)?,
        (FlagSource::Random { .. }, _) => {
            let mut host = vec![0f32; t * kv_heads];
            for p in 0..t - 1 {
                for h in 0..kv_heads {
                    host[p * kv_heads + h] =
                        program.flags.flags_token(layer, h, p as dms_policy::Pos, 0.0) as u8 as f32;
                }
            }
            Tensor::from_vec(host, (t, kv_heads), device)?
        }
        (FlagSource::Learned { scale, offset } | FlagSource::KeyNorm { scale, offset }, _) => {
            let Some(s) = scores else { bail!("learned and key-norm prompt flags need their raw signal") };
            if s.dims() != [t, kv_heads] {
                bail!("decision scores have shape {:?}, expected [{t}, {kv_heads}]", s.dims());
            }
            let logit = s.to_dtype(DType::F32)?.affine(*scale as f64, -(*offset as f64))?;
            let decided = logit.gt(0f64)?.to_dtype(DType::F32)?;
            Tensor::cat(&[&decided.narrow(0, 1, t - 1)?, &open(1)?], 0)?
        }
    };
    Ok(match (program.sinks as usize).min(t) {
        0 => flags,
        sinks if sinks == t => open(t)?,
        sinks => Tensor::cat(&[&open(sinks)?, &flags.narrow(0, sinks, t - sinks)?], 0)?,
    })
}

/// Bytes of f32 scores one query chunk may use.
const SCORE_BYTES: usize = 1 << 30;

/// Attention of every prompt query over the prompt keys it may see: causal, and a flagged key
/// `k` hidden from queries `q > k + window`. `q`: `[T, n_heads, d]`, `k`: `[T, kv_heads, d]`,
/// `v`: `[T, kv_heads, dv]`, `flags`: `[T, kv_heads]` f32. Query head `i` reads KV head
/// `i / (n_heads / kv_heads)`. The score matmul runs in the inputs' dtype (bf16 rounding for bf16
/// models, as in candle's own models), mask and softmax in f32; queries in chunks that keep the
/// f32 scores under 1 GiB. Returns `[T, n_heads, dv]` in `q`'s dtype.
pub fn masked_prompt_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    flags: &Tensor,
    window: usize,
    scale: f64,
) -> Result<Tensor> {
    let (t, nh, d) = q.dims3()?;
    let (tk, nkv, dk) = k.dims3()?;
    let (tv, nkv_v, dv) = v.dims3()?;
    if tk != t || tv != t || dk != d || nkv_v != nkv || nkv == 0 || nh % nkv != 0 {
        bail!("prompt attention shapes do not match: q {:?}, k {:?}, v {:?}", q.dims(), k.dims(), v.dims());
    }
    if flags.dims() != [t, nkv] {
        bail!("prompt flags have shape {:?}, expected [{t}, {nkv}]", flags.dims());
    }
    let g = nh / nkv;
    let dev = q.device();
    let qh = q.transpose(0, 1)?.contiguous()?.reshape((nkv, g, t, d))?;
    let kh = k.transpose(0, 1)?.contiguous()?;
    let vh = v.transpose(0, 1)?.contiguous()?;
    let fl = flags.to_dtype(DType::F32)?.t()?.contiguous()?.unsqueeze(1)?;
    let chunk = (SCORE_BYTES / (nh * t * 4)).clamp(1, t);
    let mut outs = Vec::with_capacity(t.div_ceil(chunk));
    for c0 in (0..t).step_by(chunk) {
        let c = chunk.min(t - c0);
        let kl = c0 + c;
        let qc = qh.narrow(2, c0, c)?.contiguous()?.reshape((nkv, g * c, d))?;
        let kc = kh.narrow(1, 0, kl)?.contiguous()?;
        let vc = vh.narrow(1, 0, kl)?.contiguous()?;
        let s = (qc.matmul(&kc.t()?)?.to_dtype(DType::F32)? * scale)?.reshape((nkv, g, c, kl))?;
        let qi = Tensor::arange(c0 as u32, kl as u32, dev)?.to_dtype(DType::F32)?.reshape((c, 1))?;
        let kj = Tensor::arange(0u32, kl as u32, dev)?.to_dtype(DType::F32)?.reshape((1, kl))?;
        let causal = kj.broadcast_gt(&qi)?.to_dtype(DType::F32)?;
        let far = (qi - window as f64)?.broadcast_gt(&kj)?.to_dtype(DType::F32)?;
        // Causal and far are disjoint, so the sum is 0 (visible) or 1 (hidden).
        let hidden = far.broadcast_mul(&fl.narrow(2, 0, kl)?)?.broadcast_add(&causal)?;
        let s = s.broadcast_add(&(hidden * -1e30)?.unsqueeze(1)?)?;
        let p = candle_nn::ops::softmax_last_dim(&s)?.to_dtype(vc.dtype())?.reshape((nkv, g * c, kl))?;
        outs.push(p.matmul(&vc)?.reshape((nkv, g, c, dv))?);
    }
    let out = Tensor::cat(&outs, 2)?.reshape((nh, t, dv))?.transpose(0, 1)?.contiguous()?;
    Ok(out.to_dtype(q.dtype())?)
}

/// The masked one-pass prompt as a [`KvBackend`]: each layer's prompt attends with DMS's
/// visibility mask, and `store(layer, k, v, flags)` receives its keys `[T, rows, d]` (after
/// RoPE), values (`[T, rows, 0]` for latent rows) and flags `[T, rows]` (f32, 1 = flagged) for
/// the cache to keep what rule 4.2 says.
pub struct MaskedPrompt<'p, F> {
    program: &'p DevicePolicy,
    adapter: Option<&'p str>,
    tokens: usize,
    latent_rank: Option<usize>,
    device: Device,
    store: F,
}

impl<F: FnMut(usize, &Tensor, &Tensor, &Tensor) -> Result<()>> KvBackend for MaskedPrompt<'_, F> {
    fn signals(&self) -> Signals {
        Signals { decision: self.program.flags.needs_scores(), key_norms: self.program.flags.needs_key_norms() }
    }

    fn decision_spans(&self) -> Vec<DecisionSpan<'_>> {
        vec![DecisionSpan { tokens: self.tokens, needed: self.program.flags.needs_scores(), adapter: self.adapter }]
    }

    fn attend(&mut self, li: usize, step: LayerStep<'_>) -> Result<Tensor> {
        if let Some(cap) = step.softcap {
            bail!("the masked one-pass prompt has no attention soft-capping (the model's is {cap})");
        }
        if step.sink_logits.is_some() {
            bail!("the masked one-pass prompt has no attention sinks (the model has them)");
        }
        let (t, rows, _) = step.k.dims3()?;
        let raw = if self.program.flags.needs_key_norms() { step.key_norms } else { step.decision };
        let f = prompt_flags(self.program, li, t, rows, raw, &self.device)?;
        let values = match self.latent_rank {
            Some(r) => step.k.narrow(2, 0, r)?,
            None => step.v.clone(),
        };
        let attn = masked_prompt_attention(step.q, step.k, &values, &f, self.program.window, step.scale)?;
        (self.store)(li, step.k, step.v, &f)?;
        let (n, heads, width) = attn.dims3()?;
        Ok(attn.reshape((n, heads * width))?)
    }

    fn finish(&mut self) -> Result<()> {
        Ok(())
    }
}

/// One prompt of one sequence (positions `0..T`) in a single pass with DMS's visibility mask
/// (spec rule 4.1) under `program`, its learned decisions (and LoRA, if it has one) from
/// `adapter` (`None`: the model's own decision weights), on the model's device, handing each
/// layer to `store` ([`MaskedPrompt`]). Returns f32 logits `[T, vocab]` when `all_logits`, else
/// `[1, vocab]` for the last token.
pub fn masked_prefill(
    model: &Llama,
    tokens: &[u32],
    program: &DevicePolicy,
    adapter: Option<&str>,
    all_logits: bool,
    store: impl FnMut(usize, &Tensor, &Tensor, &Tensor) -> Result<()>,
) -> Result<Tensor> {
    if tokens.is_empty() {
        bail!("the prompt is empty");
    }
    let t = tokens.len();
    let positions: Vec<dms_policy::Pos> = (0..t as dms_policy::Pos).collect();
    let mut backend = MaskedPrompt {
        program,
        adapter,
        tokens: t,
        latent_rank: model.latent_rank(),
        device: model.device().clone(),
        store,
    };
    let x = model.forward_hidden(tokens, &positions, &mut backend)?;
    let xs = if all_logits { x } else { x.narrow(0, t - 1, 1)? };
    Ok(model.logits(&xs)?.to_dtype(DType::F32)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn program(flags: FlagSource, sinks: dms_policy::Pos) -> DevicePolicy {
        DevicePolicy { window: 3, flags, sinks }
    }

    /// The plain rule, sinks included (a sink count past the prompt's end flags nothing).
    #[test]
    fn tensor_flags_are_the_plain_rule_of_the_program() {
        let dev = Device::Cpu;
        let (t, kv) = (17, 3);
        let raw: Vec<f32> = (0..t * kv).map(|i| ((i * 37 % 11) as f32) / 100.0).collect();
        let scores = Tensor::from_vec(raw.clone(), (t, kv), &dev).unwrap();
        for source in [
            FlagSource::Learned { scale: 100.0, offset: 5.0 },
            FlagSource::Random { seed: 4, rate: 0.4 },
            FlagSource::All,
        ] {
            for sinks in [0, 4, 30] {
                let prog = program(source, sinks);
                let got = prompt_flags(&prog, 2, t, kv, Some(&scores), &dev).unwrap().to_vec2::<f32>().unwrap();
                for p in 0..t {
                    for h in 0..kv {
                        let want = p + 1 < t
                            && p >= sinks as usize
                            && source.flags_token(2, h, p as dms_policy::Pos, raw[(p + 1) * kv + h]);
                        assert_eq!(got[p][h] == 1.0, want, "{source:?} sinks {sinks} token {p} head {h}");
                    }
                }
            }
        }
    }

    #[test]
    fn masked_attention_matches_a_per_query_loop() {
        let dev = Device::Cpu;
        let (t, nh, nkv, d, w) = (23, 4, 2, 8, 3);
        let q = Tensor::randn(0f32, 1.0, (t, nh, d), &dev).unwrap();
        let k = Tensor::randn(0f32, 1.0, (t, nkv, d), &dev).unwrap();
        let v = Tensor::randn(0f32, 1.0, (t, nkv, d), &dev).unwrap();
        let flags =
            prompt_flags(&program(FlagSource::Random { seed: 1, rate: 0.6 }, 0), 0, t, nkv, None, &dev).unwrap();
        let got = masked_prompt_attention(&q, &k, &v, &flags, w, 0.3).unwrap().to_vec3::<f32>().unwrap();
        let (qv, kv, vv) = (q.to_vec3::<f32>().unwrap(), k.to_vec3::<f32>().unwrap(), v.to_vec3::<f32>().unwrap());
        let fv = flags.to_vec2::<f32>().unwrap();
        for i in 0..t {
            for hq in 0..nh {
                let h = hq / (nh / nkv);
                let vis: Vec<usize> = (0..=i).filter(|&j| fv[j][h] == 0.0 || i <= j + w).collect();
                let s: Vec<f32> =
                    vis.iter().map(|&j| 0.3 * (0..d).map(|e| qv[i][hq][e] * kv[j][h][e]).sum::<f32>()).collect();
                let m = s.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                let z: f32 = s.iter().map(|x| (x - m).exp()).sum();
                for e in 0..d {
                    let want: f32 = vis.iter().zip(&s).map(|(&j, x)| (x - m).exp() / z * vv[j][h][e]).sum();
                    assert!((got[i][hq][e] - want).abs() < 1e-5, "query {i} head {hq} dim {e}");
                }
            }
        }
    }

    #[test]
    fn learned_flags_shift_by_one_and_leave_the_last_token_open() {
        let dev = Device::Cpu;
        let s = Tensor::new(&[[0.06f32, 0.0], [0.04, 0.07], [0.09, 0.01]], &dev).unwrap();
        let learned = program(FlagSource::Learned { scale: 100.0, offset: 5.0 }, 0);
        let f = prompt_flags(&learned, 0, 3, 2, Some(&s), &dev).unwrap();
        assert_eq!(f.to_vec2::<f32>().unwrap(), vec![vec![0.0, 1.0], vec![1.0, 0.0], vec![0.0, 0.0]]);
        assert!(prompt_flags(&learned, 0, 3, 2, None, &dev).is_err());
    }
}
