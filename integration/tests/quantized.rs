//! Quantized weights: candle's block-format matmuls against a dequantized f64 reference, and
//! GGUF files of every supported tensor type (written here) loading and running in both weight
//! forms, DeepSeek GGUF files among them.

mod common;

use std::path::{Path, PathBuf};

use candle_core::quantized::{gguf_file, gguf_file::Value, GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use dms_integration::engine::Engine;
use dms_integration::model::linear::Proj;
use dms_integration::model::{Llama, WeightForm, Weights};
use dms_policy::Registry;

/// Formats with vectorised kernels (kept as they are: candle's, and ours for Q4_1) and the others
/// (repacked into Q8_0).
const FAST: [GgmlDType; 8] = [
    GgmlDType::Q4_0,
    GgmlDType::Q4_1,
    GgmlDType::Q8_0,
    GgmlDType::Q2K,
    GgmlDType::Q3K,
    GgmlDType::Q4K,
    GgmlDType::Q5K,
    GgmlDType::Q6K,
];
const REPACKED: [GgmlDType; 2] = [GgmlDType::Q5_0, GgmlDType::Q5_1];

/// Seeded N(0, 1) values (splitmix64 and Box-Muller), so that every run sees the same weights.
fn gaussian(n: usize, seed: u64) -> Vec<f32> {
    let mut state = seed;
    let mut next = move || {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
    };
    (0..n).map(|_| ((-2.0 * (1.0 - next()).ln()).sqrt() * (std::f64::consts::TAU * next()).cos()) as f32).collect()
}

fn randn(shape: (usize, usize), seed: u64) -> Tensor {
    Tensor::from_vec(gaussian(shape.0 * shape.1, seed), shape, &Device::Cpu).unwrap()
}

fn scratch(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("dms-quantized-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Block length of the activations' format in candle's dot product for weights in `dt` (Q8_0
/// for the 32-wide formats, Q8_K for the K-quants).
fn activation_block(dt: GgmlDType) -> usize {
    if dt.block_size() == 256 {
        256
    } else {
        32
    }
}

#[test]
fn quantized_matmul_matches_the_dequantized_reference_per_format() {
    let dev = Device::Cpu;
    let (out, inp) = (40usize, 512usize);
    for dt in FAST {
        let w = (randn((out, inp), dt as u64) * 0.05).unwrap();
        let q = QTensor::quantize(&w, dt).unwrap();
        let wd: Vec<Vec<f32>> = q.dequantize(&dev).unwrap().to_vec2().unwrap();
        let bias: Vec<f32> = (0..out).map(|i| i as f32 * 0.01).collect();
        let proj = Proj::quantized(q, Some(Tensor::new(bias.as_slice(), &dev).unwrap())).unwrap();
        // 3 rows take the quantized kernel; 24 rows dequantize and take the dense matmul.
        for rows in [3usize, 24] {
            let x = randn((rows, inp), 1000 + rows as u64);
            let y: Vec<Vec<f32>> = proj.forward(&x).unwrap().to_vec2().unwrap();
            let xs: Vec<Vec<f32>> = x.to_vec2().unwrap();
            let ab = activation_block(dt);
            for r in 0..rows {
                for o in 0..out {
                    let exact: f64 = (0..inp).map(|i| xs[r][i] as f64 * wd[o][i] as f64).sum::<f64>() + bias[o] as f64;
                    // The quantized kernel rounds each activation to 8 bits of its block's
                    // maximum (error <= max/254 per value); the dense path only rounds in f32.
                    let tol = if rows < 16 {
                        (0..inp)
                            .map(|i| {
                                let b = i / ab * ab;
                                let m = xs[r][b..b + ab].iter().fold(0f32, |a, v| a.max(v.abs()));
                                wd[o][i].abs() as f64 * m as f64 / 127.0
                            })
                            .sum::<f64>()
                    } else {
                        1e-5 * (0..inp).map(|i| (xs[r][i] * wd[o][i]).abs() as f64).sum::<f64>() + 1e-6
                    };
                    let err = (y[r][o] as f64 - exact).abs();
                    assert!(err <= tol, "{dt:?}, {rows} rows, [{r},{o}]: {} vs {exact} (tolerance {tol})", y[r][o]);
                }
            }
        }
    }
}

/// A Llama-architecture GGUF (no tokenizer) with every linear layer in `dt` and a Q8_0 embedding
/// table, rows of 256 so that every format fits.
fn tiny_gguf(dt: GgmlDType, tied: bool) -> Vec<u8> {
    let dev = Device::Cpu;
    let (vocab, h, inter, hd, heads, kv) = (64usize, 256usize, 512usize, 64usize, 4usize, 2usize);
    let meta: Vec<(&str, Value)> = vec![
        ("general.architecture", Value::String("llama".into())),
        ("llama.embedding_length", Value::U32(h as u32)),
        ("llama.feed_forward_length", Value::U32(inter as u32)),
        ("llama.block_count", Value::U32(2)),
        ("llama.attention.head_count", Value::U32(heads as u32)),
        ("llama.attention.head_count_kv", Value::U32(kv as u32)),
        ("llama.context_length", Value::U32(256)),
        ("llama.rope.freq_base", Value::F32(10000.0)),
        ("llama.attention.layer_norm_rms_epsilon", Value::F32(1e-5)),
        ("tokenizer.ggml.bos_token_id", Value::U32(1)),
        ("tokenizer.ggml.eos_token_id", Value::U32(2)),
    ];
    let seed = std::cell::Cell::new(7u64);
    let q = |shape: (usize, usize), dt: GgmlDType| {
        seed.set(seed.get() + 1);
        let scale = 1.0 / (shape.1 as f64).sqrt();
        QTensor::quantize(&(randn(shape, seed.get()) * scale).unwrap(), dt).unwrap()
    };
    let ones =
        |n: usize| QTensor::quantize(&Tensor::ones(n, candle_core::DType::F32, &dev).unwrap(), GgmlDType::F32).unwrap();
    let mut tensors: Vec<(String, QTensor)> =
        vec![("token_embd.weight".into(), q((vocab, h), GgmlDType::Q8_0)), ("output_norm.weight".into(), ones(h))];
    if !tied {
        tensors.push(("output.weight".into(), q((vocab, h), dt)));
    }
    for l in 0..2 {
        let p = format!("blk.{l}");
        tensors.extend([
            (format!("{p}.attn_norm.weight"), ones(h)),
            (format!("{p}.ffn_norm.weight"), ones(h)),
            (format!("{p}.attn_q.weight"), q((heads * hd, h), dt)),
            (format!("{p}.attn_k.weight"), q((kv * hd, h), dt)),
            (format!("{p}.attn_v.weight"), q((kv * hd, h), dt)),
            (format!("{p}.attn_output.weight"), q((h, heads * hd), dt)),
            (format!("{p}.ffn_gate.weight"), q((inter, h), dt)),
            (format!("{p}.ffn_up.weight"), q((inter, h), dt)),
            (format!("{p}.ffn_down.weight"), q((h, inter), dt)),
        ]);
    }
    let mut cur = std::io::Cursor::new(Vec::new());
    let meta_refs: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (*k, v)).collect();
    let tensor_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    gguf_file::write(&mut cur, &meta_refs, &tensor_refs).unwrap();
    cur.into_inner()
}

fn load(path: &Path, form: WeightForm) -> Llama {
    let (w, cfg) = Weights::open_gguf(path).unwrap();
    Llama::load(cfg, &w, &Device::Cpu, form).unwrap()
}

/// Logits of a 24-token prompt (one pass: dense matmuls) and of 6 prompt tokens then 4 single
/// tokens (quantized kernels), full cache.
fn logits(model: Llama) -> Vec<Vec<f32>> {
    let policy = Registry::with_builtins().build(&toml::from_str("name = \"full\"").unwrap()).unwrap();
    let mut eng = Engine::new(model, policy, 16, 256).unwrap();
    let ids: Vec<u32> = (0..24u32).map(|i| (i * 7 + 3) % 64).collect();
    let mut seq = eng.new_sequence();
    let mut rows: Vec<Vec<f32>> = eng.step(&mut seq, &ids, true).unwrap().to_vec2().unwrap();
    let mut seq = eng.new_sequence();
    rows.extend(eng.step(&mut seq, &ids[..6], true).unwrap().to_vec2::<f32>().unwrap());
    for &t in &ids[6..10] {
        rows.extend(eng.step(&mut seq, &[t], true).unwrap().to_vec2::<f32>().unwrap());
    }
    rows
}

/// Relative L2 distance of two logit rows.
fn rel_l2(a: &[f32], b: &[f32]) -> f64 {
    let d: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let n: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (d / n.max(1e-12)).sqrt()
}

#[test]
fn gguf_files_of_every_supported_type_load_and_run_quantized() {
    let dir = scratch("types");
    for (dt, tied) in FAST.iter().chain(&REPACKED).map(|&d| (d, d != GgmlDType::Q6K)) {
        let path = dir.join(format!("{dt:?}.gguf"));
        std::fs::write(&path, tiny_gguf(dt, tied)).unwrap();
        let q = load(&path, WeightForm::Quantized);
        assert!(q.is_quantized());
        let dense_bytes = load(&path, WeightForm::Dense).weight_bytes();
        assert!(q.weight_bytes() < dense_bytes / 2, "{dt:?}: {} vs {dense_bytes} bytes", q.weight_bytes());
        let (ql, dl) = (logits(q), logits(load(&path, WeightForm::Dense)));
        // The dense form holds the same blocks dequantized. The 24-row pass differs only by f32
        // rounding (and, for repacked formats, by Q8_0's rounding of the dequantized weights,
        // under 0.4% of a block's maximum per weight); the single-token steps also round every
        // activation to 8 bits (about 0.4% per matmul, 15 matmuls deep; measured 0.016-0.037).
        for (i, (a, b)) in ql.iter().zip(&dl).enumerate() {
            let tol = match (i < 24, REPACKED.contains(&dt)) {
                (true, false) => 1e-4,
                (true, true) => 0.03,
                (false, _) => 0.06,
            };
            let e = rel_l2(a, b);
            assert!(e < tol, "{dt:?} row {i}: relative L2 {e} (tolerance {tol})");
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn requantized_forms_run_and_fall_back_to_q8_0_for_short_rows() {
    let dir = scratch("requant");
    let path = dir.join("m.gguf");
    std::fs::write(&path, tiny_gguf(GgmlDType::Q8_0, true)).unwrap();
    let dense = logits(load(&path, WeightForm::Dense));
    for dt in [GgmlDType::Q8_0, GgmlDType::Q4K, GgmlDType::Q6K] {
        let m = load(&path, WeightForm::Requantized(dt));
        let l = logits(m);
        let worst = l.iter().zip(&dense).map(|(a, b)| rel_l2(a, b)).fold(0f64, f64::max);
        // Requantizing the Gaussian weights of this random model into 4 bits leaves an rms error
        // of about 12% per weight (measured 0.34 on the logits); 6 and 8 bits far less (<0.05).
        let tol = if dt == GgmlDType::Q4K { 0.5 } else { 0.1 };
        assert!(worst < tol, "{dt:?}: relative L2 {worst}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_weight_forms_are_refused_by_name() {
    let e = WeightForm::parse("q4_1").unwrap_err().to_string();
    assert!(e.contains("q4_1") && e.contains("q8_0"), "{e}");
    let cfg = dms_integration::config::EngineConfig::parse(
        "[model]\nsource = \"x\"\nweights = \"quantized\"\ndevice = \"cuda:0\"\n",
    );
    let Err(e) = cfg else { panic!("quantized weights on a GPU are refused") };
    let e = format!("{e:#}");
    // A build without CUDA refuses the device first.
    let named = e.contains("weights = \"quantized\" runs on the CPU") || e.contains("--features cuda");
    assert!(named, "{e}");
}

/// DeepSeek GGUF files (latent attention; dense MLPs, or experts stacked per layer) with every
/// matrix in Q8_0, as quantized files ship: the quantized form keeps the blocks (each expert's
/// read out of its stack) in under half the dense bytes and gives the logits of the dense form,
/// which holds the same blocks dequantized.
#[test]
fn deepseek_gguf_files_run_quantized() {
    let dir = scratch("deepseek");
    for (name, moe) in
        [("deepseek_mla_tiny.gguf", false), ("deepseek_v2_moe.gguf", true), ("deepseek_v3_moe.gguf", true)]
    {
        let (meta, tensors) = common::fixture_gguf_parts(name);
        let blocks: Vec<(String, QTensor)> = tensors
            .into_iter()
            .map(|(n, t)| {
                let dense = t.dequantize(&Device::Cpu).unwrap();
                let matrix = dense.rank() >= 2 && dense.dim(candle_core::D::Minus1).unwrap() % 32 == 0;
                let q = if matrix { QTensor::quantize(&dense, GgmlDType::Q8_0).unwrap() } else { t };
                (n, q)
            })
            .collect();
        let path = dir.join(name);
        std::fs::write(&path, common::gguf_file_bytes(&meta, &blocks)).unwrap();
        let q = load(&path, WeightForm::Quantized);
        assert!(q.is_quantized());
        let dense_bytes = load(&path, WeightForm::Dense).weight_bytes();
        eprintln!("{name}: {} quantized vs {dense_bytes} dense bytes", q.weight_bytes());
        assert!(q.weight_bytes() < dense_bytes / 2, "{name}: {} vs {dense_bytes} bytes", q.weight_bytes());
        let (ql, dl) = (logits(q), logits(load(&path, WeightForm::Dense)));
        // The 24-row pass runs dense matmuls over the dequantized blocks (f32 rounding only),
        // except the experts, which see a few rows each and round their activations to 8 bits as
        // single-token steps do (about 0.4% per matmul).
        let worst = ql.iter().zip(&dl).map(|(a, b)| rel_l2(a, b)).fold(0f64, f64::max);
        eprintln!("{name}: worst relative L2 {worst}");
        // The blocks hold the f32 file's weights to Q8_0's rounding (each expert's found at its
        // offset in the stack): the dense form stays near the f32 file's logits.
        let f32_logits = logits(load(&common::fixture(&format!("gguf/{name}")), WeightForm::Dense));
        let off = dl.iter().zip(&f32_logits).map(|(a, b)| rel_l2(a, b)).fold(0f64, f64::max);
        eprintln!("{name}: Q8_0 blocks against the f32 file: relative L2 {off}");
        assert!(off < 0.06, "{name}: the Q8_0 file's dense logits lie {off} from the f32 file's");
        for (i, (a, b)) in ql.iter().zip(&dl).enumerate() {
            let tol = if i < 24 && !moe { 1e-4 } else { 0.06 };
            let e = rel_l2(a, b);
            assert!(e < tol, "{name} row {i}: relative L2 {e} (tolerance {tol})");
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_gguf_tensor_type_we_do_not_support_is_named() {
    let dir = scratch("unsupported");
    let mut bytes = tiny_gguf(GgmlDType::Q8_0, true);
    // A tensor entry is its name (u64 length, bytes), its dimension count (u32), its dimensions
    // (u64 each) and its type (u32): give `blk.0.attn_q.weight` type 16 (IQ2_XXS).
    let name = b"blk.0.attn_q.weight";
    let at = bytes.windows(name.len()).position(|w| w == name).expect("tensor entry") + name.len();
    let n_dims = u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
    let ty = at + 4 + 8 * n_dims;
    bytes[ty..ty + 4].copy_from_slice(&16u32.to_le_bytes());
    let path = dir.join("iq2.gguf");
    std::fs::write(&path, &bytes).unwrap();
    let Err(e) = Weights::open_gguf(&path) else { panic!("an unsupported tensor type is refused") };
    let e = format!("{e:#}");
    assert!(e.contains("blk.0.attn_q.weight") && e.contains("16") && e.contains("not a supported ggml type"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}
