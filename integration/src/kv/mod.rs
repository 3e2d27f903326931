//! KV storage: the seam the model's layers talk to ([`backend`]), and on the host the paged block
//! pool ([`store`]), one sequence's rows and policy over it ([`sequence`]), attention that reads
//! only what the store holds ([`attention`], its vector loops in [`vector`], prompt chunks by
//! query tiles in [`tiled`]) and a batch step over them ([`host_step`]).

pub mod attention;
pub mod backend;
pub mod host_step;
pub mod q8_0;
pub mod sequence;
pub mod store;
pub mod tiled;
pub mod vector;
