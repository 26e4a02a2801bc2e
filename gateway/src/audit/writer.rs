//! The one writer of a state's log: a dedicated thread that takes every append queued
//! since its last flush, writes them with one `write` to the segment and makes them
//! durable with one `fdatasync` of the durability ring ([`super::ring`]; group commit),
//! and only then acknowledges them. It also signs checkpoints (every N records or T ms),
//! rotates segments, and applies retention. Any write or fsync error puts the log in a
//! failed state that it never leaves: later appends are refused, never silently kept in
//! memory.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::os::fd::AsRawFd as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, TryRecvError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, SecondsFormat, Utc};
use tokio::sync::oneshot;

use super::keys::SigningKey;
use super::mailbox::{Deliveries, Reply};
use super::merkle::{Frontier, Hash, leaf_hash};
use super::receipt::{self, ReceiptSubject};
use super::record::{Phase, Record, RecordInput, Retention};
use super::ring::Ring;
use super::store::{
    self, Anchor, CheckpointLine, Lines, VKEY_FILE, checkpoints_path, frontier_hex, segment_path,
};
use super::verify::verify_log;
use super::{Appended, AuditError};

/// An append: the record, where its acknowledgement goes (none: lazy), and its receipt.
type Append = (RecordInput, Option<Reply>, Option<Box<ReceiptOrder>>);

/// Most appends taken into one group commit.
const MAX_BATCH: usize = 8192;
/// How often the writer looks for segments past retention.
const RETENTION_EVERY: Duration = Duration::from_secs(3600);

/// Appends assigned a seq, waiting for their flush (lazy ones have no reply), with the
/// receipt to sign for them once they are durable.
type Pending = Vec<(Option<Reply>, u64, Hash, Option<Box<ReceiptOrder>>)>;

/// A receipt for an append, signed by the writer right after the group commit that made
/// the record durable, once every append of that commit has been acknowledged
/// ([`super::AuditLog::append_with_receipt`]). The receipts of one commit share one
/// signature.
pub(crate) struct ReceiptOrder {
    pub request_id: String,
    pub pool: String,
    pub country: String,
    pub policy_hash: String,
    pub tx: oneshot::Sender<String>,
}

pub(crate) enum Msg {
    Append(Box<RecordInput>, Reply, Option<Box<ReceiptOrder>>),
    Retention(
        DateTime<Utc>,
        oneshot::Sender<Result<Option<(u64, u64)>, AuditError>>,
    ),
    Checkpoint(oneshot::Sender<Result<u64, AuditError>>),
    Shutdown(oneshot::Sender<()>),
    /// A lazy append was queued while the writer slept without a deadline
    /// ([`Shared::push_lazy`]).
    Wake,
}

/// Most bytes of lazy appends buffered before they are flushed anyway.
const LAZY_MAX_BYTES: usize = 256 * 1024;
/// Longest a lazy append stays buffered before its own flush.
const LAZY_MAX: Duration = Duration::from_millis(20);

/// Appends whose callers do not wait for durability (completion records). They wait
/// here rather than in the writer's channel, so that queueing one does not wake the
/// writer: it takes them at its next wake-up (the next synchronous append, or
/// [`LAZY_MAX`] at the latest while requests are in flight) and writes them with the
/// next fsync, or on their own after [`LAZY_MAX`], always before a checkpoint that
/// covers them. At concurrency 64 the wake-ups that lazy appends caused were about half
/// of the writer's (0.6-0.96 per request).
#[derive(Default)]
struct LazyQueue {
    /// Set by the writer when it stops: later pushes are refused, never lost.
    closed: bool,
    items: Vec<RecordInput>,
    /// When the oldest of `items` was queued.
    since: Option<Instant>,
}

/// State shared between the writer thread and `AuditLog`.
#[derive(Default)]
pub(crate) struct Shared {
    failed: Mutex<Option<String>>,
    /// Test hook: the next flush fails as if fsync had returned an error.
    pub fail_next: AtomicBool,
    pub fsyncs: AtomicU64,
    pub records: AtomicU64,
    lazy: Mutex<LazyQueue>,
    /// `lazy.items.len()`, for the polling writer.
    lazy_len: AtomicUsize,
    /// The writer sleeps, or is about to, with no deadline near: a lazy append must wake
    /// it (`Msg::Wake`). Both sides use SeqCst, so either the pusher sees this set or the
    /// writer sees the pushed record before it sleeps.
    parked: AtomicBool,
}

impl Shared {
    /// Queues a lazy append. `Ok(true)`: the writer sleeps without a deadline and must
    /// be sent [`Msg::Wake`].
    pub fn push_lazy(&self, rec: RecordInput) -> Result<bool, AuditError> {
        let mut q = self.lazy.lock().unwrap_or_else(|p| p.into_inner());
        if q.closed {
            return Err(AuditError::Unavailable("audit log shut down".into()));
        }
        q.items.push(rec);
        q.since.get_or_insert_with(Instant::now);
        self.lazy_len.store(q.items.len(), Ordering::SeqCst);
        drop(q);
        Ok(self.parked.load(Ordering::SeqCst))
    }

    /// Moves the queued lazy appends to `into`; returns when the oldest was queued.
    /// `close`: refuse later pushes.
    fn take_lazy(&self, into: &mut Vec<RecordInput>, close: bool) -> Option<Instant> {
        let mut q = self.lazy.lock().unwrap_or_else(|p| p.into_inner());
        q.closed |= close;
        into.append(&mut q.items);
        self.lazy_len.store(0, Ordering::SeqCst);
        q.since.take()
    }

    pub fn failed(&self) -> Option<String> {
        self.failed
            .lock()
            .map(|g| g.clone())
            .unwrap_or_else(|_| Some("poisoned".into()))
    }

    fn set_failed(&self, why: String) {
        tracing::error!(%why, "audit log failed; refusing further appends");
        if let Ok(mut g) = self.failed.lock()
            && g.is_none()
        {
            *g = Some(why);
        }
    }
}

#[derive(Clone)]
pub(crate) struct WriterCfg {
    pub every_records: u64,
    pub every: Duration,
    pub segment_max_bytes: u64,
    pub retention_days: u32,
    /// Polling before sleeping (`AuditConfig::writer_spin_us`).
    pub spin: Duration,
    /// `AuditConfig::commit_delay_us` and `commit_siblings`.
    pub commit_delay: Duration,
    pub commit_siblings: usize,
    /// `AuditConfig::ring_bytes` (0: fsync the segment itself).
    pub ring_bytes: u64,
    /// [`super::AuditLog::in_flight`]: the writer polls only while it is at most 1.
    pub in_flight: Arc<std::sync::atomic::AtomicUsize>,
}

pub(crate) struct Writer {
    dir: PathBuf,
    /// Shared with every `Appended` it acknowledges.
    origin: Arc<str>,
    state: String,
    key: Arc<SigningKey>,
    cfg: WriterCfg,
    shared: Arc<Shared>,
    frontier: Frontier,
    boundaries: BTreeMap<u64, Frontier>,
    seg_first: u64,
    seg: File,
    seg_bytes: u64,
    /// The segment holds bytes written since its last `fdatasync`.
    seg_dirty: bool,
    ring: Option<Ring>,
    cp_file: Option<File>,
    last_cp_size: u64,
    last_cp_at: Instant,
    last_retention: Instant,
    /// Messages in the last batch taken from the queue (decides whether to poll).
    last_batch: usize,
    /// Lazy appends assigned a seq but not yet written (see [`Msg::AppendLazy`]).
    lazy_buf: Vec<u8>,
    /// Scratch for one record's canonical line (keeps its capacity).
    line: Vec<u8>,
    lazy_pending: Pending,
    lazy_since: Option<Instant>,
    _lock: File,
}

fn now_rfc3339() -> String {
    Utc::now().to_rfc3339_opts(SecondsFormat::Millis, true)
}

impl Writer {
    /// Open (or create) the log in `dir`: take its lock, finish an interrupted
    /// retention, cut torn tails, verify everything against our own key, and continue.
    pub fn open(
        dir: PathBuf,
        origin: String,
        state: String,
        key: Arc<SigningKey>,
        cfg: WriterCfg,
        shared: Arc<Shared>,
    ) -> Result<Self, AuditError> {
        std::fs::create_dir_all(&dir).map_err(|e| AuditError::io(&dir, e))?;
        let lock = lock_dir(&dir)?;
        let vkey_path = dir.join(VKEY_FILE);
        let vkey_line = format!("{}\n", key.vkey());
        if std::fs::read_to_string(&vkey_path).ok().as_deref() != Some(vkey_line.as_str()) {
            store::write_atomic(&vkey_path, vkey_line.as_bytes())?;
        }
        finish_retention(&dir)?;
        if let Some((first, last)) = store::list_segments(&dir)?.last() {
            cut_torn_tail(last)?;
            replay_ring(&dir, *first, last)?;
        }
        if let Some((_, last)) = store::list_checkpoint_files(&dir)?.last() {
            cut_torn_tail(last)?;
        }
        let trusted = [super::keys::VerifierKey::parse(key.vkey())?];
        let (report, state_opt) = verify_log(&dir, &trusted, &mut |_| {});
        let log = match (state_opt, report.error) {
            (Some(s), _) => s,
            (None, Some(f)) => {
                return Err(AuditError::Corrupt(format!(
                    "{}: {}{}",
                    dir.display(),
                    f.seq.map(|s| format!("seq {s}: ")).unwrap_or_default(),
                    f.what
                )));
            }
            (None, None) => {
                return Err(AuditError::Corrupt(format!(
                    "{}: unreadable",
                    dir.display()
                )));
            }
        };
        if let Some(o) = &log.origin
            && *o != origin
        {
            return Err(AuditError::Corrupt(format!(
                "{} holds the log of origin `{o}`, not `{origin}` (each replica needs its own \
                 audit directory and replica id)",
                dir.display()
            )));
        }
        let size = log.frontier.size();
        let segments = store::list_segments(&dir)?;
        let (seg_first, seg_path) = match segments.last() {
            Some((f, p)) => (*f, p.clone()),
            None => (size, segment_path(&dir, size)),
        };
        let seg = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&seg_path)
            .map_err(|e| AuditError::io(&seg_path, e))?;
        let seg_bytes = seg
            .metadata()
            .map_err(|e| AuditError::io(&seg_path, e))?
            .len();
        // The ring restarts at offset 0: everything in it must be in a durable segment.
        seg.sync_data().map_err(|e| AuditError::io(&seg_path, e))?;
        store::fsync_dir(&dir)?;
        let ring = match cfg.ring_bytes {
            0 => None,
            n => Some(Ring::open(&dir, n)?),
        };
        let mut boundaries = log.boundaries;
        boundaries
            .entry(seg_first)
            .or_insert_with(|| log.frontier.clone());
        let last_cp_size = log
            .last_checkpoint
            .as_ref()
            .map(|c| c.size)
            .unwrap_or(0)
            .max(log.anchor.as_ref().map(|a| a.cut).unwrap_or(0));
        shared.records.store(size, Ordering::Relaxed);
        let mut w = Self {
            dir,
            origin: origin.into(),
            state,
            key,
            cfg,
            shared,
            frontier: log.frontier,
            boundaries,
            seg_first,
            seg,
            seg_bytes,
            seg_dirty: false,
            ring,
            cp_file: None,
            last_cp_size,
            last_cp_at: Instant::now(),
            last_retention: Instant::now(),
            last_batch: 0,
            lazy_buf: Vec::new(),
            line: Vec::with_capacity(1024),
            lazy_pending: Vec::new(),
            lazy_since: None,
            _lock: lock,
        };
        // Records acknowledged before a crash get their checkpoint now.
        w.checkpoint_if(true)?;
        w.retention(Utc::now())?;
        Ok(w)
    }

    pub fn run(mut self, rx: Receiver<Msg>) {
        loop {
            let mut timeout = if self.frontier.size() > self.last_cp_size {
                self.cfg.every.saturating_sub(self.last_cp_at.elapsed())
            } else {
                Duration::from_secs(60)
            };
            if let Some(since) = self.lazy_since {
                timeout = timeout.min(LAZY_MAX.saturating_sub(since.elapsed()));
            }
            let mut batch = Vec::new();
            let lazy_queued = |w: &Self| w.shared.lazy_len.load(Ordering::SeqCst) > 0;
            // Poll briefly before sleeping (`super::poll_pause`) while one request at a
            // time is served: its next record comes within
            // microseconds, and a sleeping writer costs its sender a futex wake-up and
            // itself a context switch each time. Under load (more requests in flight, or
            // many records per wake-up) the wake-up is shared, and polling would only
            // take CPU from the request threads: at concurrency 64 it took a fifth of
            // this thread's CPU while batches still came one or two records at a time.
            let spin = if self.last_batch <= 2
                && self
                    .cfg
                    .in_flight
                    .load(std::sync::atomic::Ordering::Relaxed)
                    <= 1
            {
                self.cfg.spin
            } else {
                Duration::ZERO
            };
            let spin_until = Instant::now() + spin;
            let first = loop {
                match rx.try_recv() {
                    Ok(m) => break Some(m),
                    Err(TryRecvError::Disconnected) => {
                        self.finish();
                        return;
                    }
                    Err(TryRecvError::Empty) if lazy_queued(&self) => break None,
                    Err(TryRecvError::Empty) if Instant::now() < spin_until => {
                        super::poll_pause();
                    }
                    Err(TryRecvError::Empty) => break None,
                }
            };
            match first {
                Some(m) => batch.push(m),
                None if lazy_queued(&self) => {}
                None => {
                    // While requests are in flight, lazy appends are coming and do not
                    // wake the writer: sleep at most LAZY_MAX. Otherwise sleep until the
                    // next message, and have a lazy append wake it (`parked`).
                    let idle = self.cfg.in_flight.load(Ordering::SeqCst) == 0;
                    if idle {
                        self.shared.parked.store(true, Ordering::SeqCst);
                    } else {
                        timeout = timeout.min(LAZY_MAX);
                    }
                    if !(idle && lazy_queued(&self)) {
                        match rx.recv_timeout(timeout) {
                            Ok(m) => batch.push(m),
                            Err(RecvTimeoutError::Timeout) => {}
                            Err(RecvTimeoutError::Disconnected) => {
                                self.shared.parked.store(false, Ordering::SeqCst);
                                self.finish();
                                return;
                            }
                        }
                    }
                    self.shared.parked.store(false, Ordering::SeqCst);
                }
            }
            let drain = |batch: &mut Vec<Msg>| {
                while batch.len() < MAX_BATCH {
                    match rx.try_recv() {
                        Ok(m) => batch.push(m),
                        Err(_) => break,
                    }
                }
            };
            drain(&mut batch);
            // Commit delay (as PostgreSQL's commit_delay / commit_siblings): with many
            // requests in flight, more decision records are about to come; waiting a
            // little lets one fsync cover them, and an fsync costs ~15-20 us of CPU.
            // Alone or nearly so, a request never waits.
            if !self.cfg.commit_delay.is_zero()
                && batch.iter().any(|m| matches!(m, Msg::Append(..)))
                && self.cfg.in_flight.load(Ordering::Relaxed) >= self.cfg.commit_siblings
            {
                std::thread::sleep(self.cfg.commit_delay);
                drain(&mut batch);
            }
            let mut lazy = Vec::new();
            let since = self.shared.take_lazy(&mut lazy, false);
            self.last_batch = batch.len() + lazy.len();
            // Lazy appends first: they were mostly queued before the batch's.
            let mut appends: Vec<_> = lazy.into_iter().map(|r| (r, None, None)).collect();
            if let Some(t) = since {
                self.lazy_since = Some(self.lazy_since.map_or(t, |s| s.min(t)));
            }
            let mut control = Vec::new();
            for m in batch {
                match m {
                    Msg::Append(input, tx, order) => appends.push((*input, Some(tx), order)),
                    other => control.push(other),
                }
            }
            if !appends.is_empty() {
                self.commit(appends);
            } else if self.lazy_since.is_some_and(|t| t.elapsed() >= LAZY_MAX) {
                self.flush_lazy();
            }
            if self.shared.failed().is_none()
                && let Err(e) = self.checkpoint_if(false)
            {
                self.shared.set_failed(format!("checkpoint: {e}"));
            }
            if self.last_retention.elapsed() >= RETENTION_EVERY {
                self.last_retention = Instant::now();
                if let Err(e) = self.retention(Utc::now()) {
                    tracing::error!(state = %self.state, "audit retention failed: {e}");
                }
            }
            for m in control {
                match m {
                    Msg::Retention(now, tx) => {
                        let _ = tx.send(self.retention(now));
                    }
                    Msg::Checkpoint(tx) => {
                        let r = self.checkpoint_if(true).map(|()| self.last_cp_size);
                        let _ = tx.send(r);
                    }
                    Msg::Shutdown(tx) => {
                        self.finish();
                        // Release the files and the lock before answering.
                        drop(self);
                        let _ = tx.send(());
                        return;
                    }
                    Msg::Append(..) | Msg::Wake => {}
                }
            }
        }
    }

    fn finish(&mut self) {
        let mut lazy = Vec::new();
        self.shared.take_lazy(&mut lazy, true);
        if !lazy.is_empty() {
            self.commit(lazy.into_iter().map(|r| (r, None, None)).collect());
        }
        self.flush_lazy();
        if self.shared.failed().is_none()
            && let Err(e) = self.checkpoint_if(true)
        {
            self.shared.set_failed(format!("final checkpoint: {e}"));
        }
        if let Err(e) = self.sync_segment() {
            self.shared.set_failed(format!("closing the segment: {e}"));
        }
    }

    /// Assign sequence numbers, write and fsync, then acknowledge (group commit).
    /// `None` replies: lazy appends.
    fn commit(&mut self, appends: Vec<Append>) {
        if let Some(why) = self.shared.failed() {
            for tx in appends.into_iter().filter_map(|a| a.1) {
                tx.send(Err(AuditError::Unavailable(why.clone())));
            }
            return;
        }
        // Buffered lazy appends come first: their seqs are older.
        let mut buf = std::mem::take(&mut self.lazy_buf);
        let mut pending: Pending = std::mem::take(&mut self.lazy_pending);
        let mut line = std::mem::take(&mut self.line);
        let any_sync = appends.iter().any(|a| a.1.is_some());
        let time = now_rfc3339();
        let mut iter = appends.into_iter();
        while let Some((input, tx, order)) = iter.next() {
            let seq = self.frontier.size();
            let rec = Record::from_input(input, &self.origin, seq, time.clone());
            line.clear();
            if let Err(e) = rec.write_canonical(&mut line) {
                if let Some(tx) = tx {
                    tx.send(Err(e));
                }
                continue;
            }
            if self.seg_bytes > 0
                && self.seg_bytes + (buf.len() + line.len() + 1) as u64 > self.cfg.segment_max_bytes
            {
                let rotated = self
                    .flush(&mut buf, &mut pending)
                    .and_then(|()| self.rotate());
                if let Err(e) = rotated {
                    self.shared.set_failed(e.to_string());
                    for tx in tx.into_iter().chain(iter.filter_map(|a| a.1)) {
                        tx.send(Err(AuditError::Unavailable(e.to_string())));
                    }
                    self.lazy_since = None;
                    return;
                }
            }
            let leaf = leaf_hash(&line);
            buf.extend_from_slice(&line);
            buf.push(b'\n');
            self.frontier.push(leaf);
            pending.push((tx, seq, leaf, order));
        }
        let overdue = self.lazy_since.is_some_and(|t| t.elapsed() >= LAZY_MAX);
        if any_sync || overdue || buf.len() >= LAZY_MAX_BYTES {
            if let Err(e) = self.flush(&mut buf, &mut pending) {
                self.shared.set_failed(e.to_string());
            }
            self.lazy_since = None;
        } else if !pending.is_empty() {
            self.lazy_since.get_or_insert_with(Instant::now);
        }
        self.lazy_buf = buf;
        self.lazy_pending = pending;
        self.line = line;
    }

    /// Writes and fsyncs the buffered lazy appends, if any.
    fn flush_lazy(&mut self) {
        if self.lazy_pending.is_empty() {
            self.lazy_since = None;
            return;
        }
        let mut buf = std::mem::take(&mut self.lazy_buf);
        let mut pending = std::mem::take(&mut self.lazy_pending);
        if let Err(e) = self.flush(&mut buf, &mut pending) {
            self.shared.set_failed(e.to_string());
        }
        self.lazy_since = None;
        self.lazy_buf = buf;
    }

    /// Write and fdatasync `buf`, then acknowledge `pending`. On error every pending
    /// append gets the error and the log is marked failed.
    fn flush(&mut self, buf: &mut Vec<u8>, pending: &mut Pending) -> Result<(), AuditError> {
        if buf.is_empty() {
            return Ok(());
        }
        let first_seq = pending.first().map_or(0, |p| p.1);
        let count = pending.len() as u32;
        let res = if self.shared.fail_next.swap(false, Ordering::SeqCst) {
            Err((false, std::io::Error::other("injected fsync failure")))
        } else {
            self.write_durable(buf, first_seq, count)
        };
        if let Err((in_ring, e)) = res {
            let err = match (in_ring, &self.ring) {
                (true, Some(r)) => AuditError::io(r.path(), e),
                _ => AuditError::io(&segment_path(&self.dir, self.seg_first), e),
            };
            self.shared.set_failed(err.to_string());
            for tx in pending.drain(..).filter_map(|p| p.0) {
                tx.send(Err(AuditError::Unavailable(err.to_string())));
            }
            buf.clear();
            return Err(err);
        }
        self.shared.fsyncs.fetch_add(1, Ordering::Relaxed);
        self.seg_bytes += buf.len() as u64;
        buf.clear();
        let size = self.frontier.size();
        self.shared.records.store(size, Ordering::Relaxed);
        let root = self.frontier.root();
        let mut orders = Vec::new();
        let mut acks = Deliveries::default();
        for (tx, seq, leaf, order) in pending.drain(..) {
            let appended = Appended {
                origin: self.origin.clone(),
                seq,
                leaf_hash: leaf,
                covered_by_size: size,
                covered_by_root: root,
            };
            if let Some(o) = order {
                orders.push((o, appended.clone()));
            }
            if let Some(tx) = tx {
                acks.push(tx, Ok(appended));
            }
        }
        acks.post();
        // After every acknowledgement: the requests go on to their workers meanwhile.
        self.sign_receipts(orders);
        Ok(())
    }

    /// Signs the receipts ordered with one group commit, one signature per
    /// [`receipt::MAX_BATCH`] of them.
    fn sign_receipts(&self, mut orders: Vec<(Box<ReceiptOrder>, Appended)>) {
        while !orders.is_empty() {
            let rest = orders.split_off(orders.len().min(receipt::MAX_BATCH));
            let payloads: Vec<Vec<u8>> = orders
                .iter()
                .map(|(o, a)| {
                    let subject = ReceiptSubject {
                        request_id: &o.request_id,
                        state: &self.state,
                        pool: &o.pool,
                        country: &o.country,
                        policy_hash: &o.policy_hash,
                    };
                    receipt::statement(&self.key, a, &subject)
                })
                .collect();
            let refs: Vec<&[u8]> = payloads.iter().map(Vec::as_slice).collect();
            let signed = receipt::sign_batch(&self.key, &refs);
            for ((o, _), r) in orders.into_iter().zip(signed) {
                let _ = o.tx.send(r);
            }
            orders = rest;
        }
    }

    /// Appends `buf` (`count` lines from `first_seq` on) to the segment and makes it
    /// durable: through the ring, or by fsyncing the segment when there is no ring or the
    /// batch is larger than the ring. `Err((true, _))`: the ring's write failed.
    fn write_durable(
        &mut self,
        buf: &[u8],
        first_seq: u64,
        count: u32,
    ) -> Result<(), (bool, std::io::Error)> {
        self.seg.write_all(buf).map_err(|e| (false, e))?;
        self.seg_dirty = true;
        let seg = &self.seg;
        let mut seg_failed = false;
        let in_ring = match self.ring.as_mut() {
            // Before the ring wraps, the segment is made durable.
            Some(r) => r
                .append(first_seq, count, buf, || {
                    seg.sync_data().inspect_err(|_| seg_failed = true)
                })
                .map_err(|e| (!seg_failed, e))?,
            None => false,
        };
        if !in_ring {
            self.seg.sync_data().map_err(|e| (false, e))?;
            self.seg_dirty = false;
        }
        Ok(())
    }

    /// Makes the segment durable if it holds bytes written since its last fsync.
    fn sync_segment(&mut self) -> Result<(), AuditError> {
        if self.seg_dirty {
            self.seg
                .sync_data()
                .map_err(|e| AuditError::io(&segment_path(&self.dir, self.seg_first), e))?;
            self.seg_dirty = false;
        }
        Ok(())
    }

    /// Close the segment with a checkpoint at its end and start the next one.
    fn rotate(&mut self) -> Result<(), AuditError> {
        self.checkpoint_if(true)?;
        self.sync_segment()?;
        let first = self.frontier.size();
        let path = segment_path(&self.dir, first);
        self.seg = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| AuditError::io(&path, e))?;
        store::fsync_dir(&self.dir)?;
        self.seg_first = first;
        self.seg_bytes = 0;
        self.cp_file = None;
        self.boundaries.insert(first, self.frontier.clone());
        Ok(())
    }

    /// Sign and store a checkpoint when due (or when `force`d and the tree grew).
    fn checkpoint_if(&mut self, force: bool) -> Result<(), AuditError> {
        let size = self.frontier.size();
        if size <= self.last_cp_size {
            return Ok(());
        }
        let due = force
            || size - self.last_cp_size >= self.cfg.every_records
            || self.last_cp_at.elapsed() >= self.cfg.every;
        if !due {
            return Ok(());
        }
        // A checkpoint only ever covers records in durable segments (not only in the
        // ring), so that an auditor can verify the files as they are after a crash.
        self.flush_lazy();
        if let Some(why) = self.shared.failed() {
            return Err(AuditError::Unavailable(why));
        }
        self.sync_segment()?;
        let note = self
            .key
            .sign_checkpoint(&self.origin, size, &self.frontier.root())?;
        let line = CheckpointLine { size, note }.to_line()?;
        let path = checkpoints_path(&self.dir, self.seg_first);
        if self.cp_file.is_none() {
            let f = OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .map_err(|e| AuditError::io(&path, e))?;
            store::fsync_dir(&self.dir)?;
            self.cp_file = Some(f);
        }
        if let Some(f) = self.cp_file.as_mut() {
            f.write_all(&line)
                .and_then(|()| f.sync_data())
                .map_err(|e| AuditError::io(&path, e))?;
        }
        self.last_cp_size = size;
        self.last_cp_at = Instant::now();
        Ok(())
    }

    /// Delete closed segments whose newest record is older than the retention period.
    /// The deletion is recorded first (a `retention` record with the compact range at the
    /// cut), then the anchor is written, then the files go.
    fn retention(&mut self, now: DateTime<Utc>) -> Result<Option<(u64, u64)>, AuditError> {
        if self.shared.failed().is_some() {
            return Ok(None);
        }
        let cutoff = now - chrono::Duration::days(i64::from(self.cfg.retention_days));
        let segments = store::list_segments(&self.dir)?;
        let mut delete: Vec<(u64, PathBuf)> = Vec::new();
        let mut cut = None;
        for (i, (first, path)) in segments.iter().enumerate() {
            if *first == self.seg_first {
                break;
            }
            let Some(line) = store::last_line(path)? else {
                break;
            };
            let Ok(rec) = serde_json::from_slice::<Record>(&line) else {
                break;
            };
            let Ok(t) = DateTime::parse_from_rfc3339(&rec.time) else {
                break;
            };
            if t >= cutoff {
                break;
            }
            delete.push((*first, path.clone()));
            cut = segments.get(i + 1).map(|s| s.0);
        }
        let (Some(cut), Some(from)) = (cut, delete.first().map(|d| d.0)) else {
            return Ok(None);
        };
        let f = self.boundaries.get(&cut).cloned().ok_or_else(|| {
            AuditError::Corrupt(format!("no tree state at segment boundary {cut}"))
        })?;
        let root = f.root();
        let note = self.key.sign_checkpoint(&self.origin, cut, &root)?;
        let names: Vec<String> = delete
            .iter()
            .filter_map(|(_, p)| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .collect();
        let input = RecordInput {
            phase: Phase::Retention,
            state: self.state.clone(),
            retention: Some(Retention {
                deleted_from: from,
                deleted_to: cut,
                segments: names,
                frontier: frontier_hex(&f),
                root: crate::hexstr(root),
            }),
            ..RecordInput::default()
        };
        let (tx, mut rx) = oneshot::channel();
        self.commit(vec![(input, Some(Reply::direct(tx)), None)]);
        match rx.try_recv() {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(e),
            Err(_) => {
                return Err(AuditError::Unavailable(
                    "retention record not written".into(),
                ));
            }
        }
        Anchor {
            origin: self.origin.to_string(),
            cut,
            frontier: frontier_hex(&f),
            root: crate::hexstr(root),
            checkpoint: note,
        }
        .write(&self.dir)?;
        remove_segments(&self.dir, &delete)?;
        self.boundaries.retain(|k, _| *k >= cut);
        tracing::info!(state = %self.state, from, cut, "audit retention deleted records");
        Ok(Some((from, cut)))
    }
}

fn remove_segments(dir: &Path, segs: &[(u64, PathBuf)]) -> Result<(), AuditError> {
    for (first, path) in segs {
        for p in [path.clone(), checkpoints_path(dir, *first)] {
            match std::fs::remove_file(&p) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(AuditError::io(&p, e)),
            }
        }
    }
    store::fsync_dir(dir)
}

/// A crash between writing the anchor and deleting the segments leaves segments wholly
/// below the cut; delete them now.
fn finish_retention(dir: &Path) -> Result<(), AuditError> {
    let Some(anchor) = Anchor::read(dir)? else {
        return Ok(());
    };
    let segs = store::list_segments(dir)?;
    let mut below = Vec::new();
    for w in segs.windows(2) {
        if w[1].0 <= anchor.cut {
            below.push(w[0].clone());
        }
    }
    if below.is_empty() {
        return Ok(());
    }
    remove_segments(dir, &below)
}

/// Appends to the last segment (`path`, first seq `first`) the records that were made
/// durable in the ring but did not reach the segment's disk blocks before a crash, and
/// fsyncs it. Runs after the segment's torn tail was cut.
fn replay_ring(dir: &Path, first: u64, path: &Path) -> Result<(), AuditError> {
    let frames = Ring::read(dir)?;
    if frames.is_empty() {
        return Ok(());
    }
    let next = match store::last_line(path)? {
        None => first,
        Some(line) => {
            let rec: Record = serde_json::from_slice(&line).map_err(|e| {
                AuditError::Corrupt(format!("{}: last record: {e}", path.display()))
            })?;
            rec.seq + 1
        }
    };
    let mut want = next;
    let mut add = Vec::new();
    for f in &frames {
        for (seq, line) in (f.first_seq..).zip(f.payload.split_inclusive(|b| *b == b'\n')) {
            if seq == want {
                add.extend_from_slice(line);
                want += 1;
            }
        }
    }
    if add.is_empty() {
        return Ok(());
    }
    let mut seg = OpenOptions::new()
        .append(true)
        .open(path)
        .map_err(|e| AuditError::io(path, e))?;
    seg.write_all(&add)
        .and_then(|()| seg.sync_data())
        .map_err(|e| AuditError::io(path, e))?;
    tracing::warn!(
        file = %path.display(),
        records = want - next,
        "audit: restored records from the durability ring that the segment lost in a crash"
    );
    Ok(())
}

/// Remove bytes after the last newline: a record or checkpoint torn by a crash was never
/// acknowledged.
fn cut_torn_tail(path: &Path) -> Result<(), AuditError> {
    let lines = Lines::read(path)?;
    if lines.torn > 0 {
        tracing::warn!(file = %path.display(), bytes = lines.torn, "audit: removing torn tail");
        store::truncate_to(path, lines.complete_len() as u64)?;
    }
    Ok(())
}

fn lock_dir(dir: &Path) -> Result<File, AuditError> {
    let p = dir.join("LOCK");
    let f = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&p)
        .map_err(|e| AuditError::io(&p, e))?;
    // SAFETY: flock on a file descriptor we own; no memory is involved.
    let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        return Err(AuditError::Corrupt(format!(
            "{} is locked by another gateway process",
            dir.display()
        )));
    }
    Ok(f)
}
