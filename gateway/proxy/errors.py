"""The proxy's refusals: a status and a message for each, in the upstream kind's own error
format (the adapter's body, built by gateway/http_errors.py), so client SDKs read them as
usual. Domain refusals get their HTTP status from http_errors.status_of."""

from __future__ import annotations

from typing import Any

import orjson
from starlette.responses import Response

from ..core.errors import (
    AccountInDebt,
    BacklogFull,
    CreditError,
    InsufficientCredits,
    ModelNotAllowed,
    RateLimited,
    StateLost,
)
from ..core.money import from_units, to_units
from ..core.pricing import ceil_div
from ..http_errors import status_of
from .kinds import Adapter


def proxy_error(
    kind: Adapter, status: int, code: str, message: str, headers: dict[str, str] | None = None, **extra: Any
) -> Response:
    body = kind.error_body(status, code, message, extra)
    return Response(orjson.dumps(body), status_code=status, media_type="application/json", headers=headers)


def reserve_refusal(kind: Adapter, exc: CreditError, rid: dict[str, str]) -> Response:
    """The answer to a hold the engine refused: the same on every route."""
    if isinstance(exc, RateLimited):
        return rate_limited(kind, exc, rid)
    if isinstance(exc, InsufficientCredits):
        available = to_units(exc.details.get("available", 0), allow_zero=True)
        return insufficient_credits(kind, rid, available)
    if isinstance(exc, AccountInDebt):
        message, headers = "the account owes credits; top up to continue", rid
    elif isinstance(exc, BacklogFull):
        # The worker is behind persisting this partition's events (the store is down or
        # slow): no new hold until it catches up; holds in flight still settle.
        message, headers = (
            "the gateway is behind persisting charges; retry shortly",
            {**rid, "Retry-After": "5"},
        )
    elif isinstance(exc, ModelNotAllowed):
        model = str(exc.details.get("model", ""))[:100]
        message, headers = f"the account's plan does not include the model {model!r}", rid
    elif isinstance(exc, StateLost):
        return state_lost(kind, rid)
    else:
        raise exc
    return proxy_error(kind, status_of(exc), exc.code, message, headers)


def insufficient_credits(kind: Adapter, rid: dict[str, str], available: int | None = None) -> Response:
    extra = {} if available is None else {"available": str(from_units(available))}
    return proxy_error(
        kind,
        status_of(InsufficientCredits()),
        "insufficient_credits",
        "not enough credits for this request",
        rid,
        **extra,
    )


def rate_limited(kind: Adapter, exc: RateLimited, rid: dict[str, str]) -> Response:
    limit, value, wait_ms = exc.details.get("limit"), exc.details.get("value"), exc.retry_after_ms
    if wait_ms < 0:  # this call alone is over the limit: waiting will not help
        return proxy_error(
            kind,
            status_of(exc),
            "request_too_large",
            f"this request's tokens exceed the {limit} limit ({value})",
            rid,
            limit=limit,
        )
    retry_after = str(max(1, ceil_div(wait_ms, 1000)))
    return proxy_error(
        kind,
        status_of(exc),
        exc.code,
        f"{limit} limit ({value}) reached; retry after {retry_after} s",
        {**rid, "Retry-After": retry_after},
        limit=limit,
    )


def state_lost(kind: Adapter, rid: dict[str, str]) -> Response:
    return proxy_error(
        kind,
        status_of(StateLost()),
        StateLost.code,
        "the credit store is rebuilding this account's state; retry",
        {**rid, "Retry-After": "1"},
    )


def unavailable(kind: Adapter, rid: dict[str, str]) -> Response:
    """Redis did not answer."""
    return proxy_error(
        kind,
        503,
        "credit_store_unavailable",
        "the credit store did not answer; retry shortly",
        {**rid, "Retry-After": "1"},
    )
