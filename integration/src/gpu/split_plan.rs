//! How many splits a split-K decode-attention grid cuts each row into, so that the grid fills
//! the GPU in whole waves. A block handles one split of one row, and a launch runs in waves of
//! `resident` blocks (SMs x blocks per SM). With one split per row, 1008 rows on 924 resident
//! blocks take two full waves, the second one 9% busy. More splits shorten each block and round
//! away that tail, at the cost of a fixed per-block overhead (loading the queries, writing and
//! merging one more partial result).

/// Splits per row (in `1..=max_splits`) that minimise the modelled time of a grid of `rows`
/// rows of at most `keys` keys: waves x (keys per split + `overhead_keys`), where waves =
/// ceil(rows x splits / resident). Ties go to fewer splits.
pub fn tail_aware_splits(rows: usize, keys: usize, resident: usize, max_splits: usize, overhead_keys: usize) -> usize {
    let (rows, resident, keys) = (rows.max(1), resident.max(1), keys.max(1));
    (1..=max_splits.max(1))
        .map(|s| ((rows * s).div_ceil(resident) * (keys.div_ceil(s) + overhead_keys), s))
        .min()
        .map_or(1, |(_, s)| s)
}

/// The row length a captured decode step plans its splits for when its longest row holds
/// `longest` keys: the next power of two from 256, at most `cap` (the longest a request may
/// reach), so a growing batch needs few captures and each plans close to its rows.
pub fn captured_plan(longest: usize, cap: usize) -> usize {
    longest.next_power_of_two().max(256).min(cap.max(1))
}

/// The modelled time of [`tail_aware_splits`]'s cost model, in key-loads per block slot.
pub fn modelled_cost(rows: usize, keys: usize, resident: usize, splits: usize, overhead_keys: usize) -> usize {
    (rows.max(1) * splits.max(1)).div_ceil(resident.max(1)) * (keys.max(1).div_ceil(splits.max(1)) + overhead_keys)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Covers the row, stays within the cap, at most doubles the row (past 256), and takes few
    /// distinct values as a row grows.
    #[test]
    fn captured_plans_cover_the_row_in_few_buckets() {
        let cap = 40_000;
        let mut plans = std::collections::BTreeSet::new();
        for longest in 1..=cap {
            let p = captured_plan(longest, cap);
            assert!(p >= longest && p <= cap, "row {longest}: plan {p}");
            assert!(longest < 256 || p < 2 * longest, "row {longest}: plan {p}");
            plans.insert(p);
        }
        assert_eq!(plans.len(), 9, "256 .. 32768 and the cap: {plans:?}");
    }
    use proptest::prelude::*;

    #[test]
    fn the_llama_8b_memory_limit_grid_loses_its_half_empty_wave() {
        // Llama-3.1-8B, 32K context, DMS CR 8 at the memory limit: 126 sequences x 8 KV heads,
        // 4096 keys per row, 7 tiled blocks resident on each of 132 SMs.
        let (rows, keys, resident) = (1008, 4096, 924);
        let s = tail_aware_splits(rows, keys, resident, 32, 64);
        let ideal = rows * keys / resident;
        let one = modelled_cost(rows, keys, resident, 1, 64);
        let best = modelled_cost(rows, keys, resident, s, 64);
        assert!(s > 1, "one split per row leaves a 9%-busy second wave");
        assert!(one as f64 > 1.5 * best as f64, "one split {one}, {s} splits {best}");
        assert!((best as f64) < 1.2 * ideal as f64, "{s} splits cost {best}, ideal {ideal}");
    }

    #[test]
    fn a_single_sequence_uses_every_split_it_may() {
        // Batch 1: 8 rows fill a fraction of one wave; more splits only shorten it.
        assert_eq!(tail_aware_splits(8, 4096, 924, 32, 64), 32);
        assert_eq!(tail_aware_splits(8, 100, 924, 1, 64), 1);
    }

    proptest! {
        #[test]
        fn the_choice_is_within_bounds_and_no_other_split_count_is_cheaper(
            rows in 1usize..3000, keys in 1usize..70_000, resident in 1usize..2000,
            max_splits in 1usize..64, overhead in 0usize..256,
        ) {
            let s = tail_aware_splits(rows, keys, resident, max_splits, overhead);
            prop_assert!((1..=max_splits).contains(&s));
            let c = modelled_cost(rows, keys, resident, s, overhead);
            for other in 1..=max_splits {
                let o = modelled_cost(rows, keys, resident, other, overhead);
                prop_assert!(c < o || (c == o && s <= other), "{s} costs {c}, {other} costs {o}");
            }
        }
    }
}
