//! The worker: a Llama-family inference engine (paged KV cache, continuous batching)
//! with OpenAI-compatible HTTP and gRPC APIs.
//!
//! Flow of a request: `api` (parse, validate, tokenize via `tokenizer` + `chat`) ->
//! `engine` (one thread: `scheduler` decides a `StepPlan` over `kv_cache` blocks ->
//! `backend` executes -> `sampler` picks) -> events streamed back to the API.

pub mod api;
pub mod backend;
pub mod bench;
pub mod chat;
pub mod engine;
pub mod fake;
pub mod fetch;
pub mod gemm;
pub mod kv_cache;
pub mod metrics;
pub mod model;
pub mod quant;
pub mod sampler;
pub mod scheduler;
pub mod tokenizer;
