//! GGML tensor element formats: block layouts, dequantization and fused row dot products.
//!
//! Owns: the [`GgmlType`] ids we support (GGUF numbering), their block geometry
//! ([`GgmlType::block_size`], [`GgmlType::type_size`], [`GgmlType::row_bytes`]), reference-exact
//! dequantization ([`dequantize_row`], bit-for-bit ggml-quants.c / gguf-py semantics) and the CPU
//! backend's hot loop: the dot product of one quantized row with f32 activations ([`dot_row`],
//! and [`dot_rows_multi`] for a batch of activation vectors sharing one weight row).
//!
//! Must not: read files, know about tensors, shapes beyond one row, models or threads (callers
//! split matrices into rows and parallelize), quantize activations (the dot products are pure f32
//! arithmetic on the dequantized weights, only the summation order differs from a float
//! reference), or panic on bytes that came from a file: [`dequantize_row`] and
//! [`GgmlType::row_bytes`] return errors, and the dot products only assert length invariants
//! that the loader establishes with [`GgmlType::row_bytes`] when it maps a tensor.
//!
//! The dot products have an AVX2+FMA+F16C implementation (selected with
//! `is_x86_feature_detected!`, a compile-time constant under `target-cpu=x86-64-v3`) and a
//! portable fallback that dequantizes one block at a time into a stack buffer.

use std::fmt;

use half::f16;

/// A GGML tensor element type, numbered as in GGUF (`ggml_type`).
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum GgmlType {
    F32 = 0,
    F16 = 1,
    Q4_0 = 2,
    Q4_1 = 3,
    Q8_0 = 8,
    Q4_K = 12,
    Q5_K = 13,
    Q6_K = 14,
    BF16 = 30,
}

/// Errors about tensor types and row layouts. All of them are about data, never about bugs.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QuantError {
    /// A known ggml type that this crate does not implement.
    #[error("unsupported tensor type {name} ({id})")]
    UnsupportedType { name: &'static str, id: u32 },
    /// An id that is not a ggml type at all.
    #[error("unknown tensor type id {0}")]
    UnknownType(u32),
    /// The element count of a row is not a whole number of blocks.
    #[error("{n} elements is not a multiple of the {ty} block size {block}")]
    NotBlockMultiple {
        ty: GgmlType,
        n: usize,
        block: usize,
    },
    /// The byte length of a row does not match its element count.
    #[error("a {ty} row of {n} elements is {expected} bytes, got {actual}")]
    LengthMismatch {
        ty: GgmlType,
        n: usize,
        expected: usize,
        actual: usize,
    },
    /// The byte size of a row does not fit in `usize`.
    #[error("a {ty} row of {n} elements overflows the address space")]
    Overflow { ty: GgmlType, n: usize },
}

/// Names of the ggml types we do not implement, by id (for error messages).
fn ggml_type_name(id: u32) -> Option<&'static str> {
    Some(match id {
        4 => "Q4_2",
        5 => "Q4_3",
        6 => "Q5_0",
        7 => "Q5_1",
        9 => "Q8_1",
        10 => "Q2_K",
        11 => "Q3_K",
        15 => "Q8_K",
        16 => "IQ2_XXS",
        17 => "IQ2_XS",
        18 => "IQ3_XXS",
        19 => "IQ1_S",
        20 => "IQ4_NL",
        21 => "IQ3_S",
        22 => "IQ2_S",
        23 => "IQ4_XS",
        24 => "I8",
        25 => "I16",
        26 => "I32",
        27 => "I64",
        28 => "F64",
        29 => "IQ1_M",
        31 => "Q4_0_4_4",
        32 => "Q4_0_4_8",
        33 => "Q4_0_8_8",
        34 => "TQ1_0",
        35 => "TQ2_0",
        36 => "IQ4_NL_4_4",
        37 => "IQ4_NL_4_8",
        38 => "IQ4_NL_8_8",
        39 => "MXFP4",
        _ => return None,
    })
}

impl TryFrom<u32> for GgmlType {
    type Error = QuantError;

    fn try_from(id: u32) -> Result<Self, QuantError> {
        Ok(match id {
            0 => Self::F32,
            1 => Self::F16,
            2 => Self::Q4_0,
            3 => Self::Q4_1,
            8 => Self::Q8_0,
            12 => Self::Q4_K,
            13 => Self::Q5_K,
            14 => Self::Q6_K,
            30 => Self::BF16,
            _ => {
                return Err(match ggml_type_name(id) {
                    Some(name) => QuantError::UnsupportedType { name, id },
                    None => QuantError::UnknownType(id),
                });
            }
        })
    }
}

impl fmt::Display for GgmlType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Elements per K-quant super-block.
const QK_K: usize = 256;

impl GgmlType {
    /// Every supported type.
    pub const ALL: [GgmlType; 9] = [
        Self::F32,
        Self::F16,
        Self::BF16,
        Self::Q4_0,
        Self::Q4_1,
        Self::Q8_0,
        Self::Q4_K,
        Self::Q5_K,
        Self::Q6_K,
    ];

    /// The GGUF type id.
    pub const fn id(self) -> u32 {
        self as u32
    }

    /// The ggml name, e.g. `"Q4_K"`.
    pub const fn name(self) -> &'static str {
        match self {
            Self::F32 => "F32",
            Self::F16 => "F16",
            Self::Q4_0 => "Q4_0",
            Self::Q4_1 => "Q4_1",
            Self::Q8_0 => "Q8_0",
            Self::Q4_K => "Q4_K",
            Self::Q5_K => "Q5_K",
            Self::Q6_K => "Q6_K",
            Self::BF16 => "BF16",
        }
    }

    /// Elements per block.
    pub const fn block_size(self) -> usize {
        match self {
            Self::F32 | Self::F16 | Self::BF16 => 1,
            Self::Q4_0 | Self::Q4_1 | Self::Q8_0 => 32,
            Self::Q4_K | Self::Q5_K | Self::Q6_K => QK_K,
        }
    }

    /// Bytes per block.
    pub const fn type_size(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::F16 | Self::BF16 => 2,
            Self::Q4_0 => 18,
            Self::Q4_1 => 20,
            Self::Q8_0 => 34,
            Self::Q4_K => 144,
            Self::Q5_K => 176,
            Self::Q6_K => 210,
        }
    }

    /// Bytes taken by `n_elements` consecutive elements (one row, or a whole tensor).
    pub fn row_bytes(self, n_elements: usize) -> Result<usize, QuantError> {
        let block = self.block_size();
        if !n_elements.is_multiple_of(block) {
            return Err(QuantError::NotBlockMultiple {
                ty: self,
                n: n_elements,
                block,
            });
        }
        (n_elements / block)
            .checked_mul(self.type_size())
            .ok_or(QuantError::Overflow {
                ty: self,
                n: n_elements,
            })
    }

    fn check_row(self, n_bytes: usize, n_elements: usize) -> Result<(), QuantError> {
        let expected = self.row_bytes(n_elements)?;
        if expected != n_bytes {
            return Err(QuantError::LengthMismatch {
                ty: self,
                n: n_elements,
                expected,
                actual: n_bytes,
            });
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Block layouts and reference dequantization (ggml-quants.c `dequantize_row_*`).
//
// Every function computes exactly the float operations of the reference, in the same order, so
// the results are bit-identical (Rust never contracts `a * b + c` into an FMA).
// ---------------------------------------------------------------------------------------------

#[inline(always)]
fn f16_le(lo: u8, hi: u8) -> f32 {
    f16::from_le_bytes([lo, hi]).to_f32()
}

#[inline(always)]
fn bf16_le(lo: u8, hi: u8) -> f32 {
    f32::from_bits(u32::from(u16::from_le_bytes([lo, hi])) << 16)
}

/// Q4_0: `{ d: f16, qs: [u8; 16] }`; element `j` is the low nibble of `qs[j]`, element `j + 16`
/// its high nibble; value `d * (q - 8)`.
#[inline(always)]
fn deq_q4_0(b: &[u8; 18], y: &mut [f32; 32]) {
    let d = f16_le(b[0], b[1]);
    for j in 0..16 {
        let q = b[2 + j];
        y[j] = f32::from(i16::from(q & 0x0F) - 8) * d;
        y[j + 16] = f32::from(i16::from(q >> 4) - 8) * d;
    }
}

/// Q4_1: `{ d: f16, m: f16, qs: [u8; 16] }`, nibbles as Q4_0; value `d * q + m`.
#[inline(always)]
fn deq_q4_1(b: &[u8; 20], y: &mut [f32; 32]) {
    let d = f16_le(b[0], b[1]);
    let m = f16_le(b[2], b[3]);
    for j in 0..16 {
        let q = b[4 + j];
        y[j] = f32::from(q & 0x0F) * d + m;
        y[j + 16] = f32::from(q >> 4) * d + m;
    }
}

/// Q8_0: `{ d: f16, qs: [i8; 32] }`; value `d * q`.
#[inline(always)]
fn deq_q8_0(b: &[u8; 34], y: &mut [f32; 32]) {
    let d = f16_le(b[0], b[1]);
    for j in 0..32 {
        y[j] = f32::from(b[2 + j] as i8) * d;
    }
}

/// The eight 6-bit scales and eight 6-bit mins of a Q4_K/Q5_K super-block
/// (`get_scale_min_k4` for `j = 0..8`).
#[inline(always)]
fn scales_mins_k4(q: &[u8; 12]) -> ([u8; 8], [u8; 8]) {
    let mut sc = [0u8; 8];
    let mut mn = [0u8; 8];
    for j in 0..4 {
        sc[j] = q[j] & 63;
        mn[j] = q[j + 4] & 63;
        sc[j + 4] = (q[j + 8] & 0x0F) | ((q[j] >> 6) << 4);
        mn[j + 4] = (q[j + 8] >> 4) | ((q[j + 4] >> 6) << 4);
    }
    (sc, mn)
}

/// Splits a K-quant block at compile-time offsets without bounds checks.
#[inline(always)]
fn sub<const A: usize, const N: usize, const TS: usize>(b: &[u8; TS]) -> &[u8; N] {
    const { assert!(A + N <= TS) };
    b[A..A + N]
        .try_into()
        .unwrap_or_else(|_| unreachable!("const-checked sub-array"))
}

/// Q4_K: `{ d: f16, dmin: f16, scales: [u8; 12], qs: [u8; 128] }`. Eight sub-blocks of 32 with
/// 6-bit scale/min; each 32 bytes of `qs` hold sub-block `2i` in the low nibbles and `2i + 1`
/// in the high nibbles; value `(d * sc) * q - (dmin * m)`.
#[inline(always)]
fn deq_q4_k(b: &[u8; 144], y: &mut [f32; 256]) {
    let d = f16_le(b[0], b[1]);
    let dmin = f16_le(b[2], b[3]);
    let (sc, mn) = scales_mins_k4(sub::<4, 12, 144>(b));
    let qs = sub::<16, 128, 144>(b);
    for j in 0..4 {
        let d1 = d * f32::from(sc[2 * j]);
        let m1 = dmin * f32::from(mn[2 * j]);
        let d2 = d * f32::from(sc[2 * j + 1]);
        let m2 = dmin * f32::from(mn[2 * j + 1]);
        for l in 0..32 {
            let q = qs[32 * j + l];
            y[64 * j + l] = d1 * f32::from(q & 0x0F) - m1;
            y[64 * j + 32 + l] = d2 * f32::from(q >> 4) - m2;
        }
    }
}

/// Q5_K: `{ d: f16, dmin: f16, scales: [u8; 12], qh: [u8; 32], qs: [u8; 128] }`; as Q4_K with
/// a fifth bit: bit `2i` of `qh[l]` for sub-block `2i`, bit `2i + 1` for sub-block `2i + 1`.
#[inline(always)]
fn deq_q5_k(b: &[u8; 176], y: &mut [f32; 256]) {
    let d = f16_le(b[0], b[1]);
    let dmin = f16_le(b[2], b[3]);
    let (sc, mn) = scales_mins_k4(sub::<4, 12, 176>(b));
    let qh = sub::<16, 32, 176>(b);
    let qs = sub::<48, 128, 176>(b);
    for j in 0..4 {
        let d1 = d * f32::from(sc[2 * j]);
        let m1 = dmin * f32::from(mn[2 * j]);
        let d2 = d * f32::from(sc[2 * j + 1]);
        let m2 = dmin * f32::from(mn[2 * j + 1]);
        let u1 = 1u8 << (2 * j);
        let u2 = 2u8 << (2 * j);
        for l in 0..32 {
            let q = qs[32 * j + l];
            let h1 = if qh[l] & u1 != 0 { 16 } else { 0 };
            let h2 = if qh[l] & u2 != 0 { 16 } else { 0 };
            y[64 * j + l] = d1 * f32::from((q & 0x0F) + h1) - m1;
            y[64 * j + 32 + l] = d2 * f32::from((q >> 4) + h2) - m2;
        }
    }
}

/// Q6_K: `{ ql: [u8; 128], qh: [u8; 64], scales: [i8; 16], d: f16 }`. Two halves of 128; in
/// half `n`, for `l` in `0..32` the four elements `l, l+32, l+64, l+96` take the low/high
/// nibbles of `ql[l]`, `ql[l+32]` and the 2-bit fields of `qh[l]`; value `(d * sc) * (q - 32)`
/// with one int8 scale per 16 elements.
#[inline(always)]
fn deq_q6_k(b: &[u8; 210], y: &mut [f32; 256]) {
    let ql = sub::<0, 128, 210>(b);
    let qh = sub::<128, 64, 210>(b);
    let sc = sub::<192, 16, 210>(b);
    let d = f16_le(b[208], b[209]);
    for n in 0..2 {
        for l in 0..32 {
            let is = l / 16;
            let a = ql[64 * n + l];
            let c = ql[64 * n + 32 + l];
            let h = qh[32 * n + l];
            let q1 = ((a & 0x0F) | ((h & 3) << 4)) as i8 - 32;
            let q2 = ((c & 0x0F) | (((h >> 2) & 3) << 4)) as i8 - 32;
            let q3 = ((a >> 4) | (((h >> 4) & 3) << 4)) as i8 - 32;
            let q4 = ((c >> 4) | (((h >> 6) & 3) << 4)) as i8 - 32;
            let s = |k: usize| f32::from(sc[8 * n + is + k] as i8);
            y[128 * n + l] = d * s(0) * f32::from(q1);
            y[128 * n + 32 + l] = d * s(2) * f32::from(q2);
            y[128 * n + 64 + l] = d * s(4) * f32::from(q3);
            y[128 * n + 96 + l] = d * s(6) * f32::from(q4);
        }
    }
}

/// Runs `deq` over whole blocks; lengths are the caller's responsibility (checked before).
#[inline(always)]
fn deq_blocks<const TS: usize, const BS: usize>(
    bytes: &[u8],
    out: &mut [f32],
    deq: impl Fn(&[u8; TS], &mut [f32; BS]),
) {
    let (blocks, _) = bytes.as_chunks::<TS>();
    let (ys, _) = out.as_chunks_mut::<BS>();
    for (b, y) in blocks.iter().zip(ys) {
        deq(b, y);
    }
}

/// Dequantizes one row. `out.len()` is the element count; `bytes` must be exactly
/// `ty.row_bytes(out.len())` long. Bit-exact with ggml's reference dequantization.
pub fn dequantize_row(ty: GgmlType, bytes: &[u8], out: &mut [f32]) -> Result<(), QuantError> {
    ty.check_row(bytes.len(), out.len())?;
    dequantize_unchecked(ty, bytes, out);
    Ok(())
}

/// [`dequantize_row`] with SIMD decoders where the CPU has them; same values, bit for bit
/// (scale and offset are applied with a separate multiply and add, as in ggml). Used by
/// the CPU backend's matrix multiply, which decodes weight tiles once per step.
///
/// # Panics
///
/// If `bytes.len() != ty.row_bytes(out.len())` (rows come from validated tensors).
pub fn dequantize_row_fast(ty: GgmlType, bytes: &[u8], out: &mut [f32]) {
    assert!(
        ty.check_row(bytes.len(), out.len()).is_ok(),
        "dequantize_row_fast: row length mismatch"
    );
    #[cfg(target_arch = "x86_64")]
    {
        if avx2::available() {
            // SAFETY: features detected; lengths checked above.
            unsafe { avx2::dequantize_row(ty, bytes, out) };
            return;
        }
    }
    dequantize_unchecked(ty, bytes, out);
}

/// [`dequantize_row`] after the length check.
fn dequantize_unchecked(ty: GgmlType, bytes: &[u8], out: &mut [f32]) {
    match ty {
        GgmlType::F32 => deq_blocks::<4, 1>(bytes, out, |b, y| y[0] = f32::from_le_bytes(*b)),
        GgmlType::F16 => deq_blocks::<2, 1>(bytes, out, |b, y| y[0] = f16_le(b[0], b[1])),
        GgmlType::BF16 => deq_blocks::<2, 1>(bytes, out, |b, y| y[0] = bf16_le(b[0], b[1])),
        GgmlType::Q4_0 => deq_blocks(bytes, out, deq_q4_0),
        GgmlType::Q4_1 => deq_blocks(bytes, out, deq_q4_1),
        GgmlType::Q8_0 => deq_blocks(bytes, out, deq_q8_0),
        GgmlType::Q4_K => deq_blocks(bytes, out, deq_q4_k),
        GgmlType::Q5_K => deq_blocks(bytes, out, deq_q5_k),
        GgmlType::Q6_K => deq_blocks(bytes, out, deq_q6_k),
    }
}

// ---------------------------------------------------------------------------------------------
// Dot products.
// ---------------------------------------------------------------------------------------------

/// Dot product of one quantized row (`bytes`, `x.len()` elements of type `ty`) with `x`.
///
/// Computed in f32 on the dequantized weights without materializing the row; agrees with the
/// dot product of [`dequantize_row`]'s output up to summation order.
///
/// # Panics
///
/// If `bytes.len() != ty.row_bytes(x.len())`. Weight rows come from tensors whose sizes the
/// loader validated with [`GgmlType::row_bytes`], so a mismatch is a caller bug, not bad data.
pub fn dot_row(ty: GgmlType, bytes: &[u8], x: &[f32]) -> f32 {
    if let Err(e) = ty.check_row(bytes.len(), x.len()) {
        panic!("dot_row: {e}");
    }
    #[cfg(target_arch = "x86_64")]
    if avx2::available() {
        // SAFETY: the CPU supports AVX2, FMA and F16C (checked just above).
        return unsafe { avx2::dot_row(ty, bytes, x) };
    }
    portable::dot_row(ty, bytes, x)
}

/// Elements dequantized at a time by the portable [`dot_rows_multi`] (a multiple of every block
/// size; the 4 KiB buffer stays in L1 while every activation vector is multiplied with it).
const MULTI_CHUNK: usize = 1024;

/// `out[j] = dot_row(ty, bytes, xs[j])` for every `j` (batch decode: one weight row against
/// several activation vectors), reading the weights once. Each block is dequantized once into a
/// small stack buffer and multiplied into register accumulators of up to four vectors at a time
/// (larger batches decode the row again per group of four, from cache); the portable fallback
/// dequantizes 1024-element chunks once for all vectors. Results equal [`dot_row`]'s up to
/// summation order.
///
/// # Panics
///
/// If `out.len() != xs.len()`, the vectors differ in length, or `bytes` is not one row of that
/// length (see [`dot_row`]).
pub fn dot_rows_multi(ty: GgmlType, bytes: &[u8], xs: &[&[f32]], out: &mut [f32]) {
    assert_eq!(out.len(), xs.len(), "dot_rows_multi: one output per vector");
    let Some(n) = xs.first().map(|x| x.len()) else {
        return;
    };
    assert!(
        xs.iter().all(|x| x.len() == n),
        "dot_rows_multi: activation vectors differ in length"
    );
    if let Err(e) = ty.check_row(bytes.len(), n) {
        panic!("dot_rows_multi: {e}");
    }
    if let ([x], [o]) = (xs, &mut *out) {
        *o = dot_row(ty, bytes, x);
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if avx2::available() {
        // SAFETY: the CPU supports AVX2, FMA and F16C (checked just above).
        unsafe { avx2::dot_rows_multi(ty, bytes, xs, out) };
        return;
    }
    out.fill(0.0);
    multi_chunks(ty, bytes, xs, out);
}

/// Portable [`dot_rows_multi`]: walks the row in [`MULTI_CHUNK`]-element chunks, dequantizing
/// each chunk once into a stack buffer and accumulating it against every vector.
fn multi_chunks(ty: GgmlType, bytes: &[u8], xs: &[&[f32]], out: &mut [f32]) {
    let mut buf = [0f32; MULTI_CHUNK];
    let bytes_per_chunk = MULTI_CHUNK / ty.block_size() * ty.type_size();
    let mut start = 0;
    for chunk in bytes.chunks(bytes_per_chunk) {
        let len = chunk.len() / ty.type_size() * ty.block_size();
        let w = &mut buf[..len];
        dequantize_unchecked(ty, chunk, w);
        for (o, x) in out.iter_mut().zip(xs) {
            *o += portable::dot_f32(w, &x[start..start + len]);
        }
        start += len;
    }
}

/// Plain f32 dot product (lengths must match; the shorter length is used otherwise).
pub fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if avx2::available() {
        // SAFETY: the CPU supports AVX2, FMA and F16C (checked just above).
        return unsafe { avx2::dot_f32(a, b) };
    }
    portable::dot_f32(a, b)
}

/// Fallback kernels: dequantize one block into a stack buffer, then multiply-accumulate into
/// independent accumulators (LLVM vectorizes these loops for the target CPU).
mod portable {
    use super::*;

    /// `a * b + c`, fused where the target has FMA (a libm call would be far slower otherwise).
    #[inline(always)]
    fn madd(a: f32, b: f32, c: f32) -> f32 {
        if cfg!(target_feature = "fma") {
            a.mul_add(b, c)
        } else {
            a * b + c
        }
    }

    /// Lanes of independent accumulators.
    const LANES: usize = 32;

    #[inline(always)]
    fn acc_block<const N: usize>(acc: &mut [f32; LANES], w: &[f32; N], x: &[f32; N]) {
        let (wc, _) = w.as_chunks::<LANES>();
        let (xc, _) = x.as_chunks::<LANES>();
        for (wc, xc) in wc.iter().zip(xc) {
            for i in 0..LANES {
                acc[i] = madd(wc[i], xc[i], acc[i]);
            }
        }
    }

    #[inline(always)]
    fn dot_blocks<const TS: usize, const BS: usize>(
        bytes: &[u8],
        x: &[f32],
        deq: impl Fn(&[u8; TS], &mut [f32; BS]),
    ) -> f32 {
        let (blocks, _) = bytes.as_chunks::<TS>();
        let (xs, _) = x.as_chunks::<BS>();
        let mut acc = [0f32; LANES];
        let mut buf = [0f32; BS];
        for (b, xb) in blocks.iter().zip(xs) {
            deq(b, &mut buf);
            acc_block(&mut acc, &buf, xb);
        }
        acc.iter().sum()
    }

    /// F16/BF16 rows: whole 32-element groups through a buffer, then the tail.
    #[inline(always)]
    fn dot_half(bytes: &[u8], x: &[f32], conv: impl Fn(u8, u8) -> f32) -> f32 {
        let head = x.len() / LANES * LANES;
        let mut sum = dot_blocks::<{ 2 * LANES }, LANES>(&bytes[..2 * head], &x[..head], |b, y| {
            for (y, h) in y.iter_mut().zip(b.as_chunks::<2>().0) {
                *y = conv(h[0], h[1]);
            }
        });
        for (h, x) in bytes[2 * head..].as_chunks::<2>().0.iter().zip(&x[head..]) {
            sum = madd(conv(h[0], h[1]), *x, sum);
        }
        sum
    }

    pub fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len().min(b.len());
        let (ac, at) = a[..n].as_chunks::<LANES>();
        let (bc, bt) = b[..n].as_chunks::<LANES>();
        let mut acc = [0f32; LANES];
        for (ac, bc) in ac.iter().zip(bc) {
            acc_block(&mut acc, ac, bc);
        }
        let mut sum: f32 = acc.iter().sum();
        for (a, b) in at.iter().zip(bt) {
            sum = madd(*a, *b, sum);
        }
        sum
    }

    pub fn dot_row(ty: GgmlType, bytes: &[u8], x: &[f32]) -> f32 {
        match ty {
            GgmlType::F32 => {
                let mut w = [0f32; LANES];
                let head = x.len() / LANES * LANES;
                let mut sum =
                    dot_blocks::<{ 4 * LANES }, LANES>(&bytes[..4 * head], &x[..head], |b, y| {
                        for (y, f) in y.iter_mut().zip(b.as_chunks::<4>().0) {
                            *y = f32::from_le_bytes(*f);
                        }
                    });
                let tail = &bytes[4 * head..];
                for (w, f) in w.iter_mut().zip(tail.as_chunks::<4>().0) {
                    *w = f32::from_le_bytes(*f);
                }
                for (w, x) in w.iter().zip(&x[head..]) {
                    sum = madd(*w, *x, sum);
                }
                sum
            }
            GgmlType::F16 => dot_half(bytes, x, f16_le),
            GgmlType::BF16 => dot_half(bytes, x, bf16_le),
            GgmlType::Q4_0 => dot_blocks(bytes, x, deq_q4_0),
            GgmlType::Q4_1 => dot_blocks(bytes, x, deq_q4_1),
            GgmlType::Q8_0 => dot_blocks(bytes, x, deq_q8_0),
            GgmlType::Q4_K => dot_blocks(bytes, x, deq_q4_k),
            GgmlType::Q5_K => dot_blocks(bytes, x, deq_q5_k),
            GgmlType::Q6_K => dot_blocks(bytes, x, deq_q6_k),
        }
    }
}

/// AVX2 + FMA + F16C kernels. Quantized values are widened to i32 lanes straight from memory
/// (`vpmovzxbd`), unpacked with shifts/masks and converted to f32. For the 32-element blocks and
/// Q6_K the block scales are factored out of each (sub-)block sum; Q4_K/Q5_K dequantize a
/// super-block into a stack buffer first (measured faster). `dot_rows_multi` decodes each block
/// into a stack buffer once and multiplies it into register accumulators for up to four
/// activation vectors at a time.
#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2 {
    use std::arch::x86_64::*;

    use super::{GgmlType, scales_mins_k4};

    #[inline]
    pub fn available() -> bool {
        is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c")
    }

    /// Decode a whole row (lengths checked by the caller).
    ///
    /// # Safety
    /// AVX2, FMA and F16C must be available; `bytes` must be one row of `out.len()` elements.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dequantize_row(ty: GgmlType, bytes: &[u8], out: &mut [f32]) {
        match ty {
            GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q8_0 => {
                let ts = ty.type_size();
                for (b, y) in bytes.chunks_exact(ts).zip(out.chunks_exact_mut(32)) {
                    let q = b.as_ptr();
                    let yp = y.as_mut_ptr();
                    // SAFETY: one whole block of `ts` bytes and 32 output floats.
                    unsafe {
                        let d = f16_splat(b[0], b[1]);
                        match ty {
                            GgmlType::Q8_0 => {
                                for k in 0..4 {
                                    st(yp.add(8 * k), _mm256_mul_ps(i8x8_ps(q.add(2 + 8 * k)), d));
                                }
                            }
                            _ => {
                                let (off, lo_bias) =
                                    if ty == GgmlType::Q4_1 { (4, 0) } else { (2, 8) };
                                let m4 = _mm256_set1_epi32(0x0F);
                                let bias = _mm256_set1_epi32(lo_bias);
                                let v0 = u8x8(q.add(off));
                                let v1 = u8x8(q.add(off + 8));
                                let e = [
                                    _mm256_and_si256(v0, m4),
                                    _mm256_and_si256(v1, m4),
                                    _mm256_srli_epi32::<4>(v0),
                                    _mm256_srli_epi32::<4>(v1),
                                ];
                                for (k, e) in e.into_iter().enumerate() {
                                    let v = if ty == GgmlType::Q4_1 {
                                        let m = f16_splat(b[2], b[3]);
                                        _mm256_add_ps(_mm256_mul_ps(ps(e), d), m)
                                    } else {
                                        _mm256_mul_ps(ps(_mm256_sub_epi32(e, bias)), d)
                                    };
                                    st(yp.add(8 * k), v);
                                }
                            }
                        }
                    }
                }
            }
            GgmlType::Q4_K => {
                for (b, y) in bytes
                    .as_chunks::<144>()
                    .0
                    .iter()
                    .zip(out.as_chunks_mut::<256>().0)
                {
                    deq_q4_k(b, y);
                }
            }
            GgmlType::Q5_K => {
                for (b, y) in bytes
                    .as_chunks::<176>()
                    .0
                    .iter()
                    .zip(out.as_chunks_mut::<256>().0)
                {
                    deq_q5_k(b, y);
                }
            }
            GgmlType::Q6_K => {
                for (b, y) in bytes
                    .as_chunks::<210>()
                    .0
                    .iter()
                    .zip(out.as_chunks_mut::<256>().0)
                {
                    deq_q6_k(b, y);
                }
            }
            GgmlType::F16 => {
                let (c, t) = bytes.as_chunks::<16>();
                let (yc, yt) = out.as_chunks_mut::<8>();
                for (b, y) in c.iter().zip(yc) {
                    // SAFETY: 16 bytes in, 8 floats out.
                    unsafe {
                        st(
                            y.as_mut_ptr(),
                            _mm256_cvtph_ps(_mm_loadu_si128(b.as_ptr().cast())),
                        )
                    };
                }
                let _ = t;
                super::dequantize_unchecked(ty, &bytes[c.len() * 16..], yt);
            }
            _ => super::dequantize_unchecked(ty, bytes, out),
        }
    }

    /// Eight f32 from `p` (unaligned).
    ///
    /// # Safety
    /// `p..p + 8` must be readable.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn ld(p: *const f32) -> __m256 {
        // SAFETY: per the function contract.
        unsafe { _mm256_loadu_ps(p) }
    }

    /// Eight bytes at `p`, zero-extended to i32 lanes.
    ///
    /// # Safety
    /// `p..p + 8` must be readable.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(crate) unsafe fn u8x8(p: *const u8) -> __m256i {
        // SAFETY: per the function contract (an unaligned 8-byte load).
        _mm256_cvtepu8_epi32(unsafe { _mm_loadl_epi64(p.cast()) })
    }

    /// Eight bytes at `p`, sign-extended and converted to f32.
    ///
    /// # Safety
    /// `p..p + 8` must be readable.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(crate) unsafe fn i8x8_ps(p: *const u8) -> __m256 {
        // SAFETY: per the function contract (an unaligned 8-byte load).
        _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(unsafe { _mm_loadl_epi64(p.cast()) }))
    }

    /// A little-endian f16, converted and broadcast to all lanes.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(crate) fn f16_splat(lo: u8, hi: u8) -> __m256 {
        _mm256_cvtph_ps(_mm_set1_epi16(i16::from_le_bytes([lo, hi])))
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(crate) fn ps(v: __m256i) -> __m256 {
        _mm256_cvtepi32_ps(v)
    }

    /// Runs `$blk(block, x_block, acc) -> acc` over the row with four accumulator chains.
    macro_rules! four_chains {
        ($blocks:expr, $xs:expr, $blk:ident) => {{
            let (bq, bt) = $blocks.as_chunks::<4>();
            let (xq, xt) = $xs.as_chunks::<4>();
            let mut a = [_mm256_setzero_ps(); 4];
            for (b, x) in bq.iter().zip(xq) {
                for k in 0..4 {
                    a[k] = $blk(&b[k], &x[k], a[k]);
                }
            }
            for (b, x) in bt.iter().zip(xt) {
                a[0] = $blk(b, x, a[0]);
            }
            hsum(_mm256_add_ps(
                _mm256_add_ps(a[0], a[1]),
                _mm256_add_ps(a[2], a[3]),
            ))
        }};
    }

    /// # Safety
    /// The CPU must support AVX2, FMA and F16C; `bytes` must be one row of `x.len()` elements.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_row(ty: GgmlType, bytes: &[u8], x: &[f32]) -> f32 {
        match ty {
            GgmlType::F32 => dot_f32_bytes(bytes, x),
            GgmlType::F16 => dot_f16(bytes, x),
            GgmlType::BF16 => dot_bf16(bytes, x),
            GgmlType::Q4_0 => dot_q4_0(bytes.as_chunks().0, x.as_chunks().0),
            GgmlType::Q4_1 => dot_q4_1(bytes.as_chunks().0, x.as_chunks().0),
            GgmlType::Q8_0 => dot_q8_0(bytes.as_chunks().0, x.as_chunks().0),
            GgmlType::Q4_K => dot_q4_k(bytes.as_chunks().0, x.as_chunks().0),
            GgmlType::Q5_K => dot_q5_k(bytes.as_chunks().0, x.as_chunks().0),
            GgmlType::Q6_K => dot_q6_k(bytes.as_chunks().0, x.as_chunks().0),
        }
    }

    /// # Safety
    /// The CPU must support AVX2, FMA and F16C.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len().min(b.len());
        let (a, b) = (&a[..n], &b[..n]);
        let (ac, at) = a.as_chunks::<32>();
        let (bc, bt) = b.as_chunks::<32>();
        let mut acc = [_mm256_setzero_ps(); 4];
        for (ac, bc) in ac.iter().zip(bc) {
            for (k, acc) in acc.iter_mut().enumerate() {
                // SAFETY: 8k + 8 <= 32 for both arrays.
                let (va, vb) = unsafe { (ld(ac.as_ptr().add(8 * k)), ld(bc.as_ptr().add(8 * k))) };
                *acc = _mm256_fmadd_ps(va, vb, *acc);
            }
        }
        let s = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
        let mut sum = hsum(s);
        for (a, b) in at.iter().zip(bt) {
            sum = a.mul_add(*b, sum);
        }
        sum
    }

    /// F32 weights stored as little-endian bytes (x86 is little-endian: reinterpret).
    #[target_feature(enable = "avx2,fma,f16c")]
    fn dot_f32_bytes(bytes: &[u8], x: &[f32]) -> f32 {
        let (wc, wt) = bytes.as_chunks::<128>();
        let (xc, xt) = x.as_chunks::<32>();
        let mut acc = [_mm256_setzero_ps(); 4];
        for (wc, xc) in wc.iter().zip(xc) {
            for (k, acc) in acc.iter_mut().enumerate() {
                // SAFETY: 32k + 32 <= 128 bytes and 8k + 8 <= 32 floats.
                let (w, v) = unsafe {
                    (
                        ld(wc.as_ptr().add(32 * k).cast()),
                        ld(xc.as_ptr().add(8 * k)),
                    )
                };
                *acc = _mm256_fmadd_ps(w, v, *acc);
            }
        }
        let s = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
        let mut sum = hsum(s);
        for (w, x) in wt.as_chunks::<4>().0.iter().zip(xt) {
            sum = f32::from_le_bytes(*w).mul_add(*x, sum);
        }
        sum
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    fn dot_f16(bytes: &[u8], x: &[f32]) -> f32 {
        let (wc, wt) = bytes.as_chunks::<64>();
        let (xc, xt) = x.as_chunks::<32>();
        let mut acc = [_mm256_setzero_ps(); 4];
        for (wc, xc) in wc.iter().zip(xc) {
            for (k, acc) in acc.iter_mut().enumerate() {
                // SAFETY: 16k + 16 <= 64 bytes and 8k + 8 <= 32 floats.
                let (w, v) = unsafe {
                    let h = _mm_loadu_si128(wc.as_ptr().add(16 * k).cast());
                    (_mm256_cvtph_ps(h), ld(xc.as_ptr().add(8 * k)))
                };
                *acc = _mm256_fmadd_ps(w, v, *acc);
            }
        }
        let s = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
        let mut sum = hsum(s);
        for (w, x) in wt.as_chunks::<2>().0.iter().zip(xt) {
            sum = super::f16_le(w[0], w[1]).mul_add(*x, sum);
        }
        sum
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    fn dot_bf16(bytes: &[u8], x: &[f32]) -> f32 {
        let (wc, wt) = bytes.as_chunks::<64>();
        let (xc, xt) = x.as_chunks::<32>();
        let mut acc = [_mm256_setzero_ps(); 4];
        for (wc, xc) in wc.iter().zip(xc) {
            for (k, acc) in acc.iter_mut().enumerate() {
                // SAFETY: 16k + 16 <= 64 bytes and 8k + 8 <= 32 floats.
                let (w, v) = unsafe {
                    let h = _mm_loadu_si128(wc.as_ptr().add(16 * k).cast());
                    let w = _mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h));
                    (_mm256_castsi256_ps(w), ld(xc.as_ptr().add(8 * k)))
                };
                *acc = _mm256_fmadd_ps(w, v, *acc);
            }
        }
        let s = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
        let mut sum = hsum(s);
        for (w, x) in wt.as_chunks::<2>().0.iter().zip(xt) {
            sum = super::bf16_le(w[0], w[1]).mul_add(*x, sum);
        }
        sum
    }

    /// `acc + d * sum((q - 8) * x)` for one Q4_0 block.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn blk_q4_0(b: &[u8; 18], x: &[f32; 32], acc: __m256) -> __m256 {
        let d = f16_splat(b[0], b[1]);
        let m4 = _mm256_set1_epi32(0x0F);
        let eight = _mm256_set1_epi32(8);
        let q = b.as_ptr();
        let xp = x.as_ptr();
        // SAFETY: bytes 2..18 of an 18-byte block, floats 0..32 of a 32-float block.
        unsafe {
            let v0 = u8x8(q.add(2)); // elements 0..8 (low) and 16..24 (high)
            let v1 = u8x8(q.add(10)); // elements 8..16 and 24..32
            let e0 = ps(_mm256_sub_epi32(_mm256_and_si256(v0, m4), eight));
            let e1 = ps(_mm256_sub_epi32(_mm256_and_si256(v1, m4), eight));
            let e2 = ps(_mm256_sub_epi32(_mm256_srli_epi32::<4>(v0), eight));
            let e3 = ps(_mm256_sub_epi32(_mm256_srli_epi32::<4>(v1), eight));
            let s0 = _mm256_fmadd_ps(e1, ld(xp.add(8)), _mm256_mul_ps(e0, ld(xp)));
            let s1 = _mm256_fmadd_ps(e3, ld(xp.add(24)), _mm256_mul_ps(e2, ld(xp.add(16))));
            _mm256_fmadd_ps(d, _mm256_add_ps(s0, s1), acc)
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    fn dot_q4_0(blocks: &[[u8; 18]], xs: &[[f32; 32]]) -> f32 {
        four_chains!(blocks, xs, blk_q4_0)
    }

    /// `acc + d * sum(q * x) + m * sum(x)` for one Q4_1 block.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn blk_q4_1(b: &[u8; 20], x: &[f32; 32], acc: __m256) -> __m256 {
        let d = f16_splat(b[0], b[1]);
        let m = f16_splat(b[2], b[3]);
        let m4 = _mm256_set1_epi32(0x0F);
        let q = b.as_ptr();
        let xp = x.as_ptr();
        // SAFETY: bytes 4..20 of a 20-byte block, floats 0..32 of a 32-float block.
        unsafe {
            let v0 = u8x8(q.add(4));
            let v1 = u8x8(q.add(12));
            let (x0, x1, x2, x3) = (ld(xp), ld(xp.add(8)), ld(xp.add(16)), ld(xp.add(24)));
            let e0 = ps(_mm256_and_si256(v0, m4));
            let e1 = ps(_mm256_and_si256(v1, m4));
            let e2 = ps(_mm256_srli_epi32::<4>(v0));
            let e3 = ps(_mm256_srli_epi32::<4>(v1));
            let s0 = _mm256_fmadd_ps(e1, x1, _mm256_mul_ps(e0, x0));
            let s1 = _mm256_fmadd_ps(e3, x3, _mm256_mul_ps(e2, x2));
            let sx = _mm256_add_ps(_mm256_add_ps(x0, x1), _mm256_add_ps(x2, x3));
            _mm256_add_ps(
                acc,
                _mm256_fmadd_ps(m, sx, _mm256_mul_ps(d, _mm256_add_ps(s0, s1))),
            )
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    fn dot_q4_1(blocks: &[[u8; 20]], xs: &[[f32; 32]]) -> f32 {
        four_chains!(blocks, xs, blk_q4_1)
    }

    /// `acc + d * sum(q * x)` for one Q8_0 block.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn blk_q8_0(b: &[u8; 34], x: &[f32; 32], acc: __m256) -> __m256 {
        let d = f16_splat(b[0], b[1]);
        let q = b.as_ptr();
        let xp = x.as_ptr();
        // SAFETY: bytes 2..34 of a 34-byte block, floats 0..32 of a 32-float block.
        unsafe {
            let s0 = _mm256_fmadd_ps(
                i8x8_ps(q.add(10)),
                ld(xp.add(8)),
                _mm256_mul_ps(i8x8_ps(q.add(2)), ld(xp)),
            );
            let s1 = _mm256_fmadd_ps(
                i8x8_ps(q.add(26)),
                ld(xp.add(24)),
                _mm256_mul_ps(i8x8_ps(q.add(18)), ld(xp.add(16))),
            );
            _mm256_fmadd_ps(d, _mm256_add_ps(s0, s1), acc)
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    fn dot_q8_0(blocks: &[[u8; 34]], xs: &[[f32; 32]]) -> f32 {
        four_chains!(blocks, xs, blk_q8_0)
    }

    /// `acc + sum over 16-element groups of d * sc * sum((q - 32) * x)` for one Q6_K block.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn blk_q6_k(b: &[u8; 210], x: &[f32; 256], acc: __m256) -> __m256 {
        let d = super::f16_le(b[208], b[209]);
        let m4 = _mm256_set1_epi32(0x0F);
        let m30 = _mm256_set1_epi32(0x30);
        let k32 = _mm256_set1_epi32(32);
        let bp = b.as_ptr();
        let xp = x.as_ptr();
        let mut a = [
            acc,
            _mm256_setzero_ps(),
            _mm256_setzero_ps(),
            _mm256_setzero_ps(),
        ];
        for n in 0..2 {
            for is in 0..2 {
                let mut s = [_mm256_setzero_ps(); 4];
                for g in 2 * is..2 * is + 2 {
                    // SAFETY: ql: 64n + 32 + 8g + 8 <= 128; qh: 128 + 32n + 8g + 8 <= 192;
                    // x: 128n + 96 + 8g + 8 <= 256.
                    unsafe {
                        let va = u8x8(bp.add(64 * n + 8 * g));
                        let vc = u8x8(bp.add(64 * n + 32 + 8 * g));
                        let h = u8x8(bp.add(128 + 32 * n + 8 * g));
                        let q1 = _mm256_or_si256(
                            _mm256_and_si256(va, m4),
                            _mm256_and_si256(_mm256_slli_epi32::<4>(h), m30),
                        );
                        let q2 = _mm256_or_si256(
                            _mm256_and_si256(vc, m4),
                            _mm256_and_si256(_mm256_slli_epi32::<2>(h), m30),
                        );
                        let q3 =
                            _mm256_or_si256(_mm256_srli_epi32::<4>(va), _mm256_and_si256(h, m30));
                        let q4 = _mm256_or_si256(
                            _mm256_srli_epi32::<4>(vc),
                            _mm256_and_si256(_mm256_srli_epi32::<2>(h), m30),
                        );
                        let q = [q1, q2, q3, q4];
                        for k in 0..4 {
                            let e = ps(_mm256_sub_epi32(q[k], k32));
                            s[k] = _mm256_fmadd_ps(e, ld(xp.add(128 * n + 32 * k + 8 * g)), s[k]);
                        }
                    }
                }
                for k in 0..4 {
                    let scale = d * f32::from(b[192 + 8 * n + is + 2 * k] as i8);
                    a[k] = _mm256_fmadd_ps(_mm256_set1_ps(scale), s[k], a[k]);
                }
            }
        }
        _mm256_add_ps(_mm256_add_ps(a[0], a[1]), _mm256_add_ps(a[2], a[3]))
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    fn dot_q6_k(blocks: &[[u8; 210]], xs: &[[f32; 256]]) -> f32 {
        four_chains!(blocks, xs, blk_q6_k)
    }

    // ---- Vectorized dequantization into a buffer (for dot_rows_multi and the K-quant dots).
    // These use FMA where the reference rounds twice, so they are not bit-exact.

    /// # Safety
    /// `p..p + 8` must be writable.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn st(p: *mut f32, v: __m256) {
        // SAFETY: per the function contract.
        unsafe { _mm256_storeu_ps(p, v) }
    }

    /// Eight u8 values from an array, converted to f32 lanes.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn u8x8_ps(v: &[u8; 8]) -> __m256 {
        // SAFETY: an 8-byte array.
        ps(unsafe { u8x8(v.as_ptr()) })
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn deq_k4(
        d: f32,
        dmin: f32,
        scales: &[u8; 12],
        qs: &[u8; 128],
        qh: Option<&[u8; 32]>,
        y: &mut [f32; 256],
    ) {
        let (sc, mn) = scales_mins_k4(scales);
        let mut ds = [0f32; 8];
        let mut dm = [0f32; 8];
        // SAFETY: 8-float arrays.
        unsafe {
            st(
                ds.as_mut_ptr(),
                _mm256_mul_ps(_mm256_set1_ps(d), u8x8_ps(&sc)),
            );
            st(
                dm.as_mut_ptr(),
                _mm256_mul_ps(_mm256_set1_ps(dmin), u8x8_ps(&mn)),
            );
        }
        let m4 = _mm256_set1_epi32(0x0F);
        let bit4 = _mm256_set1_epi32(0x10);
        let mut h = [_mm256_setzero_si256(); 4];
        if let Some(qh) = qh {
            for (g, h) in h.iter_mut().enumerate() {
                // SAFETY: 8g + 8 <= 32.
                *h = unsafe { u8x8(qh.as_ptr().add(8 * g)) };
            }
        }
        let qp = qs.as_ptr();
        let yp = y.as_mut_ptr();
        for j in 0..4 {
            let (dl, dh) = (_mm256_set1_ps(ds[2 * j]), _mm256_set1_ps(ds[2 * j + 1]));
            let (ml, mh) = (_mm256_set1_ps(dm[2 * j]), _mm256_set1_ps(dm[2 * j + 1]));
            for (g, h) in h.iter_mut().enumerate() {
                // SAFETY: 32j + 8g + 8 <= 128 bytes; 64j + 32 + 8g + 8 <= 256 floats.
                unsafe {
                    let v = u8x8(qp.add(32 * j + 8 * g));
                    let mut lo = _mm256_and_si256(v, m4);
                    let mut hi = _mm256_srli_epi32::<4>(v);
                    if qh.is_some() {
                        lo =
                            _mm256_or_si256(lo, _mm256_and_si256(_mm256_slli_epi32::<4>(*h), bit4));
                        hi =
                            _mm256_or_si256(hi, _mm256_and_si256(_mm256_slli_epi32::<3>(*h), bit4));
                        *h = _mm256_srli_epi32::<2>(*h);
                    }
                    st(yp.add(64 * j + 8 * g), _mm256_fmsub_ps(ps(lo), dl, ml));
                    st(yp.add(64 * j + 32 + 8 * g), _mm256_fmsub_ps(ps(hi), dh, mh));
                }
            }
        }
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn deq_q4_k(b: &[u8; 144], y: &mut [f32; 256]) {
        let (d, dmin) = (super::f16_le(b[0], b[1]), super::f16_le(b[2], b[3]));
        deq_k4(
            d,
            dmin,
            super::sub::<4, 12, 144>(b),
            super::sub::<16, 128, 144>(b),
            None,
            y,
        );
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn deq_q5_k(b: &[u8; 176], y: &mut [f32; 256]) {
        let (d, dmin) = (super::f16_le(b[0], b[1]), super::f16_le(b[2], b[3]));
        let qh = super::sub::<16, 32, 176>(b);
        deq_k4(
            d,
            dmin,
            super::sub::<4, 12, 176>(b),
            super::sub::<48, 128, 176>(b),
            Some(qh),
            y,
        );
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn deq_q6_k(b: &[u8; 210], y: &mut [f32; 256]) {
        let d = super::f16_le(b[208], b[209]);
        let m4 = _mm256_set1_epi32(0x0F);
        let m30 = _mm256_set1_epi32(0x30);
        let k32 = _mm256_set1_epi32(32);
        let mut ds = [0f32; 16];
        // SAFETY: bytes 192..208 of a 210-byte block; 16-float array.
        unsafe {
            let sc = _mm_loadu_si128(b.as_ptr().add(192).cast());
            let lo = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(sc));
            let hi = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128::<8>(sc)));
            st(ds.as_mut_ptr(), _mm256_mul_ps(_mm256_set1_ps(d), lo));
            st(ds.as_mut_ptr().add(8), _mm256_mul_ps(_mm256_set1_ps(d), hi));
        }
        let bp = b.as_ptr();
        let yp = y.as_mut_ptr();
        for n in 0..2 {
            for g in 0..4 {
                let is = g / 2;
                // SAFETY: ql: 64n + 32 + 8g + 8 <= 128; qh: 128 + 32n + 8g + 8 <= 192;
                // y: 128n + 96 + 8g + 8 <= 256.
                unsafe {
                    let va = u8x8(bp.add(64 * n + 8 * g));
                    let vc = u8x8(bp.add(64 * n + 32 + 8 * g));
                    let h = u8x8(bp.add(128 + 32 * n + 8 * g));
                    let q1 = _mm256_or_si256(
                        _mm256_and_si256(va, m4),
                        _mm256_and_si256(_mm256_slli_epi32::<4>(h), m30),
                    );
                    let q2 = _mm256_or_si256(
                        _mm256_and_si256(vc, m4),
                        _mm256_and_si256(_mm256_slli_epi32::<2>(h), m30),
                    );
                    let q3 = _mm256_or_si256(_mm256_srli_epi32::<4>(va), _mm256_and_si256(h, m30));
                    let q4 = _mm256_or_si256(
                        _mm256_srli_epi32::<4>(vc),
                        _mm256_and_si256(_mm256_srli_epi32::<2>(h), m30),
                    );
                    for (k, q) in [q1, q2, q3, q4].into_iter().enumerate() {
                        let e = ps(_mm256_sub_epi32(q, k32));
                        let scale = _mm256_set1_ps(ds[8 * n + is + 2 * k]);
                        st(yp.add(128 * n + 32 * k + 8 * g), _mm256_mul_ps(e, scale));
                    }
                }
            }
        }
    }

    /// Dot of a 256-float buffer with 256 activations into eight accumulators.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn acc256(w: &[f32; 256], x: &[f32; 256], acc: &mut [__m256; 8]) {
        for i in 0..4 {
            for (k, acc) in acc.iter_mut().enumerate() {
                // SAFETY: 64i + 8k + 8 <= 256 for both arrays.
                unsafe {
                    let o = 64 * i + 8 * k;
                    *acc = _mm256_fmadd_ps(ld(w.as_ptr().add(o)), ld(x.as_ptr().add(o)), *acc);
                }
            }
        }
    }

    macro_rules! buffered {
        ($blocks:expr, $xs:expr, $deq:ident) => {{
            let mut acc = [_mm256_setzero_ps(); 8];
            let mut buf = [0f32; 256];
            for (b, x) in $blocks.iter().zip($xs) {
                $deq(b, &mut buf);
                acc256(&buf, x, &mut acc);
            }
            let s0 = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
            let s1 = _mm256_add_ps(_mm256_add_ps(acc[4], acc[5]), _mm256_add_ps(acc[6], acc[7]));
            hsum(_mm256_add_ps(s0, s1))
        }};
    }

    /// Q4_K: vectorized dequantization into a stack buffer beats fusing the sub-block scales
    /// into the dot product here (fewer live registers, no per-sub-block reductions).
    #[target_feature(enable = "avx2,fma,f16c")]
    fn dot_q4_k(blocks: &[[u8; 144]], xs: &[[f32; 256]]) -> f32 {
        buffered!(blocks, xs, deq_q4_k)
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    fn dot_q5_k(blocks: &[[u8; 176]], xs: &[[f32; 256]]) -> f32 {
        buffered!(blocks, xs, deq_q5_k)
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn deq_q4_0(b: &[u8; 18], y: &mut [f32; 32]) {
        let d = f16_splat(b[0], b[1]);
        let m4 = _mm256_set1_epi32(0x0F);
        let eight = _mm256_set1_epi32(8);
        let (q, yp) = (b.as_ptr(), y.as_mut_ptr());
        // SAFETY: bytes 2..18 of an 18-byte block, floats 0..32 of a 32-float block.
        unsafe {
            let v0 = u8x8(q.add(2));
            let v1 = u8x8(q.add(10));
            let e = [
                _mm256_and_si256(v0, m4),
                _mm256_and_si256(v1, m4),
                _mm256_srli_epi32::<4>(v0),
                _mm256_srli_epi32::<4>(v1),
            ];
            for (k, e) in e.into_iter().enumerate() {
                st(
                    yp.add(8 * k),
                    _mm256_mul_ps(ps(_mm256_sub_epi32(e, eight)), d),
                );
            }
        }
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn deq_q4_1(b: &[u8; 20], y: &mut [f32; 32]) {
        let d = f16_splat(b[0], b[1]);
        let m = f16_splat(b[2], b[3]);
        let m4 = _mm256_set1_epi32(0x0F);
        let (q, yp) = (b.as_ptr(), y.as_mut_ptr());
        // SAFETY: bytes 4..20 of a 20-byte block, floats 0..32 of a 32-float block.
        unsafe {
            let v0 = u8x8(q.add(4));
            let v1 = u8x8(q.add(12));
            let e = [
                _mm256_and_si256(v0, m4),
                _mm256_and_si256(v1, m4),
                _mm256_srli_epi32::<4>(v0),
                _mm256_srli_epi32::<4>(v1),
            ];
            for (k, e) in e.into_iter().enumerate() {
                st(yp.add(8 * k), _mm256_fmadd_ps(ps(e), d, m));
            }
        }
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn deq_q8_0(b: &[u8; 34], y: &mut [f32; 32]) {
        let d = f16_splat(b[0], b[1]);
        let (q, yp) = (b.as_ptr(), y.as_mut_ptr());
        for k in 0..4 {
            // SAFETY: bytes 2 + 8k + 8 <= 34, floats 8k + 8 <= 32.
            unsafe { st(yp.add(8 * k), _mm256_mul_ps(i8x8_ps(q.add(2 + 8 * k)), d)) };
        }
    }

    /// F16 or BF16 elements to f32: eight at a time, then the tail.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn deq_half(bytes: &[u8], out: &mut [f32], bf16: bool) {
        let (hc, ht) = bytes.as_chunks::<16>();
        let (yc, yt) = out.as_chunks_mut::<8>();
        for (h, y) in hc.iter().zip(yc) {
            // SAFETY: a 16-byte array and an 8-float array.
            unsafe {
                let h = _mm_loadu_si128(h.as_ptr().cast());
                let v = if bf16 {
                    _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h)))
                } else {
                    _mm256_cvtph_ps(h)
                };
                st(y.as_mut_ptr(), v);
            }
        }
        for (h, y) in ht.as_chunks::<2>().0.iter().zip(yt) {
            *y = if bf16 {
                super::bf16_le(h[0], h[1])
            } else {
                super::f16_le(h[0], h[1])
            };
        }
    }

    /// `[dot(w, x) for x in xs]` for one row given as blocks, `N` vectors at a time: each
    /// block is decoded once (by `dec`, into a small stack buffer) and multiplied into `C`
    /// accumulators per vector. Returns the sums over the whole blocks only.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn multi<const TS: usize, const BS: usize, const N: usize, const C: usize>(
        blocks: &[[u8; TS]],
        xs: [&[f32]; N],
        dec: &impl Fn(&[u8; TS], &mut [f32; BS]),
    ) -> [f32; N] {
        const { assert!(BS.is_multiple_of(8 * C)) };
        let n = blocks.len() * BS;
        assert!(
            xs.iter().all(|x| x.len() >= n),
            "activation vector too short"
        );
        let mut acc = [[_mm256_setzero_ps(); C]; N];
        let mut w = [0f32; BS];
        for (i, b) in blocks.iter().enumerate() {
            dec(b, &mut w);
            for k0 in (0..BS / 8).step_by(C) {
                for c in 0..C {
                    let k = k0 + c;
                    // SAFETY: 8k + 8 <= BS (BS / 8 is a multiple of C), and
                    // BS * i + 8k + 8 <= n <= x.len() (asserted).
                    unsafe {
                        let wv = ld(w.as_ptr().add(8 * k));
                        for (acc, x) in acc.iter_mut().zip(&xs) {
                            let v = ld(x.as_ptr().add(BS * i + 8 * k));
                            acc[c] = _mm256_fmadd_ps(wv, v, acc[c]);
                        }
                    }
                }
            }
        }
        acc.map(|a| {
            hsum(
                a.into_iter()
                    .fold(_mm256_setzero_ps(), |s, v| _mm256_add_ps(s, v)),
            )
        })
    }

    /// Runs [`multi`] over `xs` in groups of four (then three, two, one).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn multi_groups<const TS: usize, const BS: usize>(
        blocks: &[[u8; TS]],
        xs: &[&[f32]],
        out: &mut [f32],
        dec: impl Fn(&[u8; TS], &mut [f32; BS]),
    ) {
        for (xs, out) in xs.chunks(4).zip(out.chunks_mut(4)) {
            match xs {
                [a, b, c, d] => {
                    out.copy_from_slice(&multi::<TS, BS, 4, 2>(blocks, [a, b, c, d], &dec))
                }
                [a, b, c] => out.copy_from_slice(&multi::<TS, BS, 3, 2>(blocks, [a, b, c], &dec)),
                [a, b] => out.copy_from_slice(&multi::<TS, BS, 2, 4>(blocks, [a, b], &dec)),
                [a] => out.copy_from_slice(&multi::<TS, BS, 1, 4>(blocks, [a], &dec)),
                _ => {}
            }
        }
    }

    /// F32/F16/BF16 rows: groups of 32 elements through [`multi_groups`], then the tail.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn multi_plain<const TS: usize>(
        bytes: &[u8],
        xs: &[&[f32]],
        out: &mut [f32],
        dec: impl Fn(&[u8; TS], &mut [f32; 32]),
        scalar: impl Fn(&[u8]) -> f32,
    ) {
        let (blocks, tail) = bytes.as_chunks::<TS>();
        multi_groups(blocks, xs, out, dec);
        let width = TS / 32;
        let head = blocks.len() * 32;
        for (o, x) in out.iter_mut().zip(xs) {
            for (w, x) in tail.chunks_exact(width).zip(&x[head..]) {
                *o = scalar(w).mul_add(*x, *o);
            }
        }
    }

    /// # Safety
    /// The CPU must support AVX2, FMA and F16C; every vector must have as many elements as the
    /// row (`bytes`), and `out` one slot per vector.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_rows_multi(ty: GgmlType, bytes: &[u8], xs: &[&[f32]], out: &mut [f32]) {
        let f32le = |b: &[u8]| f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        match ty {
            GgmlType::F32 => multi_plain(
                bytes,
                xs,
                out,
                |b: &[u8; 128], y| {
                    for (y, b) in y.iter_mut().zip(b.as_chunks::<4>().0) {
                        *y = f32::from_le_bytes(*b);
                    }
                },
                f32le,
            ),
            GgmlType::F16 => multi_plain(
                bytes,
                xs,
                out,
                |b: &[u8; 64], y| deq_half(b, y, false),
                |b| super::f16_le(b[0], b[1]),
            ),
            GgmlType::BF16 => multi_plain(
                bytes,
                xs,
                out,
                |b: &[u8; 64], y| deq_half(b, y, true),
                |b| super::bf16_le(b[0], b[1]),
            ),
            GgmlType::Q4_0 => multi_groups(bytes.as_chunks().0, xs, out, |b, y| deq_q4_0(b, y)),
            GgmlType::Q4_1 => multi_groups(bytes.as_chunks().0, xs, out, |b, y| deq_q4_1(b, y)),
            GgmlType::Q8_0 => multi_groups(bytes.as_chunks().0, xs, out, |b, y| deq_q8_0(b, y)),
            GgmlType::Q4_K => multi_groups(bytes.as_chunks().0, xs, out, |b, y| deq_q4_k(b, y)),
            GgmlType::Q5_K => multi_groups(bytes.as_chunks().0, xs, out, |b, y| deq_q5_k(b, y)),
            GgmlType::Q6_K => multi_groups(bytes.as_chunks().0, xs, out, |b, y| deq_q6_k(b, y)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic test randomness (splitmix64).
    struct Rng(u64);

    impl Rng {
        fn next_u64(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        }
        /// Uniform in [-1, 1).
        fn f32(&mut self) -> f32 {
            ((self.next_u64() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        }
        fn bytes(&mut self, n: usize) -> Vec<u8> {
            (0..n).map(|_| self.next_u64() as u8).collect()
        }
    }

    /// Byte offsets of the f16 scale fields inside one block.
    fn scale_offsets(ty: GgmlType) -> &'static [usize] {
        match ty {
            GgmlType::Q4_0 | GgmlType::Q8_0 => &[0],
            GgmlType::Q4_1 | GgmlType::Q4_K | GgmlType::Q5_K => &[0, 2],
            GgmlType::Q6_K => &[208],
            GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => &[],
        }
    }

    /// A random row of `n` elements with finite, sane values.
    fn random_row(ty: GgmlType, n: usize, rng: &mut Rng) -> Vec<u8> {
        let mut bytes = Vec::new();
        match ty {
            GgmlType::F32 => (0..n).for_each(|_| bytes.extend(rng.f32().to_le_bytes())),
            GgmlType::F16 => {
                (0..n).for_each(|_| bytes.extend(f16::from_f32(rng.f32()).to_le_bytes()))
            }
            GgmlType::BF16 => (0..n).for_each(|_| {
                bytes.extend(half::bf16::from_f32(rng.f32()).to_le_bytes());
            }),
            _ => {
                for _ in 0..n / ty.block_size() {
                    let mut block = rng.bytes(ty.type_size());
                    for &off in scale_offsets(ty) {
                        let s = f16::from_f32(rng.f32() * 0.05).to_le_bytes();
                        block[off..off + 2].copy_from_slice(&s);
                    }
                    bytes.extend(block);
                }
            }
        }
        bytes
    }

    fn random_vec(n: usize, rng: &mut Rng) -> Vec<f32> {
        (0..n).map(|_| rng.f32()).collect()
    }

    fn dequant(ty: GgmlType, bytes: &[u8], n: usize) -> Vec<f32> {
        let mut out = vec![0.0; n];
        dequantize_row(ty, bytes, &mut out).expect("valid row");
        out
    }

    /// Double-precision reference dot product and the scale to measure its error against.
    fn reference_dot(w: &[f32], x: &[f32]) -> (f64, f64) {
        let dot = w
            .iter()
            .zip(x)
            .map(|(a, b)| f64::from(*a) * f64::from(*b))
            .sum();
        let mag = w
            .iter()
            .zip(x)
            .map(|(a, b)| (f64::from(*a) * f64::from(*b)).abs())
            .sum();
        (dot, mag)
    }

    fn assert_close(got: f32, want: f64, mag: f64, what: &str) {
        let err = (f64::from(got) - want).abs();
        assert!(
            err <= 1e-4 * mag.max(want.abs()) + 1e-6,
            "{what}: got {got}, want {want} (|err| {err}, magnitude {mag})"
        );
    }

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len() / 2)
            .map(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).expect("hex"))
            .collect()
    }

    #[test]
    fn type_ids_and_sizes() {
        for ty in GgmlType::ALL {
            assert_eq!(GgmlType::try_from(ty.id()), Ok(ty));
        }
        assert_eq!(GgmlType::Q4_K.id(), 12);
        assert_eq!(GgmlType::BF16.id(), 30);
        let sizes: Vec<_> = GgmlType::ALL
            .iter()
            .map(|t| (t.name(), t.block_size(), t.type_size()))
            .collect();
        assert_eq!(
            sizes,
            [
                ("F32", 1, 4),
                ("F16", 1, 2),
                ("BF16", 1, 2),
                ("Q4_0", 32, 18),
                ("Q4_1", 32, 20),
                ("Q8_0", 32, 34),
                ("Q4_K", 256, 144),
                ("Q5_K", 256, 176),
                ("Q6_K", 256, 210)
            ]
        );
        let err = GgmlType::try_from(11).unwrap_err();
        assert_eq!(err.to_string(), "unsupported tensor type Q3_K (11)");
        assert_eq!(
            GgmlType::try_from(1000).unwrap_err().to_string(),
            "unknown tensor type id 1000"
        );
        assert_eq!(GgmlType::Q4_1.row_bytes(576), Ok(18 * 20));
        assert_eq!(GgmlType::Q6_K.row_bytes(512), Ok(420));
        assert_eq!(GgmlType::F16.row_bytes(3), Ok(6));
        assert!(matches!(
            GgmlType::Q4_K.row_bytes(576),
            Err(QuantError::NotBlockMultiple { .. })
        ));
        assert!(matches!(
            GgmlType::F32.row_bytes(usize::MAX),
            Err(QuantError::Overflow { .. })
        ));
    }

    /// Test vectors produced by gguf-py (tests/data/make_quant_vectors.py).
    #[test]
    fn dequantize_matches_reference_vectors() {
        let text = include_str!("../tests/data/quant_vectors.json");
        let doc: serde_json::Value = serde_json::from_str(text).expect("valid json");
        let rows = doc["rows"].as_array().expect("rows");
        let mut seen = std::collections::HashSet::new();
        for row in rows {
            let id = row["type_id"].as_u64().expect("type_id") as u32;
            let ty = GgmlType::try_from(id).expect("supported type");
            assert_eq!(ty.name(), row["type"].as_str().expect("type"));
            let n = row["n"].as_u64().expect("n") as usize;
            let bytes = hex(row["bytes"].as_str().expect("bytes"));
            let expected: Vec<f32> = hex(row["expected"].as_str().expect("expected"))
                .as_chunks::<4>()
                .0
                .iter()
                .map(|b| f32::from_le_bytes(*b))
                .collect();
            assert_eq!(expected.len(), n);
            let got = dequant(ty, &bytes, n);
            let mut fast = vec![0.0f32; n];
            dequantize_row_fast(ty, &bytes, &mut fast);
            let same = |a: &f32, b: &f32| a.to_bits() == b.to_bits() || a == b;
            assert!(
                got.iter().zip(&fast).all(|(a, b)| same(a, b)),
                "{ty}: fast dequantization differs"
            );
            for (i, (g, e)) in got.iter().zip(&expected).enumerate() {
                assert!(
                    g.to_bits() == e.to_bits() || (g == e),
                    "{ty} {} element {i}: got {g:e}, reference {e:e}",
                    row["kind"]
                );
            }
            // The dot products agree with the reference values too.
            let mut rng = Rng(u64::from(id) * 7919 + n as u64);
            let x = random_vec(n, &mut rng);
            let (want, mag) = reference_dot(&expected, &x);
            assert_close(dot_row(ty, &bytes, &x), want, mag, ty.name());
            seen.insert(ty);
        }
        assert_eq!(seen.len(), GgmlType::ALL.len(), "every type has vectors");
    }

    #[test]
    fn dot_row_matches_dequantized_dot() {
        let mut rng = Rng(1);
        for ty in GgmlType::ALL {
            for blocks in [1usize, 2, 3, 5, 18] {
                let n = blocks * ty.block_size().max(32) + if ty.block_size() == 1 { 7 } else { 0 };
                let bytes = random_row(ty, n, &mut rng);
                let w = dequant(ty, &bytes, n);
                let x = random_vec(n, &mut rng);
                let (want, mag) = reference_dot(&w, &x);
                assert_close(dot_row(ty, &bytes, &x), want, mag, ty.name());
                assert_close(portable::dot_row(ty, &bytes, &x), want, mag, ty.name());
                assert_close(dot_f32(&w, &x), want, mag, "dot_f32");
            }
        }
    }

    #[test]
    fn dot_rows_multi_matches_dot_row() {
        let mut rng = Rng(2);
        for ty in GgmlType::ALL {
            // Long enough to span several MULTI_CHUNK chunks, plus a partial one; F32/F16/BF16
            // rows also get a length with a tail that is not a whole 32-element group.
            let odd = if ty.block_size() == 1 { 1000 + 13 } else { 256 };
            for n in [256usize, 2560, 4096 + 512, odd] {
                let bytes = random_row(ty, n, &mut rng);
                let w = dequant(ty, &bytes, n);
                for batch in [0usize, 1, 2, 3, 4, 5, 9] {
                    let xs: Vec<Vec<f32>> = (0..batch).map(|_| random_vec(n, &mut rng)).collect();
                    let refs: Vec<&[f32]> = xs.iter().map(Vec::as_slice).collect();
                    let mut out = vec![f32::NAN; batch];
                    dot_rows_multi(ty, &bytes, &refs, &mut out);
                    let mut portable = vec![0.0; batch];
                    multi_chunks(ty, &bytes, &refs, &mut portable);
                    for ((o, p), x) in out.iter().zip(&portable).zip(&xs) {
                        let (want, mag) = reference_dot(&w, x);
                        assert_close(*o, want, mag, ty.name());
                        assert_close(*p, want, mag, ty.name());
                        assert_close(dot_row(ty, &bytes, x), f64::from(*o), mag, ty.name());
                    }
                }
            }
        }
    }

    #[test]
    fn bad_lengths_are_errors() {
        for ty in GgmlType::ALL {
            let n = ty.block_size().max(32) * 2;
            let good = ty.row_bytes(n).expect("row bytes");
            let bytes = vec![0u8; good + 1];
            let mut out = vec![0.0; n];
            for len in [0, 1, good - 1, good + 1] {
                let r = dequantize_row(ty, &bytes[..len], &mut out);
                assert!(
                    matches!(r, Err(QuantError::LengthMismatch { .. })),
                    "{ty} len {len}: {r:?}"
                );
            }
            if ty.block_size() > 1 {
                let r = dequantize_row(ty, &bytes[..good], &mut out[..n - 1]);
                assert!(
                    matches!(r, Err(QuantError::NotBlockMultiple { .. })),
                    "{r:?}"
                );
            }
            assert_eq!(dequantize_row(ty, &bytes[..good], &mut out), Ok(()));
        }
    }

    #[test]
    fn dot_row_length_mismatch_panics_with_message() {
        let r = std::panic::catch_unwind(|| dot_row(GgmlType::Q8_0, &[0u8; 33], &[0.0; 32]));
        assert!(r.is_err());
    }

    proptest::proptest! {
        /// Arbitrary bytes (any scale bit pattern, NaN and inf included) never panic, and
        /// arbitrary lengths are either accepted or rejected with an error.
        #[test]
        fn arbitrary_bytes_never_panic(
            ty_idx in 0usize..GgmlType::ALL.len(),
            bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..1200),
            n in 0usize..600,
        ) {
            let ty = GgmlType::ALL[ty_idx];
            let mut out = vec![0.0; n];
            let r = dequantize_row(ty, &bytes, &mut out);
            proptest::prop_assert_eq!(r.is_ok(), ty.row_bytes(n) == Ok(bytes.len()));
            if r.is_ok() {
                let x = vec![1.0; n];
                let _ = dot_row(ty, &bytes, &x);
            }
        }

        #[test]
        fn random_blocks_dot_matches(ty_idx in 0usize..GgmlType::ALL.len(), seed in 0u64..u64::MAX) {
            let ty = GgmlType::ALL[ty_idx];
            let mut rng = Rng(seed);
            let n = ty.block_size().max(32) * (1 + (seed % 4) as usize);
            let bytes = random_row(ty, n, &mut rng);
            let w = dequant(ty, &bytes, n);
            let x = random_vec(n, &mut rng);
            let (want, mag) = reference_dot(&w, &x);
            assert_close(dot_row(ty, &bytes, &x), want, mag, ty.name());
        }
    }

    /// Single-thread throughput of `dot_row` (AVX2 and portable) and `dot_rows_multi` (4
    /// vectors) on a 49152 x 576 matrix (an lm_head of a small model; 512 columns for the
    /// K-quants) and on an L2-resident 2048-row slice of it. Best of several passes.
    /// Run with `cargo test --release -- --ignored --nocapture bench_dot_row`
    /// (`BENCH_TYPES=Q4_1,Q8_0` to select types).
    #[test]
    #[ignore = "micro benchmark"]
    fn bench_dot_row() {
        use std::time::Instant;
        let mut rng = Rng(3);
        let x = random_vec(576, &mut rng);
        let xs: Vec<Vec<f32>> = (0..4).map(|_| random_vec(576, &mut rng)).collect();
        for ty in [
            GgmlType::Q4_1,
            GgmlType::Q8_0,
            GgmlType::Q4_0,
            GgmlType::Q4_K,
            GgmlType::Q5_K,
            GgmlType::Q6_K,
            GgmlType::F16,
        ] {
            if let Ok(only) = std::env::var("BENCH_TYPES")
                && !only.split(',').any(|t| t == ty.name())
            {
                continue;
            }
            let cols = if ty.block_size() == QK_K { 512 } else { 576 };
            let rb = ty.row_bytes(cols).expect("row bytes");
            let m = random_row(ty, cols * 49152, &mut rng);
            let x = &x[..cols];
            let xr: Vec<&[f32]> = xs.iter().map(|v| &v[..cols]).collect();
            for rows in [49152usize, 2048] {
                let m = &m[..rows * rb];
                let passes = if rows == 2048 { 200 } else { 15 };
                let run = |name: &str, f: &dyn Fn(&[u8]) -> f32| {
                    let mut best = f64::MAX;
                    let mut sink = 0.0;
                    for _ in 0..passes {
                        let t = Instant::now();
                        for r in m.chunks_exact(rb) {
                            sink += f(r);
                        }
                        best = best.min(t.elapsed().as_secs_f64());
                    }
                    println!(
                        "{ty:5} {name:9} {rows:5}x{cols}: {:6.2} GB/s of weights, {:8.1} us/matrix ({sink:.0})",
                        m.len() as f64 / best / 1e9,
                        best * 1e6
                    );
                };
                run("dot_row", &|r| dot_row(ty, r, x));
                run("portable", &|r| portable::dot_row(ty, r, x));
                run("multi x4", &|r| {
                    let mut out = [0f32; 4];
                    dot_rows_multi(ty, r, &xr, &mut out);
                    out[0]
                });
            }
        }
    }
}
