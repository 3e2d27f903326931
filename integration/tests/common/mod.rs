//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{Device, Tensor};
use dms_integration::engine::{load_model, Engine};
use dms_policy::Registry;

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
                Dtype::I8 => Tensor::from_vec(d.iter().map(|&b| b as i8 as i64).collect::<Vec<_>>(), shape, &Device::Cpu),
                Dtype::I32 => {
                    let x: Vec<i64> = d.chunks_exact(4).map(|c| i32::from_le_bytes(c.try_into().unwrap()) as i64).collect();
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
    let loaded = load_model(model_dir, &Device::Cpu, false).expect("model loads");
    let table: toml::Table = toml::from_str(policy_toml).unwrap();
    let policy: Arc<_> = Registry::with_builtins().build(&table).unwrap();
    Engine::new(loaded.model, policy, block_size, 1 << 16).unwrap()
}

/// Largest absolute difference between two equal-length slices.
pub fn max_abs(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}
