//! Choosing the next token from logits.

use rand::{rngs::StdRng, Rng};

use super::GenParams;

/// Greedy when `temperature == 0`, else temperature + top-p sampling.
pub fn sample(logits: &[f32], p: &GenParams, rng: &mut StdRng) -> u32 {
    if p.temperature <= 0.0 {
        return argmax(logits);
    }
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let mut probs: Vec<(u32, f64)> =
        logits.iter().enumerate().map(|(i, &l)| (i as u32, ((l as f64 - max) / p.temperature).exp())).collect();
    let total: f64 = probs.iter().map(|x| x.1).sum();
    probs.sort_by(|a, b| b.1.total_cmp(&a.1));
    let mut kept = Vec::new();
    let mut mass = 0.0;
    for (i, w) in probs {
        kept.push((i, w / total));
        mass += w / total;
        if mass >= p.top_p {
            break;
        }
    }
    let mut r = rng.random::<f64>() * mass;
    for &(i, w) in &kept {
        if r < w {
            return i;
        }
        r -= w;
    }
    kept.last().map(|x| x.0).unwrap_or(0)
}

/// Index of the largest logit (first on ties).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// The log-probability of the chosen token and the `top` most likely tokens under the model's
/// distribution (log-softmax of the raw logits, before temperature or top-p), best first.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprobs {
    /// The chosen token's log-probability.
    pub logprob: f32,
    /// The `top` most likely tokens with their log-probabilities, best first (lower id on ties).
    pub top: Vec<(u32, f32)>,
}

/// [`TokenLogprobs`] of `token` under `logits`.
pub fn token_logprobs(logits: &[f32], token: u32, top: usize) -> TokenLogprobs {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let log_total = max + logits.iter().map(|&l| (l as f64 - max).exp()).sum::<f64>().ln();
    let lp = |l: f32| (l as f64 - log_total) as f32;
    let mut order: Vec<u32> = (0..logits.len() as u32).collect();
    let top = top.min(order.len());
    let by_logit = |a: &u32, b: &u32| logits[*b as usize].total_cmp(&logits[*a as usize]).then(a.cmp(b));
    if top > 0 && top < order.len() {
        order.select_nth_unstable_by(top - 1, by_logit);
    }
    order.truncate(top);
    order.sort_by(by_logit);
    TokenLogprobs {
        logprob: logits.get(token as usize).map_or(f32::NEG_INFINITY, |&l| lp(l)),
        top: order.into_iter().map(|i| (i, lp(logits[i as usize]))).collect(),
    }
}

/// A request's changes to its logits before a token is chosen (OpenAI's `logit_bias`,
/// `presence_penalty` and `frequency_penalty`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LogitAdjustments {
    /// Added to these tokens' logits.
    pub bias: Vec<(u32, f32)>,
    /// Taken from the logit of every token generated at least once.
    pub presence_penalty: f32,
    /// Taken from a token's logit once per time it was generated.
    pub frequency_penalty: f32,
}

impl LogitAdjustments {
    /// `logits` adjusted after `generated` (the tokens chosen so far): each biased token's
    /// logit plus its bias, then each generated token's minus `count * frequency_penalty +
    /// presence_penalty`, as OpenAI defines them.
    pub fn apply(&self, logits: &[f32], generated: &[u32]) -> Vec<f32> {
        let mut out = logits.to_vec();
        for &(t, b) in &self.bias {
            if let Some(l) = out.get_mut(t as usize) {
                *l += b;
            }
        }
        if self.presence_penalty != 0.0 || self.frequency_penalty != 0.0 {
            let mut counts = std::collections::HashMap::<u32, u32>::new();
            for &t in generated {
                *counts.entry(t).or_default() += 1;
            }
            for (t, c) in counts {
                if let Some(l) = out.get_mut(t as usize) {
                    *l -= c as f32 * self.frequency_penalty + self.presence_penalty;
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Against the closed form: token 0 biased by +1, token 2 generated twice and token 3 once
    /// (frequency 0.5, presence 0.25), token 1 untouched.
    #[test]
    fn adjustments_bias_then_penalise_what_was_generated() {
        let a = LogitAdjustments { bias: vec![(0, 1.0), (9, 5.0)], presence_penalty: 0.25, frequency_penalty: 0.5 };
        let got = a.apply(&[1.0, 2.0, 3.0, 4.0], &[2, 3, 2]);
        assert_eq!(got, vec![2.0, 2.0, 3.0 - 2.0 * 0.5 - 0.25, 4.0 - 0.5 - 0.25]);
        assert_eq!(LogitAdjustments::default().apply(&[1.0, 2.0], &[0, 0]), vec![1.0, 2.0]);
    }

    /// Against the closed form for logits 0, ln 2, ln 2, ln 3 (probabilities 1/8, 2/8, 2/8, 3/8):
    /// best first, ties by the lower id, at most the vocabulary.
    #[test]
    fn token_logprobs_are_the_log_softmax_best_first() {
        let logits = [0.0, 2f32.ln(), 2f32.ln(), 3f32.ln()];
        let lp = token_logprobs(&logits, 1, 10);
        assert!((lp.logprob - 0.25f32.ln()).abs() < 1e-6);
        let ids: Vec<u32> = lp.top.iter().map(|t| t.0).collect();
        assert_eq!(ids, [3, 1, 2, 0]);
        let want = [0.375f32, 0.25, 0.25, 0.125];
        assert!(lp.top.iter().zip(want).all(|(t, w)| (t.1 - w.ln()).abs() < 1e-6), "{:?}", lp.top);
        assert_eq!(token_logprobs(&logits, 0, 2).top.iter().map(|t| t.0).collect::<Vec<_>>(), [3, 1]);
        assert!(token_logprobs(&logits, 0, 0).top.is_empty());
    }
}
