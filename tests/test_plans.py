"""Plans and subscriptions on SQLite and MongoDB, against a real redis-server, on a manual
clock: definitions and their bad input, renewals exactly once (across calendar months,
with several workers at once, across a worker dying mid-renewal, after downtime), rollover
and its cap, cancelling, and the plan's limits."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from decimal import Decimal

import pytest
import pytest_asyncio

from gateway.core.engine import RateCharge
from gateway.core.errors import ModelNotAllowed
from gateway.plans.subscriptions import Subscriptions
from tests.support.api_fixtures import H_ADMIN, app_client, client_headers, settings_for
from tests.support.engine_helpers import assert_conserved, dies_here

DAILY = {"name": "A", "credits": "1", "period": "daily"}
JAN_31_2027 = datetime(2027, 1, 31, 12, 0, tzinfo=UTC).timestamp()
DAY = 86_400


@pytest_asyncio.fixture
async def store(new_store):
    return await new_store()


@pytest_asyncio.fixture
async def gw(redis, redis_url, store, clock):
    clock.t = JAN_31_2027
    async with app_client(settings_for(redis_url), redis, store, clock) as c:
        c.subs = c.app.state.services.subscriptions
        c.engine = c.app.state.services.engine
        yield c


def at(clock, y, m, d, h=12, s=0) -> None:
    clock.t = datetime(y, m, d, h, 0, s, tzinfo=UTC).timestamp()


async def make_plan(gw, **body) -> dict:
    body = {"name": "Pro", "credits": "100", "period": "monthly", **body}
    r = await gw.post("/admin/plans", json=body, headers=H_ADMIN)
    assert r.status_code == 201, r.text
    return r.json()


async def subscribe(gw, user, plan, **body):
    r = await gw.post(
        f"/admin/accounts/{user}/subscriptions", json={"plan_id": plan["id"], **body}, headers=H_ADMIN
    )
    assert r.status_code == 201, r.text
    return r.json()


async def account(gw, user) -> dict:
    r = await gw.get(f"/admin/accounts/{user}", headers=H_ADMIN)
    assert r.status_code == 200, r.text
    return r.json()


async def available(gw, user) -> Decimal:
    return Decimal((await account(gw, user))["available"])


async def plan_grants(gw, user) -> list[tuple[int, str]]:
    """(period, amount) of every plan grant the engine made, from the account's events."""
    from tests.support.engine_helpers import events_of

    return sorted(
        (int(e.grant_meta[next(iter(e.grant_meta))]["x"]["period"]), str(e.amount))
        for e in await events_of(gw.engine, user)
        if e.type == "grant" and e.op_id.startswith("plan:")
    )


def day(iso: str) -> str:
    return iso[:10]


# -- definitions --------------------------------------------------------------------------------


async def test_a_plan_is_defined_listed_changed_and_deactivated(gw):
    p = await make_plan(
        gw, name="Pro", price="29.99", currency="usd", credits="10000", rollover=False, trial_days=7
    )
    assert (p["name"], p["price"], p["currency"], p["credits"], p["period"]) == (
        "Pro", "29.99", "USD", "10000", "monthly"
    )  # fmt: skip
    assert p["id"].startswith("plan_") and p["active"] and not p["free"]
    assert (await gw.get(f"/admin/plans/{p['id']}", headers=H_ADMIN)).json() == p
    patched = await gw.patch(f"/admin/plans/{p['id']}", json={"credits": "12000"}, headers=H_ADMIN)
    assert patched.status_code == 200 and patched.json()["credits"] == "12000"
    assert patched.json()["price"] == "29.99"
    off = await gw.post(f"/admin/plans/{p['id']}/deactivate", headers=H_ADMIN)
    assert off.json()["active"] is False
    listed = await gw.get("/admin/plans", params={"active_only": True}, headers=H_ADMIN)
    assert listed.json()["plans"] == []
    r = await gw.post("/admin/accounts/u1/subscriptions", json={"plan_id": p["id"]}, headers=H_ADMIN)
    assert (r.status_code, r.json()["error"]["code"]) == (409, "plan_inactive")


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"credits": "1", "period": "monthly"}, 400, "invalid_request"),  # no name
        ({"name": "A", "credits": "1", "period": "hourly"}, 400, "invalid_request"),
        ({"name": "A", "credits": "0", "period": "daily"}, 422, "invalid_amount"),
        ({"name": "A", "credits": "1.0000001", "period": "daily"}, 422, "invalid_amount"),
        ({**DAILY, "price": "-5", "currency": "USD"}, 422, "invalid_amount"),
        ({**DAILY, "price": "9.999", "currency": "USD"}, 422, "invalid_amount"),
        ({**DAILY, "price": "5", "currency": "XYZ"}, 400, "invalid_request"),
        ({**DAILY, "rollover_cap": "5"}, 400, "invalid_request"),
        ({**DAILY, "allowed_models": ["a|b"]}, 400, "invalid_request"),
        ({**DAILY, "allowed_models": []}, 400, "invalid_request"),
        ({**DAILY, "trial_days": -1}, 400, "invalid_request"),
        ({**DAILY, "requests_per_minute": "5"}, 400, "invalid_request"),
        ({**DAILY, "bonus": True}, 400, "invalid_request"),
    ],
)  # fmt: skip
async def test_bad_plan_definitions_are_refused_clearly(gw, body, status, code):
    r = await gw.post("/admin/plans", json=body, headers=H_ADMIN)
    assert (r.status_code, r.json()["error"]["code"]) == (status, code), r.text
    assert r.json()["error"]["message"]


async def test_bad_subscription_requests_are_refused_clearly(gw):
    plan = await make_plan(gw)
    paid = await make_plan(gw, name="Paid", price="5", currency="USD")
    subs = "/admin/accounts/u1/subscriptions"
    cases = [
        ("/admin/plans/plan_nope", "GET", None, 404, "unknown_plan"),
        ("/admin/plans/plan_nope", "PATCH", {"credits": "5"}, 404, "unknown_plan"),
        (f"/admin/plans/{plan['id']}", "PATCH", {"period": "daily"}, 400, "invalid_request"),
        ("/admin/accounts/u1/subscriptions", "POST", {"plan_id": "plan_nope"}, 404, "unknown_plan"),
        ("/admin/accounts/u1/subscriptions", "POST", {}, 404, "unknown_plan"),
        (subs, "POST", {"plan_id": plan["id"], "paid": "yes"}, 400, "invalid_request"),
        (subs, "POST", {"plan_id": plan["id"], "x": 1}, 400, "invalid_request"),
        # No payment provider is configured here: a paid subscription cannot be sold.
        (subs, "POST", {"plan_id": paid["id"], "paid": True}, 400, "provider_not_configured"),
        (subs, "POST", {"plan_id": paid["id"], "paid": True, "provider": "paypal"}, 400, "unknown_provider"),
        # A priced plan is never given away by default: paid must be said.
        (subs, "POST", {"plan_id": paid["id"]}, 400, "invalid_request"),
        (subs, "POST", {"plan_id": plan["id"], "provider": "stripe"}, 400, "invalid_request"),
        ("/admin/accounts/u1/subscriptions", "DELETE", None, 404, "no_subscription"),
    ]  # fmt: skip
    for path, method, body, status, code in cases:
        r = await gw.request(method, path, json=body, headers=H_ADMIN)
        assert (r.status_code, r.json()["error"]["code"]) == (status, code), (path, body, r.text)
    await subscribe(gw, "u1", plan)
    again = await gw.post("/admin/accounts/u1/subscriptions", json={"plan_id": plan["id"]}, headers=H_ADMIN)
    assert (again.status_code, again.json()["error"]["code"]) == (409, "already_subscribed")
    bad_user = await gw.post(
        "/admin/accounts/no%2Fslash/subscriptions", json={"plan_id": plan["id"]}, headers=H_ADMIN
    )
    assert bad_user.status_code in (404, 422)
    # A user sees only its own subscription, with its client key.
    mine = await gw.get("/credits/subscription", headers=client_headers("u1"))
    assert mine.json()["subscription"]["plan"]["id"] == plan["id"]
    assert (await gw.get("/credits/subscription", headers=client_headers("u2"))).json() == {
        "subscription": None
    }
    assert (await gw.get("/credits/subscription")).status_code == 401


# -- renewals -----------------------------------------------------------------------------------


async def test_calendar_months_renew_once_each_and_last_period_credit_expires(gw):
    plan = await make_plan(gw, credits="100")
    s = await subscribe(gw, "mo", plan)
    assert (s["status"], day(s["current_period_start"]), day(s["current_period_end"])) == (
        "active", "2027-01-31", "2027-02-28"
    )  # fmt: skip
    assert await available(gw, "mo") == 100
    grant = (await account(gw, "mo"))["grants"][0]
    assert (grant["source"], day(grant["expires_at"])) == ("plan", "2027-02-28")

    ends = []
    for y, m, d in ((2027, 2, 28), (2027, 3, 31), (2027, 4, 30)):
        assert await gw.subs.run_due() == []  # not due yet
        at(gw.clock, y, m, d, 12, 1)
        lines = await gw.subs.run_due()
        assert len(lines) == 1 and "granted" in lines[0], lines
        assert await gw.subs.run_due() == []  # once
        view = (await gw.get("/admin/accounts/mo/subscriptions", headers=H_ADMIN)).json()["subscriptions"][0]
        ends.append(day(view["current_period_end"]))
        # The last period's credit lasts a minute past its end (no gap while the renewal
        # runs), spent first; then only this period's is left.
        assert await available(gw, "mo") == 200
        gw.clock.advance(60)
        assert await available(gw, "mo") == 100
    assert ends == ["2027-03-31", "2027-04-30", "2027-05-31"]
    assert await plan_grants(gw, "mo") == [
        (0, "100000000"),
        (1, "100000000"),
        (2, "100000000"),
        (3, "100000000"),
    ]
    await gw.engine.sweep()
    await assert_conserved(gw.engine, "mo")
    assert Decimal((await account(gw, "mo"))["expired"]) == 300


async def test_leap_years_and_the_anchor_day_come_back(gw):
    from gateway.plans.periods import bounds

    anchor = int(datetime(2028, 1, 31, tzinfo=UTC).timestamp() * 1000)
    starts = [
        datetime.fromtimestamp(bounds(anchor, "monthly", k)[0] / 1000, UTC).date().isoformat()
        for k in range(4)
    ]
    assert starts == ["2028-01-31", "2028-02-29", "2028-03-31", "2028-04-30"]
    leap = int(datetime(2028, 2, 29, tzinfo=UTC).timestamp() * 1000)
    years = [
        datetime.fromtimestamp(bounds(leap, "yearly", k)[0] / 1000, UTC).date().isoformat() for k in (1, 4)
    ]
    assert years == ["2029-02-28", "2032-02-29"]
    week = bounds(anchor, "weekly", 1)
    assert week[1] - week[0] == 7 * DAY * 1000


async def test_several_workers_at_once_renew_each_period_once(gw):
    plan = await make_plan(gw, credits="10", period="daily")
    users = [f"w{i}" for i in range(8)]
    for u in users:
        await subscribe(gw, u, plan)
    services = gw.app.state.services
    workers = [Subscriptions(services.store, services.engine, None) for _ in range(4)]
    for _ in range(3):
        gw.clock.advance(DAY + 1)
        lines = await asyncio.gather(*(w.run_due() for w in workers))
        # Every subscription renewed (a worker that finds a grant another has just fixed
        # makes it too, as a replay, and says so); none failed.
        reported = {line.split(" of ")[1].split(":")[0] for x in lines for line in x}
        assert reported == set(users) and not any("FAILED" in line for x in lines for line in x), lines
    gw.clock.advance(60)  # past the last period's minute of grace
    for u in users:
        assert await plan_grants(gw, u) == [(k, "10000000") for k in range(4)]
        assert await available(gw, u) == 10


async def test_a_worker_dying_mid_renewal_leaves_it_to_the_next_one_and_nothing_twice(gw, monkeypatch):
    plan = await make_plan(gw, credits="40", period="weekly")
    await subscribe(gw, "kim", plan)
    gw.clock.advance(7 * DAY + 1)
    engine = gw.engine
    real_grant = engine.grant_units
    # Dies after the renewal was taken, before its grant.
    monkeypatch.setattr(engine, "grant_units", dies_here)
    lines = await gw.subs.run_due()
    assert lines and lines[0].startswith("FAILED"), lines
    monkeypatch.setattr(engine, "grant_units", real_grant)
    rec = (await gw.app.state.services.store.subscriptions_of("kim"))[0]
    assert rec.grant is not None and rec.grant["period"] == 1 and rec.granted_period == 0
    # A restarted worker (a new service on the same store) finishes it once.
    restarted = Subscriptions(gw.app.state.services.store, engine, None)
    gw.clock.advance(301)
    assert await restarted.run_due() == [f"{rec.sub_id} of kim: period 1 granted"]
    assert await restarted.run_due() == []
    # Dies after the grant, before it is marked: the next pass marks it, granting nothing.
    gw.clock.advance(7 * DAY)
    store = gw.app.state.services.store
    real_update = store.update_subscription
    calls = {"n": 0}

    async def dies_on_the_mark(sub_id, changes, *, expect=None):
        if "granted_period" in changes:
            calls["n"] += 1
            raise ConnectionError("the store went away")
        return await real_update(sub_id, changes, expect=expect)

    monkeypatch.setattr(store, "update_subscription", dies_on_the_mark)
    assert (await restarted.run_due())[0].startswith("FAILED")
    monkeypatch.setattr(store, "update_subscription", real_update)
    gw.clock.advance(301)
    assert await restarted.run_due() == [f"{rec.sub_id} of kim: period 2 granted"]
    assert await plan_grants(gw, "kim") == [(0, "40000000"), (1, "40000000"), (2, "40000000")]
    assert calls["n"] == 1


async def test_a_worker_down_for_three_periods_grants_the_current_one_only(gw):
    at(gw.clock, 2027, 1, 1)
    plan = await make_plan(gw, credits="30")
    await subscribe(gw, "dee", plan)
    at(gw.clock, 2027, 4, 15)  # February, March: missed; April: current
    lines = await gw.subs.run_due()
    assert lines == [lines[0]] and lines[0].endswith("period 3 granted (2 skipped)"), lines
    view = (await gw.get("/credits/subscription", headers=client_headers("dee"))).json()["subscription"]
    assert (view["period"], view["skipped_periods"]) == (3, 2)
    assert (day(view["current_period_start"]), day(view["current_period_end"])) == (
        "2027-04-01",
        "2027-05-01",
    )
    assert await plan_grants(gw, "dee") == [(0, "30000000"), (3, "30000000")]
    assert await available(gw, "dee") == 30


async def test_rollover_carries_unused_credit_up_to_the_cap_and_plan_credit_is_spent_first(gw):
    plan = await make_plan(gw, credits="100", period="daily", rollover=True, rollover_cap="50")
    await gw.engine.grant("ro", "10", op_id="bought-10", source="payment")
    await subscribe(gw, "ro", plan)
    assert await available(gw, "ro") == 110
    await gw.engine.debit("ro", "30", op_id="spend-30")
    grants = {g["source"]: g for g in (await account(gw, "ro"))["grants"]}
    assert (Decimal(grants["plan"]["remaining"]), Decimal(grants["payment"]["remaining"])) == (
        70,
        10,
    )  # plan first
    assert grants["plan"]["expires_at"] is None  # rolls over
    gw.clock.advance(DAY + 1)
    await gw.subs.run_due()
    assert await available(gw, "ro") == 10 + 50 + 100  # 70 unused, capped at 50
    gw.clock.advance(DAY)
    await gw.subs.run_due()
    assert await available(gw, "ro") == 10 + 50 + 100  # 150 unused, capped at 50 again
    await assert_conserved(gw.engine, "ro")
    # Ended now: all its plan credit goes with it; the purchase stays.
    r = await gw.delete("/admin/accounts/ro/subscriptions", params={"at_period_end": False}, headers=H_ADMIN)
    assert (r.status_code, r.json()["status"], r.json()["end_reason"]) == (200, "ended", "canceled")
    assert await available(gw, "ro") == 10
    await assert_conserved(gw.engine, "ro")
    assert Decimal((await account(gw, "ro"))["expired"]) == 20 + 100 + 150


async def test_plan_credit_held_when_the_subscription_ends_expires_when_its_hold_resolves(gw):
    plan = await make_plan(gw, credits="20", period="daily", rollover=True)
    await subscribe(gw, "hh", plan)
    await gw.engine.reserve("hh", "15", hold_id="h-open", ttl_seconds=600)
    await gw.delete("/admin/accounts/hh/subscriptions", params={"at_period_end": False}, headers=H_ADMIN)
    assert await available(gw, "hh") == 0
    await gw.engine.release("hh", "h-open")
    assert await available(gw, "hh") == 0  # what came back expired
    await assert_conserved(gw.engine, "hh")


async def test_cancel_at_the_period_end_keeps_the_period_and_grants_no_other(gw):
    plan = await make_plan(gw, credits="5", period="daily", requests_per_minute=7, allowed_models=["m1"])
    await subscribe(gw, "cy", plan)
    limits = (await gw.get("/admin/accounts/cy/limits", headers=H_ADMIN)).json()
    assert (limits["plan_requests_per_minute"], limits["allowed_models"]) == (7, ["m1"])
    assert limits["effective_requests_per_minute"] == 7
    r = await gw.delete("/admin/accounts/cy/subscriptions", headers=H_ADMIN)
    assert (r.json()["status"], r.json()["cancel_at_period_end"]) == ("active", True)
    assert await available(gw, "cy") == 5
    gw.clock.advance(DAY + 1)
    lines = await gw.subs.run_due()
    assert lines and "canceled at the period's end" in lines[0]
    assert await gw.subs.run_due() == []
    history = (await gw.get("/admin/accounts/cy/subscriptions", headers=H_ADMIN)).json()["subscriptions"]
    assert [(h["status"], h["end_reason"]) for h in history] == [("ended", "canceled")]
    assert await plan_grants(gw, "cy") == [(0, "5000000")]
    limits = (await gw.get("/admin/accounts/cy/limits", headers=H_ADMIN)).json()
    assert (limits["plan_requests_per_minute"], limits["allowed_models"]) == (None, None)
    # Ended: a new subscription may start.
    await subscribe(gw, "cy", plan)
    assert (
        len((await gw.get("/admin/accounts/cy/subscriptions", headers=H_ADMIN)).json()["subscriptions"]) == 2
    )


async def test_the_plan_s_models_are_enforced_in_the_reserve(gw):
    plan = await make_plan(gw, credits="5", allowed_models=["small", "medium"])
    await subscribe(gw, "mm", plan)
    await gw.engine.reserve("mm", "1", hold_id="ok-1", ttl_seconds=60, rate=RateCharge(model="small"))
    for refused in ("large", "small|medium", "sma"):
        with pytest.raises(ModelNotAllowed, match="model not allowed"):
            await gw.engine.reserve(
                "mm", "1", hold_id=f"no-{len(refused)}", ttl_seconds=60, rate=RateCharge(model=refused)
            )
    # An admin's own limits beat the plan's and keep it: both are kept apart.
    r = await gw.put("/admin/accounts/mm/limits", json={"requests_per_minute": 3}, headers=H_ADMIN)
    assert r.status_code == 200 and r.json()["allowed_models"] == ["medium", "small"]
    assert r.json()["effective_requests_per_minute"] == 3


async def test_twenty_concurrent_subscriptions_of_one_account_make_one(gw):
    plan = await make_plan(gw, credits="3")
    body = {"plan_id": plan["id"]}
    answers = await asyncio.gather(
        *(gw.post("/admin/accounts/zed/subscriptions", json=body, headers=H_ADMIN) for _ in range(20))
    )
    assert sorted(r.status_code for r in answers) == [201] + [409] * 19
    assert await available(gw, "zed") == 3
    assert (
        len((await gw.get("/admin/accounts/zed/subscriptions", headers=H_ADMIN)).json()["subscriptions"]) == 1
    )


async def test_a_subscription_ended_while_its_grant_is_being_made_keeps_none_of_it(gw):
    plan = await make_plan(gw, credits="120", period="daily", rollover=True)
    users = [f"race{i}" for i in range(12)]

    async def both(user):
        sub = gw.post(f"/admin/accounts/{user}/subscriptions", json={"plan_id": plan["id"]}, headers=H_ADMIN)
        end = gw.delete(
            f"/admin/accounts/{user}/subscriptions", params={"at_period_end": False}, headers=H_ADMIN
        )
        return await asyncio.gather(sub, end)

    await asyncio.gather(*(both(u) for u in users))
    for u in users:
        history = (await gw.get(f"/admin/accounts/{u}/subscriptions", headers=H_ADMIN)).json()[
            "subscriptions"
        ]
        if history and history[0]["status"] == "ended":
            assert await available(gw, u) == 0, (u, history[0]["history"])
        elif history:  # the cancel came first and found nothing to cancel
            assert await available(gw, u) == 120
        await assert_conserved(gw.engine, u)


async def test_plan_text_and_amounts_that_cannot_be_stored_are_refused(gw):
    lone = b'{"name": "\\ud800", "credits": "1", "period": "daily"}'
    r = await gw.post("/admin/plans", content=lone, headers={**H_ADMIN, "Content-Type": "application/json"})
    assert r.status_code in (400, 422) and r.json()["error"]["code"] in (
        "malformed_json",
        "invalid_request",
    ), r.text
    for body in (
        {**DAILY, "name": "a\x00b"},
        {**DAILY, "price": "1e999999", "currency": "USD"},
        {**DAILY, "price": "5"},  # a price needs its currency
    ):
        r = await gw.post("/admin/plans", json=body, headers=H_ADMIN)
        assert r.status_code in (400, 422), (body, r.text)
    assert (await gw.get("/admin/plans", headers=H_ADMIN)).json()["plans"] == []
    free = await make_plan(gw, price="0")
    assert (free["price"], free["currency"], free["free"]) == ("0", None, True)


async def test_a_plan_s_models_and_limits_change_for_its_subscribers_at_once(gw):
    plan = await make_plan(gw, credits="5", allowed_models=["small"])
    await subscribe(gw, "ch", plan)
    with pytest.raises(ModelNotAllowed):
        await gw.engine.reserve("ch", "1", hold_id="c-1", ttl_seconds=60, rate=RateCharge(model="large"))
    r = await gw.patch(f"/admin/plans/{plan['id']}", json={"allowed_models": None}, headers=H_ADMIN)
    assert r.status_code == 200
    await gw.engine.reserve("ch", "1", hold_id="c-2", ttl_seconds=60, rate=RateCharge(model="large"))
    # The period, sent unchanged, is no change.
    same = await gw.patch(f"/admin/plans/{plan['id']}", json={"period": "monthly"}, headers=H_ADMIN)
    assert same.status_code == 200


async def notes(gw, user) -> list[tuple[str, dict]]:
    r = await gw.get("/admin/notifications", params={"user": user}, headers=H_ADMIN)
    assert r.status_code == 200, r.text
    return sorted((n["kind"], n["data"]) for n in r.json()["notifications"])


async def test_an_ended_subscription_is_notified_once(gw, monkeypatch):
    plan = await make_plan(gw, credits="5", period="daily")
    s = await subscribe(gw, "no", plan)
    await gw.delete("/admin/accounts/no/subscriptions", params={"at_period_end": False}, headers=H_ADMIN)
    data = {"subscription": s["id"], "plan_id": plan["id"], "reason": "canceled"}
    assert await notes(gw, "no") == [("subscription_ended", data)]
    # The wind-up cut before its notification: the next pass records it, once.
    s2 = await subscribe(gw, "no2", plan)
    real = gw.subs.notify

    async def cut(**_):
        raise ConnectionError("the store went away")

    monkeypatch.setattr(gw.subs, "notify", cut)
    with pytest.raises(ConnectionError):
        await gw.delete("/admin/accounts/no2/subscriptions", params={"at_period_end": False}, headers=H_ADMIN)
    monkeypatch.setattr(gw.subs, "notify", real)
    assert await notes(gw, "no2") == []
    assert [line.split(": ")[1] for line in await gw.subs.run_due()] == ["ended (canceled)"]
    assert await gw.subs.run_due() == []
    data2 = {"subscription": s2["id"], "plan_id": plan["id"], "reason": "canceled"}
    assert await notes(gw, "no2") == [("subscription_ended", data2)]


async def test_concurrent_changes_of_a_plan_s_fields_keep_each_other(gw):
    plan = await make_plan(gw, credits="5")
    path = f"/admin/plans/{plan['id']}"
    bodies = [{"name": "Renamed"}, {"credits": "6"}, {"description": "d"}, {"trial_days": 3}] * 3
    answers = await asyncio.gather(*(gw.patch(path, json=b, headers=H_ADMIN) for b in bodies))
    assert {r.status_code for r in answers} == {200}
    after = (await gw.get(path, headers=H_ADMIN)).json()
    assert (after["name"], after["credits"], after["description"], after["trial_days"]) == (
        "Renamed",
        "6",
        "d",
        3,
    )
