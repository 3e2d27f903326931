//! Greedy agreement where it is well defined: at positions where the baseline's top-1 logit leads
//! its top-2 by more than a margin, a small numerical difference (quantized weights, f16 keys)
//! cannot flip the argmax, so a disagreement there is a real one.

use crate::engine::argmax;

/// Logit margin above which the baseline's top-1 counts as confident.
pub const CONFIDENT_MARGIN: f32 = 0.1;
/// Continuation tokens per prompt the confident agreement looks at.
pub const CONFIDENT_TOKENS: usize = 32;

/// Top-1 minus top-2 of `logits` (0 for fewer than two values).
pub fn top2_margin(logits: &[f32]) -> f32 {
    let (mut a, mut b) = (f32::NEG_INFINITY, f32::NEG_INFINITY);
    for &x in logits {
        if x > a {
            b = a;
            a = x;
        } else if x > b {
            b = x;
        }
    }
    if b == f32::NEG_INFINITY {
        0.0
    } else {
        a - b
    }
}

/// `(agreeing, counted)`: over the first `first` positions of each prompt (`[prompt][position]`
/// logits, or log-probabilities, which have the same margins), the positions whose baseline
/// margin exceeds `margin`, and how many of them the arm's argmax matches.
pub fn confident_agreement(
    baseline: &[Vec<Vec<f32>>],
    arm: &[Vec<Vec<f32>>],
    first: usize,
    margin: f32,
) -> (usize, usize) {
    let (mut agree, mut counted) = (0, 0);
    for (b, a) in baseline.iter().zip(arm) {
        for (bl, al) in b.iter().zip(a).take(first) {
            if top2_margin(bl) > margin {
                counted += 1;
                agree += (argmax(bl) == argmax(al)) as usize;
            }
        }
    }
    (agree, counted)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_margin_is_top1_minus_top2() {
        assert_eq!(top2_margin(&[0.5, 2.0, 1.25, -3.0]), 0.75);
        assert_eq!(top2_margin(&[1.0, 1.0]), 0.0);
        assert_eq!(top2_margin(&[4.0]), 0.0);
    }

    #[test]
    fn only_confident_positions_within_the_first_tokens_count() {
        // Baseline margins per position: 1.0 (confident), 0.05 (not), 0.5 (confident), 2.0
        // (confident but past `first`).
        let base = vec![vec![vec![1.0, 0.0], vec![0.05, 0.0], vec![0.0, 0.5], vec![2.0, 0.0]]];
        // The arm agrees at position 0, disagrees at 1 (ignored) and 2, and at 3 (ignored).
        let arm = vec![vec![vec![0.9, 0.0], vec![0.0, 0.1], vec![0.6, 0.0], vec![0.0, 1.0]]];
        assert_eq!(confident_agreement(&base, &arm, 3, CONFIDENT_MARGIN), (1, 2));
        assert_eq!(confident_agreement(&base, &arm, 4, CONFIDENT_MARGIN), (1, 3));
        assert_eq!(confident_agreement(&base, &base, 4, CONFIDENT_MARGIN), (3, 3));
    }
}
