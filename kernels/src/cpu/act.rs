//! Activations and small reductions.

/// SwiGLU: `out[i] = silu(gate[i]) * up[i]`, with `silu(x) = x / (1 + e^-x)`.
pub fn silu_and_mul(gate: &[f32], up: &[f32], out: &mut [f32]) {
    for ((o, g), u) in out.iter_mut().zip(gate).zip(up) {
        *o = g / (1.0 + (-g).exp()) * u;
    }
}

/// Numerically stable softmax over `x`.
pub fn softmax_in_place(x: &mut [f32]) {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0f32;
    for v in x.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    let inv = 1.0 / sum;
    for v in x.iter_mut() {
        *v *= inv;
    }
}

/// Index of the largest value; the lowest index wins ties (so greedy decoding is
/// deterministic). NaN never wins. Returns 0 for an empty slice.
pub fn argmax(x: &[f32]) -> usize {
    let mut best = 0;
    let mut best_v = f32::NEG_INFINITY;
    for (i, &v) in x.iter().enumerate() {
        if v > best_v {
            best = i;
            best_v = v;
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argmax_lowest_index_on_ties_and_ignores_nan() {
        assert_eq!(argmax(&[1.0, 3.0, 3.0, 2.0]), 1);
        assert_eq!(argmax(&[f32::NAN, 0.5, 0.25]), 1);
    }

    #[test]
    fn softmax_sums_to_one() {
        let mut x = vec![1000.0, 1001.0, 999.0];
        softmax_in_place(&mut x);
        assert!((x.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert!(x[1] > x[0] && x[0] > x[2]);
    }

    #[test]
    fn silu_matches_definition() {
        let mut out = [0.0; 3];
        silu_and_mul(&[0.0, 1.0, -2.0], &[2.0, 3.0, 1.0], &mut out);
        assert_eq!(out[0], 0.0);
        assert!((out[1] - 3.0 / (1.0 + (-1.0f32).exp())).abs() < 1e-6);
        assert!((out[2] - (-2.0 / (1.0 + 2.0f32.exp()))).abs() < 1e-6);
    }
}
