//! Weight files: HF safetensors shards or a GGUF file, read under HF tensor names as f32 or, for
//! linear layers, in a GGUF block format ([`WeightForm`]).

use std::borrow::Cow;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use anyhow::{bail, Context, Result};
use candle_core::quantized::{gguf_file, GgmlDType, QStorage, QTensor};
use candle_core::{DType, Device, Tensor};
use candle_nn::Linear;

use super::config::{ModelConfig, RopeScaling};
use super::fp8::{self, Fp8Scheme};
use super::fused::FusedPart;
use super::gguf_header::{read_gguf_header, GgufHeader};
use super::gguf_meta::{longrope, meta_str, model_config, LONGROPE_LONG, LONGROPE_SHORT};
use super::gguf_names::{source, GgufSource};
use super::linear::Proj;
use super::mxfp4;
use super::oai_experts::OaiExpert;

/// How a model holds its linear layers (and its embedding table) after loading.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightForm {
    /// Dequantized to f32: what the parity tests and the retrofit's differentiable forward need.
    Dense,
    /// Dense, every weight rounded through f16 (to compare with references that ran on f16
    /// copies of the same weights).
    DenseRoundedF16,
    /// GGUF block formats kept as the file has them where a vectorised CPU kernel exists for
    /// them (MXFP4 experts included, from GGUF or OpenAI's safetensors); the others (Q5_0, Q5_1)
    /// and dense tensors are repacked into Q8_0.
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
        /// How FP8 weights are scaled, when the checkpoint stores them (see [`Self::with_fp8`]).
        fp8: Option<Fp8Scheme>,
    },
    /// One GGUF file, dequantised tensor by tensor.
    Gguf {
        /// Parsed header.
        header: GgufHeader,
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
    /// Opens the shards `model.safetensors.index.json` lists when the directory has one (as
    /// transformers does: other `.safetensors` files beside them, such as Mistral's
    /// `consolidated.safetensors`, are not read), else every `.safetensors` file of the directory
    /// (a model's shards or an adapter's file), in name order. An error names a directory that
    /// cannot be read or holds none, a malformed index, and a shard the index lists that is not
    /// there (an interrupted download).
    pub fn open_safetensors_dir(dir: &Path) -> Result<Self> {
        let index = dir.join(SHARD_INDEX);
        if index.exists() {
            return Self::open_safetensors(&indexed_shards(&index)?);
        }
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
        Ok(Weights::Safetensors { files, paths: paths.to_vec(), fp8: None })
    }

    /// Reads FP8 tensors under `scheme` (the model config's [`ModelConfig::fp8`]); without one an
    /// FP8 tensor is an error. No effect on GGUF files.
    pub fn with_fp8(mut self, scheme: Option<Fp8Scheme>) -> Self {
        if let Weights::Safetensors { fp8, .. } = &mut self {
            *fp8 = scheme;
        }
        self
    }

    /// Opens a GGUF file, checks its header (every tensor lies inside it, see
    /// [`read_gguf_header`]), and returns its config.
    pub fn open_gguf(path: &Path) -> Result<(Self, ModelConfig)> {
        let header = read_gguf_header(path)?;
        let content = &header.content;
        let file = File::open(path).with_context(|| format!("cannot open GGUF file {}", path.display()))?;
        let mut cfg = model_config(content).with_context(|| format!("reading metadata of {}", path.display()))?;
        let vector = |name: &str| -> Result<Vec<f64>> {
            let v = content
                .tensor(&mut &file, name, &Device::Cpu)
                .and_then(|q| q.dequantize(&Device::Cpu))
                .and_then(|t| t.flatten_all()?.to_vec1::<f32>())
                .with_context(|| format!("cannot read tensor `{name}` from {}", path.display()))?;
            Ok(v.into_iter().map(f64::from).collect())
        };
        if content.tensor_infos.contains_key(ROPE_FREQS) {
            if cfg.rope_scaling.is_some() {
                bail!(
                    "{} has both `{ROPE_FREQS}` and `rope.scaling.type`: which scaling applies is unclear",
                    path.display()
                );
            }
            cfg.rope_scaling = Some(RopeScaling::FreqFactors(vector(ROPE_FREQS)?));
            cfg.validate().with_context(|| format!("tensor `{ROPE_FREQS}` of {}", path.display()))?;
        }
        // `model_config` accepts the table only where it applies (a `phi3` file, no other scaling).
        if content.tensor_infos.contains_key(LONGROPE_SHORT) {
            let long = content.tensor_infos.contains_key(LONGROPE_LONG).then(|| vector(LONGROPE_LONG)).transpose()?;
            let l = longrope(content, vector(LONGROPE_SHORT)?, long)?;
            cfg.max_position_embeddings = cfg.max_position_embeddings.min(l.original_max_position_embeddings);
            cfg.rope_scaling = Some(RopeScaling::LongRope(l));
            cfg.validate().with_context(|| {
                format!("LongRoPE tables `{LONGROPE_SHORT}`, `{LONGROPE_LONG}` of {}", path.display())
            })?;
        }
        let arch_meta = meta_str(content, "general.architecture")?;
        // llama.cpp's converter permutes `llama`, `smollm3` and `granite` files (its LlamaModel).
        let permuted = matches!(arch_meta.as_str(), "llama" | "smollm3" | "granite");
        let unpermute = permuted.then_some((cfg.num_heads, cfg.num_kv_heads));
        Ok((Weights::Gguf { header, file: Mutex::new(file), path: path.to_path_buf(), unpermute }, cfg))
    }

    /// True for a GGUF file.
    pub fn is_gguf(&self) -> bool {
        matches!(self, Weights::Gguf { .. })
    }

    /// True when a tensor of that HF name exists.
    pub fn contains(&self, name: &str) -> bool {
        match self {
            Weights::Safetensors { files, .. } => match stored_name(files, name) {
                Stored::Named(_) | Stored::Fused { .. } => true,
                Stored::Packed(p) => files.get(&p.packed).is_ok_and(|v| v.shape().len() == 3 && p.index < v.shape()[0]),
                Stored::Oai(o) => o.exists(files),
                Stored::Missing => false,
            },
            Weights::Gguf { header, .. } => match source(name, header) {
                Some(GgufSource::Whole(g)) => header.contains(&g),
                Some(GgufSource::Expert { stacked, index, .. }) => {
                    header.dims(&stacked).is_some_and(|d| d.len() == 3 && index < d[0])
                }
                Some(GgufSource::ExpertBias { stacked, index, .. }) => {
                    header.dims(&stacked).is_some_and(|d| d.len() == 2 && index < d[0])
                }
                Some(GgufSource::SplitKvB { k_b, v_b }) => header.contains(&k_b) && header.contains(&v_b),
                Some(GgufSource::Rows { fused, .. }) => header.contains(&fused),
                None => false,
            },
        }
    }

    /// Where layer `layer` stores q, k and v fused (`qkv_proj`, `attn_qkv`): the tensor's name
    /// and its rows, for [`super::fused::check_qkv_rows`]; `None` when they are stored apart.
    pub fn fused_qkv_rows(&self, layer: usize) -> Option<(String, usize)> {
        let q = format!("model.layers.{layer}.self_attn.q_proj.weight");
        match self {
            Weights::Safetensors { files, .. } => match stored_name(files, &q) {
                Stored::Fused { fused, .. } => {
                    files.get(&fused).ok().and_then(|v| v.shape().first().copied()).map(|r| (fused, r))
                }
                _ => None,
            },
            Weights::Gguf { header, .. } => match source(&q, header) {
                Some(GgufSource::Rows { fused, .. }) => {
                    header.dims(&fused).and_then(|d| d.first().copied()).map(|r| (fused, r))
                }
                _ => None,
            },
        }
    }

    /// Loads a tensor by HF name as f32 on `dev`, checking that it has `shape`.
    pub fn get(&self, name: &str, shape: &[usize], dev: &Device) -> Result<Tensor> {
        let t = match self {
            Weights::Safetensors { files, paths, fp8 } => {
                let name = match stored_name(files, name) {
                    Stored::Named(n) => n,
                    Stored::Packed(p) => {
                        let view = files.get(&p.packed)?;
                        let dtype = DType::try_from(view.dtype()).with_context(|| format!("tensor `{}`", p.packed))?;
                        return p.load(view.shape(), dtype, view.data(), shape, dev);
                    }
                    Stored::Fused { fused, part } => return fused_rows(files, &fused, part, shape, dev),
                    Stored::Oai(o) => return Ok(o.load(files, shape)?.to_device(dev)?),
                    Stored::Missing => bail!("tensor `{name}` is missing from {}", display_paths(paths)),
                };
                let name = name.as_str();
                let view = files.get(name)?;
                if view.shape() != shape {
                    bail!(
                        "tensor `{name}` has shape {:?} in the weights but the config implies {shape:?} (config.json does not match the weights)",
                        view.shape()
                    );
                }
                if DType::try_from(view.dtype()).ok() == Some(DType::F8E4M3) {
                    return Ok(fp8_tensor(files, name, *fp8, paths)?.to_device(dev)?);
                }
                files.load(name, dev).with_context(|| format!("cannot load tensor `{name}`"))?
            }
            Weights::Gguf { header, file, path, unpermute } => {
                let gguf = GgufFile { header, file, path };
                let t = match source(name, header).with_context(|| format!("no GGUF name for tensor `{name}`"))? {
                    GgufSource::SplitKvB { k_b, v_b } => gguf.kv_b(&k_b, &v_b, shape)?,
                    src => gguf.blocks(&src, shape)?.dequantize(&Device::Cpu)?,
                };
                // The converter permutes q/k biases as it does their rows.
                let t = match (unpermute, name) {
                    (Some((nh, _)), n) if n.ends_with("q_proj.weight") => unpermute_rows(&t, *nh)?,
                    (Some((_, nkv)), n) if n.ends_with("k_proj.weight") => unpermute_rows(&t, *nkv)?,
                    (Some((nh, _)), n) if n.ends_with("q_proj.bias") => unpermute_bias(&t, *nh)?,
                    (Some((_, nkv)), n) if n.ends_with("k_proj.bias") => unpermute_bias(&t, *nkv)?,
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
        let Weights::Gguf { header, file, path, unpermute } = self else { return Ok(None) };
        let src = source(name, header).with_context(|| format!("no GGUF name for tensor `{name}`"))?;
        if matches!(src, GgufSource::SplitKvB { .. }) {
            return Ok(None);
        }
        let q = GgufFile { header, file, path }.blocks(&src, shape)?;
        if matches!(q.dtype(), GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16) {
            return Ok(None);
        }
        Ok(Some(match (unpermute, name) {
            (Some((nh, _)), n) if n.ends_with("q_proj.weight") => unpermute_block_rows(&q, *nh)?,
            (Some((_, nkv)), n) if n.ends_with("k_proj.weight") => unpermute_block_rows(&q, *nkv)?,
            _ => q,
        }))
    }

    /// A weight by HF name (`shape`, `[out, in]`) in ggml's MXFP4 blocks, where the file stores it
    /// in MXFP4 (GPT-OSS's experts); `None` otherwise.
    pub fn get_mxfp4(&self, name: &str, shape: &[usize]) -> Result<Option<Vec<u8>>> {
        match self {
            Weights::Safetensors { files, .. } => match stored_name(files, name) {
                Stored::Oai(o) => o.mxfp4_blocks(files, shape),
                _ => Ok(None),
            },
            Weights::Gguf { header, file, path, .. } => match source(name, header) {
                Some(GgufSource::Expert { stacked, index, half }) if header.mxfp4.contains_key(&stacked) => {
                    Ok(Some(GgufFile { header, file, path }.mxfp4_expert_bytes(&stacked, index, half, shape)?))
                }
                _ => Ok(None),
            },
        }
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
        // Rows that split into no block format (every one needs a multiple of 32) stay dense.
        let blockable = inp.is_multiple_of(GgmlDType::Q8_0.block_size());
        let blocks = match form {
            WeightForm::Dense | WeightForm::DenseRoundedF16 => {
                return Ok(Proj::Dense(Linear::new(dense_f32(&wname, &[out, inp])?, b)));
            }
            _ if !blockable => return Ok(Proj::Dense(Linear::new(dense_f32(&wname, &[out, inp])?, b))),
            WeightForm::Quantized => {
                // MXFP4 (GPT-OSS's experts) runs in its own blocks, which candle cannot hold.
                if let Some(blocks) = self.get_mxfp4(&wname, &[out, inp])? {
                    return Ok(Proj::Mxfp4 { blocks: std::sync::Arc::new(blocks), shape: (out, inp), bias: b });
                }
                match self.get_blocks(&wname, &[out, inp])? {
                    Some(q) if has_fast_kernel(q.dtype()) => q,
                    Some(q) => quantize_rows(&q.dequantize(&Device::Cpu)?, GgmlDType::Q8_0)?,
                    None => quantize_rows(&dense_f32(&wname, &[out, inp])?, GgmlDType::Q8_0)?,
                }
            }
            WeightForm::Requantized(dt) => quantize_rows(&dense_f32(&wname, &[out, inp])?, dt)?,
        };
        Proj::quantized(blocks, b)
    }
}

/// The index of a sharded safetensors checkpoint.
const SHARD_INDEX: &str = "model.safetensors.index.json";

/// The shard files `index` (a `model.safetensors.index.json`) maps tensors to, in name order,
/// each checked to exist beside it.
fn indexed_shards(index: &Path) -> Result<Vec<PathBuf>> {
    let text = std::fs::read_to_string(index).with_context(|| format!("cannot read {}", index.display()))?;
    let v: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", index.display()))?;
    let map = v
        .get("weight_map")
        .and_then(|m| m.as_object())
        .with_context(|| format!("{} has no `weight_map` object", index.display()))?;
    let mut names: Vec<&str> = Vec::with_capacity(map.len());
    for (tensor, file) in map {
        let file = file
            .as_str()
            .filter(|f| !f.is_empty() && Path::new(f).file_name() == Some(std::ffi::OsStr::new(f)))
            .with_context(|| format!("{}: tensor `{tensor}` maps to {file}, not a file name", index.display()))?;
        names.push(file);
    }
    names.sort_unstable();
    names.dedup();
    let dir = index.parent().unwrap_or(Path::new("."));
    let shards: Vec<PathBuf> = names.iter().map(|n| dir.join(n)).collect();
    if shards.is_empty() {
        bail!("{} maps no tensor to a shard", index.display());
    }
    if let Some(missing) = shards.iter().find(|p| !p.exists()) {
        bail!(
            "{} lists shard {}, which is not in {} (an interrupted download?)",
            index.display(),
            missing.file_name().map_or_else(String::new, |n| n.to_string_lossy().into_owned()),
            dir.display()
        );
    }
    Ok(shards)
}

/// Where a tensor asked for by its HF name is stored in a safetensors checkpoint.
enum Stored {
    /// Under this name: its own, or Mixtral's (`block_sparse_moe.gate`, `experts.E.w1/w3/w2` for
    /// `mlp.gate`, `mlp.experts.E.gate_proj/up_proj/down_proj`).
    Named(String),
    /// One expert of a packed layer.
    Packed(PackedExpert),
    /// One expert's weight or bias in a GPT-OSS layer.
    Oai(OaiExpert),
    /// One projection's rows of a fused tensor (Phi-3's `qkv_proj`, `gate_up_proj`).
    Fused {
        /// The fused tensor.
        fused: String,
        /// Which projection.
        part: FusedPart,
    },
    /// Nowhere.
    Missing,
}

/// Where `name` is stored in `files` (see [`Stored`]).
fn stored_name(files: &candle_core::safetensors::MmapedSafetensors, name: &str) -> Stored {
    if files.get(name).is_ok() {
        return Stored::Named(name.to_string());
    }
    if let Some(o) = OaiExpert::of(name, files) {
        return Stored::Oai(o);
    }
    if let Some(p) = PackedExpert::of(name).filter(|p| files.get(&p.packed).is_ok()) {
        return Stored::Packed(p);
    }
    if let Some((part, fused)) = FusedPart::of(name).filter(|(_, f)| files.get(f).is_ok()) {
        return Stored::Fused { fused, part };
    }
    if let Some(m) = mixtral_name(name).filter(|m| files.get(m).is_ok()) {
        return Stored::Named(m);
    }
    // GPT-OSS names its router `mlp.router`.
    if let Some(r) = name.split_once(".mlp.gate.").map(|(layer, what)| format!("{layer}.mlp.router.{what}")) {
        if files.get(&r).is_ok() {
            return Stored::Named(r);
        }
    }
    match language_model_names(name).into_iter().find(|m| files.get(m).is_ok()) {
        Some(m) => Stored::Named(m),
        None => Stored::Missing,
    }
}

/// Where a multimodal checkpoint (Gemma 3's `Gemma3ForConditionalGeneration`) keeps a decoder
/// tensor: under `language_model.model.` (transformers before 4.52) or `model.language_model.`.
fn language_model_names(name: &str) -> Vec<String> {
    match (name.strip_prefix("model."), name) {
        (Some(rest), _) => vec![format!("language_model.model.{rest}"), format!("model.language_model.{rest}")],
        (None, "lm_head.weight") => vec!["language_model.lm_head.weight".into()],
        _ => vec![],
    }
}

/// The FP8 tensor `name` dequantized to f32 on the CPU under `scheme`, with its scale: `name`
/// with `weight` replaced by `weight_scale_inv` (fine-grained FP8) or else by `weight_scale`.
fn fp8_tensor(
    files: &candle_core::safetensors::MmapedSafetensors,
    name: &str,
    scheme: Option<Fp8Scheme>,
    paths: &[PathBuf],
) -> Result<Tensor> {
    let scheme = scheme.with_context(|| {
        format!(
            "tensor `{name}` is stored as FP8, but config.json has no `quantization_config` saying how it is scaled"
        )
    })?;
    let stem = name.strip_suffix("weight").with_context(|| format!("FP8 tensor `{name}` is not a weight"))?;
    let scale = [format!("{stem}weight_scale_inv"), format!("{stem}weight_scale")]
        .into_iter()
        .find(|n| files.get(n).is_ok())
        .with_context(|| {
            format!(
                "FP8 tensor `{name}` has no scale (`{stem}weight_scale_inv` or `{stem}weight_scale`) in {}",
                display_paths(paths)
            )
        })?;
    let w = files.load(name, &Device::Cpu).with_context(|| format!("cannot load tensor `{name}`"))?;
    let s = files.load(&scale, &Device::Cpu).with_context(|| format!("cannot load tensor `{scale}`"))?;
    fp8::dequantize(name, &w, &s, scheme)
}

/// The `shape` (`[out, in]`) rows of `part` in the fused safetensors tensor `fused`, read from
/// those rows' bytes alone.
fn fused_rows(
    files: &candle_core::safetensors::MmapedSafetensors,
    fused: &str,
    part: FusedPart,
    shape: &[usize],
    dev: &Device,
) -> Result<Tensor> {
    let view = files.get(fused)?;
    let (&[rows, inp], &[out, want_in]) = (view.shape(), shape) else {
        bail!("fused tensor `{fused}` has shape {:?}; a matrix of {shape:?} rows is asked for", view.shape());
    };
    if inp != want_in {
        bail!("fused tensor `{fused}` has rows of {inp}, but the config implies {want_in} (config.json does not match the weights)");
    }
    let first = part.first_row(rows, out, fused)?;
    let dtype = DType::try_from(view.dtype()).with_context(|| format!("tensor `{fused}`"))?;
    if dtype == DType::F8E4M3 {
        bail!("fused tensor `{fused}` is stored as FP8, which is read only for unfused weights");
    }
    let row = inp * dtype.size_in_bytes();
    let bytes =
        view.data().get(first * row..(first + out) * row).with_context(|| format!("tensor `{fused}` is truncated"))?;
    let t = Tensor::from_raw_buffer(bytes, dtype, shape, &Device::Cpu)
        .with_context(|| format!("cannot read the {part:?} rows of `{fused}`"))?;
    Ok(t.to_device(dev)?.to_dtype(DType::F32)?)
}

/// Mixtral's name for an MoE tensor named as Qwen's and DeepSeek's are.
fn mixtral_name(name: &str) -> Option<String> {
    let (layer, rest) = name.split_once(".mlp.")?;
    let rest = match rest.strip_prefix("experts.") {
        None if rest == "gate.weight" => rest.to_string(),
        None => return None,
        Some(expert) => {
            let (index, proj) = expert.split_once('.')?;
            let w = match proj {
                "gate_proj.weight" => "w1",
                "up_proj.weight" => "w3",
                "down_proj.weight" => "w2",
                _ => return None,
            };
            format!("experts.{index}.{w}.weight")
        }
    };
    Some(format!("{layer}.block_sparse_moe.{rest}"))
}

/// Where a per-expert HF name (`...mlp.experts.E.{gate,up,down}_proj.weight`) lies in a
/// checkpoint that packs every expert of a layer, as transformers 5 saves them:
/// `...mlp.experts.gate_up_proj` `[experts, 2 x width, hidden]` (each expert's gate rows, then its
/// up rows) and `...mlp.experts.down_proj` `[experts, hidden, width]`.
struct PackedExpert {
    /// The packed tensor.
    packed: String,
    /// Which expert.
    index: usize,
    /// Which rows of the expert's block: the first or second half of `gate_up_proj` (`Some(0)`,
    /// `Some(1)`), or all of `down_proj` (`None`).
    half: Option<usize>,
}

impl PackedExpert {
    /// The packed source of `name`, when it names one expert's projection.
    fn of(name: &str) -> Option<Self> {
        let (layer, rest) = name.split_once(".mlp.experts.")?;
        let (index, proj) = rest.split_once('.')?;
        let (packed, half) = match proj {
            "gate_proj.weight" => ("gate_up_proj", Some(0)),
            "up_proj.weight" => ("gate_up_proj", Some(1)),
            "down_proj.weight" => ("down_proj", None),
            _ => return None,
        };
        Some(Self { packed: format!("{layer}.mlp.experts.{packed}"), index: index.parse().ok()?, half })
    }

    /// The expert's `shape` (`[out, in]`) rows of the packed tensor (`dims`, `dtype`, its mapped
    /// bytes `data`), read from that expert's bytes alone (a packed layer of a large model is
    /// gigabytes).
    fn load(&self, dims: &[usize], dtype: DType, data: &[u8], shape: &[usize], dev: &Device) -> Result<Tensor> {
        let &[out, inp] = shape else { bail!("tensor `{}`: experts are matrices, not {shape:?}", self.packed) };
        let rows = if self.half.is_some() { 2 * out } else { out };
        if dims.len() != 3 || dims[1] != rows || dims[2] != inp || self.index >= dims[0] {
            bail!(
                "packed expert tensor `{}` has shape {dims:?}, but expert {} of shape [{rows}, {inp}] is asked for \
                 (config.json does not match the weights)",
                self.packed,
                self.index
            );
        }
        if dtype == DType::F8E4M3 {
            bail!("packed expert tensor `{}` is stored as FP8, which is read only for per-expert weights", self.packed);
        }
        let size = dtype.size_in_bytes();
        let start = (self.index * rows + self.half.unwrap_or(0) * out) * inp * size;
        let bytes = data
            .get(start..start + out * inp * size)
            .with_context(|| format!("tensor `{}` is truncated", self.packed))?;
        let t = Tensor::from_raw_buffer(bytes, dtype, shape, &Device::Cpu)
            .with_context(|| format!("cannot read expert {} of `{}`", self.index, self.packed))?;
        Ok(t.to_device(dev)?.to_dtype(DType::F32)?)
    }
}

/// An open GGUF file, read tensor by tensor.
struct GgufFile<'a> {
    header: &'a GgufHeader,
    file: &'a Mutex<File>,
    path: &'a Path,
}

impl GgufFile<'_> {
    /// The tensor `src` (a whole tensor or one expert of a stacked one) in its file format,
    /// checked to have `shape`.
    fn blocks(&self, src: &GgufSource, shape: &[usize]) -> Result<QTensor> {
        match src {
            GgufSource::Whole(g) => {
                let info = self.info(g)?;
                // Leading ones aside (llama.cpp stores a `[1, n]` matrix as a vector).
                let squeeze = |d: &[usize]| d.iter().skip_while(|&&x| x == 1).copied().collect::<Vec<_>>();
                if squeeze(info.shape.dims()) != squeeze(shape) {
                    bail!(
                        "tensor `{g}` has shape {:?} in {} but the metadata implies {shape:?}",
                        info.shape.dims(),
                        self.path.display()
                    );
                }
                let mut f = self.file.lock().expect("weights file lock poisoned");
                let q = self
                    .header
                    .content
                    .tensor(&mut *f, g, &Device::Cpu)
                    .with_context(|| format!("cannot read tensor `{g}` from {}", self.path.display()))?;
                if q.shape().dims() == shape {
                    return Ok(q);
                }
                Ok(QTensor::quantize(&q.dequantize(&Device::Cpu)?.reshape(shape)?, GgmlDType::F32)?)
            }
            GgufSource::Expert { stacked, index, half } if self.header.mxfp4.contains_key(stacked) => {
                let (&[out, inp], bytes) = (shape, self.mxfp4_expert_bytes(stacked, *index, *half, shape)?) else {
                    bail!("tensor `{stacked}`: experts are matrices, not {shape:?}")
                };
                let mut values = Vec::with_capacity(out * inp);
                mxfp4::dequantize_ggml(&bytes, &mut values);
                Ok(QTensor::quantize(&Tensor::from_vec(values, (out, inp), &Device::Cpu)?, GgmlDType::F32)?)
            }
            GgufSource::Expert { stacked, index, half } => self.expert(stacked, *index, *half, shape),
            GgufSource::ExpertBias { stacked, index, half } => self.expert_bias(stacked, *index, *half, shape),
            GgufSource::Rows { fused, part } => self.rows(fused, *part, shape),
            GgufSource::SplitKvB { .. } => {
                bail!("`kv_b_proj` of {} is split: it has no single format", self.path.display())
            }
        }
    }

    fn info(&self, g: &str) -> Result<&gguf_file::TensorInfo> {
        self.header
            .content
            .tensor_infos
            .get(g)
            .with_context(|| format!("tensor `{g}` is missing from {}", self.path.display()))
    }

    /// Expert `index` (`shape`, `[out, in]`) of `stacked` (`[experts, out, in]`): only its rows'
    /// bytes are read, since experts are stored one after another.
    fn expert(&self, stacked: &str, index: usize, half: Option<usize>, shape: &[usize]) -> Result<QTensor> {
        let info = self.info(stacked)?;
        let dims = info.shape.dims();
        let halves = if half.is_some() { 2 } else { 1 };
        let fits = matches!((dims, shape), ([n, o, i], [so, si]) if index < *n && *o == halves * so && i == si);
        if !fits {
            let what = if half.is_some() { "a fused gate/up pair" } else { "one matrix" };
            bail!(
                "tensor `{stacked}` has shape {dims:?} in {}, but the metadata implies expert {index} of shape {shape:?} \
                 ({what} per expert)",
                self.path.display()
            );
        }
        let (out, inp, dt) = (shape[0], dims[2], info.ggml_dtype);
        if !inp.is_multiple_of(dt.block_size()) {
            bail!("tensor `{stacked}`: rows of {inp} do not split into {dt:?} blocks");
        }
        let slab = out * (inp / dt.block_size()) * dt.type_size();
        let at = (index * halves + half.unwrap_or(0)) * slab;
        let bytes = self.read(info.offset, at, slab, &format!("expert {index} of `{stacked}`"))?;
        block_tensor(bytes, dt, (out, inp))
    }

    /// `len` bytes from `at` in the data of the tensor whose data starts at `offset`.
    fn read(&self, offset: u64, at: usize, len: usize, what: &str) -> Result<Vec<u8>> {
        let mut bytes = vec![0u8; len];
        let mut f = self.file.lock().expect("weights file lock poisoned");
        f.seek(SeekFrom::Start(self.header.content.tensor_data_offset + offset + at as u64))
            .and_then(|_| f.read_exact(&mut bytes))
            .with_context(|| format!("cannot read {what} from {}", self.path.display()))?;
        Ok(bytes)
    }

    /// The MXFP4 blocks of expert `index` (`shape`, `[out, in]`) of `stacked` (`[experts, out,
    /// in]`, or a fused gate/up stack `[experts, 2 x out, in]` with `half`): only its bytes are
    /// read.
    fn mxfp4_expert_bytes(&self, stacked: &str, index: usize, half: Option<usize>, shape: &[usize]) -> Result<Vec<u8>> {
        let t = self.header.mxfp4.get(stacked).with_context(|| format!("tensor `{stacked}` is not MXFP4"))?;
        let (dims, path) = (&t.shape, self.path.display());
        let &[out, inp] = shape else { bail!("tensor `{stacked}`: experts are matrices, not {shape:?}") };
        let halves = if half.is_some() { 2 } else { 1 };
        if !matches!(dims.as_slice(), [n, o, i] if index < *n && *o == halves * out && *i == inp) {
            bail!("tensor `{stacked}` has shape {dims:?} in {path}, but the metadata implies expert {index} of shape {shape:?}");
        }
        let slab = out * inp / mxfp4::BLOCK * mxfp4::GGML_BLOCK_BYTES;
        self.read(
            t.offset,
            (index * halves + half.unwrap_or(0)) * slab,
            slab,
            &format!("expert {index} of `{stacked}`"),
        )
    }

    /// Row `index` of the stacked expert biases `stacked` (`[experts, out]` in f32 or f16, or for
    /// a fused gate/up `[experts, 2 x out]` with `half`), checked to have `shape` (`[out]`): only
    /// its bytes are read.
    fn expert_bias(&self, stacked: &str, index: usize, half: Option<usize>, shape: &[usize]) -> Result<QTensor> {
        let info = self.info(stacked)?;
        let dims = info.shape.dims();
        let halves = if half.is_some() { 2 } else { 1 };
        if !matches!((dims, shape), ([n, o], [so]) if index < *n && *o == halves * so) {
            bail!(
                "tensor `{stacked}` has shape {dims:?} in {}, but the metadata implies expert {index}'s bias of shape {shape:?}",
                self.path.display()
            );
        }
        let dt = info.ggml_dtype;
        if !matches!(dt, GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16) {
            bail!("tensor `{stacked}` is stored as {dt:?}; expert biases are read in f32, f16 or bf16");
        }
        let (out, size) = (shape[0], dt.type_size());
        let at = (index * halves + half.unwrap_or(0)) * out * size;
        let bytes = self.read(info.offset, at, out * size, &format!("expert {index}'s bias of `{stacked}`"))?;
        let row = block_tensor(bytes, dt, (1, out))?.dequantize(&Device::Cpu)?.reshape(out)?;
        Ok(QTensor::quantize(&row, GgmlDType::F32)?)
    }

    /// The `shape` (`[out, in]`) rows of `part` in the fused tensor `fused`: only those rows'
    /// bytes are read, since a row's blocks are stored together.
    fn rows(&self, fused: &str, part: FusedPart, shape: &[usize]) -> Result<QTensor> {
        let info = self.info(fused)?;
        let (&[rows, inp], &[out, want_in]) = (info.shape.dims(), shape) else {
            bail!(
                "tensor `{fused}` has shape {:?} in {}; a matrix of {shape:?} rows is asked for",
                info.shape.dims(),
                self.path.display()
            );
        };
        if inp != want_in {
            bail!("tensor `{fused}` has rows of {inp} in {}, but the metadata implies {want_in}", self.path.display());
        }
        let first = part.first_row(rows, out, fused)?;
        let dt = info.ggml_dtype;
        if !inp.is_multiple_of(dt.block_size()) {
            bail!("tensor `{fused}`: rows of {inp} do not split into {dt:?} blocks");
        }
        let row = (inp / dt.block_size()) * dt.type_size();
        let mut bytes = vec![0u8; out * row];
        let start = self.header.content.tensor_data_offset + info.offset + (first * row) as u64;
        let mut f = self.file.lock().expect("weights file lock poisoned");
        f.seek(SeekFrom::Start(start))
            .and_then(|_| f.read_exact(&mut bytes))
            .with_context(|| format!("cannot read the {part:?} rows of `{fused}` from {}", self.path.display()))?;
        block_tensor(bytes, dt, (out, inp))
    }

    /// `kv_b_proj` (`shape`: `[heads * (nope + v), rank]`, each head's key rows then value
    /// rows) from `attn_k_b` (`[heads, rank, nope]`) and `attn_v_b` (`[heads, v, rank]`).
    fn kv_b(&self, k_b: &str, v_b: &str, shape: &[usize]) -> Result<Tensor> {
        let (ki, vi) = (self.info(k_b)?, self.info(v_b)?);
        let (kd, vd) = (ki.shape.dims(), vi.shape.dims());
        let consistent = matches!((kd, vd, shape), ([h, r, nope], [h2, v, r2], [rows, rank])
            if h == h2 && r == r2 && r == rank && h * (nope + v) == *rows);
        if !consistent {
            bail!(
                "tensors `{k_b}` {kd:?} and `{v_b}` {vd:?} in {} do not form `kv_b_proj` of shape {shape:?} \
                 ([heads, rank, nope] and [heads, v, rank] expected)",
                self.path.display()
            );
        }
        let read = |g: &str, dims: &[usize]| -> Result<Tensor> {
            Ok(self.blocks(&GgufSource::Whole(g.to_string()), dims)?.dequantize(&Device::Cpu)?)
        };
        let k = read(k_b, kd)?.transpose(1, 2)?;
        let v = read(v_b, vd)?;
        Ok(Tensor::cat(&[k, v], 1)?.reshape((shape[0], shape[1]))?)
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
/// [`unpermute_rows`] for a bias (one value per row).
fn unpermute_bias(b: &Tensor, heads: usize) -> Result<Tensor> {
    let n = b.dims1()?;
    Ok(unpermute_rows(&b.reshape((n, 1))?, heads)?.reshape(n)?)
}

fn unpermute_rows(w: &Tensor, heads: usize) -> Result<Tensor> {
    let (out, inp) = w.dims2()?;
    let hd = out / heads;
    Ok(w.reshape((heads, hd / 2, 2, inp))?.transpose(1, 2)?.contiguous()?.reshape((out, inp))?)
}

/// The GGUF tensor of RoPE frequency divisors (llama.cpp's form of Llama 3's scaling).
const ROPE_FREQS: &str = "rope_freqs.weight";
