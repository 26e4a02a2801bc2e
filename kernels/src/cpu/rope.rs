//! Rotary position embeddings, and the fused "rotate q/k, then write k/v into the paged
//! cache" kernel.

use crate::KvLayout;

/// Which dimensions form a rotation pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeStyle {
    /// Pairs `(2i, 2i+1)`: GGUF llama files (llama.cpp permutes q/k weights at conversion).
    Interleaved,
    /// Pairs `(i, i + d/2)`: Hugging Face checkpoints ("rotate_half").
    Half,
}

/// Precomputed `cos`/`sin` for positions `0..max_pos` and `rot_dim / 2` frequencies.
#[derive(Debug, Clone)]
pub struct RopeTable {
    pub style: RopeStyle,
    pub rot_dim: usize,
    max_pos: usize,
    cos: Vec<f32>,
    sin: Vec<f32>,
}

impl RopeTable {
    /// `inv_freq[i]` is the angular frequency of pair `i` (already including any scaling);
    /// use [`RopeTable::inv_freq`] for the plain Llama frequencies.
    pub fn new(style: RopeStyle, inv_freq: &[f64], max_pos: usize) -> Self {
        let half = inv_freq.len();
        let mut cos = Vec::with_capacity(max_pos * half);
        let mut sin = Vec::with_capacity(max_pos * half);
        for p in 0..max_pos {
            for f in inv_freq {
                let theta = p as f64 * f;
                cos.push(theta.cos() as f32);
                sin.push(theta.sin() as f32);
            }
        }
        Self {
            style,
            rot_dim: half * 2,
            max_pos,
            cos,
            sin,
        }
    }

    /// Plain Llama frequencies: `base^(-2i/rot_dim)`.
    pub fn inv_freq(base: f64, rot_dim: usize) -> Vec<f64> {
        (0..rot_dim / 2)
            .map(|i| base.powf(-((2 * i) as f64) / rot_dim as f64))
            .collect()
    }

    pub fn max_pos(&self) -> usize {
        self.max_pos
    }

    /// Rotate one head vector in place for position `pos` (must be `< max_pos`).
    pub fn rotate(&self, x: &mut [f32], pos: usize) {
        let half = self.rot_dim / 2;
        let cos = &self.cos[pos * half..(pos + 1) * half];
        let sin = &self.sin[pos * half..(pos + 1) * half];
        match self.style {
            RopeStyle::Interleaved => {
                for i in 0..half {
                    let (a, b) = (x[2 * i], x[2 * i + 1]);
                    x[2 * i] = a * cos[i] - b * sin[i];
                    x[2 * i + 1] = a * sin[i] + b * cos[i];
                }
            }
            RopeStyle::Half => {
                for i in 0..half {
                    let (a, b) = (x[i], x[i + half]);
                    x[i] = a * cos[i] - b * sin[i];
                    x[i + half] = a * sin[i] + b * cos[i];
                }
            }
        }
    }
}

/// Fused kernel for one token: rotate every query head of `q` and every KV head of `k`
/// for position `pos`, then store `k` and `v` at cache `slot`.
///
/// `q` is `[n_heads][head_dim]`, `k`/`v` are `[n_kv_heads][head_dim]`.
#[allow(clippy::too_many_arguments)]
pub fn rope_and_write_kv(
    table: &RopeTable,
    layout: &KvLayout,
    pos: usize,
    slot: usize,
    q: &mut [f32],
    k: &mut [f32],
    v: &[f32],
    k_cache: &mut [f32],
    v_cache: &mut [f32],
) {
    let hd = layout.head_dim;
    for head in q.chunks_exact_mut(hd) {
        table.rotate(head, pos);
    }
    for head in k.chunks_exact_mut(hd) {
        table.rotate(head, pos);
    }
    let start = layout.offset(slot, 0);
    let n = layout.n_kv_heads * hd;
    k_cache[start..start + n].copy_from_slice(k);
    v_cache[start..start + n].copy_from_slice(v);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotation_preserves_norm_and_position_zero_is_identity() {
        for style in [RopeStyle::Interleaved, RopeStyle::Half] {
            let t = RopeTable::new(style, &RopeTable::inv_freq(10000.0, 8), 64);
            let orig: Vec<f32> = (0..8).map(|i| i as f32 - 3.5).collect();
            let mut x = orig.clone();
            t.rotate(&mut x, 0);
            assert_eq!(x, orig);
            t.rotate(&mut x, 37);
            let n0: f32 = orig.iter().map(|v| v * v).sum();
            let n1: f32 = x.iter().map(|v| v * v).sum();
            assert!((n0 - n1).abs() < 1e-3);
        }
    }

    #[test]
    fn relative_property_of_dot_products() {
        // <R(p)q, R(p+d)k> depends only on d.
        let t = RopeTable::new(RopeStyle::Half, &RopeTable::inv_freq(10000.0, 16), 128);
        let q: Vec<f32> = (0..16).map(|i| (i as f32 * 0.37).sin()).collect();
        let k: Vec<f32> = (0..16).map(|i| (i as f32 * 0.91).cos()).collect();
        let at = |p: usize, d: usize| {
            let (mut a, mut b) = (q.clone(), k.clone());
            t.rotate(&mut a, p);
            t.rotate(&mut b, p + d);
            crate::cpu::dot(&a, &b)
        };
        assert!((at(3, 5) - at(40, 5)).abs() < 1e-4);
    }
}
