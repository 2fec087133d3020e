"""credit-management 0.7.1's library names over library mode: its middleware and addLlmUsage.

An app written for that package runs with its import lines changed:

    from gateway.library.compat import CreditMiddleware, addLlmUsage, credit_engine

    credits = credit_engine()
    app = FastAPI(lifespan=credits.lifespan)
    app.add_middleware(CreditMiddleware, engine=credits, path_prefix="/api",
                       user_id_header="X-User-Id", default_estimated_tokens=1000,
                       skip_paths=["/api/health"])

    @app.post("/api/chat")
    async def chat():
        addLlmUsage(model="gpt-4o", provider="openai", cost="0.0042", metadata={"chat": 1})

What its middleware did, kept: the reservation comes from the request's
`X-Estimated-Tokens` header (else `default_estimated_tokens`), priced at
`credits_per_1k_tokens`; a refusal for want of credit is 402 with `detail` and
`code: "INSUFFICIENT_CREDITS"` (beside the gateway's `error` object); the charge is in
`X-Credits-Deducted` (beside `X-Credits-Charged`). What changed on purpose: the charge is
what the handler recorded (settled against the hold, exactly, in micro-credits), never a
float, and concurrent requests cannot lose an update. docs/migrating-from-credit-management.md.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
from collections.abc import Awaitable, Callable, Generator, Iterable, Mapping
from decimal import ROUND_CEILING, Decimal
from typing import Any

import orjson
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..core.engine import CreditEngine
from ..core.money import MAX_UNITS, UNITS_PER_CREDIT, parse_amount
from ..core.pricing import PricingTable
from .middleware import CreditMiddleware as _Base
from .runtime import CreditRuntime, credit_engine
from .usage import UsageError, add_llm_usage

__all__ = [
    "CreditManagementMiddleware",
    "CreditMiddleware",
    "CreditRuntime",
    "UsageError",
    "addLlmUsage",
    "credit_engine",
]

MAX_ESTIMATED_TOKENS = 100_000_000
DOC_PATHS = ("/docs", "/redoc", "/openapi.json")
# Set per request: whether the app behind the middleware was entered (what was answered
# before that is the middleware's own refusal, which gets the old body).
_ENTERED: contextvars.ContextVar[list[bool] | None] = contextvars.ContextVar("cm_entered", default=None)


def _tokens(raw: str, name: str) -> int:
    if not raw.isascii() or not raw.isdigit() or int(raw) > MAX_ESTIMATED_TOKENS:
        raise ValueError(f"{name} is a whole number of tokens from 0 to {MAX_ESTIMATED_TOKENS}, not {raw!r}")
    return int(raw)


class CreditManagementMiddleware(_Base):
    """credit-management's middleware options over CreditMiddleware (every other option of
    CreditMiddleware is accepted too, e.g. `pricing`, `ttl_seconds`)."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        engine: CreditEngine | Callable[[], CreditEngine | None],
        path_prefix: str = "/",
        user_id_header: str = "X-User-Id",
        default_estimated_tokens: int = 1000,
        skip_paths: Iterable[str] = ("/health", "/docs", "/redoc", "/openapi.json"),
        credits_per_1k_tokens: Decimal | str | int = Decimal("1"),
        pricing: PricingTable | None = None,
        **options: Any,
    ) -> None:
        if isinstance(default_estimated_tokens, bool) or not isinstance(default_estimated_tokens, int):
            raise TypeError("default_estimated_tokens is an int")
        _tokens(str(default_estimated_tokens), "default_estimated_tokens")
        self.per_1k = parse_amount(credits_per_1k_tokens)
        if self.per_1k <= 0:
            raise ValueError("credits_per_1k_tokens must be positive")
        self.default_estimated_tokens = default_estimated_tokens
        header = user_id_header.lower().encode("latin-1")
        prefix = path_prefix.rstrip("*")
        # FastAPI's documentation routes are never metered, whatever skip_paths says.
        skips = (*(p.rstrip("*") for p in skip_paths), *DOC_PATHS)

        def user_of(scope: Scope) -> str | None:
            return next((v.decode("latin-1") for k, v in scope.get("headers", ()) if k == header), None)

        def metered(scope: Scope) -> bool:
            # As the old middleware: under the prefix, and not under any skip path (a prefix
            # too); CORS preflights carry no user.
            path = scope.get("path", "")
            return scope.get("method") != "OPTIONS" and path.startswith(prefix) and not path.startswith(skips)

        super().__init__(
            app,
            engine=engine,
            pricing=pricing,
            reserve_for=self._estimate,
            user_of=user_of,
            metered=metered,
            **options,
        )
        inner = self.app

        async def entered(scope: Scope, receive: Receive, send: Send) -> None:
            flag = _ENTERED.get()
            if flag is not None:
                flag.append(True)
            await inner(scope, receive, send)

        self.app = entered

    def _estimate(self, scope: Scope) -> Decimal:
        """The credits to hold: X-Estimated-Tokens (or the default) at credits_per_1k_tokens,
        rounded up to a micro-credit, at least one."""
        raw = next((v for k, v in scope.get("headers", ()) if k == b"x-estimated-tokens"), None)
        n = (
            self.default_estimated_tokens
            if raw is None
            else _tokens(raw.decode("latin-1"), "X-Estimated-Tokens")
        )
        units = (n * self.per_1k * UNITS_PER_CREDIT / 1000).to_integral_value(rounding=ROUND_CEILING)
        return Decimal(min(max(int(units), 1), MAX_UNITS)) / UNITS_PER_CREDIT

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await super().__call__(scope, receive, send)
            return
        flag: list[bool] = []
        token = _ENTERED.set(flag)
        start: Message | None = None

        async def send_old_style(message: Message) -> None:
            nonlocal start
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                charged = next((v for k, v in headers if k == b"x-credits-charged"), None)
                if charged is not None:
                    headers.append((b"x-credits-deducted", charged))
                message = {**message, "headers": headers}
                if not flag:  # the middleware's own refusal: its body gets the old fields
                    start = message
                    return
            elif message["type"] == "http.response.body" and start is not None:
                start, message = _old_refusal(start, message)
                await send(start)
                start = None
            await send(message)

        try:
            await super().__call__(scope, receive, send_old_style)
        finally:
            _ENTERED.reset(token)


def _old_refusal(start: Message, body: Message) -> tuple[Message, Message]:
    """Adds the old package's `detail` and `code` to a refusal's JSON body."""
    try:
        doc = orjson.loads(body.get("body", b""))
        error = doc["error"]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return start, body
    status = start["status"]
    code = "INSUFFICIENT_CREDITS" if status == 402 else str(error.get("code", "error")).upper()
    raw = orjson.dumps({"detail": error.get("message"), "code": code, **doc})
    headers = [(k, str(len(raw)).encode() if k == b"content-length" else v) for k, v in start["headers"]]
    return {**start, "headers": headers}, {**body, "body": raw}


CreditMiddleware = CreditManagementMiddleware  # the old package's name


class _Recorded:
    """What addLlmUsage answers: ignore it (as the old package's callers did), or await it
    (as its async callers did): None while the request has not settled, else the late
    debit's result."""

    def __init__(self, pending: Awaitable[Any] | None) -> None:
        self._pending = pending

    def __await__(self) -> Generator[Any, None, Any]:
        if self._pending is None:
            return None
        return (yield from _wait(self._pending).__await__())


async def _wait(pending: Any) -> Any:
    # A task on the request's loop, or a future when recorded from another thread.
    return await (asyncio.wrap_future(pending) if isinstance(pending, concurrent.futures.Future) else pending)


def addLlmUsage(
    *,
    model: str | None = None,
    provider: str | None = None,
    cost: Decimal | str | int | None = None,
    metadata: Mapping[str, Any] | None = None,
    input_tokens: int = 0,
    output_tokens: int = 0,
) -> _Recorded:
    """Records one LLM call of the current request: `cost` credits (a Decimal, a decimal
    string or an int; a float is refused with UsageError, as inexact), or, without a cost,
    the tokens priced by `model` from the middleware's pricing table. `provider` and
    `metadata` are kept with the call in the ledger."""
    if isinstance(cost, float):
        raise UsageError(
            f"cost={cost!r} is a float, which cannot hold credits exactly: pass a Decimal or a "
            f"decimal string, e.g. cost=Decimal({str(cost)!r}) or cost={str(cost)!r}"
        )
    if provider is not None and not isinstance(provider, str):
        raise UsageError(f"provider must be a string, not {type(provider).__name__}")
    if metadata is not None and not isinstance(metadata, Mapping):
        raise UsageError(f"metadata must be a mapping, not {type(metadata).__name__}")
    notes = {**({"provider": provider} if provider else {}), **(metadata or {})}
    return _Recorded(
        add_llm_usage(
            model=model,
            cost=cost,
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            metadata=notes or None,
        )
    )
