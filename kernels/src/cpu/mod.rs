//! CPU reference kernels (f32). Each function is the semantic definition of the kernel of
//! the same name in `kernels/cuda/`.

mod act;
mod attention;
mod norm;
mod rope;

pub use act::{argmax, silu_and_mul, softmax_in_place};
pub use attention::{PagedAttention, dense_causal_attention};
pub use norm::{add_rms_norm, rms_norm};
pub use rope::{RopeStyle, RopeTable, rope_and_write_kv};

/// Dot product with eight independent accumulators so that LLVM emits packed FMAs.
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    let mut acc = [0.0f32; 8];
    let ca = a.chunks_exact(8);
    let cb = b.chunks_exact(8);
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] = x[i].mul_add(y[i], acc[i]);
        }
    }
    let mut tail = 0.0f32;
    for (x, y) in ra.iter().zip(rb) {
        tail = x.mul_add(*y, tail);
    }
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + tail
}

/// `y += a * x`.
#[inline]
pub fn axpy(a: f32, x: &[f32], y: &mut [f32]) {
    for (yi, xi) in y.iter_mut().zip(x) {
        *yi = a.mul_add(*xi, *yi);
    }
}
