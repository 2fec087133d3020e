"""Paid plans on SQLite and MongoDB: each period is granted when its payment is paid
(through the official razorpay SDK against the project's fake Razorpay), once however often
the webhook comes; an unpaid renewal ends the subscription; a payment that arrives for
nothing the subscription waits for is credited as a top-up, never lost."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

import pytest_asyncio

from tests.support.api_fixtures import H_ADMIN, app_client, client_headers
from tests.test_payments import admin_view, available, fakes, gateway_settings, rz_deliver

__all__ = ["fakes"]  # the fixture, used by name below

DAY = 86_400


@pytest_asyncio.fixture
async def store(new_store):
    return await new_store()


@pytest_asyncio.fixture
async def gw(redis, redis_url, fakes, store, clock):
    clock.t = datetime(2027, 3, 31, 9, 0, tzinfo=UTC).timestamp()
    async with app_client(gateway_settings(redis_url, fakes), redis, store, clock) as c:
        c.fakes, c.subs = fakes, c.app.state.services.subscriptions
        yield c


async def paid_plan(gw, **body) -> dict:
    body = {"name": "Pro", "price": "499", "currency": "INR", "credits": "1000", "period": "monthly", **body}
    r = await gw.post("/admin/plans", json=body, headers=H_ADMIN)
    assert r.status_code == 201, r.text
    return r.json()


async def pay(gw, payment_id: str) -> dict:
    """The customer pays the payment's link at the fake; its webhook delivered once."""
    link_id = (await admin_view(gw, payment_id))["link_id"]
    event = gw.fakes.razorpay.pay(link_id)["payment_link.paid"]
    r = await rz_deliver(gw, event)
    assert r.status_code == 200, r.text
    return event


async def mine(gw, user) -> dict:
    return (await gw.get("/credits/subscription", headers=client_headers(user))).json()["subscription"]


async def test_each_paid_period_is_granted_once_when_paid_and_an_unpaid_one_ends_it(gw):
    plan = await paid_plan(gw)
    r = await gw.post(
        "/admin/accounts/pia/subscriptions",
        json={"plan_id": plan["id"], "paid": True, "provider": "razorpay"},
        headers=H_ADMIN,
    )
    assert r.status_code == 201, r.text
    s = r.json()
    assert (s["status"], s["payment"]["status"]) == ("pending_payment", "created")
    assert s["payment"]["url"].startswith(gw.fakes.urls["razorpay"])
    link = gw.fakes.razorpay.links[(await admin_view(gw, s["payment"]["id"]))["link_id"]]
    assert link["amount"] == 49900  # 499.00 INR in paise
    assert await available(gw, "pia") == 0

    # Paid: period 0 starts now and is granted as plan credit, once.
    event = await pay(gw, s["payment"]["id"])
    assert (await rz_deliver(gw, event)).status_code == 200  # delivered again
    assert await available(gw, "pia") == 1000
    view = await mine(gw, "pia")
    assert (view["status"], view["period"], view["current_period_end"][:10]) == ("active", 0, "2027-04-30")
    assert view["payment"]["url"] is None  # nothing to pay now
    grants = (await gw.get("/admin/accounts/pia", headers=H_ADMIN)).json()["grants"]
    assert [(g["source"], g["expires_at"][:10]) for g in grants] == [("plan", "2027-04-30")]
    assert (await admin_view(gw, s["payment"]["id"]))["status"] == "paid"

    # The period ends: the renewal opens a payment; the period's credit waits for it.
    gw.clock.t = datetime(2027, 4, 30, 9, 0, 1, tzinfo=UTC).timestamp()
    lines = await gw.subs.run_due()
    assert lines and lines[0].endswith("period 1 awaits its payment"), lines
    assert await gw.subs.run_due() == []
    view = await mine(gw, "pia")
    assert (view["status"], view["period"], view["current_period_end"][:10]) == ("past_due", 1, "2027-05-31")
    assert view["payment"]["url"]
    gw.clock.advance(60)
    assert await available(gw, "pia") == 0  # period 0's credit expired; period 1 not paid yet
    await pay(gw, view["payment"]["id"])
    assert await available(gw, "pia") == 1000
    assert (await mine(gw, "pia"))["status"] == "active"

    # Period 2 is never paid: at its end the subscription ends.
    gw.clock.t = datetime(2027, 5, 31, 9, 0, 1, tzinfo=UTC).timestamp()
    await gw.subs.run_due()
    unpaid = (await mine(gw, "pia"))["payment"]["id"]
    gw.clock.t = datetime(2027, 6, 30, 9, 0, 1, tzinfo=UTC).timestamp()
    lines = await gw.subs.run_due()
    assert lines and lines[0].endswith("renewal not paid; ended"), lines
    view = await mine(gw, "pia")
    assert (view["status"], view["end_reason"]) == ("ended", "payment_failed")
    listed = (await gw.get("/admin/notifications", params={"user": "pia"}, headers=H_ADMIN)).json()
    kinds = sorted(n["kind"] for n in listed["notifications"] if n["kind"].startswith("subscription"))
    assert kinds == ["subscription_ended", "subscription_renewal_failed"]

    # Paid after all, too late for the period: credited as a top-up, not lost.
    await pay(gw, unpaid)
    account = (await gw.get("/admin/accounts/pia", headers=H_ADMIN)).json()
    assert [g["source"] for g in account["grants"]] == ["payment"]
    assert Decimal(account["available"]) == 1000


async def test_a_trial_is_granted_free_and_the_first_paid_period_follows_it(gw):
    plan = await paid_plan(gw, credits="200", trial_days=3, period="weekly")
    body = {"plan_id": plan["id"], "paid": True, "provider": "razorpay"}
    r = await gw.post("/admin/accounts/tia/subscriptions", json=body, headers=H_ADMIN)
    assert (r.status_code, r.json()["status"], r.json()["period"]) == (201, "trialing", -1)
    assert await available(gw, "tia") == 200
    gw.clock.advance(3 * DAY + 1)
    await gw.subs.run_due()
    view = await mine(gw, "tia")
    assert (view["status"], view["period"]) == ("past_due", 0)
    gw.clock.advance(60)
    assert await available(gw, "tia") == 0  # the trial's credit ended with it
    await pay(gw, view["payment"]["id"])
    assert await available(gw, "tia") == 200
    view = await mine(gw, "tia")
    assert (view["status"], view["period"]) == ("active", 0)
