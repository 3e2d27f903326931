//! What a device cache executes for a policy, and DMS's flag and prompt rules in plain form.
//!
//! A GPU cache cannot call back into a policy for every row and step, so a policy describes
//! itself as a [`DeviceProgram`] the kernels implement: keep everything, or DMS's delayed window
//! with flags from a [`FlagSource`]. The host policies (`policies::dms`) and the prompt pass use
//! the same rules from here ([`FlagSource::flags_token`], [`kept_after_prompt`]), so the host, the
//! prompt pass and the kernels share one description.

use crate::policies::random_flag_unit;
use crate::Pos;

/// Where eviction flags come from (spec rules 1 and 2).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum FlagSource {
    /// Nothing is flagged.
    None,
    /// Every token is flagged: DMS's delayed window of W then keeps the last W + 1 tokens (a
    /// sliding window).
    All,
    /// Token `t` of (layer, head) is flagged iff `random_flag_unit(seed, layer, head, t) < rate`
    /// (synthetic decisions at a set rate, for benchmarks).
    Random {
        /// Seed.
        seed: u64,
        /// Flag probability.
        rate: f64,
    },
    /// The model's learned signal: token `t + 1`'s raw score flags token `t` iff
    /// `raw * scale - offset > 0`.
    Learned {
        /// alpha_scale.
        scale: f32,
        /// alpha_offset.
        offset: f32,
    },
    /// The learned rule with the L2 norm of token `t + 1`'s key (after RoPE) as the raw signal
    /// (a training-free scorer).
    KeyNorm {
        /// alpha_scale.
        scale: f32,
        /// alpha_offset.
        offset: f32,
    },
}

impl FlagSource {
    /// Whether token `pos` of row (layer, head) is flagged. `next_raw` is the raw decision signal
    /// of token `pos + 1` (rule 2: a token's decision applies to the token before it); only
    /// [`FlagSource::Learned`] reads it.
    pub fn flags_token(&self, layer: usize, head: usize, pos: Pos, next_raw: f32) -> bool {
        match *self {
            FlagSource::None => false,
            FlagSource::All => true,
            FlagSource::Random { seed, rate } => random_flag_unit(seed, layer, head, pos) < rate,
            FlagSource::Learned { scale, offset } | FlagSource::KeyNorm { scale, offset } => {
                next_raw * scale - offset > 0.0
            }
        }
    }

    /// Whether [`FlagSource::flags_token`] needs the model's decision signal.
    pub fn needs_scores(&self) -> bool {
        matches!(self, FlagSource::Learned { .. })
    }

    /// Whether [`FlagSource::flags_token`] needs the keys' norms.
    pub fn needs_key_norms(&self) -> bool {
        matches!(self, FlagSource::KeyNorm { .. })
    }

    /// Whether [`FlagSource::flags_token`] reads a raw signal (decision scores or key norms).
    pub fn reads_signal(&self) -> bool {
        self.needs_scores() || self.needs_key_norms()
    }
}

/// What a device cache must execute to run a policy.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum DeviceProgram {
    /// Keep every token (a full cache).
    KeepAll,
    /// DMS's delayed window (rule 3): a flagged token stays visible `window` more tokens, then
    /// its slot is released.
    DelayedWindow {
        /// Delay W.
        window: usize,
        /// Where flags come from.
        flags: FlagSource,
        /// The first `sinks` positions are never flagged (attention sinks).
        sinks: Pos,
    },
}

/// Rule 4.2: the positions a row keeps after a prompt of `t` tokens, where `flagged(p)` says
/// whether prompt token `p` is flagged: every unflagged token, and the last `window + 1` tokens
/// (they enter the delayed-eviction ring with their flags). Sorted.
pub fn kept_after_prompt(t: usize, window: usize, flagged: impl Fn(usize) -> bool) -> Vec<Pos> {
    let ring_start = t.saturating_sub(window + 1);
    (0..t).filter(|&p| p >= ring_start || !flagged(p)).map(|p| p as Pos).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn learned_flags_follow_the_affine_rule_of_the_next_token_and_random_flags_its_hash() {
        let learned = FlagSource::Learned { scale: 100.0, offset: 5.0 };
        assert!(learned.flags_token(0, 0, 3, 0.051));
        assert!(!learned.flags_token(0, 0, 3, 0.05), "logit exactly 0 is not flagged");
        assert!(!FlagSource::None.flags_token(1, 2, 3, 1e9));
        let r = FlagSource::Random { seed: 9, rate: 0.5 };
        for pos in 0..64 {
            assert_eq!(r.flags_token(2, 1, pos, 0.0), random_flag_unit(9, 2, 1, pos) < 0.5);
        }
        assert!(learned.needs_scores() && !r.needs_scores() && !FlagSource::None.needs_scores());
    }

    /// Rule-8 oracle: append tokens one by one to a list, deleting a flagged entry once it has
    /// exactly W + 1 newer tokens.
    fn oracle_kept(flags: &[bool], window: usize) -> Vec<Pos> {
        let mut list: Vec<(Pos, bool)> = Vec::new();
        for t in 0..flags.len() {
            if let Some(last) = list.last_mut() {
                last.1 = flags[t - 1];
            }
            list.push((t as Pos, false));
            if list.len() > window + 1 {
                let i = list.len() - window - 2;
                if list[i].1 {
                    list.remove(i);
                }
            }
        }
        list.iter().map(|e| e.0).collect()
    }

    #[test]
    fn kept_after_prompt_matches_the_sequential_oracle() {
        for (t, window, rate) in [(1, 0, 0.5), (5, 0, 1.0), (40, 3, 0.5), (40, 8, 0.9), (12, 20, 0.7), (64, 1, 0.3)] {
            for head in 0..2 {
                // The last prompt token is never flagged (its deciding token has not come).
                let flags: Vec<bool> =
                    (0..t).map(|p| p + 1 < t && random_flag_unit(3, 0, head, p as Pos) < rate).collect();
                let kept = kept_after_prompt(t, window, |p| flags[p]);
                assert_eq!(kept, oracle_kept(&flags, window), "t {t} W {window} head {head}");
            }
        }
    }

    #[test]
    fn after_a_prompt_a_row_keeps_unflagged_tokens_and_the_ring() {
        // Every odd position flagged, window 2: the last 3 tokens stay whatever their flags.
        let kept = kept_after_prompt(10, 2, |p| p % 2 == 1);
        assert_eq!(kept, vec![0, 2, 4, 6, 7, 8, 9]);
        assert_eq!(kept_after_prompt(2, 5, |_| true), vec![0, 1], "a prompt inside the ring keeps all");
        assert_eq!(kept_after_prompt(0, 5, |_| true), Vec::<Pos>::new());
    }
}
