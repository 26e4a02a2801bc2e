//! The `Backend` trait: executes one step's forward pass over the paged KV cache.
//!
//! A backend owns the KV-cache *storage* and the weights in its memory; it never decides
//! which blocks a sequence gets (the block manager does) nor what runs this step (the
//! scheduler does). Given the step's token chunks and block tables, it writes K/V into the
//! named slots and returns logits for the sequences that need a sample.

pub mod cpu;
pub mod cuda;

/// One sequence's share of a step.
#[derive(Debug, Clone)]
pub struct SeqChunk<'a> {
    /// Token ids at positions `start..start + tokens.len()`.
    pub tokens: &'a [u32],
    pub start: usize,
    /// Physical KV blocks of the sequence, covering at least `start + tokens.len()`.
    pub block_table: &'a [u32],
    /// Whether to return logits for the chunk's last token.
    pub want_logits: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("position {pos} is beyond the KV blocks given ({blocks} blocks of {block_size})")]
    BlockTableTooShort {
        pos: usize,
        blocks: usize,
        block_size: usize,
    },
    #[error("block id {0} is outside the KV cache")]
    BadBlock(u32),
    #[error("token id {0} is outside the vocabulary")]
    BadToken(u32),
    #[error("position {0} is beyond the model's maximum context")]
    PositionTooLarge(usize),
    #[error("{0}")]
    Device(String),
}

/// Checks a step against a backend's limits (positions, block tables, block ids, token
/// ids) and returns its token count. Shared by every backend, so they refuse the same
/// inputs with the same errors.
pub fn check_chunks(
    chunks: &[SeqChunk<'_>],
    max_pos: usize,
    block_size: usize,
    num_blocks: usize,
    vocab_size: usize,
) -> Result<usize, BackendError> {
    let mut total = 0;
    for c in chunks {
        let end = c.start + c.tokens.len();
        if end > max_pos {
            return Err(BackendError::PositionTooLarge(end.saturating_sub(1)));
        }
        if c.block_table.len() * block_size < end {
            return Err(BackendError::BlockTableTooShort {
                pos: end.saturating_sub(1),
                blocks: c.block_table.len(),
                block_size,
            });
        }
        if let Some(&b) = c.block_table.iter().find(|&&b| b as usize >= num_blocks) {
            return Err(BackendError::BadBlock(b));
        }
        if let Some(&t) = c.tokens.iter().find(|&&t| t as usize >= vocab_size) {
            return Err(BackendError::BadToken(t));
        }
        total += c.tokens.len();
    }
    Ok(total)
}

pub trait Backend: Send {
    /// Short name for /metrics and Info ("cpu", "cuda:0").
    fn name(&self) -> String;
    /// Number of KV blocks the backend holds.
    fn num_kv_blocks(&self) -> usize;
    /// Run one step. Returns `vocab_size` logits for each chunk with `want_logits`, in
    /// chunk order, concatenated.
    fn forward(&mut self, chunks: &[SeqChunk<'_>]) -> Result<Vec<f32>, BackendError>;
}

/// Bytes one KV block takes across all layers (f32 K and V).
pub fn kv_block_bytes(cfg: &crate::model::ModelConfig, block_size: usize) -> usize {
    2 * cfg.n_layers * block_size * cfg.n_kv_heads * cfg.head_dim * std::mem::size_of::<f32>()
}
