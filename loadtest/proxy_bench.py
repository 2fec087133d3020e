"""Benchmark of the metering proxy as production runs it: direct to the fake upstream,
through a bare passthrough proxy (same HTTP stack), and through the gateway, in one run.

    .venv/bin/python loadtest/proxy_bench.py [--seconds 5] [--rounds 3] [--no-worker | --both]
                                             [--loadgen wrk|aiohttp] [--json out.json]

A measuring script, not a test. It starts its own redis-server, the fake upstream
(gateway/devtools/mock_upstream.py), the passthrough (loadtest/passthrough.py) and the
gateway (`credit-gateway serve`, one process each). The targets:

- direct: the fake upstream itself (the floor: no proxy at all);
- passthrough: forwards the request and streams the answer back, on the gateway's HTTP
  stack (Starlette + uvicorn + one pooled aiohttp client); it meters nothing: no key
  check, no hold, no settle, no event;
- gateway: the whole metered path (client key, admission, a hold in Redis, forward,
  usage read from the answer, settle in Redis, an event on the partition's stream), with
  its worker draining the streams in a process of its own (`python -m gateway.worker`, as
  a non-embedded `serve` expects: it runs no worker itself) and writing the audit file, as
  production does. `--no-worker` measures the gateway alone (no worker, no audit file, no
  backlog limit); `--both` runs both setups, one after the other, each with its own
  processes.

For non-streaming (JSON) and streaming (SSE) chat completions it measures requests/s and
p50/p99 latency at 64 connections and latency at 2 connections. The load generator is wrk
(when installed; C, so it takes the least of the 2 shared cores) or aiohttp in this
process, the same for every target. Rounds interleave (A/B/C, then C/B/A) since the
machine is shared; figures are medians over rounds, and ratios are medians of per-round
ratios (a round's gateway against the same round's passthrough). It also reports the CPU
the gateway and the worker processes spent per request at 64 connections.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

REPO = Path(__file__).resolve().parents[1]
CLIENT = "bench-client-key-" + "k" * 32
ADMIN = "admin-" + "a" * 40
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
TARGETS = ("direct", "passthrough", "gateway")
MODES = ("json", "stream")
CLK_TCK = os.sysconf("SC_CLK_TCK")


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


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has spent so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


# -- load generators: the same one for every target ------------------------------------------


async def load_aiohttp(url: str, headers: dict, body: bytes, conns: int, seconds: float) -> dict:
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


_UNIT_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}


def _wrk_ms(text: str, pct: str) -> float:
    m = re.search(rf"^\s*{pct}%\s+([\d.]+)(us|ms|s|m)\s*$", text, re.M)
    return float(m.group(1)) * _UNIT_MS[m.group(2)] if m else float("nan")


async def load_wrk(
    url: str, headers: dict, body: bytes, conns: int, seconds: float, users: tuple[str, int] | None = None
) -> dict:
    """wrk's figures. `users` (prefix, n): each request's X-User-Id is prefix + a random
    number below n (a Lua call per request: the load generator works harder)."""
    script = ['wrk.method = "POST"', f"wrk.body = {json.dumps(body.decode())}"]
    script += [f"wrk.headers[{json.dumps(k)}] = {json.dumps(v)}" for k, v in headers.items()]
    if users is not None:
        prefix, n = users
        script += [
            "math.randomseed(os.time())",
            "request = function()",
            f'  wrk.headers["X-User-Id"] = {json.dumps(prefix)} .. math.random(0, {n - 1})',
            "  return wrk.format()",  # a headers argument would replace wrk.headers, not add
            "end",
        ]
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write("\n".join(script) + "\n")
    try:
        proc = await asyncio.create_subprocess_exec(
            "wrk",
            f"-t{min(2, conns)}",
            f"-c{conns}",
            f"-d{max(1, round(seconds))}s",
            "--latency",
            "-s",
            f.name,
            url,
            stdout=asyncio.subprocess.PIPE,
        )
        out = (await proc.communicate())[0].decode()
    finally:
        os.unlink(f.name)
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    total = re.search(r"(\d+) requests in", out)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    errors = (int(non2xx.group(1)) if non2xx else 0) + (sum(map(int, sock.groups())) if sock else 0)
    return {
        "rps": float(rps.group(1)) if rps else 0.0,
        "p50_ms": _wrk_ms(out, "50"),
        "p99_ms": _wrk_ms(out, "99"),
        "n": int(total.group(1)) if total else 0,
        "errors": errors,
    }


# -- one setup: its processes, its rounds ------------------------------------------------------


class Setup:
    """The processes of one run: Redis, the fake upstream, the passthrough, the gateway and
    (with_worker) the worker."""

    def __init__(self, with_worker: bool) -> None:
        self.with_worker = with_worker
        self.work = tempfile.mkdtemp(prefix="proxy-bench-")
        self.procs: list[subprocess.Popen] = []
        # Per target, the processes whose CPU per request is reported (the upstream's is the
        # same for every target and left out).
        self.cpu_pids: dict[str, dict[str, int]] = {t: {} for t in TARGETS}
        self.urls: dict[str, str] = {}
        self.users = [f"bench-{i}" for i in range(64)]

    def _spawn(self, args: list[str], **kw: Any) -> subprocess.Popen:
        p = subprocess.Popen(args, **kw)
        self.procs.append(p)
        return p

    def start(self) -> None:
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        work = self.work
        rport, uport, pport, gport = free_ports(4)
        redis = shutil.which("redis-server") or "redis-server"
        redis_pid = self._spawn(
            [redis, "--port", str(rport), "--save", "", "--appendonly", "no", "--dir", work],
            stdout=subprocess.DEVNULL,
        ).pid
        wait_port(rport)
        self._spawn(
            [sys.executable, "-m", "gateway.devtools.mock_upstream", "--port", str(uport), "--no-record"],
            cwd=REPO,
            env=env,
            # A client closing its connections at a round's end makes it log tracebacks.
            stderr=open(Path(work) / "upstream.log", "wb"),  # noqa: SIM115 (the process keeps it)
        )
        upstream = f"http://127.0.0.1:{uport}"
        self.cpu_pids["passthrough"]["passthrough"] = self._spawn(
            [sys.executable, str(REPO / "loadtest" / "passthrough.py"), upstream, str(pport)], env=env
        ).pid
        (Path(work) / "gw.toml").write_text(CONFIG.format(url=upstream))
        genv = {
            **env,
            "CREDIT_REDIS_URL": f"redis://127.0.0.1:{rport}/0",
            "CREDIT_CLIENT_KEYS": CLIENT,
            "CREDIT_ADMIN_KEYS": ADMIN,
            "CREDIT_GATEWAY_CONFIG": f"{work}/gw.toml",
            "CREDIT_SQLITE_PATH": f"{work}/gw.db",
            "CREDIT_AUDIT_PATH": f"{work}/audit.jsonl",
        }
        if not self.with_worker:
            # No worker drains the streams, so no audit file and no backlog limit either
            # (a real deployment's worker keeps the backlog near zero).
            genv.update({"CREDIT_AUDIT_PATH": "", "CREDIT_MAX_BACKLOG": "0"})
        serve = [sys.executable, "-m", "gateway.cli", "serve", "--port", str(gport), "--log-level", "warning"]
        gateway = self.cpu_pids["gateway"]
        gateway["gateway"] = self._spawn(serve, cwd=work, env=genv).pid
        if self.with_worker:
            worker = [sys.executable, "-m", "gateway.worker"]
            gateway["worker"] = self._spawn(worker, cwd=work, env=genv).pid
        gateway["redis"] = redis_pid
        for p in (uport, pport, gport):
            wait_port(p)
        self.urls = {
            "direct": f"http://127.0.0.1:{uport}",
            "passthrough": f"http://127.0.0.1:{pport}",
            "gateway": f"http://127.0.0.1:{gport}",
        }

    async def fund(self) -> None:
        """The benchmark users, funded generously through the admin API."""
        async with aiohttp.ClientSession() as s:
            for u in self.users:
                async with s.post(
                    f"{self.urls['gateway']}/admin/accounts/{u}/grants",
                    json={"amount": "1000000"},
                    headers={"Authorization": f"Bearer {ADMIN}"},
                ) as r:
                    assert r.status == 201, await r.text()

    def stop(self) -> None:
        for p in reversed(self.procs):  # the gateway and worker first, Redis last
            p.terminate()
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(self.work, ignore_errors=True)


def headers_for(target: str, user: str) -> dict[str, str]:
    headers = {"Content-Type": "application/json", "X-Fake-Output-Tokens": "16"}
    if target == "gateway":
        headers.update({"Authorization": f"Bearer {CLIENT}", "X-User-Id": user})
    return headers


async def run_setup(cfg: argparse.Namespace, with_worker: bool) -> dict:
    load = load_wrk if cfg.loadgen == "wrk" else load_aiohttp
    setup = Setup(with_worker)
    name = "worker+audit" if with_worker else "no worker"
    try:
        setup.start()
        await setup.fund()
        results: dict[str, Any] = {}
        for mode in MODES:
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
            for t in TARGETS:
                url = setup.urls[t] + "/v1/chat/completions"
                await load(url, headers_for(t, setup.users[-1]), body, 64, 1.0)
            for conns in (64, 2):
                rounds: dict[str, list[dict]] = {t: [] for t in TARGETS}
                for r in range(cfg.rounds):
                    order = TARGETS if r % 2 == 0 else tuple(reversed(TARGETS))
                    for t in order:
                        url = setup.urls[t] + "/v1/chat/completions"
                        pids = setup.cpu_pids[t]
                        before = {k: cpu_seconds(p) for k, p in pids.items()}
                        res = await load(url, headers_for(t, setup.users[r]), body, conns, cfg.seconds)
                        for k, p in pids.items():
                            res[f"{k}_cpu_ms"] = (cpu_seconds(p) - before[k]) * 1000 / max(1, res["n"])
                        rounds[t].append(res)
                key = f"{mode}/{conns}"
                results[key] = summarize(rounds)
                for t in TARGETS:
                    m = results[key][t]
                    cpu = "".join(f"  {k[:-7]} cpu={m[k]:.3f}" for k in m if k.endswith("_cpu_ms"))
                    cpu = f" ms/req:{cpu}" if cpu else ""
                    print(
                        f"[{name}] {mode:6s} c={conns:<3d} {t:12s} rps={m['rps']:8.0f}  "
                        f"p50={m['p50_ms']:7.2f} ms  p99={m['p99_ms']:7.2f} ms  errors={m['errors']}{cpu}",
                        flush=True,
                    )
        summary = ratios(results)
        print(f"\n[{name}]")
        for k, v in summary.items():
            print(f"  {k:66s} {v:8.2f}")
        print(flush=True)
        return {"results": results, "summary": summary}
    finally:
        setup.stop()


def summarize(rounds: dict[str, list[dict]]) -> dict[str, Any]:
    """Per target: medians over rounds; the gateway/passthrough ratios per round, and
    their medians."""
    out: dict[str, Any] = {}
    for t, rs in rounds.items():
        med = {k: statistics.median(x[k] for x in rs) for k in rs[0] if k not in ("errors", "n")}
        med["errors"] = sum(x["errors"] for x in rs)
        out[t] = med
    pairs = list(zip(rounds["gateway"], rounds["passthrough"], strict=True))
    out["rps_ratio"] = statistics.median(g["rps"] / p["rps"] for g, p in pairs)
    out["p99_ratio"] = statistics.median(g["p99_ms"] / p["p99_ms"] for g, p in pairs)
    out["added_p50_ms"] = statistics.median(g["p50_ms"] - p["p50_ms"] for g, p in pairs)
    # What the metering costs in CPU: the gateway's processes (with its worker and Redis)
    # per request, over the passthrough's.
    out["cpu_ratio"] = statistics.median(
        sum(v for k, v in g.items() if k.endswith("_cpu_ms")) / p["passthrough_cpu_ms"]
        for g, p in pairs
        if p.get("passthrough_cpu_ms")
    )
    return out


def ratios(results: dict[str, Any]) -> dict[str, float]:
    """The issue's three figures per mode, medians of per-round values."""
    summary = {}
    for mode in MODES:
        summary[f"{mode}: gateway/passthrough rps at 64 conns (target >= 0.65)"] = results[f"{mode}/64"][
            "rps_ratio"
        ]
        summary[f"{mode}: gateway/passthrough p99 at 64 conns (target <= 1.5)"] = results[f"{mode}/64"][
            "p99_ratio"
        ]
        summary[f"{mode}: added p50 at 2 conns vs passthrough, ms (target <= 1.0)"] = results[f"{mode}/2"][
            "added_p50_ms"
        ]
        summary[f"{mode}: CPU per request, gateway+worker+redis / passthrough, 64 conns"] = results[
            f"{mode}/64"
        ]["cpu_ratio"]
    return summary


async def main(cfg: argparse.Namespace) -> dict:
    setups = [True, False] if cfg.both else [not cfg.no_worker]
    out = {}
    for with_worker in setups:
        out["worker" if with_worker else "no_worker"] = await run_setup(cfg, with_worker)
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 2)[2],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--seconds", type=float, default=5.0, help="per round and target (default 5)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    which = ap.add_mutually_exclusive_group()
    which.add_argument("--no-worker", action="store_true", help="the gateway alone: no worker, no audit file")
    which.add_argument("--both", action="store_true", help="with the worker and the audit file, then without")
    ap.add_argument(
        "--loadgen",
        choices=("wrk", "aiohttp"),
        default="wrk" if shutil.which("wrk") else "aiohttp",
        help="the load generator (default: wrk when installed)",
    )
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args()
    result = asyncio.run(main(args))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
