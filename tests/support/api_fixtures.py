"""The HTTP API's shared test setup: the keys, the `api` fixture (the app in process, over
ASGI, on a real redis-server and a SQLite store) and the request helpers.
Registered as a plugin in tests/conftest.py."""

from __future__ import annotations

import contextlib

import httpx
import pytest_asyncio

from gateway.api.app import create_app
from gateway.core.settings import Settings
from gateway.core.store.sqlite import SQLiteStore

ADMIN = "admin-" + "a" * 40
CLIENT = "client-" + "c" * 40
H_ADMIN = {"Authorization": f"Bearer {ADMIN}"}


def client_headers(user: str) -> dict:
    return {"Authorization": f"Bearer {CLIENT}", "X-User-Id": user}


def settings_for(redis_url: str, **over) -> Settings:
    """The gateway's settings for a test app on `redis_url`: the test keys, 16 partitions."""
    values = {
        "redis_url": redis_url,
        "admin_keys": ADMIN,
        "client_keys": CLIENT,
        "partitions": 16,
        "audit_path": None,
    }
    return Settings(**{**values, **over})


@contextlib.asynccontextmanager
async def app_client(settings: Settings, redis, store, clock=None):
    """The app in process over ASGI, started on the given Redis client and store; the client
    carries it as `.app`, and `.clock` / `.redis` / `.store` as given."""
    app = create_app(settings, redis=redis, store=store, clock=clock, run_worker=False)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as c,
    ):
        c.app, c.clock, c.redis, c.store = app, clock, redis, store
        yield c


@contextlib.asynccontextmanager
async def api_client(redis, redis_url, tmp_path, clock=None):
    """The app in process over ASGI (started, on a real redis-server and a SQLite store);
    the client carries it as `.app`, and `.clock` / `.redis` as given."""
    settings = settings_for(redis_url, sqlite_path=str(tmp_path / "s.db"))
    store = SQLiteStore(str(tmp_path / "s.db"))
    async with app_client(settings, redis, store, clock) as c:
        yield c
    await store.close()


@pytest_asyncio.fixture
async def api(redis, redis_url, tmp_path):
    async with api_client(redis, redis_url, tmp_path) as c:
        yield c


async def grant(api, user, amount="10", **extra):
    r = await api.post(f"/admin/accounts/{user}/grants", json={"amount": amount, **extra}, headers=H_ADMIN)
    assert r.status_code == 201, r.text
    return r.json()
