//! `sovctl`: operator, member-state official and auditor command line.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use gateway::{cli_audit, cli_policy, cli_token, demo};

#[derive(Parser)]
#[command(
    name = "sovctl",
    version,
    about = "Sovereign inference gateway: demo, policy, identity and audit tools"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the local federation demo (gateway + DE/FR/IT workers on loopback).
    Demo(demo::DemoArgs),
    /// Check and explain member-state residency policies.
    #[command(subcommand)]
    Policy(cli_policy::PolicyCommand),
    /// Mint member-state tokens (demo and test identity providers).
    #[command(subcommand)]
    Token(cli_token::TokenCommand),
    /// Generate member-state signing keys (demo and test identity providers).
    #[command(subcommand)]
    Keys(cli_token::KeysCommand),
    /// Auditors' tools: verify, query, prove, check-prompt, keygen, bench.
    #[command(subcommand)]
    Audit(cli_audit::AuditCommand),
    /// Check a residency receipt offline.
    #[command(subcommand)]
    Receipt(cli_audit::ReceiptCommand),
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SOV_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Demo(a) => demo::run(a).map(|()| ExitCode::SUCCESS),
        Command::Policy(c) => cli_policy::run(c),
        Command::Token(c) => cli_token::run_token(c),
        Command::Keys(c) => cli_token::run_keys(c),
        Command::Audit(c) => cli_audit::run_audit(c),
        Command::Receipt(c) => cli_audit::run_receipt(c),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("sovctl: {e:#}");
            ExitCode::FAILURE
        }
    }
}
