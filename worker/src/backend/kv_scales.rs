//! Per-(layer, KV head) scales of an FP8 (e4m3) KV cache, and their calibration.
//!
//! A value `x` of head `h` in layer `l` is stored as `e4m3(x / scale[l][h])`. e4m3 keeps
//! 1/16 relative precision for magnitudes from 2^-6 to 448 and saturates above, so the
//! best scale maps a head's largest magnitude near 448: then its small values stay normal
//! numbers instead of flushing towards zero. Scale 1.0 everywhere (the default) suits
//! heads whose values span about 0.02 to 448.
//!
//! `worker calibrate-kv` measures each head's largest |K| (after RoPE, as cached) and |V|
//! over a calibration text with the CPU backend's f32 cache and writes
//! `scale = absmax / 448` per head to a JSON file that `--kv-cache-scales` loads:
//!
//! ```json
//! {"format": "sovereign-kv-scales/1", "k": [[0.031, ...], ...], "v": [[...], ...],
//!  "source": {"model": "...", "tokens": 512}}
//! ```
//! `k` and `v` hold one list per layer of one scale per KV head.

use std::path::Path;

use serde::Deserialize;

/// The largest finite e4m3 ("e4m3fn") magnitude.
pub const E4M3_MAX: f32 = 448.0;

/// The `format` field a scales file carries.
pub const FORMAT: &str = "sovereign-kv-scales/1";

#[derive(Debug, thiserror::Error)]
pub enum KvScalesError {
    #[error("cannot read KV scales file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("KV scales file {path} is not valid JSON of the expected shape: {source}")]
    Parse {
        path: String,
        source: serde_json::Error,
    },
    #[error("KV scales file {path}: {reason}")]
    Invalid { path: String, reason: String },
}

/// One scale per (layer, KV head) for K and for V.
#[derive(Debug, Clone, PartialEq)]
pub struct KvScales {
    /// `k[layer][kv_head]`.
    pub k: Vec<Vec<f32>>,
    /// `v[layer][kv_head]`.
    pub v: Vec<Vec<f32>>,
}

#[derive(Deserialize)]
struct File {
    format: Option<String>,
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
}

impl KvScales {
    /// The same scale for every head.
    pub fn uniform(layers: usize, kv_heads: usize, scale: f32) -> Self {
        Self {
            k: vec![vec![scale; kv_heads]; layers],
            v: vec![vec![scale; kv_heads]; layers],
        }
    }

    /// Scales that map each head's largest magnitude to [`E4M3_MAX`]; a head that never
    /// saw a nonzero finite value keeps 1.0.
    pub fn from_absmax(k: &[Vec<f32>], v: &[Vec<f32>]) -> Self {
        let scale = |m: &f32| {
            if m.is_finite() && *m > 0.0 {
                // Never below the smallest normal f32 scale a division stays exact in.
                (m / E4M3_MAX).max(f32::MIN_POSITIVE)
            } else {
                1.0
            }
        };
        let map = |a: &[Vec<f32>]| a.iter().map(|l| l.iter().map(scale).collect()).collect();
        Self {
            k: map(k),
            v: map(v),
        }
    }

    /// Whether these scales fit a model of `layers` layers and `kv_heads` KV heads, every
    /// scale a positive normal finite number; the reason when not.
    pub fn check(&self, layers: usize, kv_heads: usize) -> Result<(), String> {
        for (name, t) in [("k", &self.k), ("v", &self.v)] {
            if t.len() != layers {
                return Err(format!(
                    "`{name}` has {} layers, the model {layers}",
                    t.len()
                ));
            }
            for (l, row) in t.iter().enumerate() {
                if row.len() != kv_heads {
                    return Err(format!(
                        "`{name}` layer {l} has {} scales, the model {kv_heads} KV heads",
                        row.len()
                    ));
                }
                if let Some((h, s)) = row
                    .iter()
                    .enumerate()
                    .find(|(_, s)| !s.is_normal() || **s < 0.0)
                {
                    return Err(format!(
                        "`{name}` layer {l} head {h}: scale {s} is not a positive normal number"
                    ));
                }
            }
        }
        Ok(())
    }

    /// Reads a scales file (see the module docs) for a model of `layers` layers and
    /// `kv_heads` KV heads.
    pub fn load(path: &Path, layers: usize, kv_heads: usize) -> Result<Self, KvScalesError> {
        let p = path.display().to_string();
        let text = std::fs::read(path).map_err(|source| KvScalesError::Read {
            path: p.clone(),
            source,
        })?;
        let f: File = serde_json::from_slice(&text).map_err(|source| KvScalesError::Parse {
            path: p.clone(),
            source,
        })?;
        if let Some(fmt) = f.format.as_deref().filter(|f| *f != FORMAT) {
            return Err(KvScalesError::Invalid {
                path: p,
                reason: format!("format {fmt:?}, expected {FORMAT:?}"),
            });
        }
        let s = Self { k: f.k, v: f.v };
        s.check(layers, kv_heads)
            .map_err(|reason| KvScalesError::Invalid { path: p, reason })?;
        Ok(s)
    }

    /// The file's JSON, with `source` (what they were calibrated on) alongside.
    pub fn to_json(&self, source: serde_json::Value) -> serde_json::Value {
        serde_json::json!({"format": FORMAT, "k": self.k, "v": self.v, "source": source})
    }
}

/// The largest |K| and |V| per (layer, KV head) seen so far.
#[derive(Debug, Clone, PartialEq)]
pub struct KvAbsMax {
    pub k: Vec<Vec<f32>>,
    pub v: Vec<Vec<f32>>,
}

impl KvAbsMax {
    pub fn new(layers: usize, kv_heads: usize) -> Self {
        Self {
            k: vec![vec![0.0; kv_heads]; layers],
            v: vec![vec![0.0; kv_heads]; layers],
        }
    }

    /// Takes one cached row of layer `layer` (`kv_heads * head_dim` values each of K and
    /// V) into account. NaN is ignored (`f32::max`).
    pub fn observe(&mut self, layer: usize, head_dim: usize, k: &[f32], v: &[f32]) {
        for (m, row) in [(&mut self.k[layer], k), (&mut self.v[layer], v)] {
            for (mh, head) in m.iter_mut().zip(row.chunks_exact(head_dim)) {
                *mh = head.iter().fold(*mh, |a, x| a.max(x.abs()));
            }
        }
    }

    pub fn scales(&self) -> KvScales {
        KvScales::from_absmax(&self.k, &self.v)
    }
}

/// The default calibration text: short administrative passages in thirteen EU languages
/// with figures, dates and codes (written for this project).
pub const DEFAULT_CALIBRATION_TEXT: &str = include_str!("calibration.txt");

/// Runs `tokens` (at most the model's context) as one sequence through a CPU backend with
/// an f32 cache, in prefill chunks of `chunk` tokens, and returns the scales of what it
/// cached. `progress(done, total)` is called after each chunk.
pub fn calibrate(
    cfg: &crate::model::ModelConfig,
    weights: std::sync::Arc<crate::model::Weights>,
    tokens: &[u32],
    chunk: usize,
    threads: usize,
    mut progress: impl FnMut(usize, usize),
) -> Result<KvScales, super::BackendError> {
    use super::Backend;
    if tokens.is_empty() {
        return Err(super::BackendError::KvScales(
            "no calibration tokens".into(),
        ));
    }
    const BLOCK: usize = 16;
    let blocks = tokens.len().div_ceil(BLOCK);
    let mut be =
        super::cpu::CpuBackend::new(cfg.clone(), weights, blocks, BLOCK, threads)?.with_kv_absmax();
    let table: Vec<u32> = (0..blocks as u32).collect();
    let mut start = 0;
    while start < tokens.len() {
        let end = (start + chunk.max(1)).min(tokens.len());
        be.forward(&[super::SeqChunk {
            tokens: &tokens[start..end],
            start,
            block_table: &table,
            want_logits: false,
        }])?;
        start = end;
        progress(start, tokens.len());
    }
    Ok(be
        .kv_absmax()
        .map(KvAbsMax::scales)
        .unwrap_or_else(|| KvScales::uniform(cfg.n_layers, cfg.n_kv_heads, 1.0)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn absmax_maps_to_the_largest_e4m3_value() {
        let mut a = KvAbsMax::new(2, 2);
        a.observe(0, 2, &[1.0, -3.0, 0.5, 0.25], &[0.0, 0.0, -896.0, 1.0]);
        a.observe(0, 2, &[f32::NAN, 2.0, 0.0, 0.0], &[0.0, 0.0, 0.0, 0.0]);
        assert_eq!(a.k, vec![vec![3.0, 0.5], vec![0.0, 0.0]]);
        assert_eq!(a.v, vec![vec![0.0, 896.0], vec![0.0, 0.0]]);
        let s = a.scales();
        assert_eq!(s.k[0], vec![3.0 / 448.0, 0.5 / 448.0]);
        // Heads that saw nothing keep 1.0.
        assert_eq!(s.v[0], vec![1.0, 2.0]);
        assert_eq!(s.k[1], vec![1.0, 1.0]);
        s.check(2, 2).unwrap();
    }

    #[test]
    fn files_of_the_wrong_shape_or_values_are_refused() {
        let dir = std::env::temp_dir().join(format!("sov-kv-scales-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let write = |name: &str, text: &str| {
            let p = dir.join(name);
            std::fs::write(&p, text).unwrap();
            p
        };
        let good = KvScales::uniform(2, 3, 0.5);
        let p = write(
            "good.json",
            &good.to_json(serde_json::json!({})).to_string(),
        );
        assert_eq!(KvScales::load(&p, 2, 3).unwrap(), good);
        let err =
            |p: &Path, layers, heads| KvScales::load(p, layers, heads).unwrap_err().to_string();
        assert!(err(&p, 3, 3).contains("has 2 layers, the model 3"));
        assert!(err(&p, 2, 4).contains("has 3 scales, the model 4 KV heads"));
        let p = write("neg.json", r#"{"k": [[1.0], [-1.0]], "v": [[1.0], [1.0]]}"#);
        assert!(err(&p, 2, 1).contains("`k` layer 1 head 0: scale -1"));
        let p = write("zero.json", r#"{"k": [[1.0], [1.0]], "v": [[0.0], [1.0]]}"#);
        assert!(err(&p, 2, 1).contains("`v` layer 0 head 0: scale 0"));
        let p = write("fmt.json", r#"{"format": "other/2", "k": [], "v": []}"#);
        assert!(err(&p, 0, 1).contains("format \"other/2\""));
        let p = write("bad.json", r#"{"k": [[1.0]]}"#);
        assert!(err(&p, 1, 1).contains("not valid JSON of the expected shape"));
        assert!(err(&dir.join("missing.json"), 1, 1).contains("cannot read KV scales file"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
