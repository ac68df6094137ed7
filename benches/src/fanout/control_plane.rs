//! The control-plane process, and what /proc says about it and about us.

use super::*;

/// The running control plane; killed when dropped, on every exit path.
#[derive(Debug)]
pub(crate) struct ControlPlane {
    pub(crate) child: Child,
    pub(crate) grpc_addr: SocketAddr,
    pub(crate) admin_addr: SocketAddr,
    pub(crate) log: PathBuf,
}

pub(crate) fn control_plane_binary(flag: Option<&Path>) -> Result<PathBuf> {
    let path = match flag {
        Some(p) => p.to_path_buf(),
        None => {
            let exe = std::env::current_exe().context("finding this benchmark's own path")?;
            let dir = exe.parent().ok_or_else(|| anyhow!("{} has no parent directory", exe.display()))?;
            dir.join("neutrino-control-plane")
        }
    };
    if !path.is_file() {
        bail!(
            "control-plane binary {} not found; build it with `cargo build --release -p neutrino-control-plane` \
             (or run `bash benches/run-fanout.sh`, which builds everything)",
            path.display()
        );
    }
    Ok(path)
}

pub(crate) fn free_port() -> Result<SocketAddr> {
    let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("finding a free local port")?;
    l.local_addr().context("reading a bound port")
}

impl ControlPlane {
    pub(crate) fn start(binary: &Path, mesh_file: &Path, log: &Path, filter: &str) -> Result<Self> {
        let grpc_addr = free_port()?;
        let admin_addr = free_port()?;
        let out = std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let err = out.try_clone().with_context(|| format!("sharing {}", log.display()))?;
        let child = Command::new(binary)
            .arg("--mesh-file")
            .arg(mesh_file)
            .args(["--grpc-addr", &grpc_addr.to_string(), "--admin-addr", &admin_addr.to_string()])
            .args(["--log", filter])
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        Ok(ControlPlane { child, grpc_addr, admin_addr, log: log.to_path_buf() })
    }

    /// What can be seen of the control plane from outside, for error messages: whether
    /// it accepts connections and answers `/ready`, and the end of its log.
    pub(crate) fn diagnose(&self) -> String {
        let grpc = match TcpStream::connect_timeout(&self.grpc_addr, Duration::from_secs(2)) {
            Ok(_) => "accepts connections".to_string(),
            Err(e) => format!("does not accept connections ({e})"),
        };
        let ready = match http_get(self.admin_addr, "/ready") {
            Ok((status, body)) => format!("HTTP {status} {}", body.trim()),
            Err(e) => format!("{e:#}"),
        };
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let tail = lines[lines.len().saturating_sub(10)..].join("\n    ");
        format!("gRPC port {} {grpc}; /ready: {ready}; last lines of its log:\n    {tail}", self.grpc_addr)
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    pub(crate) fn check_alive(&self) -> Result<()> {
        // /proc/<pid>/stat state "Z" (or no entry) means it exited; `try_wait` needs &mut.
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid()));
        match stat.as_deref().ok().and_then(|s| s.rsplit_once(')')).map(|(_, rest)| rest.trim_start()) {
            Some(rest) if !rest.starts_with('Z') && !rest.starts_with('X') => Ok(()),
            _ => bail!("the control plane (pid {}) exited; {}", self.pid(), self.diagnose()),
        }
    }

    pub(crate) async fn wait_ready(&self, timeout: Duration, progress: &Progress) -> Result<()> {
        let started = Instant::now();
        let mut last_note = Instant::now();
        loop {
            self.check_alive()?;
            let last = match http_get(self.admin_addr, "/ready") {
                Ok((200, _)) => return Ok(()),
                Ok((status, body)) => format!("HTTP {status}: {}", body.trim()),
                Err(e) => format!("{e:#}"),
            };
            if started.elapsed() > timeout {
                bail!("the control plane was not ready after {timeout:?} (last: {last})");
            }
            if last_note.elapsed() >= Duration::from_secs(2) {
                last_note = Instant::now();
                progress.say(format!("  still waiting for /ready ({last})"));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// `neutrino_cp_connected_proxies` from `/metrics`.
    pub(crate) fn connected_proxies(&self) -> Result<Option<u64>> {
        let (status, body) = http_get(self.admin_addr, "/metrics")?;
        if status != 200 {
            bail!("control plane /metrics answered HTTP {status}");
        }
        Ok(body
            .lines()
            .find_map(|l| l.strip_prefix("neutrino_cp_connected_proxies "))
            .and_then(|v| v.trim().parse().ok()))
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A minimal blocking HTTP/1.1 GET (the admin server is local and answers at once).
pub(crate) fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    let timeout = Duration::from_secs(5);
    let mut conn = TcpStream::connect_timeout(&addr, timeout).with_context(|| format!("connecting to {addr}"))?;
    conn.set_read_timeout(Some(timeout)).context("setting a read timeout")?;
    write!(conn, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")
        .with_context(|| format!("sending GET {path}"))?;
    let mut text = String::new();
    conn.read_to_string(&mut text).with_context(|| format!("reading the answer to GET {path}"))?;
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow!("GET {path}: not an HTTP answer: {:?}", text.lines().next()))?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    Ok((status, body))
}

// ---------------------------------------------------------------------------------------
// /proc

/// utime + stime of a process, in clock ticks.
pub(crate) fn proc_cpu_ticks(pid: u32) -> Result<u64> {
    let path = format!("/proc/{pid}/stat");
    let stat = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    // Fields after the command name, which is in parentheses and may contain spaces.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).ok_or_else(|| anyhow!("{path}: unexpected format"))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state); utime and stime are fields 14 and 15.
    let field = |n: usize| -> Result<u64> {
        fields.get(n - 3).and_then(|v| v.parse().ok()).ok_or_else(|| anyhow!("{path}: no field {n}"))
    };
    Ok(field(14)? + field(15)?)
}

/// A "kB" line of /proc/<pid>/status, e.g. VmRSS or VmHWM, in KiB.
pub(crate) fn proc_status_kib(pid: u32, key: &str) -> Result<u64> {
    kib_line(&format!("/proc/{pid}/status"), key)
}

/// The value of a "Key:   123 kB" line of a /proc file.
pub(crate) fn kib_line(path: &str, key: &str) -> Result<u64> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?;
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .ok_or_else(|| anyhow!("{path} has no {key} line"))
}

/// Clock ticks per second for /proc CPU times: `getconf CLK_TCK`, or 100 (Linux's
/// USER_HZ on every common architecture) if that cannot be run.
pub(crate) fn clock_ticks_per_second() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok()?.trim().parse::<f64>().ok())
        .filter(|t| *t > 0.0)
        .unwrap_or(100.0)
}

pub(crate) fn open_files_limit() -> Result<Option<u64>> {
    open_files_limit_of(std::process::id())
}

/// The soft "Max open files" limit of a process; None when unlimited.
pub(crate) fn open_files_limit_of(pid: u32) -> Result<Option<u64>> {
    let path = format!("/proc/{pid}/limits");
    let limits = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    let soft = limits
        .lines()
        .find_map(|l| l.strip_prefix("Max open files"))
        .and_then(|rest| rest.split_whitespace().next())
        .ok_or_else(|| anyhow!("{path} has no \"Max open files\" line"))?;
    Ok(soft.parse().ok())
}

pub(crate) fn open_files(pid: u32) -> Result<u64> {
    let path = format!("/proc/{pid}/fd");
    Ok(std::fs::read_dir(&path).with_context(|| format!("listing {path}"))?.count() as u64)
}
