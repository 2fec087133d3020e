"""The MongoDB store's plans and subscriptions (see store/plans.py): `plans` (_id = plan id)
and `subscriptions` (_id = subscription id). `live_user` is the user while the subscription
is live and `ended:<its id>` after, so a unique index allows one live subscription per user."""

from __future__ import annotations

from typing import Any

from bson import Int64
from pymongo import ASCENDING, DESCENDING, ReturnDocument
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import DuplicateKeyError

from .plans import PlanRecord, PlanStore, SubscriptionRecord, plan_doc, plan_of, sub_doc, sub_of

NO_ACTION = Int64(2**62)  # an ended subscription's next_action_ms in the index: never due


def _sub_fields(s: SubscriptionRecord) -> dict[str, Any]:
    doc = sub_doc(s)
    doc["live_user"] = s.user if s.live else f"ended:{s.sub_id}"
    doc["due_ms"] = NO_ACTION if s.next_action_ms is None else Int64(s.next_action_ms)
    return doc


class MongoPlans(PlanStore):
    """Mixed into MongoStore."""

    @property
    def db(self) -> AsyncDatabase:  # provided by MongoStore
        raise NotImplementedError

    async def create_plan(self, p: PlanRecord) -> None:
        try:
            await self.db.plans.insert_one({"_id": p.plan_id, **plan_doc(p)})
        except DuplicateKeyError:
            raise KeyError(p.plan_id) from None

    async def plan(self, plan_id: str) -> PlanRecord | None:
        d = await self.db.plans.find_one({"_id": plan_id})
        return None if d is None else plan_of(d)

    async def list_plans(self, *, active_only: bool = False) -> list[PlanRecord]:
        cur = self.db.plans.find({"active": True} if active_only else {})
        return [plan_of(d) async for d in cur.sort([("created_ms", ASCENDING), ("_id", ASCENDING)])]

    async def update_plan(self, plan_id: str, changes: dict[str, Any]) -> PlanRecord | None:
        # Only the changed fields: a concurrent change of other fields is kept.
        d = await self.db.plans.find_one_and_update(
            {"_id": plan_id}, {"$set": changes}, return_document=ReturnDocument.AFTER
        )
        return None if d is None else plan_of(d)

    async def create_subscription(self, s: SubscriptionRecord) -> None:
        try:
            await self.db.subscriptions.insert_one({"_id": s.sub_id, **_sub_fields(s)})
        except DuplicateKeyError:
            raise KeyError(s.user) from None

    async def subscription(self, sub_id: str) -> SubscriptionRecord | None:
        d = await self.db.subscriptions.find_one({"_id": sub_id})
        return None if d is None else sub_of(d)

    async def subscriptions_of(self, user: str) -> list[SubscriptionRecord]:
        cur = self.db.subscriptions.find({"user": user})
        return [sub_of(d) async for d in cur.sort([("created_ms", DESCENDING), ("_id", DESCENDING)])]

    async def update_subscription(
        self, sub_id: str, changes: dict[str, Any], *, expect: dict[str, Any] | None = None
    ) -> SubscriptionRecord | None:
        current = await self.subscription(sub_id)
        if current is None or any(getattr(current, k) != v for k, v in (expect or {}).items()):
            return None
        after = sub_of({**sub_doc(current), **changes, "rev": current.rev + 1})
        # The filter names the revision read: the update lands only if no other writer
        # changed the record meanwhile.
        guard = {"_id": sub_id, "rev": current.rev}
        try:
            d = await self.db.subscriptions.find_one_and_update(
                guard, {"$set": _sub_fields(after)}, return_document=ReturnDocument.AFTER
            )
        except DuplicateKeyError:
            return None  # made live while the user has another live subscription
        return None if d is None else sub_of(d)

    async def due_subscriptions(self, now_ms: int, limit: int = 200) -> list[SubscriptionRecord]:
        cur = self.db.subscriptions.find({"due_ms": {"$lte": Int64(now_ms)}}).sort("due_ms", ASCENDING)
        return [sub_of(d) async for d in cur.limit(limit)]

    async def live_subscriptions(self) -> list[SubscriptionRecord]:
        cur = self.db.subscriptions.find({"status": {"$ne": "ended"}}).sort("user", ASCENDING)
        return [sub_of(d) async for d in cur]
