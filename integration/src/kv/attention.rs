//! Attention over the rows of the paged store.
//!
//! Keys are stored after RoPE at their absolute positions, so slot order does not matter. A query
//! at position `q` sees slot `s` iff `pos[s] <= q <= last_visible[s]`; this one rule is causal
//! masking, sliding windows and DMS's delayed eviction (sparse prefill) at once.

use candle_core::{Device, Tensor};

use crate::kv::store::{KvStore, RowId, StoreError};
use dms_policy::Pos;

/// Dot product written so that LLVM vectorises it.
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

/// Decode attention of the `g` query heads of one KV group (`q`: `g * head_dim`, head-major) at
/// position `q_pos` over one row, read block by block. Writes `g * dv` floats into `out`, where
/// `dv` is the store's value width, or for latent rows (no separate values) `out.len() / g`
/// floats taken from the front of each key. A query that sees no key gets zeros. An error for a
/// row that is not in the store.
pub fn decode_row(
    store: &KvStore,
    id: RowId,
    q: &[f32],
    q_pos: Pos,
    scale: f32,
    out: &mut [f32],
) -> Result<(), StoreError> {
    decode_row_weighted(store, id, q, q_pos, scale, out, None)
}

/// [`decode_row`], also adding to `weights` (one per physical slot of the row) each slot's
/// softmax weight averaged over the group's query heads, when given (attention-scored policies).
pub fn decode_row_weighted(
    store: &KvStore,
    id: RowId,
    q: &[f32],
    q_pos: Pos,
    scale: f32,
    out: &mut [f32],
    weights: Option<&mut [f32]>,
) -> Result<(), StoreError> {
    let d = store.head_dim();
    let g = q.len() / d;
    let dv = out.len() / g;
    let latent = store.v_dim() == 0;
    let bs = store.block_size();
    let row = store.row(id)?;
    let n = row.len();
    let (pos, last) = (row.positions(), row.last_visible());
    let mut scores = vec![f32::NEG_INFINITY; g * n];
    let (mut kbuf, mut vbuf) = (Vec::new(), Vec::new());
    for (b, &block) in row.blocks().iter().enumerate() {
        let kb = store.block_keys(block, &mut kbuf);
        let used = (n - b * bs).min(bs);
        for j in 0..used {
            let s = b * bs + j;
            if pos[s] > q_pos || last[s] < q_pos {
                continue;
            }
            let key = &kb[j * d..(j + 1) * d];
            for h in 0..g {
                scores[h * n + s] = dot(&q[h * d..(h + 1) * d], key) * scale;
            }
        }
    }
    out.fill(0.0);
    for h in 0..g {
        let sc = &mut scores[h * n..(h + 1) * n];
        let max = sc.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        if max == f32::NEG_INFINITY {
            sc.fill(0.0);
            continue;
        }
        let mut sum = 0.0;
        for x in sc.iter_mut() {
            *x = (*x - max).exp();
            sum += *x;
        }
        for x in sc.iter_mut() {
            *x /= sum;
        }
    }
    if let Some(w) = weights {
        for h in 0..g {
            for (w, p) in w.iter_mut().zip(&scores[h * n..(h + 1) * n]) {
                *w += p / g as f32;
            }
        }
    }
    for (b, &block) in row.blocks().iter().enumerate() {
        let (kb, vb) = if latent {
            (store.block_keys(block, &mut kbuf), &[][..])
        } else {
            (&[][..], store.block_values(block, &mut vbuf))
        };
        let used = (n - b * bs).min(bs);
        for j in 0..used {
            let s = b * bs + j;
            let val = if latent { &kb[j * d..j * d + dv] } else { &vb[j * dv..(j + 1) * dv] };
            for h in 0..g {
                let p = scores[h * n + s];
                if p == 0.0 {
                    continue;
                }
                let o = &mut out[h * dv..(h + 1) * dv];
                for (o, v) in o.iter_mut().zip(val) {
                    *o += p * v;
                }
            }
        }
    }
    Ok(())
}

/// Dense attention for a chunk of `t` queries of one sequence over its rows (one per KV head),
/// with the visibility mask built from the rows' metadata. `q`: `[t, n_heads, head_dim]`.
/// Returns `[t, n_heads * head_dim]`.
pub fn chunk_rows(
    store: &KvStore,
    rows: &[RowId],
    q: &Tensor,
    q_pos: &[Pos],
    scale: f64,
) -> candle_core::Result<Tensor> {
    let d = q.dim(2)?;
    chunk_attention(store, rows, q, q_pos, scale, d, None)
}

/// [`chunk_rows`] (or, with `latent_rank`, [`chunk_latent_rows`]) that also returns, per row, each
/// physical slot's softmax weight averaged over the group's query heads and summed over the
/// chunk's queries (attention-scored policies).
pub fn chunk_rows_weighted(
    store: &KvStore,
    rows: &[RowId],
    q: &Tensor,
    q_pos: &[Pos],
    scale: f64,
    latent_rank: Option<usize>,
) -> candle_core::Result<(Tensor, Vec<Vec<f32>>)> {
    let dv = latent_rank.map_or(q.dim(2), Ok)?;
    let mut weights = Vec::new();
    let out = chunk_attention(store, rows, q, q_pos, scale, dv, Some(&mut weights))?;
    Ok((out, weights))
}

/// [`chunk_rows`] for latent rows: the values are the first `value_dim` floats of each key.
/// Returns `[t, n_heads * value_dim]`.
pub fn chunk_latent_rows(
    store: &KvStore,
    rows: &[RowId],
    q: &Tensor,
    q_pos: &[Pos],
    scale: f64,
    value_dim: usize,
) -> candle_core::Result<Tensor> {
    chunk_attention(store, rows, q, q_pos, scale, value_dim, None)
}

fn chunk_attention(
    store: &KvStore,
    rows: &[RowId],
    q: &Tensor,
    q_pos: &[Pos],
    scale: f64,
    dv: usize,
    weights: Option<&mut Vec<Vec<f32>>>,
) -> candle_core::Result<Tensor> {
    let (t, n_heads, d) = q.dims3()?;
    let kv = rows.len();
    let g = n_heads / kv;
    let latent = store.v_dim() == 0;
    let stored = |e: StoreError| candle_core::Error::Msg(e.to_string());
    let lmax =
        rows.iter().map(|&r| store.row(r).map(|r| r.len())).try_fold(1, |m, l| l.map(|l| m.max(l))).map_err(stored)?;
    let mut k_all = vec![0f32; kv * lmax * d];
    let mut v_all = vec![0f32; kv * lmax * dv];
    let mut mask = vec![f32::NEG_INFINITY; kv * t * lmax];
    let (mut kb, mut vb) = (Vec::new(), Vec::new());
    for (r, &id) in rows.iter().enumerate() {
        store.gather(id, &mut kb, &mut vb).map_err(stored)?;
        k_all[r * lmax * d..r * lmax * d + kb.len()].copy_from_slice(&kb);
        if latent {
            for (s, key) in kb.chunks_exact(d).enumerate() {
                let at = (r * lmax + s) * dv;
                v_all[at..at + dv].copy_from_slice(&key[..dv]);
            }
        } else {
            v_all[r * lmax * dv..r * lmax * dv + vb.len()].copy_from_slice(&vb);
        }
        let row = store.row(id).map_err(stored)?;
        for (i, &qp) in q_pos.iter().enumerate() {
            let m = &mut mask[(r * t + i) * lmax..(r * t + i + 1) * lmax];
            for (s, (&p, &l)) in row.positions().iter().zip(row.last_visible()).enumerate() {
                if p <= qp && qp <= l {
                    m[s] = 0.0;
                }
            }
        }
    }
    let dev = q.device();
    let k = Tensor::from_vec(k_all, (kv, lmax, d), &Device::Cpu)?.to_device(dev)?;
    let v = Tensor::from_vec(v_all, (kv, lmax, dv), &Device::Cpu)?.to_device(dev)?;
    let mask = Tensor::from_vec(mask, (kv, 1, t, lmax), &Device::Cpu)?.to_device(dev)?;
    let q = q.reshape((t, kv, g, d))?.permute((1, 2, 0, 3))?.contiguous()?.reshape((kv, g * t, d))?;
    let scores = (q.matmul(&k.t()?)? * scale)?.reshape((kv, g, t, lmax))?;
    let scores = scores.broadcast_add(&mask)?;
    let probs = candle_nn::ops::softmax_last_dim(&scores)?;
    let probs = zero_fully_masked(&probs)?;
    if let Some(w) = weights {
        // [kv, g, t, lmax] -> mean over g, sum over t -> [kv, lmax]; each row keeps its own length.
        let per_row = (probs.sum(2)?.sum(1)? / g as f64)?.to_device(&Device::Cpu)?.to_vec2::<f32>()?;
        w.clear();
        for (r, &id) in rows.iter().enumerate() {
            let len = store.row(id).map_err(stored)?.len();
            w.push(per_row[r][..len].to_vec());
        }
    }
    let out = probs.reshape((kv, g * t, lmax))?.matmul(&v)?;
    out.reshape((kv, g, t, dv))?.permute((2, 0, 1, 3))?.contiguous()?.reshape((t, n_heads * dv))
}

/// A query row whose every key is masked produces NaN from softmax; make it zeros instead.
fn zero_fully_masked(p: &Tensor) -> candle_core::Result<Tensor> {
    let nan = p.ne(p)?;
    nan.where_cond(&p.zeros_like()?, p)
}
