"""Recording usage: what add_llm_usage charges, held per metered request until it settles.

Usage recorded while the request runs adds up on its RequestMeter and is settled with the
request; usage recorded after that is charged at once as a debit of its own (free credit
first, the rest as debt), never dropped.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import logging
import threading
from collections.abc import Coroutine, Iterator, Mapping
from contextlib import contextmanager
from decimal import Decimal
from typing import Any

from ..core.errors import CreditError
from ..core.money import AmountError, to_units
from ..core.pricing import PricingTable, Usage
from ..core.results import DebitResult
from ..core.settlement import Settler

log = logging.getLogger("credit.library")

MAX_CALLS_KEPT = 50  # calls listed in the settle's ledger metadata (the count is always there)


class NoMeteredRequest(RuntimeError):
    """add_llm_usage was called outside a request the CreditMiddleware meters."""


class UsageError(ValueError):
    """add_llm_usage got usage it cannot charge (a model without a price, a float cost,
    a negative token count...). Raised at the call; nothing was recorded."""


_METER: contextvars.ContextVar[RequestMeter | None] = contextvars.ContextVar("credit_meter", default=None)


@contextmanager
def recording_into(meter: RequestMeter) -> Iterator[None]:
    """add_llm_usage records into `meter` inside this block (and in the tasks, background
    tasks and threads that copy its context)."""
    token = _METER.set(meter)
    try:
        yield
    finally:
        _METER.reset(token)


def add_llm_usage(
    *,
    model: str | None = None,
    input_tokens: int = 0,
    output_tokens: int = 0,
    cached_input_tokens: int = 0,
    cost: Decimal | str | int | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> Any:
    """Records one LLM call of the current request: its token usage, priced by `model` in
    the middleware's pricing table, or its `cost` in credits (Decimal or decimal string;
    then the tokens are only noted). `metadata` (a mapping) is kept with the call in the
    ledger. Works from the handler, from tasks it spawned, from
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
    if metadata is not None and not isinstance(metadata, Mapping):
        raise UsageError(f"metadata must be a mapping, not {type(metadata).__name__}")
    units = meter.cost_of(model, input_tokens, output_tokens, cached_input_tokens, cost)
    call: dict[str, Any] = {
        "model": model,
        "input": input_tokens,
        "output": output_tokens,
        "cached_input": cached_input_tokens,
        "units": units,
    }
    if metadata:
        call["metadata"] = dict(metadata)
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
