"""The durable store's interface (the record Redis can be rebuilt from) and the write
path every backend shares.

Writes are idempotent and need no transaction: the ledger is keyed by (user, op id) under a
unique index, and every snapshot row (account, grant, hold) is replaced only by an event
with a newer account version, so events may arrive twice and in any order.

A backend is one module: a Store subclass with the write hooks (`_insert_ledger`,
`_ledger_versions`, `_write_accounts`, `_write_grants`, `_write_holds`), the reads and the
admin-plane records, and a `from_url` that the registry (store/registry.py) calls.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

from ..events import Event
from .batch import AccountRow, Batch, GrantRow, HoldRow, LedgerRow, collapse, reissued
from .notifications import NotificationStore
from .payments import PaymentStore
from .plans import PlanStore
from .promos import PromoStore

# Schema version 1 -> 2, the same in every backend: the short names (the Lua hash fields')
# of the hold and rate-limit fields, and of the grant fields but its metadata (which each
# backend named its own way), renamed to words.
GRANT_RENAMES_1_TO_2 = {"r": "free", "e": "earmarked", "x": "expires_ms", "pri": "priority"}
HOLD_RENAMES_1_TO_2 = {
    "st": "status",
    "amt": "amount",
    "exp": "expires_ms",
    "fin": "charged",
    "ear": "earmarks",
    "at": "opened_ms",
    "op": "op_id",
    "x": "metadata",
}
RATE_LIMIT_RENAMES_1_TO_2 = {"rpm": "requests_per_minute", "tpm": "tokens_per_minute"}

# An account's totals as AccountSnapshot.totals carries them (debt_total aside).
TOTAL_FIELDS = ("available", "held", "debt", "granted", "spent", "expired", "seq")


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


def restore_grant(
    seq: str, free: int, earmarked: int, expires_ms: int | None, priority: int | None, metadata: str | None
) -> dict[str, Any]:
    """A stored grant in the shape lua/restore.lua takes (its hash fields' names)."""
    return {
        "seq": seq,
        "r": int(free),
        "e": int(earmarked),
        "x": int(expires_ms or 0),
        "pri": int(priority or 0),
        "m": metadata or "{}",
    }


def restore_hold(
    hold_id: str,
    amount: int,
    expires_ms: int,
    earmarks: str | None,
    opened_ms: int | None,
    op_id: str | None,
    metadata: str | None,
) -> dict[str, Any]:
    """A stored open hold in the shape lua/restore.lua takes (its hash fields' names)."""
    return {
        "id": hold_id,
        "amt": int(amount),
        "exp": int(expires_ms),
        "ear": earmarks or "",
        "at": int(opened_ms or 0),
        "op": op_id or hold_id,
        "x": metadata or "{}",
    }


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
    # The subscriber's plan's limits, set by subscriptions: the admin's override above wins.
    plan_requests_per_minute: int | None = None
    plan_tokens_per_minute: int | None = None
    allowed_models: list[str] | None = None  # the plan's models (None: every model)

    @property
    def admin_part_empty(self) -> bool:
        return self.requests_per_minute is None and self.tokens_per_minute is None

    @property
    def empty(self) -> bool:
        return self.admin_part_empty and (
            self.plan_requests_per_minute is None
            and self.plan_tokens_per_minute is None
            and self.allowed_models is None
        )


class Store(PaymentStore, PromoStore, PlanStore, NotificationStore):
    """One durable store. Implementations: SQLiteStore (embedded), MongoStore. The payment,
    promo, plan and notification records' parts of the contract are in store/payments.py,
    promos.py, plans.py and notifications.py."""

    @classmethod
    @abstractmethod
    def from_url(cls, url: str, *, database: str) -> Store:
        """The store a URL of one of the backend's schemes names (see store/registry.py);
        `database` names the database on servers that host several."""

    @abstractmethod
    async def open(self) -> None:
        """Connects and creates tables / indexes (idempotent)."""

    @abstractmethod
    async def close(self) -> None: ...

    @abstractmethod
    async def ping(self) -> bool:
        """True when the store answers."""

    # -- writes: one path for every backend, the backend's hooks below it -------------------

    async def write_events(self, events: list[Event]) -> int:
        """Records a batch idempotently; returns how many ledger entries were new.

        The batch is collapsed to one row per ledger entry and per snapshot row; the ledger
        is written first, so that no snapshot row is ever ahead of the ledger. When some
        ledger rows were there already (redeliveries, or operation ids reused after Redis
        forgot them), the stored versions of the batch's keys are read in one lookup and
        the reissued rows are written under their own key (batch.reissued). Then the
        accounts, grants and holds, each guarded by its version.
        """
        if not events:
            return 0
        return await self._write_batch(collapse(events))

    async def _write_batch(self, b: Batch) -> int:
        async with self._transaction():
            new = await self._write_ledger(b)
            await self._write_snapshots(b)
        return new

    async def _write_ledger(self, b: Batch) -> int:
        """The batch's ledger rows, and those of reissued operation ids; how many were new."""
        new = await self._insert_ledger(b.ledger)
        if new < len(b.ledger):
            stored = await self._ledger_versions({(r[0], r[1]) for r in b.ledger})
            again = reissued(b.ledger, stored)
            if again:
                new += await self._insert_ledger(again)
        return new

    async def _write_snapshots(self, b: Batch) -> None:
        """The batch's accounts, grants and holds."""
        if b.accounts:
            await self._write_accounts(b.accounts)
        if b.grants:
            await self._write_grants(b.grants)
        if b.holds:
            await self._write_holds(b.holds)

    def _transaction(self) -> AbstractAsyncContextManager[Any]:
        """What the hooks of one batch run inside (none: every write is idempotent)."""
        return nullcontext()

    @abstractmethod
    async def _insert_ledger(self, rows: list[LedgerRow]) -> int:
        """Inserts the rows whose (user, op id) the ledger does not hold; how many were new."""

    @abstractmethod
    async def _ledger_versions(self, keys: set[tuple[str, str]]) -> dict[tuple[str, str], int]:
        """The stored version of each (user, op id) of `keys` the ledger holds, in one lookup."""

    @abstractmethod
    async def _write_accounts(self, rows: list[AccountRow]) -> None:
        """Replaces each account whose stored version is older (or absent)."""

    @abstractmethod
    async def _write_grants(self, rows: list[GrantRow]) -> None:
        """Per grant: its balance (free, earmarked, gone) when `version` is newer than the
        stored one; its metadata, expiry and priority when the store has none yet."""

    @abstractmethod
    async def _write_holds(self, rows: list[HoldRow]) -> None:
        """Per hold: its state when `version` is newer than the stored one; its opening
        fields when `open_version` is newer than the stored one."""

    # -- reads ----------------------------------------------------------------------------

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

    async def set_rate_limits(self, override: RateLimitOverride) -> None:
        """Stores the admin's part of the override (the two limits; both None: none),
        keeping the plan's part."""
        o = override
        values = {"requests_per_minute": o.requests_per_minute, "tokens_per_minute": o.tokens_per_minute}
        await self._set_limits(o.user, values)

    async def set_plan_limits(
        self,
        user: str,
        requests_per_minute: int | None,
        tokens_per_minute: int | None,
        models: list[str] | None,
    ) -> RateLimitOverride | None:
        """Stores the plan's part (all None: none), keeping the admin's; the record after."""
        values = {
            "plan_requests_per_minute": requests_per_minute,
            "plan_tokens_per_minute": tokens_per_minute,
            "allowed_models": self._models_value(models),
        }
        return await self._set_limits(user, values)

    @abstractmethod
    async def _set_limits(self, user: str, values: dict[str, Any]) -> RateLimitOverride | None:
        """Sets these fields of the user's override, keeping the others (a record with every
        field None is removed); the record after."""

    def _models_value(self, models: list[str] | None) -> Any:
        """The allowed models as the backend keeps them (a list; the SQL stores: JSON text)."""
        return models

    @abstractmethod
    async def rate_limits(self, user: str) -> RateLimitOverride | None: ...

    @abstractmethod
    def all_rate_limits(self) -> AsyncIterator[RateLimitOverride]: ...
