//! Weight storage (`Matrix`: quantized or float rows, borrowed from a memory map or owned)
//! and the GGUF loader that fills `Weights` + `ModelConfig` + `Tokenizer`.

use std::path::Path;
use std::sync::Arc;

use memmap2::Mmap;
use rayon::prelude::*;

use super::config::{ModelConfig, RopeScaling};
use super::gguf::{GgufError, GgufFile, Value};
use super::{LoadError, LoadedModel};
use crate::quant::{self, GgmlType};
use crate::tokenizer::{Tokenizer, TokenizerSpec, VocabKind};
use kernels::cpu::RopeStyle;

/// Bytes of a matrix: a window of a memory-mapped file, or an owned buffer (fused or
/// converted matrices).
#[derive(Clone)]
pub(crate) enum Storage {
    Mapped {
        map: Arc<Mmap>,
        start: usize,
        len: usize,
    },
    Owned(Arc<Vec<u8>>),
}

/// A row-major `[rows][cols]` matrix whose rows are stored in a GGML element format
/// (`rows` = output features, `cols` = input features).
#[derive(Clone)]
pub struct Matrix {
    pub name: String,
    pub ty: GgmlType,
    pub rows: usize,
    pub cols: usize,
    row_bytes: usize,
    storage: Storage,
}

impl Matrix {
    pub(crate) fn new(
        name: &str,
        ty: GgmlType,
        rows: usize,
        cols: usize,
        storage: Storage,
    ) -> Result<Self, String> {
        let row_bytes = ty.row_bytes(cols).map_err(|e| e.to_string())?;
        let len = match &storage {
            Storage::Mapped { len, .. } => *len,
            Storage::Owned(v) => v.len(),
        };
        if len != row_bytes * rows {
            return Err(format!(
                "{len} bytes of data, expected {} for [{rows} x {cols}] {ty:?}",
                row_bytes * rows
            ));
        }
        Ok(Self {
            name: name.into(),
            ty,
            rows,
            cols,
            row_bytes,
            storage,
        })
    }

    /// An owned f32 matrix (tests and random-weight models).
    pub fn from_f32(name: &str, rows: usize, cols: usize, data: &[f32]) -> Self {
        let bytes: Vec<u8> = data.iter().flat_map(|v| v.to_le_bytes()).collect();
        Self {
            name: name.into(),
            ty: GgmlType::F32,
            rows,
            cols,
            row_bytes: cols * 4,
            storage: Storage::Owned(Arc::new(bytes)),
        }
    }

    pub fn bytes(&self) -> &[u8] {
        match &self.storage {
            Storage::Mapped { map, start, len } => &map[*start..*start + *len],
            Storage::Owned(v) => v,
        }
    }

    pub fn row(&self, r: usize) -> &[u8] {
        &self.bytes()[r * self.row_bytes..(r + 1) * self.row_bytes]
    }

    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        // Row sizes were validated at construction, so this cannot fail.
        let _ = quant::dequantize_row(self.ty, self.row(r), out);
    }

    /// Stack matrices with the same type and width (q|k|v, gate|up) into one, so a step
    /// makes one pass over the activations instead of several.
    pub fn concat_rows(name: &str, parts: &[&Matrix]) -> Option<Matrix> {
        let first = parts.first()?;
        if parts
            .iter()
            .any(|m| m.ty != first.ty || m.cols != first.cols)
        {
            return None;
        }
        let mut bytes = Vec::with_capacity(parts.iter().map(|m| m.bytes().len()).sum());
        for m in parts {
            bytes.extend_from_slice(m.bytes());
        }
        let rows = parts.iter().map(|m| m.rows).sum();
        Matrix::new(
            name,
            first.ty,
            rows,
            first.cols,
            Storage::Owned(Arc::new(bytes)),
        )
        .ok()
    }

    /// `out[t][r] = sum_c self[r][c] * xs[t][c]` for `t < n_tokens`, on the current rayon
    /// pool (see [`crate::gemm`]).
    pub fn matmul(&self, xs: &[f32], n_tokens: usize, out: &mut [f32]) {
        crate::gemm::matmul(self, xs, n_tokens, out);
    }

    /// Dequantize every row and fail on the first non-finite value: catches corrupt
    /// scales or data that the container checks cannot see.
    pub fn check_finite(&self) -> Result<(), String> {
        let bad = (0..self.rows).into_par_iter().find_first(|&r| {
            let mut buf = vec![0.0f32; self.cols];
            quant::dequantize_row(self.ty, self.row(r), &mut buf).is_err()
                || buf.iter().any(|v| !v.is_finite())
        });
        match bad {
            Some(r) => Err(format!(
                "row {r} holds a non-finite or undecodable value (corrupt data)"
            )),
            None => Ok(()),
        }
    }
}

/// One decoder layer.
#[derive(Clone)]
pub struct LayerWeights {
    pub attn_norm: Vec<f32>,
    /// q, k and v projections stacked: rows `[n_heads*hd | n_kv*hd | n_kv*hd]`.
    pub wqkv: Matrix,
    /// Optional q|k|v bias (Qwen2-style models).
    pub bqkv: Option<Vec<f32>>,
    pub wo: Matrix,
    pub ffn_norm: Vec<f32>,
    /// gate and up projections stacked: rows `[intermediate | intermediate]`.
    pub w_gate_up: Matrix,
    pub w_down: Matrix,
}

#[derive(Clone)]
pub struct Weights {
    pub embed: Matrix,
    pub layers: Vec<LayerWeights>,
    pub final_norm: Vec<f32>,
    /// The output projection; a clone of `embed` (same bytes) when tied.
    pub output: Matrix,
}

impl Weights {
    /// Every matrix, for integrity checks and statistics.
    pub fn matrices(&self) -> Vec<&Matrix> {
        let mut v = vec![&self.embed, &self.output];
        for l in &self.layers {
            v.extend([&l.wqkv, &l.wo, &l.w_gate_up, &l.w_down]);
        }
        v
    }

    pub fn total_bytes(&self) -> usize {
        self.matrices()
            .iter()
            .map(|m| m.bytes().len())
            .sum::<usize>()
    }
}

/// Build `Weights` from named tensors, checking every shape. `get` returns a matrix by
/// name (`None` when absent); `vector` returns an f32 vector by name.
pub(crate) struct WeightSource<'a> {
    pub file: String,
    pub get: &'a dyn Fn(&str) -> Result<Option<Matrix>, LoadError>,
}

impl WeightSource<'_> {
    fn invalid(&self, reason: String) -> LoadError {
        LoadError::Invalid {
            file: self.file.clone(),
            reason,
        }
    }

    pub fn matrix(&self, name: &str, rows: usize, cols: usize) -> Result<Matrix, LoadError> {
        let m =
            (self.get)(name)?.ok_or_else(|| self.invalid(format!("tensor `{name}` is missing")))?;
        if m.rows != rows || m.cols != cols {
            return Err(self.invalid(format!(
                "tensor `{name}`: shape [{} x {}], expected [{rows} x {cols}]",
                m.rows, m.cols
            )));
        }
        // Checked per file tensor, before q/k/v and gate/up are fused, so that a corrupt
        // tensor is reported under its own name.
        m.check_finite()
            .map_err(|r| self.invalid(format!("tensor `{name}`: {r}")))?;
        Ok(m)
    }

    pub fn vector(&self, name: &str, len: usize) -> Result<Vec<f32>, LoadError> {
        let m = self.matrix(name, 1, len).or_else(|_| {
            // Vectors may come as [len] (rows 1) from either format.
            (self.get)(name)?
                .filter(|m| m.rows * m.cols == len)
                .ok_or_else(|| {
                    self.invalid(format!("tensor `{name}` is missing or not of length {len}"))
                })
        })?;
        let mut out = vec![0.0; len];
        for r in 0..m.rows {
            m.dequantize_row(r, &mut out[r * m.cols..(r + 1) * m.cols]);
        }
        if out.iter().any(|v| !v.is_finite()) {
            return Err(self.invalid(format!("tensor `{name}`: non-finite values (corrupt data)")));
        }
        Ok(out)
    }

    fn optional_vector(&self, name: &str, len: usize) -> Result<Option<Vec<f32>>, LoadError> {
        if (self.get)(name)?.is_none() {
            return Ok(None);
        }
        self.vector(name, len).map(Some)
    }

    /// Assemble a Llama with the given tensor naming.
    pub fn llama(&self, cfg: &ModelConfig, names: &TensorNames) -> Result<Weights, LoadError> {
        let (h, hd) = (cfg.hidden, cfg.head_dim);
        let q_rows = cfg.n_heads * hd;
        let kv_rows = cfg.n_kv_heads * hd;
        let embed = self.matrix(names.embed, cfg.vocab_size, h)?;
        let output = match (self.get)(names.output)? {
            Some(_) => self.matrix(names.output, cfg.vocab_size, h)?,
            None => embed.clone(),
        };
        let mut layers = Vec::with_capacity(cfg.n_layers);
        for i in 0..cfg.n_layers {
            let n = |suffix: &str| names.layer(i, suffix);
            let wq = self.matrix(&n(names.q), q_rows, h)?;
            let wk = self.matrix(&n(names.k), kv_rows, h)?;
            let wv = self.matrix(&n(names.v), kv_rows, h)?;
            let wqkv = Matrix::concat_rows(&n("qkv"), &[&wq, &wk, &wv]).ok_or_else(|| {
                self.invalid(format!("layer {i}: q/k/v tensors differ in element type"))
            })?;
            let bqkv = match (
                self.optional_vector(&n(names.q_bias), q_rows)?,
                self.optional_vector(&n(names.k_bias), kv_rows)?,
                self.optional_vector(&n(names.v_bias), kv_rows)?,
            ) {
                (Some(q), Some(k), Some(v)) => Some([q, k, v].concat()),
                (None, None, None) => None,
                _ => {
                    return Err(self.invalid(format!(
                        "layer {i}: q/k/v biases must be all present or all absent"
                    )));
                }
            };
            let gate = self.matrix(&n(names.gate), cfg.intermediate, h)?;
            let up = self.matrix(&n(names.up), cfg.intermediate, h)?;
            let w_gate_up = Matrix::concat_rows(&n("gate_up"), &[&gate, &up]).ok_or_else(|| {
                self.invalid(format!("layer {i}: gate/up tensors differ in element type"))
            })?;
            layers.push(LayerWeights {
                attn_norm: self.vector(&n(names.attn_norm), h)?,
                wqkv,
                bqkv,
                wo: self.matrix(&n(names.o), h, q_rows)?,
                ffn_norm: self.vector(&n(names.ffn_norm), h)?,
                w_gate_up,
                w_down: self.matrix(&n(names.down), h, cfg.intermediate)?,
            });
        }
        let final_norm = self.vector(names.final_norm, h)?;
        Ok(Weights {
            embed,
            layers,
            final_norm,
            output,
        })
    }
}

/// Tensor naming scheme of a file format.
pub(crate) struct TensorNames {
    pub embed: &'static str,
    pub output: &'static str,
    pub final_norm: &'static str,
    pub layer_prefix: &'static str,
    pub attn_norm: &'static str,
    pub q: &'static str,
    pub k: &'static str,
    pub v: &'static str,
    pub q_bias: &'static str,
    pub k_bias: &'static str,
    pub v_bias: &'static str,
    pub o: &'static str,
    pub ffn_norm: &'static str,
    pub gate: &'static str,
    pub up: &'static str,
    pub down: &'static str,
}

impl TensorNames {
    fn layer(&self, i: usize, suffix: &str) -> String {
        format!("{}{i}.{suffix}", self.layer_prefix)
    }
}

const GGUF_NAMES: TensorNames = TensorNames {
    embed: "token_embd.weight",
    output: "output.weight",
    final_norm: "output_norm.weight",
    layer_prefix: "blk.",
    attn_norm: "attn_norm.weight",
    q: "attn_q.weight",
    k: "attn_k.weight",
    v: "attn_v.weight",
    q_bias: "attn_q.bias",
    k_bias: "attn_k.bias",
    v_bias: "attn_v.bias",
    o: "attn_output.weight",
    ffn_norm: "ffn_norm.weight",
    gate: "ffn_gate.weight",
    up: "ffn_up.weight",
    down: "ffn_down.weight",
};

/// Load a GGUF file of llama architecture.
pub fn load_gguf(path: &Path) -> Result<LoadedModel, LoadError> {
    let f = GgufFile::open(path)?;
    let file = path.display().to_string();
    let arch = f
        .get_str("general.architecture")?
        .unwrap_or("llama")
        .to_string();
    if !matches!(arch.as_str(), "llama" | "mistral" | "qwen2" | "granite") {
        return Err(LoadError::Invalid {
            file,
            reason: format!("architecture `{arch}` is not supported (llama-family only)"),
        });
    }
    let req = |key: &str| -> Result<u64, LoadError> {
        let full = format!("{arch}.{key}");
        f.get_u64(&full)?
            .ok_or_else(|| f.md_err(&full, "missing").into())
    };
    let n_heads = req("attention.head_count")? as usize;
    let hidden = req("embedding_length")? as usize;
    let embed_info = f
        .tensor("token_embd.weight")
        .ok_or_else(|| GgufError::Tensor {
            file: path.into(),
            tensor: "token_embd.weight".into(),
            reason: "missing".into(),
        })?;
    let vocab_size = match f.get_u64(&format!("{arch}.vocab_size"))? {
        Some(v) => v as usize,
        None => embed_info.dims.get(1).copied().unwrap_or(0) as usize,
    };
    let head_dim = match f.get_u64(&format!("{arch}.attention.key_length"))? {
        Some(v) => v as usize,
        None => hidden / n_heads.max(1),
    };
    let mut rope_scaling = RopeScaling::None;
    if let Some(t) = f.tensor("rope_freqs.weight") {
        let mut ff = vec![0.0f32; t.n_elements() as usize];
        quant::dequantize_row(t.ty, f.data(t), &mut ff).map_err(|e| GgufError::Tensor {
            file: path.into(),
            tensor: t.name.clone(),
            reason: e.to_string(),
        })?;
        rope_scaling = RopeScaling::FreqFactors(ff);
    } else if f.get_str(&format!("{arch}.rope.scaling.type"))? == Some("linear") {
        let factor = f
            .get_f64(&format!("{arch}.rope.scaling.factor"))?
            .unwrap_or(1.0);
        rope_scaling = RopeScaling::Linear { factor };
    }
    let cfg = ModelConfig {
        name: f
            .get_str("general.name")?
            .map(str::to_string)
            .unwrap_or_else(|| {
                path.file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_default()
            }),
        n_layers: req("block_count")? as usize,
        hidden,
        intermediate: req("feed_forward_length")? as usize,
        n_heads,
        n_kv_heads: f
            .get_u64(&format!("{arch}.attention.head_count_kv"))?
            .unwrap_or(n_heads as u64) as usize,
        head_dim,
        vocab_size,
        rms_eps: f
            .get_f64(&format!("{arch}.attention.layer_norm_rms_epsilon"))?
            .unwrap_or(1e-5) as f32,
        rope_base: f
            .get_f64(&format!("{arch}.rope.freq_base"))?
            .unwrap_or(10000.0),
        rope_dim: f
            .get_u64(&format!("{arch}.rope.dimension_count"))?
            .map(|v| v as usize)
            .unwrap_or(head_dim),
        // llama.cpp's converter permutes q/k rows so that pairs are adjacent; qwen2 files
        // keep the Hugging Face order.
        rope_style: if arch == "qwen2" {
            RopeStyle::Half
        } else {
            RopeStyle::Interleaved
        },
        rope_scaling,
        max_context: req("context_length")? as usize,
        tie_embeddings: f.tensor("output.weight").is_none(),
    };
    cfg.validate().map_err(|reason| LoadError::Invalid {
        file: file.clone(),
        reason,
    })?;

    let map = f.mmap();
    let get = |name: &str| -> Result<Option<Matrix>, LoadError> {
        let Some(t) = f.tensor(name) else {
            return Ok(None);
        };
        let cols = t.dims[0] as usize;
        let rows = (t.n_elements() / t.dims[0].max(1)) as usize;
        let storage = Storage::Mapped {
            map: Arc::clone(&map),
            start: t.start,
            len: t.len,
        };
        Matrix::new(name, t.ty, rows, cols, storage)
            .map(Some)
            .map_err(|reason| {
                GgufError::Tensor {
                    file: path.into(),
                    tensor: name.into(),
                    reason,
                }
                .into()
            })
    };
    let src = WeightSource {
        file: file.clone(),
        get: &get,
    };
    let weights = src.llama(&cfg, &GGUF_NAMES)?;
    let tokenizer = gguf_tokenizer(&f).map_err(|reason| LoadError::Tokenizer {
        file: file.clone(),
        reason,
    })?;
    let chat_template = f.get_str("tokenizer.chat_template")?.map(str::to_string);
    Ok(LoadedModel {
        config: cfg,
        weights,
        tokenizer: Arc::new(tokenizer),
        chat_template,
    })
}

fn gguf_tokenizer(f: &GgufFile) -> Result<Tokenizer, String> {
    let strings = |key: &str| -> Result<Vec<String>, String> {
        match f.get(key) {
            None => Ok(Vec::new()),
            Some(Value::Array(a)) => a
                .iter()
                .map(|v| {
                    v.as_str()
                        .map(str::to_string)
                        .ok_or_else(|| format!("{key}: expected strings"))
                })
                .collect(),
            Some(_) => Err(format!("{key}: expected an array")),
        }
    };
    let numbers = |key: &str| -> Result<Vec<f64>, String> {
        match f.get(key) {
            None => Ok(Vec::new()),
            Some(Value::Array(a)) => a
                .iter()
                .map(|v| {
                    v.as_f64()
                        .or(match v {
                            Value::I32(i) => Some(*i as f64),
                            _ => None,
                        })
                        .ok_or_else(|| format!("{key}: expected numbers"))
                })
                .collect(),
            Some(_) => Err(format!("{key}: expected an array")),
        }
    };
    let id = |key: &str| -> Result<Option<u32>, String> {
        f.get_u64(key)
            .map(|v| v.map(|v| v as u32))
            .map_err(|e| e.to_string())
    };
    let flag = |key: &str| f.get_bool(key).map_err(|e| e.to_string());
    let model = f
        .get_str("tokenizer.ggml.model")
        .map_err(|e| e.to_string())?
        .unwrap_or("gpt2");
    let kind = match model {
        "gpt2" => VocabKind::Gpt2Bpe,
        "llama" => VocabKind::SentencePiece,
        other => {
            return Err(format!(
                "tokenizer model `{other}` is not supported (gpt2 or llama)"
            ));
        }
    };
    let spec = TokenizerSpec {
        tokens: strings("tokenizer.ggml.tokens")?,
        token_types: numbers("tokenizer.ggml.token_type")?
            .into_iter()
            .map(|v| v as i32)
            .collect(),
        scores: numbers("tokenizer.ggml.scores")?
            .into_iter()
            .map(|v| v as f32)
            .collect(),
        merges: strings("tokenizer.ggml.merges")?,
        pre: f
            .get_str("tokenizer.ggml.pre")
            .map_err(|e| e.to_string())?
            .map(str::to_string),
        bos: id("tokenizer.ggml.bos_token_id")?,
        eos: id("tokenizer.ggml.eos_token_id")?,
        unk: id("tokenizer.ggml.unknown_token_id")?,
        eot: id("tokenizer.ggml.eot_token_id")?,
        add_bos: flag("tokenizer.ggml.add_bos_token")?.unwrap_or_else(|| {
            TokenizerSpec::default_add_bos(kind, f.get_str("tokenizer.ggml.pre").ok().flatten())
        }),
        add_eos: flag("tokenizer.ggml.add_eos_token")?.unwrap_or(false),
        add_space_prefix: flag("tokenizer.ggml.add_space_prefix")?
            .unwrap_or_else(|| TokenizerSpec::default_add_space_prefix(kind)),
        kind,
    };
    if spec.tokens.is_empty() {
        return Err("tokenizer.ggml.tokens is missing or empty".into());
    }
    Tokenizer::from_spec(spec).map_err(|e| e.to_string())
}
