#!/usr/bin/env python3
"""Data-path benchmark orchestrator (issue 4, first slice). Run it through run.sh.

Starts, on 127.0.0.1 only: a backend nginx (1 KiB and 1 MiB static files), a gRPC
backend (benches/src/grpc_backend, tonic, one thread), the real release
neutrino-control-plane with a generated mesh file, seven neutrino-proxy processes
(outbound-only client; plaintext and mTLS mesh-path clients; those paths' inbound proxies
in front of the backend and of the gRPC backend), nginx and HAProxy as reverse proxies.
Then measures every target with wrk, h2load (h2c and gRPC unary) and oha, reads CPU and
RSS from /proc, writes benches/results/dataplane.md and
benches/results/dataplane-latency.png.

Every process it starts is in its own session and is stopped (SIGTERM, then SIGKILL
after 5 s) on every exit path: normal end, error, Ctrl-C, SIGTERM.

This file is the run's sequence only; next to it: procs.py (processes, ports, /proc),
targets.py (ports, mesh file, starting and checking the targets), workloads.py (the
load generators and their parsing) and report.py (markdown and plot).
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
from pathlib import Path

from procs import BenchError, Procs, log, rss_kib, threads
from report import plot, report
from targets import start_all
from workloads import h2load, h2load_grpc, idle_rss, measured, oha, oha_bin, profile, wrk


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", type=Path, required=True)
    ap.add_argument("--duration", type=float, default=float(os.environ.get("DURATION", 5)))
    ap.add_argument("--rounds", type=int, default=int(os.environ.get("ROUNDS", 3)),
                    help="rounds per throughput workload (the median round is reported)")
    ap.add_argument("--warmup", type=float, default=float(os.environ.get("WARMUP", 2)))
    ap.add_argument("--idle-conns", type=int, default=int(os.environ.get("IDLE_CONNS", 10000)),
                    help="idle keep-alive connections for the RSS figure (0: skip)")
    ap.add_argument("--workers", default=os.environ.get("NEUTRINO_WORKERS", "1"),
                    help="TOKIO_WORKER_THREADS for the Neutrino proxies ('' = tokio's default, one per core)")
    ap.add_argument("--light-rate", type=int, default=int(os.environ.get("LIGHT_RATE", 1000)),
                    help="req/s of the light-load latency figure")
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
                 ("grpc", lambda t: (lambda: h2load_grpc(t, max(1, W)), lambda: h2load_grpc(t, D))),
                 ("close", lambda t: (lambda: wrk(t, 64, W, close=True), lambda: wrk(t, 64, D, close=True))),
                 ("h1_1m", lambda t: (lambda: wrk(t, 8, W, path="/1m"), lambda: wrk(t, 8, D, path="/1m")))]
        have_h2load = shutil.which("h2load") is not None
        for key, mk in steps:
            if key in ("h2c", "grpc") and not have_h2load:
                log(f"h2load not found; skipping {key}")
                continue
            # The machine's speed drifts by tens of percent over minutes (a shared VM): each
            # target is measured in several rounds, the order reversed every other round,
            # and the round with the median req/s is reported.
            runs: dict[str, list[dict]] = {k: [] for k in targets}
            for rnd in range(a.rounds):
                order = list(targets.values())
                for t in order if rnd % 2 == 0 else reversed(order):
                    log(f"{key}: {t.label} (round {rnd + 1} of {a.rounds})")
                    warm, fn = mk(t)
                    # gRPC runs through other processes on the mesh paths (inbound proxies F, G).
                    pids = t.grpc.pids if key == "grpc" and t.grpc else t.pids
                    r = measured(pids, fn, warm, procs)
                    runs[t.key].append(r)
                    log(f"  {r['rps']:,.0f} req/s, proxy CPU {r['cpu_ms_per_1k']:.1f} ms per 1k requests"
                        f", errors {r['non2xx'] + r['sockerr']}")
            for t in targets.values():
                rs = sorted(runs[t.key], key=lambda r: r["rps"])
                t.res[key] = {**rs[(len(rs) - 1) // 2], "rounds": [r["rps"] for r in runs[t.key]],
                              "errors_all": sum(r["non2xx"] + r["sockerr"] for r in rs)}

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
            # At half of the maximum, the load generator, the backend and the target share
            # 2 cores and wait for them; at a light rate nothing does, which shows what a
            # hop costs by itself.
            low = a.light_rate
            for t in targets.values():
                log(f"latency at a light {low:,} req/s (4 connections): {t.label}, then direct at the same rate")
                r = oha(t, low, D, 4)
                base = r if t is d else oha(d, low, D, 4)
                t.res["lat_light"] = {**r, "rate": low, "direct": base}
                log(f"  p50 {r['p50']:.0f} µs, p99 {r['p99']:.0f} µs (direct {base['p50']:.0f}/{base['p99']:.0f})")
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
                "rounds": a.rounds,
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
