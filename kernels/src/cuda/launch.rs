//! Typed launchers for the kernels in kernels/cuda: argument order, grid and block shape
//! in one place, so the CUDA backend and the GPU check launch them the same way.
//! bf16 tensors are `CudaSlice<u16>` (bit patterns, as in `gpu_ref`).

use cudarc::driver::{
    CudaFunction, CudaSlice, DevicePtr, DeviceRepr, LaunchArgs, LaunchConfig, PushKernelArg, sys,
};

use super::{CudaError, Kernels};

/// A kernel argument as `cuLaunchKernelEx` takes it: an 8-byte slot holding a device
/// pointer or a 32-bit scalar (the driver copies as many bytes as the parameter has from
/// the slot's start: little-endian).
pub trait ExArg {
    fn slot(&self, k: &Kernels) -> u64;
}
impl<T> ExArg for &CudaSlice<T> {
    fn slot(&self, k: &Kernels) -> u64 {
        self.device_ptr(&k.stream).0
    }
}
impl<T> ExArg for &mut CudaSlice<T> {
    fn slot(&self, k: &Kernels) -> u64 {
        (**self).device_ptr(&k.stream).0
    }
}
impl ExArg for &i32 {
    fn slot(&self, _: &Kernels) -> u64 {
        u64::from(**self as u32)
    }
}
impl ExArg for &i64 {
    fn slot(&self, _: &Kernels) -> u64 {
        **self as u64
    }
}
impl ExArg for &f32 {
    fn slot(&self, _: &Kernels) -> u64 {
        u64::from(self.to_bits())
    }
}

/// The launch of a decode-path kernel whose code is PDL-aware (it calls `pdl_wait`
/// before touching anything a kernel writes; common.cuh). Without [`Kernels::pdl`] it is
/// cudarc's launch builder; with it the same arguments go to `cuLaunchKernelEx` with the
/// programmatic-stream-serialization attribute, which cudarc's builder cannot set.
pub struct PdlLaunch<'a> {
    k: &'a Kernels,
    f: &'a CudaFunction,
    b: LaunchArgs<'a>,
    /// The arguments' slots (PDL launches only).
    slots: Vec<u64>,
}

impl<'a> PdlLaunch<'a> {
    pub fn new(k: &'a Kernels, f: &'a CudaFunction) -> Self {
        Self {
            k,
            f,
            b: k.stream.launch_builder(f),
            slots: Vec::new(),
        }
    }

    pub fn arg<T: ExArg>(&mut self, a: T) -> &mut Self
    where
        LaunchArgs<'a>: PushKernelArg<T>,
    {
        if self.k.pdl {
            self.slots.push(a.slot(self.k));
        }
        self.b.arg(a);
        self
    }

    /// # Safety
    /// As cudarc's `LaunchArgs::launch`: the arguments must match the kernel's signature
    /// and every buffer must be large enough for what the kernel touches; and the kernel
    /// must be PDL-aware (see the type's documentation).
    pub unsafe fn launch(&mut self, cfg: LaunchConfig) -> Result<(), CudaError> {
        if !self.k.pdl {
            // SAFETY: the caller's contract.
            unsafe { self.b.launch(cfg) }?;
            return Ok(());
        }
        self.k.ctx.bind_to_thread()?;
        let mut params: Vec<*mut std::ffi::c_void> = self
            .slots
            .iter_mut()
            .map(|s| (s as *mut u64).cast())
            .collect();
        // SAFETY: a plain C union; the member set here is an int.
        let mut value: sys::CUlaunchAttributeValue = unsafe { std::mem::zeroed() };
        value.programmaticStreamSerializationAllowed = 1;
        let mut attr = sys::CUlaunchAttribute {
            id: sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION,
            pad: [0; 4],
            value,
        };
        let conf = sys::CUlaunchConfig {
            gridDimX: cfg.grid_dim.0,
            gridDimY: cfg.grid_dim.1,
            gridDimZ: cfg.grid_dim.2,
            blockDimX: cfg.block_dim.0,
            blockDimY: cfg.block_dim.1,
            blockDimZ: cfg.block_dim.2,
            sharedMemBytes: cfg.shared_mem_bytes,
            hStream: self.k.stream.cu_stream(),
            attrs: &mut attr,
            numAttrs: 1,
        };
        // SAFETY: `params` points at one live slot per kernel parameter (the caller's
        // contract for their types), `conf` and `attr` outlive the call, the function
        // belongs to this context.
        unsafe {
            sys::cuLaunchKernelEx(
                &conf,
                self.f.cu_function(),
                params.as_mut_ptr(),
                std::ptr::null_mut(),
            )
        }
        .result()?;
        Ok(())
    }
}

/// Where [`KvRef::push`] puts the cache arguments: cudarc's builder or a [`PdlLaunch`].
trait PushSlice<'a> {
    fn push<T>(&mut self, s: &'a CudaSlice<T>);
}
impl<'a> PushSlice<'a> for LaunchArgs<'a> {
    fn push<T>(&mut self, s: &'a CudaSlice<T>) {
        self.arg(s);
    }
}
impl<'a> PushSlice<'a> for PdlLaunch<'a> {
    fn push<T>(&mut self, s: &'a CudaSlice<T>) {
        self.arg(s);
    }
}

/// Shapes of a decode-attention launch.
#[derive(Debug, Clone, Copy)]
pub struct DecodeDims {
    pub num_seqs: usize,
    pub n_kv_heads: usize,
    /// Query heads per KV head (1, 2, 3, 4 or 8).
    pub group: usize,
    /// 64, 96 or 128.
    pub head_dim: usize,
    pub max_blocks: usize,
    pub num_splits: usize,
    pub scale: f32,
    /// Elements between consecutive sequences' query rows (`n_heads * head_dim` when q is
    /// contiguous; the fused q|k|v row width when q is read out of the projection).
    pub q_stride: usize,
}

/// Scratch for split-KV partial results (reused across launches).
pub struct SplitScratch {
    pub part_out: CudaSlice<f32>,
    pub part_ml: CudaSlice<f32>,
}

impl SplitScratch {
    pub fn new(k: &Kernels, d: &DecodeDims) -> Result<Self, CudaError> {
        let heads = d.num_seqs * d.n_kv_heads * d.group;
        let splits = d.num_splits.max(1);
        Ok(Self {
            part_out: k
                .stream
                .alloc_zeros::<f32>((heads * splits * d.head_dim).max(1))?,
            part_ml: k.stream.alloc_zeros::<f32>((heads * splits * 2).max(1))?,
        })
    }
}

/// Contexts up to this long are never split: the merge costs more than the parallelism
/// gains (H200, run 8: batch-1 EuroLLM-1.7B decode at 33-96 tokens 2 % faster with one
/// split than with two from the 65th token on, SmolLM2-135M 3 %).
pub const SPLIT_MIN_CONTEXT: usize = 256;

/// How many splits a decode launch should use: enough CTAs to give every SM about two,
/// never more than the longest context has chunks, none for contexts up to
/// [`SPLIT_MIN_CONTEXT`].
pub fn decode_splits(num_seqs: usize, n_kv_heads: usize, max_len: usize, sm_count: usize) -> usize {
    let ctas = (num_seqs * n_kv_heads).max(1);
    let chunks = max_len.div_ceil(crate::gpu_ref::DECODE_CHUNK).max(1);
    if ctas >= 2 * sm_count || max_len <= SPLIT_MIN_CONTEXT {
        1
    } else {
        (2 * sm_count).div_ceil(ctas).min(chunks).max(1)
    }
}

/// `q_stride` as a kernel argument, for a kernel (`who`) that reads query rows in 16-byte
/// pieces: a multiple of 8 bf16 elements.
fn q_stride_16b(q_stride: usize, who: &str) -> Result<i32, CudaError> {
    if !q_stride.is_multiple_of(8) {
        return Err(CudaError::Shape(format!(
            "q_stride {q_stride} is not a multiple of 8 elements ({who} loads q in 16-byte pieces)"
        )));
    }
    dim(q_stride)
}

fn dim(v: usize) -> Result<i32, CudaError> {
    i32::try_from(v).map_err(|_| CudaError::Shape(format!("{v} does not fit a kernel argument")))
}

/// A launch over an `x * y * z` grid of `threads`-thread CTAs, no dynamic shared memory.
fn config(x: usize, y: usize, z: usize, threads: u32) -> Result<LaunchConfig, CudaError> {
    let c = |v: usize| u32::try_from(v.max(1)).map_err(|_| CudaError::Shape(format!("grid {v}")));
    Ok(LaunchConfig {
        grid_dim: (c(x)?, c(y)?, c(z)?),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    })
}

/// One layer's K and V caches as the attention kernels read them: bf16, or FP8 (e4m3
/// codes, `[num_blocks][16][n_kv_heads][hd]` bytes, with one f32 scale per KV head:
/// value = e4m3(code) * scale), which the `_fp8` entry points read.
#[derive(Clone, Copy)]
pub enum KvRef<'a> {
    Bf16 {
        k: &'a CudaSlice<u16>,
        v: &'a CudaSlice<u16>,
    },
    Fp8 {
        k: &'a CudaSlice<u8>,
        v: &'a CudaSlice<u8>,
        k_scale: &'a CudaSlice<f32>,
        v_scale: &'a CudaSlice<f32>,
    },
}

/// [`KvRef`], writable: what RoPE + KV write stores into.
pub enum KvMut<'a> {
    Bf16 {
        k: &'a mut CudaSlice<u16>,
        v: &'a mut CudaSlice<u16>,
    },
    Fp8 {
        k: &'a mut CudaSlice<u8>,
        v: &'a mut CudaSlice<u8>,
        k_scale: &'a CudaSlice<f32>,
        v_scale: &'a CudaSlice<f32>,
    },
}

impl KvMut<'_> {
    /// The same caches, for reading.
    pub fn as_ref(&self) -> KvRef<'_> {
        match self {
            KvMut::Bf16 { k, v } => KvRef::Bf16 { k, v },
            KvMut::Fp8 {
                k,
                v,
                k_scale,
                v_scale,
            } => KvRef::Fp8 {
                k,
                v,
                k_scale,
                v_scale,
            },
        }
    }
}

impl<'a> KvRef<'a> {
    /// The entry point's name suffix.
    fn suffix(&self) -> &'static str {
        match self {
            KvRef::Bf16 { .. } => "",
            KvRef::Fp8 { .. } => "_fp8",
        }
    }

    /// The cache arguments, in the kernels' order: K and V, then (fp8) their scales.
    fn push<B: PushSlice<'a>>(&self, b: &mut B) {
        match *self {
            KvRef::Bf16 { k, v } => {
                b.push(k);
                b.push(v);
            }
            KvRef::Fp8 {
                k,
                v,
                k_scale,
                v_scale,
            } => {
                b.push(k);
                b.push(v);
                b.push(k_scale);
                b.push(v_scale);
            }
        }
    }
}

/// `decode_attention_hd{D}_g{G}` or its `_fp8` twin, as `kv` is stored (+ the merge
/// when `num_splits > 1`).
#[allow(clippy::too_many_arguments)]
pub fn decode_attention_kv(
    k: &Kernels,
    d: &DecodeDims,
    q: &CudaSlice<u16>,
    kv: KvRef<'_>,
    block_tables: &CudaSlice<i32>,
    seq_lens: &CudaSlice<i32>,
    out: &mut CudaSlice<u16>,
    scratch: &mut SplitScratch,
) -> Result<(), CudaError> {
    let entry = format!(
        "decode_attention_hd{}_g{}{}",
        d.head_dim,
        d.group,
        kv.suffix()
    );
    let f = k.function("decode_attention.cu", &entry)?;
    let (n_kv, max_blocks, splits) = (dim(d.n_kv_heads)?, dim(d.max_blocks)?, dim(d.num_splits)?);
    // Each lane reads its 8 query elements as one 16-byte load.
    let q_stride = q_stride_16b(d.q_stride, "decode attention")?;
    let cfg = config(d.num_seqs, d.n_kv_heads, d.num_splits, 128)?;
    let mut b = PdlLaunch::new(k, &f);
    b.arg(q);
    kv.push(&mut b);
    b.arg(block_tables)
        .arg(seq_lens)
        .arg(&mut *out)
        .arg(&mut scratch.part_out)
        .arg(&mut scratch.part_ml)
        .arg(&n_kv)
        .arg(&max_blocks)
        .arg(&splits)
        .arg(&d.scale)
        .arg(&q_stride);
    // SAFETY: argument types and order match the kernel's signature (the fp8 entry
    // points take the two scale arrays, `n_kv_heads` values each, after the caches);
    // every buffer is sized by the caller for `d` (checked by the GPU check against the
    // CPU reference).
    unsafe { b.launch(cfg) }?;
    merge_splits(k, d, out, scratch)
}

/// `decode_attention_merge` when the launch was split.
fn merge_splits(
    k: &Kernels,
    d: &DecodeDims,
    out: &mut CudaSlice<u16>,
    scratch: &mut SplitScratch,
) -> Result<(), CudaError> {
    let splits = dim(d.num_splits)?;
    if d.num_splits > 1 {
        let m = k.function("decode_attention.cu", "decode_attention_merge")?;
        let (n_heads, hd) = (dim(d.n_kv_heads * d.group)?, dim(d.head_dim)?);
        let cfg = config(
            d.num_seqs,
            d.n_kv_heads * d.group,
            1,
            d.head_dim.min(128) as u32,
        )?;
        let mut b = PdlLaunch::new(k, &m);
        b.arg(&scratch.part_out)
            .arg(&scratch.part_ml)
            .arg(&mut *out)
            .arg(&n_heads)
            .arg(&hd)
            .arg(&splits);
        // SAFETY: as in `decode_attention_kv`.
        unsafe { b.launch(cfg) }?;
    }
    Ok(())
}

/// Shapes of a prefill-attention launch.
#[derive(Debug, Clone, Copy)]
pub struct PrefillDims {
    pub num_seqs: usize,
    /// Most new tokens of any sequence in the batch.
    pub max_new: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    /// 64, 96 or 128.
    pub head_dim: usize,
    pub max_blocks: usize,
    pub scale: f32,
    /// Elements between consecutive tokens' query rows (see [`DecodeDims::q_stride`]).
    pub q_stride: usize,
}

/// Which prefill-attention design runs: `Basic` (kernels/cuda/prefill_attention.cu,
/// `prefill_attention_hd{D}`: 64 query rows a CTA, tiles staged through registers, the
/// bf16 and the FP8 cache), `Pipelined` (same file, `prefill_attention_pipe_hd{D}`: 128
/// rows a CTA, `cp.async` copies overlapping the MMAs, `ldmatrix` fragments; bf16 cache
/// only) or `Wgmma` (kernels/cuda/prefill_wgmma.cu, `prefill_attention_wgmma_hd{D}`:
/// Hopper warpgroup MMAs, a three-stage ring of K/V tiles; bf16 cache on sm_90 only) or
/// `WgmmaOverlap` (same file, `prefill_attention_wgmma_ov_hd{D}`: S of the next tile
/// computing during the softmax; experimental, not yet measured) or `WgmmaWs` (same file,
/// `prefill_attention_wgmma_ws_hd{D}`: a producer warpgroup feeding two consumer
/// warpgroups through mbarriers; experimental, not yet measured) or `WgmmaPingPong` (same
/// file, `prefill_attention_wgmma_pp_hd{D}`: that design with the two consumers' MMA
/// issue alternating and each softmax under the other's MMAs; experimental, not yet
/// measured) or `WgmmaPingPong128` (same file, `prefill_attention_wgmma_pp128_hd{D}`: that
/// with 128-key tiles, Q in registers; experimental, not yet measured) or `WgmmaTma` (same
/// file, `prefill_attention_wgmma_tma_hd{64,128}`: that with its K/V tiles copied by TMA
/// into 128-byte-swizzled shared memory; head_dim 96 runs `WgmmaPingPong128`;
/// experimental, not yet measured). Measured on an H200
/// (run 8, 2 x 8192 tokens): Basic 0.07 of the bf16 peak, Pipelined 0.19, Wgmma 0.25
/// (docs/benchmarks.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrefillKernel {
    Basic,
    Pipelined,
    Wgmma,
    WgmmaOverlap,
    WgmmaWs,
    WgmmaPingPong,
    WgmmaPingPong128,
    WgmmaTma,
}

impl PrefillKernel {
    /// `SOV_PREFILL_KERNEL=basic|pipelined|wgmma|wgmma_ov|wgmma_ws|wgmma_pp|wgmma_pp128|
    /// wgmma_tma` picks a design (to compare them);
    /// unset, the fastest measured one, [`PrefillKernel::Wgmma`] (which falls back to
    /// `Pipelined` off Hopper, see [`PrefillKernel::resolve`]).
    pub fn from_env() -> Self {
        match std::env::var("SOV_PREFILL_KERNEL").as_deref() {
            Ok("basic") => Self::Basic,
            Ok("pipelined") => Self::Pipelined,
            Ok("wgmma_ov") => Self::WgmmaOverlap,
            Ok("wgmma_ws") => Self::WgmmaWs,
            Ok("wgmma_pp") => Self::WgmmaPingPong,
            Ok("wgmma_pp128") => Self::WgmmaPingPong128,
            Ok("wgmma_tma") => Self::WgmmaTma,
            _ => Self::Wgmma,
        }
    }

    /// The design that runs on this device for this cache: an FP8 cache has only the
    /// `Basic` kernels; `Wgmma` needs sm_90a (H100, H200), elsewhere `Pipelined` runs.
    pub fn resolve(self, k: &Kernels, fp8: bool) -> Self {
        match self {
            _ if fp8 => Self::Basic,
            Self::Wgmma
            | Self::WgmmaOverlap
            | Self::WgmmaWs
            | Self::WgmmaPingPong
            | Self::WgmmaPingPong128
            | Self::WgmmaTma
                if !k.has_source("prefill_wgmma.cu") =>
            {
                Self::Pipelined
            }
            other => other,
        }
    }

    /// Every design, in the order above.
    pub const ALL: [PrefillKernel; 8] = [
        Self::Basic,
        Self::Pipelined,
        Self::Wgmma,
        Self::WgmmaOverlap,
        Self::WgmmaWs,
        Self::WgmmaPingPong,
        Self::WgmmaPingPong128,
        Self::WgmmaTma,
    ];

    /// The design that runs at this head_dim: `WgmmaTma` copies 64-dim boxes, so at 96 the
    /// same design runs with `cp.async` copies (`WgmmaPingPong128`).
    pub fn for_head_dim(self, hd: usize) -> Self {
        match self {
            Self::WgmmaTma if !hd.is_multiple_of(64) => Self::WgmmaPingPong128,
            other => other,
        }
    }

    /// A resolved design's kernel: its source, entry point, query rows a CTA and threads
    /// a CTA (the FP8 cache has only `Basic`'s `_fp8` twins).
    pub fn entry(self, hd: usize, fp8: bool) -> (&'static str, String, usize, u32) {
        match self {
            PrefillKernel::Basic => (
                "prefill_attention.cu",
                format!("prefill_attention_hd{hd}{}", if fp8 { "_fp8" } else { "" }),
                64,
                128,
            ),
            PrefillKernel::Pipelined => (
                "prefill_attention.cu",
                format!("prefill_attention_pipe_hd{hd}"),
                128,
                256,
            ),
            PrefillKernel::Wgmma => (
                "prefill_wgmma.cu",
                format!("prefill_attention_wgmma_hd{hd}"),
                128,
                256,
            ),
            PrefillKernel::WgmmaOverlap => (
                "prefill_wgmma.cu",
                format!("prefill_attention_wgmma_ov_hd{hd}"),
                128,
                256,
            ),
            PrefillKernel::WgmmaWs => (
                "prefill_wgmma.cu",
                format!("prefill_attention_wgmma_ws_hd{hd}"),
                128,
                384,
            ),
            PrefillKernel::WgmmaPingPong => (
                "prefill_wgmma.cu",
                format!("prefill_attention_wgmma_pp_hd{hd}"),
                128,
                384,
            ),
            PrefillKernel::WgmmaPingPong128 => (
                "prefill_wgmma.cu",
                format!("prefill_attention_wgmma_pp128_hd{hd}"),
                128,
                384,
            ),
            PrefillKernel::WgmmaTma => (
                "prefill_wgmma.cu",
                format!("prefill_attention_wgmma_tma_hd{hd}"),
                128,
                384,
            ),
        }
    }
}

/// Dynamic shared memory of the wgmma designs (prefill_wgmma.cu): `RING_STAGES` (three)
/// stages of a K and a V tile, 64 x D bf16 each; the warp-specialised designs have
/// four, then the two consumer warpgroups' 64 query rows (a tile's size each), then a
/// `full` and an `empty` mbarrier (8 bytes) a stage; with 128-key tiles three stages of
/// twice the size, Q in registers (`ws_stages` in prefill_wgmma.cu).
fn wgmma_smem_bytes(kind: PrefillKernel, head_dim: usize) -> usize {
    let tile = 64 * head_dim * 2;
    match kind {
        PrefillKernel::WgmmaWs | PrefillKernel::WgmmaPingPong => {
            4 * 2 * tile + 2 * tile + 4 * 2 * 8
        }
        PrefillKernel::WgmmaPingPong128 => 3 * 2 * (2 * tile) + 3 * 2 * 8,
        // and 1 KB to align the swizzled layouts to 1024 bytes in
        PrefillKernel::WgmmaTma => 3 * 2 * (2 * tile) + 3 * 2 * 8 + 1024,
        _ => 3 * 2 * tile,
    }
}

/// A TMA descriptor (`CUtensorMap`) passed by value as a kernel argument.
#[repr(transparent)]
struct TensorMap(sys::CUtensorMap);

// SAFETY: a plain-data 128-byte struct, copied into the kernel's parameter space as the
// `SovTensorMap` (`__grid_constant__`) parameter of the TMA kernels.
unsafe impl DeviceRepr for TensorMap {}

/// The TMA descriptor of one bf16 KV-cache buffer for the TMA prefill: `rows` cache
/// slots of `row_elems` elements (every KV head of a token), read in boxes of 16 rows x
/// 64 elements (one KV block, 64 dims of one head) into 128-byte-swizzled shared memory;
/// rows past `rows` read as zeros.
fn kv_tensor_map(
    ptr: sys::CUdeviceptr,
    rows: usize,
    row_elems: usize,
) -> Result<TensorMap, CudaError> {
    let dims = [row_elems as u64, rows as u64];
    let strides = [(row_elems * 2) as u64];
    let boxes = [64u32, 16];
    let steps = [1u32, 1];
    let mut map = std::mem::MaybeUninit::<sys::CUtensorMap>::zeroed();
    // SAFETY: every pointer refers to a live local array of the rank the call is given
    // (2 dims, 1 stride); the driver only reads them and writes `map`.
    unsafe {
        sys::cuTensorMapEncodeTiled(
            map.as_mut_ptr(),
            sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_BFLOAT16,
            2,
            ptr as *mut std::ffi::c_void,
            dims.as_ptr(),
            strides.as_ptr(),
            boxes.as_ptr(),
            steps.as_ptr(),
            sys::CUtensorMapInterleave::CU_TENSOR_MAP_INTERLEAVE_NONE,
            sys::CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_128B,
            sys::CUtensorMapL2promotion::CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
            sys::CUtensorMapFloatOOBfill::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
        )
        .result()?;
    }
    // SAFETY: the call succeeded, so it initialised the map.
    Ok(TensorMap(unsafe { map.assume_init() }))
}

/// Prefill attention of the design `kind` (see [`PrefillKernel`]) over `kv` as it is
/// stored; `cu_q` has `num_seqs + 1` offsets into the packed tokens.
#[allow(clippy::too_many_arguments)]
pub fn prefill_attention_kv(
    k: &Kernels,
    kind: PrefillKernel,
    d: &PrefillDims,
    q: &CudaSlice<u16>,
    kv: KvRef<'_>,
    cu_q: &CudaSlice<i32>,
    seq_lens: &CudaSlice<i32>,
    block_tables: &CudaSlice<i32>,
    out: &mut CudaSlice<u16>,
) -> Result<(), CudaError> {
    let hd = d.head_dim;
    let kind = kind
        .resolve(k, matches!(kv, KvRef::Fp8 { .. }))
        .for_head_dim(hd);
    let (source, entry, rows, threads) = kind.entry(hd, matches!(kv, KvRef::Fp8 { .. }));
    let f = k.function(source, &entry)?;
    let (nh, nkv, mb) = (dim(d.n_heads)?, dim(d.n_kv_heads)?, dim(d.max_blocks)?);
    let q_stride = dim(d.q_stride)?;
    // The designs that stage Q in shared memory read it 16 bytes at a time.
    if matches!(kind, PrefillKernel::WgmmaWs | PrefillKernel::WgmmaPingPong) {
        q_stride_16b(d.q_stride, &format!("{kind:?}"))?;
    }
    let mut cfg = config(d.max_new.div_ceil(rows), d.n_heads, d.num_seqs, threads)?;
    if matches!(
        kind,
        PrefillKernel::Wgmma
            | PrefillKernel::WgmmaOverlap
            | PrefillKernel::WgmmaWs
            | PrefillKernel::WgmmaPingPong
            | PrefillKernel::WgmmaPingPong128
            | PrefillKernel::WgmmaTma
    ) {
        let bytes = wgmma_smem_bytes(kind, hd);
        f.set_attribute(
            sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            dim(bytes)?,
        )?;
        cfg.shared_mem_bytes = bytes as u32;
    }
    // The TMA design takes the caches as tensor maps (and their row count) instead of
    // pointers; the pointers' guards are held until the launch is queued.
    let ptrs;
    let tma = if kind == PrefillKernel::WgmmaTma {
        let KvRef::Bf16 { k: kc, v: vc } = kv else {
            return Err(CudaError::Shape(
                "the TMA prefill needs a bf16 KV cache".into(),
            ));
        };
        let row = d.n_kv_heads * hd;
        // One row count for both maps: row `num_slots` must be outside both tensors.
        if kc.len() != vc.len() {
            return Err(CudaError::Shape(format!(
                "the TMA prefill needs K and V caches of one size ({} vs {} elements)",
                kc.len(),
                vc.len()
            )));
        }
        ptrs = (kc.device_ptr(&k.stream), vc.device_ptr(&k.stream));
        let (tk, tv) = (
            kv_tensor_map(ptrs.0.0, kc.len() / row, row)?,
            kv_tensor_map(ptrs.1.0, vc.len() / row, row)?,
        );
        Some((tk, tv, dim(kc.len() / row)?))
    } else {
        None
    };
    let mut b = k.stream.launch_builder(&f);
    b.arg(q);
    match &tma {
        Some((tk, tv, _)) => {
            b.arg(tk).arg(tv);
        }
        None => kv.push(&mut b),
    }
    b.arg(cu_q)
        .arg(seq_lens)
        .arg(block_tables)
        .arg(&mut *out)
        .arg(&nh)
        .arg(&nkv)
        .arg(&mb)
        .arg(&d.scale)
        .arg(&q_stride);
    if let Some((_, _, slots)) = &tma {
        b.arg(slots);
    }
    // SAFETY: as in `decode_attention_kv`; the TMA kernels take `(q, tensor map of K, of
    // V, ..., q_stride, num_slots)`, their tensor maps describing the two cache buffers.
    unsafe { b.launch(cfg) }?;
    Ok(())
}

/// `rms_norm` over `rows` rows of `dim` (a multiple of 8).
pub fn rms_norm(
    k: &Kernels,
    x: &CudaSlice<u16>,
    weight: &CudaSlice<u16>,
    out: &mut CudaSlice<u16>,
    rows: usize,
    dim_: usize,
    eps: f32,
) -> Result<(), CudaError> {
    let f = k.function("norm.cu", "rms_norm")?;
    let n = dim(dim_)?;
    let cfg = config(rows, 1, 1, 256)?;
    let mut b = k.stream.launch_builder(&f);
    b.arg(x).arg(weight).arg(&mut *out).arg(&n).arg(&eps);
    // SAFETY: as in `decode_attention_kv`.
    unsafe { b.launch(cfg) }?;
    Ok(())
}

/// `add_rms_norm`: `residual += x`, `out = rms_norm(residual)`.
#[allow(clippy::too_many_arguments)]
pub fn add_rms_norm(
    k: &Kernels,
    residual: &mut CudaSlice<f32>,
    x: &CudaSlice<u16>,
    weight: &CudaSlice<u16>,
    out: &mut CudaSlice<u16>,
    rows: usize,
    dim_: usize,
    eps: f32,
) -> Result<(), CudaError> {
    let f = k.function("norm.cu", "add_rms_norm")?;
    let n = dim(dim_)?;
    let cfg = config(rows, 1, 1, 256)?;
    let mut b = k.stream.launch_builder(&f);
    b.arg(&mut *residual)
        .arg(x)
        .arg(weight)
        .arg(&mut *out)
        .arg(&n)
        .arg(&eps);
    // SAFETY: as in `decode_attention_kv`.
    unsafe { b.launch(cfg) }?;
    Ok(())
}

/// `silu_and_mul`: `gate_up` is `[rows][2 * inter]`, `out` `[rows][inter]`.
pub fn silu_and_mul(
    k: &Kernels,
    gate_up: &CudaSlice<u16>,
    out: &mut CudaSlice<u16>,
    rows: usize,
    inter: usize,
) -> Result<(), CudaError> {
    let f = k.function("act.cu", "silu_and_mul")?;
    let (r, i) = (dim(rows)?, dim(inter)?);
    let pieces = rows * inter / 8;
    let cfg = config(pieces.div_ceil(256).min(65_535), 1, 1, 256)?;
    let mut b = k.stream.launch_builder(&f);
    b.arg(gate_up).arg(&mut *out).arg(&r).arg(&i);
    // SAFETY: as in `decode_attention_kv`.
    unsafe { b.launch(cfg) }?;
    Ok(())
}

/// Shapes of a `rope_write_kv` launch.
#[derive(Debug, Clone, Copy)]
pub struct RopeDims {
    pub tokens: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub rot_dim: usize,
    /// 0 = interleaved pairs (GGUF), 1 = half pairs (Hugging Face).
    pub style: i32,
    /// Elements per `qkv` row (at least `(n_heads + 2 * n_kv_heads) * head_dim`).
    pub qkv_stride: usize,
}

/// `rope_write_kv`: in each fused `qkv` row, rotates q in place and stores rotated K and
/// plain V at the token's cache slot; `rope_write_kv_fp8` for an fp8 cache (K and V
/// divided by their KV head's scale and rounded once). One thread per q/k rotation pair,
/// unrotated k element and 8 v elements.
#[allow(clippy::too_many_arguments)]
pub fn rope_write_kv_into(
    k: &Kernels,
    d: &RopeDims,
    qkv: &mut CudaSlice<u16>,
    positions: &CudaSlice<i32>,
    slots: &CudaSlice<i32>,
    cos: &CudaSlice<f32>,
    sin: &CudaSlice<f32>,
    kv: &mut KvMut<'_>,
) -> Result<(), CudaError> {
    let entry = match kv {
        KvMut::Bf16 { .. } => "rope_write_kv",
        KvMut::Fp8 { .. } => "rope_write_kv_fp8",
    };
    let f = k.function("rope_kv.cu", entry)?;
    let (nh, nkv, hd, rot) = (
        dim(d.n_heads)?,
        dim(d.n_kv_heads)?,
        dim(d.head_dim)?,
        dim(d.rot_dim)?,
    );
    let stride = dim(d.qkv_stride)?;
    let half = d.rot_dim / 2;
    let items = (d.n_heads + d.n_kv_heads) * half
        + d.n_kv_heads * (d.head_dim - d.rot_dim)
        + d.n_kv_heads * d.head_dim / 8;
    let cfg = config(d.tokens, items.div_ceil(128), 1, 128)?;
    let mut b = PdlLaunch::new(k, &f);
    b.arg(&mut *qkv)
        .arg(&stride)
        .arg(positions)
        .arg(slots)
        .arg(cos)
        .arg(sin);
    match kv {
        KvMut::Bf16 { k, v } => {
            b.arg(&mut **k).arg(&mut **v);
        }
        KvMut::Fp8 {
            k,
            v,
            k_scale,
            v_scale,
        } => {
            b.arg(&mut **k).arg(&mut **v).arg(*k_scale).arg(*v_scale);
        }
    }
    b.arg(&nh).arg(&nkv).arg(&hd).arg(&rot).arg(&d.style);
    // SAFETY: as in `decode_attention_kv`; the fp8 entry point takes the two scale arrays
    // (`n_kv_heads` values each) after the caches.
    unsafe { b.launch(cfg) }?;
    Ok(())
}

/// `gemv_norm_rope_t*` (experimental): the q|k|v GEMV of RMS-normalised residual rows with
/// [`rope_write_kv_into`]'s work in its epilogue: q rows rotated into `qkv` (the k and v
/// parts of `qkv` are not written), k rotated and v into their cache slots. Interleaved
/// RoPE (`d.style` 0) and a bf16 cache only; `w` is `[qkv rows][cols]` with
/// `qkv rows = (n_heads + 2 n_kv_heads) * head_dim = d.qkv_stride`. `late` runs
/// `gemv_norm_late_rope_t*`: the product of `gemv_norm_late` (the norm applied after the
/// sum) with the same epilogue.
#[allow(clippy::too_many_arguments)]
pub fn gemv_norm_rope(
    k: &Kernels,
    w: &CudaSlice<u16>,
    residual: &CudaSlice<f32>,
    norm_w: &CudaSlice<u16>,
    eps: f32,
    cols: usize,
    d: &RopeDims,
    qkv: &mut CudaSlice<u16>,
    positions: &CudaSlice<i32>,
    slots: &CudaSlice<i32>,
    cos: &CudaSlice<f32>,
    sin: &CudaSlice<f32>,
    kv: &mut KvMut<'_>,
    late: bool,
) -> Result<(), CudaError> {
    let rows = (d.n_heads + 2 * d.n_kv_heads) * d.head_dim;
    let tokens = d.tokens;
    let t = gemv_rows(tokens);
    let shape = |what: String| {
        CudaError::Shape(format!(
            "gemv_norm_rope ({rows}x{cols}, {tokens} tokens): {what}"
        ))
    };
    if d.style != 0 {
        return Err(shape("needs interleaved RoPE pairs (style 0)".into()));
    }
    if tokens == 0 || tokens > GEMV_MAX_TOKENS || !cols.is_multiple_of(8) {
        return Err(shape(format!(
            "needs 1..={GEMV_MAX_TOKENS} tokens and a multiple of 8 columns"
        )));
    }
    if d.qkv_stride != rows || !d.head_dim.is_multiple_of(8) || d.rot_dim > d.head_dim {
        return Err(shape(
            "q|k|v rows must be whole heads of a multiple-of-8 head_dim".into(),
        ));
    }
    if w.len() < rows * cols
        || residual.len() < t * cols
        || norm_w.len() < cols
        || qkv.len() < tokens * rows
        || positions.len() < tokens
        || slots.len() < tokens
    {
        return Err(shape("a buffer is too short".into()));
    }
    let KvMut::Bf16 { k: kc, v: vc } = kv else {
        return Err(shape("needs a bf16 KV cache".into()));
    };
    let name = if late {
        "gemv_norm_late_rope"
    } else {
        "gemv_norm_rope"
    };
    let f = k.function("gemv.cu", &format!("{name}_t{t}"))?;
    let (r, c, n) = (dim(rows)?, dim(cols)?, dim(tokens)?);
    let (nh, nkv, hd, rot) = (
        dim(d.n_heads)?,
        dim(d.n_kv_heads)?,
        dim(d.head_dim)?,
        dim(d.rot_dim)?,
    );
    let cfg = config(rows.div_ceil(4), 1, 1, 128)?;
    let mut b = PdlLaunch::new(k, &f);
    b.arg(w)
        .arg(residual)
        .arg(norm_w)
        .arg(&eps)
        .arg(&mut *qkv)
        .arg(&r)
        .arg(&c)
        .arg(&n)
        .arg(positions)
        .arg(slots)
        .arg(cos)
        .arg(sin)
        .arg(&mut **kc)
        .arg(&mut **vc)
        .arg(&nh)
        .arg(&nkv)
        .arg(&hd)
        .arg(&rot);
    // SAFETY: argument types and order match `gemv_norm_rope_t{T}` (and
    // `gemv_norm_late_rope_t{T}`, which takes the same); the buffer lengths
    // were checked above (the cache slots are the caller's, as for rope_write_kv).
    unsafe { b.launch(cfg) }?;
    Ok(())
}

/// `argmax_rows`: one index per row of `vocab` logits.
pub fn argmax_rows(
    k: &Kernels,
    logits: &CudaSlice<f32>,
    out: &mut CudaSlice<i32>,
    rows: usize,
    vocab: usize,
) -> Result<(), CudaError> {
    let f = k.function("sampling.cu", "argmax_rows")?;
    let v = dim(vocab)?;
    let cfg = config(rows, 1, 1, 1024)?;
    let mut b = k.stream.launch_builder(&f);
    b.arg(logits).arg(&mut *out).arg(&v);
    // SAFETY: as in `decode_attention_kv`.
    unsafe { b.launch(cfg) }?;
    Ok(())
}

/// `topk_rows`: the `top` best (logit, id) pairs of each row in rank order (see
/// `gpu_ref::topk_rows`); `top` in `1..=min(1024, vocab)`.
pub fn topk_rows(
    k: &Kernels,
    logits: &CudaSlice<f32>,
    out_logits: &mut CudaSlice<f32>,
    out_ids: &mut CudaSlice<i32>,
    rows: usize,
    vocab: usize,
    top: usize,
) -> Result<(), CudaError> {
    if top == 0 || top > crate::gpu_ref::TOPK_MAX || top > vocab {
        return Err(CudaError::Shape(format!(
            "topk_rows: k = {top} must be in 1..={} and at most the vocabulary ({vocab})",
            crate::gpu_ref::TOPK_MAX
        )));
    }
    if logits.len() < rows * vocab || out_logits.len() < rows * top || out_ids.len() < rows * top {
        return Err(CudaError::Shape(format!(
            "topk_rows: {rows} rows need {} logits and {} outputs",
            rows * vocab,
            rows * top
        )));
    }
    let f = k.function("sampling.cu", "topk_rows")?;
    let (v, t) = (dim(vocab)?, dim(top)?);
    let cfg = config(rows, 1, 1, 512)?;
    let mut b = k.stream.launch_builder(&f);
    b.arg(logits)
        .arg(&mut *out_logits)
        .arg(&mut *out_ids)
        .arg(&v)
        .arg(&t);
    // SAFETY: as in `decode_attention_kv`; the slice lengths were checked above.
    unsafe { b.launch(cfg) }?;
    Ok(())
}

/// `sample_rows`: one token a row drawn from `logits` with `params` (four f32 a row, see
/// `gpu_ref::SampleParams::to_device`), into `out_ids`; `out_stats` gets each row's
/// sanitized maximum and sum of weights (two f32 a row).
pub fn sample_rows(
    k: &Kernels,
    logits: &CudaSlice<f32>,
    params: &CudaSlice<f32>,
    out_ids: &mut CudaSlice<i32>,
    out_stats: &mut CudaSlice<f32>,
    rows: usize,
    vocab: usize,
) -> Result<(), CudaError> {
    if vocab == 0
        || logits.len() < rows * vocab
        || params.len() < rows * 4
        || out_ids.len() < rows
        || out_stats.len() < rows * 2
    {
        return Err(CudaError::Shape(format!(
            "sample_rows: {rows} rows of {vocab} logits need {} logits, {} parameters, {rows} ids and {} stats",
            rows * vocab,
            rows * 4,
            rows * 2
        )));
    }
    // Its fixed-point weight sums (2^42 units a weight of 1) fit 64 bits below 2^22 tokens.
    if vocab >= 1 << 22 {
        return Err(CudaError::Shape(format!(
            "sample_rows: a vocabulary of {vocab} tokens is beyond its 64-bit sums (at most {})",
            (1 << 22) - 1
        )));
    }
    let f = k.function("sampling.cu", "sample_rows")?;
    let v = dim(vocab)?;
    let cfg = config(rows, 1, 1, 1024)?;
    let mut b = k.stream.launch_builder(&f);
    b.arg(logits)
        .arg(params)
        .arg(&mut *out_ids)
        .arg(&mut *out_stats)
        .arg(&v);
    // SAFETY: as in `decode_attention_kv`; the slice lengths were checked above, and
    // device allocations are aligned for the kernel's float4 / float2 accesses.
    unsafe { b.launch(cfg) }?;
    Ok(())
}

/// `apply_penalties`: the sampler's penalties in place, `entries` (row, token) pairs
/// (two i32 each, a token once a row), `subtract` one amount an entry, `rep` one
/// repetition penalty a row (see `gpu_ref::apply_penalties`).
pub fn apply_penalties(
    k: &Kernels,
    logits: &mut CudaSlice<f32>,
    vocab: usize,
    entries: &CudaSlice<i32>,
    subtract: &CudaSlice<f32>,
    rep: &CudaSlice<f32>,
    n: usize,
) -> Result<(), CudaError> {
    if n == 0 {
        return Ok(());
    }
    if entries.len() < 2 * n || subtract.len() < n {
        return Err(CudaError::Shape(format!(
            "apply_penalties: {n} entries need {} ids and {n} amounts",
            2 * n
        )));
    }
    let f = k.function("sampling.cu", "apply_penalties")?;
    let (v, count) = (dim(vocab)?, dim(n)?);
    let cfg = config(n.div_ceil(256), 1, 1, 256)?;
    let mut b = k.stream.launch_builder(&f);
    b.arg(&mut *logits)
        .arg(&v)
        .arg(entries)
        .arg(subtract)
        .arg(rep)
        .arg(&count);
    // SAFETY: argument types and order match `apply_penalties`; the entry arrays' lengths
    // were checked above. The rows and tokens an entry names are the caller's to keep
    // inside `logits` and `rep` (the backend builds them from its own rows and a
    // vocabulary-bounded token list).
    unsafe { b.launch(cfg) }?;
    Ok(())
}

/// `softmax_rows`: probabilities of `logits / temperature`.
pub fn softmax_rows(
    k: &Kernels,
    logits: &CudaSlice<f32>,
    probs: &mut CudaSlice<f32>,
    rows: usize,
    vocab: usize,
    temperature: f32,
) -> Result<(), CudaError> {
    let f = k.function("sampling.cu", "softmax_rows")?;
    let v = dim(vocab)?;
    let cfg = config(rows, 1, 1, 1024)?;
    let mut b = k.stream.launch_builder(&f);
    b.arg(logits).arg(&mut *probs).arg(&v).arg(&temperature);
    // SAFETY: as in `decode_attention_kv`.
    unsafe { b.launch(cfg) }?;
    Ok(())
}

/// `embed_rows`: `out[t] = table[ids[t]]`, rows of `hidden` bf16.
pub fn embed_rows(
    k: &Kernels,
    table: &CudaSlice<u16>,
    ids: &CudaSlice<i32>,
    out: &mut CudaSlice<u16>,
    tokens: usize,
    hidden: usize,
) -> Result<(), CudaError> {
    let f = k.function("act.cu", "embed_rows")?;
    let h = dim(hidden)?;
    let cfg = config(tokens, 1, 1, 128)?;
    let mut b = k.stream.launch_builder(&f);
    b.arg(table).arg(ids).arg(&mut *out).arg(&h);
    // SAFETY: as in `decode_attention_kv`.
    unsafe { b.launch(cfg) }?;
    Ok(())
}

/// Most token rows [`gemv`] takes; more go to a GEMM.
pub const GEMV_MAX_TOKENS: usize = 8;

/// The token rows a [`gemv`] of `tokens` rows reads from `x` and writes to `y` (the count
/// rounded up to 1, 2, 4 or 8).
pub fn gemv_rows(tokens: usize) -> usize {
    tokens.max(1).next_power_of_two()
}

/// What a [`gemv`] multiplies: bf16 rows, the RMS-normalised rows of the f32 residual
/// stream (scaled by `weight`), or SiLU(gate) * up of fused gate|up rows (`2 * cols` wide).
/// `Norm { late: true }` runs the experimental `gemv_norm_late_t*`: the norm applied after
/// the sum, nothing rounded before it (`gpu_ref::gemv_norm_late_f32`).
pub enum GemvInput<'a> {
    Plain(&'a CudaSlice<u16>),
    Norm {
        residual: &'a CudaSlice<f32>,
        weight: &'a CudaSlice<u16>,
        eps: f32,
        late: bool,
    },
    SiluOf(&'a CudaSlice<u16>),
}

/// Where a [`gemv`]'s rows go: stored as bf16, or added to the f32 residual stream.
pub enum GemvOutput<'a> {
    Bf16(&'a mut CudaSlice<u16>),
    AddTo(&'a mut CudaSlice<f32>),
}

/// `gemv*_t{T}`: `y[t][r] = sum_c w[r][c] * x[t][c]` for `tokens` (at most
/// [`GEMV_MAX_TOKENS`]) rows; `w` is `[rows][cols]` bf16, `cols` a multiple of 8. The input
/// must hold [`gemv_rows`]`(tokens)` rows (the extra rows are read, their results
/// dropped). Supported pairs: plain or normalised input into bf16, plain or SiLU input
/// added to the residual.
#[allow(clippy::too_many_arguments)]
pub fn gemv(
    k: &Kernels,
    w: &CudaSlice<u16>,
    input: GemvInput<'_>,
    output: GemvOutput<'_>,
    tokens: usize,
    rows: usize,
    cols: usize,
) -> Result<(), CudaError> {
    let t = gemv_rows(tokens);
    let shape =
        |what: String| CudaError::Shape(format!("gemv ({rows}x{cols}, {tokens} tokens): {what}"));
    if tokens == 0 || tokens > GEMV_MAX_TOKENS || !cols.is_multiple_of(8) {
        return Err(shape(format!(
            "needs 1..={GEMV_MAX_TOKENS} tokens and a multiple of 8 columns"
        )));
    }
    if w.len() < rows * cols {
        return Err(shape(format!("{} weights", w.len())));
    }
    let in_len = match &input {
        GemvInput::Plain(x) => x.len() >= t * cols,
        GemvInput::Norm {
            residual, weight, ..
        } => residual.len() >= t * cols && weight.len() >= cols,
        GemvInput::SiluOf(gu) => gu.len() >= t * 2 * cols,
    };
    let out_len = match &output {
        GemvOutput::Bf16(y) => y.len() >= tokens * rows,
        GemvOutput::AddTo(r) => r.len() >= tokens * rows,
    };
    if !in_len || !out_len {
        return Err(shape("input or output buffer too short".into()));
    }
    let (r, c, n) = (dim(rows)?, dim(cols)?, dim(tokens)?);
    let cfg = config(rows.div_ceil(4), 1, 1, 128)?;
    // `SOV_GEMV_STAGE=regs`: the register design where it exists (1-2 tokens, not the
    // late norm).
    let entry = |name: &str| {
        let regs = k.gemv_regs && t <= 2 && name != "gemv_norm_late";
        let suffix = if regs { "_regs" } else { "" };
        k.function("gemv.cu", &format!("{name}{suffix}_t{t}"))
    };
    match (input, output) {
        (GemvInput::Plain(x), GemvOutput::Bf16(y)) => {
            let f = entry("gemv")?;
            let mut b = PdlLaunch::new(k, &f);
            b.arg(w).arg(x).arg(y).arg(&r).arg(&c).arg(&n);
            // SAFETY: as in `decode_attention_kv`; the lengths were checked above.
            unsafe { b.launch(cfg) }?;
        }
        (
            GemvInput::Norm {
                residual,
                weight,
                eps,
                late,
            },
            GemvOutput::Bf16(y),
        ) => {
            let f = entry(if late { "gemv_norm_late" } else { "gemv_norm" })?;
            let mut b = PdlLaunch::new(k, &f);
            b.arg(w)
                .arg(residual)
                .arg(weight)
                .arg(&eps)
                .arg(y)
                .arg(&r)
                .arg(&c)
                .arg(&n);
            // SAFETY: as above.
            unsafe { b.launch(cfg) }?;
        }
        (GemvInput::Plain(x), GemvOutput::AddTo(res)) => {
            let f = entry("gemv_add")?;
            let mut b = PdlLaunch::new(k, &f);
            b.arg(w).arg(x).arg(res).arg(&r).arg(&c).arg(&n);
            // SAFETY: as above.
            unsafe { b.launch(cfg) }?;
        }
        (GemvInput::SiluOf(gu), GemvOutput::AddTo(res)) => {
            let f = entry("gemv_silu_add")?;
            let mut b = PdlLaunch::new(k, &f);
            b.arg(w).arg(gu).arg(res).arg(&r).arg(&c).arg(&n);
            // SAFETY: as above.
            unsafe { b.launch(cfg) }?;
        }
        _ => {
            return Err(shape(
                "no kernel for this input and output (norm or plain into bf16, plain or SiLU added to the residual)".into(),
            ));
        }
    }
    Ok(())
}

/// `rms_norm_f32`: `out = rms_norm(residual)` over `rows` rows of `dim` (f32 in, bf16 out).
pub fn rms_norm_f32(
    k: &Kernels,
    residual: &CudaSlice<f32>,
    weight: &CudaSlice<u16>,
    out: &mut CudaSlice<u16>,
    rows: usize,
    dim_: usize,
    eps: f32,
) -> Result<(), CudaError> {
    let f = k.function("norm.cu", "rms_norm_f32")?;
    let n = dim(dim_)?;
    let cfg = config(rows, 1, 1, 256)?;
    let mut b = PdlLaunch::new(k, &f);
    b.arg(residual).arg(weight).arg(&mut *out).arg(&n).arg(&eps);
    // SAFETY: as in `decode_attention_kv`.
    unsafe { b.launch(cfg) }?;
    Ok(())
}

/// `embed_rows_f32`: `residual[t] = table[ids[t]]` (bf16 table rows widened to f32).
pub fn embed_rows_f32(
    k: &Kernels,
    table: &CudaSlice<u16>,
    ids: &CudaSlice<i32>,
    residual: &mut CudaSlice<f32>,
    tokens: usize,
    hidden: usize,
) -> Result<(), CudaError> {
    let f = k.function("act.cu", "embed_rows_f32")?;
    let h = dim(hidden)?;
    let cfg = config(tokens, 1, 1, 128)?;
    let mut b = k.stream.launch_builder(&f);
    b.arg(table).arg(ids).arg(&mut *residual).arg(&h);
    // SAFETY: as in `decode_attention_kv`.
    unsafe { b.launch(cfg) }?;
    Ok(())
}

/// `pdl_late_copy` (the GPU check's PDL tests, pdl_check.cu): copies `src` into `dst` at
/// byte `dst_offset`, `delay_ns` after it starts, having let its successor launch first
/// thing (PDL builds): a successor that reads before its `griddepcontrol.wait` sees
/// `dst`'s old bytes.
pub fn pdl_late_copy<S, D>(
    k: &Kernels,
    src: &CudaSlice<S>,
    dst: &mut CudaSlice<D>,
    dst_offset: usize,
    delay_ns: i64,
) -> Result<(), CudaError> {
    let n = src.len() * std::mem::size_of::<S>();
    let dst_bytes = dst.len() * std::mem::size_of::<D>();
    if dst_offset + n > dst_bytes {
        return Err(CudaError::Shape(format!(
            "pdl_late_copy: {n} bytes at {dst_offset} do not fit {dst_bytes} bytes"
        )));
    }
    let f = k.function("pdl_check.cu", "pdl_late_copy")?;
    let (off, len) = (dst_offset as i64, n as i64);
    let cfg = config(n.div_ceil(128).clamp(1, 64), 1, 1, 128)?;
    let mut b = PdlLaunch::new(k, &f);
    b.arg(src).arg(dst).arg(&off).arg(&len).arg(&delay_ns);
    // SAFETY: (src, dst, dst_offset, n, delay_ns) as the kernel takes them; the copy stays
    // inside both buffers (checked above); the kernel waits on its predecessor first.
    unsafe { b.launch(cfg) }?;
    Ok(())
}

/// `pdl_probe` (pdl_check.cu): `seen = [buf[0] before griddepcontrol.wait, after it]`.
pub fn pdl_probe(
    k: &Kernels,
    buf: &CudaSlice<u32>,
    seen: &mut CudaSlice<u32>,
) -> Result<(), CudaError> {
    if buf.len() < 4 || seen.len() < 2 {
        return Err(CudaError::Shape(
            "pdl_probe: buf needs 4 words, seen 2".into(),
        ));
    }
    let f = k.function("pdl_check.cu", "pdl_probe")?;
    let mut b = PdlLaunch::new(k, &f);
    b.arg(buf).arg(seen);
    // SAFETY: (buf, seen) as the kernel takes them, both long enough (checked above).
    unsafe { b.launch(config(1, 1, 1, 32)?) }?;
    Ok(())
}
