//! One decode step's quantized matrix-vector products at SmolLM2-135M's shapes: our Q4_1 kernel
//! on the MLP's gate (`[1536, 576]`) and down (`[576, 1536]`) projections, and candle's Q8_0
//! kernel on the tied LM head (`[49152, 576]`), as weight bytes read per second; and one
//! GPT-OSS-20B expert projection (`[2880, 2880]`) in MXFP4 by our kernel beside candle's Q8_0 (the
//! format it would be repacked into otherwise).

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use dms_integration::model::{mxfp4, q4_1};

fn weights(n: usize, k: usize, dtype: GgmlDType) -> QTensor {
    let vals: Vec<f32> = (0..n * k).map(|i| ((i as f32) * 0.618).sin() * 0.05).collect();
    QTensor::quantize(&Tensor::from_vec(vals, (n, k), &Device::Cpu).unwrap(), dtype).unwrap()
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("quantized_matvec");
    for (name, n, k) in [("q4_1_gate_1536x576", 1536, 576), ("q4_1_down_576x1536", 576, 1536)] {
        let w = weights(n, k, GgmlDType::Q4_1);
        let bytes = w.data().unwrap().to_vec();
        let x: Vec<f32> = (0..k).map(|i| (i as f32 * 0.37).cos()).collect();
        let mut y = vec![0f32; n];
        group.throughput(Throughput::Bytes(bytes.len() as u64));
        group.bench_function(BenchmarkId::from_parameter(name), |b| {
            b.iter(|| q4_1::matmul(&bytes, (n, k), &x, &mut y).unwrap())
        });
    }
    {
        let k = 576;
        let parts: Vec<(Vec<u8>, usize)> = [576usize, 192, 192]
            .iter()
            .map(|&n| (weights(n, k, GgmlDType::Q4_1).data().unwrap().to_vec(), n))
            .collect();
        let x: Vec<f32> = (0..k).map(|i| (i as f32 * 0.37).cos()).collect();
        let mut ys: Vec<Vec<f32>> = parts.iter().map(|(_, n)| vec![0f32; *n]).collect();
        group.throughput(Throughput::Bytes(parts.iter().map(|(b, _)| b.len() as u64).sum()));
        group.bench_function(BenchmarkId::from_parameter("qkv_separate"), |b| {
            b.iter(|| {
                for ((w, n), y) in parts.iter().zip(ys.iter_mut()) {
                    q4_1::matmul(w, (*n, k), &x, y).unwrap()
                }
            })
        });
        let ws: Vec<(&[u8], usize)> = parts.iter().map(|(b, n)| (b.as_slice(), *n)).collect();
        group.bench_function(BenchmarkId::from_parameter("qkv_together"), |b| {
            b.iter(|| {
                let mut o: Vec<&mut [f32]> = ys.iter_mut().map(|y| y.as_mut_slice()).collect();
                q4_1::matmul_many(&ws, k, &x, &mut o).unwrap()
            })
        });
    }
    {
        let (n, k) = (2880, 2880);
        // Seeded codes and scales in ggml's layout: per 32 weights a scale byte, 16 bytes of codes.
        let blocks: Vec<u8> = (0..n * k / mxfp4::BLOCK)
            .flat_map(|b| {
                std::iter::once(118 + (b % 5) as u8).chain((0..16).map(move |j| ((b * 37 + j * 11) % 256) as u8))
            })
            .collect();
        let x: Vec<f32> = (0..k).map(|i| (i as f32 * 0.37).cos()).collect();
        let mut y = vec![0f32; n];
        group.throughput(Throughput::Bytes(blocks.len() as u64));
        group.bench_function(BenchmarkId::from_parameter("mxfp4_expert_2880x2880"), |b| {
            b.iter(|| mxfp4::matmul(&blocks, (n, k), &x, &mut y).unwrap())
        });
        let w = weights(n, k, GgmlDType::Q8_0);
        group.throughput(Throughput::Bytes(w.storage_size_in_bytes() as u64));
        let mm = QMatMul::from_qtensor(w).unwrap();
        let xt = Tensor::from_vec(x, (1, k), &Device::Cpu).unwrap();
        group.bench_function(BenchmarkId::from_parameter("candle_q8_0_expert_2880x2880"), |b| {
            b.iter(|| mm.forward(&xt).unwrap())
        });
        // The kernel against a layer's dequantized f32 product as an expert's rows grow (the
        // kernel won at every length measured, so `linear.rs` runs it at every length).
        for m in [8usize, 16, 32, 64, 128, 256] {
            let xs: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.37).cos()).collect();
            let mut ys = vec![0f32; m * n];
            group.bench_function(BenchmarkId::new("mxfp4_rows_kernel", m), |b| {
                b.iter(|| mxfp4::matmul(&blocks, (n, k), &xs, &mut ys).unwrap())
            });
            let xt = Tensor::from_vec(xs.clone(), (m, k), &Device::Cpu).unwrap();
            group.bench_function(BenchmarkId::new("mxfp4_rows_dequantized", m), |b| {
                b.iter(|| {
                    let mut w = Vec::with_capacity(n * k);
                    mxfp4::dequantize_ggml(&blocks, &mut w);
                    xt.matmul(&Tensor::from_vec(w, (n, k), &Device::Cpu).unwrap().t().unwrap()).unwrap()
                })
            });
        }
    }
    let (n, k) = (49152, 576);
    let w = weights(n, k, GgmlDType::Q8_0);
    group.throughput(Throughput::Bytes(w.storage_size_in_bytes() as u64));
    let mm = QMatMul::from_qtensor(w).unwrap();
    let x =
        Tensor::from_vec((0..k).map(|i| (i as f32 * 0.37).cos()).collect::<Vec<f32>>(), (1, k), &Device::Cpu).unwrap();
    group.bench_function(BenchmarkId::from_parameter("candle_q8_0_lm_head_49152x576"), |b| {
        b.iter(|| mm.forward(&x).unwrap())
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
