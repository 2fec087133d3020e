"""GET /metrics: the process's Prometheus metrics (all processes' in multiprocess mode)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header
from fastapi.responses import Response

from ...core.keyring import bearer
from ...metrics import CONTENT_TYPE
from ..deps import ServicesDep
from ..errors import ApiError

router = APIRouter(tags=["health"])


@router.get("/metrics", response_class=Response)
async def metrics(services: ServicesDep, authorization: Annotated[str | None, Header()] = None) -> Response:
    """Prometheus' text format. Needs a metrics key (CREDIT_METRICS_KEYS) or an admin key as a
    bearer token: the figures are the business's own (credit sold and charged, traffic)."""
    token = bearer(authorization)
    if services.metrics_keys.match(token) is None and services.admin_keys.match(token) is None:
        raise ApiError(
            401,
            "unauthorized",
            "a metrics or admin key is required (Authorization: Bearer <key>)",
            {"WWW-Authenticate": "Bearer"},
        )
    return Response(services.metrics.exposition(), media_type=CONTENT_TYPE)
