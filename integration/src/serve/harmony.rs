//! GPT-OSS's answers in OpenAI's harmony format, split into reasoning and content piece by piece
//! (streaming) or whole, with the same result either way (vLLM's `openai_gptoss` parser).
//!
//! An answer is a run of messages. Each has a header (`<|channel|>analysis`; a call's
//! `<|channel|>commentary to=functions.f <|constrain|>json`; after the first, `<|start|>assistant`
//! opens it), then `<|message|>`, then its text up to `<|end|>`, `<|return|>` or `<|call|>`. The
//! analysis channel's text is reasoning; a message to a function (`to=functions.NAME` in its
//! header) is a call, its text the arguments; every other message's text (final, commentary) is
//! content. Headers and markers are dropped. Text before any header that does not open one (a
//! model that skipped the format) is content. An answer cut short keeps what its open message
//! said; one that ends inside a call (generation stops at `<|call|>`) is that call if its text is
//! a whole JSON object, else content. An answer that ends in an unfinished first header holding no
//! marker (`to=` was plain text) is content.

use super::reasoning::{PlacedCall, Split};
use super::tool_calls::{partial_marker, ToolCall};

const MESSAGE: &str = "<|message|>";
/// How a header may open.
const OPENINGS: [&str; 2] = ["<|", "to="];
const CHANNEL: &str = "<|channel|>";
/// What ends a message's text: its own end markers, or the next message's start.
const ENDS: [&str; 4] = ["<|end|>", "<|return|>", "<|call|>", "<|start|>"];

/// The markers decoding must keep to split (GPT-OSS's tokenizer makes them special tokens).
pub const MARKERS: [&str; 7] =
    ["<|start|>", "<|channel|>", "<|message|>", "<|end|>", "<|return|>", "<|call|>", "<|constrain|>"];

#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    /// Before the answer's first `<|message|>`: a header, or plain text if it opens none.
    First,
    /// After a message: the next one's header, up to `<|message|>`.
    Header,
    /// A message's text.
    Body(Kind),
}

/// What a message's text is.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Kind {
    Reasoning,
    Content,
    /// The arguments of a call to this function.
    Call(String),
}

/// Splits one harmony answer into reasoning and content.
#[derive(Debug, Clone)]
pub struct HarmonySplitter {
    state: State,
    /// Text not yet resolved.
    buf: String,
    /// How much of `buf` was searched for the marker ending it, so a long header or call is
    /// scanned once, not once per piece.
    scanned: usize,
    /// Whether a message has begun (a header ended by `<|message|>`, or plain text).
    begun: bool,
}

impl Default for HarmonySplitter {
    fn default() -> Self {
        Self { state: State::First, buf: String::new(), scanned: 0, begun: false }
    }
}

impl HarmonySplitter {
    /// Feeds the next piece of text; what became final goes to `out`.
    pub fn push(&mut self, text: &str, out: &mut Split) {
        self.buf.push_str(text);
        self.run(false, out);
    }

    /// The answer ended: resolves what was held back into `out`.
    pub fn finish(&mut self, out: &mut Split) {
        self.run(true, out);
    }

    fn run(&mut self, at_end: bool, out: &mut Split) {
        loop {
            match &self.state {
                State::First => {
                    // A header opens with a marker, or with a recipient (`to=functions.f<|channel|>`,
                    // as the template writes calls after `<|start|>assistant`); other text means
                    // the model skipped the format.
                    let start = self.buf.trim_start();
                    if OPENINGS.iter().any(|o| start.starts_with(o)) {
                        self.state = State::Header;
                    } else if OPENINGS.iter().any(|o| o.starts_with(start)) {
                        if !at_end {
                            return;
                        }
                        self.state = State::Header;
                    } else {
                        self.begun = true;
                        self.state = State::Body(Kind::Content);
                    }
                }
                State::Header => {
                    if let Some((at, len)) = find(&self.buf, &mut self.scanned, &[MESSAGE]) {
                        let header = &self.buf[..at];
                        let kind = match (function(header), channel(header)) {
                            (Some(name), _) => Kind::Call(name.to_string()),
                            (None, Some("analysis")) => Kind::Reasoning,
                            _ => Kind::Content,
                        };
                        self.buf.drain(..at + len);
                        self.begun = true;
                        self.state = State::Body(kind);
                        continue;
                    }
                    if at_end {
                        // An unfinished header says nothing, unless the answer never began and
                        // holds no marker nor a function recipient: then it was text that
                        // happened to start with `to=`.
                        let text = std::mem::take(&mut self.buf);
                        if !self.begun && !text.contains("<|") && !text.trim_start().starts_with("to=functions.") {
                            out.content.push_str(&text);
                        }
                    }
                    return;
                }
                State::Body(Kind::Call(name)) => {
                    // A call's arguments are read whole, at its end.
                    match find(&self.buf, &mut self.scanned, &ENDS) {
                        Some((at, len)) => {
                            let arguments = self.buf[..at].trim().to_string();
                            read_call(name, arguments, out);
                            self.buf.drain(..at + len);
                            self.state = State::Header;
                        }
                        // Generation stops at `<|call|>` (an end-of-sequence token), so a call's
                        // end is often the answer's: whole JSON is a call, anything else text.
                        None if at_end => {
                            let arguments = std::mem::take(&mut self.buf).trim().to_string();
                            read_call(name, arguments, out);
                            return;
                        }
                        None => return,
                    }
                }
                State::Body(kind) => {
                    // What is held back here is at most a partial marker, so a search from the
                    // start costs little.
                    let sink = if *kind == Kind::Reasoning { &mut out.reasoning } else { &mut out.content };
                    let end = ENDS.iter().filter_map(|m| self.buf.find(m).map(|at| (at, m.len()))).min();
                    match end {
                        Some((at, len)) => {
                            sink.push_str(&self.buf[..at]);
                            self.buf.drain(..at + len);
                            self.state = State::Header;
                        }
                        None => {
                            let hold = if at_end {
                                0
                            } else {
                                ENDS.iter().map(|m| partial_marker(&self.buf, m)).max().unwrap_or(0)
                            };
                            sink.extend(self.buf.drain(..self.buf.len() - hold));
                            return;
                        }
                    }
                }
            }
        }
    }
}

/// The first of `markers` in `buf` (its offset and length), searching only what earlier calls had
/// not searched (`scanned` bytes, less a marker's length, which may have been cut). Resets
/// `scanned` when one is found; remembers how far it looked when none is.
fn find(buf: &str, scanned: &mut usize, markers: &[&str]) -> Option<(usize, usize)> {
    let overlap = markers.iter().map(|m| m.len()).max().unwrap_or(0);
    let mut from = scanned.saturating_sub(overlap);
    while !buf.is_char_boundary(from) {
        from -= 1;
    }
    let found = markers.iter().filter_map(|m| buf[from..].find(m).map(|at| (from + at, m.len()))).min();
    *scanned = if found.is_some() { 0 } else { buf.len() };
    found
}

/// A call's `arguments` into `out`: a call when they are a JSON object (as every format requires),
/// else content.
fn read_call(name: &str, arguments: String, out: &mut Split) {
    match serde_json::from_str::<serde_json::Value>(&arguments).is_ok_and(|v| v.is_object()) {
        true => {
            let call = ToolCall { name: name.to_string(), arguments };
            out.calls.push(PlacedCall { at: out.content.len(), call });
        }
        false => out.content.push_str(&arguments),
    }
}

/// The function a header's message is sent to (`to=functions.NAME`, the name ending at a space or
/// a marker).
fn function(header: &str) -> Option<&str> {
    let rest = &header[header.find("to=functions.")? + "to=functions.".len()..];
    let end = rest.find([' ', '<', '\n']).unwrap_or(rest.len());
    Some(&rest[..end]).filter(|n| !n.is_empty())
}

/// The channel a header names (`<|channel|>NAME`, the name ending at a space or a marker).
fn channel(header: &str) -> Option<&str> {
    let rest = &header[header.find(CHANNEL)? + CHANNEL.len()..];
    let end = rest.find([' ', '<', '\n']).unwrap_or(rest.len());
    Some(&rest[..end])
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn whole(text: &str) -> Split {
        let mut s = HarmonySplitter::default();
        let mut out = Split::default();
        s.push(text, &mut out);
        s.finish(&mut out);
        out
    }

    fn split(reasoning: &str, content: &str) -> Split {
        Split { reasoning: reasoning.into(), content: content.into(), calls: vec![] }
    }

    /// Answers as gpt-oss writes them after the template's `<|start|>assistant`, split by hand
    /// as vLLM's `openai_gptoss` parser splits them.
    #[test]
    fn the_analysis_channel_is_reasoning_the_others_content() {
        let answer = "<|channel|>analysis<|message|>User greets. Reply.<|end|>\
                      <|start|>assistant<|channel|>final<|message|>Hi there!<|return|>";
        assert_eq!(whole(answer), split("User greets. Reply.", "Hi there!"));
        // Generation stops at `<|return|>` (an end-of-sequence token), so it may be absent.
        let cut = "<|channel|>analysis<|message|>Think.<|end|><|start|>assistant<|channel|>final<|message|>Done";
        assert_eq!(whole(cut), split("Think.", "Done"));
        // A call: its header names the function (after the channel, or before it as the
        // template writes calls in a history); its text is the arguments.
        let call = "<|channel|>analysis<|message|>Need weather.<|end|><|start|>assistant<|channel|>commentary \
                    to=functions.get_weather <|constrain|>json<|message|> {\"city\": \"Paris\"}<|call|>";
        let weather =
            |args: &str| PlacedCall { at: 0, call: ToolCall { name: "get_weather".into(), arguments: args.into() } };
        let want = Split { calls: vec![weather("{\"city\": \"Paris\"}")], ..split("Need weather.", "") };
        assert_eq!(whole(call), want);
        let before = "<|channel|>commentary<|message|>Checking.<|end|><|start|>assistant to=functions.get_weather\
                      <|channel|>commentary json<|message|>{}<|call|>";
        assert_eq!(
            whole(before),
            Split { calls: vec![PlacedCall { at: 9, ..weather("{}") }], ..split("", "Checking.") }
        );
        // Generation stops at `<|call|>`: a whole object is the call, a call cut short is text.
        let stopped = "<|channel|>commentary to=functions.get_weather<|message|>{\"city\": \"Rome\"}";
        assert_eq!(whole(stopped), Split { calls: vec![weather("{\"city\": \"Rome\"}")], ..split("", "") });
        let cut_call = "<|channel|>commentary to=functions.get_weather<|message|>{\"ci";
        assert_eq!(whole(cut_call), split("", "{\"ci"));
        // A call as the answer's first message, its recipient right after `<|start|>assistant`.
        let first = " to=functions.get_weather<|channel|>commentary json<|message|>{}<|call|>";
        assert_eq!(whole(first), Split { calls: vec![weather("{}")], ..split("", "") });
        // Arguments that are no JSON object are text.
        let bad = "<|channel|>commentary to=functions.get_weather<|message|>[1]<|call|>";
        assert_eq!(whole(bad), split("", "[1]"));
        assert_eq!(whole("<|channel|>analysis<|message|>cut sho"), split("cut sho", ""));
        assert_eq!(whole("Plain text, no format."), split("", "Plain text, no format."));
        // Text that only starts like a recipient, and never becomes a header, is content.
        assert_eq!(whole("to=whom it may concern"), split("", "to=whom it may concern"));
        assert_eq!(whole(" to=functions.f<|chan"), split("", ""));
        assert_eq!(whole(" to=functions.get_weather"), split("", ""));
        // Two calls in one piece are placed in the content around them.
        let two = "<|channel|>final<|message|>A<|end|><|start|>assistant to=functions.f<|channel|>c<|message|>{}\
                   <|call|><|start|>assistant<|channel|>final<|message|>B<|end|><|start|>assistant \
                   to=functions.g<|channel|>c<|message|>{}<|call|>";
        let placed = |at, name: &str| PlacedCall { at, call: ToolCall { name: name.into(), arguments: "{}".into() } };
        assert_eq!(whole(two), Split { calls: vec![placed(1, "f"), placed(2, "g")], ..split("", "AB") });
        assert_eq!(whole("<|chan"), split("", ""));
        assert_eq!(whole(""), split("", ""));
        // Decided only once the text shows whether it opens a header.
        for pieces in [&[" ", "Plain"][..], &["<", "y is plain"], &["<", "|channel|>final<|message|>Hi"]] {
            let mut s = HarmonySplitter::default();
            let mut out = Split::default();
            for p in pieces {
                s.push(p, &mut out);
            }
            s.finish(&mut out);
            assert_eq!(out, whole(&pieces.concat()), "{pieces:?}");
        }
        assert_eq!(channel("assistant<|channel|>final"), Some("final"));
        assert_eq!(channel("<|channel|>commentary to=functions.f <|constrain|>json"), Some("commentary"));
        assert_eq!(channel("assistant"), None);
    }

    fn answer() -> impl Strategy<Value = String> {
        let piece = prop_oneof![
            Just("<|channel|>analysis<|message|>".to_string()),
            Just("<|channel|>final<|message|>".to_string()),
            Just("<|channel|>commentary to=functions.f<|message|>".to_string()),
            Just("<|call|>".to_string()),
            Just(" to=functions.f<|channel|>c<|message|>{}".to_string()),
            Just("t".to_string()),
            Just("<|end|><|start|>assistant".to_string()),
            Just("<|return|>".to_string()),
            Just("<|mess".to_string()),
            Just("<|".to_string()),
            Just("Héllo".to_string()),
            Just(" \n".to_string()),
            Just("x<y".to_string()),
        ];
        prop::collection::vec(piece, 0..8).prop_map(|p| p.concat())
    }

    proptest! {
        /// However the text is cut into pieces, the split is that of the whole, and no text is
        /// made up.
        #[test]
        fn streaming_in_any_pieces_equals_splitting_the_whole(
            text in answer(),
            cuts in prop::collection::vec(0usize..120, 0..10),
        ) {
            let mut s = HarmonySplitter::default();
            let mut out = Split::default();
            for piece in crate::serve::tool_calls::cut_into_pieces(&text, &cuts) {
                s.push(piece, &mut out);
            }
            s.finish(&mut out);
            let w = whole(&text);
            prop_assert_eq!(&out, &w);
            prop_assert!(w.reasoning.len() + w.content.len() <= text.len());
        }
    }
}
