"""A user's own API key (cgk_..., POST /admin/accounts/{user}/keys) works on the client
API as on the proxy: it names its user, reads that user's balance and holds, and is
refused (403) when X-User-Id names someone else."""

from __future__ import annotations

from tests.support.api_fixtures import ADMIN, CLIENT, H_ADMIN, client_headers, grant


async def issue(api, user: str) -> str:
    r = await api.post(f"/admin/accounts/{user}/keys", json={"name": "app"}, headers=H_ADMIN)
    assert r.status_code == 201, r.text
    return r.json()["key"]


def bearer(key: str, **extra) -> dict:
    return {"Authorization": f"Bearer {key}", **extra}


async def test_a_user_key_reads_its_own_balance_with_or_without_x_user_id(api):
    await grant(api, "kate", "5")
    key = await issue(api, "kate")
    for headers in (bearer(key), bearer(key, **{"X-User-Id": "kate"}), {"x-api-key": key}):
        r = await api.get("/credits/balance", headers=headers)
        assert r.status_code == 200, r.text
        assert r.json()["user_id"] == "kate" and r.json()["available"] == "5.000000"


async def test_a_user_key_naming_another_user_is_403(api):
    await grant(api, "lena", "5")
    key = await issue(api, "lena")
    for path, body in (("/credits/balance", None), ("/credits/holds", {"amount": "1"})):
        r = await api.request(
            "GET" if body is None else "POST",
            path,
            json=body,
            headers=bearer(key, **{"X-User-Id": "mallory"}),
        )
        assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden"
    assert (await api.get("/credits/balance", headers=client_headers("lena"))).json()["held"] == "0.000000"


async def test_a_user_key_places_settles_and_releases_its_users_holds(api):
    await grant(api, "mia", "5")
    key = await issue(api, "mia")
    assert (
        await api.post("/credits/holds", json={"amount": "2", "hold_id": "a"}, headers=bearer(key))
    ).status_code == 201
    assert (
        await api.post("/credits/holds", json={"amount": "1", "hold_id": "b"}, headers=bearer(key))
    ).status_code == 201
    r = await api.post("/credits/holds/a/settle", json={"amount": "1.5"}, headers=bearer(key))
    assert r.status_code == 200 and r.json()["charged"] == "1.500000"
    assert (await api.post("/credits/holds/b/release", headers=bearer(key))).json()["status"] == "released"
    # The same holds, seen through the client key: they are mia's.
    b = (await api.get("/credits/balance", headers=client_headers("mia"))).json()
    assert b["available"] == "3.500000" and b["held"] == "0.000000"


async def test_revoked_unknown_and_admin_keys_are_401_and_client_keys_still_need_x_user_id(api):
    key = await issue(api, "nora")
    kid = (await api.get("/admin/accounts/nora/keys", headers=H_ADMIN)).json()["keys"][0]["key_id"]
    assert (await api.delete(f"/admin/accounts/nora/keys/{kid}", headers=H_ADMIN)).status_code == 200
    for headers in (bearer(key), bearer("cgk_" + "x" * 43), bearer(ADMIN, **{"X-User-Id": "nora"})):
        r = await api.get("/credits/balance", headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
        assert r.headers["WWW-Authenticate"] == "Bearer"
    r = await api.get("/credits/balance", headers=bearer(CLIENT))
    assert r.status_code == 400 and r.json()["error"]["code"] == "missing_user"
    r = await api.get("/credits/balance", headers=client_headers("a b"))
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_user"
