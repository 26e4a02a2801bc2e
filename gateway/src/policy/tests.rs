//! Tests of the shipped policies, the test vectors in `policies/tests/`, admission
//! failures, and hot reload.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

use super::*;
use crate::domain::{Classification, EU_MEMBER_STATES};
use crate::pools::PoolsConfig;

/// The repository's `policies/` directory: the first ancestor of the crate directory
/// that holds `policies/schema.cedarschema`.
fn shipped_dir() -> PathBuf {
    let mut dir = Some(Path::new(env!("CARGO_MANIFEST_DIR")));
    while let Some(d) = dir {
        let candidate = d.join("policies");
        if candidate.join(SCHEMA_FILE).is_file() {
            return candidate;
        }
        dir = d.parent();
    }
    panic!(
        "no policies/schema.cedarschema above {}",
        env!("CARGO_MANIFEST_DIR")
    );
}

fn test_pools() -> PoolsConfig {
    let path = shipped_dir().join("tests/pools.toml");
    PoolsConfig::load(&path).unwrap()
}

/// A fresh temp dir holding a copy of the shipped schema, baseline and the given states.
fn temp_copy(name: &str, states: &[&str]) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("sov-policy-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let src = shipped_dir();
    let mut names = vec![SCHEMA_FILE.to_string(), BASELINE_FILE.to_string()];
    for cc in states {
        names.push(format!("{cc}.cedar"));
        names.push(format!("{cc}.routing.toml"));
    }
    for n in names {
        std::fs::copy(src.join(&n), dir.join(&n)).unwrap();
    }
    dir
}

fn edit(dir: &Path, file: &str, from: &str, to: &str) {
    let p = dir.join(file);
    let text = std::fs::read_to_string(&p).unwrap();
    assert!(text.contains(from), "{file} does not contain {from:?}");
    std::fs::write(&p, text.replacen(from, to, 1)).unwrap();
}

#[test]
fn shipped_policies_pass_admission() {
    let set = PolicySet::load(&shipped_dir(), &test_pools()).unwrap();
    let states: Vec<&str> = set.states().collect();
    assert_eq!(states, EU_MEMBER_STATES.to_vec());
    assert_eq!(set.reports().len(), 27);
    for r in set.reports() {
        assert!(r.allowed > 0 && r.allowed < r.decisions, "{r:?}");
        assert_eq!(r.restricted, r.state);
        assert_eq!(r.public, "EU");
    }
    assert_eq!(set.hash().len(), 64);
    // Stable across loads, independent of the pools, and equal to the watcher's hash.
    let again = PolicySet::load(&shipped_dir(), &PoolsConfig::default()).unwrap();
    assert_eq!(set.hash(), again.hash());
    assert_eq!(dir_hash(&shipped_dir()).unwrap(), set.hash());
    assert_eq!(
        set.ministry("DE", "bmi").unwrap().clearance,
        Classification::Restricted
    );
    assert!(set.ministry("DE", "nope").is_none());
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct VectorFile {
    case: Vec<Case>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Case {
    name: String,
    state: String,
    ministry: String,
    clearance: Option<Classification>,
    classification: Classification,
    model: String,
    candidates: Option<Vec<String>>,
    allowed: Vec<String>,
    #[serde(default)]
    denied: BTreeMap<String, Vec<String>>,
    deny_reasons: Option<Vec<String>>,
}

#[test]
fn test_vectors() {
    let dir = shipped_dir();
    let set = PolicySet::load(&dir, &test_pools()).unwrap();
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir.join("tests"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .filter(|p| p.file_name().is_some_and(|n| n != "pools.toml"))
        .collect();
    files.sort();
    let mut cases = 0;
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        let vf: VectorFile =
            toml::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        for c in vf.case {
            cases += 1;
            let at = format!("{}: {}", file.display(), c.name);
            let clearance = c.clearance.unwrap_or_else(|| {
                set.ministry(&c.state, &c.ministry)
                    .map_or(Classification::Restricted, |m| m.clearance)
            });
            let d = set.decide(&DecisionRequest {
                state: &c.state,
                ministry: &c.ministry,
                clearance,
                classification: c.classification,
                model: &c.model,
            });
            assert_eq!(d.policy_hash, set.hash());
            if let Some(want) = &c.candidates {
                let got: Vec<&str> = d.candidates.iter().map(|c| c.pool.as_str()).collect();
                assert_eq!(&got, want, "{at}: candidates");
            }
            let allowed: Vec<&str> = d.allowed().map(|c| c.pool.as_str()).collect();
            assert_eq!(allowed, c.allowed, "{at}: allowed");
            for a in d.allowed() {
                assert_eq!(
                    a.policy_ids,
                    vec![format!("{}/permit", c.state.to_ascii_lowercase())],
                    "{at}"
                );
                assert!(a.reasons.is_empty(), "{at}");
            }
            for (pool, reasons) in &c.denied {
                let cand = d
                    .candidates
                    .iter()
                    .find(|x| &x.pool == pool)
                    .unwrap_or_else(|| panic!("{at}: {pool} is not a candidate"));
                assert!(!cand.allowed, "{at}: {pool} allowed");
                assert_eq!(&cand.reasons, reasons, "{at}: reasons for {pool}");
                assert_eq!(
                    cand.policy_ids.len(),
                    reasons.len(),
                    "{at}: {:?}",
                    cand.policy_ids
                );
            }
            if let Some(want) = &c.deny_reasons {
                assert_eq!(&d.deny_reasons(), want, "{at}: deny_reasons");
            }
        }
    }
    assert!(cases >= 12, "only {cases} test vectors");
}

#[test]
fn unknown_state_and_unknown_model_are_denied() {
    let dir = temp_copy("unknown", &["de"]);
    let set = PolicySet::load(&dir, &test_pools()).unwrap();
    let d = set.decide(&DecisionRequest {
        state: "FR",
        ministry: "minint",
        clearance: Classification::Restricted,
        classification: Classification::Public,
        model: "eurollm-9b",
    });
    assert!(d.candidates.is_empty());
    assert_eq!(d.deny_reasons(), vec![STATE_NOT_LOADED.to_string()]);
    let d = set.decide(&DecisionRequest {
        state: "DE",
        ministry: "bmvg",
        clearance: Classification::Restricted,
        classification: Classification::Public,
        model: "gpt-9",
    });
    assert_eq!(d.allowed().count(), 0);
    assert_eq!(d.deny_reasons()[0], "model_not_served_by_pool");
}

fn load_err(dir: &Path) -> PolicyError {
    PolicySet::load(dir, &test_pools()).expect_err("admission should fail")
}

#[test]
fn rejects_policy_not_scoped_to_its_state() {
    let dir = temp_copy("scope", &["de", "fr"]);
    edit(
        &dir,
        "de.cedar",
        "forbid (principal in State::\"DE\", action == Action::\"process\", resource)\nwhen { context.classification == \"internal\"",
        "forbid (principal in State::\"FR\", action == Action::\"process\", resource)\nwhen { context.classification == \"internal\"",
    );
    let e = load_err(&dir);
    let msg = e.to_string();
    assert!(
        matches!(&e, PolicyError::Policy { policy, .. } if policy == "de/internal-countries"),
        "{msg}"
    );
    assert!(
        msg.contains("de.cedar") && msg.contains("not scoped"),
        "{msg}"
    );

    let dir = temp_copy("unscoped", &["de"]);
    edit(
        &dir,
        "de.cedar",
        "permit (principal in State::\"DE\",",
        "permit (principal,",
    );
    let msg = load_err(&dir).to_string();
    assert!(
        msg.contains("de/permit") && msg.contains("not scoped"),
        "{msg}"
    );
}

#[test]
fn rejects_schema_violation() {
    let dir = temp_copy("schema", &["de"]);
    edit(
        &dir,
        "de.cedar",
        "resource.country != \"DE\"",
        "resource.colour != \"DE\"",
    );
    let e = load_err(&dir);
    let msg = e.to_string();
    assert!(
        matches!(&e, PolicyError::Policy { policy, .. } if policy == "de/restricted-home-country"),
        "{msg}"
    );
    assert!(
        msg.contains("de.cedar") && msg.contains("schema validation"),
        "{msg}"
    );
}

#[test]
fn rejects_permit_that_lets_restricted_leave_the_country() {
    let dir = temp_copy("leak", &["de", "fr"]);
    edit(
        &dir,
        "de.cedar",
        "when { context.classification == \"restricted\" && resource.country != \"DE\" }",
        "when { context.classification == \"restricted\" && resource.country == \"XX\" }",
    );
    let e = load_err(&dir);
    let msg = e.to_string();
    match &e {
        PolicyError::Invariant {
            file,
            policy,
            counterexample,
            ..
        } => {
            assert!(file.ends_with("de.cedar"), "{msg}");
            assert_eq!(policy, "de/permit");
            assert_eq!(counterexample.state, "DE");
            assert_eq!(counterexample.classification, Classification::Restricted);
            assert_ne!(counterexample.country, "DE");
        }
        other => panic!("expected an invariant violation, got {other}"),
    }
    assert!(
        msg.contains("restricted countries = [DE]") && msg.contains("pool "),
        "{msg}"
    );
}

#[test]
fn rejects_weakened_baseline() {
    let dir = temp_copy("baseline", &["de"]);
    edit(
        &dir,
        "eu-baseline.cedar",
        "unless { resource.eu };",
        "unless { true };",
    );
    edit(
        &dir,
        "eu-baseline.cedar",
        "when { resource.jurisdiction != \"EU\" };",
        "when { false };",
    );
    let e = load_err(&dir);
    assert!(
        matches!(&e, PolicyError::Invariant { invariant, .. } if invariant.starts_with("pool_in_eu")),
        "{e}"
    );
}

#[test]
fn rejects_forbid_without_reason() {
    let dir = temp_copy("reason", &["de"]);
    edit(
        &dir,
        "de.cedar",
        "@reason(\"internal_country_not_listed\")\n",
        "",
    );
    let msg = load_err(&dir).to_string();
    assert!(
        msg.contains("de/internal-countries") && msg.contains("@reason"),
        "{msg}"
    );
}

#[test]
fn rejects_bad_files() {
    let dir = temp_copy("parse", &["de"]);
    edit(
        &dir,
        "de.cedar",
        "resource.country != \"DE\" };",
        "resource.country != \"DE\" ;",
    );
    let e = load_err(&dir);
    assert!(
        matches!(&e, PolicyError::Parse { line, .. } if *line > 1),
        "{e:?}"
    );

    let dir = temp_copy("unknown-file", &["de"]);
    std::fs::write(dir.join("ch.cedar"), "").unwrap();
    assert!(matches!(load_err(&dir), PolicyError::UnknownFile { name, .. } if name == "ch.cedar"));

    let dir = temp_copy("pair", &["de"]);
    std::fs::remove_file(dir.join("de.routing.toml")).unwrap();
    assert!(
        matches!(load_err(&dir), PolicyError::Missing { name, .. } if name == "de.routing.toml")
    );

    let dir = temp_copy("routing", &["de"]);
    edit(
        &dir,
        "de.routing.toml",
        "[invariants]\nrestricted = [\"DE\"]",
        "[invariants]\nrestricted = [\"DE\", \"AT\"]",
    );
    let msg = load_err(&dir).to_string();
    assert!(
        msg.contains("de.routing.toml") && msg.contains("invariants.restricted"),
        "{msg}"
    );

    let dir = temp_copy("routing-order", &["de"]);
    edit(
        &dir,
        "de.routing.toml",
        "[routing]\nrestricted = [\"DE\"]",
        "[routing]\nrestricted = [\"DE\", \"FR\"]",
    );
    let msg = load_err(&dir).to_string();
    assert!(msg.contains("routing.restricted lists `FR`"), "{msg}");

    assert!(matches!(
        load_err(Path::new("/nonexistent/policies")),
        PolicyError::ReadDir { .. }
    ));
}

#[test]
fn reload_keeps_last_good_set_and_swaps_good_ones() {
    let dir = temp_copy("reload", &["de", "nl"]);
    let store = PolicyStore::new(dir.clone(), Arc::new(test_pools())).unwrap();
    let first = store.hash();
    let req = DecisionRequest {
        state: "DE",
        ministry: "bmi",
        clearance: Classification::Restricted,
        classification: Classification::Restricted,
        model: "eurollm-9b",
    };
    let d1 = store.decide(&req);
    assert!(
        Arc::ptr_eq(&d1, &store.decide(&req)),
        "second decision should be cached"
    );
    assert_eq!(d1.policy_hash, first);

    // A bad change is refused; the old set keeps deciding.
    edit(
        &dir,
        "de.cedar",
        "@reason(\"internal_country_not_listed\")\n",
        "",
    );
    assert!(store.reload().is_err());
    assert_eq!(store.hash(), first);
    assert_eq!(store.decide(&req).allowed().count(), 1);

    // A good change is admitted and swapped in; the cache does not serve stale answers.
    edit(
        &dir,
        "de.cedar",
        "@id(\"de/internal-countries\")\n",
        "@id(\"de/internal-countries\")\n@reason(\"internal_country_not_listed\")\n",
    );
    edit(
        &dir,
        "de.routing.toml",
        "internal = [\"DE\", \"AT\", \"NL\", \"FR\"]\npublic",
        "internal = [\"DE\", \"AT\", \"NL\", \"FR\"]\n# reviewed\npublic",
    );
    let second = store.reload().unwrap();
    assert_ne!(second, first);
    assert_eq!(store.hash(), second);
    let d2 = store.decide(&req);
    assert_eq!(d2.policy_hash, second);
    assert!(!Arc::ptr_eq(&d1, &d2));
    // Reloading an unchanged directory keeps the hash.
    assert_eq!(store.reload().unwrap(), second);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watcher_reloads_on_change() {
    let dir = temp_copy("watch", &["de"]);
    let store = Arc::new(PolicyStore::new(dir.clone(), Arc::new(test_pools())).unwrap());
    let first = store.hash();
    let handle = spawn_watcher(Arc::clone(&store), Duration::from_millis(50));
    edit(&dir, "de.cedar", "// Germany", "// Germany (edited)");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while store.hash() == first {
        assert!(
            tokio::time::Instant::now() < deadline,
            "watcher did not reload"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(store.hash(), dir_hash(&dir).unwrap());
    handle.abort();
}
