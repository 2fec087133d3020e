"""The PostgreSQL store's payment tables (see store/payments.py for the contract; the
statements are store/sql.py's, shared with SQLite)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import astuple
from typing import Any

import asyncpg

from . import sql
from .payments import (
    PAYMENT_FIELDS,
    PaymentAnomaly,
    PaymentRecord,
    PaymentStore,
    RefundRecord,
    WebhookEvent,
)
from .postgres_pool import Pool
from .sql import affected, numbered


def _anomaly_of(r: Any) -> PaymentAnomaly:
    return PaymentAnomaly(r[0], r[1], r[2], r[3], json.loads(r[4]), r[5])


class PostgresPayments(PaymentStore):
    """Mixed into PostgresStore: every call takes a connection of its pool."""

    @property
    def pool(self) -> Pool:  # provided by PostgresStore
        raise NotImplementedError

    async def create_payment(self, p: PaymentRecord) -> None:
        try:
            await self.pool.execute(numbered(sql.PAYMENT_INSERT), *(getattr(p, f) for f in PAYMENT_FIELDS))
        except asyncpg.UniqueViolationError:
            raise KeyError(p.payment_id) from None

    async def payment(self, payment_id: str) -> PaymentRecord | None:
        row = await self.pool.fetchrow(numbered(sql.PAYMENT_OF), payment_id)
        return PaymentRecord(*row) if row else None

    async def payment_by_provider_id(self, provider: str, provider_payment_id: str) -> PaymentRecord | None:
        row = await self.pool.fetchrow(numbered(sql.PAYMENT_BY_PROVIDER_ID), provider, provider_payment_id)
        return PaymentRecord(*row) if row else None

    async def list_payments(
        self,
        *,
        user: str | None = None,
        status: str | None = None,
        provider: str | None = None,
        limit: int = 50,
        before: tuple[int, str] | None = None,
    ) -> list[PaymentRecord]:
        statement, args = sql.list_payments(user, status, provider, limit, before)
        return [PaymentRecord(*r) for r in await self.pool.fetch(numbered(statement), *args)]

    async def update_payment(
        self,
        payment_id: str,
        changes: dict[str, Any],
        *,
        from_status: Iterable[str] | None = None,
        unset: str | None = None,
    ) -> bool:
        states = None if from_status is None else list(from_status)
        statement, args = sql.update_payment(payment_id, changes, states, unset)
        return affected(await self.pool.execute(numbered(statement), *args)) == 1

    async def payments_to_reconcile(self, older_than_ms: int, limit: int = 500) -> list[PaymentRecord]:
        rows = await self.pool.fetch(numbered(sql.PAYMENTS_TO_RECONCILE), older_than_ms, limit)
        return [PaymentRecord(*r) for r in rows]

    async def _insert_or_stored(self, insert: str, select: str, row: tuple, key: tuple) -> Any:
        """Inserts the row unless its key is stored; the stored row when it is (None: inserted)."""
        async with self.pool.acquire() as conn:
            if affected(await conn.execute(numbered(insert), *row)) == 1:
                return None
            return await conn.fetchrow(numbered(select), *key)

    async def record_webhook_event(self, ev: WebhookEvent) -> WebhookEvent | None:
        row = await self._insert_or_stored(
            sql.EVENT_INSERT, sql.EVENT_OF, astuple(ev), (ev.provider, ev.event_id)
        )
        return None if row is None else WebhookEvent(*row)

    async def finish_webhook_event(
        self, provider: str, event_id: str, outcome: str, status_code: int, payment_id: str | None
    ) -> None:
        await self.pool.execute(
            numbered(sql.EVENT_FINISH), outcome, status_code, payment_id, provider, event_id
        )

    async def webhook_events(self, payment_id: str) -> list[WebhookEvent]:
        return [WebhookEvent(*r) for r in await self.pool.fetch(numbered(sql.EVENTS_OF), payment_id)]

    async def add_refund(self, r: RefundRecord) -> RefundRecord | None:
        row = await self._insert_or_stored(
            sql.REFUND_INSERT, sql.REFUND_OF, astuple(r), (r.provider, r.refund_id)
        )
        return None if row is None else RefundRecord(*row)

    async def mark_refund_debited(self, provider: str, refund_id: str, at_ms: int) -> bool:
        return (
            affected(await self.pool.execute(numbered(sql.REFUND_DEBITED), at_ms, provider, refund_id)) == 1
        )

    async def refunds(self, payment_id: str) -> list[RefundRecord]:
        return [RefundRecord(*r) for r in await self.pool.fetch(numbered(sql.REFUNDS_OF), payment_id)]

    async def refunds_to_reconcile(self, older_than_ms: int) -> list[RefundRecord]:
        rows = await self.pool.fetch(numbered(sql.REFUNDS_TO_RECONCILE), older_than_ms)
        return [RefundRecord(*r) for r in rows]

    async def add_anomaly(self, a: PaymentAnomaly) -> None:
        detail = json.dumps(a.detail, sort_keys=True)
        await self.pool.execute(
            numbered(sql.ANOMALY_INSERT), a.payment_id, a.provider, a.event_id, a.kind, detail, a.at_ms
        )

    async def anomalies(self, payment_id: str) -> list[PaymentAnomaly]:
        return [_anomaly_of(r) for r in await self.pool.fetch(numbered(sql.ANOMALIES_OF), payment_id)]

    async def recent_anomalies(self, limit: int = 100) -> list[PaymentAnomaly]:
        return [_anomaly_of(r) for r in await self.pool.fetch(numbered(sql.ANOMALIES_RECENT), limit)]

    async def ledger_has(self, user: str, op_id: str) -> bool:
        return await self.pool.fetchval(numbered(sql.LEDGER_HAS), user, op_id) is not None
