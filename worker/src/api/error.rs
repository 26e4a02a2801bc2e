//! The one API error type: an HTTP status, an OpenAI error type, a machine reason code
//! and a message for people. Rendered as `{"error": {...}}` on HTTP and as a tonic
//! `Status` (code + "reason: message") on gRPC.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use crate::engine::SubmitError;

#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    /// OpenAI `type`: invalid_request_error, rate_limit_error, server_error, ...
    pub kind: &'static str,
    /// Stable reason code that scripts may rely on.
    pub code: &'static str,
    pub message: String,
    pub param: Option<String>,
    pub retry_after: Option<u32>,
}

impl ApiError {
    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            kind: "invalid_request_error",
            code,
            message: message.into(),
            param: None,
            retry_after: None,
        }
    }

    pub fn with_param(mut self, p: &str) -> Self {
        self.param = Some(p.into());
        self
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::NOT_FOUND,
            code: "not_found",
            ..Self::bad_request("", message)
        }
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            kind: "server_error",
            code: "internal_error",
            message: message.into(),
            param: None,
            retry_after: None,
        }
    }

    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({"error": {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.code,
        }})
    }

    pub fn to_status(&self) -> tonic::Status {
        let code = match self.status.as_u16() {
            400 | 413 => tonic::Code::InvalidArgument,
            404 => tonic::Code::NotFound,
            429 => tonic::Code::ResourceExhausted,
            503 => tonic::Code::Unavailable,
            _ => tonic::Code::Internal,
        };
        tonic::Status::new(code, format!("{}: {}", self.code, self.message))
    }
}

impl From<SubmitError> for ApiError {
    fn from(e: SubmitError) -> Self {
        let message = e.to_string();
        match e {
            SubmitError::EmptyPrompt => ApiError::bad_request("empty_prompt", message),
            SubmitError::ContextLength { .. } => {
                ApiError::bad_request("context_length_exceeded", message)
            }
            SubmitError::Sampling(_) => ApiError::bad_request("invalid_sampling_params", message),
            SubmitError::QueueFull(_) => ApiError {
                status: StatusCode::TOO_MANY_REQUESTS,
                kind: "rate_limit_error",
                code: "queue_full",
                message,
                param: None,
                retry_after: Some(1),
            },
            SubmitError::Draining => ApiError {
                status: StatusCode::SERVICE_UNAVAILABLE,
                kind: "server_error",
                code: "draining",
                message,
                param: None,
                retry_after: Some(5),
            },
            SubmitError::Stopped => ApiError {
                status: StatusCode::SERVICE_UNAVAILABLE,
                kind: "server_error",
                code: "engine_stopped",
                message,
                param: None,
                retry_after: Some(5),
            },
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut resp = (self.status, axum::Json(self.to_json())).into_response();
        if let Some(s) = self.retry_after {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        resp
    }
}
