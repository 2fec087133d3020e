"""The MongoDB store's notifications (see store/notifications.py): `notifications`
(_id = the dedup key, so a second insert of it fails as a duplicate; `id` unique too) and
`notify_accounts` (_id = user)."""

from __future__ import annotations

from typing import Any

from bson import Int64
from pymongo import ASCENDING, DESCENDING, ReturnDocument, UpdateOne
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import BulkWriteError, DuplicateKeyError

from .notifications import (
    NOTIFICATION_FIELDS,
    ExpiringGrant,
    NotificationRecord,
    NotificationStore,
    NotifyFlags,
    new_notification_id,
)

Doc = dict[str, Any]
DUPLICATE_KEY = 11000
# Times and amounts as int64 whatever their size (see mongo.py: mongoeco compares by type).
_INT_FIELDS = ("created_ms", "attempts", "next_attempt_ms", "delivered_ms", "pending_since_ms")


def _doc(n: NotificationRecord) -> Doc:
    d: Doc = {f: getattr(n, f) for f in NOTIFICATION_FIELDS}
    for f in _INT_FIELDS:
        if d[f] is not None:
            d[f] = Int64(d[f])
    d["user_id"] = d.pop("user")
    d["_id"] = n.dedup_key
    return d


def _note(d: Doc) -> NotificationRecord:
    fields: dict[str, Any] = {f: d.get(f) for f in NOTIFICATION_FIELDS if f != "user"}
    for f in _INT_FIELDS:
        if fields[f] is not None:
            fields[f] = int(fields[f])
    return NotificationRecord(user=d["user_id"], **fields)


def _flags(d: Doc) -> NotifyFlags:
    t = d.get("low_balance_threshold")
    return NotifyFlags(
        d["_id"],
        int(d.get("version") or 0),
        bool(d.get("low_armed", True)),
        int(d.get("low_epoch") or 0),
        bool(d.get("debt_armed", True)),
        int(d.get("debt_epoch") or 0),
        None if t is None else int(t),
    )


def _only_duplicates(exc: BulkWriteError) -> bool:
    d = exc.details or {}
    errs = d.get("writeErrors") or []
    return (
        bool(errs) and all(e.get("code") == DUPLICATE_KEY for e in errs) and not d.get("writeConcernErrors")
    )


class MongoNotifications(NotificationStore):
    """Mixed into MongoStore."""

    @property
    def db(self) -> AsyncDatabase:  # provided by MongoStore
        raise NotImplementedError

    async def add_notifications(self, notes: list[NotificationRecord]) -> int:
        if not notes:
            return 0
        try:
            return len(
                (
                    await self.db.notifications.insert_many([_doc(n) for n in notes], ordered=False)
                ).inserted_ids
            )
        except BulkWriteError as exc:
            if not _only_duplicates(exc):
                raise
            return int(exc.details.get("nInserted") or 0)

    async def notification(self, notification_id: str) -> NotificationRecord | None:
        d = await self.db.notifications.find_one({"id": notification_id})
        return None if d is None else _note(d)

    async def list_notifications(
        self,
        *,
        user: str | None = None,
        kind: str | None = None,
        status: str | None = None,
        before: str | None = None,
        limit: int = 50,
    ) -> list[NotificationRecord]:
        q: Doc = {}
        if user is not None:
            q["user_id"] = user
        if kind is not None:
            q["kind"] = kind
        if status is not None:
            q["status"] = status
        if before is not None:
            q["id"] = {"$lt": before}
        cur = self.db.notifications.find(q).sort("id", DESCENDING).limit(limit)
        return [_note(d) async for d in cur]

    async def claim_notifications(
        self, now_ms: int, lease_ms: int, token: str, limit: int
    ) -> list[NotificationRecord]:
        due = {"status": "pending", "next_attempt_ms": {"$lte": Int64(now_ms)}}
        cur = self.db.notifications.find(due, {"_id": 1}).sort("next_attempt_ms", ASCENDING).limit(limit)
        ids = [d["_id"] async for d in cur]
        claimed = []
        for key in ids:
            # Conditional on still being due: of two workers racing for it, one matches.
            d = await self.db.notifications.find_one_and_update(
                {"_id": key, **due},
                {"$set": {"next_attempt_ms": Int64(now_ms + lease_ms), "lease": token}},
                return_document=ReturnDocument.AFTER,
            )
            if d is not None:
                claimed.append(_note(d))
        return claimed

    async def finish_notification(self, notification_id: str, token: str, changes: dict[str, Any]) -> bool:
        sets: Doc = {}
        for k, v in changes.items():
            if k in NOTIFICATION_FIELDS and k not in ("id", "lease", "user"):
                sets[k] = Int64(v) if k in _INT_FIELDS and v is not None else v
        sets["lease"] = None
        r = await self.db.notifications.update_one({"id": notification_id, "lease": token}, {"$set": sets})
        return r.modified_count == 1

    async def prune_notifications(self, before_ms: int) -> int:
        first_kept = new_notification_id(before_ms)[: len("ntf_") + 12]  # its creation-time prefix
        done = await self.db.notifications.delete_many(
            {"id": {"$lt": first_kept}, "status": {"$in": ["delivered", "failed"]}}
        )
        return done.deleted_count

    async def resend_notification(self, notification_id: str, now_ms: int) -> NotificationRecord | None:
        not_in_flight = [{"lease": None}, {"next_attempt_ms": {"$lte": Int64(now_ms)}}]
        d = await self.db.notifications.find_one_and_update(
            {"id": notification_id, "$or": not_in_flight},
            {
                "$set": {
                    "status": "pending",
                    "attempts": Int64(0),
                    "next_attempt_ms": Int64(now_ms),
                    "pending_since_ms": Int64(now_ms),
                    "last_error": None,
                    "delivered_ms": None,
                    "lease": None,
                }
            },
            return_document=ReturnDocument.AFTER,
        )
        if d is None:  # no such id, or its delivery is under way: the record as it is
            d = await self.db.notifications.find_one({"id": notification_id})
        return None if d is None else _note(d)

    async def notify_flags(self, users: list[str]) -> dict[str, NotifyFlags]:
        if not users:
            return {}
        return {d["_id"]: _flags(d) async for d in self.db.notify_accounts.find({"_id": {"$in": users}})}

    async def record_detected(self, notes: list[NotificationRecord], flags: list[NotifyFlags]) -> None:
        # No transaction: the notes first. A crash between the two writes records the notes
        # again on redelivery (same dedup keys: the epochs did not move), then the flags.
        await self.add_notifications(notes)
        ops = [
            UpdateOne(
                {"_id": f.user, "version": {"$lt": Int64(f.version)}},
                {
                    "$set": {
                        "version": Int64(f.version),
                        "low_armed": f.low_armed,
                        "low_epoch": Int64(f.low_epoch),
                        "debt_armed": f.debt_armed,
                        "debt_epoch": Int64(f.debt_epoch),
                    },
                    "$setOnInsert": {"low_balance_threshold": None},
                },
                upsert=True,
            )
            for f in flags
        ]
        if ops:
            try:
                await self.db.notify_accounts.bulk_write(ops, ordered=False)
            except BulkWriteError as exc:
                if not _only_duplicates(exc):  # a newer version stored: expected, ignored
                    raise

    async def set_low_balance_threshold(self, user: str, units: int | None) -> NotifyFlags:
        coll = self.db.notify_accounts
        current = await coll.find_one({"_id": user})
        if current is None:
            try:
                await coll.insert_one(
                    {
                        "_id": user,
                        "version": Int64(0),
                        "low_armed": True,
                        "low_epoch": Int64(0),
                        "debt_armed": True,
                        "debt_epoch": Int64(0),
                        "low_balance_threshold": None if units is None else Int64(units),
                    }
                )
                return NotifyFlags(user, low_balance_threshold=units)
            except DuplicateKeyError:
                current = await coll.find_one({"_id": user})  # inserted meanwhile: update it
        armed = bool(current and current.get("low_armed", True))
        update: Doc = {
            "$set": {"low_balance_threshold": None if units is None else Int64(units), "low_armed": True}
        }
        if not armed:
            update["$inc"] = {"low_epoch": Int64(1)}
        d = await coll.find_one_and_update({"_id": user}, update, return_document=ReturnDocument.AFTER)
        return _flags(d) if d is not None else NotifyFlags(user, low_balance_threshold=units)

    async def low_balance_thresholds(self) -> dict[str, int]:
        cur = self.db.notify_accounts.find({"low_balance_threshold": {"$ne": None}})
        return {d["_id"]: int(d["low_balance_threshold"]) async for d in cur}

    async def expiring_grants(
        self, from_ms: int, until_ms: int, after: tuple[str, str] | None, limit: int
    ) -> tuple[list[ExpiringGrant], tuple[str, str] | None]:
        # On the expires_ms index: a page is what matches, ordered by _id ("user|seq").
        q: Doc = {"expires_ms": {"$gt": Int64(from_ms), "$lte": Int64(until_ms)}}
        if after is not None:
            q["_id"] = {"$gt": f"{after[0]}|{after[1]}"}
        cur = self.db.grants.find(q).sort("_id", ASCENDING).limit(limit)
        docs = [d async for d in cur]
        found = [
            ExpiringGrant(d["user_id"], d["seq"], int(d["free"]), int(d["expires_ms"]), d.get("metadata"))
            for d in docs
            if not d.get("gone") and d.get("free")
        ]
        nxt = (docs[-1]["user_id"], docs[-1]["seq"]) if len(docs) == limit else None
        return found, nxt
