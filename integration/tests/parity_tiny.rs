//! Tiny random-weight Qwen3 and Llama 3 (llama3 rope scaling) against Hugging Face transformers
//! golden outputs (fixtures produced in float32 on CPU).
//!
//! Tolerance 1e-4 on logits: both sides compute in f32 over 2 layers with logits of std ~0.4;
//! transformers' own cached-vs-uncached difference is ~1e-6, so 1e-4 leaves room for a different
//! summation order while catching any wrong weight, norm or rotary frequency (those give >1e-2).

mod common;
use common::*;

const TOL: f32 = 1e-4;

fn check_model(name: &str) {
    let dir = fixture(name);
    let g = golden(&dir.join("golden.safetensors"));
    let prompt = ids(&g["prompt_ids"]);
    let want_prompt = g["prompt_logits"].to_vec2::<f32>().unwrap();
    let greedy = ids(&g["greedy_ids"]);
    let want_steps = g["greedy_step_logits"].to_vec2::<f32>().unwrap();

    let mut eng = engine(&dir, "name = \"full\"", 4);
    let inv: Vec<f32> = eng.model.config().rope_inv_freq().iter().map(|&x| x as f32).collect();
    let want_inv = g["rope_inv_freq"].to_vec1::<f32>().unwrap();
    assert!(max_abs(&inv, &want_inv) < 1e-6 * want_inv[0].abs().max(1.0), "{name}: inv_freq {inv:?} vs {want_inv:?}");

    let mut seq = eng.new_sequence();
    let all = eng.step(&mut seq, &prompt, true).unwrap().to_vec2::<f32>().unwrap();
    for (t, (got, want)) in all.iter().zip(&want_prompt).enumerate() {
        let err = max_abs(got, want);
        assert!(err < TOL, "{name}: prompt position {t}: max abs error {err}");
    }
    let mut logits = all.last().unwrap().clone();
    for (i, &want_id) in greedy.iter().enumerate() {
        let err = max_abs(&logits, &want_steps[i]);
        assert!(err < TOL, "{name}: greedy step {i}: max abs error {err}");
        let got_id = dms_integration::engine::argmax(&logits);
        assert_eq!(got_id, want_id, "{name}: greedy step {i}");
        logits = eng.step(&mut seq, &[got_id], false).unwrap().squeeze(0).unwrap().to_vec1().unwrap();
    }
}

#[test]
fn qwen3_tiny_matches_transformers() {
    check_model("qwen3_tiny");
}

#[test]
fn llama3_tiny_with_rope_scaling_matches_transformers() {
    check_model("llama3_tiny");
}
