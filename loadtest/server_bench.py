"""What the gateway's HTTP protocol (gateway/server.py: request-head timeout, connection
limit) costs per request, against uvicorn's own httptools protocol.

    .venv/bin/python loadtest/server_bench.py [--seconds 5] [--rounds 5] [--conns 32]

A measuring script, not a test. Two uvicorn processes serve the same trivial ASGI app (a
few bytes of JSON: the protocol's share of the work is as large as it gets), one with
http="httptools", one with the gateway's protocol and its settings; a load generator
(aiohttp, keep-alive connections, this process) drives them in interleaved rounds, and each
server's CPU time per request is read from /proc (less sensitive to the shared machine's
noise than requests/s). It also
times the added code alone, and a timer per request (the design it avoids), on uvloop.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import socket
import statistics
import sys
import time
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

BODY = b'{"ok":true}'


async def tiny_app(scope, receive, send):
    if scope["type"] != "http":
        return
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"application/json"), (b"content-length", b"11")],
        }
    )
    await send({"type": "http.response.body", "body": BODY})


def serve(port: int, gateway_protocol: bool) -> None:
    import uvicorn

    from gateway.core.settings import Settings
    from gateway.server import build_config

    settings = Settings(port=port)
    if gateway_protocol:
        config = build_config(settings, tiny_app, log_level="warning")
    else:
        config = uvicorn.Config(tiny_app, host="127.0.0.1", port=port, http="httptools", log_level="warning")
    uvicorn.Server(config).run()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def load(port: int, seconds: float, conns: int) -> tuple[float, int]:
    done = 0
    stop = time.perf_counter() + seconds
    url = f"http://127.0.0.1:{port}/"
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=conns)) as s:

        async def one():
            nonlocal done
            while time.perf_counter() < stop:
                async with s.get(url) as r:
                    await r.read()
                done += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(conns)))
        return done / (time.perf_counter() - t0), done


def added_code_cost(n: int = 200_000) -> dict[str, float]:
    """Microseconds per request of what the protocol adds (a clock read, two overriding
    methods calling uvicorn's), and of the alternative it avoids (a timer per request)."""
    import uvloop

    class Base:
        def on_message_begin(self):
            pass

        def on_headers_complete(self):
            pass

    class Added(Base):
        head_started = None
        over_limit = False

        def on_message_begin(self):
            super().on_message_begin()
            if self.head_started is None:
                self.head_started = loop.time()

        def on_headers_complete(self):
            self.head_started = None
            if not self.over_limit:
                super().on_headers_complete()

    loop = uvloop.new_event_loop()

    def per_call(fn) -> float:
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) / n * 1e6

    def run(obj):
        def go():
            for _ in range(n):
                obj.on_message_begin()
                obj.on_headers_complete()

        return go

    async def timers():
        for i in range(n):
            loop.call_later(10.0, print).cancel()
            if i % 100 == 0:
                await asyncio.sleep(0)

    out = {
        "added per request": per_call(run(Added())) - per_call(run(Base())),
        "a timer per request instead (call_later + cancel)": per_call(
            lambda: loop.run_until_complete(timers())
        ),
    }
    loop.close()
    return {k: round(v, 3) for k, v in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=5)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--conns", type=int, default=32)
    a = ap.parse_args()
    ctx = multiprocessing.get_context("spawn")
    ports = {"uvicorn httptools": free_port(), "gateway protocol": free_port()}
    procs = [
        ctx.Process(target=serve, args=(ports["uvicorn httptools"], False), daemon=True),
        ctx.Process(target=serve, args=(ports["gateway protocol"], True), daemon=True),
    ]
    for p in procs:
        p.start()
    time.sleep(3)
    try:
        pids = dict(zip(ports, (p.pid for p in procs), strict=False))
        rates: dict[str, list[float]] = {k: [] for k in ports}
        cpu_us: dict[str, list[float]] = {k: [] for k in ports}  # server CPU per request: less noisy
        for port in ports.values():  # warm-up, discarded
            asyncio.run(load(port, 1, a.conns))
        for r in range(a.rounds):
            order = list(ports.items()) if r % 2 == 0 else list(reversed(ports.items()))
            for name, port in order:
                c0 = cpu_seconds(pids[name])
                rps, n = asyncio.run(load(port, a.seconds, a.conns))
                rates[name].append(rps)
                cpu_us[name].append((cpu_seconds(pids[name]) - c0) / n * 1e6)
        out = {
            name: {
                "median_rps": round(statistics.median(v)),
                "rounds": [round(x) for x in v],
                "median_server_cpu_us_per_request": round(statistics.median(cpu_us[name]), 1),
                "cpu_rounds": [round(x, 1) for x in cpu_us[name]],
            }
            for name, v in rates.items()
        }
        out["ratio gateway / uvicorn (per-round medians)"] = round(
            statistics.median(
                g / u for g, u in zip(rates["gateway protocol"], rates["uvicorn httptools"], strict=False)
            ),
            3,
        )
        out["added code alone, us per request (uvloop)"] = added_code_cost()
        print(json.dumps(out, indent=2))
    finally:
        for p in procs:
            p.terminate()
            p.join(5)


if __name__ == "__main__":
    main()
