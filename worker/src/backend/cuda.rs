//! The CUDA backend: the same forward pass as the CPU backend, on one NVIDIA GPU.
//!
//! Weights are dequantized to bf16 once and kept in device memory; the KV cache is bf16
//! in device memory with the CPU backend's layout (`[blocks][16][n_kv][head_dim]` per
//! layer). Matrix products are cuBLAS bf16 GEMMs with f32 accumulation; everything else
//! runs our kernels (kernels/cuda, launched through `kernels::cuda::launch`): embedding
//! lookup, fused residual + RMSNorm (the residual stream stays f32), RoPE + KV write
//! straight out of the fused q|k|v projection, paged attention (the decode kernel when
//! every chunk is one token, the tensor-core prefill kernel otherwise), SiLU-and-mul.
//! Logits of the sequences that need a sample come back to the host for the sampler.
//!
//! Semantics are the CPU backend's up to bf16 storage of weights, activations and K/V
//! (the GPU check compares every kernel with its CPU reference).

use std::ffi::c_void;
use std::path::Path;

use cudarc::cublas::{CudaBlas, result as blas, sys as blas_sys};
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DevicePtrMut, DeviceRepr, ValidAsZeroBits};
use kernels::cuda::launch::{self, DecodeDims, KvMut, PrefillDims, RopeDims, SplitScratch};
use kernels::cuda::{CudaError, Kernels};
use kernels::gpu_ref::to_bf16;
use rayon::prelude::*;

use super::kv_scales::KvScales;
use super::{Backend, BackendError, KvDtype, RowPick, RowPlan, SeqChunk, StepOutput, check_chunks};
use crate::model::{Matrix, ModelConfig, Weights};
use crate::sampler::DeviceDraw;

/// The plans as `SOV_DEVICE_SAMPLING=0` leaves them: only unpenalized greedy rows are
/// picked on the GPU, every other row goes back to the host sampler (with its draw).
fn without_device_sampling(plans: &[RowPlan]) -> Vec<RowPlan> {
    plans
        .iter()
        .map(|p| match (p.pick, &p.penalties) {
            (RowPick::Greedy, None) => RowPick::Greedy.into(),
            (RowPick::Sample(d), _) => RowPick::Host { u: d.u }.into(),
            (RowPick::Host { u }, _) => RowPick::Host { u }.into(),
            (RowPick::Greedy, Some(_)) => RowPick::Host { u: 0.0 }.into(),
        })
        .collect()
}

/// How the GPU picks a row planned as a [`RowPick`].
#[derive(Debug, Clone, Copy, PartialEq)]
enum DevicePick {
    /// `sample_rows`' (or `argmax_rows`') greedy pick.
    Greedy,
    /// `sample_rows`' dense draw.
    Dense(DeviceDraw),
    /// `topk_rows`' best `n` candidates, finished by `pick_from_ranked`.
    Ranked(DeviceDraw, usize),
    /// Not on the GPU: the row's logits go back.
    Host,
}

/// Sampled rows are drawn on the GPU when their top-k (if any) fits `topk_rows` (at most
/// `TOPK_MAX` candidates); top-p alone takes as many as `topk_rows` gives (the nucleus of
/// a real model's distribution is usually far smaller; a larger one sends the row's logits
/// back).
fn device_pick(p: &RowPick, vocab: usize) -> DevicePick {
    match *p {
        RowPick::Greedy => DevicePick::Greedy,
        RowPick::Sample(d) if !d.ranked() => DevicePick::Dense(d),
        RowPick::Sample(d) => {
            let n = if d.top_k > 0 {
                d.top_k.min(vocab)
            } else {
                vocab.min(kernels::gpu_ref::TOPK_MAX)
            };
            if n <= kernels::gpu_ref::TOPK_MAX {
                DevicePick::Ranked(d, n)
            } else {
                DevicePick::Host
            }
        }
        RowPick::Host { .. } => DevicePick::Host,
    }
}

/// Bytes one KV block takes across all layers with a bf16 cache.
pub fn kv_block_bytes_bf16(cfg: &ModelConfig, block_size: usize) -> usize {
    2 * cfg.n_layers * block_size * cfg.n_kv_heads * cfg.head_dim * 2
}

/// Bytes one KV block takes across all layers in an FP8 cache.
pub fn kv_block_bytes_fp8(cfg: &ModelConfig, block_size: usize) -> usize {
    2 * cfg.n_layers * block_size * cfg.n_kv_heads * cfg.head_dim
}

/// Every layer's K and V caches.
enum KvCaches {
    Bf16 {
        k: Vec<CudaSlice<u16>>,
        v: Vec<CudaSlice<u16>>,
    },
    /// e4m3 codes; `k_scales[layer]` and `v_scales[layer]` hold the scale of every KV
    /// head ([`super::KV_FP8_SCALE`] until [`Backend::set_kv_scales`]).
    Fp8 {
        k: Vec<CudaSlice<u8>>,
        v: Vec<CudaSlice<u8>>,
        k_scales: Vec<CudaSlice<f32>>,
        v_scales: Vec<CudaSlice<f32>>,
    },
}

impl KvCaches {
    fn layer(&mut self, li: usize) -> KvMut<'_> {
        match self {
            KvCaches::Bf16 { k, v } => KvMut::Bf16 {
                k: &mut k[li],
                v: &mut v[li],
            },
            KvCaches::Fp8 {
                k,
                v,
                k_scales,
                v_scales,
            } => KvMut::Fp8 {
                k: &mut k[li],
                v: &mut v[li],
                k_scale: &k_scales[li],
                v_scale: &v_scales[li],
            },
        }
    }
}

fn dev(e: impl std::fmt::Display) -> BackendError {
    BackendError::Device(e.to_string())
}

/// A weight matrix in device memory: row-major `[rows][cols]` bf16.
struct DevMatrix {
    data: CudaSlice<u16>,
    rows: usize,
    cols: usize,
}

struct DevLayer {
    attn_norm: CudaSlice<u16>,
    wqkv: DevMatrix,
    wo: DevMatrix,
    ffn_norm: CudaSlice<u16>,
    w_gate_up: DevMatrix,
    w_down: DevMatrix,
}

/// Step inputs on the device, grown to the largest step seen (allocated once, not per
/// step; a prerequisite for capturing decode steps in CUDA graphs).
struct StepMeta {
    ids: CudaSlice<i32>,
    positions: CudaSlice<i32>,
    slots: CudaSlice<i32>,
    cu_q: CudaSlice<i32>,
    lens: CudaSlice<i32>,
    tables: CudaSlice<i32>,
    /// Rows that need logits, packed, and their logits.
    sel: CudaSlice<u16>,
    logits: CudaSlice<f32>,
    /// Token ids picked on the GPU for greedy and sampled rows.
    picked: CudaSlice<i32>,
    /// Sampled rows' draws: `sample_rows`' parameters (4 a row) and per-row statistics
    /// (maximum, weight sum), `topk_rows`' candidates (logits and ids, `top` a row).
    sample_params: CudaSlice<f32>,
    sample_stats: CudaSlice<f32>,
    top_logits: CudaSlice<f32>,
    top_ids: CudaSlice<i32>,
    /// Rows with penalties: the logits with them applied, and `apply_penalties`'
    /// entries ((row, token) pairs, amounts) and per-row repetition penalties.
    pen_logits: CudaSlice<f32>,
    pen_ids: CudaSlice<i32>,
    pen_subtract: CudaSlice<f32>,
    pen_rep: CudaSlice<f32>,
    split: SplitScratch,
    /// What was last copied into ids, positions, slots, cu_q, lens and tables: a buffer
    /// whose contents would not change is not copied again (a decode step's cu_q, and its
    /// block tables between new blocks).
    uploaded: [Vec<i32>; 6],
}

/// Grows `slot` to hold at least `n` elements (contents are not kept); a new buffer
/// bumps `epoch` (captured graphs hold the old address).
fn grow<T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits>(
    stream: &std::sync::Arc<cudarc::driver::CudaStream>,
    slot: &mut CudaSlice<T>,
    n: usize,
    epoch: &mut u64,
) -> Result<(), BackendError> {
    if slot.len() < n {
        *slot = stream
            .alloc_zeros::<T>(n.next_power_of_two())
            .map_err(dev)?;
        *epoch += 1;
    }
    Ok(())
}

/// A decode step captured as a CUDA graph, valid while no step buffer is reallocated.
struct DecodeGraph {
    graph: cudarc::driver::CudaGraph,
    epoch: u64,
}

/// A captured graph's dependency edges: (all, programmatic). Programmatic edges are what
/// PDL launches become under stream capture (CUDA 12.3+); with `SOV_PDL=1` their count
/// says whether the decode graph overlaps its kernels at all.
fn graph_edges(g: &cudarc::driver::CudaGraph) -> Result<(usize, usize), BackendError> {
    use cudarc::driver::sys;
    let mut n = 0usize;
    // SAFETY: a live graph; null arrays ask for the count only.
    unsafe {
        sys::cuGraphGetEdges_v2(
            g.cu_graph(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            &mut n,
        )
    }
    .result()
    .map_err(dev)?;
    let mut from = vec![std::ptr::null_mut(); n];
    let mut to = vec![std::ptr::null_mut(); n];
    // SAFETY: plain C data; zero is a valid (default) edge.
    let mut data: Vec<sys::CUgraphEdgeData> = vec![unsafe { std::mem::zeroed() }; n];
    let mut got = n;
    // SAFETY: each array holds `n` entries, as `got` says.
    unsafe {
        sys::cuGraphGetEdges_v2(
            g.cu_graph(),
            from.as_mut_ptr(),
            to.as_mut_ptr(),
            data.as_mut_ptr(),
            &mut got,
        )
    }
    .result()
    .map_err(dev)?;
    let programmatic = data[..got.min(n)]
        .iter()
        .filter(|e| {
            e.type_ == sys::CUgraphDependencyType::CU_GRAPH_DEPENDENCY_TYPE_PROGRAMMATIC as u8
        })
        .count();
    Ok((got.min(n), programmatic))
}

// SAFETY: a CudaGraph is only used through `&mut CudaBackend`, so never from two threads
// at once (CUDA requires graph calls to be serialised, not to stay on one thread).
unsafe impl Send for DecodeGraph {}

/// Most graphs kept (one per batch size and split count); beyond it they are dropped.
const MAX_GRAPHS: usize = 64;

/// Steps of at most this many tokens take the fused GEMV path. Measured on an H200 with
/// EuroLLM-1.7B's shapes: at 1 token it beats cuBLAS; at 8 the GEMV re-reads each CTA's
/// inputs from L2 so often that cuBLAS's tiles win (2.8k vs 1.7k tok/s at batch 8).
const FUSED_MAX_TOKENS: usize = 2;

/// Decode steps of at most this many sequences are replayed as graphs.
const GRAPH_MAX_SEQS: usize = 64;

/// cuBLAS workspace: set explicitly so GEMMs captured into a graph allocate nothing.
const CUBLAS_WORKSPACE_BYTES: usize = 32 << 20;

/// Per-step buffers, grown to the largest step seen.
struct StepBuffers {
    tokens: usize,
    residual: CudaSlice<f32>,
    proj: CudaSlice<u16>,
    xn: CudaSlice<u16>,
    qkv: CudaSlice<u16>,
    attn: CudaSlice<u16>,
    gate_up: CudaSlice<u16>,
    act: CudaSlice<u16>,
}

pub struct CudaBackend {
    cfg: ModelConfig,
    k: Kernels,
    blas: CudaBlas,
    ordinal: usize,
    embed: CudaSlice<u16>,
    layers: Vec<DevLayer>,
    final_norm: CudaSlice<u16>,
    output: DevMatrix,
    kv: KvCaches,
    num_blocks: usize,
    block_size: usize,
    cos: CudaSlice<f32>,
    sin: CudaSlice<f32>,
    max_pos: usize,
    bufs: Option<StepBuffers>,
    meta: StepMeta,
    /// Decode steps of up to `GRAPH_MAX_SEQS` sequences replay captured graphs, keyed by
    /// (sequences, KV splits, block-table stride); `SOV_CUDA_GRAPHS=0` turns them off.
    graphs: std::collections::HashMap<(usize, usize, usize), DecodeGraph>,
    use_graphs: bool,
    /// The prefill-attention design: the wgmma one on Hopper, else the pipelined one (an
    /// FP8 cache: the basic one); `SOV_PREFILL_KERNEL=basic|pipelined|wgmma|wgmma_ov|wgmma_ws|
    /// wgmma_pp|wgmma_pp128|wgmma_tma` picks one.
    prefill_kind: launch::PrefillKernel,
    /// The fused path's normalising GEMVs apply the norm after the sum
    /// (`SOV_GEMV_NORM=late`, experimental: `gemv_norm_late_t*`, no prologue before the
    /// weight loads).
    gemv_norm_late: bool,
    /// RoPE + KV write in the q|k|v GEMV's epilogue (`SOV_GEMV_ROPE=1`, bf16 cache,
    /// experimental: one kernel less a layer); every RoPE launch then rotates
    /// interleaved pairs (half-style q/k weight rows were permuted at load). With
    /// `SOV_GEMV_NORM=late` too, that GEMV applies the norm late as well.
    gemv_rope: bool,
    /// Sampled and penalized rows picked on the GPU (`sample_rows`, `topk_rows`,
    /// `apply_penalties`); `SOV_DEVICE_SAMPLING=0` sends their logits back to the host
    /// sampler instead (greedy rows without penalties are still picked by `argmax_rows`).
    device_sampling: bool,
    /// Batch sizes whose capture failed: they run without a graph.
    ungraphable: std::collections::HashSet<usize>,
    _blas_workspace: CudaSlice<u8>,
    /// Bumped whenever a step buffer is reallocated.
    epoch: u64,
}

/// One zeroed `elems`-long cache per layer.
fn zeroed_layers<T: DeviceRepr + ValidAsZeroBits>(
    s: &std::sync::Arc<CudaStream>,
    n_layers: usize,
    elems: usize,
) -> Result<Vec<CudaSlice<T>>, BackendError> {
    (0..n_layers)
        .map(|_| s.alloc_zeros::<T>(elems).map_err(dev))
        .collect()
}

fn bf16_rows(m: &Matrix) -> Vec<u16> {
    let mut out = vec![0u16; m.rows * m.cols];
    out.par_chunks_mut(m.cols).enumerate().for_each_init(
        || vec![0.0f32; m.cols],
        |row, (r, dst)| {
            m.dequantize_row(r, row);
            for (d, v) in dst.iter_mut().zip(row.iter()) {
                *d = to_bf16(*v);
            }
        },
    );
    out
}

impl CudaBackend {
    /// Loads the model onto GPU `ordinal` with `num_blocks` KV blocks stored as `kv_dtype`
    /// says (bf16, or e4m3 codes). Kernels are compiled (or taken from `kernel_cache`) for
    /// the device's architecture.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        cfg: ModelConfig,
        weights: &Weights,
        ordinal: usize,
        num_blocks: usize,
        block_size: usize,
        kv_dtype: KvDtype,
        kernel_cache: &Path,
    ) -> Result<Self, BackendError> {
        if block_size != 16 {
            return Err(dev(format!(
                "the CUDA kernels use 16-token KV blocks, not {block_size}"
            )));
        }
        if !matches!(cfg.head_dim, 64 | 96 | 128) {
            return Err(dev(format!(
                "head_dim {} (the CUDA kernels support 64, 96, 128)",
                cfg.head_dim
            )));
        }
        let group = cfg.n_heads / cfg.n_kv_heads.max(1);
        if !matches!(group, 1 | 2 | 3 | 4 | 8) || !cfg.n_heads.is_multiple_of(cfg.n_kv_heads.max(1))
        {
            return Err(dev(format!(
                "{} query heads over {} KV heads (the CUDA kernels support GQA groups 1, 2, 3, 4, 8)",
                cfg.n_heads, cfg.n_kv_heads
            )));
        }
        if !cfg.hidden.is_multiple_of(8) || !cfg.intermediate.is_multiple_of(8) {
            return Err(dev("hidden and intermediate sizes must be multiples of 8"));
        }
        if weights.layers.iter().any(|l| l.bqkv.is_some()) {
            return Err(dev(
                "q/k/v biases are not supported by the CUDA backend yet",
            ));
        }
        let k = Kernels::new(ordinal, kernel_cache).map_err(dev)?;
        // cudarc panics on the first call into a library it cannot load: check first.
        // SAFETY: only tries to dlopen libcublas and drops the handle.
        if !unsafe { cudarc::cublas::sys::is_culib_present() } {
            return Err(dev(
                "no cuBLAS: libcublas (CUDA 13) could not be loaded; install the CUDA 13 toolkit or put libcublas.so.13 on LD_LIBRARY_PATH",
            ));
        }
        let blas = CudaBlas::new(k.stream.clone()).map_err(dev)?;
        let blas_workspace = k
            .stream
            .alloc_zeros::<u8>(CUBLAS_WORKSPACE_BYTES)
            .map_err(dev)?;
        {
            let (ptr, _sync) = blas_workspace.device_ptr(&k.stream);
            // SAFETY: the workspace lives as long as the handle (both are fields of the
            // backend) and is used only by this handle's stream.
            let rc = unsafe {
                blas_sys::cublasSetWorkspace_v2(
                    *blas.handle(),
                    ptr as *mut c_void,
                    CUBLAS_WORKSPACE_BYTES,
                )
            };
            if rc != blas_sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
                return Err(dev(format!("cublasSetWorkspace: {rc:?}")));
            }
        }
        let s = &k.stream;
        let upm = |m: &Matrix| -> Result<DevMatrix, BackendError> {
            Ok(DevMatrix {
                data: s.clone_htod(&bf16_rows(m)).map_err(dev)?,
                rows: m.rows,
                cols: m.cols,
            })
        };
        let upv = |v: &[f32]| -> Result<CudaSlice<u16>, BackendError> {
            s.clone_htod(&v.iter().map(|x| to_bf16(*x)).collect::<Vec<u16>>())
                .map_err(dev)
        };
        // `SOV_GEMV_ROPE=1` (experimental, bf16 cache): RoPE and the KV write run in the
        // q|k|v GEMV's epilogue, which rotates interleaved pairs; half-style models get
        // their q and k weight rows permuted into that order (attention scores do not
        // see the order: `gpu_ref::half_to_interleaved_order`), and every RoPE launch
        // then rotates interleaved pairs.
        let gemv_rope = std::env::var("SOV_GEMV_ROPE").is_ok_and(|v| v == "1")
            && matches!(kv_dtype, KvDtype::Auto);
        let permute_qk = gemv_rope && cfg.rope_style == kernels::cpu::RopeStyle::Half;
        let up_qkv = |m: &Matrix| -> Result<DevMatrix, BackendError> {
            if !permute_qk {
                return upm(m);
            }
            let rows = kernels::gpu_ref::interleave_qk_rows(
                &bf16_rows(m),
                m.cols,
                cfg.n_heads,
                cfg.n_kv_heads,
                cfg.head_dim,
                cfg.rope_dim,
            );
            Ok(DevMatrix {
                data: s.clone_htod(&rows).map_err(dev)?,
                rows: m.rows,
                cols: m.cols,
            })
        };
        let mut layers = Vec::with_capacity(weights.layers.len());
        for l in &weights.layers {
            layers.push(DevLayer {
                attn_norm: upv(&l.attn_norm)?,
                wqkv: up_qkv(&l.wqkv)?,
                wo: upm(&l.wo)?,
                ffn_norm: upv(&l.ffn_norm)?,
                w_gate_up: upm(&l.w_gate_up)?,
                w_down: upm(&l.w_down)?,
            });
        }
        let embed = upm(&weights.embed)?.data;
        let output = upm(&weights.output)?;
        let final_norm = upv(&weights.final_norm)?;
        let elems = num_blocks * block_size * cfg.n_kv_heads * cfg.head_dim;
        let kv = match kv_dtype {
            KvDtype::Auto => KvCaches::Bf16 {
                k: zeroed_layers(s, cfg.n_layers, elems)?,
                v: zeroed_layers(s, cfg.n_layers, elems)?,
            },
            KvDtype::Fp8 => {
                let ones = vec![super::KV_FP8_SCALE; cfg.n_kv_heads];
                let scales = || -> Result<Vec<CudaSlice<f32>>, BackendError> {
                    (0..cfg.n_layers)
                        .map(|_| s.clone_htod(&ones).map_err(dev))
                        .collect()
                };
                KvCaches::Fp8 {
                    k: zeroed_layers(s, cfg.n_layers, elems)?,
                    v: zeroed_layers(s, cfg.n_layers, elems)?,
                    k_scales: scales()?,
                    v_scales: scales()?,
                }
            }
        };
        // cos/sin for every position: [max_pos][rope_dim / 2], as the CPU RopeTable.
        let inv = cfg.rope_inv_freq();
        let max_pos = cfg.max_context;
        let (mut cos, mut sin) = (
            Vec::with_capacity(max_pos * inv.len()),
            Vec::with_capacity(max_pos * inv.len()),
        );
        for p in 0..max_pos {
            for f in &inv {
                let th = p as f64 * f;
                cos.push(th.cos() as f32);
                sin.push(th.sin() as f32);
            }
        }
        let z32 = || s.alloc_zeros::<i32>(1).map_err(dev);
        let meta = StepMeta {
            ids: z32()?,
            positions: z32()?,
            slots: z32()?,
            cu_q: z32()?,
            lens: z32()?,
            tables: z32()?,
            sel: s.alloc_zeros::<u16>(1).map_err(dev)?,
            logits: s.alloc_zeros::<f32>(1).map_err(dev)?,
            picked: z32()?,
            sample_params: s.alloc_zeros::<f32>(1).map_err(dev)?,
            sample_stats: s.alloc_zeros::<f32>(1).map_err(dev)?,
            top_logits: s.alloc_zeros::<f32>(1).map_err(dev)?,
            top_ids: z32()?,
            pen_logits: s.alloc_zeros::<f32>(1).map_err(dev)?,
            pen_ids: z32()?,
            pen_subtract: s.alloc_zeros::<f32>(1).map_err(dev)?,
            pen_rep: s.alloc_zeros::<f32>(1).map_err(dev)?,
            split: SplitScratch {
                part_out: s.alloc_zeros::<f32>(1).map_err(dev)?,
                part_ml: s.alloc_zeros::<f32>(1).map_err(dev)?,
            },
            uploaded: Default::default(),
        };
        Ok(Self {
            meta,
            cos: s.clone_htod(&cos).map_err(dev)?,
            sin: s.clone_htod(&sin).map_err(dev)?,
            cfg,
            blas,
            ordinal,
            embed,
            layers,
            final_norm,
            output,
            kv,
            num_blocks,
            block_size,
            max_pos,
            bufs: None,
            k,
            graphs: std::collections::HashMap::new(),
            use_graphs: std::env::var("SOV_CUDA_GRAPHS").map_or(true, |v| v != "0"),
            ungraphable: std::collections::HashSet::new(),
            device_sampling: std::env::var("SOV_DEVICE_SAMPLING").map_or(true, |v| v != "0"),
            prefill_kind: launch::PrefillKernel::from_env(),
            gemv_norm_late: std::env::var("SOV_GEMV_NORM").is_ok_and(|v| v == "late"),
            gemv_rope,
            _blas_workspace: blas_workspace,
            epoch: 0,
        })
    }

    fn buffers(&mut self, tokens: usize) -> Result<(), BackendError> {
        if self.bufs.as_ref().is_some_and(|b| b.tokens >= tokens) {
            return Ok(());
        }
        let c = &self.cfg;
        let t = tokens.next_power_of_two().max(16);
        let qkv_dim = (c.n_heads + 2 * c.n_kv_heads) * c.head_dim;
        let s = &self.k.stream;
        self.epoch += 1;
        self.bufs = Some(StepBuffers {
            tokens: t,
            residual: s.alloc_zeros(t * c.hidden).map_err(dev)?,
            proj: s.alloc_zeros(t * c.hidden).map_err(dev)?,
            xn: s.alloc_zeros(t * c.hidden).map_err(dev)?,
            qkv: s.alloc_zeros(t * qkv_dim).map_err(dev)?,
            attn: s.alloc_zeros(t * c.n_heads * c.head_dim).map_err(dev)?,
            gate_up: s.alloc_zeros(t * 2 * c.intermediate).map_err(dev)?,
            act: s.alloc_zeros(t * c.intermediate).map_err(dev)?,
        });
        Ok(())
    }

    /// `y[t][r] = sum_c w[r][c] * x[t][c]` for `tokens` rows: one cuBLAS GEMM, bf16
    /// inputs, f32 accumulation, output type `c_type` (bf16 activations or f32 logits).
    fn gemm<Y>(
        blas: &CudaBlas,
        stream: &std::sync::Arc<cudarc::driver::CudaStream>,
        w: &DevMatrix,
        x: &CudaSlice<u16>,
        tokens: usize,
        y: &mut CudaSlice<Y>,
        c_type: blas_sys::cudaDataType,
    ) -> Result<(), BackendError> {
        let (alpha, beta) = (1.0f32, 0.0f32);
        let int = |v: usize| i32::try_from(v).map_err(|_| dev(format!("GEMM size {v} too large")));
        let (m, n, k) = (int(w.rows)?, int(tokens)?, int(w.cols)?);
        let (wp, _w) = w.data.device_ptr(stream);
        let (xp, _x) = x.device_ptr(stream);
        let (yp, _y) = y.device_ptr_mut(stream);
        // Row-major Y[T][out] is column-major out x T: Y = W^T(col-major in x out) * X.
        // SAFETY: the pointers are live device buffers of at least the GEMM's extent
        // (buffers are sized for `tokens` rows, weights for rows x cols); alpha/beta are
        // host f32 as the default pointer mode and compute type 32F expect.
        unsafe {
            blas::gemm_ex(
                *blas.handle(),
                blas_sys::cublasOperation_t::CUBLAS_OP_T,
                blas_sys::cublasOperation_t::CUBLAS_OP_N,
                m,
                n,
                k,
                (&alpha as *const f32).cast::<c_void>(),
                wp as *const c_void,
                blas_sys::cudaDataType::CUDA_R_16BF,
                k,
                xp as *const c_void,
                blas_sys::cudaDataType::CUDA_R_16BF,
                k,
                (&beta as *const f32).cast::<c_void>(),
                yp as *mut c_void,
                c_type,
                m,
                blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(dev)
    }

    /// One step; `plans` as in [`Backend::forward_step`] (empty: every row's logits).
    fn forward_inner(
        &mut self,
        chunks: &[SeqChunk<'_>],
        t: usize,
        plans: &[RowPlan],
    ) -> Result<StepOutput, BackendError> {
        self.buffers(t)?;
        let cfg = self.cfg.clone();
        let (h, hd) = (cfg.hidden, cfg.head_dim);
        let (q_dim, kv_dim) = (cfg.n_heads * hd, cfg.n_kv_heads * hd);
        let qkv_dim = q_dim + 2 * kv_dim;
        let bs = self.block_size;
        let all_decode = chunks.iter().all(|c| c.tokens.len() == 1);
        let graph =
            self.use_graphs && all_decode && t <= GRAPH_MAX_SEQS && !self.ungraphable.contains(&t);
        // Host-side step description. A graphed step's block tables have a fixed stride
        // (the longest context's block count), so the captured kernels fit every step.
        let mut ids = Vec::with_capacity(t);
        let mut positions = Vec::with_capacity(t);
        let mut slots = Vec::with_capacity(t);
        let mut cu_q = vec![0i32];
        let mut lens = Vec::with_capacity(chunks.len());
        let longest = chunks
            .iter()
            .map(|c| c.block_table.len())
            .max()
            .unwrap_or(1)
            .max(1);
        // A table longer than the model's context needs (never expected) gets its own
        // stride, and so its own graph: the stride is part of the graph's key.
        let max_blocks = if graph {
            longest.max(self.max_pos.div_ceil(bs))
        } else {
            longest
        };
        let mut tables = vec![0i32; chunks.len() * max_blocks];
        for (i, c) in chunks.iter().enumerate() {
            for (j, &tok) in c.tokens.iter().enumerate() {
                let pos = c.start + j;
                ids.push(tok as i32);
                positions.push(pos as i32);
                slots.push((c.block_table[pos / bs] as usize * bs + pos % bs) as i32);
            }
            cu_q.push(cu_q[i] + c.tokens.len() as i32);
            lens.push((c.start + c.tokens.len()) as i32);
            for (j, b) in c.block_table.iter().enumerate() {
                tables[i * max_blocks + j] = *b as i32;
            }
        }
        let s = self.k.stream.clone();
        let mut epoch = self.epoch;
        let m = &mut self.meta;
        let StepMeta {
            ids: ids_d,
            positions: positions_d,
            slots: slots_d,
            cu_q: cu_q_d,
            lens: lens_d,
            tables: tables_d,
            uploaded,
            ..
        } = m;
        for ((dst, src), last) in [
            (ids_d, &ids),
            (positions_d, &positions),
            (slots_d, &slots),
            (cu_q_d, &cu_q),
            (lens_d, &lens),
            (tables_d, &tables),
        ]
        .into_iter()
        .zip(uploaded.iter_mut())
        {
            let before = epoch;
            grow(&s, dst, src.len(), &mut epoch)?;
            // A reallocated buffer holds zeros: it is always filled.
            if epoch == before && last == src {
                continue;
            }
            s.memcpy_htod(src, dst).map_err(dev)?;
            last.clone_from(src);
        }
        let max_len = lens.iter().copied().max().unwrap_or(1) as usize;
        let scale = 1.0 / (hd as f32).sqrt();
        let shapes = StepShapes {
            t,
            all_decode,
            decode: DecodeDims {
                num_seqs: chunks.len(),
                n_kv_heads: cfg.n_kv_heads,
                group: cfg.n_heads / cfg.n_kv_heads,
                head_dim: hd,
                max_blocks,
                num_splits: launch::decode_splits(
                    chunks.len(),
                    cfg.n_kv_heads,
                    max_len,
                    self.k.sms,
                ),
                scale,
                q_stride: qkv_dim,
            },
            prefill: PrefillDims {
                num_seqs: chunks.len(),
                max_new: chunks.iter().map(|c| c.tokens.len()).max().unwrap_or(1),
                n_heads: cfg.n_heads,
                n_kv_heads: cfg.n_kv_heads,
                head_dim: hd,
                max_blocks,
                scale,
                q_stride: qkv_dim,
            },
            prefill_kind: self.prefill_kind,
            rope: RopeDims {
                tokens: t,
                n_heads: cfg.n_heads,
                n_kv_heads: cfg.n_kv_heads,
                head_dim: hd,
                rot_dim: cfg.rope_dim,
                style: match cfg.rope_style {
                    _ if self.gemv_rope => 0,
                    kernels::cpu::RopeStyle::Interleaved => 0,
                    kernels::cpu::RopeStyle::Half => 1,
                },
                qkv_stride: qkv_dim,
            },
        };
        let heads = shapes.decode.num_seqs * cfg.n_heads * shapes.decode.num_splits;
        grow(&s, &mut m.split.part_out, heads * hd, &mut epoch)?;
        grow(&s, &mut m.split.part_ml, heads * 2, &mut epoch)?;
        let want_rows = chunks.iter().filter(|c| c.want_logits).count();
        grow(&s, &mut m.sel, want_rows * h, &mut epoch)?;
        grow(&s, &mut m.logits, want_rows * cfg.vocab_size, &mut epoch)?;
        grow(&s, &mut m.picked, want_rows, &mut epoch)?;
        self.epoch = epoch;
        if graph {
            if let Err(e) = self.replay_step(&shapes) {
                // A capture that fails (e.g. a library call that cannot be captured)
                // leaves this batch size to eager launches from now on.
                tracing::warn!(batch = t, error = %e, "decode step not captured as a CUDA graph; running it without");
                self.ungraphable.insert(t);
                self.enqueue_step(&shapes)?;
            }
        } else {
            self.enqueue_step(&shapes)?;
        }
        // The rows that need logits (each wanted chunk's last token), packed.
        let mut rows = Vec::new();
        for (i, c) in chunks.iter().enumerate() {
            if c.want_logits {
                rows.push(cu_q[i + 1] as usize - 1);
            }
        }
        if rows.is_empty() {
            return Ok(StepOutput::default());
        }
        let b = self
            .bufs
            .as_ref()
            .ok_or_else(|| dev("step buffers missing"))?;
        let m = &mut self.meta;
        // `sel` and `logits` were grown for `want_rows` rows above. A decode step wants
        // rows 0, 1, ... of `xn` itself: no gathering copy then.
        let gathered = rows.iter().enumerate().any(|(j, &r)| j != r);
        if gathered {
            for (j, &r) in rows.iter().enumerate() {
                let src = b.xn.slice(r * h..(r + 1) * h);
                let mut dst = m.sel.slice_mut(j * h..(j + 1) * h);
                s.memcpy_dtod(&src, &mut dst).map_err(dev)?;
            }
        }
        Self::gemm(
            &self.blas,
            &s,
            &self.output,
            if gathered { &m.sel } else { &b.xn },
            rows.len(),
            &mut m.logits,
            blas_sys::cudaDataType::CUDA_R_32F,
        )?;
        let vocab = cfg.vocab_size;
        // Rows with penalties are picked from a copy of the logits with the penalties
        // applied; the rows that go back to the host stay as the model computed them (the
        // sampler applies the penalties itself).
        let penalized = plans.iter().take(rows.len()).any(|p| p.penalties.is_some());
        if penalized {
            Self::apply_penalties(&self.k, m, plans, rows.len(), vocab)?;
        }
        if plans.len() == rows.len() && plans.iter().all(|p| p.pick == RowPick::Greedy) {
            // Every row is greedy: pick on the GPU and copy back one id a row instead of
            // the logits (512 KB a row for a 128k vocabulary).
            let src = if penalized { &m.pen_logits } else { &m.logits };
            launch::argmax_rows(&self.k, src, &mut m.picked, rows.len(), vocab).map_err(dev)?;
            let mut ids = vec![0i32; rows.len()];
            s.memcpy_dtoh(&m.picked.slice(0..rows.len()), &mut ids)
                .map_err(dev)?;
            s.synchronize().map_err(dev)?;
            return Ok(StepOutput {
                picked: ids.iter().map(|&i| Some(i as u32)).collect(),
                logits: Vec::new(),
            });
        }
        let picks: Vec<RowPick> = plans.iter().map(|p| p.pick).collect();
        let picked = if picks
            .iter()
            .any(|p| device_pick(p, vocab) != DevicePick::Host)
        {
            Self::pick_on_device(&self.k, m, &picks, rows.len(), vocab, penalized)?
        } else {
            vec![None; rows.len()]
        };
        // The logits of the rows not picked, one copy a row.
        let keep: Vec<usize> = (0..rows.len()).filter(|&i| picked[i].is_none()).collect();
        let mut host = vec![0f32; keep.len() * vocab];
        for (j, &i) in keep.iter().enumerate() {
            s.memcpy_dtoh(
                &m.logits.slice(i * vocab..(i + 1) * vocab),
                &mut host[j * vocab..(j + 1) * vocab],
            )
            .map_err(dev)?;
        }
        s.synchronize().map_err(dev)?;
        Ok(StepOutput {
            picked,
            logits: host,
        })
    }

    /// Copies the step's logits to `m.pen_logits` and applies the rows' penalties there
    /// (`apply_penalties`: one launch for every entry of every row).
    fn apply_penalties(
        k: &Kernels,
        m: &mut StepMeta,
        plans: &[RowPlan],
        rows: usize,
        vocab: usize,
    ) -> Result<(), BackendError> {
        let s = &k.stream;
        let mut unused_epoch = 0;
        grow(s, &mut m.pen_logits, rows * vocab, &mut unused_epoch)?;
        let (src, mut dst) = (
            m.logits.slice(0..rows * vocab),
            m.pen_logits.slice_mut(0..rows * vocab),
        );
        s.memcpy_dtod(&src, &mut dst).map_err(dev)?;
        let (mut ids, mut subtract) = (Vec::new(), Vec::new());
        let mut rep = vec![1f32; rows];
        for (row, plan) in plans.iter().take(rows).enumerate() {
            let Some(pen) = &plan.penalties else {
                continue;
            };
            rep[row] = pen.repetition;
            for &(tok, sub) in &pen.entries {
                // The sampler lists each token once and only tokens of the vocabulary.
                if (tok as usize) < vocab {
                    ids.extend([row as i32, tok as i32]);
                    subtract.push(sub);
                }
            }
        }
        let n = subtract.len();
        if n == 0 {
            return Ok(());
        }
        grow(s, &mut m.pen_ids, 2 * n, &mut unused_epoch)?;
        grow(s, &mut m.pen_subtract, n, &mut unused_epoch)?;
        grow(s, &mut m.pen_rep, rows, &mut unused_epoch)?;
        s.memcpy_htod(&ids, &mut m.pen_ids).map_err(dev)?;
        s.memcpy_htod(&subtract, &mut m.pen_subtract).map_err(dev)?;
        s.memcpy_htod(&rep, &mut m.pen_rep).map_err(dev)?;
        launch::apply_penalties(
            k,
            &mut m.pen_logits,
            vocab,
            &m.pen_ids,
            &m.pen_subtract,
            &m.pen_rep,
            n,
        )
        .map_err(dev)
    }

    /// Picks the greedy and device-drawable sampled rows of `m.logits` on the GPU: one
    /// `sample_rows` launch for all rows (greedy rows and rows left to the host get the
    /// greedy pick, the latter ignored), and for top-k / top-p rows `topk_rows`'
    /// candidates, which `pick_from_ranked` finishes on the host (a nucleus beyond them:
    /// `None`, the row's logits go back to the sampler). Copies back one id and two
    /// statistics a row, and the candidates when there are ranked rows.
    fn pick_on_device(
        k: &Kernels,
        m: &mut StepMeta,
        picks: &[RowPick],
        rows: usize,
        vocab: usize,
        penalized: bool,
    ) -> Result<Vec<Option<u32>>, BackendError> {
        let s = &k.stream;
        let StepMeta {
            logits, pen_logits, ..
        } = m;
        let src: &CudaSlice<f32> = if penalized { pen_logits } else { logits };
        let kinds: Vec<DevicePick> = (0..rows)
            .map(|i| {
                picks
                    .get(i)
                    .map_or(DevicePick::Host, |p| device_pick(p, vocab))
            })
            .collect();
        let params: Vec<kernels::gpu_ref::SampleParams> = kinds
            .iter()
            .map(|kind| match *kind {
                DevicePick::Dense(d) | DevicePick::Ranked(d, _) => kernels::gpu_ref::SampleParams {
                    inv_t: 1.0 / d.temperature,
                    // Min-p over ranked candidates is applied on the host.
                    min_w: if d.ranked() { 0.0 } else { d.min_p },
                    u: d.u,
                },
                // Greedy (the rows left to the host get it too, ignored).
                _ => kernels::gpu_ref::SampleParams {
                    inv_t: 0.0,
                    min_w: 0.0,
                    u: 0.0,
                },
            })
            .collect();
        // Scratch outside the graphs: growing it need not invalidate them.
        let mut unused_epoch = 0;
        grow(s, &mut m.sample_params, rows * 4, &mut unused_epoch)?;
        grow(s, &mut m.sample_stats, rows * 2, &mut unused_epoch)?;
        s.memcpy_htod(
            &kernels::gpu_ref::SampleParams::to_device(&params),
            &mut m.sample_params,
        )
        .map_err(dev)?;
        launch::sample_rows(
            k,
            src,
            &m.sample_params,
            &mut m.picked,
            &mut m.sample_stats,
            rows,
            vocab,
        )
        .map_err(dev)?;
        let top = kinds
            .iter()
            .filter_map(|kind| match kind {
                DevicePick::Ranked(_, n) => Some(*n),
                _ => None,
            })
            .max()
            .unwrap_or(0);
        if top > 0 {
            grow(s, &mut m.top_logits, rows * top, &mut unused_epoch)?;
            grow(s, &mut m.top_ids, rows * top, &mut unused_epoch)?;
            launch::topk_rows(k, src, &mut m.top_logits, &mut m.top_ids, rows, vocab, top)
                .map_err(dev)?;
        }
        let mut ids = vec![0i32; rows];
        let mut stats = vec![0f32; rows * 2];
        s.memcpy_dtoh(&m.picked.slice(0..rows), &mut ids)
            .map_err(dev)?;
        s.memcpy_dtoh(&m.sample_stats.slice(0..rows * 2), &mut stats)
            .map_err(dev)?;
        let (mut top_logits, mut top_ids) = (vec![0f32; rows * top], vec![0i32; rows * top]);
        if top > 0 {
            s.memcpy_dtoh(&m.top_logits.slice(0..rows * top), &mut top_logits)
                .map_err(dev)?;
            s.memcpy_dtoh(&m.top_ids.slice(0..rows * top), &mut top_ids)
                .map_err(dev)?;
        }
        s.synchronize().map_err(dev)?;
        Ok((0..rows)
            .map(|i| match kinds[i] {
                DevicePick::Greedy | DevicePick::Dense(_) => Some(ids[i] as u32),
                DevicePick::Ranked(d, _) => {
                    let cands: Vec<(f32, u32)> = top_logits[i * top..(i + 1) * top]
                        .iter()
                        .zip(&top_ids[i * top..(i + 1) * top])
                        .map(|(&l, &id)| (l, id as u32))
                        .collect();
                    let weight_sum = f64::from(stats[2 * i + 1]);
                    crate::sampler::pick_from_ranked(&d, &cands, weight_sum, vocab)
                }
                DevicePick::Host => None,
            })
            .collect())
    }

    /// Launches a graphed decode step, capturing it first when no graph of this shape is
    /// valid (a step buffer was reallocated since, or none was captured yet).
    fn replay_step(&mut self, shapes: &StepShapes) -> Result<(), BackendError> {
        use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
        let d = &shapes.decode;
        let key = (d.num_seqs, d.num_splits, d.max_blocks);
        let fresh = self.graphs.get(&key).is_some_and(|g| g.epoch == self.epoch);
        if !fresh {
            if self.graphs.len() >= MAX_GRAPHS {
                self.graphs.clear();
            }
            let s = self.k.stream.clone();
            s.begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED)
                .map_err(dev)?;
            let enqueued = self.enqueue_step(shapes);
            // End the capture whatever happened, so the stream is usable again.
            let captured = s.end_capture(CUgraphInstantiate_flags(0));
            enqueued?;
            let graph = captured
                .map_err(dev)?
                .ok_or_else(|| dev("CUDA graph capture of a decode step produced no graph"))?;
            match graph_edges(&graph) {
                Ok((edges, programmatic)) => tracing::info!(
                    batch = d.num_seqs,
                    edges,
                    programmatic,
                    pdl = self.k.pdl,
                    smem_carveout = ?self.k.carveout,
                    "decode step captured as a CUDA graph"
                ),
                Err(e) => tracing::warn!(error = %e, "cannot count the decode graph's edges"),
            }
            self.graphs.insert(
                key,
                DecodeGraph {
                    graph,
                    epoch: self.epoch,
                },
            );
        }
        let g = self
            .graphs
            .get(&key)
            .ok_or_else(|| dev("decode graph missing"))?;
        g.graph.launch().map_err(dev)
    }

    /// Enqueues the layers of one step, embeddings to the final norm (into `bufs.xn`).
    fn enqueue_step(&mut self, sh: &StepShapes) -> Result<(), BackendError> {
        if sh.t <= FUSED_MAX_TOKENS {
            return self.enqueue_step_fused(sh);
        }
        let t = sh.t;
        let bf16 = blas_sys::cudaDataType::CUDA_R_16BF;
        let (h, inter, eps) = (self.cfg.hidden, self.cfg.intermediate, self.cfg.rms_eps);
        let s = self.k.stream.clone();
        let k = &self.k;
        let m = &mut self.meta;
        let b = self
            .bufs
            .as_mut()
            .ok_or_else(|| dev("step buffers missing"))?;
        // Embeddings into `proj`; the residual starts at zero, so layer 0's fused
        // add + norm makes it the embeddings.
        launch::embed_rows(k, &self.embed, &m.ids, &mut b.proj, t, h).map_err(dev)?;
        s.memset_zeros(&mut b.residual).map_err(dev)?;
        for (li, l) in self.layers.iter().enumerate() {
            launch::add_rms_norm(
                k,
                &mut b.residual,
                &b.proj,
                &l.attn_norm,
                &mut b.xn,
                t,
                h,
                eps,
            )
            .map_err(dev)?;
            Self::gemm(&self.blas, &s, &l.wqkv, &b.xn, t, &mut b.qkv, bf16)?;
            attend(k, sh, b, m, (&self.cos, &self.sin), self.kv.layer(li), true)?;
            Self::gemm(&self.blas, &s, &l.wo, &b.attn, t, &mut b.proj, bf16)?;
            launch::add_rms_norm(
                k,
                &mut b.residual,
                &b.proj,
                &l.ffn_norm,
                &mut b.xn,
                t,
                h,
                eps,
            )
            .map_err(dev)?;
            Self::gemm(&self.blas, &s, &l.w_gate_up, &b.xn, t, &mut b.gate_up, bf16)?;
            launch::silu_and_mul(k, &b.gate_up, &mut b.act, t, inter).map_err(dev)?;
            Self::gemm(&self.blas, &s, &l.w_down, &b.act, t, &mut b.proj, bf16)?;
        }
        launch::add_rms_norm(
            k,
            &mut b.residual,
            &b.proj,
            &self.final_norm,
            &mut b.xn,
            t,
            h,
            eps,
        )
        .map_err(dev)
    }
}

impl CudaBackend {
    /// A step of at most `FUSED_MAX_TOKENS` tokens (decode batches, short prompts): six
    /// kernels a layer. The GEMV kernels normalise their input from the f32 residual
    /// stream and add their output to it, so no separate norm, residual add or SiLU runs.
    fn enqueue_step_fused(&mut self, sh: &StepShapes) -> Result<(), BackendError> {
        use launch::{GemvInput, GemvOutput};
        let t = sh.t;
        let (h, inter, eps) = (self.cfg.hidden, self.cfg.intermediate, self.cfg.rms_eps);
        let k = &self.k;
        let m = &mut self.meta;
        let b = self
            .bufs
            .as_mut()
            .ok_or_else(|| dev("step buffers missing"))?;
        launch::embed_rows_f32(k, &self.embed, &m.ids, &mut b.residual, t, h).map_err(dev)?;
        for (li, l) in self.layers.iter().enumerate() {
            let norm = GemvInput::Norm {
                residual: &b.residual,
                weight: &l.attn_norm,
                eps,
                late: self.gemv_norm_late,
            };
            let (rows, cols) = (l.wqkv.rows, l.wqkv.cols);
            let mut kv = self.kv.layer(li);
            if self.gemv_rope {
                launch::gemv_norm_rope(
                    k,
                    &l.wqkv.data,
                    &b.residual,
                    &l.attn_norm,
                    eps,
                    cols,
                    &sh.rope,
                    &mut b.qkv,
                    &m.positions,
                    &m.slots,
                    &self.cos,
                    &self.sin,
                    &mut kv,
                    self.gemv_norm_late,
                )
                .map_err(dev)?;
            } else {
                launch::gemv(
                    k,
                    &l.wqkv.data,
                    norm,
                    GemvOutput::Bf16(&mut b.qkv),
                    t,
                    rows,
                    cols,
                )
                .map_err(dev)?;
            }
            let rope = !self.gemv_rope;
            attend(k, sh, b, m, (&self.cos, &self.sin), kv, rope)?;
            let (rows, cols) = (l.wo.rows, l.wo.cols);
            let out = GemvOutput::AddTo(&mut b.residual);
            launch::gemv(k, &l.wo.data, GemvInput::Plain(&b.attn), out, t, rows, cols)
                .map_err(dev)?;
            let norm = GemvInput::Norm {
                residual: &b.residual,
                weight: &l.ffn_norm,
                eps,
                late: self.gemv_norm_late,
            };
            let (rows, cols) = (l.w_gate_up.rows, l.w_gate_up.cols);
            let out = GemvOutput::Bf16(&mut b.gate_up);
            launch::gemv(k, &l.w_gate_up.data, norm, out, t, rows, cols).map_err(dev)?;
            let out = GemvOutput::AddTo(&mut b.residual);
            let input = GemvInput::SiluOf(&b.gate_up);
            launch::gemv(k, &l.w_down.data, input, out, t, h, inter).map_err(dev)?;
        }
        launch::rms_norm_f32(k, &b.residual, &self.final_norm, &mut b.xn, t, h, eps).map_err(dev)
    }
}

/// One layer's RoPE + KV write from the fused q|k|v rows in `b.qkv` (unless `rope` is
/// false: the q|k|v GEMV did it), then its attention (the decode kernel when every chunk
/// is one token, the prefill kernel otherwise) into `b.attn`.
fn attend(
    k: &Kernels,
    sh: &StepShapes,
    b: &mut StepBuffers,
    m: &mut StepMeta,
    (cos, sin): (&CudaSlice<f32>, &CudaSlice<f32>),
    mut kv: KvMut<'_>,
    rope: bool,
) -> Result<(), BackendError> {
    let (pos, slots) = (&m.positions, &m.slots);
    if rope {
        launch::rope_write_kv_into(k, &sh.rope, &mut b.qkv, pos, slots, cos, sin, &mut kv)
            .map_err(dev)?;
    }
    let kv = kv.as_ref();
    if sh.all_decode {
        launch::decode_attention_kv(
            k,
            &sh.decode,
            &b.qkv,
            kv,
            &m.tables,
            &m.lens,
            &mut b.attn,
            &mut m.split,
        )
    } else {
        launch::prefill_attention_kv(
            k,
            sh.prefill_kind,
            &sh.prefill,
            &b.qkv,
            kv,
            &m.cu_q,
            &m.lens,
            &m.tables,
            &mut b.attn,
        )
    }
    .map_err(dev)
}

/// The launch shapes of one step.
struct StepShapes {
    t: usize,
    all_decode: bool,
    decode: DecodeDims,
    prefill: PrefillDims,
    prefill_kind: launch::PrefillKernel,
    rope: RopeDims,
}

impl Backend for CudaBackend {
    fn vocab_size(&self) -> usize {
        self.cfg.vocab_size
    }

    fn set_kv_scales(&mut self, scales: &KvScales) -> Result<(), BackendError> {
        let KvCaches::Fp8 {
            k_scales, v_scales, ..
        } = &mut self.kv
        else {
            return Err(BackendError::KvScales(
                "the KV cache is not FP8 (--kv-cache-dtype fp8)".into(),
            ));
        };
        scales
            .check(self.cfg.n_layers, self.cfg.n_kv_heads)
            .map_err(BackendError::KvScales)?;
        // In place: captured graphs keep the buffers' addresses.
        let s = &self.k.stream;
        for (dst, src) in k_scales
            .iter_mut()
            .zip(&scales.k)
            .chain(v_scales.iter_mut().zip(&scales.v))
        {
            s.memcpy_htod(src, dst).map_err(dev)?;
        }
        s.synchronize().map_err(dev)?;
        Ok(())
    }

    fn forward_step(
        &mut self,
        chunks: &[SeqChunk<'_>],
        plans: &[RowPlan],
    ) -> Result<StepOutput, BackendError> {
        let host_sampled: Vec<RowPlan>;
        let plans = if self.device_sampling {
            plans
        } else {
            host_sampled = without_device_sampling(plans);
            &host_sampled
        };
        let t = check_chunks(
            chunks,
            self.max_pos,
            self.block_size,
            self.num_blocks,
            self.cfg.vocab_size,
        )?;
        if t == 0 {
            return Ok(StepOutput::default());
        }
        self.forward_inner(chunks, t, plans)
    }

    fn name(&self) -> String {
        format!("cuda:{} ({})", self.ordinal, self.k.arch)
    }

    fn num_kv_blocks(&self) -> usize {
        self.num_blocks
    }

    fn forward(&mut self, chunks: &[SeqChunk<'_>]) -> Result<Vec<f32>, BackendError> {
        // No picks: every wanted row's logits.
        Ok(self.forward_step(chunks, &[])?.logits)
    }
}

impl From<CudaError> for BackendError {
    fn from(e: CudaError) -> Self {
        dev(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sampler::Penalties;

    #[test]
    fn without_device_sampling_only_plain_greedy_rows_stay_on_the_gpu() {
        let d = DeviceDraw {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            u: 0.25,
        };
        let pen = Penalties {
            repetition: 1.2,
            entries: vec![(3, 0.0)],
        };
        let plans = [
            RowPick::Greedy.into(),
            RowPlan {
                pick: RowPick::Greedy,
                penalties: Some(pen.clone()),
            },
            RowPick::Sample(d).into(),
            RowPlan {
                pick: RowPick::Sample(d),
                penalties: Some(pen),
            },
            RowPick::Host { u: 0.5 }.into(),
        ];
        let out: Vec<RowPick> = without_device_sampling(&plans)
            .iter()
            .map(|p| p.pick)
            .collect();
        assert_eq!(
            out,
            vec![
                RowPick::Greedy,
                RowPick::Host { u: 0.0 },
                RowPick::Host { u: 0.25 },
                RowPick::Host { u: 0.25 },
                RowPick::Host { u: 0.5 },
            ]
        );
        assert!(
            without_device_sampling(&plans)
                .iter()
                .all(|p| p.penalties.is_none())
        );
        // Dense, ranked (top-k, or 1024 candidates for top-p alone) and too many for
        // topk_rows.
        let vocab = 128_000;
        assert_eq!(
            device_pick(&RowPick::Sample(d), vocab),
            DevicePick::Dense(d)
        );
        let top_p = DeviceDraw { top_p: 0.9, ..d };
        assert_eq!(
            device_pick(&RowPick::Sample(top_p), vocab),
            DevicePick::Ranked(top_p, 1024)
        );
        let top_k = DeviceDraw { top_k: 40, ..d };
        assert_eq!(
            device_pick(&RowPick::Sample(top_k), vocab),
            DevicePick::Ranked(top_k, 40)
        );
        let wide = DeviceDraw { top_k: 2000, ..d };
        assert_eq!(device_pick(&RowPick::Sample(wide), vocab), DevicePick::Host);
        // Nothing but plain greedy rows is left for the device.
        assert_eq!(
            without_device_sampling(&plans)
                .iter()
                .filter(|p| device_pick(&p.pick, 100) != DevicePick::Host)
                .count(),
            1
        );
    }
}
