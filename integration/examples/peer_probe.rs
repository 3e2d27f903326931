//! Diagnoses greedy divergence between this engine and mistral.rs: for each prompt, compares
//! both engines' first greedy tokens, then re-prefills mistral.rs with prompt + our first token
//! (no decode step on its side) to tell a cache/decode-path difference from a model difference.
//! `cargo run --release -p dms-integration --features mistralrs --example peer_probe`

use anyhow::Result;
use candle_core::Device;
use dms_integration::assets::{fetch, SMOLLM2_135M};
use dms_integration::engine::{argmax, load_model, Engine};
use dms_integration::harness::peer_mistralrs::MistralRsPeer;
use dms_policy::Registry;

fn main() -> Result<()> {
    let gguf = fetch(&SMOLLM2_135M)?;
    let hf = dms_integration::assets::export::cached_hf_export(&gguf)?;
    let loaded = load_model(&gguf, &Device::Cpu, dms_integration::model::WeightForm::Dense)?;
    let tok = loaded.tokenizer.clone().expect("tokenizer");
    let full = Registry::with_builtins().build(&toml::from_str("name = 'full'")?)?;
    let mut eng = Engine::new(loaded.model, full, 16, 1 << 16)?;
    let text = dms_integration::assets::corpus::fiction_text(dms_integration::assets::corpus::Split::HeldOut)?;
    let ids = tok.encode(text.as_str(), false).map_err(anyhow::Error::msg)?.get_ids().to_vec();
    let peer = MistralRsPeer::load_hf(&hf, 1)?;
    for (name, p) in [("48 tokens", ids[..48].to_vec()), ("384 tokens", ids[..384].to_vec())] {
        let mut seq = eng.new_sequence();
        let mut ours = Vec::new();
        let mut l = eng.step(&mut seq, &p, false)?.squeeze(0)?.to_vec1::<f32>()?;
        for _ in 0..4 {
            let t = argmax(&l);
            ours.push(t);
            l = eng.step(&mut seq, &[t], false)?.squeeze(0)?.to_vec1::<f32>()?;
        }
        seq.release(&mut eng.store);
        let theirs = peer.generate(std::slice::from_ref(&p), 4)?.tokens.remove(0);
        let mut p1 = p.clone();
        p1.push(ours[0]);
        let re = peer.generate(&[p1], 1)?.tokens.remove(0);
        println!("{name}: ours {ours:?} | mistral.rs decode {theirs:?} | mistral.rs prefill(prompt+ours[0]) -> {re:?}");
    }
    let (a, b) = (ids[..384].to_vec(), ids[1000..1384].to_vec());
    let alone = [a.clone(), b.clone()].map(|p| peer.generate(&[p], 4).map(|mut r| r.tokens.remove(0)));
    let together = peer.generate(&[a, b], 4)?.tokens;
    println!(
        "mistral.rs requests alone: {:?} {:?} | submitted together: {together:?}",
        alone[0].as_ref().ok(),
        alone[1].as_ref().ok()
    );
    Ok(())
}
