"""Fresh stores of every backend for the store contract tests (tests/test_store.py,
tests/test_payment_store.py and the selling tests): a test that takes `new_store` runs once
per backend. (Those modules define their own `store` from it: conftest's `store`, a SQLite
one for the worker tests, would win over a plugin's.)

`durable_store` is one store per relational backend (SQLite and PostgreSQL) for the
recovery and worker tests that take it; `store_env` gives a process the settings that
point it at the same store."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import pytest
import pytest_asyncio

from gateway.core.store import MongoStore, PostgresStore, SQLiteStore, Store, store_from_url


@dataclass
class Backend:
    """How the contract tests get fresh stores of one backend: a URL for the n-th store of a
    test, the database name to give it, what to make before it opens, and what to do with
    it after the test."""

    url: Callable[[int], str]
    database: Callable[[int], str] = lambda n: "credit_management"
    prepare: Callable[[int], Awaitable[None]] | None = None
    dispose: Callable[[Store], Awaitable[None]] | None = None


def sqlite_backend(request: pytest.FixtureRequest) -> Backend:
    tmp = request.getfixturevalue("tmp_path")
    return Backend(url=lambda n: f"sqlite:///{tmp}/store-{n}.db")


def mongo_backend(request: pytest.FixtureRequest) -> Backend:
    uri = request.getfixturevalue("mongo_uri")
    tag = uuid.uuid4().hex[:12]

    async def drop(s: Store) -> None:
        from pymongo import AsyncMongoClient

        assert isinstance(s, MongoStore)
        client: AsyncMongoClient = AsyncMongoClient(uri)
        try:
            await client.drop_database(s.db_name)
        finally:
            await client.close()

    return Backend(url=lambda n: uri, database=lambda n: f"t_{tag}_{n}", dispose=drop)


def postgres_backend(request: pytest.FixtureRequest) -> Backend:
    """A schema of its own per store, in the test run's database (conftest's postgres_url):
    the store's connections put it first on their search_path."""
    url = request.getfixturevalue("postgres_url")
    tag = uuid.uuid4().hex[:12]

    async def admin(statement: str) -> None:
        import asyncpg

        conn = await asyncpg.connect(url)
        try:
            await conn.execute(statement)
        finally:
            await conn.close()

    async def create(n: int) -> None:
        await admin(f"CREATE SCHEMA t_{tag}_{n}")

    async def drop(s: Store) -> None:
        assert isinstance(s, PostgresStore)
        await admin(f"DROP SCHEMA {s.dsn.rsplit('=', 1)[1]} CASCADE")

    return Backend(url=lambda n: f"{url}?search_path=t_{tag}_{n}", prepare=create, dispose=drop)


# A new backend: its module in gateway/core/store/, its scheme in store/registry.py, one line here.
BACKENDS: dict[str, Callable[[pytest.FixtureRequest], Backend]] = {
    "sqlite": sqlite_backend,
    "mongo": mongo_backend,
    "postgres": postgres_backend,
}
# The relational backends: the worker's and the rebuild's tests run on each.
DURABLE_BACKENDS = ("sqlite", "postgres")


async def open_store(backend: Backend, n: int) -> Store:
    if backend.prepare is not None:
        await backend.prepare(n)
    s = store_from_url(backend.url(n), database=backend.database(n))
    await s.open()
    return s


async def dispose(backend: Backend, stores: list[Store]) -> None:
    for s in stores:
        await s.close()
        if backend.dispose is not None:
            await backend.dispose(s)


@pytest.fixture(params=list(BACKENDS))
def backend(request) -> Backend:
    return BACKENDS[request.param](request)


@pytest_asyncio.fixture
async def new_store(backend: Backend):
    """A factory of fresh, open stores of the parametrized backend (closed / dropped after)."""
    made: list[Store] = []

    async def make() -> Store:
        made.append(await open_store(backend, len(made)))
        return made[-1]

    yield make
    await dispose(backend, made)


@pytest.fixture(params=DURABLE_BACKENDS)
def durable_backend(request) -> Backend:
    return BACKENDS[request.param](request)


@pytest_asyncio.fixture
async def durable_store(durable_backend: Backend):
    """A fresh, open store of each relational backend (closed / dropped after)."""
    s = await open_store(durable_backend, 0)
    yield s
    await dispose(durable_backend, [s])


def store_env(store: Store) -> dict[str, Any]:
    """The settings that point a process at `store`."""
    if isinstance(store, PostgresStore):
        return {"CREDIT_DATABASE_URL": store.dsn}
    if isinstance(store, MongoStore):
        return {"CREDIT_MONGO_URI": store.uri, "CREDIT_MONGO_DB": store.db_name}
    assert isinstance(store, SQLiteStore)
    return {"CREDIT_SQLITE_PATH": store.path}


def another_store(store: Store) -> Store:
    """An unopened store on the same data with its own connections, as another process has."""
    if isinstance(store, PostgresStore):
        return PostgresStore(store.dsn)
    if isinstance(store, MongoStore):
        return MongoStore(store.uri, db=store.db_name)
    assert isinstance(store, SQLiteStore)
    return SQLiteStore(store.path)
