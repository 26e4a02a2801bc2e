// Skinny matrix products for decode steps: y[t][r] = sum_c w[r][c] * x[t][c] for T <= 8
// token rows, bf16 weights, f32 sums. CPU reference: kernels::gpu_ref::gemv and
// kernels::gpu_ref::gemv_f32 (with the input and output stages below).
// cuBLAS picks tensor-core tiles for these shapes that reach 30-65% of the memory
// bandwidth on a 2048-wide layer (measured on an H200); these kernels stream the weights
// once, copied with 16-byte cp.async straight into shared memory a round at a time (all
// of a round in flight together, no registers held by them), and fuse the steps around a
// decode step's matrix products, so a layer is six kernels:
//
//   gemv_norm_t{T}      x = rms_norm(residual) * norm_w (rounded to bf16, as the
//                       unfused rms_norm kernel writes it), y bf16
//   gemv_norm_late_t{T} the same product with the norm applied last (experimental):
//                       y = (1 / rms) * sum_c w[r][c] * residual[c] * norm_w[c] in f32,
//                       nothing rounded to bf16 before the sum; the sum of squares is
//                       gathered in the main loop, so no prologue delays the weight loads
//   gemv_t{T}           x bf16, y bf16
//   gemv_norm_rope_t{T} gemv_norm's product for the fused q|k|v rows, then (experimental)
//                       RoPE and the KV-cache write in its epilogue, as rope_write_kv
//                       does them: q rows rotated into y, k rows rotated and v rows into
//                       the bf16 cache slots; interleaved pairs (2i, 2i+1) only (the
//                       worker permutes half-style q/k weight rows into that order)
//   gemv_norm_late_rope_t{T}  the two experiments together: gemv_norm_late's product,
//                       gemv_norm_rope's epilogue
//   gemv_add_t{T}       x bf16, residual += y (f32)
//   gemv_silu_add_t{T}  x = silu(gate) * up from the fused gate|up rows (rounded to bf16,
//                       as silu_and_mul writes it), residual += y (f32)
//
//   w [rows][k] bf16 (row-major, k a multiple of 8); x or residual rows have k columns
//   (gate|up rows 2k); y and the output residual rows have `rows` columns.
//
// Grid: ceil(rows / GV_ROWS) CTAs of 128 threads. A CTA computes GV_ROWS rows; its
// threads stride over the 16-byte column pieces, so each weight row is read in coalesced
// 2 KB runs and each x piece is formed once for GV_ROWS rows. A thread takes U pieces a
// round (2; the SiLU input 4 at one token row, 2 at two, 1 above): their weights go to
// the thread's own shared-memory slots (U x 8 KB a CTA: 16 KB, 32 KB for
// gemv_silu_add_t1) while their inputs are loaded into registers, then it waits for its
// copies and multiplies. The sums are reduced with shuffles, then across the 4 warps in
// shared memory. The host rounds the token count up to T = 1, 2, 4 or 8: the extra input
// rows are read (the buffers must hold T rows) and their results dropped; only `tokens`
// rows are written.
#include "common.cuh"

namespace sov {

constexpr int GV_THREADS = 128;
constexpr int GV_WARPS = GV_THREADS / 32;
constexpr int GV_ROWS = 4;
// gemv_silu_add at one token row holds 4 pieces of inputs a round: at most 128 registers,
// so that 4 CTAs fit an SM (the down projection of EuroLLM-1.7B's shape is 512 CTAs, 3.9
// an SM on 132 SMs).
constexpr int GV_SILU_MIN_CTAS = 4;
// The normalised-input GEMVs at one token row: at most 64 registers, 8 CTAs an SM, so
// that EuroLLM-1.7B's q|k|v projection (1024 CTAs) runs in one wave on 132 SMs.
constexpr int gv_norm_min_ctas(int t) { return t == 1 ? 8 : 1; }

enum GvIn { GV_PLAIN = 0, GV_NORM = 1, GV_SILU = 2, GV_NORM_LATE = 3 };
enum GvOut { GV_BF16 = 0, GV_ADD = 1, GV_ROPE = 2 };

// GV_ROPE's epilogue arguments (rope_kv.cu's, interleaved pairs): y holds the rotated q
// rows; k and v rows go to the cache slot of their token.
struct GvRope {
  const int* positions;
  const int* slots;
  const float* cos_t;
  const float* sin_t;
  bf16* k_cache;
  bf16* v_cache;
  int n_heads, n_kv_heads, hd, rot_dim;
};

// Eight f32 values rounded to bf16 and widened back (what a bf16 store and load give).
__device__ __forceinline__ void round8(float v[8]) {
#pragma unroll
  for (int i = 0; i < 8; ++i) v[i] = bf16_to_f32(f32_to_bf16(v[i]));
}

// acc + the dot product of 8 bf16 weights (one 16-byte load) with 8 inputs.
__device__ __forceinline__ float dot8(const uint4 w, const float x[8], float acc) {
  const unsigned u[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    acc = fmaf(__uint_as_float(u[i] << 16), x[2 * i], acc);
    acc = fmaf(__uint_as_float(u[i] & 0xffff0000u), x[2 * i + 1], acc);
  }
  return acc;
}

// Output element o: stored as bf16 (GV_BF16) or added to the f32 residual (GV_ADD).
template <int OUT>
__device__ __forceinline__ void store_out(void* __restrict__ yout, long long o, float v) {
  if (OUT == GV_BF16) {
    static_cast<sov::bf16*>(yout)[o] = f32_to_bf16(v);
  } else {
    static_cast<float*>(yout)[o] += v;
  }
}

// 16 loaded bytes as the four f32 values they hold.
__device__ __forceinline__ float4 as_float4(const uint4 v) {
  return make_float4(__uint_as_float(v.x), __uint_as_float(v.y), __uint_as_float(v.z),
                     __uint_as_float(v.w));
}

// The sum of squares of 8 f32 values (one 32-byte piece of a residual row).
__device__ __forceinline__ float sq_sum8(const float4 a, const float4 b) {
  return a.x * a.x + a.y * a.y + a.z * a.z + a.w * a.w + b.x * b.x + b.y * b.y + b.z * b.z +
         b.w * b.w;
}

// 1 / rms of each of the T residual rows of k columns into s_inv, given each thread's
// part of the rows' sums of squares (every thread of the CTA calls it; it synchronises).
// Correctly rounded sqrt and division, as the CPU reference computes it.
template <int T, int THREADS>
__device__ __forceinline__ void finish_inv_rms(const float (&ss)[T], int k, float eps,
                                               float* s_inv) {
  __shared__ float s_red[THREADS / 32][T];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
#pragma unroll
  for (int t = 0; t < T; ++t) {
    const float v = warp_sum(ss[t]);
    if (lane == 0) s_red[warp][t] = v;
  }
  __syncthreads();
  if (threadIdx.x < T) {
    float v = 0.f;
#pragma unroll
    for (int wi = 0; wi < THREADS / 32; ++wi) v += s_red[wi][threadIdx.x];
    s_inv[threadIdx.x] = 1.f / sqrtf(v / k + eps);
  }
  __syncthreads();
}

// The same from the residual rows in memory (written by the previous kernel, in L2):
// each thread sums pieces threadIdx.x, + THREADS, ... in that order.
template <int T, int THREADS>
__device__ __forceinline__ void row_inv_rms(const float* SOV_RESTRICT_ACT res, int k, float eps,
                                            float* s_inv) {
  float ss[T];
#pragma unroll
  for (int t = 0; t < T; ++t) ss[t] = 0.f;
#pragma unroll 2
  for (int p = threadIdx.x; p < k / 8; p += THREADS) {
#pragma unroll
    for (int t = 0; t < T; ++t) {
      const float4 a = *reinterpret_cast<const float4*>(res + (long long)t * k + p * 8);
      const float4 b = *reinterpret_cast<const float4*>(res + (long long)t * k + p * 8 + 4);
      ss[t] += sq_sum8(a, b);
    }
  }
  finish_inv_rms<T, THREADS>(ss, k, eps, s_inv);
}

// One token row's raw input at a 16-byte piece of the weights: 16 bytes of the bf16 row
// (GV_PLAIN, in `a`), 32 bytes of the f32 residual (GV_NORM, GV_NORM_LATE: `a` then `b`)
// or 16 bytes each of gate and up from a gate|up row (GV_SILU). Loaded apart from forming
// the input, so that a thread issues a round's input loads while the round's weights are
// in flight, and with `ld_in_order16`, so that they stay ahead of the wait for the
// weights (ordinary loads were sunk below it in the SASS, their latency exposed after it).
struct GvRaw {
  uint4 a, b;
};

template <int IN, bool ORDERED = true>
__device__ __forceinline__ GvRaw load_raw(const float* SOV_RESTRICT_ACT res,
                                          const sov::bf16* SOV_RESTRICT_ACT xb, int k, int t,
                                          int p) {
  // ORDERED: ld_in_order16; otherwise ordinary loads (the register design's, below).
  auto ld = [](const void* a) {
    return ORDERED ? ld_in_order16(a) : *reinterpret_cast<const uint4*>(a);
  };
  GvRaw x;
  if (IN == GV_PLAIN) {
    x.a = ld(xb + (long long)t * k + p * 8);
    x.b = x.a;  // unused
  } else if (IN == GV_SILU) {
    x.a = ld(xb + (long long)t * 2 * k + p * 8);
    x.b = ld(xb + (long long)t * 2 * k + k + p * 8);
  } else {
    x.a = ld(res + (long long)t * k + p * 8);
    x.b = ld(res + (long long)t * k + p * 8 + 4);
  }
  return x;
}

// The 8 input values of a token row formed from its raw piece: the bf16 row (GV_PLAIN),
// the RMS-normalised residual (inv: 1 / rms of the row, nw: that piece of the norm
// weight) or SiLU(gate) * up, the latter two rounded to bf16 where the unfused kernels
// store them; GV_NORM_LATE: the residual times the norm weight, unrounded, its squares
// added to ss.
template <int IN>
__device__ __forceinline__ void form8(const GvRaw x, float inv, const float nw[8], float xf[8],
                                      float& ss) {
  if (IN == GV_PLAIN) {
    widen8_bf16(x.a, xf);
    return;
  }
  if (IN == GV_SILU) {
    float g[8], u[8];
    widen8_bf16(x.a, g);
    widen8_bf16(x.b, u);
#pragma unroll
    for (int i = 0; i < 8; ++i) xf[i] = g[i] / (1.f + __expf(-g[i])) * u[i];
    round8(xf);
    return;
  }
  const float4 lo = as_float4(x.a), hi = as_float4(x.b);
  const float v[8] = {lo.x, lo.y, lo.z, lo.w, hi.x, hi.y, hi.z, hi.w};
  if (IN == GV_NORM_LATE) {
    // Every piece of the row passes through the CTA exactly once: the sum of squares is
    // complete after the loop.
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      ss = fmaf(v[i], v[i], ss);
      xf[i] = v[i] * nw[i];
    }
  } else {
#pragma unroll
    for (int i = 0; i < 8; ++i) xf[i] = v[i] * inv * nw[i];
    round8(xf);
  }
}

template <int T, int IN, int OUT, bool STAGE = true>
__device__ __forceinline__ void gemv_impl(const sov::bf16* __restrict__ w,
                                          const void* SOV_RESTRICT_ACT xin,
                                          const sov::bf16* __restrict__ norm_w, float eps,
                                          void* __restrict__ yout, int rows, int k,
                                          int tokens, GvRope rp = GvRope{}) {
  __shared__ float s_part[GV_WARPS][GV_ROWS][T];
  __shared__ float s_y[GV_ROWS][T];  // GV_ROPE: the CTA's outputs, rounded to bf16
  __shared__ float s_inv[T];
  __shared__ float s_ss[GV_WARPS][T];  // GV_NORM_LATE: the warps' sums of squares
  const int row0 = blockIdx.x * GV_ROWS;
  const int pieces = k / 8;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const float* res = static_cast<const float*>(xin);
  const sov::bf16* xb = static_cast<const sov::bf16*>(xin);

  float acc[GV_ROWS][T];
#pragma unroll
  for (int r = 0; r < GV_ROWS; ++r)
#pragma unroll
    for (int t = 0; t < T; ++t) acc[r][t] = 0.f;
  float ss[T];  // GV_NORM_LATE: this thread's part of each row's sum of squares
#pragma unroll
  for (int t = 0; t < T; ++t) ss[t] = 0.f;
  const sov::bf16* wr[GV_ROWS];
#pragma unroll
  for (int r = 0; r < GV_ROWS; ++r) {
    // Rows past the end read row 0 (always valid) and are never written.
    wr[r] = w + (long long)(row0 + r < rows ? row0 + r : 0) * k;
  }
  constexpr bool NW = IN == GV_NORM || IN == GV_NORM_LATE;
  if constexpr (!STAGE) {
    // The register design of run 8 and before (`gemv_*_regs_t1/t2`, worker
    // SOV_GEMV_STAGE=regs), kept to measure the shared-memory one against it side by
    // side: a piece's weights are loaded into registers and multiplied, two pieces a
    // loop iteration (one for the SiLU input), the inputs with ordinary loads in the
    // products, the norm prologue before the first weight load (PDL builds: after the
    // first U pieces' weights, which are loaded before the wait).
    auto load_w = [&](int p, uint4 (&wv)[GV_ROWS]) {
#pragma unroll
      for (int r = 0; r < GV_ROWS; ++r) wv[r] = *reinterpret_cast<const uint4*>(wr[r] + p * 8);
    };
    auto load_w_before_wait = [&](int p, uint4 (&wv)[GV_ROWS]) {
#pragma unroll
      for (int r = 0; r < GV_ROWS; ++r) wv[r] = ld_before_wait16(wr[r] + p * 8);
    };
    auto piece = [&](int p, const uint4 (&wv)[GV_ROWS]) {
      float nw[8];
      if (NW) load8(norm_w + p * 8, nw);
#pragma unroll
      for (int t = 0; t < T; ++t) {
        float xf[8];
        form8<IN>(load_raw<IN, false>(res, xb, k, t, p), IN == GV_NORM ? s_inv[t] : 0.f, nw,
                  xf, ss[t]);
#pragma unroll
        for (int r = 0; r < GV_ROWS; ++r) acc[r][t] = dot8(wv[r], xf, acc[r][t]);
      }
    };
    constexpr int U = IN == GV_SILU ? 1 : 2;
    if (!PDL && IN == GV_NORM) row_inv_rms<T, GV_THREADS>(res, k, eps, s_inv);
    uint4 first[U][GV_ROWS];
    if (PDL) {
#pragma unroll
      for (int u = 0; u < U; ++u)
        if (threadIdx.x + u * GV_THREADS < pieces)
          load_w_before_wait(threadIdx.x + u * GV_THREADS, first[u]);
    }
    pdl_wait();
    if (PDL && IN == GV_NORM) row_inv_rms<T, GV_THREADS>(res, k, eps, s_inv);
    if (PDL) {
#pragma unroll
      for (int u = 0; u < U; ++u)
        if (threadIdx.x + u * GV_THREADS < pieces) piece(threadIdx.x + u * GV_THREADS, first[u]);
    }
#pragma unroll(U)
    for (int p = threadIdx.x + (PDL ? U * GV_THREADS : 0); p < pieces; p += GV_THREADS) {
      uint4 wv[GV_ROWS];
      load_w(p, wv);
      piece(p, wv);
    }
  } else {
    // How many pieces a thread has in flight: two (at k = 2048 all of a thread's pieces);
    // for the SiLU input, whose k is the MLP's width (5632 at EuroLLM-1.7B's shape: five or
    // six pieces a thread), four at one token row and two at two.
    constexpr int U = IN == GV_SILU ? (T == 1 ? 4 : T == 2 ? 2 : 1) : 2;
    // A round's weights are copied straight into shared memory (cp.async: nothing held in
    // registers while they are in flight, so the depth costs no occupancy), each thread
    // its own 16-byte slots, which it reads back after its own copies have landed (no
    // barrier). The round's inputs (T <= 2: `PRE`) are loaded into registers meanwhile.
    // Up to run 8 the weights went to registers and ptxas issued a round's second piece
    // only after the first piece's weights had arrived (two DRAM round trips where one
    // will do); loading whole rounds into registers instead cost 72 registers a thread at
    // one token row (7 CTAs an SM: EuroLLM-1.7B's q|k|v projection, 1024 CTAs, would no
    // longer fit one wave on 132 SMs). At T > 2 the inputs are loaded piece by piece.
    __shared__ __align__(16) uint4 s_w[U][GV_ROWS][GV_THREADS];
    constexpr bool PRE = T <= 2;
    // Copies piece p0 + u * GV_THREADS of the CTA's rows (16 bytes a row) for every u of a
    // round into the thread's slots, as one cp.async group.
    auto stage_w = [&](int p0) {
  #pragma unroll
      for (int u = 0; u < U; ++u)
        if (p0 + u * GV_THREADS < pieces)
  #pragma unroll
          for (int r = 0; r < GV_ROWS; ++r)
            cp_async16(smem_u32(&s_w[u][r][threadIdx.x]), wr[r] + (p0 + u * GV_THREADS) * 8, 16);
      cp_async_commit();
    };
    // The inputs of piece p for every token row, and its 16 bytes of the norm weight.
    auto load_in = [&](int p, GvRaw (&x)[T], uint4& nwr) {
      if (NW) nwr = ld_in_order16(norm_w + p * 8);
  #pragma unroll
      for (int t = 0; t < T; ++t) x[t] = load_raw<IN>(res, xb, k, t, p);
    };
    // Piece p (slot u of the round)'s products for every token row (its inputs in x if PRE).
    auto piece = [&](int p, int u, const GvRaw (&x)[T], const uint4& nwr) {
      uint4 wv[GV_ROWS];
  #pragma unroll
      for (int r = 0; r < GV_ROWS; ++r) wv[r] = s_w[u][r][threadIdx.x];
      float nw[8];
      if (NW) widen8_bf16(PRE ? nwr : *reinterpret_cast<const uint4*>(norm_w + p * 8), nw);
  #pragma unroll
      for (int t = 0; t < T; ++t) {
        float xf[8];
        form8<IN>(PRE ? x[t] : load_raw<IN>(res, xb, k, t, p), IN == GV_NORM ? s_inv[t] : 0.f,
                  nw, xf, ss[t]);
  #pragma unroll
        for (int r = 0; r < GV_ROWS; ++r) acc[r][t] = dot8(wv[r], xf, acc[r][t]);
      }
    };
    // A round: its inputs loaded while its weights are in flight, then its products. The
    // first round runs the norm prologue (gemv_norm) between the two; its inputs are loaded
    // before the prologue, whose barriers keep the wait for the weights behind them (ptxas
    // otherwise moved the wait above the input loads).
    auto run_round = [&](int p0, bool first) {
      GvRaw x[U][T];
      uint4 nwr[U];
  #pragma unroll
      for (int u = 0; u < U; ++u)
        if (PRE && p0 + u * GV_THREADS < pieces) load_in(p0 + u * GV_THREADS, x[u], nwr[u]);
      if (IN == GV_NORM && first) {
        if (PRE && pieces <= U * GV_THREADS) {
          // The round holds every piece of the thread's rows (k <= 2048): the sums of
          // squares come from its inputs, in row_inv_rms's order, with no second read.
          float ss_in[T];
  #pragma unroll
          for (int t = 0; t < T; ++t) ss_in[t] = 0.f;
  #pragma unroll
          for (int u = 0; u < U; ++u)
            if (p0 + u * GV_THREADS < pieces)
  #pragma unroll
              for (int t = 0; t < T; ++t)
                ss_in[t] += sq_sum8(as_float4(x[u][t].a), as_float4(x[u][t].b));
          finish_inv_rms<T, GV_THREADS>(ss_in, k, eps, s_inv);
        } else {
          row_inv_rms<T, GV_THREADS>(res, k, eps, s_inv);
        }
      }
      cp_async_wait<0>();
  #pragma unroll
      for (int u = 0; u < U; ++u)
        if (p0 + u * GV_THREADS < pieces) piece(p0 + u * GV_THREADS, u, x[u], nwr[u]);
    };
    // The first round's weights are copied before anything else (at k = 2048 that is all
    // of them): before the norm prologue, which then runs under their DRAM latency, and
    // in PDL builds (common.cuh) before waiting for the previous kernel (the weights are
    // not written by it). PDL builds let the successor in after the loop.
    stage_w(threadIdx.x);
    pdl_wait();
    run_round(threadIdx.x, true);
    for (int p0 = threadIdx.x + U * GV_THREADS; p0 < pieces; p0 += U * GV_THREADS) {
      stage_w(p0);
      run_round(p0, false);
    }
  }
  pdl_trigger();
#pragma unroll
  for (int r = 0; r < GV_ROWS; ++r)
#pragma unroll
    for (int t = 0; t < T; ++t) {
      const float v = warp_sum(acc[r][t]);
      if (lane == 0) s_part[warp][r][t] = v;
    }
  if (IN == GV_NORM_LATE) {
#pragma unroll
    for (int t = 0; t < T; ++t) {
      const float v = warp_sum(ss[t]);
      if (lane == 0) s_ss[warp][t] = v;
    }
  }
  __syncthreads();
  if (threadIdx.x < GV_ROWS * T) {
    const int r = threadIdx.x / T, t = threadIdx.x % T;
    float v = 0.f;
#pragma unroll
    for (int wi = 0; wi < GV_WARPS; ++wi) v += s_part[wi][r][t];
    if (IN == GV_NORM_LATE) {
      float sq = 0.f;
#pragma unroll
      for (int wi = 0; wi < GV_WARPS; ++wi) sq += s_ss[wi][t];
      v *= 1.f / sqrtf(sq / k + eps);
    }
    if (OUT == GV_ROPE) {
      s_y[r][t] = bf16_to_f32(f32_to_bf16(v));  // what the q|k|v buffer would hold
    } else if (row0 + r < rows && t < tokens) {
      const long long o = (long long)t * rows + row0 + r;
      store_out<OUT>(yout, o, v);
    }
  }
  if (OUT == GV_ROPE) {
    // rows is a multiple of 4 (whole heads of a multiple-of-8 head_dim) and row0 of
    // GV_ROWS = 4, so a row's rotation partner (the other of 2i, 2i + 1) is in this CTA.
    __syncthreads();
    if (threadIdx.x < GV_ROWS * T) {
      const int r = threadIdx.x / T, t = threadIdx.x % T;
      const int row = row0 + r;
      if (row >= rows || t >= tokens) return;
      const int q_rows = rp.n_heads * rp.hd, k_end = q_rows + rp.n_kv_heads * rp.hd;
      float val = s_y[r][t];
      const int d = row % rp.hd;
      if (row < k_end && d < rp.rot_dim) {
        const int half = rp.rot_dim / 2, i = d / 2;
        const long long pos = rp.positions[t];
        const float c = rp.cos_t[pos * half + i], sn = rp.sin_t[pos * half + i];
        const float x = s_y[r & ~1][t], y = s_y[r | 1][t];
        val = (r & 1) ? x * sn + y * c : x * c - y * sn;
      }
      if (row < q_rows) {
        static_cast<bf16*>(yout)[(long long)t * rows + row] = f32_to_bf16(val);
        return;
      }
      const int slot = rp.slots[t];
      if (slot < 0) return;  // a token whose K/V are not stored
      const long long dst = (long long)slot * rp.n_kv_heads * rp.hd;
      if (row < k_end) {
        rp.k_cache[dst + row - q_rows] = f32_to_bf16(val);
      } else {
        rp.v_cache[dst + row - k_end] = f32_to_bf16(val);
      }
    }
  }
}

}  // namespace sov

// The q|k|v GEMVs with RoPE and the KV write in their epilogue (input stage IN).
#define SOV_GEMV_ROPE(T, NAME, IN)                                                         \
  extern "C" __global__ void __launch_bounds__(sov::GV_THREADS, sov::gv_norm_min_ctas(T))  \
      NAME##T(const sov::bf16* w, const float* residual, const sov::bf16* norm_w,          \
              float eps, sov::bf16* y, int rows, int k, int tokens, const int* positions,  \
              const int* slots, const float* cos_t, const float* sin_t,                    \
              sov::bf16* k_cache, sov::bf16* v_cache, int n_heads, int n_kv_heads, int hd, \
              int rot_dim) {                                                               \
    sov::gemv_impl<T, IN, sov::GV_ROPE>(                                                   \
        w, residual, norm_w, eps, y, rows, k, tokens,                                      \
        sov::GvRope{positions, slots, cos_t, sin_t, k_cache, v_cache, n_heads, n_kv_heads, \
                    hd, rot_dim});                                                         \
  }

#define SOV_GEMV(T)                                                                        \
  extern "C" __global__ void __launch_bounds__(sov::GV_THREADS)                            \
      gemv_t##T(const sov::bf16* w, const sov::bf16* x, sov::bf16* y, int rows, int k,     \
                int tokens) {                                                              \
    sov::gemv_impl<T, sov::GV_PLAIN, sov::GV_BF16>(w, x, nullptr, 0.f, y, rows, k, tokens); \
  }                                                                                        \
  extern "C" __global__ void __launch_bounds__(sov::GV_THREADS, sov::gv_norm_min_ctas(T))  \
      gemv_norm_t##T(const sov::bf16* w, const float* residual, const sov::bf16* norm_w,   \
                     float eps, sov::bf16* y, int rows, int k, int tokens) {               \
    sov::gemv_impl<T, sov::GV_NORM, sov::GV_BF16>(w, residual, norm_w, eps, y, rows, k,    \
                                                  tokens);                                 \
  }                                                                                        \
  SOV_GEMV_ROPE(T, gemv_norm_rope_t, sov::GV_NORM)                                         \
  SOV_GEMV_ROPE(T, gemv_norm_late_rope_t, sov::GV_NORM_LATE)                               \
  extern "C" __global__ void __launch_bounds__(sov::GV_THREADS, sov::gv_norm_min_ctas(T))  \
      gemv_norm_late_t##T(const sov::bf16* w, const float* residual,                       \
                          const sov::bf16* norm_w, float eps, sov::bf16* y, int rows,      \
                          int k, int tokens) {                                             \
    sov::gemv_impl<T, sov::GV_NORM_LATE, sov::GV_BF16>(w, residual, norm_w, eps, y, rows,  \
                                                       k, tokens);                         \
  }                                                                                        \
  extern "C" __global__ void __launch_bounds__(sov::GV_THREADS)                            \
      gemv_add_t##T(const sov::bf16* w, const sov::bf16* x, float* residual, int rows,     \
                    int k, int tokens) {                                                   \
    sov::gemv_impl<T, sov::GV_PLAIN, sov::GV_ADD>(w, x, nullptr, 0.f, residual, rows, k,   \
                                                  tokens);                                 \
  }                                                                                        \
  extern "C" __global__ void __launch_bounds__(sov::GV_THREADS, sov::GV_SILU_MIN_CTAS)     \
      gemv_silu_add_t##T(const sov::bf16* w, const sov::bf16* gate_up, float* residual,    \
                         int rows, int k, int tokens) {                                    \
    sov::gemv_impl<T, sov::GV_SILU, sov::GV_ADD>(w, gate_up, nullptr, 0.f, residual, rows, \
                                                 k, tokens);                               \
  }

// The register design (above), at the token counts the worker's fused decode path runs.
#define SOV_GEMV_REGS(T)                                                                   \
  extern "C" __global__ void __launch_bounds__(sov::GV_THREADS)                            \
      gemv_regs_t##T(const sov::bf16* w, const sov::bf16* x, sov::bf16* y, int rows,       \
                     int k, int tokens) {                                                  \
    sov::gemv_impl<T, sov::GV_PLAIN, sov::GV_BF16, false>(w, x, nullptr, 0.f, y, rows, k,  \
                                                          tokens);                         \
  }                                                                                        \
  extern "C" __global__ void __launch_bounds__(sov::GV_THREADS)                            \
      gemv_norm_regs_t##T(const sov::bf16* w, const float* residual,                       \
                          const sov::bf16* norm_w, float eps, sov::bf16* y, int rows,      \
                          int k, int tokens) {                                             \
    sov::gemv_impl<T, sov::GV_NORM, sov::GV_BF16, false>(w, residual, norm_w, eps, y,      \
                                                         rows, k, tokens);                 \
  }                                                                                        \
  extern "C" __global__ void __launch_bounds__(sov::GV_THREADS)                            \
      gemv_add_regs_t##T(const sov::bf16* w, const sov::bf16* x, float* residual,          \
                         int rows, int k, int tokens) {                                    \
    sov::gemv_impl<T, sov::GV_PLAIN, sov::GV_ADD, false>(w, x, nullptr, 0.f, residual,     \
                                                         rows, k, tokens);                 \
  }                                                                                        \
  extern "C" __global__ void __launch_bounds__(sov::GV_THREADS)                            \
      gemv_silu_add_regs_t##T(const sov::bf16* w, const sov::bf16* gate_up,                \
                              float* residual, int rows, int k, int tokens) {              \
    sov::gemv_impl<T, sov::GV_SILU, sov::GV_ADD, false>(w, gate_up, nullptr, 0.f,          \
                                                        residual, rows, k, tokens);        \
  }

SOV_GEMV(1)
SOV_GEMV(2)
SOV_GEMV(4)
SOV_GEMV(8)
SOV_GEMV_REGS(1)
SOV_GEMV_REGS(2)
