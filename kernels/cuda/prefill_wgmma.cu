// Prefill and chunked-prefill attention on Hopper's warpgroup tensor cores (wgmma), bf16
// cache. Same semantics, arguments and CPU reference (kernels::gpu_ref::prefill_attention)
// as prefill_attention.cu; compiled only for sm_90a (wgmma is an arch-specific feature:
// kernels::cuda::build_arch), launched with `PrefillKernel::Wgmma`.
//
// Two designs, both on grid (ceil(max_new / 128), n_heads, num_seqs), two warpgroups of
// 64 query rows each, walking the context in tiles of 64 keys with an online softmax in
// registers:
//   S = Q K^T   wgmma m64n64k16 per 16 of head_dim: Q from registers (loaded once), K
//               from shared memory;
//   O += P V    wgmma m64n{HD}k16 per 16 keys: P (the softmax weights rounded to bf16)
//               from registers, V^T from shared memory.
// Shared operands are in the canonical no-swizzle layout: core matrices of 8 rows x 16
// bytes, 128 contiguous bytes each, the matrix descriptor giving the byte distance
// between core matrices adjacent along the reduced dimension (leading, LBO) and along
// the other (stride, SBO), as the PTX ISA words it (run 7 on an H200 confirmed it: the
// variant with the two exchanged failed every check).
//
// `prefill_attention_wgmma_hd{D}` (prefill_wgmma_impl): K and V^T "K-major" (contiguous
// along the reduced dimension). K tiles are copied straight into that layout with
// cp.async; V tiles land row-major (as the cache holds them) and are transposed into
// V^T with ldmatrix.trans. One K, V^T and staging tile; V(j) streams in during
// S = Q K(j)^T, K(j+1) during O += P V(j); three barriers a tile.
//
// `prefill_attention_wgmma2_hd{D}` (prefill_wgmma_ring_impl): V stays as the cache holds
// it and wgmma reads it "MN-major" (imm-trans-b = 1: core matrices of 8 keys x 8 dims,
// rows along the keys), so no transposition; K and V tiles in a ring of three stages,
// the copies of tile j + 2 issued while tile j is computed; one barrier a tile. The
// `_swapped` twins exchange LBO and SBO of the V descriptor, in case the MN-major
// reading differs (the GPU check runs both).
#include "common.cuh"

namespace sov {

constexpr int PW_BC = 64;  // keys per tile

__device__ __forceinline__ void wgmma_fence() {
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
}
__device__ __forceinline__ void wgmma_commit() {
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}
__device__ __forceinline__ void wgmma_wait_all() {
  asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
}
// Wait until at most N committed wgmma groups are pending (they complete in order).
template <int N>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
// Pins registers in program order (an empty asm that "writes" them): reads of wgmma
// accumulators stay after wgmma.wait_group, and writes of its register operands before
// wgmma.fence, whatever the compiler would otherwise schedule.
template <int N>
__device__ __forceinline__ void pin(float (&r)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(r[i])::"memory");
}
__device__ __forceinline__ void pin(unsigned (&r)[4]) {
  asm volatile("" : "+r"(r[0]), "+r"(r[1]), "+r"(r[2]), "+r"(r[3])::"memory");
}

// Shared-memory writes by ordinary stores and cp.async become visible to wgmma (the
// async proxy) only after this fence (then a barrier for the other threads' writes).
__device__ __forceinline__ void fence_async_shared() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}
__device__ __forceinline__ void st_shared_u32(unsigned addr, unsigned v) {
  asm volatile("st.shared.u32 [%0], %1;\n" ::"r"(addr), "r"(v) : "memory");
}

// Matrix descriptor of a no-swizzle operand starting at shared address `addr`.
__device__ __forceinline__ unsigned long long wgmma_desc(unsigned addr, unsigned lbo,
                                                        unsigned sbo) {
  return (unsigned long long)((addr & 0x3ffffu) >> 4) |
         ((unsigned long long)((lbo >> 4) & 0x3fffu) << 16) |
         ((unsigned long long)((sbo >> 4) & 0x3fffu) << 32);
}

// D (+)= A B, M = 64 (warp w of the warpgroup holds rows 16w..16w+15 of A and D in the
// m16n8k16 fragment layouts, D as N/8 consecutive 8-column tiles), K = 16, A from
// registers, B from shared memory; `accumulate` 0 overwrites D.
template <int TNSP = 0>
__device__ __forceinline__ void wgmma_m64n64k16_rs(float (&d)[32], const unsigned (&a)[4],
                                                   unsigned long long desc_b, int accumulate) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 "
      "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31}, "
      "{%32,%33,%34,%35}, %36, p, 1, 1, %38;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]),
        "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]),
        "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]),
        "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
        "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]),
        "+f"(d[30]), "+f"(d[31])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(accumulate), "n"(TNSP)
      : "memory");
}

template <int TNSP = 0>
__device__ __forceinline__ void wgmma_m64n96k16_rs(float (&d)[48], const unsigned (&a)[4],
                                                   unsigned long long desc_b, int accumulate) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %53, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n96k16.f32.bf16.bf16 "
      "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31,%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45,%46,%47}, "
      "{%48,%49,%50,%51}, %52, p, 1, 1, %54;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]),
        "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]),
        "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]),
        "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
        "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]),
        "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]),
        "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]),
        "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(accumulate), "n"(TNSP)
      : "memory");
}

template <int TNSP = 0>
__device__ __forceinline__ void wgmma_m64n128k16_rs(float (&d)[64], const unsigned (&a)[4],
                                                   unsigned long long desc_b, int accumulate) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 "
      "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31,%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45,%46,%47,%48,%49,%50,%51,%52,%53,%54,%55,%56,%57,%58,%59,%60,%61,%62,%63}, "
      "{%64,%65,%66,%67}, %68, p, 1, 1, %70;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]),
        "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]),
        "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]),
        "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
        "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]),
        "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]),
        "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]),
        "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),
        "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]),
        "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]),
        "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(accumulate), "n"(TNSP)
      : "memory");
}

// O += P V for 16 keys; TNSP: V's descriptor is MN-major (1) or K-major V^T (0).
template <int HD, int TNSP = 0>
__device__ __forceinline__ void wgmma_pv(float (&o)[HD / 2], const unsigned (&a)[4],
                                         unsigned long long desc) {
  if constexpr (HD == 64) {
    wgmma_m64n64k16_rs<TNSP>(o, a, desc, 1);
  } else if constexpr (HD == 96) {
    wgmma_m64n96k16_rs<TNSP>(o, a, desc, 1);
  } else {
    wgmma_m64n128k16_rs<TNSP>(o, a, desc, 1);
  }
}

// Two warpgroups a CTA (64 query rows each) share every K/V tile between 128 rows.
// (Run 7 also timed one warpgroup a CTA, two CTAs an SM: 0.78x as fast.)
template <int HD>
__device__ __forceinline__ void prefill_wgmma_impl(
    const sov::bf16* __restrict__ q, const sov::bf16* __restrict__ k_cache,
    const sov::bf16* __restrict__ v_cache, const int* __restrict__ cu_q,
    const int* __restrict__ seq_lens, const int* __restrict__ block_tables,
    sov::bf16* __restrict__ out, int n_heads, int n_kv_heads, int max_blocks, float scale,
    int q_stride) {
  static_assert(HD == 64 || HD == 96 || HD == 128, "head_dim must be 64, 96 or 128");
  constexpr int KS = HD / 16;             // k-steps of S = Q K^T
  constexpr int NT = HD / 8;              // 8-column tiles of O
  constexpr int PAD = HD + 8;             // staging row pitch (elements)
  constexpr int TILE = PW_BC * HD * 2;    // bytes of one core-matrix tile
  constexpr int PIECES = PW_BC * HD / 8;  // 16-byte pieces in a tile
  constexpr int PW_THREADS = 256;
  constexpr int PW_BR = 128;  // query rows per CTA
  static_assert(PIECES % PW_THREADS == 0, "tile pieces must divide among the threads");
  // Core-matrix strides: K tile [key][d] (reduced dimension d), V^T tile [d][key]
  // (reduced dimension key).
  constexpr unsigned K_LBO = 128, K_SBO = HD * 16;
  constexpr unsigned V_LBO = 128, V_SBO = PW_BC * 16;
  // Dynamic shared memory (launch::wgmma_smem_bytes): the K tile and the V^T tile
  // (core-matrix layout, 64 x HD bf16 each), then the row-major V staging tile (rows
  // padded by 8 elements so ldmatrix reads them without bank conflicts).
  extern __shared__ __align__(1024) unsigned char pw_smem[];
  const unsigned sk = smem_u32(pw_smem);
  const unsigned svt = sk + TILE;
  const unsigned svs = sk + 2 * TILE;

  const int seq = blockIdx.z, head = blockIdx.y;
  const int q0 = cu_q[seq], n_new = cu_q[seq + 1] - q0;
  const int tile_row0 = (gridDim.x - 1 - blockIdx.x) * PW_BR;  // longest prefixes first
  if (tile_row0 >= n_new) return;
  const int len = seq_lens[seq];
  const int first_pos = len - n_new;
  const int kvh = head / (n_heads / n_kv_heads);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int wg = warp / 4;
  const int g = lane >> 2, t = lane & 3;
  const int wg_row0 = tile_row0 + wg * 64;
  const AttnRows wr(wg_row0 + (warp % 4) * 16, n_new, first_pos, g);
  // A warpgroup runs its wgmmas for a tile when any of its rows sees a key of it (the
  // decision must be the same for its four warps); each warp masks on its own.
  const bool wg_active = wg_row0 < n_new;
  const int wg_last_pos = first_pos + min(n_new - 1, wg_row0 + 63);

  unsigned qa[KS][4];
  attn_load_q<KS>(qa, q, q0, wr.rows, n_new, q_stride, head * HD, t);

  float o[HD / 2];
#pragma unroll
  for (int i = 0; i < HD / 2; ++i) o[i] = 0.f;
  float m[2] = {neg_inf(), neg_inf()};  // running max, log2 units
  float l[2] = {0.f, 0.f};
  const float scale_log2 = scale * 1.4426950408889634f;

  const int last_row = min(n_new, tile_row0 + PW_BR) - 1;
  const int kv_end = first_pos + last_row + 1;
  const int n_tiles = (kv_end + PW_BC - 1) / PW_BC;
  const int* bt = block_tables + (long long)seq * max_blocks;
  const long long row_stride = (long long)n_kv_heads * HD;
  // Global address of a key's 16-byte piece (nullptr past the context).
  auto piece = [&](const sov::bf16* cache, int pos, int d0) -> const sov::bf16* {
    if (pos >= kv_end) return nullptr;
    const long long slot = (long long)bt[pos / KV_BLOCK] * KV_BLOCK + pos % KV_BLOCK;
    return cache + slot * row_stride + kvh * HD + d0;
  };
  // K tile straight into the core-matrix layout. Lanes 2i and 2i+1 take neighbouring
  // pieces of one key (one 32-byte sector), eight keys fill one 128-byte core matrix.
  auto load_k = [&](int k0) {
#pragma unroll
    for (int i = 0; i < PIECES / PW_THREADS; ++i) {
      const int c = threadIdx.x + i * PW_THREADS;
      const int key = (c >> 1) & (PW_BC - 1);
      const int dp = (c & 1) | ((c >> 7) << 1);
      const sov::bf16* src = piece(k_cache, k0 + key, dp * 8);
      cp_async16(sk + (key >> 3) * K_SBO + dp * 128 + (key & 7) * 16, src ? src : k_cache,
                 src ? 16u : 0u);
    }
  };
  // V tile row-major into the staging tile.
  auto load_v = [&](int k0) {
#pragma unroll
    for (int i = 0; i < PIECES / PW_THREADS; ++i) {
      const int c = threadIdx.x + i * PW_THREADS;
      const int key = c / (HD / 8), d0 = (c % (HD / 8)) * 8;
      const sov::bf16* src = piece(v_cache, k0 + key, d0);
      cp_async16(svs + (key * PAD + d0) * 2, src ? src : v_cache, src ? 16u : 0u);
    }
  };

  load_k(0);
  cp_async_commit();
#pragma unroll 1
  for (int j = 0; j < n_tiles; ++j) {
    const int k0 = j * PW_BC;
    load_v(k0);
    cp_async_commit();
    cp_async_wait<1>();  // this thread's K(j) copies have landed
    fence_async_shared();
    __syncthreads();     // and everyone's, visible to wgmma
    const bool run = wg_active && k0 <= wg_last_pos;
    float s[32];  // S tile: 8-column tile jn in s[4 jn .. 4 jn + 3]
    if (run) {
      wgmma_fence();
#pragma unroll
      for (int ks = 0; ks < KS; ++ks) {
        const unsigned long long d = wgmma_desc(sk + ks * 256, K_LBO, K_SBO);
        wgmma_m64n64k16_rs(s, qa[ks], d, ks > 0);
      }
      wgmma_commit();
      wgmma_wait_all();
      pin(s);
      if (wr.needs_mask(k0)) attn_mask(s, k0, t, wr.qpos);
      attn_softmax(s, m, l, o, scale_log2);
    }
    cp_async_wait<0>();  // V(j) has landed in the staging tile
    __syncthreads();     // for every thread; no wgmma reads the K tile any more
    if (j + 1 < n_tiles) load_k(k0 + PW_BC);
    cp_async_commit();
    // V^T: each ldmatrix.trans takes four 8-key x 8-dim blocks (keys 32h..32h+31, dims
    // 8db..8db+7); lane (g, t) gets keys 2t, 2t+1 of dim g of each, one 32-bit word of
    // a V^T core-matrix row.
#pragma unroll
    for (int op = warp; op < 2 * NT; op += PW_THREADS / 32) {
      const int h = op & 1, db = op >> 1;
      unsigned w4[4];
      ldsm_x4_trans(w4, svs + ((32 * h + 8 * (lane >> 3) + (lane & 7)) * PAD + 8 * db) * 2);
#pragma unroll
      for (int mi = 0; mi < 4; ++mi)
        st_shared_u32(svt + db * V_SBO + (4 * h + mi) * 128 + g * 16 + t * 4, w4[mi]);
    }
    fence_async_shared();
    __syncthreads();  // V^T complete (and visible to wgmma); the staging tile is free
    if (run) {
      unsigned pa[PW_BC / 16][4];
#pragma unroll
      for (int kk = 0; kk < PW_BC / 16; ++kk) {
        attn_pack_p(s, kk, pa[kk]);
        pin(pa[kk]);
      }
      pin(o);
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < PW_BC / 16; ++kk) {
        const unsigned long long d = wgmma_desc(svt + kk * 256, V_LBO, V_SBO);
        wgmma_pv<HD>(o, pa[kk], d);
      }
      wgmma_commit();
      wgmma_wait_all();
      pin(o);
    }
  }

  attn_store<HD>(out, o, l, wr.rows, n_new, q0, n_heads, head, t);
}


// The ring design (see the top of the file). Dynamic shared memory
// (launch::wgmma2_smem_bytes): RING_STAGES stages of [K tile | V tile], 64 x HD bf16 each.
//   K tile, K-major core matrices: key's 16-byte piece dp (dims 8dp..8dp+7) at
//     (key / 8) * K_SBO + dp * 128 + (key % 8) * 16, K_LBO = 128, K_SBO = HD * 16; the
//     k-step ks (dims 16ks..) starts at ks * 256.
//   V tile, MN-major core matrices (8 keys x 8 dims, rows along the keys): piece dg of
//     key at (key / 16) * (HD * 32) + ((key / 8) % 2) * 128 + dg * 256 + (key % 8) * 16,
//     V_LBO = 128 (next 8 keys, the reduced dimension), V_SBO = 256 (next 8 dims); the
//     k-step kk (keys 16kk..) starts at kk * HD * 32.
constexpr int RING_STAGES = 3;

template <int HD, bool SWAP_V>
__device__ __forceinline__ void prefill_wgmma_ring_impl(
    const sov::bf16* __restrict__ q, const sov::bf16* __restrict__ k_cache,
    const sov::bf16* __restrict__ v_cache, const int* __restrict__ cu_q,
    const int* __restrict__ seq_lens, const int* __restrict__ block_tables,
    sov::bf16* __restrict__ out, int n_heads, int n_kv_heads, int max_blocks, float scale,
    int q_stride) {
  static_assert(HD == 64 || HD == 96 || HD == 128, "head_dim must be 64, 96 or 128");
  constexpr int KS = HD / 16;
  constexpr int TILE = PW_BC * HD * 2;
  constexpr int STAGE = 2 * TILE;
  constexpr int PIECES = PW_BC * HD / 8;
  constexpr int THREADS = 256;
  constexpr int BR = 128;
  static_assert(PIECES % THREADS == 0, "tile pieces must divide among the threads");
  constexpr unsigned K_LBO = 128, K_SBO = HD * 16;
  constexpr unsigned V_LBO = 128, V_SBO = 256;
  extern __shared__ __align__(1024) unsigned char pr_smem[];
  const unsigned base = smem_u32(pr_smem);

  const int seq = blockIdx.z, head = blockIdx.y;
  const int q0 = cu_q[seq], n_new = cu_q[seq + 1] - q0;
  const int tile_row0 = (gridDim.x - 1 - blockIdx.x) * BR;  // longest prefixes first
  if (tile_row0 >= n_new) return;
  const int len = seq_lens[seq];
  const int first_pos = len - n_new;
  const int kvh = head / (n_heads / n_kv_heads);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int wg = warp / 4;
  const int g = lane >> 2, t = lane & 3;
  const int wg_row0 = tile_row0 + wg * 64;
  const AttnRows wr(wg_row0 + (warp % 4) * 16, n_new, first_pos, g);
  const bool wg_active = wg_row0 < n_new;
  const int wg_last_pos = first_pos + min(n_new - 1, wg_row0 + 63);

  unsigned qa[KS][4];
  attn_load_q<KS>(qa, q, q0, wr.rows, n_new, q_stride, head * HD, t);

  float o[HD / 2];
#pragma unroll
  for (int i = 0; i < HD / 2; ++i) o[i] = 0.f;
  float m[2] = {neg_inf(), neg_inf()};
  float l[2] = {0.f, 0.f};
  const float scale_log2 = scale * 1.4426950408889634f;

  const int last_row = min(n_new, tile_row0 + BR) - 1;
  const int kv_end = first_pos + last_row + 1;
  const int n_tiles = (kv_end + PW_BC - 1) / PW_BC;
  const int* bt = block_tables + (long long)seq * max_blocks;
  const long long row_stride = (long long)n_kv_heads * HD;
  // Tile j's K and V into stage j % RING_STAGES (zeros past the context), as one
  // cp.async group; past the last tile an empty group, so every iteration commits one.
  auto load_tile = [&](int j) {
    if (j < n_tiles) {
      const unsigned sk = base + (j % RING_STAGES) * STAGE, sv = sk + TILE;
      const int k0 = j * PW_BC;
#pragma unroll
      for (int i = 0; i < PIECES / THREADS; ++i) {
        const int c = threadIdx.x + i * THREADS;
        const int key = c / (HD / 8), dp = c % (HD / 8);
        const int pos = k0 + key;
        const bool in = pos < kv_end;
        const long long slot =
            in ? (long long)bt[pos / KV_BLOCK] * KV_BLOCK + pos % KV_BLOCK : 0;
        const long long off = slot * row_stride + kvh * HD + dp * 8;
        cp_async16(sk + (key >> 3) * K_SBO + dp * 128 + (key & 7) * 16, k_cache + off,
                   in ? 16u : 0u);
        cp_async16(sv + (key >> 4) * (HD * 32) + ((key >> 3) & 1) * 128 + dp * 256 +
                       (key & 7) * 16,
                   v_cache + off, in ? 16u : 0u);
      }
    }
    cp_async_commit();
  };

  load_tile(0);
  load_tile(1);
#pragma unroll 1
  for (int j = 0; j < n_tiles; ++j) {
    cp_async_wait<1>();  // this thread's copies of tile j have landed
    fence_async_shared();
    // Everyone's copies of tile j are visible to wgmma, and every warpgroup is done with
    // tile j - 1, whose stage the copies of tile j + 2 now refill.
    __syncthreads();
    load_tile(j + 2);
    const int k0 = j * PW_BC;
    if (!wg_active || k0 > wg_last_pos) continue;
    const unsigned sk = base + (j % RING_STAGES) * STAGE, sv = sk + TILE;
    float s[32];
    wgmma_fence();
#pragma unroll
    for (int ks = 0; ks < KS; ++ks)
      wgmma_m64n64k16_rs(s, qa[ks], wgmma_desc(sk + ks * 256, K_LBO, K_SBO), ks > 0);
    wgmma_commit();
    wgmma_wait_all();
    pin(s);
    if (wr.needs_mask(k0)) attn_mask(s, k0, t, wr.qpos);
    attn_softmax(s, m, l, o, scale_log2);
    unsigned pa[PW_BC / 16][4];
#pragma unroll
    for (int kk = 0; kk < PW_BC / 16; ++kk) {
      attn_pack_p(s, kk, pa[kk]);
      pin(pa[kk]);
    }
    pin(o);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < PW_BC / 16; ++kk) {
      const unsigned a = sv + kk * (HD * 32);
      const unsigned long long d =
          SWAP_V ? wgmma_desc(a, V_SBO, V_LBO) : wgmma_desc(a, V_LBO, V_SBO);
      wgmma_pv<HD, 1>(o, pa[kk], d);
    }
    wgmma_commit();
    wgmma_wait_all();
    pin(o);
  }
  cp_async_wait<0>();  // no copy may outlive the CTA's shared memory

  attn_store<HD>(out, o, l, wr.rows, n_new, q0, n_heads, head, t);
}


// The overlapping design (`prefill_attention_wgmma3_hd{D}`): the ring design's layouts,
// with tiles of 128 keys in two stages (the copies of tile j + 1 run during tile j) and
// each tile computed as two 64-key halves a and b whose MMAs overlap the other half's
// softmax: S_a and S_b are issued together; the softmax of a runs while S_b computes;
// O += P_a V_a is issued, and the softmax of b runs while it computes (b's rescaling of
// the output waits for that MMA: attn_softmax_weights, then attn_rescale).
constexpr int OV_KEYS = 128;
constexpr int OV_STAGES = 2;

template <int HD, bool SWAP_V>
__device__ __forceinline__ void prefill_wgmma_overlap_impl(
    const sov::bf16* __restrict__ q, const sov::bf16* __restrict__ k_cache,
    const sov::bf16* __restrict__ v_cache, const int* __restrict__ cu_q,
    const int* __restrict__ seq_lens, const int* __restrict__ block_tables,
    sov::bf16* __restrict__ out, int n_heads, int n_kv_heads, int max_blocks, float scale,
    int q_stride) {
  static_assert(HD == 64 || HD == 96 || HD == 128, "head_dim must be 64, 96 or 128");
  constexpr int KS = HD / 16;
  constexpr int TILE = OV_KEYS * HD * 2;  // bytes of one K (or V) tile
  constexpr int STAGE = 2 * TILE;
  constexpr int HALF = 64 * HD * 2;  // byte offset of the b half in either layout
  constexpr int PIECES = OV_KEYS * HD / 8;
  constexpr int THREADS = 256;
  constexpr int BR = 128;
  static_assert(PIECES % THREADS == 0, "tile pieces must divide among the threads");
  constexpr unsigned K_LBO = 128, K_SBO = HD * 16;
  constexpr unsigned V_LBO = 128, V_SBO = 256;
  extern __shared__ __align__(1024) unsigned char ov_smem[];
  const unsigned base = smem_u32(ov_smem);

  const int seq = blockIdx.z, head = blockIdx.y;
  const int q0 = cu_q[seq], n_new = cu_q[seq + 1] - q0;
  const int tile_row0 = (gridDim.x - 1 - blockIdx.x) * BR;  // longest prefixes first
  if (tile_row0 >= n_new) return;
  const int len = seq_lens[seq];
  const int first_pos = len - n_new;
  const int kvh = head / (n_heads / n_kv_heads);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int wg = warp / 4;
  const int g = lane >> 2, t = lane & 3;
  const int wg_row0 = tile_row0 + wg * 64;
  const AttnRows wr(wg_row0 + (warp % 4) * 16, n_new, first_pos, g);
  const bool wg_active = wg_row0 < n_new;
  const int wg_last_pos = first_pos + min(n_new - 1, wg_row0 + 63);

  unsigned qa[KS][4];
  attn_load_q<KS>(qa, q, q0, wr.rows, n_new, q_stride, head * HD, t);

  float o[HD / 2];
#pragma unroll
  for (int i = 0; i < HD / 2; ++i) o[i] = 0.f;
  float m[2] = {neg_inf(), neg_inf()};
  float l[2] = {0.f, 0.f};
  const float scale_log2 = scale * 1.4426950408889634f;

  const int last_row = min(n_new, tile_row0 + BR) - 1;
  const int kv_end = first_pos + last_row + 1;
  const int n_tiles = (kv_end + OV_KEYS - 1) / OV_KEYS;
  const int* bt = block_tables + (long long)seq * max_blocks;
  const long long row_stride = (long long)n_kv_heads * HD;
  auto load_tile = [&](int j) {
    if (j < n_tiles) {
      const unsigned sk = base + (j % OV_STAGES) * STAGE, sv = sk + TILE;
      const int k0 = j * OV_KEYS;
#pragma unroll
      for (int i = 0; i < PIECES / THREADS; ++i) {
        const int c = threadIdx.x + i * THREADS;
        const int key = c / (HD / 8), dp = c % (HD / 8);
        const int pos = k0 + key;
        const bool in = pos < kv_end;
        const long long slot =
            in ? (long long)bt[pos / KV_BLOCK] * KV_BLOCK + pos % KV_BLOCK : 0;
        const long long off = slot * row_stride + kvh * HD + dp * 8;
        cp_async16(sk + (key >> 3) * K_SBO + dp * 128 + (key & 7) * 16, k_cache + off,
                   in ? 16u : 0u);
        cp_async16(sv + (key >> 4) * (HD * 32) + ((key >> 3) & 1) * 128 + dp * 256 +
                       (key & 7) * 16,
                   v_cache + off, in ? 16u : 0u);
      }
    }
    cp_async_commit();
  };
  auto v_desc = [&](unsigned a) {
    return SWAP_V ? wgmma_desc(a, V_SBO, V_LBO) : wgmma_desc(a, V_LBO, V_SBO);
  };

  load_tile(0);
#pragma unroll 1
  for (int j = 0; j < n_tiles; ++j) {
    cp_async_wait<0>();  // this thread's copies of tile j have landed
    fence_async_shared();
    // Everyone's copies of tile j are visible to wgmma, and every warpgroup is done with
    // tile j - 1, whose stage the copies of tile j + 1 now refill.
    __syncthreads();
    load_tile(j + 1);
    const int ka = j * OV_KEYS, kb = ka + 64;
    const bool run_a = wg_active && ka <= wg_last_pos;
    if (!run_a) continue;
    const bool run_b = kb <= wg_last_pos;  // uniform over the warpgroup
    const unsigned sk = base + (j % OV_STAGES) * STAGE, sv = sk + TILE;
    float sa[32], sb[32];
    wgmma_fence();
#pragma unroll
    for (int ks = 0; ks < KS; ++ks)
      wgmma_m64n64k16_rs(sa, qa[ks], wgmma_desc(sk + ks * 256, K_LBO, K_SBO), ks > 0);
    wgmma_commit();
    if (run_b) {
#pragma unroll
      for (int ks = 0; ks < KS; ++ks)
        wgmma_m64n64k16_rs(sb, qa[ks], wgmma_desc(sk + HALF + ks * 256, K_LBO, K_SBO),
                           ks > 0);
      wgmma_commit();
      wgmma_wait<1>();  // S_a done; S_b may still run
    } else {
      wgmma_wait<0>();
    }
    pin(sa);
    if (wr.needs_mask(ka)) attn_mask(sa, ka, t, wr.qpos);
    float ra[2];
    attn_softmax_weights(sa, m, l, ra, scale_log2);
    attn_rescale(o, ra);  // no MMA writes o now
    unsigned pa[4][4];
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
      attn_pack_p(sa, kk, pa[kk]);
      pin(pa[kk]);
    }
    pin(o);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) wgmma_pv<HD, 1>(o, pa[kk], v_desc(sv + kk * (HD * 32)));
    wgmma_commit();
    if (run_b) {
      wgmma_wait<1>();  // S_b done (groups complete in order); P_a V_a may still run
      pin(sb);
      if (wr.needs_mask(kb)) attn_mask(sb, kb, t, wr.qpos);
      float rb[2];
      attn_softmax_weights(sb, m, l, rb, scale_log2);
      unsigned pb[4][4];
#pragma unroll
      for (int kk = 0; kk < 4; ++kk) {
        attn_pack_p(sb, kk, pb[kk]);
        pin(pb[kk]);
      }
      wgmma_wait<0>();  // P_a V_a done: o may be rescaled
      pin(o);
      attn_rescale(o, rb);
      pin(o);
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < 4; ++kk)
        wgmma_pv<HD, 1>(o, pb[kk], v_desc(sv + HALF + kk * (HD * 32)));
      wgmma_commit();
    }
    wgmma_wait<0>();
    pin(o);
  }
  cp_async_wait<0>();  // no copy may outlive the CTA's shared memory

  attn_store<HD>(out, o, l, wr.rows, n_new, q0, n_heads, head, t);
}

}  // namespace sov


#define SOV_PREFILL_WGMMA(HD)                                                              \
  extern "C" __global__ void __launch_bounds__(256, 1) prefill_attention_wgmma_hd##HD(      \
      const sov::bf16* q, const sov::bf16* k_cache, const sov::bf16* v_cache,              \
      const int* cu_q, const int* seq_lens, const int* block_tables, sov::bf16* out,       \
      int n_heads, int n_kv_heads, int max_blocks, float scale, int q_stride) {            \
    sov::prefill_wgmma_impl<HD>(q, k_cache, v_cache, cu_q, seq_lens, block_tables, out,    \
                                n_heads, n_kv_heads, max_blocks, scale, q_stride);         \
  }

#define SOV_PREFILL_WGMMA2(HD, SWAP, NAME)                                                 \
  extern "C" __global__ void __launch_bounds__(256, 1) NAME(                               \
      const sov::bf16* q, const sov::bf16* k_cache, const sov::bf16* v_cache,              \
      const int* cu_q, const int* seq_lens, const int* block_tables, sov::bf16* out,       \
      int n_heads, int n_kv_heads, int max_blocks, float scale, int q_stride) {            \
    sov::prefill_wgmma_ring_impl<HD, SWAP>(q, k_cache, v_cache, cu_q, seq_lens,            \
                                           block_tables, out, n_heads, n_kv_heads,         \
                                           max_blocks, scale, q_stride);                   \
  }

SOV_PREFILL_WGMMA(64)
SOV_PREFILL_WGMMA(96)
SOV_PREFILL_WGMMA(128)
SOV_PREFILL_WGMMA2(64, false, prefill_attention_wgmma2_hd64)
SOV_PREFILL_WGMMA2(96, false, prefill_attention_wgmma2_hd96)
SOV_PREFILL_WGMMA2(128, false, prefill_attention_wgmma2_hd128)
SOV_PREFILL_WGMMA2(64, true, prefill_attention_wgmma2_hd64_swapped)
SOV_PREFILL_WGMMA2(96, true, prefill_attention_wgmma2_hd96_swapped)
SOV_PREFILL_WGMMA2(128, true, prefill_attention_wgmma2_hd128_swapped)

#define SOV_PREFILL_WGMMA3(HD, SWAP, NAME)                                                 \
  extern "C" __global__ void __launch_bounds__(256, 1) NAME(                               \
      const sov::bf16* q, const sov::bf16* k_cache, const sov::bf16* v_cache,              \
      const int* cu_q, const int* seq_lens, const int* block_tables, sov::bf16* out,       \
      int n_heads, int n_kv_heads, int max_blocks, float scale, int q_stride) {            \
    sov::prefill_wgmma_overlap_impl<HD, SWAP>(q, k_cache, v_cache, cu_q, seq_lens,         \
                                              block_tables, out, n_heads, n_kv_heads,      \
                                              max_blocks, scale, q_stride);                \
  }

SOV_PREFILL_WGMMA3(64, false, prefill_attention_wgmma3_hd64)
SOV_PREFILL_WGMMA3(96, false, prefill_attention_wgmma3_hd96)
SOV_PREFILL_WGMMA3(128, false, prefill_attention_wgmma3_hd128)
SOV_PREFILL_WGMMA3(64, true, prefill_attention_wgmma3_hd64_swapped)
SOV_PREFILL_WGMMA3(96, true, prefill_attention_wgmma3_hd96_swapped)
SOV_PREFILL_WGMMA3(128, true, prefill_attention_wgmma3_hd128_swapped)
