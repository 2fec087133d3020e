"""Helpers shared by the worker and partition-loss tests: traffic to drain, counting the
ledger, waiting for a running worker to get somewhere, and a worker process's environment."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]


def worker_env(redis_url, db, **extra) -> dict[str, str]:
    """The environment of a `python -m gateway.worker` process on `redis_url` and the SQLite
    file `db` (its audit file beside it), with `extra` settings."""
    env = {
        **os.environ,
        "CREDIT_REDIS_URL": redis_url,
        "CREDIT_SQLITE_PATH": str(db),
        "CREDIT_PARTITIONS": "16",
        "CREDIT_AUDIT_PATH": str(Path(db).with_suffix(".jsonl")),
        "PYTHONPATH": str(REPO),
    }
    env.update({k: str(v) for k, v in extra.items()})
    return env


async def make_traffic(engine, users=("u1", "u2", "u3", "u4"), rounds=5):
    """A mix of every operation; returns how many events it appended."""
    n = 0
    for u in users:
        await engine.grant(u, "100", op_id=f"g-{u}")
        n += 1
        for i in range(rounds):
            await engine.reserve(u, "3", hold_id=f"{u}-h{i}", ttl_seconds=60)
            n += 1
            if i % 3 == 0:
                await engine.settle(u, f"{u}-h{i}", "1.5")
                n += 1
            elif i % 3 == 1:
                await engine.release(u, f"{u}-h{i}")
                n += 1
        await engine.debit(u, "1", op_id=f"d-{u}")
        n += 1
    return n


async def ledger_count(store, users) -> int:
    return sum([len([e async for e in store.ledger_all(u)]) for u in users])


async def until(condition: Callable[[], Awaitable[bool]], what: str, limit_s: float = 30.0) -> None:
    """Waits for an async condition (the worker runs as a task meanwhile)."""
    deadline = time.monotonic() + limit_s
    while not await condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"still not the case after {limit_s} s: {what}")
        await asyncio.sleep(0.02)


def users_on_distinct_partitions(engine, n: int, prefix: str) -> list[str]:
    seen: dict[int, str] = {}
    i = 0
    while len(seen) < n:
        u = f"{prefix}{i}"
        seen.setdefault(engine.keys.partition_of(u), u)
        i += 1
    return list(seen.values())


async def equals(value: Awaitable[Any], expected: Any) -> bool:
    """For until(): an awaitable's value equals `expected`."""
    return await value == expected
