// Sampling helpers for the GPU path. CPU references: kernels::cpu::argmax and
// kernels::cpu::softmax_in_place.
//
// argmax_rows: index of the largest logit per row, the worker sampler's greedy pick: the
// lowest index wins ties, NaN never wins, +inf counts as FLT_MAX (greedy decoding is
// deterministic and equal to the CPU path's). One CTA of 1024 threads per row. CPU
// reference: kernels::gpu_ref::argmax_rows.
//
// softmax_rows: probabilities of logits / temperature per row (f32), for the host-side
// top-k / top-p / min-p sampler. One CTA of 1024 threads per row.
//
// topk_rows: the k best tokens of each row by the CPU sampler's rank (larger logit first,
// equal logits by lower id; logits sanitized as the sampler does: NaN -> -inf,
// +inf -> FLT_MAX), as (logit, id) pairs in rank order, k <= 1024. The host sampler then
// works on k candidates instead of the whole vocabulary. One CTA of 512 threads per row:
// a 4-pass 8-bit radix select finds the k-th key, an index-ordered compaction takes every
// key above it and the lowest ids equal to it, a bitonic sort in shared memory orders them.
// CPU reference: kernels::gpu_ref::topk_rows.
#include "common.cuh"

namespace sov {

constexpr int SAMPLE_THREADS = 1024;

// (value, index) with the CPU's order: larger value first, then lower index; NaN loses.
__device__ __forceinline__ bool better(float v, int i, float bv, int bi) {
  if (v != v) return false;
  if (bv != bv) return true;
  return v > bv || (v == bv && i < bi);
}

constexpr int TOPK_MAX = 1024;
constexpr int TOPK_THREADS = 512;

// Order-preserving map of a sanitized float to u32 (larger float, larger key; -0 < +0 as
// in Rust's total_cmp). Sanitizing: NaN -> -inf, +inf -> FLT_MAX.
__device__ __forceinline__ unsigned rank_key(float v) {
  if (v != v) v = neg_inf();
  if (v == __int_as_float(0x7f800000)) v = __int_as_float(0x7f7fffff);
  const unsigned u = __float_as_uint(v);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

__device__ __forceinline__ float key_value(unsigned k) {
  return __uint_as_float((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k);
}

// Exclusive prefix count of `flag` over the CTA (THREADS threads) in thread order; `total`
// gets the sum. Uses s_warp[THREADS / 32]; every thread must call it.
template <int THREADS>
__device__ __forceinline__ int block_exclusive_count(bool flag, int* s_warp, int& total) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const unsigned ballot = __ballot_sync(FULL_MASK, flag);
  const int in_warp = __popc(ballot & ((1u << lane) - 1u));
  if (lane == 0) s_warp[warp] = __popc(ballot);
  __syncthreads();
  int before = 0, sum = 0;
#pragma unroll
  for (int w = 0; w < THREADS / 32; ++w) {
    const int c = s_warp[w];
    if (w < warp) before += c;
    sum += c;
  }
  __syncthreads();
  total = sum;
  return before + in_warp;
}

}  // namespace sov

extern "C" __global__ void __launch_bounds__(sov::TOPK_THREADS)
    topk_rows(const float* __restrict__ logits, float* __restrict__ out_logit,
              int* __restrict__ out_id, int vocab, int k) {
  __shared__ int s_hist[256];
  __shared__ int s_warp[32];
  __shared__ unsigned s_key[sov::TOPK_MAX];
  __shared__ int s_idx[sov::TOPK_MAX];
  __shared__ unsigned s_prefix;
  __shared__ int s_need;
  const float* row = logits + (long long)blockIdx.x * vocab;
  const int tid = threadIdx.x;

  // 1. Radix select: the k-th largest key T, and how many keys equal to T to take.
  unsigned prefix = 0, mask = 0;
  int need = k;
  for (int shift = 24; shift >= 0; shift -= 8) {
    if (tid < 256) s_hist[tid] = 0;
    __syncthreads();
    for (int i = tid; i < vocab; i += sov::TOPK_THREADS) {
      const unsigned key = sov::rank_key(row[i]);
      if ((key & mask) == prefix) atomicAdd(&s_hist[(key >> shift) & 255u], 1);
    }
    __syncthreads();
    if (tid == 0) {
      int left = need, bin = 255;
      for (; bin > 0; --bin) {
        if (s_hist[bin] >= left) break;
        left -= s_hist[bin];
      }
      s_prefix = prefix | ((unsigned)bin << shift);
      s_need = left;
    }
    __syncthreads();
    prefix = s_prefix;
    need = s_need;
    mask |= 255u << shift;
  }
  const unsigned T = prefix;
  const int above = k - need;

  // 2. Compaction in index order: every key above T, then the lowest ids equal to T.
  int taken_above = 0, taken_eq = 0;
  for (int base = 0; base < vocab; base += sov::TOPK_THREADS) {
    const int i = base + tid;
    const unsigned key = i < vocab ? sov::rank_key(row[i]) : 0u;
    const bool gt = i < vocab && key > T;
    const bool eq = i < vocab && key == T;
    int n_gt = 0, n_eq = 0;
    const int r_gt = sov::block_exclusive_count<sov::TOPK_THREADS>(gt, s_warp, n_gt);
    const int r_eq = sov::block_exclusive_count<sov::TOPK_THREADS>(eq, s_warp, n_eq);
    if (gt) { s_key[taken_above + r_gt] = key; s_idx[taken_above + r_gt] = i; }
    if (eq && taken_eq + r_eq < need) {
      s_key[above + taken_eq + r_eq] = key;
      s_idx[above + taken_eq + r_eq] = i;
    }
    taken_above += n_gt;
    taken_eq += n_eq;
    if (taken_above >= above && taken_eq >= need) break;  // uniform across the CTA
  }
  // Padding up to the sort's power of two sorts last.
  int n = 1;
  while (n < k) n <<= 1;
  for (int j = k + tid; j < n; j += sov::TOPK_THREADS) { s_key[j] = 0u; s_idx[j] = 0x7fffffff; }
  __syncthreads();

  // 3. Bitonic sort by (key descending, id ascending).
  for (int size = 2; size <= n; size <<= 1) {
    for (int stride = size >> 1; stride > 0; stride >>= 1) {
      for (int j = tid; j < n; j += sov::TOPK_THREADS) {
        const int p = j ^ stride;
        if (p > j) {
          const unsigned kj = s_key[j], kp = s_key[p];
          const int ij = s_idx[j], ip = s_idx[p];
          // j before p in the final order when it ranks higher.
          const bool j_first = kj > kp || (kj == kp && ij < ip);
          const bool ascending_block = (j & size) == 0;
          if (j_first != ascending_block) {
            s_key[j] = kp; s_key[p] = kj;
            s_idx[j] = ip; s_idx[p] = ij;
          }
        }
      }
      __syncthreads();
    }
  }
  for (int j = tid; j < k; j += sov::TOPK_THREADS) {
    out_logit[(long long)blockIdx.x * k + j] = sov::key_value(s_key[j]);
    out_id[(long long)blockIdx.x * k + j] = s_idx[j];
  }
}

extern "C" __global__ void __launch_bounds__(sov::SAMPLE_THREADS)
    argmax_rows(const float* __restrict__ logits, int* __restrict__ out, int vocab) {
  __shared__ float s_v[32];
  __shared__ int s_i[32];
  const float* row = logits + (long long)blockIdx.x * vocab;
  float bv = sov::neg_inf();
  int bi = 0x7fffffff;
  for (int i = threadIdx.x; i < vocab; i += sov::SAMPLE_THREADS) {
    // +inf counts as FLT_MAX, as the sampler sanitizes it. NaN never wins: it must stay
    // NaN here, because fminf(NaN, FLT_MAX) is FLT_MAX (IEEE minNum returns the number).
    const float x = row[i];
    const float v = x != x ? x : fminf(x, __int_as_float(0x7f7fffff));
    if (sov::better(v, i, bv, bi)) { bv = v; bi = i; }
  }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    const float ov = __shfl_xor_sync(sov::FULL_MASK, bv, off);
    const int oi = __shfl_xor_sync(sov::FULL_MASK, bi, off);
    if (sov::better(ov, oi, bv, bi)) { bv = ov; bi = oi; }
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) { s_v[warp] = bv; s_i[warp] = bi; }
  __syncthreads();
  if (warp == 0) {
    bv = s_v[lane];
    bi = s_i[lane];
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
      const float ov = __shfl_xor_sync(sov::FULL_MASK, bv, off);
      const int oi = __shfl_xor_sync(sov::FULL_MASK, bi, off);
      if (sov::better(ov, oi, bv, bi)) { bv = ov; bi = oi; }
    }
    // All -inf or NaN: index 0, as on the CPU.
    if (lane == 0) out[blockIdx.x] = bi == 0x7fffffff ? 0 : bi;
  }
}

extern "C" __global__ void __launch_bounds__(sov::SAMPLE_THREADS)
    softmax_rows(const float* __restrict__ logits, float* __restrict__ probs, int vocab,
                 float temperature) {
  __shared__ float s_red[32];
  const long long base = (long long)blockIdx.x * vocab;
  const float inv_t = 1.f / temperature;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  float m = sov::neg_inf();
  for (int i = threadIdx.x; i < vocab; i += sov::SAMPLE_THREADS) m = fmaxf(m, logits[base + i] * inv_t);
  m = sov::warp_max(m);
  if (lane == 0) s_red[warp] = m;
  __syncthreads();
  m = sov::warp_max(s_red[lane]);
  __syncthreads();
  float sum = 0.f;
  for (int i = threadIdx.x; i < vocab; i += sov::SAMPLE_THREADS) {
    const float p = __expf(logits[base + i] * inv_t - m);
    probs[base + i] = p;
    sum += p;
  }
  sum = sov::warp_sum(sum);
  if (lane == 0) s_red[warp] = sum;
  __syncthreads();
  sum = sov::warp_sum(s_red[lane]);
  const float inv = 1.f / sum;
  for (int i = threadIdx.x; i < vocab; i += sov::SAMPLE_THREADS) probs[base + i] *= inv;
}
