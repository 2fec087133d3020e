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
async def promo_eligibility(
    caller: ClientCaller,
    services: ServicesDep,
    code: str | None = Query(None),
    promo_code: str | None = Query(None, description="credit-management's name for `code`"),
):
    """`?code=`: whether the caller's user may claim it. Asked in credit-management's form
    (`?promo_code=`), the answer adds its fields (`promo_code`, `description`)."""
    wanted = _one_code(code, promo_code)
    promos = _promos(services)
    answer = await promos.eligibility(caller.user_id, wanted)
    if promo_code is None:
        return answer
    description = None
    if answer["credits"] is not None:  # a known code
        description = (await promos.get(answer["code"])).description
    return {**answer, "promo_code": answer["code"], "description": description}


@router.post("/credits/promo/claim")
async def claim_promo(body: dict[str, Any], caller: ClientCaller, services: ServicesDep):
    """`{"code": ...}`, or credit-management's `{"promo_code": ..., "user_id"?: ...}` (a
    `user_id` must be the caller's own user), whose answer adds its fields (`success`,
    `credits_awarded`, `promo_code`, `message`). A refusal is a 4xx error either way, never
    a 200 with `success: false`."""
    if set(body) - {"code", "promo_code", "user_id"}:
        raise ApiError(400, "invalid_request", 'the body is {"code": "<promo code>"}')
    if "user_id" in body and body["user_id"] != caller.user_id:
        raise ApiError(403, "forbidden", "user_id must be the caller's own user")
    wanted = _one_code(body.get("code"), body.get("promo_code"))
    try:
        r = await _promos(services).claim(caller.user_id, wanted)
    except PromoError as exc:
        raise refusal(exc) from None
    if "promo_code" not in body:
        return r
    return {
        **r,
        "success": True,
        "credits_awarded": r["credits"],
        "promo_code": r["code"],
        "message": f"{r['credits']} credits added",
    }


def _one_code(code: Any, promo_code: Any) -> Any:
    """The code, named `code` or (credit-management) `promo_code`; both must agree."""
    if code is None and promo_code is None:
        raise ApiError(400, "invalid_request", 'give the promo code as "code" (or "promo_code")')
    if code is not None and promo_code is not None and code != promo_code:
        raise ApiError(400, "invalid_request", "code and promo_code name different codes")
    return code if code is not None else promo_code
