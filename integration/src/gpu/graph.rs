//! CUDA graphs for decode steps: one step of the cache's running batch captured once and replayed,
//! so a small model's step costs one graph launch instead of a few hundred kernel launches.
//!
//! Capture records, it does not run; a replay re-runs the recorded kernels on the same addresses.
//! So everything a step reads from the host lives in fixed device buffers written before each
//! replay (the embedded tokens and RoPE rows, [`StepInputs`], and the slots' programs); the
//! cache's per-row metadata (lengths, block tables, rings) is already on the device and advanced
//! by its kernels; every intermediate is allocated and freed inside the graph by the
//! stream-ordered allocator; the logits land in a fixed output buffer. What a capture fixes: the
//! batch, each sequence's adapter and whether it reads decision scores, and the attention split
//! plan (rows up to `max_len` keys). A capture that recorded a copy from host memory (an op
//! that uploads its shape, say) is refused: a replay would read that memory after it was freed.
//!
//! The device must be opened with [`graph_device`]: its own stream (the legacy default stream
//! cannot be captured) and no cross-stream event tracking (a capture cannot wait on events
//! recorded before it; the device path runs on one stream).

use std::sync::Arc;

use anyhow::{bail, Context, Result};
use candle_core::cuda_backend::cudarc::driver::sys::{
    self, CUgraphInstantiate_flags, CUgraphMem_attribute, CUgraphNodeType, CUmemorytype, CUstreamCaptureMode,
};
use candle_core::cuda_backend::cudarc::driver::{result, CudaStream};
use candle_core::{CudaDevice, DType, Device, Tensor};
use dms_policy::Pos;

use super::device_step::DeviceStep;
use super::GpuCache;
use crate::model::{Llama, StepInputs};

/// CUDA device `ordinal` ready for captured decode steps: its own stream, event tracking off
/// before anything is allocated on it.
pub fn graph_device(ordinal: usize) -> Result<Device> {
    let dev = CudaDevice::new_with_stream(ordinal)?;
    // SAFETY: nothing is allocated on the device yet, and the device path issues all its work
    // on this one stream, so no cross-stream ordering is lost.
    unsafe { dev.disable_event_tracking() };
    Ok(Device::Cuda(dev))
}

/// Bytes the CUDA-graph memory pool of `device` reserves now: where captured steps keep their
/// intermediates, beside the cache's KV pool and outside its budget (the pool is the device's,
/// shared by every capture on it).
pub fn graph_pool_bytes(device: &Device) -> Result<u64> {
    let Device::Cuda(dev) = device else { bail!("a CUDA-graph memory pool needs a CUDA device") };
    let cu_device = dev.cuda_stream().context().cu_device();
    let attr = CUgraphMem_attribute::CU_GRAPH_MEM_ATTR_RESERVED_MEM_CURRENT;
    let mut bytes = 0u64;
    // SAFETY: a valid device handle; this attribute is a 64-bit value written into `bytes`.
    unsafe { sys::cuDeviceGetGraphMemAttribute(cu_device, attr, (&mut bytes as *mut u64).cast()) }
        .result()
        .map_err(|e| anyhow::anyhow!("reading the CUDA-graph memory pool's size: {e:?}"))?;
    Ok(bytes)
}

/// Nodes of a captured graph by kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GraphNodes {
    /// Kernel launches.
    pub kernels: usize,
    /// Memory copies (device to device; a host copy refuses the capture).
    pub copies: usize,
    /// Memsets.
    pub memsets: usize,
    /// Stream-ordered allocations and frees.
    pub allocations: usize,
    /// Anything else (event nodes, empty nodes).
    pub other: usize,
}

/// A captured graph and its executable (cudarc's own wrapper does not expose the graph, whose
/// nodes the capture check reads).
struct Graph {
    graph: sys::CUgraph,
    exec: sys::CUgraphExec,
    stream: Arc<CudaStream>,
}

impl Drop for Graph {
    fn drop(&mut self) {
        // SAFETY: both handles came from this graph's capture and are destroyed once, here.
        unsafe {
            let _ = result::graph::exec_destroy(self.exec);
            let _ = result::graph::destroy(self.graph);
        }
    }
}

impl Graph {
    /// Ends the capture on `stream` (whatever happened inside it), refuses a graph that copies
    /// from host memory, and instantiates it.
    fn end_capture(stream: &Arc<CudaStream>) -> Result<(Self, GraphNodes)> {
        // SAFETY: the stream is valid and capturing (begun by the caller).
        let graph = unsafe { result::stream::end_capture(stream.cu_stream()) }
            .map_err(|e| anyhow::anyhow!("ending the CUDA graph capture: {e:?}"))?;
        if graph.is_null() {
            bail!("the CUDA graph capture recorded nothing");
        }
        let nodes = match count_nodes(graph) {
            Ok(n) => n,
            Err(e) => {
                // SAFETY: the graph came from the capture above and is not used again.
                unsafe {
                    let _ = result::graph::destroy(graph);
                }
                return Err(e);
            }
        };
        let flags = CUgraphInstantiate_flags::CUDA_GRAPH_INSTANTIATE_FLAG_AUTO_FREE_ON_LAUNCH;
        // SAFETY: a valid graph from the capture.
        let exec = match unsafe { result::graph::instantiate(graph, flags) } {
            Ok(e) => e,
            Err(e) => {
                // SAFETY: as above.
                unsafe {
                    let _ = result::graph::destroy(graph);
                }
                bail!("instantiating the CUDA graph: {e:?}");
            }
        };
        Ok((Self { graph, exec, stream: stream.clone() }, nodes))
    }

    /// Replays the graph on its stream.
    fn launch(&self) -> Result<()> {
        // SAFETY: the executable and the stream live as long as `self`.
        unsafe { result::graph::launch(self.exec, self.stream.cu_stream()) }
            .map_err(|e| anyhow::anyhow!("replaying the CUDA graph: {e:?}"))
    }
}

/// Counts `graph`'s nodes by kind; an error when one copies from or to host memory.
fn count_nodes(graph: sys::CUgraph) -> Result<GraphNodes> {
    let mut n = 0usize;
    // SAFETY: a valid graph; a null node array asks for the count only.
    unsafe { sys::cuGraphGetNodes(graph, std::ptr::null_mut(), &mut n) }
        .result()
        .map_err(|e| anyhow::anyhow!("listing the captured graph's nodes: {e:?}"))?;
    let mut nodes = vec![std::ptr::null_mut(); n];
    // SAFETY: `nodes` holds `n` entries.
    unsafe { sys::cuGraphGetNodes(graph, nodes.as_mut_ptr(), &mut n) }
        .result()
        .map_err(|e| anyhow::anyhow!("listing the captured graph's nodes: {e:?}"))?;
    let mut counts = GraphNodes::default();
    let mut host_copies = 0;
    for &node in &nodes[..n] {
        // Read as the raw enum value: a driver may know node kinds these bindings do not.
        let mut kind = 0u32;
        // SAFETY: a node of the graph; `CUgraphNodeType` is a `u32` enum.
        unsafe { sys::cuGraphNodeGetType(node, (&mut kind as *mut u32).cast::<CUgraphNodeType>()) }
            .result()
            .map_err(|e| anyhow::anyhow!("reading a captured node's kind: {e:?}"))?;
        match kind {
            k if k == CUgraphNodeType::CU_GRAPH_NODE_TYPE_KERNEL as u32 => counts.kernels += 1,
            k if k == CUgraphNodeType::CU_GRAPH_NODE_TYPE_MEMCPY as u32 => {
                counts.copies += 1;
                let mut p = std::mem::MaybeUninit::<sys::CUDA_MEMCPY3D>::zeroed();
                // SAFETY: a memcpy node; `p` is a writable CUDA_MEMCPY3D.
                unsafe { sys::cuGraphMemcpyNodeGetParams(node, p.as_mut_ptr()) }
                    .result()
                    .map_err(|e| anyhow::anyhow!("reading a captured copy: {e:?}"))?;
                let p = p.as_ptr();
                // SAFETY: the driver filled the memory types (read as raw `u32` enum values).
                let (src, dst) = unsafe {
                    (
                        std::ptr::addr_of!((*p).srcMemoryType).cast::<u32>().read(),
                        std::ptr::addr_of!((*p).dstMemoryType).cast::<u32>().read(),
                    )
                };
                let device = CUmemorytype::CU_MEMORYTYPE_DEVICE as u32;
                if src != device || dst != device {
                    host_copies += 1;
                }
            }
            k if k == CUgraphNodeType::CU_GRAPH_NODE_TYPE_MEMSET as u32 => counts.memsets += 1,
            k if k == CUgraphNodeType::CU_GRAPH_NODE_TYPE_MEM_ALLOC as u32
                || k == CUgraphNodeType::CU_GRAPH_NODE_TYPE_MEM_FREE as u32 =>
            {
                counts.allocations += 1
            }
            k if k == CUgraphNodeType::CU_GRAPH_NODE_TYPE_HOST as u32 => host_copies += 1,
            _ => counts.other += 1,
        }
    }
    if host_copies > 0 {
        bail!(
            "the captured step has {host_copies} copies from or to host memory (an op uploads data, such as its \
             shape, on each call), which a replay would read after it was freed ({} kernels captured)",
            counts.kernels
        );
    }
    Ok(counts)
}

/// One captured decode step of a [`GpuCache`]'s running batch.
pub struct CapturedStep {
    graph: Graph,
    inputs: StepInputs,
    logits: Tensor,
    max_len: usize,
    workspace_generation: u64,
    nodes: GraphNodes,
}

impl CapturedStep {
    /// Captures one decode step of every sequence in `cache` (one adapter per sequence, in slot
    /// order), with attention split for rows up to `max_len` keys, on a device opened with
    /// [`graph_device`]. Run one eager step with the same `max_len` first: it sizes the split
    /// buffers and loads the kernels, which a capture cannot do.
    pub fn capture(model: &Llama, cache: &mut GpuCache, adapters: &[Option<&str>], max_len: usize) -> Result<Self> {
        let Device::Cuda(dev) = model.device() else { bail!("a CUDA graph needs a model on a CUDA device") };
        let batch = adapters.len();
        if batch == 0 {
            bail!("a captured step needs at least one sequence");
        }
        let stream = dev.cuda_stream();
        if stream.cu_stream().is_null() || dev.is_event_tracking() {
            bail!("this device cannot capture decode steps: open it with gpu::graph::graph_device");
        }
        cache.upload_programs()?;
        // Placeholder inputs of the step's shape: a capture records their addresses, not values.
        let inputs = model.step_inputs(&vec![0; batch], &vec![0; batch])?;
        let logits = Tensor::zeros((batch, model.config().vocab_size), DType::F32, model.device())?;
        // The output copy's kernel loads now: loading a module inside a capture is not allowed.
        logits.slice_set(&logits.zeros_like()?, 0, 0)?;
        stream.synchronize().map_err(|e| anyhow::anyhow!("synchronizing before a capture: {e:?}"))?;
        let generation = cache.workspace_generation();
        let mode = CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL;
        // SAFETY: the device's own stream, valid for the device's lifetime.
        unsafe { result::stream::begin_capture(stream.cu_stream(), mode) }
            .map_err(|e| anyhow::anyhow!("starting a CUDA graph capture: {e:?}"))?;
        let recorded = (|| -> Result<()> {
            let mut step = DeviceStep::new(cache, adapters, max_len);
            let x = model.forward_prepared(&inputs, &mut step)?;
            logits.slice_set(&model.logits(&x)?.to_dtype(DType::F32)?, 0, 0)?;
            Ok(())
        })();
        // The capture ends whatever happened inside it; errors cudarc stored meanwhile (from
        // calls that could not return one) are taken here, so they do not fail a later call.
        let ended = Graph::end_capture(&stream);
        let stored = stream.context().check_err();
        if cache.workspace_generation() != generation {
            cache.abandon_workspace()?;
            bail!("the captured step grew the attention workspace: run one eager step with max_len {max_len} first");
        }
        recorded.context("recording a decode step into a CUDA graph")?;
        stored.map_err(|e| anyhow::anyhow!("recording a decode step into a CUDA graph: {e:?}"))?;
        let (graph, nodes) = ended?;
        Ok(Self { graph, inputs, logits, max_len, workspace_generation: generation, nodes })
    }

    /// The captured graph's nodes by kind.
    pub fn nodes(&self) -> GraphNodes {
        self.nodes
    }

    /// Whether this capture still fits `cache` (its attention workspace was not reallocated
    /// since); a stale capture must be dropped, never replayed.
    pub fn fits(&self, cache: &GpuCache) -> bool {
        self.workspace_generation == cache.workspace_generation()
    }

    /// One decode step of `cache` (the one captured): each sequence feeds `tokens[i]` at
    /// `positions[i]` (slot order); `longest` is the longest row after the step, at most the
    /// captured `max_len`. Returns the logits `[batch, vocab]` (f32) in the step's output
    /// buffer, which the next step overwrites.
    pub fn step(
        &mut self,
        model: &Llama,
        cache: &mut GpuCache,
        tokens: &[u32],
        positions: &[Pos],
        longest: usize,
    ) -> Result<Tensor> {
        if longest > self.max_len {
            bail!("a row of {longest} keys is longer than the captured step's {} (capture again)", self.max_len);
        }
        if !self.fits(cache) {
            bail!("the cache's attention workspace changed since this step was captured (capture again)");
        }
        let fresh = model.step_inputs(tokens, positions)?;
        if fresh.x.dims() != self.inputs.x.dims() {
            bail!("{} sequences in a step captured for {}", tokens.len(), self.inputs.x.dim(0)?);
        }
        cache.upload_programs()?;
        self.inputs.x.slice_set(&fresh.x, 0, 0)?;
        // No `local_rope` to refresh: Gemma, which has it, runs on the host engine only.
        self.inputs.cos.slice_set(&fresh.cos, 0, 0)?;
        self.inputs.sin.slice_set(&fresh.sin, 0, 0)?;
        self.graph.launch()?;
        Ok(self.logits.clone())
    }
}
