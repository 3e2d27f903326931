//! Builds policies by name from their TOML table.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::de::DeserializeOwned;

use crate::policies::full::FullParams;
use crate::policies::{FullPolicy, SlidingWindowPolicy};
use crate::{PolicyError, PolicyFactory};

/// Builds a configured policy from its whole TOML table (including `name`).
pub type PolicyBuilder =
    Arc<dyn Fn(&toml::Table) -> Result<Arc<dyn PolicyFactory>, PolicyError> + Send + Sync>;

/// Named policy builders. [`Registry::with_builtins`] knows `full` and `sliding_window`;
/// third parties add theirs with [`Registry::register`].
#[derive(Clone, Default)]
pub struct Registry {
    builders: BTreeMap<String, PolicyBuilder>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry").field("names", &self.names()).finish()
    }
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// A registry holding every policy this crate ships.
    pub fn with_builtins() -> Self {
        let mut r = Self::new();
        r.register("full", |t| {
            parse_params::<FullParams>("full", t)?;
            Ok(Arc::new(FullPolicy))
        });
        r.register("sliding_window", |t| {
            Ok(Arc::new(SlidingWindowPolicy::new(parse_params("sliding_window", t)?)?))
        });
        r
    }

    /// Registers (or replaces) a builder under `name`.
    pub fn register<F>(&mut self, name: &str, builder: F)
    where
        F: Fn(&toml::Table) -> Result<Arc<dyn PolicyFactory>, PolicyError> + Send + Sync + 'static,
    {
        self.builders.insert(name.to_string(), Arc::new(builder));
    }

    /// Registered names, sorted.
    pub fn names(&self) -> Vec<String> {
        self.builders.keys().cloned().collect()
    }

    /// Builds the policy named by the table's `name` key.
    pub fn build(&self, table: &toml::Table) -> Result<Arc<dyn PolicyFactory>, PolicyError> {
        let valid = self.names().join(", ");
        let name = match table.get("name") {
            Some(toml::Value::String(s)) => s.clone(),
            Some(other) => {
                return Err(PolicyError::InvalidParams {
                    policy: other.to_string(),
                    message: "`name` must be a string".into(),
                })
            }
            None => return Err(PolicyError::MissingName { valid }),
        };
        let builder = self
            .builders
            .get(&name)
            .ok_or(PolicyError::UnknownPolicy { name: name.clone(), valid })?;
        builder(table)
    }
}

/// Deserialises a policy table into its parameter struct, turning serde's message into an error
/// that names the policy and the offending key.
pub fn parse_params<T: DeserializeOwned>(policy: &str, table: &toml::Table) -> Result<T, PolicyError> {
    toml::Value::Table(table.clone()).try_into().map_err(|e: toml::de::Error| {
        PolicyError::InvalidParams { policy: policy.into(), message: e.message().trim().to_string() }
    })
}
