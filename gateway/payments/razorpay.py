"""Razorpay payment links through the official SDK (`razorpay`, blocking: run on a thread,
with a timeout), and its webhooks: `X-Razorpay-Signature`, the hex HMAC-SHA256 of the raw
body keyed by the webhook secret, compared in constant time; deduplicated by the
`X-Razorpay-Event-Id` header (the body carries no id)."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
from collections.abc import Mapping
from typing import Any

import orjson
import razorpay
from razorpay.errors import BadRequestError

from gateway.core.store.payments import PaymentRecord

from .providers import Checkout, ProviderError, ProviderEvent, Refund, WebhookRefused

PAID = {"payment_link.paid", "payment.captured", "order.paid"}


def _entity(payload: dict[str, Any], name: str) -> dict[str, Any]:
    part = payload.get(name)
    entity = part.get("entity") if isinstance(part, dict) else None
    return entity if isinstance(entity, dict) else {}


def _notes(entity: dict[str, Any]) -> dict[str, Any]:
    notes = entity.get("notes")
    return notes if isinstance(notes, dict) else {}  # empty notes arrive as []


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


class RazorpayProvider:
    name = "razorpay"

    def __init__(
        self,
        key_id: str,
        key_secret: str,
        webhook_secret: str | None,
        *,
        base_url: str | None = None,
        timeout: float = 10.0,
        callback_url: str | None = None,
    ) -> None:
        options = {"base_url": base_url.rstrip("/")} if base_url else {}
        self._client = razorpay.Client(auth=(key_id, key_secret), **options)
        self._secret = webhook_secret.encode() if webhook_secret else None
        self._timeout = timeout
        self._callback_url = callback_url

    async def _call(self, fn: Any, *args: Any) -> Any:
        try:
            return await asyncio.to_thread(fn, *args, timeout=self._timeout)
        except BadRequestError:
            raise
        except Exception as exc:  # requests' timeouts and connection errors, the SDK's ServerError
            raise ProviderError(f"razorpay: {type(exc).__name__}: {exc}") from exc

    async def create(self, p: PaymentRecord) -> Checkout:
        data: dict[str, Any] = {
            "amount": p.amount_minor,
            "currency": p.currency,
            "reference_id": p.payment_id,  # Razorpay's only create-idempotency: unique per account
            "description": (p.description or "Credit top-up")[:2048],
            "notes": {"payment_id": p.payment_id, "user_id": p.user[:256]},
        }
        if self._callback_url:
            data["callback_url"] = self._callback_url
            data["callback_method"] = "get"
        try:
            link = await self._call(self._client.payment_link.create, data)
        except BadRequestError as exc:
            # A create that timed out may have been made: the reference id finds it.
            found = await self._by_reference(p.payment_id)
            if found is None:
                raise ProviderError(f"razorpay refused the payment link: {exc}", refused=True) from exc
            link = found
        return Checkout(url=str(link["short_url"]), link_id=str(link["id"]))

    async def _by_reference(self, reference: str) -> dict[str, Any] | None:
        try:
            got = await self._call(self._client.payment_link.all, {"reference_id": reference})
        except BadRequestError:
            return None
        links = got.get("payment_links") if isinstance(got, dict) else None
        return links[0] if links else None

    def verify(self, body: bytes, headers: Mapping[str, str]) -> None:
        if self._secret is None:
            raise WebhookRefused("RAZORPAY_WEBHOOK_SECRET is not set: every delivery is refused")
        sig = headers.get("x-razorpay-signature")
        if not sig:
            raise WebhookRefused("no X-Razorpay-Signature header")
        expected = hmac.new(self._secret, body, hashlib.sha256).hexdigest()
        if not hmac.compare_digest(expected.encode(), sig.strip().encode("ascii", "replace")):
            raise WebhookRefused("the signature does not match the body")

    def parse(self, body: bytes, headers: Mapping[str, str]) -> ProviderEvent:
        doc = orjson.loads(body)
        if not isinstance(doc, dict) or not isinstance(doc.get("event"), str):
            raise ValueError("not a Razorpay event")
        # Razorpay puts the event id in a header only; without one, the body's digest.
        event_id = headers.get("x-razorpay-event-id") or "sha256:" + hashlib.sha256(body).hexdigest()
        if len(event_id) > 200:
            raise ValueError("an X-Razorpay-Event-Id longer than 200 characters")
        raw_payload = doc.get("payload")
        payload: dict[str, Any] = raw_payload if isinstance(raw_payload, dict) else {}
        link, pay = _entity(payload, "payment_link"), _entity(payload, "payment")
        refund, order = _entity(payload, "refund"), _entity(payload, "order")
        typ = doc["event"]
        ref = link.get("reference_id") or _notes(link).get("payment_id") or _notes(pay).get("payment_id")
        user = _notes(link).get("user_id") or _notes(pay).get("user_id")
        ev = ProviderEvent(
            event_id=event_id,
            type=typ,
            kind="ignored",
            payment_ref=str(ref) if ref else None,
            provider_payment_id=pay.get("id") or refund.get("payment_id"),
            link_id=link.get("id"),
            order_id=pay.get("order_id") or order.get("id"),
            user=str(user) if user else None,
        )
        if typ in PAID:
            ev.kind = "paid"
            if typ == "payment_link.paid":
                ev.amount_minor, ev.currency = _int(link.get("amount_paid")), link.get("currency")
            else:
                ev.amount_minor, ev.currency = _int(pay.get("amount")), pay.get("currency")
        elif typ == "payment.failed":
            ev.kind = "failed"
            ev.error = str(pay.get("error_description") or pay.get("error_code") or "failed")[:500]
        elif typ == "payment_link.expired":
            ev.kind = "expired"
        elif typ == "payment_link.cancelled":
            ev.kind = "cancelled"
        elif typ == "refund.processed":
            ev.kind = "refund"
            amount = _int(refund.get("amount"))
            if not refund.get("id") or amount is None:
                raise ValueError("a refund event without its refund id or amount")
            ev.refunds = [Refund(str(refund["id"]), amount)]
            ev.currency = refund.get("currency") or pay.get("currency")
        return ev

    async def refund(self, p: PaymentRecord, amount_minor: int, key: str) -> str:
        if not p.provider_payment_id:
            raise ProviderError("the payment has no captured Razorpay payment to refund")
        try:
            got = await self._call(
                self._client.payment.refund,
                p.provider_payment_id,
                {"amount": amount_minor, "notes": {"payment_id": p.payment_id, "key": key}},
            )
        except BadRequestError as exc:
            raise ProviderError(f"razorpay refused the refund: {exc}") from exc
        return str(got["id"])

    async def lookup(self, p: PaymentRecord) -> ProviderEvent | None:
        link = None
        if p.link_id:
            try:
                link = await self._call(self._client.payment_link.fetch, p.link_id)
            except BadRequestError:
                link = None
        if link is None:
            link = await self._by_reference(p.payment_id)
        if not isinstance(link, dict):
            return None
        status = link.get("status")
        kind = {"paid": "paid", "expired": "expired", "cancelled": "cancelled"}.get(str(status))
        if kind is None:
            return None
        raw_pays = link.get("payments")
        pays: list[Any] = raw_pays if isinstance(raw_pays, list) else []
        captured = next((x for x in pays if isinstance(x, dict) and x.get("status") == "captured"), None)
        return ProviderEvent(
            event_id=f"lookup:{link.get('id')}:{status}",
            type=f"lookup.{status}",
            kind=kind,  # type: ignore[arg-type]
            payment_ref=p.payment_id,
            provider_payment_id=(captured or {}).get("payment_id"),
            link_id=link.get("id"),
            amount_minor=_int(link.get("amount_paid")),
            currency=link.get("currency"),
        )
