"""The fake Razorpay and Stripe APIs (gateway.devtools.fake_razorpay / fake_stripe), driven through
the providers' official SDKs: what the SDKs send is what the fakes understand, what the fakes
answer is what the SDKs parse, and the webhook bodies the fakes make pass the SDKs' own signature
checks. The SDKs block (requests), so their calls run in a thread while the fakes serve on the
test's event loop.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
import urllib.parse
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
import razorpay
import stripe
from aiohttp import web
from aiohttp.test_utils import TestServer
from razorpay.errors import BadRequestError, SignatureVerificationError

from gateway.devtools import fake_razorpay, fake_stripe

RZP_KEY_ID = "rzp_test_fake123"
RZP_KEY_SECRET = "rzp_secret_abc"
RZP_WEBHOOK_SECRET = "rzp_webhook_secret"
STRIPE_KEY = "sk_test_fake_4242424242424242"
STRIPE_WEBHOOK_SECRET = "whsec_fake_secret"

run = asyncio.to_thread


async def _serve(app: web.Application) -> tuple[TestServer, str]:
    server = TestServer(app, host="127.0.0.1", port=0)
    await server.start_server()
    return server, f"http://127.0.0.1:{server.port}"


@dataclass
class Receiver:
    """A webhook endpoint that records what it is sent."""

    url: str = ""
    received: list[tuple[dict[str, str], bytes]] = field(default_factory=list)


@pytest_asyncio.fixture
async def receiver() -> AsyncIterator[Receiver]:
    rec = Receiver()

    async def hook(request: web.Request) -> web.Response:
        rec.received.append((dict(request.headers), await request.read()))
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/hook", hook)
    server, base = await _serve(app)
    rec.url = f"{base}/hook"
    yield rec
    await server.close()


# -- Razorpay -------------------------------------------------------------------------------------


@dataclass
class Rzp:
    state: fake_razorpay.RazorpayState
    client: Any
    base: str


@pytest_asyncio.fixture
async def rzp(receiver: Receiver) -> AsyncIterator[Rzp]:
    app = fake_razorpay.make_app(
        RZP_KEY_ID, RZP_KEY_SECRET, webhook_url=receiver.url, webhook_secret=RZP_WEBHOOK_SECRET
    )
    server, base = await _serve(app)
    client = razorpay.Client(auth=(RZP_KEY_ID, RZP_KEY_SECRET), base_url=base)
    yield Rzp(app[fake_razorpay.STATE], client, base)
    await server.close()


def _link_body(reference_id: str, **extra: Any) -> dict[str, Any]:
    return {
        "amount": 50_000,
        "currency": "INR",
        "reference_id": reference_id,
        "description": "500 credits",
        "callback_url": "https://shop.example/after-pay",
        "callback_method": "get",
        "notes": {"user_id": "u_42", "pack": "p500"},
        "expire_by": int(time.time()) + 3600,
        "customer": {"email": "buyer@example.com"},
        "notify": {"sms": False, "email": False},
        **extra,
    }


def _rzp_verified(rzp: Rzp, event: dict[str, Any]) -> dict[str, Any]:
    """`event` as a receiver gets it, after the SDK's signature check."""
    body, headers = fake_razorpay.webhook_request(event, RZP_WEBHOOK_SECRET)
    assert headers["X-Razorpay-Signature"] == fake_razorpay.sign(body, RZP_WEBHOOK_SECRET)
    assert rzp.client.utility.verify_webhook_signature(
        body.decode(), headers["X-Razorpay-Signature"], RZP_WEBHOOK_SECRET
    )
    return json.loads(body)


async def test_razorpay_create_fetch_and_list(rzp: Rzp) -> None:
    link = await run(rzp.client.payment_link.create, _link_body("ord_1"))
    assert re.fullmatch(r"plink_[A-Za-z0-9]{14}", link["id"])
    assert link["short_url"] == f"{rzp.base}/pay/{link['id']}"
    assert (link["status"], link["amount"], link["amount_paid"], link["currency"]) == (
        "created",
        50_000,
        0,
        "INR",
    )
    assert link["reference_id"] == "ord_1" and link["payments"] is None
    assert link["notes"] == {"user_id": "u_42", "pack": "p500"}
    assert isinstance(link["created_at"], int) and link["expire_by"] > link["created_at"]

    fetched = await run(rzp.client.payment_link.fetch, link["id"])
    assert fetched == link
    listed = await run(rzp.client.payment_link.all, {"reference_id": "ord_1"})
    assert listed == {"payment_links": [link]}
    assert await run(rzp.client.payment_link.all, {"reference_id": "nope"}) == {"payment_links": []}

    bare = await run(rzp.client.payment_link.create, {"amount": 100, "currency": "INR", "notes": {}})
    assert bare["notes"] == []  # Razorpay sends empty notes as a JSON array
    assert rzp.state.create_calls == 2

    with pytest.raises(BadRequestError, match="does not exist"):
        await run(rzp.client.payment_link.fetch, "plink_00000000000000")


async def test_razorpay_wrong_key_is_refused(rzp: Rzp) -> None:
    wrong = razorpay.Client(auth=(RZP_KEY_ID, "not-the-secret"), base_url=rzp.base)
    with pytest.raises(BadRequestError, match="Authentication failed"):
        await run(wrong.payment_link.create, _link_body("ord_x"))
    assert rzp.state.links == {}


async def test_razorpay_base_url_is_taken_verbatim(rzp: Rzp) -> None:
    """The SDK appends "/v1/..." to base_url as given: a trailing slash (or a /v1) misses every
    route, and the fake says which path it got, in an error shape the SDK parses."""
    for base in (f"{rzp.base}/", f"{rzp.base}/v1"):
        client = razorpay.Client(auth=(RZP_KEY_ID, RZP_KEY_SECRET), base_url=base)
        with pytest.raises(BadRequestError, match=r"not found on the server \(POST /+v1/"):
            await run(client.payment_link.create, _link_body("ord_slash"))
    assert rzp.state.links == {}


async def test_razorpay_duplicate_reference_id_is_refused(rzp: Rzp) -> None:
    first = await run(rzp.client.payment_link.create, _link_body("ord_dup"))
    with pytest.raises(BadRequestError, match="reference id ord_dup already exists"):
        await run(rzp.client.payment_link.create, _link_body("ord_dup", amount=70_000))
    assert rzp.state.create_calls == 2
    assert list(rzp.state.links) == [first["id"]]
    # The retry path: look the first link up by its reference.
    found = await run(rzp.client.payment_link.all, {"reference_id": "ord_dup"})
    assert [p["id"] for p in found["payment_links"]] == [first["id"]]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"reference_id": "r" * 41}, "may not be greater than 40"),
        ({"notes": {f"k{i}": "v" for i in range(16)}}, "less than or equal to 15"),
        ({"amount": 99}, "atleast INR 1.00"),
        ({"amount": 500.5}, "must be an integer"),
        ({"callback_method": "post"}, "callback_method should be get"),
        ({"expire_by": int(time.time()) + 60}, "at least 15 minutes"),
        ({"surprise": 1}, "surprise is/are not required"),
    ],
)
async def test_razorpay_create_validation(rzp: Rzp, change: dict[str, Any], message: str) -> None:
    with pytest.raises(BadRequestError, match=message):
        await run(rzp.client.payment_link.create, {**_link_body("ord_v"), **change})
    assert rzp.state.links == {}


async def test_razorpay_pay_webhooks_fetch_and_refunds(rzp: Rzp) -> None:
    link = await run(rzp.client.payment_link.create, _link_body("ord_pay"))
    events = rzp.state.pay(link["id"])
    assert list(events) == ["payment.authorized", "payment.captured", "order.paid", "payment_link.paid"]

    paid = _rzp_verified(rzp, events["payment_link.paid"])
    assert (paid["entity"], paid["event"], paid["account_id"]) == (
        "event",
        "payment_link.paid",
        "acc_FakeRzp0000001",
    )
    assert paid["contains"] == ["payment_link", "order", "payment"]
    plink = paid["payload"]["payment_link"]["entity"]
    payment = paid["payload"]["payment"]["entity"]
    order = paid["payload"]["order"]["entity"]
    assert (plink["id"], plink["status"], plink["amount_paid"], plink["reference_id"]) == (
        link["id"],
        "paid",
        50_000,
        "ord_pay",
    )
    assert re.fullmatch(r"pay_[A-Za-z0-9]{14}", payment["id"])
    assert (payment["amount"], payment["currency"], payment["status"], payment["captured"]) == (
        50_000,
        "INR",
        "captured",
        True,
    )
    assert payment["order_id"] == order["id"] == plink["order_id"]
    assert order["notes"] == {"user_id": "u_42", "pack": "p500"} and order["receipt"] == "ord_pay"
    assert payment["notes"] == []  # as in Razorpay's sample payload; the link's notes are on the order
    assert plink["payments"][0]["payment_id"] == payment["id"]

    captured = _rzp_verified(rzp, events["payment.captured"])
    assert captured["contains"] == ["payment"]
    assert captured["payload"]["payment"]["entity"]["id"] == payment["id"]

    # A tampered body, or the wrong secret, fails the SDK's check.
    body, headers = fake_razorpay.webhook_request(events["payment_link.paid"], RZP_WEBHOOK_SECRET)
    with pytest.raises(SignatureVerificationError):
        rzp.client.utility.verify_webhook_signature(
            body.decode().replace("50000", "90000"), headers["X-Razorpay-Signature"], RZP_WEBHOOK_SECRET
        )
    with pytest.raises(SignatureVerificationError):
        rzp.client.utility.verify_webhook_signature(body.decode(), headers["X-Razorpay-Signature"], "other")
    # The same event re-sent carries the same event id (what receivers deduplicate on).
    assert (
        fake_razorpay.webhook_request(events["payment_link.paid"], RZP_WEBHOOK_SECRET)[1][
            "X-Razorpay-Event-Id"
        ]
        == headers["X-Razorpay-Event-Id"]
    )

    fetched = await run(rzp.client.payment_link.fetch, link["id"])
    assert (fetched["status"], fetched["amount_paid"]) == ("paid", 50_000)
    fetched_payment = await run(rzp.client.payment.fetch, payment["id"])
    assert (fetched_payment["status"], fetched_payment["order_id"]) == ("captured", order["id"])
    by_payment = await run(rzp.client.payment_link.all, {"payment_id": payment["id"]})
    assert [p["id"] for p in by_payment["payment_links"]] == [link["id"]]

    with pytest.raises(BadRequestError, match="cannot be cancelled"):
        await run(rzp.client.payment_link.cancel, link["id"])
    with pytest.raises(ValueError, match="is paid"):
        rzp.state.pay(link["id"])

    refund = await run(rzp.client.payment.refund, payment["id"], {"amount": 20_000})
    assert re.fullmatch(r"rfnd_[A-Za-z0-9]{14}", refund["id"])
    assert (
        refund["entity"],
        refund["amount"],
        refund["currency"],
        refund["payment_id"],
        refund["status"],
    ) == (
        "refund",
        20_000,
        "INR",
        payment["id"],
        "processed",
    )
    with pytest.raises(BadRequestError, match="greater than the unrefunded amount"):
        await run(rzp.client.payment.refund, payment["id"], {"amount": 30_001})
    rest = await run(rzp.client.payment.refund, payment["id"], {})
    assert rest["amount"] == 30_000
    with pytest.raises(BadRequestError, match="fully refunded"):
        await run(rzp.client.payment.refund, payment["id"], {"amount": 1})
    after = await run(rzp.client.payment.fetch, payment["id"])
    assert (after["amount_refunded"], after["refund_status"], after["status"]) == (50_000, "full", "refunded")

    first_refund = _rzp_verified(rzp, rzp.state.refund_event(refund))
    assert first_refund["event"] == "refund.processed" and first_refund["contains"] == ["refund", "payment"]
    assert first_refund["payload"]["refund"]["entity"] == refund
    # The payment as it stood after that refund, not after the later one.
    assert first_refund["payload"]["payment"]["entity"]["amount_refunded"] == 20_000
    assert first_refund["payload"]["payment"]["entity"]["refund_status"] == "partial"
    assert rzp.state.refund_event(rest["id"])["payload"]["payment"]["entity"]["amount_refunded"] == 50_000


async def test_razorpay_partial_payments(rzp: Rzp) -> None:
    link = await run(rzp.client.payment_link.create, _link_body("ord_part", accept_partial=True))
    first = rzp.state.pay(link["id"], amount=20_000)
    assert list(first) == ["payment.authorized", "payment.captured", "payment_link.partially_paid"]
    entity = first["payment_link.partially_paid"]["payload"]["payment_link"]["entity"]
    assert (entity["status"], entity["amount_paid"]) == ("partially_paid", 20_000)
    second = rzp.state.pay(link["id"])
    assert "payment_link.paid" in second and "order.paid" in second
    assert second["payment_link.paid"]["payload"]["payment"]["entity"]["amount"] == 30_000
    assert len((await run(rzp.client.payment_link.fetch, link["id"]))["payments"]) == 2

    whole = await run(rzp.client.payment_link.create, _link_body("ord_whole"))
    with pytest.raises(ValueError, match="partial"):
        rzp.state.pay(whole["id"], amount=100)


async def test_razorpay_fail_expire_and_cancel(rzp: Rzp) -> None:
    link = await run(rzp.client.payment_link.create, _link_body("ord_fail"))
    failed = _rzp_verified(rzp, rzp.state.fail(link["id"]))
    assert failed["event"] == "payment.failed" and failed["contains"] == ["payment"]
    payment = failed["payload"]["payment"]["entity"]
    assert (payment["status"], payment["error_code"], payment["captured"]) == (
        "failed",
        "BAD_REQUEST_ERROR",
        False,
    )
    assert (await run(rzp.client.payment_link.fetch, link["id"]))["status"] == "created"
    assert (await run(rzp.client.payment.fetch, payment["id"]))["status"] == "failed"
    with pytest.raises(BadRequestError, match="not been captured"):
        await run(rzp.client.payment.refund, payment["id"], {})

    expired = _rzp_verified(rzp, rzp.state.expire(link["id"]))
    assert expired["event"] == "payment_link.expired"
    assert expired["payload"]["payment_link"]["entity"]["status"] == "expired"
    assert (await run(rzp.client.payment_link.fetch, link["id"]))["status"] == "expired"
    with pytest.raises(ValueError, match="expired"):
        rzp.state.pay(link["id"])

    other = await run(rzp.client.payment_link.create, _link_body("ord_cancel"))
    cancelled = await run(rzp.client.payment_link.cancel, other["id"])
    assert cancelled["status"] == "cancelled" and cancelled["cancelled_at"] > 0
    assert rzp.state.events[-1]["event"] == "payment_link.cancelled"
    with pytest.raises(BadRequestError, match="cannot be cancelled"):
        await run(rzp.client.payment_link.cancel, other["id"])


async def test_razorpay_link_expires_by_the_clock(rzp: Rzp) -> None:
    link = await run(rzp.client.payment_link.create, _link_body("ord_clock"))
    rzp.state.clock = lambda: link["expire_by"] + 1.0
    fetched = await run(rzp.client.payment_link.fetch, link["id"])
    assert (fetched["status"], fetched["expired_at"]) == ("expired", link["expire_by"])


async def test_razorpay_callback_signature(rzp: Rzp) -> None:
    link = await run(rzp.client.payment_link.create, _link_body("ord_cb"))
    payment_id = rzp.state.pay(link["id"])["payment.captured"]["payload"]["payment"]["entity"]["id"]
    params = rzp.state.callback_params(link["id"], payment_id)
    assert rzp.client.utility.verify_payment_link_signature(
        {
            "razorpay_payment_id": params["razorpay_payment_id"],
            "payment_link_id": params["razorpay_payment_link_id"],
            "payment_link_reference_id": params["razorpay_payment_link_reference_id"],
            "payment_link_status": params["razorpay_payment_link_status"],
            "razorpay_signature": params["razorpay_signature"],
        }
    )


async def test_razorpay_pay_page_delivers_webhooks_and_redirects(rzp: Rzp, receiver: Receiver) -> None:
    link = await run(rzp.client.payment_link.create, _link_body("ord_page"))
    async with aiohttp.ClientSession() as http:
        async with http.get(link["short_url"]) as page:
            assert page.status == 200 and "500 credits" in await page.text()
        async with http.post(link["short_url"], data={"action": "pay"}, allow_redirects=False) as resp:
            assert resp.status == 303
            location = resp.headers["Location"]
    assert location.startswith("https://shop.example/after-pay?")
    query = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(location).query))
    assert query["razorpay_payment_link_status"] == "paid"
    assert query["razorpay_payment_link_reference_id"] == "ord_page"

    names = []
    for headers, body in receiver.received:
        assert rzp.client.utility.verify_webhook_signature(
            body.decode(), headers["X-Razorpay-Signature"], RZP_WEBHOOK_SECRET
        )
        names.append(json.loads(body)["event"])
    assert names == ["payment.authorized", "payment.captured", "order.paid", "payment_link.paid"]
    assert [status for _, status in rzp.state.deliveries] == [200] * 4


# -- Stripe ---------------------------------------------------------------------------------------


@dataclass
class Stripe:
    state: fake_stripe.StripeState
    client: stripe.StripeClient
    base: str


@pytest_asyncio.fixture
async def stp(receiver: Receiver) -> AsyncIterator[Stripe]:
    app = fake_stripe.make_app(STRIPE_KEY, webhook_url=receiver.url, webhook_secret=STRIPE_WEBHOOK_SECRET)
    server, base = await _serve(app)
    client = stripe.StripeClient(STRIPE_KEY, base_addresses={"api": base})
    yield Stripe(app[fake_stripe.STATE], client, base)
    await server.close()


def _session_params(**extra: Any) -> dict[str, Any]:
    return {
        "mode": "payment",
        "line_items": [
            {
                "price_data": {
                    "currency": "usd",
                    "unit_amount": 500,
                    "product_data": {"name": "500 credits"},
                },
                "quantity": 2,
            }
        ],
        "success_url": "https://shop.example/done?session={CHECKOUT_SESSION_ID}",
        "cancel_url": "https://shop.example/cancelled",
        "client_reference_id": "ord_1",
        "metadata": {"user_id": "u_42", "pack": "p500"},
        "payment_intent_data": {"metadata": {"user_id": "u_42"}},
        "expires_at": int(time.time()) + 3600,
        **extra,
    }


def _stripe_verified(event: dict[str, Any]) -> stripe.Event:
    """`event` as a receiver gets it, after the SDK's signature check."""
    body, headers = fake_stripe.webhook_request(event, STRIPE_WEBHOOK_SECRET)
    verified = stripe.Webhook.construct_event(
        body.decode(), headers["Stripe-Signature"], STRIPE_WEBHOOK_SECRET
    )
    assert verified.id == event["id"] and verified.type == event["type"]
    return verified


async def test_stripe_create_and_retrieve(stp: Stripe) -> None:
    session = await run(stp.client.v1.checkout.sessions.create, _session_params())
    assert isinstance(session, stripe.checkout.Session)
    assert re.fullmatch(r"cs_test_[A-Za-z0-9]{58}", session.id)
    assert session.object == "checkout.session"
    assert session.url == f"{stp.base}/pay/{session.id}"
    assert (session.status, session.payment_status, session.amount_total, session.currency) == (
        "open",
        "unpaid",
        1000,
        "usd",
    )
    assert session.client_reference_id == "ord_1"
    assert session.metadata is not None and session.metadata.to_dict() == {"user_id": "u_42", "pack": "p500"}
    assert session.payment_intent is None
    assert session.expires_at > session.created
    assert session.last_response is not None and session.last_response.request_id.startswith("req_")
    # The SDK's bracketed form encoding arrived whole.
    assert stp.state.line_items[session.id][0]["quantity"] == 2
    # The SDK gives every POST an Idempotency-Key of its own.
    assert stp.state.requests[-1][2]

    again = await run(stp.client.v1.checkout.sessions.retrieve, session.id)
    assert again.to_dict() == session.to_dict()
    # The SDK's async methods (httpx) reach the fake too.
    assert (await stp.client.v1.checkout.sessions.retrieve_async(session.id)).id == session.id

    with pytest.raises(stripe.InvalidRequestError) as missing:
        await run(stp.client.v1.checkout.sessions.retrieve, "cs_test_nope")
    assert (missing.value.http_status, missing.value.code) == (404, "resource_missing")


async def test_stripe_wrong_key_is_refused(stp: Stripe) -> None:
    wrong = stripe.StripeClient("sk_test_wrong_key_000000", base_addresses={"api": stp.base})
    with pytest.raises(stripe.AuthenticationError) as refused:
        await run(wrong.v1.checkout.sessions.create, _session_params())
    assert refused.value.http_status == 401 and "Invalid API Key" in str(refused.value.user_message)
    assert stp.state.sessions == {}


async def test_stripe_idempotency_key(stp: Stripe) -> None:
    options: stripe.RequestOptions = {"idempotency_key": "order-7"}
    params = _session_params()
    first = await run(stp.client.v1.checkout.sessions.create, params, options)
    replay = await run(stp.client.v1.checkout.sessions.create, params, options)
    assert replay.id == first.id and len(stp.state.sessions) == 1
    assert stp.state.create_calls == 2
    assert replay.last_response is not None
    assert replay.last_response.headers["Idempotent-Replayed"] == "true"

    with pytest.raises(stripe.IdempotencyError, match="same parameters"):
        await run(
            stp.client.v1.checkout.sessions.create, _session_params(client_reference_id="ord_2"), options
        )
    with pytest.raises(stripe.IdempotencyError, match="same endpoint"):
        await run(stp.client.v1.refunds.create, {"payment_intent": "pi_x"}, options)
    assert len(stp.state.sessions) == 1

    # A key first used with refused parameters is not kept: corrected parameters then go through.
    bad: stripe.RequestOptions = {"idempotency_key": "order-8"}
    with pytest.raises(stripe.InvalidRequestError):
        await run(stp.client.v1.checkout.sessions.create, _session_params(expires_at=1), bad)
    made = await run(stp.client.v1.checkout.sessions.create, _session_params(), bad)
    assert made.id != first.id and len(stp.state.sessions) == 2


@pytest.mark.parametrize(
    ("change", "param", "message"),
    [
        ({"surprise": "1"}, "surprise", "unknown parameter"),
        ({"mode": None}, "mode", "Missing required param: mode"),
        ({"expires_at": int(time.time()) + 60}, "expires_at", "at least 30 minutes"),
        ({"expires_at": int(time.time()) + 25 * 3600}, "expires_at", "less than 24 hours"),
        (
            {
                "line_items": [
                    {
                        "price_data": {"currency": "usd", "unit_amount": 10, "product_data": {"name": "x"}},
                        "quantity": 1,
                    }
                ]
            },
            "line_items",
            "at least \\$0.50",
        ),
        (
            {
                "line_items": [
                    {"price_data": {"currency": "usd", "unit_amount": 500, "product_data": {"name": "x"}}}
                ]
            },
            "line_items[0][quantity]",
            "quantity",
        ),
    ],
)
async def test_stripe_create_validation(
    stp: Stripe, change: dict[str, Any], param: str, message: str
) -> None:
    with pytest.raises(stripe.InvalidRequestError, match=message) as refused:
        await run(stp.client.v1.checkout.sessions.create, _session_params(**change))
    assert refused.value.param == param and refused.value.http_status == 400
    assert stp.state.sessions == {}


async def test_stripe_pay_refunds_and_webhooks(stp: Stripe) -> None:
    session = await run(stp.client.v1.checkout.sessions.create, _session_params())
    completed = stp.state.pay(session.id)
    assert completed["object"] == "event" and completed["livemode"] is False
    assert re.fullmatch(r"evt_[A-Za-z0-9]{24}", completed["id"])
    assert completed["api_version"] == stripe.api_version
    event = _stripe_verified(completed)
    assert event.type == "checkout.session.completed"
    paid = event.data.object
    assert (paid["id"], paid["status"], paid["payment_status"], paid["client_reference_id"]) == (
        session.id,
        "complete",
        "paid",
        "ord_1",
    )
    assert paid["metadata"]["user_id"] == "u_42" and paid["amount_total"] == 1000
    intent_id = paid["payment_intent"]
    assert re.fullmatch(r"pi_[A-Za-z0-9]{24}", intent_id)

    # A tampered body, a wrong secret or a stale timestamp fails the SDK's check.
    body, headers = fake_stripe.webhook_request(completed, STRIPE_WEBHOOK_SECRET)
    with pytest.raises(stripe.SignatureVerificationError):
        stripe.Webhook.construct_event(
            body.decode().replace("1000", "9000"), headers["Stripe-Signature"], STRIPE_WEBHOOK_SECRET
        )
    with pytest.raises(stripe.SignatureVerificationError):
        stripe.Webhook.construct_event(body.decode(), headers["Stripe-Signature"], "whsec_other")
    stale = fake_stripe.sign(body.decode(), STRIPE_WEBHOOK_SECRET, int(time.time()) - 3600)
    with pytest.raises(stripe.SignatureVerificationError, match="tolerance"):
        stripe.Webhook.construct_event(body.decode(), stale, STRIPE_WEBHOOK_SECRET)

    fetched = await run(stp.client.v1.checkout.sessions.retrieve, session.id)
    assert (fetched.status, fetched.payment_status, fetched.payment_intent, fetched.url) == (
        "complete",
        "paid",
        intent_id,
        None,
    )
    intent = await run(stp.client.v1.payment_intents.retrieve, intent_id)
    assert (intent.status, intent.amount, intent.amount_received, intent.currency) == (
        "succeeded",
        1000,
        1000,
        "usd",
    )
    assert intent.metadata.to_dict() == {"user_id": "u_42"}  # from payment_intent_data[metadata]
    assert isinstance(intent.latest_charge, str) and intent.latest_charge.startswith("ch_")
    with pytest.raises(ValueError, match="complete"):
        stp.state.pay(session.id)

    refund = await run(stp.client.v1.refunds.create, {"payment_intent": intent_id, "amount": 300})
    assert isinstance(refund, stripe.Refund) and re.fullmatch(r"re_[A-Za-z0-9]{24}", refund.id)
    assert (refund.status, refund.amount, refund.payment_intent, refund.charge) == (
        "succeeded",
        300,
        intent_id,
        intent.latest_charge,
    )
    with pytest.raises(stripe.InvalidRequestError, match="greater than unrefunded") as too_much:
        await run(stp.client.v1.refunds.create, {"payment_intent": intent_id, "amount": 701})
    assert too_much.value.code == "amount_too_large"
    rest = await run(stp.client.v1.refunds.create, {"payment_intent": intent_id})
    assert rest.amount == 700
    with pytest.raises(stripe.InvalidRequestError, match="already been refunded") as again:
        await run(stp.client.v1.refunds.create, {"payment_intent": intent_id, "amount": 1})
    assert again.value.code == "charge_already_refunded"
    assert (await run(stp.client.v1.refunds.retrieve, refund.id)).amount == 300

    charge_event = _stripe_verified(stp.state.refund_event(refund))
    assert charge_event.type == "charge.refunded"
    charge = charge_event.data.object
    assert (charge["id"], charge["amount"], charge["amount_refunded"], charge["refunded"]) == (
        intent.latest_charge,
        1000,
        300,
        False,
    )
    assert charge["payment_intent"] == intent_id and charge["metadata"]["user_id"] == "u_42"
    assert [r["id"] for r in charge["refunds"]["data"]] == [refund.id]
    assert charge_event.data.previous_attributes["amount_refunded"] == 0
    full = stp.state.refund_event(rest.id)["data"]["object"]
    assert (full["amount_refunded"], full["refunded"]) == (1000, True)
    assert [r["id"] for r in full["refunds"]["data"]] == [rest.id, refund.id]
    assert "refunds" not in stp.state.refund_event(rest, include_refunds=False)["data"]["object"]


async def test_stripe_async_payment(stp: Stripe) -> None:
    session = await run(stp.client.v1.checkout.sessions.create, _session_params())
    completed = _stripe_verified(stp.state.pay_async(session.id)).data.object
    assert (completed["status"], completed["payment_status"]) == ("complete", "unpaid")
    intent_id = completed["payment_intent"]
    assert (await run(stp.client.v1.payment_intents.retrieve, intent_id)).status == "processing"
    with pytest.raises(stripe.InvalidRequestError, match="does not have a successful charge"):
        await run(stp.client.v1.refunds.create, {"payment_intent": intent_id})

    succeeded = _stripe_verified(stp.state.async_payment_succeeded(session.id))
    assert succeeded.type == "checkout.session.async_payment_succeeded"
    assert succeeded.data.object["payment_status"] == "paid"
    assert (await run(stp.client.v1.payment_intents.retrieve, intent_id)).status == "succeeded"
    with pytest.raises(ValueError, match="no payment in progress"):
        stp.state.async_payment_failed(session.id)

    other = await run(stp.client.v1.checkout.sessions.create, _session_params())
    stp.state.pay_async(other.id)
    failed = _stripe_verified(stp.state.async_payment_failed(other.id))
    assert failed.type == "checkout.session.async_payment_failed"
    assert failed.data.object["payment_status"] == "unpaid"


async def test_stripe_expiry(stp: Stripe) -> None:
    session = await run(stp.client.v1.checkout.sessions.create, _session_params())
    expired = await run(stp.client.v1.checkout.sessions.expire, session.id)
    assert (expired.status, expired.url) == ("expired", None)
    assert stp.state.events[-1]["type"] == "checkout.session.expired"
    with pytest.raises(stripe.InvalidRequestError, match="can be expired"):
        await run(stp.client.v1.checkout.sessions.expire, session.id)
    with pytest.raises(ValueError, match="expired"):
        stp.state.pay(session.id)

    other = await run(stp.client.v1.checkout.sessions.create, _session_params())
    event = _stripe_verified(stp.state.expire_event(other.id))
    assert event.type == "checkout.session.expired" and event.data.object["status"] == "expired"

    timed = await run(stp.client.v1.checkout.sessions.create, _session_params())
    stp.state.clock = lambda: timed.expires_at + 1.0
    assert (await run(stp.client.v1.checkout.sessions.retrieve, timed.id)).status == "expired"


async def test_stripe_pay_page_delivers_webhook_and_redirects(stp: Stripe, receiver: Receiver) -> None:
    session = await run(stp.client.v1.checkout.sessions.create, _session_params())
    assert session.url is not None
    async with aiohttp.ClientSession() as http:
        async with http.get(session.url) as page:
            assert page.status == 200 and "500 credits" in await page.text()
        async with http.post(session.url, data={"action": "pay"}, allow_redirects=False) as resp:
            assert resp.status == 303
            assert resp.headers["Location"] == f"https://shop.example/done?session={session.id}"
    [(headers, body)] = receiver.received
    event = stripe.Webhook.construct_event(body.decode(), headers["Stripe-Signature"], STRIPE_WEBHOOK_SECRET)
    assert event.type == "checkout.session.completed" and event.data.object["id"] == session.id
    assert stp.state.deliveries == [("checkout.session.completed", 200)]


def test_stripe_form_parsing() -> None:
    parsed = fake_stripe.parse_form(
        [
            ("line_items[0][price_data][unit_amount]", "500"),
            ("line_items[0][quantity]", "2"),
            ("line_items[1][quantity]", "1"),
            ("metadata[user_id]", "u1"),
            ("expand[]", "a"),
            ("expand[]", "b"),
            ("mode", "payment"),
        ]
    )
    assert parsed == {
        "line_items": [{"price_data": {"unit_amount": "500"}, "quantity": "2"}, {"quantity": "1"}],
        "metadata": {"user_id": "u1"},
        "expand": ["a", "b"],
        "mode": "payment",
    }
