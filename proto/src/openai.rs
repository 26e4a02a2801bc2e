//! The OpenAI wire contract (request bodies of /v1/chat/completions and /v1/completions),
//! shared by the worker's HTTP API and the gateway so both accept exactly the same
//! requests. Strict parsing into typed structs; the first problem is reported as a
//! [`WireError`] with a stable reason code. Neither side's logic lives here.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::worker as pb;

/// A request the wire contract rejects: always an HTTP 400 `invalid_request_error`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WireError {
    /// Stable reason code: invalid_json, missing_field, invalid_type, invalid_request,
    /// unsupported_parameter, unsupported_content, invalid_sampling_params.
    pub code: &'static str,
    pub message: String,
    pub param: Option<String>,
}

impl WireError {
    pub fn new(code: &'static str, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            param: None,
        }
    }

    pub fn with_param(mut self, p: &str) -> Self {
        self.param = Some(p.into());
        self
    }
}

impl std::fmt::Display for WireError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

impl std::error::Error for WireError {}

/// `stop`: a string or a list of strings.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum StopField {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// Fields shared by chat and text completions.
#[derive(Debug, Deserialize)]
pub struct CommonFields {
    pub model: String,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    pub max_tokens: Option<i64>,
    pub max_completion_tokens: Option<i64>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<i64>,
    pub min_p: Option<f32>,
    pub seed: Option<i64>,
    pub repetition_penalty: Option<f32>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub stop: Option<StopField>,
    pub n: Option<i64>,
    pub user: Option<String>,
    #[serde(default)]
    pub priority: i32,
    #[serde(default)]
    pub ignore_eos: bool,
    pub logprobs: Option<serde_json::Value>,
}

#[derive(Debug, Deserialize)]
pub struct ChatRequest {
    pub messages: Vec<RawMessage>,
    #[serde(flatten)]
    pub common: CommonFields,
}

#[derive(Debug, Deserialize)]
pub struct RawMessage {
    pub role: String,
    pub content: Option<MessageContent>,
}

/// Message content: a string or a list of typed parts (only text parts are supported).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum MessageContent {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Deserialize)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    pub text: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct CompletionRequest {
    pub prompt: PromptField,
    #[serde(default)]
    pub echo: bool,
    #[serde(flatten)]
    pub common: CommonFields,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum PromptField {
    Text(String),
    Tokens(Vec<u32>),
    Texts(Vec<String>),
}

/// Parse a JSON body into `T`: malformed JSON and wrong types become errors.
///
/// Well-formed bodies take one direct pass. Any failure is re-parsed through
/// `serde_json::Value`, which decides the error (and its reason code) exactly as before, and
/// keeps the `Value` path's leniency, e.g. a repeated key where the last one wins.
pub fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<T, WireError> {
    if let Ok(v) = serde_json::from_slice::<T>(body) {
        return Ok(v);
    }
    let value: serde_json::Value = serde_json::from_slice(body).map_err(|e| {
        WireError::new(
            "invalid_json",
            format!("the request body is not valid JSON: {e}"),
        )
    })?;
    if !value.is_object() {
        return Err(WireError::new(
            "invalid_json",
            "the request body must be a JSON object",
        ));
    }
    serde_json::from_value(value).map_err(|e| {
        let msg = e.to_string();
        let code = if msg.starts_with("missing field") {
            "missing_field"
        } else {
            "invalid_type"
        };
        WireError::new(code, format!("invalid request: {msg}"))
    })
}

/// The prompt of a text completion.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Prompt {
    Text(String),
    Tokens(Vec<u32>),
}

impl CommonFields {
    /// Rejects parameters this service does not implement (n != 1, logprobs).
    pub fn check_supported(&self) -> Result<(), WireError> {
        if let Some(n) = self.n
            && n != 1
        {
            return Err(
                WireError::new("unsupported_parameter", "only n = 1 is supported").with_param("n"),
            );
        }
        if matches!(&self.logprobs, Some(v) if !v.is_null() && v != &serde_json::Value::Bool(false))
        {
            return Err(
                WireError::new("unsupported_parameter", "logprobs are not supported")
                    .with_param("logprobs"),
            );
        }
        Ok(())
    }

    pub fn seed(&self) -> Result<Option<u64>, WireError> {
        match self.seed {
            None => Ok(None),
            Some(s) if s >= 0 => Ok(Some(s as u64)),
            Some(s) => Err(WireError::new(
                "invalid_sampling_params",
                format!("seed must be >= 0, got {s}"),
            )
            .with_param("seed")),
        }
    }

    pub fn stop_list(&self) -> Vec<String> {
        match &self.stop {
            None => Vec::new(),
            Some(StopField::One(s)) => vec![s.clone()],
            Some(StopField::Many(v)) => v.clone(),
        }
    }

    /// `max_completion_tokens`, else `max_tokens`.
    pub fn max_tokens(&self) -> Option<i64> {
        self.max_completion_tokens.or(self.max_tokens)
    }

    pub fn include_usage(&self) -> bool {
        self.stream_options
            .as_ref()
            .is_some_and(|o| o.include_usage)
    }

    /// The sampling parameters of the gRPC contract. Range checks beyond what the wire
    /// types can carry are the worker's (it answers 400 `invalid_sampling_params`).
    pub fn sampling(&self) -> Result<pb::SamplingParams, WireError> {
        self.check_supported()?;
        let bad = |m: String, p: &str| WireError::new("invalid_sampling_params", m).with_param(p);
        let top_k = match self.top_k {
            None => None,
            Some(-1) | Some(0) => Some(0),
            Some(k) if k > 0 => Some(u32::try_from(k).unwrap_or(u32::MAX)),
            Some(k) => {
                return Err(bad(
                    format!("top_k must be -1, 0 or positive, got {k}"),
                    "top_k",
                ));
            }
        };
        let max_tokens = match self.max_tokens() {
            None => None,
            Some(n) if n >= 1 => Some(u32::try_from(n).unwrap_or(u32::MAX)),
            Some(n) => {
                return Err(bad(
                    format!("max_tokens must be at least 1, got {n}"),
                    "max_tokens",
                ));
            }
        };
        Ok(pb::SamplingParams {
            temperature: self.temperature,
            top_p: self.top_p,
            top_k,
            min_p: self.min_p,
            seed: self.seed()?,
            repetition_penalty: self.repetition_penalty,
            presence_penalty: self.presence_penalty,
            frequency_penalty: self.frequency_penalty,
            max_tokens,
            stop: self.stop_list(),
            ignore_eos: self.ignore_eos.then_some(true),
        })
    }
}

impl ChatRequest {
    /// The messages with their text content; `developer` becomes `system`. Moves the
    /// texts out of the request (a prompt is not copied); `self.messages` is left empty.
    pub fn take_messages(&mut self) -> Result<Vec<pb::ChatMessage>, WireError> {
        let messages = std::mem::take(&mut self.messages);
        let mut out = Vec::with_capacity(messages.len());
        for (i, m) in messages.into_iter().enumerate() {
            if !matches!(
                m.role.as_str(),
                "system" | "developer" | "user" | "assistant" | "tool"
            ) {
                return Err(WireError::new(
                    "invalid_request",
                    format!("messages[{i}].role `{}` is not a known role", m.role),
                ));
            }
            let content = match m.content {
                None => String::new(),
                Some(MessageContent::Text(t)) => t,
                Some(MessageContent::Parts(parts)) => {
                    let mut s = String::new();
                    for p in parts {
                        match (p.kind.as_str(), &p.text) {
                            ("text", Some(t)) => s.push_str(t),
                            (kind, _) => {
                                return Err(WireError::new(
                                    "unsupported_content",
                                    format!(
                                        "messages[{i}]: content part of type `{kind}` is not supported (text only)"
                                    ),
                                ));
                            }
                        }
                    }
                    s
                }
            };
            let role = if m.role == "developer" {
                "system".to_string()
            } else {
                m.role
            };
            out.push(pb::ChatMessage { role, content });
        }
        Ok(out)
    }
}

impl CompletionRequest {
    pub fn prompt(&self) -> Result<Prompt, WireError> {
        if self.echo {
            return Err(
                WireError::new("unsupported_parameter", "echo is not supported").with_param("echo"),
            );
        }
        match &self.prompt {
            PromptField::Text(t) => Ok(Prompt::Text(t.clone())),
            PromptField::Tokens(t) => Ok(Prompt::Tokens(t.clone())),
            PromptField::Texts(v) if v.len() == 1 => Ok(Prompt::Text(v[0].clone())),
            PromptField::Texts(_) => Err(WireError::new(
                "unsupported_parameter",
                "batched prompts are not supported; send one prompt per request",
            )
            .with_param("prompt")),
        }
    }
}

/// Which endpoint a response belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// /v1/chat/completions
    Chat,
    /// /v1/completions
    Text,
}

/// The fixed fields of one response (or of every chunk of one stream).
#[derive(Debug, Clone)]
pub struct ResponseMeta {
    pub id: String,
    pub created: u64,
    pub model: String,
    pub endpoint: Endpoint,
}

/// Token counts as OpenAI reports them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UsageCounts {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub cached_tokens: u64,
}

impl UsageCounts {
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(UsageBody::from(self)).unwrap_or_default()
    }
}

/// A whole (non-streaming) response body, serialized straight from its fields (no
/// `serde_json::Value` tree: on the gateway's hot path that was ~4% of a request).
#[derive(Debug, Serialize)]
pub struct CompletionBody<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    model: &'a str,
    choices: [Choice<'a>; 1],
    usage: UsageBody,
}

#[derive(Debug, Serialize)]
#[serde(untagged)]
enum Choice<'a> {
    Chat {
        index: u32,
        message: AssistantMessage<'a>,
        logprobs: Option<()>,
        finish_reason: &'a str,
    },
    Text {
        index: u32,
        text: &'a str,
        logprobs: Option<()>,
        finish_reason: &'a str,
    },
}

#[derive(Debug, Serialize)]
struct AssistantMessage<'a> {
    role: &'static str,
    content: &'a str,
}

#[derive(Debug, Serialize)]
struct UsageBody {
    prompt_tokens: u64,
    completion_tokens: u64,
    total_tokens: u64,
    prompt_tokens_details: CachedTokens,
}

#[derive(Debug, Serialize)]
struct CachedTokens {
    cached_tokens: u64,
}

impl From<&UsageCounts> for UsageBody {
    fn from(u: &UsageCounts) -> Self {
        Self {
            prompt_tokens: u.prompt_tokens,
            completion_tokens: u.completion_tokens,
            total_tokens: u.prompt_tokens + u.completion_tokens,
            prompt_tokens_details: CachedTokens {
                cached_tokens: u.cached_tokens,
            },
        }
    }
}

impl ResponseMeta {
    /// The whole (non-streaming) response body.
    pub fn completion<'a>(
        &'a self,
        text: &'a str,
        finish_reason: &'a str,
        usage: &UsageCounts,
    ) -> CompletionBody<'a> {
        let (object, choice) = match self.endpoint {
            Endpoint::Chat => (
                "chat.completion",
                Choice::Chat {
                    index: 0,
                    message: AssistantMessage {
                        role: "assistant",
                        content: text,
                    },
                    logprobs: None,
                    finish_reason,
                },
            ),
            Endpoint::Text => (
                "text_completion",
                Choice::Text {
                    index: 0,
                    text,
                    logprobs: None,
                    finish_reason,
                },
            ),
        };
        CompletionBody {
            id: &self.id,
            object,
            created: self.created,
            model: &self.model,
            choices: [choice],
            usage: usage.into(),
        }
    }

    /// One stream chunk (the JSON after `data: `): `choice` may be null (usage-only chunk).
    pub fn chunk(
        &self,
        choice: serde_json::Value,
        usage: Option<&UsageCounts>,
    ) -> serde_json::Value {
        let object = match self.endpoint {
            Endpoint::Chat => "chat.completion.chunk",
            Endpoint::Text => "text_completion",
        };
        let choices = if choice.is_null() {
            serde_json::json!([])
        } else {
            serde_json::json!([choice])
        };
        let mut v = serde_json::json!({"id": self.id, "object": object, "created": self.created,
            "model": self.model, "choices": choices});
        if let Some(u) = usage {
            v["usage"] = u.to_json();
        }
        v
    }

    /// The first chunk of a chat stream (the assistant role), if this endpoint has one.
    pub fn role_chunk(&self) -> Option<serde_json::Value> {
        (self.endpoint == Endpoint::Chat).then(|| {
            self.chunk(
                serde_json::json!({"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": null}),
                None,
            )
        })
    }

    /// A chunk carrying `text`, or the final chunk when `finish` is set.
    pub fn delta(&self, text: &str, finish: Option<&str>) -> serde_json::Value {
        let choice = match self.endpoint {
            Endpoint::Chat => {
                let d = if finish.is_some() {
                    serde_json::json!({})
                } else {
                    serde_json::json!({"content": text})
                };
                serde_json::json!({"index": 0, "delta": d, "logprobs": null, "finish_reason": finish})
            }
            Endpoint::Text => {
                serde_json::json!({"index": 0, "text": text, "logprobs": null, "finish_reason": finish})
            }
        };
        self.chunk(choice, None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn via_value<T: DeserializeOwned>(body: &[u8]) -> Result<T, String> {
        let v: serde_json::Value = serde_json::from_slice(body).map_err(|e| e.to_string())?;
        serde_json::from_value(v).map_err(|e| e.to_string())
    }

    /// The typed response body is byte for byte the OpenAI shape (field order included).
    #[test]
    fn completion_bodies_have_the_openai_shape() {
        let usage = UsageCounts {
            prompt_tokens: 5,
            completion_tokens: 2,
            cached_tokens: 1,
        };
        let meta = |endpoint| ResponseMeta {
            id: "chatcmpl-1".into(),
            created: 7,
            model: "m".into(),
            endpoint,
        };
        let chat = meta(Endpoint::Chat);
        assert_eq!(
            serde_json::to_string(&chat.completion("a \"b\"\n", "stop", &usage)).unwrap(),
            r#"{"id":"chatcmpl-1","object":"chat.completion","created":7,"model":"m","choices":[{"index":0,"message":{"role":"assistant","content":"a \"b\"\n"},"logprobs":null,"finish_reason":"stop"}],"usage":{"prompt_tokens":5,"completion_tokens":2,"total_tokens":7,"prompt_tokens_details":{"cached_tokens":1}}}"#
        );
        let text = meta(Endpoint::Text);
        assert_eq!(
            serde_json::to_string(&text.completion("x", "length", &usage)).unwrap(),
            r#"{"id":"chatcmpl-1","object":"text_completion","created":7,"model":"m","choices":[{"index":0,"text":"x","logprobs":null,"finish_reason":"length"}],"usage":{"prompt_tokens":5,"completion_tokens":2,"total_tokens":7,"prompt_tokens_details":{"cached_tokens":1}}}"#
        );
        assert_eq!(usage.to_json()["total_tokens"], 7);
    }

    /// The one-pass parse gives what the `Value` path gives, and errors keep their codes.
    #[test]
    fn direct_parse_agrees_with_the_value_path() {
        let bodies: [&[u8]; 6] = [
            br#"{"model":"m","messages":[{"role":"user","content":"hi"}],"max_tokens":3}"#,
            br#"{"model":"a","model":"b","messages":[]}"#,
            br#"{"messages":[],"model":"m","temperature":0.1,"stop":["x"],"extra":{"k":[1,2]}}"#,
            br#"{"model":"m","messages":[{"role":"user","content":[{"type":"text","text":"t"}]}]}"#,
            br#"{"model":"m","messages":[],"max_tokens":3,"max_tokens":4}"#,
            br#"{"model":"m","messages":[],"seed":18446744073709551615}"#,
        ];
        for b in bodies {
            let fast = parse::<ChatRequest>(b).map(|r| format!("{r:?}"));
            let slow = via_value::<ChatRequest>(b).map(|r| format!("{r:?}"));
            assert_eq!(fast.ok(), slow.ok(), "{}", String::from_utf8_lossy(b));
        }
        let code = |b: &[u8]| parse::<ChatRequest>(b).unwrap_err().code;
        assert_eq!(code(b"[1]"), "invalid_json");
        assert_eq!(code(b"{"), "invalid_json");
        assert_eq!(code(br#"{"messages":[]}"#), "missing_field");
        assert_eq!(code(br#"{"model":1,"messages":[]}"#), "invalid_type");
    }
}
