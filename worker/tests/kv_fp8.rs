//! The FP8 KV cache on the CPU backend (`--kv-cache-dtype fp8`): K/V rounded to e4m3 as
//! the CUDA backend stores them, on the real SmolLM2 model.

mod common;

use std::sync::Arc;

use worker::backend::kv_scales::{self, KvScales};
use worker::backend::{Backend, KvDtype, SeqChunk, cpu::CpuBackend, fp8_round};

/// Logits of a prompt's last token, then of `steps` greedy decode steps.
fn run(kv: KvDtype, prompt: &[u32], steps: usize) -> Vec<Vec<f32>> {
    let m = common::load_smollm2();
    let w = Arc::new(common::clone_weights(&m));
    decode(&m, &w, kv, None, prompt, None, steps).0
}

/// Logits after `prompt` and after each of `steps` decode steps of the model `m` with
/// weights `w`, each step feeding the next token of `forced` or, without it, the greedy
/// pick; and the tokens fed after the prompt.
fn decode(
    m: &worker::model::LoadedModel,
    w: &Arc<worker::model::Weights>,
    kv: KvDtype,
    scales: Option<&KvScales>,
    prompt: &[u32],
    forced: Option<&[u32]>,
    steps: usize,
) -> (Vec<Vec<f32>>, Vec<u32>) {
    let blocks = (prompt.len() + steps).div_ceil(16);
    let mut be = CpuBackend::new(m.config.clone(), Arc::clone(w), blocks, 16, 2)
        .expect("backend")
        .with_kv_dtype(kv);
    if let Some(s) = scales {
        be.set_kv_scales(s).expect("scales fit");
    }
    let table: Vec<u32> = (0..blocks as u32).collect();
    let mut tokens = prompt.to_vec();
    let (mut start, mut out) = (0, Vec::new());
    for step in 0..=steps {
        let chunk = SeqChunk {
            tokens: &tokens[start..],
            start,
            block_table: &table,
            want_logits: true,
        };
        let logits = be.forward(&[chunk]).expect("forward");
        start = tokens.len();
        if step < steps {
            tokens.push(forced.map_or_else(|| common::top2(&logits).0, |f| f[step]));
        }
        out.push(logits);
    }
    (out, tokens.split_off(prompt.len()))
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

/// What per-head scales are for: K and V values beyond e4m3's largest (448) saturate at
/// scale 1.0. One SmolLM2 layer's V projection is multiplied by 1024, so its V values
/// reach several thousand; the scales `calibrate` measures on the built-in text map them
/// into range and the FP8 cache's logits stay close to the f32 cache's, where at scale
/// 1.0 they do not. (On the unmodified model every K/V value is within range
/// (|K| <= 25, |V| <= 17) and calibrated scales change the logits by rounding noise only,
/// better or worse by turns: docs/kernels.md.)
#[test]
fn calibrated_fp8_scales_keep_large_kv_values_in_range() {
    let m = common::load_smollm2();
    let mut w = common::clone_weights(&m);
    let (cfg, l3) = (&m.config, &mut w.layers[3]);
    let (rows, cols) = (l3.wqkv.rows, l3.wqkv.cols);
    let mut qkv = vec![0.0f32; rows * cols];
    for (r, row) in qkv.chunks_exact_mut(cols).enumerate() {
        l3.wqkv.dequantize_row(r, row);
    }
    let v_rows = (cfg.n_heads + cfg.n_kv_heads) * cfg.head_dim * cols;
    qkv[v_rows..].iter_mut().for_each(|x| *x *= 1024.0);
    l3.wqkv = worker::model::Matrix::from_f32("wqkv", rows, cols, &qkv);
    let w = Arc::new(w);
    let text = m
        .tokenizer
        .encode(kv_scales::DEFAULT_CALIBRATION_TEXT, true, false);
    let mut calls = 0;
    let scales = kv_scales::calibrate(&m.config, Arc::clone(&w), &text, 256, 2, |_, _| calls += 1)
        .expect("calibration");
    assert_eq!(calls, text.len().div_ceil(256), "progress after each chunk");
    scales
        .check(m.config.n_layers, m.config.n_kv_heads)
        .unwrap();
    // Layer 3's V heads exceed 448 (scale > 1), its K heads do not.
    assert!(
        scales.v[3].iter().all(|&s| s > 1.0) && scales.k[3].iter().all(|&s| s < 1.0),
        "{:?} {:?}",
        scales.k[3],
        scales.v[3]
    );
    // A prompt that is not the calibration text, teacher-forced: every run steps through
    // the f32 cache's greedy tokens, so the logits compare position by position.
    let prompt = m.tokenizer.encode(
        "Dear citizen, your request for a residence permit was received on 3 May and",
        true,
        true,
    );
    let (exact, fed) = decode(&m, &w, KvDtype::Auto, None, &prompt, None, 16);
    let fp8 = |scales| decode(&m, &w, KvDtype::Fp8, scales, &prompt, Some(&fed), 16).0;
    let (unit, calibrated) = (fp8(None), fp8(Some(&scales)));
    // The mean of 1 - cosine over the steps, and the largest logit error relative to the
    // exact logits' largest magnitude.
    let distance = |got: &[Vec<f32>]| {
        let (mut one_minus_cos, mut rel) = (0.0f64, 0.0f64);
        for (a, b) in exact.iter().zip(got) {
            one_minus_cos += 1.0 - cosine(a, b);
            let maxa = a.iter().fold(0f32, |m, x| m.max(x.abs()));
            let d = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
            rel = rel.max(f64::from(d / maxa));
        }
        (one_minus_cos / exact.len() as f64, rel)
    };
    let (u, c) = (distance(&unit), distance(&calibrated));
    eprintln!("1 - cosine, max rel diff: scale 1.0 {u:?}, calibrated {c:?}");
    // Measured: 1 - cosine 0.0027 calibrated (the unmodified model's FP8 rounding noise
    // is 0.0006-0.002) against 0.086 at scale 1.0.
    assert!(
        c.0 < 0.01 && c.0 * 4.0 < u.0,
        "calibrated {c:?} vs scale 1.0 {u:?}"
    );
    assert!(c.1 < u.1, "calibrated {c:?} vs scale 1.0 {u:?}");
}

/// Scales are refused where there is no FP8 cache, or when they do not fit the model.
#[test]
fn kv_scales_need_an_fp8_cache_of_the_model_shape() {
    let m = common::load_smollm2();
    let (l, h) = (m.config.n_layers, m.config.n_kv_heads);
    let new = |kv| {
        CpuBackend::new(
            m.config.clone(),
            Arc::new(common::clone_weights(&m)),
            4,
            16,
            1,
        )
        .expect("backend")
        .with_kv_dtype(kv)
    };
    let err = new(KvDtype::Auto)
        .set_kv_scales(&KvScales::uniform(l, h, 0.5))
        .unwrap_err()
        .to_string();
    assert!(err.contains("not FP8"), "{err}");
    let err = new(KvDtype::Fp8)
        .set_kv_scales(&KvScales::uniform(l + 1, h, 0.5))
        .unwrap_err()
        .to_string();
    assert!(err.contains("layers"), "{err}");
    new(KvDtype::Fp8)
        .set_kv_scales(&KvScales::uniform(l, h, 0.5))
        .expect("fits");
}
