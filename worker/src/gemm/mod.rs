//! CPU matrix multiplication of quantized weights with f32 activations.
//!
//! Rows of the weight matrix are decoded in small tiles into an f32 buffer that stays in
//! cache, then register-blocked microkernels multiply the tile with up to four
//! activation vectors at a time, so one weight load feeds several FMAs and every weight
//! block is decoded once per step whatever the batch.
//!
//! **Batch invariance.** Every output element `out[t][r]` is computed by the same
//! sequence of operations whatever the batch size or the microkernel shape: one 8-lane
//! FMA accumulator advancing over the columns in order, a fixed horizontal sum, then the
//! column tail in order. A request's logits are therefore bit-identical alone and batched
//! (tested), and the portable fallback gives the same bits as the AVX2 path.

#[cfg(target_arch = "x86_64")]
mod avx512;

use std::cell::RefCell;

use rayon::prelude::*;

use crate::model::Matrix;
use crate::quant;

thread_local! {
    /// Decoded weight tile and its results, per pool thread (reused across calls).
    static TILE: RefCell<(Vec<f32>, Vec<f32>)> = const { RefCell::new((Vec::new(), Vec::new())) };
}

/// Rows per fused decode kernel call (independent accumulator chains).
#[cfg(target_arch = "x86_64")]
const FUSED_ROWS: usize = 8;

/// Rows decoded per tile: small enough for the tile to stay in L1/L2.
fn tile_rows(cols: usize) -> usize {
    if cols <= 1024 { 16 } else { 8 }
}

/// `out[t][r] = sum_c m[r][c] * xs[t][c]`; `xs` is `[n_tokens][cols]`, `out` is
/// `[n_tokens][rows]`. Runs on the current rayon pool.
pub fn matmul(m: &Matrix, xs: &[f32], n_tokens: usize, out: &mut [f32]) {
    assert_eq!(xs.len(), n_tokens * m.cols, "matmul: activation shape");
    assert_eq!(out.len(), n_tokens * m.rows, "matmul: output shape");
    let cols = m.cols;
    #[cfg(target_arch = "x86_64")]
    let wide = avx2::fused_supported(m.ty) && avx512::available();
    #[cfg(target_arch = "x86_64")]
    if n_tokens == 1 && avx2::fused_supported(m.ty) && !wide {
        // Decode: no tile, weight blocks decoded in registers right before their FMAs
        // (same values, same accumulation order as the tiled path).
        out.par_chunks_mut(FUSED_ROWS)
            .enumerate()
            .for_each(|(ti, o)| {
                let r0 = ti * FUSED_ROWS;
                if o.len() == FUSED_ROWS {
                    let rows: [&[u8]; FUSED_ROWS] = std::array::from_fn(|i| m.row(r0 + i));
                    // SAFETY: fused_supported checked the CPU features; rows hold `cols` elements.
                    o.copy_from_slice(&unsafe { avx2::fused_rows::<FUSED_ROWS>(m.ty, &rows, xs) });
                } else {
                    for (i, v) in o.iter_mut().enumerate() {
                        // SAFETY: as above.
                        *v = unsafe { avx2::fused_rows::<1>(m.ty, &[m.row(r0 + i)], xs) }[0];
                    }
                }
            });
        return;
    }
    let rows = m.rows;
    let dst = SharedOut(out.as_mut_ptr());
    #[cfg(target_arch = "x86_64")]
    if avx2::fused_supported(m.ty) {
        // Batched decode of Q4_0/Q4_1/Q8_0: blocks decoded in registers, 8 tokens per pass.
        let x_rows: Vec<&[f32]> = xs.chunks_exact(cols).collect();
        // Accumulators a kernel may keep live: 8 ymm with AVX2, 16 zmm with AVX-512.
        let (chunk, live) = if wide { (16, 16) } else { (FUSED_ROWS, 8) };
        (0..rows.div_ceil(chunk)).into_par_iter().for_each(|ci| {
            let r0 = ci * chunk;
            let nr = chunk.min(rows - r0);
            let mut t = 0;
            while t < n_tokens {
                let group = match n_tokens - t {
                    n if n >= 8 => 8,
                    n if n >= 4 => 4,
                    n if n >= 2 => 2,
                    _ => 1,
                };
                let mut r = 0;
                while r < nr {
                    let mr = (live / group).min(nr - r);
                    let block = FusedBlock {
                        m,
                        r0: r0 + r,
                        mr,
                        t0: t,
                        k: cols,
                        rows,
                        dst: &dst,
                    };
                    // SAFETY: features checked; rows and vectors hold `cols` elements; every
                    // written index is < out.len() and owned by this row chunk.
                    unsafe { block.run(wide, &x_rows[t..t + group]) };
                    r += mr;
                }
                t += group;
            }
        });
        return;
    }
    let tr = tile_rows(cols);
    (0..rows.div_ceil(tr)).into_par_iter().for_each(|ti| {
        TILE.with_borrow_mut(|(tile, o)| {
            let r0 = ti * tr;
            let nr = tr.min(rows - r0);
            tile.resize(nr * cols, 0.0);
            for (i, row) in tile.chunks_exact_mut(cols).enumerate() {
                quant::dequantize_row_fast(m.ty, m.row(r0 + i), row);
            }
            o.resize(nr * n_tokens, 0.0);
            tile_product(tile, nr, xs, n_tokens, cols, o);
            for i in 0..nr {
                for t in 0..n_tokens {
                    // SAFETY: index < n_tokens * rows = out.len(); tiles cover disjoint rows,
                    // so no two tasks write the same element, and `out` outlives the loop.
                    unsafe { *dst.get().add(t * rows + r0 + i) = o[i * n_tokens + t] };
                }
            }
        })
    });
}

/// `mr` rows from `r0` against 1, 2, 4 or 8 token vectors (tokens `t0..`), written into
/// `out[t][r]`.
#[cfg(target_arch = "x86_64")]
struct FusedBlock<'a> {
    m: &'a Matrix,
    r0: usize,
    mr: usize,
    t0: usize,
    k: usize,
    rows: usize,
    dst: &'a SharedOut,
}

#[cfg(target_arch = "x86_64")]
impl FusedBlock<'_> {
    /// # Safety
    /// `avx2::fused_supported(m.ty)` (and `avx512::available()` when `wide`); the caller
    /// owns rows `r0..r0 + mr` of the output.
    unsafe fn run(&self, wide: bool, xs: &[&[f32]]) {
        let (mr, n) = (self.mr, xs.len());
        if wide {
            // At most 16 zmm accumulators live.
            match (mr, n) {
                (2, 8) => self.go::<2, 8>(0, xs, true),
                (4, 4) => self.go::<4, 4>(0, xs, true),
                (8, 2) => self.go::<8, 2>(0, xs, true),
                (16, 1) => (0..4).for_each(|i| self.go::<4, 1>(4 * i, xs, true)),
                (_, 8) => (0..mr).for_each(|i| self.go::<1, 8>(i, xs, true)),
                (_, 4) => (0..mr).for_each(|i| self.go::<1, 4>(i, xs, true)),
                (_, 2) => (0..mr).for_each(|i| self.go::<1, 2>(i, xs, true)),
                _ => (0..mr).for_each(|i| self.go::<1, 1>(i, xs, true)),
            }
        } else {
            // At most 8 ymm accumulators live.
            match (mr, n) {
                (1, 8) => self.go::<1, 8>(0, xs, false),
                (2, 4) => self.go::<2, 4>(0, xs, false),
                (4, 2) => self.go::<4, 2>(0, xs, false),
                (8, 1) => self.go::<8, 1>(0, xs, false),
                (_, 4) => (0..mr).for_each(|i| self.go::<1, 4>(i, xs, false)),
                (_, 2) => (0..mr).for_each(|i| self.go::<1, 2>(i, xs, false)),
                _ => (0..mr).for_each(|i| self.go::<1, 1>(i, xs, false)),
            }
        }
    }

    /// Rows `r0 + i ..+ MR` against the `NR` vectors.
    fn go<const MR: usize, const NR: usize>(&self, i: usize, xs: &[&[f32]], wide: bool) {
        let r0 = self.r0 + i;
        let w: [&[u8]; MR] = std::array::from_fn(|a| self.m.row(r0 + a));
        let x: [&[f32]; NR] = std::array::from_fn(|j| xs[j]);
        // SAFETY: `run`'s contract covers the features; slices hold `k` elements.
        let res = unsafe {
            if wide {
                avx512::multi::<MR, NR>(self.m.ty, &w, &x, self.k)
            } else {
                avx2::fused_multi::<MR, NR>(self.m.ty, &w, &x, self.k)
            }
        };
        for (a, row) in res.iter().enumerate() {
            for (j, v) in row.iter().enumerate() {
                // SAFETY: index < out.len(); these rows belong to the calling task.
                unsafe { *self.dst.get().add((self.t0 + j) * self.rows + r0 + a) = *v };
            }
        }
    }
}

/// The output pointer shared by tasks that write disjoint elements.
struct SharedOut(*mut f32);
// SAFETY: only used for writes to disjoint indices while the owning slice is borrowed.
unsafe impl Sync for SharedOut {}
impl SharedOut {
    fn get(&self) -> *mut f32 {
        self.0
    }
}

/// `o[r][t] = dot(w[r], x[t])` for a decoded tile `w` (`nr` rows of `k`).
pub fn tile_product(w: &[f32], nr: usize, x: &[f32], nt: usize, k: usize, o: &mut [f32]) {
    let mut t = 0;
    // Token groups of 4 against row pairs, then 2 against 4 rows, then 1 against 8 rows.
    while t < nt {
        let group = match nt - t {
            n if n >= 4 => 4,
            n if n >= 2 => 2,
            _ => 1,
        };
        let mr = 8 / group;
        let mut r = 0;
        while r < nr {
            let rows = mr.min(nr - r);
            match (group, rows) {
                (4, 2) => kernel::<2, 4>(w, r, x, t, k, nt, o),
                (2, 4) => kernel::<4, 2>(w, r, x, t, k, nt, o),
                (1, 8) => kernel::<8, 1>(w, r, x, t, k, nt, o),
                // Leftover rows one at a time (same arithmetic, fewer registers busy).
                (4, _) => (0..rows).for_each(|i| kernel::<1, 4>(w, r + i, x, t, k, nt, o)),
                (2, _) => (0..rows).for_each(|i| kernel::<1, 2>(w, r + i, x, t, k, nt, o)),
                _ => (0..rows).for_each(|i| kernel::<1, 1>(w, r + i, x, t, k, nt, o)),
            }
            r += rows;
        }
        t += group;
    }
}

/// Rows `r0..r0+MR` against tokens `t0..t0+NR`, written into `o[r][t]` (`nt` per row).
#[inline(always)]
fn kernel<const MR: usize, const NR: usize>(
    w: &[f32],
    r0: usize,
    x: &[f32],
    t0: usize,
    k: usize,
    nt: usize,
    o: &mut [f32],
) {
    let wr: [&[f32]; MR] = std::array::from_fn(|i| &w[(r0 + i) * k..(r0 + i + 1) * k]);
    let xr: [&[f32]; NR] = std::array::from_fn(|j| &x[(t0 + j) * k..(t0 + j + 1) * k]);
    let res = micro::<MR, NR>(&wr, &xr, k);
    for i in 0..MR {
        for j in 0..NR {
            o[(r0 + i) * nt + t0 + j] = res[i][j];
        }
    }
}

#[inline(always)]
fn micro<const MR: usize, const NR: usize>(
    w: &[&[f32]; MR],
    x: &[&[f32]; NR],
    k: usize,
) -> [[f32; NR]; MR] {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the features were detected; slices are `k` long (checked by callers'
            // construction and asserted in debug builds).
            return unsafe { avx2::micro::<MR, NR>(w, x, k) };
        }
    }
    portable::<MR, NR>(w, x, k)
}

/// The reference order: 8 lanes of FMA over columns, `hsum8`, then the tail in order.
fn portable<const MR: usize, const NR: usize>(
    w: &[&[f32]; MR],
    x: &[&[f32]; NR],
    k: usize,
) -> [[f32; NR]; MR] {
    let kv = k / 8 * 8;
    let mut out = [[0.0f32; NR]; MR];
    for i in 0..MR {
        for j in 0..NR {
            let mut acc = [0.0f32; 8];
            for c in (0..kv).step_by(8) {
                for l in 0..8 {
                    acc[l] = w[i][c + l].mul_add(x[j][c + l], acc[l]);
                }
            }
            let mut s = hsum8(&acc);
            for c in kv..k {
                s = w[i][c].mul_add(x[j][c], s);
            }
            out[i][j] = s;
        }
    }
    out
}

/// Horizontal sum in the order the AVX2 path uses.
#[inline(always)]
fn hsum8(a: &[f32; 8]) -> f32 {
    let q = [a[0] + a[4], a[1] + a[5], a[2] + a[6], a[3] + a[7]];
    let h = [q[0] + q[2], q[1] + q[3]];
    h[0] + h[1]
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use crate::quant::GgmlType;
    use crate::quant::avx2::{f16_splat, i8x8_ps, ps, u8x8};

    pub fn fused_supported(ty: GgmlType) -> bool {
        matches!(ty, GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q8_0)
            && crate::quant::avx2::available()
    }

    /// One 32-element block decoded exactly as `quant::dequantize_row_fast` does.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn decode32<const KIND: u8>(b: *const u8) -> [__m256; 4] {
        // SAFETY: `b` points at one whole block (caller contract).
        unsafe {
            let d = f16_splat(*b, *b.add(1));
            match KIND {
                0 => [
                    _mm256_mul_ps(i8x8_ps(b.add(2)), d),
                    _mm256_mul_ps(i8x8_ps(b.add(10)), d),
                    _mm256_mul_ps(i8x8_ps(b.add(18)), d),
                    _mm256_mul_ps(i8x8_ps(b.add(26)), d),
                ],
                1 => {
                    let m = f16_splat(*b.add(2), *b.add(3));
                    let m4 = _mm256_set1_epi32(0x0F);
                    let (v0, v1) = (u8x8(b.add(4)), u8x8(b.add(12)));
                    let e = [
                        _mm256_and_si256(v0, m4),
                        _mm256_and_si256(v1, m4),
                        _mm256_srli_epi32::<4>(v0),
                        _mm256_srli_epi32::<4>(v1),
                    ];
                    [
                        _mm256_add_ps(_mm256_mul_ps(ps(e[0]), d), m),
                        _mm256_add_ps(_mm256_mul_ps(ps(e[1]), d), m),
                        _mm256_add_ps(_mm256_mul_ps(ps(e[2]), d), m),
                        _mm256_add_ps(_mm256_mul_ps(ps(e[3]), d), m),
                    ]
                }
                _ => {
                    let m4 = _mm256_set1_epi32(0x0F);
                    let bias = _mm256_set1_epi32(8);
                    let (v0, v1) = (u8x8(b.add(2)), u8x8(b.add(10)));
                    let e = [
                        _mm256_and_si256(v0, m4),
                        _mm256_and_si256(v1, m4),
                        _mm256_srli_epi32::<4>(v0),
                        _mm256_srli_epi32::<4>(v1),
                    ];
                    [
                        _mm256_mul_ps(ps(_mm256_sub_epi32(e[0], bias)), d),
                        _mm256_mul_ps(ps(_mm256_sub_epi32(e[1], bias)), d),
                        _mm256_mul_ps(ps(_mm256_sub_epi32(e[2], bias)), d),
                        _mm256_mul_ps(ps(_mm256_sub_epi32(e[3], bias)), d),
                    ]
                }
            }
        }
    }

    /// `R` quantized rows against one activation vector, decoding in registers.
    ///
    /// # Safety
    /// AVX2/FMA/F16C available (`fused_supported`); each row holds `x.len()` elements.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn fused_rows<const R: usize>(
        ty: GgmlType,
        rows: &[&[u8]; R],
        x: &[f32],
    ) -> [f32; R] {
        // SAFETY: forwarded contract.
        unsafe {
            match ty {
                GgmlType::Q8_0 => fused::<R, 0>(rows, x, 34),
                GgmlType::Q4_1 => fused::<R, 1>(rows, x, 20),
                _ => fused::<R, 2>(rows, x, 18),
            }
        }
    }

    /// `MR` quantized rows against `NR` activation vectors, decoding each weight block in
    /// registers right before its FMAs. Per output element the arithmetic is the tiled
    /// path's: one 8-lane accumulator over the columns in order, then `hsum`.
    ///
    /// # Safety
    /// AVX2/FMA/F16C available (`fused_supported`); each row and vector holds `k` elements.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn fused_multi<const MR: usize, const NR: usize>(
        ty: GgmlType,
        rows: &[&[u8]; MR],
        xs: &[&[f32]; NR],
        k: usize,
    ) -> [[f32; NR]; MR] {
        // SAFETY: forwarded contract.
        unsafe {
            match ty {
                GgmlType::Q8_0 => multi::<MR, NR, 0>(rows, xs, k, 34),
                GgmlType::Q4_1 => multi::<MR, NR, 1>(rows, xs, k, 20),
                _ => multi::<MR, NR, 2>(rows, xs, k, 18),
            }
        }
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn multi<const MR: usize, const NR: usize, const KIND: u8>(
        rows: &[&[u8]; MR],
        xs: &[&[f32]; NR],
        k: usize,
        ts: usize,
    ) -> [[f32; NR]; MR] {
        let nb = k / 32;
        let mut acc = [[_mm256_setzero_ps(); NR]; MR];
        for blk in 0..nb {
            for i in 0..MR {
                // SAFETY: block `blk` exists in every row (`ts` bytes) and vector (32 floats).
                unsafe {
                    let w = decode32::<KIND>(rows[i].as_ptr().add(blk * ts));
                    for j in 0..NR {
                        let xb = xs[j].as_ptr().add(32 * blk);
                        for (q, wq) in w.iter().enumerate() {
                            acc[i][j] =
                                _mm256_fmadd_ps(*wq, _mm256_loadu_ps(xb.add(8 * q)), acc[i][j]);
                        }
                    }
                }
            }
        }
        let mut out = [[0.0f32; NR]; MR];
        for i in 0..MR {
            for j in 0..NR {
                out[i][j] = hsum(acc[i][j]);
            }
        }
        out
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn fused<const R: usize, const KIND: u8>(
        rows: &[&[u8]; R],
        x: &[f32],
        ts: usize,
    ) -> [f32; R] {
        let nb = x.len() / 32;
        let mut acc = [_mm256_setzero_ps(); R];
        let xp = x.as_ptr();
        for blk in 0..nb {
            // SAFETY: block `blk` exists in x (32 floats) and in every row (`ts` bytes).
            unsafe {
                let xb = xp.add(32 * blk);
                let xv = [
                    _mm256_loadu_ps(xb),
                    _mm256_loadu_ps(xb.add(8)),
                    _mm256_loadu_ps(xb.add(16)),
                    _mm256_loadu_ps(xb.add(24)),
                ];
                for i in 0..R {
                    // Rows are read in lockstep: prefetch ahead so eight interleaved streams
                    // still keep memory busy (hardware prefetchers track them poorly).
                    if blk + 8 < nb {
                        _mm_prefetch::<_MM_HINT_T0>(rows[i].as_ptr().add((blk + 8) * ts).cast());
                    }
                    let w = decode32::<KIND>(rows[i].as_ptr().add(blk * ts));
                    for q in 0..4 {
                        acc[i] = _mm256_fmadd_ps(w[q], xv[q], acc[i]);
                    }
                }
            }
        }
        let mut out = [0.0f32; R];
        for i in 0..R {
            out[i] = hsum(acc[i]);
        }
        out
    }

    #[target_feature(enable = "avx2,fma")]
    #[inline]
    fn hsum(v: __m256) -> f32 {
        let lo = _mm256_castps256_ps128(v);
        let hi = _mm256_extractf128_ps::<1>(v);
        let q = _mm_add_ps(lo, hi); // [a0+a4, a1+a5, a2+a6, a3+a7]
        let h = _mm_add_ps(q, _mm_movehl_ps(q, q)); // [q0+q2, q1+q3, ..]
        _mm_cvtss_f32(_mm_add_ss(h, _mm_shuffle_ps::<0b01>(h, h)))
    }

    /// # Safety
    /// AVX2 and FMA must be available; every slice must be at least `k` long.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn micro<const MR: usize, const NR: usize>(
        w: &[&[f32]; MR],
        x: &[&[f32]; NR],
        k: usize,
    ) -> [[f32; NR]; MR] {
        debug_assert!(w.iter().all(|r| r.len() >= k) && x.iter().all(|r| r.len() >= k));
        let kv = k / 8 * 8;
        let wp: [*const f32; MR] = std::array::from_fn(|i| w[i].as_ptr());
        let xp: [*const f32; NR] = std::array::from_fn(|j| x[j].as_ptr());
        let mut acc = [[_mm256_setzero_ps(); NR]; MR];
        let mut c = 0;
        while c < kv {
            // SAFETY: c + 8 <= kv <= k <= every slice's length.
            let mut xv = [_mm256_setzero_ps(); NR];
            for j in 0..NR {
                // SAFETY: c + 8 <= kv <= k <= every slice's length.
                xv[j] = unsafe { _mm256_loadu_ps(xp[j].add(c)) };
            }
            for i in 0..MR {
                let wv = unsafe { _mm256_loadu_ps(wp[i].add(c)) };
                for j in 0..NR {
                    acc[i][j] = _mm256_fmadd_ps(wv, xv[j], acc[i][j]);
                }
            }
            c += 8;
        }
        let mut out = [[0.0f32; NR]; MR];
        for i in 0..MR {
            for j in 0..NR {
                let mut s = hsum(acc[i][j]);
                for cc in kv..k {
                    s = w[i][cc].mul_add(x[j][cc], s);
                }
                out[i][j] = s;
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(n: usize, seed: u32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(2654435761).wrapping_add(1);
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                (s % 2001) as f32 / 1000.0 - 1.0
            })
            .collect()
    }

    #[test]
    fn every_batch_size_gives_the_same_bits_as_batch_one() {
        for (rows, cols) in [(37, 64), (16, 576), (9, 1536), (5, 13)] {
            let w = data(rows * cols, 1);
            let m = Matrix::from_f32("w", rows, cols, &w);
            let xs = data(9 * cols, 2);
            let mut single = vec![0.0; 9 * rows];
            for t in 0..9 {
                matmul(
                    &m,
                    &xs[t * cols..(t + 1) * cols],
                    1,
                    &mut single[t * rows..(t + 1) * rows],
                );
            }
            for n in 1..=9 {
                let mut out = vec![0.0; n * rows];
                matmul(&m, &xs[..n * cols], n, &mut out);
                assert_eq!(out, single[..n * rows], "rows {rows} cols {cols} batch {n}");
            }
            // And close to an f64 reference.
            for t in 0..9 {
                for r in 0..rows {
                    let want: f64 = (0..cols)
                        .map(|c| w[r * cols + c] as f64 * xs[t * cols + c] as f64)
                        .sum();
                    assert!((single[t * rows + r] as f64 - want).abs() < 1e-3);
                }
            }
        }
    }

    /// Random quantized rows with sane f16 scales.
    fn quantized(ty: quant::GgmlType, rows: usize, cols: usize) -> Matrix {
        let ts = ty.type_size();
        let mut bytes: Vec<u8> = data(rows * ty.row_bytes(cols).unwrap(), 7)
            .iter()
            .map(|v| ((v + 1.0) * 127.0) as u8)
            .collect();
        let f16 = |v: f32| half::f16::from_f32(v).to_le_bytes();
        for b in bytes.chunks_exact_mut(ts) {
            match ty {
                // Q6_K keeps its super-block scale at the end.
                quant::GgmlType::Q6_K => b[ts - 2..].copy_from_slice(&f16(0.0123)),
                _ => b[..2].copy_from_slice(&f16(0.0123)),
            }
            if matches!(ty, quant::GgmlType::Q4_1 | quant::GgmlType::Q4_K) {
                b[2..4].copy_from_slice(&f16(0.05));
            }
        }
        let storage = crate::model::weights::Storage::Owned(std::sync::Arc::new(bytes));
        Matrix::new("q", ty, rows, cols, storage).unwrap()
    }

    #[test]
    fn quantized_batch_one_fused_path_equals_tiled_path() {
        use quant::GgmlType::*;
        for ty in [Q4_0, Q4_1, Q8_0, Q4_K, Q6_K] {
            let cols = if ty.block_size() == 256 { 512 } else { 576 };
            let rows = 45;
            let m = quantized(ty, rows, cols);
            let xs = data(5 * cols, 9);
            let mut single = vec![0.0; 5 * rows];
            for t in 0..5 {
                matmul(
                    &m,
                    &xs[t * cols..(t + 1) * cols],
                    1,
                    &mut single[t * rows..(t + 1) * rows],
                );
            }
            let mut out = vec![0.0; 5 * rows];
            matmul(&m, &xs, 5, &mut out);
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&out), bits(&single), "{ty}");
            // And within rounding of the plain dot product of the dequantized rows.
            let mut w = vec![0.0; cols];
            for (r, got) in single[..rows].iter().enumerate() {
                quant::dequantize_row(ty, m.row(r), &mut w).unwrap();
                let want: f64 = w
                    .iter()
                    .zip(&xs[..cols])
                    .map(|(a, b)| *a as f64 * *b as f64)
                    .sum();
                assert!(
                    (*got as f64 - want).abs() < 1e-3 * (1.0 + want.abs()),
                    "{ty} row {r}"
                );
            }
        }
    }

    #[test]
    fn portable_equals_simd() {
        let k = 75;
        let w = data(8 * k, 3);
        let x = data(4 * k, 4);
        let wr: [&[f32]; 2] = std::array::from_fn(|i| &w[i * k..(i + 1) * k]);
        let xr: [&[f32]; 4] = std::array::from_fn(|j| &x[j * k..(j + 1) * k]);
        assert_eq!(micro::<2, 4>(&wr, &xr, k), portable::<2, 4>(&wr, &xr, k));
    }
}

#[cfg(test)]
mod speed {
    use super::*;

    /// `cargo test --release -p worker --lib gemm::speed -- --ignored --nocapture`
    #[test]
    #[ignore]
    fn components() {
        let (rows, cols) = (4096, 576);
        let w: Vec<f32> = (0..rows * cols).map(|i| (i % 7) as f32).collect();
        let m = Matrix::from_f32("w", rows, cols, &w);
        let x: Vec<f32> = (0..8 * cols).map(|i| (i % 5) as f32).collect();
        let mut buf = vec![0.0; cols];
        let t = std::time::Instant::now();
        for _ in 0..10 {
            for r in 0..rows {
                m.dequantize_row(r, &mut buf);
            }
        }
        eprintln!("dequantize f32 rows: {:?}/matrix", t.elapsed() / 10);
        let mut o = vec![0.0; rows * 8];
        for nt in [1, 2, 4, 8] {
            let t = std::time::Instant::now();
            for _ in 0..10 {
                tile_product(&w, rows, &x, nt, cols, &mut o);
            }
            eprintln!("tile_product nt={nt}: {:?}/matrix", t.elapsed() / 10);
        }
    }
}
