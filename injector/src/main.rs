//! `neutrino-injector`: skeleton until the webhook lands.

use clap::Parser;

#[derive(Debug, Parser)]
#[command(name = "neutrino-injector", version, about = "Neutrino sidecar injector (mutating admission webhook)")]
struct Args {}

fn main() -> anyhow::Result<()> {
    let _ = Args::parse();
    anyhow::bail!(neutrino_injector::NOT_YET)
}
