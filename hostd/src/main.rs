//! `portholed`: the host daemon. It owns the VMs of one host and serves them over the host API.

use clap::Parser;

/// Porthole host daemon.
#[derive(Debug, Parser)]
#[command(name = "portholed", version = porthole_api::VERSION, about)]
struct Cli {}

fn main() -> anyhow::Result<()> {
    let _cli = Cli::parse();
    anyhow::bail!(
        "portholed {}: the host API is not served by this build yet; run VMs with porthole-vmm directly",
        porthole_api::VERSION
    )
}
