//! What the device (GPU) cache executes for an engine config's policy table. The CUDA path keeps
//! its DMS bookkeeping in kernels and supports `full` and `dms` with the model's learned
//! decisions or random decisions at a set rate; every other policy (`sliding_window`, `shadow`,
//! key-norm DMS) runs on the host store.

use anyhow::{bail, Context, Result};
use dms_policy::policies::dms::{DecisionKind, DmsParams};
use dms_policy::policies::DmsPolicy;

use crate::prefill::PromptFlags;

/// A policy the device cache can execute.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DevicePolicy {
    /// DMS delay W (0 for a full cache).
    pub window: usize,
    /// Which tokens are flagged, in the prompt and in every decode step.
    pub flags: PromptFlags,
}

/// Maps a resolved policy table (after `runner::resolve_policy_table`) to the device cache, or
/// says why the policy needs the host store.
pub fn device_policy(table: &toml::Table) -> Result<DevicePolicy> {
    let name = table.get("name").and_then(|v| v.as_str()).unwrap_or("");
    match name {
        "full" => Ok(DevicePolicy { window: 0, flags: PromptFlags::None }),
        "dms" => {
            let params: DmsParams = table.clone().try_into().context("[cache.policy]")?;
            let p = DmsPolicy::new(params).context("[cache.policy]")?;
            let window = p.window() as usize;
            let flags = match (p.eviction_disabled(), p.decision()) {
                (true, _) => PromptFlags::None,
                (false, DecisionKind::Model) => {
                    let (scale, offset) = p.alpha();
                    PromptFlags::Learned { scale, offset }
                }
                (false, DecisionKind::Random) => {
                    let (seed, rate) = p.random_decisions();
                    PromptFlags::Random { seed, rate }
                }
                (false, DecisionKind::KeyNorm) => {
                    bail!(
                        "dms with key-norm decisions runs on the host store only (the GPU path has no key-norm signal)"
                    )
                }
            };
            Ok(DevicePolicy { window, flags })
        }
        other => bail!("policy `{other}` runs on the host store only (the GPU path executes `full` and `dms`)"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(text: &str) -> toml::Table {
        toml::from_str(text).unwrap()
    }

    #[test]
    fn full_and_dms_map_to_the_device_and_the_rest_is_named() {
        assert_eq!(device_policy(&table("name = 'full'")).unwrap().flags, PromptFlags::None);
        let learned =
            device_policy(&table("name = 'dms'\nwindow = 16\nalpha_scale = 50.0\nalpha_offset = 2.0")).unwrap();
        assert_eq!(learned, DevicePolicy { window: 16, flags: PromptFlags::Learned { scale: 50.0, offset: 2.0 } });
        let random =
            device_policy(&table("name = 'dms'\nwindow = 8\ndecision = 'random'\nevict_rate = 0.7\nseed = 3")).unwrap();
        assert_eq!(random.flags, PromptFlags::Random { seed: 3, rate: 0.7 });
        let off = device_policy(&table("name = 'dms'\nwindow = 8\ndisable_eviction = true")).unwrap();
        assert_eq!(off.flags, PromptFlags::None);
        let e = device_policy(&table("name = 'sliding_window'\nwindow = 8")).unwrap_err();
        assert!(e.to_string().contains("sliding_window"), "{e}");
        let e = device_policy(&table("name = 'dms'\nwindow = 8\ndecision = 'key_norm'")).unwrap_err();
        assert!(e.to_string().contains("key-norm"), "{e:#}");
        let e = device_policy(&table("name = 'dms'\nwindow = 8\ndecision = 'random'")).unwrap_err();
        assert!(format!("{e:#}").contains("evict_rate"), "{e:#}");
    }
}
