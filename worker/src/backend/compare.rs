//! `worker check-backend`: runs two backends on the same steps and compares their
//! logits, end to end through every path a backend has (a prefill of several prompts,
//! decode steps at batch 3, 2 and 1, and backend-picked greedy tokens). The kernels are
//! each checked against their CPU references on a GPU (`gpu-check`); this checks the
//! wiring: that the CUDA backend computes the same forward pass as the CPU backend, up
//! to its bf16 storage.
//!
//! Tokens are teacher-forced (a fixed pseudo-random sequence), so both backends see the
//! same inputs whatever they predict. Each compared row reports the cosine similarity of
//! the two logit vectors, the largest difference relative to the reference's largest
//! magnitude, and whether the argmax agrees.

use serde_json::{Value, json};

use super::{Backend, BackendError, Penalties, RowPick, RowPlan, SeqChunk};
use crate::sampler::{
    DeviceDraw, SamplingParams, apply_penalties, draw_interval, greedy_pick, penalties_for,
};

/// Pass thresholds. bf16 weights and activations against f32 over a whole model move
/// the logits by about 1% (cosine above 0.99). The argmax may then differ where two
/// logits are nearly tied, so a row's argmax passes when it is the reference's, or when
/// the reference's logit there is within `NEAR_TIE` of the reference's largest magnitude
/// from its maximum.
const MIN_COSINE: f64 = 0.98;
const NEAR_TIE: f64 = 0.02;
const MIN_ARGMAX_AGREEMENT: f64 = 0.95;
/// A sampled pick passes when the draw's `u` lies in the picked token's interval of the
/// host's f64 running sums (`draw_interval`, walking the candidates in the device's
/// order) up to `DRAW_SLACK`: the device's weights (`expf`, fixed-point sums) differ from
/// the host's in the last bits.
const DRAW_SLACK: f64 = 1e-6;

/// The sampled draws of the check, cycled over rows and steps: dense at temperature 1,
/// dense with min-p, top-k, top-p alone, and all filters together.
fn draw(n: usize) -> DeviceDraw {
    let (temperature, top_k, top_p, min_p) = [
        (1.0, 0, 1.0, 0.0),
        (0.7, 0, 1.0, 0.05),
        (0.8, 40, 1.0, 0.0),
        (1.0, 0, 0.9, 0.0),
        (1.2, 50, 0.95, 0.02),
    ][n % 5];
    let u = ((n * 7919) % 1000) as f64 / 1000.0 + 0.0005;
    DeviceDraw {
        temperature,
        top_k,
        top_p,
        min_p,
        u,
    }
}

/// The penalties of the check's penalized rows.
const PENALTIES: SamplingParams = SamplingParams {
    temperature: 1.0,
    top_k: 0,
    top_p: 1.0,
    min_p: 0.0,
    seed: None,
    repetition_penalty: 1.3,
    presence_penalty: 0.5,
    frequency_penalty: 0.3,
};

/// Whether logits a backend sent back (`l`) are the step's (`g`): the same row, and at
/// every token the row's penalties touch the model's value, not the penalized one (the
/// sampler applies the penalties itself; applied twice they would count double).
fn returned_ok(g: &[f32], l: &[f32], penalties: Option<&Penalties>) -> bool {
    let scale = g
        .iter()
        .fold(0f32, |m, x| m.max(x.abs()))
        .max(f32::MIN_POSITIVE);
    compare_row(g, l).0 > 0.9999
        && penalties.is_none_or(|pen| {
            pen.entries.iter().all(|&(t, _)| {
                let t = t as usize;
                (g[t] - l[t]).abs() <= 1e-3 * scale
            })
        })
}

/// Whether `picked` is a right pick for `d` on `logits` (see [`DRAW_SLACK`]). A weight
/// within rounding of the min-p threshold, or a running sum within rounding of the top-p
/// goal, may be judged either way by the device (its `expf`, its f32 weight sum): the
/// intervals are also taken with those two parameters 1e-5 (relative) to either side.
fn sampled_pick_ok(d: &DeviceDraw, logits: &[f32], picked: u32) -> bool {
    let nudged = |x: f32, f: f32| if x > 0.0 && x < 1.0 { x * f } else { x };
    [1.0f32, 1.0 - 1e-5, 1.0 + 1e-5].iter().any(|&f| {
        let d = DeviceDraw {
            min_p: nudged(d.min_p, f),
            top_p: if d.top_p < 1.0 {
                nudged(d.top_p, f).min(1.0 - f32::EPSILON)
            } else {
                1.0
            },
            ..*d
        };
        draw_interval(&d, logits, picked)
            .is_some_and(|(lo, hi)| lo - DRAW_SLACK <= d.u && d.u < hi + DRAW_SLACK)
    })
}

struct Seq {
    toks: Vec<u32>,
    /// Tokens already in the KV cache.
    done: usize,
    table: Vec<u32>,
}

/// Cosine similarity, relative max difference, argmax agreement (up to near-ties) of one
/// row.
fn compare_row(want: &[f32], got: &[f32]) -> (f64, f64, bool) {
    let (mut dot, mut nw, mut ng, mut maxd, mut maxw) = (0f64, 0f64, 0f64, 0f64, 0f64);
    for (&w, &g) in want.iter().zip(got) {
        let (w, g) = (f64::from(w), f64::from(g));
        dot += w * g;
        nw += w * w;
        ng += g * g;
        maxd = maxd.max((w - g).abs());
        maxw = maxw.max(w.abs());
    }
    let cos = if nw > 0.0 && ng > 0.0 {
        dot / (nw.sqrt() * ng.sqrt())
    } else {
        0.0
    };
    let (wa, ga) = (
        greedy_pick(&mut want.to_vec()) as usize,
        greedy_pick(&mut got.to_vec()) as usize,
    );
    let near = f64::from(want[wa]) - f64::from(want[ga]) <= NEAR_TIE * maxw;
    (cos, maxd / maxw.max(f64::MIN_POSITIVE), wa == ga || near)
}

/// Runs `reference` and `candidate` (each with at least `3 * blocks_per_seq` KV blocks of
/// 16 tokens and a context of at least 96 tokens) through the same steps and returns the
/// JSON report; `ok` says whether every row passed the thresholds.
pub fn compare(
    reference: &mut dyn Backend,
    candidate: &mut dyn Backend,
    vocab: usize,
) -> Result<Value, BackendError> {
    const BLOCKS_PER_SEQ: usize = 6; // 96 tokens
    let prompts = [33usize, 7, 20];
    let mut seqs: Vec<Seq> = prompts
        .iter()
        .enumerate()
        .map(|(i, &n)| Seq {
            toks: crate::bench::pseudo_tokens(n + 40, 0, vocab, i as u64 + 1),
            done: 0,
            table: (0..BLOCKS_PER_SEQ)
                .map(|b| (i * BLOCKS_PER_SEQ + b) as u32)
                .collect(),
        })
        .collect();
    // (sequences in the step, phase name): prefill all, then decode at batch 3, 2, 1.
    let mut plan: Vec<(Vec<usize>, &str)> = vec![(vec![0, 1, 2], "prefill")];
    plan.extend((0..6).map(|_| (vec![0, 1, 2], "decode batch 3")));
    plan.extend((0..6).map(|_| (vec![0, 2], "decode batch 2")));
    plan.extend((0..6).map(|_| (vec![1], "decode batch 1")));
    let mut rows = Vec::new();
    let (mut min_cos, mut max_rel, mut agree, mut total) = (1f64, 0f64, 0usize, 0usize);
    for (step, (ids, phase)) in plan.iter().enumerate() {
        let spans: Vec<(usize, usize)> = ids
            .iter()
            .map(|&i| {
                let s = &seqs[i];
                let n = if step == 0 { prompts[i] } else { 1 };
                (s.done, s.done + n)
            })
            .collect();
        let chunks: Vec<SeqChunk<'_>> = ids
            .iter()
            .zip(&spans)
            .map(|(&i, &(a, b))| SeqChunk {
                tokens: &seqs[i].toks[a..b],
                start: a,
                block_table: &seqs[i].table,
                want_logits: true,
            })
            .collect();
        let want = reference.forward(&chunks)?;
        let got = candidate.forward(&chunks)?;
        if want.len() != got.len() || want.len() != ids.len() * vocab {
            return Err(BackendError::Device(format!(
                "step {step}: {} reference and {} candidate logits for {} rows",
                want.len(),
                got.len(),
                ids.len()
            )));
        }
        // The same step again, with every row greedy: a backend that picks on its own
        // device must pick the argmax of its logits, after the penalties of the rows that
        // have them (repetition over the sequence so far, presence and frequency over its
        // last 8 tokens; every other row, by step). (Writing the same K/V again is
        // idempotent.)
        let n = ids.len();
        let pen_of = |r: usize| {
            let (i, b) = (ids[r], spans[r].1);
            let history = &seqs[i].toks[..b];
            penalties_for(&PENALTIES, history, &history[b.saturating_sub(8)..], vocab)
        };
        let greedy_plans: Vec<RowPlan> = (0..n)
            .map(|r| RowPlan {
                pick: RowPick::Greedy,
                penalties: if (step + r) % 2 == 1 { pen_of(r) } else { None },
            })
            .collect();
        let picked = candidate.forward_step(&chunks, &greedy_plans)?;
        // And with sampled rows: a backend that draws on its own device must draw what
        // the host sampler draws from its logits with the same `u`, penalties applied
        // first (the other rows, by step); in steps of two or more rows, row 1 stays
        // greedy (a mixed step).
        let draws: Vec<DeviceDraw> = (0..n).map(|r| draw(step * 3 + r)).collect();
        let sample_plans: Vec<RowPlan> = (0..n)
            .map(|r| RowPlan {
                pick: if n >= 2 && r == 1 {
                    RowPick::Greedy
                } else {
                    RowPick::Sample(draws[r])
                },
                penalties: if (step + r) % 2 == 0 { pen_of(r) } else { None },
            })
            .collect();
        let sampled = candidate.forward_step(&chunks, &sample_plans)?;
        let mut returned = sampled.logits.chunks_exact(vocab);
        let mut greedy_returned = picked.logits.chunks_exact(vocab);
        for (r, &i) in ids.iter().enumerate() {
            let (w, g) = (
                &want[r * vocab..(r + 1) * vocab],
                &got[r * vocab..(r + 1) * vocab],
            );
            let (cos, rel, ag) = compare_row(w, g);
            // The logits a plan's penalties make of g.
            let after = |plan: &RowPlan| {
                let mut x = g.to_vec();
                if let Some(pen) = &plan.penalties {
                    apply_penalties(&mut x, pen);
                }
                x
            };
            let own = greedy_pick(&mut after(&greedy_plans[r]));
            let pick = picked.picked.get(r).copied().flatten();
            // A greedy row must be picked as its argmax after its penalties; a backend that
            // leaves penalized rows to the sampler (the CPU's) sends their logits back.
            let pen = greedy_plans[r].penalties.as_ref();
            let greedy_ok = match pick {
                Some(t) => t == own,
                None => {
                    pen.is_some()
                        && greedy_returned
                            .next()
                            .is_some_and(|l| returned_ok(g, l, pen))
                }
            };
            let plan = &sample_plans[r];
            let penalized = after(plan);
            let (drawn, drawn_ok) = match (sampled.picked.get(r).copied().flatten(), plan.pick) {
                (Some(t), RowPick::Sample(d)) => (Some(t), sampled_pick_ok(&d, &penalized, t)),
                (Some(t), _) => (Some(t), t == greedy_pick(&mut penalized.clone())),
                // A row the backend did not pick comes back as logits (the sampler then
                // draws it): those must be the step's logits as the model computed them,
                // without the penalties (the sampler applies them).
                (None, _) => (
                    None,
                    returned
                        .next()
                        .is_some_and(|l| returned_ok(g, l, plan.penalties.as_ref())),
                ),
            };
            min_cos = min_cos.min(cos);
            max_rel = max_rel.max(rel);
            agree += usize::from(ag);
            total += 1;
            rows.push(
                json!({"step": step, "phase": phase, "seq": i, "cosine": cos,
                "max_rel_diff": rel, "argmax_agrees": ag, "picked": pick,
                "picked_is_own_argmax": greedy_ok,
                "greedy_penalized": greedy_plans[r].penalties.is_some(),
                "plan": format!("{:?}", plan.pick), "penalized": plan.penalties.is_some(),
                "drawn": drawn, "drawn_ok": drawn_ok}),
            );
        }
        drop(chunks);
        for (&i, &(_, b)) in ids.iter().zip(&spans) {
            seqs[i].done = b;
        }
    }
    let agreement = agree as f64 / total.max(1) as f64;
    let picks_ok = rows
        .iter()
        .all(|r| r["picked_is_own_argmax"] == json!(true));
    let drawn_ok = rows.iter().all(|r| r["drawn_ok"] == json!(true));
    let drawn_on_device = rows.iter().filter(|r| !r["drawn"].is_null()).count();
    let ok = min_cos >= MIN_COSINE && agreement >= MIN_ARGMAX_AGREEMENT && picks_ok && drawn_ok;
    Ok(json!({
        "ok": ok,
        "rows": total,
        "min_cosine": min_cos,
        "max_rel_diff": max_rel,
        "argmax_agreement": agreement,
        "picks_are_own_argmax": picks_ok,
        "draws_are_own_samples": drawn_ok,
        "rows_drawn_on_device": drawn_on_device,
        "thresholds": {"min_cosine": MIN_COSINE, "near_tie": NEAR_TIE,
            "min_argmax_agreement": MIN_ARGMAX_AGREEMENT},
        "per_row": rows,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Logits as a function of each chunk's last token and position; `skew` perturbs
    /// them, `fault` makes `forward_step` wrong in one way.
    struct Toy {
        vocab: usize,
        skew: f32,
        fault: Fault,
        /// Steps so far: which sampled rows are left to the sampler alternates with it.
        calls: usize,
    }

    #[derive(Clone, Copy, PartialEq)]
    enum Fault {
        None,
        /// Every pick one token off.
        WrongPicks,
        /// Picks and draws from the logits without the plans' penalties.
        IgnoresPenalties,
        /// Sends rows back with their penalties applied (the sampler would apply them
        /// again).
        ReturnsPenalized,
    }

    impl Backend for Toy {
        fn name(&self) -> String {
            "toy".into()
        }
        fn num_kv_blocks(&self) -> usize {
            18
        }
        fn vocab_size(&self) -> usize {
            self.vocab
        }
        fn forward(&mut self, chunks: &[SeqChunk<'_>]) -> Result<Vec<f32>, BackendError> {
            let mut out = Vec::new();
            for c in chunks {
                let last = c.tokens.last().copied().unwrap_or(0) as f32;
                let pos = (c.start + c.tokens.len()) as f32;
                out.extend((0..self.vocab).map(|v| {
                    let v = v as f32;
                    (last * 0.37 + v * 1.3 + pos * 0.11).sin() + self.skew * (v * 7.1).cos()
                }));
            }
            Ok(out)
        }
        fn forward_step(
            &mut self,
            chunks: &[SeqChunk<'_>],
            plans: &[RowPlan],
        ) -> Result<super::super::StepOutput, BackendError> {
            // Greedy rows as the host picks them, sampled rows drawn as a device would
            // (every other one left to the sampler).
            self.calls += 1;
            let logits = self.forward(chunks)?;
            let mut out = super::super::StepOutput::default();
            for (i, row) in logits.chunks_exact(self.vocab).enumerate() {
                let plan = plans.get(i);
                // The row after the plan's penalties (as a device applies them).
                let mut x = row.to_vec();
                if let Some(pen) = plan.and_then(|p| p.penalties.as_ref())
                    && self.fault != Fault::IgnoresPenalties
                {
                    apply_penalties(&mut x, pen);
                }
                let back = if self.fault == Fault::ReturnsPenalized {
                    &x
                } else {
                    row
                };
                match plan.map(|p| p.pick) {
                    Some(RowPick::Greedy) => out.picked.push(Some(greedy_pick(&mut x))),
                    // (Two forward_steps a compared step: the sampled pass alternates.)
                    Some(RowPick::Sample(d)) if (self.calls / 2 + i).is_multiple_of(2) => {
                        // The token whose interval holds u.
                        let t = (0..self.vocab as u32).find(|&t| {
                            draw_interval(&d, &x, t).is_some_and(|(lo, hi)| lo <= d.u && d.u < hi)
                        });
                        out.picked.push(t);
                        if t.is_none() {
                            out.logits.extend_from_slice(back);
                        }
                    }
                    _ => {
                        out.picked.push(None);
                        out.logits.extend_from_slice(back);
                    }
                }
            }
            if self.fault == Fault::WrongPicks {
                for p in out.picked.iter_mut().flatten() {
                    *p = (*p + 1) % self.vocab as u32;
                }
            }
            Ok(out)
        }
    }

    fn run(skew: f32, fault: Fault) -> Value {
        let vocab = 50;
        let mut a = Toy {
            vocab,
            skew: 0.0,
            fault: Fault::None,
            calls: 0,
        };
        let mut b = Toy {
            vocab,
            skew,
            fault,
            calls: 0,
        };
        compare(&mut a, &mut b, vocab).expect("compare runs")
    }

    #[test]
    fn identical_backends_pass_and_different_ones_fail() {
        let same = run(0.0, Fault::None);
        assert_eq!(same["ok"], json!(true), "{same}");
        assert_eq!(same["rows"], json!(39));
        let tiny = run(0.01, Fault::None);
        assert_eq!(
            tiny["ok"],
            json!(true),
            "a bf16-sized difference passes: {tiny}"
        );
        let far = run(2.0, Fault::None);
        assert_eq!(far["ok"], json!(false), "different logits fail");
        let picks = run(0.0, Fault::WrongPicks);
        assert_eq!(
            picks["ok"],
            json!(false),
            "picks that are not the argmax fail"
        );
        assert_eq!(picks["picks_are_own_argmax"], json!(false));
        assert_eq!(picks["draws_are_own_samples"], json!(false));
        assert_eq!(same["draws_are_own_samples"], json!(true));
        assert!(same["rows_drawn_on_device"].as_u64().unwrap() > 5, "{same}");
        // Penalties ignored: greedy picks of penalized rows and penalized draws fail.
        let ignored = run(0.0, Fault::IgnoresPenalties);
        assert_eq!(ignored["ok"], json!(false));
        assert_eq!(ignored["picks_are_own_argmax"], json!(false), "{ignored}");
        // Rows sent back with their penalties applied fail.
        let twice = run(0.0, Fault::ReturnsPenalized);
        assert_eq!(twice["ok"], json!(false), "{twice}");
        assert_eq!(twice["picks_are_own_argmax"], json!(true));
        assert_eq!(twice["draws_are_own_samples"], json!(false), "{twice}");
    }
}
