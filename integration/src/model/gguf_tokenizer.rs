//! Builds a `tokenizers::Tokenizer` from the metadata of a GGUF file (byte-level BPE, `gpt2`).

use anyhow::{bail, Context, Result};
use candle_core::quantized::gguf_file::{Content, Value};
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::{AddedToken, Tokenizer};

fn strings(c: &Content, key: &str) -> Result<Vec<String>> {
    let v = c.metadata.get(key).with_context(|| format!("GGUF has no `{key}`: cannot build a tokenizer"))?;
    v.to_vec()
        .map_err(|e| anyhow::anyhow!("GGUF `{key}`: {e}"))?
        .iter()
        .map(|x| x.to_string().cloned().map_err(|e| anyhow::anyhow!("GGUF `{key}`: {e}")))
        .collect()
}

/// The one `tokenizer.ggml.pre` this module builds.
pub const SUPPORTED_PRE: &str = "smollm";

/// The tokenizer described by `tokenizer.ggml.*` (model `gpt2`, pre-tokenizer `smollm`): BPE over
/// the vocabulary and merges, single-digit splitting then byte-level pre-tokenisation, control
/// tokens special.
pub fn from_gguf(c: &Content) -> Result<Tokenizer> {
    let model = c.metadata.get("tokenizer.ggml.model").and_then(|v| v.to_string().ok().cloned()).unwrap_or_default();
    if model != "gpt2" {
        bail!(
            "GGUF tokenizer model `{model}` is not supported (supported: gpt2 byte-level BPE); pass a tokenizer.json"
        );
    }
    // The pre-tokenizer built below is SmolLM2's (`smollm`: single digits, then GPT-2's byte-level
    // split). Other models split differently (Llama 3's `llama-bpe` keeps runs of three digits,
    // ...), and tokenizing them this way would be silently wrong.
    let pre = c.metadata.get("tokenizer.ggml.pre").and_then(|v| v.to_string().ok().cloned());
    if pre.as_deref() != Some(SUPPORTED_PRE) {
        bail!(
            "GGUF pre-tokenizer `{}` is not supported (supported: {SUPPORTED_PRE}); use the model's HF directory, whose \
             tokenizer.json describes it",
            pre.as_deref().unwrap_or("(none: tokenizer.ggml.pre is missing)")
        );
    }
    let tokens = strings(c, "tokenizer.ggml.tokens")?;
    let merges: Vec<(String, String)> = strings(c, "tokenizer.ggml.merges")?
        .into_iter()
        .map(|m| {
            let (a, b) = m.split_once(' ').with_context(|| format!("bad merge `{m}`"))?;
            Ok((a.to_string(), b.to_string()))
        })
        .collect::<Result<_>>()?;
    let types: Vec<i64> = match c.metadata.get("tokenizer.ggml.token_type") {
        Some(Value::Array(a)) => a.iter().map(|x| x.to_i32().map(i64::from).unwrap_or(1)).collect(),
        _ => vec![1; tokens.len()],
    };
    let vocab: tokenizers::models::bpe::Vocab = tokens.iter().enumerate().map(|(i, t)| (t.clone(), i as u32)).collect();
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .build()
        .map_err(|e| anyhow::anyhow!("cannot build BPE from GGUF: {e}"))?;
    let mut tok = Tokenizer::new(bpe);
    let pre = Sequence::new(vec![
        PreTokenizerWrapper::Digits(Digits::new(true)),
        PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, true)),
    ]);
    tok.with_pre_tokenizer(Some(pre));
    tok.with_decoder(Some(ByteLevelDecoder::default()));
    let special: Vec<AddedToken> = tokens
        .iter()
        .zip(&types)
        .filter(|(_, &t)| t == 3 || t == 4)
        .map(|(s, _)| AddedToken::from(s.clone(), true))
        .collect();
    tok.add_special_tokens(&special);
    Ok(tok)
}
