//! Kernels for the worker's model forward pass.
//!
//! `cpu` holds the reference kernels: plain, deterministic f32 code with exactly the
//! semantics the CUDA kernels (issue 5) must reproduce. The CPU backend runs them directly,
//! so they are also written to be reasonably fast (contiguous inner loops that LLVM
//! vectorizes). This crate knows nothing of HTTP, scheduling or model files.

pub mod cpu;
pub mod cuda;
pub mod gpu_ref;

/// Deterministic pseudo-random test inputs shared by the kernels' tests.
#[cfg(test)]
pub(crate) mod test_util {
    /// Deterministic pseudo-random values in [-1, 1).
    pub fn rand_vec(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407)
            | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0
            })
            .collect()
    }
}

/// Layout of one layer's paged KV cache: `[num_blocks][block_size][n_kv_heads][head_dim]`,
/// f32, row-major. A token at logical position `p` of a sequence lives in physical block
/// `block_table[p / block_size]`, row `p % block_size`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvLayout {
    pub num_blocks: usize,
    pub block_size: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
}

impl KvLayout {
    /// Elements in one layer's K (or V) cache.
    pub fn elements(&self) -> usize {
        self.num_blocks * self.block_size * self.n_kv_heads * self.head_dim
    }

    /// Offset of the `head_dim` vector for `(slot, kv_head)`, where
    /// `slot = block * block_size + row`.
    #[inline]
    pub fn offset(&self, slot: usize, kv_head: usize) -> usize {
        (slot * self.n_kv_heads + kv_head) * self.head_dim
    }

    /// Physical slot of logical position `pos` under `block_table`.
    #[inline]
    pub fn slot(&self, block_table: &[u32], pos: usize) -> usize {
        block_table[pos / self.block_size] as usize * self.block_size + pos % self.block_size
    }
}
