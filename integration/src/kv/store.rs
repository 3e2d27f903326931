//! Paged KV store: rows of (sequence, layer, KV head) over one shared block pool.
//!
//! Each row owns a block table into the pool and, per physical slot, the absolute position of the
//! key it holds and the last query position allowed to see it. The store never decides anything:
//! it executes a policy's [`EvictPlan`] and [`CompactPlan`] and checks that they are consistent.

use dms_policy::{CompactPlan, EvictPlan, Pos};
use half::f16;
use half::slice::HalfFloatSliceExt;

/// Element type of stored keys and values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KvDtype {
    /// 4 bytes per value: exact, what the parity tests compare.
    #[default]
    F32,
    /// 2 bytes per value, converted to f32 when attention reads a block.
    F16,
    /// ggml's Q8_0 (llama.cpp's `--cache-type-k q8_0`): each run of 32 values of a key or value
    /// as 32 signed bytes and one f16 scale (their largest magnitude / 127), 1.0625 bytes per
    /// value, dequantized a block at a time when attention reads it. Needs head sizes that are
    /// multiples of 32.
    Q8_0,
}

/// Values per Q8_0 block.
const Q8_0_VALUES: usize = super::q8_0::BLOCK;

impl KvDtype {
    /// Parses `[cache] kv_dtype`.
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "f32" => Ok(KvDtype::F32),
            "f16" => Ok(KvDtype::F16),
            "q8_0" => Ok(KvDtype::Q8_0),
            other => Err(format!("[cache] kv_dtype `{other}` is unknown (valid: f32, f16, q8_0)")),
        }
    }

    /// Bytes that `values` stored values take (a multiple of 32 for Q8_0, see [`Self::check_dims`]).
    pub fn bytes(self, values: usize) -> usize {
        match self {
            KvDtype::F32 => 4 * values,
            KvDtype::F16 => 2 * values,
            // An f16 scale and 32 signed bytes per block.
            KvDtype::Q8_0 => values / Q8_0_VALUES * (2 + Q8_0_VALUES),
        }
    }

    /// Bytes of one slot: a key of `head_dim` values and a value of `v_dim`.
    pub fn slot_bytes(self, head_dim: usize, v_dim: usize) -> u64 {
        (self.bytes(head_dim) + self.bytes(v_dim)) as u64
    }

    /// An error naming the sizes when keys of `head_dim` or values of `v_dim` values cannot be
    /// stored in this type (Q8_0 needs whole blocks of 32).
    pub fn check_dims(self, head_dim: usize, v_dim: usize) -> Result<(), StoreError> {
        if self == KvDtype::Q8_0 && !(head_dim.is_multiple_of(Q8_0_VALUES) && v_dim.is_multiple_of(Q8_0_VALUES)) {
            return Err(StoreError::Unsupported(format!(
                "[cache] kv_dtype = \"q8_0\" stores runs of {Q8_0_VALUES} values; this model's keys have {head_dim} \
                 and its values {v_dim} (use f16)"
            )));
        }
        Ok(())
    }
}

/// The pool's keys or values in their element type.
#[derive(Debug)]
enum Elems {
    F32(Vec<f32>),
    F16(Vec<f16>),
    /// Values and one scale per 32 of them ([`super::q8_0`]); every range the store touches is
    /// whole slots, and a slot is a whole number of blocks ([`KvDtype::check_dims`]).
    Q8_0 {
        quants: Vec<i8>,
        scales: Vec<f16>,
    },
}

impl Elems {
    fn new(dtype: KvDtype) -> Self {
        match dtype {
            KvDtype::F32 => Elems::F32(Vec::new()),
            KvDtype::F16 => Elems::F16(Vec::new()),
            KvDtype::Q8_0 => Elems::Q8_0 { quants: Vec::new(), scales: Vec::new() },
        }
    }

    fn resize(&mut self, n: usize) {
        match self {
            Elems::F32(v) => v.resize(n, 0.0),
            Elems::F16(v) => v.resize(n, f16::ZERO),
            Elems::Q8_0 { quants, scales } => {
                quants.resize(n, 0);
                scales.resize(n / Q8_0_VALUES, f16::ZERO);
            }
        }
    }

    /// Stores `src` from element `at` on (rounded to f16 in an f16 pool, quantized in a Q8_0 one).
    fn write(&mut self, at: usize, src: &[f32]) {
        match self {
            Elems::F32(v) => v[at..at + src.len()].copy_from_slice(src),
            Elems::F16(v) => v[at..at + src.len()].convert_from_f32_slice(src),
            Elems::Q8_0 { quants, scales } => {
                let r = at..at + src.len();
                super::q8_0::quantize(src, &mut quants[r.clone()], &mut scales[blocks(r)]);
            }
        }
    }

    fn copy_within(&mut self, src: std::ops::Range<usize>, dst: usize) {
        match self {
            Elems::F32(v) => v.copy_within(src, dst),
            Elems::F16(v) => v.copy_within(src, dst),
            Elems::Q8_0 { quants, scales } => {
                quants.copy_within(src.clone(), dst);
                scales.copy_within(blocks(src), dst / Q8_0_VALUES);
            }
        }
    }

    /// Elements `range` as f32: borrowed from an f32 pool, converted into `buf` from the others.
    fn read<'a>(&'a self, range: std::ops::Range<usize>, buf: &'a mut Vec<f32>) -> &'a [f32] {
        match self {
            Elems::F32(v) => &v[range],
            Elems::F16(v) => {
                buf.resize(range.len(), 0.0);
                v[range].convert_to_f32_slice(buf);
                buf
            }
            Elems::Q8_0 { quants, scales } => {
                buf.resize(range.len(), 0.0);
                super::q8_0::dequantize(&quants[range.clone()], &scales[blocks(range)], buf);
                buf
            }
        }
    }
}

/// The Q8_0 blocks of the element range `r` (whole blocks).
fn blocks(r: std::ops::Range<usize>) -> std::ops::Range<usize> {
    debug_assert!(r.start.is_multiple_of(Q8_0_VALUES) && r.end.is_multiple_of(Q8_0_VALUES));
    r.start / Q8_0_VALUES..r.end / Q8_0_VALUES
}

/// Handle of one cache row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RowId(pub u32);

/// Errors from executing plans.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StoreError {
    /// The pool has no free block left.
    #[error("KV cache is full: {needed} more block(s) of {block_size} tokens needed, {free} free of {capacity} (raise [cache] memory_mb or max_tokens)")]
    OutOfBlocks {
        /// Blocks the operation needs.
        needed: usize,
        /// Blocks still free.
        free: usize,
        /// Pool capacity in blocks.
        capacity: usize,
        /// Tokens per block.
        block_size: usize,
    },
    /// A plan does not fit the row's state (a policy bug).
    #[error("invalid cache plan for row {row}: {message}")]
    BadPlan {
        /// Row index.
        row: u32,
        /// What is inconsistent.
        message: String,
    },
    /// The row was removed (or swapped out) and is no longer in the store.
    #[error("row {row} is not in the store (removed or swapped out)")]
    RemovedRow {
        /// Row index.
        row: u32,
    },
    /// Input data has the wrong length.
    #[error("K/V data for row {row} has {got} values, expected {expected}")]
    BadData {
        /// Row index.
        row: u32,
        /// Values given.
        got: usize,
        /// Values expected.
        expected: usize,
    },
    /// The store cannot hold this model's rows in the asked element type.
    #[error("{0}")]
    Unsupported(String),
}

/// One row's block table and slot metadata.
#[derive(Debug, Clone, Default)]
pub struct Row {
    layer: usize,
    blocks: Vec<u32>,
    pos: Vec<Pos>,
    last_visible: Vec<Pos>,
    seen: Pos,
}

impl Row {
    /// Decoder layer of the row.
    pub fn layer(&self) -> usize {
        self.layer
    }
    /// Physical slots in use.
    pub fn len(&self) -> usize {
        self.pos.len()
    }
    /// True when the row holds nothing.
    pub fn is_empty(&self) -> bool {
        self.pos.is_empty()
    }
    /// Absolute position of the key in each slot.
    pub fn positions(&self) -> &[Pos] {
        &self.pos
    }
    /// Last query position allowed to see each slot.
    pub fn last_visible(&self) -> &[Pos] {
        &self.last_visible
    }
    /// Tokens this row has seen.
    pub fn seen(&self) -> Pos {
        self.seen
    }
    /// Blocks held by the row.
    pub fn blocks(&self) -> &[u32] {
        &self.blocks
    }
    /// Sorted positions of the keys the row holds.
    pub fn kept_positions(&self) -> Vec<Pos> {
        let mut v = self.pos.clone();
        v.sort_unstable();
        v
    }
}

/// Memory figures of the store or of one layer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MemoryUsage {
    /// Bytes of K and V in occupied slots.
    pub bytes_live: u64,
    /// Bytes of K and V in blocks held by rows.
    pub bytes_allocated: u64,
    /// Occupied slots.
    pub slots: u64,
    /// Tokens seen, summed over rows (what a full cache would hold).
    pub tokens_seen: u64,
    /// Bytes a full cache would hold for the same tokens.
    pub bytes_full: u64,
}

impl MemoryUsage {
    /// Adds another usage figure.
    pub fn add(&mut self, other: MemoryUsage) {
        self.bytes_live += other.bytes_live;
        self.bytes_allocated += other.bytes_allocated;
        self.slots += other.slots;
        self.tokens_seen += other.tokens_seen;
        self.bytes_full += other.bytes_full;
    }
}

/// A row moved out of the pool by [`KvStore::swap_out`].
#[derive(Debug, Clone)]
pub struct SwappedRow {
    layer: usize,
    pos: Vec<Pos>,
    last_visible: Vec<Pos>,
    seen: Pos,
    k: Vec<f32>,
    v: Vec<f32>,
}

impl SwappedRow {
    /// Blocks of `block_size` slots it needs back.
    pub fn blocks_needed(&self, block_size: usize) -> usize {
        self.pos.len().div_ceil(block_size)
    }
}

/// The block pool and every row.
#[derive(Debug)]
pub struct KvStore {
    head_dim: usize,
    v_dim: usize,
    block_size: usize,
    capacity_blocks: usize,
    dtype: KvDtype,
    k: Elems,
    v: Elems,
    grown_blocks: usize,
    free_blocks: Vec<u32>,
    rows: Vec<Option<Row>>,
    free_rows: Vec<u32>,
}

impl KvStore {
    /// A store of `capacity_blocks` blocks of `block_size` slots of `head_dim` floats for K and V.
    /// Memory is taken from the system as blocks are first used.
    pub fn new(head_dim: usize, block_size: usize, capacity_blocks: usize) -> Self {
        Self::with_value_dim(head_dim, head_dim, block_size, capacity_blocks)
    }

    /// A store whose values have `v_dim` floats per slot (0 for latent rows, whose values are a
    /// prefix of the key).
    pub fn with_value_dim(head_dim: usize, v_dim: usize, block_size: usize, capacity_blocks: usize) -> Self {
        Self::build(head_dim, v_dim, block_size, capacity_blocks, KvDtype::F32)
    }

    /// [`Self::with_value_dim`] storing keys and values as `dtype`; an error when `dtype` cannot
    /// hold rows of these sizes ([`KvDtype::check_dims`]).
    pub fn with_dtype(
        head_dim: usize,
        v_dim: usize,
        block_size: usize,
        capacity_blocks: usize,
        dtype: KvDtype,
    ) -> Result<Self, StoreError> {
        dtype.check_dims(head_dim, v_dim)?;
        Ok(Self::build(head_dim, v_dim, block_size, capacity_blocks, dtype))
    }

    /// An empty store of `dtype` ([`KvDtype::check_dims`] already passed).
    fn build(head_dim: usize, v_dim: usize, block_size: usize, capacity_blocks: usize, dtype: KvDtype) -> Self {
        Self {
            head_dim,
            v_dim,
            block_size,
            capacity_blocks,
            dtype,
            k: Elems::new(dtype),
            v: Elems::new(dtype),
            grown_blocks: 0,
            free_blocks: Vec::new(),
            rows: Vec::new(),
            free_rows: Vec::new(),
        }
    }

    /// Floats per key.
    pub fn head_dim(&self) -> usize {
        self.head_dim
    }
    /// Floats per value (0: latent rows, no separate values).
    pub fn v_dim(&self) -> usize {
        self.v_dim
    }
    /// Slots per block.
    pub fn block_size(&self) -> usize {
        self.block_size
    }
    /// Pool capacity in blocks.
    pub fn capacity_blocks(&self) -> usize {
        self.capacity_blocks
    }
    /// Blocks not held by any row.
    pub fn free_block_count(&self) -> usize {
        self.capacity_blocks - self.grown_blocks + self.free_blocks.len()
    }
    /// Bytes of K+V of one slot.
    pub fn slot_bytes(&self) -> u64 {
        self.dtype.slot_bytes(self.head_dim, self.v_dim)
    }

    /// Creates an empty row for `layer`.
    pub fn add_row(&mut self, layer: usize) -> RowId {
        let row = Row { layer, ..Row::default() };
        match self.free_rows.pop() {
            Some(id) => {
                self.rows[id as usize] = Some(row);
                RowId(id)
            }
            None => {
                self.rows.push(Some(row));
                RowId(self.rows.len() as u32 - 1)
            }
        }
    }

    /// Drops a row and returns its blocks to the pool.
    pub fn remove_row(&mut self, id: RowId) {
        if let Some(row) = self.rows.get_mut(id.0 as usize).and_then(Option::take) {
            self.free_blocks.extend(row.blocks);
            self.free_rows.push(id.0);
        }
    }

    /// The row's metadata; an error for a row that was removed or swapped out.
    pub fn row(&self, id: RowId) -> Result<&Row, StoreError> {
        self.rows.get(id.0 as usize).and_then(Option::as_ref).ok_or(StoreError::RemovedRow { row: id.0 })
    }

    /// Applies a policy's evict plan for `n` new tokens starting at `first_pos`, writing their keys
    /// and values (`n * head_dim` floats each, token-major).
    pub fn apply_evict(
        &mut self,
        id: RowId,
        plan: &EvictPlan,
        first_pos: Pos,
        k_new: &[f32],
        v_new: &[f32],
    ) -> Result<(), StoreError> {
        let (d, dv, bs) = (self.head_dim, self.v_dim, self.block_size);
        let n = plan.writes.len();
        for (data, w) in [(k_new, d), (v_new, dv)] {
            if data.len() != n * w {
                return Err(StoreError::BadData { row: id.0, got: data.len(), expected: n * w });
            }
        }
        let bad = |message: String| StoreError::BadPlan { row: id.0, message };
        let row = self.row(id)?;
        if first_pos != row.seen {
            return Err(bad(format!("step starts at {first_pos} but the row has seen {}", row.seen)));
        }
        let old_len = row.len();
        for &(slot, _) in &plan.hide {
            if slot as usize >= old_len {
                return Err(bad(format!("hide of slot {slot} beyond length {old_len}")));
            }
        }
        let mut new_len = old_len;
        for w in &plan.writes {
            let s = w.slot as usize;
            if s == new_len {
                new_len += 1;
            } else if s > new_len {
                return Err(bad(format!("write to slot {s} skips slots (length {new_len})")));
            }
        }
        let blocks_needed = new_len.div_ceil(bs).saturating_sub(row.blocks.len());
        if blocks_needed > self.free_block_count() {
            return Err(StoreError::OutOfBlocks {
                needed: blocks_needed,
                free: self.free_block_count(),
                capacity: self.capacity_blocks,
                block_size: bs,
            });
        }
        let mut blocks = Vec::with_capacity(blocks_needed);
        for _ in 0..blocks_needed {
            blocks.push(self.take_block());
        }
        let row = self.rows[id.0 as usize].as_mut().expect("checked above");
        row.blocks.extend(blocks);
        for &(slot, last) in &plan.hide {
            row.last_visible[slot as usize] = last;
        }
        for (i, w) in plan.writes.iter().enumerate() {
            let s = w.slot as usize;
            let p = first_pos + i as Pos;
            if s < row.pos.len() {
                if row.last_visible[s] >= first_pos {
                    return Err(bad(format!(
                        "token {p} overwrites slot {s} (position {}) which queries of this step still see",
                        row.pos[s]
                    )));
                }
                row.pos[s] = p;
                row.last_visible[s] = w.last_visible;
            } else {
                row.pos.push(p);
                row.last_visible.push(w.last_visible);
            }
            let slot = row.blocks[s / bs] as usize * bs + s % bs;
            self.k.write(slot * d, &k_new[i * d..(i + 1) * d]);
            self.v.write(slot * dv, &v_new[i * dv..(i + 1) * dv]);
        }
        row.seen = first_pos + n as Pos;
        Ok(())
    }

    /// Applies a compaction plan: hides the dropped slots from every future query, moves slots
    /// into dead ones, truncates and frees whole blocks.
    pub fn apply_compact(&mut self, id: RowId, plan: &CompactPlan) -> Result<(), StoreError> {
        let (d, dv, bs) = (self.head_dim, self.v_dim, self.block_size);
        let bad = |message: String| StoreError::BadPlan { row: id.0, message };
        let row =
            self.rows.get_mut(id.0 as usize).and_then(Option::as_mut).ok_or(StoreError::RemovedRow { row: id.0 })?;
        let seen = row.seen;
        for &s in &plan.drop {
            let s = s as usize;
            if s >= row.len() {
                return Err(bad(format!("drop of slot {s} outside length {}", row.len())));
            }
            // No query from `seen` on sees it; `seen` is at least 1 once a row holds a key.
            row.last_visible[s] = row.last_visible[s].min(seen.saturating_sub(1));
        }
        let dead = |row: &Row, s: usize| row.last_visible[s] < seen;
        for &(from, to) in &plan.moves {
            let (f, t) = (from as usize, to as usize);
            if f >= row.len() || t >= row.len() {
                return Err(bad(format!("move {f}->{t} outside length {}", row.len())));
            }
            if !dead(row, t) {
                return Err(bad(format!("move onto slot {t} holding visible position {}", row.pos[t])));
            }
            row.pos[t] = row.pos[f];
            row.last_visible[t] = row.last_visible[f];
            // The source now holds a stale copy that no future query may see.
            row.last_visible[f] = 0;
            let src = row.blocks[f / bs] as usize * bs + f % bs;
            let dst = row.blocks[t / bs] as usize * bs + t % bs;
            self.k.copy_within(src * d..(src + 1) * d, dst * d);
            self.v.copy_within(src * dv..(src + 1) * dv, dst * dv);
        }
        let len = plan.len as usize;
        if len > row.len() {
            return Err(bad(format!("compaction to length {len} beyond {}", row.len())));
        }
        if let Some(s) = (len..row.len()).find(|&s| !dead(row, s)) {
            return Err(bad(format!("truncation drops slot {s} holding visible position {}", row.pos[s])));
        }
        row.pos.truncate(len);
        row.last_visible.truncate(len);
        let keep = len.div_ceil(bs);
        let freed: Vec<u32> = row.blocks.drain(keep..).collect();
        self.free_blocks.extend(freed);
        Ok(())
    }

    /// Moves a row's keys, values and metadata out of the pool (preemption) and frees its blocks.
    pub fn swap_out(&mut self, id: RowId) -> Result<SwappedRow, StoreError> {
        let (mut k, mut v) = (Vec::new(), Vec::new());
        self.gather(id, &mut k, &mut v)?;
        let row = self.rows[id.0 as usize].take().ok_or(StoreError::RemovedRow { row: id.0 })?;
        self.free_blocks.extend(row.blocks.iter().copied());
        self.free_rows.push(id.0);
        Ok(SwappedRow { layer: row.layer, pos: row.pos, last_visible: row.last_visible, seen: row.seen, k, v })
    }

    /// A new row holding a copy of row `id` (slots, positions and visibility) in blocks of its
    /// own, for a forked sequence.
    pub fn fork_row(&mut self, id: RowId) -> Result<RowId, StoreError> {
        let (mut k, mut v) = (Vec::new(), Vec::new());
        self.gather(id, &mut k, &mut v)?;
        let row = self.row(id)?;
        let copy = SwappedRow {
            layer: row.layer,
            pos: row.pos.clone(),
            last_visible: row.last_visible.clone(),
            seen: row.seen,
            k,
            v,
        };
        self.swap_in(copy)
    }

    /// Brings a swapped row back into the pool, slot for slot.
    pub fn swap_in(&mut self, s: SwappedRow) -> Result<RowId, StoreError> {
        let blocks = s.pos.len().div_ceil(self.block_size);
        if blocks > self.free_block_count() {
            return Err(StoreError::OutOfBlocks {
                needed: blocks,
                free: self.free_block_count(),
                capacity: self.capacity_blocks,
                block_size: self.block_size,
            });
        }
        let id = self.add_row(s.layer);
        let (d, dv, bs) = (self.head_dim, self.v_dim, self.block_size);
        let mut taken = Vec::with_capacity(blocks);
        for _ in 0..blocks {
            taken.push(self.take_block());
        }
        for (b, &block) in taken.iter().enumerate() {
            let used = (s.pos.len() - b * bs).min(bs);
            let at = block as usize * bs;
            self.k.write(at * d, &s.k[b * bs * d..(b * bs + used) * d]);
            self.v.write(at * dv, &s.v[b * bs * dv..(b * bs + used) * dv]);
        }
        let row = self.rows[id.0 as usize].as_mut().expect("just added");
        row.blocks = taken;
        row.pos = s.pos;
        row.last_visible = s.last_visible;
        row.seen = s.seen;
        Ok(id)
    }

    /// Blocks a row holds (none once removed or swapped out).
    pub fn row_blocks(&self, id: RowId) -> usize {
        self.row(id).map_or(0, |r| r.blocks.len())
    }

    /// Memory used by one row (nothing once removed or swapped out).
    pub fn row_usage(&self, id: RowId) -> MemoryUsage {
        let Ok(row) = self.row(id) else { return MemoryUsage::default() };
        let sb = self.slot_bytes();
        MemoryUsage {
            bytes_live: row.len() as u64 * sb,
            bytes_allocated: (row.blocks.len() * self.block_size) as u64 * sb,
            slots: row.len() as u64,
            tokens_seen: row.seen as u64,
            bytes_full: row.seen as u64 * sb,
        }
    }

    /// Memory used by all rows, per layer (index = layer).
    pub fn usage_by_layer(&self) -> Vec<MemoryUsage> {
        let mut out: Vec<MemoryUsage> = Vec::new();
        for (i, row) in self.rows.iter().enumerate() {
            if let Some(row) = row {
                if out.len() <= row.layer {
                    out.resize(row.layer + 1, MemoryUsage::default());
                }
                out[row.layer].add(self.row_usage(RowId(i as u32)));
            }
        }
        out
    }

    /// Memory used by all rows.
    pub fn usage(&self) -> MemoryUsage {
        let mut total = MemoryUsage::default();
        for u in self.usage_by_layer() {
            total.add(u);
        }
        total
    }

    /// Element type of the stored keys and values.
    pub fn dtype(&self) -> KvDtype {
        self.dtype
    }

    /// Contiguous keys of a block (`block_size * head_dim` floats) as f32: borrowed from an f32
    /// pool, converted into `buf` from the others.
    pub fn block_keys<'a>(&'a self, block: u32, buf: &'a mut Vec<f32>) -> &'a [f32] {
        let n = self.block_size * self.head_dim;
        self.k.read(block as usize * n..(block as usize + 1) * n, buf)
    }

    /// Contiguous values of a block (`block_size * v_dim` floats), as [`Self::block_keys`].
    pub fn block_values<'a>(&'a self, block: u32, buf: &'a mut Vec<f32>) -> &'a [f32] {
        let n = self.block_size * self.v_dim;
        self.v.read(block as usize * n..(block as usize + 1) * n, buf)
    }

    /// Copies the row's keys and values into `k_out` / `v_out` (slot order, `len * head_dim` each).
    pub fn gather(&self, id: RowId, k_out: &mut Vec<f32>, v_out: &mut Vec<f32>) -> Result<(), StoreError> {
        let row = self.row(id)?;
        let (d, dv, bs) = (self.head_dim, self.v_dim, self.block_size);
        k_out.clear();
        v_out.clear();
        let mut buf = Vec::new();
        for (b, &block) in row.blocks.iter().enumerate() {
            let used = (row.len() - b * bs).min(bs);
            k_out.extend_from_slice(&self.block_keys(block, &mut buf)[..used * d]);
            v_out.extend_from_slice(&self.block_values(block, &mut buf)[..used * dv]);
        }
        Ok(())
    }

    fn take_block(&mut self) -> u32 {
        if let Some(b) = self.free_blocks.pop() {
            return b;
        }
        let b = self.grown_blocks as u32;
        self.grown_blocks += 1;
        let n = self.grown_blocks * self.block_size;
        self.k.resize(n * self.head_dim);
        self.v.resize(n * self.v_dim);
        b
    }
}
