//! Small single-threaded matrix products over plain slices, for the hand-fused CPU kernels
//! (training attention, prompt attention by query tiles).

/// A row-major view for [`matmul`]: the slice and its (row, column) strides in elements.
pub type View<'a> = (&'a [f32], usize, usize);

/// `dst[m x n] (+)= beta * lhs[m x k] rhs[k x n]` (dst row-major with row stride `dst_rs`) on
/// one thread with the `gemm` crate (candle's CPU matmul kernel) over strided views of plain
/// slices, which candle's tensors do not offer without a copy; the callers parallelise.
#[allow(clippy::too_many_arguments)]
pub fn matmul(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    dst_rs: usize,
    add: bool,
    lhs: View,
    rhs: View,
    beta: f32,
) {
    let (l, l_rs, l_cs) = lhs;
    let (r, r_rs, r_cs) = rhs;
    if m == 0 || n == 0 {
        return;
    }
    let last = |rs: usize, cs: usize, rows: usize, cols: usize| (rows - 1) * rs + (cols - 1) * cs;
    assert!(last(dst_rs, 1, m, n) < dst.len(), "matmul destination too short");
    assert!(
        k == 0 || (last(l_rs, l_cs, m, k) < l.len() && last(r_rs, r_cs, k, n) < r.len()),
        "matmul operand too short"
    );
    // SAFETY: every element the strides reach lies inside its slice (asserted above), and `dst`
    // is borrowed mutably, so it aliases neither operand.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_rs as isize,
            add,
            l.as_ptr(),
            l_cs as isize,
            l_rs as isize,
            r.as_ptr(),
            r_cs as isize,
            r_rs as isize,
            1.0,
            beta,
            false,
            false,
            false,
            gemm::Parallelism::None,
        )
    }
}
