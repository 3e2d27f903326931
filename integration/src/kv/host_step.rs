//! One step of a batch of sequences on the host paged store: the [`KvBackend`] of the host path.
//!
//! Per layer, each sequence's new K/V and signals are copied to the host and appended to its rows
//! (the policy plans evictions), attended (one decode query per row read in place from the
//! blocks, or a chunk of queries over gathered rows; for attention-scored policies also each
//! slot's attention weight, handed to the policy) and compacted. The copies are explicit here:
//! the tensors to host vectors, the vectors into the store's slots, and for chunks the rows
//! gathered back into tensors.

use anyhow::{bail, Result};
use candle_core::{Device, Tensor};
use dms_policy::{Pos, SignalNeed};

use super::attention;
use super::backend::{DecisionSpan, KvBackend, LayerStep, Signals};
use super::sequence::SequenceCache;
use super::store::KvStore;
use crate::model::Llama;

/// The part of a batch that belongs to one sequence.
pub struct SeqInput<'a> {
    /// New tokens of the sequence.
    pub tokens: &'a [u32],
    /// The sequence's cache.
    pub cache: &'a mut SequenceCache,
}

/// A batch step over the host store.
pub struct HostStep<'s, 'a> {
    store: &'s mut KvStore,
    seqs: &'s mut [SeqInput<'a>],
    /// (first row in the batch, tokens) per sequence.
    spans: Vec<(usize, usize)>,
    positions: Vec<Pos>,
    latent_rank: Option<usize>,
    device: Device,
}

impl<'s, 'a> HostStep<'s, 'a> {
    /// A step feeding each sequence its `tokens` at the positions its cache has reached.
    pub fn new(
        seqs: &'s mut [SeqInput<'a>],
        store: &'s mut KvStore,
        latent_rank: Option<usize>,
        device: &Device,
    ) -> Result<Self> {
        let mut spans = Vec::with_capacity(seqs.len());
        let mut positions = Vec::new();
        for s in seqs.iter() {
            if s.tokens.is_empty() {
                bail!("a sequence in the batch has no new tokens");
            }
            let first = s.cache.seen();
            spans.push((positions.len(), s.tokens.len()));
            positions.extend((0..s.tokens.len() as Pos).map(|i| first + i));
        }
        Ok(Self { store, seqs, spans, positions, latent_rank, device: device.clone() })
    }
}

impl KvBackend for HostStep<'_, '_> {
    fn signals(&self) -> Signals {
        Signals {
            decision: self.seqs.iter().any(|s| s.cache.signal_need() == SignalNeed::DecisionScores),
            key_norms: self.seqs.iter().any(|s| s.cache.signal_need() == SignalNeed::KeyNorms),
        }
    }

    fn decision_spans(&self) -> Vec<DecisionSpan<'_>> {
        let spans = self.seqs.iter().map(|s| DecisionSpan {
            tokens: s.tokens.len(),
            needed: s.cache.signal_need() == SignalNeed::DecisionScores,
            adapter: s.cache.adapter(),
        });
        spans.collect()
    }

    fn attend(&mut self, li: usize, step: LayerStep<'_>) -> Result<Tensor> {
        let (_, nh, qd) = step.q.dims3()?;
        let (_, nkv, hd) = step.k.dims3()?;
        let dv = step.v.dim(2)?;
        let out_d = self.latent_rank.unwrap_or(hd);
        let host = |t: Option<&Tensor>| -> Result<Option<Vec<f32>>> {
            Ok(match t {
                Some(t) => Some(t.flatten_all()?.to_vec1::<f32>()?),
                None => None,
            })
        };
        let decision = host(step.decision)?;
        let key_norms = host(step.key_norms)?;
        let k_host = step.k.flatten_all()?.to_vec1::<f32>()?;
        let v_host = if dv > 0 { step.v.flatten_all()?.to_vec1::<f32>()? } else { Vec::new() };
        let q_host = if self.spans.iter().any(|&(_, t)| t == 1) { host(Some(step.q))? } else { None };
        let scoring = attention::Scoring { scale: step.scale, softcap: step.softcap, sink_logits: step.sink_logits };
        let mut outs = Vec::with_capacity(self.seqs.len());
        for (s, &(start, t)) in self.seqs.iter_mut().zip(&self.spans) {
            let kv_slice = start * nkv * hd..(start + t) * nkv * hd;
            let v_slice = start * nkv * dv..(start + t) * nkv * dv;
            let source = match s.cache.signal_need() {
                SignalNeed::DecisionScores => decision.as_ref(),
                SignalNeed::KeyNorms => key_norms.as_ref(),
                SignalNeed::None | SignalNeed::AttentionWeights => None,
            };
            let sc = source.map(|sc| &sc[start * nkv..(start + t) * nkv]);
            s.cache.append(li, self.store, &k_host[kv_slice], &v_host[v_slice], sc)?;
            let rows = s.cache.layer_rows(li);
            let positions = &self.positions[start..start + t];
            let weighted = s.cache.signal_need() == SignalNeed::AttentionWeights;
            let mut weights: Vec<Vec<f32>> = Vec::new();
            let out = if t == 1 {
                let qh = q_host.as_ref().expect("computed for decode spans");
                let qs = &qh[start * nh * qd..(start + 1) * nh * qd];
                let mut o = vec![0f32; nh * out_d];
                if weighted {
                    weights = rows.iter().map(|&r| Ok(vec![0f32; self.store.row(r)?.len()])).collect::<Result<_>>()?;
                }
                let mut w: Vec<&mut [f32]> = weights.iter_mut().map(|w| w.as_mut_slice()).collect();
                attention::decode_rows(
                    self.store,
                    rows,
                    qs,
                    positions[0],
                    scoring,
                    &mut o,
                    weighted.then_some(w.as_mut_slice()),
                )?;
                Tensor::from_vec(o, (1, nh * out_d), &self.device)?
            } else {
                let qc = step.q.narrow(0, start, t)?;
                if weighted {
                    let (out, w) =
                        attention::chunk_rows_weighted(self.store, rows, &qc, positions, scoring, self.latent_rank)?;
                    weights = w;
                    out
                } else {
                    match self.latent_rank {
                        Some(r) => attention::chunk_latent_rows(self.store, rows, &qc, positions, scoring, r)?,
                        None => attention::chunk_rows(self.store, rows, &qc, positions, scoring)?,
                    }
                }
            };
            if weighted {
                s.cache.observe_attention(li, &weights)?;
            }
            s.cache.compact(li, self.store)?;
            outs.push(out);
        }
        Ok(if outs.len() == 1 { outs.pop().expect("one output") } else { Tensor::cat(&outs, 0)? })
    }

    fn finish(&mut self) -> Result<()> {
        for (s, &(_, t)) in self.seqs.iter_mut().zip(&self.spans) {
            s.cache.advance(t);
        }
        Ok(())
    }
}

/// Runs new tokens of one or more sequences through `model` on the host store, updating their
/// caches. Returns logits per sequence: `[tokens, vocab]` when `all_logits`, else `[1, vocab]`
/// for the last token.
pub fn forward(model: &Llama, seqs: &mut [SeqInput<'_>], store: &mut KvStore, all_logits: bool) -> Result<Vec<Tensor>> {
    rayon::scope(|_| forward_on_worker(model, seqs, store, all_logits))
}

fn forward_on_worker(
    model: &Llama,
    seqs: &mut [SeqInput<'_>],
    store: &mut KvStore,
    all_logits: bool,
) -> Result<Vec<Tensor>> {
    let ids: Vec<u32> = seqs.iter().flat_map(|s| s.tokens.iter().copied()).collect();
    let mut step = HostStep::new(seqs, store, model.latent_rank(), model.device())?;
    let positions = step.positions.clone();
    let spans = step.spans.clone();
    let x = model.forward_hidden(&ids, &positions, &mut step)?;
    spans
        .iter()
        .map(|&(start, t)| {
            let xs = if all_logits { x.narrow(0, start, t)? } else { x.narrow(0, start + t - 1, 1)? };
            model.logits(&xs)
        })
        .collect()
}
