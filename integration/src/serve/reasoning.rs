//! A thinking model's reasoning apart from its answer (vLLM's `reasoning_content`), split from the
//! decoded text piece by piece (streaming) or whole, with the same result either way.
//!
//! - `qwen3` (Qwen3): an answer that opens with `<think>` reasons until `</think>`; one that
//!   does not is all content.
//! - `deepseek_r1` (DeepSeek R1 and its distills, QwQ, Qwen3's thinking-only models, whose
//!   templates open `<think>` in the prompt): everything up to `</think>` is reasoning (a
//!   `<think>` at the start is dropped); with no `</think>` the whole answer is reasoning.
//!
//! Either way the prompt decides first, as vLLM's `prompt_is_reasoning_end` does: a prompt that
//! ends in an open `<think>` starts the answer in reasoning, one that ends in `</think>`
//! (thinking switched off, as Qwen3's `enable_thinking: false` writes it) starts it in content.
//! Line breaks right after `</think>` are dropped (vLLM keeps them). An answer cut short while
//! reasoning stays reasoning.
//!
//! - `openai_gptoss` (GPT-OSS): the harmony format's analysis channel is reasoning, see
//!   [`super::harmony`].

use anyhow::{bail, Result};

use super::harmony::{self, HarmonySplitter};
use super::tool_calls::{partial_marker, ToolCall};

const OPEN: &str = "<think>";
const CLOSE: &str = "</think>";

/// How a model marks its reasoning.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReasoningFormat {
    /// Reasoning only when the answer opens with `<think>`.
    Qwen3,
    /// Reasoning from the start, until `</think>`.
    DeepSeekR1,
    /// GPT-OSS's harmony channels.
    Harmony,
}

impl ReasoningFormat {
    /// The format `[server] reasoning_parser` names: `None` for `none`.
    pub fn named(name: &str) -> Result<Option<Self>> {
        Ok(match name {
            "qwen3" => Some(Self::Qwen3),
            "deepseek_r1" => Some(Self::DeepSeekR1),
            "openai_gptoss" => Some(Self::Harmony),
            "none" => None,
            other => bail!("unknown reasoning_parser `{other}`; valid: qwen3, deepseek_r1, openai_gptoss, none"),
        })
    }

    /// The markers decoding must keep for this format to split.
    pub fn markers(self) -> &'static [&'static str] {
        match self {
            Self::Harmony => &harmony::MARKERS,
            Self::Qwen3 | Self::DeepSeekR1 => &MARKERS,
        }
    }
}

/// The `<think>` markers, which decoding must keep to split (a GGUF file may make them special
/// tokens).
pub const MARKERS: [&str; 2] = [OPEN, CLOSE];

/// Reasoning, content and (harmony's) calls that became final.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Split {
    /// Reasoning text (`reasoning_content`).
    pub reasoning: String,
    /// Answer text (`content`).
    pub content: String,
    /// Calls to functions in harmony's headers (`to=functions.NAME`), in order, each placed in
    /// `content`.
    pub calls: Vec<PlacedCall>,
}

/// A harmony call and where the answer wrote it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlacedCall {
    /// The byte offset in its [`Split`]'s `content` at which the call came.
    pub at: usize,
    /// The call.
    pub call: ToolCall,
}

#[cfg(test)]
impl Split {
    /// Appends `later` (tests join the pieces of a streamed answer).
    pub fn extend(&mut self, later: Split) {
        let shift = self.content.len();
        self.reasoning.push_str(&later.reasoning);
        self.content.push_str(&later.content);
        self.calls.extend(later.calls.into_iter().map(|c| PlacedCall { at: c.at + shift, ..c }));
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Nothing decided yet: only whitespace, or part of `<think>`, so far.
    Start,
    /// Inside the reasoning.
    Reasoning,
    /// After `</think>`, dropping whitespace until the answer starts.
    AfterClose,
    /// The answer.
    Content,
}

/// Splits one answer's text into reasoning and content.
#[derive(Debug, Clone)]
pub enum ReasoningSplitter {
    /// `<think>` tags.
    Think(ThinkSplitter),
    /// Harmony channels.
    Harmony(HarmonySplitter),
}

impl ReasoningSplitter {
    /// A splitter for one answer in `format` to a prompt rendered as `prompt`.
    pub fn new(format: ReasoningFormat, prompt: &str) -> Self {
        match format {
            ReasoningFormat::Harmony => Self::Harmony(HarmonySplitter::default()),
            _ => Self::Think(ThinkSplitter::new(format, prompt)),
        }
    }

    /// Feeds the next piece of text; returns what became final.
    pub fn push(&mut self, text: &str) -> Split {
        let mut out = Split::default();
        match self {
            Self::Think(t) => {
                t.buf.push_str(text);
                t.run(false, &mut out);
            }
            Self::Harmony(h) => h.push(text, &mut out),
        }
        out
    }

    /// The answer ended: resolves what was held back.
    pub fn finish(&mut self) -> Split {
        let mut out = Split::default();
        match self {
            Self::Think(t) => t.run(true, &mut out),
            Self::Harmony(h) => h.finish(&mut out),
        }
        out
    }
}

/// Splits one answer marked with `<think>` tags.
#[derive(Debug, Clone)]
pub struct ThinkSplitter {
    format: ReasoningFormat,
    state: State,
    /// Text not yet resolved.
    buf: String,
}

impl ThinkSplitter {
    /// A splitter for one answer in `format` to a prompt rendered as `prompt`.
    fn new(format: ReasoningFormat, prompt: &str) -> Self {
        let tail = prompt.trim_end();
        let state = if tail.ends_with(CLOSE) {
            State::Content
        } else if tail.ends_with(OPEN) {
            State::Reasoning
        } else {
            State::Start
        };
        Self { format, state, buf: String::new() }
    }

    fn run(&mut self, at_end: bool, out: &mut Split) {
        loop {
            match self.state {
                State::Start => {
                    let start = self.buf.trim_start();
                    if let Some(rest) = start.strip_prefix(OPEN) {
                        self.buf = rest.to_string();
                        self.state = State::Reasoning;
                    } else if !at_end && OPEN.starts_with(start) {
                        // Only whitespace or part of `<think>` so far.
                        return;
                    } else {
                        self.state = match self.format {
                            ReasoningFormat::DeepSeekR1 => State::Reasoning,
                            ReasoningFormat::Qwen3 | ReasoningFormat::Harmony => State::Content,
                        };
                    }
                }
                State::Reasoning => match self.buf.find(CLOSE) {
                    Some(at) => {
                        out.reasoning.push_str(&self.buf[..at]);
                        self.buf.drain(..at + CLOSE.len());
                        self.state = State::AfterClose;
                    }
                    None => {
                        let hold = if at_end { 0 } else { partial_marker(&self.buf, CLOSE) };
                        out.reasoning.extend(self.buf.drain(..self.buf.len() - hold));
                        return;
                    }
                },
                State::AfterClose => {
                    let trimmed = self.buf.trim_start_matches(['\n', '\r']);
                    if trimmed.is_empty() {
                        self.buf.clear();
                        return;
                    }
                    self.buf = trimmed.to_string();
                    self.state = State::Content;
                }
                State::Content => {
                    out.content.push_str(&std::mem::take(&mut self.buf));
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn whole(format: ReasoningFormat, text: &str) -> Split {
        whole_after(format, "", text)
    }

    fn whole_after(format: ReasoningFormat, prompt: &str, text: &str) -> Split {
        let mut s = ReasoningSplitter::new(format, prompt);
        let mut out = s.push(text);
        out.extend(s.finish());
        out
    }

    fn split(reasoning: &str, content: &str) -> Split {
        Split { reasoning: reasoning.into(), content: content.into(), calls: vec![] }
    }

    /// vLLM's qwen3 and deepseek_r1 parsers on these answers, written out by hand (and the
    /// whitespace after `</think>` dropped).
    #[test]
    fn thinking_is_split_from_the_answer() {
        let q = |t: &str| whole(ReasoningFormat::Qwen3, t);
        assert_eq!(q("<think>\nhm\n</think>\n\nHello"), split("\nhm\n", "Hello"));
        assert_eq!(q("<think>hm</think>\n    indented"), split("hm", "    indented"));
        assert_eq!(q("Hello <think>"), split("", "Hello <think>"));
        assert_eq!(q("<think>cut sho"), split("cut sho", ""));
        assert_eq!(q("<thi"), split("", "<thi"));
        assert_eq!(q(""), split("", ""));
        let r = |t: &str| whole(ReasoningFormat::DeepSeekR1, t);
        assert_eq!(r("hm\n</think>\n\nHello"), split("hm\n", "Hello"));
        assert_eq!(r("<think>hm</think>Hi"), split("hm", "Hi"));
        assert_eq!(r("all reasoning"), split("all reasoning", ""));
        assert!(ReasoningFormat::named("granite").is_err());
        // The prompt decides first: thinking opened by the template, or switched off.
        for format in [ReasoningFormat::Qwen3, ReasoningFormat::DeepSeekR1] {
            assert_eq!(whole_after(format, "<|im_start|>assistant\n<think>\n", "hm</think>Hi"), split("hm", "Hi"));
            let off = "<|im_start|>assistant\n<think>\n\n</think>\n\n";
            assert_eq!(whole_after(format, off, "Hi </think>"), split("", "Hi </think>"));
        }
    }

    fn answer() -> impl Strategy<Value = String> {
        let piece = prop_oneof![
            Just("<think>".to_string()),
            Just("</think>".to_string()),
            Just("<thi".to_string()),
            Just("</th".to_string()),
            Just("Héllo".to_string()),
            Just(" \n".to_string()),
            Just("x".to_string()),
        ];
        prop::collection::vec(piece, 0..8).prop_map(|p| p.concat())
    }

    proptest! {
        /// However the text is cut into pieces, the split is that of the whole, and no text is
        /// lost but markers and the whitespace after `</think>`.
        #[test]
        fn streaming_in_any_pieces_equals_splitting_the_whole(
            text in answer(),
            cuts in prop::collection::vec(0usize..80, 0..10),
        ) {
            for format in [ReasoningFormat::Qwen3, ReasoningFormat::DeepSeekR1] {
                let mut s = ReasoningSplitter::new(format, "");
                let mut out = Split::default();
                for piece in crate::serve::tool_calls::cut_into_pieces(&text, &cuts) {
                    out.extend(s.push(piece));
                }
                out.extend(s.finish());
                let w = whole(format, &text);
                prop_assert_eq!(&out, &w);
                prop_assert!(w.reasoning.len() + w.content.len() <= text.len());
            }
        }
    }
}
