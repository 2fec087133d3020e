"""Selling credits: a user's payments (client key + X-User-Id, or the user's own key), the
admin's view and refunds, and the providers' webhooks (signed, never authenticated by key)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from decimal import Decimal
from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Request
from fastapi.responses import JSONResponse

from ...core.money import credits_text
from ...core.store.payments import STATUSES, PaymentRecord
from ...payments.catalog import from_minor
from ...payments.service import PaymentError, Payments
from ..body import DecimalRoute
from ..deps import AdminCaller, ClientCaller, ServicesDep
from ..errors import ApiError, refusal

router = APIRouter(tags=["payments"], route_class=DecimalRoute, strict_content_type=False)

PaymentId = Annotated[str, Path(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
Limit = Annotated[int, Query(ge=1, le=200)]


def _payments(services: Any) -> Payments:
    if services.payments is None:  # pragma: no cover - built with every app
        raise ApiError(503, "unavailable", "payments are not running")
    return services.payments


def _iso(ms: int | None) -> str | None:
    return None if ms is None else datetime.fromtimestamp(ms / 1000, UTC).isoformat().replace("+00:00", "Z")


def view(p: PaymentRecord, *, full: bool = False) -> dict[str, Any]:
    out: dict[str, Any] = {
        "payment_id": p.payment_id,
        "user_id": p.user,
        "provider": p.provider,
        "status": p.status,
        "amount": str(from_minor(p.amount_minor, p.currency)),
        "currency": p.currency,
        "credits": credits_text(p.credits),
        "credited": p.credited_ms is not None,
        "url": p.url,
        "pack": p.pack,
        "description": p.description,
        "created_at": _iso(p.created_ms),
        "paid_at": _iso(p.paid_ms),
        "refunded_amount": str(from_minor(p.refunded_minor, p.currency)),
        "refunded_credits": credits_text(p.refunded_credits),
    }
    if full:
        out.update(
            {
                "link_id": p.link_id,
                "provider_payment_id": p.provider_payment_id,
                "session_id": p.session_id,
                "order_id": p.order_id,
                "credited_at": _iso(p.credited_ms),
                "updated_at": _iso(p.updated_ms),
                "error": p.error,
            }
        )
    return out


def legacy_fields(p: PaymentRecord) -> dict[str, Any]:
    """credit-management's fields of a payment, answered beside `view` where its paths
    and this gateway's meet (routes/compat.py)."""
    amount = str(from_minor(p.amount_minor, p.currency))
    return {
        "id": p.payment_id,
        "provider_payment_id": p.provider_payment_id,
        "provider_payment_link_id": p.link_id or p.session_id,
        "amount_inr": amount if p.currency == "INR" else None,
        "credits_to_add": credits_text(p.credits),
        "credits_added": credits_text(p.credits) if p.credited_ms is not None else "0",
        "payment_method": None,  # not recorded: the provider's checkout chooses it
        "completed_at": _iso(p.paid_ms),
        "error_message": p.error,
    }


def _cursor(cursor: str | None) -> tuple[int, str] | None:
    if cursor is None:
        return None
    ms, sep, pid = cursor.partition(".")
    if not sep or not ms.isdigit() or not pid or len(pid) > 64:
        raise ApiError(400, "invalid_cursor", "cursor must be the next_cursor of a previous page")
    return int(ms), pid


def _page(items: list[PaymentRecord], limit: int, *, full: bool) -> dict[str, Any]:
    nxt = f"{items[-1].created_ms}.{items[-1].payment_id}" if len(items) == limit else None
    return {"payments": [view(p, full=full) for p in items], "next_cursor": nxt}


# -- the user's own ---------------------------------------------------------------------------


@router.post("/credits/payments", status_code=201)
async def create_payment(body: dict[str, Any], caller: ClientCaller, services: ServicesDep):
    """Starts a payment: `{"amount": "500", "currency": "INR", "provider": "razorpay"}` or
    `{"pack": "<name>", "provider": "stripe"}`; answers where the user pays (`url`). The
    credits are granted when the provider's signed webhook says it is paid."""
    unknown = set(body) - {"amount", "currency", "pack", "provider", "description"}
    if unknown:
        raise ApiError(400, "invalid_request", f"unknown fields: {sorted(unknown)}")
    try:
        p = await _payments(services).create(
            caller.user_id,
            provider=body.get("provider"),
            amount=body.get("amount"),
            currency=body.get("currency"),
            pack=body.get("pack"),
            description=body.get("description"),
        )
    except PaymentError as exc:
        raise refusal(exc) from None
    return view(p)


@router.get("/credits/payments")
async def my_payments(
    caller: ClientCaller, services: ServicesDep, limit: Limit = 20, cursor: str | None = None
):
    items = await services.store.list_payments(user=caller.user_id, limit=limit, before=_cursor(cursor))
    return _page(items, limit, full=False)


@router.get("/credits/payments/return", include_in_schema=False)
async def buyer_returns():
    """Where a provider sends the buyer back. It credits nothing (a redirect proves nothing):
    the signed webhook does."""
    return {"status": "received", "message": "Thank you. Your credits appear once the payment is confirmed."}


@router.get("/credits/payments/{payment_id}")
async def my_payment(payment_id: PaymentId, caller: ClientCaller, services: ServicesDep):
    p = await services.store.payment(payment_id)
    if p is None or p.user != caller.user_id:
        raise ApiError(404, "not_found", "no such payment")
    return {**view(p), **legacy_fields(p)}


# -- admin ------------------------------------------------------------------------------------


@router.get("/admin/payments")
async def all_payments(
    _: AdminCaller,
    services: ServicesDep,
    user: str | None = None,
    status: str | None = None,
    provider: str | None = None,
    limit: Limit = 50,
    cursor: str | None = None,
):
    if status is not None and status not in STATUSES:
        raise ApiError(400, "invalid_status", f"status must be one of {', '.join(STATUSES)}")
    items = await services.store.list_payments(
        user=user, status=status, provider=provider, limit=limit, before=_cursor(cursor)
    )
    return _page(items, limit, full=True)


@router.get("/admin/payments/anomalies")
async def payment_anomalies(_: AdminCaller, services: ServicesDep, limit: Limit = 100):
    """The newest anomalies (mismatched or unknown payments, refunds that do not fit, event
    ids reused with another body), with the payment they name, if any."""
    return {
        "anomalies": [
            {"payment_id": a.payment_id, "provider": a.provider, "kind": a.kind, "event_id": a.event_id,
             "detail": a.detail, "at": _iso(a.at_ms)}
            for a in await services.store.recent_anomalies(limit)
        ]
    }  # fmt: skip


@router.get("/admin/payments/{payment_id}")
async def one_payment(payment_id: PaymentId, _: AdminCaller, services: ServicesDep):
    store = services.store
    p = await store.payment(payment_id)
    if p is None:
        raise ApiError(404, "not_found", "no such payment")
    out = view(p, full=True)
    out["events"] = [
        {"event_id": e.event_id, "type": e.type, "received_at": _iso(e.received_ms), "outcome": e.outcome,
         "status_code": e.status_code}
        for e in await store.webhook_events(payment_id)
    ]  # fmt: skip
    out["refunds"] = [
        {"refund_id": r.refund_id, "amount": str(from_minor(r.amount_minor, p.currency)),
         "credits": credits_text(r.credits), "at": _iso(r.at_ms), "debited": r.debited_ms is not None}
        for r in await store.refunds(payment_id)
    ]  # fmt: skip
    out["anomalies"] = [
        {"kind": a.kind, "event_id": a.event_id, "detail": a.detail, "at": _iso(a.at_ms)}
        for a in await store.anomalies(payment_id)
    ]
    return out


@router.post("/admin/payments/{payment_id}/refund", status_code=202)
async def refund_payment(payment_id: PaymentId, _: AdminCaller, services: ServicesDep, request: Request):
    """Asks the provider for a refund (all that is left, or `{"amount": "..."}`); the credits
    are taken back when the provider's refund webhook arrives."""
    raw = await request.body()
    body: Any = {}
    if raw.strip():
        try:
            body = json.loads(raw, parse_float=Decimal)  # JSON numbers read exactly
        except ValueError:
            raise ApiError(400, "invalid_json", "the body is not JSON") from None
    if not isinstance(body, dict) or set(body) - {"amount"}:
        raise ApiError(400, "invalid_request", 'the body is {"amount": "<decimal>"} or empty')
    amount = body.get("amount")
    if amount is not None and (isinstance(amount, bool) or not isinstance(amount, str | int | Decimal)):
        raise ApiError(422, "invalid_amount", 'the amount is a decimal: "12.50" or 12.50')
    try:
        return await _payments(services).request_refund(payment_id, amount)
    except PaymentError as exc:
        raise refusal(exc) from None


# -- the providers' webhooks -------------------------------------------------------------------


async def _webhook(provider: str, request: Request, services: Any) -> JSONResponse:
    body = await request.body()  # the raw bytes: the signature covers them exactly
    headers = {k.lower(): v for k, v in request.headers.items()}
    answer = await _payments(services).webhook(provider, body, headers)
    outcome = str(answer.body.get("status") or answer.body.get("error") or "other")
    services.metrics.webhooks.inc((provider, outcome, str(answer.status)))
    return JSONResponse(answer.body, status_code=answer.status)


@router.post("/webhooks/razorpay", include_in_schema=False)
async def razorpay_webhook(request: Request, services: ServicesDep):
    return await _webhook("razorpay", request, services)


@router.post("/webhooks/stripe", include_in_schema=False)
async def stripe_webhook(request: Request, services: ServicesDep):
    return await _webhook("stripe", request, services)
