"""The SQLite store's plans and subscriptions (see store/plans.py): one row each, the record
as JSON beside the columns the queries use. `live_user` is the user while the subscription
is live and `ended:<its id>` after, so a unique index allows one live subscription per user."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable
from typing import Any, TypeVar

from . import sql
from .plans import (
    PlanRecord,
    PlanStore,
    SubscriptionRecord,
    plan_doc,
    plan_of,
    sub_doc,
    sub_of,
    subscription_change,
)
from .sql import live_user, subscription_row

T = TypeVar("T")


class SQLitePlans(PlanStore):
    """Mixed into SQLiteStore: every call runs on the store's thread (`_call`)."""

    @property
    def db(self) -> sqlite3.Connection:  # provided by SQLiteStore
        raise NotImplementedError

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:  # provided by SQLiteStore
        raise NotImplementedError

    async def create_plan(self, p: PlanRecord) -> None:
        row = (p.plan_id, int(p.active), p.created_ms, json.dumps(plan_doc(p)))
        try:
            await self._call(lambda: self.db.execute(sql.PLAN_INSERT, row))
        except sqlite3.IntegrityError:
            raise KeyError(p.plan_id) from None

    async def plan(self, plan_id: str) -> PlanRecord | None:
        row = await self._call(lambda: self.db.execute(sql.PLAN_OF, (plan_id,)).fetchone())
        return plan_of(json.loads(row[0])) if row else None

    async def list_plans(self, *, active_only: bool = False) -> list[PlanRecord]:
        rows = await self._call(lambda: self.db.execute(sql.plans_listed(active_only)).fetchall())
        return [plan_of(json.loads(r[0])) for r in rows]

    def _change(self, select: str, id_: str, apply: Callable[[dict], Any]) -> Any:
        """Reads the row's record, lets `apply` make the new one (None: no change) and writes
        it, in one write transaction: no other writer comes between."""
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        try:
            row = db.execute(select, (id_,)).fetchone()
            out = apply(json.loads(row[0])) if row else None
            if out is None:
                db.execute("ROLLBACK")
                return None
            if isinstance(out, PlanRecord):
                db.execute(sql.PLAN_SET, (int(out.active), json.dumps(plan_doc(out)), id_))
            else:
                db.execute(sql.SUB_SET, (live_user(out), out.next_action_ms, json.dumps(sub_doc(out)), id_))
            db.execute("COMMIT")
            return out
        except BaseException:
            db.execute("ROLLBACK")
            raise

    async def update_plan(self, plan_id: str, changes: dict[str, Any]) -> PlanRecord | None:
        out = await self._call(self._change, sql.PLAN_OF, plan_id, lambda d: plan_of({**d, **changes}))
        return out if isinstance(out, PlanRecord) else None

    async def create_subscription(self, s: SubscriptionRecord) -> None:
        try:
            await self._call(lambda: self.db.execute(sql.SUB_INSERT, subscription_row(s)))
        except sqlite3.IntegrityError:
            raise KeyError(s.user) from None

    async def subscription(self, sub_id: str) -> SubscriptionRecord | None:
        row = await self._call(lambda: self.db.execute(sql.SUB_OF, (sub_id,)).fetchone())
        return sub_of(json.loads(row[0])) if row else None

    async def subscriptions_of(self, user: str) -> list[SubscriptionRecord]:
        rows = await self._call(lambda: self.db.execute(sql.SUBS_OF, (user,)).fetchall())
        return [sub_of(json.loads(r[0])) for r in rows]

    async def update_subscription(
        self, sub_id: str, changes: dict[str, Any], *, expect: dict[str, Any] | None = None
    ) -> SubscriptionRecord | None:
        apply = subscription_change(changes, expect)
        try:
            out = await self._call(self._change, sql.SUB_OF, sub_id, apply)
        except sqlite3.IntegrityError:
            return None  # made live while the user has another live subscription
        return out if isinstance(out, SubscriptionRecord) else None

    async def due_subscriptions(self, now_ms: int, limit: int = 200) -> list[SubscriptionRecord]:
        rows = await self._call(lambda: self.db.execute(sql.SUBS_DUE, (now_ms, limit)).fetchall())
        return [sub_of(json.loads(r[0])) for r in rows]

    async def live_subscriptions(self) -> list[SubscriptionRecord]:
        rows = await self._call(lambda: self.db.execute(sql.SUBS_LIVE).fetchall())
        return [sub_of(json.loads(r[0])) for r in rows]
