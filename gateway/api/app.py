"""`create_app(settings)`: the FastAPI app. Its lifespan opens Redis and the store, rebuilds
Redis from the store when it lost its state, and in embedded mode runs the worker too."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from starlette.middleware.errors import ServerErrorMiddleware
from starlette.middleware.exceptions import ExceptionMiddleware
from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from ..core.apikeys import ApiKeys
from ..core.connections import describe, make_engine, make_redis, make_script_client, make_store
from ..core.keyring import KeyRing
from ..core.recovery import ensure_ready, watch_partitions
from ..core.settings import Settings
from ..core.store.base import Store
from .body import BodyLimitMiddleware
from .errors import install_error_handlers
from .routes import access, admin, health, holds, pricing
from .services import Services

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
    redis: Any = None,
    store: Store | None = None,
    clock: Callable[[], float] | None = None,
    run_worker: bool | None = None,
) -> GatewayApp:
    """Builds the gateway. `redis` / `store` / `clock` override what settings name (tests);
    `run_worker` defaults to embedded mode (the worker runs in this process)."""

    in_process_worker = settings.embedded if run_worker is None else run_worker
    proxy_config = None
    if settings.gateway_config:
        from ..proxy.config import load_config

        proxy_config = load_config(settings.gateway_config)  # fails at build time on a bad file

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        r = redis if redis is not None else make_redis(settings)
        s = store if store is not None else make_store(settings)
        await s.open()
        # The hot path's script calls go multiplexed (when Redis is a single server named by
        # the settings; a client handed in by a caller is used for everything).
        mux = make_script_client(settings) if redis is None else None
        engine = make_engine(settings, r, script_redis=mux, clock=clock)
        services = Services(
            settings=settings,
            redis=r,
            store=s,
            engine=engine,
            admin_keys=KeyRing(settings.admin_key_digests),
            client_keys=KeyRing(settings.client_key_digests),
        )
        services.api_keys = ApiKeys(r, engine.keys, s, cache_seconds=settings.api_key_cache_seconds)
        app.state.services = services
        if settings.embedded:
            log.info("embedded mode: in-process Redis (fakeredis) and the worker run inside this process")
        log.info("credit gateway starting; %s", describe(settings))
        rebuilt = await ensure_ready(engine, s)
        if rebuilt:
            log.info("rebuilt %d accounts from the store", rebuilt.accounts)
        await services.api_keys.start()
        services.ready = True
        session = None
        if proxy_config is not None:
            import aiohttp

            from ..proxy.forward import MeteringProxy
            from ..proxy.identity import Identity
            from ..proxy.pricing_cache import PricingCache

            services.pricing = PricingCache(r, settings.key_prefix, proxy_config.pricing)
            await services.pricing.start()
            # One pooled upstream client per process (aiohttp: measured several times httpx's rate).
            session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=300, keepalive_timeout=30),
                auto_decompress=False,
                skip_auto_headers=("User-Agent",),
            )
            services.proxy = MeteringProxy(
                engine,
                proxy_config,
                services.pricing,
                Identity(services.client_keys, services.api_keys),
                session,
            )
            from ..proxy.summary import summary_lines

            for line in summary_lines(proxy_config):
                log.info("%s", line)
        watch = None
        if in_process_worker:
            # mypy does not follow pyproject's package-dir (worker/ installs as gateway.worker).
            from gateway.worker.service import build_worker  # type: ignore[import-not-found]

            services.worker = build_worker(settings, engine, s)
            services.background.append(asyncio.create_task(services.worker.run(), name="credit-worker"))
        else:
            # Rebuilds a partition Redis lost should no worker do it (recovery.watch_partitions).
            watch = asyncio.create_task(
                watch_partitions(engine, s, settings.sweep_interval_seconds), name="credit-partition-watch"
            )
        try:
            yield
        finally:
            if watch is not None:
                watch.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watch
            if services.proxy is not None:
                await services.proxy.drain()
                await services.pricing.stop()
            if session is not None:
                await session.close()
            await services.api_keys.stop()
            if services.worker is not None:
                services.worker.stop()
            for t in services.background:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(t, 30)
            if services.worker is not None and services.worker.audit:
                services.worker.audit.close()
            if store is None:
                await s.close()
            if mux is not None:
                await mux.aclose()
            if redis is None:
                await r.aclose()

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
    for module in (health, admin, access, holds, pricing):
        app.include_router(module.router)
    if proxy_config is not None:
        from ..proxy.config import ANTHROPIC_ROUTES, OPENAI_ROUTES

        async def proxied(request):
            return await request.app.state.services.proxy.handle(request)

        for path in OPENAI_ROUTES + ANTHROPIC_ROUTES:
            app.add_route(path, proxied, methods=["POST"], include_in_schema=False)
        app.proxy_paths = frozenset(OPENAI_ROUTES + ANTHROPIC_ROUTES)  # POSTs there skip FastAPI's stack
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
