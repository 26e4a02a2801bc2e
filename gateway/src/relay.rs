//! Relay: start a Generate stream on a worker of an allowed pool, then copy it to the
//! client as SSE or as one JSON body. Retries on another allowed worker happen only
//! before the first token; after it the response is committed. Dropping the gRPC
//! stream (client gone) cancels the worker's sequence.

use std::sync::Arc;

use bytes::Bytes;
use pingora::protocols::http::ServerSession;
use proto::openai::{ResponseMeta, UsageCounts};
use proto::worker as pb;

use crate::grpc_h2::{Chunk, GenerateStream};

use crate::error::ApiError;
use crate::policy::Candidate;
use crate::route::{InflightGuard, Router, WorkerHandle};
use crate::server::{response_header, write_json};

/// A worker stream that has produced its first chunk.
pub struct Started {
    pub pool: String,
    pub country: String,
    pub worker: Arc<WorkerHandle>,
    first: Option<Chunk>,
    stream: GenerateStream,
    _inflight: InflightGuard,
}

/// How a relay ended.
pub enum Relayed {
    /// Served; `text` is the whole completion (for the audit record's response HMAC,
    /// never logged).
    Done {
        usage: UsageCounts,
        text: String,
    },
    ClientGone,
    Failed(ApiError),
}

/// Tries the allowed pools in order and, within each, its available workers best
/// first, until one produces a first chunk. A request the worker rejects as invalid
/// (400) is returned at once; a worker that fails is skipped (and its breaker told).
pub async fn start(
    router: &Router,
    allowed: &[&Candidate],
    req: &pb::GenerateRequest,
    prefix_key: u64,
) -> Result<Started, ApiError> {
    let mut tried = 0usize;
    let mut last_error: Option<String> = None;
    for cand in allowed {
        for w in router.rank(&cand.pool, Some(prefix_key)) {
            tried += 1;
            let guard = w.start_request();
            let attempt = async {
                let mut stream = w.generate().generate(req).await?;
                let first = stream.message().await?;
                Ok::<_, tonic::Status>((first, stream))
            };
            match attempt.await {
                Ok((Some(first), stream)) => {
                    w.record_success();
                    router.note_affinity(prefix_key, w.addr);
                    return Ok(Started {
                        pool: cand.pool.clone(),
                        country: cand.country.clone(),
                        worker: w.clone(),
                        first: Some(first),
                        stream,
                        _inflight: guard,
                    });
                }
                Ok((None, _)) => {
                    w.record_failure(&router.cfg);
                    last_error = Some(format!(
                        "{} ended its stream before the first token",
                        w.addr
                    ));
                }
                Err(status) if status.code() == tonic::Code::InvalidArgument => {
                    return Err(ApiError::from_worker_status(&status));
                }
                Err(status) => {
                    // Overload (429) is not a fault of the worker: no breaker count.
                    if status.code() != tonic::Code::ResourceExhausted {
                        w.record_failure(&router.cfg);
                    }
                    tracing::warn!(worker = %w.addr, pool = %w.pool, code = ?status.code(),
                        "worker failed before the first token; trying the next allowed worker");
                    last_error = Some(format!("{}: {}", w.addr, status.message()));
                }
            }
        }
    }
    let pools: Vec<&str> = allowed.iter().map(|c| c.pool.as_str()).collect();
    Err(ApiError::unavailable(
        "no_allowed_pool_available",
        format!(
            "no worker of the allowed pools ({}) can serve the request now ({tried} tried{}); \
             it was not sent anywhere else",
            pools.join(", "),
            last_error
                .map(|e| format!("; last error: {e}"))
                .unwrap_or_default()
        ),
    ))
}

fn usage_of(c: &Chunk) -> UsageCounts {
    c.usage
        .map(|u| UsageCounts {
            prompt_tokens: u.prompt_tokens.into(),
            completion_tokens: u.completion_tokens.into(),
            cached_tokens: u.cached_prompt_tokens.into(),
        })
        .unwrap_or_default()
}

impl Started {
    /// Reads the stream to its end (the worker closes it right after the final chunk)
    /// in the background, so the HTTP/2 stream ends cleanly instead of being reset and
    /// the client's connection is free for its next request at once.
    fn finish(mut self) {
        // Usually the end (the trailers) came with the final chunk: then no task is
        // needed (a spawned task per request was ~2% of the front end's CPU at c64).
        if let Some(Ok(None) | Err(_)) = futures::FutureExt::now_or_never(self.stream.message()) {
            return;
        }
        tokio::spawn(async move {
            let drain = async { while let Ok(Some(_)) = self.stream.message().await {} };
            let _ = tokio::time::timeout(std::time::Duration::from_secs(1), drain).await;
        });
    }

    async fn next(&mut self) -> Result<Option<Chunk>, tonic::Status> {
        if let Some(c) = self.first.take() {
            return Ok(Some(c));
        }
        self.stream.message().await
    }
}

/// Streams the answer as server-sent events (`data: {chunk}` ... `data: [DONE]`).
pub async fn stream_sse(
    s: &mut ServerSession,
    mut started: Started,
    meta: &ResponseMeta,
    include_usage: bool,
    extra: &[(&'static str, &str)],
    request_id: &str,
) -> Relayed {
    let mut extra = extra.to_vec();
    extra.push(("cache-control", "no-cache"));
    if !s.is_http2() {
        extra.push(("transfer-encoding", "chunked"));
    }
    let Some(h) = response_header(200, "text/event-stream", None, &extra, request_id) else {
        return Relayed::Failed(ApiError::internal("cannot build the response header"));
    };
    if s.write_response_header(Box::new(h)).await.is_err() {
        return Relayed::ClientGone;
    }
    let event = |v: serde_json::Value| Bytes::from(format!("data: {v}\n\n"));
    if let Some(role) = meta.role_chunk()
        && s.write_response_body(event(role), false).await.is_err()
    {
        return Relayed::ClientGone;
    }
    let mut text = String::new();
    loop {
        let (data, end, result) = match started.next().await {
            Ok(Some(c)) if c.finish_reason.is_empty() => {
                if c.text().is_empty() {
                    continue;
                }
                text.push_str(c.text());
                (event(meta.delta(c.text(), None)).to_vec(), false, None)
            }
            Ok(Some(c)) => {
                let usage = usage_of(&c);
                let mut out = event(meta.delta("", Some(&c.finish_reason))).to_vec();
                if include_usage {
                    out.extend_from_slice(&event(
                        meta.chunk(serde_json::Value::Null, Some(&usage)),
                    ));
                }
                out.extend_from_slice(b"data: [DONE]\n\n");
                let text = std::mem::take(&mut text);
                (out, true, Some(Relayed::Done { usage, text }))
            }
            Ok(None) => {
                let e = ApiError::new(
                    502,
                    "server_error",
                    "worker_stream_ended",
                    "the worker ended the stream before the answer was complete",
                );
                (event(e.to_json()).to_vec(), true, Some(Relayed::Failed(e)))
            }
            Err(status) => {
                let e = ApiError::from_worker_status(&status);
                (event(e.to_json()).to_vec(), true, Some(Relayed::Failed(e)))
            }
        };
        if s.write_response_body(Bytes::from(data), end).await.is_err() {
            return Relayed::ClientGone;
        }
        if let Some(r) = result {
            if matches!(r, Relayed::Done { .. }) {
                started.finish();
            }
            return r;
        }
    }
}

/// Collects the whole answer and writes one JSON body. While waiting it watches the
/// client connection, so a client that goes away cancels the worker's sequence.
pub async fn whole(
    s: &mut ServerSession,
    mut started: Started,
    meta: &ResponseMeta,
    extra: &[(&'static str, &str)],
    request_id: &str,
) -> Relayed {
    let mut text = String::new();
    let collected = {
        let collect = async {
            loop {
                match started.next().await {
                    Ok(Some(c)) if c.finish_reason.is_empty() => text.push_str(c.text()),
                    Ok(Some(c)) => return Ok((c.finish_reason.clone(), usage_of(&c))),
                    Ok(None) => {
                        return Err(ApiError::new(
                            502,
                            "server_error",
                            "worker_stream_ended",
                            "the worker ended the stream before the answer was complete",
                        ));
                    }
                    Err(status) => return Err(ApiError::from_worker_status(&status)),
                }
            }
        };
        tokio::select! {
            r = collect => Some(r),
            _ = client_gone(s) => None,
        }
    };
    match collected {
        None => Relayed::ClientGone,
        Some(Ok((finish, usage))) => {
            let body = meta.completion(&text, &finish, &usage);
            let written = write_json(s, 200, extra, &body, request_id).await;
            started.finish();
            if written {
                Relayed::Done { usage, text }
            } else {
                Relayed::ClientGone
            }
        }
        Some(Err(e)) => {
            crate::server::write_error(s, &e, request_id).await;
            Relayed::Failed(e)
        }
    }
}

/// Resolves when the client closes the connection (or the h2 stream); pends otherwise.
async fn client_gone(s: &mut ServerSession) {
    loop {
        match s.read_body_or_idle(true).await {
            Err(_) | Ok(None) => return,
            // Pipelined bytes of a next request: not a disconnect; stop watching.
            Ok(Some(_)) => std::future::pending::<()>().await,
        }
    }
}
