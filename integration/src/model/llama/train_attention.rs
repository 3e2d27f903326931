//! Causal attention with DMS's soft eviction penalty for the dense training pass
//! (dms-reference.md section 5), fused on the CPU with its own backward.
//!
//! Written by hand because candle's autograd of the composed form (scores, causal mask, penalty,
//! softmax, values) keeps five `[heads, T, T]` tensors per layer for the backward and computes a
//! gradient for every frozen operand (19 GB and about 100 s a step for SmolLM2 at 1K tokens), and
//! no crate offers a CPU attention with this mask and a gradient for the penalty. Here the forward
//! keeps only each query's log-sum-exp and the backward recomputes the probabilities row by row
//! from it (as flash attention does), so no `T x T` tensor is stored. Other devices use the
//! composed form ([`composed`]), which is also the tests' oracle.

use anyhow::{bail, Result};
use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor, D};
use rayon::prelude::*;

use crate::cpu::matmul::matmul;
use crate::kv::vector::dot;

/// Query rows per task: a task computes its rows' scores against every key they see as one
/// matrix product; in the backward it keeps private key/value/penalty gradients for those keys,
/// summed at the end (so no two threads write one key's gradient).
const BLOCK_ROWS: usize = 64;

/// How a layer's queries see its keys: causally, within the model's own window (query `i` sees
/// key `j` iff `i - j < model_window`; `usize::MAX` for none), key `j` getting `penalty[kvh, j]`
/// added to its score for every query `i` with `i - j > window` (DMS's delay), and with GPT-OSS's
/// sinks one more logit per query head in each softmax's sum, with a value of zero. With Gemma 2's
/// soft-cap, each score becomes `cap * tanh(score / cap)` before any of that.
#[derive(Debug, Clone, Copy)]
pub struct Mask<'a> {
    /// DMS's delay W.
    pub window: usize,
    /// The model's own window on this layer.
    pub model_window: usize,
    /// One sink logit per query head (`nkv * g`, KV group by group), where the model has them.
    pub sink_logits: Option<&'a [f32]>,
    /// Gemma 2's `attn_logit_softcapping`.
    pub softcap: Option<f64>,
}

/// Causal attention of `q [nkv, g, T, dq]` over `k [nkv, T, dq]` and `v [nkv, T, dv]` (`g` query
/// heads share a KV head), masked as `mask` says. Returns `[nkv, g, T, dv]`; differentiable in
/// `q`, `k`, `v` and `penalty`.
pub fn masked_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    penalty: &Tensor,
    mask: Mask,
    scale: f64,
) -> Result<Tensor> {
    let (nkv, g, t, dq) = q.dims4()?;
    let (dv, pen_dims) = (v.dim(2)?, penalty.dims());
    if k.dims() != [nkv, t, dq] || v.dims() != [nkv, t, dv] || pen_dims != [nkv, t] {
        bail!(
            "masked attention shapes disagree: q {:?}, k {:?}, v {:?}, penalty {pen_dims:?}",
            q.dims(),
            k.dims(),
            v.dims()
        );
    }
    if mask.model_window == 0 {
        bail!("a model window of 0 tokens hides every key");
    }
    if let Some(c) = mask.softcap.filter(|c| !(c.is_finite() && *c > 0.0)) {
        bail!("masked attention: a soft-cap must be positive, not {c}");
    }
    if let Some(s) = mask.sink_logits.filter(|s| s.len() != nkv * g) {
        bail!("masked attention: {} sink logits for {} query heads", s.len(), nkv * g);
    }
    if !q.device().is_cpu() {
        return composed(q, k, v, penalty, mask, scale);
    }
    let kv = Tensor::cat(&[k, v], D::Minus1)?.contiguous()?;
    let op = MaskedAttention {
        nkv,
        g,
        t,
        dq,
        dv,
        window: mask.window,
        model_window: mask.model_window,
        sink_logits: mask.sink_logits.map(<[f32]>::to_vec),
        softcap: mask.softcap.map(|c| c as f32),
        scale: scale as f32,
    };
    let out = q.contiguous()?.apply_op3(&kv, &penalty.contiguous()?, op)?;
    Ok(out.narrow(3, 0, dv)?)
}

/// The same attention composed of candle ops (dense scores, an additive causal and window mask,
/// the penalty broadcast over the far keys, the sinks as one more column, softmax): any device,
/// `[heads, T, T]` memory.
pub fn composed(q: &Tensor, k: &Tensor, v: &Tensor, penalty: &Tensor, mask: Mask, scale: f64) -> Result<Tensor> {
    let (nkv, g, t, _) = q.dims4()?;
    let mut causal = vec![0f32; t * t];
    let mut far = vec![0f32; t * t];
    for i in 0..t {
        for j in 0..t {
            if j > i || i - j >= mask.model_window {
                causal[i * t + j] = -50000.0;
            } else if i - j > mask.window {
                far[i * t + j] = 1.0;
            }
        }
    }
    let dev = q.device();
    let causal = Tensor::from_vec(causal, (t, t), dev)?;
    let far = Tensor::from_vec(far, (t, t), dev)?;
    let (k, v) = (k.unsqueeze(1)?, v.unsqueeze(1)?);
    let scores = (q.broadcast_matmul(&k.transpose(2, 3)?)? * scale)?;
    let scores = match mask.softcap {
        Some(cap) => ((scores / cap)?.tanh()? * cap)?,
        None => scores,
    };
    let scores = scores.broadcast_add(&causal)?;
    let pen = far.unsqueeze(0)?.broadcast_mul(&penalty.unsqueeze(1)?)?.unsqueeze(1)?;
    let scores = scores.broadcast_add(&pen)?;
    let probs = match mask.sink_logits {
        Some(s) => {
            let sinks = Tensor::from_slice(s, (nkv, g, 1, 1), dev)?.broadcast_as((nkv, g, t, 1))?;
            candle_nn::ops::softmax(&Tensor::cat(&[&scores, &sinks], 3)?, D::Minus1)?.narrow(3, 0, t)?
        }
        None => candle_nn::ops::softmax(&scores, D::Minus1)?,
    };
    Ok(probs.broadcast_matmul(&v)?)
}

/// The fused op over `q`, `kv = [k | v]` and the penalty. Its output is `[nkv, g, T, dv + 1]`:
/// each row's attention output and then its log-sum-exp, which the backward reads back (the
/// public wrapper narrows it away, so no gradient ever reaches that column).
struct MaskedAttention {
    nkv: usize,
    g: usize,
    t: usize,
    dq: usize,
    dv: usize,
    window: usize,
    model_window: usize,
    /// One per query head.
    sink_logits: Option<Vec<f32>>,
    softcap: Option<f32>,
    scale: f32,
}

/// Borrowed operands of one fused call, laid out contiguously.
struct Operands<'a> {
    q: &'a [f32],
    kv: &'a [f32],
    pen: &'a [f32],
}

impl MaskedAttention {
    /// Probabilities of query rows `i0..i1` of query head `head` over keys `0..i1`, into `p`
    /// (`[i1 - i0, i1]`, zero above the diagonal): with `lse = None` the forward's softmax, whose
    /// log-sum-exp per row it returns; with `Some` the backward's recomputation from it. With a
    /// soft-cap and `capped` given, `capped` gets each score's `d capped / d raw = 1 - tanh^2`.
    #[allow(clippy::too_many_arguments)]
    fn probabilities(
        &self,
        ops: &Operands,
        head: usize,
        i0: usize,
        i1: usize,
        lse: Option<&[f32]>,
        p: &mut Vec<f32>,
        capped: Option<&mut Vec<f32>>,
    ) -> Vec<f32> {
        let (t, dq, w) = (self.t, self.dq, self.dq + self.dv);
        let kvh = head / self.g;
        let q = &ops.q[(head * t + i0) * dq..(head * t + i1) * dq];
        let kv = &ops.kv[kvh * t * w..(kvh + 1) * t * w];
        let pen = &ops.pen[kvh * t..(kvh + 1) * t];
        let n = i1;
        p.clear();
        p.resize((i1 - i0) * n, 0.0);
        matmul(i1 - i0, n, dq, p, n, false, (q, dq, 1), (kv, 1, w), self.scale);
        if let Some(cap) = self.softcap {
            let mut slope = capped;
            if let Some(d) = slope.as_deref_mut() {
                d.clear();
                d.resize(p.len(), 0.0);
            }
            for (e, x) in p.iter_mut().enumerate() {
                let t = (*x / cap).tanh();
                *x = cap * t;
                if let Some(d) = slope.as_deref_mut() {
                    d[e] = 1.0 - t * t;
                }
            }
        }
        let mut sums = Vec::with_capacity(i1 - i0);
        for (r, row) in p.chunks_mut(n).enumerate() {
            let i = i0 + r;
            let (seen, future) = row.split_at_mut(i + 1);
            future.iter_mut().for_each(|x| *x = 0.0);
            for (j, x) in seen.iter_mut().enumerate() {
                if i - j >= self.model_window {
                    // Outside the model's window: probability 0 (key `i` is always seen).
                    *x = f32::NEG_INFINITY;
                } else if i - j > self.window {
                    *x += pen[j];
                }
            }
            let z = match lse {
                Some(l) => l[r],
                None => {
                    // A sink takes its share of the sum and gives nothing back.
                    let sink = self.sink_logits.as_ref().map_or(f32::NEG_INFINITY, |s| s[head]);
                    let m = seen.iter().copied().fold(sink, f32::max);
                    m + (seen.iter().map(|x| (x - m).exp()).sum::<f32>() + (sink - m).exp()).ln()
                }
            };
            seen.iter_mut().for_each(|x| *x = (*x - z).exp());
            sums.push(z);
        }
        sums
    }

    fn forward(&self, ops: &Operands) -> Vec<f32> {
        let (t, dq, dv, w, width) = (self.t, self.dq, self.dv, self.dq + self.dv, self.dv + 1);
        let mut out = vec![0f32; self.nkv * self.g * t * width];
        out.par_chunks_mut(t * width).enumerate().for_each(|(head, out_head)| {
            out_head.par_chunks_mut(BLOCK_ROWS * width).enumerate().for_each_init(Vec::new, |p, (c, o)| {
                let (i0, i1) = (c * BLOCK_ROWS, ((c + 1) * BLOCK_ROWS).min(t));
                let lse = self.probabilities(ops, head, i0, i1, None, p, None);
                let kv = &ops.kv[(head / self.g) * t * w..];
                matmul(i1 - i0, dv, i1, o, width, false, (p, i1, 1), (&kv[dq..], w, 1), 1.0);
                for (row, z) in o.chunks_mut(width).zip(lse) {
                    row[dv] = z;
                }
            })
        });
        out
    }

    /// Gradients `(dq, dkv, dpen)` from the forward's output `res` and its gradient `dres`
    /// (both `[rows, dv + 1]`; the log-sum-exp column's gradient is ignored).
    fn backward(&self, ops: &Operands, res: &[f32], dres: &[f32]) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let (t, dq, dv, w, width) = (self.t, self.dq, self.dv, self.dq + self.dv, self.dv + 1);
        let heads = self.nkv * self.g;
        let mut dq_all = vec![0f32; heads * t * dq];
        // One task per (query head, block of rows): its dq rows are its own; the key-side
        // gradients go to private buffers over the keys `0..i1` it sees, summed afterwards.
        let task = |head: usize, c: usize, dq_rows: &mut [f32]| {
            let kvh = head / self.g;
            let (i0, i1) = (c * BLOCK_ROWS, ((c + 1) * BLOCK_ROWS).min(t));
            let (m, n) = (i1 - i0, i1);
            let rows = (head * t + i0) * width..(head * t + i1) * width;
            let (out, dout) = (&res[rows.clone()], &dres[rows]);
            let lse: Vec<f32> = out.chunks(width).map(|r| r[dv]).collect();
            let (mut p, mut slope) = (Vec::new(), Vec::new());
            self.probabilities(ops, head, i0, i1, Some(&lse), &mut p, Some(&mut slope));
            let kv = &ops.kv[kvh * t * w..(kvh + 1) * t * w];
            let q = &ops.q[(head * t + i0) * dq..(head * t + i1) * dq];
            let mut ds = vec![0f32; m * n];
            matmul(m, n, dv, &mut ds, n, false, (dout, width, 1), (&kv[dq..], 1, w), 1.0);
            let mut dpen = vec![0f32; n];
            for (r, (ds_row, p_row)) in ds.chunks_mut(n).zip(p.chunks(n)).enumerate() {
                let i = i0 + r;
                let d = dot(&dout[r * width..r * width + dv], &out[r * width..r * width + dv]);
                for (j, (x, &pj)) in ds_row.iter_mut().zip(p_row).enumerate().take(i + 1) {
                    *x = pj * (*x - d);
                    if i - j > self.window {
                        dpen[j] += *x;
                    }
                }
                ds_row[i + 1..].iter_mut().for_each(|x| *x = 0.0);
            }
            // Through the soft-cap to the raw scores (the penalty is added after it).
            if self.softcap.is_some() {
                ds.iter_mut().zip(&slope).for_each(|(x, s)| *x *= s);
            }
            matmul(m, dq, n, dq_rows, dq, false, (&ds, n, 1), (kv, w, 1), self.scale);
            let mut dkv = vec![0f32; n * w];
            matmul(n, dq, m, &mut dkv, w, false, (&ds, 1, n), (q, dq, 1), self.scale);
            matmul(n, dv, m, &mut dkv[dq..], w, false, (&p, 1, n), (dout, width, 1), 1.0);
            (kvh, dkv, dpen)
        };
        let partials: Vec<(usize, Vec<f32>, Vec<f32>)> = dq_all
            .par_chunks_mut(t * dq)
            .enumerate()
            .flat_map(|(head, dq_head)| {
                dq_head.par_chunks_mut(BLOCK_ROWS * dq).enumerate().map(move |(c, rows)| task(head, c, rows))
            })
            .collect();
        let mut dkv_all = vec![0f32; self.nkv * t * w];
        let mut dpen_all = vec![0f32; self.nkv * t];
        for (kvh, dkv, dpen) in partials {
            for (a, b) in dkv_all[kvh * t * w..].iter_mut().zip(&dkv) {
                *a += b;
            }
            for (a, b) in dpen_all[kvh * t..].iter_mut().zip(&dpen) {
                *a += b;
            }
        }
        (dq_all, dkv_all, dpen_all)
    }
}

/// The f32 contents of a contiguous CPU operand of a custom op (the training ops').
pub(super) fn cpu_slice<'a>(s: &'a CpuStorage, l: &Layout) -> candle_core::Result<&'a [f32]> {
    let all = s.as_slice::<f32>()?;
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&all[a..b]),
        None => Err(candle_core::Error::Msg("the training ops need contiguous f32 operands".into())),
    }
}

/// The f32 contents of a tensor (copied out of its storage).
fn host_vec(t: &Tensor) -> candle_core::Result<Vec<f32>> {
    t.flatten_all()?.to_vec1::<f32>()
}

impl CustomOp3 for MaskedAttention {
    fn name(&self) -> &'static str {
        "dms-masked-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let ops = Operands { q: cpu_slice(s1, l1)?, kv: cpu_slice(s2, l2)?, pen: cpu_slice(s3, l3)? };
        let out = self.forward(&ops);
        Ok((CpuStorage::F32(out), Shape::from((self.nkv, self.g, self.t, self.dv + 1))))
    }

    fn bwd(
        &self,
        q: &Tensor,
        kv: &Tensor,
        pen: &Tensor,
        res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (qh, kvh, penh) = (host_vec(q)?, host_vec(kv)?, host_vec(pen)?);
        let ops = Operands { q: &qh, kv: &kvh, pen: &penh };
        let (dq, dkv, dpen) = self.backward(&ops, &host_vec(res)?, &host_vec(grad_res)?);
        let dev = q.device();
        Ok((
            Some(Tensor::from_vec(dq, q.shape(), dev)?),
            Some(Tensor::from_vec(dkv, kv.shape(), dev)?),
            Some(Tensor::from_vec(dpen, pen.shape(), dev)?),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Shape, Var};
    use rand::{rngs::StdRng, Rng, SeedableRng};

    /// Seeded values uniform in [-w, w] of `shape` (candle's CPU generator cannot be seeded): the
    /// test sees the same inputs on every run.
    fn uniform(rng: &mut StdRng, shape: impl Into<Shape>, w: f32) -> candle_core::Result<Tensor> {
        let shape = shape.into();
        let data: Vec<f32> = (0..shape.elem_count()).map(|_| rng.random_range(-w..w)).collect();
        Tensor::from_vec(data, shape, &Device::Cpu)
    }

    /// Values and all four gradients of the fused op against candle's autograd of the composed
    /// form, for a loss `sum(out * r)` with random `r`.
    fn check(nkv: usize, g: usize, t: usize, dq: usize, dv: usize, mask: Mask) -> Result<()> {
        let rng = &mut StdRng::seed_from_u64((nkv * 1000 + t) as u64);
        let q = Var::from_tensor(&uniform(rng, (nkv, g, t, dq), 1.7)?)?;
        let k = Var::from_tensor(&uniform(rng, (nkv, t, dq), 1.7)?)?;
        let v = Var::from_tensor(&uniform(rng, (nkv, t, dv), 1.7)?)?;
        let pen = Var::from_tensor(&uniform(rng, (nkv, t), 3.0)?.abs()?.neg()?)?;
        let r = uniform(rng, (nkv, g, t, dv), 1.7)?;
        let scale = 1.0 / (dq as f64).sqrt();
        let run = |f: &dyn Fn() -> Result<Tensor>| -> Result<(Vec<f32>, Vec<Vec<f32>>)> {
            let out = f()?;
            let grads = (&out * &r)?.sum_all()?.backward()?;
            let gs = [&q, &k, &v, &pen]
                .iter()
                .map(|p| host_vec(grads.get(p.as_tensor()).expect("gradient")))
                .collect::<candle_core::Result<_>>()?;
            Ok((host_vec(&out)?, gs))
        };
        let (want, want_g) = run(&|| composed(&q, &k, &v, &pen, mask, scale))?;
        let (got, got_g) = run(&|| masked_attention(&q, &k, &v, &pen, mask, scale))?;
        let close = |a: &[f32], b: &[f32], what: &str| {
            assert_eq!(a.len(), b.len());
            for (i, (x, y)) in a.iter().zip(b).enumerate() {
                assert!((x - y).abs() <= 1e-4 * (1.0 + y.abs()), "{what}[{i}]: fused {x} vs composed {y}");
            }
        };
        close(&got, &want, "output");
        for (name, (a, b)) in ["dq", "dk", "dv", "dpenalty"].iter().zip(got_g.iter().zip(&want_g)) {
            close(a, b, name);
        }
        Ok(())
    }

    /// The composed form against a direct softmax over the keys each query may see (and a sink).
    #[test]
    fn the_composed_mask_hides_future_keys_and_keys_outside_the_model_window() -> Result<()> {
        let rng = &mut StdRng::seed_from_u64(7);
        let (t, d) = (12, 4);
        let (q, k, v) =
            (uniform(rng, (1, 1, t, d), 1.5)?, uniform(rng, (1, t, d), 1.5)?, uniform(rng, (1, t, d), 1.5)?);
        let pen = uniform(rng, (1, t), 2.0)?.abs()?.neg()?;
        let (qh, kh, vh, ph) = (host_vec(&q)?, host_vec(&k)?, host_vec(&v)?, host_vec(&pen)?);
        for sink in [None, Some(0.7f32)] {
            let sinks = sink.map(|s| [s]);
            let mask = Mask { window: 2, model_window: 5, sink_logits: sinks.as_ref().map(|s| &s[..]), softcap: None };
            let got = host_vec(&composed(&q, &k, &v, &pen, mask, 0.5)?)?;
            for i in 0..t {
                let seen: Vec<usize> = (0..=i).filter(|&j| i - j < mask.model_window).collect();
                let score = |j: usize| {
                    let s: f32 = (0..d).map(|c| qh[i * d + c] * kh[j * d + c]).sum::<f32>() * 0.5;
                    s + if i - j > mask.window { ph[j] } else { 0.0 }
                };
                // The sink joins the sum with a value of zero.
                let z: f32 = seen.iter().map(|&j| score(j).exp()).sum::<f32>() + sink.map_or(0.0, f32::exp);
                for c in 0..d {
                    let want: f32 = seen.iter().map(|&j| score(j).exp() / z * vh[j * d + c]).sum();
                    let g = got[i * d + c];
                    assert!((g - want).abs() < 1e-5, "sink {sink:?}, query {i}, channel {c}: {g} vs {want}");
                }
            }
        }
        Ok(())
    }

    #[test]
    fn fused_attention_and_its_gradients_equal_the_composed_autograd() -> Result<()> {
        let none = usize::MAX;
        let mask = |window, model_window| Mask { window, model_window, sink_logits: None, softcap: None };
        check(2, 3, 150, 16, 16, mask(5, none))?;
        check(1, 2, 70, 24, 8, mask(0, none))?;
        check(3, 1, 9, 8, 8, mask(100, none))?;
        // A model window shorter than the delay and one longer.
        check(2, 2, 90, 8, 8, mask(10, 7))?;
        check(1, 3, 80, 8, 8, mask(4, 33))?;
        // Sinks (one per query head, some above every score, some far below), with a window.
        let sinks = [2.5, -1.0, 0.3, -30.0, 4.0, 0.0];
        check(2, 3, 60, 8, 8, Mask { window: 3, model_window: 20, sink_logits: Some(&sinks), softcap: None })?;
        // Gemma 2's soft-cap, low enough that the scores reach it, with a model window.
        check(2, 2, 70, 16, 8, Mask { window: 6, model_window: 9, sink_logits: None, softcap: Some(0.8) })
    }
}
