//! `[server]`: where the server listens, how much it accepts, and the cache policies a request may
//! choose.

use anyhow::{bail, Result};
use serde::Deserialize;

/// Environment variable that sets (and overrides) `[server] api_key`.
pub const API_KEY_ENV: &str = "DMS_API_KEY";

/// Longest timeout or grace period accepted, in seconds (one year: "no limit" in practice, and
/// far from the overflow of a deadline computed from now).
pub const MAX_SECS: u64 = 365 * 24 * 3600;

/// `[server]` of an engine config.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerSection {
    /// Address to bind (loopback unless told otherwise).
    #[serde(default = "default_host")]
    pub host: String,
    /// TCP port (0: any free port, printed at start).
    #[serde(default = "default_port")]
    pub port: u16,
    /// Sequences decoding at once at most.
    #[serde(default = "default_max_batch")]
    pub max_batch: usize,
    /// Requests waiting for admission at most; beyond that a request is answered 429.
    #[serde(default = "default_max_waiting")]
    pub max_waiting: usize,
    /// Seconds a request may take from arrival to its last token.
    #[serde(default = "default_timeout")]
    pub request_timeout_secs: u64,
    /// Largest request body in bytes (larger: 413).
    #[serde(default = "default_body")]
    pub max_body_bytes: usize,
    /// Largest `max_tokens` a request may ask for.
    #[serde(default = "default_cap")]
    pub max_tokens_cap: usize,
    /// Seconds in-flight requests may run on after SIGTERM / ctrl-c before they are cancelled.
    #[serde(default = "default_grace")]
    pub shutdown_grace_secs: u64,
    /// When set (or `DMS_API_KEY` is), every route but `/health` needs `Authorization: Bearer KEY`.
    #[serde(default)]
    pub api_key: Option<String>,
    /// The model id clients send and `/v1/models` lists (default: `[model] source`).
    #[serde(default)]
    pub model_name: Option<String>,
    /// The policy of requests that name none (default: the first of `policies`).
    #[serde(default)]
    pub default_policy: Option<String>,
    /// A Jinja chat template file used in place of the model's (as vLLM's `--chat-template`);
    /// a relative path is from the config file's folder.
    #[serde(default)]
    pub chat_template: Option<std::path::PathBuf>,
    /// How tool calls are read from answers: `auto` (the format the chat template teaches),
    /// `hermes`, `llama3_json`, `mistral`, `deepseek_v3`, `openai` (GPT-OSS's harmony calls,
    /// with `reasoning_parser = "openai_gptoss"`), or `none` (requests with tools and
    /// `tool_choice: auto` are refused).
    #[serde(default = "default_tool_parser")]
    pub tool_parser: String,
    /// How a thinking model's reasoning is split from its answer into `reasoning_content`:
    /// `none` (the default: reasoning stays in `content`), `qwen3`, `deepseek_r1` or
    /// `openai_gptoss` (GPT-OSS's harmony channels).
    #[serde(default = "default_reasoning_parser")]
    pub reasoning_parser: String,
    /// Keep sequence states in the pool for later prompts that start with the same tokens under
    /// the same policy (a chat's next turn, a shared system prompt, a repeated prompt); states
    /// are given back whenever blocks are needed. On by default, as in vLLM.
    #[serde(default = "default_prefix_cache")]
    pub prefix_cache: bool,
    /// Prompt tokens fed per engine step at most (vLLM's chunked prefill): a longer prompt is fed
    /// a part per step while the running requests go on decoding, instead of stalling them for
    /// its whole pass. 0: whole prompts. Host engine only (the device engine feeds whole prompts).
    #[serde(default = "default_prefill_budget")]
    pub prefill_budget: usize,
    /// The cache policies a request may choose with `"cache_policy": NAME`. Empty: the one policy
    /// of `[cache.policy]`, named after it.
    #[serde(default)]
    pub policies: Vec<NamedPolicy>,
}

/// One choosable cache policy.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NamedPolicy {
    /// The name requests use.
    pub name: String,
    /// What `/v1/cache_policies` says of it (default: the policy's own description).
    #[serde(default)]
    pub description: Option<String>,
    /// The policy table, as `[cache.policy]`.
    pub policy: toml::Table,
}

fn default_host() -> String {
    "127.0.0.1".into()
}
fn default_port() -> u16 {
    8080
}
fn default_max_batch() -> usize {
    16
}
fn default_max_waiting() -> usize {
    64
}
fn default_timeout() -> u64 {
    600
}
fn default_body() -> usize {
    1 << 20
}
fn default_cap() -> usize {
    4096
}
fn default_grace() -> u64 {
    5
}
fn default_tool_parser() -> String {
    "auto".into()
}
fn default_reasoning_parser() -> String {
    "none".into()
}

fn default_prefix_cache() -> bool {
    true
}

fn default_prefill_budget() -> usize {
    256
}

impl Default for ServerSection {
    fn default() -> Self {
        toml::from_str("").expect("every key has a default")
    }
}

impl ServerSection {
    /// Range-checks every value and the policy names.
    pub fn validate(&self) -> Result<()> {
        if self.max_batch == 0 {
            bail!("[server] max_batch must be at least 1");
        }
        for (key, secs, least) in [
            ("request_timeout_secs", self.request_timeout_secs, 1),
            ("shutdown_grace_secs", self.shutdown_grace_secs, 0),
        ] {
            if !(least..=MAX_SECS).contains(&secs) {
                bail!("[server] {key} must be between {least} and {MAX_SECS} (one year), not {secs}");
            }
        }
        if self.max_body_bytes < 64 {
            bail!("[server] max_body_bytes must be at least 64");
        }
        if self.max_tokens_cap == 0 {
            bail!("[server] max_tokens_cap must be at least 1");
        }
        if self.host.trim().is_empty() {
            bail!("[server] host is empty");
        }
        if self.api_key.as_deref().is_some_and(|k| k.trim().is_empty()) {
            bail!("[server] api_key is empty: remove it or set a key");
        }
        if self.tool_parser != "auto" {
            crate::serve::tool_calls::ToolFormat::named(&self.tool_parser)
                .map_err(|e| anyhow::anyhow!("[server] {e}"))?;
        }
        crate::serve::reasoning::ReasoningFormat::named(&self.reasoning_parser)
            .map_err(|e| anyhow::anyhow!("[server] {e}"))?;
        if self.tool_parser == "openai" && self.reasoning_parser != "openai_gptoss" {
            bail!(
                "[server] tool_parser = \"openai\" reads calls from GPT-OSS's harmony headers, which only \
                 reasoning_parser = \"openai_gptoss\" reads: set it too"
            );
        }
        let mut seen = std::collections::HashSet::new();
        for p in &self.policies {
            if p.name.trim().is_empty() {
                bail!("[[server.policies]]: a policy has an empty name");
            }
            if !seen.insert(p.name.as_str()) {
                bail!("[[server.policies]]: the name `{}` is used twice", p.name);
            }
        }
        if let Some(d) = &self.default_policy {
            if !self.policies.is_empty() && !seen.contains(d.as_str()) {
                bail!("[server] default_policy `{d}` is not one of [[server.policies]] ({})", self.policy_names());
            }
        }
        Ok(())
    }

    fn policy_names(&self) -> String {
        self.policies.iter().map(|p| p.name.as_str()).collect::<Vec<_>>().join(", ")
    }

    /// The policies to serve, the default first: `policies`, or `[cache.policy]` (`cache_policy`)
    /// under its own name.
    pub fn served_policies(&self, cache_policy: &toml::Table) -> Vec<NamedPolicy> {
        let mut list = if self.policies.is_empty() {
            let name = cache_policy.get("name").and_then(|v| v.as_str()).unwrap_or("full").to_string();
            vec![NamedPolicy { name, description: None, policy: cache_policy.clone() }]
        } else {
            self.policies.clone()
        };
        if let Some(i) = self.default_policy.as_ref().and_then(|d| list.iter().position(|p| &p.name == d)) {
            let default = list.remove(i);
            list.insert(0, default);
        }
        list
    }

    /// The API key from `DMS_API_KEY` or the config.
    pub fn effective_api_key(&self) -> Option<String> {
        std::env::var(API_KEY_ENV).ok().filter(|k| !k.is_empty()).or_else(|| self.api_key.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(s: &str) -> toml::Table {
        toml::from_str(s).unwrap()
    }

    #[test]
    fn the_default_policy_comes_first_and_the_others_keep_their_order() {
        let s: ServerSection = toml::from_str(
            r#"default_policy = "c"
            [[policies]]
            name = "a"
            policy = { name = "full" }
            [[policies]]
            name = "b"
            policy = { name = "full" }
            [[policies]]
            name = "c"
            policy = { name = "full" }"#,
        )
        .unwrap();
        s.validate().unwrap();
        let names: Vec<_> = s.served_policies(&table("name = \"full\"")).into_iter().map(|p| p.name).collect();
        assert_eq!(names, ["c", "a", "b"]);
    }

    #[test]
    fn without_policies_the_cache_policy_is_served_under_its_name() {
        let s = ServerSection::default();
        let got = s.served_policies(&table("name = \"sliding_window\"\nwindow = 8"));
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].name, "sliding_window");
        assert_eq!(got[0].policy.get("window").and_then(|v| v.as_integer()), Some(8));
    }

    #[test]
    fn bad_values_name_their_key() {
        for (text, key) in [
            ("max_batch = 0", "max_batch"),
            ("default_policy = \"x\"\n[[policies]]\nname = \"a\"\npolicy = { name = \"full\" }", "default_policy"),
            ("[[policies]]\nname = \"a\"\npolicy = {}\n[[policies]]\nname = \"a\"\npolicy = {}", "used twice"),
            ("api_key = \" \"", "api_key"),
            ("tool_parser = \"pythonic\"", "tool_parser `pythonic`"),
            ("reasoning_parser = \"granite\"", "reasoning_parser `granite`"),
            ("tool_parser = \"openai\"", "reasoning_parser = \"openai_gptoss\""),
        ] {
            let s: ServerSection = toml::from_str(text).unwrap();
            let e = s.validate().unwrap_err().to_string();
            assert!(e.contains(key), "{text}: {e}");
        }
    }
}
