//! `kernels/gpu-check.sh --summarize`: the JSON summary a GPU run ends with decides what
//! the run claims about the targets, so its arithmetic and its rules are checked
//! here on made-up stage results (no GPU needed): the batch-1 bandwidth limit over the
//! bytes a decode step reads, and that a design or experiment counts only where its
//! correctness checks passed.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{Value, json};

fn write(dir: &Path, name: &str, v: &Value) {
    std::fs::write(dir.join(name), v.to_string()).unwrap();
}

fn summarize(dir: &Path) -> Value {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("gpu-check.sh");
    let out = Command::new("bash")
        .arg(&script)
        .arg("--summarize")
        .arg(dir)
        .env_remove("OUT")
        .env(
            "GPU_CHECK_OPT_IN",
            "pdl gemv_norm_rope prefill_attention_wgmma_pp prefill_attention_wgmma_tma",
        )
        .env("GPU_CHECK_VARIANTS", "pdl:SOV_PDL=1 rope:SOV_GEMV_ROPE=1")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn parts_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("sov-gpu-summary-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A run's stage results: copy bandwidth 4000 GB/s; the EuroLLM shape's decode step reads
/// 2.8e9 weight bytes and 100 000 K/V bytes a context token; batch 1 at 800 tok/s.
fn base_run(dir: &Path) {
    let check = |kernel: &str, ok: bool| json!({"kernel": kernel, "ok": ok});
    write(
        dir,
        "kernels.json",
        &json!({
            "copy_bandwidth_gb_per_s": 4000.0,
            "correctness": {"ok": true, "checks": [
                check("prefill_attention_wgmma", true), check("decode_attention", true)]},
            "decode_attention": [
                {"context": 4096, "fraction_of_copy": 0.9, "gb_per_s": 3600.0},
                {"context": 8192, "fraction_of_copy": 0.82, "gb_per_s": 3280.0}],
            "prefill_attention": [
                {"kernel": "prefill_attention_wgmma", "tokens": 8192, "fraction_of_bf16_dense_peak": 0.25},
                {"kernel": "prefill_attention_wgmma", "tokens": 16384, "fraction_of_bf16_dense_peak": 0.3}],
        }),
    );
    // An experimental design, faster but with a failed check; another correct one.
    let design = |name: &str, ok: bool, peak: [f64; 2]| {
        json!({"correctness": {"checks": [check(name, ok)]},
               "prefill_attention": [
                   {"kernel": name, "tokens": 8192, "fraction_of_bf16_dense_peak": peak[0]},
                   {"kernel": name, "tokens": 16384, "fraction_of_bf16_dense_peak": peak[1]}]})
    };
    write(
        dir,
        "opt-prefill_attention_wgmma_tma.json",
        &design("prefill_attention_wgmma_tma", false, [0.6, 0.6]),
    );
    write(
        dir,
        "opt-prefill_attention_wgmma_pp.json",
        &design("prefill_attention_wgmma_pp", true, [0.42, 0.38]),
    );
    for (shape, weights, decode_weights, kv) in [
        (
            "eurollm-1.7b",
            3_300_000_000u64,
            2_800_000_000u64,
            100_000u64,
        ),
        ("smollm2-135m", 270_000_000, 270_000_000, 20_000),
    ] {
        std::fs::write(
            dir.join(format!("{shape}.model.json")),
            format!(
                "numpy says hello\n{}\n",
                json!({"shape": shape, "weight_bytes": weights, "decode_weight_bytes": decode_weights,
                       "kv_bytes_per_context_token": kv})
            ),
        )
        .unwrap();
        write(
            dir,
            &format!("{shape}.bench.json"),
            &json!({"decode_tokens": 64, "decode_prompt_tokens": 32,
                    "decode": {"1": {"aggregate_tok_s": 800.0}}}),
        );
        write(dir, &format!("{shape}.check.json"), &json!({"ok": true}));
    }
}

#[test]
fn batch1_limit_counts_the_bytes_a_decode_step_reads() {
    let dir = parts_dir("limit");
    base_run(&dir);
    let s = summarize(&dir);
    let e = &s["end_to_end"]["eurollm-1.7b"];
    // Contexts 33..96: mean 64.5 tokens of K/V.
    assert_eq!(e["mean_decode_context"], json!(64.5));
    let bytes = 2_800_000_000.0 + 100_000.0 * 64.5;
    assert_eq!(e["bytes_per_decode_step"].as_f64(), Some(bytes));
    let limit = 4000e9 / bytes;
    let f = e["fraction_of_limit"].as_f64().unwrap();
    assert!((f - 800.0 / limit).abs() < 1e-12, "{e}");
    assert_eq!(s["targets"]["eurollm_batch1_best_design"], json!("default"));
    assert_eq!(s["targets"]["eurollm_batch1_target_met"], json!(false));
    assert_eq!(
        s["targets"]["decode_attention_min_fraction_of_copy_4k_plus"],
        json!(0.82)
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn only_correct_designs_and_experiments_count_towards_the_targets() {
    let dir = parts_dir("rules");
    base_run(&dir);
    // Prefill: the failed TMA design's 0.6 does not count; the ping-pong design counts
    // at its lower figure, 0.38 (below 0.4).
    let s = summarize(&dir);
    assert_eq!(
        s["targets"]["prefill_best_design"],
        json!("prefill_attention_wgmma_pp")
    );
    assert_eq!(s["targets"]["prefill_best_fraction_of_peak"], json!(0.38));
    assert_eq!(s["targets"]["prefill_target_met"], json!(false));
    let failing = s["kernels_opt_in"]["failing"].as_array().unwrap().clone();
    assert!(
        failing.contains(&json!("prefill_attention_wgmma_tma")),
        "{failing:?}"
    );
    assert!(
        !failing.contains(&json!("prefill_attention_wgmma_pp")),
        "{failing:?}"
    );
    // Batch 1: PDL is fast but its SmolLM2 backend check failed; RoPE in the GEMV passed
    // everywhere (its kernel run too) and is the best correct experiment.
    let bench = |tok_s: f64| {
        json!({"decode_tokens": 64, "decode_prompt_tokens": 32,
                                    "decode": {"1": {"aggregate_tok_s": tok_s}}})
    };
    write(
        &dir,
        "opt-pdl.json",
        &json!({"correctness": {"checks": [{"kernel": "gemv", "ok": true}]}}),
    );
    write(
        &dir,
        "opt-gemv_norm_rope.json",
        &json!({"correctness": {"checks": [{"kernel": "gemv_norm_rope", "ok": true}]}}),
    );
    write(&dir, "eurollm-1.7b.pdl.json", &bench(1400.0));
    write(&dir, "eurollm-1.7b.check-pdl.json", &json!({"ok": true}));
    write(&dir, "smollm2-135m.check-pdl.json", &json!({"ok": false}));
    write(&dir, "eurollm-1.7b.rope.json", &bench(1100.0));
    write(&dir, "eurollm-1.7b.check-rope.json", &json!({"ok": true}));
    write(&dir, "smollm2-135m.check-rope.json", &json!({"ok": true}));
    let s = summarize(&dir);
    let t = &s["targets"];
    assert_eq!(
        t["eurollm_batch1_best_design"],
        json!("gemv_norm_rope"),
        "{t}"
    );
    let limit = 4000e9 / (2_800_000_000.0 + 100_000.0 * 64.5);
    assert!(
        (t["eurollm_batch1_best_fraction_of_limit"].as_f64().unwrap() - 1100.0 / limit).abs()
            < 1e-12
    );
    assert_eq!(t["eurollm_batch1_target_met"], json!(true));
    assert!(
        (t["eurollm_batch1_default_fraction_of_limit"]
            .as_f64()
            .unwrap()
            - 800.0 / limit)
            .abs()
            < 1e-12
    );
    let _ = std::fs::remove_dir_all(&dir);
}
