//! The retrofit's distillation loss, `KL(student || teacher)` per position over the vocabulary,
//! fused on the CPU with its own backward.
//!
//! Written by hand because the composed form (two log-softmaxes, an exponential, a difference,
//! a product and a sum, each with its autograd) allocates about a dozen `[T, vocab]` tensors per
//! step (200 MB each at 1K tokens for a 49K vocabulary); the fused op reads the two logit rows
//! once forward and once backward and allocates only the gradient. Other devices use the
//! composed form ([`composed`]), which is also the tests' oracle.

use anyhow::{bail, Result};
use candle_core::{CpuStorage, CustomOp2, Layout, Shape, Tensor, D};
use rayon::prelude::*;

use super::train_attention::cpu_slice;

/// `KL(softmax(student) || softmax(teacher))` of each row of two `[T, vocab]` logit tensors,
/// `[T]`; differentiable in `student` (the teacher is a constant).
pub fn kl_rows(student: &Tensor, teacher: &Tensor) -> Result<Tensor> {
    if student.dims() != teacher.dims() || student.rank() != 2 {
        bail!("KL needs two [T, vocab] logit tensors, got {:?} and {:?}", student.dims(), teacher.dims());
    }
    if !student.device().is_cpu() {
        return composed(student, teacher);
    }
    let (t, vocab) = student.dims2()?;
    Ok(student.contiguous()?.apply_op2(&teacher.detach().contiguous()?, KlRows { t, vocab })?)
}

/// The same loss composed of candle ops (any device).
pub fn composed(student: &Tensor, teacher: &Tensor) -> Result<Tensor> {
    let ls = candle_nn::ops::log_softmax(student, D::Minus1)?;
    let lt = candle_nn::ops::log_softmax(&teacher.detach(), D::Minus1)?;
    Ok((ls.exp()? * (&ls - &lt)?)?.sum(D::Minus1)?)
}

struct KlRows {
    t: usize,
    vocab: usize,
}

/// `ln Σ exp(x)`, stable.
fn log_sum_exp(x: &[f32]) -> f32 {
    let m = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    m + x.iter().map(|v| (v - m).exp()).sum::<f32>().ln()
}

/// One row's KL with its student and teacher log-normalisers.
fn row_kl(s: &[f32], t: &[f32]) -> (f32, f32, f32) {
    let (zs, zt) = (log_sum_exp(s), log_sum_exp(t));
    let kl = s.iter().zip(t).map(|(a, b)| (a - zs).exp() * ((a - zs) - (b - zt))).sum();
    (kl, zs, zt)
}

impl CustomOp2 for KlRows {
    fn name(&self) -> &'static str {
        "dms-distill-kl"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (s, t) = (cpu_slice(s1, l1)?, cpu_slice(s2, l2)?);
        let kl: Vec<f32> =
            s.par_chunks(self.vocab).zip(t.par_chunks(self.vocab)).map(|(a, b)| row_kl(a, b).0).collect();
        Ok((CpuStorage::F32(kl), Shape::from(self.t)))
    }

    /// `d KL_i / d s_iv = p_iv ((ls_iv - lt_iv) - KL_i)`, times the row's incoming gradient.
    fn bwd(
        &self,
        student: &Tensor,
        teacher: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let s = student.flatten_all()?.to_vec1::<f32>()?;
        let t = teacher.flatten_all()?.to_vec1::<f32>()?;
        let g = grad_res.to_vec1::<f32>()?;
        let mut grad = vec![0f32; s.len()];
        grad.par_chunks_mut(self.vocab)
            .zip(s.par_chunks(self.vocab).zip(t.par_chunks(self.vocab)))
            .zip(g.par_iter())
            .for_each(|((out, (a, b)), &gi)| {
                let (kl, zs, zt) = row_kl(a, b);
                for ((o, x), y) in out.iter_mut().zip(a).zip(b) {
                    let ls = x - zs;
                    *o = gi * ls.exp() * ((ls - (y - zt)) - kl);
                }
            });
        Ok((Some(Tensor::from_vec(grad, student.shape(), student.device())?), None))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};
    use rand::{rngs::StdRng, Rng, SeedableRng};

    /// Seeded logits uniform in [-w, w] (candle's CPU generator cannot be seeded): the test sees
    /// the same logits on every run.
    fn logits(rng: &mut StdRng, n: usize, w: f32) -> Vec<f32> {
        (0..n).map(|_| rng.random_range(-w..w)).collect()
    }

    #[test]
    fn fused_kl_and_its_gradient_equal_the_composed_autograd() -> Result<()> {
        let dev = Device::Cpu;
        let (rows, vocab) = (37, 501);
        let mut rng = StdRng::seed_from_u64(11);
        let (sv, tv) = (logits(&mut rng, rows * vocab, 9.0), logits(&mut rng, rows * vocab, 9.0));
        let s = Var::from_tensor(&Tensor::from_vec(sv.clone(), (rows, vocab), &dev)?)?;
        let t = Tensor::from_vec(tv.clone(), (rows, vocab), &dev)?;
        let w = Tensor::from_vec((0..rows).map(|_| rng.random::<f32>()).collect::<Vec<_>>(), rows, &dev)?;
        let run = |f: &dyn Fn() -> Result<Tensor>| -> Result<(Vec<f32>, Vec<f32>)> {
            let kl = f()?;
            let g = (&kl * &w)?.sum_all()?.backward()?;
            Ok((kl.to_vec1()?, g.get(s.as_tensor()).expect("gradient").flatten_all()?.to_vec1()?))
        };
        let (want, want_g) = run(&|| composed(&s, &t))?;
        let (got, got_g) = run(&|| kl_rows(&s, &t))?;
        // Both sides round log-probabilities of the row's magnitude in f32: allow a few ulps of
        // the row's largest logit beside the relative tolerance.
        let ulps = |i: usize| {
            let r = i / vocab;
            let big = sv[r * vocab..(r + 1) * vocab]
                .iter()
                .chain(&tv[r * vocab..(r + 1) * vocab])
                .fold(0f32, |m, x| m.max(x.abs()));
            8.0 * f32::EPSILON * big
        };
        for (i, (x, y)) in got.iter().zip(&want).enumerate() {
            assert!((x - y).abs() <= 1e-5 * (1.0 + y.abs()) + ulps(i * vocab), "kl[{i}]: fused {x} vs composed {y}");
        }
        for (i, (x, y)) in got_g.iter().zip(&want_g).enumerate() {
            assert!((x - y).abs() <= 1e-5 * (1.0 + y.abs()) + ulps(i), "grad[{i}]: fused {x} vs composed {y}");
        }
        assert!(want.iter().all(|&k| k > 0.0), "random logits give a positive KL");
        Ok(())
    }
}
