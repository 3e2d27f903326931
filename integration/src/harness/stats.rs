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
