//! Model runtimes on candle.

pub mod config;
pub mod gguf_header;
pub mod llama;
pub mod mla;
pub mod moe;
pub mod weights;

pub use config::{Arch, MlaConfig, ModelConfig};
pub use llama::{DecisionSource, Llama, SeqInput};
pub use weights::Weights;
