"""Liveness and readiness."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from ..deps import ServicesDep

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> dict:
    """The process is up."""
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(services: ServicesDep):
    """Ready only when Redis and the store answer and the state is rebuilt."""
    checks = {"redis": False, "store": False, "state": services.ready}
    try:
        checks["redis"] = bool(await asyncio.wait_for(services.redis.ping(), 2))
    except Exception:
        pass
    try:
        checks["store"] = bool(await asyncio.wait_for(services.store.ping(), 2))
    except Exception:
        pass
    ok = all(checks.values())
    return JSONResponse({"status": "ready" if ok else "not_ready", "checks": checks}, status_code=200 if ok else 503)
