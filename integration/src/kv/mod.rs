//! KV storage on the host: the paged block pool ([`store`]), one sequence's rows and policy over
//! it ([`sequence`]), and attention that reads only what the store holds ([`attention`]).

pub mod attention;
pub mod sequence;
pub mod store;
