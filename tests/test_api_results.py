"""Every named result of the holds / grants / debits API, over HTTP: status and body code.

Before, a script result carrying details with a `status` key (already_settled,
already_released, hold_expired) crashed the error handler into a plain-text 500.
"""

from __future__ import annotations

import httpx
import pytest
import pytest_asyncio

from gateway.core.errors import HoldNotFound
from tests.conftest import ManualClock
from tests.support.api_fixtures import H_ADMIN, api_client, client_headers


@pytest_asyncio.fixture
async def gw(redis, redis_url, tmp_path):
    """The gateway on a manual clock (holds expire when the test says so)."""
    async with api_client(redis, redis_url, tmp_path, clock=ManualClock()) as c:
        yield c


def refused(r: httpx.Response, status: int, code: str) -> dict:
    """The answer is the JSON error shape with this status and code; returns the error."""
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    err = r.json()["error"]
    assert err["code"] == code, err
    assert err["message"]
    return err


async def grant(gw, user: str, amount: str = "10") -> None:
    r = await gw.post(f"/admin/accounts/{user}/grants", json={"amount": amount}, headers=H_ADMIN)
    assert r.status_code == 201, r.text


async def hold(gw, user: str, hold_id: str, amount: str = "1", ttl: int = 60) -> httpx.Response:
    return await gw.post(
        "/credits/holds",
        json={"amount": amount, "hold_id": hold_id, "ttl_seconds": ttl},
        headers=client_headers(user),
    )


async def settle(gw, user: str, hold_id: str, amount: str = "1") -> httpx.Response:
    return await gw.post(
        f"/credits/holds/{hold_id}/settle", json={"amount": amount}, headers=client_headers(user)
    )


async def release(gw, user: str, hold_id: str) -> httpx.Response:
    return await gw.post(f"/credits/holds/{hold_id}/release", headers=client_headers(user))


async def test_settling_a_released_hold_is_409_already_released(gw):
    await grant(gw, "u1")
    assert (await hold(gw, "u1", "h")).status_code == 201
    assert (await release(gw, "u1", "h")).status_code == 200
    err = refused(await settle(gw, "u1", "h"), 409, "already_released")
    assert err["hold_status"] == "released"


async def test_releasing_a_settled_hold_is_409_already_settled(gw):
    await grant(gw, "u2")
    await hold(gw, "u2", "h")
    assert (await settle(gw, "u2", "h", "0.5")).status_code == 200
    err = refused(await release(gw, "u2", "h"), 409, "already_settled")
    assert err["hold_status"] == "settled"


@pytest.mark.parametrize("late", ["settle", "release"])
async def test_settling_or_releasing_an_expired_hold_is_409_hold_expired(gw, late):
    await grant(gw, "u3", "5")
    await hold(gw, "u3", "h", "2", ttl=10)
    gw.clock.advance(11)
    first = await (settle(gw, "u3", "h") if late == "settle" else release(gw, "u3", "h"))
    refused(first, 409, "hold_expired")  # past its timeout, not swept yet: expired now
    again = await (settle(gw, "u3", "h") if late == "settle" else release(gw, "u3", "h"))
    err = refused(again, 409, "hold_expired")  # and once it is expired
    assert err["hold_status"] == "expired"
    bal = (await gw.get("/credits/balance", headers=client_headers("u3"))).json()
    assert bal["available"] == "5.000000" and bal["held"] == "0.000000"


async def test_insufficient_credits_is_402_with_what_is_available(gw):
    await grant(gw, "u4", "1")
    err = refused(await hold(gw, "u4", "h", "2"), 402, "insufficient_credits")
    assert err["available"] == "1.000000"
    refused(
        await gw.post("/admin/accounts/u4/debits", json={"amount": "2"}, headers=H_ADMIN),
        402,
        "insufficient_credits",
    )


async def test_an_account_in_debt_cannot_reserve_402_in_debt(gw):
    await grant(gw, "u5", "1")
    await hold(gw, "u5", "h", "1")
    r = await settle(gw, "u5", "h", "3")  # 2 above the hold and no free credit: debt
    assert r.status_code == 200 and r.json()["debt_added"] == "2.000000"
    err = refused(await hold(gw, "u5", "h2", "0.1"), 402, "in_debt")
    assert err["debt"] == "2.000000"


async def test_unknown_and_foreign_holds_are_404_hold_not_found(gw):
    await grant(gw, "owner")
    await hold(gw, "owner", "mine")
    for r in (
        await settle(gw, "owner", "nope"),
        await release(gw, "owner", "nope"),
        await settle(gw, "thief", "mine"),
        await release(gw, "thief", "mine"),
    ):
        refused(r, 404, "hold_not_found")
        assert "owner" not in r.text


async def test_a_hold_id_taken_by_another_operation_is_409_hold_exists(gw):
    # A give-back of a reserve whose answer was lost leaves a void marker under the hold id
    # (so the lost reserve, should it still arrive, does nothing): the id is taken.
    await grant(gw, "u6")
    engine = gw.app.state.services.engine
    with pytest.raises(HoldNotFound):
        await engine.release("u6", "h", void_if_unknown=True)
    refused(await hold(gw, "u6", "h"), 409, "hold_exists")


async def test_the_same_id_with_other_fields_is_422_op_conflict(gw):
    await grant(gw, "u7")
    await hold(gw, "u7", "h", "1")
    refused(await hold(gw, "u7", "h", "2"), 422, "op_conflict")
    await settle(gw, "u7", "h", "0.5")
    refused(await settle(gw, "u7", "h", "0.6"), 422, "op_conflict")
    h = {**H_ADMIN, "Idempotency-Key": "k1"}
    assert (await gw.post("/admin/accounts/u7/debits", json={"amount": "1"}, headers=h)).status_code == 201
    refused(await gw.post("/admin/accounts/u7/debits", json={"amount": "2"}, headers=h), 422, "op_conflict")


@pytest.mark.parametrize(
    "amount",
    [
        "1e999999",
        "-1e1000000",
        "1e999999999",
        "1_000",
        "\u0661",
        " 1 ",
        "+1",
        "1.0000001",
        "0x10",
        "NaN",
        "Infinity",
        True,
        1e-7,
    ],
)
async def test_bad_amounts_are_422_invalid_amount_on_every_route(gw, amount):
    await grant(gw, "u8")
    await hold(gw, "u8", "open")
    routes = [
        ("/credits/holds", {"amount": amount, "hold_id": "h"}, client_headers("u8")),
        ("/credits/holds/open/settle", {"amount": amount}, client_headers("u8")),
        ("/admin/accounts/u8/grants", {"amount": amount}, H_ADMIN),
        ("/admin/accounts/u8/debits", {"amount": amount}, H_ADMIN),
    ]
    for path, body, headers in routes:
        refused(await gw.post(path, json=body, headers=headers), 422, "invalid_amount")
    acct = (await gw.get("/admin/accounts/u8", headers=H_ADMIN)).json()
    assert acct["available"] == "9.000000" and acct["version"] == 2


@pytest.mark.parametrize(
    "raw",
    [
        b'{"amount": 1e999999}',
        b'{"amount": -1e1000000}',
        b'{"amount": 1e99999999999999999999}',
        b'{"amount": 1' + b"0" * 5000 + b"}",
        b'{"amount": NaN}',
    ],
)
async def test_huge_json_numbers_are_refused_not_a_500(gw, raw):
    r = await gw.post(
        "/admin/accounts/u9/grants", content=raw, headers={**H_ADMIN, "Content-Type": "application/json"}
    )
    assert r.status_code in (400, 422), r.text
    assert r.json()["error"]["code"] in ("invalid_amount", "malformed_json")


async def test_state_lost_is_503_with_retry_after(gw):
    await grant(gw, "u10")
    engine = gw.app.state.services.engine
    await gw.redis.delete(engine.keys.partition(engine.keys.partition_of("u10")).ready)
    r = await hold(gw, "u10", "h")
    refused(r, 503, "state_lost")
    assert r.headers["Retry-After"] == "1"


async def test_not_ready_is_503_with_retry_after(gw):
    gw.app.state.services.ready = False
    try:
        r = await gw.get("/credits/balance", headers=client_headers("u11"))
    finally:
        gw.app.state.services.ready = True
    refused(r, 503, "not_ready")
    assert r.headers["Retry-After"] == "1"


@pytest.mark.parametrize("price", ["1e999999", "-1e1000000", "1_000", True, "\u0661"])
async def test_bad_prices_are_422_invalid_amount_and_leave_the_table(redis, redis_url, tmp_path, price):
    import aiohttp

    from tests.support.proxy_fixtures import ADMIN as PROXY_ADMIN
    from tests.support.proxy_fixtures import running_gateway

    async with running_gateway(redis_url, tmp_path) as g, aiohttp.ClientSession() as s:
        before = g.app.state.services.pricing.table
        for table in (
            {"models": {"m": {"input": price, "output": "1"}}},
            {"models": {}, "default": {"input": "1", "output": "1", "request": price}},
        ):
            async with s.put(
                g.base + "/admin/pricing", json=table, headers={"Authorization": f"Bearer {PROXY_ADMIN}"}
            ) as r:
                assert r.status == 422, await r.text()
                assert (await r.json())["error"]["code"] == "invalid_amount"
        assert g.app.state.services.pricing.table is before


def test_a_pricing_table_with_an_out_of_range_price_is_a_value_error():
    from gateway.core.pricing import PricingTable

    for bad, why in (("1e999999", "above the limit"), ("-1e1000000", "must not be negative")):
        with pytest.raises(ValueError, match=f"models.m.input: amount {why}"):
            PricingTable.from_json({"models": {"m": {"input": bad, "output": "1"}}})


async def test_a_release_that_repays_debt_says_so(gw):
    await grant(gw, "u20", "3")
    await hold(gw, "u20", "a", "1")
    await hold(gw, "u20", "b", "1")
    r = await settle(gw, "u20", "a", "4")  # 1 held + 1 free, the rest (2) is debt
    assert r.json()["debt_added"] == "2.000000" and r.json()["debt"] == "2.000000"
    r = await release(gw, "u20", "b")  # the credit it returns repays the debt first
    assert r.status_code == 200
    assert (r.json()["debt_repaid"], r.json()["debt"], r.json()["available"]) == (
        "1.000000",
        "1.000000",
        "0.000000",
    )
