"""Named result codes of the Lua scripts, mapped to exceptions in one place.

These are domain refusals: they carry a code and details, never an HTTP status (the web
layers map them: gateway/http_errors.py)."""

from __future__ import annotations

from decimal import Decimal
from typing import Any, NoReturn

from .money import from_units


class CreditError(Exception):
    """An operation the engine refused. `code` is the script's named result."""

    code = "credit_error"

    def __init__(self, message: str = "", /, **details: Any) -> None:
        super().__init__(message or self.code.replace("_", " "))
        self.details = details


class InsufficientCredits(CreditError):
    code = "insufficient_credits"

    @property
    def available(self) -> Decimal:
        return self.details.get("available", Decimal(0))


class AccountInDebt(CreditError):
    code = "in_debt"


class HoldNotFound(CreditError):
    code = "hold_not_found"


class HoldExists(CreditError):
    code = "hold_exists"


class HoldAlreadySettled(CreditError):
    code = "already_settled"


class HoldAlreadyReleased(CreditError):
    code = "already_released"


class HoldExpired(CreditError):
    code = "hold_expired"


class OperationConflict(CreditError):
    """The operation id was used before with other fields."""

    code = "op_conflict"


class InvalidExpiry(CreditError):
    code = "invalid_expiry"


class InvalidAmount(CreditError):
    code = "invalid_amount"


class RateLimited(CreditError):
    """Over a requests- or tokens-per-minute limit. details: limit, value, retry_after_ms
    (-1: this call alone exceeds the limit and can never pass)."""

    code = "rate_limited"

    @property
    def retry_after_ms(self) -> int:
        return int(self.details.get("retry_after_ms", 0))


class ModelNotAllowed(CreditError):
    """The account's plan does not include the model asked for. details: model."""

    code = "model_not_allowed"


class BacklogFull(CreditError):
    """The account's partition stream holds as many events as the worker may fall behind
    by (CREDIT_MAX_BACKLOG): no new hold until it has persisted them; retry later.
    details: backlog, limit (entries)."""

    code = "backlog_full"


class StateLost(CreditError):
    """Redis lost this partition's data and it has not been rebuilt yet: retry later."""

    code = "state_lost"


_BY_CODE: dict[str, type[CreditError]] = {
    cls.code: cls
    for cls in (
        InsufficientCredits,
        AccountInDebt,
        HoldNotFound,
        HoldExists,
        HoldAlreadySettled,
        HoldAlreadyReleased,
        HoldExpired,
        OperationConflict,
        InvalidExpiry,
        InvalidAmount,
        RateLimited,
        StateLost,
        BacklogFull,
        ModelNotAllowed,
    )
}
_AMOUNT_FIELDS = {"available", "debt"}


def raise_for(code: str, payload: dict[str, Any]) -> NoReturn:
    """Raises the exception named by a script's result code."""
    cls = _BY_CODE.get(code)
    details = {k: (from_units(v) if k in _AMOUNT_FIELDS else v) for k, v in payload.items()}
    if cls is None:
        raise CreditError(f"unexpected script result {code!r}", **details)
    raise cls(**details)
