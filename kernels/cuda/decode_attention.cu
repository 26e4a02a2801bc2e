// Paged decode attention: one query token per sequence against its whole context in the
// paged KV cache. CPU reference: kernels::cpu::PagedAttention::group_heads (same math in
// f32; here K/V/Q are bf16 and every sum is f32).
//
// Layouts (row-major):
//   q            [num_seqs] rows of q_stride elements, the query heads first in each
//                row ([n_heads][HD]; q_stride > n_heads * HD reads q out of a fused
//                q|k|v projection)
//   k/v cache    [num_blocks][16][n_kv_heads][HD] bf16 (one layer)
//   block_tables [num_seqs][max_blocks] int   (physical block of logical block i)
//   seq_lens     [num_seqs] int               (context length, the new token included)
//   out          [num_seqs][n_heads][HD] bf16
//
// Grid: (num_seqs, n_kv_heads, num_splits); 128 threads. One CTA serves every query head
// of one KV head's GQA group, so each K/V row is read from memory once per group. The
// context is cut into `num_splits` contiguous ranges (split-KV, for when sequences x KV
// heads are too few CTAs to fill the GPU); each CTA walks its range in chunks of PART
// tokens with an online softmax (running max and sum, accumulators rescaled per chunk).
// The chunk's slice of the block table is prefetched into shared memory; K and V rows
// are read with 16-byte loads, SUB lanes per row.
//
// num_splits == 1: the CTA writes `out`. Otherwise it writes its normalised partial
// output and its (max, sum) to part_out [num_seqs][n_heads][num_splits][HD] f32 and
// part_ml [num_seqs][n_heads][num_splits][2] f32, and decode_attention_merge combines
// the splits with a log-sum-exp merge.
#include "common.cuh"

namespace sov {

constexpr int DA_THREADS = 128;
constexpr int DA_WARPS = DA_THREADS / 32;
constexpr int DA_PART = 256;  // tokens per chunk (a multiple of KV_BLOCK)

template <int HD, int GROUP>
__device__ __forceinline__ void decode_attention_impl(
    const sov::bf16* __restrict__ q, const sov::bf16* __restrict__ k_cache,
    const sov::bf16* __restrict__ v_cache, const int* __restrict__ block_tables,
    const int* __restrict__ seq_lens, sov::bf16* __restrict__ out,
    float* __restrict__ part_out, float* __restrict__ part_ml, int n_kv_heads,
    int max_blocks, int num_splits, float scale, int q_stride) {
  constexpr int CHUNKS = HD / 8;              // 16-byte pieces of one row
  constexpr int SUB = CHUNKS <= 8 ? 8 : 16;   // lanes per row (a power of two)
  constexpr int ROWS_PER_WARP = 32 / SUB;
  constexpr int ROWS_PER_PASS = DA_WARPS * ROWS_PER_WARP;
  static_assert(HD % 8 == 0 && CHUNKS <= SUB, "head_dim must be 8..128, a multiple of 8");
  static_assert(DA_PART % KV_BLOCK == 0, "chunk must hold whole blocks");

  __shared__ int s_blocks[DA_PART / KV_BLOCK];
  __shared__ float s_p[GROUP][DA_PART];
  __shared__ float s_m[GROUP], s_l[GROUP], s_rescale[GROUP];
  __shared__ float s_acc[DA_WARPS][GROUP][HD];

  const int seq = blockIdx.x, kvh = blockIdx.y, split = blockIdx.z;
  const int n_heads = n_kv_heads * GROUP;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int sub = lane / SUB, lsub = lane % SUB;
  const bool has = lsub < CHUNKS;
  const int len = seq_lens[seq];
  // This split's token range, whole chunks except the last.
  const int chunks_total = (len + DA_PART - 1) / DA_PART;
  const int chunks_per_split = (chunks_total + num_splits - 1) / num_splits;
  const int begin = split * chunks_per_split * DA_PART;
  const int end = min(len, begin + chunks_per_split * DA_PART);

  // This lane's slice of each query head of the group.
  float qr[GROUP][8];
#pragma unroll
  for (int g = 0; g < GROUP; ++g) {
    if (has) {
      load8(q + (long long)seq * q_stride + (kvh * GROUP + g) * HD + lsub * 8, qr[g]);
    } else {
#pragma unroll
      for (int i = 0; i < 8; ++i) qr[g][i] = 0.f;
    }
  }
  float acc[GROUP][8];
#pragma unroll
  for (int g = 0; g < GROUP; ++g)
#pragma unroll
    for (int i = 0; i < 8; ++i) acc[g][i] = 0.f;
  if (threadIdx.x < GROUP) {
    s_m[threadIdx.x] = sov::neg_inf();
    s_l[threadIdx.x] = 0.f;
  }
  const long long row_stride = (long long)n_kv_heads * HD;
  const int* bt = block_tables + (long long)seq * max_blocks;

#pragma unroll 1
  for (int c0 = begin; c0 < end; c0 += DA_PART) {
    const int n = min(DA_PART, end - c0);
    for (int i = threadIdx.x; i < (n + KV_BLOCK - 1) / KV_BLOCK; i += DA_THREADS)
      s_blocks[i] = bt[c0 / KV_BLOCK + i];
    __syncthreads();

    // Scores: each SUB-lane group takes one key row per pass.
#pragma unroll 2
    for (int t0 = warp * ROWS_PER_WARP; t0 < n; t0 += ROWS_PER_PASS) {
      const int t = t0 + sub;
      float kf[8];
      if (t < n && has) {
        const long long slot = (long long)s_blocks[t / KV_BLOCK] * KV_BLOCK + t % KV_BLOCK;
        load8(k_cache + slot * row_stride + kvh * HD + lsub * 8, kf);
      } else {
#pragma unroll
        for (int i = 0; i < 8; ++i) kf[i] = 0.f;
      }
#pragma unroll
      for (int g = 0; g < GROUP; ++g) {
        float d = 0.f;
#pragma unroll
        for (int i = 0; i < 8; ++i) d = fmaf(qr[g][i], kf[i], d);
#pragma unroll
        for (int off = SUB / 2; off > 0; off >>= 1) d += __shfl_xor_sync(FULL_MASK, d, off);
        if (lsub == 0 && t < n) s_p[g][t] = d * scale;
      }
    }
    __syncthreads();

    // Online softmax: warp w owns heads w, w + 4, ...
    for (int g = warp; g < GROUP; g += DA_WARPS) {
      float mc = sov::neg_inf();
      for (int t = lane; t < n; t += 32) mc = fmaxf(mc, s_p[g][t]);
      mc = warp_max(mc);
      const float m_old = s_m[g];
      const float m_new = fmaxf(m_old, mc);
      float sum = 0.f;
      for (int t = lane; t < n; t += 32) {
        const float p = __expf(s_p[g][t] - m_new);
        s_p[g][t] = p;
        sum += p;
      }
      sum = warp_sum(sum);
      if (lane == 0) {
        const float r = __expf(m_old - m_new);  // 0 on the first chunk (m_old = -inf)
        s_rescale[g] = r;
        s_l[g] = s_l[g] * r + sum;
        s_m[g] = m_new;
      }
    }
    __syncthreads();

    // P x V into this lane's 8 output elements of every head.
#pragma unroll
    for (int g = 0; g < GROUP; ++g) {
      const float r = s_rescale[g];
#pragma unroll
      for (int i = 0; i < 8; ++i) acc[g][i] *= r;
    }
#pragma unroll 2
    for (int t0 = warp * ROWS_PER_WARP; t0 < n; t0 += ROWS_PER_PASS) {
      const int t = t0 + sub;
      if (t < n && has) {
        const long long slot = (long long)s_blocks[t / KV_BLOCK] * KV_BLOCK + t % KV_BLOCK;
        float vf[8];
        load8(v_cache + slot * row_stride + kvh * HD + lsub * 8, vf);
#pragma unroll
        for (int g = 0; g < GROUP; ++g) {
          const float p = s_p[g][t];
#pragma unroll
          for (int i = 0; i < 8; ++i) acc[g][i] = fmaf(p, vf[i], acc[g][i]);
        }
      }
    }
    __syncthreads();  // s_p and s_blocks are rewritten by the next chunk
  }

  // Sum the row groups of each warp, then the warps.
#pragma unroll
  for (int g = 0; g < GROUP; ++g)
#pragma unroll
    for (int i = 0; i < 8; ++i)
#pragma unroll
      for (int off = SUB; off < 32; off <<= 1)
        acc[g][i] += __shfl_xor_sync(FULL_MASK, acc[g][i], off);
  if (sub == 0 && has) {
#pragma unroll
    for (int g = 0; g < GROUP; ++g)
#pragma unroll
      for (int i = 0; i < 8; ++i) s_acc[warp][g][lsub * 8 + i] = acc[g][i];
  }
  __syncthreads();
  for (int e = threadIdx.x; e < GROUP * HD; e += DA_THREADS) {
    const int g = e / HD, d = e % HD;
    float o = 0.f;
#pragma unroll
    for (int w = 0; w < DA_WARPS; ++w) o += s_acc[w][g][d];
    const float l = s_l[g];
    // An empty split (begin >= len) has l == 0: it writes zeros and (max -inf, sum 0),
    // which the merge weighs by 0.
    const float v = l > 0.f ? o / l : 0.f;
    const long long head = (long long)seq * n_heads + kvh * GROUP + g;
    if (num_splits == 1) {
      out[head * HD + d] = sov::f32_to_bf16(v);
    } else {
      part_out[(head * num_splits + split) * HD + d] = v;
    }
  }
  if (num_splits > 1 && threadIdx.x < GROUP) {
    const long long head = (long long)seq * n_heads + kvh * GROUP + threadIdx.x;
    part_ml[(head * num_splits + split) * 2] = s_m[threadIdx.x];
    part_ml[(head * num_splits + split) * 2 + 1] = s_l[threadIdx.x];
  }
}

}  // namespace sov

// One entry point per (head_dim, GQA group): the host picks the one matching the model.
#define SOV_DECODE_ATTENTION(HD, GROUP)                                                   \
  extern "C" __global__ void __launch_bounds__(sov::DA_THREADS, 1)                        \
      decode_attention_hd##HD##_g##GROUP(                                                 \
          const sov::bf16* q, const sov::bf16* k_cache,                           \
          const sov::bf16* v_cache, const int* block_tables, const int* seq_lens,     \
          sov::bf16* out, float* part_out, float* part_ml, int n_kv_heads,            \
          int max_blocks, int num_splits, float scale, int q_stride) {                    \
    sov::decode_attention_impl<HD, GROUP>(q, k_cache, v_cache, block_tables, seq_lens,   \
                                          out, part_out, part_ml, n_kv_heads, max_blocks, \
                                          num_splits, scale, q_stride);                   \
  }

SOV_DECODE_ATTENTION(64, 1)
SOV_DECODE_ATTENTION(64, 2)
SOV_DECODE_ATTENTION(64, 3)
SOV_DECODE_ATTENTION(64, 4)
SOV_DECODE_ATTENTION(64, 8)
SOV_DECODE_ATTENTION(96, 1)
SOV_DECODE_ATTENTION(96, 2)
SOV_DECODE_ATTENTION(96, 4)
SOV_DECODE_ATTENTION(96, 8)
SOV_DECODE_ATTENTION(128, 1)
SOV_DECODE_ATTENTION(128, 2)
SOV_DECODE_ATTENTION(128, 4)
SOV_DECODE_ATTENTION(128, 8)

// Log-sum-exp merge of the splits: grid (num_seqs, n_heads), HD threads (<= 128).
// out = sum_s w_s * part_out_s / sum_s w_s with w_s = l_s * exp(m_s - max_s m_s).
extern "C" __global__ void __launch_bounds__(128)
    decode_attention_merge(const float* part_out, const float* part_ml, sov::bf16* out,
                           int n_heads, int head_dim, int num_splits) {
  const long long head = (long long)blockIdx.x * n_heads + blockIdx.y;
  const float* ml = part_ml + head * num_splits * 2;
  float m = sov::neg_inf();
  for (int s = 0; s < num_splits; ++s) m = fmaxf(m, ml[2 * s]);
  for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
    float num = 0.f, den = 0.f;
    for (int s = 0; s < num_splits; ++s) {
      const float l = ml[2 * s + 1];
      if (l > 0.f) {
        const float w = l * __expf(ml[2 * s] - m);
        num = fmaf(w, part_out[(head * num_splits + s) * head_dim + d], num);
        den += w;
      }
    }
    out[head * head_dim + d] = sov::f32_to_bf16(den > 0.f ? num / den : 0.f);
  }
}
