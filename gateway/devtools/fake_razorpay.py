"""A fake Razorpay Payment Links API, in memory, for local tests and demos. It is not a payment
provider: no money moves, nothing is persisted, and it knows only the calls the gateway makes.

The official SDK talks to it unchanged::

    razorpay.Client(auth=(key_id, key_secret), base_url="http://127.0.0.1:9001")

(no trailing slash and no /v1: the SDK appends "/v1/payment_links" to base_url as it is).

HTTP (Basic auth, key_id:key_secret; errors in Razorpay's shape {"error": {"code", "description"}}):
  POST /v1/payment_links                 create (a reused reference_id is refused, as Razorpay does)
  GET  /v1/payment_links                 list, ?reference_id= / ?payment_id= filters
  GET  /v1/payment_links/{id}            fetch
  POST /v1/payment_links/{id}/cancel     cancel an unpaid link
  GET  /v1/payments/{id}                 fetch a payment
  POST /v1/payments/{id}/refund          refund (all or `amount` of what is left)
Without auth, for a person trying a demo in a browser:
  GET  /pay/{id}   the link's short_url: a page with Pay / Fail buttons (POST /pay/{id}), which
                   deliver the resulting webhooks to --webhook-url (if given) and redirect to the
                   link's callback_url with Razorpay's signed query parameters.

Tests drive payments from Python through `app[STATE]` (also `app["state"]`), a RazorpayState:
`pay()`, `fail()`, `expire()` and `refund_event()` change the state and answer the webhook bodies
Razorpay would send; `sign()` gives their X-Razorpay-Signature and `webhook_request()` the raw body
and headers to POST.

    python -m gateway.devtools.fake_razorpay --port 9001 --key-id rzp_test_x --key-secret s \\
        [--webhook-url http://127.0.0.1:8080/... --webhook-secret whs]
"""

from __future__ import annotations

import base64
import binascii
import copy
import hashlib
import hmac
import json
import re
import secrets
import time
import urllib.parse
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

from aiohttp import web

from gateway.devtools import fake_provider

Entity = dict[str, Any]

# What POST /v1/payment_links accepts; anything else is refused, as Razorpay refuses it.
_CREATE_FIELDS = frozenset(
    {
        "amount",
        "currency",
        "accept_partial",
        "first_min_partial_amount",
        "expire_by",
        "reference_id",
        "description",
        "customer",
        "notify",
        "reminder_enable",
        "notes",
        "callback_url",
        "callback_method",
        "upi_link",
        "options",
    }
)
_MIN_EXPIRY_SECONDS = 15 * 60
_OPEN = ("created", "partially_paid")


def _random_id(prefix: str, n: int = 14) -> str:
    return fake_provider.random_id(prefix, n)


def _php_notes(notes: Mapping[str, Any] | None) -> Any:
    """Razorpay (PHP) serialises an empty notes map as a JSON array."""
    return dict(notes) if notes else []


def sign(body: bytes, secret: str) -> str:
    """The X-Razorpay-Signature of a webhook body: hex HMAC-SHA256 of the raw bytes, keyed by the
    webhook secret (what razorpay.Client().utility.verify_webhook_signature checks)."""
    return hmac.new(secret.encode("utf-8"), body, hashlib.sha256).hexdigest()


def webhook_request(
    event: Mapping[str, Any], secret: str, *, event_id: str | None = None
) -> tuple[bytes, dict[str, str]]:
    """The raw body and headers Razorpay would POST for `event`. The X-Razorpay-Event-Id
    defaults to one derived from the body, so a re-sent event carries the same id (as a retried
    delivery does)."""
    body = json.dumps(event, separators=(",", ":")).encode("utf-8")
    if event_id is None:
        digest = hashlib.sha256(body).digest()
        event_id = "".join(fake_provider.ALNUM[b % len(fake_provider.ALNUM)] for b in digest[:14])
    headers = {
        "Content-Type": "application/json",
        "X-Razorpay-Signature": sign(body, secret),
        "X-Razorpay-Event-Id": event_id,
        "User-Agent": "Razorpay-Webhook/v1",
    }
    return body, headers


class RazorpayError(Exception):
    """An API error, answered as {"error": {"code": ..., "description": ...}}."""

    def __init__(self, description: str, *, status: int = 400, field: str | None = None) -> None:
        super().__init__(description)
        self.description = description
        self.status = status
        self.field = field


class RazorpayState(fake_provider.ProviderState):
    """Everything the fake holds, and the helpers tests use to play the customer's part."""

    event_name_field: ClassVar[str] = "event"

    def __init__(
        self,
        key_id: str,
        key_secret: str,
        *,
        account_id: str = "acc_FakeRzp0000001",
        webhook_url: str | None = None,
        webhook_secret: str | None = None,
        public_url: str | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(
            webhook_url=webhook_url, webhook_secret=webhook_secret, public_url=public_url, clock=clock
        )
        self.key_id = key_id
        self.key_secret = key_secret
        self.account_id = account_id
        # Razorpay's sample payment_link.paid payload carries the link's notes on the order and
        # leaves the payment's notes empty ([]); set this to copy them onto the payment too.
        self.copy_notes_to_payment = False
        self.links: dict[str, Entity] = {}
        self.payments: dict[str, Entity] = {}
        self.orders: dict[str, Entity] = {}
        self.refunds: dict[str, Entity] = {}
        # The payment as it stood right after each refund (refund id -> snapshot).
        self._refunded_payment: dict[str, Entity] = {}
        self.requests: list[tuple[str, str]] = []

    # -- counters ------------------------------------------------------------------------------

    @property
    def create_calls(self) -> int:
        """POST /v1/payment_links requests received (refused ones included)."""
        return self.calls["payment_links.create"]

    # -- entities ------------------------------------------------------------------------------

    def link(self, link_id: str) -> Entity:
        link = self.links.get(link_id)
        if link is None:
            raise RazorpayError("The id provided does not exist", field="id")
        self._expire_if_due(link)
        return link

    def payment(self, payment_id: str) -> Entity:
        payment = self.payments.get(payment_id)
        if payment is None:
            raise RazorpayError("The id provided does not exist", field="id")
        return payment

    def _expire_if_due(self, link: Entity) -> None:
        expire_by = link.get("expire_by") or 0
        if link["status"] in _OPEN and expire_by and self.now() >= expire_by:
            link["status"] = "expired"
            link["expired_at"] = expire_by
            link["updated_at"] = self.now()

    def create_link(self, body: Mapping[str, Any], base_url: str) -> Entity:
        unknown = sorted(set(body) - _CREATE_FIELDS)
        if unknown:
            raise RazorpayError(f"{', '.join(unknown)} is/are not required and should not be sent")
        currency = body.get("currency", "INR")
        if not isinstance(currency, str) or not re.fullmatch(r"[A-Z]{3}", currency):
            raise RazorpayError("The selected currency is invalid.", field="currency")
        amount = body.get("amount")
        if amount is None:
            raise RazorpayError("The amount field is required.", field="amount")
        if not isinstance(amount, int) or isinstance(amount, bool):
            raise RazorpayError("The amount must be an integer.", field="amount")
        if amount < 100:
            raise RazorpayError(f"The amount must be atleast {currency} 1.00", field="amount")
        reference_id = body.get("reference_id")
        if reference_id is not None:
            if not isinstance(reference_id, str):
                raise RazorpayError("The reference id must be a string.", field="reference_id")
            if len(reference_id) > 40:
                raise RazorpayError(
                    "The reference id may not be greater than 40 characters.", field="reference_id"
                )
            if any(link.get("reference_id") == reference_id for link in self.links.values()):
                raise RazorpayError(
                    f"Payment Link with reference id {reference_id} already exists", field="reference_id"
                )
        description = body.get("description", "")
        if not isinstance(description, str) or len(description) > 2048:
            raise RazorpayError(
                "The description must be a string of at most 2048 characters.", field="description"
            )
        notes = body.get("notes") or {}
        if not isinstance(notes, dict):
            raise RazorpayError("The notes must be an object.", field="notes")
        if len(notes) > 15:
            raise RazorpayError("Number of fields in notes should be less than or equal to 15", field="notes")
        for key, value in notes.items():
            if not isinstance(value, str | int | float) or isinstance(value, bool) or len(str(value)) > 256:
                raise RazorpayError(
                    f"notes.{key} must be a string or number of at most 256 characters", field="notes"
                )
        callback_url = body.get("callback_url", "")
        callback_method = body.get("callback_method", "")
        if not isinstance(callback_url, str):
            raise RazorpayError("The callback url must be a string.", field="callback_url")
        if callback_url and callback_method != "get":
            raise RazorpayError("callback_method should be get", field="callback_method")
        if callback_method and not callback_url:
            raise RazorpayError(
                "The callback url field is required when callback method is present.", field="callback_url"
            )
        now = self.now()
        expire_by = body.get("expire_by", 0)
        if not isinstance(expire_by, int) or isinstance(expire_by, bool):
            raise RazorpayError("The expire by must be an integer.", field="expire_by")
        if expire_by and expire_by < now + _MIN_EXPIRY_SECONDS:
            raise RazorpayError(
                "The expire by date should be at least 15 minutes after current time", field="expire_by"
            )
        customer = body.get("customer") or {}
        notify = body.get("notify") or {}
        if not isinstance(customer, dict) or not isinstance(notify, dict):
            raise RazorpayError("The customer and notify fields must be objects.")
        link_id = _random_id("plink")
        link: Entity = {
            "accept_partial": bool(body.get("accept_partial", False)),
            "amount": amount,
            "amount_paid": 0,
            "callback_method": callback_method,
            "callback_url": callback_url,
            "cancelled_at": 0,
            "created_at": now,
            "currency": currency,
            "customer": dict(customer),
            "description": description,
            "expire_by": expire_by,
            "expired_at": 0,
            "first_min_partial_amount": int(body.get("first_min_partial_amount", 0) or 0),
            "id": link_id,
            "notes": _php_notes(notes),
            "notify": {"email": bool(notify.get("email", False)), "sms": bool(notify.get("sms", False))},
            "payments": None,
            "reference_id": reference_id or "",
            "reminder_enable": bool(body.get("reminder_enable", False)),
            "reminders": [],
            "short_url": self.pay_url(link_id, base_url),
            "status": "created",
            "updated_at": now,
            "upi_link": bool(body.get("upi_link", False)),
            "user_id": "",
            "whatsapp_link": False,
        }
        self.links[link_id] = link
        return link

    def cancel_link(self, link_id: str) -> Entity:
        link = self.link(link_id)
        if link["status"] not in _OPEN:
            raise RazorpayError(f"Payment Link cannot be cancelled as it is in {link['status']} state")
        now = self.now()
        link.update(status="cancelled", cancelled_at=now, updated_at=now)
        self._event("payment_link.cancelled", payment_link=link)
        return link

    def refund_payment(self, payment_id: str, body: Mapping[str, Any]) -> Entity:
        payment = self.payment(payment_id)
        if payment["status"] not in ("captured", "refunded"):
            raise RazorpayError("The payment has not been captured, so it cannot be refunded")
        left = payment["amount"] - payment["amount_refunded"]
        if left <= 0:
            raise RazorpayError("The payment has been fully refunded already")
        amount = body.get("amount", left)
        if not isinstance(amount, int) or isinstance(amount, bool) or amount <= 0:
            raise RazorpayError("The amount must be a positive integer.", field="amount")
        if amount > left:
            raise RazorpayError(
                f"The refund amount provided ({amount}) is greater than the unrefunded amount ({left})",
                field="amount",
            )
        now = self.now()
        refund: Entity = {
            "id": _random_id("rfnd"),
            "entity": "refund",
            "amount": amount,
            "currency": payment["currency"],
            "payment_id": payment_id,
            "notes": _php_notes(body.get("notes")),
            "receipt": body.get("receipt"),
            "acquirer_data": {"arn": None},
            "created_at": now,
            "batch_id": None,
            "status": "processed",
            "speed_processed": "normal",
            "speed_requested": body.get("speed", "normal"),
        }
        payment["amount_refunded"] += amount
        full = payment["amount_refunded"] == payment["amount"]
        payment["refund_status"] = "full" if full else "partial"
        if full:
            payment["status"] = "refunded"
        self.refunds[refund["id"]] = refund
        self._refunded_payment[refund["id"]] = copy.deepcopy(payment)
        return refund

    # -- test helpers: the customer's part, and the webhooks that follow ------------------------

    def _event(self, name: str, **entities: Mapping[str, Any]) -> Entity:
        event: Entity = {
            "entity": "event",
            "account_id": self.account_id,
            "event": name,
            "contains": list(entities),
            "payload": {kind: {"entity": copy.deepcopy(dict(e))} for kind, e in entities.items()},
            "created_at": self.now(),
        }
        self.events.append(event)
        return event

    def _order_for(self, link: Entity) -> Entity:
        order_id = link.get("order_id")
        if order_id:
            return self.orders[order_id]
        order: Entity = {
            "id": _random_id("order"),
            "entity": "order",
            "amount": link["amount"],
            "amount_paid": 0,
            "amount_due": link["amount"],
            "currency": link["currency"],
            "receipt": link["reference_id"] or None,
            "offer_id": None,
            "status": "created",
            "attempts": 0,
            "notes": copy.deepcopy(link["notes"]),
            "created_at": self.now(),
        }
        self.orders[order["id"]] = order
        link["order_id"] = order["id"]
        return order

    def _new_payment(self, link: Entity, order: Entity, amount: int, method: str) -> Entity:
        customer = link["customer"] or {}
        fee = amount * 2 // 100
        payment: Entity = {
            "id": _random_id("pay"),
            "entity": "payment",
            "amount": amount,
            "currency": link["currency"],
            "status": "created",
            "order_id": order["id"],
            "invoice_id": None,
            "international": False,
            "method": method,
            "amount_refunded": 0,
            "amount_transferred": 0,
            "refund_status": None,
            "captured": False,
            "description": "#" + link["id"].removeprefix("plink_"),
            "card_id": None,
            "bank": None,
            "wallet": None,
            "vpa": "success@razorpay" if method == "upi" else None,
            "email": customer.get("email", "void@razorpay.com"),
            "contact": customer.get("contact", "+919000090000"),
            "notes": copy.deepcopy(link["notes"]) if self.copy_notes_to_payment else [],
            "fee": fee,
            "tax": fee * 18 // 118,
            "error_code": None,
            "error_description": None,
            "error_source": None,
            "error_step": None,
            "error_reason": None,
            "acquirer_data": {"rrn": str(secrets.randbelow(10**12)).zfill(12)},
            "created_at": self.now(),
        }
        order["attempts"] += 1
        order["status"] = "attempted"
        self.payments[payment["id"]] = payment
        return payment

    def pay(self, link_id: str, *, amount: int | None = None, method: str = "upi") -> dict[str, Entity]:
        """The customer pays `amount` (default: what is left) through the link: the payment is
        captured and the link marked paid (or partially_paid, if it accepts partial payments).
        Answers the webhook bodies Razorpay sends, by event name, in the order it sends them:
        payment.authorized, payment.captured, order.paid (once the order is fully paid), and
        payment_link.paid or payment_link.partially_paid."""
        link = self.link(link_id)
        if link["status"] not in _OPEN:
            raise ValueError(f"payment link {link_id} is {link['status']}")
        left = link["amount"] - link["amount_paid"]
        amount = left if amount is None else amount
        if not 0 < amount <= left:
            raise ValueError(f"amount {amount} is not within 1..{left}")
        if amount < left and not link["accept_partial"]:
            raise ValueError(f"payment link {link_id} does not accept partial payments")
        order = self._order_for(link)
        payment = self._new_payment(link, order, amount, method)
        events: dict[str, Entity] = {}
        payment.update(status="authorized")
        events["payment.authorized"] = self._event("payment.authorized", payment=payment)
        payment.update(status="captured", captured=True)
        events["payment.captured"] = self._event("payment.captured", payment=payment)

        now = self.now()
        order["amount_paid"] += amount
        order["amount_due"] = order["amount"] - order["amount_paid"]
        link["amount_paid"] += amount
        link["payments"] = [
            *(link["payments"] or []),
            {
                "amount": amount,
                "created_at": now,
                "method": method,
                "payment_id": payment["id"],
                "plink_id": link_id,
                "status": "captured",
                "updated_at": now,
            },
        ]
        link["updated_at"] = now
        if link["amount_paid"] == link["amount"]:
            order["status"] = "paid"
            link["status"] = "paid"
            events["order.paid"] = self._event("order.paid", payment=payment, order=order)
            name = "payment_link.paid"
        else:
            link["status"] = "partially_paid"
            name = "payment_link.partially_paid"
        events[name] = self._event(name, payment_link=link, order=order, payment=payment)
        return events

    def fail(self, link_id: str, *, method: str = "upi") -> Entity:
        """A payment attempt on the link fails; the link stays payable. Answers the
        payment.failed webhook body."""
        link = self.link(link_id)
        if link["status"] not in _OPEN:
            raise ValueError(f"payment link {link_id} is {link['status']}")
        order = self._order_for(link)
        payment = self._new_payment(link, order, link["amount"] - link["amount_paid"], method)
        payment.update(
            status="failed",
            error_code="BAD_REQUEST_ERROR",
            error_description="Payment was unsuccessful as the customer cancelled it.",
            error_source="customer",
            error_step="payment_authentication",
            error_reason="payment_cancelled",
        )
        return self._event("payment.failed", payment=payment)

    def expire(self, link_id: str) -> Entity:
        """The link expires now. Answers the payment_link.expired webhook body."""
        link = self.link(link_id)
        if link["status"] not in _OPEN:
            raise ValueError(f"payment link {link_id} is {link['status']}")
        now = self.now()
        link.update(status="expired", expired_at=now, updated_at=now)
        return self._event("payment_link.expired", payment_link=link)

    def refund_event(self, refund: str | Mapping[str, Any]) -> Entity:
        """The refund.processed webhook body for a refund made through the API (its id, or the
        refund entity the SDK answered), with the payment as it stood after that refund."""
        refund_id = refund if isinstance(refund, str) else str(refund["id"])
        if refund_id not in self.refunds:
            raise KeyError(refund_id)
        return self._event(
            "refund.processed",
            refund=self.refunds[refund_id],
            payment=self._refunded_payment[refund_id],
        )

    def callback_params(self, link_id: str, payment_id: str) -> dict[str, str]:
        """The query parameters Razorpay adds to the link's callback_url after a payment, with
        the signature razorpay.Client().utility.verify_payment_link_signature checks."""
        link = self.links[link_id]
        message = f"{link_id}|{link['reference_id']}|{link['status']}|{payment_id}"
        signature = hmac.new(self.key_secret.encode(), message.encode(), hashlib.sha256).hexdigest()
        return {
            "razorpay_payment_id": payment_id,
            "razorpay_payment_link_id": link_id,
            "razorpay_payment_link_reference_id": link["reference_id"],
            "razorpay_payment_link_status": link["status"],
            "razorpay_signature": signature,
        }

    def signed_webhook(self, event: Mapping[str, Any], secret: str) -> tuple[bytes, dict[str, str]]:
        return webhook_request(event, secret)


STATE: web.AppKey[RazorpayState] = web.AppKey("state", RazorpayState)


def _error(status: int, description: str, field: str | None = None) -> web.Response:
    error: Entity = {
        "code": "BAD_REQUEST_ERROR",
        "description": description,
        "source": "NA",
        "step": "NA",
        "reason": "NA",
        "metadata": {},
    }
    if field:
        error["field"] = field
    return web.json_response({"error": error}, status=status)


def _authorised(request: web.Request, state: RazorpayState) -> bool:
    scheme, _, value = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "basic":
        return False
    try:
        given = base64.b64decode(value, validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return False
    expected = f"{state.key_id}:{state.key_secret}"
    return hmac.compare_digest(given.encode(), expected.encode())


async def _api(request: web.Request, handler: fake_provider.Handler) -> web.StreamResponse:
    state = request.app[STATE]
    state.requests.append((request.method, request.path_qs))
    if not _authorised(request, state):
        return _error(401, "Authentication failed")
    try:
        return await handler(request)
    except RazorpayError as e:
        return _error(e.status, e.description, e.field)
    except web.HTTPNotFound:
        return _error(
            404, f"The requested URL was not found on the server ({request.method} {request.path})."
        )
    except web.HTTPMethodNotAllowed:
        return _error(
            405, f"The requested method is not allowed for this URL ({request.method} {request.path})."
        )


async def _json_body(request: web.Request) -> Entity:
    raw = await request.read()
    if not raw:
        return {}
    try:
        body = json.loads(raw)
    except ValueError:
        raise RazorpayError("The request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise RazorpayError("The request body must be a JSON object")
    return body


async def _create_link(request: web.Request) -> web.Response:
    state = request.app[STATE]
    body = await _json_body(request)
    return web.json_response(state.create_link(body, fake_provider.base_url(request)))


async def _list_links(request: web.Request) -> web.Response:
    state = request.app[STATE]
    reference_id = request.query.get("reference_id")
    payment_id = request.query.get("payment_id")
    found = []
    for link in reversed(list(state.links.values())):
        state._expire_if_due(link)
        if reference_id is not None and link["reference_id"] != reference_id:
            continue
        if payment_id is not None and not any(p["payment_id"] == payment_id for p in link["payments"] or []):
            continue
        found.append(link)
    return web.json_response({"payment_links": found})


async def _refund_payment(request: web.Request) -> web.Response:
    state = request.app[STATE]
    body = await _json_body(request)
    return web.json_response(state.refund_payment(request.match_info["id"], body))


_MISSING_LINK = "no such payment link"


async def _pay_page(request: web.Request) -> web.Response:
    state = request.app[STATE]
    link = state.links[fake_provider.page_id(request, state.links, _MISSING_LINK)]
    state._expire_if_due(link)
    left = link["amount"] - link["amount_paid"]
    return fake_provider.pay_page(
        title="Fake Razorpay",
        heading=link["description"] or link["id"],
        amount=f"{left / 100:.2f} {link['currency']}",
        status=link["status"],
        other="fail",
    )


async def _pay_submit(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    link_id, action = await fake_provider.pay_form(request, state.links, _MISSING_LINK)
    events = await fake_provider.settle(
        state, lambda: [state.fail(link_id)] if action == "fail" else list(state.pay(link_id).values())
    )
    link = state.links[link_id]
    payment_id = str(events[-1]["payload"]["payment"]["entity"]["id"])
    if link["callback_url"] and link["status"] in ("paid", "partially_paid"):
        query = urllib.parse.urlencode(state.callback_params(link_id, payment_id))
        sep = "&" if "?" in link["callback_url"] else "?"
        raise web.HTTPSeeOther(f"{link['callback_url']}{sep}{query}")
    return web.Response(text=f"payment {payment_id}: link {link['status']}")


def make_app(
    key_id: str,
    key_secret: str,
    *,
    webhook_url: str | None = None,
    webhook_secret: str | None = None,
    public_url: str | None = None,
) -> web.Application:
    """The fake's aiohttp application; its RazorpayState is app[STATE] (also app["state"])."""
    state = RazorpayState(
        key_id, key_secret, webhook_url=webhook_url, webhook_secret=webhook_secret, public_url=public_url
    )
    routes = [
        web.post("/v1/payment_links", _create_link, name="payment_links.create"),
        web.get("/v1/payment_links", _list_links, name="payment_links.all"),
        web.get(
            "/v1/payment_links/{id}",
            fake_provider.by_id(STATE, RazorpayState.link),
            name="payment_links.fetch",
        ),
        web.post(
            "/v1/payment_links/{id}/cancel",
            fake_provider.by_id(STATE, RazorpayState.cancel_link),
            name="payment_links.cancel",
        ),
        web.get(
            "/v1/payments/{id}", fake_provider.by_id(STATE, RazorpayState.payment), name="payments.fetch"
        ),
        web.post("/v1/payments/{id}/refund", _refund_payment, name="payments.refund"),
    ]
    return fake_provider.provider_app(STATE, state, _api, routes, pay_page=_pay_page, pay_submit=_pay_submit)


def main(argv: list[str] | None = None) -> int:
    args = fake_provider.parse_args(
        argv,
        description="fake Razorpay Payment Links API (local tests and demos; not a payment provider)",
        port=9001,
        credentials={"--key-id": "rzp_test_fake", "--key-secret": "fake_secret"},
        secret_help="sign them with this secret",
        public_url_help="base of short_url (default: the address a request used)",
    )
    app = make_app(
        args.key_id,
        args.key_secret,
        webhook_url=args.webhook_url,
        webhook_secret=args.webhook_secret,
        public_url=args.public_url,
    )
    return fake_provider.serve(
        app,
        args,
        f"fake Razorpay on http://{args.host}:{args.port} (key id {args.key_id}); "
        f'razorpay.Client(auth=(key_id, key_secret), base_url="http://{args.host}:{args.port}")',
    )


if __name__ == "__main__":
    raise SystemExit(main())
