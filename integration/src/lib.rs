//! A mistral.rs-style inference engine whose KV cache is driven by a `dms-policy` cache policy.
//!
//! Data flows one way: [`engine`] (the scheduler plans, the engine executes) → policy decisions →
//! [`kv`] (host storage) or [`gpu`] (the device cache). [`model`] holds the candle runtimes,
//! [`config`] the engine config file, [`serve`] the OpenAI-compatible server, [`harness`] the
//! A/B, evaluation and benchmark harnesses, [`retrofit`] learning DMS decisions, and [`assets`]
//! fetching models and corpora.

pub mod assets;
pub mod config;
pub mod cpu;
pub mod engine;
pub mod gpu;
pub mod harness;
pub mod kv;
pub mod model;
pub mod retrofit;
pub mod serve;
