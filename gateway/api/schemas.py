"""Request and response bodies. Amounts: Decimal credits, sent as strings in answers."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, PlainSerializer

from ..core.money import from_units, to_units
from ..core.results import AccountState


def _no_float(v: Any) -> Any:
    if isinstance(v, float) or isinstance(v, bool):
        raise ValueError("amounts must be decimal strings or JSON numbers, not floats")
    return v


def _positive(v: Decimal) -> Decimal:
    return from_units(to_units(v))


def _non_negative(v: Decimal) -> Decimal:
    return from_units(to_units(v, allow_zero=True))


_ser = PlainSerializer(lambda d: str(d), return_type=str, when_used="json")
Credits = Annotated[Decimal, BeforeValidator(_no_float), AfterValidator(_positive), _ser,
                    Field(description="credits, > 0, at most 6 decimal places (a string is safest)")]
CreditsOrZero = Annotated[Decimal, BeforeValidator(_no_float), AfterValidator(_non_negative), _ser,
                          Field(description="credits, >= 0, at most 6 decimal places")]
Money = Annotated[Decimal, _ser]
Ident = Annotated[str, Field(pattern=r"^[A-Za-z0-9_.:@+=/~-]{1,128}$")]


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class GrantRequest(Body):
    amount: Credits
    source: Literal["payment", "plan", "promo", "admin", "refund"] = "admin"
    expires_at: datetime | None = Field(None, description="ISO 8601 with a timezone; none = never")
    priority: int = Field(100, ge=0, le=1000, description="lower is spent first among grants expiring together")
    description: str | None = Field(None, max_length=500)


class DebitRequest(Body):
    amount: Credits
    description: str | None = Field(None, max_length=500)


class HoldRequest(Body):
    amount: Credits
    ttl_seconds: int = Field(300, ge=1, description="the hold expires (is released) after this")
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
