//! `worker fake`: a benchmark stand-in that answers every request at once with fixed
//! tokens, over the same gRPC contract as a real worker and over OpenAI HTTP. It lets
//! the gateway benchmark measure the gateway itself (against nginx over an equally fast
//! HTTP upstream), not inference. Never used to serve users.

use std::pin::Pin;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use futures::Stream;
use proto::openai::{Endpoint, ResponseMeta, UsageCounts};
use proto::worker as pb;
use proto::worker::worker_server::{Worker, WorkerServer};
use tonic::{Request, Response, Status};

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

fn token_text(i: u32) -> &'static str {
    WORDS[i as usize % WORDS.len()]
}

pub fn grpc_server(cfg: FakeConfig) -> WorkerServer<FakeWorker> {
    WorkerServer::new(FakeWorker { cfg })
}

pub struct FakeWorker {
    cfg: FakeConfig,
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

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

#[tonic::async_trait]
impl Worker for FakeWorker {
    type GenerateStream = BoxStream<pb::GenerateChunk>;
    type WatchLoadStream = BoxStream<pb::LoadSnapshot>;

    async fn generate(
        &self,
        req: Request<pb::GenerateRequest>,
    ) -> Result<Response<Self::GenerateStream>, Status> {
        let max = req
            .into_inner()
            .sampling
            .and_then(|s| s.max_tokens)
            .unwrap_or(self.cfg.tokens)
            .min(self.cfg.tokens);
        let mut chunks: Vec<Result<pb::GenerateChunk, Status>> = (0..max)
            .map(|i| {
                Ok(pb::GenerateChunk {
                    text: token_text(i).to_string(),
                    token_ids: vec![i],
                    finish_reason: String::new(),
                    usage: None,
                })
            })
            .collect();
        chunks.push(Ok(pb::GenerateChunk {
            text: String::new(),
            token_ids: Vec::new(),
            finish_reason: "length".into(),
            usage: Some(pb::Usage {
                prompt_tokens: 8,
                completion_tokens: max,
                cached_prompt_tokens: 0,
            }),
        }));
        Ok(Response::new(Box::pin(futures::stream::iter(chunks))))
    }

    async fn info(
        &self,
        _req: Request<pb::InfoRequest>,
    ) -> Result<Response<pb::InfoReply>, Status> {
        Ok(Response::new(pb::InfoReply {
            model: self.cfg.model.clone(),
            pool: self.cfg.pool.clone(),
            country: self.cfg.country.clone(),
            context_length: 8192,
            kv_blocks_total: 1024,
            block_size: 16,
            max_running: 1024,
            max_queue: 1024,
            backend: "fake".into(),
            worker_version: env!("CARGO_PKG_VERSION").to_string(),
        }))
    }

    async fn watch_load(
        &self,
        _req: Request<pb::WatchLoadRequest>,
    ) -> Result<Response<Self::WatchLoadStream>, Status> {
        let ticks = tokio_stream::wrappers::IntervalStream::new(tokio::time::interval(
            Duration::from_millis(100),
        ));
        let stream = futures::StreamExt::map(ticks, |_| Ok(snapshot()));
        Ok(Response::new(Box::pin(stream)))
    }

    async fn drain(
        &self,
        _req: Request<pb::DrainRequest>,
    ) -> Result<Response<pb::DrainReply>, Status> {
        Ok(Response::new(pb::DrainReply { remaining: 0 }))
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
                    let max = serde_json::from_slice::<serde_json::Value>(&body)
                        .ok()
                        .and_then(|v| v["max_tokens"].as_u64())
                        .map(|m| m.min(u64::from(cfg.tokens)) as u32)
                        .unwrap_or(cfg.tokens);
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
