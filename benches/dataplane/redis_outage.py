#!/usr/bin/env python3
"""Request log vs a failing Redis: does a request ever wait for the log? Run it through
run.sh:  bash benches/dataplane/run.sh redis-outage

Starts, on 127.0.0.1: the backend nginx, the release control plane, and two outbound
proxies in front of the same backend: one without a request log (the reference) and one
writing every request to a real redis-server. Then, at a fixed rate (oha,
latency-corrected, 64 connections, half of the logging proxy's measured maximum), it
measures the logging proxy's latency in four phases, each next to the reference proxy at
the same rate:

  1. Redis up;
  2. Redis stalled (SIGSTOP: connections open, nothing answers: the slow case);
  3. Redis killed (connections refused);
  4. Redis back (restarted on the same port).

For each phase it reports p50/p99/p99.9, errors, and the request-log counters (records
written and dropped). Results: benches/results/redis-outage.md.
"""

from __future__ import annotations

import argparse
import atexit
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import (LO, BenchError, Procs, Target, log, mesh_yaml, oha, oha_bin, port_free, render,  # noqa: E402
                   wait_ready, wait_tcp, wrk)

P = {"backend": 18080, "backend_h2": 18082, "cp_grpc": 18610, "cp_admin": 18614, "redis": 18699,
     "ref_out": 18380, "ref_in": 18381, "ref_admin": 18390,
     "log_out": 18480, "log_in": 18481, "log_admin": 18490}


def counters(admin: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://{LO}:{admin}/metrics", timeout=5) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        for k in ("request_log_written", "request_log_dropped"):
            if line.startswith(f"neutrino_proxy_{k}_total "):
                out[k] = float(line.split()[-1])
    return out


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
    out = root / "benches" / "results" / "redis-outage.md"
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
        env = {"TOKIO_WORKER_THREADS": a.workers} if a.workers else {}
        pids = {}
        for name, extra in (("ref", []), ("log", ["--redis-url", f"redis://{LO}:{P['redis']}"])):
            pids[name] = procs.start(f"proxy-{name}", [
                str(rel / "neutrino-proxy"), "--control-plane", f"{LO}:{P['cp_grpc']}", "--pod", f"bench-{name}",
                "--admin-addr", f"{LO}:{P[name + '_admin']}", "--outbound-addr", f"{LO}:{P[name + '_out']}",
                "--inbound-addr", f"{LO}:{P[name + '_in']}", "--log", "warn", *extra], tmp, env).pid
            wait_ready(f"proxy {name}", P[name + "_admin"], procs)
        ref = Target("ref", "no request log", P["ref_out"], P["ref_out"], "bench.default", [pids["ref"]])
        logging = Target("log", "request log to Redis", P["log_out"], P["log_out"], "bench.default", [pids["log"]])

        log("measuring the logging proxy's maximum (wrk, 64 connections)")
        wrk(logging, 64, 2)
        rate = max(1, int(wrk(logging, 64, D)["rps"] / 2))
        log(f"fixed rate: {rate:,} req/s (half of the maximum)")

        rows = []

        def phase(name: str) -> None:
            procs.check_alive()
            before = counters(P["log_admin"])
            r = oha(logging, rate, D, 64)
            after = counters(P["log_admin"])
            base = oha(ref, rate, D, 64)
            r["written"] = after.get("request_log_written", 0) - before.get("request_log_written", 0)
            r["dropped"] = after.get("request_log_dropped", 0) - before.get("request_log_dropped", 0)
            rows.append((name, r, base))
            log(f"  {name}: p50 {r['p50']:.0f} µs, p99 {r['p99']:.0f} µs, p99.9 {r['p99.9']:.0f} µs, errors {r['bad']}, "
                f"log written {r['written']:.0f}, dropped {r['dropped']:.0f} (reference p99 {base['p99']:.0f} µs)")

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

        up = rows[0][1]
        L = ["# Request log vs a failing Redis", "",
             f"Reproduce: `bash benches/dataplane/run.sh redis-outage` ({time.strftime('%Y-%m-%d')}, "
             f"{os.cpu_count()} cores, {D:.0f} s per phase at {rate:,} req/s, 64 connections, oha latency-corrected; "
             f"TOKIO_WORKER_THREADS={a.workers or 'unset'}).", "",
             "The logging proxy writes one record per request to Redis; the reference proxy has no log. Each phase "
             "measures both at the same rate, one after the other.", "",
             "| phase | p50 µs | p99 µs | p99.9 µs | p99 vs Redis up | errors | records written | records dropped "
             "| reference p50 / p99 µs |", "|---|---|---|---|---|---|---|---|---|"]
        for name, r, base in rows:
            L.append(f"| {name} | {r['p50']:.0f} | {r['p99']:.0f} | {r['p99.9']:.0f} | {r['p99'] / up['p99']:.2f}x | "
                     f"{r['bad']} | {r['written']:.0f} | {r['dropped']:.0f} | {base['p50']:.0f} / {base['p99']:.0f} |")
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
