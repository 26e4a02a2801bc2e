//! The audit log in the real gateway process, over a `worker fake` upstream: kill -9
//! during a burst loses no acknowledged decision record; a log that cannot make records
//! durable refuses requests (503 `audit_unavailable`) instead of serving them; receipts
//! issued to concurrent requests (batched under one signature) each verify alone; a
//! gateway whose port is taken exits with the reason.

mod common;

use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::audit_gateway::{Setup, request, request_receipt};
use common::wait_for;

fn verify(dir: &Path, key: &Path) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_sovctl"))
        .args(["audit", "verify"])
        .arg(dir)
        .arg("--key")
        .arg(key)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn kill_9_during_a_burst_loses_no_acknowledged_decision() {
    let mut s = Setup::new("audit-crash", 64 * 1024);
    let served: Arc<Mutex<Vec<String>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let (served, stop, addr, token) = (
                served.clone(),
                stop.clone(),
                s.addr.clone(),
                s.token.clone(),
            );
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    if let Some((200, id)) = request(&addr, &token) {
                        served.lock().unwrap().push(id);
                    }
                }
            })
        })
        .collect();
    wait_for("a burst of answers", Duration::from_secs(60), || {
        served.lock().unwrap().len() >= 150
    });
    let mut g = s.gateway.take().unwrap();
    g.kill().unwrap(); // SIGKILL, mid-burst
    g.wait().unwrap();
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().unwrap();
    }
    let served = served.lock().unwrap().clone();
    assert!(served.len() >= 150);

    // Restart on the same log (torn tail recovered), stop cleanly, verify.
    s.start_gateway();
    let mut g = s.gateway.take().unwrap();
    unsafe {
        libc::kill(g.id() as libc::pid_t, libc::SIGTERM);
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while g.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "gateway did not stop on SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    }
    let (code, out) = verify(&s.audit_dir(), &s.dir.join("audit-keys/audit-signing.pub"));
    assert_eq!(code, 0, "{out}");
    let records = gateway::audit::read_records(&s.audit_dir(), &Default::default()).unwrap();
    let decided: std::collections::HashSet<&str> = records
        .iter()
        .filter(|r| r.phase == gateway::audit::Phase::Decision)
        .map(|r| r.request_id.as_str())
        .collect();
    let missing: Vec<_> = served
        .iter()
        .filter(|id| !decided.contains(id.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "{} of {} answered requests have no decision record: {missing:?}",
        missing.len(),
        served.len()
    );
    eprintln!(
        "{} answered before kill -9, all with decision records; {} records in all",
        served.len(),
        records.len()
    );
}

#[test]
fn a_log_that_cannot_write_refuses_requests() {
    let s = Setup::new("audit-fail-closed", 4096);
    assert_eq!(s.request().map(|r| r.0), Some(200));
    // The storage fills up: every segment the log could rotate to is /dev/full.
    let de = s.audit_dir().join("DE");
    for seq in 0..2000u64 {
        let p = de.join(format!("seg-{seq:020}.jsonl"));
        if !p.exists() {
            std::os::unix::fs::symlink("/dev/full", &p).unwrap();
        }
    }
    let mut statuses = Vec::new();
    for _ in 0..40 {
        statuses.push(s.request().expect("an answer").0);
    }
    let first_refusal = statuses
        .iter()
        .position(|&c| c == 503)
        .unwrap_or_else(|| panic!("never refused: {statuses:?}"));
    assert!(
        statuses[first_refusal..].iter().all(|&c| c == 503),
        "once failed, the log stays failed: {statuses:?}"
    );
    // The refusal says why.
    let body = r#"{"model":"fake","messages":[{"role":"user","content":"x"}]}"#;
    let out = Command::new("curl")
        .args([
            "-s",
            "-H",
            &format!("Authorization: Bearer {}", s.token),
            "-H",
            "content-type: application/json",
        ])
        .args([
            "-d",
            body,
            &format!("http://{}/v1/chat/completions", s.addr),
        ])
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["error"]["code"], "audit_unavailable", "{v}");
}

/// A gateway whose listen address is taken exits at once with the reason, instead of
/// running on without its listener (pingora panics in the listener task on a failed
/// bind, and the process would stay up, never ready).
#[test]
fn a_taken_listen_port_is_a_clear_exit() {
    let s = Setup::new("gateway-port-taken", 64 * 1024 * 1024);
    // The same config again: both listeners are held by the running gateway.
    let mut second = Command::new(common::bin("gateway"))
        .arg("--config")
        .arg(&s.config)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(st) = second.try_wait().unwrap() {
            break st;
        }
        if Instant::now() > deadline {
            let _ = second.kill();
            panic!("the second gateway kept running on a taken port");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut second.stderr.take().unwrap(), &mut err).unwrap();
    assert!(!status.success());
    assert!(
        err.contains(&format!("cannot listen on {}", s.addr)),
        "{err}"
    );
    // The first one still serves.
    assert_eq!(s.request().map(|r| r.0), Some(200));
}

/// 16 clients at once: every served response carries a receipt that verifies on its own
/// against the audit key and names its own request, whether it was signed alone or in a
/// batch with others (how many were batched depends on timing, so it is only reported).
#[test]
fn concurrent_receipts_each_verify() {
    let s = Setup::new("audit-receipts", 64 * 1024 * 1024);
    type Answer = (u16, String, Option<String>);
    let results: Arc<Mutex<Vec<Answer>>> = Arc::default();
    let threads: Vec<_> = (0..16)
        .map(|_| {
            let (results, addr, token) = (results.clone(), s.addr.clone(), s.token.clone());
            std::thread::spawn(move || {
                for _ in 0..8 {
                    if let Some(r) = request_receipt(&addr, &token) {
                        results.lock().unwrap().push(r);
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let results = results.lock().unwrap().clone();
    assert_eq!(results.len(), 128, "every request answered");
    let pubkey = std::fs::read_to_string(s.dir.join("audit-keys/audit-signing.pub")).unwrap();
    let key = gateway::audit::VerifierKey::parse(pubkey.trim()).unwrap();
    let mut batched = 0;
    for (status, id, receipt) in &results {
        assert_eq!(*status, 200);
        let receipt = receipt
            .as_deref()
            .expect("served responses carry a receipt");
        let st = gateway::audit::verify_receipt(receipt, std::slice::from_ref(&key))
            .unwrap_or_else(|e| panic!("receipt of {id} does not verify: {e}"));
        assert_eq!(&st.request_id, id);
        assert_eq!((st.state.as_str(), st.pool.as_str()), ("DE", "de-fra-1"));
        if receipt.split('.').count() == 3 {
            batched += 1;
        }
    }
    eprintln!(
        "{} receipts verified, {batched} of them batched",
        results.len()
    );
}
