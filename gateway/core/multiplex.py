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
redis.exceptions.TimeoutError and closes its connection (a server that stopped answering
on it, a half-open socket), which fails every other call in flight there with
redis.exceptions.ConnectionError; a lost connection does the same, and the next call
reconnects. Error replies raise what redis-py raises for them (NoScriptError,
BusyLoadingError...), so callers handle both clients alike. Sockets keep TCP keepalive on.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import socket
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import hiredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

try:  # redis-py's own mapping of error replies (LOADING -> BusyLoadingError, a ConnectionError...)
    from redis._parsers.base import BaseParser

    def _error(reply: hiredis.ReplyError) -> Exception:
        return BaseParser.parse_error(str(reply))
except ImportError:  # pragma: no cover - an older/newer redis-py layout

    def _error(reply: hiredis.ReplyError) -> Exception:
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
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)

    def close(self, exc: Exception) -> None:
        """Fails what is in flight and drops the connection (a later call reconnects)."""
        self.lost = True
        self._fail(exc)
        if self.transport is not None:
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        waiting = self.waiting
        while True:
            try:
                reply = self.reader.gets()
            except hiredis.ProtocolError as exc:
                self.close(RedisConnectionError(f"protocol error from Redis: {exc}"))
                return
            if reply is False:
                return
            if not waiting:  # a reply nobody asked for: the stream is out of step, drop it
                self.close(RedisConnectionError("unexpected reply from Redis"))
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
        db = parse_qs(parts.query).get("db", [""])[0] or (
            parts.path.lstrip("/") if parts.scheme == "redis" else ""
        )
        if not db.isdigit() and db:
            raise ValueError(f"bad database number in the Redis URL: {db!r}")
        self._db = int(db) if db else 0
        self._closed = False
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
            # Nothing came back in time on this connection: replace it rather than keep
            # queueing behind a server or socket that stopped answering.
            conn.close(RedisConnectionError("the connection stopped answering and was closed"))
            raise RedisTimeoutError(f"no answer from Redis within {self.timeout} s") from exc

    async def _connection(self, i: int) -> _Connection:
        if self._closed:
            raise RedisConnectionError("the multiplexed Redis client is closed")
        conn = self._slots[i]
        if conn is not None and not conn.lost:
            return conn
        task = self._connecting[i]
        if task is None or task.done():
            task = self._connecting[i] = asyncio.ensure_future(self._connect(i))
        return await asyncio.shield(task)

    async def _connect(self, i: int) -> _Connection:
        loop = asyncio.get_running_loop()
        where = self.url.split("@")[-1]
        conn: _Connection | None = None
        try:
            async with asyncio.timeout(self.timeout):
                if self._unix:
                    _, conn = await loop.create_unix_connection(_Connection, self._unix)
                else:
                    _, conn = await loop.create_connection(_Connection, self._host, self._port)
                hello: list[tuple[str | int, ...]] = []
                if self._password:
                    hello.append(
                        ("AUTH", self._user, self._password) if self._user else ("AUTH", self._password)
                    )
                if self._db:
                    hello.append(("SELECT", self._db))
                for cmd in hello:
                    fut = loop.create_future()
                    # hiredis's stub declares a 1-tuple (Tuple[X]); pack_command takes any length.
                    conn.send(hiredis.pack_command(cmd), fut)  # type: ignore[arg-type]
                    await fut
        except BaseException as exc:
            if conn is not None:  # never leave a half-set-up socket behind
                conn.close(RedisConnectionError("connection setup failed"))
            if isinstance(exc, RedisConnectionError):
                raise  # an AuthenticationError, say
            if isinstance(exc, (OSError, TimeoutError, ResponseError)):
                raise RedisConnectionError(f"cannot connect to Redis at {where}: {exc}") from exc
            raise
        if self._closed:  # closed while connecting
            conn.close(RedisConnectionError("the multiplexed Redis client is closed"))
            raise RedisConnectionError("the multiplexed Redis client is closed")
        self._slots[i] = conn
        return conn

    async def aclose(self) -> None:
        self._closed = True
        for task in self._connecting:
            if task is not None and not task.done():
                task.cancel()
        for i, conn in enumerate(self._slots):
            if conn is not None:
                conn.close(RedisConnectionError("the multiplexed Redis client is closed"))
            self._slots[i] = None
