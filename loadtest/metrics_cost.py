"""What the metrics add to a proxied call's CPU, measured in one process (the end-to-end
benchmark, loadtest/proxy_bench.py, cannot resolve a few microseconds on a shared machine).

    .venv/bin/python loadtest/metrics_cost.py [--calls 50000] [--rounds 7]

It times an ASGI request through the metrics middleware against the same request without
it, plus the proxy's own metric calls for one call (a reserve result, the upstream's first
byte and duration), in both prometheus-client modes (one process; several processes sharing
PROMETHEUS_MULTIPROC_DIR), rounds interleaved, the minimum of each. Compare the added
microseconds with the gateway's CPU per proxied call (proxy_bench's "gateway cpu").
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def measure(calls: int, rounds: int) -> tuple[float, float]:
    sys.path.insert(0, str(REPO))
    from gateway.metrics import Metrics, MetricsMiddleware

    metrics = Metrics()

    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    wrapped = MetricsMiddleware(app, metrics)
    scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions", "headers": []}

    async def receive():
        return {"type": "http.request", "body": b""}

    async def send(message):
        pass

    def proxy_calls():
        metrics.reserves.inc(("ok",))
        metrics.upstream_first_byte_seconds.observe(("openai",), time.perf_counter() - 0.004)
        metrics.upstream_seconds.observe(("openai", "ok"), time.perf_counter() - 0.005)

    async def run(target, with_proxy):
        started = time.perf_counter()
        for _ in range(calls):
            await target(scope, receive, send)
            if with_proxy:
                proxy_calls()
        metrics.flush()
        return (time.perf_counter() - started) / calls * 1e6

    async def main():
        bare, full = [], []
        for _ in range(rounds):
            bare.append(await run(app, False))
            full.append(await run(wrapped, True))
        return min(bare), min(full)

    return asyncio.run(main())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=50_000)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        bare, full = measure(args.calls, args.rounds)
        print(f"{bare:.2f} {full:.2f}")
        return 0
    for mode in ("one process", "multiprocess"):
        env = dict(os.environ)
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        with tempfile.TemporaryDirectory() as d:
            if mode == "multiprocess":
                env["PROMETHEUS_MULTIPROC_DIR"] = d  # chosen at import: a process of its own
            child = [
                sys.executable,
                __file__,
                "--child",
                "--calls",
                str(args.calls),
                "--rounds",
                str(args.rounds),
            ]
            out = subprocess.run(child, env=env, capture_output=True, text=True, check=True).stdout.split()
        bare, full = float(out[0]), float(out[1])
        print(
            f"{mode:12s}: a request without metrics {bare:6.2f} us, with {full:6.2f}: +{full - bare:.2f} us"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
