"""Promo codes as durable records: the code's definition, and its claims: each written by
the claiming process before its grant (op id `promo:<CODE>:<user>:<n>`, the user's n-th
claim of the code), so Redis's claim counters can be rebuilt from them whatever the
worker has persisted yet."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(slots=True)
class PromoRecord:
    code: str  # upper case, trimmed: codes are case-insensitive
    credits: int  # micro-credits per claim
    created_ms: int
    updated_ms: int
    description: str | None = None
    valid_from_ms: int | None = None
    valid_until_ms: int | None = None
    max_uses: int | None = None  # None: no global limit
    max_uses_per_user: int = 1
    grant_expires_at_ms: int | None = None  # the grant expires at this time...
    grant_expires_after_s: int | None = None  # ...or this long after the claim
    target_users: list[str] | None = None  # None: anyone
    new_accounts_days: int | None = None  # only accounts first seen within this many days
    active: bool = True
    # Set on a code carried over from another system (gateway/migrate): its claims recorded
    # from before this time were granted there, so none of them is in this ledger.
    imported_ms: int | None = None


PROMO_FIELDS = tuple(PromoRecord.__dataclass_fields__)


def promo_doc(p: PromoRecord) -> dict[str, Any]:
    return asdict(p)


def promo_of(doc: dict[str, Any]) -> PromoRecord:
    return PromoRecord(**{k: doc[k] for k in PROMO_FIELDS if k in doc})


def claim_op_id(code: str, user: str, n: int) -> str:
    return f"promo:{code}:{user}:{n}"


class PromoStore(ABC):
    """The promo half of a store's contract."""

    @abstractmethod
    async def create_promo(self, p: PromoRecord) -> None:
        """Inserts a new code; raises KeyError if it exists."""

    @abstractmethod
    async def promo(self, code: str) -> PromoRecord | None: ...

    @abstractmethod
    async def list_promos(self, *, active_only: bool = False) -> list[PromoRecord]: ...

    @abstractmethod
    async def update_promo(self, code: str, changes: dict[str, Any]) -> PromoRecord | None:
        """Sets `changes`; the record after, or None if there is no such code."""

    @abstractmethod
    async def add_promo_claim(self, code: str, user: str, n: int, at_ms: int) -> None:
        """Records the user's n-th claim of `code` (once; a repeat changes nothing)."""

    @abstractmethod
    async def promo_claims(self, code: str) -> list[tuple[str, int, int]]:
        """(user, n, at_ms) of every claim of `code` recorded."""

    @abstractmethod
    async def first_seen_ms(self, user: str) -> int | None:
        """When the ledger first saw the user (their account's age), or None."""
