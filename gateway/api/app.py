"""Builds the gateway's FastAPI app (`create_app(settings)`) and its start-up steps.

The lifespan composes small steps on an AsyncExitStack: connect Redis, open the store,
rebuild Redis from the store where it lost its state, run the worker (embedded mode) or
the partition watch, start the proxy; each step's clean-up runs in reverse order."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI
from starlette.middleware.errors import ServerErrorMiddleware
from starlette.middleware.exceptions import ExceptionMiddleware
from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from ..core.apikeys import ApiKeys
from ..core.connections import describe, make_engine, make_redis, make_script_client, make_store
from ..core.keyring import KeyRing
from ..core.recovery import ensure_ready, watch_partitions
from ..core.redis_client import RedisClient
from ..core.settings import Settings
from ..core.store.base import Store
from ..core.stored_versions import StoredVersions
from ..metrics import Metrics, MetricsMiddleware
from ..selling import Selling, build_selling
from .body import BodyLimitMiddleware
from .errors import install_error_handlers
from .request_id import RequestIdMiddleware
from .routes import (
    access,
    admin,
    compat,
    health,
    holds,
    metrics,
    notifications,
    payments,
    plans,
    pricing,
    promos,
)
from .services import InProcessWorker, Services

if TYPE_CHECKING:
    from ..core.multiplex import MultiplexedRedis
    from ..proxy.config import ProxyConfig

log = logging.getLogger("credit.gateway")


class GatewayApp(FastAPI):
    """FastAPI, plus a short path for the metered LLM routes (POST /v1/chat/completions etc.).

    Those routes are the hot path and need nothing of FastAPI's: no dependencies, no
    validation, no OpenAPI. Going through its full stack (telemetry checks, every admin
    router tried in turn, the request/response wrappers) cost about a fifth of the gateway's
    CPU per proxied request (measured with py-spy under loadtest/proxy_bench.py). The short
    path keeps what matters to behaviour, in Starlette's order: the server-error middleware
    (a 500 on an unexpected error), our middleware (the body cap), the app's exception
    handlers, then the proxy. It skips FastAPI's native OpenTelemetry wrapper, which the
    gateway does not configure. Every other path (and any method but POST) goes the usual way.
    """

    proxy_paths: frozenset[str] = frozenset()
    _proxy_stack: ASGIApp | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] == "http"
            and scope["path"] in self.proxy_paths
            and scope["method"] == "POST"
            and not self.root_path
            and not scope.get("root_path")
        ):
            if self._proxy_stack is None:
                self._proxy_stack = self._build_proxy_stack()
            scope["app"] = self
            await self._proxy_stack(scope, receive, send)
            return
        await super().__call__(scope, receive, send)

    def _build_proxy_stack(self) -> ASGIApp:
        # The same split of handlers as Starlette's build_middleware_stack.
        error_handler = None
        handlers: dict[Any, Any] = {}
        for key, value in self.exception_handlers.items():
            if key in (500, Exception):
                error_handler = value
            else:
                handlers[key] = value
        app: ASGIApp = ExceptionMiddleware(_proxy_endpoint, handlers=handlers, debug=self.debug)
        for cls, args, kwargs in reversed(self.user_middleware):
            app = cls(app, *args, **kwargs)
        return ServerErrorMiddleware(app, handler=error_handler, debug=self.debug)


async def _proxy_endpoint(scope: Scope, receive: Receive, send: Send) -> None:
    request = Request(scope, receive, send)
    response = await scope["app"].state.services.proxy.handle(request)
    await response(scope, receive, send)


def create_app(
    settings: Settings,
    *,
    redis: RedisClient | None = None,
    store: Store | None = None,
    clock: Callable[[], float] | None = None,
    run_worker: bool | None = None,
) -> GatewayApp:
    """Builds the gateway. `redis` / `store` / `clock` override what settings name (tests);
    `run_worker` defaults to embedded mode (the worker runs in this process)."""

    in_process_worker = settings.embedded if run_worker is None else run_worker
    app_metrics = Metrics()
    proxy_config = None
    if settings.gateway_config:
        from ..proxy.config import load_config

        proxy_config = load_config(settings.gateway_config)  # fails at build time on a bad file

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with AsyncExitStack() as stack:
            app.state.services = await _start(
                stack,
                settings,
                proxy_config,
                redis=redis,
                store=store,
                clock=clock,
                in_process_worker=in_process_worker,
                metrics=app_metrics,
            )
            yield

    app = GatewayApp(
        title="credit-gateway",
        version="0.1.0",
        description="Prepaid credits for LLM calls: two-phase holds in Redis, a durable ledger.",
        lifespan=lifespan,
    )
    install_error_handlers(app)
    llm_cap = proxy_config.max_body_bytes if proxy_config else settings.max_body_bytes
    app.add_middleware(
        BodyLimitMiddleware,
        limit=lambda path: llm_cap if path.startswith("/v1/") else settings.max_body_bytes,
    )
    app.add_middleware(MetricsMiddleware, metrics=app_metrics)
    app.add_middleware(RequestIdMiddleware)  # outermost: every line of the request carries its id
    # compat first: its /credits/payments/history must not be read as a payment id.
    app.state.metrics = app_metrics
    for module in (
        health,
        metrics,
        admin,
        access,
        holds,
        pricing,
        compat,
        payments,
        promos,
        plans,
        notifications,
    ):
        app.include_router(module.router)
    if proxy_config is not None:
        from ..proxy.kinds import metered_routes

        async def proxied(request):
            return await request.app.state.services.proxy.handle(request)

        for path in metered_routes():
            app.add_route(path, proxied, methods=["POST"], include_in_schema=False)
        app.proxy_paths = frozenset(metered_routes())  # POSTs there skip FastAPI's stack
        for route in proxy_config.routes:
            app.add_route(route.path, proxied, methods=list(route.methods), include_in_schema=False)

        async def not_served(request):
            return request.app.state.services.proxy.not_served(request)

        # Last: every other /v1/ path or method is refused in the upstream's error format.
        app.add_route(
            "/v1/{rest:path}",
            not_served,
            include_in_schema=False,
            methods=["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"],
        )
    return app


# -- start-up, one step each; every step registers its clean-up on the stack, which runs
# them in reverse order (on shutdown, or when a later step fails) --------------------------


async def _start(
    stack: AsyncExitStack,
    settings: Settings,
    proxy_config: ProxyConfig | None,
    *,
    redis: RedisClient | None,
    store: Store | None,
    clock: Callable[[], float] | None,
    in_process_worker: bool,
    metrics: Metrics,
) -> Services:
    r = await _connect_redis(stack, settings, redis)
    # The hot path's script calls go multiplexed (when Redis is a single server named by the
    # settings; a client handed in by a caller is used for everything).
    mux = await _connect_script_client(stack, settings) if redis is None else None
    s = await _open_store(stack, settings, store)
    engine = make_engine(settings, r, script_redis=mux, clock=clock)
    services = Services(
        settings=settings,
        redis=r,
        store=s,
        engine=engine,
        admin_keys=KeyRing(settings.admin_key_digests),
        client_keys=KeyRing(settings.client_key_digests),
        metrics_keys=KeyRing(settings.metrics_key_digests),
        metrics=metrics,
        api_keys=ApiKeys(r, engine.keys, s, cache_seconds=settings.api_key_cache_seconds),
    )
    if settings.embedded:
        log.info("embedded mode: in-process Redis (fakeredis) and the worker run inside this process")
    log.info("credit gateway starting; %s", describe(settings))
    _flush_metrics(stack, metrics)
    await _make_ready(stack, services)
    selling = await build_selling(stack, settings, proxy_config.payments if proxy_config else None, s, engine)
    services.promos, services.payments = selling.promos, selling.payments
    services.subscriptions, services.notifications = selling.subscriptions, selling.notifier
    # Before the proxy: stopped after it, the worker persists the proxy's last settlements.
    if in_process_worker:
        await _run_worker(stack, services, selling if settings.embedded else None)
    else:
        await _watch_partitions(stack, services)
    if proxy_config is not None:
        await _start_proxy(stack, services, proxy_config)
    return services


async def _connect_redis(stack: AsyncExitStack, settings: Settings, given: RedisClient | None) -> RedisClient:
    """The Redis client: the caller's (theirs to close), else the one the settings name."""
    if given is not None:
        return given
    r = make_redis(settings)
    stack.push_async_callback(r.aclose)
    return r


async def _connect_script_client(stack: AsyncExitStack, settings: Settings) -> MultiplexedRedis | None:
    mux = make_script_client(settings)
    if mux is not None:
        stack.push_async_callback(mux.aclose)
    return mux


async def _open_store(stack: AsyncExitStack, settings: Settings, given: Store | None) -> Store:
    """Opens the store: the caller's (opened here, theirs to close), else the settings'."""
    s = given if given is not None else make_store(settings)
    await s.open()
    if given is None:
        stack.push_async_callback(s.close)
    return s


async def _make_ready(stack: AsyncExitStack, services: Services) -> None:
    """Rebuilds Redis from the store where it lost its state, loads the API keys, then
    lets the routes serve."""
    rebuilt = await ensure_ready(services.engine, services.store)
    if rebuilt:
        log.info("rebuilt %d accounts from the store", rebuilt.accounts)
    await services.api_keys.start()
    stack.push_async_callback(services.api_keys.stop)
    services.ready = True


async def _run_worker(stack: AsyncExitStack, services: Services, selling: Selling | None) -> None:
    """The worker in this process (embedded mode): stopped, then waited for (up to 30 s)."""
    # mypy does not follow pyproject's package-dir (worker/ installs as gateway.worker).
    from gateway.worker.metrics import WorkerMetrics  # type: ignore[import-not-found]
    from gateway.worker.service import build_worker  # type: ignore[import-not-found]

    # The worker's metrics are this process's too: /metrics answers them beside the gateway's.
    worker_metrics = WorkerMetrics()
    services.metrics.include(worker_metrics.registry)
    # In one process, the selling services' timed jobs too (renewals, pending promo claims,
    # payment reconcile), beside the drain.
    worker: InProcessWorker = build_worker(
        services.settings, services.engine, services.store, selling, worker_metrics
    )
    services.worker = worker
    if services.settings.embedded:  # Redis keeps nothing on disk: answer what is stored
        services.engine.stored_versions = StoredVersions()
    task = asyncio.create_task(worker.run(), name="credit-worker")

    async def stop() -> None:
        worker.stop()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, 30)
        services.engine.stored_versions = None  # nobody stores now: nothing to wait for
        worker.close()

    stack.push_async_callback(stop)


METRICS_FLUSH_SECONDS = 1.0


def _flush_metrics(stack: AsyncExitStack, metrics: Metrics) -> None:
    """What the hot path counts in memory reaches the metrics every second (and at each
    scrape): with several processes, a scrape answered by one sees the others' counts."""
    task = asyncio.create_task(metrics.flush_every(METRICS_FLUSH_SECONDS), name="credit-metrics-flush")

    async def stop() -> None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    stack.push_async_callback(stop)


async def _watch_partitions(stack: AsyncExitStack, services: Services) -> None:
    """Without a worker in this process: rebuilds a partition Redis lost should no worker
    do it (recovery.watch_partitions)."""
    task = asyncio.create_task(
        watch_partitions(services.engine, services.store, services.settings.sweep_interval_seconds),
        name="credit-partition-watch",
    )

    async def stop() -> None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    stack.push_async_callback(stop)


async def _start_proxy(stack: AsyncExitStack, services: Services, config: ProxyConfig) -> None:
    """The metering proxy: its pricing cache, one pooled upstream client, the proxy itself
    (drained of in-flight calls on shutdown)."""
    import aiohttp

    from ..proxy.forward import MeteringProxy
    from ..proxy.identity import Identity
    from ..proxy.pricing_cache import PricingCache
    from ..proxy.summary import summary_lines

    pricing = PricingCache(services.redis, services.settings.key_prefix, config.pricing)
    services.pricing = pricing
    await pricing.start()
    stack.push_async_callback(pricing.stop)
    # One pooled upstream client per process (aiohttp: measured several times httpx's rate).
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=300, keepalive_timeout=30),
        auto_decompress=False,
        skip_auto_headers=("User-Agent",),
    )
    stack.push_async_callback(session.close)
    proxy = MeteringProxy(
        services.engine,
        config,
        pricing,
        Identity(services.client_keys, services.api_keys),
        session,
        services.metrics,
    )
    services.proxy = proxy
    stack.push_async_callback(proxy.drain)
    for line in summary_lines(config):
        log.info("%s", line)
