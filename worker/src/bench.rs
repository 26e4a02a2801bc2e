//! `worker bench`: throughput and latency of the engine on one model, through the real
//! engine path (scheduler, backend, sampler), printed as one JSON object.
//!
//! Measures prefill tok/s (one long prompt, max_tokens 1), TTFT of that prompt, decode
//! tok/s at several batch sizes (B requests with short prompts decoding together; only
//! the span where all B are decoding counts), and the process's peak RSS.

use std::time::{Duration, Instant};

use serde_json::json;
use tokio::sync::mpsc::UnboundedReceiver;

use crate::engine::{EngineHandle, Event, GenerateParams};
use crate::sampler::SamplingParams;

pub struct BenchConfig {
    pub prompt_tokens: usize,
    pub decode_tokens: usize,
    pub batches: Vec<usize>,
    pub reps: usize,
    /// How every request samples (greedy by default; seeded, so runs repeat).
    pub sampling: SamplingParams,
}

/// Exactly `max_tokens` tokens (end-of-sequence ignored) sampled with `sampling`.
fn params(sampling: &SamplingParams, max_tokens: usize) -> GenerateParams {
    GenerateParams {
        sampling: *sampling,
        ..GenerateParams::greedy_fixed_length(max_tokens)
    }
}

/// Deterministic pseudo-random prompt tokens (distinct per `salt`, so the prefix cache
/// never serves them).
fn prompt(vocab: usize, n: usize, salt: u64) -> Vec<u32> {
    // Skip the first 256 ids, which are special or byte tokens in most vocabularies.
    pseudo_tokens(n, 256, vocab, salt)
}

/// `n` pseudo-random token ids in `lo..hi` (xorshift, a fixed stream per `salt`).
pub(crate) fn pseudo_tokens(n: usize, lo: usize, hi: usize, salt: u64) -> Vec<u32> {
    let mut s = 0x9E37_79B9_7F4A_7C15u64 ^ salt.wrapping_mul(0xBF58_476D_1CE4_E5B9);
    let span = hi.saturating_sub(lo).max(1) as u64;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (lo as u64 + s % span) as u32
        })
        .collect()
}

async fn first_token(rx: &mut UnboundedReceiver<Event>) -> anyhow::Result<Instant> {
    match rx.recv().await {
        Some(Event::Token { .. }) => Ok(Instant::now()),
        other => anyhow::bail!("expected a token, got {other:?}"),
    }
}

async fn drain(mut rx: UnboundedReceiver<Event>) -> anyhow::Result<usize> {
    let mut n = 0;
    while let Some(ev) = rx.recv().await {
        match ev {
            Event::Token { .. } => n += 1,
            Event::Done { .. } => return Ok(n),
        }
    }
    anyhow::bail!("stream ended early")
}

/// The prompt length of the decode measurements' sequences: the timed steps attend to
/// contexts of `DECODE_PROMPT_TOKENS + 1` to `DECODE_PROMPT_TOKENS + decode_tokens` tokens.
pub const DECODE_PROMPT_TOKENS: usize = 32;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

pub async fn run(h: &EngineHandle, cfg: &BenchConfig) -> anyhow::Result<serde_json::Value> {
    let vocab = h.vocab_size();
    let mut salt = 1;
    // Warm-up (page in weights, size the scratch buffers).
    drain(h.submit(prompt(vocab, 64, 0), params(&cfg.sampling, 4))?).await?;

    let (mut prefill, mut ttft) = (Vec::new(), Vec::new());
    for _ in 0..cfg.reps {
        salt += 1;
        let t0 = Instant::now();
        let mut rx = h.submit(
            prompt(vocab, cfg.prompt_tokens, salt),
            params(&cfg.sampling, 1),
        )?;
        let t1 = first_token(&mut rx).await?;
        drain(rx).await?;
        let dt = t1.duration_since(t0).as_secs_f64();
        ttft.push(dt * 1e3);
        prefill.push(cfg.prompt_tokens as f64 / dt);
        eprintln!(
            "bench: prefill {} tokens: {:.1} tok/s",
            cfg.prompt_tokens,
            cfg.prompt_tokens as f64 / dt
        );
    }

    let mut decode = serde_json::Map::new();
    for &b in &cfg.batches {
        let mut rates = Vec::new();
        for _ in 0..cfg.reps {
            let mut rxs = Vec::new();
            for _ in 0..b {
                salt += 1;
                rxs.push(h.submit(
                    prompt(vocab, DECODE_PROMPT_TOKENS, salt),
                    params(&cfg.sampling, cfg.decode_tokens + 1),
                )?);
            }
            // Start the clock once every sequence has its first token (prefill done).
            for rx in rxs.iter_mut() {
                first_token(rx).await?;
            }
            let t0 = Instant::now();
            let mut total = 0;
            for rx in rxs {
                total += drain(rx).await?;
            }
            let rate = total as f64 / t0.elapsed().as_secs_f64().max(1e-9);
            eprintln!("bench: decode batch {b}: {rate:.1} tok/s aggregate");
            rates.push(rate);
        }
        decode.insert(
            b.to_string(),
            json!({"aggregate_tok_s": median(rates.clone()), "per_seq_tok_s": median(rates.clone()) / b as f64,
                   "all": rates}),
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(json!({
        "engine": "sovereign worker",
        "prompt_tokens": cfg.prompt_tokens,
        "decode_tokens": cfg.decode_tokens,
        "decode_prompt_tokens": DECODE_PROMPT_TOKENS,
        "reps": cfg.reps,
        "sampling": {"temperature": cfg.sampling.temperature, "top_k": cfg.sampling.top_k,
                     "top_p": cfg.sampling.top_p, "min_p": cfg.sampling.min_p},
        "prefill_tok_s": median(prefill.clone()),
        "prefill_tok_s_all": prefill,
        "ttft_ms": median(ttft.clone()),
        "ttft_ms_all": ttft,
        "decode": decode,
        // Over the whole run: how the tokens were picked (a device backend picks greedy
        // tokens and draws sampled ones itself; the host sampler gets the rest's logits).
        "tokens_picked_by_backend": h.metrics.tokens_picked_by_backend.load(std::sync::atomic::Ordering::Relaxed),
        "tokens_sampled_on_host": h.metrics.tokens_sampled_on_host.load(std::sync::atomic::Ordering::Relaxed),
        "peak_rss_mib": peak_rss_mib(),
    }))
}

/// Peak resident set size of this process (Linux `VmHWM`), in MiB.
pub fn peak_rss_mib() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let kb: f64 = s
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kb / 1024.0)
}
