//! Tests of the audit log: known vectors (RFC 6962 trees, Go sumdb/note keys, RFC 8785),
//! proofs against an independent verifier, group commit, recovery, retention, and the
//! tamper cases the issue names.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use super::merkle::{check_consistency, check_inclusion, mth};
use super::store::{checkpoints_path, list_checkpoint_files, list_segments};
use super::*;

// RFC 6962 test leaves and roots (as in Go's transparency-dev/merkle and CT tests).
const LEAVES: [&[u8]; 8] = [
    b"",
    b"\x00",
    b"\x10",
    b"\x20\x21",
    b"\x30\x31",
    b"\x40\x41\x42\x43",
    b"\x50\x51\x52\x53\x54\x55\x56\x57",
    b"\x60\x61\x62\x63\x64\x65\x66\x67\x68\x69\x6a\x6b\x6c\x6d\x6e\x6f",
];
const ROOTS: [&str; 8] = [
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
];

#[test]
fn rfc6962_roots() {
    assert_eq!(
        hex::encode(Frontier::new().root()),
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    );
    let mut f = Frontier::new();
    for (i, leaf) in LEAVES.iter().enumerate() {
        f.push(leaf_hash(leaf));
        assert_eq!(hex::encode(f.root()), ROOTS[i], "root of {} leaves", i + 1);
    }
}

fn store_of(n: u64) -> (LeafStore, Vec<Hash>) {
    let leaves: Vec<Hash> = (0..n).map(|i| leaf_hash(&i.to_be_bytes())).collect();
    let mut s = LeafStore::new(Frontier::new());
    for l in &leaves {
        s.push(*l);
    }
    (s, leaves)
}

#[test]
fn inclusion_and_consistency_proofs_up_to_64() {
    let (s, leaves) = store_of(64);
    for n in 1..=64u64 {
        let root = mth(&leaves[..n as usize]);
        assert_eq!(s.root(n).unwrap(), root);
        for i in 0..n {
            let p = s.inclusion_proof(i, n).unwrap();
            check_inclusion(&p, n, &root, i, &leaves[i as usize]).unwrap();
            // A wrong leaf or a wrong index must not verify.
            assert!(check_inclusion(&p, n, &root, i, &leaf_hash(b"x")).is_err());
            if n > 1 {
                assert!(check_inclusion(&p, n, &root, (i + 1) % n, &leaves[i as usize]).is_err());
            }
        }
        for m in 1..=n {
            let old = mth(&leaves[..m as usize]);
            let p = s.consistency_proof(m, n).unwrap();
            check_consistency(&p, n, &root, m, &old).unwrap();
            if m < n {
                assert!(check_consistency(&p, n, &root, m, &leaf_hash(b"x")).is_err());
            }
        }
    }
}

#[test]
fn proofs_after_a_retention_cut_match_the_full_tree() {
    let (full, leaves) = store_of(64);
    for cut in [1u64, 5, 8, 13, 32, 40] {
        let mut f = Frontier::new();
        for l in &leaves[..cut as usize] {
            f.push(*l);
        }
        let mut pruned = LeafStore::new(f);
        for l in &leaves[cut as usize..] {
            pruned.push(*l);
        }
        for n in cut.max(1)..=64 {
            assert_eq!(pruned.root(n).unwrap(), full.root(n).unwrap());
            for i in cut..n {
                assert_eq!(
                    pruned.inclusion_proof(i, n).unwrap(),
                    full.inclusion_proof(i, n).unwrap()
                );
            }
            for m in cut..=n {
                assert_eq!(
                    pruned.consistency_proof(m, n).unwrap(),
                    full.consistency_proof(m, n).unwrap(),
                    "cut {cut} m {m} n {n}"
                );
            }
        }
        if cut > 1 {
            assert!(pruned.inclusion_proof(0, 64).is_err());
        }
    }
}

const GO_SKEY: &str =
    "PRIVATE+KEY+PeterNeumann+c74f20a3+AYEKFALVFGyNhPJEMzD1QIDr+Y7hfZx09iUvxdXHKDFz";
const GO_VKEY: &str = "PeterNeumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW";

#[test]
fn go_sumdb_note_vectors() {
    let k = SigningKey::from_skey(GO_SKEY).unwrap();
    assert_eq!(k.vkey(), GO_VKEY);
    assert_eq!(k.key_id(), 0xc74f20a3);
    let v = VerifierKey::parse(GO_VKEY).unwrap();
    let text = "If you think cryptography is the answer to your problem,\n\
                then you don't know what your problem is.\n";
    let sig = k.sign(text.as_bytes()).unwrap();
    let mut line = 0xc74f20a3u32.to_be_bytes().to_vec();
    line.extend(&sig);
    use base64::Engine as _;
    assert_eq!(
        base64::engine::general_purpose::STANDARD.encode(line),
        "x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1FFYC2pZSNXgKvqfqdngotpRZb6KE6RyyBwJnAM="
    );
    assert!(v.verify_raw(text.as_bytes(), &sig));

    // Checkpoint round trip, and rejection under another key or an edit.
    let root = leaf_hash(b"r");
    let note = k
        .sign_checkpoint("sovereign-gateway/r1/DE", 7, &root)
        .unwrap();
    assert!(note.starts_with("sovereign-gateway/r1/DE\n7\n"));
    assert!(note.contains("\n\n— PeterNeumann "));
    let cp = open_checkpoint(&note, std::slice::from_ref(&v)).unwrap();
    assert_eq!((cp.size, cp.root), (7, root));
    let (_, other) = generate_signing_key("PeterNeumann").unwrap();
    let other = VerifierKey::parse(&other).unwrap();
    assert!(open_checkpoint(&note, &[other]).is_err());
    assert!(open_checkpoint(&note.replace("\n7\n", "\n8\n"), &[v]).is_err());
}

#[test]
fn jcs_vectors() {
    // RFC 8785 §3.2.3: keys sorted by UTF-16 code units.
    let v: serde_json::Value = serde_json::from_str(
        r#"{"\u20ac":"Euro Sign","\r":"Carriage Return","\ufb33":"Hebrew Letter Dalet With Dagesh","1":"One","\ud83d\ude00":"Emoji: Grinning Face","\u0080":"Control","\u00f6":"Latin Small Letter O With Diaeresis"}"#,
    )
    .unwrap();
    let out = String::from_utf8(canonical_json(&v).unwrap()).unwrap();
    let order: Vec<&str> = [
        "Carriage Return",
        "One",
        "Control",
        "Latin Small",
        "Euro Sign",
        "Emoji",
        "Hebrew",
    ]
    .to_vec();
    let pos: Vec<usize> = order.iter().map(|s| out.find(s).unwrap()).collect();
    assert!(pos.windows(2).all(|w| w[0] < w[1]), "{out}");
    // RFC 8785 §3.2.2.2 string escaping.
    let s = serde_json::json!({"s": "\u{20ac}$\u{000F}\nA'B\"\\\\\"/"});
    assert_eq!(
        String::from_utf8(canonical_json(&s).unwrap()).unwrap(),
        "{\"s\":\"\u{20ac}$\\u000f\\nA'B\\\"\\\\\\\\\\\"/\"}"
    );
    assert_eq!(
        prompt_digest_input_chat(&[("user", "hi")]),
        br#"[{"content":"hi","role":"user"}]"#
    );
    assert_eq!(prompt_digest_input_text("a\"b"), br#""a\"b""#);
}

// ---------------------------------------------------------------- log tests

static N: AtomicU64 = AtomicU64::new(0);

struct Env {
    root: PathBuf,
    cfg: AuditConfig,
    vkey: VerifierKey,
    hmac: Vec<u8>,
}

impl Drop for Env {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

fn env(segment_max_bytes: u64, every_records: u64) -> Env {
    let root = std::env::temp_dir().join(format!(
        "sov-audit-test-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    ));
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(&root).unwrap();
    let (skey, vkey) = generate_signing_key("test-gw").unwrap();
    std::fs::write(root.join("sign.key"), skey).unwrap();
    std::fs::write(root.join("hmac-DE.key"), "42".repeat(32)).unwrap();
    std::fs::write(root.join("hmac-FR.key"), "43".repeat(32)).unwrap();
    let mut cfg = AuditConfig::new(
        root.join("audit"),
        root.join("sign.key"),
        BTreeMap::from([
            ("DE".to_string(), root.join("hmac-DE.key")),
            ("FR".to_string(), root.join("hmac-FR.key")),
        ]),
    );
    cfg.segment_max_bytes = segment_max_bytes;
    cfg.checkpoint_every_records = every_records;
    // The smallest ring: tests wrap it often (and zero-fill little).
    cfg.ring_bytes = 64 * 1024;
    Env {
        root,
        cfg,
        vkey: VerifierKey::parse(&vkey).unwrap(),
        hmac: vec![0x42; 32],
    }
}

fn rec(state: &str, i: usize) -> RecordInput {
    let mut r = crate::cli_audit::sample_record(state, i);
    r.prompt_hmac = Some(hmac_hex(
        &[0x42; 32],
        &prompt_digest_input_chat(&[("user", format!("prompt {i}"))]),
    ));
    r
}

fn check(dir: &Path, key: &VerifierKey) -> VerifyReport {
    verify_dir(dir, std::slice::from_ref(key), |_| {})
}

fn first_error(r: &VerifyReport) -> VerifyFailure {
    r.logs
        .iter()
        .find_map(|l| l.error.clone())
        .unwrap_or_else(|| panic!("verify passed: {r:#?}"))
}

async fn fill(e: &Env, n: usize) -> Arc<AuditLog> {
    let log = AuditLog::open(e.cfg.clone()).unwrap();
    for i in 0..n {
        log.append(rec("DE", i)).await.unwrap();
    }
    log
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn group_commit_under_concurrency() {
    let e = env(64 * 1024, 256);
    let log = AuditLog::open(e.cfg.clone()).unwrap();
    let mut tasks = Vec::new();
    for t in 0..64 {
        let log = log.clone();
        tasks.push(tokio::spawn(async move {
            let mut seqs = Vec::new();
            for i in 0..100 {
                seqs.push(log.append(rec("DE", t * 100 + i)).await.unwrap().seq);
            }
            seqs
        }));
    }
    let mut seqs = Vec::new();
    for t in tasks {
        seqs.extend(t.await.unwrap());
    }
    seqs.sort_unstable();
    assert_eq!(seqs, (0..6400).collect::<Vec<u64>>());
    let (records, fsyncs) = log.stats("DE").unwrap();
    assert_eq!(records, 6400);
    assert!(fsyncs < 6400, "no group commit: {fsyncs} fsyncs");
    log.shutdown().await;
    assert!(
        log.append(rec("DE", 0)).await.is_err(),
        "append after shutdown"
    );
    let r = check(&e.cfg.dir, &e.vkey);
    assert!(r.ok(), "{r:#?}");
    assert!(
        list_segments(&e.cfg.dir.join("DE")).unwrap().len() > 1,
        "rotation"
    );
    let all = read_records(&e.cfg.dir, &Filter::default()).unwrap();
    assert_eq!(all.len(), 6400);
}

#[tokio::test]
async fn fails_closed_after_an_fsync_error() {
    let e = env(1 << 20, 256);
    let log = fill(&e, 3).await;
    log.inject_fsync_failure("DE");
    assert!(matches!(
        log.append(rec("DE", 3)).await,
        Err(AuditError::Unavailable(_))
    ));
    // Stays failed: no silent continuation.
    assert!(matches!(
        log.append(rec("DE", 4)).await,
        Err(AuditError::Unavailable(_))
    ));
    assert!(log.failure("DE").is_some());
    // Other states are unaffected.
    log.append(rec("FR", 0)).await.unwrap();
    assert!(matches!(
        log.append(rec("XX", 0)).await,
        Err(AuditError::UnknownState(_))
    ));
}

#[tokio::test]
async fn torn_tail_is_cut_on_open_and_replicas_do_not_share() {
    let e = env(1 << 20, 256);
    let log = fill(&e, 10).await;
    log.shutdown().await;
    drop(log);
    let seg = list_segments(&e.cfg.dir.join("DE")).unwrap()[0].1.clone();
    let mut bytes = std::fs::read(&seg).unwrap();
    bytes.extend_from_slice(b"{\"origin\":\"sovereign-gateway/r1/DE\",\"seq\":10,\"ti");
    std::fs::write(&seg, &bytes).unwrap();
    let r = check(&e.cfg.dir, &e.vkey);
    assert!(r.ok(), "torn tail is not tampering: {r:#?}");
    assert!(r.logs[0].warnings.iter().any(|w| w.contains("torn tail")));

    let mut other = e.cfg.clone();
    other.replica = "r2".into();
    assert!(AuditLog::open(other).is_err(), "another replica's origin");

    let log = AuditLog::open(e.cfg.clone()).unwrap();
    assert_eq!(log.append(rec("DE", 10)).await.unwrap().seq, 10);
    log.shutdown().await;
    let r = check(&e.cfg.dir, &e.vkey);
    assert!(
        r.ok() && r.logs.iter().all(|l| l.warnings.is_empty()),
        "{r:#?}"
    );
}

/// Copies a state's log directory as it is now: what a crash would leave if the page
/// cache reached the disk.
fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for f in std::fs::read_dir(from).unwrap() {
        let f = f.unwrap();
        std::fs::copy(f.path(), to.join(f.file_name())).unwrap();
    }
}

#[tokio::test]
async fn the_ring_restores_acknowledged_records_that_a_crash_cut_from_the_segment() {
    let mut e = env(1 << 20, 1000);
    e.cfg.checkpoint_every_ms = 600_000;
    let log = fill(&e, 10).await;
    // The crash image: the segment holds 10 acknowledged records in the page cache...
    let crashed = e.root.join("crashed");
    copy_dir(&e.cfg.dir.join("DE"), &crashed.join("DE"));
    log.shutdown().await;
    let seg = list_segments(&crashed.join("DE")).unwrap()[0].1.clone();
    let all = lines_of(&seg);
    assert_eq!(all.len(), 10);
    // ...but only 6 and a half reached the disk.
    let mut cut = all[..6].join("\n").into_bytes();
    cut.push(b'\n');
    cut.extend_from_slice(&all[6].as_bytes()[..40]);
    std::fs::write(&seg, &cut).unwrap();
    // Checkpoints only cover what is in a durable segment: an auditor can verify the
    // crashed files as they are.
    let r = check(&crashed, &e.vkey);
    assert!(r.ok(), "{r:#?}");
    assert_eq!(r.logs[0].size, 6);
    // On open, the ring gives back records 6..9, byte for byte, and the log goes on.
    let mut cfg = e.cfg.clone();
    cfg.dir = crashed.clone();
    let log = AuditLog::open(cfg).unwrap();
    assert_eq!(log.append(rec("DE", 10)).await.unwrap().seq, 10);
    log.shutdown().await;
    assert_eq!(lines_of(&seg)[..10], all[..]);
    let r = check(&crashed, &e.vkey);
    assert!(r.ok() && r.logs[0].size == 11, "{r:#?}");
}

#[tokio::test]
async fn without_a_ring_the_segment_itself_is_fsynced() {
    let mut e = env(4096, 8);
    e.cfg.ring_bytes = 0;
    let log = fill(&e, 30).await;
    let (records, fsyncs) = log.stats("DE").unwrap();
    assert_eq!((records, fsyncs), (30, 30));
    log.shutdown().await;
    assert!(!e.cfg.dir.join("DE").join("durable.ring").exists());
    let r = check(&e.cfg.dir, &e.vkey);
    assert!(r.ok() && r.logs[0].size == 30, "{r:#?}");
}

/// A shut-down log of 40 DE records over several segments, for tampering.
async fn tamper_base() -> (Env, PathBuf) {
    let e = env(4096, 8);
    let log = fill(&e, 40).await;
    log.shutdown().await;
    drop(log);
    let dir = e.cfg.dir.join("DE");
    assert!(list_segments(&dir).unwrap().len() >= 3);
    assert!(check(&e.cfg.dir, &e.vkey).ok());
    (e, dir)
}

fn lines_of(p: &Path) -> Vec<String> {
    std::fs::read_to_string(p)
        .unwrap()
        .lines()
        .map(String::from)
        .collect()
}

fn write_lines(p: &Path, l: &[String]) {
    std::fs::write(p, l.iter().map(|s| format!("{s}\n")).collect::<String>()).unwrap();
}

#[tokio::test]
async fn tamper_flip_a_byte() {
    let (e, dir) = tamper_base().await;
    let seg = list_segments(&dir).unwrap()[1].1.clone();
    let mut l = lines_of(&seg);
    // Change one character inside a string value: still valid, canonical JSON.
    l[1] = l[1].replacen("\"bmi\"", "\"bmj\"", 1);
    write_lines(&seg, &l);
    let f = first_error(&check(&e.cfg.dir, &e.vkey));
    assert!(
        f.what.contains("do not match the signed checkpoint"),
        "{f:?}"
    );
    // Fails the gateway's own open, too.
    assert!(AuditLog::open(e.cfg.clone()).is_err());
}

#[tokio::test]
async fn tamper_delete_swap_insert() {
    let (e, dir) = tamper_base().await;
    let seg = list_segments(&dir).unwrap()[1].1.clone();
    let orig = lines_of(&seg);
    let first: u64 = list_segments(&dir).unwrap()[1].0;

    let mut l = orig.clone();
    l.remove(2);
    write_lines(&seg, &l);
    let f = first_error(&check(&e.cfg.dir, &e.vkey));
    assert_eq!(f.seq, Some(first + 2), "{f:?}");

    let mut l = orig.clone();
    l.swap(0, 1);
    write_lines(&seg, &l);
    let f = first_error(&check(&e.cfg.dir, &e.vkey));
    assert_eq!(f.seq, Some(first), "{f:?}");

    let mut l = orig.clone();
    l.insert(1, l[1].clone());
    write_lines(&seg, &l);
    let f = first_error(&check(&e.cfg.dir, &e.vkey));
    assert_eq!(f.seq, Some(first + 2), "{f:?}");
}

#[tokio::test]
async fn tamper_truncate_segments() {
    let (e, dir) = tamper_base().await;
    let segs = list_segments(&dir).unwrap();
    // A middle segment loses its last record: the next segment no longer follows.
    let mut l = lines_of(&segs[1].1);
    l.pop();
    write_lines(&segs[1].1, &l);
    let f = first_error(&check(&e.cfg.dir, &e.vkey));
    assert_eq!(f.seq, Some(segs[2].0 - 1), "{f:?}");
    // The last segment loses checkpointed records: the checkpoints still count them.
    let (e, dir) = tamper_base().await;
    let segs = list_segments(&dir).unwrap();
    let last = &segs.last().unwrap().1;
    let mut l = lines_of(last);
    l.truncate(l.len() - 2);
    write_lines(last, &l);
    let f = first_error(&check(&e.cfg.dir, &e.vkey));
    assert_eq!(f.seq, Some(38), "{f:?}");
    assert!(f.what.contains("truncated"), "{f:?}");
    // Deleting the whole first segment is detected as well.
    let (e, dir) = tamper_base().await;
    std::fs::remove_file(&list_segments(&dir).unwrap()[0].1).unwrap();
    assert_eq!(first_error(&check(&e.cfg.dir, &e.vkey)).seq, Some(0));
}

#[tokio::test]
async fn tamper_forged_and_replayed_checkpoints() {
    let (e, dir) = tamper_base().await;
    let files = list_checkpoint_files(&dir).unwrap();
    let last = files.last().unwrap().1.clone();
    let orig = lines_of(&last);

    // Forge: the same checkpoint body signed with another key of the same name.
    let (skey, _) = generate_signing_key("test-gw").unwrap();
    let forger = SigningKey::from_skey(&skey).unwrap();
    let mut l = orig.clone();
    let cl: CheckpointLine = serde_json::from_str(l.last().unwrap()).unwrap();
    let cp = open_checkpoint(&cl.note, &[]).unwrap();
    let forged = CheckpointLine {
        size: cp.size,
        note: forger
            .sign_checkpoint(&cp.origin, cp.size, &cp.root)
            .unwrap(),
    };
    *l.last_mut().unwrap() = String::from_utf8(forged.to_line().unwrap())
        .unwrap()
        .trim_end()
        .to_string();
    write_lines(&last, &l);
    let f = first_error(&check(&e.cfg.dir, &e.vkey));
    assert!(f.what.contains("not signed by a trusted key"), "{f:?}");

    // Replay: the latest checkpoint replaced by an older (validly signed) one.
    let older = lines_of(&files[0].1)[0].clone();
    let mut l = orig.clone();
    *l.last_mut().unwrap() = older;
    write_lines(&last, &l);
    let f = first_error(&check(&e.cfg.dir, &e.vkey));
    assert!(f.what.contains("must grow"), "{f:?}");

    // A forged record with a consistent re-signed... is impossible without the key; but a
    // checkpoint signed by the right key with a wrong root is caught by recomputation.
    write_lines(&last, &orig);
    assert!(check(&e.cfg.dir, &e.vkey).ok());
}

#[tokio::test]
async fn retention_deletes_records_itself_and_still_verifies() {
    let e = env(2048, 8);
    let log = fill(&e, 40).await;
    let dir = e.cfg.dir.join("DE");
    let before = list_segments(&dir).unwrap();
    assert!(before.len() >= 3);
    // Nothing is old yet.
    assert_eq!(
        log.apply_retention("DE", chrono::Utc::now()).await.unwrap(),
        None
    );
    let later = chrono::Utc::now() + chrono::Duration::days(184);
    let (from, to) = log.apply_retention("DE", later).await.unwrap().unwrap();
    assert_eq!(from, 0);
    let after = list_segments(&dir).unwrap();
    // Only the active segment (and one the retention record itself may have opened) stay.
    assert!(after.len() <= 2, "{after:?}");
    assert_eq!(after[0].0, to);
    assert_eq!(before.iter().filter(|s| s.0 >= to).count(), 1);
    assert!(!checkpoints_path(&dir, 0).exists());
    for i in 40..45 {
        log.append(rec("DE", i)).await.unwrap();
    }
    log.shutdown().await;
    drop(log);
    let r = check(&e.cfg.dir, &e.vkey);
    assert!(r.ok(), "{r:#?}");
    assert_eq!(r.logs[0].start, to);
    let ret = read_records(
        &e.cfg.dir,
        &Filter {
            phase: Some(Phase::Retention),
            ..Filter::default()
        },
    )
    .unwrap();
    assert_eq!(ret.len(), 1);
    assert_eq!(ret[0].retention.as_ref().unwrap().deleted_to, to);
    // Proofs still work for kept records, and from the cut on.
    let p = inclusion_proof(&e.cfg.dir, "req-00000042").unwrap();
    verify_proof(&p, std::slice::from_ref(&e.vkey)).unwrap();
    let c = consistency_proof(&dir, to, None).unwrap();
    verify_consistency(&c, std::slice::from_ref(&e.vkey)).unwrap();
    // Reopen continues the pruned log.
    let log = AuditLog::open(e.cfg.clone()).unwrap();
    log.append(rec("DE", 45)).await.unwrap();
    log.shutdown().await;
    assert!(check(&e.cfg.dir, &e.vkey).ok());
    // Deleting the retention record's evidence (the anchor) is detected.
    std::fs::remove_file(dir.join(store::ANCHOR_FILE)).unwrap();
    assert!(!check(&e.cfg.dir, &e.vkey).ok());
}

/// A receipt subject in DE's pool `de-fra-1`.
fn subject(request_id: &str) -> ReceiptSubject<'_> {
    ReceiptSubject {
        request_id,
        state: "DE",
        pool: "de-fra-1",
        country: "DE",
        policy_hash: "cafe",
    }
}

#[tokio::test]
async fn proofs_receipts_and_prompt_matching() {
    let e = env(1 << 20, 4);
    let log = AuditLog::open(e.cfg.clone()).unwrap();
    let mut last = None;
    for i in 0..10 {
        last = Some(log.append(rec("DE", i)).await.unwrap());
    }
    let a = last.unwrap();
    let receipt = log.receipt(&a, &subject("req-00000009"));
    assert!(http::HeaderValue::from_str(&receipt).is_ok());
    let st = verify_receipt(&receipt, std::slice::from_ref(&e.vkey)).unwrap();
    assert_eq!(
        (st.seq, st.checkpoint_size, st.pool.as_str()),
        (9, 10, "de-fra-1")
    );
    let (_, other) = generate_signing_key("test-gw").unwrap();
    assert!(verify_receipt(&receipt, &[VerifierKey::parse(&other).unwrap()]).is_err());
    let (p, s) = receipt.split_once('.').unwrap();
    assert!(verify_receipt(&format!("{p}x.{s}"), std::slice::from_ref(&e.vkey)).is_err());
    log.shutdown().await;

    let proof = inclusion_proof(&e.cfg.dir, "req-00000003").unwrap();
    assert_eq!(proof.seq, 3);
    verify_proof(&proof, std::slice::from_ref(&e.vkey)).unwrap();
    let mut bad = proof.clone();
    bad.record.pool = Some("us-east-1".into());
    assert!(verify_proof(&bad, std::slice::from_ref(&e.vkey)).is_err());
    let mut bad = proof.clone();
    bad.path[0] = hex::encode([0u8; 32]);
    assert!(verify_proof(&bad, std::slice::from_ref(&e.vkey)).is_err());
    // The receipt's signed tree head is a prefix of the final checkpoint.
    let c = consistency_proof(&e.cfg.dir.join("DE"), st.checkpoint_size, None).unwrap();
    assert_eq!(c.old_root, hex::encode(a.covered_by_root));
    verify_consistency(&c, std::slice::from_ref(&e.vkey)).unwrap();

    let hits = check_prompt(&e.cfg.dir, &e.hmac, b"prompt 7\n").unwrap();
    assert_eq!(hits.iter().map(|r| r.seq).collect::<Vec<_>>(), vec![7]);
    let json = br#"[{"role":"user","content":"prompt 2"}]"#;
    assert_eq!(check_prompt(&e.cfg.dir, &e.hmac, json).unwrap().len(), 1);
    assert!(
        check_prompt(&e.cfg.dir, &e.hmac, b"prompt 77")
            .unwrap()
            .is_empty()
    );
    assert!(
        check_prompt(&e.cfg.dir, &[0x43; 32], b"prompt 7")
            .unwrap()
            .is_empty()
    );

    let q = read_records(
        &e.cfg.dir,
        &Filter {
            request_id: Some("req-00000005".into()),
            country: Some("DE".into()),
            decision: Some(Decision::Allow),
            since: Some(chrono::Utc::now() - chrono::Duration::hours(1)),
            ..Filter::default()
        },
    )
    .unwrap();
    assert_eq!(q.len(), 1);
    assert!(
        read_records(
            &e.cfg.dir,
            &Filter {
                decision: Some(Decision::Deny),
                ..Filter::default()
            }
        )
        .unwrap()
        .is_empty()
    );
}

/// Receipts signed together: every one verifies on its own, a batch of one is the single
/// form, and neither a statement nor its batch part can be swapped or edited.
#[test]
fn batched_receipts_verify_alone_and_resist_tampering() {
    let e = env(1 << 20, 4);
    let key = SigningKey::load(&e.cfg.signing_key).unwrap();
    let keys = std::slice::from_ref(&e.vkey);
    for n in [1usize, 2, 3, 5, 8, 13, 64] {
        let statements: Vec<Vec<u8>> = (0..n)
            .map(|i| {
                let a = Appended {
                    origin: "sovereign-gateway/r1/DE".into(),
                    seq: i as u64,
                    leaf_hash: [i as u8; 32],
                    covered_by_size: i as u64 + 1,
                    covered_by_root: [7; 32],
                };
                receipt::statement(&key, &a, &subject(&format!("req-{i}")))
            })
            .collect();
        let refs: Vec<&[u8]> = statements.iter().map(Vec::as_slice).collect();
        let receipts = receipt::sign_batch(&key, &refs);
        assert_eq!(receipts.len(), n);
        for (i, r) in receipts.iter().enumerate() {
            assert_eq!(r.split('.').count(), if n == 1 { 2 } else { 3 });
            assert!(http::HeaderValue::from_str(r).is_ok());
            let st = verify_receipt(r, keys).unwrap();
            assert_eq!(
                (st.seq, st.request_id.as_str()),
                (i as u64, format!("req-{i}").as_str())
            );
        }
        if n == 1 {
            continue;
        }
        // Same signature for the whole batch, one leaf per statement.
        let sigs: std::collections::BTreeSet<&str> = receipts
            .iter()
            .map(|r| r.rsplit('.').next().unwrap())
            .collect();
        assert_eq!(sigs.len(), 1);
        let parts: Vec<Vec<&str>> = receipts.iter().map(|r| r.split('.').collect()).collect();
        // Statement of receipt 0 with the batch part of receipt 1: wrong leaf.
        let swapped = format!("{}.{}.{}", parts[0][0], parts[1][1], parts[0][2]);
        assert!(
            verify_receipt(&swapped, keys)
                .unwrap_err()
                .contains("batch")
        );
        // A flipped bit in the root, the index or the path.
        let b = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        use base64::Engine as _;
        let raw = b.decode(parts[0][1]).unwrap();
        for at in [3, 20, raw.len() - 1] {
            let mut t = raw.clone();
            t[at] ^= 1;
            let forged = format!("{}.{}.{}", parts[0][0], b.encode(&t), parts[0][2]);
            assert!(verify_receipt(&forged, keys).is_err(), "flip at {at}");
        }
        // The batch signature is not a single receipt's signature.
        assert!(verify_receipt(&format!("{}.{}", parts[0][0], parts[0][2]), keys).is_err());
        // The root in the batch part is the RFC 6962 tree hash of the statements.
        let leaves: Vec<Hash> = statements.iter().map(|s| merkle::leaf_hash(s)).collect();
        assert_eq!(raw[8..40], merkle::mth(&leaves));
    }
}

/// Concurrent requests woken together share one signature; alone, a request gets the
/// single form.
#[tokio::test]
async fn receipts_requested_together_share_a_signature() {
    let mut e = env(1 << 20, 4);
    // No polling for acknowledgements: the appends below are submitted together.
    e.cfg.append_spin_us = 0;
    let log = AuditLog::open(e.cfg.clone()).unwrap();
    // Alone in its group commit: the single-signature form.
    let (a, rx) = log
        .append_with_receipt(rec("DE", 0), &subject("req-0"))
        .await
        .unwrap();
    let alone = rx.await.unwrap();
    assert_eq!(alone.split('.').count(), 2);
    let st = verify_receipt(&alone, std::slice::from_ref(&e.vkey)).unwrap();
    assert_eq!((st.seq, st.request_id.as_str()), (a.seq, "req-0"));
    // Appended together: receipts of one group commit share a signature (batch form),
    // each naming its own record and verifying alone.
    let ids: Vec<String> = (1..=20).map(|i| format!("req-{i}")).collect();
    let subjects: Vec<ReceiptSubject<'_>> = ids.iter().map(|id| subject(id)).collect();
    let together = futures::future::join_all(
        subjects
            .iter()
            .enumerate()
            .map(|(i, s)| log.append_with_receipt(rec("DE", i + 1), s)),
    )
    .await;
    let mut batched = 0;
    for (r, id) in together.into_iter().zip(&ids) {
        let (a, rx) = r.unwrap();
        let receipt = rx.await.unwrap();
        batched += usize::from(receipt.split('.').count() == 3);
        let st = verify_receipt(&receipt, std::slice::from_ref(&e.vkey)).unwrap();
        assert_eq!((&st.request_id, st.seq), (id, a.seq));
        assert_eq!(st.checkpoint_size, a.covered_by_size);
    }
    assert!(batched >= 2, "no receipts shared a signature");
    log.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lazy_appends_share_fsyncs_keep_order_and_precede_checkpoints() {
    let e = env(1 << 20, 1_000_000);
    let log = AuditLog::open(e.cfg.clone()).unwrap();
    // Alternate lazy (completion-like) and synchronous (decision-like) appends: each
    // synchronous append's fsync also covers the lazy one queued before it.
    for i in 0..50 {
        log.append_lazy(rec("DE", 2 * i)).unwrap();
        let a = log.append(rec("DE", 2 * i + 1)).await.unwrap();
        assert_eq!(
            a.seq,
            (2 * i + 1) as u64,
            "lazy records keep their place in the order"
        );
    }
    let (records, fsyncs) = log.stats("DE").unwrap();
    assert_eq!(records, 100);
    assert!(
        fsyncs <= 50,
        "lazy appends rode along: {fsyncs} fsyncs for 100 records"
    );
    // A lone lazy append is flushed on its own within the deadline...
    log.append_lazy(rec("DE", 100)).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    while log.stats("DE").unwrap().0 < 101 {
        assert!(
            std::time::Instant::now() < deadline,
            "lazy append never flushed"
        );
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    // ...and one queued right before a checkpoint is on disk before the checkpoint.
    log.append_lazy(rec("DE", 101)).unwrap();
    let size = log.checkpoint_now("DE").await.unwrap();
    assert_eq!(size, 102);
    log.shutdown().await;
    let r = check(&e.cfg.dir, &e.vkey);
    assert!(r.ok(), "{r:#?}");
    assert_eq!(
        read_records(&e.cfg.dir, &Filter::default()).unwrap().len(),
        102
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lazy_appends_while_requests_are_in_flight_are_flushed_and_never_lost() {
    let e = env(1 << 20, 1_000_000);
    let log = AuditLog::open(e.cfg.clone()).unwrap();
    // With requests in flight a lazy append does not wake the writer: it must still be
    // taken at the writer's next deadline and flushed on its own.
    log.in_flight()
        .store(3, std::sync::atomic::Ordering::SeqCst);
    log.append(rec("DE", 0)).await.unwrap();
    log.append_lazy(rec("DE", 1)).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    while log.stats("DE").unwrap().0 < 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "lazy append never flushed while requests were in flight"
        );
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    // Lazy appends queued right before shutdown are written by it; later ones are
    // refused, not dropped.
    for i in 2..20 {
        log.append_lazy(rec("DE", i)).unwrap();
    }
    log.shutdown().await;
    assert!(log.append_lazy(rec("DE", 20)).is_err());
    let r = check(&e.cfg.dir, &e.vkey);
    assert!(r.ok(), "{r:#?}");
    assert_eq!(
        read_records(&e.cfg.dir, &Filter::default()).unwrap().len(),
        20
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_load_the_commit_delay_lets_one_fsync_cover_staggered_appends() {
    let mut e = env(1 << 20, 1_000_000);
    e.cfg.commit_delay_us = 8_000;
    e.cfg.commit_siblings = 4;
    let log = AuditLog::open(e.cfg.clone()).unwrap();
    log.in_flight().store(4, Ordering::SeqCst);
    let (_, fsyncs_before) = log.stats("DE").unwrap();
    // Ten decision records, 1 ms apart: without the delay each gets its own fsync.
    let mut tasks = Vec::new();
    for i in 0..10 {
        let log = log.clone();
        tasks.push(tokio::spawn(async move { log.append(rec("DE", i)).await }));
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
    }
    let mut seqs = Vec::new();
    for t in tasks {
        seqs.push(t.await.unwrap().unwrap().seq);
    }
    seqs.sort_unstable();
    assert_eq!(seqs, (0..10).collect::<Vec<u64>>());
    let (records, fsyncs) = log.stats("DE").unwrap();
    assert_eq!(records, 10);
    assert!(
        fsyncs - fsyncs_before <= 5,
        "{} fsyncs for 10 staggered appends under load",
        fsyncs - fsyncs_before
    );
    // With the gateway nearly idle a record is never held back.
    log.in_flight().store(1, Ordering::SeqCst);
    let t = std::time::Instant::now();
    log.append(rec("DE", 10)).await.unwrap();
    assert!(t.elapsed() < std::time::Duration::from_millis(8));
    log.shutdown().await;
}

mod canonical_form {
    use proptest::prelude::*;

    use super::super::receipt::ReceiptStatement;
    use super::super::record::{prompt_digest_input_chat, prompt_digest_input_text, sorted_json};
    use super::*;
    use crate::domain::Classification;

    /// Any text, with control characters, quotes, backslashes and non-ASCII favoured.
    fn text() -> impl Strategy<Value = String> {
        prop_oneof![
            "\\PC{0,12}",
            "[\\x00-\\x1f\"\\\\/\\x7f\u{80}\u{2028}\u{2029}\u{fffd}\u{1F600}a-z]{0,12}",
        ]
    }

    /// Integers JSON numbers hold exactly (I-JSON, RFC 7493): JCS writes larger ones as
    /// rounded doubles, which no count or sequence number of ours comes near.
    fn int() -> impl Strategy<Value = u64> {
        0..=(1u64 << 53)
    }

    fn opt<T: std::fmt::Debug + Clone>(
        s: impl Strategy<Value = T>,
    ) -> impl Strategy<Value = Option<T>> {
        proptest::option::of(s)
    }

    fn candidate() -> impl Strategy<Value = Candidate> {
        (
            any::<bool>(),
            text(),
            proptest::collection::vec(text(), 0..3),
            text(),
            proptest::collection::vec(text(), 0..3),
        )
            .prop_map(|(allowed, country, policy_ids, pool, reasons)| Candidate {
                allowed,
                country,
                policy_ids,
                pool,
                reasons,
            })
    }

    fn record() -> impl Strategy<Value = Record> {
        let a = (
            opt(text()),
            proptest::collection::vec(candidate(), 0..3),
            opt(prop_oneof![
                Just(Classification::Public),
                Just(Classification::Internal),
                Just(Classification::Restricted)
            ]),
            opt(int()),
            opt(prop_oneof![Just(Decision::Allow), Just(Decision::Deny)]),
            opt(int()),
            opt(text()),
            opt(text()),
            opt(text()),
            text(),
        );
        let b = (
            opt((text(), any::<u16>()).prop_map(|(code, status)| Outcome { code, status })),
            prop_oneof![
                Just(Phase::Decision),
                Just(Phase::Completion),
                Just(Phase::Retention)
            ],
            opt(text()),
            opt(text()),
            opt(text()),
            opt(text()),
            opt(int()),
            proptest::collection::vec(text(), 0..3),
            text(),
            opt(text()),
        );
        let c = (
            opt((
                int(),
                int(),
                proptest::collection::vec(text(), 0..3),
                text(),
            )
                .prop_map(|(deleted_from, deleted_to, segments, root)| Retention {
                    deleted_from,
                    deleted_to,
                    frontier: segments.clone(),
                    root,
                    segments,
                })),
            int(),
            text(),
            text(),
        );
        (a, b, c).prop_map(|(a, b, c)| Record {
            caller_hmac: a.0,
            candidates: a.1,
            classification: a.2,
            completion_tokens: a.3,
            decision: a.4,
            latency_ms: a.5,
            ministry: a.6,
            model_requested: a.7,
            model_served: a.8,
            origin: a.9,
            outcome: b.0,
            phase: b.1,
            policy_hash: b.2,
            pool: b.3,
            pool_country: b.4,
            prompt_hmac: b.5,
            prompt_tokens: b.6,
            reason_codes: b.7,
            request_id: b.8,
            response_hmac: b.9,
            retention: c.0,
            seq: c.1,
            state: c.2,
            time: c.3,
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(400))]

        /// The records' fast path (plain serde_json over key-ordered structs) is exactly
        /// RFC 8785: the same bytes as a JCS implementation, so leaf hashes match.
        #[test]
        fn canonical_form_matches_jcs(rec in record()) {
            prop_assert_eq!(rec.canonical().unwrap(), canonical_json(&rec).unwrap());
        }

        #[test]
        fn receipt_and_prompt_forms_match_jcs(
            s in proptest::collection::vec(text(), 9),
            n in proptest::collection::vec(int(), 2),
            v in any::<u32>(),
        ) {
            let st = ReceiptStatement {
                checkpoint_root: s[0].clone(),
                checkpoint_size: n[0],
                country: s[1].clone(),
                key: s[2].clone(),
                leaf_hash: s[3].clone(),
                origin: s[4].clone(),
                policy_hash: s[5].clone(),
                pool: s[6].clone(),
                request_id: s[7].clone(),
                seq: n[1],
                state: s[8].clone(),
                v,
            };
            let mut fast = Vec::new();
            sorted_json(&mut fast, &st).unwrap();
            prop_assert_eq!(fast, canonical_json(&st).unwrap());

            let msgs = [(s[0].as_str(), s[1].as_str()), (s[2].as_str(), s[3].as_str())];
            let as_values: Vec<serde_json::Value> = msgs
                .iter()
                .map(|(r, c)| serde_json::json!({"role": r, "content": c}))
                .collect();
            prop_assert_eq!(prompt_digest_input_chat(&msgs), canonical_json(&as_values).unwrap());
            prop_assert_eq!(prompt_digest_input_text(&s[4]), canonical_json(&s[4]).unwrap());
        }
    }
}
