"""The data-path benchmark's load runs (benches/dataplane): wrk, h2load (h2c and the gRPC
unary call) and oha, each parsed into a dict of requests, req/s and errors; measured(),
which reads the target's CPU time around a run; the idle-connections RSS figure; and the
perf profile.

It starts no long-lived process: each tool runs to its end (or is killed) in the call.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from procs import CLK_TCK, HERE, LO, BenchError, Procs, cpu_ticks, log, rss_kib
from targets import GRPC_PATH, Target


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
    """h2c: GET /1k, one connection with 100 concurrent streams."""
    argv = ["h2load", "-t1", "-c1", "-m100", "-D", str(int(secs))]
    if t.host:
        argv += ["-H", f":authority: {t.host}"]
    return parse_h2load(run_tool(argv + [f"http://{LO}:{t.h2port}/1k"], secs + 30))


def h2load_grpc(t: Target, secs: float) -> dict:
    """gRPC unary: POST bench.Echo/Unary (one gRPC frame from t.grpc.body), one connection
    with 100 concurrent streams. h2load sees HTTP status only; grpc-status in the trailers
    was checked once per target by targets.check_grpc() before any load."""
    if not t.grpc:
        raise BenchError(f"{t.label} has no gRPC port")
    argv = ["h2load", "-t1", "-c1", "-m100", "-D", str(int(secs)), "-d", str(t.grpc.body),
            "-H", "content-type: application/grpc", "-H", "te: trailers"]
    if t.grpc.host:
        argv += ["-H", f":authority: {t.grpc.host}"]
    return parse_h2load(run_tool(argv + [f"http://{LO}:{t.grpc.port}{GRPC_PATH}"], secs + 30))


def parse_h2load(out: str) -> dict:
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


def measured(pids: list[int], fn, warm, procs: Procs) -> dict:
    """Warm up, then run fn() with CPU of the target's processes (pids) read around it."""
    warm()
    procs.check_alive()
    c0 = cpu_ticks(pids) if pids else 0
    r = fn()
    c1 = cpu_ticks(pids) if pids else 0
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
