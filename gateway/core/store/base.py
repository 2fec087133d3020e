"""The durable store's interface: the record Redis can be rebuilt from.

Writes are idempotent and need no transaction: the ledger is keyed by (user, op id) under a
unique index, and every snapshot row (account, grant, hold) is replaced only by an event
with a newer account version, so events may arrive twice and in any order.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from ..events import Event


@dataclass(slots=True)
class AccountSnapshot:
    """An account as the store knows it, in the shape lua/restore.lua takes.

    totals: {available, held, debt, debt_total, granted, spent, expired, seq} (ints)
    grants: [{seq, r, e, x, pri, m}] with r/e/x ints and m the grant metadata as a JSON string,
            only grants that still exist (not gone)
    holds:  [{id, amt, exp, ear, at, op, x}] the open holds (amt/exp/at ints, x a JSON string)
    """

    user: str
    version: int
    totals: dict[str, int]
    grants: list[dict[str, Any]] = field(default_factory=list)
    holds: list[dict[str, Any]] = field(default_factory=list)


@dataclass(slots=True)
class LedgerEntry:
    user: str
    op_id: str
    type: str
    version: int
    ts_ms: int
    amount: int
    hold_id: str | None
    event: dict[str, Any]


@dataclass(slots=True)
class OperationRecord:
    """What a rebuilt Redis needs to answer a replayed operation id the same way."""

    user: str
    op_id: str
    fingerprint: str
    result: str
    ts_ms: int


@dataclass(slots=True)
class ResolvedHold:
    """A hold that was settled, released or expired: what a rebuilt Redis needs to answer
    its resolution again (already_settled...) and to keep its id taken."""

    user: str
    hold_id: str
    status: str  # settled | released | expired
    expires_ms: int  # its deadline: it resolved at or before


@dataclass(slots=True)
class ApiKeyRecord:
    """A per-user API key as stored: never the key, only its SHA-256 digest (hex)."""

    key_id: str
    user: str
    digest: str
    prefix: str  # the key's first characters, to recognise it in a listing
    name: str
    created_ms: int
    revoked_ms: int | None = None


@dataclass(slots=True)
class RateLimitOverride:
    """An account's own per-minute limits; None keeps the gateway's default, 0 means none."""

    user: str
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None


class Store(ABC):
    """One durable store. Implementations: SQLiteStore (embedded), MongoStore."""

    @abstractmethod
    async def open(self) -> None:
        """Connects and creates tables / indexes (idempotent)."""

    @abstractmethod
    async def close(self) -> None: ...

    @abstractmethod
    async def ping(self) -> bool:
        """True when the store answers."""

    @abstractmethod
    async def write_events(self, events: list[Event]) -> int:
        """Records a batch idempotently; returns how many ledger entries were new."""

    @abstractmethod
    async def ledger(
        self, user: str, *, before_version: int | None = None, limit: int = 50
    ) -> list[LedgerEntry]:
        """An account's ledger, newest first; `before_version` is the pagination cursor."""

    @abstractmethod
    def ledger_all(self, user: str) -> AsyncIterator[LedgerEntry]:
        """An account's whole ledger, oldest first (for replay checks)."""

    @abstractmethod
    async def snapshot(self, user: str) -> AccountSnapshot | None: ...

    @abstractmethod
    def snapshots(self, partition: int | None = None) -> AsyncIterator[AccountSnapshot]:
        """Every account, or those of one partition (as carried by their events)."""

    @abstractmethod
    def operations_since(self, ts_ms: int) -> AsyncIterator[OperationRecord]:
        """Caller operations (with fingerprint and answer) recorded at or after ts_ms."""

    @abstractmethod
    def resolved_holds_since(self, expires_ms: int) -> AsyncIterator[ResolvedHold]:
        """Holds resolved (settled, released, expired) whose deadline is at or after expires_ms."""

    # -- admin-plane records: written here first, then to Redis; rehydrate restores them --

    @abstractmethod
    async def add_api_key(self, key: ApiKeyRecord) -> None: ...

    @abstractmethod
    async def revoke_api_key(self, user: str, key_id: str, at_ms: int) -> ApiKeyRecord | None:
        """Marks the key revoked (keeping the first revocation time); None if no such key."""

    @abstractmethod
    async def api_keys(self, user: str) -> list[ApiKeyRecord]:
        """The user's keys, revoked ones included, oldest first."""

    @abstractmethod
    def active_api_keys(self) -> AsyncIterator[ApiKeyRecord]: ...

    @abstractmethod
    async def set_rate_limits(self, override: RateLimitOverride) -> None:
        """Stores the override; one with both limits None removes it."""

    @abstractmethod
    async def rate_limits(self, user: str) -> RateLimitOverride | None: ...

    @abstractmethod
    def all_rate_limits(self) -> AsyncIterator[RateLimitOverride]: ...
