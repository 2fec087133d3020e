"""Input parsing at the HTTP edge: numbers, ids, expiry dates, bodies, and how the
refusals read. Plus the ledger's amounts, which must read in credits like every other."""

from __future__ import annotations

import json
from decimal import Decimal

import pytest

from gateway.core.keys import check_id
from gateway.core.money import AmountError, to_units
from tests.support.api_fixtures import ADMIN, H_ADMIN, client_headers, grant


def error_of(r, status: int, code: str) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == code, err
    return err


# -- numbers --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    ["1_000", "\u0661", "\u0661\u0660", " 1 ", "+1", "1.", ".5", "0x1", "1 000", "١.5"],  # noqa: RUF001 (digits of another script, on purpose)
)
def test_to_units_reads_plain_ascii_decimals_only(text):
    with pytest.raises(AmountError):
        to_units(text)


@pytest.mark.parametrize(
    ("value", "units"),
    [
        ("1", 10**6),
        ("-0", None),
        ("0.000001", 1),
        ("1e3", 10**9),
        ("1E-6", 1),
        (Decimal("1e999999"), None),
        (Decimal("-1e999999"), None),
        (Decimal("1e-999999"), None),
        ("1e999999", None),
        (7, 7 * 10**6),
    ],
)
def test_to_units_never_overflows(value, units):
    if units is None:
        with pytest.raises(AmountError):
            to_units(value)
    else:
        assert to_units(value) == units


@pytest.mark.parametrize("ttl", [True, "60", "1_000", " 60 ", 60.0, "\u0666\u0660"])
async def test_ttl_seconds_is_a_json_integer_only(api, ttl):
    await grant(api, "n1")
    r = await api.post(
        "/credits/holds", json={"amount": "1", "ttl_seconds": ttl}, headers=client_headers("n1")
    )
    error_of(r, 422, "invalid_request")
    assert "ttl_seconds" in r.json()["error"]["message"]


@pytest.mark.parametrize("priority", [True, "5", 5.0])
async def test_priority_is_a_json_integer_only(api, priority):
    r = await api.post(
        "/admin/accounts/n2/grants", json={"amount": "1", "priority": priority}, headers=H_ADMIN
    )
    error_of(r, 422, "invalid_request")


@pytest.mark.parametrize("limit", [True, "5", 5.5, "1_000"])
async def test_rate_limit_overrides_are_json_integers_only(api, limit):
    r = await api.put("/admin/accounts/n3/limits", json={"requests_per_minute": limit}, headers=H_ADMIN)
    error_of(r, 422, "invalid_request")
    r = await api.get("/admin/accounts/n3/limits", headers=H_ADMIN)
    assert r.json()["requests_per_minute"] is None


@pytest.mark.parametrize(
    "query", ["limit=1_0", "limit=%20 5", "limit=\u0665", "cursor=\u0661\u0662", "cursor=+5"]
)
async def test_ledger_query_numbers_are_ascii_digits_only(api, query):
    r = await api.get(f"/admin/accounts/n4/ledger?{query}", headers=H_ADMIN)
    assert r.status_code == 422, r.text


async def test_json_numbers_are_exact_and_plain_integers_pass(api):
    r = await api.post("/admin/accounts/n5/grants", json={"amount": 2, "priority": 5}, headers=H_ADMIN)
    assert r.status_code == 201 and r.json()["amount"] == "2.000000"
    raw = b'{"amount": 0.1}'
    r = await api.post(
        "/admin/accounts/n5/grants", content=raw, headers={**H_ADMIN, "Content-Type": "application/json"}
    )
    assert r.status_code == 201 and r.json()["amount"] == "0.100000"


# -- ids ------------------------------------------------------------------------------------


def test_one_id_rule_without_slash_or_newline():
    for bad in ("a/b", "team/bob", "a\n", "", "a b", "x" * 129, "a|b", "{p1}"):
        with pytest.raises(ValueError, match="id must be 1-128 characters"):
            check_id("id", bad)
    assert check_id("id", "user-1@example.com:+=~_.") == "user-1@example.com:+=~_."


async def test_a_hold_id_with_a_slash_is_refused_up_front(api):
    # A hold "a/b" could be placed but never settled or released by its URL.
    await grant(api, "s1")
    r = await api.post("/credits/holds", json={"amount": "1", "hold_id": "a/b"}, headers=client_headers("s1"))
    err = error_of(r, 422, "invalid_request")
    assert "hold_id" in err["message"] and "letters, digits" in err["message"]
    assert (await api.get("/credits/balance", headers=client_headers("s1"))).json()["held"] == "0.000000"


async def test_a_user_id_with_a_slash_is_refused_on_the_client_api(api):
    r = await api.get("/credits/balance", headers=client_headers("team/bob"))
    error_of(r, 400, "invalid_user")


# -- expiry ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("when", "says"),
    [
        ("1970-01-01T00:00:00Z", "in the past"),
        ("1969-07-20T20:17:00Z", "in the past"),
        ("2001-01-01T00:00:00Z", "in the past"),
        ("9999-12-31T23:59:59Z", "latest allowed is 2248-09-26"),
        ("2300-01-01T00:00:00+05:00", "latest allowed is 2248-09-26"),
        (99999999999999, "ISO 8601"),
        (True, "ISO 8601"),
        ("2030-01-01T00:00:00", "timezone"),
        ("next tuesday", "ISO 8601"),
    ],
)
async def test_grant_expiry_out_of_range_is_refused_saying_why(api, when, says):
    r = await api.post("/admin/accounts/e1/grants", json={"amount": "1", "expires_at": when}, headers=H_ADMIN)
    err = error_of(r, 422, "invalid_expiry")
    assert says in err["message"]
    acct = (await api.get("/admin/accounts/e1", headers=H_ADMIN)).json()
    assert acct["version"] == 0 and acct["grants"] == []


async def test_a_grant_expiring_in_range_is_made(api):
    r = await api.post(
        "/admin/accounts/e2/grants",
        json={"amount": "1", "expires_at": "2248-01-01T00:00:00Z"},
        headers=H_ADMIN,
    )
    assert r.status_code == 201 and r.json()["expires_at"].startswith("2248-01-01")


# -- bodies ---------------------------------------------------------------------------------


async def test_a_chunked_body_over_the_cap_is_413(api):
    async def chunks():
        body = json.dumps({"amount": "1", "description": "x" * 200_000}).encode()
        for i in range(0, len(body), 8192):
            yield body[i : i + 8192]

    for path, headers in (("/admin/accounts/b1/grants", H_ADMIN), ("/credits/holds", client_headers("b1"))):
        r = await api.post(path, content=chunks(), headers={**headers, "Content-Type": "application/json"})
        error_of(r, 413, "body_too_large")


async def test_a_missing_body_says_a_json_body_is_required(api):
    err = error_of(await api.post("/admin/accounts/b2/grants", headers=H_ADMIN), 422, "invalid_request")
    assert err["message"] == "a JSON body is required"


async def test_malformed_json_says_it_is_not_valid_json_and_where(api):
    r = await api.post(
        "/admin/accounts/b3/grants",
        content=b'{"amount": "1",\n "x": }',
        headers={**H_ADMIN, "Content-Type": "application/json"},
    )
    err = error_of(r, 422, "malformed_json")
    assert err["message"].startswith("the body is not valid JSON: Expecting value at line 2, column")
    for raw in (b"\xff\xfe{}", b"[" * 30_000 + b"]" * 30_000, b'{"amount": NaN}'):
        r = await api.post(
            "/admin/accounts/b3/grants", content=raw, headers={**H_ADMIN, "Content-Type": "application/json"}
        )
        error_of(r, 422, "malformed_json")


async def test_a_json_body_without_content_type_is_read(api):
    r = await api.post("/admin/accounts/b4/grants", content=b'{"amount": "2"}', headers=H_ADMIN)
    assert r.status_code == 201, r.text
    r = await api.post("/credits/holds", content=b'{"amount": "1"}', headers=client_headers("b4"))
    assert r.status_code == 201, r.text


async def test_another_content_type_is_named_in_the_refusal(api):
    r = await api.post(
        "/admin/accounts/b5/grants",
        content=b'{"amount": "2"}',
        headers={**H_ADMIN, "Content-Type": "text/plain"},
    )
    err = error_of(r, 422, "invalid_request")
    assert "Content-Type: application/json" in err["message"]
    r = await api.post("/admin/accounts/b5/grants", json=["not", "an", "object"], headers=H_ADMIN)
    assert error_of(r, 422, "invalid_request")["message"] == "the body must be a JSON object"


# -- the ledger reads in credits ------------------------------------------------------------


async def test_ledger_details_are_credits_not_micro_units(api):
    from gateway.worker.runner import Worker

    await grant(api, "l1", "1")
    hdr = client_headers("l1")
    assert (
        await api.post("/credits/holds", json={"amount": "3", "hold_id": "h"}, headers=hdr)
    ).status_code == 402
    await grant(api, "l1", "9")
    assert (
        await api.post("/credits/holds", json={"amount": "3", "hold_id": "h"}, headers=hdr)
    ).status_code == 201
    assert (await api.post("/credits/holds/h/settle", json={"amount": "1"}, headers=hdr)).status_code == 200
    assert (
        await api.post("/credits/holds", json={"amount": "12", "hold_id": "h2"}, headers=hdr)
    ).status_code == 402
    await api.post("/credits/holds", json={"amount": "9", "hold_id": "h2"}, headers=hdr)
    await api.post("/credits/holds/h2/settle", json={"amount": "10.5"}, headers=hdr)  # 1.5 becomes debt
    await grant(api, "l1", "2")  # repays it
    services = api.app.state.services
    await Worker(services.engine, services.store).run(burst=True)
    entries = (await api.get("/admin/accounts/l1/ledger", headers=H_ADMIN)).json()["entries"]
    by = {(e["type"], e["hold_id"]): e["details"] for e in entries}
    settled = by[("hold_settled", "h")]
    assert settled["returned"] == "2.000000" and settled["held_amt"] == "3.000000"
    assert settled["lapsed"] == "0.000000" and settled["debt_added"] == "0.000000"
    assert settled["h"]["amt"] == "3.000000" and settled["h"]["fin"] == "1.000000"
    assert settled["h"]["st"] == "settled" and isinstance(settled["h"]["exp"], str)  # a time, left alone
    opened = by[("hold_open", "h")]
    assert sorted(opened["h"]["ear"].values()) == ["1.000000", "2.000000"]  # per grant drawn from
    assert by[("hold_settled", "h2")]["debt_added"] == "1.500000"
    repaid = [e for e in entries if e["type"] == "grant" and e["details"]["debt_repaid"] != "0.000000"]
    assert repaid and repaid[0]["details"]["debt_repaid"] == "1.500000"
    assert repaid[0]["details"]["seq"].isdigit()  # not an amount: left alone


@pytest.mark.parametrize("hold_id", [".", "..", ".hidden"])
async def test_ids_cannot_start_with_a_dot_which_clients_normalise_away_in_paths(hold_id):
    from gateway.core.keys import InvalidId, check_id

    with pytest.raises(InvalidId):
        check_id("hold_id", hold_id)
    assert check_id("hold_id", "a.b..c") == "a.b..c"


async def test_two_idempotency_keys_are_refused(api):
    headers = [("Authorization", f"Bearer {ADMIN}"), ("Idempotency-Key", "k1"), ("Idempotency-Key", "k2")]
    r = await api.post("/admin/accounts/two/grants", json={"amount": "1"}, headers=headers)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_idempotency_key"
