// Prefill and chunked-prefill attention on Hopper's warpgroup tensor cores (wgmma), bf16
// cache. Same semantics, arguments and CPU reference (kernels::gpu_ref::prefill_attention)
// as prefill_attention.cu; compiled only for sm_90a (wgmma is an arch-specific feature:
// kernels::cuda::build_arch), launched with `PrefillKernel::Wgmma` (the default on
// H100/H200).
//
// Grid (ceil(max_new / 128), n_heads, num_seqs); two warpgroups of 64 query rows each
// share every K/V tile. The context is walked in tiles of 64 keys with an online softmax
// in registers:
//   S = Q K^T   wgmma m64n64k16 per 16 of head_dim: Q from registers (loaded once), K
//               from shared memory;
//   O += P V    wgmma m64n{HD}k16 per 16 keys: P (the softmax weights rounded to bf16)
//               from registers, V from shared memory.
// Shared operands are in the canonical no-swizzle layout: core matrices of 8 rows x 16
// bytes, 128 contiguous bytes each, the matrix descriptor giving the byte distance
// between core matrices adjacent along the reduced dimension (leading, LBO) and along
// the other (stride, SBO), as the PTX ISA words it. K is stored "K-major" (contiguous
// along head_dim); V stays as the cache holds it and wgmma reads it "MN-major"
// (imm-trans-b = 1: core matrices of 8 keys x 8 dims, rows along the keys), so nothing
// is transposed. K and V tiles go through a ring of three stages: the cp.async copies
// of tile j + 2 are issued while tile j is computed; one barrier a tile.
//
// Measured on an H200 (runs 7 and 8, docs/benchmarks.md), 4 x 2048 / 2 x 8192 causal
// tokens, head_dim 128: 0.21 / 0.25 of the bf16 dense peak. Designs tried and dropped:
// V transposed into a K-major V^T through ldmatrix.trans with one stage (0.16 / 0.19);
// one warpgroup a CTA, two CTAs an SM (0.13 / 0.15); 128-key tiles in two stages whose
// halves overlap one's MMAs with the other's softmax (0.19 / 0.22); either operand's
// LBO and SBO exchanged (wrong results, which settled the stride convention).
// Experimental, beside it (see each one's comment): the overlapping variant
// (`prefill_attention_wgmma_ov_hd*`) and the warp-specialised design
// (`prefill_attention_wgmma_ws_hd*`).
#include "common.cuh"

namespace sov {

// The accumulator operands of an m64nNk16 wgmma with N = 64, 96, 128 (N / 2 f32 a
// thread): the register list for the instruction text and the in-out constraints.
#define SOV_D32_LIST "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31}"
#define SOV_D48_LIST "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31,%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45,%46,%47}"
#define SOV_D64_LIST "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31,%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45,%46,%47,%48,%49,%50,%51,%52,%53,%54,%55,%56,%57,%58,%59,%60,%61,%62,%63}"
// The accumulator operands of 32, 48 and 64 registers, each list extending the last.
#define SOV_D32_OUT(d) \
    "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), \
    "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), \
    "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), \
    "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), \
    "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), \
    "+f"(d[30]), "+f"(d[31])
#define SOV_D48_OUT(d) \
    SOV_D32_OUT(d), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), \
    "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), \
    "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47])
#define SOV_D64_OUT(d) \
    SOV_D48_OUT(d), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), \
    "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), \
    "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])

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
// Wait until at most N of the warpgroup's committed wgmma groups are pending.
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

// Matrix descriptor of a no-swizzle operand starting at shared address `addr`.
__device__ __forceinline__ unsigned long long wgmma_desc(unsigned addr, unsigned lbo,
                                                        unsigned sbo) {
  return (unsigned long long)((addr & 0x3ffffu) >> 4) |
         ((unsigned long long)((lbo >> 4) & 0x3fffu) << 16) |
         ((unsigned long long)((sbo >> 4) & 0x3fffu) << 32);
}

// Descriptor of a 128B-swizzled operand (layout type 1, bits 62-63).
__device__ __forceinline__ unsigned long long wgmma_desc_sw128(unsigned addr, unsigned lbo,
                                                              unsigned sbo) {
  return wgmma_desc(addr, lbo, sbo) | (1ull << 62);
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
      SOV_D32_LIST ", "
      "{%32,%33,%34,%35}, %36, p, 1, 1, %38;\n}\n"
      : SOV_D32_OUT(d)
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(accumulate), "n"(TNSP)
      : "memory");
}

// D (+)= A B, M = 64, N = 64, K = 16, both operands from shared memory, K-major.
__device__ __forceinline__ void wgmma_m64n64k16_ss(float (&d)[32], unsigned long long desc_a,
                                                   unsigned long long desc_b, int accumulate) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 "
      SOV_D32_LIST ", "
      "%32, %33, p, 1, 1, 0, 0;\n}\n"
      : SOV_D32_OUT(d)
      : "l"(desc_a), "l"(desc_b), "r"(accumulate)
      : "memory");
}

// The same with N = 128.
__device__ __forceinline__ void wgmma_m64n128k16_ss(float (&d)[64], unsigned long long desc_a,
                                                    unsigned long long desc_b, int accumulate) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 "
      SOV_D64_LIST ", "
      "%64, %65, p, 1, 1, 0, 0;\n}\n"
      : SOV_D64_OUT(d)
      : "l"(desc_a), "l"(desc_b), "r"(accumulate)
      : "memory");
}

template <int TNSP = 0>
__device__ __forceinline__ void wgmma_m64n96k16_rs(float (&d)[48], const unsigned (&a)[4],
                                                   unsigned long long desc_b, int accumulate) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %53, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n96k16.f32.bf16.bf16 "
      SOV_D48_LIST ", "
      "{%48,%49,%50,%51}, %52, p, 1, 1, %54;\n}\n"
      : SOV_D48_OUT(d)
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(accumulate), "n"(TNSP)
      : "memory");
}

template <int TNSP = 0>
__device__ __forceinline__ void wgmma_m64n128k16_rs(float (&d)[64], const unsigned (&a)[4],
                                                   unsigned long long desc_b, int accumulate) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 "
      SOV_D64_LIST ", "
      "{%64,%65,%66,%67}, %68, p, 1, 1, %70;\n}\n"
      : SOV_D64_OUT(d)
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(accumulate), "n"(TNSP)
      : "memory");
}

// O += P V for 16 keys; TNSP 1: V's descriptor is MN-major.
template <int HD, int TNSP>
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

// Dynamic shared memory (launch::wgmma_smem_bytes): RING_STAGES stages of
// [K tile | V tile], 64 x HD bf16 each.
//   K tile, K-major core matrices: key's 16-byte piece dp (dims 8dp..8dp+7) at
//     (key / 8) * K_SBO + dp * 128 + (key % 8) * 16, K_LBO = 128, K_SBO = HD * 16; the
//     k-step ks (dims 16ks..) starts at ks * 256.
//   V tile, MN-major core matrices (8 keys x 8 dims, rows along the keys): piece dg of
//     key at (key / 16) * (HD * 32) + ((key / 8) % 2) * 128 + dg * 256 + (key % 8) * 16,
//     V_LBO = 128 (next 8 keys, the reduced dimension), V_SBO = 256 (next 8 dims); the
//     k-step kk (keys 16kk..) starts at kk * HD * 32.
constexpr int RING_STAGES = 3;

// S = Q K^T of one tile of BC (64 or 128) keys whose K starts at shared address sk
// (layout above; SW128: the TMA design's 128B-swizzled layout, regions of BC x 128 bytes
// per 64 dims), Q from registers; issued and committed (the caller waits).
template <int KS, int BC = PW_BC, bool SW128 = false>
__device__ __forceinline__ void wgmma_issue_s(float (&s)[BC / 2], const unsigned (&qa)[KS][4],
                                              unsigned sk) {
  constexpr unsigned K_LBO = 128, K_SBO = KS * 16 * 16;
  wgmma_fence();
#pragma unroll
  for (int ks = 0; ks < KS; ++ks) {
    const unsigned long long db =
        SW128 ? wgmma_desc_sw128(sk + (ks / 4) * (BC * 128) + (ks % 4) * 32, 16, 1024)
              : wgmma_desc(sk + ks * 256, K_LBO, K_SBO);
    if constexpr (BC == 64) {
      wgmma_m64n64k16_rs(s, qa[ks], db, ks > 0);
    } else {
      wgmma_m64n128k16_rs(s, qa[ks], db, ks > 0);
    }
  }
  wgmma_commit();
}

// wgmma_issue_s with Q from shared memory too, at sq in the K tile's layout (64 query
// rows in place of the keys): A and B are both K-major; a tile of BC (64 or 128) keys.
template <int KS, int BC>
__device__ __forceinline__ void wgmma_issue_s_ss(float (&s)[BC / 2], unsigned sq, unsigned sk) {
  constexpr unsigned LBO = 128, SBO = KS * 16 * 16;
  wgmma_fence();
#pragma unroll
  for (int ks = 0; ks < KS; ++ks) {
    const unsigned long long da = wgmma_desc(sq + ks * 256, LBO, SBO);
    const unsigned long long db = wgmma_desc(sk + ks * 256, LBO, SBO);
    if constexpr (BC == 64) {
      wgmma_m64n64k16_ss(s, da, db, ks > 0);
    } else {
      wgmma_m64n128k16_ss(s, da, db, ks > 0);
    }
  }
  wgmma_commit();
}

// O += P V for one tile of BC keys whose V starts at shared address sv (layout above;
// SW128: the TMA design's swizzled layout), P as A fragments (keys 16 kk ..: pa[kk]);
// issued and committed (the caller fenced and waits).
template <int HD, int BC = PW_BC, bool SW128 = false>
__device__ __forceinline__ void wgmma_issue_pv(float (&o)[HD / 2],
                                               const unsigned (&pa)[BC / 16][4],
                                               unsigned sv) {
  constexpr unsigned V_LBO = 128, V_SBO = 256;
#pragma unroll
  for (int kk = 0; kk < BC / 16; ++kk)
    wgmma_pv<HD, 1>(o, pa[kk],
                    SW128 ? wgmma_desc_sw128(sv + kk * 2048, BC * 128, 1024)
                          : wgmma_desc(sv + kk * (HD * 32), V_LBO, V_SBO));
  wgmma_commit();
}

// Tile j's scores s (raw, complete; BC keys) into O += P V(j), V at shared address sv:
// mask, online softmax (the output rescaled: no wgmma may be writing o), P packed as A
// fragments, the PV wgmmas issued and committed (the caller waits).
template <int HD, int BC = PW_BC>
__device__ __forceinline__ void wgmma_softmax_pv(float (&s)[BC / 2], int j, const AttnRows& wr,
                                                 int t, float (&m)[2], float (&l)[2],
                                                 float (&o)[HD / 2], float scale_log2,
                                                 unsigned sv) {
  const int k0 = j * BC;
  if (wr.needs_mask(k0, BC)) attn_mask(s, k0, t, wr.qpos);
  attn_softmax(s, m, l, o, scale_log2);
  unsigned pa[BC / 16][4];
#pragma unroll
  for (int kk = 0; kk < BC / 16; ++kk) {
    attn_pack_p(s, kk, pa[kk]);
    pin(pa[kk]);
  }
  pin(o);
  wgmma_fence();
  wgmma_issue_pv<HD, BC>(o, pa, sv);
}

// The ring design (`prefill_attention_wgmma_hd{D}`, the default). OVERLAP
// (`prefill_attention_wgmma_ov_hd{D}`, experimental): S(j + 1) = Q K(j + 1)^T computes
// while the softmax of tile j runs (FlashAttention-3's intra-warpgroup overlap; 32 more
// registers). Tiles j and j + 1 are in use during iteration j and the copies of
// tile j + 2 fill the third stage, one iteration ahead instead of two.
template <int HD, bool OVERLAP>
__device__ __forceinline__ void prefill_wgmma_impl(
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
  constexpr unsigned K_SBO = HD * 16;
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
  constexpr int PER = PIECES / THREADS;  // pieces a thread copies a tile
  // What a thread's pieces keep from tile to tile (tiles start at multiples of 64 keys,
  // so a piece's key in the tile, its key within a 16-key KV block and its dims are
  // fixed), computed once: the piece's key, its K and V destinations within a stage, and
  // its element offset within a KV block's rows. Per tile there is then one multiply
  // and two adds a piece (the copies' addressing was about 200 of the 530 instructions
  // a warp issued a tile, SASS).
  int key_of[PER], inner[PER];
  unsigned dst_k[PER], dst_v[PER];
#pragma unroll
  for (int i = 0; i < PER; ++i) {
    const int c = threadIdx.x + i * THREADS;
    const int key = c / (HD / 8), dp = c % (HD / 8);
    key_of[i] = key;
    inner[i] = (key % KV_BLOCK) * (int)row_stride + kvh * HD + dp * 8;
    dst_k[i] = (key >> 3) * K_SBO + dp * 128 + (key & 7) * 16;
    dst_v[i] = TILE + (key >> 4) * (HD * 32) + ((key >> 3) & 1) * 128 + dp * 256 + (key & 7) * 16;
  }
  const int block_elems = KV_BLOCK * (int)row_stride;
  // The physical blocks of this thread's pieces of tile j, read a tile ahead of its
  // copies: run 8's ncu had 30% of the stalls on these reads when they sat between the
  // barrier and the copies they address.
  auto fetch_blocks = [&](int j, int(&e)[PER]) {
#pragma unroll
    for (int i = 0; i < PER; ++i) {
      const int pos = j * PW_BC + key_of[i];
      e[i] = j < n_tiles && pos < kv_end ? bt[(unsigned)pos / KV_BLOCK] : 0;
    }
  };
  int blocks[PER];
  // Tile j's K and V into stage j % RING_STAGES (zeros past the context), as one
  // cp.async group, its pieces' blocks in `blocks` (fetch_blocks(j)); past the last
  // tile an empty group, so every iteration commits one.
  auto load_tile = [&](int j) {
    if (j < n_tiles) {
      const unsigned st = base + (j % RING_STAGES) * STAGE;
#pragma unroll
      for (int i = 0; i < PER; ++i) {
        const bool in = j * PW_BC + key_of[i] < kv_end;
        const long long off = in ? (long long)blocks[i] * block_elems + inner[i] : 0;
        cp_async16(st + dst_k[i], k_cache + off, in ? 16u : 0u);
        cp_async16(st + dst_v[i], v_cache + off, in ? 16u : 0u);
      }
    }
    cp_async_commit();
  };

  auto issue_s = [&](int j, float(&s)[32]) {
    wgmma_issue_s<KS>(s, qa, base + (j % RING_STAGES) * STAGE);
  };
  auto softmax_pv = [&](float(&s)[32], int j) {
    wgmma_softmax_pv<HD>(s, j, wr, t, m, l, o, scale_log2,
                         base + (j % RING_STAGES) * STAGE + TILE);
  };

  if constexpr (OVERLAP) {
    // Whether this warpgroup computes tile j (its rows see a key of it).
    auto runs = [&](int j) { return wg_active && j < n_tiles && j * PW_BC <= wg_last_pos; };
    float s_cur[32], s_next[32];
    fetch_blocks(0, blocks);
    load_tile(0);
    fetch_blocks(1, blocks);
    load_tile(1);
    fetch_blocks(2, blocks);
    cp_async_wait<1>();  // tile 0
    fence_async_shared();
    __syncthreads();
    if (runs(0)) {
      issue_s(0, s_cur);
      wgmma_wait_all();
      pin(s_cur);
    }
#pragma unroll 1
    for (int j = 0; j < n_tiles; ++j) {
      // Tile j + 1 has landed (the one group pending), and every warpgroup is done with
      // tile j - 1, whose stage the copies of tile j + 2 now refill.
      cp_async_wait<0>();
      fence_async_shared();
      __syncthreads();
      const bool next = runs(j + 1);
      if (next) issue_s(j + 1, s_next);  // runs during the softmax below
      load_tile(j + 2);
      fetch_blocks(j + 3, blocks);
      if (runs(j)) softmax_pv(s_cur, j);  // P V(j - 1) completed: o may be rescaled
      wgmma_wait_all();  // S(j + 1) and P V(j)
      pin(o);
      if (next) {
        pin(s_next);
#pragma unroll
        for (int i = 0; i < 32; ++i) s_cur[i] = s_next[i];
      }
    }
    cp_async_wait<0>();
    attn_store<HD>(out, o, l, wr.rows, n_new, q0, n_heads, head, t);
    return;
  }

  fetch_blocks(0, blocks);
  load_tile(0);
  fetch_blocks(1, blocks);
  load_tile(1);
  fetch_blocks(2, blocks);
#pragma unroll 1
  for (int j = 0; j < n_tiles; ++j) {
    cp_async_wait<1>();  // this thread's copies of tile j have landed
    fence_async_shared();
    // Everyone's copies of tile j are visible to wgmma, and every warpgroup is done with
    // tile j - 1, whose stage the copies of tile j + 2 now refill.
    __syncthreads();
    load_tile(j + 2);
    fetch_blocks(j + 3, blocks);
    if (!wg_active || j * PW_BC > wg_last_pos) continue;
    float s[32];
    issue_s(j, s);
    wgmma_wait_all();
    pin(s);
    softmax_pv(s, j);
    wgmma_wait_all();
    pin(o);
  }
  cp_async_wait<0>();  // no copy may outlive the CTA's shared memory

  attn_store<HD>(out, o, l, wr.rows, n_new, q0, n_heads, head, t);
}


// ---------------------------------------------------------------------------------------
// Warp-specialised design (`prefill_attention_wgmma_ws_hd{D}`, experimental): the same
// tiles, layouts and per-warpgroup math, but the copies are a producer warpgroup's job
// and the two consumer warpgroups are coupled to it (not to each other) through
// mbarriers, so they drift out of phase and one's softmax can overlap the other's MMAs;
// no barrier of the whole CTA inside the loop. 384 threads: warpgroups 0 and 1 consume
// (64 query rows each), warpgroup 2 produces. With 12 warps a thread gets 168 registers
// (the register file is split per SM sub-partition, three warps each). The consumers
// read Q from shared memory (both S operands K-major there, as FlashAttention-3 does)
// rather than holding it in 32 registers, so they fit in those 168 (146 at head_dim 128)
// without `setmaxnreg`. (ptxas does give a warpgroup more registers after
// `setmaxnreg.inc`, measured on a small wgmma kernel, but not to code containing a
// `trap`: an earlier version of the waits below trapped, and ptxas spilled and
// serialised the consumers' wgmmas, C7512.)
//   Producer: for each tile, prefetches the tile's block-table entries, waits until both
//   consumer warpgroups released the stage it refills (`empty`, 8 warp arrivals), issues
//   its cp.async copies (8 lanes write 128 contiguous bytes: no bank conflicts; each key
//   row is read as 64-byte runs), and once the tile's copies have landed (it waits for
//   them one tile behind, keeping two tiles in flight) fences them for the async proxy and
//   arrives on the stage's `full` barrier (128 thread arrivals).
//   Consumers: wait `full`, compute the tile if their rows see it (wait for and release
//   every tile otherwise too, so that each stage's phases stay counted), arrive on `empty`.
// Ring stages: four of 64-key tiles, three of 128-key ones (a stage's shared memory
// doubles; three stages and Q in shared memory would not fit at head_dim 128, so with
// 128-key tiles Q stays in registers). Not two: a stage is released only once the P V
// that reads it has completed, in the consumers' next iteration, after they waited for
// that iteration's tile, whose `full` the producer signals only after issuing the tile
// after it, into the stage being released: with two stages each waits for the other.
constexpr int ws_stages(int bc) { return bc == 64 ? 4 : 3; }

// Registers a thread of the executing warpgroup may use from here on (every warp of the
// warpgroup executes it; the CTA's total must stay what the launch gave: 40 + 2 x 232 =
// 3 x 168).
template <int N>
__device__ __forceinline__ void setmaxnreg_dec() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(N));
}
template <int N>
__device__ __forceinline__ void setmaxnreg_inc() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(N));
}

__device__ __forceinline__ void st_shared16(unsigned addr, uint4 v) {
  asm volatile("st.shared.v4.u32 [%0], {%1, %2, %3, %4};\n" ::"r"(addr), "r"(v.x), "r"(v.y),
               "r"(v.z), "r"(v.w)
               : "memory");
}
__device__ __forceinline__ void mbar_init(unsigned bar, unsigned count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_arrive(unsigned bar) {
  asm volatile("{ .reg .b64 st; mbarrier.arrive.shared::cta.b64 st, [%0]; }\n" ::"r"(bar)
               : "memory");
}
// Named barrier `id` (1-15; 0 is __syncthreads) of `n` threads: wait for all n, or
// count this warp's threads in without waiting.
__device__ __forceinline__ void named_bar_sync(int id, int n) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(n) : "memory");
}
__device__ __forceinline__ void named_bar_arrive(int id, int n) {
  asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(n) : "memory");
}
// Blocks until the phase of `bar` with this parity has completed, or gives up after 2^22
// polls of try_wait (each suspends the thread for a while: well over 0.1 s in all, where
// a legitimate wait lasts microseconds). Giving up lets a protocol bug (these designs are
// experimental) finish the launch with wrong results, which the checks report, instead
// of hanging the GPU run. (Not `trap`: a trap in the consumers' code made ptxas spill
// and serialise their wgmmas, C7512.)
// Returns false when it gave up: the consumers then store NaN in their rows, so a
// protocol failure shows in the checks as NaN rows rather than as plausible numbers.
__device__ __forceinline__ bool mbar_wait(unsigned bar, unsigned parity) {
  unsigned done = 0;
  for (unsigned polls = 0; !done && polls < (1u << 22); ++polls) {
    asm volatile(
        "{ .reg .pred p; mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2; "
        "selp.u32 %0, 1, 0, p; }\n"
        : "=r"(done)
        : "r"(bar), "r"(parity)
        : "memory");
  }
  return done != 0;
}

// ---------------------------------------------------------------------------------------
// TMA (`prefill_attention_wgmma_tma_hd{64,128}`, experimental): the ping-pong design with
// 128-key tiles whose K and V tiles the tensor-memory accelerator copies: one producer
// thread issues a 2D bulk copy per 16-key KV block and 64 dims (a 16-row box of 128-byte
// rows) into 128-byte-swizzled shared memory, and each copy's bytes count down the
// stage's `full` barrier (expect_tx), instead of 128 threads issuing 16-byte cp.async
// pieces (ncu of run 8: L2 at 56% of its throughput for 0.18 of the peak, the block-table
// reads on the consumers' path). The layouts are the canonical 128B-swizzle ones (PTX ISA,
// CUTLASS's GmmaDescriptor): a half-tile region per 64 dims, a key a 128-byte row, rows in
// 8-row atoms of 1024 bytes whose 16-byte chunks are XORed with the row (bits 4-6 of the
// address with bits 7-9), which TMA writes and wgmma reads alike.
//   K, K-major (S = Q K^T, B operand, N = keys): SBO = 1024 (next 8 keys), the k-step of
//     dims 16 ks at region ks / 4, +32 bytes (ks % 4) into the row.
//   V, MN-major (O += P V, B operand, N = dims): LBO = the region's size (next 64 dims),
//     SBO = 1024 (next 8 keys), the k-step of keys 16 kk at +2048 kk.
// Blocks past the sequence's last are copied from row `num_slots` (outside the tensor):
// TMA fills them with zeros, so no stale shared memory meets a zero softmax weight. (The
// keys past the end inside the sequence's last block are copied as the cache holds them,
// as for any cache row: finite, since the caches are allocated zeroed and only ever hold
// written K/V; the mask gives their scores -inf and their V a weight of 0.)
struct __align__(64) SovTensorMap {
  unsigned long long opaque[16];
};

// The 16-row x 64-element box at (x, y) of `map` into shared memory at dst (1024-byte
// aligned), counted on the mbarrier `bar`.
__device__ __forceinline__ void tma_load_2d(unsigned dst, const SovTensorMap* map, int x, int y,
                                            unsigned bar) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes "
      "[%0], [%1, {%2, %3}], [%4];\n" ::"r"(dst),
      "l"(reinterpret_cast<unsigned long long>(map)), "r"(x), "r"(y), "r"(bar)
      : "memory");
}

// Arrive on `bar` expecting `bytes` more of asynchronous copies in this phase.
__device__ __forceinline__ void mbar_arrive_expect_tx(unsigned bar, unsigned bytes) {
  asm volatile("{ .reg .b64 st; mbarrier.arrive.expect_tx.shared::cta.b64 st, [%0], %1; }\n" ::"r"(
                   bar),
               "r"(bytes)
               : "memory");
}

template <int HD, bool PINGPONG, int BC, bool TMA = false>
__device__ __forceinline__ void prefill_wgmma_ws_impl(
    const sov::bf16* __restrict__ q, const sov::bf16* __restrict__ k_cache,
    const sov::bf16* __restrict__ v_cache, const int* __restrict__ cu_q,
    const int* __restrict__ seq_lens, const int* __restrict__ block_tables,
    sov::bf16* __restrict__ out, int n_heads, int n_kv_heads, int max_blocks, float scale,
    int q_stride, const SovTensorMap* tmap_k = nullptr, const SovTensorMap* tmap_v = nullptr,
    int num_slots = 0) {
  static_assert(!TMA || (PINGPONG && BC == 128 && HD % 64 == 0),
                "TMA: the ping-pong design with 128-key tiles, head_dim 64 or 128");
  static_assert(HD == 64 || HD == 96 || HD == 128, "head_dim must be 64, 96 or 128");
  static_assert(BC == 64 || BC == 128, "tiles of 64 or 128 keys");
  constexpr int KS = HD / 16;
  constexpr int TILE = BC * HD * 2;  // a K or a V tile
  constexpr int QTILE = 64 * HD * 2;  // a consumer warpgroup's query rows
  constexpr int STAGE = 2 * TILE;
  constexpr int ST = ws_stages(BC);
  constexpr bool Q_SMEM = BC == 64;  // else Q in registers (see ws_stages)
  constexpr int BR = 128;
  constexpr unsigned K_SBO = HD * 16;
  extern __shared__ __align__(1024) unsigned char pr_smem[];
  // The swizzled layouts need 1024-byte alignment: the launcher gives TMA kernels 1 KB
  // more to round up into.
  const unsigned base = TMA ? (smem_u32(pr_smem) + 1023u) & ~1023u : smem_u32(pr_smem);
  // After the ST stages: each consumer warpgroup's 64 query rows (K-tile layout; with
  // 64-key tiles only), then ST `full` and ST `empty` barriers.
  const unsigned q_base = base + ST * STAGE;
  const unsigned full0 = q_base + (Q_SMEM ? 2 * QTILE : 0);
  const unsigned empty0 = full0 + ST * 8;

  const int seq = blockIdx.z, head = blockIdx.y;
  const int q0 = cu_q[seq], n_new = cu_q[seq + 1] - q0;
  const int tile_row0 = (gridDim.x - 1 - blockIdx.x) * BR;  // longest prefixes first
  if (tile_row0 >= n_new) return;
  const int len = seq_lens[seq];
  const int first_pos = len - n_new;
  const int kvh = head / (n_heads / n_kv_heads);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int last_row = min(n_new, tile_row0 + BR) - 1;
  const int kv_end = first_pos + last_row + 1;
  const int n_tiles = (kv_end + BC - 1) / BC;

  if (threadIdx.x == 0) {
#pragma unroll
    for (int st = 0; st < ST; ++st) {
      mbar_init(full0 + 8 * st, TMA ? 1 : 128);
      mbar_init(empty0 + 8 * st, 8);
    }
    // The initialised barriers visible to the async proxy (TMA's complete_tx) as well,
    // as CUTLASS's pipelines do after their init.
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  __syncthreads();

  if (warp >= 8) {
    // 128-key tiles: the consumers need more than the 168 registers 12 warps get.
    if constexpr (BC == 128) setmaxnreg_dec<40>();
    const int* bt = block_tables + (long long)seq * max_blocks;
    const int n_blocks = (kv_end + KV_BLOCK - 1) / KV_BLOCK;
    if constexpr (TMA) {
      if (threadIdx.x != 256) return;  // one thread issues every copy
#pragma unroll 1
      for (int j = 0; j < n_tiles; ++j) {
        const int st = j % ST;
        const int b0 = j * (BC / KV_BLOCK);
        int row[BC / KV_BLOCK];  // each block's first cache row (num_slots: zeros)
#pragma unroll
        for (int b = 0; b < BC / KV_BLOCK; ++b)
          row[b] = b0 + b < n_blocks ? bt[b0 + b] * KV_BLOCK : num_slots;
        if (j >= ST) mbar_wait(empty0 + 8 * st, (j / ST - 1) & 1);
        const unsigned bar = full0 + 8 * st;
        mbar_arrive_expect_tx(bar, 2 * TILE);
        const unsigned sk = base + st * STAGE, sv = sk + TILE;
#pragma unroll
        for (int b = 0; b < BC / KV_BLOCK; ++b) {
#pragma unroll
          for (int h = 0; h < HD / 64; ++h) {
            const unsigned off = h * (BC * 128) + b * (KV_BLOCK * 128);
            tma_load_2d(sk + off, tmap_k, kvh * HD + h * 64, row[b], bar);
            tma_load_2d(sv + off, tmap_v, kvh * HD + h * 64, row[b], bar);
          }
        }
      }
      // Stay until the last tiles' copies have landed: should a consumer give up a wait
      // (a protocol bug), the CTA must not retire while TMA still writes its shared memory.
      for (int j = max(0, n_tiles - ST); j < n_tiles; ++j)
        mbar_wait(full0 + 8 * (j % ST), (j / ST) & 1);
      return;
    }
    const long long row_stride = (long long)n_kv_heads * HD;
    // Thread p copies keys 8 (w + 4 i) + p % 8 (w = p / 32 its warp, i < BC / 32),
    // pieces (p / 8) % 4 + 4 dq of each.
    const int p = threadIdx.x - 256;
    const int key_lo = p & 7, dp0 = (p >> 3) & 3, w = p >> 5;
#pragma unroll 1
    for (int j = 0; j < n_tiles; ++j) {
      const int st = j % ST;
      const int k0 = j * BC;
      // The KV block of this thread's key i: (w + 4 i) / 2 of the tile's BC / 16.
      int blk[BC / 32];
#pragma unroll
      for (int i = 0; i < BC / 32; ++i) {
        const int b = k0 / KV_BLOCK + (w >> 1) + 2 * i;
        blk[i] = b < n_blocks ? bt[b] : 0;
      }
      if (j >= ST) mbar_wait(empty0 + 8 * st, (j / ST - 1) & 1);
      const unsigned sk = base + st * STAGE, sv = sk + TILE;
#pragma unroll
      for (int i = 0; i < BC / 32; ++i) {
        const int key = 8 * (w + 4 * i) + key_lo;
        const int pos = k0 + key;
        const bool in = pos < kv_end;
        const long long slot = in ? (long long)blk[i] * KV_BLOCK + pos % KV_BLOCK : 0;
        const long long off = slot * row_stride + kvh * HD;
        const unsigned n = in ? 16u : 0u;
#pragma unroll
        for (int dq = 0; dq < HD / 32; ++dq) {
          const int dp = dp0 + 4 * dq;
          cp_async16(sk + (key >> 3) * K_SBO + dp * 128 + (key & 7) * 16,
                     k_cache + off + dp * 8, n);
          cp_async16(sv + (key >> 4) * (HD * 32) + ((key >> 3) & 1) * 128 + dp * 256 +
                         (key & 7) * 16,
                     v_cache + off + dp * 8, n);
        }
      }
      cp_async_commit();
      if (j > 0) {
        cp_async_wait<1>();  // tile j - 1
        fence_async_shared();
        mbar_arrive(full0 + 8 * ((j - 1) % ST));
      }
    }
    if (n_tiles > 0) {
      cp_async_wait<0>();
      fence_async_shared();
      mbar_arrive(full0 + 8 * ((n_tiles - 1) % ST));
    }
    return;
  }

  if constexpr (BC == 128) setmaxnreg_inc<232>();
  const int wg = warp / 4;
  const int g = lane >> 2, t = lane & 3;
  const int wg_row0 = tile_row0 + wg * 64;
  const AttnRows wr(wg_row0 + (warp % 4) * 16, n_new, first_pos, g);
  const bool wg_active = wg_row0 < n_new;
  const int wg_last_pos = first_pos + min(n_new - 1, wg_row0 + 63);

  // The warpgroup's query rows into shared memory (zeros past n_new), read by the S
  // wgmmas from there (see above).
  const unsigned sq = q_base + wg * QTILE;
  unsigned qa[KS][4];  // with 128-key tiles
  if constexpr (!Q_SMEM) {
    attn_load_q<KS>(qa, q, q0, wr.rows, n_new, q_stride, head * HD, t);
  } else {
    const int i = threadIdx.x % 128;
#pragma unroll
    for (int u = 0; u < HD / 16; ++u) {
      const int c = i + 128 * u;
      const int row = ((c >> 3) / (HD / 8)) * 8 + (c & 7), dp = (c >> 3) % (HD / 8);
      uint4 v = make_uint4(0u, 0u, 0u, 0u);
      if (wg_row0 + row < n_new)
        v = *reinterpret_cast<const uint4*>(q + (long long)(q0 + wg_row0 + row) * q_stride +
                                            head * HD + dp * 8);
      st_shared16(sq + (row >> 3) * K_SBO + dp * 128 + (row & 7) * 16, v);
    }
    fence_async_shared();
    named_bar_sync(3 + wg, 128);
  }
  // S = Q K^T of the tile whose K is at sk, issued and committed.
  auto issue_s = [&](float(&s)[BC / 2], unsigned sk) {
    if constexpr (Q_SMEM) {
      wgmma_issue_s_ss<KS, BC>(s, sq, sk);
    } else {
      wgmma_issue_s<KS, BC, TMA>(s, qa, sk);
    }
  };
  float o[HD / 2];
#pragma unroll
  for (int i = 0; i < HD / 2; ++i) o[i] = 0.f;
  float m[2] = {neg_inf(), neg_inf()};
  float l[2] = {0.f, 0.f};
  const float scale_log2 = scale * 1.4426950408889634f;
  bool lost = false;  // a `full` wait gave up (see mbar_wait)

  if constexpr (PINGPONG) {
    // Tiles 0 .. tiles(w) - 1 are the ones warpgroup w computes (none when inactive;
    // the two differ by at most one).
    auto tiles = [&](int w) {
      const int r0 = tile_row0 + w * 64;
      return r0 < n_new ? (first_pos + min(n_new - 1, r0 + 63)) / BC + 1 : 0;
    };
    const int t0 = tiles(0), t1 = tiles(1), mine = wg ? t1 : t0;
    // Bursts of MMA issue alternate between the warpgroups (named barriers 1 and 2):
    // warpgroup w waits on barrier 1 + w for the other's pass. Both issue the same number
    // of bursts (padding with empty ones), warpgroup 0 first; with one warpgroup idle
    // there is nothing to alternate.
    const bool pp = t0 > 0 && t1 > 0;
    const int slots = max(t0, t1) + 1;
    int slot = 0;
    auto sched_wait = [&] {
      if (pp) named_bar_sync(1 + wg, 256);
    };
    auto sched_pass = [&] {
      if (pp) named_bar_arrive(2 - wg, 256);
      ++slot;
    };
    if (pp && wg == 1) named_bar_arrive(1, 256);
    auto release = [&](int j) {
      __syncwarp();
      if (lane == 0) mbar_arrive(empty0 + 8 * (j % ST));
    };
    auto wait_tile = [&](int j) { lost |= !mbar_wait(full0 + 8 * (j % ST), (j / ST) & 1); };
    if (mine > 0) {
      // Burst 0: S(0). Burst k: S(k) and P V(k - 1), whose P waits in registers; the
      // softmax of tile k runs while the other warpgroup's burst computes. Last burst:
      // P V(mine - 1).
      float s[BC / 2];
      unsigned pa[BC / 16][4];
      float rescale[2];
      wait_tile(0);
      sched_wait();
      issue_s(s, base);
      sched_pass();
      wgmma_wait_all();
      pin(s);
      if (wr.needs_mask(0, BC)) attn_mask(s, 0, t, wr.qpos);
      attn_softmax_weights(s, m, l, scale_log2, rescale);  // o is still zero
#pragma unroll
      for (int kk = 0; kk < BC / 16; ++kk) attn_pack_p(s, kk, pa[kk]);
#pragma unroll 1
      for (int j = 1; j < mine; ++j) {
        wait_tile(j);
#pragma unroll
        for (int kk = 0; kk < BC / 16; ++kk) pin(pa[kk]);
        pin(o);
        sched_wait();
        issue_s(s, base + (j % ST) * STAGE);  // fences first
        wgmma_issue_pv<HD, BC, TMA>(o, pa, base + ((j - 1) % ST) * STAGE + TILE);
        sched_pass();
        wgmma_wait<1>();  // S(j)
        pin(s);
        if (wr.needs_mask(j * BC, BC)) attn_mask(s, j * BC, t, wr.qpos);
        attn_softmax_weights(s, m, l, scale_log2, rescale);
        wgmma_wait_all();  // P V(j - 1)
        pin(o);
        release(j - 1);
        attn_rescale(o, rescale);
#pragma unroll
        for (int kk = 0; kk < BC / 16; ++kk) attn_pack_p(s, kk, pa[kk]);
      }
#pragma unroll
      for (int kk = 0; kk < BC / 16; ++kk) pin(pa[kk]);
      pin(o);
      sched_wait();
      wgmma_fence();
      wgmma_issue_pv<HD, BC, TMA>(o, pa, base + ((mine - 1) % ST) * STAGE + TILE);
      sched_pass();
      wgmma_wait_all();
      pin(o);
      release(mine - 1);
    }
    // The tiles only the other warpgroup computes, then the padding bursts.
#pragma unroll 1
    for (int j = mine; j < n_tiles; ++j) {
      wait_tile(j);
      release(j);
    }
#pragma unroll 1
    while (slot < slots) {
      sched_wait();
      sched_pass();
    }
    if (pp && wg == 0) named_bar_sync(1, 256);  // warpgroup 1's last pass
  } else {
#pragma unroll 1
    for (int j = 0; j < n_tiles; ++j) {
      const int st = j % ST;
      lost |= !mbar_wait(full0 + 8 * st, (j / ST) & 1);
      if (wg_active && j * BC <= wg_last_pos) {
        const unsigned sk = base + st * STAGE;
        float s[BC / 2];
        issue_s(s, sk);
        wgmma_wait_all();
        pin(s);
        wgmma_softmax_pv<HD, BC>(s, j, wr, t, m, l, o, scale_log2, sk + TILE);
        wgmma_wait_all();
        pin(o);
      }
      __syncwarp();
      if (lane == 0) mbar_arrive(empty0 + 8 * st);
    }
  }

  if (lost) {
#pragma unroll
    for (int i = 0; i < HD / 2; ++i) o[i] = __int_as_float(0x7fc00000);
    l[0] = l[1] = 1.f;
  }
  attn_store<HD>(out, o, l, wr.rows, n_new, q0, n_heads, head, t);
}


}  // namespace sov


#define SOV_PREFILL_WGMMA(HD, OVERLAP, NAME)                                               \
  extern "C" __global__ void __launch_bounds__(256, 1) NAME(                               \
      const sov::bf16* q, const sov::bf16* k_cache, const sov::bf16* v_cache,              \
      const int* cu_q, const int* seq_lens, const int* block_tables, sov::bf16* out,       \
      int n_heads, int n_kv_heads, int max_blocks, float scale, int q_stride) {            \
    sov::prefill_wgmma_impl<HD, OVERLAP>(q, k_cache, v_cache, cu_q, seq_lens,              \
                                         block_tables, out, n_heads, n_kv_heads,           \
                                         max_blocks, scale, q_stride);                     \
  }

SOV_PREFILL_WGMMA(64, false, prefill_attention_wgmma_hd64)
SOV_PREFILL_WGMMA(96, false, prefill_attention_wgmma_hd96)
SOV_PREFILL_WGMMA(128, false, prefill_attention_wgmma_hd128)
SOV_PREFILL_WGMMA(64, true, prefill_attention_wgmma_ov_hd64)
SOV_PREFILL_WGMMA(96, true, prefill_attention_wgmma_ov_hd96)
SOV_PREFILL_WGMMA(128, true, prefill_attention_wgmma_ov_hd128)

#define SOV_PREFILL_WGMMA_WS(HD, PINGPONG, BC, NAME)                                       \
  extern "C" __global__ void __launch_bounds__(384, 1) NAME(                               \
      const sov::bf16* q, const sov::bf16* k_cache, const sov::bf16* v_cache,              \
      const int* cu_q, const int* seq_lens, const int* block_tables, sov::bf16* out,       \
      int n_heads, int n_kv_heads, int max_blocks, float scale, int q_stride) {            \
    sov::prefill_wgmma_ws_impl<HD, PINGPONG, BC>(q, k_cache, v_cache, cu_q, seq_lens,      \
                                                 block_tables, out, n_heads, n_kv_heads,   \
                                                 max_blocks, scale, q_stride);             \
  }

SOV_PREFILL_WGMMA_WS(64, false, 64, prefill_attention_wgmma_ws_hd64)
SOV_PREFILL_WGMMA_WS(96, false, 64, prefill_attention_wgmma_ws_hd96)
SOV_PREFILL_WGMMA_WS(128, false, 64, prefill_attention_wgmma_ws_hd128)
SOV_PREFILL_WGMMA_WS(64, true, 64, prefill_attention_wgmma_pp_hd64)
SOV_PREFILL_WGMMA_WS(96, true, 64, prefill_attention_wgmma_pp_hd96)
SOV_PREFILL_WGMMA_WS(128, true, 64, prefill_attention_wgmma_pp_hd128)
SOV_PREFILL_WGMMA_WS(64, true, 128, prefill_attention_wgmma_pp128_hd64)
SOV_PREFILL_WGMMA_WS(96, true, 128, prefill_attention_wgmma_pp128_hd96)
SOV_PREFILL_WGMMA_WS(128, true, 128, prefill_attention_wgmma_pp128_hd128)

#define SOV_PREFILL_WGMMA_TMA(HD)                                                          \
  extern "C" __global__ void __launch_bounds__(384, 1) prefill_attention_wgmma_tma_hd##HD( \
      const sov::bf16* q, const __grid_constant__ sov::SovTensorMap tmap_k,                \
      const __grid_constant__ sov::SovTensorMap tmap_v, const int* cu_q,                   \
      const int* seq_lens, const int* block_tables, sov::bf16* out, int n_heads,           \
      int n_kv_heads, int max_blocks, float scale, int q_stride, int num_slots) {          \
    sov::prefill_wgmma_ws_impl<HD, true, 128, true>(                                       \
        q, nullptr, nullptr, cu_q, seq_lens, block_tables, out, n_heads, n_kv_heads,       \
        max_blocks, scale, q_stride, &tmap_k, &tmap_v, num_slots);                         \
  }

SOV_PREFILL_WGMMA_TMA(64)
SOV_PREFILL_WGMMA_TMA(128)
