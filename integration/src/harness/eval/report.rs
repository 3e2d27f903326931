//! The eval report: markdown table, JSON and the quality-vs-CR plot.

use std::path::Path;

use anyhow::Result;
use serde_json::json;

use super::{Cell, EvalConfig, EvalReport, NeedleResult};
use crate::harness::stats::{paired_bootstrap_ci, PromptSums};

/// The first family's cell at a target minus another family's cell at that target, on the same
/// prompts.
pub struct PairedDiff<'a> {
    /// The first family's cell at the target.
    pub first: &'a Cell,
    /// The other family's cell.
    pub other: &'a Cell,
    /// Point differences of top-1 agreement, mean KL and perplexity (first - other).
    pub diff: [f64; 3],
    /// Their 95% paired-bootstrap intervals.
    pub ci: [[f64; 2]; 3],
}

/// A cell's perplexity minus the full cache's on the same prompts, with its 95% paired-bootstrap
/// interval: the perplexity a policy costs, with how hard each prompt is taken out (None in a
/// needle-only eval).
pub fn perplexity_increase(r: &EvalReport, c: &Cell) -> Option<(f64, [f64; 2])> {
    let (q, full) = (c.quality.as_ref()?, r.full_perplexity?);
    Some((q.perplexity - full, paired_bootstrap_ci(&c.per_prompt, &r.full_per_prompt, 0)[2]))
}

/// Every cell against the cell of the first family (in config order) that has the same target,
/// so a grid whose reference policy differs by target (one setting per ratio) pairs each ratio
/// with its own. Empty in a needle-only eval.
pub fn paired_vs_first(r: &EvalReport) -> Vec<PairedDiff<'_>> {
    let mut out = Vec::new();
    for other in &r.cells {
        let Some(first) = r.cells.iter().find(|c| c.target == other.target) else {
            continue;
        };
        let (Some(a), Some(b)) = (&first.quality, &other.quality) else {
            continue;
        };
        if first.family == other.family {
            continue;
        }
        let diff = [a.top1_agreement - b.top1_agreement, a.mean_kl - b.mean_kl, a.perplexity - b.perplexity];
        out.push(PairedDiff { first, other, diff, ci: paired_bootstrap_ci(&first.per_prompt, &other.per_prompt, 0) });
    }
    out
}

/// The markdown report.
pub fn table(cfg: &EvalConfig, r: &EvalReport) -> String {
    let q = &cfg.quality;
    let mut s = format!("Model `{}`; ", cfg.model.source);
    match r.full_perplexity {
        Some(ppl) => s.push_str(&format!(
            "quality: {} held-out prompts of {} tokens + {} teacher-forced tokens ({}); full-cache perplexity {ppl:.2}.\n",
            q.prompts, q.prompt_tokens, q.continuation_tokens, q.corpus
        )),
        None => s.push_str(&format!("the needle test alone (no teacher-forced quality; haystacks from {}).\n", q.corpus)),
    }
    if let (Some(n), Some(fnd)) = (&cfg.needle, &r.full_needle) {
        s.push_str(&format!(
            "Needle: {} trials per context length, pass key at depths {:?} in turn, {:?}-token prompts (ChatML); full cache retrieves {}/{}.\n",
            n.trials.unwrap_or(n.depths.len()), n.depths, n.context_tokens, fnd.hits, fnd.trials
        ));
    }
    let quality = r.full_perplexity.is_some();
    let needle = r.full_needle.is_some();
    s.push_str("\n| policy | target CR | knob |");
    if quality {
        s.push_str(" measured CR | top-1 agree [95% CI] | mean KL [95% CI] | PPL [95% CI] | PPL - full [95% CI] |");
    }
    if needle {
        s.push_str(" needle CR | needle hits |");
    }
    s.push('\n');
    s.push_str(&"|---".repeat(3 + if quality { 5 } else { 0 } + if needle { 2 } else { 0 }));
    s.push_str("|\n");
    let off = |matched: bool| if matched { "" } else { " (off target)" };
    for c in &r.cells {
        let knob = cfg.families.iter().find(|f| f.name == c.family).map(|f| f.knob.as_str()).unwrap_or("");
        s.push_str(&format!("| {} | {} | {knob} = {} |", c.family, c.target, fmt_knob(c.knob)));
        if let (Some(q), Some((rise, rise_ci))) = (&c.quality, perplexity_increase(r, c)) {
            s.push_str(&format!(
                " {:.2}{} | {:.3} [{:.3}, {:.3}] | {:.4} [{:.4}, {:.4}] | {:.2} [{:.2}, {:.2}] | \
                 {rise:+.2} [{:+.2}, {:+.2}] |",
                q.cr,
                off(c.matched),
                q.top1_agreement,
                q.top1_agreement_ci[0],
                q.top1_agreement_ci[1],
                q.mean_kl,
                q.mean_kl_ci[0],
                q.mean_kl_ci[1],
                q.perplexity,
                q.perplexity_ci[0],
                q.perplexity_ci[1],
                rise_ci[0],
                rise_ci[1]
            ));
        }
        if let Some(n) = &c.needle {
            s.push_str(&format!(" {:.2}{} | {}/{} |", n.cr, off(n.matched), n.hits, n.trials));
        }
        s.push('\n');
    }
    let paired = paired_vs_first(r);
    if !paired.is_empty() {
        s.push_str(
            "\nPaired differences, the first family at each target minus each other family at that target, over \
             the same prompts (95% paired bootstrap; an interval that excludes 0 separates the two):\n\n\
             | first | other | target CR | Δ top-1 agree [95% CI] | Δ mean KL [95% CI] | Δ PPL [95% CI] |\n\
             |---|---|---|---|---|---|\n",
        );
        for p in &paired {
            s.push_str(&format!(
                "| {} | {} | {} | {:+.3} [{:+.3}, {:+.3}] | {:+.4} [{:+.4}, {:+.4}] | {:+.2} [{:+.2}, {:+.2}] |\n",
                p.first.family,
                p.other.family,
                p.other.target,
                p.diff[0],
                p.ci[0][0],
                p.ci[0][1],
                p.diff[1],
                p.ci[1][0],
                p.ci[1][1],
                p.diff[2],
                p.ci[2][0],
                p.ci[2][1]
            ));
        }
    }
    s
}

fn fmt_knob(x: f64) -> String {
    if x.fract() == 0.0 {
        format!("{x:.0}")
    } else {
        format!("{x:.3}")
    }
}

/// JSON of the report; a needle-only eval's cells have no quality keys.
pub fn to_json(cfg: &EvalConfig, r: &EvalReport) -> serde_json::Value {
    let per_prompt = |p: &PromptSums| json!({"agree": p.agree, "kl": p.kl, "nll": p.nll, "n": p.n});
    let needle = |n: &NeedleResult| json!({"knob": n.knob, "cr": n.cr, "matched": n.matched, "hits": n.hits, "trials": n.trials, "answers": n.answers});
    let cell = |c: &Cell| {
        let mut v = json!({
            "family": c.family, "target_cr": c.target, "knob": c.knob, "matched": c.matched,
            "needle": c.needle.as_ref().map(needle),
        });
        if let (Some(q), Some((rise, rise_ci))) = (&c.quality, perplexity_increase(r, c)) {
            let fields = json!({
                "cr": q.cr, "top1_agreement": q.top1_agreement, "mean_kl": q.mean_kl,
                "perplexity": q.perplexity, "top1_agreement_ci": q.top1_agreement_ci,
                "mean_kl_ci": q.mean_kl_ci, "perplexity_ci": q.perplexity_ci,
                "perplexity_increase": rise, "perplexity_increase_ci": rise_ci,
                "per_prompt": c.per_prompt.iter().map(per_prompt).collect::<Vec<_>>(),
            });
            if let (Some(o), serde_json::Value::Object(f)) = (v.as_object_mut(), fields) {
                o.extend(f);
            }
        }
        v
    };
    json!({
        "model": cfg.model.source,
        "quality_workload": {"corpus": cfg.quality.corpus, "prompts": cfg.quality.prompts,
            "prompt_tokens": cfg.quality.prompt_tokens, "continuation_tokens": cfg.quality.continuation_tokens},
        "needle_workload": cfg.needle.as_ref().map(|n| json!({"context_tokens": n.context_tokens, "depths": n.depths,
            "trials": n.trials.unwrap_or(n.depths.len())})),
        "calibration_prompts": cfg.calibration.prompts.unwrap_or(cfg.quality.prompts),
        "full": {"perplexity": r.full_perplexity, "needle": r.full_needle.as_ref().map(needle),
            "per_prompt": r.full_per_prompt.iter().map(per_prompt).collect::<Vec<_>>()},
        "calibration_runs": r.runs,
        "cells": r.cells.iter().map(cell).collect::<Vec<_>>(),
        "paired_vs_first": paired_vs_first(r).iter().map(|p| json!({
            "first": p.first.family, "other": p.other.family, "target_cr": p.other.target,
            "top1_agreement_diff": p.diff[0], "top1_agreement_diff_ci": p.ci[0],
            "mean_kl_diff": p.diff[1], "mean_kl_diff_ci": p.ci[1],
            "perplexity_diff": p.diff[2], "perplexity_diff_ci": p.ci[2],
        })).collect::<Vec<_>>(),
    })
}

/// One panel of the plot: each family's points (measured CR, figure).
struct Panel {
    title: &'static str,
    y_label: &'static str,
    y_max: f64,
    series: Vec<(String, Vec<(f64, f64)>)>,
}

/// Each family's points of one figure, in family order, sorted by CR.
fn series(r: &EvalReport, point: impl Fn(&Cell) -> Option<(f64, f64)>) -> Vec<(String, Vec<(f64, f64)>)> {
    let mut out: Vec<(String, Vec<(f64, f64)>)> = Vec::new();
    for c in &r.cells {
        let Some(p) = point(c) else { continue };
        match out.iter_mut().find(|(f, _)| *f == c.family) {
            Some((_, pts)) => pts.push(p),
            None => out.push((c.family.clone(), vec![p])),
        }
    }
    out.iter_mut().for_each(|(_, pts)| pts.sort_by(|a, b| a.0.total_cmp(&b.0)));
    out
}

/// Draws mean KL and top-1 agreement against measured CR, one line per family, as SVG (in a
/// needle-only eval: the needle retrieval rate against the needle runs' measured CR).
pub fn plot(r: &EvalReport, path: &Path) -> Result<()> {
    let panels = if r.full_perplexity.is_some() {
        let kl = series(r, |c| c.quality.as_ref().map(|q| (q.cr, q.mean_kl)));
        let max_kl = kl.iter().flat_map(|(_, p)| p).map(|p| p.1).fold(1e-3, f64::max) * 1.1;
        vec![
            Panel {
                title: "mean KL(full || policy) vs measured CR",
                y_label: "mean KL (nats)",
                y_max: max_kl,
                series: kl,
            },
            Panel {
                title: "top-1 agreement with the full cache vs measured CR",
                y_label: "top-1 agreement",
                y_max: 1.02,
                series: series(r, |c| c.quality.as_ref().map(|q| (q.cr, q.top1_agreement))),
            },
        ]
    } else {
        vec![Panel {
            title: "needle retrieval vs measured CR",
            y_label: "pass keys retrieved (fraction of trials)",
            y_max: 1.02,
            series: series(r, |c| c.needle.as_ref().map(|n| (n.cr, n.hits as f64 / n.trials.max(1) as f64))),
        }]
    };
    draw(&panels, path)
}

fn draw(panels: &[Panel], path: &Path) -> Result<()> {
    use plotters::prelude::*;
    let e = |e: &dyn std::fmt::Display| anyhow::anyhow!("plot: {e}");
    let root = SVGBackend::new(path, (550 * panels.len() as u32, 460)).into_drawing_area();
    root.fill(&WHITE).map_err(|x| e(&x))?;
    let areas = root.split_evenly((1, panels.len()));
    let max_cr = panels.iter().flat_map(|p| &p.series).flat_map(|(_, s)| s).map(|p| p.0).fold(1.0, f64::max) * 1.1;
    for (area, panel) in areas.iter().zip(panels) {
        let mut chart = ChartBuilder::on(area)
            .caption(panel.title, ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(55)
            .build_cartesian_2d(1f64..max_cr, 0f64..panel.y_max)
            .map_err(|x| e(&x))?;
        chart.configure_mesh().x_desc("measured compression ratio").y_desc(panel.y_label).draw().map_err(|x| e(&x))?;
        for (i, (fam, pts)) in panel.series.iter().enumerate() {
            let color = Palette99::pick(i).to_rgba();
            chart
                .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))
                .map_err(|x| e(&x))?
                .label(fam.clone())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
            chart.draw_series(pts.iter().map(|p| Circle::new(*p, 4, color.filled()))).map_err(|x| e(&x))?;
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(|x| e(&x))?;
    }
    root.present().map_err(|x| e(&x))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::harness::eval::Quality;

    /// Prompts of `n` tokens, each with `nll` nats per token.
    fn prompts(nll: f64, lengths: &[f64]) -> Vec<PromptSums> {
        lengths.iter().map(|&n| PromptSums { agree: n, kl: 0.0, nll: nll * n, n }).collect()
    }

    /// With a per-token NLL of `a` for the full cache and `a + d` for the policy on every prompt,
    /// every resample pools to exp(a + d) - exp(a): the interval is that point, whatever the draw.
    #[test]
    fn a_constant_per_token_nll_gap_gives_a_point_perplexity_increase() {
        let lengths = [64.0, 50.0, 64.0, 30.0, 64.0, 17.0];
        let (a, d) = (3.2, 0.07);
        let per_prompt = prompts(a + d, &lengths);
        let quality = Some(Quality { perplexity: (a + d).exp(), ..Quality::default() });
        let cell =
            Cell { family: "p".into(), target: 4.0, knob: 1.0, matched: true, quality, per_prompt, needle: None };
        let r = EvalReport {
            full_perplexity: Some(a.exp()),
            full_per_prompt: prompts(a, &lengths),
            full_needle: None,
            cells: vec![cell],
            runs: BTreeMap::new(),
        };
        let (rise, [lo, hi]) = perplexity_increase(&r, &r.cells[0]).unwrap();
        let want = (a + d).exp() - a.exp();
        assert!((rise - want).abs() < 1e-9, "{rise} vs {want}");
        assert!((lo - want).abs() < 1e-9 && (hi - want).abs() < 1e-9, "[{lo}, {hi}] vs {want}");
    }

    /// A cell of family `family` at `target` whose prompts all have `nll` nats per token.
    fn cell(family: &str, target: f64, nll: f64) -> Cell {
        let quality = Some(Quality { perplexity: nll.exp(), mean_kl: nll, ..Quality::default() });
        let per_prompt = prompts(nll, &[64.0, 32.0, 64.0]);
        Cell { family: family.into(), target, knob: 1.0, matched: true, quality, per_prompt, needle: None }
    }

    /// One learned setting per ratio listed first: each ratio's cells pair with the first family
    /// that has that ratio, never with a cell of another ratio or with themselves.
    #[test]
    fn each_target_pairs_with_the_first_family_that_has_it() {
        let r = EvalReport {
            full_perplexity: Some(1.0),
            full_per_prompt: prompts(0.0, &[64.0, 32.0, 64.0]),
            full_needle: None,
            cells: vec![cell("a", 4.0, 1.0), cell("b", 8.0, 2.0), cell("c", 4.0, 1.5), cell("c", 8.0, 2.5)],
            runs: BTreeMap::new(),
        };
        let pairs: Vec<_> = paired_vs_first(&r)
            .iter()
            .map(|p| (p.first.family.clone(), p.other.family.clone(), p.other.target))
            .collect();
        assert_eq!(pairs, [("a".into(), "c".into(), 4.0), ("b".into(), "c".into(), 8.0)]);
        let p = &paired_vs_first(&r)[1];
        let want = 2.0f64.exp() - 2.5f64.exp();
        assert!((p.diff[2] - want).abs() < 1e-9 && (p.ci[2][0] - want).abs() < 1e-9, "{:?} vs {want}", p.ci[2]);
    }
}
