//! Continuous-batching scheduler: [`Scheduler`].
//!
//! Owns: the sequences' scheduling state (known tokens, computed count, waiting/running
//! queues ordered by priority then arrival) and the per-step decision of which tokens of
//! which sequences run, under a token budget, a sequence cap and the KV block supply
//! (chunked prefill, prefix-cache hits, preemption by recompute).
//!
//! Must not: run a model, sample, own KV blocks (every block goes through
//! [`BlockManager`]), or decide stop conditions (the engine calls [`Scheduler::finish`]);
//! the one limit it enforces itself is `max_model_len`. [`Scheduler::schedule`] only returns
//! a plain [`StepPlan`]; the engine executes it and reports back with
//! [`Scheduler::on_step_done`]. One plan is in flight at a time.

use std::cmp::Reverse;
use std::collections::{BTreeSet, HashMap, HashSet};
use std::ops::Bound;

use crate::kv_cache::{BlockId, BlockManager, KvError, SeqId};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SchedulerConfig {
    /// Most sequences running (holding KV blocks) at once.
    pub max_num_seqs: usize,
    /// Token budget per step, summed over all scheduled sequences.
    pub max_batched_tokens: usize,
    /// Most tokens one sequence computes in one step.
    pub max_prefill_chunk: usize,
    /// Hard bound on a sequence's length (prompt + generated).
    pub max_model_len: usize,
}

/// A request handed to [`Scheduler::add`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewSequence {
    pub id: SeqId,
    pub prompt: Vec<u32>,
    /// Generation limit, enforced by the engine; used here only for capacity checks.
    pub max_tokens: usize,
    /// Higher runs first.
    pub priority: i32,
    /// Monotonic arrival counter; earlier runs first among equal priorities.
    pub arrival: u64,
}

/// What to compute in one step. Produced by [`Scheduler::schedule`], executed by the engine.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StepPlan {
    pub seqs: Vec<ScheduledSeq>,
    /// Sequences preempted this step: their blocks are freed and they will be recomputed.
    pub preempted: Vec<SeqId>,
    /// Sum of `seqs[i].tokens.len()`; never above `max_batched_tokens`.
    pub num_batched_tokens: usize,
}

impl StepPlan {
    pub fn is_empty(&self) -> bool {
        self.seqs.is_empty()
    }
}

/// One sequence's share of a step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScheduledSeq {
    pub id: SeqId,
    /// First position computed this step.
    pub start: usize,
    /// Token ids at positions `start..start + tokens.len()` (at least one).
    pub tokens: Vec<u32>,
    /// The sequence's whole block table (covers every position up to the chunk's end).
    pub block_table: Vec<BlockId>,
    /// This step reaches the end of the known tokens: logits are needed and a token must be
    /// sampled and reported in `on_step_done`.
    pub sample: bool,
    /// Prefix-cache hit on admission (positions `0..cached_tokens` were not recomputed).
    pub cached_tokens: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScheduleError {
    #[error("invalid scheduler configuration: {0}")]
    InvalidConfig(String),
    #[error("sequence {0} is already scheduled")]
    DuplicateSequence(SeqId),
    #[error("the prompt is empty")]
    EmptyPrompt,
    #[error(
        "the prompt has {prompt_len} tokens but the context length is {max_model_len}; \
         the prompt must be shorter so at least one token can be generated"
    )]
    PromptTooLong {
        prompt_len: usize,
        max_model_len: usize,
    },
    #[error(
        "the request may need {needed_blocks} KV cache blocks ({num_tokens} tokens) but the \
         cache holds only {total_blocks}; lower max_tokens or shorten the prompt"
    )]
    ExceedsKvCapacity {
        num_tokens: usize,
        needed_blocks: usize,
        total_blocks: usize,
    },
}

/// Continuous-batching scheduler in the style of vLLM v1. See the module docs.
#[derive(Debug, Clone)]
pub struct Scheduler {
    config: SchedulerConfig,
    seqs: HashMap<SeqId, Seq>,
    waiting: BTreeSet<QueueKey>,
    running: BTreeSet<QueueKey>,
}

/// Queue order: priority descending, then arrival ascending (then id, for uniqueness).
type QueueKey = (Reverse<i32>, u64, SeqId);

#[derive(Debug, Clone)]
struct Seq {
    /// Prompt followed by generated tokens.
    tokens: Vec<u32>,
    prompt_len: usize,
    max_tokens: usize,
    key: QueueKey,
    /// Positions `0..num_computed` have KV in this sequence's blocks (0 while waiting).
    num_computed: usize,
    running: bool,
}

impl Scheduler {
    pub fn new(config: SchedulerConfig) -> Result<Self, ScheduleError> {
        let zero = [
            ("max_num_seqs", config.max_num_seqs),
            ("max_batched_tokens", config.max_batched_tokens),
            ("max_prefill_chunk", config.max_prefill_chunk),
            ("max_model_len", config.max_model_len),
        ]
        .into_iter()
        .find(|&(_, v)| v == 0);
        if let Some((name, _)) = zero {
            return Err(ScheduleError::InvalidConfig(format!(
                "{name} must be at least 1"
            )));
        }
        Ok(Self {
            config,
            seqs: HashMap::new(),
            waiting: BTreeSet::new(),
            running: BTreeSet::new(),
        })
    }

    pub fn config(&self) -> &SchedulerConfig {
        &self.config
    }

    /// Checks up front that a request can ever run: non-empty, shorter than `max_model_len`,
    /// and its longest possible length fits in the whole KV cache on its own.
    pub fn validate(
        &self,
        bm: &BlockManager,
        prompt_len: usize,
        max_tokens: usize,
    ) -> Result<(), ScheduleError> {
        let max_model_len = self.config.max_model_len;
        if prompt_len == 0 {
            return Err(ScheduleError::EmptyPrompt);
        }
        if prompt_len >= max_model_len {
            return Err(ScheduleError::PromptTooLong {
                prompt_len,
                max_model_len,
            });
        }
        let num_tokens = prompt_len.saturating_add(max_tokens).min(max_model_len);
        let needed_blocks = num_tokens.div_ceil(bm.block_size());
        if needed_blocks > bm.num_blocks() {
            return Err(ScheduleError::ExceedsKvCapacity {
                num_tokens,
                needed_blocks,
                total_blocks: bm.num_blocks(),
            });
        }
        Ok(())
    }

    /// Queues a request. Call [`Scheduler::validate`] first: a request that cannot fit in
    /// the KV cache would otherwise wait (or be preempted) forever.
    pub fn add(&mut self, req: NewSequence) -> Result<(), ScheduleError> {
        if self.seqs.contains_key(&req.id) {
            return Err(ScheduleError::DuplicateSequence(req.id));
        }
        if req.prompt.is_empty() {
            return Err(ScheduleError::EmptyPrompt);
        }
        if req.prompt.len() >= self.config.max_model_len {
            return Err(ScheduleError::PromptTooLong {
                prompt_len: req.prompt.len(),
                max_model_len: self.config.max_model_len,
            });
        }
        let key = (Reverse(req.priority), req.arrival, req.id);
        self.waiting.insert(key);
        self.seqs.insert(
            req.id,
            Seq {
                prompt_len: req.prompt.len(),
                tokens: req.prompt,
                max_tokens: req.max_tokens,
                key,
                num_computed: 0,
                running: false,
            },
        );
        Ok(())
    }

    /// Decides the next step. Running sequences go first (decode, or their next prefill
    /// chunk), in priority order; when blocks run out the lowest-priority, latest-arrived
    /// running sequence not yet scheduled this step (possibly the current one) is preempted.
    /// If nothing was preempted, waiting sequences are then admitted in priority order while
    /// the budget, `max_num_seqs` and blocks allow; the first one that does not fit stops
    /// admission, so lower-priority requests never overtake it.
    pub fn schedule(&mut self, bm: &mut BlockManager) -> StepPlan {
        let mut plan = StepPlan::default();
        let mut budget = self.config.max_batched_tokens;
        self.schedule_running(bm, &mut plan, &mut budget);
        if plan.preempted.is_empty() {
            self.admit_waiting(bm, &mut plan, &mut budget);
        }
        plan.num_batched_tokens = self.config.max_batched_tokens - budget;
        plan
    }

    /// Records that `plan` was executed: advances computed counts, registers newly full
    /// blocks in the prefix cache, and appends `sampled` tokens to sequences whose step had
    /// `sample` set. Entries for sequences finished since the plan was made are ignored.
    pub fn on_step_done(
        &mut self,
        bm: &mut BlockManager,
        plan: &StepPlan,
        sampled: &[(SeqId, u32)],
    ) {
        let mut expect_sample = HashSet::new();
        for s in &plan.seqs {
            let Some(seq) = self.seqs.get_mut(&s.id) else {
                continue;
            };
            let end = s.start.saturating_add(s.tokens.len());
            if !seq.running || seq.num_computed != s.start || end > seq.tokens.len() {
                continue; // stale plan entry
            }
            seq.num_computed = end;
            bm.commit_full_blocks(s.id, &seq.tokens, end);
            if s.sample {
                expect_sample.insert(s.id);
            }
        }
        for &(id, token) in sampled {
            let Some(seq) = self.seqs.get_mut(&id) else {
                continue;
            };
            if expect_sample.remove(&id)
                && seq.num_computed == seq.tokens.len()
                && seq.tokens.len() < self.config.max_model_len
            {
                seq.tokens.push(token);
            }
        }
    }

    /// Removes a sequence wherever it is and frees its blocks. Returns whether it existed;
    /// unknown ids are a no-op (cancellation may race with completion).
    pub fn finish(&mut self, bm: &mut BlockManager, id: SeqId) -> bool {
        bm.free(id);
        let Some(seq) = self.seqs.remove(&id) else {
            return false;
        };
        self.waiting.remove(&seq.key);
        self.running.remove(&seq.key);
        true
    }

    pub fn num_waiting(&self) -> usize {
        self.waiting.len()
    }

    pub fn num_running(&self) -> usize {
        self.running.len()
    }

    /// Whether any sequence is waiting or running.
    pub fn has_work(&self) -> bool {
        !self.seqs.is_empty()
    }

    /// Prompt followed by the tokens generated so far.
    pub fn seq_tokens(&self, id: SeqId) -> Option<&[u32]> {
        self.seqs.get(&id).map(|s| s.tokens.as_slice())
    }

    pub fn num_generated(&self, id: SeqId) -> Option<usize> {
        self.seqs.get(&id).map(|s| s.tokens.len() - s.prompt_len)
    }

    pub fn prompt_len(&self, id: SeqId) -> Option<usize> {
        self.seqs.get(&id).map(|s| s.prompt_len)
    }

    pub fn max_tokens(&self, id: SeqId) -> Option<usize> {
        self.seqs.get(&id).map(|s| s.max_tokens)
    }

    /// The sequence has reached `max_model_len` and will not be scheduled again; the engine
    /// should finish it. False for unknown ids.
    pub fn at_length_limit(&self, id: SeqId) -> bool {
        self.seqs
            .get(&id)
            .is_some_and(|s| s.tokens.len() >= self.config.max_model_len)
    }

    /// Tokens `seq` may compute in one step within `budget`, or `None` if it has nothing to
    /// compute (waiting for a sampled token, or at the length limit).
    fn next_chunk(&self, seq: &Seq, budget: usize) -> Option<usize> {
        if seq.tokens.len() >= self.config.max_model_len {
            return None;
        }
        let remaining = seq.tokens.len().saturating_sub(seq.num_computed);
        let n = remaining.min(budget).min(self.config.max_prefill_chunk);
        (n > 0).then_some(n)
    }

    fn schedule_running(&mut self, bm: &mut BlockManager, plan: &mut StepPlan, budget: &mut usize) {
        let order: Vec<QueueKey> = self.running.iter().copied().collect();
        for key in order {
            if *budget == 0 {
                break;
            }
            if !self.running.contains(&key) {
                continue; // preempted earlier in this step
            }
            let id = key.2;
            while let Some(seq) = self.seqs.get(&id) {
                let Some(n) = self.next_chunk(seq, *budget) else {
                    break;
                };
                match bm.allocate(id, &seq.tokens, seq.num_computed, n) {
                    Ok(a) => {
                        plan.seqs.push(scheduled(
                            bm,
                            id,
                            seq,
                            seq.num_computed,
                            a.num_new_tokens,
                            0,
                        ));
                        *budget -= a.num_new_tokens;
                        break;
                    }
                    Err(KvError::OutOfBlocks { .. }) => {
                        // Sequences before `key` were handled already this step and keep
                        // their blocks; the victim is the last one, at or after `key`.
                        let Some(victim) = self.running.last().copied() else {
                            break;
                        };
                        self.preempt(bm, victim);
                        plan.preempted.push(victim.2);
                        if victim == key {
                            break;
                        }
                    }
                    // Not reachable with consistent state; leave the sequence unscheduled.
                    Err(_) => break,
                }
            }
        }
    }

    fn admit_waiting(&mut self, bm: &mut BlockManager, plan: &mut StepPlan, budget: &mut usize) {
        let mut cursor = Bound::Unbounded;
        while *budget > 0 && self.running.len() < self.config.max_num_seqs {
            let Some(&key) = self.waiting.range((cursor, Bound::Unbounded)).next() else {
                break;
            };
            cursor = Bound::Excluded(key);
            let id = key.2;
            let Some(seq) = self.seqs.get(&id) else {
                continue;
            };
            // A preempted sequence that already reached the limit waits for `finish`.
            let Some(n) = self.next_chunk(seq, *budget) else {
                continue;
            };
            match bm.allocate(id, &seq.tokens, 0, n) {
                Ok(a) => {
                    let sched = scheduled(
                        bm,
                        id,
                        seq,
                        a.cached_tokens,
                        a.num_new_tokens,
                        a.cached_tokens,
                    );
                    plan.seqs.push(sched);
                    *budget -= a.num_new_tokens;
                    self.waiting.remove(&key);
                    self.running.insert(key);
                    if let Some(seq) = self.seqs.get_mut(&id) {
                        seq.num_computed = a.cached_tokens;
                        seq.running = true;
                    }
                }
                Err(KvError::OutOfBlocks { .. }) => break,
                Err(_) => continue,
            }
        }
    }

    /// Preemption by recompute: free the blocks, forget the computed KV (generated tokens
    /// are kept and recomputed), and requeue at the sequence's priority position.
    fn preempt(&mut self, bm: &mut BlockManager, key: QueueKey) {
        bm.free(key.2);
        self.running.remove(&key);
        self.waiting.insert(key);
        if let Some(seq) = self.seqs.get_mut(&key.2) {
            seq.num_computed = 0;
            seq.running = false;
        }
    }
}

fn scheduled(
    bm: &BlockManager,
    id: SeqId,
    seq: &Seq,
    start: usize,
    n: usize,
    cached_tokens: usize,
) -> ScheduledSeq {
    ScheduledSeq {
        id,
        start,
        tokens: seq.tokens[start..start + n].to_vec(),
        block_table: bm.block_table(id).unwrap_or_default().to_vec(),
        sample: start + n == seq.tokens.len(),
        cached_tokens,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Deterministic stand-in for a model: the next token is a function of the whole prefix.
    fn next_token(prefix: &[u32]) -> u32 {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for &t in prefix {
            h = (h ^ u64::from(t)).wrapping_mul(0x0000_0100_0000_01b3);
        }
        (h % 1000) as u32
    }

    /// What a sequence produces when run alone with unlimited resources.
    fn reference(prompt: &[u32], max_tokens: usize, max_model_len: usize) -> Vec<u32> {
        let mut tokens = prompt.to_vec();
        while tokens.len() - prompt.len() < max_tokens && tokens.len() < max_model_len {
            tokens.push(next_token(&tokens));
        }
        tokens
    }

    fn config(
        max_num_seqs: usize,
        budget: usize,
        chunk: usize,
        max_model_len: usize,
    ) -> SchedulerConfig {
        SchedulerConfig {
            max_num_seqs,
            max_batched_tokens: budget,
            max_prefill_chunk: chunk,
            max_model_len,
        }
    }

    fn req(id: SeqId, prompt: Vec<u32>, max_tokens: usize, priority: i32) -> NewSequence {
        NewSequence {
            id,
            prompt,
            max_tokens,
            priority,
            arrival: id,
        }
    }

    /// An engine around the scheduler: executes plans against a shadow KV store (checking
    /// that every position a step attends to holds the right token), samples with
    /// `next_token`, and applies the stop conditions.
    struct Sim {
        sched: Scheduler,
        bm: BlockManager,
        kv: Vec<Vec<Option<u32>>>,
        done: HashMap<SeqId, Vec<u32>>,
        preemptions: usize,
    }

    impl Sim {
        fn new(cfg: SchedulerConfig, num_blocks: usize, block_size: usize) -> Self {
            Self {
                sched: Scheduler::new(cfg).unwrap(),
                bm: BlockManager::new(num_blocks, block_size).unwrap(),
                kv: vec![vec![None; block_size]; num_blocks],
                done: HashMap::new(),
                preemptions: 0,
            }
        }

        fn add(&mut self, r: NewSequence) {
            self.sched
                .validate(&self.bm, r.prompt.len(), r.max_tokens)
                .unwrap();
            self.sched.add(r).unwrap();
        }

        fn step(&mut self) -> Result<StepPlan, TestCaseError> {
            let cfg = *self.sched.config();
            let bs = self.bm.block_size();
            let plan = self.sched.schedule(&mut self.bm);
            let total: usize = plan.seqs.iter().map(|s| s.tokens.len()).sum();
            prop_assert_eq!(total, plan.num_batched_tokens);
            prop_assert!(total <= cfg.max_batched_tokens);
            prop_assert!(plan.seqs.len() <= cfg.max_num_seqs);
            prop_assert!(self.sched.num_running() <= cfg.max_num_seqs);
            self.preemptions += plan.preempted.len();
            let mut sampled = Vec::new();
            for s in &plan.seqs {
                let known = self.sched.seq_tokens(s.id).unwrap();
                let end = s.start + s.tokens.len();
                prop_assert!(!s.tokens.is_empty());
                prop_assert!(end <= known.len() && end <= cfg.max_model_len);
                prop_assert_eq!(&known[s.start..end], s.tokens.as_slice());
                prop_assert_eq!(s.sample, end == known.len());
                prop_assert!(s.block_table.len() * bs >= end);
                prop_assert!(!plan.preempted.contains(&s.id));
                for (pos, &tok) in known.iter().enumerate().take(s.start) {
                    let b = s.block_table[pos / bs] as usize;
                    prop_assert_eq!(self.kv[b][pos % bs], Some(tok), "stale KV at {}", pos);
                }
                for (pos, &tok) in (s.start..end).zip(&s.tokens) {
                    let b = s.block_table[pos / bs];
                    prop_assert_eq!(self.bm.block_ref_count(b), 1, "write to a shared block");
                    self.kv[b as usize][pos % bs] = Some(tok);
                }
                if s.sample {
                    sampled.push((s.id, next_token(known)));
                }
            }
            self.sched.on_step_done(&mut self.bm, &plan, &sampled);
            for &(id, _) in &sampled {
                let generated = self.sched.num_generated(id).unwrap();
                if generated >= self.sched.max_tokens(id).unwrap() || self.sched.at_length_limit(id)
                {
                    self.done
                        .insert(id, self.sched.seq_tokens(id).unwrap().to_vec());
                    prop_assert!(self.sched.finish(&mut self.bm, id));
                }
            }
            if let Err(e) = self.bm.check_invariants() {
                return Err(TestCaseError::fail(e));
            }
            prop_assert_eq!(self.bm.num_seqs(), self.sched.num_running());
            Ok(plan)
        }

        fn run_to_end(&mut self, max_steps: usize) -> Result<(), TestCaseError> {
            for _ in 0..max_steps {
                if !self.sched.has_work() {
                    prop_assert_eq!(self.bm.num_free_blocks(), self.bm.num_blocks());
                    return Ok(());
                }
                self.step()?;
            }
            Err(TestCaseError::fail("did not finish"))
        }
    }

    fn prompt(seed: u32, n: usize) -> Vec<u32> {
        (0..n as u32)
            .map(|i| (seed * 7919 + i * 31) % 1000)
            .collect()
    }

    #[test]
    fn chunked_prefill_is_contiguous() {
        let mut sim = Sim::new(config(4, 32, 32, 256), 32, 16);
        sim.add(req(1, prompt(1, 100), 3, 0));
        let mut starts = Vec::new();
        for _ in 0..4 {
            let plan = sim.step().unwrap();
            assert_eq!(plan.seqs.len(), 1);
            let s = &plan.seqs[0];
            starts.push((s.start, s.tokens.len(), s.sample));
        }
        assert_eq!(
            starts,
            [
                (0, 32, false),
                (32, 32, false),
                (64, 32, false),
                (96, 4, true)
            ]
        );
        sim.run_to_end(10).unwrap();
        assert_eq!(sim.done[&1], reference(&prompt(1, 100), 3, 256));
    }

    #[test]
    fn max_prefill_chunk_caps_each_sequence() {
        let mut sim = Sim::new(config(4, 64, 10, 256), 32, 16);
        sim.add(req(1, prompt(1, 25), 1, 0));
        sim.add(req(2, prompt(2, 25), 1, 0));
        let plan = sim.step().unwrap();
        let lens: Vec<usize> = plan.seqs.iter().map(|s| s.tokens.len()).collect();
        assert_eq!(lens, [10, 10]);
        sim.run_to_end(10).unwrap();
    }

    #[test]
    fn priority_then_arrival_orders_admission() {
        let mut sim = Sim::new(config(1, 64, 64, 256), 32, 16);
        sim.add(NewSequence {
            arrival: 0,
            ..req(10, prompt(1, 5), 1, 0)
        });
        sim.add(NewSequence {
            arrival: 1,
            ..req(11, prompt(2, 5), 1, 5)
        });
        sim.add(NewSequence {
            arrival: 2,
            ..req(12, prompt(3, 5), 1, 5)
        });
        sim.add(NewSequence {
            arrival: 3,
            ..req(13, prompt(4, 5), 1, -1)
        });
        let mut order = Vec::new();
        while sim.sched.has_work() {
            order.extend(sim.step().unwrap().seqs.iter().map(|s| s.id));
        }
        assert_eq!(order, [11, 12, 10, 13]);
    }

    #[test]
    fn preemption_recomputes_identically() {
        // Block size 4, 6 blocks: two sequences that each grow to 5 blocks cannot coexist.
        let mut sim = Sim::new(config(4, 64, 64, 256), 6, 4);
        sim.add(req(1, prompt(1, 8), 12, 0));
        sim.add(req(2, prompt(2, 8), 12, 0));
        sim.run_to_end(200).unwrap();
        assert!(sim.preemptions > 0);
        assert_eq!(sim.done[&1], reference(&prompt(1, 8), 12, 256));
        assert_eq!(sim.done[&2], reference(&prompt(2, 8), 12, 256));
    }

    #[test]
    fn preempted_sequence_goes_back_to_waiting() {
        let mut sim = Sim::new(config(4, 64, 64, 256), 4, 4);
        sim.add(req(1, prompt(1, 7), 8, 1));
        sim.add(req(2, prompt(2, 7), 8, 0));
        let mut preempted = None;
        for _ in 0..20 {
            let plan = sim.step().unwrap();
            if let Some(&id) = plan.preempted.first() {
                preempted = Some(id);
                break;
            }
        }
        // The lower-priority sequence is the victim; its KV is gone, its tokens are not.
        assert_eq!(preempted, Some(2));
        assert_eq!(sim.sched.num_waiting(), 1);
        assert!(sim.bm.block_table(2).is_none());
        assert!(sim.sched.num_generated(2).unwrap() > 0);
    }

    #[test]
    fn fully_cached_prompt_still_samples() {
        let mut sim = Sim::new(config(4, 64, 64, 256), 16, 16);
        sim.add(req(1, prompt(1, 32), 1, 0));
        sim.run_to_end(10).unwrap();
        sim.add(req(2, prompt(1, 32), 1, 0));
        let plan = sim.step().unwrap();
        let s = &plan.seqs[0];
        assert_eq!(
            (s.cached_tokens, s.start, s.tokens.len(), s.sample),
            (16, 16, 16, true)
        );
        let longer: Vec<u32> = prompt(1, 32).into_iter().chain([5]).collect();
        sim.run_to_end(10).unwrap();
        sim.add(req(3, longer.clone(), 2, 0));
        let plan = sim.step().unwrap();
        let s = &plan.seqs[0];
        assert_eq!(
            (s.cached_tokens, s.start, s.tokens.len(), s.sample),
            (32, 32, 1, true)
        );
        sim.run_to_end(10).unwrap();
        assert_eq!(sim.done[&3], reference(&longer, 2, 256));
        assert!(sim.bm.prefix_cache_stats().hits >= 48);
    }

    #[test]
    fn length_limit_is_never_exceeded() {
        let mut sim = Sim::new(config(4, 64, 64, 20), 8, 4);
        sim.add(req(1, prompt(1, 15), 100, 0));
        sim.run_to_end(20).unwrap();
        assert_eq!(sim.done[&1].len(), 20);
    }

    #[test]
    fn finish_cancels_anywhere_and_is_idempotent() {
        let mut sim = Sim::new(config(1, 64, 64, 256), 8, 4);
        sim.add(req(1, prompt(1, 9), 20, 0));
        sim.add(req(2, prompt(2, 9), 20, 0));
        sim.step().unwrap();
        assert_eq!((sim.sched.num_running(), sim.sched.num_waiting()), (1, 1));
        assert!(sim.sched.finish(&mut sim.bm, 2)); // waiting
        assert!(sim.sched.finish(&mut sim.bm, 1)); // running
        assert!(!sim.sched.finish(&mut sim.bm, 1));
        assert!(!sim.sched.has_work());
        assert_eq!(sim.bm.num_free_blocks(), 8);
        sim.bm.check_invariants().unwrap();
        assert!(sim.sched.schedule(&mut sim.bm).is_empty());
    }

    #[test]
    fn rejects_impossible_requests() {
        let sched = Scheduler::new(config(4, 64, 64, 100)).unwrap();
        let bm = BlockManager::new(4, 16).unwrap();
        assert_eq!(sched.validate(&bm, 0, 5), Err(ScheduleError::EmptyPrompt));
        assert!(matches!(
            sched.validate(&bm, 100, 5),
            Err(ScheduleError::PromptTooLong { .. })
        ));
        let err = sched.validate(&bm, 60, 10).unwrap_err();
        assert_eq!(
            err,
            ScheduleError::ExceedsKvCapacity {
                num_tokens: 70,
                needed_blocks: 5,
                total_blocks: 4
            }
        );
        assert!(err.to_string().contains("only 4"));
        assert_eq!(sched.validate(&bm, 60, 4), Ok(()));
        assert!(Scheduler::new(config(4, 0, 64, 100)).is_err());
        let mut sched = sched;
        sched.add(req(1, vec![1], 1, 0)).unwrap();
        assert_eq!(
            sched.add(req(1, vec![1], 1, 0)),
            Err(ScheduleError::DuplicateSequence(1))
        );
        assert_eq!(
            sched.add(req(2, vec![], 1, 0)),
            Err(ScheduleError::EmptyPrompt)
        );
    }

    #[derive(Debug, Clone)]
    struct Request {
        at_step: usize,
        prefix: usize,
        suffix_len: usize,
        max_tokens: usize,
        priority: i32,
        cancel_after: Option<usize>,
    }

    fn request() -> impl Strategy<Value = Request> {
        (
            0..20usize,
            0..3usize,
            1..30usize,
            1..24usize,
            -2..3i32,
            prop::option::weighted(0.2, 0..30usize),
        )
            .prop_map(
                |(at_step, prefix, suffix_len, max_tokens, priority, cancel_after)| Request {
                    at_step,
                    prefix,
                    suffix_len,
                    max_tokens,
                    priority,
                    cancel_after,
                },
            )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// Random arrivals, priorities, shared prefixes, cancellations and tight resources:
        /// every step respects the budget, the sequence cap and the KV invariants; every
        /// completed sequence equals its solo run; nothing leaks at the end.
        #[test]
        fn random_workloads_match_solo_runs(
            block_size in prop_oneof![Just(4usize), Just(16usize)],
            num_blocks in 4..24usize,
            max_num_seqs in 1..6usize,
            budget in 1..64usize,
            chunk in 1..48usize,
            max_model_len in 24..96usize,
            prefix_lens in proptest::collection::vec(0..40usize, 3),
            requests in proptest::collection::vec(request(), 1..12),
        ) {
            let cfg = config(max_num_seqs, budget, chunk, max_model_len);
            let mut sim = Sim::new(cfg, num_blocks, block_size);
            let mut expected = HashMap::new();
            let mut cancel_at = HashMap::new();
            let mut step = 0;
            loop {
                for (i, r) in requests.iter().enumerate().filter(|(_, r)| r.at_step == step) {
                    let mut p = prompt(r.prefix as u32, prefix_lens[r.prefix]);
                    p.extend(prompt(100 + i as u32, r.suffix_len));
                    if sim.sched.validate(&sim.bm, p.len(), r.max_tokens).is_err() {
                        continue;
                    }
                    let id = i as SeqId;
                    expected.insert(id, reference(&p, r.max_tokens, max_model_len));
                    if let Some(c) = r.cancel_after {
                        cancel_at.insert(step + c, id);
                    }
                    let arrival = step as u64 * 100 + i as u64;
                    sim.sched.add(NewSequence { id, prompt: p, max_tokens: r.max_tokens, priority: r.priority, arrival }).unwrap();
                }
                if let Some(&id) = cancel_at.get(&step)
                    && sim.sched.finish(&mut sim.bm, id)
                {
                    expected.remove(&id);
                    prop_assert!(sim.bm.check_invariants().is_ok());
                }
                sim.step()?;
                step += 1;
                if step > 20 && !sim.sched.has_work() {
                    break;
                }
                prop_assert!(step < 5000, "no progress");
            }
            prop_assert_eq!(sim.done.len(), expected.len());
            for (id, tokens) in &expected {
                prop_assert_eq!(&sim.done[id], tokens, "seq {}", id);
            }
            prop_assert_eq!(sim.bm.num_free_blocks(), num_blocks);
            prop_assert_eq!(sim.bm.num_used_blocks(), 0);
        }
    }
}
