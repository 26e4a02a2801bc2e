//! `worker fake`: a benchmark stand-in that answers every request at once with fixed
//! tokens, over the same gRPC contract as a real worker and over OpenAI HTTP. It lets
//! the gateway benchmark measure the gateway itself (against nginx over an equally fast
//! HTTP upstream), not inference. Never used to serve users.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use bytes::{BufMut, Bytes, BytesMut};
use prost::Message;
use proto::openai::{Endpoint, ResponseMeta, UsageCounts};
use proto::worker as pb;

/// What the fake worker says about itself and how long its answers are.
#[derive(Debug, Clone)]
pub struct FakeConfig {
    pub model: String,
    pub pool: String,
    pub country: String,
    /// Tokens per answer.
    pub tokens: u32,
}

const WORDS: [&str; 8] = [
    " Sovereign",
    " inference",
    " stays",
    " where",
    " the",
    " law",
    " says",
    ".",
];

/// How many tokens the fake answers (both routes): the request's `max_tokens`, capped at
/// `--tokens`.
fn answer_tokens(cfg: &FakeConfig, max_tokens: Option<u64>) -> u32 {
    max_tokens.map_or(cfg.tokens, |m| m.min(u64::from(cfg.tokens)) as u32)
}

fn token_text(i: u32) -> &'static str {
    WORDS[i as usize % WORDS.len()]
}

/// The fake's gRPC side: the worker contract served over bare HTTP/2 (the `h2` crate).
///
/// Why not tonic, as in the real worker: the fake is the benchmark's upstream and must
/// cost about what nginx's upstream (the HTTP route below) costs, so that the benchmark
/// measures the gateway. Through tonic each Generate answer leaves in two `writev`s
/// (HEADERS + DATA, then the trailers from a later poll of the body), which wakes the
/// gateway twice and cost the fake ~25 us of CPU per request at concurrency 64. Here
/// HEADERS, the DATA frames with every message, and the trailers are queued together and
/// leave in one write. The wire format is plain gRPC, so tonic clients (the gateway's
/// load watcher) and the gateway's bare-h2 Generate client both talk to it.
pub async fn serve_grpc(listener: tokio::net::TcpListener, cfg: FakeConfig) -> std::io::Result<()> {
    let cfg = std::sync::Arc::new(Answers::new(cfg));
    loop {
        let (tcp, _) = listener.accept().await?;
        let _ = tcp.set_nodelay(true);
        let cfg = cfg.clone();
        tokio::spawn(async move {
            if let Err(e) = serve_connection(tcp, cfg).await {
                tracing::debug!(error = %e, "fake gRPC connection closed");
            }
        });
    }
}

/// The fixed Generate answers, encoded once: `by_max[m]` is the answer to a request for
/// at most `m` tokens. (The HTTP route's answer is as fixed; both routes still decode
/// each request to learn its `max_tokens`.)
struct Answers {
    cfg: FakeConfig,
    by_max: Vec<Bytes>,
}

impl Answers {
    fn new(cfg: FakeConfig) -> Self {
        let by_max = (0..=cfg.tokens)
            .map(|max| {
                let mut out = BytesMut::new();
                for chunk in generate_chunks(max) {
                    put_message(&mut out, &chunk);
                }
                out.freeze()
            })
            .collect();
        Self { cfg, by_max }
    }

    fn generate(&self, req: &pb::GenerateRequest) -> Bytes {
        let max = answer_tokens(
            &self.cfg,
            req.sampling
                .as_ref()
                .and_then(|s| s.max_tokens)
                .map(u64::from),
        );
        self.by_max[max as usize].clone()
    }
}

async fn serve_connection(
    tcp: tokio::net::TcpStream,
    cfg: std::sync::Arc<Answers>,
) -> Result<(), h2::Error> {
    let mut conn = h2::server::Builder::new()
        .initial_window_size(1 << 20)
        .initial_connection_window_size(1 << 24)
        .handshake::<_, Bytes>(tcp)
        .await?;
    while let Some(accepted) = conn.accept().await {
        let (req, respond) = accepted?;
        let cfg = cfg.clone();
        let mut answered = Box::pin(async move {
            if let Err(e) = answer(req, respond, &cfg).await {
                tracing::debug!(error = %e, "fake gRPC stream ended early");
            }
        });
        // A unary request's body has usually arrived with its headers: answer it here,
        // and spawn a task only for one that has to wait (a task per stream was a fifth
        // of the fake's CPU per request).
        if futures::FutureExt::now_or_never(answered.as_mut()).is_none() {
            tokio::spawn(answered);
        }
    }
    Ok(())
}

/// A message with gRPC's 5-byte prefix (uncompressed), appended to `out`.
fn put_message(out: &mut BytesMut, m: &impl Message) {
    let len = m.encoded_len();
    out.reserve(5 + len);
    out.put_u8(0);
    out.put_u32(len as u32);
    // Encoding into a BytesMut with enough room cannot fail.
    let _ = m.encode(out);
}

fn grpc_trailers(code: tonic::Code, message: &str) -> http::HeaderMap {
    let mut h = http::HeaderMap::new();
    h.insert("grpc-status", http::HeaderValue::from(code as i32));
    if let Ok(v) = http::HeaderValue::from_str(message)
        && !message.is_empty()
    {
        h.insert("grpc-message", v);
    }
    h
}

async fn answer(
    req: http::Request<h2::RecvStream>,
    mut respond: h2::server::SendResponse<Bytes>,
    answers: &Answers,
) -> Result<(), h2::Error> {
    let cfg = &answers.cfg;
    let path = req.uri().path().to_string();
    let mut body = req.into_body();
    let mut buf = BytesMut::new();
    while let Some(data) = body.data().await {
        let data = data?;
        let _ = body.flow_control().release_capacity(data.len());
        buf.extend_from_slice(&data);
    }
    // The request message (all of ours are unary requests), without its prefix.
    let msg = if buf.len() >= 5 && buf[0] == 0 {
        buf.split_off(5)
    } else {
        BytesMut::new()
    };
    let head = http::Response::builder()
        .status(http::StatusCode::OK)
        .header(http::header::CONTENT_TYPE, "application/grpc")
        .body(())
        .map_err(|_| h2::Error::from(h2::Reason::INTERNAL_ERROR))?;
    let mut out = BytesMut::new();
    let mut out = match path.rsplit('/').next().unwrap_or("") {
        "Generate" => {
            let req = pb::GenerateRequest::decode(msg.freeze()).unwrap_or_default();
            answers.generate(&req)
        }
        "Info" => {
            put_message(&mut out, &info(cfg));
            out.freeze()
        }
        "Drain" => {
            put_message(&mut out, &pb::DrainReply { remaining: 0 });
            out.freeze()
        }
        "WatchLoad" => {
            let mut send = respond.send_response(head, false)?;
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            loop {
                tokio::select! {
                    _ = tick.tick() => {
                        let mut one = BytesMut::new();
                        put_message(&mut one, &snapshot());
                        send.send_data(one.freeze(), false)?;
                    }
                    reset = futures::future::poll_fn(|cx| send.poll_reset(cx)) => {
                        let _ = reset?;
                        return Ok(());
                    }
                }
            }
        }
        other => {
            // Trailers-only: grpc-status in the response headers.
            let mut head = head;
            head.headers_mut().extend(grpc_trailers(
                tonic::Code::Unimplemented,
                &format!("no method {other}"),
            ));
            respond.send_response(head, true)?;
            return Ok(());
        }
    };
    let mut send = respond.send_response(head, false)?;
    // DATA frames under 256 bytes: h2 copies those into its write buffer, while a larger
    // payload is chained and must be flushed before the trailers can be encoded, which
    // would cost a second write.
    while !out.is_empty() {
        send.send_data(out.split_to(out.len().min(255)), false)?;
    }
    send.send_trailers(grpc_trailers(tonic::Code::Ok, ""))
}

/// The fixed answer of `max` tokens: one chunk per token, then the finish chunk with
/// usage.
fn generate_chunks(max: u32) -> Vec<pb::GenerateChunk> {
    let mut chunks: Vec<pb::GenerateChunk> = (0..max)
        .map(|i| pb::GenerateChunk {
            text: token_text(i).to_string(),
            token_ids: vec![i],
            finish_reason: String::new(),
            usage: None,
        })
        .collect();
    chunks.push(pb::GenerateChunk {
        text: String::new(),
        token_ids: Vec::new(),
        finish_reason: "length".into(),
        usage: Some(pb::Usage {
            prompt_tokens: 8,
            completion_tokens: max,
            cached_prompt_tokens: 0,
        }),
    });
    chunks
}

fn snapshot() -> pb::LoadSnapshot {
    pb::LoadSnapshot {
        queued: 0,
        running: 0,
        kv_blocks_used: 0,
        kv_blocks_total: 1024,
        draining: false,
        unix_ms: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0),
        prefix_cache_hit_rate: 0.0,
    }
}

fn info(cfg: &FakeConfig) -> pb::InfoReply {
    pb::InfoReply {
        model: cfg.model.clone(),
        pool: cfg.pool.clone(),
        country: cfg.country.clone(),
        context_length: 8192,
        kv_blocks_total: 1024,
        block_size: 16,
        max_running: 1024,
        max_queue: 1024,
        backend: "fake".into(),
        worker_version: env!("CARGO_PKG_VERSION").to_string(),
    }
}

/// The same fixed answer over OpenAI HTTP (non-streaming chat completions), for nginx.
pub fn http_router(cfg: FakeConfig) -> Router {
    let chat_cfg = cfg.clone();
    Router::new()
        .route(
            "/v1/chat/completions",
            post(move |body: axum::body::Bytes| {
                let cfg = chat_cfg.clone();
                async move {
                    let max = answer_tokens(
                        &cfg,
                        serde_json::from_slice::<serde_json::Value>(&body)
                            .ok()
                            .and_then(|v| v["max_tokens"].as_u64()),
                    );
                    let text: String = (0..max).map(token_text).collect();
                    let meta = ResponseMeta {
                        id: "chatcmpl-fake".into(),
                        created: 0,
                        model: cfg.model.clone(),
                        endpoint: Endpoint::Chat,
                    };
                    let usage = UsageCounts {
                        prompt_tokens: 8,
                        completion_tokens: u64::from(max),
                        cached_tokens: 0,
                    };
                    axum::Json(meta.completion(&text, "length", &usage)).into_response()
                }
            }),
        )
        .route(
            "/health",
            get(|| async { axum::Json(serde_json::json!({"status": "ok"})) }),
        )
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::worker::worker_client::WorkerClient;

    fn cfg() -> FakeConfig {
        FakeConfig {
            model: "fake".into(),
            pool: "de-fra-1".into(),
            country: "DE".into(),
            tokens: 8,
        }
    }

    /// A tonic client (as the gateway's load watcher uses) against the bare-h2 server:
    /// every method of the contract, and a clear status for one it does not have.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn tonic_clients_get_the_worker_contract() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(serve_grpc(listener, cfg()));
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut c = WorkerClient::new(channel.clone());

        let info = c.info(pb::InfoRequest {}).await.unwrap().into_inner();
        assert_eq!(
            (info.pool.as_str(), info.country.as_str()),
            ("de-fra-1", "DE")
        );
        assert_eq!(info.backend, "fake");

        // Generate: one chunk per token (max_tokens caps the fixed answer), then the
        // finish chunk with usage, then a clean end.
        for (max, want) in [(Some(5), 5), (None, 8), (Some(100), 8)] {
            let req = pb::GenerateRequest {
                sampling: Some(pb::SamplingParams {
                    max_tokens: max,
                    ..Default::default()
                }),
                ..Default::default()
            };
            let mut stream = c.generate(req).await.unwrap().into_inner();
            let mut chunks = Vec::new();
            while let Some(ch) = stream.message().await.unwrap() {
                chunks.push(ch);
            }
            assert_eq!(chunks.len(), want + 1, "max_tokens {max:?}");
            let text: String = chunks.iter().map(|c| c.text.as_str()).collect();
            assert_eq!(text, (0..want as u32).map(token_text).collect::<String>());
            let last = chunks.last().unwrap();
            assert_eq!(last.finish_reason, "length");
            assert_eq!(last.usage.as_ref().unwrap().completion_tokens, want as u32);
        }

        let mut load = c
            .watch_load(pb::WatchLoadRequest {})
            .await
            .unwrap()
            .into_inner();
        for _ in 0..2 {
            let snap = load.message().await.unwrap().expect("a snapshot");
            assert_eq!(snap.kv_blocks_total, 1024);
        }
        drop(load);
        assert_eq!(
            c.drain(pb::DrainRequest::default())
                .await
                .unwrap()
                .into_inner()
                .remaining,
            0
        );

        // An unknown method is UNIMPLEMENTED (a trailers-only answer), not a hang.
        let mut grpc = tonic::client::Grpc::new(channel);
        grpc.ready().await.unwrap();
        let err = grpc
            .unary(
                tonic::Request::new(pb::InfoRequest {}),
                http::uri::PathAndQuery::from_static("/sovereign.worker.v1.Worker/Nope"),
                tonic_prost::ProstCodec::<pb::InfoRequest, pb::InfoReply>::default(),
            )
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unimplemented, "{err}");
        server.abort();
    }
}
