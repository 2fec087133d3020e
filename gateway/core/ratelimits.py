"""Per-account rate-limit overrides (requests and tokens per minute).

The gateway's defaults come from its configuration; an account's override replaces either
limit (0 = no limit). Overrides are admin records: the store first, then the account's
`lim` hash in Redis, which lua/reserve.lua reads on the account's own partition. A
partition rebuilt from the store gets its overrides back (`restore_rate_limits`).
"""

from __future__ import annotations

from typing import Any

from .errors import StateLost
from .keys import KeySpace
from .pipelined import write_pipelined
from .redis_client import RedisClient
from .store.base import RateLimitOverride, Store

MAX_LIMIT = 10**12


def check_limit(name: str, value: int | None) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_LIMIT:
        raise ValueError(
            f"{name} must be a whole number from 0 (no limit) to {MAX_LIMIT}, or null (the default)"
        )
    return value


def models_field(models: list[str] | None) -> str | None:
    """The allowed models as reserve.lua looks them up: `|a|b|` (None: every model)."""
    return None if models is None else "|" + "|".join(models) + "|"


def _queue(pipe: Any, keys: KeySpace, o: RateLimitOverride) -> None:
    """The commands that make the account's `lim` hash say `o`, added to a pipeline."""
    key = keys.rate_keys(o.user)[0]
    values = {
        "rpm": o.requests_per_minute,
        "tpm": o.tokens_per_minute,
        "prpm": o.plan_requests_per_minute,
        "ptpm": o.plan_tokens_per_minute,
        "models": models_field(o.allowed_models),
    }
    if all(v is None for v in values.values()):
        pipe.delete(key)
        return
    unset = [k for k, v in values.items() if v is None]
    if unset:
        pipe.hdel(key, *unset)
    pipe.hset(key, mapping={k: v for k, v in values.items() if v is not None})


async def _write(redis: RedisClient, keys: KeySpace, o: RateLimitOverride) -> None:
    pipe = redis.pipeline(transaction=False)
    _queue(pipe, keys, o)
    await pipe.execute()


async def _not_rebuilding(redis: RedisClient, keys: KeySpace, user: str) -> None:
    # Not while the partition is being rebuilt: the rebuild could write back what it read
    # from the store just before this change.
    if not await redis.exists(keys.partition(keys.partition_of(user)).ready):
        raise StateLost("the account's partition is being rebuilt; retry shortly")


async def set_rate_limits(
    redis: RedisClient, keys: KeySpace, store: Store, override: RateLimitOverride
) -> RateLimitOverride:
    """Stores an account's override (both None: back to the defaults) and applies it,
    with the plan's limits the account has (which the override's limits beat)."""
    check_limit("requests_per_minute", override.requests_per_minute)
    check_limit("tokens_per_minute", override.tokens_per_minute)
    await _not_rebuilding(redis, keys, override.user)
    await store.set_rate_limits(override)
    after = await store.rate_limits(override.user) or RateLimitOverride(override.user)
    await _write(redis, keys, after)
    return after


async def set_plan_limits(
    redis: RedisClient,
    keys: KeySpace,
    store: Store,
    user: str,
    requests_per_minute: int | None,
    tokens_per_minute: int | None,
    models: list[str] | None,
) -> RateLimitOverride:
    """A subscriber's plan limits and models (all None: none), stored and applied."""
    check_limit("requests_per_minute", requests_per_minute)
    check_limit("tokens_per_minute", tokens_per_minute)
    await _not_rebuilding(redis, keys, user)
    after = await store.set_plan_limits(user, requests_per_minute, tokens_per_minute, models)
    after = after or RateLimitOverride(user)
    await _write(redis, keys, after)
    return after


async def restore_rate_limits(
    redis: RedisClient, keys: KeySpace, store: Store, partitions: set[int], *, batch: int = 1000
) -> int:
    """Writes the store's overrides of the given partitions back to Redis (rehydrate), in
    pipelines of about `batch` accounts."""

    def queue(pipe: Any, o: RateLimitOverride) -> bool:
        if keys.partition_of(o.user) not in partitions:
            return False
        _queue(pipe, keys, o)
        return True

    return await write_pipelined(redis, store.all_rate_limits(), queue, batch)
