"""Slowloris against `credit-gateway serve`: N connections each sending a request head one
header line every 2 s; prints the server's open descriptors every 2 s and, at the end, how
many connections the server closed.

    .venv/bin/python loadtest/slowloris.py [--conns 2000] [--seconds 30] [CREDIT_X=value ...]

A measuring script, not a test (tests/test_server.py is the test). Needs an open-file limit
above the connection count for both sides (`ulimit -n 8192`).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


async def slow(port: int, stop: float) -> str:
    try:
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        while time.time() < stop:
            await asyncio.sleep(2)
            w.write(b"X-a: b\r\n")
            await w.drain()
            if r.at_eof():
                return "closed"
        return "open"
    except OSError:
        return "closed"


async def run(pid: int, port: int, conns: int, seconds: float) -> None:
    def fds() -> int:
        return len(os.listdir(f"/proc/{pid}/fd"))

    print("server descriptors before:", fds())
    stop = time.time() + seconds
    tasks = [asyncio.create_task(slow(port, stop)) for _ in range(conns)]
    t0 = time.time()
    while time.time() < stop:
        await asyncio.sleep(2)
        print(f"t={time.time() - t0:4.0f}s server descriptors={fds()}", flush=True)
    res = await asyncio.gather(*tasks)
    print({k: res.count(k) for k in sorted(set(res))})


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--conns", type=int, default=2000)
    ap.add_argument("--seconds", type=float, default=30)
    ap.add_argument("settings", nargs="*", help="CREDIT_...=value for the server")
    a = ap.parse_args()
    work = tempfile.mkdtemp(prefix="slowloris-")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("CREDIT_")}
    env.update(PYTHONPATH=str(REPO), CREDIT_SQLITE_PATH=f"{work}/s.db", CREDIT_AUDIT_PATH="")
    env.update(kv.split("=", 1) for kv in a.settings)
    server = subprocess.Popen(
        [sys.executable, "-m", "gateway.cli", "serve", "--port", str(port), "--log-level", "warning"],
        env=env,
        cwd=work,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.1)
        asyncio.run(run(server.pid, port, a.conns, a.seconds))
    finally:
        server.terminate()
        server.wait(30)


if __name__ == "__main__":
    main()
