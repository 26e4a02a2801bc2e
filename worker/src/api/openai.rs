//! OpenAI request bodies: strict parsing into typed structs, with the first problem
//! reported as a 400 naming the field. Response bodies are built in `http`.

use serde::Deserialize;
use serde::de::DeserializeOwned;

use super::{ApiError, Input, RequestOptions};
use crate::chat::ChatMessage;

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

/// Parse a JSON body into `T`: malformed JSON and wrong types become 400s.
pub fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    let value: serde_json::Value = serde_json::from_slice(body).map_err(|e| {
        ApiError::bad_request(
            "invalid_json",
            format!("the request body is not valid JSON: {e}"),
        )
    })?;
    if !value.is_object() {
        return Err(ApiError::bad_request(
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
        ApiError::bad_request(code, format!("invalid request: {msg}"))
    })
}

impl CommonFields {
    pub fn options(&self) -> Result<RequestOptions, ApiError> {
        if let Some(n) = self.n
            && n != 1
        {
            return Err(
                ApiError::bad_request("unsupported_parameter", "only n = 1 is supported")
                    .with_param("n"),
            );
        }
        if matches!(&self.logprobs, Some(v) if !v.is_null() && v != &serde_json::Value::Bool(false))
        {
            return Err(ApiError::bad_request(
                "unsupported_parameter",
                "logprobs are not supported",
            )
            .with_param("logprobs"));
        }
        let seed = match self.seed {
            None => None,
            Some(s) if s >= 0 => Some(s as u64),
            Some(s) => {
                return Err(ApiError::bad_request(
                    "invalid_sampling_params",
                    format!("seed must be >= 0, got {s}"),
                ));
            }
        };
        let stop = match &self.stop {
            None => Vec::new(),
            Some(StopField::One(s)) => vec![s.clone()],
            Some(StopField::Many(v)) => v.clone(),
        };
        Ok(RequestOptions {
            temperature: self.temperature,
            top_p: self.top_p,
            top_k: self.top_k,
            min_p: self.min_p,
            seed,
            repetition_penalty: self.repetition_penalty,
            presence_penalty: self.presence_penalty,
            frequency_penalty: self.frequency_penalty,
            max_tokens: self.max_completion_tokens.or(self.max_tokens),
            stop,
            priority: self.priority,
            ignore_eos: self.ignore_eos,
        })
    }

    pub fn include_usage(&self) -> bool {
        self.stream_options
            .as_ref()
            .is_some_and(|o| o.include_usage)
    }
}

impl ChatRequest {
    pub fn input(&self) -> Result<Input, ApiError> {
        let mut out = Vec::with_capacity(self.messages.len());
        for (i, m) in self.messages.iter().enumerate() {
            if !matches!(
                m.role.as_str(),
                "system" | "developer" | "user" | "assistant" | "tool"
            ) {
                return Err(ApiError::bad_request(
                    "invalid_request",
                    format!("messages[{i}].role `{}` is not a known role", m.role),
                ));
            }
            let content = match &m.content {
                None => String::new(),
                Some(MessageContent::Text(t)) => t.clone(),
                Some(MessageContent::Parts(parts)) => {
                    let mut s = String::new();
                    for p in parts {
                        match (p.kind.as_str(), &p.text) {
                            ("text", Some(t)) => s.push_str(t),
                            (kind, _) => {
                                return Err(ApiError::bad_request(
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
                m.role.clone()
            };
            out.push(ChatMessage { role, content });
        }
        Ok(Input::Chat(out))
    }
}

impl CompletionRequest {
    pub fn input(&self) -> Result<Input, ApiError> {
        if self.echo {
            return Err(
                ApiError::bad_request("unsupported_parameter", "echo is not supported")
                    .with_param("echo"),
            );
        }
        match &self.prompt {
            PromptField::Text(t) => Ok(Input::Text(t.clone())),
            PromptField::Tokens(t) => Ok(Input::Tokens(t.clone())),
            PromptField::Texts(v) if v.len() == 1 => Ok(Input::Text(v[0].clone())),
            PromptField::Texts(_) => Err(ApiError::bad_request(
                "unsupported_parameter",
                "batched prompts are not supported; send one prompt per request",
            )
            .with_param("prompt")),
        }
    }
}
