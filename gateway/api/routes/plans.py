"""Plans and subscriptions: admins define plans and subscribe accounts; a user sees its own
subscription (client key + X-User-Id, or the user's own key)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Query

from ...core.keys import ID_PATTERN
from ...plans.catalog import PlanError, Plans
from ...plans.subscriptions import Subscriptions
from ..body import DecimalRoute
from ..deps import AdminCaller, ClientCaller, ServicesDep
from ..errors import ApiError, refusal

router = APIRouter(tags=["plans"], route_class=DecimalRoute, strict_content_type=False)

UserId = Annotated[str, Path(pattern=ID_PATTERN.pattern, description="the account's user id")]


def _subs(services: Any) -> Subscriptions:
    if services.subscriptions is None:  # pragma: no cover - built with every app
        raise ApiError(503, "unavailable", "plans are not running")
    return services.subscriptions


@router.post("/admin/plans", status_code=201)
async def create_plan(body: dict[str, Any], _: AdminCaller, services: ServicesDep):
    """`{"name": "Pro", "price": "29.99", "currency": "USD", "credits": "10000",
    "period": "monthly", "rollover": false}`; price "0" (or none) makes a free plan."""
    try:
        return Plans.view(await _subs(services).plans.create(body))
    except PlanError as exc:
        raise refusal(exc) from None


@router.get("/admin/plans")
async def list_plans(_: AdminCaller, services: ServicesDep, active_only: bool = False):
    return {"plans": [Plans.view(p) for p in await services.store.list_plans(active_only=active_only)]}


@router.get("/admin/plans/{plan_id}")
async def get_plan(plan_id: str, _: AdminCaller, services: ServicesDep):
    try:
        return Plans.view(await _subs(services).plans.get(plan_id))
    except PlanError as exc:
        raise refusal(exc) from None


@router.patch("/admin/plans/{plan_id}")
async def update_plan(plan_id: str, body: dict[str, Any], _: AdminCaller, services: ServicesDep):
    """Limits and models apply to its subscribers at once; the rest from each subscriber's
    next renewal. The period cannot change."""
    try:
        return Plans.view(await _subs(services).update_plan(plan_id, body))
    except PlanError as exc:
        raise refusal(exc) from None


@router.post("/admin/plans/{plan_id}/deactivate")
async def deactivate_plan(plan_id: str, _: AdminCaller, services: ServicesDep):
    """No new subscribers; the plan's subscribers keep it until they cancel."""
    return await update_plan(plan_id, {"active": False}, _, services)


@router.post("/admin/accounts/{user_id}/subscriptions", status_code=201)
async def subscribe(user_id: UserId, body: dict[str, Any], _: AdminCaller, services: ServicesDep):
    """`{"plan_id": "...", "paid": false}`: a free or admin-granted subscription renews by
    itself; `"paid": true` renews through a payment (`provider` razorpay or stripe)."""
    subs = _subs(services)
    try:
        return await subs.view(await subs.subscribe(user_id, body))
    except PlanError as exc:
        raise refusal(exc) from None


@router.get("/admin/accounts/{user_id}/subscriptions")
async def subscriptions(user_id: UserId, _: AdminCaller, services: ServicesDep):
    """The account's subscriptions, newest first."""
    subs = _subs(services)
    return {"subscriptions": [await subs.view(s) for s in await services.store.subscriptions_of(user_id)]}


@router.delete("/admin/accounts/{user_id}/subscriptions")
async def cancel(
    user_id: UserId,
    _: AdminCaller,
    services: ServicesDep,
    at_period_end: Annotated[bool, Query(description="false: ends now, its plan credit with it")] = True,
):
    subs = _subs(services)
    try:
        return await subs.view(await subs.cancel(user_id, at_period_end=at_period_end))
    except PlanError as exc:
        raise refusal(exc) from None


@router.get("/credits/subscription")
async def my_subscription(caller: ClientCaller, services: ServicesDep):
    """The caller's live subscription (or its last one), with the payment link when a
    period waits for its payment."""
    subs = _subs(services)
    history = await services.store.subscriptions_of(caller.user_id)
    current = next((s for s in history if s.live), history[0] if history else None)
    return {"subscription": None if current is None else await subs.view(current)}
