// Paged decode attention: one query token per sequence against its whole context in the
// paged KV cache. CPU reference: kernels::cpu::PagedAttention::group_heads (same math in
// f32; here K/V/Q are bf16 and every sum is f32).
//
// Layouts (row-major):
//   q            [num_seqs] rows of q_stride elements, the query heads first in each
//                row ([n_heads][HD]; q_stride > n_heads * HD reads q out of a fused
//                q|k|v projection)
//   k/v cache    [num_blocks][16][n_kv_heads][HD] bf16 (one layer), or e4m3 bytes in the
//                `_fp8` entry points, with k_scale / v_scale [n_kv_heads] f32
//   block_tables [num_seqs][max_blocks] int   (physical block of logical block i)
//   seq_lens     [num_seqs] int               (context length, the new token included)
//   out          [num_seqs][n_heads][HD] bf16
//
// Grid: (num_seqs, n_kv_heads, num_splits); 128 threads (4 warps). One CTA serves every
// query head of one KV head's GQA group, so each K/V row is read from memory once per
// group. The context is cut into `num_splits` contiguous ranges of whole 64-token units
// (split-KV, for when sequences x KV heads are too few CTAs to fill the GPU).
//
// The CTA first prefetches the block table of its range into shared memory, a window of
// DA_TABLE entries (4096 tokens) at a time, the next window's entries loaded into
// registers while the current one is processed; the only barriers are one a window and
// one at the end. Warp w takes KV blocks w, w + 4, ... of the window, and within a warp
// each group of SUB lanes (one row: 16-byte loads, 8 bf16 per lane) streams its own rows
// of each block with its own online softmax (running max, sum and accumulators per query
// head). A warp issues every K and V load of NU rows before it computes on them, so many
// loads are in flight per SM. Scores are kept in log2 units (q is
// pre-scaled by scale * log2(e)) so the softmax uses exp2. At the end the row groups are
// merged with shuffles, the warps through shared memory (log-sum-exp weights).
//
// num_splits == 1: the CTA writes `out`. Otherwise it writes its normalised partial
// output and its (max in log2 units, sum) to part_out [num_seqs][n_heads][num_splits][HD]
// f32 and part_ml [num_seqs][n_heads][num_splits][2] f32, and decode_attention_merge
// combines the splits. (Merging in this kernel instead, by the last split CTA of each
// sequence and KV head to finish, was measured on an H200 in run 8: bit-identical and no
// faster, batch-1 decode 849 vs 853 tok/s, so the merge kernel stayed.)
#include "common.cuh"

namespace sov {

constexpr int DA_THREADS = 128;
constexpr int DA_WARPS = DA_THREADS / 32;
constexpr int DA_PART = 64;  // tokens per split unit (a multiple of KV_BLOCK; gpu_ref::DECODE_CHUNK)
// Block-table entries a CTA stages in shared memory at a time (4096 tokens), twice: the
// window being read and the next, filled from registers loaded while the current one is
// processed.
constexpr int DA_TABLE = 256;
static_assert(DA_TABLE % DA_THREADS == 0, "each thread stages whole entries of a window");
constexpr float LOG2E = 1.4426950408889634f;

// KV: the cache's element type, bf16 or fp8 (e4m3 with a scale per KV head: k_scale and
// v_scale [n_kv_heads], unused for bf16). The K scale is folded into q and the V scale
// into the output, so the loop is the same for both; an fp8 lane loads 8 bytes a row.
template <int HD, int GROUP, typename KV>
__device__ __forceinline__ void decode_attention_impl(
    const sov::bf16* SOV_RESTRICT_ACT q, const KV* SOV_RESTRICT_ACT k_cache,
    const KV* SOV_RESTRICT_ACT v_cache, const float* __restrict__ k_scale,
    const float* __restrict__ v_scale, const int* __restrict__ block_tables,
    const int* __restrict__ seq_lens, sov::bf16* __restrict__ out,
    float* __restrict__ part_out, float* __restrict__ part_ml, int n_kv_heads,
    int max_blocks, int num_splits, float scale, int q_stride) {
  constexpr bool FP8 = sizeof(KV) == 1;
  typedef sov::Kv8<KV> Kv;
  constexpr int CHUNKS = HD / 8;              // 16-byte pieces of one row
  constexpr int SUB = CHUNKS <= 8 ? 8 : 16;   // lanes per row (a power of two)
  constexpr int RPW = 32 / SUB;               // rows a warp covers per load
  constexpr int U = KV_BLOCK / RPW;           // loads per lane to cover one block
  // Rows per lane per step: as many as the registers allow next to q and the
  // accumulators (8 * GROUP floats each).
  constexpr int NU = GROUP <= 2 ? U : (GROUP <= 4 ? (U < 4 ? U : 4) : 2);
  static_assert(HD % 8 == 0 && CHUNKS <= SUB, "head_dim must be 8..128, a multiple of 8");
  static_assert(DA_PART % KV_BLOCK == 0, "a split unit must hold whole blocks");
  static_assert(U % NU == 0, "steps must tile a block");

  __shared__ float s_m[DA_WARPS][GROUP], s_l[DA_WARPS][GROUP];
  __shared__ float s_acc[DA_WARPS][GROUP][HD];
  __shared__ int s_bt[2][DA_TABLE];

  // PDL builds (common.cuh): the successor may launch at once. Before the wait only what
  // no running kernel writes is read: the step's metadata (host-written) and the K/V rows
  // of earlier steps (the warp's first block); the current token's row, which the
  // predecessor (RoPE + KV write) stores, and q are read after it.
  sov::pdl_trigger();
  if (!PDL) sov::pdl_wait();
  const int seq = blockIdx.x, kvh = blockIdx.y, split = blockIdx.z;
  const int n_heads = n_kv_heads * GROUP;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int sub = lane / SUB, lsub = lane % SUB;
  const bool has = lsub < CHUNKS;
  const int len = seq_lens[seq];
  // This split's token range: whole 64-token units except the last.
  const int units_total = (len + DA_PART - 1) / DA_PART;
  const int units_per_split = (units_total + num_splits - 1) / num_splits;
  const int begin = split * units_per_split * DA_PART;
  const int end = min(len, begin + units_per_split * DA_PART);
  const int blk_begin = begin / KV_BLOCK;
  const int blk_end = (end + KV_BLOCK - 1) / KV_BLOCK;
  const long long row_stride = (long long)n_kv_heads * HD;
  const int* bt = block_tables + (long long)seq * max_blocks;
  const KV* kbase = k_cache + kvh * HD + lsub * 8;
  const KV* vbase = v_cache + kvh * HD + lsub * 8;
  // The block table of this CTA's range, prefetched into shared memory a window of
  // DA_TABLE entries at a time; the first window here (before a PDL build's wait: the
  // host writes the tables).
#pragma unroll
  for (int j = 0; j < DA_TABLE / DA_THREADS; ++j) {
    const int i = j * DA_THREADS + threadIdx.x;
    s_bt[0][i] = blk_begin + i < blk_end ? bt[blk_begin + i] : 0;
  }
  __syncthreads();
  int b = blk_begin + warp;
  int phys = 0;
  // PDL builds: the first NU rows a lane covers in the warp's first block, loaded before
  // the wait; then the current token's row (len - 1) is loaded again, after it.
  typename Kv::Raw kpre[NU], vpre[NU];
  if (PDL) {
    phys = b < blk_end ? s_bt[0][warp] : 0;
#pragma unroll
    for (int u = 0; u < NU; ++u) {
      const long long off = ((long long)phys * KV_BLOCK + u * RPW + sub) * row_stride;
      kpre[u] = has && b < blk_end ? Kv::load_before_wait(kbase + off) : Kv::zero();
      vpre[u] = has && b < blk_end ? Kv::load_before_wait(vbase + off) : Kv::zero();
    }
    sov::pdl_wait();
#pragma unroll
    for (int u = 0; u < NU; ++u) {
      if (has && b < blk_end && b * KV_BLOCK + u * RPW + sub == len - 1) {
        const long long off = ((long long)phys * KV_BLOCK + u * RPW + sub) * row_stride;
        kpre[u] = Kv::load(kbase + off);
        vpre[u] = Kv::load(vbase + off);
      }
    }
  }

  // This lane's slice of each query head of the group, in log2 units.
  const float qscale = scale * LOG2E * (FP8 ? k_scale[kvh] : 1.f);
  float qr[GROUP][8];
#pragma unroll
  for (int g = 0; g < GROUP; ++g) {
    if (has) {
      load8(q + (long long)seq * q_stride + (kvh * GROUP + g) * HD + lsub * 8, qr[g]);
    } else {
#pragma unroll
      for (int i = 0; i < 8; ++i) qr[g][i] = 0.f;
    }
#pragma unroll
    for (int i = 0; i < 8; ++i) qr[g][i] *= qscale;
  }
  float acc[GROUP][8], m[GROUP], l[GROUP];
#pragma unroll
  for (int g = 0; g < GROUP; ++g) {
    m[g] = sov::neg_inf();
    l[g] = 0.f;
#pragma unroll
    for (int i = 0; i < 8; ++i) acc[g][i] = 0.f;
  }
  // One step of a block: rows u0 .. u0 + NU - 1 a lane covers, their K and V in kr, vr.
  auto step = [&](int b, int u0, const typename Kv::Raw (&kr)[NU],
                  const typename Kv::Raw (&vr)[NU]) {
    float sc[NU][GROUP];
#pragma unroll
    for (int u = 0; u < NU; ++u) {
      float kf[8];
      Kv::widen(kr[u], kf);
      const bool valid = b * KV_BLOCK + (u0 + u) * RPW + sub < end;
#pragma unroll
      for (int g = 0; g < GROUP; ++g) {
        float d = 0.f;
#pragma unroll
        for (int i = 0; i < 8; ++i) d = fmaf(qr[g][i], kf[i], d);
#pragma unroll
        for (int off = SUB / 2; off > 0; off >>= 1) d += __shfl_xor_sync(FULL_MASK, d, off);
        sc[u][g] = valid ? d : sov::neg_inf();
      }
    }
#pragma unroll
    for (int g = 0; g < GROUP; ++g) {
      float mx = sc[0][g];
#pragma unroll
      for (int u = 1; u < NU; ++u) mx = fmaxf(mx, sc[u][g]);
      const float m_new = fmaxf(m[g], mx);
      if (m_new == sov::neg_inf()) continue;  // no valid row of this group yet
      const float r = exp2f(m[g] - m_new);     // 0 when m[g] is still -inf
      m[g] = m_new;
      l[g] *= r;
#pragma unroll
      for (int i = 0; i < 8; ++i) acc[g][i] *= r;
#pragma unroll
      for (int u = 0; u < NU; ++u) sc[u][g] = exp2f(sc[u][g] - m_new);
    }
#pragma unroll
    for (int u = 0; u < NU; ++u) {
      float vf[8];
      Kv::widen(vr[u], vf);
#pragma unroll
      for (int g = 0; g < GROUP; ++g) {
        // A group with no valid row yet skipped its update: its scores are still -inf
        // or raw; weigh them 0.
        const float p = m[g] == sov::neg_inf() ? 0.f : sc[u][g];
        l[g] += p;
#pragma unroll
        for (int i = 0; i < 8; ++i) acc[g][i] = fmaf(p, vf[i], acc[g][i]);
      }
    }
  };
  // The rest of a block from step u0 on: each step's K and V loads issued together.
  auto block_from = [&](int b, long long block_row, int u0_start) {
#pragma unroll
    for (int u0 = 0; u0 < U; u0 += NU) {
      if (u0 < u0_start) continue;
      typename Kv::Raw kr[NU], vr[NU];
#pragma unroll
      for (int u = 0; u < NU; ++u) {
        const long long off = (block_row + (u0 + u) * RPW + sub) * row_stride;
        if (has) {
          kr[u] = Kv::load(kbase + off);
          vr[u] = Kv::load(vbase + off);
        } else {
          kr[u] = Kv::zero();
          vr[u] = Kv::zero();
        }
      }
      step(b, u0, kr, vr);
    }
  };
  if (PDL && b < blk_end) {
    // The warp's first block: its first step from the rows loaded before the wait.
    step(b, 0, kpre, vpre);
    block_from(b, (long long)phys * KV_BLOCK, NU);
    b += DA_WARPS;
  }
  // Window by window (the same count for every warp: the barriers below are uniform):
  // warp w takes the window's blocks w, w + 4, ..., their physical numbers from shared
  // memory, while each thread holds its entries of the next window in registers, stored
  // into the other buffer (last read in the previous window, before the barrier that
  // ended it) and published by the window's closing barrier.
  int win = 0;
#pragma unroll 1
  for (int w0 = blk_begin; w0 < blk_end; w0 += DA_TABLE, ++win) {
    const int* cur = s_bt[win & 1];
    const int w_end = min(blk_end, w0 + DA_TABLE);
    const bool more = w0 + DA_TABLE < blk_end;
    int next[DA_TABLE / DA_THREADS];
#pragma unroll
    for (int j = 0; j < DA_TABLE / DA_THREADS; ++j) {
      const int i = w0 + DA_TABLE + j * DA_THREADS + threadIdx.x;
      next[j] = more && i < blk_end ? bt[i] : 0;
    }
#pragma unroll 1
    for (; b < w_end; b += DA_WARPS) block_from(b, (long long)cur[b - w0] * KV_BLOCK, 0);
    if (more) {
#pragma unroll
      for (int j = 0; j < DA_TABLE / DA_THREADS; ++j)
        s_bt[(win + 1) & 1][j * DA_THREADS + threadIdx.x] = next[j];
      __syncthreads();
    }
  }

  // Merge the row groups of each warp (lanes SUB apart) ...
#pragma unroll
  for (int g = 0; g < GROUP; ++g) {
    float mw = m[g];
#pragma unroll
    for (int off = SUB; off < 32; off <<= 1) mw = fmaxf(mw, __shfl_xor_sync(FULL_MASK, mw, off));
    const float f = m[g] == sov::neg_inf() ? 0.f : exp2f(m[g] - mw);
    float lw = l[g] * f;
#pragma unroll
    for (int off = SUB; off < 32; off <<= 1) lw += __shfl_xor_sync(FULL_MASK, lw, off);
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      float a = acc[g][i] * f;
#pragma unroll
      for (int off = SUB; off < 32; off <<= 1) a += __shfl_xor_sync(FULL_MASK, a, off);
      acc[g][i] = a;
    }
    if (lane == 0) {
      s_m[warp][g] = mw;
      s_l[warp][g] = lw;
    }
  }
  if (sub == 0 && has) {
#pragma unroll
    for (int g = 0; g < GROUP; ++g)
#pragma unroll
      for (int i = 0; i < 8; ++i) s_acc[warp][g][lsub * 8 + i] = acc[g][i];
  }
  __syncthreads();
  // ... then the warps.
  const float vs = FP8 ? v_scale[kvh] : 1.f;
  for (int e = threadIdx.x; e < GROUP * HD; e += DA_THREADS) {
    const int g = e / HD, d = e % HD;
    float mm = sov::neg_inf();
#pragma unroll
    for (int w = 0; w < DA_WARPS; ++w) mm = fmaxf(mm, s_m[w][g]);
    float o = 0.f, den = 0.f;
#pragma unroll
    for (int w = 0; w < DA_WARPS; ++w) {
      const float f = s_m[w][g] == sov::neg_inf() ? 0.f : exp2f(s_m[w][g] - mm);
      o = fmaf(f, s_acc[w][g][d], o);
      den = fmaf(f, s_l[w][g], den);
    }
    // An empty split (begin >= len) has den == 0: it writes zeros and (max -inf, sum 0),
    // which the merge weighs by 0.
    const float v = den > 0.f ? o / den * vs : 0.f;
    const long long head = (long long)seq * n_heads + kvh * GROUP + g;
    if (num_splits == 1) {
      out[head * HD + d] = sov::f32_to_bf16(v);
    } else {
      part_out[(head * num_splits + split) * HD + d] = v;
      if (d == 0) {
        part_ml[(head * num_splits + split) * 2] = mm;
        part_ml[(head * num_splits + split) * 2 + 1] = den;
      }
    }
  }
}

}  // namespace sov

// One entry point per (head_dim, GQA group): the host picks the one matching the model;
// `_fp8` variants read an e4m3 cache with per-KV-head scales.
#define SOV_DECODE_ATTENTION(HD, GROUP)                                                   \
  extern "C" __global__ void __launch_bounds__(sov::DA_THREADS, (GROUP) <= 2 ? 3 : 2)      \
      decode_attention_hd##HD##_g##GROUP(                                                 \
          const sov::bf16* q, const sov::bf16* k_cache,                           \
          const sov::bf16* v_cache, const int* block_tables, const int* seq_lens,     \
          sov::bf16* out, float* part_out, float* part_ml, int n_kv_heads,            \
          int max_blocks, int num_splits, float scale, int q_stride) {                    \
    sov::decode_attention_impl<HD, GROUP, sov::bf16>(                                     \
        q, k_cache, v_cache, nullptr, nullptr, block_tables, seq_lens, out, part_out,     \
        part_ml, n_kv_heads, max_blocks, num_splits, scale, q_stride);                    \
  }                                                                                       \
  extern "C" __global__ void __launch_bounds__(sov::DA_THREADS, (GROUP) <= 2 ? 3 : 2)      \
      decode_attention_hd##HD##_g##GROUP##_fp8(                                           \
          const sov::bf16* q, const sov::fp8* k_cache, const sov::fp8* v_cache,           \
          const float* k_scale, const float* v_scale, const int* block_tables,            \
          const int* seq_lens, sov::bf16* out, float* part_out, float* part_ml,           \
          int n_kv_heads, int max_blocks, int num_splits, float scale, int q_stride) {    \
    sov::decode_attention_impl<HD, GROUP, sov::fp8>(                                      \
        q, k_cache, v_cache, k_scale, v_scale, block_tables, seq_lens, out, part_out,     \
        part_ml, n_kv_heads, max_blocks, num_splits, scale, q_stride);                    \
  }

SOV_DECODE_ATTENTION(64, 1)
SOV_DECODE_ATTENTION(64, 2)
SOV_DECODE_ATTENTION(64, 3)
SOV_DECODE_ATTENTION(64, 4)
SOV_DECODE_ATTENTION(64, 8)
SOV_DECODE_ATTENTION(96, 1)
SOV_DECODE_ATTENTION(96, 2)
SOV_DECODE_ATTENTION(96, 4)
SOV_DECODE_ATTENTION(96, 8)
SOV_DECODE_ATTENTION(128, 1)
SOV_DECODE_ATTENTION(128, 2)
SOV_DECODE_ATTENTION(128, 4)
SOV_DECODE_ATTENTION(128, 8)

// Log-sum-exp merge of the splits: grid (num_seqs, n_heads), HD threads (<= 128).
// out = sum_s w_s * part_out_s / sum_s w_s with w_s = l_s * exp(m_s - max_s m_s).
extern "C" __global__ void __launch_bounds__(128)
    decode_attention_merge(const float* part_out, const float* part_ml, sov::bf16* out,
                           int n_heads, int head_dim, int num_splits) {
  sov::pdl_trigger();  // PDL builds (common.cuh)
  sov::pdl_wait();
  const long long head = (long long)blockIdx.x * n_heads + blockIdx.y;
  const float* ml = part_ml + head * num_splits * 2;
  float m = sov::neg_inf();
  for (int s = 0; s < num_splits; ++s) m = fmaxf(m, ml[2 * s]);
  for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
    float num = 0.f, den = 0.f;
    for (int s = 0; s < num_splits; ++s) {
      const float l = ml[2 * s + 1];
      if (l > 0.f) {
        const float w = l * exp2f(ml[2 * s] - m);  // maxima are in log2 units
        num = fmaf(w, part_out[(head * num_splits + s) * head_dim + d], num);
        den += w;
      }
    }
    out[head * head_dim + d] = sov::f32_to_bf16(den > 0.f ? num / den : 0.f);
  }
}
