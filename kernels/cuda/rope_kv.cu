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
// Dimensions at and beyond rot_dim are copied unchanged. Grid (tokens, items / 128): one
// thread per rotation pair of q and k, per unrotated k element and per 16-byte piece of v.
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
  const int half = rot_dim / 2, tail = hd - rot_dim;
  // One work item per thread: q pairs, k pairs, k tail elements, v 16-byte pieces.
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
    sov::rope_pair_index(style, rot_dim, i, &a, &b);
    if (is_q) {
      sov::bf16* qh = q + h * hd;
      const float x = sov::bf16_to_f32(qh[a]), y = sov::bf16_to_f32(qh[b]);
      qh[a] = sov::f32_to_bf16(x * c - y * sn);
      qh[b] = sov::f32_to_bf16(x * sn + y * c);
    } else {
      const sov::bf16* kh = k + h * hd;
      const float x = sov::bf16_to_f32(kh[a]), y = sov::bf16_to_f32(kh[b]);
      k_cache[dst + h * hd + a] = sov::f32_to_bf16(x * c - y * sn);
      k_cache[dst + h * hd + b] = sov::f32_to_bf16(x * sn + y * c);
    }
    return;
  }
  if (slot < 0) return;
  e -= q_pairs + k_pairs;
  if (e < k_tail) {
    const int h = e / tail, d = rot_dim + e % tail;
    k_cache[dst + h * hd + d] = k[h * hd + d];
    return;
  }
  e -= k_tail;
  // Values: a straight copy, 16 bytes at a time (hd is a multiple of 8).
  if (e < v_pieces) {
    *reinterpret_cast<uint4*>(v_cache + dst + e * 8) = *reinterpret_cast<const uint4*>(v + e * 8);
  }
}
