//! Retrieval samples mixed into a retrofit. A training sequence of running text rewards keeping
//! whatever predicts the next few tokens, so an adapter trained on it alone drops a fact that only
//! a question much later needs (the needle test's failure). A retrieval sample buries a random
//! five-digit key in the training text at a random depth, asks for it at the end and gives the
//! answer; the rows that predict the answer's tokens weigh `answer_weight` times a text row in the
//! distillation KL, so evicting the key costs what the teacher's answer loses.
//!
//! The wording differs from the needle test's (`harness::eval::needle`): the adapter should learn
//! to keep facts that are asked for, not one template.

use anyhow::{bail, Result};
use rand::{rngs::StdRng, Rng};
use serde::Deserialize;
use tokenizers::Tokenizer;

/// `[retrofit.retrieval]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetrievalSection {
    /// Share of training sequences that carry a retrieval task, in (0, 1].
    pub fraction: f64,
    /// Weight of a row that predicts an answer token, relative to a text row's weight of 1.
    pub answer_weight: f64,
}

impl RetrievalSection {
    /// Range checks.
    pub fn validate(&self) -> Result<()> {
        if !(self.fraction > 0.0 && self.fraction <= 1.0) {
            bail!("[retrofit.retrieval] fraction must be in (0, 1], got {}", self.fraction);
        }
        if !(self.answer_weight.is_finite() && self.answer_weight >= 1.0) {
            bail!(
                "[retrofit.retrieval] answer_weight must be a finite number of at least 1, got {}",
                self.answer_weight
            );
        }
        Ok(())
    }
}

/// Token ids with a distillation weight per row (row t predicts token t + 1).
#[derive(Debug, Clone, PartialEq)]
pub struct WeightedIds {
    /// The sequence.
    pub ids: Vec<u32>,
    /// One weight per row of `ids`.
    pub weights: Vec<f32>,
    /// Rows that predict an answer token.
    pub answer_rows: std::ops::Range<usize>,
}

/// Builds one sequence of exactly `seq_len` tokens: `hay` cut at `depth` (a fraction of the text
/// kept) with `fact` inserted there, then `question`, then `answer`. The rows predicting the
/// answer's tokens weigh `answer_weight`, every other row 1. `hay` must hold at least the text
/// the sequence needs.
pub fn assemble(
    hay: &[u32],
    fact: &[u32],
    question: &[u32],
    answer: &[u32],
    seq_len: usize,
    depth: f64,
    answer_weight: f32,
) -> Result<WeightedIds> {
    if answer.is_empty() {
        bail!("[retrofit.retrieval] the answer spells to no tokens");
    }
    let overhead = fact.len() + question.len() + answer.len();
    if seq_len < overhead + 2 {
        bail!(
            "[retrofit.retrieval] a retrieval sample needs seq_len of at least {} ({overhead} tokens of fact, \
             question and answer, and some text), got {seq_len}",
            overhead + 2
        );
    }
    let text_len = seq_len - overhead;
    if hay.len() < text_len {
        bail!("[retrofit.retrieval] a retrieval sample needs {text_len} tokens of text, got {}", hay.len());
    }
    let cut = ((text_len as f64) * depth.clamp(0.0, 1.0)).round() as usize;
    let mut ids = Vec::with_capacity(seq_len);
    ids.extend_from_slice(&hay[..cut]);
    ids.extend_from_slice(fact);
    ids.extend_from_slice(&hay[cut..text_len]);
    ids.extend_from_slice(question);
    ids.extend_from_slice(answer);
    let answer_rows = seq_len - answer.len() - 1..seq_len - 1;
    let mut weights = vec![1f32; seq_len];
    weights[answer_rows.clone()].fill(answer_weight);
    Ok(WeightedIds { ids, weights, answer_rows })
}

/// The retrieval task of a retrofit: its settings and the tokenizer that spells its wording.
pub struct RetrievalTask {
    settings: RetrievalSection,
    tok: Tokenizer,
}

impl RetrievalTask {
    /// A task for `settings` (checked) spelled by `tok`, for sequences of `seq_len` tokens: a
    /// length too short for the wording is refused here, not at the first retrieval step.
    pub fn new(settings: RetrievalSection, tok: Tokenizer, seq_len: usize) -> Result<Self> {
        settings.validate()?;
        let task = Self { settings, tok };
        let (fact, question, answer) = task.wording(99_999)?;
        assemble(&vec![0; seq_len], &fact, &question, &answer, seq_len, 0.5, 1.0)?;
        Ok(task)
    }

    /// Fact, question and answer for `key`.
    fn wording(&self, key: u32) -> Result<(Vec<u32>, Vec<u32>, Vec<u32>)> {
        let fact = self.encode(&format!(" (Write this down: the secret number is {key}.) "))?;
        let question =
            self.encode("\n\nQuestion: What was the secret number written down above?\nAnswer: The secret number is")?;
        Ok((fact, question, self.encode(&format!(" {key}."))?))
    }

    fn encode(&self, s: &str) -> Result<Vec<u32>> {
        Ok(self.tok.encode(s, false).map_err(|e| anyhow::anyhow!("tokenizing: {e}"))?.get_ids().to_vec())
    }

    /// With probability `fraction`, a retrieval sequence of `seq_len` tokens over the text `hay`
    /// (key and depth drawn from `rng`); otherwise `None` (the caller trains on plain text).
    pub fn draw(&self, hay: &[u32], seq_len: usize, rng: &mut StdRng) -> Result<Option<WeightedIds>> {
        if !rng.random_bool(self.settings.fraction) {
            return Ok(None);
        }
        let key: u32 = rng.random_range(10_000..100_000);
        let depth: f64 = rng.random_range(0.05..0.95);
        let (fact, question, answer) = self.wording(key)?;
        assemble(hay, &fact, &question, &answer, seq_len, depth, self.settings.answer_weight as f32).map(Some)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn assemble_places_fact_question_answer_and_weights_the_answer_rows() {
        let hay: Vec<u32> = (100..200).collect();
        let (fact, question, answer) = ([1, 2], [3, 4, 5], [6, 7]);
        let w = assemble(&hay, &fact, &question, &answer, 20, 0.5, 8.0).unwrap();
        // 13 text tokens, cut at round(6.5) = 7.
        let mut want: Vec<u32> = (100..107).collect();
        want.extend([1, 2]);
        want.extend(107..113);
        want.extend([3, 4, 5, 6, 7]);
        assert_eq!(w.ids, want);
        // Rows 17 and 18 predict tokens 18 and 19, the answer.
        assert_eq!(w.answer_rows, 17..19);
        let heavy: Vec<usize> = (0..20).filter(|&r| w.weights[r] != 1.0).collect();
        assert_eq!(heavy, vec![17, 18]);
        assert!(heavy.iter().all(|&r| w.weights[r] == 8.0 && answer.contains(&w.ids[r + 1])));
    }

    #[test]
    fn assemble_refuses_too_little_text_or_room() {
        let hay: Vec<u32> = (0..10).collect();
        let err = assemble(&hay, &[1], &[2], &[3], 20, 0.5, 2.0).unwrap_err().to_string();
        assert!(err.contains("17 tokens of text, got 10"), "{err}");
        let err = assemble(&hay, &[1; 5], &[2; 5], &[3; 5], 16, 0.5, 2.0).unwrap_err().to_string();
        assert!(err.contains("seq_len of at least 17"), "{err}");
    }

    #[test]
    fn settings_out_of_range_are_refused() {
        for (fraction, answer_weight) in [(0.0, 4.0), (1.5, 4.0), (0.5, 0.5), (0.5, f64::NAN)] {
            assert!(RetrievalSection { fraction, answer_weight }.validate().is_err());
        }
        assert!(RetrievalSection { fraction: 1.0, answer_weight: 1.0 }.validate().is_ok());
    }
}
