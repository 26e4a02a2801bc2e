//! `gateway`: the pingora front end. Not built yet (issue 3): it says so and exits 2.

fn main() -> anyhow::Result<()> {
    eprintln!(
        "gateway: the federated front end is not implemented yet (issue 3); \
         run a standalone worker with `cargo run --release -p worker -- serve --model smollm2`"
    );
    std::process::exit(2)
}
