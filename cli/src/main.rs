//! `neutrino`: the command-line tool. Subcommands are thin: each reads or starts real
//! components and prints what it finds.

mod demo;
mod logs;
mod show;
mod workload;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "neutrino", version, about = "Neutrino service mesh command-line tool")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the local demo mesh: a control plane and a proxy on a mesh file, and print
    /// what the proxy received.
    Demo {
        /// The mesh file (format: docs/mesh-file.md).
        #[arg(long, default_value = "examples/mesh.yaml")]
        mesh_file: PathBuf,
        /// Keep the mesh running until Ctrl-C instead of exiting after the report.
        #[arg(long)]
        keep_running: bool,
        /// How many requests the demo client sends.
        #[arg(long, default_value_t = 800)]
        requests: usize,
    },
    /// Print the request log (one record per request, written by every proxy to Redis).
    Logs {
        #[arg(long, env = "NEUTRINO_REDIS_URL", default_value = "redis://127.0.0.1:6379")]
        redis_url: String,
        #[arg(long, default_value = "neutrino:requests")]
        stream: String,
        /// Only this service ("<namespace>/<name>").
        #[arg(long)]
        service: Option<String>,
        /// Only this OpenAPI operation id.
        #[arg(long)]
        operation: Option<String>,
        /// Only this status ("503") or class ("5xx").
        #[arg(long)]
        status: Option<String>,
        /// How many of the newest matching records to print first.
        #[arg(long, short = 'n', default_value_t = 20)]
        count: usize,
        /// Keep printing new records as they arrive.
        #[arg(long, short = 'f')]
        follow: bool,
    },
    /// Print the config a running proxy holds (from its admin /config_dump).
    Config {
        /// The proxy's admin address.
        #[arg(long, default_value = "127.0.0.1:15020")]
        admin: String,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Demo { mesh_file, keep_running, requests } => demo::run(&mesh_file, keep_running, requests).await,
        Command::Logs { redis_url, stream, service, operation, status, count, follow } => {
            let filter = logs::Filter { service, operation, status };
            logs::run(&redis_url, &stream, &filter, count, follow).await
        }
        Command::Config { admin } => {
            let dump = show::fetch(&admin).await?;
            print!("{}", show::render(&dump));
            Ok(())
        }
    }
}
