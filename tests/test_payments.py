"""Selling credits end to end, on SQLite and MongoDB: the gateway in process on a real
redis-server, the official razorpay and stripe SDKs talking to the project's local fake
APIs (gateway/devtools/fake_*.py), webhooks signed with the providers' own schemes."""

from __future__ import annotations

import asyncio
import contextlib
import json
from decimal import Decimal
from types import SimpleNamespace

import httpx
import pytest
import pytest_asyncio
from aiohttp import web

from gateway.api.app import create_app
from gateway.core.settings import Settings
from gateway.devtools import fake_razorpay, fake_stripe
from gateway.worker.runner import Worker
from tests.support.api_fixtures import ADMIN, CLIENT, H_ADMIN, client_headers
from tests.support.engine_helpers import all_but, dies_here

RZ_KEY, RZ_SECRET, RZ_WEBHOOK = "rzp_test_k1", "rzp-secret-1", "rzp-webhook-secret"
ST_KEY, ST_WEBHOOK = "sk_test_k1", "whsec_test_secret"


@pytest_asyncio.fixture
async def fakes():
    out = SimpleNamespace(urls={})
    runners = []
    for name, app in (
        ("razorpay", fake_razorpay.make_app(RZ_KEY, RZ_SECRET)),
        ("stripe", fake_stripe.make_app(ST_KEY)),
    ):
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runners.append(runner)
        host, port = runner.addresses[0][:2]
        out.urls[name] = f"http://{host}:{port}"
        setattr(out, name, app[fake_razorpay.STATE] if name == "razorpay" else app[fake_stripe.STATE])
    yield out
    for r in runners:
        await r.cleanup()


def gateway_settings(redis_url, fakes, **over) -> Settings:
    values = {
        "redis_url": redis_url,
        "admin_keys": ADMIN,
        "client_keys": CLIENT,
        "partitions": 16,
        "audit_path": None,
        "razorpay_key_id": RZ_KEY,
        "razorpay_key_secret": RZ_SECRET,
        "razorpay_webhook_secret": RZ_WEBHOOK,
        "razorpay_base_url": fakes.urls["razorpay"],
        "stripe_api_key": ST_KEY,
        "stripe_webhook_secret": ST_WEBHOOK,
        "stripe_api_base": fakes.urls["stripe"],
        "payment_rates": "INR=1,USD=90",
        "app_base_url": "https://shop.example",
    }
    values.update(over)
    return Settings(**values)


@contextlib.asynccontextmanager
async def gateway(settings, redis, store):
    app = create_app(settings, redis=redis, store=store, run_worker=False)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as c,
    ):
        c.app = app
        yield c


@pytest_asyncio.fixture
async def store(new_store):
    return await new_store()


@pytest_asyncio.fixture
async def gw(redis, redis_url, fakes, store):
    async with gateway(gateway_settings(redis_url, fakes), redis, store) as c:
        c.fakes, c.store = fakes, store
        yield c


async def buy(c, user, **body):
    body = {"amount": "500", "currency": "INR", "provider": "razorpay", **body}
    body = {k: v for k, v in body.items() if v is not None}
    r = await c.post("/credits/payments", json=body, headers=client_headers(user))
    assert r.status_code == 201, r.text
    return r.json()


async def available(c, user) -> Decimal:
    r = await c.get(f"/admin/accounts/{user}", headers=H_ADMIN)
    if r.status_code == 404:
        return Decimal(0)
    assert r.status_code == 200, r.text
    return Decimal(r.json()["available"])


async def admin_view(c, payment_id) -> dict:
    r = await c.get(f"/admin/payments/{payment_id}", headers=H_ADMIN)
    assert r.status_code == 200, r.text
    return r.json()


async def rz_deliver(c, event, *, event_id=None, secret=RZ_WEBHOOK, body=None):
    raw, headers = fake_razorpay.webhook_request(event, secret, event_id=event_id)
    if body is not None:  # a body of the test's own, signed as Razorpay would
        raw = body
        headers["X-Razorpay-Signature"] = fake_razorpay.sign(raw, secret)
    return await c.post("/webhooks/razorpay", content=raw, headers=headers)


async def rz_paid(c, user="buyer", **body):
    """A Razorpay payment created through the API and paid at the fake: (payment, events)."""
    p = await buy(c, user, **body)
    link_id = (await admin_view(c, p["payment_id"]))["link_id"]
    return p, c.fakes.razorpay.pay(link_id)


# -- creating ---------------------------------------------------------------------------------


async def test_a_payment_is_created_through_the_sdk_with_the_project_s_id_as_reference(gw):
    p = await buy(gw, "ana", amount="19.99")
    assert p["status"] == "created" and p["provider"] == "razorpay"
    assert (p["amount"], p["currency"], p["credits"]) == ("19.99", "INR", "19.99")
    assert p["url"].startswith(gw.fakes.urls["razorpay"])
    view = await admin_view(gw, p["payment_id"])
    link = gw.fakes.razorpay.links[view["link_id"]]
    assert link["amount"] == 1999 and link["reference_id"] == p["payment_id"]  # never 1998
    # The user sees it; another user does not.
    mine = await gw.get(f"/credits/payments/{p['payment_id']}", headers=client_headers("ana"))
    assert mine.status_code == 200 and mine.json()["payment_id"] == p["payment_id"]
    other = await gw.get(f"/credits/payments/{p['payment_id']}", headers=client_headers("eve"))
    assert other.status_code == 404
    listed = await gw.get("/credits/payments", headers=client_headers("eve"))
    assert listed.json()["payments"] == []


async def test_a_json_number_amount_is_read_exactly(gw):
    r = await gw.post(
        "/credits/payments",
        content=b'{"amount": 19.99, "currency": "INR", "provider": "razorpay"}',
        headers={**client_headers("ana"), "Content-Type": "application/json"},
    )
    assert r.status_code == 201, r.text
    link_id = (await admin_view(gw, r.json()["payment_id"]))["link_id"]
    assert gw.fakes.razorpay.links[link_id]["amount"] == 1999


async def test_stripe_checkout_is_created_with_a_stable_idempotency_key(gw):
    p = await buy(gw, "sam", amount="10", currency="USD", provider="stripe")
    assert (p["amount"], p["currency"], p["credits"]) == ("10.00", "USD", "900")
    keys = [k for _, path, k in gw.fakes.stripe.requests if path == "/v1/checkout/sessions"]
    assert keys == [f"checkout-{p['payment_id']}"]


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"amount": "19.999"}, 422, "invalid_amount"),
        ({"amount": "5", "currency": "EUR"}, 422, "invalid_amount"),
        ({"amount": True}, 422, "invalid_amount"),
        ({"amount": "1e400"}, 422, "invalid_amount"),
        ({"provider": "paypal"}, 400, "unknown_provider"),
        ({"pack": "gold"}, 400, "invalid_request"),
        ({"extra": 1}, 400, "invalid_request"),
        ({"currency": None}, 400, "invalid_request"),
        ({"amount": "100000000", "currency": "USD"}, 422, "invalid_amount"),  # 9e9 credits
    ],
)
async def test_bad_payment_requests_are_refused_clearly(gw, body, status, code):
    r = await gw.post(
        "/credits/payments",
        content=json.dumps(
            {
                k: v
                for k, v in {"amount": "500", "currency": "INR", "provider": "razorpay", **body}.items()
                if v is not None
            }
        ),
        headers={**client_headers("ana"), "Content-Type": "application/json"},
    )
    assert (r.status_code, r.json()["error"]["code"]) == (status, code), r.text


async def test_a_provider_without_keys_is_off(redis, redis_url, fakes, store):
    settings = gateway_settings(redis_url, fakes, stripe_api_key=None, razorpay_webhook_secret=None)
    async with gateway(settings, redis, store) as c:
        r = await c.post(
            "/credits/payments", json={"amount": "5", "currency": "USD", "provider": "stripe"},
            headers=client_headers("ana"),
        )  # fmt: skip
        assert (r.status_code, r.json()["error"]["code"]) == (400, "provider_not_configured")
        # Razorpay creates, but with no webhook secret its webhook refuses everything.
        c.fakes = fakes
        _, events = await rz_paid(c, "ana")
        r = await rz_deliver(c, events["payment_link.paid"])
        assert r.status_code == 401
        assert await available(c, "ana") == 0


# -- webhooks ------------------------------------------------------------------------------------


async def test_a_paid_link_credits_the_user_once_whatever_is_redelivered(gw):
    p, events = await rz_paid(gw, "bo")
    paid = events["payment_link.paid"]
    r = await rz_deliver(gw, paid)
    assert (r.status_code, r.json()["status"]) == (200, "applied")
    assert await available(gw, "bo") == 500
    again = await rz_deliver(gw, paid)  # the same event id: a redelivery
    assert (again.status_code, again.json()["status"]) == (200, "duplicate")
    for i in range(5):  # the same payment under other event ids
        r = await rz_deliver(gw, paid, event_id=f"evt_other_{i}")
        assert r.status_code == 200
    r = await rz_deliver(gw, events["payment.captured"])
    assert r.status_code == 200
    assert await available(gw, "bo") == 500
    view = await admin_view(gw, p["payment_id"])
    assert view["status"] == "paid" and view["credited"] and view["provider_payment_id"].startswith("pay_")
    assert len(view["events"]) == 7 and view["anomalies"] == []


async def test_a_pretty_printed_non_ascii_body_signed_by_the_provider_verifies(gw):
    _, events = await rz_paid(gw, "zoe", description="crédits ☕ top-up")
    event = events["payment_link.paid"]
    assert event["payload"]["payment_link"]["entity"]["description"] == "crédits ☕ top-up"
    body = json.dumps(event, indent=4, ensure_ascii=False).encode("utf-8")
    assert "☕".encode() in body and b"\n    " in body
    r = await rz_deliver(gw, None, body=body, event_id="evt_pretty")
    assert r.status_code == 200, r.text
    assert await available(gw, "zoe") == 500


async def test_tampered_unsigned_and_wrongly_signed_deliveries_change_nothing(gw):
    p, events = await rz_paid(gw, "cy")
    raw, headers = fake_razorpay.webhook_request(events["payment_link.paid"], RZ_WEBHOOK)
    tampered = raw.replace(b'"amount_paid":50000', b'"amount_paid":50001')
    assert tampered != raw
    r = await gw.post("/webhooks/razorpay", content=tampered, headers=headers)
    assert r.status_code == 401
    unsigned = {k: v for k, v in headers.items() if k != "X-Razorpay-Signature"}
    assert (await gw.post("/webhooks/razorpay", content=raw, headers=unsigned)).status_code == 401
    r = await rz_deliver(gw, events["payment_link.paid"], secret="not-the-secret")
    assert r.status_code == 401
    assert await available(gw, "cy") == 0
    view = await admin_view(gw, p["payment_id"])
    assert view["status"] == "created" and view["events"] == []


async def test_an_amount_or_currency_mismatch_is_refused_and_shown_as_an_anomaly(gw):
    p, events = await rz_paid(gw, "di")
    forged = json.loads(json.dumps(events["payment_link.paid"]))
    forged["payload"]["payment_link"]["entity"]["amount_paid"] = 100
    r = await rz_deliver(gw, forged, event_id="evt_forged")
    # Refused and recorded, answered 2xx: a redelivery would not match either, and a
    # provider that keeps getting errors disables the webhook.
    assert (r.status_code, r.json()["status"]) == (200, "anomaly")
    assert await available(gw, "di") == 0
    view = await admin_view(gw, p["payment_id"])
    assert [a["kind"] for a in view["anomalies"]] == ["amount_mismatch"]
    assert view["anomalies"][0]["detail"]["expected"] == 50_000
    forged["payload"]["payment_link"]["entity"]["amount_paid"] = 50_000
    forged["payload"]["payment_link"]["entity"]["currency"] = "USD"
    assert (await rz_deliver(gw, forged, event_id="evt_forged_2")).json()["status"] == "anomaly"
    assert [a["kind"] for a in (await admin_view(gw, p["payment_id"]))["anomalies"]] == [
        "amount_mismatch",
        "currency_mismatch",
    ]


async def test_a_failure_is_not_final(gw):
    p = await buy(gw, "ed")
    link_id = (await admin_view(gw, p["payment_id"]))["link_id"]
    gw.fakes.razorpay.copy_notes_to_payment = True  # the failed payment names its payment id
    failed = gw.fakes.razorpay.fail(link_id)
    assert (await rz_deliver(gw, failed)).status_code == 200
    view = await admin_view(gw, p["payment_id"])
    assert view["status"] == "failed" and view["error"]
    # One payment_failed notification, however often the failure is delivered.
    assert (await rz_deliver(gw, failed)).status_code == 200
    assert (await rz_deliver(gw, failed, event_id="evt_failed_again")).status_code == 200
    listed = await gw.get("/admin/notifications", params={"user": "ed"}, headers=H_ADMIN)
    [note] = listed.json()["notifications"]
    assert (note["kind"], note["data"]["payment_id"], note["data"]["amount"]) == (
        "payment_failed",
        p["payment_id"],
        "500.00",
    )
    assert note["data"]["currency"] == "INR" and note["data"]["error"]
    events = gw.fakes.razorpay.pay(link_id)
    assert (await rz_deliver(gw, events["payment_link.paid"])).status_code == 200
    assert (await admin_view(gw, p["payment_id"]))["status"] == "paid"
    assert await available(gw, "ed") == 500


async def test_twenty_concurrent_deliveries_across_two_gateway_processes_credit_once(
    redis_url, fakes, store, gw
):
    """The second gateway has its own Redis client and its own store connection (another
    SQLite connection to the file, another MongoDB client or PostgreSQL pool), as another
    process would."""
    import redis.asyncio as aioredis

    from tests.support.store_fixtures import another_store

    _, events = await rz_paid(gw, "fa")
    paid = events["payment_link.paid"]
    other_store = another_store(store)
    other_redis = aioredis.Redis.from_url(redis_url)
    try:
        async with gateway(gateway_settings(redis_url, fakes), other_redis, other_store) as second:
            answers = await asyncio.gather(
                *(rz_deliver(gw if i % 2 else second, paid, event_id=f"evt_c{i % 4}") for i in range(20))
            )
    finally:
        await other_store.close()
        await other_redis.aclose()
    assert all(a.status_code == 200 for a in answers), [a.text for a in answers]
    assert await available(gw, "fa") == 500
    acct = (await gw.get("/admin/accounts/fa", headers=H_ADMIN)).json()
    assert Decimal(acct["granted"]) == 500


async def test_a_refund_after_spending_leaves_debt(gw):
    p, events = await rz_paid(gw, "gil")
    await rz_deliver(gw, events["payment_link.paid"])
    spend = await gw.post(
        "/admin/accounts/gil/debits",
        json={"amount": "400"},
        headers={**H_ADMIN, "Idempotency-Key": "spend-1"},
    )
    assert spend.status_code in (200, 201), spend.text
    r = await gw.post(f"/admin/payments/{p['payment_id']}/refund", json={}, headers=H_ADMIN)
    assert r.status_code == 202, r.text
    refund_id = r.json()["refund_id"]
    refund = gw.fakes.razorpay.refund_event(refund_id)
    assert (await rz_deliver(gw, refund)).status_code == 200
    assert (await rz_deliver(gw, refund, event_id="evt_refund_again")).status_code == 200
    acct = (await gw.get("/admin/accounts/gil", headers=H_ADMIN)).json()
    assert Decimal(acct["available"]) == 0 and Decimal(acct["debt"]) == 400
    view = await admin_view(gw, p["payment_id"])
    assert view["status"] == "refunded" and view["refunded_credits"] == "500"
    assert [x["refund_id"] for x in view["refunds"]] == [refund_id]


async def test_a_partial_refund_takes_back_its_share(gw):
    p, events = await rz_paid(gw, "hal")
    await rz_deliver(gw, events["payment_link.paid"])
    r = await gw.post(f"/admin/payments/{p['payment_id']}/refund", json={"amount": "125"}, headers=H_ADMIN)
    assert r.status_code == 202, r.text
    await rz_deliver(gw, gw.fakes.razorpay.refund_event(r.json()["refund_id"]))
    assert await available(gw, "hal") == 375
    assert (await admin_view(gw, p["payment_id"]))["status"] == "partially_refunded"
    too_much = await gw.post(
        f"/admin/payments/{p['payment_id']}/refund", json={"amount": "400"}, headers=H_ADMIN
    )
    assert too_much.status_code == 422


# -- credited once for the life of the deployment -------------------------------------------


async def drain(gw):
    services = gw.app.state.services
    await Worker(services.engine, services.store).run(burst=True)


async def test_a_replay_after_redis_forgot_the_op_id_credits_nothing(gw, redis):
    p, events = await rz_paid(gw, "ivy")
    await rz_deliver(gw, events["payment_link.paid"])
    await drain(gw)
    engine = gw.app.state.services.engine
    op_keys = [k async for k in redis.scan_iter(match=f"*payment:{p['payment_id']}*")]
    assert op_keys, "the op id is remembered in Redis"
    await redis.delete(*op_keys)  # what CREDIT_RETENTION_SECONDS does in time
    r = await rz_deliver(gw, events["payment_link.paid"], event_id="evt_months_later")
    assert r.status_code == 200
    assert await available(gw, "ivy") == 500
    # Even with the payment's credited mark lost, the ledger says the grant happened.
    await gw.store.update_payment(p["payment_id"], {"credited_ms": None})
    assert await gw.app.state.services.payments.reconcile(0) == [
        f"{p['payment_id']}: credited 500 credits to ivy"
    ]
    assert await available(gw, "ivy") == 500
    assert engine is not None


async def test_flushall_then_replay_credits_nothing(gw, redis):
    from gateway.core.recovery import rehydrate

    _, events = await rz_paid(gw, "jo")
    await rz_deliver(gw, events["payment_link.paid"])
    await drain(gw)
    services = gw.app.state.services
    await redis.flushall()
    await rehydrate(services.engine, services.store)
    assert await available(gw, "jo") == 500
    r = await rz_deliver(gw, events["payment_link.paid"], event_id="evt_after_flush")
    assert r.status_code == 200
    assert await available(gw, "jo") == 500


async def test_a_crash_between_the_paid_mark_and_the_grant_is_completed_once_by_reconcile(gw, monkeypatch):
    p, events = await rz_paid(gw, "kim")
    payments = gw.app.state.services.payments
    engine = payments.engine
    real = engine.grant_units

    monkeypatch.setattr(engine, "grant_units", dies_here)
    raw, headers = fake_razorpay.webhook_request(events["payment_link.paid"], RZ_WEBHOOK)
    with pytest.raises(ConnectionError):
        await payments.webhook("razorpay", raw, {k.lower(): v for k, v in headers.items()})
    view = await admin_view(gw, p["payment_id"])
    assert view["status"] == "paid" and not view["credited"]
    assert await available(gw, "kim") == 0
    monkeypatch.setattr(engine, "grant_units", real)
    assert await payments.reconcile(0) == [f"{p['payment_id']}: credited 500 credits to kim"]
    assert await payments.reconcile(0) == []
    # The provider's redelivery of the event that crashed finds it done.
    r = await rz_deliver(gw, events["payment_link.paid"])
    assert r.status_code == 200
    assert await available(gw, "kim") == 500


# -- stripe ------------------------------------------------------------------------------------


async def st_deliver(c, event, *, secret=ST_WEBHOOK, timestamp=None):
    raw, headers = fake_stripe.webhook_request(event, secret)
    if timestamp is not None:
        headers["Stripe-Signature"] = fake_stripe.sign(raw.decode(), secret, timestamp)
    return await c.post("/webhooks/stripe", content=raw, headers=headers)


async def test_stripe_checkout_paid_credits_once_and_a_stale_signature_is_refused(gw):
    p = await buy(gw, "lu", amount="10", currency="USD", provider="stripe")
    session_id = (await admin_view(gw, p["payment_id"]))["session_id"]
    completed = gw.fakes.stripe.pay(session_id)
    import time

    stale = await st_deliver(gw, completed, timestamp=int(time.time()) - 3600)
    assert stale.status_code == 401
    assert await available(gw, "lu") == 0
    assert (await st_deliver(gw, completed)).status_code == 200
    assert (await st_deliver(gw, completed)).status_code == 200
    assert await available(gw, "lu") == 900
    view = await admin_view(gw, p["payment_id"])
    assert view["status"] == "paid" and view["provider_payment_id"].startswith("pi_")


async def test_stripe_refund_without_the_refund_list_takes_back_the_new_part_once(gw):
    p = await buy(gw, "mo", amount="10", currency="USD", provider="stripe")
    session_id = (await admin_view(gw, p["payment_id"]))["session_id"]
    await st_deliver(gw, gw.fakes.stripe.pay(session_id))
    r = await gw.post(f"/admin/payments/{p['payment_id']}/refund", json={"amount": "2.50"}, headers=H_ADMIN)
    assert r.status_code == 202, r.text
    event = gw.fakes.stripe.refund_event(r.json()["refund_id"], include_refunds=False)
    assert (await st_deliver(gw, event)).status_code == 200
    assert (await st_deliver(gw, event)).status_code == 200
    assert await available(gw, "mo") == Decimal("675")
    assert (await admin_view(gw, p["payment_id"]))["status"] == "partially_refunded"


async def crashed_payment(gw, monkeypatch, user):
    """A payment marked paid whose grant never happened (the process died in between)."""
    p, events = await rz_paid(gw, user)
    engine = gw.app.state.services.payments.engine

    monkeypatch.setattr(engine, "grant_units", dies_here)
    raw, headers = fake_razorpay.webhook_request(events["payment_link.paid"], RZ_WEBHOOK)
    with pytest.raises(ConnectionError):
        await gw.app.state.services.payments.webhook(
            "razorpay", raw, {k.lower(): v for k, v in headers.items()}
        )
    monkeypatch.undo()
    assert await available(gw, user) == 0
    return p


async def test_the_worker_reconciles_payments_on_a_schedule(gw, monkeypatch):
    from functools import partial

    from gateway.worker.service import every

    p = await crashed_payment(gw, monkeypatch, "nia")
    stop = asyncio.Event()
    reconcile = partial(gw.app.state.services.payments.reconcile, 0)
    job = asyncio.create_task(every(0.05, reconcile, stop))
    for _ in range(100):
        if await available(gw, "nia") == 500:
            break
        await asyncio.sleep(0.02)
    stop.set()
    await asyncio.wait_for(job, 5)
    assert await available(gw, "nia") == 500
    assert (await admin_view(gw, p["payment_id"]))["credited"]


async def test_payments_reconcile_command_completes_what_a_crash_left(
    gw, monkeypatch, redis_url, fakes, tmp_path
):
    import os
    import subprocess
    import sys

    from tests.support.store_fixtures import store_env

    p = await crashed_payment(gw, monkeypatch, "oto")
    env = {
        **os.environ,
        "CREDIT_REDIS_URL": redis_url,
        "CREDIT_PARTITIONS": "16",
        "RAZORPAY_KEY_ID": RZ_KEY,
        "RAZORPAY_KEY_SECRET": RZ_SECRET,
        "CREDIT_RAZORPAY_BASE_URL": fakes.urls["razorpay"],
    }
    for inherited in ("CREDIT_DATABASE_URL", "CREDIT_MONGO_URI"):
        env.pop(inherited, None)
    env.update(store_env(gw.store))
    cmd = [sys.executable, "-m", "gateway.cli", "payments", "reconcile", "--older-than", "0s"]
    out = await asyncio.to_thread(subprocess.run, cmd, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert f"{p['payment_id']}: credited 500 credits to oto" in out.stdout
    assert "payments reconcile: 1 change(s), 0 failed" in out.stdout
    assert await available(gw, "oto") == 500
    again = await asyncio.to_thread(subprocess.run, cmd, env=env, capture_output=True, text=True, timeout=60)
    assert "payments reconcile: 0 change(s), 0 failed" in again.stdout


async def test_a_lost_webhook_is_settled_by_asking_the_provider(gw):
    rz, _ = await rz_paid(gw, "pia")  # paid at Razorpay; its webhooks never arrive
    st = await buy(gw, "pia", amount="2", currency="USD", provider="stripe")
    gw.fakes.stripe.pay((await admin_view(gw, st["payment_id"]))["session_id"])
    open_one = await buy(gw, "pia", amount="7")  # not paid anywhere
    changed = await gw.app.state.services.payments.reconcile(0)
    assert sorted(changed) == sorted(
        [f"{rz['payment_id']}: created -> paid (applied)", f"{st['payment_id']}: created -> paid (applied)"]
    )
    assert await available(gw, "pia") == 500 + 180
    assert (await admin_view(gw, open_one["payment_id"]))["status"] == "created"
    assert await gw.app.state.services.payments.reconcile(0) == []


async def test_packs_from_the_config_file(redis, redis_url, fakes, store, tmp_path):
    conf = tmp_path / "gw.toml"
    conf.write_text(
        '[payments]\nrates = { INR = "1" }\n'
        '[payments.packs.starter]\namount = "499"\ncurrency = "INR"\ncredits = "550"\n'
    )
    settings = gateway_settings(redis_url, fakes, gateway_config=str(conf), payment_rates=None)
    async with gateway(settings, redis, store) as c:
        c.fakes = fakes
        p = await buy(c, "quin", pack="starter", amount=None, currency=None)
        assert (p["amount"], p["currency"], p["credits"], p["pack"]) == ("499.00", "INR", "550", "starter")
        events = fakes.razorpay.pay((await admin_view(c, p["payment_id"]))["link_id"])
        assert (await rz_deliver(c, events["payment_link.paid"])).status_code == 200
        assert await available(c, "quin") == 550


async def test_admin_lists_payments_by_user_status_and_provider_page_by_page(gw):
    ids = [(await buy(gw, f"u{i % 2}", amount=str(10 + i)))["payment_id"] for i in range(5)]
    stripe_id = (await buy(gw, "u0", amount="3", currency="USD", provider="stripe"))["payment_id"]
    seen, cursor = [], None
    while True:
        r = await gw.get(
            "/admin/payments", params={"limit": 2, **({"cursor": cursor} if cursor else {})}, headers=H_ADMIN
        )
        assert r.status_code == 200, r.text
        seen += [p["payment_id"] for p in r.json()["payments"]]
        cursor = r.json()["next_cursor"]
        if cursor is None:
            break
    assert sorted(seen) == sorted([*ids, stripe_id]) and len(seen) == 6
    r = await gw.get("/admin/payments", params={"user": "u1"}, headers=H_ADMIN)
    assert sorted(p["payment_id"] for p in r.json()["payments"]) == sorted(ids[1::2])
    r = await gw.get("/admin/payments", params={"provider": "stripe"}, headers=H_ADMIN)
    assert [p["payment_id"] for p in r.json()["payments"]] == [stripe_id]
    r = await gw.get("/admin/payments", params={"status": "paid"}, headers=H_ADMIN)
    assert r.json()["payments"] == []
    assert (await gw.get("/admin/payments", params={"status": "bogus"}, headers=H_ADMIN)).status_code == 400
    assert (await gw.get("/admin/payments", params={"cursor": "x"}, headers=H_ADMIN)).status_code == 400
    assert (await gw.get("/admin/payments", headers=client_headers("u0"))).status_code == 401
    mine = await gw.get("/credits/payments", headers=client_headers("u1"))
    assert sorted(p["payment_id"] for p in mine.json()["payments"]) == sorted(ids[1::2])


async def test_a_webhook_is_answered_without_asking_the_provider(gw):
    """Providers retry slow answers (Razorpay within 5 s): a delivery does store and Redis
    work only; no call reaches either provider's API while the events are applied."""
    _, events = await rz_paid(gw, "ray")
    st = await buy(gw, "ray", amount="1", currency="USD", provider="stripe")
    completed = gw.fakes.stripe.pay((await admin_view(gw, st["payment_id"]))["session_id"])
    calls = (sum(gw.fakes.razorpay.calls.values()), len(gw.fakes.stripe.requests))
    assert (await rz_deliver(gw, events["payment_link.paid"])).status_code == 200
    assert (await st_deliver(gw, completed)).status_code == 200
    assert (sum(gw.fakes.razorpay.calls.values()), len(gw.fakes.stripe.requests)) == calls
    assert await available(gw, "ray") == 500 + 90


async def stripe_paid(gw, user, amount="10"):
    p = await buy(gw, user, amount=amount, currency="USD", provider="stripe")
    await st_deliver(gw, gw.fakes.stripe.pay((await admin_view(gw, p["payment_id"]))["session_id"]))
    return p


async def stripe_refund(gw, p, amount) -> str:
    r = await gw.post(f"/admin/payments/{p['payment_id']}/refund", json={"amount": amount}, headers=H_ADMIN)
    assert r.status_code == 202, r.text
    return r.json()["refund_id"]


async def test_concurrent_stripe_refund_events_take_back_each_refund_once(gw):
    p = await stripe_paid(gw, "sue")  # 900 credits
    ids = [await stripe_refund(gw, p, a) for a in ("1", "2", "3")]  # $6 of $10 refunded
    events = [gw.fakes.stripe.refund_event(i, include_refunds=False) for i in ids]
    answers = await asyncio.gather(*(st_deliver(gw, e) for e in events * 2))
    assert all(a.status_code == 200 for a in answers), [a.text for a in answers]
    assert await available(gw, "sue") == 360  # 900 - 540
    view = await admin_view(gw, p["payment_id"])
    assert (view["refunded_amount"], view["refunded_credits"], view["status"]) == (
        "6.00",
        "540",
        "partially_refunded",
    )


async def test_stripe_refund_events_of_both_api_versions_do_not_count_a_refund_twice(gw):
    p = await stripe_paid(gw, "tad")
    first = await stripe_refund(gw, p, "4")
    await st_deliver(gw, gw.fakes.stripe.refund_event(first, include_refunds=False))
    second = await stripe_refund(gw, p, "2")
    await st_deliver(gw, gw.fakes.stripe.refund_event(second, include_refunds=True))  # lists both
    assert await available(gw, "tad") == 900 - 540
    assert (await admin_view(gw, p["payment_id"]))["refunded_amount"] == "6.00"


async def test_refunds_that_do_not_fit_the_payment_take_nothing_and_are_shown(gw):
    p, events = await rz_paid(gw, "uma")
    await rz_deliver(gw, events["payment_link.paid"])
    asked = await gw.post(
        f"/admin/payments/{p['payment_id']}/refund", json={"amount": "300"}, headers=H_ADMIN
    )
    refund = gw.fakes.razorpay.refund_event(asked.json()["refund_id"])
    assert (await rz_deliver(gw, refund)).status_code == 200
    for i, amount in enumerate((60_000, 0, -5)):  # beyond what is left, zero, negative
        forged = json.loads(json.dumps(refund))
        forged["payload"]["refund"]["entity"].update({"id": f"rfnd_forged_{i}", "amount": amount})
        r = await rz_deliver(gw, forged, event_id=f"evt_forged_refund_{i}")
        assert (r.status_code, r.json()["status"]) == (200, "anomaly")
    # Ten refunds of 50 at once on the 200 left: four fit, and exactly those are taken.
    many = []
    for i in range(10):
        forged = json.loads(json.dumps(refund))
        forged["payload"]["refund"]["entity"].update({"id": f"rfnd_c{i}", "amount": 5_000})
        many.append(rz_deliver(gw, forged, event_id=f"evt_c_refund_{i}"))
    answers = await asyncio.gather(*many)
    assert sorted(a.json()["status"] for a in answers) == ["anomaly"] * 6 + ["applied"] * 4
    assert await available(gw, "uma") == 0
    view = await admin_view(gw, p["payment_id"])
    assert (view["refunded_amount"], view["status"], len(view["refunds"])) == ("500.00", "refunded", 5)
    assert sum(a["kind"] == "refund_exceeds_payment" for a in view["anomalies"]) == 9


async def test_money_captured_after_a_cancel_is_credited(gw):
    p = await buy(gw, "val")
    link_id = (await admin_view(gw, p["payment_id"]))["link_id"]
    events = gw.fakes.razorpay.pay(link_id)
    await gw.store.update_payment(p["payment_id"], {"status": "cancelled"})  # cancelled here first
    assert (await rz_deliver(gw, events["payment_link.paid"])).status_code == 200
    assert await available(gw, "val") == 500


async def test_an_event_naming_another_payment_s_link_is_an_anomaly(gw):
    _, bob_events = await rz_paid(gw, "bob2")
    dave = await buy(gw, "dave2")
    forged = json.loads(json.dumps(bob_events["payment_link.paid"]))
    forged["payload"]["payment_link"]["entity"]["reference_id"] = dave["payment_id"]
    forged["payload"]["payment_link"]["entity"]["notes"] = {
        "payment_id": dave["payment_id"],
        "user_id": "dave2",
    }
    r = await rz_deliver(gw, forged, event_id="evt_cross")
    assert r.json()["status"] == "anomaly"
    assert await available(gw, "dave2") == 0
    assert [a["kind"] for a in (await admin_view(gw, dave["payment_id"]))["anomalies"]] == [
        "link_id_mismatch"
    ]


async def test_reconcile_goes_on_past_a_payment_it_cannot_settle(gw, monkeypatch):
    stuck = await crashed_payment(gw, monkeypatch, "wes")
    fine = await crashed_payment(gw, monkeypatch, "xia")
    payments = gw.app.state.services.payments
    real = payments.engine.grant_units

    monkeypatch.setattr(payments.engine, "grant_units", all_but("wes", real))
    changed = await payments.reconcile(0)
    assert changed == [
        f"FAILED {stuck['payment_id']}: reconcile: RuntimeError: cannot be granted now",
        f"{fine['payment_id']}: credited 500 credits to xia",
    ]
    view = await admin_view(gw, stuck["payment_id"])
    assert view["credited"] is False and "cannot be granted" in view["error"]


async def test_anomalies_of_unknown_payments_and_reused_event_ids_are_listed(gw):
    p, events = await rz_paid(gw, "yan")
    paid = events["payment_link.paid"]
    assert (await rz_deliver(gw, paid, event_id="evt_once")).json()["status"] == "applied"
    other = json.loads(json.dumps(paid))
    other["payload"]["payment_link"]["entity"]["notes"] = {
        "payment_id": p["payment_id"],
        "user_id": "yan",
        "x": "1",
    }
    r = await rz_deliver(gw, other, event_id="evt_once")  # the same id, another body
    assert (r.status_code, r.json()["status"]) == (200, "anomaly")
    ghost = json.loads(json.dumps(paid))
    link = ghost["payload"]["payment_link"]["entity"]
    link["reference_id"] = "cgpay_" + "0" * 32
    link["notes"] = {"payment_id": link["reference_id"]}
    assert (await rz_deliver(gw, ghost, event_id="evt_ghost")).json()["status"] == "anomaly"
    r = await gw.get("/admin/payments/anomalies", headers=H_ADMIN)
    assert r.status_code == 200, r.text
    kinds = [(a["kind"], a["payment_id"]) for a in r.json()["anomalies"]]
    assert kinds == [("unknown_payment", link["reference_id"]), ("event_id_reused", p["payment_id"])]
    assert await available(gw, "yan") == 500
    assert (await gw.get("/admin/payments/anomalies", headers=client_headers("yan"))).status_code == 401


async def test_a_refund_delivered_before_the_payment_is_paid_waits_for_it(gw):
    p = await buy(gw, "zed", amount="10", currency="USD", provider="stripe")
    completed = gw.fakes.stripe.pay((await admin_view(gw, p["payment_id"]))["session_id"])
    intent = completed["data"]["object"]["payment_intent"]
    refund = gw.fakes.stripe.create_refund({"payment_intent": intent, "amount": "1000"})
    refunded = gw.fakes.stripe.refund_event(refund["id"], include_refunds=False)
    early = await st_deliver(gw, refunded)  # before checkout.session.completed
    assert (early.status_code, early.json()["status"]) == (503, "not_yet_paid")
    acct = await gw.get("/admin/accounts/zed", headers=H_ADMIN)
    assert acct.status_code == 404 or Decimal(acct.json()["debt"]) == 0
    assert (await st_deliver(gw, completed)).status_code == 200
    assert (await st_deliver(gw, refunded)).status_code == 200  # the provider's redelivery
    acct = (await gw.get("/admin/accounts/zed", headers=H_ADMIN)).json()
    assert (Decimal(acct["available"]), Decimal(acct["debt"])) == (0, 0)
    view = await admin_view(gw, p["payment_id"])
    assert (view["status"], view["refunded_amount"], view["refunded_credits"]) == ("refunded", "10.00", "900")


async def test_a_provider_payment_id_already_credited_to_another_payment_is_an_anomaly(gw):
    first, first_events = await rz_paid(gw, "aba")
    await rz_deliver(gw, first_events["payment_link.paid"])
    second, second_events = await rz_paid(gw, "abb")
    forged = json.loads(json.dumps(second_events["payment_link.paid"]))
    forged["payload"]["payment"]["entity"]["id"] = (await admin_view(gw, first["payment_id"]))[
        "provider_payment_id"
    ]
    r = await rz_deliver(gw, forged, event_id="evt_reused_pay_id")
    assert r.json()["status"] == "anomaly"
    assert await available(gw, "abb") == 0
    kinds = [a["kind"] for a in (await admin_view(gw, second["payment_id"]))["anomalies"]]
    assert kinds == ["provider_payment_id_reused"]


async def test_a_payment_the_provider_refuses_is_a_4xx_with_its_reason(gw):
    r = await gw.post(
        "/credits/payments",
        json={"amount": "0.1", "currency": "INR", "provider": "razorpay"},
        headers=client_headers("tiny"),
    )
    assert (r.status_code, r.json()["error"]["code"]) == (422, "provider_refused"), r.text
    assert "INR 1.00" in r.json()["error"]["message"]
