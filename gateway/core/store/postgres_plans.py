"""The PostgreSQL store's plans and subscriptions (see store/plans.py and sqlite_plans.py:
the same rows, the record as JSON beside the columns the queries use, `live_user` unique
among live subscriptions)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import asyncpg

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
from .postgres_pool import Pool
from .sql import live_user, numbered, subscription_row


class PostgresPlans(PlanStore):
    """Mixed into PostgresStore: every call takes a connection of its pool."""

    @property
    def pool(self) -> Pool:  # provided by PostgresStore
        raise NotImplementedError

    async def create_plan(self, p: PlanRecord) -> None:
        try:
            await self.pool.execute(
                numbered(sql.PLAN_INSERT), p.plan_id, int(p.active), p.created_ms, json.dumps(plan_doc(p))
            )
        except asyncpg.UniqueViolationError:
            raise KeyError(p.plan_id) from None

    async def plan(self, plan_id: str) -> PlanRecord | None:
        doc = await self.pool.fetchval(numbered(sql.PLAN_OF), plan_id)
        return plan_of(json.loads(doc)) if doc else None

    async def list_plans(self, *, active_only: bool = False) -> list[PlanRecord]:
        return [plan_of(json.loads(r[0])) for r in await self.pool.fetch(sql.plans_listed(active_only))]

    async def _change(self, select: str, id_: str, apply: Callable[[dict], Any]) -> Any:
        """Reads the row's record (locked), lets `apply` make the new one (None: no change)
        and writes it, in one transaction: no other writer comes between."""
        async with self.pool.acquire() as conn, conn.transaction():
            doc = await conn.fetchval(numbered(select) + " FOR UPDATE", id_)
            out = apply(json.loads(doc)) if doc else None
            if isinstance(out, PlanRecord):
                await conn.execute(numbered(sql.PLAN_SET), int(out.active), json.dumps(plan_doc(out)), id_)
            elif isinstance(out, SubscriptionRecord):
                await conn.execute(
                    numbered(sql.SUB_SET), live_user(out), out.next_action_ms, json.dumps(sub_doc(out)), id_
                )
        return out

    async def update_plan(self, plan_id: str, changes: dict[str, Any]) -> PlanRecord | None:
        out = await self._change(sql.PLAN_OF, plan_id, lambda d: plan_of({**d, **changes}))
        return out if isinstance(out, PlanRecord) else None

    async def create_subscription(self, s: SubscriptionRecord) -> None:
        try:
            await self.pool.execute(numbered(sql.SUB_INSERT), *subscription_row(s))
        except asyncpg.UniqueViolationError:
            raise KeyError(s.user) from None

    async def subscription(self, sub_id: str) -> SubscriptionRecord | None:
        doc = await self.pool.fetchval(numbered(sql.SUB_OF), sub_id)
        return sub_of(json.loads(doc)) if doc else None

    async def subscriptions_of(self, user: str) -> list[SubscriptionRecord]:
        return [sub_of(json.loads(r[0])) for r in await self.pool.fetch(numbered(sql.SUBS_OF), user)]

    async def update_subscription(
        self, sub_id: str, changes: dict[str, Any], *, expect: dict[str, Any] | None = None
    ) -> SubscriptionRecord | None:
        apply = subscription_change(changes, expect)
        try:
            out = await self._change(sql.SUB_OF, sub_id, apply)
        except asyncpg.UniqueViolationError:
            return None  # made live while the user has another live subscription
        return out if isinstance(out, SubscriptionRecord) else None

    async def due_subscriptions(self, now_ms: int, limit: int = 200) -> list[SubscriptionRecord]:
        rows = await self.pool.fetch(numbered(sql.SUBS_DUE), now_ms, limit)
        return [sub_of(json.loads(r[0])) for r in rows]

    async def live_subscriptions(self) -> list[SubscriptionRecord]:
        return [sub_of(json.loads(r[0])) for r in await self.pool.fetch(sql.SUBS_LIVE)]
