#!/usr/bin/env python3
"""Telemetry sinks failing: does a request ever wait for the request log or the trace
exporter? Run it through run.sh:  bash benches/dataplane/run.sh outage

Starts, on 127.0.0.1: the backend nginx, the release control plane, and outbound proxies in
front of the same backend: one without telemetry (the reference), one writing every request
to a real redis-server (the request log), and three exporting traces over OTLP: to a working
collector, to one that refuses connections (down), and to one that accepts and never
answers (hanging). At a fixed rate (oha, latency-corrected, 64 connections, half of the
logging proxy's measured maximum) it measures, each next to the reference at the same rate:

  1. Redis up;
  2. Redis stalled (SIGSTOP: connections open, nothing answers: the slow case);
  3. Redis killed (connections refused);
  4. Redis back (restarted on the same port);
  5. traces to a working collector (otlp_sink.py: the baseline of tracing on);
  6. traces to a collector that is down;
  7. traces to a collector that hangs.

For each phase: p50/p99/p99.9, errors, and the sink's counters (records written/dropped;
spans exported/dropped). Results: benches/results/outage.md.
"""

from __future__ import annotations

import argparse
import atexit
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from procs import LO, BenchError, Procs, log, port_free, wait_ready, wait_tcp  # noqa: E402
from targets import Target, mesh_yaml, render  # noqa: E402
from workloads import oha, oha_bin, wrk  # noqa: E402

P = {"backend": 18080, "backend_h2": 18082, "cp_grpc": 18610, "cp_admin": 18614, "redis": 18699,
     "otlp_up": 18696, "otlp_down": 18697, "otlp_hang": 18698,
     "ref_out": 18380, "ref_in": 18381, "ref_admin": 18390,
     "log_out": 18480, "log_in": 18481, "log_admin": 18490,
     "up_out": 18880, "up_in": 18881, "up_admin": 18890,
     "down_out": 18580, "down_in": 18581, "down_admin": 18590,
     "hang_out": 18780, "hang_in": 18781, "hang_admin": 18790}


def counters(admin: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://{LO}:{admin}/metrics", timeout=5) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        for k in ("request_log_written", "request_log_dropped", "trace_spans_exported", "trace_spans_dropped"):
            if line.startswith(f"neutrino_proxy_{k}_total "):
                out[k] = float(line.split()[-1])
    return out


def cpu_cell(c: dict[str, float]) -> str:
    return f"{c['requests']:.1f} / {c['batching']:.1f} / {c['export']:.1f}"


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds (user + system) of each of a process's threads, summed by thread name
    (tokio's request workers, the span batching thread, the OTLP export runtime)."""
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[str, float] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            stat = (task / "stat").read_text()
        except OSError:
            continue  # the thread ended between the listing and the read
        name = stat[stat.index("(") + 1:stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2:].split()
        out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / tick
    return out


def group(name: str) -> str:
    if name.startswith("OpenTelemetry"):
        return "batching"
    if name.startswith("otlp-export"):
        return "export"
    return "requests"


def cpu_per_request(before: dict[str, float], after: dict[str, float], requests: float) -> dict[str, float]:
    """µs of CPU per request by thread group, from two `thread_cpu` readings."""
    out = {"requests": 0.0, "batching": 0.0, "export": 0.0}
    for name, secs in after.items():
        out[group(name)] += secs - before.get(name, 0.0)
    return {k: v * 1e6 / max(requests, 1.0) for k, v in out.items()}


def start_redis(procs: Procs, tmp: Path) -> subprocess.Popen:
    p = procs.start("redis", ["redis-server", "--port", str(P["redis"]), "--bind", LO, "--save", "",
                              "--appendonly", "no"], tmp)
    wait_tcp("redis-server", P["redis"], procs)
    return p


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", type=Path, required=True)
    ap.add_argument("--duration", type=float, default=float(os.environ.get("DURATION", 10)))
    ap.add_argument("--workers", default=os.environ.get("NEUTRINO_WORKERS", "1"))
    a = ap.parse_args()
    root = a.root.resolve()
    out = root / "benches" / "results" / "outage.md"
    D = a.duration
    if not shutil.which("redis-server"):
        raise SystemExit("redis-server not found; run.sh installs it (apt-get install redis-server)")
    if not oha_bin():
        raise SystemExit("oha not found; run.sh installs it (cargo install --locked oha)")
    busy = [f"{k}={v}" for k, v in P.items() if not port_free(v)]
    if busy:
        raise SystemExit(f"loopback ports in use: {', '.join(busy)}; stop what uses them (ss -ltnp)")

    procs = Procs()
    tmp = Path(tempfile.mkdtemp(prefix="neutrino-redis-outage-"))
    tmp.chmod(0o755)
    def on_signal(signum, _frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    atexit.register(procs.stop_all)
    rel = root / "target" / "release"
    try:
        www = tmp / "www"
        www.mkdir(mode=0o755)
        (www / "1k").write_bytes(b"x" * 1024)
        (www / "1m").write_bytes(b"x" * 1024)
        conf = render("backend-nginx.conf", tmp / "backend-nginx.conf", DIR=tmp, PORT=P["backend"],
                      H2PORT=P["backend_h2"])
        procs.start("backend-nginx", ["nginx", "-c", str(conf), "-p", str(tmp)], tmp)
        wait_tcp("backend nginx", P["backend"], procs)
        redis = start_redis(procs, tmp)
        (tmp / "mesh.yaml").write_text(mesh_yaml())
        procs.start("control-plane", [str(rel / "neutrino-control-plane"), "--mesh-file", str(tmp / "mesh.yaml"),
                                      "--grpc-addr", f"{LO}:{P['cp_grpc']}", "--admin-addr", f"{LO}:{P['cp_admin']}",
                                      "--log", "warn"], tmp)
        wait_ready("control plane", P["cp_admin"], procs)
        # The hanging collector: accepts connections and never answers (the kernel's
        # backlog accepts them; nothing reads).
        hang = socket.socket()
        hang.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        hang.bind((LO, P["otlp_hang"]))
        hang.listen(1024)
        # A working collector (otlp_sink.py: accepts every export), for the baseline of tracing on.
        otlp_sink = procs.start("otlp-sink", [sys.executable, str(Path(__file__).resolve().parent / "otlp_sink.py"),
                                  "--port", str(P["otlp_up"])], tmp)
        wait_tcp("the OTLP sink", P["otlp_up"], procs)
        env = {"TOKIO_WORKER_THREADS": a.workers} if a.workers else {}
        pids = {}
        for name, extra, more_env in (
                ("ref", [], {}),
                ("log", ["--redis-url", f"redis://{LO}:{P['redis']}"], {}),
                ("up", ["--otlp-endpoint", f"http://{LO}:{P['otlp_up']}"], {}),
                ("down", ["--otlp-endpoint", f"http://{LO}:{P['otlp_down']}"], {}),
                ("hang", ["--otlp-endpoint", f"http://{LO}:{P['otlp_hang']}"], {})):
            pids[name] = procs.start(f"proxy-{name}", [
                str(root / "target" / "proxy-release" / "neutrino-proxy"),  # the shipped profile (Cargo.toml)
                "--control-plane", f"{LO}:{P['cp_grpc']}", "--pod", f"bench-{name}",
                "--admin-addr", f"{LO}:{P[name + '_admin']}", "--outbound-addr", f"{LO}:{P[name + '_out']}",
                "--inbound-addr", f"{LO}:{P[name + '_in']}", "--log", "warn", *extra], tmp, {**env, **more_env}).pid
            wait_ready(f"proxy {name}", P[name + "_admin"], procs)
        ref = Target("ref", "no telemetry", P["ref_out"], P["ref_out"], "bench.default", [pids["ref"]])
        logging = Target("log", "request log to Redis", P["log_out"], P["log_out"], "bench.default", [pids["log"]])
        tracing = {k: Target(k, f"traces, collector {k}", P[k + "_out"], P[k + "_out"], "bench.default", [pids[k]])
                   for k in ("up", "down", "hang")}

        log("measuring the logging proxy's maximum (wrk, 64 connections)")
        wrk(logging, 64, 2)
        rate = max(1, int(wrk(logging, 64, D)["rps"] / 2))
        log(f"fixed rate: {rate:,} req/s (half of the maximum)")

        rows = []

        def phase(name: str, t: Target = logging, sink: str = "request_log") -> None:
            procs.check_alive()
            admin = P[t.key + "_admin"]
            done, lost = (f"{sink}_written", f"{sink}_dropped") if sink == "request_log" else \
                (f"{sink}_exported", f"{sink}_dropped")
            before, cpu0, sink0 = counters(admin), thread_cpu(t.pids[0]), sum(thread_cpu(otlp_sink.pid).values())
            r = oha(t, rate, D, 64)
            after, cpu1, sink1 = counters(admin), thread_cpu(t.pids[0]), sum(thread_cpu(otlp_sink.pid).values())
            ref0 = thread_cpu(ref.pids[0])
            base = oha(ref, rate, D, 64)
            ref1 = thread_cpu(ref.pids[0])
            r["cpu"] = cpu_per_request(cpu0, cpu1, r["ok"] + r["bad"])
            r["cpu"]["sink"] = (sink1 - sink0) * 1e6 / max(r["ok"] + r["bad"], 1)
            base["cpu"] = cpu_per_request(ref0, ref1, base["ok"] + base["bad"])
            r["written"] = after.get(done, 0) - before.get(done, 0)
            r["dropped"] = after.get(lost, 0) - before.get(lost, 0)
            rows.append((name, r, base))
            log(f"  {name}: p50 {r['p50']:.0f} µs, p99 {r['p99']:.0f} µs, p99.9 {r['p99.9']:.0f} µs, errors {r['bad']}, "
                f"sink written {r['written']:.0f}, dropped {r['dropped']:.0f} (reference p99 {base['p99']:.0f} µs); "
                f"CPU µs/request {cpu_cell(r['cpu'])} (reference {base['cpu']['requests']:.1f}); "
                f"the OTLP sink's CPU µs/request {r['cpu']['sink']:.1f}")

        log("phase 1: Redis up")
        phase("Redis up")
        log("phase 2: Redis stalled (SIGSTOP)")
        os.kill(redis.pid, signal.SIGSTOP)
        phase("Redis stalled (SIGSTOP)")
        log("phase 3: Redis killed")
        os.kill(redis.pid, signal.SIGKILL)
        redis.wait()
        # Expected to be gone: not a failure for check_alive.
        procs.items = [i for i in procs.items if i[1] is not redis]
        phase("Redis killed")
        log("phase 4: Redis restarted")
        start_redis(procs, tmp)
        # Let the writer notice Redis is back (it retries within 2 s) before measuring.
        deadline = time.time() + 10
        while time.time() < deadline:
            c0 = counters(P["log_admin"]).get("request_log_written", 0)
            subprocess.run(["curl", "-s", "-o", "/dev/null", "-H", "Host: bench.default",
                            f"http://{LO}:{P['log_out']}/1k"], check=False)
            time.sleep(0.3)
            if counters(P["log_admin"]).get("request_log_written", 0) > c0:
                break
        phase("Redis back")
        log("phase 5: traces to a working collector")
        phase("traces, collector up", tracing["up"], "trace_spans")
        log("phase 6: traces to a collector that is down")
        phase("traces, collector down", tracing["down"], "trace_spans")
        log("phase 7: traces to a collector that hangs")
        phase("traces, collector hanging", tracing["hang"], "trace_spans")

        up = rows[0][1]
        L = ["# Telemetry sinks failing: request log (Redis) and traces (OTLP)", "",
             f"Reproduce: `bash benches/dataplane/run.sh outage` ({time.strftime('%Y-%m-%d')}, "
             f"{os.cpu_count()} cores, {D:.0f} s per phase at {rate:,} req/s, 64 connections, oha latency-corrected; "
             f"TOKIO_WORKER_THREADS={a.workers or 'unset'}).", "",
             "Phases 1-4: the proxy writing one record per request to Redis; phases 5-7: proxies exporting one span "
             "per request over OTLP to a working collector, one that is down, one that hangs. The reference proxy has no telemetry. Each "
             "phase measures the telemetry proxy and the reference at the same rate, one after the other.", "",
             "CPU µs per request: the proxy's CPU time (from /proc, per thread) over the requests of the phase, split "
             "into the threads serving requests / the span batching thread / the OTLP export runtime.", "",
             "| phase | p50 µs | p99 µs | p99.9 µs | p99 vs Redis up | errors | records/spans sent | dropped "
             "| CPU µs/request | reference p50 / p99 µs | reference CPU µs/request |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
        for name, r, base in rows:
            L.append(f"| {name} | {r['p50']:.0f} | {r['p99']:.0f} | {r['p99.9']:.0f} | {r['p99'] / up['p99']:.2f}x | "
                     f"{r['bad']} | {r['written']:.0f} | {r['dropped']:.0f} | {cpu_cell(r['cpu'])} | "
                     f"{base['p50']:.0f} / {base['p99']:.0f} | {base['cpu']['requests']:.1f} |")
        md = "\n".join(L) + "\n"
        out.write_text(md)
        print(md)
        log(f"wrote {out}")
        return 0
    except BenchError as e:
        log(f"ERROR: {e}; logs kept in {tmp}")
        return 1
    finally:
        procs.stop_all()


if __name__ == "__main__":
    sys.exit(main())
