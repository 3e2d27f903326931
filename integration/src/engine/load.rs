//! Loading a model: an HF-style directory, a GGUF file, or a bare `config.json` with random
//! weights, with the tokenizer and chat template it ships.

use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::Device;
use tokenizers::Tokenizer;

use crate::model::chat_template::ChatTemplate;
use crate::model::{Llama, ModelConfig, WeightForm, Weights};

/// A model with its tokenizer (when it has one).
pub struct LoadedModel {
    /// The runtime.
    pub model: Llama,
    /// Tokenizer from `tokenizer.json` or GGUF metadata.
    pub tokenizer: Option<Tokenizer>,
    /// Chat template from the GGUF metadata or the HF directory (ChatML with their special
    /// tokens when they give none); `None` for a bare safetensors file.
    pub chat_template: Option<ChatTemplate>,
}

/// Loads an HF-style directory (config.json, *.safetensors, optional tokenizer.json), a GGUF file,
/// or, given a bare `config.json` file, a model of that shape with random weights (for speed and
/// memory work only; a `tokenizer.json` beside it is used if present). Linear layers are held in
/// `form` (random weights are always dense).
pub fn load_model(path: &Path, device: &Device, form: WeightForm) -> Result<LoadedModel> {
    if path.is_file() && path.extension().is_some_and(|x| x == "json") {
        let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
        let cfg = ModelConfig::from_hf_json(&text).with_context(|| format!("in {}", path.display()))?;
        check_fits_in_memory(cfg.approx_weight_count() * 4)
            .with_context(|| format!("random weights for {}", path.display()))?;
        eprintln!("model {}: RANDOM weights of this shape (speed and memory work only)", path.display());
        let model = Llama::random(cfg, device, candle_core::DType::F32)?;
        let tok_path = path.with_file_name("tokenizer.json");
        let tokenizer = if tok_path.exists() {
            Some(Tokenizer::from_file(&tok_path).map_err(|e| anyhow::anyhow!("{}: {e}", tok_path.display()))?)
        } else {
            None
        };
        let chat_template = Some(ChatTemplate::from_hf_dir(path.parent().unwrap_or(Path::new(".")))?);
        return Ok(LoadedModel { model, tokenizer, chat_template });
    }
    if path.is_dir() {
        let cfg_path = path.join("config.json");
        let text = std::fs::read_to_string(&cfg_path)
            .with_context(|| format!("model directory {} has no readable config.json", path.display()))?;
        let mut cfg = ModelConfig::from_hf_json(&text).with_context(|| format!("in {}", cfg_path.display()))?;
        for id in generation_eos(path)? {
            if !cfg.eos_token_ids.contains(&id) {
                cfg.eos_token_ids.push(id);
            }
        }
        check_dense_fits(&cfg, form).with_context(|| format!("model directory {}", path.display()))?;
        let weights = Weights::open_safetensors_dir(path)
            .with_context(|| format!("model directory {}", path.display()))?
            .with_fp8(cfg.fp8);
        let model = Llama::load(cfg, &weights, device, form)?;
        let tok_path = path.join("tokenizer.json");
        let tokenizer = if tok_path.exists() {
            Some(Tokenizer::from_file(&tok_path).map_err(|e| anyhow::anyhow!("{}: {e}", tok_path.display()))?)
        } else {
            None
        };
        let chat_template = Some(ChatTemplate::from_hf_dir(path)?);
        Ok(LoadedModel { model, tokenizer, chat_template })
    } else if path.is_file() {
        let (weights, cfg) = Weights::open_gguf(path)?;
        check_dense_fits(&cfg, form).with_context(|| format!("{} with weights = \"dense\"", path.display()))?;
        let (tokenizer, chat_template) = match &weights {
            Weights::Gguf { header, .. } => {
                let content = &header.content;
                (Some(crate::model::gguf_tokenizer::from_gguf(content)?), Some(ChatTemplate::from_gguf(content)?))
            }
            Weights::Safetensors { .. } => (None, None),
        };
        let model = Llama::load(cfg, &weights, device, form)?;
        Ok(LoadedModel { model, tokenizer, chat_template })
    } else {
        bail!("model path {} does not exist (expected a GGUF file or an HF-style directory)", path.display())
    }
}

/// The end-of-sequence tokens of `dir`'s `generation_config.json`, when it has one: they end
/// generation besides config.json's, as vLLM and transformers' `generate` take them (Phi-3's
/// `<|end|>` and Llama 3's `<|eot_id|>` are only there in some checkpoints).
fn generation_eos(dir: &Path) -> Result<Vec<u32>> {
    let path = dir.join("generation_config.json");
    if !path.exists() {
        return Ok(Vec::new());
    }
    let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
    let v: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", path.display()))?;
    let ids = match v.get("eos_token_id") {
        None | Some(serde_json::Value::Null) => Some(Vec::new()),
        Some(serde_json::Value::Array(a)) => a.iter().map(|x| x.as_u64().and_then(|x| u32::try_from(x).ok())).collect(),
        Some(x) => x.as_u64().and_then(|x| u32::try_from(x).ok()).map(|x| vec![x]),
    };
    ids.with_context(|| format!("{}: `eos_token_id` must be a token id or a list of them", path.display()))
}

/// The machine's physical memory in bytes (`MemTotal` of `/proc/meminfo`; `None` where it cannot
/// be read).
pub fn physical_memory_bytes() -> Option<u128> {
    let m = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib =
        m.lines().find_map(|l| l.strip_prefix("MemTotal:")?.trim().strip_suffix("kB")?.trim().parse::<u128>().ok());
    kib.map(|k| k * 1024)
}

/// Refuses an allocation of `bytes` that exceeds the machine's physical memory (no limit where it
/// cannot be read): the allocator would abort the process.
/// Refuses a dense load (4 bytes per weight) that would not fit in the machine's memory, before
/// anything is read: dequantizing a large quantized file would otherwise end in the kernel's
/// out-of-memory kill.
fn check_dense_fits(cfg: &ModelConfig, form: WeightForm) -> Result<()> {
    if form.is_quantized() {
        return Ok(());
    }
    check_fits_in_memory(cfg.loaded_weight_count() * 4).context(
        "dequantized to f32; [model] weights = \"quantized\" keeps a GGUF file's block formats (and MXFP4 experts)",
    )
}

fn check_fits_in_memory(bytes: u128) -> Result<()> {
    if let Some(total) = physical_memory_bytes().filter(|&t| bytes > t) {
        bail!(
            "a model of this shape needs about {:.1} GiB, more than this machine's {:.1} GiB of memory",
            bytes as f64 / (1u64 << 30) as f64,
            total as f64 / (1u64 << 30) as f64
        );
    }
    Ok(())
}
