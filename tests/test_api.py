"""The HTTP API against a real redis-server and a SQLite store."""

from __future__ import annotations

import json
from decimal import Decimal

import httpx
import pytest

from gateway.api.app import create_app
from gateway.core.settings import Settings
from gateway.core.store.sqlite import SQLiteStore
from tests.support.api_fixtures import ADMIN, CLIENT, H_ADMIN, client_headers, grant


async def test_health_and_ready(api):
    assert (await api.get("/healthz")).json() == {"status": "ok"}
    r = await api.get("/readyz")
    assert r.status_code == 200 and r.json()["checks"] == {"redis": True, "store": True, "state": True}


async def test_openapi_is_served(api):
    r = await api.get("/openapi.json")
    assert r.status_code == 200
    assert "/credits/holds" in r.json()["paths"]
    assert (await api.get("/docs")).status_code == 200


async def test_admin_grant_then_hold_settle_release_and_balance(api):
    g = await grant(api, "alice", "10.5")
    assert g["available"] == "10.500000" and g["replayed"] is False
    r = await api.post(
        "/credits/holds",
        json={"amount": "4", "ttl_seconds": 60, "hold_id": "job-1"},
        headers=client_headers("alice"),
    )
    assert r.status_code == 201, r.text
    assert r.json()["available"] == "6.500000"
    r = await api.post(
        "/credits/holds/job-1/settle", json={"amount": "1.25"}, headers=client_headers("alice")
    )
    assert r.status_code == 200 and r.json()["charged"] == "1.250000" and r.json()["returned"] == "2.750000"
    r = await api.post(
        "/credits/holds", json={"amount": "1", "hold_id": "job-2"}, headers=client_headers("alice")
    )
    r = await api.post("/credits/holds/job-2/release", headers=client_headers("alice"))
    assert r.json()["status"] == "released"
    b = (await api.get("/credits/balance", headers=client_headers("alice"))).json()
    assert b == {
        "user_id": "alice",
        "available": "9.250000",
        "held": "0.000000",
        "debt": "0.000000",
        "version": 5,
    }
    acct = (await api.get("/admin/accounts/alice", headers=H_ADMIN)).json()
    assert acct["spent"] == "1.250000" and acct["grants"][0]["remaining"] == "9.250000"


async def test_insufficient_credit_is_402_naming_the_reason(api):
    await grant(api, "bob", "1")
    r = await api.post("/credits/holds", json={"amount": "2"}, headers=client_headers("bob"))
    assert r.status_code == 402
    assert r.json()["error"]["code"] == "insufficient_credits"
    assert r.json()["error"]["available"] == "1.000000"


async def test_holds_of_another_user_are_invisible(api):
    await grant(api, "carol", "5")
    await api.post(
        "/credits/holds", json={"amount": "1", "hold_id": "secret"}, headers=client_headers("carol")
    )
    r = await api.post(
        "/credits/holds/secret/settle", json={"amount": "1"}, headers=client_headers("mallory")
    )
    assert r.status_code == 404 and r.json()["error"]["code"] == "hold_not_found"
    assert "carol" not in r.text


async def test_idempotency_key_replays_and_refuses_another_body(api):
    h = {**H_ADMIN, "Idempotency-Key": "topup-42"}
    r1 = await api.post("/admin/accounts/dave/grants", json={"amount": "3"}, headers=h)
    r2 = await api.post("/admin/accounts/dave/grants", json={"amount": "3"}, headers=h)
    assert r1.status_code == r2.status_code == 201
    assert r2.headers.get("Idempotent-Replayed") == "true" and r2.json()["available"] == "3.000000"
    r3 = await api.post("/admin/accounts/dave/grants", json={"amount": "4"}, headers=h)
    assert r3.status_code == 422 and r3.json()["error"]["code"] == "op_conflict"
    bal = (await api.get("/credits/balance", headers=client_headers("dave"))).json()
    assert bal["available"] == "3.000000"


async def test_debit_and_short_debit(api):
    await grant(api, "erin", "2")
    r = await api.post("/admin/accounts/erin/debits", json={"amount": "0.5"}, headers=H_ADMIN)
    assert r.status_code == 201 and r.json()["available"] == "1.500000"
    r = await api.post("/admin/accounts/erin/debits", json={"amount": "5"}, headers=H_ADMIN)
    assert r.status_code == 402


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({"amount": "-1"}, "invalid_amount"),
        ({"amount": "abc"}, "invalid_amount"),
        ({"amount": "0.0000001"}, "invalid_amount"),
        ({"amount": 1.5}, None),  # a JSON number is read as Decimal: accepted, exactly
        ({"amount": "0"}, "invalid_amount"),
        ({"amount": "1", "surprise": 1}, "invalid_request"),
        ({}, "invalid_request"),
    ],
)
async def test_bad_amounts_are_refused_and_change_nothing(api, body, code):
    await grant(api, "frank", "1")
    r = await api.post("/admin/accounts/frank/grants", json=body, headers=H_ADMIN)
    acct = (await api.get("/admin/accounts/frank", headers=H_ADMIN)).json()
    if code is None:
        assert r.status_code == 201 and acct["available"] == "2.500000"
    else:
        assert r.status_code == 422, r.text
        assert r.json()["error"]["code"] == code and r.json()["error"]["message"]
        assert acct["available"] == "1.000000" and acct["version"] == 1


async def test_malformed_json_oversized_body_and_missing_headers(api):
    r = await api.post(
        "/admin/accounts/gina/grants",
        content=b"{not json",
        headers={**H_ADMIN, "Content-Type": "application/json"},
    )
    assert r.status_code == 422 and r.json()["error"]["code"] == "malformed_json"
    big = json.dumps({"amount": "1", "description": "x" * 200_000})
    r = await api.post(
        "/admin/accounts/gina/grants", content=big, headers={**H_ADMIN, "Content-Type": "application/json"}
    )
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"
    r = await api.post("/credits/holds", json={"amount": "1"}, headers={"Authorization": f"Bearer {CLIENT}"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "missing_user"
    r = await api.post("/credits/holds/nope/settle", json={"amount": "1"}, headers=client_headers("gina"))
    assert r.status_code == 404
    acct = (await api.get("/admin/accounts/gina", headers=H_ADMIN)).json()
    assert acct["version"] == 0


@pytest.mark.parametrize("auth", [None, "Bearer wrong-key-" + "x" * 40, f"Bearer {CLIENT}", f"Basic {ADMIN}"])
async def test_admin_routes_refuse_anything_but_an_admin_key(api, auth):
    headers = {"Authorization": auth} if auth else {}
    r = await api.post("/admin/accounts/h/grants", json={"amount": "1"}, headers=headers)
    assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
    assert (await api.get("/admin/accounts/h", headers=headers)).status_code == 401


async def test_client_routes_refuse_admin_and_forged_keys(api):
    for key in (ADMIN, "forged-" + "f" * 40):
        r = await api.get("/credits/balance", headers={"Authorization": f"Bearer {key}", "X-User-Id": "x"})
        assert r.status_code == 401


async def test_ledger_is_paginated_from_the_store(api):
    for _ in range(5):
        await grant(api, "ivy", "1")
    w = __import__("gateway.worker.runner", fromlist=["Worker"]).Worker(
        api.app.state.services.engine, api.app.state.services.store
    )
    await w.run(burst=True)
    seen, cursor = [], None
    while True:
        params = {"limit": 2, **({"cursor": cursor} if cursor else {})}
        page = (await api.get("/admin/accounts/ivy/ledger", params=params, headers=H_ADMIN)).json()
        seen += [e["version"] for e in page["entries"]]
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert seen == [5, 4, 3, 2, 1]
    first = (await api.get("/admin/accounts/ivy/ledger", headers=H_ADMIN)).json()["entries"][-1]
    assert first["type"] == "grant" and Decimal(first["amount"]) == 1


async def test_sha256_key_entries_are_accepted(redis, redis_url, tmp_path):
    import hashlib

    digest = hashlib.sha256(ADMIN.encode()).hexdigest()
    settings = Settings(redis_url=redis_url, admin_keys=f"sha256:{digest}", partitions=16, audit_path=None)
    store = SQLiteStore(str(tmp_path / "k.db"))
    app = create_app(settings, redis=redis, store=store, run_worker=False)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as c,
    ):
        assert (await c.get("/admin/accounts/k", headers=H_ADMIN)).status_code == 200
    await store.close()


def test_short_plain_keys_are_refused():
    with pytest.raises(ValueError, match="at least 32 characters"):
        Settings(admin_keys="short")
