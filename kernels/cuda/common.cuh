// Shared device helpers for the worker's CUDA kernels. Compiled with NVRTC at run time,
// self-contained: no CUDA toolkit header is included, so a worker needs only the driver
// and libnvrtc (bf16 is carried as its 16-bit pattern and converted with PTX `cvt`).
#pragma once

namespace sov {

// bf16 storage type: the bit pattern, as in device memory and in kernels::gpu_ref.
typedef unsigned short bf16;

[[maybe_unused]] constexpr unsigned FULL_MASK = 0xffffffffu;
[[maybe_unused]] constexpr int KV_BLOCK = 16;  // tokens per KV-cache block (the block manager's size)

// -inf without <math.h> (NVRTC has no standard headers).
__device__ __forceinline__ float neg_inf() { return __int_as_float(0xff800000); }

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(FULL_MASK, v, off);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v = fmaxf(v, __shfl_xor_sync(FULL_MASK, v, off));
  return v;
}

__device__ __forceinline__ float bf16_to_f32(bf16 h) { return __uint_as_float((unsigned)h << 16); }

// Round to nearest even (NaN stays NaN), as kernels::gpu_ref::to_bf16.
__device__ __forceinline__ bf16 f32_to_bf16(float x) {
  unsigned short h;
  asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(x));
  return h;
}

// Two values as one 32-bit word: `lo` in the low half (the lower index), as the MMA
// fragments and a little-endian pair in memory want it.
__device__ __forceinline__ unsigned pack_bf16(float lo, float hi) {
  unsigned r;
  asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
  return r;
}

// Eight bf16 values (one 16-byte load) widened to f32.
__device__ __forceinline__ void load8(const bf16* p, float out[8]) {
  const uint4 raw = *reinterpret_cast<const uint4*>(p);
  const unsigned w[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    out[2 * i] = __uint_as_float(w[i] << 16);
    out[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
  }
}

// Eight f32 values rounded to bf16 and stored with one 16-byte store.
__device__ __forceinline__ void store8(bf16* p, const float v[8]) {
  uint4 raw;
  raw.x = pack_bf16(v[0], v[1]);
  raw.y = pack_bf16(v[2], v[3]);
  raw.z = pack_bf16(v[4], v[5]);
  raw.w = pack_bf16(v[6], v[7]);
  *reinterpret_cast<uint4*>(p) = raw;
}

}  // namespace sov
