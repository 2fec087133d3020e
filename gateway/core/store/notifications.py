"""Notifications as durable records: the outbox (one row per notification, unique on its
dedup key, claimed for delivery under a lease) and each account's notification state (its
low-balance threshold override and the armed flags of the threshold kinds).

An outbox row is `pending` until a sink took it (`delivered`) or its retry time ran out
(`failed`). Claiming is one conditional update per row: a row is claimable when pending and
its `next_attempt_ms` has come; the claim moves `next_attempt_ms` to the end of a lease and
writes a fresh `lease` token. Another worker finds nothing to claim until the lease ends;
a worker killed mid-delivery leaves the row to be claimed again once it has. The outcome is
written only by the holder of the lease (the token must match), so a delivery that outran
its lease does not overwrite the outcome of the one that took over.

Armed flags: `low_armed` / `debt_armed` are true until a notification of the kind is
recorded (it is recorded with the `*_epoch` in its dedup key), and set again (the epoch
bumped) once the balance is back at the threshold or the debt back to 0. A flag row changes
only with a newer account `version` than the one it was last evaluated at.
"""

from __future__ import annotations

import re
import secrets
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

KINDS = (
    "low_balance",
    "credit_expiring",
    "payment_succeeded",
    "payment_failed",
    "payment_refunded",
    "in_debt",
    "subscription_renewed",
    "subscription_renewal_failed",
    "subscription_ended",
    "promo_claimed",
)
STATUSES = ("pending", "delivered", "failed")


@dataclass(slots=True)
class NotificationRecord:
    id: str  # ntf_<12 hex of created_ms><20 random hex>: the event id receivers dedup on
    dedup_key: str  # unique: recording the same key twice keeps the first row
    user: str
    kind: str
    data: dict[str, Any]  # amounts as decimal strings
    created_ms: int
    status: str = "pending"
    attempts: int = 0
    next_attempt_ms: int = 0  # when it may be claimed (a claim moves it to the lease's end)
    last_error: str | None = None
    delivered_ms: int | None = None
    pending_since_ms: int = 0  # the retry window starts here (creation, or the last resend)
    lease: str | None = None  # the token of the claim under way


NOTIFICATION_FIELDS = tuple(NotificationRecord.__dataclass_fields__)


@dataclass(slots=True)
class ExpiringGrant:
    user: str
    seq: str
    free: int  # micro-credits
    expires_ms: int
    metadata: str | None  # the grant's metadata as JSON (source, op id, caller metadata)


@dataclass(slots=True)
class NotifyFlags:
    """An account's notification state. `version`: the account version it was evaluated at."""

    user: str
    version: int = 0
    low_armed: bool = True
    low_epoch: int = 0
    debt_armed: bool = True
    debt_epoch: int = 0
    low_balance_threshold: int | None = None  # micro-credits; None: the gateway's default
    changed: bool = field(default=False, compare=False)  # set by the detector: to be written


ID_PATTERN = re.compile(r"ntf_[0-9a-f]{32}", re.ASCII)


def new_notification_id(created_ms: int) -> str:
    """Its creation time first (12 hex digits of ms), then 80 random bits: ids sort by
    creation, so the outbox is appended to in order and listed newest first by its key."""
    return f"ntf_{created_ms:012x}{secrets.token_hex(10)}"


class NotificationStore(ABC):
    """The notification half of a store's contract."""

    # -- the outbox --------------------------------------------------------------------------

    @abstractmethod
    async def add_notifications(self, notes: list[NotificationRecord]) -> int:
        """Inserts each note whose dedup key is new; how many were inserted."""

    @abstractmethod
    async def notification(self, notification_id: str) -> NotificationRecord | None: ...

    @abstractmethod
    async def list_notifications(
        self,
        *,
        user: str | None = None,
        kind: str | None = None,
        status: str | None = None,
        before: str | None = None,
        limit: int = 50,
    ) -> list[NotificationRecord]:
        """Newest first (by id, which sorts by creation), those with an id below `before`."""

    @abstractmethod
    async def claim_notifications(
        self, now_ms: int, lease_ms: int, token: str, limit: int
    ) -> list[NotificationRecord]:
        """Takes up to `limit` pending notifications due at `now_ms` for this claim: each
        moved to `now_ms + lease_ms` with `lease = token` in one conditional update, so no
        other claim takes it meanwhile. Returns them as claimed."""

    @abstractmethod
    async def finish_notification(self, notification_id: str, token: str, changes: dict[str, Any]) -> bool:
        """Sets `changes` (and clears the lease) if the lease is still `token`; True if so."""

    @abstractmethod
    async def prune_notifications(self, before_ms: int) -> int:
        """Removes the delivered and failed notifications created before `before_ms` (ids
        sort by creation); returns how many. Pending ones stay, however old."""

    @abstractmethod
    async def resend_notification(self, notification_id: str, now_ms: int) -> NotificationRecord | None:
        """Back to pending, due now, its retry window restarted; None if there is no such id.
        One whose delivery is under way (claimed, its lease running) is left as it is: the
        record returned still has its `lease`."""

    # -- accounts' notification state ---------------------------------------------------------

    @abstractmethod
    async def notify_flags(self, users: list[str]) -> dict[str, NotifyFlags]:
        """The stored state of each of `users` that has one, in one lookup."""

    @abstractmethod
    async def record_detected(self, notes: list[NotificationRecord], flags: list[NotifyFlags]) -> None:
        """The worker's detections of one batch: the notes (deduplicated), then the flags,
        each written only over a row of an older version (or none)."""

    @abstractmethod
    async def set_low_balance_threshold(self, user: str, units: int | None) -> NotifyFlags:
        """Sets (None: clears) the account's threshold and re-arms its low-balance flag (a
        new epoch): the new threshold is judged afresh. Returns the state after."""

    @abstractmethod
    async def low_balance_thresholds(self) -> dict[str, int]:
        """Every account's threshold override (few: set by admins)."""

    @abstractmethod
    async def expiring_grants(
        self, from_ms: int, until_ms: int, after: tuple[str, str] | None, limit: int
    ) -> tuple[list[ExpiringGrant], tuple[str, str] | None]:
        """One page of a scan: the live grants with free credit expiring in (from_ms,
        until_ms] among at most `limit` grants after `after` (None: from the start), and
        where the next page starts (None: the scan is done). A page is bounded by the rows
        it looks at, not the rows it finds, so no call holds the store for long."""
