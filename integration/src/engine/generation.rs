//! One request through the scheduler: what `dms run` does, with its trace and summary figures.
//!
//! The engine executes steps and the scheduler plans them; generating from one prompt is the
//! scheduler serving a single request, so there is one decode loop for every caller.

use anyhow::{bail, Context, Result};

use crate::engine::scheduler::{Observed, Request, Scheduler};
use crate::engine::trace::TraceWriter;
use crate::engine::{Engine, GenParams, Generation};

impl Engine {
    /// Prefills `prompt` (in chunks if asked) and generates with the engine's policy, writing a
    /// trace record after the prompt and after each fed token when `trace` is given.
    pub fn generate(
        &mut self,
        prompt: &[u32],
        params: &GenParams,
        mut trace: Option<&mut TraceWriter>,
    ) -> Result<Generation> {
        if prompt.is_empty() {
            bail!("the prompt is empty");
        }
        let mut sched: Scheduler<Engine> = Scheduler::new(params.clone(), 1, self.keep_logits)?;
        sched.submit(
            self,
            Request { id: 0, prompt: prompt.to_vec(), forced: None, policy: self.policy.clone(), params: None },
        )?;
        let mut observe = |o: Observed<'_, Engine>| match trace.as_deref_mut() {
            Some(t) => t.record(o.step, &o.seq.cache, &o.engine.store, o.logits),
            None => Ok(()),
        };
        let mut done = Vec::new();
        while !sched.is_idle() {
            let step = sched.step_observed(self, &mut observe);
            match step.and_then(|f| sched.take_failed().into_iter().next().map_or(Ok(f), |(_, e)| Err(e))) {
                Ok(f) => done.extend(f),
                Err(e) => {
                    sched.release_all(self);
                    return Err(e);
                }
            }
        }
        let f = done.pop().context("the request did not finish")?;
        let s = &sched.stats;
        Ok(Generation {
            prompt_tokens: prompt.len(),
            tokens: f.tokens,
            prefill_secs: s.prefill_secs,
            decode_secs: s.decode_secs,
            decode_steps: s.decode_steps,
            usage: f.usage,
            peak_allocated: f.peak_allocated,
            compression_ratio: f.compression_ratio,
            layer_kept_fraction: f.layer_kept_fraction,
            step_logits: f.step_logits,
        })
    }
}
