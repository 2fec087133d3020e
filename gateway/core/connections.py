"""Builds the clients a Settings names: Redis (embedded mode included), the store, the engine."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from .engine import CreditEngine
from .keys import KeySpace
from .redact import public_url
from .redis_client import RedisClient
from .settings import Settings
from .store.base import Store
from .store.registry import store_from_url

if TYPE_CHECKING:
    from .multiplex import MultiplexedRedis


def make_redis(settings: Settings) -> RedisClient:
    """A redis-py asyncio client: plain, cluster, or in-process fakeredis (embedded mode)."""
    url = settings.redis_url
    if not url:  # embedded mode; fakeredis is loaded only then
        import fakeredis
        import redis.asyncio as aioredis

        # As for a real Redis: a burst waits for a free connection (redis-py's own pool
        # refuses the 101st at once).
        return fakeredis.FakeAsyncRedis(
            server=fakeredis.FakeServer(),
            max_connections=settings.redis_max_connections,
            connection_pool_class=aioredis.BlockingConnectionPool,
        )
    if settings.redis_cluster:
        from .cluster import GatewayRedisCluster

        # A node that stops answering fails its calls after the timeout, and the node's
        # calls after them at once (gateway/core/cluster.py); the other nodes carry on.
        return GatewayRedisCluster.from_url(
            url,
            max_connections=settings.redis_max_connections,
            socket_timeout=settings.redis_timeout_seconds,
            socket_connect_timeout=settings.redis_timeout_seconds,
        )
    import redis.asyncio as aioredis

    # A burst of requests waits for a connection instead of failing ("Too many connections").
    pool = aioredis.BlockingConnectionPool.from_url(
        url, max_connections=settings.redis_max_connections, timeout=10
    )
    return aioredis.Redis(connection_pool=pool)


def make_script_client(settings: Settings) -> MultiplexedRedis | None:
    """The multiplexed client for script calls, when it applies (a single plain Redis)."""
    url = settings.redis_url
    if not url or settings.redis_cluster or not settings.redis_multiplex:
        return None
    if not url.startswith(("redis://", "unix://")):
        return None  # TLS and other schemes stay on redis-py
    from .multiplex import MultiplexedRedis

    return MultiplexedRedis(
        url,
        connections=settings.redis_multiplex_connections,
        timeout=settings.redis_timeout_seconds,
    )


def make_store(settings: Settings) -> Store:
    """The store of CREDIT_DATABASE_URL (PostgreSQL) when set, else MongoDB when a URI is
    set, else SQLite at the path (or sqlite:// URL) given."""
    url = settings.database_url or settings.mongo_uri or settings.sqlite_path
    return store_from_url(url, database=settings.mongo_db)


def make_keys(settings: Settings) -> KeySpace:
    """The key layout (prefix, partition count) the settings name."""
    return KeySpace(settings.key_prefix, settings.partitions)


def make_engine(
    settings: Settings,
    redis: RedisClient,
    *,
    script_redis: MultiplexedRedis | None = None,
    clock: Callable[[], float] | None = None,
) -> CreditEngine:
    """The credit engine a Settings describes, on `redis` (script calls on `script_redis`
    when given: the multiplexed client)."""
    return CreditEngine(
        redis,
        keys=make_keys(settings),
        retention_s=settings.retention_seconds,
        max_backlog=settings.max_backlog,
        script_redis=script_redis,
        clock=clock if clock is not None else time.time,
    )


def describe(settings: Settings) -> str:
    """One line for the start-up log: which Redis and which store (no secrets)."""
    if settings.embedded:
        redis = "embedded (in-process fakeredis, state lives in this process only)"
    else:
        redis = ("cluster " if settings.redis_cluster else "") + public_url(settings.redis_url or "")
    if settings.database_url:
        store = f"PostgreSQL {public_url(settings.database_url)}"
    elif settings.mongo_uri:
        store = f"MongoDB {public_url(settings.mongo_uri)}/{settings.mongo_db}"
    else:
        store = f"SQLite {settings.sqlite_path}"
    return f"redis: {redis}; store: {store}"
