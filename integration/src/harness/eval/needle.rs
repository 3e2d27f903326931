//! The needle test: a pass key buried in corpus text at a depth, asked for at the end through the
//! ChatML template, counted when the greedy answer contains it exactly.

use std::sync::Arc;

use anyhow::{bail, Result};
use dms_policy::PolicyFactory;
use tokenizers::Tokenizer;

use super::{mean_cr, Needle, NeedleResult};
use crate::engine::batch::run_requests;
use crate::engine::scheduler::Request;
use crate::engine::{Engine, GenParams};

/// One needle prompt.
pub(super) struct NeedlePrompt {
    pub(super) ids: Vec<u32>,
    pub(super) key: String,
}

/// A pass key for trial `i`: five digits, deterministic.
fn pass_key(i: usize) -> String {
    format!("{}", 10000 + (i as u64 * 7919 + 2713) % 90000)
}

pub(super) fn needle_prompts(n: &Needle, tok: &Tokenizer, hay: &[u32]) -> Result<Vec<NeedlePrompt>> {
    let enc = |s: &str| -> Result<Vec<u32>> {
        Ok(tok.encode(s, false).map_err(|e| anyhow::anyhow!("tokenizing: {e}"))?.get_ids().to_vec())
    };
    for special in ["<|im_start|>", "<|im_end|>"] {
        if tok.token_to_id(special).is_none() {
            bail!("[needle] uses the ChatML template, but the model's tokenizer has no `{special}` token");
        }
    }
    let head = enc(&format!("<|im_start|>system\n{}<|im_end|>\n<|im_start|>user\n", n.system))?;
    let question =
        enc("\n\nWhat is the pass key mentioned in the text above? Answer with the number only.<|im_end|>\n\
         <|im_start|>assistant\n")?;
    let trials = n.trials.unwrap_or(n.depths.len());
    let mut out = Vec::new();
    let mut i = 0usize;
    for &len in &n.context_tokens {
        for trial in 0..trials {
            let depth = n.depths[trial % n.depths.len()];
            let key = pass_key(i);
            let needle = enc(&format!(" The pass key is {key}. Remember it. {key} is the pass key. "))?;
            let overhead = head.len() + question.len() + needle.len();
            if len <= overhead + 16 {
                bail!("[needle] context_tokens {len} leaves no room for the haystack ({overhead} tokens of template)");
            }
            let hay_len = len - overhead;
            if hay.len() < hay_len {
                bail!("the corpus has {} tokens, fewer than a {hay_len}-token haystack", hay.len());
            }
            let span = hay.len() - hay_len;
            let at = (span / (n.context_tokens.len() * trials + 1)) * (i + 1);
            let slice = &hay[at..at + hay_len];
            let cut = (hay_len as f64 * depth).round() as usize;
            let mut ids = head.clone();
            ids.extend_from_slice(&slice[..cut]);
            ids.extend_from_slice(&needle);
            ids.extend_from_slice(&slice[cut..]);
            ids.extend_from_slice(&question);
            out.push(NeedlePrompt { ids, key });
            i += 1;
        }
    }
    Ok(out)
}

pub(super) fn needle_run(
    engine: &mut Engine,
    policy: &Arc<dyn PolicyFactory>,
    prompts: &[NeedlePrompt],
    n: &Needle,
    tok: &Tokenizer,
    prefill_chunk: usize,
) -> Result<NeedleResult> {
    let reqs: Vec<Request> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| Request { id: i, prompt: p.ids.clone(), forced: None, policy: policy.clone(), params: None })
        .collect();
    let params = GenParams { max_tokens: n.answer_tokens, prefill_chunk, ..Default::default() };
    let (mut done, _) = run_requests(engine, reqs, &params, 1, false, |_| {})?;
    done.sort_by_key(|f| f.id);
    let mut r = NeedleResult { trials: prompts.len(), cr: mean_cr(&done), matched: true, ..Default::default() };
    for (f, p) in done.iter().zip(prompts) {
        let text = tok.decode(&f.tokens, true).map_err(|e| anyhow::anyhow!("decoding: {e}"))?;
        r.hits += text.split(|c: char| !c.is_ascii_digit()).any(|run| run == p.key) as usize;
        r.answers.push(text.trim().to_string());
    }
    Ok(r)
}

/// Mean CR after prefilling `prompts` (the needle calibration's measurement).
pub(super) fn needle_prefill_cr(
    engine: &mut Engine,
    policy: Arc<dyn PolicyFactory>,
    prompts: &[&NeedlePrompt],
    prefill_chunk: usize,
) -> Result<f64> {
    let reqs: Vec<Request> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| Request { id: i, prompt: p.ids.clone(), forced: None, policy: policy.clone(), params: None })
        .collect();
    let params = GenParams::greedy(1, prefill_chunk);
    let (done, _) = run_requests(engine, reqs, &params, 1, false, |_| {})?;
    Ok(mean_cr(&done))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pass_keys_are_five_digits_and_distinct() {
        let keys: Vec<String> = (0..12).map(pass_key).collect();
        assert!(keys.iter().all(|k| k.len() == 5));
        let set: std::collections::HashSet<_> = keys.iter().collect();
        assert_eq!(set.len(), keys.len());
    }
}
