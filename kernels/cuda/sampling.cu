// Sampling helpers for the GPU path. CPU references: kernels::cpu::argmax and
// kernels::cpu::softmax_in_place.
//
// argmax_rows: index of the largest logit per row; the lowest index wins ties and NaN
// never wins (greedy decoding is deterministic and equal to the CPU path's). One CTA of
// 1024 threads per row.
//
// softmax_rows: probabilities of logits / temperature per row (f32), for the host-side
// top-k / top-p / min-p sampler. One CTA of 1024 threads per row.
#include "common.cuh"

namespace sov {

constexpr int SAMPLE_THREADS = 1024;

// (value, index) with the CPU's order: larger value first, then lower index; NaN loses.
__device__ __forceinline__ bool better(float v, int i, float bv, int bi) {
  if (v != v) return false;
  if (bv != bv) return true;
  return v > bv || (v == bv && i < bi);
}

}  // namespace sov

extern "C" __global__ void __launch_bounds__(sov::SAMPLE_THREADS)
    argmax_rows(const float* __restrict__ logits, int* __restrict__ out, int vocab) {
  __shared__ float s_v[32];
  __shared__ int s_i[32];
  const float* row = logits + (long long)blockIdx.x * vocab;
  float bv = sov::neg_inf();
  int bi = 0x7fffffff;
  for (int i = threadIdx.x; i < vocab; i += sov::SAMPLE_THREADS) {
    const float v = row[i];
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
