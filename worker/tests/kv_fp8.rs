//! The FP8 KV cache on the CPU backend (`--kv-cache-dtype fp8`): K/V rounded to e4m3 as
//! the CUDA backend stores them, on the real SmolLM2 model.

mod common;

use std::sync::Arc;

use worker::backend::{Backend, KvDtype, SeqChunk, cpu::CpuBackend, fp8_round};

/// Logits of a prompt's last token, then of `steps` greedy decode steps.
fn run(kv: KvDtype, prompt: &[u32], steps: usize) -> Vec<Vec<f32>> {
    let m = common::load_smollm2();
    let bs = 16;
    let blocks = (prompt.len() + steps).div_ceil(bs);
    let mut be = CpuBackend::new(
        m.config.clone(),
        Arc::new(common::clone_weights(&m)),
        blocks,
        bs,
        2,
    )
    .expect("backend")
    .with_kv_dtype(kv);
    let table: Vec<u32> = (0..blocks as u32).collect();
    let mut tokens = prompt.to_vec();
    let (mut start, mut out) = (0, Vec::new());
    for _ in 0..=steps {
        let chunk = SeqChunk {
            tokens: &tokens[start..],
            start,
            block_table: &table,
            want_logits: true,
        };
        let logits = be.forward(&[chunk]).expect("forward");
        start = tokens.len();
        tokens.push(common::top2(&logits).0);
        out.push(logits);
    }
    out
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| f64::from(*x) * f64::from(*y))
        .sum();
    let na: f64 = a.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    dot / (na * nb)
}

#[test]
fn fp8_rounding_is_e4m3_at_scale_one() {
    assert_eq!(fp8_round(1.0), 1.0);
    assert_eq!(
        fp8_round(1.06),
        1.0,
        "3 mantissa bits: the step above 1 is 1/8"
    );
    assert_eq!(fp8_round(1.07), 1.125);
    assert_eq!(fp8_round(-1000.0), -448.0, "saturates");
    assert_eq!(fp8_round(0.0), 0.0);
}

#[test]
fn fp8_kv_cache_tracks_the_f32_cache() {
    let m = common::load_smollm2();
    let prompt = m.tokenizer.encode(
        "The European Union has twenty-seven member states, and",
        true,
        true,
    );
    let exact = run(KvDtype::Auto, &prompt, 8);
    let fp8 = run(KvDtype::Fp8, &prompt, 8);
    let mut differs = false;
    for (step, (a, b)) in exact.iter().zip(&fp8).enumerate() {
        differs |= a != b;
        let c = cosine(a, b);
        eprintln!(
            "step {step}: logits cosine {c:.6}, top-1 {} vs {}",
            common::top2(a).0,
            common::top2(b).0
        );
        assert!(c > 0.99, "step {step}: logits cosine {c}");
    }
    assert!(differs, "the fp8 cache must round something");
    // The first greedy token (after the prompt) agrees.
    assert_eq!(common::top2(&exact[0]).0, common::top2(&fp8[0]).0);
}
