"""The MongoDB store's promo codes (see store/promos.py): `promos` (_id = code)."""

from __future__ import annotations

import contextlib
from typing import Any

from bson import Int64
from pymongo import ASCENDING, ReturnDocument
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import DuplicateKeyError

from .promos import PromoRecord, PromoStore, promo_doc, promo_of


class MongoPromos(PromoStore):
    """Mixed into MongoStore."""

    @property
    def db(self) -> AsyncDatabase:  # provided by MongoStore
        raise NotImplementedError

    async def create_promo(self, p: PromoRecord) -> None:
        try:
            await self.db.promos.insert_one({"_id": p.code, **promo_doc(p)})
        except DuplicateKeyError:
            raise KeyError(p.code) from None

    async def promo(self, code: str) -> PromoRecord | None:
        d = await self.db.promos.find_one({"_id": code})
        return None if d is None else promo_of(d)

    async def list_promos(self, *, active_only: bool = False) -> list[PromoRecord]:
        cur = self.db.promos.find({"active": True} if active_only else {})
        return [promo_of(d) async for d in cur.sort([("created_ms", ASCENDING), ("_id", ASCENDING)])]

    async def update_promo(self, code: str, changes: dict[str, Any]) -> PromoRecord | None:
        # Only the changed fields: a concurrent change of other fields is kept.
        d = await self.db.promos.find_one_and_update(
            {"_id": code}, {"$set": changes}, return_document=ReturnDocument.AFTER
        )
        return None if d is None else promo_of(d)

    async def add_promo_claim(self, code: str, user: str, n: int, at_ms: int) -> None:
        doc = {"_id": f"{code}|{user}|{n}", "code": code, "user_id": user, "n": n, "at_ms": Int64(at_ms)}
        with contextlib.suppress(DuplicateKeyError):  # recorded already: a repeat changes nothing
            await self.db.promo_claims.insert_one(doc)

    async def promo_claims(self, code: str) -> list[tuple[str, int, int]]:
        cur = self.db.promo_claims.find({"code": code}).sort([("user_id", ASCENDING), ("n", ASCENDING)])
        return [(d["user_id"], int(d["n"]), int(d["at_ms"])) async for d in cur]

    async def first_seen_ms(self, user: str) -> int | None:
        async for d in self.db.ledger.find({"user_id": user}).sort("ts_ms", ASCENDING).limit(1):
            return int(d["ts_ms"])
        return None
