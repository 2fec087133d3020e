"""When Redis or the store stops answering, every API route answers JSON 503 with
Retry-After (never a plain-text 500), and keeps its keep-alive connections.

The Redis test starts its own redis-server, so it can kill it mid-test, and serves the
gateway with uvicorn over real HTTP: the routes' script calls go over the multiplexed
client, their other Redis work over redis-py, as in production."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import sqlite3
import subprocess
import time

import httpx
import pytest
import uvicorn

from gateway.api.app import create_app
from gateway.core.settings import Settings
from tests.conftest import free_port, unavailable
from tests.support.api_fixtures import ADMIN, CLIENT, H_ADMIN, client_headers

pytestmark = pytest.mark.redis


@contextlib.contextmanager
def own_redis(tmp_path):
    exe = shutil.which("redis-server")
    if not exe:
        unavailable("redis-server is not installed")
    port = free_port()
    proc = subprocess.Popen(
        [
            exe,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(tmp_path),
            "--logfile",
            str(tmp_path / "redis.log"),
        ]
    )
    deadline = time.time() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            if time.time() > deadline:
                proc.kill()
                unavailable("redis-server did not start")
            time.sleep(0.05)
    try:
        yield proc, f"redis://127.0.0.1:{port}/0"
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


@contextlib.asynccontextmanager
async def served(app):
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    )
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 60)


@pytest.mark.faults
async def test_redis_killed_mid_test_every_route_answers_json_503_with_retry_after(tmp_path):
    with own_redis(tmp_path) as (proc, url):
        settings = Settings(
            redis_url=url,
            admin_keys=ADMIN,
            client_keys=CLIENT,
            partitions=4,
            sqlite_path=str(tmp_path / "s.db"),
            audit_path=None,
            redis_timeout_seconds=2,
        )
        app = create_app(settings, run_worker=False)
        async with served(app) as base:
            limits = httpx.Limits(max_connections=16, max_keepalive_connections=16)
            async with httpx.AsyncClient(base_url=base, limits=limits, timeout=60) as c:
                users = [f"u{i}" for i in range(8)]
                for u in users:
                    assert (
                        await c.post(f"/admin/accounts/{u}/grants", json={"amount": "10"}, headers=H_ADMIN)
                    ).status_code == 201
                    for h in ("a", "b"):
                        r = await c.post(
                            "/credits/holds", json={"amount": "1", "hold_id": h}, headers=client_headers(u)
                        )
                        assert r.status_code == 201
                key = (await c.post("/admin/accounts/u0/keys", json={"name": "app"}, headers=H_ADMIN)).json()[
                    "key"
                ]
                assert (
                    await c.get("/credits/balance", headers={"Authorization": f"Bearer {key}"})
                ).status_code == 200

                proc.kill()
                proc.wait(10)

                def calls(u):
                    ch = client_headers(u)
                    return [
                        ("POST", "/credits/holds", {"amount": "1", "hold_id": "c"}, ch),
                        ("POST", "/credits/holds/a/settle", {"amount": "0.5"}, ch),
                        ("POST", "/credits/holds/b/release", None, ch),
                        ("GET", "/credits/balance", None, ch),
                        ("GET", "/credits/balance", None, {"Authorization": f"Bearer {key}"}),
                        (
                            "POST",
                            f"/admin/accounts/{u}/grants",
                            {"amount": "1"},
                            {**H_ADMIN, "Idempotency-Key": "g"},
                        ),
                        ("POST", f"/admin/accounts/{u}/debits", {"amount": "1"}, H_ADMIN),
                        ("GET", f"/admin/accounts/{u}", None, H_ADMIN),
                        ("PUT", f"/admin/accounts/{u}/limits", {"requests_per_minute": 5}, H_ADMIN),
                        ("POST", f"/admin/accounts/{u}/keys", {"name": "x"}, H_ADMIN),
                        ("DELETE", "/admin/accounts/u0/keys/key_0123456789abcdef", None, H_ADMIN),
                    ]

                async def one(method, path, body, headers):
                    return path, await c.request(method, path, json=body, headers=headers)

                todo = [one(*call) for u in users for call in calls(u)]
                answers = await asyncio.gather(*todo)

                assert len(answers) == 88
                for path, r in answers:
                    if path.endswith("/keys/key_0123456789abcdef"):  # the store answers first: no such key
                        assert r.status_code == 404, (path, r.status_code, r.text)
                        continue
                    assert r.status_code == 503, (path, r.status_code, r.text)
                    assert r.headers["content-type"].startswith("application/json"), (path, r.text)
                    assert r.json()["error"]["code"] == "credit_store_unavailable", (path, r.text)
                    assert r.headers["Retry-After"] == "1", path
                    assert "close" not in r.headers.get("connection", ""), path  # kept alive
                # The durable ledger does not need Redis.
                assert (await c.get("/admin/accounts/u0/ledger", headers=H_ADMIN)).status_code == 200


async def test_the_store_not_answering_is_503_store_unavailable(api, monkeypatch):
    store = api.app.state.services.store

    async def locked(*a, **k):
        raise sqlite3.OperationalError("database is locked")

    monkeypatch.setattr(store, "ledger", locked)
    monkeypatch.setattr(store, "rate_limits", locked)
    monkeypatch.setattr(store, "api_keys", locked)
    for path in ("/admin/accounts/s/ledger", "/admin/accounts/s/limits", "/admin/accounts/s/keys"):
        r = await api.get(path, headers=H_ADMIN)
        assert r.status_code == 503, r.text
        assert r.json()["error"]["code"] == "store_unavailable" and r.headers["Retry-After"] == "1"


async def test_an_unreachable_mongodb_is_503_store_unavailable(api, monkeypatch):
    errors = pytest.importorskip("pymongo.errors")
    store = api.app.state.services.store

    async def unreachable(*a, **k):
        raise errors.ServerSelectionTimeoutError("127.0.0.1:27017: connection refused")

    monkeypatch.setattr(store, "ledger", unreachable)
    r = await api.get("/admin/accounts/m/ledger", headers=H_ADMIN)
    assert r.status_code == 503 and r.json()["error"]["code"] == "store_unavailable"
    assert r.headers["Retry-After"] == "1"


async def test_a_redis_timeout_on_a_read_is_503_not_500(api, monkeypatch):
    from redis.exceptions import TimeoutError as RedisTimeoutError

    engine = api.app.state.services.engine

    async def slow(*a, **k):
        raise RedisTimeoutError("no answer from Redis within 5 s")

    monkeypatch.setattr(engine.scripts, "call_json", slow)
    r = await api.get("/credits/balance", headers=client_headers("t"))
    assert r.status_code == 503 and r.json()["error"]["code"] == "credit_store_unavailable"
    assert r.headers["Retry-After"] == "1"
