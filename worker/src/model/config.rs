//! The one model description every loader produces and every backend consumes.

use kernels::cpu::RopeStyle;

/// RoPE frequency scaling.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    None,
    /// Positions divided by `factor`.
    Linear {
        factor: f64,
    },
    /// Llama 3.1 style: low frequencies divided by `factor`, high kept, smooth between.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position: f64,
    },
    /// Per-frequency divisors given by the file (GGUF `rope_freqs.weight`).
    FreqFactors(Vec<f32>),
}

/// A Llama-family decoder: RMSNorm, RoPE, GQA attention, SwiGLU MLP.
#[derive(Debug, Clone)]
pub struct ModelConfig {
    /// Display name (from the file's metadata or directory name).
    pub name: String,
    pub n_layers: usize,
    pub hidden: usize,
    pub intermediate: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub rms_eps: f32,
    pub rope_base: f64,
    /// Dimensions of each head that are rotated (usually `head_dim`).
    pub rope_dim: usize,
    pub rope_style: RopeStyle,
    pub rope_scaling: RopeScaling,
    /// Longest context the model was trained for.
    pub max_context: usize,
    /// Output projection shares the embedding matrix.
    pub tie_embeddings: bool,
}

impl ModelConfig {
    /// Angular frequency of each rotated pair, scaling applied.
    pub fn rope_inv_freq(&self) -> Vec<f64> {
        let base = kernels::cpu::RopeTable::inv_freq(self.rope_base, self.rope_dim);
        match &self.rope_scaling {
            RopeScaling::None => base,
            RopeScaling::Linear { factor } => base.iter().map(|f| f / factor).collect(),
            RopeScaling::FreqFactors(ff) => {
                base.iter().zip(ff).map(|(f, d)| f / *d as f64).collect()
            }
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position,
            } => {
                let low_wavelen = original_max_position / low_freq_factor;
                let high_wavelen = original_max_position / high_freq_factor;
                base.iter()
                    .map(|&f| {
                        let wavelen = 2.0 * std::f64::consts::PI / f;
                        if wavelen < high_wavelen {
                            f
                        } else if wavelen > low_wavelen {
                            f / factor
                        } else {
                            let smooth = (original_max_position / wavelen - low_freq_factor)
                                / (high_freq_factor - low_freq_factor);
                            (1.0 - smooth) * f / factor + smooth * f
                        }
                    })
                    .collect()
            }
        }
    }

    /// Check internal consistency; `what` names the source for the message.
    pub fn validate(&self) -> Result<(), String> {
        let checks: [(bool, &str); 7] = [
            (self.n_layers > 0, "block count is 0"),
            (
                self.hidden > 0 && self.intermediate > 0,
                "hidden or feed-forward size is 0",
            ),
            (self.n_heads > 0 && self.n_kv_heads > 0, "head count is 0"),
            (
                self.n_heads.is_multiple_of(self.n_kv_heads),
                "head count is not a multiple of the KV head count",
            ),
            (
                self.head_dim > 0 && self.head_dim.is_multiple_of(2),
                "head dimension must be even and > 0",
            ),
            (
                self.rope_dim <= self.head_dim && self.rope_dim.is_multiple_of(2),
                "rope dimension invalid",
            ),
            (self.vocab_size > 0, "vocabulary is empty"),
        ];
        for (ok, msg) in checks {
            if !ok {
                return Err(msg.to_string());
            }
        }
        if let RopeScaling::FreqFactors(ff) = &self.rope_scaling
            && ff.len() != self.rope_dim / 2
        {
            return Err(format!(
                "rope_freqs has {} entries, expected {}",
                ff.len(),
                self.rope_dim / 2
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(scaling: RopeScaling) -> ModelConfig {
        ModelConfig {
            name: "t".into(),
            n_layers: 1,
            hidden: 64,
            intermediate: 128,
            n_heads: 4,
            n_kv_heads: 2,
            head_dim: 16,
            vocab_size: 10,
            rms_eps: 1e-5,
            rope_base: 500000.0,
            rope_dim: 16,
            rope_style: RopeStyle::Half,
            rope_scaling: scaling,
            max_context: 128,
            tie_embeddings: true,
        }
    }

    #[test]
    fn llama3_scaling_keeps_high_and_divides_low_frequencies() {
        let plain = cfg(RopeScaling::None).rope_inv_freq();
        let scaled = cfg(RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position: 8192.0,
        })
        .rope_inv_freq();
        assert_eq!(plain[0], scaled[0]);
        let last = plain.len() - 1;
        assert!((scaled[last] - plain[last] / 8.0).abs() < 1e-15);
        assert!(cfg(RopeScaling::None).validate().is_ok());
    }
}
