//! Builds policies by name from their TOML table.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::de::DeserializeOwned;

use crate::policies::full::FullParams;
use crate::policies::shadow::ShadowParams;
use crate::policies::{BudgetPolicy, DmsPolicy, FullPolicy, ShadowPolicy, SlidingWindowPolicy};
use crate::{PolicyError, PolicyFactory};

/// Builds a configured policy from its whole TOML table (including `name`).
pub type PolicyBuilder = Arc<dyn Fn(&toml::Table) -> Result<Arc<dyn PolicyFactory>, PolicyError> + Send + Sync>;

/// Named policy builders. [`Registry::with_builtins`] knows `full`, `sliding_window`, `dms` and
/// `shadow` (its `inner` table may name the built-ins);
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
        r.register("dms", |t| Ok(Arc::new(DmsPolicy::new(parse_params("dms", t)?)?)));
        r.register("shadow", |t| {
            let p: ShadowParams = parse_params("shadow", t)?;
            let inner = Registry::with_builtins().build(&p.inner).map_err(|e| PolicyError::InvalidParams {
                policy: "shadow".into(),
                message: format!("`inner`: {e}"),
            })?;
            if inner.signal_need() == crate::SignalNeed::AttentionWeights {
                return Err(PolicyError::InvalidParams {
                    policy: "shadow".into(),
                    message: format!(
                        "`inner` policy `{}` scores keys by attention weights, which exist only for the keys a cache \
                         really keeps; it cannot be shadowed",
                        inner.name()
                    ),
                });
            }
            Ok(Arc::new(ShadowPolicy::new(inner)))
        });
        r.register("tova", |t| Ok(Arc::new(BudgetPolicy::tova(parse_params("tova", t)?)?)));
        r.register("h2o", |t| Ok(Arc::new(BudgetPolicy::h2o(parse_params("h2o", t)?)?)));
        r.register("sliding_window", |t| Ok(Arc::new(SlidingWindowPolicy::new(parse_params("sliding_window", t)?)?)));
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

    /// Checks that the table names a registered policy, without validating its parameters.
    pub fn check_name(&self, table: &toml::Table) -> Result<(), PolicyError> {
        let valid = self.names().join(", ");
        match table.get("name").and_then(|v| v.as_str()) {
            None => Err(PolicyError::MissingName { valid }),
            Some(n) if self.builders.contains_key(n) => Ok(()),
            Some(n) => Err(PolicyError::UnknownPolicy { name: n.to_string(), valid }),
        }
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
        let builder = self.builders.get(&name).ok_or(PolicyError::UnknownPolicy { name: name.clone(), valid })?;
        builder(table)
    }
}

/// Deserialises a policy table into its parameter struct, turning serde's message into an error
/// that names the policy and the offending key.
pub fn parse_params<T: DeserializeOwned>(policy: &str, table: &toml::Table) -> Result<T, PolicyError> {
    let text = toml::to_string(table).unwrap_or_default();
    toml::from_str(&text).map_err(|e: toml::de::Error| {
        let at = e
            .span()
            .and_then(|sp| text.get(..sp.start).map(|before| before.rfind('\n').map_or(0, |i| i + 1)))
            .and_then(|start| text[start..].lines().next())
            .map(|line| format!(" (at `{}`)", line.trim()))
            .unwrap_or_default();
        PolicyError::InvalidParams { policy: policy.into(), message: format!("{}{at}", e.message().trim()) }
    })
}
