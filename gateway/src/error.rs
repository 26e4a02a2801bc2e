//! The gateway's one error type: HTTP status, OpenAI error `type`, a stable reason code
//! that clients' scripts may rely on, and a message for people. Rendered as
//! `{"error": {"message", "type", "param", "code"}}`.

use proto::openai::WireError;

#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub status: u16,
    /// OpenAI `type`: invalid_request_error, authentication_error, permission_error,
    /// rate_limit_error, server_error.
    pub kind: &'static str,
    /// Stable reason code.
    pub code: String,
    pub message: String,
    pub param: Option<String>,
    pub retry_after: Option<u32>,
    /// Policy reason codes behind a residency refusal (rendered as `reasons`).
    pub reasons: Vec<String>,
}

impl ApiError {
    pub fn new(status: u16, kind: &'static str, code: &str, message: impl Into<String>) -> Self {
        Self {
            status,
            kind,
            code: code.to_string(),
            message: message.into(),
            param: None,
            retry_after: None,
            reasons: Vec::new(),
        }
    }

    pub fn bad_request(code: &str, message: impl Into<String>) -> Self {
        Self::new(400, "invalid_request_error", code, message)
    }

    pub fn unauthorized(code: &str, message: impl Into<String>) -> Self {
        Self::new(401, "authentication_error", code, message)
    }

    pub fn forbidden(code: &str, message: impl Into<String>) -> Self {
        Self::new(403, "permission_error", code, message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(404, "invalid_request_error", "not_found", message)
    }

    pub fn unavailable(code: &str, message: impl Into<String>) -> Self {
        Self {
            retry_after: Some(5),
            ..Self::new(503, "server_error", code, message)
        }
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(500, "server_error", "internal_error", message)
    }

    pub fn with_param(mut self, p: &str) -> Self {
        self.param = Some(p.to_string());
        self
    }

    pub fn to_json(&self) -> serde_json::Value {
        let mut e = serde_json::json!({
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.code,
        });
        if !self.reasons.is_empty() {
            e["reasons"] = serde_json::json!(self.reasons);
        }
        serde_json::json!({ "error": e })
    }

    /// A worker's gRPC status, whose message is `reason: text` (see worker/src/api/error.rs).
    pub fn from_worker_status(s: &tonic::Status) -> Self {
        let (code, text) = match s.message().split_once(": ") {
            Some((c, t))
                if !c.is_empty() && c.bytes().all(|b| b.is_ascii_lowercase() || b == b'_') =>
            {
                (c.to_string(), t.to_string())
            }
            _ => ("worker_error".to_string(), s.message().to_string()),
        };
        let (status, kind) = match s.code() {
            tonic::Code::InvalidArgument => (400, "invalid_request_error"),
            tonic::Code::NotFound => (404, "invalid_request_error"),
            tonic::Code::ResourceExhausted => (429, "rate_limit_error"),
            tonic::Code::Unavailable => (503, "server_error"),
            _ => (502, "server_error"),
        };
        Self {
            retry_after: matches!(status, 429 | 503).then_some(1),
            ..Self::new(status, kind, &code, text)
        }
    }
}

impl From<WireError> for ApiError {
    fn from(e: WireError) -> Self {
        Self {
            param: e.param,
            ..Self::bad_request(e.code, e.message)
        }
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}: {}", self.status, self.code, self.message)
    }
}

impl std::error::Error for ApiError {}
