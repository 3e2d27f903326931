//! Which sequence sits in which slot of the device cache. The cache keeps its sequences in slots
//! `0..n` (a leaving sequence's slot is filled by the last one, as `Vec::swap_remove` does), and
//! its kernels run slots in order; the scheduler knows sequences by handle and lists them in its
//! own order. Each slot also records the adapter its sequence's policy reads, which the model
//! needs per sequence of a step. Always built, so the bookkeeping is tested without a GPU.

use anyhow::{bail, Context, Result};

/// Sequence keys (and the adapter each reads) by slot, mirroring the device cache's slot moves.
#[derive(Debug, Default)]
pub struct SlotMap {
    keys: Vec<u64>,
    adapters: Vec<Option<String>>,
    next: u64,
}

impl SlotMap {
    /// Records a sequence that took the next slot (`slot`, which must be the number of sequences
    /// held) and reads `adapter`; returns its key.
    pub fn push(&mut self, slot: usize, adapter: Option<&str>) -> Result<u64> {
        if slot != self.keys.len() {
            bail!("the device cache gave slot {slot} to a new sequence, expected {}", self.keys.len());
        }
        let key = self.next;
        self.next += 1;
        self.keys.push(key);
        self.adapters.push(adapter.map(str::to_string));
        Ok(key)
    }

    /// The adapter each slot's sequence reads, in slot order.
    pub fn adapters(&self) -> Vec<Option<&str>> {
        self.adapters.iter().map(Option::as_deref).collect()
    }

    /// The adapter the sequence in `slot` reads.
    pub fn adapter(&self, slot: usize) -> Option<&str> {
        self.adapters.get(slot).and_then(Option::as_deref)
    }

    /// The slot of sequence `key`.
    pub fn slot_of(&self, key: u64) -> Result<usize> {
        self.keys.iter().position(|&k| k == key).context("the sequence is not in the device cache")
    }

    /// Records that the sequence in `slot` left and the last one moved into its slot.
    pub fn remove(&mut self, slot: usize) {
        self.keys.swap_remove(slot);
        self.adapters.swap_remove(slot);
    }

    /// For sequences listed by key in the caller's order, the caller's index of the sequence in
    /// each slot; the list must hold every sequence exactly once.
    pub fn caller_index_by_slot(&self, listed: &[u64]) -> Result<Vec<usize>> {
        if listed.len() != self.keys.len() {
            bail!("a device step runs every sequence of the cache ({}), not {}", self.keys.len(), listed.len());
        }
        let mut index = vec![usize::MAX; self.keys.len()];
        for (i, &k) in listed.iter().enumerate() {
            let slot = self.slot_of(k)?;
            if index[slot] != usize::MAX {
                bail!("sequence {k} is listed twice in one device step");
            }
            index[slot] = i;
        }
        Ok(index)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Against a naive model of the cache: a list of slots where removing one moves the last into
    /// it; each sequence's adapter moves with it.
    #[test]
    fn keys_follow_the_caches_slot_moves_and_steps_map_back_to_the_callers_order() {
        let mut map = SlotMap::default();
        let mut cache: Vec<u64> = Vec::new();
        let adapter_of = |key: u64| (!key.is_multiple_of(3)).then(|| format!("adapter-{}", key % 3));
        let mut rng = 12345u64;
        let mut next = || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        for _ in 0..500 {
            if cache.is_empty() || next() % 3 != 0 {
                let adapter = adapter_of(map.next);
                let key = map.push(cache.len(), adapter.as_deref()).unwrap();
                cache.push(key);
            } else {
                let victim = cache[(next() % cache.len() as u64) as usize];
                let slot = map.slot_of(victim).unwrap();
                assert_eq!(cache[slot], victim);
                cache.swap_remove(slot);
                map.remove(slot);
            }
            // The caller lists its sequences in another order (reversed, rotated).
            let mut listed: Vec<u64> = cache.iter().rev().copied().collect();
            let rot = (next() % (listed.len().max(1)) as u64) as usize;
            listed.rotate_left(rot);
            let index = map.caller_index_by_slot(&listed).unwrap();
            for (slot, &i) in index.iter().enumerate() {
                assert_eq!(listed[i], cache[slot], "slot {slot}");
            }
            let want: Vec<Option<String>> = cache.iter().map(|&k| adapter_of(k)).collect();
            assert_eq!(map.adapters(), want.iter().map(Option::as_deref).collect::<Vec<_>>());
        }
    }

    #[test]
    fn a_step_that_skips_repeats_or_invents_a_sequence_is_refused() {
        let mut map = SlotMap::default();
        let keys: Vec<u64> = (0..3).map(|slot| map.push(slot, None).unwrap()).collect();
        assert!(map.push(5, None).is_err(), "a slot out of order");
        assert!(map.caller_index_by_slot(&keys[..2]).is_err(), "a sequence left out");
        assert!(map.caller_index_by_slot(&[keys[0], keys[0], keys[1]]).is_err(), "a sequence twice");
        assert!(map.caller_index_by_slot(&[keys[0], keys[1], 99]).is_err(), "an unknown sequence");
        assert_eq!(map.caller_index_by_slot(&[keys[2], keys[0], keys[1]]).unwrap(), [1, 2, 0]);
    }
}
