//! Model description and weights: one `ModelConfig` + `Weights` whatever the file format.
//!
//! GGUF files (`gguf`) and Hugging Face safetensors directories (`safetensors`) both load
//! into the same structs here; the backends only ever see these. Nothing here runs a
//! forward pass.

pub mod config;
pub mod gguf;
pub mod safetensors;
pub mod weights;

pub use config::{ModelConfig, RopeScaling};
pub use weights::{LayerWeights, Matrix, Weights};

use std::path::Path;

use crate::tokenizer::Tokenizer;

/// Everything loaded from a model file or directory.
pub struct LoadedModel {
    pub config: ModelConfig,
    pub weights: Weights,
    pub tokenizer: std::sync::Arc<Tokenizer>,
    /// Jinja chat template, if the model ships one.
    pub chat_template: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(transparent)]
    Gguf(#[from] gguf::GgufError),
    #[error(transparent)]
    Safetensors(#[from] safetensors::SafetensorsError),
    #[error("{file}: {reason}")]
    Invalid { file: String, reason: String },
    #[error("{file}: tokenizer: {reason}")]
    Tokenizer { file: String, reason: String },
}

/// Load a GGUF file or a Hugging Face model directory.
pub fn load(path: &Path) -> Result<LoadedModel, LoadError> {
    if path.is_dir() {
        safetensors::load_dir(path)
    } else {
        weights::load_gguf(path)
    }
}
