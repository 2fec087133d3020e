"""The HTTP server: uvicorn with the gateway's connection limits.

uvicorn times out idle keep-alive connections (`timeout_keep_alive`) but has no timeout for
a request head that arrives slowly: a client that opens a connection and sends a header
line now and then (slowloris) holds a descriptor for as long as it likes. The protocol
below closes a connection whose request head is not complete within
CREDIT_HTTP_HEADER_TIMEOUT_SECONDS (counted from the connection's opening for its first
request, from the request's first byte for the next ones on a keep-alive connection), and
answers 503 (JSON, Retry-After) to the requests of connections opened beyond
CREDIT_HTTP_MAX_CONNECTIONS, then closes them. Per request it adds a clock read and
two method calls (loadtest/server_bench.py measures it).

`run(settings, workers=N)` serves one process, or N uvicorn worker processes sharing the
socket; each worker then builds its app with `app_from_environment` (Settings read from
the environment), so N > 1 needs the settings in the environment (not in embedded mode).
"""

from __future__ import annotations

import asyncio
import logging
import resource
import time
from typing import Any

import orjson
import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from .core.settings import Settings, settings_from_env
from .logs import configure_logging

log = logging.getLogger("credit.gateway.server")

BUSY_BODY = (
    b'{"error": {"code": "too_many_connections", "message": '
    b'"the gateway has too many open connections; retry shortly"}}'
)
BUSY_RETRY_AFTER = b"1"
RESERVED_DESCRIPTORS = 64  # Redis, the store, logs, the listening socket...


def max_connections(settings: Settings) -> int:
    """CREDIT_HTTP_MAX_CONNECTIONS, or when 0 what the open-file limit allows: a proxied
    request holds two descriptors (the client's and the upstream's)."""
    if settings.http_max_connections:
        return settings.http_max_connections
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        soft = 65536
    return max(16, (soft - RESERVED_DESCRIPTORS) // 2)


async def _too_many_connections(scope: Any, receive: Any, send: Any) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": 503,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(BUSY_BODY)).encode()),
                (b"retry-after", BUSY_RETRY_AFTER),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": BUSY_BODY})


def _sweep_heads(loop: asyncio.AbstractEventLoop, state: Any, timeout: float, period: float) -> None:
    """Closes the connections of this server whose request head is overdue; re-arms itself
    while the server has connections (one timer per server, none per request)."""
    now = loop.time()
    for conn in list(state.connections):
        started = getattr(conn, "head_started", None)
        if started is not None and now - started >= timeout:
            conn.head_timed_out()
    state.credit_head_sweep = (
        loop.call_later(period, _sweep_heads, loop, state, timeout, period) if state.connections else None
    )


class _OneWriteTransport:
    """The connection's transport, holding a response head back until the first write of
    its body (or the next turn of the loop): an answer whose body is ready goes out in one
    write, one TCP segment, where uvicorn writes the head and the body separately. The
    head's own write was 9% of the gateway's time under load."""

    __slots__ = ("_held", "_loop", "_transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._held: bytes | None = None

    def write(self, data: bytes) -> None:
        held = self._held
        if held is not None:
            self._held = None
            self._transport.write(held + data)
        elif data[:9] == b"HTTP/1.1 ":  # uvicorn writes a response head in one piece
            self._held = data
            self._loop.call_soon(self.flush)
        else:
            self._transport.write(data)

    def flush(self) -> None:
        held = self._held
        if held is not None:
            self._held = None
            if not self._transport.is_closing():
                self._transport.write(held)

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class GatewayHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol plus a request-head timeout and a connection limit.
    Reads `credit_header_timeout` and `credit_max_connections` from the uvicorn Config.

    A connection notes when its pending request head started (`head_started`: the
    connection's opening, then each request's first byte) and forgets it when the head is
    complete; one periodic sweep per server closes those past the timeout. Per request that
    is a clock read, where a timer per request would cost several times more."""

    _last_busy_log = 0.0

    def __init__(self, config: uvicorn.Config, *args: Any, **kwargs: Any) -> None:
        super().__init__(config, *args, **kwargs)
        self.header_timeout: float = config.credit_header_timeout  # type: ignore[attr-defined]
        self.max_connections: int = config.credit_max_connections  # type: ignore[attr-defined]
        self.head_started: float | None = None
        self.over_limit = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.transport = _OneWriteTransport(transport, self.loop)  # type: ignore[assignment]
        self.head_started = self.loop.time()
        if len(self.connections) > self.max_connections:
            self.over_limit = True
            now = time.monotonic()
            if now - GatewayHttpProtocol._last_busy_log > 10:
                GatewayHttpProtocol._last_busy_log = now
                log.warning(
                    "more than %d open connections: answering 503 to the new ones", self.max_connections
                )
        state = self.server_state
        if getattr(state, "credit_head_sweep", None) is None:
            period = min(1.0, self.header_timeout / 4)
            state.credit_head_sweep = self.loop.call_later(  # type: ignore[attr-defined]
                period, _sweep_heads, self.loop, state, self.header_timeout, period
            )

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self.head_started is None:
            self.head_started = self.loop.time()

    def on_headers_complete(self) -> None:
        self.head_started = None
        if not self.over_limit:
            super().on_headers_complete()
            return
        # The request's cycle starts with whatever app is set at this moment.
        app, self.app = self.app, _too_many_connections
        try:
            super().on_headers_complete()
        finally:
            self.app = app

    def head_timed_out(self) -> None:
        # No answer: the client has not finished asking (slowloris, or a stalled client).
        self.head_started = None
        if not self.transport.is_closing():
            self.transport.close()

    def send_400_response(self, msg: str) -> None:
        """A request uvicorn cannot parse (a bad Content-Length, a non-ASCII target...): the
        same answer, in the gateway's JSON error shape rather than plain text."""
        body = orjson.dumps({"error": {"code": "malformed_http", "message": msg}})
        head = [b"HTTP/1.1 400 Bad Request\r\n"]
        for name, value in self.server_state.default_headers:
            head += [name, b": ", value, b"\r\n"]
        head += [
            b"content-type: application/json\r\n",
            b"content-length: ",
            str(len(body)).encode(),
            b"\r\n",
            b"connection: close\r\n\r\n",
            body,
        ]
        self.transport.write(b"".join(head))
        self.transport.close()


def app_from_environment() -> Any:
    """uvicorn's app factory for worker processes: the gateway built from CREDIT_* variables
    (each process configures its own logging: a spawned process inherits none)."""
    from .api.app import create_app

    settings = settings_from_env()
    configure_logging(settings.log_format)
    return create_app(settings)


def build_config(
    settings: Settings, app: Any, *, workers: int = 1, log_level: str = "info"
) -> uvicorn.Config:
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=log_level,
        log_config=None,  # uvicorn's lines go through gateway.logs' handler, as every other
        http=GatewayHttpProtocol,
        timeout_keep_alive=settings.http_keepalive_seconds,  # type: ignore[arg-type]  # uvicorn takes a float
        workers=workers,
        factory=isinstance(app, str),
    )
    config.credit_header_timeout = settings.http_header_timeout_seconds  # type: ignore[attr-defined]
    config.credit_max_connections = max_connections(settings)  # type: ignore[attr-defined]
    return config


def run(settings: Settings, *, workers: int = 1, log_level: str = "info") -> None:
    """Serves until SIGINT/SIGTERM: the app built from `settings` in this process, or
    `workers` processes each building it from the environment."""
    from uvicorn.supervisors import Multiprocess

    if workers > 1:
        from .metrics import shared_metrics_dir

        config = build_config(
            settings, "gateway.server:app_from_environment", workers=workers, log_level=log_level
        )
        sock = config.bind_socket()
        with shared_metrics_dir():  # one /metrics for all the processes
            Multiprocess(config, sockets=[sock]).run()
        return
    from .api.app import create_app

    config = build_config(settings, create_app(settings), log_level=log_level)
    server = uvicorn.Server(config)
    server.run()
    if not server.started:
        raise SystemExit(3)
