"""Library mode: metering inside an app that calls LLMs itself. Guide: docs/library.md.

    credits = credit_engine(Settings())            # opened by the app's lifespan
    app = FastAPI(lifespan=credits.lifespan)
    app.add_middleware(CreditMiddleware, engine=credits, pricing=table, reserve="0.5")

    @app.post("/summarise")
    async def summarise(...):
        reply = await my_llm_call(...)
        add_llm_usage(model="gpt-4o", input_tokens=reply.in_tokens, output_tokens=reply.out_tokens)

Per metered request the middleware reserves `reserve` credits for the request's user,
runs the handler, and settles what `add_llm_usage` recorded as soon as the response body
is complete (a whole response: before its headers leave, so X-Credits-Charged is the
confirmed charge; a streamed one: when the stream ends, the figure then goes in HTTP
trailers or a final SSE comment). Usage recorded after that (background tasks, tasks
still running) is charged as a debit of its own under the same request id; what free
credit cannot cover becomes debt, never dropped. Settles and late debits go through
gateway/core/settlement.py: retried under the same operation id when Redis falters.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import contextvars
import logging
import threading
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterable
from contextlib import asynccontextmanager
from decimal import Decimal
from typing import Any

import orjson
from redis.exceptions import RedisError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .core.engine import CreditEngine
from .core.errors import AccountInDebt, BacklogFull, CreditError, InsufficientCredits, StateLost
from .core.keys import LIBRARY_HOLD_PREFIX, InvalidId, check_id
from .core.money import AmountError, from_units, to_units
from .core.pricing import PricingTable, Usage
from .core.results import DebitResult
from .core.settings import Settings, settings_from_env
from .core.settlement import Settler
from .http_errors import error_body, status_of

log = logging.getLogger("credit.library")

# Never metered unless `paths` / `skip_paths` / `metered` say otherwise: FastAPI's own
# documentation routes and health checks. A trailing * matches any path with that prefix.
DEFAULT_SKIP_PATHS: tuple[str, ...] = ("/docs", "/docs/*", "/redoc", "/openapi.json", "/health*")
# CORS preflights carry no credentials and no user.
DEFAULT_SKIP_METHODS: tuple[str, ...] = ("OPTIONS",)
MAX_CALLS_KEPT = 50  # calls listed in the settle's ledger metadata (the count is always there)


class NoMeteredRequest(RuntimeError):
    """add_llm_usage was called outside a request the CreditMiddleware meters."""


class UsageError(ValueError):
    """add_llm_usage got usage it cannot charge (a model without a price, a float cost,
    a negative token count...). Raised at the call; nothing was recorded."""


# -- the engine, ready to use ------------------------------------------------------------


def credit_engine(settings: Settings | None = None, *, run_worker: bool | None = None) -> CreditRuntime:
    """A CreditEngine for the Redis and store `settings` name (default: Settings(), read
    from the CREDIT_* environment), opened on entry and closed on exit:

        async with credit_engine(Settings()) as engine: ...

    or, in an app, handed to the middleware before it starts (it is callable: the engine
    while open, else None) and opened by the app's lifespan:

        credits = credit_engine()
        app = FastAPI(lifespan=credits.lifespan)
        app.add_middleware(CreditMiddleware, engine=credits, ...)

    Opening builds the Redis client as the gateway does (a blocking pool; script calls
    over the multiplexed client when Redis is a single redis:// server), opens the store,
    and rebuilds from the store any partition Redis lost, or marks a fresh Redis's
    partitions ready (without that every call answers state_lost). With `run_worker`
    (default: only in embedded mode, i.e. no CREDIT_REDIS_URL) the worker that persists
    events to the store runs in this process and drains what is left on exit; otherwise
    run `credit-gateway worker` next to the app, on the same settings.
    """
    return CreditRuntime(settings if settings is not None else settings_from_env(), run_worker=run_worker)


class CreditRuntime:
    """An engine with the clients and store it runs on (see credit_engine)."""

    def __init__(self, settings: Settings, *, run_worker: bool | None = None) -> None:
        self.settings = settings
        self.run_worker = settings.embedded if run_worker is None else run_worker
        self._engine: CreditEngine | None = None
        self._stack: contextlib.AsyncExitStack | None = None

    def __call__(self) -> CreditEngine | None:
        """The engine while open, else None (what CreditMiddleware asks per request)."""
        return self._engine

    @property
    def engine(self) -> CreditEngine:
        if self._engine is None:
            raise RuntimeError("the credit engine is not open: `async with` it, or use its lifespan")
        return self._engine

    async def open(self) -> CreditEngine:
        from .core.connections import make_engine, make_redis, make_script_client, make_store
        from .core.recovery import ensure_ready

        if self._stack is not None:
            raise RuntimeError("the credit engine is open already")
        settings = self.settings
        stack = contextlib.AsyncExitStack()
        try:
            redis = make_redis(settings)
            stack.push_async_callback(redis.aclose)
            mux = make_script_client(settings)
            if mux is not None:
                stack.push_async_callback(mux.aclose)
            store = make_store(settings)
            await store.open()
            stack.push_async_callback(store.close)
            engine = make_engine(settings, redis, script_redis=mux)
            await ensure_ready(engine, store)
            if self.run_worker:
                await stack.enter_async_context(_worker(settings, engine, store))
        except BaseException:
            await stack.aclose()
            raise
        self._stack, self._engine = stack, engine
        return engine

    async def close(self) -> None:
        stack, self._stack, self._engine = self._stack, None, None
        if stack is not None:
            await stack.aclose()

    async def __aenter__(self) -> CreditEngine:
        return await self.open()

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    @asynccontextmanager
    async def lifespan(self, app: Any) -> AsyncIterator[None]:
        """For FastAPI(lifespan=...) / Starlette(lifespan=...): open while the app runs."""
        async with self:
            yield


@asynccontextmanager
async def _worker(settings: Settings, engine: CreditEngine, store: Any) -> AsyncIterator[None]:
    # mypy does not follow pyproject's package-dir (worker/ installs as gateway.worker).
    from gateway.worker.service import build_worker  # type: ignore[import-not-found]

    worker = build_worker(settings, engine, store)
    task = asyncio.create_task(worker.run(), name="credit-worker")
    try:
        yield
    finally:
        worker.stop()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, 30)
        if worker.audit:
            worker.audit.close()
        # What was appended after the worker's last read (an in-process Redis is gone
        # after this): one more pass until every stream is drained.
        last = build_worker(settings, engine, store)
        try:
            await asyncio.wait_for(last.run(burst=True), 30)
        except Exception:
            log.exception("the final drain of the in-process worker failed")
        finally:
            if last.audit:
                last.audit.close()


# -- recording usage ---------------------------------------------------------------------

_METER: contextvars.ContextVar[RequestMeter | None] = contextvars.ContextVar("credit_meter", default=None)


def add_llm_usage(
    *,
    model: str | None = None,
    input_tokens: int = 0,
    output_tokens: int = 0,
    cached_input_tokens: int = 0,
    cost: Decimal | str | int | None = None,
) -> Any:
    """Records one LLM call of the current request: its token usage, priced by `model` in
    the middleware's pricing table, or its `cost` in credits (Decimal or decimal string;
    then the tokens are only noted). Works from the handler, from tasks it spawned, from
    FastAPI background tasks and from threads the handler's context was copied to.

    Raises UsageError (a ValueError) at once, recording nothing, when the usage cannot be
    charged, and NoMeteredRequest outside a metered request. Returns None while the
    request has not settled; after that the usage is charged as a debit of its own, and
    the return value is an awaitable of its DebitResult (None if Redis has not confirmed
    it yet: it is retried in the background). Awaiting it is optional.
    """
    meter: RequestMeter | None = _METER.get()
    if meter is None:
        raise NoMeteredRequest("add_llm_usage() outside a request metered by CreditMiddleware")
    for name, n in (
        ("input_tokens", input_tokens),
        ("output_tokens", output_tokens),
        ("cached_input_tokens", cached_input_tokens),
    ):
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise UsageError(f"{name} must be a non-negative int, not {n!r}")
    if cached_input_tokens > input_tokens:
        raise UsageError("cached_input_tokens is part of input_tokens and cannot exceed it")
    if model is not None and not isinstance(model, str):
        raise UsageError(f"model must be a string, not {type(model).__name__}")
    units = meter.cost_of(model, input_tokens, output_tokens, cached_input_tokens, cost)
    call = {
        "model": model,
        "input": input_tokens,
        "output": output_tokens,
        "cached_input": cached_input_tokens,
        "units": units,
    }
    return meter.record(units, call)


class RequestMeter:
    """The usage of one metered request, in micro-credits, until it settles."""

    def __init__(self, settler: Settler, pricing: PricingTable | None, user: str, hold_id: str) -> None:
        self.settler = settler
        self.pricing = pricing
        self.user = user
        self.hold_id = hold_id
        self.units = 0
        self.calls: list[dict[str, Any]] = []
        self.n_calls = 0
        self.settled = False
        self.loop = asyncio.get_running_loop()
        # add_llm_usage may run in a worker thread (a sync handler or background task).
        self._lock = threading.Lock()
        self._late = 0

    def cost_of(
        self,
        model: str | None,
        input_tokens: int,
        output_tokens: int,
        cached_input_tokens: int,
        cost: Decimal | str | int | None,
    ) -> int:
        if cost is not None:
            if isinstance(cost, (float, bool)):
                raise UsageError(
                    "cost must be a Decimal or a decimal string (e.g. '0.002'), not a "
                    f"{type(cost).__name__}: a float cannot hold credits exactly"
                )
            try:
                return to_units(cost, allow_zero=True)
            except AmountError as exc:
                raise UsageError(f"cost {cost!r}: {exc}") from exc
        if self.pricing is None:
            raise UsageError("no pricing table was given to CreditMiddleware: pass cost=... instead")
        price = self.pricing.price_of(model)
        if price is None:
            raise UsageError(
                f"model {model!r} has no price (and the table has no default): "
                "add it to the pricing table or pass cost=..."
            )
        return price.cost(Usage(input=input_tokens, output=output_tokens, cached_input=cached_input_tokens))

    def record(
        self, units: int, call: dict[str, Any]
    ) -> asyncio.Task[DebitResult | None] | concurrent.futures.Future[DebitResult | None] | None:
        """None while the request has not settled; after that the late debit's task (on the
        request's loop) or future (from another thread)."""
        with self._lock:
            if not self.settled:
                self.units += units
                self.n_calls += 1
                if len(self.calls) < MAX_CALLS_KEPT:
                    self.calls.append(call)
                return None
            self._late += 1
            n = self._late
        coro = self._charge_late(units, call, n)
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self.loop:
            return self.settler.spawn(coro)
        return asyncio.run_coroutine_threadsafe(self._spawned(coro), self.loop)

    def close(self) -> tuple[int, list[dict[str, Any]], int]:
        """Ends recording for the settle: (units, calls kept, number of calls). Usage
        recorded from now on is late."""
        with self._lock:
            self.settled = True
            return self.units, list(self.calls), self.n_calls

    async def _spawned(self, coro: Coroutine[Any, Any, DebitResult | None]) -> DebitResult | None:
        return await self.settler.spawn(coro)

    async def _charge_late(self, units: int, call: dict[str, Any], n: int) -> DebitResult | None:
        """Usage recorded after the request settled: a debit of its own (free credit first,
        the rest as debt), never dropped."""
        try:
            return await self.settler.debit(
                self.user,
                units,
                op_id=f"{self.hold_id}-late-{n}",
                allow_debt=True,
                metadata={"request_id": self.hold_id, "late": True, **call},
            )
        except CreditError as exc:
            log.error(
                "late usage of %s for %s (%d micro-credits) refused: %s %s",
                self.hold_id,
                self.user,
                units,
                exc.code,
                exc.details,
            )
            return None


# -- the middleware ----------------------------------------------------------------------


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
        settler = self.settler_for(engine)
        hold_id = f"{LIBRARY_HOLD_PREFIX}{uuid.uuid4().hex}"
        expires_at_ms = await self._reserve(engine, settler, user, hold_id)
        if not isinstance(expires_at_ms, int):
            for m in expires_at_ms:
                await send(m)
            return
        await _MeteredRequest(self, settler, user, hold_id, expires_at_ms, scope).run(receive, send)

    async def _reserve(
        self, engine: CreditEngine, settler: Settler, user: str, hold_id: str
    ) -> int | tuple[Message, Message]:
        """The hold's deadline (ms), or the refusal to send."""
        try:
            hold = await engine.reserve_units(
                user, self.reserve_units, hold_id=hold_id, ttl_seconds=self.ttl_seconds
            )
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
        token = _METER.set(self.meter)
        failed = True
        try:
            await self.mw.app(self.scope, receive, lambda m: self._send(m, send))
            failed = False
        finally:
            _METER.reset(token)
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
