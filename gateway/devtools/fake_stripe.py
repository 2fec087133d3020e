"""A fake Stripe API (Checkout Sessions, PaymentIntents, refunds), in memory, for local tests and
demos. It is not a payment provider: no money moves, nothing is persisted, and it knows only the
calls the gateway makes.

The official SDK talks to it unchanged::

    stripe.StripeClient(api_key, base_addresses={"api": "http://127.0.0.1:9002"})

(no trailing slash: the SDK appends "/v1/..." to the base address as it is).

HTTP (Bearer auth with the API key; form-encoded bodies with bracketed keys, as the SDK sends them;
every answer carries a Request-Id; errors in Stripe's shape {"error": {"type", "message", ...}}):
  POST /v1/checkout/sessions             create (mode=payment, line_items[][price_data], ...)
  GET  /v1/checkout/sessions/{id}        retrieve
  POST /v1/checkout/sessions/{id}/expire expire an open session
  GET  /v1/payment_intents/{id}          retrieve
  GET  /v1/charges/{id}                  retrieve
  POST /v1/refunds                       refund a payment_intent (or charge), all or `amount`
  GET  /v1/refunds/{id}                  retrieve
Every POST honours Idempotency-Key as Stripe does (the SDK sends a fresh one on each call): the
same key and parameters answer the first result again (Idempotent-Replayed: true); the same key
with other parameters or on another endpoint is refused with a 400 idempotency_error.
Without auth, for a person trying a demo in a browser:
  GET  /pay/{id}   the session's url: a page with Pay / Cancel buttons (POST /pay/{id}); paying
                   delivers the webhooks to --webhook-url (if given) and redirects to success_url.

Tests drive payments from Python through `app[STATE]` (also `app["state"]`), a StripeState:
`pay()`, `pay_async()` + `async_payment_succeeded()` / `async_payment_failed()`, `expire_event()`
and `refund_event()` change the state and answer the event objects Stripe would send; `sign()`
gives their Stripe-Signature header and `webhook_request()` the raw body and headers to POST.

    python -m gateway.devtools.fake_stripe --port 9002 --api-key sk_test_x \\
        [--webhook-url http://127.0.0.1:8080/... --webhook-secret whsec_x]
"""

from __future__ import annotations

import copy
import hmac
import json
import re
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import stripe
from aiohttp import web

from gateway.devtools import fake_provider

Obj = dict[str, Any]

_IDEMPOTENCY_TTL = 24 * 3600
# The top-level parameters POST /v1/checkout/sessions accepts here; Stripe refuses unknown ones.
_SESSION_PARAMS = frozenset(
    {
        "mode",
        "line_items",
        "success_url",
        "cancel_url",
        "client_reference_id",
        "metadata",
        "expires_at",
        "customer",
        "customer_email",
        "customer_creation",
        "payment_intent_data",
        "payment_method_types",
        "locale",
        "submit_type",
        "allow_promotion_codes",
        "billing_address_collection",
        "ui_mode",
        "expand",
    }
)
# Stripe's minimum charge, in the smallest unit, for a few currencies (others: 50).
_MINIMUM_CHARGE = {"usd": 50, "eur": 50, "gbp": 30, "inr": 50, "jpy": 50, "cad": 50, "aud": 50}
_ZERO_DECIMAL = frozenset({"jpy", "krw", "vnd", "clp", "isk", "ugx", "xaf", "xof"})


def _random_id(prefix: str, n: int = 24) -> str:
    return fake_provider.random_id(prefix, n)


def _money(amount: int, currency: str) -> str:
    if currency in _ZERO_DECIMAL:
        return f"{amount} {currency}"
    return f"${amount / 100:.2f}" if currency == "usd" else f"{amount / 100:.2f} {currency}"


def sign(payload: str, secret: str, timestamp: int | None = None) -> str:
    """The Stripe-Signature header of a webhook payload (t=<unix>,v1=<hex HMAC-SHA256 of
    "<t>.<payload>" keyed by the whole secret>), made by the SDK's own
    stripe.WebhookSignature.generate_signature_header."""
    return str(stripe.WebhookSignature.generate_signature_header(payload, secret, timestamp))


def webhook_request(event: Mapping[str, Any], secret: str) -> tuple[bytes, dict[str, str]]:
    """The raw body and headers Stripe would POST for `event`. Stripe sends pretty-printed JSON,
    so this does too: a receiver must verify the raw bytes, not a re-serialisation."""
    payload = json.dumps(event, indent=2)
    headers = {
        "Content-Type": "application/json; charset=utf-8",
        "Stripe-Signature": sign(payload, secret),
        "User-Agent": "Stripe/1.0 (+https://stripe.com/docs/webhooks)",
    }
    return payload.encode("utf-8"), headers


class StripeError(Exception):
    """An API error, answered as {"error": {"type", "message", "code"?, "param"?}}."""

    def __init__(
        self,
        message: str,
        *,
        status: int = 400,
        type: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.type = type
        self.code = code
        self.param = param

    def body(self, request_id: str) -> Obj:
        error: Obj = {"type": self.type, "message": self.message}
        if self.code:
            error["code"] = self.code
            error["doc_url"] = f"https://stripe.com/docs/error-codes/{self.code.replace('_', '-')}"
        if self.param:
            error["param"] = self.param
        error["request_log_url"] = f"https://dashboard.stripe.com/test/logs/{request_id}"
        return {"error": error}


def _find(objects: Mapping[str, Obj], object_id: str, kind: str, param: str) -> Obj:
    """objects[object_id], or Stripe's 404 resource_missing error naming `kind` and `param`."""
    found = objects.get(object_id)
    if found is None:
        raise StripeError(f"No such {kind}: '{object_id}'", status=404, code="resource_missing", param=param)
    return found


def parse_form(pairs: Iterable[tuple[str, str]]) -> Obj:
    """Form pairs with bracketed keys (`line_items[0][price_data][unit_amount]=500`,
    `metadata[user_id]=u1`, `expand[]=x`) as nested dicts and lists, values left as strings."""
    root: Obj = {}
    for key, value in pairs:
        m = re.fullmatch(r"([^\[\]]+)((?:\[[^\[\]]*\])*)", key)
        if m is None:
            raise StripeError(f"Invalid parameter name: {key}", param=key)
        parts = [m.group(1), *re.findall(r"\[([^\[\]]*)\]", m.group(2))]
        node: Any = root
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            if part == "":  # `name[]`: append
                if not isinstance(node, list):
                    raise StripeError(f"Invalid array parameter: {key}", param=key)
                if last:
                    node.append(value)
                    break
                node.append({})
                node = node[-1]
                continue
            if not isinstance(node, dict):
                raise StripeError(f"Invalid parameter: {key}", param=key)
            if last:
                node[part] = value
            else:
                node = node.setdefault(part, [] if parts[i + 1] == "" else {})
    return _lists(root)


def _lists(value: Any) -> Any:
    """Dicts keyed "0", "1", ... (how the SDK sends arrays) as lists."""
    if isinstance(value, list):
        return [_lists(v) for v in value]
    if not isinstance(value, dict):
        return value
    converted = {k: _lists(v) for k, v in value.items()}
    if converted and all(k.isdigit() for k in converted):
        return [converted[k] for k in sorted(converted, key=int)]
    return converted


def _int(value: Any, param: str, *, minimum: int | None = None) -> int:
    if not isinstance(value, str) or not re.fullmatch(r"-?\d+", value):
        raise StripeError(f"Invalid integer: {value}", param=param)
    number = int(value)
    if minimum is not None and number < minimum:
        raise StripeError(f"This value must be greater than or equal to {minimum}.", param=param)
    return number


def _metadata(value: Any, param: str = "metadata") -> dict[str, str]:
    if value in (None, ""):
        return {}
    if not isinstance(value, dict):
        raise StripeError("Invalid object", param=param)
    if len(value) > 50:
        raise StripeError("Metadata can have at most 50 keys.", param=param)
    for key, item in value.items():
        if len(key) > 40:
            raise StripeError("Metadata keys can be at most 40 characters long.", param=f"{param}[{key}]")
        if not isinstance(item, str) or len(item) > 500:
            raise StripeError(
                "Metadata values must be strings of at most 500 characters.", param=f"{param}[{key}]"
            )
    return dict(value)


@dataclass
class _Saved:
    """What a POST with an Idempotency-Key answered, to answer again."""

    path: str
    params: list[tuple[str, str]]
    status: int
    body: bytes
    request_id: str
    at: float


class StripeState(fake_provider.ProviderState):
    """Everything the fake holds, and the helpers tests use to play the customer's part."""

    event_name_field: ClassVar[str] = "type"

    def __init__(
        self,
        api_key: str,
        *,
        webhook_url: str | None = None,
        webhook_secret: str | None = None,
        public_url: str | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(
            webhook_url=webhook_url, webhook_secret=webhook_secret, public_url=public_url, clock=clock
        )
        self.api_key = api_key
        # The api_version events carry (the SDK's own pinned version).
        self.api_version: str = stripe.api_version
        self.sessions: dict[str, Obj] = {}
        self.payment_intents: dict[str, Obj] = {}
        self.charges: dict[str, Obj] = {}
        self.refunds: dict[str, Obj] = {}
        # Per session: its line items (not part of the session object) and PaymentIntent metadata.
        self.line_items: dict[str, list[Obj]] = {}
        self._pi_metadata: dict[str, dict[str, str]] = {}
        # The charge as it stood right after each refund (refund id -> snapshot, previous amount).
        self._refunded_charge: dict[str, tuple[Obj, int]] = {}
        self.idempotency: dict[str, _Saved] = {}
        self.requests: list[tuple[str, str, str | None]] = []

    # -- counters ------------------------------------------------------------------------------

    @property
    def create_calls(self) -> int:
        """POST /v1/checkout/sessions requests received (idempotent replays and refusals
        included; len(state.sessions) counts the sessions made)."""
        return self.calls["checkout.sessions.create"]

    # -- objects -------------------------------------------------------------------------------

    def session(self, session_id: str) -> Obj:
        session = _find(self.sessions, session_id, "checkout.session", "session")
        if session["status"] == "open" and self.now() >= session["expires_at"]:
            self._expire(session)
        return session

    def payment_intent(self, intent_id: str) -> Obj:
        return _find(self.payment_intents, intent_id, "payment_intent", "intent")

    def charge(self, charge_id: str) -> Obj:
        return _find(self.charges, charge_id, "charge", "charge")

    def refund(self, refund_id: str) -> Obj:
        return _find(self.refunds, refund_id, "refund", "refund")

    def create_session(self, params: Obj, base_url: str) -> Obj:
        unknown = sorted(set(params) - _SESSION_PARAMS)
        if unknown:
            raise StripeError(f"Received unknown parameter: {unknown[0]}", param=unknown[0])
        mode = params.get("mode")
        if mode is None:
            raise StripeError("Missing required param: mode.", code="parameter_missing", param="mode")
        if mode != "payment":
            raise StripeError(f"This fake supports mode=payment only, not {mode}.", param="mode")
        items = params.get("line_items")
        if not items:
            raise StripeError(
                "Missing required param: line_items.", code="parameter_missing", param="line_items"
            )
        if not isinstance(items, list):
            raise StripeError("Invalid array", param="line_items")
        currency: str | None = None
        total = 0
        line_items: list[Obj] = []
        for i, item in enumerate(items):
            where = f"line_items[{i}]"
            if not isinstance(item, dict):
                raise StripeError("Invalid object", param=where)
            price = item.get("price_data")
            if not isinstance(price, dict):
                raise StripeError(
                    "This fake needs price_data on every line item.",
                    code="parameter_missing",
                    param=f"{where}[price_data]",
                )
            item_currency = price.get("currency")
            if not isinstance(item_currency, str) or not re.fullmatch(r"[a-zA-Z]{3}", item_currency):
                raise StripeError("Missing or invalid currency.", param=f"{where}[price_data][currency]")
            item_currency = item_currency.lower()
            if currency is not None and item_currency != currency:
                raise StripeError(
                    "All line items must use the same currency.", param=f"{where}[price_data][currency]"
                )
            currency = item_currency
            if "unit_amount" not in price:
                raise StripeError(
                    "Missing required param: unit_amount.",
                    code="parameter_missing",
                    param=f"{where}[price_data][unit_amount]",
                )
            unit_amount = _int(price["unit_amount"], f"{where}[price_data][unit_amount]", minimum=0)
            product = price.get("product_data")
            if not isinstance(product, dict) or not product.get("name"):
                raise StripeError(
                    "Missing required param: name.",
                    code="parameter_missing",
                    param=f"{where}[price_data][product_data][name]",
                )
            if "quantity" not in item:
                raise StripeError(
                    "Missing required param: quantity.", code="parameter_missing", param=f"{where}[quantity]"
                )
            quantity = _int(item["quantity"], f"{where}[quantity]", minimum=1)
            total += unit_amount * quantity
            line_items.append(
                {
                    "id": _random_id("li"),
                    "object": "item",
                    "amount_subtotal": unit_amount * quantity,
                    "amount_total": unit_amount * quantity,
                    "currency": item_currency,
                    "description": product["name"],
                    "quantity": quantity,
                    "price": {"unit_amount": unit_amount, "currency": item_currency},
                }
            )
        assert currency is not None
        minimum = _MINIMUM_CHARGE.get(currency, 50)
        if total < minimum:
            raise StripeError(
                "The Checkout Session's total amount due must add up to at least "
                f"{_money(minimum, currency)}",
                param="line_items",
            )
        reference = params.get("client_reference_id")
        if reference is not None and (not isinstance(reference, str) or len(reference) > 200):
            raise StripeError(
                "client_reference_id must be a string of at most 200 characters.", param="client_reference_id"
            )
        metadata = _metadata(params.get("metadata"))
        intent_data = params.get("payment_intent_data") or {}
        if not isinstance(intent_data, dict):
            raise StripeError("Invalid object", param="payment_intent_data")
        now = self.now()
        expires_at = now + 24 * 3600
        if "expires_at" in params:
            expires_at = _int(params["expires_at"], "expires_at")
            if expires_at < now + 30 * 60:
                raise StripeError(
                    "The `expires_at` timestamp must be at least 30 minutes from Checkout Session creation.",
                    param="expires_at",
                )
            if expires_at > now + 24 * 3600:
                raise StripeError(
                    "The `expires_at` timestamp must be less than 24 hours from Checkout Session creation.",
                    param="expires_at",
                )
        session_id = _random_id("cs_test", 58)
        session: Obj = {
            "id": session_id,
            "object": "checkout.session",
            "after_expiration": None,
            "allow_promotion_codes": None,
            "amount_subtotal": total,
            "amount_total": total,
            "automatic_tax": {"enabled": False, "liability": None, "status": None},
            "billing_address_collection": None,
            "cancel_url": params.get("cancel_url"),
            "client_reference_id": reference,
            "client_secret": None,
            "created": now,
            "currency": currency,
            "customer": params.get("customer"),
            "customer_creation": params.get("customer_creation", "if_required"),
            "customer_details": None,
            "customer_email": params.get("customer_email"),
            "expires_at": expires_at,
            "invoice": None,
            "livemode": False,
            "locale": params.get("locale"),
            "metadata": metadata,
            "mode": "payment",
            "payment_intent": None,
            "payment_link": None,
            "payment_method_types": params.get("payment_method_types") or ["card"],
            "payment_status": "unpaid",
            "status": "open",
            "success_url": params.get("success_url"),
            "total_details": {"amount_discount": 0, "amount_shipping": 0, "amount_tax": 0},
            "ui_mode": params.get("ui_mode", "hosted"),
            "url": self.pay_url(session_id, base_url),
        }
        self.sessions[session_id] = session
        self.line_items[session_id] = line_items
        # Stripe copies payment_intent_data[metadata] (not the session's metadata) onto the
        # PaymentIntent, and from there onto its charge.
        self._pi_metadata[session_id] = _metadata(
            intent_data.get("metadata"), "payment_intent_data[metadata]"
        )
        return session

    def _expire(self, session: Obj) -> None:
        session.update(status="expired", url=None)

    def expire_session(self, session_id: str) -> Obj:
        session = self.session(session_id)
        if session["status"] != "open":
            raise StripeError(
                f'Only Checkout Sessions with a status in ["open"] can be expired. '
                f"This Checkout Session has a status of {session['status']}.",
                param="session",
            )
        self._expire(session)
        self._event("checkout.session.expired", session)
        return session

    def create_refund(self, params: Obj) -> Obj:
        unknown = sorted(set(params) - {"payment_intent", "charge", "amount", "reason", "metadata", "expand"})
        if unknown:
            raise StripeError(f"Received unknown parameter: {unknown[0]}", param=unknown[0])
        if "payment_intent" in params:
            intent = self.payment_intent(str(params["payment_intent"]))
            if intent["status"] != "succeeded" or not intent["latest_charge"]:
                raise StripeError(
                    f"This PaymentIntent ({intent['id']}) does not have a successful charge to refund.",
                    param="payment_intent",
                )
            charge = self.charges[intent["latest_charge"]]
        elif "charge" in params:
            charge = self.charge(str(params["charge"]))
        else:
            raise StripeError(
                "One of the following params should be provided for this request: payment_intent or charge.",
                param="payment_intent",
            )
        left = charge["amount"] - charge["amount_refunded"]
        if left <= 0:
            raise StripeError(
                f"Charge {charge['id']} has already been refunded.", code="charge_already_refunded"
            )
        amount = left
        if "amount" in params:
            amount = _int(params["amount"], "amount", minimum=1)
        if amount > left:
            raise StripeError(
                f"Refund amount ({_money(amount, charge['currency'])}) is greater than unrefunded "
                f"amount on charge ({_money(left, charge['currency'])})",
                code="amount_too_large",
                param="amount",
            )
        refund: Obj = {
            "id": _random_id("re"),
            "object": "refund",
            "amount": amount,
            "balance_transaction": _random_id("txn"),
            "charge": charge["id"],
            "created": self.now(),
            "currency": charge["currency"],
            "destination_details": {"card": {"type": "refund"}, "type": "card"},
            "metadata": _metadata(params.get("metadata")),
            "payment_intent": charge["payment_intent"],
            "reason": params.get("reason"),
            "receipt_number": None,
            "source_transfer_reversal": None,
            "status": "succeeded",
            "transfer_reversal": None,
        }
        previous = charge["amount_refunded"]
        charge["amount_refunded"] += amount
        charge["refunded"] = charge["amount_refunded"] == charge["amount"]
        refunds = charge["refunds"]
        refunds["data"].insert(0, refund)  # newest first, as Stripe lists
        refunds["total_count"] = len(refunds["data"])
        self.refunds[refund["id"]] = refund
        self._refunded_charge[refund["id"]] = (copy.deepcopy(charge), previous)
        return refund

    # -- test helpers: the customer's part, and the events that follow -------------------------

    def _event(self, type: str, obj: Mapping[str, Any], previous: Obj | None = None) -> Obj:
        data: Obj = {"object": copy.deepcopy(dict(obj))}
        if previous is not None:
            data["previous_attributes"] = previous
        event: Obj = {
            "id": _random_id("evt"),
            "object": "event",
            "api_version": self.api_version,
            "created": self.now(),
            "data": data,
            "livemode": False,
            "pending_webhooks": 1,
            "request": {"id": None, "idempotency_key": None},
            "type": type,
        }
        self.events.append(event)
        return event

    def _open(self, session_id: str) -> Obj:
        session = self.session(session_id)
        if session["status"] != "open":
            raise ValueError(f"checkout session {session_id} is {session['status']}")
        return session

    def _intent(self, session: Obj, status: str) -> Obj:
        intent: Obj = {
            "id": _random_id("pi"),
            "object": "payment_intent",
            "amount": session["amount_total"],
            "amount_capturable": 0,
            "amount_received": 0,
            "capture_method": "automatic",
            "client_secret": None,
            "created": self.now(),
            "currency": session["currency"],
            "customer": session["customer"],
            "description": None,
            "latest_charge": None,
            "livemode": False,
            "metadata": dict(self._pi_metadata.get(session["id"], {})),
            "payment_method": _random_id("pm"),
            "payment_method_types": list(session["payment_method_types"]),
            "status": status,
        }
        intent["client_secret"] = f"{intent['id']}_secret_{_random_id('x')[2:]}"
        self.payment_intents[intent["id"]] = intent
        return intent

    def _charge(self, intent: Obj, status: str) -> Obj:
        charge: Obj = {
            "id": _random_id("ch"),
            "object": "charge",
            "amount": intent["amount"],
            "amount_captured": intent["amount"] if status == "succeeded" else 0,
            "amount_refunded": 0,
            "balance_transaction": _random_id("txn") if status == "succeeded" else None,
            "captured": status == "succeeded",
            "created": self.now(),
            "currency": intent["currency"],
            "customer": intent["customer"],
            "livemode": False,
            "metadata": dict(intent["metadata"]),
            "paid": status == "succeeded",
            "payment_intent": intent["id"],
            "payment_method": intent["payment_method"],
            "refunded": False,
            "refunds": {"object": "list", "data": [], "has_more": False, "total_count": 0, "url": ""},
            "status": status,
        }
        charge["refunds"]["url"] = f"/v1/charges/{charge['id']}/refunds"
        self.charges[charge["id"]] = charge
        intent["latest_charge"] = charge["id"]
        return charge

    def _complete(self, session: Obj, intent: Obj, payment_status: str) -> None:
        session.update(
            status="complete",
            payment_status=payment_status,
            payment_intent=intent["id"],
            url=None,
            customer_details={
                "address": None,
                "email": session["customer_email"] or "buyer@example.com",
                "name": None,
                "phone": None,
                "tax_exempt": "none",
                "tax_ids": [],
            },
        )

    def pay(self, session_id: str) -> Obj:
        """The customer pays the open session by card: a PaymentIntent (succeeded) and its
        charge are made, the session becomes complete and paid. Answers the
        checkout.session.completed event."""
        session = self._open(session_id)
        intent = self._intent(session, "succeeded")
        intent["amount_received"] = intent["amount"]
        self._charge(intent, "succeeded")
        self._complete(session, intent, "paid")
        return self._event("checkout.session.completed", session)

    def pay_async(self, session_id: str) -> Obj:
        """The customer pays with a delayed method (bank debit): the session becomes complete
        with payment_status "unpaid" and the PaymentIntent is processing. Answers the
        checkout.session.completed event; async_payment_succeeded() or async_payment_failed()
        settles it later."""
        session = self._open(session_id)
        intent = self._intent(session, "processing")
        self._charge(intent, "pending")
        self._complete(session, intent, "unpaid")
        return self._event("checkout.session.completed", session)

    def _processing(self, session_id: str) -> tuple[Obj, Obj, Obj]:
        session = self.session(session_id)
        intent = self.payment_intents.get(session["payment_intent"] or "")
        if intent is None or intent["status"] != "processing":
            raise ValueError(f"checkout session {session_id} has no payment in progress")
        return session, intent, self.charges[intent["latest_charge"]]

    def async_payment_succeeded(self, session_id: str) -> Obj:
        """The delayed payment of a pay_async() session clears. Answers the
        checkout.session.async_payment_succeeded event."""
        session, intent, charge = self._processing(session_id)
        intent.update(status="succeeded", amount_received=intent["amount"])
        charge.update(
            status="succeeded",
            paid=True,
            captured=True,
            amount_captured=charge["amount"],
            balance_transaction=_random_id("txn"),
        )
        session["payment_status"] = "paid"
        return self._event("checkout.session.async_payment_succeeded", session)

    def async_payment_failed(self, session_id: str) -> Obj:
        """The delayed payment of a pay_async() session fails. Answers the
        checkout.session.async_payment_failed event."""
        session, intent, charge = self._processing(session_id)
        intent.update(status="requires_payment_method")
        charge.update(status="failed", failure_code="insufficient_funds")
        return self._event("checkout.session.async_payment_failed", session)

    def expire_event(self, session_id: str) -> Obj:
        """The open session expires now. Answers the checkout.session.expired event."""
        session = self._open(session_id)
        self._expire(session)
        return self._event("checkout.session.expired", session)

    def refund_event(self, refund: str | Mapping[str, Any] | Any, *, include_refunds: bool = True) -> Obj:
        """The charge.refunded event for a refund made through the API (its id, or the Refund the
        SDK answered): the charge as it stood right after that refund, with amount_refunded,
        refunded, payment_intent, metadata and refunds.data. Stripe omits `refunds` from charges
        since API version 2022-11-15 (include_refunds=False does too)."""
        refund_id = refund if isinstance(refund, str) else str(refund["id"])
        if refund_id not in self._refunded_charge:
            raise KeyError(refund_id)
        charge, previous = self._refunded_charge[refund_id]
        charge = copy.deepcopy(charge)
        if not include_refunds:
            del charge["refunds"]
        changed: Obj = {"amount_refunded": previous}
        if charge["refunded"]:
            changed["refunded"] = False
        return self._event("charge.refunded", charge, changed)

    def signed_webhook(self, event: Mapping[str, Any], secret: str) -> tuple[bytes, dict[str, str]]:
        return webhook_request(event, secret)


STATE: web.AppKey[StripeState] = web.AppKey("state", StripeState)
# A POST's form parameters, parsed once by the middleware (which compares them for idempotency).
PARAMS: web.RequestKey[Obj] = web.RequestKey("params", dict)


def _request_id() -> str:
    return _random_id("req", 14)


def _error_response(error: StripeError, request_id: str) -> web.Response:
    return web.json_response(error.body(request_id), status=error.status, headers={"Request-Id": request_id})


def _authorised(request: web.Request, state: StripeState) -> bool:
    scheme, _, key = request.headers.get("Authorization", "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(key.encode(), state.api_key.encode())


def _masked(key: str) -> str:
    return f"{key[:8]}{'*' * max(len(key) - 12, 4)}{key[-4:]}" if len(key) > 12 else "****"


async def _api(request: web.Request, handler: fake_provider.Handler) -> web.StreamResponse:
    state = request.app[STATE]
    request_id = _request_id()
    key = request.headers.get("Idempotency-Key")
    state.requests.append((request.method, request.path_qs, key))
    try:
        if not _authorised(request, state):
            _, _, given = request.headers.get("Authorization", "").partition(" ")
            message = (
                f"Invalid API Key provided: {_masked(given)}"
                if given
                else "You did not provide an API key. You need to provide your API key in the "
                "Authorization header, using Bearer auth (e.g. 'Authorization: Bearer YOUR_SECRET_KEY')."
            )
            raise StripeError(message, status=401)
        if request.method != "POST":
            response = await handler(request)
            response.headers["Request-Id"] = request_id
            return response
        form = await request.post()
        pairs = [(k, str(v)) for k, v in form.items()]
        request[PARAMS] = parse_form(pairs)
        if key is not None:
            if len(key) > 255:
                raise StripeError(
                    "Idempotency keys must be 255 characters or fewer.", type="idempotency_error"
                )
            saved = state.idempotency.get(key)
            if saved is not None and state.clock() - saved.at > _IDEMPOTENCY_TTL:
                del state.idempotency[key]
                saved = None
            if saved is not None:
                if saved.path != request.path:
                    raise StripeError(
                        "Keys for idempotent requests can only be used for the same endpoint they were "
                        f"first used for ('{request.path}' vs '{saved.path}'). Try using a key other than "
                        f"'{key}' if you meant to execute a different request.",
                        type="idempotency_error",
                    )
                if saved.params != sorted(pairs):
                    raise StripeError(
                        "Keys for idempotent requests can only be used with the same parameters they were "
                        f"first used with. Try using a key other than '{key}' if you meant to execute a "
                        "different request.",
                        type="idempotency_error",
                    )
                return web.Response(
                    body=saved.body,
                    status=saved.status,
                    content_type="application/json",
                    headers={
                        "Request-Id": request_id,
                        "Idempotency-Key": key,
                        "Idempotent-Replayed": "true",
                        "Original-Request": saved.request_id,
                    },
                )
        response = await handler(request)
        response.headers["Request-Id"] = request_id
        if key is not None:
            response.headers["Idempotency-Key"] = key
            # Only what an endpoint executed is kept; refused parameters are not (as Stripe).
            if 200 <= response.status < 300 and isinstance(response, web.Response):
                body = response.body if isinstance(response.body, bytes) else b""
                state.idempotency[key] = _Saved(
                    request.path, sorted(pairs), response.status, body, request_id, state.clock()
                )
        return response
    except StripeError as e:
        return _error_response(e, request_id)
    except (web.HTTPNotFound, web.HTTPMethodNotAllowed):
        return _error_response(
            StripeError(f"Unrecognized request URL ({request.method}: {request.path}).", status=404),
            request_id,
        )


async def _create_session(request: web.Request) -> web.Response:
    state = request.app[STATE]
    return web.json_response(state.create_session(request[PARAMS], fake_provider.base_url(request)))


async def _retrieve_charge(request: web.Request) -> web.Response:
    state = request.app[STATE]
    charge = dict(state.charge(request.match_info["id"]))
    charge.pop("refunds")  # not included since API version 2022-11-15
    return web.json_response(charge)


async def _create_refund(request: web.Request) -> web.Response:
    state = request.app[STATE]
    return web.json_response(state.create_refund(request[PARAMS]))


_MISSING_SESSION = "no such checkout session"


async def _pay_page(request: web.Request) -> web.Response:
    state = request.app[STATE]
    session_id = fake_provider.page_id(request, state.sessions, _MISSING_SESSION)
    session = state.session(session_id)
    return fake_provider.pay_page(
        title="Fake Stripe Checkout",
        heading=", ".join(str(i["description"]) for i in state.line_items[session_id]),
        amount=_money(session["amount_total"], session["currency"]),
        status=session["status"],
        other="cancel",
    )


async def _pay_submit(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    session_id, action = await fake_provider.pay_form(request, state.sessions, _MISSING_SESSION)
    session = state.session(session_id)
    if action == "cancel":
        if session["cancel_url"]:
            raise web.HTTPSeeOther(session["cancel_url"])
        return web.Response(text="cancelled")
    await fake_provider.settle(state, lambda: [state.pay(session_id)])
    if session["success_url"]:
        raise web.HTTPSeeOther(str(session["success_url"]).replace("{CHECKOUT_SESSION_ID}", session_id))
    return web.Response(text=f"checkout session {session_id}: paid")


def make_app(
    api_key: str,
    *,
    webhook_url: str | None = None,
    webhook_secret: str | None = None,
    public_url: str | None = None,
) -> web.Application:
    """The fake's aiohttp application; its StripeState is app[STATE] (also app["state"])."""
    state = StripeState(
        api_key, webhook_url=webhook_url, webhook_secret=webhook_secret, public_url=public_url
    )
    routes = [
        web.post("/v1/checkout/sessions", _create_session, name="checkout.sessions.create"),
        web.get(
            "/v1/checkout/sessions/{id}",
            fake_provider.by_id(STATE, StripeState.session),
            name="checkout.sessions.retrieve",
        ),
        web.post(
            "/v1/checkout/sessions/{id}/expire",
            fake_provider.by_id(STATE, StripeState.expire_session),
            name="checkout.sessions.expire",
        ),
        web.get(
            "/v1/payment_intents/{id}",
            fake_provider.by_id(STATE, StripeState.payment_intent),
            name="payment_intents.retrieve",
        ),
        web.get("/v1/charges/{id}", _retrieve_charge, name="charges.retrieve"),
        web.post("/v1/refunds", _create_refund, name="refunds.create"),
        web.get("/v1/refunds/{id}", fake_provider.by_id(STATE, StripeState.refund), name="refunds.retrieve"),
    ]
    return fake_provider.provider_app(STATE, state, _api, routes, pay_page=_pay_page, pay_submit=_pay_submit)


def main(argv: list[str] | None = None) -> int:
    args = fake_provider.parse_args(
        argv,
        description="fake Stripe Checkout API (local tests and demos; not a payment provider)",
        port=9002,
        credentials={"--api-key": "sk_test_fake"},
        secret_help="sign them with this secret (whsec_...)",
        public_url_help="base of a session's url (default: the address a request used)",
    )
    app = make_app(
        args.api_key,
        webhook_url=args.webhook_url,
        webhook_secret=args.webhook_secret,
        public_url=args.public_url,
    )
    return fake_provider.serve(
        app,
        args,
        f"fake Stripe on http://{args.host}:{args.port}; "
        f'stripe.StripeClient(api_key, base_addresses={{"api": "http://{args.host}:{args.port}"}})',
    )


if __name__ == "__main__":
    raise SystemExit(main())
