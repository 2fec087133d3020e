"""The MongoDB store (pymongo's AsyncMongoClient). No multi-document transactions.

Collections: `ledger` (one document per event, unique (user_id, op_id)), `accounts`
(_id = user), `grants` (_id = "user|seq"), `holds` (_id = "user|hold_id").

Every snapshot write is an upsert guarded by the version: {_id, version: {$lt: v}}. When a
newer version is already stored the filter misses, the upsert tries to insert a second
document with the same _id and fails with 11000: that is the expected "older event" outcome
and is ignored. Fields that only some events carry (grant metadata, a hold's opening
fields) are written by a separate upsert with its own guard, so a late creation event still
fills them; each of the two upserts seeds the other's guard field with $setOnInsert so that
neither finds a document without it.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import orjson
from bson import Int64
from pymongo import ASCENDING, DESCENDING, AsyncMongoClient, UpdateOne
from pymongo.errors import BulkWriteError

from ..events import Event, answer_of
from .base import (
    AccountSnapshot,
    ApiKeyRecord,
    LedgerEntry,
    OperationRecord,
    RateLimitOverride,
    ResolvedHold,
    Store,
)
from .sqlite import TOTAL_FIELDS, collapse, grant_out, hold_out, reissued

DUPLICATE_KEY = 11000

# Versions, times and amounts are stored and compared as BSON int64 whatever their size:
# mongoeco's index scans compare an int32 bound with int64 values by type, not by value
# ({ts_ms: {$gte: 0}} finds nothing on an index of millisecond times). Harmless on MongoDB.
L = Int64


def _only_duplicates(exc: BulkWriteError) -> bool:
    d = exc.details or {}
    errs = d.get("writeErrors") or []
    return (
        bool(errs) and all(e.get("code") == DUPLICATE_KEY for e in errs) and not d.get("writeConcernErrors")
    )


def _ledger_entry(d: dict) -> LedgerEntry:
    return LedgerEntry(
        d["user_id"],
        d["op_id"],
        d["type"],
        int(d["version"]),
        int(d["ts_ms"]),
        int(d["amount"]),
        d.get("hold_id"),
        json.loads(d["event"]),
    )


class MongoStore(Store):
    def __init__(self, uri: str, db: str = "credit_management") -> None:
        self.uri = uri
        self.db_name = db
        self._client: AsyncMongoClient | None = None

    @property
    def db(self):
        if self._client is None:
            raise RuntimeError("MongoStore is not open")
        return self._client[self.db_name]

    async def open(self) -> None:
        if self._client is not None:
            return
        self._client = AsyncMongoClient(self.uri)
        db = self.db
        await db.ledger.create_index([("user_id", ASCENDING), ("op_id", ASCENDING)], unique=True)
        await db.ledger.create_index([("user_id", ASCENDING), ("version", ASCENDING)])
        await db.ledger.create_index([("ts_ms", ASCENDING)])
        await db.accounts.create_index([("partition", ASCENDING)])
        await db.grants.create_index([("user_id", ASCENDING), ("seq", ASCENDING)])
        await db.holds.create_index([("user_id", ASCENDING), ("st", ASCENDING)])
        await db.api_keys.create_index([("digest", ASCENDING)], unique=True)
        await db.api_keys.create_index([("user_id", ASCENDING), ("created_ms", ASCENDING)])

    async def close(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            await client.close()

    async def ping(self) -> bool:
        try:
            r = await self._client.admin.command("ping") if self._client else {}
            return bool(r.get("ok"))
        except Exception:
            return False

    # -- writes -----------------------------------------------------------------------------

    @staticmethod
    async def _bulk(coll, ops: list[UpdateOne]) -> None:
        if not ops:
            return
        try:
            await coll.bulk_write(ops, ordered=False)
        except BulkWriteError as exc:
            if not _only_duplicates(exc):
                raise

    async def _insert_ledger(self, rows: list[tuple]) -> int:
        """Inserts ledger rows (as `collapse` makes them); those already there (unique user +
        op id) are skipped. Returns how many were new."""
        docs = [
            {
                "user_id": u,
                "op_id": o,
                "type": t,
                "version": L(v),
                "ts_ms": L(ts),
                "amount": L(a),
                "hold_id": h,
                "fp": fp,
                "event": e,
            }
            for u, o, t, v, ts, a, h, fp, e in rows
        ]
        try:
            return len((await self.db.ledger.insert_many(docs, ordered=False)).inserted_ids)
        except BulkWriteError as exc:
            if not _only_duplicates(exc):
                raise
            return int(exc.details.get("nInserted") or 0)

    async def write_events(self, events: list[Event]) -> int:
        if not events:
            return 0
        b = collapse(events)
        db = self.db
        new = await self._insert_ledger(b.ledger)
        if new < len(b.ledger):  # some rows were there already: redeliveries, or reused op ids
            stored = {}
            for user, op_id, *_ in b.ledger:
                found = await db.ledger.find_one({"user_id": user, "op_id": op_id}, {"version": 1})
                stored[(user, op_id)] = int(found["version"])
            again = reissued(b.ledger, stored)
            if again:
                new += await self._insert_ledger(again)

        accounts = []
        for user, ev in b.accounts.items():
            t = ev.state
            accounts.append(
                UpdateOne(
                    {"_id": user, "version": {"$lt": L(ev.version)}},
                    {
                        "$set": {
                            "version": L(ev.version),
                            "partition": ev.partition,
                            **{k: L(t[k]) for k in TOTAL_FIELDS},
                            "state_debt_total": L(t["debt_total"]),
                        }
                    },
                    upsert=True,
                )
            )
        grants = []
        for g in b.grants.values():
            k = f"{g.user}|{g.seq}"
            if g.version:
                grants.append(
                    UpdateOne(
                        {"_id": k, "version": {"$lt": L(g.version)}},
                        {
                            "$set": {
                                "user_id": g.user,
                                "seq": g.seq,
                                "version": L(g.version),
                                "r": L(g.r),
                                "e": L(g.e),
                                "gone": g.gone,
                            }
                        },
                        upsert=True,
                    )
                )
            if g.meta is not None:
                grants.append(
                    UpdateOne(
                        {"_id": k},
                        {
                            "$set": {"m": g.meta, "x": L(g.x), "pri": g.pri},
                            "$setOnInsert": {"user_id": g.user, "seq": g.seq, "version": L(0), "gone": False},
                        },
                        upsert=True,
                    )
                )
        holds = []
        for h in b.holds.values():
            k = f"{h.user}|{h.hold_id}"
            if h.version:
                holds.append(
                    UpdateOne(
                        {"_id": k, "version": {"$lt": L(h.version)}},
                        {
                            "$set": {
                                "user_id": h.user,
                                "hold_id": h.hold_id,
                                "version": L(h.version),
                                "st": h.st,
                                "amt": L(h.amt),
                                "exp": L(h.exp),
                                "fin": None if h.fin is None else L(h.fin),
                            },
                            "$setOnInsert": {"open_version": L(0)},
                        },
                        upsert=True,
                    )
                )
            if h.open_version:
                holds.append(
                    UpdateOne(
                        {"_id": k, "open_version": {"$lt": L(h.open_version)}},
                        {
                            "$set": {
                                "open_version": L(h.open_version),
                                "ear": h.ear,
                                "at": L(h.at),
                                "op": h.op,
                                "x": h.x,
                            },
                            "$setOnInsert": {"user_id": h.user, "hold_id": h.hold_id, "version": L(0)},
                        },
                        upsert=True,
                    )
                )
        await self._bulk(db.accounts, accounts)
        await self._bulk(db.grants, grants)
        await self._bulk(db.holds, holds)
        return new

    # -- reads ------------------------------------------------------------------------------

    async def ledger(
        self, user: str, *, before_version: int | None = None, limit: int = 50
    ) -> list[LedgerEntry]:
        q: dict[str, Any] = {"user_id": user}
        if before_version is not None:
            q["version"] = {"$lt": L(before_version)}
        cur = self.db.ledger.find(q).sort("version", DESCENDING).limit(limit)
        return [_ledger_entry(d) async for d in cur]

    async def ledger_all(self, user: str) -> AsyncIterator[LedgerEntry]:
        async for d in self.db.ledger.find({"user_id": user}).sort("version", ASCENDING):
            yield _ledger_entry(d)

    async def _snapshot_of(self, a: dict) -> AccountSnapshot:
        user = a["_id"]
        totals = {k: int(a.get(k) or 0) for k in TOTAL_FIELDS}
        totals["debt_total"] = int(a.get("state_debt_total") or 0)
        grants = [
            grant_out(g["seq"], g["r"], g["e"], g.get("x"), g.get("pri"), g.get("m"))
            async for g in self.db.grants.find({"user_id": user, "gone": False}).sort("seq", ASCENDING)
            if g.get("r") is not None
        ]
        holds = [
            hold_out(h["hold_id"], h["amt"], h["exp"], h.get("ear"), h.get("at"), h.get("op"), h.get("x"))
            async for h in self.db.holds.find({"user_id": user, "st": "open"}).sort("hold_id", ASCENDING)
        ]
        return AccountSnapshot(user, int(a["version"]), totals, grants, holds)

    async def snapshot(self, user: str) -> AccountSnapshot | None:
        a = await self.db.accounts.find_one({"_id": user})
        if a is None:
            return None
        return await self._snapshot_of(a)

    async def snapshots(self, partition: int | None = None) -> AsyncIterator[AccountSnapshot]:
        q = {} if partition is None else {"partition": partition}
        async for a in self.db.accounts.find(q).sort("_id", ASCENDING):
            yield await self._snapshot_of(a)

    async def operations_since(self, ts_ms: int) -> AsyncIterator[OperationRecord]:
        cur = self.db.ledger.find(
            {"ts_ms": {"$gte": L(ts_ms)}, "fp": {"$ne": None}},
            {"user_id": 1, "op_id": 1, "fp": 1, "event": 1, "ts_ms": 1},
        ).sort([("ts_ms", ASCENDING), ("user_id", ASCENDING), ("op_id", ASCENDING)])
        async for d in cur:
            answer = answer_of(orjson.loads(d["event"])) if d.get("fp") is not None else None
            if answer is not None:
                yield OperationRecord(d["user_id"], d["op_id"], d["fp"], answer, int(d["ts_ms"]))

    async def resolved_holds_since(self, expires_ms: int) -> AsyncIterator[ResolvedHold]:
        cur = self.db.holds.find(
            {"st": {"$in": ["settled", "released", "expired"]}, "exp": {"$gte": L(expires_ms)}},
            {"user_id": 1, "hold_id": 1, "st": 1, "exp": 1},
        ).sort("_id", ASCENDING)
        async for d in cur:
            yield ResolvedHold(d["user_id"], d["hold_id"], d["st"], int(d["exp"]))

    # -- API keys and rate-limit overrides -------------------------------------------------

    @staticmethod
    def _key_of(d: dict) -> ApiKeyRecord:
        revoked = d.get("revoked_ms")
        return ApiKeyRecord(
            d["_id"],
            d["user_id"],
            d["digest"],
            d["prefix"],
            d["name"],
            int(d["created_ms"]),
            None if revoked is None else int(revoked),
        )

    async def add_api_key(self, key: ApiKeyRecord) -> None:
        await self.db.api_keys.insert_one(
            {
                "_id": key.key_id,
                "user_id": key.user,
                "digest": key.digest,
                "prefix": key.prefix,
                "name": key.name,
                "created_ms": L(key.created_ms),
                "revoked_ms": None,
            }
        )

    async def revoke_api_key(self, user: str, key_id: str, at_ms: int) -> ApiKeyRecord | None:
        # Only the first revocation sets the time: the filter needs revoked_ms still null.
        await self.db.api_keys.update_one(
            {"_id": key_id, "user_id": user, "revoked_ms": None}, {"$set": {"revoked_ms": L(at_ms)}}
        )
        d = await self.db.api_keys.find_one({"_id": key_id, "user_id": user})
        return None if d is None else self._key_of(d)

    async def api_keys(self, user: str) -> list[ApiKeyRecord]:
        cur = self.db.api_keys.find({"user_id": user}).sort([("created_ms", ASCENDING), ("_id", ASCENDING)])
        return [self._key_of(d) async for d in cur]

    async def active_api_keys(self) -> AsyncIterator[ApiKeyRecord]:
        async for d in self.db.api_keys.find({"revoked_ms": None}).sort("_id", ASCENDING):
            yield self._key_of(d)

    async def set_rate_limits(self, override: RateLimitOverride) -> None:
        o = override
        if o.requests_per_minute is None and o.tokens_per_minute is None:
            await self.db.rate_limits.delete_one({"_id": o.user})
            return
        await self.db.rate_limits.replace_one(
            {"_id": o.user},
            {"_id": o.user, "rpm": o.requests_per_minute, "tpm": o.tokens_per_minute},
            upsert=True,
        )

    @staticmethod
    def _limits_of(d: dict) -> RateLimitOverride:
        rpm, tpm = d.get("rpm"), d.get("tpm")
        return RateLimitOverride(
            d["_id"], None if rpm is None else int(rpm), None if tpm is None else int(tpm)
        )

    async def rate_limits(self, user: str) -> RateLimitOverride | None:
        d = await self.db.rate_limits.find_one({"_id": user})
        return None if d is None else self._limits_of(d)

    async def all_rate_limits(self) -> AsyncIterator[RateLimitOverride]:
        async for d in self.db.rate_limits.find({}).sort("_id", ASCENDING):
            yield self._limits_of(d)
