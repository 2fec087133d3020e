"""A client that saw an error retries with the same ids, and the retries converge: the
operation is applied once, and the retry answers it (`replayed`). Holds, settles and
releases are idempotent by the hold id; grants and debits by their Idempotency-Key.

An answer lost on the way back (Redis died after applying, the connection dropped) is
simulated by a transport that runs the request through the app and then fails it."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from tests.support.api_fixtures import H_ADMIN, client_headers, grant


class LosesAnswers(httpx.AsyncBaseTransport):
    """Delivers every request; throws away the answers of the first `lose` of them."""

    def __init__(self, inner: httpx.AsyncBaseTransport, lose: int) -> None:
        self.inner, self.lose = inner, lose

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self.inner.handle_async_request(request)
        await response.aread()
        if self.lose > 0:
            self.lose -= 1
            raise httpx.ReadError("connection lost before the answer arrived", request=request)
        return response


async def with_retries(client: httpx.AsyncClient, method: str, path: str, **kw) -> httpx.Response:
    for _ in range(5):
        try:
            return await client.request(method, path, **kw)
        except httpx.TransportError:
            continue
    raise AssertionError("no answer after 5 tries")


def lossy(api, lose: int = 1) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=LosesAnswers(httpx.ASGITransport(app=api.app), lose), base_url="http://gw"
    )


async def account(api, user):
    return (await api.get(f"/admin/accounts/{user}", headers=H_ADMIN)).json()


async def test_a_reserve_whose_answer_was_lost_is_retried_into_the_same_one_hold(api):
    await grant(api, "r1", "10")
    async with lossy(api, lose=2) as c:
        r = await with_retries(
            c,
            "POST",
            "/credits/holds",
            json={"amount": "3", "hold_id": "job-1", "ttl_seconds": 60},
            headers=client_headers("r1"),
        )
    assert r.status_code == 201 and r.json()["replayed"] is True
    assert r.headers["Idempotent-Replayed"] == "true"
    assert r.json()["hold_id"] == "job-1" and r.json()["available"] == "7.000000"
    acct = await account(api, "r1")
    assert [h["hold_id"] for h in acct["holds"]] == ["job-1"] and acct["held"] == "3.000000"


async def test_concurrent_retries_of_one_hold_id_make_exactly_one_hold(api):
    await grant(api, "r2", "10")
    body = {"amount": "2", "hold_id": "job-2", "ttl_seconds": 60}
    answers = await asyncio.gather(
        *[api.post("/credits/holds", json=body, headers=client_headers("r2")) for _ in range(20)]
    )
    assert {r.status_code for r in answers} == {201}
    assert sum(not r.json()["replayed"] for r in answers) == 1
    acct = await account(api, "r2")
    assert len(acct["holds"]) == 1 and acct["held"] == "2.000000" and acct["available"] == "8.000000"


async def test_a_settle_or_release_whose_answer_was_lost_is_applied_once(api):
    await grant(api, "r3", "10")
    for h in ("s", "r"):
        assert (
            await api.post("/credits/holds", json={"amount": "4", "hold_id": h}, headers=client_headers("r3"))
        ).status_code == 201
    async with lossy(api) as c:
        s = await with_retries(
            c, "POST", "/credits/holds/s/settle", json={"amount": "1.5"}, headers=client_headers("r3")
        )
    async with lossy(api) as c:
        r = await with_retries(c, "POST", "/credits/holds/r/release", headers=client_headers("r3"))
    assert s.status_code == 200 and s.json()["replayed"] is True and s.json()["charged"] == "1.500000"
    assert r.status_code == 200 and r.json()["replayed"] is True and r.json()["status"] == "released"
    acct = await account(api, "r3")
    assert acct["spent"] == "1.500000" and acct["available"] == "8.500000" and acct["holds"] == []
    # Concurrent retries of a settle: one charge.
    assert (
        await api.post("/credits/holds", json={"amount": "2", "hold_id": "c"}, headers=client_headers("r3"))
    ).status_code == 201
    many = await asyncio.gather(
        *[
            api.post("/credits/holds/c/settle", json={"amount": "2"}, headers=client_headers("r3"))
            for _ in range(10)
        ]
    )
    assert {r.status_code for r in many} == {200} and sum(not r.json()["replayed"] for r in many) == 1
    assert (await account(api, "r3"))["spent"] == "3.500000"


@pytest.mark.parametrize("kind", ["grants", "debits"])
async def test_a_grant_or_debit_retried_with_its_idempotency_key_is_applied_once(api, kind):
    await grant(api, "r4", "10")
    headers = {**H_ADMIN, "Idempotency-Key": f"{kind}-7"}
    async with lossy(api) as c:
        r = await with_retries(c, "POST", f"/admin/accounts/r4/{kind}", json={"amount": "2"}, headers=headers)
    assert r.status_code == 201 and r.json()["replayed"] is True
    many = await asyncio.gather(
        *[api.post(f"/admin/accounts/r4/{kind}", json={"amount": "2"}, headers=headers) for _ in range(10)]
    )
    assert {x.status_code for x in many} == {201} and all(x.json()["replayed"] for x in many)
    want = "12.000000" if kind == "grants" else "8.000000"
    assert (await account(api, "r4"))["available"] == want
