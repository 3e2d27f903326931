//! The block arithmetic of scheduling (nano-vllm's block manager): what a new request, a resumed
//! sequence and the next decode step need from the pool, and whether the pool has it. The
//! scheduler decides from these answers; it never counts blocks itself.

use crate::kv::sequence::SequenceCache;
use crate::kv::store::{KvStore, SwappedRow};

/// Block counts for sequences of `rows_per_sequence` rows in a pool of `block_size`-slot blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockManager {
    rows_per_sequence: usize,
    block_size: usize,
}

impl BlockManager {
    /// A block manager for sequences of `rows_per_sequence` rows over `store`.
    pub fn new(rows_per_sequence: usize, store: &KvStore) -> Self {
        Self::for_block_size(rows_per_sequence, store.block_size())
    }

    /// A block manager for sequences of `rows_per_sequence` rows in any pool of `block_size`-slot
    /// blocks (the device cache's, whose free blocks the caller reads).
    pub fn for_block_size(rows_per_sequence: usize, block_size: usize) -> Self {
        Self { rows_per_sequence, block_size }
    }

    /// Blocks to reserve for each running sequence when admitting or resuming another: one per
    /// row, so every running row can take its next token. Also what a decode step of `running`
    /// sequences may need at most, for a pool whose row lengths the scheduler does not see.
    pub fn step_headroom(&self, running: usize) -> usize {
        running.saturating_mul(self.rows_per_sequence)
    }

    /// Blocks admitting a prompt of `prompt_len` tokens needs beside `running` sequences: the
    /// prompt without eviction in every row, plus the running sequences' headroom.
    pub fn admission_need(&self, prompt_len: usize, running: usize) -> usize {
        prompt_len.div_ceil(self.block_size).saturating_mul(self.rows_per_sequence) + self.step_headroom(running)
    }

    /// Blocks a swapped-out sequence needs to come back beside `running` sequences: its own
    /// blocks, the running sequences' headroom and its own.
    pub fn resume_need(&self, rows: &[SwappedRow], running: usize) -> usize {
        let own: usize = rows.iter().map(|r| r.blocks_needed(self.block_size)).sum();
        own + self.step_headroom(running + 1)
    }

    /// Blocks the next decode step of `running` needs (rows whose last block is full).
    pub fn next_step_need<'a>(&self, store: &KvStore, running: impl Iterator<Item = &'a SequenceCache>) -> usize {
        running.map(|c| c.blocks_for_next_token(store)).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admission_counts_whole_blocks_per_row_plus_one_per_running_row() {
        let store = KvStore::with_value_dim(4, 4, 16, 100);
        let bm = BlockManager::new(6, &store);
        assert_eq!(bm.admission_need(1, 0), 6);
        assert_eq!(bm.admission_need(16, 0), 6);
        assert_eq!(bm.admission_need(17, 0), 12);
        assert_eq!(bm.admission_need(17, 3), 12 + 18);
        assert_eq!(bm.admission_need(16 * 16, 0), 96, "16 blocks x 6 rows");
        assert_eq!(bm.admission_need(16 * 16, 1), 102, "plus 6 of headroom");
        assert_eq!(BlockManager::for_block_size(6, 16), bm);
        assert_eq!(bm.step_headroom(4), 24);
    }
}
