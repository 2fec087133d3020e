"""The REST calls of credit-management 0.7.1, answered by this gateway's services behind its auth.

Teams moving from that package keep its paths and bodies; each answer carries its fields
(and, where a path exists here too, the gateway's own fields beside them). What changed on
purpose: every route needs a key (admin paths the admin key, user paths a client key with
X-User-Id or the user's own key), amounts are exact decimals (never floats), and a deduct
cannot lose an update. docs/migrating-from-credit-management.md maps each call.
"""

from __future__ import annotations

import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Path, Query, Request, Response
from pydantic import Field

from ...core.errors import InsufficientCredits
from ...core.keyring import bearer
from ...core.keys import ID_PATTERN
from ...core.money import AmountError, parse_amount
from ...core.store.payments import PaymentRecord
from ...core.store.promos import PromoRecord
from ...payments.service import PaymentError
from ...plans.catalog import PlanError, Plans
from ...promos import PromoError, Promos
from ..body import DecimalRoute
from ..deps import (
    AdminCaller,
    Client,
    ClientCaller,
    EngineDep,
    IdempotencyKey,
    ServicesDep,
    idempotency_op_id,
    require_client_user,
)
from ..errors import ApiError, refusal
from ..schemas import Balance, Body, Credits, Ident
from .payments import legacy_fields
from .payments import view as payment_view

router = APIRouter(
    tags=["credit-management compatibility"], route_class=DecimalRoute, strict_content_type=False
)

UserId = Annotated[str, Path(pattern=ID_PATTERN.pattern, description="the account's user id")]

# credit-management's billing periods and the validity each stands for, in days. A plan's
# `validity_days` is accepted only when it is its period's length: a period here is a
# calendar period (a month is 28-31 days), so any other figure would be silently ignored.
PERIOD_DAYS = {"daily": {1}, "weekly": {7}, "monthly": {28, 29, 30, 31}, "yearly": {365, 366}}
NOMINAL_DAYS = {"daily": 1, "weekly": 7, "monthly": 30, "yearly": 365}
# Its promo target types: everyone, or the users listed in target_user_ids.
TARGET_ALL, TARGET_USERS = "all", "specific_users"


def _bad(message: str) -> ApiError:
    return ApiError(400, "invalid_request", message)


# -- who may read a balance by its path ----------------------------------------------------------


async def _balance_reader(
    request: Request,
    services: ServicesDep,
    user_id: UserId,
    authorization: Annotated[str | None, Header()] = None,
) -> str:
    """An admin key reads any account; a client key with X-User-Id, or the user's own key,
    reads only its own user's (403 otherwise). The old package answered anyone."""
    if services.admin_keys.match(bearer(authorization)) is not None:
        return user_id
    caller: Client = await require_client_user(
        request,
        services,
        authorization,
        request.headers.get("x-user-id"),
        request.headers.get("x-api-key"),
    )
    if caller.user_id != user_id:
        raise ApiError(403, "forbidden", "a client may read its own user's balance only")
    return user_id


@router.get("/credits/balance/{user_id}")
async def balance_of(user: Annotated[str, Depends(_balance_reader)], engine: EngineDep):
    """`{user_id, credits}` (credits: available), with the gateway's balance fields."""
    b = Balance.of(user, await engine.balance(user)).model_dump(mode="json")
    return {**b, "credits": b["available"]}


# -- admin: add and deduct credits -------------------------------------------------------------


class Adjustment(Body):
    user_id: Ident
    amount: Credits
    description: str | None = Field(None, max_length=500)


def _adjusted(user: str, state: Any, op_id: str, replayed: bool, response: Response) -> dict[str, Any]:
    if replayed:
        response.headers["Idempotent-Replayed"] = "true"
    b = Balance.of(user, state).model_dump(mode="json")
    return {**b, "credits": b["available"], "operation_id": op_id, "replayed": replayed}


@router.post("/admin/credits/add")
async def add_credits(
    body: Adjustment,
    caller: AdminCaller,
    engine: EngineDep,
    response: Response,
    idempotency_key: IdempotencyKey = None,
):
    """A grant (source admin). Send an `Idempotency-Key` to make a retry safe: without one,
    every call adds again (as the old package did)."""
    op_id = idempotency_op_id(caller, "grants", idempotency_key) or f"adm-{uuid.uuid4().hex}"
    meta = {"description": body.description, "by": caller.key_id, "via": "credit-management"}
    r = await engine.grant(body.user_id, body.amount, op_id=op_id, source="admin", metadata=meta)
    return _adjusted(body.user_id, r.state, op_id, r.replayed, response)


@router.post("/admin/credits/deduct")
async def deduct_credits(
    body: Adjustment,
    caller: AdminCaller,
    engine: EngineDep,
    response: Response,
    idempotency_key: IdempotencyKey = None,
):
    """A debit; 400 `insufficient_credits` when the free credit is short (the old status;
    the gateway's own debit route answers 402)."""
    op_id = idempotency_op_id(caller, "debits", idempotency_key) or f"adm-{uuid.uuid4().hex}"
    meta = {"description": body.description, "by": caller.key_id, "via": "credit-management"}
    try:
        r = await engine.debit(body.user_id, body.amount, op_id=op_id, metadata=meta)
    except InsufficientCredits as exc:
        raise ApiError(
            400, "insufficient_credits", "not enough credits to deduct", available=str(exc.available)
        ) from None
    return _adjusted(body.user_id, r.state, op_id, r.replayed, response)


# -- admin: plans --------------------------------------------------------------------------------

PLAN_FIELDS = {"name", "description", "credit_limit", "price", "billing_period", "validity_days", "currency"}


@router.post("/admin/credits/plans", status_code=201)
async def create_plan(body: dict[str, Any], _: AdminCaller, services: ServicesDep):
    """`{name, description?, credit_limit, price, billing_period, validity_days?}`: a plan of
    `credit_limit` credits per period, priced in INR unless `currency` says otherwise."""
    unknown = set(body) - PLAN_FIELDS
    if unknown:
        raise _bad(f"unknown fields: {sorted(unknown)}")
    for name in ("name", "credit_limit", "billing_period"):
        if name not in body:
            raise _bad(f"{name} is required")
    period = body["billing_period"].strip().lower() if isinstance(body["billing_period"], str) else None
    if period not in PERIOD_DAYS:
        raise _bad("billing_period is one of daily, weekly, monthly, yearly (any case)")
    days = body.get("validity_days")
    if days is not None and (
        isinstance(days, bool) or not isinstance(days, int) or days not in PERIOD_DAYS[period]
    ):
        allowed = " or ".join(str(d) for d in sorted(PERIOD_DAYS[period]))
        raise _bad(
            f"validity_days is the billing period's length ({allowed} for {period}): a period "
            "here is a calendar period; for another length, choose another billing_period"
        )
    mapped = {"name": body["name"], "credits": body["credit_limit"], "period": period}
    if body.get("description") is not None:
        mapped["description"] = body["description"]
    price = body.get("price", "0")
    mapped["price"] = price
    if not _is_zero(price):
        mapped["currency"] = body.get("currency") or "INR"
    if services.subscriptions is None:  # pragma: no cover - built with every app
        raise ApiError(503, "unavailable", "plans are not running")
    try:
        p = await services.subscriptions.plans.create(mapped)
    except PlanError as exc:
        raise refusal(exc) from None
    v = Plans.view(p)
    return {
        **v,
        "credit_limit": v["credits"],
        "billing_period": p.period,
        "validity_days": days if days is not None else NOMINAL_DAYS[period],
    }


def _is_zero(value: Any) -> bool:
    try:
        return parse_amount(value) == 0
    except (AmountError, ValueError, TypeError):
        return False  # not a number: Plans refuses it with the reason


# -- admin: promos -------------------------------------------------------------------------------

PROMO_FIELDS = {
    "code", "credits", "description", "target_type", "target_user_ids", "max_uses", "max_uses_per_user",
    "valid_from", "valid_until", "is_active",
}  # fmt: skip


def _promos(services: Any) -> Promos:
    if services.promos is None:  # pragma: no cover - built with every app
        raise ApiError(503, "unavailable", "promo codes are not running")
    return services.promos


def promo_view(promos: Promos, p: PromoRecord, claims: int) -> dict[str, Any]:
    """A promo in the old shape (its code is its id), with the gateway's fields beside."""
    return {
        **promos.view(p, claims),
        "id": p.code,
        "target_type": TARGET_ALL if p.target_users is None else TARGET_USERS,
        "target_user_ids": p.target_users or [],
        "is_active": p.active,
        "total_claims": claims,
    }


@router.post("/admin/credits/promos", status_code=201)
async def create_promo(body: dict[str, Any], _: AdminCaller, services: ServicesDep):
    """`{code, credits, description?, target_type: all | specific_users, target_user_ids,
    max_uses?, max_uses_per_user=1, valid_until?, is_active}`."""
    unknown = set(body) - PROMO_FIELDS
    if unknown:
        raise _bad(f"unknown fields: {sorted(unknown)}")
    target = body.get("target_type", TARGET_ALL)
    target = target.strip().lower() if isinstance(target, str) else target
    ids = body.get("target_user_ids") or []
    names = ("code", "credits", "description", "max_uses", "valid_from", "valid_until")
    mapped = {k: body[k] for k in names if k in body}
    per_user = body.get("max_uses_per_user")
    mapped["max_uses_per_user"] = 1 if per_user is None else per_user  # its default, null included
    if target == TARGET_ALL:
        if ids:
            raise _bad("target_user_ids is for target_type specific_users")
    elif target == TARGET_USERS:
        if not isinstance(ids, list) or not ids:
            raise _bad("target_type specific_users needs target_user_ids, a list of user ids")
        mapped["target_users"] = ids
    else:
        raise _bad(f"target_type is {TARGET_ALL} or {TARGET_USERS}")
    if "is_active" in body:
        mapped["active"] = body["is_active"]
    promos = _promos(services)
    try:
        p = await promos.create(mapped)
    except PromoError as exc:
        raise refusal(exc) from None
    return promo_view(promos, p, 0)


@router.get("/admin/credits/promos")
async def list_promos(_: AdminCaller, services: ServicesDep, active_only: bool = True):
    """A JSON list of the promos (only the active ones unless `active_only=false`)."""
    promos = _promos(services)
    items = await services.store.list_promos(active_only=active_only)
    return [promo_view(promos, p, await promos.claims_so_far(p)) for p in items]


@router.post("/admin/credits/promos/{promo_id}/toggle")
async def toggle_promo(promo_id: str, _: AdminCaller, services: ServicesDep):
    """Turns a promo on or off; its id is its code. Not idempotent (it flips): read the
    answer's `is_active`."""
    promos = _promos(services)
    try:
        p = await promos.update(promo_id, {"active": not (await promos.get(promo_id)).active})
    except PromoError as exc:
        raise refusal(exc) from None
    return {"id": p.code, "code": p.code, "is_active": p.active}


# -- the user's payments -----------------------------------------------------------------------


def old_payment(p: PaymentRecord) -> dict[str, Any]:
    return {**payment_view(p), **legacy_fields(p)}


class PaymentCreate(Body):
    amount_inr: Credits
    description: str | None = Field("Credit top-up", max_length=200)
    customer_email: str | None = Field(None, max_length=320)
    customer_phone: str | None = Field(None, max_length=32)
    provider: str = "razorpay"


@router.post("/credits/payments/create")
async def create_payment(body: PaymentCreate, caller: ClientCaller, services: ServicesDep):
    """A top-up of `amount_inr` rupees; answers where to pay (`payment_url`). The credits are
    granted when the provider's signed webhook says it is paid. The customer's e-mail and
    phone are accepted and not kept: the provider's checkout asks for them."""
    if services.payments is None:  # pragma: no cover - built with every app
        raise ApiError(503, "unavailable", "payments are not running")
    try:
        p = await services.payments.create(
            caller.user_id,
            provider=body.provider,
            amount=body.amount_inr,
            currency="INR",
            description=body.description,
        )
    except PaymentError as exc:
        raise refusal(exc) from None
    return {**old_payment(p), "payment_url": p.url}


@router.get("/credits/payments/history")
async def payment_history(
    caller: ClientCaller,
    services: ServicesDep,
    limit: Annotated[int, Query(ge=1, le=200)] = 20,
    skip: Annotated[int, Query(ge=0, le=100_000)] = 0,
):
    """`{payments, total}`, newest first. `skip` pages through the store (cursor pages of
    200 underneath), so a deep skip costs as much as reading that many payments."""
    store, user = services.store, caller.user_id
    seen: list[PaymentRecord] = []
    before: tuple[int, str] | None = None
    total = 0
    while True:
        page = await store.list_payments(user=user, limit=200, before=before)
        if skip <= total + len(page) and len(seen) < limit:
            seen += page[max(skip - total, 0) :]
        total += len(page)
        if len(page) < 200:
            break
        before = (page[-1].created_ms, page[-1].payment_id)
    return {"payments": [old_payment(p) for p in seen[:limit]], "total": total}
