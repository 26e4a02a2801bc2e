//! Causal attention over the paged KV cache (decode, prefill and chunked prefill are the
//! same kernel: a query at logical position `p` sees positions `0..=p`).

use super::{axpy, dot, softmax_in_place};
use crate::KvLayout;

/// Paged attention for one layer.
#[derive(Debug, Clone, Copy)]
pub struct PagedAttention {
    pub layout: KvLayout,
    /// Query heads; a multiple of `layout.n_kv_heads` (GQA group = n_heads / n_kv_heads).
    pub n_heads: usize,
    /// Usually `1 / sqrt(head_dim)`.
    pub scale: f32,
}

impl PagedAttention {
    pub fn group(&self) -> usize {
        self.n_heads / self.layout.n_kv_heads
    }

    /// One query head at logical position `pos` (so it attends to `pos + 1` keys).
    /// `scores` is scratch space, resized as needed. `out` is `head_dim` long.
    #[allow(clippy::too_many_arguments)]
    pub fn head(
        &self,
        q: &[f32],
        head: usize,
        pos: usize,
        block_table: &[u32],
        k_cache: &[f32],
        v_cache: &[f32],
        scores: &mut Vec<f32>,
        out: &mut [f32],
    ) {
        let l = &self.layout;
        let kv_head = head / self.group();
        let hd = l.head_dim;
        let ctx = pos + 1;
        scores.clear();
        for p in 0..ctx {
            let off = l.offset(l.slot(block_table, p), kv_head);
            scores.push(dot(q, &k_cache[off..off + hd]) * self.scale);
        }
        softmax_in_place(scores);
        out.fill(0.0);
        for (p, &w) in scores.iter().enumerate() {
            let off = l.offset(l.slot(block_table, p), kv_head);
            axpy(w, &v_cache[off..off + hd], out);
        }
    }

    /// Every query head of one KV head's GQA group at logical position `pos`: `q` and
    /// `out` are `[group][head_dim]`. Each K/V row is read once for the whole group; per
    /// head the arithmetic is exactly [`PagedAttention::head`]'s (same bits).
    #[allow(clippy::too_many_arguments)]
    pub fn group_heads(
        &self,
        q: &[f32],
        kv_head: usize,
        pos: usize,
        block_table: &[u32],
        k_cache: &[f32],
        v_cache: &[f32],
        scores: &mut Vec<f32>,
        out: &mut [f32],
    ) {
        let l = &self.layout;
        let (hd, group, ctx) = (l.head_dim, self.group(), pos + 1);
        scores.clear();
        scores.resize(group * ctx, 0.0);
        for p in 0..ctx {
            let off = l.offset(l.slot(block_table, p), kv_head);
            let k = &k_cache[off..off + hd];
            for g in 0..group {
                scores[g * ctx + p] = dot(&q[g * hd..(g + 1) * hd], k) * self.scale;
            }
        }
        for g in 0..group {
            softmax_in_place(&mut scores[g * ctx..(g + 1) * ctx]);
        }
        out.fill(0.0);
        for p in 0..ctx {
            let off = l.offset(l.slot(block_table, p), kv_head);
            let v = &v_cache[off..off + hd];
            for g in 0..group {
                axpy(scores[g * ctx + p], v, &mut out[g * hd..(g + 1) * hd]);
            }
        }
    }

    /// All heads of `n_tokens` consecutive query tokens whose first logical position is
    /// `q_start`. `q` and `out` are `[n_tokens][n_heads][head_dim]`.
    #[allow(clippy::too_many_arguments)]
    pub fn run(
        &self,
        q: &[f32],
        q_start: usize,
        n_tokens: usize,
        block_table: &[u32],
        k_cache: &[f32],
        v_cache: &[f32],
        out: &mut [f32],
    ) {
        let hd = self.layout.head_dim;
        let mut scores = Vec::new();
        for t in 0..n_tokens {
            for h in 0..self.n_heads {
                let base = (t * self.n_heads + h) * hd;
                self.head(
                    &q[base..base + hd],
                    h,
                    q_start + t,
                    block_table,
                    k_cache,
                    v_cache,
                    &mut scores,
                    &mut out[base..base + hd],
                );
            }
        }
    }
}

/// Naive dense causal attention, the textbook definition the paged kernel is tested
/// against. `q` is `[T][n_heads][hd]`, `k`/`v` are `[T][n_kv_heads][hd]`.
pub fn dense_causal_attention(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    n_heads: usize,
    n_kv_heads: usize,
    hd: usize,
    scale: f32,
) -> Vec<f32> {
    let t_len = q.len() / (n_heads * hd);
    let group = n_heads / n_kv_heads;
    let mut out = vec![0.0f32; q.len()];
    for t in 0..t_len {
        for h in 0..n_heads {
            let kvh = h / group;
            let qv = &q[(t * n_heads + h) * hd..][..hd];
            let mut s: Vec<f64> = (0..=t)
                .map(|j| {
                    let kv = &k[(j * n_kv_heads + kvh) * hd..][..hd];
                    qv.iter()
                        .zip(kv)
                        .map(|(a, b)| *a as f64 * *b as f64)
                        .sum::<f64>()
                        * scale as f64
                })
                .collect();
            let m = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let mut z = 0.0;
            for x in s.iter_mut() {
                *x = (*x - m).exp();
                z += *x;
            }
            let o = &mut out[(t * n_heads + h) * hd..][..hd];
            for (j, w) in s.iter().enumerate() {
                let vv = &v[(j * n_kv_heads + kvh) * hd..][..hd];
                for d in 0..hd {
                    o[d] += (w / z * vv[d] as f64) as f32;
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Deterministic pseudo-random values in [-1, 1).
    fn rand_vec(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0
            })
            .collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        /// Scatter K/V into randomly permuted physical blocks, run the paged kernel for a
        /// chunk of queries at the end of the sequence, compare with dense attention.
        #[test]
        fn paged_equals_dense(
            ctx in 1usize..80,
            chunk_frac in 0.0f64..1.0,
            n_kv in 1usize..4,
            group in prop::sample::select(vec![1usize, 2, 4]),
            hd in prop::sample::select(vec![8usize, 16, 64]),
            seed in any::<u64>(),
        ) {
            let n_heads = n_kv * group;
            let bs = 16;
            let n_blocks_seq = ctx.div_ceil(bs);
            let num_blocks = n_blocks_seq + 3;
            // A scrambled block table: physical ids reversed and offset.
            let table: Vec<u32> = (0..n_blocks_seq).map(|i| (num_blocks - 1 - i) as u32).collect();
            let layout = KvLayout { num_blocks, block_size: bs, n_kv_heads: n_kv, head_dim: hd };
            let q = rand_vec(ctx * n_heads * hd, seed);
            let k = rand_vec(ctx * n_kv * hd, seed ^ 1);
            let v = rand_vec(ctx * n_kv * hd, seed ^ 2);
            let mut kc = vec![f32::NAN; layout.elements()];
            let mut vc = vec![f32::NAN; layout.elements()];
            for p in 0..ctx {
                let off = layout.offset(layout.slot(&table, p), 0);
                kc[off..off + n_kv * hd].copy_from_slice(&k[p * n_kv * hd..(p + 1) * n_kv * hd]);
                vc[off..off + n_kv * hd].copy_from_slice(&v[p * n_kv * hd..(p + 1) * n_kv * hd]);
            }
            let scale = 1.0 / (hd as f32).sqrt();
            let dense = dense_causal_attention(&q, &k, &v, n_heads, n_kv, hd, scale);
            let n_q = ((ctx as f64 * chunk_frac) as usize).clamp(1, ctx);
            let q_start = ctx - n_q;
            let attn = PagedAttention { layout, n_heads, scale };
            let mut out = vec![0.0; n_q * n_heads * hd];
            attn.run(&q[q_start * n_heads * hd..], q_start, n_q, &table, &kc, &vc, &mut out);
            let want = &dense[q_start * n_heads * hd..];
            for (a, b) in out.iter().zip(want) {
                prop_assert!((a - b).abs() < 1e-5, "{a} vs {b}");
            }
            // The grouped kernel gives the per-head kernel's bits.
            let mut grouped = vec![0.0; n_q * n_heads * hd];
            let mut scores = Vec::new();
            for t in 0..n_q {
                for kvh in 0..n_kv {
                    let base = (t * n_heads + kvh * group) * hd;
                    attn.group_heads(
                        &q[(q_start + t) * n_heads * hd + kvh * group * hd..][..group * hd],
                        kvh,
                        q_start + t,
                        &table,
                        &kc,
                        &vc,
                        &mut scores,
                        &mut grouped[base..base + group * hd],
                    );
                }
            }
            prop_assert_eq!(
                grouped.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                out.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
            );
        }
    }
}
