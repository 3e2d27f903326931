//! What the device (GPU) cache executes for a policy: the policy's own
//! [`DeviceProgram`](dms_policy::DeviceProgram), so the device path needs no policy names. The
//! CUDA kernels execute a full cache and DMS's delayed window with flags from the model, at a set
//! rate, on every token (`sliding_window`) or from key norms, and attention sinks; a policy
//! without a device program (`tova`, `h2o`, `shadow`, a third-party policy) runs on the host
//! store.

use anyhow::Result;
use candle_core::Tensor;
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

/// Each sequence's raw decision signal `[sequences, kv_heads]` for a step whose sequences run
/// `programs` (in order): the row of `norms` for key-norm decisions, else the row of `scores`;
/// whichever is given when only one is; `None` when neither is.
pub fn raw_signal(
    programs: &[DevicePolicy],
    scores: Option<&Tensor>,
    norms: Option<&Tensor>,
) -> Result<Option<Tensor>> {
    let (Some(scores), Some(norms)) = (scores, norms) else {
        return Ok(scores.or(norms).cloned());
    };
    let rows = programs
        .iter()
        .enumerate()
        .map(|(i, p)| Ok((if p.flags.needs_key_norms() { norms } else { scores }).narrow(0, i, 1)?))
        .collect::<Result<Vec<_>>>()?;
    Ok(Some(Tensor::cat(&rows, 0)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Against a per-row loop: key-norm sequences take their norms, the others their scores.
    #[test]
    fn each_sequence_gets_the_signal_its_program_reads() {
        let dev = candle_core::Device::Cpu;
        let program = |flags| DevicePolicy { window: 4, flags, sinks: 0 };
        let learned = program(FlagSource::Learned { scale: 1.0, offset: 0.0 });
        let norms_rule = program(FlagSource::KeyNorm { scale: 1.0, offset: 0.0 });
        let programs = [learned, norms_rule, program(FlagSource::None), norms_rule];
        let scores = Tensor::arange(0f32, 8.0, &dev).unwrap().reshape((4, 2)).unwrap();
        let norms = Tensor::arange(100f32, 108.0, &dev).unwrap().reshape((4, 2)).unwrap();
        let got = raw_signal(&programs, Some(&scores), Some(&norms)).unwrap().unwrap().to_vec2::<f32>().unwrap();
        let (s, n) = (scores.to_vec2::<f32>().unwrap(), norms.to_vec2::<f32>().unwrap());
        for (i, p) in programs.iter().enumerate() {
            assert_eq!(got[i], if p.flags.needs_key_norms() { n[i].clone() } else { s[i].clone() }, "row {i}");
        }
        let only = raw_signal(&programs, None, Some(&norms)).unwrap().unwrap();
        assert_eq!(only.to_vec2::<f32>().unwrap(), n);
        assert!(raw_signal(&programs, None, None).unwrap().is_none());
    }
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
