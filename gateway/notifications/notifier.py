"""Records notifications in the store's outbox, and the admin's views and actions on them.

Other services call `Notifier.record(user=..., kind=..., dedup_key=..., data=...)`: it only
writes the outbox row (the worker's delivery loop sends it), so it is cheap, and recording
the same dedup key again changes nothing. Amounts in `data` are decimal strings, never floats.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from gateway.core.keys import ID_PATTERN
from gateway.core.money import AmountError, credits_text, to_units
from gateway.core.store.base import Store
from gateway.core.store.notifications import ID_PATTERN as NOTIFICATION_ID
from gateway.core.store.notifications import KINDS, STATUSES, NotificationRecord, new_notification_id

MAX_LIMIT = 200


class NotifyError(Exception):
    """A refusal of an admin request: HTTP `status`, `code` and a message for the API."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def _iso(ms: int | None) -> str | None:
    return None if ms is None else datetime.fromtimestamp(ms / 1000, UTC).isoformat().replace("+00:00", "Z")


def _no_floats(value: Any, where: str = "data") -> None:
    """Amounts travel as decimal strings: a float anywhere in `data` is a bug of the caller."""
    if isinstance(value, float):
        raise ValueError(f"{where} holds a float; amounts are decimal strings (credits_text)")
    if isinstance(value, dict):
        for k, v in value.items():
            _no_floats(v, f"{where}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _no_floats(v, f"{where}[{i}]")


def make_note(
    user: str, kind: str, dedup_key: str, data: dict[str, Any], now_ms: int, *, checked: bool = False
) -> NotificationRecord:
    """A new pending notification, due now. `checked`: the caller built `data` itself from
    ints and strings (the worker's detector, per event: the checks cost)."""
    if not checked:
        if kind not in KINDS:
            raise ValueError(f"unknown notification kind {kind!r}; one of {', '.join(KINDS)}")
        if not dedup_key:
            raise ValueError("a notification needs a dedup key")
        _no_floats(data)
    return NotificationRecord(
        id=new_notification_id(now_ms),
        dedup_key=dedup_key,
        user=user,
        kind=kind,
        data=data,
        created_ms=now_ms,
        next_attempt_ms=now_ms,
        pending_since_ms=now_ms,
    )


def payload(n: NotificationRecord) -> dict[str, Any]:
    """What a sink sends: the webhook's JSON body."""
    return {"id": n.id, "type": n.kind, "created": n.created_ms // 1000, "user": n.user, "data": n.data}


class Notifier:
    def __init__(
        self,
        store: Store,
        *,
        default_threshold_units: int = 1_000_000,
        now_ms: Callable[[], int] | None = None,
    ) -> None:
        self.store = store
        self.default_threshold_units = default_threshold_units
        self.now_ms = now_ms or (lambda: int(time.time() * 1000))

    async def record(
        self, *, user: str, kind: str, dedup_key: str, data: dict[str, Any] | None = None
    ) -> bool:
        """Records one notification for delivery; True if new, False if its dedup key was
        recorded before (nothing changes then). Make the key stable for the fact it tells:
        e.g. `subscription_ended:<subscription id>`."""
        note = make_note(user, kind, dedup_key, dict(data or {}), self.now_ms())
        return await self.store.add_notifications([note]) == 1

    # -- the admin's views ------------------------------------------------------------------

    @staticmethod
    def view(n: NotificationRecord) -> dict[str, Any]:
        return {
            "id": n.id,
            "user": n.user,
            "kind": n.kind,
            "data": n.data,
            "status": n.status,
            "created_at": _iso(n.created_ms),
            "attempts": n.attempts,
            "next_attempt_at": _iso(n.next_attempt_ms) if n.status == "pending" else None,
            "last_error": n.last_error,
            "delivered_at": _iso(n.delivered_ms),
            "dedup_key": n.dedup_key,
        }

    async def list(
        self,
        *,
        user: str | None = None,
        kind: str | None = None,
        status: str | None = None,
        before: str | None = None,
        limit: int = 50,
    ) -> dict[str, Any]:
        if user is not None and not ID_PATTERN.fullmatch(user):
            raise NotifyError(400, "invalid_request", "user is not a valid user id")
        if kind is not None and kind not in KINDS:
            raise NotifyError(400, "invalid_kind", f"kind is one of: {', '.join(KINDS)}")
        if status is not None and status not in STATUSES:
            raise NotifyError(400, "invalid_status", f"status is one of: {', '.join(STATUSES)}")
        if not 1 <= limit <= MAX_LIMIT:
            raise NotifyError(400, "invalid_request", f"limit is between 1 and {MAX_LIMIT}")
        if before is not None and not NOTIFICATION_ID.fullmatch(before):
            raise NotifyError(400, "invalid_cursor", "before is a notification id (next_cursor)")
        items = await self.store.list_notifications(
            user=user, kind=kind, status=status, before=before, limit=limit
        )
        return {
            "notifications": [self.view(n) for n in items],
            "next_cursor": items[-1].id if len(items) == limit else None,
        }

    async def get(self, notification_id: str) -> NotificationRecord:
        n = await self.store.notification(notification_id)
        if n is None:
            raise NotifyError(404, "not_found", "no such notification")
        return n

    async def resend(self, notification_id: str) -> NotificationRecord:
        """Back to pending and delivered again (with its same id: receivers that dedup
        on it see a repeat). Its retry window starts again now."""
        now = self.now_ms()
        n = await self.store.resend_notification(notification_id, now)
        if n is None:
            raise NotifyError(404, "not_found", "no such notification")
        if n.lease is not None and n.next_attempt_ms > now:
            # Two deliveries of one notification at the same moment: never.
            raise NotifyError(409, "in_flight", "it is being delivered now; resend it once that ends")
        return n

    # -- an account's threshold -------------------------------------------------------------

    def _threshold_view(self, user: str, units: int | None) -> dict[str, Any]:
        effective = self.default_threshold_units if units is None else units
        return {
            "user": user,
            "low_balance_threshold": None if units is None else credits_text(units),
            "default_low_balance_threshold": credits_text(self.default_threshold_units),
            "effective_low_balance_threshold": credits_text(effective),
        }

    async def account_settings(self, user: str) -> dict[str, Any]:
        flags = (await self.store.notify_flags([user])).get(user)
        return self._threshold_view(user, flags.low_balance_threshold if flags else None)

    async def set_account_settings(self, user: str, body: Any) -> dict[str, Any]:
        if not isinstance(body, dict) or set(body) != {"low_balance_threshold"}:
            raise NotifyError(
                400,
                "invalid_request",
                'the body is {"low_balance_threshold": "<credits>"} or {"low_balance_threshold": null}',
            )
        value = body["low_balance_threshold"]
        units = None
        if value is not None:
            try:
                units = to_units(value, allow_zero=True)
            except (AmountError, ValueError) as exc:
                raise NotifyError(422, "invalid_amount", f"low_balance_threshold: {exc}") from None
        flags = await self.store.set_low_balance_threshold(user, units)
        return self._threshold_view(user, flags.low_balance_threshold)


async def prune_outbox(store: Store, now_ms: Callable[[], int], keep_days: int) -> list[str]:
    """The worker's job: delivered and failed notifications older than `keep_days` go
    (pending ones stay). A line when it removed any."""
    removed = await store.prune_notifications(now_ms() - keep_days * 86_400_000)
    if not removed:
        return []
    return [f"{removed} delivered or failed notifications older than {keep_days} days removed"]
