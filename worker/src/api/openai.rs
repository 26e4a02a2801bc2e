//! OpenAI request bodies: parsed by the shared wire contract (`proto::openai`), mapped
//! here into the worker's own request options. Response bodies are built in `http`.

pub use proto::openai::{ChatRequest, CommonFields, CompletionRequest, Prompt, WireError, parse};

use super::{ApiError, Input, RequestOptions};
use crate::chat::ChatMessage;

impl From<WireError> for ApiError {
    fn from(e: WireError) -> Self {
        let mut a = ApiError::bad_request(e.code, e.message);
        a.param = e.param;
        a
    }
}

/// The worker's options for a request's common fields.
pub fn options(c: &CommonFields) -> Result<RequestOptions, ApiError> {
    c.check_supported()?;
    Ok(RequestOptions {
        temperature: c.temperature,
        top_p: c.top_p,
        top_k: c.top_k,
        min_p: c.min_p,
        seed: c.seed()?,
        repetition_penalty: c.repetition_penalty,
        presence_penalty: c.presence_penalty,
        frequency_penalty: c.frequency_penalty,
        max_tokens: c.max_tokens(),
        stop: c.stop_list(),
        priority: c.priority,
        ignore_eos: c.ignore_eos,
    })
}

pub fn chat_input(r: &mut ChatRequest) -> Result<Input, ApiError> {
    Ok(Input::Chat(
        r.take_messages()?
            .into_iter()
            .map(|m| ChatMessage {
                role: m.role,
                content: m.content,
            })
            .collect(),
    ))
}

pub fn completion_input(r: &CompletionRequest) -> Result<Input, ApiError> {
    Ok(match r.prompt()? {
        Prompt::Text(t) => Input::Text(t),
        Prompt::Tokens(t) => Input::Tokens(t),
    })
}
