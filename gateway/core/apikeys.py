"""Per-user API keys: issued once, stored hashed, revocable; they name the user by themselves.

The store holds the durable record (written first); Redis holds what the gateway looks keys
up by, `<partition>:apikey:<sha256 hex>` -> "user\\nkey_id", on the partition of the
digest (a key is found without knowing its user), so a partition rebuilt from the store
gets its keys back with its accounts (`restore_api_keys`). A revoked key stays in Redis as
a tombstone, which a rebuild racing with the revocation cannot overwrite. Each gateway process caches hits
for `cache_seconds`; a revocation drops the key from every process's cache at once through
a pub/sub message, and the cache's lifetime bounds the staleness should a message be lost.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import secrets
import time
from dataclasses import dataclass
from typing import Any

from .channel import Subscription
from .errors import StateLost
from .keys import KeySpace
from .pipelined import write_pipelined
from .redis_client import RedisClient
from .store.base import ApiKeyRecord, Store

log = logging.getLogger("credit.apikeys")

TOKEN_PREFIX = "cgk_"
REVOKED = "revoked"  # the Redis value of a revoked key (a tombstone)
MAX_NAME = 100
_CACHE_LIMIT = 100_000


def digest_of(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class KeyOwner:
    user: str
    key_id: str


@dataclass(frozen=True, slots=True)
class IssuedKey:
    record: ApiKeyRecord
    token: str  # shown to the admin once, never stored


class ApiKeys:
    def __init__(
        self,
        redis: RedisClient,
        keys: KeySpace,
        store: Store,
        *,
        cache_seconds: float = 10.0,
        clock=time.time,
    ) -> None:
        self.redis = redis
        self.keys = keys
        self.store = store
        self.cache_seconds = cache_seconds
        self.clock = clock
        self.channel = f"{keys.prefix}:apikeys:revoked"
        self._cache: dict[str, tuple[KeyOwner, float]] = {}
        self._generation = 0  # bumped by every invalidation
        self._sub = Subscription(redis, self.channel, on_message=self._forget, on_subscribe=self._clear)

    async def start(self) -> None:
        await self._sub.start()

    async def stop(self) -> None:
        await self._sub.stop()

    # -- admin ---------------------------------------------------------------------------

    async def issue(self, user: str, name: str = "") -> IssuedKey:
        """A new key for `user`: recorded in the store, then made usable in Redis."""
        if len(name) > MAX_NAME or not name.isprintable():
            raise ValueError(f"name must be at most {MAX_NAME} printable characters")
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        rec = ApiKeyRecord(
            key_id=f"key_{secrets.token_hex(8)}",
            user=user,
            digest=digest_of(token),
            prefix=token[:10],
            name=name,
            created_ms=int(self.clock() * 1000),
        )
        await self.store.add_api_key(rec)
        try:
            await self.redis.set(self.keys.api_key(rec.digest), f"{user}\n{rec.key_id}")
        except BaseException:
            # Never shown, so never usable; keep the store from restoring it later.
            await asyncio.shield(self.store.revoke_api_key(user, rec.key_id, rec.created_ms))
            raise
        log.info("API key %s issued for user %s", rec.key_id, user)  # never the key itself
        return IssuedKey(rec, token)

    async def revoke(self, user: str, key_id: str) -> ApiKeyRecord | None:
        """Revokes the key in the store, then in Redis and every process's cache. Repeating
        it is safe (and re-does the Redis part should an earlier attempt have failed)."""
        rec = await self.store.revoke_api_key(user, key_id, int(self.clock() * 1000))
        if rec is None:
            return None
        # A tombstone, not a delete: a rebuild of the partition running at the same time
        # (it read the key as live from the store a moment ago) writes only where nothing
        # is, so it cannot bring the key back.
        await self.redis.set(self.keys.api_key(rec.digest), REVOKED)
        self._forget(rec.digest)
        await self.redis.publish(self.channel, rec.digest)
        log.info("API key %s of user %s revoked", key_id, user)
        return rec

    async def list(self, user: str) -> list[ApiKeyRecord]:
        return await self.store.api_keys(user)

    # -- the hot path ----------------------------------------------------------------------

    async def owner(self, token: str) -> KeyOwner | None:
        """Who the key belongs to, or None for an unknown or revoked key."""
        digest = digest_of(token)
        hit = self._cache.get(digest)
        now = time.monotonic()
        if hit is not None and hit[1] > now:
            return hit[0]
        generation = self._generation
        part = self.keys.partition(self.keys.api_key_partition(digest))
        value, ready = await self.redis.mget(self.keys.api_key(digest), part.ready)
        if ready is None:
            raise StateLost("the partition holding this key is being rebuilt")
        if value is None or value in (REVOKED, REVOKED.encode()):
            self._cache.pop(digest, None)
            return None
        user, _, key_id = (value.decode() if isinstance(value, bytes) else value).partition("\n")
        owner = KeyOwner(user, key_id)
        # Cache only if no revocation arrived while Redis was being asked (it could be this key's).
        if generation == self._generation:
            if len(self._cache) >= _CACHE_LIMIT:
                self._cache.clear()
            self._cache[digest] = (owner, now + self.cache_seconds)
        return owner

    def _forget(self, digest: Any) -> None:
        self._generation += 1
        self._cache.pop(digest.decode() if isinstance(digest, bytes) else str(digest), None)

    def _clear(self) -> None:
        self._generation += 1
        self._cache.clear()


async def restore_api_keys(
    redis: RedisClient, keys: KeySpace, store: Store, partitions: set[int], *, batch: int = 1000
) -> int:
    """Writes the store's live keys of the given partitions back to Redis (rehydrate), in
    pipelines of `batch`."""

    def queue(pipe: Any, rec: ApiKeyRecord) -> bool:
        if keys.api_key_partition(rec.digest) not in partitions:
            return False
        # NX: never over a revocation's tombstone written since the store was read.
        pipe.set(keys.api_key(rec.digest), f"{rec.user}\n{rec.key_id}", nx=True)
        return True

    return await write_pipelined(redis, store.active_api_keys(), queue, batch)
