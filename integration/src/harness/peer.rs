//! Peer engines run beside ours in the A/B on the same prompts: what a peer's run produced, and
//! llama.cpp through its Python binding (`llama-cpp-python`, installed with pip into the cache
//! directory on first use and built from source there with the CPU's SIMD). mistral.rs is in
//! `peer_mistralrs` (cargo feature `mistralrs`).

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};
use serde::Deserialize;

use crate::assets::{cache_dir, python_venv};

/// What one batch of greedy requests produced in a peer engine.
#[derive(Debug, Deserialize)]
pub struct PeerRun {
    /// Generated ids per request.
    pub tokens: Vec<Vec<u32>>,
    /// Prompt tokens over summed prompt time.
    pub prefill_tok_s: f64,
    /// Decode steps over decode time.
    pub decode_tok_s: f64,
}

/// The llama-cpp-python release the peer arm installs.
pub const LLAMA_CPP_PYTHON: &str = "0.3.36";

/// The peer's driver script (greedy decoding of token-id prompts, timed per phase).
const DRIVER: &str = include_str!("../../../benches/peers/llama_cpp_peer.py");

/// A venv with llama-cpp-python in the cache directory, built once (minutes: pip compiles
/// llama.cpp with `-DGGML_NATIVE=ON`); returns its Python.
fn llama_cpp_python() -> Result<PathBuf> {
    let requirement = format!("llama-cpp-python=={LLAMA_CPP_PYTHON}");
    if !cache_dir().join(format!("py-llama-cpp-python-{LLAMA_CPP_PYTHON}")).exists() {
        eprintln!("installing {requirement} (builds llama.cpp from source: minutes)");
    }
    python_venv(
        &format!("llama-cpp-python-{LLAMA_CPP_PYTHON}"),
        &requirement,
        "llama_cpp",
        &[("CMAKE_ARGS", "-DGGML_NATIVE=ON")],
    )
}

/// Greedy generation of `max_tokens` tokens for every prompt by llama.cpp on the GGUF file
/// `model`, one sequence at a time on `threads` threads.
pub fn llama_cpp_generate(model: &Path, prompts: &[Vec<u32>], max_tokens: usize, threads: usize) -> Result<PeerRun> {
    if !model.is_file() {
        bail!("llama.cpp needs a GGUF file, and {} is not one", model.display());
    }
    let python = llama_cpp_python()?;
    let job = serde_json::json!({
        "model": model, "prompts": prompts, "max_tokens": max_tokens, "threads": threads,
    });
    let mut child = Command::new(&python)
        .args(["-c", DRIVER])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot run {}", python.display()))?;
    child.stdin.take().context("no stdin")?.write_all(job.to_string().as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!("the llama.cpp peer failed ({})", out.status);
    }
    let run: PeerRun = serde_json::from_slice(&out.stdout).context("the llama.cpp peer's output is not its JSON")?;
    if run.tokens.len() != prompts.len() || run.tokens.iter().any(|t| t.len() != max_tokens) {
        bail!("the llama.cpp peer returned the wrong number of tokens");
    }
    Ok(run)
}
