//! `gateway`: the sovereign inference gateway's front end. See docs/gateway.md.

use std::path::PathBuf;

use clap::Parser;

/// mimalloc: the request path allocates many small, short-lived buffers across threads;
/// glibc malloc took ~12% of the gateway's CPU at concurrency 1 (perf), see
/// docs/benchmarks.md.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "gateway",
    version,
    about = "Sovereign inference gateway: OpenAI-compatible front end with federated auth and residency policy"
)]
struct Cli {
    /// The gateway's TOML configuration (see docs/gateway.md).
    #[arg(long)]
    config: PathBuf,
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SOV_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let cfg = gateway::config::GatewayConfig::load(&cli.config)?;
    gateway::run::run(cfg)
}
