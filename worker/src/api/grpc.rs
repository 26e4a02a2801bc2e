//! The gateway's gRPC contract (`proto/worker.proto`): Generate, Info, WatchLoad, Drain.

use std::pin::Pin;
use std::time::Duration;

use futures::{Stream, StreamExt};
use proto::worker as pb;
use proto::worker::worker_server::{Worker, WorkerServer};
use tonic::{Request, Response, Status};

use super::{Input, RequestOptions, Service};
use crate::chat::ChatMessage;
use crate::engine::{Event, Load, unix_ms};

pub fn server(svc: Service) -> WorkerServer<Grpc> {
    WorkerServer::new(Grpc { svc })
}

pub struct Grpc {
    svc: Service,
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

fn snapshot(l: &Load) -> pb::LoadSnapshot {
    pb::LoadSnapshot {
        queued: l.queued as u32,
        running: l.running as u32,
        kv_blocks_used: l.kv_blocks_used as u32,
        kv_blocks_total: l.kv_blocks_total as u32,
        draining: l.draining,
        unix_ms: unix_ms(),
        prefix_cache_hit_rate: l.prefix_cache_hit_rate,
    }
}

#[tonic::async_trait]
impl Worker for Grpc {
    type GenerateStream = BoxStream<pb::GenerateChunk>;
    type WatchLoadStream = BoxStream<pb::LoadSnapshot>;

    async fn generate(
        &self,
        req: Request<pb::GenerateRequest>,
    ) -> Result<Response<Self::GenerateStream>, Status> {
        let r = req.into_inner();
        self.svc.check_model(&r.model).map_err(|e| e.to_status())?;
        let input = match r.input {
            Some(pb::generate_request::Input::Chat(c)) => Input::Chat(
                c.messages
                    .into_iter()
                    .map(|m| ChatMessage {
                        role: m.role,
                        content: m.content,
                    })
                    .collect(),
            ),
            Some(pb::generate_request::Input::Prompt(p)) => Input::Text(p),
            None => {
                return Err(Status::invalid_argument(
                    "invalid_request: input (chat or prompt) is required",
                ));
            }
        };
        let s = r.sampling.unwrap_or_default();
        let opts = RequestOptions {
            temperature: s.temperature,
            top_p: s.top_p,
            top_k: s.top_k.map(i64::from),
            min_p: s.min_p,
            seed: s.seed,
            repetition_penalty: s.repetition_penalty,
            presence_penalty: s.presence_penalty,
            frequency_penalty: s.frequency_penalty,
            max_tokens: s.max_tokens.map(i64::from),
            stop: s.stop,
            priority: r.priority,
            ignore_eos: s.ignore_eos.unwrap_or(false),
        };
        let (prompt, params) = self.svc.prepare(input, &opts).map_err(|e| e.to_status())?;
        let rx = self
            .svc
            .engine
            .submit(prompt, params)
            .map_err(|e| super::ApiError::from(e).to_status())?;
        let stream = tokio_stream::wrappers::UnboundedReceiverStream::new(rx).map(|ev| match ev {
            Event::Token { id, text } => Ok(pb::GenerateChunk {
                text,
                token_ids: vec![id],
                finish_reason: String::new(),
                usage: None,
            }),
            Event::Done { reason, usage } => Ok(pb::GenerateChunk {
                text: String::new(),
                token_ids: Vec::new(),
                finish_reason: reason.as_str().to_string(),
                usage: Some(pb::Usage {
                    prompt_tokens: usage.prompt_tokens as u32,
                    completion_tokens: usage.completion_tokens as u32,
                    cached_prompt_tokens: usage.cached_tokens as u32,
                }),
            }),
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn info(
        &self,
        _req: Request<pb::InfoRequest>,
    ) -> Result<Response<pb::InfoReply>, Status> {
        let i = &self.svc.info;
        let c = &self.svc.engine.config;
        Ok(Response::new(pb::InfoReply {
            model: i.model_id.clone(),
            pool: i.pool.clone(),
            country: i.country.clone(),
            context_length: i.context_length as u32,
            kv_blocks_total: c.num_blocks as u32,
            block_size: c.block_size as u32,
            max_running: c.max_num_seqs as u32,
            max_queue: c.max_queue as u32,
            backend: i.backend.clone(),
            worker_version: env!("CARGO_PKG_VERSION").to_string(),
        }))
    }

    async fn watch_load(
        &self,
        _req: Request<pb::WatchLoadRequest>,
    ) -> Result<Response<Self::WatchLoadStream>, Status> {
        let mut rx = self.svc.engine.watch_load();
        // One snapshot at once, then on every change, and at least every 100 ms.
        let stream = async_stream(move |tx| async move {
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                let snap = snapshot(&rx.borrow_and_update());
                if tx.send(Ok(snap)).await.is_err() {
                    return;
                }
                tokio::select! {
                    changed = rx.changed() => if changed.is_err() { return },
                    _ = tick.tick() => {}
                }
            }
        });
        Ok(Response::new(stream))
    }

    async fn drain(
        &self,
        req: Request<pb::DrainRequest>,
    ) -> Result<Response<pb::DrainReply>, Status> {
        let mut remaining = self.svc.engine.drain();
        if req.into_inner().wait {
            while remaining > 0 {
                tokio::time::sleep(Duration::from_millis(20)).await;
                remaining = self.svc.engine.in_flight();
            }
        }
        Ok(Response::new(pb::DrainReply {
            remaining: remaining as u32,
        }))
    }
}

/// A stream fed by a task through a small channel; the task ends when the client goes.
fn async_stream<T, F, Fut>(f: F) -> BoxStream<T>
where
    T: Send + 'static,
    F: FnOnce(tokio::sync::mpsc::Sender<Result<T, Status>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tokio::spawn(f(tx));
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}
