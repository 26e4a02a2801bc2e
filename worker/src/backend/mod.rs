//! The `Backend` trait: executes one step's forward pass over the paged KV cache.
//!
//! A backend owns the KV-cache *storage* and the weights in its memory; it never decides
//! which blocks a sequence gets (the block manager does) nor what runs this step (the
//! scheduler does). Given the step's token chunks and block tables, it writes K/V into the
//! named slots and returns logits for the sequences that need a sample.

pub mod compare;
pub mod cpu;
pub mod cuda;
pub mod kv_scales;

pub use crate::sampler::{Penalties, RowPick, RowPlan};

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
    #[error("KV cache scales: {0}")]
    KvScales(String),
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

    /// Run one step for the engine: like [`Backend::forward`], but each chunk with
    /// `want_logits` has a [`RowPlan`] (one per such chunk, in order; missing ones count
    /// as [`RowPick::Host`]): the backend picks the [`RowPick::Greedy`] rows itself
    /// ([`crate::sampler::greedy_pick`]'s rule, after the plan's penalties), may draw the
    /// [`RowPick::Sample`] ones (with the sampler's semantics, penalties and the planned
    /// draw), and returns the logits of the rows it did not pick, as the model computed
    /// them (the sampler applies the penalties). A GPU backend thereby copies one id per
    /// row instead of a vocabulary of logits. This default picks the unpenalized greedy
    /// rows on the host.
    fn forward_step(
        &mut self,
        chunks: &[SeqChunk<'_>],
        plans: &[RowPlan],
    ) -> Result<StepOutput, BackendError> {
        let logits = self.forward(chunks)?;
        let vocab = self.vocab_size().max(1);
        let greedy: Vec<bool> = (0..logits.len() / vocab)
            .map(|i| {
                plans
                    .get(i)
                    .is_some_and(|p| p.pick == RowPick::Greedy && p.penalties.is_none())
            })
            .collect();
        Ok(pick_greedy_rows(logits, &greedy, vocab))
    }

    /// Logits per row.
    fn vocab_size(&self) -> usize;

    /// Sets the FP8 cache's per-(layer, KV head) scales (before the first step: values
    /// already cached keep the scales they were written with). Refused when the cache is
    /// not FP8 or the scales do not fit the model.
    fn set_kv_scales(&mut self, _scales: &kv_scales::KvScales) -> Result<(), BackendError> {
        Err(BackendError::KvScales(format!(
            "the {} backend has no FP8 KV cache",
            self.name()
        )))
    }
}

/// What [`Backend::forward_step`] returns.
#[derive(Debug, Default)]
pub struct StepOutput {
    /// The picked token of each wanted row, `None` where the engine samples it.
    pub picked: Vec<Option<u32>>,
    /// `vocab_size` logits for each row with `picked == None`, in order, concatenated.
    pub logits: Vec<f32>,
}

/// [`Backend::forward_step`] on the host: picks the greedy rows of `logits` and keeps the
/// others.
pub fn pick_greedy_rows(mut logits: Vec<f32>, greedy: &[bool], vocab: usize) -> StepOutput {
    let mut picked = Vec::with_capacity(greedy.len());
    let mut kept = 0;
    for (i, &g) in greedy.iter().enumerate() {
        let Some(row) = logits.get_mut(i * vocab..(i + 1) * vocab) else {
            break;
        };
        if g {
            picked.push(Some(crate::sampler::greedy_pick(row)));
        } else {
            if kept != i {
                logits.copy_within(i * vocab..(i + 1) * vocab, kept * vocab);
            }
            kept += 1;
            picked.push(None);
        }
    }
    logits.truncate(kept * vocab);
    StepOutput { picked, logits }
}

/// How the KV cache stores K and V.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KvDtype {
    /// The device's native precision: f32 on the CPU, bf16 on CUDA.
    #[default]
    Auto,
    /// OCP FP8 E4M3 with one scale per (layer, KV head) for K and for V (docs/kernels.md).
    /// On CUDA the cache holds the e4m3 codes (half of bf16's memory). The CPU backend
    /// stores every K/V value rounded to e4m3 in its f32 cache: the same values the GPU
    /// attends over, without the memory saving.
    Fp8,
}

/// The default scale of every (layer, KV head) of an FP8 cache: values are stored as
/// e4m3(value / scale). 1.0 keeps e4m3's 1/16 relative precision for magnitudes from
/// 2^-6 to 448; `worker calibrate-kv` measures scales per head that map each head's
/// largest value near 448 instead ([`kv_scales`], `--kv-cache-scales`).
pub const KV_FP8_SCALE: f32 = 1.0;

/// `x` as the FP8 cache stores it at the default scale (see [`KvDtype::Fp8`]).
#[inline]
pub fn fp8_round(x: f32) -> f32 {
    fp8_round_scaled(x, KV_FP8_SCALE)
}

/// `x` as the FP8 cache stores it in a head of scale `scale`: e4m3(x / scale) * scale,
/// as the CUDA kernels encode and decode it.
#[inline]
pub fn fp8_round_scaled(x: f32, scale: f32) -> f32 {
    kernels::gpu_ref::from_e4m3(kernels::gpu_ref::to_e4m3(x / scale)) * scale
}

/// Bytes one KV block takes across all layers (f32 K and V).
pub fn kv_block_bytes(cfg: &crate::model::ModelConfig, block_size: usize) -> usize {
    2 * cfg.n_layers * block_size * cfg.n_kv_heads * cfg.head_dim * std::mem::size_of::<f32>()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The GPU's `argmax_rows` (checked against `gpu_ref::argmax_rows` on a GPU) and the
    /// host's greedy pick agree, specials included, so a backend may pick for the sampler.
    #[test]
    fn greedy_pick_is_the_gpu_argmax_rule() {
        let specials = [
            f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::MAX,
            0.0,
            2.5,
        ];
        let mut s = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s
        };
        for _ in 0..2000 {
            let n = 1 + (next() % 40) as usize;
            let row: Vec<f32> = (0..n)
                .map(|_| {
                    let r = next();
                    if r % 4 == 0 {
                        specials[(r >> 8) as usize % specials.len()]
                    } else {
                        ((r >> 16) % 7) as f32 - 3.0
                    }
                })
                .collect();
            let want = kernels::gpu_ref::argmax_rows(&row, n)[0];
            let mut copy = row.clone();
            assert_eq!(crate::sampler::greedy_pick(&mut copy), want, "{row:?}");
        }
    }

    /// The default `forward_step` picks only unpenalized greedy rows: a greedy row with
    /// penalties goes back as the model's logits (the sampler applies the penalties).
    #[test]
    fn the_default_step_leaves_penalized_greedy_rows_to_the_sampler() {
        struct Fixed;
        impl Backend for Fixed {
            fn name(&self) -> String {
                "fixed".into()
            }
            fn num_kv_blocks(&self) -> usize {
                1
            }
            fn vocab_size(&self) -> usize {
                3
            }
            fn forward(&mut self, chunks: &[SeqChunk<'_>]) -> Result<Vec<f32>, BackendError> {
                Ok(chunks.iter().flat_map(|_| [1.0, 9.0, 2.0]).collect())
            }
        }
        let table = [0u32];
        let chunk = SeqChunk {
            tokens: &[1],
            start: 0,
            block_table: &table,
            want_logits: true,
        };
        let pen = Penalties {
            repetition: 10.0,
            entries: vec![(1, 0.0)],
        };
        let plans = [
            RowPlan::from(RowPick::Greedy),
            RowPlan {
                pick: RowPick::Greedy,
                penalties: Some(pen),
            },
        ];
        let out = Fixed.forward_step(&[chunk.clone(), chunk], &plans).unwrap();
        assert_eq!(out.picked, vec![Some(1), None]);
        assert_eq!(out.logits, vec![1.0, 9.0, 2.0]);
    }

    #[test]
    fn pick_greedy_rows_keeps_the_other_rows_in_order() {
        let logits = vec![0.0, 5.0, 1.0, 7.0, 9.0, 2.0, 3.0, 3.0];
        let out = pick_greedy_rows(logits, &[true, false, true, false], 2);
        assert_eq!(out.picked, vec![Some(1), None, Some(0), None]);
        assert_eq!(out.logits, vec![1.0, 7.0, 3.0, 3.0]);
        let all = pick_greedy_rows(vec![1.0, 2.0], &[false], 2);
        assert_eq!(all.picked, vec![None]);
        assert_eq!(all.logits, vec![1.0, 2.0]);
    }
}
