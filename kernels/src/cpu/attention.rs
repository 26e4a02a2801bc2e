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
        let (hd, group, ctx, bs) = (l.head_dim, self.group(), pos + 1, l.block_size);
        // Rows of one physical block are `row_stride` apart; walking the block table
        // block by block avoids a division per position.
        let row_stride = l.n_kv_heads * hd;
        scores.clear();
        scores.resize(group * ctx, 0.0);
        for (b, &block) in block_table.iter().enumerate().take(ctx.div_ceil(bs)) {
            let first = b * bs;
            let rows = bs.min(ctx - first);
            let base = l.offset(block as usize * bs, kv_head);
            let mut r = 0;
            while r < rows {
                let n = (rows - r).min(DOT_TILE);
                let keys: [&[f32]; DOT_TILE] = std::array::from_fn(|i| {
                    let off = base + (r + i.min(n - 1)) * row_stride;
                    &k_cache[off..off + hd]
                });
                for g in 0..group {
                    let d = dot_tile(&q[g * hd..(g + 1) * hd], &keys);
                    let dst = &mut scores[g * ctx + first + r..][..n];
                    for (s, d) in dst.iter_mut().zip(d) {
                        *s = d * self.scale;
                    }
                }
                r += n;
            }
        }
        for g in 0..group {
            softmax_in_place(&mut scores[g * ctx..(g + 1) * ctx]);
        }
        // out[g] = sum_p w[g][p] * v[p], accumulated in position order per element (the
        // bits of `axpy` applied position by position), PV_TILE elements at a time so
        // that the accumulators stay in registers.
        for g in 0..group {
            let w = &scores[g * ctx..(g + 1) * ctx];
            let o = &mut out[g * hd..(g + 1) * hd];
            let mut e = 0;
            while e < hd {
                let n = (hd - e).min(PV_TILE);
                let mut acc = [0.0f32; PV_TILE];
                for (b, &block) in block_table.iter().enumerate().take(ctx.div_ceil(bs)) {
                    let first = b * bs;
                    let rows = bs.min(ctx - first);
                    let base = l.offset(block as usize * bs, kv_head) + e;
                    for (r, &wp) in w[first..first + rows].iter().enumerate() {
                        let v = &v_cache[base + r * row_stride..][..n];
                        if n == PV_TILE {
                            for i in 0..PV_TILE {
                                acc[i] = wp.mul_add(v[i], acc[i]);
                            }
                        } else {
                            for (a, &x) in acc.iter_mut().zip(v) {
                                *a = wp.mul_add(x, *a);
                            }
                        }
                    }
                }
                o[e..e + n].copy_from_slice(&acc[..n]);
                e += n;
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

/// Keys scored together by [`dot_tile`]: independent FMA chains hide FMA latency.
const DOT_TILE: usize = 8;
/// Output elements accumulated together in the PV product (8 AVX2 registers).
const PV_TILE: usize = 64;

/// `DOT_TILE` dot products of `a` with each of `b`, each with exactly the arithmetic of
/// [`super::dot`] (same lanes, same order, same reduction), so the bits are the same.
#[inline]
fn dot_tile(a: &[f32], b: &[&[f32]; DOT_TILE]) -> [f32; DOT_TILE] {
    #[cfg(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma"
    ))]
    {
        let full = a.len() / 8 * 8;
        if b.iter().all(|b| b.len() == a.len()) {
            // SAFETY: the target features are enabled at compile time, and every load
            // reads 8 elements at `c < full <= len` of a slice of length `len`.
            let lanes = unsafe { dot_tile_avx2(a, b, full) };
            return std::array::from_fn(|j| {
                let mut tail = 0.0f32;
                for (x, y) in a[full..].iter().zip(&b[j][full..]) {
                    tail = x.mul_add(*y, tail);
                }
                let acc = &lanes[j];
                ((acc[0] + acc[4]) + (acc[1] + acc[5]))
                    + ((acc[2] + acc[6]) + (acc[3] + acc[7]))
                    + tail
            });
        }
    }
    std::array::from_fn(|j| super::dot(a, b[j]))
}

/// The 8-lane accumulators of [`dot_tile`] over the first `full` elements.
#[cfg(all(
    target_arch = "x86_64",
    target_feature = "avx2",
    target_feature = "fma"
))]
#[inline]
unsafe fn dot_tile_avx2(a: &[f32], b: &[&[f32]; DOT_TILE], full: usize) -> [[f32; 8]; DOT_TILE] {
    use std::arch::x86_64::*;
    // SAFETY: see the caller.
    unsafe {
        let mut acc = [_mm256_setzero_ps(); DOT_TILE];
        let mut c = 0;
        while c < full {
            let x = _mm256_loadu_ps(a.as_ptr().add(c));
            for j in 0..DOT_TILE {
                acc[j] = _mm256_fmadd_ps(x, _mm256_loadu_ps(b[j].as_ptr().add(c)), acc[j]);
            }
            c += 8;
        }
        std::array::from_fn(|j| std::mem::transmute::<__m256, [f32; 8]>(acc[j]))
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

    use crate::test_util::rand_vec;

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
            hd in prop::sample::select(vec![8usize, 12, 16, 64, 96]),
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
