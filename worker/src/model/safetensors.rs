//! Hugging Face model directories: `config.json`, `tokenizer.json`,
//! `tokenizer_config.json` (chat template, special tokens) and `*.safetensors` weights,
//! single-file or sharded through `model.safetensors.index.json`.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use memmap2::Mmap;
use serde::Deserialize;

use super::config::{ModelConfig, RopeScaling};
use super::weights::{Matrix, Storage, TensorNames, WeightSource};
use super::{LoadError, LoadedModel};
use crate::quant::GgmlType;
use crate::tokenizer::Tokenizer;
use kernels::cpu::RopeStyle;

#[derive(Debug, thiserror::Error)]
pub enum SafetensorsError {
    #[error("{file}: {reason}")]
    File { file: PathBuf, reason: String },
    #[error("{file}: tensor `{tensor}`: {reason}")]
    Tensor {
        file: PathBuf,
        tensor: String,
        reason: String,
    },
}

/// One mapped `.safetensors` file and its tensor directory.
struct Shard {
    path: PathBuf,
    map: Arc<Mmap>,
    tensors: HashMap<String, (GgmlType, Vec<usize>, usize, usize)>,
}

#[derive(Deserialize)]
struct TensorEntry {
    dtype: String,
    shape: Vec<usize>,
    data_offsets: (usize, usize),
}

impl Shard {
    fn open(path: &Path) -> Result<Shard, SafetensorsError> {
        let err = |reason: String| SafetensorsError::File {
            file: path.into(),
            reason,
        };
        let file = File::open(path).map_err(|e| err(format!("cannot open: {e}")))?;
        // SAFETY: read-only map; see GgufFile::open.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| err(format!("cannot map: {e}")))?;
        if map.len() < 8 {
            return Err(err(
                "file is shorter than its 8-byte header length (truncated?)".into(),
            ));
        }
        let mut n = [0u8; 8];
        n.copy_from_slice(&map[..8]);
        let n = u64::from_le_bytes(n) as usize;
        if n > map.len() - 8 {
            return Err(err(format!(
                "header length {n} exceeds the file size {} (truncated?)",
                map.len()
            )));
        }
        let header: BTreeMap<String, serde_json::Value> = serde_json::from_slice(&map[8..8 + n])
            .map_err(|e| err(format!("header is not valid JSON: {e}")))?;
        let data_start = 8 + n;
        let mut tensors = HashMap::new();
        for (name, v) in header {
            if name == "__metadata__" {
                continue;
            }
            let terr = |reason: String| SafetensorsError::Tensor {
                file: path.into(),
                tensor: name.clone(),
                reason,
            };
            let e: TensorEntry =
                serde_json::from_value(v).map_err(|e| terr(format!("bad header entry: {e}")))?;
            let ty = match e.dtype.as_str() {
                "F32" => GgmlType::F32,
                "F16" => GgmlType::F16,
                "BF16" => GgmlType::BF16,
                other => {
                    return Err(terr(format!(
                        "dtype {other} is not supported (F32, F16, BF16)"
                    )));
                }
            };
            let (begin, end) = e.data_offsets;
            let n_el: usize = e.shape.iter().product();
            let elem = if ty == GgmlType::F32 { 4 } else { 2 };
            if end < begin || end - begin != n_el * elem {
                return Err(terr(format!(
                    "data offsets {begin}..{end} do not match shape {:?}",
                    e.shape
                )));
            }
            if data_start + end > map.len() {
                return Err(terr(format!(
                    "data runs to byte {} but the file has only {} bytes (truncated download?)",
                    data_start + end,
                    map.len()
                )));
            }
            tensors.insert(name, (ty, e.shape, data_start + begin, end - begin));
        }
        Ok(Shard {
            path: path.into(),
            map: Arc::new(map),
            tensors,
        })
    }
}

#[derive(Deserialize)]
struct HfConfig {
    #[serde(default)]
    architectures: Vec<String>,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    vocab_size: usize,
    #[serde(default = "default_eps")]
    rms_norm_eps: f32,
    #[serde(default = "default_theta")]
    rope_theta: f64,
    rope_scaling: Option<serde_json::Value>,
    #[serde(default = "default_ctx")]
    max_position_embeddings: usize,
    #[serde(default)]
    tie_word_embeddings: bool,
}

fn default_eps() -> f32 {
    1e-5
}
fn default_theta() -> f64 {
    10000.0
}
fn default_ctx() -> usize {
    4096
}

const HF_NAMES: TensorNames = TensorNames {
    embed: "model.embed_tokens.weight",
    output: "lm_head.weight",
    final_norm: "model.norm.weight",
    layer_prefix: "model.layers.",
    attn_norm: "input_layernorm.weight",
    q: "self_attn.q_proj.weight",
    k: "self_attn.k_proj.weight",
    v: "self_attn.v_proj.weight",
    q_bias: "self_attn.q_proj.bias",
    k_bias: "self_attn.k_proj.bias",
    v_bias: "self_attn.v_proj.bias",
    o: "self_attn.o_proj.weight",
    ffn_norm: "post_attention_layernorm.weight",
    gate: "mlp.gate_proj.weight",
    up: "mlp.up_proj.weight",
    down: "mlp.down_proj.weight",
};

/// Load a Hugging Face model directory.
pub fn load_dir(dir: &Path) -> Result<LoadedModel, LoadError> {
    let file_err = |file: &Path, reason: String| SafetensorsError::File {
        file: file.into(),
        reason,
    };
    let read_json = |name: &str| -> Result<serde_json::Value, SafetensorsError> {
        let p = dir.join(name);
        let text =
            std::fs::read_to_string(&p).map_err(|e| file_err(&p, format!("cannot read: {e}")))?;
        serde_json::from_str(&text).map_err(|e| file_err(&p, format!("invalid JSON: {e}")))
    };
    let cfg_path = dir.join("config.json");
    let hf: HfConfig = serde_json::from_value(read_json("config.json")?)
        .map_err(|e| file_err(&cfg_path, format!("unexpected content: {e}")))?;
    if let Some(a) = hf.architectures.first()
        && !matches!(
            a.as_str(),
            "LlamaForCausalLM" | "MistralForCausalLM" | "Qwen2ForCausalLM"
        )
    {
        return Err(file_err(
            &cfg_path,
            format!("architecture {a} is not supported (llama-family only)"),
        )
        .into());
    }
    let head_dim = hf
        .head_dim
        .unwrap_or(hf.hidden_size / hf.num_attention_heads.max(1));
    let rope_scaling = match &hf.rope_scaling {
        None | Some(serde_json::Value::Null) => RopeScaling::None,
        Some(v) => {
            parse_rope_scaling(v).map_err(|r| file_err(&cfg_path, format!("rope_scaling: {r}")))?
        }
    };
    let name = dir
        .file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let cfg = ModelConfig {
        name,
        n_layers: hf.num_hidden_layers,
        hidden: hf.hidden_size,
        intermediate: hf.intermediate_size,
        n_heads: hf.num_attention_heads,
        n_kv_heads: hf.num_key_value_heads.unwrap_or(hf.num_attention_heads),
        head_dim,
        vocab_size: hf.vocab_size,
        rms_eps: hf.rms_norm_eps,
        rope_base: hf.rope_theta,
        rope_dim: head_dim,
        rope_style: RopeStyle::Half,
        rope_scaling,
        max_context: hf.max_position_embeddings,
        tie_embeddings: hf.tie_word_embeddings,
    };
    cfg.validate().map_err(|r| file_err(&cfg_path, r))?;

    // Shards: the index's weight map, or every *.safetensors file.
    let index = dir.join("model.safetensors.index.json");
    let mut files: Vec<PathBuf> = if index.exists() {
        let v = read_json("model.safetensors.index.json")?;
        let map = v
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| file_err(&index, "no weight_map object".into()))?;
        let mut f: Vec<PathBuf> = map
            .values()
            .filter_map(|s| s.as_str())
            .map(|s| dir.join(s))
            .collect();
        f.sort();
        f.dedup();
        f
    } else {
        let rd = std::fs::read_dir(dir).map_err(|e| file_err(dir, format!("cannot list: {e}")))?;
        rd.filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
            .collect()
    };
    files.sort();
    if files.is_empty() {
        return Err(file_err(dir, "no .safetensors files".into()).into());
    }
    let shards = files
        .iter()
        .map(|p| Shard::open(p))
        .collect::<Result<Vec<_>, _>>()?;
    let get = |name: &str| -> Result<Option<Matrix>, LoadError> {
        for s in &shards {
            if let Some((ty, shape, start, len)) = s.tensors.get(name) {
                let (rows, cols) = match shape.as_slice() {
                    [n] => (1, *n),
                    [r, c] => (*r, *c),
                    other => {
                        return Err(SafetensorsError::Tensor {
                            file: s.path.clone(),
                            tensor: name.into(),
                            reason: format!("rank {} not supported", other.len()),
                        }
                        .into());
                    }
                };
                let storage = Storage::Mapped {
                    map: Arc::clone(&s.map),
                    start: *start,
                    len: *len,
                };
                return Matrix::new(name, *ty, rows, cols, storage)
                    .map(Some)
                    .map_err(|reason| {
                        SafetensorsError::Tensor {
                            file: s.path.clone(),
                            tensor: name.into(),
                            reason,
                        }
                        .into()
                    });
            }
        }
        Ok(None)
    };
    let src = WeightSource {
        file: dir.display().to_string(),
        get: &get,
    };
    let weights = src.llama(&cfg, &HF_NAMES)?;

    let tok_cfg = dir.join("tokenizer_config.json");
    let tok_cfg = tok_cfg.exists().then_some(tok_cfg);
    let tokenizer = Tokenizer::from_hf_json(&dir.join("tokenizer.json"), tok_cfg.as_deref())
        .map_err(|e| LoadError::Tokenizer {
            file: dir.display().to_string(),
            reason: e.to_string(),
        })?;
    let chat_template = match &tok_cfg {
        Some(_) => chat_template_from(&read_json("tokenizer_config.json")?),
        None => None,
    };
    Ok(LoadedModel {
        config: cfg,
        weights,
        tokenizer: Arc::new(tokenizer),
        chat_template,
    })
}

fn chat_template_from(v: &serde_json::Value) -> Option<String> {
    match v.get("chat_template")? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Array(list) => list
            .iter()
            .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
            .or(list.first())
            .and_then(|t| t.get("template")?.as_str().map(str::to_string)),
        _ => None,
    }
}

fn parse_rope_scaling(v: &serde_json::Value) -> Result<RopeScaling, String> {
    let kind = v
        .get("rope_type")
        .or(v.get("type"))
        .and_then(|t| t.as_str())
        .unwrap_or("");
    let num = |k: &str| {
        v.get(k)
            .and_then(|x| x.as_f64())
            .ok_or_else(|| format!("missing number `{k}`"))
    };
    match kind {
        "default" => Ok(RopeScaling::None),
        "linear" => Ok(RopeScaling::Linear {
            factor: num("factor")?,
        }),
        "llama3" => Ok(RopeScaling::Llama3 {
            factor: num("factor")?,
            low_freq_factor: num("low_freq_factor")?,
            high_freq_factor: num("high_freq_factor")?,
            original_max_position: num("original_max_position_embeddings")?,
        }),
        other => Err(format!("type `{other}` is not supported (linear, llama3)")),
    }
}
