//! CPU references with the CUDA kernels' exact semantics (kernels/cuda/*.cu): bf16
//! storage, f32 arithmetic, the same algorithm (chunked online softmax, split-KV with a
//! log-sum-exp merge). The GPU check compares every kernel's output with these, and these
//! are tested here against plain definitions (dense attention, the f32 CPU kernels).
//!
//! bf16 values are carried as their bit patterns (`u16`), as they sit in device memory.

use crate::KvLayout;
use crate::cpu::RopeStyle;

/// Tokens per chunk of the decode kernel (`DA_PART` in decode_attention.cu).
pub const DECODE_CHUNK: usize = 64;

/// f32 -> bf16, round to nearest even (NaN stays NaN), as `__float2bfloat16_rn`.
pub fn to_bf16(x: f32) -> u16 {
    let bits = x.to_bits();
    if x.is_nan() {
        return ((bits >> 16) as u16) | 0x0040;
    }
    let round = 0x7fff + ((bits >> 16) & 1);
    (bits.wrapping_add(round) >> 16) as u16
}

/// bf16 -> f32 (exact).
pub fn from_bf16(h: u16) -> f32 {
    f32::from_bits(u32::from(h) << 16)
}

/// f32 -> OCP FP8 E4M3 ("e4m3fn": bias 7, no infinities, NaN `S.1111.111`, largest
/// finite 448) as `f32_to_e4m3` in common.cuh: nearest, ties to even, saturating to
/// +-448 (infinities too); NaN stays NaN.
pub fn to_e4m3(x: f32) -> u8 {
    let u = x.to_bits();
    let sign = ((u >> 24) & 0x80) as u8;
    let a = u & 0x7fff_ffff;
    if a > 0x7f80_0000 {
        return sign | 0x7f;
    }
    if a >= 0x43e0_0000 {
        return sign | 0x7e;
    }
    if a < 0x3c80_0000 {
        // Below 2^-6: subnormal steps of 2^-9 (x * 512 is exact).
        return sign | (f32::from_bits(a) * 512.0).round_ties_even() as u8;
    }
    let r = a + 0x7_ffff + ((a >> 20) & 1);
    sign | ((r >> 20) - (120 << 3)) as u8
}

/// OCP FP8 E4M3 -> f32 (exact), as `e4m3_to_f32` in common.cuh.
pub fn from_e4m3(c: u8) -> f32 {
    if c & 0x7f == 0x7f {
        return f32::NAN;
    }
    let (e, m) = (i32::from((c >> 3) & 0xf), f32::from(c & 7));
    let mag = if e == 0 {
        m * (2.0f32).powi(-9)
    } else {
        (1.0 + m / 8.0) * (2.0f32).powi(e - 7)
    };
    if c & 0x80 != 0 { -mag } else { mag }
}

/// One layer's K or V cache as the attention kernels read it: bf16, or e4m3 codes with
/// one scale per KV head (value = `from_e4m3(code) * scales[kv_head]`).
#[derive(Debug, Clone, Copy)]
pub enum KvCache<'a> {
    Bf16(&'a [u16]),
    Fp8 { codes: &'a [u8], scales: &'a [f32] },
}

impl KvCache<'_> {
    /// Element `i` (of KV head `kvh`) as f32.
    #[inline]
    fn get(&self, i: usize, kvh: usize) -> f32 {
        match self {
            KvCache::Bf16(c) => from_bf16(c[i]),
            KvCache::Fp8 { codes, scales } => from_e4m3(codes[i]) * scales[kvh],
        }
    }
}

pub fn to_bf16_vec(x: &[f32]) -> Vec<u16> {
    x.iter().copied().map(to_bf16).collect()
}

pub fn from_bf16_vec(x: &[u16]) -> Vec<f32> {
    x.iter().copied().map(from_bf16).collect()
}

/// Shapes of one decode-attention call.
#[derive(Debug, Clone, Copy)]
pub struct DecodeShape {
    pub layout: KvLayout,
    pub n_heads: usize,
    /// Entries per row of `block_tables`.
    pub max_blocks: usize,
    pub scale: f32,
    /// Contiguous context ranges computed independently and merged (split-KV).
    pub num_splits: usize,
}

/// Partial result of one split for one query head: normalised output, running max and
/// sum (an empty split has `l == 0`).
struct Partial {
    out: Vec<f32>,
    m: f32,
    l: f32,
}

/// `decode_attention_hd*_g*` (+ `decode_attention_merge` when `num_splits > 1`): one
/// query token per sequence against its paged context. `q`/return are
/// `[num_seqs][n_heads][hd]`, `block_tables` is `[num_seqs][max_blocks]`.
pub fn decode_attention(
    s: &DecodeShape,
    q: &[u16],
    k_cache: &[u16],
    v_cache: &[u16],
    block_tables: &[u32],
    seq_lens: &[usize],
) -> Vec<u16> {
    decode_attention_kv(
        s,
        q,
        KvCache::Bf16(k_cache),
        KvCache::Bf16(v_cache),
        block_tables,
        seq_lens,
    )
}

/// [`decode_attention`] over either cache type (`decode_attention_hd*_g*_fp8` for fp8).
pub fn decode_attention_kv(
    s: &DecodeShape,
    q: &[u16],
    k_cache: KvCache<'_>,
    v_cache: KvCache<'_>,
    block_tables: &[u32],
    seq_lens: &[usize],
) -> Vec<u16> {
    let l = &s.layout;
    let hd = l.head_dim;
    let mut out = vec![0u16; seq_lens.len() * s.n_heads * hd];
    for (seq, &len) in seq_lens.iter().enumerate() {
        let table = &block_tables[seq * s.max_blocks..(seq + 1) * s.max_blocks];
        for h in 0..s.n_heads {
            let kvh = h / (s.n_heads / l.n_kv_heads);
            let qv = from_bf16_vec(&q[(seq * s.n_heads + h) * hd..][..hd]);
            let parts: Vec<Partial> = (0..s.num_splits)
                .map(|split| decode_split(s, &qv, kvh, k_cache, v_cache, table, len, split))
                .collect();
            let o = if s.num_splits == 1 {
                parts[0].out.clone()
            } else {
                merge(&parts, hd)
            };
            out[(seq * s.n_heads + h) * hd..][..hd].copy_from_slice(&to_bf16_vec(&o));
        }
    }
    out
}

/// One split of one head: whole chunks of [`DECODE_CHUNK`] tokens, online softmax.
#[allow(clippy::too_many_arguments)]
fn decode_split(
    s: &DecodeShape,
    q: &[f32],
    kvh: usize,
    k_cache: KvCache<'_>,
    v_cache: KvCache<'_>,
    table: &[u32],
    len: usize,
    split: usize,
) -> Partial {
    let l = &s.layout;
    let hd = l.head_dim;
    let chunks_total = len.div_ceil(DECODE_CHUNK);
    let per_split = chunks_total.div_ceil(s.num_splits);
    let begin = split * per_split * DECODE_CHUNK;
    let end = len.min(begin + per_split * DECODE_CHUNK);
    let (mut m, mut sum) = (f32::NEG_INFINITY, 0.0f32);
    let mut acc = vec![0.0f32; hd];
    let mut c0 = begin;
    while c0 < end {
        let n = DECODE_CHUNK.min(end - c0);
        let scores: Vec<f32> = (c0..c0 + n)
            .map(|p| {
                let off = l.offset(l.slot(table, p), kvh);
                q.iter()
                    .enumerate()
                    .map(|(d, a)| a * k_cache.get(off + d, kvh))
                    .sum::<f32>()
                    * s.scale
            })
            .collect();
        let mc = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let m_new = m.max(mc);
        let rescale = (m - m_new).exp();
        let p: Vec<f32> = scores.iter().map(|x| (x - m_new).exp()).collect();
        sum = sum * rescale + p.iter().sum::<f32>();
        m = m_new;
        for a in acc.iter_mut() {
            *a *= rescale;
        }
        for (i, pos) in (c0..c0 + n).enumerate() {
            let off = l.offset(l.slot(table, pos), kvh);
            for (d, a) in acc.iter_mut().enumerate() {
                *a += p[i] * v_cache.get(off + d, kvh);
            }
        }
        c0 += n;
    }
    let out = if sum > 0.0 {
        acc.iter().map(|a| a / sum).collect()
    } else {
        vec![0.0; hd]
    };
    Partial { out, m, l: sum }
}

/// Log-sum-exp merge of the splits (`decode_attention_merge`).
fn merge(parts: &[Partial], hd: usize) -> Vec<f32> {
    let m = parts.iter().map(|p| p.m).fold(f32::NEG_INFINITY, f32::max);
    (0..hd)
        .map(|d| {
            let (mut num, mut den) = (0.0f32, 0.0f32);
            for p in parts.iter().filter(|p| p.l > 0.0) {
                let w = p.l * (p.m - m).exp();
                num += w * p.out[d];
                den += w;
            }
            if den > 0.0 { num / den } else { 0.0 }
        })
        .collect()
}

/// `prefill_attention_hd*`: the new tokens of each sequence (packed in `q`, sequence `s`
/// owning rows `cu_q[s]..cu_q[s + 1]`) against their causal paged context; the new
/// tokens' K/V are already in the cache. Per query the math is the decode kernel's with
/// one split; the kernel differs only in summation order and in rounding the softmax
/// weights to bf16 before P x V (both within bf16 tolerance of this).
pub fn prefill_attention(
    s: &DecodeShape,
    q: &[u16],
    k_cache: &[u16],
    v_cache: &[u16],
    block_tables: &[u32],
    cu_q: &[usize],
    seq_lens: &[usize],
) -> Vec<u16> {
    prefill_attention_kv(
        s,
        q,
        KvCache::Bf16(k_cache),
        KvCache::Bf16(v_cache),
        block_tables,
        cu_q,
        seq_lens,
    )
}

/// [`prefill_attention`] over either cache type.
pub fn prefill_attention_kv(
    s: &DecodeShape,
    q: &[u16],
    k_cache: KvCache<'_>,
    v_cache: KvCache<'_>,
    block_tables: &[u32],
    cu_q: &[usize],
    seq_lens: &[usize],
) -> Vec<u16> {
    let hd = s.layout.head_dim;
    let one = DecodeShape {
        num_splits: 1,
        ..*s
    };
    let row_len = s.n_heads * hd;
    let total = cu_q.get(seq_lens.len()).copied().unwrap_or(0);
    let mut out = vec![0u16; q.len()];
    // Every query row is independent: runs of rows go to every core (the GPU check's
    // references for thousands of rows took minutes on one), each computed exactly as a
    // single thread would.
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .clamp(1, total.max(1));
    let per = total.div_ceil(threads).max(1);
    std::thread::scope(|sc| {
        for (ci, run) in out[..total * row_len].chunks_mut(per * row_len).enumerate() {
            sc.spawn(move || {
                for (r, dst) in run.chunks_exact_mut(row_len).enumerate() {
                    let row = ci * per + r;
                    // The sequence whose new tokens include `row`.
                    let seq = cu_q[1..=seq_lens.len()].partition_point(|&end| end <= row);
                    let table = &block_tables[seq * s.max_blocks..(seq + 1) * s.max_blocks];
                    let n_new = cu_q[seq + 1] - cu_q[seq];
                    let visible = seq_lens[seq] - n_new + (row - cu_q[seq]) + 1;
                    for h in 0..s.n_heads {
                        let kvh = h / (s.n_heads / s.layout.n_kv_heads);
                        let qv = from_bf16_vec(&q[(row * s.n_heads + h) * hd..][..hd]);
                        let p = decode_split(&one, &qv, kvh, k_cache, v_cache, table, visible, 0);
                        dst[h * hd..][..hd].copy_from_slice(&to_bf16_vec(&p.out));
                    }
                }
            });
        }
    });
    out
}

/// `rms_norm`: rows of `x` (bf16) normalised and scaled by `weight` (bf16).
pub fn rms_norm(x: &[u16], weight: &[u16], dim: usize, eps: f32) -> Vec<u16> {
    let w = from_bf16_vec(weight);
    x.chunks_exact(dim)
        .flat_map(|row| {
            let r = from_bf16_vec(row);
            normed(&r, &w, eps)
        })
        .collect()
}

/// `add_rms_norm`: `residual += x` (residual f32, x bf16), returns the normalised rows.
pub fn add_rms_norm(
    residual: &mut [f32],
    x: &[u16],
    weight: &[u16],
    dim: usize,
    eps: f32,
) -> Vec<u16> {
    let w = from_bf16_vec(weight);
    let mut out = Vec::with_capacity(x.len());
    for (r, xr) in residual.chunks_exact_mut(dim).zip(x.chunks_exact(dim)) {
        for (a, b) in r.iter_mut().zip(xr) {
            *a += from_bf16(*b);
        }
        out.extend(normed(r, &w, eps));
    }
    out
}

fn normed(r: &[f32], w: &[f32], eps: f32) -> Vec<u16> {
    let ss: f32 = r.iter().map(|v| v * v).sum();
    let inv = 1.0 / (ss / r.len() as f32 + eps).sqrt();
    r.iter().zip(w).map(|(v, w)| to_bf16(v * inv * w)).collect()
}

/// `gemv`: `y[t][r] = sum_c w[r][c] * x[t][c]` over the rows of `x` (bf16 in, f32 sums,
/// bf16 out); `w` is `[rows][k]`.
pub fn gemv(w: &[u16], x: &[u16], rows: usize, k: usize) -> Vec<u16> {
    to_bf16_vec(&gemv_f32(w, x, rows, k))
}

/// `gemv` with the f32 sums (what the `gemv_add` kernels add to the residual stream).
pub fn gemv_f32(w: &[u16], x: &[u16], rows: usize, k: usize) -> Vec<f32> {
    let wf = from_bf16_vec(w);
    let mut out = Vec::with_capacity(x.len() / k.max(1) * rows);
    for xr in x.chunks_exact(k) {
        let xf = from_bf16_vec(xr);
        out.extend(
            wf.chunks_exact(k)
                .take(rows)
                .map(|wr| wr.iter().zip(&xf).map(|(a, b)| a * b).sum::<f32>()),
        );
    }
    out
}

/// `gemv_norm_late_t*` (experimental): the product with the RMS norm applied last,
/// `y[t][r] = (1 / rms(residual[t])) * sum_c w[r][c] * residual[t][c] * weight[c]` in f32,
/// nothing rounded to bf16 before the sum (`gemv_norm` rounds the normalised input as the
/// unfused path stores it).
pub fn gemv_norm_late_f32(
    w: &[u16],
    residual: &[f32],
    weight: &[u16],
    rows: usize,
    k: usize,
    eps: f32,
) -> Vec<f32> {
    let wf = from_bf16_vec(w);
    let nw = from_bf16_vec(weight);
    let mut out = Vec::with_capacity(residual.len() / k.max(1) * rows);
    for r in residual.chunks_exact(k) {
        let ss: f32 = r.iter().map(|v| v * v).sum();
        let inv = 1.0 / (ss / k as f32 + eps).sqrt();
        let x: Vec<f32> = r.iter().zip(&nw).map(|(v, w)| v * w).collect();
        out.extend(
            wf.chunks_exact(k)
                .take(rows)
                .map(|wr| wr.iter().zip(&x).map(|(a, b)| a * b).sum::<f32>() * inv),
        );
    }
    out
}

/// `rms_norm_f32`: rows of the f32 residual normalised and scaled by `weight`, as bf16
/// (also the input the `gemv_norm` kernels form).
pub fn rms_norm_f32(residual: &[f32], weight: &[u16], dim: usize, eps: f32) -> Vec<u16> {
    let w = from_bf16_vec(weight);
    residual
        .chunks_exact(dim)
        .flat_map(|r| normed(r, &w, eps))
        .collect()
}

/// `silu_and_mul`: `gate_up` rows are `[gate (inter)][up (inter)]`.
pub fn silu_and_mul(gate_up: &[u16], inter: usize) -> Vec<u16> {
    gate_up
        .chunks_exact(2 * inter)
        .flat_map(|row| {
            (0..inter).map(move |i| {
                let (g, u) = (from_bf16(row[i]), from_bf16(row[inter + i]));
                to_bf16(g / (1.0 + (-g).exp()) * u)
            })
        })
        .collect()
}

/// Shapes and table of one `rope_write_kv` call.
pub struct RopeShape<'a> {
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub rot_dim: usize,
    pub style: RopeStyle,
    /// `[max_pos][rot_dim / 2]`.
    pub cos: &'a [f32],
    pub sin: &'a [f32],
}

impl RopeShape<'_> {
    /// Rotation pair `i` of a bf16 head at `pos`: each index with its rotated value in f32
    /// (products and difference rounded separately, no fused multiply-add).
    fn rotate_pair(&self, head: &[u16], pos: usize, i: usize) -> ((usize, f32), (usize, f32)) {
        let half = self.rot_dim / 2;
        let (a, b) = match self.style {
            RopeStyle::Interleaved => (2 * i, 2 * i + 1),
            RopeStyle::Half => (i, i + half),
        };
        let (c, sn) = (self.cos[pos * half + i], self.sin[pos * half + i]);
        let (x, y) = (from_bf16(head[a]), from_bf16(head[b]));
        ((a, x * c - y * sn), (b, x * sn + y * c))
    }

    /// Rotates a bf16 head in place, each value rounded to bf16.
    fn rotate_bf16(&self, head: &mut [u16], pos: usize) {
        for i in 0..self.rot_dim / 2 {
            let ((a, ra), (b, rb)) = self.rotate_pair(head, pos, i);
            head[a] = to_bf16(ra);
            head[b] = to_bf16(rb);
        }
    }
}

/// `rope_write_kv`: `qkv` rows (`stride` elements each) hold q `[n_heads][hd]`, k and v
/// `[n_kv_heads][hd]`; q is rotated in place, rotated k and plain v go to the cache at
/// each token's slot (tokens with a negative slot are not stored); k stays as it is in
/// `qkv`.
pub fn rope_write_kv(
    s: &RopeShape,
    qkv: &mut [u16],
    stride: usize,
    positions: &[usize],
    slots: &[i64],
    k_cache: &mut [u16],
    v_cache: &mut [u16],
) {
    let hd = s.head_dim;
    let (qd, kv) = (s.n_heads * hd, s.n_kv_heads * hd);
    for (t, (&pos, &slot)) in positions.iter().zip(slots).enumerate() {
        let row = &mut qkv[t * stride..t * stride + qd + 2 * kv];
        for head in row[..qd].chunks_exact_mut(hd) {
            s.rotate_bf16(head, pos);
        }
        let Ok(slot) = usize::try_from(slot) else {
            continue;
        };
        let mut kt = row[qd..qd + kv].to_vec();
        for head in kt.chunks_exact_mut(hd) {
            s.rotate_bf16(head, pos);
        }
        k_cache[slot * kv..(slot + 1) * kv].copy_from_slice(&kt);
        v_cache[slot * kv..(slot + 1) * kv].copy_from_slice(&row[qd + kv..qd + 2 * kv]);
    }
}

/// The order of a head's dimensions that turns half-style RoPE pairs `(i, i + rot/2)`
/// into interleaved pairs `(2i, 2i + 1)`: new dimension `j` is old dimension
/// `order[j]` (dimensions from `rot_dim` on stay). q and k rows permuted alike give the
/// same attention scores (a dot product does not see the order), so a model's q|k
/// weight rows permuted this way run with interleaved RoPE (`gemv_norm_rope_t*`).
pub fn half_to_interleaved_order(head_dim: usize, rot_dim: usize) -> Vec<usize> {
    let half = rot_dim / 2;
    (0..head_dim)
        .map(|j| match j {
            j if j >= rot_dim => j,
            j if j % 2 == 0 => j / 2,
            j => j / 2 + half,
        })
        .collect()
}

/// Fused q|k|v weight rows (`[n_heads + 2 n_kv_heads][head_dim]` rows of `cols`) with
/// every q and k head's rows put in [`half_to_interleaved_order`]; v rows unchanged.
pub fn interleave_qk_rows(
    w: &[u16],
    cols: usize,
    n_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
    rot_dim: usize,
) -> Vec<u16> {
    let order = half_to_interleaved_order(head_dim, rot_dim);
    let qk_heads = n_heads + n_kv_heads;
    let mut out = Vec::with_capacity(w.len());
    for (h, head) in w.chunks(head_dim * cols).enumerate() {
        if h < qk_heads {
            for &o in &order {
                out.extend_from_slice(&head[o * cols..(o + 1) * cols]);
            }
        } else {
            out.extend_from_slice(head);
        }
    }
    out
}

/// `rope_write_kv_fp8`: [`rope_write_kv`] into an e4m3 cache, K and V divided by their KV
/// head's scale (`k_scale`, `v_scale`) before rounding; each rotated K value is rounded
/// once, from f32.
#[allow(clippy::too_many_arguments)]
pub fn rope_write_kv_fp8(
    s: &RopeShape,
    qkv: &mut [u16],
    stride: usize,
    positions: &[usize],
    slots: &[i64],
    k_cache: &mut [u8],
    v_cache: &mut [u8],
    k_scale: &[f32],
    v_scale: &[f32],
) {
    let hd = s.head_dim;
    let (qd, kv) = (s.n_heads * hd, s.n_kv_heads * hd);
    for (t, (&pos, &slot)) in positions.iter().zip(slots).enumerate() {
        let row = &mut qkv[t * stride..t * stride + qd + 2 * kv];
        for head in row[..qd].chunks_exact_mut(hd) {
            s.rotate_bf16(head, pos);
        }
        let Ok(slot) = usize::try_from(slot) else {
            continue;
        };
        for h in 0..s.n_kv_heads {
            let k = &row[qd + h * hd..qd + (h + 1) * hd];
            let dst = &mut k_cache[slot * kv + h * hd..slot * kv + (h + 1) * hd];
            for d in s.rot_dim..hd {
                dst[d] = to_e4m3(from_bf16(k[d]) / k_scale[h]);
            }
            for i in 0..s.rot_dim / 2 {
                let ((a, ra), (b, rb)) = s.rotate_pair(k, pos, i);
                dst[a] = to_e4m3(ra / k_scale[h]);
                dst[b] = to_e4m3(rb / k_scale[h]);
            }
            let v = &row[qd + kv + h * hd..qd + kv + (h + 1) * hd];
            for (o, &x) in v_cache[slot * kv + h * hd..slot * kv + (h + 1) * hd]
                .iter_mut()
                .zip(v)
            {
                *o = to_e4m3(from_bf16(x) / v_scale[h]);
            }
        }
    }
}

/// `embed_rows`: the embedding rows of `ids` (bf16 table `[vocab][hidden]`).
pub fn embed_rows(table: &[u16], ids: &[u32], hidden: usize) -> Vec<u16> {
    ids.iter()
        .flat_map(|&i| {
            table[i as usize * hidden..(i as usize + 1) * hidden]
                .iter()
                .copied()
        })
        .collect()
}

/// `argmax_rows`: per row, the greedy pick of the worker's sampler: NaN counts as `-inf`,
/// `+inf` as `f32::MAX`, and the lowest index of the largest value wins (0 when every
/// value is `-inf` or NaN).
pub fn argmax_rows(logits: &[f32], vocab: usize) -> Vec<u32> {
    logits
        .chunks_exact(vocab)
        .map(|row| {
            let clean = |v: f32| {
                if v.is_nan() {
                    f32::NEG_INFINITY
                } else {
                    v.min(f32::MAX)
                }
            };
            let mut best = 0;
            let mut best_v = f32::NEG_INFINITY;
            for (i, &v) in row.iter().enumerate() {
                let v = clean(v);
                if v > best_v {
                    best = i;
                    best_v = v;
                }
            }
            best as u32
        })
        .collect()
}

/// `softmax_rows`: probabilities of `logits / temperature`, per row.
pub fn softmax_rows(logits: &[f32], vocab: usize, temperature: f32) -> Vec<f32> {
    logits
        .chunks_exact(vocab)
        .flat_map(|row| {
            let scaled: Vec<f32> = row.iter().map(|x| x * (1.0 / temperature)).collect();
            let mut p = scaled;
            crate::cpu::softmax_in_place(&mut p);
            p
        })
        .collect()
}

/// `sample_rows`' parameters of one row: `inv_t` (1 / temperature; 0 = the greedy pick),
/// `min_w` (weights below it are dropped: min-p), `u` (the draw, in `[0, 1)`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SampleParams {
    pub inv_t: f32,
    pub min_w: f32,
    pub u: f64,
}

impl SampleParams {
    /// As the kernel reads them: four f32 a row, `u` as its f32 rounding and the rest
    /// (their f64 sum is `u` to 48 bits, and below 1).
    pub fn to_device(rows: &[SampleParams]) -> Vec<f32> {
        rows.iter()
            .flat_map(|p| {
                let hi = p.u as f32;
                [p.inv_t, p.min_w, hi, (p.u - f64::from(hi)) as f32]
            })
            .collect()
    }

    /// `u` as the kernel rebuilds it.
    pub fn device_u(&self) -> f64 {
        let hi = self.u as f32;
        f64::from(hi) + f64::from((self.u - f64::from(hi)) as f32)
    }
}

/// `sample_rows`' fixed point: weights in units of 2^-42 (a vocabulary below 2^22 tokens
/// of weight at most 1 sums within 64 bits; the launcher refuses larger ones).
const FIXED_ONE: f32 = 4_398_046_511_104.0;

/// A kept weight in fixed point, rounded to nearest even (0 when under `min_w`).
pub fn fixed_weight(w: f32, min_w: f32) -> u64 {
    if w >= min_w {
        (w * FIXED_ONE).round_ties_even() as u64
    } else {
        0
    }
}

/// The sampler's weight of a sanitized logit: `exp((l - max) * inv_t)`, 0 below `e^-87`.
pub fn sample_weight(l: f32, max: f32, inv_t: f32) -> f32 {
    let x = (l - max) * inv_t;
    if x >= -87.0 { x.exp() } else { 0.0 }
}

/// `sample_rows`: per row, the token drawn as the worker sampler's dense draw does (see
/// `sampling.cu`): the kept weights in fixed point ([`fixed_weight`], exact integer
/// sums), target `u x total`, the first token in id order whose running sum exceeds it;
/// and the row's (sanitized maximum, f32 sum of all weights, in the kernel's order). The
/// kernel's `expf` and this `exp` may differ in the last bit, so a draw whose target lies
/// within rounding of a boundary between two tokens may go either way
/// ([`sample_interval`] tells how close it was).
pub fn sample_rows(
    logits: &[f32],
    vocab: usize,
    params: &[SampleParams],
) -> (Vec<u32>, Vec<(f32, f32)>) {
    const T: usize = 1024;
    let mut ids = Vec::with_capacity(params.len());
    let mut stats = Vec::with_capacity(params.len());
    for (row, p) in logits.chunks_exact(vocab).zip(params) {
        let clean: Vec<f32> = row.iter().map(|&v| sanitize_logit(v)).collect();
        let mut best = 0usize;
        let mut mx = f32::NEG_INFINITY;
        for (i, &v) in clean.iter().enumerate() {
            if v > mx {
                best = i;
                mx = v;
            }
        }
        if p.inv_t == 0.0 || mx == f32::NEG_INFINITY {
            ids.push(best as u32);
            stats.push((mx, 0.0));
            continue;
        }
        let w = |i: usize| sample_weight(clean[i], mx, p.inv_t);
        let per = vocab.div_ceil(32 * T).max(1);
        let tile = 32 * per;
        let ntiles = vocab.div_ceil(tile);
        let mut tiles = vec![0u64; ntiles];
        let mut per_warp = [0f32; 32];
        for (j, t) in tiles.iter_mut().enumerate() {
            let mut a = [0f32; 32];
            for e in 0..per {
                for (lane, a) in a.iter_mut().enumerate() {
                    let i = j * tile + 32 * e + lane;
                    if i < vocab {
                        *a += w(i);
                        *t += fixed_weight(w(i), p.min_w);
                    }
                }
            }
            // Warp j % 32 adds tile j to its own sum; lane 0 adds the warps' sums in order.
            per_warp[j % 32] += warp_sum(a);
        }
        let all = per_warp.iter().fold(0f32, |s, &x| s + x);
        let total: u64 = tiles.iter().sum();
        let target = ((p.device_u() * total as f64) as u64).min(total.saturating_sub(1));
        let (mut found, mut last) = (None, None);
        let mut acc = 0u64;
        'walk: for i in 0..vocab {
            let q = fixed_weight(w(i), p.min_w);
            if q > 0 {
                acc += q;
                last = Some(i);
                if acc > target {
                    found = Some(i);
                    break 'walk;
                }
            }
        }
        ids.push(found.or(last).unwrap_or(best) as u32);
        stats.push((mx, all));
    }
    (ids, stats)
}

/// The kernel's butterfly sum of 32 lanes (`warp_sum`).
fn warp_sum(mut v: [f32; 32]) -> f32 {
    let mut off = 16;
    while off > 0 {
        let prev = v;
        for (l, x) in v.iter_mut().enumerate() {
            *x += prev[l ^ off];
        }
        off >>= 1;
    }
    v[0]
}

/// For a dense draw of `row` with `p`: the f64 target `u * total` and the f64 running-sum
/// interval `[lo, hi)` of token `id` (in id order, over the kept weights), all divided by
/// the total; `None` if `id` has no kept weight. A pick is right when the target lies in
/// its interval, up to rounding.
pub fn sample_interval(row: &[f32], p: &SampleParams, id: usize) -> Option<(f64, f64, f64)> {
    let clean: Vec<f32> = row.iter().map(|&v| sanitize_logit(v)).collect();
    let mx = clean.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let w: Vec<f64> = clean
        .iter()
        .map(|&l| {
            let x = f64::from(sample_weight(l, mx, p.inv_t));
            if x >= f64::from(p.min_w) { x } else { 0.0 }
        })
        .collect();
    let total: f64 = w.iter().sum();
    if w.get(id).is_none_or(|&x| x == 0.0) {
        return None;
    }
    let lo: f64 = w[..id].iter().sum();
    Some((p.u, lo / total, (lo + w[id]) / total))
}

/// `apply_penalties`: for each entry (row, token) with its amount, the logit divided by
/// the row's repetition penalty if positive, else multiplied by it (penalty 1: left
/// alone), then the amount subtracted.
pub fn apply_penalties(
    logits: &mut [f32],
    vocab: usize,
    entries: &[(usize, usize)],
    subtract: &[f32],
    rep: &[f32],
) {
    for (&(row, tok), &sub) in entries.iter().zip(subtract) {
        let l = &mut logits[row * vocab + tok];
        let r = rep[row];
        let x = if r != 1.0 {
            if *l > 0.0 { *l / r } else { *l * r }
        } else {
            *l
        };
        *l = x - sub;
    }
}

/// Largest `k` of `topk_rows`.
pub const TOPK_MAX: usize = 1024;

/// A logit as the sampler sees it: NaN -> -inf, +inf -> `f32::MAX`.
pub fn sanitize_logit(v: f32) -> f32 {
    if v.is_nan() {
        f32::NEG_INFINITY
    } else if v == f32::INFINITY {
        f32::MAX
    } else {
        v
    }
}

/// `topk_rows`: per row, the `k` best tokens by the sampler's rank (larger sanitized
/// logit first by `total_cmp`, equal logits by lower id), as (logits, ids) in rank order,
/// `k` per row.
pub fn topk_rows(logits: &[f32], vocab: usize, k: usize) -> (Vec<f32>, Vec<i32>) {
    let mut vals = Vec::with_capacity(k * logits.len() / vocab.max(1));
    let mut ids = Vec::with_capacity(vals.capacity());
    for row in logits.chunks_exact(vocab) {
        let mut r: Vec<(f32, i32)> = row
            .iter()
            .enumerate()
            .map(|(i, &v)| (sanitize_logit(v), i as i32))
            .collect();
        r.sort_unstable_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        for &(v, i) in &r[..k.min(vocab)] {
            vals.push(v);
            ids.push(i);
        }
    }
    (vals, ids)
}

#[cfg(test)]
mod tests;
