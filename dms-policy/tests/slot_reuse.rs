//! Spec rule 3.3: during single-token (decode) steps the incoming token reuses the slot of the key
//! released at that moment, in place; otherwise it appends. Checked for `dms` (scripted and
//! `random` decisions) and `sliding_window` against an independent slot model that is driven only
//! by the plans, with the released key named by the spec's rules (not by the policy's ledger).

use dms_policy::policies::random_flag_unit;
use dms_policy::{CacheShape, CompactPlan, EvictPlan, Pos, Registry, RowRef, SequencePolicy};
use proptest::prelude::*;

const SHAPE: CacheShape = CacheShape { n_layers: 2, rows_per_layer: 2 };

/// Test-side decision of token `t` in a row (splitmix64; independent of the policy's hash).
fn scripted(seed: u64, row: RowRef, t: Pos, rate: f64) -> bool {
    let mut x = seed ^ ((row.layer as u64) << 40) ^ ((row.head as u64) << 32) ^ t as u64;
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^= x >> 31;
    ((x >> 11) as f64 / (1u64 << 53) as f64) < rate
}

/// What the spec says about one row: which key a token's arrival releases, and the kept set.
trait Rules {
    /// The key released (hidden from this query on, its slot free) when token `t` arrives.
    fn released_by(&self, row: RowRef, t: Pos) -> Option<Pos>;
    /// Positions kept after tokens `0..seen`.
    fn kept(&self, row: RowRef, seen: Pos) -> Vec<Pos>;
}

/// Rules 2-3 (and the rule-8 list oracle) for `dms` with window `w` and flags `flag(row, k)`.
struct Dms<F: Fn(RowRef, Pos) -> bool> {
    w: Pos,
    flag: F,
}

impl<F: Fn(RowRef, Pos) -> bool> Rules for Dms<F> {
    fn released_by(&self, row: RowRef, t: Pos) -> Option<Pos> {
        let k = t.checked_sub(self.w + 1)?;
        (self.flag)(row, k).then_some(k)
    }
    fn kept(&self, row: RowRef, seen: Pos) -> Vec<Pos> {
        // Rule 8: the entry with exactly W+1 newer tokens is deleted when flagged.
        let mut list: Vec<Pos> = Vec::new();
        for t in 0..seen {
            list.push(t);
            let n = list.len();
            if n > self.w as usize + 1 && (self.flag)(row, list[n - self.w as usize - 2]) {
                list.remove(n - self.w as usize - 2);
            }
        }
        list
    }
}

/// `sliding_window`: query q sees key k iff k < sinks or q - k < window.
struct Window {
    window: Pos,
    sinks: Pos,
}

impl Rules for Window {
    fn released_by(&self, _: RowRef, t: Pos) -> Option<Pos> {
        let k = t.checked_sub(self.window)?;
        (k >= self.sinks).then_some(k)
    }
    fn kept(&self, _: RowRef, seen: Pos) -> Vec<Pos> {
        (0..seen).filter(|&k| k < self.sinks || (seen - 1) - k < self.window).collect()
    }
}

/// Feeds `chunks` (token counts; the tail of the run is all single-token steps) to every row of
/// one sequence and checks each plan against a slot array of (position, last_visible) kept by the
/// test. Returns how many in-place reuses happened.
fn drive(
    seq: &mut dyn SequencePolicy,
    rules: &dyn Rules,
    scores: Option<&dyn Fn(RowRef, Pos) -> f32>,
    chunks: &[usize],
) -> usize {
    let (mut ep, mut cp) = (EvictPlan::default(), CompactPlan::default());
    let mut model: Vec<Vec<(Pos, Pos)>> = vec![Vec::new(); SHAPE.n_rows()];
    let mut seen: Pos = 0;
    let mut reuses = 0;
    for &n in chunks {
        for layer in 0..SHAPE.n_layers {
            for head in 0..SHAPE.rows_per_layer {
                let row = RowRef { layer, head };
                let slots = &mut model[SHAPE.index(row)];
                let raw: Option<Vec<f32>> = scores.map(|f| (0..n as Pos).map(|i| f(row, seen + i)).collect());
                seq.decide(row, seen, n, raw.as_deref()).unwrap();
                seq.evict(row, seen, n, &mut ep).unwrap();
                let len_before = slots.len();
                let released = if n == 1 { rules.released_by(row, seen) } else { None };
                if n == 1 {
                    match released {
                        Some(k) => {
                            let s = slots
                                .iter()
                                .position(|e| e.0 == k)
                                .unwrap_or_else(|| panic!("{row:?}: key {k} is not stored"));
                            assert_eq!(
                                ep.hide,
                                vec![(s as u32, seen - 1)],
                                "{row:?} t {seen}: hide key {k} in slot {s}"
                            );
                            assert_eq!(
                                ep.writes[0].slot, s as u32,
                                "{row:?} t {seen}: the new token must reuse slot {s} of released key {k} in place \
                                 (row length {len_before})"
                            );
                            assert!(s < len_before, "{row:?} t {seen}: reused slot lies inside the row");
                            reuses += 1;
                        }
                        None => {
                            assert!(ep.hide.is_empty(), "{row:?} t {seen}: nothing leaves, got {:?}", ep.hide);
                            assert_eq!(ep.writes[0].slot as usize, len_before, "{row:?} t {seen}: appends");
                        }
                    }
                }
                for &(s, until) in &ep.hide {
                    slots[s as usize].1 = until;
                }
                assert_eq!(ep.writes.len(), n);
                for (i, w) in ep.writes.iter().enumerate() {
                    let p = seen + i as Pos;
                    let s = w.slot as usize;
                    if s < slots.len() {
                        assert!(slots[s].1 < seen, "{row:?}: token {p} overwrites slot {s} still visible");
                        slots[s] = (p, w.last_visible);
                    } else {
                        assert_eq!(s, slots.len(), "{row:?}: appends are in order");
                        slots.push((p, w.last_visible));
                    }
                }
                let len_after_write = slots.len();
                seq.compact(row, &mut cp).unwrap();
                if n == 1 {
                    assert!(cp.moves.is_empty(), "{row:?} t {seen}: decode step compacts nothing, got {:?}", cp.moves);
                    assert_eq!(cp.len as usize, len_after_write, "{row:?} t {seen}: decode step keeps its length");
                    if released.is_some() {
                        assert_eq!(len_after_write, len_before, "{row:?} t {seen}: in-place reuse does not grow");
                    }
                }
                for &(from, to) in &cp.moves {
                    slots[to as usize] = slots[from as usize];
                }
                slots.truncate(cp.len as usize);
                let mut kept: Vec<Pos> = slots.iter().map(|e| e.0).collect();
                kept.sort_unstable();
                assert_eq!(kept, rules.kept(row, seen + n as Pos), "{row:?}: kept after {} tokens", seen + n as Pos);
            }
        }
        seen += n as Pos;
    }
    reuses
}

/// A prompt in `prompt_chunks` followed by `decode` single-token steps.
fn schedule(prompt_chunks: &[usize], decode: usize) -> Vec<usize> {
    prompt_chunks.iter().copied().chain(std::iter::repeat_n(1, decode)).collect()
}

fn build(table: &str) -> Box<dyn SequencePolicy> {
    Registry::with_builtins().build(&toml::from_str(table).unwrap()).unwrap().new_sequence(SHAPE)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    /// Rule 3.3 for `dms` with scripted decisions (raw 1 flags, raw 0 keeps at scale 100, offset 5).
    #[test]
    fn dms_decode_reuses_the_released_slot_in_place(w in 0u32..7, seed in any::<u64>(), rate in 0.2f64..0.9,
            prompt in prop::collection::vec(1usize..9, 1..4), decode in 10usize..50) {
        let flag = move |row: RowRef, k: Pos| scripted(seed, row, k + 1, rate);
        let score = move |row: RowRef, t: Pos| if scripted(seed, row, t, rate) { 1.0 } else { 0.0 };
        let mut seq = build(&format!("name = 'dms'\nwindow = {w}"));
        let reuses = drive(seq.as_mut(), &Dms { w, flag }, Some(&score), &schedule(&prompt, decode));
        if decode as u32 >= w + 10 && rate > 0.5 {
            prop_assert!(reuses > 0, "some decode step released a key");
        }
    }

    /// Rule 3.3 for `sliding_window` (with and without sinks).
    #[test]
    fn sliding_window_decode_reuses_the_released_slot_in_place(window in 1u32..9, sinks in 0u32..4,
            prompt in prop::collection::vec(1usize..9, 1..4), decode in 12usize..40) {
        let mut seq = build(&format!("name = 'sliding_window'\nwindow = {window}\nsinks = {sinks}"));
        let reuses = drive(seq.as_mut(), &Window { window, sinks }, None, &schedule(&prompt, decode));
        prop_assert!(reuses > 0, "the window is full during decode");
    }
}

/// Rule 3.3 for `dms` with `decision = "random"`: the flag of token k is the documented seeded
/// hash `random_flag_unit(seed, layer, head, k) < evict_rate`.
#[test]
fn dms_random_decisions_decode_reuses_the_released_slot_in_place() {
    for (w, rate, seed) in [(0u32, 0.5, 1u64), (3, 0.75, 7), (5, 0.3, 11), (8, 0.9, 3)] {
        let flag = move |row: RowRef, k: Pos| random_flag_unit(seed, row.layer, row.head, k) < rate;
        let mut seq =
            build(&format!("name = 'dms'\nwindow = {w}\ndecision = 'random'\nevict_rate = {rate}\nseed = {seed}"));
        let reuses = drive(seq.as_mut(), &Dms { w, flag }, None, &schedule(&[13, 4], 120));
        assert!(reuses > 20, "window {w} rate {rate}: {reuses} reuses");
    }
}
