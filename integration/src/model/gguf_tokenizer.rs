//! Builds a `tokenizers::Tokenizer` from the metadata of a GGUF file, tokenizing as llama.cpp
//! does: byte-level BPE (`gpt2`) for the pre-tokenizers it names, SentencePiece BPE (`llama`).

use anyhow::{bail, Context, Result};
use candle_core::quantized::gguf_file::{Content, Value};
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::DecoderWrapper;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::normalizers::{Prepend, Replace, Sequence as NormalizerSequence};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, NormalizerWrapper, SplitDelimiterBehavior, Tokenizer};

fn strings(c: &Content, key: &str) -> Result<Vec<String>> {
    let v = c.metadata.get(key).with_context(|| format!("GGUF has no `{key}`: cannot build a tokenizer"))?;
    v.to_vec()
        .map_err(|e| anyhow::anyhow!("GGUF `{key}`: {e}"))?
        .iter()
        .map(|x| x.to_string().cloned().map_err(|e| anyhow::anyhow!("GGUF `{key}`: {e}")))
        .collect()
}

/// How llama.cpp splits text before BPE, per `tokenizer.ggml.pre`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PreTokenizer {
    /// SmolLM2's (`smollm`): single digits, then GPT-2's byte-level split.
    SmolLm,
    /// Llama 3's (`llama-bpe`): runs of up to three digits; whole words found in the vocabulary
    /// skip the merges; BOS added by default.
    Llama3,
    /// Qwen2's and Qwen3's (`qwen2`): single digits.
    Qwen2,
}

/// The `tokenizer.ggml.pre` names this module builds, each with the split llama.cpp gives it.
pub const SUPPORTED_PRE: &[&str] = &["smollm", "llama-bpe", "llama3", "llama-v3", "qwen2", "deepseek-r1-qwen"];

/// Llama 3's split, as its tokenizer.json gives it (llama.cpp's `LLAMA3`).
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Qwen2's split, as its tokenizer.json gives it (llama.cpp's `QWEN2`).
const QWEN2_SPLIT: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

impl PreTokenizer {
    fn named(pre: Option<&str>) -> Result<Self> {
        Ok(match pre {
            Some("smollm") => Self::SmolLm,
            Some("llama-bpe" | "llama3" | "llama-v3") => Self::Llama3,
            Some("qwen2" | "deepseek-r1-qwen") => Self::Qwen2,
            // Another split would tokenize the text the wrong way without any error.
            other => bail!(
                "GGUF pre-tokenizer `{}` is not supported (supported: {}); use the model's HF directory, whose \
                 tokenizer.json describes it",
                other.unwrap_or("(none: tokenizer.ggml.pre is missing)"),
                SUPPORTED_PRE.join(", ")
            ),
        })
    }

    fn build(self) -> Result<Sequence> {
        let split = |pattern: &str| -> Result<PreTokenizerWrapper> {
            let split = Split::new(SplitPattern::Regex(pattern.into()), SplitDelimiterBehavior::Isolated, false)
                .map_err(|e| anyhow::anyhow!("cannot build the pre-tokenizer: {e}"))?;
            Ok(PreTokenizerWrapper::Split(split))
        };
        let bytes_only = PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, false));
        Ok(Sequence::new(match self {
            Self::SmolLm => vec![
                PreTokenizerWrapper::Digits(Digits::new(true)),
                PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, true)),
            ],
            Self::Llama3 => vec![split(LLAMA3_SPLIT)?, bytes_only],
            Self::Qwen2 => vec![split(QWEN2_SPLIT)?, bytes_only],
        }))
    }
}

/// Token types of `tokenizer.ggml.token_type` (llama.cpp's `llama_token_type`).
const CONTROL: i64 = 3;
const USER_DEFINED: i64 = 4;
const BYTE: i64 = 6;

/// The tokenizer described by `tokenizer.ggml.*`, tokenizing as llama.cpp does: byte-level BPE
/// (model `gpt2`) split as llama.cpp splits for its `tokenizer.ggml.pre`, or SentencePiece BPE
/// (model `llama`: Llama 2, Mistral); control and user-defined tokens special; BOS/EOS added with
/// special tokens as `tokenizer.ggml.add_bos_token` and `add_eos_token` say (by default as
/// llama.cpp: BOS for Llama 3 and SentencePiece).
pub fn from_gguf(c: &Content) -> Result<Tokenizer> {
    let model = c.metadata.get("tokenizer.ggml.model").and_then(|v| v.to_string().ok().cloned()).unwrap_or_default();
    let tokens = strings(c, "tokenizer.ggml.tokens")?;
    let types: Vec<i64> = match c.metadata.get("tokenizer.ggml.token_type") {
        Some(Value::Array(a)) => a.iter().map(|x| x.to_i32().map(i64::from).unwrap_or(1)).collect(),
        _ => vec![1; tokens.len()],
    };
    let vocab: Vocab = tokens.iter().enumerate().map(|(i, t)| (t.clone(), i as u32)).collect();
    let (mut tok, bos_by_default) = match model.as_str() {
        "gpt2" => {
            let pre = c.metadata.get("tokenizer.ggml.pre").and_then(|v| v.to_string().ok());
            let pre = PreTokenizer::named(pre.map(|s| s.as_str()))?;
            (byte_level_bpe(c, vocab, pre)?, pre == PreTokenizer::Llama3)
        }
        "llama" => (sentencepiece_bpe(c, &tokens, &types, vocab)?, true),
        other => bail!(
            "GGUF tokenizer model `{other}` is not supported (supported: gpt2, byte-level BPE; llama, SentencePiece \
             BPE); pass a tokenizer.json"
        ),
    };
    let special: Vec<AddedToken> = tokens
        .iter()
        .zip(&types)
        .filter(|(_, &t)| t == CONTROL || t == USER_DEFINED)
        .map(|(s, _)| AddedToken::from(s.clone(), true))
        .collect();
    tok.add_special_tokens(&special);
    let flag = |key: &str| c.metadata.get(key).and_then(|v| v.to_bool().ok());
    let add_bos = flag("tokenizer.ggml.add_bos_token").unwrap_or(bos_by_default);
    let add_eos = flag("tokenizer.ggml.add_eos_token").unwrap_or(false);
    if add_bos || add_eos {
        tok.with_post_processor(Some(added_specials(c, &tokens, add_bos, add_eos)?));
    }
    Ok(tok)
}

/// Byte-level BPE over the vocabulary and `tokenizer.ggml.merges`.
fn byte_level_bpe(c: &Content, vocab: Vocab, pre: PreTokenizer) -> Result<Tokenizer> {
    let merges: Vec<(String, String)> = strings(c, "tokenizer.ggml.merges")?
        .into_iter()
        .map(|m| {
            let (a, b) = m.split_once(' ').with_context(|| format!("bad merge `{m}`"))?;
            Ok((a.to_string(), b.to_string()))
        })
        .collect::<Result<_>>()?;
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .ignore_merges(pre == PreTokenizer::Llama3)
        .build()
        .map_err(|e| anyhow::anyhow!("cannot build BPE from GGUF: {e}"))?;
    let mut tok = Tokenizer::new(bpe);
    tok.with_pre_tokenizer(Some(pre.build()?));
    tok.with_decoder(Some(ByteLevelDecoder::default()));
    Ok(tok)
}

/// SentencePiece BPE as llama.cpp runs it: spaces become U+2581 and one more goes before the text
/// and after every special token (unless `tokenizer.ggml.add_space_prefix` is false); adjacent
/// pieces merge into the highest-scoring piece they form (`tokenizer.ggml.scores`); characters
/// outside the vocabulary become byte tokens (`<0xAB>`). Decoding keeps every space, as a server
/// streams the text.
fn sentencepiece_bpe(c: &Content, tokens: &[String], types: &[i64], vocab: Vocab) -> Result<Tokenizer> {
    let scores = floats(c, "tokenizer.ggml.scores")?;
    if scores.len() != tokens.len() {
        bail!("GGUF has {} `tokenizer.ggml.scores` for {} tokens", scores.len(), tokens.len());
    }
    // llama.cpp merges the adjacent pair whose concatenation is the highest-scoring piece; as BPE
    // merges, that is every split of a piece into two pieces, ranked by the piece's score.
    let mut ranked: Vec<(f32, usize, &str, &str)> = Vec::new();
    for (id, piece) in tokens.iter().enumerate() {
        if types.get(id) == Some(&BYTE) {
            continue;
        }
        for (at, _) in piece.char_indices().skip(1) {
            let (a, b) = piece.split_at(at);
            if vocab.contains_key(a) && vocab.contains_key(b) {
                ranked.push((scores[id], id, a, b));
            }
        }
    }
    ranked.sort_by(|x, y| y.0.total_cmp(&x.0).then(x.1.cmp(&y.1)));
    let merges: Vec<(String, String)> = ranked.into_iter().map(|(_, _, a, b)| (a.to_string(), b.to_string())).collect();
    let mut bpe = BPE::builder().vocab_and_merges(vocab, merges).byte_fallback(true).fuse_unk(true);
    let unk = crate::model::weights::meta_usize(c, "tokenizer.ggml.unknown_token_id").ok().and_then(|i| tokens.get(i));
    if let Some(unk) = unk {
        bpe = bpe.unk_token(unk.clone());
    }
    let bpe = bpe.build().map_err(|e| anyhow::anyhow!("cannot build BPE from GGUF: {e}"))?;
    let mut tok = Tokenizer::new(bpe);
    let err = |e| anyhow::anyhow!("cannot build the SentencePiece normalizer: {e}");
    let mut normalizers = vec![NormalizerWrapper::Replace(Replace::new(" ", "\u{2581}").map_err(err)?)];
    let prefix = c.metadata.get("tokenizer.ggml.add_space_prefix").and_then(|v| v.to_bool().ok()).unwrap_or(true);
    if prefix {
        normalizers.insert(0, NormalizerWrapper::Prepend(Prepend::new("\u{2581}".into())));
    }
    tok.with_normalizer(Some(NormalizerSequence::new(normalizers)));
    tok.with_decoder(Some(DecoderSequence::new(vec![
        DecoderWrapper::Replace(Replace::new("\u{2581}", " ").map_err(err)?),
        DecoderWrapper::ByteFallback(ByteFallback::new()),
        DecoderWrapper::Fuse(Fuse::new()),
    ])));
    Ok(tok)
}

fn floats(c: &Content, key: &str) -> Result<Vec<f32>> {
    let v = c.metadata.get(key).with_context(|| format!("GGUF has no `{key}`: cannot build a tokenizer"))?;
    v.to_vec()
        .map_err(|e| anyhow::anyhow!("GGUF `{key}`: {e}"))?
        .iter()
        .map(|x| x.to_f32().map_err(|e| anyhow::anyhow!("GGUF `{key}`: {e}")))
        .collect()
}

/// The post-processor that puts BOS before and EOS after an encoding.
fn added_specials(c: &Content, tokens: &[String], add_bos: bool, add_eos: bool) -> Result<TemplateProcessing> {
    let token = |key: &str| -> Result<(String, u32)> {
        let id =
            crate::model::weights::meta_usize(c, key).with_context(|| format!("GGUF asks to add it, but {key}"))?;
        let text = tokens.get(id).with_context(|| format!("GGUF `{key}` = {id} is outside the vocabulary"))?;
        Ok((text.clone(), u32::try_from(id)?))
    };
    let mut pieces = Vec::new();
    if add_bos {
        pieces.push(token("tokenizer.ggml.bos_token_id")?);
    }
    pieces.push(("$A".to_string(), 0));
    if add_eos {
        pieces.push(token("tokenizer.ggml.eos_token_id")?);
    }
    let template: Vec<String> = pieces.iter().map(|(t, _)| t.clone()).collect();
    // A template is written as text; a token with a space or a colon in it cannot be written so.
    if template.iter().any(|t| t.contains(char::is_whitespace) || (t.contains(':') && *t != "$A")) {
        bail!("GGUF BOS/EOS token {template:?} contains a space or a colon: cannot add it to encodings");
    }
    let specials: Vec<(String, u32)> = pieces.into_iter().filter(|(t, _)| t != "$A").collect();
    TemplateProcessing::builder()
        .try_single(template)
        .map_err(|e| anyhow::anyhow!("GGUF BOS/EOS template: {e}"))?
        .special_tokens(specials)
        .build()
        .map_err(|e| anyhow::anyhow!("GGUF BOS/EOS template: {e}"))
}
