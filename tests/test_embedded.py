"""Embedded mode: no Redis configured, one process runs the gateway and the worker on
fakeredis and SQLite. (fakeredis is the embedded engine here, not a stand-in for Redis.)"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import stat
import subprocess
import sys
import time

import httpx
import pytest

from gateway.api.app import create_app
from gateway.core.settings import Settings
from gateway.embedded_keys import KeysFileError, ensure_keys
from tests.support.serve_process import clean_env, serve

ADMIN = "admin-" + "e" * 40
CLIENT = "client-" + "e" * 40


async def wait_for(predicate, within=10.0):
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if await predicate():
            return True
        await asyncio.sleep(0.05)
    return False


async def test_embedded_app_persists_through_its_in_process_worker_and_survives_restart(tmp_path):
    settings = Settings(
        admin_keys=ADMIN,
        client_keys=CLIENT,
        sqlite_path=str(tmp_path / "e.db"),
        audit_path=str(tmp_path / "a.jsonl"),
        sweep_interval_seconds=0.2,
    )
    assert settings.embedded
    admin = {"Authorization": f"Bearer {ADMIN}"}
    user = {"Authorization": f"Bearer {CLIENT}", "X-User-Id": "emb"}
    app = create_app(settings)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as c,
    ):
        assert (
            await c.post("/admin/accounts/emb/grants", json={"amount": "5"}, headers=admin)
        ).status_code == 201
        assert (
            await c.post("/credits/holds", json={"amount": "2", "hold_id": "h1"}, headers=user)
        ).status_code == 201

        async def ledger_has_two():
            r = await c.get("/admin/accounts/emb/ledger", headers=admin)
            return len(r.json()["entries"]) == 2

        assert await wait_for(ledger_has_two)
        # the in-process worker's metrics are answered with the gateway's
        text = (await c.get("/metrics", headers=admin)).text
        assert "credit_http_requests_total{" in text
        assert "credit_settlement_lag_seconds_count 2.0" in text
    # A new process (new in-memory Redis) rebuilds the account and its open hold from SQLite.
    app = create_app(settings)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as c,
    ):
        b = (await c.get("/credits/balance", headers=user)).json()
        assert b["available"] == "3.000000" and b["held"] == "2.000000"
        r = await c.post("/credits/holds/h1/settle", json={"amount": "1"}, headers=user)
        assert r.status_code == 200 and r.json()["available"] == "4.000000"
    assert len((tmp_path / "a.jsonl").read_text().splitlines()) >= 2


def _keys_shown(output: str) -> dict[str, str]:
    return dict(re.findall(r"^\s+(admin|client) key:\s+(\S{40,})\s*$", output, re.M))


def test_serve_without_keys_makes_admin_and_client_keys_once_and_they_survive_a_restart(tmp_path):
    env = clean_env(
        CREDIT_SQLITE_PATH=str(tmp_path / "serve.db"), CREDIT_AUDIT_PATH=str(tmp_path / "serve.jsonl")
    )
    keyfile = tmp_path / "serve.db.keys"

    # First start: both keys generated, shown once, only their digests kept (owner-only file).
    proc, port = serve(env, tmp_path)
    try:
        keys = _keys_shown(proc.output)
        assert "Embedded mode" in proc.output and set(keys) == {"admin", "client"}, proc.output
        admin = {"Authorization": f"Bearer {keys['admin']}"}
        user = {"Authorization": f"Bearer {keys['client']}", "X-User-Id": "newcomer"}
        with httpx.Client(base_url=f"http://127.0.0.1:{port}") as c:
            assert c.get("/readyz").status_code == 200
            assert c.get("/admin/accounts/x").status_code == 401
            assert (
                c.post("/admin/accounts/newcomer/grants", json={"amount": "5"}, headers=admin).status_code
                == 201
            )
            r = c.post("/credits/holds", json={"amount": "2", "hold_id": "first"}, headers=user)
            assert r.status_code == 201, r.text
            assert (
                c.get(
                    "/credits/balance",
                    headers={"Authorization": f"Bearer {keys['admin']}", "X-User-Id": "newcomer"},
                ).status_code
                == 401
            )
    finally:
        first_output = proc.stop()
    assert stat.S_IMODE(keyfile.stat().st_mode) == 0o600
    kept = json.loads(keyfile.read_text())
    assert kept == {kind: ["sha256:" + hashlib.sha256(k.encode()).hexdigest()] for kind, k in keys.items()}
    assert first_output.count(keys["admin"]) == 1 and first_output.count(keys["client"]) == 1

    # Restart: the same keys work; neither is printed again; the output says where the digests are.
    proc, port = serve(env, tmp_path)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}") as c:
            r = c.post("/credits/holds/first/settle", json={"amount": "1"}, headers=user)
            assert r.status_code == 200 and r.json()["available"] == "4.000000", r.text
            assert c.get("/admin/accounts/newcomer", headers=admin).json()["available"] == "4.000000"
    finally:
        second_output = proc.stop()
    assert keys["admin"] not in second_output and keys["client"] not in second_output
    assert not _keys_shown(second_output)
    assert str(keyfile) in second_output and "credit-gateway keys --new" in second_output
    assert json.loads(keyfile.read_text()) == kept


def test_configured_keys_win_over_the_keys_file_and_keys_new_replaces_them(tmp_path):
    env = clean_env(CREDIT_SQLITE_PATH=str(tmp_path / "k.db"), CREDIT_AUDIT_PATH="")
    proc, _ = serve(env, tmp_path)
    old = _keys_shown(proc.stop())
    assert set(old) == {"admin", "client"}

    out = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "keys", "--new", "admin"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    new = _keys_shown(out)
    assert set(new) == {"admin"} and new["admin"] != old["admin"]

    configured_client = "configured-client-" + "c" * 30
    proc, port = serve({**env, "CREDIT_CLIENT_KEYS": configured_client}, tmp_path)
    try:
        assert not _keys_shown(proc.output)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}") as c:

            def grant(key):
                return c.post(
                    "/admin/accounts/u/grants",
                    json={"amount": "1"},
                    headers={"Authorization": f"Bearer {key}"},
                ).status_code

            def balance(key):
                return c.get(
                    "/credits/balance", headers={"Authorization": f"Bearer {key}", "X-User-Id": "u"}
                ).status_code

            assert grant(old["admin"]) == 401 and grant(new["admin"]) == 201
            assert balance(old["client"]) == 401 and balance(configured_client) == 200
    finally:
        output = proc.stop()
    assert new["admin"] not in output
    listing = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "keys"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "k.db.keys" in listing and new["admin"] not in listing and old["client"] not in listing


def test_a_malformed_keys_file_stops_serve_with_a_message_naming_it(tmp_path):
    settings = Settings(sqlite_path=str(tmp_path / "m.db"))
    (tmp_path / "m.db.keys").write_text('{"admin": ["not-a-digest"]}')
    with pytest.raises(KeysFileError, match=r"m\.db\.keys"):
        ensure_keys(settings)
    # A kind configured in the environment needs nothing from the file.
    settings = Settings(sqlite_path=str(tmp_path / "m.db"), admin_keys=ADMIN, client_keys=CLIENT)
    assert ensure_keys(settings).generated == {}


def test_serve_refuses_several_workers_in_embedded_mode(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "serve", "--workers", "2"],
        cwd=tmp_path,
        env=clean_env(CREDIT_SQLITE_PATH=str(tmp_path / "w.db")),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode != 0 and "one process only" in r.stderr


async def test_a_burst_beyond_the_connection_pool_waits_rather_than_failing(tmp_path):
    settings = Settings(
        admin_keys=ADMIN,
        client_keys=CLIENT,
        sqlite_path=str(tmp_path / "b.db"),
        audit_path=None,
        redis_max_connections=8,
    )
    admin = {"Authorization": f"Bearer {ADMIN}"}
    app = create_app(settings)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as c,
    ):
        assert (
            await c.post("/admin/accounts/b/grants", json={"amount": "100"}, headers=admin)
        ).status_code == 201
        user = {"Authorization": f"Bearer {CLIENT}", "X-User-Id": "b"}
        replies = await asyncio.gather(
            *(c.post("/credits/holds", json={"amount": "0.1"}, headers=user) for _ in range(150))
        )
        assert [r.status_code for r in replies] == [201] * 150


@pytest.mark.faults
def test_embedded_mode_answers_only_what_is_stored_so_a_kill_loses_nothing_answered(tmp_path):
    # Redis lives in the process: what was answered must already be in SQLite when the
    # process is killed (SIGKILL: no drain at exit).
    env = clean_env(
        CREDIT_SQLITE_PATH=str(tmp_path / "kill.db"),
        CREDIT_AUDIT_PATH="",
        CREDIT_ADMIN_KEYS=ADMIN,
        CREDIT_CLIENT_KEYS=CLIENT,
    )
    admin = {"Authorization": f"Bearer {ADMIN}"}
    user = {"Authorization": f"Bearer {CLIENT}", "X-User-Id": "kay"}
    proc, port = serve(env, tmp_path)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}") as c:
            for i in range(20):
                r = c.post("/admin/accounts/kay/grants", json={"amount": "1"}, headers=admin)
                assert r.status_code == 201, r.text
                r = c.post("/credits/holds", json={"amount": "0.5", "hold_id": f"h{i}"}, headers=user)
                assert r.status_code == 201, r.text
                r = c.post(f"/credits/holds/h{i}/settle", json={"amount": "0.25"}, headers=user)
                assert r.status_code == 200, r.text
    finally:
        proc.proc.kill()  # at once after the last answer
        proc.proc.wait(10)
    proc, port = serve(env, tmp_path)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}") as c:
            b = c.get("/admin/accounts/kay", headers=admin).json()
    finally:
        proc.stop()
    assert (b["granted"], b["spent"], b["held"], b["available"]) == (
        "20.000000",
        "5.000000",
        "0.000000",
        "15.000000",
    )
