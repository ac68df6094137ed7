//! Harness for the end-to-end tests: starts the real `neutrino-*` binaries on free
//! loopback ports, reads their admin endpoints, and waits for conditions (polling an
//! observable state with a deadline, never sleeping a fixed time).
//!
//! The binaries must be built first (`cargo build --workspace --bins`); the README's
//! test command does that.

#![allow(clippy::unwrap_used, missing_debug_implementations)]

pub mod backend;
pub mod kube_api;
pub mod llhttp;
pub mod netns;

use std::future::Future;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use serde_json::Value;

/// Path of a workspace binary next to the test executable's target directory.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    // target/<profile>/deps/<test> -> target/<profile>/<name>
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let path = dir.join(name);
    assert!(path.exists(), "{} not found: run `cargo build --workspace --bins` before the tests", path.display());
    path
}

/// A free loopback port for a child process to bind. Each test process takes ports
/// from its own block (by process id, in 2000-9400: below the kernel's ephemeral range
/// and clear of the demo's fixed ports), so tests
/// running in parallel processes do not hand each other the same port between our
/// check and the child's bind; the kernel's choice is the fallback.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU16, Ordering};
    const BLOCK: u16 = 32;
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let base = 2_000 + (std::process::id() % 230) as u16 * BLOCK;
    for _ in 0..BLOCK {
        let port = base + NEXT.fetch_add(1, Ordering::Relaxed) % BLOCK;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    TcpListener::bind("127.0.0.1:0").expect("bind :0").local_addr().expect("addr").port()
}

/// Starts `cmd` with its stdout and stderr in `<dir>/<name>.log`.
pub fn spawn_logged(name: &str, mut cmd: Command, dir: &Path) -> (Child, PathBuf) {
    let log = dir.join(format!("{name}.log"));
    let out = std::fs::File::create(&log).expect("log file");
    let err = out.try_clone().expect("log file");
    let child = cmd
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .unwrap_or_else(|e| panic!("starting {name}: {e}"));
    (child, log)
}

/// A child process that is killed when dropped. Its output goes to a log file that is
/// printed when a test fails.
pub struct Proc {
    name: String,
    child: Option<Child>,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Proc {
    pub fn spawn(name: &str, args: &[String]) -> Proc {
        Proc::spawn_env(name, args, &[])
    }

    /// Like [`Proc::spawn`], with these environment variables added.
    pub fn spawn_env(name: &str, args: &[String], env: &[(&str, &str)]) -> Proc {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut cmd = Command::new(bin(name));
        cmd.args(args).envs(env.iter().copied());
        let (child, log) = spawn_logged(name, cmd, dir.path());
        Proc { name: name.to_string(), child: Some(child), log, _dir: dir }
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).unwrap_or(0)
    }

    /// Sends SIGTERM, as Kubernetes does before stopping a container.
    pub fn terminate(&self) {
        let pid = self.pid().to_string();
        let status = Command::new("kill").args(["-TERM", &pid]).status().expect("kill");
        assert!(status.success(), "kill -TERM {pid}");
    }

    /// Waits for the process to exit by itself; None if it is still running at `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let child = self.child.as_mut()?;
        let start = Instant::now();
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                self.child = None;
                return Some(status);
            }
            if start.elapsed() > timeout {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGKILL and reap: the process gets no chance to say goodbye.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!("----- {} log -----\n{}", self.name, self.logs());
        }
    }
}

/// A mesh file in its own directory, rewritten atomically (write, then rename over).
pub struct MeshFile {
    dir: tempfile::TempDir,
}

impl MeshFile {
    pub fn new(content: &str) -> MeshFile {
        let f = MeshFile { dir: tempfile::tempdir().expect("tempdir") };
        f.write(content);
        f
    }

    pub fn path(&self) -> PathBuf {
        self.dir.path().join("mesh.yaml")
    }

    pub fn write(&self, content: &str) {
        let tmp = self.dir.path().join(".mesh.yaml.tmp");
        std::fs::write(&tmp, content).expect("write mesh file");
        std::fs::rename(&tmp, self.path()).expect("rename mesh file");
    }
}

/// A mesh of `services` services named svc-0.. with one endpoint each, whose cpu
/// capacity is `cpu` (change it to change that service's Endpoints version).
pub fn mesh_yaml(services: usize, cpu: &dyn Fn(usize) -> u32) -> String {
    let mut s = String::from("services:\n");
    for i in 0..services {
        s.push_str(&format!(
            "  - name: svc-{i}\n    virtualIP: 10.96.1.{i}\n    ports: [{{port: 80, targetPort: 8080, protocol: http}}]\n    endpoints:\n      - {{address: 10.1.0.{i}, capacity: {{cpu: \"{}m\", memory: 1Gi}}}}\n",
            cpu(i)
        ));
    }
    s
}

pub struct ControlPlane {
    pub proc: Proc,
    pub grpc: u16,
    pub admin: u16,
    args: Vec<String>,
}

impl ControlPlane {
    pub fn start(mesh: &Path, extra: &[&str]) -> ControlPlane {
        let (grpc, admin) = (free_port(), free_port());
        let mut args = vec![
            "--mesh-file".to_string(),
            mesh.display().to_string(),
            "--grpc-addr".into(),
            format!("127.0.0.1:{grpc}"),
            "--admin-addr".into(),
            format!("127.0.0.1:{admin}"),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        ControlPlane { proc: Proc::spawn("neutrino-control-plane", &args), grpc, admin, args }
    }

    /// Kills the process and starts a fresh one with the same arguments and ports.
    pub fn restart(&mut self) {
        self.proc.kill();
        self.proc = Proc::spawn("neutrino-control-plane", &self.args);
    }

    pub fn grpc_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.grpc)
    }

    pub async fn wait_ready(&self) {
        wait_for("control plane /ready", Duration::from_secs(20), || async {
            let (code, body) = get(self.admin, "/ready").await?;
            if code == 200 { Ok(()) } else { Err(anyhow!("{code}: {body}")) }
        })
        .await
    }

    pub async fn metric(&self, name: &str, labels: &str) -> f64 {
        let (_, text) = get(self.admin, "/metrics").await.expect("control plane /metrics");
        metric(&text, name, labels).unwrap_or(0.0)
    }
}

/// A real Redis server on a free loopback port, without persistence.
pub struct RedisServer {
    pub proc: Option<std::process::Child>,
    pub port: u16,
}

impl RedisServer {
    pub async fn start() -> RedisServer {
        RedisServer::start_on(free_port()).await
    }

    pub async fn start_on(port: u16) -> RedisServer {
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server runs (the test script installs it)");
        let server = RedisServer { proc: Some(child), port };
        wait_for("redis-server to answer PING", Duration::from_secs(10), || async {
            let mut c = redis_client(port).get_multiplexed_async_connection().await?;
            let pong: String = redis::cmd("PING").query_async(&mut c).await?;
            anyhow::ensure!(pong == "PONG", "{pong}");
            Ok(())
        })
        .await;
        server
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.proc.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

pub fn redis_client(port: u16) -> redis::Client {
    redis::Client::open(format!("redis://127.0.0.1:{port}")).expect("redis URL")
}

pub struct Proxy {
    pub proc: Proc,
    pub admin: u16,
    /// Outbound listener (also the explicit HTTP proxy).
    pub outbound: u16,
    pub inbound: u16,
}

fn proxy_args(admin: u16, outbound: u16, inbound: u16) -> Vec<String> {
    vec![
        "--admin-addr".into(),
        format!("127.0.0.1:{admin}"),
        "--outbound-addr".into(),
        format!("127.0.0.1:{outbound}"),
        "--inbound-addr".into(),
        format!("127.0.0.1:{inbound}"),
    ]
}

impl Proxy {
    pub fn start(control_plane_grpc: u16) -> Proxy {
        Proxy::start_with(control_plane_grpc, &[])
    }

    /// A proxy with `extra` flags; a `--control-plane` or `--pod` among them replaces the
    /// default.
    pub fn start_with(control_plane_grpc: u16, extra: &[&str]) -> Proxy {
        Proxy::start_env(control_plane_grpc, extra, &[])
    }

    /// Like [`Proxy::start_with`], with these environment variables added.
    pub fn start_env(control_plane_grpc: u16, extra: &[&str], env: &[(&str, &str)]) -> Proxy {
        let (admin, outbound, inbound) = (free_port(), free_port(), free_port());
        let mut args = proxy_args(admin, outbound, inbound);
        if !extra.contains(&"--control-plane") {
            args.extend(["--control-plane".to_string(), format!("127.0.0.1:{control_plane_grpc}")]);
        }
        if !extra.contains(&"--pod") {
            args.extend(["--pod".to_string(), "test-pod".to_string()]);
        }
        args.extend(["--backoff-max-ms", "500"].iter().chain(extra).map(|s| s.to_string()));
        Proxy { proc: Proc::spawn_env("neutrino-proxy", &args, env), admin, outbound, inbound }
    }

    pub fn start_local(config_file: &Path) -> Proxy {
        let (admin, outbound, inbound) = (free_port(), free_port(), free_port());
        let mut args = proxy_args(admin, outbound, inbound);
        args.extend(["--config-file".to_string(), config_file.display().to_string()]);
        Proxy { proc: Proc::spawn("neutrino-proxy", &args), admin, outbound, inbound }
    }

    pub async fn dump(&self) -> Value {
        get_json(self.admin, "/config_dump").await.expect("proxy /config_dump")
    }

    pub async fn ready_code(&self) -> u16 {
        get(self.admin, "/ready").await.map(|(c, _)| c).unwrap_or(0)
    }

    pub async fn wait_ready(&self) {
        wait_for("proxy /ready", Duration::from_secs(20), || async {
            let (code, body) = get(self.admin, "/ready").await?;
            if code == 200 { Ok(()) } else { Err(anyhow!("{code}: {body}")) }
        })
        .await
    }
}

/// A mesh file with one HTTP service `web` (port 80) whose routes come from `spec` (an
/// OpenAPI document, written next to it) and whose endpoints are the given loopback
/// ports and pod names, each with 4 CPUs and 8 GiB.
pub struct WebMesh {
    pub file: MeshFile,
    _spec: tempfile::TempDir,
}

impl WebMesh {
    pub fn new(spec: &str, endpoints: &[(u16, &str)]) -> WebMesh {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("web.yaml"), spec).expect("write the OpenAPI document");
        let endpoints: String = endpoints
            .iter()
            .map(|(port, name)| {
                format!(
                    "      - {{address: 127.0.0.1, port: {port}, name: {name}, capacity: {{cpu: 4, memory: 8Gi}}}}\n"
                )
            })
            .collect();
        let text = format!(
            "services:\n  - name: web\n    ports: [{{port: 80, protocol: http}}]\n    openapi: {}\n    endpoints:\n{endpoints}",
            dir.path().join("web.yaml").display()
        );
        WebMesh { file: MeshFile::new(&text), _spec: dir }
    }

    pub fn path(&self) -> PathBuf {
        self.file.path()
    }
}

/// A backend pod's sidecar: its inbound listener on the endpoint's port, forwarding to
/// the app (`--inbound-app-addr`, as nothing redirects here), named after the pod.
pub struct Sidecar {
    pub proc: Proc,
    pub admin: u16,
    pub inbound: u16,
    pub outbound: u16,
}

impl Sidecar {
    /// `control_planes`: one address or several, comma-separated. `env`: added to the
    /// process's environment.
    pub fn start(control_planes: &str, pod: &str, inbound: u16, app_port: u16, env: &[(&str, &str)]) -> Sidecar {
        let (admin, outbound) = (free_port(), free_port());
        let mut args = proxy_args(admin, outbound, inbound);
        args.extend(
            ["--control-plane", control_planes, "--inbound-app-addr", &format!("127.0.0.1:{app_port}")]
                .into_iter()
                .chain(["--pod", pod, "--backoff-max-ms", "300"])
                .map(str::to_string),
        );
        Sidecar { proc: Proc::spawn_env("neutrino-proxy", &args, env), admin, inbound, outbound }
    }

    pub async fn wait_ready(&self) {
        wait_for("the sidecar's /ready", Duration::from_secs(20), || async {
            let (code, body) = get(self.admin, "/ready").await?;
            if code == 200 { Ok(()) } else { Err(anyhow!("{code}: {body}")) }
        })
        .await
    }
}

/// The version a proxy dump holds for one resource, if any.
pub fn version(dump: &Value, kind: &str, name: &str) -> Option<String> {
    dump["resources"][kind][name]["version"].as_str().map(str::to_string)
}

/// A per-kind counter from a proxy dump's stream status.
pub fn stream_count(dump: &Value, kind: &str, field: &str) -> u64 {
    dump["stream"]["types"][kind][field].as_u64().unwrap_or(0)
}

pub async fn get(port: u16, path: &str) -> Result<(u16, String)> {
    let resp = reqwest::Client::new()
        .get(format!("http://127.0.0.1:{port}{path}"))
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .with_context(|| format!("GET :{port}{path}"))?;
    let code = resp.status().as_u16();
    Ok((code, resp.text().await?))
}

pub async fn get_json(port: u16, path: &str) -> Result<Value> {
    let (code, body) = get(port, path).await?;
    if code != 200 {
        bail!("GET :{port}{path}: {code}: {body}");
    }
    Ok(serde_json::from_str(&body)?)
}

/// Polls `check` until it returns Ok, or panics after `timeout` with the last error.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T>>,
{
    let start = Instant::now();
    loop {
        match check().await {
            Ok(v) => return v,
            Err(e) if start.elapsed() > timeout => panic!("timed out after {timeout:?} waiting for {what}: {e:#}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
}

/// The value of a Prometheus sample `name{labels}` (labels as written, e.g.
/// `kind="Service"`; empty for none).
pub fn metric(text: &str, name: &str, labels: &str) -> Option<f64> {
    let want = if labels.is_empty() { name.to_string() } else { format!("{name}{{{labels}}}") };
    text.lines().find_map(|l| {
        let (key, value) = l.rsplit_once(' ')?;
        (key == want).then(|| value.parse().ok()).flatten()
    })
}

/// Reads one HTTP/1.1 response off a raw connection (its head, then a Content-Length
/// body), byte by byte so that nothing after it is consumed; panics if the connection
/// closes in the head or stays silent for 10 s.
pub async fn read_response(s: &mut tokio::net::TcpStream) -> (String, String) {
    use tokio::io::AsyncReadExt;
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut byte))
            .await
            .expect("a response within 10 s")
            .expect("read");
        assert_eq!(n, 1, "the connection closed in a response head: {}", String::from_utf8_lossy(&buf));
        buf.push(byte[0]);
    }
    let head = String::from_utf8(buf).expect("utf-8 head");
    let len: usize = head
        .lines()
        .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().parse().unwrap_or(0)))
        .unwrap_or(0);
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).await.expect("the body");
    (head, String::from_utf8(body).expect("utf-8 body"))
}

/// Waits (up to 10 s) until the proxy with admin port `admin` says `n` connections are
/// parked (`neutrino_proxy_parked_connections`).
pub async fn wait_parked(admin: u16, n: f64) {
    wait_for(&format!("{n} parked connections"), Duration::from_secs(10), || async {
        let (_, text) = get(admin, "/metrics").await?;
        let now = metric(&text, "neutrino_proxy_parked_connections", "").unwrap_or(-1.0);
        if now == n { Ok(()) } else { Err(anyhow::anyhow!("{now} parked")) }
    })
    .await
}
