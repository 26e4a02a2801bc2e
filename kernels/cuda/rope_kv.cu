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
//   k_cache, v_cache [num_blocks][16][n_kv_heads][hd] bf16
// style 0 = interleaved pairs (2i, 2i+1) (GGUF), 1 = half pairs (i, i + rot_dim/2) (HF).
// Dimensions at and beyond rot_dim are copied unchanged. One CTA of 128 threads per token.
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

extern "C" __global__ void __launch_bounds__(128)
    rope_write_kv(sov::bf16* __restrict__ qkv, int qkv_stride, const int* __restrict__ positions,
                  const int* __restrict__ slots, const float* __restrict__ cos_t,
                  const float* __restrict__ sin_t, sov::bf16* __restrict__ k_cache,
                  sov::bf16* __restrict__ v_cache, int n_heads, int n_kv_heads, int hd,
                  int rot_dim, int style) {
  const long long tok = blockIdx.x;
  sov::bf16* q = qkv + tok * qkv_stride;
  const sov::bf16* k = q + n_heads * hd;
  const sov::bf16* v = k + n_kv_heads * hd;
  const int pos = positions[tok];
  const int slot = slots[tok];
  const int half = rot_dim / 2;
  const float* cs = cos_t + (long long)pos * half;
  const float* sn = sin_t + (long long)pos * half;
  // Query heads, in place: one thread per rotation pair.
  for (int e = threadIdx.x; e < n_heads * half; e += blockDim.x) {
    const int h = e / half, i = e % half;
    int a, b;
    sov::rope_pair_index(style, rot_dim, i, &a, &b);
    sov::bf16* qh = q + h * hd;
    const float x = sov::bf16_to_f32(qh[a]), y = sov::bf16_to_f32(qh[b]);
    qh[a] = sov::f32_to_bf16(x * cs[i] - y * sn[i]);
    qh[b] = sov::f32_to_bf16(x * sn[i] + y * cs[i]);
  }
  if (slot < 0) return;
  const long long dst = (long long)slot * n_kv_heads * hd;
  // Keys: rotated pairs, then the unrotated tail.
  for (int e = threadIdx.x; e < n_kv_heads * half; e += blockDim.x) {
    const int h = e / half, i = e % half;
    int a, b;
    sov::rope_pair_index(style, rot_dim, i, &a, &b);
    const sov::bf16* kh = k + h * hd;
    const float x = sov::bf16_to_f32(kh[a]), y = sov::bf16_to_f32(kh[b]);
    k_cache[dst + h * hd + a] = sov::f32_to_bf16(x * cs[i] - y * sn[i]);
    k_cache[dst + h * hd + b] = sov::f32_to_bf16(x * sn[i] + y * cs[i]);
  }
  const int tail = hd - rot_dim;
  for (int e = threadIdx.x; e < n_kv_heads * tail; e += blockDim.x) {
    const int h = e / tail, d = rot_dim + e % tail;
    k_cache[dst + h * hd + d] = k[h * hd + d];
  }
  // Values: a straight copy, 16 bytes at a time (hd is a multiple of 8).
  for (int e = threadIdx.x * 8; e < n_kv_heads * hd; e += blockDim.x * 8) {
    *reinterpret_cast<uint4*>(v_cache + dst + e) =
        *reinterpret_cast<const uint4*>(v + e);
  }
}
