//! The CUDA kernels themselves (`src/gpu/kernels.cu`, not a re-implementation) run on the CPU
//! through a small emulation of the CUDA runtime (`src/gpu/emu/cuda_emu.h`: one OS thread per
//! CUDA thread, real barriers for `__syncthreads` and warp shuffles) against a naive oracle of the
//! DMS semantics (`src/gpu/emu/check.cpp`): prompt prefill, decode bookkeeping, the three decode
//! attention kernels (tiled, warps, asynchronous copies into shared memory, which the emulation
//! performs only at the wait) at several split counts, f32 and bf16, the error codes, and
//! sequences joining and leaving a running batch (slots released, moved, decoded as an active
//! prefix). Needs a C++20 compiler (`$CXX`, default `c++`); no GPU and no `cuda` feature.

use std::path::{Path, PathBuf};
use std::process::Command;

#[test]
fn cuda_kernels_match_the_oracle_under_cpu_emulation() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/gpu/emu/check.cpp");
    let exe = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("dms-gpu-emu-check");
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
    let built = Command::new(&cxx)
        .args(["-std=c++20", "-O2", "-pthread", "-Wall", "-Wno-unknown-pragmas"])
        .arg(&src)
        .arg("-o")
        .arg(&exe)
        .output()
        .unwrap_or_else(|e| panic!("this test needs a C++20 compiler ({cxx}): {e}"));
    assert!(built.status.success(), "compiling {}:\n{}", src.display(), String::from_utf8_lossy(&built.stderr));
    let run = Command::new(&exe).output().expect("emulated kernel check runs");
    let stdout = String::from_utf8_lossy(&run.stdout);
    let stderr = String::from_utf8_lossy(&run.stderr);
    let head: String = stderr.lines().take(20).collect::<Vec<_>>().join("\n");
    assert!(run.status.success() && stdout.contains("EMULATED KERNEL CHECKS PASSED"), "{stdout}\n{head}");
    println!("{stdout}");
}
