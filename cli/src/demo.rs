//! `neutrino demo`: starts the real control plane and a real proxy (sibling binaries)
//! on a mesh file, waits until the proxy is ready, and prints what it received.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::show;

/// Kills the child when the demo ends, however it ends.
struct Running(Child, &'static str);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn sibling(name: &str) -> anyhow::Result<PathBuf> {
    let me = std::env::current_exe().context("locating the neutrino binary")?;
    let path = me.with_file_name(name);
    if !path.exists() {
        bail!("{} not found next to {}; build it with `cargo build --release --workspace --bins`", name, me.display());
    }
    Ok(path)
}

fn start(name: &'static str, args: &[&str]) -> anyhow::Result<Running> {
    let child = Command::new(sibling(name)?)
        .args(args)
        .env("NEUTRINO_LOG", "warn")
        .stdin(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {name}"))?;
    Ok(Running(child, name))
}

async fn wait_ready(what: &str, url: &str, procs: &mut [&mut Running]) -> anyhow::Result<()> {
    let started = Instant::now();
    let client = reqwest::Client::new();
    loop {
        for p in procs.iter_mut() {
            if let Some(status) = p.0.try_wait()? {
                bail!("{} exited ({status}) before {what} was ready; see its log above", p.1);
            }
        }
        if let Ok(r) = client.get(url).timeout(Duration::from_secs(1)).send().await
            && r.status().is_success()
        {
            return Ok(());
        }
        if started.elapsed() > Duration::from_secs(30) {
            bail!("{what} not ready after 30 s ({url}); are ports 15010, 15014 and 15020 free?");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub async fn run(mesh_file: &Path, keep_running: bool) -> anyhow::Result<()> {
    let mesh = mesh_file.to_str().context("mesh file path is not UTF-8")?;
    if !mesh_file.exists() {
        bail!("mesh file {mesh} not found; run from the repository root or pass --mesh-file");
    }
    println!("[1/3] starting neutrino-control-plane on {mesh} (gRPC 127.0.0.1:15010, admin 127.0.0.1:15014)");
    let mut cp = start(
        "neutrino-control-plane",
        &["--mesh-file", mesh, "--grpc-addr", "127.0.0.1:15010", "--admin-addr", "127.0.0.1:15014"],
    )?;
    wait_ready("the control plane", "http://127.0.0.1:15014/ready", &mut [&mut cp]).await?;
    println!("[2/3] starting neutrino-proxy (admin 127.0.0.1:15020), connecting to the control plane");
    let mut proxy = start(
        "neutrino-proxy",
        &["--control-plane", "127.0.0.1:15010", "--admin-addr", "127.0.0.1:15020", "--pod", "demo-client"],
    )?;
    wait_ready("the proxy", "http://127.0.0.1:15020/ready", &mut [&mut cp, &mut proxy]).await?;
    println!("[3/3] the proxy is ready; this is what it received:\n");
    print!("{}", show::render(&show::fetch("127.0.0.1:15020").await?));
    if keep_running {
        println!("\nrunning; edit {mesh} and run `neutrino config` to watch the change arrive. Ctrl-C to stop.");
        tokio::signal::ctrl_c().await?;
    }
    Ok(())
}
