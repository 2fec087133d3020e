"""The SQLite store's notifications (see store/notifications.py): the `notifications`
outbox and `notify_accounts`, one row per account with a threshold or a flag changed."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable
from typing import Any, TypeVar

import orjson

from .notifications import (
    NOTIFICATION_FIELDS,
    ExpiringGrant,
    NotificationRecord,
    NotificationStore,
    NotifyFlags,
    new_notification_id,
)

T = TypeVar("T")

# The id sorts by creation (store/notifications.py): the table (keyed by it) and the due
# index (by next_attempt_ms, which starts at creation) are appended to in order; the dedup
# key's and the user's indexes take the random inserts.
_COLS = ", ".join(NOTIFICATION_FIELDS)
_FLAG_COLS = "user, version, low_armed, low_epoch, debt_armed, debt_epoch, low_balance_threshold"

INSERT_NOTE = (
    f"INSERT OR IGNORE INTO notifications ({_COLS}) VALUES ({', '.join('?' * len(NOTIFICATION_FIELDS))})"
)

# The detector's flags: only over a row evaluated at an older version; never the threshold.
UPSERT_FLAGS = f"""
INSERT INTO notify_accounts ({_FLAG_COLS}) VALUES (?, ?, ?, ?, ?, ?, NULL)
ON CONFLICT (user) DO UPDATE SET
    version = excluded.version, low_armed = excluded.low_armed, low_epoch = excluded.low_epoch,
    debt_armed = excluded.debt_armed, debt_epoch = excluded.debt_epoch
WHERE excluded.version > notify_accounts.version
"""

# An admin's threshold: set, and the low-balance flag re-armed (a new epoch if it was not).
SET_THRESHOLD = f"""
INSERT INTO notify_accounts ({_FLAG_COLS}) VALUES (?, 0, 1, 0, 1, 0, ?)
ON CONFLICT (user) DO UPDATE SET
    low_balance_threshold = excluded.low_balance_threshold,
    low_epoch = CASE WHEN notify_accounts.low_armed THEN notify_accounts.low_epoch
        ELSE notify_accounts.low_epoch + 1 END,
    low_armed = 1
"""

CLAIM = f"""
UPDATE notifications SET next_attempt_ms = ?, lease = ?
WHERE id IN (
    SELECT id FROM notifications INDEXED BY notifications_due
    WHERE status = 'pending' AND next_attempt_ms <= ? ORDER BY next_attempt_ms LIMIT ?
) AND status = 'pending' AND next_attempt_ms <= ?
RETURNING {_COLS}
"""


def _row(n: NotificationRecord) -> tuple:
    return tuple(orjson.dumps(n.data).decode() if f == "data" else getattr(n, f) for f in NOTIFICATION_FIELDS)


def _note(row: tuple) -> NotificationRecord:
    d = dict(zip(NOTIFICATION_FIELDS, row, strict=True))
    d["data"] = json.loads(d["data"])
    return NotificationRecord(**d)


def _flags(row: tuple) -> NotifyFlags:
    user, version, low_armed, low_epoch, debt_armed, debt_epoch, threshold = row
    return NotifyFlags(user, version, bool(low_armed), low_epoch, bool(debt_armed), debt_epoch, threshold)


class SQLiteNotifications(NotificationStore):
    """Mixed into SQLiteStore: every call runs on the store's thread (`_call`)."""

    @property
    def db(self) -> sqlite3.Connection:  # provided by SQLiteStore
        raise NotImplementedError

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:  # provided by SQLiteStore
        raise NotImplementedError

    def _insert_notes(self, notes: list[NotificationRecord]) -> int:
        db = self.db
        before = db.total_changes
        db.executemany(INSERT_NOTE, [_row(n) for n in notes])
        return db.total_changes - before

    async def add_notifications(self, notes: list[NotificationRecord]) -> int:
        if not notes:
            return 0
        return await self._call(self._insert_notes, notes)

    async def notification(self, notification_id: str) -> NotificationRecord | None:
        row = await self._call(
            lambda: self.db.execute(
                f"SELECT {_COLS} FROM notifications WHERE id = ?", (notification_id,)
            ).fetchone()
        )
        return _note(row) if row else None

    async def list_notifications(
        self,
        *,
        user: str | None = None,
        kind: str | None = None,
        status: str | None = None,
        before: str | None = None,
        limit: int = 50,
    ) -> list[NotificationRecord]:
        where: list[str] = []
        args: list[Any] = []
        for col, value in (("user", user), ("kind", kind), ("status", status)):
            if value is not None:
                where.append(f"{col} = ?")
                args.append(value)
        if before is not None:
            where.append("id < ?")
            args.append(before)
        sql = (
            f"SELECT {_COLS} FROM notifications"
            + (" WHERE " + " AND ".join(where) if where else "")
            + " ORDER BY id DESC LIMIT ?"
        )
        rows = await self._call(lambda: self.db.execute(sql, (*args, limit)).fetchall())
        return [_note(r) for r in rows]

    async def claim_notifications(
        self, now_ms: int, lease_ms: int, token: str, limit: int
    ) -> list[NotificationRecord]:
        # One statement: atomic against other claims, in this process or another one.
        args = (now_ms + lease_ms, token, now_ms, limit, now_ms)
        rows = await self._call(lambda: self.db.execute(CLAIM, args).fetchall())
        return sorted((_note(r) for r in rows), key=lambda n: (n.next_attempt_ms, n.created_ms))

    async def finish_notification(self, notification_id: str, token: str, changes: dict[str, Any]) -> bool:
        cols = [c for c in changes if c in NOTIFICATION_FIELDS and c not in ("id", "lease")]
        sets = ", ".join(f"{c} = ?" for c in cols)
        sql = f"UPDATE notifications SET {sets}, lease = NULL WHERE id = ? AND lease = ?"
        args = (*(changes[c] for c in cols), notification_id, token)
        return await self._call(lambda: self.db.execute(sql, args).rowcount) == 1

    def _resend(self, notification_id: str, now_ms: int) -> NotificationRecord | None:
        self.db.execute(
            "UPDATE notifications SET status = 'pending', attempts = 0, next_attempt_ms = ?, "
            "pending_since_ms = ?, last_error = NULL, delivered_ms = NULL, lease = NULL "
            "WHERE id = ? AND (lease IS NULL OR next_attempt_ms <= ?)",
            (now_ms, now_ms, notification_id, now_ms),
        )
        row = self.db.execute(
            f"SELECT {_COLS} FROM notifications WHERE id = ?", (notification_id,)
        ).fetchone()
        return _note(row) if row else None

    async def prune_notifications(self, before_ms: int) -> int:
        sql = "DELETE FROM notifications WHERE id < ? AND status IN ('delivered', 'failed')"
        first_kept = new_notification_id(before_ms)[: len("ntf_") + 12]  # its creation-time prefix
        return await self._call(lambda: self.db.execute(sql, (first_kept,)).rowcount)

    async def resend_notification(self, notification_id: str, now_ms: int) -> NotificationRecord | None:
        return await self._call(self._resend, notification_id, now_ms)

    async def notify_flags(self, users: list[str]) -> dict[str, NotifyFlags]:
        if not users:
            return {}
        sql = (
            f"SELECT {_FLAG_COLS} FROM json_each(?) AS k CROSS JOIN notify_accounts AS a "
            "WHERE a.user = k.value"
        )
        rows = await self._call(lambda: self.db.execute(sql, (json.dumps(users),)).fetchall())
        return {r[0]: _flags(r) for r in rows}

    def _record_detected(self, notes: list[NotificationRecord], flags: list[NotifyFlags]) -> None:
        db = self.db
        db.execute("BEGIN IMMEDIATE")  # the notes and their flags together, or neither
        try:
            if notes:
                db.executemany(INSERT_NOTE, [_row(n) for n in notes])
            if flags:
                db.executemany(
                    UPSERT_FLAGS,
                    [
                        (f.user, f.version, int(f.low_armed), f.low_epoch, int(f.debt_armed), f.debt_epoch)
                        for f in flags
                    ],
                )
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    async def record_detected(self, notes: list[NotificationRecord], flags: list[NotifyFlags]) -> None:
        if notes or flags:
            await self._call(self._record_detected, notes, flags)

    def _set_threshold(self, user: str, units: int | None) -> NotifyFlags:
        self.db.execute(SET_THRESHOLD, (user, units))
        row = self.db.execute(f"SELECT {_FLAG_COLS} FROM notify_accounts WHERE user = ?", (user,)).fetchone()
        return _flags(row)

    async def set_low_balance_threshold(self, user: str, units: int | None) -> NotifyFlags:
        return await self._call(self._set_threshold, user, units)

    async def low_balance_thresholds(self) -> dict[str, int]:
        rows = await self._call(
            lambda: self.db.execute(
                "SELECT user, low_balance_threshold FROM notify_accounts "
                "WHERE low_balance_threshold IS NOT NULL"
            ).fetchall()
        )
        return {u: int(t) for u, t in rows}

    def _expiring(
        self, from_ms: int, until_ms: int, after: tuple[str, str] | None, limit: int
    ) -> tuple[list[ExpiringGrant], tuple[str, str] | None]:
        # A page of the primary key first (bounded work), then the filter over it.
        rows = self.db.execute(
            "SELECT user, seq, free, expires_ms, metadata, gone FROM grants "
            "WHERE (user, seq) > (?, ?) ORDER BY user, seq LIMIT ?",
            (*(after or ("", "")), limit),
        ).fetchall()
        found = [
            ExpiringGrant(u, s, int(free), int(exp), meta)
            for u, s, free, exp, meta, gone in rows
            if not gone and free and exp and from_ms < exp <= until_ms
        ]
        nxt = (rows[-1][0], rows[-1][1]) if len(rows) == limit else None
        return found, nxt

    async def expiring_grants(
        self, from_ms: int, until_ms: int, after: tuple[str, str] | None, limit: int
    ) -> tuple[list[ExpiringGrant], tuple[str, str] | None]:
        return await self._call(self._expiring, from_ms, until_ms, after, limit)
