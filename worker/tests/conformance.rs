//! Conformance of the CPU engine on the real SmolLM2 GGUF against two references
//! (tests/reference/): an f32 numpy Llama over the dequantized weights, and llama.cpp.
//!
//! - Tokenization must equal llama.cpp's exactly.
//! - Greedy outputs (24 tokens): wherever ours differ from a reference, the first
//!   divergence must be a near-tie: our top-2 logit margin below 0.1. Against the f32
//!   reference we expect no divergence at all.
//! - llama.cpp quantizes activations to 8 bits (and keeps K/V in f16), which moves its
//!   logits by up to ~0.3 on this model; where it flips a token that is not a near-tie in
//!   our f32 logits, the flip must be a near-tie in llama.cpp's own logits (its recorded
//!   top-2 margin below 0.1), and our choice must equal the f32 reference's.

mod common;

use common::*;

const NEAR_TIE: f32 = 0.1;

fn compare(name: &str, file: &str, strict: bool) {
    let m = load_smollm2();
    let r = reference(file);
    let f32_ref = reference("numpy_smollm2.json");
    let mut exact = 0;
    for (i, case) in r.cases.iter().enumerate() {
        let ids = m.tokenizer.encode(&case.prompt, true, true);
        assert_eq!(
            ids, case.prompt_tokens,
            "case {i}: tokenization differs from the reference for {:?}",
            case.prompt
        );
        let (ours, margins) = greedy_with_margins(&m, &case.prompt_tokens, case.tokens.len(), 2);
        match ours.iter().zip(&case.tokens).position(|(a, b)| a != b) {
            None => exact += 1,
            Some(step) => {
                eprintln!(
                    "{name} case {i}: first divergence at step {step}: ours {} vs ref {}, our margin {:.4}{}",
                    ours[step],
                    case.tokens[step],
                    margins[step],
                    case.margins
                        .as_ref()
                        .map(|rm| format!(", reference margin {:.4}", rm[step]))
                        .unwrap_or_default()
                );
                if margins[step] < NEAR_TIE {
                    continue;
                }
                let ref_margin = case.margins.as_ref().map(|rm| rm[step]);
                let f32_tokens = &f32_ref
                    .cases
                    .iter()
                    .find(|c| c.prompt == case.prompt)
                    .expect("same prompts")
                    .tokens;
                assert!(
                    !strict
                        && ref_margin.is_some_and(|rm| rm < NEAR_TIE)
                        && ours[..=step] == f32_tokens[..=step],
                    "{name} case {i} ({:?}): divergence at step {step} is not a near-tie (our margin {}, reference margin {:?})",
                    case.prompt,
                    margins[step],
                    ref_margin
                );
            }
        }
    }
    eprintln!(
        "{name}: {exact}/{} cases identical over all tokens ({})",
        r.cases.len(),
        r.generator
    );
}

#[test]
fn greedy_matches_f32_numpy_reference() {
    compare("numpy-f32", "numpy_smollm2.json", true);
}

#[test]
fn greedy_matches_llama_cpp_up_to_near_ties() {
    compare("llama.cpp", "llamacpp_smollm2.json", false);
}
