//! Weight matrices that are dense or kept in a GGUF block format: linear layers ([`Proj`]) and the
//! token embedding ([`Embedding`]). Quantized weights use candle's `QMatMul` kernels (ours in
//! [`super::q4_1`] for Q4_1) for short inputs (decode) and are dequantized for long ones (prompt
//! chunks), where a dense matmul is faster than a quantized loop; MXFP4 weights always run our
//! kernel ([`super::mxfp4`]), faster than dequantizing at every length measured.

use std::sync::Arc;

use anyhow::{bail, Result};
use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Module, Shape, Tensor};
use candle_nn::Linear;

use super::weights::block_tensor;

/// From this many input rows on, a quantized projection dequantizes its weight and runs a dense
/// matmul. Measured on the 2-core development machine (SmolLM2-135M, Q8_0): see
/// `benches/results/quantized-smollm2-cpu-*.json`.
const DENSE_FROM_ROWS: usize = 16;

/// A linear layer `y = x W^T (+ b)`.
#[derive(Clone)]
pub enum Proj {
    /// A dense weight in the model's dtype.
    Dense(Linear),
    /// A weight in a GGUF block format.
    Quantized {
        /// The blocks.
        weight: Arc<QTensor>,
        /// candle's quantized matmul over them.
        matmul: QMatMul,
        /// Optional bias `[out]`, f32.
        bias: Option<Tensor>,
    },
    /// A weight in ggml's MXFP4 blocks (GPT-OSS's experts), which candle cannot hold: our kernel
    /// ([`super::mxfp4::matmul`]) at every length.
    Mxfp4 {
        /// The blocks, row after row.
        blocks: Arc<Vec<u8>>,
        /// `(out, in)`.
        shape: (usize, usize),
        /// Optional bias `[out]`, f32.
        bias: Option<Tensor>,
    },
}

/// The kernels of ours a layer's weight format has (see [`Proj::forward_many`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kernel {
    Q4_1,
    Mxfp4,
}

/// A layer's weight as one of our kernels reads it.
struct KernelInput<'a> {
    kernel: Kernel,
    /// The blocks, row after row.
    bytes: &'a [u8],
    /// Output rows.
    rows: usize,
    bias: Option<&'a Tensor>,
}

/// `x W_i^T` (no bias) for layers `inputs` of one kernel, in one pass over `x` (`[.., in]`).
fn run_kernel(inputs: &[KernelInput], x: &Tensor) -> Result<Vec<Tensor>> {
    let k = x.dim(candle_core::D::Minus1)?;
    let m = x.elem_count() / k.max(1);
    let xs = x.flatten_all()?.to_vec1::<f32>()?;
    let mut ys: Vec<Vec<f32>> = inputs.iter().map(|i| vec![0f32; m * i.rows]).collect();
    let ws: Vec<(&[u8], usize)> = inputs.iter().map(|i| (i.bytes, i.rows)).collect();
    let mut outs: Vec<&mut [f32]> = ys.iter_mut().map(|y| y.as_mut_slice()).collect();
    match inputs.first().map(|i| i.kernel) {
        Some(Kernel::Mxfp4) => super::mxfp4::matmul_many(&ws, k, &xs, &mut outs)?,
        Some(Kernel::Q4_1) => super::q4_1::matmul_many(&ws, k, &xs, &mut outs)?,
        None => {}
    }
    ys.into_iter()
        .zip(inputs)
        .map(|(y, i)| {
            let mut dims = x.dims().to_vec();
            *dims.last_mut().expect("rank >= 1") = i.rows;
            Ok(Tensor::from_vec(y, dims, x.device())?)
        })
        .collect()
}

impl Proj {
    /// A quantized projection over `weight` (`[out, in]`).
    pub fn quantized(weight: QTensor, bias: Option<Tensor>) -> Result<Self> {
        let weight = Arc::new(weight);
        let matmul = QMatMul::from_arc(weight.clone())?;
        Ok(Proj::Quantized { weight, matmul, bias })
    }

    /// Applies the layer to `[n, in]` rows.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Proj::Dense(l) => match l.bias() {
                Some(b) => add_bias(&x.broadcast_matmul(&l.weight().t()?)?, b),
                None => Ok(l.forward(x)?),
            },
            Proj::Quantized { weight, matmul, bias } => {
                let x = x.contiguous()?;
                let rows = x.elem_count() / x.dim(candle_core::D::Minus1)?.max(1);
                let y = match self.kernel_input(rows) {
                    Some(input) => run_kernel(&[input], &x)?.pop().expect("one output"),
                    None if rows >= DENSE_FROM_ROWS => x.broadcast_matmul(&weight.dequantize(x.device())?.t()?)?,
                    None => matmul.forward(&x)?,
                };
                match bias {
                    Some(b) => add_bias(&y, b),
                    None => Ok(y),
                }
            }
            // Our kernel at every length: on GPT-OSS-20B's `[2880, 2880]` it took 13.7 ms for 128
            // rows against 18.5 dequantized and 27.7 against 33.2 for 256, each row costing about
            // what it costs dequantized (`cargo bench -p dms-benches --bench quantized_matmul --
            // mxfp4_rows`, the 2-core development machine, 2026-12-08), and dequantizing would
            // allocate the whole f32 matrix.
            Proj::Mxfp4 { blocks, shape, bias } => {
                let input = KernelInput { kernel: Kernel::Mxfp4, bytes: blocks, rows: shape.0, bias: bias.as_ref() };
                let y = run_kernel(&[input], &x.contiguous()?)?.pop().expect("one output");
                match bias {
                    Some(b) => add_bias(&y, b),
                    None => Ok(y),
                }
            }
        }
    }

    /// This layer's weight for our kernel, where one runs it on `rows` inputs.
    fn kernel_input(&self, rows: usize) -> Option<KernelInput<'_>> {
        match self {
            Proj::Quantized { weight, bias, .. } if weight.dtype() == GgmlDType::Q4_1 && rows < DENSE_FROM_ROWS => {
                let data = weight.data().ok()?;
                let std::borrow::Cow::Borrowed(bytes) = data else { return None };
                Some(KernelInput {
                    kernel: Kernel::Q4_1,
                    bytes,
                    rows: weight.shape().dims2().ok()?.0,
                    bias: bias.as_ref(),
                })
            }
            Proj::Mxfp4 { blocks, shape, bias } => Some(KernelInput {
                kernel: Kernel::Mxfp4,
                bytes: blocks.as_slice(),
                rows: shape.0,
                bias: bias.as_ref(),
            }),
            _ => None,
        }
    }

    /// Applies several layers to the same `[n, in]` rows: layers of one format our kernels run
    /// (Q4_1 over short inputs, MXFP4 over any) share one pass ([`super::q4_1::matmul_many`],
    /// [`super::mxfp4::matmul_many`]), the others run one by one.
    pub fn forward_many(projs: &[&Proj], x: &Tensor) -> Result<Vec<Tensor>> {
        let x = x.contiguous()?;
        let k = x.dim(candle_core::D::Minus1)?;
        let rows = x.elem_count() / k.max(1);
        let shared: Vec<KernelInput> = projs.iter().filter_map(|p| p.kernel_input(rows)).collect();
        let one_kernel = shared.windows(2).all(|w| w[0].kernel == w[1].kernel);
        if shared.len() != projs.len() || projs.len() < 2 || !one_kernel {
            return projs.iter().map(|p| p.forward(&x)).collect();
        }
        run_kernel(&shared, &x)?
            .into_iter()
            .zip(&shared)
            .map(|(y, input)| match input.bias {
                Some(b) => add_bias(&y, b),
                None => Ok(y),
            })
            .collect()
    }

    /// Applies the layer as a constant of a differentiable computation: the gradient reaches `x`
    /// only. On the CPU a dense weight gets no gradient computed at all ([`frozen_matmul`]);
    /// quantized layers run their normal forward.
    pub fn forward_frozen(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Proj::Dense(l) => {
                let y = frozen_matmul(x, l.weight())?;
                match l.bias() {
                    Some(b) => add_bias(&y, b),
                    None => Ok(y),
                }
            }
            Proj::Quantized { .. } | Proj::Mxfp4 { .. } => self.forward(x),
        }
    }

    /// The dense weight, or an error for a quantized one (gradients and dtype changes need it).
    pub fn dense_weight(&self) -> Result<&Tensor> {
        match self {
            Proj::Dense(l) => Ok(l.weight()),
            Proj::Quantized { .. } | Proj::Mxfp4 { .. } => {
                bail!("this operation needs dense weights; load the model with weights = \"dense\"")
            }
        }
    }

    /// The same layer with a dense weight converted to `dtype`; a quantized one is unchanged
    /// (its kernels compute in f32).
    pub fn to_dtype(&self, dtype: DType) -> Result<Self> {
        Ok(match self {
            Proj::Dense(l) => {
                Proj::Dense(Linear::new(l.weight().to_dtype(dtype)?, l.bias().map(|b| b.to_dtype(dtype)).transpose()?))
            }
            Proj::Quantized { .. } | Proj::Mxfp4 { .. } => self.clone(),
        })
    }

    /// Number of weights (bias included).
    pub fn weight_count(&self) -> usize {
        match self {
            Proj::Dense(l) => l.weight().elem_count() + l.bias().map_or(0, |b| b.elem_count()),
            Proj::Quantized { weight, bias, .. } => {
                weight.shape().elem_count() + bias.as_ref().map_or(0, |b| b.elem_count())
            }
            Proj::Mxfp4 { shape, bias, .. } => shape.0 * shape.1 + bias.as_ref().map_or(0, |b| b.elem_count()),
        }
    }

    /// Bytes the weights take in memory.
    pub fn byte_count(&self) -> usize {
        match self {
            Proj::Dense(l) => {
                let b = l.bias().map_or(0, |b| b.elem_count() * b.dtype().size_in_bytes());
                l.weight().elem_count() * l.weight().dtype().size_in_bytes() + b
            }
            Proj::Quantized { weight, bias, .. } => {
                weight.storage_size_in_bytes() + bias.as_ref().map_or(0, |b| b.elem_count() * 4)
            }
            Proj::Mxfp4 { blocks, bias, .. } => blocks.len() + bias.as_ref().map_or(0, |b| b.elem_count() * 4),
        }
    }

    /// The block format of a weight candle holds quantized (None for dense and MXFP4 layers).
    pub fn quant_dtype(&self) -> Option<GgmlDType> {
        match self {
            Proj::Dense(_) | Proj::Mxfp4 { .. } => None,
            Proj::Quantized { weight, .. } => Some(weight.dtype()),
        }
    }
}

/// `y + b`, the bias `[out]` added to every row of `y` (`[.., out]`) as the outer product
/// `ones · b` (one matmul, exact) and a contiguous add, not a broadcast: candle's CUDA broadcast
/// ops upload their layout from the host, which a captured decode step cannot replay.
fn add_bias(y: &Tensor, b: &Tensor) -> Result<Tensor> {
    let out = b.elem_count();
    let rows = y.elem_count() / out.max(1);
    let ones = Tensor::ones((rows, 1), y.dtype(), y.device())?;
    let every_row = ones.matmul(&b.to_dtype(y.dtype())?.reshape((1, out))?)?.reshape(y.shape())?;
    Ok((y.contiguous()? + every_row)?)
}

/// A token embedding table `[vocab, hidden]`.
pub enum Embedding {
    /// Dense rows in the model's dtype.
    Dense(Tensor),
    /// Rows in a GGUF block format, dequantized when looked up.
    Quantized(Arc<QTensor>),
}

impl Embedding {
    /// The rows of `tokens` (ids already checked against the vocabulary), `[n, hidden]`.
    pub fn lookup(&self, tokens: &[u32], device: &Device) -> Result<Tensor> {
        match self {
            Embedding::Dense(t) => Ok(t.index_select(&Tensor::new(tokens, device)?, 0)?),
            Embedding::Quantized(q) => {
                let (_, hidden) = q.shape().dims2()?;
                let dt = q.dtype();
                let row_bytes = hidden / dt.block_size() * dt.type_size();
                let data = q.data()?;
                let mut rows = Vec::with_capacity(tokens.len() * row_bytes);
                for &t in tokens {
                    let at = t as usize * row_bytes;
                    rows.extend_from_slice(&data[at..at + row_bytes]);
                }
                Ok(block_tensor(rows, dt, (tokens.len(), hidden))?.dequantize(device)?)
            }
        }
    }

    /// The dense table, or an error for a quantized one.
    pub fn dense(&self) -> Result<&Tensor> {
        match self {
            Embedding::Dense(t) => Ok(t),
            Embedding::Quantized(_) => {
                bail!("this operation needs dense weights; load the model with weights = \"dense\"")
            }
        }
    }

    /// Bytes the table takes in memory.
    pub fn byte_count(&self) -> usize {
        match self {
            Embedding::Dense(t) => t.elem_count() * t.dtype().size_in_bytes(),
            Embedding::Quantized(q) => q.storage_size_in_bytes(),
        }
    }

    /// Number of weights.
    pub fn weight_count(&self) -> usize {
        match self {
            Embedding::Dense(t) => t.elem_count(),
            Embedding::Quantized(q) => q.shape().elem_count(),
        }
    }
}

/// `x W^T` for a frozen weight `w` (`[out, in]`) and `x` (`[.., in]`), differentiable in `x`
/// only. candle's matmul backward also computes the weight's gradient, which a retrofit (a frozen
/// model under a small adapter) throws away: a third of its matmul work. Other devices use the
/// plain matmul.
pub fn frozen_matmul(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    if !x.device().is_cpu() {
        return Ok(x.broadcast_matmul(&w.t()?)?);
    }
    Ok(x.contiguous()?.apply_op1(FrozenMatmul { w: w.clone() })?)
}

/// The op behind [`frozen_matmul`]: forward through candle's matmul, backward `dx = dy W`.
struct FrozenMatmul {
    w: Tensor,
}

impl CustomOp1 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "dms-frozen-matmul"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let Some((a, b)) = l.contiguous_offsets() else {
            return Err(candle_core::Error::Msg("frozen matmul needs a contiguous input".into()));
        };
        let x = match s {
            CpuStorage::F32(v) => Tensor::from_slice(&v[a..b], l.shape(), &Device::Cpu)?,
            _ => return Err(candle_core::Error::Msg("frozen matmul computes in f32".into())),
        };
        let y = x.broadcast_matmul(&self.w.t()?)?;
        let shape = y.shape().clone();
        Ok((CpuStorage::F32(y.flatten_all()?.to_vec1::<f32>()?), shape))
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, dy: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(dy.broadcast_matmul(&self.w)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Var;

    #[test]
    fn frozen_matmul_equals_matmul_and_its_input_gradient() -> Result<()> {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, 7, 12), &dev)?)?;
        let w = Tensor::randn(0f32, 1.0, (5, 12), &dev)?;
        let r = Tensor::randn(0f32, 1.0, (2, 7, 5), &dev)?;
        let want = x.broadcast_matmul(&w.t()?)?;
        let got = frozen_matmul(&x, &w)?;
        let gw = (&want * &r)?.sum_all()?.backward()?;
        let gg = (&got * &r)?.sum_all()?.backward()?;
        let flat = |t: &Tensor| t.flatten_all().and_then(|t| t.to_vec1::<f32>());
        let pairs = [(flat(&got)?, flat(&want)?), (flat(gg.get(&x).unwrap())?, flat(gw.get(&x).unwrap())?)];
        for (a, b) in pairs {
            for (p, q) in a.iter().zip(&b) {
                assert!((p - q).abs() < 1e-5, "{p} vs {q}");
            }
        }
        Ok(())
    }

    /// The bias added through `ones · b` equals candle's broadcast add bit for bit (2-D and 3-D
    /// rows, f32 and f16), and a biased dense layer equals candle's `Linear`.
    #[test]
    fn bias_by_matmul_equals_a_broadcast_add() -> Result<()> {
        let dev = Device::Cpu;
        for dtype in [DType::F32, DType::F16] {
            for shape in [vec![3usize, 11], vec![2, 5, 11], vec![1, 11]] {
                let y = Tensor::randn(0f32, 3.0, shape.as_slice(), &dev)?.to_dtype(dtype)?;
                let b = Tensor::randn(0f32, 3.0, 11, &dev)?.to_dtype(dtype)?;
                let bits = |t: &Tensor| t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>();
                assert_eq!(bits(&add_bias(&y, &b)?)?, bits(&y.broadcast_add(&b)?)?, "{dtype:?} {shape:?}");
            }
        }
        let w = Tensor::randn(0f32, 1.0, (5, 12), &dev)?;
        let b = Tensor::randn(0f32, 1.0, 5, &dev)?;
        let x = Tensor::randn(0f32, 1.0, (4, 12), &dev)?;
        let linear = Linear::new(w, Some(b));
        let want = linear.forward(&x)?.flatten_all()?.to_vec1::<f32>()?;
        let got = Proj::Dense(linear).forward(&x)?.flatten_all()?.to_vec1::<f32>()?;
        assert_eq!(got, want);
        Ok(())
    }

    /// An MXFP4 layer gives the product of its dequantized weights plus its bias within the
    /// activations' 8-bit rounding, for one row, a few, and more than a tile of them.
    #[test]
    fn an_mxfp4_layer_is_its_dequantized_product_long_or_short() -> Result<()> {
        let dev = Device::Cpu;
        let (out, k) = (6, 64);
        let blocks: Vec<u8> = (0..out * k / 32)
            .flat_map(|b| {
                std::iter::once(124 + (b % 5) as u8).chain((0..16).map(move |j| ((b * 37 + j * 11) % 256) as u8))
            })
            .collect();
        let mut w = Vec::new();
        super::super::mxfp4::dequantize_ggml(&blocks, &mut w);
        let bias: Vec<f32> = (0..out).map(|o| o as f32 * 0.25 - 0.5).collect();
        let proj =
            Proj::Mxfp4 { blocks: Arc::new(blocks), shape: (out, k), bias: Some(Tensor::new(bias.as_slice(), &dev)?) };
        let rows = 9;
        let x: Vec<f32> = (0..rows * k).map(|i| (i as f32 * 0.61).sin() * (1.0 + (i % 5) as f32)).collect();
        let naive = |r: usize, o: usize| -> f64 {
            (0..k).map(|i| x[r * k + i] as f64 * w[o * k + i] as f64).sum::<f64>() + bias[o] as f64
        };
        for n in [rows, 2, 1] {
            let y = proj.forward(&Tensor::from_slice(&x[..n * k], (n, k), &dev)?)?.to_vec2::<f32>()?;
            for (r, row) in y.iter().enumerate() {
                for (o, &got) in row.iter().enumerate() {
                    // An activation rounded to 8 bits moves by at most its block's max / 254.
                    let rounding: f64 = (0..k)
                        .map(|i| {
                            let block = &x[r * k + i / 32 * 32..r * k + i / 32 * 32 + 32];
                            let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
                            w[o * k + i].abs() as f64 * amax as f64 / 254.0
                        })
                        .sum();
                    let tol = rounding + 1e-4;
                    assert!((got as f64 - naive(r, o)).abs() <= tol, "{n} rows, [{r}, {o}]: {got} vs {}", naive(r, o));
                }
            }
        }
        Ok(())
    }
}
