//! OpenAI-compatible HTTP API (axum): chat and text completions (streaming and not),
//! models, health and Prometheus metrics. Every error is an OpenAI-shaped JSON body.

use std::convert::Infallible;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures::{Stream, StreamExt};
use serde_json::{Value, json};
use tokio::sync::mpsc::UnboundedReceiver;

use super::openai::{self, ChatRequest, CommonFields, CompletionRequest};
use super::{ApiError, Input, Service};
use crate::engine::{Event, FinishReason, Usage};
use proto::openai::{Endpoint as Kind, ResponseMeta, UsageCounts};

/// Default cap on request bodies.
pub const DEFAULT_BODY_LIMIT: usize = 8 << 20;

#[derive(Clone)]
struct AppState {
    svc: Service,
    body_limit: usize,
}

pub fn router(svc: Service, body_limit: usize) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(models))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(AppState { svc, body_limit })
}

async fn read_body(body: Body, limit: usize) -> Result<Bytes, ApiError> {
    axum::body::to_bytes(body, limit)
        .await
        .map_err(|_| ApiError {
            status: StatusCode::PAYLOAD_TOO_LARGE,
            code: "request_too_large",
            ..ApiError::bad_request(
                "",
                format!("the request body exceeds the limit of {limit} bytes"),
            )
        })
}

async fn chat(State(st): State<AppState>, body: Body) -> Response {
    let run = async {
        let bytes = read_body(body, st.body_limit).await?;
        let mut req: ChatRequest = openai::parse(&bytes)?;
        let input = openai::chat_input(&mut req)?;
        generate(&st.svc, Kind::Chat, input, &req.common).await
    };
    run.await.unwrap_or_else(IntoResponse::into_response)
}

async fn completions(State(st): State<AppState>, body: Body) -> Response {
    let run = async {
        let bytes = read_body(body, st.body_limit).await?;
        let req: CompletionRequest = openai::parse(&bytes)?;
        let input = openai::completion_input(&req)?;
        generate(&st.svc, Kind::Text, input, &req.common).await
    };
    run.await.unwrap_or_else(IntoResponse::into_response)
}

async fn generate(
    svc: &Service,
    kind: Kind,
    input: Input,
    common: &CommonFields,
) -> Result<Response, ApiError> {
    svc.check_model(&common.model)?;
    let opts = openai::options(common)?;
    let (prompt, params) = svc.prepare(input, &opts)?;
    let rx = svc.engine.submit(prompt, params)?;
    let meta = ResponseMeta {
        id: format!(
            "{}-{}",
            if kind == Kind::Chat {
                "chatcmpl"
            } else {
                "cmpl"
            },
            random_id()
        ),
        created: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        model: svc.info.model_id.clone(),
        endpoint: kind,
    };
    if common.stream {
        Ok(stream_response(meta, rx, common.include_usage()))
    } else {
        collect_response(meta, rx).await
    }
}

fn usage_counts(u: &Usage) -> UsageCounts {
    UsageCounts {
        prompt_tokens: u.prompt_tokens as u64,
        completion_tokens: u.completion_tokens as u64,
        cached_tokens: u.cached_tokens as u64,
    }
}

fn finish_error(reason: FinishReason) -> Option<ApiError> {
    (reason == FinishReason::Error)
        .then(|| ApiError::internal("the inference backend failed while generating"))
}

async fn collect_response(
    meta: ResponseMeta,
    mut rx: UnboundedReceiver<Event>,
) -> Result<Response, ApiError> {
    let mut text = String::new();
    while let Some(ev) = rx.recv().await {
        match ev {
            Event::Token { text: t, .. } => text.push_str(&t),
            Event::Done { reason, usage } => {
                if let Some(e) = finish_error(reason) {
                    return Err(e);
                }
                let body = meta.completion(&text, reason.as_str(), &usage_counts(&usage));
                return Ok(axum::Json(body).into_response());
            }
        }
    }
    Err(ApiError::internal(
        "the engine stopped before the request finished",
    ))
}

fn stream_response(
    meta: ResponseMeta,
    rx: UnboundedReceiver<Event>,
    include_usage: bool,
) -> Response {
    let data = |v: Value| SseEvent::default().data(v.to_string());
    let first = meta.role_chunk().map(data);
    let events = tokio_stream::wrappers::UnboundedReceiverStream::new(rx).flat_map(move |ev| {
        let out: Vec<SseEvent> = match ev {
            Event::Token { text, .. } if text.is_empty() => Vec::new(),
            Event::Token { text, .. } => vec![data(meta.delta(&text, None))],
            Event::Done { reason, usage } => {
                if let Some(e) = finish_error(reason) {
                    vec![data(e.to_json())]
                } else {
                    let mut v = vec![data(meta.delta("", Some(reason.as_str())))];
                    if include_usage {
                        v.push(data(meta.chunk(Value::Null, Some(&usage_counts(&usage)))));
                    }
                    v.push(SseEvent::default().data("[DONE]"));
                    v
                }
            }
        };
        futures::stream::iter(out)
    });
    let stream = futures::stream::iter(first)
        .chain(events)
        .map(Ok::<_, Infallible>);
    sse(stream)
}

fn sse(stream: impl Stream<Item = Result<SseEvent, Infallible>> + Send + 'static) -> Response {
    Sse::new(stream).into_response()
}

async fn models(State(st): State<AppState>) -> Response {
    let i = &st.svc.info;
    axum::Json(json!({"object": "list", "data": [{
        "id": i.model_id, "object": "model", "created": 0, "owned_by": i.pool,
        "max_model_len": i.context_length,
        "pool": i.pool, "country": i.country,
    }]}))
    .into_response()
}

async fn health(State(st): State<AppState>) -> Response {
    let load = st.svc.engine.load();
    let body = json!({"status": if load.draining { "draining" } else { "ok" },
        "model": st.svc.info.model_id, "backend": st.svc.info.backend,
        "queued": load.queued, "running": load.running});
    let status = if load.draining {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::OK
    };
    (status, axum::Json(body)).into_response()
}

async fn metrics(State(st): State<AppState>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        st.svc.engine.metrics.render(),
    )
        .into_response()
}

async fn not_found() -> Response {
    ApiError::not_found("no such endpoint").into_response()
}

async fn method_not_allowed() -> Response {
    ApiError {
        status: StatusCode::METHOD_NOT_ALLOWED,
        code: "method_not_allowed",
        ..ApiError::bad_request("", "method not allowed on this endpoint")
    }
    .into_response()
}

/// 16 hex characters from the clock and a counter (ids only need to be unique per worker).
pub fn random_id() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let mut x = t ^ COUNTER
        .fetch_add(1, Ordering::Relaxed)
        .wrapping_mul(0x9E37_79B9_7F4A_7C15);
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    format!("{x:016x}")
}
