"""What a batch of engine events notifies: run by the worker once the batch is stored and
before it is acknowledged, so a worker killed in between finds the batch again (and its
dedup keys make the second pass record nothing twice).

From each event: a grant's source (`gm[seq].src`) `payment` -> payment_succeeded, `plan` ->
subscription_renewed, `promo` -> promo_claimed; a debit whose op id starts with `refund:` ->
payment_refunded. Dedup key `<kind>:<user>:<op id>`.

From each user's newest state in the batch: low_balance (available below the threshold)
and in_debt (debt above 0), each at most once per crossing, by the account's armed flags in
the store (see store/notifications.py). Their dedup key carries the flag's epoch
(`low_balance:<user>:<epoch>`), which moves only when the flag is re-armed: a pass over the
same crossing, however its batch was cut, makes the same key.

The flags are read (one query per batch) only for the users whose flags could change: those
under their threshold or in debt now, and those who may have been so before the batch. The
latter is judged from the user's first event in the batch: its state after, minus what that
event can have added (a grant's amount, a hold resolution's returned credit), is a lower
bound of the balance before it, and its debt plus what it repaid an upper bound of the debt
before it (an account's first event: nothing before it, armed by default). Every other
user was at or above the threshold and out of debt before and after the batch: armed
already (the previous batch re-armed them), nothing to read or write.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from gateway.core.events import DEBIT, GRANT, HOLD_EXPIRED, HOLD_RELEASED, HOLD_SETTLED, Event
from gateway.core.money import credits_text
from gateway.core.store.base import Store
from gateway.core.store.notifications import NotificationRecord, NotifyFlags

from .notifier import make_note

GRANT_KINDS = {"payment": "payment_succeeded", "plan": "subscription_renewed", "promo": "promo_claimed"}
RESOLVED = frozenset({HOLD_SETTLED, HOLD_RELEASED, HOLD_EXPIRED})
REFUND_PREFIX = "refund:"
NEW_ACCOUNT = (1 << 62, 0)  # as if far above any threshold, out of debt


def _int(x: Any) -> int:
    return int(x or 0)


def _plain(x: Any) -> Any:
    """Caller metadata as the notification carries it: JSON numbers that are not whole
    (floats, as decoded) become strings, so no float reaches a receiver."""
    if isinstance(x, float):
        return repr(x)
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_plain(v) for v in x]
    return x


def _before(ev: Event) -> tuple[int, int]:
    """(a lower bound of the available balance, an upper bound of the debt) before `ev`."""
    if ev.version == 1:
        return NEW_ACCOUNT  # the account's first event: its flags are armed (the default)
    a = ev.raw["a"]
    available, debt = _int(a.get("available")), _int(a.get("debt"))
    t, raw = ev.type, ev.raw
    if t == GRANT:
        return available - _int(raw.get("amt")), debt + _int(raw.get("debt_repaid"))
    if t in RESOLVED:
        return available - _int(raw.get("returned")), debt + _int(raw.get("debt_repaid"))
    return available, debt  # a debit, a hold opened, a grant expired: nothing added


class Detector:
    """One per worker. `thresholds` (the admins' per-account overrides, few) are read from
    the store every `refresh_seconds`; an admin's change re-arms the account's flag in the
    store at once, so the worker's copy only decides which users it reads."""

    def __init__(
        self,
        store: Store,
        *,
        default_threshold_units: int,
        now_ms: Callable[[], int] | None = None,
        refresh_seconds: float = 2.0,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.default = default_threshold_units
        self.now_ms = now_ms or (lambda: int(time.time() * 1000))
        self.refresh_seconds = refresh_seconds
        self.monotonic = monotonic
        self._overrides: dict[str, int] = {}
        self._loaded_at: float | None = None
        self.flag_reads = 0  # how many batches read flags (for tests and measurements)

    async def _thresholds(self) -> dict[str, int]:
        now = self.monotonic()
        if self._loaded_at is None or now - self._loaded_at >= self.refresh_seconds:
            self._overrides = await self.store.low_balance_thresholds()
            self._loaded_at = now
        return self._overrides

    def forget_thresholds(self) -> None:
        """The next batch reads the overrides again."""
        self._loaded_at = None

    async def batch(self, events: list[Event]) -> int:
        """Records what `events` (stored) notify; returns how many notifications it made
        (a repeat of an earlier pass makes them again: the store keeps the first)."""
        if not events:
            return 0
        now = self.now_ms()
        notes: list[NotificationRecord] = []
        first: dict[str, Event] = {}
        newest: dict[str, Event] = {}
        for ev in events:
            u, v = ev.user, ev.version
            f = first.get(u)
            if f is None:
                first[u] = newest[u] = ev
            elif v < f.version:
                first[u] = ev
            elif v > newest[u].version:
                newest[u] = ev
            if ev.type == GRANT:
                self._grant_note(ev, now, notes)
            elif ev.type == DEBIT and ev.op_id.startswith(REFUND_PREFIX):
                notes.append(self._refund_note(ev, now))
        overrides = await self._thresholds()
        default = self.default
        candidates = []
        for u, n in newest.items():
            threshold = overrides.get(u, default)
            a = n.raw["a"]
            if _int(a.get("available")) < threshold or _int(a.get("debt")) > 0:
                candidates.append(u)
                continue
            low, debt = _before(first[u])
            if low < threshold or debt > 0:
                candidates.append(u)
        changed: list[NotifyFlags] = []
        if candidates:
            self.flag_reads += 1
            stored = await self.store.notify_flags(candidates)
            for u in candidates:
                fl = stored.get(u) or NotifyFlags(u)
                if self._judge(fl, newest[u], overrides.get(u, default), now, notes):
                    changed.append(fl)
        if notes or changed:
            await self.store.record_detected(notes, changed)
        return len(notes)

    @staticmethod
    def _judge(fl: NotifyFlags, n: Event, threshold: int, now: int, notes: list[NotificationRecord]) -> bool:
        """Moves the flags by the newest state; True if they changed (and are to be written)."""
        if n.version <= fl.version:
            return False  # evaluated at a newer state already (an older batch, delivered late)
        a = n.raw["a"]
        available, debt, u = _int(a.get("available")), _int(a.get("debt")), n.user
        changed = False
        if available < threshold:
            if fl.low_armed:
                data = {
                    "available": credits_text(available),
                    "threshold": credits_text(threshold),
                    "version": n.version,
                }
                key = f"low_balance:{u}:{fl.low_epoch}"
                notes.append(make_note(u, "low_balance", key, data, now, checked=True))
                fl.low_armed, changed = False, True
        elif not fl.low_armed:
            fl.low_armed, fl.low_epoch, changed = True, fl.low_epoch + 1, True
        if debt > 0:
            if fl.debt_armed:
                data = {
                    "debt": credits_text(debt),
                    "available": credits_text(available),
                    "version": n.version,
                }
                key = f"in_debt:{u}:{fl.debt_epoch}"
                notes.append(make_note(u, "in_debt", key, data, now, checked=True))
                fl.debt_armed, changed = False, True
        elif not fl.debt_armed:
            fl.debt_armed, fl.debt_epoch, changed = True, fl.debt_epoch + 1, True
        if changed:
            fl.version = n.version
        return changed

    @staticmethod
    def _grant_note(ev: Event, now: int, notes: list[NotificationRecord]) -> None:
        for meta in ev.grant_meta.values():
            kind = GRANT_KINDS.get(meta.get("src", "")) if isinstance(meta, dict) else None
            if kind is None:
                continue
            x = meta.get("x")
            x = x if isinstance(x, dict) else {}
            data: dict[str, Any] = {
                "op_id": ev.op_id,
                "credits": credits_text(_int(meta.get("amt"))),
                "available": credits_text(_int(ev.raw["a"].get("available"))),
            }
            if kind == "payment_succeeded":
                data.update(payment_id=_plain(x.get("payment_id")), provider=_plain(x.get("provider")))
            elif kind == "promo_claimed":
                data.update(code=_plain(x.get("promo")), claim=_plain(x.get("claim")))
            else:
                data["metadata"] = _plain(x)
            key = f"{kind}:{ev.user}:{ev.op_id}"
            notes.append(make_note(ev.user, kind, key, data, now, checked=True))

    @staticmethod
    def _refund_note(ev: Event, now: int) -> NotificationRecord:
        x = ev.extra
        a = ev.raw["a"]
        data = {
            "op_id": ev.op_id,
            "credits": credits_text(ev.amount),
            "payment_id": _plain(x.get("payment_id")),
            "refund_id": _plain(x.get("refund_id")),
            "available": credits_text(_int(a.get("available"))),
            "debt": credits_text(_int(a.get("debt"))),
        }
        key = f"payment_refunded:{ev.user}:{ev.op_id}"
        return make_note(ev.user, "payment_refunded", key, data, now, checked=True)
