//! The durability ring: where an append becomes durable before it is acknowledged.
//!
//! Appending to a segment and `fdatasync`ing it changes the file's size each time, so
//! every fsync also commits the file system's journal (the inode). On this project's disk
//! that is 120-180 us per fsync; overwriting blocks that are already allocated and
//! written costs 85-120 us (docs/benchmarks.md). So each group commit writes its lines
//! twice: into the segment, through the page cache and without an fsync, and as one
//! frame into this fixed-size, zero-filled file, which is then `fdatasync`ed. That is the
//! approach of database write-ahead logs (PostgreSQL's preallocated WAL segments), and it
//! keeps the segments themselves plain JSON lines that any tool can read.
//!
//! Invariants:
//! - A segment is made durable (`fdatasync`) before the ring wraps, before a checkpoint
//!   is signed over its records, when it is closed, and when the log is opened. So the
//!   ring only ever holds what may be missing from the last segment after a crash, and a
//!   checkpoint never covers a record that is only in the ring.
//! - The ring is written from offset 0 after every wrap and every open; a reader walks
//!   it from offset 0 and stops at the first frame that is torn (checksum), not a frame
//!   at all (zeros, or stale bytes of an earlier lap), or not the continuation of the
//!   frame before it.
//!
//! Frame: `b"SVR1"`, first seq (u64 LE), record count (u32 LE), payload length (u32 LE),
//! CRC-32 of the preceding 16 bytes and the payload (u32 LE), then the payload: `count`
//! record lines, each ending in a newline, exactly as they are in the segment.

use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};

use super::AuditError;
use super::store;

/// The ring's file name in a state's log directory.
pub const RING_FILE: &str = "durable.ring";
/// Default size: at 20 000 requests/s (two ~620-byte records each) it wraps about every
/// 0.3 s, so the extra segment fsync at each wrap is rare.
pub const DEFAULT_RING_BYTES: u64 = 8 << 20;
const MAGIC: [u8; 4] = *b"SVR1";
const HEADER: usize = 24;

pub(crate) struct Ring {
    file: File,
    path: PathBuf,
    cap: u64,
    /// Where the next frame goes.
    off: u64,
    /// Scratch for one frame (keeps its capacity).
    frame: Vec<u8>,
}

/// One frame read back: the seq of its first record and its record lines.
pub(crate) struct Frame {
    pub first_seq: u64,
    pub count: u32,
    pub payload: Vec<u8>,
}

fn crc(head: &[u8], payload: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(head);
    h.update(payload);
    h.finalize()
}

impl Ring {
    /// Opens the ring in `dir`, or creates it: `cap` bytes of written zeros, durable
    /// (a file of the wrong size is recreated). Writing starts at offset 0.
    pub fn open(dir: &Path, cap: u64) -> Result<Self, AuditError> {
        let path = dir.join(RING_FILE);
        let ok = std::fs::metadata(&path).is_ok_and(|m| m.len() == cap);
        if !ok {
            // Zeros written, not `fallocate`d: writing into unwritten extents would make
            // every fsync commit the journal again.
            let tmp = dir.join(format!("{RING_FILE}.tmp"));
            let mut f = File::create(&tmp).map_err(|e| AuditError::io(&tmp, e))?;
            let zeros = vec![0u8; 1 << 20];
            let mut left = cap;
            while left > 0 {
                let n = left.min(zeros.len() as u64) as usize;
                f.write_all(&zeros[..n])
                    .map_err(|e| AuditError::io(&tmp, e))?;
                left -= n as u64;
            }
            f.sync_all().map_err(|e| AuditError::io(&tmp, e))?;
            std::fs::rename(&tmp, &path).map_err(|e| AuditError::io(&path, e))?;
            store::fsync_dir(dir)?;
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| AuditError::io(&path, e))?;
        Ok(Self {
            file,
            path,
            cap,
            off: 0,
            frame: Vec::new(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes `payload` (`count` lines from `first_seq` on) as one frame and
    /// `fdatasync`s it. Before the ring wraps, `sync_segment` must make the segment
    /// durable. `Ok(false)`: the frame cannot fit in the ring at all; the caller must
    /// fsync the segment instead.
    pub fn append(
        &mut self,
        first_seq: u64,
        count: u32,
        payload: &[u8],
        sync_segment: impl FnOnce() -> std::io::Result<()>,
    ) -> std::io::Result<bool> {
        let need = (HEADER + payload.len()) as u64;
        if need > self.cap || payload.len() > u32::MAX as usize {
            return Ok(false);
        }
        if self.off + need > self.cap {
            sync_segment()?;
            self.off = 0;
        }
        self.frame.clear();
        self.frame.extend_from_slice(&MAGIC);
        self.frame.extend_from_slice(&first_seq.to_le_bytes());
        self.frame.extend_from_slice(&count.to_le_bytes());
        self.frame
            .extend_from_slice(&(payload.len() as u32).to_le_bytes());
        let c = crc(&self.frame[4..20], payload);
        self.frame.extend_from_slice(&c.to_le_bytes());
        self.frame.extend_from_slice(payload);
        self.file.write_all_at(&self.frame, self.off)?;
        self.file.sync_data()?;
        self.off += need;
        Ok(true)
    }

    /// The frames of the current lap, in order (see the module's invariants).
    pub fn read(dir: &Path) -> Result<Vec<Frame>, AuditError> {
        let path = dir.join(RING_FILE);
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(AuditError::io(&path, e)),
        };
        let size = file.metadata().map_err(|e| AuditError::io(&path, e))?.len();
        // Frame by frame, so that opening a log reads only the current lap, not the
        // whole ring.
        let mut frames: Vec<Frame> = Vec::new();
        let mut off = 0u64;
        let mut h = [0u8; HEADER];
        while off + HEADER as u64 <= size {
            file.read_exact_at(&mut h, off)
                .map_err(|e| AuditError::io(&path, e))?;
            if h[..4] != MAGIC {
                break;
            }
            let word = |a: usize| u32::from_le_bytes([h[a], h[a + 1], h[a + 2], h[a + 3]]);
            let mut seq = [0u8; 8];
            seq.copy_from_slice(&h[4..12]);
            let first_seq = u64::from_le_bytes(seq);
            let (count, len) = (word(12), u64::from(word(16)));
            let end = off + HEADER as u64 + len;
            if end > size
                || frames
                    .last()
                    .is_some_and(|prev| prev.first_seq + u64::from(prev.count) != first_seq)
            {
                break;
            }
            let mut payload = vec![0u8; len as usize];
            file.read_exact_at(&mut payload, off + HEADER as u64)
                .map_err(|e| AuditError::io(&path, e))?;
            if crc(&h[4..20], &payload) != word(20) {
                break;
            }
            frames.push(Frame {
                first_seq,
                count,
                payload,
            });
            off = end;
        }
        Ok(frames)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("sov-ring-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    /// `n` lines of `len` bytes each, for seqs from `first`.
    fn lines(first: u64, n: u32, len: usize) -> Vec<u8> {
        let mut out = Vec::new();
        for i in 0..u64::from(n) {
            let mut l = format!("{{\"seq\":{}}}", first + i).into_bytes();
            l.resize(len - 1, b' ');
            l.push(b'\n');
            out.extend_from_slice(&l);
        }
        out
    }

    fn seqs(frames: &[Frame]) -> Vec<u64> {
        frames
            .iter()
            .flat_map(|f| f.first_seq..f.first_seq + u64::from(f.count))
            .collect()
    }

    #[test]
    fn frames_read_back_in_order_and_wrapping_syncs_the_segment_first() {
        let d = dir("wrap");
        let cap = 64 * 1024;
        let mut r = Ring::open(&d, cap).unwrap();
        assert_eq!(std::fs::metadata(d.join(RING_FILE)).unwrap().len(), cap);
        let mut seq = 0;
        let mut syncs = 0;
        // 3 records of 1000 bytes per frame: 21 frames fill the ring; the 22nd wraps.
        for _ in 0..30 {
            assert!(
                r.append(seq, 3, &lines(seq, 3, 1000), || {
                    syncs += 1;
                    Ok(())
                })
                .unwrap()
            );
            seq += 3;
        }
        assert_eq!(syncs, 1);
        // The current lap (frames 21..29) is read; the rest of the previous lap is stale.
        let frames = Ring::read(&d).unwrap();
        assert_eq!(seqs(&frames), (63..90).collect::<Vec<_>>());
        assert_eq!(frames[0].payload, lines(63, 3, 1000));
        // Reopened, the ring starts again at 0: only the new frame is current.
        let mut r = Ring::open(&d, cap).unwrap();
        assert!(r.append(90, 1, &lines(90, 1, 1000), || Ok(())).unwrap());
        assert_eq!(seqs(&Ring::read(&d).unwrap()), vec![90]);
        // A batch larger than the ring is refused (the caller fsyncs the segment).
        assert!(!r.append(91, 70, &lines(91, 70, 1000), || Ok(())).unwrap());
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn a_torn_frame_ends_the_lap_and_a_wrong_size_is_recreated() {
        let d = dir("torn");
        let mut r = Ring::open(&d, 64 * 1024).unwrap();
        for s in 0..4 {
            r.append(s, 1, &lines(s, 1, 500), || Ok(())).unwrap();
        }
        // Tear the third frame's payload (one byte): frames 0 and 1 remain.
        let p = d.join(RING_FILE);
        let mut bytes = std::fs::read(&p).unwrap();
        bytes[2 * (HEADER + 500) + HEADER + 10] ^= 1;
        std::fs::write(&p, &bytes).unwrap();
        assert_eq!(seqs(&Ring::read(&d).unwrap()), vec![0, 1]);
        // A frame that does not continue the one before ends the lap too.
        let mut r = Ring::open(&d, 64 * 1024).unwrap();
        r.append(10, 1, &lines(10, 1, 500), || Ok(())).unwrap();
        r.append(20, 1, &lines(20, 1, 500), || Ok(())).unwrap();
        assert_eq!(seqs(&Ring::read(&d).unwrap()), vec![10]);
        // Another size: recreated, zero-filled.
        Ring::open(&d, 128 * 1024).unwrap();
        assert_eq!(std::fs::metadata(&p).unwrap().len(), 128 * 1024);
        assert!(Ring::read(&d).unwrap().is_empty());
        let _ = std::fs::remove_dir_all(&d);
    }
}
