"""A lean, multiplexed Redis client for the hot path's script calls (EVALSHA / EVAL).

Why: a metered request is two script calls, and through redis-py 8 each one costs the
gateway more CPU than the rest of the request's Redis work put together (a pool checkout
with a lock, a task per send for the socket timeout, retry and telemetry wrappers). Here
many calls share a few connections at once: Redis answers each connection's commands in
order, so a FIFO of futures pairs every reply with its call, and the commands issued in one
event-loop turn go out in one write. No pool checkout, no per-call task.

Only plain `redis://` (or `unix://`) servers; a cluster and the embedded fakeredis keep
redis-py. Everything else (reads, streams, pub/sub) stays on redis-py as well.

Failure behaviour: a call that gets no answer within `timeout` seconds raises
redis.exceptions.TimeoutError (its late reply is dropped when it comes); a lost connection
fails every call in flight on it with redis.exceptions.ConnectionError, and the next call
reconnects. An error reply raises redis.exceptions.ResponseError (NoScriptError for
NOSCRIPT), as redis-py would, so callers handle both clients alike.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import hiredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError


def _error(reply: hiredis.ReplyError) -> ResponseError:
    msg = str(reply)
    return NoScriptError(msg) if msg.startswith("NOSCRIPT") else ResponseError(msg)


class _Connection(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.reader = hiredis.Reader(replyError=hiredis.ReplyError)
        self.waiting: collections.deque[asyncio.Future] = collections.deque()
        self.out: list[bytes] = []
        self.lost = False

    # -- asyncio.Protocol --------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        waiting = self.waiting
        while True:
            try:
                reply = self.reader.gets()
            except hiredis.ProtocolError as exc:
                self._fail(RedisConnectionError(f"protocol error from Redis: {exc}"))
                if self.transport:
                    self.transport.close()
                return
            if reply is False:
                return
            if not waiting:  # a reply nobody asked for: the stream is out of step, drop it
                self._fail(RedisConnectionError("unexpected reply from Redis"))
                if self.transport:
                    self.transport.close()
                return
            fut = waiting.popleft()
            if fut.done():  # its caller timed out or was cancelled
                continue
            if isinstance(reply, hiredis.ReplyError):
                fut.set_exception(_error(reply))
            else:
                fut.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self._fail(RedisConnectionError(f"connection to Redis lost: {exc or 'closed'}"))

    def _fail(self, exc: Exception) -> None:
        while self.waiting:
            fut = self.waiting.popleft()
            if not fut.done():
                fut.set_exception(exc)

    # -- sending -----------------------------------------------------------------------

    def send(self, packed: bytes, fut: asyncio.Future) -> None:
        if self.lost:
            fut.set_exception(RedisConnectionError("connection to Redis lost"))
            return
        self.waiting.append(fut)
        if not self.out:
            asyncio.get_running_loop().call_soon(self._flush)
        self.out.append(packed)

    def _flush(self) -> None:
        out, self.out = self.out, []
        if self.transport is not None and not self.lost:
            self.transport.write(b"".join(out))


class MultiplexedRedis:
    """`evalsha` / `eval` with redis-py's signatures, over `connections` shared connections."""

    def __init__(self, url: str, *, connections: int = 2, timeout: float = 5.0) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("redis", "unix"):
            raise ValueError(f"the multiplexed client takes redis:// or unix:// URLs, not {parts.scheme}://")
        self.url = url
        self.timeout = timeout
        self._unix = parts.path if parts.scheme == "unix" else None
        self._host = parts.hostname or "127.0.0.1"
        self._port = parts.port or 6379
        self._user = unquote(parts.username) if parts.username else None
        self._password = unquote(parts.password) if parts.password else None
        db = parse_qs(parts.query).get("db", [""])[0] or (parts.path.lstrip("/") if parts.scheme == "redis" else "")
        if not db.isdigit() and db:
            raise ValueError(f"bad database number in the Redis URL: {db!r}")
        self._db = int(db) if db else 0
        self._slots: list[_Connection | None] = [None] * max(1, connections)
        self._connecting: list[asyncio.Task | None] = [None] * len(self._slots)
        self._next = itertools.cycle(range(len(self._slots)))

    async def evalsha(self, sha: str, numkeys: int, *keys_and_args: Any) -> Any:
        return await self.execute("EVALSHA", sha, numkeys, *keys_and_args)

    async def eval(self, script: str, numkeys: int, *keys_and_args: Any) -> Any:
        return await self.execute("EVAL", script, numkeys, *keys_and_args)

    async def execute(self, *args: Any) -> Any:
        conn = await self._connection(next(self._next))
        fut = asyncio.get_running_loop().create_future()
        conn.send(hiredis.pack_command(args), fut)
        try:
            async with asyncio.timeout(self.timeout):
                return await fut
        except TimeoutError as exc:
            raise RedisTimeoutError(f"no answer from Redis within {self.timeout} s") from exc

    async def _connection(self, i: int) -> _Connection:
        conn = self._slots[i]
        if conn is not None and not conn.lost:
            return conn
        task = self._connecting[i]
        if task is None or task.done():
            task = self._connecting[i] = asyncio.ensure_future(self._connect(i))
        return await asyncio.shield(task)

    async def _connect(self, i: int) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.timeout):
                if self._unix:
                    _, conn = await loop.create_unix_connection(_Connection, self._unix)
                else:
                    _, conn = await loop.create_connection(_Connection, self._host, self._port)
                hello = []
                if self._password:
                    hello.append(("AUTH", self._user, self._password) if self._user else ("AUTH", self._password))
                if self._db:
                    hello.append(("SELECT", self._db))
                for cmd in hello:
                    fut = loop.create_future()
                    conn.send(hiredis.pack_command(cmd), fut)
                    await fut
        except (OSError, TimeoutError) as exc:
            raise RedisConnectionError(f"cannot connect to Redis at {self.url.split('@')[-1]}: {exc}") from exc
        self._slots[i] = conn
        return conn

    async def aclose(self) -> None:
        for i, conn in enumerate(self._slots):
            if conn is not None and conn.transport is not None:
                conn.transport.close()
            self._slots[i] = None
