"""Request and response bodies. Amounts: Decimal credits, sent as strings in answers."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from decimal import Decimal
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, PlainSerializer, Strict
from pydantic_core import PydanticCustomError

from ..core.engine import grant_expiry_ms
from ..core.errors import InvalidExpiry
from ..core.keys import ID_PATTERN
from ..core.money import AmountError, from_units, to_units
from ..core.results import AccountState

# Amounts: an int, a JSON number (read as an exact Decimal by body.DecimalRoute, never a
# float) or a string of plain ASCII decimal notation (gateway/core/money.py). Booleans and
# floats are refused. A refusal has the error type "invalid_amount" (the API's code).
AMOUNT_HELP = 'credits as a decimal string ("1.25") or a JSON number; at most 6 decimal places'


def _amount(allow_zero: bool):
    def check(v: Any) -> Decimal:
        try:
            return from_units(to_units(v, allow_zero=allow_zero))
        except AmountError as exc:
            raise PydanticCustomError("invalid_amount", "{reason}", {"reason": str(exc)}) from None

    return BeforeValidator(check)


_ser = PlainSerializer(lambda d: str(d), return_type=str, when_used="json")
Credits = Annotated[Decimal, _amount(False), _ser, Field(description=f"{AMOUNT_HELP}; > 0")]
CreditsOrZero = Annotated[Decimal, _amount(True), _ser, Field(description=f"{AMOUNT_HELP}; >= 0")]
Money = Annotated[Decimal, _ser]
# The one id rule (gateway/core/keys.py), for ids in bodies; path parameters use it too.
Ident = Annotated[str, Field(pattern=ID_PATTERN.pattern)]
# Counts are JSON integers: never a string ("1_000", " 1 "), a boolean or a float.
Count = Annotated[int, Strict()]


def _ascii_digits(v: Any) -> Any:
    if isinstance(v, str) and not re.fullmatch(r"[0-9]{1,18}", v, re.ASCII):
        raise PydanticCustomError("int_parsing", "must be a whole number in ASCII digits")
    return v


# A count in a query string (always text): ASCII digits only, then read as an int.
QueryCount = Annotated[int, BeforeValidator(_ascii_digits)]


def _expiry(v: Any) -> Any:
    """expires_at: an ISO 8601 date-time with a timezone, within what the scripts can store.
    Whether it is in the past is checked when the grant is made (a retry still replays).
    A number is refused: a Unix time in seconds and one in milliseconds look alike."""
    if v is None:
        return None
    if not isinstance(v, str):
        raise PydanticCustomError(
            "invalid_expiry", "expires_at must be an ISO 8601 date-time string with a timezone"
        )
    try:
        dt = datetime.fromisoformat(v)
    except ValueError:
        raise PydanticCustomError(
            "invalid_expiry", "expires_at is not an ISO 8601 date-time (e.g. 2030-01-01T00:00:00Z)"
        ) from None
    if dt.tzinfo is None:
        raise PydanticCustomError("invalid_expiry", "expires_at needs a timezone (e.g. 2030-01-01T00:00:00Z)")
    try:
        grant_expiry_ms(dt)  # the engine's own range check: not at/before 1970, not past 2248
    except (InvalidExpiry, ValueError) as exc:
        raise PydanticCustomError("invalid_expiry", "{reason}", {"reason": str(exc)}) from None
    return dt


Expiry = Annotated[datetime | None, BeforeValidator(_expiry)]


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class GrantRequest(Body):
    amount: Credits
    source: Literal["payment", "plan", "promo", "admin", "refund"] = "admin"
    expires_at: Expiry = Field(None, description="ISO 8601 with a timezone, in the future; none = never")
    priority: Count = Field(
        100, ge=0, le=1000, description="lower is spent first among grants expiring together"
    )
    description: str | None = Field(None, max_length=500)


class DebitRequest(Body):
    amount: Credits
    description: str | None = Field(None, max_length=500)


class HoldRequest(Body):
    amount: Credits
    ttl_seconds: Count = Field(300, ge=1, description="the hold expires (is released) after this")
    hold_id: Ident | None = None
    description: str | None = Field(None, max_length=500)


class SettleRequest(Body):
    amount: CreditsOrZero
    description: str | None = Field(None, max_length=500)


class Balance(BaseModel):
    user_id: str
    available: Money
    held: Money
    debt: Money
    version: int

    @classmethod
    def of(cls, user: str, s: AccountState) -> Balance:
        return cls(user_id=user, available=s.available, held=s.held, debt=s.debt, version=s.version)


class GrantResponse(Balance):
    grant_id: str
    grant_seq: str
    amount: Money
    debt_repaid: Money
    expires_at: datetime | None
    replayed: bool


class DebitResponse(Balance):
    debit_id: str
    amount: Money
    replayed: bool


class HoldResponse(Balance):
    hold_id: str
    amount: Money
    expires_at: datetime
    replayed: bool


class ResolutionResponse(Balance):
    hold_id: str
    status: str
    charged: Money
    returned: Money
    lapsed: Money
    debt_added: Money
    debt_repaid: Money
    replayed: bool


class GrantOut(BaseModel):
    seq: str
    grant_id: str
    source: str
    amount: Money
    remaining: Money
    held: Money
    priority: int
    expires_at: datetime | None
    expired: bool
    granted_at: datetime | None
    description: str | None = None


class ExpiringGrant(BaseModel):
    grant_id: str
    source: str
    remaining: Money
    held: Money  # expires only if the hold on it is released or expires after this date
    expires_at: datetime


class Expiring(BaseModel):
    """Credit that expires within the next `days` days, soonest first."""

    days: int
    until: datetime
    total: Money  # the free credit among it (held credit is counted apart)
    held: Money
    grants: list[ExpiringGrant]

    @classmethod
    def of(cls, grants: list[Any], now_ms: int, days: int) -> Expiring:
        until = datetime.fromtimestamp(now_ms / 1000 + days * 86400, UTC)
        due = sorted(
            (g for g in grants if g.expires_at is not None and not g.expired and g.expires_at <= until),
            key=lambda g: g.expires_at,
        )
        return cls(
            days=days,
            until=until,
            total=sum((g.free for g in due), Decimal("0.000000")),
            held=sum((g.earmarked for g in due), Decimal("0.000000")),
            grants=[
                ExpiringGrant(
                    grant_id=g.grant_id,
                    source=g.source,
                    remaining=g.free,
                    held=g.earmarked,
                    expires_at=g.expires_at,
                )
                for g in due
            ],
        )


class HoldOut(BaseModel):
    hold_id: str
    amount: Money
    expires_at: datetime | None


class AccountResponse(Balance):
    granted: Money
    spent: Money
    expired: Money
    grants: list[GrantOut]
    holds: list[HoldOut]
    expiring: Expiring


class LedgerItem(BaseModel):
    op_id: str
    type: str
    version: int
    at: datetime
    amount: Money
    hold_id: str | None
    available: Money
    held: Money
    debt: Money
    details: dict[str, Any]


class LedgerPage(BaseModel):
    user_id: str
    entries: list[LedgerItem]
    next_cursor: str | None
