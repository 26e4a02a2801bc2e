//! Reading a request body whole, bounded by the configured limit. The body is read in
//! the request phase (never replayed through pingora's 64 KiB retry buffer), so any
//! size up to the limit works; over the limit is 413 at once when Content-Length says
//! so, or as soon as the limit is crossed while reading.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use pingora::protocols::http::ServerSession;

use crate::error::ApiError;

/// How long one read of the body may wait for the client.
const READ_TIMEOUT: Duration = Duration::from_secs(30);

pub async fn read_bounded(session: &mut ServerSession, limit: usize) -> Result<Bytes, ApiError> {
    let too_large = |n: usize| {
        ApiError::new(
            413,
            "invalid_request_error",
            "request_too_large",
            format!("the request body ({n} bytes or more) exceeds the limit of {limit} bytes"),
        )
    };
    let declared = session
        .get_header(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<usize>().ok());
    if let Some(n) = declared
        && n > limit
    {
        return Err(too_large(n));
    }
    session.set_read_timeout(Some(READ_TIMEOUT));
    let mut buf = BytesMut::with_capacity(declared.unwrap_or(0).min(limit));
    loop {
        match session.read_request_body().await {
            Ok(Some(chunk)) => {
                if buf.len() + chunk.len() > limit {
                    return Err(too_large(buf.len() + chunk.len()));
                }
                buf.extend_from_slice(&chunk);
            }
            Ok(None) => break,
            Err(e) => {
                return Err(ApiError::bad_request(
                    "body_read_failed",
                    format!("could not read the request body: {:?}", e.etype()),
                ));
            }
        }
    }
    Ok(buf.freeze())
}
