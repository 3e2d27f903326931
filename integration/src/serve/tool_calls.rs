//! Tool calls in a model's output, as OpenAI's `tool_calls`: a parser fed the decoded text piece
//! by piece (streaming) or whole, which gives the same content and calls either way.
//!
//! Five formats, named after vLLM's parsers for them (the fifth, `openai`, GPT-OSS's harmony calls,
//! is read from message headers by [`crate::serve::harmony`] and handed to
//! [`ToolCallParser::accept`]):
//! - `hermes` (Qwen2.5, Qwen3, QwQ, Hermes): `<tool_call>{"name": N, "arguments": {...}}</tool_call>`
//!   anywhere in the text; an unterminated block at the end is read too.
//! - `llama3_json` (Llama 3.1 to 3.3): the whole answer is `{"name": N, "parameters": {...}}`
//!   (optionally after `<|python_tag|>`), several joined by `;`. An answer starting otherwise is
//!   plain text.
//! - `mistral` (Mistral Nemo, Small, Devstral): content, then `[TOOL_CALLS]` and a JSON array of
//!   calls, or (tokenizers v11 and later) `[TOOL_CALLS]N[ARGS]{...}` per call.
//! - `deepseek_v3` (DeepSeek V3, V3.1, R1): content, then `<｜tool▁calls▁begin｜>` and per call
//!   `<｜tool▁call▁begin｜>N<｜tool▁sep｜>{...}<｜tool▁call▁end｜>` (V3 and R1 write
//!   `function<｜tool▁sep｜>N` and the arguments in a json code fence), then
//!   `<｜tool▁calls▁end｜>`.
//!
//! The last two read everything after their opening marker when the answer ends.
//!
//! A call names one of the request's tools and has its arguments object (`arguments` or
//! `parameters`; also a JSON string holding the object), kept as the model wrote it. A block
//! that does not read as such a call stays in the content as written: nothing the model wrote is
//! lost. Unlike vLLM, text after calls is content too; whitespace next to a call is dropped
//! unless content continues on both sides of it.

use anyhow::{bail, Result};
use serde::Deserialize;
use serde_json::value::RawValue;

/// How a model writes its tool calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ToolFormat {
    /// `<tool_call>{json}</tool_call>` blocks.
    Hermes,
    /// The answer is JSON calls joined by `;`.
    Llama3Json,
    /// `[TOOL_CALLS]` then the calls.
    Mistral,
    /// `<｜tool▁calls▁begin｜>` then DeepSeek's call blocks.
    DeepSeekV3,
    /// GPT-OSS's harmony calls (`<|channel|>commentary to=functions.NAME ... <|message|>ARGS
    /// <|call|>`): their headers are read by the harmony reasoning splitter
    /// (`reasoning_parser = "openai_gptoss"`), which hands the calls to [`ToolCallParser::accept`].
    Harmony,
}

const HERMES_OPEN: &str = "<tool_call>";
const HERMES_CLOSE: &str = "</tool_call>";
const PYTHON_TAG: &str = "<|python_tag|>";
const MISTRAL_CALLS: &str = "[TOOL_CALLS]";
const MISTRAL_ARGS: &str = "[ARGS]";
const DS_CALLS_BEGIN: &str = "<｜tool▁calls▁begin｜>";
const DS_CALLS_END: &str = "<｜tool▁calls▁end｜>";
const DS_CALL_BEGIN: &str = "<｜tool▁call▁begin｜>";
const DS_CALL_END: &str = "<｜tool▁call▁end｜>";
const DS_SEP: &str = "<｜tool▁sep｜>";

impl ToolFormat {
    /// The format named in `[server] tool_parser`: `None` for `none`; `auto` is the caller's.
    pub fn named(name: &str) -> Result<Option<Self>> {
        Ok(match name {
            "hermes" => Some(Self::Hermes),
            "llama3_json" => Some(Self::Llama3Json),
            "mistral" => Some(Self::Mistral),
            "deepseek_v3" => Some(Self::DeepSeekV3),
            "openai" => Some(Self::Harmony),
            "none" => None,
            other => {
                bail!("unknown tool_parser `{other}`; valid: auto, hermes, llama3_json, mistral, deepseek_v3, openai, none")
            }
        })
    }

    /// The format a chat template teaches, if it is one of ours: by the markers it prints, or
    /// for Llama 3 by its `{"name": ..., "parameters": ...}` instruction.
    pub fn detect(template: &str) -> Option<Self> {
        // gpt-oss's template writes a call's header as `"<|start|>assistant to=" + "functions." + name`.
        if template.contains("<|call|>") && template.contains("functions.") {
            Some(Self::Harmony)
        } else if template.contains(DS_CALLS_BEGIN) {
            Some(Self::DeepSeekV3)
        } else if template.contains(MISTRAL_CALLS) {
            Some(Self::Mistral)
        } else if template.contains(HERMES_OPEN) {
            Some(Self::Hermes)
        } else if template.contains(PYTHON_TAG) || template.contains(r#""parameters": dictionary of argument name"#) {
            Some(Self::Llama3Json)
        } else {
            None
        }
    }

    /// Whether the format's markers are special tokens of `tokenizer` (Hermes 3's `<tool_call>`,
    /// Llama 3's `<|python_tag|>`), which decoding skips unless told not to.
    pub fn markers_are_special(self, tokenizer: &tokenizers::Tokenizer) -> bool {
        let markers: &[&str] = match self {
            Self::Hermes => &[HERMES_OPEN, HERMES_CLOSE],
            Self::Llama3Json => &[PYTHON_TAG],
            Self::Mistral => &[MISTRAL_CALLS, MISTRAL_ARGS],
            Self::DeepSeekV3 => &[DS_CALLS_BEGIN, DS_CALL_BEGIN, DS_SEP],
            Self::Harmony => &crate::serve::harmony::MARKERS,
        };
        special_among(tokenizer, markers)
    }

    /// The name `[server] tool_parser` takes.
    pub fn name(self) -> &'static str {
        match self {
            Self::Hermes => "hermes",
            Self::Llama3Json => "llama3_json",
            Self::Mistral => "mistral",
            Self::DeepSeekV3 => "deepseek_v3",
            Self::Harmony => "openai",
        }
    }

    /// The marker that opens a call (Hermes) or the calls (Mistral, DeepSeek).
    fn opening(self) -> Option<&'static str> {
        match self {
            Self::Hermes => Some(HERMES_OPEN),
            Self::Mistral => Some(MISTRAL_CALLS),
            Self::DeepSeekV3 => Some(DS_CALLS_BEGIN),
            Self::Llama3Json | Self::Harmony => None,
        }
    }
}

/// One call: the function's name and its arguments as JSON text (OpenAI's `arguments`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToolCall {
    /// The function's name.
    pub name: String,
    /// The arguments object as JSON text, as the model wrote it.
    pub arguments: String,
}

/// What a piece of output became: text for `content`, then calls.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Parsed {
    /// Content text.
    pub content: String,
    /// Completed calls.
    pub calls: Vec<ToolCall>,
}

impl Parsed {
    /// Appends `later`.
    pub fn extend(&mut self, later: Parsed) {
        self.content.push_str(&later.content);
        self.calls.extend(later.calls);
    }
}

/// Where the parser stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Content: before a marker (and llama3_json once the answer is known to be text).
    Text,
    /// Hermes: inside a block, waiting for its end.
    InCall,
    /// llama3_json: only whitespace (or part of `<|python_tag|>`) so far.
    Undecided,
    /// Calls (after a Mistral or DeepSeek marker, a llama3_json or forced answer): read at the end.
    Calls,
}

/// An answer whose form a grammar forced (`tool_choice` `required` or a named function).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Forced {
    /// The whole answer is the arguments object of a call to this function.
    Named(String),
    /// The whole answer is a JSON array of `{"name": N, "parameters": {...}}`.
    List,
}

/// A streaming tool-call parser for one answer.
#[derive(Debug, Clone)]
pub struct ToolCallParser {
    format: ToolFormat,
    /// The answer's form was forced by a grammar: it is read whole at the end.
    forced: Option<Forced>,
    /// The functions a call may name.
    names: Vec<String>,
    /// Calls kept at most (`parallel_tool_calls: false` keeps one); later ones are dropped.
    max_calls: usize,
    state: State,
    /// Text not yet resolved.
    buf: String,
    /// Marked formats: whitespace held back, sent only if more content follows.
    pending_ws: String,
    /// Hermes, inside a block: how much of `buf` is known to hold no end marker.
    scanned: usize,
    /// Marked formats: a call just ended, so leading whitespace is dropped.
    after_call: bool,
    /// Ids are Mistral's 9 letters and digits.
    short_ids: bool,
    /// Calls read so far (kept or not).
    calls_seen: usize,
}

/// The arguments of a call, and the call itself as models write it (`parameters` is Llama's
/// name for `arguments`).
#[derive(Deserialize)]
struct WrittenCall<'a> {
    name: String,
    #[serde(borrow, alias = "parameters")]
    arguments: Option<&'a RawValue>,
}

/// `text` as a call to one of `names`, or `None` when it is not one.
fn read_call(text: &str, names: &[String]) -> Option<ToolCall> {
    let call: WrittenCall = serde_json::from_str(text.trim()).ok()?;
    if !names.contains(&call.name) {
        return None;
    }
    let raw = call.arguments?;
    let arguments = match raw.get().as_bytes().first() {
        Some(b'{') => raw.get().to_string(),
        // Arguments written as a JSON string holding the object.
        Some(b'"') => {
            let inner: String = serde_json::from_str(raw.get()).ok()?;
            serde_json::from_str::<&RawValue>(&inner).ok().filter(|v| v.get().starts_with('{'))?;
            inner
        }
        _ => return None,
    };
    Some(ToolCall { name: call.name, arguments })
}

/// Whether any of `markers` is a special token of `tokenizer` (which decoding skips unless told
/// not to).
pub fn special_among(tokenizer: &tokenizers::Tokenizer, markers: &[&str]) -> bool {
    tokenizer.get_added_tokens_decoder().values().any(|t| t.special && markers.contains(&t.content.as_str()))
}

/// Length of the longest end of `text` that `marker` starts with (text that may yet become
/// `marker`).
pub(crate) fn partial_marker(text: &str, marker: &str) -> usize {
    (1..marker.len().min(text.len() + 1))
        .rev()
        .find(|&n| text.is_char_boundary(text.len() - n) && marker.starts_with(&text[text.len() - n..]))
        .unwrap_or(0)
}

impl ToolCallParser {
    /// A parser for one answer in `format`, of calls to `names`, keeping at most `max_calls`.
    pub fn new(format: ToolFormat, names: Vec<String>, max_calls: usize) -> Self {
        let state = match format {
            ToolFormat::Llama3Json => State::Undecided,
            ToolFormat::Hermes | ToolFormat::Mistral | ToolFormat::DeepSeekV3 | ToolFormat::Harmony => State::Text,
        };
        Self {
            format,
            short_ids: format == ToolFormat::Mistral,
            forced: None,
            names,
            max_calls,
            state,
            buf: String::new(),
            pending_ws: String::new(),
            scanned: 0,
            after_call: false,
            calls_seen: 0,
        }
    }

    /// A parser for an answer whose form a grammar forced, of calls to `names`, keeping at most
    /// `max_calls`; `format` (the server's, if any) decides only the ids' form.
    pub fn forced(forced: Forced, format: Option<ToolFormat>, names: Vec<String>, max_calls: usize) -> Self {
        let short_ids = format == Some(ToolFormat::Mistral);
        Self {
            forced: Some(forced),
            state: State::Calls,
            short_ids,
            ..Self::new(ToolFormat::Llama3Json, names, max_calls)
        }
    }

    /// A fresh id for a call: 9 letters and digits for Mistral (its templates refuse others when
    /// the call comes back in a history), else OpenAI's `call_` and 24.
    pub fn call_id(&self) -> String {
        use rand::Rng;
        let n = if self.short_ids { 9 } else { 24 };
        let id: String = rand::rng().sample_iter(rand::distr::Alphanumeric).take(n).map(char::from).collect();
        if n == 9 {
            id
        } else {
            format!("call_{id}")
        }
    }

    /// Whether the answer's `finish_reason` is `tool_calls`: it called tools, unprompted or as
    /// `required` (a call to a named function ends with `stop`, as OpenAI's does).
    pub fn reports_tool_calls(&self) -> bool {
        self.called() && !matches!(self.forced, Some(Forced::Named(_)))
    }

    /// Whether any call was read.
    pub fn called(&self) -> bool {
        self.calls_seen > 0
    }

    /// Feeds the next piece of text; returns what became final.
    pub fn push(&mut self, text: &str) -> Parsed {
        self.buf.push_str(text);
        let mut out = Parsed::default();
        // Harmony's calls are read from its headers (see `accept`): the text is content. (A
        // forced parser reads its answer as llama3_json.)
        if self.format == ToolFormat::Harmony {
            out.content = std::mem::take(&mut self.buf);
            return out;
        }
        match self.format.opening() {
            Some(opening) => self.marked(opening, &mut out),
            None => self.llama3(&mut out),
        }
        out
    }

    /// The answer ended: resolves what was held back.
    pub fn finish(&mut self) -> Parsed {
        let mut out = Parsed::default();
        let rest = std::mem::take(&mut self.buf);
        match self.state {
            State::Text if self.format == ToolFormat::Llama3Json => out.content.push_str(&rest),
            State::Text => self.text(&rest, &mut out),
            // An unterminated block is read as a call if it is one.
            State::InCall => self.block(&rest, &format!("{HERMES_OPEN}{rest}"), &mut out),
            State::Undecided => out.content.push_str(&rest),
            State::Calls => self.section(&rest, &mut out),
        }
        // Whitespace after the last call is dropped; with no call it is content.
        if !self.called() {
            out.content.push_str(&std::mem::take(&mut self.pending_ws));
        }
        self.state = State::Text;
        out
    }

    /// Everything after the calls' opening marker (or a whole llama3_json or forced answer),
    /// read as calls, or kept as content as written.
    fn section(&mut self, rest: &str, out: &mut Parsed) {
        let names = &self.names;
        let read = match (&self.forced, self.format) {
            (Some(f), _) => forced_calls(f, rest, names).map(|c| (c, "")),
            (None, ToolFormat::Llama3Json) => llama3_calls(rest, names).map(|c| (c, "")),
            (None, ToolFormat::Mistral) => mistral_calls(rest, names).map(|c| (c, "")),
            (None, ToolFormat::DeepSeekV3) => deepseek_calls(rest, names),
            (None, ToolFormat::Hermes | ToolFormat::Harmony) => None,
        };
        match (read, self.format.opening()) {
            (Some((calls, after)), _) => {
                calls.into_iter().for_each(|c| self.keep(c, out));
                self.after_call = true;
                self.text(after, out);
            }
            (None, Some(opening)) => self.text(&format!("{opening}{rest}"), out),
            (None, _) => out.content.push_str(rest),
        }
    }

    /// A call the answer's format carries outside the text this parser reads (harmony's
    /// headers), into `out`: kept when fewer than `max_calls` were; a call to a function the
    /// request did not offer is content (its arguments; its header is gone).
    pub fn accept(&mut self, call: ToolCall, out: &mut Parsed) {
        match self.names.contains(&call.name) {
            true => self.keep(call, out),
            false => out.content.push_str(&call.arguments),
        }
    }

    fn keep(&mut self, call: ToolCall, out: &mut Parsed) {
        if self.calls_seen < self.max_calls {
            out.calls.push(call);
        }
        self.calls_seen += 1;
    }

    /// Content text of a marked format: whitespace next to a call is held back, and sent only when content
    /// follows it.
    fn text(&mut self, text: &str, out: &mut Parsed) {
        let text = if self.after_call { text.trim_start() } else { text };
        if text.is_empty() {
            return;
        }
        self.after_call = false;
        let body = text.trim_end().len();
        if body > 0 {
            out.content.push_str(&std::mem::take(&mut self.pending_ws));
            out.content.push_str(&text[..body]);
        }
        self.pending_ws.push_str(&text[body..]);
    }

    /// A Hermes block's inside: a call, or (written as `raw`) content.
    fn block(&mut self, inside: &str, raw: &str, out: &mut Parsed) {
        match read_call(inside, &self.names) {
            Some(call) => {
                self.keep(call, out);
                self.after_call = true;
            }
            None => self.text(raw, out),
        }
    }

    /// Formats whose calls open with a marker: content up to it; then Hermes' blocks one by one,
    /// or the rest of the answer (Mistral, DeepSeek) at the end.
    fn marked(&mut self, opening: &str, out: &mut Parsed) {
        loop {
            match self.state {
                State::Text => match self.buf.find(opening) {
                    Some(at) => {
                        let before: String = self.buf.drain(..at + opening.len()).collect();
                        self.text(&before[..at], out);
                        self.state = if self.format == ToolFormat::Hermes { State::InCall } else { State::Calls };
                        self.scanned = 0;
                    }
                    None => {
                        let hold = partial_marker(&self.buf, opening);
                        let ready: String = self.buf.drain(..self.buf.len() - hold).collect();
                        self.text(&ready, out);
                        return;
                    }
                },
                State::InCall => match self.buf[self.scanned..].find(HERMES_CLOSE).map(|at| self.scanned + at) {
                    Some(at) => {
                        let block: String = self.buf.drain(..at + HERMES_CLOSE.len()).collect();
                        let inside = &block[..at];
                        self.block(inside, &format!("{HERMES_OPEN}{block}"), out);
                        self.state = State::Text;
                    }
                    None => {
                        // The marker may start in the last few bytes: look there again next time.
                        let mut from = self.buf.len().saturating_sub(HERMES_CLOSE.len() - 1);
                        while !self.buf.is_char_boundary(from) {
                            from -= 1;
                        }
                        self.scanned = from;
                        return;
                    }
                },
                // The calls are read at the end; `Undecided` is llama3_json's alone.
                State::Undecided | State::Calls => return,
            }
        }
    }

    fn llama3(&mut self, out: &mut Parsed) {
        if self.state != State::Undecided {
            if self.state == State::Text {
                out.content.push_str(&std::mem::take(&mut self.buf));
            }
            return;
        }
        let start = self.buf.trim_start();
        if start.is_empty() || (PYTHON_TAG.starts_with(start) && start.len() < PYTHON_TAG.len()) {
            return;
        }
        if start.starts_with('{') || start.starts_with(PYTHON_TAG) {
            self.state = State::Calls;
        } else {
            self.state = State::Text;
            out.content.push_str(&std::mem::take(&mut self.buf));
        }
    }
}

/// Mistral's calls after `[TOOL_CALLS]`: a JSON array of `{"name", "arguments"}`, or
/// `N[ARGS]{...}` per call with `[TOOL_CALLS]` between calls.
fn mistral_calls(text: &str, names: &[String]) -> Option<Vec<ToolCall>> {
    let text = text.trim();
    if text.starts_with('[') {
        let items: Vec<&RawValue> = serde_json::from_str(text).ok()?;
        return items.into_iter().map(|item| read_call(item.get(), names)).collect();
    }
    text.split(MISTRAL_CALLS)
        .map(|call| {
            let (name, arguments) = call.split_once(MISTRAL_ARGS)?;
            let name = name.trim();
            let arguments: &RawValue = serde_json::from_str(arguments.trim()).ok()?;
            (names.iter().any(|n| n == name) && arguments.get().starts_with('{'))
                .then(|| ToolCall { name: name.into(), arguments: arguments.get().into() })
        })
        .collect()
}

/// DeepSeek's calls after `<｜tool▁calls▁begin｜>`, and the text after `<｜tool▁calls▁end｜>`.
fn deepseek_calls<'t>(text: &'t str, names: &[String]) -> Option<(Vec<ToolCall>, &'t str)> {
    let mut rest = text.trim_start();
    let mut calls = Vec::new();
    while let Some(call) = rest.strip_prefix(DS_CALL_BEGIN) {
        let (head, after) = call.split_once(DS_SEP)?;
        let (body, after) = after.split_once(DS_CALL_END)?;
        // V3.1: `N<sep>{...}`; V3 and R1: `function<sep>N` and a json code fence.
        let (name, arguments) = match head.trim() {
            "function" => {
                let (name, fenced) = body.split_once('\n')?;
                let json = fenced.trim().strip_prefix("```json")?.strip_suffix("```")?;
                (name.trim(), json.trim())
            }
            name => (name, body.trim()),
        };
        let arguments: &RawValue = serde_json::from_str(arguments).ok()?;
        if !names.iter().any(|n| n == name) || !arguments.get().starts_with('{') {
            return None;
        }
        calls.push(ToolCall { name: name.into(), arguments: arguments.get().into() });
        rest = after.trim_start();
    }
    let after = rest.strip_prefix(DS_CALLS_END).unwrap_or(rest);
    // Anything but the closing marker between calls is not DeepSeek's format.
    (!calls.is_empty() && (after.len() < rest.len() || rest.is_empty())).then_some((calls, after))
}

/// A whole forced answer as its calls, or `None` when it is not one (cut short by `max_tokens`).
fn forced_calls(forced: &Forced, text: &str, names: &[String]) -> Option<Vec<ToolCall>> {
    match forced {
        Forced::Named(name) => {
            let arguments: &RawValue = serde_json::from_str(text.trim()).ok()?;
            arguments
                .get()
                .starts_with('{')
                .then(|| vec![ToolCall { name: name.clone(), arguments: arguments.get().into() }])
        }
        Forced::List => {
            let items: Vec<&RawValue> = serde_json::from_str(text.trim()).ok()?;
            items.into_iter().map(|item| read_call(item.get(), names)).collect()
        }
    }
}

/// A whole llama3_json answer as its calls to `names`, or `None` when any part is not one.
fn llama3_calls(text: &str, names: &[String]) -> Option<Vec<ToolCall>> {
    let text = text.trim_start();
    let mut rest = text.strip_prefix(PYTHON_TAG).unwrap_or(text).trim();
    let mut calls = Vec::new();
    while !rest.is_empty() {
        let mut values = serde_json::Deserializer::from_str(rest).into_iter::<&RawValue>();
        let raw = values.next()?.ok()?;
        calls.push(read_call(raw.get(), names)?);
        rest = rest[values.byte_offset()..].trim_start();
        if let Some(next) = rest.strip_prefix(';') {
            rest = next.trim_start();
            if rest.is_empty() {
                return None;
            }
        } else if !rest.is_empty() {
            return None;
        }
    }
    (!calls.is_empty()).then_some(calls)
}

/// `text` cut at `cuts` (byte offsets taken modulo its length and moved to character
/// boundaries), for tests that stream an answer in pieces.
#[cfg(test)]
pub(crate) fn cut_into_pieces<'t>(text: &'t str, cuts: &[usize]) -> Vec<&'t str> {
    let mut cuts: Vec<usize> = cuts.iter().map(|&c| c % (text.len() + 1)).collect();
    cuts.sort();
    let (mut pieces, mut at) = (Vec::new(), 0);
    for mut c in cuts {
        while !text.is_char_boundary(c) {
            c += 1;
        }
        if c > at {
            pieces.push(&text[at..c]);
            at = c;
        }
    }
    pieces.push(&text[at..]);
    pieces
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn call(name: &str, arguments: &str) -> ToolCall {
        ToolCall { name: name.into(), arguments: arguments.into() }
    }

    /// The functions the test answers may call.
    fn names() -> Vec<String> {
        ["get_weather", "a", "b", "x", "f"].map(String::from).to_vec()
    }

    fn whole(format: ToolFormat, text: &str) -> Parsed {
        let mut p = ToolCallParser::new(format, names(), usize::MAX);
        let mut out = p.push(text);
        out.extend(p.finish());
        out
    }

    /// The answer fed in pieces cut at `cuts` (byte offsets, moved to character boundaries).
    fn streamed(format: ToolFormat, text: &str, cuts: &[usize]) -> Parsed {
        let mut p = ToolCallParser::new(format, names(), usize::MAX);
        let mut out = Parsed::default();
        for piece in cut_into_pieces(text, cuts) {
            out.extend(p.push(piece));
        }
        out.extend(p.finish());
        out
    }

    /// Answers read as vLLM's hermes parser reads them (its regex and `json.loads`), where the
    /// module doc does not say otherwise; expected values written out by hand.
    #[test]
    fn hermes_reads_calls_and_keeps_the_rest_as_content() {
        let h = |t: &str| whole(ToolFormat::Hermes, t);
        let weather = call("get_weather", r#"{"city": "Lima"}"#);
        let got = h("<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Lima\"}}\n</tool_call>");
        assert_eq!(got, Parsed { content: String::new(), calls: vec![weather.clone()] });
        // Thinking before the call is content; whitespace around calls is dropped.
        let two = "<think>\nhm\n</think>\n\n<tool_call>\n{\"name\": \"a\", \"arguments\": {}}\n</tool_call>\n\
                   <tool_call>\n{\"name\": \"b\", \"arguments\": {\"k\": [1]}}\n</tool_call>\n";
        let want = Parsed {
            content: "<think>\nhm\n</think>".into(),
            calls: vec![call("a", "{}"), call("b", r#"{"k": [1]}"#)],
        };
        assert_eq!(h(two), want);
        // Content on both sides of a call keeps the whitespace before the call between them.
        let around = "Let me check. <tool_call>{\"name\": \"a\", \"arguments\": {}}</tool_call>\n Done.";
        assert_eq!(h(around), Parsed { content: "Let me check. Done.".into(), calls: vec![call("a", "{}")] });
        // No call: the text as written, trailing whitespace too.
        assert_eq!(h("Hello <tool\n"), Parsed { content: "Hello <tool\n".into(), calls: vec![] });
        // An unterminated block at the end is a call when it reads as one, else content.
        assert_eq!(
            h("<tool_call>{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Lima\"}}").calls,
            vec![weather]
        );
        let cut = "<tool_call>{\"name\": \"get_weather\", \"argum";
        assert_eq!(h(cut), Parsed { content: cut.into(), calls: vec![] });
        // Blocks that are not calls to the request's tools stay in the content as written.
        for bad in [
            "<tool_call>not json</tool_call>",
            "<tool_call>{\"arguments\": {}}</tool_call>",
            "<tool_call>{\"name\": \"a\"}</tool_call>",
            "<tool_call>{\"name\": \"not_a_tool\", \"arguments\": {}}</tool_call>",
            "<tool_call>{\"name\": \"f\", \"arguments\": [1]}</tool_call>",
            "<tool_call>{\"name\": \"f\", \"arguments\": \"not an object\"}</tool_call>",
        ] {
            assert_eq!(h(bad), Parsed { content: bad.into(), calls: vec![] }, "{bad}");
        }
        // Arguments written as a JSON string are that string; text after calls is content.
        let s = "<tool_call>{\"name\": \"f\", \"arguments\": \"{\\\"x\\\": 1}\"}</tool_call> done ";
        assert_eq!(h(s), Parsed { content: "done".into(), calls: vec![call("f", r#"{"x": 1}"#)] });
    }

    #[test]
    fn llama3_json_reads_a_whole_answer_of_calls_or_none() {
        let l = |t: &str| whole(ToolFormat::Llama3Json, t);
        let got = l(" {\"name\": \"get_weather\", \"parameters\": {\"city\": \"Lima\"}}");
        assert_eq!(got.calls, vec![call("get_weather", r#"{"city": "Lima"}"#)]);
        assert_eq!(got.content, "");
        let two =
            l("<|python_tag|>{\"name\": \"a\", \"parameters\": {\"x\": 1}}; {\"name\": \"b\", \"arguments\": {}}");
        assert_eq!(two.calls, vec![call("a", r#"{"x": 1}"#), call("b", "{}")]);
        // JSON that is not a call to one of the tools (a user asked for a record) is content.
        for text in [
            "The weather is fine. {\"name\": \"a\", \"parameters\": {}}",
            "{\"name\": \"a\", \"parameters\": {}} trailing",
            "{\"name\": \"a\", \"parameters\": {}};",
            "{\"name\": \"Bob\", \"age\": 3}",
            "{\"name\": \"a\", \"age\": 3}",
            "{oops",
            "<|python",
        ] {
            assert_eq!(l(text), Parsed { content: text.into(), calls: vec![] }, "{text}");
        }
    }

    #[test]
    fn parallel_tool_calls_false_keeps_the_first_call() {
        let text = "<tool_call>{\"name\": \"a\", \"arguments\": {}}</tool_call>\
                    <tool_call>{\"name\": \"b\", \"arguments\": {}}</tool_call>";
        let mut p = ToolCallParser::new(ToolFormat::Hermes, names(), 1);
        let mut out = p.push(text);
        out.extend(p.finish());
        assert_eq!(out, Parsed { content: String::new(), calls: vec![call("a", "{}")] });
        assert!(p.called());
    }

    /// Mistral's two forms (Nemo's array; v11's `N[ARGS]{...}`), content before the marker, and
    /// its 9-character ids.
    #[test]
    fn mistral_reads_both_forms_after_its_marker() {
        let m = |t: &str| whole(ToolFormat::Mistral, t);
        let array = "[TOOL_CALLS][{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Lima\"}}, {\"name\": \"a\", \"arguments\": {}}]";
        assert_eq!(m(array).calls, vec![call("get_weather", r#"{"city": "Lima"}"#), call("a", "{}")]);
        let v11 = "Checking. [TOOL_CALLS]get_weather[ARGS]{\"city\": \"Lima\"}[TOOL_CALLS]a[ARGS]{}";
        assert_eq!(
            m(v11),
            Parsed {
                content: "Checking.".into(),
                calls: vec![call("get_weather", r#"{"city": "Lima"}"#), call("a", "{}")]
            }
        );
        for bad in ["[TOOL_CALLS]nope[ARGS]{}", "[TOOL_CALLS][{\"name\": \"a\"}]", "[TOOL_CALLS]a{}", "[TOOL_CALLS]"] {
            assert_eq!(m(bad), Parsed { content: bad.into(), calls: vec![] }, "{bad}");
        }
        let id = ToolCallParser::new(ToolFormat::Mistral, names(), 1).call_id();
        assert!(id.len() == 9 && id.chars().all(|c| c.is_ascii_alphanumeric()), "{id}");
        // Forced calls on a Mistral server too: their ids come back in the next turn's history.
        let id = ToolCallParser::forced(Forced::List, Some(ToolFormat::Mistral), names(), 1).call_id();
        assert!(id.len() == 9 && id.chars().all(|c| c.is_ascii_alphanumeric()), "{id}");
        let id = ToolCallParser::new(ToolFormat::Hermes, names(), 1).call_id();
        assert!(id.starts_with("call_") && id.len() == 29, "{id}");
    }

    /// DeepSeek V3.1's blocks, V3/R1's fenced ones, and text after the calls.
    #[test]
    fn deepseek_reads_its_call_blocks() {
        let d = |t: &str| whole(ToolFormat::DeepSeekV3, t);
        let v31 = "<think></think>Sure.<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>get_weather<｜tool▁sep｜>{\"city\": \"Lima\"}<｜tool▁call▁end｜><｜tool▁call▁begin｜>a<｜tool▁sep｜>{}<｜tool▁call▁end｜><｜tool▁calls▁end｜>";
        let want = vec![call("get_weather", r#"{"city": "Lima"}"#), call("a", "{}")];
        assert_eq!(d(v31), Parsed { content: "<think></think>Sure.".into(), calls: want });
        let v3 = "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n{\"city\": \"Lima\"}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜> Done";
        assert_eq!(d(v3), Parsed { content: "Done".into(), calls: vec![call("get_weather", r#"{"city": "Lima"}"#)] });
        for bad in [
            "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>nope<｜tool▁sep｜>{}<｜tool▁call▁end｜>",
            "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>a<｜tool▁sep｜>{}",
            "<｜tool▁calls▁begin｜>junk",
        ] {
            assert_eq!(d(bad), Parsed { content: bad.into(), calls: vec![] }, "{bad}");
        }
    }

    /// A forced answer is read whole: the named function's arguments, or the array of calls.
    #[test]
    fn forced_answers_are_read_whole() {
        let read = |forced: Forced, text: &str| {
            let mut p = ToolCallParser::forced(forced, None, names(), usize::MAX);
            let mut out = p.push(&text[..text.len() / 2]);
            out.extend(p.push(&text[text.len() / 2..]));
            out.extend(p.finish());
            out
        };
        let named = read(Forced::Named("get_weather".into()), "{\"city\": \"Lima\"}");
        assert_eq!(named, Parsed { content: String::new(), calls: vec![call("get_weather", r#"{"city": "Lima"}"#)] });
        let list = read(
            Forced::List,
            "[{\"name\": \"a\", \"parameters\": {\"x\": 1}}, {\"name\": \"b\", \"parameters\": {}}]",
        );
        assert_eq!(list.calls, vec![call("a", r#"{"x": 1}"#), call("b", "{}")]);
        // Cut short (max_tokens): the text as content.
        let cut = "{\"city\": \"Li";
        assert_eq!(read(Forced::Named("get_weather".into()), cut), Parsed { content: cut.into(), calls: vec![] });
    }

    /// Markers a tokenizer holds as special tokens are found (decoding would skip them); the
    /// same text as ordinary added tokens is not.
    #[test]
    fn special_markers_are_found() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gguf/llama3_tiny.gguf");
        let content =
            candle_core::quantized::gguf_file::Content::read(&mut std::fs::File::open(path).unwrap()).unwrap();
        let mut tok = crate::model::gguf_tokenizer::from_gguf(&content).unwrap();
        let markers = crate::serve::reasoning::MARKERS;
        assert!(!special_among(&tok, &markers) && !ToolFormat::Hermes.markers_are_special(&tok));
        tok.add_tokens(&[tokenizers::AddedToken::from("<tool_call>", false)]);
        assert!(!ToolFormat::Hermes.markers_are_special(&tok), "an ordinary added token");
        tok.add_special_tokens(&[tokenizers::AddedToken::from("</think>", true)]);
        assert!(special_among(&tok, &markers));
        assert!(!ToolFormat::Mistral.markers_are_special(&tok));
    }

    #[test]
    fn formats_are_detected_from_published_templates() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/chat_templates");
        let detect = |f: &str| ToolFormat::detect(&std::fs::read_to_string(dir.join(f)).unwrap());
        assert_eq!(detect("Qwen-Qwen3-0.6B.jinja"), Some(ToolFormat::Hermes));
        assert_eq!(detect("Qwen-Qwen2.5-7B-Instruct.jinja"), Some(ToolFormat::Hermes));
        assert_eq!(detect("NousResearch-Hermes-3-Llama-3.1-8B-tool_use.jinja"), Some(ToolFormat::Hermes));
        assert_eq!(detect("meta-llama-Llama-3.1-8B-Instruct.jinja"), Some(ToolFormat::Llama3Json));
        assert_eq!(detect("mistralai-Mistral-Nemo-Instruct-2407.jinja"), Some(ToolFormat::Mistral));
        assert_eq!(detect("deepseek-ai-DeepSeek-V3.1.jinja"), Some(ToolFormat::DeepSeekV3));
        assert_eq!(detect("microsoft-Phi-3.5-mini-instruct.jinja"), None);
        assert_eq!(detect("openai-gpt-oss-120b.jinja"), Some(ToolFormat::Harmony));
        assert_eq!(ToolFormat::named("openai").unwrap(), Some(ToolFormat::Harmony));
        assert!(ToolFormat::named("pythonic").is_err());
    }

    /// Answers mixing text, calls, broken blocks, markers cut short, whitespace and multi-byte
    /// characters.
    fn answer() -> impl Strategy<Value = String> {
        let piece = prop_oneof![
            Just(
                "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Lima\"}}\n</tool_call>"
                    .to_string()
            ),
            Just("<tool_call>{\"name\": \"x\", \"arguments\": {}}</tool_call>".to_string()),
            Just("<tool_call>broken</tool_call>".to_string()),
            Just("<tool_call>".to_string()),
            Just("[TOOL_CALLS]".to_string()),
            Just("a[ARGS]{}".to_string()),
            Just("[{\"name\": \"x\", \"arguments\": {}}]".to_string()),
            Just("<｜tool▁calls▁begin｜>".to_string()),
            Just("<｜tool▁call▁begin｜>x<｜tool▁sep｜>{}<｜tool▁call▁end｜>".to_string()),
            Just("<｜tool▁calls▁end｜>".to_string()),
            Just("<tool_".to_string()),
            Just("</tool_call>".to_string()),
            Just("{\"name\": \"f\", \"parameters\": {\"k\": \"é\"}}".to_string()),
            Just("; ".to_string()),
            Just("<|python_tag|>".to_string()),
            Just("Héllo wörld".to_string()),
            Just("Done.".to_string()),
            Just(" \n ".to_string()),
            Just("\n\n".to_string()),
        ];
        prop::collection::vec(piece, 0..8).prop_map(|p| p.concat())
    }

    proptest! {
        /// However the text is cut into pieces, the parser gives what it gives for the whole.
        #[test]
        fn streaming_in_any_pieces_equals_parsing_the_whole(
            text in answer(),
            cuts in prop::collection::vec(0usize..400, 0..12),
        ) {
            for format in [ToolFormat::Hermes, ToolFormat::Llama3Json, ToolFormat::Mistral, ToolFormat::DeepSeekV3] {
                prop_assert_eq!(streamed(format, &text, &cuts), whole(format, &text));
            }
        }

        /// With no call, the content is the text exactly.
        #[test]
        fn an_answer_without_calls_is_its_text(text in answer()) {
            for format in [ToolFormat::Hermes, ToolFormat::Llama3Json, ToolFormat::Mistral, ToolFormat::DeepSeekV3] {
                let got = whole(format, &text);
                if got.calls.is_empty() {
                    prop_assert_eq!(got.content, text.clone());
                }
            }
        }
    }
}
