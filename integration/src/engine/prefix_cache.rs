//! Prefix caching: the cache state of token prefixes that sequences have passed through, kept in
//! the pool so that a later request starting with the same tokens, under the same policy, starts
//! as a copy of that state and prefills only the rest of its prompt.
//!
//! A state comes from two places: a sequence that ended (its prompt and the tokens it fed, which
//! a multi-turn chat sends back as the next prompt's start), and the point where a new prompt
//! stops agreeing with a recent one (a shared system prompt or few-shot header), copied out in
//! the middle of the new prompt's pass. Paged prefix caches (vLLM's, mistral.rs') share blocks
//! between sequences; here every (sequence, KV head) row is compacted by its own policy, so a
//! state is a whole copy and only whole states are reused: a copy is valid for exactly the
//! tokens it has seen. Only policies whose kept set does not depend on where a prompt pass is cut
//! take part (every policy but the attention-scored ones, whose chunks score with their own
//! queries): continuing from a state then gives the result one pass gives, up to rounding.
//!
//! The cache holds no blocks of its own accounting: its states are sequences in the engine's
//! pool, given back (least recently used first) whenever the scheduler needs blocks, before any
//! running sequence is preempted.

use std::collections::VecDeque;
use std::sync::Arc;

use dms_policy::{PolicyFactory, SignalNeed};

/// States kept at most.
pub const MAX_ENTRIES: usize = 256;
/// Recent prompts compared with a new one to find a shared start.
const RECENT_PROMPTS: usize = 64;
/// Shortest shared start worth a copy of its state.
pub const MIN_SHARED_TOKENS: usize = 32;

/// A kept state: a sequence that has seen `tokens`, and its next-token logits.
struct Entry<S> {
    id: u64,
    policy: Arc<dyn PolicyFactory>,
    tokens: Vec<u32>,
    seq: S,
    logits: Vec<f32>,
    last_used: u64,
}

/// A cached state a prompt can start from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hit {
    /// The entry's id (for [`PrefixCache::state`]).
    pub id: u64,
    /// Prompt tokens it has seen.
    pub tokens: usize,
}

/// How a prompt's pass uses the cache.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PrefixPlan {
    /// The longest cached state the prompt starts with.
    pub hit: Option<Hit>,
    /// Where the prompt stops agreeing with a recent prompt of the same policy: the pass copies
    /// its state out there (past the hit, when there is one).
    pub snapshot_at: Option<usize>,
}

/// Kept states of sequences (see the module docs), over an engine's sequence handles `S`.
pub struct PrefixCache<S> {
    entries: Vec<Entry<S>>,
    recent: VecDeque<(Arc<dyn PolicyFactory>, Vec<u32>)>,
    clock: u64,
    next_id: u64,
}

impl<S> Default for PrefixCache<S> {
    fn default() -> Self {
        Self { entries: Vec::new(), recent: VecDeque::new(), clock: 0, next_id: 0 }
    }
}

/// Whether states of `policy` may be continued by a later prompt pass.
pub fn policy_takes_part(policy: &dyn PolicyFactory) -> bool {
    policy.signal_need() != SignalNeed::AttentionWeights
}

impl<S> PrefixCache<S> {
    /// States kept now.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when no state is kept.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Plans `prompt`'s pass under `policy`: the longest kept state it starts with (shorter than
    /// the prompt or equal to it), and where it stops agreeing with a recent prompt when that is
    /// at least [`MIN_SHARED_TOKENS`] in and past the hit.
    pub fn plan(&self, policy: &Arc<dyn PolicyFactory>, prompt: &[u32]) -> PrefixPlan {
        if !policy_takes_part(policy.as_ref()) {
            return PrefixPlan::default();
        }
        let hit = self
            .entries
            .iter()
            .filter(|e| Arc::ptr_eq(&e.policy, policy) && prompt.starts_with(&e.tokens))
            .max_by_key(|e| e.tokens.len())
            .map(|e| Hit { id: e.id, tokens: e.tokens.len() });
        let shared = self
            .recent
            .iter()
            .filter(|(p, _)| Arc::ptr_eq(p, policy))
            .map(|(_, r)| r.iter().zip(prompt).take_while(|(a, b)| a == b).count())
            .max()
            .unwrap_or(0);
        let from = hit.map_or(0, |h| h.tokens);
        let snapshot_at = (shared >= MIN_SHARED_TOKENS && shared > from).then_some(shared);
        PrefixPlan { hit, snapshot_at }
    }

    /// Notes an admitted prompt among the recent ones that later prompts are compared with.
    pub fn remember(&mut self, policy: &Arc<dyn PolicyFactory>, prompt: &[u32]) {
        if !policy_takes_part(policy.as_ref()) {
            return;
        }
        if self.recent.len() == RECENT_PROMPTS {
            self.recent.pop_back();
        }
        self.recent.push_front((policy.clone(), prompt.to_vec()));
    }

    /// Marks entry `id` as used now (the least recently used states are given back first).
    pub fn touch(&mut self, id: u64) {
        self.clock += 1;
        if let Some(e) = self.entries.iter_mut().find(|e| e.id == id) {
            e.last_used = self.clock;
        }
    }

    /// Every kept state's sequence.
    pub fn states(&self) -> impl Iterator<Item = &S> {
        self.entries.iter().map(|e| &e.seq)
    }

    /// The state and logits of entry `id`, if it is still kept.
    pub fn state(&self, id: u64) -> Option<(&S, &[f32])> {
        self.entries.iter().find(|e| e.id == id).map(|e| (&e.seq, e.logits.as_slice()))
    }

    /// Drops entry `id` (its state could not be copied); returns its sequence to release.
    pub fn remove(&mut self, id: u64) -> Option<S> {
        let i = self.entries.iter().position(|e| e.id == id)?;
        Some(self.entries.swap_remove(i).seq)
    }

    /// Keeps `seq`, which has seen `tokens` under `policy` and predicts `logits` next. Returns
    /// the sequences to release: the state it replaces (same policy and tokens) and, beyond
    /// [`MAX_ENTRIES`], the least recently used one.
    pub fn insert(&mut self, policy: Arc<dyn PolicyFactory>, tokens: Vec<u32>, seq: S, logits: Vec<f32>) -> Vec<S> {
        let mut released = Vec::new();
        if let Some(i) = self.entries.iter().position(|e| Arc::ptr_eq(&e.policy, &policy) && e.tokens == tokens) {
            released.push(self.entries.swap_remove(i).seq);
        }
        if self.entries.len() == MAX_ENTRIES {
            released.extend(self.evict_lru(None));
        }
        self.clock += 1;
        self.next_id += 1;
        self.entries.push(Entry { id: self.next_id, policy, tokens, seq, logits, last_used: self.clock });
        released
    }

    /// Takes out the least recently used state (never entry `keep`); returns its sequence to
    /// release, or `None` when no other state is kept.
    pub fn evict_lru(&mut self, keep: Option<u64>) -> Option<S> {
        let i = (0..self.entries.len())
            .filter(|&i| Some(self.entries[i].id) != keep)
            .min_by_key(|&i| self.entries[i].last_used)?;
        Some(self.entries.swap_remove(i).seq)
    }

    /// Takes out every state; returns their sequences to release.
    pub fn drain(&mut self) -> Vec<S> {
        self.entries.drain(..).map(|e| e.seq).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dms_policy::registry::Registry;

    fn policy(table: &str) -> Arc<dyn PolicyFactory> {
        Registry::with_builtins().build(&table.parse::<toml::Table>().unwrap()).unwrap()
    }

    /// The longest kept prefix of a prompt, by brute force over every kept state.
    fn oracle_hit(kept: &[(usize, Vec<u32>)], prompt: &[u32]) -> Option<usize> {
        kept.iter().filter(|(_, t)| prompt.starts_with(t)).map(|(_, t)| t.len()).max()
    }

    #[test]
    fn the_longest_kept_prefix_of_the_same_policy_is_the_hit() {
        let (full, window) = (policy("name = \"full\""), policy("name = \"sliding_window\"\nwindow = 8"));
        let mut cache = PrefixCache::<usize>::default();
        let states: Vec<Vec<u32>> = vec![vec![1, 2], vec![1, 2, 3, 4], vec![1, 2, 3, 9], vec![5]];
        let mut kept = Vec::new();
        for (i, t) in states.iter().enumerate() {
            assert!(cache.insert(full.clone(), t.clone(), i, vec![i as f32]).is_empty());
            kept.push((i, t.clone()));
        }
        cache.insert(window.clone(), vec![1, 2, 3, 4, 5], 99, vec![]);
        for prompt in [vec![1, 2, 3, 4, 5, 6], vec![1, 2, 3], vec![1, 2, 3, 9], vec![5, 1], vec![2], vec![1]] {
            let got = cache.plan(&full, &prompt).hit.map(|h| h.tokens);
            assert_eq!(got, oracle_hit(&kept, &prompt), "prompt {prompt:?}");
            if let Some(h) = cache.plan(&full, &prompt).hit {
                let (seq, logits) = cache.state(h.id).unwrap();
                assert_eq!(kept[*seq].1.len(), h.tokens);
                assert_eq!(logits, &[*seq as f32]);
            }
        }
        // Another policy's state is never a hit.
        assert_eq!(cache.plan(&window, &[1, 2, 3, 4, 5, 6]).hit.map(|h| h.tokens), Some(5));
        assert_eq!(cache.plan(&window, &[1, 2, 3, 4]).hit, None);
    }

    #[test]
    fn a_shared_start_with_a_recent_prompt_is_copied_out() {
        let full = policy("name = \"full\"");
        let mut cache = PrefixCache::<usize>::default();
        let system: Vec<u32> = (0..40).collect();
        let ask = |q: u32| system.iter().copied().chain([1000 + q, 7]).collect::<Vec<u32>>();
        assert_eq!(cache.plan(&full, &ask(1)), PrefixPlan::default());
        // Planning alone remembers nothing.
        assert_eq!(cache.plan(&full, &ask(1)), PrefixPlan::default());
        cache.remember(&full, &ask(1));
        // The second prompt shares the 40-token start: copied out there.
        assert_eq!(cache.plan(&full, &ask(2)).snapshot_at, Some(40));
        // Too short a shared start is not worth a copy.
        assert_eq!(cache.plan(&full, &system[..MIN_SHARED_TOKENS - 1]).snapshot_at, None);
        // Once the start is kept, it is the hit and nothing more is copied.
        cache.insert(full.clone(), system.clone(), 0, vec![]);
        let plan = cache.plan(&full, &ask(3));
        assert_eq!((plan.hit.map(|h| h.tokens), plan.snapshot_at), (Some(40), None));
        cache.remember(&full, &ask(3));
        // The same prompt again: the whole prompt is the shared start.
        assert_eq!(cache.plan(&full, &ask(3)).snapshot_at, Some(42));
        // Another policy shares nothing with it.
        let window = policy("name = \"sliding_window\"\nwindow = 8");
        assert_eq!(cache.plan(&window, &ask(3)), PrefixPlan::default());
    }

    #[test]
    fn attention_scored_policies_take_no_part() {
        let tova = policy("name = \"tova\"\nbudget = 16");
        let mut cache = PrefixCache::<usize>::default();
        let prompt: Vec<u32> = (0..64).collect();
        cache.insert(tova.clone(), prompt[..32].to_vec(), 0, vec![]);
        cache.remember(&tova, &prompt);
        assert_eq!(cache.plan(&tova, &prompt), PrefixPlan::default());
    }

    #[test]
    fn least_recently_used_states_go_first_and_replacements_release_the_old_state() {
        let full = policy("name = \"full\"");
        let mut cache = PrefixCache::<usize>::default();
        for i in 0..MAX_ENTRIES {
            assert!(cache.insert(full.clone(), vec![i as u32, 1], i, vec![]).is_empty());
        }
        // Using state 0 makes state 1 the oldest.
        cache.touch(cache.plan(&full, &[0, 1, 2]).hit.unwrap().id);
        assert_eq!(cache.insert(full.clone(), vec![9999], 1000, vec![]), vec![1]);
        assert_eq!(cache.len(), MAX_ENTRIES);
        // The same tokens again replace the kept state.
        assert_eq!(cache.insert(full.clone(), vec![9999], 1001, vec![]), vec![1000]);
        let keep = cache.plan(&full, &[2, 1]).hit.unwrap().id;
        cache.touch(keep);
        let mut order = Vec::new();
        while let Some(s) = cache.evict_lru(Some(keep)) {
            order.push(s);
        }
        assert_eq!(cache.len(), 1);
        assert_eq!(order[0], 3, "the oldest unused state goes first");
        assert_eq!(cache.drain(), vec![2]);
    }
}
