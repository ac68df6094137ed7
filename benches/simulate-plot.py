#!/usr/bin/env python3
"""Plots of the selection simulator's results (benches/src/simulate).

Reads simulate.csv and simulate-divert.csv from the results directory (argument 1,
default benches/results) and writes simulate-*.png there. Uses matplotlib only; draws
nothing it cannot read, and never changes the CSV files.
"""
import csv
import sys
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

OUT = Path(sys.argv[1] if len(sys.argv) > 1 else "benches/results")
ORDER = ["round-robin", "random", "least-request", "peak-ewma", "weighted-rr", "oracle", "neutrino", "neutrino-exact"]
STYLE = {
    "round-robin": ("#9e9e9e", "-", "o"),
    "random": ("#bdbdbd", ":", "o"),
    "least-request": ("#1f77b4", "-", "s"),
    "peak-ewma": ("#2ca02c", "-", "^"),
    "weighted-rr": ("#8c564b", "--", "D"),
    "oracle": ("#000000", "--", "x"),
    "neutrino": ("#d62728", "-", "*"),
    "neutrino-exact": ("#ff9896", "--", "*"),
}


def num(v):
    try:
        return float(v)
    except ValueError:
        return float("nan")


def load_runs():
    runs = defaultdict(list)  # (scenario, policy, load) -> rows
    with open(OUT / "simulate.csv") as f:
        for row in csv.DictReader(f):
            runs[(row["scenario"], row["policy"], float(row["load"]))].append(row)
    return runs


def mean(rows, key):
    vals = [num(r[key]) for r in rows]
    vals = [v for v in vals if v == v]
    return sum(vals) / len(vals) if vals else float("nan")


def sweep(ax, runs, scenario, key, scale=1.0):
    policies = sorted({p for (s, p, _) in runs if s == scenario}, key=ORDER.index)
    for p in policies:
        loads = sorted(l for (s, q, l) in runs if s == scenario and q == p)
        ys = [mean(runs[(scenario, p, l)], key) * scale for l in loads]
        color, line, marker = STYLE.get(p, ("#777777", "-", "."))
        ax.plot(loads, ys, line, color=color, marker=marker, label=p, linewidth=2 if p == "neutrino" else 1.2)
    ax.set_xlabel("offered load (share of fleet capacity)")
    ax.grid(True, alpha=0.3)


def figure(name, title, panels):
    fig, axes = plt.subplots(1, len(panels), figsize=(6.2 * len(panels), 4.4))
    axes = axes if len(panels) > 1 else [axes]
    for ax, draw in zip(axes, panels):
        draw(ax)
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    path = OUT / name
    fig.savefig(path, dpi=90)
    plt.close(fig)
    print(f"simulate-plot: wrote {path}")


def main():
    runs = load_runs()

    def p99(scenario, log=True):
        def draw(ax):
            sweep(ax, runs, scenario, "p99_ms")
            ax.set_ylabel("p99 latency (ms)")
            if log:
                ax.set_yscale("log")
            ax.set_title(f"{scenario}: p99 latency")
        return draw

    def errors(scenario):
        def draw(ax):
            sweep(ax, runs, scenario, "errors", 100.0)
            ax.set_ylabel("errors (%)")
            ax.set_title(f"{scenario}: error rate")
        return draw

    def goodput(scenario):
        def draw(ax):
            sweep(ax, runs, scenario, "goodput")
            ax.plot([0.5, 1.2], [0.5, 1.2], color="#cccccc", linewidth=0.8)
            ax.set_ylabel("goodput (share of fleet capacity)")
            ax.set_title(f"{scenario}: goodput")
        return draw

    def util(scenario):
        def draw(ax):
            sweep(ax, runs, scenario, "util_max_avg")
            ax.axhline(1.05, color="#d62728", linewidth=0.8, linestyle=":")
            ax.set_ylabel("max / avg node utilization")
            ax.set_title(f"{scenario}: utilization spread (goal 1.05)")
        return draw

    if any(s == "hetero" for (s, _, _) in runs):
        figure("simulate-hetero.png", "Heterogeneous fleet (40x1, 40x2, 20x4 CPUs)",
               [p99("hetero"), errors("hetero"), util("hetero")])
    if any(s == "slow" for (s, _, _) in runs):
        figure("simulate-slow.png", "10 % of nodes 5x slower", [p99("slow"), errors("slow"), goodput("slow")])
    if any(s == "homog" for (s, _, _) in runs):
        figure("simulate-homog.png", "Homogeneous fleet (100x2 CPUs)", [p99("homog"), goodput("homog")])

    divert = OUT / "simulate-divert.csv"
    if divert.exists():
        series = defaultdict(list)
        with open(divert) as f:
            for row in csv.DictReader(f):
                series[row["policy"]].append((float(row["t_s"]), float(row["share_over_capacity_share"])))
        if series:
            fig, ax = plt.subplots(figsize=(8, 4.4))
            for p in sorted(series, key=ORDER.index):
                color, line, marker = STYLE.get(p, ("#777777", "-", "."))
                xs, ys = zip(*series[p])
                ax.plot(xs, ys, line, color=color, label=p, linewidth=2 if p == "neutrino" else 1.2)
            ax.axhline(0.5, color="#555555", linewidth=0.8, linestyle=":")
            ax.set_xlabel("seconds since 10 % of nodes became 5x slower")
            ax.set_ylabel("slowed nodes' share of new work / capacity share")
            ax.set_title("Diverting from nodes slowed mid-run (load 0.8, seed 1; divert = below 0.5)")
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=8, ncol=2)
            fig.tight_layout()
            fig.savefig(OUT / "simulate-divert.png", dpi=90)
            plt.close(fig)
            print(f"simulate-plot: wrote {OUT / 'simulate-divert.png'}")


if __name__ == "__main__":
    main()
