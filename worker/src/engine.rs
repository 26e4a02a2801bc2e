//! The engine: one thread that owns the scheduler, the block manager and the backend, and
//! turns submitted requests into streams of token events.
//!
//! Each step: take new commands, reap cancelled requests (their blocks are freed here),
//! ask the scheduler for a `StepPlan`, run it on the backend, sample, apply stop
//! conditions, and send events. The engine decides nothing about batching itself (the
//! scheduler does) and computes nothing itself (the backend does).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, mpsc as std_mpsc};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::{mpsc, watch};

use crate::backend::{Backend, SeqChunk};
use crate::kv_cache::BlockManager;
use crate::kv_cache::SeqId;
use crate::metrics::Metrics;
use crate::sampler::{RowPick, RowPlan, Sampler, SamplingParams};
use crate::scheduler::{NewSequence, Scheduler, SchedulerConfig, StepPlan};
use crate::tokenizer::{IncrementalDecoder, Tokenizer};

/// Limits of the engine (see docs/worker.md for the matching flags).
#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub block_size: usize,
    pub num_blocks: usize,
    pub max_num_seqs: usize,
    pub max_batched_tokens: usize,
    pub max_prefill_chunk: usize,
    /// Requests waiting beyond this are refused (429).
    pub max_queue: usize,
    pub max_model_len: usize,
}

/// What a request asks of the engine, after the API layer has tokenized it.
#[derive(Debug, Clone)]
pub struct GenerateParams {
    pub sampling: SamplingParams,
    /// `None`: until the context is full.
    pub max_tokens: Option<usize>,
    pub stop: Vec<String>,
    pub priority: i32,
    /// Keep generating past end-of-sequence tokens (benchmarks).
    pub ignore_eos: bool,
}

impl GenerateParams {
    /// Greedy decoding of exactly `max_tokens` tokens (end-of-sequence ignored): the
    /// deterministic workload of benchmarks and tests.
    pub fn greedy_fixed_length(max_tokens: usize) -> Self {
        Self {
            sampling: SamplingParams {
                temperature: 0.0,
                ..SamplingParams::default()
            },
            max_tokens: Some(max_tokens),
            stop: Vec::new(),
            priority: 0,
            ignore_eos: true,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    Stop,
    Length,
    Cancelled,
    Error,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stop => "stop",
            Self::Length => "length",
            Self::Cancelled => "cancelled",
            Self::Error => "error",
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub cached_tokens: usize,
}

/// Streamed to the submitter.
#[derive(Debug, Clone)]
pub enum Event {
    /// One sampled token and the text it completes (may be empty while a character or a
    /// possible stop string is incomplete).
    Token {
        id: u32,
        text: String,
    },
    Done {
        reason: FinishReason,
        usage: Usage,
    },
}

/// Why a request was refused before it was queued; each maps to one HTTP status and
/// reason code in the API layer.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SubmitError {
    #[error("the prompt is empty")]
    EmptyPrompt,
    #[error(
        "this model's maximum context length is {max} tokens; the request has {prompt} prompt tokens and asks for {requested} more"
    )]
    ContextLength {
        max: usize,
        prompt: usize,
        requested: usize,
    },
    #[error("{0}")]
    Sampling(String),
    #[error("the queue is full ({0} requests waiting); retry later")]
    QueueFull(usize),
    #[error("the worker is draining and accepts no new requests")]
    Draining,
    #[error("the engine has stopped")]
    Stopped,
}

/// A load snapshot (the gRPC WatchLoad message and /metrics come from these).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Load {
    pub queued: usize,
    pub running: usize,
    pub kv_blocks_used: usize,
    pub kv_blocks_total: usize,
    pub draining: bool,
    pub prefix_cache_hit_rate: f64,
}

enum Command {
    Submit {
        seq: SeqId,
        prompt: Vec<u32>,
        params: GenerateParams,
        max_tokens: usize,
        tx: mpsc::UnboundedSender<Event>,
    },
}

/// Cheap to clone; shared by the HTTP and gRPC servers.
#[derive(Clone)]
pub struct EngineHandle {
    tx: std_mpsc::Sender<Command>,
    pub metrics: Arc<Metrics>,
    pub tokenizer: Arc<Tokenizer>,
    pub config: EngineConfig,
    vocab_size: usize,
    load: watch::Receiver<Load>,
    draining: Arc<AtomicBool>,
    pending: Arc<AtomicU64>,
    next_id: Arc<AtomicU64>,
}

impl EngineHandle {
    /// Validate and queue a request. The receiver yields `Token`s then one `Done`;
    /// dropping it cancels the request (its blocks are freed at the next step).
    pub fn submit(
        &self,
        prompt: Vec<u32>,
        params: GenerateParams,
    ) -> Result<mpsc::UnboundedReceiver<Event>, SubmitError> {
        let refuse = |e: SubmitError| {
            self.metrics
                .requests_rejected
                .fetch_add(1, Ordering::Relaxed);
            Err(e)
        };
        if self.draining.load(Ordering::Relaxed) {
            return refuse(SubmitError::Draining);
        }
        if prompt.is_empty() {
            return refuse(SubmitError::EmptyPrompt);
        }
        if let Err(e) = params.sampling.validate() {
            return refuse(SubmitError::Sampling(e.to_string()));
        }
        let max = self.config.max_model_len;
        let room = max.saturating_sub(prompt.len());
        let max_tokens = params.max_tokens.unwrap_or(room);
        // The whole sequence must also fit in the KV cache at once.
        let blocks_needed = (prompt.len() + max_tokens.max(1)).div_ceil(self.config.block_size);
        if prompt.len() >= max || max_tokens > room || blocks_needed > self.config.num_blocks {
            let max = max.min(self.config.num_blocks * self.config.block_size);
            return refuse(SubmitError::ContextLength {
                max,
                prompt: prompt.len(),
                requested: max_tokens,
            });
        }
        if max_tokens == 0 {
            return refuse(SubmitError::Sampling(
                "max_tokens must be at least 1".into(),
            ));
        }
        let pending = self.pending.fetch_add(1, Ordering::AcqRel) as usize;
        if pending >= self.config.max_queue + self.config.max_num_seqs {
            self.pending.fetch_sub(1, Ordering::AcqRel);
            return refuse(SubmitError::QueueFull(self.load.borrow().queued));
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let seq = self.next_id.fetch_add(1, Ordering::Relaxed);
        if self
            .tx
            .send(Command::Submit {
                seq,
                prompt,
                params,
                max_tokens,
                tx,
            })
            .is_err()
        {
            self.pending.fetch_sub(1, Ordering::AcqRel);
            return Err(SubmitError::Stopped);
        }
        Ok(rx)
    }

    pub fn load(&self) -> Load {
        *self.load.borrow()
    }

    /// A receiver that changes whenever the load does.
    pub fn watch_load(&self) -> watch::Receiver<Load> {
        self.load.clone()
    }

    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// Stop admitting requests. Returns the number still in flight.
    pub fn drain(&self) -> usize {
        self.draining.store(true, Ordering::Relaxed);
        self.in_flight()
    }

    pub fn in_flight(&self) -> usize {
        self.pending.load(Ordering::Acquire) as usize
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }
}

/// Per-request state the engine keeps beside the scheduler's token lists.
struct Active {
    tx: mpsc::UnboundedSender<Event>,
    sampler: Sampler,
    decoder: IncrementalDecoder,
    params: GenerateParams,
    max_tokens: usize,
    prompt_len: usize,
    cached_tokens: usize,
    generated: Vec<u32>,
    /// Decoded text not yet sent because it may be the start of a stop string.
    held: String,
    arrived: Instant,
    last_token: Option<Instant>,
}

/// Start the engine thread.
pub fn start(
    backend: Box<dyn Backend>,
    tokenizer: Arc<Tokenizer>,
    vocab_size: usize,
    config: EngineConfig,
) -> Result<EngineHandle, EngineError> {
    let metrics = Arc::new(Metrics::default());
    metrics
        .kv_blocks_total
        .store(config.num_blocks as u64, Ordering::Relaxed);
    let (tx, rx) = std_mpsc::channel();
    let (load_tx, load_rx) = watch::channel(Load {
        kv_blocks_total: config.num_blocks,
        ..Load::default()
    });
    let draining = Arc::new(AtomicBool::new(false));
    let pending = Arc::new(AtomicU64::new(0));
    let handle = EngineHandle {
        tx,
        metrics: Arc::clone(&metrics),
        tokenizer: Arc::clone(&tokenizer),
        config: config.clone(),
        vocab_size,
        load: load_rx,
        draining: Arc::clone(&draining),
        pending: Arc::clone(&pending),
        next_id: Arc::new(AtomicU64::new(1)),
    };
    let sched = Scheduler::new(SchedulerConfig {
        max_num_seqs: config.max_num_seqs,
        max_batched_tokens: config.max_batched_tokens,
        max_prefill_chunk: config.max_prefill_chunk,
        max_model_len: config.max_model_len,
    })
    .map_err(|e| EngineError(e.to_string()))?;
    let bm = BlockManager::new(config.num_blocks, config.block_size)
        .map_err(|e| EngineError(e.to_string()))?;
    let mut engine = Engine {
        rx,
        backend,
        tokenizer,
        vocab_size,
        sched,
        bm,
        active: HashMap::new(),
        metrics,
        load_tx,
        draining,
        pending,
        arrival: 0,
    };
    std::thread::Builder::new()
        .name("engine".into())
        .spawn(move || engine.run())
        .map_err(|e| EngineError(format!("cannot start the engine thread: {e}")))?;
    Ok(handle)
}

/// The engine could not start (invalid limits, no thread).
#[derive(Debug, thiserror::Error)]
#[error("engine: {0}")]
pub struct EngineError(pub String);

struct Engine {
    rx: std_mpsc::Receiver<Command>,
    backend: Box<dyn Backend>,
    tokenizer: Arc<Tokenizer>,
    vocab_size: usize,
    sched: Scheduler,
    bm: BlockManager,
    active: HashMap<SeqId, Active>,
    metrics: Arc<Metrics>,
    load_tx: watch::Sender<Load>,
    draining: Arc<AtomicBool>,
    pending: Arc<AtomicU64>,
    arrival: u64,
}

impl Engine {
    fn run(&mut self) {
        loop {
            // Block when idle; otherwise take whatever has arrived and keep stepping.
            if self.active.is_empty() {
                self.publish_load();
                match self.rx.recv() {
                    Ok(cmd) => self.command(cmd),
                    Err(_) => return,
                }
            }
            while let Ok(cmd) = self.rx.try_recv() {
                self.command(cmd);
            }
            self.reap_cancelled();
            if self.sched.has_work() {
                self.step();
            }
            self.publish_load();
        }
    }

    fn command(&mut self, cmd: Command) {
        match cmd {
            Command::Submit {
                seq,
                prompt,
                params,
                max_tokens,
                tx,
            } => {
                self.arrival += 1;
                let sampler = match Sampler::new(params.sampling, self.vocab_size) {
                    Ok(s) => s,
                    Err(e) => {
                        // Validated by the handle already; a bug guard.
                        tracing::error!(error = %e, "sampling parameters refused");
                        let _ = tx.send(Event::Done {
                            reason: FinishReason::Error,
                            usage: Usage::default(),
                        });
                        self.pending.fetch_sub(1, Ordering::AcqRel);
                        return;
                    }
                };
                let prompt_len = prompt.len();
                let added = self
                    .sched
                    .validate(&self.bm, prompt_len, max_tokens)
                    .and_then(|()| {
                        self.sched.add(NewSequence {
                            id: seq,
                            prompt,
                            max_tokens,
                            priority: params.priority,
                            arrival: self.arrival,
                        })
                    });
                if let Err(e) = added {
                    // The handle checks the same limits first, so this is a bug guard.
                    tracing::error!(error = %e, "request refused by the scheduler");
                    let _ = tx.send(Event::Done {
                        reason: FinishReason::Error,
                        usage: Usage::default(),
                    });
                    self.pending.fetch_sub(1, Ordering::AcqRel);
                    return;
                }
                self.metrics
                    .prompt_tokens
                    .fetch_add(prompt_len as u64, Ordering::Relaxed);
                self.active.insert(
                    seq,
                    Active {
                        tx,
                        sampler,
                        decoder: IncrementalDecoder::new(true),
                        params,
                        max_tokens,
                        prompt_len,
                        cached_tokens: 0,
                        generated: Vec::new(),
                        held: String::new(),
                        arrived: Instant::now(),
                        last_token: None,
                    },
                );
            }
        }
    }

    /// Requests whose receiver is gone are finished now, freeing their blocks.
    fn reap_cancelled(&mut self) {
        let gone: Vec<SeqId> = self
            .active
            .iter()
            .filter(|(_, a)| a.tx.is_closed())
            .map(|(id, _)| *id)
            .collect();
        for id in gone {
            self.metrics
                .requests_cancelled
                .fetch_add(1, Ordering::Relaxed);
            self.remove(id);
        }
    }

    fn remove(&mut self, id: SeqId) {
        self.sched.finish(&mut self.bm, id);
        if self.active.remove(&id).is_some() {
            self.pending.fetch_sub(1, Ordering::AcqRel);
        }
    }

    fn step(&mut self) {
        let plan: StepPlan = self.sched.schedule(&mut self.bm);
        self.metrics
            .preemptions
            .fetch_add(plan.preempted.len() as u64, Ordering::Relaxed);
        if plan.seqs.is_empty() {
            // Nothing fits right now (all blocks held); wait for a command instead of spinning.
            std::thread::sleep(std::time::Duration::from_millis(1));
            return;
        }
        self.metrics.steps.fetch_add(1, Ordering::Relaxed);
        for s in &plan.seqs {
            if s.cached_tokens > 0
                && let Some(a) = self.active.get_mut(&s.id)
            {
                a.cached_tokens = s.cached_tokens;
            }
        }
        let chunks: Vec<SeqChunk<'_>> = plan
            .seqs
            .iter()
            .map(|s| SeqChunk {
                tokens: &s.tokens,
                start: s.start,
                block_table: &s.block_table,
                want_logits: s.sample,
            })
            .collect();
        // How each sampled row is to be picked (its draw taken now): the backend picks the
        // greedy rows and may draw the sampled ones where the logits are.
        let vocab = self.vocab_size;
        let picks: Vec<RowPlan> = plan
            .seqs
            .iter()
            .filter(|s| s.sample)
            .map(|s| {
                let history = self.sched.seq_tokens(s.id).unwrap_or(&[]);
                self.active
                    .get_mut(&s.id)
                    .map_or(RowPick::Host { u: 0.0 }.into(), |a| {
                        a.sampler.plan(vocab, history, &a.generated)
                    })
            })
            .collect();
        let mut out = match self.backend.forward_step(&chunks, &picks) {
            Ok(o) => o,
            Err(e) => {
                tracing::error!(error = %e, "backend step failed; failing the step's requests");
                for s in &plan.seqs {
                    self.finish(s.id, FinishReason::Error);
                }
                return;
            }
        };
        let mut sampled = Vec::new();
        let mut rows = out.logits.chunks_exact_mut(self.vocab_size);
        for (i, s) in plan.seqs.iter().filter(|s| s.sample).enumerate() {
            // A row the backend did not pick has logits, consumed in order.
            let picked = out.picked.get(i).copied().flatten();
            let row = if picked.is_none() { rows.next() } else { None };
            let Some(a) = self.active.get_mut(&s.id) else {
                continue;
            };
            let counter = if picked.is_some() {
                &self.metrics.tokens_picked_by_backend
            } else {
                &self.metrics.tokens_sampled_on_host
            };
            counter.fetch_add(1, Ordering::Relaxed);
            let tok = match (picked, row) {
                (Some(t), _) => t,
                (None, Some(row)) => {
                    let history = self.sched.seq_tokens(s.id).unwrap_or(&[]);
                    let pick = picks.get(i).map_or(RowPick::Host { u: 0.0 }, |p| p.pick);
                    a.sampler.sample_planned(row, history, &a.generated, &pick)
                }
                (None, None) => break,
            };
            sampled.push((s.id, tok));
        }
        self.sched.on_step_done(&mut self.bm, &plan, &sampled);
        for (id, tok) in sampled {
            self.after_token(id, tok);
        }
    }

    /// Apply stop conditions for one new token and send what can be sent.
    fn after_token(&mut self, id: SeqId, tok: u32) {
        let at_limit = self.sched.at_length_limit(id);
        let Some(a) = self.active.get_mut(&id) else {
            return;
        };
        let now = Instant::now();
        match a.last_token {
            None => self
                .metrics
                .ttft
                .observe(now.duration_since(a.arrived).as_secs_f64()),
            Some(t) => self
                .metrics
                .itl
                .observe(now.duration_since(t).as_secs_f64()),
        }
        a.last_token = Some(now);
        a.generated.push(tok);
        self.metrics
            .generation_tokens
            .fetch_add(1, Ordering::Relaxed);
        if !a.params.ignore_eos && self.tokenizer.stop_tokens().contains(&tok) {
            let held = std::mem::take(&mut a.held);
            let _ = a.tx.send(Event::Token {
                id: tok,
                text: held,
            });
            return self.finish(id, FinishReason::Stop);
        }
        a.held.push_str(&a.decoder.push(&self.tokenizer, tok));
        if let Some(cut) = first_stop(&a.held, &a.params.stop) {
            a.held.truncate(cut);
            let held = std::mem::take(&mut a.held);
            let _ = a.tx.send(Event::Token {
                id: tok,
                text: held,
            });
            return self.finish(id, FinishReason::Stop);
        }
        let length = a.generated.len() >= a.max_tokens || at_limit;
        let keep = if length {
            0
        } else {
            stop_prefix_len(&a.held, &a.params.stop)
        };
        let text: String = a.held.drain(..a.held.len() - keep).collect();
        if a.tx.send(Event::Token { id: tok, text }).is_err() {
            self.metrics
                .requests_cancelled
                .fetch_add(1, Ordering::Relaxed);
            return self.remove(id);
        }
        if length {
            self.finish(id, FinishReason::Length);
        }
    }

    fn finish(&mut self, id: SeqId, reason: FinishReason) {
        if let Some(a) = self.active.get(&id) {
            let usage = Usage {
                prompt_tokens: a.prompt_len,
                completion_tokens: a.generated.len(),
                cached_tokens: a.cached_tokens,
            };
            let _ = a.tx.send(Event::Done { reason, usage });
            if matches!(reason, FinishReason::Stop | FinishReason::Length) {
                self.metrics
                    .requests_finished
                    .fetch_add(1, Ordering::Relaxed);
            }
        }
        self.remove(id);
    }

    fn publish_load(&mut self) {
        let m = &self.metrics;
        let stats = self.bm.prefix_cache_stats();
        m.prefix_queried_tokens
            .store(stats.queries, Ordering::Relaxed);
        m.prefix_hit_tokens.store(stats.hits, Ordering::Relaxed);
        let load = Load {
            queued: self.sched.num_waiting(),
            running: self.sched.num_running(),
            kv_blocks_used: self.bm.num_used_blocks(),
            kv_blocks_total: self.bm.num_blocks(),
            draining: self.draining.load(Ordering::Relaxed),
            prefix_cache_hit_rate: m.prefix_hit_rate(),
        };
        m.queued.store(load.queued as u64, Ordering::Relaxed);
        m.running.store(load.running as u64, Ordering::Relaxed);
        m.kv_blocks_used
            .store(load.kv_blocks_used as u64, Ordering::Relaxed);
        self.load_tx.send_if_modified(|old| {
            let changed = *old != load;
            *old = load;
            changed
        });
    }
}

/// Byte index where the earliest stop string starts in `text`.
fn first_stop(text: &str, stops: &[String]) -> Option<usize> {
    stops
        .iter()
        .filter(|s| !s.is_empty())
        .filter_map(|s| text.find(s.as_str()))
        .min()
}

/// Length of the longest suffix of `text` that is a proper prefix of a stop string (that
/// text must be held back until we know whether the stop string completes).
fn stop_prefix_len(text: &str, stops: &[String]) -> usize {
    let mut best = 0;
    for s in stops {
        for (i, _) in s.char_indices().skip(1) {
            if i > best && text.ends_with(&s[..i]) {
                best = i;
            }
        }
    }
    best
}

/// Milliseconds since the Unix epoch (for load snapshots).
pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_string_helpers() {
        let stops = vec!["\n\n".to_string(), "END".to_string()];
        assert_eq!(first_stop("abc\n\ndef", &stops), Some(3));
        assert_eq!(first_stop("abcEN", &stops), None);
        assert_eq!(stop_prefix_len("abcEN", &stops), 2);
        assert_eq!(stop_prefix_len("abc\n", &stops), 1);
        assert_eq!(stop_prefix_len("abc", &stops), 0);
    }
}
