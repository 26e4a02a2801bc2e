//! Model loaders end to end, on a tiny random-weight Llama that
//! `tests/data/make_tiny_models.py` writes in every supported layout (HF safetensors:
//! sharded F32 and tied BF16; GGUF: F32, F16, Q8_0, Q4_0, Q4_1) together with float64
//! numpy reference logits for each.
//!
//! - Every variant loads with the right configuration (RoPE style Interleaved for GGUF,
//!   Half for HF) and its CPU-backend logits match its own reference within 1e-3, greedy
//!   continuation included. The HF F32 directory and the F32 GGUF (q/k rows permuted by the
//!   llama.cpp converter) must also agree with each other, which pins down the RoPE
//!   convention and the permutation handling.
//! - The tokenizer built from tokenizer.json equals the one built from GGUF metadata.
//! - Corrupt files fail at load with a message naming the file, the tensor and the reason.
//!
//! Needs python3 with numpy and gguf (`pip install numpy gguf`); fails, not skips, without.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use kernels::cpu::RopeStyle;
use serde_json::Value;
use worker::backend::{Backend, SeqChunk, cpu::CpuBackend};
use worker::model::{self, LoadedModel, gguf::GgufFile};

const GGUF_VARIANTS: &[&str] = &[
    "tiny-f32.gguf",
    "tiny-f16.gguf",
    "tiny-q8_0.gguf",
    "tiny-q4_0.gguf",
    "tiny-q4_1.gguf",
];
const HF_VARIANTS: &[&str] = &["hf", "hf_tied"];

/// Max |logit - reference| allowed. The references use each variant's own (rounded or
/// dequantized) weights, so only f32 accumulation order separates them.
const TOL: f32 = 1e-3;

/// The generated models in a fresh temp directory, removed on drop (kept, with its path
/// printed, when the test failed).
struct Fixture {
    dir: PathBuf,
    expected: Value,
}

impl Fixture {
    fn new(tag: &str) -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "worker-loaders-{}-{tag}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/make_tiny_models.py");
        let out = Command::new("python3")
            .arg(&script)
            .arg(&dir)
            .output()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot run python3 ({e}): these tests need Python 3 with numpy and gguf \
                     (`pip install numpy gguf`)"
                )
            });
        if !out.status.success() {
            let _ = std::fs::remove_dir_all(&dir);
            panic!(
                "{} failed ({}); it needs numpy and gguf: `pip install numpy gguf`\n{}",
                script.display(),
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let text = std::fs::read_to_string(dir.join("expected.json")).unwrap();
        Self {
            expected: serde_json::from_str(&text).unwrap(),
            dir,
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn load(&self, name: &str) -> LoadedModel {
        model::load(&self.path(name)).unwrap_or_else(|e| panic!("{name} must load: {e}"))
    }

    fn variant(&self, name: &str) -> &Value {
        &self.expected["variants"][name]
    }

    fn prompt(&self) -> Vec<u32> {
        u32s(&self.expected["prompt"])
    }

    /// A copy of a generated file (or flat directory) under a new name, to corrupt.
    fn copy(&self, from: &str, to: &str) -> PathBuf {
        let (src, dst) = (self.path(from), self.path(to));
        if src.is_dir() {
            std::fs::create_dir_all(&dst).unwrap();
            for e in std::fs::read_dir(&src).unwrap() {
                let e = e.unwrap();
                std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
            }
        } else {
            std::fs::copy(&src, &dst).unwrap();
        }
        dst
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("kept the generated models in {}", self.dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

fn u32s(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn f32s(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best as u32
}

/// Prefill `prompt` in one chunk, then decode `n` greedy tokens one at a time. Returns the
/// prompt's last-position logits and the greedy tokens.
fn run(m: &LoadedModel, cfg: model::ModelConfig, prompt: &[u32], n: usize) -> (Vec<f32>, Vec<u32>) {
    let bs = 16;
    let blocks = (prompt.len() + n).div_ceil(bs);
    let mut be = CpuBackend::new(cfg, Arc::new(m.weights.clone()), blocks, bs, 2).unwrap();
    let table: Vec<u32> = (0..blocks as u32).collect();
    let mut tokens = prompt.to_vec();
    let mut first = None;
    let mut out = Vec::new();
    let mut start = 0;
    while out.len() < n {
        let logits = be
            .forward(&[SeqChunk {
                tokens: &tokens[start..],
                start,
                block_table: &table,
                want_logits: true,
            }])
            .unwrap();
        assert_eq!(logits.len(), m.config.vocab_size);
        let next = argmax(&logits);
        first.get_or_insert(logits);
        start = tokens.len();
        tokens.push(next);
        out.push(next);
    }
    (first.unwrap(), out)
}

fn check_config(fx: &Fixture, name: &str, m: &LoadedModel) {
    let e = &fx.expected["config"];
    let want = |k: &str| e[k].as_u64().unwrap() as usize;
    let c = &m.config;
    let got = [
        ("n_layers", c.n_layers),
        ("hidden", c.hidden),
        ("intermediate", c.intermediate),
        ("n_heads", c.n_heads),
        ("n_kv_heads", c.n_kv_heads),
        ("head_dim", c.head_dim),
        ("vocab_size", c.vocab_size),
        ("max_context", c.max_context),
    ];
    for (k, v) in got {
        assert_eq!(v, want(k), "{name}: config {k}");
    }
    assert_eq!(c.rope_dim, c.head_dim, "{name}: rope_dim");
    assert!((c.rope_base - 10000.0).abs() < 1e-9, "{name}: rope_base");
    assert!((c.rms_eps - 1e-5).abs() < 1e-9, "{name}: rms_eps");
    assert_eq!(
        c.tie_embeddings,
        name == "hf_tied",
        "{name}: tie_embeddings"
    );
    let style = if name.ends_with(".gguf") {
        RopeStyle::Interleaved
    } else {
        RopeStyle::Half
    };
    assert_eq!(c.rope_style, style, "{name}: rope style");
}

#[test]
fn every_variant_matches_its_reference() {
    let fx = Fixture::new("logits");
    let prompt = fx.prompt();
    let mut ours = std::collections::HashMap::new();
    for &name in HF_VARIANTS.iter().chain(GGUF_VARIANTS) {
        let m = fx.load(name);
        check_config(&fx, name, &m);
        let r = fx.variant(name);
        let want_logits = f32s(&r["logits"]);
        let want_greedy = u32s(&r["greedy"]);
        let (logits, greedy) = run(&m, m.config.clone(), &prompt, want_greedy.len());
        let diff = max_abs_diff(&logits, &want_logits);
        eprintln!("{name:>16}: max |logit - reference| = {diff:.2e}");
        assert!(
            diff < TOL,
            "{name}: last-position logits differ from the numpy reference by {diff} (> {TOL})"
        );
        assert_eq!(
            greedy, want_greedy,
            "{name}: greedy continuation differs from the reference"
        );
        ours.insert(name, logits);
    }
    // Same f32 weights, two layouts and two RoPE conventions: identical results.
    let d = max_abs_diff(&ours["hf"], &ours["tiny-f32.gguf"]);
    eprintln!("hf vs tiny-f32.gguf: max |diff| = {d:.2e}");
    assert!(d < TOL, "HF F32 and GGUF F32 logits differ by {d}");

    // And the test can tell: the GGUF weights with the HF RoPE convention are wrong.
    let m = fx.load("tiny-f32.gguf");
    let mut cfg = m.config.clone();
    cfg.rope_style = RopeStyle::Half;
    let (wrong, _) = run(&m, cfg, &prompt, 1);
    let d = max_abs_diff(&wrong, &ours["tiny-f32.gguf"]);
    assert!(
        d > 0.05,
        "permuted GGUF q/k with rotate_half RoPE should change the logits (diff {d})"
    );
}

#[test]
fn tokenizers_and_chat_templates_agree_across_formats() {
    let fx = Fixture::new("tok");
    let template = fx.expected["chat_template"].as_str().unwrap();
    let bos = fx.expected["bos"].as_u64().unwrap() as u32;
    let eos = fx.expected["eos"].as_u64().unwrap() as u32;
    let hf = fx.load("hf");
    let tied = fx.load("hf_tied");
    let gg = fx.load("tiny-q4_0.gguf");
    let texts = [
        "hello world 12345",
        "HELLO's <tool> world",
        "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n",
        "  several   spaces\n\n\tand tabs\r\n",
        "Ünïcödé ∑ 😀 — 1234567",
        "<|begin_of_text|>text<|eot_id|>",
    ];
    for m in [&hf, &tied, &gg] {
        let t = &m.tokenizer;
        assert_eq!(
            t.vocab_size(),
            fx.expected["config"]["vocab_size"].as_u64().unwrap() as usize
        );
        assert_eq!(
            (t.bos(), t.eos(), t.add_bos()),
            (Some(bos), Some(eos), true)
        );
        assert_eq!(m.chat_template.as_deref(), Some(template));
    }
    assert_eq!(hf.tokenizer.stop_tokens(), gg.tokenizer.stop_tokens());
    for text in texts {
        for (special, parse) in [(true, true), (false, false), (false, true)] {
            let a = hf.tokenizer.encode(text, special, parse);
            let b = gg.tokenizer.encode(text, special, parse);
            assert_eq!(
                a, b,
                "{text:?} (add_special {special}, parse_special {parse}): tokenizer.json and GGUF metadata disagree"
            );
            assert_eq!(a, tied.tokenizer.encode(text, special, parse));
            for skip in [false, true] {
                assert_eq!(
                    hf.tokenizer.decode(&a, skip),
                    gg.tokenizer.decode(&a, skip),
                    "decode {a:?}"
                );
            }
        }
        assert_eq!(
            gg.tokenizer
                .decode(&gg.tokenizer.encode(text, false, true), false),
            text
        );
    }
    // The ChatML markers are single control tokens in both.
    let ids = hf
        .tokenizer
        .encode("<|im_start|>user\nhi<|im_end|>", false, true);
    assert_eq!(
        ids.first(),
        hf.tokenizer.token_to_id("<|im_start|>").as_ref()
    );
    assert_eq!(ids.last(), Some(&eos));
}

/// The load error's full text; the model must not load.
fn load_err(path: &Path) -> String {
    match model::load(path) {
        Ok(_) => panic!("{} loaded although it is corrupt", path.display()),
        Err(e) => {
            let mut s = e.to_string();
            let mut src = std::error::Error::source(&e);
            while let Some(inner) = src {
                s.push_str(&format!(": {inner}"));
                src = inner.source();
            }
            eprintln!("expected load error: {s}");
            s
        }
    }
}

fn assert_mentions(msg: &str, parts: &[&str]) {
    for p in parts {
        assert!(
            msg.to_lowercase().contains(&p.to_lowercase()),
            "error message does not mention {p:?}: {msg}"
        );
    }
}

fn truncate(path: &Path, len: usize) {
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.set_len(len as u64).unwrap();
}

fn patch(path: &Path, at: usize, bytes: &[u8]) {
    let mut data = std::fs::read(path).unwrap();
    data[at..at + bytes.len()].copy_from_slice(bytes);
    std::fs::write(path, data).unwrap();
}

#[test]
fn corrupt_files_fail_with_file_tensor_and_reason() {
    let fx = Fixture::new("corrupt");
    let f32_info = GgufFile::open(&fx.path("tiny-f32.gguf")).unwrap();
    let tensor = |f: &GgufFile, name: &str| f.tensor(name).unwrap().clone();

    // (a) GGUF cut in the middle of a tensor's data.
    let p = fx.copy("tiny-f32.gguf", "cut-data.gguf");
    let t = tensor(&f32_info, "blk.1.attn_q.weight");
    truncate(&p, t.start + t.len / 2);
    let msg = load_err(&p);
    assert_mentions(&msg, &["cut-data.gguf", "blk.1.attn_q.weight", "truncated"]);

    // (b) GGUF cut inside the header (the metadata).
    let p = fx.copy("tiny-f32.gguf", "cut-header.gguf");
    truncate(&p, 300);
    let msg = load_err(&p);
    assert_mentions(&msg, &["cut-header.gguf", "truncated", "header"]);

    // (c) A quantized tensor whose f16 block scale is NaN (0x7fff). Q8_0 blocks are
    // [f16 d][32 x i8]; corrupt row 3's first block.
    let q8 = GgufFile::open(&fx.path("tiny-q8_0.gguf")).unwrap();
    for name in ["blk.0.ffn_down.weight", "blk.1.attn_output.weight"] {
        let t = tensor(&q8, name);
        let row_bytes = t.len / (t.n_elements() / t.dims[0]) as usize;
        let p = fx.copy("tiny-q8_0.gguf", &format!("nan-{name}.gguf"));
        patch(&p, t.start + 3 * row_bytes, &[0xFF, 0x7F]);
        let msg = load_err(&p);
        assert_mentions(
            &msg,
            &[
                &format!("nan-{name}.gguf"),
                name,
                "row 3",
                "non-finite",
                "corrupt",
            ],
        );
    }
    // Same in a tensor the loader fuses (q|k|v): the load must still fail, naming the file
    // and the layer.
    let t = tensor(&q8, "blk.1.attn_k.weight");
    let p = fx.copy("tiny-q8_0.gguf", "nan-k.gguf");
    patch(&p, t.start, &[0xFF, 0x7F]);
    let msg = load_err(&p);
    assert_mentions(&msg, &["nan-k.gguf", "blk.1.attn_k.weight", "non-finite"]);

    // (d) A safetensors shard cut inside its last tensor.
    let dir = fx.copy("hf", "hf-cut");
    let shard = dir.join("model-00002-of-00002.safetensors");
    let data = std::fs::read(&shard).unwrap();
    let n = u64::from_le_bytes(data[..8].try_into().unwrap()) as usize;
    let header: serde_json::Map<String, Value> = serde_json::from_slice(&data[8..8 + n]).unwrap();
    let (last, begin, end) = header
        .iter()
        .filter(|(k, _)| *k != "__metadata__")
        .map(|(k, v)| {
            let o = u32s(&v["data_offsets"]);
            (k.clone(), o[0] as usize, o[1] as usize)
        })
        .max_by_key(|t| t.2)
        .unwrap();
    truncate(&shard, 8 + n + (begin + end) / 2);
    let msg = load_err(&dir);
    assert_mentions(
        &msg,
        &["model-00002-of-00002.safetensors", &last, "truncated"],
    );

    // (e) config.json without a required field.
    let dir = fx.copy("hf", "hf-config");
    let cfg_path = dir.join("config.json");
    let mut cfg: serde_json::Map<String, Value> =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg.remove("num_attention_heads").unwrap();
    std::fs::write(&cfg_path, serde_json::to_string(&cfg).unwrap()).unwrap();
    let msg = load_err(&dir);
    assert_mentions(&msg, &["config.json", "num_attention_heads"]);

    // (f) Not a GGUF file at all.
    let p = fx.copy("tiny-f32.gguf", "bad-magic.gguf");
    patch(&p, 0, b"GGML");
    let msg = load_err(&p);
    assert_mentions(&msg, &["bad-magic.gguf", "not a GGUF file"]);
}
