"""Library mode: metering inside an app that calls LLMs itself (the seed project's way).

    app.add_middleware(CreditMiddleware, engine=engine, pricing=table, reserve=Decimal("0.5"))

    @app.post("/summarise")
    async def summarise(...):
        reply = await my_llm_call(...)
        add_llm_usage(model="gpt-4o", input_tokens=reply.in_tokens, output_tokens=reply.out_tokens)

The middleware reserves `reserve` credits for the request's user (the `X-User-Id` header by
default) before the handler runs, answers 402 when they cannot be held, and settles the
usage recorded during the request when the handler is done (X-Credits-Charged on the
answer when it was not sent yet). `add_llm_usage` works from the handler and from tasks it
spawns (they share the request's context); usage recorded after the request settled is
charged at once as a debit of its own, so it is never lost.
"""

from __future__ import annotations

import contextvars
import logging
import uuid
from decimal import Decimal
from typing import Any, Callable

import orjson
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .core.engine import CreditEngine
from .core.errors import AccountInDebt, CreditError, InsufficientCredits
from .core.keys import InvalidId, check_id
from .core.money import from_units, to_units
from .core.pricing import PricingTable, Usage

log = logging.getLogger("credit.library")

_METER: contextvars.ContextVar[RequestMeter | None] = contextvars.ContextVar("credit_meter", default=None)


class NoMeteredRequest(RuntimeError):
    """add_llm_usage was called outside a request the CreditMiddleware meters."""


class RequestMeter:
    """The usage of one request, in micro-credits."""

    def __init__(self, engine: CreditEngine, pricing: PricingTable | None, user: str, hold_id: str) -> None:
        self.engine = engine
        self.pricing = pricing
        self.user = user
        self.hold_id = hold_id
        self.units = 0
        self.calls: list[dict[str, Any]] = []
        self.settled = False
        self._late = 0

    def cost_of(self, model: str | None, input_tokens: int, output_tokens: int, cached_input_tokens: int,
                cost: Decimal | str | None) -> int:
        if cost is not None:
            return to_units(cost, allow_zero=True)
        price = self.pricing.price_of(model) if self.pricing else None
        if price is None:
            raise ValueError(f"no price for model {model!r}: pass cost=... or configure its price")
        return price.cost(Usage(input=input_tokens, output=output_tokens, cached_input=cached_input_tokens))

    async def charge_late(self, units: int, call: dict[str, Any]) -> None:
        """Usage recorded after the request settled: its own debit, never dropped silently."""
        self._late += 1
        try:
            await self.engine.debit(self.user, from_units(units), op_id=f"{self.hold_id}-late-{self._late}",
                                    metadata={"request_id": self.hold_id, **call})
        except CreditError as exc:
            log.error("late usage of %s for %s could not be charged: %s", self.hold_id, self.user, exc.code)
            raise


def add_llm_usage(*, model: str | None = None, input_tokens: int = 0, output_tokens: int = 0,
                  cached_input_tokens: int = 0, cost: Decimal | str | None = None) -> Any:
    """Records an LLM call's usage (priced by model) or its `cost` in credits for the current
    request. Returns None, or, after the request already settled, an awaitable that charges
    the late usage (await it, or it is scheduled on the running loop)."""
    meter = _METER.get()
    if meter is None:
        raise NoMeteredRequest("add_llm_usage() outside a request metered by CreditMiddleware")
    for n in (input_tokens, output_tokens, cached_input_tokens):
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise ValueError("token counts must be non-negative integers")
    units = meter.cost_of(model, input_tokens, output_tokens, cached_input_tokens, cost)
    call = {"model": model, "input": input_tokens, "output": output_tokens, "cached_input": cached_input_tokens,
            "units": units}
    if not meter.settled:
        meter.units += units
        meter.calls.append(call)
        return None
    import asyncio

    return asyncio.ensure_future(meter.charge_late(units, call))


def _json(status: int, body: dict) -> tuple[Message, Message]:
    raw = orjson.dumps(body)
    return ({"type": "http.response.start", "status": status,
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())]},
            {"type": "http.response.body", "body": raw})


class CreditMiddleware:
    """ASGI middleware: reserve on entry, settle the recorded usage on exit."""

    def __init__(self, app: ASGIApp, *, engine: CreditEngine, pricing: PricingTable | None = None,
                 reserve: Decimal | str = Decimal("1"), ttl_seconds: float = 300,
                 user_of: Callable[[Scope], str | None] | None = None,
                 metered: Callable[[Scope], bool] | None = None) -> None:
        self.app = app
        self.engine = engine
        self.pricing = pricing
        self.reserve_units = to_units(reserve)
        self.ttl_seconds = ttl_seconds
        self.user_of = user_of or _header_user
        self.metered = metered or (lambda scope: True)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.metered(scope):
            await self.app(scope, receive, send)
            return
        user = self.user_of(scope)
        try:
            user = check_id("user", user) if user else None
        except InvalidId:
            user = None
        if user is None:
            for m in _json(401, {"detail": "X-User-Id is required", "code": "MISSING_USER"}):
                await send(m)
            return
        hold_id = f"lib-{uuid.uuid4().hex}"
        try:
            await self.engine.reserve_units(user, self.reserve_units, hold_id=hold_id, ttl_seconds=self.ttl_seconds)
        except (InsufficientCredits, AccountInDebt) as exc:
            for m in _json(402, {"detail": "insufficient credits", "code": "INSUFFICIENT_CREDITS",
                                 "reason": exc.code}):
                await send(m)
            return
        meter = RequestMeter(self.engine, self.pricing, user, hold_id)
        token = _METER.set(meter)
        started = {"sent": False}

        async def send_with_charge(message: Message) -> None:
            if message["type"] == "http.response.start" and not started["sent"]:
                started["sent"] = True
                message = dict(message)
                message["headers"] = list(message.get("headers", [])) + [
                    (b"x-request-id", hold_id.encode()),
                    (b"x-credits-charged", str(from_units(meter.units)).encode()),
                ]
            await send(message)

        failed = True
        try:
            await self.app(scope, receive, send_with_charge)
            failed = False
        finally:
            _METER.reset(token)
            meter.settled = True
            meta = {"request_id": hold_id, "calls": meter.calls[:50], "path": scope.get("path")}
            try:
                if meter.units or not failed:
                    await self.engine.settle_units(user, hold_id, meter.units, metadata=meta)
                else:
                    await self.engine.release(user, hold_id, metadata=meta)
            except CreditError as exc:
                log.error("settling %s for %s failed: %s", hold_id, user, exc.code)


def _header_user(scope: Scope) -> str | None:
    for k, v in scope.get("headers", ()):
        if k == b"x-user-id":
            return v.decode("latin-1")
    return None
