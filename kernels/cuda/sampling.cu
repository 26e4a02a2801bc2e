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
//
// sample_rows: one token a row drawn from the softmax of logits * inv_t, as the worker
// sampler's dense draw does it: weights exp((logit - max) * inv_t) (0 below e^-87), those
// under min_w dropped (min-p: the best token has weight 1), target u * (sum of the kept
// weights), the first token in id order whose running sum exceeds the target. inv_t == 0:
// the greedy pick instead. Also writes each row's (sanitized maximum, sum of all its
// weights, min_w not applied), which the host's top-p finishing over topk_rows'
// candidates needs. One CTA of 1024 threads a row: a pass for the maximum, a pass that
// sums tiles of 32 x PER tokens (a warp a tile, each lane PER tokens 32 apart: coalesced),
// a scan of the tile sums that finds the tile holding the target, and one warp that walks
// that tile in id order. The sums are of the weights in 64-bit fixed point (2^-42 units),
// exact and associative: f32 sums at the scale of the row's total lost every token
// lighter than an ulp of it (tens of thousands at a 128k vocabulary), and sums in
// different orders disagreed about which tile held the target. The draw u arrives as
// two f32 (u and the rest) and is used in f64. CPU reference: kernels::gpu_ref::sample_rows.
#include "common.cuh"

namespace sov {

constexpr int SAMPLE_THREADS = 1024;

// (value, index) with the CPU's order: larger value first, then lower index; NaN loses.
__device__ __forceinline__ bool better(float v, int i, float bv, int bi) {
  if (v != v) return false;
  if (bv != bv) return true;
  return v > bv || (v == bv && i < bi);
}

// A logit as the worker sampler sees it: NaN -> -inf, +inf -> FLT_MAX.
__device__ __forceinline__ float sanitize_logit(float x) {
  return x != x ? neg_inf() : fminf(x, __int_as_float(0x7f7fffff));
}

// The sampler's weight of a sanitized logit: exp((l - mx) * inv_t), 0 below e^-87 (-inf
// logits included).
__device__ __forceinline__ float sample_weight(float l, float mx, float inv_t) {
  const float x = (l - mx) * inv_t;
  return x >= -87.f ? expf(x) : 0.f;
}

// A kept weight in fixed point, 2^-42 units (0 when under min_w).
__device__ __forceinline__ unsigned long long fixed_weight(float w, float min_w) {
  return w >= min_w ? __float2ull_rn(w * 4398046511104.f) : 0ull;
}

__device__ __forceinline__ void warp_best(float& bv, int& bi) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    const float ov = __shfl_xor_sync(FULL_MASK, bv, off);
    const int oi = __shfl_xor_sync(FULL_MASK, bi, off);
    if (better(ov, oi, bv, bi)) { bv = ov; bi = oi; }
  }
}

// The sanitized maximum of `row` and its lowest index, for every thread of a CTA of
// SAMPLE_THREADS (all must call; uses s_v and s_i[32]). bi stays 0x7fffffff only for an
// empty row.
__device__ __forceinline__ void row_best(const float* row, int vocab, float* s_v, int* s_i,
                                         float& bv, int& bi) {
  bv = neg_inf();
  bi = 0x7fffffff;
  // Sanitized as the sampler does: +inf counts as FLT_MAX, NaN as -inf (so a row without
  // a finite logit picks index 0, as on the CPU; a NaN kept as NaN would lose every
  // comparison and let a later -inf win).
  for (int i = threadIdx.x; i < vocab; i += SAMPLE_THREADS) {
    const float v = sanitize_logit(row[i]);
    if (better(v, i, bv, bi)) { bv = v; bi = i; }
  }
  warp_best(bv, bi);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) { s_v[warp] = bv; s_i[warp] = bi; }
  __syncthreads();
  bv = s_v[lane];
  bi = s_i[lane];
  warp_best(bv, bi);
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
  float bv;
  int bi;
  sov::row_best(logits + (long long)blockIdx.x * vocab, vocab, s_v, s_i, bv, bi);
  // All -inf or NaN: index 0, as on the CPU.
  if (threadIdx.x == 0) out[blockIdx.x] = bi == 0x7fffffff ? 0 : bi;
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

// Per row: params[row] = (inv_t, min_w, u rounded to f32, the rest of u); out_id[row];
// out_stats[row] = (sanitized maximum, sum of every weight). One CTA an SM is what the
// launch bounds ask for: without the 1, ptxas for sm_80 kept 32 registers a thread (two
// CTAs of 1024) and spilled the 64-bit sums.
extern "C" __global__ void __launch_bounds__(sov::SAMPLE_THREADS, 1)
    sample_rows(const float* __restrict__ logits, const float4* __restrict__ params,
                int* __restrict__ out_id, float2* __restrict__ out_stats, int vocab) {
  constexpr int T = sov::SAMPLE_THREADS, WARPS = T / 32;
  __shared__ float s_v[WARPS];
  __shared__ int s_i[WARPS];
  __shared__ unsigned long long s_tile[T];
  __shared__ unsigned long long s_scan[WARPS];
  __shared__ float s_all[WARPS];
  __shared__ int s_pick;
  const float* row = logits + (long long)blockIdx.x * vocab;
  const float4 p = params[blockIdx.x];
  // u in two parts (its f32 rounding and the rest), so the draw keeps f64 resolution.
  const float inv_t = p.x, min_w = p.y;
  const double u = (double)p.z + (double)p.w;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  if (tid == 0) s_pick = -1;
  // The sanitized maximum and its lowest index (the greedy pick).
  float bv;
  int bi;
  sov::row_best(row, vocab, s_v, s_i, bv, bi);
  const float mx = bv;
  if (inv_t == 0.f || mx == sov::neg_inf()) {
    // Greedy, or no token with a finite logit: the lowest index of the maximum.
    if (tid == 0) {
      out_id[blockIdx.x] = bi == 0x7fffffff ? 0 : bi;
      out_stats[blockIdx.x] = make_float2(mx, 0.f);
    }
    return;
  }
  // Each kept weight in fixed point (2^-42 units; a weight is at most 1, so the sum of a
  // vocabulary below 2^22 tokens fits 64 bits; the launcher refuses larger ones): integer sums are exact, so the scan,
  // the target's tile and the walk inside it all agree to the unit, and no token is lost
  // to rounding at the scale of the row's total (weights under 2^-43 round to 0).
  // Tile sums: a warp a tile of 32 x per tokens, token (e, lane) = base + 32 e + lane.
  const int per = max(1, (vocab + 32 * T - 1) / (32 * T));
  const int tile = 32 * per;
  const int ntiles = (vocab + tile - 1) / tile;  // <= T
  float all = 0.f;
  for (int j = warp; j < ntiles; j += WARPS) {
    unsigned long long kept = 0;
    float any = 0.f;
    for (int e = 0; e < per; ++e) {
      const int i = j * tile + 32 * e + lane;
      if (i < vocab) {
        const float w = sov::sample_weight(sov::sanitize_logit(row[i]), mx, inv_t);
        any += w;
        kept += sov::fixed_weight(w, min_w);
      }
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) kept += __shfl_xor_sync(sov::FULL_MASK, kept, off);
    all += sov::warp_sum(any);
    if (lane == 0) s_tile[j] = kept;
  }
  if (lane == 0) s_all[warp] = all;
  __syncthreads();
  // Inclusive scan of the tile sums in tile order, one a thread.
  const unsigned long long own = tid < ntiles ? s_tile[tid] : 0ull;
  unsigned long long incl = own;
#pragma unroll
  for (int off = 1; off < 32; off <<= 1) {
    const unsigned long long n = __shfl_up_sync(sov::FULL_MASK, incl, off);
    if (lane >= off) incl += n;
  }
  if (lane == 31) s_scan[warp] = incl;
  __syncthreads();
  unsigned long long before = 0, total = 0;
  for (int w = 0; w < WARPS; ++w) {
    const unsigned long long x = s_scan[w];
    if (w < warp) before += x;
    total += x;
  }
  incl += before;
  const unsigned long long excl = incl - own;
  // target = u * total, below the total (u < 1; the product is rounded); total >= 1: the
  // maximum's weight is 1 (2^42 units) and min_w <= 1.
  unsigned long long target = (unsigned long long)(u * (double)total);
  if (target >= total) target = total - 1;
  // Exactly one tile's [excl, incl) holds the target.
  if (tid < ntiles && own > 0 && excl <= target && target < incl) s_pick = tid;
  __syncthreads();
  const int j = s_pick;
  if (warp == 0) {
    // Walk tile j in id order from the sum before it.
    unsigned long long acc = 0;
    int found = -1, last = -1;
    if (j >= 0) {
      // The tile's exclusive sum: the scan value of its thread, rebuilt here from the
      // tile sums (the same integers, so the same value).
      unsigned long long base = 0;
      for (int t = lane; t < j; t += 32) base += s_tile[t];
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) base += __shfl_xor_sync(sov::FULL_MASK, base, off);
      acc = base;
      for (int e = 0; e < per && found < 0; ++e) {
        const int i = j * tile + 32 * e + lane;
        unsigned long long q = 0;
        if (i < vocab) q = sov::fixed_weight(sov::sample_weight(sov::sanitize_logit(row[i]), mx, inv_t), min_w);
        unsigned long long c = q;
#pragma unroll
        for (int off = 1; off < 32; off <<= 1) {
          const unsigned long long n = __shfl_up_sync(sov::FULL_MASK, c, off);
          if (lane >= off) c += n;
        }
        const unsigned cross = __ballot_sync(sov::FULL_MASK, q > 0 && acc + c > target);
        const unsigned nz = __ballot_sync(sov::FULL_MASK, q > 0);
        if (cross) found = j * tile + 32 * e + __ffs(cross) - 1;
        if (nz) last = j * tile + 32 * e + 31 - __clz(nz);
        acc += __shfl_sync(sov::FULL_MASK, c, 31);
      }
    }
    if (lane == 0) {
      // Integer sums: the target's tile always holds its token; the fallbacks are guards.
      out_id[blockIdx.x] = found >= 0 ? found : (last >= 0 ? last : bi);
      float sum_all = 0.f;
      for (int w = 0; w < WARPS; ++w) sum_all += s_all[w];
      out_stats[blockIdx.x] = make_float2(mx, sum_all);
    }
  }
}

// apply_penalties: the worker sampler's repetition, presence and frequency penalties, in
// place, as lists the host builds from each sequence's tokens (one entry per touched
// token of a row: its row, id and the amount to subtract; rep[row] the row's repetition
// penalty): logit / rep if positive, else logit * rep, then minus the amount, each
// operation rounded on its own (the _rn intrinsics: no fused multiply-add), which is
// what the CPU sampler computes. A thread an entry; the host lists a token once a row.
// CPU reference: kernels::gpu_ref::apply_penalties.
extern "C" __global__ void __launch_bounds__(256)
    apply_penalties(float* __restrict__ logits, int vocab, const int2* __restrict__ entries,
                    const float* __restrict__ subtract, const float* __restrict__ rep, int n) {
  const int e = blockIdx.x * 256 + threadIdx.x;
  if (e >= n) return;
  const int2 rt = entries[e];
  float* p = logits + (long long)rt.x * vocab + rt.y;
  float l = *p;
  const float r = rep[rt.x];
  if (r != 1.f) l = l > 0.f ? __fdiv_rn(l, r) : __fmul_rn(l, r);
  *p = __fsub_rn(l, subtract[e]);
}
