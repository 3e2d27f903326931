//! Sequences joining and leaving a running device batch. The cache's sequences hold slots
//! `0..n`, so a decode step's kernels cover the rows of exactly those slots; a sequence leaving
//! a middle slot is replaced by the last one (its block tables and rings move, its K/V stay in
//! the pool), and its blocks go back to the device free list (`dms_release_rows`,
//! `dms_move_rows` in `kernels.cu`, checked under the CPU emulation). A sequence can also join
//! as a fork of another (`dms_fork_rows`, `dms_fork_copy`): same rows, its own blocks.

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

    /// Takes the next slot for a new, empty sequence running `program` and returns it; its prompt then goes in
    /// with [`Self::insert_prompt`] (or [`crate::gpu::prefill_into`]).
    pub fn add_sequence(&mut self, program: DevicePolicy) -> Result<usize> {
        if self.active == self.shape.batch {
            bail!("all {} sequence slots of the device cache are in use", self.shape.batch);
        }
        self.set_program(self.active, program)?;
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
        let moved = self.program(last);
        self.set_program(slot, moved)?;
        Ok(Some(last))
    }

    /// Adds a sequence that is a copy of the one in `src` (its program, rows, rings and stored
    /// K/V, in blocks of its own) and returns its slot. A row that finds too few free blocks stays empty
    /// and sets the error flag ([`Self::check`]).
    pub fn fork_sequence(&mut self, src: usize) -> Result<usize> {
        if src >= self.active {
            bail!("slot {src} holds no sequence ({} in the cache)", self.active);
        }
        let dst = self.add_sequence(self.program(src))?;
        let s = self.shape;
        let (rows, kv, bs, wc, mb, d) = (
            s.rows() as i32,
            s.kv_heads as i32,
            s.block_size as i32,
            (s.window + 1) as i32,
            s.max_blocks_per_row as i32,
            s.head_dim as i32,
        );
        let (srci, dsti) = (src as i32, dst as i32);
        let c1 = LaunchConfig { grid_dim: (s.layers as u32, 1, 1), block_dim: (32, 1, 1), shared_mem_bytes: 0 };
        let rows_kernel = self.kernel("dms_fork_rows")?;
        let mut b = self.stream.launch_builder(&rows_kernel);
        b.arg(&rows)
            .arg(&kv)
            .arg(&bs)
            .arg(&wc)
            .arg(&mb)
            .arg(&srci)
            .arg(&dsti)
            .arg(&self.block_table)
            .arg(&self.row_len)
            .arg(&self.row_pos)
            .arg(&self.ring_slot)
            .arg(&self.ring_flag)
            .arg(&self.free_list)
            .arg(&self.free_top)
            .arg(&self.err);
        drv(unsafe { b.launch(c1) })?;
        let copy = self.func("dms_fork_copy")?;
        let c2 = LaunchConfig {
            grid_dim: ((s.layers * s.kv_heads) as u32, s.max_blocks_per_row as u32, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        macro_rules! go {
            ($ty:ty) => {
                with_slice!(&self.k_pool, $ty, |kp| with_slice_or!(self.v_pool.as_ref(), kp, $ty, |vp| {
                    let mut b = self.stream.launch_builder(&copy);
                    b.arg(&rows)
                        .arg(&kv)
                        .arg(&d)
                        .arg(&bs)
                        .arg(&mb)
                        .arg(&srci)
                        .arg(&dsti)
                        .arg(&self.block_table)
                        .arg(&self.row_len)
                        .arg(&self.pool_pos)
                        .arg(&kp)
                        .arg(&vp);
                    drv(unsafe { b.launch(c2) })?;
                }))
            };
        }
        if self.dtype == DType::F32 {
            go!(f32)
        } else {
            go!(half::bf16)
        }
        Ok(dst)
    }

    /// Blocks on the device free list (one 4-byte read from the device).
    pub fn free_blocks(&self) -> Result<usize> {
        let top = drv(self.stream.clone_dtoh(&self.free_top))?;
        Ok(top[0].max(0) as usize)
    }
}
