//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::QTensor;
use candle_core::{Device, Tensor};
use dms_integration::engine::from_config::resolve_policy_table;
use dms_integration::engine::{argmax, load_model, Engine, GenParams};
use dms_integration::model::WeightForm;
use dms_policy::{
    CacheShape, CompactPlan, EvictPlan, PolicyError, PolicyFactory, Pos, Registry, RowRef, SequencePolicy, SignalNeed,
};

/// Path of a fixture folder inside the repository.
pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

/// Loads a golden safetensors file (f32 as f32; i8/i32/i64 as i64).
pub fn golden(path: &Path) -> HashMap<String, Tensor> {
    use safetensors::Dtype;
    let bytes = std::fs::read(path).expect("golden file");
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("golden file parses");
    st.tensors()
        .into_iter()
        .map(|(name, v)| {
            let d = v.data();
            let shape = v.shape().to_vec();
            let t = match v.dtype() {
                Dtype::F32 => {
                    let x: Vec<f32> = d.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
                    Tensor::from_vec(x, shape, &Device::Cpu)
                }
                Dtype::I8 => {
                    Tensor::from_vec(d.iter().map(|&b| b as i8 as i64).collect::<Vec<_>>(), shape, &Device::Cpu)
                }
                Dtype::I32 => {
                    let x: Vec<i64> =
                        d.chunks_exact(4).map(|c| i32::from_le_bytes(c.try_into().unwrap()) as i64).collect();
                    Tensor::from_vec(x, shape, &Device::Cpu)
                }
                Dtype::I64 => {
                    let x: Vec<i64> = d.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap())).collect();
                    Tensor::from_vec(x, shape, &Device::Cpu)
                }
                other => panic!("unsupported golden dtype {other:?} for {name}"),
            };
            (name, t.unwrap())
        })
        .collect()
}

/// Tensor as u32 ids.
pub fn ids(t: &Tensor) -> Vec<u32> {
    t.to_dtype(candle_core::DType::I64).unwrap().to_vec1::<i64>().unwrap().into_iter().map(|x| x as u32).collect()
}

/// Builds an engine with the policy given as a TOML table.
pub fn engine(model_dir: &Path, policy_toml: &str, block_size: usize) -> Engine {
    let loaded = load_model(model_dir, &Device::Cpu, WeightForm::Dense).expect("model loads");
    engine_of(loaded.model, policy_toml, block_size)
}

/// [`engine`] over a model already loaded.
pub fn engine_of(model: dms_integration::model::Llama, policy_toml: &str, block_size: usize) -> Engine {
    let table: toml::Table = toml::from_str(policy_toml).unwrap();
    let policy: Arc<_> = Registry::with_builtins().build(&table).unwrap();
    Engine::new(model, policy, block_size, 1 << 16).unwrap()
}

/// Largest absolute difference between two equal-length slices.
pub fn max_abs(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

/// Recorded (layer, head, position, raw score).
pub type Log = Arc<Mutex<Vec<(usize, usize, Pos, f32)>>>;

/// Wraps a policy and records every decision score it receives.
#[derive(Debug)]
pub struct Recording {
    pub inner: Arc<dyn PolicyFactory>,
    pub log: Log,
}

struct RecordingSeq {
    inner: Box<dyn SequencePolicy>,
    log: Log,
}

impl PolicyFactory for Recording {
    fn name(&self) -> &str {
        self.inner.name()
    }
    fn signal_need(&self) -> SignalNeed {
        self.inner.signal_need()
    }
    fn new_sequence(&self, shape: CacheShape) -> Box<dyn SequencePolicy> {
        Box::new(RecordingSeq { inner: self.inner.new_sequence(shape), log: self.log.clone() })
    }
    fn adapter(&self) -> Option<&str> {
        self.inner.adapter()
    }
    fn describe(&self) -> String {
        self.inner.describe()
    }
}

impl SequencePolicy for RecordingSeq {
    fn decide(&mut self, row: RowRef, first: Pos, n: usize, s: Option<&[f32]>) -> Result<(), PolicyError> {
        if let Some(s) = s {
            let mut log = self.log.lock().unwrap();
            log.extend(s.iter().enumerate().map(|(i, &x)| (row.layer, row.head, first + i as Pos, x)));
        }
        self.inner.decide(row, first, n, s)
    }
    fn evict(&mut self, row: RowRef, first: Pos, n: usize, plan: &mut EvictPlan) -> Result<(), PolicyError> {
        self.inner.evict(row, first, n, plan)
    }
    fn compact(&mut self, row: RowRef, plan: &mut CompactPlan) -> Result<(), PolicyError> {
        self.inner.compact(row, plan)
    }
}

/// Deterministic pseudo-random floats in [-0.5, 0.5) (an LCG; no RNG crate needed).
pub fn vecf(seed: u64, n: usize) -> Vec<f32> {
    let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((x >> 33) as f32 / (1u64 << 31) as f32) - 0.5
        })
        .collect()
}

/// Kept positions per layer and row in cache state `state` of a DMS reference golden file
/// (`cache_presence`: `[state, layer, row, position]`, 1 = kept).
pub fn presence(g: &HashMap<String, Tensor>, state: usize) -> Vec<Vec<Vec<Pos>>> {
    let p = g["cache_presence"].to_dtype(candle_core::DType::I64).unwrap().get(state).unwrap();
    let p: Vec<Vec<Vec<i64>>> = p.to_vec3().unwrap();
    p.iter()
        .map(|layer| {
            layer
                .iter()
                .map(|row| row.iter().enumerate().filter(|(_, &x)| x == 1).map(|(i, _)| i as Pos).collect())
                .collect()
        })
        .collect()
}

/// A full-cache engine on the separate-alpha DMS fixture (block size 4) with a pool of
/// `capacity_blocks`, for scheduler tests whose requests bring their own policies.
pub fn batch_engine(capacity_blocks: usize) -> Engine {
    let loaded =
        load_model(&fixture("qwen3_dms_tiny/variant_separate_alpha/model"), &Device::Cpu, WeightForm::Dense).unwrap();
    let full = Registry::with_builtins().build(&toml::from_str("name = 'full'").unwrap()).unwrap();
    Engine::new(loaded.model, full, 4, capacity_blocks).unwrap()
}

/// A policy from a TOML table, completed from the engine's model as the CLI completes it.
pub fn resolved_policy(eng: &mut Engine, table: &str) -> Arc<dyn PolicyFactory> {
    let t = resolve_policy_table(&toml::from_str(table).unwrap(), &mut eng.model, None).unwrap();
    Registry::with_builtins().build(&t).unwrap()
}

/// `len` token ids (3 to 502) from `seed`: at each position, different seeds below 500 give
/// different ids.
pub fn seeded_tokens(seed: usize, len: usize) -> Vec<u32> {
    (0..len).map(|i| ((i * 7 + seed * 131) % 500) as u32 + 3).collect()
}

/// Greedy generation of `n` tokens that ignores end-of-sequence.
pub fn greedy_params(n: usize) -> GenParams {
    GenParams { seed: 1, ..GenParams::greedy(n, 0) }
}

/// A GGUF file's metadata, owned.
pub type OwnedMeta = Vec<(String, Value)>;
/// A GGUF file's tensors.
pub type GgufTensors = Vec<(String, QTensor)>;

/// The metadata and tensors of a GGUF fixture (`fixtures/gguf/NAME`), in name order.
pub fn fixture_gguf_parts(name: &str) -> (OwnedMeta, GgufTensors) {
    let path = fixture(&format!("gguf/{name}"));
    let mut f = std::fs::File::open(&path).unwrap();
    let content = gguf_file::Content::read(&mut f).unwrap();
    let mut meta: OwnedMeta = content.metadata.clone().into_iter().collect();
    meta.sort_by(|a, b| a.0.cmp(&b.0));
    let mut names: Vec<&String> = content.tensor_infos.keys().collect();
    names.sort();
    let tensors = names.into_iter().map(|n| (n.clone(), content.tensor(&mut f, n, &Device::Cpu).unwrap())).collect();
    (meta, tensors)
}

/// The bytes of a GGUF file with this metadata and these tensors.
pub fn gguf_file_bytes(meta: &[(String, Value)], tensors: &[(String, QTensor)]) -> Vec<u8> {
    let mut cur = std::io::Cursor::new(Vec::new());
    let meta_refs: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensor_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    gguf_file::write(&mut cur, &meta_refs, &tensor_refs).unwrap();
    cur.into_inner()
}

/// The reference's logits at every prompt position and through 8 greedy steps, prompt fed in
/// chunks of `chunk` tokens (0: one pass), within `tol`; returns the engine and its sequence.
pub fn follow(
    runs: &str,
    model: &std::path::Path,
    chunk: usize,
    tol: f32,
) -> (Engine, dms_integration::kv::sequence::SequenceCache) {
    let g = golden(&fixture(runs));
    let prompt = ids(&g["prompt_ids"]);
    let mut eng = engine(model, "name = \"full\"", 4);
    let mut seq = eng.new_sequence();
    let want = g["prompt_logits"].to_vec2::<f32>().unwrap();
    let mut logits = Vec::new();
    let parts: Vec<&[u32]> = if chunk == 0 { vec![&prompt] } else { prompt.chunks(chunk).collect() };
    let mut t = 0;
    for part in parts {
        for got in eng.step(&mut seq, part, true).unwrap().to_vec2::<f32>().unwrap() {
            let err = max_abs(&got, &want[t]);
            assert!(err < tol, "{model:?} against {runs}: prompt position {t}: {err}");
            logits = got;
            t += 1;
        }
    }
    let steps = g["greedy_step_logits"].to_vec2::<f32>().unwrap();
    for (i, &want_id) in ids(&g["greedy_ids"]).iter().enumerate() {
        let err = max_abs(&logits, &steps[i]);
        assert!(err < tol, "{model:?} against {runs}: greedy step {i}: {err}");
        assert_eq!(argmax(&logits), want_id, "{model:?}: greedy step {i}");
        logits = eng.step(&mut seq, &[want_id], false).unwrap().squeeze(0).unwrap().to_vec1().unwrap();
    }
    (eng, seq)
}
