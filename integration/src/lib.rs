//! A mistral.rs-style inference engine whose KV cache is driven by a `dms-policy` cache policy.
//!
//! Layers: [`config`] (the engine config file), [`assets`] (fetching the default model),
//! [`model`] (candle runtimes), [`kv_store`] (paged per-head storage), [`cache`] (one sequence's
//! rows and policy), [`attention`] (kernels over the store), [`prefill`] (one-pass prompt prefill
//! with DMS's visibility mask in tensor ops, any device), [`engine`] (loading, executing steps), [`generation`] (one request through the scheduler),
//! [`trace`] (JSON Lines traces), [`scheduler`] (continuous batching with admission by free memory),
//! [`split_plan`] (how many splits a GPU decode-attention grid uses), [`serve`] (the OpenAI-compatible
//! server), [`chat_template`] (the model's chat template).

pub mod ab;
pub mod assets;
pub mod attention;
pub mod bench_grid;
pub mod cache;
pub mod chat_template;
pub mod config;
pub mod corpus;
pub mod device_policy;
pub mod engine;
pub mod eval;
pub mod export;
pub mod generation;
pub mod gguf_tokenizer;
#[cfg(feature = "cuda")]
pub mod gpu;
pub mod kv_store;
pub mod model;
#[cfg(feature = "mistralrs")]
pub mod peer_mistralrs;
pub mod prefill;
pub mod retrofit;
pub mod runner;
pub mod scheduler;
pub mod serve;
pub mod split_plan;
pub mod trace;
