"""The gateway's scaling curve: throughput and CPU per request against gateway processes,
users and partitions, with the worker draining and the audit file on, as production runs.

    .venv/bin/python loadtest/scaling.py [--seconds 5] [--rounds 2] [--json out.json]

A measuring script, not a test. Each configuration gets its own redis-server (no
persistence), the fake upstream, `credit-gateway serve --workers N`, and one worker
process (`python -m gateway.worker`), then wrk (`apt-get install wrk`) at 64 connections on
non-streaming chat completions, each request for a random user of the configuration's
users (funded beforehand through the engine, in this process). The series:

- processes: 1, 2 and 4 gateway processes (1,000 users, 64 partitions);
- users: 1, 100, 10,000 and 100,000 users (1 process, 64 partitions);
- partitions: 1, 8 and 64 partitions (1 process, 1,000 users).

Per configuration: requests/s and the CPU per request of the gateway (every process of
`serve`), the worker and Redis, medians over --rounds rounds after a discarded warm-up.
On 2 cores everything (wrk, the upstream, Redis, the worker, the gateway) shares them:
more gateway processes than cores show what contention costs, not what more cores give.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from proxy_bench import ADMIN, CLIENT, CONFIG, REPO, cpu_seconds, free_ports, load_wrk, wait_port

from gateway.core.connections import make_engine, make_redis
from gateway.core.settings import Settings

BODY = json.dumps(
    {
        "model": "bench-model",
        "max_tokens": 16,
        "messages": [{"role": "user", "content": "hello there"}],
    }
).encode()
HEADERS = {
    "Content-Type": "application/json",
    "X-Fake-Output-Tokens": "16",
    "Authorization": f"Bearer {CLIENT}",
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def tree_cpu(pid: int) -> float:
    """CPU seconds of a process and every descendant still running (serve --workers N forks
    N children)."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                ppid = int(Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d))
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        with contextlib.suppress(OSError):  # exited meanwhile
            total += cpu_seconds(p)
        todo += children.get(p, [])
    return total


class Stack:
    def __init__(self, processes: int, partitions: int) -> None:
        self.processes, self.partitions = processes, partitions
        self.work = tempfile.mkdtemp(prefix="scaling-")
        self.procs: list[subprocess.Popen] = []
        self.pids: dict[str, int] = {}
        self.redis_url = self.url = ""

    def start(self) -> None:
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        rport, uport, gport = free_ports(3)
        redis = shutil.which("redis-server") or "redis-server"
        args = [redis, "--port", str(rport), "--save", "", "--appendonly", "no", "--dir", self.work]
        self.pids["redis"] = self._spawn(args, stdout=subprocess.DEVNULL).pid
        wait_port(rport)
        upstream = [
            sys.executable,
            "-m",
            "gateway.devtools.mock_upstream",
            "--port",
            str(uport),
            "--no-record",
        ]
        self._spawn(upstream, cwd=REPO, env=env, stderr=subprocess.DEVNULL)
        (Path(self.work) / "gw.toml").write_text(CONFIG.format(url=f"http://127.0.0.1:{uport}"))
        self.redis_url = f"redis://127.0.0.1:{rport}/0"
        genv = {
            **env,
            "CREDIT_REDIS_URL": self.redis_url,
            "CREDIT_PARTITIONS": str(self.partitions),
            "CREDIT_CLIENT_KEYS": CLIENT,
            "CREDIT_ADMIN_KEYS": ADMIN,
            "CREDIT_GATEWAY_CONFIG": f"{self.work}/gw.toml",
            "CREDIT_SQLITE_PATH": f"{self.work}/gw.db",
            "CREDIT_AUDIT_PATH": f"{self.work}/audit.jsonl",
        }
        serve = [sys.executable, "-m", "gateway.cli", "serve", "--port", str(gport), "--log-level", "warning"]
        serve += ["--workers", str(self.processes)]
        self.pids["gateway"] = self._spawn(serve, cwd=self.work, env=genv).pid
        self.pids["worker"] = self._spawn(
            [sys.executable, "-m", "gateway.worker"], cwd=self.work, env=genv
        ).pid
        wait_port(uport)
        wait_port(gport, timeout=60)
        self.url = f"http://127.0.0.1:{gport}/v1/chat/completions"

    def _spawn(self, args: list[str], **kw: Any) -> subprocess.Popen:
        p = subprocess.Popen(args, **kw)
        self.procs.append(p)
        return p

    async def fund(self, users: int) -> None:
        """Every user of the run, funded through the engine (100,000 grants over HTTP would
        take minutes)."""
        settings = Settings(redis_url=self.redis_url, partitions=self.partitions)
        redis = make_redis(settings)
        engine = make_engine(settings, redis)
        try:
            for start in range(0, users, 500):
                await asyncio.gather(
                    *(
                        engine.grant(f"s{i}", "1000000", op_id=f"fund-{i}")
                        for i in range(start, min(users, start + 500))
                    )
                )
        finally:
            await redis.aclose()

    def stop(self) -> None:
        for p in reversed(self.procs):
            p.terminate()
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(self.work, ignore_errors=True)


async def measure(processes: int, users: int, partitions: int, cfg: argparse.Namespace) -> dict[str, Any]:
    stack = Stack(processes, partitions)
    try:
        stack.start()
        t0 = time.monotonic()
        await stack.fund(users)
        funded_s = time.monotonic() - t0
        await asyncio.sleep(1)  # the worker drains the grants
        await load_wrk(stack.url, HEADERS, BODY, 64, 1.0, users=("s", users))  # warm-up
        rounds = []
        for _ in range(cfg.rounds):
            before = {k: tree_cpu(p) for k, p in stack.pids.items()}
            res = await load_wrk(stack.url, HEADERS, BODY, 64, cfg.seconds, users=("s", users))
            after = {k: tree_cpu(p) for k, p in stack.pids.items()}
            n = max(1, res["n"])
            res.update({f"{k}_cpu_ms": 1e3 * (after[k] - before[k]) / n for k in stack.pids})
            rounds.append(res)
        keys = ("rps", "p50_ms", "p99_ms", "gateway_cpu_ms", "worker_cpu_ms", "redis_cpu_ms")
        out = {k: statistics.median(r[k] for r in rounds) for k in keys}
        out.update(
            {
                "processes": processes,
                "users": users,
                "partitions": partitions,
                "errors": sum(r["errors"] for r in rounds),
                "fund_s": funded_s,
            }
        )
        log(
            f"processes={processes} users={users:>6} partitions={partitions:>2}: "
            f"{out['rps']:7.0f} req/s  p50 {out['p50_ms']:6.1f} ms  p99 {out['p99_ms']:6.1f} ms  "
            f"cpu/req gateway {out['gateway_cpu_ms']:.3f} worker {out['worker_cpu_ms']:.3f} "
            f"redis {out['redis_cpu_ms']:.3f} ms  errors {out['errors']}"
        )
        return out
    finally:
        stack.stop()


async def main_async(cfg: argparse.Namespace) -> dict[str, list[dict]]:
    series = {
        "processes": [(n, 1000, 64) for n in cfg.processes],
        "users": [(1, u, 64) for u in cfg.users],
        "partitions": [(1, 1000, p) for p in cfg.partitions],
    }
    return {name: [await measure(*c, cfg) for c in configs] for name, configs in series.items()}


def ints(v: str) -> list[int]:
    return [int(x) for x in v.split(",") if x]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--processes", type=ints, default=[1, 2, 4])
    ap.add_argument("--users", type=ints, default=[1, 100, 10_000, 100_000])
    ap.add_argument("--partitions", type=ints, default=[1, 8, 64])
    ap.add_argument("--json", help="also write the figures here")
    cfg = ap.parse_args()
    if not shutil.which("wrk"):
        raise SystemExit("needs wrk (apt-get install wrk)")
    log(f"cpus={os.cpu_count()}, {cfg.rounds} rounds of {cfg.seconds:g} s, wrk at 64 connections")
    out = asyncio.run(main_async(cfg))
    if cfg.json:
        Path(cfg.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
