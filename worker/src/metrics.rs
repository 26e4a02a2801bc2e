//! Prometheus text-format metrics for the worker, kept in atomics so the engine thread
//! and the HTTP handlers never contend on a lock. No client library: the format is small
//! and this keeps the build lean.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

/// A histogram with fixed upper bounds (seconds).
pub struct Histogram {
    bounds: &'static [f64],
    counts: Vec<AtomicU64>,
    sum_micros: AtomicU64,
    count: AtomicU64,
}

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            counts: bounds.iter().map(|_| AtomicU64::new(0)).collect(),
            sum_micros: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, seconds: f64) {
        for (b, c) in self.bounds.iter().zip(&self.counts) {
            if seconds <= *b {
                c.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.sum_micros
            .fetch_add((seconds * 1e6) as u64, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (b, c) in self.bounds.iter().zip(&self.counts) {
            let _ = writeln!(
                out,
                "{name}_bucket{{le=\"{b}\"}} {}",
                c.load(Ordering::Relaxed)
            );
        }
        let n = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {n}");
        let _ = writeln!(
            out,
            "{name}_sum {}",
            self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6
        );
        let _ = writeln!(out, "{name}_count {n}");
    }
}

const TTFT_BOUNDS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];
const ITL_BOUNDS: &[f64] = &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0];

/// Everything /metrics shows.
pub struct Metrics {
    pub queued: AtomicU64,
    pub running: AtomicU64,
    pub kv_blocks_used: AtomicU64,
    pub kv_blocks_total: AtomicU64,
    pub prefix_queried_tokens: AtomicU64,
    pub prefix_hit_tokens: AtomicU64,
    pub prompt_tokens: AtomicU64,
    pub generation_tokens: AtomicU64,
    pub requests_finished: AtomicU64,
    pub requests_cancelled: AtomicU64,
    pub requests_rejected: AtomicU64,
    pub preemptions: AtomicU64,
    pub steps: AtomicU64,
    /// Tokens the backend picked itself (greedy rows, draws made on the device).
    pub tokens_picked_by_backend: AtomicU64,
    /// Tokens the host sampler drew from logits the backend sent back.
    pub tokens_sampled_on_host: AtomicU64,
    pub ttft: Histogram,
    pub itl: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            queued: AtomicU64::new(0),
            running: AtomicU64::new(0),
            kv_blocks_used: AtomicU64::new(0),
            kv_blocks_total: AtomicU64::new(0),
            prefix_queried_tokens: AtomicU64::new(0),
            prefix_hit_tokens: AtomicU64::new(0),
            prompt_tokens: AtomicU64::new(0),
            generation_tokens: AtomicU64::new(0),
            requests_finished: AtomicU64::new(0),
            requests_cancelled: AtomicU64::new(0),
            requests_rejected: AtomicU64::new(0),
            preemptions: AtomicU64::new(0),
            steps: AtomicU64::new(0),
            tokens_picked_by_backend: AtomicU64::new(0),
            tokens_sampled_on_host: AtomicU64::new(0),
            ttft: Histogram::new(TTFT_BOUNDS),
            itl: Histogram::new(ITL_BOUNDS),
        }
    }
}

impl Metrics {
    pub fn prefix_hit_rate(&self) -> f64 {
        let q = self.prefix_queried_tokens.load(Ordering::Relaxed);
        if q == 0 {
            0.0
        } else {
            self.prefix_hit_tokens.load(Ordering::Relaxed) as f64 / q as f64
        }
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        let g = |out: &mut String, name: &str, kind: &str, help: &str, v: f64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}"
            );
        };
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed) as f64;
        g(
            &mut out,
            "worker_queue_length",
            "gauge",
            "Requests waiting to be scheduled.",
            l(&self.queued),
        );
        g(
            &mut out,
            "worker_running",
            "gauge",
            "Sequences in the running batch.",
            l(&self.running),
        );
        g(
            &mut out,
            "worker_kv_blocks_used",
            "gauge",
            "KV-cache blocks referenced by sequences.",
            l(&self.kv_blocks_used),
        );
        g(
            &mut out,
            "worker_kv_blocks_total",
            "gauge",
            "KV-cache blocks in total.",
            l(&self.kv_blocks_total),
        );
        g(
            &mut out,
            "worker_prefix_cache_hit_rate",
            "gauge",
            "Prompt tokens served from the prefix cache / prompt tokens.",
            self.prefix_hit_rate(),
        );
        g(
            &mut out,
            "worker_prompt_tokens_total",
            "counter",
            "Prompt tokens processed.",
            l(&self.prompt_tokens),
        );
        g(
            &mut out,
            "worker_generation_tokens_total",
            "counter",
            "Tokens generated.",
            l(&self.generation_tokens),
        );
        g(
            &mut out,
            "worker_requests_finished_total",
            "counter",
            "Requests finished (stop or length).",
            l(&self.requests_finished),
        );
        g(
            &mut out,
            "worker_requests_cancelled_total",
            "counter",
            "Requests cancelled by the client.",
            l(&self.requests_cancelled),
        );
        g(
            &mut out,
            "worker_requests_rejected_total",
            "counter",
            "Requests refused (queue full, draining, invalid).",
            l(&self.requests_rejected),
        );
        g(
            &mut out,
            "worker_preemptions_total",
            "counter",
            "Sequences preempted for recompute.",
            l(&self.preemptions),
        );
        g(
            &mut out,
            "worker_steps_total",
            "counter",
            "Engine steps executed.",
            l(&self.steps),
        );
        g(
            &mut out,
            "worker_tokens_picked_by_backend_total",
            "counter",
            "Tokens the backend picked itself (greedy, or drawn where the logits are).",
            l(&self.tokens_picked_by_backend),
        );
        g(
            &mut out,
            "worker_tokens_sampled_on_host_total",
            "counter",
            "Tokens the host sampler drew from logits the backend sent back.",
            l(&self.tokens_sampled_on_host),
        );
        self.ttft.render(
            &mut out,
            "worker_time_to_first_token_seconds",
            "Time from arrival to first token.",
        );
        self.itl.render(
            &mut out,
            "worker_inter_token_latency_seconds",
            "Time between consecutive tokens of a sequence.",
        );
        out
    }
}
