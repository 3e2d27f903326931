//! `POST /tokenize` and `POST /detokenize`, as vLLM serves them: the token ids a completion or
//! chat request's prompt becomes (so clients count and cut prompts with the server's own
//! tokenizer and chat template), and the text of token ids.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use super::error::ApiError;
use super::openai::{parse_body, ChatRequest, CompletionRequest};
use super::routes::{body_bytes, encode, App};

/// `/tokenize`'s own fields, beside a completion's `prompt` or a chat's `messages`.
#[derive(Debug, Default, Deserialize)]
struct TokenizeOptions {
    /// Add the tokenizer's special tokens (default: true for a prompt, false for messages,
    /// whose template writes its own).
    #[serde(default)]
    add_special_tokens: Option<bool>,
    /// Also answer each token's string.
    #[serde(default)]
    return_token_strs: bool,
}

/// `/detokenize`'s body.
#[derive(Debug, Deserialize)]
struct DetokenizeRequest {
    model: String,
    tokens: Vec<u32>,
}

/// The ids of a completion `prompt` (with the special tokens the tokenizer adds, unless
/// `add_special_tokens: false`) or of chat `messages` (and `tools`) rendered by the chat
/// template with its generation prompt: `{"count", "max_model_len", "tokens", "token_strs"}`.
pub async fn tokenize(State(app): State<Arc<App>>, body: Result<Bytes, BytesRejection>) -> Response {
    match tokenized(&app, body) {
        Ok(v) => Json(v).into_response(),
        Err(e) => e.into_response(),
    }
}

fn tokenized(app: &App, body: Result<Bytes, BytesRejection>) -> Result<Value, ApiError> {
    let body = body_bytes(body)?;
    let options: TokenizeOptions = parse_body(&body)?;
    let value: Value = parse_body(&body)?;
    let ids = if value.get("messages").is_some() {
        let r: ChatRequest = parse_body(&body)?;
        app.check_model(&r.model)?;
        let messages = r.chat_messages()?;
        let text = app.chat_text(&r, &messages, &r.tool_request()?)?;
        encode(&app.tokenizer, &text, options.add_special_tokens.unwrap_or(false))?
    } else {
        let r: CompletionRequest = parse_body(&body)?;
        app.check_model(&r.model)?;
        app.completion_prompt(r.prompt, options.add_special_tokens.unwrap_or(true))?.0
    };
    if let Some(&bad) = ids.iter().find(|&&t| t as usize >= app.vocab_size) {
        let msg = format!("token id {bad} is outside the vocabulary (size {})", app.vocab_size);
        return Err(ApiError::bad_request(msg, Some("prompt")));
    }
    let strs = options
        .return_token_strs
        .then(|| ids.iter().map(|&id| app.tokenizer.id_to_token(id).unwrap_or_default()).collect::<Vec<String>>());
    Ok(json!({"count": ids.len(), "max_model_len": app.context_length, "tokens": ids, "token_strs": strs}))
}

/// The text of token ids, special tokens included: `{"prompt": TEXT}`.
pub async fn detokenize(State(app): State<Arc<App>>, body: Result<Bytes, BytesRejection>) -> Response {
    let text = body_bytes(body).and_then(|b| parse_body::<DetokenizeRequest>(&b)).and_then(|r| {
        app.check_model(&r.model)?;
        if let Some(&bad) = r.tokens.iter().find(|&&t| t as usize >= app.vocab_size) {
            let msg = format!("token id {bad} is outside the vocabulary (size {})", app.vocab_size);
            return Err(ApiError::bad_request(msg, Some("tokens")));
        }
        app.tokenizer
            .decode(&r.tokens, false)
            .map_err(|e| ApiError::bad_request(format!("cannot decode the token ids: {e}"), Some("tokens")))
    });
    match text {
        Ok(prompt) => Json(json!({"prompt": prompt})).into_response(),
        Err(e) => e.into_response(),
    }
}
