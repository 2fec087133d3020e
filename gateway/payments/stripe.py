"""Stripe Checkout through the official SDK (`stripe`, its asynchronous calls on aiohttp,
with a timeout), and its webhooks: `Stripe-Signature: t=...,v1=...` over `f"{t}.{body}"`,
checked by the SDK in constant time, with a tolerance on the timestamp; deduplicated by
the event's id."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson
import stripe

from gateway.core.store.payments import PaymentRecord

from .providers import Checkout, ProviderError, ProviderEvent, Refund, WebhookRefused


def _obj(doc: dict[str, Any]) -> dict[str, Any]:
    data = doc.get("data")
    obj = data.get("object") if isinstance(data, dict) else None
    return obj if isinstance(obj, dict) else {}


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


class StripeProvider:
    name = "stripe"

    def __init__(
        self,
        api_key: str,
        webhook_secret: str | None,
        *,
        api_base: str | None = None,
        timeout: float = 10.0,
        tolerance: int = 300,
        success_url: str | None = None,
        cancel_url: str | None = None,
    ) -> None:
        self._http = stripe.AIOHTTPClient(timeout=timeout)
        self._client = stripe.StripeClient(
            api_key,
            base_addresses={"api": api_base.rstrip("/")} if api_base else {},
            http_client=self._http,
            max_network_retries=2,  # with the idempotency key below, a retry is the same call
        )
        self._secret = webhook_secret
        self._tolerance = tolerance
        self._success_url = success_url or "https://example.invalid/credits/paid"
        self._cancel_url = cancel_url or "https://example.invalid/credits/cancelled"

    async def create(self, p: PaymentRecord) -> Checkout:
        params: dict[str, Any] = {
            "mode": "payment",
            "line_items": [
                {
                    "price_data": {
                        "currency": p.currency.lower(),
                        "unit_amount": p.amount_minor,
                        "product_data": {"name": (p.description or "Credits")[:250]},
                    },
                    "quantity": 1,
                }
            ],
            "success_url": self._success_url,
            "cancel_url": self._cancel_url,
            "client_reference_id": p.payment_id,
            "metadata": {"payment_id": p.payment_id, "user_id": p.user[:500]},
            # The session's metadata stays on the session; the charge (refunds) gets these.
            "payment_intent_data": {"metadata": {"payment_id": p.payment_id, "user_id": p.user[:500]}},
        }
        try:
            session = await self._client.v1.checkout.sessions.create_async(
                params,  # type: ignore[arg-type]
                options={"idempotency_key": f"checkout-{p.payment_id}"},
            )
        except stripe.StripeError as exc:
            refused = isinstance(exc, stripe.InvalidRequestError)
            message = f"stripe: {type(exc).__name__}: {exc.user_message or exc}"
            raise ProviderError(message, refused=refused) from exc
        return Checkout(url=str(session.url), session_id=str(session.id))

    def verify(self, body: bytes, headers: Mapping[str, str]) -> None:
        if not self._secret:
            raise WebhookRefused("STRIPE_WEBHOOK_SECRET is not set: every delivery is refused")
        header = headers.get("stripe-signature")
        if not header:
            raise WebhookRefused("no Stripe-Signature header")
        try:
            payload = body.decode("utf-8")
        except UnicodeDecodeError:
            raise WebhookRefused("the body is not UTF-8") from None
        try:
            stripe.WebhookSignature.verify_header(payload, header, self._secret, self._tolerance)
        except stripe.SignatureVerificationError as exc:
            raise WebhookRefused(f"signature refused: {exc.user_message or exc}") from None

    def parse(self, body: bytes, headers: Mapping[str, str]) -> ProviderEvent:
        doc = orjson.loads(body)
        if not isinstance(doc, dict) or not _str(doc.get("id")) or not _str(doc.get("type")):
            raise ValueError("not a Stripe event")
        if len(doc["id"]) > 200:
            raise ValueError("an event id longer than 200 characters")
        typ, obj = doc["type"], _obj(doc)
        ev = ProviderEvent(event_id=doc["id"], type=typ, kind="ignored")
        if typ.startswith("checkout.session."):
            meta = _dict(obj.get("metadata"))
            ev.payment_ref = _str(obj.get("client_reference_id")) or _str(meta.get("payment_id"))
            ev.user = _str(meta.get("user_id"))
            ev.session_id = _str(obj.get("id"))
            ev.provider_payment_id = _str(obj.get("payment_intent"))
            ev.amount_minor = _int(obj.get("amount_total"))
            ev.currency = (_str(obj.get("currency")) or "").upper() or None
            paid = obj.get("payment_status") == "paid"  # a top-up always has something to pay
            if typ == "checkout.session.completed":
                ev.kind = "paid" if paid else "ignored"  # an async method pays later
            elif typ == "checkout.session.async_payment_succeeded":
                ev.kind = "paid"
            elif typ == "checkout.session.async_payment_failed":
                ev.kind, ev.error = "failed", "the asynchronous payment failed"
            elif typ == "checkout.session.expired":
                ev.kind = "expired"
        elif typ == "charge.refunded":
            ev.kind = "refund"
            ev.provider_payment_id = _str(obj.get("payment_intent"))
            ev.currency = (_str(obj.get("currency")) or "").upper() or None
            meta = _dict(obj.get("metadata"))
            ev.payment_ref = _str(meta.get("payment_id"))
            # The charge's cumulative amount refunded, in every API version (the refund
            # list is left out since 2022-11-15): the payment service takes back the part
            # not yet taken, recorded once per cumulative figure, so events of either
            # version, in any order or together, take each refund once.
            total = _int(obj.get("amount_refunded"))
            if total is None or not _str(obj.get("id")):
                raise ValueError("a charge.refunded event without its id or amount_refunded")
            ev.refunded_total_minor = total
            ev.refunds = [Refund(f"{obj['id']}@{total}", 0)]
        return ev

    async def refund(self, p: PaymentRecord, amount_minor: int, key: str) -> str:
        if not p.provider_payment_id:
            raise ProviderError("the payment has no Stripe payment intent to refund")
        try:
            refund = await self._client.v1.refunds.create_async(
                {
                    "payment_intent": p.provider_payment_id,
                    "amount": amount_minor,
                    "metadata": {"payment_id": p.payment_id},
                },
                options={"idempotency_key": key},
            )
        except stripe.StripeError as exc:
            raise ProviderError(f"stripe: {type(exc).__name__}: {exc.user_message or exc}") from exc
        return str(refund.id)

    async def lookup(self, p: PaymentRecord) -> ProviderEvent | None:
        if not p.session_id:
            return None
        try:
            s = await self._client.v1.checkout.sessions.retrieve_async(p.session_id)
        except stripe.StripeError as exc:
            raise ProviderError(f"stripe: {type(exc).__name__}: {exc.user_message or exc}") from exc
        if s.payment_status == "paid":
            kind = "paid"
        elif s.status == "expired":
            kind = "expired"
        else:
            return None
        return ProviderEvent(
            event_id=f"lookup:{s.id}:{kind}",
            type=f"lookup.{kind}",
            kind=kind,  # type: ignore[arg-type]
            payment_ref=p.payment_id,
            provider_payment_id=_str(s.payment_intent),
            session_id=s.id,
            amount_minor=s.amount_total,
            currency=(s.currency or "").upper() or None,
        )

    async def close(self) -> None:
        await self._http.close_async()
