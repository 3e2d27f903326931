//! Confidence intervals for the quality figures: a percentile bootstrap over prompts.
//!
//! Tokens of one prompt are not independent, so the resampling unit is the prompt: each
//! resample draws prompts with replacement and recomputes the pooled statistic from their sums.

use rand::{rngs::StdRng, Rng, SeedableRng};

/// Resamples per interval.
pub const RESAMPLES: usize = 2000;

/// One prompt's sums over its scored tokens.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct PromptSums {
    /// Tokens whose argmax agrees with the full cache's.
    pub agree: f64,
    /// Summed KL(full || policy), nats.
    pub kl: f64,
    /// Summed negative log-likelihood of the true continuation, nats.
    pub nll: f64,
    /// Scored tokens.
    pub n: f64,
}

impl PromptSums {
    /// Adds another prompt's sums.
    pub fn add(&mut self, o: &PromptSums) {
        self.agree += o.agree;
        self.kl += o.kl;
        self.nll += o.nll;
        self.n += o.n;
    }

    /// (top-1 agreement, mean KL, perplexity) pooled over the tokens.
    pub fn pooled(&self) -> [f64; 3] {
        let n = self.n.max(1.0);
        [self.agree / n, self.kl / n, (self.nll / n).exp()]
    }
}

/// 95% percentile-bootstrap intervals of the three pooled figures over `prompts`, in the order of
/// [`PromptSums::pooled`]. Deterministic for a given `seed`.
pub fn bootstrap_ci(prompts: &[PromptSums], seed: u64) -> [[f64; 2]; 3] {
    if prompts.is_empty() {
        return [[f64::NAN; 2]; 3];
    }
    let mut rng = StdRng::seed_from_u64(seed);
    let mut draws: [Vec<f64>; 3] =
        [Vec::with_capacity(RESAMPLES), Vec::with_capacity(RESAMPLES), Vec::with_capacity(RESAMPLES)];
    for _ in 0..RESAMPLES {
        let mut s = PromptSums::default();
        for _ in 0..prompts.len() {
            s.add(&prompts[rng.random_range(0..prompts.len())]);
        }
        for (d, v) in draws.iter_mut().zip(s.pooled()) {
            d.push(v);
        }
    }
    draws.map(|mut d| {
        d.sort_by(f64::total_cmp);
        [percentile(&d, 0.025), percentile(&d, 0.975)]
    })
}

/// 95% percentile-bootstrap intervals of the differences `a - b` of the three pooled figures (in
/// the order of [`PromptSums::pooled`]) between two policies scored on the same prompts: each
/// resample draws prompt indices with replacement and pools both policies over the same draw, so
/// what the prompts share (some are hard for every policy) cancels. Deterministic for a `seed`.
pub fn paired_bootstrap_ci(a: &[PromptSums], b: &[PromptSums], seed: u64) -> [[f64; 2]; 3] {
    if a.is_empty() || a.len() != b.len() {
        return [[f64::NAN; 2]; 3];
    }
    let mut rng = StdRng::seed_from_u64(seed);
    let mut draws: [Vec<f64>; 3] =
        [Vec::with_capacity(RESAMPLES), Vec::with_capacity(RESAMPLES), Vec::with_capacity(RESAMPLES)];
    for _ in 0..RESAMPLES {
        let (mut sa, mut sb) = (PromptSums::default(), PromptSums::default());
        for _ in 0..a.len() {
            let i = rng.random_range(0..a.len());
            sa.add(&a[i]);
            sb.add(&b[i]);
        }
        for ((d, x), y) in draws.iter_mut().zip(sa.pooled()).zip(sb.pooled()) {
            d.push(x - y);
        }
    }
    draws.map(|mut d| {
        d.sort_by(f64::total_cmp);
        [percentile(&d, 0.025), percentile(&d, 0.975)]
    })
}

/// The `p` quantile of sorted values (nearest rank).
fn percentile(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prompt(agree: f64, n: f64) -> PromptSums {
        PromptSums { agree, kl: agree, nll: 0.0, n }
    }

    #[test]
    fn identical_prompts_give_a_point_interval() {
        let ci = bootstrap_ci(&vec![prompt(3.0, 4.0); 10], 1);
        assert_eq!(ci[0], [0.75, 0.75]);
        assert_eq!(ci[2], [1.0, 1.0], "zero NLL is perplexity 1");
    }

    #[test]
    fn a_constant_per_token_gap_gives_a_point_interval_of_the_gap() {
        // Policy a has 0.05 nats more KL on every token of every prompt, and one agreeing token
        // fewer out of 4 per prompt: every resample's difference is exactly that.
        let b: Vec<PromptSums> =
            (0..12).map(|i| PromptSums { agree: 3.0, kl: 0.1 * i as f64, nll: 0.0, n: 4.0 + (i % 3) as f64 }).collect();
        let a: Vec<PromptSums> =
            b.iter().map(|p| PromptSums { agree: p.agree - 1.0, kl: p.kl + 0.05 * p.n, ..*p }).collect();
        let ci = paired_bootstrap_ci(&a, &b, 3);
        assert!((ci[1][0] - 0.05).abs() < 1e-12 && (ci[1][1] - 0.05).abs() < 1e-12, "KL gap {:?}", ci[1]);
        assert_eq!(ci[2], [0.0, 0.0], "equal NLL");
        // The agreement gap depends on the drawn lengths (1 / n per prompt), within its range.
        assert!(ci[0][0] >= -1.0 / 4.0 - 1e-12 && ci[0][1] <= -1.0 / 6.0 + 1e-12, "top-1 gap {:?}", ci[0]);
    }

    #[test]
    fn against_a_policy_that_never_agrees_the_paired_interval_is_the_binomial_one() {
        // b agrees nowhere, so a - b is a's agreement: the same Binomial(200, 0.5) / 200 interval.
        let a: Vec<PromptSums> = (0..200).map(|i| prompt((i % 2) as f64, 1.0)).collect();
        let b = vec![prompt(0.0, 1.0); 200];
        let [lo, hi] = paired_bootstrap_ci(&a, &b, 7)[0];
        let half = 1.96 * (0.25f64 / 200.0).sqrt();
        assert!((lo - (0.5 - half)).abs() < 0.012 && (hi - (0.5 + half)).abs() < 0.012, "[{lo}, {hi}]");
        assert!(paired_bootstrap_ci(&a, &b[..10], 7)[0][0].is_nan(), "unequal prompt sets have no interval");
    }

    #[test]
    fn half_agreeing_prompts_match_the_binomial_interval() {
        // 200 one-token prompts, half agreeing: the bootstrap mean is Binomial(200, 0.5) / 200,
        // whose 95% interval is 0.5 +- 1.96 * sqrt(0.25 / 200) = [0.4307, 0.5693].
        let prompts: Vec<PromptSums> = (0..200).map(|i| prompt((i % 2) as f64, 1.0)).collect();
        let [lo, hi] = bootstrap_ci(&prompts, 7)[0];
        let half = 1.96 * (0.25f64 / 200.0).sqrt();
        assert!((lo - (0.5 - half)).abs() < 0.012, "low {lo}");
        assert!((hi - (0.5 + half)).abs() < 0.012, "high {hi}");
    }
}
