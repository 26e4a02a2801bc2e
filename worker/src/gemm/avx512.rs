//! AVX-512 fused decode kernels for Q4_0 / Q4_1 / Q8_0 weights: 16-lane accumulators,
//! 32 registers, so a 2-row x 8-token block keeps every activation load shared by two
//! rows. Chosen once per process (`available`); when chosen it serves *every* batch size
//! of those types, so all requests share one arithmetic (batch invariance holds).
//!
//! Per output element: one 16-lane FMA accumulator over the decoded weights in column
//! order, then `hsum` (upper and lower 256-bit halves added, then the 8-lane sum).

use std::arch::x86_64::*;
use std::sync::OnceLock;

use crate::quant::GgmlType;

/// AVX-512F (plus what the AVX2 path needs) present, and not disabled with
/// `SOV_NO_AVX512=1` (useful to compare the two paths on one machine).
pub fn available() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| {
        is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512vl")
            && is_x86_feature_detected!("avx512bw")
            && crate::quant::avx2::available()
            && std::env::var_os("SOV_NO_AVX512").is_none()
    })
}

#[inline]
#[target_feature(enable = "avx512f,avx512vl,avx512bw,avx2,fma,f16c")]
fn f16_splat(lo: u8, hi: u8) -> __m512 {
    _mm512_cvtph_ps(_mm256_set1_epi16(i16::from_le_bytes([lo, hi])))
}

/// One 32-element block as two 16-lane vectors, with the same values as
/// `quant::dequantize_row` (scale and offset applied by a multiply and an add).
#[inline]
#[target_feature(enable = "avx512f,avx512vl,avx512bw,avx2,fma,f16c")]
unsafe fn decode32<const KIND: u8>(b: *const u8) -> [__m512; 2] {
    // SAFETY: `b` points at one whole block (caller contract).
    unsafe {
        let d = f16_splat(*b, *b.add(1));
        let ld16 = |p: *const u8| _mm_loadu_si128(p.cast());
        match KIND {
            // Q8_0: 32 signed bytes from offset 2.
            0 => [
                _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(ld16(b.add(2)))), d),
                _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(ld16(b.add(18)))), d),
            ],
            // Q4_1: low nibbles are elements 0..16, high nibbles 16..32; d * q + m.
            1 => {
                let m = f16_splat(*b.add(2), *b.add(3));
                let v = _mm512_cvtepu8_epi32(ld16(b.add(4)));
                let lo = _mm512_and_si512(v, _mm512_set1_epi32(0x0F));
                let hi = _mm512_srli_epi32::<4>(v);
                [
                    _mm512_add_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(lo), d), m),
                    _mm512_add_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(hi), d), m),
                ]
            }
            // Q4_0: (q - 8) * d.
            _ => {
                let v = _mm512_cvtepu8_epi32(ld16(b.add(2)));
                let bias = _mm512_set1_epi32(8);
                let lo = _mm512_sub_epi32(_mm512_and_si512(v, _mm512_set1_epi32(0x0F)), bias);
                let hi = _mm512_sub_epi32(_mm512_srli_epi32::<4>(v), bias);
                [
                    _mm512_mul_ps(_mm512_cvtepi32_ps(lo), d),
                    _mm512_mul_ps(_mm512_cvtepi32_ps(hi), d),
                ]
            }
        }
    }
}

#[inline]
#[target_feature(enable = "avx512f,avx512vl,avx512bw,avx2,fma,f16c")]
fn hsum(v: __m512) -> f32 {
    let lo = _mm512_castps512_ps256(v);
    let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(v)));
    let s = _mm256_add_ps(lo, hi);
    let q = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps::<1>(s));
    let h = _mm_add_ps(q, _mm_movehl_ps(q, q));
    _mm_cvtss_f32(_mm_add_ss(h, _mm_shuffle_ps::<0b01>(h, h)))
}

/// `MR` quantized rows against `NR` activation vectors of `k` elements.
///
/// # Safety
/// `available()` and `ty` is Q4_0, Q4_1 or Q8_0; every row and vector holds `k` elements.
#[target_feature(enable = "avx512f,avx512vl,avx512bw,avx2,fma,f16c")]
pub unsafe fn multi<const MR: usize, const NR: usize>(
    ty: GgmlType,
    rows: &[&[u8]; MR],
    xs: &[&[f32]; NR],
    k: usize,
) -> [[f32; NR]; MR] {
    // SAFETY: forwarded contract.
    unsafe {
        match ty {
            GgmlType::Q8_0 => inner::<MR, NR, 0>(rows, xs, k, 34),
            GgmlType::Q4_1 => inner::<MR, NR, 1>(rows, xs, k, 20),
            _ => inner::<MR, NR, 2>(rows, xs, k, 18),
        }
    }
}

#[inline]
#[target_feature(enable = "avx512f,avx512vl,avx512bw,avx2,fma,f16c")]
unsafe fn inner<const MR: usize, const NR: usize, const KIND: u8>(
    rows: &[&[u8]; MR],
    xs: &[&[f32]; NR],
    k: usize,
    ts: usize,
) -> [[f32; NR]; MR] {
    // No closures in here: a closure does not inherit this function's target features,
    // so it is not inlined and its `__m512` values travel through memory (perf showed
    // ~10% of batch-8 decode time in such calls).
    let nb = k / 32;
    let mut acc = [[_mm512_setzero_ps(); NR]; MR];
    let mut w = [[_mm512_setzero_ps(); 2]; MR];
    for blk in 0..nb {
        if MR <= 4 {
            // Few rows: decode them all, then load each activation once for all rows
            // (at most 8 + 16 + 2 registers live). Same per-element order as below.
            // SAFETY: as below.
            unsafe {
                for i in 0..MR {
                    // Unconditional (a prefetch never faults, and `wrapping_add` keeps the
                    // address computation defined past the row's end): a branch here
                    // splits the loop and made LLVM spill accumulators around it.
                    let ahead = rows[i].as_ptr().wrapping_add((blk + 8) * ts);
                    _mm_prefetch::<_MM_HINT_T0>(ahead.cast());
                    w[i] = decode32::<KIND>(rows[i].as_ptr().add(blk * ts));
                }
                for j in 0..NR {
                    let xb = xs[j].as_ptr().add(32 * blk);
                    let (x0, x1) = (_mm512_loadu_ps(xb), _mm512_loadu_ps(xb.add(16)));
                    for i in 0..MR {
                        acc[i][j] = _mm512_fmadd_ps(w[i][0], x0, acc[i][j]);
                        acc[i][j] = _mm512_fmadd_ps(w[i][1], x1, acc[i][j]);
                    }
                }
            }
            continue;
        }
        for i in 0..MR {
            // SAFETY: block `blk` exists in every row (`ts` bytes) and vector (32 floats);
            // the prefetch stays inside the row.
            unsafe {
                if blk + 8 < nb {
                    _mm_prefetch::<_MM_HINT_T0>(rows[i].as_ptr().add((blk + 8) * ts).cast());
                }
                let w = decode32::<KIND>(rows[i].as_ptr().add(blk * ts));
                for j in 0..NR {
                    let xb = xs[j].as_ptr().add(32 * blk);
                    acc[i][j] = _mm512_fmadd_ps(w[0], _mm512_loadu_ps(xb), acc[i][j]);
                    acc[i][j] = _mm512_fmadd_ps(w[1], _mm512_loadu_ps(xb.add(16)), acc[i][j]);
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
