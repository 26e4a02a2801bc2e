//! `sovctl`: operator and auditor command line. Subcommands arrive with issues 3 and 4.

use clap::Parser;

#[derive(Parser)]
#[command(
    name = "sovctl",
    version,
    about = "Sovereign inference gateway: operator and auditor tools"
)]
struct Cli {}

fn main() -> anyhow::Result<()> {
    let _cli = Cli::parse();
    eprintln!("sovctl: no subcommands yet (policy, demo, token, audit arrive with issues 3 and 4)");
    std::process::exit(2)
}
