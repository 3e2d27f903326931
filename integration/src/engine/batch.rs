//! Serving a batch of requests on whatever the engine's model runs on: what `ab`, `eval` and
//! `bench` call. On a CUDA model, requests whose policy has a device program run together through
//! the scheduler on the device cache, each with its own program; the rest, and everything on the
//! CPU, through the scheduler on the host store.

use anyhow::{bail, Result};
use dms_policy::SignalNeed;

use super::scheduler::{run_batch, BatchStats, Finished, Request};
use super::{Engine, GenParams};
use crate::model::DecisionSource;

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
    if engine.model.device().is_cuda() {
        device_adapter(engine, &requests)?;
    }
    #[cfg(feature = "cuda")]
    if engine.model.device().is_cuda() {
        return device::run_requests(engine, requests, params, max_batch, keep_logits, progress);
    }
    run_batch(engine, requests, params, max_batch, keep_logits, progress)
}

/// The device cache hands the model no per-sequence adapters: the learned requests it runs (those
/// with a device program) must read the same adapter, which becomes the model's default (an error names the
/// adapters otherwise). Its LoRA, if it has one, would adapt every sequence of the device batch, so
/// then every request with a device program must read it (an error otherwise).
fn device_adapter(engine: &mut Engine, requests: &[Request]) -> Result<()> {
    let on_device: Vec<&Request> = requests.iter().filter(|r| r.policy.device_program().is_ok()).collect();
    let reads = |r: &Request| r.policy.signal_need() == SignalNeed::DecisionScores;
    let mut keys: Vec<Option<&str>> = on_device.iter().filter(|r| reads(r)).map(|r| r.policy.adapter()).collect();
    keys.sort();
    keys.dedup();
    match keys.as_slice() {
        [] => Ok(()),
        [key] if matches!(engine.model.decision_source(), DecisionSource::Adapter) => {
            engine.model.set_default_adapter(*key)?;
            if engine.model.adapter_has_lora(*key)? && on_device.iter().any(|r| !reads(r)) {
                bail!(
                    "on a CUDA device, the LoRA of adapter {key:?} would reach every request of the batch: requests \
                     whose policies do not read that adapter cannot run beside it yet: run them separately"
                );
            }
            Ok(())
        }
        [_] => Ok(()),
        _ => bail!(
            "on a CUDA device, requests whose policies read different adapters ({keys:?}) cannot run in one batch \
             yet: run them separately"
        ),
    }
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
            let store = &engine.store;
            let budget = store.capacity_blocks() as u64 * store.block_size() as u64 * store.slot_bytes();
            let device_slot = engine.model.config().row_bytes(engine.model.dtype().size_in_bytes());
            let longest = on_device.iter().map(|r| r.prompt.len() + r.max_new(params)).max().unwrap_or(1);
            let shape = DeviceBatchShape {
                block_size: store.block_size(),
                capacity_blocks: (budget / (store.block_size() as u64 * device_slot)) as usize,
                max_batch: max_batch.min(on_device.len()).max(1),
                max_tokens_per_sequence: longest,
                max_window,
            };
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

#[cfg(test)]
mod tests {
    use std::path::Path;

    use candle_core::Device;
    use dms_policy::Registry;

    use super::*;
    use crate::engine::load_model;
    use crate::model::lora::{AttentionLora, LoraTarget};
    use crate::model::{WeightForm, Weights};

    /// The separate-alpha fixture with its own decision weights attached again as adapters `a`
    /// and `b`, and a request whose policy reads `adapter`.
    fn setup() -> (Engine, impl Fn(&str) -> Request) {
        let dir =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/qwen3_dms_tiny/variant_separate_alpha/model");
        let mut loaded = load_model(&dir, &Device::Cpu, WeightForm::Dense).unwrap();
        let w = Weights::open_safetensors_dir(&dir).unwrap();
        for key in ["a", "b"] {
            loaded.model.attach_adapter(key, &w, false, false).unwrap();
        }
        let full = Registry::with_builtins().build(&toml::from_str("name = 'full'").unwrap()).unwrap();
        let engine = Engine::new(loaded.model, full, 4, 64).unwrap();
        let request = |table: &str| Request {
            id: 0,
            prompt: vec![1, 2, 3],
            forced: None,
            policy: Registry::with_builtins().build(&toml::from_str(table).unwrap()).unwrap(),
            params: None,
        };
        (engine, request)
    }

    /// Learned requests reading two adapters cannot share the device's one default; one adapter
    /// (beside requests that read none) becomes it; an adapter the model lacks is named.
    #[test]
    fn a_device_run_reads_one_adapter() {
        let (mut engine, request) = setup();
        let mixed =
            [request("name = 'dms'\nwindow = 2\nadapter = 'a'"), request("name = 'dms'\nwindow = 2\nadapter = 'b'")];
        let e = format!("{:#}", device_adapter(&mut engine, &mixed).unwrap_err());
        assert!(e.contains("different adapters") && e.contains("\"a\"") && e.contains("\"b\""), "{e}");
        let one = [
            request("name = 'full'"),
            request("name = 'dms'\nwindow = 2\nadapter = 'b'"),
            request("name = 'dms'\nwindow = 2\nadapter = 'b'"),
        ];
        device_adapter(&mut engine, &one).unwrap();
        let missing = [request("name = 'dms'\nwindow = 2\nadapter = 'c'")];
        let e = format!("{:#}", device_adapter(&mut engine, &missing).unwrap_err());
        assert!(e.contains("`c`"), "{e}");
    }

    /// A LoRA on the device's one adapter would reach every sequence of the batch: requests that
    /// do not read it cannot run beside it.
    #[test]
    fn a_lora_adapter_runs_on_the_device_only_beside_requests_that_read_it() {
        let (mut engine, request) = setup();
        let cfg = engine.model.config().clone();
        let zero = |shape: (usize, usize)| candle_core::Tensor::zeros(shape, candle_core::DType::F32, &Device::Cpu);
        let layers = (0..cfg.num_layers)
            .map(|_| {
                LoraTarget::ALL.map(|t| {
                    let (out, inp) = t.dims(&cfg);
                    (zero((2, inp)).unwrap(), zero((out, 2)).unwrap())
                })
            })
            .collect();
        engine.model.attach_lora("b", AttentionLora::new(layers, 1.0)).unwrap();
        let learned = || request("name = 'dms'\nwindow = 2\nadapter = 'b'");
        device_adapter(&mut engine, &[learned(), learned()]).unwrap();
        device_adapter(&mut engine, &[request("name = 'full'"), request("name = 'dms'\nwindow = 2\nadapter = 'a'")])
            .unwrap();
        let e = format!("{:#}", device_adapter(&mut engine, &[learned(), request("name = 'full'")]).unwrap_err());
        assert!(e.contains("LoRA of adapter Some(\"b\")") && e.contains("run them separately"), "{e}");
    }
}
