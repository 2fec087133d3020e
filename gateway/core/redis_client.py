"""The Redis client type the domain is written against: redis-py's asyncio client.

A plain server (`redis.asyncio.Redis`, which embedded mode's fakeredis client subclasses)
or a Cluster (`redis.asyncio.RedisCluster`, the gateway's subclass of it included): both
answer the same commands and pipelines.
"""

from __future__ import annotations

from typing import TypeAlias

from redis.asyncio import Redis, RedisCluster

RedisClient: TypeAlias = Redis | RedisCluster
