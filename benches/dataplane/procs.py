"""Processes and /proc for the data-path benchmark (benches/dataplane): start, watch and stop
every process the harness runs, wait for ports and /ready, and read CPU time, RSS and
threads from /proc.

Every process is started in its own session and stopped (SIGTERM, then SIGKILL after
5 s) by Procs.stop_all(). Nothing here knows about targets, workloads or reports.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
LO = "127.0.0.1"

CLK_TCK = int(subprocess.run(["getconf", "CLK_TCK"], capture_output=True, text=True, check=True).stdout)


def log(msg: str) -> None:
    print(f"dataplane: {msg}", file=sys.stderr, flush=True)


class BenchError(Exception):
    pass


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


def port_free(port: int, addr: str = LO) -> bool:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind((addr, port))
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
