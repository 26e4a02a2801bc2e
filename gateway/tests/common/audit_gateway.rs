//! The real `gateway` binary with an audit log, over a `worker fake` upstream (pool
//! `de-fra-1`, model `fake`): generated IdP keys, audit keys, config and a DE token. Used
//! by the audit end-to-end tests and the auditor page test.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::{bin, repo_root, scratch_dir, wait_for};

pub struct Setup {
    pub dir: PathBuf,
    pub config: PathBuf,
    /// The OpenAI listener, `127.0.0.1:port`.
    pub addr: String,
    /// The admin listener, `127.0.0.1:port`.
    pub admin: String,
    /// The identity providers' key directory (for `sovctl token mint --keys`).
    pub keys: PathBuf,
    /// A DE token (ministry `crash-test`, clearance `internal`).
    pub token: String,
    pub fake: Child,
    pub gateway: Option<Child>,
}

pub fn port() -> u16 {
    gateway::net::free_loopback_port().expect("a free loopback port")
}

pub fn sovctl(args: &[&str]) -> String {
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
    /// A gateway with one member state, DE.
    pub fn new(name: &str, segment_max_bytes: u64) -> Setup {
        Self::with_states(name, segment_max_bytes, &["DE"])
    }

    /// A gateway with an identity provider, an HMAC key and an audit log for each of
    /// `states` (the first must be DE: the readiness check uses the DE token).
    pub fn with_states(name: &str, segment_max_bytes: u64, states: &[&str]) -> Setup {
        let dir = scratch_dir(name);
        let keys = dir.join("keys");
        let mut snippets = String::new();
        for state in states {
            let snippet = sovctl(&[
                "keys",
                "generate",
                "--dir",
                keys.to_str().unwrap(),
                "--state",
                state,
            ]);
            for l in snippet.lines().filter(|l| !l.starts_with('#')) {
                snippets.push_str(l);
                snippets.push('\n');
            }
        }
        let token = mint(&keys, "DE", "crash-test", &[]);
        let akeys = dir.join("audit-keys");
        sovctl(&[
            "audit",
            "keygen",
            "--out",
            akeys.to_str().unwrap(),
            "--hmac-states",
            &states.join(","),
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
        let admin = format!("127.0.0.1:{}", port());
        let hmac_keys: String = states
            .iter()
            .map(|s| format!("{s} = \"audit-keys/hmac-{s}.key\"\n"))
            .collect();
        let config = dir.join("gateway.toml");
        std::fs::write(
            &config,
            format!(
                "listen = \"{addr}\"\nadmin_listen = \"{admin}\"\npolicies = {:?}\npools = \"pools.toml\"\npolicy_reload_secs = 0\n\
                 [audit]\ndir = \"audit\"\nsigning_key = \"audit-keys/audit-signing.key\"\n\
                 checkpoint_every_ms = 200\nsegment_max_bytes = {segment_max_bytes}\n\
                 [audit.hmac_keys]\n{hmac_keys}{snippets}",
                repo_root().join("policies"),
            ),
        )
        .unwrap();
        let mut s = Setup {
            dir,
            config,
            addr,
            admin,
            keys,
            token,
            fake,
            gateway: None,
        };
        s.start_gateway();
        s
    }

    pub fn start_gateway(&mut self) {
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
    pub fn request(&self) -> Option<(u16, String)> {
        request(&self.addr, &self.token)
    }

    pub fn audit_dir(&self) -> PathBuf {
        self.dir.join("audit")
    }

    /// A token of `state`'s identity provider with `roles`.
    pub fn mint(&self, state: &str, ministry: &str, roles: &[&str]) -> String {
        mint(&self.keys, state, ministry, roles)
    }
}

fn mint(keys: &std::path::Path, state: &str, ministry: &str, roles: &[&str]) -> String {
    let mut args = vec![
        "token",
        "mint",
        "--keys",
        keys.to_str().unwrap(),
        "--state",
        state,
        "--ministry",
        ministry,
        "--clearance",
        "internal",
        "--ttl",
        "1h",
    ];
    for r in roles {
        args.extend(["--role", r]);
    }
    sovctl(&args).trim().to_string()
}

/// One internal-classified chat completion with `token`: (status, request id).
pub fn request(addr: &str, token: &str) -> Option<(u16, String)> {
    request_with(addr, token, "internal")
}

/// One chat completion at `classification` with `token`: (status, request id).
pub fn request_with(addr: &str, token: &str, classification: &str) -> Option<(u16, String)> {
    request_head(addr, token, classification).map(|(status, id, _)| (status, id))
}

/// One internal-classified chat completion: (status, request id, `x-residency-receipt`).
pub fn request_receipt(addr: &str, token: &str) -> Option<(u16, String, Option<String>)> {
    let (status, id, head) = request_head(addr, token, "internal")?;
    let receipt = head.lines().find_map(|l| {
        let (name, value) = l.split_once(':')?;
        name.eq_ignore_ascii_case("x-residency-receipt")
            .then(|| value.trim().to_string())
    });
    Some((status, id, receipt))
}

/// One chat completion: (status, request id, response head).
fn request_head(addr: &str, token: &str, classification: &str) -> Option<(u16, String, String)> {
    let body =
        r#"{"model":"fake","messages":[{"role":"user","content":"audit me"}],"max_tokens":8}"#;
    let mut s = TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(
        s,
        "POST /v1/chat/completions HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\n\
         x-data-classification: {classification}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\
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
    Some((status, id, head.to_string()))
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
