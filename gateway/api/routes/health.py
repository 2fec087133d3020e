"""Liveness and readiness."""

from __future__ import annotations

import asyncio
import contextlib

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from ...core.recovery import partition_status
from ..deps import ServicesDep

router = APIRouter(tags=["health"])

CHECK_TIMEOUT_S = 2


@router.get("/healthz")
async def healthz() -> dict:
    """The process is up."""
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(services: ServicesDep):
    """Ready (200) when the store answers and Redis serves the accounts: `status` "ready" when
    every partition does, "degraded" when some do not (lost by Redis and not rebuilt yet, or
    on a Cluster node that is down): the gateway still serves every other account, so a load
    balancer should keep it. 503 when it can serve none (Redis or the store down, every
    partition lost, or still starting).

    The partitions are checked on every call (one pipeline of EXISTS on their ready markers
    and rebuild leases); the answer names those lost (nobody rebuilding them yet), being
    rebuilt, and out of reach.
    """
    checks = {"redis": False, "store": False, "state": False}
    status = None
    try:
        status = await asyncio.wait_for(
            partition_status(services.redis, services.engine.keys), CHECK_TIMEOUT_S
        )
        checks["redis"] = True
        checks["state"] = services.ready and not status.not_ready
    except Exception:
        pass
    with contextlib.suppress(Exception):
        checks["store"] = bool(await asyncio.wait_for(services.store.ping(), CHECK_TIMEOUT_S))
    body: dict = {"checks": checks}
    if status is not None:
        body["partitions"] = {
            "total": status.total,
            "not_ready": len(status.not_ready),
            "lost": status.lost,
            "rebuilding": status.rebuilding,
            "unreachable": status.unreachable,
        }
    if status is not None and checks["store"] and services.ready and len(status.unavailable) < status.total:
        body["status"] = "degraded" if status.unavailable else "ready"
        return JSONResponse(body)
    body["status"] = "not_ready"
    error: dict[str, object]
    if status is None:
        error = {"code": "credit_store_unavailable", "message": "Redis did not answer"}
    elif not services.ready:
        error = {"code": "not_ready", "message": "the gateway is still rebuilding its state"}
    elif status.not_ready:
        n = len(status.not_ready)
        error = {
            "code": "state_lost",
            "message": f"{n} of {status.total} partitions lost by Redis are not rebuilt yet",
            "partitions": status.not_ready,
        }
    else:
        error = {"code": "store_unavailable", "message": "the store did not answer"}
    body["error"] = error
    return JSONResponse(body, status_code=503, headers={"Retry-After": "1"})
