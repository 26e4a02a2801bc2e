//! The CUDA kernels (kernels/cuda/*.cu): embedded sources, NVRTC compilation to a cubin
//! for the device's own architecture with an on-disk cache keyed by (source hash, arch,
//! NVRTC version), and module loading through cudarc.
//!
//! cudarc loads libcuda and libnvrtc at run time and panics on the first call into a
//! missing library, so every entry point here checks for the library first and returns
//! [`CudaError::NoDriver`] / [`CudaError::NoNvrtc`] instead: a machine without CUDA gets
//! a clear error, never a panic.

use std::collections::HashMap;
use std::ffi::CString;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaStream};
use cudarc::nvrtc::Ptx;

pub mod launch;

/// Shared device helpers, inlined into every program (see [`program_source`]).
const COMMON: &str = include_str!("../../cuda/common.cuh");
/// NVRTC options for every kernel, one per line (shared with kernels/tools/nvrtc_check.py).
const OPTIONS: &str = include_str!("../../cuda/nvrtc_options.txt");

/// Every kernel source: file name and text.
pub const SOURCES: &[(&str, &str)] = &[
    ("act.cu", include_str!("../../cuda/act.cu")),
    (
        "decode_attention.cu",
        include_str!("../../cuda/decode_attention.cu"),
    ),
    ("gemv.cu", include_str!("../../cuda/gemv.cu")),
    ("norm.cu", include_str!("../../cuda/norm.cu")),
    ("pdl_check.cu", include_str!("../../cuda/pdl_check.cu")),
    (
        "prefill_attention.cu",
        include_str!("../../cuda/prefill_attention.cu"),
    ),
    (
        "prefill_wgmma.cu",
        include_str!("../../cuda/prefill_wgmma.cu"),
    ),
    ("rope_kv.cu", include_str!("../../cuda/rope_kv.cu")),
    ("sampling.cu", include_str!("../../cuda/sampling.cu")),
];

#[derive(Debug, thiserror::Error)]
pub enum CudaError {
    #[error(
        "no CUDA driver: libcuda could not be loaded (is the NVIDIA driver installed and is this a GPU machine?)"
    )]
    NoDriver,
    #[error(
        "no NVRTC: libnvrtc (CUDA 13) could not be loaded; install the CUDA 13 toolkit or put libnvrtc.so.13 on LD_LIBRARY_PATH"
    )]
    NoNvrtc,
    #[error("unknown kernel source {0}")]
    UnknownSource(String),
    #[error("kernel shape: {0}")]
    Shape(String),
    #[error("NVRTC failed to compile {source_name} for {arch}: {reason}\n{log}")]
    Compile {
        source_name: String,
        arch: String,
        reason: String,
        log: String,
    },
    #[error("CUDA driver: {0}")]
    Driver(#[from] cudarc::driver::DriverError),
    #[error("{0}")]
    Setting(String),
    #[error("kernel cache {path}: {source}")]
    Cache {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Whether libcuda can be loaded (no cudarc call is made otherwise).
pub fn driver_present() -> bool {
    // SAFETY: only tries to dlopen the library and drops the handle.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

/// Whether libnvrtc can be loaded.
pub fn nvrtc_present() -> bool {
    // SAFETY: as above.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

/// The NVRTC options of every program (without the architecture).
pub fn nvrtc_options() -> Vec<String> {
    OPTIONS
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(String::from)
        .collect()
}

/// The architecture a source is compiled for on a device of `device_arch` (e.g.
/// "sm_90"), or `None` where it does not run: `prefill_wgmma.cu` uses Hopper's
/// arch-specific wgmma instructions, so it builds for sm_90a on sm_90 devices only (an
/// sm_90a cubin runs on H100 and H200); every other source builds for the device's own
/// architecture.
pub fn build_arch(source: &str, device_arch: &str) -> Option<String> {
    if source == "prefill_wgmma.cu" {
        (device_arch == "sm_90").then(|| "sm_90a".to_string())
    } else {
        Some(device_arch.to_string())
    }
}

/// The define that compiles the programmatic-dependent-launch code in (sm_90+; see
/// `pdl_wait` in common.cuh and [`Kernels::pdl`]).
pub const PDL_DEFINE: &str = "-DSOV_PDL=1";

/// Whether a source has programmatic-dependent-launch code (calls `pdl_wait`): only these
/// get a PDL build of their own; the others are built as usual in a PDL worker.
pub fn has_pdl_code(name: &str) -> bool {
    SOURCES
        .iter()
        .any(|(n, text)| *n == name && text.contains("pdl_wait();"))
}

/// The shared-memory carveout (percent of the SM's unified L1 / shared memory) the
/// decode path's kernels (the sources with PDL code: GEMVs, RoPE + KV write, decode
/// attention, norms) ask the driver for, from `SOV_SMEM_CARVEOUT` (`-1`: the driver's
/// choice; `0..=100`) or by default: the most shared memory with PDL, the driver's choice
/// without. With PDL a kernel runs beside its predecessor's last CTAs, which it can only
/// do on an SM whose carveout suits both; the GEMVs want 16-32 KB a CTA (up to 140 KB an
/// SM) and the kernels between them almost none, so one setting for all of them keeps
/// the driver from having to choose between the two.
pub fn carveout_setting(env: Option<&str>, pdl: bool) -> Result<Option<i32>, CudaError> {
    match env.map(str::trim) {
        None | Some("") => Ok(pdl.then_some(100)),
        Some(v) => match v.parse::<i32>() {
            Ok(-1) => Ok(None),
            Ok(c @ 0..=100) => Ok(Some(c)),
            _ => Err(CudaError::Setting(format!(
                "SOV_SMEM_CARVEOUT={v}: expected -1 (the driver's choice) or a percentage 0..=100 \
                 of the unified L1 / shared memory"
            ))),
        },
    }
}

/// Whether the decode GEMVs run the register design of run 8 and before
/// (`SOV_GEMV_STAGE=regs`: `gemv*_regs_t1/t2` for plain, normalised, added and SiLU inputs
/// at 1-2 tokens, kept to measure against) instead of the default shared-memory one
/// (unset or `smem`).
pub fn gemv_regs_setting(env: Option<&str>) -> Result<bool, CudaError> {
    match env.map(str::trim) {
        None | Some("") | Some("smem") => Ok(false),
        Some("regs") => Ok(true),
        Some(v) => Err(CudaError::Setting(format!(
            "SOV_GEMV_STAGE={v}: expected smem (the default: weights through shared memory) \
             or regs (run 8's register design)"
        ))),
    }
}

/// The options of one build: [`nvrtc_options`], plus [`PDL_DEFINE`] for a PDL build.
fn build_options(pdl: bool) -> Vec<String> {
    let mut o = nvrtc_options();
    if pdl {
        o.push(PDL_DEFINE.to_string());
    }
    o
}

/// The program text NVRTC compiles: the source with `common.cuh` inlined, so no include
/// path (and no CUDA toolkit header) is needed at run time.
pub fn program_source(name: &str) -> Result<String, CudaError> {
    let (_, text) = SOURCES
        .iter()
        .find(|(n, _)| *n == name)
        .ok_or_else(|| CudaError::UnknownSource(name.to_string()))?;
    Ok(text.replace("#include \"common.cuh\"", COMMON))
}

/// NVRTC's version, e.g. (13, 0).
pub fn nvrtc_version() -> Result<(i32, i32), CudaError> {
    if !nvrtc_present() {
        return Err(CudaError::NoNvrtc);
    }
    let (mut major, mut minor) = (0, 0);
    // SAFETY: the library is present; the pointers are valid for the call.
    let rc = unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor) };
    if rc != cudarc::nvrtc::sys::nvrtcResult::NVRTC_SUCCESS {
        return Err(CudaError::NoNvrtc);
    }
    Ok((major, minor))
}

/// Compile one kernel source to a cubin for `arch` (e.g. "sm_90"), with the
/// programmatic-dependent-launch code when `pdl`. Needs libnvrtc, not a GPU.
pub fn compile_cubin(name: &str, arch: &str, pdl: bool) -> Result<Vec<u8>, CudaError> {
    use cudarc::nvrtc::{result, sys};
    if !nvrtc_present() {
        return Err(CudaError::NoNvrtc);
    }
    let fail = |reason: String, log: String| CudaError::Compile {
        source_name: name.to_string(),
        arch: arch.to_string(),
        reason,
        log,
    };
    let src =
        CString::new(program_source(name)?).map_err(|e| fail(e.to_string(), String::new()))?;
    let cname = CString::new(name).map_err(|e| fail(e.to_string(), String::new()))?;
    let mut opts = build_options(pdl);
    opts.push(format!("--gpu-architecture={arch}"));
    let prog = result::create_program(&src, Some(&cname))
        .map_err(|e| fail(e.to_string(), String::new()))?;
    // SAFETY: `prog` is a live program until `destroy_program` below; buffers are sized
    // from NVRTC's own size queries.
    unsafe {
        let compiled = result::compile_program(prog, &opts);
        let log = result::get_program_log(prog)
            .map(|l| {
                let bytes: Vec<u8> = l.iter().map(|c| *c as u8).take_while(|b| *b != 0).collect();
                String::from_utf8_lossy(&bytes).into_owned()
            })
            .unwrap_or_default();
        let out = match compiled {
            Err(e) => Err(fail(e.to_string(), log)),
            Ok(()) => {
                let mut size = 0usize;
                let rc = sys::nvrtcGetCUBINSize(prog, &mut size);
                if rc != sys::nvrtcResult::NVRTC_SUCCESS || size == 0 {
                    Err(fail(
                        format!("no cubin ({rc:?}); is {arch} a real architecture?"),
                        log,
                    ))
                } else {
                    let mut buf = vec![0u8; size];
                    let rc = sys::nvrtcGetCUBIN(prog, buf.as_mut_ptr().cast());
                    if rc == sys::nvrtcResult::NVRTC_SUCCESS {
                        Ok(buf)
                    } else {
                        Err(fail(format!("nvrtcGetCUBIN: {rc:?}"), log))
                    }
                }
            }
        };
        let _ = result::destroy_program(prog);
        out
    }
}

/// Stable 64-bit FNV-1a (the cache key must not change between Rust versions).
fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for b in p.iter() {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        h ^= 0xff;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// Cache file of one program for one architecture: the key covers the program text, the
/// options (the PDL define included) and the NVRTC version, so any change compiles afresh.
pub fn cache_path(dir: &Path, name: &str, arch: &str, pdl: bool) -> Result<PathBuf, CudaError> {
    let (major, minor) = nvrtc_version()?;
    let src = program_source(name)?;
    let opts = build_options(pdl).join("\n");
    let version = format!("{major}.{minor}");
    let key = fnv1a(&[
        src.as_bytes(),
        opts.as_bytes(),
        version.as_bytes(),
        arch.as_bytes(),
    ]);
    let stem = name.trim_end_matches(".cu");
    Ok(dir.join(format!("{stem}-{key:016x}-{arch}.cubin")))
}

/// The cubin of `name` for `arch`, from the cache or freshly compiled (and then cached,
/// written atomically). Returns whether it came from the cache.
pub fn cached_cubin(
    dir: &Path,
    name: &str,
    arch: &str,
    pdl: bool,
) -> Result<(Vec<u8>, bool), CudaError> {
    let path = cache_path(dir, name, arch, pdl)?;
    if let Ok(bytes) = std::fs::read(&path)
        && !bytes.is_empty()
    {
        return Ok((bytes, true));
    }
    let cubin = compile_cubin(name, arch, pdl)?;
    let io = |source| CudaError::Cache {
        path: path.clone(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(io)?;
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, &cubin).map_err(io)?;
    std::fs::rename(&tmp, &path).map_err(io)?;
    Ok((cubin, false))
}

/// A device with every kernel module loaded.
pub struct Kernels {
    pub ctx: Arc<CudaContext>,
    pub stream: Arc<CudaStream>,
    pub arch: String,
    /// Streaming multiprocessors of the device.
    pub sms: usize,
    /// Programmatic dependent launch (experimental: `SOV_PDL=1` on sm_90 and later): the
    /// sources with PDL code were built with [`PDL_DEFINE`] and the decode path's
    /// launchers (GEMVs, RoPE + KV write, decode attention and its merge, the final norm)
    /// launch with the programmatic-stream-serialization attribute, so each starts while
    /// its predecessor finishes: a GEMV copies its first weights into shared memory, then
    /// waits for its predecessor before touching anything a kernel writes.
    pub pdl: bool,
    /// The shared-memory carveout the decode path's kernels ask for ([`carveout_setting`]).
    pub carveout: Option<i32>,
    /// The decode GEMVs' register design instead of the shared-memory one
    /// ([`gemv_regs_setting`]).
    pub gemv_regs: bool,
    modules: HashMap<&'static str, Arc<CudaModule>>,
    /// Entry points already looked up (a launch then costs no driver lookup).
    functions: std::sync::Mutex<HashMap<String, CudaFunction>>,
}

impl Kernels {
    /// Open device `ordinal` and load every kernel (compiling what the cache lacks).
    pub fn new(ordinal: usize, cache_dir: &Path) -> Result<Self, CudaError> {
        if !driver_present() {
            return Err(CudaError::NoDriver);
        }
        if !nvrtc_present() {
            return Err(CudaError::NoNvrtc);
        }
        let ctx = CudaContext::new(ordinal)?;
        // Everything runs on one stream, so cudarc's cross-stream events are not needed;
        // without them a stream can be captured into a CUDA graph (the worker's decode
        // steps). The stream is a created one: the legacy default stream cannot be
        // captured.
        // SAFETY: no buffer is shared between streams (there is one).
        unsafe { ctx.disable_event_tracking() };
        let (major, minor) = ctx.compute_capability()?;
        let arch = format!("sm_{major}{minor}");
        let sms = ctx
            .attribute(
                cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
            )
            .map(|v| v.max(1) as usize)
            .unwrap_or(1);
        let stream = ctx.new_stream()?;
        let pdl = major >= 9 && std::env::var("SOV_PDL").is_ok_and(|v| v == "1");
        let carveout = carveout_setting(std::env::var("SOV_SMEM_CARVEOUT").ok().as_deref(), pdl)?;
        let gemv_regs = gemv_regs_setting(std::env::var("SOV_GEMV_STAGE").ok().as_deref())?;
        let mut modules = HashMap::new();
        for (name, _) in SOURCES {
            let Some(build) = build_arch(name, &arch) else {
                continue;
            };
            let (cubin, _) = cached_cubin(cache_dir, name, &build, pdl && has_pdl_code(name))?;
            modules.insert(*name, ctx.load_module(Ptx::from_binary(cubin))?);
        }
        Ok(Self {
            ctx,
            stream,
            arch,
            sms,
            pdl,
            carveout,
            gemv_regs,
            modules,
            functions: std::sync::Mutex::new(HashMap::new()),
        })
    }

    /// Whether a source was built for this device (see [`build_arch`]).
    pub fn has_source(&self, source: &str) -> bool {
        self.modules.contains_key(source)
    }

    /// An entry point of one source, e.g. `("decode_attention.cu", "decode_attention_hd64_g3")`.
    pub fn function(&self, source: &str, entry: &str) -> Result<CudaFunction, CudaError> {
        let mut cache = self
            .functions
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(f) = cache.get(entry) {
            return Ok(f.clone());
        }
        let m = self
            .modules
            .get(source)
            .ok_or_else(|| CudaError::UnknownSource(source.to_string()))?;
        let f = m.load_function(entry)?;
        if let Some(c) = self.carveout.filter(|_| has_pdl_code(source)) {
            f.set_attribute(
                cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT,
                c,
            )?;
        }
        cache.insert(entry.to_string(), f.clone());
        Ok(f)
    }
}

#[cfg(test)]
mod tests;
