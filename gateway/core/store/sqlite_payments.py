"""The SQLite store's payment tables (see store/payments.py for the contract)."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from .payments import (
    PAYMENT_FIELDS,
    PaymentAnomaly,
    PaymentRecord,
    PaymentStore,
    RefundRecord,
    WebhookEvent,
)

T = TypeVar("T")

_COLS = ", ".join(PAYMENT_FIELDS)
_EVENT_COLS = "provider, event_id, type, received_ms, body, payment_id, outcome, status_code"
_REFUND_COLS = "provider, refund_id, payment_id, amount_minor, credits, at_ms, debited_ms"


def _anomaly_of(r: Any) -> PaymentAnomaly:
    return PaymentAnomaly(r[0], r[1], r[2], r[3], json.loads(r[4]), r[5])


class SQLitePayments(PaymentStore):
    """Mixed into SQLiteStore: every call runs on the store's thread (`_call`)."""

    @property
    def db(self) -> sqlite3.Connection:  # provided by SQLiteStore
        raise NotImplementedError

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:  # provided by SQLiteStore
        raise NotImplementedError

    async def create_payment(self, p: PaymentRecord) -> None:
        row = tuple(getattr(p, f) for f in PAYMENT_FIELDS)
        marks = ", ".join("?" * len(PAYMENT_FIELDS))
        try:
            await self._call(lambda: self.db.execute(f"INSERT INTO payments ({_COLS}) VALUES ({marks})", row))
        except sqlite3.IntegrityError:
            raise KeyError(p.payment_id) from None

    async def payment(self, payment_id: str) -> PaymentRecord | None:
        row = await self._call(
            lambda: self.db.execute(
                f"SELECT {_COLS} FROM payments WHERE payment_id = ?", (payment_id,)
            ).fetchone()
        )
        return PaymentRecord(*row) if row else None

    async def payment_by_provider_id(self, provider: str, provider_payment_id: str) -> PaymentRecord | None:
        row = await self._call(
            lambda: self.db.execute(
                f"SELECT {_COLS} FROM payments WHERE provider = ? AND provider_payment_id = ? "
                "ORDER BY created_ms LIMIT 1",
                (provider, provider_payment_id),
            ).fetchone()
        )
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
        where: list[str] = []
        args: list[Any] = []
        for col, val in (("user", user), ("status", status), ("provider", provider)):
            if val is not None:
                where.append(f"{col} = ?")
                args.append(val)
        if before is not None:
            where.append("(created_ms < ? OR (created_ms = ? AND payment_id < ?))")
            args += [before[0], before[0], before[1]]
        sql = f"SELECT {_COLS} FROM payments"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY created_ms DESC, payment_id DESC LIMIT ?"
        args.append(limit)
        rows = await self._call(lambda: self.db.execute(sql, args).fetchall())
        return [PaymentRecord(*r) for r in rows]

    async def update_payment(
        self,
        payment_id: str,
        changes: dict[str, Any],
        *,
        from_status: Iterable[str] | None = None,
        unset: str | None = None,
    ) -> bool:
        bad = set(changes) - set(PAYMENT_FIELDS) - {"payment_id"}
        if bad or "payment_id" in changes or (unset is not None and unset not in PAYMENT_FIELDS):
            raise ValueError(f"not payment fields: {sorted(bad) or unset}")
        sets = ", ".join(f"{k} = ?" for k in changes)
        sql = f"UPDATE payments SET {sets} WHERE payment_id = ?"
        args: list[Any] = [*changes.values(), payment_id]
        if from_status is not None:
            states = list(from_status)
            sql += f" AND status IN ({', '.join('?' * len(states))})"
            args += states
        if unset is not None:
            sql += f" AND {unset} IS NULL"
        return await self._call(lambda: self.db.execute(sql, args).rowcount) == 1

    async def payments_to_reconcile(self, older_than_ms: int, limit: int = 500) -> list[PaymentRecord]:
        rows = await self._call(
            lambda: self.db.execute(
                f"SELECT {_COLS} FROM payments WHERE created_ms < ? AND (status IN ('created', 'failed') "
                "OR (status IN ('paid', 'partially_refunded', 'refunded') AND credited_ms IS NULL)) "
                "ORDER BY created_ms LIMIT ?",
                (older_than_ms, limit),
            ).fetchall()
        )
        return [PaymentRecord(*r) for r in rows]

    def _record_event(self, ev: WebhookEvent) -> WebhookEvent | None:
        cur = self.db.execute(
            f"INSERT INTO payment_events ({_EVENT_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (provider, event_id) DO NOTHING",
            (
                ev.provider,
                ev.event_id,
                ev.type,
                ev.received_ms,
                ev.body,
                ev.payment_id,
                ev.outcome,
                ev.status_code,
            ),
        )
        if cur.rowcount == 1:
            return None
        row = self.db.execute(
            f"SELECT {_EVENT_COLS} FROM payment_events WHERE provider = ? AND event_id = ?",
            (ev.provider, ev.event_id),
        ).fetchone()
        return WebhookEvent(*row)

    async def record_webhook_event(self, ev: WebhookEvent) -> WebhookEvent | None:
        return await self._call(self._record_event, ev)

    async def finish_webhook_event(
        self, provider: str, event_id: str, outcome: str, status_code: int, payment_id: str | None
    ) -> None:
        await self._call(
            lambda: self.db.execute(
                "UPDATE payment_events SET outcome = ?, status_code = ?, "
                "payment_id = coalesce(?, payment_id) WHERE provider = ? AND event_id = ?",
                (outcome, status_code, payment_id, provider, event_id),
            )
        )

    async def webhook_events(self, payment_id: str) -> list[WebhookEvent]:
        rows = await self._call(
            lambda: self.db.execute(
                f"SELECT {_EVENT_COLS} FROM payment_events WHERE payment_id = ? "
                "ORDER BY received_ms, event_id",
                (payment_id,),
            ).fetchall()
        )
        return [WebhookEvent(*r) for r in rows]

    def _add_refund(self, r: RefundRecord) -> RefundRecord | None:
        cur = self.db.execute(
            f"INSERT INTO payment_refunds ({_REFUND_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (provider, refund_id) DO NOTHING",
            (r.provider, r.refund_id, r.payment_id, r.amount_minor, r.credits, r.at_ms, r.debited_ms),
        )
        if cur.rowcount == 1:
            return None
        row = self.db.execute(
            f"SELECT {_REFUND_COLS} FROM payment_refunds WHERE provider = ? AND refund_id = ?",
            (r.provider, r.refund_id),
        ).fetchone()
        return RefundRecord(*row)

    async def add_refund(self, r: RefundRecord) -> RefundRecord | None:
        return await self._call(self._add_refund, r)

    async def mark_refund_debited(self, provider: str, refund_id: str, at_ms: int) -> bool:
        changed = await self._call(
            lambda: (
                self.db.execute(
                    "UPDATE payment_refunds SET debited_ms = ? WHERE provider = ? AND refund_id = ? "
                    "AND debited_ms IS NULL",
                    (at_ms, provider, refund_id),
                ).rowcount
            )
        )
        return changed == 1

    async def refunds(self, payment_id: str) -> list[RefundRecord]:
        rows = await self._call(
            lambda: self.db.execute(
                f"SELECT {_REFUND_COLS} FROM payment_refunds WHERE payment_id = ? ORDER BY at_ms, refund_id",
                (payment_id,),
            ).fetchall()
        )
        return [RefundRecord(*r) for r in rows]

    async def refunds_to_reconcile(self, older_than_ms: int) -> list[RefundRecord]:
        rows = await self._call(
            lambda: self.db.execute(
                f"SELECT {_REFUND_COLS} FROM payment_refunds WHERE debited_ms IS NULL AND at_ms < ? "
                "ORDER BY at_ms",
                (older_than_ms,),
            ).fetchall()
        )
        return [RefundRecord(*r) for r in rows]

    async def add_anomaly(self, a: PaymentAnomaly) -> None:
        await self._call(
            lambda: self.db.execute(
                "INSERT INTO payment_anomalies (payment_id, provider, event_id, kind, detail, at_ms) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (a.payment_id, a.provider, a.event_id, a.kind, json.dumps(a.detail, sort_keys=True), a.at_ms),
            )
        )

    async def anomalies(self, payment_id: str) -> list[PaymentAnomaly]:
        rows = await self._call(
            lambda: self.db.execute(
                "SELECT payment_id, provider, event_id, kind, detail, at_ms FROM payment_anomalies "
                "WHERE payment_id = ? ORDER BY at_ms, id",
                (payment_id,),
            ).fetchall()
        )
        return [_anomaly_of(r) for r in rows]

    async def recent_anomalies(self, limit: int = 100) -> list[PaymentAnomaly]:
        rows = await self._call(
            lambda: self.db.execute(
                "SELECT payment_id, provider, event_id, kind, detail, at_ms FROM payment_anomalies "
                "ORDER BY at_ms DESC, id DESC LIMIT ?",
                (limit,),
            ).fetchall()
        )
        return [_anomaly_of(r) for r in rows]

    async def ledger_has(self, user: str, op_id: str) -> bool:
        row = await self._call(
            lambda: self.db.execute(
                "SELECT 1 FROM ledger WHERE user = ? AND op_id = ?", (user, op_id)
            ).fetchone()
        )
        return row is not None
