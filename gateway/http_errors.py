"""The HTTP form of a refusal: the status of each domain refusal, and the one JSON error body.

Three surfaces answer refusals over HTTP: the admin/client API (gateway/api/errors.py), the
metering proxy (gateway/proxy/errors.py, in each upstream kind's own format) and the
library middleware (gateway/library/middleware.py). They share this module so that a refusal has one
status wherever it is answered, and every body is built the same way:

    {**envelope, "error": {"code": ..., "message": ..., **details, **fields}}

`details` describe the refusal (amounts, limits); `fields` are the format's own keys (an
upstream's error "type"), which details never replace; `envelope` holds the keys a format
puts beside "error" (Anthropic's "type": "error").
"""

from __future__ import annotations

from collections.abc import Mapping
from decimal import Decimal
from typing import Any

from .core.errors import (
    AccountInDebt,
    BacklogFull,
    CreditError,
    HoldAlreadyReleased,
    HoldAlreadySettled,
    HoldExists,
    HoldExpired,
    HoldNotFound,
    InsufficientCredits,
    InvalidAmount,
    InvalidExpiry,
    ModelNotAllowed,
    OperationConflict,
    RateLimited,
    StateLost,
)

# The HTTP status of each domain refusal; a subclass takes its nearest listed ancestor's.
CREDIT_STATUS: dict[type[CreditError], int] = {
    CreditError: 400,
    InsufficientCredits: 402,
    AccountInDebt: 402,
    HoldNotFound: 404,
    HoldExists: 409,
    HoldAlreadySettled: 409,
    HoldAlreadyReleased: 409,
    HoldExpired: 409,
    OperationConflict: 422,
    InvalidExpiry: 400,
    InvalidAmount: 422,
    RateLimited: 429,
    ModelNotAllowed: 403,
    BacklogFull: 503,
    StateLost: 503,
}

# Details that must not replace the body's own keys, and the script detail renamed so it
# is not read as the HTTP status (already_settled & co. carry the hold's status).
_RESERVED = frozenset({"code", "message"})
_RENAMED = {"status": "hold_status"}


def status_of(exc: CreditError) -> int:
    """The HTTP status that answers `exc`."""
    for cls in type(exc).__mro__:
        if issubclass(cls, CreditError) and cls in CREDIT_STATUS:
            return CREDIT_STATUS[cls]
    return CREDIT_STATUS[CreditError]


def error_body(
    code: str,
    message: str,
    details: Mapping[str, Any] | None = None,
    *,
    fields: Mapping[str, Any] | None = None,
    envelope: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The JSON error body (see the module's docstring). Decimal details are written as
    strings: money is never a JSON float."""
    error: dict[str, Any] = {"code": code, "message": message}
    for k, v in (details or {}).items():
        k = _RENAMED.get(k, k)
        if k not in _RESERVED:
            error[k] = str(v) if isinstance(v, Decimal) else v
    if fields:
        error.update(fields)
    return {**envelope, "error": error} if envelope else {"error": error}
