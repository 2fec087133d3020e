"""Promo codes on SQLite and MongoDB, against a real redis-server: definitions, claims
within their limits under any concurrency, the crash between a claim's two steps, and
counters rebuilt from the ledger after Redis loses them."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from decimal import Decimal

import pytest
import pytest_asyncio

from gateway.worker.runner import Worker
from tests.support.api_fixtures import H_ADMIN, app_client, client_headers, settings_for
from tests.support.engine_helpers import all_but, dies_here


@pytest_asyncio.fixture
async def store(new_store):
    return await new_store()


@pytest_asyncio.fixture
async def gw(redis, redis_url, store, clock):
    async with app_client(settings_for(redis_url), redis, store, clock) as c:
        yield c


def iso(clock, days: float) -> str:
    return datetime.fromtimestamp(clock() + days * 86400, UTC).isoformat()


async def make(gw, **body):
    r = await gw.post("/admin/promos", json={"credits": "100", **body}, headers=H_ADMIN)
    assert r.status_code == 201, r.text
    return r.json()


async def claim(gw, user, code):
    return await gw.post("/credits/promo/claim", json={"code": code}, headers=client_headers(user))


async def available(gw, user) -> Decimal:
    r = await gw.get(f"/admin/accounts/{user}", headers=H_ADMIN)
    return Decimal(r.json()["available"]) if r.status_code == 200 else Decimal(0)


async def test_codes_are_case_insensitive_unique_and_shown_with_their_claims(gw):
    p = await make(gw, code="  launch100 ", max_uses=500, valid_until="2999-01-31T00:00:00Z")
    assert (p["code"], p["credits"], p["max_uses_per_user"], p["claims"]) == ("LAUNCH100", "100", 1, 0)
    dup = await gw.post("/admin/promos", json={"code": "Launch100", "credits": "5"}, headers=H_ADMIN)
    assert (dup.status_code, dup.json()["error"]["code"]) == (409, "code_exists")
    assert (await claim(gw, "ann", "launch100")).status_code == 200
    view = (await gw.get("/admin/promos/LAUNCH100", headers=H_ADMIN)).json()
    assert view["claims"] == 1
    patched = await gw.patch("/admin/promos/launch100", json={"max_uses": 600}, headers=H_ADMIN)
    assert patched.status_code == 200 and patched.json()["max_uses"] == 600
    off = await gw.post("/admin/promos/launch100/deactivate", headers=H_ADMIN)
    assert off.json()["active"] is False
    assert [
        x["code"]
        for x in (await gw.get("/admin/promos", params={"active_only": True}, headers=H_ADMIN)).json()[
            "promos"
        ]
    ] == []
    r = await claim(gw, "bea", "LAUNCH100")
    assert (r.status_code, r.json()["error"]["code"]) == (409, "inactive")


@pytest.mark.parametrize(
    ("body", "status"),
    [
        ({"code": "", "credits": "1"}, 400),
        ({"code": "has space", "credits": "1"}, 400),
        ({"code": "X1"}, 400),
        ({"code": "X2", "credits": "1.0000001"}, 422),
        ({"code": "X3", "credits": "1", "max_uses": 0}, 400),
        ({"code": "X4", "credits": "1", "valid_until": "2027-01-01"}, 400),
        (
            {
                "code": "X5",
                "credits": "1",
                "grant_expires_at": "2999-01-01T00:00:00Z",
                "grant_expires_after_seconds": 5,
            },
            400,
        ),
        ({"code": "X6", "credits": "1", "target_users": ["ok", "no/slash"]}, 400),
        ({"code": "X7", "credits": "1", "bonus": True}, 400),
    ],
)
async def test_bad_definitions_are_refused_clearly(gw, body, status):
    r = await gw.post("/admin/promos", json=body, headers=H_ADMIN)
    assert r.status_code == status, r.text
    assert r.json()["error"]["message"]


async def test_a_claim_grants_once_and_eligibility_says_why_not(gw, clock):
    await make(gw, code="WELCOME", credits="25", grant_expires_after_seconds=86400)
    elig = (
        await gw.get("/credits/promo/eligibility", params={"code": "welcome"}, headers=client_headers("cy"))
    ).json()
    assert elig == {"eligible": True, "code": "WELCOME", "credits": "25", "reason": None}
    r = await claim(gw, "cy", "welcome")
    assert r.status_code == 200, r.text
    assert (r.json()["claim"], r.json()["credits"]) == (1, "25")
    assert await available(gw, "cy") == 25
    again = await claim(gw, "cy", "WELCOME")
    assert (again.status_code, again.json()["error"]["code"]) == (409, "already_claimed")
    elig = (
        await gw.get("/credits/promo/eligibility", params={"code": "WELCOME"}, headers=client_headers("cy"))
    ).json()
    assert (elig["eligible"], elig["reason"]) == (False, "already_claimed")
    unknown = (
        await gw.get("/credits/promo/eligibility", params={"code": "NOPE"}, headers=client_headers("cy"))
    ).json()
    assert (unknown["eligible"], unknown["reason"]) == (False, "unknown_code")
    assert (await claim(gw, "cy", "NOPE")).status_code == 404
    clock.advance(86400 + 1)  # the grant expires a day after its claim
    await gw.app.state.services.engine.sweep()
    assert await available(gw, "cy") == 0


async def test_window_and_target_rules(gw, clock):
    await make(gw, code="LATER", valid_from=iso(clock, 1))
    await make(gw, code="GONE", valid_from=iso(clock, -2), valid_until=iso(clock, -1))
    await make(gw, code="VIP", target_users=["vip1"])
    assert (await claim(gw, "dee", "LATER")).json()["error"]["code"] == "not_yet_valid"
    assert (await claim(gw, "dee", "GONE")).json()["error"]["code"] == "expired"
    r = await claim(gw, "dee", "VIP")
    assert (r.status_code, r.json()["error"]["code"]) == (403, "not_targeted")
    assert (await claim(gw, "vip1", "VIP")).status_code == 200


async def test_two_hundred_concurrent_claims_of_fifty_uses_grant_exactly_fifty(gw):
    await make(gw, code="RUSH", max_uses=50, credits="1")
    answers = await asyncio.gather(*(claim(gw, f"r{i}", "RUSH") for i in range(200)))
    codes = [a.status_code for a in answers]
    assert codes.count(200) == 50 and codes.count(409) == 150
    total = sum([await available(gw, f"r{i}") for i in range(200)], Decimal(0))
    assert total == 50
    assert (await gw.get("/admin/promos/RUSH", headers=H_ADMIN)).json()["claims"] == 50


async def test_twenty_concurrent_claims_by_one_user_grant_once(gw):
    await make(gw, code="ONCE", credits="10")
    answers = await asyncio.gather(*(claim(gw, "solo", "ONCE") for _ in range(20)))
    assert sum(a.status_code == 200 for a in answers) >= 1
    assert await available(gw, "solo") == 10


async def test_a_crash_between_the_two_steps_neither_grants_twice_nor_loses_the_claim(gw, monkeypatch, clock):
    await make(gw, code="CRASH", credits="7", max_uses=1)
    promos = gw.app.state.services.promos
    engine = promos.engine
    real = engine.grant_units

    monkeypatch.setattr(engine, "grant_units", dies_here)
    with pytest.raises(ConnectionError):
        await promos.claim("eli", "CRASH")
    monkeypatch.setattr(engine, "grant_units", real)
    assert await available(gw, "eli") == 0
    # The one use is taken (pending): nobody else gets it...
    assert (await claim(gw, "fay", "CRASH")).json()["error"]["code"] == "exhausted"
    # ...and the claimant's retry finishes the same claim.
    r = await claim(gw, "eli", "CRASH")
    assert (r.status_code, r.json()["claim"]) == (200, 1)
    assert await available(gw, "eli") == 7
    assert (await claim(gw, "eli", "CRASH")).json()["error"]["code"] == "already_claimed"
    # A claimant who never comes back: the worker's pass grants it, once.
    await make(gw, code="CRASH2", credits="3")
    monkeypatch.setattr(engine, "grant_units", dies_here)
    with pytest.raises(ConnectionError):
        await promos.claim("gus", "CRASH2")
    monkeypatch.setattr(engine, "grant_units", real)
    clock.advance(61)
    assert await promos.complete_pending() == ["CRASH2: claim 1 of gus granted"]
    assert await promos.complete_pending() == []
    assert await available(gw, "gus") == 3


async def test_counters_lost_with_redis_are_rebuilt_from_the_ledger(gw, redis):
    from gateway.core.recovery import rehydrate

    await make(gw, code="KEEP", credits="5", max_uses=2)
    assert (await claim(gw, "hal", "KEEP")).status_code == 200
    services = gw.app.state.services
    await Worker(services.engine, services.store).run(burst=True)
    await redis.flushall()
    await rehydrate(services.engine, services.store)
    assert (await gw.get("/admin/promos/KEEP", headers=H_ADMIN)).json()["claims"] == 1
    assert (await claim(gw, "hal", "KEEP")).json()["error"]["code"] == "already_claimed"
    assert (await claim(gw, "ivy", "KEEP")).status_code == 200
    assert (await claim(gw, "jon", "KEEP")).json()["error"]["code"] == "exhausted"
    assert await available(gw, "hal") == 5


async def test_a_grant_expiry_that_cannot_be_used_is_refused_before_any_use_is_taken(gw, clock):
    past = await gw.post(
        "/admin/promos",
        json={"code": "PAST", "credits": "1", "grant_expires_at": iso(clock, -1)},
        headers=H_ADMIN,
    )
    assert past.status_code == 400
    huge = await gw.post(
        "/admin/promos",
        json={"code": "HUGE", "credits": "1", "grant_expires_after_seconds": 10**14},
        headers=H_ADMIN,
    )
    assert huge.status_code == 400
    await make(gw, code="SOON", credits="1", grant_expires_at=iso(clock, 1))
    clock.advance(86400 + 1)  # the grant it gives would now expire at once
    r = await claim(gw, "kai", "SOON")
    assert (r.status_code, r.json()["error"]["code"]) == (409, "expired")
    assert (await gw.get("/admin/promos/SOON", headers=H_ADMIN)).json()["claims"] == 0


async def test_one_claim_that_cannot_be_granted_holds_up_no_other(gw, monkeypatch, clock):
    await make(gw, code="P1", credits="1")
    await make(gw, code="P2", credits="2")
    promos = gw.app.state.services.promos
    engine = promos.engine
    real = engine.grant_units

    monkeypatch.setattr(engine, "grant_units", dies_here)
    for code, user in (("P1", "lee"), ("P2", "mia")):
        with pytest.raises(ConnectionError):
            await promos.claim(user, code)

    monkeypatch.setattr(engine, "grant_units", all_but("lee", real))
    clock.advance(61)
    lines = await promos.complete_pending()
    assert lines == [
        "FAILED P1: claim 1 of lee: RuntimeError: cannot be granted now",
        "P2: claim 1 of mia granted",
    ]
    assert await available(gw, "mia") == 2


async def test_a_claim_the_worker_had_not_persisted_when_redis_was_lost_is_neither_lost_nor_taken_twice(
    gw, redis, clock
):
    """The claim's record is written by the claiming process before the grant: a rebuild
    counts it whatever the worker has persisted, and brings it back pending when its grant
    went with Redis."""
    from gateway.core.recovery import rehydrate

    await make(gw, code="ONE1", credits="4", max_uses=1)
    assert (await claim(gw, "ada", "ONE1")).status_code == 200  # granted in Redis only
    services = gw.app.state.services
    await redis.flushall()  # the grant and the counters go; the worker never ran
    await rehydrate(services.engine, services.store)
    r = await claim(gw, "bob", "ONE1")
    assert (r.status_code, r.json()["error"]["code"]) == (409, "exhausted")
    clock.advance(61)
    assert await services.promos.complete_pending() == ["ONE1: claim 1 of ada granted"]
    assert await available(gw, "ada") == 4 and await available(gw, "bob") == 0
    assert (await claim(gw, "ada", "ONE1")).json()["error"]["code"] == "already_claimed"
