"""Credit the user can see coming: the account view and the user's own route list the
credit expiring within N days; held credit is shown apart (it expires only when its hold
resolves); expiry happens on time and is in the ledger."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

import pytest_asyncio

from gateway.worker.runner import Worker
from tests.support.api_fixtures import H_ADMIN, api_client, client_headers


@pytest_asyncio.fixture
async def api(redis, redis_url, tmp_path, clock):
    async with api_client(redis, redis_url, tmp_path, clock=clock) as c:
        yield c


def in_days(clock, days: float) -> str:
    return datetime.fromtimestamp(clock() + days * 86400, UTC).isoformat()


async def grant(api, user, amount, **extra):
    r = await api.post(f"/admin/accounts/{user}/grants", json={"amount": amount, **extra}, headers=H_ADMIN)
    assert r.status_code == 201, r.text
    return r.json()


async def test_the_credit_expiring_soon_is_listed_soonest_first_with_held_credit_apart(api, clock):
    soon = await grant(api, "eve", "10", expires_at=in_days(clock, 2), source="promo")
    later = await grant(api, "eve", "5", expires_at=in_days(clock, 20))
    await grant(api, "eve", "7")  # never expires
    hold = await api.post("/credits/holds", json={"amount": "3"}, headers=client_headers("eve"))
    assert hold.status_code == 201, hold.text  # drawn from the grant expiring first
    week = (await api.get("/admin/accounts/eve", params={"expiring_days": 7}, headers=H_ADMIN)).json()
    exp = week["expiring"]
    assert (exp["days"], Decimal(exp["total"]), Decimal(exp["held"])) == (7, 7, 3)
    assert [(g["grant_id"], g["source"], Decimal(g["remaining"])) for g in exp["grants"]] == [
        (soon["grant_id"], "promo", 7)
    ]
    month = (await api.get("/admin/accounts/eve", headers=H_ADMIN)).json()["expiring"]  # 30 days
    assert [g["grant_id"] for g in month["grants"]] == [soon["grant_id"], later["grant_id"]]
    assert Decimal(month["total"]) == 12
    mine = await api.get("/credits/expiring", params={"days": 30}, headers=client_headers("eve"))
    assert mine.status_code == 200 and mine.json()["grants"] == month["grants"]
    for bad in ({"days": -1}, {"days": 5000}, {"days": "soon"}):
        assert (
            await api.get("/credits/expiring", params=bad, headers=client_headers("eve"))
        ).status_code == 422
    assert (await api.get("/credits/expiring", headers=client_headers("mallory"))).json()["grants"] == []


async def test_expiry_is_on_time_keeps_held_credit_and_is_in_the_ledger(api, clock):
    await grant(api, "fin", "10", expires_at=in_days(clock, 0.5))
    await grant(api, "fin", "2")
    hold = (await api.post("/credits/holds", json={"amount": "4", "ttl_seconds": 86400},
                           headers=client_headers("fin"))).json()  # fmt: skip
    services = api.app.state.services
    assert "hold_id" in hold, hold
    clock.advance(43200 + 1)
    await services.engine.sweep()
    acct = (await api.get("/admin/accounts/fin", headers=H_ADMIN)).json()
    # The 6 free credits of the expired grant are gone; the 4 held stay held until the hold ends.
    assert (Decimal(acct["available"]), Decimal(acct["held"]), Decimal(acct["expired"])) == (2, 4, 6)
    assert acct["expiring"]["grants"] == []
    settled = await api.post(f"/credits/holds/{hold['hold_id']}/settle", json={"amount": "1"},
                             headers=client_headers("fin"))  # fmt: skip
    assert settled.status_code == 200, settled.text
    acct = (await api.get("/admin/accounts/fin", headers=H_ADMIN)).json()
    # Spent credit never expires again; the held rest of the expired grant lapses with the hold.
    assert (Decimal(acct["available"]), Decimal(acct["spent"]), Decimal(acct["expired"])) == (2, 1, 9)
    await Worker(services.engine, services.store).run(burst=True)
    ledger = (await api.get("/admin/accounts/fin/ledger", headers=H_ADMIN)).json()["entries"]
    assert "grant_expired" in [e["type"] for e in ledger]
