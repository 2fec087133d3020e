"""The PostgreSQL store's notifications (see store/notifications.py): the `notifications`
outbox and `notify_accounts`; the statements are store/sql.py's, shared with SQLite, but
the claim (rows locked, skipped by a concurrent claim) and the batches (one array per
column)."""

from __future__ import annotations

from typing import Any

from . import sql
from .notifications import (
    NOTIFICATION_FIELDS,
    ExpiringGrant,
    NotificationRecord,
    NotificationStore,
    NotifyFlags,
    new_notification_id,
)
from .postgres_pool import Pool
from .sql import affected, columns, numbered, unnest

NOTE_TYPES = tuple(
    "bigint"
    if f in ("created_ms", "attempts", "next_attempt_ms", "delivered_ms", "pending_since_ms")
    else "text"
    for f in NOTIFICATION_FIELDS
)
INSERT_NOTES = f"{sql.NOTE_INSERT} {unnest(NOTE_TYPES)} ON CONFLICT DO NOTHING"
FLAG_TYPES = ("text", "bigint", "bigint", "bigint", "bigint", "bigint")
UPSERT_FLAGS = (
    f"{sql.FLAG_INSERT} SELECT *, NULL::bigint FROM ({unnest(FLAG_TYPES)}) AS f {sql.FLAG_CONFLICT}"
)
# One statement, atomic against other claims; a row another claim holds locked is skipped
# rather than waited for (that claim moves it past now).
CLAIM = numbered(
    f"{sql.CLAIM_SET} WHERE id IN (SELECT id FROM notifications WHERE {sql.CLAIM_DUE} "
    f"ORDER BY next_attempt_ms LIMIT ? FOR UPDATE SKIP LOCKED) AND {sql.CLAIM_DUE} RETURNING {sql.NOTE_COLS}"
)


class PostgresNotifications(NotificationStore):
    """Mixed into PostgresStore: every call takes a connection of its pool."""

    @property
    def pool(self) -> Pool:  # provided by PostgresStore
        raise NotImplementedError

    async def add_notifications(self, notes: list[NotificationRecord]) -> int:
        if not notes:
            return 0
        rows = [sql.note_row(n) for n in notes]
        return affected(await self.pool.execute(INSERT_NOTES, *columns(rows, len(NOTE_TYPES))))

    async def notification(self, notification_id: str) -> NotificationRecord | None:
        row = await self.pool.fetchrow(numbered(sql.NOTE_OF), notification_id)
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
        return [sql.note_of(r) for r in await self.pool.fetch(numbered(statement), *args)]

    async def claim_notifications(
        self, now_ms: int, lease_ms: int, token: str, limit: int
    ) -> list[NotificationRecord]:
        rows = await self.pool.fetch(CLAIM, now_ms + lease_ms, token, now_ms, limit, now_ms)
        return sorted((sql.note_of(r) for r in rows), key=lambda n: (n.next_attempt_ms, n.created_ms))

    async def finish_notification(self, notification_id: str, token: str, changes: dict[str, Any]) -> bool:
        statement, args = sql.finish_notification(notification_id, token, changes)
        return affected(await self.pool.execute(numbered(statement), *args)) == 1

    async def prune_notifications(self, before_ms: int) -> int:
        first_kept = new_notification_id(before_ms)[: len("ntf_") + 12]  # its creation-time prefix
        return affected(await self.pool.execute(numbered(sql.PRUNE), first_kept))

    async def resend_notification(self, notification_id: str, now_ms: int) -> NotificationRecord | None:
        async with self.pool.acquire() as conn:
            await conn.execute(numbered(sql.RESEND), now_ms, now_ms, notification_id, now_ms)
            row = await conn.fetchrow(numbered(sql.NOTE_OF), notification_id)
        return sql.note_of(row) if row else None

    async def notify_flags(self, users: list[str]) -> dict[str, NotifyFlags]:
        if not users:
            return {}
        rows = await self.pool.fetch(
            f'SELECT {sql.FLAG_COLS} FROM notify_accounts WHERE "user" = ANY($1::text[])', users
        )
        return {r[0]: sql.flags_of(r) for r in rows}

    async def record_detected(self, notes: list[NotificationRecord], flags: list[NotifyFlags]) -> None:
        if not (notes or flags):
            return
        async with self.pool.acquire() as conn, conn.transaction():  # the notes and their flags, or neither
            if notes:
                rows = [sql.note_row(n) for n in notes]
                await conn.execute(INSERT_NOTES, *columns(rows, len(NOTE_TYPES)))
            if flags:
                await conn.execute(UPSERT_FLAGS, *columns([sql.flags_row(f) for f in flags], len(FLAG_TYPES)))

    async def set_low_balance_threshold(self, user: str, units: int | None) -> NotifyFlags:
        async with self.pool.acquire() as conn:
            await conn.execute(numbered(sql.SET_THRESHOLD), user, units)
            return sql.flags_of(await conn.fetchrow(numbered(sql.FLAGS_OF), user))

    async def low_balance_thresholds(self) -> dict[str, int]:
        return {u: int(t) for u, t in await self.pool.fetch(sql.THRESHOLDS)}

    async def expiring_grants(
        self, from_ms: int, until_ms: int, after: tuple[str, str] | None, limit: int
    ) -> tuple[list[ExpiringGrant], tuple[str, str] | None]:
        rows = await self.pool.fetch(numbered(sql.GRANTS_PAGE), *(after or ("", "")), limit)
        return sql.expiring(rows, from_ms, until_ms, limit)
