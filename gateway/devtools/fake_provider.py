"""The shared plumbing of the local fake provider APIs (`fake_razorpay`, `fake_stripe`): random
ids, the state both keep besides their objects (clock, call counters, events, webhook deliveries),
the aiohttp application with its `app[STATE]` and the /pay/{id} page a person pays on, and the
command line that serves it. What a provider says and checks (its objects, errors, auth, webhook
signatures) stays in its own module.
"""

from __future__ import annotations

import argparse
import html
import secrets
import string
import time
import warnings
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Awaitable, Callable, Container, Iterable, Mapping
from typing import Any, ClassVar, TypeVar

from aiohttp import ClientSession, ClientTimeout, web

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Middleware = Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]

ALNUM = string.ascii_letters + string.digits


def random_id(prefix: str, n: int) -> str:
    """`prefix`, "_" and `n` random letters and digits: the shape of the providers' ids."""
    return f"{prefix}_" + "".join(secrets.choice(ALNUM) for _ in range(n))


class ProviderState(ABC):
    """What every fake holds besides its own objects, and the webhook delivery of demos."""

    # The field of an event that names it ("event" for Razorpay, "type" for Stripe).
    event_name_field: ClassVar[str]

    def __init__(
        self,
        *,
        webhook_url: str | None,
        webhook_secret: str | None,
        public_url: str | None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.webhook_url = webhook_url
        self.webhook_secret = webhook_secret
        # Where a /pay/{id} url points; by default the address the create request came in on.
        self.public_url = public_url
        self.clock = clock
        self.events: list[dict[str, Any]] = []
        self.calls: Counter[str] = Counter()
        self.deliveries: list[tuple[str, int]] = []

    def now(self) -> int:
        return int(self.clock())

    def pay_url(self, object_id: str, base_url: str) -> str:
        """The address of the /pay/{id} page of `object_id`."""
        return f"{(self.public_url or base_url).rstrip('/')}/pay/{object_id}"

    @abstractmethod
    def signed_webhook(self, event: Mapping[str, Any], secret: str) -> tuple[bytes, dict[str, str]]:
        """The raw body and headers the provider would POST for `event`."""

    async def deliver(self, events: Iterable[Mapping[str, Any]]) -> list[int]:
        """POST each event, signed, to webhook_url (demos); answers the HTTP statuses. Delivery
        failures are recorded as status 0, never retried."""
        if not self.webhook_url or not self.webhook_secret:
            return []
        statuses: list[int] = []
        async with ClientSession(timeout=ClientTimeout(total=10)) as session:
            for event in events:
                body, headers = self.signed_webhook(event, self.webhook_secret)
                try:
                    async with session.post(self.webhook_url, data=body, headers=headers) as resp:
                        status = resp.status
                except (OSError, TimeoutError):
                    status = 0
                self.deliveries.append((str(event[self.event_name_field]), status))
                statuses.append(status)
        return statuses


S = TypeVar("S", bound=ProviderState)


def provider_app(
    key: web.AppKey[S],
    state: S,
    api: Middleware,
    routes: Iterable[web.RouteDef],
    *,
    pay_page: Handler,
    pay_submit: Handler,
) -> web.Application:
    """A fake's aiohttp application, its state at app[key] (also app["state"]): the API `routes`,
    each call counted in state.calls by route name and then passed through `api` (the provider's
    auth and error shapes), and GET / POST /pay/{id}, the page a person pays on, with neither."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path.startswith("/pay/"):
            return await handler(request)
        name = request.match_info.route.name
        if name:
            request.app[key].calls[name] += 1
        return await api(request, handler)

    app = web.Application(middlewares=[middleware])
    app[key] = state
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", web.NotAppKeyWarning)
        app["state"] = state
    app.add_routes(routes)
    app.router.add_get("/pay/{id}", pay_page)
    app.router.add_post("/pay/{id}", pay_submit)
    return app


def base_url(request: web.Request) -> str:
    """The address `request` came in on, for urls the fake hands out."""
    return f"{request.scheme}://{request.host}"


def by_id(key: web.AppKey[S], answer: Callable[[S, str], Any]) -> Handler:
    """A handler answering, as JSON, `answer(state, id)` for the {id} in the path."""

    async def handler(request: web.Request) -> web.StreamResponse:
        return web.json_response(answer(request.app[key], request.match_info["id"]))

    return handler


_PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>{title}</title></head>
<body style="font-family: sans-serif; max-width: 32em; margin: 3em auto">
<p><small>{title} (local tests and demos: no money moves)</small></p>
<h1>{heading}</h1><p>{amount} &middot; status <b>{status}</b></p>
<form method="post"><button name="action" value="pay">Pay</button>
<button name="action" value="{other}">{other_label}</button></form></body></html>"""


def pay_page(*, title: str, heading: str, amount: str, status: str, other: str) -> web.Response:
    """The /pay/{id} page: what is bought, for how much, and Pay / `other` buttons that POST the
    chosen action back to the same address."""
    page = _PAGE.format(
        title=html.escape(title),
        heading=html.escape(heading),
        amount=html.escape(amount),
        status=html.escape(status),
        other=html.escape(other),
        other_label=html.escape(other.capitalize()),
    )
    return web.Response(text=page, content_type="text/html")


def page_id(request: web.Request, known: Container[str], missing: str) -> str:
    """The {id} of a /pay/{id} request; 404 (`missing`) unless it is in `known`."""
    object_id = request.match_info["id"]
    if object_id not in known:
        raise web.HTTPNotFound(text=missing)
    return object_id


async def pay_form(request: web.Request, known: Container[str], missing: str) -> tuple[str, str]:
    """The {id} of a POST /pay/{id} (see page_id) and the action of the button pressed."""
    object_id = page_id(request, known, missing)
    form = await request.post()
    return object_id, str(form.get("action", ""))


async def settle(
    state: ProviderState, act: Callable[[], Iterable[Mapping[str, Any]]]
) -> list[Mapping[str, Any]]:
    """Plays the customer's part for the pay page (`act`, one of the state's test helpers) and
    delivers the events it answers; a ValueError (nothing left to pay) is answered 409."""
    try:
        events = list(act())
    except ValueError as e:
        raise web.HTTPConflict(text=str(e)) from None
    await state.deliver(events)
    return events


def parse_args(
    argv: list[str] | None,
    *,
    description: str,
    port: int,
    credentials: Mapping[str, str],
    secret_help: str,
    public_url_help: str,
) -> argparse.Namespace:
    """The command line of a fake: --host, --port, the `credentials` options (flag: default) and
    the --webhook-url, --webhook-secret and --public-url of demos."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=port)
    for flag, default in credentials.items():
        parser.add_argument(flag, default=default)
    parser.add_argument("--webhook-url", help="POST the webhooks of payments made on /pay/{id} here")
    parser.add_argument("--webhook-secret", help=secret_help)
    parser.add_argument("--public-url", help=public_url_help)
    return parser.parse_args(argv)


def serve(app: web.Application, args: argparse.Namespace, banner: str) -> int:
    """Prints `banner` and serves `app` on args.host:args.port until interrupted."""
    print(banner, flush=True)
    web.run_app(app, host=args.host, port=args.port, access_log=None, print=lambda *_: None)
    return 0
