"""credit-management 0.7.1's REST calls (gateway/api/routes/compat.py), on a real redis-server,
SQLite and MongoDB, and the fake Razorpay: its paths and bodies answer its shapes, behind this gateway's
keys; the paths shared with the gateway's own keep answering both forms."""

from __future__ import annotations

import asyncio
from decimal import Decimal

import pytest_asyncio

from tests.support.api_fixtures import H_ADMIN, client_headers
from tests.test_payments import fakes, gateway, gateway_settings, rz_deliver, store  # noqa: F401 (fixtures)


@pytest_asyncio.fixture
async def gw(redis, redis_url, fakes, store):  # noqa: F811
    """The gateway on each store backend (SQLite, the MongoDB wire server)."""
    async with gateway(gateway_settings(redis_url, fakes), redis, store) as c:
        c.fakes, c.store = fakes, store
        yield c


async def add(gw, user, amount, **headers):
    return await gw.post(
        "/admin/credits/add", json={"user_id": user, "amount": amount}, headers={**H_ADMIN, **headers}
    )


# -- balances, add and deduct -------------------------------------------------------------------


async def test_add_and_deduct_answer_the_old_shape_read_amounts_exactly_and_refuse_short(gw):
    r = await gw.post(
        "/admin/credits/add",
        content=b'{"user_id": "ana", "amount": 10.1, "description": "welcome"}',
        headers={**H_ADMIN, "Content-Type": "application/json"},
    )
    assert r.status_code == 200, r.text
    assert (r.json()["user_id"], r.json()["credits"]) == ("ana", "10.100000")
    r = await gw.post("/admin/credits/deduct", json={"user_id": "ana", "amount": "0.1"}, headers=H_ADMIN)
    assert (r.status_code, r.json()["credits"]) == (200, "10.000000")
    short = await gw.post("/admin/credits/deduct", json={"user_id": "ana", "amount": 11}, headers=H_ADMIN)
    assert (short.status_code, short.json()["error"]["code"]) == (400, "insufficient_credits")
    assert short.json()["error"]["available"] == "10.000000"
    # A float never gets in: a JSON number is a Decimal; a bad amount is a clear 422.
    bad = await gw.post("/admin/credits/add", json={"user_id": "ana", "amount": "1e-9"}, headers=H_ADMIN)
    assert (bad.status_code, bad.json()["error"]["code"]) == (422, "invalid_amount")


async def test_concurrent_deducts_lose_no_update_and_never_overdraw(gw):
    await add(gw, "max", "10")
    answers = await asyncio.gather(
        *(
            gw.post("/admin/credits/deduct", json={"user_id": "max", "amount": "1"}, headers=H_ADMIN)
            for _ in range(25)
        )
    )
    assert sorted(r.status_code for r in answers) == [200] * 10 + [400] * 15
    assert {r.json()["credits"] for r in answers if r.status_code == 200} == {
        f"{n}.000000" for n in range(10)
    }
    assert (await gw.get("/credits/balance/max", headers=H_ADMIN)).json()["credits"] == "0.000000"


async def test_an_idempotency_key_makes_a_retried_add_apply_once(gw):
    first = await add(gw, "bo", "5", **{"Idempotency-Key": "topup-1"})
    again = await add(gw, "bo", "5", **{"Idempotency-Key": "topup-1"})
    assert (first.json()["credits"], again.json()["credits"]) == ("5.000000", "5.000000")
    assert again.json()["replayed"] is True and again.headers["Idempotent-Replayed"] == "true"
    other = await add(gw, "bo", "6", **{"Idempotency-Key": "topup-1"})
    assert (other.status_code, other.json()["error"]["code"]) == (422, "op_conflict")
    assert (await add(gw, "bo", "5")).json()["credits"] == "10.000000"  # no key: adds again


async def test_admin_paths_need_the_admin_key(gw):
    for method, path in (
        ("POST", "/admin/credits/add"),
        ("POST", "/admin/credits/deduct"),
        ("POST", "/admin/credits/plans"),
        ("POST", "/admin/credits/promos"),
        ("GET", "/admin/credits/promos"),
        ("POST", "/admin/credits/promos/X/toggle"),
    ):
        r = await gw.request(method, path, json={}, headers=client_headers("ana"))
        assert (r.status_code, r.json()["error"]["code"]) == (401, "unauthorized"), path


async def test_a_balance_by_path_answers_its_own_user_or_an_admin_only(gw):
    await add(gw, "cy", "2.5")
    own = await gw.get("/credits/balance/cy", headers=client_headers("cy"))
    assert own.status_code == 200, own.text
    assert (own.json()["user_id"], own.json()["credits"], own.json()["held"]) == (
        "cy",
        "2.500000",
        "0.000000",
    )
    other = await gw.get("/credits/balance/cy", headers=client_headers("eve"))
    assert (other.status_code, other.json()["error"]["code"]) == (403, "forbidden")
    admin = await gw.get("/credits/balance/cy", headers=H_ADMIN)
    assert admin.json()["credits"] == "2.500000"
    nobody = await gw.get("/credits/balance/cy")
    assert nobody.status_code == 401
    # The user's own key reads its own balance without X-User-Id.
    k = await gw.post("/admin/accounts/cy/keys", json={}, headers=H_ADMIN)
    mine = await gw.get("/credits/balance/cy", headers={"Authorization": f"Bearer {k.json()['key']}"})
    assert mine.json()["credits"] == "2.500000"
    # The gateway's own /credits/balance still answers as before.
    plain = await gw.get("/credits/balance", headers=client_headers("cy"))
    assert plain.json()["available"] == "2.500000" and "credits" not in plain.json()


# -- payments ------------------------------------------------------------------------------------


async def test_a_payment_created_the_old_way_is_paid_by_a_signed_webhook_and_listed(gw):
    r = await gw.post(
        "/credits/payments/create",
        json={"amount_inr": 499.5, "customer_email": "a@example.com"},
        headers=client_headers("dee"),
    )
    assert r.status_code == 200, r.text
    p = r.json()
    assert (p["provider"], p["amount_inr"], p["credits_to_add"], p["status"]) == (
        "razorpay",
        "499.50",
        "499.5",
        "created",
    )
    assert p["payment_url"].startswith(gw.fakes.urls["razorpay"]) and p["payment_id"] == p["id"]
    for event in gw.fakes.razorpay.pay(p["provider_payment_link_id"]).values():
        assert (await rz_deliver(gw, event)).status_code == 200
    one = (await gw.get(f"/credits/payments/{p['id']}", headers=client_headers("dee"))).json()
    assert (one["status"], one["credits_added"], one["credits"]) == ("paid", "499.5", "499.5")
    assert one["completed_at"] and one["provider_payment_id"].startswith("pay_")
    bal = await gw.get("/credits/balance/dee", headers=client_headers("dee"))
    assert Decimal(bal.json()["credits"]) == Decimal("499.5")
    hist = (await gw.get("/credits/payments/history", headers=client_headers("dee"))).json()
    assert hist["total"] == 1 and [x["id"] for x in hist["payments"]] == [p["id"]]
    assert (await gw.get("/credits/payments/history", headers=client_headers("eve"))).json() == {
        "payments": [],
        "total": 0,
    }
    assert (await gw.get(f"/credits/payments/{p['id']}", headers=client_headers("eve"))).status_code == 404


async def test_history_pages_with_limit_and_skip(gw):
    ids = []
    for n in range(5):
        r = await gw.post(
            "/credits/payments/create", json={"amount_inr": 10 + n}, headers=client_headers("ed")
        )
        ids.append(r.json()["id"])
    newest_first = ids[::-1]
    page = (
        await gw.get(
            "/credits/payments/history", params={"limit": 2, "skip": 1}, headers=client_headers("ed")
        )
    ).json()
    assert page["total"] == 5 and [x["id"] for x in page["payments"]] == newest_first[1:3]
    tail = (
        await gw.get(
            "/credits/payments/history", params={"limit": 9, "skip": 4}, headers=client_headers("ed")
        )
    ).json()
    assert [x["id"] for x in tail["payments"]] == newest_first[4:]


async def test_an_unknown_provider_is_a_400(gw):
    r = await gw.post(
        "/credits/payments/create",
        json={"amount_inr": "100", "provider": "paypal"},
        headers=client_headers("fi"),
    )
    assert (r.status_code, r.json()["error"]["code"]) == (400, "unknown_provider")
    unsigned = await gw.post("/webhooks/razorpay", json={"event": "payment.captured"})
    assert unsigned.status_code == 401  # webhooks are signed or refused
    other = await gw.post("/webhooks/paypal", content=b"{}")
    assert (other.status_code, other.json()["error"]["code"]) == (404, "not_found")


# -- promos ------------------------------------------------------------------------------------


async def test_promos_the_old_way_defined_listed_toggled_checked_and_claimed(gw):
    r = await gw.post(
        "/admin/credits/promos",
        json={
            "code": "launch",
            "credits": 25,
            "description": "Launch week",
            "target_type": "all",
            "target_user_ids": [],
            "max_uses": 10,
            "is_active": True,
        },
        headers=H_ADMIN,
    )
    assert r.status_code == 201, r.text
    p = r.json()
    assert (p["id"], p["code"], p["credits"], p["target_type"], p["max_uses_per_user"]) == (
        "LAUNCH",
        "LAUNCH",
        "25",
        "all",
        1,
    )
    elig = await gw.get(
        "/credits/promo/eligibility", params={"promo_code": "launch"}, headers=client_headers("gu")
    )
    e = elig.json()
    assert (e["eligible"], e["promo_code"], e["credits"], e["description"], e["reason"]) == (
        True,
        "LAUNCH",
        "25",
        "Launch week",
        None,
    )
    claim = await gw.post(
        "/credits/promo/claim", json={"promo_code": "launch", "user_id": "gu"}, headers=client_headers("gu")
    )
    c = claim.json()
    assert (c["success"], c["credits_awarded"], c["promo_code"], c["claim"]) == (True, "25", "LAUNCH", 1)
    again = await gw.post("/credits/promo/claim", json={"promo_code": "LAUNCH"}, headers=client_headers("gu"))
    assert (again.status_code, again.json()["error"]["code"]) == (409, "already_claimed")
    for_other = await gw.post(
        "/credits/promo/claim", json={"promo_code": "LAUNCH", "user_id": "eve"}, headers=client_headers("gu")
    )
    assert for_other.status_code == 403
    # The gateway's own form answers as before.
    own = await gw.get("/credits/promo/eligibility", params={"code": "launch"}, headers=client_headers("gu"))
    assert own.json() == {"eligible": False, "code": "LAUNCH", "credits": "25", "reason": "already_claimed"}
    listed = (await gw.get("/admin/credits/promos", headers=H_ADMIN)).json()
    assert [(x["code"], x["total_claims"], x["is_active"]) for x in listed] == [("LAUNCH", 1, True)]
    off = await gw.post("/admin/credits/promos/launch/toggle", headers=H_ADMIN)
    assert off.json() == {"id": "LAUNCH", "code": "LAUNCH", "is_active": False}
    assert (await gw.get("/admin/credits/promos", headers=H_ADMIN)).json() == []
    every = (await gw.get("/admin/credits/promos", params={"active_only": "false"}, headers=H_ADMIN)).json()
    assert [x["is_active"] for x in every] == [False]


async def test_a_promo_for_listed_users_only(gw):
    r = await gw.post(
        "/admin/credits/promos",
        json={"code": "VIP", "credits": "5", "target_type": "specific_users", "target_user_ids": ["hal"]},
        headers=H_ADMIN,
    )
    assert r.status_code == 201 and r.json()["target_user_ids"] == ["hal"]
    no = await gw.post("/credits/promo/claim", json={"promo_code": "VIP"}, headers=client_headers("ivy"))
    assert (no.status_code, no.json()["error"]["code"]) == (403, "not_targeted")
    yes = await gw.post("/credits/promo/claim", json={"promo_code": "VIP"}, headers=client_headers("hal"))
    assert yes.json()["credits_awarded"] == "5"
    bad = await gw.post(
        "/admin/credits/promos", json={"code": "X", "credits": "1", "target_type": "friends"}, headers=H_ADMIN
    )
    assert bad.status_code == 400 and "target_type" in bad.json()["error"]["message"]


# -- plans -------------------------------------------------------------------------------------


async def test_plans_map_credit_limit_and_a_billing_period_of_any_case(gw):
    r = await gw.post(
        "/admin/credits/plans",
        json={"name": "Pro", "credit_limit": 1000, "price": "499", "billing_period": "MONTHLY"},
        headers=H_ADMIN,
    )
    assert r.status_code == 201, r.text
    p = r.json()
    assert (p["credit_limit"], p["price"], p["currency"], p["billing_period"], p["validity_days"]) == (
        "1000",
        "499.00",
        "INR",
        "monthly",
        30,
    )
    assert (await gw.get(f"/admin/plans/{p['id']}", headers=H_ADMIN)).json()["period"] == "monthly"
    yearly = await gw.post(
        "/admin/credits/plans",
        json={"name": "Y", "credit_limit": "5", "price": 0, "billing_period": "yearly", "validity_days": 365},
        headers=H_ADMIN,
    )
    assert yearly.status_code == 201 and yearly.json()["free"] is True
    odd = await gw.post(
        "/admin/credits/plans",
        json={
            "name": "Odd",
            "credit_limit": "5",
            "price": 0,
            "billing_period": "monthly",
            "validity_days": 45,
        },
        headers=H_ADMIN,
    )
    assert odd.status_code == 400 and "validity_days" in odd.json()["error"]["message"]
    weird = await gw.post(
        "/admin/credits/plans",
        json={"name": "W", "credit_limit": "5", "billing_period": "fortnightly"},
        headers=H_ADMIN,
    )
    assert weird.status_code == 400 and "billing_period" in weird.json()["error"]["message"]
