//! Generate over a bare HTTP/2 connection (the `h2` crate) instead of tonic's `Channel`.
//!
//! Why: through tonic/hyper, the request's HEADERS and its one DATA frame leave in two
//! `writev`s (hyper pipes the body from a separate task once h2 has opened the stream),
//! so the worker wakes twice per request and the gateway pays an extra system call and
//! task hop. Here HEADERS and DATA (with END_STREAM) are queued together before the
//! connection task runs, and go out in one write. The wire format is plain gRPC: a
//! 5-byte length prefix per message, `grpc-status` in the trailers (or in the headers of
//! a trailers-only answer), decoded with tonic's own `Status::from_header_map`.
//!
//! Semantics are tonic's: errors are `tonic::Status`, and dropping a [`GenerateStream`]
//! resets the HTTP/2 stream (RST_STREAM CANCEL), which cancels the worker's sequence.

use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use h2::client::SendRequest;
use prost::Message;
use proto::worker as pb;
use tonic::Status;

const GENERATE_PATH: &str = "/sovereign.worker.v1.Worker/Generate";
/// Ping an idle or busy connection this often...
const KEEPALIVE_EVERY: Duration = Duration::from_secs(10);
/// ...and close it when the answer takes longer than this.
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);

/// One worker's Generate connection, (re)connected on demand.
pub struct H2Generate {
    addr: SocketAddr,
    connect_timeout: Duration,
    /// `http://<addr>/…/Generate`, parsed once.
    uri: http::Uri,
    /// One connection per front-end thread: pingora runs each thread as its own
    /// single-threaded runtime (no work stealing), so a request and the connection task
    /// that carries it stay on one thread and hand frames over without waking another.
    conns: Mutex<Vec<(std::thread::ThreadId, SendRequest<Bytes>)>>,
}

fn unavailable(what: &str, e: impl std::fmt::Display) -> Status {
    Status::unavailable(format!("{what}: {e}"))
}

impl H2Generate {
    pub fn new(addr: SocketAddr, connect_timeout: Duration) -> Self {
        Self {
            addr,
            connect_timeout,
            uri: http::Uri::try_from(format!("http://{addr}{GENERATE_PATH}"))
                .unwrap_or_else(|_| http::Uri::from_static("http://127.0.0.1/")),
            conns: Mutex::new(Vec::new()),
        }
    }

    async fn connect(&self) -> Result<SendRequest<Bytes>, Status> {
        let tcp = tokio::time::timeout(
            self.connect_timeout,
            tokio::net::TcpStream::connect(self.addr),
        )
        .await
        .map_err(|_| Status::unavailable(format!("connect to {}: timed out", self.addr)))?
        .map_err(|e| unavailable(&format!("connect to {}", self.addr), e))?;
        tcp.set_nodelay(true)
            .map_err(|e| unavailable("TCP_NODELAY", e))?;
        let (send, conn) = h2::client::Builder::new()
            .initial_window_size(1 << 20)
            .initial_connection_window_size(1 << 24)
            .handshake::<_, Bytes>(tcp)
            .await
            .map_err(|e| unavailable(&format!("HTTP/2 handshake with {}", self.addr), e))?;
        let addr = self.addr;
        let mut conn = conn;
        let ping_pong = conn.ping_pong();
        let task = tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(worker = %addr, error = %e, "Generate connection closed");
            }
        });
        // Keepalive (as tonic's http2_keep_alive_interval did): a worker that stops
        // answering pings has its connection closed, so requests on it fail instead of
        // hanging, and the next request reconnects.
        if let Some(mut pp) = ping_pong {
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(KEEPALIVE_EVERY).await;
                    if task.is_finished() {
                        return;
                    }
                    match tokio::time::timeout(KEEPALIVE_TIMEOUT, pp.ping(h2::Ping::opaque())).await
                    {
                        Ok(Ok(_)) => {}
                        Ok(Err(_)) => return,
                        Err(_) => {
                            tracing::warn!(worker = %addr, "no HTTP/2 ping answer; closing the Generate connection");
                            task.abort();
                            return;
                        }
                    }
                }
            });
        }
        Ok(send)
    }

    /// A sender ready for a new stream: the cached connection, or a fresh one when it
    /// is gone (the worker restarted, or the connection failed).
    async fn ready(&self) -> Result<SendRequest<Bytes>, Status> {
        let me = std::thread::current().id();
        let cached = self
            .conns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .find(|(t, _)| *t == me)
            .map(|(_, s)| s.clone());
        if let Some(s) = cached {
            match s.ready().await {
                Ok(s) => return Ok(s),
                Err(e) => tracing::debug!(worker = %self.addr, error = %e, "reconnecting"),
            }
        }
        let fresh = self
            .connect()
            .await?
            .ready()
            .await
            .map_err(|e| unavailable("HTTP/2", e))?;
        let mut conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        match conns.iter_mut().find(|(t, _)| *t == me) {
            Some(slot) => slot.1 = fresh.clone(),
            None => conns.push((me, fresh.clone())),
        }
        Ok(fresh)
    }

    /// Starts a Generate call: the request goes out in one write; returns once the
    /// worker's response headers arrived.
    pub async fn generate(&self, req: &pb::GenerateRequest) -> Result<GenerateStream, Status> {
        let mut send = self.ready().await?;
        let len = req.encoded_len();
        let mut body = BytesMut::with_capacity(5 + len);
        body.put_u8(0);
        body.put_u32(
            u32::try_from(len).map_err(|_| Status::invalid_argument("request too large"))?,
        );
        req.encode(&mut body)
            .map_err(|e| Status::internal(format!("encode: {e}")))?;
        let request = http::Request::builder()
            .method(http::Method::POST)
            .uri(self.uri.clone())
            .header(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/grpc"),
            )
            .header(http::header::TE, http::HeaderValue::from_static("trailers"))
            .body(())
            .map_err(|e| Status::internal(format!("request: {e}")))?;
        let (response, mut stream) = send
            .send_request(request, false)
            .map_err(|e| unavailable("send", e))?;
        stream
            .send_data(body.freeze(), true)
            .map_err(|e| unavailable("send", e))?;
        let response = response.await.map_err(|e| unavailable("response", e))?;
        let (parts, body) = response.into_parts();
        if parts.status != http::StatusCode::OK {
            return Err(Status::unknown(format!(
                "worker answered HTTP {}",
                parts.status
            )));
        }
        // A trailers-only answer (an error before any message) has grpc-status here.
        if let Some(status) = Status::from_header_map(&parts.headers)
            && status.code() != tonic::Code::Ok
        {
            return Err(status);
        }
        Ok(GenerateStream {
            body,
            buf: BytesMut::new(),
            _send: stream,
        })
    }
}

/// The part of a `GenerateChunk` the relay uses, decoded without copies: `text` is a
/// slice of the received buffer (checked as UTF-8 when decoded), and `token_ids`
/// (field 2) is skipped instead of allocated. Same wire format as `pb::GenerateChunk`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Chunk {
    #[prost(bytes = "bytes", tag = "1")]
    text: Bytes,
    #[prost(string, tag = "3")]
    pub finish_reason: String,
    #[prost(message, optional, tag = "4")]
    pub usage: Option<pb::Usage>,
}

impl Chunk {
    /// The text this chunk adds.
    pub fn text(&self) -> &str {
        // Checked in `GenerateStream::message`.
        std::str::from_utf8(&self.text).unwrap_or_default()
    }
}

/// The worker's stream of chunks.
pub struct GenerateStream {
    body: h2::RecvStream,
    buf: BytesMut,
    /// Kept so that dropping the stream resets it (cancelling the worker's sequence).
    _send: h2::SendStream<Bytes>,
}

impl GenerateStream {
    /// The next chunk; `Ok(None)` at a clean end (`grpc-status: 0`).
    pub async fn message(&mut self) -> Result<Option<Chunk>, Status> {
        loop {
            if self.buf.len() >= 5 {
                if self.buf[0] != 0 {
                    return Err(Status::internal(
                        "compressed gRPC messages are not supported",
                    ));
                }
                let len = u32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]])
                    as usize;
                if self.buf.len() >= 5 + len {
                    self.buf.advance(5);
                    let msg = self.buf.split_to(len);
                    let chunk = Chunk::decode(msg.freeze())
                        .map_err(|e| Status::internal(format!("decode: {e}")))?;
                    if std::str::from_utf8(&chunk.text).is_err() {
                        return Err(Status::internal("decode: chunk text is not UTF-8"));
                    }
                    return Ok(Some(chunk));
                }
            }
            match self.body.data().await {
                Some(Ok(data)) => {
                    let _ = self.body.flow_control().release_capacity(data.len());
                    self.buf.extend_from_slice(&data);
                }
                Some(Err(e)) => return Err(h2_status(e)),
                None => {
                    if !self.buf.is_empty() {
                        return Err(Status::internal("stream ended inside a message"));
                    }
                    let trailers = self.body.trailers().await.map_err(h2_status)?;
                    // The common end, `grpc-status: 0`, is read as bytes: building a
                    // `tonic::Status` would also parse `grpc-message` and allocate.
                    let ok = trailers
                        .as_ref()
                        .and_then(|t| t.get("grpc-status"))
                        .is_some_and(|v| v.as_bytes() == b"0");
                    if ok {
                        return Ok(None);
                    }
                    return match trailers.as_ref().and_then(Status::from_header_map) {
                        Some(s) if s.code() != tonic::Code::Ok => Err(s),
                        Some(_) => Ok(None),
                        None => Err(Status::internal("stream ended without grpc-status")),
                    };
                }
            }
        }
    }
}

fn h2_status(e: h2::Error) -> Status {
    if e.reason() == Some(h2::Reason::CANCEL) {
        Status::cancelled(e.to_string())
    } else {
        Status::unavailable(e.to_string())
    }
}
