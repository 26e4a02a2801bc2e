//! Token sampling: turns one position's logits into the next token id.
//!
//! Owns: [`SamplingParams`] and their validation (the request layer maps [`SamplingError`] to a
//! 400 with [`SamplingError::param`] / [`SamplingError::reason`]), OpenAI/vLLM-style penalties
//! (repetition over prompt + generated tokens, presence/frequency over generated tokens),
//! greedy decoding, temperature, top-k, top-p, min-p, and a small seeded PRNG so that a fixed
//! seed reproduces a completion exactly.
//!
//! Must not: know about tokenizers, stop conditions, models or batching (one [`Sampler`] per
//! sequence; the caller passes the token history), allocate per call in steady state (scratch
//! buffers are kept and reused), or panic on any logit values (NaN is treated as `-inf`).

use std::sync::atomic::{AtomicU64, Ordering};

/// How to pick the next token. The defaults are the OpenAI API's: plain sampling at
/// temperature 1 with every filter and penalty off.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplingParams {
    /// Softmax temperature in `[0, 2]`; `0` means greedy (argmax).
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens; `0` = off (values above the vocabulary size
    /// keep everything).
    pub top_k: usize,
    /// Nucleus sampling: keep the smallest set of most likely tokens whose probability reaches
    /// `top_p`, in `(0, 1]`; `1` = off.
    pub top_p: f32,
    /// Drop tokens less likely than `min_p` times the most likely one, in `[0, 1]`; `0` = off.
    pub min_p: f32,
    /// Seed for reproducible sampling; `None` seeds from the clock.
    pub seed: Option<u64>,
    /// Multiplicative penalty (> 0) on every token in the prompt or the output so far:
    /// positive logits are divided by it, negative ones multiplied; `1` = off.
    pub repetition_penalty: f32,
    /// Subtracted once from the logit of every token already generated, in `[-2, 2]`.
    pub presence_penalty: f32,
    /// Subtracted per occurrence from the logit of every token already generated, in `[-2, 2]`.
    pub frequency_penalty: f32,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            seed: None,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
        }
    }
}

/// An impossible sampling parameter. `Display` is a sentence for the API user; [`Self::param`]
/// and [`Self::reason`] are short machine-readable strings.
#[derive(Debug, Clone, Copy, PartialEq, thiserror::Error)]
pub enum SamplingError {
    #[error("temperature must be a number between 0 and 2, got {0}")]
    Temperature(f32),
    #[error("top_p must be greater than 0 and at most 1, got {0}")]
    TopP(f32),
    #[error("min_p must be between 0 and 1, got {0}")]
    MinP(f32),
    #[error("repetition_penalty must be a positive number, got {0}")]
    RepetitionPenalty(f32),
    #[error("presence_penalty must be between -2 and 2, got {0}")]
    PresencePenalty(f32),
    #[error("frequency_penalty must be between -2 and 2, got {0}")]
    FrequencyPenalty(f32),
}

impl SamplingError {
    /// The offending request field, as named in the OpenAI API.
    pub fn param(&self) -> &'static str {
        match self {
            Self::Temperature(_) => "temperature",
            Self::TopP(_) => "top_p",
            Self::MinP(_) => "min_p",
            Self::RepetitionPenalty(_) => "repetition_penalty",
            Self::PresencePenalty(_) => "presence_penalty",
            Self::FrequencyPenalty(_) => "frequency_penalty",
        }
    }

    /// A short machine-readable reason, e.g. `"temperature_out_of_range"`.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Temperature(_) => "temperature_out_of_range",
            Self::TopP(_) => "top_p_out_of_range",
            Self::MinP(_) => "min_p_out_of_range",
            Self::RepetitionPenalty(_) => "repetition_penalty_out_of_range",
            Self::PresencePenalty(_) => "presence_penalty_out_of_range",
            Self::FrequencyPenalty(_) => "frequency_penalty_out_of_range",
        }
    }
}

impl SamplingParams {
    /// Greedy decoding (temperature 0), everything else default.
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            ..Self::default()
        }
    }

    /// Rejects impossible values (NaN anywhere included). `top_k` is never an error: values
    /// above the vocabulary size mean "no limit".
    pub fn validate(&self) -> Result<(), SamplingError> {
        let t = self.temperature;
        if !(0.0..=2.0).contains(&t) {
            return Err(SamplingError::Temperature(t));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(SamplingError::TopP(self.top_p));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return Err(SamplingError::MinP(self.min_p));
        }
        let rp = self.repetition_penalty;
        if !(rp > 0.0 && rp.is_finite()) {
            return Err(SamplingError::RepetitionPenalty(rp));
        }
        if !(-2.0..=2.0).contains(&self.presence_penalty) {
            return Err(SamplingError::PresencePenalty(self.presence_penalty));
        }
        if !(-2.0..=2.0).contains(&self.frequency_penalty) {
            return Err(SamplingError::FrequencyPenalty(self.frequency_penalty));
        }
        Ok(())
    }
}

/// xoshiro256** (Blackman & Vigna), seeded through splitmix64.
#[derive(Debug, Clone)]
struct Rng {
    s: [u64; 4],
}

fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl Rng {
    fn new(seed: u64) -> Self {
        let mut st = seed;
        let s = [
            splitmix64(&mut st),
            splitmix64(&mut st),
            splitmix64(&mut st),
            splitmix64(&mut st),
        ];
        // splitmix64 is a bijection of distinct states, so the four words cannot all be zero.
        Self { s }
    }

    fn next_u64(&mut self) -> u64 {
        let result = self.s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = self.s[1] << 17;
        self.s[2] ^= self.s[0];
        self.s[3] ^= self.s[1];
        self.s[1] ^= self.s[2];
        self.s[0] ^= self.s[3];
        self.s[2] ^= t;
        self.s[3] = self.s[3].rotate_left(45);
        result
    }

    /// Uniform in `[0, 1)` with 53 random bits.
    fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

/// A seed for requests without one: wall clock, a process-wide counter and the stack address,
/// mixed (two samplers created in the same nanosecond still differ).
fn fresh_seed() -> u64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let count = COUNTER.fetch_add(1, Ordering::Relaxed);
    let local = 0u8;
    let mut st = nanos ^ count.rotate_left(32) ^ (&raw const local as u64);
    splitmix64(&mut st)
}

/// A token still in the running: its (penalized) logit, its unnormalized probability and id.
#[derive(Debug, Clone, Copy)]
struct Candidate {
    logit: f32,
    weight: f32,
    id: u32,
}

/// More likely first; equal logits by lower token id (so every order is deterministic and the
/// first candidate is exactly the greedy choice).
fn by_rank(a: &Candidate, b: &Candidate) -> std::cmp::Ordering {
    b.logit.total_cmp(&a.logit).then(a.id.cmp(&b.id))
}

/// `exp(x)` is below `e^-87` (about 1.6e-38, near the smallest normal f32) for tokens further
/// than `87 * temperature` below the best one; they get weight 0 and are never drawn.
const MIN_EXPONENT: f32 = -87.0;

/// Top-p first looks for the nucleus among this many best tokens (sorted), which is where it
/// lies for the peaked distributions of real models.
const NUCLEUS_PREFIX: usize = 256;

/// Samples tokens for one sequence. Keeps its RNG state and scratch buffers across calls.
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    seed: u64,
    rng: Rng,
    /// Per-token occurrence counts; all zero between calls.
    counts: Vec<u32>,
    /// Per-token marks for [`penalty_entries`]; all false between calls.
    seen: Vec<bool>,
    /// Per-token unnormalized probabilities of the current call.
    weights: Vec<f32>,
    candidates: Vec<Candidate>,
}

impl Sampler {
    /// A sampler for logits over `vocab_size` tokens (scratch space is sized for it up front;
    /// other logit lengths still work). Fails if the parameters do not [`validate`].
    ///
    /// [`validate`]: SamplingParams::validate
    pub fn new(params: SamplingParams, vocab_size: usize) -> Result<Self, SamplingError> {
        params.validate()?;
        let seed = params.seed.unwrap_or_else(fresh_seed);
        let sampled = params.temperature > 0.0;
        let filtered = params.top_k > 0 || params.top_p < 1.0 || params.min_p > 0.0;
        Ok(Self {
            params,
            seed,
            rng: Rng::new(seed),
            counts: if params.has_penalties() {
                vec![0; vocab_size]
            } else {
                Vec::new()
            },
            seen: Vec::new(),
            weights: vec![0.0; if sampled { vocab_size } else { 0 }],
            candidates: Vec::with_capacity(if sampled && filtered {
                vocab_size.min(4096)
            } else {
                0
            }),
        })
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// The seed in use (the generated one when the parameters had none), for logging and replay.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// Picks the next token from `logits` (one per vocabulary entry).
    ///
    /// `history` is the prompt plus the tokens generated so far (for the repetition penalty),
    /// `generated` the generated tokens alone (for the presence and frequency penalties); ids
    /// outside `logits` are ignored. `logits` is modified in place: the penalties are applied,
    /// then NaN becomes `-inf` and `+inf` becomes `f32::MAX`.
    ///
    /// Never panics. If no token has a finite logit (or `logits` is empty) the result is the
    /// greedy choice among them: token 0 when all are `-inf`/NaN.
    /// Whether [`Sampler::sample`] reduces to [`greedy_pick`] of the raw logits (greedy,
    /// no penalty): then a backend may pick the token itself, without sending the logits.
    pub fn is_plain_greedy(&self) -> bool {
        let t = self.params.temperature;
        !self.params.has_penalties() && (t == 0.0 || !(1.0 / t).is_finite())
    }

    pub fn sample(&mut self, logits: &mut [f32], history: &[u32], generated: &[u32]) -> u32 {
        let u = self.rng.next_f64();
        self.sample_u(logits, history, generated, u)
    }

    /// Decides, before a step, how this sequence's next token is to be picked, drawing
    /// the uniform `u` the pick will use (one draw a sampled token, whichever way it is
    /// picked; a greedy one takes none, or one with penalties, as `sample` does). The
    /// penalty list is allocated per call (the one exception to this module's
    /// no-allocation rule); `generated` must be the tail of `history`, as the engine
    /// passes them:
    /// [`RowPick::Greedy`] (temperature 0) or [`RowPick::Sample`], with the penalties the
    /// logits get first (from `history`, the prompt and the tokens so far, and
    /// `generated`, as [`Sampler::sample`] takes them), so that a device backend can pick
    /// where the logits are. `vocab` is the logits' length.
    pub fn plan(&mut self, vocab: usize, history: &[u32], generated: &[u32]) -> RowPlan {
        let p = self.params;
        let t = p.temperature;
        let greedy = t == 0.0 || !(1.0 / t).is_finite();
        let pick = if greedy {
            // A draw only if penalties make `sample` take one.
            if p.has_penalties() {
                self.rng.next_f64();
            }
            RowPick::Greedy
        } else {
            RowPick::Sample(DeviceDraw {
                temperature: t,
                top_k: if p.top_k < vocab { p.top_k } else { 0 },
                top_p: p.top_p,
                min_p: p.min_p,
                u: self.rng.next_f64(),
            })
        };
        let penalties = p.has_penalties().then(|| {
            penalty_entries(
                &p,
                history,
                generated,
                vocab,
                &mut self.counts,
                &mut self.seen,
            )
        });
        RowPlan { pick, penalties }
    }

    /// [`Sampler::sample`] for a row planned with [`Sampler::plan`] whose logits came back
    /// (the backend did not pick it): the same pick, with the planned draw.
    pub fn sample_planned(
        &mut self,
        logits: &mut [f32],
        history: &[u32],
        generated: &[u32],
        pick: &RowPick,
    ) -> u32 {
        if *pick == RowPick::Greedy && !self.params.has_penalties() {
            return greedy_pick(logits);
        }
        let u = match *pick {
            RowPick::Greedy => 0.0,
            RowPick::Sample(d) => d.u,
            RowPick::Host { u } => u,
        };
        self.sample_u(logits, history, generated, u)
    }

    /// [`Sampler::sample`] with the draw `u` (uniform in `[0, 1)`) given.
    fn sample_u(&mut self, logits: &mut [f32], history: &[u32], generated: &[u32], u: f64) -> u32 {
        if self.params.has_penalties() {
            self.apply_penalties(logits, history, generated);
        }
        // After the penalties: a repetition penalty below 1 can overflow a logit to +inf.
        let max = sanitize(logits);
        // A temperature so small that 1 / t overflows is greedy in all but exact ties.
        let t = self.params.temperature;
        if t == 0.0 || !(1.0 / t).is_finite() || max == f32::NEG_INFINITY {
            return first_index_of(logits, max);
        }
        self.sample_tempered(logits, max, u)
    }

    fn apply_penalties(&mut self, logits: &mut [f32], history: &[u32], generated: &[u32]) {
        let p = self.params;
        let n = logits.len();
        if self.counts.len() < n {
            self.counts.resize(n, 0);
        }
        let counts = &mut self.counts;
        if p.repetition_penalty != 1.0 {
            let rp = p.repetition_penalty;
            for &t in history {
                let t = t as usize;
                if t < n && counts[t] == 0 {
                    counts[t] = 1;
                    let l = &mut logits[t];
                    *l = if *l > 0.0 { *l / rp } else { *l * rp };
                }
            }
            for &t in history {
                if let Some(c) = counts.get_mut(t as usize) {
                    *c = 0;
                }
            }
        }
        if p.presence_penalty != 0.0 || p.frequency_penalty != 0.0 {
            for &t in generated {
                if let Some(c) = counts[..n].get_mut(t as usize) {
                    *c = c.saturating_add(1);
                }
            }
            for &t in generated {
                let t = t as usize;
                if t < n && counts[t] > 0 {
                    logits[t] -= p.presence_penalty + p.frequency_penalty * counts[t] as f32;
                    counts[t] = 0;
                }
            }
        }
    }

    /// Temperature, top-k, top-p, min-p, then a draw from what is left. `max` is the largest
    /// logit and is finite; `logits` holds no NaN or +inf.
    fn sample_tempered(&mut self, logits: &[f32], max: f32, u: f64) -> u32 {
        let p = self.params;
        let n = logits.len();
        if self.weights.len() < n {
            self.weights.resize(n, 0.0);
        }
        let w = &mut self.weights[..n];
        let inv_t = 1.0 / p.temperature;
        // The argmax gets exactly exp(0) = 1.
        for (w, &l) in w.iter_mut().zip(logits) {
            *w = weight((l - max) * inv_t);
        }
        let w = &*w;
        let top_k = if p.top_k > 0 && p.top_k < n {
            p.top_k
        } else {
            0
        };
        if top_k == 0 && p.top_p >= 1.0 && p.min_p <= 0.0 {
            return draw_dense(w, u).unwrap_or_else(|| argmax(logits));
        }

        // Candidates: tokens at or above a threshold that provably keeps every token the
        // filters could keep.
        let mut floor = f32::MIN_POSITIVE;
        let mut goal = None;
        if top_k > 0 {
            floor = floor.max(kth_largest_lower_bound(w, top_k));
        } else if p.top_p < 1.0 {
            let total = sum(w);
            let g = f64::from(p.top_p) * total;
            goal = Some(g);
            // The tokens at or above a bound on the k-th largest weight are a prefix by rank:
            // if they reach the goal, the nucleus lies among them. Real distributions are
            // peaked and the first bound suffices; flat ones need a larger k.
            for k in [NUCLEUS_PREFIX, 8 * NUCLEUS_PREFIX, 64 * NUCLEUS_PREFIX] {
                if k >= n {
                    break;
                }
                let bound = kth_largest_lower_bound(w, k);
                if sum_at_least(w, bound) >= g {
                    floor = floor.max(bound);
                    break;
                }
            }
        } else {
            // min-p alone: the best token has weight 1.
            floor = floor.max(p.min_p);
        }
        let cand = &mut self.candidates;
        cand.clear();
        // Skip whole chunks below the floor with a vectorized max (usually almost all of them).
        const CHUNK: usize = 64;
        for (ci, (wc, lc)) in w.chunks(CHUNK).zip(logits.chunks(CHUNK)).enumerate() {
            if lane_max(wc) >= floor {
                for (j, (&weight, &logit)) in wc.iter().zip(lc).enumerate() {
                    if weight >= floor {
                        let id = (ci * CHUNK + j) as u32;
                        cand.push(Candidate { logit, weight, id });
                    }
                }
            }
        }
        if top_k > 0 && top_k < cand.len() {
            cand.select_nth_unstable_by(top_k - 1, by_rank);
            cand.truncate(top_k);
        }
        let mut total = cand.iter().map(|c| f64::from(c.weight)).sum::<f64>();
        if p.top_p < 1.0 {
            let goal = goal.unwrap_or(f64::from(p.top_p) * total);
            total = nucleus(cand, goal);
        }
        if p.min_p > 0.0 {
            let best = cand.iter().map(|c| c.weight).fold(0.0, f32::max);
            let threshold = p.min_p * best;
            cand.retain(|c| c.weight >= threshold);
            total = cand.iter().map(|c| f64::from(c.weight)).sum();
        }
        let target = u * total;
        let mut acc = 0f64;
        for c in cand.iter() {
            acc += f64::from(c.weight);
            if acc > target {
                return c.id;
            }
        }
        // Rounding left `target` at the very top: the last candidate with any weight (the
        // argmax always survives with weight 1, so the fallback is only a guard).
        cand.iter()
            .rev()
            .find(|c| c.weight > 0.0)
            .map_or_else(|| argmax(logits), |c| c.id)
    }
}

/// How one row of a step becomes a token ([`Sampler::plan`]), so that a device backend
/// can pick where the logits are instead of sending them back.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RowPick {
    /// [`greedy_pick`] of the raw logits.
    Greedy,
    /// Temperature sampling with top-k / top-p / min-p and no penalty: a backend may draw
    /// it ([`DeviceDraw`]).
    Sample(DeviceDraw),
    /// Only the sampler can pick (a row without a plan); `u` is its draw.
    Host { u: f64 },
}

/// A row's [`RowPick`] and the penalties its logits get before it ([`Sampler::plan`]).
#[derive(Debug, Clone, PartialEq)]
pub struct RowPlan {
    pub pick: RowPick,
    pub penalties: Option<Penalties>,
}

impl From<RowPick> for RowPlan {
    fn from(pick: RowPick) -> Self {
        Self {
            pick,
            penalties: None,
        }
    }
}

/// The penalties of one row as a device applies them ([`apply_penalties`]): every
/// token they touch once, with what is subtracted from its logit after the repetition
/// penalty (0 for tokens only in the prompt). Equal, bit for bit, to what
/// [`Sampler::sample`] does to the logits.
#[derive(Debug, Clone, PartialEq)]
pub struct Penalties {
    /// The repetition penalty (1 = off), applied to every listed token.
    pub repetition: f32,
    /// (token, subtracted: presence + frequency x count for generated tokens, else 0).
    pub entries: Vec<(u32, f32)>,
}

/// The penalties `p` gives the next token's logits (see [`Penalties`]); `counts` and
/// `seen` are scratch, left all zero / false.
fn penalty_entries(
    p: &SamplingParams,
    history: &[u32],
    generated: &[u32],
    vocab: usize,
    counts: &mut Vec<u32>,
    seen: &mut Vec<bool>,
) -> Penalties {
    if counts.len() < vocab {
        counts.resize(vocab, 0);
    }
    if seen.len() < vocab {
        seen.resize(vocab, false);
    }
    let subtracts = p.presence_penalty != 0.0 || p.frequency_penalty != 0.0;
    if subtracts {
        for &t in generated {
            if let Some(c) = counts[..vocab].get_mut(t as usize) {
                *c = c.saturating_add(1);
            }
        }
    }
    // The repetition penalty touches the whole history, the others the generated tokens
    // (a subset of it).
    let touched = if p.repetition_penalty != 1.0 {
        history
    } else {
        generated
    };
    let mut entries = Vec::new();
    for &t in touched {
        let i = t as usize;
        if i < vocab && !seen[i] {
            seen[i] = true;
            let sub = if subtracts && counts[i] > 0 {
                p.presence_penalty + p.frequency_penalty * counts[i] as f32
            } else {
                0.0
            };
            entries.push((t, sub));
        }
    }
    for &(t, _) in &entries {
        seen[t as usize] = false;
    }
    for &t in generated {
        if let Some(c) = counts[..vocab].get_mut(t as usize) {
            *c = 0;
        }
    }
    Penalties {
        repetition: p.repetition_penalty,
        entries,
    }
}

/// The penalties `p` gives logits after `history` (prompt and tokens so far) with
/// `generated` (the tokens so far): what [`Sampler::plan`] attaches; `None` without
/// penalties.
pub fn penalties_for(
    p: &SamplingParams,
    history: &[u32],
    generated: &[u32],
    vocab: usize,
) -> Option<Penalties> {
    p.has_penalties().then(|| {
        penalty_entries(
            p,
            history,
            generated,
            vocab,
            &mut Vec::new(),
            &mut Vec::new(),
        )
    })
}

/// Applies `pen` to one row of logits as the GPU's `apply_penalties` does: each listed
/// token's logit divided by the repetition penalty if positive, else multiplied by it,
/// then the entry's amount subtracted (each operation rounded on its own).
pub fn apply_penalties(logits: &mut [f32], pen: &Penalties) {
    let rp = pen.repetition;
    for &(t, sub) in &pen.entries {
        if let Some(l) = logits.get_mut(t as usize) {
            let x = if rp != 1.0 {
                if *l > 0.0 { *l / rp } else { *l * rp }
            } else {
                *l
            };
            *l = x - sub;
        }
    }
}

/// A draw a backend may make for the sampler: [`Sampler::sample`]'s semantics with these
/// parameters and the uniform `u`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DeviceDraw {
    /// Positive, with a finite reciprocal.
    pub temperature: f32,
    /// `0` = off; otherwise below the vocabulary size.
    pub top_k: usize,
    pub top_p: f32,
    pub min_p: f32,
    pub u: f64,
}

impl DeviceDraw {
    /// Whether the draw needs the best tokens in rank order (top-k or top-p: see
    /// [`pick_from_ranked`]); otherwise it is the dense draw over the vocabulary in id
    /// order (with min-p: the tokens whose weight reaches `min_p`).
    pub fn ranked(&self) -> bool {
        self.top_k > 0 || self.top_p < 1.0
    }
}

/// Finishes a ranked [`DeviceDraw`] from the row's best tokens: `top` holds (sanitized
/// logit, id) pairs in rank order (larger logit first, equal logits by lower id), at least
/// `min(top_k, vocab)` of them for top-k; `weight_sum` is the sum of every token's weight
/// `exp((logit - max) / temperature)` (needed for top-p without top-k). Returns the token
/// [`Sampler::sample`] would draw from the whole row with the same parameters and `u`
/// (its candidates walked in rank order), or `None` when `top` cannot decide it: a top-p
/// nucleus larger than `top`, or too few candidates.
pub fn pick_from_ranked(
    d: &DeviceDraw,
    top: &[(f32, u32)],
    weight_sum: f64,
    vocab: usize,
) -> Option<u32> {
    let &(max, first) = top.first()?;
    if !d.ranked() {
        return None;
    }
    if max == f32::NEG_INFINITY {
        // No finite logit: the lowest id, which ranks first among equals.
        return Some(first);
    }
    let cand = ranked_survivors(d, top, weight_sum, vocab)?;
    let total: f64 = cand.iter().map(|c| f64::from(c.weight)).sum();
    let target = d.u * total;
    let mut acc = 0f64;
    for c in &cand {
        acc += f64::from(c.weight);
        if acc > target {
            return Some(c.id);
        }
    }
    cand.iter()
        .rev()
        .find(|c| c.weight > 0.0)
        .map(|c| c.id)
        .or(Some(first))
}

/// The candidates a ranked draw keeps from `top` (see [`pick_from_ranked`]; `top[0]`
/// finite): top-k, the top-p nucleus, min-p, in rank order with their weights; `None`
/// when `top` cannot decide them.
fn ranked_survivors(
    d: &DeviceDraw,
    top: &[(f32, u32)],
    weight_sum: f64,
    vocab: usize,
) -> Option<Vec<Candidate>> {
    let &(max, _) = top.first()?;
    let inv_t = 1.0 / d.temperature;
    let mut cand: Vec<Candidate> = Vec::with_capacity(top.len());
    // Weights fall with rank: once one is 0, every token after it (in `top` or not) has
    // weight 0 too, so the candidates then hold every token with weight.
    let mut complete = top.len() >= vocab;
    for &(logit, id) in top {
        let weight = weight((logit - max) * inv_t);
        if weight >= f32::MIN_POSITIVE {
            cand.push(Candidate { logit, weight, id });
        } else {
            complete = true;
            break;
        }
    }
    if d.top_k > 0 {
        if cand.len() > d.top_k {
            cand.truncate(d.top_k);
        } else if cand.len() < d.top_k && !complete {
            return None;
        }
    }
    if d.top_p < 1.0 {
        let goal = if d.top_k > 0 {
            f64::from(d.top_p) * cand.iter().map(|c| f64::from(c.weight)).sum::<f64>()
        } else {
            f64::from(d.top_p) * weight_sum
        };
        let mut acc = 0f64;
        let cut = cand.iter().position(|c| {
            acc += f64::from(c.weight);
            acc >= goal
        });
        match cut {
            Some(i) => cand.truncate(i + 1),
            // The sum stayed under the goal: by rounding if every token with weight is
            // here (keep them all, as the sampler does), else the nucleus is larger.
            None if complete || d.top_k > 0 => {}
            None => return None,
        }
    }
    if d.min_p > 0.0 {
        let best = cand.iter().map(|c| c.weight).fold(0.0, f32::max);
        let threshold = d.min_p * best;
        cand.retain(|c| c.weight >= threshold);
    }
    Some(cand)
}

/// For checking a device's draws: the interval `[lo, hi)` of `u` (fractions of the kept
/// weight, f64 sums) for which the draw `d` on `logits` picks `id`, walking the
/// candidates in the order the GPU does (id order for a dense draw, rank order for a
/// ranked one); `None` when `id` cannot be drawn at all. A correct device pick holds the
/// draw's `u` in its interval up to rounding.
pub fn draw_interval(d: &DeviceDraw, logits: &[f32], id: u32) -> Option<(f64, f64)> {
    let mut clean = logits.to_vec();
    let max = sanitize(&mut clean);
    if max == f32::NEG_INFINITY {
        return (id == 0).then_some((0.0, 1.0));
    }
    let inv_t = 1.0 / d.temperature;
    let kept: Vec<(u32, f64)> = if d.ranked() {
        let mut top: Vec<(f32, u32)> = clean
            .iter()
            .enumerate()
            .map(|(i, &l)| (l, i as u32))
            .collect();
        top.sort_unstable_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        let total: f64 = clean
            .iter()
            .map(|&l| f64::from(weight((l - max) * inv_t)))
            .sum();
        ranked_survivors(d, &top, total, clean.len())?
            .iter()
            .map(|c| (c.id, f64::from(c.weight)))
            .collect()
    } else {
        let floor = d.min_p.max(f32::MIN_POSITIVE);
        clean
            .iter()
            .enumerate()
            .map(|(i, &l)| (i as u32, weight((l - max) * inv_t)))
            .filter(|&(_, w)| w >= floor)
            .map(|(i, w)| (i, f64::from(w)))
            .collect()
    };
    let total: f64 = kept.iter().map(|k| k.1).sum();
    let mut acc = 0f64;
    for (i, w) in kept {
        if i == id {
            return Some((acc / total, (acc + w) / total));
        }
        acc += w;
    }
    None
}

impl SamplingParams {
    fn has_penalties(&self) -> bool {
        self.repetition_penalty != 1.0
            || self.presence_penalty != 0.0
            || self.frequency_penalty != 0.0
    }
}

/// The greedy choice [`Sampler::sample`] makes for a plain greedy request: logits
/// sanitized (NaN to `-inf`, `+inf` to `f32::MAX`), then the lowest index of the largest
/// value (0 when every value is `-inf` or NaN). The GPU's `argmax_rows` computes the same.
pub fn greedy_pick(logits: &mut [f32]) -> u32 {
    let max = sanitize(logits);
    first_index_of(logits, max)
}

/// NaN to `-inf`, `+inf` to `f32::MAX`; returns the largest value. Branch-free so that it
/// vectorizes.
fn sanitize(logits: &mut [f32]) -> f32 {
    const L: usize = 16;
    let clean = |v: f32| {
        if v.is_nan() {
            f32::NEG_INFINITY
        } else {
            v.min(f32::MAX)
        }
    };
    let mut m = [f32::NEG_INFINITY; L];
    let (chunks, tail) = logits.as_chunks_mut::<L>();
    for c in chunks {
        for i in 0..L {
            c[i] = clean(c[i]);
            m[i] = if c[i] > m[i] { c[i] } else { m[i] };
        }
    }
    for v in tail {
        *v = clean(*v);
        m[0] = if *v > m[0] { *v } else { m[0] };
    }
    m.iter()
        .fold(f32::NEG_INFINITY, |a, &b| if b > a { b } else { a })
}

/// `exp(x)` for `x <= 0`, 0 below [`MIN_EXPONENT`] (and for NaN). A branch-free range
/// reduction plus a degree-6 polynomial (about 1 ulp) with no float-to-int conversion, so that
/// the loop over the vocabulary vectorizes; exactly 1 at `x = 0`.
#[inline(always)]
fn weight(x: f32) -> f32 {
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    // Adding 1.5 * 2^23 rounds to an integer, which then sits in the low mantissa bits.
    const MAGIC: f32 = 12_582_912.0;
    const MAGIC_BITS: u32 = 0x4B40_0000;
    let xc = x.clamp(MIN_EXPONENT, 0.0);
    let t = xc * std::f32::consts::LOG2_E + MAGIC;
    let k = t - MAGIC; // round(x / ln 2), in [-126, 0]
    let r = k.mul_add(-LN2_LO, k.mul_add(-LN2_HI, xc));
    let p = (1.0 / 720.0f32)
        .mul_add(r, 1.0 / 120.0)
        .mul_add(r, 1.0 / 24.0)
        .mul_add(r, 1.0 / 6.0)
        .mul_add(r, 0.5)
        .mul_add(r, 1.0)
        .mul_add(r, 1.0);
    // 2^k from its bits: biased exponent k + 127 is in [1, 127], a normal float.
    let scale = f32::from_bits(t.to_bits().wrapping_sub(MAGIC_BITS).wrapping_add(127) << 23);
    if x >= MIN_EXPONENT { p * scale } else { 0.0 }
}

/// Sum of `f(v)` over a slice with 16 independent f32 lanes (a plain `.sum()` is one serial
/// dependency chain, which does not vectorize).
#[inline(always)]
fn lane_sum(c: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    const L: usize = 16;
    let mut acc = [0f32; L];
    let (lanes, tail) = c.as_chunks::<L>();
    for l in lanes {
        for i in 0..L {
            acc[i] += f(l[i]);
        }
    }
    for &v in tail {
        acc[0] += f(v);
    }
    acc.iter().sum()
}

/// Sum of all weights (f32 lanes per chunk, f64 across chunks).
fn sum(w: &[f32]) -> f64 {
    w.chunks(1024).map(|c| f64::from(lane_sum(c, |v| v))).sum()
}

/// Sum of the weights that are at least `bound`.
fn sum_at_least(w: &[f32], bound: f32) -> f64 {
    w.chunks(1024)
        .map(|c| f64::from(lane_sum(c, |v| if v >= bound { v } else { 0.0 })))
        .sum()
}

/// A value that at least `k` weights reach (so every one of the `k` largest does): the
/// smallest of the maxima of `k` disjoint groups. One vectorizable pass; for the unordered
/// logits of real vocabularies it keeps only a few times `k` tokens. 0 (no bound) if `k` is 0
/// or exceeds the length.
fn kth_largest_lower_bound(w: &[f32], k: usize) -> f32 {
    if k == 0 || k > w.len() {
        return 0.0;
    }
    // k - 1 groups of `size`, the last one takes the remainder too.
    let size = w.len() / k;
    let (head, last) = w.split_at(size * (k - 1));
    head.chunks(size)
        .map(lane_max)
        .fold(lane_max(last), f32::min)
}

/// Largest of non-negative, non-NaN values (0 for an empty slice), with 8 independent lanes.
#[inline(always)]
fn lane_max(c: &[f32]) -> f32 {
    let mut m = [0f32; 8];
    let (lanes, tail) = c.as_chunks::<8>();
    for l in lanes {
        for i in 0..8 {
            m[i] = if l[i] > m[i] { l[i] } else { m[i] };
        }
    }
    tail.iter()
        .chain(&m)
        .fold(0.0, |a: f32, &b| if b > a { b } else { a })
}

/// Draws an index with probability proportional to `w` (`u` uniform in `[0, 1)`), skipping
/// whole chunks by their sums. `None` only if every weight is 0.
fn draw_dense(w: &[f32], u: f64) -> Option<u32> {
    const CHUNK: usize = 256;
    let target = u * sum(w);
    let mut acc = 0f64;
    for (ci, c) in w.chunks(CHUNK).enumerate() {
        let s = f64::from(lane_sum(c, |v| v));
        if acc + s > target {
            for (j, &v) in c.iter().enumerate() {
                acc += f64::from(v);
                if acc > target {
                    return Some((ci * CHUNK + j) as u32);
                }
            }
            // The chunk's own rounding: its last token with any weight.
            return c
                .iter()
                .rposition(|&v| v > 0.0)
                .map(|j| (ci * CHUNK + j) as u32);
        }
        acc += s;
    }
    w.iter().rposition(|&v| v > 0.0).map(|j| j as u32)
}

/// Keeps the smallest most-likely prefix of `cand` whose weight reaches `goal` (at least one
/// candidate); returns the kept weight. `cand` must hold every token of the nucleus.
///
/// First sorts the best [`NUCLEUS_PREFIX`] candidates (found with `select_nth_unstable`); if
/// the nucleus is larger, a weighted quickselect over the rest finds the cut in linear time.
fn nucleus(cand: &mut Vec<Candidate>, goal: f64) -> f64 {
    let weight = |c: &Candidate| f64::from(c.weight);
    let k = NUCLEUS_PREFIX.min(cand.len());
    if k < cand.len() {
        cand.select_nth_unstable_by(k - 1, by_rank);
    }
    cand[..k].sort_unstable_by(by_rank);
    let mut acc = 0f64;
    for i in 0..k {
        acc += weight(&cand[i]);
        if acc >= goal {
            cand.truncate(i + 1);
            return acc;
        }
    }
    // Everything in cand[..lo] is kept; the cut lies in cand[lo..hi].
    let (mut lo, mut hi) = (k, cand.len());
    while hi - lo > NUCLEUS_PREFIX {
        let mid = lo + (hi - lo) / 2;
        cand[lo..hi].select_nth_unstable_by(mid - lo, by_rank);
        let upper: f64 = cand[lo..=mid].iter().map(weight).sum();
        if acc + upper >= goal {
            hi = mid + 1;
        } else {
            acc += upper;
            lo = mid + 1;
        }
    }
    cand[lo..hi].sort_unstable_by(by_rank);
    for i in lo..hi {
        acc += weight(&cand[i]);
        if acc >= goal {
            cand.truncate(i + 1);
            return acc;
        }
    }
    // Rounding kept the sum just under the goal: keep the whole range.
    cand.truncate(hi);
    acc
}

/// Index of the first element equal to `value` (0 if none), 64 elements at a time.
fn first_index_of(values: &[f32], value: f32) -> u32 {
    const CHUNK: usize = 64;
    for (ci, c) in values.chunks(CHUNK).enumerate() {
        if c.iter().fold(false, |any, &v| any | (v == value))
            && let Some(j) = c.iter().position(|&v| v == value)
        {
            return (ci * CHUNK + j) as u32;
        }
    }
    0
}

/// Index of the largest value, the lowest index among equals; NaN never wins (0 if all are).
fn argmax(values: &[f32]) -> u32 {
    let mut best = 0;
    let mut best_value = f32::NEG_INFINITY;
    for (i, &v) in values.iter().enumerate() {
        if v > best_value {
            best = i;
            best_value = v;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(f: impl FnOnce(&mut SamplingParams)) -> SamplingParams {
        let mut p = SamplingParams {
            seed: Some(42),
            ..SamplingParams::default()
        };
        f(&mut p);
        p
    }

    fn sampler(p: SamplingParams, vocab: usize) -> Sampler {
        Sampler::new(p, vocab).expect("valid params")
    }

    /// Deterministic pseudo-random logits in roughly [-scale, scale].
    fn random_logits(n: usize, seed: u64, scale: f32) -> Vec<f32> {
        let mut rng = Rng::new(seed);
        (0..n)
            .map(|_| (rng.next_f64() as f32 * 2.0 - 1.0) * scale)
            .collect()
    }

    #[test]
    fn validate_rejects_impossible_values() {
        assert_eq!(SamplingParams::default().validate(), Ok(()));
        assert_eq!(SamplingParams::greedy().validate(), Ok(()));
        let ok = params(|p| {
            p.temperature = 2.0;
            p.top_k = usize::MAX;
            p.top_p = 1e-9;
            p.min_p = 1.0;
            p.repetition_penalty = 0.01;
            p.presence_penalty = -2.0;
            p.frequency_penalty = 2.0;
        });
        assert_eq!(ok.validate(), Ok(()));
        let cases: Vec<(SamplingParams, &str)> = vec![
            (params(|p| p.temperature = -0.1), "temperature"),
            (params(|p| p.temperature = 2.5), "temperature"),
            (params(|p| p.temperature = f32::NAN), "temperature"),
            (params(|p| p.top_p = 0.0), "top_p"),
            (params(|p| p.top_p = 1.01), "top_p"),
            (params(|p| p.top_p = f32::NAN), "top_p"),
            (params(|p| p.min_p = -0.5), "min_p"),
            (params(|p| p.min_p = 1.5), "min_p"),
            (params(|p| p.repetition_penalty = 0.0), "repetition_penalty"),
            (
                params(|p| p.repetition_penalty = -1.0),
                "repetition_penalty",
            ),
            (
                params(|p| p.repetition_penalty = f32::INFINITY),
                "repetition_penalty",
            ),
            (params(|p| p.presence_penalty = 2.5), "presence_penalty"),
            (params(|p| p.frequency_penalty = -3.0), "frequency_penalty"),
            (
                params(|p| p.frequency_penalty = f32::NAN),
                "frequency_penalty",
            ),
        ];
        for (p, field) in cases {
            let err = p.validate().expect_err(field);
            assert_eq!(err.param(), field);
            assert_eq!(err.reason(), format!("{field}_out_of_range"));
            assert!(err.to_string().starts_with(field), "{err}");
            assert!(Sampler::new(p, 10).is_err());
        }
        let err = params(|p| p.temperature = 3.0).validate().expect_err("bad");
        assert_eq!(
            err.to_string(),
            "temperature must be a number between 0 and 2, got 3"
        );
    }

    #[test]
    fn greedy_is_argmax_with_lowest_index_on_ties() {
        let mut s = sampler(SamplingParams::greedy(), 8);
        let mut logits = vec![0.5, 3.0, -1.0, 3.0, 2.9, f32::NAN, 1.0, 3.0];
        assert_eq!(s.sample(&mut logits, &[], &[]), 1);
        for seed in 0..20 {
            let mut logits = random_logits(1000, seed, 10.0);
            let want = argmax(&logits);
            assert_eq!(s.sample(&mut logits, &[], &[]), want);
        }
    }

    #[test]
    fn filters_that_keep_one_token_are_greedy() {
        for seed in 0..20 {
            let logits = random_logits(5000, seed, 8.0);
            let want = argmax(&logits);
            let variants = [
                params(|p| p.top_k = 1),
                params(|p| p.top_p = 1e-6),
                params(|p| p.min_p = 1.0),
                params(|p| {
                    p.temperature = 2.0;
                    p.top_k = 100;
                    p.top_p = 1e-6;
                }),
            ];
            for p in variants {
                let mut s = sampler(
                    params(|q| {
                        *q = SamplingParams {
                            seed: Some(seed),
                            ..p
                        }
                    }),
                    5000,
                );
                for _ in 0..5 {
                    assert_eq!(s.sample(&mut logits.clone(), &[], &[]), want, "{p:?}");
                }
            }
        }
    }

    #[test]
    fn penalties_change_the_right_logits() {
        let p = params(|p| {
            p.temperature = 0.0;
            p.repetition_penalty = 2.0;
        });
        let mut s = sampler(p, 6);
        let mut logits = vec![4.0, -4.0, 4.0, -4.0, 1.0, 1.0];
        // Token 0 twice and 1 in history (each penalized once); 9 is out of range.
        s.sample(&mut logits, &[0, 1, 0, 9], &[]);
        assert_eq!(logits, [2.0, -8.0, 4.0, -4.0, 1.0, 1.0]);

        let p = params(|p| {
            p.temperature = 0.0;
            p.presence_penalty = 0.5;
            p.frequency_penalty = 0.25;
        });
        let mut s = sampler(p, 6);
        let mut logits = vec![1.0; 6];
        // History-only tokens (4) are not penalized; generated 2 three times, 3 once.
        s.sample(&mut logits, &[4, 2, 3, 2, 2], &[2, 3, 2, 2, 77]);
        assert_eq!(
            logits,
            [1.0, 1.0, 1.0 - 0.5 - 0.75, 1.0 - 0.5 - 0.25, 1.0, 1.0]
        );
        // The scratch counts are reset: a second call penalizes the same amount again.
        let mut logits = vec![1.0; 6];
        s.sample(&mut logits, &[], &[3]);
        assert_eq!(logits, [1.0, 1.0, 1.0, 0.25, 1.0, 1.0]);

        // Penalties steer greedy decoding away from a repeated token.
        let p = params(|p| {
            p.temperature = 0.0;
            p.repetition_penalty = 1.5;
        });
        let mut s = sampler(p, 3);
        assert_eq!(s.sample(&mut [3.0, 2.5, 0.0], &[], &[]), 0);
        assert_eq!(s.sample(&mut [3.0, 2.5, 0.0], &[0], &[0]), 1);
    }

    #[test]
    fn identical_seeds_give_identical_outputs() {
        let p = params(|p| {
            p.temperature = 1.3;
            p.top_k = 50;
            p.top_p = 0.95;
            p.min_p = 0.01;
            p.seed = Some(7);
        });
        let run = |p: SamplingParams| {
            let mut s = sampler(p, 2000);
            (0..200)
                .map(|i| s.sample(&mut random_logits(2000, i, 5.0), &[], &[]))
                .collect::<Vec<_>>()
        };
        let a = run(p);
        assert_eq!(a, run(p));
        assert_ne!(a, run(SamplingParams { seed: Some(8), ..p }));
        // Unseeded samplers get distinct generated seeds.
        let s1 = sampler(SamplingParams::default(), 10);
        let s2 = sampler(SamplingParams::default(), 10);
        assert_ne!(s1.seed(), s2.seed());
        // Reusing a seed reported by an unseeded sampler replays it.
        let replay = SamplingParams {
            seed: Some(s1.seed()),
            ..SamplingParams::default()
        };
        let mut a = s1.clone();
        let mut b = sampler(replay, 10);
        for i in 0..50 {
            let l = random_logits(10, i, 2.0);
            assert_eq!(
                a.sample(&mut l.clone(), &[], &[]),
                b.sample(&mut l.clone(), &[], &[])
            );
        }
    }

    /// Draw counts over a fixed small vocabulary against the expected probabilities.
    fn chi_square(p: SamplingParams, logits: &[f32], expected: &[f64], draws: usize) -> f64 {
        let mut s = sampler(p, logits.len());
        let mut counts = vec![0usize; logits.len()];
        for _ in 0..draws {
            counts[s.sample(&mut logits.to_vec(), &[], &[]) as usize] += 1;
        }
        let mut chi = 0.0;
        for (c, e) in counts.iter().zip(expected) {
            if *e == 0.0 {
                assert_eq!(*c, 0, "a token with probability 0 was drawn: {counts:?}");
            } else {
                let e = e * draws as f64;
                chi += (*c as f64 - e).powi(2) / e;
            }
        }
        chi
    }

    fn softmax(logits: &[f32], t: f64) -> Vec<f64> {
        let m = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let w: Vec<f64> = logits
            .iter()
            .map(|&l| {
                if l.is_nan() {
                    0.0
                } else {
                    ((f64::from(l) - f64::from(m)) / t).exp()
                }
            })
            .collect();
        let sum: f64 = w.iter().sum();
        w.iter().map(|w| w / sum).collect()
    }

    fn keep_and_renormalize(p: &[f64], keep: &[usize]) -> Vec<f64> {
        let sum: f64 = keep.iter().map(|&i| p[i]).sum();
        (0..p.len())
            .map(|i| if keep.contains(&i) { p[i] / sum } else { 0.0 })
            .collect()
    }

    #[test]
    fn sampling_follows_the_softmax() {
        let logits = [1.0, 2.0, 0.5, 3.0, -1.0, 2.5, f32::NAN, f32::NEG_INFINITY];
        let draws = 40_000;
        // Chi-square with 5 degrees of freedom: 30 is far beyond any plausible value (p < 1e-5)
        // for a correct sampler, and the draws are deterministic anyway (fixed seeds).
        let t = 0.8;
        let probs = softmax(&logits, t);
        let chi = chi_square(params(|p| p.temperature = 0.8), &logits, &probs, draws);
        eprintln!("chi-square temperature: {chi:.2}");
        assert!(chi < 30.0, "temperature: chi-square {chi}");

        // top_k = 3 keeps tokens 3, 5, 1.
        let p1 = softmax(&logits, 1.0);
        let chi = chi_square(
            params(|p| p.top_k = 3),
            &logits,
            &keep_and_renormalize(&p1, &[3, 5, 1]),
            draws,
        );
        assert!(chi < 30.0, "top_k: chi-square {chi}");

        // top_p: p(3) ~ 0.43, p(5) ~ 0.26, p(1) ~ 0.16; 0.8 needs those three.
        assert!(p1[3] + p1[5] < 0.8 && p1[3] + p1[5] + p1[1] >= 0.8);
        let chi = chi_square(
            params(|p| p.top_p = 0.8),
            &logits,
            &keep_and_renormalize(&p1, &[3, 5, 1]),
            draws,
        );
        assert!(chi < 30.0, "top_p: chi-square {chi}");

        // min_p = 0.3: keeps tokens with p >= 0.3 * p(3): 3 (1.0), 5 (0.61), 1 (0.37).
        let chi = chi_square(
            params(|p| p.min_p = 0.3),
            &logits,
            &keep_and_renormalize(&p1, &[3, 5, 1]),
            draws,
        );
        assert!(chi < 30.0, "min_p: chi-square {chi}");
    }

    #[test]
    fn nan_and_infinite_logits() {
        // NaN is never selected, greedy or sampled.
        let mut logits = vec![f32::NAN; 100];
        logits[17] = -5.0;
        logits[60] = -6.0;
        let mut g = sampler(SamplingParams::greedy(), 100);
        assert_eq!(g.sample(&mut logits.clone(), &[], &[]), 17);
        let mut s = sampler(params(|p| p.temperature = 2.0), 100);
        for _ in 0..500 {
            let t = s.sample(&mut logits.clone(), &[], &[]);
            assert!(t == 17 || t == 60, "{t}");
        }
        // +inf wins; all-NaN and empty logits do not panic.
        let mut l = vec![0.0, f32::INFINITY, 1.0, f32::INFINITY];
        assert_eq!(s.sample(&mut l.clone(), &[], &[]), 1);
        assert_eq!(g.sample(&mut l, &[], &[]), 1);
        assert_eq!(s.sample(&mut [f32::NAN; 5], &[], &[]), 0);
        // A repetition penalty below 1 can overflow a huge logit to +inf (found by proptest).
        let mut r = sampler(
            params(|p| {
                p.temperature = 0.4;
                p.top_p = 0.001;
                p.min_p = 0.5;
                p.repetition_penalty = 0.1;
            }),
            3,
        );
        let mut l = vec![f32::NAN, 0.0, 3.3e38];
        assert_eq!(r.sample(&mut l, &[2], &[2]), 2);
        assert_eq!(l[2], f32::MAX);
        assert_eq!(s.sample(&mut [], &[1, 2], &[3]), 0);
    }

    proptest::proptest! {
        #[test]
        fn never_panics_and_stays_in_range(
            logits in proptest::collection::vec(proptest::num::f32::ANY, 1..300),
            history in proptest::collection::vec(0u32..400, 0..50),
            temperature in 0.0f32..=2.0,
            top_k in 0usize..400,
            top_p in 0.001f32..=1.0,
            min_p in 0.0f32..=1.0,
            rp in 0.1f32..3.0,
            seed in proptest::num::u64::ANY,
        ) {
            let p = SamplingParams {
                temperature,
                top_k,
                top_p,
                min_p,
                seed: Some(seed),
                repetition_penalty: rp,
                presence_penalty: 0.5,
                frequency_penalty: -0.5,
            };
            let mut s = sampler(p, logits.len());
            let t = s.sample(&mut logits.clone(), &history, &history) as usize;
            proptest::prop_assert!(t < logits.len());
            if logits.iter().any(|l| !l.is_nan()) {
                proptest::prop_assert!(!logits[t].is_nan());
            }
        }
    }

    /// Time per `sample` call on a 128k vocabulary, for flat logits (uniform in [-12, 12]: a
    /// top-p 0.9 nucleus of ~12k tokens, ~16k min-p survivors; the worst case) and peaked ones
    /// (Gaussian background, sigma 1.5, plus 64 tokens at 8..14, like a real model); best of
    /// five rounds. Run with `cargo test --release -- --ignored --nocapture bench_sample`.
    #[test]
    #[ignore = "micro benchmark"]
    fn bench_sample() {
        let vocab = 128_256;
        let flat = random_logits(vocab, 1, 12.0);
        let mut rng = Rng::new(5);
        let mut peaked: Vec<f32> = (0..vocab)
            .map(|_| {
                let (u1, u2) = (rng.next_f64().max(1e-300), rng.next_f64());
                ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos() * 1.5) as f32
            })
            .collect();
        for _ in 0..64 {
            let i = (rng.next_u64() % vocab as u64) as usize;
            peaked[i] = 8.0 + 6.0 * rng.next_f64() as f32;
        }
        let history: Vec<u32> = (0..2000).map(|i| (i * 7919) % vocab as u32).collect();
        for (name, p) in [
            ("greedy", SamplingParams::greedy()),
            ("temperature 0.7", params(|p| p.temperature = 0.7)),
            ("top_k 40", params(|p| p.top_k = 40)),
            ("top_p 0.9", params(|p| p.top_p = 0.9)),
            ("min_p 0.05", params(|p| p.min_p = 0.05)),
            (
                "all + penalties",
                params(|p| {
                    p.top_k = 40;
                    p.top_p = 0.9;
                    p.min_p = 0.05;
                    p.repetition_penalty = 1.1;
                    p.presence_penalty = 0.5;
                    p.frequency_penalty = 0.5;
                }),
            ),
        ] {
            let mut line = format!("{name:16}");
            for (dist, logits) in [("flat", &flat), ("peaked", &peaked)] {
                let mut s = sampler(p, vocab);
                let mut buf = logits.clone();
                let mut best = f64::MAX;
                let mut sink = 0u64;
                for _ in 0..5 {
                    let iters = 40;
                    let t0 = std::time::Instant::now();
                    for _ in 0..iters {
                        buf.copy_from_slice(logits);
                        sink += u64::from(s.sample(&mut buf, &history, &history[1000..]));
                    }
                    best = best.min(t0.elapsed().as_secs_f64() / f64::from(iters));
                }
                line += &format!(" {dist} {:7.1} us", best * 1e6);
                std::hint::black_box(sink);
            }
            println!("{line}");
        }
    }

    /// The best `k` (sanitized logit, id) pairs of `logits` in rank order (what the GPU's
    /// `topk_rows` returns).
    fn ranked(logits: &[f32], k: usize) -> Vec<(f32, u32)> {
        let mut r: Vec<(f32, u32)> = logits
            .iter()
            .enumerate()
            .map(|(i, &v)| {
                (
                    if v.is_nan() {
                        f32::NEG_INFINITY
                    } else {
                        v.min(f32::MAX)
                    },
                    i as u32,
                )
            })
            .collect();
        r.sort_unstable_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        r.truncate(k);
        r
    }

    fn weight_sum(logits: &[f32], t: f32) -> f64 {
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        logits
            .iter()
            .map(|&l| f64::from(weight((l - max) / t)))
            .sum()
    }

    #[test]
    fn plan_routes_each_request_to_where_it_can_be_picked() {
        let vocab = 1000;
        assert_eq!(
            sampler(params(|p| p.temperature = 0.0), vocab)
                .plan(vocab, &[], &[])
                .pick,
            RowPick::Greedy
        );
        let greedy_penalized = sampler(
            params(|p| {
                p.temperature = 0.0;
                p.presence_penalty = 0.5;
            }),
            vocab,
        )
        .plan(vocab, &[], &[])
        .pick;
        assert_eq!(greedy_penalized, RowPick::Greedy);
        let RowPick::Sample(d) = sampler(params(|_| {}), vocab).plan(vocab, &[], &[]).pick else {
            panic!("default sampling is a device draw");
        };
        assert_eq!(
            (d.temperature, d.top_k, d.top_p, d.min_p),
            (1.0, 0, 1.0, 0.0)
        );
        assert!(!d.ranked() && (0.0..1.0).contains(&d.u));
        // top_k at or above the vocabulary keeps everything: off.
        let RowPick::Sample(d) = sampler(params(|p| p.top_k = vocab), vocab)
            .plan(vocab, &[], &[])
            .pick
        else {
            panic!("a device draw");
        };
        assert!(d.top_k == 0 && !d.ranked());
        let RowPick::Sample(d) = sampler(params(|p| p.top_k = 40), vocab)
            .plan(vocab, &[], &[])
            .pick
        else {
            panic!("a device draw");
        };
        assert!(d.top_k == 40 && d.ranked());
        // Penalties travel with the plan: the tokens they touch, once each.
        let plan = sampler(
            params(|p| {
                p.repetition_penalty = 1.2;
                p.presence_penalty = 0.5;
            }),
            vocab,
        )
        .plan(vocab, &[5, 9, 5, 2000, 7], &[9, 7, 9]);
        assert!(matches!(plan.pick, RowPick::Sample(_)));
        let pen = plan.penalties.expect("penalties");
        assert_eq!(pen.repetition, 1.2);
        assert_eq!(pen.entries, vec![(5, 0.0), (9, 0.5), (7, 0.5)]);
    }

    /// A planned pick whose logits come back is the pick `sample` makes: the same seed
    /// gives the same tokens either way (one draw a token).
    #[test]
    fn sample_planned_is_sample() {
        let vocab = 500;
        for p in [
            params(|_| {}),
            params(|p| {
                p.top_p = 0.8;
                p.temperature = 0.7;
            }),
            params(|p| p.frequency_penalty = 1.0),
            params(|p| {
                p.temperature = 0.0;
                p.repetition_penalty = 1.5;
            }),
        ] {
            let (mut a, mut b) = (sampler(p, vocab), sampler(p, vocab));
            let mut gen_a = Vec::new();
            let mut gen_b = Vec::new();
            for step in 0..50 {
                let logits = random_logits(vocab, step, 4.0);
                let ta = a.sample(&mut logits.clone(), &gen_a, &gen_a);
                let plan = b.plan(vocab, &gen_b, &gen_b);
                let tb = b.sample_planned(&mut logits.clone(), &gen_b, &gen_b, &plan.pick);
                assert_eq!(ta, tb, "step {step}");
                // A device applying the plan's penalties and then picking the same way
                // (here: greedy, or the sampler's draw with the planned u) picks it too.
                if let (Some(pen), RowPick::Greedy) = (&plan.penalties, plan.pick) {
                    let mut x = logits.clone();
                    apply_penalties(&mut x, pen);
                    assert_eq!(greedy_pick(&mut x), ta, "step {step}");
                }
                gen_a.push(ta);
                gen_b.push(tb);
            }
        }
    }

    /// [`pick_from_ranked`] draws from the distribution `sample` draws from: over a
    /// stratified grid of draws each token is picked as often by both, up to the grid's
    /// rounding (they walk their candidates in different orders).
    #[test]
    fn ranked_picks_have_the_samplers_distribution() {
        let vocab = 3000;
        let mut logits = random_logits(vocab, 9, 1.0);
        for (i, l) in logits.iter_mut().enumerate().take(40) {
            *l += 8.0 - i as f32 * 0.05; // a peaked head
        }
        logits[77] = f32::NAN;
        let n = 4000;
        for p in [
            params(|p| p.top_k = 20),
            params(|p| {
                p.top_k = 50;
                p.top_p = 0.7;
                p.temperature = 0.6;
            }),
            params(|p| p.top_p = 0.9),
            params(|p| {
                p.top_p = 0.5;
                p.min_p = 0.2;
                p.temperature = 1.3;
            }),
            params(|p| {
                p.top_k = 2000;
                p.temperature = 0.2;
            }),
        ] {
            let RowPick::Sample(d) = sampler(p, vocab).plan(vocab, &[], &[]).pick else {
                panic!("a device draw");
            };
            let top = ranked(&logits, if d.top_k > 0 { d.top_k } else { 1024 });
            let mut clean = logits.clone();
            sanitize(&mut clean);
            let total = weight_sum(&clean, d.temperature);
            let mut s = sampler(p, vocab);
            let (mut a, mut b) = (vec![0i64; vocab], vec![0i64; vocab]);
            for i in 0..n {
                let u = (f64::from(i) + 0.5) / f64::from(n);
                let got = pick_from_ranked(&DeviceDraw { u, ..d }, &top, total, vocab)
                    .unwrap_or_else(|| panic!("{p:?}: the nucleus fits in 1024 candidates"));
                a[got as usize] += 1;
                b[s.sample_u(&mut logits.clone(), &[], &[], u) as usize] += 1;
            }
            for t in 0..vocab {
                assert!(
                    (a[t] - b[t]).abs() <= 2,
                    "{p:?}: token {t}: {} vs {}",
                    a[t],
                    b[t]
                );
            }
            // Not a degenerate case: several tokens drawn.
            assert!(a.iter().filter(|&&c| c > 0).count() >= 3, "{p:?}");
        }
        // +inf ranks as f32::MAX and takes every draw.
        logits[78] = f32::INFINITY;
        let d = DeviceDraw {
            temperature: 1.0,
            top_k: 0,
            top_p: 0.9,
            min_p: 0.0,
            u: 0.99,
        };
        let mut clean = logits.clone();
        sanitize(&mut clean);
        let total = weight_sum(&clean, 1.0);
        assert_eq!(
            pick_from_ranked(&d, &ranked(&logits, 1024), total, vocab),
            Some(78)
        );
    }

    /// A top-p nucleus beyond the candidates cannot be decided from them: `None`, unless
    /// the candidates are every token there is.
    #[test]
    fn flat_nucleus_needs_the_whole_row() {
        let d = DeviceDraw {
            temperature: 1.0,
            top_k: 0,
            top_p: 0.9,
            min_p: 0.0,
            u: 0.3,
        };
        let flat = random_logits(5000, 4, 0.1);
        let total = weight_sum(&flat, 1.0);
        assert_eq!(
            pick_from_ranked(&d, &ranked(&flat, 1024), total, 5000),
            None
        );
        let small = random_logits(800, 4, 0.1);
        let total = weight_sum(&small, 1.0);
        assert!(pick_from_ranked(&d, &ranked(&small, 1024), total, 800).is_some());
        // Tokens far below the best have weight 0: the candidates hold all that count.
        let mut cliff = vec![-1000.0f32; 5000];
        cliff[..10].fill(1.0);
        let total = weight_sum(&cliff, 1.0);
        let id = pick_from_ranked(&d, &ranked(&cliff, 1024), total, 5000).unwrap();
        assert!(id < 10);
        // A dense draw is not a ranked one.
        let dense = DeviceDraw { top_p: 1.0, ..d };
        assert_eq!(
            pick_from_ranked(&dense, &ranked(&small, 10), 1.0, 800),
            None
        );
    }

    /// `draw_interval` describes the draws: the sampler's dense draw and a ranked draw
    /// over every token pick, for each `u`, the token whose interval holds `u`.
    #[test]
    fn draw_intervals_hold_the_draws() {
        let vocab = 700;
        let mut logits = random_logits(vocab, 21, 3.0);
        logits[3] = f32::NAN;
        for p in [
            params(|_| {}),
            params(|p| p.min_p = 0.05),
            params(|p| {
                p.top_k = 30;
                p.top_p = 0.8;
                p.temperature = 0.7;
            }),
        ] {
            let RowPick::Sample(d) = sampler(p, vocab).plan(vocab, &[], &[]).pick else {
                panic!("a device draw");
            };
            let mut clean = logits.clone();
            sanitize(&mut clean);
            let total = weight_sum(&clean, d.temperature);
            let mut s = sampler(p, vocab);
            for i in 0..200 {
                let u = (f64::from(i) + 0.5) / 200.0;
                let d = DeviceDraw { u, ..d };
                let t = if d.ranked() {
                    pick_from_ranked(&d, &ranked(&logits, vocab), total, vocab).unwrap()
                } else {
                    s.sample_u(&mut logits.clone(), &[], &[], u)
                };
                let (lo, hi) = draw_interval(&d, &logits, t).expect("a drawable token");
                assert!(lo <= u && u < hi, "{p:?} u {u}: token {t} at [{lo}, {hi})");
            }
            // Tokens no draw can pick have no interval: the NaN one (weight 0), and the
            // least likely finite one (weight ~e^-6) under top-k or min-p 0.05.
            assert_eq!(draw_interval(&d, &logits, 3), None);
            let least = ranked(&logits, vocab)[vocab - 2].1;
            let excluded = d.top_k > 0 || d.min_p > 0.0;
            assert_eq!(draw_interval(&d, &logits, least).is_none(), excluded);
        }
    }

    /// The penalty lists a device applies reproduce the sampler's own penalties bit for
    /// bit, through this module's `apply_penalties` and through the GPU kernel's
    /// reference (`kernels::gpu_ref::apply_penalties`), specials included.
    #[test]
    fn penalty_lists_are_the_samplers_penalties_bit_for_bit() {
        let vocab = 300;
        let mut logits = random_logits(vocab, 5, 4.0);
        logits[1] = f32::NAN;
        logits[2] = f32::INFINITY;
        logits[3] = f32::NEG_INFINITY;
        logits[4] = -0.0;
        logits[6] = 0.0;
        let mut history: Vec<u32> = (0..200).map(|i| (i * 37 % 97) as u32).collect();
        history.extend([1, 2, 3, 4, 6, 4, 1000]); // specials, a repeat, an id beyond the vocabulary
        let generated = history[150..].to_vec();
        for p in [
            params(|p| p.repetition_penalty = 1.3),
            params(|p| p.repetition_penalty = 0.7),
            params(|p| {
                p.presence_penalty = 0.5;
                p.frequency_penalty = -0.3;
            }),
            params(|p| {
                p.repetition_penalty = 1.1;
                p.presence_penalty = -1.0;
                p.frequency_penalty = 0.25;
            }),
        ] {
            let mut want = logits.clone();
            sampler(p, vocab).apply_penalties(&mut want, &history, &generated);
            let pen = penalties_for(&p, &history, &generated, vocab).expect("penalties");
            let mut got = logits.clone();
            apply_penalties(&mut got, &pen);
            let entries: Vec<(usize, usize)> =
                pen.entries.iter().map(|&(t, _)| (0, t as usize)).collect();
            let subtract: Vec<f32> = pen.entries.iter().map(|&(_, x)| x).collect();
            let mut kernel = logits.clone();
            kernels::gpu_ref::apply_penalties(
                &mut kernel,
                vocab,
                &entries,
                &subtract,
                &[pen.repetition],
            );
            let same = |a: &[f32], b: &[f32]| {
                a.iter()
                    .zip(b)
                    .all(|(x, y)| x.to_bits() == y.to_bits() || (x.is_nan() && y.is_nan()))
            };
            assert!(same(&want, &got), "{p:?}");
            assert!(same(&want, &kernel), "{p:?}");
            let changed = want
                .iter()
                .zip(&logits)
                .filter(|(a, b)| a.to_bits() != b.to_bits())
                .count();
            assert!(
                changed > 20,
                "{p:?}: the penalties changed {changed} logits"
            );
        }
    }
}
