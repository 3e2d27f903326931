//! Attention over the rows of the paged store.
//!
//! Keys are stored after RoPE at their absolute positions, so slot order does not matter. A query
//! at position `q` sees slot `s` iff `pos[s] <= q <= last_visible[s]`; this one rule is causal
//! masking, sliding windows and DMS's delayed eviction (sparse prefill) at once.

use candle_core::{Device, Tensor};

use crate::kv::store::{KvStore, RowId, StoreError};
use crate::kv::vector;
use dms_policy::Pos;

/// Slots a decode task reads at most: a row is attended in chunks of whole blocks of about this
/// many slots, each with its own softmax statistics, merged in chunk order afterwards (so the
/// result does not depend on how many threads ran the chunks).
const CHUNK_SLOTS: usize = 128;

/// How a query-key dot product becomes an attention score: times `scale`, then with a `softcap`
/// `cap * tanh(score / cap)` (Gemma 2's attention soft-capping), before the softmax; and with
/// `sink_logits`, one more logit per query head in the softmax's sum (GPT-OSS's attention sinks: a key
/// every query sees whose value is zero, so the weights of the real keys sum to less than one).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Scoring<'a> {
    /// Softmax scale.
    pub scale: f64,
    /// Soft-capping of the scaled scores, when the model has one.
    pub softcap: Option<f64>,
    /// The sink logit of each query head of the call's queries (all the heads a call attends
    /// with, in order), when the model has them.
    pub sink_logits: Option<&'a [f32]>,
}

impl Scoring<'_> {
    /// Scores scaled by `scale`, not capped, without sinks.
    pub fn scaled(scale: f64) -> Self {
        Self { scale, softcap: None, sink_logits: None }
    }

    /// The score of dot product `dot`.
    fn score(self, dot: f32) -> f32 {
        let s = dot * self.scale as f32;
        match self.softcap {
            Some(cap) => cap as f32 * (s / cap as f32).tanh(),
            None => s,
        }
    }
}

/// Multiply-adds (slots x query heads x head width) below which one step's decode attention
/// runs on the calling thread: a rayon hand-off costs more than that much arithmetic.
const PARALLEL_MIN_WORK: usize = 1 << 17;

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
    scoring: Scoring,
    out: &mut [f32],
) -> Result<(), StoreError> {
    decode_row_weighted(store, id, q, q_pos, scoring, out, None)
}

/// [`decode_row`], also adding to `weights` (one per physical slot of the row) each slot's
/// softmax weight averaged over the group's query heads, when given (attention-scored policies).
pub fn decode_row_weighted(
    store: &KvStore,
    id: RowId,
    q: &[f32],
    q_pos: Pos,
    scoring: Scoring,
    out: &mut [f32],
    weights: Option<&mut [f32]>,
) -> Result<(), StoreError> {
    let mut w: Vec<&mut [f32]> = weights.into_iter().collect();
    decode_rows(store, &[id], q, q_pos, scoring, out, (!w.is_empty()).then_some(w.as_mut_slice()))
}

/// [`decode_row_weighted`] for the KV groups of one sequence at once: row `r` of `rows` attends
/// with the `r`-th group of `q` into the `r`-th group of `out` (and `weights[r]`). The rows'
/// chunks run in parallel when there is enough work.
pub fn decode_rows(
    store: &KvStore,
    rows: &[RowId],
    q: &[f32],
    q_pos: Pos,
    scoring: Scoring,
    out: &mut [f32],
    weights: Option<&mut [&mut [f32]]>,
) -> Result<(), StoreError> {
    let d = store.head_dim();
    let g = q.len() / d / rows.len().max(1);
    let dv = out.len() / (g * rows.len()).max(1);
    if let Some(s) = scoring.sink_logits {
        if s.len() != g * rows.len() {
            return Err(StoreError::Unsupported(format!(
                "decode attention: {} sink logits for {} query heads",
                s.len(),
                g * rows.len()
            )));
        }
    }
    let chunk_blocks = CHUNK_SLOTS.div_ceil(store.block_size()).max(1);
    let keep_exps = weights.is_some();
    let mut tasks = Vec::new();
    let mut work = 0;
    for (r, &id) in rows.iter().enumerate() {
        let row = store.row(id)?;
        work += row.len() * g * d;
        for b0 in (0..row.blocks().len()).step_by(chunk_blocks) {
            tasks.push((r, b0..(b0 + chunk_blocks).min(row.blocks().len())));
        }
    }
    let run = |(r, blocks): &(usize, std::ops::Range<usize>)| -> Result<Partial, StoreError> {
        let row = store.row(rows[*r])?;
        let qr = &q[r * g * d..(r + 1) * g * d];
        Ok(chunk_partial(store, row, blocks.clone(), qr, q_pos, scoring, dv, keep_exps))
    };
    let partials: Vec<Partial> = if work >= PARALLEL_MIN_WORK {
        use rayon::prelude::*;
        tasks.par_iter().map(run).collect::<Result<_, _>>()?
    } else {
        tasks.iter().map(run).collect::<Result<_, _>>()?
    };
    let mut weights = weights;
    let mut at = 0;
    for (r, o) in out.chunks_exact_mut(g * dv).enumerate().take(rows.len()) {
        let n_chunks = tasks[at..].iter().take_while(|(tr, _)| *tr == r).count();
        let parts = &partials[at..at + n_chunks];
        at += n_chunks;
        let w = weights.as_mut().map(|w| &mut *w[r]);
        let sinks = scoring.sink_logits.map(|s| &s[r * g..(r + 1) * g]);
        merge(parts, g, dv, store.block_size() * chunk_blocks, sinks, o, w);
    }
    Ok(())
}

/// Softmax statistics and unnormalised output of one chunk of a row, per query head.
struct Partial {
    /// Largest score per head (`-inf` when the head sees no slot of the chunk).
    max: Vec<f32>,
    /// Sum of `exp(score - max)` per head.
    sum: Vec<f32>,
    /// `sum_s exp(score_s - max) v_s` per head (`g * dv`).
    out: Vec<f32>,
    /// `exp(score - max)` per head and slot (`g * slots`), kept for attention weights.
    exps: Vec<f32>,
}

/// Attends the group `q` (`g` heads) over the blocks `blocks` of `row`.
#[allow(clippy::too_many_arguments)]
fn chunk_partial(
    store: &KvStore,
    row: &crate::kv::store::Row,
    blocks: std::ops::Range<usize>,
    q: &[f32],
    q_pos: Pos,
    scoring: Scoring,
    dv: usize,
    keep_exps: bool,
) -> Partial {
    let (d, bs) = (store.head_dim(), store.block_size());
    let g = q.len() / d;
    let latent = store.v_dim() == 0;
    let n = row.len();
    let first = blocks.start * bs;
    let len = (blocks.end * bs).min(n) - first;
    let (pos, last) = (&row.positions()[first..first + len], &row.last_visible()[first..first + len]);
    let mut exps = vec![f32::NEG_INFINITY; g * len];
    let (mut kbuf, mut vbuf) = (Vec::new(), Vec::new());
    for (bi, &block) in row.blocks()[blocks.clone()].iter().enumerate() {
        let kb = store.block_keys(block, &mut kbuf);
        for j in 0..(len - bi * bs).min(bs) {
            let s = bi * bs + j;
            if pos[s] > q_pos || last[s] < q_pos {
                continue;
            }
            let key = &kb[j * d..(j + 1) * d];
            for (h, qh) in q.chunks_exact(d).enumerate() {
                exps[h * len + s] = scoring.score(vector::dot(qh, key));
            }
        }
    }
    let mut max = vec![f32::NEG_INFINITY; g];
    let mut sum = vec![0f32; g];
    for h in 0..g {
        let e = &mut exps[h * len..(h + 1) * len];
        max[h] = e.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        if max[h] == f32::NEG_INFINITY {
            e.fill(0.0);
            continue;
        }
        for x in e.iter_mut() {
            *x = (*x - max[h]).exp();
            sum[h] += *x;
        }
    }
    let mut out = vec![0f32; g * dv];
    for (bi, &block) in row.blocks()[blocks].iter().enumerate() {
        let (kb, vb) = if latent {
            (store.block_keys(block, &mut kbuf), &[][..])
        } else {
            (&[][..], store.block_values(block, &mut vbuf))
        };
        let used = (len - bi * bs).min(bs);
        let (vals, stride) = if latent { (kb, d) } else { (vb, dv) };
        for (h, o) in out.chunks_exact_mut(dv).enumerate() {
            vector::accumulate(o, &exps[h * len + bi * bs..h * len + bi * bs + used], vals, stride);
        }
    }
    if !keep_exps {
        exps = Vec::new();
    }
    Partial { max, sum, out, exps }
}

/// Combines a row's chunks (`chunk_len` slots each, the last one shorter) into the normalised
/// output `out` (`g * dv`), the heads' `sinks` counted in each softmax's sum, and, when given,
/// adds each slot's head-averaged weight to `weights`.
#[allow(clippy::too_many_arguments)]
fn merge(
    parts: &[Partial],
    g: usize,
    dv: usize,
    chunk_len: usize,
    sinks: Option<&[f32]>,
    out: &mut [f32],
    mut weights: Option<&mut [f32]>,
) {
    out.fill(0.0);
    for h in 0..g {
        let keys_max = parts.iter().map(|p| p.max[h]).fold(f32::NEG_INFINITY, f32::max);
        if keys_max == f32::NEG_INFINITY {
            continue;
        }
        let sink = sinks.map(|s| s[h]);
        let m = sink.map_or(keys_max, |s| keys_max.max(s));
        let scales: Vec<f32> =
            parts.iter().map(|p| if p.max[h] == f32::NEG_INFINITY { 0.0 } else { (p.max[h] - m).exp() }).collect();
        let total: f32 =
            parts.iter().zip(&scales).map(|(p, c)| c * p.sum[h]).sum::<f32>() + sink.map_or(0.0, |s| (s - m).exp());
        let o = &mut out[h * dv..(h + 1) * dv];
        for (p, c) in parts.iter().zip(&scales) {
            for (o, v) in o.iter_mut().zip(&p.out[h * dv..(h + 1) * dv]) {
                *o += c * v;
            }
        }
        for o in o.iter_mut() {
            *o /= total;
        }
        if let Some(w) = weights.as_deref_mut() {
            for (c, (p, c_scale)) in parts.iter().zip(&scales).enumerate() {
                let len = p.exps.len() / g;
                let f = c_scale / total / g as f32;
                for (w, e) in w[c * chunk_len..c * chunk_len + len].iter_mut().zip(&p.exps[h * len..(h + 1) * len]) {
                    *w += e * f;
                }
            }
        }
    }
}

/// Dense attention for a chunk of `t` queries of one sequence over its rows (one per KV head),
/// with the visibility mask built from the rows' metadata. `q`: `[t, n_heads, head_dim]`.
/// Returns `[t, n_heads * head_dim]`.
pub fn chunk_rows(
    store: &KvStore,
    rows: &[RowId],
    q: &Tensor,
    q_pos: &[Pos],
    scoring: Scoring,
) -> candle_core::Result<Tensor> {
    let d = q.dim(2)?;
    match tiled(store, rows, q, q_pos, scoring, d, false)? {
        Some((out, _)) => Ok(out),
        None => chunk_attention(store, rows, q, q_pos, scoring, d, None),
    }
}

/// [`chunk_rows`] (or, with `latent_rank`, [`chunk_latent_rows`]) that also returns, per row, each
/// physical slot's softmax weight averaged over the group's query heads and summed over the
/// chunk's queries (attention-scored policies).
pub fn chunk_rows_weighted(
    store: &KvStore,
    rows: &[RowId],
    q: &Tensor,
    q_pos: &[Pos],
    scoring: Scoring,
    latent_rank: Option<usize>,
) -> candle_core::Result<(Tensor, Vec<Vec<f32>>)> {
    let dv = latent_rank.map_or(q.dim(2), Ok)?;
    if let Some((out, Some(w))) = tiled(store, rows, q, q_pos, scoring, dv, true)? {
        return Ok((out, w));
    }
    let mut weights = Vec::new();
    let out = chunk_attention(store, rows, q, q_pos, scoring, dv, Some(&mut weights))?;
    Ok((out, weights))
}

/// [`chunk_rows`] for latent rows: the values are the first `value_dim` floats of each key.
/// Returns `[t, n_heads * value_dim]`.
pub fn chunk_latent_rows(
    store: &KvStore,
    rows: &[RowId],
    q: &Tensor,
    q_pos: &[Pos],
    scoring: Scoring,
    value_dim: usize,
) -> candle_core::Result<Tensor> {
    match tiled(store, rows, q, q_pos, scoring, value_dim, false)? {
        Some((out, _)) => Ok(out),
        None => chunk_attention(store, rows, q, q_pos, scoring, value_dim, None),
    }
}

/// A chunk's attention by tiles of queries ([`crate::kv::tiled`]) for f32 queries on the CPU
/// (`None` otherwise), with the per-row slot weights when `weights`. No dense mask or score
/// matrix over the whole row is built.
#[allow(clippy::type_complexity)]
fn tiled(
    store: &KvStore,
    rows: &[RowId],
    q: &Tensor,
    q_pos: &[Pos],
    scoring: Scoring,
    dv: usize,
    weights: bool,
) -> candle_core::Result<Option<(Tensor, Option<Vec<Vec<f32>>>)>> {
    if !q.device().is_cpu() || q.dtype() != candle_core::DType::F32 {
        return Ok(None);
    }
    let (t, n_heads, d) = q.dims3()?;
    let kv = rows.len();
    if kv == 0 || n_heads % kv != 0 || d != store.head_dim() || q_pos.len() != t {
        candle_core::bail!(
            "chunk attention: {t} queries of {n_heads} heads x {d} over {kv} rows of width {}",
            store.head_dim()
        );
    }
    check_sinks(scoring, n_heads)?;
    let stored = |e: StoreError| candle_core::Error::Msg(e.to_string());
    let row_refs = rows.iter().map(|&r| store.row(r)).collect::<Result<Vec<_>, _>>().map_err(stored)?;
    let qv = (q * scoring.scale)?.flatten_all()?.to_vec1::<f32>()?;
    let mut out = vec![0f32; t * n_heads * dv];
    let softcap = scoring.softcap.map(|c| c as f32);
    let queries =
        crate::kv::tiled::Queries { q: &qv, q_pos, heads: n_heads, softcap, sink_logits: scoring.sink_logits };
    let w = crate::kv::tiled::prompt_attention(store, &row_refs, &queries, dv, &mut out, weights);
    Ok(Some((Tensor::from_vec(out, (t, n_heads * dv), &Device::Cpu)?, w)))
}

fn chunk_attention(
    store: &KvStore,
    rows: &[RowId],
    q: &Tensor,
    q_pos: &[Pos],
    scoring: Scoring,
    dv: usize,
    weights: Option<&mut Vec<Vec<f32>>>,
) -> candle_core::Result<Tensor> {
    let (t, n_heads, d) = q.dims3()?;
    check_sinks(scoring, n_heads)?;
    let kv = rows.len();
    let g = n_heads / kv;
    let latent = store.v_dim() == 0;
    let stored = |e: StoreError| candle_core::Error::Msg(e.to_string());
    let lmax =
        rows.iter().map(|&r| store.row(r).map(|r| r.len())).try_fold(1, |m, l| l.map(|l| m.max(l))).map_err(stored)?;
    let mut k_all = vec![0f32; kv * lmax * d];
    let mut v_all = vec![0f32; kv * lmax * dv];
    let mut mask = vec![f32::NEG_INFINITY; kv * t * lmax];
    // Whether some query sees no key at all (its softmax row is NaN and must become zeros).
    let mut blind = false;
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
            let mut sees = false;
            for (s, (&p, &l)) in row.positions().iter().zip(row.last_visible()).enumerate() {
                if p <= qp && qp <= l {
                    m[s] = 0.0;
                    sees = true;
                }
            }
            blind |= !sees;
        }
    }
    let dev = q.device();
    let k = Tensor::from_vec(k_all, (kv, lmax, d), &Device::Cpu)?.to_device(dev)?;
    let v = Tensor::from_vec(v_all, (kv, lmax, dv), &Device::Cpu)?.to_device(dev)?;
    let mask = Tensor::from_vec(mask, (kv, 1, t, lmax), &Device::Cpu)?.to_device(dev)?;
    let q = q.reshape((t, kv, g, d))?.permute((1, 2, 0, 3))?.contiguous()?.reshape((kv, g * t, d))?;
    // Scaling the queries instead of the scores: `g t d` multiplies instead of `g t L`.
    let scores = (q * scoring.scale)?.matmul(&k.t()?)?.reshape((kv, g, t, lmax))?;
    let scores = match scoring.softcap {
        Some(cap) => ((scores / cap)?.tanh()? * cap)?,
        None => scores,
    };
    let scores = scores.broadcast_add(&mask)?;
    let probs = match scoring.sink_logits {
        // The sink is one more column of every query's scores, dropped after the softmax.
        Some(s) => {
            let sink = Tensor::new(s, &Device::Cpu)?.to_device(dev)?.reshape((kv, g, 1, 1))?;
            let with_sink = Tensor::cat(&[scores, sink.broadcast_as((kv, g, t, 1))?.contiguous()?], 3)?;
            candle_nn::ops::softmax_last_dim(&with_sink)?.narrow(3, 0, lmax)?
        }
        None => candle_nn::ops::softmax_last_dim(&scores)?,
    };
    let probs = if blind { zero_fully_masked(&probs)? } else { probs };
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

/// An error unless `scoring` has no sinks or one per query head of `n_heads`.
fn check_sinks(scoring: Scoring, n_heads: usize) -> candle_core::Result<()> {
    match scoring.sink_logits {
        Some(s) if s.len() != n_heads => {
            candle_core::bail!("chunk attention: {} sink logits for {n_heads} query heads", s.len())
        }
        _ => Ok(()),
    }
}

/// A query row whose every key is masked produces NaN from softmax; make it zeros instead.
fn zero_fully_masked(p: &Tensor) -> candle_core::Result<Tensor> {
    let nan = p.ne(p)?;
    nan.where_cond(&p.zeros_like()?, p)
}

#[cfg(test)]
mod tests {
    use super::*;
    use dms_policy::{EvictPlan, Write, VISIBLE_FOREVER};

    fn seeded(seed: u64, n: usize) -> Vec<f32> {
        (0..n).map(|i| ((i as f64 * 0.6180339 + seed as f64 * 0.31).sin() * 1.3) as f32).collect()
    }

    /// A store holding rows, and each row's keys and values as written.
    struct Rows {
        store: KvStore,
        ids: Vec<RowId>,
        keys: Vec<Vec<f32>>,
        values: Vec<Vec<f32>>,
    }

    /// Rows of `n` slots at positions `0..n` over several chunks; slots `hidden` are visible only
    /// to queries before `n - 1` (a whole chunk of them, then a few scattered ones).
    fn store_with_rows(d: usize, n: usize, rows: usize, hidden: &dyn Fn(usize) -> bool) -> Rows {
        let mut store = KvStore::with_value_dim(d, d, 16, rows * n.div_ceil(16));
        let (mut ids, mut ks, mut vs) = (Vec::new(), Vec::new(), Vec::new());
        for r in 0..rows {
            let id = store.add_row(0);
            let (k, v) = (seeded(10 + r as u64, n * d), seeded(20 + r as u64, n * d));
            let writes = (0..n)
                .map(|i| Write { slot: i as u32, last_visible: if hidden(i) { n as Pos - 2 } else { VISIBLE_FOREVER } })
                .collect();
            store.apply_evict(id, &EvictPlan { hide: Vec::new(), writes }, 0, &k, &v).unwrap();
            ids.push(id);
            ks.push(k);
            vs.push(v);
        }
        Rows { store, ids, keys: ks, values: vs }
    }

    /// Softmax attention of one head in f64 over the visible slots, its `sink` logit (when
    /// given) one more term of the softmax's sum: (output, weights).
    fn reference(
        q: &[f32],
        k: &[f32],
        v: &[f32],
        d: usize,
        visible: &[bool],
        scoring: Scoring,
        sink: Option<f32>,
    ) -> (Vec<f64>, Vec<f64>) {
        let s: Vec<f64> = (0..visible.len())
            .map(|j| {
                if visible[j] {
                    let s = scoring.scale * (0..d).map(|e| q[e] as f64 * k[j * d + e] as f64).sum::<f64>();
                    scoring.softcap.map_or(s, |c| c * (s / c).tanh())
                } else {
                    f64::NEG_INFINITY
                }
            })
            .collect();
        let sink = sink.map(f64::from);
        let m = s.iter().copied().chain(sink).fold(f64::NEG_INFINITY, f64::max);
        let z: f64 = s.iter().chain(sink.as_ref()).map(|x| (x - m).exp()).sum();
        let p: Vec<f64> = s.iter().map(|x| (x - m).exp() / z).collect();
        let out = (0..d).map(|e| (0..visible.len()).map(|j| p[j] * v[j * d + e] as f64).sum()).collect();
        (out, p)
    }

    /// With and without Gemma 2's soft-capping (a cap of 0.5 bends most of these scores), and
    /// with and without sinks (`sinks`: one per query head; some above every score, some below).
    fn scorings(sinks: &[f32]) -> [Scoring<'_>; 4] {
        let plain = Scoring { scale: 0.2, softcap: None, sink_logits: None };
        let capped = Scoring { softcap: Some(0.5), ..plain };
        [plain, capped, Scoring { sink_logits: Some(sinks), ..plain }, Scoring { sink_logits: Some(sinks), ..capped }]
    }

    /// Sink logits for `heads` query heads: above, among and below the test scores.
    fn sink_logits(heads: usize) -> Vec<f32> {
        (0..heads).map(|h| [3.0, 0.1, -2.0, 0.6][h % 4]).collect()
    }

    #[test]
    fn chunked_decode_equals_one_softmax_over_the_row_serial_and_parallel() {
        let hidden = |i: usize| (128..256).contains(&i) || i % 37 == 5;
        // (head dim, slots, query heads per row, rows): one row runs on this thread, two rows of
        // the wider shape cross the parallel threshold.
        let shapes = [(12, 300, 1, 1), (12, 300, 3, 1), (64, 300, 5, 1), (64, 300, 5, 2), (64, 100, 4, 1)];
        for (d, n, g, rows) in shapes {
            let sinks = sink_logits(rows * g);
            for scoring in scorings(&sinks) {
                let Rows { store, ids, keys: ks, values: vs } = store_with_rows(d, n, rows, &hidden);
                let q = seeded(3, rows * g * d);
                let visible: Vec<bool> = (0..n).map(|i| !hidden(i)).collect();
                let mut out = vec![0f32; rows * g * d];
                let mut w: Vec<Vec<f32>> = vec![vec![0f32; n]; rows];
                let mut wr: Vec<&mut [f32]> = w.iter_mut().map(|w| w.as_mut_slice()).collect();
                decode_rows(&store, &ids, &q, n as Pos - 1, scoring, &mut out, Some(wr.as_mut_slice())).unwrap();
                for r in 0..rows {
                    let mut want_w = vec![0f64; n];
                    for h in 0..g {
                        let qh = &q[(r * g + h) * d..(r * g + h + 1) * d];
                        let sink = scoring.sink_logits.map(|s| s[r * g + h]);
                        let (o, p) = reference(qh, &ks[r], &vs[r], d, &visible, scoring, sink);
                        let got = &out[(r * g + h) * d..(r * g + h + 1) * d];
                        for (a, b) in got.iter().zip(&o) {
                            assert!((*a as f64 - b).abs() < 1e-5, "d {d} g {g} row {r} head {h}: {a} vs {b}");
                        }
                        for (acc, p) in want_w.iter_mut().zip(p) {
                            *acc += p / g as f64;
                        }
                    }
                    for (s, (a, b)) in w[r].iter().zip(&want_w).enumerate() {
                        assert!((*a as f64 - b).abs() < 1e-6, "d {d} g {g} row {r} slot {s}: weight {a} vs {b}");
                    }
                }
            }
        }
    }

    #[test]
    fn a_chunk_query_by_query_equals_the_dense_masked_softmax() {
        // Three rows of 300 slots with a hidden run, 7 queries at positions near the end (some
        // see the hidden slots, some do not), 2 query heads per row.
        let (d, n, kv, g, t) = (16, 300, 3, 2, 7);
        let Rows { store, ids, .. } = store_with_rows(d, n, kv, &|i| (100..180).contains(&i));
        let q_pos: Vec<Pos> = (n as Pos - 4..n as Pos + 3).collect();
        let q = Tensor::from_vec(seeded(5, t * kv * g * d), (t, kv * g, d), &Device::Cpu).unwrap();
        let sinks = sink_logits(kv * g);
        for scoring in scorings(&sinks) {
            let fast = chunk_rows(&store, &ids, &q, &q_pos, scoring).unwrap().to_vec2::<f32>().unwrap();
            let dense = chunk_attention(&store, &ids, &q, &q_pos, scoring, d, None).unwrap().to_vec2::<f32>().unwrap();
            for (i, (a, b)) in fast.iter().zip(&dense).enumerate() {
                for (x, y) in a.iter().zip(b) {
                    assert!((x - y).abs() < 1e-5, "{scoring:?} query {i}: {x} vs {y}");
                }
            }
        }
        // Latent rows: no separate values, the first 8 floats of each key are its value.
        let mut lat = KvStore::with_value_dim(d, 0, 16, n.div_ceil(16) + 1);
        let id = lat.add_row(0);
        let writes = (0..n).map(|i| Write { slot: i as u32, last_visible: VISIBLE_FOREVER }).collect();
        lat.apply_evict(id, &EvictPlan { hide: Vec::new(), writes }, 0, &seeded(9, n * d), &[]).unwrap();
        let q = Tensor::from_vec(seeded(6, t * g * d), (t, g, d), &Device::Cpu).unwrap();
        let s = Scoring::scaled(0.3);
        let latent = chunk_latent_rows(&lat, &[id], &q, &q_pos, s, 8).unwrap().to_vec2::<f32>().unwrap();
        let latent_dense = chunk_attention(&lat, &[id], &q, &q_pos, s, 8, None).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(latent[0].len(), g * 8);
        for (a, b) in latent.iter().zip(&latent_dense) {
            for (x, y) in a.iter().zip(b) {
                assert!((x - y).abs() < 1e-5, "latent: {x} vs {y}");
            }
        }
    }

    #[test]
    fn prompt_tiles_equal_the_dense_masked_softmax_with_weights() {
        // 70 queries at scattered positions (three tiles of one group, across every chunk of 300
        // slots, some before the hidden run ends); then a store whose every slot is hidden from
        // the last query, which sees nothing.
        let (d, n, kv, g, t) = (16, 300, 2, 2, 70);
        let Rows { store, ids, .. } = store_with_rows(d, n, kv, &|i| (100..180).contains(&i) || i % 41 == 3);
        let q_pos: Vec<Pos> = (0..t as Pos).map(|i| (i * 13) % 320).collect();
        let q = Tensor::from_vec(seeded(7, t * kv * g * d), (t, kv * g, d), &Device::Cpu).unwrap();
        let close = |a: &Tensor, b: &Tensor, what: &str| {
            for (i, (x, y)) in a.to_vec2::<f32>().unwrap().iter().zip(b.to_vec2::<f32>().unwrap()).enumerate() {
                for (x, y) in x.iter().zip(&y) {
                    assert!((x - y).abs() < 1e-5, "{what} query {i}: {x} vs {y}");
                }
            }
        };
        let sinks = sink_logits(kv * g);
        for scoring in scorings(&sinks) {
            let (fast, fast_w) = chunk_rows_weighted(&store, &ids, &q, &q_pos, scoring, None).unwrap();
            let mut dense_w = Vec::new();
            let dense = chunk_attention(&store, &ids, &q, &q_pos, scoring, d, Some(&mut dense_w)).unwrap();
            close(&fast, &dense, "tiled");
            close(&chunk_rows(&store, &ids, &q, &q_pos, scoring).unwrap(), &dense, "unweighted");
            for (r, (a, b)) in fast_w.iter().zip(&dense_w).enumerate() {
                assert_eq!(a.len(), b.len());
                for (s, (x, y)) in a.iter().zip(b).enumerate() {
                    assert!((x - y).abs() < 1e-4, "{scoring:?} row {r} slot {s}: weight {x} vs {y}");
                }
            }
        }
        let Rows { store, ids, .. } = store_with_rows(8, 200, 1, &|_| true);
        let q = Tensor::from_vec(seeded(4, 2 * 8), (2, 1, 8), &Device::Cpu).unwrap();
        for half in [Scoring::scaled(0.5), Scoring { sink_logits: Some(&[0.7]), ..Scoring::scaled(0.5) }] {
            let (out, w) = chunk_rows_weighted(&store, &ids, &q, &[10, 199], half, None).unwrap();
            let mut dense_w = Vec::new();
            let dense = chunk_attention(&store, &ids, &q, &[10, 199], half, 8, Some(&mut dense_w)).unwrap();
            close(&out, &dense, "blind");
            assert!(out.to_vec2::<f32>().unwrap()[1].iter().all(|x| *x == 0.0));
            for (x, y) in w[0].iter().zip(&dense_w[0]) {
                assert!((x - y).abs() < 1e-5, "blind weights: {x} vs {y}");
            }
            assert!(w[0][11..].iter().all(|x| *x == 0.0));
        }
    }

    #[test]
    fn a_sink_takes_its_share_of_the_softmax_and_a_wrong_count_is_refused() {
        // One visible key of value v: its weight is e^s / (e^s + e^sink), the output that times v.
        let Rows { store, ids, values, .. } = store_with_rows(8, 1, 1, &|_| false);
        let q = seeded(4, 8);
        let score = 0.5 * q.iter().zip(&store_with_rows(8, 1, 1, &|_| false).keys[0]).map(|(a, b)| a * b).sum::<f32>();
        let sink = [score + 1.0];
        let mut out = vec![0f32; 8];
        let mut w = vec![0f32; 1];
        let scoring = Scoring { sink_logits: Some(&sink), ..Scoring::scaled(0.5) };
        decode_row_weighted(&store, ids[0], &q, 0, scoring, &mut out, Some(&mut w)).unwrap();
        let share = 1.0 / (1.0 + 1f32.exp());
        assert!((w[0] - share).abs() < 1e-6, "{} vs {share}", w[0]);
        for (o, v) in out.iter().zip(&values[0]) {
            assert!((o - share * v).abs() < 1e-6);
        }
        let two = Scoring { sink_logits: Some(&[0.0, 0.0]), ..Scoring::scaled(0.5) };
        let e = decode_row(&store, ids[0], &q, 0, two, &mut out).unwrap_err().to_string();
        assert!(e.contains("2 sink logits for 1 query heads"), "{e}");
        let qt = Tensor::from_vec(q.clone(), (1, 1, 8), &Device::Cpu).unwrap();
        let e = chunk_rows(&store, &ids, &qt, &[0], two).unwrap_err().to_string();
        assert!(e.contains("2 sink logits for 1 query heads"), "{e}");
    }

    #[test]
    fn a_query_that_sees_nothing_gets_zeros_and_no_weight() {
        let Rows { store, ids, .. } = store_with_rows(8, 200, 1, &|_| true);
        let q = seeded(4, 2 * 8);
        let mut out = vec![1f32; 2 * 8];
        let mut w = vec![0f32; 200];
        decode_row_weighted(&store, ids[0], &q, 199, Scoring::scaled(0.5), &mut out, Some(&mut w)).unwrap();
        assert!(out.iter().chain(&w).all(|x| *x == 0.0));
    }
}
