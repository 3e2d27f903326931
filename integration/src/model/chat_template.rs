//! The model's chat template: the Jinja template its checkpoint ships (GGUF
//! `tokenizer.chat_template`, or `chat_template` in an HF directory's `tokenizer_config.json`),
//! rendered with minijinja as transformers renders it; plain ChatML when the model ships none.

use std::path::Path;

use anyhow::{Context, Result};
use candle_core::quantized::gguf_file::Content;
use serde::Serialize;

/// ChatML without a default system prompt, for models that ship no template.
const CHATML: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// One chat message.
#[derive(Debug, Clone, Serialize)]
pub struct ChatMessage {
    /// `system`, `user`, `assistant`, ...
    pub role: String,
    /// The message text.
    pub content: String,
}

/// A chat template, checked to compile when built.
#[derive(Debug, Clone)]
pub struct ChatTemplate {
    source: String,
    /// Where it came from, for messages.
    pub origin: String,
}

impl ChatTemplate {
    /// A template from its Jinja source; fails if it does not compile.
    pub fn new(source: String, origin: String) -> Result<Self> {
        let t = Self { source, origin };
        t.env().with_context(|| format!("the chat template from {} does not compile", t.origin))?;
        Ok(t)
    }

    /// Plain ChatML.
    pub fn chatml() -> Self {
        Self { source: CHATML.to_string(), origin: "built-in ChatML".into() }
    }

    /// The template in a GGUF file's metadata, if any.
    pub fn from_gguf(content: &Content) -> Result<Option<Self>> {
        match content.metadata.get("tokenizer.chat_template") {
            None => Ok(None),
            Some(v) => {
                let s = v.to_string().map_err(|e| anyhow::anyhow!("GGUF `tokenizer.chat_template`: {e}"))?;
                Self::new(s.clone(), "the GGUF metadata".into()).map(Some)
            }
        }
    }

    /// The template in `dir/tokenizer_config.json`, if any.
    pub fn from_hf_dir(dir: &Path) -> Result<Option<Self>> {
        let path = dir.join("tokenizer_config.json");
        let Ok(text) = std::fs::read_to_string(&path) else { return Ok(None) };
        let v: serde_json::Value = serde_json::from_str(&text).with_context(|| format!("{}", path.display()))?;
        match v.get("chat_template") {
            Some(serde_json::Value::String(s)) => Self::new(s.clone(), path.display().to_string()).map(Some),
            _ => Ok(None),
        }
    }

    fn env(&self) -> Result<minijinja::Environment<'_>> {
        let mut env = minijinja::Environment::new();
        env.add_function("raise_exception", |msg: String| -> Result<String, minijinja::Error> {
            Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, msg))
        });
        env.add_template("chat", &self.source)?;
        Ok(env)
    }

    /// The prompt for `messages`, ending with the assistant's turn opened.
    pub fn render(&self, messages: &[ChatMessage]) -> Result<String> {
        let env = self.env()?;
        let t = env.get_template("chat")?;
        t.render(minijinja::context! { messages => messages, add_generation_prompt => true })
            .with_context(|| format!("rendering the chat template from {}", self.origin))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(text: &str) -> Vec<ChatMessage> {
        vec![ChatMessage { role: "user".into(), content: text.into() }]
    }

    #[test]
    fn chatml_wraps_each_message_and_opens_the_assistant_turn() {
        let got = ChatTemplate::chatml().render(&user("hi")).unwrap();
        assert_eq!(got, "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n");
    }

    #[test]
    fn a_template_that_raises_is_an_error_not_a_panic() {
        let t = ChatTemplate::new("{{ raise_exception('roles must alternate') }}".into(), "test".into()).unwrap();
        let e = t.render(&user("hi")).unwrap_err();
        assert!(format!("{e:#}").contains("roles must alternate"), "{e:#}");
    }

    #[test]
    fn a_template_that_does_not_compile_is_refused() {
        assert!(ChatTemplate::new("{% for %}".into(), "test".into()).is_err());
    }
}
