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
    /// DeepSeek LLM's and DeepSeek-V2's (`deepseek-llm`): six splits in turn.
    DeepSeekLlm,
    /// DeepSeek-V3's (`deepseek-v3`): three splits in turn.
    DeepSeekV3,
    /// GPT-4o's (`gpt-4o`: Phi-4-mini): cased words with their contractions, runs of up to three
    /// digits.
    Gpt4o,
}

/// The `tokenizer.ggml.pre` names this module builds, each with the split llama.cpp gives it.
pub const SUPPORTED_PRE: &[&str] = &[
    "smollm",
    "llama-bpe",
    "llama3",
    "llama-v3",
    "qwen2",
    "deepseek-r1-qwen",
    "deepseek-llm",
    "deepseek-v3",
    "gpt-4o",
];

/// Llama 3's split, as its tokenizer.json gives it (llama.cpp's `LLAMA3`).
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Qwen2's split, as its tokenizer.json gives it (llama.cpp's `QWEN2`).
const QWEN2_SPLIT: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// GPT-4o's split as llama.cpp writes it (`GPT4O`): tokenizer.json's letter classes `\p{Lu}` and
/// `\p{Ll}` become "a letter other than a-z" and "a letter other than A-Z", which is what
/// llama.cpp splits by.
const GPT4O_SPLIT: &str = r"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))+((?=[\p{L}])([^A-Z]))*(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// DeepSeek LLM's splits, applied one after another, as its tokenizer.json gives them (llama.cpp's
/// `DEEPSEEK_LLM`): line breaks; letters of the Latin, Greek, Cyrillic and other cased scripts
/// with one leading space; ASCII and full-width punctuation with one leading space; trailing
/// whitespace; CJK ideographs and Hangul; digit runs. Characters outside ASCII are written as code
/// points: Unicode normalization would turn some range ends into others and empty the ranges.
const DEEPSEEK_LLM_SPLITS: &[&str] = &[
    "[\r\n]",
    "\\s?[A-Za-z\u{b5}\u{c0}-\u{d6}\u{d8}-\u{f6}\u{f8}-\u{1ba}\u{1bc}-\u{1bf}\u{1c4}-\u{293}\u{295}-\u{2af}\u{370}-\u{373}\u{376}\u{377}\u{37b}-\u{37d}\u{37f}\u{386}\u{388}-\u{38a}\u{38c}\u{38e}-\u{3a1}\u{3a3}-\u{3f5}\u{3f7}-\u{481}\u{48a}-\u{52f}\u{531}-\u{556}\u{10a0}-\u{10c5}\u{13a0}-\u{13f5}\u{13f8}-\u{13fd}\u{1c90}-\u{1cba}\u{1cbd}-\u{1cbf}\u{1d00}-\u{1d2b}\u{1d6b}-\u{1d77}\u{1d79}-\u{1d9a}\u{1e00}-\u{1f15}\u{1f18}-\u{1f1d}\u{1f20}-\u{1f45}\u{1f48}-\u{1f4d}\u{1f50}-\u{1f57}\u{1f59}\u{1f5b}\u{1f5d}\u{1f5f}-\u{1f7d}\u{1f80}-\u{1fb4}\u{1fb6}-\u{1fbc}\u{1fbe}\u{1fc2}-\u{1fc4}\u{1fc6}-\u{1fcc}\u{1fd0}-\u{1fd3}\u{1fd6}-\u{1fdb}\u{1fe0}-\u{1fec}\u{1ff2}-\u{1ff4}\u{1ff6}-\u{1ffc}\u{2102}\u{2107}\u{210a}-\u{2113}\u{2115}\u{2119}-\u{211d}\u{2124}\u{2126}\u{2128}\u{212a}-\u{212d}\u{212f}-\u{2134}\u{2139}\u{213c}-\u{213f}\u{2145}-\u{2149}\u{214e}\u{2183}\u{2184}\u{2c00}-\u{2c7b}\u{2c7e}-\u{2ce4}\u{2ceb}-\u{2cee}\u{2cf2}\u{2cf3}\u{a640}-\u{a66d}\u{a680}-\u{a69b}\u{a722}-\u{a76f}\u{a771}-\u{a787}\u{a78b}-\u{a78e}\u{ab70}-\u{abbf}\u{fb00}-\u{fb06}\u{fb13}-\u{fb17}\u{ff21}-\u{ff3a}\u{ff41}-\u{ff5a}\u{10400}-\u{1044f}\u{104b0}-\u{104d3}\u{104d8}-\u{104fb}\u{10c80}-\u{10cb2}\u{10cc0}-\u{10cf2}\u{118a0}-\u{118df}\u{1e900}-\u{1e943}]+",
    "\\s?[!-/:-~\u{ff01}-\u{ff0f}\u{ff1a}-\u{ff5e}\u{2018}-\u{201f}\u{3000}-\u{3002}]+",
    "\\s+$",
    "[\u{4e00}-\u{9fa5}\u{800}-\u{4e00}\u{ac00}-\u{d7ff}]+",
    "\\p{N}+",
];

/// DeepSeek-V3's splits, applied one after another (llama.cpp's `DEEPSEEK3_LLM`): runs of up to
/// three digits; CJK ideographs and kana; then words, punctuation and whitespace.
const DEEPSEEK_V3_SPLITS: &[&str] = &[
    "\\p{N}{1,3}",
    "[\u{4e00}-\u{9fa5}\u{3040}-\u{309f}\u{30a0}-\u{30ff}]+",
    "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+| ?[\\p{P}\\p{S}]+[\r\n]*|\\s*[\r\n]+|\\s+(?!\\S)|\\s+",
];

impl PreTokenizer {
    fn named(pre: Option<&str>) -> Result<Self> {
        Ok(match pre {
            Some("smollm") => Self::SmolLm,
            Some("llama-bpe" | "llama3" | "llama-v3") => Self::Llama3,
            Some("qwen2" | "deepseek-r1-qwen") => Self::Qwen2,
            Some("deepseek-llm") => Self::DeepSeekLlm,
            Some("deepseek-v3") => Self::DeepSeekV3,
            Some("gpt-4o") => Self::Gpt4o,
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
            Self::Gpt4o => vec![split(GPT4O_SPLIT)?, bytes_only],
            Self::DeepSeekLlm | Self::DeepSeekV3 => {
                let splits = if self == Self::DeepSeekLlm { DEEPSEEK_LLM_SPLITS } else { DEEPSEEK_V3_SPLITS };
                let mut all = splits.iter().map(|p| split(p)).collect::<Result<Vec<_>>>()?;
                all.push(bytes_only);
                all
            }
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
    let unk =
        crate::model::gguf_meta::meta_usize(c, "tokenizer.ggml.unknown_token_id").ok().and_then(|i| tokens.get(i));
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
            crate::model::gguf_meta::meta_usize(c, key).with_context(|| format!("GGUF asks to add it, but {key}"))?;
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
