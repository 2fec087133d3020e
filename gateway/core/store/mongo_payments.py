"""The MongoDB store's payment collections (see store/payments.py for the contract).

`payments` (_id = payment id), `payment_events` (_id = "provider|event id"),
`payment_refunds` (_id = "provider|refund id") and `payment_anomalies`. Every status move
is one `update_one` whose filter names the statuses it may start from: two processes
applying the same move race on the document, and exactly one of them changes it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from bson import Int64
from pymongo import ASCENDING, DESCENDING
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import DuplicateKeyError

from .payments import (
    PAYMENT_FIELDS,
    PaymentAnomaly,
    PaymentRecord,
    PaymentStore,
    RefundRecord,
    WebhookEvent,
)

_INT_FIELDS = {
    "amount_minor", "credits", "created_ms", "updated_ms", "paid_ms", "credited_ms",
    "refunded_minor", "refunded_credits",
}  # fmt: skip


def _doc_value(field: str, value: Any) -> Any:
    return Int64(value) if field in _INT_FIELDS and value is not None else value


def _payment_of(d: dict[str, Any]) -> PaymentRecord:
    values: dict[str, Any] = {f: d.get(f) for f in PAYMENT_FIELDS}
    values["payment_id"] = d["_id"]
    for f in _INT_FIELDS:
        if values[f] is not None:
            values[f] = int(values[f])
    values["refunded_minor"] = values["refunded_minor"] or 0
    values["refunded_credits"] = values["refunded_credits"] or 0
    return PaymentRecord(**values)


def _event_of(d: dict[str, Any]) -> WebhookEvent:
    return WebhookEvent(
        provider=d["provider"],
        event_id=d["event_id"],
        type=d["type"],
        received_ms=int(d["received_ms"]),
        body=d["body"],
        payment_id=d.get("payment_id"),
        outcome=d["outcome"],
        status_code=int(d["status_code"]),
    )


def _anomaly_of(d: dict[str, Any]) -> PaymentAnomaly:
    return PaymentAnomaly(
        d["payment_id"], d["provider"], d["event_id"], d["kind"], d["detail"], int(d["at_ms"])
    )


def _refund_of(d: dict[str, Any]) -> RefundRecord:
    debited = d.get("debited_ms")
    return RefundRecord(
        provider=d["provider"],
        refund_id=d["refund_id"],
        payment_id=d["payment_id"],
        amount_minor=int(d["amount_minor"]),
        credits=int(d["credits"]),
        at_ms=int(d["at_ms"]),
        debited_ms=None if debited is None else int(debited),
    )


class MongoPayments(PaymentStore):
    """Mixed into MongoStore."""

    @property
    def db(self) -> AsyncDatabase:  # provided by MongoStore
        raise NotImplementedError

    @staticmethod
    async def _insert_or_get(collection: Any, doc: dict[str, Any]) -> dict[str, Any] | None:
        """Inserts `doc` unless its _id exists; None when inserted, else the stored document
        (events and refunds are never deleted, so a duplicate key means it is there)."""
        try:
            await collection.insert_one(doc)
            return None
        except DuplicateKeyError:
            found: dict[str, Any] | None = await collection.find_one({"_id": doc["_id"]})
            if found is None:  # pragma: no cover - never deleted
                raise
            return found

    async def create_payment(self, p: PaymentRecord) -> None:
        doc: dict[str, Any] = {"_id": p.payment_id}
        for f in PAYMENT_FIELDS:
            if f != "payment_id":
                doc["user_id" if f == "user" else f] = _doc_value(f, getattr(p, f))
        try:
            await self.db.payments.insert_one(doc)
        except DuplicateKeyError:
            raise KeyError(p.payment_id) from None

    @staticmethod
    def _from_doc(d: dict[str, Any]) -> PaymentRecord:
        return _payment_of({**d, "user": d.get("user_id")})

    async def payment(self, payment_id: str) -> PaymentRecord | None:
        d = await self.db.payments.find_one({"_id": payment_id})
        return None if d is None else self._from_doc(d)

    async def payment_by_provider_id(self, provider: str, provider_payment_id: str) -> PaymentRecord | None:
        cur = self.db.payments.find({"provider": provider, "provider_payment_id": provider_payment_id})
        async for d in cur.sort("created_ms", ASCENDING).limit(1):
            return self._from_doc(d)
        return None

    async def list_payments(
        self,
        *,
        user: str | None = None,
        status: str | None = None,
        provider: str | None = None,
        limit: int = 50,
        before: tuple[int, str] | None = None,
    ) -> list[PaymentRecord]:
        q: dict[str, Any] = {}
        for key, val in (("user_id", user), ("status", status), ("provider", provider)):
            if val is not None:
                q[key] = val
        if before is not None:
            ms, pid = before
            q["$or"] = [{"created_ms": {"$lt": Int64(ms)}}, {"created_ms": Int64(ms), "_id": {"$lt": pid}}]
        cur = self.db.payments.find(q).sort([("created_ms", DESCENDING), ("_id", DESCENDING)]).limit(limit)
        return [self._from_doc(d) async for d in cur]

    async def update_payment(
        self,
        payment_id: str,
        changes: dict[str, Any],
        *,
        from_status: Iterable[str] | None = None,
        unset: str | None = None,
    ) -> bool:
        bad = set(changes) - set(PAYMENT_FIELDS)
        if bad or "payment_id" in changes or (unset is not None and unset not in PAYMENT_FIELDS):
            raise ValueError(f"not payment fields: {sorted(bad) or unset}")
        q: dict[str, Any] = {"_id": payment_id}
        if from_status is not None:
            q["status"] = {"$in": list(from_status)}
        if unset is not None:
            q["user_id" if unset == "user" else unset] = None
        sets = {("user_id" if k == "user" else k): _doc_value(k, v) for k, v in changes.items()}
        res = await self.db.payments.update_one(q, {"$set": sets})
        return res.matched_count == 1  # the condition held (a $set of equal values modifies nothing)

    async def payments_to_reconcile(self, older_than_ms: int, limit: int = 500) -> list[PaymentRecord]:
        q = {
            "created_ms": {"$lt": Int64(older_than_ms)},
            "$or": [
                {"status": {"$in": ["created", "failed"]}},
                {"status": {"$in": ["paid", "partially_refunded", "refunded"]}, "credited_ms": None},
            ],
        }
        cur = self.db.payments.find(q).sort("created_ms", ASCENDING).limit(limit)
        return [self._from_doc(d) async for d in cur]

    async def record_webhook_event(self, ev: WebhookEvent) -> WebhookEvent | None:
        key = f"{ev.provider}|{ev.event_id}"
        doc = {
            "_id": key,
            "provider": ev.provider,
            "event_id": ev.event_id,
            "type": ev.type,
            "received_ms": Int64(ev.received_ms),
            "body": ev.body,
            "payment_id": ev.payment_id,
            "outcome": ev.outcome,
            "status_code": ev.status_code,
        }
        d = await self._insert_or_get(self.db.payment_events, doc)
        return None if d is None else _event_of(d)

    async def finish_webhook_event(
        self, provider: str, event_id: str, outcome: str, status_code: int, payment_id: str | None
    ) -> None:
        sets: dict[str, Any] = {"outcome": outcome, "status_code": status_code}
        if payment_id is not None:
            sets["payment_id"] = payment_id
        await self.db.payment_events.update_one({"_id": f"{provider}|{event_id}"}, {"$set": sets})

    async def webhook_events(self, payment_id: str) -> list[WebhookEvent]:
        cur = self.db.payment_events.find({"payment_id": payment_id}).sort(
            [("received_ms", ASCENDING), ("event_id", ASCENDING)]
        )
        return [_event_of(d) async for d in cur]

    async def add_refund(self, r: RefundRecord) -> RefundRecord | None:
        key = f"{r.provider}|{r.refund_id}"
        doc = {
            "_id": key,
            "provider": r.provider,
            "refund_id": r.refund_id,
            "payment_id": r.payment_id,
            "amount_minor": Int64(r.amount_minor),
            "credits": Int64(r.credits),
            "at_ms": Int64(r.at_ms),
            "debited_ms": None if r.debited_ms is None else Int64(r.debited_ms),
        }
        d = await self._insert_or_get(self.db.payment_refunds, doc)
        return None if d is None else _refund_of(d)

    async def mark_refund_debited(self, provider: str, refund_id: str, at_ms: int) -> bool:
        res = await self.db.payment_refunds.update_one(
            {"_id": f"{provider}|{refund_id}", "debited_ms": None}, {"$set": {"debited_ms": Int64(at_ms)}}
        )
        return res.matched_count == 1

    async def refunds(self, payment_id: str) -> list[RefundRecord]:
        cur = self.db.payment_refunds.find({"payment_id": payment_id}).sort(
            [("at_ms", ASCENDING), ("refund_id", ASCENDING)]
        )
        return [_refund_of(d) async for d in cur]

    async def refunds_to_reconcile(self, older_than_ms: int) -> list[RefundRecord]:
        cur = self.db.payment_refunds.find({"debited_ms": None, "at_ms": {"$lt": Int64(older_than_ms)}}).sort(
            "at_ms", ASCENDING
        )
        return [_refund_of(d) async for d in cur]

    async def add_anomaly(self, a: PaymentAnomaly) -> None:
        await self.db.payment_anomalies.insert_one(
            {
                "payment_id": a.payment_id,
                "provider": a.provider,
                "event_id": a.event_id,
                "kind": a.kind,
                "detail": a.detail,
                "at_ms": Int64(a.at_ms),
            }
        )

    async def anomalies(self, payment_id: str) -> list[PaymentAnomaly]:
        cur = self.db.payment_anomalies.find({"payment_id": payment_id}).sort(
            [("at_ms", ASCENDING), ("_id", ASCENDING)]
        )
        return [_anomaly_of(d) async for d in cur]

    async def recent_anomalies(self, limit: int = 100) -> list[PaymentAnomaly]:
        cur = (
            self.db.payment_anomalies.find({}).sort([("at_ms", DESCENDING), ("_id", DESCENDING)]).limit(limit)
        )
        return [_anomaly_of(d) async for d in cur]

    async def ledger_has(self, user: str, op_id: str) -> bool:
        return await self.db.ledger.find_one({"user_id": user, "op_id": op_id}, {"_id": 1}) is not None
