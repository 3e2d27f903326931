//! Prompt attention on the CPU by tiles of queries.
//!
//! The queries of one KV group at consecutive prompt positions attend together, chunk by chunk of
//! a row's slots: each chunk's keys and values are read once per tile, both products (scores and
//! weighted values) are small matrix products ([`crate::cpu::matmul`]), and an online softmax
//! carries each query's maximum and sum across chunks. One decode pass per query (the path this
//! replaces) re-read every key for every query and spent about 60% of a 2K-token prompt pass on
//! it. A query at position `q` sees slot `s` iff `pos[s] <= q <= last_visible[s]`, as everywhere
//! in [`crate::kv::attention`].

use rayon::prelude::*;

use crate::cpu::matmul::matmul;
use crate::kv::store::{KvStore, Row};
use dms_policy::Pos;

/// Query vectors (positions x query heads of the group) in one tile, at most.
const TILE_VECTORS: usize = 64;

/// Slots of a row per chunk, at least (whole blocks).
const CHUNK_SLOTS: usize = 128;

/// The queries of a prompt chunk, head-major per position: `q[(i * heads + h) * head_dim ..]` is
/// query head `h` at position `q_pos[i]`, already multiplied by the softmax scale.
pub struct Queries<'a> {
    /// The query vectors.
    pub q: &'a [f32],
    /// Position of each query.
    pub q_pos: &'a [Pos],
    /// Query heads per position.
    pub heads: usize,
    /// Scores become `cap * tanh(score / cap)` before the softmax, when given.
    pub softcap: Option<f32>,
    /// One more logit per query head (`heads` of them) in each softmax's sum, with a value of
    /// zero (attention sinks), when given.
    pub sink_logits: Option<&'a [f32]>,
}

/// Attention of every query over `rows` (row `r` serves query heads `r * g .. (r + 1) * g`, with
/// `g = heads / rows.len()`), into `out` (`[positions, heads * dv]`). Values are the store's, or
/// for latent rows (no separate values) the first `dv` floats of each key. A query that sees no
/// slot gets zeros. With `weights`, also returns per row each slot's softmax weight averaged over
/// the group's heads and summed over the queries (attention-scored policies).
pub fn prompt_attention(
    store: &KvStore,
    rows: &[&Row],
    queries: &Queries,
    dv: usize,
    out: &mut [f32],
    weights: bool,
) -> Option<Vec<Vec<f32>>> {
    let (t, heads) = (queries.q_pos.len(), queries.heads);
    let g = heads / rows.len().max(1);
    let per_tile = (TILE_VECTORS / g).max(1);
    let tasks: Vec<(usize, usize)> =
        (0..rows.len()).flat_map(|r| (0..t).step_by(per_tile).map(move |i0| (r, i0))).collect();
    let tiles: Vec<Tile> = tasks
        .par_iter()
        .map(|&(r, i0)| attend_tile(store, rows[r], queries, r * g, g, i0..(i0 + per_tile).min(t), dv, weights))
        .collect();
    for (&(r, i0), tile) in tasks.iter().zip(&tiles) {
        for (mi, o) in tile.out.chunks_exact(dv).enumerate() {
            let (i, h) = (i0 + mi / g, r * g + mi % g);
            out[(i * heads + h) * dv..(i * heads + h + 1) * dv].copy_from_slice(o);
        }
    }
    weights.then(|| {
        let mut w: Vec<Vec<f32>> = rows.iter().map(|row| vec![0f32; row.len()]).collect();
        for (&(r, _), tile) in tasks.iter().zip(&tiles) {
            for (acc, x) in w[r].iter_mut().zip(&tile.weights) {
                *acc += x;
            }
        }
        w
    })
}

/// One tile's normalised output (`vectors x dv`) and, when asked, its slot weights (one per slot
/// of the row, averaged over heads, summed over the tile's queries).
struct Tile {
    out: Vec<f32>,
    weights: Vec<f32>,
}

/// Attends the query heads `h0 .. h0 + g` at positions `span` over `row`.
#[allow(clippy::too_many_arguments)]
fn attend_tile(
    store: &KvStore,
    row: &Row,
    queries: &Queries,
    h0: usize,
    g: usize,
    span: std::ops::Range<usize>,
    dv: usize,
    weights: bool,
) -> Tile {
    let (d, bs) = (store.head_dim(), store.block_size());
    let latent = store.v_dim() == 0;
    let m = span.len() * g;
    let mut q = Vec::with_capacity(m * d);
    for i in span.clone() {
        q.extend_from_slice(&queries.q[(i * queries.heads + h0) * d..(i * queries.heads + h0 + g) * d]);
    }
    let q_pos = &queries.q_pos[span];
    let n = row.len();
    let chunk_blocks = CHUNK_SLOTS.div_ceil(bs).max(1);
    let chunk = chunk_blocks * bs;
    let (pos, last) = (row.positions(), row.last_visible());
    let mut out = vec![0f32; m * dv];
    let mut max = vec![f32::NEG_INFINITY; m];
    let mut sum = vec![0f32; m];
    // With weights, every chunk's exponentials are kept with the maximum they were taken against,
    // and rescaled once the final maximum and sum are known.
    let mut kept: Vec<(usize, Vec<f32>, Vec<f32>)> = Vec::new();
    let (mut kc, mut vc, mut buf) = (Vec::new(), Vec::new(), Vec::new());
    let mut s = vec![0f32; m * chunk];
    let mut seen = vec![false; q_pos.len() * chunk];
    for (c, blocks) in row.blocks().chunks(chunk_blocks).enumerate() {
        let first = c * chunk;
        let len = (n - first).min(chunk);
        let mut any = false;
        for (qi, &qp) in q_pos.iter().enumerate() {
            for j in 0..len {
                let v = pos[first + j] <= qp && qp <= last[first + j];
                seen[qi * len + j] = v;
                any |= v;
            }
        }
        if !any {
            continue;
        }
        kc.clear();
        vc.clear();
        for (b, &block) in blocks.iter().enumerate() {
            let used = (len - b * bs).min(bs);
            kc.extend_from_slice(&store.block_keys(block, &mut buf)[..used * d]);
            if !latent {
                vc.extend_from_slice(&store.block_values(block, &mut buf)[..used * dv]);
            }
        }
        let s = &mut s[..m * len];
        matmul(m, len, d, s, len, false, (&q, d, 1), (&kc, 1, d), 1.0);
        let mut chunk_max = vec![f32::NEG_INFINITY; m];
        for mi in 0..m {
            let (sr, vis) = (&mut s[mi * len..(mi + 1) * len], &seen[(mi / g) * len..(mi / g + 1) * len]);
            if let Some(cap) = queries.softcap {
                sr.iter_mut().for_each(|x| *x = cap * (*x / cap).tanh());
            }
            let row_max = sr.iter().zip(vis).filter(|(_, v)| **v).map(|(x, _)| *x).fold(f32::NEG_INFINITY, f32::max);
            if row_max == f32::NEG_INFINITY {
                sr.fill(0.0);
                continue;
            }
            let new = max[mi].max(row_max);
            let carry = (max[mi] - new).exp();
            for o in &mut out[mi * dv..(mi + 1) * dv] {
                *o *= carry;
            }
            let mut total = sum[mi] * carry;
            for (x, v) in sr.iter_mut().zip(vis) {
                *x = if *v { (*x - new).exp() } else { 0.0 };
                total += *x;
            }
            sum[mi] = total;
            max[mi] = new;
            chunk_max[mi] = new;
        }
        let values = if latent { (&kc[..], d, 1) } else { (&vc[..], dv, 1) };
        matmul(m, dv, len, &mut out, dv, true, (s, len, 1), values, 1.0);
        if weights {
            kept.push((first, s.to_vec(), chunk_max));
        }
    }
    if let Some(sinks) = queries.sink_logits {
        // The sink joins each query's softmax as a last key of value zero.
        for mi in 0..m {
            let sink = sinks[h0 + mi % g];
            if sum[mi] == 0.0 {
                continue;
            }
            if sink > max[mi] {
                let carry = (max[mi] - sink).exp();
                out[mi * dv..(mi + 1) * dv].iter_mut().for_each(|o| *o *= carry);
                sum[mi] *= carry;
                max[mi] = sink;
            }
            sum[mi] += (sink - max[mi]).exp();
        }
    }
    for mi in 0..m {
        let o = &mut out[mi * dv..(mi + 1) * dv];
        if sum[mi] > 0.0 {
            let inv = 1.0 / sum[mi];
            o.iter_mut().for_each(|x| *x *= inv);
        } else {
            o.fill(0.0);
        }
    }
    let mut w = Vec::new();
    if weights {
        w = vec![0f32; n];
        for (first, p, chunk_max) in &kept {
            let len = p.len() / m;
            for mi in 0..m {
                if chunk_max[mi] == f32::NEG_INFINITY {
                    continue;
                }
                let f = (chunk_max[mi] - max[mi]).exp() / sum[mi] / g as f32;
                for (acc, x) in w[*first..first + len].iter_mut().zip(&p[mi * len..(mi + 1) * len]) {
                    *acc += x * f;
                }
            }
        }
    }
    Tile { out, weights: w }
}
