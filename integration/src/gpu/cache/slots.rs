//! Sequences joining and leaving a running device batch. The cache's sequences hold slots
//! `0..n`, so a decode step's kernels cover the rows of exactly those slots; a sequence leaving
//! a middle slot is replaced by the last one (its block tables and rings move, its K/V stay in
//! the pool), and its blocks go back to the device free list (`dms_release_rows`,
//! `dms_move_rows` in `kernels.cu`, checked under the CPU emulation).

use super::*;

impl GpuCache {
    /// An empty cache holding no sequence yet: [`Self::add_sequence`] takes its slots (at most
    /// `shape.batch`).
    pub fn empty(device: &Device, dtype: DType, shape: GpuCacheShape) -> Result<Self> {
        let mut cache = Self::new(device, dtype, shape)?;
        cache.active = 0;
        Ok(cache)
    }

    /// Sequences in the cache (slots `0..sequences()`).
    pub fn sequences(&self) -> usize {
        self.active
    }

    /// Takes the next slot for a new, empty sequence and returns it; its prompt then goes in
    /// with [`Self::insert_prompt`] (or [`crate::gpu::prefill_into`]).
    pub fn add_sequence(&mut self) -> Result<usize> {
        if self.active == self.shape.batch {
            bail!("all {} sequence slots of the device cache are in use", self.shape.batch);
        }
        self.active += 1;
        Ok(self.active - 1)
    }

    /// Removes the sequence in `slot`, returning its blocks to the free list. When it was not
    /// the last, the last sequence moves into `slot`; returns the slot it came from, so the
    /// caller can renumber its handle.
    pub fn remove_sequence(&mut self, slot: usize) -> Result<Option<usize>> {
        if slot >= self.active {
            bail!("slot {slot} holds no sequence ({} in the cache)", self.active);
        }
        let s = self.shape;
        let (rows, kv, bs, wc, mb, seq) = (
            s.rows() as i32,
            s.kv_heads as i32,
            s.block_size as i32,
            (s.window + 1) as i32,
            s.max_blocks_per_row as i32,
            slot as i32,
        );
        let cfg = LaunchConfig { grid_dim: (s.layers as u32, 1, 1), block_dim: (32, 1, 1), shared_mem_bytes: 0 };
        let release = self.kernel("dms_release_rows")?;
        let mut b = self.stream.launch_builder(&release);
        b.arg(&rows)
            .arg(&kv)
            .arg(&bs)
            .arg(&wc)
            .arg(&mb)
            .arg(&seq)
            .arg(&self.block_table)
            .arg(&self.row_len)
            .arg(&self.row_pos)
            .arg(&self.ring_flag)
            .arg(&self.free_list)
            .arg(&self.free_top);
        drv(unsafe { b.launch(cfg) })?;
        let last = self.active - 1;
        self.active -= 1;
        if slot == last {
            return Ok(None);
        }
        let moves = self.kernel("dms_move_rows")?;
        let from = last as i32;
        let mut b = self.stream.launch_builder(&moves);
        b.arg(&rows)
            .arg(&kv)
            .arg(&wc)
            .arg(&mb)
            .arg(&from)
            .arg(&seq)
            .arg(&self.block_table)
            .arg(&self.row_len)
            .arg(&self.row_pos)
            .arg(&self.ring_slot)
            .arg(&self.ring_flag);
        drv(unsafe { b.launch(cfg) })?;
        Ok(Some(last))
    }

    /// Blocks on the device free list (one 4-byte read from the device).
    pub fn free_blocks(&self) -> Result<usize> {
        let top = drv(self.stream.clone_dtoh(&self.free_top))?;
        Ok(top[0].max(0) as usize)
    }
}
