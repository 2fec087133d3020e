"""The SQLite store's promo codes (see store/promos.py): one row per code, its definition
as JSON."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable
from typing import Any, TypeVar

from . import sql
from .promos import PromoRecord, PromoStore, promo_doc, promo_of

T = TypeVar("T")


class SQLitePromos(PromoStore):
    """Mixed into SQLiteStore: every call runs on the store's thread (`_call`)."""

    @property
    def db(self) -> sqlite3.Connection:  # provided by SQLiteStore
        raise NotImplementedError

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:  # provided by SQLiteStore
        raise NotImplementedError

    async def create_promo(self, p: PromoRecord) -> None:
        row = (p.code, int(p.active), p.created_ms, json.dumps(promo_doc(p)))
        try:
            await self._call(lambda: self.db.execute(sql.PROMO_INSERT, row))
        except sqlite3.IntegrityError:
            raise KeyError(p.code) from None

    async def promo(self, code: str) -> PromoRecord | None:
        row = await self._call(lambda: self.db.execute(sql.PROMO_OF, (code,)).fetchone())
        return promo_of(json.loads(row[0])) if row else None

    async def list_promos(self, *, active_only: bool = False) -> list[PromoRecord]:
        rows = await self._call(lambda: self.db.execute(sql.promos_listed(active_only)).fetchall())
        return [promo_of(json.loads(r[0])) for r in rows]

    def _update(self, code: str, changes: dict[str, Any]) -> PromoRecord | None:
        db = self.db
        db.execute("BEGIN IMMEDIATE")  # read and write of one admin change, not interleaved
        try:
            row = db.execute(sql.PROMO_OF, (code,)).fetchone()
            if row is None:
                db.execute("ROLLBACK")
                return None
            p = promo_of({**json.loads(row[0]), **changes})
            db.execute(sql.PROMO_SET, (int(p.active), json.dumps(promo_doc(p)), code))
            db.execute("COMMIT")
            return p
        except BaseException:
            db.execute("ROLLBACK")
            raise

    async def update_promo(self, code: str, changes: dict[str, Any]) -> PromoRecord | None:
        return await self._call(self._update, code, changes)

    async def add_promo_claim(self, code: str, user: str, n: int, at_ms: int) -> None:
        await self._call(lambda: self.db.execute(sql.PROMO_CLAIM, (code, user, n, at_ms)))

    async def promo_claims(self, code: str) -> list[tuple[str, int, int]]:
        rows = await self._call(lambda: self.db.execute(sql.PROMO_CLAIMS, (code,)).fetchall())
        return [(r[0], int(r[1]), int(r[2])) for r in rows]

    async def first_seen_ms(self, user: str) -> int | None:
        row = await self._call(lambda: self.db.execute(sql.FIRST_SEEN, (user,)).fetchone())
        return int(row[0]) if row and row[0] is not None else None
