//! Serving a batch of requests on whatever the engine's model runs on: what `ab`, `eval` and
//! `bench` call. On a CUDA model, requests whose policy has a device program run together through
//! the scheduler on the device cache, each with its own program; the rest, and everything on the
//! CPU, through the scheduler on the host store.

use anyhow::Result;

use super::scheduler::{run_batch, BatchStats, Finished, Request};
use super::{Engine, GenParams};

/// Serves `requests` with at most `max_batch` sequences at once (see [`run_batch`]); the device
/// cache, when used, gets the host pool's memory budget in the model's dtype.
pub fn run_requests(
    engine: &mut Engine,
    requests: Vec<Request>,
    params: &GenParams,
    max_batch: usize,
    keep_logits: bool,
    progress: impl FnMut(usize),
) -> Result<(Vec<Finished>, BatchStats)> {
    #[cfg(feature = "cuda")]
    if engine.model.device().is_cuda() {
        return device::run_requests(engine, requests, params, max_batch, keep_logits, progress);
    }
    run_batch(engine, requests, params, max_batch, keep_logits, progress)
}

#[cfg(feature = "cuda")]
mod device {
    use anyhow::Result;

    use super::super::scheduler::{run_batch, BatchStats, Finished, Request};
    use super::super::{Engine, GenParams};
    use crate::gpu::batch::{DeviceBatchShape, DeviceEngine};
    use crate::gpu::policy::DevicePolicy;

    /// [`super::run_requests`] on a CUDA model.
    pub fn run_requests(
        engine: &mut Engine,
        requests: Vec<Request>,
        params: &GenParams,
        max_batch: usize,
        keep_logits: bool,
        mut progress: impl FnMut(usize),
    ) -> Result<(Vec<Finished>, BatchStats)> {
        let mut host = Vec::new();
        let mut on_device: Vec<Request> = Vec::new();
        let mut max_window = 0;
        for r in requests {
            match DevicePolicy::of(r.policy.as_ref()) {
                Ok(p) => {
                    max_window = max_window.max(p.window);
                    on_device.push(r);
                }
                Err(why) => {
                    tracing::info!("request {}: {why:#}; its KV cache stays on the host", r.id);
                    host.push(r);
                }
            }
        }
        let mut stats = BatchStats::default();
        let mut done = Vec::new();
        if !host.is_empty() {
            let (d, s) = run_batch(engine, host, params, max_batch, keep_logits, &mut progress)?;
            done.extend(d);
            stats.absorb(&s);
        }
        if !on_device.is_empty() {
            let longest = on_device.iter().map(|r| r.prompt.len() + r.max_new(params)).max().unwrap_or(1);
            let batch = max_batch.min(on_device.len()).max(1);
            let shape = DeviceBatchShape::with_host_budget(engine, batch, longest, max_window);
            let mut device = DeviceEngine::new(&engine.model, shape)?;
            let already = done.len();
            let (d, s) =
                run_batch(&mut device, on_device, params, shape.max_batch, keep_logits, |n| progress(already + n))?;
            done.extend(d);
            stats.absorb(&s);
        }
        done.sort_by_key(|f| f.id);
        Ok((done, stats))
    }
}
