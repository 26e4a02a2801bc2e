//! The on-disk layout of one state's log and the small file helpers around it:
//!
//! ```text
//! <audit dir>/<CC>/seg-<first seq, 20 digits>.jsonl        records, one canonical JSON line each
//! <audit dir>/<CC>/seg-<first seq, 20 digits>.checkpoints  {"note":...,"size":N} per line
//! <audit dir>/<CC>/anchor.json                             what retention kept of deleted segments
//! <audit dir>/<CC>/vkey                                    the verifier key (convenience, untrusted)
//! <audit dir>/<CC>/LOCK                                    flock held by the writing gateway
//! ```

use std::fs::{self, File, OpenOptions};
use std::io::{Read as _, Seek as _, SeekFrom, Write as _};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::AuditError;
use super::merkle::{Frontier, Hash};
use super::record::canonical_json;

pub const SEGMENT_EXT: &str = "jsonl";
pub const CHECKPOINTS_EXT: &str = "checkpoints";
pub const ANCHOR_FILE: &str = "anchor.json";
pub const VKEY_FILE: &str = "vkey";

pub fn segment_path(dir: &Path, first: u64) -> PathBuf {
    dir.join(format!("seg-{first:020}.{SEGMENT_EXT}"))
}

pub fn checkpoints_path(dir: &Path, first: u64) -> PathBuf {
    dir.join(format!("seg-{first:020}.{CHECKPOINTS_EXT}"))
}

/// `(first seq, path)` of every segment file, in sequence order.
pub fn list_segments(dir: &Path) -> Result<Vec<(u64, PathBuf)>, AuditError> {
    list_with_ext(dir, SEGMENT_EXT)
}

pub fn list_checkpoint_files(dir: &Path) -> Result<Vec<(u64, PathBuf)>, AuditError> {
    list_with_ext(dir, CHECKPOINTS_EXT)
}

fn list_with_ext(dir: &Path, ext: &str) -> Result<Vec<(u64, PathBuf)>, AuditError> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).map_err(|e| AuditError::io(dir, e))? {
        let entry = entry.map_err(|e| AuditError::io(dir, e))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let Some(rest) = name.strip_prefix("seg-") else {
            continue;
        };
        let Some(num) = rest.strip_suffix(&format!(".{ext}")) else {
            continue;
        };
        if let Ok(first) = num.parse::<u64>() {
            out.push((first, entry.path()));
        }
    }
    out.sort();
    Ok(out)
}

/// The state logs under `dir`: `dir` itself when it holds segments or an anchor, else
/// each subdirectory that does (sorted).
pub fn discover_logs(dir: &Path) -> Result<Vec<PathBuf>, AuditError> {
    if is_log_dir(dir) {
        return Ok(vec![dir.to_path_buf()]);
    }
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).map_err(|e| AuditError::io(dir, e))? {
        let p = entry.map_err(|e| AuditError::io(dir, e))?.path();
        if p.is_dir() && is_log_dir(&p) {
            out.push(p);
        }
    }
    out.sort();
    Ok(out)
}

fn is_log_dir(dir: &Path) -> bool {
    dir.join(ANCHOR_FILE).is_file() || list_segments(dir).is_ok_and(|s| !s.is_empty())
}

/// A file split into complete (newline-terminated) lines, without the newlines, plus
/// the length of a torn tail (bytes after the last newline).
pub struct Lines {
    pub data: Vec<u8>,
    pub spans: Vec<(usize, usize)>,
    pub torn: usize,
}

impl Lines {
    pub fn read(path: &Path) -> Result<Self, AuditError> {
        let data = fs::read(path).map_err(|e| AuditError::io(path, e))?;
        let mut spans = Vec::new();
        let mut start = 0;
        for (i, b) in data.iter().enumerate() {
            if *b == b'\n' {
                spans.push((start, i));
                start = i + 1;
            }
        }
        let torn = data.len() - start;
        Ok(Self { data, spans, torn })
    }

    pub fn iter(&self) -> impl Iterator<Item = &[u8]> {
        self.spans.iter().map(|(a, b)| &self.data[*a..*b])
    }

    pub fn complete_len(&self) -> usize {
        self.data.len() - self.torn
    }
}

/// Cut a file back to `len` bytes and make that durable.
pub fn truncate_to(path: &Path, len: u64) -> Result<(), AuditError> {
    let f = OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(|e| AuditError::io(path, e))?;
    f.set_len(len).map_err(|e| AuditError::io(path, e))?;
    f.sync_all().map_err(|e| AuditError::io(path, e))
}

/// The last complete line of a file (reads only its tail).
pub fn last_line(path: &Path) -> Result<Option<Vec<u8>>, AuditError> {
    let mut f = File::open(path).map_err(|e| AuditError::io(path, e))?;
    let len = f.metadata().map_err(|e| AuditError::io(path, e))?.len();
    let mut window = 64 * 1024u64;
    loop {
        let start = len.saturating_sub(window);
        f.seek(SeekFrom::Start(start))
            .map_err(|e| AuditError::io(path, e))?;
        let mut buf = Vec::new();
        f.read_to_end(&mut buf)
            .map_err(|e| AuditError::io(path, e))?;
        let Some(end) = buf.iter().rposition(|b| *b == b'\n') else {
            if start == 0 {
                return Ok(None);
            }
            window *= 4;
            continue;
        };
        match buf[..end].iter().rposition(|b| *b == b'\n') {
            Some(s) => return Ok(Some(buf[s + 1..end].to_vec())),
            None if start == 0 => return Ok(Some(buf[..end].to_vec())),
            None => window *= 4,
        }
    }
}

/// fsync a directory (after creating, renaming or deleting files in it).
pub fn fsync_dir(dir: &Path) -> Result<(), AuditError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| AuditError::io(dir, e))
}

/// Write a file atomically and durably: temp file, fsync, rename, fsync the directory.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), AuditError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = path.with_extension("tmp");
    {
        let mut f = File::create(&tmp).map_err(|e| AuditError::io(&tmp, e))?;
        f.write_all(bytes).map_err(|e| AuditError::io(&tmp, e))?;
        f.sync_all().map_err(|e| AuditError::io(&tmp, e))?;
    }
    fs::rename(&tmp, path).map_err(|e| AuditError::io(path, e))?;
    fsync_dir(dir)
}

/// One line of a `.checkpoints` file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointLine {
    pub size: u64,
    /// The signed C2SP note, verbatim.
    pub note: String,
}

impl CheckpointLine {
    pub fn to_line(&self) -> Result<Vec<u8>, AuditError> {
        let mut v = canonical_json(self)?;
        v.push(b'\n');
        Ok(v)
    }
}

/// What retention keeps of the segments it deleted: the compact range at the cut and a
/// checkpoint signed at exactly that size, so the rest of the log still verifies.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Anchor {
    pub origin: String,
    /// Records `[0, cut)` are deleted; the log starts at `cut`.
    pub cut: u64,
    /// Hex subtree roots of the compact range `[0, cut)`, largest first.
    pub frontier: Vec<String>,
    /// Hex tree root at size `cut`.
    pub root: String,
    /// A signed checkpoint note at size `cut`.
    pub checkpoint: String,
}

impl Anchor {
    pub fn read(dir: &Path) -> Result<Option<Self>, AuditError> {
        let p = dir.join(ANCHOR_FILE);
        if !p.exists() {
            return Ok(None);
        }
        let bytes = fs::read(&p).map_err(|e| AuditError::io(&p, e))?;
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| AuditError::Corrupt(format!("{}: {e}", p.display())))
    }

    pub fn write(&self, dir: &Path) -> Result<(), AuditError> {
        write_atomic(&dir.join(ANCHOR_FILE), &canonical_json(self)?)
    }

    pub fn frontier(&self) -> Result<Frontier, String> {
        let nodes = self
            .frontier
            .iter()
            .map(|h| parse_hex_hash(h))
            .collect::<Result<Vec<_>, _>>()?;
        Frontier::from_parts(self.cut, nodes)
            .ok_or_else(|| format!("anchor frontier does not fit size {}", self.cut))
    }
}

pub fn parse_hex_hash(s: &str) -> Result<Hash, String> {
    let v = hex::decode(s).map_err(|e| format!("bad hex hash `{s}`: {e}"))?;
    v.try_into()
        .map_err(|_| format!("hash `{s}` is not 32 bytes"))
}

pub fn frontier_hex(f: &Frontier) -> Vec<String> {
    f.nodes().iter().map(crate::hexstr).collect()
}
