"""The live pricing table: kept in Redis, cached in every gateway process.

A change (PUT /admin/pricing) bumps a version, stores the table and publishes a message;
every process reloads on that message, and re-reads every `refresh_seconds` in case a
message was missed. The hot path reads only the process-local copy.
"""

from __future__ import annotations

import logging

import orjson

from ..core.channel import Subscription
from ..core.pricing import PricingTable
from ..core.redis_client import RedisClient

log = logging.getLogger("credit.pricing")


class PricingCache:
    def __init__(
        self, redis: RedisClient, prefix: str, initial: PricingTable, refresh_seconds: float = 10.0
    ) -> None:
        self.redis = redis
        self.key = f"{prefix}:pricing"
        self.channel = f"{prefix}:pricing:changed"
        self.table = initial
        self._initial = initial
        self.refresh_seconds = refresh_seconds
        self._sub = Subscription(
            redis,
            self.channel,
            on_message=lambda _: self.reload(),
            on_subscribe=self.reload,
            on_idle=self.reload,
            idle_seconds=refresh_seconds,
        )

    async def start(self) -> None:
        """Seeds Redis with the configured table when it has none, loads it, and listens."""
        await self.redis.set(
            self.key, orjson.dumps({"version": 1, "table": self._initial.to_json()}), nx=True
        )
        await self.reload()
        await self._sub.start()

    async def stop(self) -> None:
        await self._sub.stop()

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
