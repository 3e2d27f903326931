//! The model's chat template: the Jinja template its checkpoint ships (GGUF
//! `tokenizer.chat_template`; in an HF directory, `chat_template` in `tokenizer_config.json`, a
//! string or a list of named templates, or a `chat_template.jinja` file), rendered with minijinja
//! as transformers renders it (blocks trimmed, `bos_token` and `eos_token` defined); plain ChatML
//! when the model ships none.

use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::quantized::gguf_file::Content;
use serde::Serialize;

/// ChatML without a default system prompt, for models that ship no template.
const CHATML: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// Template variables the renderer sets itself.
const RESERVED: [&str; 5] = ["messages", "tools", "add_generation_prompt", "bos_token", "eos_token"];

/// One chat message, with the OpenAI fields templates read.
#[derive(Debug, Clone, Serialize)]
pub struct ChatMessage {
    /// `system`, `user`, `assistant`, `tool`, ...
    pub role: String,
    /// The message text (empty for an assistant turn that only calls tools).
    pub content: String,
    /// An assistant turn's tool calls.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCallMessage>>,
    /// A tool result's call id.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
    /// The author's name (or, for a tool result, the tool's).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// An assistant turn's reasoning, sent back apart from its content (Qwen3's template puts it
    /// in `<think>` for the turns it keeps).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reasoning_content: Option<String>,
}

impl ChatMessage {
    /// A plain text message.
    pub fn text(role: &str, content: &str) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
            tool_calls: None,
            tool_call_id: None,
            name: None,
            reasoning_content: None,
        }
    }
}

/// A tool call of an earlier assistant turn, as templates read it: `arguments` is an object (as
/// vLLM and transformers give it), not OpenAI's JSON string.
#[derive(Debug, Clone, Serialize)]
pub struct ToolCallMessage {
    /// The call id, when the client gave one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// Always `function`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The function called.
    pub function: FunctionCallMessage,
}

/// The function of a [`ToolCallMessage`].
#[derive(Debug, Clone, Serialize)]
pub struct FunctionCallMessage {
    /// The function's name.
    pub name: String,
    /// Its arguments (key order kept).
    pub arguments: minijinja::Value,
}

/// The special tokens a template may print (`{{ bos_token }}`), as their text.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SpecialTokens {
    /// Beginning of sequence.
    pub bos: String,
    /// End of sequence.
    pub eos: String,
}

/// A chat template, checked to compile when built.
#[derive(Debug, Clone)]
pub struct ChatTemplate {
    source: String,
    special: SpecialTokens,
    /// Where it came from, for messages.
    pub origin: String,
}

impl ChatTemplate {
    /// A template from its Jinja source; fails if it does not compile.
    pub fn new(source: String, special: SpecialTokens, origin: String) -> Result<Self> {
        let t = Self { source, special, origin };
        t.env().with_context(|| format!("the chat template from {} does not compile", t.origin))?;
        Ok(t)
    }

    /// Another template source, rendered with this one's special tokens (a server's
    /// `chat_template` file in place of the model's).
    pub fn with_source(&self, source: String, origin: String) -> Result<Self> {
        Self::new(source, self.special.clone(), origin)
    }

    /// Whether the template mentions `name` at all (`tools`, `tool_calls`): one that does not
    /// would drop what a request gives under that name silently.
    pub fn reads(&self, name: &str) -> bool {
        self.source.contains(name)
    }

    /// The Jinja source.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Plain ChatML.
    pub fn chatml() -> Self {
        Self::chatml_with(SpecialTokens::default())
    }

    /// Plain ChatML, for a model that ships no template, with its special tokens (which a
    /// server's own template may print).
    fn chatml_with(special: SpecialTokens) -> Self {
        Self { source: CHATML.to_string(), special, origin: "built-in ChatML".into() }
    }

    /// The template in a GGUF file's metadata (else ChatML), with the file's BOS and EOS tokens.
    pub fn from_gguf(content: &Content) -> Result<Self> {
        // As for an HF directory, a token the metadata does not give (or gives badly) prints as "".
        let token = |key: &str| -> String {
            let id = crate::model::gguf_meta::meta_usize(content, key).ok();
            let tokens = content.metadata.get("tokenizer.ggml.tokens").and_then(|t| t.to_vec().ok());
            let text = id.zip(tokens).and_then(|(id, tokens)| tokens.get(id)?.to_string().ok().cloned());
            text.unwrap_or_default()
        };
        let special =
            SpecialTokens { bos: token("tokenizer.ggml.bos_token_id"), eos: token("tokenizer.ggml.eos_token_id") };
        let Some(v) = content.metadata.get("tokenizer.chat_template") else { return Ok(Self::chatml_with(special)) };
        let source = v.to_string().map_err(|e| anyhow::anyhow!("GGUF `tokenizer.chat_template`: {e}"))?.clone();
        Self::new(source, special, "the GGUF metadata".into())
    }

    /// The template of an HF directory: the file `chat_template.jinja` (which, as in
    /// transformers, wins), else `chat_template` in `tokenizer_config.json` (a string, or a list
    /// of `{name, template}` of which `default` is used), else ChatML; with the BOS and EOS
    /// tokens of `tokenizer_config.json`.
    pub fn from_hf_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer_config.json");
        let config: serde_json::Value = match std::fs::read_to_string(&path) {
            Ok(text) => serde_json::from_str(&text).with_context(|| format!("{}", path.display()))?,
            Err(_) => serde_json::Value::Null,
        };
        let special =
            SpecialTokens { bos: special_token(&config, "bos_token"), eos: special_token(&config, "eos_token") };
        let jinja = dir.join("chat_template.jinja");
        match std::fs::read_to_string(&jinja) {
            Ok(source) => return Self::new(source, special, jinja.display().to_string()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", jinja.display())),
        }
        let origin = path.display().to_string();
        let source = match config.get("chat_template") {
            None | Some(serde_json::Value::Null) => return Ok(Self::chatml_with(special)),
            Some(serde_json::Value::String(s)) => s.clone(),
            Some(serde_json::Value::Array(named)) => {
                let default = named.iter().find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"));
                let t = default.and_then(|t| t.get("template")).and_then(|t| t.as_str());
                t.with_context(|| format!("{origin}: `chat_template` is a list without a `default` template"))?
                    .to_string()
            }
            Some(other) => {
                bail!("{origin}: `chat_template` is neither a string nor a list of named templates: {other}")
            }
        };
        Self::new(source, special, origin)
    }

    fn env(&self) -> Result<minijinja::Environment<'_>> {
        let mut env = minijinja::Environment::new();
        // transformers renders with `trim_blocks` and `lstrip_blocks` on.
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.add_function("raise_exception", |msg: String| -> Result<String, minijinja::Error> {
            Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, msg))
        });
        // Like transformers: today's local date and time (Llama 3.2's template prints the date).
        env.add_function("strftime_now", strftime_now);
        // Python's string and dict methods (`content.startswith(...)`, `.split`, `.items()`), which
        // templates such as Qwen3's call.
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        // transformers' `tojson` is Python's `json.dumps`, not minijinja's HTML-safe one.
        env.add_filter("tojson", crate::model::py_json::tojson);
        env.add_template("chat", &self.source)?;
        Ok(env)
    }

    /// The prompt for `messages`, ending with the assistant's turn opened.
    pub fn render(&self, messages: &[ChatMessage]) -> Result<String> {
        self.render_with(messages, &[], &serde_json::Map::new())
    }

    /// [`Self::render`] with the tools the model may call (OpenAI's `tools`, set as the template
    /// variable `tools` unless empty) and more template variables (vLLM's
    /// `chat_template_kwargs`, such as Qwen3's `enable_thinking`), which may not replace the
    /// variables set here.
    pub fn render_with(
        &self,
        messages: &[ChatMessage],
        tools: &[minijinja::Value],
        extra: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<String> {
        check_extra(extra)?;
        let env = self.env()?;
        let t = env.get_template("chat")?;
        use minijinja::Value;
        let mut context: std::collections::BTreeMap<&str, Value> =
            extra.iter().map(|(k, v)| (k.as_str(), Value::from_serialize(v))).collect();
        context.insert("messages", Value::from_serialize(messages));
        context.insert("add_generation_prompt", Value::from(true));
        context.insert("bos_token", Value::from(self.special.bos.as_str()));
        context.insert("eos_token", Value::from(self.special.eos.as_str()));
        if !tools.is_empty() {
            context.insert("tools", Value::from(tools.to_vec()));
        }
        t.render(context).with_context(|| format!("rendering the chat template from {}", self.origin))
    }
}

/// Refuses extra template variables that would replace those the renderer sets.
pub fn check_extra(extra: &serde_json::Map<String, serde_json::Value>) -> Result<()> {
    if let Some(k) = extra.keys().find(|k| RESERVED.contains(&k.as_str())) {
        bail!("the chat template variable `{k}` is set by the server (reserved: {})", RESERVED.join(", "));
    }
    Ok(())
}

/// The local time formatted by a Python `strftime` format; a format chrono cannot read is an error.
fn strftime_now(format: String) -> Result<String, minijinja::Error> {
    let items: Vec<_> = chrono::format::StrftimeItems::new(&format).collect();
    if items.iter().any(|i| matches!(i, chrono::format::Item::Error)) {
        return Err(minijinja::Error::new(
            minijinja::ErrorKind::InvalidOperation,
            format!("strftime_now: cannot read the format {format:?}"),
        ));
    }
    Ok(chrono::Local::now().format_with_items(items.into_iter()).to_string())
}

/// A special token of `tokenizer_config.json`: a string, or an object with its `content`.
fn special_token(config: &serde_json::Value, key: &str) -> String {
    match config.get(key) {
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(o) => o.get("content").and_then(|c| c.as_str()).unwrap_or_default().to_string(),
        None => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(text: &str) -> Vec<ChatMessage> {
        vec![ChatMessage::text("user", text)]
    }

    #[test]
    fn chatml_wraps_each_message_and_opens_the_assistant_turn() {
        let got = ChatTemplate::chatml().render(&user("hi")).unwrap();
        assert_eq!(got, "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n");
    }

    #[test]
    fn a_template_that_raises_is_an_error_not_a_panic() {
        let t = ChatTemplate::new(
            "{{ raise_exception('roles must alternate') }}".into(),
            SpecialTokens::default(),
            "test".into(),
        )
        .unwrap();
        let e = t.render(&user("hi")).unwrap_err();
        assert!(format!("{e:#}").contains("roles must alternate"), "{e:#}");
    }

    #[test]
    fn a_template_that_does_not_compile_is_refused() {
        assert!(ChatTemplate::new("{% for %}".into(), SpecialTokens::default(), "test".into()).is_err());
    }

    fn hf_dir(name: &str, files: &[(&str, &str)]) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("dms-chat-template-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        for (f, text) in files {
            std::fs::write(d.join(f), text).unwrap();
        }
        d
    }

    /// Prints `{{ bos_token }}`, as Llama 3's template does, and puts block tags on lines of their
    /// own, indented, as many templates do.
    const TEMPLATE: &str = "{{ bos_token }}{% for message in messages %}\n  {% if message['role'] == 'user' %}\n{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] + eos_token }}\n{% endif %}\n{% endfor %}\n{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}";

    #[test]
    fn special_tokens_are_printed_and_blocks_trimmed_as_transformers_does() {
        let config = serde_json::json!({
            "chat_template": TEMPLATE,
            "bos_token": "<|begin_of_text|>",
            "eos_token": {"content": "<|eot_id|>", "lstrip": false},
        });
        let d = hf_dir("llama3", &[("tokenizer_config.json", &config.to_string())]);
        let t = ChatTemplate::from_hf_dir(&d).unwrap();
        assert_eq!(t.special, SpecialTokens { bos: "<|begin_of_text|>".into(), eos: "<|eot_id|>".into() });
        // Python's jinja2 3.1.6 as transformers configures it (`ImmutableSandboxedEnvironment(
        // trim_blocks=True, lstrip_blocks=True)`) renders this.
        let want = "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>\n<|start_header_id|>assistant<|end_header_id|>\n\n";
        assert_eq!(t.render(&user("hi")).unwrap(), want);
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn named_templates_and_a_chat_template_jinja_file_are_found() {
        let named = serde_json::json!({"chat_template": [
            {"name": "tool_use", "template": "tools"},
            {"name": "default", "template": "default {{ messages[0]['content'] }}"},
        ]});
        let d = hf_dir("named", &[("tokenizer_config.json", &named.to_string())]);
        assert_eq!(ChatTemplate::from_hf_dir(&d).unwrap().render(&user("x")).unwrap(), "default x");
        let no_default = serde_json::json!({"chat_template": [{"name": "tool_use", "template": "tools"}]});
        let d2 = hf_dir("no-default", &[("tokenizer_config.json", &no_default.to_string())]);
        assert!(format!("{:#}", ChatTemplate::from_hf_dir(&d2).unwrap_err()).contains("default"));
        let d3 = hf_dir(
            "jinja",
            &[("tokenizer_config.json", "{}"), ("chat_template.jinja", "file {{ messages[0]['content'] }}")],
        );
        assert_eq!(ChatTemplate::from_hf_dir(&d3).unwrap().render(&user("y")).unwrap(), "file y");
        // No template: ChatML, with the directory's special tokens for a server's own template.
        let d4 = hf_dir("none", &[("tokenizer_config.json", r#"{"bos_token": "<s>", "eos_token": "</s>"}"#)]);
        let t = ChatTemplate::from_hf_dir(&d4).unwrap();
        assert_eq!(t.origin, "built-in ChatML");
        assert_eq!(t.special, SpecialTokens { bos: "<s>".into(), eos: "</s>".into() });
        for d in [d, d2, d3, d4] {
            let _ = std::fs::remove_dir_all(&d);
        }
    }

    fn fixtures() -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/chat_templates")
    }

    /// A message of `expected.json` as the server hands it over (tool-call arguments as objects).
    fn message(m: &serde_json::Value) -> ChatMessage {
        let text = |k: &str| m.get(k).and_then(|v| v.as_str()).map(String::from);
        let tool_calls = m.get("tool_calls").map(|calls| {
            let call = |c: &serde_json::Value| ToolCallMessage {
                id: c["id"].as_str().map(String::from),
                kind: "function".into(),
                function: FunctionCallMessage {
                    name: c["function"]["name"].as_str().unwrap().into(),
                    arguments: minijinja::Value::from_serialize(&c["function"]["arguments"]),
                },
            };
            calls.as_array().unwrap().iter().map(call).collect()
        });
        ChatMessage {
            role: text("role").unwrap(),
            content: text("content").unwrap(),
            tool_calls,
            tool_call_id: text("tool_call_id"),
            name: text("name"),
            reasoning_content: text("reasoning_content"),
        }
    }

    /// Published templates (Qwen3's, which calls Python string methods; Qwen2.5's; DeepSeek-V3.1's
    /// and DeepSeek-R1's distills; SmolLM3's; Phi-3.5's; Mistral Nemo's; Llama 3.1's and Hermes
    /// 3's) render as Python's jinja2 renders them under transformers' settings, also with extra
    /// variables (`enable_thinking`, `thinking`) and with a tool round trip and its `tools`, and
    /// raise where it raises (Mistral's roles that do not alternate)
    /// (`tests/fixtures/chat_templates/expected.json`, from `render.py` there).
    #[test]
    fn published_templates_render_as_jinja2_does() {
        let dir = fixtures();
        let text = std::fs::read_to_string(dir.join("expected.json")).unwrap();
        let expected: serde_json::Value = serde_json::from_str(&text).unwrap();
        // The tools with their key order (serde_json's maps sort keys; minijinja's keep them).
        let tools: Vec<minijinja::Value> = {
            let ordered: minijinja::Value = serde_json::from_str(&text).unwrap();
            ordered.get_attr("tools").unwrap().try_iter().unwrap().collect()
        };
        let special = SpecialTokens { bos: "<BOS>".into(), eos: "<EOS>".into() };
        assert_eq!(expected["special_tokens"]["bos_token"], "<BOS>");
        let kwargs = expected["kwargs"].as_object().unwrap().clone();
        let templates = std::fs::read_dir(&dir)
            .unwrap()
            .filter(|e| e.as_ref().unwrap().path().extension().is_some_and(|x| x == "jinja"))
            .count();
        let mut tool_renders = 0;
        for (key, extra) in [("renders", serde_json::Map::new()), ("renders_with_kwargs", kwargs)] {
            let renders = expected[key].as_object().unwrap();
            assert_eq!(renders.len(), templates, "every template rendered");
            for (file, by_conversation) in renders {
                let source = std::fs::read_to_string(dir.join(file)).unwrap();
                let t = ChatTemplate::new(source, special.clone(), file.clone()).unwrap();
                for (name, want) in by_conversation.as_object().unwrap() {
                    let (conversation, tools) = match expected["conversations"].get(name) {
                        Some(c) => (c, &[][..]),
                        None => (&expected["tool_conversations"][name], &tools[..]),
                    };
                    tool_renders += usize::from(!tools.is_empty());
                    let messages: Vec<ChatMessage> = conversation.as_array().unwrap().iter().map(message).collect();
                    // `render.py` prints `<DATE>` for `strftime_now` (gpt-oss's template asks for today).
                    let today = strftime_now("%Y-%m-%d".into()).unwrap();
                    let got = t.render_with(&messages, tools, &extra).map(|r| r.replace(&today, "<DATE>"));
                    match want.get("error") {
                        // The template raised: so must ours, with its message.
                        Some(message) => {
                            let e = format!("{:#}", got.err().unwrap_or_else(|| panic!("{file}, {name}: raises")));
                            assert!(e.contains(message.as_str().unwrap()), "{file}, {name}, {key}: {e}");
                        }
                        None => assert_eq!(got.unwrap(), want.as_str().unwrap(), "{file}, {name}, {key}"),
                    }
                }
            }
        }
        assert_eq!(tool_renders, 4 * templates, "the tool conversations rendered by every template");
    }

    /// `tojson` prints what Python's `json.dumps` prints under each option transformers passes
    /// on, with the value's key order (`expected.json`'s `tojson`, from `render.py`).
    #[test]
    fn tojson_is_pythons_json_dumps() {
        let text = std::fs::read_to_string(fixtures().join("expected.json")).unwrap();
        let expected: serde_json::Value = serde_json::from_str(&text).unwrap();
        let ordered: minijinja::Value = serde_json::from_str(&text).unwrap();
        let value = ordered.get_attr("tojson_value").unwrap();
        let cases = expected["tojson"].as_object().unwrap();
        assert!(cases.len() >= 6);
        for (call, want) in cases {
            let source = format!("{{{{ value | {call} }}}}");
            let t = ChatTemplate::new(source, SpecialTokens::default(), call.clone()).unwrap();
            let env = t.env().unwrap();
            let got = env.get_template("chat").unwrap().render(minijinja::context! { value }).unwrap();
            assert_eq!(got, want.as_str().unwrap(), "{call}");
        }
        let bad = ChatTemplate::new("{{ 1 | tojson(indent=[1]) }}".into(), SpecialTokens::default(), "t".into());
        let e = bad.unwrap().render(&user("x")).unwrap_err();
        assert!(format!("{e:#}").contains("indent"), "{e:#}");
    }

    /// A template that never reads `tools` is told apart from one that does.
    #[test]
    fn templates_that_read_tools_are_told_apart() {
        let read = |f: &str| std::fs::read_to_string(fixtures().join(f)).unwrap();
        let t = |f: &str| ChatTemplate::new(read(f), SpecialTokens::default(), f.into()).unwrap();
        for f in [
            "Qwen-Qwen3-0.6B.jinja",
            "meta-llama-Llama-3.1-8B-Instruct.jinja",
            "mistralai-Mistral-Nemo-Instruct-2407.jinja",
        ] {
            assert!(t(f).reads("tools") && t(f).reads("tool_calls"), "{f}");
        }
        assert!(!t("microsoft-Phi-3.5-mini-instruct.jinja").reads("tools"));
        assert!(!ChatTemplate::chatml().reads("tools"));
    }

    /// Extra variables may not replace those the renderer sets.
    #[test]
    fn extra_variables_may_not_replace_the_renderers() {
        let t = ChatTemplate::chatml();
        for k in RESERVED {
            let extra = serde_json::json!({ k: "x" }).as_object().unwrap().clone();
            let e = format!("{:#}", t.render_with(&user("hi"), &[], &extra).unwrap_err());
            assert!(e.contains(k) && e.contains("reserved"), "{e}");
        }
    }

    /// `strftime_now` gives today's date as the C library's `strftime` does (`date`), and a format
    /// chrono cannot read is an error, not a panic.
    #[test]
    fn strftime_now_prints_todays_date() {
        let t =
            ChatTemplate::new("{{ strftime_now('%d %b %Y') }}".into(), SpecialTokens::default(), "t".into()).unwrap();
        let date = || {
            let out = std::process::Command::new("date").arg("+%d %b %Y").output().unwrap();
            String::from_utf8(out.stdout).unwrap().trim_end().to_string()
        };
        let (before, got, after) = (date(), t.render(&user("x")).unwrap(), date());
        assert!(got == before || got == after, "{got} vs {before}");
        let bad = ChatTemplate::new("{{ strftime_now('%Q') }}".into(), SpecialTokens::default(), "t".into()).unwrap();
        assert!(format!("{:#}", bad.render(&user("x")).unwrap_err()).contains("%Q"));
    }
}
