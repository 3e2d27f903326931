//! Model runtimes on candle.

pub mod config;
pub mod llama;
pub mod weights;

pub use config::{Arch, ModelConfig};
pub use llama::{DecisionSource, Llama, SeqInput};
pub use weights::Weights;
