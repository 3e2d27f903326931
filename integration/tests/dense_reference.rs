//! The engine against a naive dense reference written here from the model definition:
//! sliding_window through the paged store equals a dense run with the equivalent attention mask;
//! incremental decode through the cache equals a full recompute; chunked prefill equals one pass.

mod common;
use std::collections::HashMap;

use candle_core::{Device, Tensor};
use common::*;

struct Dense {
    w: HashMap<String, Tensor>,
    inv_freq: Vec<f32>,
    layers: usize,
    heads: usize,
    kv: usize,
    hd: usize,
    eps: f64,
}

fn mat(t: &Tensor) -> Vec<Vec<f32>> {
    t.to_vec2::<f32>().unwrap()
}

fn matvec(w: &[Vec<f32>], x: &[f32]) -> Vec<f32> {
    w.iter().map(|r| r.iter().zip(x).map(|(a, b)| a * b).sum()).collect()
}

fn rms(x: &[f32], w: &[f32], eps: f64) -> Vec<f32> {
    let ms = x.iter().map(|v| (*v as f64) * (*v as f64)).sum::<f64>() / x.len() as f64;
    let r = 1.0 / (ms + eps).sqrt();
    x.iter().zip(w).map(|(v, g)| (*v as f64 * r) as f32 * g).collect()
}

impl Dense {
    fn load(name: &str) -> Self {
        let dir = fixture(name);
        let w = candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu).unwrap();
        let g = golden(&dir.join("golden.safetensors"));
        Dense { w, inv_freq: g["rope_inv_freq"].to_vec1().unwrap(), layers: 2, heads: 4, kv: 2, hd: 16, eps: 1e-6 }
    }

    fn rope(&self, x: &mut [f32], pos: usize) {
        let h = self.hd / 2;
        for i in 0..h {
            let a = (pos as f32 * self.inv_freq[i]) as f64;
            let (c, s) = (a.cos() as f32, a.sin() as f32);
            let (x0, x1) = (x[i], x[i + h]);
            x[i] = x0 * c - x1 * s;
            x[i + h] = x1 * c + x0 * s;
        }
    }

    /// Logits at every position when query q may see key k iff `visible(k, q)` (and k <= q).
    fn logits(&self, ids: &[u32], visible: &dyn Fn(usize, usize) -> bool) -> Vec<Vec<f32>> {
        let g = |n: &str| self.w[n].clone();
        let emb = mat(&g("model.embed_tokens.weight"));
        let mut x: Vec<Vec<f32>> = ids.iter().map(|&i| emb[i as usize].clone()).collect();
        let (hd, gq) = (self.hd, self.heads / self.kv);
        for l in 0..self.layers {
            let p = format!("model.layers.{l}");
            let n1: Vec<f32> = g(&format!("{p}.input_layernorm.weight")).to_vec1().unwrap();
            let n2: Vec<f32> = g(&format!("{p}.post_attention_layernorm.weight")).to_vec1().unwrap();
            let [wq, wk, wv, wo, wg, wu, wd] = [
                "self_attn.q_proj",
                "self_attn.k_proj",
                "self_attn.v_proj",
                "self_attn.o_proj",
                "mlp.gate_proj",
                "mlp.up_proj",
                "mlp.down_proj",
            ]
            .map(|n| mat(&g(&format!("{p}.{n}.weight"))));
            let mut qs = Vec::new();
            let mut ks = Vec::new();
            let mut vs = Vec::new();
            for (t, xt) in x.iter().enumerate() {
                let h = rms(xt, &n1, self.eps);
                let mut q = matvec(&wq, &h);
                let mut k = matvec(&wk, &h);
                for hh in 0..self.heads {
                    self.rope(&mut q[hh * hd..(hh + 1) * hd], t);
                }
                for hh in 0..self.kv {
                    self.rope(&mut k[hh * hd..(hh + 1) * hd], t);
                }
                qs.push(q);
                ks.push(k);
                vs.push(matvec(&wv, &h));
            }
            for t in 0..x.len() {
                let mut o = vec![0f32; self.heads * hd];
                for hh in 0..self.heads {
                    let kvh = hh / gq;
                    let q = &qs[t][hh * hd..(hh + 1) * hd];
                    let keys: Vec<usize> = (0..=t).filter(|&k| visible(k, t)).collect();
                    let sc: Vec<f64> = keys
                        .iter()
                        .map(|&k| {
                            q.iter().zip(&ks[k][kvh * hd..(kvh + 1) * hd]).map(|(a, b)| (*a * *b) as f64).sum::<f64>()
                                / (hd as f64).sqrt()
                        })
                        .collect();
                    let m = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let e: Vec<f64> = sc.iter().map(|s| (s - m).exp()).collect();
                    let z: f64 = e.iter().sum();
                    for (j, &k) in keys.iter().enumerate() {
                        for i in 0..hd {
                            o[hh * hd + i] += (e[j] / z) as f32 * vs[k][kvh * hd + i];
                        }
                    }
                }
                let a = matvec(&wo, &o);
                for (xi, ai) in x[t].iter_mut().zip(a) {
                    *xi += ai;
                }
                let h = rms(&x[t], &n2, self.eps);
                let gate = matvec(&wg, &h);
                let up = matvec(&wu, &h);
                let act: Vec<f32> = gate.iter().zip(&up).map(|(g, u)| g / (1.0 + (-g).exp()) * u).collect();
                let m = matvec(&wd, &act);
                for (xi, mi) in x[t].iter_mut().zip(m) {
                    *xi += mi;
                }
            }
        }
        let nf: Vec<f32> = g("model.norm.weight").to_vec1().unwrap();
        let head = mat(&g("lm_head.weight"));
        x.iter().map(|xt| matvec(&head, &rms(xt, &nf, self.eps))).collect()
    }
}

fn prompt() -> Vec<u32> {
    ids(&golden(&fixture("llama3_tiny/golden.safetensors"))["prompt_ids"])
}

#[test]
fn dense_reference_reproduces_transformers() {
    let d = Dense::load("llama3_tiny");
    let want = golden(&fixture("llama3_tiny/golden.safetensors"))["prompt_logits"].to_vec2::<f32>().unwrap();
    let got = d.logits(&prompt(), &|_, _| true);
    for t in 0..want.len() {
        assert!(max_abs(&got[t], &want[t]) < 1e-4, "position {t}");
    }
}

/// Feeds the prompt in `chunks` through the engine and returns the logits at every position.
fn engine_logits(policy: &str, chunks: &[usize], block_size: usize) -> Vec<Vec<f32>> {
    let mut eng = engine(&fixture("llama3_tiny"), policy, block_size);
    let mut seq = eng.new_sequence();
    let p = prompt();
    let mut out = Vec::new();
    let mut at = 0;
    let mut i = 0;
    while at < p.len() {
        let n = chunks[i % chunks.len()].min(p.len() - at);
        let l = eng.step(&mut seq, &p[at..at + n], true).unwrap().to_vec2::<f32>().unwrap();
        out.extend(l);
        at += n;
        i += 1;
    }
    out
}

#[test]
fn sliding_window_equals_dense_masked_model() {
    let d = Dense::load("llama3_tiny");
    let (window, sinks) = (5usize, 2usize);
    let want = d.logits(&prompt(), &|k, q| k < sinks || q - k < window);
    let table = format!("name = \"sliding_window\"\nwindow = {window}\nsinks = {sinks}");
    for chunks in [vec![1], vec![40], vec![7], vec![3, 1, 9]] {
        for bs in [1, 4, 16] {
            let got = engine_logits(&table, &chunks, bs);
            for t in 0..want.len() {
                let err = max_abs(&got[t], &want[t]);
                assert!(err < 1e-4, "chunks {chunks:?} block {bs} position {t}: {err}");
            }
        }
    }
    // The window actually changes the result (the test would notice a policy that kept everything).
    let full = d.logits(&prompt(), &|_, _| true);
    assert!(max_abs(&full[39], &want[39]) > 1e-2);
}

#[test]
fn incremental_decode_and_chunked_prefill_equal_one_pass() {
    let one_pass = engine_logits("name = \"full\"", &[40], 16);
    for chunks in [vec![1], vec![5], vec![13, 2]] {
        let got = engine_logits("name = \"full\"", &chunks, 3);
        for t in 0..one_pass.len() {
            let err = max_abs(&got[t], &one_pass[t]);
            assert!(err < 1e-5, "chunks {chunks:?} position {t}: {err}");
        }
    }
}
