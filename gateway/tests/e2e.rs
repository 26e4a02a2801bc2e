//! End to end: the real `sovctl demo` federation (gateway + four SmolLM2 workers in DE,
//! DE, FR, IT on loopback), called with curl, the official `openai` Python package and
//! the async-openai crate. One federation serves every scenario in order; the failover
//! scenarios that kill a worker come last.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::time::{Duration, Instant};

use common::*;
use gateway::auth::{MintClaims, load_state_keys};
use gateway::domain::Classification;

#[test]
fn federation_end_to_end() {
    let mut demo = Demo::start("e2e");
    let t0 = Instant::now();
    routing_table(&demo);
    eprintln!("routing table: {:?}", t0.elapsed());
    models_listing(&demo);
    streaming_and_headers(&demo);
    bodies(&demo);
    client_disconnect_cancels(&demo);
    openai_python(&demo);
    async_openai_client(&demo);
    policy_hot_reload(&demo);
    failover(&demo);
    let status = demo.stop();
    assert!(status.success(), "demo exit status after Ctrl-C: {status}");
    audit_after_traffic(&demo);
    tls_demo();
}

/// The demo's audit log after all that traffic: intact, every served request has a
/// verifiable receipt and an inclusion proof, prompts are provable by their ministry.
fn audit_after_traffic(demo: &Demo) {
    let audit = demo.json["audit_dir"].as_str().unwrap().to_string();
    let key = demo.json["audit_key"].as_str().unwrap().to_string();
    let sovctl = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_sovctl"))
            .args(args)
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let (code, out) = sovctl(&["audit", "verify", &audit, "--key", &key]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("intact"), "{out}");
    // Every served request (200) has a decision record before its completion record,
    // refusals have a deny record; no prompt text anywhere in the log.
    let records =
        gateway::audit::read_records(std::path::Path::new(&audit), &Default::default()).unwrap();
    let decisions = records
        .iter()
        .filter(|r| r.phase == gateway::audit::Phase::Decision)
        .count();
    let completions = records
        .iter()
        .filter(|r| r.phase == gateway::audit::Phase::Completion)
        .count();
    assert!(
        decisions >= 20 && completions >= 15,
        "{decisions} decisions, {completions} completions"
    );
    let denies = records
        .iter()
        .filter(|r| r.decision == Some(gateway::audit::Decision::Deny))
        .count();
    assert!(denies >= 4, "refusals are audited: {denies}");
    for dir in ["DE", "FR", "IT"] {
        let text = std::fs::read_dir(std::path::Path::new(&audit).join(dir))
            .unwrap()
            .filter_map(|e| std::fs::read_to_string(e.unwrap().path()).ok())
            .collect::<String>();
        for secret in [
            "Nenne drei Flüsse",
            "Bonjour",
            "Der Bundestag tagt",
            "history of Rome",
        ] {
            assert!(!text.contains(secret), "prompt text in the {dir} audit log");
        }
    }
    // The ministry can prove what it sent (openai_client.py's first prompt).
    let prompt = demo.dir.join("prompt.txt");
    std::fs::write(&prompt, "Nenne drei Flüsse in Deutschland.").unwrap();
    let hmac = demo.json["audit_hmac_keys"]["DE"]
        .as_str()
        .unwrap()
        .to_string();
    let (code, out) = sovctl(&[
        "audit",
        "check-prompt",
        &audit,
        "--key",
        &hmac,
        "--text",
        prompt.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("bmi"), "{out}");
    // A receipt from a served request verifies offline, and its request has a proof.
    let r = curl(
        "POST",
        &format!("{}/chat/completions", demo.url),
        Some(&demo.token("DE", "bmi")),
        &[],
        Some(&chat_body(&demo.model(), "x", 1, false)),
        &[],
    );
    assert_eq!(r.status, 0, "the demo is stopped");
    let receipt = demo.dir.join("receipt.txt");
    let saved = std::fs::read_to_string(demo.dir.join("last-receipt.txt"))
        .expect("a receipt saved during the run");
    std::fs::write(&receipt, saved.trim()).unwrap();
    let (code, out) = sovctl(&[
        "receipt",
        "verify",
        receipt.to_str().unwrap(),
        "--key",
        &key,
    ]);
    assert_eq!(code, 0, "{out}");
    let rid = std::fs::read_to_string(demo.dir.join("last-receipt-request-id.txt")).unwrap();
    assert!(out.contains(rid.trim()), "{out}");
    let (code, out) = sovctl(&[
        "audit",
        "prove",
        "--dir",
        &audit,
        "--request-id",
        rid.trim(),
    ]);
    assert_eq!(code, 0, "{out}");
    let proof = demo.dir.join("proof.json");
    std::fs::write(&proof, &out).unwrap();
    let (code, out2) = sovctl(&[
        "audit",
        "verify-proof",
        proof.to_str().unwrap(),
        "--key",
        &key,
    ]);
    assert_eq!(code, 0, "{out}\n{out2}");
    // A receipt checked against another key fails.
    let other = demo.dir.join("other");
    let (code, out) = sovctl(&["audit", "keygen", "--out", other.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}");
    let other_key = std::fs::read_dir(&other)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "vkey" || e == "pub"))
        .expect("a public key file");
    let (code, _) = sovctl(&[
        "receipt",
        "verify",
        receipt.to_str().unwrap(),
        "--key",
        other_key.to_str().unwrap(),
    ]);
    assert_eq!(code, 1);
}

/// The demo with `--tls`: HTTPS with HTTP/1.1 and h2 (ALPN), verified against the demo
/// CA from demo.json, with curl and the openai package.
fn tls_demo() {
    let mut demo = Demo::start_with("e2e-tls", &["--tls", "--policy-reload-secs", "0"]);
    assert!(demo.url.starts_with("https://127.0.0.1:"), "{}", demo.url);
    let ca = demo.json["ca_cert"]
        .as_str()
        .expect("ca_cert in demo.json")
        .to_string();
    let body = chat_body(&demo.model(), "Hallo", 3, false);
    for (flag, version) in [("--http1.1", "HTTP/1.1"), ("--http2", "HTTP/2")] {
        let r = curl(
            "POST",
            &format!("{}/chat/completions", demo.url),
            Some(&demo.token("DE", "bmi")),
            &[("x-data-classification", "restricted")],
            Some(&body),
            &[flag, "--cacert", &ca],
        );
        assert_eq!(r.status, 200, "{flag}: {}", r.body);
        assert_eq!(r.header("x-residency-country"), Some("DE"));
        assert!(
            r.status_line.starts_with(version),
            "{flag}: {}",
            r.status_line
        );
    }
    // Without the CA the certificate is refused (curl exit, no HTTP status).
    let r = curl(
        "GET",
        &format!("{}/models", demo.url),
        Some(&demo.token("DE", "bmi")),
        &[],
        None,
        &[],
    );
    assert_eq!(r.status, 0, "an unknown CA must fail the TLS handshake");
    let token_file = demo.dir.join("tokens/it-mef.jwt");
    let out = std::process::Command::new("python3")
        .env("SSL_CERT_FILE", &ca)
        .args(["-c", "import openai,sys; c = openai.OpenAI(base_url=sys.argv[1], api_key=open(sys.argv[2]).read().strip(), max_retries=0); print(c.chat.completions.create(model=sys.argv[3], messages=[{'role': 'user', 'content': 'Ciao'}], max_tokens=3).usage.completion_tokens)"])
        .arg(&demo.url)
        .arg(&token_file)
        .arg(demo.model())
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "3");
    sighup_reload(&demo);
    assert!(demo.stop().success());
}

/// With polling off, a policy change takes effect on SIGHUP only.
fn sighup_reload(demo: &Demo) {
    let admin = demo.json["admin_url"].as_str().unwrap().to_string();
    let hash = || {
        http_get(&admin, "/admin/policy-hash")
            .and_then(|(_, b)| serde_json::from_str::<serde_json::Value>(&b).ok())
            .and_then(|v| v["policy_hash"].as_str().map(str::to_string))
            .unwrap()
    };
    let before = hash();
    let file = demo.dir.join("policies/fr.cedar");
    let original = std::fs::read_to_string(&file).unwrap();
    std::fs::write(&file, format!("{original}\n// amended\n")).unwrap();
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        hash(),
        before,
        "no reload without SIGHUP when polling is off"
    );
    let pid = demo.json["gateway_pid"].as_u64().unwrap() as i32;
    unsafe {
        libc::kill(pid, libc::SIGHUP);
    }
    wait_for("the SIGHUP reload", Duration::from_secs(15), || {
        hash() != before
    });
}

/// One row of the routing table.
struct Case {
    name: &'static str,
    state: &'static str,
    ministry: &'static str,
    classification: Option<&'static str>,
    model: Option<&'static str>,
    status: u16,
    code_or_pool: &'static str,
}

fn routing_table(demo: &Demo) {
    let cases = [
        Case {
            name: "DE restricted stays in the certified DE pool",
            state: "DE",
            ministry: "bmi",
            classification: Some("restricted"),
            model: None,
            status: 200,
            code_or_pool: "de-fra-1",
        },
        Case {
            name: "DE internal goes to the first DE pool (by id)",
            state: "DE",
            ministry: "bmf",
            classification: Some("internal"),
            model: None,
            status: 200,
            code_or_pool: "de-ber-1",
        },
        Case {
            name: "DE public defaults from the token",
            state: "DE",
            ministry: "bmbf",
            classification: None,
            model: None,
            status: 200,
            code_or_pool: "de-ber-1",
        },
        Case {
            name: "FR restricted stays in FR",
            state: "FR",
            ministry: "minint",
            classification: Some("restricted"),
            model: None,
            status: 200,
            code_or_pool: "fr-par-1",
        },
        Case {
            name: "FR internal",
            state: "FR",
            ministry: "bercy",
            classification: Some("internal"),
            model: None,
            status: 200,
            code_or_pool: "fr-par-1",
        },
        Case {
            name: "IT restricted stays in IT",
            state: "IT",
            ministry: "interno",
            classification: Some("restricted"),
            model: None,
            status: 200,
            code_or_pool: "it-mil-1",
        },
        Case {
            name: "IT public",
            state: "IT",
            ministry: "mim",
            classification: Some("public"),
            model: None,
            status: 200,
            code_or_pool: "it-mil-1",
        },
        Case {
            name: "above clearance",
            state: "DE",
            ministry: "bmbf",
            classification: Some("restricted"),
            model: None,
            status: 403,
            code_or_pool: "classification_above_clearance",
        },
        Case {
            name: "internal above a public clearance",
            state: "FR",
            ministry: "menj",
            classification: Some("internal"),
            model: None,
            status: 403,
            code_or_pool: "classification_above_clearance",
        },
        Case {
            name: "model the ministry may not use",
            state: "DE",
            ministry: "aa",
            classification: Some("restricted"),
            model: None,
            status: 403,
            code_or_pool: "residency_denied",
        },
        Case {
            name: "model no pool serves",
            state: "DE",
            ministry: "bmi",
            classification: Some("public"),
            model: Some("eurollm-9b"),
            status: 404,
            code_or_pool: "model_not_found",
        },
        Case {
            name: "unknown classification",
            state: "IT",
            ministry: "mef",
            classification: Some("secret"),
            model: None,
            status: 400,
            code_or_pool: "invalid_classification",
        },
    ];
    let model = demo.model();
    for c in &cases {
        let token = demo.token(c.state, c.ministry);
        let mut headers = Vec::new();
        if let Some(cl) = c.classification {
            headers.push(("x-data-classification", cl));
        }
        let body = chat_body(c.model.unwrap_or(&model), "Say hello.", 4, false);
        let r = curl(
            "POST",
            &format!("{}/chat/completions", demo.url),
            Some(&token),
            &headers,
            Some(&body),
            &[],
        );
        assert_eq!(r.status, c.status, "{}: {} {}", c.name, r.status, r.body);
        assert!(
            r.header("x-request-id").is_some(),
            "{}: no x-request-id",
            c.name
        );
        if c.status == 200 {
            assert_eq!(
                r.header("x-residency-pool"),
                Some(c.code_or_pool),
                "{}",
                c.name
            );
            let receipt = r
                .header("x-residency-receipt")
                .expect("served responses carry a receipt");
            std::fs::write(demo.dir.join("last-receipt.txt"), receipt).unwrap();
            std::fs::write(
                demo.dir.join("last-receipt-request-id.txt"),
                r.header("x-request-id").unwrap(),
            )
            .unwrap();
            let country = demo.pool(c.code_or_pool)["country"]
                .as_str()
                .unwrap()
                .to_string();
            assert_eq!(
                r.header("x-residency-country"),
                Some(country.as_str()),
                "{}",
                c.name
            );
            let j = r.json();
            assert_eq!(j["object"], "chat.completion", "{}", c.name);
            assert!(
                j["usage"]["completion_tokens"].as_u64().unwrap() >= 1,
                "{}",
                c.name
            );
        } else {
            assert_eq!(r.error_code(), c.code_or_pool, "{}: {}", c.name, r.body);
            assert!(
                r.header("x-residency-pool").is_none(),
                "{}: a refused request names no pool",
                c.name
            );
        }
    }
    // The denial names its policy reason.
    let r = curl(
        "POST",
        &format!("{}/chat/completions", demo.url),
        Some(&demo.token("DE", "aa")),
        &[("x-data-classification", "restricted")],
        Some(&chat_body(&model, "x", 2, false)),
        &[],
    );
    assert!(
        r.body.contains("model_not_allowed_for_ministry"),
        "{}",
        r.body
    );

    // Authentication failures: 401 with the reason code.
    let keys = demo.dir.join("keys");
    let de = load_state_keys(&keys, &"DE".parse().unwrap()).unwrap();
    let fr = load_state_keys(&keys, &"FR".parse().unwrap()).unwrap();
    let claims = MintClaims {
        state: "DE".into(),
        ministry: "bmi".into(),
        clearance: Classification::Restricted,
        classification: None,
        roles: vec![],
        subject: None,
    };
    let good = de.mint(&claims, Duration::from_secs(60)).unwrap();
    let mut expired = de.claims_json(&claims, Duration::from_secs(60));
    expired["exp"] = serde_json::json!(1_000_000_000);
    let mut wrong_aud = de.claims_json(&claims, Duration::from_secs(60));
    wrong_aud["aud"] = serde_json::json!("someone-else");
    let mut claims_fr = fr.claims_json(&claims, Duration::from_secs(60)); // FR's IdP claims DE
    claims_fr["state"] = serde_json::json!("DE");
    let tampered = {
        let mut parts: Vec<String> = good.split('.').map(str::to_string).collect();
        let sig = parts[2].clone();
        let flipped = if sig.starts_with('A') { "B" } else { "A" };
        parts[2] = format!("{flipped}{}", &sig[1..]);
        parts.join(".")
    };
    let none = gateway::auth::forge_token(
        &serde_json::json!({"alg": "none", "typ": "JWT"}),
        &de.claims_json(&claims, Duration::from_secs(60)),
        "",
    );
    let auth_cases: Vec<(&str, Option<String>, &str)> = vec![
        ("no token", None, "missing_token"),
        ("alg none", Some(none), "unsupported_algorithm"),
        ("bad signature", Some(tampered), "bad_signature"),
        (
            "expired",
            Some(de.mint_raw(de.header(), &expired).unwrap()),
            "token_expired",
        ),
        (
            "wrong audience",
            Some(de.mint_raw(de.header(), &wrong_aud).unwrap()),
            "wrong_audience",
        ),
        (
            "state A signs for state B",
            Some(fr.mint_raw(fr.header(), &claims_fr).unwrap()),
            "state_mismatch",
        ),
    ];
    for (name, token, code) in auth_cases {
        let r = curl(
            "POST",
            &format!("{}/chat/completions", demo.url),
            token.as_deref(),
            &[],
            Some(&chat_body(&model, "x", 2, false)),
            &[],
        );
        assert_eq!(
            (r.status, r.error_code().as_str()),
            (401, code),
            "{name}: {}",
            r.body
        );
    }
}

fn models_listing(demo: &Demo) {
    let model = demo.model();
    let r = curl(
        "GET",
        &format!("{}/models", demo.url),
        Some(&demo.token("IT", "mef")),
        &[],
        None,
        &[],
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let ids: Vec<String> = r.json()["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids, vec![model.clone()]);
    // DE's `aa` may not use the demo model: it is not listed.
    let r = curl(
        "GET",
        &format!("{}/models", demo.url),
        Some(&demo.token("DE", "aa")),
        &[],
        None,
        &[],
    );
    assert_eq!(r.json()["data"].as_array().unwrap().len(), 0, "{}", r.body);
    let r = curl("GET", &format!("{}/models", demo.url), None, &[], None, &[]);
    assert_eq!(r.status, 401);
}

fn streaming_and_headers(demo: &Demo) {
    let model = demo.model();
    for http2 in [false, true] {
        let extra: &[&str] = if http2 {
            &["--http2-prior-knowledge"]
        } else {
            &["--http1.1"]
        };
        let r = curl(
            "POST",
            &format!("{}/chat/completions", demo.url),
            Some(&demo.token("FR", "minint")),
            &[("x-data-classification", "restricted")],
            Some(
                &serde_json::to_vec(
                    &serde_json::json!({"model": model, "stream": true, "max_tokens": 8,
                "temperature": 0, "stream_options": {"include_usage": true},
                "messages": [{"role": "user", "content": "Bonjour !"}]}),
                )
                .unwrap(),
            ),
            extra,
        );
        assert_eq!(r.status, 200, "h2={http2}: {}", r.body);
        assert_eq!(r.header("x-residency-pool"), Some("fr-par-1"));
        assert_eq!(r.header("x-residency-country"), Some("FR"));
        assert!(
            r.header("content-type")
                .unwrap()
                .starts_with("text/event-stream")
        );
        let events: Vec<&str> = r
            .body
            .lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .collect();
        assert_eq!(events.last(), Some(&"[DONE]"), "{}", r.body);
        let chunks: Vec<serde_json::Value> = events[..events.len() - 1]
            .iter()
            .map(|e| serde_json::from_str(e).unwrap())
            .collect();
        assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
        let usage = chunks.last().unwrap()["usage"].clone();
        let finish: Vec<_> = chunks
            .iter()
            .filter_map(|c| c["choices"][0]["finish_reason"].as_str())
            .collect();
        assert_eq!(finish.len(), 1, "one final chunk");
        let n = usage["completion_tokens"].as_u64().unwrap();
        match finish[0] {
            "length" => assert_eq!(n, 8, "{usage}"),
            "stop" => assert!((1..8).contains(&n), "{usage}"),
            other => panic!("finish_reason {other}"),
        }
        let text: String = chunks
            .iter()
            .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
            .collect();
        assert!(!text.is_empty());
    }
    // Text completions, not streamed.
    let r = curl("POST", &format!("{}/completions", demo.url), Some(&demo.token("IT", "mef")), &[],
        Some(&serde_json::to_vec(&serde_json::json!({"model": model, "prompt": "Roma è", "max_tokens": 5, "temperature": 0})).unwrap()), &[]);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["object"], "text_completion");
    assert_eq!(r.json()["usage"]["completion_tokens"], 5);
}

fn bodies(demo: &Demo) {
    let model = demo.model();
    let token = demo.token("DE", "bmf");
    // Over pingora's 64 KiB retry buffer: answered (here: the prompt exceeds the
    // model's context, a 400 from the worker relayed as is) within seconds.
    let big = "Der Bundestag tagt. ".repeat(5000); // ~100 KiB
    let started = Instant::now();
    let r = curl(
        "POST",
        &format!("{}/chat/completions", demo.url),
        Some(&token),
        &[],
        Some(&chat_body(&model, &big, 4, false)),
        &[],
    );
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "took {:?}",
        started.elapsed()
    );
    assert_eq!(
        (r.status, r.error_code().as_str()),
        (400, "context_length_exceeded"),
        "{}",
        &r.body[..r.body.len().min(300)]
    );
    // A 100 KiB body that fits the context once tokenized? Whitespace-heavy JSON.
    let mut padded = serde_json::json!({"model": model, "max_tokens": 3, "temperature": 0,
        "messages": [{"role": "user", "content": "Hallo"}]})
    .to_string();
    padded.insert_str(1, &" ".repeat(100 * 1024));
    let r = curl(
        "POST",
        &format!("{}/chat/completions", demo.url),
        Some(&token),
        &[],
        Some(padded.as_bytes()),
        &[],
    );
    assert_eq!(r.status, 200, "{}", r.body);
    // Over the 4 MiB limit: 413.
    let huge = vec![b' '; 4 * 1024 * 1024 + 1];
    let r = curl(
        "POST",
        &format!("{}/chat/completions", demo.url),
        Some(&token),
        &[],
        Some(&huge),
        &[],
    );
    assert_eq!(
        (r.status, r.error_code().as_str()),
        (413, "request_too_large"),
        "{}",
        r.body
    );
    // Malformed JSON.
    let r = curl(
        "POST",
        &format!("{}/chat/completions", demo.url),
        Some(&token),
        &[],
        Some(b"{\"model\": "),
        &[],
    );
    assert_eq!(
        (r.status, r.error_code().as_str()),
        (400, "invalid_json"),
        "{}",
        r.body
    );
}

/// The worker's running count from its /health.
fn running(worker_http: &str) -> u64 {
    http_get(worker_http, "/health")
        .and_then(|(_, b)| serde_json::from_str::<serde_json::Value>(&b).ok())
        .and_then(|v| v["running"].as_u64())
        .unwrap_or(u64::MAX)
}

fn client_disconnect_cancels(demo: &Demo) {
    let model = demo.model();
    let worker = demo.pool("it-mil-1")["worker_http"]
        .as_str()
        .unwrap()
        .to_string();
    let addr = demo
        .url
        .trim_start_matches("http://")
        .split('/')
        .next()
        .unwrap()
        .to_string();
    for stream in [true, false] {
        wait_for("idle IT worker", Duration::from_secs(30), || {
            running(&worker) == 0
        });
        let body = serde_json::to_vec(&serde_json::json!({"model": model, "stream": stream, "max_tokens": 900,
            "ignore_eos": true,
            "messages": [{"role": "user", "content": "Write a very long story about the history of Rome, with many chapters."}]})).unwrap();
        let mut s = std::net::TcpStream::connect(&addr).unwrap();
        write!(s, "POST /v1/chat/completions HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
            demo.token("IT", "mim"), body.len()).unwrap();
        s.write_all(&body).unwrap();
        wait_for(
            "the request to run on the IT worker",
            Duration::from_secs(30),
            || running(&worker) == 1,
        );
        if stream {
            // Read a few events first.
            let mut r = BufReader::new(s.try_clone().unwrap());
            let mut line = String::new();
            let mut events = 0;
            while events < 3 {
                line.clear();
                r.read_line(&mut line).unwrap();
                if line.starts_with("data: ") {
                    events += 1;
                }
            }
        }
        drop(s);
        let gone = Instant::now();
        wait_for(
            "the worker to free the sequence",
            Duration::from_secs(5),
            || running(&worker) == 0,
        );
        eprintln!(
            "stream={stream}: sequence freed {:?} after the client left",
            gone.elapsed()
        );
    }
}

fn openai_python(demo: &Demo) {
    let script = repo_root().join("gateway/tests/openai_client.py");
    let token_file = demo.json["ministries"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["state"] == "DE" && m["ministry"] == "bmi")
        .unwrap()["token_file"]
        .as_str()
        .unwrap()
        .to_string();
    let out = std::process::Command::new("python3")
        .arg(&script)
        .args([&demo.url, &token_file, &demo.model()])
        .output()
        .expect("python3 runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "openai client failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value =
        serde_json::from_str(stdout.lines().last().unwrap_or("")).expect("JSON summary");
    assert_eq!(v["pool"], "de-fra-1", "{v}");
    assert_eq!(v["country"], "DE", "{v}");
    assert!(!v["text"].as_str().unwrap().is_empty(), "{v}");
    assert!(!v["stream_text"].as_str().unwrap().is_empty(), "{v}");
    assert_eq!(v["models"], serde_json::json!([demo.model()]), "{v}");
    assert_eq!(v["denied_status"], 403, "{v}");
    assert_eq!(v["denied_code"], "classification_above_clearance", "{v}");
}

fn async_openai_client(demo: &Demo) {
    use async_openai::config::OpenAIConfig;
    use async_openai::types::chat::{
        ChatCompletionRequestUserMessageArgs, CreateChatCompletionRequestArgs,
    };
    use futures::StreamExt;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let cfg = OpenAIConfig::new()
            .with_api_base(&demo.url)
            .with_api_key(demo.token("FR", "bercy"));
        let client = async_openai::Client::with_config(cfg);
        let req = CreateChatCompletionRequestArgs::default()
            .model(demo.model())
            .max_tokens(6u32)
            .temperature(0.0)
            .messages([ChatCompletionRequestUserMessageArgs::default()
                .content("Quelle est la capitale de la France ?")
                .build()
                .unwrap()
                .into()])
            .build()
            .unwrap();
        let resp = client
            .chat()
            .create(req.clone())
            .await
            .expect("chat completion");
        assert_eq!(resp.usage.as_ref().unwrap().completion_tokens, 6);
        let whole = resp.choices[0].message.content.clone().unwrap_or_default();
        let mut stream = client.chat().create_stream(req).await.expect("stream");
        let mut text = String::new();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.expect("chunk");
            if let Some(c) = chunk.choices.first().and_then(|c| c.delta.content.clone()) {
                text.push_str(&c);
            }
        }
        assert_eq!(text, whole, "greedy streamed text equals the whole answer");
    });
}

fn policy_hot_reload(demo: &Demo) {
    let admin = demo.json["admin_url"].as_str().unwrap().to_string();
    let hash = || {
        http_get(&admin, "/admin/policy-hash")
            .and_then(|(_, b)| serde_json::from_str::<serde_json::Value>(&b).ok())
            .and_then(|v| v["policy_hash"].as_str().map(str::to_string))
            .unwrap()
    };
    let before = hash();
    assert_eq!(before, demo.json["policy_hash"].as_str().unwrap());
    let file = demo.dir.join("policies/it.cedar");
    let original = std::fs::read_to_string(&file).unwrap();
    // A set that fails admission (a policy of IT's scoped to every principal) is refused.
    std::fs::write(
        &file,
        format!("{original}\n@id(\"it/bad\")\npermit (principal, action, resource);\n"),
    )
    .unwrap();
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(
        hash(),
        before,
        "a set failing the check must not become active"
    );
    // A good change is picked up.
    std::fs::write(&file, format!("{original}\n// reviewed\n")).unwrap();
    wait_for("the new policy hash", Duration::from_secs(15), || {
        hash() != before
    });
    let r = curl(
        "POST",
        &format!("{}/chat/completions", demo.url),
        Some(&demo.token("IT", "mef")),
        &[],
        Some(&chat_body(&demo.model(), "Ciao", 2, false)),
        &[],
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.header("x-policy-hash"), Some(hash().as_str()));
}

fn kill_worker(demo: &Demo, pool: &str) {
    let pid = demo.pool(pool)["worker_pids"][0].as_u64().unwrap() as i32;
    unsafe {
        libc::kill(pid, libc::SIGKILL);
    }
    std::thread::sleep(Duration::from_millis(300));
}

fn failover(demo: &Demo) {
    let model = demo.model();
    let ask = |state: &str, ministry: &str, class: &str| {
        curl(
            "POST",
            &format!("{}/chat/completions", demo.url),
            Some(&demo.token(state, ministry)),
            &[("x-data-classification", class)],
            Some(&chat_body(&model, "Hallo", 3, false)),
            &[],
        )
    };
    // DE's first internal pool goes down: the other DE pool takes over.
    kill_worker(demo, "de-ber-1");
    let r = ask("DE", "bmf", "internal");
    assert_eq!(
        (r.status, r.header("x-residency-pool")),
        (200, Some("de-fra-1")),
        "{}",
        r.body
    );
    // Both DE pools down: internal data may go to FR (DE's list), restricted data may not.
    kill_worker(demo, "de-fra-1");
    let r = ask("DE", "bmf", "internal");
    assert_eq!(
        (r.status, r.header("x-residency-pool")),
        (200, Some("fr-par-1")),
        "{}",
        r.body
    );
    assert_eq!(r.header("x-residency-country"), Some("FR"));
    let r = ask("DE", "bmi", "restricted");
    assert_eq!(
        (r.status, r.error_code().as_str()),
        (503, "no_allowed_pool_available"),
        "{}",
        r.body
    );
    assert!(r.header("retry-after").is_some());
    assert!(r.header("x-residency-pool").is_none());
}
