//! With the `cuda` feature, compiles `src/gpu/kernels.cu` to PTX with nvcc (`$NVCC` or `nvcc`).

fn main() {
    println!("cargo:rerun-if-changed=src/gpu/kernels.cu");
    println!("cargo:rerun-if-env-changed=NVCC");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR")).join("dms_kernels.ptx");
    let nvcc = std::env::var("NVCC").unwrap_or_else(|_| "nvcc".into());
    let arch = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "90".into());
    let status = std::process::Command::new(&nvcc)
        .args(["-ptx", "-O3", &format!("-arch=sm_{arch}"), "src/gpu/kernels.cu", "-o"])
        .arg(&out)
        .status()
        .unwrap_or_else(|e| panic!("cannot run {nvcc} (source shared/scripts/cuda-env.sh first): {e}"));
    assert!(status.success(), "nvcc failed on src/gpu/kernels.cu");
}
