//! RMSNorm, plain and fused with the residual add.

/// `out = x / sqrt(mean(x^2) + eps) * weight`.
pub fn rms_norm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    let ss = super::dot(x, x);
    let scale = 1.0 / (ss / x.len() as f32 + eps).sqrt();
    for ((o, xi), w) in out.iter_mut().zip(x).zip(weight) {
        *o = xi * scale * w;
    }
}

/// Fused residual add + RMSNorm: `residual += x; out = rms_norm(residual)`.
pub fn add_rms_norm(residual: &mut [f32], x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    for (r, xi) in residual.iter_mut().zip(x) {
        *r += xi;
    }
    rms_norm(residual, weight, eps, out);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rms_norm_unit_rms() {
        let x = [3.0f32, -4.0, 0.0, 5.0];
        let mut out = [0.0; 4];
        rms_norm(&x, &[1.0; 4], 0.0, &mut out);
        let rms = (out.iter().map(|v| v * v).sum::<f32>() / 4.0).sqrt();
        assert!((rms - 1.0).abs() < 1e-6);
    }

    #[test]
    fn add_rms_norm_updates_residual() {
        let mut r = [1.0f32, 2.0];
        let mut out = [0.0; 2];
        add_rms_norm(&mut r, &[1.0, -2.0], &[2.0, 2.0], 0.0, &mut out);
        assert_eq!(r, [2.0, 0.0]);
        assert!((out[0] - 2.0 * 2.0 / 2f32.sqrt()).abs() < 1e-5);
    }
}
