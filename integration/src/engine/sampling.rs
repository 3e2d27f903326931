//! Choosing the next token from logits.

use rand::{rngs::StdRng, Rng};

use super::GenParams;

/// Greedy when `temperature == 0`, else a draw from [`candidates`].
pub fn sample(logits: &[f32], p: &GenParams, rng: &mut StdRng) -> u32 {
    if p.temperature <= 0.0 {
        return argmax(logits);
    }
    let kept = candidates(logits, p);
    let mut r = rng.random::<f64>();
    for &(i, w) in &kept {
        if r < w {
            return i;
        }
        r -= w;
    }
    kept.last().map(|x| x.0).unwrap_or(0)
}

/// The tokens sampling draws from and their probabilities (summing to 1), most likely first
/// (lower id on ties): the softmax of `logits / temperature`, then, in vLLM's order, min-p (the
/// tokens at least `min_p` times as likely as the most likely), top-k and top-p (the most likely
/// tokens until their mass reaches `top_p`), each on what the one before kept. `temperature`
/// must be positive.
pub fn candidates(logits: &[f32], p: &GenParams) -> Vec<(u32, f64)> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    // Relative to the most likely token, whose weight is exactly 1.
    let mut kept: Vec<(u32, f64)> =
        logits.iter().enumerate().map(|(i, &l)| (i as u32, ((l as f64 - max) / p.temperature).exp())).collect();
    kept.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    if p.min_p > 0.0 {
        kept.retain(|x| x.1 >= p.min_p);
    }
    if p.top_k > 0 {
        kept.truncate(p.top_k);
    }
    let total: f64 = kept.iter().map(|x| x.1).sum();
    let mut mass = 0.0;
    let mut n = 0;
    for x in &kept {
        mass += x.1 / total;
        n += 1;
        if mass >= p.top_p {
            break;
        }
    }
    kept.truncate(n.max(1));
    let total: f64 = kept.iter().map(|x| x.1).sum();
    kept.iter().map(|&(i, w)| (i, w / total)).collect()
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
/// `presence_penalty` and `frequency_penalty`; vLLM's and transformers' `repetition_penalty`).
#[derive(Debug, Clone, PartialEq)]
pub struct LogitAdjustments {
    /// Added to these tokens' logits.
    pub bias: Vec<(u32, f32)>,
    /// Divides the positive logits and multiplies the negative ones of every token in the prompt
    /// or generated so far (1 = none).
    pub repetition_penalty: f32,
    /// Taken from the logit of every token generated at least once.
    pub presence_penalty: f32,
    /// Taken from a token's logit once per time it was generated.
    pub frequency_penalty: f32,
}

impl Default for LogitAdjustments {
    /// No change.
    fn default() -> Self {
        Self { bias: Vec::new(), repetition_penalty: 1.0, presence_penalty: 0.0, frequency_penalty: 0.0 }
    }
}

impl LogitAdjustments {
    /// `logits` adjusted after `prompt` and `generated` (the tokens chosen so far), in vLLM's
    /// order: each biased token's logit plus its bias; the repetition penalty on every token of
    /// the prompt or the output (`l / r` where `l > 0`, else `l * r`); then each generated token's
    /// logit minus `count * frequency_penalty + presence_penalty`, as OpenAI defines them.
    pub fn apply(&self, logits: &[f32], prompt: &[u32], generated: &[u32]) -> Vec<f32> {
        let mut out = logits.to_vec();
        for &(t, b) in &self.bias {
            if let Some(l) = out.get_mut(t as usize) {
                *l += b;
            }
        }
        if self.repetition_penalty != 1.0 {
            let seen: std::collections::HashSet<u32> = prompt.iter().chain(generated).copied().collect();
            for t in seen {
                if let Some(l) = out.get_mut(t as usize) {
                    *l = if *l > 0.0 { *l / self.repetition_penalty } else { *l * self.repetition_penalty };
                }
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
        let a = LogitAdjustments {
            bias: vec![(0, 1.0), (9, 5.0)],
            presence_penalty: 0.25,
            frequency_penalty: 0.5,
            ..Default::default()
        };
        let got = a.apply(&[1.0, 2.0, 3.0, 4.0], &[1], &[2, 3, 2]);
        assert_eq!(got, vec![2.0, 2.0, 3.0 - 2.0 * 0.5 - 0.25, 4.0 - 0.5 - 0.25]);
        assert_eq!(LogitAdjustments::default().apply(&[1.0, 2.0], &[1], &[0, 0]), vec![1.0, 2.0]);
    }

    /// transformers' `RepetitionPenaltyLogitsProcessor` by hand: every token of the prompt or
    /// the output once (token 1 in both), a positive logit divided, a negative one multiplied,
    /// after the bias (token 0: 1 + 1 = 2, then / 2); token 4 untouched.
    #[test]
    fn repetition_penalty_divides_positive_and_multiplies_negative_logits_of_seen_tokens() {
        let a = LogitAdjustments { bias: vec![(0, 1.0)], repetition_penalty: 2.0, ..Default::default() };
        let got = a.apply(&[1.0, 3.0, -1.5, 0.0, 5.0], &[0, 1, 3], &[1, 2, 2]);
        assert_eq!(got, vec![1.0, 1.5, -3.0, 0.0, 5.0]);
    }

    /// Against the closed form: logits ln 1 .. ln 4 (probabilities 0.1 .. 0.4 at temperature 1).
    #[test]
    fn candidates_apply_min_p_then_top_k_then_top_p() {
        let logits: Vec<f32> = (1..=4).map(|x| (x as f32).ln()).collect();
        let run = |temperature: f64, min_p: f64, top_k: usize, top_p: f64| -> Vec<(u32, f64)> {
            let p = GenParams { temperature, min_p, top_k, top_p, ..Default::default() };
            candidates(&logits, &p)
        };
        let close = |got: Vec<(u32, f64)>, want: &[(u32, f64)]| {
            assert_eq!(got.len(), want.len(), "{got:?} vs {want:?}");
            for (g, w) in got.iter().zip(want) {
                assert!(g.0 == w.0 && (g.1 - w.1).abs() < 1e-6, "{got:?} vs {want:?}");
            }
        };
        close(run(1.0, 0.0, 0, 1.0), &[(3, 0.4), (2, 0.3), (1, 0.2), (0, 0.1)]);
        close(run(1.0, 0.45, 0, 1.0), &[(3, 4.0 / 9.0), (2, 3.0 / 9.0), (1, 2.0 / 9.0)]);
        close(run(1.0, 0.0, 2, 1.0), &[(3, 4.0 / 7.0), (2, 3.0 / 7.0)]);
        close(run(1.0, 0.0, 0, 0.65), &[(3, 4.0 / 7.0), (2, 3.0 / 7.0)]);
        close(run(1.0, 0.0, 0, 0.3), &[(3, 1.0)]);
        // min-p first, top-p on what it kept: 4/9 < 0.5 <= 7/9.
        close(run(1.0, 0.45, 0, 0.5), &[(3, 4.0 / 7.0), (2, 3.0 / 7.0)]);
        close(run(1.0, 0.45, 1, 1.0), &[(3, 1.0)]);
        // Temperature 0.5 squares the weights: 1, 4, 9, 16 over 30; min-p on them.
        close(run(0.5, 0.5, 0, 1.0), &[(3, 16.0 / 25.0), (2, 9.0 / 25.0)]);
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
