//! The worker's APIs: OpenAI-compatible HTTP (`http`) and the gateway's gRPC contract
//! (`grpc`). Both turn a request into prompt tokens + `GenerateParams` through the one
//! `Service` here, so validation and error reasons are identical on both.

pub mod error;
pub mod grpc;
pub mod http;
pub mod openai;

use std::sync::Arc;

use crate::chat::{ChatMessage, ChatTemplate};
use crate::engine::{EngineHandle, GenerateParams};
use crate::sampler::SamplingParams;
pub use error::ApiError;

/// Facts about this worker reported by /v1/models, gRPC Info and /metrics.
#[derive(Debug, Clone)]
pub struct WorkerInfo {
    pub model_id: String,
    pub pool: String,
    pub country: String,
    pub backend: String,
    pub context_length: usize,
}

/// What both APIs share: the engine, the chat template and the worker's identity.
#[derive(Clone)]
pub struct Service {
    pub engine: EngineHandle,
    pub chat: Arc<ChatTemplate>,
    pub info: Arc<WorkerInfo>,
}

/// A request's input before tokenization.
pub enum Input {
    Chat(Vec<ChatMessage>),
    Text(String),
    Tokens(Vec<u32>),
}

/// Sampling and limits as the APIs receive them (all optional).
#[derive(Debug, Default, Clone)]
pub struct RequestOptions {
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<i64>,
    pub min_p: Option<f32>,
    pub seed: Option<u64>,
    pub repetition_penalty: Option<f32>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub max_tokens: Option<i64>,
    pub stop: Vec<String>,
    pub priority: i32,
    pub ignore_eos: bool,
}

impl Service {
    /// Check the model name: empty means "this worker's model".
    pub fn check_model(&self, model: &str) -> Result<(), ApiError> {
        if model.is_empty() || model == self.info.model_id {
            Ok(())
        } else {
            Err(ApiError::bad_request(
                "model_not_found",
                format!(
                    "the model `{model}` does not exist on this worker; it serves `{}`",
                    self.info.model_id
                ),
            ))
        }
    }

    /// Tokenize the input and turn options into engine parameters.
    pub fn prepare(
        &self,
        input: Input,
        o: &RequestOptions,
    ) -> Result<(Vec<u32>, GenerateParams), ApiError> {
        let tok = &self.engine.tokenizer;
        let prompt = match input {
            Input::Chat(messages) => {
                if messages.is_empty() {
                    return Err(ApiError::bad_request(
                        "invalid_request",
                        "`messages` must not be empty",
                    ));
                }
                let text = self
                    .chat
                    .render(&messages, true)
                    .map_err(|e| ApiError::bad_request("chat_template_error", e.to_string()))?;
                // Templates that write the BOS token themselves must not get a second one.
                let has_bos = tok
                    .bos()
                    .map(|b| text.starts_with(tok.id_to_token(b).unwrap_or("\u{0}")))
                    .unwrap_or(false);
                tok.encode(&text, !has_bos, true)
            }
            Input::Text(text) => tok.encode(&text, true, true),
            Input::Tokens(ids) => {
                if let Some(bad) = ids
                    .iter()
                    .find(|&&t| t as usize >= self.engine.vocab_size())
                {
                    return Err(ApiError::bad_request(
                        "invalid_token",
                        format!("token id {bad} is outside the vocabulary"),
                    ));
                }
                ids
            }
        };
        let sampling_err = |m: String| ApiError::bad_request("invalid_sampling_params", m);
        let top_k = match o.top_k {
            None | Some(-1) | Some(0) => 0,
            Some(k) if k > 0 => k as usize,
            Some(k) => {
                return Err(sampling_err(format!(
                    "top_k must be -1, 0 or positive, got {k}"
                )));
            }
        };
        let max_tokens = match o.max_tokens {
            None => None,
            Some(n) if n >= 1 => Some(n as usize),
            Some(n) => {
                return Err(sampling_err(format!(
                    "max_tokens must be at least 1, got {n}"
                )));
            }
        };
        let d = SamplingParams::default();
        let sampling = SamplingParams {
            temperature: o.temperature.unwrap_or(1.0),
            top_k,
            top_p: o.top_p.unwrap_or(d.top_p),
            min_p: o.min_p.unwrap_or(d.min_p),
            seed: o.seed,
            repetition_penalty: o.repetition_penalty.unwrap_or(d.repetition_penalty),
            presence_penalty: o.presence_penalty.unwrap_or(d.presence_penalty),
            frequency_penalty: o.frequency_penalty.unwrap_or(d.frequency_penalty),
        };
        sampling
            .validate()
            .map_err(|e| sampling_err(e.to_string()))?;
        if o.stop.len() > 16 {
            return Err(ApiError::bad_request(
                "invalid_request",
                "at most 16 stop strings are allowed",
            ));
        }
        let params = GenerateParams {
            sampling,
            max_tokens,
            stop: o.stop.iter().filter(|s| !s.is_empty()).cloned().collect(),
            priority: o.priority,
            ignore_eos: o.ignore_eos,
        };
        Ok((prompt, params))
    }
}
