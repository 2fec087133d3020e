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


def _credits(name: str) -> property:
    """A Decimal-credits view of an integer micro-credits field (converted only when read)."""
    return property(lambda self: from_units(getattr(self, name)))


@dataclass(frozen=True, slots=True)
class AccountState:
    """An account's totals right after an operation (or at a read), in micro-credits;
    the same names without `_units` read them as Decimal credits."""

    version: int
    available_units: int
    held_units: int
    debt_units: int
    granted_units: int
    spent_units: int
    expired_units: int

    available = _credits("available_units")
    held = _credits("held_units")
    debt = _credits("debt_units")
    granted = _credits("granted_units")
    spent = _credits("spent_units")
    expired = _credits("expired_units")

    @classmethod
    def from_wire(cls, s: dict[str, Any]) -> AccountState:
        g = s.get
        return cls(
            int(g("v", 0)), int(g("available", 0)), int(g("held", 0)), int(g("debt", 0)),
            int(g("granted", 0)), int(g("spent", 0)), int(g("expired", 0)),
        )


@dataclass(frozen=True, slots=True)
class GrantResult:
    grant_seq: str
    amount_units: int
    debt_repaid_units: int
    expires_at_ms: int
    state: AccountState
    replayed: bool = False

    amount = _credits("amount_units")
    debt_repaid = _credits("debt_repaid_units")

    @property
    def expires_at(self) -> datetime | None:
        return ms_to_dt(self.expires_at_ms)


@dataclass(frozen=True, slots=True)
class Hold:
    hold_id: str
    amount_units: int
    expires_at_ms: int
    state: AccountState
    replayed: bool = False

    amount = _credits("amount_units")

    @property
    def expires_at(self) -> datetime:
        return ms_to_dt(self.expires_at_ms)


@dataclass(frozen=True, slots=True)
class HoldResolution:
    """The answer of settle or release: what was charged, returned, lapsed, owed."""

    hold_id: str
    status: str
    charged_units: int
    held_amount_units: int
    returned_units: int
    lapsed_units: int
    debt_added_units: int
    state: AccountState
    replayed: bool = False

    charged = _credits("charged_units")
    held_amount = _credits("held_amount_units")
    returned = _credits("returned_units")
    lapsed = _credits("lapsed_units")
    debt_added = _credits("debt_added_units")


@dataclass(frozen=True, slots=True)
class DebitResult:
    amount_units: int
    state: AccountState
    replayed: bool = False

    amount = _credits("amount_units")


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
    due_left: bool = False  # the batch was full: more may be due
