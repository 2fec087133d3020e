"""Writing many records to Redis in pipelines of a bounded size (the rebuild's admin records)."""

from __future__ import annotations

from collections.abc import AsyncIterable, Callable
from typing import Any, TypeVar

from .redis_client import RedisClient

T = TypeVar("T")


async def write_pipelined(
    redis: RedisClient, records: AsyncIterable[T], queue: Callable[[Any, T], bool], batch: int = 1000
) -> int:
    """Calls `queue(pipe, record)` for each record (True: it queued commands for it), and
    sends a pipeline every `batch` queued records; returns how many were queued."""
    n = queued = 0
    pipe = redis.pipeline(transaction=False)
    async for rec in records:
        if queue(pipe, rec):
            queued += 1
            if queued == batch:
                await pipe.execute()
                n, queued = n + queued, 0
    if queued:
        await pipe.execute()
    return n + queued
