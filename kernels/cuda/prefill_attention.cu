// Prefill and chunked-prefill attention over the paged KV cache, causal, on tensor cores
// (mma.sync m16n8k16, bf16 in, f32 accumulate). CPU reference:
// kernels::gpu_ref::prefill_attention (and kernels::cpu::PagedAttention::run in f32).
//
// The new tokens of every sequence in the batch are packed:
//   q            [num_tokens] rows of q_stride elements (query heads first,
//                [n_heads][HD]), sequence s owns rows cu_q[s]..cu_q[s+1]
//   seq_lens     [num_seqs] int: context length after this step (cached + new tokens)
//   block_tables [num_seqs][max_blocks] int; k/v cache [num_blocks][16][n_kv_heads][HD]
//                bf16, or e4m3 bytes with k_scale / v_scale [n_kv_heads] (`_fp8`)
//   out          [num_tokens][n_heads][HD] bf16
// The new tokens' K/V are already in the cache (rope_write_kv runs first). New token i of
// sequence s sits at position seq_lens[s] - n_new + i and sees positions 0..=that.
//
// Grid (ceil(max_new / 64), n_heads, num_seqs), 128 threads: each CTA takes 64 query rows
// of one head (16 per warp) and walks the context in tiles of 64 keys (four cache blocks)
// with an online softmax held in registers (FlashAttention-2 style): S = Q K^T and
// O += P V are m16n8k16 MMAs; K is staged row-major and V transposed in shared memory.
#include "common.cuh"

namespace sov {

constexpr int PF_THREADS = 128;
constexpr int PF_BR = 64;  // query rows per CTA (16 per warp)
constexpr int PF_BC = 64;  // keys per tile


// Eight cache elements as eight bf16 in one 16-byte word: a bf16 cache as it is; e4m3
// codes converted exactly (every e4m3 value is a bf16 value).
__device__ __forceinline__ uint4 kv8_as_bf16(const bf16* p) {
  return *reinterpret_cast<const uint4*>(p);
}
__device__ __forceinline__ uint4 kv8_as_bf16(const fp8* p) {
  float f[8];
  widen8_e4m3(*reinterpret_cast<const uint2*>(p), f);
  return make_uint4(pack_bf16(f[0], f[1]), pack_bf16(f[2], f[3]), pack_bf16(f[4], f[5]),
                    pack_bf16(f[6], f[7]));
}

// KV: bf16, or fp8 (e4m3 with per-KV-head k_scale / v_scale): the K scale joins the
// softmax scale and the V scale the output's normalisation.
template <int HD, typename KV>
__device__ __forceinline__ void prefill_attention_impl(
    const sov::bf16* __restrict__ q, const KV* __restrict__ k_cache,
    const KV* __restrict__ v_cache, const float* __restrict__ k_scale,
    const float* __restrict__ v_scale, const int* __restrict__ cu_q,
    const int* __restrict__ seq_lens, const int* __restrict__ block_tables,
    sov::bf16* __restrict__ out, int n_heads, int n_kv_heads, int max_blocks,
    float scale, int q_stride) {
  constexpr bool FP8 = sizeof(KV) == 1;
  static_assert(HD % 16 == 0 && HD <= 128, "head_dim must be a multiple of 16, <= 128");
  constexpr int KS = HD / 16;  // k-steps of S = Q K^T
  constexpr int NT = HD / 8;   // n-tiles of O
  constexpr int KPAD = HD + 8; // padded rows against bank conflicts
  constexpr int VPAD = PF_BC + 8;
  __shared__ __align__(16) sov::bf16 s_k[PF_BC][KPAD];
  __shared__ __align__(16) sov::bf16 s_vt[HD][VPAD];

  const int seq = blockIdx.z, head = blockIdx.y;
  const int q0 = cu_q[seq], n_new = cu_q[seq + 1] - q0;
  const int tile_row0 = blockIdx.x * PF_BR;
  if (tile_row0 >= n_new) return;
  const int len = seq_lens[seq];
  const int first_pos = len - n_new;  // position of new token 0
  const int kvh = head / (n_heads / n_kv_heads);
  if (FP8) scale *= k_scale[kvh];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane >> 2, t = lane & 3;
  const int rows[2] = {tile_row0 + warp * 16 + g, tile_row0 + warp * 16 + g + 8};
  // Positions of this lane's two rows (-1: padding row, sees nothing).
  const int qpos[2] = {rows[0] < n_new ? first_pos + rows[0] : -1,
                       rows[1] < n_new ? first_pos + rows[1] : -1};

  // Q fragments (A operand) straight from global memory, 32-bit loads.
  unsigned qa[KS][4];
#pragma unroll
  for (int ks = 0; ks < KS; ++ks) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const unsigned* src = reinterpret_cast<const unsigned*>(
          q + (long long)(q0 + rows[r]) * q_stride + head * HD + ks * 16 + 2 * t);
      const bool ok = rows[r] < n_new;
      qa[ks][r] = ok ? src[0] : 0u;      // cols 2t, 2t+1
      qa[ks][r + 2] = ok ? src[4] : 0u;  // cols 2t+8, 2t+9
    }
  }

  float o[NT][4];
#pragma unroll
  for (int n = 0; n < NT; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;
  float m[2] = {neg_inf(), neg_inf()};
  float l[2] = {0.f, 0.f};

  // Keys this CTA needs: up to the last valid row's position.
  const int last_row = min(n_new, tile_row0 + PF_BR) - 1;
  const int kv_end = first_pos + last_row + 1;
  const int* bt = block_tables + (long long)seq * max_blocks;
  const long long row_stride = (long long)n_kv_heads * HD;

#pragma unroll 1
  for (int k0 = 0; k0 < kv_end; k0 += PF_BC) {
    // Stage K (row-major) and V (transposed), 16-byte loads; keys past the context are 0.
    for (int c = threadIdx.x; c < PF_BC * (HD / 8); c += PF_THREADS) {
      const int key = c / (HD / 8), d0 = (c % (HD / 8)) * 8;
      const int pos = k0 + key;
      uint4 kraw = make_uint4(0, 0, 0, 0), vraw = make_uint4(0, 0, 0, 0);
      if (pos < kv_end) {
        const long long slot = (long long)bt[pos / KV_BLOCK] * KV_BLOCK + pos % KV_BLOCK;
        const long long off = slot * row_stride + kvh * HD + d0;
        kraw = kv8_as_bf16(k_cache + off);
        vraw = kv8_as_bf16(v_cache + off);
      }
      *reinterpret_cast<uint4*>(&s_k[key][d0]) = kraw;
      const sov::bf16* vh = reinterpret_cast<const sov::bf16*>(&vraw);
#pragma unroll
      for (int i = 0; i < 8; ++i) s_vt[d0 + i][key] = vh[i];
    }
    __syncthreads();

    // S = Q K^T for this warp's 16 rows x 64 keys: 8 n-tiles of 8 keys.
    float s[PF_BC / 8][4];
#pragma unroll
    for (int j = 0; j < PF_BC / 8; ++j) {
      s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
#pragma unroll
      for (int ks = 0; ks < KS; ++ks) {
        const unsigned* kr = reinterpret_cast<const unsigned*>(&s_k[8 * j + g][ks * 16 + 2 * t]);
        mma_bf16(s[j], qa[ks], kr[0], kr[4]);
      }
    }
    // Scale, causal mask, row max.
    float mx[2] = {neg_inf(), neg_inf()};
#pragma unroll
    for (int j = 0; j < PF_BC / 8; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int r = e >> 1;
        const int kpos = k0 + 8 * j + 2 * t + (e & 1);
        const float v = kpos <= qpos[r] ? s[j][e] * scale : neg_inf();
        s[j][e] = v;
        mx[r] = fmaxf(mx[r], v);
      }
    }
    float rescale[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      mx[r] = fmaxf(mx[r], __shfl_xor_sync(FULL_MASK, mx[r], 1));
      mx[r] = fmaxf(mx[r], __shfl_xor_sync(FULL_MASK, mx[r], 2));
      const float m_new = fmaxf(m[r], mx[r]);
      // A row with nothing visible yet keeps max -inf: shift by 0 so exp gives 0, not NaN.
      const float shift = m_new == neg_inf() ? 0.f : m_new;
      rescale[r] = __expf(m[r] - shift);
      m[r] = m_new;
      l[r] *= rescale[r];
#pragma unroll
      for (int j = 0; j < PF_BC / 8; ++j) {
        s[j][2 * r] = __expf(s[j][2 * r] - shift);
        s[j][2 * r + 1] = __expf(s[j][2 * r + 1] - shift);
        l[r] += s[j][2 * r] + s[j][2 * r + 1];
      }
    }
#pragma unroll
    for (int n = 0; n < NT; ++n) {
      o[n][0] *= rescale[0];
      o[n][1] *= rescale[0];
      o[n][2] *= rescale[1];
      o[n][3] *= rescale[1];
    }
    // O += P V: P from the S accumulators (bf16), V fragments from the transposed tile.
#pragma unroll
    for (int kk = 0; kk < PF_BC / 16; ++kk) {
      unsigned pa[4];
      pa[0] = pack_bf16(s[2 * kk][0], s[2 * kk][1]);
      pa[1] = pack_bf16(s[2 * kk][2], s[2 * kk][3]);
      pa[2] = pack_bf16(s[2 * kk + 1][0], s[2 * kk + 1][1]);
      pa[3] = pack_bf16(s[2 * kk + 1][2], s[2 * kk + 1][3]);
#pragma unroll
      for (int n = 0; n < NT; ++n) {
        const unsigned* vr = reinterpret_cast<const unsigned*>(&s_vt[8 * n + g][kk * 16 + 2 * t]);
        mma_bf16(o[n], pa, vr[0], vr[4]);
      }
    }
    __syncthreads();  // the tiles are overwritten next
  }

  // Row sums were lane-partial (each lane saw 2 of every 8 keys): add the 4 lanes.
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    l[r] += __shfl_xor_sync(FULL_MASK, l[r], 1);
    l[r] += __shfl_xor_sync(FULL_MASK, l[r], 2);
  }
  const float vs = FP8 ? v_scale[kvh] : 1.f;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    if (rows[r] >= n_new) continue;
    const float inv = l[r] > 0.f ? vs / l[r] : 0.f;
    sov::bf16* dst = out + ((long long)(q0 + rows[r]) * n_heads + head) * HD;
#pragma unroll
    for (int n = 0; n < NT; ++n) {
      *reinterpret_cast<unsigned*>(dst + 8 * n + 2 * t) =
          pack_bf16(o[n][2 * r] * inv, o[n][2 * r + 1] * inv);
    }
  }
}

}  // namespace sov

#define SOV_PREFILL_ATTENTION(HD)                                                         \
  extern "C" __global__ void __launch_bounds__(sov::PF_THREADS, 1)                       \
      prefill_attention_hd##HD(const sov::bf16* q, const sov::bf16* k_cache,      \
                               const sov::bf16* v_cache, const int* cu_q,             \
                               const int* seq_lens, const int* block_tables,              \
                               sov::bf16* out, int n_heads, int n_kv_heads,           \
                               int max_blocks, float scale, int q_stride) {               \
    sov::prefill_attention_impl<HD, sov::bf16>(q, k_cache, v_cache, nullptr, nullptr,     \
                                               cu_q, seq_lens, block_tables, out,         \
                                               n_heads, n_kv_heads, max_blocks, scale,    \
                                               q_stride);                                 \
  }                                                                                       \
  extern "C" __global__ void __launch_bounds__(sov::PF_THREADS, 1)                       \
      prefill_attention_hd##HD##_fp8(                                                     \
          const sov::bf16* q, const sov::fp8* k_cache, const sov::fp8* v_cache,           \
          const float* k_scale, const float* v_scale, const int* cu_q,                    \
          const int* seq_lens, const int* block_tables, sov::bf16* out, int n_heads,      \
          int n_kv_heads, int max_blocks, float scale, int q_stride) {                    \
    sov::prefill_attention_impl<HD, sov::fp8>(q, k_cache, v_cache, k_scale, v_scale,      \
                                              cu_q, seq_lens, block_tables, out, n_heads, \
                                              n_kv_heads, max_blocks, scale, q_stride);   \
  }

SOV_PREFILL_ATTENTION(64)
SOV_PREFILL_ATTENTION(96)
SOV_PREFILL_ATTENTION(128)

// ---------------------------------------------------------------------------------------
// The pipelined variant (`prefill_attention_pipe_hd{64,96,128}`, bf16 cache only; the
// launcher picks it with `PrefillKernel::Pipelined`). Same semantics and CPU reference as
// above; what differs is how the tiles move:
//   - 128 query rows a CTA (8 warps x 16), so each K/V tile staged in shared memory
//     serves twice the rows (half the L2 traffic per flop);
//   - K and V tiles are copied with `cp.async` (16 bytes, straight to shared memory,
//     zero-filled past the context): V(j) streams in while S = Q K(j)^T and the softmax
//     run, K(j+1) while O += P V(j) runs (FlashAttention-2's single-buffer schedule);
//   - both tiles are stored row-major and read with `ldmatrix` (K as it is, V with
//     `.trans`), four 8x8 fragments an instruction, no transposing stores;
//   - the softmax works in log2 units (scale x log2 e folded into one FMA before exp2);
//   - a warp skips the tiles its rows cannot see (causal) and masks only the tiles that
//     cross its diagonal; the CTAs with the longest prefixes are scheduled first.
// ---------------------------------------------------------------------------------------

namespace sov {

constexpr int PP_WARPS = 8;
constexpr int PP_THREADS = PP_WARPS * 32;
constexpr int PP_BR = PP_WARPS * 16;  // query rows per CTA
constexpr int PP_BC = 64;             // keys per tile

template <int HD>
__device__ __forceinline__ void prefill_attention_pipe_impl(
    const sov::bf16* __restrict__ q, const sov::bf16* __restrict__ k_cache,
    const sov::bf16* __restrict__ v_cache, const int* __restrict__ cu_q,
    const int* __restrict__ seq_lens, const int* __restrict__ block_tables,
    sov::bf16* __restrict__ out, int n_heads, int n_kv_heads, int max_blocks, float scale,
    int q_stride) {
  static_assert(HD % 32 == 0 && HD <= 128, "head_dim must be 64, 96 or 128");
  constexpr int KS = HD / 16;              // k-steps of S = Q K^T (even)
  constexpr int NT = HD / 8;               // n-tiles of O (even)
  constexpr int PAD = HD + 8;              // row pitch: 16-byte aligned, ldmatrix without conflicts
  constexpr int PIECES = PP_BC * HD / 8;   // 16-byte pieces in a tile
  static_assert(PIECES % PP_THREADS == 0, "tile pieces must divide among the threads");
  __shared__ __align__(128) sov::bf16 s_k[PP_BC][PAD];
  __shared__ __align__(128) sov::bf16 s_v[PP_BC][PAD];

  const int seq = blockIdx.z, head = blockIdx.y;
  const int q0 = cu_q[seq], n_new = cu_q[seq + 1] - q0;
  // The last row tiles see the longest prefixes: run them first.
  const int tile_row0 = (gridDim.x - 1 - blockIdx.x) * PP_BR;
  if (tile_row0 >= n_new) return;
  const int len = seq_lens[seq];
  const int first_pos = len - n_new;
  const int kvh = head / (n_heads / n_kv_heads);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane >> 2, t = lane & 3;
  const AttnRows wr(tile_row0 + warp * 16, n_new, first_pos, g);

  unsigned qa[KS][4];
  attn_load_q<KS>(qa, q, q0, wr.rows, n_new, q_stride, head * HD, t);

  float o[HD / 2];  // column tile n in o[4 n .. 4 n + 3]
#pragma unroll
  for (int i = 0; i < HD / 2; ++i) o[i] = 0.f;
  float m[2] = {neg_inf(), neg_inf()};  // running max, log2 units
  float l[2] = {0.f, 0.f};
  const float scale_log2 = scale * 1.4426950408889634f;

  const int last_row = min(n_new, tile_row0 + PP_BR) - 1;
  const int kv_end = first_pos + last_row + 1;
  const int n_tiles = (kv_end + PP_BC - 1) / PP_BC;
  const int* bt = block_tables + (long long)seq * max_blocks;
  const long long row_stride = (long long)n_kv_heads * HD;

  // Queue one tile's copies (this thread's share); keys past the context become zeros.
  auto load_tile = [&](const sov::bf16* cache, sov::bf16 (*dst)[PAD], int k0) {
#pragma unroll
    for (int i = 0; i < PIECES / PP_THREADS; ++i) {
      const int c = threadIdx.x + i * PP_THREADS;
      const int key = c / (HD / 8), d0 = (c % (HD / 8)) * 8;
      const int pos = k0 + key;
      const sov::bf16* src = cache;  // a valid address; nothing is read from it
      unsigned bytes = 0;
      if (pos < kv_end) {
        const long long slot = (long long)bt[pos / KV_BLOCK] * KV_BLOCK + pos % KV_BLOCK;
        src = cache + slot * row_stride + kvh * HD + d0;
        bytes = 16;
      }
      cp_async16(smem_u32(&dst[key][d0]), src, bytes);
    }
  };

  load_tile(k_cache, s_k, 0);
  cp_async_commit();
#pragma unroll 1
  for (int j = 0; j < n_tiles; ++j) {
    const int k0 = j * PP_BC;
    load_tile(v_cache, s_v, k0);
    cp_async_commit();
    cp_async_wait<1>();  // this thread's K(j) copies have landed
    __syncthreads();     // and everyone's
    const bool run = wr.active && k0 <= wr.last_pos;  // a tile no row sees is skipped
    float s[32];  // column tile jn (keys k0 + 8 jn ..) in s[4 jn .. 4 jn + 3]
    if (run) {
#pragma unroll
      for (int jn = 0; jn < PP_BC / 8; ++jn) {
        s[4 * jn] = s[4 * jn + 1] = s[4 * jn + 2] = s[4 * jn + 3] = 0.f;
#pragma unroll
        for (int ks = 0; ks < KS; ks += 2) {
          unsigned b[4];
          ldsm_x4(b, smem_u32(&s_k[8 * jn + (lane & 7)][16 * ks + 8 * (lane >> 3)]));
          mma_bf16(&s[4 * jn], qa[ks], b[0], b[1]);
          mma_bf16(&s[4 * jn], qa[ks + 1], b[2], b[3]);
        }
      }
      if (wr.needs_mask(k0)) attn_mask(s, k0, t, wr.qpos);
      attn_softmax(s, m, l, o, scale_log2);
    }
    cp_async_wait<0>();  // V(j) has landed
    __syncthreads();     // for every thread, and no warp reads s_k any more
    if (j + 1 < n_tiles) load_tile(k_cache, s_k, k0 + PP_BC);
    cp_async_commit();   // possibly empty: keeps the group count uniform
    if (run) {
#pragma unroll
      for (int kk = 0; kk < PP_BC / 16; ++kk) {
        unsigned pa[4];
        attn_pack_p(s, kk, pa);
#pragma unroll
        for (int n = 0; n < NT; n += 2) {
          unsigned b[4];
          ldsm_x4_trans(b, smem_u32(&s_v[16 * kk + (lane & 7) + 8 * ((lane >> 3) & 1)]
                                        [8 * (n + (lane >> 4))]));
          mma_bf16(&o[4 * n], pa, b[0], b[1]);
          mma_bf16(&o[4 * n + 4], pa, b[2], b[3]);
        }
      }
    }
    __syncthreads();  // every warp is done with s_v before V(j+1) lands there
  }

  attn_store<HD>(out, o, l, wr.rows, n_new, q0, n_heads, head, t);
}

}  // namespace sov

#define SOV_PREFILL_ATTENTION_PIPE(HD)                                                    \
  extern "C" __global__ void __launch_bounds__(sov::PP_THREADS, 1)                       \
      prefill_attention_pipe_hd##HD(const sov::bf16* q, const sov::bf16* k_cache,         \
                                    const sov::bf16* v_cache, const int* cu_q,            \
                                    const int* seq_lens, const int* block_tables,         \
                                    sov::bf16* out, int n_heads, int n_kv_heads,          \
                                    int max_blocks, float scale, int q_stride) {          \
    sov::prefill_attention_pipe_impl<HD>(q, k_cache, v_cache, cu_q, seq_lens,             \
                                         block_tables, out, n_heads, n_kv_heads,          \
                                         max_blocks, scale, q_stride);                    \
  }

SOV_PREFILL_ATTENTION_PIPE(64)
SOV_PREFILL_ATTENTION_PIPE(96)
SOV_PREFILL_ATTENTION_PIPE(128)
