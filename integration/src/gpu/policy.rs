//! What the device (GPU) cache executes for a policy: the policy's own
//! [`DeviceProgram`](dms_policy::DeviceProgram), so the device path needs no policy names. The
//! CUDA kernels execute a full cache and DMS's delayed window with flags from the model, at a set
//! rate, on every token (`sliding_window`) or from key norms, and attention sinks; a policy
//! without a device program (`tova`, `h2o`, `shadow`, a third-party policy) runs on the host
//! store.

use anyhow::Result;
use dms_policy::{DeviceProgram, FlagSource, PolicyFactory, Pos};

/// A policy the device cache can execute.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DevicePolicy {
    /// DMS delay W (0 for a full cache).
    pub window: usize,
    /// Which tokens are flagged, in the prompt and in every decode step.
    pub flags: FlagSource,
    /// The first `sinks` positions are never flagged.
    pub sinks: Pos,
}

impl DevicePolicy {
    /// The device form of `policy`, or an error saying why it needs the host store.
    pub fn of(policy: &dyn PolicyFactory) -> Result<Self> {
        Ok(match policy.device_program()? {
            DeviceProgram::KeepAll => DevicePolicy { window: 0, flags: FlagSource::None, sinks: 0 },
            DeviceProgram::DelayedWindow { window, flags, sinks } => DevicePolicy { window, flags, sinks },
        })
    }

    /// Whether token `pos` of row (layer, head) is flagged: never a sink, else
    /// [`FlagSource::flags_token`] (`next_raw` is token `pos + 1`'s raw decision signal).
    pub fn flags_token(&self, layer: usize, head: usize, pos: Pos, next_raw: f32) -> bool {
        pos >= self.sinks && self.flags.flags_token(layer, head, pos, next_raw)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dms_policy::Registry;

    fn device(text: &str) -> Result<DevicePolicy> {
        let table: toml::Table = toml::from_str(text).unwrap();
        DevicePolicy::of(Registry::with_builtins().build(&table)?.as_ref())
    }

    #[test]
    fn full_and_dms_map_to_the_device_and_the_rest_is_named() {
        assert_eq!(device("name = 'full'").unwrap().flags, FlagSource::None);
        let learned = device("name = 'dms'\nwindow = 16\nalpha_scale = 50.0\nalpha_offset = 2.0").unwrap();
        let flags = FlagSource::Learned { scale: 50.0, offset: 2.0 };
        assert_eq!(learned, DevicePolicy { window: 16, flags, sinks: 0 });
        let sinks = device("name = 'dms'\nwindow = 16\nalpha_scale = 50.0\nalpha_offset = 2.0\nsinks = 4").unwrap();
        assert_eq!(sinks, DevicePolicy { window: 16, flags, sinks: 4 });
        let random = device("name = 'dms'\nwindow = 8\ndecision = 'random'\nevict_rate = 0.7\nseed = 3").unwrap();
        assert_eq!(random.flags, FlagSource::Random { seed: 3, rate: 0.7 });
        let off = device("name = 'dms'\nwindow = 8\ndisable_eviction = true").unwrap();
        assert_eq!(off, DevicePolicy { window: 8, flags: FlagSource::None, sinks: 0 });
        let window = device("name = 'sliding_window'\nwindow = 8\nsinks = 4").unwrap();
        assert_eq!(window, DevicePolicy { window: 7, flags: FlagSource::All, sinks: 4 });
        let e = device("name = 'shadow'\ninner = { name = 'dms', window = 8, decision = 'random', evict_rate = 0.5 }")
            .unwrap_err();
        assert!(e.to_string().contains("shadow"), "{e}");
        let norms =
            device("name = 'dms'\nwindow = 8\ndecision = 'key_norm'\nalpha_scale = 1.0\nalpha_offset = 9.0").unwrap();
        assert_eq!(norms.flags, FlagSource::KeyNorm { scale: 1.0, offset: 9.0 });
        let e = device("name = 'dms'\nwindow = 8\ndecision = 'random'").unwrap_err();
        assert!(format!("{e:#}").contains("evict_rate"), "{e:#}");
    }
}
