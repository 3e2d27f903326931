//! `dms serve` end to end: the official `openai` Python client (installed with pip into a venv in
//! the cache directory) against the real binary on SmolLM2-135M, for the API, streaming, per-
//! request policies, concurrency without cross-talk, disconnects, bad input, limits, API keys and
//! SIGTERM. The checks themselves are in `tests/serve/client_checks.py`.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use dms_integration::assets::python_venv;

const OPENAI_VERSION: &str = "3.57.0";
const PROMPT: &str = "Tell me a story about a dragon.";
const MAX_TOKENS: usize = 48;

/// A Python venv with the `openai` client, built once per cache directory.
fn venv_python() -> PathBuf {
    python_venv(&format!("openai-{OPENAI_VERSION}"), &format!("openai=={OPENAI_VERSION}"), "openai", &[])
        .expect("a venv with the openai client")
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// An engine config serving dms (default), full, sliding_window and dms-long (a second adapter with a LoRA, its
/// window cut to 8 so that short requests evict by its decisions), with `server` extra keys.
fn write_config(dir: &Path, name: &str, server: &str) -> PathBuf {
    let adapter = repo().join("configs/adapters/smollm2-dms");
    let long = repo().join("configs/adapters/smollm2-dms-1k-w128-cr8-lora");
    let text = format!(
        r#"[model]
source = "smollm2-135m"

[cache]
block_size = 16
max_tokens = 2048

[cache.policy]
name = "dms"
adapter = "{adapter}"

[server]
port = 0
model_name = "smollm2-135m"
{server}

[[server.policies]]
name = "dms"
policy = {{ name = "dms", adapter = "{adapter}" }}

[[server.policies]]
name = "full"
policy = {{ name = "full" }}

[[server.policies]]
name = "sliding_window"
policy = {{ name = "sliding_window", window = 16, sinks = 4 }}

[[server.policies]]
name = "dms-long"
policy = {{ name = "dms", adapter = "{long}", window = 8 }}
"#,
        adapter = adapter.display(),
        long = long.display()
    );
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

/// A running server; killed if the test ends without stopping it.
struct Server {
    child: Child,
    base: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(config: &Path) -> Server {
    let mut child = Command::new(env!("CARGO_BIN_EXE_dms"))
        .args(["serve", "--config"])
        .arg(config)
        .stdout(Stdio::piped())
        .spawn()
        .expect("dms serve starts");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let line = lines.next().expect("dms serve prints its address").unwrap();
    let base = line.split_whitespace().find(|w| w.starts_with("http://")).expect("an address").to_string();
    // Keep draining stdout so the server never blocks on a full pipe.
    std::thread::spawn(move || lines.for_each(drop));
    Server { child, base }
}

fn python_checks(mode: &str, base: &str, arg: &str) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/serve/client_checks.py");
    let status = Command::new(venv_python()).arg(script).args([mode, base, arg]).status().unwrap();
    assert!(status.success(), "client checks `{mode}` failed");
}

fn sigterm(child: &Child) {
    let ok = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap().success();
    assert!(ok, "kill -TERM");
}

/// Waits for the process to exit; its status, or None after `limit`.
fn wait_exit(child: &mut Child, limit: Duration) -> Option<std::process::ExitStatus> {
    let t0 = Instant::now();
    while t0.elapsed() < limit {
        if let Some(s) = child.try_wait().unwrap() {
            return Some(s);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

/// What `dms run --chat` prints for PROMPT under the config's `[cache.policy]`.
fn run_chat_text(config: &Path) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_dms"))
        .args(["run", "--chat", "--prompt", PROMPT, "--max-tokens", &MAX_TOKENS.to_string(), "--config"])
        .arg(config)
        .output()
        .unwrap();
    assert!(out.status.success(), "dms run: {}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8(out.stdout).unwrap();
    let (text, _) = stdout.split_once("\n[summary]").expect("a summary line after the text");
    text.to_string()
}

#[test]
fn the_openai_client_gets_every_route_streaming_and_policies_with_no_cross_talk() {
    let python = venv_python();
    assert!(python.exists());
    let dir = std::env::temp_dir().join(format!("dms-serve-main-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = write_config(&dir, "serve.toml", "max_batch = 8");
    let expected = dir.join("expected.json");
    let text = run_chat_text(&config);
    let body = serde_json::json!({"prompt": PROMPT, "max_tokens": MAX_TOKENS, "text": text});
    std::fs::write(&expected, body.to_string()).unwrap();
    let mut server = start(&config);
    python_checks("main", &server.base, expected.to_str().unwrap());
    sigterm(&server.child);
    let status = wait_exit(&mut server.child, Duration::from_secs(10)).expect("exits within 10 s of SIGTERM");
    assert!(status.success(), "exit status after SIGTERM: {status}");
}

#[test]
fn limits_api_keys_and_sigterm_with_a_request_in_flight() {
    let dir = std::env::temp_dir().join(format!("dms-serve-tight-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let key = "test-key-123";
    let config = write_config(
        &dir,
        "tight.toml",
        &format!("max_batch = 1\nmax_waiting = 1\nmax_body_bytes = 4096\nshutdown_grace_secs = 1\napi_key = \"{key}\""),
    );
    let mut server = start(&config);
    python_checks("tight", &server.base, key);

    // SIGTERM while a long stream runs: the stream is cut short and the server exits 0 promptly.
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/serve/client_checks.py");
    let mut client = Command::new(venv_python())
        .arg(script)
        .args(["inflight", &server.base, key])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(client.stdout.take().unwrap()).lines();
    assert_eq!(lines.next().unwrap().unwrap(), "started");
    let t0 = Instant::now();
    sigterm(&server.child);
    let status = wait_exit(&mut server.child, Duration::from_secs(10)).expect("exits within 10 s of SIGTERM");
    assert!(status.success(), "exit status after SIGTERM: {status}");
    let rest: Vec<String> = lines.map(|l| l.unwrap()).collect();
    assert!(client.wait().unwrap().success());
    assert!(rest.iter().any(|l| l.starts_with("inflight: stream closed")), "{rest:?}");
    assert!(t0.elapsed() < Duration::from_secs(10));
}

#[test]
fn a_request_past_its_timeout_is_cancelled_with_504_and_its_blocks_freed() {
    let dir = std::env::temp_dir().join(format!("dms-serve-timeout-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = write_config(&dir, "timeout.toml", "request_timeout_secs = 2");
    let server = start(&config);
    python_checks("timeout", &server.base, "-");
}

/// Tool calling through the `openai` client on SmolLM2 served with Qwen2.5's chat template (which
/// reads tools and teaches `<tool_call>` blocks): a few-shot history of tool calls and results
/// (`tests/serve/tool_conversation.json`) makes the model call the tool for the next city. The
/// oracle is independent of the server's template and parser: Python's jinja2 renders the
/// conversation as vLLM hands it to transformers (`tests/serve/render_prompt.py`), the server
/// completes that text, and vLLM's hermes regex reads the calls; the chat answer, whole and
/// streamed, must give the same calls from the same number of prompt tokens.
#[test]
fn tool_calls_reach_the_openai_client_whole_and_streamed() {
    let dir = std::env::temp_dir().join(format!("dms-serve-tools-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let here = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests");
    let template = here.join("fixtures/chat_templates/Qwen-Qwen2.5-7B-Instruct.jinja");
    let conversation = here.join("serve/tool_conversation.json");
    let jinja2 = python_venv("jinja2-3.1.6", "jinja2==3.1.6", "jinja2", &[]).expect("a venv with jinja2");
    let out = Command::new(jinja2)
        .arg(here.join("serve/render_prompt.py"))
        .arg(&conversation)
        .arg(&template)
        .output()
        .unwrap();
    assert!(out.status.success(), "render_prompt.py: {}", String::from_utf8_lossy(&out.stderr));
    let prompt = dir.join("prompt.txt");
    std::fs::write(&prompt, &out.stdout).unwrap();
    let config = dir.join("tools.toml");
    let text = format!(
        "[model]\nsource = \"smollm2-135m\"\n[cache]\nblock_size = 16\nmax_tokens = 4096\n[cache.policy]\nname = \"full\"\n\
         [server]\nport = 0\nmodel_name = \"smollm2-135m\"\nchat_template = {:?}\n",
        template.display().to_string()
    );
    std::fs::write(&config, text).unwrap();
    let server = start(&config);
    let paths = serde_json::json!({"conversation": conversation, "prompt": prompt});
    python_checks("tools", &server.base, &paths.to_string());
}

/// `dms serve` on the tiny Llama 3 GGUF fixture (model name `tiny`, policy `full`).
fn tiny_llama3_server(name: &str) -> Server {
    tiny_llama3_server_with(name, "")
}

/// [`tiny_llama3_server`] with more `[server]` keys.
fn tiny_llama3_server_with(name: &str, server: &str) -> Server {
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gguf/llama3_tiny.gguf");
    let dir = std::env::temp_dir().join(format!("dms-serve-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("llama3.toml");
    let text = format!(
        "[model]\nsource = {:?}\n[cache]\nblock_size = 4\nmax_tokens = 512\n[cache.policy]\nname = \"full\"\n[server]\nport = 0\nmodel_name = \"tiny\"\n{server}\n",
        model.display().to_string()
    );
    std::fs::write(&config, text).unwrap();
    start(&config)
}

/// One HTTP/1.1 POST of a JSON body; the status code and the response body as JSON (no client
/// library needed).
fn post_json(base: &str, path: &str, body: &serde_json::Value) -> (u16, serde_json::Value) {
    let (status, body) = post(base, path, body);
    (status, serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}")))
}

/// One HTTP/1.1 POST of a JSON body; the status code and the response body.
fn post(base: &str, path: &str, body: &serde_json::Value) -> (u16, String) {
    http(base, "POST", path, &body.to_string())
}

/// One HTTP/1.1 request (no client library needed); the status code and the response body.
fn http(base: &str, method: &str, path: &str, body: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let addr = base.trim_start_matches("http://").trim_end_matches('/');
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").expect("an HTTP response");
    let status = head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).expect("a status code");
    (status, body.to_string())
}

/// A completion's prompt gets the special tokens the model's tokenizer adds (Llama 3's GGUF: BOS),
/// as vLLM and llama.cpp give them; the count is llama.cpp's (`fixtures/gguf/expected.json`).
/// `chat_template_kwargs` reach the template, and may not replace the server's variables.
#[test]
fn a_completion_prompt_gets_the_tokenizers_special_tokens_and_chat_takes_template_kwargs() {
    let want = hello_world().1.len();
    let server = tiny_llama3_server("bos");
    let (status, r) = post_json(
        &server.base,
        "/v1/completions",
        &serde_json::json!({"model": "tiny", "prompt": "Hello world", "max_tokens": 2}),
    );
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["usage"]["prompt_tokens"].as_u64(), Some(want as u64), "{r}");
    let chat = |kwargs: serde_json::Value| {
        let body = serde_json::json!({"model": "tiny", "max_tokens": 1, "chat_template_kwargs": kwargs,
            "messages": [{"role": "user", "content": "Hello world"}]});
        post_json(&server.base, "/v1/chat/completions", &body)
    };
    let (status, r) = chat(serde_json::json!({"enable_thinking": false}));
    assert_eq!(status, 200, "{r}");
    let (status, r) = chat(serde_json::json!({"add_generation_prompt": false}));
    assert_eq!(status, 400, "{r}");
    assert_eq!(r["error"]["param"], "chat_template_kwargs", "{r}");
}

/// gpt-oss's template served with `tool_parser = "auto"`: without the harmony reasoning parser a
/// request with tools is refused naming the setting it needs; with it the request is answered;
/// with it and `tool_parser = "none"` the refusal says no format is set.
#[test]
fn harmony_tool_calls_name_the_reasoning_parser_they_need() {
    let template =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/chat_templates/openai-gpt-oss-120b.jinja");
    let tools = serde_json::json!([{"type": "function", "function": {"name": "f", "description": "F.", "parameters": {"type": "object"}}}]);
    let body = serde_json::json!({"model": "tiny", "max_tokens": 2, "tools": tools,
        "messages": [{"role": "user", "content": "Hello world"}]});
    let with_template = format!("chat_template = {:?}", template.display().to_string());
    let server = tiny_llama3_server_with("harmony-auto", &with_template);
    let (status, r) = post_json(&server.base, "/v1/chat/completions", &body);
    assert_eq!((status, r["error"]["param"].as_str()), (400, Some("tools")), "{r}");
    let msg = r["error"]["message"].as_str().unwrap();
    assert!(msg.contains("reasoning_parser = \"openai_gptoss\""), "{msg}");
    drop(server);
    let server =
        tiny_llama3_server_with("harmony-split", &format!("{with_template}\nreasoning_parser = \"openai_gptoss\""));
    let (status, r) = post_json(&server.base, "/v1/chat/completions", &body);
    assert_eq!(status, 200, "{r}");
    drop(server);
    // With the splitter on and calls switched off, the message says so, not to set it.
    let none = format!("{with_template}\nreasoning_parser = \"openai_gptoss\"\ntool_parser = \"none\"");
    let server = tiny_llama3_server_with("harmony-none", &none);
    let (status, r) = post_json(&server.base, "/v1/chat/completions", &body);
    assert_eq!(status, 400, "{r}");
    let msg = r["error"]["message"].as_str().unwrap();
    assert!(msg.contains("`[server] tool_parser` names none") && !msg.contains("only with"), "{msg}");
}

/// The tiny Llama 3 GGUF and the ids llama.cpp gives "Hello world" with its BOS
/// (`fixtures/gguf/expected.json`).
fn hello_world() -> (std::path::PathBuf, Vec<u32>) {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gguf");
    let expected: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures.join("expected.json")).unwrap()).unwrap();
    let e = &expected["llama3_tiny.gguf"];
    assert_eq!(e["texts"][0], "Hello world");
    let prompt = e["ids_add_special"][0].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect();
    (fixtures.join("llama3_tiny.gguf"), prompt)
}

/// The host engine (full cache) on `model`, with its tokenizer: the reference the server's
/// answers are checked against.
fn full_cache_engine(model: &Path) -> (dms_integration::engine::Engine, tokenizers::Tokenizer) {
    let loaded = dms_integration::engine::load_model(
        model,
        &candle_core::Device::Cpu,
        dms_integration::model::WeightForm::Dense,
    )
    .unwrap();
    let policy = dms_policy::Registry::with_builtins().build(&toml::from_str("name = \"full\"").unwrap()).unwrap();
    let eng = dms_integration::engine::Engine::new(loaded.model, policy, 4, 1 << 12).unwrap();
    (eng, loaded.tokenizer.unwrap())
}

/// Each token's log-probabilities under the model for a greedy continuation of `prompt`: a naive
/// log-softmax (f64) of the logits the engine gives step by step.
fn naive_greedy_logprobs(model: &Path, prompt: &[u32], steps: usize) -> Vec<(u32, Vec<f64>)> {
    let (mut eng, _) = full_cache_engine(model);
    let mut seq = eng.new_sequence();
    let all = eng.step(&mut seq, prompt, true).unwrap().to_vec2::<f32>().unwrap();
    let mut logits = all.last().unwrap().clone();
    let mut out = Vec::new();
    for _ in 0..steps {
        let lse = logits.iter().map(|&l| (l as f64).exp()).sum::<f64>().ln();
        let token = dms_integration::engine::argmax(&logits);
        out.push((token, logits.iter().map(|&l| l as f64 - lse).collect()));
        logits = eng.step(&mut seq, &[token], false).unwrap().squeeze(0).unwrap().to_vec1().unwrap();
    }
    out
}

/// Entry `i` of a completion's `logprobs` against the naive log-softmax `want` of the logits
/// `token` (whose text is `text`) was chosen from: its text, its log-probability and its at most
/// `top` alternatives, the most likely ones (1e-4).
fn check_entry(lp: &serde_json::Value, i: usize, text: &str, token: u32, want: &[f64], top: usize) {
    assert_eq!(lp["tokens"][i], text, "{lp}");
    let got = lp["token_logprobs"][i].as_f64().unwrap();
    assert!((got - want[token as usize]).abs() < 1e-4, "entry {i}: {got} vs {}", want[token as usize]);
    let mut best = want.to_vec();
    best.sort_by(|a, b| b.total_cmp(a));
    let mut alternatives: Vec<f64> =
        lp["top_logprobs"][i].as_object().unwrap().values().map(|v| v.as_f64().unwrap()).collect();
    alternatives.sort_by(|a, b| b.total_cmp(a));
    assert!(!alternatives.is_empty() && alternatives.len() <= top, "{lp}");
    for (g, w) in alternatives.iter().zip(&best) {
        assert!((g - w).abs() < 1e-4, "entry {i}: top {alternatives:?} vs {:?}", &best[..top]);
    }
}

/// `logprobs` on a completion: each token's log-probability and its three most likely
/// alternatives equal a naive log-softmax of the engine's logits for the same greedy tokens;
/// on a chat: the chosen greedy token is the best of its alternatives.
#[test]
fn logprobs_are_the_models_log_softmax() {
    let (model, prompt) = hello_world();
    let steps = 4;
    let want = naive_greedy_logprobs(&model, &prompt, steps);
    let tok = full_cache_engine(&model).1;
    let server = tiny_llama3_server("logprobs");
    let body = serde_json::json!({"model": "tiny", "prompt": "Hello world", "max_tokens": steps, "logprobs": 3,
        "ignore_eos": true});
    let (status, r) = post_json(&server.base, "/v1/completions", &body);
    assert_eq!(status, 200, "{r}");
    let lp = &r["choices"][0]["logprobs"];
    for (i, (token, all)) in want.iter().enumerate() {
        check_entry(lp, i, &tok.decode(&[*token], false).unwrap(), *token, all, 3);
    }
    // Streamed, the chunks carry the same entries, each with the text of its tokens (whole
    // characters here).
    let mut streamed = body.clone();
    streamed["stream"] = serde_json::json!(true);
    let (status, sse) = post(&server.base, "/v1/completions", &streamed);
    assert_eq!(status, 200, "{sse}");
    let (mut tokens, mut values) = (Vec::new(), Vec::new());
    for line in sse.lines().filter_map(|l| l.strip_prefix("data: ")).filter(|l| *l != "[DONE]") {
        let chunk: serde_json::Value = serde_json::from_str(line).unwrap();
        let l = &chunk["choices"][0]["logprobs"];
        if let Some(t) = l["tokens"].as_array() {
            let text: String = t.iter().map(|x| x.as_str().unwrap()).collect();
            assert_eq!(text, chunk["choices"][0]["text"].as_str().unwrap(), "{chunk}");
            tokens.extend(t.iter().cloned());
            values.extend(l["token_logprobs"].as_array().unwrap().iter().cloned());
        }
    }
    assert_eq!(tokens, *lp["tokens"].as_array().unwrap(), "{sse}");
    assert_eq!(values, *lp["token_logprobs"].as_array().unwrap(), "{sse}");
    let body = serde_json::json!({"model": "tiny", "max_tokens": 3, "logprobs": true, "top_logprobs": 2,
        "ignore_eos": true, "messages": [{"role": "user", "content": "Hello world"}]});
    let (status, r) = post_json(&server.base, "/v1/chat/completions", &body);
    assert_eq!(status, 200, "{r}");
    let content = r["choices"][0]["logprobs"]["content"].as_array().unwrap();
    assert_eq!(content.len(), 3, "{r}");
    for c in content {
        let top = c["top_logprobs"].as_array().unwrap();
        assert_eq!(top.len(), 2, "{c}");
        assert_eq!(c["logprob"], top[0]["logprob"], "greedy picks the best: {c}");
        assert!(top[0]["logprob"].as_f64() >= top[1]["logprob"].as_f64(), "{c}");
    }
}

/// `echo` on a completion: the answer starts with the prompt, and with `logprobs` the prompt's
/// tokens come first, the first with null and each other with the log-probability and top
/// tokens of a naive log-softmax (f64) of the engine's logits before it; `max_tokens: 0` scores
/// the prompt only (lm-eval's loglikelihood requests). Streamed, the prompt comes in the first
/// chunk and the generated tokens' entries equal those of the answer without `echo`. Chat and a
/// zero limit without `echo` are refused naming the field.
#[test]
fn echo_returns_the_prompt_and_scores_it_in_its_pass() {
    let (model, prompt) = hello_world();
    let (mut eng, tok) = full_cache_engine(&model);
    let mut seq = eng.new_sequence();
    let all = eng.step(&mut seq, &prompt, true).unwrap().to_vec2::<f32>().unwrap();
    let log_softmax = |row: &[f32]| -> Vec<f64> {
        let lse = row.iter().map(|&l| (l as f64).exp()).sum::<f64>().ln();
        row.iter().map(|&l| l as f64 - lse).collect()
    };
    let server = tiny_llama3_server("echo");
    let body =
        serde_json::json!({"model": "tiny", "prompt": "Hello world", "max_tokens": 0, "echo": true, "logprobs": 2});
    let (status, r) = post_json(&server.base, "/v1/completions", &body);
    assert_eq!(status, 200, "{r}");
    let choice = &r["choices"][0];
    assert_eq!(choice["text"], "Hello world", "{r}");
    assert_eq!(choice["finish_reason"], "length", "{r}");
    assert_eq!(r["usage"]["completion_tokens"], 0, "{r}");
    let lp = &choice["logprobs"];
    assert_eq!(lp["tokens"].as_array().unwrap().len(), prompt.len(), "{lp}");
    assert!(lp["token_logprobs"][0].is_null() && lp["top_logprobs"][0].is_null(), "{lp}");
    for (i, &t) in prompt.iter().enumerate().skip(1) {
        check_entry(lp, i, &tok.decode(&[t], false).unwrap(), t, &log_softmax(&all[i - 1]), 2);
    }
    // With generated tokens, streamed: the prompt first, then the completion's entries as
    // without `echo`.
    let plain = serde_json::json!({"model": "tiny", "prompt": "Hello world", "max_tokens": 3, "logprobs": 2, "ignore_eos": true});
    let (status, without) = post_json(&server.base, "/v1/completions", &plain);
    assert_eq!(status, 200, "{without}");
    let mut streamed = plain.clone();
    streamed["echo"] = serde_json::json!(true);
    streamed["stream"] = serde_json::json!(true);
    let (status, sse) = post(&server.base, "/v1/completions", &streamed);
    assert_eq!(status, 200, "{sse}");
    let (mut texts, mut values) = (Vec::new(), Vec::new());
    for line in sse.lines().filter_map(|l| l.strip_prefix("data: ")).filter(|l| *l != "[DONE]") {
        let chunk: serde_json::Value = serde_json::from_str(line).unwrap();
        let c = &chunk["choices"][0];
        if let Some(v) = c["logprobs"]["token_logprobs"].as_array() {
            texts.push(c["text"].as_str().unwrap().to_string());
            values.extend(v.iter().cloned());
        }
    }
    assert_eq!(texts[0], "Hello world", "{sse}");
    assert_eq!(texts.concat(), format!("Hello world{}", without["choices"][0]["text"].as_str().unwrap()), "{sse}");
    assert_eq!(values.len(), prompt.len() + 3, "{sse}");
    assert_eq!(values[..prompt.len()], *lp["token_logprobs"].as_array().unwrap(), "{sse}");
    // The same tokens' entries; the figures within f32 rounding (a prompt pass that scores
    // computes every position's logits, one that does not only the last).
    let plain_values = without["choices"][0]["logprobs"]["token_logprobs"].as_array().unwrap();
    for (g, w) in values[prompt.len()..].iter().zip(plain_values) {
        assert!((g.as_f64().unwrap() - w.as_f64().unwrap()).abs() < 1e-5, "{g} vs {w}: {sse}");
    }
    // Without logprobs: the prompt's text before the completion; token ids echo as their text.
    let (status, r) = post_json(
        &server.base,
        "/v1/completions",
        &serde_json::json!({"model": "tiny", "prompt": "Hello world", "max_tokens": 3, "echo": true, "ignore_eos": true}),
    );
    assert_eq!(status, 200, "{r}");
    assert_eq!(
        r["choices"][0]["text"],
        format!("Hello world{}", without["choices"][0]["text"].as_str().unwrap()),
        "{r}"
    );
    assert!(r["choices"][0]["logprobs"].is_null(), "{r}");
    // Token ids, alone or as lm-eval batches them (a list of one), echo as their text.
    for ids in [serde_json::json!(prompt), serde_json::json!([prompt])] {
        let body = serde_json::json!({"model": "tiny", "prompt": ids, "max_tokens": 1, "echo": true, "logprobs": 1});
        let (status, r) = post_json(&server.base, "/v1/completions", &body);
        assert_eq!(status, 200, "{r}");
        let text = r["choices"][0]["text"].as_str().unwrap();
        assert!(text.starts_with(&tok.decode(&prompt, false).unwrap()), "{r}");
        assert_eq!(r["choices"][0]["logprobs"]["tokens"].as_array().unwrap().len(), prompt.len() + 1, "{r}");
    }
    for (path, body, field) in [
        ("/v1/completions", serde_json::json!({"model": "tiny", "prompt": "Hello", "max_tokens": 0}), "max_tokens"),
        ("/v1/completions", serde_json::json!({"model": "tiny", "prompt": [[1, 2], [3]], "max_tokens": 1}), "prompt"),
        (
            "/v1/chat/completions",
            serde_json::json!({"model": "tiny", "echo": true, "messages": [{"role": "user", "content": "Hi"}]}),
            "echo",
        ),
    ] {
        let (status, r) = post_json(&server.base, path, &body);
        assert_eq!(status, 400, "{r}");
        assert_eq!(r["error"]["param"], field, "{r}");
    }
}

/// `n` choices: choice i is the answer a request of its own with seed + i gives (sampled at
/// temperature 1), and the copies start from one prompt pass (`dms_forked_sequences_total`);
/// usage counts the prompt once and every choice's tokens. Streamed, each index's chunks make up
/// that choice's text, and one usage chunk follows them all.
#[test]
fn n_choices_are_the_answers_of_successive_seeds() {
    let server = tiny_llama3_server("choices");
    let body = |n: usize, seed: u64, stream: bool| {
        serde_json::json!({"model": "tiny", "prompt": "Hello world", "max_tokens": 6, "temperature": 1.0,
            "seed": seed, "n": n, "ignore_eos": true, "stream": stream, "stream_options": {"include_usage": stream}})
    };
    let singles: Vec<(String, u64)> = (0..3)
        .map(|i| {
            let (status, r) = post_json(&server.base, "/v1/completions", &body(1, 7 + i, false));
            assert_eq!(status, 200, "{r}");
            (r["choices"][0]["text"].as_str().unwrap().to_string(), r["usage"]["prompt_tokens"].as_u64().unwrap())
        })
        .collect();
    assert!(singles.iter().any(|s| s.0 != singles[0].0), "the seeds sample different texts: {singles:?}");
    // The copies start from one prompt pass: two of the three sequences are forks.
    let forked = || {
        let (_, text) = http(&server.base, "GET", "/metrics", "");
        let line = text.lines().find(|l| l.starts_with("dms_forked_sequences_total ")).expect("the counter");
        line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap()
    };
    let before = forked();
    let (status, r) = post_json(&server.base, "/v1/completions", &body(3, 7, false));
    assert_eq!(status, 200, "{r}");
    assert_eq!(forked() - before, 2, "{r}");
    let choices = r["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 3, "{r}");
    for (i, (c, (text, _))) in choices.iter().zip(&singles).enumerate() {
        assert_eq!(c["index"], i, "{r}");
        assert_eq!(c["text"], text.as_str(), "choice {i}: {r}");
    }
    assert_eq!(r["usage"]["prompt_tokens"].as_u64(), Some(singles[0].1), "{r}");
    assert_eq!(r["usage"]["completion_tokens"], 18, "{r}");
    let (status, sse) = post(&server.base, "/v1/completions", &body(3, 7, true));
    assert_eq!(status, 200, "{sse}");
    let (mut texts, mut finished, mut usages) = (vec![String::new(); 3], 0, Vec::new());
    for line in sse.lines().filter_map(|l| l.strip_prefix("data: ")).filter(|l| *l != "[DONE]") {
        let chunk: serde_json::Value = serde_json::from_str(line).unwrap();
        if let Some(u) = chunk.get("usage") {
            assert_eq!(finished, 3, "usage after every choice: {sse}");
            usages.push(u["completion_tokens"].clone());
            continue;
        }
        let c = &chunk["choices"][0];
        texts[c["index"].as_u64().unwrap() as usize].push_str(c["text"].as_str().unwrap());
        if !c["finish_reason"].is_null() {
            finished += 1;
        }
    }
    assert_eq!(usages, vec![serde_json::json!(18)], "{sse}");
    for (got, (want, _)) in texts.iter().zip(&singles) {
        assert_eq!(got, want, "{sse}");
    }
    let chat =
        serde_json::json!({"model": "tiny", "max_tokens": 2, "n": 2, "messages": [{"role": "user", "content": "Hi"}]});
    let (status, r) = post_json(&server.base, "/v1/chat/completions", &chat);
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["choices"].as_array().unwrap().len(), 2, "{r}");
    assert_eq!(r["choices"][1]["index"], 1, "{r}");
}

/// `logit_bias`, `presence_penalty` and `frequency_penalty`: a greedy answer is the one a naive
/// loop over the engine's logits gives when it adds the biases and takes OpenAI's penalties
/// (count x frequency + presence for each token generated so far) before its argmax; a bias of
/// +100 forces its token. Out-of-range values are refused naming the field.
#[test]
fn logit_bias_penalties_and_vllms_sampling_fields_change_the_choice_as_defined() {
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gguf/llama3_tiny.gguf");
    let (mut eng, tok) = full_cache_engine(&model);
    let prompt = tok.encode("Hello world", true).unwrap().get_ids().to_vec();
    let steps = 8;
    // A naive greedy loop: argmax of the logits plus bias, minus the penalties.
    // transformers' repetition penalty on every token of the prompt or the output (`rep`); the
    // tokens `banned` not chosen before `min_tokens`; generation ends after a token of `stop_ids`.
    let mut naive_with = |prompt: &[u32],
                          bias: &[(u32, f32)],
                          presence: f32,
                          frequency: f32,
                          rep: f32,
                          banned: &[u32],
                          min_tokens: usize,
                          stop_ids: &[u32]|
     -> Vec<u32> {
        let mut seq = eng.new_sequence();
        let mut logits: Vec<f32> = eng.step(&mut seq, prompt, false).unwrap().squeeze(0).unwrap().to_vec1().unwrap();
        let mut out: Vec<u32> = Vec::new();
        for _ in 0..steps {
            let mut l = logits.clone();
            for &(t, b) in bias {
                l[t as usize] += b;
            }
            for (t, v) in l.iter_mut().enumerate() {
                if prompt.contains(&(t as u32)) || out.contains(&(t as u32)) {
                    *v = if *v > 0.0 { *v / rep } else { *v * rep };
                }
                let count = out.iter().filter(|&&x| x as usize == t).count() as f32;
                *v -= count * frequency + if count > 0.0 { presence } else { 0.0 };
                if out.len() < min_tokens && banned.contains(&(t as u32)) {
                    *v = f32::NEG_INFINITY;
                }
            }
            let next = dms_integration::engine::argmax(&l);
            out.push(next);
            if stop_ids.contains(&next) {
                break;
            }
            logits = eng.step(&mut seq, &[next], false).unwrap().squeeze(0).unwrap().to_vec1().unwrap();
        }
        seq.release(&mut eng.store);
        out
    };
    let mut naive = |bias: &[(u32, f32)], presence: f32, frequency: f32| {
        naive_with(&prompt, bias, presence, frequency, 1.0, &[], 0, &[])
    };
    // This model repeats one token greedily: a presence penalty below its margin leaves it, a
    // frequency penalty of the same size grows with each repeat until another token wins.
    let plain = naive(&[], 0.0, 0.0);
    let presence = naive(&[], 0.1, 0.0);
    let frequency = naive(&[], 0.0, 0.1);
    assert_ne!(presence, frequency, "the two penalties differ on this answer");
    assert_ne!(plain, frequency, "the penalty changes this greedy answer");
    let forced = naive(&[(300, 100.0)], 0.0, 0.0);
    assert_eq!(forced, vec![300; steps]);
    let repetition = naive_with(&prompt, &[], 0.0, 0.0, 1.3, &[], 0, &[]);
    assert_ne!(plain, repetition, "the repetition penalty changes this greedy answer");
    // The repetition penalty reaches the prompt's tokens: with the repeated token in the prompt,
    // it is penalised from the first step.
    let with_it: Vec<u32> = prompt.iter().copied().chain([plain[0]]).collect();
    let prompt_penalised = naive_with(&with_it, &[], 0.0, 0.0, 1.3, &[], 0, &[]);
    let unpenalised = naive_with(&with_it, &[], 0.0, 0.0, 1.0, &[], 0, &[]);
    assert_ne!(prompt_penalised[0], unpenalised[0], "the penalty on a prompt token changes the first choice");
    // The token the greedy answer repeats ends it at once; held off for 5 tokens, other tokens
    // come first.
    let stopped = naive_with(&prompt, &[], 0.0, 0.0, 1.0, &[], 0, &[plain[0]]);
    assert_eq!(stopped, vec![plain[0]]);
    let held = naive_with(&prompt, &[], 0.0, 0.0, 1.0, &[plain[0]], 5, &[plain[0]]);
    assert!(held.len() > 5 && !held[..5].contains(&plain[0]), "{held:?}");
    let server = tiny_llama3_server("bias");
    let ask = |extra: serde_json::Value| {
        let mut body =
            serde_json::json!({"model": "tiny", "prompt": "Hello world", "max_tokens": steps, "ignore_eos": true});
        body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        post_json(&server.base, "/v1/completions", &body)
    };
    for (extra, want) in [
        (serde_json::json!({}), &plain),
        (serde_json::json!({"presence_penalty": 0.1}), &presence),
        (serde_json::json!({"frequency_penalty": 0.1}), &frequency),
        (serde_json::json!({"logit_bias": {"300": 100}}), &forced),
        (serde_json::json!({"repetition_penalty": 1.3}), &repetition),
        // vLLM's filters: only the most likely token is left, whatever the temperature.
        (serde_json::json!({"temperature": 1.5, "top_k": 1, "seed": 3}), &plain),
        (serde_json::json!({"temperature": 1.5, "min_p": 1.0, "seed": 3}), &plain),
        (serde_json::json!({"stop_token_ids": [plain[0]]}), &stopped),
        (serde_json::json!({"min_tokens": 5, "stop_token_ids": [plain[0]]}), &held),
    ] {
        let (status, r) = ask(extra.clone());
        assert_eq!(status, 200, "{r}");
        assert_eq!(r["choices"][0]["text"], tok.decode(want, false).unwrap().as_str(), "{extra}: {r}");
        let reason = if want.len() < steps { "stop" } else { "length" };
        assert_eq!(r["choices"][0]["finish_reason"], reason, "{extra}: {r}");
    }
    let body = serde_json::json!({"model": "tiny", "prompt": with_it, "max_tokens": steps, "ignore_eos": true,
                                  "repetition_penalty": 1.3});
    let (status, r) = post_json(&server.base, "/v1/completions", &body);
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["choices"][0]["text"], tok.decode(&prompt_penalised, false).unwrap().as_str(), "{r}");
    for (extra, field) in [
        (serde_json::json!({"logit_bias": {"300": 101}}), "logit_bias"),
        (serde_json::json!({"logit_bias": {"512": 1}}), "logit_bias"),
        (serde_json::json!({"frequency_penalty": -2.5}), "frequency_penalty"),
        (serde_json::json!({"repetition_penalty": 0}), "repetition_penalty"),
        (serde_json::json!({"top_k": -2}), "top_k"),
        (serde_json::json!({"min_p": 1.5}), "min_p"),
        (serde_json::json!({"min_tokens": steps + 1}), "min_tokens"),
        (serde_json::json!({"stop_token_ids": [512]}), "stop_token_ids"),
        (serde_json::json!({"stop_token_ids": 5}), "stop_token_ids"),
    ] {
        let (status, r) = ask(extra);
        assert_eq!(status, 400, "{r}");
        assert_eq!(r["error"]["param"], field, "{r}");
    }
}

/// The data lines of a Server-Sent Events body, parsed, up to `[DONE]`.
fn sse_chunks(body: &str) -> Vec<serde_json::Value> {
    body.lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .take_while(|d| *d != "[DONE]")
        .map(|d| serde_json::from_str(d).unwrap())
        .collect()
}

/// `response_format` and a forced `tool_choice` hold on a model that writes noise: the tiny
/// random-weight Llama 3, sampling at temperature 1 with several seeds and choices, whole and
/// streamed, answers JSON matching the schema (checked by hand here, apart from the grammar
/// engine), and calls exactly the tools it is told to; vLLM's `guided_*` and
/// `structured_outputs` hold the same way in chat and completions.
#[test]
fn structured_outputs_and_forced_tool_calls_hold_on_a_random_model() {
    let server = tiny_llama3_server("structured");
    let schema = serde_json::json!({"type": "object", "properties": {
        "n": {"type": "integer", "minimum": 0, "maximum": 9}, "tag": {"enum": ["red", "green"]}},
        "required": ["n", "tag"], "additionalProperties": false});
    let valid = |text: &str| {
        let v: serde_json::Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text:?}"));
        let o = v.as_object().unwrap_or_else(|| panic!("{text}"));
        assert_eq!(o.len(), 2, "{text}");
        assert!(o["n"].as_u64().is_some_and(|n| n <= 9), "{text}");
        assert!(["red", "green"].contains(&o["tag"].as_str().unwrap()), "{text}");
    };
    let base = serde_json::json!({"model": "tiny", "messages": [{"role": "user", "content": "Hello world"}],
        "max_tokens": 200, "temperature": 1.0});
    let with = |extra: serde_json::Value| {
        let mut b = base.clone();
        b.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        b
    };
    let format = serde_json::json!({"type": "json_schema", "json_schema": {"name": "t", "schema": schema}});
    for seed in 0..4 {
        let (status, r) = post_json(
            &server.base,
            "/v1/chat/completions",
            &with(serde_json::json!({"response_format": format, "seed": seed, "n": 2})),
        );
        assert_eq!(status, 200, "{r}");
        for choice in r["choices"].as_array().unwrap() {
            assert_eq!(choice["finish_reason"], "stop", "{r}");
            valid(choice["message"]["content"].as_str().unwrap());
        }
    }
    // Streamed, the pieces join into a valid answer.
    let (status, body) = post(
        &server.base,
        "/v1/chat/completions",
        &with(serde_json::json!({"response_format": format, "stream": true})),
    );
    assert_eq!(status, 200, "{body}");
    let text: String =
        sse_chunks(&body).iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect::<String>();
    valid(&text);
    // json_object: any object. Its strings are unbounded, so a random model may run out of
    // tokens inside one (`length`); every answer that ends by itself is an object.
    let mut ended = 0;
    for seed in 0..6 {
        let extra = serde_json::json!({"response_format": {"type": "json_object"}, "seed": seed});
        let (_, r) = post_json(&server.base, "/v1/chat/completions", &with(extra));
        let choice = &r["choices"][0];
        if choice["finish_reason"] == "stop" {
            let text = choice["message"]["content"].as_str().unwrap();
            let any: serde_json::Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {r}"));
            assert!(any.is_object(), "{r}");
            ended += 1;
        }
    }
    assert!(ended > 0, "no json_object answer ended within 200 tokens");

    // vLLM's structured outputs, in chat and in completions: a choice, a regular expression
    // (checked by hand), a schema in `structured_outputs` and a Lark grammar.
    let completion = |extra: serde_json::Value| {
        let mut b = serde_json::json!({"model": "tiny", "prompt": "Hello world", "max_tokens": 60, "temperature": 1.0});
        b.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        b
    };
    let choices = ["red", "green", "light blue"];
    let digits = |t: &str| {
        let (d, tail) = t.split_once('/').unwrap_or(("", ""));
        (1..=3).contains(&d.len()) && d.bytes().all(|b| b.is_ascii_digit()) && tail == "x"
    };
    for seed in 0..3 {
        let extra = serde_json::json!({"guided_choice": choices, "seed": seed, "n": 2});
        let (status, r) = post_json(&server.base, "/v1/chat/completions", &with(extra));
        assert_eq!(status, 200, "{r}");
        for choice in r["choices"].as_array().unwrap() {
            assert_eq!(choice["finish_reason"], "stop", "{r}");
            assert!(choices.contains(&choice["message"]["content"].as_str().unwrap()), "{r}");
        }
        let extra = serde_json::json!({"guided_regex": "[0-9]{1,3}/x", "seed": seed});
        let (status, r) = post_json(&server.base, "/v1/completions", &completion(extra));
        assert_eq!(status, 200, "{r}");
        assert!(digits(r["choices"][0]["text"].as_str().unwrap()), "{r}");
        let extra = serde_json::json!({"structured_outputs": {"json": schema}, "seed": seed, "max_tokens": 200});
        let (status, r) = post_json(&server.base, "/v1/completions", &completion(extra));
        assert_eq!(status, 200, "{r}");
        valid(r["choices"][0]["text"].as_str().unwrap());
        let lark = "start: \"<\" word (\" \" word)* \">\"\nword: \"ab\" | \"cd\"";
        let extra = serde_json::json!({"guided_grammar": lark, "seed": seed});
        let (status, r) = post_json(&server.base, "/v1/chat/completions", &with(extra));
        assert_eq!(status, 200, "{r}");
        let text = r["choices"][0]["message"]["content"].as_str().unwrap();
        let inner = text.strip_prefix('<').and_then(|t| t.strip_suffix('>')).unwrap_or_else(|| panic!("{r}"));
        assert!(inner.split(' ').all(|w| ["ab", "cd"].contains(&w)), "{r}");
        // The same language in llama.cpp's GBNF, in completions.
        let gbnf = "root ::= \"<\" word (\" \" word)* \">\"  # a list\nword ::= \"ab\" | \"cd\"";
        let extra = serde_json::json!({"structured_outputs": {"grammar": gbnf}, "seed": seed});
        let (status, r) = post_json(&server.base, "/v1/completions", &completion(extra));
        assert_eq!(status, 200, "{r}");
        let text = r["choices"][0]["text"].as_str().unwrap();
        let inner = text.strip_prefix('<').and_then(|t| t.strip_suffix('>')).unwrap_or_else(|| panic!("{r}"));
        assert!(inner.split(' ').all(|w| ["ab", "cd"].contains(&w)), "{r}");
    }
    // Two constraints at once, a malformed one, or one the engine cannot compile: 400 naming it.
    for (extra, field) in [
        (serde_json::json!({"guided_json": schema, "response_format": format}), "guided_json"),
        (serde_json::json!({"guided_regex": "a", "guided_choice": ["a"]}), "guided_choice"),
        (serde_json::json!({"guided_choice": "red"}), "guided_choice"),
        (serde_json::json!({"guided_regex": "(unclosed"}), "guided_regex"),
        (serde_json::json!({"guided_grammar": "root ::= <[5]>"}), "guided_grammar"),
    ] {
        let (status, r) = post_json(&server.base, "/v1/chat/completions", &with(extra.clone()));
        assert_eq!(status, 400, "{extra}: {r}");
        assert_eq!(r["error"]["param"], field, "{extra}: {r}");
    }

    // A named tool: one call to it, its arguments matching its parameters.
    let tools = serde_json::json!([
        {"type": "function", "function": {"name": "paint", "parameters": schema}},
        {"type": "function", "function": {"name": "stop_now", "parameters": {"type": "object", "properties": {}, "additionalProperties": false}}},
    ]);
    let named = serde_json::json!({"type": "function", "function": {"name": "paint"}});
    let (status, r) = post_json(
        &server.base,
        "/v1/chat/completions",
        &with(serde_json::json!({"tools": tools, "tool_choice": named})),
    );
    assert_eq!(status, 200, "{r}");
    let choice = &r["choices"][0];
    // As OpenAI answers a named function: `stop`.
    assert_eq!(choice["finish_reason"], "stop", "{r}");
    assert!(choice["message"]["content"].is_null(), "{r}");
    let calls = choice["message"]["tool_calls"].as_array().unwrap();
    assert_eq!(calls.len(), 1, "{r}");
    assert_eq!(calls[0]["function"]["name"], "paint");
    valid(calls[0]["function"]["arguments"].as_str().unwrap());
    // Required: one or more calls, each to a tool with arguments of its schema; at most one
    // without parallel calls.
    for (seed, parallel) in [(1, true), (2, true), (3, false)] {
        let extra = serde_json::json!({"tools": tools, "tool_choice": "required", "seed": seed, "parallel_tool_calls": parallel});
        let (status, r) = post_json(&server.base, "/v1/chat/completions", &with(extra));
        assert_eq!(status, 200, "{r}");
        let calls = r["choices"][0]["message"]["tool_calls"].as_array().unwrap_or_else(|| panic!("{r}"));
        assert!(!calls.is_empty() && (parallel || calls.len() == 1), "{r}");
        for c in calls {
            let arguments = c["function"]["arguments"].as_str().unwrap();
            match c["function"]["name"].as_str().unwrap() {
                "paint" => valid(arguments),
                "stop_now" => assert_eq!(arguments, "{}"),
                other => panic!("a call to {other}: {r}"),
            }
        }
    }
    // Bad input: 400 naming the field.
    for (extra, path, param) in [
        (
            serde_json::json!({"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "nonsense"}}}}),
            "/v1/chat/completions",
            "response_format",
        ),
        (serde_json::json!({"response_format": {"type": "yaml"}}), "/v1/chat/completions", "response_format"),
        (
            serde_json::json!({"response_format": {"type": "json_object"}, "tools": tools, "tool_choice": "required"}),
            "/v1/chat/completions",
            "response_format",
        ),
        (
            serde_json::json!({"response_format": {"type": "json_object"}, "prompt": "x"}),
            "/v1/completions",
            "response_format",
        ),
        (serde_json::json!({"tools": tools, "prompt": "x"}), "/v1/completions", "tools"),
    ] {
        let (status, r) = post_json(&server.base, path, &with(extra.clone()));
        assert_eq!((status, r["error"]["param"].as_str()), (400, Some(param)), "{extra}: {r}");
    }
}

/// `reasoning_parser`: with DeepSeek R1's rule an answer without `</think>` is all reasoning, so
/// the random model's greedy answer comes back whole as `reasoning_content` (and streamed as
/// `delta.reasoning_content`), equal to the plain server's `content` for the same request;
/// a grammar-forced answer is never split.
#[test]
fn reasoning_is_split_into_reasoning_content_whole_and_streamed() {
    let plain = tiny_llama3_server("plain");
    let thinking = tiny_llama3_server_with("reasoning", "reasoning_parser = \"deepseek_r1\"");
    let body = serde_json::json!({"model": "tiny", "messages": [{"role": "user", "content": "Hello world"}],
        "max_tokens": 12, "temperature": 0});
    let (_, want) = post_json(&plain.base, "/v1/chat/completions", &body);
    let want = want["choices"][0]["message"]["content"].as_str().unwrap().to_string();
    assert!(!want.is_empty() && !want.contains("</think>"));
    let (status, r) = post_json(&thinking.base, "/v1/chat/completions", &body);
    assert_eq!(status, 200, "{r}");
    let message = &r["choices"][0]["message"];
    assert_eq!(message["reasoning_content"], want.as_str(), "{r}");
    assert!(message["content"].is_null(), "{r}");
    let mut streamed = body.clone();
    streamed["stream"] = serde_json::json!(true);
    let (_, text) = post(&thinking.base, "/v1/chat/completions", &streamed);
    let chunks = sse_chunks(&text);
    let part = |key: &str| -> String { chunks.iter().filter_map(|c| c["choices"][0]["delta"][key].as_str()).collect() };
    assert_eq!(part("reasoning_content"), want);
    assert_eq!(part("content"), "");
    let mut forced = body.clone();
    forced["response_format"] = serde_json::json!({"type": "json_object"});
    let (_, r) = post_json(&thinking.base, "/v1/chat/completions", &forced);
    let content = r["choices"][0]["message"]["content"].as_str().unwrap_or_else(|| panic!("{r}"));
    assert!(content.starts_with('{') && r["choices"][0]["message"].get("reasoning_content").is_none(), "{r}");
}

/// Prefix caching end to end: prompts sharing a 40-token header, then the same prompt twice,
/// answered by a server with the cache (the default) and one without. The answers and their
/// log-probabilities agree; `usage.prompt_tokens_details.cached_tokens` (whole and streamed) and
/// `/metrics` count what a hand count of the kept states gives: nothing until a second prompt
/// shows the header is shared, then the header, then the whole repeated prompt.
#[test]
fn prompts_sharing_a_start_take_it_from_the_prefix_cache_with_unchanged_answers() {
    let cached = tiny_llama3_server("prefix");
    let uncached = tiny_llama3_server_with("no-prefix", "prefix_cache = false");
    let ids = |seed: u32, len: u32| (0..len).map(move |i| (i * 7 + seed * 131) % 400 + 50);
    let ask = |seed: u32, len: u32| ids(1, 40).chain(ids(seed, len)).collect::<Vec<u32>>();
    let body = |prompt: &[u32], stream: bool| {
        serde_json::json!({"model": "tiny", "prompt": prompt, "max_tokens": 5, "logprobs": 2, "ignore_eos": true,
            "stream": stream, "stream_options": {"include_usage": stream}})
    };
    let prompts = [ask(2, 7), ask(4, 6), ask(5, 9), ask(5, 9), ask(5, 9)];
    let mut got = Vec::new();
    for p in &prompts {
        let (status, r) = post_json(&cached.base, "/v1/completions", &body(p, false));
        assert_eq!(status, 200, "{r}");
        let (status, want) = post_json(&uncached.base, "/v1/completions", &body(p, false));
        assert_eq!(status, 200, "{want}");
        assert_eq!(want["usage"]["prompt_tokens_details"]["cached_tokens"], 0, "{want}");
        assert_eq!(r["choices"][0]["text"], want["choices"][0]["text"], "{r}\n{want}");
        let values = |r: &serde_json::Value| -> Vec<f64> {
            let lp = r["choices"][0]["logprobs"]["token_logprobs"].as_array().unwrap().clone();
            lp.iter().map(|v| v.as_f64().unwrap()).collect()
        };
        for (a, b) in values(&r).iter().zip(values(&want)) {
            assert!((a - b).abs() < 1e-4, "{r}\n{want}");
        }
        got.push(r["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64().unwrap());
    }
    assert_eq!(got, [0, 0, 40, 40, 49]);
    // Streamed, the usage chunk says the same.
    let (status, sse) = post(&cached.base, "/v1/completions", &body(&prompts[4], true));
    assert_eq!(status, 200, "{sse}");
    let usage = sse_chunks(&sse).into_iter().find_map(|c| c.get("usage").cloned()).expect("a usage chunk");
    assert_eq!(usage["prompt_tokens_details"]["cached_tokens"], 49, "{sse}");
    // Idle, the pool holds the kept states and nothing else (the gauges are set after the step
    // that answered, so they are read until the engine has gone idle).
    let gauge = |metrics: &str, name: &str| -> f64 {
        let line = metrics.lines().find(|l| l.starts_with(&format!("{name} "))).unwrap();
        line.rsplit(' ').next().unwrap().parse().unwrap()
    };
    let mut metrics = String::new();
    for _ in 0..100 {
        metrics = http(&cached.base, "GET", "/metrics", "").1;
        if gauge(&metrics, "dms_requests_running") == 0.0 && gauge(&metrics, "dms_requests_waiting") == 0.0 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let gauge = |name: &str| gauge(&metrics, name);
    let total = 40 + 40 + 49 + 49;
    assert!(metrics.contains(&format!("dms_prompt_tokens_cached_total{{policy=\"full\"}} {total}")), "{metrics}");
    assert!(gauge("dms_prefix_cache_states") > 0.0, "{metrics}");
    assert!(gauge("dms_prefix_cache_bytes_allocated") > 0.0, "{metrics}");
    assert_eq!(gauge("dms_prefix_cache_bytes_allocated"), gauge("dms_kv_cache_bytes_allocated"), "{metrics}");
    assert_eq!(gauge("dms_prefix_cache_bytes_live"), gauge("dms_kv_cache_bytes_live"), "{metrics}");
}

/// `/tokenize` gives llama.cpp's ids for a completion prompt (with and without the BOS the
/// tokenizer adds) and, for chat messages, exactly as many tokens as a chat completion of them
/// reports; `/detokenize` gives the text back. Bad ids, models and bodies are refused.
#[test]
fn tokenize_and_detokenize_agree_with_llama_cpp_and_the_chat_route() {
    let (_, ids) = hello_world();
    let server = tiny_llama3_server("tokenize");
    let (status, r) =
        post_json(&server.base, "/tokenize", &serde_json::json!({"model": "tiny", "prompt": "Hello world"}));
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["tokens"], serde_json::json!(ids), "{r}");
    assert_eq!(r["count"], ids.len(), "{r}");
    assert_eq!(r["max_model_len"], 512, "{r}");
    let body = serde_json::json!({"model": "tiny", "prompt": "Hello world", "add_special_tokens": false,
        "return_token_strs": true});
    let (status, r) = post_json(&server.base, "/tokenize", &body);
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["tokens"], serde_json::json!(ids[1..]), "{r}");
    assert_eq!(r["token_strs"].as_array().unwrap().len(), ids.len() - 1, "{r}");
    let messages =
        serde_json::json!([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello world"}]);
    let (status, r) = post_json(&server.base, "/tokenize", &serde_json::json!({"model": "tiny", "messages": messages}));
    assert_eq!(status, 200, "{r}");
    let body = serde_json::json!({"model": "tiny", "messages": messages, "max_tokens": 1});
    let (status, chat) = post_json(&server.base, "/v1/chat/completions", &body);
    assert_eq!(status, 200, "{chat}");
    assert_eq!(r["count"], chat["usage"]["prompt_tokens"], "{r}\n{chat}");
    let (status, r) = post_json(&server.base, "/detokenize", &serde_json::json!({"model": "tiny", "tokens": ids[1..]}));
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["prompt"], "Hello world", "{r}");
    for (path, body, code, param) in [
        ("/detokenize", serde_json::json!({"model": "tiny", "tokens": [1, 1_000_000]}), 400, "tokens"),
        ("/tokenize", serde_json::json!({"model": "tiny", "prompt": [3, 1_000_000]}), 400, "prompt"),
        ("/tokenize", serde_json::json!({"model": "tiny"}), 400, ""),
        ("/tokenize", serde_json::json!({"model": "other", "prompt": "x"}), 404, ""),
        ("/detokenize", serde_json::json!({"model": "tiny", "tokens": [-1]}), 400, ""),
    ] {
        let (status, r) = post_json(&server.base, path, &body);
        assert_eq!(status, code, "{path} {body}: {r}");
        if !param.is_empty() {
            assert_eq!(r["error"]["param"], param, "{r}");
        }
    }
}
