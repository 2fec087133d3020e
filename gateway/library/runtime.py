"""Library mode's engine, ready to use: the clients, store and worker it runs on, opened and closed.

`credit_engine(settings)` gives a CreditRuntime: an async context manager, a lifespan for
FastAPI / Starlette, and the callable CreditMiddleware asks for the engine per request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from ..core.engine import CreditEngine
from ..core.settings import Settings, settings_from_env
from ..core.store.base import Store
from ..core.stored_versions import StoredVersions

log = logging.getLogger("credit.library")


def credit_engine(settings: Settings | None = None, *, run_worker: bool | None = None) -> CreditRuntime:
    """A CreditEngine for the Redis and store `settings` name (default: Settings(), read
    from the CREDIT_* environment), opened on entry and closed on exit:

        async with credit_engine(Settings()) as engine: ...

    or, in an app, handed to the middleware before it starts (it is callable: the engine
    while open, else None) and opened by the app's lifespan:

        credits = credit_engine()
        app = FastAPI(lifespan=credits.lifespan)
        app.add_middleware(CreditMiddleware, engine=credits, ...)

    Opening builds the Redis client as the gateway does (a blocking pool; script calls
    over the multiplexed client when Redis is a single redis:// server), opens the store,
    and rebuilds from the store any partition Redis lost, or marks a fresh Redis's
    partitions ready (without that every call answers state_lost). With `run_worker`
    (default: only in embedded mode, i.e. no CREDIT_REDIS_URL) the worker that persists
    events to the store runs in this process and drains what is left on exit; otherwise
    run `credit-gateway worker` next to the app, on the same settings.
    """
    return CreditRuntime(settings if settings is not None else settings_from_env(), run_worker=run_worker)


class CreditRuntime:
    """An engine with the clients and store it runs on (see credit_engine)."""

    def __init__(self, settings: Settings, *, run_worker: bool | None = None) -> None:
        self.settings = settings
        self.run_worker = settings.embedded if run_worker is None else run_worker
        self._engine: CreditEngine | None = None
        self._store: Store | None = None
        self._stack: contextlib.AsyncExitStack | None = None

    def __call__(self) -> CreditEngine | None:
        """The engine while open, else None (what CreditMiddleware asks per request)."""
        return self._engine

    @property
    def engine(self) -> CreditEngine:
        if self._engine is None:
            raise RuntimeError("the credit engine is not open: `async with` it, or use its lifespan")
        return self._engine

    @property
    def store(self) -> Store:
        """The store the engine's events are persisted to (while open)."""
        if self._store is None:
            raise RuntimeError("the credit engine is not open: `async with` it, or use its lifespan")
        return self._store

    async def open(self) -> CreditEngine:
        from ..core.connections import make_engine, make_redis, make_script_client, make_store
        from ..core.recovery import ensure_ready

        if self._stack is not None:
            raise RuntimeError("the credit engine is open already")
        settings = self.settings
        stack = contextlib.AsyncExitStack()
        try:
            redis = make_redis(settings)
            stack.push_async_callback(redis.aclose)
            mux = make_script_client(settings)
            if mux is not None:
                stack.push_async_callback(mux.aclose)
            store = make_store(settings)
            await store.open()
            stack.push_async_callback(store.close)
            engine = make_engine(settings, redis, script_redis=mux)
            await ensure_ready(engine, store)
            if self.run_worker:
                await stack.enter_async_context(_worker(settings, engine, store))
        except BaseException:
            await stack.aclose()
            raise
        self._stack, self._engine, self._store = stack, engine, store
        return engine

    async def close(self) -> None:
        stack, self._stack, self._engine, self._store = self._stack, None, None, None
        if stack is not None:
            await stack.aclose()

    async def __aenter__(self) -> CreditEngine:
        return await self.open()

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    @asynccontextmanager
    async def lifespan(self, app: Any) -> AsyncIterator[None]:
        """For FastAPI(lifespan=...) / Starlette(lifespan=...): open while the app runs."""
        async with self:
            yield


@asynccontextmanager
async def _worker(settings: Settings, engine: CreditEngine, store: Store) -> AsyncIterator[None]:
    # mypy does not follow pyproject's package-dir (worker/ installs as gateway.worker).
    from gateway.worker.service import build_worker  # type: ignore[import-not-found]

    worker = build_worker(settings, engine, store)
    if settings.embedded:  # Redis keeps nothing on disk: answer what is stored
        engine.stored_versions = StoredVersions()
    task = asyncio.create_task(worker.run(), name="credit-worker")
    try:
        yield
    finally:
        worker.stop()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, 30)
        if worker.audit:
            worker.audit.close()
        # What was appended after the worker's last read (an in-process Redis is gone
        # after this): one more pass until every stream is drained.
        last = build_worker(settings, engine, store)
        try:
            await asyncio.wait_for(last.run(burst=True), 30)
        except Exception:
            log.exception("the final drain of the in-process worker failed")
        finally:
            engine.stored_versions = None  # nobody stores now: nothing to wait for
            if last.audit:
                last.audit.close()
