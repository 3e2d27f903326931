//! Weight files: HF safetensors shards or a GGUF file, read under HF tensor names as f32 or, for
//! linear layers, in a GGUF block format ([`WeightForm`]).

use std::borrow::Cow;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use anyhow::{bail, Context, Result};
use candle_core::quantized::{gguf_file, GgmlDType, QStorage, QTensor};
use candle_core::{DType, Device, Tensor};
use candle_nn::Linear;

use super::config::{Arch, DmsCheckpointFields, ModelConfig, RopeScaling};
use super::gguf_header::read_gguf_header;
use super::linear::Proj;

/// How a model holds its linear layers (and its embedding table) after loading.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightForm {
    /// Dequantized to f32: what the parity tests and the retrofit's differentiable forward need.
    Dense,
    /// Dense, every weight rounded through f16 (to compare with references that ran on f16
    /// copies of the same weights).
    DenseRoundedF16,
    /// GGUF block formats kept as the file has them where a vectorised CPU kernel exists for
    /// them; the others (Q5_0, Q5_1) and dense tensors are repacked into Q8_0.
    Quantized,
    /// Every linear layer requantized at load into this format (into Q8_0 where a row does not
    /// split into whole blocks of it).
    Requantized(GgmlDType),
}

impl WeightForm {
    /// Parses `[model] weights`: `dense`, `quantized`, or a format to requantize into (`q4_0`,
    /// `q8_0`, `q2_k` … `q6_k`).
    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "dense" => WeightForm::Dense,
            "quantized" => WeightForm::Quantized,
            "q4_0" => WeightForm::Requantized(GgmlDType::Q4_0),
            "q8_0" => WeightForm::Requantized(GgmlDType::Q8_0),
            "q2_k" => WeightForm::Requantized(GgmlDType::Q2K),
            "q3_k" => WeightForm::Requantized(GgmlDType::Q3K),
            "q4_k" => WeightForm::Requantized(GgmlDType::Q4K),
            "q5_k" => WeightForm::Requantized(GgmlDType::Q5K),
            "q6_k" => WeightForm::Requantized(GgmlDType::Q6K),
            other => bail!(
                "[model] weights = \"{other}\" is not a weight form (dense, quantized, q4_0, q8_0, q2_k, q3_k, q4_k, q5_k, q6_k)"
            ),
        })
    }

    /// True for the forms that keep linear layers in block formats.
    pub fn is_quantized(self) -> bool {
        matches!(self, WeightForm::Quantized | WeightForm::Requantized(_))
    }
}

/// True for the block formats with vectorised CPU dot products: candle 0.10.2's (AVX2 or NEON,
/// chosen at compile time) and ours for Q4_1 ([`super::q4_1`]); the others run a scalar loop
/// several times slower.
fn has_fast_kernel(dt: GgmlDType) -> bool {
    use GgmlDType as G;
    matches!(dt, G::Q4_0 | G::Q4_1 | G::Q8_0 | G::Q2K | G::Q3K | G::Q4K | G::Q5K | G::Q6K)
}

/// Quantizes dense `[out, in]` f32 rows into `dt`, or into Q8_0 where a row does not split into
/// whole blocks of `dt` (every supported row length is a multiple of Q8_0's 32).
fn quantize_rows(w: &Tensor, dt: GgmlDType) -> Result<QTensor> {
    let inp = w.dim(1)?;
    let dt = if inp.is_multiple_of(dt.block_size()) { dt } else { GgmlDType::Q8_0 };
    if !inp.is_multiple_of(dt.block_size()) {
        bail!("rows of {inp} weights do not split into blocks of {}", dt.block_size());
    }
    Ok(QTensor::quantize(&w.to_device(&Device::Cpu)?.to_dtype(DType::F32)?.contiguous()?, dt)?)
}

/// Where weights come from.
pub enum Weights {
    /// Memory-mapped safetensors shards.
    Safetensors {
        /// The shards.
        files: candle_core::safetensors::MmapedSafetensors,
        /// Their paths (for messages).
        paths: Vec<PathBuf>,
    },
    /// One GGUF file, dequantised tensor by tensor.
    Gguf {
        /// Parsed header.
        content: gguf_file::Content,
        /// Open file.
        file: Mutex<File>,
        /// Path (for messages).
        path: PathBuf,
        /// q/k rows are permuted for llama.cpp's interleaved RoPE and must be un-permuted.
        unpermute: Option<(usize, usize)>,
    },
}

impl std::fmt::Debug for Weights {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Weights::Safetensors { paths, .. } => write!(f, "Safetensors({paths:?})"),
            Weights::Gguf { path, .. } => write!(f, "Gguf({path:?})"),
        }
    }
}

impl Weights {
    /// Opens every `.safetensors` file of a directory (a model's shards or an adapter's file),
    /// in name order; an error names a directory that cannot be read or holds none.
    pub fn open_safetensors_dir(dir: &Path) -> Result<Self> {
        let mut shards: Vec<PathBuf> = std::fs::read_dir(dir)
            .with_context(|| format!("cannot read directory {}", dir.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
            .collect();
        shards.sort();
        if shards.is_empty() {
            bail!("directory {} has no .safetensors files", dir.display());
        }
        Self::open_safetensors(&shards)
    }

    /// Opens safetensors shards.
    pub fn open_safetensors(paths: &[PathBuf]) -> Result<Self> {
        if paths.is_empty() {
            bail!("no .safetensors files found");
        }
        for p in paths {
            check_safetensors_extent(p)?;
        }
        // SAFETY: the files are not modified while mapped; this is how candle loads weights.
        let files = unsafe { candle_core::safetensors::MmapedSafetensors::multi(paths) }
            .with_context(|| format!("cannot map {paths:?}"))?;
        Ok(Weights::Safetensors { files, paths: paths.to_vec() })
    }

    /// Opens a GGUF file, checks its header (every tensor lies inside it, see
    /// [`read_gguf_header`]), and returns its config.
    pub fn open_gguf(path: &Path) -> Result<(Self, ModelConfig)> {
        let content = read_gguf_header(path)?;
        let file = File::open(path).with_context(|| format!("cannot open GGUF file {}", path.display()))?;
        let mut cfg = gguf_config(&content).with_context(|| format!("reading metadata of {}", path.display()))?;
        if content.tensor_infos.contains_key(ROPE_FREQS) {
            let factors = content
                .tensor(&mut &file, ROPE_FREQS, &Device::Cpu)
                .and_then(|q| q.dequantize(&Device::Cpu))
                .and_then(|t| t.flatten_all()?.to_vec1::<f32>())
                .with_context(|| format!("cannot read tensor `{ROPE_FREQS}` from {}", path.display()))?;
            cfg.rope_scaling = Some(RopeScaling::FreqFactors(factors.into_iter().map(f64::from).collect()));
            cfg.validate().with_context(|| format!("tensor `{ROPE_FREQS}` of {}", path.display()))?;
        }
        let arch_meta = meta_str(&content, "general.architecture")?;
        let unpermute = (arch_meta == "llama").then_some((cfg.num_heads, cfg.num_kv_heads));
        Ok((Weights::Gguf { content, file: Mutex::new(file), path: path.to_path_buf(), unpermute }, cfg))
    }

    /// True when a tensor of that HF name exists.
    pub fn contains(&self, name: &str) -> bool {
        match self {
            Weights::Safetensors { files, .. } => files.get(name).is_ok(),
            Weights::Gguf { content, .. } => gguf_name(name).is_some_and(|g| content.tensor_infos.contains_key(&g)),
        }
    }

    /// Loads a tensor by HF name as f32 on `dev`, checking that it has `shape`.
    pub fn get(&self, name: &str, shape: &[usize], dev: &Device) -> Result<Tensor> {
        let t = match self {
            Weights::Safetensors { files, paths } => {
                let view = files
                    .get(name)
                    .map_err(|_| anyhow::anyhow!("tensor `{name}` is missing from {}", display_paths(paths)))?;
                if view.shape() != shape {
                    bail!(
                        "tensor `{name}` has shape {:?} in the weights but the config implies {shape:?} (config.json does not match the weights)",
                        view.shape()
                    );
                }
                files.load(name, dev).with_context(|| format!("cannot load tensor `{name}`"))?
            }
            Weights::Gguf { content, file, path, unpermute } => {
                let g = gguf_name(name).with_context(|| format!("no GGUF name for tensor `{name}`"))?;
                let info = content
                    .tensor_infos
                    .get(&g)
                    .with_context(|| format!("tensor `{g}` is missing from {}", path.display()))?;
                if info.shape.dims() != shape {
                    bail!(
                        "tensor `{g}` has shape {:?} in {} but the metadata implies {shape:?}",
                        info.shape.dims(),
                        path.display()
                    );
                }
                let mut f = file.lock().expect("weights file lock poisoned");
                let q = content
                    .tensor(&mut *f, &g, &Device::Cpu)
                    .with_context(|| format!("cannot read tensor `{g}` from {}", path.display()))?;
                let t = q.dequantize(&Device::Cpu)?;
                let t = match (unpermute, name) {
                    (Some((nh, _)), n) if n.ends_with("q_proj.weight") => unpermute_rows(&t, *nh)?,
                    (Some((_, nkv)), n) if n.ends_with("k_proj.weight") => unpermute_rows(&t, *nkv)?,
                    _ => t,
                };
                t.to_device(dev)?
            }
        };
        Ok(t.to_dtype(DType::F32)?)
    }

    /// A tensor by HF name in its GGUF block format (rows un-permuted like [`Self::get`]), or
    /// `None` for safetensors and for GGUF tensors stored as plain floats.
    pub fn get_blocks(&self, name: &str, shape: &[usize]) -> Result<Option<QTensor>> {
        let Weights::Gguf { content, file, path, unpermute } = self else { return Ok(None) };
        let g = gguf_name(name).with_context(|| format!("no GGUF name for tensor `{name}`"))?;
        let info =
            content.tensor_infos.get(&g).with_context(|| format!("tensor `{g}` is missing from {}", path.display()))?;
        if info.shape.dims() != shape {
            bail!(
                "tensor `{g}` has shape {:?} in {} but the metadata implies {shape:?}",
                info.shape.dims(),
                path.display()
            );
        }
        if matches!(info.ggml_dtype, GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16) {
            return Ok(None);
        }
        let mut f = file.lock().expect("weights file lock poisoned");
        let q = content
            .tensor(&mut *f, &g, &Device::Cpu)
            .with_context(|| format!("cannot read tensor `{g}` from {}", path.display()))?;
        Ok(Some(match (unpermute, name) {
            (Some((nh, _)), n) if n.ends_with("q_proj.weight") => unpermute_block_rows(&q, *nh)?,
            (Some((_, nkv)), n) if n.ends_with("k_proj.weight") => unpermute_block_rows(&q, *nkv)?,
            _ => q,
        }))
    }

    /// The linear layer `name` (`name.weight` `[out, in]`, and `name.bias` when `bias`) in `form`,
    /// its weight on `dev` when dense (quantized layers live on the CPU).
    pub fn proj(&self, name: &str, out: usize, inp: usize, bias: bool, form: WeightForm, dev: &Device) -> Result<Proj> {
        let wname = format!("{name}.weight");
        let dense_f32 = |n: &str, shape: &[usize]| -> Result<Tensor> {
            let t = self.get(n, shape, dev)?;
            Ok(if form == WeightForm::DenseRoundedF16 { t.to_dtype(DType::F16)?.to_dtype(DType::F32)? } else { t })
        };
        let b = if bias { Some(dense_f32(&format!("{name}.bias"), &[out])?) } else { None };
        let blocks = match form {
            WeightForm::Dense | WeightForm::DenseRoundedF16 => {
                return Ok(Proj::Dense(Linear::new(dense_f32(&wname, &[out, inp])?, b)));
            }
            WeightForm::Quantized => match self.get_blocks(&wname, &[out, inp])? {
                Some(q) if has_fast_kernel(q.dtype()) => q,
                Some(q) => quantize_rows(&q.dequantize(&Device::Cpu)?, GgmlDType::Q8_0)?,
                None => quantize_rows(&dense_f32(&wname, &[out, inp])?, GgmlDType::Q8_0)?,
            },
            WeightForm::Requantized(dt) => quantize_rows(&dense_f32(&wname, &[out, inp])?, dt)?,
        };
        Proj::quantized(blocks, b)
    }
}

/// [`unpermute_rows`] on a tensor in a block format: rows are independent runs of blocks, so the
/// permutation moves whole rows' bytes and changes no value.
fn unpermute_block_rows(q: &QTensor, heads: usize) -> Result<QTensor> {
    let (out, inp) = q.shape().dims2()?;
    let dt = q.dtype();
    if !inp.is_multiple_of(dt.block_size()) || !out.is_multiple_of(heads) || !(out / heads).is_multiple_of(2) {
        bail!("cannot un-permute a {dt:?} tensor of shape [{out}, {inp}] for {heads} heads");
    }
    let row = inp / dt.block_size() * dt.type_size();
    let (hd, half) = (out / heads, out / heads / 2);
    let data = q.data()?;
    let mut moved = vec![0u8; data.len()];
    for h in 0..heads {
        for j in 0..2 {
            for i in 0..half {
                let (to, from) = (h * hd + j * half + i, h * hd + i * 2 + j);
                moved[to * row..(to + 1) * row].copy_from_slice(&data[from * row..(from + 1) * row]);
            }
        }
    }
    block_tensor(moved, dt, (out, inp))
}

/// A CPU tensor in block format `dt` from its bytes.
pub(crate) fn block_tensor(bytes: Vec<u8>, dt: GgmlDType, shape: (usize, usize)) -> Result<QTensor> {
    // candle reinterprets the bytes as blocks in place, asserting their alignment (2 bytes for
    // f16 scales), then copies them. The system allocator aligns every buffer far more than that,
    // checked here so that a surprise is an error, not a panic. The bytes are lent, not given:
    // candle 0.10.2's `from_data` drops an owned buffer before it copies from it.
    if !(bytes.as_ptr() as usize).is_multiple_of(8) || !bytes.len().is_multiple_of(dt.type_size()) {
        bail!("a {dt:?} buffer of {} bytes is misaligned or not whole blocks", bytes.len());
    }
    Ok(QTensor::new(QStorage::from_data(Cow::Borrowed(&bytes), &Device::Cpu, dt)?, shape)?)
}

/// Reads a safetensors header and checks that every tensor's bytes lie inside the file, so that
/// a truncated or corrupt shard is reported by name before anything is mapped.
fn check_safetensors_extent(path: &Path) -> Result<()> {
    use std::io::Read;
    let bad = |why: String| anyhow::anyhow!("{} is not a valid safetensors file: {why}", path.display());
    let mut f = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let file_len = f.metadata()?.len();
    let mut n = [0u8; 8];
    f.read_exact(&mut n).map_err(|_| bad("shorter than its 8-byte header length".into()))?;
    let header_len = u64::from_le_bytes(n);
    if header_len > file_len.saturating_sub(8) || header_len > 100_000_000 {
        return Err(bad(format!(
            "header length {header_len} exceeds the file ({file_len} bytes): truncated or corrupt"
        )));
    }
    let mut header = vec![0u8; header_len as usize];
    f.read_exact(&mut header).map_err(|e| bad(e.to_string()))?;
    let json: serde_json::Value =
        serde_json::from_slice(&header).map_err(|e| bad(format!("header is not JSON ({e})")))?;
    let data_len = file_len - 8 - header_len;
    let obj = json.as_object().ok_or_else(|| bad("header is not a JSON object".into()))?;
    for (name, info) in obj.iter().filter(|(k, _)| k.as_str() != "__metadata__") {
        let end = info
            .get("data_offsets")
            .and_then(|o| o.get(1))
            .and_then(|e| e.as_u64())
            .ok_or_else(|| bad(format!("tensor `{name}` has no data_offsets")))?;
        if end > data_len {
            return Err(bad(format!(
                "truncated: tensor `{name}` ends at data byte {end} but the file holds {data_len} data bytes"
            )));
        }
    }
    Ok(())
}

fn display_paths(paths: &[PathBuf]) -> String {
    paths.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
}

/// Undoes llama.cpp's q/k row permutation: `(heads, hd/2, 2, in) -> (heads, 2, hd/2, in)`.
fn unpermute_rows(w: &Tensor, heads: usize) -> Result<Tensor> {
    let (out, inp) = w.dims2()?;
    let hd = out / heads;
    Ok(w.reshape((heads, hd / 2, 2, inp))?.transpose(1, 2)?.contiguous()?.reshape((out, inp))?)
}

/// GGUF tensor name of an HF tensor name.
fn gguf_name(hf: &str) -> Option<String> {
    let fixed = match hf {
        "model.embed_tokens.weight" => Some("token_embd.weight"),
        "model.norm.weight" => Some("output_norm.weight"),
        "lm_head.weight" => Some("output.weight"),
        _ => None,
    };
    if let Some(f) = fixed {
        return Some(f.to_string());
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, tail) = rest.split_once('.')?;
    let mapped = match tail {
        "input_layernorm.weight" => "attn_norm.weight",
        "post_attention_layernorm.weight" => "ffn_norm.weight",
        "self_attn.q_proj.weight" => "attn_q.weight",
        "self_attn.k_proj.weight" => "attn_k.weight",
        "self_attn.v_proj.weight" => "attn_v.weight",
        "self_attn.q_proj.bias" => "attn_q.bias",
        "self_attn.k_proj.bias" => "attn_k.bias",
        "self_attn.v_proj.bias" => "attn_v.bias",
        "self_attn.o_proj.weight" => "attn_output.weight",
        "self_attn.q_norm.weight" => "attn_q_norm.weight",
        "self_attn.k_norm.weight" => "attn_k_norm.weight",
        "mlp.gate_proj.weight" => "ffn_gate.weight",
        "mlp.up_proj.weight" => "ffn_up.weight",
        "mlp.down_proj.weight" => "ffn_down.weight",
        _ => return None,
    };
    Some(format!("blk.{layer}.{mapped}"))
}

fn meta<'a>(c: &'a gguf_file::Content, key: &str) -> Result<&'a gguf_file::Value> {
    c.metadata.get(key).with_context(|| format!("GGUF metadata key `{key}` is missing"))
}

fn meta_str(c: &gguf_file::Content, key: &str) -> Result<String> {
    Ok(meta(c, key)?.to_string().map_err(|e| anyhow::anyhow!("GGUF `{key}`: {e}"))?.clone())
}

/// An unsigned integer of the GGUF metadata, whatever its integer type.
pub(crate) fn meta_usize(c: &gguf_file::Content, key: &str) -> Result<usize> {
    use gguf_file::Value as V;
    let v = meta(c, key)?;
    let x = match v {
        V::U8(x) => Some(u64::from(*x)),
        V::U16(x) => Some(u64::from(*x)),
        V::U32(x) => Some(u64::from(*x)),
        V::U64(x) => Some(*x),
        V::I8(x) => u64::try_from(*x).ok(),
        V::I16(x) => u64::try_from(*x).ok(),
        V::I32(x) => u64::try_from(*x).ok(),
        V::I64(x) => u64::try_from(*x).ok(),
        _ => None,
    };
    x.and_then(|x| usize::try_from(x).ok())
        .with_context(|| format!("GGUF `{key}` is {v:?}, not a non-negative integer"))
}

/// An optional integer key: absent is `None`, present but not a non-negative integer an error.
fn meta_opt_usize(c: &gguf_file::Content, key: &str) -> Result<Option<usize>> {
    c.metadata.get(key).map(|_| meta_usize(c, key)).transpose()
}

fn meta_f64(c: &gguf_file::Content, key: &str) -> Result<Option<f64>> {
    match c.metadata.get(key) {
        None => Ok(None),
        Some(v) => Ok(Some(v.to_f32().map(f64::from).map_err(|e| anyhow::anyhow!("GGUF `{key}`: {e}"))?)),
    }
}

/// The tokens that end a turn: the end-of-sequence token and, when it differs, the end-of-turn
/// token (`tokenizer.ggml.eot_token_id`, e.g. `<|eot_id|>` beside `<|end_of_text|>`).
fn gguf_stop_tokens(c: &gguf_file::Content) -> Vec<u32> {
    let mut ids = Vec::new();
    for key in ["tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id"] {
        if let Some(id) = meta_usize(c, key).ok().and_then(|x| u32::try_from(x).ok()) {
            if !ids.contains(&id) {
                ids.push(id);
            }
        }
    }
    ids
}

/// The GGUF tensor of RoPE frequency divisors (llama.cpp's form of Llama 3's scaling).
const ROPE_FREQS: &str = "rope_freqs.weight";

/// Model config from GGUF metadata.
fn gguf_config(c: &gguf_file::Content) -> Result<ModelConfig> {
    let a = meta_str(c, "general.architecture")?;
    let arch = match a.as_str() {
        "llama" => Arch::Llama,
        "qwen2" => Arch::Qwen2,
        "qwen3" => Arch::Qwen3,
        other => bail!("GGUF architecture `{other}` is not supported (supported: llama, qwen2, qwen3)"),
    };
    let hidden = meta_usize(c, &format!("{a}.embedding_length"))?;
    let heads = meta_usize(c, &format!("{a}.attention.head_count"))?;
    let kv = meta_opt_usize(c, &format!("{a}.attention.head_count_kv"))?.unwrap_or(heads);
    let head_dim = meta_opt_usize(c, &format!("{a}.attention.key_length"))?.unwrap_or(hidden / heads.max(1));
    // llama.cpp stores Llama 3's RoPE scaling as per-frequency factors (`rope_freqs.weight`, read
    // by `open_gguf`), and linear or YaRN scaling under `rope.scaling.*`, which is not applied
    // here: such a file would run with the wrong frequencies.
    if let Some(rot) = meta_opt_usize(c, &format!("{a}.rope.dimension_count"))? {
        if rot != head_dim {
            bail!("GGUF `{a}.rope.dimension_count` = {rot}: RoPE over part of a head ({head_dim}) is not supported");
        }
    }
    // Mixtral-style files keep the `llama` architecture and add experts, which are not read here.
    if let Some(n) = meta_opt_usize(c, &format!("{a}.expert_count"))?.filter(|&n| n > 0) {
        bail!("GGUF `{a}.expert_count` = {n}: mixture-of-experts GGUF files are not supported");
    }
    let scaling_key = format!("{a}.rope.scaling.type");
    if let Some(kind) = c.metadata.get(&scaling_key).and_then(|v| v.to_string().ok()).filter(|k| k.as_str() != "none") {
        bail!("GGUF `{scaling_key}` = `{kind}` is not supported; use the model's HF directory, whose config.json rope_scaling is");
    }
    let vocab = match c.metadata.get("tokenizer.ggml.tokens") {
        Some(v) => v.to_vec().map_err(|e| anyhow::anyhow!("GGUF tokens: {e}"))?.len(),
        None => c
            .tensor_infos
            .get("token_embd.weight")
            .and_then(|i| i.shape.dims().first().copied())
            .context("cannot tell the vocabulary size")?,
    };
    let cfg = ModelConfig {
        arch,
        vocab_size: vocab,
        hidden_size: hidden,
        intermediate_size: meta_usize(c, &format!("{a}.feed_forward_length"))?,
        num_layers: meta_usize(c, &format!("{a}.block_count"))?,
        num_heads: heads,
        num_kv_heads: kv,
        head_dim,
        rope_theta: meta_f64(c, &format!("{a}.rope.freq_base"))?.unwrap_or(10_000.0),
        rope_scaling: None,
        rms_norm_eps: meta_f64(c, &format!("{a}.attention.layer_norm_rms_epsilon"))?.unwrap_or(1e-5),
        tie_word_embeddings: !c.tensor_infos.contains_key("output.weight"),
        attention_bias: c.tensor_infos.contains_key("blk.0.attn_q.bias"),
        qk_norm: arch == Arch::Qwen3,
        max_position_embeddings: meta_opt_usize(c, &format!("{a}.context_length"))?.unwrap_or(4096),
        bos_token_id: meta_usize(c, "tokenizer.ggml.bos_token_id").ok().and_then(|x| u32::try_from(x).ok()),
        eos_token_ids: gguf_stop_tokens(c),
        dms: DmsCheckpointFields::default(),
        mla: None,
    };
    cfg.validate()?;
    Ok(cfg)
}
