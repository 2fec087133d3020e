"""Typed answers of the engine. Amounts are Decimal credits; times are aware datetimes."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from .money import from_units


def ms_to_dt(ms: int | str | None) -> datetime | None:
    ms = int(ms or 0)
    return datetime.fromtimestamp(ms / 1000, tz=UTC) if ms else None


def _credits(name: str) -> property:
    """A Decimal-credits view of an integer micro-credits field (converted only when read)."""
    return property(lambda self: from_units(getattr(self, name)))


def _wire_int(field: str) -> property:
    return property(lambda self: int(self._w.get(field) or 0))


class AccountState:
    """An account's totals right after an operation (or at a read). The `*_units` names are
    micro-credits; the same names without `_units` are Decimal credits. Parsed from the
    script's answer only when read (the metering hot path reads one or two of them)."""

    __slots__ = ("_w",)

    def __init__(self, wire: dict[str, Any]) -> None:
        self._w = wire

    version = _wire_int("v")
    available_units = _wire_int("available")
    held_units = _wire_int("held")
    debt_units = _wire_int("debt")
    granted_units = _wire_int("granted")
    spent_units = _wire_int("spent")
    expired_units = _wire_int("expired")

    available = _credits("available_units")
    held = _credits("held_units")
    debt = _credits("debt_units")
    granted = _credits("granted_units")
    spent = _credits("spent_units")
    expired = _credits("expired_units")

    @classmethod
    def from_wire(cls, s: dict[str, Any]) -> AccountState:
        return cls(s)

    def _key(self) -> tuple[int, ...]:
        return (
            self.version,
            self.available_units,
            self.held_units,
            self.debt_units,
            self.granted_units,
            self.spent_units,
            self.expired_units,
        )

    def __eq__(self, other: object) -> bool:
        return isinstance(other, AccountState) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        return (
            f"AccountState(version={self.version}, available={self.available}, held={self.held}, "
            f"debt={self.debt}, granted={self.granted}, spent={self.spent}, expired={self.expired})"
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
        """When the hold lapses (a hold always has an expiry, unlike a grant)."""
        return datetime.fromtimestamp(self.expires_at_ms / 1000, tz=UTC)


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
    debt_repaid_units: int = 0  # debt the returned credit paid back

    charged = _credits("charged_units")
    held_amount = _credits("held_amount_units")
    returned = _credits("returned_units")
    lapsed = _credits("lapsed_units")
    debt_added = _credits("debt_added_units")
    debt_repaid = _credits("debt_repaid_units")


@dataclass(frozen=True, slots=True)
class DebitResult:
    amount_units: int
    state: AccountState
    replayed: bool = False
    debt_added_units: int = 0  # the part free credit did not cover (only with allow_debt)

    amount = _credits("amount_units")
    debt_added = _credits("debt_added_units")

    @property
    def charged_units(self) -> int:
        """What it charged (as a settle's result names it): the whole amount."""
        return self.amount_units


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
