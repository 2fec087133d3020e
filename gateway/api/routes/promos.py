"""Promo codes: admins define them; users check and claim them (client key + X-User-Id, or
the user's own key)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Query

from ...promos import PromoError, Promos
from ..body import DecimalRoute
from ..deps import AdminCaller, ClientCaller, ServicesDep
from ..errors import ApiError, refusal

router = APIRouter(tags=["promos"], route_class=DecimalRoute, strict_content_type=False)


def _promos(services: Any) -> Promos:
    if services.promos is None:  # pragma: no cover - built with every app
        raise ApiError(503, "unavailable", "promo codes are not running")
    return services.promos


@router.post("/admin/promos", status_code=201)
async def create_promo(body: dict[str, Any], _: AdminCaller, services: ServicesDep):
    """`{"code": "LAUNCH100", "credits": "100", "max_uses": 500, "max_uses_per_user": 1,
    "valid_until": "2027-01-31T00:00:00Z"}`; codes are case-insensitive and unique."""
    promos = _promos(services)
    try:
        p = await promos.create(body)
    except PromoError as exc:
        raise refusal(exc) from None
    return promos.view(p, 0)


@router.get("/admin/promos")
async def list_promos(_: AdminCaller, services: ServicesDep, active_only: bool = False):
    promos = _promos(services)
    items = await services.store.list_promos(active_only=active_only)
    return {"promos": [promos.view(p, await promos.claims_so_far(p)) for p in items]}


@router.get("/admin/promos/{code}")
async def get_promo(code: str, _: AdminCaller, services: ServicesDep):
    promos = _promos(services)
    try:
        p = await promos.get(code)
    except PromoError as exc:
        raise refusal(exc) from None
    return promos.view(p, await promos.claims_so_far(p))


@router.patch("/admin/promos/{code}")
async def update_promo(code: str, body: dict[str, Any], _: AdminCaller, services: ServicesDep):
    promos = _promos(services)
    try:
        p = await promos.update(code, body)
    except PromoError as exc:
        raise refusal(exc) from None
    return promos.view(p, await promos.claims_so_far(p))


@router.post("/admin/promos/{code}/deactivate")
async def deactivate_promo(code: str, _: AdminCaller, services: ServicesDep):
    return await update_promo(code, {"active": False}, _, services)


@router.get("/credits/promo/eligibility")
async def promo_eligibility(caller: ClientCaller, services: ServicesDep, code: str = Query()):
    return await _promos(services).eligibility(caller.user_id, code)


@router.post("/credits/promo/claim")
async def claim_promo(body: dict[str, Any], caller: ClientCaller, services: ServicesDep):
    if set(body) - {"code"} or "code" not in body:
        raise ApiError(400, "invalid_request", 'the body is {"code": "<promo code>"}')
    try:
        return await _promos(services).claim(caller.user_id, body["code"])
    except PromoError as exc:
        raise refusal(exc) from None
