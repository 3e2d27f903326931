//! The checkpoint format `dms-gpu peer` gives both engines (random bf16 weights, word-level
//! tokenizer, written by `export::write_random_hf`) loads in mistral.rs and in our engine, and
//! both generate from it: checked here on the CPU so that the GPU run does not discover a format
//! problem. Greedy agreement is printed, not asserted (the weights are drawn unseeded).
#![cfg(feature = "mistralrs")]

use candle_core::{DType, Device};
use dms_integration::assets::export::write_random_hf;
use dms_integration::engine::{load_model, Engine, GenParams};
use dms_integration::harness::peer_mistralrs::MistralRsPeer;
use dms_integration::model::ModelConfig;
use dms_integration::model::WeightForm;
use dms_policy::Registry;

const SHAPE: &str = r#"{"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
    "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
    "head_dim": 16, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "vocab_size": 256,
    "max_position_embeddings": 512, "tie_word_embeddings": false}"#;

#[test]
fn mistralrs_and_our_engine_load_and_run_a_random_checkpoint() {
    let cfg = ModelConfig::from_hf_json(SHAPE).unwrap();
    let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("peer-random-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    write_random_hf(&cfg, &dir, &Device::Cpu, DType::BF16).unwrap();
    let prompt: Vec<u32> = (0..40u32).map(|i| (i * 37 + 11) % 256).collect();
    let peer = MistralRsPeer::load_hf(&dir, 1).expect("mistral.rs loads the random checkpoint");
    let theirs = peer.generate(std::slice::from_ref(&prompt), 8).expect("mistral.rs generates");
    assert_eq!(theirs.tokens[0].len(), 8);
    assert!(theirs.tokens[0].iter().all(|&t| t < 256));
    let model = load_model(&dir, &Device::Cpu, WeightForm::Dense).unwrap().model;
    let policy = Registry::with_builtins().build(&toml::from_str("name = 'full'").unwrap()).unwrap();
    let mut eng = Engine::new(model, policy, 16, 1 << 12).unwrap();
    let params = GenParams::greedy(8, 0);
    let ours = eng.generate(&prompt, &params, None).unwrap();
    let agree = ours.tokens.iter().zip(&theirs.tokens[0]).take_while(|(a, b)| a == b).count();
    println!("greedy prefix agreement ours vs mistral.rs: {agree}/8");
    std::fs::remove_dir_all(&dir).unwrap();
}
