//! The OpenAI request bodies the server accepts, their checks, and the response objects.

use serde::Deserialize;
use serde_json::{json, Value};

use super::error::ApiError;
use super::structured::StructuredFields;
use super::tool_calls::Forced;
use crate::engine::LogitAdjustments;
use crate::model::chat_template::{ChatMessage, FunctionCallMessage, ToolCallMessage};

/// Most stop strings a request may give (OpenAI's limit).
pub const MAX_STOPS: usize = 4;
/// Longest stop string, in bytes: every generated token is matched against each one on the
/// engine's thread, so one request's stop strings must not stall everybody's decoding.
pub const MAX_STOP_BYTES: usize = 1024;

/// `POST /v1/chat/completions`. Fields the server does not know are ignored, as OpenAI-compatible
/// servers do; the ones whose meaning it cannot honour ([`Unsupported`]) are refused.
#[derive(Debug, Deserialize)]
pub struct ChatRequest {
    /// The model id.
    pub model: String,
    /// The conversation.
    pub messages: Vec<Message>,
    /// More chat template variables (vLLM's extension), such as Qwen3's `enable_thinking`.
    #[serde(default)]
    pub chat_template_kwargs: Option<serde_json::Map<String, Value>>,
    /// Functions the model may call (`{"type": "function", "function": {name, description,
    /// parameters}}`), handed to the chat template with their key order.
    #[serde(default)]
    pub tools: Option<Vec<minijinja::Value>>,
    /// `none`, `auto`, `required` (at least one call) or `{"type": "function", "function":
    /// {"name": N}}` (a call to N); the last two are forced by a grammar.
    #[serde(default)]
    pub tool_choice: Option<Value>,
    /// `{"type": "text"}`, `{"type": "json_object"}` or `{"type": "json_schema", "json_schema":
    /// {"schema": S}}`: the answer is forced to JSON (matching S) by a grammar.
    #[serde(default)]
    pub response_format: Option<Value>,
    /// `false`: at most one call per answer.
    #[serde(default)]
    pub parallel_tool_calls: Option<Value>,
    /// Not a chat field: refused unless false.
    #[serde(default)]
    echo: Option<Value>,
    /// Sampling and stopping fields shared with completions.
    #[serde(flatten)]
    pub common: CommonFields,
}

/// `POST /v1/completions`.
#[derive(Debug, Deserialize)]
pub struct CompletionRequest {
    /// The model id.
    pub model: String,
    /// The prompt.
    pub prompt: Prompt,
    /// Put the prompt before the completion (with `logprobs`, the prompt tokens' too).
    #[serde(default)]
    echo: Option<Value>,
    /// Chat fields, refused here rather than ignored.
    #[serde(default)]
    response_format: Option<Value>,
    #[serde(default)]
    tools: Option<Value>,
    #[serde(default)]
    tool_choice: Option<Value>,
    /// Sampling and stopping fields shared with chat.
    #[serde(flatten)]
    pub common: CommonFields,
}

/// `echo`: true, false or null (false).
fn echo_flag(v: &Option<Value>) -> Result<bool, ApiError> {
    match v {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(other) => Err(ApiError::bad_request(format!("`echo` must be true or false, got {other}"), Some("echo"))),
    }
}

impl CompletionRequest {
    /// Whether the answer starts with the prompt.
    pub fn echo(&self) -> Result<bool, ApiError> {
        echo_flag(&self.echo)
    }

    /// Refuses the chat fields `response_format`, `tools` and `tool_choice` (a completion
    /// would run without them).
    pub fn check_chat_fields(&self) -> Result<(), ApiError> {
        let fields =
            [("response_format", &self.response_format), ("tools", &self.tools), ("tool_choice", &self.tool_choice)];
        let no_op = |v: &Value| v.is_null() || v == &json!({"type": "text"}) || v == &json!([]) || v == &json!("none");
        for (name, value) in fields {
            if value.as_ref().is_some_and(|v| !no_op(v)) {
                let msg = format!("`{name}` is a chat field: send it to /v1/chat/completions");
                return Err(ApiError::bad_request(msg, Some(name)));
            }
        }
        Ok(())
    }
}

impl ChatRequest {
    /// Refuses `echo: true`, which only completions take.
    pub fn check_echo(&self) -> Result<(), ApiError> {
        if echo_flag(&self.echo)? {
            return Err(ApiError::bad_request("`echo` is a completions field; chat does not take it", Some("echo")));
        }
        Ok(())
    }
}

/// A chat message; `content` is a string or a list of text parts (absent or null only in an
/// assistant turn that calls tools).
#[derive(Debug, Deserialize)]
pub struct Message {
    /// `system`, `user`, `assistant`, `tool`.
    pub role: String,
    /// The text.
    #[serde(default)]
    pub content: Option<Content>,
    /// An assistant turn's tool calls.
    #[serde(default)]
    pub tool_calls: Option<Vec<ToolCallIn>>,
    /// A tool result's call id.
    #[serde(default)]
    pub tool_call_id: Option<String>,
    /// The author's name.
    #[serde(default)]
    pub name: Option<String>,
    /// An assistant turn's reasoning as this server (or vLLM, as `reasoning`) returned it.
    #[serde(default, alias = "reasoning")]
    pub reasoning_content: Option<String>,
}

/// A tool call of an earlier assistant turn.
#[derive(Debug, Deserialize)]
pub struct ToolCallIn {
    /// The call id.
    #[serde(default)]
    pub id: Option<String>,
    /// Must be `function` when given.
    #[serde(default, rename = "type")]
    pub kind: Option<String>,
    /// The function called.
    pub function: FunctionCallIn,
}

/// The function of a [`ToolCallIn`].
#[derive(Debug, Deserialize)]
pub struct FunctionCallIn {
    /// Its name.
    pub name: String,
    /// Its arguments: OpenAI's JSON text of an object (an object is taken too).
    #[serde(default)]
    pub arguments: Option<minijinja::Value>,
}

/// What a chat request asks of tools.
#[derive(Debug, Clone, Default)]
pub struct ToolRequest {
    /// The tools to show the model (empty: none).
    pub tools: Vec<minijinja::Value>,
    /// Their function names.
    pub names: Vec<String>,
    /// Read calls from the answer (`tool_choice: auto`).
    pub parse: bool,
    /// Calls kept per answer at most.
    pub max_calls: usize,
    /// `tool_choice` `required` or named: the answer's form, and the JSON Schema forcing it.
    pub forced: Option<(Forced, Value)>,
}

/// Message content.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Content {
    /// Plain text.
    Text(String),
    /// Parts; only `{"type": "text", "text": ...}` parts are accepted.
    Parts(Vec<ContentPart>),
}

/// One part of a message's content.
#[derive(Debug, Deserialize)]
pub struct ContentPart {
    /// Must be `text`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The text.
    #[serde(default)]
    pub text: Option<String>,
}

/// A completion prompt: text, or token ids used as given.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Prompt {
    /// Text, tokenized with the special tokens the tokenizer adds.
    Text(String),
    /// Token ids.
    Ids(Vec<u32>),
    /// A list of texts; exactly one is accepted.
    Texts(Vec<String>),
    /// A list of token-id prompts (lm-eval's batches); exactly one is accepted.
    IdLists(Vec<Vec<u32>>),
}

/// `stop`: one string or a list.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    /// One stop string.
    One(String),
    /// Several.
    Many(Vec<String>),
}

/// `stream_options`.
#[derive(Debug, Default, Deserialize)]
pub struct StreamOptions {
    /// Send a last chunk with `usage`.
    #[serde(default)]
    pub include_usage: bool,
}

/// Fields chat and completions share.
#[derive(Debug, Deserialize)]
pub struct CommonFields {
    /// Tokens to generate at most.
    #[serde(default)]
    pub max_tokens: Option<i64>,
    /// The newer name of `max_tokens`.
    #[serde(default)]
    pub max_completion_tokens: Option<i64>,
    /// 0 = greedy, at most 2.
    #[serde(default)]
    pub temperature: Option<f64>,
    /// Nucleus mass in (0, 1].
    #[serde(default)]
    pub top_p: Option<f64>,
    /// Sampler seed.
    #[serde(default)]
    pub seed: Option<u64>,
    /// Stop strings.
    #[serde(default)]
    pub stop: Option<Stop>,
    /// Stream Server-Sent Events.
    #[serde(default)]
    pub stream: Option<bool>,
    /// Streaming options.
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    /// Completions to return (1 to [`MAX_CHOICES`]), each its own sequence; the copies share
    /// one prompt pass.
    #[serde(default)]
    pub n: Option<i64>,
    /// The cache policy for this request (a name from `/v1/cache_policies`).
    #[serde(default)]
    pub cache_policy: Option<String>,
    /// Keep generating past the end-of-sequence token (vLLM's extension; for benchmarks).
    #[serde(default)]
    pub ignore_eos: Option<bool>,
    /// Chat: report each token's log-probability (`true`); completions: also that many most
    /// likely tokens (0 to 5).
    #[serde(default)]
    pub logprobs: Option<Value>,
    /// Chat: most likely tokens to report beside each token (0 to 20; needs `logprobs`).
    #[serde(default)]
    pub top_logprobs: Option<Value>,
    /// Added to the logits of the token ids it maps (-100 to 100).
    #[serde(default)]
    pub logit_bias: Option<Value>,
    /// Taken from the logit of every token already generated (-2 to 2).
    #[serde(default)]
    pub presence_penalty: Option<Value>,
    /// Taken from a token's logit once per time it was generated (-2 to 2).
    #[serde(default)]
    pub frequency_penalty: Option<Value>,
    /// vLLM's: sample among the `top_k` most likely tokens (-1 or 0: all).
    #[serde(default)]
    pub top_k: Option<Value>,
    /// vLLM's: sample among the tokens at least `min_p` times as likely as the most likely one
    /// (0 to 1).
    #[serde(default)]
    pub min_p: Option<Value>,
    /// vLLM's and transformers': divides the positive logits and multiplies the negative ones of
    /// every token of the prompt or the output (above 0; 1: none).
    #[serde(default)]
    pub repetition_penalty: Option<Value>,
    /// vLLM's: tokens generated before an end-of-sequence token, a `stop_token_ids` token or a
    /// stop string may end the answer (0 to `max_tokens`).
    #[serde(default)]
    pub min_tokens: Option<Value>,
    /// vLLM's: token ids that end the answer besides the model's end-of-sequence tokens.
    #[serde(default)]
    pub stop_token_ids: Option<Value>,
    /// vLLM's structured outputs (`guided_*`, `structured_outputs`).
    #[serde(flatten)]
    pub structured: StructuredFields,
    /// OpenAI fields this server cannot honour.
    #[serde(flatten)]
    pub unsupported: Unsupported,
}

/// OpenAI fields, and vLLM's sampling extensions, that this server cannot honour. A request that
/// sets one to anything but its no-op value is refused (400 naming the field), not answered as if
/// the field were absent.
#[derive(Debug, Default, Deserialize)]
pub struct Unsupported {
    #[serde(default)]
    best_of: Option<Value>,
    #[serde(default)]
    suffix: Option<Value>,
    #[serde(default)]
    functions: Option<Value>,
    #[serde(default)]
    function_call: Option<Value>,
    #[serde(default)]
    use_beam_search: Option<Value>,
    #[serde(default)]
    length_penalty: Option<Value>,
    #[serde(default)]
    include_stop_str_in_output: Option<Value>,
    #[serde(default)]
    skip_special_tokens: Option<Value>,
    #[serde(default)]
    spaces_between_special_tokens: Option<Value>,
    #[serde(default)]
    prompt_logprobs: Option<Value>,
    #[serde(default)]
    truncate_prompt_tokens: Option<Value>,
    #[serde(default)]
    allowed_token_ids: Option<Value>,
    #[serde(default)]
    bad_words: Option<Value>,
    #[serde(default)]
    guided_whitespace_pattern: Option<Value>,
    #[serde(default)]
    guided_decoding_backend: Option<Value>,
    #[serde(default)]
    continue_final_message: Option<Value>,
    #[serde(default)]
    add_generation_prompt: Option<Value>,
}

impl Unsupported {
    /// An error naming the first field set to something other than its no-op value.
    fn check(&self) -> Result<(), ApiError> {
        let empty = |v: &Value| match v {
            Value::String(s) => s.is_empty(),
            Value::Array(a) => a.is_empty(),
            Value::Object(o) => o.is_empty(),
            _ => false,
        };
        let never = |_: &Value| false;
        type NoOp = fn(&Value) -> bool;
        // The grammars are llguidance's, vLLM's `guidance` backend.
        let backend = |v: &Value| ["auto", "guidance"].iter().any(|b| v == *b);
        let fields: [(&str, &Option<Value>, NoOp, &str); 17] = [
            ("best_of", &self.best_of, |v| v.as_f64() == Some(1.0), "1"),
            ("suffix", &self.suffix, empty, "\"\""),
            ("functions", &self.functions, empty, "[] (use `tools`)"),
            ("function_call", &self.function_call, |v| v == "none", "\"none\" (use `tool_choice`)"),
            ("use_beam_search", &self.use_beam_search, |v| v == false, "false"),
            ("length_penalty", &self.length_penalty, |v| v.as_f64() == Some(1.0), "1"),
            ("include_stop_str_in_output", &self.include_stop_str_in_output, |v| v == false, "false"),
            ("skip_special_tokens", &self.skip_special_tokens, |v| v == true, "true"),
            ("spaces_between_special_tokens", &self.spaces_between_special_tokens, |v| v == true, "true"),
            ("prompt_logprobs", &self.prompt_logprobs, never, "null (use `echo` with `logprobs`)"),
            ("truncate_prompt_tokens", &self.truncate_prompt_tokens, never, "null"),
            ("allowed_token_ids", &self.allowed_token_ids, never, "null (use `logit_bias`)"),
            ("bad_words", &self.bad_words, empty, "[]"),
            ("guided_whitespace_pattern", &self.guided_whitespace_pattern, never, "null"),
            ("guided_decoding_backend", &self.guided_decoding_backend, backend, "\"auto\" or \"guidance\""),
            ("continue_final_message", &self.continue_final_message, |v| v == false, "false"),
            ("add_generation_prompt", &self.add_generation_prompt, |v| v == true, "true"),
        ];
        for (name, value, no_op, no_op_text) in fields {
            match value {
                Some(v) if !v.is_null() && !no_op(v) => {
                    return Err(ApiError::bad_request(
                        format!(
                        "`{name}` is not supported by this server (got {v}); leave it out or set it to {no_op_text}"
                    ),
                        Some(name),
                    ))
                }
                _ => {}
            }
        }
        Ok(())
    }
}

/// The checked sampling request.
#[derive(Debug, Clone, PartialEq)]
pub struct Sampling {
    /// Tokens to generate at most.
    pub max_tokens: usize,
    /// 0 = greedy.
    pub temperature: f64,
    /// Nucleus mass.
    pub top_p: f64,
    /// Seed, if the request gave one.
    pub seed: Option<u64>,
    /// Stop strings.
    pub stops: Vec<String>,
    /// Stream the answer.
    pub stream: bool,
    /// In streaming, end with a usage chunk.
    pub include_usage: bool,
    /// Choices to return.
    pub n: usize,
    /// Stop at the end-of-sequence token.
    pub stop_at_eos: bool,
    /// Top-k (0: off).
    pub top_k: usize,
    /// Min-p (0: off).
    pub min_p: f64,
    /// Tokens before anything may end the answer.
    pub min_tokens: usize,
    /// Token ids that end the answer.
    pub stop_token_ids: Vec<u32>,
}

/// Most alternatives a chat request may ask for per token (OpenAI's limit).
pub const MAX_TOP_LOGPROBS_CHAT: u64 = 20;
/// Most alternatives a completion may ask for per token (OpenAI's limit).
pub const MAX_TOP_LOGPROBS_COMPLETION: u64 = 5;
/// Most choices one request may ask for (`n`): each is a sequence of its own.
pub const MAX_CHOICES: usize = 16;

impl CommonFields {
    /// The log-probabilities asked for: `None`, or how many most likely tokens to report beside
    /// each generated one. Chat takes `logprobs: true` and `top_logprobs: N`; completions take
    /// `logprobs: N`.
    pub fn logprobs(&self, chat: bool) -> Result<Option<usize>, ApiError> {
        let bad = |field: &'static str, msg: String| ApiError::bad_request(msg, Some(field));
        let count = |field: &'static str, v: &Value, max: u64| match v.as_u64() {
            Some(n) if n <= max => Ok(n as usize),
            _ => Err(bad(field, format!("`{field}` must be an integer from 0 to {max}, got {v}"))),
        };
        let logprobs = self.logprobs.as_ref().filter(|v| !v.is_null());
        let top = self.top_logprobs.as_ref().filter(|v| !v.is_null());
        let asked = if chat {
            let on = match logprobs {
                None => false,
                Some(Value::Bool(b)) => *b,
                Some(v) => {
                    let msg = format!("`logprobs` must be true or false in a chat request, got {v}");
                    return Err(bad("logprobs", msg));
                }
            };
            let top = top.map(|v| count("top_logprobs", v, MAX_TOP_LOGPROBS_CHAT)).transpose()?;
            match (on, top) {
                (false, Some(n)) if n > 0 => {
                    return Err(bad("top_logprobs", "`top_logprobs` needs `logprobs: true`".into()));
                }
                (false, _) => None,
                (true, n) => Some(n.unwrap_or(0)),
            }
        } else {
            if let Some(v) = top {
                let msg = format!("`top_logprobs` is a chat field (got {v}); completions take `logprobs: N`");
                return Err(bad("top_logprobs", msg));
            }
            logprobs.map(|v| count("logprobs", v, MAX_TOP_LOGPROBS_COMPLETION)).transpose()?
        };
        Ok(asked)
    }

    /// The logit biases and penalties asked for (`None` when none changes anything), checked
    /// against OpenAI's ranges and a vocabulary of `vocab` tokens.
    pub fn adjustments(&self, vocab: usize) -> Result<Option<LogitAdjustments>, ApiError> {
        let number = |field: &'static str, v: &Option<Value>, limit: f64| -> Result<f32, ApiError> {
            match v {
                None | Some(Value::Null) => Ok(0.0),
                Some(x) => match x.as_f64() {
                    Some(f) if (-limit..=limit).contains(&f) => Ok(f as f32),
                    _ => Err(ApiError::bad_request(
                        format!("`{field}` must be a number from -{limit} to {limit}, got {x}"),
                        Some(field),
                    )),
                },
            }
        };
        let presence_penalty = number("presence_penalty", &self.presence_penalty, 2.0)?;
        let frequency_penalty = number("frequency_penalty", &self.frequency_penalty, 2.0)?;
        let bad = |msg: String| ApiError::bad_request(msg, Some("logit_bias"));
        let bias = match &self.logit_bias {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Object(map)) => {
                map.iter()
                    .map(|(k, v)| {
                        let id =
                            k.parse::<u32>().ok().filter(|&id| (id as usize) < vocab).ok_or_else(|| {
                                bad(format!("`logit_bias` key `{k}` is not a token id below {vocab}"))
                            })?;
                        let b = number("logit_bias", &Some(v.clone()), 100.0)?;
                        Ok((id, b))
                    })
                    .collect::<Result<Vec<_>, ApiError>>()?
            }
            Some(other) => return Err(bad(format!("`logit_bias` must map token ids to numbers, got {other}"))),
        };
        let repetition_penalty = match &self.repetition_penalty {
            None | Some(Value::Null) => 1.0,
            Some(x) => match x.as_f64() {
                Some(f) if f > 0.0 && f.is_finite() => f as f32,
                _ => {
                    return Err(ApiError::bad_request(
                        format!("`repetition_penalty` must be a number above 0 (1: none), got {x}"),
                        Some("repetition_penalty"),
                    ))
                }
            },
        };
        let a = LogitAdjustments { bias, repetition_penalty, presence_penalty, frequency_penalty };
        Ok((a != LogitAdjustments::default()).then_some(a))
    }

    /// Checks every field; `default_max_tokens` applies when the request gives no limit, and no
    /// request may ask for more than `cap`. A limit of 0 is taken when `echo` (a prompt only
    /// scored). Token ids must lie below `vocab`.
    pub fn sampling(
        &self,
        default_max_tokens: usize,
        cap: usize,
        echo: bool,
        vocab: usize,
    ) -> Result<Sampling, ApiError> {
        let (limit, field) = match (self.max_completion_tokens, self.max_tokens) {
            (Some(v), _) => (Some(v), "max_completion_tokens"),
            (None, v) => (v, "max_tokens"),
        };
        let max_tokens = match limit {
            None => default_max_tokens.min(cap),
            Some(0) if echo => 0,
            Some(v) if v < 1 => {
                let msg = format!("`{field}` must be at least 1 (0 only with `echo`), got {v}");
                return Err(ApiError::bad_request(msg, Some(field)));
            }
            Some(v) if v as u64 > cap as u64 => {
                return Err(ApiError::bad_request(
                    format!("`{field}` is {v}, above this server's limit of {cap}"),
                    Some(field),
                ))
            }
            Some(v) => v as usize,
        };
        let temperature = self.temperature.unwrap_or(0.0);
        if !(temperature.is_finite() && (0.0..=2.0).contains(&temperature)) {
            return Err(ApiError::bad_request(
                format!("`temperature` must be in [0, 2], got {temperature}"),
                Some("temperature"),
            ));
        }
        let top_p = self.top_p.unwrap_or(1.0);
        if !(top_p > 0.0 && top_p <= 1.0) {
            return Err(ApiError::bad_request(format!("`top_p` must be in (0, 1], got {top_p}"), Some("top_p")));
        }
        let n = match self.n {
            None => 1,
            Some(n) if (1..=MAX_CHOICES as i64).contains(&n) => n as usize,
            Some(n) => {
                return Err(ApiError::bad_request(format!("`n` must be from 1 to {MAX_CHOICES}, got {n}"), Some("n")))
            }
        };
        let stops = match &self.stop {
            None => Vec::new(),
            Some(Stop::One(s)) => vec![s.clone()],
            Some(Stop::Many(v)) => v.clone(),
        };
        if stops.len() > MAX_STOPS {
            return Err(ApiError::bad_request(
                format!("`stop` has {} strings; at most {MAX_STOPS}", stops.len()),
                Some("stop"),
            ));
        }
        if let Some(s) = stops.iter().find(|s| s.is_empty() || s.len() > MAX_STOP_BYTES) {
            return Err(ApiError::bad_request(
                format!("a `stop` string has {} bytes; each must have 1 to {MAX_STOP_BYTES}", s.len()),
                Some("stop"),
            ));
        }
        self.unsupported.check()?;
        let bad = |field: &'static str, msg: String| ApiError::bad_request(msg, Some(field));
        let present = |v: &Option<Value>| v.clone().filter(|v| !v.is_null());
        let top_k = match present(&self.top_k) {
            None => 0,
            Some(v) => match v.as_i64() {
                Some(-1 | 0) => 0,
                Some(k) if k > 0 => usize::try_from(k).unwrap_or(usize::MAX),
                _ => {
                    return Err(bad(
                        "top_k",
                        format!("`top_k` must be -1 or 0 (all tokens) or a positive integer, got {v}"),
                    ))
                }
            },
        };
        let min_p = match present(&self.min_p) {
            None => 0.0,
            Some(v) => match v.as_f64() {
                Some(p) if (0.0..=1.0).contains(&p) => p,
                _ => return Err(bad("min_p", format!("`min_p` must be a number from 0 to 1, got {v}"))),
            },
        };
        let min_tokens = match present(&self.min_tokens) {
            None => 0,
            Some(v) => match v.as_u64() {
                Some(m) if m as usize <= max_tokens => m as usize,
                _ => {
                    let msg = format!("`min_tokens` must be an integer from 0 to max_tokens ({max_tokens}), got {v}");
                    return Err(bad("min_tokens", msg));
                }
            },
        };
        let stop_token_ids = match present(&self.stop_token_ids) {
            None => Vec::new(),
            Some(Value::Array(a)) => a
                .iter()
                .map(|v| {
                    v.as_u64().filter(|&t| (t as usize) < vocab).map(|t| t as u32).ok_or_else(|| {
                        bad("stop_token_ids", format!("`stop_token_ids` holds {v}, not a token id below {vocab}"))
                    })
                })
                .collect::<Result<Vec<u32>, ApiError>>()?,
            Some(v) => {
                return Err(bad("stop_token_ids", format!("`stop_token_ids` must be a list of token ids, got {v}")))
            }
        };
        let stream = self.stream.unwrap_or(false);
        let include_usage = self.stream_options.as_ref().is_some_and(|o| o.include_usage);
        let stop_at_eos = !self.ignore_eos.unwrap_or(false);
        Ok(Sampling {
            max_tokens,
            temperature,
            top_p,
            seed: self.seed,
            stops,
            stream,
            include_usage,
            stop_at_eos,
            n,
            top_k,
            min_p,
            min_tokens,
            stop_token_ids,
        })
    }
}

impl ChatRequest {
    /// The messages as the chat template takes them.
    pub fn chat_messages(&self) -> Result<Vec<ChatMessage>, ApiError> {
        if self.messages.is_empty() {
            return Err(ApiError::bad_request("`messages` is empty", Some("messages")));
        }
        self.messages.iter().enumerate().map(|(i, m)| m.to_chat(i)).collect()
    }

    /// The tools asked for, checked: what to show the model, and whether to read calls back.
    pub fn tool_request(&self) -> Result<ToolRequest, ApiError> {
        let bad = |field: &'static str, msg: String| ApiError::bad_request(msg, Some(field));
        let tools = self.tools.clone().unwrap_or_default();
        // `None` here: a named function.
        let choice = match self.tool_choice.as_ref().filter(|v| !v.is_null()) {
            None if tools.is_empty() => Some("none"),
            None => Some("auto"),
            Some(Value::String(s)) if ["none", "auto", "required"].contains(&s.as_str()) => Some(s.as_str()),
            Some(Value::Object(o))
                if o.get("type").and_then(Value::as_str) == Some("function")
                    && o.get("function").and_then(|f| f.get("name")).is_some_and(Value::is_string) =>
            {
                None
            }
            Some(v) => {
                let msg = format!(
                    "`tool_choice` must be \"none\", \"auto\", \"required\" or {{\"type\": \"function\", \"function\": \
                     {{\"name\": NAME}}}}, got {v}"
                );
                return Err(bad("tool_choice", msg));
            }
        };
        if tools.is_empty() && choice != Some("none") {
            return Err(bad("tool_choice", "`tool_choice` other than \"none\" needs `tools`".into()));
        }
        let mut names = Vec::new();
        let mut schemas = Vec::new();
        for (i, tool) in tools.iter().enumerate() {
            let v = serde_json::to_value(tool).unwrap_or(Value::Null);
            let tool_error = |msg: &str| bad("tools", format!("tools[{i}]: {msg}"));
            if v.get("type").and_then(Value::as_str) != Some("function") {
                return Err(tool_error("`type` must be \"function\""));
            }
            let Some(function) = v.get("function").filter(|f| f.is_object()) else {
                return Err(tool_error("`function` must be an object"));
            };
            let Some(name) = function.get("name").and_then(Value::as_str).filter(|n| !n.is_empty()) else {
                return Err(tool_error("`function.name` must be a non-empty string"));
            };
            if names.iter().any(|n| n == name) {
                return Err(tool_error(&format!("a second function named `{name}`")));
            }
            if function.get("parameters").is_some_and(|p| !p.is_object() && !p.is_null()) {
                return Err(tool_error("`function.parameters` must be a JSON Schema object"));
            }
            if function.get("description").is_some_and(|d| !d.is_string() && !d.is_null()) {
                return Err(tool_error("`function.description` must be a string"));
            }
            names.push(name.to_string());
            // A call's arguments are an object: a schema of another type is refused, one of none
            // gets `object` (so that a forced call's grammar writes one).
            let mut parameters = function.get("parameters").filter(|p| p.is_object()).cloned().unwrap_or(json!({}));
            match parameters.get("type") {
                None => parameters["type"] = json!("object"),
                Some(t) if t == "object" => {}
                Some(t) => return Err(tool_error(&format!("`function.parameters` must describe an object, not {t}"))),
            }
            schemas.push(parameters);
        }
        let parallel = match &self.parallel_tool_calls {
            None | Some(Value::Null) => true,
            Some(Value::Bool(b)) => *b,
            Some(v) => {
                return Err(bad("parallel_tool_calls", format!("`parallel_tool_calls` must be true or false, got {v}")))
            }
        };
        let forced = match choice {
            Some("required") => {
                // An array of calls, each naming one of the tools with its parameters. References
                // resolve from the root, so each tool's definitions move there (as vLLM does).
                let mut root = serde_json::Map::new();
                let mut calls = Vec::new();
                for (name, parameters) in names.iter().zip(&schemas) {
                    let mut parameters = parameters.clone();
                    for key in ["$defs", "definitions"] {
                        let Some(Value::Object(defs)) = parameters.as_object_mut().and_then(|p| p.remove(key)) else {
                            continue;
                        };
                        let hoisted = root.entry(key).or_insert_with(|| json!({}));
                        for (def, body) in defs {
                            match hoisted.get(&def) {
                                Some(other) if *other != body => {
                                    let msg = format!(
                                        "tools define `{key}/{def}` differently; `tool_choice: \"required\"` needs one"
                                    );
                                    return Err(bad("tools", msg));
                                }
                                _ => hoisted[def.as_str()] = body,
                            }
                        }
                    }
                    calls.push(
                        json!({"type": "object", "properties": {"name": {"const": name}, "parameters": parameters},
                        "required": ["name", "parameters"], "additionalProperties": false}),
                    );
                }
                let mut schema = json!({"type": "array", "minItems": 1, "items": {"anyOf": calls}});
                if !parallel {
                    schema["maxItems"] = json!(1);
                }
                schema.as_object_mut().expect("an object").extend(root);
                Some((Forced::List, schema))
            }
            None => {
                let name = self.tool_choice.as_ref().and_then(|c| c["function"]["name"].as_str()).unwrap_or_default();
                let Some(i) = names.iter().position(|n| n == name) else {
                    let msg =
                        format!("`tool_choice` names `{name}`, which is not among `tools` ({})", names.join(", "));
                    return Err(bad("tool_choice", msg));
                };
                Some((Forced::Named(name.to_string()), schemas[i].clone()))
            }
            _ => None,
        };
        let show = choice != Some("none");
        Ok(ToolRequest {
            tools: if show { tools } else { Vec::new() },
            names,
            parse: choice == Some("auto"),
            max_calls: if parallel { usize::MAX } else { 1 },
            forced,
        })
    }
}

impl ChatRequest {
    /// The JSON Schema `response_format` forces the answer to, if any.
    pub fn response_schema(&self) -> Result<Option<Value>, ApiError> {
        let bad = |msg: String| ApiError::bad_request(msg, Some("response_format"));
        let Some(format) = self.response_format.as_ref().filter(|v| !v.is_null()) else { return Ok(None) };
        match format.get("type").and_then(Value::as_str) {
            Some("text") => Ok(None),
            Some("json_object") => Ok(Some(json!({"type": "object"}))),
            Some("json_schema") => match format.get("json_schema").and_then(|j| j.get("schema")) {
                Some(schema) if schema.is_object() || schema.is_boolean() => Ok(Some(schema.clone())),
                _ => Err(bad(format!("`response_format.json_schema.schema` must be a JSON Schema, got {format}"))),
            },
            _ => Err(bad(format!(
                "`response_format.type` must be \"text\", \"json_object\" or \"json_schema\", got {format}"
            ))),
        }
    }
}

impl Message {
    /// The message as templates read it; `i` is its index, for errors.
    fn to_chat(&self, i: usize) -> Result<ChatMessage, ApiError> {
        let bad = |msg: String| ApiError::bad_request(format!("messages[{i}]: {msg}"), Some("messages"));
        // An empty list is no calls.
        let calls = self.tool_calls.as_deref().unwrap_or_default();
        let content = match &self.content {
            Some(Content::Text(t)) => t.clone(),
            Some(Content::Parts(parts)) => parts
                .iter()
                .map(|p| match (p.kind.as_str(), &p.text) {
                    ("text", Some(t)) => Ok(t.as_str()),
                    (kind, _) => Err(bad(format!("content part of type `{kind}` is not supported (text only)"))),
                })
                .collect::<Result<Vec<_>, _>>()?
                .concat(),
            None if self.role == "assistant" && !calls.is_empty() => String::new(),
            None => {
                return Err(bad("`content` is missing (only an assistant turn with `tool_calls` may omit it)".into()))
            }
        };
        if !calls.is_empty() && self.role != "assistant" {
            return Err(bad(format!("a `{}` message cannot have `tool_calls` (assistant turns only)", self.role)));
        }
        let tool_calls = match &self.tool_calls {
            None => None,
            Some(calls) if calls.is_empty() => None,
            Some(calls) => Some(
                calls
                    .iter()
                    .enumerate()
                    .map(|(j, c)| c.to_chat().map_err(|e| bad(format!("tool_calls[{j}]: {e}"))))
                    .collect::<Result<Vec<_>, _>>()?,
            ),
        };
        Ok(ChatMessage {
            role: self.role.clone(),
            content,
            tool_calls,
            tool_call_id: self.tool_call_id.clone(),
            name: self.name.clone(),
            reasoning_content: self.reasoning_content.clone(),
        })
    }
}

impl ToolCallIn {
    /// The call as templates read it: `arguments` parsed into an object, as vLLM hands it over.
    fn to_chat(&self) -> Result<ToolCallMessage, String> {
        if let Some(kind) = self.kind.as_deref().filter(|k| *k != "function") {
            return Err(format!("`type` must be \"function\", got {kind:?}"));
        }
        let empty = || minijinja::Value::from_iter(std::iter::empty::<(String, minijinja::Value)>());
        let arguments = match &self.function.arguments {
            None => empty(),
            Some(v) if v.as_str() == Some("") => empty(),
            Some(v) => match v.as_str() {
                Some(text) => serde_json::from_str::<minijinja::Value>(text)
                    .map_err(|e| format!("`function.arguments` is not JSON: {e}"))?,
                None => v.clone(),
            },
        };
        if arguments.kind() != minijinja::value::ValueKind::Map {
            return Err(format!("`function.arguments` must be a JSON object, got {arguments}"));
        }
        let function = FunctionCallMessage { name: self.function.name.clone(), arguments };
        Ok(ToolCallMessage { id: self.id.clone(), kind: "function".into(), function })
    }
}

/// Parses a body as `T`, answering 400 with serde's message (which names the field) otherwise.
pub fn parse_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| {
        let kind = if e.is_syntax() || e.is_eof() {
            "the body is not valid JSON"
        } else {
            "the body does not match the request schema"
        };
        ApiError::bad_request(format!("{kind}: {e}"), None)
    })
}

/// What every answer reports of the cache: the policy, tokens seen over slots held at the end,
/// and the most bytes of K/V live at once.
#[derive(Debug, Clone, PartialEq)]
pub struct KvReport {
    /// The policy's name.
    pub policy: String,
    /// Compression ratio at the end.
    pub compression_ratio: f64,
    /// Peak bytes live.
    pub bytes_live_peak: u64,
}

impl KvReport {
    /// The `kv_cache` object.
    pub fn json(&self) -> Value {
        json!({"policy": self.policy, "compression_ratio": self.compression_ratio, "bytes_live_peak": self.bytes_live_peak})
    }
}

/// The `usage` object: `cached` of the `prompt` tokens came from the prefix cache.
pub fn usage_json(prompt: usize, completion: usize, cached: usize) -> Value {
    json!({
        "prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn common(json: &str) -> CommonFields {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn max_completion_tokens_wins_and_every_bad_value_names_its_field() {
        assert_eq!(
            common(r#"{"max_tokens": 5, "max_completion_tokens": 7}"#)
                .sampling(16, 100, false, 512)
                .unwrap()
                .max_tokens,
            7
        );
        assert_eq!(common("{}").sampling(16, 10, false, 512).unwrap().max_tokens, 10, "the default is capped too");
        for (body, field) in [
            (r#"{"max_tokens": -1}"#, "max_tokens"),
            (r#"{"max_tokens": 0}"#, "max_tokens"),
            (r#"{"max_completion_tokens": 101}"#, "max_completion_tokens"),
            (r#"{"temperature": 2.5}"#, "temperature"),
            (r#"{"temperature": -0.1}"#, "temperature"),
            (r#"{"top_p": 0}"#, "top_p"),
            (r#"{"n": 0}"#, "n"),
            (r#"{"n": 17}"#, "n"),
            (r#"{"stop": ["a", "b", "c", "d", "e"]}"#, "stop"),
            (r#"{"stop": ""}"#, "stop"),
            (r#"{"best_of": 3}"#, "best_of"),
            (r#"{"use_beam_search": true}"#, "use_beam_search"),
            (r#"{"skip_special_tokens": false}"#, "skip_special_tokens"),
            (r#"{"allowed_token_ids": [1, 2]}"#, "allowed_token_ids"),
            (r#"{"guided_decoding_backend": "xgrammar"}"#, "guided_decoding_backend"),
            (r#"{"guided_whitespace_pattern": " "}"#, "guided_whitespace_pattern"),
            (r#"{"continue_final_message": true}"#, "continue_final_message"),
            (r#"{"suffix": "}"}"#, "suffix"),
            (r#"{"functions": [{"name": "f"}]}"#, "functions"),
            (r#"{"function_call": "auto"}"#, "function_call"),
        ] {
            let e = common(body).sampling(16, 100, false, 512).unwrap_err();
            assert_eq!(e.status.as_u16(), 400, "{body}");
            assert_eq!(e.param.as_deref(), Some(field), "{body}");
        }
    }

    #[test]
    fn echo_is_a_completions_flag_and_lets_max_tokens_be_zero() {
        let completion = |json: &str| serde_json::from_str::<CompletionRequest>(json).unwrap();
        let chat = |json: &str| serde_json::from_str::<ChatRequest>(json).unwrap();
        let prompt = r#""model": "m", "prompt": "hi""#;
        for (body, want) in
            [("", false), (r#", "echo": null"#, false), (r#", "echo": false"#, false), (r#", "echo": true"#, true)]
        {
            assert_eq!(completion(&format!("{{{prompt}{body}}}")).echo().unwrap(), want, "{body}");
        }
        let e = completion(&format!(r#"{{{prompt}, "echo": 1}}"#)).echo().unwrap_err();
        assert_eq!(e.param.as_deref(), Some("echo"));
        let messages = r#""model": "m", "messages": []"#;
        assert!(chat(&format!(r#"{{{messages}, "echo": false}}"#)).check_echo().is_ok());
        let e = chat(&format!(r#"{{{messages}, "echo": true}}"#)).check_echo().unwrap_err();
        assert_eq!(e.param.as_deref(), Some("echo"));
        assert_eq!(common(r#"{"max_tokens": 0}"#).sampling(16, 100, true, 512).unwrap().max_tokens, 0);
        assert_eq!(
            common(r#"{"max_tokens": -1}"#).sampling(16, 100, true, 512).unwrap_err().param.as_deref(),
            Some("max_tokens")
        );
    }

    #[test]
    fn logprobs_take_openais_forms_for_chat_and_completions_and_every_bad_value_names_its_field() {
        for (body, chat, want) in [
            ("{}", true, None),
            (r#"{"logprobs": false, "top_logprobs": 0}"#, true, None),
            (r#"{"logprobs": true}"#, true, Some(0)),
            (r#"{"logprobs": true, "top_logprobs": 20}"#, true, Some(20)),
            ("{}", false, None),
            (r#"{"logprobs": null}"#, false, None),
            (r#"{"logprobs": 0}"#, false, Some(0)),
            (r#"{"logprobs": 5}"#, false, Some(5)),
            (r#"{"logprobs": 2, "stream": true}"#, false, Some(2)),
        ] {
            assert_eq!(common(body).logprobs(chat).unwrap(), want, "{body}, chat {chat}");
        }
        for (body, chat, field) in [
            (r#"{"logprobs": 1}"#, true, "logprobs"),
            (r#"{"logprobs": true, "top_logprobs": 21}"#, true, "top_logprobs"),
            (r#"{"logprobs": true, "top_logprobs": -1}"#, true, "top_logprobs"),
            (r#"{"top_logprobs": 2}"#, true, "top_logprobs"),
            (r#"{"logprobs": true}"#, false, "logprobs"),
            (r#"{"logprobs": 6}"#, false, "logprobs"),
            (r#"{"logprobs": 2, "top_logprobs": 2}"#, false, "top_logprobs"),
        ] {
            let e = common(body).logprobs(chat).unwrap_err();
            assert_eq!((e.status.as_u16(), e.param.as_deref()), (400, Some(field)), "{body}, chat {chat}");
        }
    }

    #[test]
    fn logit_bias_and_penalties_are_checked_against_openais_ranges() {
        let a = common(r#"{"logit_bias": {"5": -100, "7": 2.5}, "presence_penalty": 0.5, "frequency_penalty": -2}"#)
            .adjustments(10)
            .unwrap()
            .unwrap();
        let mut bias = a.bias.clone();
        bias.sort_by_key(|b| b.0);
        assert_eq!(bias, vec![(5, -100.0), (7, 2.5)]);
        assert_eq!((a.presence_penalty, a.frequency_penalty), (0.5, -2.0));
        let none = r#"{"logit_bias": {}, "presence_penalty": 0, "frequency_penalty": null}"#;
        assert_eq!(common(none).adjustments(10).unwrap(), None, "no-op values change nothing");
        for (body, field) in [
            (r#"{"logit_bias": {"10": 1}}"#, "logit_bias"),
            (r#"{"logit_bias": {"x": 1}}"#, "logit_bias"),
            (r#"{"logit_bias": {"1": 101}}"#, "logit_bias"),
            (r#"{"logit_bias": [1]}"#, "logit_bias"),
            (r#"{"presence_penalty": 2.5}"#, "presence_penalty"),
            (r#"{"frequency_penalty": "high"}"#, "frequency_penalty"),
        ] {
            let e = common(body).adjustments(10).unwrap_err();
            assert_eq!(e.param.as_deref(), Some(field), "{body}");
        }
    }

    #[test]
    fn no_op_values_of_unsupported_fields_and_long_stops_up_to_the_limit_are_accepted() {
        let ok = r#"{"logprobs": false, "top_logprobs": 0, "echo": false, "logit_bias": {}, "presence_penalty": 0,
            "frequency_penalty": 0.0, "best_of": 1, "suffix": "", "functions": null, "function_call": "none",
            "response_format": {"type": "text"}, "user": "anyone", "use_beam_search": false, "length_penalty": 1.0,
            "skip_special_tokens": true, "guided_json": null, "bad_words": [], "add_generation_prompt": true,
            "top_k": -1, "min_p": 0, "repetition_penalty": 1, "min_tokens": 0, "stop_token_ids": []}"#;
        assert!(common(ok).sampling(16, 100, false, 512).is_ok());
        let at_limit = format!(r#"{{"stop": ["{}"]}}"#, "x".repeat(MAX_STOP_BYTES));
        assert!(common(&at_limit).sampling(16, 100, false, 512).is_ok());
        let over = format!(r#"{{"stop": ["{}"]}}"#, "x".repeat(MAX_STOP_BYTES + 1));
        assert_eq!(common(&over).sampling(16, 100, false, 512).unwrap_err().param.as_deref(), Some("stop"));
    }

    #[test]
    fn content_parts_are_joined_and_non_text_parts_refused() {
        let r: ChatRequest = serde_json::from_str(
            r#"{"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]}"#,
        )
        .unwrap();
        assert_eq!(r.chat_messages().unwrap()[0].content, "ab");
        let r: ChatRequest = serde_json::from_str(
            r#"{"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}"#,
        )
        .unwrap();
        assert!(r.chat_messages().unwrap_err().message.contains("image_url"));
    }

    fn chat_request(json: serde_json::Value) -> ChatRequest {
        let mut body = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]});
        body.as_object_mut().unwrap().extend(json.as_object().unwrap().clone());
        serde_json::from_value(body).unwrap()
    }

    /// A history's tool calls reach the template with their arguments parsed into an object in
    /// the order written (as vLLM hands them over); content may be null only beside calls.
    #[test]
    fn history_tool_calls_are_parsed_and_bad_ones_refused_by_index() {
        let call = |arguments: Value| {
            json!({"role": "assistant", "content": null, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "f", "arguments": arguments}}]})
        };
        let result = json!({"role": "tool", "tool_call_id": "c1", "content": "20"});
        let r = chat_request(json!({"messages": [call(json!("{\"z\": 1, \"a\": [2]}")), result]}));
        let m = r.chat_messages().unwrap();
        assert_eq!(m[0].content, "");
        let c = &m[0].tool_calls.as_ref().unwrap()[0];
        assert_eq!((c.id.as_deref(), c.function.name.as_str()), (Some("c1"), "f"));
        assert_eq!(c.function.arguments.to_string(), r#"{"z": 1, "a": [2]}"#);
        assert_eq!(m[1].tool_call_id.as_deref(), Some("c1"));
        // Reasoning sent back (under either name) reaches the template.
        for key in ["reasoning_content", "reasoning"] {
            let turn = json!({"role": "assistant", "content": "4", key: "2+2"});
            let m = chat_request(json!({ "messages": [turn] })).chat_messages().unwrap();
            assert_eq!(m[0].reasoning_content.as_deref(), Some("2+2"), "{key}");
        }
        // Empty or absent arguments are an empty object; an empty list of calls is none.
        for empty in [json!(""), Value::Null] {
            let m = chat_request(json!({"messages": [call(empty)]})).chat_messages().unwrap();
            assert_eq!(m[0].tool_calls.as_ref().unwrap()[0].function.arguments.to_string(), "{}");
        }
        let none = json!({"role": "user", "content": "x", "tool_calls": []});
        assert!(chat_request(json!({"messages": [none]})).chat_messages().unwrap()[0].tool_calls.is_none());
        for (messages, needle) in [
            (json!([call(json!("{not json"))]), "messages[0]: tool_calls[0]: `function.arguments` is not JSON"),
            (json!([call(json!("[1]"))]), "must be a JSON object"),
            (json!([{"role": "user"}]), "messages[0]: `content` is missing"),
            (
                json!([{"role": "user", "content": "x", "tool_calls": call(json!("{}"))["tool_calls"]}]),
                "assistant turns only",
            ),
        ] {
            let e = chat_request(json!({ "messages": messages })).chat_messages().unwrap_err();
            assert!(e.message.contains(needle), "{}", e.message);
            assert_eq!(e.param.as_deref(), Some("messages"));
        }
    }

    /// `tools`, `tool_choice` and `parallel_tool_calls` as OpenAI defines them; what needs
    /// constrained decoding, and malformed tools, are refused by field.
    #[test]
    fn tool_requests_are_checked_field_by_field() {
        let weather =
            json!({"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}});
        let t = chat_request(json!({"tools": [weather]})).tool_request().unwrap();
        assert!(t.parse && t.tools.len() == 1 && t.max_calls == usize::MAX);
        assert_eq!(t.names, ["get_weather"]);
        let none = chat_request(json!({"tools": [weather], "tool_choice": "none"})).tool_request().unwrap();
        assert!(!none.parse && none.tools.is_empty());
        let one = chat_request(json!({"tools": [weather], "parallel_tool_calls": false})).tool_request().unwrap();
        assert_eq!(one.max_calls, 1);
        // Forced calls: the named function's parameters, or an array of calls to any tool.
        let named = json!({"type": "function", "function": {"name": "get_weather"}});
        let t = chat_request(json!({"tools": [weather], "tool_choice": named})).tool_request().unwrap();
        assert_eq!(t.forced, Some((Forced::Named("get_weather".into()), json!({"type": "object"}))));
        assert!(!t.parse && t.tools.len() == 1);
        let t = chat_request(json!({"tools": [weather], "tool_choice": "required", "parallel_tool_calls": false}))
            .tool_request()
            .unwrap();
        let (form, schema) = t.forced.unwrap();
        assert_eq!(form, Forced::List);
        assert_eq!((schema["minItems"].clone(), schema["maxItems"].clone()), (json!(1), json!(1)));
        assert_eq!(schema["items"]["anyOf"][0]["properties"]["name"], json!({"const": "get_weather"}));
        // Definitions move to the root, where `$ref` resolves; two tools disagreeing on one are refused.
        let with_defs = |def: Value| {
            json!({"type": "function", "function": {"name": "f", "parameters": {
                "properties": {"p": {"$ref": "#/$defs/P"}}, "$defs": {"P": def}}}})
        };
        let t =
            chat_request(json!({"tools": [with_defs(json!({"type": "integer"})), weather], "tool_choice": "required"}))
                .tool_request()
                .unwrap();
        let schema = t.forced.unwrap().1;
        assert_eq!(schema["$defs"], json!({"P": {"type": "integer"}}));
        let f = &schema["items"]["anyOf"][0]["properties"]["parameters"];
        assert!(f.get("$defs").is_none() && f["type"] == "object", "{f}");
        let mut other = with_defs(json!({"type": "string"}));
        other["function"]["name"] = json!("g");
        let clash = json!({"tools": [with_defs(json!({"type": "integer"})), other], "tool_choice": "required"});
        let e = chat_request(clash).tool_request().unwrap_err();
        assert!(e.message.contains("`$defs/P` differently"), "{}", e.message);
        assert!(!chat_request(json!({})).tool_request().unwrap().parse);
        for (fields, param, needle) in [
            (
                json!({"tools": [weather], "tool_choice": {"type": "function", "function": {"name": "f"}}}),
                "tool_choice",
                "`f`, which is not among `tools` (get_weather)",
            ),
            (json!({"tool_choice": "auto"}), "tool_choice", "needs `tools`"),
            (json!({"tools": [weather], "tool_choice": 3}), "tool_choice", "must be"),
            (json!({"tools": [{"type": "function", "function": {}}]}), "tools", "tools[0]: `function.name`"),
            (json!({"tools": [{"type": "retrieval"}]}), "tools", "`type` must be \"function\""),
            (json!({"tools": [weather, weather]}), "tools", "tools[1]: a second function named `get_weather`"),
            (
                json!({"tools": [{"type": "function", "function": {"name": "f", "parameters": 1}}]}),
                "tools",
                "parameters",
            ),
            (
                json!({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]}),
                "tools",
                "must describe an object",
            ),
            (json!({"tools": [weather], "parallel_tool_calls": "yes"}), "parallel_tool_calls", "true or false"),
        ] {
            let e = chat_request(fields.clone()).tool_request().unwrap_err();
            assert_eq!(e.param.as_deref(), Some(param), "{fields}");
            assert!(e.message.contains(needle), "{fields}: {}", e.message);
        }
    }

    #[test]
    fn malformed_and_ill_typed_bodies_are_400_with_serde_saying_where() {
        let e = parse_body::<ChatRequest>(b"{\"model\": ").unwrap_err();
        assert!(e.message.contains("not valid JSON"), "{}", e.message);
        let e = parse_body::<ChatRequest>(br#"{"model": "m", "messages": 3}"#).unwrap_err();
        assert!(e.message.contains("schema"), "{}", e.message);
        let e = parse_body::<ChatRequest>(br#"{"messages": []}"#).unwrap_err();
        assert!(e.message.contains("model"), "{}", e.message);
    }
}
