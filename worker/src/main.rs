//! `worker`: serve a model over OpenAI HTTP and gRPC, fetch known models, benchmark.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use worker::api::{self, Service, WorkerInfo};
use worker::backend::cuda::{CudaBackend, kv_block_bytes_bf16, kv_block_bytes_fp8};
use worker::backend::kv_scales::{self, KvScales};
use worker::backend::{Backend, KvDtype, cpu::CpuBackend, kv_block_bytes};
use worker::chat::ChatTemplate;
use worker::engine::{self, EngineConfig};
use worker::{fetch, model};

#[derive(Parser)]
#[command(
    name = "worker",
    version,
    about = "Sovereign inference worker: Llama-family models on a paged KV cache"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

// Parsed once at start; boxing the large variant buys nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Cmd {
    /// Serve a model over OpenAI-compatible HTTP and the gateway's gRPC contract.
    Serve(ServeArgs),
    /// Download a known model into the cache directory and print its path.
    FetchModel {
        /// Model alias (known: smollm2).
        name: String,
    },
    /// Measure prefill and decode throughput, TTFT and peak RSS; prints JSON.
    Bench(BenchArgs),
    /// Benchmark stand-in: answer every request at once with fixed tokens (gRPC and
    /// OpenAI HTTP), to measure the gateway itself. Never serves users.
    Fake(FakeArgs),
    /// Compare a device's forward pass with the CPU backend's on the same steps (prefill,
    /// decode at batch 3, 2, 1, device-picked greedy tokens); prints JSON, exit 1 when
    /// they differ beyond bf16 tolerance.
    CheckBackend(CheckArgs),
    /// Measure per-(layer, KV head) scales for an FP8 KV cache: runs a calibration text
    /// through the CPU backend and writes, for each head, its largest |K| and |V| over 448
    /// (e4m3's largest value) as JSON for `--kv-cache-scales`.
    CalibrateKv(CalibrateArgs),
}

#[derive(Args)]
struct CalibrateArgs {
    /// A GGUF file, a Hugging Face model directory, or a known alias.
    #[arg(long)]
    model: String,
    /// Where to write the scales (JSON).
    #[arg(long)]
    out: PathBuf,
    /// Calibration text (UTF-8); default: administrative passages in thirteen EU
    /// languages built into the worker. Use text like what the worker will serve.
    #[arg(long)]
    text_file: Option<PathBuf>,
    /// At most this many tokens of the text (and of the model's context).
    #[arg(long, default_value_t = 2048)]
    max_tokens: usize,
    /// CPU threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
}

#[derive(Args)]
struct CheckArgs {
    /// A GGUF file, a Hugging Face model directory, or a known alias.
    #[arg(long)]
    model: String,
    /// The backend checked against the CPU: `cuda:N` (or `cpu`, which checks the check).
    #[arg(long, default_value = "cuda:0", value_parser = parse_device)]
    device: Device,
    /// CPU threads of the reference (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// KV cache storage of both backends (`auto` or `fp8`; see `serve --help`).
    #[arg(long, default_value = "auto", value_parser = parse_kv_dtype)]
    kv_cache_dtype: KvDtype,
    /// Per-head FP8 scales of both backends (from `worker calibrate-kv`).
    #[arg(long)]
    kv_cache_scales: Option<PathBuf>,
}

#[derive(Args)]
struct FakeArgs {
    #[arg(long, default_value = "127.0.0.1:8080")]
    http_addr: SocketAddr,
    #[arg(long, default_value = "127.0.0.1:50051")]
    grpc_addr: SocketAddr,
    /// Model id it claims to serve.
    #[arg(long, default_value = "fake")]
    model: String,
    #[arg(long, default_value = "fake")]
    pool: String,
    #[arg(long, default_value = "EU")]
    country: String,
    /// Tokens per answer.
    #[arg(long, default_value_t = 16)]
    tokens: u32,
    /// Runtime threads.
    #[arg(long, default_value_t = 1)]
    threads: usize,
}

#[derive(Args)]
struct BenchArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Prompt length for the prefill / TTFT measurement.
    #[arg(long, default_value_t = 128)]
    prompt_tokens: usize,
    /// Tokens each sequence decodes in the decode measurement.
    #[arg(long, default_value_t = 64)]
    decode_tokens: usize,
    /// Decode batch sizes, comma-separated.
    #[arg(long, default_value = "1,8,32", value_delimiter = ',')]
    batches: Vec<usize>,
    /// Repetitions of each measurement (the median is reported).
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// Sampling temperature of every request (0: greedy, the default; OpenAI clients
    /// default to 1). Seeded, so runs repeat.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Top-k of every request (0: off).
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// Top-p of every request (1: off).
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// Min-p of every request (0: off).
    #[arg(long, default_value_t = 0.0)]
    min_p: f32,
}

#[derive(Args, Clone)]
struct ModelArgs {
    /// A GGUF file, a Hugging Face model directory, or a known alias (smollm2) that is
    /// fetched into the cache on first use.
    #[arg(long)]
    model: String,
    /// CPU threads for the forward pass (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Where the forward pass runs: `cpu`, or `cuda:N` (GPU N, our CUDA kernels and
    /// cuBLAS; bf16 weights and KV cache). Kernels are compiled with NVRTC on first use
    /// and cached in `$SOV_KERNEL_CACHE` (default ~/.cache/sovereign-gateway/kernels).
    #[arg(long, default_value = "cpu", value_parser = parse_device)]
    device: Device,
    /// Memory for the KV cache, in MiB.
    #[arg(long, default_value_t = 512)]
    kv_cache_mb: usize,
    /// KV cache storage: `auto` (f32 on the CPU, bf16 on CUDA) or `fp8` (e4m3 with a scale
    /// per layer and KV head, 1.0 unless `--kv-cache-scales`: on CUDA half of bf16's
    /// memory, so twice the blocks; the CPU rounds its K/V values the same way, for the
    /// same results, without saving memory).
    #[arg(long, default_value = "auto", value_parser = parse_kv_dtype)]
    kv_cache_dtype: KvDtype,
    /// The FP8 cache's scales per (layer, KV head), a JSON file written by `worker
    /// calibrate-kv` (needs `--kv-cache-dtype fp8`).
    #[arg(long)]
    kv_cache_scales: Option<PathBuf>,
    /// Longest sequence (prompt + completion); default: the model's context, bounded by
    /// the KV cache.
    #[arg(long)]
    max_model_len: Option<usize>,
    /// Most sequences in one batch.
    #[arg(long, default_value_t = 64)]
    max_num_seqs: usize,
    /// Token budget of one engine step (decode tokens + prefill chunk tokens).
    #[arg(long, default_value_t = 512)]
    max_batched_tokens: usize,
    /// Largest prefill chunk of one sequence in one step.
    #[arg(long, default_value_t = 256)]
    max_prefill_chunk: usize,
    /// Requests allowed to wait beyond the running batch before new ones get 429.
    #[arg(long, default_value_t = 256)]
    max_queue: usize,
}

#[derive(Args)]
struct ServeArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// OpenAI-compatible HTTP listener.
    #[arg(long, default_value = "127.0.0.1:8080")]
    http_addr: SocketAddr,
    /// gRPC listener (the gateway's contract).
    #[arg(long, default_value = "127.0.0.1:50051")]
    grpc_addr: SocketAddr,
    /// Pool this worker belongs to (reported by Info and /v1/models).
    #[arg(long, default_value = "local")]
    pool: String,
    /// ISO 3166-1 alpha-2 country the worker runs in.
    #[arg(long, default_value = "EU")]
    country: String,
    /// Model id clients use (default: the alias, or the file/directory name).
    #[arg(long)]
    served_model_name: Option<String>,
    /// Largest accepted request body, in bytes.
    #[arg(long, default_value_t = api::http::DEFAULT_BODY_LIMIT)]
    body_limit: usize,
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::FetchModel { name } => {
            let p = fetch::fetch(&name)?;
            println!("{}", p.display());
            Ok(())
        }
        Cmd::Serve(a) => serve(a),
        Cmd::Fake(a) => fake(a),
        Cmd::CheckBackend(a) => check_backend(a),
        Cmd::CalibrateKv(a) => calibrate_kv(a),
        Cmd::Bench(a) => {
            let sampling = worker::sampler::SamplingParams {
                temperature: a.temperature,
                top_k: a.top_k,
                top_p: a.top_p,
                min_p: a.min_p,
                seed: Some(1),
                ..Default::default()
            };
            sampling
                .validate()
                .context("bench: invalid sampling options")?;
            let svc = start_engine(&a.model, None, "bench", "EU")?;
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()?;
            let cfg = worker::bench::BenchConfig {
                prompt_tokens: a.prompt_tokens,
                decode_tokens: a.decode_tokens,
                batches: a.batches,
                reps: a.reps.max(1),
                sampling,
            };
            let mut report = rt.block_on(worker::bench::run(&svc.engine, &cfg))?;
            report["model"] = svc.info.model_id.clone().into();
            report["backend"] = svc.info.backend.clone().into();
            println!("{report}");
            Ok(())
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Device {
    Cpu,
    Cuda(usize),
}

fn parse_kv_dtype(s: &str) -> Result<KvDtype, String> {
    match s {
        "auto" => Ok(KvDtype::Auto),
        "fp8" | "fp8_e4m3" => Ok(KvDtype::Fp8),
        _ => Err(format!("unknown KV cache dtype {s:?} (auto, fp8)")),
    }
}

fn parse_device(s: &str) -> Result<Device, String> {
    match s {
        "cpu" => Ok(Device::Cpu),
        "cuda" => Ok(Device::Cuda(0)),
        _ => s
            .strip_prefix("cuda:")
            .and_then(|n| n.parse().ok())
            .map(Device::Cuda)
            .ok_or_else(|| format!("`{s}` is not a device: use cpu, cuda or cuda:N")),
    }
}

/// Where compiled CUDA kernels are cached: `$SOV_KERNEL_CACHE`, else next to the model
/// cache.
fn kernel_cache_dir() -> PathBuf {
    std::env::var_os("SOV_KERNEL_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let models = fetch::cache_dir();
            models
                .parent()
                .map(|p| p.join("kernels"))
                .unwrap_or_else(|| models.join("kernels"))
        })
}

/// The FP8 scales `--kv-cache-scales` names, checked against the model and the cache.
fn load_kv_scales(
    path: Option<&PathBuf>,
    kv: KvDtype,
    cfg: &model::ModelConfig,
) -> Result<Option<KvScales>> {
    let Some(path) = path else { return Ok(None) };
    if kv != KvDtype::Fp8 {
        bail!("--kv-cache-scales needs --kv-cache-dtype fp8");
    }
    Ok(Some(KvScales::load(path, cfg.n_layers, cfg.n_kv_heads)?))
}

/// The backend for `device`, with the FP8 cache's `scales` when given.
fn make_backend(
    device: Device,
    cfg: &model::ModelConfig,
    weights: Arc<model::Weights>,
    (num_blocks, block_size): (usize, usize),
    (kv, scales): (KvDtype, Option<&KvScales>),
    threads: usize,
) -> Result<Box<dyn Backend>> {
    let mut backend: Box<dyn Backend> = match device {
        Device::Cpu => Box::new(
            CpuBackend::new(cfg.clone(), weights, num_blocks, block_size, threads)?
                .with_kv_dtype(kv),
        ),
        Device::Cuda(n) => Box::new(
            CudaBackend::new(
                cfg.clone(),
                &weights,
                n,
                num_blocks,
                block_size,
                kv,
                &kernel_cache_dir(),
            )
            .with_context(|| format!("--device cuda:{n}"))?,
        ),
    };
    if let Some(s) = scales {
        backend.set_kv_scales(s)?;
    }
    Ok(backend)
}

fn calibrate_kv(a: CalibrateArgs) -> Result<()> {
    let path: PathBuf = fetch::resolve_model(&a.model)?;
    let loaded = model::load(&path).with_context(|| format!("loading model {}", path.display()))?;
    let cfg = loaded.config.clone();
    let text = match &a.text_file {
        Some(f) => std::fs::read_to_string(f)
            .with_context(|| format!("reading --text-file {}", f.display()))?,
        None => kv_scales::DEFAULT_CALIBRATION_TEXT.to_string(),
    };
    let mut tokens = loaded.tokenizer.encode(&text, true, false);
    tokens.truncate(a.max_tokens.min(cfg.max_context));
    if tokens.is_empty() {
        bail!("the calibration text has no tokens");
    }
    let t0 = std::time::Instant::now();
    let scales = kv_scales::calibrate(
        &cfg,
        Arc::new(loaded.weights),
        &tokens,
        256,
        default_threads(a.threads),
        |done, total| {
            eprintln!(
                "calibrate-kv: {done}/{total} tokens ({:.1} s)",
                t0.elapsed().as_secs_f64()
            )
        },
    )?;
    let source = serde_json::json!({"model": path.display().to_string(), "tokens": tokens.len(),
        "text": a.text_file.as_ref().map(|f| f.display().to_string()).unwrap_or_else(|| "built-in".into())});
    let out = serde_json::to_string_pretty(&scales.to_json(source))?;
    std::fs::write(&a.out, out + "\n").with_context(|| format!("writing {}", a.out.display()))?;
    let all = |t: &[Vec<f32>]| {
        t.iter()
            .flatten()
            .copied()
            .fold((f32::MAX, 0f32), |(lo, hi), x| (lo.min(x), hi.max(x)))
    };
    let ((klo, khi), (vlo, vhi)) = (all(&scales.k), all(&scales.v));
    eprintln!(
        "calibrate-kv: {} layers x {} KV heads over {} tokens; K scales {klo:.3e}..{khi:.3e}, V scales {vlo:.3e}..{vhi:.3e}; wrote {}",
        cfg.n_layers,
        cfg.n_kv_heads,
        tokens.len(),
        a.out.display()
    );
    Ok(())
}

/// `--threads`, else every core.
fn default_threads(threads: Option<usize>) -> usize {
    threads.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    })
}

fn check_backend(a: CheckArgs) -> Result<()> {
    let path: PathBuf = fetch::resolve_model(&a.model)?;
    let loaded = model::load(&path).with_context(|| format!("loading model {}", path.display()))?;
    let mut cfg = loaded.config.clone();
    // Three sequences of at most 96 tokens, in blocks of 16.
    let (block_size, num_blocks) = (16, 18);
    cfg.max_context = cfg.max_context.min(num_blocks * block_size);
    let vocab = cfg.vocab_size;
    let threads = default_threads(a.threads);
    let scales = load_kv_scales(a.kv_cache_scales.as_ref(), a.kv_cache_dtype, &cfg)?;
    let weights = Arc::new(loaded.weights);
    let mut reference = CpuBackend::new(
        cfg.clone(),
        Arc::clone(&weights),
        num_blocks,
        block_size,
        threads,
    )?
    .with_kv_dtype(a.kv_cache_dtype);
    if let Some(s) = &scales {
        reference.set_kv_scales(s)?;
    }
    let mut candidate = make_backend(
        a.device,
        &cfg,
        Arc::clone(&weights),
        (num_blocks, block_size),
        (a.kv_cache_dtype, scales.as_ref()),
        threads,
    )?;
    let mut report = worker::backend::compare::compare(&mut reference, candidate.as_mut(), vocab)?;
    report["reference"] = reference.name().into();
    report["candidate"] = candidate.name().into();
    let ok = report["ok"] == serde_json::json!(true);
    println!("{report}");
    if !ok {
        bail!(
            "the {} backend's logits differ from the CPU backend's",
            candidate.name()
        );
    }
    Ok(())
}

fn start_engine(
    a: &ModelArgs,
    served_name: Option<String>,
    pool: &str,
    country: &str,
) -> Result<Service> {
    let path: PathBuf = fetch::resolve_model(&a.model)?;
    let t0 = std::time::Instant::now();
    let loaded = model::load(&path).with_context(|| format!("loading model {}", path.display()))?;
    let mut cfg = loaded.config.clone();
    let block_size = 16;
    let block_bytes = match (a.device, a.kv_cache_dtype) {
        (Device::Cpu, _) => kv_block_bytes(&cfg, block_size),
        (Device::Cuda(_), KvDtype::Auto) => kv_block_bytes_bf16(&cfg, block_size),
        (Device::Cuda(_), KvDtype::Fp8) => kv_block_bytes_fp8(&cfg, block_size),
    };
    let num_blocks = (a.kv_cache_mb << 20) / block_bytes;
    if num_blocks < 2 {
        bail!(
            "--kv-cache-mb {} holds fewer than 2 KV blocks for this model",
            a.kv_cache_mb
        );
    }
    let max_model_len = a
        .max_model_len
        .unwrap_or(cfg.max_context)
        .min(cfg.max_context)
        .min(num_blocks * block_size);
    cfg.max_context = max_model_len;
    let threads = default_threads(a.threads);
    let tokenizer = Arc::clone(&loaded.tokenizer);
    let tok_str = |id: Option<u32>| {
        id.and_then(|i| tokenizer.id_to_token(i))
            .unwrap_or("")
            .to_string()
    };
    let chat = match &loaded.chat_template {
        Some(t) => ChatTemplate::new(t, &tok_str(tokenizer.bos()), &tok_str(tokenizer.eos()))
            .context("the model's chat template does not compile")?,
        None => ChatTemplate::chatml(),
    };
    let vocab = cfg.vocab_size;
    let scales = load_kv_scales(a.kv_cache_scales.as_ref(), a.kv_cache_dtype, &cfg)?;
    let backend = make_backend(
        a.device,
        &cfg,
        Arc::new(loaded.weights),
        (num_blocks, block_size),
        (a.kv_cache_dtype, scales.as_ref()),
        threads,
    )?;
    let backend_name = backend.name();
    tracing::info!(
        model = %path.display(), layers = cfg.n_layers, hidden = cfg.hidden, vocab, num_blocks, max_model_len,
        backend = %backend_name, load_ms = t0.elapsed().as_millis() as u64, "model loaded"
    );
    let engine = engine::start(
        backend,
        Arc::clone(&tokenizer),
        vocab,
        EngineConfig {
            block_size,
            num_blocks,
            max_num_seqs: a.max_num_seqs,
            max_batched_tokens: a.max_batched_tokens.max(a.max_num_seqs),
            max_prefill_chunk: a.max_prefill_chunk.max(1),
            max_queue: a.max_queue,
            max_model_len,
        },
    )?;
    let model_id = served_name.unwrap_or_else(|| {
        if fetch::known(&a.model).is_some() {
            a.model.clone()
        } else {
            path.file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| "model".into())
        }
    });
    Ok(Service {
        engine,
        chat: Arc::new(chat),
        info: Arc::new(WorkerInfo {
            model_id,
            pool: pool.to_string(),
            country: country.to_string(),
            backend: backend_name,
            context_length: max_model_len,
        }),
    })
}

fn serve(a: ServeArgs) -> Result<()> {
    let svc = start_engine(&a.model, a.served_model_name.clone(), &a.pool, &a.country)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let http = tokio::net::TcpListener::bind(a.http_addr)
            .await
            .with_context(|| format!("cannot listen on --http-addr {}", a.http_addr))?;
        let grpc = tokio::net::TcpListener::bind(a.grpc_addr)
            .await
            .with_context(|| format!("cannot listen on --grpc-addr {}", a.grpc_addr))?;
        tracing::info!(http = %http.local_addr()?, grpc = %grpc.local_addr()?, model = %svc.info.model_id,
            pool = %svc.info.pool, country = %svc.info.country, "worker ready");
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let mut stop_http = stop_rx.clone();
        let mut stop_grpc = stop_rx;
        let router = api::http::router(svc.clone(), a.body_limit);
        let http_task = tokio::spawn(async move {
            axum::serve(http, router)
                .with_graceful_shutdown(async move {
                    let _ = stop_http.changed().await;
                })
                .await
        });
        let grpc_task = tokio::spawn(
            tonic::transport::Server::builder().add_service(api::grpc::server(svc.clone())).serve_with_incoming_shutdown(
                nodelay(grpc),
                async move {
                    let _ = stop_grpc.changed().await;
                },
            ),
        );
        shutdown_signal().await;
        tracing::info!("shutting down");
        let _ = stop_tx.send(true);
        let (h, g) = tokio::join!(http_task, grpc_task);
        h??;
        g??;
        Ok(())
    })
}

fn fake(a: FakeArgs) -> Result<()> {
    let cfg = worker::fake::FakeConfig {
        model: a.model,
        pool: a.pool,
        country: a.country,
        tokens: a.tokens,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(a.threads.max(1))
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let http = tokio::net::TcpListener::bind(a.http_addr)
            .await
            .with_context(|| format!("cannot listen on --http-addr {}", a.http_addr))?;
        let grpc = tokio::net::TcpListener::bind(a.grpc_addr)
            .await
            .with_context(|| format!("cannot listen on --grpc-addr {}", a.grpc_addr))?;
        tracing::info!(http = %http.local_addr()?, grpc = %grpc.local_addr()?, "fake worker ready");
        let router = worker::fake::http_router(cfg.clone());
        let http_task = tokio::spawn(async move { axum::serve(http, router).await });
        let grpc_task = tokio::spawn(worker::fake::serve_grpc(grpc, cfg));
        shutdown_signal().await;
        http_task.abort();
        grpc_task.abort();
        Ok(())
    })
}

/// Accepted gRPC connections with TCP_NODELAY: a stream's last frames (final chunk,
/// trailers) must not wait for the peer's delayed ACK.
fn nodelay(
    l: tokio::net::TcpListener,
) -> impl futures::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    use futures::StreamExt;
    tokio_stream::wrappers::TcpListenerStream::new(l).map(|s| {
        let s = s?;
        s.set_nodelay(true)?;
        Ok(s)
    })
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! { _ = ctrl_c => {}, _ = term.recv() => {} }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
