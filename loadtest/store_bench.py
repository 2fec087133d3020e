"""Write speed of the durable stores: N batches of real events through `Store.write_events`.

    .venv/bin/python loadtest/store_bench.py [--events 50000] [--batch 1000] [--backends sqlite,mongo]

A measuring script, not a test: nothing here asserts on timings. The engine runs a few
users' lives (a grant, then reserve + settle cycles with metadata) on a private
redis-server; their events are copied under distinct users (each user's events in order)
and written to a fresh store of each backend in batches, three ways:

    new          every event new to the store (the worker's steady state)
    redelivered  the same batches again (a worker restart: every ledger row is there already,
                 so each batch also looks up the stored versions for the reissue check)
    reversed     a fresh store, the batches in reverse order (older versions arrive last)

MongoDB runs on the tests' wire server (mongoeco, tests/support/mongo_venv.sh): its
figures compare one version of the code with another, not with a real MongoDB.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
import uuid
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import redis.asyncio as aioredis
from redis_server import RedisServer  # beside this script

from gateway.core.engine import CreditEngine
from gateway.core.events import Event, decode
from gateway.core.keys import KeySpace
from gateway.core.store import MongoStore, SQLiteStore, Store

PARTITIONS = 16
REPO = Path(__file__).resolve().parent.parent


async def sample_lives(url: str, users: int, cycles: int) -> list[list[dict[str, Any]]]:
    """Each sample user's events (decoded JSON objects), in version order."""
    r = aioredis.Redis.from_url(url)
    try:
        await r.flushall()
        engine = CreditEngine(r, keys=KeySpace(partitions=PARTITIONS))
        for p in range(PARTITIONS):
            await engine.mark_ready(p)

        async def life(i: int, u: str) -> None:
            await engine.grant(
                u, Decimal("250.5"), op_id=f"pay-{i:06d}", source="payment", metadata={"plan": "pro"}
            )
            for k in range(cycles):
                hid = f"req_{i:04d}_{k:04d}"
                await engine.reserve(
                    u, Decimal("0.125"), hold_id=hid, ttl_seconds=120, metadata={"model": "gpt-4o-mini"}
                )
                await engine.settle(u, hid, Decimal("0.083417"), metadata={"usage": 1234})

        names = [f"sample-{i:03d}" for i in range(users)]
        await asyncio.gather(*(life(i, u) for i, u in enumerate(names)))
        per_user: dict[str, list[dict[str, Any]]] = {u: [] for u in names}
        for pk in engine.keys.all_partitions():
            for _sid, fields in await r.xrange(pk.events):
                raw = orjson.loads(fields[b"e"])
                per_user[raw["u"]].append(raw)
        return [sorted(evs, key=lambda e: int(e["v"])) for evs in per_user.values()]
    finally:
        await r.aclose()


def make_events(lives: list[list[dict[str, Any]]], n: int) -> list[Event]:
    """n events: copies of the sample lives under distinct users, each life in order."""
    keys = KeySpace(partitions=PARTITIONS)
    out: list[Event] = []
    copy = 0
    while len(out) < n:
        for life in lives:
            user = f"u{copy:07d}"
            for raw in life:
                body = orjson.dumps({**raw, "u": user}).decode()
                out.append(decode(f"{len(out)}-0", {"e": body}, keys.partition_of(user)))
            copy += 1
    return out[:n]


def start_mongo(workdir: str) -> tuple[subprocess.Popen, str]:
    venv = subprocess.run(
        ["bash", str(REPO / "tests/support/mongo_venv.sh")], capture_output=True, text=True, check=True
    )
    python = venv.stdout.strip().splitlines()[-1]
    proc = subprocess.Popen(
        [python, str(REPO / "tests/support/mongo_wire_server.py"), "--port", "0", "--dir", workdir],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    if not line.startswith("READY "):
        proc.kill()
        raise SystemExit(f"the MongoDB wire server did not start: {line!r}")
    return proc, f"mongodb://127.0.0.1:{line.split()[1]}/?directConnection=true"


async def timed(store: Store, batches: list[list[Event]]) -> tuple[float, int]:
    t0 = time.perf_counter()
    new = 0
    for b in batches:
        new += await store.write_events(b)
    return time.perf_counter() - t0, new


async def bench(kind: str, make: Any, batches: list[list[Event]], n: int) -> dict[str, float]:
    out: dict[str, float] = {}
    s: Store = make()
    await s.open()
    try:
        el, new = await timed(s, batches)
        assert new == n, (kind, new, n)
        out["new"] = n / el
        el, new = await timed(s, batches)
        assert new == 0, (kind, new)
        out["redelivered"] = n / el
    finally:
        await s.close()
    s = make()
    await s.open()
    try:
        el, new = await timed(s, batches[::-1])
        assert new == n, (kind, new, n)
        out["reversed"] = n / el
    finally:
        await s.close()
    for k, v in out.items():
        print(f"  {kind:<7} {k:<12} {v:>10,.0f} events/s", flush=True)
    return out


async def main_async(cfg: argparse.Namespace, workdir: str) -> None:
    server = RedisServer(workdir)
    server.start()
    try:
        lives = await sample_lives(server.url, 16, 4)
    finally:
        server.stop()
    events = make_events(lives, cfg.events)
    batches = [events[i : i + cfg.batch] for i in range(0, len(events), cfg.batch)]
    print(f"{len(events):,} events in {len(batches)} batches of {cfg.batch}", flush=True)
    if "sqlite" in cfg.backends:
        paths = iter(range(1000))
        await bench(
            "sqlite",
            lambda: SQLiteStore(os.path.join(workdir, f"bench-{next(paths)}.sqlite3")),
            batches,
            len(events),
        )
    if "mongo" in cfg.backends:
        proc, uri = start_mongo(os.path.join(workdir, "mongo"))
        try:
            mongo_n = min(len(events), cfg.mongo_events)
            mb = [events[i : min(i + cfg.batch, mongo_n)] for i in range(0, mongo_n, cfg.batch)]
            print(f"mongo: the first {mongo_n:,} events", flush=True)
            await bench("mongo", lambda: MongoStore(uri, db=f"b_{uuid.uuid4().hex[:12]}"), mb, mongo_n)
        finally:
            proc.terminate()
            proc.wait(10)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--events", type=int, default=50_000)
    ap.add_argument("--mongo-events", type=int, default=10_000, help="the wire server is slow")
    ap.add_argument("--batch", type=int, default=1000)
    ap.add_argument("--backends", default="sqlite,mongo", help="comma list of sqlite,mongo")
    cfg = ap.parse_args()
    cfg.backends = set(cfg.backends.split(","))
    with tempfile.TemporaryDirectory(prefix="store-bench-") as workdir:
        asyncio.run(main_async(cfg, workdir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
