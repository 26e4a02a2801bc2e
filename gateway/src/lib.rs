//! The sovereign inference gateway: one OpenAI-compatible endpoint that authenticates
//! each caller with its member state's identity provider, asks that state's Cedar
//! policies which worker pools may process the request, and relays the answer from a
//! worker in an allowed pool, or refuses with a reason. See docs/architecture.md.
//!
//! One module per request phase: `auth` -> `body` -> `policy` -> `route` -> `relay`,
//! driven by `server`; `run` wires the process, `demo` the local federation.

// Errors are the cold path; `ApiError` carries the whole OpenAI error body by value.
#![allow(clippy::result_large_err)]

pub mod admin;
pub mod audit;
pub mod auth;
pub mod body;
pub mod cli_audit;
pub mod cli_policy;
pub mod cli_token;
pub mod config;
pub mod demo;
pub mod domain;
pub mod error;
pub mod grpc_h2;
pub mod net;
pub mod policy;
pub mod pools;
pub mod relay;
pub mod route;
pub mod run;
pub mod server;

pub use domain::{Classification, Country, EU_MEMBER_STATES};

/// Lower-case hex of `bytes`, through `hex::encode_to_slice` (table-driven): `hex::encode`
/// builds its `String` one `char` at a time, and the request path hex-encodes several
/// hashes per request.
pub fn hexstr(bytes: impl AsRef<[u8]>) -> String {
    let bytes = bytes.as_ref();
    let mut out = vec![0u8; bytes.len() * 2];
    // The output is exactly twice the input's length and holds only ASCII digits, so
    // neither step can fail.
    if hex::encode_to_slice(bytes, &mut out).is_err() {
        return String::new();
    }
    String::from_utf8(out).unwrap_or_default()
}
