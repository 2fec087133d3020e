"""Benchmark of the rebuild (rehydrate) against a real, private redis-server.

    .venv/bin/python loadtest/rehydrate_bench.py [--accounts N] [--ops M] [--aof] [--json out.json]

A measuring script, not a test: nothing here asserts on timings. It starts its own
redis-server (in a temp dir; `--aof` turns on AOF everysec as production runs it), then:

1. fills a SQLite store: N accounts made by the real engine (a grant each, an open hold on
   every third, a few API keys and rate-limit overrides), drained by the worker; then M
   caller operations (their op ids, fingerprints and answers, as the ledger keeps them)
   spread over the retention window, written to the ledger in batches. These carry
   version 0 so that they leave the account snapshots as the engine made them;
2. snapshots a sample of accounts, FLUSHALLs Redis, and times `rehydrate(engine, store)`;
3. checks what came back: the rebuild's counts, the number of keys in Redis, the sample of
   accounts equal to what they were, and a replayed operation answering the same.

The fill is not timed. Figures for docs/recovery.md come from this script.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import redis.asyncio as aioredis

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from redis_server import RedisServer  # noqa: E402  (beside this script)

from gateway.core.apikeys import ApiKeys  # noqa: E402
from gateway.core.engine import CreditEngine  # noqa: E402
from gateway.core.events import Event  # noqa: E402
from gateway.core.keys import KeySpace  # noqa: E402
from gateway.core.ratelimits import set_rate_limits  # noqa: E402
from gateway.core.recovery import rehydrate  # noqa: E402
from gateway.core.store.base import RateLimitOverride  # noqa: E402
from gateway.core.store.sqlite import SQLiteStore  # noqa: E402
from gateway.worker.runner import Worker  # noqa: E402

PARTITIONS = 64


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


async def fill(
    engine: CreditEngine, store: SQLiteStore, accounts: int, ops: int, api_keys: int, limits: int
) -> list[str]:
    users = [f"bench-{i:07d}" for i in range(accounts)]
    sem = asyncio.Semaphore(64)

    async def one(i: int, u: str) -> None:
        async with sem:
            await engine.grant(u, "1000", op_id=f"g-{u}")
            if i % 3 == 0:
                await engine.reserve(u, "1.5", hold_id=f"h-{u}", ttl_seconds=engine.retention_s)

    await asyncio.gather(*(one(i, u) for i, u in enumerate(users)))
    keys = ApiKeys(engine.redis, engine.keys, store)
    for i in range(api_keys):
        issued = await keys.issue(users[i % accounts])
        if i % 4 == 0:
            await keys.revoke(issued.record.user, issued.record.key_id)
    for i in range(limits):
        await set_rate_limits(
            engine.redis, engine.keys, store, RateLimitOverride(users[i % accounts], 60, 100_000)
        )
    await Worker(engine, store, batch=1000).run(burst=True)
    log(f"filled {accounts} accounts (engine + worker), {api_keys} API keys, {limits} rate-limit overrides")

    # The operations: what the ledger keeps of a caller's debit (op id, fingerprint, answer).
    now = engine.now_ms()
    rnd = random.Random(7)
    state = {
        "v": "1",
        "available": "1000000000",
        "held": "0",
        "debt": "0",
        "granted": "1000000000",
        "spent": "0",
        "expired": "0",
        "seq": "1",
        "debt_total": "0",
    }
    batch: list[Event] = []
    written = 0
    for i in range(ops):
        u = users[i % accounts]
        ts = now - rnd.randrange(engine.retention_s * 1000 * 9 // 10)  # within the retention window
        raw = {
            "id": f"op-{i:08d}",
            "t": "debit",
            "u": u,
            "v": "0",
            "ts": str(ts),
            "amt": "1000",
            "fp": "debit|1000",
            "res": {"amount": "1000"},
            "a": state,
        }
        batch.append(Event("0-0", engine.keys.partition_of(u), raw))
        if len(batch) == 20_000:
            written += len(batch)
            await store.write_events(batch)
            batch = []
            if written % 200_000 == 0:
                log(f"  {written} operations written")
    if batch:
        await store.write_events(batch)
    log(f"filled {ops} operations into the ledger")
    return users


async def main_async(args: argparse.Namespace) -> dict:
    workdir = tempfile.mkdtemp(prefix="rehydrate-bench-")
    server = RedisServer(workdir, args.aof)
    server.start()
    pool = aioredis.BlockingConnectionPool.from_url(server.url, max_connections=64, timeout=30)
    redis = aioredis.Redis(connection_pool=pool)
    store = SQLiteStore(os.path.join(workdir, "store.db"))
    await store.open()
    try:
        engine = CreditEngine(redis, keys=KeySpace(partitions=PARTITIONS))
        for p in range(PARTITIONS):
            await engine.mark_ready(p)
        t0 = time.perf_counter()
        users = await fill(engine, store, args.accounts, args.ops, args.api_keys, args.limits)
        log(f"fill took {time.perf_counter() - t0:.1f} s")
        sample = users[:: max(1, len(users) // 200)]
        before = {u: await engine.account(u) for u in sample}
        await redis.flushall()
        profiler = None
        if args.profile:
            import cProfile

            profiler = cProfile.Profile()
            profiler.enable()
        t0 = time.perf_counter()
        report = await rehydrate(engine, store)
        elapsed = time.perf_counter() - t0
        if profiler is not None:
            import pstats

            profiler.disable()
            pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
        log(f"rehydrate: {elapsed:.2f} s  {report}")
        # What came back.
        after = {u: await engine.account(u) for u in sample}
        same = after == before
        dbsize = await redis.dbsize()
        replay = await engine.debit(users[0], "0.001", op_id="op-00000000")
        result = {
            "accounts": args.accounts,
            "operations": args.ops,
            "aof": args.aof,
            "rehydrate_seconds": round(elapsed, 3),
            "operations_per_second": round(report.operations / elapsed) if elapsed else None,
            "report": report.__dict__,
            "redis_keys": dbsize,
            "sample_accounts_equal": same,
            "replay_answers_the_same": bool(replay.replayed),
        }
        log(json.dumps(result))
        if not same or not replay.replayed or report.operations < args.ops:
            log("CHECK FAILED: the rebuild did not bring everything back")
        return result
    finally:
        await store.close()
        await redis.aclose()
        server.stop()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            log(f"kept {workdir}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--accounts", type=int, default=1000)
    p.add_argument("--ops", type=int, default=1_000_000)
    p.add_argument("--api-keys", type=int, default=100)
    p.add_argument("--limits", type=int, default=100)
    p.add_argument("--aof", action="store_true", help="redis-server with AOF everysec (as in production)")
    p.add_argument("--json", help="also write the result here")
    p.add_argument("--profile", action="store_true", help="cProfile the rebuild (the event loop's thread)")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (store, redis log)")
    args = p.parse_args()
    result = asyncio.run(main_async(args))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
