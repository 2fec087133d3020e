"""Redis memory per operation: what the engine keeps per op id, per hold+settle pair, and
per stream entry (event) of each type, measured on a private redis-server.

    .venv/bin/python loadtest/memory_sizing.py [--n 20000] [--json out.json]

A measuring script, not a test. It starts its own redis-server (no persistence, in a temp
dir), runs the engine the way the metering proxy does (hold id `req_<32 hex>`, the proxy's
metadata on reserve and settle, a tokens-per-minute limit so the hold keeps its token
count), and reads Redis' own figures:

- `used` : INFO memory `used_memory` (less the clients' buffers, which depend on the
           number of connections, not on the data) after minus before, divided by the
           number of operations: everything the operations left (keys, their TTL entries,
           the keyspace's hash tables), i.e. what a deployment pays per operation;
- `key`  : `MEMORY USAGE <key> SAMPLES 0` of one key of that kind (median of 50);
- stream : `MEMORY USAGE <stream> SAMPLES 0` after minus before, per entry appended.

"retained" figures are measured after the partition stream is deleted: what stays in Redis
for CREDIT_RETENTION_SECONDS once the worker has persisted and trimmed the events.
About a minute for the default --n 10000 on an idle machine.
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
import uuid
from datetime import UTC, datetime
from pathlib import Path

import redis.asyncio as aioredis

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gateway.core.engine import CreditEngine, RateCharge
from gateway.core.keys import KeySpace

USERS = 50
HOLD_UNITS = 20_000  # 0.02 credit: a typical chat call's worst case
COST_UNITS = 7_341


class Clock:
    def __init__(self) -> None:
        self.t = time.time()

    def __call__(self) -> float:
        return self.t


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_redis(workdir: str) -> tuple[subprocess.Popen, int]:
    exe = shutil.which("redis-server")
    if exe is None:
        raise SystemExit("redis-server not found on PATH")
    port = free_port()
    proc = subprocess.Popen(
        [
            exe,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            workdir,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc, port
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise SystemExit("redis-server did not start")


class Probe:
    def __init__(self, r: aioredis.Redis, engine: CreditEngine) -> None:
        self.r = r
        self.engine = engine
        self.stream = engine.keys.partition(0).events
        self.out: dict[str, float] = {}

    async def used(self) -> int:
        used = int((await self.r.info("memory"))["used_memory"])
        stats = await self.r.execute_command("MEMORY", "STATS")
        stats = dict(zip(stats[::2], stats[1::2], strict=False)) if isinstance(stats, list) else stats
        return used - int(stats.get(b"clients.normal", stats.get("clients.normal", 0)))

    async def smem(self) -> int:
        if not await self.r.exists(self.stream):
            return 0
        return int(await self.r.memory_usage(self.stream, samples=0))

    async def keymem(self, keys: list[str]) -> float:
        sizes = [await self.r.memory_usage(k, samples=0) for k in keys[:50]]
        sizes = [s for s in sizes if s is not None]
        return statistics.median(sizes) if sizes else 0.0

    async def phase(self, name: str, ops, count_events: int):
        """Runs `ops` (a list of coroutine factories), returns (used delta, stream delta, events)."""
        u0, s0, x0 = await self.used(), await self.smem(), await self.r.xlen(self.stream)
        for i in range(0, len(ops), 200):
            await asyncio.gather(*[f() for f in ops[i : i + 200]])
        u1, s1, x1 = await self.used(), await self.smem(), await self.r.xlen(self.stream)
        ev = x1 - x0
        assert ev == count_events, (name, ev, count_events)
        self.out[f"stream bytes per {name} event"] = round((s1 - s0) / ev, 1) if ev else 0
        return u1 - u0


def users() -> list[str]:
    return [f"user-{i:06d}" for i in range(USERS)]


def req_id() -> str:
    return f"req_{uuid.uuid4().hex}"


def meta(rid: str) -> dict:
    return {"request_id": rid, "model": "gpt-4o-mini", "path": "/v1/chat/completions", "upstream": "openai"}


def settle_meta(rid: str) -> dict:
    return {**meta(rid), "usage": {"input": 812, "output": 164, "cached_input": 0}, "partial": False}


async def measure(url: str, n: int) -> dict[str, float]:
    r = aioredis.Redis.from_url(url, max_connections=256)
    await r.flushall()
    clock = Clock()
    engine = CreditEngine(r, keys=KeySpace(partitions=1), clock=clock, max_backlog=0)  # no worker here
    await engine.mark_ready(0)
    p = Probe(r, engine)
    us = users()
    # retained per op id alone, first (a fresh server): admin debits on one user, one at a
    # time (the clients' buffers stay put), the stream deleted
    await engine.grant(us[0], "1000000", op_id="fund")
    await r.delete(p.stream)
    ops = [str(uuid.uuid4()) for _ in range(n)]
    base = await p.used()
    for o in ops:
        await engine.debit(us[0], "0.000001", op_id=o)
    await r.delete(p.stream)
    p.out["retained bytes per admin op id (used)"] = round((await p.used() - base) / n, 1)
    for u in us[1:]:
        await engine.grant(u, "1000000", op_id="fund")
    rate = RateCharge(tokens=1500, requests_per_minute=1_000_000, tokens_per_minute=1_000_000_000)

    # reserve + settle, the proxy's pair
    holds = [(us[i % USERS], req_id()) for i in range(n)]
    await r.delete(p.stream)
    base, base_keys = await p.used(), await r.dbsize()
    await p.phase(
        "hold_open",
        [
            (
                lambda u=u, h=h: engine.reserve_units(
                    u, HOLD_UNITS, hold_id=h, ttl_seconds=120, metadata=meta(h), rate=rate
                )
            )
            for u, h in holds
        ],
        n,
    )
    p.out["open hold hash (key)"] = await p.keymem([engine.keys.hold_key(u, h) for u, h in holds])
    p.out["reserve op key (key)"] = await p.keymem([engine.keys.op_key(u, h) for u, h in holds])
    await p.phase(
        "hold_settled",
        [
            (lambda u=u, h=h: engine.settle_units(u, h, COST_UNITS, metadata=settle_meta(h), tokens=976))
            for u, h in holds
        ],
        n,
    )
    p.out["resolved hold hash (key)"] = await p.keymem([engine.keys.hold_key(u, h) for u, h in holds])
    p.out["settle op key (key)"] = await p.keymem([engine.keys.op_key(u, f"!settle:{h}") for u, h in holds])
    await r.delete(p.stream)
    p.out["retained bytes per hold+settle pair (used)"] = round((await p.used() - base) / n, 1)
    p.out["redis keys per hold+settle pair"] = round((await r.dbsize() - base_keys) / n, 2)

    # reserve + release (an upstream error)
    holds = [(us[i % USERS], req_id()) for i in range(n)]
    await p.phase(
        "hold_open",
        [
            (
                lambda u=u, h=h: engine.reserve_units(
                    u, HOLD_UNITS, hold_id=h, ttl_seconds=120, metadata=meta(h), rate=rate
                )
            )
            for u, h in holds
        ],
        n,
    )
    base = await p.used() - await p.smem()
    await p.phase(
        "hold_released",
        [
            (lambda u=u, h=h: engine.release(u, h, metadata={**meta(h), "reason": "upstream_error"}))
            for u, h in holds
        ],
        n,
    )
    await r.delete(p.stream)

    # reserve + expiry by the sweeper
    holds = [(us[i % USERS], req_id()) for i in range(n)]
    await p.phase(
        "hold_open",
        [
            (
                lambda u=u, h=h: engine.reserve_units(
                    u, HOLD_UNITS, hold_id=h, ttl_seconds=120, metadata=meta(h), rate=rate
                )
            )
            for u, h in holds
        ],
        n,
    )
    clock.t += 121
    s0, x0 = await p.smem(), await r.xlen(p.stream)
    await engine.sweep()
    ev = await r.xlen(p.stream) - x0
    assert ev == n, ev
    p.out["stream bytes per hold_expired event"] = round((await p.smem() - s0) / ev, 1)
    await r.delete(p.stream)

    # admin grants and debits (op ids of the admin API: an Idempotency-Key, a UUID)
    ops = [(us[i % USERS], str(uuid.uuid4())) for i in range(n)]
    before = await p.used()
    await p.phase(
        "grant",
        [
            (
                lambda u=u, o=o: engine.grant(
                    u, "5", op_id=o, source="payment", metadata={"description": "top-up"}
                )
            )
            for u, o in ops
        ],
        n,
    )
    p.out["grant op key (key)"] = await p.keymem([engine.keys.op_key(u, o) for u, o in ops])
    ops = [(us[i % USERS], str(uuid.uuid4())) for i in range(n)]
    await p.phase(
        "debit",
        [
            (lambda u=u, o=o: engine.debit(u, "0.5", op_id=o, metadata={"description": "manual charge"}))
            for u, o in ops
        ],
        n,
    )
    p.out["debit op key (key)"] = await p.keymem([engine.keys.op_key(u, o) for u, o in ops])
    await r.delete(p.stream)
    del before

    # grant expiry: a grant per user that expires, swept
    exp = datetime.fromtimestamp(clock.t + 60, tz=UTC)
    for i, u in enumerate(us):
        await engine.grant(u, "1", op_id=f"promo-{i}", source="promo", expires_at=exp, priority=0)
    clock.t += 61
    s0, x0 = await p.smem(), await r.xlen(p.stream)
    await engine.sweep()
    ev = await r.xlen(p.stream) - x0
    p.out["stream bytes per grant_expired event"] = round((await p.smem() - s0) / ev, 1) if ev else 0

    await r.aclose()
    return p.out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=10_000, help="operations per phase")
    ap.add_argument("--json", help="write the figures to this file too")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        proc, port = start_redis(d)
        try:
            out = asyncio.run(measure(f"redis://127.0.0.1:{port}/0", args.n))
        finally:
            proc.terminate()
            proc.wait(10)
    width = max(len(k) for k in out)
    for k, v in out.items():
        print(f"{k:<{width}}  {v}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    main()
