// RMSNorm, plain and fused with the residual add. CPU references:
// kernels::cpu::rms_norm and kernels::cpu::add_rms_norm (f32; here activations are bf16,
// the residual stream and every sum f32).
//
// One CTA of 256 threads per row; `dim` must be a multiple of 8 (16-byte loads).
#include "common.cuh"

namespace sov {

constexpr int NORM_THREADS = 256;

// Sum over the CTA; every thread gets the result.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
  v = warp_sum(v);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  float t = lane < NORM_THREADS / 32 ? scratch[lane] : 0.f;
  t = warp_sum(t);
  __syncthreads();  // scratch may be reused by the caller
  return t;
}

// out = residual * inv * weight for one f32 row, rounded to bf16 (16-byte stores).
__device__ __forceinline__ void store_normed(const float* SOV_RESTRICT_ACT rr,
                                             const sov::bf16* __restrict__ weight,
                                             sov::bf16* __restrict__ out, int dim,
                                             float inv) {
  for (int c = threadIdx.x * 8; c < dim; c += NORM_THREADS * 8) {
    const float4* r4 = reinterpret_cast<const float4*>(rr + c);
    const float4 a = r4[0], b = r4[1];
    float v[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
    float w[8];
    load8(weight + c, w);
#pragma unroll
    for (int i = 0; i < 8; ++i) v[i] = v[i] * inv * w[i];
    store8(out + c, v);
  }
}

}  // namespace sov

// out[r] = x[r] / sqrt(mean(x[r]^2) + eps) * weight
extern "C" __global__ void __launch_bounds__(sov::NORM_THREADS)
    rms_norm(const sov::bf16* SOV_RESTRICT_ACT x, const sov::bf16* __restrict__ weight,
             sov::bf16* __restrict__ out, int dim, float eps) {
  __shared__ float scratch[sov::NORM_THREADS / 32];
  sov::pdl_trigger();  // PDL builds (common.cuh); every entry of a PDL source waits
  sov::pdl_wait();
  const long long row = blockIdx.x;
  const sov::bf16* xr = x + row * dim;
  float ss = 0.f;
  for (int c = threadIdx.x * 8; c < dim; c += sov::NORM_THREADS * 8) {
    float v[8];
    sov::load8(xr + c, v);
#pragma unroll
    for (int i = 0; i < 8; ++i) ss = fmaf(v[i], v[i], ss);
  }
  ss = sov::block_sum(ss, scratch);
  const float inv = rsqrtf(ss / dim + eps);
  for (int c = threadIdx.x * 8; c < dim; c += sov::NORM_THREADS * 8) {
    float v[8], w[8];
    sov::load8(xr + c, v);
    sov::load8(weight + c, w);
#pragma unroll
    for (int i = 0; i < 8; ++i) v[i] = v[i] * inv * w[i];
    sov::store8(out + row * dim + c, v);
  }
}

// residual[r] += x[r]; out[r] = rms_norm(residual[r]) (residual f32, x and out bf16).
extern "C" __global__ void __launch_bounds__(sov::NORM_THREADS)
    add_rms_norm(float* __restrict__ residual, const sov::bf16* SOV_RESTRICT_ACT x,
                 const sov::bf16* __restrict__ weight, sov::bf16* __restrict__ out,
                 int dim, float eps) {
  __shared__ float scratch[sov::NORM_THREADS / 32];
  sov::pdl_trigger();  // PDL builds (common.cuh)
  sov::pdl_wait();
  const long long row = blockIdx.x;
  float* rr = residual + row * dim;
  float ss = 0.f;
  for (int c = threadIdx.x * 8; c < dim; c += sov::NORM_THREADS * 8) {
    float v[8];
    sov::load8(x + row * dim + c, v);
    float4* r4 = reinterpret_cast<float4*>(rr + c);
    float4 a = r4[0], b = r4[1];
    a.x += v[0]; a.y += v[1]; a.z += v[2]; a.w += v[3];
    b.x += v[4]; b.y += v[5]; b.z += v[6]; b.w += v[7];
    r4[0] = a;
    r4[1] = b;
    ss = fmaf(a.x, a.x, ss); ss = fmaf(a.y, a.y, ss); ss = fmaf(a.z, a.z, ss); ss = fmaf(a.w, a.w, ss);
    ss = fmaf(b.x, b.x, ss); ss = fmaf(b.y, b.y, ss); ss = fmaf(b.z, b.z, ss); ss = fmaf(b.w, b.w, ss);
  }
  ss = sov::block_sum(ss, scratch);
  sov::store_normed(rr, weight, out + row * dim, dim, rsqrtf(ss / dim + eps));
}

// out[r] = rms_norm(residual[r]) (residual f32, out bf16): the final norm of the fused
// decode path, whose matrix kernels add into the residual themselves.
extern "C" __global__ void __launch_bounds__(sov::NORM_THREADS)
    rms_norm_f32(const float* SOV_RESTRICT_ACT residual, const sov::bf16* __restrict__ weight,
                 sov::bf16* __restrict__ out, int dim, float eps) {
  __shared__ float scratch[sov::NORM_THREADS / 32];
  sov::pdl_trigger();  // PDL builds (common.cuh): the residual comes from the last GEMV
  sov::pdl_wait();
  const long long row = blockIdx.x;
  const float* rr = residual + row * dim;
  float ss = 0.f;
  for (int c = threadIdx.x * 4; c < dim; c += sov::NORM_THREADS * 4) {
    const float4 a = *reinterpret_cast<const float4*>(rr + c);
    ss = fmaf(a.x, a.x, ss); ss = fmaf(a.y, a.y, ss); ss = fmaf(a.z, a.z, ss); ss = fmaf(a.w, a.w, ss);
  }
  ss = sov::block_sum(ss, scratch);
  // Correctly rounded sqrt and division, as the CPU reference computes it.
  sov::store_normed(rr, weight, out + row * dim, dim, 1.f / sqrtf(ss / dim + eps));
}
