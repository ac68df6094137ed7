//! `neutrino-proxy init` end to end, in real Linux network namespaces: the real binary
//! runs inside a namespace (`ip netns exec`) exactly as the injected init container
//! runs it, and the tests check what `iptables-save` shows (installed, a second run
//! byte-identical, `--cleanup` leaving only what was there before) and what the rules
//! do to real connections (apps' traffic reaches the proxy's listeners, the proxy's own
//! traffic and the exempt ports and CIDRs do not).
//!
//! Needs root and `ip netns`; without either each test says why and passes. Needs the
//! iptables (both backends) and iproute2 packages, setpriv (util-linux) and
//! /usr/bin/python3 (the small TCP servers and clients). Every address used is inside
//! namespaces these tests create: a veth pair joins a "pod" namespace (10.255.0.2,
//! fd00:255::2) to a "peer" namespace (10.255.0.1, fd00:255::1).

#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};

use neutrino_tests::bin;

const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
const PROXY_UID: &str = "1337";

/// Serves `label host port` triples: each accepted connection gets the label and a
/// newline, then is closed. Prints "ready" once every socket listens.
const SERVER: &str = r#"
import socket, sys, threading
def serve(label, host, port):
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    s.bind((host, int(port)))
    s.listen(64)
    def loop():
        while True:
            c, _ = s.accept()
            c.sendall((label + "\n").encode())
            c.close()
    threading.Thread(target=loop, daemon=True).start()
args = sys.argv[1:]
for i in range(0, len(args), 3):
    serve(*args[i:i + 3])
print("ready", flush=True)
threading.Event().wait()
"#;

/// Connects to `host port` and prints what the server says, or "ERROR ...".
const CLIENT: &str = r#"
import socket, sys
try:
    s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
    print(s.recv(100).decode().strip())
except Exception as e:
    print("ERROR", e)
"#;

/// A command from the standard system directories (the test's PATH may lack /usr/sbin).
fn tool(name: &str) -> Option<PathBuf> {
    let path = std::env::var("PATH").unwrap_or_default();
    std::env::split_paths(&format!("{path}:{PATH}"))
        .map(|dir| dir.join(name))
        .find(|p| p.metadata().is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0))
}

fn need(name: &str, package: &str) -> PathBuf {
    tool(name)
        .unwrap_or_else(|| panic!("{name} not found: install the {package} package (apt-get install -y {package})"))
}

fn python() -> PathBuf {
    // Not a per-user shim: the proxy-UID client must be able to run it.
    let p = PathBuf::from("/usr/bin/python3");
    assert!(p.exists(), "/usr/bin/python3 not found: install the python3 package");
    p
}

fn run(cmd: &mut Command) -> Output {
    cmd.env("PATH", PATH).env("RUST_BACKTRACE", "0");
    cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"))
}

fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

fn check(cmd: &mut Command) -> String {
    let out = run(cmd);
    assert!(out.status.success(), "{cmd:?} failed ({}):\n{}", out.status, text(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Says why a test cannot run here (printed past the test harness's capture), if so.
fn skip(test: &str, why: &str) {
    let _ = writeln!(std::io::stderr(), "SKIPPED init_netns::{test}: {why}");
}

fn effective_uid() -> Option<u32> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("Uid:"))?;
    line.split_whitespace().nth(2)?.parse().ok()
}

/// A network namespace of its own, deleted when dropped (also when a test panics).
struct Netns {
    name: String,
}

impl Netns {
    /// The test's first namespace, or `None` (after saying why) where the tests cannot
    /// run: not root, or no `ip netns`.
    fn first(test: &str) -> Option<Netns> {
        if effective_uid() != Some(0) {
            skip(test, "needs root (network namespaces and iptables); run the tests as root, as CI does");
            return None;
        }
        let Some(ip) = tool("ip") else {
            skip(test, "`ip` not found (install iproute2), so `ip netns` is unavailable");
            return None;
        };
        match Netns::create(test) {
            Ok(ns) => Some(ns),
            Err(e) => {
                let listed = run(Command::new(ip).args(["netns", "list"]));
                if listed.status.success() {
                    panic!("`ip netns add` failed although `ip netns` works: {e}");
                }
                skip(test, &format!("`ip netns` is unavailable here: {e}"));
                None
            }
        }
    }

    fn new(test: &str) -> Netns {
        Netns::create(test).unwrap_or_else(|e| panic!("{e}"))
    }

    fn create(test: &str) -> Result<Netns, String> {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let tag: String = test.chars().filter(char::is_ascii_alphanumeric).take(12).collect();
        let name = format!("nt-{tag}-{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed));
        let out = run(Command::new(need("ip", "iproute2")).args(["netns", "add", &name]));
        if !out.status.success() {
            return Err(format!("ip netns add {name}: {}", text(&out).trim()));
        }
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"]);
        Ok(ns)
    }

    /// `ip -n <ns> args`.
    fn ip(&self, args: &[&str]) -> String {
        check(Command::new(need("ip", "iproute2")).args(["-n", &self.name]).args(args))
    }

    /// A command to run inside the namespace.
    fn cmd(&self, program: impl Into<PathBuf>) -> Command {
        let mut c = Command::new(need("ip", "iproute2"));
        c.args(["netns", "exec", &self.name]).arg(program.into()).current_dir("/");
        c
    }

    /// The real `neutrino-proxy init args` inside the namespace.
    fn init(&self, args: &[&str]) -> Output {
        run(self.cmd(bin("neutrino-proxy")).arg("init").args(args))
    }

    fn init_ok(&self, args: &[&str]) -> String {
        let out = self.init(args);
        assert!(out.status.success(), "neutrino-proxy init {args:?} failed ({}):\n{}", out.status, text(&out));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The nat table as `<save_tool> -t nat` shows it, without the comment lines (they
    /// hold the time) and with packet counters zeroed.
    fn nat(&self, save_tool: &str) -> String {
        let dump = check(self.cmd(need(save_tool, "iptables")).args(["-t", "nat"]));
        normalize(&dump)
    }

    /// Starts a TCP server answering each `(label, host, port)`; killed when dropped.
    fn serve(&self, endpoints: &[(&str, &str, u16)]) -> Server {
        let mut cmd = self.cmd(python());
        cmd.args(["-I", "-c", SERVER]).env("PATH", PATH).stdin(Stdio::null()).stdout(Stdio::piped());
        for (label, host, port) in endpoints {
            cmd.args([label.to_string(), host.to_string(), port.to_string()]);
        }
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("starting the test server: {e}"));
        let mut line = String::new();
        let stdout = child.stdout.take().unwrap();
        BufReader::new(stdout).read_line(&mut line).unwrap();
        let server = Server(child);
        assert_eq!(line.trim(), "ready", "the test server in {} did not start (see its output above)", self.name);
        server
    }

    /// Connects from inside the namespace, as root or (with `uid`) through setpriv;
    /// returns what the server said, or "ERROR ...".
    fn connect(&self, uid: Option<&str>, host: &str, port: u16) -> String {
        let mut cmd = match uid {
            None => self.cmd(python()),
            Some(uid) => {
                let mut c = self.cmd(need("setpriv", "util-linux"));
                c.args([&format!("--reuid={uid}"), &format!("--regid={uid}"), "--clear-groups"]).arg(python());
                c
            }
        };
        check(cmd.args(["-I", "-c", CLIENT, host, &port.to_string()])).trim().to_string()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Some(ip) = tool("ip") {
            let _ = Command::new(ip).args(["netns", "del", &self.name]).output();
        }
    }
}

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn normalize(dump: &str) -> String {
    let mut out = String::new();
    for line in dump.lines().filter(|l| !l.starts_with('#')) {
        // ":OUTPUT ACCEPT [12:720]" -> ":OUTPUT ACCEPT [0:0]"
        let line = match (line.starts_with(':'), line.rfind(" [")) {
            (true, Some(i)) => format!("{} [0:0]", &line[..i]),
            _ => line.to_string(),
        };
        out.push_str(&line);
        out.push('\n');
    }
    out
}

/// The `-A` lines of `--dry-run` output, per family (IPv4 first, then IPv6).
fn dry_run_rules(dry_run: &str) -> (Vec<String>, Vec<String>) {
    let (v4, v6) = dry_run.split_once("# neutrino-proxy init: IPv6").expect("an IPv6 section in --dry-run");
    let rules = |s: &str| s.lines().filter(|l| l.starts_with("-A ")).map(str::to_string).collect::<Vec<_>>();
    (rules(v4), rules(v6))
}

fn assert_has_rules(dump: &str, rules: &[String], what: &str) {
    assert!(!rules.is_empty());
    for rule in rules {
        assert!(dump.lines().any(|l| l == rule), "{what}: `{rule}` missing from iptables-save:\n{dump}");
    }
    assert_jumps_once(dump, what);
}

fn assert_jumps_once(dump: &str, what: &str) {
    for jump in ["-A PREROUTING -p tcp -j NEUTRINO_INBOUND", "-A OUTPUT -p tcp -j NEUTRINO_OUTPUT"] {
        assert_eq!(dump.lines().filter(|l| *l == jump).count(), 1, "{what}: `{jump}` not exactly once:\n{dump}");
    }
}

#[test]
fn init_installs_idempotently_and_cleanup_removes_only_its_rules() {
    let Some(ns) = Netns::first("init_installs_idempotently") else { return };
    // Someone else's rules, in the default backend: init must keep them (and, in auto
    // mode, pick this backend because it has rules).
    for (tables, package) in [("iptables", "iptables"), ("ip6tables", "iptables")] {
        check(ns.cmd(need(tables, package)).args(["-t", "nat", "-N", "FOREIGN"]));
        check(ns.cmd(need(tables, package)).args(["-t", "nat", "-A", "FOREIGN", "-j", "RETURN"]));
        check(
            ns.cmd(need(tables, package))
                .args(["-t", "nat", "-A", "OUTPUT", "-p", "udp", "--dport", "53", "-j", "FOREIGN"]),
        );
    }
    let before = (ns.nat("iptables-save"), ns.nat("ip6tables-save"));

    let out = ns.init_ok(&[]);
    assert!(out.contains("IPv4: nat rules installed") && out.contains("IPv6: nat rules installed"), "{out}");
    let first = (ns.nat("iptables-save"), ns.nat("ip6tables-save"));
    let dry_run = check(Command::new(bin("neutrino-proxy")).args(["init", "--dry-run"]));
    let (v4_rules, v6_rules) = dry_run_rules(&dry_run);
    assert_has_rules(&first.0, &v4_rules, "IPv4");
    assert_has_rules(&first.1, &v6_rules, "IPv6");
    for dump in [&first.0, &first.1] {
        assert!(dump.contains("-A OUTPUT -p udp -m udp --dport 53 -j FOREIGN\n"), "foreign rule kept:\n{dump}");
    }

    ns.init_ok(&[]);
    let second = (ns.nat("iptables-save"), ns.nat("ip6tables-save"));
    assert!(
        first == second,
        "a second run changed the rules:\n--- first\n{}{}--- second\n{}{}",
        first.0,
        first.1,
        second.0,
        second.1
    );

    // A run with other flags replaces the rules; the original flags bring them back.
    ns.init_ok(&["--outbound-exclude-ports", "3306", "--outbound-exclude-cidrs", "fd00::/8,10.0.0.0/8"]);
    let changed = (ns.nat("iptables-save"), ns.nat("ip6tables-save"));
    assert!(changed.0.contains("-A NEUTRINO_OUTPUT -p tcp -m tcp --dport 3306 -j RETURN\n"), "{}", changed.0);
    assert!(
        changed.0.contains("-A NEUTRINO_OUTPUT -d 10.0.0.0/8 -j RETURN\n") && !changed.0.contains("fd00"),
        "{}",
        changed.0
    );
    assert!(changed.1.contains("-A NEUTRINO_OUTPUT -d fd00::/8 -j RETURN\n"), "{}", changed.1);
    assert_jumps_once(&changed.0, "IPv4 after other flags");
    assert_jumps_once(&changed.1, "IPv6 after other flags");
    ns.init_ok(&[]);
    assert!(
        (ns.nat("iptables-save"), ns.nat("ip6tables-save")) == first,
        "the original flags did not restore the rules"
    );

    let out = ns.init_ok(&["--cleanup"]);
    assert!(out.contains("IPv4: removed 2 jump(s) and 4 chain(s)"), "{out}");
    let after = (ns.nat("iptables-save"), ns.nat("ip6tables-save"));
    assert!(
        after == before,
        "cleanup must leave the table as it was:\n--- before\n{}{}--- after\n{}{}",
        before.0,
        before.1,
        after.0,
        after.1
    );
    let out = ns.init_ok(&["--cleanup"]);
    assert!(out.contains("IPv4: nothing of ours to remove"), "{out}");
}

#[test]
fn init_picks_the_backend_that_has_rules_and_obeys_the_override() {
    let Some(ns) = Netns::first("init_picks_the_backend") else { return };
    let legacy = need("iptables-legacy", "iptables");
    // Rules only in the legacy backend: auto must write there, not into nft.
    check(ns.cmd(&legacy).args(["-t", "nat", "-A", "OUTPUT", "-p", "udp", "--dport", "53", "-j", "RETURN"]));
    let legacy_before = ns.nat("iptables-legacy-save");

    let out = ns.init_ok(&[]);
    assert!(out.contains("iptables backend: legacy"), "{out}");
    assert!(ns.nat("iptables-legacy-save").contains(":NEUTRINO_OUTPUT - [0:0]"), "rules in legacy");
    assert!(ns.nat("ip6tables-legacy-save").contains(":NEUTRINO_OUTPUT - [0:0]"), "IPv6 rules in legacy");
    assert!(!ns.nat("iptables-nft-save").contains("NEUTRINO"), "nothing in nft");
    let out = ns.init_ok(&["--cleanup"]);
    assert!(out.contains("iptables backend: legacy"), "{out}");
    assert_eq!(ns.nat("iptables-legacy-save"), legacy_before);

    // The override wins over the detection, both ways.
    ns.init_ok(&["--iptables-backend", "nft"]);
    assert!(ns.nat("iptables-nft-save").contains(":NEUTRINO_OUTPUT - [0:0]"), "rules in nft");
    assert!(!ns.nat("iptables-legacy-save").contains("NEUTRINO"), "nothing in legacy");
    ns.init_ok(&["--iptables-backend", "nft", "--cleanup"]);
    assert!(!ns.nat("iptables-nft-save").contains("NEUTRINO"), "nft cleaned up");
}

#[test]
fn init_redirects_app_traffic_but_not_the_proxys_own() {
    let Some(pod) = Netns::first("init_redirects") else { return };
    let peer = Netns::new("init_redirects_peer");
    pod.ip(&["link", "add", "veth0", "type", "veth", "peer", "name", "veth1", "netns", &peer.name]);
    for (ns, dev, v4, v6) in
        [(&pod, "veth0", "10.255.0.2/24", "fd00:255::2/64"), (&peer, "veth1", "10.255.0.1/24", "fd00:255::1/64")]
    {
        ns.ip(&["addr", "add", v4, "dev", dev]);
        ns.ip(&["addr", "add", v6, "dev", dev, "nodad"]);
        ns.ip(&["link", "set", dev, "up"]);
    }
    let _peer_servers = peer.serve(&[
        ("peer", "10.255.0.1", 80),
        ("peer6", "fd00:255::1", 80),
        ("peer-control-plane", "10.255.0.1", 15010),
    ]);
    let _pod_servers = pod.serve(&[
        ("outbound-listener", "127.0.0.1", 15001),
        ("outbound-listener6", "::1", 15001),
        ("inbound-listener", "0.0.0.0", 15006),
        ("app", "0.0.0.0", 8080),
        ("admin", "0.0.0.0", 15020),
    ]);
    let uid = Some(PROXY_UID);
    let before = || {
        assert_eq!(pod.connect(None, "10.255.0.1", 80), "peer");
        assert_eq!(pod.connect(None, "fd00:255::1", 80), "peer6");
        assert_eq!(peer.connect(None, "10.255.0.2", 8080), "app");
    };
    before();

    pod.init_ok(&[]);
    // The app's (root's) outbound connections reach the proxy's outbound listener...
    assert_eq!(pod.connect(None, "10.255.0.1", 80), "outbound-listener");
    assert_eq!(pod.connect(None, "fd00:255::1", 80), "outbound-listener6");
    // ...the proxy's own do not...
    assert_eq!(pod.connect(uid, "10.255.0.1", 80), "peer");
    assert_eq!(pod.connect(uid, "fd00:255::1", 80), "peer6");
    // ...nor loopback, nor the control plane's ports.
    assert_eq!(pod.connect(None, "127.0.0.1", 8080), "app");
    assert_eq!(pod.connect(None, "10.255.0.1", 15010), "peer-control-plane");
    // Inbound connections reach the inbound listener, except on the admin port.
    assert_eq!(peer.connect(None, "10.255.0.2", 8080), "inbound-listener");
    assert_eq!(peer.connect(None, "10.255.0.2", 15020), "admin");

    // Exclusions by flag.
    pod.init_ok(&["--outbound-exclude-cidrs", "10.255.0.1/32", "--inbound-exclude-ports", "8080"]);
    assert_eq!(pod.connect(None, "10.255.0.1", 80), "peer");
    assert_eq!(pod.connect(None, "fd00:255::1", 80), "outbound-listener6");
    assert_eq!(peer.connect(None, "10.255.0.2", 8080), "app");
    pod.init_ok(&["--outbound-exclude-ports", "80", "--inbound-include-ports", "9090"]);
    assert_eq!(pod.connect(None, "10.255.0.1", 80), "peer");
    assert_eq!(peer.connect(None, "10.255.0.2", 8080), "app");

    pod.init_ok(&["--cleanup"]);
    before();
}

#[test]
fn init_errors_say_what_to_do() {
    let Some(ns) = Netns::first("init_errors") else { return };
    let out = run(ns.cmd(need("env", "coreutils")).args(["PATH=/nonexistent"]).arg(bin("neutrino-proxy")).arg("init"));
    assert!(!out.status.success());
    assert!(text(&out).contains("not found on PATH: install the iptables package"), "{}", text(&out));

    // Without NET_ADMIN: an unprivileged user runs a copy it can reach.
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let copy = dir.path().join("neutrino-proxy");
    std::fs::copy(bin("neutrino-proxy"), &copy).unwrap();
    let out = run(ns
        .cmd(need("setpriv", "util-linux"))
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all"])
        .arg(&copy)
        .arg("init"));
    assert!(!out.status.success());
    assert!(text(&out).contains("permission denied") && text(&out).contains("NET_ADMIN and NET_RAW"), "{}", text(&out));

    let out = ns.init(&["--outbound-exclude-cidrs", "10.0.0.0/40"]);
    assert!(!out.status.success());
    assert!(
        text(&out).contains("--outbound-exclude-cidrs: \"10.0.0.0/40\" has a prefix length out of range"),
        "{}",
        text(&out)
    );
}
