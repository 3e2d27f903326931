//! Model runtimes on candle: config, weights, tokenizer and chat template, the per-head Llama
//! family, DeepSeek latent attention and MoE (GPT-OSS's too), dense or quantized weight matrices,
//! and the masked prompt pass.

mod block_kernel;
pub mod chat_template;
pub mod config;
pub mod fp8;
mod fused;
pub mod gguf_header;
mod gguf_meta;
mod gguf_names;
pub mod gguf_tokenizer;
pub mod linear;
pub mod llama;
pub mod lora;
pub mod mla;
pub mod moe;
pub mod mxfp4;
mod oai_experts;
pub mod prefill;
pub mod py_json;
pub mod q4_1;
pub mod shapes;
pub mod weights;

pub use config::{Arch, MlaConfig, ModelConfig};
pub use llama::{DecisionSource, Llama, StepInputs};
pub use weights::{WeightForm, Weights};
