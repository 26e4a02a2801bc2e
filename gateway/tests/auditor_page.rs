//! The auditors' read-only view on the admin listener, in the real gateway process over a
//! `worker fake` upstream: the JSON endpoints (401 / 403 / 200, state scoping, query
//! errors, record detail, inclusion proof, verification), then the `/audit/` page driven
//! in headless Chromium by `tests/web/auditor_page.mjs` (playwright-core), which saves a
//! screenshot to `target/test-artifacts/auditor-page.png`.
//!
//! Needs Debian `chromium`, `node` and `npm ci` in gateway/tests/web; with
//! `SOV_SKIP_BROWSER_TESTS=1` the browser part is skipped (the JSON checks still run).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::audit_gateway::{Setup, request_with};
use common::{Reply, curl, repo_root, wait_for};
use serde_json::Value;

const CHROMIUM: &str = "/usr/bin/chromium";

fn get(s: &Setup, path: &str, token: Option<&str>) -> Reply {
    curl(
        "GET",
        &format!("http://{}{path}", s.admin),
        token,
        &[],
        None,
        &[],
    )
}

/// Wait until every record of `state`'s log is covered by a signed checkpoint.
fn wait_checkpointed(s: &Setup, state: &str) {
    let dir = s.audit_dir().join(state);
    wait_for(
        "a checkpoint covering every record",
        Duration::from_secs(20),
        || {
            let r = gateway::audit::verify_dir(&dir, &[], |_| {});
            r.logs.first().is_some_and(|l| {
                l.error.is_none() && l.size > 0 && l.latest_checkpoint == Some(l.size)
            })
        },
    );
}

#[test]
fn auditor_endpoints_and_page() {
    let s = Setup::with_states("auditor-page", 64 * 1024 * 1024, &["DE", "FR"]);

    // Traffic: served and denied DE requests, and some FR requests.
    let mut served = Vec::new();
    for _ in 0..3 {
        let (status, id) = s.request().expect("an answer");
        assert_eq!(status, 200);
        served.push(id);
    }
    let mut denied = Vec::new();
    for _ in 0..2 {
        // Above the token's clearance (internal): refused, and audited as a deny.
        let (status, id) = request_with(&s.addr, &s.token, "restricted").expect("an answer");
        assert_eq!(status, 403);
        denied.push(id);
    }
    let fr_user = s.mint("FR", "fr-interieur", &[]);
    for _ in 0..2 {
        request_with(&s.addr, &fr_user, "internal").expect("an answer");
    }
    wait_checkpointed(&s, "DE");
    wait_checkpointed(&s, "FR");

    let auditor = s.mint("DE", "bundesrechnungshof", &["auditor"]);
    let fr_auditor = s.mint("FR", "cour-des-comptes", &["auditor"]);

    // --- access control
    let r = get(&s, "/admin/audit/records", None);
    assert_eq!(
        (r.status, r.error_code().as_str()),
        (401, "missing_token"),
        "{}",
        r.body
    );
    assert_eq!(r.header("www-authenticate"), Some("Bearer"));
    let r = get(&s, "/admin/audit/verify", Some("not-a-jwt"));
    assert_eq!(
        (r.status, r.error_code().as_str()),
        (401, "malformed_token"),
        "{}",
        r.body
    );
    for path in [
        "/admin/audit/records",
        "/admin/audit/verify",
        "/admin/audit/records/0",
    ] {
        let r = get(&s, path, Some(&s.token));
        assert_eq!(
            (r.status, r.error_code().as_str()),
            (403, "auditor_role_required"),
            "{path}: {}",
            r.body
        );
    }
    let r = curl(
        "POST",
        &format!("http://{}/admin/audit/records", s.admin),
        Some(&auditor),
        &[],
        Some(b"{}"),
        &[],
    );
    assert_eq!(r.status, 405, "{}", r.body);

    // --- records: own state only, newest first, filters
    let r = get(&s, "/admin/audit/records", Some(&auditor));
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.header("cache-control"), Some("no-store"));
    assert!(
        !r.body.contains("audit me"),
        "prompt text leaked: {}",
        r.body
    );
    let v = r.json();
    let recs = v["records"].as_array().unwrap();
    assert!(recs.len() >= 3 * 2 + 2, "{v}");
    assert_eq!(v["count"].as_u64(), Some(recs.len() as u64));
    assert!(recs.iter().all(|r| r["state"] == "DE"), "{v}");
    let seqs: Vec<u64> = recs.iter().map(|r| r["seq"].as_u64().unwrap()).collect();
    assert!(
        seqs.windows(2).all(|w| w[0] > w[1]),
        "newest first: {seqs:?}"
    );

    let v = get(&s, "/admin/audit/records?decision=deny", Some(&auditor)).json();
    let recs = v["records"].as_array().unwrap();
    let ids: Vec<&str> = recs
        .iter()
        .map(|r| r["request_id"].as_str().unwrap())
        .collect();
    assert!(recs.iter().all(|r| r["decision"] == "deny"), "{v}");
    for id in &denied {
        assert!(ids.contains(&id.as_str()), "deny {id} missing: {v}");
    }
    let v = get(
        &s,
        &format!(
            "/admin/audit/records?request_id={}&phase=decision&limit=5",
            served[0]
        ),
        Some(&auditor),
    )
    .json();
    assert_eq!(v["count"], 1, "{v}");
    assert_eq!(v["records"][0]["decision"], "allow");
    assert_eq!(v["records"][0]["pool"], "de-fra-1");
    let v = get(&s, "/admin/audit/records?limit=2", Some(&auditor)).json();
    assert_eq!(v["count"], 2, "{v}");
    let v = get(
        &s,
        "/admin/audit/records?since=2000-01-01T00%3A00%3A00Z&until=2000-01-02T00:00:00%2B01:00",
        Some(&auditor),
    )
    .json();
    assert_eq!(v["count"], 0, "{v}");

    // The DE auditor cannot read FR; the FR auditor sees FR only.
    let r = get(&s, "/admin/audit/records?state=FR", Some(&auditor));
    assert_eq!(
        (r.status, r.error_code().as_str()),
        (403, "state_not_permitted"),
        "{}",
        r.body
    );
    let r = get(&s, "/admin/audit/verify?state=fr", Some(&auditor));
    assert_eq!(r.status, 403, "{}", r.body);
    let v = get(&s, "/admin/audit/records", Some(&fr_auditor)).json();
    let recs = v["records"].as_array().unwrap();
    assert!(
        !recs.is_empty() && recs.iter().all(|r| r["state"] == "FR"),
        "{v}"
    );
    let v = get(
        &s,
        &format!("/admin/audit/records?request_id={}", served[0]),
        Some(&fr_auditor),
    )
    .json();
    assert_eq!(v["count"], 0, "{v}");
    let r = get(
        &s,
        &format!("/admin/audit/proof?request_id={}", served[0]),
        Some(&fr_auditor),
    );
    assert_eq!(r.status, 404, "{}", r.body);

    // Bad queries: 400 with a reason code.
    for (q, code) in [
        ("limit=abc", "invalid_limit"),
        ("limit=0", "invalid_limit"),
        ("since=yesterday", "invalid_time"),
        ("decision=maybe", "invalid_decision"),
        ("phase=nope", "invalid_phase"),
        ("ministry=%zz", "invalid_query"),
        ("ministry=%C3", "invalid_query"),
        ("colour=red", "unknown_parameter"),
        ("pool=a&pool=b", "duplicate_parameter"),
    ] {
        let r = get(&s, &format!("/admin/audit/records?{q}"), Some(&auditor));
        assert_eq!(
            (r.status, r.error_code().as_str()),
            (400, code),
            "{q}: {}",
            r.body
        );
    }

    // --- one record, with its leaf hash
    let v = get(
        &s,
        &format!(
            "/admin/audit/records?request_id={}&phase=decision",
            denied[0]
        ),
        Some(&auditor),
    )
    .json();
    let seq = v["records"][0]["seq"].as_u64().unwrap();
    let r = get(&s, &format!("/admin/audit/records/{seq}"), Some(&auditor));
    assert_eq!(r.status, 200, "{}", r.body);
    let v = r.json();
    assert_eq!(v["record"]["seq"], seq);
    assert_eq!(v["record"]["request_id"], denied[0].as_str());
    let canonical = v["canonical"].as_str().unwrap();
    assert_eq!(
        v["leaf_hash"].as_str().unwrap(),
        hex::encode(gateway::audit::leaf_hash(canonical.as_bytes()))
    );
    let stored =
        std::fs::read_to_string(s.audit_dir().join("DE/seg-00000000000000000000.jsonl")).unwrap();
    assert!(
        stored.lines().any(|l| l == canonical),
        "canonical line is the stored line"
    );
    let r = get(&s, "/admin/audit/records/abc", Some(&auditor));
    assert_eq!((r.status, r.error_code().as_str()), (400, "invalid_seq"));
    let r = get(&s, "/admin/audit/records/999999", Some(&auditor));
    assert_eq!(
        (r.status, r.error_code().as_str()),
        (404, "record_not_found")
    );

    // --- inclusion proof, verified by the server and again here
    let r = get(
        &s,
        &format!("/admin/audit/proof?request_id={}", served[1]),
        Some(&auditor),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let v = r.json();
    assert_eq!(v["verified"], true, "{v}");
    let proof: gateway::audit::Proof = serde_json::from_value(v["proof"].clone()).unwrap();
    let key_file = s.dir.join("audit-keys/audit-signing.pub");
    let key = gateway::audit::VerifierKey::load(key_file.to_str().unwrap()).unwrap();
    gateway::audit::verify_proof(&proof, &[key]).unwrap();
    assert_eq!(proof.record.request_id, served[1]);
    let v = get(&s, &format!("/admin/audit/proof?seq={seq}"), Some(&auditor)).json();
    assert_eq!(
        (v["verified"].clone(), v["proof"]["seq"].clone()),
        (Value::Bool(true), seq.into())
    );
    let r = get(&s, "/admin/audit/proof", Some(&auditor));
    assert_eq!(
        (r.status, r.error_code().as_str()),
        (400, "missing_parameter")
    );

    // --- verification status
    let v = get(&s, "/admin/audit/verify", Some(&auditor)).json();
    assert_eq!(v["ok"], true, "{v}");
    assert_eq!(v["state"], "DE");
    assert!(v["size"].as_u64().unwrap() >= 8, "{v}");
    assert!(v["checkpoints"].as_u64().unwrap() >= 1, "{v}");
    assert!(
        v["latest_checkpoint_note"]
            .as_str()
            .is_some_and(|n| n.starts_with("sovereign-gateway/r1/DE\n")),
        "{v}"
    );
    assert!(v["error"].is_null(), "{v}");
    let v2 = get(&s, "/admin/audit/verify", Some(&auditor)).json();
    assert_eq!(
        v2["cached"], true,
        "a second look within seconds is cached: {v2}"
    );

    // --- the existing admin endpoints and the page
    for path in ["/health", "/admin/status", "/admin/policy-hash"] {
        assert_eq!(get(&s, path, None).status, 200, "{path}");
    }
    for path in ["/audit/", "/audit"] {
        let r = get(&s, path, None);
        assert_eq!(r.status, 200, "{path}");
        assert!(
            r.header("content-type")
                .unwrap_or("")
                .starts_with("text/html")
        );
        assert!(r.header("content-security-policy").is_some());
        assert!(
            r.body.contains("id=\"results\"")
                && !r.body.contains("http://")
                && !r.body.contains("https://")
        );
    }

    // --- the page in headless Chromium
    if std::env::var("SOV_SKIP_BROWSER_TESTS").as_deref() == Ok("1") {
        eprintln!("SKIPPED: the auditor page in headless Chromium (SOV_SKIP_BROWSER_TESTS=1)");
        return;
    }
    let web = repo_root().join("gateway/tests/web");
    require_browser_tools(&web);
    let shot = artifacts_dir().join("auditor-page.png");
    let _ = std::fs::remove_file(&shot);
    let out = Command::new("node")
        .current_dir(&web)
        .arg("auditor_page.mjs")
        .arg(format!("http://{}/audit/", s.admin))
        .arg(&auditor)
        .arg(&shot)
        .env("CHROMIUM", CHROMIUM)
        .output()
        .expect("node runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let summary: Value = stdout
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str(l).ok())
        .unwrap_or_else(|| panic!("no JSON summary from the browser script:\n{stdout}\n{stderr}"));
    assert!(
        out.status.success() && summary["ok"] == true,
        "browser script failed: {summary}\n{stderr}"
    );
    assert_eq!(summary["page_status"], 200, "{summary}");
    assert_eq!(summary["rows_before_token"], 0, "{summary}");
    assert_eq!(summary["token_in_session_storage"], true, "{summary}");
    assert_eq!(summary["verify_state"], "intact", "{summary}");
    assert!(
        summary["verify_text"]
            .as_str()
            .unwrap()
            .contains("Log intact"),
        "{summary}"
    );
    assert!(summary["rows_all"].as_u64().unwrap() >= 8, "{summary}");
    assert!(summary["rows_deny"].as_u64().unwrap() >= 2, "{summary}");
    assert_eq!(
        summary["row_decisions"],
        serde_json::json!(["deny"]),
        "{summary}"
    );
    let fields: Vec<&str> = summary["detail_fields"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    for f in [
        "seq",
        "origin",
        "time",
        "request_id",
        "state",
        "decision",
        "reason_codes",
        "leaf_hash",
    ] {
        assert!(fields.contains(&f), "detail lacks {f}: {summary}");
    }
    assert!(
        !summary["detail_text"]
            .as_str()
            .unwrap()
            .contains("audit me")
    );
    assert_eq!(summary["proof_verified"], "true", "{summary}");
    assert!(
        summary["proof_badge"]
            .as_str()
            .unwrap()
            .contains("verified"),
        "{summary}"
    );
    assert_eq!(
        summary["proof_json"]["seq"], summary["detail_seq"],
        "{summary}"
    );
    for k in ["page_errors", "console_errors", "requests_outside"] {
        assert_eq!(summary[k], serde_json::json!([]), "{k}: {summary}");
    }
    let png = std::fs::read(&shot).expect("screenshot written");
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 10_000,
        "{}",
        shot.display()
    );
    eprintln!("auditor page screenshot: {}", shot.display());
}

/// `target/test-artifacts/` (under `CARGO_TARGET_DIR` when set).
fn artifacts_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target"));
    let dir = target.join("test-artifacts");
    std::fs::create_dir_all(&dir).expect("create target/test-artifacts");
    dir.canonicalize().unwrap_or(dir)
}

fn require_browser_tools(web: &Path) {
    let how = "install them (as CI does) with:\n  \
               apt-get install -y chromium nodejs (node >= 20, with npm)\n  \
               (cd gateway/tests/web && npm ci --no-audit --no-fund)\n\
               or set SOV_SKIP_BROWSER_TESTS=1 to skip the browser part of this test";
    assert!(
        Path::new(CHROMIUM).is_file(),
        "{CHROMIUM} (Debian package `chromium`) is missing; {how}"
    );
    let node = Command::new("node").arg("--version").output();
    let version = match node {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).trim().to_string(),
        _ => panic!("`node` is not on PATH; {how}"),
    };
    let major: u32 = version
        .trim_start_matches('v')
        .split('.')
        .next()
        .and_then(|m| m.parse().ok())
        .unwrap_or(0);
    assert!(
        major >= 20,
        "node {version} is too old: playwright-core needs node >= 20 (Debian 12's `nodejs` \
         is 18; use NodeSource's nodejs 20 or later); {how}"
    );
    assert!(
        web.join("node_modules/playwright-core/package.json")
            .is_file(),
        "playwright-core is not installed in {}; {how}",
        web.display()
    );
}
