//! A device-resident paged KV cache whose DMS bookkeeping runs on the
//! GPU (no host round trip per layer), and split-K paged decode attention over rows of different
//! lengths. The element type is f32 (checks) or bf16 (benchmarks).

use anyhow::{anyhow, bail, Context, Result};
use candle_core::cuda_backend::cudarc::driver::{CudaFunction, CudaSlice, CudaStream, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::CudaDevice;
use candle_core::{DType, Device, Storage, Tensor};
use dms_policy::FlagSource;
use std::sync::Arc;

use crate::gpu::policy::DevicePolicy;

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/dms_kernels.ptx"));
const MODULE: &str = "dms_kernels";
const MAX_GQA: usize = 8;
/// Most splits per row of the decode attention.
const MAX_SPLITS: usize = 64;

/// Bytes of one sequence's program as the kernels read it.
const PROGRAM_BYTES: usize = 40;

/// One sequence's program as the kernels read it (`SeqProgram` in `kernels.cu`): mode (0 none,
/// 1 random, 2 learned or key-norm, which read the step's raw signal alike, 3 all), ring length
/// W + 1, seed, rate, scale, offset, sinks, 4 unused bytes.
fn program_bytes(p: &DevicePolicy) -> [u8; PROGRAM_BYTES] {
    let (mode, seed, rate, scale, offset): (i32, u64, f64, f32, f32) = match p.flags {
        FlagSource::None => (0, 0, 0.0, 0.0, 0.0),
        FlagSource::All => (3, 0, 0.0, 0.0, 0.0),
        FlagSource::Random { seed, rate } => (1, seed, rate, 0.0, 0.0),
        FlagSource::Learned { scale, offset } | FlagSource::KeyNorm { scale, offset } => (2, 0, 0.0, scale, offset),
    };
    let sinks = i32::try_from(p.sinks).unwrap_or(i32::MAX);
    let mut out = [0u8; PROGRAM_BYTES];
    out[0..4].copy_from_slice(&mode.to_le_bytes());
    out[4..8].copy_from_slice(&((p.window + 1) as i32).to_le_bytes());
    out[8..16].copy_from_slice(&seed.to_le_bytes());
    out[16..24].copy_from_slice(&rate.to_le_bytes());
    out[24..28].copy_from_slice(&scale.to_le_bytes());
    out[28..32].copy_from_slice(&offset.to_le_bytes());
    out[32..36].copy_from_slice(&sinks.to_le_bytes());
    out
}

/// Which first-pass decode-attention kernel [`GpuCache::attend`] launches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttnKernel {
    /// Block-synchronous tiles of 128 keys (scores, softmax, values, with a barrier between).
    Tiled,
    /// Independent warps, each with its own online softmax and all of a pass's loads in flight.
    Warps,
    /// Tiles streamed into shared memory by asynchronous copies (`cp.async`, sm_80+),
    /// double-buffered, so the next tile's loads overlap this tile's arithmetic.
    Async,
}

/// Which first-pass kernel [`GpuCache::attend`] launches over latent (MLA) rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LatentKernel {
    /// Blocks of up to 8 query heads on CUDA cores, each block reading the row
    /// (`dms_mla_partial`).
    HeadGroups,
    /// Blocks of 16 query heads on tensor cores, the row read once for all of them
    /// (`dms_mla_mma_bf16`). Only for bf16 rows with a width of at most 576 and values of at
    /// most 512, multiples of 8; other shapes use [`LatentKernel::HeadGroups`].
    TensorCores,
}

/// Launch settings of the decode attention.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttnTuning {
    /// First-pass kernel over per-head rows.
    pub kernel: AttnKernel,
    /// First-pass kernel over latent rows.
    pub latent: LatentKernel,
    /// Blocks the grid aims for (rows x splits); each split keeps at least 128 keys (64 for
    /// latent rows). 0 = tail-aware: the split count that fills whole waves of the blocks the
    /// kernel keeps resident ([`crate::gpu::split_plan::tail_aware_splits`]).
    pub target_blocks: usize,
}

impl Default for AttnTuning {
    /// The setting measured best on the H200 (`dms-gpu tune`, 2026-11-28): tiled kernel,
    /// tail-aware splits. Llama-3.1-8B, 32K, DMS CR 8 at the memory limit: 63.0 ms a step
    /// against 79.3 ms with a fixed 1056-block grid and 67.5 ms with the warps kernel.
    fn default() -> Self {
        Self { kernel: AttnKernel::Tiled, latent: LatentKernel::HeadGroups, target_blocks: 0 }
    }
}

fn drv<T, E: std::fmt::Debug>(r: std::result::Result<T, E>) -> Result<T> {
    r.map_err(|e| anyhow!("CUDA driver: {e:?}"))
}

/// Shape of a device cache.
#[derive(Debug, Clone, Copy)]
pub struct GpuCacheShape {
    /// Decoder layers.
    pub layers: usize,
    /// Sequences decoded together.
    pub batch: usize,
    /// KV heads per layer.
    pub kv_heads: usize,
    /// Head width.
    pub head_dim: usize,
    /// Slots per block.
    pub block_size: usize,
    /// Longest DMS delay W a sequence's program may have (rings of W + 1 tokens per row); any
    /// value for full caches only.
    pub window: usize,
    /// Most blocks one row may hold.
    pub max_blocks_per_row: usize,
    /// Blocks in the shared pool.
    pub num_blocks: usize,
    /// `Some(rank)`: latent rows (MLA, `kv_heads = 1`): each key row is `c_kv` then the rotated
    /// `k_pe`, the values are its first `rank` floats, and there is no V pool. `None`: per-head
    /// K/V of `head_dim` each.
    pub latent_rank: Option<usize>,
}

impl GpuCacheShape {
    /// Rows per layer.
    pub fn rows(&self) -> usize {
        self.batch * self.kv_heads
    }
    /// Bytes of K+V per slot for an element type (the key row alone for latent rows).
    pub fn slot_bytes(&self, dtype: DType) -> u64 {
        let pools = if self.latent_rank.is_some() { 1 } else { 2 };
        (pools * self.head_dim * dtype.size_in_bytes()) as u64
    }

    /// Checks what the kernels need of the widths.
    fn validate(&self, dtype: DType) -> Result<()> {
        let vec = 16 / dtype.size_in_bytes();
        let d = self.head_dim;
        if d == 0 || !d.is_multiple_of(vec) {
            bail!("head_dim {d} unsupported by the GPU cache (a positive multiple of {vec} in {dtype:?})");
        }
        match self.latent_rank {
            None if d > 256 => bail!("head_dim {d} unsupported by the decode kernel (at most 256)"),
            None => Ok(()),
            Some(r) => {
                if self.kv_heads != 1 {
                    bail!("latent rows need kv_heads = 1, got {}", self.kv_heads);
                }
                if d > 1024 || r == 0 || r > d || r % vec != 0 || r / vec > 128 {
                    bail!(
                        "latent row width {d} / rank {r} unsupported by the MLA decode kernel (row at most 1024, \
                         rank a positive multiple of {vec} of at most {} in {dtype:?})",
                        128 * vec
                    );
                }
                Ok(())
            }
        }
    }
}

/// Runs `$body` with `$s` bound to the slice of the optional tensor `$t`, or, when it is `None`,
/// to a view of the slice `$same` already borrowed: latent rows have no V pool and no values of
/// their own, so the kernels get the key pointers twice (and then touch the keys only). A tensor
/// is never borrowed twice.
macro_rules! with_slice_or {
    ($t:expr, $same:ident, $ty:ty, |$s:ident| $body:expr) => {{
        match $t {
            Some(t) => with_slice!(t, $ty, |$s| $body),
            None => {
                let $s = $same.slice(0..);
                $body
            }
        }
    }};
}

/// The device cache: pools, block tables, per-row lengths and DMS rings.
pub struct GpuCache {
    dev: CudaDevice,
    stream: Arc<CudaStream>,
    dtype: DType,
    /// Shape.
    pub shape: GpuCacheShape,
    k_pool: Tensor,
    v_pool: Option<Tensor>,
    block_table: CudaSlice<i32>,
    row_len: CudaSlice<i32>,
    row_pos: CudaSlice<i32>,
    ring_slot: CudaSlice<i32>,
    ring_flag: CudaSlice<u8>,
    pool_pos: CudaSlice<i32>,
    free_list: CudaSlice<i32>,
    free_top: CudaSlice<i32>,
    err: CudaSlice<i32>,
    /// Passed as the scores of decode steps without learned decisions (never read).
    no_scores: CudaSlice<f32>,
    part_acc: CudaSlice<f32>,
    part_m: CudaSlice<f32>,
    part_l: CudaSlice<f32>,
    /// Bumped whenever the split-K partial buffers are reallocated: a captured step that
    /// recorded the old ones is stale.
    workspace_generation: u64,
    tuning: AttnTuning,
    /// Sequences in the cache: they hold slots `0..active`, and decode steps cover their rows.
    active: usize,
    /// What each slot's sequence executes (its policy's device program).
    programs: Vec<DevicePolicy>,
    /// `programs` on the device, [`program_bytes`] per slot, rewritten before a step after a change.
    programs_dev: CudaSlice<u8>,
    programs_dirty: bool,
    /// Blocks resident at once per first-pass kernel, for `target_blocks = 0` (driver queries,
    /// once each).
    resident_blocks: std::collections::HashMap<String, usize>,
}

/// Host-side initial state of every row (for synthetic benchmark caches).
pub struct RowInit {
    /// Slots in use per row (`layers * rows`).
    pub len: Vec<i32>,
    /// Tokens seen per row.
    pub pos: Vec<i32>,
    /// Ring contents (slot, flag) per row, `wc` entries, ring index = position % wc.
    pub ring_slot: Vec<i32>,
    /// Flags per ring entry.
    pub ring_flag: Vec<u8>,
}

fn cuda_dev(device: &Device) -> Result<CudaDevice> {
    match device {
        Device::Cuda(d) => Ok(d.clone()),
        _ => bail!("the GPU cache needs a CUDA device"),
    }
}

/// Borrow the CUDA slice of a contiguous tensor as (storage guard) and run `f` with it.
macro_rules! with_slice {
    ($t:expr, $ty:ty, |$s:ident| $body:expr) => {{
        let t = $t;
        if !t.is_contiguous() {
            bail!("tensor must be contiguous");
        }
        let (st, layout) = t.storage_and_layout();
        let Storage::Cuda(cs) = &*st else { bail!("tensor is not on a CUDA device") };
        let full = cs.as_cuda_slice::<$ty>().map_err(|e| anyhow!("{e}"))?;
        let $s = full.slice(layout.start_offset()..);
        $body
    }};
}

mod attend;
mod slots;

impl GpuCache {
    /// An empty cache (every row holds nothing) in `dtype` (f32 or bf16).
    pub fn new(device: &Device, dtype: DType, shape: GpuCacheShape) -> Result<Self> {
        let n_rows = shape.layers * shape.rows();
        let wc = shape.window + 1;
        let init = RowInit {
            len: vec![0; n_rows],
            pos: vec![0; n_rows],
            ring_slot: vec![0; n_rows * wc],
            ring_flag: vec![0; n_rows * wc],
        };
        Self::with_rows(device, dtype, shape, init)
    }

    /// A cache whose rows start in the given state; each row's slots occupy consecutive blocks.
    pub fn with_rows(device: &Device, dtype: DType, shape: GpuCacheShape, init: RowInit) -> Result<Self> {
        if !matches!(dtype, DType::F32 | DType::BF16) {
            bail!("GPU cache dtype must be f32 or bf16");
        }
        shape.validate(dtype)?;
        let dev = cuda_dev(device)?;
        let stream = dev.cuda_stream();
        let n_rows = shape.layers * shape.rows();
        let (bs, mb) = (shape.block_size, shape.max_blocks_per_row);
        let mut table = vec![0i32; n_rows * mb];
        let mut next = 0usize;
        for r in 0..n_rows {
            let blocks = (init.len[r] as usize).div_ceil(bs);
            if blocks > mb {
                bail!("row {r} needs {blocks} blocks, more than max_blocks_per_row {mb}");
            }
            for b in 0..blocks {
                table[r * mb + b] = next as i32;
                next += 1;
            }
        }
        if next > shape.num_blocks {
            bail!("initial rows need {next} blocks but the pool has {}", shape.num_blocks);
        }
        let free: Vec<i32> = (next as i32..shape.num_blocks as i32).rev().collect();
        let slots = shape.num_blocks * bs;
        let k_pool = Tensor::zeros((slots, shape.head_dim), dtype, device)?;
        let v_pool = match shape.latent_rank {
            None => Some(Tensor::zeros((slots, shape.head_dim), dtype, device)?),
            Some(_) => None,
        };
        let mut free_list = drv(stream.alloc_zeros::<i32>(shape.num_blocks.max(1)))?;
        if !free.is_empty() {
            drv(stream.memcpy_htod(&free, &mut free_list))?;
        }
        let mut cache = Self {
            block_table: drv(stream.clone_htod(&table))?,
            row_len: drv(stream.clone_htod(&init.len))?,
            row_pos: drv(stream.clone_htod(&init.pos))?,
            ring_slot: drv(stream.clone_htod(&init.ring_slot))?,
            ring_flag: drv(stream.clone_htod(&init.ring_flag))?,
            pool_pos: drv(stream.alloc_zeros::<i32>(slots))?,
            free_list,
            free_top: drv(stream.clone_htod(&[free.len() as i32]))?,
            err: drv(stream.alloc_zeros::<i32>(1))?,
            no_scores: drv(stream.alloc_zeros::<f32>(1))?,
            part_acc: drv(stream.alloc_zeros::<f32>(1))?,
            part_m: drv(stream.alloc_zeros::<f32>(1))?,
            part_l: drv(stream.alloc_zeros::<f32>(1))?,
            workspace_generation: 0,
            tuning: AttnTuning::default(),
            active: shape.batch,
            programs: vec![DevicePolicy { window: shape.window, flags: FlagSource::None, sinks: 0 }; shape.batch],
            programs_dev: drv(stream.alloc_zeros::<u8>(PROGRAM_BYTES * shape.batch.max(1)))?,
            programs_dirty: true,
            resident_blocks: Default::default(),
            dev,
            stream,
            dtype,
            shape,
            k_pool,
            v_pool,
        };
        cache.fill_random(7)?;
        Ok(cache)
    }

    fn suffix(&self) -> &'static str {
        if self.dtype == DType::F32 {
            "f32"
        } else {
            "bf16"
        }
    }

    /// A kernel of the module without an element-type suffix.
    fn kernel(&self, name: &str) -> Result<CudaFunction> {
        Ok(self
            .dev
            .get_or_load_custom_func(name, MODULE, PTX)
            .with_context(|| format!("loading kernel {name}"))?
            .into_cuda_function())
    }

    /// A kernel of the module for the cache's element type.
    fn func(&self, name: &str) -> Result<CudaFunction> {
        self.kernel(&format!("{name}_{}", self.suffix()))
    }

    /// Overwrites both pools with pseudo-random values.
    pub fn fill_random(&mut self, seed: u32) -> Result<()> {
        let f = self.func("dms_fill")?;
        for pool in std::iter::once(&self.k_pool).chain(self.v_pool.as_ref()) {
            let n = pool.elem_count() as i64;
            let cfg = LaunchConfig { grid_dim: (4096, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
            if self.dtype == DType::F32 {
                with_slice!(pool, f32, |s| {
                    let mut b = self.stream.launch_builder(&f);
                    b.arg(&s).arg(&n).arg(&seed);
                    drv(unsafe { b.launch(cfg) })?;
                });
            } else {
                with_slice!(pool, half::bf16, |s| {
                    let mut b = self.stream.launch_builder(&f);
                    b.arg(&s).arg(&n).arg(&seed);
                    drv(unsafe { b.launch(cfg) })?;
                });
            }
        }
        Ok(())
    }

    /// Decides (by each sequence's program), evicts and writes one new token per row of `layer`
    /// for every sequence in the cache. `k_new`/`v_new`: `[sequences, kv_heads, head_dim]`,
    /// contiguous, in the cache dtype (latent rows: `k_new` is the latent row `[batch, 1,
    /// head_dim]` and `v_new` is not read). `scores`: each sequence's raw decision signal f32
    /// `[sequences, kv_heads]` (its decision scores, or for key-norm decisions its keys' norms),
    /// needed when a sequence reads one ([`Self::needs_scores`], [`Self::needs_key_norms`]).
    pub fn update(&mut self, layer: usize, k_new: &Tensor, v_new: &Tensor, scores: Option<&Tensor>) -> Result<()> {
        let s = self.shape;
        let rows = self.active * s.kv_heads;
        if layer >= s.layers {
            bail!("layer {layer} outside the cache ({} layers)", s.layers);
        }
        if k_new.dims() != [self.active, s.kv_heads, s.head_dim]
            || (s.latent_rank.is_none() && v_new.dims() != k_new.dims())
        {
            bail!(
                "new K/V have shapes {:?} / {:?}, expected [{}, {}, {}]",
                k_new.dims(),
                v_new.dims(),
                self.active,
                s.kv_heads,
                s.head_dim
            );
        }
        // Latent rows: the values are part of the key row, so the kernel never reads `v_new`.
        let v_sep = if s.latent_rank.is_some() { None } else { Some(v_new) };
        let f = self.func("dms_decode_update")?;
        // Learned and key-norm decisions read `scores [batch, kv_heads]`; the other modes never
        // read the pointer.
        let scores = match scores {
            Some(scores) => {
                if scores.dims() != [self.active, s.kv_heads] || scores.dtype() != DType::F32 {
                    bail!(
                        "decision scores are {:?} {:?}, expected f32 [{}, {}]",
                        scores.dtype(),
                        scores.dims(),
                        self.active,
                        s.kv_heads
                    );
                }
                Some(scores.contiguous()?)
            }
            None if self.needs_scores() || self.needs_key_norms() => {
                bail!("a sequence decides by a raw signal (learned scores or key norms) but the step has none")
            }
            None => None,
        };
        self.upload_programs()?;
        let no_scores = &self.no_scores;
        let (kv, d, bs, wc, mb, li) = (
            s.kv_heads as i32,
            s.head_dim as i32,
            s.block_size as i32,
            (s.window + 1) as i32,
            s.max_blocks_per_row as i32,
            layer as i32,
        );
        let ro = layer * s.rows();
        let table = self.block_table.slice(ro * s.max_blocks_per_row..(ro + rows) * s.max_blocks_per_row);
        let lens = self.row_len.slice(ro..ro + rows);
        let pos = self.row_pos.slice(ro..ro + rows);
        let rs = self.ring_slot.slice(ro * (s.window + 1)..(ro + rows) * (s.window + 1));
        let rf = self.ring_flag.slice(ro * (s.window + 1)..(ro + rows) * (s.window + 1));
        let cfg =
            LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (s.head_dim as u32, 1, 1), shared_mem_bytes: 0 };
        macro_rules! go {
            ($ty:ty) => {
                with_slice!(k_new, $ty, |kn| with_slice_or!(v_sep, kn, $ty, |vn| with_slice!(
                    &self.k_pool,
                    $ty,
                    |kp| with_slice_or!(self.v_pool.as_ref(), kp, $ty, |vp| with_slice_or!(
                        scores.as_ref(),
                        no_scores,
                        f32,
                        |sc| {
                            let mut b = self.stream.launch_builder(&f);
                            b.arg(&kv)
                                .arg(&d)
                                .arg(&bs)
                                .arg(&wc)
                                .arg(&mb)
                                .arg(&li)
                                .arg(&kn)
                                .arg(&vn)
                                .arg(&kp)
                                .arg(&vp)
                                .arg(&table)
                                .arg(&lens)
                                .arg(&pos)
                                .arg(&rs)
                                .arg(&rf)
                                .arg(&self.pool_pos)
                                .arg(&self.free_list)
                                .arg(&self.free_top)
                                .arg(&self.err)
                                .arg(&self.programs_dev)
                                .arg(&sc);
                            drv(unsafe { b.launch(cfg) })?;
                        }
                    ))
                )))
            };
        }
        if self.dtype == DType::F32 {
            go!(f32)
        } else {
            go!(half::bf16)
        }
        Ok(())
    }

    /// Sets what the sequence in `slot` executes; its window may not exceed the cache's rings.
    pub fn set_program(&mut self, slot: usize, program: DevicePolicy) -> Result<()> {
        if slot >= self.shape.batch {
            bail!("slot {slot} outside the cache ({} slots)", self.shape.batch);
        }
        if program.window > self.shape.window {
            bail!(
                "a DMS window of {} does not fit the device cache's rings (window {} at most)",
                program.window,
                self.shape.window
            );
        }
        if self.programs[slot] != program {
            self.programs[slot] = program;
            self.programs_dirty = true;
        }
        Ok(())
    }

    /// Sets every slot's program (caches whose sequences all run one policy).
    pub fn set_all_programs(&mut self, program: DevicePolicy) -> Result<()> {
        (0..self.shape.batch).try_for_each(|slot| self.set_program(slot, program))
    }

    /// What the sequence in `slot` executes.
    pub fn program(&self, slot: usize) -> DevicePolicy {
        self.programs[slot]
    }

    /// Whether a sequence in the cache has learned decisions (decode steps then need scores).
    pub fn needs_scores(&self) -> bool {
        self.programs[..self.active].iter().any(|p| p.flags.needs_scores())
    }

    /// Whether a sequence in the cache decides by its keys' norms (decode steps then need them).
    pub fn needs_key_norms(&self) -> bool {
        self.programs[..self.active].iter().any(|p| p.flags.needs_key_norms())
    }

    /// Writes the slots' programs to the device when they changed (a replayed step reads them
    /// there, so it runs this first).
    pub(crate) fn upload_programs(&mut self) -> Result<()> {
        if self.programs_dirty {
            let bytes: Vec<u8> = self.programs.iter().flat_map(program_bytes).collect();
            drv(self.stream.memcpy_htod(&bytes, &mut self.programs_dev))?;
            self.programs_dirty = false;
        }
        Ok(())
    }

    /// Which generation of the decode-attention workspace the cache holds (a CUDA graph captured
    /// with another one reads freed buffers).
    pub fn workspace_generation(&self) -> u64 {
        self.workspace_generation
    }

    /// Sets the decode-attention launch settings.
    pub fn set_tuning(&mut self, tuning: AttnTuning) {
        self.tuning = tuning;
    }

    /// Element type of the pools.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Stores a prompt of sequence `seq` in `layer` (rule 4.2): keys and values `[T, kv_heads,
    /// head_dim]` (contiguous, cache dtype), flags `[T, kv_heads]` f32 (1 = flagged, from
    /// [`crate::model::prefill::prompt_flags`]). Keeps every unflagged token and the last W + 1 tokens
    /// (W of the sequence's program),
    /// which enter the ring with their flags; the sequence's rows of this layer must be empty.
    /// Two kernels, no host round trip. Latent rows: `k` is `[T, 1, head_dim]`, `v` is not read.
    pub fn insert_prompt(&mut self, layer: usize, seq: usize, k: &Tensor, v: &Tensor, flags: &Tensor) -> Result<()> {
        let s = self.shape;
        let (t, kv, d) = k.dims3()?;
        if layer >= s.layers || seq >= self.active {
            bail!("layer {layer} / sequence {seq} outside the cache ({} layers, {} sequences)", s.layers, self.active);
        }
        let latent = s.latent_rank.is_some();
        if kv != s.kv_heads || d != s.head_dim || (!latent && v.dims() != k.dims()) || t == 0 {
            bail!(
                "prompt K/V have shapes {:?} / {:?}, expected [T >= 1, {}, {}]",
                k.dims(),
                v.dims(),
                s.kv_heads,
                s.head_dim
            );
        }
        let v_sep = if latent { None } else { Some(v) };
        if k.dtype() != self.dtype || (!latent && v.dtype() != self.dtype) {
            bail!("prompt K/V are {:?}, the cache holds {:?}", k.dtype(), self.dtype);
        }
        if flags.dims() != [t, kv] || flags.dtype() != DType::F32 {
            bail!("prompt flags are {:?} {:?}, expected f32 [{t}, {kv}]", flags.dtype(), flags.dims());
        }
        let flags = flags.contiguous()?;
        let rows = s.rows();
        let cap = s.window + 1;
        let wc = self.programs[seq].window + 1;
        let ro = layer * rows;
        let mb = s.max_blocks_per_row;
        let mut dst = drv(self.stream.alloc_zeros::<i64>(t * kv))?;
        let plan = self.kernel("dms_prefill_plan")?;
        let write = self.func("dms_prefill_write")?;
        let (kvi, bs, wci, capi, mbi, seqi, ti, di) =
            (kv as i32, s.block_size as i32, wc as i32, cap as i32, mb as i32, seq as i32, t as i32, d as i32);
        let table = self.block_table.slice(ro * mb..(ro + rows) * mb);
        let lens = self.row_len.slice(ro..ro + rows);
        let pos = self.row_pos.slice(ro..ro + rows);
        let rs = self.ring_slot.slice(ro * cap..(ro + rows) * cap);
        let rf = self.ring_flag.slice(ro * cap..(ro + rows) * cap);
        let c1 = LaunchConfig { grid_dim: (kv as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        with_slice!(&flags, f32, |fl| {
            let mut b = self.stream.launch_builder(&plan);
            b.arg(&kvi)
                .arg(&bs)
                .arg(&wci)
                .arg(&capi)
                .arg(&mbi)
                .arg(&seqi)
                .arg(&ti)
                .arg(&fl)
                .arg(&table)
                .arg(&lens)
                .arg(&pos)
                .arg(&rs)
                .arg(&rf)
                .arg(&self.pool_pos)
                .arg(&self.free_list)
                .arg(&self.free_top)
                .arg(&self.err)
                .arg(&mut dst);
            drv(unsafe { b.launch(c1) })?;
        });
        let c2 = LaunchConfig {
            grid_dim: (t as u32, kv as u32, 1),
            block_dim: (d.min(256) as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        macro_rules! go {
            ($ty:ty) => {
                with_slice!(k, $ty, |ks| with_slice_or!(v_sep, ks, $ty, |vs| with_slice!(
                    &self.k_pool,
                    $ty,
                    |kp| with_slice_or!(self.v_pool.as_ref(), kp, $ty, |vp| {
                        let mut b = self.stream.launch_builder(&write);
                        b.arg(&kvi).arg(&di).arg(&ti).arg(&dst).arg(&ks).arg(&vs).arg(&kp).arg(&vp);
                        drv(unsafe { b.launch(c2) })?;
                    })
                )))
            };
        }
        if self.dtype == DType::F32 {
            go!(f32)
        } else {
            go!(half::bf16)
        }
        Ok(())
    }

    /// Fails if any kernel ran out of blocks or prefilled a non-empty sequence.
    pub fn check(&mut self) -> Result<()> {
        let e = drv(self.stream.clone_dtoh(&self.err))?;
        if e[0] != 0 {
            // Cleared once reported: the failed step's sequences are released, and the cache
            // serves on.
            drv(self.stream.memset_zeros(&mut self.err))?;
        }
        match e[0] {
            0 => {}
            2 => bail!("a prompt was written into rows that already hold tokens (GPU prefill needs an empty sequence)"),
            _ => bail!("the GPU KV cache ran out of blocks"),
        }
        Ok(())
    }

    /// Slots in use per row (`layers * batch * kv_heads`, row = (layer, sequence, kv head)).
    pub fn row_lengths(&self) -> Result<Vec<i32>> {
        drv(self.stream.clone_dtoh(&self.row_len))
    }

    /// Sorted absolute positions held by every row (for checks; downloads the tables).
    pub fn kept_positions(&self) -> Result<Vec<Vec<u32>>> {
        let lens = self.row_lengths()?;
        let table = drv(self.stream.clone_dtoh(&self.block_table))?;
        let pos = drv(self.stream.clone_dtoh(&self.pool_pos))?;
        let (bs, mb) = (self.shape.block_size, self.shape.max_blocks_per_row);
        Ok(lens
            .iter()
            .enumerate()
            .map(|(r, &n)| {
                let mut v: Vec<u32> =
                    (0..n as usize).map(|s| pos[table[r * mb + s / bs] as usize * bs + s % bs] as u32).collect();
                v.sort_unstable();
                v
            })
            .collect())
    }

    /// Keys and values of one row in slot order (for checks; latent rows: the values are the
    /// first `rank` floats of each key row).
    pub fn row_kv(&self, row: usize) -> Result<(Vec<f32>, Vec<f32>)> {
        let lens = self.row_lengths()?;
        let table = drv(self.stream.clone_dtoh(&self.block_table))?;
        let (bs, mb, d) = (self.shape.block_size, self.shape.max_blocks_per_row, self.shape.head_dim);
        let k = self.k_pool.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let v = match &self.v_pool {
            Some(v) => v.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?,
            None => Vec::new(),
        };
        let vw = self.shape.latent_rank.unwrap_or(d);
        let mut ko = Vec::new();
        let mut vo = Vec::new();
        for s in 0..lens[row] as usize {
            let at = (table[row * mb + s / bs] as usize * bs + s % bs) * d;
            ko.extend_from_slice(&k[at..at + d]);
            vo.extend_from_slice(if v.is_empty() { &k[at..at + vw] } else { &v[at..at + d] });
        }
        Ok((ko, vo))
    }

    /// Bytes of K+V in occupied slots.
    pub fn bytes_live(&self) -> Result<u64> {
        let n: i64 = self.row_lengths()?.iter().map(|&x| x as i64).sum();
        Ok(n as u64 * self.shape.slot_bytes(self.dtype))
    }

    /// Waits for the device.
    pub fn synchronize(&self) -> Result<()> {
        drv(self.stream.synchronize())
    }
}
