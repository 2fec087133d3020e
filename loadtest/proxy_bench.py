"""Benchmark of the metering proxy: direct to the fake upstream, through a bare passthrough
proxy (same HTTP stack), and through the gateway with full metering, in the same run.

    .venv/bin/python loadtest/proxy_bench.py [--seconds 8] [--json out.json]

A measuring script, not a test. It starts its own redis-server, the fake upstream
(gateway/devtools/mock_upstream.py), the passthrough (loadtest/passthrough.py) and the gateway
(`credit-gateway serve`, one uvicorn process each), then for each target and for
non-streaming and streaming chat completions measures requests/s and p50/p99 latency at 64
concurrent connections, and latency at 2 connections (the gateway's added latency is its
p50 minus the passthrough's... and minus direct's). Targets rounds interleave (A/B/C) since
the machine is shared; the load generator (aiohttp, this process) shares the 2 cores too.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

REPO = Path(__file__).resolve().parents[1]
CLIENT = "bench-client-key-" + "k" * 32
CONFIG = """
[gateway]
chars_per_token = 4
[[upstreams]]
name = "fake"
kind = "openai"
base_url = "{url}"
api_key = "sk-bench"
timeout_seconds = 30
models = ["bench-model"]
forward_headers = ["x-fake-*"]
[pricing.models."bench-model"]
input = "1"
output = "2"
max_output_tokens = 64
"""


def free_ports(n: int) -> list[int]:
    """n distinct free ports (held open together while chosen)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def wait_port(port: int, timeout: float = 20) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"port {port} did not open")


async def load(url: str, headers: dict, body: bytes, conns: int, seconds: float) -> dict:
    lat: list[float] = []
    errors = 0
    stop = time.perf_counter() + seconds

    async def worker(s: aiohttp.ClientSession) -> None:
        nonlocal errors
        while time.perf_counter() < stop:
            t = time.perf_counter()
            try:
                async with s.post(url, data=body, headers=headers) as r:
                    await r.read()
                    if r.status != 200:
                        errors += 1
                        continue
            except aiohttp.ClientError:
                errors += 1
                continue
            lat.append(time.perf_counter() - t)

    t0 = time.perf_counter()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=conns)) as s:
        await asyncio.gather(*(worker(s) for _ in range(conns)))
    wall = time.perf_counter() - t0
    lat.sort()
    q = lambda p: lat[min(len(lat) - 1, int(p * len(lat)))] * 1000 if lat else float("nan")  # noqa: E731
    return {"rps": len(lat) / wall, "p50_ms": q(0.5), "p99_ms": q(0.99), "n": len(lat), "errors": errors}


async def main(cfg: argparse.Namespace) -> dict:
    work = tempfile.mkdtemp(prefix="proxy-bench-")
    procs: list[subprocess.Popen] = []
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    try:
        rport, uport, pport, gport = free_ports(4)
        procs.append(
            subprocess.Popen(  # noqa: ASYNC220 (starts a server and returns at once)
                [
                    shutil.which("redis-server"),
                    "--port",
                    str(rport),
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--dir",
                    work,
                ],
                stdout=subprocess.DEVNULL,
            )
        )
        wait_port(rport)
        procs.append(
            subprocess.Popen(  # noqa: ASYNC220 (starts a server and returns at once)
                [sys.executable, "-m", "gateway.devtools.mock_upstream", "--port", str(uport), "--no-record"],
                cwd=REPO,
                env=env,
            )
        )
        upstream = f"http://127.0.0.1:{uport}"
        procs.append(
            subprocess.Popen(  # noqa: ASYNC220 (starts a server and returns at once)
                [sys.executable, str(REPO / "loadtest" / "passthrough.py"), upstream, str(pport)], env=env
            )
        )
        (Path(work) / "gw.toml").write_text(CONFIG.format(url=upstream))
        genv = {
            **env,
            "CREDIT_REDIS_URL": f"redis://127.0.0.1:{rport}/0",
            "CREDIT_CLIENT_KEYS": CLIENT,
            "CREDIT_ADMIN_KEYS": "admin-" + "a" * 40,
            "CREDIT_GATEWAY_CONFIG": f"{work}/gw.toml",
            "CREDIT_SQLITE_PATH": f"{work}/gw.db",
            "CREDIT_AUDIT_PATH": "",
            # No worker drains the streams here, so no backlog limit either (a real
            # deployment's worker keeps the backlog near zero).
            "CREDIT_MAX_BACKLOG": "0",
        }
        procs.append(
            subprocess.Popen(  # noqa: ASYNC220 (starts a server and returns at once)
                [
                    sys.executable,
                    "-m",
                    "gateway.cli",
                    "serve",
                    "--port",
                    str(gport),
                    "--log-level",
                    "warning",
                ],
                cwd=work,
                env=genv,
            )
        )
        for p in (rport, uport, pport, gport):
            wait_port(p)
        # Fund the benchmark users generously through the admin API.
        users = [f"bench-{i}" for i in range(64)]
        async with aiohttp.ClientSession() as s:
            for u in users:
                async with s.post(
                    f"http://127.0.0.1:{gport}/admin/accounts/{u}/grants",
                    json={"amount": "1000000"},
                    headers={"Authorization": "Bearer " + "admin-" + "a" * 40},
                ) as r:
                    assert r.status == 201, await r.text()
        targets = {
            "direct": f"http://127.0.0.1:{uport}",
            "passthrough": f"http://127.0.0.1:{pport}",
            "gateway": f"http://127.0.0.1:{gport}",
        }
        results: dict = {}
        for mode in ("json", "stream"):
            body = json.dumps(
                {
                    "model": "bench-model",
                    "max_tokens": 16,
                    "stream": mode == "stream",
                    "messages": [{"role": "user", "content": "hello there"}],
                }
            ).encode()
            # A discarded warm-up per target: connections to Redis and the upstream opened,
            # code paths warm, before anything is measured.
            for t in targets:
                headers = {"Content-Type": "application/json", "X-Fake-Output-Tokens": "16"}
                if t == "gateway":
                    headers.update({"Authorization": f"Bearer {CLIENT}", "X-User-Id": users[-1]})
                await load(targets[t] + "/v1/chat/completions", headers, body, 64, 1.0)
            for conns in (64, 2):
                rounds: dict[str, list[dict]] = {t: [] for t in targets}
                for r in range(cfg.rounds):
                    order = list(targets) if r % 2 == 0 else list(reversed(targets))
                    for t in order:
                        headers = {"Content-Type": "application/json", "X-Fake-Output-Tokens": "16"}
                        if t == "gateway":
                            headers.update(
                                {"Authorization": f"Bearer {CLIENT}", "X-User-Id": users[r % len(users)]}
                            )
                        rounds[t].append(
                            await load(targets[t] + "/v1/chat/completions", headers, body, conns, cfg.seconds)
                        )
                paired = [
                    g["rps"] / p["rps"]
                    for g, p in zip(rounds["gateway"], rounds["passthrough"], strict=False)
                ]
                results[f"{mode}/{conns}/paired_ratio"] = statistics.median(paired)
                for t, rs in rounds.items():
                    med = {k: statistics.median(x[k] for x in rs) for k in ("rps", "p50_ms", "p99_ms")}
                    med["errors"] = sum(x["errors"] for x in rs)
                    results[f"{mode}/{conns}/{t}"] = med
                    print(
                        f"{mode:6s} c={conns:<3d} {t:12s} rps={med['rps']:8.0f}  "
                        f"p50={med['p50_ms']:7.2f} ms  "
                        f"p99={med['p99_ms']:7.2f} ms  errors={med['errors']}",
                        flush=True,
                    )
        summary = {}
        for mode in ("json", "stream"):
            g, p, _d = (results[f"{mode}/64/{t}"] for t in ("gateway", "passthrough", "direct"))
            summary[f"{mode}: gateway/passthrough rps at 64 (target >= 0.5)"] = g["rps"] / p["rps"]
            summary[f"{mode}: same, median of per-round ratios"] = results[f"{mode}/64/paired_ratio"]
            g2, p2, d2 = (results[f"{mode}/2/{t}"] for t in ("gateway", "passthrough", "direct"))
            summary[f"{mode}: added p50 at 2 conns vs passthrough, ms (target <= 2.5)"] = (
                g2["p50_ms"] - p2["p50_ms"]
            )
            summary[f"{mode}: added p50 at 2 conns vs direct, ms"] = g2["p50_ms"] - d2["p50_ms"]
        print()
        for k, v in summary.items():
            print(f"{k:62s} {v:8.2f}")
        return {"results": results, "summary": summary}
    finally:
        for p in reversed(procs):  # the gateway first, Redis last (it still needs Redis to stop)
            p.terminate()
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=5.0, help="per round and target")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args()
    out = asyncio.run(main(args))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
