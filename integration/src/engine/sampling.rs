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
