"""The data-path benchmark's report (benches/dataplane): the markdown of
benches/results/dataplane.md (maximum req/s and CPU per workload, gRPC unary included;
mTLS against plaintext; latency; memory; profile) and the latency plot.

It only formats what the runs measured; it starts nothing and measures nothing.
"""

from __future__ import annotations

from pathlib import Path

from procs import log
from targets import GRPC_REPLY_BYTES, GRPC_REQUEST_BYTES, Target


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
         f"included. nginx `worker_processes 1`, HAProxy `nbthread 1`, backend nginx `worker_processes 1`, "
         f"gRPC backend one thread (tonic, current-thread runtime); "
         f"Neutrino: {meta['neutrino_threads']}. Windows: {meta['warmup']} s warm-up, {meta['duration']} s measured, "
         f"{meta.get('rounds', 1)} round(s) per throughput figure.",
         ""]
    wl = [("h1_c1", "HTTP/1.1 keep-alive, 1 KiB, 1 connection (wrk)"),
          ("h1_c64", "HTTP/1.1 keep-alive, 1 KiB, 64 connections (wrk)"),
          ("h2c", "h2c, 1 KiB, 1 connection x 100 streams (h2load)"),
          ("grpc", f"gRPC unary, {GRPC_REQUEST_BYTES} B request, {GRPC_REPLY_BYTES // 1024} KiB reply, "
                   "1 connection x 100 streams (h2load)"),
          ("close", "new connection per request, 1 KiB, 64 connections, `Connection: close` (wrk)"),
          ("h1_1m", "HTTP/1.1 keep-alive, 1 MiB, 8 connections (wrk)")]
    rounds = max((len(r.get("rounds", [])) for t in targets.values() for r in t.res.values()
                  if isinstance(r, dict)), default=1)
    L += ["## Maximum req/s", "",
          f"Each target measured in {rounds} round(s), in reverse order every other round; the round with the median "
          "req/s is shown (its CPU too), and the range over the rounds.", "",
          "| workload | target | req/s | range over rounds | x direct | x nginx | x HAProxy | proxy CPU ms / 1k req | errors |",
          "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for k, title in wl:
        if k not in d.res:
            continue
        for t in targets.values():
            r = t.res.get(k)
            if not r:
                continue
            cpu = fmt(r["cpu_ms_per_1k"], 1) if t.key != "direct" else "-"
            rs = r.get("rounds") or [r["rps"]]
            L.append(f"| {title} | {t.label} | {fmt(r['rps'])} | {fmt(min(rs))}-{fmt(max(rs))} | "
                     f"{ratio(r['rps'], d.res[k]['rps'])} | "
                     f"{ratio(r['rps'], ng.res[k]['rps'])} | {ratio(r['rps'], hp.res[k]['rps'])} | {cpu} | "
                     f"{r.get('errors_all', r['non2xx'] + r['sockerr'])} |")
    L += [""]
    if "grpc" in d.res:
        L += ["gRPC unary: `bench.Echo/Unary` (`benches/src/grpc_backend/bench.proto`); direct is the tonic "
              "`grpc-backend` (one thread); Neutrino's services have `protocol: grpc` (HTTP/2 upstream), and its "
              "mesh paths end in inbound proxies of their own in front of the gRPC backend (plaintext: B -> F, "
              "mTLS: D -> G, CPU: B + F and D + G); nginx `grpc_pass` with upstream keep-alive; HAProxy "
              "`proto h2` on both sides. Every target answered the call with grpc-status 0 before the load; h2load counts HTTP status only.", ""]
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
    if any("lat_light" in t.res for t in targets.values()):
        rate = next(t.res["lat_light"]["rate"] for t in targets.values() if "lat_light" in t.res)
        L += [f"## Latency at a light load ({fmt(rate)} req/s, 4 connections, oha, latency-corrected)", "",
              "Where no process waits for a core: what a hop costs by itself. Added = target minus direct at the "
              "same rate, measured right after it; per hop = added / hops.", "",
              "| target | hops | p50 (µs) | p99 (µs) | p99.9 (µs) | added p50 per hop (µs) | added p99 per hop (µs) | "
              "added p99.9 per hop (µs) | errors |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for t in targets.values():
            r = t.res.get("lat_light")
            if not r:
                continue
            hops = max(1, getattr(t, "hops", 1))
            per = {q: (r[q] - r["direct"][q]) / hops for q in ("p50", "p99", "p99.9")} if t.key != "direct" else None
            L.append(f"| {t.label} | {hops if t.key != 'direct' else 0} | {fmt(r['p50'])} | {fmt(r['p99'])} | "
                     f"{fmt(r['p99.9'])} | " + (" | ".join(fmt(per[q]) for q in ("p50", "p99", "p99.9")) if per else
                                              "- | - | -") + f" | {r['bad']} |")
        L += [""]
    L += ["## Memory (VmRSS, all of the target's processes)", "",
          "RSS at start: once ready, before any request. RSS idle: after the checks (a `GET /1k`, a `GET /1m` "
          "and a gRPC call through each target), before the load.", "",
          "| target | processes | RSS at start (MiB) | RSS idle (MiB) | RSS after the load (MiB) | RSS with idle connections, 2 s after opening (MiB) | RSS with idle connections, 12 s after (MiB) | idle connections open |",
          "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for t in targets.values():
        if t.key == "direct":
            continue
        idle = t.res.get("idle")
        first = (f"| {t.label} | {len(t.pids)} | {t.res.get('rss_start', 0) / 1024:.1f} | {t.res['rss_idle'] / 1024:.1f} | "
                 f"{t.res['rss_after'] / 1024:.1f} | ")
        L.append(first + (f"{idle['rss_kib_2s'] / 1024:.1f} | {idle['rss_kib'] / 1024:.1f} | {idle['opened']:,} |" if idle
                          else "- | - | - |"))
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
