//! One sequence's view of the cache: its policy state and its rows in the shared store.
//!
//! Data flows one way: the model hands new K/V and decision scores for a layer; the policy plans
//! (decide, evict); the store executes; after attention the policy plans compaction and the store
//! executes it.

use anyhow::{Context, Result};
use dms_policy::{
    CacheShape, CompactPlan, EvictPlan, ModelWindows, PolicyFactory, Pos, RowRef, SequencePolicy, SignalNeed,
};

use crate::kv::store::{KvStore, MemoryUsage, RowId, StoreError, SwappedRow};

/// A sequence's policy state and rows (index `layer * kv_heads + head`).
pub struct SequenceCache {
    policy: Box<dyn SequencePolicy>,
    signal: SignalNeed,
    policy_name: String,
    adapter: Option<String>,
    shape: CacheShape,
    rows: Vec<RowId>,
    seen: Pos,
    evict_plan: EvictPlan,
    compact_plan: CompactPlan,
    k_buf: Vec<f32>,
    v_buf: Vec<f32>,
}

impl SequenceCache {
    /// Creates the rows of a new sequence in `store`, under `factory`'s policy and, in the layers
    /// `windows` flags, the model's own attention window (see [`ModelWindows::wrap`]).
    pub fn new(
        factory: &dyn PolicyFactory,
        shape: CacheShape,
        windows: Option<&ModelWindows>,
        store: &mut KvStore,
    ) -> Self {
        let rows = (0..shape.n_rows()).map(|i| store.add_row(i / shape.rows_per_layer)).collect();
        let policy = factory.new_sequence(shape);
        Self {
            policy: match windows {
                Some(w) => w.wrap(policy, shape, factory.keeps_every_key()),
                None => policy,
            },
            signal: factory.signal_need(),
            policy_name: factory.name().to_string(),
            adapter: factory.adapter().map(str::to_owned),
            shape,
            rows,
            seen: 0,
            evict_plan: EvictPlan::default(),
            compact_plan: CompactPlan::default(),
            k_buf: Vec::new(),
            v_buf: Vec::new(),
        }
    }

    /// Moves every row out of the pool (preemption); the policy state stays with the sequence.
    pub fn swap_out(&mut self, store: &mut KvStore) -> std::result::Result<Vec<SwappedRow>, StoreError> {
        self.rows.iter().map(|&r| store.swap_out(r)).collect()
    }

    /// Brings the rows back (after [`SequenceCache::swap_out`]); nothing changes on failure.
    pub fn swap_in(&mut self, store: &mut KvStore, rows: Vec<SwappedRow>) -> std::result::Result<(), Vec<SwappedRow>> {
        let need: usize = rows.iter().map(|r| r.blocks_needed(store.block_size())).sum();
        if need > store.free_block_count() {
            return Err(rows);
        }
        for (slot, row) in self.rows.iter_mut().zip(rows) {
            *slot = store.swap_in(row).expect("capacity checked above");
        }
        Ok(())
    }

    /// A copy of this sequence (its rows in blocks of their own, its policy state copied), for
    /// sequences sharing a prompt; `None` when the policy cannot be copied. Nothing is taken
    /// from the store on an error.
    pub fn fork(&self, store: &mut KvStore) -> std::result::Result<Option<SequenceCache>, StoreError> {
        let Some(policy) = self.policy.fork() else { return Ok(None) };
        let mut rows = Vec::with_capacity(self.rows.len());
        for &r in &self.rows {
            match store.fork_row(r) {
                Ok(copy) => rows.push(copy),
                Err(e) => {
                    for copy in rows {
                        store.remove_row(copy);
                    }
                    return Err(e);
                }
            }
        }
        Ok(Some(SequenceCache {
            policy,
            signal: self.signal,
            policy_name: self.policy_name.clone(),
            adapter: self.adapter.clone(),
            shape: self.shape,
            rows,
            seen: self.seen,
            evict_plan: EvictPlan::default(),
            compact_plan: CompactPlan::default(),
            k_buf: Vec::new(),
            v_buf: Vec::new(),
        }))
    }

    /// Blocks the next decode step may take from the pool at most: one per row whose last block
    /// is full.
    pub fn blocks_for_next_token(&self, store: &KvStore) -> usize {
        self.rows
            .iter()
            .filter(|&&r| store.row(r).is_ok_and(|row| row.len() == row.blocks().len() * store.block_size()))
            .count()
    }

    /// Blocks held by the sequence.
    pub fn blocks_held(&self, store: &KvStore) -> usize {
        self.rows.iter().map(|&r| store.row_blocks(r)).sum()
    }

    /// Releases every row back to the store.
    pub fn release(self, store: &mut KvStore) {
        for r in self.rows {
            store.remove_row(r);
        }
    }

    /// The per-token signal this sequence's policy needs from the model.
    pub fn signal_need(&self) -> SignalNeed {
        self.signal
    }

    /// The adapter the sequence's policy reads its decisions from (`None`: the model's own).
    pub fn adapter(&self) -> Option<&str> {
        self.adapter.as_deref()
    }

    /// Registry name of the sequence's policy.
    pub fn policy_name(&self) -> &str {
        &self.policy_name
    }

    /// The sequence's policy state (read-only, for telemetry).
    pub fn policy(&self) -> &dyn SequencePolicy {
        self.policy.as_ref()
    }

    /// Tokens the sequence has fed through every layer.
    pub fn seen(&self) -> Pos {
        self.seen
    }

    /// The shape of the sequence's cache.
    pub fn shape(&self) -> CacheShape {
        self.shape
    }

    /// Rows of one layer, one per KV head.
    pub fn layer_rows(&self, layer: usize) -> &[RowId] {
        let n = self.shape.rows_per_layer;
        &self.rows[layer * n..(layer + 1) * n]
    }

    /// Decides, evicts and writes `t` new tokens of `layer`. `k`/`v` are `[t, kv_heads, head_dim]`
    /// and `[t, kv_heads, v_dim]` (empty for latent rows), and `scores` (if any) `[t, kv_heads]`, token-major.
    pub fn append(
        &mut self,
        layer: usize,
        store: &mut KvStore,
        k: &[f32],
        v: &[f32],
        scores: Option<&[f32]>,
    ) -> Result<()> {
        let kv = self.shape.rows_per_layer;
        let (d, dv) = (store.head_dim(), store.v_dim());
        let t = k.len() / (kv * d);
        let mut row_scores = Vec::new();
        for head in 0..kv {
            let row = RowRef { layer, head };
            let s = scores.map(|s| {
                row_scores.clear();
                row_scores.extend((0..t).map(|i| s[i * kv + head]));
                row_scores.as_slice()
            });
            self.policy.decide(row, self.seen, t, s)?;
            self.policy.evict(row, self.seen, t, &mut self.evict_plan)?;
            self.k_buf.clear();
            self.v_buf.clear();
            for i in 0..t {
                let (at, av) = ((i * kv + head) * d, (i * kv + head) * dv);
                self.k_buf.extend_from_slice(&k[at..at + d]);
                self.v_buf.extend_from_slice(&v[av..av + dv]);
            }
            let id = self.rows[layer * kv + head];
            store
                .apply_evict(id, &self.evict_plan, self.seen, &self.k_buf, &self.v_buf)
                .with_context(|| format!("layer {layer}, kv head {head}"))?;
        }
        Ok(())
    }

    /// Hands the policy the attention weight of every slot of `layer`'s rows in this step (one
    /// vector per KV head, [`SignalNeed::AttentionWeights`]).
    pub fn observe_attention(&mut self, layer: usize, weights: &[Vec<f32>]) -> Result<()> {
        for (head, w) in weights.iter().enumerate() {
            self.policy.observe_attention(RowRef { layer, head }, w)?;
        }
        Ok(())
    }

    /// Compacts the rows of `layer` after its attention ran.
    pub fn compact(&mut self, layer: usize, store: &mut KvStore) -> Result<()> {
        let kv = self.shape.rows_per_layer;
        for head in 0..kv {
            self.policy.compact(RowRef { layer, head }, &mut self.compact_plan)?;
            store
                .apply_compact(self.rows[layer * kv + head], &self.compact_plan)
                .with_context(|| format!("layer {layer}, kv head {head}"))?;
        }
        Ok(())
    }

    /// Marks `t` tokens as fed through every layer.
    pub fn advance(&mut self, t: usize) {
        self.seen += t as Pos;
    }

    /// Memory used by this sequence.
    pub fn usage(&self, store: &KvStore) -> MemoryUsage {
        let mut u = MemoryUsage::default();
        for &r in &self.rows {
            u.add(store.row_usage(r));
        }
        u
    }

    /// Compression ratio (spec rule 6): 1 / mean over rows of kept slots / tokens seen.
    pub fn compression_ratio(&self, store: &KvStore) -> f64 {
        compression_ratio(self.rows.iter().map(|&r| store.row_usage(r)))
    }

    /// For a shadow policy, the compression ratio the shadowed policy would reach.
    pub fn shadow_compression_ratio(&self, store: &KvStore) -> Option<f64> {
        let mut rows = Vec::with_capacity(self.rows.len());
        for (i, &r) in self.rows.iter().enumerate() {
            let row = RowRef { layer: i / self.shape.rows_per_layer, head: i % self.shape.rows_per_layer };
            let kept = self.policy.shadow_kept(row)?;
            let seen = store.row(r).map_or(0, |row| row.seen()) as u64;
            rows.push(MemoryUsage { slots: kept as u64, tokens_seen: seen, ..MemoryUsage::default() });
        }
        Some(compression_ratio(rows.into_iter()))
    }

    /// Sorted kept positions of every row of `layer` (none for rows swapped out of the store).
    pub fn kept_positions(&self, layer: usize, store: &KvStore) -> Vec<Vec<Pos>> {
        self.layer_rows(layer)
            .iter()
            .map(|&r| store.row(r).map_or_else(|_| Vec::new(), |row| row.kept_positions()))
            .collect()
    }

    /// Compression ratio of one layer.
    pub fn layer_compression_ratio(&self, layer: usize, store: &KvStore) -> f64 {
        compression_ratio(self.layer_rows(layer).iter().map(|&r| store.row_usage(r)))
    }
}

/// 1 / mean(kept / seen) over rows that have seen at least one token.
pub fn compression_ratio(rows: impl Iterator<Item = MemoryUsage>) -> f64 {
    let (mut sum, mut n) = (0.0, 0usize);
    for u in rows.filter(|u| u.tokens_seen > 0) {
        sum += u.slots as f64 / u.tokens_seen as f64;
        n += 1;
    }
    if n == 0 || sum == 0.0 {
        1.0
    } else {
        n as f64 / sum
    }
}
