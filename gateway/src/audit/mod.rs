//! Tamper-evident audit log, one per member state: what was decided for each request and
//! how it ended, never the prompt or completion text. Owns the records, their durable
//! group commit, the RFC 6962 Merkle tree, signed C2SP checkpoints, retention, residency
//! receipts and the auditor's read side (verify, query, proofs). It must not decide
//! anything about a request: the gateway hands it finished decisions.
//!
//! See docs/audit.md for the formats and the auditor's commands.

mod keys;
mod mailbox;
mod merkle;
mod read;
mod receipt;
mod record;
mod ring;
mod store;
mod verify;
mod writer;

#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Deserialize;
use tokio::sync::oneshot;

pub use keys::{
    Checkpoint, DEFAULT_KEY_NAME, HmacKey, SigningKey, VerifierKey, checkpoint_text,
    generate_signing_key, hmac_hex, load_hmac_key, open_checkpoint, parse_hmac_key,
};
pub use merkle::{EMPTY_ROOT, Frontier, Hash, LeafStore, leaf_hash, node_hash};
pub use read::{
    ConsistencyProof, Filter, Proof, check_prompt, checkpoint_note, consistency_proof,
    inclusion_proof, inclusion_proof_at, prompt_candidates, read_records, verify_consistency,
    verify_proof,
};
pub use receipt::{ReceiptStatement, ReceiptSubject, verify_receipt};
pub use record::{
    Candidate, Decision, Outcome, Phase, Record, RecordInput, Retention, canonical_json,
    prompt_digest_input_chat, prompt_digest_input_text,
};
pub use store::{Anchor, CheckpointLine};
pub use verify::{LogReport, VerifyFailure, VerifyProgress, VerifyReport, verify_dir};

/// `[audit]` in gateway.toml.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditConfig {
    /// Audit root; each state's log lives in `<dir>/<CC>/`.
    pub dir: PathBuf,
    /// This gateway replica's id; part of every log origin, so replicas never share one.
    #[serde(default = "default_replica")]
    pub replica: String,
    /// The Ed25519 checkpoint and receipt signing key (`sovctl audit keygen`).
    pub signing_key: PathBuf,
    /// Per-state HMAC-SHA256 key files (hex or 32+ raw bytes); one log per state listed.
    pub hmac_keys: BTreeMap<String, PathBuf>,
    #[serde(default = "default_every_records")]
    pub checkpoint_every_records: u64,
    #[serde(default = "default_every_ms")]
    pub checkpoint_every_ms: u64,
    #[serde(default = "default_segment_max_bytes")]
    pub segment_max_bytes: u64,
    #[serde(default = "default_retention_days")]
    pub retention_days: u32,
    /// How long (microseconds) each state's writer keeps polling for the next record,
    /// yielding the CPU meanwhile, before it sleeps. Saves the futex wake-up and context
    /// switch per record under steady traffic (c1 p50 -70..120 us in bench/), at the cost
    /// of up to that much CPU time after each burst. 0: sleep at once.
    #[serde(default = "default_writer_spin_us")]
    pub writer_spin_us: u64,
    /// Longest (microseconds) a request that is alone in the gateway polls for its
    /// decision record's acknowledgement, yielding the CPU meanwhile, instead of parking
    /// its thread until the writer wakes it (see [`AuditLog::append`]). 0: never.
    #[serde(default = "default_append_spin_us")]
    pub append_spin_us: u64,
    /// Under load, how long (microseconds) a state's writer waits before an fsync that
    /// makes decision records durable, so that one fsync covers more of them (group
    /// commit, as PostgreSQL's `commit_delay`). Only while at least `commit_siblings`
    /// requests are in flight; a request alone never waits. 0: never.
    #[serde(default = "default_commit_delay_us")]
    pub commit_delay_us: u64,
    /// Requests in flight from which `commit_delay_us` applies.
    #[serde(default = "default_commit_siblings")]
    pub commit_siblings: usize,
    /// Size of each state's durability ring (`durable.ring`, docs/audit.md): group
    /// commits are made durable there, by overwriting preallocated blocks, instead of by
    /// fsyncing the growing segment. 0: no ring, fsync the segment itself.
    #[serde(default = "default_ring_bytes")]
    pub ring_bytes: u64,
}

/// The writer's answer to an append, or its absence when the writer stopped.
fn acknowledged(
    r: Result<Result<Appended, AuditError>, oneshot::error::RecvError>,
) -> Result<Appended, AuditError> {
    r.map_err(|_| AuditError::Unavailable("audit writer stopped".into()))?
}

fn default_replica() -> String {
    "r1".into()
}
fn default_every_records() -> u64 {
    256
}
fn default_every_ms() -> u64 {
    1000
}
fn default_segment_max_bytes() -> u64 {
    64 * 1024 * 1024
}
fn default_retention_days() -> u32 {
    183
}
fn default_writer_spin_us() -> u64 {
    200
}
fn default_commit_delay_us() -> u64 {
    100
}
fn default_commit_siblings() -> usize {
    8
}
fn default_ring_bytes() -> u64 {
    ring::DEFAULT_RING_BYTES
}
fn default_append_spin_us() -> u64 {
    500
}

impl AuditConfig {
    /// A configuration with every default; for tests, benches and the demo.
    pub fn new(dir: PathBuf, signing_key: PathBuf, hmac_keys: BTreeMap<String, PathBuf>) -> Self {
        Self {
            dir,
            replica: default_replica(),
            signing_key,
            hmac_keys,
            checkpoint_every_records: default_every_records(),
            checkpoint_every_ms: default_every_ms(),
            segment_max_bytes: default_segment_max_bytes(),
            retention_days: default_retention_days(),
            writer_spin_us: default_writer_spin_us(),
            commit_delay_us: default_commit_delay_us(),
            commit_siblings: default_commit_siblings(),
            append_spin_us: default_append_spin_us(),
            ring_bytes: default_ring_bytes(),
        }
    }
}

/// The log origin of `state`'s log on `replica`.
pub fn origin_for(replica: &str, state: &str) -> String {
    format!("sovereign-gateway/{replica}/{state}")
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum AuditError {
    /// The record could not be made durable (the gateway answers 503 `audit_unavailable`).
    #[error("audit log unavailable: {0}")]
    Unavailable(String),
    #[error("no audit log or HMAC key for member state `{0}`")]
    UnknownState(String),
    #[error("{path}: {msg}")]
    Io { path: String, msg: String },
    #[error("audit log corrupt: {0}")]
    Corrupt(String),
    #[error("key: {0}")]
    Key(String),
    #[error("invalid audit configuration: {0}")]
    Config(String),
    #[error("encoding: {0}")]
    Encode(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Proof(String),
}

impl AuditError {
    pub(crate) fn io(path: &Path, e: std::io::Error) -> Self {
        Self::Io {
            path: path.display().to_string(),
            msg: e.to_string(),
        }
    }
}

/// Where an appended record landed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Appended {
    pub origin: Arc<str>,
    pub seq: u64,
    pub leaf_hash: [u8; 32],
    /// Tree size right after the group commit that made the record durable.
    pub covered_by_size: u64,
    /// Tree root at `covered_by_size` (signed into the receipt).
    pub covered_by_root: [u8; 32],
}

struct StateLog {
    tx: Mutex<Option<mpsc::Sender<writer::Msg>>>,
    shared: Arc<writer::Shared>,
    dir: PathBuf,
}

impl StateLog {
    fn send(&self, m: writer::Msg) -> Result<(), AuditError> {
        let g = self
            .tx
            .lock()
            .map_err(|_| AuditError::Unavailable("poisoned".into()))?;
        g.as_ref()
            .ok_or_else(|| AuditError::Unavailable("audit log shut down".into()))?
            .send(m)
            .map_err(|_| AuditError::Unavailable("audit writer stopped".into()))
    }
}

/// One pause of a polling loop (the writer's `writer_spin_us`, a lone request's
/// `append_spin_us`). It yields the CPU, so that the threads the polled-for event depends
/// on (the fake or real worker, the client, the writer) can run on a 2-core machine:
/// busy-waiting cost concurrency-1 p50 10-40 us in alternating A/B runs. But while other
/// processes are runnable, `sched_yield` hands one of them a whole time slice (with two
/// nice-19 CPU hogs on the machine p50 became 3.97 ms). So when a yield took long (the
/// CPU went elsewhere), every poll busy-waits for the next second instead (p50 1.05 ms
/// with the hogs; always busy-waiting: 0.29-0.37 ms).
pub(crate) fn poll_pause() {
    use std::sync::OnceLock;
    use std::sync::atomic::AtomicU64;
    use std::time::Instant;
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    // Until when (ns since EPOCH) polls busy-wait.
    static BUSY_UNTIL: AtomicU64 = AtomicU64::new(0);
    const SLOW_YIELD: Duration = Duration::from_micros(250);
    const BUSY_FOR: Duration = Duration::from_secs(1);
    let epoch = *EPOCH.get_or_init(Instant::now);
    let now = epoch.elapsed();
    if (now.as_nanos() as u64) < BUSY_UNTIL.load(Ordering::Relaxed) {
        std::hint::spin_loop();
        return;
    }
    std::thread::yield_now();
    let took = epoch.elapsed().saturating_sub(now);
    if took > SLOW_YIELD {
        BUSY_UNTIL.store((now + took + BUSY_FOR).as_nanos() as u64, Ordering::Relaxed);
    }
}

/// Every state's log of one gateway process. Cheap to share (`Arc`).
pub struct AuditLog {
    states: BTreeMap<String, StateLog>,
    hmac: BTreeMap<String, HmacKey>,
    key: Arc<SigningKey>,
    replica: String,
    append_spin: Duration,
    /// Requests the log's user has in flight (see [`AuditLog::in_flight`]).
    in_flight: Arc<AtomicUsize>,
}

impl AuditLog {
    /// Open (create, recover, verify) every configured state's log and start its writer.
    /// Refuses to start on a log that does not verify against the signing key.
    pub fn open(cfg: AuditConfig) -> Result<Arc<AuditLog>, AuditError> {
        if cfg.replica.is_empty() || cfg.replica.contains(['/', ' ', '\n', '+']) {
            return Err(AuditError::Config(format!(
                "replica id `{}` must be non-empty, without '/', '+' or spaces",
                cfg.replica
            )));
        }
        if cfg.checkpoint_every_records == 0 || cfg.checkpoint_every_ms == 0 {
            return Err(AuditError::Config(
                "checkpoint intervals must be > 0".into(),
            ));
        }
        if cfg.ring_bytes != 0 && cfg.ring_bytes < 64 * 1024 {
            return Err(AuditError::Config(
                "ring_bytes must be 0 (no ring) or at least 65536".into(),
            ));
        }
        if cfg.retention_days < 1 {
            return Err(AuditError::Config("retention_days must be >= 1".into()));
        }
        let key = Arc::new(SigningKey::load(&cfg.signing_key)?);
        let in_flight = Arc::new(AtomicUsize::new(0));
        let wcfg = writer::WriterCfg {
            every_records: cfg.checkpoint_every_records,
            every: Duration::from_millis(cfg.checkpoint_every_ms),
            segment_max_bytes: cfg.segment_max_bytes.max(1),
            retention_days: cfg.retention_days,
            spin: Duration::from_micros(cfg.writer_spin_us.min(10_000)),
            commit_delay: Duration::from_micros(cfg.commit_delay_us.min(10_000)),
            commit_siblings: cfg.commit_siblings.max(1),
            ring_bytes: cfg.ring_bytes,
            in_flight: in_flight.clone(),
        };
        let mut hmac = BTreeMap::new();
        let mut states = BTreeMap::new();
        for (state, path) in &cfg.hmac_keys {
            let cc = state.to_ascii_uppercase();
            if cc.len() != 2 || !cc.bytes().all(|b| b.is_ascii_uppercase()) {
                return Err(AuditError::Config(format!(
                    "`{state}` is not a country code"
                )));
            }
            hmac.insert(cc.clone(), HmacKey::new(&load_hmac_key(path)?)?);
            let dir = cfg.dir.join(&cc);
            let shared = Arc::new(writer::Shared::default());
            let w = writer::Writer::open(
                dir.clone(),
                origin_for(&cfg.replica, &cc),
                cc.clone(),
                key.clone(),
                wcfg.clone(),
                shared.clone(),
            )?;
            let (tx, rx) = mpsc::channel();
            std::thread::Builder::new()
                .name(format!("audit-{cc}"))
                .spawn(move || w.run(rx))
                .map_err(|e| AuditError::Unavailable(format!("spawn writer: {e}")))?;
            states.insert(
                cc,
                StateLog {
                    tx: Mutex::new(Some(tx)),
                    shared,
                    dir,
                },
            );
        }
        Ok(Arc::new(AuditLog {
            states,
            hmac,
            key,
            replica: cfg.replica,
            append_spin: Duration::from_micros(cfg.append_spin_us.min(10_000)),
            in_flight,
        }))
    }

    /// How many requests the log's user (the gateway) has in flight; it counts them
    /// here. Polling (the writer's `writer_spin_us`, [`AuditLog::append`]'s) pays
    /// off only while at most one is: then the CPU is otherwise idle and polling saves a
    /// wake-up per record, while under load it would take CPU from the requests.
    pub fn in_flight(&self) -> &AtomicUsize {
        &self.in_flight
    }

    /// HMAC-SHA256 (hex) of `data` under `state`'s key.
    pub fn hmac(&self, state: &str, data: &[u8]) -> Result<String, AuditError> {
        let key = self
            .hmac
            .get(state)
            .ok_or_else(|| AuditError::UnknownState(state.to_string()))?;
        Ok(key.hex(data))
    }

    fn state(&self, state: &str) -> Result<&StateLog, AuditError> {
        self.states
            .get(state)
            .ok_or_else(|| AuditError::UnknownState(state.to_string()))
    }

    /// Append a record to its state's log; `Ok` only once it is durable (fsync'd).
    ///
    /// While at most one request is in flight ([`AuditLog::in_flight`]), nothing else
    /// needs this thread: the caller polls for the acknowledgement for up to
    /// `append_spin_us` (see [`poll_pause`]), then waits as usual. An idle gateway thereby
    /// answers without the thread wake-up after every fsync; a request arriving meanwhile
    /// waits at most that long. Under load it just waits.
    pub async fn append(&self, rec: RecordInput) -> Result<Appended, AuditError> {
        self.append_ordered(rec, None).await
    }

    /// [`AuditLog::append`], plus the record's signed `x-residency-receipt` for
    /// `subject` (whose state must be the record's): the writer signs it right after the
    /// group commit, once every append of that commit has been acknowledged, so the
    /// caller can forward its request meanwhile; the receipts of one commit share one
    /// signature. The receiver fails only if the writer stopped; sign with
    /// [`AuditLog::receipt`] then.
    pub async fn append_with_receipt(
        &self,
        rec: RecordInput,
        subject: &ReceiptSubject<'_>,
    ) -> Result<(Appended, oneshot::Receiver<String>), AuditError> {
        let (tx, rx) = oneshot::channel();
        let order = writer::ReceiptOrder {
            request_id: subject.request_id.to_string(),
            pool: subject.pool.to_string(),
            country: subject.country.to_string(),
            policy_hash: subject.policy_hash.to_string(),
            tx,
        };
        let a = self.append_ordered(rec, Some(Box::new(order))).await?;
        Ok((a, rx))
    }

    async fn append_ordered(
        &self,
        rec: RecordInput,
        order: Option<Box<writer::ReceiptOrder>>,
    ) -> Result<Appended, AuditError> {
        // A lone request polls for its acknowledgement on this thread, so it must come
        // straight from the writer, not through this runtime's mailbox.
        let alone = self.in_flight.load(Ordering::Relaxed) <= 1;
        let mut rx = self.submit(rec, order, !alone)?;
        if alone {
            let until = std::time::Instant::now() + self.append_spin;
            while std::time::Instant::now() < until {
                match rx.try_recv() {
                    Ok(r) => return r,
                    Err(oneshot::error::TryRecvError::Closed) => break,
                    Err(oneshot::error::TryRecvError::Empty) => poll_pause(),
                }
            }
        }
        acknowledged(rx.await)
    }

    /// Appends without waiting for durability: the record is written with the next
    /// synchronous append's fsync or within 20 ms, and before any checkpoint covering
    /// it. For records whose loss in a crash is acceptable (completion records); never
    /// for decision records.
    pub fn append_lazy(&self, rec: RecordInput) -> Result<(), AuditError> {
        let log = self.usable(&rec.state)?;
        if log.shared.push_lazy(rec)? {
            log.send(writer::Msg::Wake)?;
        }
        Ok(())
    }

    /// Queues `rec` on its state's writer.
    /// `batched`: acknowledge through the caller's runtime's mailbox, if it has one
    /// ([`mailbox`]).
    fn submit(
        &self,
        rec: RecordInput,
        order: Option<Box<writer::ReceiptOrder>>,
        batched: bool,
    ) -> Result<oneshot::Receiver<Result<Appended, AuditError>>, AuditError> {
        let log = self.usable(&rec.state)?;
        let (tx, rx) = oneshot::channel();
        let reply = if batched {
            mailbox::Reply::batched(tx)
        } else {
            mailbox::Reply::direct(tx)
        };
        log.send(writer::Msg::Append(Box::new(rec), reply, order))?;
        Ok(rx)
    }

    /// `state`'s log, refused at once when it has failed.
    fn usable(&self, state: &str) -> Result<&StateLog, AuditError> {
        let log = self.state(state)?;
        match log.shared.failed() {
            Some(why) => Err(AuditError::Unavailable(why)),
            None => Ok(log),
        }
    }

    /// The signed `x-residency-receipt` value for a served request.
    pub fn receipt(&self, a: &Appended, subject: &ReceiptSubject<'_>) -> String {
        let st = receipt::statement(&self.key, a, subject);
        receipt::sign_one(&self.key, &st)
    }

    /// The verifier key line for checkpoints and receipts.
    pub fn public_key(&self) -> String {
        self.key.vkey().to_string()
    }

    pub fn replica(&self) -> &str {
        &self.replica
    }

    /// The states with a log.
    pub fn states(&self) -> impl Iterator<Item = &str> {
        self.states.keys().map(String::as_str)
    }

    /// `state`'s log directory.
    pub fn state_dir(&self, state: &str) -> Option<&Path> {
        self.states.get(state).map(|s| s.dir.as_path())
    }

    /// Why `state`'s log refuses appends, if it does.
    pub fn failure(&self, state: &str) -> Option<String> {
        self.states.get(state).and_then(|s| s.shared.failed())
    }

    /// `(records, fsyncs)` of `state`'s log since open (records: tree size).
    pub fn stats(&self, state: &str) -> Option<(u64, u64)> {
        self.states.get(state).map(|s| {
            (
                s.shared.records.load(Ordering::Relaxed),
                s.shared.fsyncs.load(Ordering::Relaxed),
            )
        })
    }

    /// Sign a checkpoint over everything appended so far; returns its size.
    pub async fn checkpoint_now(&self, state: &str) -> Result<u64, AuditError> {
        let (tx, rx) = oneshot::channel();
        self.state(state)?.send(writer::Msg::Checkpoint(tx))?;
        rx.await
            .map_err(|_| AuditError::Unavailable("audit writer stopped".into()))?
    }

    /// Apply retention as if the time were `now` (the writer also does this hourly).
    /// Returns the deleted `[from, to)` sequence range, if any.
    pub async fn apply_retention(
        &self,
        state: &str,
        now: chrono::DateTime<chrono::Utc>,
    ) -> Result<Option<(u64, u64)>, AuditError> {
        let (tx, rx) = oneshot::channel();
        self.state(state)?.send(writer::Msg::Retention(now, tx))?;
        rx.await
            .map_err(|_| AuditError::Unavailable("audit writer stopped".into()))?
    }

    /// Test hook: the next flush of `state`'s log fails as if fsync had failed.
    #[doc(hidden)]
    pub fn inject_fsync_failure(&self, state: &str) {
        if let Some(s) = self.states.get(state) {
            s.shared.fail_next.store(true, Ordering::SeqCst);
        }
    }

    /// Final checkpoint covering everything, then stop the writers (later appends fail).
    pub async fn shutdown(&self) {
        for log in self.states.values() {
            let (tx, rx) = oneshot::channel();
            if log.send(writer::Msg::Shutdown(tx)).is_ok() {
                let _ = rx.await;
            }
            if let Ok(mut g) = log.tx.lock() {
                *g = None;
            }
        }
    }
}
