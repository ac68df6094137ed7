#!/usr/bin/env python3
"""Data-path benchmark orchestrator (issue 4, first slice). Run it through run.sh.

Starts, on 127.0.0.1 only: a backend nginx (1 KiB and 1 MiB static files), the real
release neutrino-control-plane with a generated mesh file, three neutrino-proxy
processes (outbound-only client; mesh-path client; the mesh path's inbound proxy in
front of the backend), nginx and HAProxy as reverse proxies. Then measures every
target with wrk, h2load and oha, reads CPU and RSS from /proc, writes
benches/results/dataplane.md and benches/results/dataplane-latency.png.

Every process it starts is in its own session and is stopped (SIGTERM, then SIGKILL
after 5 s) on every exit path: normal end, error, Ctrl-C, SIGTERM.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
LO = "127.0.0.1"

# Loopback ports. Checked free before anything starts.
P = {
    "backend": 18080, "backend_h2": 18082,
    "nginx": 18180, "nginx_h2": 18182,
    "haproxy": 18280, "haproxy_h2": 18282,
    # outbound-only client proxy (A)
    "a_out": 18380, "a_in": 18381, "a_admin": 18390,
    # mesh path: client proxy (B) -> inbound proxy (C) -> backend
    "b_out": 18480, "b_in": 18481, "b_admin": 18490,
    "c_out": 18580, "c_in": 18581, "c_admin": 18590,
    # mTLS mesh path: client proxy (D) -> inbound proxy (E) -> backend, identities from the CA
    "d_out": 18680, "d_in": 18681, "d_admin": 18690,
    "e_out": 18780, "e_in": 18781, "e_admin": 18790,
    "cp_grpc": 18610, "cp_tls": 18612, "cp_admin": 18614,
}

CLK_TCK = int(subprocess.run(["getconf", "CLK_TCK"], capture_output=True, text=True, check=True).stdout)


def log(msg: str) -> None:
    print(f"dataplane: {msg}", file=sys.stderr, flush=True)


class BenchError(Exception):
    pass


# --------------------------------------------------------------------------- processes

class Procs:
    """Every process this benchmark started; all stopped by stop_all()."""

    def __init__(self) -> None:
        self.items: list[tuple[str, subprocess.Popen, Path]] = []

    def start(self, name: str, argv: list[str], logdir: Path, env: dict | None = None) -> subprocess.Popen:
        logf = logdir / f"{name}.log"
        fh = open(logf, "wb")
        try:
            p = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                 env={**os.environ, **(env or {})}, start_new_session=True)
        except FileNotFoundError as e:
            raise BenchError(f"starting {name}: {e}; is {argv[0]} installed?") from e
        finally:
            fh.close()
        self.items.append((name, p, logf))
        return p

    def check_alive(self) -> None:
        for name, p, logf in self.items:
            if p.poll() is not None:
                raise BenchError(f"{name} exited with status {p.returncode}; last lines of {logf}:\n{tail(logf)}")

    def stop_all(self) -> None:
        for _, p, _ in reversed(self.items):
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.time() + 5
        for name, p, _ in reversed(self.items):
            try:
                p.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                log(f"{name} (pid {p.pid}) did not stop on SIGTERM within 5 s; killing it")
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait(timeout=5)
        self.items.clear()


def tail(path: Path, n: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError as e:
        return f"(cannot read: {e})"


def port_free(port: int) -> bool:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind((LO, port))
        return True
    except OSError:
        return False
    finally:
        s.close()


def wait_tcp(name: str, port: int, procs: Procs, timeout: float = 20) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        procs.check_alive()
        try:
            socket.create_connection((LO, port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.1)
    raise BenchError(f"{name} is not listening on {LO}:{port} after {timeout:.0f} s; see its log")


def wait_ready(name: str, port: int, procs: Procs, timeout: float = 30) -> None:
    deadline = time.time() + timeout
    last = ""
    while time.time() < deadline:
        procs.check_alive()
        try:
            with urllib.request.urlopen(f"http://{LO}:{port}/ready", timeout=1) as r:
                if r.status == 200:
                    return
        except Exception as e:  # noqa: BLE001 - report the last reason
            last = str(e)
        time.sleep(0.2)
    raise BenchError(f"{name}: /ready on {LO}:{port} not 200 after {timeout:.0f} s (last: {last}); see its log")


def http_get(port: int, path: str, host: str | None) -> tuple[int, bytes]:
    req = urllib.request.Request(f"http://{LO}:{port}{path}", headers={"Host": host} if host else {})
    with urllib.request.urlopen(req, timeout=5) as r:
        return r.status, r.read()


# --------------------------------------------------------------------------- /proc

def children(pid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                out.append(int(d.name))
    return out


def cpu_ticks(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15)
    return total


def rss_kib(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
    return total


def threads(pid: int) -> list[str]:
    names = []
    for t in Path(f"/proc/{pid}/task").iterdir():
        try:
            names.append((t / "comm").read_text().strip())
        except OSError:
            pass
    return sorted(names)


# --------------------------------------------------------------------------- targets

@dataclass
class Target:
    key: str
    label: str
    port: int
    h2port: int
    host: str | None
    pids: list[int] = field(default_factory=list)
    hops: int = 1
    res: dict = field(default_factory=dict)


def render(template: str, out: Path, **kv: object) -> Path:
    text = (HERE / template).read_text()
    for k, v in kv.items():
        text = text.replace(f"@{k}@", str(v))
    left = re.findall(r"@[A-Z0-9]+@", text)
    if left:
        raise BenchError(f"{template}: placeholders left unfilled: {left}")
    out.write_text(text)
    return out


def mesh_yaml() -> str:
    cap = '{cpu: "100000", memory: 1Ti}'  # room for any concurrency: never a 503 for capacity
    return f"""# Generated by benches/dataplane/bench.py. Format: docs/mesh-file.md
services:
  - name: bench             # outbound only: client proxy -> backend
    namespace: default
    ports: [{{port: 80, targetPort: {P['backend']}, protocol: http}}]
    endpoints:
      - address: {LO}
        port: {P['backend']}
        name: backend
        capacity: {cap}
  - name: bench-mesh        # mesh path: client proxy -> inbound proxy -> backend
    namespace: default
    ports: [{{port: 80, targetPort: {P['c_in']}, protocol: http}}]
    endpoints:
      - address: {LO}
        port: {P['c_in']}
        name: inbound-proxy
        capacity: {cap}
  - name: bench-mtls        # mTLS mesh path: client proxy -> inbound proxy (mTLS) -> backend
    namespace: default
    ports: [{{port: 80, targetPort: {P['e_in']}, protocol: http}}]
    endpoints:
      - address: {LO}
        port: {P['e_in']}
        name: bench-e
        serviceAccount: bench-e
        capacity: {cap}
"""


def start_all(root: Path, tmp: Path, procs: Procs, workers: str) -> tuple[dict[str, Target], dict]:
    busy = [f"{k}={v}" for k, v in P.items() if not port_free(v)]
    if busy:
        raise BenchError(f"loopback ports in use: {', '.join(busy)}; stop what uses them (ss -ltnp)")
    tmp.chmod(0o755)  # nginx workers run as an unprivileged user and must read www/
    www = tmp / "www"
    www.mkdir(mode=0o755)
    (www / "1k").write_bytes(b"x" * 1024)
    (www / "1m").write_bytes(os.urandom(1 << 20))

    log("starting the backend (nginx, 1 worker)")
    conf = render("backend-nginx.conf", tmp / "backend-nginx.conf", DIR=tmp, PORT=P["backend"], H2PORT=P["backend_h2"])
    be = procs.start("backend-nginx", ["nginx", "-c", str(conf), "-p", str(tmp)], tmp)
    wait_tcp("backend nginx", P["backend"], procs)

    log("starting nginx as a reverse proxy (worker_processes 1)")
    conf = render("proxy-nginx.conf", tmp / "proxy-nginx.conf", DIR=tmp, PORT=P["nginx"], H2PORT=P["nginx_h2"],
                  BACKEND=P["backend"])
    ng = procs.start("nginx-proxy", ["nginx", "-c", str(conf), "-p", str(tmp)], tmp)
    wait_tcp("nginx proxy", P["nginx"], procs)

    log("starting HAProxy (nbthread 1)")
    conf = render("haproxy.cfg", tmp / "haproxy.cfg", PORT=P["haproxy"], H2PORT=P["haproxy_h2"], BACKEND=P["backend"])
    subprocess.run(["haproxy", "-c", "-q", "-f", str(conf)], check=False)
    hp = procs.start("haproxy", ["haproxy", "-db", "-f", str(conf)], tmp)
    wait_tcp("haproxy", P["haproxy"], procs)

    log("starting neutrino-control-plane with the generated mesh file")
    rel = root / "target" / "release"
    meshdir = tmp / "mesh"
    meshdir.mkdir()
    (meshdir / "mesh.yaml").write_text(mesh_yaml())
    # The mTLS path's identities: a CA generated in ca/, bootstrap tokens per proxy.
    (meshdir / "tokens").write_text("bench-d-token-0123 default/bench-d\nbench-e-token-0123 default/bench-e\n")
    for name in ("d", "e"):
        (meshdir / f"token-{name}").write_text(f"bench-{name}-token-0123\n")
    procs.start("control-plane", [str(rel / "neutrino-control-plane"), "--mesh-file", str(meshdir / "mesh.yaml"),
                                  "--grpc-addr", f"{LO}:{P['cp_grpc']}", "--admin-addr", f"{LO}:{P['cp_admin']}",
                                  "--tls-grpc-addr", f"{LO}:{P['cp_tls']}", "--ca-dir", str(meshdir / "ca"),
                                  "--bootstrap-tokens", str(meshdir / "tokens"), "--log", "warn"], tmp)
    wait_ready("control plane", P["cp_admin"], procs)

    env = {"TOKIO_WORKER_THREADS": workers} if workers else {}
    proxies = {}
    def identity(name: str) -> list[str]:
        return ["--ca-file", str(meshdir / "ca" / "anchors.pem"),
                "--token-file", str(meshdir / f"token-{name}"), "--service-account", f"bench-{name}"]
    for name, extra in (("a", []), ("b", []), ("c", ["--inbound-app-addr", f"{LO}:{P['backend']}"]),
                        ("d", identity("d")), ("e", ["--inbound-app-addr", f"{LO}:{P['backend']}", *identity("e")])):
        log(f"starting neutrino-proxy {name} (TOKIO_WORKER_THREADS={workers or 'unset'})")
        proxies[name] = procs.start(f"proxy-{name}", [
            str(rel / "neutrino-proxy"), "--pod", f"bench-{name}",
            "--control-plane", f"{LO}:{P['cp_tls' if name in 'de' else 'cp_grpc']}",
            "--admin-addr", f"{LO}:{P[name + '_admin']}", "--outbound-addr", f"{LO}:{P[name + '_out']}",
            "--inbound-addr", f"{LO}:{P[name + '_in']}", "--log", "warn", *extra], tmp, env)
    for name in proxies:
        wait_ready(f"neutrino-proxy {name}", P[name + "_admin"], procs)

    # nginx: master + its worker(s); a moment for the worker to be forked.
    time.sleep(0.5)
    targets = {
        "direct": Target("direct", "direct (backend)", P["backend"], P["backend_h2"], None, [be.pid] + children(be.pid)),
        "neutrino": Target("neutrino", "Neutrino outbound", P["a_out"], P["a_out"], "bench.default", [proxies["a"].pid]),
        "mesh": Target("mesh", "Neutrino mesh (out+in)", P["b_out"], P["b_out"], "bench-mesh.default",
                       [proxies["b"].pid, proxies["c"].pid], hops=2),
        "mtls": Target("mtls", "Neutrino mesh mTLS (out+in)", P["d_out"], P["d_out"], "bench-mtls.default",
                       [proxies["d"].pid, proxies["e"].pid], hops=2),
        "nginx": Target("nginx", "nginx", P["nginx"], P["nginx_h2"], None, [ng.pid] + children(ng.pid)),
        "haproxy": Target("haproxy", "HAProxy", P["haproxy"], P["haproxy_h2"], None, [hp.pid]),
    }
    for t in targets.values():
        for size, n in (("/1k", 1024), ("/1m", 1 << 20)):
            try:
                status, body = http_get(t.port, size, t.host)
            except Exception as e:  # noqa: BLE001
                raise BenchError(f"{t.label}: GET {size} on {LO}:{t.port} (Host {t.host}) failed: {e}; "
                                 f"see the logs in {tmp}") from e
            if status != 200 or len(body) != n:
                raise BenchError(f"{t.label}: GET {size} gave {status} with {len(body)} bytes, expected 200 and {n}")
    log("all targets answer GET /1k and /1m")
    return targets, proxies


# --------------------------------------------------------------------------- load generators

def run_tool(argv: list[str], timeout: float) -> str:
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        raise BenchError(f"{argv[0]} did not finish within {timeout:.0f} s: {' '.join(argv)}") from e
    if r.returncode != 0:
        raise BenchError(f"{' '.join(argv)} failed ({r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
    return r.stdout + r.stderr


def wrk(t: Target, conns: int, secs: float, close: bool = False, path: str = "/1k") -> dict:
    argv = ["wrk", "-t1", f"-c{conns}", f"-d{max(1, int(secs))}s", "--latency"]
    if t.host:
        argv += ["-H", f"Host: {t.host}"]
    if close:
        argv += ["-H", "Connection: close"]
    out = run_tool(argv + [f"http://{LO}:{t.port}{path}"], secs + 30)
    m = re.search(r"(\d+) requests in ([\d.]+)(\w+)", out)
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if not m or not rps:
        raise BenchError(f"cannot read wrk's output:\n{out}")
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errs = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    return {"requests": int(m.group(1)), "rps": float(rps.group(1)), "non2xx": int(bad.group(1)) if bad else 0,
            "sockerr": sum(map(int, errs.groups())) if errs else 0}


def h2load(t: Target, secs: float) -> dict:
    argv = ["h2load", "-t1", "-c1", "-m100", "-D", str(int(secs))]
    if t.host:
        argv += ["-H", f":authority: {t.host}"]
    out = run_tool(argv + [f"http://{LO}:{t.h2port}/1k"], secs + 30)
    fin = re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", out)
    reqs = re.search(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored",
                     out)
    codes = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", out)
    if not fin or not reqs:
        raise BenchError(f"cannot read h2load's output:\n{out}")
    return {"requests": int(reqs.group(3)), "rps": float(fin.group(1)),
            "non2xx": int(codes.group(3)) + int(codes.group(4)) if codes else 0,
            "sockerr": int(reqs.group(5)) + int(reqs.group(6))}


def oha_bin() -> str | None:
    return shutil.which("oha") or (str(Path.home() / ".cargo/bin/oha") if (Path.home() / ".cargo/bin/oha").exists()
                                   else None)


def oha(t: Target, rate: int, secs: float, conns: int) -> dict:
    argv = [oha_bin(), "--no-tui", "--output-format", "json", "-z", f"{int(secs)}s", "-q", str(rate), "-c",
            str(conns), "--latency-correction"]
    if t.host:
        argv += ["-H", f"Host: {t.host}"]
    out = run_tool(argv + [f"http://{LO}:{t.port}/1k"], secs + 60)
    j = json.loads(out[out.index("{"):])
    lp = j["latencyPercentiles"]
    codes = j.get("statusCodeDistribution", {})
    return {"p50": lp["p50"] * 1e6, "p99": lp["p99"] * 1e6, "p99.9": lp["p99.9"] * 1e6,
            "rps": j["summary"]["requestsPerSec"], "ok": codes.get("200", 0),
            # Requests still in flight when oha's duration ends are "aborted due to deadline":
            # an artefact of stopping, not a failure of the target.
            "bad": sum(v for k, v in codes.items() if k != "200")
            + sum(v for k, v in j.get("errorDistribution", {}).items() if "deadline" not in k)}


def measured(t: Target, fn, warm, procs: Procs) -> dict:
    """Warm up, then run fn() with CPU of the target's processes read around it."""
    warm()
    procs.check_alive()
    c0 = cpu_ticks(t.pids) if t.pids else 0
    r = fn()
    c1 = cpu_ticks(t.pids) if t.pids else 0
    procs.check_alive()
    r["cpu_s"] = (c1 - c0) / CLK_TCK
    r["cpu_ms_per_1k"] = r["cpu_s"] * 1e3 / r["requests"] * 1000 if r["requests"] else float("nan")
    return r


# --------------------------------------------------------------------------- idle connections

def idle_rss(t: Target, n: int, tmp: Path, procs: Procs) -> dict:
    argv = [sys.executable, str(HERE / "idle_conns.py"), "--port", str(t.port), "--count", str(n)]
    if t.host:
        argv += ["--host", t.host]
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        line = ""
        deadline = time.time() + 120
        while time.time() < deadline:
            line = p.stdout.readline()
            if not line or line.startswith("READY"):
                break
        if not line.startswith("READY"):
            raise BenchError(f"idle_conns.py against {t.label} did not get ready: {line!r} {p.stderr.read()[-2000:]}")
        opened = int(line.split()[1])
        time.sleep(2)  # let the proxies settle
        procs.check_alive()
        settled = rss_kib(t.pids)
        # Neutrino parks an HTTP/1 connection quiet for 2-4 s (--park-idle-after-ms) and
        # returns the freed memory to the OS within 5 s after that: measure again 12 s in.
        time.sleep(10)
        procs.check_alive()
        return {"opened": opened, "rss_kib_2s": settled, "rss_kib": rss_kib(t.pids)}
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGTERM)
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(timeout=5)
        time.sleep(1)


# --------------------------------------------------------------------------- profile

def profile(t: Target, secs: float, tmp: Path) -> str | None:
    if not shutil.which("perf"):
        return None
    data = tmp / "perf.data"
    perf = subprocess.Popen(["perf", "record", "-F", "999", "-g", "-o", str(data), "-p",
                             ",".join(map(str, t.pids)), "--", "sleep", str(secs)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        wrk(t, 64, secs)
    finally:
        try:
            _, err = perf.communicate(timeout=secs + 30)
        except subprocess.TimeoutExpired:
            os.killpg(perf.pid, signal.SIGKILL)
            perf.wait()
            err = "timed out"
    if perf.returncode != 0 or not data.exists():
        log(f"perf record failed ({err.strip()[-300:]}); no profile")
        return None
    r = subprocess.run(["perf", "report", "-i", str(data), "--no-children", "--sort", "dso,symbol", "--stdio",
                        "-g", "none", "--percent-limit", "0.7"], capture_output=True, text=True, timeout=120)
    # perf pads each line and appends empty columns ("-  -"): trim them.
    lines = [re.sub(r"\s+-\s+-\s*$", "", ln).rstrip() for ln in r.stdout.splitlines()
             if ln.strip() and not ln.startswith("#")]
    return "\n".join(lines[:40])


# --------------------------------------------------------------------------- report

def fmt(x: float, nd: int = 0) -> str:
    if x != x:  # nan
        return "-"
    return f"{x:,.{nd}f}"


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}" if b else "-"


def report(targets: dict[str, Target], meta: dict, prof: str | None) -> str:
    d, ng, hp = targets["direct"], targets["nginx"], targets["haproxy"]
    L = [f"# Data path: results ({meta['date']}, commit `{meta['commit']}`)", "",
         f"Machine: {meta['machine']}. Every process on loopback on the same {meta['cores']} cores, load generators "
         f"included. nginx `worker_processes 1`, HAProxy `nbthread 1`, backend nginx `worker_processes 1`; "
         f"Neutrino: {meta['neutrino_threads']}. Windows: {meta['warmup']} s warm-up, {meta['duration']} s measured.",
         ""]
    wl = [("h1_c1", "HTTP/1.1 keep-alive, 1 KiB, 1 connection (wrk)"),
          ("h1_c64", "HTTP/1.1 keep-alive, 1 KiB, 64 connections (wrk)"),
          ("h2c", "h2c, 1 KiB, 1 connection x 100 streams (h2load)"),
          ("close", "new connection per request, 1 KiB, 64 connections, `Connection: close` (wrk)"),
          ("h1_1m", "HTTP/1.1 keep-alive, 1 MiB, 8 connections (wrk)")]
    L += ["## Maximum req/s", "", "| workload | target | req/s | x direct | x nginx | x HAProxy | proxy CPU ms / 1k req | errors |",
          "|---|---|---:|---:|---:|---:|---:|---:|"]
    for k, title in wl:
        if k not in d.res:
            continue
        for t in targets.values():
            r = t.res.get(k)
            if not r:
                continue
            cpu = fmt(r["cpu_ms_per_1k"], 1) if t.key != "direct" else "-"
            L.append(f"| {title} | {t.label} | {fmt(r['rps'])} | {ratio(r['rps'], d.res[k]['rps'])} | "
                     f"{ratio(r['rps'], ng.res[k]['rps'])} | {ratio(r['rps'], hp.res[k]['rps'])} | {cpu} | "
                     f"{r['non2xx'] + r['sockerr']} |")
    L += [""]
    if "mtls" in targets and "mesh" in targets:
        m, p = targets["mtls"], targets["mesh"]
        L += ["## mTLS mesh path against the plaintext mesh path (same run; goal: at least 0.8x req/s)", "",
              "| workload | plaintext req/s | mTLS req/s | mTLS x plaintext |", "|---|---:|---:|---:|"]
        for k, title in wl:
            if k in m.res and k in p.res:
                L.append(f"| {title} | {fmt(p.res[k]['rps'])} | {fmt(m.res[k]['rps'])} | "
                         f"{ratio(m.res[k]['rps'], p.res[k]['rps'])} |")
        L += [""]
    if any("lat" in t.res for t in targets.values()):
        L += ["## Latency at half of each target's own maximum (64 connections, keep-alive, oha, latency-corrected)", "",
              "Added = target minus direct measured at the same rate in the same run. Mesh path: two hops; "
              "per hop = added / 2.", "",
              "| target | rate (req/s) | p50 (µs) | p99 (µs) | p99.9 (µs) | direct p50/p99/p99.9 at that rate (µs) | "
              "added p50 (µs) | added p99 (µs) | added p99.9 (µs) | added p50 x nginx | added p99 x nginx | errors |",
              "|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
        for t in targets.values():
            r = t.res.get("lat")
            if not r:
                continue
            b = r["direct"]
            add = {q: r[q] - b[q] for q in ("p50", "p99", "p99.9")}
            t.res["added"] = add
        for t in targets.values():
            r = t.res.get("lat")
            if not r:
                continue
            b, add = r["direct"], t.res["added"]
            na = ng.res.get("added", {})
            L.append(f"| {t.label} | {fmt(r['rate'])} | {fmt(r['p50'])} | {fmt(r['p99'])} | {fmt(r['p99.9'])} | "
                     f"{fmt(b['p50'])} / {fmt(b['p99'])} / {fmt(b['p99.9'])} | {fmt(add['p50'])} | {fmt(add['p99'])} | "
                     f"{fmt(add['p99.9'])} | {ratio(add['p50'], na.get('p50', 0)) if t.key != 'direct' else '-'} | "
                     f"{ratio(add['p99'], na.get('p99', 0)) if t.key != 'direct' else '-'} | {r['bad'] + b['bad']} |")
        L += [""]
    L += ["## Memory (VmRSS, all of the target's processes)", "",
          "| target | processes | RSS idle (MiB) | RSS after the load (MiB) | RSS with idle connections, 2 s after opening (MiB) | RSS with idle connections, 12 s after (MiB) | idle connections open |",
          "|---|---:|---:|---:|---:|---:|"]
    for t in targets.values():
        if t.key == "direct":
            continue
        idle = t.res.get("idle")
        L.append(f"| {t.label} | {len(t.pids)} | {t.res['rss_idle'] / 1024:.1f} | {t.res['rss_after'] / 1024:.1f} | "
                 f"{idle['rss_kib_2s'] / 1024:.1f} | {idle['rss_kib'] / 1024:.1f} | {idle['opened']:,} |" if idle else
                 f"| {t.label} | {len(t.pids)} | {t.res['rss_idle'] / 1024:.1f} | {t.res['rss_after'] / 1024:.1f} | - | - | - |")
    L += [""]
    if prof:
        L += ["## Profile: Neutrino outbound proxy under HTTP/1.1 keep-alive, 64 connections",
              "", "`perf record -F 999 -g`, `perf report --no-children --sort dso,symbol` (self time, >= 0.7 %):", "",
              "```", prof, "```", ""]
    L += [f"Tools: {meta['tools']}.", ""]
    return "\n".join(L)


def plot(targets: dict[str, Target], out: Path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is not installed; no plot")
        return False
    ts = [t for t in targets.values() if "lat" in t.res]
    if not ts:
        return False
    qs = ["p50", "p99", "p99.9"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    w = 0.8 / len(ts)
    for i, t in enumerate(ts):
        xs = [j + i * w for j in range(len(qs))]
        axes[0].bar(xs, [t.res["lat"][q] for q in qs], w, label=f"{t.label} @ {t.res['lat']['rate']:,.0f}/s")
        if t.key != "direct":
            axes[1].bar(xs, [t.res["added"][q] for q in qs], w, label=t.label, color=f"C{i}")
    for ax, title in ((axes[0], "latency at half of own max (µs)"), (axes[1], "added over direct at same rate (µs)")):
        ax.set_xticks([j + 0.4 - w / 2 for j in range(len(qs))], qs)
        ax.set_title(title)
        ax.set_yscale("symlog", linthresh=100)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7)
    axes[1].axhline(60, color="grey", ls=":", lw=1)
    axes[1].axhline(300, color="grey", ls="--", lw=1)
    fig.suptitle("HTTP/1.1 keep-alive, 1 KiB, 64 connections, fixed rate (oha, latency-corrected); "
                 "goal lines: 60 µs p50, 300 µs p99 per hop", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    return True


# --------------------------------------------------------------------------- main

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", type=Path, required=True)
    ap.add_argument("--duration", type=float, default=float(os.environ.get("DURATION", 10)))
    ap.add_argument("--warmup", type=float, default=float(os.environ.get("WARMUP", 2)))
    ap.add_argument("--idle-conns", type=int, default=int(os.environ.get("IDLE_CONNS", 10000)),
                    help="idle keep-alive connections for the RSS figure (0: skip)")
    ap.add_argument("--workers", default=os.environ.get("NEUTRINO_WORKERS", "1"),
                    help="TOKIO_WORKER_THREADS for the Neutrino proxies ('' = tokio's default, one per core)")
    ap.add_argument("--no-profile", action="store_true")
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    root = a.root.resolve()
    results = root / "benches" / "results"
    results.mkdir(parents=True, exist_ok=True)
    out = a.out or results / "dataplane.md"
    png = out.with_name(out.stem + "-latency.png")
    D, W = a.duration, a.warmup

    procs = Procs()
    tmp = Path(tempfile.mkdtemp(prefix="neutrino-dataplane-"))
    keep_tmp = False

    def on_signal(signum, _frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    atexit.register(procs.stop_all)
    t_start = time.time()
    # The commit the binaries were built from (read before the run: others may commit meanwhile).
    commit = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip() or "unknown"
    dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--", "proxy", "control-plane"],
                           capture_output=True, text=True).stdout.strip()
    try:
        targets, proxies = start_all(root, tmp, procs, a.workers)
        th = threads(proxies["a"].pid)
        workers = sum(1 for n in th if n.startswith(("tokio-runtime-w", "tokio-rt-worker")))
        neutrino_threads = (f"TOKIO_WORKER_THREADS={a.workers or 'unset'}: {workers} tokio worker thread(s) per proxy "
                            f"({len(th)} threads in all: {', '.join(sorted(set(th)))})")
        log(neutrino_threads)
        time.sleep(1)
        for t in targets.values():
            if t.pids:
                t.res["rss_idle"] = rss_kib(t.pids)

        steps = [("h1_c1", lambda t: (lambda: wrk(t, 1, W), lambda: wrk(t, 1, D))),
                 ("h1_c64", lambda t: (lambda: wrk(t, 64, W), lambda: wrk(t, 64, D))),
                 ("h2c", lambda t: (lambda: h2load(t, max(1, W)), lambda: h2load(t, D))),
                 ("close", lambda t: (lambda: wrk(t, 64, W, close=True), lambda: wrk(t, 64, D, close=True))),
                 ("h1_1m", lambda t: (lambda: wrk(t, 8, W, path="/1m"), lambda: wrk(t, 8, D, path="/1m")))]
        have_h2load = shutil.which("h2load") is not None
        for key, mk in steps:
            if key == "h2c" and not have_h2load:
                log("h2load not found; skipping h2c")
                continue
            for t in targets.values():
                log(f"{key}: {t.label}")
                warm, fn = mk(t)
                t.res[key] = measured(t, fn, warm, procs)
                log(f"  {t.res[key]['rps']:,.0f} req/s, proxy CPU {t.res[key]['cpu_ms_per_1k']:.1f} ms per 1k requests"
                    f", errors {t.res[key]['non2xx'] + t.res[key]['sockerr']}")

        if oha_bin():
            d = targets["direct"]
            for t in targets.values():
                rate = max(1, int(t.res["h1_c64"]["rps"] / 2))
                log(f"latency at {rate:,} req/s (half of its max): {t.label}, then direct at the same rate")
                r = oha(t, rate, D, 64)
                r["rate"] = rate
                r["direct"] = r if t is d else oha(d, rate, D, 64)
                t.res["lat"] = r
                log(f"  p50 {r['p50']:.0f} µs, p99 {r['p99']:.0f} µs, p99.9 {r['p99.9']:.0f} µs "
                    f"(direct {r['direct']['p50']:.0f}/{r['direct']['p99']:.0f}/{r['direct']['p99.9']:.0f})")
        else:
            log("oha not installed: no fixed-rate latency (see run.sh's output for why)")

        time.sleep(2)
        for t in targets.values():
            if t.pids:
                t.res["rss_after"] = rss_kib(t.pids)
        if a.idle_conns:
            for t in targets.values():
                if t.key == "direct":
                    continue
                log(f"RSS with {a.idle_conns:,} idle keep-alive connections: {t.label}")
                t.res["idle"] = idle_rss(t, a.idle_conns, tmp, procs)
                log(f"  {t.res['idle']['rss_kib_2s'] / 1024:.1f} MiB 2 s after opening, {t.res['idle']['rss_kib'] / 1024:.1f} "
                    f"MiB 12 s after, with {t.res['idle']['opened']:,} open")

        prof = None
        if not a.no_profile:
            log("profiling the Neutrino outbound proxy with perf during HTTP/1.1 keep-alive, 64 connections")
            prof = profile(targets["neutrino"], D, tmp)

        cpu_model = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                          if ln.startswith("model name")), "unknown CPU")
        mem = int(Path("/proc/meminfo").read_text().split()[1]) // (1 << 20)
        ver = lambda argv: (subprocess.run(argv, capture_output=True, text=True).stdout
                            + subprocess.run(argv, capture_output=True, text=True).stderr).strip().splitlines()[0]
        tools = ", ".join([ver(["nginx", "-v"]).replace("nginx version: ", ""), ver(["haproxy", "-v"]).split(" - ")[0],
                           ver(["wrk", "-v"]).split(" [")[0],
                           ver(["h2load", "--version"]) if have_h2load else "no h2load",
                           ver([oha_bin(), "--version"]) if oha_bin() else "no oha"])
        meta = {"date": time.strftime("%Y-%m-%d"), "commit": commit + (" + uncommitted proxy changes" if dirty else ""),
                "machine": f"{os.cpu_count()} cores ({cpu_model}), {mem} GiB, Linux {os.uname().release}",
                "cores": os.cpu_count(), "neutrino_threads": neutrino_threads, "warmup": W, "duration": D,
                "tools": tools}
        md = report(targets, meta, prof)
        if plot(targets, png):
            md += f"\nLatency plot: `{png.name}`.\n"
        out.write_text(md)
        print(md)
        log(f"done in {time.time() - t_start:.0f} s; wrote {out}" + (f" and {png}" if png.exists() else ""))
        return 0
    except BenchError as e:
        keep_tmp = True
        log(f"ERROR: {e}")
        log(f"logs kept in {tmp}")
        return 1
    finally:
        procs.stop_all()
        if not keep_tmp:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
