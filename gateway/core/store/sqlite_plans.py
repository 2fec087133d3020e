"""The SQLite store's plans and subscriptions (see store/plans.py): one row each, the record
as JSON beside the columns the queries use. `live_user` is the user while the subscription
is live and `ended:<its id>` after, so a unique index allows one live subscription per user."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable
from typing import Any, TypeVar

from .plans import PlanRecord, PlanStore, SubscriptionRecord, plan_doc, plan_of, sub_doc, sub_of

T = TypeVar("T")


def _live_user(s: SubscriptionRecord) -> str:
    return s.user if s.live else f"ended:{s.sub_id}"


def _row(s: SubscriptionRecord) -> tuple[Any, ...]:
    return (s.sub_id, s.user, _live_user(s), s.next_action_ms, s.created_ms, json.dumps(sub_doc(s)))


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
            await self._call(lambda: self.db.execute("INSERT INTO plans VALUES (?, ?, ?, ?)", row))
        except sqlite3.IntegrityError:
            raise KeyError(p.plan_id) from None

    async def plan(self, plan_id: str) -> PlanRecord | None:
        sql = "SELECT doc FROM plans WHERE plan_id = ?"
        row = await self._call(lambda: self.db.execute(sql, (plan_id,)).fetchone())
        return plan_of(json.loads(row[0])) if row else None

    async def list_plans(self, *, active_only: bool = False) -> list[PlanRecord]:
        where = " WHERE active = 1" if active_only else ""
        sql = f"SELECT doc FROM plans{where} ORDER BY created_ms, plan_id"
        rows = await self._call(lambda: self.db.execute(sql).fetchall())
        return [plan_of(json.loads(r[0])) for r in rows]

    def _change(self, table: str, key: str, id_: str, apply: Callable[[dict], Any]) -> Any:
        """Reads the row's record, lets `apply` make the new one (None: no change) and writes
        it, in one write transaction: no other writer comes between."""
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        try:
            row = db.execute(f"SELECT doc FROM {table} WHERE {key} = ?", (id_,)).fetchone()
            out = apply(json.loads(row[0])) if row else None
            if out is None:
                db.execute("ROLLBACK")
                return None
            if isinstance(out, PlanRecord):
                db.execute(
                    "UPDATE plans SET active = ?, doc = ? WHERE plan_id = ?",
                    (int(out.active), json.dumps(plan_doc(out)), id_),
                )
            else:
                db.execute(
                    "UPDATE subscriptions SET live_user = ?, next_action_ms = ?, doc = ? WHERE sub_id = ?",
                    (_live_user(out), out.next_action_ms, json.dumps(sub_doc(out)), id_),
                )
            db.execute("COMMIT")
            return out
        except BaseException:
            db.execute("ROLLBACK")
            raise

    async def update_plan(self, plan_id: str, changes: dict[str, Any]) -> PlanRecord | None:
        out = await self._call(self._change, "plans", "plan_id", plan_id, lambda d: plan_of({**d, **changes}))
        return out if isinstance(out, PlanRecord) else None

    async def create_subscription(self, s: SubscriptionRecord) -> None:
        try:
            await self._call(
                lambda: self.db.execute("INSERT INTO subscriptions VALUES (?, ?, ?, ?, ?, ?)", _row(s))
            )
        except sqlite3.IntegrityError:
            raise KeyError(s.user) from None

    async def subscription(self, sub_id: str) -> SubscriptionRecord | None:
        sql = "SELECT doc FROM subscriptions WHERE sub_id = ?"
        row = await self._call(lambda: self.db.execute(sql, (sub_id,)).fetchone())
        return sub_of(json.loads(row[0])) if row else None

    async def subscriptions_of(self, user: str) -> list[SubscriptionRecord]:
        sql = "SELECT doc FROM subscriptions WHERE user = ? ORDER BY created_ms DESC, sub_id DESC"
        rows = await self._call(lambda: self.db.execute(sql, (user,)).fetchall())
        return [sub_of(json.loads(r[0])) for r in rows]

    async def update_subscription(
        self, sub_id: str, changes: dict[str, Any], *, expect: dict[str, Any] | None = None
    ) -> SubscriptionRecord | None:
        def apply(d: dict) -> SubscriptionRecord | None:
            if any(d.get(k) != v for k, v in (expect or {}).items()):
                return None
            return sub_of({**d, **changes, "rev": d.get("rev", 0) + 1})

        try:
            out = await self._call(self._change, "subscriptions", "sub_id", sub_id, apply)
        except sqlite3.IntegrityError:
            return None  # made live while the user has another live subscription
        return out if isinstance(out, SubscriptionRecord) else None

    async def due_subscriptions(self, now_ms: int, limit: int = 200) -> list[SubscriptionRecord]:
        sql = (
            "SELECT doc FROM subscriptions WHERE next_action_ms IS NOT NULL AND next_action_ms <= ? "
            "ORDER BY next_action_ms LIMIT ?"
        )
        rows = await self._call(lambda: self.db.execute(sql, (now_ms, limit)).fetchall())
        return [sub_of(json.loads(r[0])) for r in rows]

    async def live_subscriptions(self) -> list[SubscriptionRecord]:
        sql = "SELECT doc FROM subscriptions WHERE live_user = user ORDER BY user"
        rows = await self._call(lambda: self.db.execute(sql).fetchall())
        return [sub_of(json.loads(r[0])) for r in rows]
