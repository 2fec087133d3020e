"""`credit-gateway import credit-management`: a database on the MongoDB wire server filled
with the old package's documents, its known defects included (balances its lost updates
left wrong, expiry records above the balance, captured payments never credited, codes equal
but for case, open reservations, float money, naive times, malformed documents), imported
into the gateway on a real redis-server and a SQLite store; checked through the gateway's
API and services, the report, a dry run, a second run, and a run killed midway."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from datetime import UTC, datetime, timedelta

import pytest
import pytest_asyncio

from gateway.core.store.sqlite import SQLiteStore
from gateway.migrate.credit_management import Options, Target, read, run_import
from gateway.migrate.credit_management.source import units_of
from gateway.worker.runner import Worker
from tests.support.api_fixtures import H_ADMIN, app_client, client_headers, settings_for
from tests.support.engine_helpers import dies_here

pytestmark = [pytest.mark.redis, pytest.mark.mongo]

NOW = datetime(2027, 3, 1, 12, 0)  # naive UTC, as the old package wrote its times
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def ago(days: float) -> datetime:
    return NOW - timedelta(days=days)


def ahead(days: float) -> datetime:
    return NOW + timedelta(days=days)


def txn(user, added, deducted, current, when, kind="add", **extra):
    return {
        "_id": uuid.uuid4().hex,
        "user_id": user,
        "credits_added": added,
        "credits_deducted": deducted,
        "current_credits": current,
        "transaction_type": kind,
        "timestamp": when,
        "description": kind,
        "metadata": {},
        **extra,
    }


def old_data() -> dict[str, list[dict]]:
    """The old package's collections, as it wrote them, with each of its known defects."""
    alice_10_3 = 10.0 + 0.1 + 0.2  # 10.299999999999999 as the old package's floats add up
    return {
        "credit_transactions": [
            txn("alice", 10, 0, 10.0, ago(20)),
            txn("alice", 0.1, 0, 10.1, ago(19)),
            txn("alice", 0.2, 0, alice_10_3, ago(18)),
            # bob: the second deduct read the balance before the first wrote it (a lost update)
            txn("bob", 50, 0, 50.0, ago(10)),
            txn("bob", 0, 10, 40.0, ago(9), "deduct"),
            txn("bob", 0, 5, 45.0, ago(8.9), "deduct"),
            txn("carol", 5, 0, 5.0, ago(8)),
            txn("carol", 0, 10, -5.0, ago(7), "deduct"),
            txn("dave", 3, 0, "abc", ago(6)),
            txn("erin", 100, 0, 100.0, ago(5)),
            txn("frank", 20, 0, 20.0, ago(5)),
            txn("zoe", 5, 0, 5.0, ago(5)),
            txn("zoe", 0, 5, 0.0, ago(4), "deduct"),
            txn(None, 1, 0, 1.0, ago(5)),  # malformed: no user
            # ivan: two transactions at the same time, which left different balances
            txn("ivan", 9, 0, 9.0, ago(4)),
            txn("ivan", 0, 1, 8.0, ago(3), "deduct"),
            txn("ivan", 1, 0, 9.0, ago(3)),
        ],
        "credit_expiry_records": [
            {
                "_id": "exp-alice-1",
                "user_id": "alice",
                "subscription_plan_id": "plan-starter",
                "credits": 5.0,
                "remaining_credits": 4.0,
                "expires_at": ahead(10),
                "created_at": ago(20),
                "expired": False,
                "note": "kept",  # a field the old model does not have
            },
            {
                "_id": "exp-alice-old",
                "user_id": "alice",
                "subscription_plan_id": "plan-starter",
                "credits": 5.0,
                "remaining_credits": 1.0,
                "expires_at": ago(1),
                "created_at": ago(40),
                "expired": True,
            },
            # bob: 55 credits in unexpired records, 45 in his balance
            {
                "_id": "exp-bob-1",
                "user_id": "bob",
                "subscription_plan_id": "plan-pro",
                "credits": 30.0,
                "remaining_credits": 30.0,
                "expires_at": ahead(5),
                "created_at": ago(10),
                "expired": False,
            },
            {
                "_id": "exp-bob-2",
                "user_id": "bob",
                "subscription_plan_id": "plan-pro",
                "credits": 25.0,
                "remaining_credits": 25.0,
                "expires_at": ahead(20),
                "created_at": ago(10),
                "expired": False,
            },
            {
                "_id": "exp-bad",
                "user_id": "erin",
                "subscription_plan_id": None,
                "credits": 1,
                "remaining_credits": 1,
                "expires_at": "not a date",
                "created_at": ago(1),
                "expired": False,
            },
        ],
        "credit_reserved": [
            {
                "_id": "res-open",
                "user_id": "alice",
                "subscription_plan_id": None,
                "credits": 2.0,
                "reason": "chat",
                "created_at": ago(0.01),
                "expires_at": ahead(0.01),
                "committed": False,
                "released": False,
            },
            {
                "_id": "res-done",
                "user_id": "alice",
                "credits": 1.0,
                "reason": "chat",
                "created_at": ago(2),
                "expires_at": ago(1.9),
                "committed": True,
                "released": False,
            },
        ],
        "payment_records": [
            {
                "_id": "pay-credited",
                "user_id": "erin",
                "provider": "razorpay",
                "provider_payment_id": "pay_A1",
                "provider_payment_link_id": "plink_A1",
                "amount": 49900.0,
                "currency": "INR",
                "amount_inr": 499.0,
                "credits_to_add": 100.0,
                "credits_added": 100.0,
                "status": "captured",
                "created_at": ago(5),
                "completed_at": ago(5),
                "gst_number": "29ABCDE1234F1Z5",  # unknown to the old model: kept
            },
            {
                "_id": "pay-uncredited",
                "user_id": "erin",
                "provider": "razorpay",
                "provider_payment_id": "pay_B2",
                "amount": 19990.0,
                "currency": "INR",
                "amount_inr": 199.9,
                "credits_to_add": 200.0,
                "credits_added": 0,
                "status": "captured",
                "created_at": ago(4),
                "completed_at": ago(4),
            },
            {
                "_id": "pay-float",
                "user_id": "erin",
                "provider": "razorpay",
                "amount": 1998.0000000000002,
                "currency": "INR",
                "amount_inr": 19.99,
                "credits_to_add": 20.0,
                "credits_added": 20.0,
                "status": "captured",
                "created_at": ago(3),
                "completed_at": ago(3),
            },
            {
                "_id": "pay-failed",
                "user_id": "erin",
                "provider": "stripe",
                "amount": 500,
                "currency": "USD",
                "credits_to_add": 450,
                "status": "failed",
                "error_message": "card declined",
                "created_at": ago(2),
                "failed_at": ago(2),
            },
            {
                "_id": "pay-weird",
                "user_id": "erin",
                "provider": "razorpay",
                "amount": 100,
                "status": "lost",
                "created_at": ago(2),
            },
        ],
        "credit_subscription_plans": [
            {
                "_id": "plan-starter",
                "name": "Starter",
                "credit_limit": 5.0,
                "price": 0,
                "billing_period": "monthly",
                "validity_days": 30,
                "is_active": True,
                "created_at": ago(100),
            },
            {
                "_id": "plan-pro",
                "name": "Pro",
                "description": "for teams",
                "credit_limit": 30.0,
                "price": 499.0,
                "billing_period": "MONTHLY",
                "validity_days": 45,
                "is_active": True,
                "created_at": ago(100),
            },
        ],
        "credit_user_subscriptions": [
            {
                "_id": "sub-alice",
                "user_id": "alice",
                "subscription_plan_id": "plan-starter",
                "started_at": ago(20),
                "valid_until": ahead(10),
                "auto_renew": True,
                "is_active": True,
            },
            {
                "_id": "sub-bob",
                "user_id": "bob",
                "subscription_plan_id": "plan-pro",
                "started_at": ago(10),
                "valid_until": ahead(20),
                "auto_renew": False,
                "is_active": True,
            },
            {
                "_id": "sub-erin-lapsed",
                "user_id": "erin",
                "subscription_plan_id": "plan-starter",
                "started_at": ago(60),
                "valid_until": ago(30),
                "auto_renew": True,
                "is_active": True,
            },
        ],
        "promos": [
            {
                "_id": "promo-launch",
                "code": "LAUNCH",
                "credits": 5.0,
                "description": "launch week",
                "target_type": "all_users",
                "target_user_ids": [],
                "max_uses": 3,
                "max_uses_per_user": 1,
                "valid_from": ago(30),
                "valid_until": ahead(30),
                "is_active": True,
                "created_at": ago(30),
            },
            {
                "_id": "promo-launch-lower",
                "code": "launch",
                "credits": 50.0,
                "target_type": "all_users",
                "max_uses": None,
                "max_uses_per_user": None,
                "is_active": False,
                "created_at": ago(20),
            },
        ],
        "user_promo_claims": [
            {
                "_id": "claim-1",
                "user_id": "alice",
                "promo_id": "promo-launch",
                "promo_code": "LAUNCH",
                "credits_awarded": 5.0,
                "claimed_at": ago(15),
            },
            {
                "_id": "claim-2",
                "user_id": "bob",
                "promo_id": "promo-launch-lower",
                "promo_code": "launch",
                "credits_awarded": 50.0,
                "claimed_at": ago(14),
            },
            {
                "_id": "claim-3",
                "user_id": "zed",
                "promo_id": "promo-gone",
                "promo_code": "GONE",
                "credits_awarded": 1.0,
                "claimed_at": ago(14),
            },
        ],
    }


async def fill(uri: str, data: dict[str, list[dict]]) -> str:
    from pymongo import AsyncMongoClient

    name = f"cm_{uuid.uuid4().hex[:10]}"
    client: AsyncMongoClient = AsyncMongoClient(uri)
    try:
        for coll, docs in data.items():
            if docs:
                await client[name][coll].insert_many(docs)
    finally:
        await client.close()
    return name


@pytest_asyncio.fixture
async def source(mongo_uri):
    return await fill(mongo_uri, old_data())


@pytest_asyncio.fixture
async def gw(redis, redis_url, new_store, clock):
    """The gateway on each store backend (SQLite, MongoDB)."""
    clock.t = NOW.replace(tzinfo=UTC).timestamp()
    async with app_client(settings_for(redis_url), redis, await new_store(), clock) as c:
        s = c.app.state.services
        c.services = s
        c.target = Target(s.engine, s.store, s.payments, s.promos, s.subscriptions)
        yield c


async def run(gw, mongo_uri, db, **opts):
    dry_run = opts.pop("dry_run", False)
    strict = opts.pop("strict", False)
    docs = await read(mongo_uri, db)
    options = Options(now_ms=gw.services.engine.now_ms(), **opts)
    return await run_import(docs, gw.target, options, source=db, dry_run=dry_run, strict=strict)


async def drain(gw) -> None:
    await Worker(gw.services.engine, gw.services.store).run(burst=True)


async def ledger_rows(gw, users=("alice", "bob", "carol", "dave", "erin", "frank")) -> dict[str, list[str]]:
    await drain(gw)
    out = {}
    for u in users:
        out[u] = sorted([e.op_id async for e in gw.services.store.ledger_all(u)])
    return out


async def account(gw, user) -> dict:
    r = await gw.get(f"/admin/accounts/{user}", headers=H_ADMIN)
    assert r.status_code == 200, r.text
    return r.json()


async def pre_existing_account(gw) -> None:
    """frank was carried over by hand before the importer existed (the guide said how)."""
    r = await gw.post(
        "/admin/credits/add",
        json={"user_id": "frank", "amount": 20},
        headers={**H_ADMIN, "Idempotency-Key": "carry-frank"},
    )
    assert r.status_code == 200, r.text


def test_old_floats_become_exact_micro_credits():
    assert units_of(0.1 + 0.2) == (300_000, False)  # 0.30000000000000004: rounded, reported
    assert units_of(10.1) == (10_100_000, True)
    assert units_of(19.99) == (19_990_000, True)
    assert units_of(3) == (3_000_000, True)
    assert units_of("2.5") == (2_500_000, True)


async def test_import_carries_balances_expiry_and_reports_the_defects(gw, mongo_uri, source):
    await pre_existing_account(gw)
    report = await run(gw, mongo_uri, source)
    kinds = {k: len(v) for k, v in report.by_kind().items()}
    assert kinds["balance_mismatch"] == 2 and kinds["bad_balance"] == 2  # bob and ivan
    assert kinds["expiring_exceeds_balance"] == 1 and kinds["captured_uncredited"] == 1
    assert kinds["non_integral_amount"] == 1 and kinds["amount_inr_mismatch"] == 1
    assert kinds["code_collision"] == 1 and kinds["open_reservation"] == 1
    assert kinds["account_exists"] == 1 and kinds["subscription_lapsed"] == 1
    assert kinds["plan_validity"] == 1 and kinds["claim_without_code"] == 1
    assert kinds["rounded"] >= 1  # alice's 10.299999999999999
    assert kinds["newest_tied"] == 1 and (await account(gw, "ivan"))["available"] == "8.000000"
    malformed = {d.doc_id for d in report.defects if d.kind == "malformed"}
    assert "exp-bad" in malformed
    weird = next(d for d in report.defects if d.kind == "unknown_status")
    assert weird.doc_id == "pay-weird" and "imported as expired" in weird.message
    assert any(d.collection == "credit_transactions" for d in report.defects if d.kind == "malformed")
    bob = next(d for d in report.defects if d.kind == "balance_mismatch" and d.user == "bob")
    assert bob.user == "bob" and "current_credits 45, replay 35" in bob.message

    # alice: 10.3 = 4 expiring with her subscription's plan + 6.3 without expiry
    a = await account(gw, "alice")
    assert a["available"] == "10.300000"
    by_amount = {g["remaining"]: g for g in a["grants"]}
    assert set(by_amount) == {"4.000000", "6.300000"}
    assert by_amount["4.000000"]["expires_at"].startswith("2027-03-11T12:00:00")
    assert by_amount["4.000000"]["source"] == "plan" and by_amount["6.300000"]["expires_at"] is None
    view = await gw.services.engine.account("alice")
    plan_grant = next(g for g in view.grants if g.source == "plan")
    assert plan_grant.metadata["note"] == "kept" and plan_grant.metadata["subscription"] == "sub_cm_sub-alice"

    # bob: the balance his users saw (45), the soonest-expiring record cut by the 10 over it
    b = await account(gw, "bob")
    assert b["available"] == "45.000000"
    assert sorted((g["remaining"], g["expires_at"][:10]) for g in b["grants"]) == [
        ("20.000000", "2027-03-06"),
        ("25.000000", "2027-03-21"),
    ]
    # carol (negative) and dave (unreadable) get nothing; frank keeps what he had
    assert (await account(gw, "carol"))["available"] == "0.000000"
    assert (await account(gw, "dave"))["available"] == "0.000000"
    assert (await account(gw, "frank"))["available"] == "20.000000"
    # erin: her balance; the captured-but-never-credited payment is not in it
    assert (await account(gw, "erin"))["available"] == "100.000000"

    text = report.to_text()
    assert "balance_mismatch (2)" in text and "open_reservation (1)" in text
    assert "res-open" in text and "res-done" not in text


async def test_payments_are_history_with_exact_amounts_and_the_uncredited_held(gw, mongo_uri, source):
    await run(gw, mongo_uri, source)
    r = await gw.get("/credits/payments/history", headers=client_headers("erin"))
    assert r.status_code == 200, r.text
    pays = {p["id"]: p for p in r.json()["payments"]}
    assert set(pays) == {"pay-credited", "pay-uncredited", "pay-float", "pay-failed", "pay-weird"}
    assert pays["pay-weird"]["status"] == "expired"  # an unknown status, kept as history
    assert pays["pay-credited"]["status"] == "paid" and pays["pay-credited"]["credits_added"] == "100"
    assert (
        pays["pay-credited"]["amount"] == "499.00" and pays["pay-credited"]["provider_payment_id"] == "pay_A1"
    )
    assert pays["pay-float"]["amount"] == "19.98"  # 1998.0000000000002 paise, reported
    assert pays["pay-failed"]["status"] == "expired" and pays["pay-failed"]["currency"] == "USD"
    assert "card declined" in pays["pay-failed"]["error_message"]
    held = pays["pay-uncredited"]
    assert held["status"] == "paid" and held["credited"] is False and held["credits_added"] == "0"
    # The source document, with its unknown field, is kept as the payment's first event.
    events = await gw.services.store.webhook_events("pay-credited")
    assert json.loads(events[0].body)["gst_number"] == "29ABCDE1234F1Z5"

    # Reconciliation leaves the held payment alone: nothing credited behind the team's back.
    assert await gw.services.payments.reconcile(0) == []
    assert (await account(gw, "erin"))["available"] == "100.000000"

    # Asked for, it is credited, once.
    report = await run(gw, mongo_uri, source, credit_uncredited=True)
    assert report.counts["uncredited payments credited"]["imported"] == 1
    assert (await account(gw, "erin"))["available"] == "300.000000"
    again = await run(gw, mongo_uri, source, credit_uncredited=True)
    assert again.counts["uncredited payments credited"] == {"already imported": 1}
    assert (await account(gw, "erin"))["available"] == "300.000000"
    r = await gw.get("/credits/payments/pay-uncredited", headers=client_headers("erin"))
    assert r.json()["credited"] is True and r.json()["credits_added"] == "200"


async def test_plans_subscriptions_and_promos_carry_on(gw, mongo_uri, source, clock):
    await run(gw, mongo_uri, source)
    plans = {p["id"]: p for p in (await gw.get("/admin/plans", headers=H_ADMIN)).json()["plans"]}
    assert plans["cm_plan-pro"]["price"] == "499.00" and plans["cm_plan-pro"]["currency"] == "INR"
    assert plans["cm_plan-pro"]["credits"] == "30" and plans["cm_plan-pro"]["period"] == "monthly"
    assert plans["cm_plan-starter"]["free"] is True

    subs = gw.services.subscriptions
    bob = await subs.live("bob")
    assert bob is not None and bob.paid and bob.provider == "razorpay" and bob.cancel_at_period_end
    alice = await subs.live("alice")
    assert alice is not None and alice.period_end_ms == int(clock.t * 1000) + 10 * 86_400_000

    # The promo codes: LAUNCH and launch are one code, whose two claims count (of 3).
    r = await gw.get("/credits/promo/eligibility?code=launch", headers=client_headers("alice"))
    assert r.json()["eligible"] is False and r.json()["reason"] == "already_claimed"
    r = await gw.post("/credits/promo/claim", json={"code": "LAUNCH"}, headers=client_headers("bob"))
    assert r.status_code == 409 and r.json()["error"]["code"] == "already_claimed"
    r = await gw.post("/credits/promo/claim", json={"code": "launch"}, headers=client_headers("carol"))
    assert r.status_code == 200, r.text
    r = await gw.post("/credits/promo/claim", json={"code": "LAUNCH"}, headers=client_headers("dave"))
    assert r.status_code == 409 and r.json()["error"]["code"] == "exhausted"
    promo = (await gw.get("/admin/promos/LAUNCH", headers=H_ADMIN)).json()
    assert promo["claims"] == 3 and promo["credits"] == "5"

    # Redis loses the code's counters: rebuilt from the store, the imported claims count as
    # granted (they were, by the old package), never as pending claims to grant again.
    await drain(gw)  # carol's claim, made here, is in the ledger
    await gw.services.redis.delete(*gw.services.promos._keys("LAUNCH"))
    r = await gw.get("/credits/promo/eligibility?code=LAUNCH", headers=client_headers("alice"))
    assert r.json()["reason"] == "already_claimed"
    clock.advance(3600)
    assert await gw.services.promos.complete_pending() == []
    assert (await account(gw, "alice"))["available"] == "10.300000"
    assert (await account(gw, "carol"))["available"] == "5.000000"

    # alice's subscription renews at its valid_until, once: the period before it came over
    # as her expiring grant.
    clock.advance(10 * 86_400 - 3600 - 1)
    assert await subs.run_due() == []
    clock.advance(1)
    lines = await subs.run_due()
    assert any("period 0 granted" in x for x in lines), lines
    assert await subs.run_due() == []
    assert (await account(gw, "alice"))["available"] == "11.300000"  # 6.3 + the new period's 5
    rows = await ledger_rows(gw, ("alice",))
    assert [op for op in rows["alice"] if op.startswith("plan:")] == ["plan:sub_cm_sub-alice:0"]


async def test_claims_found_later_count_at_once_where_redis_counts_the_code(gw, mongo_uri, source):
    """A second import that finds new claims of a code whose counters Redis has built
    already (the code was used here meanwhile) counts them there at once."""
    from pymongo import AsyncMongoClient

    await run(gw, mongo_uri, source)
    r = await gw.post("/credits/promo/claim", json={"code": "LAUNCH"}, headers=client_headers("carol"))
    assert r.status_code == 200, r.text
    client: AsyncMongoClient = AsyncMongoClient(mongo_uri)
    try:
        late = {"_id": "claim-late", "user_id": "erin", "promo_id": "promo-launch", "claimed_at": ago(1)}
        await client[source]["user_promo_claims"].insert_one(late)
    finally:
        await client.close()
    report = await run(gw, mongo_uri, source)
    assert report.counts["promo claims"] == {"imported": 1, "already imported": 2}
    r = await gw.get("/credits/promo/eligibility?code=LAUNCH", headers=client_headers("erin"))
    assert r.json()["reason"] == "already_claimed"
    r = await gw.get("/credits/promo/eligibility?code=LAUNCH", headers=client_headers("dave"))
    assert r.json()["reason"] == "exhausted"  # alice, bob, carol, erin: over its 3
    assert (await account(gw, "erin"))["available"] == "100.000000"  # nothing granted for it


async def test_dry_run_writes_nothing_and_reports_the_same(gw, mongo_uri, source):
    dry = await run(gw, mongo_uri, source, dry_run=True)
    assert dry.dry_run and "dry run: nothing was written" in dry.to_text()
    assert dry.counts["grants with expiry"]["imported"] == 3
    assert dry.counts["payments"]["imported"] == 5
    assert (await account(gw, "alice"))["available"] == "0.000000"
    assert await gw.services.store.list_payments(limit=10) == []
    assert await gw.services.store.list_plans() == []
    assert await gw.services.store.list_promos() == []
    assert await gw.services.store.live_subscriptions() == []
    rows = await ledger_rows(gw)
    assert all(v == [] for v in rows.values())

    real = await run(gw, mongo_uri, source)
    assert {k: len(v) for k, v in dry.by_kind().items()} == {k: len(v) for k, v in real.by_kind().items()}
    assert {s: dict(c) for s, c in dry.counts.items()} == {s: dict(c) for s, c in real.counts.items()}


async def test_a_second_run_changes_nothing(gw, mongo_uri, source):
    await run(gw, mongo_uri, source)
    before = await ledger_rows(gw)
    payments = len(await gw.services.store.list_payments(limit=50))
    again = await run(gw, mongo_uri, source)
    assert again.nothing_new
    assert "everything was already imported" in again.to_text()
    assert again.counts["balances"] == {"already imported": 5, "skipped": 2}  # carol, dave skipped
    assert again.counts["promo claims"]["already imported"] == 2
    assert again.counts["zero balances (nothing to write)"] == {"skipped": 1}  # zoe
    assert await ledger_rows(gw) == before
    assert len(await gw.services.store.list_payments(limit=50)) == payments == 5
    assert (await account(gw, "alice"))["available"] == "10.300000"

    # And long after Redis forgot the operation ids, the ledger still says they were made.
    await gw.services.redis.delete(*await gw.services.redis.keys("*:op:*"))
    third = await run(gw, mongo_uri, source)
    assert third.nothing_new
    assert await ledger_rows(gw) == before


async def test_a_run_killed_midway_then_run_again_imports_everything_once(gw, mongo_uri, source, monkeypatch):
    engine = gw.services.engine
    real = engine.grant_units
    made = 0

    async def dies_after_three(*args, **kwargs):
        nonlocal made
        if made == 3:
            await dies_here()
        made += 1
        return await real(*args, **kwargs)

    monkeypatch.setattr(engine, "grant_units", dies_after_three)
    with pytest.raises(ConnectionError):
        await run(gw, mongo_uri, source)
    monkeypatch.setattr(engine, "grant_units", real)
    report = await run(gw, mongo_uri, source)
    assert (
        report.counts["grants with expiry"].get("already imported", 0)
        + report.counts["grants without expiry"].get("already imported", 0)
        == 3
    )
    for user, available in (("alice", "10.300000"), ("bob", "45.000000"), ("erin", "100.000000")):
        assert (await account(gw, user))["available"] == available
    rows = await ledger_rows(gw)
    for ops in rows.values():
        assert len(ops) == len(set(ops))
    assert rows["alice"] == ["cm:balance", "cm:expiry:exp-alice-1"]
    assert rows["bob"] == ["cm:expiry:exp-bob-1", "cm:expiry:exp-bob-2"]


async def test_strict_writes_nothing_when_defects_are_found(gw, mongo_uri, source):
    report = await run(gw, mongo_uri, source, strict=True)
    assert report.dry_run and report.defects
    assert await gw.services.store.list_plans() == []
    clean = await fill(
        mongo_uri,
        {"credit_transactions": [txn("gina", 7, 0, 7.0, ago(1))], "promos": [], "payment_records": []},
    )
    ok = await run(gw, mongo_uri, clean, strict=True)
    assert not ok.dry_run and not ok.defects
    assert (await account(gw, "gina"))["available"] == "7.000000"


async def test_replay_balance_on_request(gw, mongo_uri, source):
    report = await run(gw, mongo_uri, source, balance="replay")
    assert (await account(gw, "bob"))["available"] == "35.000000"
    # dave's unreadable current_credits does not matter to the replay: 3 credits
    assert (await account(gw, "dave"))["available"] == "3.000000"
    assert [d.user for d in report.defects if d.kind == "bad_balance"] == ["carol"]


def _cli(args, env, timeout=120):
    return subprocess.run(
        [sys.executable, "-m", "gateway.cli", "import", "credit-management", *args],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": REPO, **env},
        timeout=timeout,
        cwd=REPO,
    )


async def test_the_command_imports_then_finds_everything_imported(redis, redis_url, mongo_uri, tmp_path):
    db = await fill(mongo_uri, old_data())
    env = {
        "CREDIT_REDIS_URL": redis_url,
        "CREDIT_SQLITE_PATH": str(tmp_path / "cli.db"),
        "CREDIT_PARTITIONS": "16",
    }
    args = ["--mongo-uri", mongo_uri, "--db", db]
    dry = _cli([*args, "--dry-run"], env)
    assert dry.returncode == 0, dry.stderr
    assert "dry run: nothing was written" in dry.stdout and "balance_mismatch (2)" in dry.stdout
    first = _cli([*args, "--json"], env)
    assert first.returncode == 0, first.stderr
    out = json.loads(first.stdout)
    assert out["counts"]["balances"] == {"imported": 5, "skipped": 2}
    assert out["defects"]["captured_uncredited"] == 1 and out["already_imported"] is False
    second = _cli([*args, "--json"], env)
    assert json.loads(second.stdout)["already_imported"] is True
    strict = _cli([*args, "--strict"], env)
    assert strict.returncode == 3 and "--strict" in strict.stderr
    # A database without the old package's collections, and a server that is not there: exit 2.
    empty = _cli(["--mongo-uri", mongo_uri, "--db", "nothing_here"], env)
    assert empty.returncode == 2 and "none of credit-management's collections" in empty.stderr


async def test_embedded_mode_imports_into_the_sqlite_file(mongo_uri, tmp_path):
    db = await fill(
        mongo_uri,
        {"credit_transactions": [txn("hana", 12.5, 0, 12.5, ago(1))], "promos": [], "payment_records": []},
    )
    path = tmp_path / "embedded.db"
    done = _cli(
        ["--mongo-uri", mongo_uri, "--db", db], {"CREDIT_REDIS_URL": "", "CREDIT_SQLITE_PATH": str(path)}
    )
    assert done.returncode == 0, done.stderr
    assert "Embedded mode" in done.stderr
    store = SQLiteStore(str(path))
    await store.open()
    try:
        snap = await store.snapshot("hana")
        assert snap is not None and snap.totals["available"] == 12_500_000
        assert await store.ledger_has("hana", "cm:balance")
    finally:
        await store.close()


def _pay(pid: str, user: str, status: str, credits: float, added: float, amount: float = 10000.0) -> dict:
    return {
        "_id": pid,
        "user_id": user,
        "provider": "razorpay",
        "amount": amount,
        "currency": "INR",
        "credits_to_add": credits,
        "credits_added": added,
        "status": status,
        "created_at": ago(3),
        "completed_at": ago(3),
    }


async def test_values_beyond_the_gateway_s_limits_and_the_old_package_s_own_statuses(gw, mongo_uri):
    """From an outside trial: amounts over one operation's limit and an expiry past the
    latest the gateway keeps are reported in the dry run and skipped or adapted in the real
    run (which goes on to the end); the statuses credit-management 0.7.1 writes (paid,
    order_paid, the raw refund event names) are imported as what they mean."""
    db = await fill(
        mongo_uri,
        {
            "credit_transactions": [
                txn("giant", 1_000_000_001.0, 0, 1_000_000_001.0, ago(5)),
                txn("far", 5.0, 0, 5.0, ago(5)),
                txn("ok", 7.0, 0, 7.0, ago(5)),
            ],
            "credit_expiry_records": [
                {
                    "_id": "exp-far",
                    "user_id": "far",
                    "credits": 3.0,
                    "remaining_credits": 3.0,
                    "expires_at": datetime(9999, 12, 31),
                    "created_at": ago(5),
                    "expired": False,
                },
            ],
            "payment_records": [
                _pay("pay-huge", "ok", "paid", 1e12, 0),
                _pay("pay-paid", "ok", "paid", 70.0, 70.0),
                _pay("pay-order", "ok", "order_paid", 30.0, 0),
                _pay("pay-refund", "ok", "refund.processed", 10.0, 10.0),
                _pay("pay-neg", "ok", "paid", -50.0, 0),
            ],
        },
    )
    dry = await run(gw, mongo_uri, db, dry_run=True)
    kinds = {d.kind for d in dry.defects}
    assert {"bad_balance", "expiry_beyond_limit", "malformed", "captured_uncredited"} <= kinds
    assert {d.doc_id for d in dry.defects if d.kind == "malformed"} == {"pay-huge", "pay-neg"}

    report = await run(gw, mongo_uri, db, credit_uncredited=True)  # to the end, no exception
    assert report.counts["balances"]["skipped"] == 1  # giant
    assert (await account(gw, "far"))["available"] == "5.000000"  # the far expiry kept as credit
    assert (await ledger_rows(gw, users=("far",)))["far"] == ["cm:balance"]  # one grant, no expiry
    assert (await account(gw, "giant"))["available"] == "0.000000"
    # ok: 7 + the order_paid payment never credited (30), credited on request
    assert (await account(gw, "ok"))["available"] == "37.000000"
    r = await gw.get("/credits/payments/history", headers=client_headers("ok"))
    pays = {p["id"]: p for p in r.json()["payments"]}
    assert set(pays) == {"pay-paid", "pay-order", "pay-refund"}
    assert pays["pay-paid"]["status"] == "paid" and pays["pay-paid"]["credits_added"] == "70"
    assert pays["pay-refund"]["status"] == "refunded"
    assert (await run(gw, mongo_uri, db, credit_uncredited=True)).nothing_new


async def test_the_command_refuses_bad_options_before_reading_anything(tmp_path):
    env = {"CREDIT_SQLITE_PATH": str(tmp_path / "x.db")}
    bad_uri = _cli(["--mongo-uri", "http://not-mongo/", "--db", "x"], env)
    assert bad_uri.returncode == 2 and "not a MongoDB URI" in bad_uri.stderr, bad_uri.stderr
    currency = _cli(["--mongo-uri", "mongodb://127.0.0.1:1/", "--currency", "XYZ"], env)
    assert currency.returncode == 2 and "unknown currency" in currency.stderr
    show = _cli(["--mongo-uri", "mongodb://127.0.0.1:1/", "--show", "-1"], env)
    assert show.returncode == 2 and "must be 0 or more" in show.stderr
