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

/// Where a calibration starts: a knob found on other prompts (or at another target's
/// neighbour), and the slope of ln CR against the knob (against ln knob for integer knobs with a
/// positive range) measured there, when known.
#[derive(Debug, Clone, Copy)]
pub(super) struct Start {
    /// The knob to measure first.
    pub knob: f64,
    /// d ln CR / d knob (or d ln knob) near it.
    pub slope: Option<f64>,
}

/// What a calibration found.
#[derive(Debug, Clone, Copy)]
pub(super) struct Calibrated {
    /// The knob whose measured CR is closest to the target.
    pub knob: f64,
    /// Whether that CR is within tolerance.
    pub matched: bool,
    /// The slope of ln CR near the knob (as in [`Start`]): the chord of the last two knobs
    /// measured on either side of the target, else the start's.
    pub slope: Option<f64>,
}

/// A calibration's result as the start of the next one.
pub(super) fn as_start(c: Calibrated) -> Start {
    Start { knob: c.knob, slope: c.slope }
}

/// Finds the knob whose measured CR is closest to `target`, evaluating with `measure` (at most
/// `max_runs` distinct knobs). From a start with a slope it first takes up to two secant steps, so
/// that a start found on other prompts is matched in a run or two; otherwise (or when those do not
/// bracket the target) it measures the range's ends, narrowed by what it has measured. Then
/// regula falsi on ln CR alternating with bisection.
pub(super) fn calibrate(
    f: &Family,
    target: f64,
    cal: &Calibration,
    start: Option<Start>,
    measure: impl FnMut(f64) -> Result<f64>,
) -> Result<Calibrated> {
    let snap = |x: f64| if f.integer { x.round() } else { x };
    let (lo0, hi0) = (snap(f.range[0]), snap(f.range[1]));
    // Integer knobs (windows, budgets) have CR laws close to power laws: work on ln x there.
    let log_knob = f.integer && lo0 >= 1.0;
    let space = |x: f64| if log_knob { x.ln() } else { x };
    let unspace = |u: f64| if log_knob { u.exp() } else { u };
    let tol = (1.0 + cal.tolerance).ln();
    let mut m = Measured { target, points: Vec::new(), max_runs: cal.max_runs.max(3), measure };
    let slope_of = |(xa, ea): (f64, f64), (xb, eb): (f64, f64)| {
        let s = (eb - ea) / (space(xb) - space(xa));
        (s.is_finite() && s != 0.0).then_some(s)
    };
    // A bracket (lower knob, its error), (higher knob, its error) with errors of opposite signs.
    let mut bracket = None;
    if let Some(st) = start {
        let s = snap(st.knob.clamp(lo0, hi0));
        let e = m.probe(s)?;
        if e.abs() <= tol {
            return Ok(m.done(tol, st.slope));
        }
        let (mut a, mut slope) = ((s, e), st.slope.filter(|v| v.is_finite() && *v != 0.0));
        for _ in 0..2 {
            let Some(k) = slope else { break };
            let u = (space(a.0) - a.1 / k).clamp(space(lo0), space(hi0));
            let mut x = snap(unspace(u));
            if x == a.0 && f.integer {
                x = a.0 + (u - space(a.0)).signum();
            }
            if x == a.0 || !(lo0..=hi0).contains(&x) || !m.can_run() {
                break;
            }
            let b = (x, m.probe(x)?);
            if b.1.abs() <= tol {
                return Ok(m.done(tol, slope_of(a, b).or(slope)));
            }
            if b.1.signum() != a.1.signum() {
                bracket = Some(if a.0 < b.0 { (a, b) } else { (b, a) });
                break;
            }
            slope = slope_of(a, b);
            a = b;
        }
    }
    let ((mut lo, mut elo), (mut hi, mut ehi)) = match bracket {
        Some(b) => b,
        None => {
            if m.points.len() + 2 > m.max_runs {
                return Ok(m.done(tol, None));
            }
            let (elo, ehi) = (m.probe(lo0)?, m.probe(hi0)?);
            if elo.signum() == ehi.signum() {
                return Ok(m.done(tol, None));
            }
            // What was measured inside the range narrows its bracket (the map is monotone).
            let (mut l, mut h) = ((lo0, elo), (hi0, ehi));
            for &(x, e) in &m.points {
                if e.signum() == elo.signum() && x > l.0 && x < h.0 {
                    l = (x, e);
                } else if e.signum() == ehi.signum() && x < h.0 && x > l.0 {
                    h = (x, e);
                }
            }
            (l, h)
        }
    };
    // Regula falsi alternating with bisection, so that the bracket at least halves every two runs.
    let mut falsi = true;
    while m.can_run() && m.best().0 > tol {
        let t = if falsi { elo / (elo - ehi) } else { 0.5 };
        falsi = !falsi;
        let mut x = snap(unspace(space(lo) + t * (space(hi) - space(lo))));
        if x <= lo || x >= hi || x.is_nan() {
            x = snap((lo + hi) / 2.0);
        }
        if x <= lo || x >= hi {
            break;
        }
        let e = m.probe(x)?;
        if e.signum() == elo.signum() {
            (lo, elo) = (x, e);
        } else {
            (hi, ehi) = (x, e);
        }
    }
    Ok(m.done(tol, slope_of((lo, elo), (hi, ehi))))
}

/// The knobs one calibration has measured, with their ln CR errors.
struct Measured<F> {
    target: f64,
    points: Vec<(f64, f64)>,
    max_runs: usize,
    measure: F,
}

impl<F: FnMut(f64) -> Result<f64>> Measured<F> {
    /// The error of ln CR at `x` against the target, measured once per knob.
    fn probe(&mut self, x: f64) -> Result<f64> {
        if let Some(&(_, e)) = self.points.iter().find(|p| p.0 == x) {
            return Ok(e);
        }
        let e = (self.measure)(x)?.ln() - self.target.ln();
        tracing::debug!(knob = x, log_cr_error = e, "calibration run");
        self.points.push((x, e));
        Ok(e)
    }

    /// Whether a new knob may still be measured.
    fn can_run(&self) -> bool {
        self.points.len() < self.max_runs
    }

    /// The measured knob nearest the target: (|error|, knob); a NaN error counts as infinite.
    fn best(&self) -> (f64, f64) {
        let abs = |e: f64| if e.is_nan() { f64::INFINITY } else { e.abs() };
        self.points.iter().map(|&(x, e)| (abs(e), x)).fold((f64::INFINITY, f64::NAN), |b, p| {
            if p.0 < b.0 || b.1.is_nan() {
                p
            } else {
                b
            }
        })
    }

    /// The result: the best knob, whether it is within `tol`, and `slope`.
    fn done(&self, tol: f64, slope: Option<f64>) -> Calibrated {
        let (e, knob) = self.best();
        Calibrated { knob, matched: e <= tol, slope }
    }
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
            let c = calibrate(&f, target, &cal(), None, |w| Ok(448.0 / (w + 4.0))).unwrap();
            assert!(c.matched, "target {target}");
            assert!((448.0 / (c.knob + 4.0) / target - 1.0).abs() <= 0.02, "target {target}: w {}", c.knob);
            assert_eq!(c.knob.fract(), 0.0);
        }
    }

    #[test]
    fn calibration_handles_decreasing_maps_and_reports_unreachable_targets() {
        // CR falls with an offset (a logistic threshold), saturating at 1 and 10.
        let f = family(false, [-40.0, 60.0]);
        let cr = |x: f64| 1.0 + 9.0 / (1.0 + (x / 8.0).exp());
        let start = Start { knob: 0.0, slope: None };
        let c = calibrate(&f, 4.0, &cal(), Some(start), |x| Ok(cr(x))).unwrap();
        assert!(c.matched && (cr(c.knob) / 4.0 - 1.0).abs() <= 0.02, "x {}", c.knob);
        let c = calibrate(&f, 20.0, &cal(), None, |x| Ok(cr(x))).unwrap();
        assert!(!c.matched, "CR 20 is above the family's reach and must be reported as such");
    }

    /// Runs `calibrate` counting the distinct knobs it measures.
    fn counted(f: &Family, target: f64, start: Option<Start>, cr: impl Fn(f64) -> f64) -> (Calibrated, usize) {
        let mut seen = Vec::new();
        let c = calibrate(f, target, &cal(), start, |x| {
            if !seen.contains(&x) {
                seen.push(x);
            }
            Ok(cr(x))
        })
        .unwrap();
        (c, seen.len())
    }

    #[test]
    fn a_start_from_other_prompts_is_matched_by_secant_steps() {
        // The full prompt set compresses 15% more than the subset at every knob (offset knob, a
        // logistic law) or 10% less (window knob, an inverse law).
        let offset = family(false, [-10.0, 20.0]);
        let sub = |x: f64| 1.0 + 14.0 / (1.0 + ((x - 6.0) / 3.0).exp());
        let window = family(true, [4.0, 4096.0]);
        let wsub = |w: f64| 2112.0 / (w + 4.0).min(2112.0);
        type Law = Box<dyn Fn(f64) -> f64>;
        let cases: [(&Family, Law, Law); 2] = [
            (&offset, Box::new(sub), Box::new(move |x| 1.15 * sub(x))),
            (&window, Box::new(wsub), Box::new(move |w| 0.9 * wsub(w))),
        ];
        for (f, sub, full) in cases {
            for target in [4.0, 8.0] {
                let (on_sub, _) = counted(f, target, None, &sub);
                assert!(on_sub.matched && on_sub.slope.is_some(), "{}: {on_sub:?}", f.integer);
                let (c, runs) = counted(f, target, Some(as_start(on_sub)), &full);
                assert!(c.matched && (full(c.knob) / target - 1.0).abs() <= 0.02, "{c:?}");
                // The start, one secant step, at most one more.
                assert!(runs <= 3, "{} at CR {target}: {runs} runs", f.integer);
                // Without the slope the range's ends are measured too.
                let (c, plain) = counted(f, target, Some(Start { knob: on_sub.knob, slope: None }), &full);
                assert!(c.matched && plain > runs, "{} at CR {target}: {plain} runs vs {runs}", f.integer);
            }
        }
    }

    #[test]
    fn a_wrong_slope_falls_back_to_the_range() {
        // A slope of the wrong sign steps away from the target: the range's bracket still finds it.
        let f = family(false, [-10.0, 20.0]);
        let cr = |x: f64| 1.0 + 14.0 / (1.0 + ((x - 6.0) / 3.0).exp());
        let (c, _) = counted(&f, 8.0, Some(Start { knob: 0.0, slope: Some(0.3) }), cr);
        assert!(c.matched && (cr(c.knob) / 8.0 - 1.0).abs() <= 0.02, "{c:?}");
        // The previous target's result starts the next one.
        let (c4, _) = counted(&f, 4.0, None, cr);
        let (c8, runs) = counted(&f, 8.0, Some(as_start(c4)), cr);
        assert!(c8.matched && runs <= 4, "{c8:?} in {runs} runs");
    }

    #[test]
    fn max_runs_bounds_the_knobs_measured() {
        // A start that misses with a slope pointing away: however the search goes, it measures
        // at most max_runs distinct knobs and reports its best.
        let f = family(false, [-10.0, 20.0]);
        let cr = |x: f64| 1.0 + 14.0 / (1.0 + ((x - 6.0) / 3.0).exp());
        for max_runs in [3, 4, 5] {
            let cal = Calibration { max_runs, ..cal() };
            let mut n = 0;
            let c = calibrate(&f, 8.0, &cal, Some(Start { knob: 0.0, slope: Some(0.3) }), |x| {
                n += 1;
                Ok(cr(x))
            })
            .unwrap();
            assert!(n <= max_runs && c.knob.is_finite(), "{n} runs with max_runs {max_runs}: {c:?}");
            // A target above the family's reach: no step brackets it, and the range's ends are
            // measured only while the budget lasts.
            let mut n = 0;
            let c = calibrate(&f, 20.0, &cal, Some(Start { knob: 0.0, slope: Some(-0.3) }), |x| {
                n += 1;
                Ok(cr(x))
            })
            .unwrap();
            assert!(n <= max_runs && !c.matched, "{n} runs with max_runs {max_runs}: {c:?}");
        }
    }
}
