"""The PostgreSQL store's promo codes (see store/promos.py): one row per code, its
definition as JSON; the statements are store/sql.py's, shared with SQLite."""

from __future__ import annotations

import json
from typing import Any

import asyncpg

from . import sql
from .postgres_pool import Pool
from .promos import PromoRecord, PromoStore, promo_doc, promo_of
from .sql import numbered


class PostgresPromos(PromoStore):
    """Mixed into PostgresStore: every call takes a connection of its pool."""

    @property
    def pool(self) -> Pool:  # provided by PostgresStore
        raise NotImplementedError

    async def create_promo(self, p: PromoRecord) -> None:
        try:
            await self.pool.execute(
                numbered(sql.PROMO_INSERT), p.code, int(p.active), p.created_ms, json.dumps(promo_doc(p))
            )
        except asyncpg.UniqueViolationError:
            raise KeyError(p.code) from None

    async def promo(self, code: str) -> PromoRecord | None:
        doc = await self.pool.fetchval(numbered(sql.PROMO_OF), code)
        return promo_of(json.loads(doc)) if doc else None

    async def list_promos(self, *, active_only: bool = False) -> list[PromoRecord]:
        return [promo_of(json.loads(r[0])) for r in await self.pool.fetch(sql.promos_listed(active_only))]

    async def update_promo(self, code: str, changes: dict[str, Any]) -> PromoRecord | None:
        # The row locked from the read to the write of one admin change: none interleaves.
        async with self.pool.acquire() as conn, conn.transaction():
            doc = await conn.fetchval(numbered(sql.PROMO_OF) + " FOR UPDATE", code)
            if doc is None:
                return None
            p = promo_of({**json.loads(doc), **changes})
            await conn.execute(numbered(sql.PROMO_SET), int(p.active), json.dumps(promo_doc(p)), code)
        return p

    async def add_promo_claim(self, code: str, user: str, n: int, at_ms: int) -> None:
        await self.pool.execute(numbered(sql.PROMO_CLAIM), code, user, n, at_ms)

    async def promo_claims(self, code: str) -> list[tuple[str, int, int]]:
        return [(r[0], int(r[1]), int(r[2])) for r in await self.pool.fetch(numbered(sql.PROMO_CLAIMS), code)]

    async def first_seen_ms(self, user: str) -> int | None:
        first = await self.pool.fetchval(numbered(sql.FIRST_SEEN), user)
        return int(first) if first is not None else None
