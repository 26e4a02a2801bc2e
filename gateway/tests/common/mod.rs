//! The gateway's end-to-end harness: runs the real `sovctl demo` (which starts the real
//! gateway and worker processes on loopback), reads `demo.json`, and talks to the
//! gateway with real clients (curl here; the `openai` Python package and async-openai in
//! the tests). Stopping the harness sends the demo SIGINT, as a user's Ctrl-C would.

#![allow(dead_code)]

pub mod audit_gateway;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

pub struct Demo {
    pub dir: PathBuf,
    pub child: Child,
    pub json: Value,
    pub url: String,
}

/// Binaries next to the test's `sovctl` (cargo builds the workspace's binaries first).
pub fn bin(name: &str) -> PathBuf {
    let sovctl = PathBuf::from(env!("CARGO_BIN_EXE_sovctl"));
    sovctl.with_file_name(name)
}

pub fn scratch_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("sov-gw-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("scratch dir");
    d
}

impl Demo {
    pub fn start(name: &str) -> Demo {
        Self::start_with(name, &[])
    }

    pub fn start_with(name: &str, extra: &[&str]) -> Demo {
        let dir = scratch_dir(name);
        let worker = bin("worker");
        assert!(
            worker.is_file(),
            "{} missing: run the workspace's tests (cargo test --workspace) so it is built",
            worker.display()
        );
        let log = std::fs::File::create(dir.join("sovctl-demo.log")).expect("log");
        let child = Command::new(env!("CARGO_BIN_EXE_sovctl"))
            .args(["demo", "--dir"])
            .arg(&dir)
            .args([
                "--port",
                "0",
                "--worker-threads",
                "1",
                "--kv-cache-mb",
                "48",
            ])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start sovctl demo");
        let mut demo = Demo {
            dir: dir.clone(),
            child,
            json: Value::Null,
            url: String::new(),
        };
        let deadline = Instant::now() + Duration::from_secs(300);
        let path = dir.join("demo.json");
        loop {
            if let Ok(text) = std::fs::read_to_string(&path) {
                demo.json = serde_json::from_str(&text).expect("demo.json is JSON");
                break;
            }
            if let Ok(Some(status)) = demo.child.try_wait() {
                panic!(
                    "sovctl demo exited ({status}) before writing demo.json:\n{}",
                    demo.log()
                );
            }
            assert!(
                Instant::now() < deadline,
                "demo not ready in 300 s:\n{}",
                demo.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        demo.url = demo.json["gateway_url"]
            .as_str()
            .expect("gateway_url")
            .to_string();
        demo
    }

    pub fn log(&self) -> String {
        let mut s = std::fs::read_to_string(self.dir.join("sovctl-demo.log")).unwrap_or_default();
        if let Ok(g) = std::fs::read_to_string(self.dir.join("logs/gateway.log")) {
            s.push_str("\n--- gateway.log (tail) ---\n");
            let lines: Vec<&str> = g.lines().collect();
            // A panic's message comes before its (long) backtrace: show it on its own.
            for (i, l) in lines.iter().enumerate() {
                if l.contains("panicked at") {
                    s.push_str("--- panic ---\n");
                    s.push_str(&lines[i..(i + 3).min(lines.len())].join("\n"));
                    s.push('\n');
                }
            }
            s.push_str(&lines[lines.len().saturating_sub(40)..].join("\n"));
        }
        s
    }

    /// The token of a demo ministry.
    pub fn token(&self, state: &str, ministry: &str) -> String {
        let m = self.json["ministries"]
            .as_array()
            .expect("ministries")
            .iter()
            .find(|m| m["state"] == state && m["ministry"] == ministry)
            .unwrap_or_else(|| panic!("demo has no ministry {state}/{ministry}"));
        let path = m["token_file"].as_str().expect("token_file");
        std::fs::read_to_string(path)
            .expect("token file")
            .trim()
            .to_string()
    }

    pub fn model(&self) -> String {
        self.json["model"].as_str().expect("model").to_string()
    }

    pub fn pool(&self, id: &str) -> &Value {
        self.json["pools"]
            .as_array()
            .expect("pools")
            .iter()
            .find(|p| p["id"] == id)
            .unwrap_or_else(|| panic!("demo has no pool {id}"))
    }

    /// Stops the demo as Ctrl-C would and waits (bounded) for it to exit.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, libc::SIGINT);
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(s)) = self.child.try_wait() {
                return s;
            }
            assert!(Instant::now() < deadline, "demo did not stop in 30 s");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            unsafe {
                libc::kill(self.child.id() as libc::pid_t, libc::SIGINT);
            }
            let deadline = Instant::now() + Duration::from_secs(20);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = self.child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = self.child.kill();
        }
    }
}

/// One HTTP exchange done with curl: status, lower-cased headers, body.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    /// The response's status line, e.g. `HTTP/2 200`.
    pub status_line: String,
    pub headers: HashMap<String, String>,
    pub body: String,
}

impl Reply {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {}", self.body))
    }

    pub fn error_code(&self) -> String {
        self.json()["error"]["code"]
            .as_str()
            .unwrap_or("")
            .to_string()
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }
}

/// `curl` with a JSON body file (so bodies of any size work) and extra arguments.
pub fn curl(
    method: &str,
    url: &str,
    token: Option<&str>,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
    extra: &[&str],
) -> Reply {
    let dir = scratch_dir(&format!("curl-{}", rand_suffix()));
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "--max-time", "60", "-X", method, "-o"])
        .arg(dir.join("body"))
        .arg("-D")
        .arg(dir.join("headers"))
        .args(["-w", "%{http_code}"]);
    if let Some(t) = token {
        cmd.args(["-H", &format!("Authorization: Bearer {t}")]);
    }
    for (k, v) in headers {
        cmd.args(["-H", &format!("{k}: {v}")]);
    }
    if let Some(b) = body {
        std::fs::write(dir.join("req"), b).expect("write body");
        cmd.args(["-H", "content-type: application/json", "--data-binary"])
            .arg(format!("@{}", dir.join("req").display()));
    }
    cmd.args(extra).arg(url);
    let out = cmd.output().expect("curl runs");
    let status: u16 = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or(0);
    let header_text = std::fs::read_to_string(dir.join("headers")).unwrap_or_default();
    let status_line = header_text.lines().next().unwrap_or("").trim().to_string();
    let headers = header_text
        .lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let body = std::fs::read_to_string(dir.join("body")).unwrap_or_default();
    let _ = std::fs::remove_dir_all(&dir);
    Reply {
        status,
        status_line,
        headers,
        body,
    }
}

fn rand_suffix() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    format!("{}", N.fetch_add(1, Ordering::Relaxed))
}

pub fn chat_body(model: &str, content: &str, max_tokens: u32, stream: bool) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "model": model,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": stream,
    }))
    .expect("json")
}

/// A GET on loopback without curl's process overhead: (status, body).
pub fn http_get(url_base: &str, path: &str) -> Option<(u16, String)> {
    let addr = url_base.trim_start_matches("http://").trim_end_matches('/');
    let addr = addr.split('/').next()?.parse().ok()?;
    gateway::net::http_get(addr, path)
}

pub fn wait_for(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub fn repo_root() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}
