"""Typed answers of the engine. Amounts are Decimal credits; times are aware datetimes."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from decimal import Decimal
from typing import Any

from .money import from_units


def ms_to_dt(ms: int | str | None) -> datetime | None:
    ms = int(ms or 0)
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc) if ms else None


@dataclass(frozen=True, slots=True)
class AccountState:
    """An account's totals right after an operation (or at a read)."""

    version: int
    available: Decimal
    held: Decimal
    debt: Decimal
    granted: Decimal
    spent: Decimal
    expired: Decimal

    @classmethod
    def from_wire(cls, s: dict[str, Any]) -> AccountState:
        return cls(
            version=int(s.get("v", 0)),
            available=from_units(s.get("available", 0)),
            held=from_units(s.get("held", 0)),
            debt=from_units(s.get("debt", 0)),
            granted=from_units(s.get("granted", 0)),
            spent=from_units(s.get("spent", 0)),
            expired=from_units(s.get("expired", 0)),
        )


@dataclass(frozen=True, slots=True)
class GrantResult:
    grant_seq: str
    amount: Decimal
    debt_repaid: Decimal
    expires_at: datetime | None
    state: AccountState
    replayed: bool = False


@dataclass(frozen=True, slots=True)
class Hold:
    hold_id: str
    amount: Decimal
    amount_units: int
    expires_at: datetime
    state: AccountState
    replayed: bool = False


@dataclass(frozen=True, slots=True)
class HoldResolution:
    """The answer of settle or release: what was charged, returned, lapsed, owed."""

    hold_id: str
    status: str
    charged: Decimal
    charged_units: int
    held_amount: Decimal
    returned: Decimal
    lapsed: Decimal
    debt_added: Decimal
    state: AccountState
    replayed: bool = False


@dataclass(frozen=True, slots=True)
class DebitResult:
    amount: Decimal
    state: AccountState
    replayed: bool = False


@dataclass(frozen=True, slots=True)
class GrantView:
    seq: str
    grant_id: str
    source: str
    amount: Decimal
    free: Decimal
    earmarked: Decimal
    priority: int
    expires_at: datetime | None
    expired: bool
    granted_at: datetime | None
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class HoldView:
    hold_id: str
    amount: Decimal
    expires_at: datetime | None


@dataclass(frozen=True, slots=True)
class AccountView:
    user_id: str
    state: AccountState
    debt_total: Decimal
    grants: list[GrantView]
    holds: list[HoldView]


@dataclass(frozen=True, slots=True)
class SweepResult:
    holds: int = 0
    grants: int = 0
    credits: Decimal = Decimal(0)
