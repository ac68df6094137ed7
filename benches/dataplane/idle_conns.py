#!/usr/bin/env python3
"""Opens N keep-alive HTTP/1.1 connections to 127.0.0.1:PORT, sends one GET /1k on
each (so each is past protocol detection and holds its per-connection state), then
keeps them all open and idle. Prints "READY <opened>" when done; exits on SIGTERM or
after --hold seconds. Used by workloads.py (bench.py) for "RSS with 10,000 idle connections"."""
import argparse
import asyncio
import resource
import signal
import sys


async def one(port: int, host: str, sem: asyncio.Semaphore, conns: list) -> bool:
    async with sem:
        try:
            r, w = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 10)
            w.write(f"GET /1k HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
            await w.drain()
            head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 10)
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":", 1)[1])
            await asyncio.wait_for(r.readexactly(length), 10)
            if not head.startswith(b"HTTP/1.1 200"):
                w.close()
                return False
            conns.append((r, w))
            return True
        except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, ValueError) as e:
            print(f"idle_conns: a connection failed: {e!r}", file=sys.stderr)
            return False


async def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--count", type=int, default=10000)
    ap.add_argument("--parallel", type=int, default=200)
    ap.add_argument("--hold", type=float, default=300)
    a = ap.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < a.count + 100:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, a.count + 1000), hard))
    conns: list = []
    sem = asyncio.Semaphore(a.parallel)
    results = await asyncio.gather(*(one(a.port, a.host, sem, conns) for _ in range(a.count)))
    failed = results.count(False)
    if failed:
        print(f"idle_conns: {failed} of {a.count} connections failed", file=sys.stderr)
    print(f"READY {len(conns)}", flush=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    try:
        await asyncio.wait_for(stop.wait(), a.hold)
    except asyncio.TimeoutError:
        pass
    for _, w in conns:
        w.close()
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
