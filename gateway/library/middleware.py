"""The ASGI middleware of library mode: reserve on a metered request's entry, settle on its answer.

Per metered request the middleware reserves `reserve` credits for the request's user,
runs the handler, and settles what `add_llm_usage` recorded as soon as the response body
is complete (a whole response: before its headers leave, so X-Credits-Charged is the
confirmed charge; a streamed one: when the stream ends, the figure then goes in HTTP
trailers or a final SSE comment). Settles go through gateway/core/settlement.py: retried
under the same operation id when Redis falters.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Awaitable, Callable, Iterable
from decimal import Decimal
from typing import Any

import orjson
from redis.exceptions import RedisError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..core.engine import CreditEngine
from ..core.errors import AccountInDebt, BacklogFull, CreditError, InsufficientCredits, StateLost
from ..core.keys import LIBRARY_HOLD_PREFIX, InvalidId, check_id
from ..core.money import from_units, to_units
from ..core.pricing import PricingTable
from ..core.settlement import Settler
from ..http_errors import error_body, status_of
from .usage import RequestMeter, recording_into

log = logging.getLogger("credit.library")

# Never metered unless `paths` / `skip_paths` / `metered` say otherwise: FastAPI's own
# documentation routes and health checks. A trailing * matches any path with that prefix.
DEFAULT_SKIP_PATHS: tuple[str, ...] = ("/docs", "/docs/*", "/redoc", "/openapi.json", "/health*")
# CORS preflights carry no credentials and no user.
DEFAULT_SKIP_METHODS: tuple[str, ...] = ("OPTIONS",)


def _error(
    status: int, code: str, message: str, headers: dict[str, str] | None = None, **details: Any
) -> tuple[Message, Message]:
    raw = orjson.dumps(error_body(code, message, details))
    hs = [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())]
    hs += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    return (
        {"type": "http.response.start", "status": status, "headers": hs},
        {"type": "http.response.body", "body": raw},
    )


def _refusal(
    exc: CreditError, message: str, headers: dict[str, str] | None = None, **details: Any
) -> tuple[Message, Message]:
    return _error(status_of(exc), exc.code, message, headers, **details)


def _path_matcher(patterns: Iterable[str]) -> Callable[[str], bool]:
    exact, prefixes = set(), []
    for p in patterns:
        if p.endswith("*"):
            prefixes.append(p[:-1])
        else:
            exact.add(p)
    pre = tuple(prefixes)
    return lambda path: path in exact or (bool(pre) and path.startswith(pre))


class CreditMiddleware:
    """ASGI middleware: reserve on entry, settle the recorded usage when the response body
    is complete (or the handler ends without one). Every option: docs/library.md."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        engine: CreditEngine | Callable[[], CreditEngine | None],
        pricing: PricingTable | None = None,
        reserve: Decimal | str | int = Decimal("1"),
        reserve_for: Callable[[Scope], Decimal | str | int] | None = None,
        ttl_seconds: float = 300,
        user_of: Callable[[Scope], str | None] | None = None,
        paths: Iterable[str] | None = None,
        skip_paths: Iterable[str] = DEFAULT_SKIP_PATHS,
        skip_methods: Iterable[str] = DEFAULT_SKIP_METHODS,
        metered: Callable[[Scope], bool] | None = None,
        settler: Settler | None = None,
        drain_seconds: float = 30,
    ) -> None:
        self.app = app
        self._engine = engine
        self.pricing = pricing
        self.reserve_units = to_units(reserve)
        self.reserve_for = reserve_for
        if not ttl_seconds > 0:
            raise ValueError("ttl_seconds must be positive")
        self.ttl_seconds = ttl_seconds
        self.user_of = user_of or _header_user
        if metered is None:
            only = _path_matcher(paths) if paths is not None else None
            skip = _path_matcher(skip_paths)
            methods = frozenset(m.upper() for m in skip_methods)

            def metered(scope: Scope) -> bool:
                path = scope.get("path", "")
                if scope.get("method") in methods or skip(path):
                    return False
                return only is None or only(path)

        self.metered = metered
        self._settler = settler
        self._settlers: list[Settler] = [settler] if settler else []
        self.drain_seconds = drain_seconds

    def engine(self) -> CreditEngine | None:
        return self._engine if isinstance(self._engine, CreditEngine) else self._engine()

    def settler_for(self, engine: CreditEngine) -> Settler:
        """The settler that owns this middleware's background charges (one per engine)."""
        s = self._settler
        if s is None or s.engine is not engine:
            s = self._settler = Settler(engine)
            self._settlers.append(s)
        return s

    # A deadline, not a timeout on the call: what is left past it is cancelled and counted.
    async def drain(self, timeout: float | None = None) -> int:  # noqa: ASYNC109
        """Waits for charges still being retried or late usage still being charged."""
        cancelled = 0
        for s in self._settlers:
            cancelled += await s.drain(timeout)
        return cancelled

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self.app(scope, self._draining_at_shutdown(receive), send)
            return
        if scope["type"] != "http" or not self.metered(scope):
            await self.app(scope, receive, send)
            return
        engine = self.engine()
        if engine is None:
            for m in _error(
                503, "not_ready", "the credit engine is not started yet; retry", {"Retry-After": "1"}
            ):
                await send(m)
            return
        user = self.user_of(scope)
        try:
            user = check_id("user", user) if user else None
        except InvalidId:
            user = None
        if user is None:
            for m in _error(401, "missing_user", "X-User-Id is missing or not a valid user id"):
                await send(m)
            return
        try:
            units = self.reserve_units if self.reserve_for is None else to_units(self.reserve_for(scope))
        except ValueError as exc:  # AmountError too: what the request asks to hold is refused
            for m in _error(400, "invalid_reserve", f"the credits to hold for this request: {exc}"):
                await send(m)
            return
        settler = self.settler_for(engine)
        hold_id = f"{LIBRARY_HOLD_PREFIX}{uuid.uuid4().hex}"
        expires_at_ms = await self._reserve(engine, settler, user, hold_id, units)
        if not isinstance(expires_at_ms, int):
            for m in expires_at_ms:
                await send(m)
            return
        await _MeteredRequest(self, settler, user, hold_id, expires_at_ms, scope).run(receive, send)

    async def _reserve(
        self, engine: CreditEngine, settler: Settler, user: str, hold_id: str, units: int
    ) -> int | tuple[Message, Message]:
        """The hold's deadline (ms), or the refusal to send."""
        try:
            hold = await engine.reserve_units(user, units, hold_id=hold_id, ttl_seconds=self.ttl_seconds)
        except InsufficientCredits as exc:
            return _refusal(exc, "not enough credits for this request", available=str(exc.available))
        except AccountInDebt as exc:
            return _refusal(exc, "the account owes credits; top up to continue")
        except StateLost as exc:
            return _refusal(exc, "the credit store is being rebuilt; retry", {"Retry-After": "1"})
        except BacklogFull as exc:
            return _refusal(
                exc, "the gateway is behind persisting charges; retry shortly", {"Retry-After": "5"}
            )
        except RedisError as exc:
            # The hold may exist: give it back once Redis answers (it would expire anyway).
            log.error("reserve of %s for %s not confirmed by Redis: %s", hold_id, user, exc)
            until = engine.now_ms() + round(self.ttl_seconds * 1000)  # it expires by itself by then
            settler.spawn(_give_back(settler, user, hold_id, until))
            return _error(
                503,
                "credit_store_unavailable",
                "the credit store did not answer; retry shortly",
                {"Retry-After": "1"},
            )
        return hold.expires_at_ms

    def _draining_at_shutdown(self, receive: Receive) -> Receive:
        async def wrapped() -> Message:
            message = await receive()
            if message["type"] == "lifespan.shutdown":
                # Before the app's own shutdown closes the engine.
                left = await self.drain(self.drain_seconds)
                if left:
                    log.error("%d charges still unconfirmed at shutdown were given up (logged above)", left)
            return message

        return wrapped


async def _give_back(settler: Settler, user: str, hold_id: str, until_ms: int) -> None:
    with contextlib.suppress(CreditError):
        await settler.release(
            user, hold_id, metadata={"reason": "reserve_unconfirmed"}, void_if_unknown=True, until_ms=until_ms
        )


class _MeteredRequest:
    """One metered request between its reserve and its settle."""

    def __init__(
        self,
        mw: CreditMiddleware,
        settler: Settler,
        user: str,
        hold_id: str,
        expires_at_ms: int,
        scope: Scope,
    ) -> None:
        self.mw = mw
        self.settler = settler
        self.user = user
        self.hold_id = hold_id
        self.scope = scope
        self.expires_at_ms = expires_at_ms
        self.meter = RequestMeter(settler, mw.pricing, user, hold_id)
        self.outcome: asyncio.Task | None = None
        self.start: Message | None = None  # http.response.start, held until the body shows its kind
        self.streaming = False
        self.sse = False
        self.trailers = False
        self.last_byte = b"\n"

    async def run(self, receive: Receive, send: Send) -> None:
        failed = True
        try:
            with recording_into(self.meter):
                await self.mw.app(self.scope, receive, lambda m: self._send(m, send))
            failed = False
        finally:
            await self._settled(failed)
            if self.start is not None and not failed:  # a start without a body: pass it on
                await send(self._with_figures(self.start, await self._settled(failed)))

    def _settled(self, failed: bool = False) -> Awaitable[tuple[int, int | None] | None]:
        """Settles once (in a task of its own, so a cancelled request cannot stop it half way);
        (charged, remaining) in micro-credits, or None when not confirmed."""
        if self.outcome is None:
            self.outcome = self.settler.spawn(self._settle(failed))
        return asyncio.shield(self.outcome)

    async def _settle(self, failed: bool) -> tuple[int, int | None] | None:
        units, calls, n = self.meter.close()
        meta = {"request_id": self.hold_id, "path": self.scope.get("path"), "calls": calls, "n_calls": n}
        s = self.settler
        try:
            if units == 0 and failed:  # nothing recorded and no answer: nothing to pay for
                await s.release(self.user, self.hold_id, metadata={**meta, "reason": "handler_failed"})
                return None
            # A hold that expired meanwhile (the handler outlived it) is charged as a debit.
            r = await s.settle(
                self.user, self.hold_id, units, expires_at_ms=self.expires_at_ms, metadata=meta
            )
            return None if r is None else (r.charged_units, r.state.available_units)
        except CreditError as exc:
            log.error(
                "settling %s for %s at %d micro-credits failed: %s %s",
                self.hold_id,
                self.user,
                units,
                exc.code,
                exc.details,
            )
            return None

    def _with_figures(self, start: Message, outcome: tuple[int, int | None] | None) -> Message:
        headers = [*list(start.get("headers", [])), (b"x-request-id", self.hold_id.encode())]
        if outcome is not None:
            headers.append((b"x-credits-charged", str(from_units(outcome[0])).encode()))
            if outcome[1] is not None:
                headers.append((b"x-credits-remaining", str(from_units(outcome[1])).encode()))
        return {**start, "headers": headers}

    async def _send(self, message: Message, send: Send) -> None:
        kind = message["type"]
        if kind == "http.response.start":
            self.start = message
            return
        if self.start is not None:
            start, self.start = self.start, None
            if kind == "http.response.body" and message.get("more_body", False):
                await send(self._streaming_start(start))
            else:
                # The whole answer is here: settle first, so the headers carry the real charge.
                await send(self._with_figures(start, await self._settled()))
        if kind != "http.response.body":
            await send(message)
            return
        body = message.get("body", b"")
        if body:
            self.last_byte = body[-1:]
        if not self.streaming or message.get("more_body", False):
            await send(message)
            return
        # The end of a stream: settle, then the figure goes where the client can read it.
        outcome = await self._settled()
        if self.sse:
            tail = b"" if self.last_byte == b"\n" else b"\n"
            charged = "unconfirmed" if outcome is None else str(from_units(outcome[0]))
            tail += f": credits charged={charged}".encode()
            if outcome is not None and outcome[1] is not None:
                tail += f" remaining={from_units(outcome[1])}".encode()
            message = {**message, "body": body + tail + f" request_id={self.hold_id}\n\n".encode()}
        await send(message)
        if self.trailers:
            fields = []
            if outcome is not None:
                fields.append((b"x-credits-charged", str(from_units(outcome[0])).encode()))
                if outcome[1] is not None:
                    fields.append((b"x-credits-remaining", str(from_units(outcome[1])).encode()))
            await send({"type": "http.response.trailers", "headers": fields, "more_trailers": False})

    def _streaming_start(self, start: Message) -> Message:
        """The start of a streamed answer: its figure is not known yet, so no
        X-Credits-Charged; it follows in trailers (when the server and client support them)
        and, for text/event-stream, in a final SSE comment."""
        self.streaming = True
        headers = [*list(start.get("headers", [])), (b"x-request-id", self.hold_id.encode())]
        ctype = next((v for k, v in headers if k.lower() == b"content-type"), b"")
        self.sse = ctype.split(b";")[0].strip().lower() == b"text/event-stream"
        if not start.get("trailers") and _client_takes_trailers(self.scope):
            self.trailers = True
            headers.append((b"trailer", b"x-credits-charged, x-credits-remaining"))
            return {**start, "headers": headers, "trailers": True}
        return {**start, "headers": headers}


def _client_takes_trailers(scope: Scope) -> bool:
    """The server implements the ASGI trailers extension and the client said `TE: trailers`."""
    if "http.response.trailers" not in (scope.get("extensions") or {}):
        return False
    return any(k == b"te" and b"trailers" in v.lower() for k, v in scope.get("headers", ()))


def _header_user(scope: Scope) -> str | None:
    for k, v in scope.get("headers", ()):
        if k == b"x-user-id":
            return v.decode("latin-1")
    return None
