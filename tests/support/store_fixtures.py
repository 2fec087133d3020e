"""Fresh stores of every backend for the store contract tests (tests/test_store.py,
tests/test_payment_store.py): a test that takes `new_store` runs once per backend. (Those
modules define their own `store` from it: conftest's `store`, a SQLite one for the worker
tests, would win over a plugin's.)"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import pytest
import pytest_asyncio

from gateway.core.store import MongoStore, Store, store_from_url


@dataclass
class Backend:
    """How the contract tests get fresh stores of one backend: a URL for the n-th store of a
    test, the database name to give it, and what to do with it after the test."""

    url: Callable[[int], str]
    database: Callable[[int], str] = lambda n: "credit_management"
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


# A new backend: its module in gateway/core/store/, its scheme in store/registry.py, one line here.
BACKENDS: dict[str, Callable[[pytest.FixtureRequest], Backend]] = {
    "sqlite": sqlite_backend,
    "mongo": mongo_backend,
}


@pytest.fixture(params=list(BACKENDS))
def backend(request) -> Backend:
    return BACKENDS[request.param](request)


@pytest_asyncio.fixture
async def new_store(backend: Backend):
    """A factory of fresh, open stores of the parametrized backend (closed / dropped after)."""
    made: list[Store] = []

    async def make() -> Store:
        n = len(made)
        s = store_from_url(backend.url(n), database=backend.database(n))
        await s.open()
        made.append(s)
        return s

    yield make
    for s in made:
        await s.close()
        if backend.dispose is not None:
            await backend.dispose(s)
