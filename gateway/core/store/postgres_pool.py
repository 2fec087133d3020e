"""The PostgreSQL store's connection pool, through which a server that cannot be reached
reads as StoreUnreachable: asyncpg raises the socket's own OSError (connection refused,
reset, no route) when it opens a connection, which the API could not tell from any other
OSError and would answer 500 instead of 503."""

from __future__ import annotations

from collections.abc import Awaitable
from types import TracebackType
from typing import Any, TypeVar

import asyncpg

T = TypeVar("T")


class StoreUnreachable(ConnectionError):
    """The store's server could not be reached (the API answers 503 store_unavailable)."""


async def _reached(call: Awaitable[T]) -> T:
    try:
        return await call
    except StoreUnreachable:
        raise
    except OSError as exc:
        raise StoreUnreachable(f"PostgreSQL unreachable: {exc}") from exc


class _Acquired:
    def __init__(self, ctx: Any) -> None:
        self._ctx = ctx

    async def __aenter__(self) -> asyncpg.Connection:
        return await _reached(self._ctx.__aenter__())

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._ctx.__aexit__(kind, exc, tb)


class Pool:
    """asyncpg's pool with the calls the store makes; each raises StoreUnreachable for a
    server it cannot reach."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.raw = pool

    def acquire(self) -> _Acquired:
        return _Acquired(self.raw.acquire())

    async def fetch(self, query: str, *args: Any) -> list[Any]:
        return await _reached(self.raw.fetch(query, *args))

    async def fetchrow(self, query: str, *args: Any) -> Any:
        return await _reached(self.raw.fetchrow(query, *args))

    async def fetchval(self, query: str, *args: Any) -> Any:
        return await _reached(self.raw.fetchval(query, *args))

    async def execute(self, query: str, *args: Any) -> str:
        return await _reached(self.raw.execute(query, *args))

    async def close(self) -> None:
        await self.raw.close()
