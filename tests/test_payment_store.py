"""The payment half of the store contract, on every backend (SQLite and MongoDB): records,
forward-only status moves as conditional updates, deduplicated webhook events and refunds,
anomalies, and the ledger lookup reconciliation relies on."""

from __future__ import annotations

import asyncio

import pytest
import pytest_asyncio

from gateway.core.store.payments import (
    NEXT,
    PaymentAnomaly,
    PaymentRecord,
    RefundRecord,
    WebhookEvent,
    sources_of,
)
from tests.test_store import stream_events


@pytest_asyncio.fixture
async def store(new_store):
    """A fresh, open store of each backend (see tests/support/store_fixtures.py)."""
    return await new_store()


def payment(pid: str, user: str = "u1", created_ms: int = 1_000, **kw) -> PaymentRecord:
    fields = {
        "payment_id": pid,
        "user": user,
        "provider": "razorpay",
        "amount_minor": 50_000,
        "currency": "INR",
        "credits": 500_000_000,
        "status": "created",
        "created_ms": created_ms,
        "updated_ms": created_ms,
    }
    fields.update(kw)
    return PaymentRecord(**fields)


async def test_a_payment_is_kept_whole_and_its_id_is_unique(store):
    p = payment("pay_1", pack="starter", description="top-up", url="http://x/pay", link_id="plink_1")
    await store.create_payment(p)
    assert await store.payment("pay_1") == p
    assert await store.payment("nope") is None
    with pytest.raises(KeyError):
        await store.create_payment(payment("pay_1", user="someone-else"))
    assert (await store.payment("pay_1")).user == "u1"


async def test_status_moves_only_forward_and_one_of_many_racers_wins(store):
    await store.create_payment(payment("pay_race"))
    changes = {"status": "paid", "paid_ms": 2_000, "provider_payment_id": "pay_X", "updated_ms": 2_000}
    won = await asyncio.gather(
        *(store.update_payment("pay_race", changes, from_status=sources_of("paid")) for _ in range(20))
    )
    assert won.count(True) == 1
    # paid -> created is not a move any status allows; a refund moves on.
    assert not await store.update_payment("pay_race", {"status": "failed"}, from_status=sources_of("failed"))
    assert (await store.payment("pay_race")).status == "paid"
    assert await store.update_payment(
        "pay_race", {"status": "refunded", "refunded_minor": 50_000}, from_status=sources_of("refunded")
    )
    assert (await store.payment("pay_race")).status == "refunded"
    assert not await store.update_payment("pay_race", {"status": "paid"}, from_status=sources_of("paid"))


async def test_a_failure_is_not_final_and_money_taken_is_always_credited():
    assert "paid" in NEXT["failed"]
    assert NEXT["cancelled"] == {"paid"} and NEXT["refunded"] == frozenset()
    assert sources_of("paid") == {"created", "failed", "expired", "cancelled"}


async def test_credited_is_marked_once(store):
    await store.create_payment(payment("pay_c", status="paid", paid_ms=5))
    marks = await asyncio.gather(
        *(store.update_payment("pay_c", {"credited_ms": 10 + i}, unset="credited_ms") for i in range(10))
    )
    assert marks.count(True) == 1
    assert (await store.payment("pay_c")).credited_ms in range(10, 20)


async def test_update_refuses_unknown_fields(store):
    await store.create_payment(payment("pay_f"))
    with pytest.raises(ValueError, match="not payment fields"):
        await store.update_payment("pay_f", {"balance": 1})
    with pytest.raises(ValueError, match="not payment fields"):
        await store.update_payment("pay_f", {"payment_id": "other"})


async def test_lists_page_newest_first_with_filters(store):
    for i in range(7):
        await store.create_payment(
            payment(
                f"p{i}",
                user="a" if i % 2 else "b",
                created_ms=100 + i // 2,
                provider="stripe" if i > 4 else "razorpay",
            )
        )
    everything = await store.list_payments(limit=100)
    assert [p.payment_id for p in everything] == ["p6", "p5", "p4", "p3", "p2", "p1", "p0"]
    pages, before = [], None
    while True:
        page = await store.list_payments(limit=3, before=before)
        if not page:
            break
        pages.append([p.payment_id for p in page])
        before = (page[-1].created_ms, page[-1].payment_id)
    assert pages == [["p6", "p5", "p4"], ["p3", "p2", "p1"], ["p0"]]
    assert [p.payment_id for p in await store.list_payments(user="a")] == ["p5", "p3", "p1"]
    assert [p.payment_id for p in await store.list_payments(provider="stripe")] == ["p6", "p5"]
    assert await store.list_payments(status="paid") == []
    assert (await store.payment_by_provider_id("razorpay", "none")) is None


async def test_payments_to_reconcile_are_the_stale_open_and_the_paid_not_credited(store):
    await store.create_payment(payment("old-open", created_ms=10))
    await store.create_payment(payment("old-failed", created_ms=11, status="failed"))
    await store.create_payment(payment("old-paid", created_ms=12, status="paid", paid_ms=12))
    await store.create_payment(
        payment("old-credited", created_ms=13, status="paid", paid_ms=13, credited_ms=14)
    )
    await store.create_payment(payment("new-open", created_ms=1_000))
    await store.create_payment(payment("old-expired", created_ms=9, status="expired"))
    found = [p.payment_id for p in await store.payments_to_reconcile(older_than_ms=500)]
    assert found == ["old-open", "old-failed", "old-paid"]


async def test_webhook_events_are_kept_once_per_provider_event_id(store):
    ev = WebhookEvent("razorpay", "evt_1", "payment_link.paid", 100, '{"a": "é"}', payment_id=None)
    assert await store.record_webhook_event(ev) is None
    again = await store.record_webhook_event(WebhookEvent("razorpay", "evt_1", "other", 200, "{}"))
    assert again is not None and again.type == "payment_link.paid" and again.body == '{"a": "é"}'
    assert await store.record_webhook_event(WebhookEvent("stripe", "evt_1", "x", 1, "{}")) is None
    await store.finish_webhook_event("razorpay", "evt_1", "applied", 200, "pay_9")
    stored = await store.webhook_events("pay_9")
    assert [(e.event_id, e.outcome, e.status_code) for e in stored] == [("evt_1", "applied", 200)]
    # Concurrent first deliveries: one inserts, the others see it.
    racers = await asyncio.gather(
        *(store.record_webhook_event(WebhookEvent("stripe", "evt_r", "t", 1, "{}")) for _ in range(10))
    )
    assert sum(r is None for r in racers) == 1


async def test_refunds_are_kept_once_and_debited_once(store):
    r = RefundRecord("razorpay", "rfnd_1", "pay_1", 10_000, 100_000_000, 50)
    assert await store.add_refund(r) is None
    assert (
        await store.add_refund(RefundRecord("razorpay", "rfnd_1", "pay_1", 1, 1, 60))
    ).amount_minor == 10_000
    assert [x.refund_id for x in await store.refunds_to_reconcile(older_than_ms=100)] == ["rfnd_1"]
    assert await store.mark_refund_debited("razorpay", "rfnd_1", 70)
    assert not await store.mark_refund_debited("razorpay", "rfnd_1", 80)
    assert await store.refunds_to_reconcile(older_than_ms=100) == []
    assert [(x.refund_id, x.debited_ms) for x in await store.refunds("pay_1")] == [("rfnd_1", 70)]


async def test_anomalies_are_recorded_with_their_detail(store):
    a = PaymentAnomaly("pay_1", "stripe", "evt_2", "amount_mismatch", {"expected": 100, "got": 1}, 5)
    await store.add_anomaly(a)
    assert await store.anomalies("pay_1") == [a]
    assert await store.anomalies("pay_2") == []


async def test_ledger_has_answers_from_the_durable_ledger(engine, store):
    await engine.grant("lh", "5", op_id="payment:pay_lh", source="payment")
    await store.write_events(await stream_events(engine))
    assert await store.ledger_has("lh", "payment:pay_lh")
    assert not await store.ledger_has("lh", "payment:never")
    assert not await store.ledger_has("someone", "payment:pay_lh")
