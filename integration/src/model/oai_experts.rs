//! GPT-OSS's experts in its safetensors checkpoints, read under per-expert HF names
//! (`model.layers.N.mlp.experts.E.{gate,up,down}_proj.{weight,bias}`).
//!
//! Every layer keeps its experts packed, gate and up interleaved (gate row `j` is row `2j` of the
//! pair, up row `j` is row `2j + 1`):
//! - `mlp.experts.gate_up_proj_bias` `[experts, 2 x width]`, `down_proj_bias` `[experts, hidden]`;
//! - bf16 copies: `gate_up_proj` `[experts, hidden, 2 x width]` and `down_proj`
//!   `[experts, width, hidden]` (transposed: the model computes `x @ W`);
//! - as OpenAI ships them, MXFP4: `gate_up_proj_blocks` `[experts, 2 x width, hidden / 32, 16]`
//!   with `gate_up_proj_scales` `[experts, 2 x width, hidden / 32]`, and `down_proj_blocks`
//!   `[experts, hidden, width / 32, 16]` with its scales (rows are output features).

use anyhow::{bail, Context, Result};
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};

use super::mxfp4;

/// Which projection of an expert.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Part {
    /// `gate_proj`: the even rows of `gate_up_proj`.
    Gate,
    /// `up_proj`: the odd rows of `gate_up_proj`.
    Up,
    /// `down_proj`.
    Down,
}

/// One expert's projection weight or bias in a GPT-OSS layer.
pub(crate) struct OaiExpert {
    /// `model.layers.N.mlp.experts.gate_up_proj` or `...down_proj`.
    packed: String,
    index: usize,
    part: Part,
    bias: bool,
}

impl OaiExpert {
    /// Where `name` lies, when it names one expert's projection and `files` pack the layer's
    /// experts as GPT-OSS does (its `gate_up_proj_bias` tells the layout apart from
    /// transformers 5's packing of other models, which has no biases).
    pub(crate) fn of(name: &str, files: &MmapedSafetensors) -> Option<Self> {
        let (layer, rest) = name.split_once(".mlp.experts.")?;
        files.get(&format!("{layer}.mlp.experts.gate_up_proj_bias")).ok()?;
        let (index, proj) = rest.split_once('.')?;
        let (part, bias) = match proj {
            "gate_proj.weight" => (Part::Gate, false),
            "up_proj.weight" => (Part::Up, false),
            "down_proj.weight" => (Part::Down, false),
            "gate_proj.bias" => (Part::Gate, true),
            "up_proj.bias" => (Part::Up, true),
            "down_proj.bias" => (Part::Down, true),
            _ => return None,
        };
        let packed = if part == Part::Down { "down_proj" } else { "gate_up_proj" };
        Some(Self { packed: format!("{layer}.mlp.experts.{packed}"), index: index.parse().ok()?, part, bias })
    }

    /// Whether the checkpoint holds it (in either layout).
    pub(crate) fn exists(&self, files: &MmapedSafetensors) -> bool {
        let lead = |n: &str| files.get(n).ok().and_then(|v| v.shape().first().copied());
        let stored = if self.bias {
            lead(&format!("{}_bias", self.packed))
        } else {
            lead(&format!("{}_blocks", self.packed)).or_else(|| lead(&self.packed))
        };
        stored.is_some_and(|experts| self.index < experts)
    }

    /// The expert's projection as f32 on the CPU: a weight `[out, in]` or a bias `[out]`, checked
    /// against `shape`; only the expert's bytes are read.
    pub(crate) fn load(&self, files: &MmapedSafetensors, shape: &[usize]) -> Result<Tensor> {
        if self.bias {
            return self.load_bias(files, shape);
        }
        let &[out, inp] = shape else { bail!("tensor `{}`: experts are matrices, not {shape:?}", self.packed) };
        let blocks = format!("{}_blocks", self.packed);
        if files.get(&blocks).is_ok() {
            return self.load_mxfp4(files, &blocks, out, inp);
        }
        let view = files.get(&self.packed).with_context(|| format!("tensor `{}` is missing", self.packed))?;
        let dtype = DType::try_from(view.dtype()).with_context(|| format!("tensor `{}`", self.packed))?;
        // Stored transposed: `[experts, in, pairs x out]`.
        let pairs = if self.part == Part::Down { 1 } else { 2 };
        let dims = view.shape();
        if dims.len() != 3 || dims[1] != inp || dims[2] != pairs * out || self.index >= dims[0] {
            bail!(
                "GPT-OSS expert tensor `{}` has shape {dims:?}, but expert {} of [{inp}, {}] is asked for \
                 (config.json does not match the weights)",
                self.packed,
                self.index,
                pairs * out
            );
        }
        if !matches!(dtype, DType::F32 | DType::F16 | DType::BF16) {
            bail!("GPT-OSS expert tensor `{}` is stored as {dtype:?}; f32, f16 or bf16 expected", self.packed);
        }
        let slab = inp * pairs * out * dtype.size_in_bytes();
        let bytes = view
            .data()
            .get(self.index * slab..(self.index + 1) * slab)
            .with_context(|| format!("tensor `{}` is truncated", self.packed))?;
        let t = Tensor::from_raw_buffer(bytes, dtype, &[inp, out, pairs], &Device::Cpu)?.to_dtype(DType::F32)?;
        let t = t.narrow(2, if self.part == Part::Up { 1 } else { 0 }, 1)?.squeeze(2)?;
        Ok(t.t()?.contiguous()?)
    }

    /// A bias: row `index` of `{packed}_bias`, its even or odd entries for gate or up; only that
    /// row's bytes are read.
    fn load_bias(&self, files: &MmapedSafetensors, shape: &[usize]) -> Result<Tensor> {
        let name = format!("{}_bias", self.packed);
        let &[out] = shape else { bail!("tensor `{name}`: an expert's bias is a vector, not {shape:?}") };
        let pairs = if self.part == Part::Down { 1 } else { 2 };
        let view = files.get(&name).with_context(|| format!("tensor `{name}` is missing"))?;
        let dims = view.shape();
        if dims.len() != 2 || dims[1] != pairs * out || self.index >= dims[0] {
            bail!(
                "GPT-OSS expert bias `{name}` has shape {dims:?}, but expert {} of {} is asked for \
                 (config.json does not match the weights)",
                self.index,
                pairs * out
            );
        }
        let dtype = DType::try_from(view.dtype()).with_context(|| format!("tensor `{name}`"))?;
        let row_bytes = pairs * out * dtype.size_in_bytes();
        let bytes = view
            .data()
            .get(self.index * row_bytes..(self.index + 1) * row_bytes)
            .with_context(|| format!("tensor `{name}` is truncated"))?;
        let row = Tensor::from_raw_buffer(bytes, dtype, &[out, pairs], &Device::Cpu)?.to_dtype(DType::F32)?;
        Ok(row.narrow(1, if self.part == Part::Up { 1 } else { 0 }, 1)?.squeeze(1)?.contiguous()?)
    }

    /// The expert's weight (`shape`, `[out, in]`) in ggml's MXFP4 blocks, when the checkpoint
    /// stores it in MXFP4 (`None` for a bias or a dense copy).
    pub(crate) fn mxfp4_blocks(&self, files: &MmapedSafetensors, shape: &[usize]) -> Result<Option<Vec<u8>>> {
        let blocks = format!("{}_blocks", self.packed);
        if self.bias || files.get(&blocks).is_err() {
            return Ok(None);
        }
        let &[out, inp] = shape else { bail!("tensor `{}`: experts are matrices, not {shape:?}", self.packed) };
        let mut bytes = Vec::with_capacity(out * inp / mxfp4::BLOCK * mxfp4::GGML_BLOCK_BYTES);
        self.mxfp4_rows(files, &blocks, out, inp, &mut |b, s| mxfp4::hf_row_to_ggml(b, s, &mut bytes))?;
        Ok(Some(bytes))
    }

    /// A weight from its MXFP4 blocks (`[experts, rows, in / 32, 16]`) and scales.
    fn load_mxfp4(&self, files: &MmapedSafetensors, blocks: &str, out: usize, inp: usize) -> Result<Tensor> {
        let mut values = Vec::with_capacity(out * inp);
        self.mxfp4_rows(files, blocks, out, inp, &mut |b, s| mxfp4::dequantize_hf_row(b, s, &mut values))?;
        Ok(Tensor::from_vec(values, (out, inp), &Device::Cpu)?)
    }

    /// Hands each of the expert's `out` rows (of `inp` values) to `row` as its MXFP4 blocks and
    /// scales, after checking the tensors' shapes and types.
    fn mxfp4_rows(
        &self,
        files: &MmapedSafetensors,
        blocks: &str,
        out: usize,
        inp: usize,
        row: &mut dyn FnMut(&[u8], &[u8]),
    ) -> Result<()> {
        let scales = format!("{}_scales", self.packed);
        let (bv, sv) =
            (files.get(blocks)?, files.get(&scales).with_context(|| format!("tensor `{scales}` is missing"))?);
        let rows = if self.part == Part::Down { out } else { 2 * out };
        let groups = inp / mxfp4::BLOCK;
        let (bd, sd) = (bv.shape(), sv.shape());
        let fits = inp.is_multiple_of(mxfp4::BLOCK)
            && bd.len() == 4
            && bd[1..] == [rows, groups, mxfp4::BLOCK / 2]
            && sd.len() == 3
            && sd[1..] == [rows, groups]
            && bd[0] == sd[0]
            && self.index < bd[0];
        if !fits {
            bail!(
                "GPT-OSS MXFP4 tensors `{blocks}` {bd:?} and `{scales}` {sd:?} do not hold expert {} of \
                 [{rows}, {inp}] (config.json does not match the weights)",
                self.index
            );
        }
        for (name, v) in [(blocks, &bv), (scales.as_str(), &sv)] {
            if DType::try_from(v.dtype()).ok() != Some(DType::U8) {
                bail!("GPT-OSS MXFP4 tensor `{name}` is stored as {:?}; u8 expected", v.dtype());
            }
        }
        let row_bytes = groups * mxfp4::BLOCK / 2;
        let expert_blocks = bv
            .data()
            .get(self.index * rows * row_bytes..(self.index + 1) * rows * row_bytes)
            .with_context(|| format!("tensor `{blocks}` is truncated"))?;
        let expert_scales = sv
            .data()
            .get(self.index * rows * groups..(self.index + 1) * rows * groups)
            .with_context(|| format!("tensor `{scales}` is truncated"))?;
        let (first, step) = match self.part {
            Part::Gate => (0, 2),
            Part::Up => (1, 2),
            Part::Down => (0, 1),
        };
        for r in (first..rows).step_by(step) {
            row(&expert_blocks[r * row_bytes..(r + 1) * row_bytes], &expert_scales[r * groups..(r + 1) * groups]);
        }
        Ok(())
    }
}
