"""The MongoDB store (pymongo's AsyncMongoClient). No multi-document transactions.

Collections: `ledger` (one document per event, unique (user_id, op_id)), `accounts`
(_id = user), `grants` (_id = "user|seq"), `holds` (_id = "user|hold_id"), `api_keys`,
`rate_limits` (_id = user), `meta` (the schema version, see `_migrate`), and the payment,
promo and notification collections of the mixins (mongo_payments.py, mongo_promos.py,
mongo_notifications.py). Their validators and indexes are defined in store/schema.py and
applied on open (mongo_schema.py).

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
from contextlib import suppress
from typing import Any

import orjson
from bson import Int64
from pymongo import ASCENDING, DESCENDING, AsyncMongoClient, ReturnDocument, UpdateOne
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import BulkWriteError, OperationFailure

from ..events import answer_of
from .base import (
    GRANT_RENAMES_1_TO_2,
    HOLD_RENAMES_1_TO_2,
    RATE_LIMIT_RENAMES_1_TO_2,
    TOTAL_FIELDS,
    AccountSnapshot,
    ApiKeyRecord,
    LedgerEntry,
    OperationRecord,
    RateLimitOverride,
    ResolvedHold,
    Store,
    restore_grant,
    restore_hold,
)
from .batch import AccountRow, GrantRow, HoldRow, LedgerRow
from .mongo_notifications import MongoNotifications
from .mongo_payments import MongoPayments
from .mongo_plans import MongoPlans
from .mongo_promos import MongoPromos
from .mongo_schema import apply_mongo_schema

Doc = dict[str, Any]

DUPLICATE_KEY = 11000
SCHEMA_VERSION = 2

# Version 1 -> 2: the documents' short field names (the Lua hash fields'), by collection.
RENAMES_1_TO_2 = {
    "ledger": {"fp": "fingerprint"},
    "accounts": {"state_debt_total": "debt_total"},
    "grants": {**GRANT_RENAMES_1_TO_2, "m": "metadata"},
    "holds": HOLD_RENAMES_1_TO_2,
    "rate_limits": RATE_LIMIT_RENAMES_1_TO_2,
}
OLD_INDEXES = {"holds": ["user_id_1_st_1"]}  # version 1's index on a renamed field

# Versions, times and amounts are stored and compared as BSON int64 whatever their size:
# mongoeco's index scans compare an int32 bound with int64 values by type, not by value
# ({ts_ms: {$gte: 0}} finds nothing on an index of millisecond times). Harmless on MongoDB.
L = Int64
LIMIT_FIELDS = (
    "requests_per_minute",
    "tokens_per_minute",
    "plan_requests_per_minute",
    "plan_tokens_per_minute",
    "allowed_models",
)


class SchemaTooNew(RuntimeError):
    """The database was written by a newer version of the gateway."""


def _only_duplicates(exc: BulkWriteError) -> bool:
    d = exc.details or {}
    errs = d.get("writeErrors") or []
    return (
        bool(errs) and all(e.get("code") == DUPLICATE_KEY for e in errs) and not d.get("writeConcernErrors")
    )


def _ledger_entry(d: Doc) -> LedgerEntry:
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


class MongoStore(MongoPayments, MongoPromos, MongoPlans, MongoNotifications, Store):
    def __init__(self, uri: str, db: str = "credit_management") -> None:
        self.uri = uri
        self.db_name = db
        self._client: AsyncMongoClient[Doc] | None = None

    @classmethod
    def from_url(cls, url: str, *, database: str = "credit_management") -> MongoStore:
        """`mongodb://` or `mongodb+srv://` as pymongo takes it; the database is `database`."""
        return cls(url, database)

    @property
    def db(self) -> AsyncDatabase[Doc]:
        if self._client is None:
            raise RuntimeError("MongoStore is not open")
        return self._client[self.db_name]

    async def open(self) -> None:
        if self._client is not None:
            return
        self._client = AsyncMongoClient(self.uri)
        await apply_mongo_schema(self.db)
        await self._migrate()

    async def _migrate(self) -> None:
        """Brings the documents to SCHEMA_VERSION. Each step may run again (a $rename of a
        field a document no longer has does nothing), so an interrupted migration is finished
        by the next open; the version is recorded last. Processes of the previous version
        must be stopped first: they would go on writing the old names."""
        db = self.db
        meta = await db.meta.find_one({"_id": "schema"})
        if meta is not None:
            found = int(meta["version"])
        elif await db.ledger.find_one({}, {"_id": 1}) or await db.api_keys.find_one({}, {"_id": 1}):
            found = 1  # written before the version was kept
        else:
            found = SCHEMA_VERSION  # a new database
        if found > SCHEMA_VERSION:
            raise SchemaTooNew(
                f"the store database has schema version {found}; this gateway knows up to {SCHEMA_VERSION}"
            )
        if found < 2:
            for name, renames in RENAMES_1_TO_2.items():
                await db[name].update_many(
                    {"$or": [{old: {"$exists": True}} for old in renames]}, {"$rename": renames}
                )
            for name, indexes in OLD_INDEXES.items():
                for index in indexes:
                    with suppress(OperationFailure):  # never made: a database older than the index
                        await db[name].drop_index(index)
        if meta is None or found != SCHEMA_VERSION:
            await db.meta.update_one({"_id": "schema"}, {"$set": {"version": SCHEMA_VERSION}}, upsert=True)

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

    # -- write hooks (Store.write_events) ----------------------------------------------------

    @staticmethod
    async def _bulk(coll: AsyncCollection[Doc], ops: list[UpdateOne]) -> None:
        if not ops:
            return
        try:
            await coll.bulk_write(ops, ordered=False)
        except BulkWriteError as exc:
            if not _only_duplicates(exc):
                raise

    async def _insert_ledger(self, rows: list[LedgerRow]) -> int:
        docs = [
            {
                "user_id": user,
                "op_id": op_id,
                "type": type_,
                "version": L(version),
                "ts_ms": L(ts_ms),
                "amount": L(amount),
                "hold_id": hold_id,
                "fingerprint": fingerprint,
                "event": event,
            }
            for user, op_id, type_, version, ts_ms, amount, hold_id, fingerprint, event in rows
        ]
        try:
            return len((await self.db.ledger.insert_many(docs, ordered=False)).inserted_ids)
        except BulkWriteError as exc:
            if not _only_duplicates(exc):
                raise
            return int(exc.details.get("nInserted") or 0)

    async def _ledger_versions(self, keys: set[tuple[str, str]]) -> dict[tuple[str, str], int]:
        by_user: dict[str, list[str]] = {}
        for user, op_id in keys:
            by_user.setdefault(user, []).append(op_id)
        cur = self.db.ledger.find(
            {"$or": [{"user_id": u, "op_id": {"$in": ops}} for u, ops in by_user.items()]},
            {"_id": 0, "user_id": 1, "op_id": 1, "version": 1},
        )
        return {(d["user_id"], d["op_id"]): int(d["version"]) async for d in cur}

    async def _write_accounts(self, rows: list[AccountRow]) -> None:
        await self._bulk(
            self.db.accounts,
            [
                UpdateOne(
                    {"_id": user, "version": {"$lt": L(version)}},
                    {
                        "$set": {
                            "version": L(version),
                            "partition": partition,
                            **{k: L(n) for k, n in zip(TOTAL_FIELDS, totals, strict=True)},
                            "debt_total": L(debt_total),
                        }
                    },
                    upsert=True,
                )
                for user, version, partition, *totals, debt_total in rows
            ],
        )

    async def _write_grants(self, rows: list[GrantRow]) -> None:
        ops = []
        for g in rows:
            k = f"{g.user}|{g.seq}"
            if g.free is not None and g.earmarked is not None:  # the balance: version > 0
                ops.append(
                    UpdateOne(
                        {"_id": k, "version": {"$lt": L(g.version)}},
                        {
                            "$set": {
                                "user_id": g.user,
                                "seq": g.seq,
                                "version": L(g.version),
                                "free": L(g.free),
                                "earmarked": L(g.earmarked),
                                "gone": g.gone,
                            }
                        },
                        upsert=True,
                    )
                )
            if g.metadata is not None and g.expires_ms is not None:
                ops.append(
                    UpdateOne(
                        {"_id": k},
                        {
                            "$set": {
                                "metadata": g.metadata,
                                "expires_ms": L(g.expires_ms),
                                "priority": g.priority,
                            },
                            "$setOnInsert": {"user_id": g.user, "seq": g.seq, "version": L(0), "gone": False},
                        },
                        upsert=True,
                    )
                )
        await self._bulk(self.db.grants, ops)

    async def _write_holds(self, rows: list[HoldRow]) -> None:
        ops = []
        for h in rows:
            k = f"{h.user}|{h.hold_id}"
            if h.amount is not None and h.expires_ms is not None:  # its state: version > 0
                ops.append(
                    UpdateOne(
                        {"_id": k, "version": {"$lt": L(h.version)}},
                        {
                            "$set": {
                                "user_id": h.user,
                                "hold_id": h.hold_id,
                                "version": L(h.version),
                                "status": h.status,
                                "amount": L(h.amount),
                                "expires_ms": L(h.expires_ms),
                                "charged": None if h.charged is None else L(h.charged),
                            },
                            "$setOnInsert": {"open_version": L(0)},
                        },
                        upsert=True,
                    )
                )
            if h.open_version:
                ops.append(
                    UpdateOne(
                        {"_id": k, "open_version": {"$lt": L(h.open_version)}},
                        {
                            "$set": {
                                "open_version": L(h.open_version),
                                "earmarks": h.earmarks,
                                "opened_ms": L(h.opened_ms or 0),
                                "op_id": h.op_id,
                                "metadata": h.metadata,
                            },
                            "$setOnInsert": {"user_id": h.user, "hold_id": h.hold_id, "version": L(0)},
                        },
                        upsert=True,
                    )
                )
        await self._bulk(self.db.holds, ops)

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

    async def _snapshot_of(self, a: Doc) -> AccountSnapshot:
        user = a["_id"]
        totals = {k: int(a.get(k) or 0) for k in TOTAL_FIELDS}
        totals["debt_total"] = int(a.get("debt_total") or 0)
        grants = [
            restore_grant(
                g["seq"], g["free"], g["earmarked"], g.get("expires_ms"), g.get("priority"), g.get("metadata")
            )
            async for g in self.db.grants.find({"user_id": user, "gone": False}).sort("seq", ASCENDING)
            if g.get("free") is not None
        ]
        holds = [
            restore_hold(
                h["hold_id"],
                h["amount"],
                h["expires_ms"],
                h.get("earmarks"),
                h.get("opened_ms"),
                h.get("op_id"),
                h.get("metadata"),
            )
            async for h in self.db.holds.find({"user_id": user, "status": "open"}).sort("hold_id", ASCENDING)
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
            {"ts_ms": {"$gte": L(ts_ms)}, "fingerprint": {"$ne": None}},
            {"user_id": 1, "op_id": 1, "fingerprint": 1, "event": 1, "ts_ms": 1},
        ).sort([("ts_ms", ASCENDING), ("user_id", ASCENDING), ("op_id", ASCENDING)])
        async for d in cur:
            fp = d.get("fingerprint")
            answer = answer_of(orjson.loads(d["event"])) if fp is not None else None
            if fp is not None and answer is not None:
                yield OperationRecord(d["user_id"], d["op_id"], fp, answer, int(d["ts_ms"]))

    async def resolved_holds_since(self, expires_ms: int) -> AsyncIterator[ResolvedHold]:
        cur = self.db.holds.find(
            {"status": {"$in": ["settled", "released", "expired"]}, "expires_ms": {"$gte": L(expires_ms)}},
            {"user_id": 1, "hold_id": 1, "status": 1, "expires_ms": 1},
        ).sort("_id", ASCENDING)
        async for d in cur:
            yield ResolvedHold(d["user_id"], d["hold_id"], d["status"], int(d["expires_ms"]))

    # -- API keys and rate-limit overrides -------------------------------------------------

    @staticmethod
    def _key_of(d: Doc) -> ApiKeyRecord:
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

    async def _set_limits(self, user: str, values: dict[str, Any]) -> RateLimitOverride | None:
        d = await self.db.rate_limits.find_one_and_update(
            {"_id": user}, {"$set": values}, upsert=True, return_document=ReturnDocument.AFTER
        )
        o = self._limits_of(d or {"_id": user})
        if o.empty:
            # Removed only if still empty: a concurrent change in between keeps the row.
            await self.db.rate_limits.delete_one({"_id": user, **dict.fromkeys(LIMIT_FIELDS)})
            return None
        return o

    @staticmethod
    def _limits_of(d: Doc) -> RateLimitOverride:
        def n(f: str) -> int | None:
            return None if d.get(f) is None else int(d[f])

        models = d.get("allowed_models")
        return RateLimitOverride(
            d["_id"],
            n("requests_per_minute"),
            n("tokens_per_minute"),
            n("plan_requests_per_minute"),
            n("plan_tokens_per_minute"),
            None if models is None else [str(m) for m in models],
        )

    async def rate_limits(self, user: str) -> RateLimitOverride | None:
        d = await self.db.rate_limits.find_one({"_id": user})
        return None if d is None else self._limits_of(d)

    async def all_rate_limits(self) -> AsyncIterator[RateLimitOverride]:
        async for d in self.db.rate_limits.find({}).sort("_id", ASCENDING):
            yield self._limits_of(d)
