//! Pods as Linux network namespaces, for the end-to-end tests of interception: one
//! namespace per pod, joined by a veth pair, with real iptables rules installed by the
//! real `neutrino-proxy init`. Everything a test creates is removed when dropped, also
//! when the test fails.

use std::path::Path;
use std::process::{Child, Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};

/// The uid the proxies run as; `neutrino-proxy init` exempts it from redirection.
pub const PROXY_UID: u32 = 1337;

/// Why interception tests cannot run here, if they cannot (they need root and `ip`).
pub fn unavailable() -> Option<String> {
    let uid = std::fs::read_to_string("/proc/self/status").ok().and_then(|s| {
        s.lines().find(|l| l.starts_with("Uid:")).map(|l| l.split_whitespace().nth(1).unwrap_or("").to_string())
    });
    if uid.as_deref() != Some("0") {
        return Some("needs root (network namespaces and iptables)".into());
    }
    if Command::new("ip").arg("-V").output().is_err() {
        return Some("needs `ip` from iproute2".into());
    }
    None
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Two pods, `a` (10.200.0.1) and `b` (10.200.0.2), on one link.
pub struct Pods {
    pub a: String,
    pub b: String,
}

pub const IP_A: &str = "10.200.0.1";
pub const IP_B: &str = "10.200.0.2";
pub const IP6_A: &str = "fd00:200::1";
pub const IP6_B: &str = "fd00:200::2";

impl Pods {
    pub fn create() -> Pods {
        static N: AtomicU32 = AtomicU32::new(0);
        let tag = format!("{}x{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed));
        let pods = Pods { a: format!("nta{tag}"), b: format!("ntb{tag}") };
        for ns in [&pods.a, &pods.b] {
            run(Command::new("ip").args(["netns", "add", ns]));
            run(Command::new("ip").args(["-n", ns, "link", "set", "lo", "up"]));
        }
        let (va, vb) = (format!("va{tag}"), format!("vb{tag}"));
        run(Command::new("ip")
            .args(["link", "add", &va, "netns", &pods.a, "type", "veth", "peer", "name", &vb, "netns", &pods.b]));
        for (ns, dev, ip, gw, ip6, gw6) in
            [(&pods.a, &va, IP_A, IP_B, IP6_A, IP6_B), (&pods.b, &vb, IP_B, IP_A, IP6_B, IP6_A)]
        {
            run(Command::new("ip").args(["-n", ns, "addr", "add", &format!("{ip}/24"), "dev", dev]));
            // nodad: usable at once, not after duplicate address detection.
            run(Command::new("ip").args(["-n", ns, "addr", "add", &format!("{ip6}/64"), "dev", dev, "nodad"]));
            run(Command::new("ip").args(["-n", ns, "link", "set", dev, "up"]));
            // Default routes, so virtual IPs are routable until iptables redirects them.
            run(Command::new("ip").args(["-n", ns, "route", "add", "default", "via", gw]));
            run(Command::new("ip").args(["-n", ns, "-6", "route", "add", "default", "via", gw6]));
        }
        pods
    }

    /// A command run inside `ns` as root.
    pub fn exec(ns: &str, program: &Path, args: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", ns]).arg(program).args(args);
        c
    }

    /// A command run inside `ns` as the proxy's uid.
    pub fn exec_as_proxy(ns: &str, program: &Path, args: &[&str]) -> Command {
        let mut c = Command::new("ip");
        let uid = PROXY_UID.to_string();
        c.args(["netns", "exec", ns, "setpriv", "--reuid", &uid, "--regid", &uid, "--clear-groups"])
            .arg(program)
            .args(args);
        c
    }

    /// Runs a command in `ns` and returns its stdout; panics with its output if it fails.
    pub fn output(ns: &str, program: &str, args: &[&str]) -> String {
        let out = run(&mut Pods::exec(ns, Path::new(program), args));
        String::from_utf8_lossy(&out.stdout).to_string()
    }
}

impl Drop for Pods {
    fn drop(&mut self) {
        for ns in [&self.a, &self.b] {
            // Deleting the namespace removes its end of the veth pair and its rules; any
            // process still inside was killed by its own guard first.
            let _ = Command::new("ip").args(["netns", "delete", ns]).output();
        }
    }
}

/// Polls `ok` every 50 ms until it succeeds; panics with its last error after `timeout`.
pub fn poll_until(what: &str, timeout: std::time::Duration, mut ok: impl FnMut() -> Result<(), String>) {
    let start = std::time::Instant::now();
    loop {
        match ok() {
            Ok(()) => return,
            Err(e) if start.elapsed() > timeout => panic!("timed out after {timeout:?} waiting for {what}: {e}"),
            Err(_) => std::thread::sleep(std::time::Duration::from_millis(50)),
        }
    }
}

/// curl run inside pod `ns` (10 s limit): stdout, or stderr when it fails.
pub fn curl_in(ns: &str, args: &[&str]) -> Result<String, String> {
    let out = Pods::exec(ns, Path::new("curl"), &[&["-s", "-S", "--max-time", "10"], args].concat())
        .output()
        .map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).to_string())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).to_string())
    }
}

/// A process inside a pod, killed when dropped, its output kept in a log file.
pub struct PodProc {
    child: Child,
    pub log: std::path::PathBuf,
    name: String,
}

impl PodProc {
    pub fn spawn(name: &str, cmd: Command, dir: &Path) -> PodProc {
        let (child, log) = crate::spawn_logged(name, cmd, dir);
        PodProc { child, log, name: name.to_string() }
    }
}

impl Drop for PodProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("----- {} log -----\n{}", self.name, std::fs::read_to_string(&self.log).unwrap_or_default());
        }
    }
}
