//! The auditor's read side, usable without a running gateway: filtered record queries,
//! inclusion and consistency proofs (and their offline checks), and prompt matching.

use std::collections::BTreeSet;
use std::path::Path;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::AuditError;
use super::keys::{Checkpoint, HmacKey, VerifierKey, open_checkpoint};
use super::merkle::{Frontier, Hash, LeafStore, check_consistency, check_inclusion, leaf_hash};
use super::record::{Decision, Phase, Record, prompt_digest_input_chat, prompt_digest_input_text};
use super::store::{self, Anchor, CheckpointLine, Lines, parse_hex_hash};

/// Which records a query returns; every set field must match.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub state: Option<String>,
    pub ministry: Option<String>,
    /// Inclusive.
    pub since: Option<DateTime<Utc>>,
    /// Inclusive.
    pub until: Option<DateTime<Utc>>,
    pub decision: Option<Decision>,
    /// Matches the record's reason codes, its candidates' reasons or its outcome code.
    pub reason: Option<String>,
    pub pool: Option<String>,
    /// The pool's country.
    pub country: Option<String>,
    pub policy_hash: Option<String>,
    pub request_id: Option<String>,
    pub phase: Option<Phase>,
    /// At most this many records (the newest are kept when set).
    pub limit: Option<usize>,
}

impl Filter {
    pub fn matches(&self, r: &Record) -> bool {
        fn eq(want: &Option<String>, have: Option<&str>) -> bool {
            want.as_deref()
                .is_none_or(|w| have.is_some_and(|h| h.eq_ignore_ascii_case(w)))
        }
        let time_ok = || {
            if self.since.is_none() && self.until.is_none() {
                return true;
            }
            let Ok(t) = DateTime::parse_from_rfc3339(&r.time) else {
                return false;
            };
            let t = t.with_timezone(&Utc);
            self.since.is_none_or(|s| t >= s) && self.until.is_none_or(|u| t <= u)
        };
        eq(&self.state, Some(&r.state))
            && eq(&self.ministry, r.ministry.as_deref())
            && self.decision.is_none_or(|d| r.decision == Some(d))
            && self.reason.as_deref().is_none_or(|c| r.mentions_reason(c))
            && eq(&self.pool, r.pool.as_deref())
            && eq(&self.country, r.pool_country.as_deref())
            && eq(&self.policy_hash, r.policy_hash.as_deref())
            && self
                .request_id
                .as_deref()
                .is_none_or(|id| r.request_id == id)
            && self.phase.is_none_or(|p| r.phase == p)
            && time_ok()
    }
}

/// The records under `dir` (an audit root or one state's log) that match `filter`, in
/// log order (state by state).
pub fn read_records(dir: &Path, filter: &Filter) -> Result<Vec<Record>, AuditError> {
    let mut out = Vec::new();
    for log in store::discover_logs(dir)? {
        if let (Some(s), Some(name)) = (&filter.state, log.file_name().and_then(|n| n.to_str()))
            && name.len() == 2
            && !name.eq_ignore_ascii_case(s)
        {
            continue;
        }
        for_each_record(&log, |_, rec| {
            if filter.matches(&rec) {
                out.push(rec);
            }
        })?;
    }
    if let Some(n) = filter.limit
        && out.len() > n
    {
        out.drain(..out.len() - n);
    }
    Ok(out)
}

fn for_each_record(log: &Path, mut f: impl FnMut(&[u8], Record)) -> Result<(), AuditError> {
    for (_, path) in store::list_segments(log)? {
        let lines = Lines::read(&path)?;
        for line in lines.iter() {
            let rec: Record = serde_json::from_slice(line).map_err(|e| {
                AuditError::Corrupt(format!("{}: invalid record: {e}", path.display()))
            })?;
            f(line, rec);
        }
    }
    Ok(())
}

/// A log loaded for proofs: leaves from the retention cut on, and its checkpoints
/// (parsed, not signature-checked: the verifier of a proof checks the signature).
struct Loaded {
    origin: Option<String>,
    leaves: LeafStore,
    checkpoints: Vec<Checkpoint>,
}

fn load(log: &Path) -> Result<Loaded, AuditError> {
    let anchor = Anchor::read(log)?;
    let segs = store::list_segments(log)?;
    let start = match (&anchor, segs.first()) {
        (Some(a), Some((f, _))) if *f == a.cut => a.frontier().map_err(AuditError::Corrupt)?,
        (Some(a), None) => a.frontier().map_err(AuditError::Corrupt)?,
        _ => Frontier::new(),
    };
    let mut leaves = LeafStore::new(start);
    let mut origin = anchor.map(|a| a.origin);
    for_each_record(log, |line, rec| {
        if origin.is_none() {
            origin = Some(rec.origin.clone());
        }
        leaves.push(leaf_hash(line));
    })?;
    let mut checkpoints = Vec::new();
    for (_, path) in store::list_checkpoint_files(log)? {
        for line in Lines::read(&path)?.iter() {
            let cl: CheckpointLine = serde_json::from_slice(line)
                .map_err(|e| AuditError::Corrupt(format!("{}: {e}", path.display())))?;
            let cp = open_checkpoint(&cl.note, &[])
                .map_err(|e| AuditError::Corrupt(format!("{}: {e}", path.display())))?;
            checkpoints.push(cp);
        }
    }
    Ok(Loaded {
        origin,
        leaves,
        checkpoints,
    })
}

/// The signed note of the checkpoint of `size` in the log in `log`, if it has one (not
/// signature-checked here; `verify_dir` checks every checkpoint).
pub fn checkpoint_note(log: &Path, size: u64) -> Result<Option<String>, AuditError> {
    for (_, path) in store::list_checkpoint_files(log)?.iter().rev() {
        for line in Lines::read(path)?.iter() {
            let cl: CheckpointLine = serde_json::from_slice(line)
                .map_err(|e| AuditError::Corrupt(format!("{}: {e}", path.display())))?;
            if cl.size == size {
                return Ok(Some(cl.note));
            }
        }
    }
    Ok(None)
}

/// An inclusion proof of one record in a signed checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Proof {
    pub origin: String,
    pub seq: u64,
    /// The record itself; its canonical JSON hashes to `leaf_hash`.
    pub record: Record,
    pub leaf_hash: String,
    pub tree_size: u64,
    /// Hex root of the tree at `tree_size` (also base64 in the checkpoint).
    pub root: String,
    /// Hex audit path, leaf to root (RFC 9162 §2.1.3).
    pub path: Vec<String>,
    /// The signed C2SP checkpoint note of `tree_size`.
    pub checkpoint: String,
}

/// Inclusion proof of `request_id`'s decision record (else its first record) against the
/// latest checkpoint of its log.
pub fn inclusion_proof(dir: &Path, request_id: &str) -> Result<Proof, AuditError> {
    let filter = Filter {
        request_id: Some(request_id.to_string()),
        ..Filter::default()
    };
    let found = read_records(dir, &filter)?;
    let rec = found
        .iter()
        .find(|r| r.phase == Phase::Decision)
        .or(found.first())
        .ok_or_else(|| AuditError::NotFound(format!("no record with request id `{request_id}`")))?;
    let log = store::discover_logs(dir)?
        .into_iter()
        .find(|l| l.file_name().and_then(|n| n.to_str()) == Some(rec.state.as_str()))
        .ok_or_else(|| AuditError::NotFound(format!("no log directory for {}", rec.state)))?;
    inclusion_proof_at(&log, rec.seq)
}

/// Inclusion proof of record `seq` of the log in `log` against its latest checkpoint.
pub fn inclusion_proof_at(log: &Path, seq: u64) -> Result<Proof, AuditError> {
    let l = load(log)?;
    let cp = l
        .checkpoints
        .last()
        .ok_or_else(|| AuditError::NotFound("the log has no checkpoint yet".into()))?;
    if seq >= cp.size {
        return Err(AuditError::NotFound(format!(
            "seq {seq} is not yet covered by a checkpoint (latest covers {} records)",
            cp.size
        )));
    }
    let mut record = None;
    for_each_record(log, |_, r| {
        if r.seq == seq && record.is_none() {
            record = Some(r);
        }
    })?;
    let record =
        record.ok_or_else(|| AuditError::NotFound(format!("seq {seq} is not in the log")))?;
    let path = l
        .leaves
        .inclusion_proof(seq, cp.size)
        .map_err(|e| AuditError::Proof(e.to_string()))?;
    let leaf = l
        .leaves
        .leaf(seq)
        .ok_or_else(|| AuditError::NotFound(format!("seq {seq} is not in the log")))?;
    let root = l
        .leaves
        .root(cp.size)
        .map_err(|e| AuditError::Proof(e.to_string()))?;
    Ok(Proof {
        origin: l.origin.unwrap_or_default(),
        seq,
        record,
        leaf_hash: crate::hexstr(leaf),
        tree_size: cp.size,
        root: crate::hexstr(root),
        path: path.iter().map(crate::hexstr).collect(),
        checkpoint: cp.note.clone(),
    })
}

fn hashes(v: &[String]) -> Result<Vec<Hash>, String> {
    v.iter().map(|h| parse_hex_hash(h)).collect()
}

/// Check a proof offline: the record hashes to the leaf, the path leads to the root, and
/// the checkpoint (signed by one of `keys`; with none, only its syntax) states that root.
pub fn verify_proof(p: &Proof, keys: &[VerifierKey]) -> Result<(), String> {
    if p.record.seq != p.seq || p.record.origin != p.origin {
        return Err("the record's origin/seq differ from the proof's".into());
    }
    let canon = p.record.canonical().map_err(|e| e.to_string())?;
    let leaf = leaf_hash(&canon);
    if crate::hexstr(leaf) != p.leaf_hash {
        return Err("the record does not hash to the proof's leaf hash".into());
    }
    let cp = open_checkpoint(&p.checkpoint, keys).map_err(|e| format!("checkpoint: {e}"))?;
    let root = parse_hex_hash(&p.root)?;
    if cp.origin != p.origin || cp.size != p.tree_size || cp.root != root {
        return Err("the checkpoint does not state this origin, size and root".into());
    }
    check_inclusion(&hashes(&p.path)?, p.tree_size, &root, p.seq, &leaf)
}

/// A consistency proof between two sizes of one log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsistencyProof {
    pub origin: String,
    pub old_size: u64,
    pub old_root: String,
    pub new_size: u64,
    pub new_root: String,
    /// Hex proof nodes (RFC 9162 §2.1.4).
    pub path: Vec<String>,
    /// The signed checkpoint notes of the two sizes, where the log has them.
    pub old_checkpoint: Option<String>,
    pub new_checkpoint: Option<String>,
}

/// Consistency proof from size `old` to `new` (default: the latest checkpoint).
pub fn consistency_proof(
    log: &Path,
    old: u64,
    new: Option<u64>,
) -> Result<ConsistencyProof, AuditError> {
    let l = load(log)?;
    let new = match new {
        Some(n) => n,
        None => {
            l.checkpoints
                .last()
                .ok_or_else(|| AuditError::NotFound("the log has no checkpoint yet".into()))?
                .size
        }
    };
    let path = l
        .leaves
        .consistency_proof(old, new)
        .map_err(|e| AuditError::Proof(e.to_string()))?;
    let root = |s| {
        l.leaves
            .root(s)
            .map(crate::hexstr)
            .map_err(|e| AuditError::Proof(e.to_string()))
    };
    let note = |s: u64| {
        l.checkpoints
            .iter()
            .find(|c| c.size == s)
            .map(|c| c.note.clone())
    };
    Ok(ConsistencyProof {
        origin: l.origin.clone().unwrap_or_default(),
        old_size: old,
        old_root: root(old)?,
        new_size: new,
        new_root: root(new)?,
        path: path.iter().map(crate::hexstr).collect(),
        old_checkpoint: note(old),
        new_checkpoint: note(new),
    })
}

/// Check a consistency proof, and any checkpoint notes it carries against `keys`.
pub fn verify_consistency(p: &ConsistencyProof, keys: &[VerifierKey]) -> Result<(), String> {
    let old_root = parse_hex_hash(&p.old_root)?;
    let new_root = parse_hex_hash(&p.new_root)?;
    for (note, size, root) in [
        (&p.old_checkpoint, p.old_size, old_root),
        (&p.new_checkpoint, p.new_size, new_root),
    ] {
        if let Some(n) = note {
            let cp = open_checkpoint(n, keys).map_err(|e| format!("checkpoint {size}: {e}"))?;
            if cp.size != size || cp.root != root || cp.origin != p.origin {
                return Err(format!(
                    "checkpoint {size} does not state this size and root"
                ));
            }
        }
    }
    if p.old_size == p.new_size {
        return if old_root == new_root && p.path.is_empty() {
            Ok(())
        } else {
            Err("same size, different roots".into())
        };
    }
    check_consistency(
        &hashes(&p.path)?,
        p.new_size,
        &new_root,
        p.old_size,
        &old_root,
    )
}

/// The digest inputs a prompt file may correspond to: a JSON array of chat messages, an
/// object with `messages` (a request body) or `prompt`, or plain text (taken both as a
/// single user message and as a completions prompt, with and without a final newline).
pub fn prompt_candidates(file: &[u8]) -> Vec<Vec<u8>> {
    #[derive(Deserialize)]
    struct Msg {
        role: String,
        content: String,
    }
    #[derive(Deserialize)]
    struct Body {
        messages: Option<Vec<Msg>>,
        prompt: Option<String>,
    }
    let chat = |m: Vec<Msg>| {
        let pairs: Vec<(String, String)> = m.into_iter().map(|m| (m.role, m.content)).collect();
        prompt_digest_input_chat(&pairs)
    };
    if let Ok(msgs) = serde_json::from_slice::<Vec<Msg>>(file) {
        return vec![chat(msgs)];
    }
    if let Ok(b) = serde_json::from_slice::<Body>(file)
        && (b.messages.is_some() || b.prompt.is_some())
    {
        let mut out = Vec::new();
        if let Some(m) = b.messages {
            out.push(chat(m));
        }
        if let Some(p) = b.prompt {
            out.push(prompt_digest_input_text(&p));
        }
        return out;
    }
    let text = String::from_utf8_lossy(file);
    let mut variants = vec![text.to_string()];
    let trimmed = text
        .strip_suffix('\n')
        .map(|t| t.strip_suffix('\r').unwrap_or(t));
    if let Some(t) = trimmed {
        variants.push(t.to_string());
    }
    let mut out = Vec::new();
    for t in variants {
        out.push(prompt_digest_input_chat(&[("user", t.as_str())]));
        out.push(prompt_digest_input_text(&t));
    }
    out
}

/// The records under `dir` whose prompt HMAC (under `key`) matches the prompt `file`.
pub fn check_prompt(dir: &Path, key: &[u8], file: &[u8]) -> Result<Vec<Record>, AuditError> {
    let key = HmacKey::new(key)?;
    let wanted: BTreeSet<String> = prompt_candidates(file)
        .iter()
        .map(|input| key.hex(input))
        .collect();
    let mut out = Vec::new();
    for log in store::discover_logs(dir)? {
        for_each_record(&log, |_, r| {
            if r.prompt_hmac.as_ref().is_some_and(|h| wanted.contains(h)) {
                out.push(r);
            }
        })?;
    }
    Ok(out)
}
