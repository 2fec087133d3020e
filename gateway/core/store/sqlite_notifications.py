"""The SQLite store's notifications (see store/notifications.py): the `notifications`
outbox and `notify_accounts`, one row per account with a threshold or a flag changed."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable
from typing import Any, TypeVar

from . import sql
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
# key's and the user's indexes take the random inserts. The statements are store/sql.py's,
# shared with PostgreSQL.
INSERT_NOTE = f"{sql.NOTE_INSERT} VALUES ({sql.marks(len(NOTIFICATION_FIELDS))}) ON CONFLICT DO NOTHING"
UPSERT_FLAGS = f"{sql.FLAG_INSERT} VALUES ({sql.marks(6)}, NULL) {sql.FLAG_CONFLICT}"
# One statement: atomic against other claims, in this process or another one.
CLAIM = f"""{sql.CLAIM_SET} WHERE id IN (
    SELECT id FROM notifications INDEXED BY notifications_due
    WHERE {sql.CLAIM_DUE} ORDER BY next_attempt_ms LIMIT ?
) AND {sql.CLAIM_DUE}
RETURNING {sql.NOTE_COLS}"""


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
        db.executemany(INSERT_NOTE, [sql.note_row(n) for n in notes])
        return db.total_changes - before

    async def add_notifications(self, notes: list[NotificationRecord]) -> int:
        if not notes:
            return 0
        return await self._call(self._insert_notes, notes)

    async def notification(self, notification_id: str) -> NotificationRecord | None:
        row = await self._call(lambda: self.db.execute(sql.NOTE_OF, (notification_id,)).fetchone())
        return sql.note_of(row) if row else None

    async def list_notifications(
        self,
        *,
        user: str | None = None,
        kind: str | None = None,
        status: str | None = None,
        before: str | None = None,
        limit: int = 50,
    ) -> list[NotificationRecord]:
        statement, args = sql.list_notifications(user, kind, status, before, limit)
        rows = await self._call(lambda: self.db.execute(statement, args).fetchall())
        return [sql.note_of(r) for r in rows]

    async def claim_notifications(
        self, now_ms: int, lease_ms: int, token: str, limit: int
    ) -> list[NotificationRecord]:
        args = (now_ms + lease_ms, token, now_ms, limit, now_ms)
        rows = await self._call(lambda: self.db.execute(CLAIM, args).fetchall())
        return sorted((sql.note_of(r) for r in rows), key=lambda n: (n.next_attempt_ms, n.created_ms))

    async def finish_notification(self, notification_id: str, token: str, changes: dict[str, Any]) -> bool:
        statement, args = sql.finish_notification(notification_id, token, changes)
        return await self._call(lambda: self.db.execute(statement, args).rowcount) == 1

    def _resend(self, notification_id: str, now_ms: int) -> NotificationRecord | None:
        self.db.execute(sql.RESEND, (now_ms, now_ms, notification_id, now_ms))
        row = self.db.execute(sql.NOTE_OF, (notification_id,)).fetchone()
        return sql.note_of(row) if row else None

    async def prune_notifications(self, before_ms: int) -> int:
        first_kept = new_notification_id(before_ms)[: len("ntf_") + 12]  # its creation-time prefix
        return await self._call(lambda: self.db.execute(sql.PRUNE, (first_kept,)).rowcount)

    async def resend_notification(self, notification_id: str, now_ms: int) -> NotificationRecord | None:
        return await self._call(self._resend, notification_id, now_ms)

    async def notify_flags(self, users: list[str]) -> dict[str, NotifyFlags]:
        if not users:
            return {}
        statement = (
            f"SELECT {sql.FLAG_COLS} FROM json_each(?) AS k CROSS JOIN notify_accounts AS a "
            "WHERE a.user = k.value"
        )
        rows = await self._call(lambda: self.db.execute(statement, (json.dumps(users),)).fetchall())
        return {r[0]: sql.flags_of(r) for r in rows}

    def _record_detected(self, notes: list[NotificationRecord], flags: list[NotifyFlags]) -> None:
        db = self.db
        db.execute("BEGIN IMMEDIATE")  # the notes and their flags together, or neither
        try:
            if notes:
                db.executemany(INSERT_NOTE, [sql.note_row(n) for n in notes])
            if flags:
                db.executemany(UPSERT_FLAGS, [sql.flags_row(f) for f in flags])
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    async def record_detected(self, notes: list[NotificationRecord], flags: list[NotifyFlags]) -> None:
        if notes or flags:
            await self._call(self._record_detected, notes, flags)

    def _set_threshold(self, user: str, units: int | None) -> NotifyFlags:
        self.db.execute(sql.SET_THRESHOLD, (user, units))
        return sql.flags_of(self.db.execute(sql.FLAGS_OF, (user,)).fetchone())

    async def set_low_balance_threshold(self, user: str, units: int | None) -> NotifyFlags:
        return await self._call(self._set_threshold, user, units)

    async def low_balance_thresholds(self) -> dict[str, int]:
        rows = await self._call(lambda: self.db.execute(sql.THRESHOLDS).fetchall())
        return {u: int(t) for u, t in rows}

    def _expiring(
        self, from_ms: int, until_ms: int, after: tuple[str, str] | None, limit: int
    ) -> tuple[list[ExpiringGrant], tuple[str, str] | None]:
        rows = self.db.execute(sql.GRANTS_PAGE, (*(after or ("", "")), limit)).fetchall()
        return sql.expiring(rows, from_ms, until_ms, limit)

    async def expiring_grants(
        self, from_ms: int, until_ms: int, after: tuple[str, str] | None, limit: int
    ) -> tuple[list[ExpiringGrant], tuple[str, str] | None]:
        return await self._call(self._expiring, from_ms, until_ms, after, limit)
