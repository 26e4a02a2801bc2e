//! `sovctl` as a user runs it: policy check (the shipped set passes; a weakened state
//! policy fails with file, policy id and counterexample), policy explain (table and
//! JSON), keys generate + token mint (a JWT the gateway's authenticator accepts).

mod common;

use std::process::Command;

use base64::Engine;
use common::{repo_root, scratch_dir};

fn sovctl(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_sovctl"))
        .args(args)
        .output()
        .expect("sovctl runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let p = e.unwrap().path();
        if p.is_file() {
            std::fs::copy(&p, to.join(p.file_name().unwrap())).unwrap();
        }
    }
}

#[test]
fn policy_check_passes_on_the_shipped_set_and_fails_with_a_counterexample() {
    let policies = repo_root().join("policies");
    let (code, out, err) = sovctl(&["policy", "check", policies.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(out.contains("27 states admitted"), "{out}");
    assert!(out.contains("policy set sha256:"), "{out}");

    // Weaken DE's restricted-data forbid: restricted data could leave Germany.
    let dir = scratch_dir("cli-policy");
    copy_dir(&policies, &dir);
    let de = std::fs::read_to_string(dir.join("de.cedar")).unwrap();
    let weakened = de.replace("resource.country != \"DE\"", "resource.country == \"XX\"");
    assert_ne!(de, weakened, "the DE policy text changed; update this test");
    std::fs::write(dir.join("de.cedar"), weakened).unwrap();
    let (code, out, err) = sovctl(&["policy", "check", dir.to_str().unwrap()]);
    let all = format!("{out}{err}");
    assert_eq!(code, 1, "{all}");
    assert!(all.contains("de.cedar"), "names the file: {all}");
    assert!(all.contains("`de/permit`"), "names the policy: {all}");
    assert!(
        all.contains("restricted data") && all.contains("(country "),
        "gives a counterexample: {all}"
    );
    assert!(!all.contains("panicked"), "{all}");

    // A file that does not parse: exit 1 with the line.
    std::fs::write(
        dir.join("de.cedar"),
        "permit (principal in State::\"DE\", action, resource\n",
    )
    .unwrap();
    let (code, out, err) = sovctl(&["policy", "check", dir.to_str().unwrap()]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(format!("{out}{err}").contains("de.cedar"), "{out}{err}");
    let (code, _, err) = sovctl(&["policy", "check", "/nonexistent/policies"]);
    assert_eq!(code, 1, "{err}");
}

#[test]
fn policy_explain_table_and_json() {
    let policies = repo_root().join("policies");
    let pools = policies.join("tests/pools.toml");
    let base = [
        "policy",
        "explain",
        "--policies",
        policies.to_str().unwrap(),
        "--pools",
        pools.to_str().unwrap(),
    ];
    let args = |extra: &[&'static str]| -> Vec<String> {
        base.iter().chain(extra).map(|s| s.to_string()).collect()
    };
    let run = |a: Vec<String>| sovctl(&a.iter().map(String::as_str).collect::<Vec<_>>());
    let (code, out, err) = run(args(&[
        "--state",
        "DE",
        "--ministry",
        "bmi",
        "--classification",
        "restricted",
        "--model",
        "smollm2",
    ]));
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("ALLOW -> de-fra-1 (DE)"), "{out}");
    assert!(out.contains("restricted_certification_missing"), "{out}");

    let (code, out, err) = run(args(&[
        "--state",
        "FR",
        "--ministry",
        "bercy",
        "--classification",
        "internal",
        "--model",
        "smollm2",
        "--json",
    ]));
    assert_eq!(code, 0, "{out}{err}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    let cands = v["candidates"].as_array().unwrap();
    assert!(!cands.is_empty());
    assert!(
        cands
            .iter()
            .all(|c| ["FR", "BE", "LU"].contains(&c["country"].as_str().unwrap())),
        "{v}"
    );
    assert_eq!(cands[0]["allowed"], true);

    // A refusal exits 2 and says why.
    let (code, out, _) = run(args(&[
        "--state",
        "DE",
        "--ministry",
        "aa",
        "--classification",
        "restricted",
        "--model",
        "smollm2",
    ]));
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("model_not_allowed_for_ministry"), "{out}");
}

#[test]
fn keys_generate_and_token_mint() {
    let dir = scratch_dir("cli-keys");
    let keys = dir.join("keys");
    let (code, out, err) = sovctl(&[
        "keys",
        "generate",
        "--dir",
        keys.to_str().unwrap(),
        "--state",
        "DE",
        "--alg",
        "ES256",
    ]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("[[member_state]]"),
        "prints a config snippet: {out}"
    );
    let (code, token, err) = sovctl(&[
        "token",
        "mint",
        "--keys",
        keys.to_str().unwrap(),
        "--state",
        "DE",
        "--ministry",
        "bmi",
        "--clearance",
        "restricted",
        "--ttl",
        "1h",
    ]);
    assert_eq!(code, 0, "{err}");
    let token = token.trim().to_string();
    let parts: Vec<&str> = token.split('.').collect();
    assert_eq!(parts.len(), 3, "{token}");
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let header: serde_json::Value = serde_json::from_slice(&b64.decode(parts[0]).unwrap()).unwrap();
    let claims: serde_json::Value = serde_json::from_slice(&b64.decode(parts[1]).unwrap()).unwrap();
    assert_eq!(header["alg"], "ES256");
    assert_eq!(
        (
            claims["state"].as_str(),
            claims["ministry"].as_str(),
            claims["clearance"].as_str()
        ),
        (Some("DE"), Some("bmi"), Some("restricted"))
    );
    let ttl = claims["exp"].as_i64().unwrap() - claims["iat"].as_i64().unwrap();
    assert_eq!(ttl, 3600);

    // The gateway's authenticator accepts it with the generated JWKS.
    let state: gateway::Country = "DE".parse().unwrap();
    let keys_loaded = gateway::auth::load_state_keys(&keys, &state).unwrap();
    let auth = gateway::auth::Authenticator::new(vec![keys_loaded.issuer_config(&keys)]).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let caller = rt
        .block_on(auth.authenticate(Some(&format!("Bearer {token}"))))
        .unwrap();
    assert_eq!(caller.ministry, "bmi");

    // Errors are clear, not panics.
    let (code, _, err) = sovctl(&[
        "token",
        "mint",
        "--keys",
        dir.join("nope").to_str().unwrap(),
        "--state",
        "DE",
        "--ministry",
        "x",
        "--clearance",
        "public",
    ]);
    assert_eq!(code, 1);
    assert!(!err.contains("panicked") && !err.is_empty(), "{err}");
    let (code, _, err) = sovctl(&[
        "token",
        "mint",
        "--keys",
        keys.to_str().unwrap(),
        "--state",
        "DE",
        "--ministry",
        "bmi",
        "--clearance",
        "secret",
    ]);
    assert_ne!(code, 0, "{err}");
}
