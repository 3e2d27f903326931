//! One chat choice's text on its way out: the reasoning split from the answer, then tool calls
//! read from the answer, the same pieces whether the answer is streamed or sent whole.

use super::reasoning::{ReasoningSplitter, Split};
use super::tool_calls::{Parsed, ToolCall, ToolCallParser};

/// A part of an answer that became final.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Piece {
    /// Reasoning text (`reasoning_content`).
    Reasoning(String),
    /// Answer text (`content`).
    Content(String),
    /// A tool call: the `index`th of the answer, with its id.
    Call {
        /// Its place among the answer's calls.
        index: usize,
        /// Its id.
        id: String,
        /// The call.
        call: ToolCall,
    },
}

/// The reasoning splitter and tool-call parser of one choice (either may be absent).
#[derive(Debug, Clone, Default)]
pub struct ChoiceText {
    reasoning: Option<ReasoningSplitter>,
    tools: Option<ToolCallParser>,
    /// Calls given out so far.
    calls: usize,
}

impl ChoiceText {
    /// A choice whose reasoning is split by `reasoning` and whose calls are read by `tools`.
    pub fn new(reasoning: Option<ReasoningSplitter>, tools: Option<ToolCallParser>) -> Self {
        Self { reasoning, tools, calls: 0 }
    }

    /// Whether reasoning is split off (a whole answer then has `reasoning_content`, null when
    /// there was none).
    pub fn splits_reasoning(&self) -> bool {
        self.reasoning.is_some()
    }

    /// Text passes through unchanged: nothing to split or read.
    pub fn is_plain(&self) -> bool {
        self.reasoning.is_none() && self.tools.is_none()
    }

    /// Feeds the next piece of text; returns what became final, in order.
    pub fn push(&mut self, text: &str) -> Vec<Piece> {
        let split = match &mut self.reasoning {
            Some(r) => r.push(text),
            None => Split { content: text.to_string(), ..Split::default() },
        };
        self.pieces(split, false)
    }

    /// The answer ended: what was held back.
    pub fn finish(&mut self) -> Vec<Piece> {
        let split = self.reasoning.as_mut().map(ReasoningSplitter::finish).unwrap_or_default();
        self.pieces(split, true)
    }

    /// Whether the answer's `finish_reason` is `tool_calls`.
    pub fn reports_tool_calls(&self) -> bool {
        self.tools.as_ref().is_some_and(ToolCallParser::reports_tool_calls)
    }

    fn pieces(&mut self, split: Split, at_end: bool) -> Vec<Piece> {
        let mut out = Vec::new();
        if !split.reasoning.is_empty() {
            out.push(Piece::Reasoning(split.reasoning));
        }
        let Some(parser) = &mut self.tools else {
            // Without tools, a harmony call's arguments are text like any other, where it came.
            let mut content = split.content;
            for placed in split.calls.iter().rev() {
                content.insert_str(placed.at, &placed.call.arguments);
            }
            if !content.is_empty() {
                out.push(Piece::Content(content));
            }
            return out;
        };
        // Harmony's calls, from its headers, each after the content before it.
        let mut parsed = Parsed::default();
        let mut from = 0;
        for placed in split.calls {
            parsed.extend(parser.push(&split.content[from..placed.at]));
            parser.accept(placed.call, &mut parsed);
            from = placed.at;
        }
        parsed.extend(parser.push(&split.content[from..]));
        if at_end {
            parsed.extend(parser.finish());
        }
        if !parsed.content.is_empty() {
            out.push(Piece::Content(parsed.content));
        }
        for call in parsed.calls {
            out.push(Piece::Call { index: self.calls, id: parser.call_id(), call });
            self.calls += 1;
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::serve::reasoning::ReasoningFormat;
    use crate::serve::tool_calls::ToolFormat;
    use proptest::prelude::*;

    /// The reasoning, the content and the calls of `pieces`.
    fn strip(pieces: Vec<Piece>) -> (String, String, Vec<ToolCall>) {
        let mut out = (String::new(), String::new(), Vec::new());
        for p in pieces {
            match p {
                Piece::Reasoning(r) => out.0.push_str(&r),
                Piece::Content(c) => out.1.push_str(&c),
                Piece::Call { call, .. } => out.2.push(call),
            }
        }
        out
    }

    /// Qwen3 thinking, then a call: the reasoning, the content between, the call, in order, and
    /// the same pieces (joined) streamed character by character as whole.
    #[test]
    fn reasoning_then_calls_in_order_streamed_or_whole() {
        let text =
            "<think>\nweather?\n</think>\n\nChecking. <tool_call>{\"name\": \"f\", \"arguments\": {}}</tool_call>";
        let choice = || {
            ChoiceText::new(
                Some(ReasoningSplitter::new(ReasoningFormat::Qwen3, "")),
                Some(ToolCallParser::new(ToolFormat::Hermes, vec!["f".into()], usize::MAX)),
            )
        };
        let mut whole = choice();
        let mut pieces = whole.push(text);
        pieces.extend(whole.finish());
        let got = strip(pieces.clone());
        assert_eq!(got.0, "\nweather?\n");
        assert_eq!(got.1, "Checking.");
        assert_eq!(got.2, vec![ToolCall { name: "f".into(), arguments: "{}".into() }]);
        assert!(
            matches!(pieces[0], Piece::Reasoning(_)) && matches!(pieces.last(), Some(Piece::Call { index: 0, .. }))
        );
        assert!(whole.reports_tool_calls());
        let mut streamed = choice();
        let mut pieces = Vec::new();
        for c in text.chars() {
            pieces.extend(streamed.push(&c.to_string()));
        }
        pieces.extend(streamed.finish());
        assert_eq!(strip(pieces), got);
        assert!(ChoiceText::default().is_plain());
    }

    /// GPT-OSS's harmony answer: the analysis channel is reasoning, a preamble content, calls
    /// come from their headers (one kept at `max_calls` 1, a call to a function not offered
    /// left as content where it came), streamed character by character as whole; without tools
    /// a call's arguments are content, where it came.
    #[test]
    fn harmony_calls_come_from_their_headers_streamed_or_whole() {
        let text = "<|channel|>analysis<|message|>Need weather.<|end|><|start|>assistant<|channel|>commentary\
                    <|message|>Checking. <|end|><|start|>assistant<|channel|>commentary to=functions.f \
                    <|constrain|>json<|message|>{\"a\": 1}<|call|><|start|>assistant to=functions.g<|channel|>\
                    commentary json<|message|>{\"b\": 2}<|call|><|start|>assistant<|channel|>commentary \
                    to=functions.f<|message|>{}<|call|><|start|>assistant<|channel|>final<|message|> Done.";
        let run = |tools: bool, by_char: bool| -> Vec<Piece> {
            let parser = tools.then(|| ToolCallParser::new(ToolFormat::Harmony, vec!["f".into()], 1));
            let mut c = ChoiceText::new(Some(ReasoningSplitter::new(ReasoningFormat::Harmony, "")), parser);
            let mut pieces = Vec::new();
            if by_char {
                for ch in text.chars() {
                    pieces.extend(c.push(&ch.to_string()));
                }
            } else {
                pieces.extend(c.push(text));
            }
            pieces.extend(c.finish());
            pieces
        };
        let whole = strip(run(true, false));
        assert_eq!(whole.0, "Need weather.");
        assert_eq!(whole.1, "Checking. {\"b\": 2} Done.");
        assert_eq!(whole.2, vec![ToolCall { name: "f".into(), arguments: "{\"a\": 1}".into() }]);
        assert_eq!(strip(run(true, true)), whole);
        let plain = strip(run(false, false));
        assert_eq!((plain.1.as_str(), plain.2.len()), ("Checking. {\"a\": 1}{\"b\": 2}{} Done.", 0));
        assert_eq!(strip(run(false, true)), plain);
    }

    fn harmony_answer() -> impl Strategy<Value = String> {
        let piece = prop_oneof![
            Just("<|channel|>analysis<|message|>Think.<|end|><|start|>assistant".to_string()),
            Just("<|channel|>final<|message|>".to_string()),
            Just("<|channel|>commentary to=functions.f<|message|>{\"a\": 1}<|call|><|start|>assistant".to_string()),
            Just(" to=functions.g<|channel|>commentary json<|message|>{}<|call|><|start|>assistant".to_string()),
            Just("<|channel|>commentary to=functions.f<|message|>[2]<|call|><|start|>assistant".to_string()),
            Just("<|end|><|start|>assistant".to_string()),
            Just("text é ".to_string()),
            Just("<|".to_string()),
        ];
        prop::collection::vec(piece, 0..8).prop_map(|p| p.concat())
    }

    proptest! {
        /// Through the choice (a fresh split per piece, calls placed in the content around them),
        /// with tools (calls to `f` kept, to `g` content) and without, however the answer is
        /// cut: the same reasoning, content and calls as the whole answer.
        #[test]
        fn harmony_choices_stream_as_whole_in_any_pieces(
            text in harmony_answer(),
            cuts in prop::collection::vec(0usize..200, 0..10),
            tools in any::<bool>(),
        ) {
            let choice = || {
                let parser = tools.then(|| ToolCallParser::new(ToolFormat::Harmony, vec!["f".into()], usize::MAX));
                ChoiceText::new(Some(ReasoningSplitter::new(ReasoningFormat::Harmony, "")), parser)
            };
            let mut whole = choice();
            let mut want = whole.push(&text);
            want.extend(whole.finish());
            let mut streamed = choice();
            let mut got = Vec::new();
            for piece in crate::serve::tool_calls::cut_into_pieces(&text, &cuts) {
                got.extend(streamed.push(piece));
            }
            got.extend(streamed.finish());
            prop_assert_eq!(strip(got), strip(want));
        }
    }
}
