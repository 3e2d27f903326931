//! Q8_0 keys and values in the host store (`[cache] kv_dtype = "q8_0"`) against the f32 store on
//! the same model: logits within a stated tolerance through eviction and compaction, 34 bytes per
//! 32 values, and models whose heads do not split into runs of 32 refused. The store's exact
//! contents (ggml's Q8_0 by its definition) are checked in `store_oracle.rs`.

mod common;

use common::*;
use dms_integration::engine::{argmax, Engine};
use dms_integration::kv::store::KvDtype;
use dms_integration::model::WeightForm;

/// Every step's logits for a 40-token prompt and 12 teacher-forced tokens (`forced`, else the
/// run's own greedy choices) under a 16-token window with 2 sinks, the tokens fed, and the bytes
/// live at the end.
fn run(eng: &mut Engine, forced: Option<&[u32]>) -> (Vec<Vec<f32>>, Vec<u32>, u64) {
    let policy = resolved_policy(eng, "name = 'sliding_window'\nwindow = 16\nsinks = 2");
    let mut seq = eng.new_sequence_with(policy.as_ref());
    let prompt = seeded_tokens(5, 40);
    let (mut logits, mut chosen) = (Vec::new(), Vec::new());
    let mut last: Vec<f32> = eng.step(&mut seq, &prompt, false).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    for i in 0..12 {
        logits.push(last.clone());
        let t = forced.map_or_else(|| argmax(&last), |f| f[i]);
        chosen.push(t);
        last = eng.step(&mut seq, &[t], false).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    }
    let bytes = eng.store.usage().bytes_live;
    (logits, chosen, bytes)
}

#[test]
fn q8_0_kv_matches_f32_within_tolerance_in_a_quarter_of_the_bytes() {
    // A Qwen3 shape with 32-value heads (the fixtures' are 16), random weights.
    let dir = std::env::temp_dir().join(format!("dms-kv-q8-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = std::fs::read_to_string(fixture("qwen3_tiny").join("config.json"))
        .unwrap()
        .replace("\"head_dim\": 16", "\"head_dim\": 32");
    std::fs::write(dir.join("config.json"), cfg).unwrap();
    let loaded =
        dms_integration::engine::load_model(&dir.join("config.json"), &candle_core::Device::Cpu, WeightForm::Dense)
            .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    let full = dms_policy::Registry::with_builtins().build(&toml::from_str("name = 'full'").unwrap()).unwrap();
    let mut eng = Engine::new(loaded.model, full, 4, 1 << 12).unwrap();
    let (l32, tokens, b32) = run(&mut eng, None);
    let mut eng = eng.with_kv_dtype(KvDtype::Q8_0).unwrap();
    let (l8, _, b8) = run(&mut eng, Some(&tokens));
    assert_eq!(b8 * 128, b32 * 34, "34 bytes per 32 values against 128");
    // Q8_0 moves a value by at most half a step of its run's largest magnitude / 127; through two
    // layers of this model the logits move by under 2% of their range (measured 0.8%).
    let mut worst = 0f32;
    for (s, (a, b)) in l32.iter().zip(&l8).enumerate() {
        let range = a.iter().fold(0f32, |m, x| m.max(x.abs()));
        let d = max_abs(a, b);
        worst = worst.max(d / range);
        assert!(d <= 2e-2 * range, "step {s}: logits differ by {d} (range {range})");
    }
    assert!(worst > 1e-6, "the Q8_0 store rounds ({worst})");
    eprintln!("largest logit difference / range: {worst}");
}

#[test]
fn q8_0_kv_is_refused_for_heads_that_do_not_split_into_runs_of_32() {
    for (name, says) in
        [("qwen3_tiny", "keys have 16 and its values 16"), ("deepseek_mla_tiny", "keys have 40 and its values 0")]
    {
        let e = engine(&fixture(name), "name = 'full'", 4).with_kv_dtype(KvDtype::Q8_0).err().expect("refused");
        let e = format!("{e:#}");
        assert!(e.contains("kv_dtype = \"q8_0\" stores runs of 32 values") && e.contains(says), "{name}: {e}");
    }
}
