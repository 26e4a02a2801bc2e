//! `verify`: recompute each state log's tree from its records and check it against every
//! signed checkpoint, the retention anchor and the retention records. Used by the
//! auditor CLI, the admin page, and by the gateway itself when it opens a log.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::AuditError;
use super::keys::{Checkpoint, VerifierKey, open_checkpoint};
use super::merkle::{Frontier, leaf_hash};
use super::record::{Phase, Record};
use super::store::{
    self, Anchor, CheckpointLine, Lines, VKEY_FILE, frontier_hex, list_checkpoint_files,
    list_segments,
};

/// Progress while verifying (called per segment and every 65,536 records).
#[derive(Debug, Clone)]
pub struct VerifyProgress<'a> {
    pub log: &'a Path,
    pub records: u64,
    pub bytes_done: u64,
    pub bytes_total: u64,
}

/// The first thing found wrong with a log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VerifyFailure {
    /// The first sequence number that cannot be trusted, where one can be named.
    pub seq: Option<u64>,
    pub what: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct LogReport {
    pub dir: PathBuf,
    pub origin: Option<String>,
    /// First sequence number present (0, or the retention cut).
    pub start: u64,
    /// Tree size (one past the last sequence number).
    pub size: u64,
    pub checkpoints: u64,
    pub latest_checkpoint: Option<u64>,
    pub warnings: Vec<String>,
    pub error: Option<VerifyFailure>,
}

#[derive(Debug, Clone, Serialize)]
pub struct VerifyReport {
    pub logs: Vec<LogReport>,
}

impl VerifyReport {
    pub fn ok(&self) -> bool {
        !self.logs.is_empty() && self.logs.iter().all(|l| l.error.is_none())
    }
}

/// Verify every state log under `dir` (an audit root or one state's directory). With no
/// `keys`, signatures are checked against the `vkey` file stored in each log (a warning
/// says so: an attacker who can rewrite the log can rewrite that file too).
pub fn verify_dir(
    dir: &Path,
    keys: &[VerifierKey],
    mut progress: impl FnMut(&VerifyProgress<'_>),
) -> VerifyReport {
    let logs = match store::discover_logs(dir) {
        Ok(l) => l,
        Err(e) => {
            return VerifyReport {
                logs: vec![failed_report(dir, e.to_string())],
            };
        }
    };
    if logs.is_empty() {
        return VerifyReport {
            logs: vec![failed_report(dir, "no audit log found here".into())],
        };
    }
    VerifyReport {
        logs: logs
            .iter()
            .map(|d| verify_log(d, keys, &mut progress).0)
            .collect(),
    }
}

fn failed_report(dir: &Path, what: String) -> LogReport {
    LogReport {
        dir: dir.to_path_buf(),
        origin: None,
        start: 0,
        size: 0,
        checkpoints: 0,
        latest_checkpoint: None,
        warnings: Vec::new(),
        error: Some(VerifyFailure { seq: None, what }),
    }
}

/// What the writer needs to continue a verified log.
pub(crate) struct LogState {
    pub frontier: Frontier,
    /// Frontier at each segment's first sequence number.
    pub boundaries: BTreeMap<u64, Frontier>,
    pub last_checkpoint: Option<Checkpoint>,
    pub origin: Option<String>,
    pub anchor: Option<Anchor>,
}

/// Verify one state's log.
pub(crate) fn verify_log(
    dir: &Path,
    keys: &[VerifierKey],
    progress: &mut dyn FnMut(&VerifyProgress<'_>),
) -> (LogReport, Option<LogState>) {
    let mut report = LogReport {
        dir: dir.to_path_buf(),
        origin: None,
        start: 0,
        size: 0,
        checkpoints: 0,
        latest_checkpoint: None,
        warnings: Vec::new(),
        error: None,
    };
    match verify_inner(dir, keys, progress, &mut report) {
        Ok(state) => {
            report.origin = state.origin.clone();
            report.size = state.frontier.size();
            (report, Some(state))
        }
        Err(f) => {
            report.error = Some(f);
            (report, None)
        }
    }
}

fn fail(seq: Option<u64>, what: impl Into<String>) -> VerifyFailure {
    VerifyFailure {
        seq,
        what: what.into(),
    }
}

fn verify_inner(
    dir: &Path,
    keys: &[VerifierKey],
    progress: &mut dyn FnMut(&VerifyProgress<'_>),
    report: &mut LogReport,
) -> Result<LogState, VerifyFailure> {
    let io = |e: AuditError| fail(None, e.to_string());
    let stored_key;
    let keys: &[VerifierKey] = if keys.is_empty() {
        match std::fs::read_to_string(dir.join(VKEY_FILE)) {
            Ok(text) => {
                stored_key = [VerifierKey::parse(&text)
                    .map_err(|e| fail(None, format!("stored vkey: {e}")))?];
                report.warnings.push(
                    "signatures checked against the log's own vkey file; pass --key to check \
                     against a key you trust"
                        .into(),
                );
                &stored_key
            }
            Err(_) => {
                report
                    .warnings
                    .push("no key given and no vkey file: signatures NOT checked".into());
                &[]
            }
        }
    } else {
        keys
    };

    // Checkpoints: each signed by a trusted key, sizes strictly growing.
    let mut cps: BTreeMap<u64, Checkpoint> = BTreeMap::new();
    let cp_files = list_checkpoint_files(dir).map_err(io)?;
    let mut prev: Option<u64> = None;
    for (i, (_, path)) in cp_files.iter().enumerate() {
        let lines = Lines::read(path).map_err(io)?;
        let name = file_name(path);
        if lines.torn > 0 {
            if i + 1 == cp_files.len() {
                report.warnings.push(format!(
                    "{name}: torn tail of {} bytes (never completed; removed at the next open)",
                    lines.torn
                ));
            } else {
                return Err(fail(None, format!("{name}: truncated checkpoint line")));
            }
        }
        for line in lines.iter() {
            let cl: CheckpointLine = serde_json::from_slice(line)
                .map_err(|e| fail(None, format!("{name}: malformed checkpoint line: {e}")))?;
            let cp = open_checkpoint(&cl.note, keys)
                .map_err(|e| fail(None, format!("{name}: checkpoint at size {}: {e}", cl.size)))?;
            if cp.size != cl.size {
                return Err(fail(
                    None,
                    format!(
                        "{name}: checkpoint line says size {} but its note says {}",
                        cl.size, cp.size
                    ),
                ));
            }
            if let Some(p) = prev
                && cp.size <= p
            {
                return Err(fail(
                    Some(cp.size),
                    format!(
                        "{name}: checkpoint at size {} follows one at size {p}: checkpoints must \
                         grow (an older checkpoint replayed or checkpoints reordered)",
                        cp.size
                    ),
                ));
            }
            prev = Some(cp.size);
            cps.insert(cp.size, cp);
        }
    }
    report.checkpoints = cps.len() as u64;
    report.latest_checkpoint = cps.keys().next_back().copied();

    // Where the log starts: 0, or a retention cut vouched for by the anchor.
    let anchor = Anchor::read(dir).map_err(io)?;
    let mut anchor_frontier = None;
    if let Some(a) = &anchor {
        let f = a.frontier().map_err(|e| fail(Some(a.cut), e))?;
        let cp = open_checkpoint(&a.checkpoint, keys)
            .map_err(|e| fail(Some(a.cut), format!("anchor checkpoint: {e}")))?;
        if cp.size != a.cut || cp.root != f.root() || crate::hexstr(f.root()) != a.root {
            return Err(fail(
                Some(a.cut),
                "retention anchor: compact range does not match its signed checkpoint",
            ));
        }
        if cp.origin != a.origin {
            return Err(fail(Some(a.cut), "retention anchor: origin mismatch"));
        }
        anchor_frontier = Some(f);
    }
    let segments = list_segments(dir).map_err(io)?;
    let first = segments.first().map(|s| s.0);
    let mut frontier = match (&anchor, first) {
        (_, Some(0)) | (None, None) => Frontier::new(),
        (Some(a), Some(f)) if f == a.cut => anchor_frontier.clone().unwrap_or_default(),
        (Some(_), None) => anchor_frontier.clone().unwrap_or_default(),
        (Some(a), Some(f)) => {
            return Err(fail(
                Some(a.cut.min(f)),
                format!(
                    "the first segment starts at seq {f} but retention kept the log from seq {}: \
                     segments deleted",
                    a.cut
                ),
            ));
        }
        (None, Some(f)) => {
            return Err(fail(
                Some(0),
                format!(
                    "the first segment starts at seq {f}: records 0..{f} deleted without retention"
                ),
            ));
        }
    };
    let start = frontier.size();
    report.start = start;
    let mut origin: Option<String> = anchor.as_ref().map(|a| a.origin.clone());
    let bytes_total: u64 = segments
        .iter()
        .filter_map(|(_, p)| p.metadata().ok().map(|m| m.len()))
        .sum();
    let mut bytes_done = 0u64;
    let mut boundaries = BTreeMap::new();
    let mut last_good = start;
    let mut retention_accounted = start == 0;
    let check_cp = |f: &Frontier, last_good: &mut u64| -> Result<(), VerifyFailure> {
        if let Some(cp) = cps.get(&f.size()) {
            if cp.root != f.root() {
                return Err(fail(
                    Some(*last_good),
                    format!(
                        "records {}..{} do not match the signed checkpoint at size {}: a record \
                         was modified, reordered, inserted or deleted",
                        *last_good,
                        f.size().saturating_sub(1),
                        f.size()
                    ),
                ));
            }
            *last_good = f.size();
        }
        Ok(())
    };
    check_cp(&frontier, &mut last_good)?;

    for (i, (seg_first, path)) in segments.iter().enumerate() {
        let name = file_name(path);
        let expected = frontier.size();
        if *seg_first != expected {
            return Err(fail(
                Some(expected.min(*seg_first)),
                format!(
                    "{name} starts at seq {seg_first} but the log so far ends at seq {}: \
                     records deleted or a segment inserted",
                    expected as i128 - 1
                ),
            ));
        }
        if let (Some(a), Some(af)) = (&anchor, &anchor_frontier)
            && expected == a.cut
            && frontier != *af
        {
            return Err(fail(
                Some(0),
                "the kept records before the retention cut do not match the retention anchor",
            ));
        }
        boundaries.insert(expected, frontier.clone());
        let lines = Lines::read(path).map_err(io)?;
        if lines.torn > 0 {
            if i + 1 == segments.len() {
                report.warnings.push(format!(
                    "{name}: torn tail of {} bytes after seq {} (never acknowledged; removed at \
                     the next open)",
                    lines.torn,
                    expected + lines.spans.len() as u64
                ));
            } else {
                return Err(fail(
                    Some(expected + lines.spans.len() as u64),
                    format!("{name}: segment ends in a partial record (truncated)"),
                ));
            }
        }
        for line in lines.iter() {
            let seq = frontier.size();
            let rec: Record = serde_json::from_slice(line).map_err(|e| {
                fail(
                    Some(seq),
                    format!("{name}: seq {seq}: not a valid record (modified): {e}"),
                )
            })?;
            if rec.seq != seq {
                return Err(fail(
                    Some(seq),
                    format!(
                        "{name}: position {seq} holds the record with seq {}: records \
                         reordered, inserted or deleted",
                        rec.seq
                    ),
                ));
            }
            match &origin {
                None => origin = Some(rec.origin.clone()),
                Some(o) if *o != rec.origin => {
                    return Err(fail(
                        Some(seq),
                        format!(
                            "seq {seq}: origin `{}` differs from the log's `{o}`",
                            rec.origin
                        ),
                    ));
                }
                Some(_) => {}
            }
            let canon = rec
                .canonical()
                .map_err(|e| fail(Some(seq), e.to_string()))?;
            if canon != line {
                return Err(fail(
                    Some(seq),
                    format!("{name}: seq {seq}: record is not in canonical JSON form (modified)"),
                ));
            }
            if rec.phase == Phase::Retention {
                check_retention(&rec, start, &anchor, &boundaries, &frontier)?;
                if rec
                    .retention
                    .as_ref()
                    .is_some_and(|r| r.deleted_to == start)
                {
                    retention_accounted = true;
                }
            }
            frontier.push(leaf_hash(line));
            check_cp(&frontier, &mut last_good)?;
            if frontier.size() % 65_536 == 0 {
                progress(&VerifyProgress {
                    log: dir,
                    records: frontier.size() - start,
                    bytes_done: bytes_done + lines.spans.len() as u64,
                    bytes_total,
                });
            }
        }
        bytes_done += lines.data.len() as u64;
        progress(&VerifyProgress {
            log: dir,
            records: frontier.size() - start,
            bytes_done,
            bytes_total,
        });
    }

    let size = frontier.size();
    if let Some((&cp_size, _)) = cps.range(size + 1..).next() {
        return Err(fail(
            Some(size),
            format!(
                "the log ends at seq {} but a signed checkpoint covers {cp_size} records: \
                 records {size}..{} deleted or truncated",
                size as i128 - 1,
                cp_size - 1
            ),
        ));
    }
    if !retention_accounted {
        return Err(fail(
            Some(start),
            format!(
                "the log starts at seq {start} but no retention record accounts for the deletion"
            ),
        ));
    }
    for cp in cps.values() {
        if let Some(o) = &origin
            && cp.origin != *o
        {
            return Err(fail(
                None,
                format!(
                    "checkpoint at size {} has origin `{}`, the log `{o}`",
                    cp.size, cp.origin
                ),
            ));
        }
    }
    if let (Some(o), Some(cc)) = (&origin, dir.file_name().and_then(|n| n.to_str()))
        && cc.len() == 2
        && !o.ends_with(&format!("/{cc}"))
    {
        return Err(fail(
            None,
            format!("origin `{o}` does not belong in directory {cc}"),
        ));
    }
    let covered = cps.keys().next_back().copied().unwrap_or(0).max(start);
    if covered < size {
        report.warnings.push(format!(
            "records {covered}..{} are not yet covered by a signed checkpoint",
            size - 1
        ));
    }
    let last_checkpoint = cps.into_values().next_back();
    Ok(LogState {
        frontier,
        boundaries,
        last_checkpoint,
        origin,
        anchor,
    })
}

fn check_retention(
    rec: &Record,
    start: u64,
    anchor: &Option<Anchor>,
    boundaries: &BTreeMap<u64, Frontier>,
    now: &Frontier,
) -> Result<(), VerifyFailure> {
    let seq = rec.seq;
    let Some(r) = &rec.retention else {
        return Err(fail(
            Some(seq),
            "retention record without its retention field",
        ));
    };
    if r.deleted_to > now.size() || r.deleted_from > r.deleted_to {
        return Err(fail(
            Some(seq),
            "retention record names records that do not exist yet",
        ));
    }
    let expect: Option<(Vec<String>, String)> = if r.deleted_to == start {
        anchor
            .as_ref()
            .map(|a| (a.frontier.clone(), a.root.clone()))
    } else if r.deleted_to > start {
        let f = boundaries.get(&r.deleted_to).ok_or_else(|| {
            fail(
                Some(seq),
                format!("retention cut {} is not a segment boundary", r.deleted_to),
            )
        })?;
        Some((frontier_hex(f), crate::hexstr(f.root())))
    } else {
        None // an older retention whose cut was itself deleted since
    };
    if let Some((fr, root)) = expect
        && (fr != r.frontier || root != r.root)
    {
        return Err(fail(
            Some(seq),
            format!(
                "retention record at seq {seq} does not match the tree at its cut {}",
                r.deleted_to
            ),
        ));
    }
    Ok(())
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}
