//! Token ids to streamed text: incremental detokenization that never splits a UTF-8 character,
//! and stop strings that end the text before them (and are never streamed, even in part).

use tokenizers::Tokenizer;

/// What [`TextStream::push`] produced.
#[derive(Debug, Default, PartialEq)]
pub struct Delta {
    /// Text that can be sent now.
    pub text: String,
    /// A stop string was found: the text ends here and generation should stop.
    pub stopped: bool,
}

/// One sequence's text as its tokens arrive.
///
/// Decoding a window of recent tokens and emitting what the newest token added (the way
/// text-generation-inference streams) keeps each step's work small and waits while the window
/// ends inside a multi-byte character. tokenizers has no incremental decoder for this, hence the
/// hand-written window.
pub struct TextStream<'t> {
    tokenizer: &'t Tokenizer,
    ids: Vec<u32>,
    prefix: usize,
    read: usize,
    stops: Vec<String>,
    /// Every decoded byte so far (stop matching looks back into it).
    text: String,
    /// Bytes of `text` already handed out.
    sent: usize,
    stopped: bool,
    /// Special tokens decode as nothing (the default).
    skip_special: bool,
    /// Stop strings count from this many tokens on.
    min_tokens: usize,
    /// Bytes of `text` before the `min_tokens`-th token's text: a stop string must end past
    /// them (`None` until that token).
    stop_floor: Option<usize>,
}

impl<'t> TextStream<'t> {
    /// A stream for a new sequence that stops at any of `stops` (empty strings are ignored).
    pub fn new(tokenizer: &'t Tokenizer, stops: Vec<String>) -> Self {
        let stops = stops.into_iter().filter(|s| !s.is_empty()).collect();
        Self {
            tokenizer,
            ids: Vec::new(),
            prefix: 0,
            read: 0,
            stops,
            text: String::new(),
            sent: 0,
            stopped: false,
            skip_special: true,
            min_tokens: 0,
            stop_floor: Some(0),
        }
    }

    /// Stop strings end the text only from the `min_tokens`-th token on (vLLM's `min_tokens`):
    /// one that ends in the text of earlier tokens is text like any other.
    pub fn stopping_from(mut self, min_tokens: usize) -> Self {
        self.min_tokens = min_tokens;
        self.stop_floor = (min_tokens == 0).then_some(0);
        self
    }

    /// Decodes special tokens as their text too (a tool-call parser reading markers that are
    /// special tokens, as Hermes 3's `<tool_call>` is).
    pub fn keeping_special_tokens(mut self) -> Self {
        self.skip_special = false;
        self
    }

    fn decode(&self, ids: &[u32]) -> String {
        // A token the tokenizer cannot decode (an id it has no piece for) decodes as nothing.
        self.tokenizer.decode(ids, self.skip_special).unwrap_or_default()
    }

    /// Feeds the next token; returns the text that became final.
    pub fn push(&mut self, token: u32) -> Delta {
        if self.stopped {
            return Delta { text: String::new(), stopped: true };
        }
        self.ids.push(token);
        if self.stop_floor.is_none() && self.ids.len() >= self.min_tokens {
            self.stop_floor = Some(self.text.len());
        }
        let before = self.decode(&self.ids[self.prefix..self.read]);
        let now = self.decode(&self.ids[self.prefix..]);
        if now.len() > before.len() && now.is_char_boundary(before.len()) && !now.ends_with('\u{FFFD}') {
            self.text.push_str(&now[before.len()..]);
            self.prefix = self.read;
            self.read = self.ids.len();
        }
        self.release(false)
    }

    /// Ends the stream (the sequence finished): returns whatever text is still held back.
    pub fn finish(&mut self) -> Delta {
        if self.stopped {
            return Delta { text: String::new(), stopped: true };
        }
        let before = self.decode(&self.ids[self.prefix..self.read]);
        let now = self.decode(&self.ids[self.prefix..]);
        if now.len() > before.len() && now.is_char_boundary(before.len()) {
            self.text.push_str(&now[before.len()..]);
        }
        self.prefix = self.ids.len();
        self.read = self.ids.len();
        self.release(true)
    }

    /// Hands out the text that no stop string can still claim (all of it at the end).
    fn release(&mut self, at_end: bool) -> Delta {
        // Before `min_tokens` no stop string counts, but text that may begin one is held back.
        let floor = self.stop_floor.unwrap_or(usize::MAX);
        let longest = self.stops.iter().map(String::len).max().unwrap_or(0);
        let mut from = self.sent.saturating_sub(longest);
        while !self.text.is_char_boundary(from) {
            from -= 1;
        }
        let ends_past_floor = |s: &String| {
            self.text[from..]
                .match_indices(s.as_str())
                .map(|(i, _)| from + i)
                .find(|&i| i.saturating_add(s.len()) > floor)
        };
        let found = self.stops.iter().filter_map(ends_past_floor).min();
        let end = match found {
            Some(i) => {
                self.stopped = true;
                i.max(self.sent)
            }
            None if at_end => self.text.len(),
            None => self.text.len() - self.held_back(),
        };
        let text = self.text[self.sent..end].to_string();
        self.sent = end;
        Delta { text, stopped: self.stopped }
    }

    /// Bytes at the end of the text that begin some stop string.
    fn held_back(&self) -> usize {
        let t = &self.text[self.sent..];
        let mut held = 0;
        for s in &self.stops {
            for (i, _) in s.char_indices().skip(1) {
                if i > held && t.ends_with(&s[..i]) {
                    held = i;
                }
            }
        }
        held
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokenizers::models::wordlevel::WordLevel;

    /// A tokenizer whose tokens are the given strings, decoded by plain concatenation.
    fn tokenizer(pieces: &[&str]) -> Tokenizer {
        let vocab = pieces.iter().enumerate().map(|(i, p)| (p.to_string(), i as u32)).collect();
        let model = WordLevel::builder().vocab(vocab).unk_token(pieces[0].into()).build().unwrap();
        let mut t = Tokenizer::new(model);
        t.with_decoder(Some(tokenizers::decoders::fuse::Fuse::new()));
        t
    }

    fn stream_all(t: &Tokenizer, ids: &[u32], stops: &[&str]) -> (Vec<String>, bool) {
        let mut s = TextStream::new(t, stops.iter().map(|x| x.to_string()).collect());
        let mut out = Vec::new();
        let mut stopped = false;
        for &id in ids {
            let d = s.push(id);
            out.push(d.text);
            if d.stopped {
                stopped = true;
                break;
            }
        }
        if !stopped {
            out.push(s.finish().text);
        }
        (out, stopped)
    }

    #[test]
    fn the_streamed_pieces_concatenate_to_the_whole_decode() {
        let t = tokenizer(&["<unk>", "Hel", "lo", " wor", "ld", "!"]);
        let ids = [1, 2, 3, 4, 5];
        let (pieces, stopped) = stream_all(&t, &ids, &[]);
        assert!(!stopped);
        assert_eq!(pieces.concat(), t.decode(&ids, true).unwrap());
        assert_eq!(pieces[0], "Hel");
    }

    #[test]
    fn a_stop_string_split_across_tokens_ends_the_text_before_it_and_is_never_sent() {
        let t = tokenizer(&["<unk>", "one", " tw", "o", " three"]);
        let (pieces, stopped) = stream_all(&t, &[1, 2, 3, 4], &[" two"]);
        assert!(stopped);
        assert_eq!(pieces.concat(), "one");
        assert!(pieces.iter().all(|p| !p.contains(" tw")), "{pieces:?}");
    }

    #[test]
    fn text_held_back_for_a_stop_that_never_comes_is_released() {
        let t = tokenizer(&["<unk>", "a", " t", "x"]);
        let (pieces, stopped) = stream_all(&t, &[1, 2, 3], &[" two"]);
        assert!(!stopped);
        assert_eq!(pieces.concat(), "a tx");
        assert_eq!(pieces[1], "", "` t` may begin ` two`: held back");
    }

    /// vLLM's `min_tokens`: a stop string ending in the first `min_tokens - 1` tokens' text is
    /// text; one ending in the text of a later token (or of that token) stops.
    #[test]
    fn stop_strings_count_from_min_tokens_on() {
        let t = tokenizer(&["<unk>", "a", "b", "c", " a", "bc"]);
        let run = |min_tokens: usize, ids: &[u32]| {
            let mut s = TextStream::new(&t, vec!["ab".into()]).stopping_from(min_tokens);
            let mut out = String::new();
            for &id in ids {
                let d = s.push(id);
                out += &d.text;
                if d.stopped {
                    return (out, true);
                }
            }
            out += &s.finish().text;
            (out, false)
        };
        // The text is "a" "b" "c" " a" "bc".
        assert_eq!(run(0, &[1, 2, 3, 4, 5]), ("".into(), true));
        assert_eq!(run(3, &[1, 2, 3, 4, 5]), ("abc ".into(), true));
        // "ab" completed by the 2nd token stops once min_tokens is 2: that token counts.
        assert_eq!(run(2, &[1, 2, 3]), ("".into(), true));
        assert_eq!(run(3, &[1, 2, 3]), ("abc".into(), false));
        assert_eq!(run(6, &[1, 2, 3, 4, 5]), ("abc abc".into(), false));
    }

    #[test]
    fn the_earliest_of_several_stop_strings_wins() {
        let t = tokenizer(&["<unk>", "abc", "def"]);
        let (pieces, _) = stream_all(&t, &[1, 2], &["ef", "cd"]);
        assert_eq!(pieces.concat(), "ab");
    }

    /// Byte-level and SentencePiece GGUF tokenizers (byte tokens for characters outside the
    /// vocabulary): the streamed pieces never split a character and concatenate to llama.cpp's
    /// text of the whole sequence (`tests/fixtures/gguf/expected.json`).
    #[test]
    fn gguf_tokenizers_stream_whole_characters_and_llama_cpps_text() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gguf");
        let expected: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
        for file in ["llama3_tiny.gguf", "spm_vocab.gguf"] {
            let content = crate::model::gguf_header::read_gguf_header(&dir.join(file)).unwrap().content;
            let t = crate::model::gguf_tokenizer::from_gguf(&content).unwrap();
            let e = &expected[file];
            for (i, ids) in e["ids"].as_array().unwrap().iter().enumerate() {
                let ids: Vec<u32> = ids.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect();
                let (pieces, _) = stream_all(&t, &ids, &[]);
                assert!(pieces.iter().all(|p| !p.contains('\u{FFFD}')), "{file}: {pieces:?}");
                assert_eq!(pieces.concat(), e["decoded"][i].as_str().unwrap(), "{file}: text {i}");
            }
        }
    }
}
