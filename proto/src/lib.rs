//! The gRPC contract between gateway and worker, generated from `proto/worker.proto`.
//!
//! It also holds the OpenAI request wire types (`openai`), which both the worker's
//! HTTP API and the gateway parse with. This crate owns only wire types; neither
//! side's logic lives here.

pub mod openai;

#[allow(clippy::all)]
pub mod worker {
    tonic::include_proto!("sovereign.worker.v1");
}
