//! The HTTP front end: OpenAI-compatible routes, API-key check, and Server-Sent Events streaming.
//! Each request is checked here (so a bad one never reaches the engine), handed to the engine
//! thread as a [`Job`], and answered from the events that come back.

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures::stream::{self, Stream, StreamExt};
use serde_json::{json, Value};
use tokenizers::Tokenizer;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

use super::choice::{ChoiceText, Piece};
use super::error::ApiError;
use super::metrics::Metrics;
use super::openai::{
    parse_body, usage_json, ChatRequest, CommonFields, CompletionRequest, Prompt, Sampling, ToolRequest,
};
use super::reasoning::{ReasoningFormat, ReasoningSplitter};
use super::tokenize;
use super::tool_calls::{ToolCall, ToolCallParser, ToolFormat};
use super::worker::{Command, Event, Job, Outcome, TokenLogprob};
use crate::engine::constraint::{Grammars, Structure, TokenConstraint};
use crate::engine::{GenParams, LogitAdjustments};
use crate::model::chat_template::{check_extra, ChatMessage, ChatTemplate};

/// Everything the handlers share.
pub struct App {
    /// The model id clients send.
    pub model_id: String,
    /// (name, description) of each choosable policy, the default first.
    pub policies: Vec<(String, String)>,
    /// For prompts.
    pub tokenizer: Tokenizer,
    /// For chat prompts.
    pub chat_template: ChatTemplate,
    /// How this model writes tool calls, if the server reads them.
    pub tool_format: Option<ToolFormat>,
    /// The format's markers are special tokens of this tokenizer: answers read for calls are
    /// decoded with special tokens.
    pub tool_markers_special: bool,
    /// How this model marks its reasoning, if the server splits it off.
    pub reasoning: Option<ReasoningFormat>,
    /// `<think>` and `</think>` are special tokens of this tokenizer (as a GGUF file may make
    /// them): answers split for reasoning are decoded with special tokens.
    pub reasoning_markers_special: bool,
    /// Builds grammar constraints, or why this tokenizer cannot have them.
    pub grammars: Result<Grammars, String>,
    /// The model's vocabulary size (token ids must be below it).
    pub vocab_size: usize,
    /// To the engine thread.
    pub commands: Sender<Command>,
    /// Shared with the engine thread.
    pub metrics: Arc<Metrics>,
    /// When set, the bearer token every route but `/health` needs.
    pub api_key: Option<String>,
    /// Prompt plus completion tokens one sequence can hold in the pool.
    pub max_sequence_tokens: usize,
    /// The context length served ([`super::placement::Placement::context_length`]).
    pub context_length: usize,
    /// `max_tokens` when a request gives none.
    pub default_max_tokens: usize,
    /// Largest `max_tokens` accepted.
    pub max_tokens_cap: usize,
    /// Requests in flight (running or waiting) at most.
    pub max_outstanding: usize,
    /// Requests in flight now.
    pub outstanding: AtomicUsize,
    /// Response id counter.
    pub next_id: AtomicU64,
}

/// The router for `app`, refusing bodies over `max_body_bytes`.
pub fn router(app: Arc<App>, max_body_bytes: usize) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/v1/models", get(models))
        .route("/v1/cache_policies", get(cache_policies))
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/metrics", get(metrics))
        .route("/tokenize", post(tokenize::tokenize))
        .route("/detokenize", post(tokenize::detokenize))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(app.clone(), authorize))
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .with_state(app)
}

async fn authorize(State(app): State<Arc<App>>, req: Request, next: Next) -> Response {
    if let Some(key) = &app.api_key {
        if req.uri().path() != "/health" {
            let given = req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
            if given.and_then(|v| v.strip_prefix("Bearer ")) != Some(key.as_str()) {
                let msg = "missing or wrong API key: send `Authorization: Bearer KEY`";
                return ApiError::new(StatusCode::UNAUTHORIZED, "invalid_api_key", msg).into_response();
            }
        }
    }
    next.run(req).await
}

async fn health() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

async fn not_found(req: Request) -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "not_found", format!("no route {} {}", req.method(), req.uri().path()))
}

async fn method_not_allowed(req: Request) -> ApiError {
    let msg = format!("{} is not allowed on {}", req.method(), req.uri().path());
    ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", msg)
}

fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

async fn models(State(app): State<Arc<App>>) -> Json<Value> {
    Json(json!({"object": "list", "data": [{"id": app.model_id, "object": "model", "created": 0, "owned_by": "dms"}]}))
}

async fn cache_policies(State(app): State<Arc<App>>) -> Json<Value> {
    let data: Vec<Value> = app.policies.iter().map(|(n, d)| json!({"name": n, "description": d})).collect();
    Json(json!({"default": app.policies[0].0, "data": data}))
}

async fn metrics(State(app): State<Arc<App>>) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], app.metrics.render()).into_response()
}

/// Which OpenAI object family a request answers with.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Chat,
    Completion,
}

/// A checked request, ready for the engine.
struct Prepared {
    sampling: Sampling,
    policy: usize,
    prompt: Vec<u32>,
    logprobs: Option<usize>,
    /// The prompt's text, to put before the completion (`echo`).
    echo: Option<String>,
    /// Logit biases and penalties.
    adjustments: Option<LogitAdjustments>,
    /// Splits reasoning from and reads tool calls in each answer (chat).
    choice: ChoiceText,
    /// Decode special tokens as text.
    keep_special_tokens: bool,
    /// One grammar constraint per choice (`response_format`, a forced tool call), or none.
    constraints: Vec<Box<dyn TokenConstraint>>,
}

/// The request body, or the error axum gave reading it (too large, unreadable).
pub(super) fn body_bytes(body: Result<Bytes, BytesRejection>) -> Result<Bytes, ApiError> {
    body.map_err(|r| {
        let code = if r.status() == StatusCode::PAYLOAD_TOO_LARGE { "body_too_large" } else { "bad_body" };
        ApiError::new(r.status(), code, r.body_text())
    })
}

async fn chat(State(app): State<Arc<App>>, body: Result<Bytes, BytesRejection>) -> Response {
    let prepared = body_bytes(body).and_then(|b| parse_body::<ChatRequest>(&b)).and_then(|r| {
        app.check_model(&r.model)?;
        r.check_echo()?;
        let messages = r.chat_messages()?;
        let tools = r.tool_request()?;
        let parser = app.tool_parser(&tools, messages.iter().any(|m| m.tool_calls.is_some()))?;
        let asked = match (r.response_schema()?, r.common.structured.structure()?) {
            (Some(_), Some((_, field))) => {
                let msg = format!("`response_format` and `{field}` both constrain the answer: send one");
                return Err(ApiError::bad_request(msg, Some(field)));
            }
            (Some(schema), None) => Some((Structure::JsonSchema(schema), "response_format")),
            (None, structured) => structured,
        };
        let (parser, schema) = match (&tools.forced, asked) {
            (Some(_), Some((_, field))) => {
                let msg = format!("`{field}` cannot be combined with a `tool_choice` that forces a call");
                return Err(ApiError::bad_request(msg, Some(field)));
            }
            (None, Some((_, field))) if tools.parse => {
                let msg = format!(
                    "`{field}` cannot be combined with `tools` the model may call; set `tool_choice` to \"none\" or \
                     leave `{field}` out"
                );
                return Err(ApiError::bad_request(msg, Some(field)));
            }
            (None, Some(asked)) => (None, Some(asked)),
            (Some((forced, schema)), None) => {
                let forced =
                    ToolCallParser::forced(forced.clone(), app.tool_format, tools.names.clone(), tools.max_calls);
                (Some(forced), Some((Structure::JsonSchema(schema.clone()), "tool_choice")))
            }
            (None, None) => (parser, None),
        };
        let text = app.chat_text(&r, &messages, &tools)?;
        let ids = encode(&app.tokenizer, &text, false)?;
        // A grammar writes the whole answer: no reasoning to split, nor calls to find.
        let reasoning = if schema.is_none() { app.reasoning.map(|f| ReasoningSplitter::new(f, &text)) } else { None };
        let keep_special_tokens = schema.is_none()
            && ((parser.is_some() && app.tool_markers_special)
                || (reasoning.is_some() && app.reasoning_markers_special));
        let p = app.prepare(Kind::Chat, &r.common, ids, None)?;
        let constraints = match schema {
            None => Vec::new(),
            Some((structure, field)) => app.constraints(&structure, field, p.sampling.n)?,
        };
        Ok(Prepared { choice: ChoiceText::new(reasoning, parser), keep_special_tokens, constraints, ..p })
    });
    match prepared {
        Ok(p) => app.answer(Kind::Chat, p).await,
        Err(e) => e.into_response(),
    }
}

async fn completions(State(app): State<Arc<App>>, body: Result<Bytes, BytesRejection>) -> Response {
    let prepared = body_bytes(body).and_then(|b| parse_body::<CompletionRequest>(&b)).and_then(|r| {
        app.check_model(&r.model)?;
        r.check_chat_fields()?;
        let echo = r.echo()?;
        let (ids, text) = app.completion_prompt(r.prompt, true)?;
        // The prompt as given; token ids as their text.
        let echo = match (echo, text) {
            (false, _) => None,
            (true, Some(t)) => Some(t),
            (true, None) => Some(app.tokenizer.decode(&ids, false).map_err(|e| {
                ApiError::bad_request(format!("cannot decode the prompt's token ids: {e}"), Some("prompt"))
            })?),
        };
        let structure = r.common.structured.structure()?;
        let p = app.prepare(Kind::Completion, &r.common, ids, echo)?;
        let constraints = match structure {
            None => Vec::new(),
            Some((structure, field)) => app.constraints(&structure, field, p.sampling.n)?,
        };
        Ok(Prepared { constraints, ..p })
    });
    match prepared {
        Ok(p) => app.answer(Kind::Completion, p).await,
        Err(e) => e.into_response(),
    }
}

/// Token ids of `text`. A completion's prompt gets the special tokens the tokenizer adds (Llama
/// 3's BOS), as vLLM and llama.cpp give them; a rendered chat prompt already holds its own.
pub(super) fn encode(tokenizer: &Tokenizer, text: &str, add_special: bool) -> Result<Vec<u32>, ApiError> {
    let enc = tokenizer
        .encode(text, add_special)
        .map_err(|e| ApiError::bad_request(format!("tokenizing the prompt: {e}"), None))?;
    Ok(enc.get_ids().to_vec())
}

/// Counts a request's sequences (one per choice) in flight until dropped.
struct InFlight(Arc<App>, usize);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.outstanding.fetch_sub(self.1, Ordering::SeqCst);
    }
}

impl App {
    /// The parser for a chat request's answers, or why its tools cannot be served: the chat
    /// template must read them (else the model never sees them) and the server must know how
    /// the model writes calls. A history with tool calls needs a template that reads them.
    fn tool_parser(&self, tools: &ToolRequest, history_calls: bool) -> Result<Option<ToolCallParser>, ApiError> {
        let origin = &self.chat_template.origin;
        let fix = "serve with `[server] chat_template` set to a template that does";
        if history_calls && !self.chat_template.reads("tool_calls") {
            let msg = format!("the chat template from {origin} does not read messages' `tool_calls`; {fix}");
            return Err(ApiError::bad_request(msg, Some("messages")));
        }
        if !tools.parse {
            return Ok(None);
        }
        if !self.chat_template.reads("tools") {
            let msg = format!(
                "the chat template from {origin} does not read `tools`, so the model would never see them; {fix}"
            );
            return Err(ApiError::bad_request(msg, Some("tools")));
        }
        let Some(format) = self.tool_format else {
            let msg = match ToolFormat::detect(self.chat_template.source()) {
                // `auto` leaves harmony alone without the splitter that reads its headers.
                Some(ToolFormat::Harmony) if self.reasoning != Some(ReasoningFormat::Harmony) => {
                    "this server reads no tool calls from this model's answers: its chat template writes GPT-OSS's \
                     harmony calls, which the server reads only with `[server] reasoning_parser = \"openai_gptoss\"`"
                }
                _ => {
                    "this server reads no tool calls from this model's answers: its chat template shows no format \
                     it knows (`<tool_call>` blocks, Llama 3's JSON, Mistral's `[TOOL_CALLS]`, DeepSeek's \
                     tool-call blocks or GPT-OSS's harmony calls) and `[server] tool_parser` names none"
                }
            };
            return Err(ApiError::bad_request(msg, Some("tools")));
        };
        Ok(Some(ToolCallParser::new(format, tools.names.clone(), tools.max_calls)))
    }

    /// `n` constraints to `structure` (from the request's `field`); one the grammar engine cannot
    /// use is the request's error.
    fn constraints(
        &self,
        structure: &Structure,
        field: &'static str,
        n: usize,
    ) -> Result<Vec<Box<dyn TokenConstraint>>, ApiError> {
        let grammars = self.grammars.as_ref().map_err(|why| {
            let msg = format!("`{field}` needs constrained decoding, which this model's tokenizer cannot have: {why}");
            ApiError::bad_request(msg, Some(field))
        })?;
        grammars.build(structure, n).map_err(|e| {
            let what = match structure {
                Structure::JsonSchema(_) => "the JSON Schema",
                Structure::Regex(_) => "the regular expression",
                Structure::Choice(_) => "the choice",
                Structure::Lark(_) => "the grammar (Lark syntax, llguidance's dialect)",
            };
            ApiError::bad_request(format!("`{field}`: {what} cannot be used: {e:#}"), Some(field))
        })
    }

    /// A chat request's prompt text: its messages and tools through the chat template, with its
    /// `chat_template_kwargs`.
    pub(super) fn chat_text(
        &self,
        r: &ChatRequest,
        messages: &[ChatMessage],
        tools: &ToolRequest,
    ) -> Result<String, ApiError> {
        let kwargs = r.chat_template_kwargs.clone().unwrap_or_default();
        check_extra(&kwargs).map_err(|e| ApiError::bad_request(format!("{e:#}"), Some("chat_template_kwargs")))?;
        self.chat_template
            .render_with(messages, &tools.tools, &kwargs)
            .map_err(|e| ApiError::bad_request(format!("{e:#}"), Some("messages")))
    }

    /// A completion's prompt as token ids (text tokenized, with the special tokens the tokenizer
    /// adds when `add_special`), with its text when it was given as text.
    pub(super) fn completion_prompt(
        &self,
        prompt: Prompt,
        add_special: bool,
    ) -> Result<(Vec<u32>, Option<String>), ApiError> {
        Ok(match prompt {
            Prompt::Text(t) => (encode(&self.tokenizer, &t, add_special)?, Some(t)),
            Prompt::Ids(ids) => (ids, None),
            Prompt::Texts(mut t) if t.len() == 1 => {
                let t = t.pop().expect("one text");
                (encode(&self.tokenizer, &t, add_special)?, Some(t))
            }
            Prompt::IdLists(mut l) if l.len() == 1 => (l.pop().expect("one prompt"), None),
            Prompt::Texts(t) => {
                return Err(ApiError::bad_request(
                    format!("`prompt` has {} texts; one per request", t.len()),
                    Some("prompt"),
                ))
            }
            Prompt::IdLists(l) => {
                return Err(ApiError::bad_request(
                    format!("`prompt` has {} token-id prompts; one per request", l.len()),
                    Some("prompt"),
                ))
            }
        })
    }

    pub(super) fn check_model(&self, model: &str) -> Result<(), ApiError> {
        if model != self.model_id {
            let msg = format!("model `{model}` does not exist; this server serves `{}`", self.model_id);
            return Err(ApiError {
                param: Some("model".into()),
                ..ApiError::new(StatusCode::NOT_FOUND, "model_not_found", msg)
            });
        }
        Ok(())
    }

    fn prepare(
        &self,
        kind: Kind,
        common: &CommonFields,
        prompt: Vec<u32>,
        echo: Option<String>,
    ) -> Result<Prepared, ApiError> {
        let sampling =
            common.sampling(self.default_max_tokens, self.max_tokens_cap, echo.is_some(), self.vocab_size)?;
        let logprobs = common.logprobs(kind == Kind::Chat)?;
        let adjustments = common.adjustments(self.vocab_size)?;
        let policy = match &common.cache_policy {
            None => 0,
            Some(name) => self.policies.iter().position(|(n, _)| n == name).ok_or_else(|| {
                let valid: Vec<&str> = self.policies.iter().map(|(n, _)| n.as_str()).collect();
                ApiError::bad_request(
                    format!("unknown cache_policy `{name}`; valid: {}", valid.join(", ")),
                    Some("cache_policy"),
                )
            })?,
        };
        if prompt.is_empty() {
            return Err(ApiError::bad_request("the prompt is empty", Some("prompt")));
        }
        if let Some(&bad) = prompt.iter().find(|&&t| t as usize >= self.vocab_size) {
            return Err(ApiError::bad_request(
                format!("token id {bad} is outside the vocabulary (size {})", self.vocab_size),
                Some("prompt"),
            ));
        }
        let total = prompt.len().saturating_add(sampling.max_tokens);
        let limit = if total > self.context_length {
            Some(format!("the model's context length is {} tokens", self.context_length))
        } else if total > self.max_sequence_tokens {
            Some(format!("this server's KV pool holds at most {} tokens for one sequence", self.max_sequence_tokens))
        } else {
            None
        };
        if let Some(limit) = limit {
            let msg = format!(
                "the prompt ({} tokens) plus max_tokens ({}) is {total} tokens; {limit}",
                prompt.len(),
                sampling.max_tokens,
            );
            return Err(ApiError { param: Some("max_tokens".into()), ..ApiError::bad_request(msg, None) }
                .with_code("context_length_exceeded"));
        }
        Ok(Prepared {
            sampling,
            policy,
            prompt,
            logprobs,
            echo,
            adjustments,
            choice: ChoiceText::default(),
            keep_special_tokens: false,
            constraints: Vec::new(),
        })
    }

    /// Queues the job and answers from its events (streamed or whole).
    async fn answer(self: &Arc<Self>, kind: Kind, mut p: Prepared) -> Response {
        let n = p.sampling.n;
        if self.outstanding.fetch_add(n, Ordering::SeqCst) + n > self.max_outstanding {
            self.outstanding.fetch_sub(n, Ordering::SeqCst);
            let msg = format!("the server is at its limit of {} requests in flight; retry later", self.max_outstanding);
            return ApiError::new(StatusCode::TOO_MANY_REQUESTS, "queue_full", msg).into_response();
        }
        let guard = InFlight(self.clone(), n);
        let s = &p.sampling;
        let seed = s.seed.unwrap_or_else(rand::random);
        let stopped = || {
            ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "shutting_down", "the engine has stopped").into_response()
        };
        // One sequence per choice, each with its own sampler (seed + index); the engine starts
        // the copies of one prompt from a single prompt pass.
        let (mut jobs, mut receivers) = (Vec::with_capacity(n), Vec::with_capacity(n));
        let mut constraints = std::mem::take(&mut p.constraints).into_iter();
        for i in 0..n {
            let (tx, rx) = unbounded_channel();
            let params = GenParams {
                max_tokens: s.max_tokens,
                temperature: s.temperature,
                top_p: s.top_p,
                seed: seed.wrapping_add(i as u64),
                stop_at_eos: s.stop_at_eos,
                prefill_chunk: 0,
                top_k: s.top_k,
                min_p: s.min_p,
                min_tokens: s.min_tokens,
                stop_token_ids: s.stop_token_ids.clone(),
            };
            let job = Job {
                prompt: p.prompt.clone(),
                params,
                policy: p.policy,
                stops: s.stops.clone(),
                arrived: Instant::now(),
                logprobs: p.logprobs,
                echo: p.echo.clone(),
                adjustments: p.adjustments.clone(),
                keep_special_tokens: p.keep_special_tokens,
                constraint: constraints.next(),
                events: tx,
            };
            jobs.push(job);
            receivers.push(rx);
        }
        if self.commands.send(Command::Submit(jobs)).is_err() {
            return stopped();
        }
        let head = Head {
            id: format!("{}-{}", kind.id_prefix(), self.next_id.fetch_add(1, Ordering::Relaxed)),
            created: now_secs(),
            model: self.model_id.clone(),
            kind,
            logprobs: p.logprobs.is_some(),
            choice: p.choice.clone(),
        };
        // Wait for each choice's first event so that a request the engine refuses gets its
        // status code (dropping the receivers cancels the other choices).
        let mut firsts = Vec::with_capacity(n);
        for rx in &mut receivers {
            match rx.recv().await {
                Some(Event::Failed(e)) => return e.into_response(),
                Some(e) => firsts.push(e),
                None => return stopped(),
            }
        }
        let choices: Vec<(Event, UnboundedReceiver<Event>)> = firsts.into_iter().zip(receivers).collect();
        if p.sampling.stream {
            Sse::new(sse_stream(head, choices, p.sampling.include_usage, guard)).into_response()
        } else {
            whole_answer(head, choices).await
        }
    }
}

impl ApiError {
    fn with_code(mut self, code: &'static str) -> Self {
        self.code = code;
        self
    }
}

impl Kind {
    fn id_prefix(self) -> &'static str {
        match self {
            Kind::Chat => "chatcmpl",
            Kind::Completion => "cmpl",
        }
    }
}

/// The fields every response object of a request shares.
struct Head {
    id: String,
    created: u64,
    model: String,
    kind: Kind,
    /// The request asked for log-probabilities.
    logprobs: bool,
    /// Splits reasoning from and reads tool calls in each answer (a fresh copy per choice).
    choice: ChoiceText,
}

impl Head {
    fn object(&self, choices: Value) -> Value {
        let object = match self.kind {
            Kind::Chat => "chat.completion.chunk",
            Kind::Completion => "text_completion",
        };
        json!({"id": self.id, "object": object, "created": self.created, "model": self.model, "choices": choices})
    }

    fn delta(&self, index: usize, text: &str, logprobs: &[TokenLogprob]) -> Value {
        let logprobs = if self.logprobs { logprobs_json(self.kind, logprobs) } else { Value::Null };
        match self.kind {
            Kind::Chat => self.object(
                json!([{"index": index, "delta": {"content": text}, "finish_reason": null, "logprobs": logprobs}]),
            ),
            Kind::Completion => {
                self.object(json!([{"index": index, "text": text, "finish_reason": null, "logprobs": logprobs}]))
            }
        }
    }

    /// A chunk of reasoning text (`delta.reasoning_content`).
    fn reasoning_delta(&self, index: usize, text: &str, logprobs: &[TokenLogprob]) -> Value {
        let logprobs = if self.logprobs { logprobs_json(self.kind, logprobs) } else { Value::Null };
        let delta = json!({"reasoning_content": text});
        self.object(json!([{"index": index, "delta": delta, "finish_reason": null, "logprobs": logprobs}]))
    }

    /// A chunk with one tool call (the `k`th of its answer, id `id`), whole.
    fn tool_delta(&self, index: usize, k: usize, call: &ToolCall, id: String, logprobs: &[TokenLogprob]) -> Value {
        let logprobs = if self.logprobs { logprobs_json(self.kind, logprobs) } else { Value::Null };
        let mut call = tool_call_json(call, id);
        call["index"] = json!(k);
        self.object(
            json!([{"index": index, "delta": {"tool_calls": [call]}, "finish_reason": null, "logprobs": logprobs}]),
        )
    }

    /// The chunks of a choice's pieces that became final, in order. The log-probabilities of
    /// every token since the last chunk go with the first chunk (so one chunk's tokens may
    /// include some whose text is still held back).
    fn piece_chunks(&self, index: usize, pieces: Vec<Piece>, held: &mut Vec<TokenLogprob>) -> Vec<Value> {
        pieces
            .into_iter()
            .map(|piece| {
                let logprobs = std::mem::take(held);
                match piece {
                    Piece::Reasoning(text) => self.reasoning_delta(index, &text, &logprobs),
                    Piece::Content(text) => self.delta(index, &text, &logprobs),
                    Piece::Call { index: k, id, call } => self.tool_delta(index, k, &call, id, &logprobs),
                }
            })
            .collect()
    }

    /// The last chunk of a choice; `called`: its answer called tools; `held`: log-probabilities
    /// of tokens whose text went nowhere (dropped whitespace, the `<think>` markers), sent here.
    fn last(&self, index: usize, o: &Outcome, called: bool, held: &[TokenLogprob]) -> Value {
        let reason = finish_reason(o, called);
        let mut v = match self.kind {
            Kind::Chat => {
                let mut choice = json!({"index": index, "delta": {}, "finish_reason": reason});
                if self.logprobs && !held.is_empty() {
                    choice["logprobs"] = logprobs_json(self.kind, held);
                }
                self.object(json!([choice]))
            }
            Kind::Completion => {
                self.object(json!([{"index": index, "text": "", "finish_reason": o.finish_reason, "logprobs": null}]))
            }
        };
        v["kv_cache"] = o.kv.json();
        v
    }
}

/// OpenAI's `finish_reason`: `tool_calls` when an answer that ended by itself called tools.
fn finish_reason(o: &Outcome, called: bool) -> &'static str {
    if called && o.finish_reason == "stop" {
        "tool_calls"
    } else {
        o.finish_reason
    }
}

/// A chat answer's `message` from its pieces: `reasoning_content` when reasoning is split (null
/// when there was none), `content` (null when empty beside calls or split reasoning),
/// `tool_calls` if any.
fn chat_message(pieces: Vec<Piece>, splits_reasoning: bool) -> Value {
    let (mut reasoning, mut content, mut calls) = (String::new(), String::new(), Vec::new());
    for piece in pieces {
        match piece {
            Piece::Reasoning(text) => reasoning.push_str(&text),
            Piece::Content(text) => content.push_str(&text),
            Piece::Call { id, call, .. } => calls.push(tool_call_json(&call, id)),
        }
    }
    // No answer text beside calls or reasoning: null, as vLLM sends it.
    let empty = content.is_empty() && (!calls.is_empty() || splits_reasoning);
    let mut message = json!({"role": "assistant", "content": if empty { Value::Null } else { Value::String(content) }});
    if !calls.is_empty() {
        message["tool_calls"] = Value::Array(calls);
    }
    if splits_reasoning {
        message["reasoning_content"] = if reasoning.is_empty() { Value::Null } else { Value::String(reasoning) };
    }
    message
}

/// A call as OpenAI's `tool_calls` entry.
fn tool_call_json(call: &ToolCall, id: String) -> Value {
    json!({"id": id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}})
}

/// The `logprobs` object of a choice, in the chat or the completions form.
fn logprobs_json(kind: Kind, tokens: &[TokenLogprob]) -> Value {
    match kind {
        Kind::Chat => {
            let entry = |t: &str, l: Option<f32>| json!({"token": t, "logprob": l, "bytes": t.as_bytes()});
            let content: Vec<Value> = tokens
                .iter()
                .map(|t| {
                    let mut e = entry(&t.token, t.logprob);
                    e["top_logprobs"] = t.top.iter().map(|(s, l)| entry(s, Some(*l))).collect();
                    e
                })
                .collect();
            json!({"content": content})
        }
        Kind::Completion => {
            let mut offset = 0;
            let offsets: Vec<usize> = tokens
                .iter()
                .map(|t| {
                    let at = offset;
                    offset += t.token.len();
                    at
                })
                .collect();
            // A map per token, as OpenAI's: two alternatives with the same text keep the likelier.
            // An echoed prompt's first token has none (null), as it has no log-probability.
            let top: Vec<Value> = tokens
                .iter()
                .map(|t| {
                    if t.logprob.is_none() {
                        return Value::Null;
                    }
                    let mut m = serde_json::Map::new();
                    for (s, l) in &t.top {
                        m.entry(s.clone()).or_insert(json!(l));
                    }
                    Value::Object(m)
                })
                .collect();
            json!({
                "tokens": tokens.iter().map(|t| t.token.as_str()).collect::<Vec<_>>(),
                "token_logprobs": tokens.iter().map(|t| t.logprob).collect::<Vec<_>>(),
                "top_logprobs": top,
                "text_offset": offsets,
            })
        }
    }
}

async fn whole_answer(head: Head, choices: Vec<(Event, UnboundedReceiver<Event>)>) -> Response {
    let n = choices.len();
    let mut out = Vec::with_capacity(n);
    let mut usage = (0, 0, 0);
    let mut kv = Value::Null;
    for (index, (first, mut rx)) in choices.into_iter().enumerate() {
        let mut text = String::new();
        let mut event = Some(first);
        let o = loop {
            match event {
                // The log-probabilities come whole with the outcome.
                Some(Event::Text(t, _)) => text.push_str(&t),
                Some(Event::Failed(e)) => return e.into_response(),
                Some(Event::Done(o)) => break o,
                None => {
                    return ApiError::new(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "shutting_down",
                        "the engine stopped mid-request",
                    )
                    .into_response()
                }
            }
            event = rx.recv().await;
        };
        let logprobs = o.logprobs.as_deref().map_or(Value::Null, |l| logprobs_json(head.kind, l));
        let (message, called) = if head.choice.is_plain() {
            (json!({"role": "assistant", "content": text}), false)
        } else {
            let mut choice = head.choice.clone();
            let mut pieces = choice.push(&text);
            pieces.extend(choice.finish());
            (chat_message(pieces, choice.splits_reasoning()), choice.reports_tool_calls())
        };
        let mut choice = match head.kind {
            Kind::Chat => {
                json!({"index": index, "message": message, "finish_reason": finish_reason(&o, called), "logprobs": logprobs})
            }
            Kind::Completion => {
                json!({"index": index, "text": text, "finish_reason": o.finish_reason, "logprobs": logprobs})
            }
        };
        // The prompt is counted once (the other choices copy the first's state); each choice's
        // cache is its own.
        usage = (o.prompt_tokens, usage.1 + o.completion_tokens, usage.2.max(o.cached_tokens));
        if index == 0 {
            kv = o.kv.json();
        }
        if n > 1 {
            choice["kv_cache"] = o.kv.json();
        }
        out.push(choice);
    }
    let object = match head.kind {
        Kind::Chat => "chat.completion",
        Kind::Completion => "text_completion",
    };
    Json(json!({
        "id": head.id, "object": object, "created": head.created, "model": head.model,
        "choices": out,
        "usage": usage_json(usage.0, usage.1, usage.2),
        "kv_cache": kv,
    }))
    .into_response()
}

/// The SSE events of one streamed answer: a role chunk per choice (chat), the choices' text
/// chunks as they come (each with its `index`), a last chunk per choice with `finish_reason` and
/// `kv_cache`, a usage chunk when asked (after every choice), then `[DONE]`. Dropping the stream
/// (the client went away) drops the receivers, which cancels the sequences.
fn sse_stream(
    head: Head,
    choices: Vec<(Event, UnboundedReceiver<Event>)>,
    include_usage: bool,
    guard: InFlight,
) -> impl Stream<Item = Result<SseEvent, Infallible>> {
    let data = |v: Value| SseEvent::default().data(v.to_string());
    let n = choices.len();
    let opening: Vec<SseEvent> = match head.kind {
        Kind::Chat => (0..n)
            .map(|i| {
                data(head.object(
                    json!([{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": null}]),
                ))
            })
            .collect(),
        Kind::Completion => Vec::new(),
    };
    let per_choice = choices.into_iter().enumerate().map(|(i, (first, rx))| {
        stream::once(async move { (i, first) })
            .chain(stream::unfold(rx, move |mut rx| async move { rx.recv().await.map(|e| ((i, e), rx)) }))
            .boxed()
    });
    let events = stream::select_all(per_choice);
    let (mut done, mut usage) = (0, (0, 0, 0));
    // Per choice: its text pipeline, and the log-probabilities of text it holds back.
    let mut texts: Vec<ChoiceText> = vec![head.choice.clone(); n];
    let mut held: Vec<Vec<TokenLogprob>> = vec![Vec::new(); n];
    let body = events.flat_map(move |(i, e)| {
        let out = match e {
            Event::Text(t, logprobs) if texts[i].is_plain() => vec![data(head.delta(i, &t, &logprobs))],
            Event::Text(t, logprobs) => {
                held[i].extend(logprobs);
                let pieces = texts[i].push(&t);
                head.piece_chunks(i, pieces, &mut held[i]).into_iter().map(data).collect()
            }
            Event::Done(o) => {
                let pieces = texts[i].finish();
                let mut v: Vec<SseEvent> = head.piece_chunks(i, pieces, &mut held[i]).into_iter().map(data).collect();
                let called = texts[i].reports_tool_calls();
                v.push(data(head.last(i, &o, called, &std::mem::take(&mut held[i]))));
                done += 1;
                usage = (o.prompt_tokens, usage.1 + o.completion_tokens, usage.2.max(o.cached_tokens));
                if include_usage && done == n {
                    let mut u = head.object(json!([]));
                    u["usage"] = usage_json(usage.0, usage.1, usage.2);
                    v.push(data(u));
                }
                v
            }
            Event::Failed(err) => vec![data(err.body())],
        };
        stream::iter(out)
    });
    // The request counts as in flight until its last event is sent or the stream is dropped.
    let last = stream::once(async move {
        drop(guard);
        SseEvent::default().data("[DONE]")
    });
    stream::iter(opening).chain(body).chain(last).map(Ok)
}
