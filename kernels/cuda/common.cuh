// Shared device helpers for the worker's CUDA kernels. Compiled with NVRTC at run time,
// self-contained: no CUDA toolkit header is included, so a worker needs only the driver
// and libnvrtc (bf16 is carried as its 16-bit pattern and converted with PTX `cvt`).
#pragma once

namespace sov {

// bf16 storage type: the bit pattern, as in device memory and in kernels::gpu_ref.
typedef unsigned short bf16;

[[maybe_unused]] constexpr unsigned FULL_MASK = 0xffffffffu;
[[maybe_unused]] constexpr int KV_BLOCK = 16;  // tokens per KV-cache block (the block manager's size)

// Programmatic dependent launch (PDL; experimental, worker `SOV_PDL=1` on sm_90 and
// later). The calls compile to nothing unless the source is built with -DSOV_PDL=1
// (kernels::cuda::PDL_DEFINE; a build of its own, cached apart). A kernel launched with
// the programmatic-stream-serialization attribute may start while its predecessor in the
// stream still runs, so a PDL-aware kernel:
//   - before pdl_wait, reads only what no kernel writes (the GEMVs' weights: they copy
//     their first round into shared memory there, so a layer's weight stream starts
//     while the previous kernel finishes);
//   - pdl_wait(): returns once the predecessor grid has completed and its writes are
//     visible; it comes before anything a kernel reads or writes. Every PDL-aware kernel
//     calls it, so when one returns every earlier kernel of the stream has completed;
//   - pdl_trigger(): lets the successor grid launch (its CTAs then wait in their
//     pdl_wait). The successor launches only once every CTA of this grid has triggered
//     or exited, so its waiting CTAs never hold back unscheduled CTAs of this one. Short
//     kernels trigger first thing, the GEMVs after their main loop (the successor's
//     weight loads then overlap their tail, not their whole weight stream).
// griddepcontrol.wait returns at once in a kernel launched without the attribute.
// Pointers to activations (what an earlier kernel of the stream writes) are declared
// `const T* SOV_RESTRICT_ACT`: `__restrict__` on a const pointer lets the compiler read
// through the non-coherent path (`ld.global.nc`), which the PTX memory model excludes, so
// griddepcontrol.wait neither orders nor makes visible such reads (and ptxas does move
// the wait across them); PDL builds therefore drop it there. Weights, norm weights,
// RoPE tables and host-uploaded step metadata keep `__restrict__`: no kernel writes them.
#if defined(SOV_PDL)
#define SOV_RESTRICT_ACT
#else
#define SOV_RESTRICT_ACT __restrict__
#endif
#if defined(SOV_PDL) && defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
[[maybe_unused]] constexpr bool PDL = true;
#else
[[maybe_unused]] constexpr bool PDL = false;
#endif
__device__ __forceinline__ void pdl_wait() {
#if defined(SOV_PDL) && defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}
// 16 bytes of weights loaded before pdl_wait: a plain (coherent) global load, not
// allocated in L1. ptxas schedules griddepcontrol.wait ahead of the read-only-path loads
// (`ld.global.nc`, what const __restrict__ pointers get) that precede it in the PTX, but
// not ahead of these (seen in the sm_90 SASS: ACQBULK after the LDG.E.NA).
__device__ __forceinline__ uint4 ld_before_wait16(const void* p) {
  uint4 v;
  asm volatile("ld.global.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}
// 16 bytes of an activation (written by an earlier kernel) loaded where the code puts
// it: a plain coherent global load as a volatile asm, which the compiler keeps in order
// with the other volatile asms, so the PTX has it before a cp.async wait that follows
// it (ordinary loads were sunk below the wait). ptxas may still schedule some below the
// wait (SASS: 2 of 8 in gemv_silu_add_t1's PDL build, a few at T = 2).
__device__ __forceinline__ uint4 ld_in_order16(const void* p) {
  uint4 v;
  asm volatile("ld.global.v4.u32 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}
__device__ __forceinline__ uint2 ld_before_wait8(const void* p) {
  uint2 v;
  asm volatile("ld.global.L1::no_allocate.v2.u32 {%0, %1}, [%2];\n"
               : "=r"(v.x), "=r"(v.y)
               : "l"(p));
  return v;
}
__device__ __forceinline__ void pdl_trigger() {
#if defined(SOV_PDL) && defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

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

// FP8 KV cache: OCP E4M3 ("e4m3fn": bias 7, no infinities, NaN = S.1111.111, largest
// finite 448), one byte per element, scaled per KV head (stored = value / scale). Both
// conversions are exact integer code, as kernels::gpu_ref::{to_e4m3, from_e4m3}, the same
// on every architecture.
typedef unsigned char fp8;

// One code to f32 (exact): e4m3's exponent and mantissa fit f16's (subnormals too), and
// f16 -> f32 is exact; the two biases differ by 8.
__device__ __forceinline__ float e4m3_to_f32(unsigned c) {
  const unsigned short h = (unsigned short)(((c & 0x80u) << 8) | ((c & 0x7fu) << 7));
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
  return (c & 0x7fu) == 0x7fu ? __int_as_float(0x7fffffff) : f * 256.f;
}

// f32 to the nearest code (ties to even), saturating to +-448; NaN stays NaN.
__device__ __forceinline__ unsigned f32_to_e4m3(float x) {
  const unsigned u = __float_as_uint(x);
  const unsigned sign = (u >> 24) & 0x80u;
  const unsigned a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return sign | 0x7fu;  // NaN
  if (a >= 0x43e00000u) return sign | 0x7eu;  // |x| >= 448, infinities included
  if (a < 0x3c800000u) {                      // |x| < 2^-6: subnormal steps of 2^-9
    return sign | (unsigned)__float2int_rn(__uint_as_float(a) * 512.f);
  }
  // Round the mantissa to 3 bits (a carry moves into the exponent), rebias 127 -> 7.
  const unsigned r = a + 0x7ffffu + ((a >> 20) & 1u);
  return sign | ((r >> 20) - (120u << 3));
}

// Eight codes (one 8-byte load) widened to f32.
__device__ __forceinline__ void widen8_e4m3(uint2 raw, float out[8]) {
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    out[i] = e4m3_to_f32((raw.x >> (8 * i)) & 0xffu);
    out[4 + i] = e4m3_to_f32((raw.y >> (8 * i)) & 0xffu);
  }
}

// Eight bf16 values (one 16-byte word) widened to f32.
__device__ __forceinline__ void widen8_bf16(uint4 raw, float out[8]) {
  const unsigned w[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    out[2 * i] = __uint_as_float(w[i] << 16);
    out[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
  }
}

// Eight consecutive KV-cache elements: their raw load and their widening, per storage type.
template <typename T>
struct Kv8;
template <>
struct Kv8<bf16> {
  typedef uint4 Raw;
  static __device__ __forceinline__ Raw load(const bf16* p) {
    return *reinterpret_cast<const uint4*>(p);
  }
  // A load that stays ahead of griddepcontrol.wait (see ld_before_wait16).
  static __device__ __forceinline__ Raw load_before_wait(const bf16* p) {
    return ld_before_wait16(p);
  }
  static __device__ __forceinline__ Raw zero() { return make_uint4(0, 0, 0, 0); }
  static __device__ __forceinline__ void widen(Raw r, float out[8]) { widen8_bf16(r, out); }
};
template <>
struct Kv8<fp8> {
  typedef uint2 Raw;
  static __device__ __forceinline__ Raw load(const fp8* p) {
    return *reinterpret_cast<const uint2*>(p);
  }
  static __device__ __forceinline__ Raw load_before_wait(const fp8* p) {
    return ld_before_wait8(p);
  }
  static __device__ __forceinline__ Raw zero() { return make_uint2(0, 0); }
  static __device__ __forceinline__ void widen(Raw r, float out[8]) { widen8_e4m3(r, out); }
};

// Tensor cores and asynchronous copies (sm_80+), shared by the attention kernels.

// D += A B for one m16n8k16 tile: bf16 in, f32 accumulate. A fragments: a[0] (row g,
// cols 2t, 2t+1), a[1] (row g + 8), a[2] (row g, cols 2t + 8, + 9), a[3] (row g + 8);
// B: b0 (k = 2t, 2t + 1, n = g), b1 (k + 8); C: c[0..1] (row g, cols 2t, 2t + 1),
// c[2..3] (row g + 8); g = lane / 4, t = lane % 4.
__device__ __forceinline__ void mma_bf16(float c[4], const unsigned a[4], unsigned b0,
                                         unsigned b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
      "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// 32-bit shared-memory address of a generic pointer into shared memory.
__device__ __forceinline__ unsigned smem_u32(const void* p) {
  unsigned a;
  asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(a) : "l"(p));
  return a;
}

// 16 bytes global -> shared without passing through registers (cached in L2 only);
// `src_bytes` 0 reads nothing and stores zeros.
__device__ __forceinline__ void cp_async16(unsigned dst, const void* src, unsigned src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
               "r"(src_bytes)
               : "memory");
}
__device__ __forceinline__ void cp_async_commit() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}
// Wait until at most N of this thread's committed groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// Four 8x8 bf16 matrices; lanes 8i..8i+7 give the row addresses of matrix i, and each
// lane receives (row lane/4, columns 2(lane%4), +1) of every matrix (`.trans`: column
// lane/4, rows 2(lane%4), +1).
__device__ __forceinline__ void ldsm_x4(unsigned r[4], unsigned addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr)
               : "memory");
}
__device__ __forceinline__ void ldsm_x4_trans(unsigned r[4], unsigned addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr)
               : "memory");
}

// Online-softmax pieces shared by the pipelined and the wgmma prefill kernels. One warp
// holds 16 query rows, lane (g, t) rows g and g + 8 (g = lane / 4, t = lane % 4); a
// 64-key score tile is 8 column tiles in s[4 jn + e] (a tile of NS / 2 keys NS / 4 of
// them; the helpers below take either) and the output HD / 8 column tiles
// in o[4 n + e] (e = 0, 1: row g, columns 2t, 2t + 1; e = 2, 3: row g + 8): the
// m16n8k16 accumulator layout, which wgmma's accumulators share.

// One warp's 16 query rows, from row0 of a sequence's n_new new tokens (new token 0 at
// position first_pos): lane (g, t)'s two rows, their positions (-1: a padding row past
// n_new, which sees nothing), and what the causal walk needs about the warp.
struct AttnRows {
  int rows[2];
  int qpos[2];
  int first_pos;  // the warp's first row's position
  int last_pos;   // the last position any valid row of the warp sees
  bool active;    // some row is valid
  bool full;      // every row is valid
  __device__ __forceinline__ AttnRows(int row0, int n_new, int seq_first_pos, int g) {
    rows[0] = row0 + g;
    rows[1] = row0 + g + 8;
    qpos[0] = rows[0] < n_new ? seq_first_pos + rows[0] : -1;
    qpos[1] = rows[1] < n_new ? seq_first_pos + rows[1] : -1;
    first_pos = seq_first_pos + row0;
    last_pos = seq_first_pos + min(n_new - 1, row0 + 15);
    active = row0 < n_new;
    full = row0 + 15 < n_new;
  }
  // Whether the tile of `keys` keys at k0 crosses the warp's diagonal (or the warp has
  // padding rows), so that attn_mask must run.
  __device__ __forceinline__ bool needs_mask(int k0, int keys = 64) const {
    return !full || k0 + keys - 1 > first_pos;
  }
};

// Q as A fragments (k-step ks: columns col0 + 16 ks ..), rows past n_new zero.
template <int KS>
__device__ __forceinline__ void attn_load_q(unsigned (&qa)[KS][4], const bf16* __restrict__ q,
                                            int q0, const int rows[2], int n_new,
                                            int q_stride, int col0, int t) {
#pragma unroll
  for (int ks = 0; ks < KS; ++ks) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const bool ok = rows[r] < n_new;
      const unsigned* src = reinterpret_cast<const unsigned*>(
          q + (long long)(q0 + (ok ? rows[r] : 0)) * q_stride + col0 + ks * 16 + 2 * t);
      qa[ks][r] = ok ? src[0] : 0u;
      qa[ks][r + 2] = ok ? src[4] : 0u;
    }
  }
}

// Causal mask of the tile of keys k0..k0+NS/2-1: keys after a row's position become -inf
// (a padding row has position -1 and sees nothing).
template <int NS>
__device__ __forceinline__ void attn_mask(float (&s)[NS], int k0, int t, const int qpos[2]) {
#pragma unroll
  for (int jn = 0; jn < NS / 4; ++jn) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      if (k0 + 8 * jn + 2 * t + (e & 1) > qpos[e >> 1]) s[4 * jn + e] = neg_inf();
    }
  }
}

// 2^x with the hardware's approximate exponential (ex2.approx.ftz: relative error about
// 2^-22, results below 2^-126 flushed to zero, 2^-inf = 0), one instruction where exp2f
// adds a range test and two multiplies for results in the denormal range; softmax
// weights are rounded to bf16 (8 bits) right after.
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// One tile's online-softmax step in log2 units, without the output: the raw scores s
// become the weights 2^(s * scale_log2 - m) against the new running max m (per row, over
// the quad's lanes), the lane-partial sums l are rescaled to it and `rescale` gets the
// factor by which the output must be (attn_softmax applies it).
template <int NS>
__device__ __forceinline__ void attn_softmax_weights(float (&s)[NS], float (&m)[2],
                                                     float (&l)[2], float scale_log2,
                                                     float (&rescale)[2]) {
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float mx = neg_inf();
#pragma unroll
    for (int jn = 0; jn < NS / 4; ++jn) mx = fmaxf(mx, fmaxf(s[4 * jn + 2 * r], s[4 * jn + 2 * r + 1]));
    mx = fmaxf(mx, __shfl_xor_sync(FULL_MASK, mx, 1));
    mx = fmaxf(mx, __shfl_xor_sync(FULL_MASK, mx, 2));
    const float m_new = fmaxf(m[r], mx * scale_log2);
    // Nothing visible yet: shift by 0 so exp2 gives 0 rather than NaN.
    const float shift = m_new == neg_inf() ? 0.f : m_new;
    rescale[r] = fast_exp2(m[r] - shift);
    m[r] = m_new;
    float sum = 0.f;
#pragma unroll
    for (int jn = 0; jn < NS / 4; ++jn) {
      float& a = s[4 * jn + 2 * r];
      float& b = s[4 * jn + 2 * r + 1];
      a = fast_exp2(fmaf(a, scale_log2, -shift));
      b = fast_exp2(fmaf(b, scale_log2, -shift));
      sum += a + b;
    }
    l[r] = l[r] * rescale[r] + sum;
  }
}

// The output's rows rescaled by attn_softmax_weights' factors; skipped (a warp-uniform
// branch) when no row of the warp got a new maximum, which after the first tiles is the
// common case: 64 multiplies a tile fewer at head_dim 128.
template <int NO>
__device__ __forceinline__ void attn_rescale(float (&o)[NO], const float (&rescale)[2]) {
  if (!__any_sync(FULL_MASK, rescale[0] != 1.f || rescale[1] != 1.f)) return;
#pragma unroll
  for (int n = 0; n < NO / 4; ++n) {
#pragma unroll
    for (int e = 0; e < 4; ++e) o[4 * n + e] *= rescale[e >> 1];
  }
}

// One tile's whole online-softmax step: the weights, and the output o rescaled.
template <int NS, int NO>
__device__ __forceinline__ void attn_softmax(float (&s)[NS], float (&m)[2], float (&l)[2],
                                             float (&o)[NO], float scale_log2) {
  float rescale[2];
  attn_softmax_weights(s, m, l, scale_log2, rescale);
  attn_rescale(o, rescale);
}

// The weights of keys 16 kk .. 16 kk + 15 as an A fragment (rounded to bf16).
template <int NS>
__device__ __forceinline__ void attn_pack_p(const float (&s)[NS], int kk, unsigned (&pa)[4]) {
  pa[0] = pack_bf16(s[8 * kk + 0], s[8 * kk + 1]);
  pa[1] = pack_bf16(s[8 * kk + 2], s[8 * kk + 3]);
  pa[2] = pack_bf16(s[8 * kk + 4], s[8 * kk + 5]);
  pa[3] = pack_bf16(s[8 * kk + 6], s[8 * kk + 7]);
}

// The finished rows: the quad's partial sums added, o / l stored as bf16 into
// out[token][n_heads][HD] (padding rows skipped).
template <int HD>
__device__ __forceinline__ void attn_store(bf16* __restrict__ out, const float (&o)[HD / 2],
                                           float (&l)[2], const int rows[2], int n_new,
                                           int q0, int n_heads, int head, int t) {
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    l[r] += __shfl_xor_sync(FULL_MASK, l[r], 1);
    l[r] += __shfl_xor_sync(FULL_MASK, l[r], 2);
  }
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    if (rows[r] >= n_new) continue;
    const float inv = l[r] > 0.f ? 1.f / l[r] : 0.f;
    bf16* dst = out + ((long long)(q0 + rows[r]) * n_heads + head) * HD;
#pragma unroll
    for (int n = 0; n < HD / 8; ++n) {
      *reinterpret_cast<unsigned*>(dst + 8 * n + 2 * t) =
          pack_bf16(o[4 * n + 2 * r] * inv, o[4 * n + 2 * r + 1] * inv);
    }
  }
}

}  // namespace sov
