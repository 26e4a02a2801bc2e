// SwiGLU: out = silu(gate) * up, silu(x) = x / (1 + e^-x). CPU reference:
// kernels::cpu::silu_and_mul (f32; here bf16 in and out, f32 arithmetic).
//
// gate_up is [rows][2 * inter] (the gate half, then the up half: one fused GEMM);
// out is [rows][inter]. `inter` must be a multiple of 8. Grid-stride over 8-element
// pieces; any grid size works.
#include "common.cuh"

extern "C" __global__ void __launch_bounds__(256)
    silu_and_mul(const sov::bf16* __restrict__ gate_up, sov::bf16* __restrict__ out,
                 int rows, int inter) {
  const long long pieces = (long long)rows * (inter / 8);
  for (long long p = blockIdx.x * (long long)blockDim.x + threadIdx.x; p < pieces;
       p += (long long)gridDim.x * blockDim.x) {
    const long long r = p / (inter / 8);
    const int c = (int)(p % (inter / 8)) * 8;
    float g[8], u[8], o[8];
    sov::load8(gate_up + r * 2 * inter + c, g);
    sov::load8(gate_up + r * 2 * inter + inter + c, u);
#pragma unroll
    for (int i = 0; i < 8; ++i) o[i] = g[i] / (1.f + __expf(-g[i])) * u[i];
    sov::store8(out + r * inter + c, o);
  }
}

// Embedding lookup: out[t] = table[ids[t]] (bf16 rows of `hidden`, a multiple of 8).
// One CTA of 128 threads per token. CPU reference: kernels::gpu_ref::embed_rows.
extern "C" __global__ void __launch_bounds__(128)
    embed_rows(const sov::bf16* __restrict__ table, const int* __restrict__ ids,
               sov::bf16* __restrict__ out, int hidden) {
  const long long t = blockIdx.x;
  const sov::bf16* src = table + (long long)ids[t] * hidden;
  for (int c = threadIdx.x * 8; c < hidden; c += blockDim.x * 8)
    *reinterpret_cast<uint4*>(out + t * hidden + c) = *reinterpret_cast<const uint4*>(src + c);
}

// Embedding lookup into the f32 residual stream: residual[t] = table[ids[t]] (the fused
// decode path adds every layer's output to it). CPU reference: kernels::gpu_ref::embed_rows.
extern "C" __global__ void __launch_bounds__(128)
    embed_rows_f32(const sov::bf16* __restrict__ table, const int* __restrict__ ids,
                   float* __restrict__ residual, int hidden) {
  const long long t = blockIdx.x;
  const sov::bf16* src = table + (long long)ids[t] * hidden;
  for (int c = threadIdx.x * 8; c < hidden; c += blockDim.x * 8) {
    float v[8];
    sov::load8(src + c, v);
    float4* dst = reinterpret_cast<float4*>(residual + t * hidden + c);
    dst[0] = make_float4(v[0], v[1], v[2], v[3]);
    dst[1] = make_float4(v[4], v[5], v[6], v[7]);
  }
}
