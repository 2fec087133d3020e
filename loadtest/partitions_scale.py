"""What grows with the number of partitions on one Redis: the worker's upkeep pass (sweep,
claim, trim, the metrics' look at every stream) and a drain of events spread over every
partition, at 64, 1,024 and 4,096 partitions. A simulation of 100x the partitions a
deployment here runs, for docs/scaling.md.

    .venv/bin/python loadtest/partitions_scale.py [--partitions 64,1024,4096] [--events 20000]

Each size gets its own redis-server (no persistence) and a SQLite store in a temp dir. The
upkeep pass is timed 5 times (median), with one event on every partition's stream (so each
has a stream and a consumer group, as under traffic); the drain writes `--events` grants
spread over every partition, then times one worker draining them all (burst).
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import redis.asyncio as aioredis  # noqa: E402

from gateway.core.engine import CreditEngine  # noqa: E402
from gateway.core.keys import KeySpace  # noqa: E402
from gateway.core.store.sqlite import SQLiteStore  # noqa: E402
from gateway.worker.metrics import WorkerMetrics  # noqa: E402
from gateway.worker.runner import Worker  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_redis(work: Path, port: int) -> subprocess.Popen:
    redis = shutil.which("redis-server") or "redis-server"
    argv = [redis, "--port", str(port), "--save", "", "--appendonly", "no", "--dir", str(work)]
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL)


async def one_size(partitions: int, events: int) -> dict[str, float]:
    work = Path(tempfile.mkdtemp(prefix="partitions-"))
    port = free_port()
    server = start_redis(work, port)
    try:
        client = aioredis.Redis.from_url(f"redis://127.0.0.1:{port}/0")
        for _ in range(100):
            try:
                await client.ping()
                break
            except Exception:
                await asyncio.sleep(0.05)
        engine = CreditEngine(client, keys=KeySpace(partitions=partitions))
        for p in range(partitions):
            await engine.mark_ready(p)
        store = SQLiteStore(str(work / "s.db"))
        await store.open()
        # one account on every partition, so every stream and group exists
        users: dict[int, str] = {}
        i = 0
        while len(users) < partitions:
            u = f"u{i}"
            users.setdefault(engine.keys.partition_of(u), u)
            i += 1
        for u in users.values():
            await engine.grant(u, "1", op_id=f"seed-{u}")
        worker = Worker(engine, store, metrics=WorkerMetrics())
        await worker.run(burst=True)
        passes = []
        for _ in range(5):
            t = time.perf_counter()
            await worker.upkeep()
            passes.append(time.perf_counter() - t)
        names = list(users.values())
        for n in range(events):
            await engine.grant(names[n % len(names)], "1", op_id=f"e{n}")
        t = time.perf_counter()
        stats = await Worker(engine, store).run(burst=True)
        drain = time.perf_counter() - t
        await store.close()
        await client.aclose()
        return {
            "upkeep_ms": statistics.median(passes) * 1000,
            "drain_events_per_s": stats.events / drain,
        }
    finally:
        server.kill()
        server.wait(10)
        shutil.rmtree(work, ignore_errors=True)


async def main_async(sizes: list[int], events: int) -> None:
    print("| partitions | worker upkeep pass (median of 5) | drain, events/s |")
    print("|---:|---:|---:|")
    for p in sizes:
        r = await one_size(p, events)
        print(f"| {p:,} | {r['upkeep_ms']:.1f} ms | {r['drain_events_per_s']:,.0f} |", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--partitions", default="64,1024,4096")
    ap.add_argument("--events", type=int, default=20_000)
    args = ap.parse_args()
    asyncio.run(main_async([int(x) for x in args.partitions.split(",")], args.events))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
