//! `gpu-check`: runs every CUDA kernel on GPU 0 against its CPU reference
//! (kernels::gpu_ref) over a grid of shapes, then measures decode-attention bandwidth
//! against the device's copy bandwidth and prefill-attention TFLOP/s. Prints one JSON
//! summary on stdout (progress on stderr); exit 1 when a correctness check fails, 2 when
//! there is no usable GPU. Used by kernels/gpu-check.sh; needs no Rust on the GPU machine.
//!
//!   gpu-check [--quick] [--opt-in [NAME]] [--out FILE]
//!   gpu-check --precompile DIR [--arch sm_90]   (no GPU needed: fills a kernel cache)
//!
//! `--opt-in`: only the experimental designs the worker runs when asked, checked and timed
//! in a process of their own (so a faulting experiment cannot take the default run's
//! CUDA context with it); NAME picks one (see `prefill_designs`). `--opt-in pdl` (with
//! `SOV_PDL=1` in the environment, sm_90+) checks the decode path's kernels as their
//! programmatic-dependent-launch builds, launched with the attribute, and times the GEMV
//! chain of a decode step with them.

use std::process::ExitCode;
use std::time::Instant;

use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::{CudaSlice, DeviceRepr, ValidAsZeroBits};
use kernels::KvLayout;
use kernels::cpu::RopeStyle;
use kernels::cuda::launch::{
    self, DecodeDims, KvMut, KvRef, PrefillDims, PrefillKernel, RopeDims, SplitScratch,
};
use kernels::cuda::{CudaError, Kernels};
use kernels::gpu_ref::{self, DecodeShape, KvCache, from_bf16, to_bf16_vec};
use serde_json::{Value, json};

/// bf16 tolerance: one rounding of the output plus f32 accumulation differences.
fn close(got: f32, want: f32) -> bool {
    (got - want).abs() <= want.abs() / 128.0 + 2e-3
}

struct Rng(u64);
impl Rng {
    fn f32s(&mut self, n: usize) -> Vec<f32> {
        (0..n)
            .map(|_| {
                self.0 ^= self.0 << 13;
                self.0 ^= self.0 >> 7;
                self.0 ^= self.0 << 17;
                (self.0 >> 40) as f32 / (1u64 << 23) as f32 - 1.0
            })
            .collect()
    }
}

fn up<T: DeviceRepr>(k: &Kernels, v: &[T]) -> Result<CudaSlice<T>, CudaError> {
    Ok(k.stream.clone_htod(v)?)
}

fn zeros<T: DeviceRepr + ValidAsZeroBits>(
    k: &Kernels,
    n: usize,
) -> Result<CudaSlice<T>, CudaError> {
    Ok(k.stream.alloc_zeros::<T>(n.max(1))?)
}

fn down<T: DeviceRepr + Default + Clone>(
    k: &Kernels,
    s: &CudaSlice<T>,
) -> Result<Vec<T>, CudaError> {
    Ok(k.stream.clone_dtoh(s)?)
}

/// Compare bf16 outputs; returns (max abs error, first mismatch).
fn compare(got: &[u16], want: &[u16]) -> (f32, Option<String>) {
    let mut max_err = 0f32;
    let mut first = None;
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let (g, w) = (from_bf16(*g), from_bf16(*w));
        let e = (g - w).abs();
        if e.is_nan() || !close(g, w) {
            first.get_or_insert_with(|| format!("element {i}: gpu {g} vs reference {w}"));
        }
        if e > max_err || e.is_nan() {
            max_err = e;
        }
    }
    (max_err, first)
}

/// Random paged KV cache for `lens`, block tables scrambled.
struct Paged {
    layout: KvLayout,
    max_blocks: usize,
    tables: Vec<u32>,
    kc: Vec<u16>,
    vc: Vec<u16>,
}

fn paged(rng: &mut Rng, lens: &[usize], n_kv: usize, hd: usize, random: bool) -> Paged {
    let max_blocks = lens
        .iter()
        .map(|l| l.div_ceil(16))
        .max()
        .unwrap_or(1)
        .max(1);
    let num_blocks = max_blocks * lens.len() + 1;
    let layout = KvLayout {
        num_blocks,
        block_size: 16,
        n_kv_heads: n_kv,
        head_dim: hd,
    };
    let tables = (0..lens.len() * max_blocks)
        .map(|i| ((i * 7919) % (num_blocks - 1) + 1) as u32)
        .collect();
    // A permutation when gcd(7919, num_blocks - 1) == 1; otherwise blocks are shared,
    // which only makes sequences read the same blocks (still a valid table).
    let (kc, vc) = if random {
        (
            to_bf16_vec(&rng.f32s(layout.elements())),
            to_bf16_vec(&rng.f32s(layout.elements())),
        )
    } else {
        (vec![0u16; layout.elements()], vec![0u16; layout.elements()])
    };
    Paged {
        layout,
        max_blocks,
        tables,
        kc,
        vc,
    }
}

/// Per-KV-head scales for an fp8 cache of values in [-1, 1): one head mid-range, the
/// next with many subnormal codes.
fn fp8_scales(n_kv: usize) -> Vec<f32> {
    (0..n_kv).map(|h| [1.0 / 64.0, 0.5][h % 2]).collect()
}

/// A paged cache's fp8 twin: e4m3 codes over [`fp8_scales`], on the host (for the
/// reference) and on the device.
struct Fp8Twin {
    k: Vec<u8>,
    v: Vec<u8>,
    scales: Vec<f32>,
    kd: CudaSlice<u8>,
    vd: CudaSlice<u8>,
    sd: CudaSlice<f32>,
}

impl Fp8Twin {
    fn new(k: &Kernels, p: &Paged) -> Result<Self, CudaError> {
        let (n_kv, hd) = (p.layout.n_kv_heads, p.layout.head_dim);
        let scales = fp8_scales(n_kv);
        let kq = quantize(&p.kc, n_kv, hd, &scales);
        let vq = quantize(&p.vc, n_kv, hd, &scales);
        Ok(Self {
            kd: up(k, &kq)?,
            vd: up(k, &vq)?,
            sd: up(k, &scales)?,
            k: kq,
            v: vq,
            scales,
        })
    }

    fn device(&self) -> KvRef<'_> {
        KvRef::Fp8 {
            k: &self.kd,
            v: &self.vd,
            k_scale: &self.sd,
            v_scale: &self.sd,
        }
    }

    fn host(&self) -> (KvCache<'_>, KvCache<'_>) {
        let kc = KvCache::Fp8 {
            codes: &self.k,
            scales: &self.scales,
        };
        let vc = KvCache::Fp8 {
            codes: &self.v,
            scales: &self.scales,
        };
        (kc, vc)
    }
}

/// e4m3 codes of a `[slots][n_kv][hd]` bf16 cache divided by each head's scale.
fn quantize(x: &[u16], n_kv: usize, hd: usize, scales: &[f32]) -> Vec<u8> {
    x.iter()
        .enumerate()
        .map(|(i, &v)| gpu_ref::to_e4m3(from_bf16(v) / scales[(i / hd) % n_kv]))
        .collect()
}

/// One decode-attention correctness case; checks at most `check_seqs` sequences on the
/// CPU (the reference is slow for long batches). `fp8`: the `_fp8` kernel over the
/// cache quantized to e4m3 with per-head scales.
#[allow(clippy::too_many_arguments)]
fn check_decode(
    k: &Kernels,
    rng: &mut Rng,
    hd: usize,
    group: usize,
    batch: usize,
    ctx: usize,
    splits: Option<usize>,
    fp8: bool,
) -> Result<Value, CudaError> {
    let n_kv = 2;
    let lens: Vec<usize> = (0..batch)
        .map(|i| if i % 2 == 1 { ctx.div_ceil(2) } else { ctx })
        .collect();
    let p = paged(rng, &lens, n_kv, hd, true);
    let n_heads = n_kv * group;
    let q = to_bf16_vec(&rng.f32s(batch * n_heads * hd));
    let num_splits = splits.unwrap_or_else(|| launch::decode_splits(batch, n_kv, ctx, k.sms));
    let d = DecodeDims {
        num_seqs: batch,
        n_kv_heads: n_kv,
        group,
        head_dim: hd,
        max_blocks: p.max_blocks,
        num_splits,
        scale: 1.0 / (hd as f32).sqrt(),
        q_stride: n_heads * hd,
    };
    let tables: Vec<i32> = p.tables.iter().map(|t| *t as i32).collect();
    let lens_i: Vec<i32> = lens.iter().map(|l| *l as i32).collect();
    let (qd, kd, vd, td, ld) = (
        up(k, &q)?,
        up(k, &p.kc)?,
        up(k, &p.vc)?,
        up(k, &tables)?,
        up(k, &lens_i)?,
    );
    let mut out = zeros::<u16>(k, q.len())?;
    let mut scratch = SplitScratch::new(k, &d)?;
    let twin = if fp8 {
        Some(Fp8Twin::new(k, &p)?)
    } else {
        None
    };
    let kv = twin
        .as_ref()
        .map_or(KvRef::Bf16 { k: &kd, v: &vd }, Fp8Twin::device);
    launch::decode_attention_kv(k, &d, &qd, kv, &td, &ld, &mut out, &mut scratch)?;
    let got = down(k, &out)?;
    let check = batch.min(4);
    let shape = DecodeShape {
        layout: p.layout,
        n_heads,
        max_blocks: p.max_blocks,
        scale: d.scale,
        num_splits,
    };
    let (kr, vr) = twin
        .as_ref()
        .map_or((KvCache::Bf16(&p.kc), KvCache::Bf16(&p.vc)), Fp8Twin::host);
    let want = gpu_ref::decode_attention_kv(
        &shape,
        &q[..check * n_heads * hd],
        kr,
        vr,
        &p.tables[..check * p.max_blocks],
        &lens[..check],
    );
    let (err, first) = compare(&got[..want.len()], &want);
    let kernel = if fp8 {
        "decode_attention_fp8"
    } else {
        "decode_attention"
    };
    Ok(
        json!({"kernel": kernel, "head_dim": hd, "group": group, "batch": batch,
              "context": ctx, "splits": num_splits, "checked_seqs": check,
              "max_abs_err": err, "ok": first.is_none(), "mismatch": first}),
    )
}

/// The name a prefill design's checks and timings carry in the summary.
fn prefill_name(fp8: bool, kind: PrefillKernel) -> &'static str {
    match (fp8, kind) {
        (true, _) => "prefill_attention_fp8",
        (false, PrefillKernel::Basic) => "prefill_attention",
        (false, PrefillKernel::Pipelined) => "prefill_attention_pipe",
        (false, PrefillKernel::Wgmma) => "prefill_attention_wgmma",
        (false, PrefillKernel::WgmmaOverlap) => "prefill_attention_wgmma_ov",
        (false, PrefillKernel::WgmmaWs) => "prefill_attention_wgmma_ws",
        (false, PrefillKernel::WgmmaPingPong) => "prefill_attention_wgmma_pp",
        (false, PrefillKernel::WgmmaPingPong128) => "prefill_attention_wgmma_pp128",
        (false, PrefillKernel::WgmmaTma) => "prefill_attention_wgmma_tma",
    }
}

/// The prefill designs of a run ((fp8 cache, kind)): every design the worker has that
/// this device runs (the wgmma one on sm_90 only); with `--opt-in` the experimental
/// prefill designs (`prefill_attention_wgmma_ov`, `_ws`, `_pp`, `_pp128`, `_tma`), or with `--opt-in NAME` the one design of that name,
/// experimental or not (to profile one kernel alone).
fn prefill_designs(k: &Kernels, opt_in: Option<&str>) -> Vec<(bool, PrefillKernel)> {
    let mut default = vec![
        (false, PrefillKernel::Basic),
        (true, PrefillKernel::Basic),
        (false, PrefillKernel::Pipelined),
    ];
    let mut experimental = Vec::new();
    if k.has_source("prefill_wgmma.cu") {
        default.push((false, PrefillKernel::Wgmma));
        experimental.push((false, PrefillKernel::WgmmaOverlap));
        experimental.push((false, PrefillKernel::WgmmaWs));
        experimental.push((false, PrefillKernel::WgmmaPingPong));
        experimental.push((false, PrefillKernel::WgmmaPingPong128));
        experimental.push((false, PrefillKernel::WgmmaTma));
    }
    match opt_in {
        None => default,
        Some("all") => experimental,
        Some(name) => default
            .into_iter()
            .chain(experimental)
            .filter(|(fp8, kind)| prefill_name(*fp8, *kind) == name)
            .collect(),
    }
}

/// Every prefill design in `designs` ((fp8 cache, kind)) on one random batch of `cases`
/// ((new, cached) tokens per sequence); the references are computed once per cache type.
fn check_prefill(
    k: &Kernels,
    designs: &[(bool, PrefillKernel)],
    rng: &mut Rng,
    hd: usize,
    group: usize,
    cases: &[(usize, usize)],
) -> Result<Vec<Value>, CudaError> {
    let n_kv = 2;
    let n_heads = n_kv * group;
    let lens: Vec<usize> = cases.iter().map(|(new, cached)| new + cached).collect();
    let p = paged(rng, &lens, n_kv, hd, true);
    let mut cu = vec![0usize];
    for (new, _) in cases {
        cu.push(cu.last().copied().unwrap_or(0) + new);
    }
    let total = *cu.last().unwrap_or(&0);
    let q = to_bf16_vec(&rng.f32s(total * n_heads * hd));
    let d = PrefillDims {
        num_seqs: cases.len(),
        max_new: cases.iter().map(|c| c.0).max().unwrap_or(1),
        n_heads,
        n_kv_heads: n_kv,
        head_dim: hd,
        max_blocks: p.max_blocks,
        scale: 1.0 / (hd as f32).sqrt(),
        q_stride: n_heads * hd,
    };
    let i32s = |v: &[usize]| v.iter().map(|x| *x as i32).collect::<Vec<i32>>();
    let tables: Vec<i32> = p.tables.iter().map(|t| *t as i32).collect();
    let (qd, kd, vd) = (up(k, &q)?, up(k, &p.kc)?, up(k, &p.vc)?);
    let (cud, ld, td) = (up(k, &i32s(&cu))?, up(k, &i32s(&lens))?, up(k, &tables)?);
    let twin = if designs.iter().any(|(fp8, _)| *fp8) {
        Some(Fp8Twin::new(k, &p)?)
    } else {
        None
    };
    let shape = DecodeShape {
        layout: p.layout,
        n_heads,
        max_blocks: p.max_blocks,
        scale: d.scale,
        num_splits: 1,
    };
    let reference = |fp8: bool| {
        let (kr, vr) = match (&twin, fp8) {
            (Some(t), true) => t.host(),
            _ => (KvCache::Bf16(&p.kc), KvCache::Bf16(&p.vc)),
        };
        gpu_ref::prefill_attention_kv(&shape, &q, kr, vr, &p.tables, &cu, &lens)
    };
    let (mut want_bf16, mut want_fp8) = (None, None);
    let mut out = Vec::new();
    for &(fp8, kind) in designs {
        let name = prefill_name(fp8, kind);
        let kv = match (&twin, fp8) {
            (Some(t), true) => t.device(),
            _ => KvRef::Bf16 { k: &kd, v: &vd },
        };
        let mut o = zeros::<u16>(k, q.len())?;
        let got = launch::prefill_attention_kv(k, kind, &d, &qd, kv, &cud, &ld, &td, &mut o)
            .and_then(|()| down(k, &o));
        let got = match got {
            Ok(g) => g,
            Err(e) => {
                let shape = json!({"head_dim": hd, "group": group, "cases_new_cached": cases});
                out.push(failed(name, shape, &e));
                continue;
            }
        };
        let slot = if fp8 { &mut want_fp8 } else { &mut want_bf16 };
        let want = slot.get_or_insert_with(|| reference(fp8));
        let (err, first) = compare(&got, want);
        let mut c = json!({"kernel": name, "head_dim": hd, "group": group,
              "cases_new_cached": cases, "max_abs_err": err, "ok": first.is_none(), "mismatch": first});
        if first.is_some() {
            c["diagnosis"] = prefill_diagnosis(&got, want, &cu, n_heads, hd);
        }
        out.push(c);
    }
    Ok(out)
}

/// Where a prefill output (`[token][head][hd]`, sequences at `cu`) differs from the
/// reference, in the terms a broken stage of a tiled kernel shows up in: bad elements by
/// 16-row band of a 128-row query tile, by 64-row query tile of the sequence, by head, by
/// 16-dim band and by sequence (with its first bad row); how many are NaN or zero; and
/// the median |gpu| / |reference| of the bad ones (a scale or normalisation error shows
/// as a ratio away from 1, a missed tile as a spread).
// The element index is computed from (sequence, row, head, dim): plain ranges read best.
#[allow(clippy::needless_range_loop)]
fn prefill_diagnosis(got: &[u16], want: &[u16], cu: &[usize], n_heads: usize, hd: usize) -> Value {
    let (mut band, mut tile64) = (vec![0usize; 8], Vec::<usize>::new());
    let (mut heads, mut dims) = (vec![0usize; n_heads], vec![0usize; hd.div_ceil(16)]);
    let mut seqs: Vec<(usize, Option<usize>)> = vec![(0, None); cu.len().saturating_sub(1)];
    let (mut bad, mut nan, mut zero, mut ratios) = (0usize, 0usize, 0usize, Vec::new());
    for s in 0..seqs.len() {
        for row in 0..cu[s + 1] - cu[s] {
            for h in 0..n_heads {
                for d in 0..hd {
                    let i = ((cu[s] + row) * n_heads + h) * hd + d;
                    let (g, w) = (from_bf16(got[i]), from_bf16(want[i]));
                    if !(g - w).abs().is_nan() && close(g, w) {
                        continue;
                    }
                    bad += 1;
                    nan += usize::from(g.is_nan());
                    zero += usize::from(g == 0.0);
                    if w != 0.0 && g.is_finite() {
                        ratios.push((g / w).abs());
                    }
                    band[(row % 128) / 16] += 1;
                    if tile64.len() <= row / 64 {
                        tile64.resize(row / 64 + 1, 0);
                    }
                    tile64[row / 64] += 1;
                    heads[h] += 1;
                    dims[d / 16] += 1;
                    seqs[s].0 += 1;
                    seqs[s].1 = Some(seqs[s].1.map_or(row, |r: usize| r.min(row)));
                }
            }
        }
    }
    ratios.sort_by(f32::total_cmp);
    json!({
        "bad": bad, "of": got.len(), "nan": nan, "zero": zero,
        "median_abs_ratio": ratios.get(ratios.len() / 2),
        "by_row_band16_of_tile128": band, "by_query_tile64": tile64,
        "by_head": heads, "by_dim_band16": dims,
        "by_seq_bad_first_row": seqs.iter().map(|(n, r)| json!([n, r])).collect::<Vec<_>>(),
    })
}

/// A check that could not run (a launch or copy failed): recorded as failed, and the
/// GPU check goes on, so one run reports on every kernel.
fn failed(kernel: &str, shape: Value, e: &CudaError) -> Value {
    json!({"kernel": kernel, "shape": shape, "ok": false, "error": e.to_string()})
}

fn check_norms(k: &Kernels, rng: &mut Rng) -> Result<Vec<Value>, CudaError> {
    let mut out = Vec::new();
    // RMSNorm, plain and with the residual.
    let (rows, dim) = (7, 2048);
    let x = to_bf16_vec(&rng.f32s(rows * dim));
    let w = to_bf16_vec(&rng.f32s(dim));
    let (xd, wd) = (up(k, &x)?, up(k, &w)?);
    let mut o = zeros::<u16>(k, x.len())?;
    launch::rms_norm(k, &xd, &wd, &mut o, rows, dim, 1e-5)?;
    let (err, first) = compare(&down(k, &o)?, &gpu_ref::rms_norm(&x, &w, dim, 1e-5));
    out.push(json!({"kernel": "rms_norm", "rows": rows, "dim": dim, "max_abs_err": err, "ok": first.is_none(), "mismatch": first}));
    let mut residual = rng.f32s(rows * dim);
    let mut rd = up(k, &residual)?;
    launch::add_rms_norm(k, &mut rd, &xd, &wd, &mut o, rows, dim, 1e-5)?;
    let want = gpu_ref::add_rms_norm(&mut residual, &x, &w, dim, 1e-5);
    let (err, mut first) = compare(&down(k, &o)?, &want);
    let res_got = down(k, &rd)?;
    if res_got
        .iter()
        .zip(&residual)
        .any(|(a, b)| (a - b).abs() > 1e-6)
    {
        first.get_or_insert_with(|| "residual differs".into());
    }
    out.push(json!({"kernel": "add_rms_norm", "rows": rows, "dim": dim, "max_abs_err": err, "ok": first.is_none(), "mismatch": first}));
    Ok(out)
}

fn check_act(k: &Kernels, rng: &mut Rng) -> Result<Vec<Value>, CudaError> {
    let mut out = Vec::new();
    // SiLU-and-mul.
    let inter = 5632;
    let gu = to_bf16_vec(
        &rng.f32s(3 * 2 * inter)
            .iter()
            .map(|v| v * 8.0)
            .collect::<Vec<_>>(),
    );
    let gud = up(k, &gu)?;
    let mut o = zeros::<u16>(k, 3 * inter)?;
    launch::silu_and_mul(k, &gud, &mut o, 3, inter)?;
    let (err, first) = compare(&down(k, &o)?, &gpu_ref::silu_and_mul(&gu, inter));
    out.push(json!({"kernel": "silu_and_mul", "rows": 3, "inter": inter, "max_abs_err": err, "ok": first.is_none(), "mismatch": first}));
    // Embedding lookup.
    let (vocab, hidden) = (1000, 2048);
    let table = to_bf16_vec(&rng.f32s(vocab * hidden));
    let ids = [7u32, 999, 0, 7];
    let td = up(k, &table)?;
    let idd = up(k, &ids.iter().map(|i| *i as i32).collect::<Vec<_>>())?;
    let mut o = zeros::<u16>(k, ids.len() * hidden)?;
    launch::embed_rows(k, &td, &idd, &mut o, ids.len(), hidden)?;
    let ok = down(k, &o)? == gpu_ref::embed_rows(&table, &ids, hidden);
    out.push(json!({"kernel": "embed_rows", "hidden": hidden, "ok": ok}));
    Ok(out)
}

/// The experimental `gemv_norm_late_t*` at 1, 2, 3 and 8 tokens against
/// `gpu_ref::gemv_norm_late_f32` (bf16 tolerance on the bf16 output).
fn check_gemv_norm_late(k: &Kernels, rng: &mut Rng) -> Result<Vec<Value>, CudaError> {
    use launch::{GemvInput, GemvOutput};
    let mut out = Vec::new();
    for (rows, cols) in [(4096usize, 2048usize), (11264, 2048), (1001, 64)] {
        for tokens in [1, 2, 3, 8] {
            let t = launch::gemv_rows(tokens);
            let w = to_bf16_vec(&rng.f32s(rows * cols));
            let res: Vec<f32> = rng.f32s(t * cols).iter().map(|v| v * 3.0).collect();
            let nw = to_bf16_vec(&rng.f32s(cols));
            let (wd, rd, nwd) = (up(k, &w)?, up(k, &res)?, up(k, &nw)?);
            let mut y = zeros::<u16>(k, t * rows)?;
            let input = GemvInput::Norm {
                residual: &rd,
                weight: &nwd,
                eps: 1e-5,
                late: true,
            };
            launch::gemv(k, &wd, input, GemvOutput::Bf16(&mut y), tokens, rows, cols)?;
            let want = to_bf16_vec(&gpu_ref::gemv_norm_late_f32(
                &w,
                &res[..tokens * cols],
                &nw,
                rows,
                cols,
                1e-5,
            ));
            let (err, first) = compare(&down(k, &y)?[..want.len()], &want);
            out.push(
                json!({"kernel": "gemv_norm_late", "rows": rows, "cols": cols,
                "tokens": tokens, "max_abs_err": err, "ok": first.is_none(), "mismatch": first}),
            );
        }
    }
    Ok(out)
}

/// The experimental `gemv_norm_rope_t*` (q|k|v GEMV with RoPE and the KV write in its
/// epilogue) against what it replaces: the `gemv_norm` kernel's q|k|v rows (checked in the
/// default run) through `gpu_ref::rope_write_kv` (interleaved pairs), at 1 and 2 tokens
/// (one without a cache slot), full and partial rotary. `late`: `gemv_norm_late_rope_t*`
/// against `gemv_norm_late`'s rows (checked against `gpu_ref::gemv_norm_late_f32` in its
/// own opt-in run) through the same reference.
fn check_gemv_norm_rope_of(
    k: &Kernels,
    rng: &mut Rng,
    late: bool,
) -> Result<Vec<Value>, CudaError> {
    use launch::{GemvInput, GemvOutput};
    let mut out = Vec::new();
    for (nh, nkv, hd, rot, cols) in [(16, 8, 128, 128, 2048), (9, 3, 64, 32, 576)] {
        for tokens in [1usize, 2] {
            let (cos, sin) = rope_table(4096, rot);
            let rows = (nh + 2 * nkv) * hd;
            let t = launch::gemv_rows(tokens);
            let w = to_bf16_vec(&rng.f32s(rows * cols));
            let res: Vec<f32> = rng.f32s(t * cols).iter().map(|v| v * 3.0).collect();
            let nw = to_bf16_vec(&rng.f32s(cols));
            let (wd, rd, nwd) = (up(k, &w)?, up(k, &res)?, up(k, &nw)?);
            let positions = [4095usize, 17];
            let slots = [5i64, -1];
            let n_slots = 8;
            let pd = up(k, &positions.iter().map(|p| *p as i32).collect::<Vec<_>>())?;
            let sd = up(k, &slots.iter().map(|s| *s as i32).collect::<Vec<_>>())?;
            let (cd, snd) = (up(k, &cos)?, up(k, &sin)?);
            // The reference: gemv_norm's rows, rotated and stored on the CPU.
            let mut plain = zeros::<u16>(k, t * rows)?;
            let input = GemvInput::Norm {
                residual: &rd,
                weight: &nwd,
                eps: 1e-5,
                late,
            };
            launch::gemv(
                k,
                &wd,
                input,
                GemvOutput::Bf16(&mut plain),
                tokens,
                rows,
                cols,
            )?;
            let mut qkv_ref = down(k, &plain)?;
            let shape = gpu_ref::RopeShape {
                n_heads: nh,
                n_kv_heads: nkv,
                head_dim: hd,
                rot_dim: rot,
                style: RopeStyle::Interleaved,
                cos: &cos,
                sin: &sin,
            };
            let (kc_ref, vc_ref) = rope_reference(
                &shape,
                &mut qkv_ref,
                rows,
                &positions[..tokens],
                &slots[..tokens],
                n_slots,
            );
            let mut qkv = zeros::<u16>(k, t * rows)?;
            let mut kc = zeros::<u16>(k, n_slots * nkv * hd)?;
            let mut vc = zeros::<u16>(k, n_slots * nkv * hd)?;
            let d = RopeDims {
                tokens,
                n_heads: nh,
                n_kv_heads: nkv,
                head_dim: hd,
                rot_dim: rot,
                style: 0,
                qkv_stride: rows,
            };
            let mut kv = KvMut::Bf16 {
                k: &mut kc,
                v: &mut vc,
            };
            launch::gemv_norm_rope(
                k, &wd, &rd, &nwd, 1e-5, cols, &d, &mut qkv, &pd, &sd, &cd, &snd, &mut kv, late,
            )?;
            // q rows of every token; the k and v parts of qkv are not written.
            let got = down(k, &qkv)?;
            let (mut err, mut first) = (0f32, None);
            for ti in 0..tokens {
                let r = ti * rows..ti * rows + nh * hd;
                let (e, f) = compare(&got[r.clone()], &qkv_ref[r]);
                err = err.max(e);
                first = first.or(f.map(|m| format!("q of token {ti}: {m}")));
            }
            let (e2, f2) = compare(&down(k, &kc)?, &kc_ref);
            let (e3, f3) = compare(&down(k, &vc)?, &vc_ref);
            let first = first
                .or(f2.map(|m| format!("k cache: {m}")))
                .or(f3.map(|m| format!("v cache: {m}")));
            out.push(
                json!({"kernel": if late { "gemv_norm_late_rope" } else { "gemv_norm_rope" },
                "heads": [nh, nkv], "head_dim": hd,
                "rot_dim": rot, "cols": cols, "tokens": tokens, "max_abs_err": err.max(e2).max(e3),
                "ok": first.is_none(), "mismatch": first}),
            );
        }
    }
    Ok(out)
}

fn check_gemv_norm_rope(k: &Kernels, rng: &mut Rng) -> Result<Vec<Value>, CudaError> {
    check_gemv_norm_rope_of(k, rng, false)
}

fn check_gemv_norm_late_rope(k: &Kernels, rng: &mut Rng) -> Result<Vec<Value>, CudaError> {
    check_gemv_norm_rope_of(k, rng, true)
}

/// How late `pdl_late_copy` writes: far beyond a launch's latency, so a successor that
/// read before its wait would see the old bytes.
const PDL_LATE_NS: i64 = 200_000;
/// The word `pdl_probe` looks for.
const PDL_MARK: u32 = 0x00C0_FFEE;

/// PDL builds (`--opt-in pdl`): first whether a successor overlaps its predecessor at all
/// (`pdl_probe` reads a word before and after its wait while `pdl_late_copy` writes it
/// late); then the GEMV (plain, normalised, SiLU added to the residual) and decode
/// attention with what their predecessor writes (inputs, residual, the current token's K
/// and V rows) written late by `pdl_late_copy`: each output must equal, bit for bit, the
/// same kernel's with those inputs in place beforehand. A kernel that read before its
/// wait would see zeros there. Without an observed overlap the checks still run but say
/// that they proved nothing (`overlap: false`).
fn check_pdl_late_writes(k: &Kernels, rng: &mut Rng) -> Result<Vec<Value>, CudaError> {
    use launch::{GemvInput, GemvOutput};
    let mut out = Vec::new();
    let mut buf = up(k, &[0u32; 4])?;
    let word = up(k, &[PDL_MARK])?;
    let mut seen = zeros::<u32>(k, 2)?;
    launch::pdl_late_copy(k, &word, &mut buf, 0, PDL_LATE_NS)?;
    launch::pdl_probe(k, &buf, &mut seen)?;
    let s = down(k, &seen)?;
    let overlap = s[0] == 0;
    out.push(json!({"kernel": "pdl_probe", "before_wait": s[0], "after_wait": s[1],
                    "overlap": overlap, "ok": s[1] == PDL_MARK,
                    "mismatch": (s[1] != PDL_MARK).then(|| format!("after the wait: {:#x}", s[1]))}));
    // Outputs as bit patterns (bf16 or f32), compared exactly.
    let same = |name: &str, direct: &[u32], late: &[u32], shape: Value| {
        let first = direct.iter().zip(late).position(|(a, b)| a != b).map(|i| {
            format!(
                "element {i}: {:#x} with the input late, {:#x} in place",
                late[i], direct[i]
            )
        });
        json!({"kernel": name, "shape": shape, "overlap": overlap,
               "ok": first.is_none() && direct.len() == late.len(), "mismatch": first})
    };
    let bits16 = |v: Vec<u16>| v.into_iter().map(u32::from).collect::<Vec<u32>>();
    let bits32 = |v: Vec<f32>| v.into_iter().map(f32::to_bits).collect::<Vec<u32>>();
    // GEMVs, EuroLLM's o_proj shape, one token.
    let (rows, cols) = (2048usize, 2048usize);
    let w = up(k, &to_bf16_vec(&rng.f32s(rows * cols)))?;
    let x = up(k, &to_bf16_vec(&rng.f32s(cols)))?;
    let res_host: Vec<f32> = rng.f32s(cols).iter().map(|v| v * 3.0).collect();
    let res = up(k, &res_host)?;
    let nw = up(k, &to_bf16_vec(&rng.f32s(cols)))?;
    let shape = json!({"rows": rows, "cols": cols, "tokens": 1});
    for norm in [false, true] {
        // The GEMV of x (plain) or of the normalised residual r, into bf16.
        let run = |x: &CudaSlice<u16>, r: &CudaSlice<f32>| -> Result<Vec<u16>, CudaError> {
            let input = if norm {
                GemvInput::Norm {
                    residual: r,
                    weight: &nw,
                    eps: 1e-5,
                    late: false,
                }
            } else {
                GemvInput::Plain(x)
            };
            let mut y = zeros::<u16>(k, rows)?;
            launch::gemv(k, &w, input, GemvOutput::Bf16(&mut y), 1, rows, cols)?;
            down(k, &y)
        };
        let direct = run(&x, &res)?;
        // Both inputs written late (one copy after the other).
        let (mut x2, mut r2) = (zeros::<u16>(k, cols)?, zeros::<f32>(k, cols)?);
        launch::pdl_late_copy(k, &x, &mut x2, 0, PDL_LATE_NS)?;
        launch::pdl_late_copy(k, &res, &mut r2, 0, PDL_LATE_NS)?;
        let late = run(&x2, &r2)?;
        let name = if norm {
            "pdl_late_gemv_norm"
        } else {
            "pdl_late_gemv"
        };
        out.push(same(name, &bits16(direct), &bits16(late), shape.clone()));
    }
    // SiLU(gate) * up added to the residual: both written late (two copies in a row).
    let gu = up(k, &to_bf16_vec(&rng.f32s(2 * cols)))?;
    let (inter, hid) = (cols, 1024usize);
    let wd = up(k, &to_bf16_vec(&rng.f32s(hid * inter)))?;
    let base = up(k, &rng.f32s(hid))?;
    let mut r1 = zeros::<f32>(k, hid)?;
    k.stream.memcpy_dtod(&base, &mut r1)?;
    launch::gemv(
        k,
        &wd,
        GemvInput::SiluOf(&gu),
        GemvOutput::AddTo(&mut r1),
        1,
        hid,
        inter,
    )?;
    let direct = down(k, &r1)?;
    let (mut gu2, mut r2) = (zeros::<u16>(k, 2 * cols)?, zeros::<f32>(k, hid)?);
    launch::pdl_late_copy(k, &gu, &mut gu2, 0, PDL_LATE_NS)?;
    launch::pdl_late_copy(k, &base, &mut r2, 0, PDL_LATE_NS)?;
    launch::gemv(
        k,
        &wd,
        GemvInput::SiluOf(&gu2),
        GemvOutput::AddTo(&mut r2),
        1,
        hid,
        inter,
    )?;
    let late = down(k, &r2)?;
    let shape = json!({"rows": hid, "cols": inter, "tokens": 1});
    out.push(same(
        "pdl_late_gemv_silu_add",
        &bits32(direct),
        &bits32(late),
        shape,
    ));
    // Decode attention: the current token's K and V rows written late. EuroLLM's head
    // layout and SmolLM2's; a context inside one block and one of three.
    for (hd, group) in [(128usize, 2usize), (64, 3)] {
        for ctx in [5usize, 40] {
            let n_kv = 2;
            let p = paged(rng, &[ctx], n_kv, hd, true);
            let n_heads = n_kv * group;
            let q = up(k, &to_bf16_vec(&rng.f32s(n_heads * hd)))?;
            let d = DecodeDims {
                num_seqs: 1,
                n_kv_heads: n_kv,
                group,
                head_dim: hd,
                max_blocks: p.max_blocks,
                num_splits: 1,
                scale: 1.0 / (hd as f32).sqrt(),
                q_stride: n_heads * hd,
            };
            let td = up(k, &p.tables.iter().map(|t| *t as i32).collect::<Vec<_>>())?;
            let ld = up(k, &[ctx as i32])?;
            let mut scratch = SplitScratch::new(k, &d)?;
            let (kd, vd) = (up(k, &p.kc)?, up(k, &p.vc)?);
            let mut o1 = zeros::<u16>(k, n_heads * hd)?;
            launch::decode_attention_kv(
                k,
                &d,
                &q,
                KvRef::Bf16 { k: &kd, v: &vd },
                &td,
                &ld,
                &mut o1,
                &mut scratch,
            )?;
            let direct = down(k, &o1)?;
            // The current token's row (position ctx - 1) zeroed, then written late.
            let pos = ctx - 1;
            let slot = p.tables[pos / 16] as usize * 16 + pos % 16;
            let row = n_kv * hd;
            let (mut kc, mut vc) = (p.kc.clone(), p.vc.clone());
            kc[slot * row..(slot + 1) * row].fill(0);
            vc[slot * row..(slot + 1) * row].fill(0);
            let (mut kd2, mut vd2) = (up(k, &kc)?, up(k, &vc)?);
            let krow = up(k, &p.kc[slot * row..(slot + 1) * row])?;
            let vrow = up(k, &p.vc[slot * row..(slot + 1) * row])?;
            launch::pdl_late_copy(k, &krow, &mut kd2, slot * row * 2, PDL_LATE_NS)?;
            launch::pdl_late_copy(k, &vrow, &mut vd2, slot * row * 2, PDL_LATE_NS)?;
            let mut o2 = zeros::<u16>(k, n_heads * hd)?;
            launch::decode_attention_kv(
                k,
                &d,
                &q,
                KvRef::Bf16 { k: &kd2, v: &vd2 },
                &td,
                &ld,
                &mut o2,
                &mut scratch,
            )?;
            let late = down(k, &o2)?;
            let shape = json!({"head_dim": hd, "group": group, "context": ctx});
            out.push(same(
                "pdl_late_decode_attention",
                &bits16(direct),
                &bits16(late),
                shape,
            ));
        }
    }
    Ok(out)
}

/// The GEMV kernels at 1, 2, 3 and 8 tokens (T = 1, 2, 4, 8: every round and input path).
fn check_gemv(k: &Kernels, rng: &mut Rng) -> Result<Vec<Value>, CudaError> {
    use launch::{GemvInput, GemvOutput};
    let mut out = Vec::new();
    // EuroLLM-1.7B's o_proj and down_proj shapes, and a ragged last CTA.
    for (rows, cols) in [(2048usize, 2048usize), (2048, 5632), (1001, 64)] {
        for tokens in [1, 2, 3, 8] {
            let t = launch::gemv_rows(tokens);
            let w = to_bf16_vec(&rng.f32s(rows * cols));
            let wd = up(k, &w)?;
            // Plain, into bf16.
            let x = to_bf16_vec(&rng.f32s(t * cols));
            let xd = up(k, &x)?;
            let mut y = zeros::<u16>(k, t * rows)?;
            launch::gemv(
                k,
                &wd,
                GemvInput::Plain(&xd),
                GemvOutput::Bf16(&mut y),
                tokens,
                rows,
                cols,
            )?;
            let want = gpu_ref::gemv(&w, &x[..tokens * cols], rows, cols);
            let (err, first) = compare(&down(k, &y)?[..want.len()], &want);
            out.push(
                json!({"kernel": "gemv", "rows": rows, "cols": cols, "tokens": tokens,
                "max_abs_err": err, "ok": first.is_none(), "mismatch": first}),
            );
            // RMS-normalised residual rows, into bf16.
            let res: Vec<f32> = rng.f32s(t * cols).iter().map(|v| v * 3.0).collect();
            let nw = to_bf16_vec(&rng.f32s(cols));
            let (rd, nwd) = (up(k, &res)?, up(k, &nw)?);
            let input = GemvInput::Norm {
                residual: &rd,
                weight: &nwd,
                eps: 1e-5,
                late: false,
            };
            launch::gemv(k, &wd, input, GemvOutput::Bf16(&mut y), tokens, rows, cols)?;
            let xn = gpu_ref::rms_norm_f32(&res[..tokens * cols], &nw, cols, 1e-5);
            let want = gpu_ref::gemv(&w, &xn, rows, cols);
            // The GPU's norm sums in another order: an input element can round to the
            // neighbouring bf16 value. Allow two such flips per output beyond `close`.
            let got = down(k, &y)?;
            let mut err = 0f32;
            let mut first = None;
            for (i, (g, wv)) in got.iter().zip(&want).enumerate() {
                let (g, wv) = (from_bf16(*g), from_bf16(*wv));
                let (t_i, r) = (i / rows, i % rows);
                let xr = &xn[t_i * cols..(t_i + 1) * cols];
                let wr = &w[r * cols..(r + 1) * cols];
                let flip = xr
                    .iter()
                    .zip(wr)
                    .map(|(a, b)| (from_bf16(*a) * from_bf16(*b)).abs())
                    .fold(0f32, f32::max)
                    * 2.0
                    / 128.0;
                let e = (g - wv).abs();
                err = err.max(e);
                if e.is_nan() || e > wv.abs() / 128.0 + 2e-3 + flip {
                    first.get_or_insert_with(|| format!("element {i}: gpu {g} vs reference {wv}"));
                }
            }
            out.push(
                json!({"kernel": "gemv_norm", "rows": rows, "cols": cols, "tokens": tokens,
                "max_abs_err": err, "ok": first.is_none(), "mismatch": first}),
            );
            // Plain and SiLU inputs added to a residual of `rows` columns.
            let gu: Vec<f32> = rng.f32s(t * 2 * cols).iter().map(|v| v * 4.0).collect();
            let gu = to_bf16_vec(&gu);
            let gud = up(k, &gu)?;
            for silu in [false, true] {
                let base = rng.f32s(t * rows);
                let mut rd = up(k, &base)?;
                let (input, xr) = if silu {
                    (
                        GemvInput::SiluOf(&gud),
                        gpu_ref::silu_and_mul(&gu[..tokens * 2 * cols], cols),
                    )
                } else {
                    (GemvInput::Plain(&xd), x[..tokens * cols].to_vec())
                };
                launch::gemv(
                    k,
                    &wd,
                    input,
                    GemvOutput::AddTo(&mut rd),
                    tokens,
                    rows,
                    cols,
                )?;
                let sums = gpu_ref::gemv_f32(&w, &xr, rows, cols);
                let got = down(k, &rd)?;
                let mut max_err = 0f32;
                let mut first = None;
                for (i, g) in got.iter().enumerate() {
                    let want = base[i] + sums.get(i).copied().unwrap_or(0.0);
                    let e = (g - want).abs();
                    max_err = max_err.max(e);
                    if e.is_nan() || e > want.abs() / 512.0 + 1e-3 {
                        first.get_or_insert_with(|| {
                            format!("element {i}: gpu {g} vs reference {want}")
                        });
                    }
                }
                let n = if silu { "gemv_silu_add" } else { "gemv_add" };
                out.push(
                    json!({"kernel": n, "rows": rows, "cols": cols, "tokens": tokens,
                    "max_abs_err": max_err, "ok": first.is_none(), "mismatch": first}),
                );
            }
        }
    }
    // The fused path's final norm and embedding lookup.
    let (rows, dim) = (5, 2048);
    let res: Vec<f32> = rng.f32s(rows * dim).iter().map(|v| v * 7.0).collect();
    let nw = to_bf16_vec(&rng.f32s(dim));
    let (rd, nwd) = (up(k, &res)?, up(k, &nw)?);
    let mut o = zeros::<u16>(k, rows * dim)?;
    launch::rms_norm_f32(k, &rd, &nwd, &mut o, rows, dim, 1e-5)?;
    let (err, first) = compare(&down(k, &o)?, &gpu_ref::rms_norm_f32(&res, &nw, dim, 1e-5));
    out.push(json!({"kernel": "rms_norm_f32", "rows": rows, "dim": dim, "max_abs_err": err, "ok": first.is_none(), "mismatch": first}));
    let table = to_bf16_vec(&rng.f32s(100 * dim));
    let ids = [3u32, 99, 0];
    let (td, idd) = (
        up(k, &table)?,
        up(k, &ids.iter().map(|i| *i as i32).collect::<Vec<_>>())?,
    );
    let mut r = zeros::<f32>(k, ids.len() * dim)?;
    launch::embed_rows_f32(k, &td, &idd, &mut r, ids.len(), dim)?;
    let want: Vec<f32> = gpu_ref::embed_rows(&table, &ids, dim)
        .iter()
        .map(|b| from_bf16(*b))
        .collect();
    out.push(json!({"kernel": "embed_rows_f32", "hidden": dim, "ok": down(k, &r)? == want}));
    Ok(out)
}

/// RoPE cos/sin tables `[max_pos][rot / 2]` (base 10000), as the worker builds them.
fn rope_table(max_pos: usize, rot: usize) -> (Vec<f32>, Vec<f32>) {
    let half = rot / 2;
    let (mut cos, mut sin) = (Vec::new(), Vec::new());
    for p in 0..max_pos {
        for i in 0..half {
            let th = p as f64 * 10000f64.powf(-((2 * i) as f64) / rot as f64);
            cos.push(th.cos() as f32);
            sin.push(th.sin() as f32);
        }
    }
    (cos, sin)
}

/// `gpu_ref::rope_write_kv` into fresh caches of `n_slots` slots: q rotated in `qkv`, the
/// K and V caches returned.
fn rope_reference(
    s: &gpu_ref::RopeShape,
    qkv: &mut [u16],
    stride: usize,
    positions: &[usize],
    slots: &[i64],
    n_slots: usize,
) -> (Vec<u16>, Vec<u16>) {
    let len = n_slots * s.n_kv_heads * s.head_dim;
    let (mut kc, mut vc) = (vec![0u16; len], vec![0u16; len]);
    gpu_ref::rope_write_kv(s, qkv, stride, positions, slots, &mut kc, &mut vc);
    (kc, vc)
}

fn check_rope(k: &Kernels, rng: &mut Rng) -> Result<Vec<Value>, CudaError> {
    let mut out = Vec::new();
    // RoPE + KV write, both styles.
    for (style, style_id) in [(RopeStyle::Interleaved, 0), (RopeStyle::Half, 1)] {
        let (tokens, nh, nkv, hd, rot, max_pos) = (5, 16, 8, 128, 128, 4096);
        let (cos, sin) = rope_table(max_pos, rot);
        let stride = (nh + 2 * nkv) * hd + 8;
        let qkv0 = to_bf16_vec(&rng.f32s(tokens * stride));
        let mut qkv = qkv0.clone();
        let positions = [0usize, 1, 17, 1000, 4095];
        let slots = [3i64, 4, -1, 40, 0];
        let n_slots = 48;
        let mut qkvd = up(k, &qkv)?;
        let pd = up(k, &positions.iter().map(|p| *p as i32).collect::<Vec<_>>())?;
        let sd = up(k, &slots.iter().map(|s| *s as i32).collect::<Vec<_>>())?;
        let (cd, snd) = (up(k, &cos)?, up(k, &sin)?);
        let mut kc = zeros::<u16>(k, n_slots * nkv * hd)?;
        let mut vc = zeros::<u16>(k, n_slots * nkv * hd)?;
        let d = RopeDims {
            tokens,
            n_heads: nh,
            n_kv_heads: nkv,
            head_dim: hd,
            rot_dim: rot,
            style: style_id,
            qkv_stride: stride,
        };
        let mut kv = KvMut::Bf16 {
            k: &mut kc,
            v: &mut vc,
        };
        launch::rope_write_kv_into(k, &d, &mut qkvd, &pd, &sd, &cd, &snd, &mut kv)?;
        let s = gpu_ref::RopeShape {
            n_heads: nh,
            n_kv_heads: nkv,
            head_dim: hd,
            rot_dim: rot,
            style,
            cos: &cos,
            sin: &sin,
        };
        let (kc_ref, vc_ref) = rope_reference(&s, &mut qkv, stride, &positions, &slots, n_slots);
        let (e1, f1) = compare(&down(k, &qkvd)?, &qkv);
        let (e2, f2) = compare(&down(k, &kc)?, &kc_ref);
        let (e3, f3) = compare(&down(k, &vc)?, &vc_ref);
        let first = f1.or(f2).or(f3);
        out.push(json!({"kernel": "rope_write_kv", "style": format!("{style:?}"), "max_abs_err": e1.max(e2).max(e3), "ok": first.is_none(), "mismatch": first}));

        // Into an fp8 cache, from the same (unrotated) rows.
        let mut qkvd = up(k, &qkv0)?;
        let scales = fp8_scales(nkv);
        let scd = up(k, &scales)?;
        let mut k8 = zeros::<u8>(k, n_slots * nkv * hd)?;
        let mut v8 = zeros::<u8>(k, n_slots * nkv * hd)?;
        let mut kv = KvMut::Fp8 {
            k: &mut k8,
            v: &mut v8,
            k_scale: &scd,
            v_scale: &scd,
        };
        launch::rope_write_kv_into(k, &d, &mut qkvd, &pd, &sd, &cd, &snd, &mut kv)?;
        let mut qkv = qkv0.clone();
        let mut k8_ref = vec![0u8; n_slots * nkv * hd];
        let mut v8_ref = vec![0u8; n_slots * nkv * hd];
        gpu_ref::rope_write_kv_fp8(
            &s,
            &mut qkv,
            stride,
            &positions,
            &slots,
            &mut k8_ref,
            &mut v8_ref,
            &scales,
            &scales,
        );
        let (e1, f1) = compare(&down(k, &qkvd)?, &qkv);
        // V codes are computed exactly alike; a rotated K value may sit within f32
        // rounding of a boundary between two codes: neighbours pass.
        let code_diff = |got: &[u8], want: &[u8], max: u8| {
            got.iter().zip(want).enumerate().find_map(|(i, (g, w))| {
                let step = (i16::from(g & 0x7f) - i16::from(w & 0x7f)).unsigned_abs();
                let bad = if *g == *w {
                    false
                } else {
                    (g & 0x80) != (w & 0x80) && (g & 0x7f != 0 || w & 0x7f != 0)
                        || step > u16::from(max)
                };
                bad.then(|| format!("element {i}: gpu code {g:#04x} vs reference {w:#04x}"))
            })
        };
        let f2 = code_diff(&down(k, &k8)?, &k8_ref, 1);
        let f3 = code_diff(&down(k, &v8)?, &v8_ref, 0);
        let first = f1.or(f2).or(f3);
        out.push(json!({"kernel": "rope_write_kv_fp8", "style": format!("{style:?}"), "max_abs_err": e1, "ok": first.is_none(), "mismatch": first}));
    }
    Ok(out)
}

fn check_sampling(k: &Kernels, rng: &mut Rng) -> Result<Vec<Value>, CudaError> {
    let mut out = Vec::new();
    // argmax and softmax over a 49152-entry vocabulary, with ties and a NaN.
    let vocab = 49_152;
    let mut logits = rng
        .f32s(4 * vocab)
        .iter()
        .map(|v| v * 20.0)
        .collect::<Vec<_>>();
    logits[vocab + 10] = 100.0;
    logits[vocab + 20] = 100.0; // tie: the lower index wins
    logits[2 * vocab + 5] = f32::NAN;
    // +inf counts as f32::MAX: the earlier MAX wins.
    logits[3 * vocab + 7] = f32::MAX;
    logits[3 * vocab + 9] = f32::INFINITY;
    let ld = up(k, &logits)?;
    let mut idx = zeros::<i32>(k, 4)?;
    launch::argmax_rows(k, &ld, &mut idx, 4, vocab)?;
    let got = down(k, &idx)?;
    let want: Vec<i32> = gpu_ref::argmax_rows(&logits, vocab)
        .iter()
        .map(|t| *t as i32)
        .collect();
    out.push(json!({"kernel": "argmax_rows", "vocab": vocab, "gpu": got, "reference": want, "ok": got == want}));
    // A row without a finite logit whose first entry is NaN: index 0, as on the CPU (a
    // NaN that stayed NaN used to lose to the -inf after it).
    let mut dead = vec![f32::NEG_INFINITY; vocab];
    dead[0] = f32::NAN;
    let dd = up(k, &dead)?;
    launch::argmax_rows(k, &dd, &mut idx, 1, vocab)?;
    let got = down(k, &idx)?[0];
    out.push(json!({"kernel": "argmax_rows", "case": "NaN then -inf", "gpu": got, "ok": got == 0}));
    out.extend(check_sample_rows(k, rng)?);
    out.push(check_apply_penalties(k, rng)?);
    let finite: Vec<f32> = logits
        .iter()
        .map(|v| {
            if v.is_nan() || v.abs() > 1e30 {
                0.0
            } else {
                *v
            }
        })
        .collect();
    let fd = up(k, &finite)?;
    let mut pd = zeros::<f32>(k, finite.len())?;
    launch::softmax_rows(k, &fd, &mut pd, 4, vocab, 0.7)?;
    let got = down(k, &pd)?;
    let want = gpu_ref::softmax_rows(&finite, vocab, 0.7);
    let err = got
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    out.push(
        json!({"kernel": "softmax_rows", "vocab": vocab, "max_abs_err": err, "ok": err < 1e-5}),
    );
    Ok(out)
}

/// `sample_rows` (the dense draw of non-greedy decoding) against its reference: each
/// row's pick must hold the row's `u` in its f64 running-sum interval (id order, kept
/// weights) up to 1e-6 (the kernel sums fixed-point weights exactly; its `expf` and the
/// reference's `exp` may differ in the last bit), the maximum must be the same and the
/// sum within 1e-4. Vocabularies of 1000 (one tile a warp, a partial tile), 32000, 32768
/// (1024 full tiles of 32), 49152 and 128000 (4 tokens a lane); temperatures 1, 0.7 and
/// 0.3, min-p 0, 0.1 and 1 (ties of the maximum only); greedy rows, a row with +inf and
/// one without a finite logit mixed in.
fn check_sample_rows(k: &Kernels, rng: &mut Rng) -> Result<Vec<Value>, CudaError> {
    let mut out = Vec::new();
    for vocab in [20usize, 1000, 32_000, 32_768, 49_152, 128_000, 151_936] {
        let (logits, params) = sample_rows_case(vocab, rng);
        let rows = params.len();
        let ld = up(k, &logits)?;
        let pd = up(k, &gpu_ref::SampleParams::to_device(&params))?;
        let mut ids = zeros::<i32>(k, rows)?;
        let mut stats = zeros::<f32>(k, 2 * rows)?;
        launch::sample_rows(k, &ld, &pd, &mut ids, &mut stats, rows, vocab)?;
        let (got, got_stats) = (down(k, &ids)?, down(k, &stats)?);
        out.push(judge_sample_rows(&logits, vocab, &params, &got, &got_stats));
    }
    Ok(out)
}

/// `apply_penalties` against its reference, bit for bit: three rows of 49152 logits with
/// NaN, both infinities, both zeros and a subnormal among the touched tokens (amount 0), repetition penalties 1,
/// 1.3 and 0.7, a few hundred tokens a row with amounts of either sign.
fn check_apply_penalties(k: &Kernels, rng: &mut Rng) -> Result<Value, CudaError> {
    let (vocab, rows) = (49_152usize, 3usize);
    let mut logits: Vec<f32> = rng.f32s(rows * vocab).iter().map(|v| v * 20.0).collect();
    // Specials, and a subnormal (a flush-to-zero build would lose it).
    let specials = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, -0.0, 0.0, 1e-40];
    for (i, x) in specials.into_iter().enumerate() {
        logits[vocab + 10 * i + 1] = x;
    }
    let rep = [1.0f32, 1.3, 0.7];
    let mut entries = Vec::new();
    for row in 0..rows {
        // Distinct tokens (a token once a row): every 97th, five more, and in row 1 the
        // specials' slots.
        entries.extend((0..vocab).step_by(97).map(|t| (row, t)));
        entries.extend((0..5).map(|i| (row, 10 * i + 3)));
    }
    entries.extend((0..specials.len()).map(|i| (1, 10 * i + 1)));
    let mut subtract: Vec<f32> = rng.f32s(entries.len());
    // Amounts of 0 on the specials (prompt-only tokens: the repetition penalty alone).
    let n = subtract.len();
    subtract[n - specials.len()..].fill(0.0);
    let flat: Vec<i32> = entries
        .iter()
        .flat_map(|&(r, t)| [r as i32, t as i32])
        .collect();
    let mut ld = up(k, &logits)?;
    let (ed, sd, rd) = (up(k, &flat)?, up(k, &subtract)?, up(k, &rep)?);
    launch::apply_penalties(k, &mut ld, vocab, &ed, &sd, &rd, entries.len())?;
    let got = down(k, &ld)?;
    let mut want = logits;
    gpu_ref::apply_penalties(&mut want, vocab, &entries, &subtract, &rep);
    let bad = got
        .iter()
        .zip(&want)
        .filter(|(a, b)| a.to_bits() != b.to_bits() && !(a.is_nan() && b.is_nan()))
        .count();
    Ok(
        json!({"kernel": "apply_penalties", "vocab": vocab, "entries": entries.len(),
        "values_differing": bad, "ok": bad == 0}),
    )
}

/// Rows that differ only in their favourite token and parameters (see
/// [`check_sample_rows`]); row 36 aimed at an unlikely token, row 38 without a finite
/// logit, row 39 with +inf.
fn sample_rows_case(vocab: usize, rng: &mut Rng) -> (Vec<f32>, Vec<gpu_ref::SampleParams>) {
    let base: Vec<f32> = rng.f32s(vocab).iter().map(|v| v * 12.0).collect();
    let settings = [
        (1.0f32, 0.0f32),
        (1.0 / 0.7, 0.0),
        (1.0 / 0.3, 0.0),
        (1.0, 0.1),
        (0.0, 0.0),
        (1.0, 1.0),
    ];
    let mut params = Vec::new();
    let mut logits = Vec::new();
    for (r, &(inv_t, min_w)) in settings.iter().cycle().take(42).enumerate() {
        let mut row = base.clone();
        row[(r * 7919) % vocab] = 14.0; // a different favourite a row
        if r % 6 == 5 {
            row[(r * 31) % vocab] = 14.0; // a tie for min-p 1
        }
        if r == 38 {
            row.fill(f32::NEG_INFINITY);
            row[3] = f32::NAN;
        }
        if r == 39 {
            row[vocab - 1] = f32::INFINITY;
        }
        // A u with bits below f32's (the kernel gets it in two parts).
        let [a, b] = rng.f32s(2)[..] else {
            unreachable!()
        };
        let mut u = (f64::from(a.abs()) + f64::from(b.abs()) * 2f64.powi(-30)).min(0.999_999_999);
        let mut min_w = min_w;
        if min_w > 0.0 && min_w < 1.0 {
            // A min-p threshold in a gap between two weights, so that expf and the
            // reference's exp cannot disagree about which tokens it keeps.
            min_w = gap_threshold(&row, inv_t, min_w);
        }
        if r == 36 {
            // Aimed at the middle of an unlikely token deep in the row (about the 1000th
            // most likely, of probability at least 1e-5): the kernel's fixed-point sums
            // must land on exactly that token.
            u = aimed_u(&row, inv_t, min_w);
        }
        logits.extend(row);
        params.push(gpu_ref::SampleParams { inv_t, min_w, u });
    }
    (logits, params)
}

/// The verdict on `sample_rows`' output for a case of [`sample_rows_case`].
fn judge_sample_rows(
    logits: &[f32],
    vocab: usize,
    params: &[gpu_ref::SampleParams],
    got: &[i32],
    got_stats: &[f32],
) -> Value {
    let rows = params.len();
    let (want, want_stats) = gpu_ref::sample_rows(logits, vocab, params);
    let mut bad = Vec::new();
    let mut same = 0;
    for r in 0..rows {
        let row = &logits[r * vocab..(r + 1) * vocab];
        let id = got[r];
        same += usize::from(id >= 0 && id as u32 == want[r]);
        let p = &params[r];
        let pick_ok = if p.inv_t == 0.0 || r == 36 || r == 38 || r == 39 {
            // Greedy, the aimed draw (the middle of a 1e-5-wide interval is far from where
            // expf and exp could disagree), no finite logit (index 0), +inf (every other
            // weight is 0): the reference's pick.
            id >= 0 && id as u32 == want[r]
        } else {
            usize::try_from(id)
                .ok()
                .and_then(|i| gpu_ref::sample_interval(row, p, i))
                .is_some_and(|(u, lo, hi)| lo - 1e-6 <= u && u < hi + 1e-6)
        };
        let (gm, gs) = (got_stats[2 * r], got_stats[2 * r + 1]);
        let (wm, ws) = want_stats[r];
        let stats_ok = gm.to_bits() == wm.to_bits() && (gs - ws).abs() <= 1e-4 * ws.abs().max(1.0);
        if !(pick_ok && stats_ok) {
            bad.push(json!({"row": r, "gpu": id, "reference": want[r], "gpu_stats": [gm, gs], "reference_stats": [wm, ws]}));
        }
    }
    json!({"kernel": "sample_rows", "vocab": vocab, "rows": rows,
        "same_pick_as_reference": same, "failures": bad.iter().take(5).collect::<Vec<_>>(),
        "ok": bad.is_empty()})
}

/// The sampler's weight of each token of `row` (as `sample_rows` computes them, in f64).
fn row_weights(row: &[f32], inv_t: f32) -> Vec<f64> {
    let mx = row
        .iter()
        .map(|&v| gpu_ref::sanitize_logit(v))
        .fold(f32::NEG_INFINITY, f32::max);
    row.iter()
        .map(|&l| {
            f64::from(gpu_ref::sample_weight(
                gpu_ref::sanitize_logit(l),
                mx,
                inv_t,
            ))
        })
        .collect()
}

/// A draw aimed at the middle of the f64 interval of about the 1000th most likely token,
/// the first from there towards the likelier ones whose probability reaches 1e-5.
fn aimed_u(row: &[f32], inv_t: f32, min_w: f32) -> f64 {
    let w: Vec<f64> = row_weights(row, inv_t)
        .into_iter()
        .map(|x| if x >= f64::from(min_w) { x } else { 0.0 })
        .collect();
    let mut before = vec![0f64; w.len() + 1];
    for (i, &x) in w.iter().enumerate() {
        before[i + 1] = before[i] + x;
    }
    let total = before[w.len()];
    let mut order: Vec<usize> = (0..w.len()).collect();
    order.sort_by(|&a, &b| w[b].total_cmp(&w[a]));
    let start = order.len().min(1000) - 1;
    order[..=start]
        .iter()
        .rev()
        .find(|&&id| w[id] / total >= 1e-5)
        .map_or(0.5, |&id| (before[id] + w[id] / 2.0) / total)
}

/// A min-p threshold near `min_w` that no token's weight is within 1e-4 (relative) of:
/// the geometric middle of the first wide enough gap between sorted weights below it.
fn gap_threshold(row: &[f32], inv_t: f32, min_w: f32) -> f32 {
    let mut w: Vec<f64> = row_weights(row, inv_t)
        .into_iter()
        .filter(|&x| x > 0.0 && x < f64::from(min_w))
        .collect();
    w.sort_by(|a, b| b.total_cmp(a));
    let above = f64::from(min_w);
    std::iter::once(above)
        .chain(w.iter().copied())
        .zip(w.iter().copied())
        .find(|&(hi, lo)| hi > lo * (1.0 + 1e-4))
        .map_or(min_w, |(hi, lo)| (hi * lo).sqrt() as f32)
}

fn check_topk(k: &Kernels, rng: &mut Rng) -> Result<Vec<Value>, CudaError> {
    let mut out = Vec::new();
    // top-k candidates: exact ids and logits, over vocabularies of SmolLM2, Llama 3 and
    // EuroLLM size, with many ties (logits rounded to halves), a NaN and +inf.
    for (vocab, rows) in [(49_152usize, 4usize), (128_256, 2), (262_144, 2)] {
        let mut logits: Vec<f32> = rng
            .f32s(rows * vocab)
            .iter()
            .map(|v| (v * 16.0).round() / 2.0)
            .collect();
        logits[3] = f32::NAN;
        logits[vocab + 7] = f32::INFINITY;
        let ld = up(k, &logits)?;
        for top in [1usize, 50, 1024] {
            let mut vals = zeros::<f32>(k, rows * top)?;
            let mut ids = zeros::<i32>(k, rows * top)?;
            launch::topk_rows(k, &ld, &mut vals, &mut ids, rows, vocab, top)?;
            let (want_v, want_i) = gpu_ref::topk_rows(&logits, vocab, top);
            let (got_v, got_i) = (down(k, &vals)?, down(k, &ids)?);
            let ok = got_i == want_i
                && got_v
                    .iter()
                    .zip(&want_v)
                    .all(|(a, b)| a.to_bits() == b.to_bits());
            let first = got_i.iter().zip(&want_i).position(|(a, b)| a != b);
            out.push(json!({"kernel": "topk_rows", "vocab": vocab, "rows": rows, "k": top, "ok": ok, "first_mismatch": first}));
        }
    }
    Ok(out)
}

/// Milliseconds per call of `f`, median of `reps` event-timed runs after a warm-up.
fn time_ms(
    k: &Kernels,
    reps: usize,
    mut f: impl FnMut() -> Result<(), CudaError>,
) -> Result<f64, CudaError> {
    f()?;
    k.stream.synchronize()?;
    let mut t = Vec::with_capacity(reps);
    for _ in 0..reps {
        let a = k
            .stream
            .record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
        f()?;
        let b = k
            .stream
            .record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
        t.push(f64::from(a.elapsed_ms(&b)?));
    }
    t.sort_by(f64::total_cmp);
    Ok(t[t.len() / 2])
}

fn copy_bandwidth(k: &Kernels) -> Result<f64, CudaError> {
    let n = 1usize << 30; // 1 GiB each way
    let src = zeros::<u8>(k, n)?;
    let mut dst = zeros::<u8>(k, n)?;
    let ms = time_ms(k, 10, || Ok(k.stream.memcpy_dtod(&src, &mut dst)?))?;
    Ok(2.0 * n as f64 / (ms / 1e3) / 1e9)
}

/// Decode attention on a model shaped like EuroLLM-1.7B's attention (16 query heads,
/// 8 KV heads, head_dim 128): GB/s of K/V read.
fn decode_bandwidth(k: &Kernels, ctx: usize) -> Result<Value, CudaError> {
    let (n_kv, group, hd) = (8, 2, 128);
    let per_seq = ctx * n_kv * hd * 2 * 2; // K and V, bf16
    let batch = ((2usize << 30) / per_seq).clamp(1, 256);
    let lens = vec![ctx; batch];
    let mut rng = Rng(1);
    let p = paged(&mut rng, &lens, n_kv, hd, false);
    let d = DecodeDims {
        num_seqs: batch,
        n_kv_heads: n_kv,
        group,
        head_dim: hd,
        max_blocks: p.max_blocks,
        num_splits: launch::decode_splits(batch, n_kv, ctx, k.sms),
        scale: 1.0 / (hd as f32).sqrt(),
        q_stride: n_kv * group * hd,
    };
    let q = zeros::<u16>(k, batch * n_kv * group * hd)?;
    let (kd, vd) = (zeros::<u16>(k, p.kc.len())?, zeros::<u16>(k, p.vc.len())?);
    let td = up(k, &p.tables.iter().map(|t| *t as i32).collect::<Vec<_>>())?;
    let ld = up(k, &vec![ctx as i32; batch])?;
    let mut out = zeros::<u16>(k, batch * n_kv * group * hd)?;
    let mut scratch = SplitScratch::new(k, &d)?;
    let ms = time_ms(k, 20, || {
        let kv = KvRef::Bf16 { k: &kd, v: &vd };
        launch::decode_attention_kv(k, &d, &q, kv, &td, &ld, &mut out, &mut scratch)
    })?;
    let bytes = (batch * per_seq) as f64;
    // The same sequences over an fp8 cache: half the bytes.
    let (k8, v8) = (zeros::<u8>(k, p.kc.len())?, zeros::<u8>(k, p.vc.len())?);
    let sd = up(k, &vec![1.0f32; n_kv])?;
    let kv = KvRef::Fp8 {
        k: &k8,
        v: &v8,
        k_scale: &sd,
        v_scale: &sd,
    };
    let ms8 = time_ms(k, 20, || {
        launch::decode_attention_kv(k, &d, &q, kv, &td, &ld, &mut out, &mut scratch)
    })?;
    let r = json!({"context": ctx, "batch": batch, "splits": d.num_splits, "ms": ms,
              "gb_per_s": bytes / (ms / 1e3) / 1e9,
              "fp8": {"ms": ms8, "gb_per_s": bytes / 2.0 / (ms8 / 1e3) / 1e9,
                      "speedup_vs_bf16": ms / ms8}});
    Ok(r)
}

/// The decode GEMV on EuroLLM-1.7B's layer shapes: GB/s of weights read.
fn gemv_bandwidth(
    k: &Kernels,
    rows: usize,
    cols: usize,
    tokens: usize,
) -> Result<Value, CudaError> {
    let t = launch::gemv_rows(tokens);
    let w = zeros::<u16>(k, rows * cols)?;
    let x = zeros::<u16>(k, t * cols)?;
    let mut y = zeros::<u16>(k, t * rows)?;
    let ms = time_ms(k, 20, || {
        launch::gemv(
            k,
            &w,
            launch::GemvInput::Plain(&x),
            launch::GemvOutput::Bf16(&mut y),
            tokens,
            rows,
            cols,
        )
    })?;
    let bytes = (rows * cols * 2) as f64;
    Ok(
        json!({"kernel": "gemv", "rows": rows, "cols": cols, "tokens": tokens, "us": ms * 1e3,
              "gb_per_s": bytes / (ms / 1e3) / 1e9}),
    )
}

/// The four GEMVs of a batch-1 decode step's layers (EuroLLM-1.7B's shapes: normalised
/// q|k|v 4096 x 2048, o 2048 x 2048 added to the residual, normalised gate|up 11264 x
/// 2048, SiLU'd down 2048 x 5632 added) for 24 layers, launched back to back and timed
/// as one: what programmatic dependent launch can overlap shows here. Four sets of
/// weights (376 MB, beyond L2) are cycled through.
fn gemv_chain(k: &Kernels) -> Result<Value, CudaError> {
    use launch::{GemvInput, GemvOutput};
    let (h, inter, qkv) = (2048, 5632, 4096);
    let layers = 24;
    let sets: Vec<[CudaSlice<u16>; 4]> = (0..4)
        .map(|_| {
            Ok([
                zeros::<u16>(k, qkv * h)?,
                zeros::<u16>(k, h * h)?,
                zeros::<u16>(k, 2 * inter * h)?,
                zeros::<u16>(k, h * inter)?,
            ])
        })
        .collect::<Result<_, CudaError>>()?;
    let mut residual = zeros::<f32>(k, h)?;
    let norm_w = zeros::<u16>(k, h)?;
    let mut y_qkv = zeros::<u16>(k, qkv)?;
    let attn = zeros::<u16>(k, h)?;
    let mut gate_up = zeros::<u16>(k, 2 * inter)?;
    let ms = time_ms(k, 5, || {
        for l in 0..layers {
            let w = &sets[l % sets.len()];
            let norm = GemvInput::Norm {
                residual: &residual,
                weight: &norm_w,
                eps: 1e-5,
                late: false,
            };
            launch::gemv(k, &w[0], norm, GemvOutput::Bf16(&mut y_qkv), 1, qkv, h)?;
            let out = GemvOutput::AddTo(&mut residual);
            launch::gemv(k, &w[1], GemvInput::Plain(&attn), out, 1, h, h)?;
            let norm = GemvInput::Norm {
                residual: &residual,
                weight: &norm_w,
                eps: 1e-5,
                late: false,
            };
            launch::gemv(
                k,
                &w[2],
                norm,
                GemvOutput::Bf16(&mut gate_up),
                1,
                2 * inter,
                h,
            )?;
            let out = GemvOutput::AddTo(&mut residual);
            launch::gemv(k, &w[3], GemvInput::SiluOf(&gate_up), out, 1, h, inter)?;
        }
        Ok(())
    })?;
    let bytes = (layers * (qkv * h + h * h + 2 * inter * h + h * inter) * 2) as f64;
    Ok(json!({"layers": layers, "launches": 4 * layers,
              "us_per_layer": ms * 1e3 / layers as f64, "gb_per_s": bytes / (ms / 1e3) / 1e9}))
}

/// Causal prefill of `seqs` fresh prompts of `n` tokens, 32 query / 8 KV heads, hd 128.
fn prefill_tflops(
    k: &Kernels,
    kind: PrefillKernel,
    seqs: usize,
    n: usize,
) -> Result<Value, CudaError> {
    let (nh, n_kv, hd) = (32, 8, 128);
    let lens = vec![n; seqs];
    let mut rng = Rng(2);
    let p = paged(&mut rng, &lens, n_kv, hd, false);
    let d = PrefillDims {
        num_seqs: seqs,
        max_new: n,
        n_heads: nh,
        n_kv_heads: n_kv,
        head_dim: hd,
        max_blocks: p.max_blocks,
        scale: 1.0 / (hd as f32).sqrt(),
        q_stride: nh * hd,
    };
    let q = zeros::<u16>(k, seqs * n * nh * hd)?;
    let (kd, vd) = (zeros::<u16>(k, p.kc.len())?, zeros::<u16>(k, p.vc.len())?);
    let cu: Vec<i32> = (0..=seqs).map(|i| (i * n) as i32).collect();
    let (cud, ld) = (up(k, &cu)?, up(k, &vec![n as i32; seqs])?);
    let td = up(k, &p.tables.iter().map(|t| *t as i32).collect::<Vec<_>>())?;
    let mut out = zeros::<u16>(k, seqs * n * nh * hd)?;
    let ms = time_ms(k, 10, || {
        let kv = KvRef::Bf16 { k: &kd, v: &vd };
        launch::prefill_attention_kv(k, kind, &d, &q, kv, &cud, &ld, &td, &mut out)
    })?;
    // QK^T and PV over the causal triangle: 2 matmuls x 2 flops per multiply-add.
    let pairs = (n * (n + 1) / 2) as f64;
    let flops = 4.0 * pairs * (hd * nh * seqs) as f64;
    Ok(
        json!({"kernel": prefill_name(false, kind), "seqs": seqs, "tokens": n, "ms": ms,
              "tflops": flops / (ms / 1e3) / 1e12}),
    )
}

/// The driver's CUDA version, e.g. "13.0" (the library is loaded: a context exists).
fn driver_version() -> String {
    let mut v = 0i32;
    // SAFETY: libcuda is loaded (Kernels::new succeeded); the pointer is valid.
    let rc = unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut v) };
    if rc == cudarc::driver::sys::cudaError_enum::CUDA_SUCCESS {
        format!("{}.{}", v / 1000, (v % 1000) / 10)
    } else {
        format!("unknown ({rc:?})")
    }
}

/// One run: the default designs (every kernel the worker runs unless told otherwise), or
/// with `opt_in` only experimental ones (`Some("all")`; or the one named:
/// `gemv_norm_late`, `gemv_norm_rope`, `gemv_norm_late_rope`, `pdl`, `gemv_regs` (the decode
/// GEMVs' register design, with SOV_GEMV_STAGE=regs), or a prefill design's name, e.g.
/// `prefill_attention_wgmma`, to
/// profile it alone), in a process of their own so a faulting experiment cannot poison
/// another run's CUDA context.
fn run(quick: bool, opt_in: Option<&str>) -> Result<(Value, bool), CudaError> {
    let t0 = Instant::now();
    let cache = std::env::var_os("SOV_KERNEL_CACHE")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::env::temp_dir().join("sov-kernel-cache"));
    let k = Kernels::new(0, &cache)?;
    let pdl_mode = opt_in == Some("pdl");
    if pdl_mode && !k.pdl {
        return Err(CudaError::Shape(format!(
            "--opt-in pdl needs SOV_PDL=1 in the environment and an sm_90+ GPU ({})",
            k.arch
        )));
    }
    // The decode GEMVs' register design (run 8's), measured beside the default one.
    let regs_mode = opt_in == Some("gemv_regs");
    if regs_mode && !k.gemv_regs {
        return Err(CudaError::Shape(
            "--opt-in gemv_regs needs SOV_GEMV_STAGE=regs in the environment".into(),
        ));
    }
    let name = k.ctx.name().unwrap_or_default();
    let nvrtc = kernels::cuda::nvrtc_version()
        .map(|(a, b)| format!("{a}.{b}"))
        .unwrap_or_default();
    eprintln!(
        "gpu-check: {name} ({}), {} SMs, driver CUDA {}, NVRTC {nvrtc}, kernels loaded in {:.1} s",
        k.arch,
        k.sms,
        driver_version(),
        t0.elapsed().as_secs_f64()
    );
    let mut rng = Rng(0x5eed);
    let mut checks = Vec::new();
    if opt_in.is_none() || pdl_mode {
        let contexts: &[(usize, usize)] = if quick || pdl_mode {
            &[(1, 1), (3, 300), (1, 4096)]
        } else {
            &[
                (1, 1),
                (1, 17),
                (3, 300),
                (8, 1000),
                (256, 40),
                (1, 4096),
                (2, 32768),
            ]
        };
        for hd in [64, 128] {
            for group in [1, 2, 4, 8] {
                for &(batch, ctx) in contexts {
                    // The fp8 cache with the automatic split count only (its loop is the
                    // bf16 one's, with other loads and conversions).
                    for (splits, fp8) in [(None, false), (Some(1), false), (None, true)] {
                        let c = check_decode(&k, &mut rng, hd, group, batch, ctx, splits, fp8)
                            .unwrap_or_else(|e| {
                                let shape = json!({"head_dim": hd, "group": group, "batch": batch,
                                "context": ctx, "splits": splits, "fp8": fp8});
                                failed("decode_attention", shape, &e)
                            });
                        eprintln!("  [{:.1}s] {c}", t0.elapsed().as_secs_f64());
                        checks.push(c);
                    }
                }
            }
        }
    }
    for (hd, group) in [(64, 1), (64, 4), (128, 2), (128, 8)] {
        let cases: &[(usize, usize)] = if quick {
            &[(1, 0), (77, 100)]
        } else {
            &[(1, 0), (77, 0), (130, 500), (1024, 0), (300, 2000)]
        };
        let designs = prefill_designs(&k, opt_in);
        if designs.is_empty() {
            continue;
        }
        let cs = check_prefill(&k, &designs, &mut rng, hd, group, cases).unwrap_or_else(|e| {
            let shape = json!({"head_dim": hd, "group": group, "cases_new_cached": cases});
            designs
                .iter()
                .map(|(fp8, kind)| failed(prefill_name(*fp8, *kind), shape.clone(), &e))
                .collect()
        });
        for c in cs {
            eprintln!("  [{:.1}s] {c}", t0.elapsed().as_secs_f64());
            checks.push(c);
        }
    }
    type Check = fn(&Kernels, &mut Rng) -> Result<Vec<Value>, CudaError>;
    let small: &[(&str, Check)] = match opt_in {
        Some("all") => &[
            ("gemv_norm_late", check_gemv_norm_late),
            ("gemv_norm_rope", check_gemv_norm_rope),
            ("gemv_norm_late_rope", check_gemv_norm_late_rope),
        ],
        Some("gemv_norm_late") => &[("gemv_norm_late", check_gemv_norm_late)],
        Some("gemv_norm_rope") => &[("gemv_norm_rope", check_gemv_norm_rope)],
        Some("gemv_norm_late_rope") => &[("gemv_norm_late_rope", check_gemv_norm_late_rope)],
        Some("gemv_regs") => &[("gemv", check_gemv)],
        // The PDL builds of everything a decode step launches with PDL, and their reads
        // of a predecessor's late writes.
        Some("pdl") => &[
            ("pdl_late_writes", check_pdl_late_writes),
            ("rms_norm", check_norms),
            ("gemv", check_gemv),
            ("rope_write_kv", check_rope),
            ("gemv_norm_late", check_gemv_norm_late),
            ("gemv_norm_rope", check_gemv_norm_rope),
            ("gemv_norm_late_rope", check_gemv_norm_late_rope),
        ],
        Some(_) => &[],
        None => &[
            ("rms_norm", check_norms),
            ("gemv", check_gemv),
            ("silu_and_mul+embed_rows", check_act),
            ("rope_write_kv", check_rope),
            ("argmax_rows+softmax_rows", check_sampling),
            ("topk_rows", check_topk),
        ],
    };
    for &(kernel, f) in small {
        let cs = f(&k, &mut rng).unwrap_or_else(|e| vec![failed(kernel, Value::Null, &e)]);
        for c in cs {
            eprintln!("  [{:.1}s] {c}", t0.elapsed().as_secs_f64());
            checks.push(c);
        }
    }
    let is_ok = |c: &Value| c["ok"] == json!(true);
    let all_ok = checks.iter().all(is_ok);
    eprintln!(
        "gpu-check: correctness of the {} designs {} ({} checks, {} failed), measuring…",
        opt_in.unwrap_or("default"),
        if all_ok { "ok" } else { "FAILED" },
        checks.len(),
        checks.iter().filter(|c| !is_ok(c)).count()
    );
    let copy = match copy_bandwidth(&k) {
        Ok(c) => Some(c),
        Err(e) => {
            eprintln!("  [{:.1}s] copy bandwidth: {e}", t0.elapsed().as_secs_f64());
            None
        }
    };
    let mut decode = Vec::new();
    let contexts: &[usize] = if opt_in.is_some() {
        &[]
    } else {
        &[4096, 8192, 16384, 32768]
    };
    for &ctx in contexts {
        let r = match decode_bandwidth(&k, ctx) {
            Ok(mut r) => {
                let gbs = r["gb_per_s"].as_f64().unwrap_or(0.0);
                r["fraction_of_copy"] = json!(copy.map(|c| gbs / c));
                r
            }
            Err(e) => json!({"context": ctx, "error": e.to_string()}),
        };
        eprintln!("  [{:.1}s] decode {r}", t0.elapsed().as_secs_f64());
        decode.push(r);
    }
    let mut gemv = Vec::new();
    for (rows, cols) in [(4096, 2048), (2048, 2048), (11264, 2048), (2048, 5632)] {
        let tokens: &[usize] = match opt_in {
            None => &[1, 8],
            Some("pdl") | Some("gemv_regs") => &[1],
            Some(_) => &[],
        };
        for &tokens in tokens {
            let r = match gemv_bandwidth(&k, rows, cols, tokens) {
                Ok(mut r) => {
                    let gbs = r["gb_per_s"].as_f64().unwrap_or(0.0);
                    r["fraction_of_copy"] = json!(copy.map(|c| gbs / c));
                    r
                }
                Err(e) => {
                    json!({"rows": rows, "cols": cols, "tokens": tokens, "error": e.to_string()})
                }
            };
            eprintln!("  [{:.1}s] gemv {r}", t0.elapsed().as_secs_f64());
            gemv.push(r);
        }
    }
    // A decode step's GEMVs back to back (the default run, the PDL one and the register
    // design's: side by side across the processes).
    let chain = if opt_in.is_none() || pdl_mode || regs_mode {
        let r = gemv_chain(&k).unwrap_or_else(|e| json!({"error": e.to_string()}));
        let r = match (r, copy) {
            (mut r, Some(c)) if r["gb_per_s"].is_f64() => {
                r["fraction_of_copy"] = json!(r["gb_per_s"].as_f64().unwrap_or(0.0) / c);
                r
            }
            (r, _) => r,
        };
        eprintln!("  [{:.1}s] gemv chain {r}", t0.elapsed().as_secs_f64());
        r
    } else {
        Value::Null
    };
    let peak = if name.contains("H100") || name.contains("H200") {
        Some(989.4)
    } else {
        None
    };
    let mut prefill = Vec::new();
    let timed: Vec<PrefillKernel> = prefill_designs(&k, opt_in)
        .into_iter()
        .filter(|(fp8, _)| !fp8)
        .map(|(_, kind)| kind)
        .collect();
    for (kind, seqs, n) in [(4, 2048), (2, 8192)]
        .into_iter()
        .flat_map(|(seqs, n)| timed.iter().map(move |kind| (*kind, seqs, n)))
    {
        let r = match prefill_tflops(&k, kind, seqs, n) {
            Ok(mut r) => {
                if let Some(p) = peak {
                    r["fraction_of_bf16_dense_peak"] =
                        json!(r["tflops"].as_f64().unwrap_or(0.0) / p);
                }
                r
            }
            Err(e) => {
                json!({"kernel": prefill_name(false, kind), "seqs": seqs, "tokens": n,
                       "error": e.to_string()})
            }
        };
        eprintln!("  [{:.1}s] prefill {r}", t0.elapsed().as_secs_f64());
        prefill.push(r);
    }
    let summary = json!({
        "device": name, "arch": k.arch, "sms": k.sms,
        "driver_cuda": driver_version(), "nvrtc": nvrtc,
        "designs": opt_in.unwrap_or("default"),
        "correctness": {"ok": all_ok, "checks": checks},
        "copy_bandwidth_gb_per_s": copy,
        "decode_attention": decode,
        "gemv": gemv,
        "gemv_chain": chain,
        "pdl": k.pdl,
        "bf16_dense_peak_tflops": peak,
        "prefill_attention": prefill,
        "seconds": t0.elapsed().as_secs_f64(),
    });
    Ok((summary, all_ok))
}

/// `--precompile DIR [--arch sm_90]`: every kernel source as a worker on that device
/// builds it (and the PDL builds of those with PDL code, sm_90+), compiled with NVRTC
/// into the kernel cache DIR, no GPU needed; kernels/gpu-bundle.sh ships the cache, so a
/// GPU run loads its kernels instead of compiling them in every process.
fn precompile(dir: &std::path::Path, device_arch: &str) -> Result<Value, CudaError> {
    use kernels::cuda::{SOURCES, build_arch, cached_cubin, has_pdl_code};
    let t0 = Instant::now();
    let pdl_too = device_arch
        .strip_prefix("sm_")
        .and_then(|v| v.parse::<u32>().ok())
        .is_some_and(|v| v >= 90);
    let mut built = Vec::new();
    for (name, _) in SOURCES {
        let Some(arch) = build_arch(name, device_arch) else {
            continue;
        };
        for pdl in [false, true] {
            if pdl && !(pdl_too && has_pdl_code(name)) {
                continue;
            }
            let (_, cached) = cached_cubin(dir, name, &arch, pdl)?;
            eprintln!(
                "  [{:.1}s] {name} for {arch}{}{}",
                t0.elapsed().as_secs_f64(),
                if pdl { " (PDL build)" } else { "" },
                if cached { ": already cached" } else { "" }
            );
            built.push(json!({"source": name, "arch": arch, "pdl": pdl}));
        }
    }
    Ok(
        json!({"precompiled": built, "dir": dir.display().to_string(),
              "seconds": t0.elapsed().as_secs_f64()}),
    )
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let Some(i) = args.iter().position(|a| a == "--precompile") {
        let Some(dir) = args.get(i + 1) else {
            eprintln!("gpu-check: --precompile needs a directory");
            return ExitCode::from(2);
        };
        let arch = args
            .iter()
            .position(|a| a == "--arch")
            .and_then(|j| args.get(j + 1))
            .map_or("sm_90", String::as_str);
        return match precompile(std::path::Path::new(dir), arch) {
            Ok(v) => {
                println!("{v}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                println!("{}", json!({"error": e.to_string()}));
                ExitCode::from(2)
            }
        };
    }
    let quick = args.iter().any(|a| a == "--quick");
    // `--opt-in [NAME]`: every opt-in design, or the one named.
    let opt_in = args.iter().position(|a| a == "--opt-in").map(|i| {
        args.get(i + 1)
            .filter(|n| !n.starts_with("--"))
            .cloned()
            .unwrap_or_else(|| "all".to_string())
    });
    let out = args
        .iter()
        .position(|a| a == "--out")
        .and_then(|i| args.get(i + 1))
        .cloned();
    let (summary, code) = match run(quick, opt_in.as_deref()) {
        Ok((s, ok)) => (
            s,
            if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            },
        ),
        Err(e) => (json!({"error": e.to_string()}), ExitCode::from(2)),
    };
    let text = serde_json::to_string_pretty(&summary)
        .unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"));
    println!("{text}");
    if let Some(path) = out
        && let Err(e) = std::fs::write(&path, &text)
    {
        eprintln!("gpu-check: cannot write {path}: {e}");
        return ExitCode::from(2);
    }
    code
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The sampling check passes the reference's own output and fails picks one token
    /// off, on every vocabulary it runs.
    #[test]
    fn sample_rows_judge_passes_the_reference_and_fails_a_shifted_pick() {
        let mut rng = Rng(3);
        for vocab in [20usize, 1000, 32_768, 151_936] {
            let (logits, params) = sample_rows_case(vocab, &mut rng);
            let (ids, stats) = gpu_ref::sample_rows(&logits, vocab, &params);
            let got: Vec<i32> = ids.iter().map(|&i| i as i32).collect();
            let flat: Vec<f32> = stats.iter().flat_map(|&(m, s)| [m, s]).collect();
            let v = judge_sample_rows(&logits, vocab, &params, &got, &flat);
            assert_eq!(v["ok"], json!(true), "{v}");
            assert_eq!(v["same_pick_as_reference"], json!(params.len()));
            // The aimed row lands deep in the row: many tokens are likelier.
            let row = &logits[36 * vocab..37 * vocab];
            let pick = row[ids[36] as usize];
            let likelier = row.iter().filter(|&&l| l > pick).count();
            assert!(
                likelier >= if vocab >= 1000 { 200 } else { 1 },
                "vocab {vocab}: rank {likelier}"
            );
            let shifted: Vec<i32> = got.iter().map(|&i| (i + 1) % vocab as i32).collect();
            let v = judge_sample_rows(&logits, vocab, &params, &shifted, &flat);
            assert_eq!(v["ok"], json!(false), "{v}");
        }
    }

    #[test]
    fn prefill_diagnosis_locates_the_bad_rows_heads_and_dims() {
        // Two sequences of 150 and 40 rows, 2 heads of 32 dims; sequence 0's rows 64..80
        // of head 1, dims 16..32 doubled, and one NaN in sequence 1.
        let (cu, n_heads, hd) = ([0usize, 150, 190], 2, 32);
        let want: Vec<f32> = Rng(7).f32s(190 * n_heads * hd);
        let mut got = want.clone();
        for row in 64..80 {
            for d in 16..32 {
                got[(row * n_heads + 1) * hd + d] *= 2.0;
            }
        }
        got[(160 * n_heads) * hd + 3] = f32::NAN;
        let (g, w) = (to_bf16_vec(&got), to_bf16_vec(&want));
        let v = prefill_diagnosis(&g, &w, &cu, n_heads, hd);
        // Doubling a value below the tolerance's floor can stay "close": count them.
        let doubled = (64..80)
            .flat_map(|row| (16..32).map(move |d| (row * n_heads + 1) * hd + d))
            .filter(|&i| !close(from_bf16(g[i]), from_bf16(w[i])))
            .count();
        assert!(doubled > 200, "{doubled}");
        assert_eq!(v["bad"], json!(doubled + 1), "{v}");
        assert_eq!(v["nan"], json!(1));
        assert_eq!(v["by_row_band16_of_tile128"][4], json!(doubled));
        assert_eq!(
            v["by_row_band16_of_tile128"][0],
            json!(1),
            "row 10 of sequence 1"
        );
        assert_eq!(v["by_query_tile64"][1], json!(doubled));
        assert_eq!(v["by_head"], json!([1, doubled]));
        assert_eq!(v["by_dim_band16"], json!([1, doubled]));
        assert_eq!(v["by_seq_bad_first_row"], json!([[doubled, 64], [1, 10]]));
        let ratio = v["median_abs_ratio"].as_f64().unwrap();
        assert!((ratio - 2.0).abs() < 0.05, "{ratio}");
    }
}
