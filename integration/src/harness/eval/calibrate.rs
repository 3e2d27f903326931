//! Calibration: the knob value of a policy family whose measured compression ratio is within
//! tolerance of a target.

use anyhow::Result;

use super::{Calibration, Family};

pub(super) fn knob_value(f: &Family, x: f64) -> toml::Value {
    if f.integer {
        toml::Value::Integer(x.round() as i64)
    } else {
        toml::Value::Float(x)
    }
}

/// Finds the knob whose measured CR is closest to `target`, evaluating with `measure` (which
/// caches), by bracketing and regula falsi on ln CR alternating with bisection. Returns (knob,
/// matched).
pub(super) fn calibrate(
    f: &Family,
    target: f64,
    cal: &Calibration,
    start: Option<f64>,
    mut measure: impl FnMut(f64) -> Result<f64>,
) -> Result<(f64, bool)> {
    let snap = |x: f64| if f.integer { x.round() } else { x };
    let err = |cr: f64| cr.ln() - target.ln();
    let (mut lo, mut hi) = (snap(f.range[0]), snap(f.range[1]));
    let mut best = (f64::INFINITY, lo);
    let note = |x: f64, e: f64, best: &mut (f64, f64)| {
        if e.abs() < best.0 {
            *best = (e.abs(), x);
        }
    };
    let mut runs = 0usize;
    if let Some(s) = start {
        let s = snap(s.clamp(lo, hi));
        let e = err(measure(s)?);
        runs += 1;
        note(s, e, &mut best);
        if e.abs() <= (1.0 + cal.tolerance).ln() {
            return Ok((s, true));
        }
    }
    let (mut elo, mut ehi) = (err(measure(lo)?), err(measure(hi)?));
    runs += 2;
    note(lo, elo, &mut best);
    note(hi, ehi, &mut best);
    if elo.signum() == ehi.signum() {
        return Ok((best.1, best.0 <= (1.0 + cal.tolerance).ln()));
    }
    if let Some(s) = start.map(|s| snap(s.clamp(lo, hi))) {
        if s > lo && s < hi {
            let e = err(measure(s)?);
            if e.signum() == elo.signum() {
                (lo, elo) = (s, e);
            } else {
                (hi, ehi) = (s, e);
            }
        }
    }
    // Regula falsi (on ln x for integer knobs, whose CR laws are close to power laws) alternating
    // with bisection, so that the bracket at least halves every two runs.
    let mut falsi = true;
    while runs < cal.max_runs.max(3) && best.0 > (1.0 + cal.tolerance).ln() {
        let t = if falsi { elo / (elo - ehi) } else { 0.5 };
        falsi = !falsi;
        let mut x = if f.integer && lo > 0.0 {
            snap((lo.ln() + t * (hi.ln() - lo.ln())).exp())
        } else {
            snap(lo + t * (hi - lo))
        };
        if x <= lo || x >= hi {
            x = snap((lo + hi) / 2.0);
        }
        if x <= lo || x >= hi {
            break;
        }
        let e = err(measure(x)?);
        runs += 1;
        note(x, e, &mut best);
        tracing::debug!(knob = x, log_cr_error = e, "calibration run");
        if e.signum() == elo.signum() {
            (lo, elo) = (x, e);
        } else {
            (hi, ehi) = (x, e);
        }
    }
    Ok((best.1, best.0 <= (1.0 + cal.tolerance).ln()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn family(integer: bool, range: [f64; 2]) -> Family {
        Family { name: "f".into(), policy: toml::Table::new(), knob: "k".into(), range, integer, targets: None }
    }

    fn cal() -> Calibration {
        Calibration { targets: vec![2.0], tolerance: 0.02, max_runs: 12, prompts: None }
    }

    #[test]
    fn calibration_finds_a_window_for_an_inverse_law() {
        // A sliding window of w keeps w + 4 of 448 tokens: CR = 448 / (w + 4).
        let f = family(true, [8.0, 440.0]);
        for target in [2.0, 4.0, 8.0] {
            let (w, ok) = calibrate(&f, target, &cal(), None, |w| Ok(448.0 / (w + 4.0))).unwrap();
            assert!(ok, "target {target}");
            assert!((448.0 / (w + 4.0) / target - 1.0).abs() <= 0.02, "target {target}: w {w}");
            assert_eq!(w.fract(), 0.0);
        }
    }

    #[test]
    fn calibration_handles_decreasing_maps_and_reports_unreachable_targets() {
        // CR falls with an offset (a logistic threshold), saturating at 1 and 10.
        let f = family(false, [-40.0, 60.0]);
        let cr = |x: f64| 1.0 + 9.0 / (1.0 + (x / 8.0).exp());
        let (x, ok) = calibrate(&f, 4.0, &cal(), Some(0.0), |x| Ok(cr(x))).unwrap();
        assert!(ok && (cr(x) / 4.0 - 1.0).abs() <= 0.02, "x {x}");
        let (_, ok) = calibrate(&f, 20.0, &cal(), None, |x| Ok(cr(x))).unwrap();
        assert!(!ok, "CR 20 is above the family's reach and must be reported as such");
    }
}
