"""The live pricing table: kept in Redis, cached in every gateway process.

A change (PUT /admin/pricing) bumps a version, stores the table and publishes a message;
every process reloads on that message, and re-reads every `refresh_seconds` in case a
message was missed. The hot path reads only the process-local copy.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import orjson

from ..core.pricing import PricingTable

log = logging.getLogger("credit.pricing")


class PricingCache:
    def __init__(self, redis: Any, prefix: str, initial: PricingTable, refresh_seconds: float = 10.0) -> None:
        self.redis = redis
        self.key = f"{prefix}:pricing"
        self.channel = f"{prefix}:pricing:changed"
        self.table = initial
        self._initial = initial
        self.refresh_seconds = refresh_seconds
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        """Seeds Redis with the configured table when it has none, loads it, and listens."""
        await self.redis.set(self.key, orjson.dumps({"version": 1, "table": self._initial.to_json()}), nx=True)
        await self.reload()
        self._task = asyncio.create_task(self._listen(), name="pricing-listener")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task

    async def reload(self) -> None:
        raw = await self.redis.get(self.key)
        if raw is None:
            return
        doc = orjson.loads(raw)
        if doc["version"] != self.table.version:
            self.table = PricingTable.from_json(doc["table"], version=doc["version"])
            log.info("pricing version %d loaded (%d models)", self.table.version, len(self.table.models))

    async def replace(self, table: PricingTable) -> PricingTable:
        """Stores a new table (validated by the caller) and tells every process."""
        version = int(await self.redis.incr(f"{self.key}:version")) + 1  # > the seeded 1
        await self.redis.set(self.key, orjson.dumps({"version": version, "table": table.to_json()}))
        await self.redis.publish(self.channel, str(version))
        await self.reload()
        return self.table

    async def _listen(self) -> None:
        if not hasattr(self.redis, "pubsub"):  # a client without pub/sub: re-read on a timer
            while True:
                await asyncio.sleep(self.refresh_seconds)
                try:
                    await self.reload()
                except Exception:
                    log.exception("pricing reload failed; retrying")
        while True:
            pubsub = self.redis.pubsub()
            try:
                await pubsub.subscribe(self.channel)
                await self.reload()  # anything changed before the subscription took
                while True:
                    msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=self.refresh_seconds)
                    await self.reload()
                    del msg
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("pricing listener failed; retrying")
                await asyncio.sleep(1.0)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()
