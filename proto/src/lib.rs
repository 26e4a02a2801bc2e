//! The gRPC contract between gateway and worker, generated from `proto/worker.proto`.
//!
//! This crate owns only the wire types; neither side's logic lives here.

#![allow(clippy::all)]

pub mod worker {
    tonic::include_proto!("sovereign.worker.v1");
}
