//! Errors raised while configuring or running a policy.

/// Error from building or running a cache policy.
#[derive(Debug, thiserror::Error, Clone, PartialEq)]
pub enum PolicyError {
    /// The policy table has no `name` key.
    #[error("policy table has no `name` key (valid names: {valid})")]
    MissingName {
        /// Comma-separated list of registered names.
        valid: String,
    },
    /// No policy is registered under that name.
    #[error("unknown cache policy `{name}` (valid names: {valid})")]
    UnknownPolicy {
        /// The name asked for.
        name: String,
        /// Comma-separated list of registered names.
        valid: String,
    },
    /// A parameter of the policy table is invalid.
    #[error("invalid parameters for cache policy `{policy}`: {message}")]
    InvalidParams {
        /// The policy being configured.
        policy: String,
        /// What is wrong, naming the key.
        message: String,
    },
    /// The policy has no form a device cache can execute.
    #[error("cache policy `{policy}` cannot run on the device cache: {why}")]
    NoDeviceForm {
        /// The policy.
        policy: String,
        /// Why not.
        why: String,
    },
    /// The engine called a hook in a way the policy cannot honour.
    #[error("cache policy `{policy}` was driven incorrectly: {message}")]
    Protocol {
        /// The policy.
        policy: String,
        /// What happened.
        message: String,
    },
}
