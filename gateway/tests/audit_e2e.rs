//! The audit log in the real gateway process, over a `worker fake` upstream: kill -9
//! during a burst loses no acknowledged decision record; a log that cannot make records
//! durable refuses requests (503 `audit_unavailable`) instead of serving them.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{bin, scratch_dir, wait_for};

struct Setup {
    dir: PathBuf,
    config: PathBuf,
    addr: String,
    token: String,
    fake: Child,
    gateway: Option<Child>,
}

fn port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn sovctl(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_sovctl"))
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "sovctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

impl Setup {
    fn new(name: &str, segment_max_bytes: u64) -> Setup {
        let dir = scratch_dir(name);
        let keys = dir.join("keys");
        let snippet = sovctl(&[
            "keys",
            "generate",
            "--dir",
            keys.to_str().unwrap(),
            "--state",
            "DE",
        ]);
        let token = sovctl(&[
            "token",
            "mint",
            "--keys",
            keys.to_str().unwrap(),
            "--state",
            "DE",
            "--ministry",
            "crash-test",
            "--clearance",
            "internal",
            "--ttl",
            "1h",
        ])
        .trim()
        .to_string();
        let akeys = dir.join("audit-keys");
        sovctl(&[
            "audit",
            "keygen",
            "--out",
            akeys.to_str().unwrap(),
            "--hmac-states",
            "DE",
        ]);
        let (grpc, http) = (port(), port());
        let fake = Command::new(bin("worker"))
            .args([
                "fake",
                "--grpc-addr",
                &format!("127.0.0.1:{grpc}"),
                "--http-addr",
                &format!("127.0.0.1:{http}"),
            ])
            .args([
                "--model",
                "fake",
                "--pool",
                "de-fra-1",
                "--country",
                "DE",
                "--tokens",
                "8",
            ])
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::fs::write(
            dir.join("pools.toml"),
            format!("[[pool]]\nid = \"de-fra-1\"\ncountry = \"DE\"\ncertifications = [\"bsi-c5\"]\nmodels = [\"fake\"]\nworkers = [\"127.0.0.1:{grpc}\"]\n"),
        )
        .unwrap();
        let addr = format!("127.0.0.1:{}", port());
        let config = dir.join("gateway.toml");
        std::fs::write(
            &config,
            format!(
                "listen = \"{addr}\"\npolicies = {:?}\npools = \"pools.toml\"\npolicy_reload_secs = 0\n\
                 [audit]\ndir = \"audit\"\nsigning_key = \"audit-keys/audit-signing.key\"\n\
                 checkpoint_every_ms = 200\nsegment_max_bytes = {segment_max_bytes}\n\
                 [audit.hmac_keys]\nDE = \"audit-keys/hmac-DE.key\"\n{}",
                common::repo_root().join("policies"),
                snippet.lines().filter(|l| !l.starts_with('#')).collect::<Vec<_>>().join("\n")
            ),
        )
        .unwrap();
        let mut s = Setup {
            dir,
            config,
            addr,
            token,
            fake,
            gateway: None,
        };
        s.start_gateway();
        s
    }

    fn start_gateway(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("gateway.log"))
            .unwrap();
        let child = Command::new(bin("gateway"))
            .arg("--config")
            .arg(&self.config)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.gateway = Some(child);
        wait_for("the gateway to serve", Duration::from_secs(60), || {
            self.request().map(|r| r.0) == Some(200)
        });
    }

    /// One chat completion over a fresh connection: (status, request id).
    fn request(&self) -> Option<(u16, String)> {
        request(&self.addr, &self.token)
    }

    fn audit_dir(&self) -> PathBuf {
        self.dir.join("audit")
    }
}

fn request(addr: &str, token: &str) -> Option<(u16, String)> {
    let body =
        r#"{"model":"fake","messages":[{"role":"user","content":"audit me"}],"max_tokens":8}"#;
    let mut s = TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(
        s,
        "POST /v1/chat/completions HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\n\
         x-data-classification: internal\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        body.len()
    )
    .ok()?;
    let mut resp = String::new();
    s.read_to_string(&mut resp).ok()?;
    let status: u16 = resp.split_whitespace().nth(1)?.parse().ok()?;
    let (head, body) = resp.split_once("\r\n\r\n")?;
    // Only a complete response counts as received.
    let len: usize = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length:")
                .map(|v| v.trim().to_string())
        })?
        .parse()
        .ok()?;
    if body.len() < len {
        return None;
    }
    let id = head.lines().find_map(|l| {
        l.to_ascii_lowercase()
            .strip_prefix("x-request-id:")
            .map(|v| v.trim().to_string())
    })?;
    Some((status, id))
}

impl Drop for Setup {
    fn drop(&mut self) {
        if let Some(g) = &mut self.gateway {
            let _ = g.kill();
            let _ = g.wait();
        }
        let _ = self.fake.kill();
        let _ = self.fake.wait();
    }
}

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
