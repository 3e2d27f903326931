//! Split-K paged decode attention over the cache's rows (per-head and latent) and the merge
//! of the splits.

use super::*;

impl GpuCache {
    /// Blocks of `f` (128 threads per block) resident at once on this device: one full wave.
    fn full_wave(&self, f: &CudaFunction) -> Result<usize> {
        use candle_core::cuda_backend::cudarc::driver::sys::CUdevice_attribute;
        let sms = drv(self.stream.context().attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT))?;
        let per_sm = drv(f.occupancy_max_active_blocks_per_multiprocessor(128, 0, None))?;
        Ok(sms.max(1) as usize * per_sm.max(1) as usize)
    }

    /// Decode attention of `q` (`[sequences, n_heads, head_dim]`, one query per sequence in
    /// the cache) over the rows of `layer`; returns `[sequences, n_heads, head_dim]`, or
    /// `[sequences, n_heads, rank]` for latent rows. `max_len_hint`
    /// bounds the longest row's slot count: it sets the split count (every row is still read to
    /// its real length, so a loose bound only costs empty splits).
    pub fn attend(&mut self, layer: usize, q: &Tensor, scale: f32, max_len_hint: usize) -> Result<Tensor> {
        if layer >= self.shape.layers {
            bail!("layer {layer} outside the cache ({} layers)", self.shape.layers);
        }
        if let Some(rank) = self.shape.latent_rank {
            return self.attend_latent(layer, q, scale, max_len_hint, rank);
        }
        let s = self.shape;
        let rows = self.active * s.kv_heads;
        let (b, nh, d) = q.dims3()?;
        if b != self.active || d != s.head_dim || nh % s.kv_heads != 0 || nh / s.kv_heads > MAX_GQA {
            bail!("query shape {:?} does not fit the cache ({} sequences)", q.dims(), self.active);
        }
        let g = nh / s.kv_heads;
        let vec = 16 / self.dtype.size_in_bytes();
        let nvec = d / vec;
        if d % vec != 0 || 128 % nvec != 0 {
            bail!("head_dim {d} unsupported by the decode kernel (a multiple of {vec}, at most 256, power-of-two vectors)");
        }
        let kernel = self.tuning.kernel;
        if kernel == AttnKernel::Warps && nvec > 16 {
            bail!(
                "head_dim {d} in {:?} is too wide for the warps decode kernel (at most 16 16-byte vectors)",
                self.dtype
            );
        }
        let first = match kernel {
            AttnKernel::Tiled => "dms_decode_partial",
            AttnKernel::Warps => "dms_decode_warps",
            AttnKernel::Async => "dms_decode_async",
        };
        let fp = self.kernel(&format!("{first}_{}_g{g}", self.suffix()))?;
        // At least one 128-key tile per split.
        let splits = self.splits_for(format!("{first}_{}_g{g}", self.suffix()), &fp, rows, max_len_hint, 128)?;
        self.ensure_partials(rows * splits * g, d)?;
        // SAFETY: dms_decode_reduce writes every element (a block per row, a thread per
        // dimension, every head of the row's group), so nothing uninitialised is ever read.
        let out = unsafe { Tensor::empty((b, nh, d), self.dtype, q.device())? };
        let (kv, di, bs, mb) = (s.kv_heads as i32, d as i32, s.block_size as i32, s.max_blocks_per_row as i32);
        let ro = layer * s.rows();
        let table = self.block_table.slice(ro * s.max_blocks_per_row..(ro + rows) * s.max_blocks_per_row);
        let lens = self.row_len.slice(ro..ro + rows);
        let c1 =
            LaunchConfig { grid_dim: (rows as u32, splits as u32, 1), block_dim: (128, 1, 1), shared_mem_bytes: 0 };
        macro_rules! go {
            ($ty:ty) => {
                with_slice!(q, $ty, |qs| with_slice!(&self.k_pool, $ty, |kp| with_slice_or!(
                    self.v_pool.as_ref(),
                    kp,
                    $ty,
                    |vp| {
                        let mut a = self.stream.launch_builder(&fp);
                        a.arg(&kv)
                            .arg(&di)
                            .arg(&bs)
                            .arg(&mb)
                            .arg(&scale)
                            .arg(&qs)
                            .arg(&kp)
                            .arg(&vp)
                            .arg(&table)
                            .arg(&lens)
                            .arg(&self.part_acc)
                            .arg(&self.part_m)
                            .arg(&self.part_l);
                        drv(unsafe { a.launch(c1) })?;
                    }
                )))
            };
        }
        if self.dtype == DType::F32 {
            go!(f32)
        } else {
            go!(half::bf16)
        }
        self.merge_splits(s.kv_heads, g, d, splits, &out)?;
        Ok(out)
    }

    /// Splits per row of a first-pass kernel (`key`) over `units` (row, head group) pairs whose
    /// longest row is `max_len` keys, each split at least `min_keys` long: the tuning's grid
    /// target over `units`, or with `target_blocks = 0` the tail-aware choice
    /// ([`crate::gpu::split_plan::tail_aware_splits`]) for the blocks this kernel keeps resident.
    fn splits_for(
        &mut self,
        key: String,
        f: &CudaFunction,
        units: usize,
        max_len: usize,
        min_keys: usize,
    ) -> Result<usize> {
        // The merge reads every split's partials in a loop: past 64 splits it costs more than
        // the parallelism gains (measured on the H200: MLA at batch 1 with 512 splits).
        let cap = max_len.div_ceil(min_keys).clamp(1, MAX_SPLITS);
        Ok(match self.tuning.target_blocks {
            0 => {
                let resident = match self.resident_blocks.get(&key) {
                    Some(&n) => n,
                    None => {
                        let n = self.full_wave(f)?;
                        self.resident_blocks.insert(key, n);
                        n
                    }
                };
                crate::gpu::split_plan::tail_aware_splits(units, max_len, resident, cap, 64)
            }
            n => (n / units.max(1)).clamp(1, cap),
        })
    }

    /// Replaces the split-K partial buffers with empty ones (the next attention sizes them
    /// again) after a capture that grew them: the grown ones are addresses of a graph that never
    /// ran, so they are forgotten, not freed.
    pub(crate) fn abandon_workspace(&mut self) -> Result<()> {
        let fresh = || drv(self.stream.alloc_zeros::<f32>(1));
        let (acc, m, l) = (fresh()?, fresh()?, fresh()?);
        std::mem::forget(std::mem::replace(&mut self.part_acc, acc));
        std::mem::forget(std::mem::replace(&mut self.part_m, m));
        std::mem::forget(std::mem::replace(&mut self.part_l, l));
        self.workspace_generation += 1;
        Ok(())
    }

    /// Makes the split-K partial buffers hold `entries` (row, split, head) results of `width`.
    fn ensure_partials(&mut self, entries: usize, width: usize) -> Result<()> {
        if self.part_m.len() < entries || self.part_acc.len() < entries * width {
            self.part_acc = drv(self.stream.alloc_zeros::<f32>(entries * width))?;
            self.part_m = drv(self.stream.alloc_zeros::<f32>(entries))?;
            self.part_l = drv(self.stream.alloc_zeros::<f32>(entries))?;
            self.workspace_generation += 1;
        }
        Ok(())
    }

    /// [`Self::attend`] over latent rows (MLA): `q` `[batch, heads, head_dim]` (absorbed queries),
    /// output `[batch, heads, rank]` (the attention-weighted `c_kv`).
    fn attend_latent(
        &mut self,
        layer: usize,
        q: &Tensor,
        scale: f32,
        max_len_hint: usize,
        rank: usize,
    ) -> Result<Tensor> {
        let s = self.shape;
        let (b, nh, d) = q.dims3()?;
        if b != self.active || d != s.head_dim || nh == 0 {
            bail!(
                "query shape {:?} does not fit the latent cache ([{}, heads, {}])",
                q.dims(),
                self.active,
                s.head_dim
            );
        }
        let mma = self.tuning.latent == LatentKernel::TensorCores
            && self.dtype == DType::BF16
            && d <= 576
            && d.is_multiple_of(8)
            && rank <= 512
            && rank.is_multiple_of(8);
        let (key, groups) = if mma {
            ("dms_mla_mma_bf16".to_string(), nh.div_ceil(16))
        } else {
            let hg = [8, 4, 2, 1].into_iter().find(|g| nh % g == 0).expect("1 divides");
            (format!("dms_mla_partial_{}_h{hg}", self.suffix()), nh / hg)
        };
        let fp = self.kernel(&key)?;
        // At least one 64-key tile per split.
        let splits = self.splits_for(key, &fp, b * groups, max_len_hint, 64)?;
        self.ensure_partials(b * splits * nh, rank)?;
        // SAFETY: dms_decode_reduce writes every element (a block per sequence, a thread per
        // latent dimension, every head), so nothing uninitialised is ever read.
        let out = unsafe { Tensor::empty((b, nh, rank), self.dtype, q.device())? };
        let (nhi, di, ri, bs, mb) =
            (nh as i32, d as i32, rank as i32, s.block_size as i32, s.max_blocks_per_row as i32);
        let ro = layer * s.rows();
        let table = self.block_table.slice(ro * s.max_blocks_per_row..(ro + b) * s.max_blocks_per_row);
        let lens = self.row_len.slice(ro..ro + b);
        let c1 = LaunchConfig {
            grid_dim: (b as u32, splits as u32, groups as u32),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        macro_rules! go {
            ($ty:ty) => {
                with_slice!(q, $ty, |qs| with_slice!(&self.k_pool, $ty, |kp| {
                    let mut a = self.stream.launch_builder(&fp);
                    a.arg(&nhi)
                        .arg(&di)
                        .arg(&ri)
                        .arg(&bs)
                        .arg(&mb)
                        .arg(&scale)
                        .arg(&qs)
                        .arg(&kp)
                        .arg(&table)
                        .arg(&lens)
                        .arg(&self.part_acc)
                        .arg(&self.part_m)
                        .arg(&self.part_l);
                    drv(unsafe { a.launch(c1) })?;
                }))
            };
        }
        if self.dtype == DType::F32 {
            go!(f32)
        } else {
            go!(half::bf16)
        }
        self.merge_splits(1, nh, rank, splits, &out)?;
        Ok(out)
    }

    /// Second pass of the decode attention: merges the `splits` partial results of each of the
    /// `out.dim(0) * kv_heads` rows (`g_heads` query heads of `width` each) into `out`.
    fn merge_splits(&self, kv_heads: usize, g_heads: usize, width: usize, splits: usize, out: &Tensor) -> Result<()> {
        let rows = out.dim(0)? * kv_heads;
        let fr = self.func("dms_decode_reduce")?;
        let (kv, g, w, sp) = (kv_heads as i32, g_heads as i32, width as i32, splits as i32);
        // One thread per output dimension, in whole warps.
        let cfg = LaunchConfig {
            grid_dim: (rows as u32, g_heads as u32, 1),
            block_dim: (width.div_ceil(32) as u32 * 32, 1, 1),
            shared_mem_bytes: 0,
        };
        macro_rules! go {
            ($ty:ty) => {
                with_slice!(out, $ty, |os| {
                    let mut r = self.stream.launch_builder(&fr);
                    r.arg(&kv)
                        .arg(&g)
                        .arg(&w)
                        .arg(&sp)
                        .arg(&self.part_acc)
                        .arg(&self.part_m)
                        .arg(&self.part_l)
                        .arg(&os);
                    drv(unsafe { r.launch(cfg) })?;
                })
            };
        }
        if self.dtype == DType::F32 {
            go!(f32)
        } else {
            go!(half::bf16)
        }
        Ok(())
    }
}
