// Fused RoPE + KV-cache write for a batch of tokens. CPU reference:
// kernels::cpu::rope_and_write_kv (f32; here q/k/v and the cache are bf16, the rotation
// f32 with the same cos/sin table).
//
//   qkv      [tokens] rows of qkv_stride elements: q [n_heads][hd] (rotated in place),
//            then k [n_kv_heads][hd] (rotated on its way into the cache, left as is
//            here), then v [n_kv_heads][hd] (the fused q|k|v projection's output)
//   positions[tokens] int, slots[tokens] int (physical slot = block * 16 + row; < 0: the
//            token's K/V are not stored, e.g. a padding token)
//   cos, sin [max_pos][rot_dim / 2] f32
//   k_cache, v_cache [num_blocks][16][n_kv_heads][hd] bf16, or e4m3 bytes with per-KV-head
//            scales in rope_write_kv_fp8 (code = e4m3(value / scale))
// style 0 = interleaved pairs (2i, 2i+1) (GGUF), 1 = half pairs (i, i + rot_dim/2) (HF).
// Dimensions at and beyond rot_dim are copied unchanged. Grid (tokens, items / 128): one
// thread per rotation pair of q and k, per unrotated k element and per 8 elements of v.
#include "common.cuh"

namespace sov {

__device__ __forceinline__ void rope_pair_index(int style, int rot_dim, int i, int* a, int* b) {
  if (style == 0) {
    *a = 2 * i;
    *b = 2 * i + 1;
  } else {
    *a = i;
    *b = i + rot_dim / 2;
  }
}

}  // namespace sov

namespace sov {

// KV: bf16, or fp8 (e4m3 of value / scale, with k_scale / v_scale [n_kv_heads] f32). The
// fp8 path rounds each rotated K value once, from f32 (the products and the difference
// rounded separately, without fused multiply-adds, as kernels::gpu_ref computes them).
template <typename KV>
__device__ __forceinline__ void rope_write_kv_impl(
    bf16* __restrict__ qkv, int qkv_stride, const int* __restrict__ positions,
    const int* __restrict__ slots, const float* __restrict__ cos_t,
    const float* __restrict__ sin_t, KV* __restrict__ k_cache, KV* __restrict__ v_cache,
    const float* __restrict__ k_scale, const float* __restrict__ v_scale, int n_heads,
    int n_kv_heads, int hd, int rot_dim, int style) {
  constexpr bool FP8 = sizeof(KV) == 1;
  pdl_trigger();  // PDL builds (common.cuh): q|k|v come from the previous kernel
  pdl_wait();
  const long long tok = blockIdx.x;
  bf16* q = qkv + tok * qkv_stride;
  const bf16* k = q + n_heads * hd;
  const bf16* v = k + n_kv_heads * hd;
  const int half = rot_dim / 2, tail = hd - rot_dim;
  // One work item per thread: q pairs, k pairs, k tail elements, v 8-element pieces.
  int e = blockIdx.y * blockDim.x + threadIdx.x;
  const int q_pairs = n_heads * half, k_pairs = n_kv_heads * half;
  const int k_tail = n_kv_heads * tail, v_pieces = n_kv_heads * hd / 8;
  const int slot = slots[tok];
  const long long dst = (long long)slot * n_kv_heads * hd;
  if (e < q_pairs + k_pairs) {
    const bool is_q = e < q_pairs;
    if (!is_q) {
      if (slot < 0) return;
      e -= q_pairs;
    }
    const int h = e / half, i = e % half;
    const int pos = positions[tok];
    const float c = cos_t[(long long)pos * half + i], sn = sin_t[(long long)pos * half + i];
    int a, b;
    rope_pair_index(style, rot_dim, i, &a, &b);
    if (is_q) {
      bf16* qh = q + h * hd;
      const float x = bf16_to_f32(qh[a]), y = bf16_to_f32(qh[b]);
      qh[a] = f32_to_bf16(x * c - y * sn);
      qh[b] = f32_to_bf16(x * sn + y * c);
    } else {
      const bf16* kh = k + h * hd;
      const float x = bf16_to_f32(kh[a]), y = bf16_to_f32(kh[b]);
      if constexpr (FP8) {
        const float ks = k_scale[h];
        const float ra = __fsub_rn(__fmul_rn(x, c), __fmul_rn(y, sn));
        const float rb = __fadd_rn(__fmul_rn(x, sn), __fmul_rn(y, c));
        k_cache[dst + h * hd + a] = (KV)f32_to_e4m3(__fdiv_rn(ra, ks));
        k_cache[dst + h * hd + b] = (KV)f32_to_e4m3(__fdiv_rn(rb, ks));
      } else {
        k_cache[dst + h * hd + a] = f32_to_bf16(x * c - y * sn);
        k_cache[dst + h * hd + b] = f32_to_bf16(x * sn + y * c);
      }
    }
    return;
  }
  if (slot < 0) return;
  e -= q_pairs + k_pairs;
  if (e < k_tail) {
    const int h = e / tail, d = rot_dim + e % tail;
    if constexpr (FP8) {
      k_cache[dst + h * hd + d] = (KV)f32_to_e4m3(__fdiv_rn(bf16_to_f32(k[h * hd + d]), k_scale[h]));
    } else {
      k_cache[dst + h * hd + d] = k[h * hd + d];
    }
    return;
  }
  e -= k_tail;
  // Values: 8 at a time (hd is a multiple of 8): a 16-byte copy, or 8 codes in 8 bytes.
  if (e < v_pieces) {
    const uint4 raw = *reinterpret_cast<const uint4*>(v + e * 8);
    if constexpr (FP8) {
      const float vs = v_scale[e * 8 / hd];
      float f[8];
      widen8_bf16(raw, f);
      unsigned w[2] = {0u, 0u};
#pragma unroll
      for (int i = 0; i < 8; ++i) w[i / 4] |= f32_to_e4m3(__fdiv_rn(f[i], vs)) << (8 * (i % 4));
      *reinterpret_cast<uint2*>(v_cache + dst + e * 8) = make_uint2(w[0], w[1]);
    } else {
      *reinterpret_cast<uint4*>(v_cache + dst + e * 8) = raw;
    }
  }
}

}  // namespace sov

extern "C" __global__ void __launch_bounds__(128)
    rope_write_kv(sov::bf16* __restrict__ qkv, int qkv_stride, const int* __restrict__ positions,
                  const int* __restrict__ slots, const float* __restrict__ cos_t,
                  const float* __restrict__ sin_t, sov::bf16* __restrict__ k_cache,
                  sov::bf16* __restrict__ v_cache, int n_heads, int n_kv_heads, int hd,
                  int rot_dim, int style) {
  sov::rope_write_kv_impl<sov::bf16>(qkv, qkv_stride, positions, slots, cos_t, sin_t, k_cache,
                                     v_cache, nullptr, nullptr, n_heads, n_kv_heads, hd,
                                     rot_dim, style);
}

// The same into an fp8 (e4m3) cache with per-KV-head scales k_scale / v_scale.
extern "C" __global__ void __launch_bounds__(128)
    rope_write_kv_fp8(sov::bf16* __restrict__ qkv, int qkv_stride,
                      const int* __restrict__ positions, const int* __restrict__ slots,
                      const float* __restrict__ cos_t, const float* __restrict__ sin_t,
                      sov::fp8* __restrict__ k_cache, sov::fp8* __restrict__ v_cache,
                      const float* __restrict__ k_scale, const float* __restrict__ v_scale,
                      int n_heads, int n_kv_heads, int hd, int rot_dim, int style) {
  sov::rope_write_kv_impl<sov::fp8>(qkv, qkv_stride, positions, slots, cos_t, sin_t, k_cache,
                                    v_cache, k_scale, v_scale, n_heads, n_kv_heads, hd,
                                    rot_dim, style);
}
